"""A synthetic left-atrium-like case (image and label), identical on every machine: the volume behind
:mod:`medssl.lab.sample_data` (the sample set) and :mod:`medssl.clinic.runtime_choice` (the runtime probe).

Each case imitates a UA-MT-preprocessed LGE-MRI crop: an ellipsoidal atrium (random centre, radii and
tilt, its surface deformed by a low-frequency random field) with three or four pulmonary-vein-like tubes
(curved, tapering cylinders) leaving it, all labelled 1; a bright blood pool inside, a dark myocardial rim
around it, a textured background with an unlabelled bright distractor (another cardiac chamber), partial
volume blur, a smooth multiplicative bias field, Rician noise, and finally the z-score normalisation of the
LA benchmark (float32). Foreground is about 5-15 % of the voxels, as in the real crops.

Everything is drawn from ``np.random.default_rng([seed, case_index])`` with vectorised numpy/scipy, so the
same arguments give byte-identical volumes.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, Sequence, Tuple

import numpy as np
from scipy import ndimage

__all__ = ["synthesize_case", "parse_shape", "SAMPLE_SPACING", "MIN_SIDE"]

SAMPLE_SPACING = 0.625  # mm, as the LA data
MIN_SIDE = 16


def parse_shape(shape: Any) -> Tuple[int, int, int]:
    """``shape`` as a tuple of 3 ints, each >= 16; accepts a list, a tuple or a string such as ``"96,96,64"``.

    Raises:
        ValueError: not 3 positive integers of at least 16.
    """
    raw = shape
    if isinstance(shape, str):
        shape = [s for s in shape.strip().strip("()[]").replace("x", ",").split(",") if s.strip()]
        try:
            shape = [int(s) for s in shape]
        except ValueError:
            raise ValueError(f"shape must be 3 integers such as '96,96,64', got {raw!r}.") from None
    try:
        values = list(shape)
    except TypeError:
        raise ValueError(f"shape must be 3 integers (list, tuple or '96,96,64'), got {raw!r}.") from None
    if len(values) != 3 or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in values):
        raise ValueError(f"shape must be 3 integers (list, tuple or '96,96,64'), got {raw!r}.")
    if min(values) < MIN_SIDE:
        raise ValueError(f"every side of shape must be >= {MIN_SIDE}, got {tuple(int(v) for v in values)}.")
    return tuple(int(v) for v in values)


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    return int(value)


# -- random fields and geometry ----------------------------------------------------------------------------


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], cells: int) -> np.ndarray:
    """Zero-mean, unit-std random field with features about ``side / cells`` wide (separable Gaussian bumps)."""
    n = cells + 2  # one bump beyond each border, so the field does not fade there
    coeff = rng.standard_normal((n, n, n))
    weights = []
    for side in shape:
        x = np.linspace(-1.0, cells + 1.0, side) if side > 1 else np.zeros(1)
        w = np.exp(-0.5 * ((x[:, None] - np.arange(n)[None, :] + 0.5) / 0.7) ** 2)
        weights.append(w)
    field = np.tensordot(weights[0], coeff, axes=(1, 0))  # X n n
    field = np.tensordot(field, weights[1], axes=(1, 1))  # X n Y
    field = np.tensordot(field, weights[2], axes=(1, 1))  # X Y Z
    field -= field.mean()
    return field / max(float(field.std()), 1e-8)


def _rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    """Rotation matrix about a random axis by an angle uniform in [-max_angle, max_angle] (Rodrigues)."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(-max_angle, max_angle)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def _ellipsoid_distance(shape: Sequence[int], centre: np.ndarray, radii: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Normalised ellipsoid radius of every voxel (1 on the surface); the ellipsoid's axes are ``rot``'s columns."""
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    d2 = 0.0
    for i in range(3):  # coordinate along the ellipsoid's axis i
        q = sum(rot[j, i] * (grids[j].astype(np.float64) - centre[j]) for j in range(3))
        d2 = d2 + (q / radii[i]) ** 2
    return np.sqrt(d2)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of ``mask`` (one atrium, no islands), or ``mask`` when empty."""
    components, n = ndimage.label(mask)
    if n <= 1:
        return mask
    return components == 1 + int(np.argmax(np.bincount(components.ravel())[1:]))


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _vein_tubes(rng, shape, centre, radii, rot, num: int) -> np.ndarray:
    """Binary mask of ``num`` curved, tapering tubes that start inside the atrium and leave it laterally.

    As the pulmonary veins: two on each side (x), posterior (-y), one upper and one lower (z); with three
    tubes one of the four is left out. Distances to all centre lines come from one Euclidean distance
    transform; each voxel takes the radius of its nearest centre-line point.
    """
    shape = np.asarray(shape)
    scale = float(shape.min())
    quadrants = [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    chosen = rng.permutation(4)[:num]
    centreline = np.zeros(tuple(shape), dtype=bool)
    radius_at = np.zeros(tuple(shape), dtype=np.float64)
    for q in chosen:
        side, up = quadrants[q]
        u = np.array([side * 1.0, rng.uniform(-0.8, -0.3), up * rng.uniform(0.3, 0.7)])
        u /= np.linalg.norm(u)
        p0 = centre + rot @ (0.5 * radii * u)  # inside the atrium, so the tube is connected to it
        w = p0 - centre
        w /= np.linalg.norm(w)
        length = 0.5 * float(np.linalg.norm(radii * u)) + rng.uniform(0.25, 0.4) * scale
        bend = rng.standard_normal(3)
        bend -= bend.dot(w) * w  # perpendicular to the tube's direction
        bend *= rng.uniform(0.1, 0.3) * length / max(np.linalg.norm(bend), 1e-8)
        p2 = p0 + length * w + 0.5 * bend
        p1 = p0 + 0.5 * length * w + bend
        r0 = max(rng.uniform(0.05, 0.07) * scale, 1.0 / 0.7)  # >= 1 voxel all along: a 6-connected tube
        pts = _bezier(p0, p1, p2, int(4 * length) + 2)
        radii_along = r0 * np.linspace(1.0, 0.7, len(pts))
        idx = np.round(pts).astype(int)
        outside = ~np.all((idx >= 0) & (idx < shape), axis=1)
        stop = int(np.argmax(outside)) if outside.any() else len(idx)  # cut where it leaves the volume
        idx, radii_along = idx[:stop], radii_along[:stop]
        centreline[tuple(idx.T)] = True
        radius_at[tuple(idx.T)] = np.maximum(radius_at[tuple(idx.T)], radii_along)
    if not centreline.any():
        return np.zeros(tuple(shape), dtype=bool)
    dist, nearest = ndimage.distance_transform_edt(~centreline, return_indices=True)
    return dist <= radius_at[tuple(nearest)]


def synthesize_case(
    shape: Any = (96, 96, 64), seed: int = 0, index: int = 0, tubes: bool = True
) -> Tuple[np.ndarray, np.ndarray]:
    """One synthetic LA-like case, drawn from ``np.random.default_rng([seed, index])``.

    Args:
        shape: spatial shape (x, y, z); see :func:`parse_shape`.
        seed: dataset seed.
        index: case index within the dataset.
        tubes: add the vein-like tubes (with False the label is the deformed ellipsoid alone; the atrium is
            drawn before the tubes, so it is the same as with True).

    Returns:
        ``(image, label)``: float32 z-scored image and uint8 0/1 label, both of ``shape``.
    """
    shape = parse_shape(shape)
    rng = np.random.default_rng([_check_int("seed", seed), _check_int("index", index)])
    dims = np.asarray(shape, dtype=np.float64)

    # atrium: tilted ellipsoid with a deformed surface
    centre = dims / 2 + rng.uniform(-0.08, 0.08, 3) * dims
    radii = rng.uniform(0.22, 0.3, 3) * dims
    rot = _rotation(rng, np.deg2rad(30))
    deform = _smooth_field(rng, shape, cells=3)
    label = _largest_component(_ellipsoid_distance(shape, centre, radii, rot) + 0.1 * deform < 1.0)

    num_tubes = int(rng.integers(3, 5))
    tube_rng = np.random.default_rng([int(seed), int(index), 1])  # own stream: tubes=False leaves the rest alike
    if tubes:
        label = _largest_component(label | _vein_tubes(tube_rng, shape, centre, radii, rot, num_tubes))

    # a bright, unlabelled neighbour chamber (ventricle / aorta-like), offset from the atrium
    offset = rng.standard_normal(3)
    offset *= 0.45 * dims / np.linalg.norm(offset)
    other = _ellipsoid_distance(shape, centre + offset, rng.uniform(0.15, 0.22, 3) * dims, _rotation(rng, np.pi))

    wall = max(rng.uniform(0.02, 0.035) * dims.min() + 0.5, 1.0)  # myocardium, at least one voxel
    outside_dist = ndimage.distance_transform_edt(~label)
    rim = (outside_dist > 0) & (outside_dist <= wall)

    image = 0.32 + 0.07 * _smooth_field(rng, shape, cells=10) + 0.04 * _smooth_field(rng, shape, cells=24)
    image[other < 1.0] = 0.62 + rng.uniform(-0.05, 0.05)
    image[rim] = 0.12
    image[label] = 0.85 + 0.04 * _smooth_field(rng, shape, cells=6)[label]
    image = ndimage.gaussian_filter(image, sigma=0.7)  # partial volume at the boundaries
    image *= np.exp(0.2 * _smooth_field(rng, shape, cells=2))  # coil bias field
    sigma = rng.uniform(0.03, 0.06)
    noise = rng.standard_normal((2, *shape))
    image = np.sqrt((image + sigma * noise[0]) ** 2 + (sigma * noise[1]) ** 2)  # Rician magnitude noise
    image = ((image - image.mean()) / image.std()).astype(np.float32)
    return image, label.astype(np.uint8)
