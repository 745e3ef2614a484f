"""Sending a DICOM file to a Storage SCP (a C-STORE SCU with retries): how the DICOM node hands its SEGs to the
destination, e.g. the PACS the series came from.

``--destination`` is written ``AET@HOST:PORT`` (:func:`parse_destination`); :func:`send_file` tries up to
``retries`` times, 2 s, 4 s, 8 s... apart, and counts the storage warnings (0xB000, 0xB006, 0xB007: the destination
kept the object) as success.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple

from medssl.data import DataError

if TYPE_CHECKING:
    from medssl.clinic.dicom_tls import Tls

__all__ = ["SEND_OK", "SendError", "parse_destination", "send_file"]

log = logging.getLogger("medssl.clinic.dicom_node")  # the node's log: a person reads one log per node

SEND_OK = {0x0000, 0xB000, 0xB006, 0xB007}  # success and the storage warnings (the destination kept the SEG)


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


def send_file(
    path: os.PathLike | str,
    destination: Tuple[str, str, int],
    ae_title: str = "MEDSSL",
    retries: int = 3,
    timeout: float = 60.0,
    stop: Optional[threading.Event] = None,
    tls: Optional["Tls"] = None,
) -> float:
    """C-STORE the DICOM file ``path`` to ``destination`` ``(aet, host, port)``, trying up to ``retries`` times
    (2 s, 4 s, 8 s... apart); returns the seconds it took. With ``tls`` (:class:`medssl.clinic.dicom_tls.Tls`) over
    DICOM TLS: the destination's certificate checked, this node's presented.

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
    tls_args = (tls.client_context(), host) if tls else None
    reason = "no attempt made"
    for attempt in range(1, max(1, int(retries)) + 1):
        try:
            assoc = ae.associate(host, port, ae_title=aet, tls_args=tls_args)
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
                reason = "association aborted or destination unreachable" + (
                    " (or the TLS handshake failed: the destination's certificate, its CA, its name)" if tls else ""
                )
        except (OSError, ValueError, RuntimeError) as e:  # pynetdicom raises ValueError when no context fits
            reason = f"{type(e).__name__}: {e}"
        log.warning(
            "sending %s to %s@%s:%s, attempt %d/%d: %s", Path(path).name, aet, host, port, attempt, retries, reason
        )
        if attempt < retries and (stop.wait(2.0**attempt) if stop else time.sleep(2.0**attempt)):
            break
    raise SendError(f"{path}: not stored at {aet}@{host}:{port} after {retries} attempt(s): {reason}")
