"""medssl.clinic.quality: the per-scan checks (body part before the model, structure volumes against the training
labels), by hand."""

from types import SimpleNamespace

import pytest

from medssl.clinic.quality import Quality, body_part_reason, bundle_body_parts, volume_reasons
from medssl.clinic.segment import print_table

HEART_CODE = {1: (("82471001", "SCT", "Left atrium"), None)}


def test_the_bundle_region_comes_from_its_codes_or_its_names():
    heart = bundle_body_parts({1: "left atrium"}, HEART_CODE)
    assert {"HEART", "CHEST", "THORAX", "CARDIAC"} <= heart and "HEAD" not in heart and "ABDOMEN" not in heart
    # configs from before the labels key (the 0.5.0 release): coded by name, as the SEG codes it
    assert bundle_body_parts({1: "left atrium"}, {1: (None, None)}) == heart
    liver = bundle_body_parts({1: "liver"}, {1: (("10200004", "SCT", "Liver"), None)})
    assert "ABDOMEN" in liver and "HEART" not in liver
    assert bundle_body_parts({1: "tumour"}, {1: (("999", "SCT", "x"), None)}) is None  # unknown: no check
    assert bundle_body_parts({1: "tumour"}, {}, explicit=["Brain", "head"]) == {"BRAIN", "HEAD"}


@pytest.mark.parametrize(
    "value, flagged", [("HEAD", True), ("brain", True), ("CHEST", False), ("Heart", False), ("", False), (None, False)]
)
def test_body_part_examined_against_the_bundle(value, flagged):
    ds = SimpleNamespace(BodyPartExamined=value) if value is not None else SimpleNamespace()
    found = body_part_reason([ds], bundle_body_parts({1: "left atrium"}, HEART_CODE))
    assert bool(found) == flagged
    if flagged:
        reason, flag = found[0]
        assert f"BodyPartExamined is {value!r}" in reason and "HEART" in reason and flag == f"body part {value}"
    assert body_part_reason([ds], None) == []  # a bundle of unknown region is never flagged


def test_volumes_against_the_training_labels_by_hand():
    record = {"left atrium": {"min": 40.0, "max": 150.0, "cases": 80}}
    assert volume_reasons({"left atrium": 20.0}, record) == []  # 40 / 2 = 20: the edge is inside
    (reason, flag), = volume_reasons({"left atrium": 19.9}, record)
    assert reason == "left atrium 19.9 mL is outside 20.0-300.0 mL (the training labels' 40.0-150.0 mL, x2 either way)"
    assert flag == "left atrium 19.9 mL"
    assert volume_reasons({"left atrium": 300.1}, record)[0][1] == "left atrium 300.1 mL"
    assert volume_reasons({"left atrium": 0.0}, record) == [("no left atrium found", "no left atrium")]
    assert volume_reasons({"left atrium": 2.1}, None) == []  # no record: only the empty structure is flagged
    assert volume_reasons({"kidney": 0.0}, {"kidney": {"min": 0.0, "max": 9.0}}) == []  # absent in some training


def test_quality_verdict_description_and_the_table_warning(capsys):
    q = Quality()
    assert q.verdict == "ok" and q.description("b", "1") is None
    q.add([("BodyPartExamined is 'HEAD', not ...", "body part HEAD"), ("no left atrium found", "no left atrium")])
    assert q.as_dict()["verdict"] == "warning" and len(q.as_dict()["reasons"]) == 2
    assert q.description("la_seg_finetune", "0.5.0") == "CHECK body part HEAD; no left atrium - la_seg_finetune 0.5.0"
    assert len(q.description("x" * 80, "1")) == 64
    result = {"scan": "/a/brain.nii.gz", "status": "ok", "labels": {"left atrium": {"volume_ml": 2.1}}, "seconds": 1.0,
              "segmentation": "out/brain_seg.nii.gz", "dicom_seg": None, "quality": q.as_dict()}  # fmt: skip
    print_table([result])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3:] == ["warning: brain.nii.gz: BodyPartExamined is 'HEAD', not ...",
                          "warning: brain.nii.gz: no left atrium found", "1 segmented, 0 failed"]  # fmt: skip


def test_training_label_volumes_by_hand(tmp_path):
    import nibabel as nib
    import numpy as np

    from medssl.clinic.quality import training_label_volumes
    from medssl.data import DataError

    files = []
    for i, (n1, n2) in enumerate(((8, 0), (27, 4), (64, 2))):
        data = np.zeros((10, 10, 10), np.uint8)
        data.flat[:n1] = 1
        data.flat[n1 : n1 + n2] = 2
        path = tmp_path / f"l{i}.nii.gz"
        nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.5, 1.0])), path)  # 10 mm^3 voxels = 0.01 mL
        files.append(path)
    record = training_label_volumes(files, {1: "a", 2: "b"})
    assert record == {"a": {"min": 0.08, "median": 0.27, "max": 0.64, "cases": 3},
                      "b": {"min": 0.0, "median": 0.02, "max": 0.04, "cases": 3}}  # fmt: skip
    (tmp_path / "bad.nii.gz").write_bytes(b"not nifti")
    with pytest.raises(DataError, match=r"bad\.nii\.gz: cannot read the label map"):
        training_label_volumes([tmp_path / "bad.nii.gz"], {1: "a"})
