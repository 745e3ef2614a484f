"""The task keys (medssl.task): labels -> num_classes, the intensity spec, Intensityd against hand-computed values,
and the bundle configs deriving num_classes from labels and refusing a disagreement."""

import json

import numpy as np
import pytest
import torch
from helpers import REPO
from monai.bundle import ConfigParser
from monai.transforms import NormalizeIntensityd

from medssl.data import DataError, data_error_message
from medssl.task import Label, check_intensity, classes, label_names, num_classes, parse_labels
from medssl.transforms import Intensityd

CT = {
    "0": "background",
    "1": {
        "name": "liver",
        "code": ["10200004", "SCT", "Liver"],
        "category": ["123037004", "SCT", "Anatomical Structure"],
    },
    "2": "spleen",
    "3": "kidney",
}


def test_labels_parse_and_give_the_classes():
    parsed = parse_labels(CT)
    assert list(parsed) == [0, 1, 2, 3]
    assert parsed[1] == Label(1, "liver", ("10200004", "SCT", "Liver"), ("123037004", "SCT", "Anatomical Structure"))
    assert parsed[2] == Label(2, "spleen") and parsed[2].code is None
    assert num_classes(CT) == 4 and num_classes(CT, 4) == 4 and classes(CT) == [0, 1, 2, 3]
    assert label_names(CT) == {1: "liver", 2: "spleen", 3: "kidney"}
    assert num_classes({0: "background", 1: "left atrium"}) == 2  # integer keys too


@pytest.mark.parametrize(
    "labels, message",
    [
        ([0, 1], "labels: expected a mapping of label value -> name"),
        ({"0": "background", "one": "liver"}, "label value 'one' is not an integer"),
        ({"0": "background", "2": "liver"}, r"label values \[0, 2\]; expected 0 \(background\) to N-1"),
        ({"0": "background"}, "at least one class besides the background"),
        ({"0": "background", "1": "Liver", "2": "liver"}, r"the names \['liver'\] are given to more than one"),
        ({"0": "background", "1": {"name": "liver", "colour": "red"}}, r"labels\[1\]: unknown fields \['colour'\]"),
        ({"0": "background", "1": {"name": "liver", "code": ["10200004", "SCT"]}}, r"labels\[1\].code: expected"),
        ({"0": "background", "1": {"code": ["10200004", "SCT", "Liver"]}}, r"labels\[1\]: a label needs a non-empty"),
    ],
)
def test_bad_labels_are_refused_with_the_key(labels, message):
    with pytest.raises(DataError, match=message):
        parse_labels(labels)


def test_num_classes_that_disagree_with_labels():
    with pytest.raises(DataError, match=r"num_classes is 4 but labels has 2 \(0 background, 1 left atrium\)"):
        classes({"0": "background", "1": "left atrium"}, 4)


def test_intensity_specs():
    assert check_intensity(None) == {"mode": "zscore"} == check_intensity("zscore")
    assert check_intensity({"mode": "window", "range": [-175, 250]}) == {
        "mode": "window", "range": [-175.0, 250.0], "output": [0.0, 1.0]}  # fmt: skip
    assert check_intensity({"mode": "percentile"}) == {"mode": "percentile", "range": [0.5, 99.5]}
    bad = [
        ({"mode": "hounsfield"}, r"intensity.mode: 'hounsfield' is not a mode; expected one of \['zscore', 'window', "
                                 r"'percentile'\]"),  # fmt: skip
        ({"mode": "window"}, "intensity.range: mode 'window' needs the window"),
        ({"mode": "window", "range": [250, -175]}, "expected low < high"),
        ({"mode": "window", "range": "wide"}, r"expected \[low, high\]"),
        ({"mode": "percentile", "range": [1, 101]}, r"percentiles must lie in \[0, 100\]"),
        ({"mode": "zscore", "range": [0, 1]}, r"unknown fields \['range'\] for mode 'zscore'"),
        ([1, 2], "intensity: expected"),
    ]
    for spec, message in bad:
        with pytest.raises(DataError, match=message):
            check_intensity(spec)
    with pytest.raises(DataError, match="is not a mode"):
        Intensityd("image", {"mode": "hu"})


def test_intensityd_against_hand_computed_values():
    torch.manual_seed(0)
    mr = {"image": torch.randn(1, 6, 5, 4) * 80 + 300}
    assert torch.equal(Intensityd("image")(dict(mr))["image"], NormalizeIntensityd("image")(dict(mr))["image"])
    hu = torch.tensor([-1000.0, -175.0, 0.0, 250.0, 1000.0]).reshape(1, 5, 1, 1)
    window = Intensityd("image", {"mode": "window", "range": [-175, 250]})({"image": hu})["image"]
    np.testing.assert_allclose(np.asarray(window).ravel(), [0, 0, 175 / 425, 1, 1], rtol=1e-6)
    signed = Intensityd("image", {"mode": "window", "range": [-175, 250], "output": [-1, 1]})({"image": hu})["image"]
    np.testing.assert_allclose(np.asarray(signed).ravel(), [-1, -1, 2 * 175 / 425 - 1, 1, 1], rtol=1e-6)
    ramp = torch.arange(101, dtype=torch.float32).reshape(1, 101, 1, 1)  # percentile p of 0..100 is p
    out = Intensityd("image", {"mode": "percentile", "range": [10, 90]})({"image": ramp})["image"]
    clipped = np.clip(np.arange(101.0), 10, 90)
    np.testing.assert_allclose(np.asarray(out).ravel(), (clipped - clipped.mean()) / clipped.std(), rtol=1e-5)


def _pipeline(config):
    """Where a config's deterministic preprocessing lives."""
    return "train#deterministic_transforms" if config == "train" else "preprocessing"


def _parse(bundle, config, **overrides):
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / f"{config}.json"))
    parser.update(overrides)
    return parser


@pytest.mark.parametrize("bundle", ["la_seg_finetune", "cvrl_semisup", "simcvd_distill"])
def test_bundle_configs_take_their_classes_from_labels(bundle):
    for config in ("train", "inference"):
        parser = _parse(bundle, config)
        assert parser.get_parsed_content("num_classes") == 2
        assert label_names(parser.get_parsed_content("labels")) == {1: "left atrium"}
        four = _parse(bundle, config, labels=CT)
        assert four.get_parsed_content("num_classes") == 4
        net = four.get_parsed_content("network_def") if config == "train" else four.get_parsed_content("network_spec")()
        assert net.out_conv.weight.shape[0] == 4  # the network follows the labels
        with pytest.raises(Exception) as caught:
            _parse(bundle, config, num_classes=4).get_parsed_content(_pipeline(config))
        assert "num_classes is 4 but labels has 2" in data_error_message(caught.value)


@pytest.mark.parametrize(
    "bundle", ["la_seg_finetune", "cvrl_semisup", "simcvd_distill", "pcrl_pretrain", "spark_pretrain"]
)
def test_every_bundle_normalises_by_its_intensity_key(bundle):
    for config in ("train", "inference"):
        text = (REPO / "bundles" / bundle / "configs" / f"{config}.json").read_text()
        assert json.loads(text)["intensity"] == {"mode": "zscore"}
        assert "NormalizeIntensityd" not in text and '"intensity": "@intensity"' in text
        with pytest.raises(Exception) as caught:
            _parse(bundle, config, intensity={"mode": "hu"}).get_parsed_content(_pipeline(config))
        assert "intensity.mode: 'hu' is not a mode" in data_error_message(caught.value)


def test_write_task_makes_a_bundle_describe_its_task(tmp_path):
    import shutil

    from medssl.task import write_task

    root = tmp_path / "bundle"
    shutil.copytree(REPO / "bundles" / "la_seg_finetune" / "configs", root / "configs")
    window = {"mode": "window", "range": [-175, 250]}
    assert write_task(root, CT, [0.8, 0.8, 3.0], window, [96, 96, 32]) == [
        "configs/inference.json", "configs/metadata.json"]  # fmt: skip
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    assert parser.get_parsed_content("num_classes") == 4 and parser.get_parsed_content("spacing") == [0.8, 0.8, 3.0]
    assert parser.get_parsed_content("patch_size") == [96, 96, 32]
    assert parser.get_parsed_content("network_spec")().out_conv.weight.shape[0] == 4
    meta = json.loads((root / "configs" / "metadata.json").read_text())["network_data_format"]
    assert meta["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "liver", "2": "spleen", "3": "kidney"}
    assert meta["inputs"]["image"]["pixdim"] == [0.8, 0.8, 3.0]
    assert meta["inputs"]["image"]["intensity"].startswith("clipped to the window [-175, 250]")
    assert meta["post_processed_outputs"]["pred"]["value_range"] == [0, 3]
    before = {p.name: p.stat().st_mtime_ns for p in (root / "configs").iterdir()}
    assert write_task(root, CT, [0.8, 0.8, 3.0], window, [96, 96, 32]) == []  # already says so: untouched
    assert before == {p.name: p.stat().st_mtime_ns for p in (root / "configs").iterdir()}
    assert write_task(tmp_path / "no_configs", CT, [1, 1, 1]) == []
    with pytest.raises(DataError, match="is not a mode"):
        write_task(root, CT, [1, 1, 1], {"mode": "hu"})
    assert write_task(root, CT, [0.8, 0.8, 3.0], window, [96, 96, 32], modality="ct") == [
        "configs/inference.json", "configs/metadata.json"]  # fmt: skip
    assert json.loads((root / "configs" / "metadata.json").read_text())["network_data_format"]["inputs"]["image"][
        "modality"] == "CT"  # fmt: skip
    with pytest.raises(DataError, match=r"modality: 'US' is not a modality medssl reads; expected one of \['MR', 'C"):
        write_task(root, CT, [1, 1, 1], modality="US")


def test_largest_component_per_label_with_an_opt_out():
    """Each label keeps its largest piece on its own; a label marked largest_component false keeps every piece."""
    from monai.transforms import KeepLargestConnectedComponentd

    from medssl.task import largest_component_labels

    labels = {"0": "background", "1": "liver", "2": {"name": "kidneys", "largest_component": "false"}, "3": "spleen"}
    assert largest_component_labels(labels) == [1, 3]
    assert largest_component_labels({"0": "background", "1": "left atrium"}) == [1]  # LA: as before
    pred = torch.zeros(1, 12, 1, 1)
    pred[0, [0, 1, 2, 5]] = 1  # liver: a piece of 3 and a stray voxel
    pred[0, [7, 10]] = 2  # two kidneys, one voxel each
    pred[0, [8, 9]] = 3
    pred[0, 11] = 3  # spleen: 2 voxels and a stray one
    out = KeepLargestConnectedComponentd("pred", applied_labels=largest_component_labels(labels))({"pred": pred})
    assert np.asarray(out["pred"]).ravel().tolist() == [1, 1, 1, 0, 0, 0, 0, 2, 3, 3, 2, 0]
    with pytest.raises(DataError, match=r"labels\[1\].largest_component must be true or false"):
        parse_labels({"0": "background", "1": {"name": "liver", "largest_component": "maybe"}})
    for bundle in ("la_seg_finetune", "cvrl_semisup", "simcvd_distill"):
        text = (REPO / "bundles" / bundle / "configs" / "inference.json").read_text()
        assert '"applied_labels": "$medssl.task.largest_component_labels(@labels)"' in text
