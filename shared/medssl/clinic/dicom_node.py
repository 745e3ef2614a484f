"""``python -m medssl dicom_node``: a DICOM node that segments the MR series it receives and sends back a DICOM SEG.

    python -m medssl dicom_node --ae_title MEDSSL --port 11112 --destination ORTHANC@pacs.local:4242 --workdir DIR

A Storage SCP (pynetdicom) accepts MR series by C-STORE and answers C-ECHO. Each series is segmented once it is
complete, that is when the association that sent it is released, or after ``--quiet_seconds`` without a new instance
of it (senders that never release, aborted associations, series left over from a previous run); the DICOM SEG is then
C-STOREd to ``--destination``.

Nothing received is lost. Every instance is written to
``DIR/incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` (temporary file, fsync, rename, fsync of
the folder) before the C-STORE is acknowledged. The worker moves a series it takes to ``DIR/processing/`` and, when
done, to ``DIR/done/<SeriesInstanceUID>/`` (``instances/``, ``output/`` with the SEG, ``result.json``) or to
``DIR/failed/<SeriesInstanceUID>/`` (``instances/``, ``reason.txt``, ``result.json``); a series received again gets
``<SeriesInstanceUID>.2``, ``.3``... A restart picks up what was left: series in ``incoming/`` are processed after the
quiet period (so a sender that resumes may complete them first), series caught in ``processing/`` go back to
``incoming/``, partial files in ``DIR/tmp/`` (never acknowledged) are deleted, and SEGs that could not be sent
(``done/*/unsent.txt``) are sent again.

A bad series (no pixel data, a single 2D slice, missing slices, mixed orientations, or anything the segmenter
refuses) goes to ``failed/`` with a one-line reason and no SEG; the node keeps serving. The work queue is bounded
(``--max_queue`` series): when it is full, complete series simply wait in ``incoming/`` and are queued as room
frees up, so a flood costs disk, never data. One worker thread runs the model, one series at a time, outside the
associations. The model is built once, right after the port is bound (instances arriving meanwhile are stored and
wait; a bad ``--bundle`` or ``--device`` stops the node at once); "listening as ..." in the log means ready. An
instance that arrives after its series was taken starts a new folder and is processed on its own (usually failing
as a single slice): send a series in one go, or within the quiet period.

The log says, per series: receiving (from whom), received with N instances (release or quiet period) and queued,
segmenting, segmented in S s (volume) or failed with the reason, SEG sent in S s and how long after the first
instance; refusals and send failures name the instance or file and the reason.

What is accepted: MR Image Storage (one slice per instance), uncompressed transfer syntaxes (a sender such as
Orthanc transcodes compressed images). Every other storage SOP class (Enhanced MR, CT, SEG...) is negotiated so that
the sender gets a clear per-instance refusal, status 0x0122 (SOP class not supported), and a log line, rather than
an association without usable contexts. A data set that cannot be decoded gets 0xC210, one whose UIDs are missing
or not valid UIDs (they become folder names) or disagree with the request gets 0xA900, a disk error gets 0xA700.

Options (defaults): ``--workdir dicom_node``, ``--ae_title MEDSSL``, ``--host 127.0.0.1`` (loopback only: this node
has no TLS and no user identity check; use ``--host 0.0.0.0`` to listen on every interface of a trusted network),
``--port 11112``, ``--destination AET@HOST:PORT`` (none: SEGs stay in ``done/``), ``--quiet_seconds 10``,
``--max_queue 16``, ``--send_retries 3`` (attempts per SEG, 2 s then 4 s... apart), ``--bundle la_seg_finetune``,
``--index``, ``--bundle_dir``, ``--device`` (default: the GPU if there is one), ``--largest_component true``.
SIGINT/SIGTERM stop the node after the series being segmented (if any); anything not finished is picked up at the
next start.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from medssl.data import DataError, as_bool, atomic_path, write_json
from medssl.clinic.dicom import MR_IMAGE_STORAGE

__all__ = ["DicomNode", "SegmenterProcessor", "SendError", "parse_destination", "send_file", "dicom_node"]

log = logging.getLogger("medssl.clinic.dicom_node")

VERIFICATION = "1.2.840.10008.1.1"
ACCEPTED_SOP_CLASSES = {MR_IMAGE_STORAGE: "MR Image Storage"}
# C-STORE statuses (PS3.4 B.2.3 / PS3.7 C.4.2.1.4)
SUCCESS = 0x0000
REFUSED_SOP_CLASS = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210
SEND_OK = {0x0000, 0xB000, 0xB006, 0xB007}  # success and the storage warnings (the destination kept the SEG)

UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")  # used with fullmatch: UIDs become folder names

Key = Tuple[str, str]  # (StudyInstanceUID, SeriesInstanceUID)
Processor = Callable[[Path, Path], Dict[str, Any]]


class SendError(RuntimeError):
    """A SEG could not be stored at the destination (the message says why: refused, unreachable, status)."""


def parse_destination(destination: Optional[str]) -> Optional[Tuple[str, str, int]]:
    """``AET@HOST:PORT`` as ``(aet, host, port)``; None or "" gives None.

    Raises:
        DataError: not of that form, an AE title over 16 characters, or a port outside 1-65535.
    """
    if destination is None or str(destination).strip() == "":
        return None
    m = re.fullmatch(r"\s*([^@]{1,16})@(\[[^\]]+\]|[^:@]+):(\d+)\s*", str(destination))
    if not m or not m.group(1).strip() or not 0 < int(m.group(3)) < 65536:
        raise DataError(
            f"--destination {destination!r}: expected AET@HOST:PORT (AE title of 1-16 characters, port 1-65535), "
            "e.g. ORTHANC@127.0.0.1:4242."
        )
    return m.group(1).strip(), m.group(2).strip("[]"), int(m.group(3))


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


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _quick_ack(event) -> None:
    """Acknowledge TCP segments at once. DCMTK as built by Debian (hence Orthanc) leaves Nagle's algorithm on and
    writes each C-STORE request in pieces: the second piece waits for our ACK of the first, which Linux delays by
    ~40 ms right after we sent a response; 88 slices took 4.4 s instead of 0.7 s. The flag is not sticky, so it is
    set again after every PDU sent and received."""
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    except (AttributeError, OSError):
        pass  # TLS wrapper, closed socket...: only a speed-up


def send_file(
    path: os.PathLike | str,
    destination: Tuple[str, str, int],
    ae_title: str = "MEDSSL",
    retries: int = 3,
    timeout: float = 60.0,
    stop: Optional[threading.Event] = None,
) -> float:
    """C-STORE the DICOM file ``path`` to ``destination`` ``(aet, host, port)``, trying up to ``retries`` times
    (2 s, 4 s, 8 s... apart); returns the seconds it took.

    Raises:
        SendError: every attempt failed (unreachable, association rejected or aborted, a failure status); the
            message has the last reason.
    """
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    start = time.perf_counter()
    ds = pydicom.dcmread(str(path))
    syntaxes = list(dict.fromkeys([ds.file_meta.TransferSyntaxUID, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(ds.SOPClassUID, syntaxes)
    aet, host, port = destination
    reason = "no attempt made"
    for attempt in range(1, max(1, int(retries)) + 1):
        try:
            assoc = ae.associate(host, port, ae_title=aet)
            if assoc.is_established:
                try:
                    status = assoc.send_c_store(ds)
                finally:
                    assoc.release()
                code = getattr(status, "Status", None)
                if code in SEND_OK:
                    return time.perf_counter() - start
                reason = "no answer (timeout or abort)" if code is None else f"status 0x{code:04X}"
            elif assoc.is_rejected:
                reason = "association rejected (check the destination's AE title and that it knows this node)"
            else:
                reason = "association aborted or destination unreachable"
        except (OSError, ValueError, RuntimeError) as e:  # pynetdicom raises ValueError when no context fits
            reason = f"{type(e).__name__}: {e}"
        log.warning(
            "sending %s to %s@%s:%s, attempt %d/%d: %s", Path(path).name, aet, host, port, attempt, retries, reason
        )
        if attempt < retries and (stop.wait(2.0**attempt) if stop else time.sleep(2.0**attempt)):
            break
    raise SendError(f"{path}: not stored at {aet}@{host}:{port} after {retries} attempt(s): {reason}")


class SegmenterProcessor:
    """The default processing: :class:`medssl.clinic.segment.Segmenter` (model built once) writing a DICOM SEG.

    Raises (at construction):
        medssl.clinic.release.ReleaseError, FileNotFoundError, DataError: the bundle cannot be pulled or has no weights.
    """

    def __init__(self, **options: Any):
        """``options``: :class:`medssl.clinic.segment.Segmenter`'s (``bundle``, ``index``, ``bundle_dir``, ``device``,
        ``largest_component``...)."""
        from medssl.clinic.segment import Segmenter

        self.segmenter = Segmenter(progress=False, **options)

    def __call__(self, series_dir: Path, out_dir: Path) -> Dict[str, Any]:
        """Segment the one series in ``series_dir``; the result dict of :meth:`Segmenter.segment`."""
        out_dir.mkdir(parents=True, exist_ok=True)
        results = self.segmenter.segment([str(series_dir)], out=str(out_dir), output_type="dicom_seg")
        if not results:
            return {"status": "failed", "error": f"{series_dir}: the segmenter returned no result"}
        return next((r for r in results if r.get("status") == "ok"), results[0])


class DicomNode:
    """Storage SCP + worker: see the module docstring.

    Args:
        workdir: folder for ``incoming/``, ``processing/``, ``done/``, ``failed/``, ``tmp/`` (created).
        ae_title, host, port: where the node listens (``port=0``: a free port, see :attr:`port` after start).
        destination: ``AET@HOST:PORT`` or ``(aet, host, port)`` for the SEGs; None keeps them in ``done/``.
        quiet_seconds: a series with no new instance for this long is taken as complete.
        max_queue: bound of the work queue (complete series beyond it wait in ``incoming/``).
        process: ``process(series_dir, out_dir) -> {"status": "ok"|"failed", "error", "dicom_seg", ...}``; default a
            :class:`SegmenterProcessor` built at :meth:`start` from ``processor_options``.
        send_retries: attempts per SEG.

    Raises:
        DataError: a bad destination, AE title, port, quiet period or queue bound.
    """

    def __init__(
        self,
        workdir: os.PathLike | str = "dicom_node",
        ae_title: str = "MEDSSL",
        host: str = "127.0.0.1",
        port: int = 11112,
        destination: Any = None,
        quiet_seconds: float = 10.0,
        max_queue: int = 16,
        process: Optional[Processor] = None,
        send_retries: int = 3,
        processor_options: Optional[Dict[str, Any]] = None,
    ):
        self.workdir = Path(workdir).expanduser().resolve()
        self.ae_title = str(ae_title).strip()
        if not 0 < len(self.ae_title) <= 16 or "\\" in self.ae_title:
            raise DataError(f"--ae_title {ae_title!r}: an AE title has 1-16 characters and no backslash.")
        self.host = str(host)
        self.port = int(port)
        if not 0 <= self.port < 65536:
            raise DataError(f"--port {port}: expected 0-65535.")
        self.destination = destination if isinstance(destination, tuple) else parse_destination(destination)
        self.quiet_seconds = float(quiet_seconds)
        if self.quiet_seconds <= 0:
            raise DataError(f"--quiet_seconds {quiet_seconds}: must be > 0.")
        if int(max_queue) < 1:
            raise DataError(f"--max_queue {max_queue}: must be >= 1.")
        self.max_queue = int(max_queue)
        self.send_retries = max(1, int(send_retries))
        self.process = process
        self.processor_options = dict(processor_options or {})
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
        self._unsent: List[Path] = []
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._server = None
        self.busy = threading.Event()  # set while a series is being processed (tests, status)

    # lifecycle ---------------------------------------------------------------------------------------------------

    def start(self) -> "DicomNode":
        """Recover what a previous run left, build the model, start the SCP, the worker and the sweeper.

        Raises:
            RuntimeError: the port cannot be bound.
            medssl.clinic.release.ReleaseError, FileNotFoundError, DataError: the default processor cannot be built.
        """
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE, StoragePresentationContexts, evt

        # pynetdicom logs every PDU, highdicom every module it copies, ignite every run: a person reads this log
        for name in ("pynetdicom", "highdicom", "ignite.engine"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        self._recover()
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.network_timeout = 120  # an idle or silent peer is dropped after this
        ae.maximum_pdu_size = 0
        uncompressed = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]
        ae.add_supported_context(VERIFICATION)
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, uncompressed)
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        if hasattr(socket, "TCP_QUICKACK"):
            handlers += [(evt.EVT_PDU_RECV, _quick_ack), (evt.EVT_PDU_SENT, _quick_ack)]
        # listen before building the model: a taken port fails at once, and senders are served (stored) meanwhile
        failure = None
        try:
            self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        except OSError as e:
            failure = f"dicom_node: cannot listen on {self.host}:{self.port}: {e.strerror or e}"
        if failure:  # raised outside the except block: the CLI prints the innermost cause of a chain
            raise RuntimeError(failure)
        self.port = self._server.server_address[1]
        if self.process is None:
            log.info("building the model (%s)", self.processor_options.get("bundle", "la_seg_finetune"))
            try:
                self.process = SegmenterProcessor(**self.processor_options)
            except BaseException:
                self._server.shutdown()
                self._server = None
                raise
        self._stop.clear()
        for name, target in (("worker", self._work), ("sweeper", self._sweep_loop)):
            t = threading.Thread(target=target, name=f"dicom_node-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        dest = "%s@%s:%s" % self.destination if self.destination else "none (SEGs stay in done/)"
        log.info(
            "listening as %s on %s:%d; destination %s; workdir %s; quiet %.0f s; queue bound %d",
            self.ae_title,
            self.host,
            self.port,
            dest,
            self.workdir,
            self.quiet_seconds,
            self.max_queue,
        )
        return self

    def stop(self, timeout: float = 120.0) -> None:
        """Stop accepting associations, let the worker finish its current series (up to ``timeout`` s)."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        for t in self._threads:
            t.join(timeout=timeout)
        self._threads = []

    def serve_forever(self) -> None:
        """:meth:`start`, then run until SIGINT/SIGTERM."""
        self.start()
        done = threading.Event()

        def _signal(signum, _frame):
            log.info("signal %d: stopping (what is left is picked up at the next start)", signum)
            done.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _signal)
        try:
            while not done.wait(1.0):
                pass
        finally:
            self.stop()

    def __enter__(self) -> "DicomNode":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # storage ------------------------------------------------------------------------------------------------------

    def _series_dir(self, key: Key) -> Path:
        return self.dirs["incoming"] / key[0] / key[1]

    def _store(self, key: Key, sop_uid: str, data: bytes) -> Path:
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

    def _on_echo(self, event) -> int:
        return SUCCESS

    def _on_store(self, event) -> int:
        """C-STORE: check, write durably, then acknowledge; never raises (a bad request gets an error status)."""
        peer = f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"
        try:
            sop_class = str(event.request.AffectedSOPClassUID)
            sop_uid = str(event.request.AffectedSOPInstanceUID)
        except Exception as e:  # noqa: BLE001 - a malformed request must not reach pynetdicom's catch-all
            log.warning("refused a C-STORE from %s: unreadable request (%s)", peer, e)
            return CANNOT_UNDERSTAND
        if sop_class not in ACCEPTED_SOP_CLASSES:
            log.warning(
                "refused instance %s from %s: SOP class %s is not accepted (only %s)",
                sop_uid,
                peer,
                sop_class,
                ", ".join(ACCEPTED_SOP_CLASSES.values()),
            )
            return REFUSED_SOP_CLASS
        try:
            ds = event.dataset
            uids = [str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)]
            ds_class = str(ds.SOPClassUID)
        except Exception as e:  # noqa: BLE001 - undecodable bytes: pydicom raises many kinds
            log.warning("refused instance %s from %s: data set cannot be decoded or lacks UIDs (%s)", sop_uid, peer, e)
            return CANNOT_UNDERSTAND
        bad = [u for u in uids if not (UID_RE.fullmatch(u) and len(u) <= 64)]
        if bad or uids[2] != sop_uid or ds_class != sop_class:
            why = f"invalid UID {bad[0]!r}" if bad else "SOP instance/class UIDs differ from the request's"
            log.warning("refused instance %s from %s: %s", sop_uid, peer, why)
            return DATASET_MISMATCH
        key: Key = (uids[0], uids[1])
        try:
            self._store(key, sop_uid, event.encoded_dataset())
        except OSError as e:
            log.error("could not store instance %s of series %s from %s: %s", sop_uid, key[1], peer, e)
            return OUT_OF_RESOURCES
        with self._lock:
            series = self._assoc_series.setdefault(id(event.assoc), set())
            if key not in series:
                series.add(key)
                self._active[key] = self._active.get(key, 0) + 1
                self._released.discard(key)
                log.info("receiving series %s (study %s) from %s", key[1], key[0], peer)
        return SUCCESS

    def _on_released(self, event) -> None:
        """A released association completes the series it sent (unless another open association still sends)."""
        with self._lock:
            keys = self._assoc_series.pop(id(event.assoc), set())
            for key in keys:
                self._active[key] = max(0, self._active.get(key, 1) - 1)
                self._released.add(key)
        if keys:
            self._sweep()

    def _on_closed(self, event) -> None:
        """Aborted or dropped: the series wait for the quiet period (the sender may come back and finish)."""
        with self._lock:
            for key in self._assoc_series.pop(id(event.assoc), set()):
                self._active[key] = max(0, self._active.get(key, 1) - 1)

    # scheduling ---------------------------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Tidy what a previous run left: partial writes, series caught in processing/, unsent SEGs."""
        for p in self.dirs["tmp"].iterdir():
            p.unlink() if p.is_file() else shutil.rmtree(p, ignore_errors=True)
        for job in sorted(self.dirs["processing"].glob("*/*")):
            src = job / "instances"
            target = self.dirs["incoming"] / job.parent.name / job.name
            target.mkdir(parents=True, exist_ok=True)
            moved = 0
            for f in src.glob("*.dcm") if src.is_dir() else []:
                if not (target / f.name).exists():
                    os.replace(f, target / f.name)
                    moved += 1
            _fsync_dir(target)
            shutil.rmtree(job)
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

    def _sweep_loop(self) -> None:
        interval = min(1.0, self.quiet_seconds / 4)
        while not self._stop.wait(interval):
            try:
                self._sweep()
            except Exception:  # noqa: BLE001 - the sweeper must survive e.g. a folder removed by hand
                log.exception("sweeping incoming/")

    def _sweep(self) -> None:
        """Queue every complete series in ``incoming/`` that is not queued yet (as many as the bound allows)."""
        now = time.monotonic()
        with self._lock:
            for folder in sorted(self.dirs["incoming"].glob("*/*")):
                key: Key = (folder.parent.name, folder.name)
                if key in self._queued or not folder.is_dir():
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
            except Exception:  # noqa: BLE001 - one series' disaster must not stop the node
                log.exception("processing series %s", key[1])
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
                seg, self.destination, ae_title=self.ae_title, retries=self.send_retries, stop=self._stop
            )
        except (SendError, OSError, KeyError, ValueError) as e:
            _write_text(folder / "unsent.txt", f"{e}\n")
            log.error("SEG of %s NOT sent (kept in %s): %s", folder.name, folder, e)
            return False
        (folder / "unsent.txt").unlink(missing_ok=True)
        since = f"; {time.monotonic() - first_seen:.1f} s after its first instance" if first_seen else ""
        log.info("SEG of series %s sent to %s@%s:%s in %.1f s%s", folder.name, *self.destination, seconds, since)
        return True


def dicom_node(
    workdir: str = "dicom_node",
    ae_title: str = "MEDSSL",
    port: int = 11112,
    destination: Optional[str] = None,
    host: str = "127.0.0.1",
    quiet_seconds: float = 10.0,
    max_queue: int = 16,
    send_retries: int = 3,
    bundle: str = "la_seg_finetune",
    index: Optional[str] = None,
    bundle_dir: Optional[str] = None,
    device: Optional[str] = None,
    largest_component: Any = True,
    runtime: Optional[str] = None,
) -> None:
    """Run the node until SIGINT/SIGTERM (see the module docstring).

    Raises:
        DataError: bad options; RuntimeError: the port cannot be bound; the processor's errors (bad bundle).
    """
    node = DicomNode(
        workdir=workdir,
        ae_title=ae_title,
        host=host,
        port=port,
        destination=destination,
        quiet_seconds=quiet_seconds,
        max_queue=max_queue,
        send_retries=send_retries,
        processor_options={
            "bundle": bundle,
            "index": index,
            "bundle_dir": bundle_dir,
            "device": device,
            "largest_component": as_bool(largest_component, "largest_component"),
            "runtime": runtime,
        },
    )
    node.serve_forever()
