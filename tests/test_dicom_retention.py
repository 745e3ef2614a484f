"""What leaves the DICOM node's done/ (issue 32, item 3): ``--keep_days`` / ``--max_done_gb``, never an unsent SEG.

The rules on hand-made done/ folders (ages and sizes set by the test), then a node with an injected processor: series
sent to a real Storage SCP age out, a series whose SEG the destination has not taken stays however old it is.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from orthanc import free_port, wait_until
from test_dicom_node import Collector, c_store, fake_process, series_folders, small_series

from medssl.clinic.dicom_node import DicomNode
from medssl.clinic.retention import GB, Retention, done_series
from medssl.data import DataError

DAY = 86400


def done_folder(done, name, age_days, kb, unsent=False, now=None):
    """A done/ series of ``kb`` KiB processed ``age_days`` ago."""
    folder = done / name
    (folder / "instances").mkdir(parents=True)
    (folder / "instances" / "1.dcm").write_bytes(b"\0" * (kb * 1024))
    (folder / "result.json").write_text(json.dumps({"series_uid": name}))
    if unsent:
        (folder / "unsent.txt").write_text("not stored: destination down\n")
    stamp = (now or time.time()) - age_days * DAY
    os.utime(folder / "result.json", (stamp, stamp))
    return folder


def test_the_rules_remove_the_oldest_sent_series_and_log_them(tmp_path, caplog):
    caplog.set_level("INFO", logger="medssl.clinic.dicom_node")
    done, tmp = tmp_path / "done", tmp_path / "tmp"
    tmp.mkdir()
    now = time.time()
    for name, age, kb, unsent in (("a", 10, 40, False), ("b", 9, 40, True), ("c", 5, 40, False), ("d", 1, 40, False)):
        done_folder(done, name, age, kb, unsent, now)
    assert [s.folder.name for s in done_series(done)] == ["a", "b", "c", "d"]
    assert Retention().prune(done, tmp, now) == []  # no rule: everything stays
    removed = Retention(keep_days=7).prune(done, tmp, now)
    assert [s.folder.name for s in removed] == ["a"]  # b is older but unsent
    assert sorted(p.name for p in done.iterdir()) == ["b", "c", "d"] and not list(tmp.iterdir())
    assert "retention: removed series a (processed 10.0 days ago, 0.0 MB): older than 7 days" in caplog.text
    # 3 x 40 KiB + the small result.json files; at most 100 KiB: the oldest sent (c) leaves, b (unsent) stays
    removed = Retention(max_done_gb=100 * 1024 / GB).prune(done, tmp, now)
    assert [s.folder.name for s in removed] == ["c"] and sorted(p.name for p in done.iterdir()) == ["b", "d"]
    assert "done/ over" in caplog.text
    # at most 30 KiB: d leaves too, b cannot: said once, not at every pass
    tight = Retention(max_done_gb=30 * 1024 / GB)
    assert [s.folder.name for s in tight.prune(done, tmp, now)] == ["d"]
    tight.prune(done, tmp, now)
    assert caplog.text.count("waits to be sent (unsent.txt): kept") == 1
    assert [p.name for p in done.iterdir()] == ["b"]
    for bad in (0, -1, "seven", float("inf")):
        with pytest.raises(DataError, match="expected a number > 0"):
            Retention(keep_days=bad)
    with pytest.raises(DataError, match="--max_done_gb"):
        DicomNode(tmp_path / "w", max_done_gb=0)


def test_the_node_ages_out_sent_series_and_keeps_unsent_ones(tmp_path, caplog):
    caplog.set_level("INFO", logger="medssl.clinic.dicom_node")
    collector = Collector()
    work = tmp_path / "work"
    node = DicomNode(work, port=0, destination=("COLLECT", "127.0.0.1", collector.port), process=fake_process())
    node.start()
    try:
        for i in range(2):
            files = small_series(tmp_path / f"s{i}", study_uid=f"1.2.3.{i}")
            assert c_store(node.port, files) == [0] * len(files)
        wait_until(lambda: len(collector.received) == 2, 30, "2 SEGs at the destination")
    finally:
        node.stop()
        collector.close()
    sent = series_folders(work, "done")
    assert len(sent) == 2 and not list(work.glob("done/*/unsent.txt"))
    old = time.time() - 3 * DAY
    for folder in sent:
        os.utime(folder / "result.json", (old, old))
    # restart with --keep_days 1 and a destination that is down: the two old sent series leave at once; a new one
    # whose SEG cannot be sent stays in done/, however old it gets
    node = DicomNode(
        work, port=0, destination=("COLLECT", "127.0.0.1", free_port()), process=fake_process(), send_retries=1,
        keep_days=1,
    )  # fmt: skip
    node.series.retention_interval = 0.2
    node.start()
    try:
        wait_until(lambda: not series_folders(work, "done"), 10, "the old sent series removed")
        files = small_series(tmp_path / "s9", study_uid="1.2.3.9")
        assert c_store(node.port, files) == [0] * len(files)
        unsent = wait_until(lambda: list(work.glob("done/*/unsent.txt")), 30, "the unsent SEG in done/")
        os.utime(unsent[0].parent / "result.json", (old, old))
        time.sleep(1.0)  # five retention passes
        assert series_folders(work, "done") == [unsent[0].parent]
        assert list(unsent[0].parent.glob("output/*.dcm"))
    finally:
        node.stop()
    assert caplog.text.count("retention: removed series") == 2
    assert "keep done/ series 1 days" in caplog.text
