"""The request-path monitoring helpers: input sampling and the X-Slices header."""

from __future__ import annotations

import pytest

from monitoring.slices import SliceRules
from monitoring.store import open_log
from service.recording import PredictionRecorder
from service.requests import RequestError
from service.requests import slices as parse_slices


def test_input_sampling_is_by_request_id_and_respects_the_cap(tmp_path) -> None:
    with open_log(tmp_path / "log.db") as log:
        half = PredictionRecorder(log, keep_inputs=True, max_input_bytes=10, input_sample=0.5)
        ids = [f"req-{i}" for i in range(2000)]
        kept = [half.sampled(r) for r in ids]
        assert 0.45 < sum(kept) / len(kept) < 0.55
        assert kept == [half.sampled(r) for r in ids]  # the same answer every time, every worker
        assert half.keep(b"x" * 10, True) == b"x" * 10
        assert half.keep(b"x" * 11, True) is None  # over the byte cap
        assert half.keep(b"x", False) is None
        none = PredictionRecorder(log, keep_inputs=True, max_input_bytes=10, input_sample=0.0)
        assert not any(none.sampled(r) for r in ids)
        off = PredictionRecorder(log, keep_inputs=False, max_input_bytes=10, input_sample=1.0)
        assert not any(off.sampled(r) for r in ids)
        every = PredictionRecorder(log, keep_inputs=True, max_input_bytes=10, input_sample=1.0)
        assert all(every.sampled(r) for r in ids)


def test_slices_header() -> None:
    rules = SliceRules.parse("device=ios|android;region")
    assert parse_slices("device=ios; region=eu", rules) == {"device": "ios", "region": "eu"}
    assert parse_slices("device=web", rules) == {"device": "other"}
    assert parse_slices("  ", rules) == {}
    for bad in ("colour=red", "device", "region="):
        with pytest.raises(RequestError) as info:
            parse_slices(bad, rules)
        assert info.value.reason == "bad_field" and "X-Slices" in info.value.message


class _Source:
    """Stands for a ServedModel: only its count of requests under way matters here."""

    def __init__(self) -> None:
        self.inflight = 0


class _CountingLog:
    """A real SQLite log that remembers the size of every group it committed."""

    def __init__(self, log) -> None:
        self.log, self.groups = log, []

    def write_rows(self, rows) -> None:
        self.groups.append(len(rows))
        self.log.write_rows(rows)

    def close(self) -> None:
        self.log.close()


def _one(request_id: str) -> list[list]:
    """The encoded row of a one-input request, as the service hands it to the recorder."""
    from monitoring.store import _row
    from tests.unit.test_monitoring_store import record

    return [_row(record(request_id))]


def _started_recorder(tmp_path, group_wait_s: float) -> tuple[_CountingLog, PredictionRecorder,
                                                                _Source]:
    """A running recorder over a counting SQLite log, watching one source of requests."""
    store = _CountingLog(open_log(tmp_path / "log.db"))
    recorder = PredictionRecorder(store, keep_inputs=False, max_input_bytes=0,
                                  group_wait_s=group_wait_s)
    source = _Source()
    recorder.watch(source)
    recorder.start()
    return store, recorder, source


def test_group_commit_waits_for_requests_on_their_way_and_never_for_a_lone_one(tmp_path) -> None:
    """Answers that finish close together share one commit while others are under way; a lone
    request (nothing else under way) commits at once, whatever the group wait."""
    import asyncio

    async def scenario() -> tuple[list[int], list[int]]:
        store, recorder, source = _started_recorder(tmp_path, group_wait_s=30.0)
        try:
            # a lone request: committed at once (the wait is 30 s; the bound here is 10)
            source.inflight = 1
            await asyncio.wait_for(recorder.write(_one("lone")), 10.0)
            source.inflight = 0
            lone = list(store.groups)
            # three requests under way: the first record waits for the other two
            source.inflight = 3
            first = asyncio.ensure_future(recorder.write(_one("a")))
            await asyncio.sleep(0.2)
            assert not first.done(), "committed although two more records were on their way"
            rest = [asyncio.ensure_future(recorder.write(_one(r))) for r in ("b", "c")]
            await asyncio.wait_for(asyncio.gather(first, *rest), 10.0)
            return lone, store.groups[len(lone):]
        finally:
            await recorder.stop()

    lone, grouped = asyncio.run(scenario())
    assert lone == [1] and grouped == [3]
    with open_log(tmp_path / "log.db") as log:
        assert log.window_stats("m").rows == 4


def test_group_commit_waits_no_longer_than_its_bound(tmp_path) -> None:
    """A request counted as under way that never writes (refused, failed) holds a group back
    for the group wait at most."""
    import asyncio

    async def scenario() -> list[int]:
        store, recorder, source = _started_recorder(tmp_path, group_wait_s=0.05)
        try:
            source.inflight = 2  # the other one never comes
            await asyncio.wait_for(recorder.write(_one("a")), 10.0)
            return store.groups
        finally:
            await recorder.stop()

    assert asyncio.run(scenario()) == [1]


def test_a_journaled_log_is_written_on_the_event_loop_and_read_back_whole(tmp_path) -> None:
    """SQLite with a journal (the service's default): ``write`` appends at once, without the
    writer thread or a group wait, and the log read through ``open_log`` has every record."""
    import asyncio

    from monitoring.sqlite_log import SQLiteLog

    async def scenario() -> None:
        store = SQLiteLog(tmp_path / "log.db", journal=True, index_interval_s=3600)
        recorder = PredictionRecorder(store, keep_inputs=False, max_input_bytes=0,
                                      group_wait_s=30.0)
        assert recorder.inline
        source = _Source()
        source.inflight = 3  # a group commit would wait 30 s for the others
        recorder.watch(source)
        recorder.start()
        try:
            await asyncio.wait_for(recorder.write(_one("a")), 1.0)
            await asyncio.wait_for(recorder.write(_one("b")), 1.0)
            assert recorder._executor._threads == set()  # the writer thread never started
        finally:
            await recorder.stop()

    asyncio.run(scenario())
    with open_log(tmp_path / "log.db") as log:
        assert log.window_stats("m").rows == 2


def test_answers_that_finish_in_one_turn_of_the_loop_share_one_append(tmp_path) -> None:
    """A batch's requests resume in one turn of the event loop: their rows go to the journal in
    one append (one frame), and none of them is answered before that append is written."""
    import asyncio

    from monitoring.journal import journals, read_frames
    from monitoring.sqlite_log import SQLiteLog

    async def scenario() -> list[int]:
        store = SQLiteLog(tmp_path / "log.db", journal=True, index_interval_s=3600)
        recorder = PredictionRecorder(store, keep_inputs=False, max_input_bytes=0)
        recorder.start()
        appended: list[int] = []
        real = store._journal.append

        def counting(rows) -> None:
            appended.append(len(rows))
            real(rows)

        store._journal.append = counting
        try:
            batch = [asyncio.ensure_future(recorder.write(_one(r))) for r in ("a", "b", "c")]
            await asyncio.sleep(0)  # the three tasks run to their writes in this turn
            assert appended == [] and not any(t.done() for t in batch)
            await asyncio.wait_for(asyncio.gather(*batch), 1.0)
            assert appended == [3]
            await asyncio.wait_for(recorder.write(_one("d")), 1.0)  # a later turn: its own
            (name, _), = journals(store.journal_dir)
            rows, _, stop = read_frames(store.journal_dir / name, 0)
            assert [r[0] for r in rows] == ["a", "b", "c", "d"] and stop == "end"
            return appended
        finally:
            await recorder.stop()

    assert asyncio.run(scenario()) == [3, 1]
    with open_log(tmp_path / "log.db") as log:
        assert log.window_stats("m").rows == 4


def test_a_journal_that_cannot_be_written_withholds_the_answer(tmp_path) -> None:
    import asyncio

    from monitoring.sqlite_log import SQLiteLog
    from service.recording import LogUnavailable

    async def scenario() -> None:
        store = SQLiteLog(tmp_path / "log.db", journal=True, index_interval_s=3600)
        recorder = PredictionRecorder(store, keep_inputs=False, max_input_bytes=0)
        recorder.start()
        try:
            store._journal.append = _raise_disk_full
            with pytest.raises(LogUnavailable, match="No space left"):
                await recorder.write(_one("a"))
        finally:
            await recorder.stop()

    asyncio.run(scenario())


def _raise_disk_full(rows) -> None:
    raise OSError(28, "No space left on device")


def test_under_full_synchronous_the_journal_append_takes_the_writer_thread(tmp_path) -> None:
    """FULL fsyncs each append, which must not block the event loop."""
    from monitoring.sqlite_log import SQLiteLog

    store = SQLiteLog(tmp_path / "log.db", synchronous="FULL", journal=True,
                      index_interval_s=3600)
    try:
        assert not PredictionRecorder(store, keep_inputs=False, max_input_bytes=0).inline
    finally:
        store.close()


class _AwayLog:
    """Stands for a PostgreSQL log with a spool: commits fail while ``away``; the spool keeps
    what it is given; ``caught_up_at`` is what its replaying thread would set."""

    spooled = True
    target, journal_dir = "postgresql://db/clf", "spool"
    outage_errors = (ConnectionError,)

    def __init__(self) -> None:
        self.away, self.spool_fails = False, False
        self.committed, self.spool, self.commits_tried = [], [], 0
        self.caught_up_at = float("-inf")

    def write_rows(self, rows) -> None:
        self.commits_tried += 1
        if self.away:
            raise ConnectionError("the server is gone")
        self.committed.extend(r[0] for r in rows)

    def spool_rows(self, rows) -> None:
        if self.spool_fails:
            raise OSError(28, "No space left on device")
        self.spool.extend(r[0] for r in rows)

    def close(self) -> None:
        pass


def test_a_log_that_takes_no_writes_sends_answers_to_the_spool_until_it_is_caught_up() -> None:
    import asyncio
    import time

    from service.recording import LogUnavailable

    async def scenario() -> None:
        store = _AwayLog()
        recorder = PredictionRecorder(store, keep_inputs=False, max_input_bytes=0)
        recorder.start()
        try:
            await recorder.write(_one("a"))
            assert store.committed == ["a"] and recorder.spooling_since is None
            store.away = True
            await recorder.write(_one("b"))  # the failed commit's records: spooled, answered
            assert store.spool == ["b"] and recorder.spooling_since is not None
            tried = store.commits_tried
            for rid in "cde":  # straight to the spool: no attempt at the server
                await recorder.write(_one(rid))
            assert store.spool == list("bcde") and store.commits_tried == tried
            store.away = False  # back, but the spool not replayed yet: still the spool
            await recorder.write(_one("f"))
            assert store.spool[-1] == "f" and store.commits_tried == tried
            store.caught_up_at = time.monotonic()  # the replaying thread got through
            await recorder.write(_one("g"))
            assert store.committed == ["a", "g"] and recorder.spooling_since is None
            store.away = store.spool_fails = True  # the server and the spool's disk both gone
            with pytest.raises(LogUnavailable, match="nor spooled: .*No space left"):
                await recorder.write(_one("h"))
            # a fault of the rows, not an outage: never spooled (it would fail again, replayed)
            store.away = store.spool_fails = False
            store.caught_up_at = time.monotonic()
            await recorder.write(_one("i"))  # back to committing
            store.write_rows = _raise_data_error
            with pytest.raises(LogUnavailable, match="value out of range"):
                await recorder.write(_one("j"))
            assert "j" not in store.spool and recorder.spooling_since is None
        finally:
            await recorder.stop()

    asyncio.run(scenario())


def _raise_data_error(rows) -> None:
    raise ValueError("value out of range for type integer")


def test_without_a_spool_a_log_that_takes_no_writes_withholds_the_answer() -> None:
    import asyncio

    from service.recording import LogUnavailable

    async def scenario() -> None:
        store = _AwayLog()
        store.spooled, store.away = False, True
        recorder = PredictionRecorder(store, keep_inputs=False, max_input_bytes=0)
        recorder.start()
        try:
            with pytest.raises(LogUnavailable, match="the server is gone"):
                await recorder.write(_one("a"))
            assert store.spool == [] and recorder.spooling_since is None
        finally:
            await recorder.stop()

    asyncio.run(scenario())
