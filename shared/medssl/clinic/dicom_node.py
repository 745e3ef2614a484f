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

What is accepted: the image storage of the bundle's modality (its metadata's ``modality``: MR Image Storage, or CT
Image Storage for a CT bundle; one slice per instance), uncompressed transfer syntaxes (a sender such as Orthanc
transcodes compressed images). Every other storage SOP class (Enhanced MR, the other modality, SEG...) is negotiated
so that the sender gets a clear per-instance refusal, status 0x0122 (SOP class not supported), and a log line, rather
than an association without usable contexts. While the model is being built (the first seconds after the start) both
are stored; a series of the other modality then fails with the segmenter's one-line reason. A data set that cannot
be decoded gets 0xC210, one whose UIDs are missing or not valid UIDs (they become folder names) or disagree with the
request gets 0xA900, a disk error gets 0xA700 (not acknowledged: the series is then held in ``incoming/``, neither
its release nor its quiet period completes it, until the sender sends into it again without a refusal; a series that
cannot be processed for want of space goes back to ``incoming/`` and is tried again after the quiet period).

Options (defaults): ``--workdir dicom_node``, ``--ae_title MEDSSL``, ``--host 127.0.0.1`` (loopback only;
``--host 0.0.0.0`` listens on every interface), ``--allow AE@HOST,...`` / ``--allow_file FILE`` (the callers let in,
others rejected at A-ASSOCIATE: :mod:`medssl.clinic.dicom_allow`; default the destination's AE title from its host, plus
loopback), ``--tls_cert`` / ``--tls_key`` [``--tls_ca`` for mutual TLS, ``--tls_check_hostname true``] (DICOM TLS for
the SCP and the sends: :mod:`medssl.clinic.dicom_tls`; default plain DICOM), ``--keep_days N`` / ``--max_done_gb X``
(what leaves ``done/``, oldest first, never a series whose SEG was not yet sent: :mod:`medssl.clinic.retention`;
default keep everything),
``--port 11112``, ``--destination AET@HOST:PORT`` (none: SEGs stay in ``done/``), ``--quiet_seconds 10``,
``--max_queue 16``, ``--send_retries 3`` (attempts per SEG, 2 s then 4 s... apart), ``--bundle la_seg_finetune``,
``--index``, ``--bundle_dir``, ``--device`` (default: the GPU if there is one), ``--largest_component true``.
SIGINT/SIGTERM stop the node after the series being segmented (if any); anything not finished is picked up at the
next start.

The parts: this module is the Storage SCP (presentation contexts, the C-ECHO and C-STORE handlers, the association
events) and the command; :mod:`medssl.clinic.series_queue` keeps the series on disk and runs the worker and the
sweeper; :mod:`medssl.clinic.dicom_send` sends the SEGs.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from medssl.clinic.dicom import CT_IMAGE_STORAGE, MR_IMAGE_STORAGE
from medssl.clinic.dicom_allow import REJECT_CALLING_AE, AllowList
from medssl.clinic.dicom_send import SendError, parse_destination, send_file  # part of this module's API, as before
from medssl.clinic.dicom_tls import Tls
from medssl.clinic.retention import Retention
from medssl.clinic.series_queue import Key, Processor, SeriesQueue
from medssl.data import DataError, as_bool

__all__ = ["DicomNode", "SegmenterProcessor", "SendError", "parse_destination", "send_file", "dicom_node"]

log = logging.getLogger("medssl.clinic.dicom_node")

VERIFICATION = "1.2.840.10008.1.1"
STORAGE_OF_MODALITY = {"MR": (MR_IMAGE_STORAGE, "MR Image Storage"), "CT": (CT_IMAGE_STORAGE, "CT Image Storage")}
ACCEPTED_SOP_CLASSES = {MR_IMAGE_STORAGE: "MR Image Storage"}  # a processor that says nothing of its modalities
# C-STORE statuses (PS3.4 B.2.3 / PS3.7 C.4.2.1.4)
SUCCESS = 0x0000
REFUSED_SOP_CLASS = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210

UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")  # used with fullmatch: UIDs become folder names


def _quick_ack(event) -> None:
    """Acknowledge TCP segments at once. DCMTK as built by Debian (hence Orthanc) leaves Nagle's algorithm on and
    writes each C-STORE request in pieces: the second piece waits for our ACK of the first, which Linux delays by
    ~40 ms right after we sent a response; 88 slices took 4.4 s instead of 0.7 s. The flag is not sticky, so it is
    set again after every PDU sent and received."""
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    except (AttributeError, OSError):
        pass  # TLS wrapper, closed socket...: only a speed-up


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
        self.modalities = tuple(self.segmenter.modalities)  # what the node accepts: the bundle's

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
        modalities: the modalities whose image storage is accepted (``("MR",)``, ``("CT",)``); default the
            processor's ``modalities`` (the bundle's metadata, for the default processor), else MR.
        allow, allow_file: the callers let in (:mod:`medssl.clinic.dicom_allow`); default the destination's AE title
            from its host, plus loopback.
        keep_days, max_done_gb: what leaves ``done/`` (:mod:`medssl.clinic.retention`); default keep everything.
        tls_cert, tls_key, tls_ca, tls_check_hostname: DICOM TLS for the SCP and the sends
            (:mod:`medssl.clinic.dicom_tls`); default none.

    Raises:
        DataError: a bad destination, AE title, port, quiet period, queue bound or caller entry.
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
        modalities: Optional[Sequence[str]] = None,
        allow: Any = None,
        allow_file: Optional[os.PathLike | str] = None,
        keep_days: Optional[float] = None,
        max_done_gb: Optional[float] = None,
        tls_cert: Optional[os.PathLike | str] = None,
        tls_key: Optional[os.PathLike | str] = None,
        tls_ca: Optional[os.PathLike | str] = None,
        tls_check_hostname: Any = True,
    ):
        unknown = [m for m in modalities or () if m not in STORAGE_OF_MODALITY]
        if unknown:
            raise DataError(f"modalities: {unknown} not accepted; expected some of {list(STORAGE_OF_MODALITY)}.")
        self.modalities = tuple(modalities) if modalities else None
        self.workdir = Path(workdir).expanduser().resolve()
        self.ae_title = str(ae_title).strip()
        if not 0 < len(self.ae_title) <= 16 or "\\" in self.ae_title:
            raise DataError(f"--ae_title {ae_title!r}: an AE title has 1-16 characters and no backslash.")
        self.host = str(host)
        self.port = int(port)
        if not 0 <= self.port < 65536:
            raise DataError(f"--port {port}: expected 0-65535.")
        self.destination = destination if isinstance(destination, tuple) else parse_destination(destination)
        self.callers = AllowList(allow, allow_file, self.destination)
        self.tls = Tls.from_options(tls_cert, tls_key, tls_ca, tls_check_hostname)
        self.quiet_seconds = float(quiet_seconds)
        if self.quiet_seconds <= 0:
            raise DataError(f"--quiet_seconds {quiet_seconds}: must be > 0.")
        if int(max_queue) < 1:
            raise DataError(f"--max_queue {max_queue}: must be >= 1.")
        self.max_queue = int(max_queue)
        self.send_retries = max(1, int(send_retries))
        self.process = process
        self.processor_options = dict(processor_options or {})
        self.series = SeriesQueue(
            self.workdir,
            self.quiet_seconds,
            self.max_queue,
            destination=self.destination,
            ae_title=self.ae_title,
            send_retries=self.send_retries,
            retention=Retention(keep_days, max_done_gb),
            tls=self.tls,
        )
        if self.series.retention.active and not self.destination:
            log.warning("--keep_days / --max_done_gb without --destination: the SEGs in done/ are removed too")
        self._server = None
        self.busy = self.series.busy  # set while a series is being processed (tests, status)

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
        self.series.recover()
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
            (evt.EVT_REQUESTED, self._on_requested),
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
            self._server = ae.start_server(
                (self.host, self.port), block=False, evt_handlers=handlers,
                ssl_context=self.tls.server_context() if self.tls else None,
            )  # fmt: skip
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
        self.series.process = self.process
        self.series.start()
        dest = "%s@%s:%s" % self.destination if self.destination else "none (SEGs stay in done/)"
        log.info(
            "listening as %s on %s:%d (%s); callers %s; destination %s; workdir %s (%s); quiet %.0f s; queue bound %d",
            self.ae_title,
            self.host,
            self.port,
            self.tls.describe() if self.tls else "no TLS",
            self.callers.describe(),
            dest,
            self.workdir,
            self.series.retention.describe(),
            self.quiet_seconds,
            self.max_queue,
        )
        return self

    def stop(self, timeout: float = 120.0) -> None:
        """Stop accepting associations, let the worker finish its current series (up to ``timeout`` s)."""
        self.series.request_stop()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.series.stop(timeout)

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

    # associations -------------------------------------------------------------------------------------------------

    def accepted_sop_classes(self) -> Dict[str, str]:
        """SOP class UID -> name of what C-STORE accepts now: the image storage of :attr:`modalities`, else of the
        processor's ``modalities``; both MR and CT while the default processor is being built."""
        if self.modalities is None and self.process is None:
            return dict(STORAGE_OF_MODALITY.values())
        modalities = self.modalities or getattr(self.process, "modalities", None)
        if not modalities:
            return dict(ACCEPTED_SOP_CLASSES)
        return dict(STORAGE_OF_MODALITY[m] for m in modalities if m in STORAGE_OF_MODALITY)

    def _on_requested(self, event) -> None:
        """A-ASSOCIATE-RQ received: a caller not in :attr:`callers` is rejected before any negotiation."""
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = assoc.requestor.address
        if self.callers.permits(calling, address):
            return
        log.warning(
            "rejected association from %s@%s (called %s): not an allowed caller (%s)",
            calling,
            address,
            str(assoc.requestor.primitive.called_ae_title).strip(),
            self.callers.describe(),
        )
        assoc.acse.send_reject(*REJECT_CALLING_AE)
        assoc.kill()

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
        accepted = self.accepted_sop_classes()
        if sop_class not in accepted:
            log.warning(
                "refused instance %s from %s: SOP class %s is not accepted (only %s)",
                sop_uid,
                peer,
                sop_class,
                ", ".join(accepted.values()),
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
            self.series.store(key, sop_uid, event.encoded_dataset())
        except OSError as e:
            log.error("could not store instance %s of series %s from %s: %s", sop_uid, key[1], peer, e)
            self.series.refused(id(event.assoc), key)
            return OUT_OF_RESOURCES
        if self.series.opened(id(event.assoc), key):
            log.info("receiving series %s (study %s) from %s", key[1], key[0], peer)
        return SUCCESS

    def _on_released(self, event) -> None:
        """A released association completes the series it sent (unless another open association still sends)."""
        self.series.released(id(event.assoc))

    def _on_closed(self, event) -> None:
        """Aborted or dropped: the series wait for the quiet period (the sender may come back and finish)."""
        self.series.closed(id(event.assoc))


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
    allow: Any = None,
    allow_file: Optional[str] = None,
    keep_days: Optional[float] = None,
    max_done_gb: Optional[float] = None,
    tls_cert: Optional[str] = None,
    tls_key: Optional[str] = None,
    tls_ca: Optional[str] = None,
    tls_check_hostname: Any = True,
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
        allow=allow,
        allow_file=allow_file,
        keep_days=keep_days,
        max_done_gb=max_done_gb,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        tls_check_hostname=tls_check_hostname,
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
