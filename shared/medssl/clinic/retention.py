"""How long the DICOM node keeps processed series: ``--keep_days N`` and / or ``--max_done_gb X``.

``done/<series>/`` holds a processed series (its instances, its SEG, ``result.json``). With ``keep_days``, a series
processed more than that many days ago (``result.json``'s modification time: when it reached ``done/``) leaves;
with ``max_done_gb``, the oldest leave until ``done/`` holds at most that much. A series whose SEG the destination
has not accepted yet (``unsent.txt`` in its folder: the send failed, or is under way) is never removed, whatever its
age; nor is anything in ``failed/`` (a person should look at those). A removed series is first renamed into ``tmp/``
(gone from ``done/`` in one step), then deleted; a crash in between leaves it in ``tmp/``, which the next start
empties. Each removal is logged with the series, its age, its size and the rule that removed it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from medssl.data import DataError

log = logging.getLogger("medssl.clinic.dicom_node")  # the node's log

__all__ = ["Retention", "DoneSeries", "done_series"]

GB = 1024**3


@dataclass
class DoneSeries:
    folder: Path
    processed: float  # epoch seconds
    size: int  # bytes
    unsent: bool


def _size(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def done_series(done: Path) -> List[DoneSeries]:
    """The series in ``done/``, oldest first."""
    out = []
    for folder in done.iterdir() if done.is_dir() else []:
        if not folder.is_dir():
            continue
        stamp = folder / "result.json"
        try:
            processed = (stamp if stamp.is_file() else folder).stat().st_mtime
        except OSError:
            continue  # removed meanwhile
        out.append(DoneSeries(folder, processed, _size(folder), (folder / "unsent.txt").exists()))
    return sorted(out, key=lambda s: (s.processed, s.folder.name))


class Retention:
    """The retention rules (see the module doc); both None: keep everything.

    Raises:
        DataError: ``keep_days`` or ``max_done_gb`` not a number > 0.
    """

    def __init__(self, keep_days: Optional[float] = None, max_done_gb: Optional[float] = None):
        self.keep_days = self._positive(keep_days, "--keep_days")
        self.max_done_gb = self._positive(max_done_gb, "--max_done_gb")
        self._blocked_logged = False

    @staticmethod
    def _positive(value, key: str) -> Optional[float]:
        if value is None:
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not number > 0 or number == float("inf"):
            raise DataError(f"{key} {value!r}: expected a number > 0 (leave it out to keep everything).")
        return number

    @property
    def active(self) -> bool:
        return self.keep_days is not None or self.max_done_gb is not None

    def describe(self) -> str:
        rules = []
        if self.keep_days is not None:
            rules.append(f"{self.keep_days:g} days")
        if self.max_done_gb is not None:
            rules.append(f"at most {self.max_done_gb:g} GB")
        return "keep done/ series " + " and ".join(rules) if rules else "keep every done/ series"

    def prune(self, done: Path, tmp: Path, now: Optional[float] = None) -> List[DoneSeries]:
        """Remove what the rules say from ``done`` (via ``tmp``); the series removed."""
        if not self.active:
            return []
        now = time.time() if now is None else now
        series = done_series(done)
        total = sum(s.size for s in series)
        removed = []
        for s in series:
            old = self.keep_days is not None and now - s.processed > self.keep_days * 86400
            over = self.max_done_gb is not None and total > self.max_done_gb * GB
            if not (old or over):
                continue
            if s.unsent:
                continue  # its SEG has not reached the destination: never removed
            gone = tmp / f"removing-{s.folder.name}"
            try:
                if gone.exists():
                    shutil.rmtree(gone)
                os.rename(s.folder, gone)
            except OSError as e:
                log.error("retention: could not remove %s: %s", s.folder, e)
                continue
            shutil.rmtree(gone, ignore_errors=True)
            total -= s.size
            removed.append(s)
            rule = f"older than {self.keep_days:g} days" if old else f"done/ over {self.max_done_gb:g} GB"
            log.info(
                "retention: removed series %s (processed %.1f days ago, %.1f MB): %s",
                s.folder.name,
                (now - s.processed) / 86400,
                s.size / 1024**2,
                rule,
            )
        if self.max_done_gb is not None and total > self.max_done_gb * GB:
            if not self._blocked_logged:
                log.warning(
                    "retention: done/ holds %.2f GB, over --max_done_gb %g, but what is left waits to be "
                    "sent (unsent.txt): kept",
                    total / GB,
                    self.max_done_gb,
                )
                self._blocked_logged = True
        else:
            self._blocked_logged = False
        return removed
