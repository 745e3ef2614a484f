"""DICOM TLS for the node: ``--tls_cert``, ``--tls_key``, ``--tls_ca`` (PS3.15 B.1, the TLS secure transport
connection profile; TLS 1.2 or newer).

With a certificate and its key the node's Storage SCP speaks TLS only (a plain TCP caller gets no association), and
its SEG sends go over TLS too, presenting the same certificate. With ``--tls_ca`` (PEM, one or more CA certificates)
TLS is mutual: a caller must present a certificate signed by one of them, or the handshake fails (logged with the
caller's address); the destination's certificate is checked against the same CAs and its host name or IP address
(``--tls_check_hostname false`` skips the name check where a PACS's certificate does not name its address). Without
a CA, callers need no certificate and the destination is checked against the system's CAs.

A handshake runs with a 10 s limit: a caller that connects and stays silent cannot hold the node for longer.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from medssl.data import DataError, as_bool

log = logging.getLogger("medssl.clinic.dicom_node")  # the node's log

__all__ = ["Tls", "HANDSHAKE_SECONDS"]

HANDSHAKE_SECONDS = 10.0


class _ServerContext(ssl.SSLContext):
    """The SCP's context: every handshake bounded in time, and a failed one logged with the peer's address (pynetdicom
    wraps each accepted socket with it and would drop a failure silently)."""

    def wrap_socket(self, sock, *args, **kwargs):  # noqa: D102 - ssl.SSLContext's
        try:
            peer = "%s:%s" % sock.getpeername()[:2]
        except OSError:
            peer = "an unknown address"
        sock.settimeout(HANDSHAKE_SECONDS)
        try:
            wrapped = super().wrap_socket(sock, *args, **kwargs)
        except (ssl.SSLError, OSError) as e:
            log.warning("refused a TLS connection from %s: %s", peer, getattr(e, "reason", None) or e)
            try:
                sock.close()
            except OSError:
                pass
            raise
        wrapped.settimeout(None)
        return wrapped


def _file(path, key: str) -> Optional[str]:
    if path is None or str(path).strip() == "":
        return None
    p = Path(str(path)).expanduser().resolve()
    if not p.is_file():
        raise DataError(f"{key} {str(path)!r}: file not found (expected a PEM file).")
    return str(p)


@dataclass(frozen=True)
class Tls:
    """The node's TLS settings (see the module doc); :meth:`from_options` checks the files by loading them."""

    cert: str
    key: str
    ca: Optional[str] = None
    check_hostname: bool = True

    @classmethod
    def from_options(cls, tls_cert=None, tls_key=None, tls_ca=None, tls_check_hostname=True) -> Optional["Tls"]:
        """None when no option is given.

        Raises:
            DataError: a key without a certificate or the other way round, a CA without both, a missing or
                unreadable file, a key that does not match the certificate (each naming the option and file).
        """
        cert, key, ca = _file(tls_cert, "--tls_cert"), _file(tls_key, "--tls_key"), _file(tls_ca, "--tls_ca")
        if not (cert or key or ca):
            return None
        if not (cert and key):
            raise DataError("--tls_cert and --tls_key: give both (the node's certificate and its private key, PEM)"
                            + (", --tls_ca needs them" if ca else "") + ".")  # fmt: skip
        tls = cls(cert, key, ca, as_bool(tls_check_hostname, "tls_check_hostname"))
        tls.server_context()  # load everything now: a bad file fails at start, naming itself
        return tls

    def _load(self, context: ssl.SSLContext) -> ssl.SSLContext:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as e:
            raise DataError(f"--tls_cert {self.cert} / --tls_key {self.key}: not a PEM certificate and its matching "
                            f"private key ({e}).") from None  # fmt: skip
        if self.ca:
            try:
                context.load_verify_locations(cafile=self.ca)
            except (ssl.SSLError, OSError) as e:
                raise DataError(f"--tls_ca {self.ca}: not PEM CA certificates ({e}).") from None
        return context

    def server_context(self) -> ssl.SSLContext:
        """For the Storage SCP: callers must present a certificate of ``ca`` when it is given (mutual TLS)."""
        context = self._load(_ServerContext(ssl.PROTOCOL_TLS_SERVER))
        context.verify_mode = ssl.CERT_REQUIRED if self.ca else ssl.CERT_NONE
        return context

    def client_context(self) -> ssl.SSLContext:
        """For the SEG sends: the destination checked against ``ca`` (or the system's CAs), this node's certificate
        presented."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = self.check_hostname
        context.verify_mode = ssl.CERT_REQUIRED
        if not self.ca:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        return self._load(context)

    def describe(self) -> str:
        return f"TLS ({'mutual, CA ' + os.path.basename(self.ca) if self.ca else 'callers need no certificate'})"

