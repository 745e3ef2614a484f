"""``python -m medssl segment SCAN [SCAN ...]``: a clinician's one-liner around a bundle's ``inference.json``.

Takes NIfTI files, folders of them, and DICOM (a folder holding one series, a study folder holding several series and
other files, or a ``.zip`` of either; see :mod:`medssl.clinic.dicom`). Pulls the released bundle (checksum-verified;
from the checkout's committed ``releases/`` by default, no network) unless a bundle folder with weights is given,
segments every scan on the GPU if there is one (else the CPU, bf16 where it has native support) and writes into
``--out``:

- ``<name>_seg.nii.gz``: uint8 label map in the scan's own shape and affine (for a DICOM series: the affine of the
  series as read from its attributes);
- ``<name>_seg.dcm``: a DICOM SEG of the source series (DICOM inputs; ``--output_type``);
- ``<name>_statistics.json``: per label its volume in mL and voxel count, the bundle and version, device,
  precision, seconds, ``quality`` (the checks of :mod:`medssl.clinic.quality`: verdict, reasons, numbers) and
  ``model`` (the bundle's task, data source and intended use); ``<name>_preview.png`` with ``--preview``;
- ``summary.json``: every scan of the run, the failed ones with their reason.

Each scan is on its own: one that cannot be read, preprocessed or segmented is reported with its reason and
skipped, the others are written as usual (``--fail_fast`` stops at the first failure instead). Every file appears
complete or not at all. A scan in any units, orientation and spacing is a normal input: the bundle's preprocessing
handles it and its postprocessing inverts it. A scan the quality checks warn about is written all the same, with
a ``warning:`` line under the table, the reasons in its statistics and ``CHECK ...`` in its SEG's series description.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import nibabel as nib
import numpy as np
from medssl.bundle import cache_dir, default_index, require_weights
from medssl.clinic.quality import Quality, body_part_reason, bundle_body_parts, volume_reasons
from medssl.data import NIFTI_SUFFIXES, DataError, as_bool, atomic_path, check_headers, data_error_message, write_json
from medssl.export import RUNTIMES, check_runtime
from medssl.task import read_task
from medssl.clinic.runtime_choice import default_runtime

__all__ = [
    "Segmenter",
    "label_volumes",
    "segment",
    "collect_inputs",
    "segmentation_volume_ml",
    "print_table",
    "error_reason",
    "ScanInput",
    "OUTPUT_TYPES",
]

logger = logging.getLogger(__name__)
OUTPUT_TYPES = ("nifti", "dicom_seg", "both")


@dataclass
class ScanInput:
    """One scan to segment: ``source`` as the user named it, ``name`` the stem of its outputs, ``kind`` "nifti" or
    "dicom", and ``error`` when it is known to be bad before reading it."""

    source: Path
    name: str
    kind: str
    error: Optional[str] = None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.is_file() else name


def collect_inputs(scans: Sequence[os.PathLike | str]) -> List[ScanInput]:
    """The scans named by ``scans``: NIfTI files, folders (their ``*.nii``/``*.nii.gz``, sorted; a folder without
    NIfTI files that holds DICOM is one DICOM input), ``.zip`` files of DICOM. An input that cannot be a scan (a
    missing path, a file of another kind, a folder with neither) comes back with its ``error`` set, so the others
    are still segmented.

    Raises:
        DataError: nothing given, or two scans that would write the same ``<name>_seg.nii.gz``.
    """
    from medssl.clinic.dicom import is_dicom_source

    if not scans:
        raise DataError("segment: no scans given; pass NIfTI files (.nii/.nii.gz), DICOM folders or .zip files.")
    found: List[ScanInput] = []
    for s in scans:
        p = Path(s).expanduser()
        if p.is_dir():
            nifti = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(NIFTI_SUFFIXES))
            if nifti:
                found += [ScanInput(f, _stem(f), "nifti") for f in nifti]
            elif is_dicom_source(p):
                found.append(ScanInput(p, _stem(p), "dicom"))
            else:
                found.append(
                    ScanInput(p, _stem(p), "nifti", f"{p}: folder holds no NIfTI files (*.nii, *.nii.gz) and no DICOM.")
                )
        elif not p.exists():
            found.append(ScanInput(p, _stem(p), "nifti", f"{p}: file not found."))
        elif p.name.lower().endswith(".zip"):
            found.append(ScanInput(p, _stem(p), "dicom"))
        elif p.name.endswith(NIFTI_SUFFIXES):
            found.append(ScanInput(p, _stem(p), "nifti"))
        else:
            found.append(
                ScanInput(p, _stem(p), "nifti", f"{p}: not a NIfTI file (.nii, .nii.gz), a DICOM folder or a .zip of "
                          "DICOM; for a DICOM file pass the folder of its series.")  # fmt: skip
            )
    seen: Dict[str, Path] = {}
    unique: List[ScanInput] = []
    for scan in found:
        if scan.name in seen:
            if seen[scan.name].resolve() == scan.source.resolve():
                continue
            raise DataError(
                f"{scan.source} and {seen[scan.name]} would both be written as {scan.name}_seg.nii.gz; rename one."
            )
        seen[scan.name] = scan.source
        if scan.kind == "nifti" and scan.error is None:
            try:
                check_headers(scan.source)  # the header alone: a bad file is known before any model is loaded
            except DataError as e:
                scan.error = str(e)
        unique.append(scan)
    return unique


def segmentation_volume_ml(path: os.PathLike | str, label: int = 1) -> float:
    """Volume of ``label`` in a label map, in mL (voxel count x voxel volume from the affine)."""
    img = nib.load(str(path))
    voxels = int((np.asanyarray(img.dataobj) == label).sum())
    return voxels * abs(float(np.linalg.det(img.affine[:3, :3]))) / 1000.0


def error_reason(exc: BaseException) -> str:
    """The reason a user should read for ``exc``: the project's own error (a :class:`DataError` names the file)
    wherever MONAI or ignite wrapped it ("applying transform <...>"), else the innermost cause with its type."""
    message = data_error_message(exc)
    if message:
        return message
    chain, seen = [], set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    inner = chain[-1]
    return " ".join(f"{type(inner).__name__}: {inner}".split())


def _resolve_bundle(bundle: str, index: Optional[str], bundle_dir: Optional[str]) -> Path:
    """A bundle folder (configs/inference.json and models/model.pt), or a released bundle's name to pull."""
    p = Path(bundle).expanduser()
    if (p / "configs" / "inference.json").is_file():
        return p.resolve()
    from medssl.clinic.release import pull

    target = Path(bundle_dir) if bundle_dir else cache_dir() / "bundles"
    return pull(bundle, bundle_dir=str(target), index=index or default_index())


def _publish(src: Path, dst: Path) -> Path:
    """Move ``src`` onto ``dst`` in one step (a copy beside ``dst`` first when they are on different disks)."""
    try:
        os.replace(src, dst)
    except OSError:
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        src.unlink(missing_ok=True)
    return dst


def label_volumes(labels: np.ndarray, affine: np.ndarray, label_names: Dict[int, str]) -> Dict[str, Dict[str, Any]]:
    """Per label name: its value, voxel count and volume in mL (from the affine's voxel size)."""
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    counts = {v: int((labels == v).sum()) for v in label_names}
    return {
        name: {"value": v, "voxels": counts[v], "volume_ml": round(counts[v] * voxel_ml, 3)}
        for v, name in label_names.items()
    }


class Segmenter:
    """A bundle loaded once for many scans (``segment`` and the DICOM node use one).

    Args:
        bundle: a released bundle's name (pulled into ``bundle_dir``, default ``$MEDSSL_HOME/bundles`` or
            ``~/.cache/medssl/bundles``, from ``index``, default the checkout's ``bundle_index.json``) or the folder
            of a bundle that has ``models/model.pt`` (one you trained).
        device: ``cpu``, ``cuda``, ``cuda:1``...; default: the GPU if there is one.
        largest_component: keep only the largest connected component of each label (default; ``False`` keeps all).
        progress: show a progress bar (on a terminal).
        overrides: other ``inference.json`` ids to set (``sw_overlap``, ``sw_batch_size``, ``amp``...).
        runtime: ``torch``, ``openvino``, ``openvino-int8`` (see :mod:`medssl.export`) or ``auto``: the fastest
            of them that keeps the bundle's label maps on this machine (:mod:`medssl.clinic.runtime_choice`; ``torch``
            for a bundle without an accuracy record for its weights). Default: ``$MEDSSL_RUNTIME`` or ``auto``.
        model_format: what the ``torch`` runtime runs: ``pt`` (the eager network), ``ts`` (TorchScript) or ``pt2``
            (the ``torch.export`` program); exported artefacts are made (or rebuilt when stale) on first use.

    Raises:
        medssl.clinic.release.ReleaseError: the bundle cannot be pulled or fails its checksum.
        FileNotFoundError: the bundle has no weights.
    """

    def __init__(
        self,
        bundle: str = "la_seg_finetune",
        index: Optional[str] = None,
        bundle_dir: Optional[str] = None,
        device: Optional[str] = None,
        largest_component: Any = True,
        progress: bool = True,
        overrides: Optional[Dict[str, Any]] = None,
        runtime: Optional[str] = None,
        model_format: str = "pt",
    ) -> None:
        from monai.bundle import ConfigParser

        runtime = _requested_runtime(runtime, model_format)  # refused before anything is pulled or loaded
        self.root = _resolve_bundle(bundle, index, bundle_dir)
        require_weights(str(self.root / "models" / "model.pt"))
        parser = ConfigParser()
        parser.read_meta(str(self.root / "configs" / "metadata.json"))
        parser.read_config(str(self.root / "configs" / "inference.json"))
        meta = parser.get("_meta_")
        self.name = self.root.name.split("_v")[0]  # a pulled bundle's folder is NAME_vVERSION
        self.version = str(meta.get("version", "0"))
        # label names, their DICOM SEG codes (configs without a labels key are coded by name) and the modality the
        # bundle segments (a DICOM series of another is refused)
        task = read_task(self.root)
        self.label_names, self.label_codes, self.modalities = task.names, task.codes, (task.modality,)
        # what the quality checks compare a scan with (medssl.clinic.quality), and what the model was trained on
        self.body_parts = bundle_body_parts(task.names, task.codes, parser.get("body_parts"))
        self.volume_record = meta.get("training_label_volumes_ml")
        self.model_info = {k: meta[k] for k in ("task", "data_source", "intended_use") if k in meta}
        self.progress = progress
        self.workdir = Path(tempfile.mkdtemp(prefix="medssl-segment-"))
        settings = {
            "bundle_root": str(self.root),
            "datalist": [],
            "output_dir": str(self.workdir / "pred"),
            "largest_component": as_bool(largest_component, "largest_component"),
            "num_workers": 0,
            "runtime": str(runtime),
            "model_format": str(model_format),
            **(overrides or {}),
        }
        if device:
            settings["device"] = f"$torch.device({str(device)!r})"
        for k, v in settings.items():
            parser[k] = v
        self.runtime_choice: Optional[Dict[str, Any]] = None
        if settings["runtime"] == "auto":
            settings["runtime"] = parser["runtime"] = self._auto_runtime(parser)
        chosen = (str(settings["runtime"]), str(settings["model_format"]))
        if chosen != ("torch", "pt") and "network_spec" not in parser:
            raise ValueError(
                f"{self.root / 'configs' / 'inference.json'}: this bundle (version {self.version}) predates the "
                f"runtimes; runtime {chosen[0]!r} / model_format {chosen[1]!r} need an inference.json with "
                "'network_spec', 'runtime' and 'model_format' (pull a newer release)."
            )
        parser.get_parsed_content("initialize")
        self.evaluator = parser.get_parsed_content("evaluator")
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.device = str(parser.get_parsed_content("device"))
        self.precision = str(parser.get_parsed_content("precision"))
        self.runtime = check_runtime(parser.get_parsed_content("runtime"), parser.get_parsed_content("model_format"))

    def _auto_runtime(self, parser) -> str:
        """``runtime: auto`` resolved for this bundle on its device (see :mod:`medssl.clinic.runtime_choice`)."""
        from medssl.precision import resolve_precision
        from medssl.clinic.runtime_choice import choose_runtime

        if "network_spec" not in parser:  # a bundle released before the runtimes
            self.runtime_choice = {"runtime": "torch", "reason": "torch: the bundle predates the other runtimes"}
            return "torch"
        device = parser.get_parsed_content("device")
        choice = choose_runtime(
            self.root,
            device,
            resolve_precision(parser.get_parsed_content("amp"), device),
            parser.get_parsed_content("patch_size"),
            parser.get_parsed_content("sw_batch_size"),
            parser.get_parsed_content("network_spec"),
        )
        self.runtime_choice = {"runtime": choice.runtime, "reason": choice.reason, "cached": choice.cached}
        return choice.runtime

    def close(self) -> None:
        if getattr(self, "workdir", None) is not None:  # __init__ may have failed before making it
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Segmenter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def volume_reasons(self, labels: Dict[str, Dict[str, Any]]) -> List[str]:
        """The quality checks' reasons about a label map's volumes (:func:`label_volumes`'s record) against the
        training labels' (:func:`medssl.clinic.quality.volume_reasons`)."""
        return volume_reasons({name: e["volume_ml"] for name, e in labels.items()}, self.volume_record)

    def infer(self, nifti: Path) -> Path:
        """Run the bundle on one NIfTI file; returns the label map it wrote (in the file's shape and affine)."""
        from monai.data import DataLoader, Dataset

        loader = DataLoader(Dataset([{"image": str(nifti)}], transform=self.preprocessing), batch_size=1, num_workers=0)
        self.evaluator.data_loader = loader
        self.evaluator.set_data(loader)  # a fresh iterator: one left by a failed scan would yield nothing
        # ignite keeps the run generator that an exception ended, and "resumes" it as an empty run: drop it
        self.evaluator._internal_run_generator = None
        self.evaluator.state.epoch_length = len(loader)  # built without scans, the evaluator would run no iteration
        self.evaluator.run()
        written = self.workdir / "pred" / f"{_stem(nifti)}_seg.nii.gz"
        if not written.is_file():
            raise RuntimeError(f"{nifti}: the bundle wrote no segmentation ({written.name} missing).")
        return written

    def segment(
        self,
        scans: Sequence[os.PathLike | str],
        out: os.PathLike | str = "segmentations",
        output_type: Optional[str] = None,
        series: Optional[str] = None,
        preview: bool = False,
        fail_fast: bool = False,
        announce: Optional[Callable[[str], None]] = None,
    ) -> List[Dict[str, Any]]:
        """Segment ``scans`` into ``out``; returns one record per scan (see :meth:`segment_one`), failed ones with
        ``status`` "failed" and ``error`` (the reason, naming the file), and writes them to ``out/summary.json``.

        Args:
            output_type: ``nifti``, ``dicom_seg`` or ``both``; default ``both`` for DICOM inputs, ``nifti`` for NIfTI.
            series: the SeriesInstanceUID to read from a DICOM input holding several series.
            preview: also write ``<name>_preview.png`` (three orthogonal slices with the contour).
            fail_fast: stop at the first failing scan (raising its error) instead of going on.
            announce: where to say which series was chosen from a study (default: the log).

        Raises:
            DataError: no scans, two scans with one output name, a bad ``output_type``; with ``fail_fast``, the first
                failure (its reason naming the file).
        """
        return self.segment_inputs(collect_inputs(scans), out, output_type, series, preview, fail_fast, announce)

    def segment_inputs(
        self,
        inputs: Sequence[ScanInput],
        out: os.PathLike | str,
        output_type: Optional[str] = None,
        series: Optional[str] = None,
        preview: bool = False,
        fail_fast: bool = False,
        announce: Optional[Callable[[str], None]] = None,
    ) -> List[Dict[str, Any]]:
        """:meth:`segment` on inputs already gathered by :func:`collect_inputs` (their headers checked there)."""
        _check_output_type(output_type)
        out = Path(out).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        return _each_scan(
            inputs,
            out,
            lambda scan: self.segment_one(scan, out, output_type, series, preview, announce),
            fail_fast,
            self.progress,
            {"bundle": self.name, "version": self.version},
        )

    def segment_one(
        self,
        scan: ScanInput,
        out: Path,
        output_type: Optional[str] = None,
        series: Optional[str] = None,
        preview: bool = False,
        announce: Optional[Callable[[str], None]] = None,
    ) -> Dict[str, Any]:
        """Segment one input and write its outputs; returns ``{"scan", "name", "status": "ok", "error": None,
        "segmentation", "dicom_seg", "statistics", "preview", "volume_ml", "labels", "seconds", "series_uid"}``.

        Raises:
            DataError: the input is bad (the message names the file or series); anything else the bundle raises.
        """
        from medssl.clinic.dicom import read_series, write_seg

        start = time.perf_counter()
        if scan.error:
            raise DataError(scan.error)
        output_type = output_type or ("both" if scan.kind == "dicom" else "nifti")
        if output_type != "nifti" and scan.kind != "dicom":
            raise DataError(f"{scan.source}: a DICOM SEG needs a DICOM input (got NIfTI); use --output_type nifti.")
        work = Path(tempfile.mkdtemp(dir=self.workdir, prefix="scan."))
        try:
            volume = None
            if scan.kind == "dicom":
                volume = read_series(
                    scan.source, series, announce or logger.info, modalities=self.modalities, bundle=self.name
                )
                image = work / f"{scan.name}.nii"
                nib.save(nib.Nifti1Image(volume.array, volume.affine), str(image))
            else:
                image = scan.source  # its header was checked by collect_inputs
            quality = Quality()
            if volume is not None:  # the cheap check first: the series' body part, before the model runs
                quality.checks["body_part_examined"] = str(getattr(volume.datasets[0], "BodyPartExamined", "") or "")
                quality.add(body_part_reason(volume.datasets, self.body_parts))
                for reason in quality.reasons:
                    logger.warning("%s: %s", scan.name, reason)
            pred = self.infer(image)
            labels_img = nib.load(str(pred))
            labels = np.asarray(labels_img.dataobj)
            labels_img = nib.Nifti1Image(labels, labels_img.affine, labels_img.header)
            record: Dict[str, Any] = {
                "scan": str(scan.source), "name": scan.name, "status": "ok", "error": None, "segmentation": None,
                "dicom_seg": None, "preview": None, "series_uid": volume.series_uid if volume else None,
            }  # fmt: skip
            # every output is made in the scan's work folder first and published only when all of them exist
            made: Dict[str, Path] = {}
            record["labels"] = label_volumes(labels, labels_img.affine, self.label_names)
            quality.add(self.volume_reasons(record["labels"]))
            record["quality"] = quality.as_dict()
            if volume is not None and output_type in ("dicom_seg", "both"):
                made["dicom_seg"] = write_seg(
                    labels, volume, work / f"{scan.name}_seg.dcm", self.name, self.version, self.label_names,
                    label_codes=self.label_codes, series_description=quality.description(self.name, self.version),
                )
            if output_type in ("nifti", "both"):
                made["segmentation"] = pred
            if preview:
                made["preview"] = write_preview(image, labels_img, work / f"{scan.name}_preview.png", scan.name)
            record["volume_ml"] = round(record["labels"][self.label_names[min(self.label_names)]]["volume_ml"], 2)
            targets = {"segmentation": f"{scan.name}_seg.nii.gz", "dicom_seg": f"{scan.name}_seg.dcm",
                       "preview": f"{scan.name}_preview.png"}  # fmt: skip
            for key, path in made.items():
                record[key] = str(out / targets[key])
            record["seconds"] = round(time.perf_counter() - start, 2)
            stats = {
                **{k: record[k] for k in ("scan", "series_uid", "labels", "seconds", "segmentation", "dicom_seg")},
                "bundle": self.name, "version": self.version, "device": self.device, "precision": self.precision,
                "runtime": self.runtime,
                **({"runtime_choice": self.runtime_choice} if self.runtime_choice else {}),
                "quality": record["quality"], "model": self.model_info,
            }  # fmt: skip
            made["statistics"] = write_json(stats, work / f"{scan.name}_statistics.json")
            record["statistics"] = str(out / f"{scan.name}_statistics.json")
            for key, path in made.items():
                _publish(Path(path), Path(record[key]))
            return record
        finally:
            shutil.rmtree(work, ignore_errors=True)
            for left in (self.workdir / "pred").glob("*"):
                left.unlink(missing_ok=True)


def _requested_runtime(runtime: Optional[str], model_format: str) -> str:
    """``runtime`` (default ``$MEDSSL_RUNTIME`` or ``auto``) once checked with ``model_format``.

    Raises:
        ValueError: an unknown runtime or format, or a combination that cannot run.
    """
    runtime = str(runtime or default_runtime())
    if runtime not in ("auto", *RUNTIMES):
        raise ValueError(f"runtime: expected one of auto, {', '.join(RUNTIMES)}; got {runtime!r}.")
    check_runtime("torch" if runtime == "auto" else runtime, model_format)
    if runtime == "auto" and str(model_format) != "pt":
        raise ValueError(
            f"runtime 'auto' chooses between {', '.join(RUNTIMES)} for the weights themselves; model_format "
            f"{model_format!r} is a PyTorch artefact: name runtime 'torch' with it."
        )
    return runtime


def _check_output_type(output_type: Optional[str]) -> None:
    if output_type is not None and output_type not in OUTPUT_TYPES:
        raise DataError(f"--output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}.")


def _each_scan(
    inputs: Sequence[ScanInput],
    out: Path,
    process: Callable[[ScanInput], Dict[str, Any]],
    fail_fast: bool,
    progress: bool,
    about: Dict[str, Any],
) -> List[Dict[str, Any]]:
    """``process`` every input on its own: a failure becomes a record with its reason (or, with ``fail_fast``, a
    :class:`DataError` ending the run); ``out/summary.json`` lists them all, ``about`` the bundle."""
    from tqdm import tqdm

    results = []
    bar = tqdm(total=len(inputs), desc="segment", unit="scan", disable=not progress or None)
    try:
        for scan in inputs:
            start = time.perf_counter()
            try:
                results.append(process(scan))
            except Exception as e:  # one bad scan never costs the others
                reason = error_reason(e)
                reason = reason if str(scan.source) in reason else f"{scan.source}: {reason}"
                logger.error("%s", reason)
                if fail_fast:
                    raise DataError(reason) from e
                results.append(
                    {"scan": str(scan.source), "name": scan.name, "status": "failed", "error": reason,
                     "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
                )
            bar.update(1)
    finally:
        bar.close()
        if results:
            write_json({**about, "scans": results}, out / "summary.json")
    return results


def _refuse(scan: ScanInput) -> Dict[str, Any]:
    raise DataError(scan.error)


def write_preview(image: os.PathLike | str, labels: nib.Nifti1Image, path: os.PathLike | str, title: str = "") -> Path:
    """A PNG of three orthogonal slices (axial, coronal, sagittal, in RAS display order) through the centre of the
    labelled region, with its contour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = nib.as_closest_canonical(nib.load(str(image)))
    lab = nib.as_closest_canonical(labels)
    vol, mask = np.asarray(img.dataobj, np.float32), np.asarray(lab.dataobj) > 0
    centre = np.round(np.argwhere(mask).mean(0)).astype(int) if mask.any() else np.array(vol.shape) // 2
    lo, hi = np.percentile(vol, [1, 99.5])
    views = [
        ("axial", vol[:, :, centre[2]], mask[:, :, centre[2]]),
        ("coronal", vol[:, centre[1], :], mask[:, centre[1], :]),
        ("sagittal", vol[centre[0], :, :], mask[centre[0], :, :]),
    ]
    zooms = img.header.get_zooms()[:3]
    aspects = [zooms[1] / zooms[0], zooms[2] / zooms[0], zooms[2] / zooms[1]]
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    for ax, (name, sl, m), aspect in zip(axes, views, aspects):
        ax.imshow(sl.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect)
        if m.any():
            ax.contour(m.T.astype(float), levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path


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
    output_type: Optional[str] = None,
    series: Optional[str] = None,
    preview: bool = False,
    fail_fast: bool = False,
    announce: Optional[Callable[[str], None]] = None,
    runtime: Optional[str] = None,
    model_format: str = "pt",
) -> List[Dict[str, Any]]:
    """Segment ``scans`` with a bundle (see :class:`Segmenter` and :meth:`Segmenter.segment`); one record per scan.

    Raises:
        DataError: no scans, or two scans with one output name (checked before the bundle is loaded); with
            ``fail_fast``, the first failing scan.
        medssl.clinic.release.ReleaseError: the bundle cannot be pulled or fails its checksum.
        FileNotFoundError: the bundle has no weights.
    """
    _check_output_type(output_type)
    _requested_runtime(runtime, model_format)
    inputs = collect_inputs(scans)
    if all(scan.error for scan in inputs):  # nothing to segment: no bundle to pull or load
        out = Path(out).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        return _each_scan(inputs, out, _refuse, fail_fast, progress, {"bundle": bundle})
    with Segmenter(
        bundle, index, bundle_dir, device, largest_component, progress, overrides, runtime, model_format
    ) as segmenter:
        return segmenter.segment_inputs(inputs, out, output_type, series, preview, fail_fast, announce)


def print_table(results: Sequence[Dict[str, Any]]) -> None:
    """One line per segmented scan (the volume in mL of each label the bundle names, one column each; seconds; the
    files written), then the summary line ``N segmented, M failed`` and one ``error:`` line per failed scan (the last
    line names a file and its problem)."""
    ok = [r for r in results if r["status"] == "ok"]
    failed = [r for r in results if r["status"] != "ok"]
    if ok:
        width = max([len(Path(r["scan"]).name) for r in ok] + [4])
        names = list(dict.fromkeys(name for r in ok for name in r.get("labels") or {}))
        columns = [(name, f"{name} (mL)", max(len(name) + 5, 7)) for name in names]
        header = "  ".join(f"{title:>{w}}" for _, title, w in columns)
        print(f"{'scan':<{width}}  {header}  {'seconds':>7}  written")
        for r in ok:
            files = ", ".join(r[k] for k in ("segmentation", "dicom_seg") if r.get(k))
            labels = r.get("labels") or {}
            volumes = "  ".join(
                f"{labels[name]['volume_ml']:>{w}.1f}" if name in labels else f"{'-':>{w}}" for name, _, w in columns
            )
            print(f"{Path(r['scan']).name:<{width}}  {volumes}  {r['seconds']:>7.1f}  {files}")
    for r in ok:  # a warned scan is written all the same: the user decides
        for reason in (r.get("quality") or {}).get("reasons", []):
            print(f"warning: {Path(r['scan']).name}: {reason}")
    print(f"{len(ok)} segmented, {len(failed)} failed")
    for r in failed:
        print(f"error: {r['error']}")
