"""SignedDistanceMapd against an independent computation, on tiny arrays and real LA labels."""

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from medssl.transforms import SignedDistanceMapd, signed_distance_map


def _independent_sdm(mask):
    """DTC's normalised SDM written out independently: EDTs with scipy, the inner boundary by neighbour shifts."""
    pos = mask.astype(bool)
    d_in = ndimage.distance_transform_edt(pos)
    d_out = ndimage.distance_transform_edt(~pos)
    sdm = d_out / d_out.max() - d_in / d_in.max()
    boundary = np.zeros_like(pos)
    for axis in range(pos.ndim):
        for shift in (1, -1):
            padded = np.pad(pos, [(1, 1) if a == axis else (0, 0) for a in range(pos.ndim)], mode="edge")
            neighbour = np.take(np.roll(padded, shift, axis=axis), range(1, pos.shape[axis] + 1), axis=axis)
            boundary |= pos & ~neighbour
    sdm[boundary] = 0
    return sdm


def test_tiny_hand_computed():
    m = np.zeros((7, 1, 1))
    m[2:5] = 1
    # outside: distances 2, 1 | 1, 2 -> /2; inside: 1, 2, 1 -> /2, boundary (ends of the run) 0
    np.testing.assert_allclose(signed_distance_map(m).ravel(), [1, 0.5, 0, -1, 0, 0.5, 1])
    assert not signed_distance_map(np.zeros((4, 4, 4))).any()
    assert (signed_distance_map(np.ones((4, 4, 4))) == -1).all()  # no boundary in view: all deep inside


def test_against_independent_computation_on_real_labels(la_dir):
    for case in sorted((la_dir / "labelsTr").glob("*.nii.gz"))[:3]:
        label = np.asarray(nib.load(case).dataobj)
        patch = label[40:152, 20:132, 4:84]  # a training-sized patch (112x112x80)
        ours = signed_distance_map(patch)
        np.testing.assert_allclose(ours, _independent_sdm(patch), atol=1e-6)
        assert ours.min() == pytest.approx(-1) and ours.max() == pytest.approx(1)
        assert (ours[patch > 0] <= 0).all() and (ours[patch == 0] > 0).all()  # negative inside


def test_dict_transform():
    label = torch.zeros(1, 7, 1, 1)
    label[0, 2:5] = 1
    out = SignedDistanceMapd("label")({"image": torch.zeros(1, 7, 1, 1), "label": label})
    assert out["sdm"].shape == (1, 7, 1, 1)
    np.testing.assert_allclose(out["sdm"].ravel().numpy(), [1, 0.5, 0, -1, 0, 0.5, 1])
    assert "sdm" not in SignedDistanceMapd("label")({"image": torch.zeros(1, 7, 1, 1)})  # unlabeled: skipped


def test_dict_transform_one_map_per_foreground_class():
    """num_classes=4 on a class-id label: three maps, each the SDM of its class (1D runs, hand-computed)."""
    label = torch.tensor([0, 1, 1, 1, 0, 3, 3, 0, 0.0]).reshape(1, 9, 1, 1)  # class 2 absent from this patch
    out = SignedDistanceMapd("label", num_classes=4)({"label": label})["sdm"]
    assert out.shape == (3, 9, 1, 1)
    # class 1 at 1-3: outside distances 1 | 1, 2, 3, 4, 5 -> /5; inside 1, 2, 1 -> /2, the run's ends 0
    np.testing.assert_allclose(out[0].ravel().numpy(), [0.2, 0, -1, 0, 0.2, 0.4, 0.6, 0.8, 1.0], atol=1e-6)
    assert not out[1].any()  # an absent class: all zeros (DTC's empty-mask rule)
    np.testing.assert_allclose(out[2].ravel().numpy(), [1, 0.8, 0.6, 0.4, 0.2, 0, 0, 0.2, 0.4], atol=1e-6)
    # two classes: the binary map of today
    binary = torch.tensor([0, 0, 1, 1, 1, 0, 0.0]).reshape(1, 7, 1, 1)
    np.testing.assert_array_equal(
        SignedDistanceMapd("label", num_classes=2)({"label": binary})["sdm"].numpy(),
        SignedDistanceMapd("label")({"label": binary})["sdm"].numpy(),
    )
    with pytest.raises(ValueError, match=r"'label' holds values \[0.0, 1.0, 3.0, 5.0\]; expected class ids 0..3"):
        SignedDistanceMapd("label", num_classes=4)({"label": torch.tensor([0, 1, 3, 5.0]).reshape(1, 4, 1, 1)})
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        SignedDistanceMapd("label", num_classes=1)
