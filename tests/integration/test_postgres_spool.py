"""The PostgreSQL prediction log through an outage of its server (a real PostgreSQL, stopped and
started again: tests/postgres.py). With a spool folder the service's writer keeps answering:
records go to the worker's spool file while the server is away and are replayed into it, each
exactly once, when it is back. Without one, the requests of the outage get ``LogUnavailable``
(503) and the writer recovers by itself afterwards."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from monitoring import journal
from monitoring.store import _row, open_log
from service.recording import LogUnavailable, PredictionRecorder
from tests.unit.test_monitoring_store import record


@pytest.fixture(scope="module")
def cluster(own_postgres_cluster):
    """This module's own cluster: its tests stop and start it."""
    return own_postgres_cluster


def _ids(url: str) -> list[str]:
    with open_log(url) as log:
        return [rid for (rid,) in log._read("SELECT request_id FROM predictions")]


def _answer(recorder: PredictionRecorder, request_id: str):
    return recorder.write([_row(record(request_id, 0, ts=time.time()))])


def test_an_outage_is_spooled_and_every_record_replayed_once(cluster, tmp_path) -> None:
    url = cluster.database()
    spool = tmp_path / "spool"
    log = open_log(url, spool_dir=spool, spool_retry_s=0.1)
    # one folder per database: its records are replayed into it and no other
    assert log.journal_dir.parent == spool and log.journal_dir.name.startswith(url.rsplit("/")[-1])
    files = log.journal_dir
    recorder = PredictionRecorder(log, keep_inputs=True, max_input_bytes=1 << 20)
    spooled_before = recorder._spooled._value.get()

    async def main() -> list[str]:
        recorder.start()
        sent = []
        for i in range(20):  # committed to the server
            sent.append(f"up-{i}")
            await _answer(recorder, sent[-1])
        assert recorder.spooling_since is None and not journal.journals(files)
        cluster.pause()
        try:
            for i in range(40):  # the server is gone: every one answered all the same
                sent.append(f"down-{i}")
                await _answer(recorder, sent[-1])
            assert recorder.spooling_since is not None
            assert journal.journals(files), "the outage's records are in the spool"
        finally:
            cluster.resume()
        deadline = time.monotonic() + 60
        i = 0
        while recorder.spooling_since is not None and time.monotonic() < deadline:
            sent.append(f"back-{i}")  # answered (spooled) until the replay has caught up
            await _answer(recorder, sent[-1])
            i += 1
            await asyncio.sleep(0.05)
        assert recorder.spooling_since is None, "commits never went back to the server"
        for i in range(10):  # committed to the server again
            sent.append(f"after-{i}")
            await _answer(recorder, sent[-1])
        await recorder.stop()  # closes the log: the last of the spool is replayed
        return sent

    sent = asyncio.run(main())
    ids = _ids(url)
    assert sorted(ids) == sorted(sent), "every answered record in the log, each exactly once"
    assert recorder._spooled._value.get() - spooled_before >= 40
    assert not journal.journals(files), "a replayed spool file is deleted"
    with open_log(url) as log:
        assert log._read("SELECT COUNT(*) FROM journal_progress") == [(0,)]


def test_without_a_spool_the_outage_is_refused_and_the_writer_recovers(cluster) -> None:
    url = cluster.database()
    recorder = PredictionRecorder(open_log(url, wait_timeout_s=1.0), keep_inputs=True,
                                  max_input_bytes=1 << 20)

    async def main() -> tuple[int, list[str]]:
        recorder.start()
        await _answer(recorder, "before")
        cluster.pause()
        refused = 0
        try:
            for i in range(3):
                try:
                    await _answer(recorder, f"during-{i}")
                except LogUnavailable:
                    refused += 1
        finally:
            cluster.resume()
        deadline, answered = time.monotonic() + 60, []
        while not answered and time.monotonic() < deadline:
            try:
                await _answer(recorder, "after")
                answered.append("after")
            except LogUnavailable:
                await asyncio.sleep(0.2)
        await recorder.stop()
        return refused, answered

    refused, answered = asyncio.run(main())
    assert refused == 3 and answered == ["after"]
    assert sorted(_ids(url)) == ["after", "before"]


def test_concurrent_replays_of_one_spool_insert_each_row_once(cluster, tmp_path) -> None:
    """Every worker of a host replays the same folder (a file its writer left is anyone's):
    four processes' logs racing over one spool file insert each of its rows once."""
    url = cluster.database()
    spool = tmp_path / "spool"
    readers = [open_log(url, spool_dir=spool, spool_retry_s=3600) for _ in range(4)]
    writer = open_log(url, spool_dir=spool, spool_retry_s=3600)
    for b in range(25):
        writer.spool_rows([_row(record(f"s-{b}", i, ts=time.time())) for i in range(4)])
    writer._journal.close()  # as a killed writer's: unheld, every replayer may take it
    writer._journal = None
    barrier = threading.Barrier(len(readers))

    def replay(log) -> None:
        barrier.wait()
        log.catch_up()

    threads = [threading.Thread(target=replay, args=(r,)) for r in readers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in readers + [writer]:
        log.close()
    ids = _ids(url)
    assert len(ids) == 100 and sorted(set(ids)) == sorted(f"s-{b}" for b in range(25))
    assert not journal.journals(writer.journal_dir)


def test_a_journaled_log_appends_and_indexes_through_an_outage(cluster, tmp_path) -> None:
    """``journal=True`` (``CLF_LOG_PG_JOURNAL``): every write is one append to the spool, indexed
    every interval; an outage only delays the indexing."""
    url = cluster.database()
    log = open_log(url, spool_dir=tmp_path / "spool", spool_retry_s=0.05, journal=True)
    assert log.journaled
    written = []
    for b in range(10):
        written += [f"j-{b}-{i}" for i in range(3)]
        log.write_batch([record(f"j-{b}-{i}", 0, ts=time.time()) for i in range(3)])
    deadline = time.monotonic() + 30
    while len(_ids(url)) < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(_ids(url)) == sorted(written)  # indexed by the thread, within the interval
    cluster.pause()
    try:
        for b in range(10):  # the server away: the writes do not notice
            written.append(f"away-{b}")
            log.write_batch([record(f"away-{b}", 0, ts=time.time())])
    finally:
        cluster.resume()
    log.close()  # the last indexing: everything is in, once
    assert sorted(_ids(url)) == sorted(written)
    assert not journal.journals(log.journal_dir)
    with pytest.raises(ValueError, match="needs a spool folder"):
        open_log(url, journal=True)


def test_a_journaled_log_rotating_its_files_under_writers_keeps_every_row_once(
        cluster, tmp_path, monkeypatch) -> None:
    """Files rotated every few frames while two threads write and the indexer runs every 10 ms:
    a rotated file is indexed to its end and deleted, none of its rows lost or doubled."""
    monkeypatch.setattr(journal, "JOURNAL_BYTES", 8 * 1024)
    url = cluster.database()
    log = open_log(url, spool_dir=tmp_path / "spool", spool_retry_s=0.01, journal=True)
    written: list[str] = []

    def write(prefix: str) -> None:
        for b in range(150):
            ids = [f"{prefix}-{b}-{i}" for i in range(2)]
            log.write_batch([record(rid, 0, ts=time.time()) for rid in ids])
            written.extend(ids)

    threads = [threading.Thread(target=write, args=(p,)) for p in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    ids = _ids(url)
    assert len(ids) == 600 and sorted(ids) == sorted(written)


def test_feedback_right_after_a_journaled_answer_finds_it(cluster, tmp_path) -> None:
    url = cluster.database()
    log = open_log(url, spool_dir=tmp_path / "spool", spool_retry_s=3600, journal=True)
    try:
        log.write_batch([record("fresh", 0, ts=time.time())])  # in the spool, not indexed yet
        (result,) = log.add_feedback_many({"fresh": "1"})
        assert result.request_id == "fresh" and result.created == 1, result
    finally:
        log.close()


def test_a_full_spool_refuses_and_takes_again_once_replayed(cluster, tmp_path) -> None:
    """``spool_max_bytes`` (``CLF_LOG_SPOOL_MAX_MB``): a long outage fills the bound, not the
    disk; what is replayed frees it."""
    import errno

    url = cluster.database()
    log = open_log(url, spool_dir=tmp_path / "spool", spool_retry_s=3600,
                   spool_max_bytes=16 * 1024)
    try:
        written = 0
        with pytest.raises(OSError) as refused:
            for b in range(1000):
                log.spool_rows([_row(record(f"f-{b}", 0, ts=time.time()))])
                written += 1
        assert refused.value.errno == errno.ENOSPC and "over its bound" in str(refused.value)
        assert 10 < written < 1000
        log.catch_up()  # the server takes them: the spool holds nothing beyond the database
        log.spool_rows([_row(record("again", 0, ts=time.time()))])
    finally:
        log.close()
    assert len(_ids(url)) == written + 1
