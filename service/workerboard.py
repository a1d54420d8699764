"""How many requests each worker of this server has in its models now, in one small shared file.

A lone request on an idle model runs on the event loop (``batching.py``); where the model has a
*solo* session (``OnnxModel.add_solo_session``: every core of the server, its threads spinning
during a call and, in a stream of lone requests, for about 55 ms after it) that call takes about
two thirds of the time of a call on the worker's own single thread (a 64x64 CNN on 2 cores: 0.46
against 0.70 ms). That is only true while the other workers are idle: two solo calls at once
fight for the same cores, and their spinning threads take the CPU the other worker's event loop
needs (measured at 4 connections: a third less throughput). So a worker asks this board before
it calls the solo session: it does when the request is the only one in its own models and no
other worker has one in its models.

The board is one int64 per worker (``worker_index() - 1``) in a file that every worker maps
(``mmap``, shared): a worker writes only its own slot (an aligned 8-byte store) and reads all of
them (a read that races a write sees the old or the new count, and either is a fair answer for a
decision taken once per request). The file lives in the server's own temporary directory (the one
``patches.isolate_metrics_dir`` makes for the server's metrics and the workers inherit), so two
servers on one host do not see each other's workers. A worker that dies with requests in flight
leaves its count behind, which only keeps the others off the solo session until circus restarts
it (a worker zeroes its slot when it opens the board). Without a board (the app called
in-process, tests) the worker counts only its own requests.

The same directory holds the workers' start-up lock (``measuring``): a worker warms its models up
and times them (the batcher's calibration: is batching worth it, is a lone call short enough to
run inline, is the solo session faster) holding it, so one worker's figures are not taken while
another warms up or spins two threads on the same cores. Measured without it on a 2-core
box: a one-item call timed at 1.81 and 2.12 ms in the two workers against 1.76 alone, and the
solo session at 4.14 and 5.54 ms against 1.19, choices that sent lone requests the slow way
until the moving averages caught up or, past ``INLINE_MAX_S``, for good. The lock is an
``flock``: the kernel drops it with a worker that dies holding it. Before taking it a worker
also waits (up to ``LOAD_WAIT_S``) until every worker of the server has loaded its models
(``mark_loaded``; a second int64 per worker on the board, beside its count): the first worker loaded used to time
its calls while the second still imported its modules or built its ONNX Runtime session, and on
a 2-core Intel box 2 of 24 workers timed a one-item call of the peers' CNN at 1.22-1.28 ms
against 0.94-1.06 (its batch at 0.97-0.99 per item), found that batching pays and sent every
lone request through the model thread: half the rate at c=1. In one of those two starts the
other worker had just released the lock after timing its solo session, whose two threads still
spun: the lock is held ``SETTLE_S`` longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import mmap
import os
from typing import AsyncIterator

import numpy as np

logger = logging.getLogger(__name__)

FILE_NAME = "clfserve-workers.board"  # not ``*.db``: the metrics collector reads only those
LOCK_NAME = "clfserve-measuring.lock"
SLOT_BYTES = 8
LOAD_WAIT_S = 60.0  # how long ``measuring`` waits for the other workers to load
LOAD_POLL_S = 0.02
# ``measuring`` keeps the lock this long after its block: a solo session's threads spin for about
# 55 ms after its last call (the module doc above), on the cores the next worker times its calls on.
SETTLE_S = 0.1


class WorkerBoard:
    """Requests in this process's models now, published to the server's other workers."""

    def __init__(self) -> None:
        self.count = 0  # this worker's requests in its models
        self._slots: np.ndarray | None = None  # every worker's count (int64, shared)
        self._loaded: np.ndarray | None = None  # every worker's "models loaded" (0/1, shared)
        self._workers = 0
        self._mine = 0
        self._map: mmap.mmap | None = None
        self._lock_fd: int | None = None  # the start-up lock's file (``measuring``)

    def open(self, directory: str | None, index: int | None, workers: int) -> None:
        """Map the board of the server whose private directory is ``directory``, as worker
        ``index`` (1-based) of ``workers``; without a directory or an index, stay local."""
        if not directory or not index or index < 1:
            return
        slots = max(workers, index)
        try:
            self._lock_fd = os.open(os.path.join(directory, LOCK_NAME),
                                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            logger.warning("no start-up lock in %s (%s): workers time their models at once",
                           directory, exc)
        path = os.path.join(directory, FILE_NAME)
        size = 2 * slots * SLOT_BYTES  # per worker its count, then its "loaded" mark
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < size:  # every worker asks for the same
                    os.ftruncate(fd, size)  # size, so none shrinks another's
                self._map = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        except OSError as exc:
            logger.warning("no worker board at %s (%s): a lone request's solo call counts this "
                           "worker's requests only", path, exc)
            return
        # Interleaved, so a worker's pair sits at the same place whatever ``slots`` it asked for.
        board = np.frombuffer(self._map, dtype=np.int64, count=2 * slots).reshape(slots, 2)
        self._slots, self._loaded = board[:, 0], board[:, 1]
        self._workers = workers
        self._mine = index - 1
        self._slots[self._mine] = self.count
        self._loaded[self._mine] = 0  # loading (again, after a restart)

    def mark_loaded(self) -> None:
        """Tell the other workers this one has loaded its models (``measuring`` waits for
        that)."""
        if self._loaded is not None:
            self._loaded[self._mine] = 1

    def others_loading(self) -> list[int]:
        """The workers (1-based) of this server that have not yet loaded their models."""
        if self._loaded is None:
            return []
        return [i + 1 for i in range(self._workers) if not self._loaded[i]]

    def enter(self) -> None:
        self.count += 1
        if self._slots is not None:
            self._slots[self._mine] = self.count

    def leave(self) -> None:
        self.count -= 1
        if self._slots is not None:
            self._slots[self._mine] = self.count

    def alone(self) -> bool:
        """Whether the request asking is the only one in this server's models (its own count
        included)."""
        if self.count != 1:
            return False
        return self._slots is None or int(self._slots.sum()) == 1

    @contextlib.asynccontextmanager
    async def measuring(self) -> AsyncIterator[None]:
        """Hold the server's start-up lock (see the module doc) for the block, once every
        worker has loaded its models (at most ``LOAD_WAIT_S`` later); waits in a thread or in
        sleeps, so the event loop stays free meanwhile. Without a board: no lock."""
        fd = self._lock_fd
        if fd is None:
            yield
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOAD_WAIT_S
        while (loading := self.others_loading()) and loop.time() < deadline:
            await asyncio.sleep(LOAD_POLL_S)
        if loading:
            logger.warning("worker(s) %s still loading after %.0f s: timing this worker's "
                           "models meanwhile", loading, LOAD_WAIT_S)
        await loop.run_in_executor(None, fcntl.flock, fd, fcntl.LOCK_EX)
        try:
            yield
            await asyncio.sleep(SETTLE_S)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._map is not None:
            self._slots[self._mine] = 0
            self._slots = None
            self._loaded = None
            self._map.close()
            self._map = None


WORKERS = WorkerBoard()  # one per process; opened by the service in each worker
