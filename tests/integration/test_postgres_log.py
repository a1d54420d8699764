"""The PostgreSQL prediction log on a real PostgreSQL (tests/postgres.py), beyond the contract
tests both backends pass (tests/unit/test_monitoring_store.py): several writer processes, a
writer SIGKILLed mid-flight, day partitions and retention by partition, the resumable migration
from SQLite, and the drift verdict every replica reads from the database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from monitoring.postgres_log import DAY_S
from monitoring.store import open_log
from tests.unit.test_monitoring_store import record

ROOT = Path(__file__).resolve().parents[2]

WRITER = textwrap.dedent("""
    import sys
    from tests.unit.test_monitoring_store import record
    from monitoring.store import open_log
    log = open_log(sys.argv[1])
    worker, batches = sys.argv[2], int(sys.argv[3])
    for b in range(batches):
        log.write_batch([record(f"{worker}-{b}", i, seed=i,
                                slices={"customer": f"c{b % 30}"}) for i in range(8)])
        print(f"{worker}-{b}", flush=True)  # "answered": only after the commit returned
""")


def _writer(url: str, worker: str, batches: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, url, worker, str(batches)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_several_processes_share_one_log_and_agree_on_slice_values(postgres_url) -> None:
    writers = [_writer(postgres_url, f"w{i}", 30) for i in range(4)]
    for w in writers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
    with open_log(postgres_url, max_slice_values=20) as log:
        assert log.count() == 4 * 30 * 8
        admitted = log.slice_values()["customer"]
        assert len(admitted) == 20  # the cap holds across processes racing to admit values
        stored = set(log.frame("m")["tag.customer"])
        assert stored == set(admitted) | {"other"}


def test_sigkill_loses_no_committed_batch(postgres_url) -> None:
    writer = _writer(postgres_url, "k", 100_000)
    acknowledged: list[str] = []
    deadline = time.monotonic() + 60
    while len(acknowledged) < 100 and time.monotonic() < deadline:
        line = writer.stdout.readline()
        if not line:
            break
        acknowledged.append(line.strip())
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=10)
    assert len(acknowledged) >= 100, writer.stderr.read()
    with open_log(postgres_url) as log:
        stored = set(log.frame("m")["request_id"])
    assert set(acknowledged) <= stored


def test_days_are_partitions_and_retention_drops_them(postgres_url) -> None:
    day0 = 20_000  # 2024-10-04 (UTC)
    with open_log(postgres_url) as log:
        log.write_batch([record(f"d{d}-{i}", ts=(day0 + d) * DAY_S + 60.0 * i)
                         for d in range(3) for i in range(5)])
        assert {day0, day0 + 1, day0 + 2} <= set(log.days())
        log.add_feedback("d0-1", "0")
        log.add_feedback("d2-1", "0")
        # Two whole days dropped as partitions, then two rows of the third deleted row by row.
        before = (day0 + 2) * DAY_S + 90.0
        assert log.prune(before) == 12
        assert day0 not in log.days() and day0 + 1 not in log.days()
        assert log.count() == 3
        assert log.window_stats("m").labelled == 0  # d0-1's label went with its day
        assert [x.request_id for x in log.frame("m").itertuples()] == ["d2-2", "d2-3", "d2-4"]
        log.write_batch([record("late", ts=day0 * DAY_S + 5.0)])  # a dropped day comes back
        assert log.count("m") == 4


def test_migrate_from_sqlite_is_exact_and_resumable(tmp_path, postgres_url) -> None:
    source = tmp_path / "log.db"
    with open_log(source) as log:
        log.write_batch([replace(record(f"r{i}", ts=1000.0 + i, seed=i,
                                        slices={"device": ["ios", "web"][i % 2]}),
                                 input=f"input {i}".encode(), replica="old-host")
                         for i in range(2000)])
        log.add_feedback_many({f"r{i}": str(i % 4) for i in range(0, 2000, 7)})
        expected = log.frame("m", probabilities=True)
    # Interrupted: SIGKILL once the first batches are in.
    cmd = [sys.executable, "-m", "monitoring", "migrate", "--from", str(source), "--to",
           postgres_url, "--batch", "100"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stderr:
        if "predictions: 300 copied" in line:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    with open_log(postgres_url) as target:
        partial = target.count()
    assert 300 <= partial < 2000
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming after source id" in done.stderr
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 predictions copied this run" in again.stdout
    with open_log(postgres_url) as target:
        migrated = target.frame("m", probabilities=True)
        assert target.slice_values() == {"device": ["ios", "web"]}
        assert len(target.labelled_inputs("m")) == len(range(0, 2000, 7))
    assert len(migrated) == 2000  # no duplicates from the interrupted run
    columns = [c for c in expected.columns]
    left = expected[columns].reset_index(drop=True)
    right = migrated[columns].reset_index(drop=True)
    assert left.equals(right) or left.fillna(-1).equals(right.fillna(-1))
    bad = subprocess.run([sys.executable, "-m", "monitoring", "migrate", "--from",
                          str(tmp_path / "nope.db"), "--to", postgres_url], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no SQLite prediction log" in bad.stderr


def test_drift_verdict_lives_in_the_database_for_every_replica(postgres_url) -> None:
    from prometheus_client import CollectorRegistry

    from monitoring.exporter import DriftGauges, read_state, state_path_for, write_state

    open_log(postgres_url).close()  # creates the schema, clf_reports included
    assert state_path_for(postgres_url) == postgres_url
    assert read_state(postgres_url) == {"models": {}}
    entry = {"version": "v1", "dataset_drift": True, "share_drifted": 0.5, "created": 123.0,
             "rows": [{"feature": "brightness", "score": 0.001, "threshold": 0.05,
                       "drifted": True}]}
    write_state(postgres_url, "digits-cnn", entry)
    assert read_state(postgres_url)["models"]["digits-cnn"]["share_drifted"] == 0.5
    registry = CollectorRegistry()
    DriftGauges(registry).refresh(postgres_url, ["digits-cnn"])
    assert registry.get_sample_value("clf_drift_detected", {"model": "digits-cnn"}) == 1.0


def test_a_server_that_does_not_answer_is_a_clear_error() -> None:
    from monitoring.store import LogOpenError

    with pytest.raises(LogOpenError, match="cannot connect"):
        open_log("postgresql://nobody@127.0.0.1:1/none", connect_timeout_s=2)


def test_window_reads_stay_bounded_on_a_large_window(postgres_url) -> None:
    rng = np.random.default_rng(0)
    with open_log(postgres_url) as log:
        for b in range(20):
            log.write_batch([record(f"b{b}-{i}", ts=1000.0 + b, seed=int(rng.integers(1e6)))
                             for i in range(500)])
        frame = log.frame("m", max_rows=1000)
        assert frame.attrs["rows_in_window"] == 10_000 and 800 <= len(frame) <= 1200
