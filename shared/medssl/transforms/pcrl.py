"""PCRL data transforms: the two overlapping views, their corruptions and the spatially coded targets.

Zhou et al., "Preservational Learning Improves Self-supervised Medical Image Models by Reconstructing Diverse
Contexts", ICCV 2021 (official code: Luchixiang/PCRL; the corruptions come from Models Genesis).

- :class:`RandOverlappingCropsd` (with :func:`box_iou`): two overlapping random crops, the two views.
- :class:`RandLocalPixelShuffled`, :class:`RandPaintingd`: local pixel shuffling and in-/out-painting of the views.
- :class:`RandSpatialCoded` (with :func:`apply_spatial_code`): flips + 90-degree rotation of the reconstruction
  targets, with the 7-d code of the transform.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type

__all__ = [
    "RandOverlappingCropsd",
    "RandLocalPixelShuffled",
    "RandPaintingd",
    "RandSpatialCoded",
    "box_iou",
    "apply_spatial_code",
]


def _keys_present(transform: MapTransform, d: Mapping, name: str) -> list:
    """The transform's keys found in ``d``; a missing key is a ValueError naming it unless missing keys are allowed."""
    missing = [k for k in transform.keys if k not in d]
    if missing and not transform.allow_missing_keys:
        raise ValueError(f"{name}: key(s) {missing} not in the data (available: {sorted(map(str, d))}).")
    return [k for k in transform.keys if k in d]


def _check_volume(x, key: Hashable, name: str) -> None:
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise ValueError(f"{name}: d[{key!r}] must be a numpy array or torch tensor, got {type(x).__name__}.")
    if x.ndim != 4:
        raise ValueError(f"{name}: d[{key!r}] must be channel-first [C, X, Y, Z], got shape {tuple(x.shape)}.")
    if min(x.shape) < 1:
        raise ValueError(f"{name}: d[{key!r}] is empty, shape {tuple(x.shape)}.")


def _plain(x):
    """``x`` without MONAI metadata (geometry-changing transforms do not track the affine)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _to_numpy_f32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return _plain(x).detach().cpu().numpy().astype(np.float32, copy=True)
    return np.array(x, dtype=np.float32, copy=True)


def _like(out: np.ndarray, ref):
    """``out`` (float32 numpy) as the type of ``ref``: numpy array, or tensor on ``ref``'s device (MetaTensor kept)."""
    if isinstance(ref, torch.Tensor):
        return convert_to_dst_type(out, ref, dtype=torch.float32)[0]
    return out


def _triple(value, name: str, what: str) -> tuple:
    t = tuple(int(v) for v in np.atleast_1d(value))
    if len(t) != 3 or min(t) < 1:
        raise ValueError(f"{name}: {what} must be 3 positive ints, got {value!r}.")
    return t


def box_iou(box1, box2) -> float:
    """Intersection over union of two 3D boxes.

    Args:
        box1, box2: ``[3, 2]`` arrays of (start, end) per axis, end exclusive (voxel boxes, so the volume of
            ``[[0, 2], [0, 2], [0, 2]]`` is 8).

    Returns:
        ``|A ∩ B| / |A ∪ B|``, 0.0 when both boxes are empty.

    Raises:
        ValueError: a box not of shape [3, 2], or with end < start.
    """
    boxes = []
    for name, box in (("box1", box1), ("box2", box2)):
        b = np.asarray(box, dtype=np.float64)
        if b.shape != (3, 2):
            raise ValueError(f"box_iou: {name} must have shape [3, 2] (start, end per axis), got {b.shape}.")
        if (b[:, 1] < b[:, 0]).any():
            raise ValueError(f"box_iou: {name} has end < start: {b.tolist()}.")
        boxes.append(b)
    a, b = boxes
    inter = np.prod(np.clip(np.minimum(a[:, 1], b[:, 1]) - np.maximum(a[:, 0], b[:, 0]), 0, None))
    union = np.prod(a[:, 1] - a[:, 0]) + np.prod(b[:, 1] - b[:, 0]) - inter
    return float(inter / union) if union > 0 else 0.0


class RandOverlappingCropsd(RandomizableTransform, MapTransform):
    """Two overlapping random crops of one volume, resized to one size: the two views of PCRL.

    From Zhou et al., "Preservational Learning Improves Self-supervised Medical Image Models by Reconstructing
    Diverse Contexts" (ICCV 2021). The official pre-processing (``pytorch/preprocess/luna_pre.py`` of
    Luchixiang/PCRL) draws, for LUNA CT resampled to 1 mm and scaled to [0, 1], two crop sizes independently from
    ``(64,64,32), (96,96,48), (96,96,96), (32,32,16), (112,112,64)`` and two uniform positions, redraws the pair
    until the IoU of the two boxes is > 0.25, and resizes both crops to 64x64x32 (skimage ``resize``; it also keeps
    away from a fixed border and rejects crops with too much lung, which we do not do).

    Here positions are uniform over all in-volume positions; a crop size larger than the volume is clamped to the
    volume side (per axis). If no pair with IoU > ``min_iou`` is found in ``max_tries`` draws, the pair with the
    highest IoU seen is used (the latest one on ties), so a call always returns. Crops whose size already equals
    ``spatial_size`` are returned as the raw slice (no interpolation); others are resized with
    ``torch.nn.functional.interpolate`` (``align_corners=False`` for the linear modes; no anti-aliasing, use
    ``mode="area"`` for that when downsampling).

    Args:
        keys: the one image key, ``[C, X, Y, Z]`` (numpy array or torch tensor).
        crop_sizes: the crop sizes (X, Y, Z) to draw from, uniformly.
        spatial_size: the (X, Y, Z) size both crops are resized to.
        min_iou: a pair is accepted when its IoU is > ``min_iou``.
        view_keys: the two output keys; each gets a float32 ``[C, *spatial_size]`` array of the input's type
            (numpy, or tensor on the input's device; a MetaTensor gives a plain tensor: the geometry is in the box).
        box_key_suffix: each view's box goes under ``f"{view}{box_key_suffix}"``: an int64 numpy ``[3, 2]`` array
            of (start, end) per axis, end exclusive, in voxels of the input.
        max_tries: pairs drawn at most.
        mode: ``torch.nn.functional.interpolate`` mode ("trilinear", "nearest", "area", ...).
        allow_missing_keys: skip the transform when the key is absent, instead of raising.

    Raises:
        ValueError: not exactly one key, bad sizes/``view_keys``/``max_tries``, the key missing from the data,
            or an input that is not ``[C, X, Y, Z]``.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        crop_sizes: Sequence[Sequence[int]] = ((64, 64, 32), (96, 96, 48), (96, 96, 96), (32, 32, 16), (112, 112, 64)),
        spatial_size: Sequence[int] = (64, 64, 32),
        min_iou: float = 0.25,
        view_keys: Sequence[str] = ("view1", "view2"),
        box_key_suffix: str = "_box",
        max_tries: int = 100,
        mode: str = "trilinear",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        name = type(self).__name__
        if len(self.keys) != 1:
            raise ValueError(f"{name}: expects exactly one key (the volume to crop), got {list(self.keys)}.")
        if not len(crop_sizes):
            raise ValueError(f"{name}: crop_sizes is empty.")
        self.crop_sizes = [_triple(s, name, "each crop size") for s in crop_sizes]
        self.spatial_size = _triple(spatial_size, name, "spatial_size")
        view_keys = tuple(view_keys)
        if len(view_keys) != 2 or view_keys[0] == view_keys[1]:
            raise ValueError(f"{name}: view_keys must be two distinct keys, got {view_keys!r}.")
        if int(max_tries) < 1:
            raise ValueError(f"{name}: max_tries must be >= 1, got {max_tries!r}.")
        self.min_iou = float(min_iou)
        self.view_keys = view_keys
        self.box_key_suffix = box_key_suffix
        self.max_tries = int(max_tries)
        self.mode = mode
        self.boxes: list[np.ndarray] = []
        self.iou = 0.0

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        """Draw the pair of boxes (``self.boxes``, two ``[3, 2]`` arrays) and keep its IoU in ``self.iou``."""
        shape = np.asarray(spatial_shape)
        best = None
        for _ in range(self.max_tries):
            # sizes of both crops first, then both positions (as the official code draws them)
            size1 = np.minimum(self.crop_sizes[self.R.randint(len(self.crop_sizes))], shape)
            size2 = np.minimum(self.crop_sizes[self.R.randint(len(self.crop_sizes))], shape)
            boxes = []
            for size in (size1, size2):
                start = np.array([self.R.randint(0, n - s + 1) for n, s in zip(shape, size)])
                boxes.append(np.stack([start, start + size], axis=1).astype(np.int64))
            iou = box_iou(*boxes)
            if best is None or iou >= best[0]:
                best = (iou, boxes)
            if iou > self.min_iou:
                break
        self.iou, self.boxes = best

    def _resize(self, crop: torch.Tensor) -> torch.Tensor:
        if tuple(crop.shape[1:]) == self.spatial_size:
            return crop.clone()  # the raw slice, not a view of the source
        linear = self.mode in ("linear", "bilinear", "bicubic", "trilinear")
        return F.interpolate(
            crop[None], size=self.spatial_size, mode=self.mode, align_corners=False if linear else None
        )[0]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        name = type(self).__name__
        for key in _keys_present(self, d, name):
            img = d[key]
            _check_volume(img, key, name)
            self.randomize(img.shape[1:])
            vol = _plain(img).float() if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img, np.float32))
            for view, box in zip(self.view_keys, self.boxes):
                sl = tuple(slice(int(a), int(b)) for a, b in box)
                out = self._resize(vol[(slice(None),) + sl]).contiguous()
                if not isinstance(img, torch.Tensor):
                    out = out.numpy().astype(np.float32, copy=True)
                d[view] = out
                d[f"{view}{self.box_key_suffix}"] = box.copy()
        return d


def _shuffle_blocks(
    img: np.ndarray, starts: np.ndarray, sizes: np.ndarray, R: np.random.RandomState, chunk_voxels: int = 1 << 21
) -> np.ndarray:
    """Each block (rows of ``starts``/``sizes``, [N, 3]) gets its voxels of ``img`` ([C, X, Y, Z]) shuffled.

    Values always come from the input ``img``; blocks are written in order, so a later block overwrites an earlier
    one where they overlap. One random permutation per block, shared by the channels. Vectorised: every voxel of
    every block gets a flat index and a random key; sorting by (block, key) gives the within-block permutations,
    and ``np.maximum.at`` finds the last block writing each voxel.
    """
    c = img.shape[0]
    dims = np.asarray(img.shape[1:], dtype=np.int64)
    src_flat = img.reshape(c, -1)
    out = src_flat.copy()
    counts = sizes.prod(axis=1)
    ends = np.cumsum(counts)
    b0, n = 0, len(counts)
    while b0 < n:  # chunks of blocks, so memory stays bounded for large blocks
        b1 = max(b0 + 1, int(np.searchsorted(ends, ends[b0] - counts[b0] + chunk_voxels, side="right")))
        cnt, st, sz = counts[b0:b1], starts[b0:b1], sizes[b0:b1]
        block = np.repeat(np.arange(len(cnt)), cnt)
        local = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)  # raster index inside the block
        szb, stb = sz[block], st[block]
        z = local % szb[:, 2]
        y = (local // szb[:, 2]) % szb[:, 1]
        x = local // (szb[:, 2] * szb[:, 1])
        dest = ((stb[:, 0] + x) * dims[1] + stb[:, 1] + y) * dims[2] + stb[:, 2] + z
        # a random permutation within each block: sort by (block, random 40-bit key), packed in one exact int64
        order = np.argsort((block << 40) | R.randint(0, 1 << 40, size=dest.size, dtype=np.int64), kind="stable")
        src = dest[order]
        # later blocks win where blocks overlap: the last write to each voxel (ufunc.at applies every index)
        owner = np.full(src_flat.shape[1], -1, np.int64)
        np.maximum.at(owner, dest, np.arange(dest.size))
        hit = np.flatnonzero(owner >= 0)
        out[:, hit] = src_flat[:, src[owner[hit]]]
        b0 = b1
    return out.reshape(img.shape)


class RandLocalPixelShuffled(RandomizableTransform, MapTransform):
    """Local pixel shuffling, the first corruption of the PCRL input views.

    From Zhou et al., "Preservational Learning Improves Self-supervised Medical Image Models by Reconstructing
    Diverse Contexts" (ICCV 2021), taken from Models Genesis. The official code
    (``pytorch/datasets/luna_pcrl_pretask.py`` of Luchixiang/PCRL), with probability 0.5 per view, draws
    ``num_block = 10000`` blocks with sizes ``randint(1, dim // 10)`` per axis (inclusive) at uniform positions
    ``randint(0, dim - size)``; each block's voxels, taken from the ORIGINAL (pre-shuffling) image, are shuffled and
    written into the output, a later block overwriting an earlier one where they overlap.

    Here the same, vectorised (10000 blocks on 64x64x32 take a few tens of ms), with all randomness from ``self.R``.
    The decision (``prob``) is drawn per key, independently, as the official code does per view. The maximum
    block side is ``floor(dim * max_block_fraction)``, at least 1 (the official code fails for sides < 10). With
    several channels, one permutation per block moves all channels together.

    Note: overlapping blocks copy values from the original image, so over the whole volume the multiset of values
    is only preserved where blocks do not overlap.

    Args:
        keys: the image keys, each ``[C, X, Y, Z]`` (numpy array or torch tensor; the output is float32 of the same
            type).
        prob: probability of shuffling each key.
        num_blocks: blocks per image.
        max_block_fraction: largest block side as a fraction of the image side (0.1: ``dim // 10``).
        allow_missing_keys: skip absent keys instead of raising.

    Raises:
        ValueError: a missing key, an input that is not ``[C, X, Y, Z]``, ``num_blocks`` < 0 or
            ``max_block_fraction`` outside (0, 1].
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        num_blocks: int = 10000,
        max_block_fraction: float = 0.1,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=prob)
        name = type(self).__name__
        if int(num_blocks) < 0:
            raise ValueError(f"{name}: num_blocks must be >= 0, got {num_blocks!r}.")
        if not 0 < float(max_block_fraction) <= 1:
            raise ValueError(f"{name}: max_block_fraction must be in (0, 1], got {max_block_fraction!r}.")
        self.num_blocks = int(num_blocks)
        self.max_block_fraction = float(max_block_fraction)

    def max_block_sizes(self, spatial_shape: Sequence[int]) -> np.ndarray:
        """Largest block side per axis: ``floor(dim * max_block_fraction)``, at least 1."""
        dims = np.asarray(spatial_shape, dtype=np.int64)
        return np.maximum(1, np.floor(dims * self.max_block_fraction + 1e-9).astype(np.int64))

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        """Draw the decision for one key, and if shuffling, the blocks (``self.starts``, ``self.sizes``: [N, 3])."""
        super().randomize(None)
        self.starts = self.sizes = None
        if self._do_transform:
            dims = np.asarray(spatial_shape, dtype=np.int64)
            self.sizes = self.R.randint(1, self.max_block_sizes(dims) + 1, size=(self.num_blocks, 3)).astype(np.int64)
            self.starts = self.R.randint(0, dims - self.sizes + 1).astype(np.int64).reshape(self.num_blocks, 3)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        name = type(self).__name__
        for key in _keys_present(self, d, name):
            _check_volume(d[key], key, name)
            self.randomize(d[key].shape[1:])
            img = _to_numpy_f32(d[key])
            if self._do_transform and self.num_blocks:
                img = _shuffle_blocks(img, self.starts, self.sizes, self.R)
            d[key] = _like(img, d[key])
        return d


def _paint_start(R: np.random.RandomState, dim: int, size: int, margin: int = 3) -> int:
    """``randint(margin, dim - size - margin)`` (inclusive) as in PCRL; ``randint(0, dim - size)`` if that is empty."""
    lo, hi = margin, dim - size - margin
    if hi < lo:
        lo, hi = 0, dim - size
    return int(R.randint(lo, hi + 1))


class RandPaintingd(RandomizableTransform, MapTransform):
    """In-painting or out-painting of the PCRL input views, the same kind for all keys of one sample.

    From Zhou et al., "Preservational Learning Improves Self-supervised Medical Image Models by Reconstructing
    Diverse Contexts" (ICCV 2021), taken from Models Genesis. The official code
    (``pytorch/datasets/luna_pcrl_pretask.py`` of Luchixiang/PCRL), with probability ``paint_rate = 0.9`` per
    sample, chooses in-painting with probability ``inpaint_rate = 0.2``, else out-painting, and applies that kind to
    both views (blocks drawn independently per view). Ranges below are inclusive, as Python's ``random.randint``:

    * in-painting: ``cnt = 5``; while ``cnt > 0 and rand < 0.95``: a block with sides ``randint(dim // 6, dim // 3)``
      at ``randint(3, dim - size - 3)`` per axis is filled with uniform noise; ``cnt -= 1``.
    * out-painting: the whole image is replaced by uniform noise, then a window of the original with sides
      ``dim - randint(3 * dim // 7, 4 * dim // 7)`` at ``randint(3, dim - size - 3)`` is restored; then up to 4
      more windows (``cnt = 4``, same loop as above).

    Noise: the official images are in [0, 1] and the noise is U[0, 1); our images are z-scored, so the noise is
    U[min, max) of that view's intensities just before painting (all channels together; a constant view gets its
    constant). Where a range is empty on small images, a block side is at least 1 and the position falls back to
    ``randint(0, dim - size)``. The last call's choice and boxes are kept in ``self.last_mode`` ("in", "out" or
    None) and ``self.last_boxes`` (key -> list of ``[3, 2]`` (start, end) arrays: painted blocks for in-painting,
    restored windows for out-painting), for inspection.

    Args:
        keys: the view keys, each ``[C, X, Y, Z]`` (numpy array or torch tensor; output float32 of the same type).
        prob: probability of painting a sample.
        inpaint_prob: probability of in-painting (else out-painting) when painting.
        allow_missing_keys: skip absent keys instead of raising.

    Raises:
        ValueError: a missing key, an input that is not ``[C, X, Y, Z]``, or ``inpaint_prob`` outside [0, 1].
    """

    def __init__(
        self,
        keys: KeysCollection = ("view1", "view2"),
        prob: float = 0.9,
        inpaint_prob: float = 0.2,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=prob)
        if not 0 <= float(inpaint_prob) <= 1:
            raise ValueError(f"{type(self).__name__}: inpaint_prob must be in [0, 1], got {inpaint_prob!r}.")
        self.inpaint_prob = float(inpaint_prob)
        self.last_mode: str | None = None
        self.last_boxes: dict = {}

    def randomize(self, data=None) -> None:
        """Draw whether to paint and, if so, the kind (shared by all keys); blocks are drawn per key later."""
        super().randomize(None)
        self.last_mode = None
        if self._do_transform:
            self.last_mode = "in" if self.R.rand() < self.inpaint_prob else "out"

    def _noise(self, shape, lo: float, hi: float) -> np.ndarray:
        if hi <= lo:
            return np.full(shape, lo, np.float32)
        noise = (lo + (hi - lo) * self.R.random_sample(shape)).astype(np.float32)
        return np.minimum(noise, np.nextafter(np.float32(hi), np.float32(lo)))  # stay below hi after rounding

    def _in_paint(self, img: np.ndarray, lo: float, hi: float) -> list:
        dims, boxes, cnt = img.shape[1:], [], 5
        while cnt > 0 and self.R.rand() < 0.95:
            sizes = [int(self.R.randint(max(1, n // 6), max(1, n // 6, n // 3) + 1)) for n in dims]
            starts = [_paint_start(self.R, n, s) for n, s in zip(dims, sizes)]
            sl = tuple(slice(a, a + s) for a, s in zip(starts, sizes))
            img[(slice(None),) + sl] = self._noise((img.shape[0], *sizes), lo, hi)
            boxes.append(np.array([[a, a + s] for a, s in zip(starts, sizes)], np.int64))
            cnt -= 1
        return boxes

    def _window(self, dims) -> tuple[list[int], list[int]]:
        sizes = [n - int(self.R.randint(3 * n // 7, 4 * n // 7 + 1)) for n in dims]
        return sizes, [_paint_start(self.R, n, s) for n, s in zip(dims, sizes)]

    def _out_paint(self, img: np.ndarray, lo: float, hi: float) -> list:
        orig = img.copy()
        img[...] = self._noise(img.shape, lo, hi)
        windows = [self._window(img.shape[1:])]  # the first window is always restored
        cnt = 4
        while cnt > 0 and self.R.rand() < 0.95:
            windows.append(self._window(img.shape[1:]))
            cnt -= 1
        boxes = []
        for sizes, starts in windows:
            sl = (slice(None),) + tuple(slice(a, a + s) for a, s in zip(starts, sizes))
            img[sl] = orig[sl]
            boxes.append(np.array([[a, a + s] for a, s in zip(starts, sizes)], np.int64))
        return boxes

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        name = type(self).__name__
        keys = _keys_present(self, d, name)
        for key in keys:
            _check_volume(d[key], key, name)
        self.randomize()
        self.last_boxes = {}
        if self.last_mode is None:
            return d
        for key in keys:
            img = _to_numpy_f32(d[key])
            lo, hi = float(img.min()), float(img.max())
            paint = self._in_paint if self.last_mode == "in" else self._out_paint
            self.last_boxes[key] = paint(img, lo, hi)
            d[key] = _like(img, d[key])
        return d


def _check_code(code) -> tuple[list[int], int]:
    c = np.asarray(code.detach().cpu() if isinstance(code, torch.Tensor) else code, dtype=np.float64).ravel()
    if c.shape != (7,) or not np.isin(c, (0, 1)).all() or c[3:].sum() != 1:
        raise ValueError(
            f"apply_spatial_code: code must be 7 binary values, flip bits at 0..2 and a one-hot rotation at 3..6, "
            f"got {c.tolist()}."
        )
    return [i for i in range(3) if c[i]], int(np.argmax(c[3:]))


def apply_spatial_code(array, code):
    """Apply the spatial transform a PCRL 7-d code describes to a channel-first array.

    The code (Zhou et al., ICCV 2021; official ``spatial_aug``): bits 0, 1, 2 flip spatial axes 0, 1, 2 (array axes
    -3, -2, -1), applied first; then a one-hot at 3 + k rotates by ``k * 90`` degrees in the plane of spatial axes
    (0, 1), as ``np.rot90(x, k, axes=(-3, -2))`` (for ``[C, X, Y, Z]``: array axes (1, 2)).

    Args:
        array: ``[..., C, X, Y, Z]`` numpy array or torch tensor (leading axes are untouched).
        code: 7 values (list, numpy array or tensor).

    Returns:
        The transformed array, float32, of the input's type (a MetaTensor gives a plain tensor).

    Raises:
        ValueError: an array with fewer than 4 dims, or a code that is not 3 binary flips + a one-hot rotation.
    """
    if not isinstance(array, (np.ndarray, torch.Tensor)) or array.ndim < 4:
        raise ValueError(
            f"apply_spatial_code: array must be channel-first [C, X, Y, Z], got "
            f"{tuple(array.shape) if hasattr(array, 'shape') else type(array).__name__}."
        )
    flips, k = _check_code(code)
    spatial = (-3, -2, -1)
    if isinstance(array, torch.Tensor):
        out = _plain(array).float()
        if flips:
            out = torch.flip(out, dims=[spatial[i] for i in flips])
        return torch.rot90(out, k, dims=(-3, -2)).contiguous()
    out = np.asarray(array, dtype=np.float32)
    if flips:
        out = np.flip(out, axis=tuple(spatial[i] for i in flips))
    return np.ascontiguousarray(np.rot90(out, k, axes=(-3, -2)))


class RandSpatialCoded(RandomizableTransform, MapTransform):
    """Random flips + 90-degree rotation of PCRL reconstruction targets, with the 7-d code of the transform.

    From Zhou et al., "Preservational Learning Improves Self-supervised Medical Image Models by Reconstructing
    Diverse Contexts" (ICCV 2021). The official ``spatial_aug`` (``pytorch/datasets/luna_pcrl_pretask.py`` of
    Luchixiang/PCRL) flips spatial axes 0, 1, 2 each with probability 0.5 (code bits 0, 1, 2), then rotates by
    ``k * 90`` degrees, k uniform in {0, 1, 2, 3}, in the plane of spatial axes (0, 1) (code one-hot at 3 + k); the
    network gets the code and must reconstruct the transformed image. The official code transforms the corrupted
    input; following the paper, we apply it to the original (un-augmented) crop kept as the target. See
    :func:`apply_spatial_code` for the exact operation.

    One transform is drawn per key, independently. An odd k swaps the X and Y sides, so keep them equal for
    batching (64x64x32 in PCRL).

    Args:
        keys: the keys to transform, each ``[C, X, Y, Z]`` (numpy array or torch tensor; output float32 of the same
            type; a MetaTensor gives a plain tensor).
        code_key_suffix: the code goes under ``f"{key}{code_key_suffix}"``: a float32 torch tensor of shape [7].
        allow_missing_keys: skip absent keys instead of raising.

    Raises:
        ValueError: a missing key or an input that is not ``[C, X, Y, Z]``.
    """

    def __init__(self, keys: KeysCollection, code_key_suffix: str = "_code", allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.code_key_suffix = code_key_suffix
        self.code = np.zeros(7, np.float32)

    def randomize(self, data=None) -> None:
        """Draw one transform: three flips, each with probability 0.5, then k uniform in {0, 1, 2, 3}."""
        flips = self.R.rand(3) < 0.5
        k = int(self.R.randint(4))
        self.code = np.zeros(7, np.float32)
        self.code[:3] = flips
        self.code[3 + k] = 1

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        name = type(self).__name__
        for key in _keys_present(self, d, name):
            _check_volume(d[key], key, name)
            self.randomize()
            d[key] = apply_spatial_code(d[key], self.code)
            d[f"{key}{self.code_key_suffix}"] = torch.as_tensor(self.code.copy())
        return d
