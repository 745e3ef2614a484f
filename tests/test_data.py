"""Datalists, header checks, voxel checks and the infinite sampler."""

import gzip
import itertools
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from medssl.data import (
    DataError,
    InfiniteSampler,
    as_bool,
    atomic_path,
    check_headers,
    eval_list,
    image_list,
    labeled_list,
    load_datalist,
    unlabeled_list,
    write_json,
    write_nifti,
)
from medssl.transforms import CheckVolumed

AFFINE = np.diag([0.625, 0.625, 0.625, 1.0])


def _case(root, name, shape=(20, 20, 16), label=True, affine=AFFINE, label_shape=None, image=None):
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    write_nifti(np.zeros(shape, np.float32) if image is None else image, affine, root / "imagesTr" / f"{name}.nii.gz")
    entry = {"image": f"imagesTr/{name}.nii.gz"}
    if label:
        write_nifti(np.zeros(label_shape or shape, np.uint8), affine, root / "labelsTr" / f"{name}.nii.gz")
        entry["label"] = f"labelsTr/{name}.nii.gz"
    return entry


@pytest.fixture
def dataset(tmp_path):
    entries = [_case(tmp_path, f"c{i}") for i in range(4)]
    write_json({"training": entries[:3], "test": entries[3:]}, tmp_path / "dataset.json")
    return tmp_path


def test_lists(dataset):
    lab = labeled_list(dataset, 2, patch_size=[16, 16, 16])
    assert [e["image"] for e in lab] == [str(dataset / f"imagesTr/c{i}.nii.gz") for i in range(2)]
    assert [e["label"] for e in lab] == [str(dataset / f"labelsTr/c{i}.nii.gz") for i in range(2)]
    assert unlabeled_list(dataset, 2) == [{"image": str(dataset / "imagesTr/c2.nii.gz")}]
    assert unlabeled_list(dataset, 3) == []
    assert len(labeled_list(dataset)) == 3  # None: all training entries
    assert eval_list(dataset, "test")[0]["label"] == str(dataset / "labelsTr/c3.nii.gz")
    assert eval_list(dataset, "validation") == []
    assert image_list(dataset) == [str(dataset / "imagesTr/c3.nii.gz")]
    assert image_list(dataset / "imagesTr") == [str(dataset / f"imagesTr/c{i}.nii.gz") for i in range(4)]
    assert image_list(dataset / "imagesTr" / "c1.nii.gz") == [str(dataset / "imagesTr/c1.nii.gz")]


def test_unlabeled_entries_need_no_label_file(tmp_path):
    entries = [_case(tmp_path, "a"), _case(tmp_path, "b", label=False)]
    write_json({"training": entries}, tmp_path / "dataset.json")
    assert unlabeled_list(tmp_path, 1) == [{"image": str(tmp_path / "imagesTr/b.nii.gz")}]
    with pytest.raises(DataError, match=r"training\[1\] has no 'label'"):
        labeled_list(tmp_path, 2)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "dataset.json: file not found"),
        ("{not json", "dataset.json: not valid JSON"),
        ("[1, 2]", "expected a JSON object with a 'training' list, got list"),
        ('{"training": []}', "key 'training' must be a non-empty list"),
        ('{"training": [{"label": "x"}]}', r"training\[0\] must be an object with an 'image' path"),
        ('{"training": [{"image": "x.nii.gz"}], "test": {}}', "key 'test' must be a list, got dict"),
    ],
)
def test_bad_datalist(tmp_path, content, message):
    if content is not None:
        (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(DataError, match=message):
        load_datalist(tmp_path)


def test_missing_folder_and_files(tmp_path, dataset):
    with pytest.raises(DataError, match="is not a folder"):
        load_datalist(tmp_path / "nope")
    (dataset / "labelsTr" / "c1.nii.gz").unlink()
    with pytest.raises(DataError, match=r"labelsTr/c1.nii.gz: file not found \(.*training\[1\]\['label'\]\)"):
        labeled_list(dataset, 2)
    for n in (0, 4, -1):
        with pytest.raises(DataError, match=f"num_labeled={n} is out of range: .* has 3 entries"):
            labeled_list(dataset, n)
    with pytest.raises(DataError, match="no entries; expected a non-empty 'validation' list"):
        eval_list(dataset, "validation", required=True)


def test_header_checks(tmp_path):
    ok = _case(tmp_path, "ok")
    check_headers(tmp_path / ok["image"], tmp_path / ok["label"], min_shape=[20, 20, 16])
    with pytest.raises(
        DataError,
        match=r"volume shape \(20, 20, 16\) is smaller than patch_size \[32, 16, 16\] "
        r"along axes \[0\]; use a smaller --patch_size, or --pad_small_volumes",
    ):
        check_headers(tmp_path / ok["image"], min_shape=[32, 16, 16])
    bad = _case(tmp_path, "shape", label_shape=(20, 20, 15))
    with pytest.raises(
        DataError,
        match=r"labelsTr/shape.nii.gz: label shape \(20, 20, 15\) differs from image " r"shape \(20, 20, 16\)",
    ):
        check_headers(tmp_path / bad["image"], tmp_path / bad["label"])
    img4d = _case(tmp_path, "img4d", shape=(20, 20, 16, 2), label=False)
    with pytest.raises(DataError, match=r"img4d.nii.gz: expected a 3D volume \(H, W, D\), got shape \(20, 20, 16, 2\)"):
        check_headers(tmp_path / img4d["image"])
    img2d = _case(tmp_path, "img2d", shape=(20, 20), label=False)
    with pytest.raises(DataError, match=r"expected a 3D volume \(H, W, D\), got shape \(20, 20\)"):
        check_headers(tmp_path / img2d["image"])
    check_headers(tmp_path / _case(tmp_path, "one_channel", shape=(20, 20, 16, 1), label=False)["image"])
    write_nifti(np.zeros((20, 20, 16), np.uint8), np.diag([1.0, 1, 1, 1]), tmp_path / "labelsTr" / "ok.nii.gz")
    with pytest.raises(DataError, match="label affine differs from the image's"):
        check_headers(tmp_path / ok["image"], tmp_path / ok["label"])
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    with pytest.raises(DataError, match="junk.nii.gz: not a readable NIfTI volume"):
        check_headers(junk)


def test_check_volumed_voxels(tmp_path):
    img = torch.zeros(1, 8, 8, 8)
    lab = torch.zeros(1, 8, 8, 8)
    check = CheckVolumed(keys="image", label_keys="label", classes=[0, 1])
    assert check({"image": img, "label": lab})["image"] is img
    check({"image": img})  # an unlabeled entry passes
    img[0, 1, 2, 3] = float("nan")
    with pytest.raises(DataError, match="<image>: 1 NaN/Inf voxels"):
        check({"image": img, "label": lab})
    img[0, 1, 2, 3] = 0
    lab[0, 0, 0, 0] = 2
    lab[0, 0, 0, 1] = 0.5
    with pytest.raises(DataError, match=r"label values \[0.5, 2.0\] outside the expected classes \[0, 1\]"):
        check({"image": img, "label": lab})


def test_check_volumed_names_the_file_after_loadimage(tmp_path):
    from monai.transforms import Compose, LoadImaged

    image = np.zeros((8, 8, 8), np.float32)
    image[1, 1, 1] = np.inf
    write_nifti(image, AFFINE, tmp_path / "inf.nii.gz")
    pipeline = Compose([LoadImaged("image", ensure_channel_first=True), CheckVolumed("image")])
    with pytest.raises(Exception) as info:
        pipeline({"image": str(tmp_path / "inf.nii.gz")})
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any(f"{tmp_path / 'inf.nii.gz'}: 1 NaN/Inf voxels" in m for m in chain)


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    target = tmp_path / "a.json"
    write_json({"v": 1}, target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    assert oct(target.stat().st_mode & 0o777) != "0o600"  # not mkstemp's private mode


def test_write_nifti_round_trip(tmp_path):
    arr = np.random.default_rng(0).standard_normal((5, 6, 7)).astype(np.float32)
    write_nifti(arr, AFFINE, tmp_path / "x.nii.gz")
    img = nib.load(tmp_path / "x.nii.gz")
    np.testing.assert_array_equal(np.asarray(img.dataobj), arr)
    np.testing.assert_array_equal(img.affine, AFFINE)


def test_infinite_sampler():
    s = InfiniteSampler(5, seed=3)
    first = list(itertools.islice(iter(s), 15))
    assert first == list(itertools.islice(iter(InfiniteSampler(5, seed=3)), 15))  # seeded
    for k in range(3):
        assert sorted(first[5 * k : 5 * k + 5]) == list(range(5))  # each pass is a permutation
    assert first[:5] != first[5:10]
    r0 = list(itertools.islice(iter(InfiniteSampler(5, seed=3, num_replicas=2, rank=0)), 6))
    r1 = list(itertools.islice(iter(InfiniteSampler(5, seed=3, num_replicas=2, rank=1)), 6))
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(3)).tolist()
    padded = perm + perm[:1]
    assert r0[:3] == padded[0::2] and r1[:3] == padded[1::2]  # ranks split one permutation, in step
    assert list(itertools.islice(iter(InfiniteSampler(3, shuffle=False)), 7)) == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="non-empty"):
        InfiniteSampler(0)
    with pytest.raises(ValueError, match="rank must be in"):
        InfiniteSampler(4, num_replicas=2, rank=2)


def test_as_bool_reads_command_line_strings():
    assert [as_bool(v) for v in (True, "true", "True", "YES", "1", 1)] == [True] * 6
    assert [as_bool(v) for v in (False, "false", "no", "0", 0, None)] == [False] * 6
    with pytest.raises(ValueError, match="resume must be true or false, got 'maybe'"):
        as_bool("maybe", "resume")


def test_infinite_sampler_set_start_continues_the_stream():
    full = list(itertools.islice(iter(InfiniteSampler(5, seed=2, num_replicas=2, rank=1)), 20))
    for start in (0, 2, 3, 7):
        s = InfiniteSampler(5, seed=2, num_replicas=2, rank=1)
        s.set_start(start)
        assert list(itertools.islice(iter(s), 20 - start)) == full[start:]
    with pytest.raises(ValueError, match="position must be >= 0"):
        InfiniteSampler(5).set_start(-1)


def test_dev_split_downsample_keeps_every_class(tmp_path):
    """--downsample 2 takes each 2x2x2 block's most frequent label (it binarised multi-class maps before): three
    classes survive, a tie goes to the higher value (a binary half-foreground block stays foreground, as before)."""
    from medssl.data import _block_mode, write_dev_split, write_nifti

    blocks = np.zeros((4, 2, 2), np.uint8)
    blocks[0:2] = 3  # block 0: all 3
    blocks[2:4, 0, :] = 2  # block 1: four 2s, four 0s -> tie -> 2
    blocks[3, 1, 1] = 1  # block 1 now: four 2s, three 0s, one 1 -> 2
    np.testing.assert_array_equal(_block_mode(blocks, 2)[:, 0, 0], [3, 2])
    binary = np.zeros((2, 2, 2), np.uint8)
    binary[0] = 1  # half foreground: foreground, as mean >= 0.5 gave
    assert _block_mode(binary, 2).item() == 1
    rng = np.random.default_rng(0)
    label = np.repeat(np.repeat(np.repeat(rng.integers(0, 4, (4, 4, 3)), 2, 0), 2, 1), 2, 2).astype(np.uint8)
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / "d" / sub).mkdir(parents=True)
    entries = []
    for i in range(3):
        write_nifti(rng.random(label.shape).astype(np.float32), np.eye(4), tmp_path / "d" / "imagesTr" / f"c{i}.nii.gz")
        write_nifti(label, np.eye(4), tmp_path / "d" / "labelsTr" / f"c{i}.nii.gz", dtype=np.uint8)
        entries.append({"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"})
    (tmp_path / "d" / "dataset.json").write_text(json.dumps({"training": entries}))
    out = write_dev_split(tmp_path / "d", tmp_path / "split", num_train=2, downsample=2)
    small = nib.load(out / "labelsTr" / "c0.nii.gz")
    np.testing.assert_array_equal(np.asarray(small.dataobj), label[::2, ::2, ::2])
    assert small.get_data_dtype() == np.uint8 and small.header.get_zooms() == (2.0, 2.0, 2.0)
