"""The service's side of monitoring: the prediction log writer, request slices, OOD scoring and
the drift gauges, per worker.

Durability: a request's records are committed to the prediction log before its answer is sent.
Commits are grouped: the records of every request that finished since the last commit go into
one SQLite transaction, written by one thread, while the model keeps running the next batch.
Under load the requests of one model batch finish together, so this is one transaction per
batch; when traffic is light it is one per request. If the log cannot be written (disk full,
locked past the busy timeout) the request answers 503 instead of an answer nobody recorded.

Imports the request-path parts of ``monitoring`` only (sqlite3 + numpy), never pandas or
evidently.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from monitoring.exporter import state_path_for
from monitoring.ood import OODScorer, fit_ood
from monitoring.reference import load_reference
from monitoring.slices import SliceError, SliceRules
from monitoring.store import PredictionLog, PredictionRecord
from preprocessing import InputError

from .artifact import Artifact
from .batching import cancel_task
from .metrics import get_metrics

logger = logging.getLogger(__name__)

SLICES_HEADER = "x-slices"


class LogUnavailable(RuntimeError):
    """The prediction log could not record an answer; the request must not be answered 200."""


@dataclass(frozen=True)
class RequestContext:
    """What the HTTP layer knows about a request that the log needs."""

    request_id: str
    slices: Mapping[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


class PredictionLogger:
    """Group-committing writer over one ``PredictionLog`` (see the module docstring)."""

    def __init__(self, log: PredictionLog, keep_inputs: bool, max_input_bytes: int,
                 input_sample: float = 1.0) -> None:
        self.log = log
        self.keep_inputs = keep_inputs and input_sample > 0
        self.max_input_bytes = max_input_bytes
        self._sample_below = int(input_sample * 2**32)
        self._records: list[PredictionRecord] = []
        self._waiters: list[asyncio.Future] = []
        self._wakeup: asyncio.Event | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predlog")
        self._task: asyncio.Task | None = None
        metrics = get_metrics()
        self._commit_seconds = metrics.log_commit
        self._errors = metrics.log_errors

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
        self.log.close()

    def sampled(self, request_id: str) -> bool:
        """Whether this request's inputs are kept (the same answer for every worker)."""
        return self.keep_inputs and zlib.crc32(request_id.encode()) < self._sample_below

    def keep(self, data: bytes, sampled: bool) -> bytes | None:
        """The raw input as stored: None when not kept, not sampled or over the size cap."""
        return data if sampled and len(data) <= self.max_input_bytes else None

    async def write(self, records: Sequence[PredictionRecord]) -> None:
        """Returns once ``records`` are committed; raises LogUnavailable if they cannot be."""
        future = asyncio.get_running_loop().create_future()
        self._records.extend(records)
        self._waiters.append(future)
        self._wakeup.set()
        await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._records:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            records, waiters = self._records, self._waiters
            self._records, self._waiters = [], []
            started = time.perf_counter()
            try:
                await loop.run_in_executor(self._executor, self.log.write_batch, records)
            except Exception as exc:
                logger.exception("prediction log write failed (%d records)", len(records))
                self._errors.inc()
                error = LogUnavailable(f"the prediction log could not be written: {exc}")
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(error)
                continue
            self._commit_seconds.observe(time.perf_counter() - started)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)


def parse_slices(header: str, rules: SliceRules) -> dict[str, str]:
    """``X-Slices: device=ios; region=eu`` -> validated, folded tags; InputError if not allowed."""
    if not header.strip():
        return {}
    tags: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in header.split(";"))):
        key, sep, value = part.partition("=")
        if not sep:
            raise InputError("bad_field", f"X-Slices: {part!r} is not key=value; send "
                             "X-Slices: key=value; key2=value2")
        tags[key.strip()] = value.strip()
    try:
        return rules.apply(tags)
    except SliceError as exc:
        raise InputError("bad_field", f"X-Slices: {exc}") from None


def load_ood(artifact: Artifact, embedding_dim: int | None) -> OODScorer | None:
    """The artifact's OOD scorer, calibrated on its validation profile; None (logged) when the
    profile is missing or does not match what the model returns (e.g. the no-op runtime)."""
    try:
        scorer = fit_ood(load_reference(artifact.path))
    except (FileNotFoundError, KeyError, ValueError) as exc:
        logger.warning("%s:%s: no OOD flags (%s)", artifact.name, artifact.version, exc)
        return None
    if embedding_dim is not None and embedding_dim != scorer.dim:
        logger.warning("%s:%s: no OOD flags: the model returns %d-d embeddings, the reference "
                       "profile has %d-d", artifact.name, artifact.version, embedding_dim,
                       scorer.dim)
        return None
    return scorer


class DriftRefresher:
    """Copies the latest drift scores (``drift_latest.json`` next to the log, written by
    ``python -m monitoring drift``) into this worker's ``clf_drift_*`` gauges periodically."""

    def __init__(self, log_path: str | Path, every_s: float) -> None:
        from .metrics import drift_gauges

        self.state_path = state_path_for(log_path)
        self.every_s = every_s
        self._gauges = drift_gauges()
        self._task: asyncio.Task | None = None

    def refresh(self) -> None:
        try:
            self._gauges.refresh(self.state_path)
        except Exception:  # a half-written or foreign file must not take the worker down
            logger.exception("could not read drift state %s", self.state_path)

    def start(self) -> None:
        self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="drift-gauges")

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.every_s)
            await loop.run_in_executor(None, self.refresh)

    async def stop(self) -> None:
        await cancel_task(self._task)
