"""The prediction log: WAL, one transaction per batch, no loss under SIGKILL, feedback, frames.

The contract tests (frames, feedback, slices, retention, windows) run on both backends: SQLite
and a real PostgreSQL (tests/postgres.py; skipped, saying why, without Debian's package). The
SQLite-only ones (WAL, its transactions, schema upgrades, several processes on one file) take
``sqlite_log``; PostgreSQL's own are in tests/integration/test_postgres_log.py."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from monitoring.slices import OTHER
from monitoring.sqlite_log import SQLiteLog
from monitoring.store import (SCHEMA_VERSION, FeedbackError, LogOpenError, PredictionLog,
                              PredictionRecord, UnknownRequestError, open_log)

ROOT = Path(__file__).resolve().parents[2]
FEATURES = ("width", "height", "brightness")


def record(request_id: str, item: int = 0, ts: float = 1000.0, version: str = "v1",
           slices: dict[str, str] | None = None, seed: int = 0, dim: int = 8) -> PredictionRecord:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(4)).astype(np.float32)
    return PredictionRecord(
        request_id=request_id, item=item, ts=ts, model="m", version=version,
        predicted=str(int(probs.argmax())), confidence=float(probs.max()), probabilities=probs,
        embedding=rng.normal(size=dim).astype(np.float32),
        features={"width": 32.0, "height": 32.0, "brightness": float(rng.random())},
        slices=slices or {}, latency_ms=1.5, ood=bool(seed % 2), ood_score=0.1 * seed)


@pytest.fixture(params=["sqlite", "postgresql"])
def log(request, tmp_path) -> PredictionLog:
    target = (tmp_path / "log.db" if request.param == "sqlite"
              else request.getfixturevalue("postgres_url"))
    with open_log(target) as opened:
        assert opened.backend == request.param
        yield opened


@pytest.fixture()
def sqlite_log(tmp_path) -> SQLiteLog:
    with open_log(tmp_path / "log.db") as opened:
        yield opened


def test_wal_mode_durable_sync_and_schema_version(sqlite_log) -> None:
    log = sqlite_log
    db = sqlite3.connect(log.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert log._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert log.schema_version == SCHEMA_VERSION


def test_a_newer_schema_is_refused(tmp_path) -> None:
    db = sqlite3.connect(tmp_path / "new.db")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(LogOpenError, match="upgrade"):
        open_log(tmp_path / "new.db")


def test_a_url_that_is_not_postgresql_is_refused() -> None:
    with pytest.raises(LogOpenError, match="postgresql://"):
        open_log("mysql://db/log")


def test_one_transaction_per_batch(sqlite_log) -> None:
    log = sqlite_log
    statements: list[str] = []
    log._db.set_trace_callback(statements.append)
    log.write_batch([record("a", i, seed=i) for i in range(5)])
    log._db.set_trace_callback(None)
    assert [s for s in statements if s.split()[0] in ("BEGIN", "COMMIT")] == ["BEGIN IMMEDIATE",
                                                                              "COMMIT"]
    assert sum(s.startswith("INSERT INTO predictions") for s in statements) == 5
    assert log.count() == 5


def test_a_failing_batch_writes_nothing(log) -> None:
    bad = record("b", 1)
    object.__setattr__(bad, "predicted", None)  # NOT NULL: the 2nd row of 3 fails
    with pytest.raises(Exception, match="(?i)null"):
        log.write_batch([record("b", 0), bad, record("b", 2)])
    assert log.count() == 0
    log.write_batch([record("c")])
    assert log.count() == 1


def test_frame_round_trip(log) -> None:
    records = [record("r1", 0, ts=10.0, seed=1, slices={"device": "ios"}),
               record("r1", 1, ts=10.0, seed=2),
               record("r2", 0, ts=20.0, seed=3, slices={"device": "web", "region": "eu"}),
               record("r3", 0, ts=30.0, seed=4, version="v2")]
    log.write_batch(records)
    log.add_feedback("r1", ["1", "2"])
    frame = log.frame("m", since=10.0, until=30.0, probabilities=True)  # [since, until)
    assert list(frame["request_id"]) == ["r1", "r1", "r2"]
    assert list(frame["label"].fillna("-")) == ["1", "2", "-"]
    assert list(frame["tag.device"].fillna("-")) == ["ios", "-", "web"]
    emb = frame[[f"emb_{i}" for i in range(8)]].to_numpy()
    probs = frame[[f"prob_{i}" for i in range(4)]].to_numpy()
    for row, rec in enumerate(records[:3]):
        assert emb[row].tobytes() == rec.embedding.tobytes()  # float32, bit for bit
        assert probs[row].tobytes() == rec.probabilities.tobytes()
        assert frame["brightness"].iloc[row] == rec.features["brightness"]
        assert frame["ood"].iloc[row] == rec.ood
    assert list(log.frame("m", version="v2")["request_id"]) == ["r3"]
    assert log.versions("m", 0, 100) == [("v1", 3), ("v2", 1)]


def test_feedback_unknown_id_count_and_label_checks(log) -> None:
    log.write_batch([record("r1", 0), record("r1", 1), record("solo")])
    with pytest.raises(UnknownRequestError) as err:
        log.add_feedback("nope", "1")
    assert err.value.request_ids == ["nope"]
    with pytest.raises(FeedbackError, match="2 input"):
        log.add_feedback("r1", "1")
    with pytest.raises(FeedbackError, match="unknown label"):
        log.add_feedback("solo", "cat", valid_labels={"0", "1", "2", "3"})
    assert log.add_feedback("solo", "3").created == 1


def test_feedback_is_idempotent_and_corrections_replace(log) -> None:
    log.write_batch([record("r1", 0), record("r1", 1)])
    first = log.add_feedback("r1", ["1", "2"])
    again = log.add_feedback("r1", ["1", "2"])
    fixed = log.add_feedback("r1", ["1", "3"])
    assert (first.created, first.updated, first.unchanged) == (2, 0, 0)
    assert (again.created, again.updated, again.unchanged) == (0, 0, 2)
    assert (fixed.created, fixed.updated, fixed.unchanged) == (0, 1, 1)
    assert list(log.frame("m")["label"]) == ["1", "3"]


def test_labelled_inputs_carry_when_their_label_arrived(log, monkeypatch) -> None:
    """A retraining keeps feedback that arrived after its cutoff out of training: each labelled
    input says when its label was stored; a repeat keeps that time, a correction moves it."""
    from dataclasses import replace

    log.write_batch([replace(record("r1", item, ts=1000.0), input=b"x") for item in (0, 1)])
    clock = iter([2000.0, 3000.0, 4000.0])
    monkeypatch.setattr(time, "time", lambda: next(clock))
    log.add_feedback("r1", ["1", "2"])  # at 2000
    log.add_feedback("r1", ["1", "2"])  # at 3000: a repeat, nothing written
    log.add_feedback("r1", ["1", "3"])  # at 4000: item 1 corrected
    rows = log.labelled_inputs("m")
    assert [(x.item, x.label, x.ts, x.feedback_ts) for x in rows] == [
        (0, "1", 1000.0, 2000.0), (1, "3", 1000.0, 4000.0)]


def test_feedback_for_many_is_all_or_nothing(log) -> None:
    log.write_batch([record("a"), record("b")])
    with pytest.raises(UnknownRequestError):
        log.add_feedback_many({"a": "1", "zzz": "2", "b": "0"})
    assert log.frame("m")["label"].isna().all()
    results = log.add_feedback_many({"a": "1", "b": ["0"]})
    assert [r.created for r in results] == [1, 1]


def test_slice_values_are_capped_the_same_way_for_every_writer(log) -> None:
    target = log.target if log.backend == "sqlite" else log._url
    first = open_log(target, max_slice_values=2)
    second = open_log(target, max_slice_values=2)  # another worker
    first.write_batch([record("1", slices={"customer": "acme"})])
    second.write_batch([record("2", slices={"customer": "globex"}),
                        record("3", slices={"customer": "initech"})])
    first.write_batch([record("4", slices={"customer": "initech"}),
                       record("5", slices={"customer": "acme", "device": OTHER})])
    stored = list(first.frame("m")["tag.customer"])
    assert stored == ["acme", "globex", OTHER, OTHER, "acme"]
    assert first.slice_values() == {"customer": ["acme", "globex"]}


WRITER = textwrap.dedent("""
    import sys, time
    from dataclasses import replace
    from tests.unit.test_monitoring_store import record
    from monitoring.store import open_log
    log = open_log(sys.argv[1])
    worker, batches = sys.argv[2], int(sys.argv[3])
    for b in range(batches):
        log.write_batch([replace(record(f"{worker}-{b}", i, seed=i), input=f"{worker}-{b}".encode())
                         for i in range(8)])
        print(f"{worker}-{b}", flush=True)  # "answered": only after the commit returned
""")


def _writer(path: Path, worker: str, batches: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), worker, str(batches)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_several_processes_write_the_same_file(tmp_path) -> None:
    writers = [_writer(tmp_path / "log.db", f"w{i}", 30) for i in range(4)]
    for w in writers:
        _, err = w.communicate(timeout=60)
        assert w.returncode == 0, err  # no "database is locked": busy_timeout waits
    with open_log(tmp_path / "log.db") as log:
        assert log.count() == 4 * 30 * 8


def test_sigkill_loses_no_committed_batch(tmp_path) -> None:
    writer = _writer(tmp_path / "log.db", "k", 100_000)
    acknowledged: list[str] = []
    deadline = time.monotonic() + 30
    while len(acknowledged) < 200 and time.monotonic() < deadline:
        line = writer.stdout.readline()
        if not line:
            break
        acknowledged.append(line.strip())
    os.kill(writer.pid, signal.SIGKILL)  # mid-flight: more batches were being written
    writer.wait(timeout=10)
    assert len(acknowledged) >= 200, writer.stderr.read()
    with open_log(tmp_path / "log.db") as log:
        stored = set(log.frame("m")["request_id"])
        log.add_feedback_many({rid: ["0"] * 8 for rid in acknowledged})
        inputs = {x.request_id: x.input for x in log.labelled_inputs("m")}
    assert set(acknowledged) <= stored
    assert all(inputs[rid] == rid.encode() for rid in acknowledged)  # from the segment file


def test_the_write_path_imports_neither_pandas_nor_evidently() -> None:
    code = ("import sys, monitoring.store, monitoring.sqlite_log, monitoring.postgres_log, "
            "monitoring.ood, monitoring.slices, "
            "monitoring.reference, monitoring.exporter\n"
            "print(json.dumps(sorted(m for m in ('pandas', 'evidently', 'torch', 'bentoml') "
            "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_prune_deletes_old_rows_with_their_feedback_or_only_their_inputs(sqlite_log, tmp_path
                                                                            ) -> None:
    log = sqlite_log
    from dataclasses import replace

    log.write_batch([replace(record(f"r{i}", ts=1000.0 + i), input=b"x" * 100) for i in range(10)])
    log.add_feedback("r1", "a")
    log.add_feedback("r8", "a")
    assert log.prune(1005.0, inputs_only=True, chunk=2) == 5
    assert [x.request_id for x in log.labelled_inputs("m")] == ["r8"]  # r1 lost its input
    assert log.count() == 10
    assert log.prune(1005.0, chunk=3) == 5
    assert log.count() == 5
    remaining = {rid for (rid,) in sqlite3.connect(tmp_path / "log.db").execute(
        "SELECT request_id FROM feedback")}
    assert remaining == {"r8"}
    log.vacuum()
    from monitoring.__main__ import main

    assert main(["prune", "--log", str(tmp_path / "log.db"), "--older-than", "1970-01-01T00:16:48",
                 "--vacuum"]) == 0
    assert log.count() == 2
    assert main(["prune", "--log", str(tmp_path / "nope.db"), "--older-than", "1d"]) == 2


def test_schema_1_logs_gain_the_input_replica_and_input_ref_columns(tmp_path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE predictions (id INTEGER PRIMARY KEY, request_id TEXT NOT NULL,"
                     " item INTEGER NOT NULL, ts REAL NOT NULL, model TEXT NOT NULL, version TEXT"
                     " NOT NULL, predicted TEXT NOT NULL, confidence REAL NOT NULL, ood INTEGER NOT"
                     " NULL DEFAULT 0, ood_score REAL, latency_ms REAL, slices TEXT NOT NULL DEFAULT"
                     " '{}', features TEXT NOT NULL DEFAULT '{}', embedding BLOB, probabilities"
                     " BLOB); CREATE TABLE feedback (request_id TEXT NOT NULL, item INTEGER NOT"
                     " NULL, label TEXT NOT NULL, ts REAL NOT NULL, PRIMARY KEY (request_id, item));"
                     " CREATE TABLE slice_values (key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY"
                     " KEY (key, value)); PRAGMA user_version = 1;")
    db.close()
    with open_log(path) as upgraded:
        assert upgraded.schema_version == SCHEMA_VERSION == 4
        assert upgraded.frame("m").empty
        upgraded.write_batch([record("new")])
        assert upgraded.count() == 1


def test_windows_are_sampled_in_sql_and_counted_whole(log) -> None:
    from dataclasses import replace

    log.write_batch([replace(record(f"r{i}", ts=1000.0 + i, seed=i), replica=f"host{i % 2}")
                     for i in range(400)])
    log.add_feedback_many({f"r{i}": "0" for i in range(0, 400, 4)})
    whole = log.frame("m")
    assert len(whole) == 400 and not whole.attrs["sampled"]
    assert set(whole["tag.replica"]) == {"host0", "host1"}  # the replica is a slice tag
    sample = log.frame("m", max_rows=100)
    assert sample.attrs == {"rows_in_window": 400, "sampled": True}
    assert 50 <= len(sample) <= 150  # a hash of the id: uniform, not the first 100
    assert sample["ts"].max() - sample["ts"].min() > 300
    assert sample["request_id"].is_unique and set(sample["request_id"]) <= set(whole["request_id"])
    assert list(log.frame("m", max_rows=100)["request_id"]) == list(sample["request_id"])
    stats = log.window_stats("m")
    labelled = whole[whole["label"].notna()]
    assert (stats.rows, stats.labelled) == (400, 100)
    assert stats.correct == int((labelled["label"] == labelled["predicted"]).sum())
    assert stats.ood == int(whole["ood"].sum())
    assert stats.replicas == {"host0": 200, "host1": 200}
    assert log.window_stats("m", since=1100.0, until=1200.0).rows == 100


def test_prune_on_either_backend(log) -> None:
    from dataclasses import replace

    log.write_batch([replace(record(f"r{i}", ts=1000.0 + i), input=b"x") for i in range(10)])
    log.add_feedback("r1", "0")
    log.add_feedback("r8", "0")
    assert log.prune(1005.0, inputs_only=True, chunk=2) == 5
    assert [x.request_id for x in log.labelled_inputs("m")] == ["r8"]
    assert log.prune(1005.0, chunk=3) == 5
    assert log.count() == 5
    log.vacuum()
    assert log.window_stats("m").labelled == 1


def test_inputs_live_in_segment_files_and_retention_frees_them(sqlite_log, tmp_path,
                                                               monkeypatch) -> None:
    import monitoring.sqlite_log as sqlite_module
    from dataclasses import replace

    log = sqlite_log
    size = sqlite_module.INLINE_INPUT_BYTES + 1  # smaller inputs stay in the row (the next test)
    log.write_batch([replace(record(f"r{i}", ts=1000.0 + i), input=bytes([i]) * (size + i))
                     for i in range(10)])
    raw = sqlite3.connect(log.path)
    refs = [ref for (ref,) in raw.execute("SELECT input_ref FROM predictions ORDER BY id")]
    assert raw.execute("SELECT COUNT(*) FROM predictions WHERE input IS NOT NULL").fetchone()[0] == 0
    segments = list(log.inputs_dir.glob("*.seg"))
    assert len(segments) == 1 and all(r.startswith(segments[0].name + "@") for r in refs)
    assert segments[0].stat().st_size == sum(size + i for i in range(10))
    log.add_feedback_many({f"r{i}": "0" for i in range(10)})
    assert [x.input for x in log.labelled_inputs("m")] == [bytes([i]) * (size + i)
                                                          for i in range(10)]
    # A row written before segments (schema <= 3) keeps its input in the row: still read.
    raw.execute("UPDATE predictions SET input = x'0102', input_ref = NULL WHERE request_id = 'r0'")
    raw.commit()
    assert log.labelled_inputs("m")[0].input == b"\x01\x02"
    monkeypatch.setattr(sqlite_module, "SEGMENT_GRACE_S", 0.0)
    log.prune(2000.0, inputs_only=True)
    assert segments[0].exists()  # unreferenced now, but this writer still holds it
    log.close()
    with open_log(tmp_path / "log.db") as reopened:
        reopened.prune(2000.0, inputs_only=True)
        assert not segments[0].exists()
        assert reopened.labelled_inputs("m") == [] and reopened.count() == 10


def test_inputs_can_stay_in_the_row(tmp_path) -> None:
    from dataclasses import replace

    with SQLiteLog(tmp_path / "log.db", input_segments=False) as log:
        log.write_batch([replace(record("r1"), input=b"abc")])
        log.add_feedback("r1", "0")
        assert log.labelled_inputs("m")[0].input == b"abc"
    assert not (tmp_path / "log.db.inputs").exists()


@pytest.mark.parametrize("journal", [False, True], ids=["commit", "journal"])
def test_small_inputs_stay_in_their_row_beside_segment_inputs(tmp_path, journal) -> None:
    """A text-sized input is no segment write: it goes into the row (and the journal frame)."""
    from dataclasses import replace

    from monitoring.sqlite_log import INLINE_INPUT_BYTES

    small, large = "héllo".encode() * 20, os.urandom(INLINE_INPUT_BYTES + 1)
    with SQLiteLog(tmp_path / "log.db", journal=journal) as log:
        log.write_batch([replace(record("r1"), input=small), replace(record("r2"), input=large)])
        log.add_feedback_many({"r1": "0", "r2": "1"})
        assert [x.input for x in log.labelled_inputs("m")] == [small, large]
        rows = log._read("SELECT request_id, input IS NOT NULL, input_ref IS NOT NULL"
                         " FROM predictions ORDER BY request_id")
        assert rows == [("r1", 1, 0), ("r2", 0, 1)]
        assert sum(f.stat().st_size for f in log.inputs_dir.glob("*.seg")) == len(large)


def test_background_checkpoints_keep_the_wal_bounded_off_the_commit_path(tmp_path) -> None:
    from dataclasses import replace

    from monitoring.sqlite_log import _Checkpointer

    log = SQLiteLog(tmp_path / "log.db", input_segments=False, background_checkpoints=True)
    assert log._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0  # not in commits
    blob = os.urandom(100_000)
    for b in range(60):  # 6 MB through the WAL: past PASSIVE_BYTES
        log.write_batch([replace(record(f"b{b}"), input=blob)])
    deadline = time.monotonic() + 20
    main = tmp_path / "log.db"
    while main.stat().st_size < 5_000_000 and time.monotonic() < deadline:
        time.sleep(0.05)  # the checkpointer thread copies the WAL into the database file
    assert main.stat().st_size >= 5_000_000
    assert _Checkpointer.PASSIVE_BYTES < 6_000_000
    log.close()
    with open_log(main) as reopened:
        assert reopened.count() == 60


def test_after_a_checkpoint_the_wal_is_cut_back_so_commits_stop_poking(tmp_path) -> None:
    """The WAL file keeps its size when writers start over at its beginning; without the
    writers' journal_size_limit every later commit would wake the checkpointer."""
    from dataclasses import replace

    from monitoring.sqlite_log import _Checkpointer

    log = SQLiteLog(tmp_path / "log.db", input_segments=False, background_checkpoints=True)
    assert log._db.execute("PRAGMA journal_size_limit").fetchone()[0] == _Checkpointer.KEEP_BYTES
    assert _Checkpointer.KEEP_BYTES < _Checkpointer.PASSIVE_BYTES
    checkpoints = []
    run = log._checkpointer._db.execute

    class Counting:  # sqlite3.Connection's execute is read-only: wrap the connection
        def __init__(self, db):
            self.db = db

        def execute(self, sql, *args):
            if "wal_checkpoint" in sql:
                checkpoints.append(sql)
            return run(sql, *args)

        def close(self):
            self.db.close()

    log._checkpointer._db = Counting(log._checkpointer._db)
    blob = os.urandom(100_000)
    wal = tmp_path / "log.db-wal"
    for b in range(60):  # 6 MB: one checkpoint at least
        log.write_batch([replace(record(f"b{b}"), input=blob)])
    deadline = time.monotonic() + 20
    while not checkpoints and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoints
    time.sleep(0.5)  # let it finish
    for b in range(5):  # small commits after the restart: the first cuts the file back
        log.write_batch([record(f"s{b}")])
        time.sleep(0.05)
    assert wal.stat().st_size <= _Checkpointer.KEEP_BYTES
    before = len(checkpoints)
    for b in range(20):
        log.write_batch([record(f"t{b}")])
    time.sleep(0.3)
    assert len(checkpoints) == before  # small commits no longer wake the checkpointer
    log.close()


@pytest.mark.parametrize("features", [
    {"width": 32, "height": 32.0, "brightness": 0.1 + 0.2, "tiny": 1e-300, "big": 1.5e300},
    {'a "quoted" key': -0.0, "100%": 3, "ünïcode": 2.5},
    {"nan": float("nan"), "inf": float("inf"), "x": 1.0},  # non-finite: through json
    {},
])
def test_features_json_writes_what_json_writes(features: dict) -> None:
    from monitoring.store import compact_json, features_json

    want = compact_json({k: float(v) for k, v in features.items()})
    assert features_json(features) == want
    assert features_json(features) == want  # the cached format string too


def test_encode_row_is_the_records_row() -> None:
    """The service's rows (encode_row, straight from the answers) and a PredictionRecord's are
    the same row."""
    from monitoring.store import COLUMNS, _row, compact_json, encode_row

    rng = np.random.default_rng(0)
    emb, probs = rng.standard_normal(8).astype(np.float32), rng.random(3).astype(np.float32)
    feats = {"width": 32.0, "brightness": 0.25}
    record = PredictionRecord(
        request_id="req-1", item=2, ts=1700000000.5, model="m", version="v1", predicted="cat",
        confidence=0.75, probabilities=probs, embedding=emb, features=feats,
        slices={"region": "eu"}, latency_ms=3.5, ood=True, ood_score=0.9, input=b"x",
        replica="r1")
    row = encode_row("req-1", 2, 1700000000.5, "m", "v1", "cat", 0.75, True, 0.9, 3.5,
                     compact_json({"region": "eu"}), feats, emb, probs, b"x", "r1")
    assert row == _row(record) and len(row) == len(COLUMNS)
