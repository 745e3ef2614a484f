"""The DICOM node's series on disk and their way through it: ``incoming/`` -> ``processing/`` -> ``done/`` or
``failed/`` (see :mod:`medssl.clinic.dicom_node` for the layout and the guarantees), with the worker that segments one
series at a time and sends its SEG, and the sweeper that decides when a series is complete.

:class:`SeriesQueue` knows nothing of associations beyond their identity: the Storage SCP calls
:meth:`SeriesQueue.store` for each instance (written durably before it is acknowledged), :meth:`SeriesQueue.opened`
when an association first stores into a series, and :meth:`SeriesQueue.released` / :meth:`SeriesQueue.closed` when
it ends. A series is complete
when every association that sent it was released, or after ``quiet_seconds`` without a new instance.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from medssl.clinic.dicom_send import SendError, send_file
from medssl.clinic.dicom_tls import Tls
from medssl.clinic.retention import Retention
from medssl.data import atomic_path, write_json

__all__ = ["Key", "Processor", "SeriesQueue"]

log = logging.getLogger("medssl.clinic.dicom_node")  # the node's log: a person reads one log per node

Key = Tuple[str, str]  # (StudyInstanceUID, SeriesInstanceUID)
Processor = Callable[[Path, Path], Dict[str, Any]]


def _fsync_dir(path: Path) -> None:
    """Make a rename or new entry in ``path`` durable (a crash right after the ack must not lose the file)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unique(path: Path) -> Path:
    """``path``, or ``path.2``, ``path.3``... whichever does not exist yet."""
    if not path.exists():
        return path
    n = 2
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.{n}")


def _out_of_space(error: str) -> bool:
    """Whether a processor's error says the disk (or the quota) is full."""
    return any(os.strerror(code) in error for code in (errno.ENOSPC, errno.EDQUOT))


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


class SeriesQueue:
    """The node's workdir and its series: durable storage of instances, completion, the bounded work queue, the worker
    and the sweeper threads, sending and re-sending SEGs.

    Args:
        workdir: folder for ``incoming/``, ``processing/``, ``done/``, ``failed/``, ``tmp/`` (created by
            :meth:`recover`).
        quiet_seconds: a series with no new instance for this long is taken as complete.
        max_queue: bound of the work queue (complete series beyond it wait in ``incoming/``).
        destination: ``(aet, host, port)`` for the SEGs; None keeps them in ``done/``.
        ae_title: the calling AE title of the sends.
        send_retries: attempts per SEG.
        process: ``process(series_dir, out_dir) -> {"status": "ok"|"failed", "error", "dicom_seg", ...}``; must be
            set before :meth:`start`.
        retention: what leaves ``done/`` (:mod:`medssl.clinic.retention`), applied by the sweeper at the start and
            every ``retention_interval`` seconds; default keep everything.
        tls: send the SEGs over DICOM TLS (:mod:`medssl.clinic.dicom_tls`).
    """

    def __init__(
        self,
        workdir: Path,
        quiet_seconds: float,
        max_queue: int,
        destination: Optional[Tuple[str, str, int]] = None,
        ae_title: str = "MEDSSL",
        send_retries: int = 3,
        process: Optional[Processor] = None,
        retention: Optional[Retention] = None,
        retention_interval: float = 60.0,
        tls: Optional[Tls] = None,
    ):
        self.tls = tls
        self.workdir = Path(workdir)
        self.retention = retention or Retention()
        self.retention_interval = float(retention_interval)
        self.quiet_seconds = float(quiet_seconds)
        self.max_queue = int(max_queue)
        self.destination = destination
        self.ae_title = ae_title
        self.send_retries = max(1, int(send_retries))
        self.process = process
        self.dirs = {name: self.workdir / name for name in ("incoming", "processing", "done", "failed", "tmp")}
        self._queue: "queue.Queue[Key]" = queue.Queue(maxsize=self.max_queue)
        self._lock = threading.RLock()  # file moves between incoming/ and processing/, and the state below
        self._last_seen: Dict[Key, float] = {}
        self._first_seen: Dict[Key, float] = {}
        self._received: Dict[Key, int] = {}
        self._active: Dict[Key, int] = {}  # open associations that stored into the series
        self._assoc_series: Dict[int, Set[Key]] = {}
        self._released: Set[Key] = set()
        self._queued: Set[Key] = set()
        self._full_logged: Set[Key] = set()
        self._assoc_refused: Dict[int, Set[Key]] = {}  # series an open association was refused instances of
        self._held: Set[Key] = set()  # series with refused instances: wait for the sender to send them again
        self._unsent: List[Path] = []
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self.busy = threading.Event()  # set while a series is being processed (tests, status)

    # lifecycle ---------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker and the sweeper (after :meth:`recover`, with :attr:`process` set)."""
        if self.process is None:
            raise RuntimeError("SeriesQueue.start: no process set.")
        self._stop.clear()
        for name, target in (("worker", self._work), ("sweeper", self._sweep_loop)):
            t = threading.Thread(target=target, name=f"dicom_node-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def request_stop(self) -> None:
        """Tell the worker and the sweeper to stop after what they are doing (:meth:`stop` waits for them)."""
        self._stop.set()

    def stop(self, timeout: float = 120.0) -> None:
        """Let the worker finish its current series (up to ``timeout`` s) and stop both threads."""
        self.request_stop()
        for t in self._threads:
            t.join(timeout=timeout)
        self._threads = []

    # storage ------------------------------------------------------------------------------------------------------

    def _series_dir(self, key: Key) -> Path:
        return self.dirs["incoming"] / key[0] / key[1]

    def store(self, key: Key, sop_uid: str, data: bytes) -> Path:
        """Write one instance durably: temp file in ``tmp/``, fsync, rename into its series folder, fsync the folder.

        Raises:
            OSError: disk full, permissions... (the caller answers Out of resources).
        """
        fd, tmp = tempfile.mkstemp(dir=self.dirs["tmp"], suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            with self._lock:  # the worker must not move the series folder between mkdir and rename
                folder = self._series_dir(key)
                created = not folder.is_dir()
                folder.mkdir(parents=True, exist_ok=True)
                target = folder / f"{sop_uid}.dcm"
                os.replace(tmp, target)
                _fsync_dir(folder)
                if created:
                    _fsync_dir(folder.parent)
                    _fsync_dir(folder.parent.parent)
                now = time.monotonic()
                self._last_seen[key] = now
                self._first_seen.setdefault(key, now)
                self._received[key] = self._received.get(key, 0) + 1
            return target
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


    # associations -------------------------------------------------------------------------------------------------

    def opened(self, assoc: int, key: Key) -> bool:
        """Association ``assoc`` (any hashable identity) stored into series ``key``; True the first time it does."""
        with self._lock:
            series = self._assoc_series.setdefault(assoc, set())
            if key in series:
                return False
            series.add(key)
            self._active[key] = self._active.get(key, 0) + 1
            self._released.discard(key)
            return True

    def refused(self, assoc: int, key: Key) -> None:
        """Association ``assoc`` was refused an instance of ``key`` (it could not be written: a full disk): the series
        is held, neither its release nor its quiet period completes it, until an association that sends into it
        without a refusal is released (the sender sending the refused instances again)."""
        with self._lock:
            self._assoc_refused.setdefault(assoc, set()).add(key)
            self._held.add(key)

    def released(self, assoc: int) -> None:
        """A released association completes the series it sent (unless another open association still sends, or
        the series is held: :meth:`refused`)."""
        with self._lock:
            keys = self._assoc_series.pop(assoc, set())
            refused = self._assoc_refused.pop(assoc, set())
            for key in keys | refused:
                self._active[key] = max(0, self._active.get(key, 1) - 1) if key in keys else self._active.get(key, 0)
                if key in refused:
                    log.warning(
                        "series %s: instances were refused (could not be written); it waits in incoming/ for the "
                        "sender to send them again",
                        key[1],
                    )
                    continue
                self._held.discard(key)
                self._released.add(key)
        if keys:
            self.sweep()

    def closed(self, assoc: int) -> None:
        """Aborted or dropped: the series wait for the quiet period (the sender may come back and finish)."""
        with self._lock:
            for key in self._assoc_series.pop(assoc, set()):
                self._active[key] = max(0, self._active.get(key, 1) - 1)
            self._assoc_refused.pop(assoc, None)

    # scheduling ---------------------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Create the folders and tidy what a previous run left: partial writes, series caught in processing/,
        unsent SEGs."""
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        for p in self.dirs["tmp"].iterdir():
            p.unlink() if p.is_file() else shutil.rmtree(p, ignore_errors=True)
        for job in sorted(self.dirs["processing"].glob("*/*")):
            moved = self._back_to_incoming(job)
            log.info(
                "series %s was being processed when the node stopped: back to incoming/ (%d files)", job.name, moved
            )
        for d in list(self.dirs["processing"].iterdir()):
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink()
        left = sorted(self.dirs["incoming"].glob("*/*"))
        if left:
            log.info(
                "%d series left in incoming/ by a previous run: processed after %.0f s quiet",
                len(left),
                self.quiet_seconds,
            )
        self._unsent = sorted(p.parent for p in self.dirs["done"].glob("*/unsent.txt"))
        if self._unsent and self.destination:
            log.info("%d SEG(s) in done/ were not sent: sending them again", len(self._unsent))

    def _back_to_incoming(self, job: Path) -> int:
        """Move a processing/ job's instances back into its incoming/ folder (beside any that arrived since); the
        number moved. Renames only: it needs no free space."""
        src = job / "instances"
        target = self.dirs["incoming"] / job.parent.name / job.name
        with self._lock:
            target.mkdir(parents=True, exist_ok=True)
            moved = 0
            for f in src.glob("*.dcm") if src.is_dir() else []:
                if not (target / f.name).exists():
                    os.replace(f, target / f.name)
                    moved += 1
            _fsync_dir(target)
            shutil.rmtree(job)
            self._tidy(job.parent)
        return moved

    def _sweep_loop(self) -> None:
        interval = min(1.0, self.quiet_seconds / 4)
        pruned = None
        while True:
            if self.retention.active and (pruned is None or time.monotonic() - pruned >= self.retention_interval):
                pruned = time.monotonic()
                try:
                    self.retention.prune(self.dirs["done"], self.dirs["tmp"])
                except Exception:  # noqa: BLE001 - nor must a retention error stop it
                    log.exception("retention in done/")
            if self._stop.wait(interval):
                return
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the sweeper must survive e.g. a folder removed by hand
                log.exception("sweeping incoming/")

    def sweep(self) -> None:
        """Queue every complete series in ``incoming/`` that is not queued yet (as many as the bound allows)."""
        now = time.monotonic()
        with self._lock:
            for folder in sorted(self.dirs["incoming"].glob("*/*")):
                key: Key = (folder.parent.name, folder.name)
                if key in self._queued or key in self._held or not folder.is_dir():
                    continue
                last = self._last_seen.setdefault(key, now)  # a leftover: its quiet period starts now
                released = key in self._released and self._active.get(key, 0) == 0
                quiet = now - last >= self.quiet_seconds
                if not (released or quiet):
                    continue
                try:
                    self._queue.put_nowait(key)
                except queue.Full:
                    if key not in self._full_logged:
                        self._full_logged.add(key)
                        log.warning("work queue full (%d series): series %s waits in incoming/", self.max_queue, key[1])
                    continue
                self._queued.add(key)
                self._full_logged.discard(key)
                n = sum(1 for _ in folder.glob("*.dcm"))
                log.info(
                    "received series %s with %d instances (%s); queued, %d waiting",
                    key[1],
                    n,
                    "association released" if released else f"{self.quiet_seconds:.0f} s quiet",
                    self._queue.qsize(),
                )

    # work ---------------------------------------------------------------------------------------------------------

    def _work(self) -> None:
        if self._unsent and self.destination:
            for folder in self._unsent:
                if self._stop.is_set():
                    return
                self._send_from(folder)
        while not self._stop.is_set():
            try:
                key = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            self.busy.set()
            try:
                self._process_series(key)
            except Exception as e:  # noqa: BLE001 - one series' disaster must not stop the node
                job = self.dirs["processing"] / key[0] / key[1]
                if not job.is_dir():
                    log.exception("processing series %s", key[1])
                else:  # e.g. its record could not be written (a full disk): it is tried again, not lost
                    self._retry_later(job, key, f"{type(e).__name__}: {e}")
            finally:
                with self._lock:
                    self._queued.discard(key)
                self.busy.clear()

    def _process_series(self, key: Key) -> None:
        study, series = key
        job = self.dirs["processing"] / study / series
        with self._lock:
            src = self._series_dir(key)
            if not src.is_dir():
                return
            job.parent.mkdir(parents=True, exist_ok=True)
            if job.exists():
                shutil.rmtree(job)
            job.mkdir()
            os.rename(src, job / "instances")  # later instances of this series start a new folder
            _fsync_dir(job)
            try:
                src.parent.rmdir()
            except OSError:
                pass  # another series of the study is still there
            first = self._first_seen.pop(key, None)
            for state in (self._last_seen, self._received):
                state.pop(key, None)
            self._released.discard(key)
        n = sum(1 for _ in (job / "instances").glob("*.dcm"))
        log.info("segmenting series %s (%d instances)", series, n)
        t0 = time.perf_counter()
        try:
            result = dict(self.process(job / "instances", job / "output") or {})
        except Exception as e:  # noqa: BLE001 - the Segmenter should not raise; a custom processor might
            log.exception("processing series %s raised", series)
            result = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        seconds = time.perf_counter() - t0
        seg = Path(result["dicom_seg"]) if result.get("dicom_seg") else None
        if result.get("status") == "ok" and (seg is None or not seg.is_file()):
            result.update(status="failed", error=f"the segmenter reported success but wrote no SEG ({seg})")
        record = {
            "study_uid": study,
            "series_uid": series,
            "instances": n,
            "status": result.get("status"),
            "error": result.get("error"),
            "volume_ml": result.get("volume_ml"),
            "segment_seconds": round(seconds, 2),
        }
        if result.get("status") != "ok" and _out_of_space(str(result.get("error"))):
            self._retry_later(job, key, str(result.get("error")))
            return
        if result.get("status") != "ok":
            reason = " ".join(str(result.get("error") or "unknown error").split()) or "unknown error"
            _write_text(job / "reason.txt", reason + "\n")
            write_json(record, job / "result.json")
            target = _unique(self.dirs["failed"] / series)
            os.replace(job, target)
            log.warning("series %s failed, no SEG: %s (moved to %s)", series, reason, target)
            self._tidy(job.parent)
            return
        (job / "output").mkdir(exist_ok=True)
        if job not in seg.resolve().parents:  # keep the SEG with its series whatever the processor did
            shutil.copy2(seg, job / "output" / seg.name)
            seg = job / "output" / seg.name
        rel = seg.resolve().relative_to(job.resolve())
        record["dicom_seg"] = str(rel)
        if self.destination:
            _write_text(job / "unsent.txt", "not sent yet\n")  # a crash while sending leaves this for the restart
        write_json(record, job / "result.json")
        target = _unique(self.dirs["done"] / series)
        os.replace(job, target)
        self._tidy(job.parent)
        log.info("series %s segmented in %.1f s (%s mL): %s", series, seconds, result.get("volume_ml"), target / rel)
        if self.destination:
            self._send_from(target, first)

    def _retry_later(self, job: Path, key: Key, error: str) -> None:
        """A series that could not be processed for want of space (or whose record could not be written) goes back
        to incoming/, to be processed again after the quiet period: a full disk is not the series' fault."""
        try:
            moved = self._back_to_incoming(job)
        except OSError:
            log.exception("series %s: could not be moved back to incoming/; it stays in processing/ until the "
                          "next start", key[1])  # fmt: skip
            return
        with self._lock:
            self._last_seen[key] = time.monotonic()
        log.error(
            "series %s not processed (%s): back to incoming/ (%d files), tried again after %.0f s quiet",
            key[1],
            " ".join(error.split())[:300],
            moved,
            self.quiet_seconds,
        )

    def _tidy(self, study_dir: Path) -> None:
        try:
            study_dir.rmdir()
        except OSError:
            pass

    def _send_from(self, folder: Path, first_seen: Optional[float] = None) -> bool:
        """Send the SEG of a done/ folder; on failure leave ``unsent.txt`` with the reason (retried at restart)."""
        try:
            record = json.loads((folder / "result.json").read_text())
            seg = folder / record["dicom_seg"]
            seconds = send_file(
                seg, self.destination, ae_title=self.ae_title, retries=self.send_retries, stop=self._stop, tls=self.tls
            )
        except (SendError, OSError, KeyError, ValueError) as e:
            _write_text(folder / "unsent.txt", f"{e}\n")
            log.error("SEG of %s NOT sent (kept in %s): %s", folder.name, folder, e)
            return False
        (folder / "unsent.txt").unlink(missing_ok=True)
        since = f"; {time.monotonic() - first_seen:.1f} s after its first instance" if first_seen else ""
        log.info("SEG of series %s sent to %s@%s:%s in %.1f s%s", folder.name, *self.destination, seconds, since)
        return True
