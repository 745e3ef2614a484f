"""Finding and running the medssl bundles from Python (the demo and benchmarks use this)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["bundle_path", "run_bundle", "require_weights", "default_index", "cache_dir", "BUNDLE_NAMES"]

BUNDLE_NAMES = ("la_seg_finetune", "cvrl_semisup", "simcvd_distill", "pcrl_pretrain", "spark_pretrain")
REPO_ROOT = Path(__file__).resolve().parents[2]  # shared/medssl/bundle.py -> the checkout


# where an installed medssl (no checkout) finds the released bundles unless told otherwise
PUBLISHED_INDEX = "https://github.com/medssl/medssl/releases/latest/download/bundle_index.json"


def default_index() -> str:
    """The bundle index to pull from: ``$MEDSSL_INDEX`` (a path or URL), else the checkout's ``bundle_index.json``
    (its release zips are committed under ``releases/``: pulling needs no network), else, for medssl installed from
    a wheel, the published index :data:`PUBLISHED_INDEX`."""
    if os.environ.get("MEDSSL_INDEX"):
        return os.environ["MEDSSL_INDEX"]
    local = REPO_ROOT / "bundle_index.json"
    return str(local) if local.is_file() else PUBLISHED_INDEX


def cache_dir() -> Path:
    """Where pulled bundles are kept: ``$MEDSSL_HOME`` or ``~/.cache/medssl`` (``bundles/NAME_vVERSION``)."""
    return Path(os.environ.get("MEDSSL_HOME") or Path.home() / ".cache" / "medssl")


def require_weights(path: str) -> str:
    """``path`` if that weights file exists. Otherwise a message naming it and the two ways to get weights; under
    ``python -m monai.bundle run`` it ends the process with that message as its last line (MONAI would bury any
    exception raised inside a config expression under ``Failed to evaluate ConfigExpression``), elsewhere it is a
    ``FileNotFoundError``. The ``run`` of inference.json and evaluate.json is ``require_weights(...) and
    @evaluator.run()``: the evaluator (and the checks of the input files) is built first, so bad input is reported
    before missing weights, and nothing is checked at instantiation (MONAI's ``check_properties`` builds the
    handlers of a bundle without weights).
    """
    if os.path.isfile(path):
        return path
    models = Path(path).parent
    root = models.parent
    name = root.name.split("_v")[0] if root.name else "NAME"
    message = (
        f"no weights at {path}. Either train them (python -m monai.bundle run --config_file "
        f"{root / 'configs' / 'train.json'} --bundle_root {root} --dataset_dir YOUR_DATA) or pull the released bundle "
        f"with its weights (python -m medssl pull {name} --index bundle_index.json; or python -m medssl segment SCAN, "
        "which pulls it for you) and pass --bundle_root to that folder."
    )
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) == "monai.bundle.__main__":
        raise SystemExit(f"error: {message}")
    raise FileNotFoundError(message)


def bundle_path(name: str, bundles_dir: Optional[os.PathLike | str] = None) -> Path:
    """Folder of bundle ``name``: under ``bundles_dir``, ``$MEDSSL_BUNDLES``, ``./bundles`` or the checkout's.

    Raises:
        FileNotFoundError: no such bundle in any of those places (they are listed).
    """
    here = REPO_ROOT / "bundles"
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
