"""Finding and running the medssl bundles from Python (the demo and benchmarks use this)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["bundle_path", "run_bundle", "BUNDLE_NAMES"]

BUNDLE_NAMES = ("la_seg_finetune", "cvrl_semisup", "simcvd_distill", "pcrl_pretrain")


def bundle_path(name: str, bundles_dir: Optional[os.PathLike | str] = None) -> Path:
    """Folder of bundle ``name``: under ``bundles_dir``, ``$MEDSSL_BUNDLES``, ``./bundles`` or the checkout's.

    Raises:
        FileNotFoundError: no such bundle in any of those places (they are listed).
    """
    here = Path(__file__).resolve().parents[2] / "bundles"  # shared/medssl/bundle.py -> repo/bundles
    candidates = [Path(p) for p in (bundles_dir, os.environ.get("MEDSSL_BUNDLES")) if p] + [Path("bundles"), here]
    for root in candidates:
        if (root / name / "configs" / "metadata.json").is_file():
            return (root / name).resolve()
    raise FileNotFoundError(
        f"bundle {name!r} not found in {[str(c) for c in candidates]}; run from the medssl checkout, or pass "
        "--bundles_dir / set MEDSSL_BUNDLES to the folder holding the bundles."
    )


def run_bundle(
    name: str, configs: Sequence[str] = ("train",), bundles_dir: Optional[os.PathLike | str] = None, **overrides: Any
) -> None:
    """Run ``python -m monai.bundle run`` in this process on ``configs`` (overlaid in order) of bundle ``name``.

    ``overrides`` are the bundle's config ids (``dataset_dir``, ``max_iterations``, ``bundle_root``, ...).
    """
    from monai.bundle import run

    root = bundle_path(name, bundles_dir)
    files = [str(root / "configs" / f"{c}.json") for c in configs]
    run(config_file=files if len(files) > 1 else files[0], **overrides)
