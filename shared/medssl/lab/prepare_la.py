"""Convert the public Left Atrium (LA) releases into the MSD-style folder that every medssl bundle reads.

Data: Xiong et al., "A global benchmark of algorithms for segmenting the left atrium from late
gadolinium-enhanced cardiac magnetic resonance imaging", Medical Image Analysis 67 (2021) -- the 2018
Atrial Segmentation Challenge; benchmark preprocessing and split of Yu et al., "Uncertainty-aware
Self-ensembling Model for Semi-supervised 3D Left Atrium Segmentation", MICCAI 2019 (UA-MT,
https://github.com/yulequan/UA-MT).

Two source layouts are recognised, per case (a case folder holding both is read from its h5 file):

- UA-MT h5: ``src/2018LA_Seg_Training Set/<ID>/mri_norm2.h5`` with datasets ``image`` (float32, z-scored,
  cropped) and ``label`` (uint8 0/1), axes x, y, z. Converted as they are (values bit-exact).
- Challenge nrrd: ``src/<ID>/lgemri.nrrd`` and ``src/<ID>/laendo.nrrd`` (also under
  ``src/2018LA_Seg_Training Set/``). The UA-MT preprocessing is applied: label = (laendo == 255); the
  image is z-scored over the whole volume, then x and y (not z) are cropped around the label's bounding
  box with a random margin of 10 to 19 voxels per side (see :func:`uamt_crop_box`).

``src`` may be the folder that holds ``2018LA_Seg_Training Set``, that folder itself, or a UA-MT checkout
(``src/data/2018LA_Seg_Training Set``). The output is::

    out/imagesTr/<ID>.nii.gz   float32, affine diag(spacing, 1)
    out/labelsTr/<ID>.nii.gz   uint8, 0 = background, 1 = left atrium
    out/dataset.json           "training" in train.list order, "test" in test.list order
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import h5py
import nrrd
import numpy as np
from medssl.data import DataError, check_headers, write_json, write_nifti
from tqdm import tqdm

__all__ = [
    "prepare_la",
    "find_cases",
    "read_split",
    "convert_h5_case",
    "convert_nrrd_case",
    "uamt_crop_box",
    "UAMT_TRAIN_IDS",
    "UAMT_TEST_IDS",
    "LA_SPACING",
    "UAMT_OUTPUT_SIZE",
    "TRAINING_SET_DIR",
]

logger = logging.getLogger(__name__)

TRAINING_SET_DIR = "2018LA_Seg_Training Set"
H5_NAME = "mri_norm2.h5"
IMAGE_NRRD = "lgemri.nrrd"
LABEL_NRRD = "laendo.nrrd"
LA_SPACING = 0.625  # mm, isotropic, for every case of the challenge
UAMT_OUTPUT_SIZE = (112, 112, 80)  # the patch size that UA-MT's crop keeps room for
UAMT_MARGIN = (10, 20)  # per-side crop margin, drawn uniformly from [10, 20) as np.random.randint(10, 20)

# The standard semi-supervised LA split (UA-MT ``data/train.list`` / ``data/test.list``), in list order.
UAMT_TRAIN_IDS: Tuple[str, ...] = tuple("""
    06SR5RBREL16DQ6M8LWS 0RZDK210BSMWAA6467LU 1D7CUD1955YZPGK8XHJX 1GU15S0GJ6PFNARO469W 1MHBF3G6DCPWHSKG7XCP
    23X6SY44VT9KFHR7S7OC 2XL5HSFSE93RMOJDRGR4 38CWS74285MFGZZXR09Z 3C2QTUNI0852XV7ZH4Q1 3DA0T2V6JJ2NLUAV6FWM
    4498CA6DZWELOXCBRYRF 45C45I6IXAFGNRO067W9 4CHFJGF6ZUM7CMZTNFQF 4EPVTT1HPA8U60CDUKXE 57SGAJMLCTCH92QUA0EE
    5BHTH9RHH3PQT913I59W 5FKQL4K14KCB72Y8YMC2 5HH0WPWIY06DLAFOBQ4M 5QFK2PMHNX7UALK52NNA 5UB5KFD2PK38Z4LS6W80
    6799D6LEBH3NSRV1KH27 78NJ5YFQF72BGC8RO51C 7FUCNXB39F78WTOP5K71 8GYK8A9MBRC9TV0FVSRA 8M99G0JLAXG9GLPV0O8G
    8RE90C8H5DKF4V6HO8UU 8ZG2TRZ81MAWHZPN9KKG 9DCM2IB45SK6YKQNYUQY 9DHWWP5Y66VDMPXISZ13 9DQYTIU00I4JC0OEOKQQ
    A11O45O3NAXWM7T2H8CH A4R1S23KR0KU2WSYHK2X A5RNNK0A891WUSC2V624 AT5CRO5JUDBWD4RUPXSQ BNK95S2SJXEGSW7VAKYU
    BXJWOUYP2J3EN4U92517 BYSRSI3H4YTWKMM3MADP BZUFJX66T0W6ZPVTL9DU CB5P5W7X310NIIVU7UZV CBIJFVZ5L9BS0LKWE8YL
    CCGAKN4EDT72KC8TTJ76 CLXFYOBQDCVXQ9P7YC07 CMPXO4J23G58J53Q98SZ CZPMV6KWZ4I7IJJP9FOK DLKXBV73A55ZTSZ0QQI2
    DQ5UYBGR5QP6L692QSG6 DYXSCIWHLSUOZIDDSZ40 E2ZMO66WGS74UKXTZPPQ EJ5V7SPR4961JWD6SS8V FGM5NIWN3URY4HF4WNUW
    GSC9KNY0VEZXFSGWNF25 HVE7DR3CUA2IM3RC6OMA HZZ4O0BRKF8S0YX3NNF7 I2VZ7N8H9QYNYT7ZZF1Y IDWWHGWJ5STOQXSDT6GU
    IIY6TYJMTJIZRIZLB9YW IJJY51YW3W4YJJ7DTVTK IQYKPTWXVV9H0IHB8YXC JEC6HJ7SQJXBKVREX03F JGFOLWJF7YCYD8DPHQNH
    K32FD6LRSUSSXGS1YUOX KM5RYAMP4P4ZP6XWP3Q2 KSNYHUBHHUJTYJ14UQZR LH4FVU3TQDEC87YGN6FL LJSDNMND9SHKM7Q4IRHJ
    MFTDVMBWFNQ3F5KHBRDR MJHV7F65TB2A76CQLOC3 MVKIPGBKTNSENNP1S4HB O5TSIKRD4AIB8K84WIR9 OIRDLE32TXZX942FVZMM
    P1OTI3IWJUIB5NRLULLH PVNXUK681N9BY14K4Z86 Q0MEX9ZIKAGJORSPLQ3Y Q7J0WYM695R9MA285ZW0 QZC1W0FNR19KJFLOCFLH
    R8ER97O9UUN77C02VE2J RSZY41MT2FGDKHWWL5L2 SN4LF8SGBSRQUPTDSX78 TDDI6L3Y0L9VVFP9MNFS UZUZZT2W9IUSHL6ASOX3
    """.split())
UAMT_TEST_IDS: Tuple[str, ...] = tuple("""
    UPT6DX9IQY9JAZ7HJKA7 UTBUJIWZMKP64E3N73YC ULHWPWKKLTE921LQLH1P V0MZOWJ6MU3RMRCV9EXR VDOF02M8ZHEAADFMS6NP
    VG4C826RAAKVMV9BQLVD VIXBEFTNVHZWKAKURJBN VQ2L3WM8KEVF6L44E6G9 WBG9WYZ1B25WDT5WAT8T WMDG2EFA6L2SNDZXIRU0
    WNPKE0W404QE9AELX1LR WSJB9P4JCXUVHBOYFVWL WW8F5CO4S4K5IM5Z7EXX X18LU5AOBNNDMLTA0JZL XYDLYJ5CS19FDBVLJIPI
    Y7ZU0B2APPF54WG6PDMF YDKD1HVHSME6NVMA8I39 Z9GMG63CJLL0VW893BB1 ZIJLJAVQV3FJ6JSQOH1E ZQPMJ4XEC5A4BISD45P1
    """.split())

DATASET_INFO = {
    "name": "LA",
    "description": "Left atrium segmentation in 3D late gadolinium-enhanced MRI (2018 Atrial Segmentation "
    "Challenge), UA-MT benchmark preprocessing: z-scored per volume, cropped around the atrium in x and y.",
    "reference": "Xiong et al., Medical Image Analysis 67 (2021) 101832; Yu et al., MICCAI 2019 (UA-MT), "
    "https://github.com/yulequan/UA-MT",
    "licence": "Research use only, under the terms of the 2018 Atrial Segmentation Challenge; cite both references.",
    "release": "2018",
    "tensorImageSize": "3D",
    "modality": {"0": "LGE-MRI"},
    "labels": {"0": "background", "1": "left atrium"},
}


# -- finding cases and the split ---------------------------------------------------------------------------


def _case_roots(src: Path) -> List[Path]:
    """Folders that may hold the case folders, most specific first."""
    roots = [src / TRAINING_SET_DIR, src, src / "data" / TRAINING_SET_DIR]
    return [r for r in roots if r.is_dir()]


def find_cases(src: os.PathLike | str) -> Tuple[Path, Dict[str, Tuple[str, Path]]]:
    """Find the LA cases under ``src`` in either layout.

    Returns:
        ``(root, cases)``: the folder holding the case folders, and ``{ID: ("h5", h5_path)}`` or
        ``{ID: ("nrrd", case_folder)}``, sorted by ID.

    Raises:
        DataError: ``src`` is missing, or no case of either layout is found under it.
    """
    src = Path(src).expanduser()
    if not src.is_dir():
        raise DataError(f"src {str(src)!r}: folder not found; expected the LA release ({TRAINING_SET_DIR}/<ID>/...).")
    for root in _case_roots(src):
        cases: Dict[str, Tuple[str, Path]] = {}
        for case in sorted(p for p in root.iterdir() if p.is_dir()):
            if (case / H5_NAME).is_file():
                cases[case.name] = ("h5", case / H5_NAME)
            elif (case / IMAGE_NRRD).is_file() or (case / LABEL_NRRD).is_file():
                cases[case.name] = ("nrrd", case)
        if cases:
            return root, cases
    raise DataError(
        f"{src}: no LA cases found; expected <ID>/{H5_NAME} (UA-MT release) or <ID>/{IMAGE_NRRD} + "
        f"<ID>/{LABEL_NRRD} (challenge release), in {str(src)!r} or in its {TRAINING_SET_DIR!r} folder."
    )


def _read_list(path: Path) -> List[str]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable split list ({e}).") from e
    return [s.strip() for s in lines if s.strip()]


def read_split(src: os.PathLike | str, root: Optional[os.PathLike | str] = None) -> Tuple[List[str], List[str], str]:
    """The train and test ID lists: from ``train.list`` / ``test.list`` files, else the standard UA-MT split.

    The list files are looked for in ``src``, ``root`` (the case folder), their parents and ``src/data``
    (the UA-MT layout); the first folder holding either file gives both lists (a missing one is empty).

    Returns:
        ``(train_ids, test_ids, origin)``, ``origin`` naming the folder or "built-in UA-MT split".

    Raises:
        DataError: a list file is unreadable, or an ID is in both lists.
    """
    src = Path(src).expanduser()
    candidates = [src, Path(root) if root is not None else src]
    candidates += [candidates[1].parent, src.parent, src / "data"]
    seen = set()
    for folder in candidates:
        key = os.path.abspath(folder)
        if key in seen:
            continue
        seen.add(key)
        train_file, test_file = folder / "train.list", folder / "test.list"
        if train_file.is_file() or test_file.is_file():
            train = _read_list(train_file) if train_file.is_file() else []
            test = _read_list(test_file) if test_file.is_file() else []
            both = sorted(set(train) & set(test))
            if both:
                raise DataError(f"{train_file} and {test_file}: {len(both)} IDs are in both lists, e.g. {both[:3]}.")
            return train, test, str(folder)
    return list(UAMT_TRAIN_IDS), list(UAMT_TEST_IDS), "built-in UA-MT split"


def _assign_split(found: Sequence[str], train: Sequence[str], test: Sequence[str], origin: str):
    present = set(found)
    train_ids = [i for i in dict.fromkeys(train) if i in present]
    test_ids = [i for i in dict.fromkeys(test) if i in present]
    for name, ids, kept in (("train", train, train_ids), ("test", test, test_ids)):
        missing = len(set(ids)) - len(kept)
        if missing:
            logger.warning(f"prepare_la: {missing} of {len(set(ids))} {name} IDs ({origin}) are not in src; skipped.")
    if not train_ids and not test_ids:
        logger.warning(f"prepare_la: no listed ID ({origin}) is in src; all {len(found)} cases go to training.")
        return sorted(found), []
    extra = sorted(present - set(train_ids) - set(test_ids))
    if extra:
        logger.warning(f"prepare_la: {len(extra)} cases in src are in no list ({origin}); appended to training.")
    return train_ids + extra, test_ids


# -- converting one case -----------------------------------------------------------------------------------


def _check_pair(image: np.ndarray, label: np.ndarray, image_src: Path, label_src: Path) -> None:
    if image.ndim != 3:
        raise DataError(f"{image_src}: expected a 3D image (x, y, z), got shape {tuple(image.shape)}.")
    if label.shape != image.shape:
        raise DataError(f"{label_src}: label shape {tuple(label.shape)} differs from image shape {image.shape}.")


def convert_h5_case(path: os.PathLike | str) -> Tuple[np.ndarray, np.ndarray]:
    """Read a UA-MT ``mri_norm2.h5``: returns ``(image float32, label uint8)``, both of shape (x, y, z).

    Raises:
        DataError: naming the file: unreadable, no ``image`` or ``label`` dataset, shapes not 3D or
            different, label values other than 0 and 1, or non-finite image values.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            for key in ("image", "label"):
                if key not in f:
                    raise DataError(
                        f"{path}: no {key!r} dataset (found keys {sorted(f.keys())}); expected a UA-MT "
                        "mri_norm2.h5 with 'image' and 'label'."
                    )
            image, label = np.asarray(f["image"][()]), np.asarray(f["label"][()])
    except DataError:
        raise
    except Exception as e:  # h5py raises OSError, KeyError, ... for broken files
        raise DataError(f"{path}: not a readable HDF5 file ({type(e).__name__}: {e}).") from e
    _check_pair(image, label, path, path)
    if not np.isfinite(image).all():
        raise DataError(f"{path}: 'image' has non-finite values.")
    if not np.array_equal(label, label.astype(bool)):
        raise DataError(f"{path}: 'label' values must be 0 or 1, found {np.unique(label)[:10].tolist()}.")
    return image.astype(np.float32, copy=False), label.astype(np.uint8, copy=False)


def uamt_crop_box(
    label: np.ndarray, rng: np.random.Generator, output_size: Sequence[int] = UAMT_OUTPUT_SIZE
) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """UA-MT's crop of a challenge volume, in x and y: ``((x0, x1), (y0, y1))`` to slice as ``[x0:x1, y0:y1]``.

    Around the label's bounding box ``[min, max]`` (inclusive) of each axis, with
    ``p = max(output_size - (max - min), 0) // 2``: ``x0 = max(min - m - p, 0)``, ``x1 = min(max + m + p, w)``,
    each margin ``m`` drawn from ``rng.integers(10, 20)`` in the order x0, x1, y0, y1. The original draws
    the margins from the unseeded global ``np.random`` (and z margins it never uses: z is kept whole), so
    crops of the public h5 release differ from any reproduction by a few voxels per side.

    Args:
        label: 3D binary array (x, y, z) with at least one foreground voxel.
        rng: the margin generator.
        output_size: the patch size the crop keeps room for (UA-MT: 112, 112, 80).
    """
    fg = np.nonzero(label)
    margins = rng.integers(UAMT_MARGIN[0], UAMT_MARGIN[1], size=4)
    box = []
    for axis in range(2):
        lo, hi = int(fg[axis].min()), int(fg[axis].max())
        pad = max(int(output_size[axis]) - (hi - lo), 0) // 2
        box.append(
            (max(lo - int(margins[2 * axis]) - pad, 0), min(hi + int(margins[2 * axis + 1]) + pad, label.shape[axis]))
        )
    return box[0], box[1]


def _nrrd_spacing(header: dict, path: Path) -> Tuple[float, float, float]:
    directions = header.get("space directions")
    if directions is not None:
        try:
            d = np.asarray(directions, dtype=np.float64)
            if d.ndim == 2 and d.shape[0] >= 3:
                spacing = np.linalg.norm(d[-3:], axis=1)
                if np.all(np.isfinite(spacing)) and np.all(spacing > 0):
                    return tuple(float(s) for s in spacing)
        except (TypeError, ValueError):
            pass
    spacings = header.get("spacings")
    if spacings is not None:
        s = np.asarray(spacings, dtype=np.float64)[-3:]
        if s.shape == (3,) and np.all(np.isfinite(s)) and np.all(s > 0):
            return tuple(float(v) for v in s)
    logger.warning(f"prepare_la: {path} has no usable spacing in its header; using {LA_SPACING} mm.")
    return (LA_SPACING,) * 3


def _read_nrrd(path: Path) -> Tuple[np.ndarray, dict]:
    if not path.is_file():
        raise DataError(f"{path}: file not found (a challenge case needs {IMAGE_NRRD} and {LABEL_NRRD}).")
    try:
        return nrrd.read(str(path))
    except Exception as e:  # pynrrd raises NRRDError, OSError, ValueError, ...
        raise DataError(f"{path}: not a readable NRRD file ({type(e).__name__}: {e}).") from e


def convert_nrrd_case(
    case_dir: os.PathLike | str, seed: int = 0
) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """Apply the UA-MT preprocessing to a challenge case ``case_dir/{lgemri,laendo}.nrrd``.

    label = (laendo == 255); image z-scored over the whole volume (float64 mean and std, then float32),
    then both cropped in x and y by :func:`uamt_crop_box` with ``np.random.default_rng([seed, crc32(ID)])``,
    so a conversion is reproducible (``ID`` = the folder name).

    Returns:
        ``(image float32, label uint8, spacing)``, the spacing (mm) from the NRRD header.

    Raises:
        DataError: naming the file: missing or unreadable, not 3D, shapes differ, constant image, empty label.
    """
    case_dir = Path(case_dir)
    image_path, label_path = case_dir / IMAGE_NRRD, case_dir / LABEL_NRRD
    image, header = _read_nrrd(image_path)
    laendo, _ = _read_nrrd(label_path)
    _check_pair(image, laendo, image_path, label_path)
    label = (laendo == 255).astype(np.uint8)
    if not label.any():
        raise DataError(f"{label_path}: empty label (no voxel == 255); cannot crop around the atrium.")
    std = np.std(image)
    if not np.isfinite(std) or std == 0:
        raise DataError(f"{image_path}: image is constant or non-finite (std = {std}); cannot z-score it.")
    image = ((image - np.mean(image)) / std).astype(np.float32)
    rng = np.random.default_rng([int(seed), zlib.crc32(case_dir.name.encode())])
    (x0, x1), (y0, y1) = uamt_crop_box(label, rng)
    return image[x0:x1, y0:y1], label[x0:x1, y0:y1], _nrrd_spacing(header, image_path)


# -- the conversion ----------------------------------------------------------------------------------------


def _is_complete(image_path: Path, label_path: Path) -> bool:
    if not (image_path.is_file() and label_path.is_file()):
        return False
    try:
        check_headers(image_path, label_path)
    except DataError:
        return False
    return True


def prepare_la(src: os.PathLike | str, out: os.PathLike | str, overwrite: bool = False, seed: int = 0) -> Path:
    """Convert an LA release at ``src`` into ``out/{imagesTr,labelsTr}/<ID>.nii.gz`` and ``out/dataset.json``.

    Layouts and preprocessing are described in the module docstring. The split is read from
    ``train.list`` / ``test.list`` (see :func:`read_split`), else the standard UA-MT 80/20 split is used.
    Listed IDs absent from ``src`` are dropped (with a warning); IDs in no list are appended to training
    (warning); when no listed ID is present, all cases, sorted, go to training.

    Every file is written atomically, so an interrupted run can be re-run: a case whose two output files
    exist with consistent headers is skipped unless ``overwrite``; ``dataset.json`` is written last, and
    only when its content changes.

    Args:
        src: the release folder (see module docstring).
        out: the output dataset folder (created).
        overwrite: re-convert cases whose output files already exist.
        seed: seeds the random crop margins of the challenge (nrrd) layout; unused for h5 cases.

    Returns:
        ``out`` as a Path.

    Raises:
        DataError: naming the file or folder: missing ``src``, no cases found, an unreadable or inconsistent
            case (see :func:`convert_h5_case`, :func:`convert_nrrd_case`), a bad split list.
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    root, cases = find_cases(src)
    train, test, origin = read_split(src, root)
    train_ids, test_ids = _assign_split(list(cases), train, test, origin)

    written = skipped = 0
    for case_id in tqdm(train_ids + test_ids, desc="prepare_la", unit="case"):
        layout, path = cases[case_id]
        image_out, label_out = out / "imagesTr" / f"{case_id}.nii.gz", out / "labelsTr" / f"{case_id}.nii.gz"
        if not overwrite and _is_complete(image_out, label_out):
            skipped += 1
            continue
        if layout == "h5":
            image, label = convert_h5_case(path)
            spacing = (LA_SPACING,) * 3
        else:
            image, label, spacing = convert_nrrd_case(path, seed=seed)
        affine = np.diag([*spacing, 1.0])
        write_nifti(image, affine, image_out, dtype=np.float32)
        write_nifti(label, affine, label_out, dtype=np.uint8)
        written += 1

    def entry(case_id: str) -> Dict[str, str]:
        return {"image": f"imagesTr/{case_id}.nii.gz", "label": f"labelsTr/{case_id}.nii.gz"}

    layouts = sorted({cases[i][0] for i in cases})
    datalist = dict(DATASET_INFO)
    datalist.update(
        {
            "source_layout": "+".join(layouts),
            "split": origin if origin.startswith("built-in") else "train.list/test.list",
            "numTraining": len(train_ids),
            "numTest": len(test_ids),
            "training": [entry(i) for i in train_ids],
            "test": [entry(i) for i in test_ids],
        }
    )
    if "nrrd" in layouts:
        datalist["crop_seed"] = int(seed)
    json_path = out / "dataset.json"
    _write_json_if_changed(datalist, json_path)
    logger.info(
        f"prepare_la: {len(train_ids)} training + {len(test_ids)} test cases ({'+'.join(layouts)} layout, split: "
        f"{origin}) -> {out}: {written} converted, {skipped} already complete."
    )
    return out


def _write_json_if_changed(obj: dict, path: Path) -> None:
    if path.is_file():
        try:
            if json.loads(path.read_text()) == obj:
                return
        except (OSError, ValueError):
            pass
    write_json(obj, path)
