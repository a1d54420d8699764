"""The prediction log on the request path: what each answer records, and the writer that makes
it durable before the answer is sent.

Durability: a request's records are durable in the prediction log before its answer is sent.
With SQLite (the default) that takes one append to the worker's journal file
(monitoring/journal.py), written on the event loop: no transaction, no lock shared with the other
workers, nothing to wait for; the answers that finish in one turn of the loop (a batch's) share
one append, made at the start of the next turn. A thread indexes the journal into the database
every ``CLF_LOG_INDEX_MS``. Otherwise (PostgreSQL, SQLite under ``synchronous=FULL``, or
``CLF_LOG_INDEX_MS=0``) each record is committed before the answer: commits are grouped, the
records of every request that finished since the last commit going into one transaction, written
by one thread while the model keeps running the next batch. A commit has a fixed cost (about
100 us of CPU on these machines, mostly system calls: the WAL frames, the locks, the inputs'
segment write) that several rows share, so while other requests are still on their way to the
log (preprocessing, queued, in the model: ``ServedModel.inflight``) the writer waits for them a
little (``group_wait_s``, ``CLF_LOG_GROUP_WAIT_MS``) before committing, as PostgreSQL's
``commit_delay`` does with ``commit_siblings``. A lone request never waits: with nothing else
under way it commits at once. If the log cannot be written (disk full, locked past the busy
timeout) the request answers 503 instead of an answer nobody recorded.

PostgreSQL's spool (``CLF_LOG_SPOOL_DIR``): a commit that fails because the server takes no
writes (down, restarting, failing over, unreachable: ``PostgresLog.outage_errors``; any other
failure answers 503 as above) does not fail its requests: their records are appended to this
worker's spool file on the replica's disk (``PostgresLog.spool_rows``, one write, on the event
loop) and they are answered. From then on every group goes to the spool, with no attempt at the
server that would make each wait out a connection timeout, until the log's replaying thread has
caught up with the spool after the failure (it tries every second: ``catch_up`` succeeded, so
the server takes writes again); then commits go to the server again. A spool that cannot be
written either (no folder configured, a full disk) answers 503 ``log_unavailable`` as before.

Imports the request-path parts of ``monitoring`` only (sqlite3 or psycopg, numpy), never pandas
or evidently.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Sequence

import numpy as np

from monitoring.store import PredictionLog, compact_json, encode_row

from .batching import cancel_task
from .metrics import get_metrics

if TYPE_CHECKING:
    from .served import Prediction, RequestContext, ServedModel

logger = logging.getLogger(__name__)


class LogUnavailable(RuntimeError):
    """The prediction log could not record an answer; the request must not be answered 200."""


class PredictionRecorder:
    """Group-committing writer over one ``PredictionLog`` (see the module docstring)."""

    MAX_GROUP = 64  # rows: a group this large commits without waiting for more

    def __init__(self, store: PredictionLog, keep_inputs: bool, max_input_bytes: int,
                 input_sample: float = 1.0, replica: str = "", group_wait_s: float = 0.0) -> None:
        self.store = store
        # A journaled SQLite log (monitoring/journal.py) makes records durable with one append:
        # written on the event loop, no commit to group. Under synchronous=FULL that append is
        # fsynced, which must not block the loop: it takes the writer thread like a commit.
        self.inline = bool(getattr(store, "journaled", False)) and not getattr(
            store, "fsync_inputs", False)
        self.group_wait_s = group_wait_s
        self._sources: weakref.WeakSet = weakref.WeakSet()  # the models whose requests log here
        self._committing = 0  # requests whose records are in the commit under way
        self.replica = replica
        self.keep_inputs = keep_inputs and input_sample > 0
        self.max_input_bytes = max_input_bytes
        self._sample_below = int(input_sample * 2**32)
        self._records: list[list] = []  # encoded rows (encode_row) waiting for the commit
        self._waiters: list[asyncio.Future] = []
        self._append_due = False  # inline: an append is scheduled for the loop's next turn
        self._wakeup: asyncio.Event | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predlog")
        self._task: asyncio.Task | None = None
        metrics = get_metrics()
        self._commit_seconds = metrics.log_commit
        self._errors = metrics.log_errors
        self._spooled, self._spooling_gauge = metrics.log_spooled, metrics.log_spooling
        # time.monotonic() when commits began to go to the spool; None: to the server
        self.spooling_since: float | None = None
        self._spool_reason = ""
        if getattr(store, "spooled", False):
            self._spooling_gauge.set(0)

    def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="predlog")

    async def stop(self) -> None:
        if self._task is not None:
            deadline = time.monotonic() + 10.0
            while self._records and time.monotonic() < deadline and not self._task.done():
                await asyncio.sleep(0.01)  # queued commits belong to requests awaiting answers
            await cancel_task(self._task)
            self._task = None
        self._executor.shutdown(wait=True)
        self.store.close()

    def watch(self, model: ServedModel) -> None:
        """Count ``model``'s requests under way as records on their way (the group wait)."""
        self._sources.add(model)

    def _coming(self) -> int:
        """Requests under way that have not handed their records over yet."""
        under_way = sum(model.inflight for model in self._sources)
        return under_way - len(self._waiters) - self._committing

    def sampled(self, request_id: str) -> bool:
        """Whether this request's inputs are kept (the same answer for every worker)."""
        return self.keep_inputs and zlib.crc32(request_id.encode()) < self._sample_below

    def keep(self, data: bytes, sampled: bool) -> bytes | None:
        """The raw input as stored: None when not kept, not sampled or over the size cap."""
        return data if sampled and len(data) <= self.max_input_bytes else None

    async def record(self, model: ServedModel, ctx: RequestContext,
                     predictions: Sequence[Prediction], probs: np.ndarray,
                     features: Sequence[dict] | None, inputs: Sequence[bytes] | None) -> None:
        """One row per answered input, durable before this returns. Encoded straight from the
        answers (``encode_row``), without a ``PredictionRecord`` each: the request path."""
        now, latency = time.time(), (time.perf_counter() - ctx.started) * 1000.0
        request_id, name, version = ctx.request_id, model.name, model.version
        replica = self.replica
        sampled = self.sampled(request_id)
        slices = compact_json(dict(ctx.slices)) if ctx.slices else "{}"
        await self.write([
            encode_row(request_id, i, now, name, version, p.label, p.confidence, p.ood,
                       p.ood_score, latency, slices, features[i] if features else None,
                       p.embedding, probs[i],
                       self.keep(inputs[i], sampled) if inputs else None, replica)
            for i, p in enumerate(predictions)])

    async def write(self, rows: list[list]) -> None:
        """Returns once ``rows`` (``encode_row``) are durable; raises LogUnavailable if they
        cannot be."""
        future = asyncio.get_running_loop().create_future()
        self._records.extend(rows)
        self._waiters.append(future)
        if self.inline:
            if not self._append_due:  # the first answer of this turn of the loop
                self._append_due = True
                asyncio.get_running_loop().call_soon(self._append)
        else:
            self._wakeup.set()
        await future

    def _append(self) -> None:
        """A journaled log's write, on the event loop: the rows of every answer written since
        the loop's last turn in one append (the requests of a batch finish in one turn: one
        system call, one frame for all of them), no lock shared with other workers."""
        self._append_due = False
        rows, waiters = self._records, self._waiters
        if not rows:
            return
        self._records, self._waiters = [], []
        started = time.perf_counter()
        try:
            self.store.write_rows(rows)
        except Exception as exc:
            logger.exception("prediction log write failed (%d records)", len(rows))
            self._errors.inc()
            error = LogUnavailable(f"the prediction log could not be written: {exc}")
            _settle(waiters, error)
            return
        self._commit_seconds.observe(time.perf_counter() - started)
        _settle(waiters)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._records:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.spooling_since is not None and self._spool_done():
                self._spooling_gauge.set(0)
                logger.warning("prediction log %s takes writes again: answers are committed "
                               "to it, and the spool is replayed into it", self.store.target)
                self.spooling_since = None
            if self.group_wait_s > 0 and self.spooling_since is None:
                await self._gather()
            records, waiters = self._records, self._waiters
            self._records, self._waiters = [], []
            if self.spooling_since is not None:
                self._spool(records, waiters)
                continue
            self._committing = len(waiters)
            started = time.perf_counter()
            try:
                await loop.run_in_executor(self._executor, self.store.write_rows, records)
            except Exception as exc:
                if getattr(self.store, "spooled", False) and isinstance(
                        exc, self.store.outage_errors):  # type: ignore[attr-defined]
                    self._spool_reason = f"{type(exc).__name__}: {exc}".strip()
                    logger.error("prediction log %s takes no writes (%s): answers' records go "
                                 "to the spool %s until it does", self.store.target,
                                 self._spool_reason, self.store.journal_dir)
                    self.spooling_since = time.monotonic()
                    self._spooling_gauge.set(1)
                    self._spool(records, waiters)
                    continue
                logger.exception("prediction log write failed (%d records)", len(records))
                self._errors.inc()
                error = LogUnavailable(f"the prediction log could not be written: {exc}")
                _settle(waiters, error)
                continue
            finally:
                self._committing = 0
            self._commit_seconds.observe(time.perf_counter() - started)
            _settle(waiters)

    def _spool_done(self) -> bool:
        """Whether the log's replaying thread caught up with the spool after commits began to
        go there: the server takes writes again."""
        return self.store.caught_up_at > self.spooling_since  # type: ignore[operator]

    def _spool(self, records: list[list], waiters: list[asyncio.Future]) -> None:
        """Records to this worker's spool (one append, on the event loop: the writer thread may
        still be held by the server); their requests are answered once it is written."""
        try:
            self.store.spool_rows(records)  # type: ignore[attr-defined]
        except Exception as exc:
            logger.exception("prediction log spool write failed (%d records)", len(records))
            self._errors.inc()
            error = LogUnavailable(f"the prediction log could not be written "
                                   f"({self._spool_reason}) nor spooled: {exc}")
            _settle(waiters, error)
            return
        self._spooled.inc(len(records))
        _settle(waiters)

    async def _gather(self) -> None:
        """Wait, at most ``group_wait_s``, while more records are on their way and the group is
        not full (see the module docstring)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.group_wait_s
        while len(self._records) < self.MAX_GROUP and self._coming() > 0:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._wakeup.clear()
            timer = loop.call_later(left, self._wakeup.set)
            try:
                await self._wakeup.wait()
            finally:
                timer.cancel()


def _settle(waiters: list[asyncio.Future], error: BaseException | None = None) -> None:
    """Answer the requests waiting on a group's records: written (``error`` None), or failed."""
    for waiter in waiters:
        if not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)
