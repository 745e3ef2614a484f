"""A throw-away Orthanc PACS for tests: the Debian ``Orthanc`` binary on 127.0.0.1 with its own storage folder.

``Orthanc`` starts with free HTTP and DICOM ports, AET ``ORTHANC``, no authentication, remote access off (it only
answers on the loopback interface), the DICOMweb plugin loaded when ``orthanc-dicomweb`` is installed (its root:
:attr:`Orthanc.dicomweb_url`), and the nodes under test registered as DICOM modalities (at start in the
configuration, or later with :meth:`add_modality`).
Only the standard library is used for REST, so nothing beyond the test requirements is needed.

Tests skip with the reason when the binary is truly absent (``apt-get install orthanc orthanc-dicomweb``); CI
installs it, so there they run.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc", "/usr/local/sbin/Orthanc")
DICOMWEB_GLOBS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so*",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so*",
)


def find_orthanc() -> Optional[str]:
    """Path of the Orthanc server binary, or None."""
    found = shutil.which("Orthanc")
    if found:
        return found
    return next((p for p in ORTHANC_CANDIDATES if os.access(p, os.X_OK)), None)


def find_dicomweb_plugin() -> Optional[str]:
    """Path of the DICOMweb plugin shared library (package ``orthanc-dicomweb``), or None."""
    try:
        listed = subprocess.run(
            ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=20
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        listed = []
    hits = [p for p in listed if "DicomWeb" in Path(p).name and ".so" in Path(p).name and os.path.isfile(p)]
    for pattern in DICOMWEB_GLOBS:
        hits += sorted(glob.glob(pattern))
    return hits[0] if hits else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: Optional[subprocess.Popen], timeout: float) -> None:
    """Terminate ``proc``, then kill it if it has not exited within ``timeout`` seconds (nothing if it is gone)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2, log=None) -> Any:
    """Poll ``predicate()`` until it returns something truthy (returned) or ``timeout`` seconds pass.

    Raises:
        TimeoutError: the predicate stayed falsy (the message has ``what`` and ``log()``, if given).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s" + (f"\n{log()}" if log else ""))
        time.sleep(interval)


class OrthancError(RuntimeError):
    """Orthanc did not start, or a REST call failed (the message has the URL, status and Orthanc's log tail)."""


class Orthanc:
    """One Orthanc process; use as a context manager (``with Orthanc(folder) as pacs:``).

    Args:
        folder: storage, index, configuration and log go here (must be writable; left in place).
        modalities: ``{name: (aet, host, port)}`` DICOM nodes Orthanc may send to.
        aet: Orthanc's own AE title.
        start_timeout: seconds to wait for ``/system`` to answer.
        extra: configuration entries on top of :meth:`config`'s (e.g. Orthanc's DICOM TLS options).
    """

    def __init__(
        self,
        folder: os.PathLike | str,
        modalities: Optional[Dict[str, Tuple[str, str, int]]] = None,
        aet: str = "ORTHANC",
        start_timeout: float = 60.0,
        extra: Optional[Dict[str, Any]] = None,
    ):
        self.extra = dict(extra or {})
        self.folder = Path(folder)
        self.aet = aet
        self.host = "127.0.0.1"
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.url = f"http://{self.host}:{self.http_port}"
        self.modalities = dict(modalities or {})
        self.start_timeout = start_timeout
        self.binary = find_orthanc()
        self.plugin = find_dicomweb_plugin()
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.folder / "orthanc.log"

    def config(self) -> Dict[str, Any]:
        """The configuration written to ``folder/orthanc.json``."""
        return {
            "Name": "medssl-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            # loopback only and no users: the server lives for one test module and answers nobody else. Orthanc
            # 1.10 (Debian) cannot bind its ports to 127.0.0.1, so HTTP refuses remote clients and DICOM accepts
            # only the registered modalities, each checked to call from its registered host (127.0.0.1)
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpDescribeErrors": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()},
            # tests add the node under test with PUT /modalities/<name> once they know its port
            "DicomModalitiesInDatabase": False,
            "DicomScuTimeout": 30,
            "DicomAssociationCloseDelay": 0,
            "StableAge": 2,
            "SaveJobs": False,
            "ConcurrentJobs": 4,
            "StorageCompression": False,
            "Plugins": [self.plugin] if self.plugin else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado"},
            **self.extra,
        }

    def start(self) -> "Orthanc":
        """Write the configuration, start Orthanc and wait until ``/system`` answers.

        Raises:
            FileNotFoundError: no Orthanc binary.
            OrthancError: it exited or did not answer within ``start_timeout`` seconds.
        """
        if not self.binary:
            raise FileNotFoundError("Orthanc binary not found (apt-get install orthanc orthanc-dicomweb)")
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [self.binary, "--logdir=" + str(self.folder), str(cfg)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.folder,
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OrthancError(f"Orthanc exited with {self.proc.returncode} at start:\n{self.log_tail()}")
            try:
                self.get("/system", timeout=2)
                return self
            except (OSError, OrthancError):
                time.sleep(0.1)
        self.stop()
        raise OrthancError(
            f"Orthanc did not answer {self.url}/system in {self.start_timeout:.0f} s:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate Orthanc, then kill it if it has not exited within ``timeout`` seconds."""
        stop_process(self.proc, timeout)

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        """The end of Orthanc's own log files in ``folder`` (for failure messages)."""
        text = ""
        for p in sorted(self.folder.glob("*.log*")):
            try:
                text += f"--- {p.name}\n" + p.read_text(errors="replace")[-chars:]
            except OSError:
                pass
        return text[-chars:]

    # REST -------------------------------------------------------------------------------------------------------

    def request(self, method: str, path: str, data: Any = None, timeout: float = 60.0, raw: bool = False) -> Any:
        """One REST call; ``data`` is bytes (sent as is) or JSON-able; returns parsed JSON, or bytes with ``raw``.

        Raises:
            OrthancError: an HTTP error status (with Orthanc's answer).
            OSError: Orthanc does not answer.
        """
        body = data if isinstance(data, (bytes, type(None))) else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if data is not None and not isinstance(data, bytes):
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                content = r.read()
        except urllib.error.HTTPError as e:
            raise OrthancError(f"{method} {path}: HTTP {e.code}: {e.read()[:2000]!r}") from None
        if raw:
            return content
        return json.loads(content) if content.strip() else None

    def get(self, path: str, **kw) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, data: Any = None, **kw) -> Any:
        return self.request("POST", path, data=data if data is not None else b"", **kw)

    def upload(self, file: os.PathLike | str) -> Dict[str, Any]:
        """``POST /instances`` of one DICOM file; returns Orthanc's answer (``ID``, ``ParentStudy``, ``Status``)."""
        return self.post("/instances", Path(file).read_bytes())

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (QIDO-RS, WADO-RS, STOW-RS), e.g. for ``monailabel start_server --studies``.

        Raises:
            OrthancError: the DICOMweb plugin is not loaded (``apt-get install orthanc-dicomweb``).
        """
        if not self.plugin:
            raise OrthancError("the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
        return f"{self.url}/dicom-web"

    def instance_count(self) -> int:
        """How many instances Orthanc stores (``/statistics``)."""
        return int(self.get("/statistics")["CountInstances"])

    def find_series(self, **query: str) -> list:
        """Series whose main DICOM tags match ``query`` (``/tools/find``, e.g. ``Modality="SEG"``), expanded."""
        return self.post("/tools/find", {"Level": "Series", "Query": query, "Expand": True})

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM file of an instance (Orthanc id)."""
        return self.get(f"/instances/{instance_id}/file", raw=True)

    def add_modality(self, name: str, aet: str, port: int, host: str = "127.0.0.1", tls: bool = False) -> None:
        """Register (or update) a DICOM node Orthanc may send to (``tls``: over DICOM TLS)."""
        entry = {"AET": aet, "Host": host, "Port": int(port), **({"UseDicomTls": True} if tls else {})}
        self.request("PUT", f"/modalities/{name}", entry)
        self.modalities[name] = (aet, host, int(port))

    def store_to(self, modality: str, *resources: str, asynchronous: bool = True) -> Any:
        """Ask Orthanc to C-STORE ``resources`` (Orthanc ids of studies/series/instances) to ``modality``; with
        ``asynchronous`` returns at once with the job (``{"ID": ...}``)."""
        return self.post(
            f"/modalities/{modality}/store", {"Resources": list(resources), "Asynchronous": bool(asynchronous)}
        )

    def series_of_study(self, study_id: str) -> list:
        """``/studies/<id>/series``: the study's series with their main DICOM tags."""
        return self.get(f"/studies/{study_id}/series")

    def wait_for(self, predicate, timeout: float, interval: float = 0.25, what: str = "condition") -> Any:
        """:func:`wait_until` with Orthanc's log tail in the message."""
        return wait_until(predicate, timeout, what, interval, log=lambda: f"Orthanc log:\n{self.log_tail(2000)}")
