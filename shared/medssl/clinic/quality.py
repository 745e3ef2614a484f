"""Can a segmentation be trusted? Cheap per-scan checks beside every prediction (issue 33), in ``statistics.json``'s
``quality`` block, a warning line in ``segment``'s table and the DICOM SEG's series description.

- **Body part, before the model runs** (DICOM): a series whose ``BodyPartExamined`` names a region that the bundle's
  structures are not in (a HEAD study given to a heart model) is flagged. The bundle's region comes from its labels'
  SNOMED CT codes (:data:`REGION_OF_CODE`; a bundle whose codes are all unknown here gets no body-part check) or from
  an explicit ``body_parts`` list in its ``inference.json``. A blank or missing attribute is not flagged (most
  exports leave it empty).
- **Structure volumes against the training labels**: where the bundle's ``metadata.json`` records the volumes of its
  training labels (``training_label_volumes_ml``: per label ``min`` / ``max`` / ``cases``), a predicted structure
  outside ``[min / 2, max * 2]`` is flagged, and so is a structure the model did not find at all (every training
  label has it). Bundles without the record get only the empty-structure check.

The verdict is ``"ok"`` or ``"warning"``; a warned scan is still written (the user decides), with the reasons in
every output. The thresholds are fixed rules, not tuned on any test case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "REGION_OF_CODE",
    "BODY_PARTS",
    "Quality",
    "bundle_body_parts",
    "body_part_reason",
    "volume_reasons",
    "training_label_volumes",
]

# DICOM BodyPartExamined terms (PS3.16 Annex L, as scanners write them) accepted for each region
BODY_PARTS: Dict[str, frozenset] = {
    "heart": frozenset({"HEART", "CARDIAC", "CHEST", "THORAX", "CHESTABDOMEN", "CHESTABDPELVIS", "WHOLEBODY"}),
    "abdomen": frozenset(
        {"ABDOMEN", "ABDOMENPELVIS", "CHESTABDOMEN", "CHESTABDPELVIS", "LIVER", "KIDNEY", "PANCREAS", "WHOLEBODY"}
    ),
}
# SNOMED CT codes of the structures medssl's bundles and tests segment -> their region
REGION_OF_CODE: Dict[str, str] = {
    "82471001": "heart",  # left atrium
    "53085002": "heart",  # right ventricle
    "74281007": "heart",  # myocardium
    "87878005": "heart",  # left ventricle
    "10200004": "abdomen",  # liver
    "78961009": "abdomen",  # spleen
    "64033007": "abdomen",  # kidney
    "15776009": "abdomen",  # pancreas
}
VOLUME_FACTOR = 2.0  # flagged below min / 2 or above max * 2 of the training labels


@dataclass
class Quality:
    """The checks of one scan: ``reasons`` (one sentence each) and ``checks`` (the numbers behind them)."""

    checks: Dict[str, Any] = field(default_factory=dict)
    reasons: List[str] = field(default_factory=list)
    flags: List[str] = field(default_factory=list)  # the reasons in a few words each (a DICOM description is short)

    def add(self, found: Iterable[Tuple[str, str]]) -> None:
        for reason, flag in found:
            self.reasons.append(reason)
            self.flags.append(flag)

    @property
    def verdict(self) -> str:
        return "warning" if self.reasons else "ok"

    def as_dict(self) -> Dict[str, Any]:
        return {"verdict": self.verdict, "reasons": list(self.reasons), "checks": dict(self.checks)}

    def description(self, bundle: str, version: str) -> Optional[str]:
        """A DICOM SEG series description (64 characters at most) that carries the warning; None when there is none."""
        if not self.flags:
            return None
        return f"CHECK {'; '.join(self.flags)} - {bundle} {version}"[:64]


def bundle_body_parts(
    names: Mapping[int, str], codes: Mapping[int, Any], explicit: Optional[Iterable[str]] = None
) -> Optional[frozenset]:
    """The BodyPartExamined terms a bundle accepts: ``explicit`` (its ``body_parts``) where given, else the union over
    the regions of its labels' codes (a label without one: its code by name, as the SEG codes it); None (no check)
    when no code's region is known."""
    from medssl.clinic.dicom_write import SEGMENT_CODES

    if explicit is not None:
        return frozenset(_term(t) for t in explicit)
    regions = set()
    for value, name in names.items():
        entry = codes.get(value) or (None, None)
        code = entry[0] or SEGMENT_CODES.get(name.lower(), (None,))[0]
        if code and code[0] in REGION_OF_CODE:
            regions.add(REGION_OF_CODE[code[0]])
    return frozenset().union(*(BODY_PARTS[r] for r in regions)) if regions else None


def _term(value: Any) -> str:
    return "".join(ch for ch in str(value).upper() if ch.isalnum())


def body_part_reason(datasets: Sequence[Any], accepted: Optional[frozenset]) -> List[Tuple[str, str]]:
    """``[(reason, flag)]`` when the series' ``BodyPartExamined`` names another region than ``accepted``."""
    if not accepted or not datasets:
        return []
    value = str(getattr(datasets[0], "BodyPartExamined", "") or "").strip()
    if not value or _term(value) in accepted:
        return []
    reason = f"BodyPartExamined is {value!r}, not a region this model was trained on ({', '.join(sorted(accepted))})"
    return [(reason, f"body part {value}")]


def volume_reasons(volumes_ml: Mapping[str, float], record: Optional[Mapping[str, Any]]) -> List[Tuple[str, str]]:
    """``[(reason, flag)]`` for structures outside the training labels' volume range widened by :data:`VOLUME_FACTOR`, and for
    structures not found (0 mL) where every training label has them (or, without a record, not found at all)."""
    reasons = []
    for name, ml in volumes_ml.items():
        ref = (record or {}).get(name)
        if ml <= 0:
            if ref is None or float(ref.get("min", 0)) > 0:
                reasons.append((f"no {name} found", f"no {name}"))
            continue
        if ref is None:
            continue
        lo, hi = float(ref["min"]) / VOLUME_FACTOR, float(ref["max"]) * VOLUME_FACTOR
        if not lo <= ml <= hi:
            reason = (
                f"{name} {ml:.1f} mL is outside {lo:.1f}-{hi:.1f} mL (the training labels' {float(ref['min']):.1f}-"
                f"{float(ref['max']):.1f} mL, x{VOLUME_FACTOR:g} either way)"
            )
            reasons.append((reason, f"{name} {ml:.1f} mL"))
    return reasons


def training_label_volumes(label_files: Iterable[Any], names: Mapping[int, str]) -> Dict[str, Dict[str, float]]:
    """``training_label_volumes_ml`` for a release's metadata: per label name the ``min`` / ``max`` / ``median``
    volume in mL (voxel volume from each file's affine) over the training label maps, and their number ``cases``.

    Raises:
        medssl.data.DataError: a label file that cannot be read (the message names it).
    """
    import nibabel as nib
    import numpy as np

    from medssl.data import DataError

    volumes: Dict[int, List[float]] = {v: [] for v in names}
    for path in label_files:
        try:
            img = nib.load(str(path))
            data = np.asarray(img.dataobj)
        except Exception as e:  # noqa: BLE001 - any unreadable file is named
            raise DataError(f"{path}: cannot read the label map ({type(e).__name__}: {e}).") from e
        voxel_ml = abs(float(np.linalg.det(img.affine[:3, :3]))) / 1000.0
        for v in names:
            volumes[v].append(float((data == v).sum()) * voxel_ml)
    return {
        names[v]: {
            "min": round(min(vals), 3), "median": round(float(np.median(vals)), 3), "max": round(max(vals), 3),
            "cases": len(vals),
        }
        for v, vals in volumes.items() if vals
    }  # fmt: skip
