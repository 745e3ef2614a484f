"""``python -m medssl segment SCAN [SCAN ...]``: a clinician's one-liner around a bundle's ``inference.json``.

Takes NIfTI files and/or folders of them, pulls the released bundle (checksum-verified; from the checkout's committed
``releases/`` by default, no network) unless a bundle folder with weights is given, segments every scan on the GPU if
there is one (else the CPU, bf16 where it has native support), writes ``<name>_seg.nii.gz`` (uint8, the scan's own
shape and affine) into ``--out`` and prints the left atrium's volume in mL per scan. A scan in any units, orientation
and spacing is a normal input: the bundle's preprocessing handles it and its postprocessing inverts it.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import nibabel as nib
import numpy as np
from medssl.bundle import cache_dir, default_index, require_weights
from medssl.data import NIFTI_SUFFIXES, DataError, as_bool, check_headers

__all__ = ["segment", "collect_scans", "segmentation_volume_ml", "print_table"]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def collect_scans(scans: Sequence[os.PathLike | str]) -> List[Path]:
    """The NIfTI files named by ``scans`` (files, or folders whose ``*.nii``/``*.nii.gz`` are taken, sorted), each
    checked from its header (readable NIfTI, 3D, sane affine).

    Raises:
        DataError: nothing given, a missing path, a file that is not NIfTI, a folder without NIfTI files, a 2D or
            4D image, or two scans that would write the same ``<name>_seg.nii.gz``.
    """
    if not scans:
        raise DataError("segment: no scans given; pass NIfTI files (.nii/.nii.gz) or folders of them.")
    files: List[Path] = []
    for s in scans:
        p = Path(s).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(NIFTI_SUFFIXES))
            if not found:
                raise DataError(f"{p}: folder holds no NIfTI files (*.nii, *.nii.gz).")
            files += found
        elif not p.exists():
            raise DataError(f"{p}: file not found.")
        elif not p.name.endswith(NIFTI_SUFFIXES):
            raise DataError(
                f"{p}: not a NIfTI file (expected .nii or .nii.gz; convert DICOM series first, e.g. dcm2niix)."
            )
        else:
            files.append(p)
    seen: Dict[str, Path] = {}
    for f in files:
        check_headers(f)
        key = _stem(f)
        if key in seen and seen[key].resolve() != f.resolve():
            raise DataError(f"{f} and {seen[key]} would both be written as {key}_seg.nii.gz; rename one of them.")
        seen[key] = f
    return list(dict.fromkeys(files))


def segmentation_volume_ml(path: os.PathLike | str, label: int = 1) -> float:
    """Volume of ``label`` in a label map, in mL (voxel count x voxel volume from the affine)."""
    img = nib.load(str(path))
    voxels = int((np.asanyarray(img.dataobj) == label).sum())
    return voxels * abs(float(np.linalg.det(img.affine[:3, :3]))) / 1000.0


def _resolve_bundle(bundle: str, index: Optional[str], bundle_dir: Optional[str]) -> Path:
    """A bundle folder (configs/inference.json and models/model.pt), or a released bundle's name to pull."""
    p = Path(bundle).expanduser()
    if (p / "configs" / "inference.json").is_file():
        return p.resolve()
    from medssl.release import pull

    target = Path(bundle_dir) if bundle_dir else cache_dir() / "bundles"
    return pull(bundle, bundle_dir=str(target), index=index or default_index())


def segment(
    scans: Sequence[os.PathLike | str],
    bundle: str = "la_seg_finetune",
    out: os.PathLike | str = "segmentations",
    index: Optional[str] = None,
    bundle_dir: Optional[str] = None,
    device: Optional[str] = None,
    largest_component: Any = True,
    progress: bool = True,
    overrides: Optional[Dict[str, Any]] = None,
) -> List[Dict[str, Any]]:
    """Segment ``scans`` with a bundle; returns ``[{"scan", "segmentation", "volume_ml", "seconds"}]``.

    Args:
        scans: NIfTI files and/or folders of them.
        bundle: a released bundle's name (pulled into ``bundle_dir``, default ``$MEDSSL_HOME/bundles`` or
            ``~/.cache/medssl/bundles``, from ``index``, default the checkout's ``bundle_index.json``) or the folder
            of a bundle that has ``models/model.pt`` (one you trained).
        out: folder for ``<name>_seg.nii.gz``; each file appears complete (written aside, then renamed).
        device: ``cpu``, ``cuda``, ``cuda:1``...; default: the GPU if there is one.
        largest_component: keep only the largest connected component of the atrium (default; ``False`` keeps all).
        progress: show a progress bar (on a terminal).
        overrides: other ``inference.json`` ids to set (``sw_overlap``, ``sw_batch_size``, ``amp``...).

    Raises:
        DataError: bad scans (see :func:`collect_scans`).
        medssl.release.ReleaseError: the bundle cannot be pulled or fails its checksum.
        FileNotFoundError: the bundle has no weights.
    """
    from ignite.engine import Events
    from monai.bundle import ConfigParser
    from tqdm import tqdm

    files = collect_scans(scans)
    root = _resolve_bundle(bundle, index, bundle_dir)
    require_weights(str(root / "models" / "model.pt"))
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    parser = ConfigParser()
    parser.read_meta(str(root / "configs" / "metadata.json"))
    parser.read_config(str(root / "configs" / "inference.json"))
    with tempfile.TemporaryDirectory(dir=out, prefix=".segment.") as tmp:
        settings = {
            "bundle_root": str(root),
            "datalist": [str(f) for f in files],
            "output_dir": tmp,
            "largest_component": as_bool(largest_component, "largest_component"),
            **(overrides or {}),
        }
        if device:
            settings["device"] = f"$torch.device({str(device)!r})"
        for k, v in settings.items():
            parser[k] = v
        parser.get_parsed_content("initialize")
        evaluator = parser.get_parsed_content("evaluator")
        stamps: List[float] = [time.perf_counter()]
        bar = tqdm(total=len(files), desc="segment", unit="scan", disable=not progress or None)
        evaluator.add_event_handler(
            Events.ITERATION_COMPLETED, lambda _: (stamps.append(time.perf_counter()), bar.update(1))
        )
        try:
            evaluator.run()
        finally:
            bar.close()
        results = []
        for i, f in enumerate(files):
            written = Path(tmp) / f"{_stem(f)}_seg.nii.gz"
            if not written.is_file():
                raise RuntimeError(f"{f}: the bundle wrote no segmentation ({written.name} missing in {tmp}).")
            target = out / written.name
            os.replace(written, target)
            results.append(
                {
                    "scan": str(f),
                    "segmentation": str(target),
                    "volume_ml": round(segmentation_volume_ml(target), 2),
                    "seconds": round(stamps[i + 1] - stamps[i], 2) if i + 1 < len(stamps) else None,
                }
            )
    return results


def print_table(results: Sequence[Dict[str, Any]]) -> None:
    """One line per scan: the segmentation written, the atrium volume in mL, seconds."""
    width = max([len(Path(r["scan"]).name) for r in results] + [4])
    print(f"{'scan':<{width}}  {'left atrium (mL)':>16}  {'seconds':>7}  segmentation")
    for r in results:
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        print(f"{Path(r['scan']).name:<{width}}  {r['volume_ml']:>16.1f}  {seconds:>7}  {r['segmentation']}")
