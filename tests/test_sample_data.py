"""sample_data: a deterministic synthetic LA-like set in the prepare_la layout."""

import json
import time

import nibabel as nib
import numpy as np
import pytest
from medssl.data import eval_list, labeled_list
from medssl.lab.sample_data import parse_shape, sample_data, synthesize_case
from scipy import ndimage

SHAPE = (48, 40, 32)


@pytest.fixture(scope="module")
def small_set(module_tmp):
    return sample_data(module_tmp("sample") / "ds", num_cases=4, shape=SHAPE, seed=3, num_test=1)


def _arrays(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_layout_and_datalist(small_set):
    datalist = json.loads((small_set / "dataset.json").read_text())
    ids = [f"sample_{i:03d}" for i in range(4)]
    assert datalist["training"] == [{"image": f"imagesTr/{i}.nii.gz", "label": f"labelsTr/{i}.nii.gz"} for i in ids[:3]]
    assert datalist["test"] == [{"image": "imagesTr/sample_003.nii.gz", "label": "labelsTr/sample_003.nii.gz"}]
    assert datalist["numTraining"] == 3 and datalist["numTest"] == 1 and "validation" not in datalist
    assert datalist["labels"] == {"0": "background", "1": "left atrium"} and datalist["tensorImageSize"] == "3D"
    assert datalist["synthetic"] == {"seed": 3, "shape": list(SHAPE), "num_cases": 4, "tubes": True}
    assert len(labeled_list(small_set, patch_size=(32, 32, 32))) == 3 and len(eval_list(small_set)) == 1
    assert not list(small_set.rglob("*.tmp*"))


def test_volumes(small_set):
    for i in range(4):
        image_nii = nib.load(str(small_set / "imagesTr" / f"sample_{i:03d}.nii.gz"))
        label_nii = nib.load(str(small_set / "labelsTr" / f"sample_{i:03d}.nii.gz"))
        image, label = np.asanyarray(image_nii.dataobj), np.asanyarray(label_nii.dataobj)
        assert image.shape == label.shape == SHAPE
        assert image.dtype == np.float32 and label.dtype == np.uint8
        np.testing.assert_array_equal(image_nii.affine, np.diag([0.625, 0.625, 0.625, 1.0]))
        np.testing.assert_array_equal(label_nii.affine, image_nii.affine)
        assert set(np.unique(label).tolist()) == {0, 1}
        assert 0.03 <= label.mean() <= 0.25
        assert np.isfinite(image).all()
        assert abs(float(image.mean())) < 1e-3 and abs(float(image.std()) - 1) < 1e-3
        # bright blood pool, darker surroundings
        assert image[label == 1].mean() > image[label == 0].mean() + 1.5
        # one connected foreground (atrium and veins)
        assert ndimage.label(label)[1] == 1


def test_determinism(small_set, tmp_path):
    again = sample_data(tmp_path / "again", num_cases=4, shape=list(SHAPE), seed=3, num_test=1)
    for sub in ("imagesTr", "labelsTr"):
        for i in range(4):
            a, b = _arrays(small_set / sub / f"sample_{i:03d}.nii.gz"), _arrays(again / sub / f"sample_{i:03d}.nii.gz")
            assert a.tobytes() == b.tobytes()
    image0, label0 = synthesize_case(SHAPE, seed=3, index=0)
    assert image0.tobytes() == _arrays(small_set / "imagesTr" / "sample_000.nii.gz").tobytes()
    image1, label1 = synthesize_case(SHAPE, seed=3, index=1)
    image_other_seed, _ = synthesize_case(SHAPE, seed=4, index=0)
    assert not np.array_equal(image0, image1) and not np.array_equal(label0, label1)
    assert not np.array_equal(image0, image_other_seed)


def test_tubes():
    for index in range(3):
        _, with_tubes = synthesize_case(SHAPE, seed=0, index=index)
        _, atrium = synthesize_case(SHAPE, seed=0, index=index, tubes=False)
        assert np.all(with_tubes >= atrium)  # the atrium is the same, the tubes are added
        extra = int(with_tubes.sum() - atrium.sum())
        assert extra > 0.02 * atrium.sum()
        # the tubes reach well away from the atrium
        far = ndimage.distance_transform_edt(atrium == 0) > 3
        assert (with_tubes.astype(bool) & far).sum() > 0


def test_default_set_is_fast(tmp_path):
    start = time.perf_counter()
    out = sample_data(tmp_path / "default")
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"default sample_data took {elapsed:.1f} s"
    datalist = json.loads((out / "dataset.json").read_text())
    assert len(datalist["training"]) == 4 and len(datalist["test"]) == 2
    label = _arrays(out / "labelsTr" / "sample_000.nii.gz")
    assert label.shape == (96, 96, 64)
    for i in range(6):
        assert 0.03 <= _arrays(out / "labelsTr" / f"sample_{i:03d}.nii.gz").mean() <= 0.25


@pytest.mark.parametrize("shape", ["96,96,64", "(96, 96, 64)", [96, 96, 64], (96, 96, 64), "96x96x64"])
def test_parse_shape(shape):
    assert parse_shape(shape) == (96, 96, 64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shape": (96, 96)}, "3 integers"),
        ({"shape": "96,96,sixty"}, "3 integers"),
        ({"shape": (96, 96, 15)}, ">= 16"),
        ({"shape": (96, 96, 64.0)}, "3 integers"),
        ({"num_cases": 2, "num_test": 2}, "num_cases > num_test >= 0"),
        ({"num_cases": 3, "num_test": -1}, "num_cases > num_test >= 0"),
        ({"num_cases": 2.5}, "num_cases must be an integer"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_data(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()
