"""The SQLite log's journal (monitoring/journal.py): answers durable by one append, indexed later,
seen by every read through the log, indexed exactly once, and nothing answered lost when the
writer is killed."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from monitoring import journal
from monitoring.sqlite_log import SQLiteLog
from monitoring.store import PredictionRecord, open_log

ROOT = Path(__file__).resolve().parents[2]


def records(ids: range, slices: dict | None = None, data: bytes | None = b"png" * 100
            ) -> list[PredictionRecord]:
    rng = np.random.default_rng(ids.start)
    return [PredictionRecord(request_id=f"r{i}", item=0, ts=1000.0 + i, model="m", version="v1",
                             predicted="a", confidence=0.75,
                             probabilities=rng.random(3).astype(np.float32),
                             embedding=rng.random(8).astype(np.float32),
                             features={"brightness": 0.5}, slices=slices or {}, input=data)
            for i in ids]


def bare_count(path: Path) -> int:
    """Rows of the file as bare sqlite3 sees it (no journal read)."""
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
    finally:
        db.close()


@pytest.fixture
def writer(tmp_path):
    # A long interval: the tests decide when the journal is indexed.
    log = SQLiteLog(tmp_path / "p.db", journal=True, index_interval_s=3600)
    yield log
    log.close()


def test_a_write_is_an_append_that_every_read_through_the_log_sees(writer, tmp_path):
    path = tmp_path / "p.db"
    writer.write_batch(records(range(0, 5)))
    writer.write_batch(records(range(5, 8)))
    assert bare_count(path) == 0  # not in the table yet: in the journal
    assert [name for name, _ in journal.journals(writer.journal_dir)]
    with open_log(path) as reader:  # another process's view: it indexes what it finds
        assert reader.count() == 8
        assert reader.inputs("r6") == [b"png" * 100]
    assert bare_count(path) == 8
    assert writer.count() == 8  # indexed exactly once, whoever indexed it


def test_the_indexing_thread_empties_the_journal_into_the_table(tmp_path):
    path = tmp_path / "p.db"
    log = SQLiteLog(path, journal=True, index_interval_s=0.05)
    try:
        log.write_batch(records(range(0, 20)))
        deadline = time.monotonic() + 10
        while bare_count(path) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert bare_count(path) == 20
    finally:
        log.close()
    assert journal.journals(log.journal_dir) == []  # closed and indexed: deleted


def test_feedback_finds_a_request_answered_a_moment_ago(writer, tmp_path):
    writer.write_batch(records(range(0, 3)))
    with open_log(tmp_path / "p.db") as other:  # e.g. the other worker got the feedback
        result = other.add_feedback("r2", "a")
    assert (result.items, result.created) == (1, 1)


def test_slices_are_capped_when_indexed(tmp_path):
    path = tmp_path / "p.db"
    log = SQLiteLog(path, journal=True, index_interval_s=3600, max_slice_values=2)
    try:
        for i, device in enumerate(["ios", "android", "web", "tv"]):
            log.write_batch(records(range(i, i + 1), slices={"device": device}))
        log.catch_up()
        db = sqlite3.connect(path)
        stored = [s for (s,) in db.execute("SELECT slices FROM predictions ORDER BY id")]
        db.close()
    finally:
        log.close()
    assert stored == ['{"device":"ios"}', '{"device":"android"}', '{"device":"other"}',
                      '{"device":"other"}']


def test_concurrent_catch_ups_index_each_row_once(writer, tmp_path):
    for start in range(0, 400, 4):
        writer.write_batch(records(range(start, start + 4)))
    readers = [open_log(tmp_path / "p.db") for _ in range(3)]
    try:
        threads = [threading.Thread(target=r.catch_up) for r in readers + [writer]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for r in readers:
            r.close()
    db = sqlite3.connect(tmp_path / "p.db")
    ids = [rid for (rid,) in db.execute("SELECT request_id FROM predictions")]
    db.close()
    assert len(ids) == 400 and len(set(ids)) == 400


def test_a_new_journal_past_the_size_limit_and_old_ones_deleted_once_indexed(
        writer, tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "JOURNAL_BYTES", 2000)
    for start in range(0, 40, 2):
        writer.write_batch(records(range(start, start + 2)))
    assert len(journal.journals(writer.journal_dir)) > 3
    assert writer.catch_up() == 40
    # Only the one being appended is left; its rows are in the table all the same.
    assert [n for n, _ in journal.journals(writer.journal_dir)] == [writer._journal.current]
    assert bare_count(tmp_path / "p.db") == 40
    db = sqlite3.connect(tmp_path / "p.db")
    progress = db.execute("SELECT name FROM journal_progress").fetchall()
    db.close()
    assert progress == [(writer._journal.current,)]


_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from tests.unit.test_monitoring_journal import records
    from monitoring.sqlite_log import SQLiteLog
    log = SQLiteLog({path!r}, journal=True, index_interval_s=3600)
    for start in range(0, 300, 3):
        log.write_batch(records(range(start, start + 3)))
    print("answered", flush=True)  # every write_batch above returned: all 300 are answered
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_writer_loses_nothing_it_returned_from(tmp_path):
    path = tmp_path / "p.db"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER.format(root=str(ROOT),
                                                                       path=str(path))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL and "answered" in proc.stdout, proc.stderr
    assert bare_count(path) == 0
    left = journal.journals(journal.journal_dir(path))
    assert len(left) == 1 and not journal.is_held(journal.journal_dir(path) / left[0][0])
    with open_log(path) as log:  # the next reader (or the worker that replaces it) indexes it
        assert log.count() == 300
    assert journal.journals(journal.journal_dir(path)) == []  # dead and indexed: deleted
    assert bare_count(path) == 300


def test_a_torn_last_frame_is_skipped_in_a_dead_journal_and_waited_for_in_a_live_one(
        writer, tmp_path, caplog):
    writer.write_batch(records(range(0, 2)))
    name = writer._journal.current
    jpath = writer.journal_dir / name
    with open(jpath, "ab") as f:  # a frame that says 100 bytes and has 10: being written
        f.write(journal.FRAME.pack(100, 0) + b"x" * 10)
    assert writer.catch_up() == 2
    assert writer.catch_up() == 0 and jpath.exists()  # live: the rest may still come
    writer._journal.close()  # the writer is gone: what is left of the frame never will
    with caplog.at_level(logging.WARNING, logger="monitoring.sqlite_log"):
        assert writer.catch_up() == 0
    assert "torn frame" in caplog.text
    assert not jpath.exists()
    assert bare_count(tmp_path / "p.db") == 2


def test_read_frames_stops_before_an_incomplete_frame(tmp_path):
    folder = tmp_path / "j"
    w = journal.JournalWriter(folder)
    w.append([["a", 1]])
    w.append([["b", 2], ["c", 3]])
    path = folder / w.current
    size = path.stat().st_size
    rows, end, stop = journal.read_frames(path, 0)
    assert rows == [["a", 1], ["b", 2], ["c", 3]] and end == size and stop == "end"
    assert journal.read_frames(path, 0, limit=30)[2] == "more"
    with open(path, "ab") as f:
        f.write(journal.FRAME.pack(50, 0)[:5])
    assert journal.read_frames(path, end) == ([], end, "partial")
    w.close()


def test_a_file_that_is_not_a_journal_is_left_alone(writer, tmp_path, caplog):
    writer.journal_dir.mkdir(exist_ok=True)
    stray = writer.journal_dir / "0-0-stray.jnl"
    stray.write_bytes(b"not a journal at all")
    writer.write_batch(records(range(0, 2)))
    with caplog.at_level(logging.ERROR, logger="monitoring.sqlite_log"):
        assert writer.catch_up() == 2
        writer.write_batch(records(range(2, 3)))
        assert writer.catch_up() == 1
    assert caplog.text.count("not a journal") == 1 and stray.exists()  # said once, kept


def test_a_journal_is_renamed_into_place_only_once_its_writer_holds_it(tmp_path):
    w = journal.JournalWriter(tmp_path / "j")
    w.append([["a"]])
    path = tmp_path / "j" / w.current
    assert journal.is_held(path)
    assert not journal.delete_unheld(path)  # held: never deleted
    w.close()
    assert not journal.is_held(path)
    assert not journal.delete_unheld(path, at_most=path.stat().st_size - 1)  # not indexed to its end
    assert journal.delete_unheld(path, at_most=path.stat().st_size) and not path.exists()
    assert not list((tmp_path / "j").glob("*.tmp"))


def test_fsync_under_full(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    log = SQLiteLog(tmp_path / "p.db", synchronous="FULL", journal=True, index_interval_s=3600)
    try:
        synced.clear()
        log.write_batch(records(range(0, 2)))
        assert len(synced) >= 2  # the inputs' segment and the journal
    finally:
        log.close()


def test_a_reader_that_cannot_index_still_reads_what_is_indexed(writer, tmp_path, caplog):
    writer.write_batch(records(range(0, 2)))
    writer.catch_up()
    writer.write_batch(records(range(2, 5)))
    reader = open_log(tmp_path / "p.db")
    try:
        def locked() -> int:
            raise sqlite3.OperationalError("database is locked")

        reader.catch_up = locked
        with caplog.at_level(logging.WARNING, logger="monitoring.sqlite_log"):
            assert reader.count() == 2
            assert reader.count() == 2
        assert caplog.text.count("could not index the journals") == 1  # said once
    finally:
        reader.close()


def test_prune_sees_the_rows_still_in_journals(writer, tmp_path):
    writer.write_batch(records(range(0, 10)))  # ts 1000-1009, in the journal only
    with open_log(tmp_path / "p.db") as log:
        assert log.prune(before=1005.0) == 5
        assert log.count() == 5
    writer.catch_up()
    assert bare_count(tmp_path / "p.db") == 5  # the pruned rows did not come back
