"""Derived artefacts of a bundle (medssl.export): model.pt2 (torch.export) and model.ts made from the released
weights at pull time, equal to the eager network on a real LA crop, rebuilt when stale (weights or torch changed),
and run by ``segment --model_format`` and by ``inference.json`` without instantiating ``network_spec``."""

import json
import shutil
import subprocess
import sys
import threading

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import REPO

from medssl import export
from medssl.clinic.release import pull

INDEX = json.loads((REPO / "bundle_index.json").read_text())
SEG_KEY = max(
    (k for k in INDEX if k.startswith("la_seg_finetune_v")), key=lambda k: [int(p) for p in k.split("_v")[1].split(".")]
)


@pytest.fixture(scope="module")
def seg_bundle(module_tmp):
    """The released la_seg_finetune, pulled from the committed index (model.ts and model.pt2 made by the pull)."""
    return pull("la_seg_finetune", bundle_dir=str(module_tmp("pulled")), index=str(REPO / "bundle_index.json"))


@pytest.fixture(scope="module")
def la_case(la_dir):
    """A real LA training case (the first of train.list: a training case of the release, never a dev test case)."""
    case = (la_dir / "train.list").read_text().split()[0]
    return la_dir / "imagesTr" / f"{case}.nii.gz", la_dir / "labelsTr" / f"{case}.nii.gz"


def _crop(image_path, size):
    image = np.asanyarray(nib.load(image_path).dataobj, dtype=np.float32)
    image = (image - image.mean()) / image.std()
    c = [s // 2 for s in image.shape]
    crop = image[tuple(slice(ci - si // 2, ci - si // 2 + si) for ci, si in zip(c, size))]
    return torch.from_numpy(np.ascontiguousarray(crop))[None, None]


def test_pull_makes_fresh_recorded_artefacts(seg_bundle):
    record = json.loads((seg_bundle / "models" / "exports.json").read_text())
    for kind in ("ts", "pt2"):
        assert export.is_fresh(seg_bundle, kind), kind
        entry = record[export.ARTEFACTS[kind]]
        assert entry["tools"]["torch"] == torch.__version__.split("+")[0]
        assert len(entry["inputs"]["models/model.pt"]) == 64


def test_pt2_equals_eager_on_a_real_la_crop_at_two_sizes(seg_bundle, la_case, record_property):
    eager = export.eager_network(seg_bundle)
    program = export.load_artefact(seg_bundle / "models" / "model.pt2", "pt2")
    program.eval()  # a no-op flag for the exported graph (an exported module itself refuses eval())
    diffs = {}
    for size in ((112, 112, 80), (96, 64, 48)):
        x = _crop(la_case[0], size)
        with torch.no_grad():
            a, b = eager(x), program(x)
        assert b.shape == (1, 2, *size)
        assert (a.argmax(1) == 1).sum() > 1000  # the atrium is in the crop
        diffs[size] = (a - b).abs().max().item()
    record_property("pt2_max_abs_logit_diff", diffs)
    print("model.pt2 vs eager, max abs logit difference:", diffs)
    assert max(diffs.values()) <= 1e-4, diffs
    with pytest.raises(Exception, match="16"):  # spatial sizes are multiples of 16, as the VNet needs
        program(torch.zeros(1, 1, 40, 48, 32))


def test_stale_artefacts_are_rebuilt_never_used(seg_bundle, la_case, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(seg_bundle, root)
    x = _crop(la_case[0], (64, 64, 48))
    # the weights change after export (a fine-tuned model.pt copied in): both artefacts are stale
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    state = {k: (v * 0.5 if k.endswith("weight") and v.ndim == 5 else v) for k, v in state.items()}
    torch.save(state, root / "models" / "model.pt")
    assert not export.is_fresh(root, "pt2") and not export.is_fresh(root, "ts")
    old = export.load_artefact(seg_bundle / "models" / "model.pt2", "pt2")
    new = export.load_artefact(export.ensure(root, "pt2"), "pt2")
    eager = export.eager_network(root)
    with torch.no_grad():
        assert (new(x) - eager(x)).abs().max().item() <= 1e-4
        assert (old(x) - eager(x)).abs().max().item() > 1e-2  # the old export would have been wrong
    assert export.is_fresh(root, "pt2") and not export.is_fresh(root, "ts")
    # another torch made it (as recorded): rebuilt too
    record = json.loads((root / "models" / "exports.json").read_text())
    record["models/model.pt2"]["tools"]["torch"] = "2.0.0"
    (root / "models" / "exports.json").write_text(json.dumps(record))
    assert not export.is_fresh(root, "pt2")
    # an artefact without a record (copied in from elsewhere) is not trusted either
    (root / "models" / "exports.json").unlink()
    assert not export.is_fresh(root, "ts")
    # concurrent first uses (a server's requests) build it once
    seconds = []
    threads = [threading.Thread(target=lambda: seconds.append(export.ensure(root, "ts"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    made = json.loads((root / "models" / "exports.json").read_text())["models/model.ts"]["made"]
    assert len(seconds) == 3 and export.is_fresh(root, "ts") and made


def test_runtime_choices_are_checked_before_anything_loads(tmp_path):
    from medssl.clinic.segment import segment

    with pytest.raises(ValueError, match="model_format: expected one of pt, ts, pt2; got 'onnx'"):
        segment([tmp_path / "missing.nii.gz"], bundle=str(tmp_path / "no_bundle"), model_format="onnx")
    with pytest.raises(ValueError, match="runtime: expected one of auto, torch, openvino, openvino-int8; got 'tensorrt'"):
        segment([tmp_path / "missing.nii.gz"], bundle=str(tmp_path / "no_bundle"), runtime="tensorrt")
    with pytest.raises(ValueError, match="model_format 'pt2' is a PyTorch artefact"):
        export.check_runtime("openvino", "pt2")


def test_segment_and_inference_json_run_the_exported_program(seg_bundle, la_case, tmp_path):
    """``segment --model_format pt2|ts`` and ``monai.bundle run ... --model_format pt2`` on a native LA scan: the
    label map in the scan's geometry, equal to the eager network's (pt2 runs the same precision; TorchScript fp32)."""
    image, label = la_case
    outs = {}
    for fmt in ("pt", "pt2", "ts"):
        proc = subprocess.run(
            [sys.executable, "-m", "medssl", "segment", str(image), "--bundle", str(seg_bundle), "--out",
             str(tmp_path / fmt), "--model_format", fmt],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        (seg,) = (tmp_path / fmt).glob("*_seg.nii.gz")
        stats = json.loads(next((tmp_path / fmt).glob("*_statistics.json")).read_text())
        assert stats["runtime"] == fmt
        outs[fmt] = nib.load(seg)
    src = nib.load(image)
    ref = np.asarray(outs["pt"].dataobj) > 0
    truth = np.asarray(nib.load(label).dataobj) > 0
    assert 2 * (ref & truth).sum() / (ref.sum() + truth.sum()) > 0.85  # a training case of the release
    for fmt, img in outs.items():
        assert img.shape == src.shape and np.allclose(img.affine, src.affine, atol=1e-4)
        got = np.asarray(img.dataobj) > 0
        assert 2 * (got & ref).sum() / (got.sum() + ref.sum()) >= 0.995, fmt
    # the plain bundle command with the exported program, network_spec never instantiated
    (tmp_path / "scans").mkdir()
    shutil.copy(image, tmp_path / "scans" / image.name)
    script = (
        "import sys, runpy, medssl.networks as n\n"
        "def refuse(*a, **k): raise AssertionError('network_spec was instantiated')\n"
        "n.VNet.__init__ = refuse\n"
        "sys.argv = ['monai.bundle', 'run', '--config_file', sys.argv[1], '--bundle_root', sys.argv[2],"
        " '--dataset_dir', sys.argv[3], '--output_dir', sys.argv[4], '--model_format', 'pt2']\n"
        "runpy.run_module('monai.bundle', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(seg_bundle / "configs" / "inference.json"), str(seg_bundle),
         str(tmp_path / "scans"), str(tmp_path / "bundle_out")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (seg,) = (tmp_path / "bundle_out").glob("*_seg.nii.gz")
    got = np.asarray(nib.load(seg).dataobj) > 0
    assert 2 * (got & ref).sum() / (got.sum() + ref.sum()) >= 0.995


def test_segment_openvino_runtimes_on_a_scanner_units_flipped_case(seg_bundle, la_case, tmp_path, record_property):
    """``segment --runtime openvino`` and ``--runtime openvino-int8`` (the IR rebuilt from the release's calibration
    record, no data) on an LA case in scanner units with flipped axes: output in the input's geometry, Dice with the
    PyTorch output >= 0.99; a weights change makes the OpenVINO artefacts stale."""
    pytest.importorskip(
        "openvino", reason='OpenVINO is an optional extra: pip install -c constraints.txt "medssl[openvino]"'
    )
    pytest.importorskip("nncf", reason='NNCF is an optional extra: pip install -c constraints.txt "medssl[openvino]"')
    from medssl.geometry import write_variant

    units = write_variant(*la_case, tmp_path / "units", "scanner_units")
    image, _ = write_variant(*units, tmp_path / "flipped", "flip_xy")
    root = tmp_path / "bundle"
    shutil.copytree(seg_bundle, root)
    outs, agreement = {}, {}
    for runtime in ("torch", "openvino", "openvino-int8"):
        proc = subprocess.run(
            [sys.executable, "-m", "medssl", "segment", str(image), "--bundle", str(root), "--out",
             str(tmp_path / runtime), "--runtime", runtime],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        (seg,) = (tmp_path / runtime).glob("*_seg.nii.gz")
        outs[runtime] = nib.load(seg)
        stats = json.loads(next((tmp_path / runtime).glob("*_statistics.json")).read_text())
        assert stats["runtime"] == ("pt" if runtime == "torch" else runtime)  # the artefact that ran
    src = nib.load(image)
    ref = np.asarray(outs["torch"].dataobj) > 0
    for runtime, img in outs.items():
        assert img.shape == src.shape and np.allclose(img.affine, src.affine, atol=1e-4), runtime
        got = np.asarray(img.dataobj) > 0
        agreement[runtime] = float(2 * (got & ref).sum() / (got.sum() + ref.sum()))  # plain floats: xdist sends them
    record_property("openvino_agreement_with_torch", agreement)
    print("label agreement with the PyTorch output:", agreement)
    assert min(agreement.values()) >= 0.99, agreement
    assert export.is_fresh(root, "openvino") and export.is_fresh(root, "openvino-int8")
    torch.save({k: v * 1.01 if v.is_floating_point() else v for k, v in
                torch.load(root / "models" / "model.pt", weights_only=True).items()}, root / "models" / "model.pt")  # fmt: skip
    assert not export.is_fresh(root, "openvino") and not export.is_fresh(root, "openvino-int8")
