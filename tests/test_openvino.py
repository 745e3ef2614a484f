"""The OpenVINO backend (medssl.openvino, medssl.openvino_int8) on the released la_seg_finetune weights and real LA
training cases: the fp32 IR equals PyTorch eager, the int8 IR rebuilt at pull time from a calibration record (no data)
equals the one calibrated directly, int8 label maps agree with fp32 on whole training cases, and the network module is
safe to share between threads. Calibration here reads training cases only (positions 1-60 of train.list)."""

import copy
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO

ov = pytest.importorskip("openvino", reason='OpenVINO is an optional extra: pip install -e ".[openvino]"')
pytest.importorskip("nncf", reason='NNCF is an optional extra: pip install -e ".[openvino]"')

from medssl import openvino as mov  # noqa: E402
from medssl import openvino_int8 as mint8  # noqa: E402
from medssl.export import eager_network  # noqa: E402
from medssl.metrics import dice  # noqa: E402
from medssl.clinic.release import pull  # noqa: E402

CALIBRATION_CASES = (2, 31)  # training cases of the dev split
AGREEMENT_CASES = (12, 47)  # two other training cases


@pytest.fixture(scope="module")
def released(module_tmp):
    """The released la_seg_finetune (weights only: the TorchScript exports of a pull are not needed here), its fp32
    IR and its eager network."""
    root = pull(
        "la_seg_finetune",
        bundle_dir=str(module_tmp("pulled")),
        index=str(REPO / "bundle_index.json"),
        torchscript=False,
    )
    sha = mov.file_sha256(root / "models" / "model.pt")
    eager = eager_network(root)
    fp32 = mov.export_fp32(eager, module_tmp("ir") / "fp32.xml", weights_sha256=sha)
    return {"root": root, "sha": sha, "eager": eager, "fp32": fp32}


@pytest.fixture(scope="module")
def calibrated(released, la_dir, module_tmp):
    """int8 calibrated directly on two sliding-window crops of each of two training cases, its record written as
    JSON, and the int8 IR rebuilt from that file alone (as a pull does)."""
    crops, recipe = mint8.calibration_crops(la_dir, released["root"], cases=CALIBRATION_CASES, crops_per_case=2)
    direct, record = mint8.calibrate_int8(released["fp32"], crops, recipe, released["sha"])
    folder = module_tmp("int8")
    record_file = folder / "openvino_int8.json"
    mint8.write_record(record, record_file)
    rebuilt = mint8.quantize_from_record(
        released["fp32"], record_file, folder / "int8.xml", weights_sha256=released["sha"]
    )
    return {"direct": direct, "record": record, "record_file": record_file, "rebuilt": rebuilt, "crops": crops}


def _window(la_dir, root, position, size):
    """The central ``size`` window of a training case after the bundle's preprocessing, ``[1, 1, *size]``."""
    preprocessing, _ = mint8.bundle_preprocessing(root)
    entry = json.loads((la_dir / "dataset.json").read_text())["training"][position - 1]
    volume = preprocessing({"image": str(la_dir / entry["image"])})["image"].as_tensor()
    start = [(s - w) // 2 for s, w in zip(volume.shape[1:], size)]
    return volume[None, :, start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]]


def test_fp32_ir_equals_eager_on_a_real_la_crop(released, la_dir, record_property):
    net = mov.OpenVINONetwork(released["fp32"], precision="f32")
    diffs = {}
    for size in ((112, 112, 80), (96, 64, 48)):  # one IR, any 16*n size: batch and spatial sizes are dynamic
        x = _window(la_dir, released["root"], 1, size)
        x = torch.cat([x, x.flip(2)])  # a batch of two windows
        with torch.no_grad():
            ref = released["eager"](x)
        got = net(x)
        assert got.dtype == torch.float32 and got.shape == ref.shape == (2, 2, *size)
        assert (ref.argmax(1) == 1).sum() > 1000  # the atrium is in the crop
        diffs[size] = (got - ref).abs().max().item()
        assert (got.argmax(1) != ref.argmax(1)).sum() <= 10  # of 1.6 M voxels: ties at the boundary at most
    record_property("openvino_fp32_max_abs_logit_diff", diffs)
    print("OpenVINO fp32 IR vs PyTorch eager, max abs logit difference:", diffs)
    assert max(diffs.values()) <= 1e-3, diffs  # measured 2e-5 to 4e-5 (logits up to about 30 in magnitude)
    assert mov.ir_info(released["fp32"]) == {"precision": "fp32", "weights_sha256": released["sha"]}


def test_int8_rebuilt_from_the_record_equals_the_directly_calibrated_one(released, calibrated, la_dir):
    record = calibrated["record"]
    assert record["weights_sha256"] == released["sha"] and record["quantize"]["preset"] == "performance"
    assert {c["position"] for c in record["calibration"]["cases"]} == set(CALIBRATION_CASES)
    assert len(record["activation_ranges"]) == 34 and record["biases"]  # every quantiser; bias-corrected convs
    assert len(calibrated["record_file"].read_bytes()) < 64_000  # small enough to ship in a release's configs
    info = mov.ir_info(calibrated["rebuilt"])
    assert info["precision"] == "int8" and info["int8_fingerprint"] == record["int8_fingerprint"]
    rebuilt = ov.Core().read_model(str(calibrated["rebuilt"]))
    assert mov.model_fingerprint(rebuilt) == mov.model_fingerprint(calibrated["direct"]) == record["int8_fingerprint"]
    # the same numbers out of both, on a calibration crop and on a crop of another case
    core = ov.Core()
    x = np.ascontiguousarray(_window(la_dir, released["root"], AGREEMENT_CASES[0], (64, 64, 48)).numpy())
    for sample in (calibrated["crops"][0], x):
        a = core.compile_model(calibrated["direct"], "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(sample)[0]
        b = core.compile_model(rebuilt, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(sample)[0]
        assert np.array_equal(a, b)


def test_int8_label_maps_agree_with_fp32_on_two_training_cases(released, calibrated, la_dir, record_property):
    from monai.inferers import SlidingWindowInferer

    preprocessing, settings = mint8.bundle_preprocessing(released["root"])
    inferer = SlidingWindowInferer(settings["patch_size"], settings["sw_batch_size"], settings["sw_overlap"])
    fp32 = mov.OpenVINONetwork(released["fp32"])
    int8 = mov.OpenVINONetwork(calibrated["rebuilt"])
    entries = json.loads((la_dir / "dataset.json").read_text())["training"]
    agreement = {}
    for position in AGREEMENT_CASES:
        image = preprocessing({"image": str(la_dir / entries[position - 1]["image"])})["image"][None]
        with torch.no_grad():
            a, b = (inferer(image, net).argmax(1) for net in (fp32, int8))
        agreement[position] = float(dice(a.numpy(), b.numpy()))  # plain floats: xdist sends record_property values
    record_property("int8_agreement_dice", agreement)
    print("int8 vs fp32 label-map Dice on whole training cases:", agreement)
    assert min(agreement.values()) >= 0.99, agreement


def test_record_refuses_other_weights_other_graphs_and_dev_cases(released, calibrated, la_dir, tmp_path):
    record = calibrated["record"]
    with pytest.raises(mint8.Int8RecordError, match="calibrate again"):
        mint8.int8_from_record(released["fp32"], record, weights_sha256="0" * 64)
    # weights changed after calibration: the fp32 IR is not the calibrated one
    other = copy.deepcopy(released["eager"])
    with torch.no_grad():
        other.out_conv.bias.add_(1.0)
    with pytest.raises(mint8.Int8RecordError, match="not the one the int8 record was calibrated on"):
        mint8.int8_from_record(mov.convert(other), record)
    # a record that misses a quantiser (another NNCF placing another one) is refused even when not strict
    broken = copy.deepcopy(record)
    broken["activation_ranges"].pop(sorted(broken["activation_ranges"])[3])
    with pytest.raises(mint8.Int8RecordError, match="quantisers without recorded ranges"):
        mint8.int8_from_record(released["fp32"], broken, strict=False)
    with pytest.raises(mint8.Int8RecordError, match="format"):
        mint8.quantize_from_record(released["fp32"], {"format": "other"}, tmp_path / "x.xml")
    assert not (tmp_path / "x.xml").exists()
    with pytest.raises(ValueError, match=r"cases \[61\] are outside the training cases 1..60"):
        mint8.calibration_crops(la_dir, released["root"], cases=[5, 61])


def test_network_module_shares_one_compiled_model_between_threads(released):
    x = torch.randn(3, 1, 32, 32, 32)
    torch_threads = torch.get_num_threads()
    net = mov.OpenVINONetwork(released["fp32"], max_batch=2)
    ref = net(x)
    assert net.compiled_model().get_property("INFERENCE_NUM_THREADS") == torch_threads
    assert mov.OpenVINONetwork(released["fp32"]).compiled_model() is net.compiled_model()  # compiled once
    results, errors = {}, []

    def call(i):
        try:
            results[i] = net(x[i % 3 :][:1].contiguous(memory_format=torch.channels_last_3d))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, out in results.items():
        assert torch.equal(out[0], ref[i % 3])
    clone = copy.deepcopy(net)  # a copy (MONAI Label copies networks) compiles again on first use
    assert torch.equal(clone(x), ref)
    with pytest.raises(ValueError, match="precision"):
        mov.OpenVINONetwork(released["fp32"], precision="fp64")
    with pytest.raises(FileNotFoundError, match="missing.xml"):
        mov.OpenVINONetwork(Path(released["fp32"]).with_name("missing.xml"))


def test_released_record_rebuilds_the_calibrated_int8_model(released):
    """The record a release carries (bundles/la_seg_finetune/configs/openvino_int8.json), with the released weights
    and the pinned OpenVINO/NNCF: rebuilt bit for bit (fingerprint), no data needed."""
    record_file = released["root"] / mint8.RANGES_FILE
    if not record_file.is_file():
        record_file = REPO / "bundles" / "la_seg_finetune" / mint8.RANGES_FILE
    if not record_file.is_file():
        pytest.skip(f"no int8 calibration record at {mint8.RANGES_FILE} of the bundle yet")
    record = json.loads(record_file.read_text())
    if record["weights_sha256"] != released["sha"]:
        pytest.skip("the bundle's int8 record is for weights that are not released yet")
    int8 = mint8.int8_from_record(released["fp32"], record, weights_sha256=released["sha"], strict=True)
    assert mov.model_fingerprint(int8) == record["int8_fingerprint"]
    assert all(c["position"] <= mint8.DEV_TRAIN_CASES for c in record["calibration"]["cases"])
