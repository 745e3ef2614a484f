"""``runtime auto`` (medssl.clinic.runtime_choice): which runtimes a bundle offers (the release's accuracy record, for
its weights), the decision on measured times and agreements, and the real probe on the released la_seg_finetune:
cached per machine, used by ``segment``, reported in ``statistics.json``, never for weights it was not measured on."""

import json
import shutil
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import REPO

from medssl.clinic import runtime_choice as rc
from medssl.clinic.release import pull


@pytest.fixture(scope="module")
def released(module_tmp):
    """The released la_seg_finetune (with its configs/runtime_accuracy.json), pulled from the committed index."""
    return pull("la_seg_finetune", bundle_dir=str(module_tmp("pulled")), index=str(REPO / "bundle_index.json"))


def _copy(root, tmp_path, name="bundle"):
    target = tmp_path / name
    shutil.copytree(root, target, ignore=shutil.ignore_patterns("openvino", "model.ts", "model.pt2", "exports.json"))
    return target


def _record(root):
    return json.loads((root / rc.ACCURACY_FILE).read_text())


def _write_record(root, record):
    (root / rc.ACCURACY_FILE).write_text(json.dumps(record))


# -- the decision (step 3) ------------------------------------------------------------------------------------------


def test_decide_takes_the_fastest_that_agrees():
    choice = rc.decide({"torch": 2.7, "openvino": 4.4, "openvino-int8": 1.4}, {"openvino": 1.0, "openvino-int8": 0.996})
    assert choice.runtime == "openvino-int8"
    assert "1.93x as fast as torch" in choice.reason and "99.60 %" in choice.reason


def test_decide_stays_with_torch_where_openvino_is_not_faster():
    choice = rc.decide({"torch": 1.0, "openvino": 1.3, "openvino-int8": 0.95}, {"openvino": 1.0, "openvino-int8": 1.0})
    assert choice.runtime == "torch"  # int8 is 1.05x: below the 1.1x margin
    assert "openvino 0.77x" in choice.reason and "openvino-int8 1.05x" in choice.reason


def test_decide_leaves_out_a_runtime_that_disagrees_on_this_cpu():
    choice = rc.decide({"torch": 3.0, "openvino": 2.0, "openvino-int8": 1.0}, {"openvino": 1.0, "openvino-int8": 0.97})
    assert choice.runtime == "openvino"  # int8 is fastest but its maps agree only 97 % here
    assert "97.00 %" in choice.excluded["openvino-int8"]


# -- the candidates (step 1) ----------------------------------------------------------------------------------------


def test_the_release_offers_openvino_and_int8_by_its_record(released):
    record = _record(released)
    assert record["weights_sha256"] == rc.file_sha256(released / "models" / "model.pt")
    int8 = record["runtimes"]["openvino-int8"]
    # the rule, as measured on dev cases 61-80 (benchmarks/results/openvino_amd_epyc/accuracy.json)
    assert int8["mean_agreement"] >= 0.995 and abs(int8["dice_points_vs_reference"]) <= 0.2 and int8["meets_rule"]
    assert rc.eligible_runtimes(released, "cpu") == (["torch", "openvino", "openvino-int8"], {})
    candidates, excluded = rc.eligible_runtimes(released, "cuda:0")
    assert candidates == ["torch"] and "CPU only" in excluded["openvino-int8"]


def test_records_that_do_not_hold_leave_only_torch(released, tmp_path):
    root = _copy(released, tmp_path)
    record = _record(root)
    # a runtime that missed the rule is not offered
    bad = json.loads(json.dumps(record))
    bad["runtimes"]["openvino-int8"]["mean_agreement"] = 0.990
    _write_record(root, bad)
    candidates, excluded = rc.eligible_runtimes(root)
    assert candidates == ["torch", "openvino"] and "99.00 % < 99.5 %" in excluded["openvino-int8"]
    # Dice moved by more than 0.2 points
    bad["runtimes"]["openvino-int8"].update(mean_agreement=0.998, dice_points_vs_reference=-0.35)
    _write_record(root, bad)
    assert "-0.35 points" in rc.eligible_runtimes(root)[1]["openvino-int8"]
    # int8 measured with another calibration record than the bundle's
    bad = json.loads(json.dumps(record))
    bad["int8_record_sha256"] = "0" * 64
    _write_record(root, bad)
    assert "another int8 calibration record" in rc.eligible_runtimes(root)[1]["openvino-int8"]
    # the weights changed after the release (fine-tuned, or trained by the MONAI Label app): nothing but torch
    _write_record(root, record)
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] * 1.01
    torch.save(state, root / "models" / "model.pt")
    candidates, excluded = rc.eligible_runtimes(root)
    assert candidates == ["torch"] and "other weights" in excluded["openvino-int8"]
    choice = rc.choose_runtime(root, "cpu", cache=tmp_path / "cache.json")
    assert choice.runtime == "torch" and "other weights" in choice.reason
    assert not (tmp_path / "cache.json").exists()  # nothing to time
    # no record at all (a bundle you trained), and a broken one named with what was expected
    (root / rc.ACCURACY_FILE).unlink()
    assert rc.eligible_runtimes(root)[0] == ["torch"]
    (root / rc.ACCURACY_FILE).write_text('{"runtimes": {}}')
    with pytest.raises(ValueError, match="runtime_accuracy.json: expected an object with 'weights_sha256'"):
        rc.eligible_runtimes(root)


def test_accuracy_record_is_written_from_a_benchmark_summary(tmp_path):
    summary = {
        "torch-fp32": {"mean_dice": 0.9, "mean_agreement": 1.0, "dice_points_vs_reference": 0.0},
        "openvino-int8": {"mean_dice": 0.897, "mean_agreement": 0.996, "dice_points_vs_reference": -0.3},
    }
    path = rc.write_accuracy_record(summary, tmp_path / "r.json", weights_sha256="ab" * 32, cases="x")
    record = json.loads(path.read_text())
    assert record["runtimes"]["openvino-int8"]["meets_rule"] is False  # 0.3 points lost
    assert record["runtimes"]["torch-fp32"]["meets_rule"] is True and record["rule"] == rc.RULE
    with pytest.raises(ValueError, match="weights_sha256 is required"):
        rc.write_accuracy_record(summary, tmp_path / "r.json")
    with pytest.raises(ValueError, match="no 'torch-fp32' reference"):
        rc.write_accuracy_record({"openvino": summary["openvino-int8"]}, tmp_path / "r.json", weights_sha256="ab")


# -- the probe on this machine, and segment -------------------------------------------------------------------------


def test_auto_probes_once_then_segment_runs_the_choice(released, la_dir, tmp_path, monkeypatch, record_property):
    from medssl.clinic.segment import Segmenter, segment

    monkeypatch.setenv("MEDSSL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEDSSL_RUNTIME", raising=False)
    start = time.perf_counter()
    with Segmenter(released, progress=False) as seg:  # the default is auto
        probe_seconds = time.perf_counter() - start
        choice = seg.runtime_choice
    cache = json.loads((tmp_path / "home" / rc.CACHE_FILE).read_text())
    (entry,) = cache["choices"].values()
    measured = entry["choice"]
    record_property("auto_choice", measured)
    print(f"auto on this CPU ({probe_seconds:.1f} s):", json.dumps(measured))
    assert set(measured["seconds"]) == {"torch", "openvino", "openvino-int8"}
    assert all(measured["agreement"][r] >= rc.PROBE_AGREEMENT for r in measured["seconds"] if r != "torch")
    fastest = min(measured["seconds"], key=measured["seconds"].get)
    expected = fastest if measured["seconds"]["torch"] / measured["seconds"][fastest] >= rc.MIN_SPEEDUP else "torch"
    assert choice["runtime"] == measured["runtime"] == expected and not choice["cached"]
    assert entry["key"]["weights"] == rc.file_sha256(released / "models" / "model.pt")

    # the next process on this machine reads the cache: no probe; segment writes what ran and why
    case = (la_dir / "train.list").read_text().split()[0]
    image, label = la_dir / "imagesTr" / f"{case}.nii.gz", la_dir / "labelsTr" / f"{case}.nii.gz"
    start = time.perf_counter()
    (result,) = segment([str(image)], bundle=str(released), out=str(tmp_path / "out"), progress=False)
    assert result["status"] == "ok", result
    stats = json.loads((tmp_path / "out" / f"{case}_statistics.json").read_text())
    assert stats["runtime_choice"]["cached"] is True and stats["runtime_choice"]["runtime"] == expected
    assert stats["runtime"] == {"torch": "pt"}.get(expected, expected)
    pred = np.asarray(nib.load(result["segmentation"]).dataobj) > 0
    truth = np.asarray(nib.load(label).dataobj) > 0
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    record_property("auto_dice_training_case", float(dice))
    assert dice > 0.85, dice  # a training case of the release, any runtime
    print(f"segment with the cached choice: {time.perf_counter() - start:.1f} s, Dice {dice:.4f}")


def test_auto_refuses_exported_formats_and_env_picks_the_default(released, monkeypatch):
    from medssl.clinic.segment import Segmenter

    with pytest.raises(ValueError, match="name runtime 'torch' with it"):
        Segmenter(released, runtime="auto", model_format="pt2")
    monkeypatch.setenv("MEDSSL_RUNTIME", "tensorrt")
    with pytest.raises(
        ValueError, match="runtime: expected one of auto, torch, openvino, openvino-int8; got 'tensorrt'"
    ):
        Segmenter(released)
    monkeypatch.setenv("MEDSSL_RUNTIME", "torch")
    with Segmenter(released, progress=False) as seg:
        assert seg.runtime == "pt" and seg.runtime_choice is None


def test_speed_compares_runtimes_each_in_its_own_process(released, la_dir, tmp_path):
    """``python -m medssl speed --runtimes ...`` (the README's command for the runtime table) on one real scan."""
    import subprocess
    import sys

    case = (la_dir / "train.list").read_text().split()[0]
    scan = {"image": str(la_dir / "imagesTr" / f"{case}.nii.gz"), "label": str(la_dir / "labelsTr" / f"{case}.nii.gz")}
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps({"training": [scan], "test": [scan]}))
    subprocess.run(
        [sys.executable, "-m", "medssl", "speed", "--dataset_dir", tmp_path / "ds", "--runtimes", "torch-fp32,openvino",
         "--num_volumes", "1", "--bundle", released, "--out", tmp_path / "out"],
        check=True, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    results = json.loads((tmp_path / "out" / "runtimes.json").read_text())
    fp32, ov = results["runtimes"]["torch-fp32"], results["runtimes"]["openvino"]
    assert fp32["precision"] == "fp32" and fp32["ran"] == "pt" and ov["ran"] == "openvino"
    for r in (fp32, ov):
        assert len(r["seconds"]) == 1 and r["seconds"][0] > 0 and r["peak_rss_mb"] > 100
        assert r["dice"][0] > 0.85  # a training case of the release
    assert ov["agreement_with_reference"][0] >= 0.999  # the fp32 IR gave identical maps on dev cases 61-80
    report = (tmp_path / "out" / "runtimes.md").read_text()
    assert "| torch-fp32 | fp32 |" in report and "| openvino | fp32 |" in report
