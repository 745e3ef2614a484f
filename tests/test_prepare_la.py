"""prepare_la: the UA-MT h5 release (real samples) and the challenge nrrd layout (synthetic case)."""

import json
import logging
import zlib

import h5py
import nibabel as nib
import nrrd
import numpy as np
import pytest
from medssl.data import DataError, labeled_list
from medssl.lab.prepare_la import (
    TRAINING_SET_DIR,
    UAMT_TEST_IDS,
    UAMT_TRAIN_IDS,
    convert_nrrd_case,
    prepare_la,
    read_split,
    uamt_crop_box,
)

H5_IDS = ["06SR5RBREL16DQ6M8LWS", "0RZDK210BSMWAA6467LU"]  # the two cases of la_h5_samples, train.list order
AFFINE = np.diag([0.625, 0.625, 0.625, 1.0])


def _load(path):
    img = nib.load(str(path))
    return img, np.asanyarray(img.dataobj)


# -- the split constants -----------------------------------------------------------------------------------


def test_train_ids_match_public_list(la_dir):
    listed = [s.strip() for s in (la_dir / "train.list").read_text().splitlines() if s.strip()]
    assert list(UAMT_TRAIN_IDS) == listed
    assert len(UAMT_TRAIN_IDS) == 80 and len(set(UAMT_TRAIN_IDS)) == 80


def test_test_ids():
    assert len(UAMT_TEST_IDS) == 20 and len(set(UAMT_TEST_IDS)) == 20
    assert not set(UAMT_TEST_IDS) & set(UAMT_TRAIN_IDS)
    assert UAMT_TEST_IDS[0] == "UPT6DX9IQY9JAZ7HJKA7" and UAMT_TEST_IDS[-1] == "ZQPMJ4XEC5A4BISD45P1"
    assert all(len(i) == 20 for i in UAMT_TRAIN_IDS + UAMT_TEST_IDS)


# -- UA-MT h5 layout ---------------------------------------------------------------------------------------


def test_h5_release(la_h5_dir, tmp_path, caplog):
    out = tmp_path / "la"
    with caplog.at_level(logging.INFO, logger="medssl.lab.prepare_la"):
        assert prepare_la(la_h5_dir, out) == out
    assert "78 of 80 train IDs" in caplog.text and "20 of 20 test IDs" in caplog.text
    assert "2 converted, 0 already complete" in caplog.text

    shapes, refs = {}, {}
    for case_id in H5_IDS:
        with h5py.File(la_h5_dir / TRAINING_SET_DIR / case_id / "mri_norm2.h5", "r") as f:
            ref_image, ref_label = f["image"][()], f["label"][()]
        refs[case_id] = ref_label
        img, image = _load(out / "imagesTr" / f"{case_id}.nii.gz")
        lbl, label = _load(out / "labelsTr" / f"{case_id}.nii.gz")
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image.shape == label.shape == ref_image.shape
        np.testing.assert_allclose(image, ref_image, rtol=0, atol=1e-4)
        assert np.array_equal(image, ref_image)  # stored float32 as is: bit-exact
        assert np.array_equal(label, ref_label)
        np.testing.assert_array_equal(img.affine, AFFINE)
        np.testing.assert_array_equal(lbl.affine, AFFINE)
        shapes[case_id] = image.shape
    assert shapes == {H5_IDS[0]: (183, 140, 88), H5_IDS[1]: (199, 143, 88)}

    datalist = json.loads((out / "dataset.json").read_text())
    assert datalist["training"] == [{"image": f"imagesTr/{i}.nii.gz", "label": f"labelsTr/{i}.nii.gz"} for i in H5_IDS]
    assert datalist["test"] == [] and datalist["numTraining"] == 2 and datalist["numTest"] == 0
    assert datalist["tensorImageSize"] == "3D" and datalist["modality"] == {"0": "LGE-MRI"}
    assert datalist["labels"] == {"0": "background", "1": "left atrium"}
    assert len(labeled_list(out)) == 2  # readable by the bundles' datalist reader

    # re-run: nothing rewritten
    files = sorted(out.rglob("*.nii.gz")) + [out / "dataset.json"]
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in files}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medssl.lab.prepare_la"):
        prepare_la(la_h5_dir, out)
    assert "0 converted, 2 already complete" in caplog.text
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in files} == before
    assert not list(out.rglob("*.tmp*"))

    # overwrite: case files replaced (new inodes), same content
    prepare_la(la_h5_dir / TRAINING_SET_DIR, out, overwrite=True)  # src = the release folder itself
    for p in files[:-1]:
        assert p.stat().st_ino != before[p][1]
    assert np.array_equal(_load(out / "labelsTr" / f"{H5_IDS[0]}.nii.gz")[1], refs[H5_IDS[0]])


def _write_h5(path, image=None, label=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        if image is not None:
            f.create_dataset("image", data=image)
        if label is not None:
            f.create_dataset("label", data=label)


def test_split_lists_and_unlisted_cases(tmp_path, caplog):
    src = tmp_path / "src"
    image, label = np.zeros((8, 8, 4), np.float32), np.zeros((8, 8, 4), np.uint8)
    for case_id in ["AAA", "BBB", "CCC", "DDD"]:
        _write_h5(src / TRAINING_SET_DIR / case_id / "mri_norm2.h5", image, label)
    (src / "train.list").write_text("CCC\nAAA\nZZZ\n")
    (src / "test.list").write_text("BBB\n")
    assert read_split(src, src / TRAINING_SET_DIR)[:2] == (["CCC", "AAA", "ZZZ"], ["BBB"])
    with caplog.at_level(logging.WARNING, logger="medssl.lab.prepare_la"):
        prepare_la(src, tmp_path / "out")
    assert "1 of 3 train IDs" in caplog.text and "1 cases in src are in no list" in caplog.text
    datalist = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert [e["image"] for e in datalist["training"]] == [f"imagesTr/{i}.nii.gz" for i in ["CCC", "AAA", "DDD"]]
    assert [e["label"] for e in datalist["test"]] == ["labelsTr/BBB.nii.gz"]

    # lists in the UA-MT layout (src/data/...), naming none of the cases: all cases sorted, as training
    repo = tmp_path / "uamt"
    for case_id in ["QQQ", "PPP"]:
        _write_h5(repo / "data" / TRAINING_SET_DIR / case_id / "mri_norm2.h5", image, label)
    (repo / "data" / "train.list").write_text("XXX\n")
    prepare_la(repo, tmp_path / "out2")
    datalist = json.loads((tmp_path / "out2" / "dataset.json").read_text())
    assert [e["image"] for e in datalist["training"]] == ["imagesTr/PPP.nii.gz", "imagesTr/QQQ.nii.gz"]
    assert datalist["test"] == []


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="missing_src"):
        prepare_la(tmp_path / "missing_src", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no LA cases found"):
        prepare_la(tmp_path / "empty", tmp_path / "out")

    bad = tmp_path / "nolabel" / TRAINING_SET_DIR / "CASE1" / "mri_norm2.h5"
    _write_h5(bad, image=np.zeros((8, 8, 4), np.float32))
    with pytest.raises(DataError, match=r"CASE1/mri_norm2\.h5: no 'label' dataset"):
        prepare_la(tmp_path / "nolabel", tmp_path / "out")

    bad = tmp_path / "mismatch" / "CASE2" / "mri_norm2.h5"
    _write_h5(bad, np.zeros((8, 8, 4), np.float32), np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(DataError, match=r"CASE2/mri_norm2\.h5: label shape \(8, 8, 5\) differs"):
        prepare_la(tmp_path / "mismatch", tmp_path / "out")

    bad = tmp_path / "corrupt" / "CASE3" / "mri_norm2.h5"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not hdf5")
    with pytest.raises(DataError, match=r"CASE3/mri_norm2\.h5: not a readable HDF5"):
        prepare_la(tmp_path / "corrupt", tmp_path / "out")
    assert not (tmp_path / "out" / "dataset.json").exists()


# -- challenge nrrd layout ---------------------------------------------------------------------------------

BOX = (slice(60, 160), slice(50, 130), slice(3, 9))  # label x 60..159 (px 6), y 50..129 (py 16), z 3..8


def _challenge_case(folder, seed=0, spacing=(0.625, 0.625, 0.625), box=BOX, shape=(200, 170, 12)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, shape).astype(np.uint8)
    image[box] += 150  # a bright atrium, so the crop's mean is well above the volume's
    laendo = np.zeros(shape, np.uint8)
    laendo[box] = 255
    laendo[0, 0, 0] = 1  # not 255: background
    header = {"space": "left-posterior-superior", "space directions": np.diag(spacing)}
    nrrd.write(str(folder / "lgemri.nrrd"), image, header)
    nrrd.write(str(folder / "laendo.nrrd"), laendo, header)
    return image, laendo


def test_nrrd_crop_and_normalisation(tmp_path):
    src = tmp_path / "challenge"
    raw, laendo = _challenge_case(src / TRAINING_SET_DIR / "CASEA")
    out = prepare_la(src, tmp_path / "out")
    img, image = _load(out / "imagesTr" / "CASEA.nii.gz")
    lbl, label = _load(out / "labelsTr" / "CASEA.nii.gz")
    assert image.dtype == np.float32 and label.dtype == np.uint8
    np.testing.assert_array_equal(img.affine, AFFINE)

    # crop start from the label's position in the output; margins in [10, 20) on all four sides, z whole
    fg = np.nonzero(label)
    x0, y0 = 60 - fg[0].min(), 50 - fg[1].min()
    sx, sy, sz = image.shape
    assert sz == 12
    assert 10 <= 60 - 6 - x0 < 20 and 10 <= (x0 + sx) - 159 - 6 < 20
    assert 10 <= 50 - 16 - y0 < 20 and 10 <= (y0 + sy) - 129 - 16 < 20

    # z-score over the whole volume, before the crop (float64, then float32)
    zscored = ((raw - raw.astype(np.float64).mean()) / raw.astype(np.float64).std()).astype(np.float32)
    assert np.array_equal(image, zscored[x0 : x0 + sx, y0 : y0 + sy])
    assert np.array_equal(label, (laendo == 255)[x0 : x0 + sx, y0 : y0 + sy])
    assert image.mean() > 0.1  # not re-normalised after cropping

    # the margins are the documented generator's
    rng = np.random.default_rng([0, zlib.crc32(b"CASEA")])
    assert uamt_crop_box(laendo == 255, rng) == ((x0, x0 + sx), (y0, y0 + sy))

    # same seed -> same crop; another seed -> another crop
    out2 = prepare_la(src, tmp_path / "out2", seed=0)
    assert np.array_equal(_load(out2 / "imagesTr" / "CASEA.nii.gz")[1], image)
    other = convert_nrrd_case(src / TRAINING_SET_DIR / "CASEA", seed=1)[0]
    assert other.shape != image.shape
    assert json.loads((out / "dataset.json").read_text())["crop_seed"] == 0


def test_nrrd_clipping_and_spacing(tmp_path):
    # label touching the borders: the crop is clipped to the volume; spacing from 'space directions'
    box = (slice(0, 150), slice(100, 170), slice(0, 12))
    _challenge_case(tmp_path / "CASEB", spacing=(0.7, 0.7, 1.25), box=box)
    image, label, spacing = convert_nrrd_case(tmp_path / "CASEB")
    assert spacing == pytest.approx((0.7, 0.7, 1.25))
    fg = np.nonzero(label)
    # x: range 149 >= 112, so no padding; start clipped at 0, end 149 + m in [159, 169)
    assert fg[0].min() == 0 and 159 <= image.shape[0] < 169
    # y: py = (112 - 69) // 2 = 21; start 100 - m - 21, end clipped at 170
    assert fg[1].max() == label.shape[1] - 1 and 10 + 21 <= fg[1].min() < 20 + 21
    assert image.shape[2] == 12
    prepare_la(tmp_path, tmp_path / "out")
    np.testing.assert_allclose(
        nib.load(str(tmp_path / "out" / "imagesTr" / "CASEB.nii.gz")).affine, np.diag([0.7, 0.7, 1.25, 1.0]), atol=1e-6
    )


def test_nrrd_bad_inputs(tmp_path):
    _challenge_case(tmp_path / "empty" / "CASEC", box=(slice(0, 0),) * 3)
    with pytest.raises(DataError, match=r"CASEC/laendo\.nrrd: empty label"):
        prepare_la(tmp_path / "empty", tmp_path / "out")
    _challenge_case(tmp_path / "nolabel" / "CASED")
    (tmp_path / "nolabel" / "CASED" / "laendo.nrrd").unlink()
    with pytest.raises(DataError, match=r"CASED/laendo\.nrrd: file not found"):
        prepare_la(tmp_path / "nolabel", tmp_path / "out")
    (tmp_path / "broken" / "CASEE").mkdir(parents=True)
    (tmp_path / "broken" / "CASEE" / "lgemri.nrrd").write_bytes(b"garbage")
    (tmp_path / "broken" / "CASEE" / "laendo.nrrd").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"CASEE/lgemri\.nrrd: not a readable NRRD"):
        prepare_la(tmp_path / "broken", tmp_path / "out")
