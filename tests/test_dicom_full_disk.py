"""A full disk for real (issue 32, item 4): the DICOM node's workdir on a tmpfs of a few MB mounted by the test.

While a series arrives the file system fills: the instances that cannot be written are answered 0xA700 (out of
resources) and not acknowledged, every acknowledged one is on disk, nothing half-written is left, and the series is
held (its release does not complete it). Space is freed, the sender sends the refused instances again: the same
series completes and its SEG reaches the destination with every instance. Then the disk fills while a series is
being segmented: it goes back to incoming/ (not to failed/) and is done once there is space. Needs root (mount);
skipped with the reason where mounting is not allowed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import numpy as np
import pydicom
import pytest
from orthanc import wait_until
from test_dicom_node import Collector, fake_process, open_assoc, series_folders

from medssl.clinic.dicom import write_series
from medssl.clinic.dicom_node import DicomNode

SIZE_MB = 4


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m", "tmpfs", str(mount)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs for the full-disk test: {e}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the full-disk test (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=60)


def fill(path, leave_bytes: int):
    """Write a file that leaves about ``leave_bytes`` free on the file system of ``path``."""
    free = shutil.disk_usage(path.parent).free
    with open(path, "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
        f.flush()
        os.fsync(f.fileno())


def test_a_full_disk_refuses_what_it_cannot_write_and_the_series_completes_later(small_disk, tmp_path, caplog):
    caplog.set_level("INFO", logger="medssl.clinic.dicom_node")
    rng = np.random.default_rng(0)
    # 24 slices of 128x128 int16: about 33 KB each on disk, 0.8 MB the series
    files = write_series(rng.integers(0, 1000, (128, 128, 24)).astype(np.int16), np.eye(4), tmp_path / "s")
    uids = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    collector = Collector()
    gate = threading.Event()
    gate.set()
    node = DicomNode(
        small_disk / "work", port=0, destination=("COLLECT", "127.0.0.1", collector.port), quiet_seconds=1.0,
        process=fake_process(gate),
    ).start()  # fmt: skip
    filler = small_disk / "filler.bin"
    try:
        fill(filler, 300 * 1024)  # room for a handful of instances
        assoc = open_assoc(node.port)
        statuses = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in files]
        assoc.release()
        stored = [u for u, s in zip(uids, statuses) if s == 0]
        refused = [f for f, s in zip(files, statuses) if s == 0xA700]
        assert stored and refused and len(stored) + len(refused) == len(files), statuses
        assert "No space left on device" in caplog.text
        incoming = series_folders(node.workdir, "incoming")
        assert len(incoming) == 1
        on_disk = sorted(p.stem for p in incoming[0].glob("*.dcm"))
        assert on_disk == sorted(stored)  # every acknowledged instance is there, nothing refused is
        for p in incoming[0].glob("*.dcm"):
            assert str(pydicom.dcmread(p).SOPInstanceUID) == p.stem  # whole files
        assert not list((node.workdir / "tmp").iterdir())  # no partial write left
        time.sleep(3.0)  # three quiet periods: still held, waiting for the refused instances
        assert series_folders(node.workdir, "incoming") == incoming and not series_folders(node.workdir, "done")
        assert "waits in incoming/ for the sender to send them again" in caplog.text

        filler.unlink()  # space again; the sender retries what was refused
        assoc = open_assoc(node.port)
        assert [assoc.send_c_store(pydicom.dcmread(f)).Status for f in refused] == [0] * len(refused)
        assoc.release()
        wait_until(lambda: len(collector.received) == 1, 60, "the SEG at the destination")
        done = series_folders(node.workdir, "done")
        assert len(done) == 1 and len(list((done[0] / "instances").glob("*.dcm"))) == len(files)
        assert not series_folders(node.workdir, "failed")

        # the disk fills while the next series is being segmented: it goes back to incoming/, done once there is space
        gate.clear()
        again = write_series(rng.integers(0, 1000, (128, 128, 6)).astype(np.int16), np.eye(4), tmp_path / "s2")
        assoc = open_assoc(node.port)
        assert [assoc.send_c_store(pydicom.dcmread(f)).Status for f in again] == [0] * len(again)
        assoc.release()
        wait_until(lambda: node.busy.is_set(), 30, "the second series being processed")
        fill(filler, 0)
        gate.set()  # the processor now writes its SEG into a full disk
        wait_until(lambda: "back to incoming/ (6 files)" in caplog.text, 30, "the series back in incoming/")
        assert not series_folders(node.workdir, "failed")
        filler.unlink()
        wait_until(lambda: len(collector.received) == 2, 60, "the second SEG at the destination")
    finally:
        node.stop()
        collector.close()
    assert len(series_folders(node.workdir, "done")) == 2 and not series_folders(node.workdir, "failed")
