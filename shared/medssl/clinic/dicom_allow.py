"""Who may associate with the DICOM node: ``--allow AE@host,...`` and ``--allow_file``.

An entry is ``AE@HOST``: ``AE`` a calling AE title (1-16 characters) or ``*`` (any); ``HOST`` an IP address, a network
in CIDR form (``10.1.2.0/24``), a host name (resolved to all its addresses when the node starts) or ``*`` (any host).
A caller is let in when one entry matches both its calling AE title and the address it connects from; anyone else
is rejected at A-ASSOCIATE with the standard reason "calling AE title not recognised" (result 1 rejected-permanent,
source 1 service user, diagnostic 3; the standard has no reason for a host) and logged with its AE title and
address. C-ECHO is no exception: a rejected caller gets no association at all.

Default (neither option): the destination's AE title from the destination's host, plus any AE title from loopback
(127.0.0.1, ::1). With ``--allow`` / ``--allow_file`` exactly the entries given are let in (list ``*@127.0.0.1`` to
keep loopback). The file holds entries separated by commas or new lines, ``#`` starts a comment; it is read again
when it changes, so a hospital adds a modality without restarting the node; a file that no longer parses is logged
and the entries read before stay in force (a broken edit never opens the node up).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from medssl.data import DataError

log = logging.getLogger("medssl.clinic.dicom_node")  # the node's log

__all__ = ["CallerRule", "AllowList", "parse_rules", "REJECT_CALLING_AE"]

# A-ASSOCIATE-RJ: rejected-permanent, DICOM UL service-user, calling AE title not recognised (PS3.8 9.3.4)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
# the host itself: 127.0.0.1 and ::1 (not all of 127/8, whose other addresses a test may use to play other hosts)
LOOPBACK: Tuple[Network, ...] = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True)
class CallerRule:
    """One ``AE@HOST`` entry: ``ae`` None for any title; ``networks`` empty for any host."""

    text: str
    ae: Optional[str]
    networks: Tuple[Network, ...]

    def matches(self, ae_title: str, address: str) -> bool:
        if self.ae is not None and ae_title.strip() != self.ae:
            return False
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == n.version and ip in n for n in self.networks)


def _host_networks(host: str, where: str) -> Tuple[Network, ...]:
    if host == "*":
        return ()
    try:
        return (ipaddress.ip_network(host.strip("[]"), strict=False),)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        raise DataError(f"{where}: host {host!r} is not an IP address, a network (a.b.c.d/n) or a host name that "
                        f"resolves ({e}).") from None  # fmt: skip
    return tuple(sorted({ipaddress.ip_network(info[4][0].split("%", 1)[0]) for info in infos}, key=str))


def parse_rule(entry: str, where: str = "--allow") -> CallerRule:
    """One ``AE@HOST`` entry (see the module doc); DataError naming ``where`` and the entry otherwise."""
    text = entry.strip()
    ae, sep, host = text.rpartition("@")
    if not sep or not ae.strip() or not host.strip():
        raise DataError(f"{where}: {entry!r} is not AE@HOST (AE a calling AE title or *, HOST an address, a network, "
                        "a host name or *).")  # fmt: skip
    ae, host = ae.strip(), host.strip()
    if ae != "*" and (len(ae) > 16 or "\\" in ae or not ae.isprintable()):
        raise DataError(f"{where}: {entry!r}: an AE title has 1-16 printable characters and no backslash.")
    return CallerRule(text, None if ae == "*" else ae, _host_networks(host, f"{where}: {entry!r}"))


def parse_rules(text: str, where: str) -> List[CallerRule]:
    """Entries separated by commas or new lines, ``#`` comments; at least one (an empty list would let no one in)."""
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0]
        rules += [parse_rule(e, f"{where}:{number}" if "\n" in text else where) for e in line.split(",") if e.strip()]
    if not rules:
        raise DataError(f"{where}: no AE@HOST entry (to refuse everyone, stop the node).")
    return rules


def default_rules(destination: Optional[Tuple[str, str, int]]) -> List[CallerRule]:
    """The destination's AE title from its host, plus any AE title from loopback."""
    rules = [CallerRule("*@loopback", None, LOOPBACK)]
    if destination:
        aet, host, _port = destination
        rules.insert(0, CallerRule(f"{aet}@{host}", aet, _host_networks(host, f"--destination {aet}@{host}")))
    return rules


class AllowList:
    """The callers the node lets in (see the module doc); :meth:`permits` is what the SCP asks per association.

    Args:
        allow: ``"AE@host,..."`` or a sequence of entries (None: not given).
        allow_file: a file of entries (None: not given); read again whenever its modification time or size changes.
        destination: ``(aet, host, port)`` for the default when neither is given.

    Raises:
        DataError: an entry that does not parse (named, with the file and line), a missing file.
    """

    def __init__(
        self,
        allow: Union[str, Sequence[str], None] = None,
        allow_file: Optional[os.PathLike | str] = None,
        destination: Optional[Tuple[str, str, int]] = None,
    ):
        self._lock = threading.Lock()
        self.file = Path(allow_file).expanduser().resolve() if allow_file else None
        if allow is not None and not isinstance(allow, str):
            allow = ",".join(str(a) for a in allow)
        self._given = parse_rules(allow, "--allow") if allow is not None and allow.strip() else []
        if allow is not None and not self._given and self.file is None:
            raise DataError("--allow: no AE@HOST entry (to refuse everyone, stop the node).")
        self._stamp: Optional[Tuple] = None
        self._from_file: List[CallerRule] = []
        if self.file is not None:
            self._reload(initial=True)
        self._default = [] if (self._given or self.file) else default_rules(destination)

    @property
    def rules(self) -> List[CallerRule]:
        self._reload()
        with self._lock:
            return self._default + self._given + self._from_file

    def describe(self) -> str:
        where = f" (+ {self.file})" if self.file else ""
        return ", ".join(r.text for r in self.rules) + where

    def permits(self, ae_title: str, address: str) -> bool:
        return any(r.matches(ae_title, address) for r in self.rules)

    def _reload(self, initial: bool = False) -> None:
        """Read the file when it changed since the last look (a changed but broken file is logged once)."""
        if self.file is None:
            return
        try:
            st = self.file.stat()
            stamp: Tuple = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = ("missing",)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            rules = parse_rules(self.file.read_text(encoding="utf-8"), str(self.file))
        except (OSError, UnicodeDecodeError, DataError) as e:
            reason = e if isinstance(e, DataError) else f"{self.file}: cannot be read ({type(e).__name__}: {e})"
            if initial:
                raise DataError(f"--allow_file {reason}") from None
            log.error("--allow_file %s; the %d entries read before stay in force", reason, len(self._from_file))
            return
        with self._lock:
            self._from_file = rules
        if not initial:
            log.info("--allow_file %s read again: %s", self.file, ", ".join(r.text for r in rules))
