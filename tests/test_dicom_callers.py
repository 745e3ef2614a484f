"""Who the DICOM node lets in (issue 32, item 1): ``--allow`` / ``--allow_file``, the default, the rejection.

Real associations over loopback: a caller's host is played by the source address it binds (127.0.0.1, 127.0.0.2,
127.0.0.3 all reach the node on 127.0.0.1), its AE title by the calling AE title. The node runs with an injected
processor (no model), so each test takes seconds.
"""

from __future__ import annotations

import os
import time

import pydicom
import pynetdicom
import pytest
from test_dicom_node import MR, NODE_AET, fake_process, series_folders, small_series

from medssl.clinic.dicom_allow import AllowList, parse_rule
from medssl.clinic.dicom_node import DicomNode
from medssl.data import DataError

ECHO = "1.2.840.10008.1.1"


def associate(port: int, calling: str, source: str = "127.0.0.1", contexts=(ECHO,)):
    ae = pynetdicom.AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for sop in contexts:
        ae.add_requested_context(sop, pydicom.uid.ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title=NODE_AET, bind_address=(source, 0))


def outcome(port: int, calling: str, source: str = "127.0.0.1"):
    """'echo ok' for an association whose C-ECHO succeeds, else the A-ASSOCIATE-RJ (result, source, diagnostic)."""
    assoc = associate(port, calling, source)
    if not assoc.is_established:
        rj = assoc.acceptor.primitive
        return ("rejected", rj.result, rj.result_source, rj.diagnostic) if assoc.is_rejected else ("no association",)
    try:
        return "echo ok" if getattr(assoc.send_c_echo(), "Status", None) == 0 else "echo failed"
    finally:
        assoc.release()


REJECTED = ("rejected", 0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised


@pytest.fixture
def start_node(tmp_path):
    nodes = []

    def start(**kw):
        node = DicomNode(tmp_path / f"work{len(nodes)}", port=0, quiet_seconds=30, process=fake_process(), **kw)
        nodes.append(node.start())
        return node

    yield start
    for node in nodes:
        node.stop()


def test_only_the_listed_callers_get_in_and_strangers_are_logged(start_node, tmp_path, caplog):
    caplog.set_level("INFO", logger="medssl.clinic.dicom_node")
    node = start_node(allow="SCANNER1@127.0.0.1, *@127.0.0.3, ROUTER@127.0.0.0/24")
    assert outcome(node.port, "SCANNER1") == "echo ok"
    assert outcome(node.port, "ROUTER") == "echo ok"  # the network form
    assert outcome(node.port, "ANYONE", "127.0.0.3") == "echo ok"  # any AE title from that host
    assert outcome(node.port, "STRANGER") == REJECTED  # the right host, another AE title
    assert outcome(node.port, "SCANNER1", "127.0.0.2") == REJECTED  # the right AE title from another host
    assert "rejected association from STRANGER@127.0.0.1 (called MEDSSL): not an allowed caller" in caplog.text
    assert "rejected association from SCANNER1@127.0.0.2" in caplog.text
    # a stranger's C-STORE never gets an association: nothing of it reaches the disk
    files = small_series(tmp_path / "s", slices=3)
    assoc = associate(node.port, "STRANGER", contexts=(MR,))
    assert assoc.is_rejected and not assoc.is_established
    assoc = associate(node.port, "SCANNER1", contexts=(MR,))
    assert [assoc.send_c_store(pydicom.dcmread(f)).Status for f in files] == [0, 0, 0]
    assoc.release()
    time.sleep(0.5)
    assert len(series_folders(node.workdir, "incoming") + series_folders(node.workdir, "processing")
               + series_folders(node.workdir, "done")) == 1  # fmt: skip
    assert "callers SCANNER1@127.0.0.1, *@127.0.0.3, ROUTER@127.0.0.0/24" in caplog.text  # the start line says who


def test_the_default_lets_in_the_destination_and_loopback_only(start_node):
    node = start_node(destination="PACS@127.0.0.2:104")
    assert outcome(node.port, "PACS", "127.0.0.2") == "echo ok"
    assert outcome(node.port, "WORKSTATION", "127.0.0.2") == REJECTED
    assert outcome(node.port, "WORKSTATION", "127.0.0.1") == "echo ok"  # loopback: the host's own tools
    alone = start_node()  # no destination: loopback only
    assert outcome(alone.port, "ANY", "127.0.0.1") == "echo ok"
    assert AllowList(destination=None).permits("ANY", "10.0.0.5") is False
    assert AllowList(destination=None).permits("ANY", "::ffff:127.0.0.1") is True  # IPv4 seen through IPv6


def test_the_allow_file_is_read_again_when_it_changes(start_node, tmp_path, caplog):
    caplog.set_level("INFO", logger="medssl.clinic.dicom_node")
    listed = tmp_path / "callers.txt"
    listed.write_text("# the MR scanners\nMR1@127.0.0.1\nMR2@127.0.0.1, *@127.0.0.3  # the router\n")
    node = start_node(allow_file=listed)
    assert [outcome(node.port, a) for a in ("MR1", "MR2", "MR3")] == ["echo ok", "echo ok", REJECTED]

    def rewrite(text):
        stamp = listed.stat().st_mtime_ns
        listed.write_text(text)
        os.utime(listed, ns=(stamp + 10**9, stamp + 10**9))  # a later modification time, however coarse the clock

    rewrite("MR3@127.0.0.1\n")
    assert [outcome(node.port, a) for a in ("MR1", "MR3")] == [REJECTED, "echo ok"]
    assert "read again: MR3@127.0.0.1" in caplog.text
    rewrite("MR4@127.0.0.1\nno host here\n")  # a broken edit: logged, the entries before stay in force
    assert [outcome(node.port, a) for a in ("MR3", "MR4")] == ["echo ok", REJECTED]
    assert f"{listed}:2: 'no host here' is not AE@HOST" in caplog.text
    assert "the 1 entries read before stay in force" in caplog.text


def test_bad_caller_entries_are_refused_naming_them(tmp_path):
    for bad, match in (
        ("nohost", "--allow: 'nohost' is not AE@HOST"),
        ("A@", "is not AE@HOST"),
        ("WAYTOOLONGAETITLE17@10.0.0.1", "an AE title has 1-16"),
        ("MR1@no-such-host.invalid", "host 'no-such-host.invalid' is not an IP address"),
        (" , ", "no AE@HOST entry"),
    ):
        with pytest.raises(DataError, match=match):
            DicomNode(tmp_path / "w", allow=bad)
    with pytest.raises(DataError, match=r"--allow_file .*missing\.txt: cannot be read"):
        DicomNode(tmp_path / "w", allow_file=tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nobody yet\n")
    with pytest.raises(DataError, match="empty.txt: no AE@HOST entry"):
        DicomNode(tmp_path / "w", allow_file=tmp_path / "empty.txt")
    rule = parse_rule("PACS@localhost")  # a host name: every address it resolves to
    assert rule.matches("PACS", "127.0.0.1") and not rule.matches("PACS", "10.0.0.1")
