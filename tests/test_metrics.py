"""Tests of medssl.metrics: hand-computed values, medpy on real LA labels, empty masks, the MONAI metric class."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from medpy.metric import binary as medpy_binary
from medssl.metrics import (
    METRIC_NAMES,
    SegmentationMetric,
    asd,
    case_metrics,
    dice,
    hd95,
    jaccard,
    surface_distances,
)
from monai.data import MetaTensor
from scipy import ndimage as ndi

FUNCTIONS = {"dice": dice, "jaccard": jaccard, "hd95": hd95, "asd": asd}


def box(shape, *slices):
    m = np.zeros(shape, dtype=bool)
    m[tuple(slices)] = True
    return m


def shifted(mask, offset):
    """``mask`` moved by ``offset`` voxels, zero-filled (no wrap-around)."""
    out = np.zeros_like(mask)
    src = tuple(slice(max(-o, 0), n - max(o, 0)) for n, o in zip(mask.shape, offset))
    dst = tuple(slice(max(o, 0), n - max(-o, 0)) for n, o in zip(mask.shape, offset))
    out[dst] = mask[src]
    return out


def medpy_metrics(pred, label, spacing=None):
    return {
        "dice": medpy_binary.dc(pred, label),
        "jaccard": medpy_binary.jc(pred, label),
        "hd95": medpy_binary.hd95(pred, label, voxelspacing=spacing),
        "asd": medpy_binary.asd(pred, label, voxelspacing=spacing),
    }


# ----------------------------------------------------------------------------------------------------------------
# hand-computed cases
# ----------------------------------------------------------------------------------------------------------------
def test_overlapping_cubes_dice_jaccard():
    a = box((10, 10, 10), slice(2, 6), slice(2, 6), slice(2, 6))  # 64 voxels
    b = box((10, 10, 10), slice(3, 7), slice(3, 7), slice(3, 7))  # 64 voxels, 27 shared
    assert dice(a, b) == pytest.approx(27 / 64, abs=1e-15)
    assert jaccard(a, b) == pytest.approx(27 / 101, abs=1e-15)
    assert dice(a, a) == 1.0 and jaccard(a, a) == 1.0
    assert hd95(a, a) == 0.0 and asd(a, a) == 0.0


def test_single_voxel_shift():
    # a 4^3 cube and the same cube one voxel further along axis 0: of the 56 surface voxels of each, 20 are one
    # voxel from the other surface (the 16 of the trailing face and the 4 interior voxels of the leading face),
    # 36 lie on it.
    a = box((10, 10, 10), slice(2, 6), slice(2, 6), slice(2, 6))
    b = shifted(a, (1, 0, 0))
    assert dice(a, b) == pytest.approx(3 / 4, abs=1e-15)
    assert jaccard(a, b) == pytest.approx(3 / 5, abs=1e-15)
    forward, backward = surface_distances(a, b)
    assert len(forward) == len(backward) == 56
    assert sorted(forward.tolist()) == [0.0] * 36 + [1.0] * 20
    assert asd(a, b) == pytest.approx(20 / 56, abs=1e-15)
    assert hd95(a, b) == 1.0
    # 2 units along the shifted axis: the trailing face is 2 away, the 4 leading-face voxels 1 away (sideways)
    assert asd(a, b, spacing=(2, 1, 1)) == pytest.approx((16 * 2 + 4 * 1) / 56, abs=1e-15)
    assert hd95(a, b, spacing=(2.0, 1.0, 1.0)) == 2.0
    assert hd95(a, b, spacing=3) == 3.0  # a number applies to every axis
    for spacing in (None, (2, 1, 1), 0.625):
        ref = medpy_metrics(a, b, spacing)
        assert case_metrics(a, b, spacing) == ref


def test_hd95_pools_both_directions_and_interpolates():
    # 1-D: surfaces are segment ends. d(P->L) = [5, 3], d(L->P) = [3, 7]; pooled sorted [3, 3, 5, 7], so the
    # 95th percentile is 5 + 0.85 * 2 = 6.7 (MONAI's max of the two directed percentiles would give 6.8).
    p = np.zeros(12, dtype=bool)
    p[0:3] = True
    lab = np.zeros(12, dtype=bool)
    lab[5:10] = True
    assert hd95(p, lab) == pytest.approx(6.7, abs=1e-12)
    assert hd95(lab, p) == hd95(p, lab)
    assert asd(p, lab) == 4.0 and asd(lab, p) == 5.0  # directed
    assert dice(p, lab) == 0.0 and jaccard(p, lab) == 0.0
    assert hd95(p, lab) == medpy_binary.hd95(p, lab)


def test_asd_is_directed():
    inner = box((10, 10, 10), slice(4, 6), slice(4, 6), slice(4, 6))  # all 8 voxels are surface
    outer = box((10, 10, 10), slice(2, 8), slice(2, 8), slice(2, 8))
    assert asd(inner, outer) == 2.0  # each inner voxel is 2 from the nearest outer face
    assert asd(outer, inner) == pytest.approx(medpy_binary.asd(outer, inner), rel=1e-12)
    assert asd(outer, inner) > 2.0


def test_array_edge_counts_as_background():
    # medpy erodes with the outside of the array as background: a mask filling the array has a surface there.
    full = np.ones((4, 4, 4), dtype=bool)  # surface: 56 voxels
    part = full.copy()
    part[3] = False  # 3x4x4 block, surface: 44 voxels
    # full -> part: the 16 voxels of the removed slice are 1 away, the other 40 lie on part's surface;
    # part -> full: the 4 interior voxels of part's cut face are 1 away.
    assert asd(full, part) == pytest.approx(16 / 56, abs=1e-15)
    assert asd(part, full) == pytest.approx(4 / 44, abs=1e-15)
    assert hd95(full, part) == 1.0
    assert case_metrics(full, part) == medpy_metrics(full, part)


def test_non_binary_inputs_are_cast_like_medpy():
    a = box((8, 8, 8), slice(1, 5), slice(1, 5), slice(1, 5)).astype(np.uint8) * 255
    b = box((8, 8, 8), slice(2, 6), slice(1, 5), slice(1, 5)).astype(np.float32) * 0.5
    assert case_metrics(a, b) == case_metrics(a > 0, b > 0) == medpy_metrics(a, b)


# ----------------------------------------------------------------------------------------------------------------
# edge cases
# ----------------------------------------------------------------------------------------------------------------
def test_empty_masks():
    empty = np.zeros((6, 6, 6), dtype=bool)
    some = box((6, 6, 6), slice(1, 3), slice(1, 3), slice(1, 3))
    both = case_metrics(empty, empty)
    assert both == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    for pred, label in ((empty, some), (some, empty)):  # empty prediction, empty label
        one = case_metrics(pred, label)
        assert one["dice"] == 0.0 and one["jaccard"] == 0.0
        assert math.isnan(one["hd95"]) and math.isnan(one["asd"])
        assert math.isnan(hd95(pred, label)) and math.isnan(asd(pred, label))
        assert dice(pred, label) == 0.0 and jaccard(pred, label) == 0.0
        with pytest.raises(ValueError, match="non-empty"):
            surface_distances(pred, label)
    assert jaccard(empty, empty) == medpy_binary.jc(empty, empty) == 1.0
    # medpy's dc means to return 1 here too, but its numpy-integer division gives NaN instead of raising
    # ZeroDivisionError; we return the intended 1.0
    with np.errstate(invalid="ignore"):
        assert math.isnan(medpy_binary.dc(empty, empty))
    with pytest.raises(RuntimeError):  # medpy raises where we return NaN
        medpy_binary.hd95(empty, some)


def test_shape_mismatch_and_bad_spacing():
    a, b = np.zeros((4, 5, 6)), np.zeros((4, 5, 7))
    for fn in (*FUNCTIONS.values(), case_metrics):
        with pytest.raises(ValueError, match=r"\(4, 5, 6\).*\(4, 5, 7\)"):
            fn(a, b)
    c = box((6, 6, 6), slice(1, 3), slice(1, 3), slice(1, 3))
    with pytest.raises(ValueError, match="one value per axis"):
        hd95(c, c, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        asd(c, c, spacing=(1.0, 0.0, 1.0))


# ----------------------------------------------------------------------------------------------------------------
# real LA labels against medpy
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def la_labels(la_dir):
    """The first three training labels of the LA benchmark, as (bool array, spacing)."""
    entries = json.loads((la_dir / "dataset.json").read_text())["training"][:3]
    out = []
    for entry in entries:
        img = nib.load(str(la_dir / entry["label"]))
        out.append((np.asanyarray(img.dataobj) > 0, tuple(float(z) for z in img.header.get_zooms()[:3])))
    return out


def perturb(label, kind):
    if kind == "erode2":
        return ndi.binary_erosion(label, iterations=2)
    if kind == "dilate3":
        return ndi.binary_dilation(label, iterations=3)
    if kind == "shift":
        return shifted(label, (3, -2, 1))
    if kind == "drop_slices":  # lose the top 8 foreground slices along z
        pred = label.copy()
        top = np.flatnonzero(label.any(axis=(0, 1)))[-1]
        pred[..., top - 7 :] = False
        return pred
    if kind == "blob":  # eroded, plus a false positive touching the array corner (an outlier and an edge surface)
        pred = ndi.binary_erosion(label, iterations=1)
        pred[:6, :6, :6] = True
        return pred
    raise ValueError(kind)


REAL_CASES = [(0, "erode2"), (0, "dilate3"), (0, "blob"), (1, "shift"), (1, "drop_slices"), (2, "blob"), (2, "erode2")]


@pytest.mark.parametrize("case, kind", REAL_CASES)
def test_real_la_against_medpy(la_labels, case, kind):
    label, _ = la_labels[case]
    pred = perturb(label, kind)
    ref = medpy_metrics(pred, label)
    got = case_metrics(pred, label)
    assert list(got) == list(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert got[name] == pytest.approx(ref[name], rel=1e-6), name
        assert FUNCTIONS[name](pred, label) == got[name], name
    assert 0.0 < got["dice"] < 1.0 and got["hd95"] > 0.0
    assert got == ref, "cropping the distance transform must not change medpy's values at all"


@pytest.mark.parametrize("case, kind, spacing", [(0, "shift", "header"), (1, "blob", (0.625, 0.7, 1.3))])
def test_real_la_spacing_against_medpy(la_labels, case, kind, spacing):
    label, zooms = la_labels[case]
    spacing = zooms if spacing == "header" else spacing
    pred = perturb(label, kind)
    for name in ("hd95", "asd"):
        ref = getattr(medpy_binary, name)(pred, label, voxelspacing=spacing)
        assert FUNCTIONS[name](pred, label, spacing=spacing) == pytest.approx(ref, rel=1e-6), name
    # an isotropic spacing just rescales the voxel distances
    if spacing == zooms and len(set(zooms)) == 1:
        assert hd95(pred, label, spacing=spacing) == pytest.approx(zooms[0] * hd95(pred, label), rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# MONAI metric
# ----------------------------------------------------------------------------------------------------------------
def onehot_batch(*masks):
    """``[B, 2, ...]`` one-hot float tensor (background, foreground) of binary masks, as AsDiscrete(to_onehot=2)."""
    fg = torch.as_tensor(np.stack(masks)[:, None].astype(np.float32))
    return torch.cat([1.0 - fg, fg], dim=1)


@pytest.fixture(scope="module")
def toy_pair():
    label0 = box((12, 12, 10), slice(2, 8), slice(3, 9), slice(2, 7))
    label1 = box((12, 12, 10), slice(4, 10), slice(1, 6), slice(3, 9))
    pred0 = shifted(label0, (1, 0, -1))
    pred1 = ndi.binary_dilation(label1)
    pred1[0, 0, 0] = True  # an outlier in the array corner
    return (pred0, pred1), (label0, label1)


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_segmentation_metric_per_case_values(toy_pair, name):
    (pred0, pred1), (label0, label1) = toy_pair
    metric = SegmentationMetric(name)
    values = metric(onehot_batch(pred0, pred1), onehot_batch(label0, label1))
    assert values.shape == (2, 1) and values.dtype == torch.float64
    assert values[:, 0].tolist() == [FUNCTIONS[name](pred0, label0), FUNCTIONS[name](pred1, label1)]
    # the background channel is scored too with include_background=True
    metric_bg = SegmentationMetric(name, include_background=True)
    values_bg = metric_bg(onehot_batch(pred0, pred1), onehot_batch(label0, label1))
    assert values_bg.shape == (2, 2)
    assert values_bg[:, 1].tolist() == values[:, 0].tolist()
    assert values_bg[0, 0].item() == FUNCTIONS[name](~pred0, ~label0)
    # aggregate: mean over cases, a scalar
    assert metric.aggregate().item() == pytest.approx(values.mean().item(), rel=1e-6)


def test_segmentation_metric_spacing_and_lists(toy_pair):
    (pred0, pred1), (label0, label1) = toy_pair
    metric = SegmentationMetric("hd95", spacing=(2.0, 1.0, 0.5))
    # decollated lists of channel-first tensors (what from_engine gives after decollate_batch) work too
    preds = [MetaTensor(t) for t in onehot_batch(pred0, pred1)]  # AsDiscreted gives MetaTensors
    labels = list(onehot_batch(label0, label1))
    values = metric(preds, labels)
    assert values[:, 0].tolist() == [hd95(pred0, label0, (2.0, 1.0, 0.5)), hd95(pred1, label1, (2.0, 1.0, 0.5))]
    per_case = SegmentationMetric("asd")._compute_tensor(
        onehot_batch(pred0, pred1), onehot_batch(label0, label1), spacing=[[1.0, 1.0, 1.0], [0.5, 0.5, 2.0]]
    )
    assert per_case[:, 0].tolist() == [asd(pred0, label0), asd(pred1, label1, (0.5, 0.5, 2.0))]


def test_segmentation_metric_spacing_from_the_image(toy_pair):
    """spacing="image": each case's voxel size from its MetaTensor affine (rotated too); a plain tensor is refused."""
    (pred0, pred1), (label0, label1) = toy_pair
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # axes swapped in world space
    affines = [np.diag([0.8, 0.8, 3.0, 1.0]), np.eye(4)]
    affines[1][:3, :3] = rotation @ np.diag([1.5, 0.7, 2.0])
    preds = [MetaTensor(t, affine=torch.as_tensor(a)) for t, a in zip(onehot_batch(pred0, pred1), affines)]
    labels = list(onehot_batch(label0, label1))
    for name, fn in (("hd95", hd95), ("asd", asd)):
        values = SegmentationMetric(name, spacing="image")(preds, labels)
        assert values[:, 0].tolist() == [fn(pred0, label0, (0.8, 0.8, 3.0)), fn(pred1, label1, (1.5, 0.7, 2.0))]
        assert values[0, 0].item() != fn(pred0, label0)  # not the voxel value
    with pytest.raises(ValueError, match="spacing='image'\\) needs a MetaTensor prediction with an affine"):
        SegmentationMetric("hd95", spacing="image")(onehot_batch(pred0), onehot_batch(label0))
    with pytest.raises(ValueError, match="spacing must be numbers, None or 'image'; got 'mm'"):
        SegmentationMetric("hd95", spacing="mm")(preds, labels)


def test_segmentation_metric_aggregate_ignores_nan(toy_pair):
    (pred0, _), (label0, label1) = toy_pair
    empty = np.zeros_like(pred0)
    metric = SegmentationMetric("hd95", get_not_nans=True)
    values = metric(onehot_batch(pred0, empty), onehot_batch(label0, label1))
    assert math.isnan(values[1, 0].item())
    mean, not_nans = metric.aggregate()
    assert mean.numel() == 1 and mean.item() == pytest.approx(hd95(pred0, label0), rel=1e-6)
    assert not_nans.item() == 1
    batch_mean, _ = metric.aggregate("mean_batch")
    assert batch_mean.tolist() == pytest.approx([hd95(pred0, label0)], rel=1e-6)
    raw, _ = metric.aggregate("none")
    assert torch.isnan(raw).sum().item() == 1
    # all NaN: the mean is NaN, not MONAI's 0 (a 0 mm distance would flatter a failed model)
    metric.reset()
    metric(onehot_batch(empty), onehot_batch(label0))
    assert math.isnan(metric.aggregate()[0].item())
    # the overlap metrics stay defined: an empty prediction scores 0
    dice_metric = SegmentationMetric("dice")
    dice_metric(onehot_batch(pred0, empty), onehot_batch(label0, label1))
    assert dice_metric.aggregate().item() == pytest.approx(dice(pred0, label0) / 2, rel=1e-6)


def test_segmentation_metric_validation():
    with pytest.raises(ValueError, match="metric_name"):
        SegmentationMetric("hd100")
    with pytest.raises(ValueError):
        SegmentationMetric("dice", reduction="median")
    metric = SegmentationMetric("dice")
    with pytest.raises(ValueError, match=r"\(2, 2, 5, 5, 5\).*\(2, 2, 5, 5, 4\)"):
        metric(torch.zeros(2, 2, 5, 5, 5), torch.zeros(2, 2, 5, 5, 4))
    with pytest.raises(ValueError, match=r"at least 3 dimensions.*\(2, 2\)"):
        metric(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"binarised.*\(1, 2, 4, 4, 4\)"):
        metric(torch.full((1, 2, 4, 4, 4), 0.5), torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="label"):
        metric._compute_tensor(torch.zeros(1, 2, 4, 4, 4), None)
    with pytest.raises(ValueError, match="per-case spacing"):
        SegmentationMetric("hd95")._compute_tensor(
            torch.zeros(2, 2, 4, 4, 4), torch.zeros(2, 2, 4, 4, 4), spacing=[[1.0, 1.0, 1.0]]
        )
    with pytest.warns(UserWarning, match="single channel"):
        values = metric(torch.ones(1, 1, 4, 4, 4, dtype=torch.bool), torch.ones(1, 1, 4, 4, 4, dtype=torch.bool))
    assert values.tolist() == [[1.0]]


@pytest.mark.filterwarnings("ignore:Mean of empty slice")  # MetricsSaver's per-case class mean of a NaN row
def test_segmentation_metric_with_ignite_handlers(toy_pair, tmp_path):
    from ignite.engine import Engine
    from monai.handlers import IgniteMetricHandler, MetricsSaver, from_engine

    (pred0, pred1), (label0, label1) = toy_pair
    batches = [
        {"pred": onehot_batch(pred0), "label": onehot_batch(label0), "names": ["case0"]},
        {
            "pred": onehot_batch(pred1, np.zeros_like(pred1)),
            "label": onehot_batch(label1, label0),
            "names": ["case1", "case2"],
        },
    ]
    engine = Engine(lambda _engine, batch: batch)
    for name in METRIC_NAMES:
        IgniteMetricHandler(
            metric_fn=SegmentationMetric(name), output_transform=from_engine(["pred", "label"]), save_details=True
        ).attach(engine, name)
    MetricsSaver(
        save_dir=str(tmp_path),
        metrics=list(METRIC_NAMES),
        metric_details=list(METRIC_NAMES),
        batch_transform=lambda batch: [{"filename_or_obj": n} for n in batch["names"]],
        summary_ops=None,
    ).attach(engine)
    engine.run(batches, max_epochs=1)

    expected = {
        name: [FUNCTIONS[name](pred0, label0), FUNCTIONS[name](pred1, label1), float("nan")] for name in ("hd95", "asd")
    }
    expected.update(
        {name: [FUNCTIONS[name](pred0, label0), FUNCTIONS[name](pred1, label1), 0.0] for name in ("dice", "jaccard")}
    )
    for name in METRIC_NAMES:
        details = engine.state.metric_details[name]
        assert details.shape == (3, 1)
        np.testing.assert_array_equal(details[:, 0].numpy(), np.asarray(expected[name]))
        assert engine.state.metrics[name] == pytest.approx(np.nanmean(expected[name]), rel=1e-6)
    with open(tmp_path / "hd95_raw.csv") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows[1:]] == ["case0", "case1", "case2"]
    assert float(rows[1][1]) == pytest.approx(expected["hd95"][0], abs=1e-4)
    assert rows[0] == ["filename", "class0", "mean"] and rows[3][1] == "nan"


def test_segmentation_metric_on_real_case(la_labels):
    label, _ = la_labels[0]
    preds = (perturb(label, "shift"), perturb(label, "erode2"))
    metric = SegmentationMetric("hd95")
    values = metric(onehot_batch(*preds), onehot_batch(label, label))
    assert values[:, 0].tolist() == [hd95(p, label) for p in preds]
