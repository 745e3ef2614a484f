"""PCRL data transforms (crops, local pixel shuffling, painting, spatial code) pinned on tiny arrays.

Volumes are ``np.arange`` ramps, so a value names the voxel it came from.
"""

import time

import numpy as np
import pytest
import torch
from monai.transforms import Compose, CopyItemsd, RandFlipd

from medssl.transforms import (
    RandLocalPixelShuffled,
    RandOverlappingCropsd,
    RandPaintingd,
    RandSpatialCoded,
    apply_spatial_code,
    box_iou,
)


def _ramp(shape, channels=1):
    return np.arange(channels * int(np.prod(shape)), dtype=np.float32).reshape(channels, *shape)


def _mask(shape, boxes):
    m = np.zeros(shape, bool)
    for b in boxes:
        m[tuple(slice(int(s), int(e)) for s, e in b)] = True
    return m


def _iou_by_masks(shape, b1, b2):
    """IoU counted voxel by voxel (independent of box_iou's arithmetic)."""
    m1, m2 = _mask(shape, [b1]), _mask(shape, [b2])
    return (m1 & m2).sum() / (m1 | m2).sum()


def _slice(box):
    return (slice(None),) + tuple(slice(int(s), int(e)) for s, e in box)


# ---------------------------------------------------------------------------------------------------------- crops


def test_box_iou_hand_computed():
    cube = [[0, 2], [0, 2], [0, 2]]
    assert box_iou(cube, [[1, 3], [1, 3], [1, 3]]) == pytest.approx(1 / 15)  # 1 / (8 + 8 - 1)
    assert box_iou([[0, 4], [0, 4], [0, 2]], [[2, 6], [0, 4], [0, 2]]) == pytest.approx(1 / 3)  # 16 / (32 + 32 - 16)
    assert box_iou([[0, 4]] * 3, [[1, 3]] * 3) == pytest.approx(8 / 64)  # contained
    assert box_iou(cube, [[2, 4], [0, 2], [0, 2]]) == 0.0  # touching faces
    assert box_iou(cube, cube) == 1.0
    assert box_iou(np.array(cube), torch.tensor(cube)) == 1.0
    with pytest.raises(ValueError, match="box2"):
        box_iou(cube, [[0, 2], [0, 2]])
    with pytest.raises(ValueError, match="end < start"):
        box_iou([[2, 0], [0, 2], [0, 2]], cube)


def test_crops_boxes_iou_shapes_and_raw_slices():
    shape = (40, 36, 20)
    vol = _ramp(shape)
    sizes = ((16, 16, 8), (24, 24, 12), (8, 8, 4))
    t = RandOverlappingCropsd("image", crop_sizes=sizes, spatial_size=(16, 16, 8)).set_random_state(0)
    raw = 0
    for _ in range(20):
        d = t({"image": vol})
        b1, b2 = d["view1_box"], d["view2_box"]
        for view, box in (("view1", b1), ("view2", b2)):
            assert box.shape == (3, 2) and box.dtype == np.int64
            assert (box[:, 0] >= 0).all() and (box[:, 1] <= shape).all()
            assert tuple(box[:, 1] - box[:, 0]) in sizes
            assert d[view].shape == (1, 16, 16, 8) and d[view].dtype == np.float32
            if tuple(box[:, 1] - box[:, 0]) == (16, 16, 8):  # no resize: exactly the raw slice
                np.testing.assert_array_equal(d[view], vol[_slice(box)])
                raw += 1
        assert _iou_by_masks(shape, b1, b2) > 0.25
        assert box_iou(b1, b2) == pytest.approx(_iou_by_masks(shape, b1, b2))
        np.testing.assert_array_equal(d["image"], vol)  # the source is kept
    assert raw > 0


def test_crop_resize_is_trilinear_on_a_linear_ramp():
    """Trilinear (align_corners=False) is exact on a linear function: a 2x downsample samples at 2i + 0.5."""
    vol = _ramp((32, 32, 16))  # value = (x * 32 + y) * 16 + z
    t = RandOverlappingCropsd("image", crop_sizes=((32, 32, 16),), spatial_size=(16, 16, 8)).set_random_state(1)
    d = t({"image": vol})
    np.testing.assert_array_equal(d["view1_box"], [[0, 32], [0, 32], [0, 16]])
    i = np.arange(16) * 2 + 0.5
    k = np.arange(8) * 2 + 0.5
    expected = (i[:, None, None] * 32 + i[None, :, None]) * 16 + k[None, None, :]
    np.testing.assert_allclose(d["view1"][0], expected, rtol=1e-6)


def test_crops_deterministic_and_torch():
    vol = _ramp((30, 30, 16))
    kw = dict(crop_sizes=((8, 8, 4), (12, 12, 6), (20, 20, 10)), spatial_size=(8, 8, 4))
    a = RandOverlappingCropsd("image", **kw).set_random_state(7)({"image": vol})
    b = RandOverlappingCropsd("image", **kw).set_random_state(7)({"image": vol})
    c = RandOverlappingCropsd("image", **kw).set_random_state(7)({"image": torch.as_tensor(vol)})
    for key in ("view1", "view2", "view1_box", "view2_box"):
        np.testing.assert_array_equal(a[key], b[key])
    for key in ("view1", "view2"):
        assert isinstance(c[key], torch.Tensor) and c[key].dtype == torch.float32
        np.testing.assert_allclose(c[key].numpy(), a[key], rtol=1e-6)
        np.testing.assert_array_equal(c[f"{key}_box"], a[f"{key}_box"])
    t = RandOverlappingCropsd("image", **kw).set_random_state(8)
    others = [t({"image": vol})["view1_box"] for _ in range(3)]
    assert any(not np.array_equal(o, a["view1_box"]) for o in others)


def test_crops_clamped_to_the_volume_and_custom_keys():
    vol = _ramp((10, 12, 6))
    t = RandOverlappingCropsd(
        "img", crop_sizes=((64, 64, 32),), spatial_size=(10, 12, 6), view_keys=("a", "b"), box_key_suffix="_roi"
    ).set_random_state(0)
    d = t({"img": vol})
    for view in ("a", "b"):
        np.testing.assert_array_equal(d[f"{view}_roi"], [[0, 10], [0, 12], [0, 6]])
        np.testing.assert_array_equal(d[view], vol)
    assert t.iou == 1.0


def test_crops_fallback_keeps_the_best_pair():
    vol = _ramp((40, 40, 40))
    t = RandOverlappingCropsd("image", crop_sizes=((4, 4, 4),), spatial_size=(4, 4, 4), min_iou=0.99, max_tries=5)
    d = t.set_random_state(0)({"image": vol})  # IoU > 0.99 means identical boxes: (almost) never in 5 tries
    assert t.iou == pytest.approx(box_iou(d["view1_box"], d["view2_box"]))
    # replay the draws (two size indices, then the two starts per axis): the kept pair has the highest IoU of the 5
    r = np.random.RandomState(0)
    ious = []
    for _ in range(5):
        r.randint(1), r.randint(1)
        starts = [np.array([r.randint(0, 37) for _ in range(3)]) for _ in range(2)]
        ious.append(box_iou(*[np.stack([s, s + 4], 1) for s in starts]))
    assert t.iou == pytest.approx(max(ious)) and t.iou < 0.99


def test_crops_bad_input():
    with pytest.raises(ValueError, match="exactly one key"):
        RandOverlappingCropsd(("image", "label"))
    with pytest.raises(ValueError, match="view_keys"):
        RandOverlappingCropsd("image", view_keys=("v", "v"))
    with pytest.raises(ValueError, match="crop size"):
        RandOverlappingCropsd("image", crop_sizes=((4, 4),))
    t = RandOverlappingCropsd("image")
    with pytest.raises(ValueError, match="'image'"):
        t({"img": _ramp((4, 4, 4))})
    with pytest.raises(ValueError, match=r"\[C, X, Y, Z\]"):
        t({"image": np.zeros((4, 4, 4))})


# --------------------------------------------------------------------------------------------- local pixel shuffle


def test_shuffle_prob_zero_is_identity():
    vol = _ramp((8, 8, 8))
    out = RandLocalPixelShuffled("image", prob=0.0).set_random_state(0)({"image": vol})["image"]
    np.testing.assert_array_equal(out, vol)
    assert out.dtype == np.float32


def test_shuffle_one_block_permutes_inside_it_only():
    vol = _ramp((8, 8, 8))
    t = RandLocalPixelShuffled("image", prob=1.0, num_blocks=1, max_block_fraction=0.5).set_random_state(0)
    out = t({"image": vol})["image"]
    (start,), (size,) = t.starts, t.sizes
    assert (size >= 1).all() and (size <= 4).all() and (start + size <= 8).all()
    inside = _mask((8, 8, 8), [np.stack([start, start + size], 1)])[None]
    np.testing.assert_array_equal(np.sort(out, axis=None), np.sort(vol, axis=None))  # a permutation
    np.testing.assert_array_equal(out[~inside], vol[~inside])
    np.testing.assert_array_equal(np.sort(out[inside]), np.sort(vol[inside]))
    assert (out != vol).any()


def test_shuffle_many_blocks_last_block_wins():
    """Each voxel holds a value of the ORIGINAL image from the last block covering it; outside all blocks, itself."""
    shape = (20, 20, 10)
    vol = _ramp(shape, channels=2)
    t = RandLocalPixelShuffled("image", prob=1.0, num_blocks=60, max_block_fraction=0.2).set_random_state(3)
    out = t({"image": vol})["image"]
    assert (t.sizes.max(0) <= (4, 4, 2)).all()
    last = np.full(shape, -1)
    for i, (s, n) in enumerate(zip(t.starts, t.sizes)):
        last[s[0] : s[0] + n[0], s[1] : s[1] + n[1], s[2] : s[2] + n[2]] = i
    np.testing.assert_array_equal(out[:, last < 0], vol[:, last < 0])
    np.testing.assert_array_equal(out[1], out[0] + vol[0].size)  # one permutation moves both channels
    src = np.stack(np.unravel_index(out[0].astype(int), shape), -1)  # where each value came from
    for idx in zip(*np.nonzero(last >= 0)):
        s, n = t.starts[last[idx]], t.sizes[last[idx]]
        assert ((src[idx] >= s) & (src[idx] < s + n)).all(), idx
    assert (out != vol).mean() > 0.05


def test_shuffle_official_size_is_fast_and_torch_matches_numpy():
    x = np.random.RandomState(0).randn(1, 64, 64, 32).astype(np.float32)
    t = RandLocalPixelShuffled("image", prob=1.0, num_blocks=10000)
    times = []
    for _ in range(3):
        t.set_random_state(5)
        t0 = time.perf_counter()
        out = t({"image": x})["image"]
        times.append(time.perf_counter() - t0)
    assert min(times) < 0.5, times
    assert (t.sizes.max(0) <= (6, 6, 3)).all() and (t.sizes.min(0) >= 1).all()
    assert np.isin(out, x).all() and 0.5 < (out != x).mean() < 0.95
    out_t = t.set_random_state(5)({"image": torch.as_tensor(x)})["image"]
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    np.testing.assert_array_equal(out_t.numpy(), out)


def test_shuffle_decision_is_per_key():
    vol = _ramp((10, 10, 10))
    t = RandLocalPixelShuffled(("a", "b"), prob=0.5, num_blocks=50, max_block_fraction=0.3).set_random_state(0)
    changed = []
    for _ in range(30):
        d = t({"a": vol, "b": vol})
        changed.append(((d["a"] != vol).any(), (d["b"] != vol).any()))
    assert {(True, False), (False, True), (True, True), (False, False)} <= set(changed)
    with pytest.raises(ValueError, match="'b'"):
        t({"a": vol})


# ------------------------------------------------------------------------------------------------------ painting


def _views(shape=(32, 32, 16)):
    r = np.random.RandomState(1)
    return {"view1": r.randn(1, *shape).astype(np.float32), "view2": 3 * r.randn(1, *shape).astype(np.float32) + 2}


def test_inpainting_touches_only_its_blocks():
    views = _views()
    t = RandPaintingd(prob=1.0, inpaint_prob=1.0).set_random_state(0)
    for _ in range(5):
        d = t(views)
        assert t.last_mode == "in"
        for key, x in views.items():
            boxes = t.last_boxes[key]
            assert 0 <= len(boxes) <= 5
            for b in boxes:
                size, dims = b[:, 1] - b[:, 0], np.array(x.shape[1:])
                assert (size >= dims // 6).all() and (size <= dims // 3).all()
                assert (b[:, 0] >= 3).all() and (b[:, 1] <= dims - 3).all()
            m = _mask(x.shape[1:], boxes)[None]
            np.testing.assert_array_equal(d[key][~m], x[~m])
            assert (d[key][m] >= x.min()).all() and (d[key][m] < x.max()).all()
            assert not m.any() or (d[key][m] != x[m]).mean() > 0.99
    assert any(len(b) > 1 for b in t.last_boxes.values())


def test_outpainting_restores_its_windows():
    views = _views()
    t = RandPaintingd(prob=1.0, inpaint_prob=0.0).set_random_state(0)
    for _ in range(5):
        d = t(views)
        assert t.last_mode == "out"
        for key, x in views.items():
            boxes = t.last_boxes[key]
            assert 1 <= len(boxes) <= 5
            dims = np.array(x.shape[1:])
            for b in boxes:
                size = b[:, 1] - b[:, 0]
                assert (size >= dims - 4 * dims // 7).all() and (size <= dims - 3 * dims // 7).all()
                assert (b[:, 0] >= 3).all() and (b[:, 1] <= dims - 3).all()
                np.testing.assert_array_equal(d[key][_slice(b)], x[_slice(b)])
            m = _mask(x.shape[1:], boxes)[None]
            assert (d[key][~m] >= x.min()).all() and (d[key][~m] < x.max()).all()
            assert (d[key][~m] != x[~m]).mean() > 0.99


def test_painting_same_kind_for_both_views():
    """In-painting never touches the 3-voxel border, out-painting always noises it: the border tells the kind."""
    views = _views()
    t = RandPaintingd(prob=0.8, inpaint_prob=0.5).set_random_state(0)
    kinds = []
    for _ in range(30):
        d = t(views)
        kind = ["out" if d[k][0, 0, 0, 0] != views[k][0, 0, 0, 0] else "in" for k in views]
        if t.last_mode is None:
            assert all((d[k] == views[k]).all() for k in views)
        else:
            assert kind == [t.last_mode] * 2
        kinds.append(t.last_mode)
    assert {None, "in", "out"} <= set(kinds)


def test_painting_prob_zero_torch_and_errors():
    views = _views((16, 16, 16))
    d = RandPaintingd(prob=0.0).set_random_state(0)(views)
    for k in views:
        np.testing.assert_array_equal(d[k], views[k])
    tv = {k: torch.as_tensor(v) for k, v in views.items()}
    a = RandPaintingd(prob=1.0).set_random_state(2)(views)
    b = RandPaintingd(prob=1.0).set_random_state(2)(tv)
    for k in views:
        assert isinstance(b[k], torch.Tensor) and b[k].dtype == torch.float32
        np.testing.assert_array_equal(b[k].numpy(), a[k])
    with pytest.raises(ValueError, match="'view2'"):
        RandPaintingd()({"view1": views["view1"]})
    with pytest.raises(ValueError, match="'view1'"):
        RandPaintingd()({"view1": np.zeros((2, 2)), "view2": views["view2"]})


# -------------------------------------------------------------------------------------------------- spatial code


def _explicit(x, flips, k):
    y = x
    for axis in flips:
        y = np.flip(y, axis=1 + axis)
    return np.rot90(y, k, axes=(1, 2))


def test_apply_spatial_code_all_32_combinations():
    x = _ramp((4, 5, 3), channels=2)
    for bits in range(8):
        flips = [i for i in range(3) if bits >> i & 1]
        for k in range(4):
            code = [1 if i in flips else 0 for i in range(3)] + [int(j == k) for j in range(4)]
            expected = _explicit(x, flips, k)
            out = apply_spatial_code(x, code)
            assert out.dtype == np.float32 and out.flags.c_contiguous
            np.testing.assert_array_equal(out, expected)
            out_t = apply_spatial_code(torch.as_tensor(x), torch.tensor(code, dtype=torch.float32))
            np.testing.assert_array_equal(out_t.numpy(), expected)


def test_apply_spatial_code_hand_pinned():
    x = np.array([[0, 1], [2, 3]], np.float32)[None, :, :, None]  # x[0, X, Y, 0]
    np.testing.assert_array_equal(apply_spatial_code(x, [0, 0, 0, 0, 1, 0, 0])[0, :, :, 0], [[1, 3], [0, 2]])
    np.testing.assert_array_equal(apply_spatial_code(x, [1, 0, 0, 1, 0, 0, 0])[0, :, :, 0], [[2, 3], [0, 1]])
    np.testing.assert_array_equal(apply_spatial_code(x, [0, 1, 0, 0, 0, 1, 0])[0, :, :, 0], [[2, 3], [0, 1]])
    for bad in ([0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0], [2, 0, 0, 1, 0, 0, 0], [0] * 6):
        with pytest.raises(ValueError, match="code"):
            apply_spatial_code(x, bad)
    with pytest.raises(ValueError, match="channel-first"):
        apply_spatial_code(x[0], [0, 0, 0, 1, 0, 0, 0])


def test_rand_spatial_code_reapplies_and_is_per_key():
    x = _ramp((6, 6, 4))
    t = RandSpatialCoded(("a", "b")).set_random_state(0)
    codes = []
    for _ in range(20):
        d = t({"a": x, "b": torch.as_tensor(x)})
        for key in ("a", "b"):
            code = d[f"{key}_code"]
            assert isinstance(code, torch.Tensor) and code.dtype == torch.float32 and code.shape == (7,)
            assert set(code[:3].tolist()) <= {0.0, 1.0} and code[3:].sum() == 1 and set(code[3:].tolist()) <= {0, 1}
            np.testing.assert_array_equal(np.asarray(d[key]), apply_spatial_code(x, code))
        assert isinstance(d["a"], np.ndarray) and isinstance(d["b"], torch.Tensor)
        codes.append((tuple(d["a_code"].tolist()), tuple(d["b_code"].tolist())))
    assert any(a != b for a, b in codes)
    with pytest.raises(ValueError, match="'b'"):
        t({"a": x})


def test_rand_spatial_code_distribution():
    t = RandSpatialCoded("a").set_random_state(0)
    codes = []
    for _ in range(4000):
        t.randomize()
        codes.append(t.code.copy())
    codes = np.array(codes)
    counts = codes[:, 3:].sum(0)
    assert (np.abs(counts - 1000) < 120).all(), counts  # ~4.4 sigma
    assert (np.abs(codes[:, :3].mean(0) - 0.5) < 0.04).all()


# ----------------------------------------------------------------------------------------------------- pipeline


def test_pcrl_pipeline_is_deterministic():
    vol = np.random.RandomState(0).randn(1, 40, 40, 24).astype(np.float32)
    pipeline = Compose(
        [
            RandOverlappingCropsd("image", crop_sizes=((16, 16, 8), (24, 24, 12)), spatial_size=(16, 16, 8)),
            CopyItemsd(("view1", "view2"), names=("target1", "target2")),
            RandFlipd(("view1", "view2"), prob=0.5, spatial_axis=0),
            RandLocalPixelShuffled(("view1", "view2"), num_blocks=500),
            RandPaintingd(("view1", "view2")),
            RandSpatialCoded(("target1", "target2")),
        ]
    )
    a = pipeline.set_random_state(3)({"image": vol})
    b = pipeline.set_random_state(3)({"image": vol})
    for key in ("view1", "view2", "target1", "target2", "target1_code", "target2_code"):
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
    assert a["view1"].shape == a["target1"].shape == (1, 16, 16, 8)
