"""A small synthetic left-atrium-like dataset, in the layout of :mod:`medssl.lab.prepare_la`, for demos and tests.

Each case is :func:`medssl.synthetic.synthesize_case` (what it imitates is said there), drawn from
``np.random.default_rng([seed, case_index])``: the same arguments give byte-identical volumes, and the default set
is written in about a second.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict

import numpy as np
from medssl.data import write_json, write_nifti
from medssl.synthetic import SAMPLE_SPACING, _check_int, parse_shape, synthesize_case

__all__ = ["sample_data", "synthesize_case", "parse_shape", "SAMPLE_SPACING"]

logger = logging.getLogger(__name__)


def sample_data(
    out: os.PathLike | str,
    num_cases: int = 6,
    shape: Any = (96, 96, 64),
    seed: int = 0,
    num_test: int = 2,
    tubes: bool = True,
) -> Path:
    """Write a synthetic LA-like dataset: ``out/{imagesTr,labelsTr}/sample_XXX.nii.gz`` and ``out/dataset.json``.

    ``"training"`` lists the first ``num_cases - num_test`` cases, ``"test"`` the last ``num_test``; images
    are float32, labels uint8 (1 = atrium and veins), affine diag(0.625, 0.625, 0.625, 1). Files are written
    atomically (existing ones replaced), ``dataset.json`` last.

    Args:
        out: output dataset folder (created).
        num_cases: number of cases in all.
        shape: spatial shape (x, y, z): list, tuple or ``"96,96,64"``; each side >= 16.
        seed: dataset seed; case ``i`` is drawn from ``default_rng([seed, i])``.
        num_test: how many of the cases form the ``"test"`` list.
        tubes: draw the vein-like tubes (see :func:`synthesize_case`).

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: a bad ``shape``, or not ``num_cases > num_test >= 0``.
    """
    shape = parse_shape(shape)
    num_cases, num_test = _check_int("num_cases", num_cases), _check_int("num_test", num_test)
    seed = _check_int("seed", seed)
    if not num_cases > num_test >= 0:
        raise ValueError(
            f"need num_cases > num_test >= 0 (at least one training case), got num_cases={num_cases}, "
            f"num_test={num_test}."
        )
    out = Path(out).expanduser()
    affine = np.diag([SAMPLE_SPACING] * 3 + [1.0])
    entries, fg = [], []
    for i in range(num_cases):
        image, label = synthesize_case(shape, seed=seed, index=i, tubes=tubes)
        case_id = f"sample_{i:03d}"
        write_nifti(image, affine, out / "imagesTr" / f"{case_id}.nii.gz", dtype=np.float32)
        write_nifti(label, affine, out / "labelsTr" / f"{case_id}.nii.gz", dtype=np.uint8)
        entries.append({"image": f"imagesTr/{case_id}.nii.gz", "label": f"labelsTr/{case_id}.nii.gz"})
        fg.append(float(label.mean()))
    n_train = num_cases - num_test
    datalist: Dict[str, Any] = {
        "name": "LA-like synthetic sample",
        "description": "Synthetic left-atrium-like volumes (ellipsoidal atrium with pulmonary-vein-like tubes, "
        "dark rim, bias field, Rician noise, z-scored), written by medssl.lab.sample_data for demos and tests.",
        "reference": "none (synthetic); layout of medssl.lab.prepare_la",
        "licence": "Apache-2.0 (generated data)",
        "tensorImageSize": "3D",
        "modality": {"0": "LGE-MRI"},
        "labels": {"0": "background", "1": "left atrium"},
        "synthetic": {"seed": seed, "shape": list(shape), "num_cases": num_cases, "tubes": bool(tubes)},
        "numTraining": n_train,
        "numTest": num_test,
        "training": entries[:n_train],
        "test": entries[n_train:],
    }
    write_json(datalist, out / "dataset.json")
    logger.info(
        f"sample_data: {num_cases} cases of shape {shape} ({n_train} training, {num_test} test) -> {out}; "
        f"foreground {min(fg):.1%}-{max(fg):.1%} of voxels."
    )
    return out
