"""Adaptive batching across concurrent requests, one queue and one model thread per worker: step
5 of the request path (``service.py`` lists them all).

The policy is greedy: when the model is free, everything queued (up to ``max_batch_size``) goes in
one batch at once. While a batch runs in the model thread, new requests keep arriving and queue
up, so the batch size follows the load by itself: 1 when traffic is light (no added latency),
large under pressure. ``max_queue_delay_s`` optionally holds a partial batch a little longer, but
the wait is measured from the oldest item's arrival, so no item waits longer than that in total
for company.

The event loop only queues items (``submit``) and hands results back to their requests; the
model thread takes the next batch itself the moment a call ends. So the model never waits for
the event loop: under a flood of connections the loop can be hundreds of milliseconds behind,
and a batcher on the loop would leave the model idle for that long between calls (ORT releases
the GIL while it runs, so the loop keeps reading and decoding the next requests meanwhile). An
idle model thread starts when the loop's current pass is over (or ``COALESCE_S`` after the first
item), so a burst of requests read in one pass shares one call, as before.

Two optional hooks make the same loop serve a text model: ``plan`` picks which queued items go
into the next call (``LengthPlanner``: length grouping, below), ``collate`` builds the model
input from their tensors (``PadCollate``: padding). Without them, the image path is the cheap
default: up to ``max_batch_size`` items from the front of the queue, ``np.stack``-ed. A third,
``finish``, runs on a call's outputs right after it, once for all its rows and in the model
thread (on the event loop for an inline call), with what each item's caller gave along
(``submit(..., extras)``); its result for each row comes back with the row. The service scores
OOD flags there: the scorer's matrix products and partitions cost per row several times less
over a call's rows together than over one answer alone, and the work leaves the event loop.

Length grouping for a text model: a call costs about (texts x longest length) token slots,
padding included, so one long text in a call of short ones makes every short one pay for its
length. The planner takes the queue's oldest ``max_batch_size`` texts, sorts them by token length
and cuts the sorted run into groups where (a) the call's padded size ``N x L`` stays within
``max_batch_tokens`` and (b) at most ``max_padding`` of its token slots are padding. The group
holding the oldest text goes into the next call (so no text starves behind a stream of shorter
ones); the others go back to the front of the queue in their arrival order and are planned again
when the model is free, together with whatever arrived meanwhile. Each call is padded to its own
longest text.

A lone request on an idle model runs inline: when the model thread is waiting for work, nothing is
queued, the caller knows of no other request on its way to the model (``submit(..., alone=True)``:
the service passes its admission count and the number of requests its HTTP server has under way,
so requests read in the same pass of the loop are still batched), the request has one item, a one-item call of this model
has been measured to take at most ``INLINE_MAX_S``, and batching does not pay for this model here
(a measured call of ``BATCHED_MIN`` items or more costs per item at least ``BATCH_GAIN`` of a
one-item call: true of the reference CNN with one intra-op thread on a CPU, where batch 64 is no
cheaper per image than batch 1; not of a GPU, where batching wins by far), the event loop calls
the model itself instead of handing the item to the model thread and waiting for the answer to
come back. The hand-off costs two thread wake-ups (each needing the GIL) and a wake-up of the
loop through its self-pipe: at c=1 a large share of a small model's latency, and where batching
does not pay, overhead with nothing in return. The loop is blocked for the call meanwhile, which
is why only a call measured to be short runs there. (The admission count alone is not enough: a
request whose whole path has no await point before the model, a v2 tensor already in the buffer,
runs to its model call before the requests read with it start, so it would always find itself
alone and the worker would serve one request at a time under any load.) Whether batching pays is
measured once, at the warm-up (``calibrate``: one-item calls in a row, then full batches in a row,
then one-item calls again, the best of nine over both windows and of three, after one of each
window not counted), as each is served: a lone call after
a lone call (c=1), a batch after a batch (under load). Timed in turns instead, each one-item call
came after a 64-item one had pushed its weights and buffers out of the cache: the peers' CNN on the
worker's one thread, 0.93-0.96 ms a lone call in a row against 1.0-1.19 in turns, 0.96 per item
batched, so the ratio fell on either side of ``BATCH_GAIN`` from one start to the next (0.80-0.96
in turns, 1.01-1.04 in a row, in a loop of its own on a 2-core Intel Xeon; in the serving workers
of ten server starts each, 0.76-0.83 in turns, two of the twenty workers finding batching paying,
against 0.93-1.08 in a row), and a worker that found batching paying sent every lone request
through the model thread on its one thread: half the requests/s at c=1. Figures taken under load
would compare a lone call slowed by the other worker's work with batched calls that were not, and
flip the decision back and forth (measured: the same cell batching 2.5 items per call in one run
and 1.0 in the next; a moving average of lone calls under load crossed ``INLINE_MAX_S`` and stopped
inlining for good). ``solo_s`` (a moving average of one-item calls) is kept for what it says, not
for the decision.

Where the model has a solo session (``OnnxModel.add_solo_session``: every core, its threads
spinning; a one-item call of the reference CNN 0.35-0.45 ms against 0.6-0.75 ms
on the worker's one thread) and no other request is under way in any worker of the server
(``solo_gate``: ``workerboard.py``), the inline call runs there. Which session is faster is
measured, not assumed: at start (``time_solo``) and then on the gated calls themselves; the
solo session is used while the median of its last ``SOLO_WINDOW`` calls is under ``SOLO_GAIN``
of the other's. To keep both figures current, the last few of every ``SOLO_PROBE_EVERY`` gated
calls run on the other session (a burst; see below for how many and how often), and the first
call of each run on a session is not counted: a session's first call after dozens on the other
is slower than the next ones (its threads and caches are cold), so counting single probes made
whichever session was in use look the faster. And a median, not a moving average: on a shared
machine one call in a few hundred is preempted and takes several times as long, which moved an
average by a fifth of it for many calls. Both measured at c=1 on a 2-core box (the peers'
CNN): lone calls took the worker's own session half the time or more, 2.0-2.1 ms a call
against 1.2-1.3 on the solo one, 270-290 against 410-430 requests/s.

The two bursts differ because their costs do. A call on the worker's own session costs what the
solo one saves (the peers' CNN on 2 cores: 1.2 ms against 0.65-0.75 in the serving worker), so
its burst is short (``SOLO_PROBE_BURST``) and comes at most once in ``SOLO_OWN_PROBE_S``: at
every 64th call it ran 4.7% of the lone calls at c=1 on the slow session. A burst on the solo
session happens only while the worker is on its own one, usually because a noisy spell pushed the
solo median over (preempted calls; the worker's own calls slow down too, so it does not last);
it costs nothing where the solo session is faster, and it is long enough (``SOLO_RETURN_BURST``:
a majority of the window, counted) to bring the worker back in one burst. With 2 counted calls
a burst it took three, about 190 calls at the slow session's pace for each noisy spell. Measured
in the serving worker at c=1 on a 2-core box (the peers' CNN, 10-s cells, alternating server
starts of the two versions): before, 2.0-10% of the lone calls ran on the worker's own session
(4.7% in the quiet runs); now 1.0-2.0%, most of them in the first 0.2 s, while the other worker
still warms up; 1.01-1.04x the requests a second in three paired rounds.

Deadlines: an item may carry one (``submit(..., deadline)``, a ``time.perf_counter()`` instant).
When the batcher forms a call and the earliest deadline in the queue has passed, it first takes
every expired item out of the queue and fails its future with ``DeadlineExceeded``, so nothing
is computed for a caller who has been answered already; an item already past its deadline when
it is submitted is never queued. Items without a deadline cost nothing: the earliest deadline is
kept as one float, and the queue is only scanned when that float has passed.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from preprocessing import pad_ids

from .runtime import Batch, Model, Outputs


def _best_of(call: Callable[[], Any], rounds: int) -> float:
    """``call``'s shortest time over ``rounds`` calls in a row, after one not counted."""
    call()
    best = math.inf
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def _stacked(tensors: list[Any]) -> Any:
    """The call's input: the items stacked, or a lone C-contiguous array as a one-row view of
    itself (no copy: a v2 tensor is a view of the request's body; ``np.stack`` copied its
    48 KB, 5 us in a loop of its own and about 70 in the serving worker at c=1, py-spy)."""
    if len(tensors) == 1 and isinstance(tensors[0], np.ndarray) and tensors[0].flags.c_contiguous:
        return tensors[0][None]
    return np.stack(tensors)


def _ewma(average: float | None, value: float) -> float:
    return value if average is None else average + EWMA_WEIGHT * (value - average)


async def cancel_task(task: asyncio.Task | None) -> None:
    """Cancel a background loop and wait until it has stopped (None: nothing to do)."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


class BatchError(RuntimeError):
    """The model failed or returned a batch of the wrong length; every item in it fails."""


class DeadlineExceeded(RuntimeError):
    """The request's deadline passed while it waited; it was dropped before inference."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


NO_DEADLINE = math.inf
# The longest an idle model thread waits, once work has arrived, for the event loop's current
# pass to queue the rest of a burst (see ``Batcher.submit``).
COALESCE_S = 0.005
# A lone request on an idle model runs on the event loop when a one-item call takes at most this
# (as calibrated): the longest the loop is blocked by it. Only a request that finds no other one
# under way runs inline, so what waits meanwhile is a newcomer's reading and decoding, which
# would then wait for the model anyway (batching does not pay). 2 ms, before, sat on the
# reference CNN's own call on slower 2-core boxes (1.76 ms), which then lost the inline path.
INLINE_MAX_S = 0.005
BATCHED_MIN = 8  # a calibration batch of at least this many items says what batching costs
BATCH_GAIN = 0.8  # batching pays when it costs per item under this share of a lone item's
EWMA_WEIGHT = 0.2  # of the newest one-item call in that average
# A lone item on an idle server runs on the model's solo session (``_run_inline``) while its
# recent calls there take under this share of those on its own threads (medians); the last few
# of every SOLO_PROBE_EVERY such items run on the other session, so that both figures follow the
# machine (the first call of each run on a session is not counted; the module doc).
SOLO_GAIN = 0.9
SOLO_PROBE_EVERY = 64
SOLO_WINDOW = 9  # the last calls of each session whose median ``solo_pays`` compares
SOLO_PROBE_BURST = 3  # calls of a burst on the model's own threads (the slower session)...
SOLO_OWN_PROBE_S = 1.0  # ...at most this often
SOLO_RETURN_BURST = SOLO_WINDOW // 2 + 2  # calls of a burst on the solo session: a majority


class RecentTimes:
    """The last ``size`` durations of one kind of call, and their median (see the module doc)."""

    def __init__(self, size: int = SOLO_WINDOW) -> None:
        self._times: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self._times.append(seconds)

    @property
    def median(self) -> float | None:
        """The median of the recent durations (the upper one of an even count); None before
        the first."""
        if not self._times:
            return None
        ordered = sorted(self._times)
        return ordered[len(ordered) // 2]


@dataclass
class BatchStats:
    """What the batcher reports per batch (the service turns it into Prometheus metrics)."""

    size: int
    queue_waits: list[float]
    inference_seconds: float


@dataclass
class _Item:
    tensor: Any  # an image's float32 array; a text's 1-D int64 token ids
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    deadline: float = NO_DEADLINE  # a time.perf_counter() instant
    since: float = 0.0  # when its request was admitted (perf_counter); 0: when enqueued
    extra: Any = None  # what the caller gave along for ``finish`` (submit's ``extras``)


# plan(pending, max_batch_size) removes and returns the items of the next call (at least one);
# collate(tensors) -> the model's input for those items, in that order;
# finish(outputs, extras) -> one result per row of a call's outputs, extras in the same order.
Plan = Callable[["deque[_Item]", int], "list[_Item]"]
Collate = Callable[[list], Batch]
Finish = Callable[[Outputs, list], Sequence]
# What ``submit`` gives back per item: its probabilities, its embedding and ``finish``'s result
# for its row (None without the hook).
Answered = tuple[np.ndarray, np.ndarray, Any]


class Batcher:
    """The queue of one model and the thread that runs it (see the module doc)."""

    def __init__(
        self,
        model: Model,
        max_batch_size: int,
        max_queue_delay_s: float = 0.0,
        on_batch: Callable[[BatchStats], None] | None = None,
        plan: Plan | None = None,
        collate: Collate | None = None,
        finish: Finish | None = None,
    ) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self._on_batch = on_batch
        self._plan = plan
        self._collate = collate
        self._finish = finish
        # Shared by the event loop (submit) and the model thread (everything else): every
        # access holds ``_ready``'s lock.
        self._pending: deque[_Item] = deque()
        self._ready = threading.Condition()
        self._earliest = NO_DEADLINE  # <= every queued item's deadline
        self._stopping = False
        self._idle = False  # the model thread waits for work (set and cleared by it alone)
        self._kicking = False  # a kick is scheduled on the event loop
        self._kicked = False  # the event loop's pass that queued the work is over
        self._holding = False  # the model thread holds a partial batch for company
        self.expired = 0  # items dropped at their deadline, in all
        # How long the oldest item of the last model call had waited for it since its request
        # was admitted (``submit``'s ``since``: reading, decoding and queueing; else since it was
        # queued); 0 once the queue is found empty. What a newcomer can expect to wait before
        # its own call (served.py's admission reads it).
        self.queue_wait_s = 0.0
        # What a one-item call takes (moving average; None until one was measured) and how many
        # ran inline on the event loop (see the module doc).
        self.solo_s: float | None = None
        self.batched_item_s: float | None = None  # per item in a full batch (calibrate)
        self._calibrated_solo_s: float | None = None  # a one-item call, measured beside it
        self.inline_calls = 0
        # Whether a lone item may run on the model's solo session now (``ServedModel`` sets it
        # when the model has one: ``workerboard.WORKERS.alone``), what such calls took there
        # and on the model's own threads (see ``_run_inline``), how many ran there and how
        # many lone items the gate let through.
        self.solo_gate: Callable[[], bool] | None = None
        self._on_solo = RecentTimes()
        self._on_own = RecentTimes()
        self.solo_calls = 0
        self._gated = 0
        self._on_solo_now = False  # the session the last gated call ran on
        self._probing_solo = False  # the session a probe burst runs on
        self._burst = 0  # how many calls that burst lasts (0: none this time)
        self.own_probe_s = SOLO_OWN_PROBE_S
        self._own_probed = -math.inf  # when the last burst on the model's own threads began
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="model", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        """Stop the model thread (after the call it is in) and fail what is still queued."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with self._ready:
            self._stopping = True
            left = list(self._pending)
            self._pending.clear()
            self._ready.notify()
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        self._fail(left, BatchError("the model stopped before this input's call"))

    @property
    def queued(self) -> int:
        """Items waiting for a model call now."""
        return len(self._pending)

    async def submit(self, tensors: list[Any], deadline: float = NO_DEADLINE,
                     alone: bool = False, since: float = 0.0,
                     extras: Sequence[Any] | None = None) -> list[Answered]:
        """Queue one request's items; returns (probabilities, embedding, finished) per item, in
        order. Raises ``DeadlineExceeded`` when ``deadline`` passes before their model call
        starts. ``alone``: the caller knows of no other request on its way to this model (one
        being read or decoded would want to share the call), so a lone item may run inline.
        ``since``: when the request was admitted (``queue_wait_s`` counts from there).
        ``extras``: one per tensor, handed to ``finish`` with its row (None: none)."""
        loop = asyncio.get_running_loop()
        if deadline != NO_DEADLINE and deadline <= time.perf_counter():
            self.expired += len(tensors)
            raise DeadlineExceeded("the request's deadline passed before its inputs were "
                                   "queued; nothing was computed")
        if alone and len(tensors) == 1 and self.inline_pays():
            with self._ready:
                lone = (self._idle and not self._kicking and not self._pending
                        and not self._stopping)
            if lone:  # nothing can be queued meanwhile: this loop is busy with the call
                return [self._run_inline(tensors[0], None if extras is None else extras[0])]
        items = [_Item(t, loop.create_future(), deadline=deadline, since=since,
                       extra=None if extras is None else extras[i])
                 for i, t in enumerate(tensors)]
        kick = False
        with self._ready:
            if self._stopping:
                raise BatchError("the model is stopping")
            self._pending.extend(items)
            if deadline < self._earliest:
                self._earliest = deadline
            if self._holding:
                self._ready.notify()
            elif self._idle and not self._kicking:
                self._kicking = kick = True
                self._ready.notify()
        if kick:
            # An idle model thread starts when this pass of the event loop is over (the kick),
            # or COALESCE_S after the first item, whichever is first: what arrives in the same
            # pass (a burst of requests read together) shares the call, as it would with a
            # batcher on the loop, and a loop far behind under a flood delays a call by
            # COALESCE_S at most. A busy thread needs no kick: it takes the queue itself the
            # moment its call ends.
            loop.call_soon(self._kick)
        if len(items) == 1:
            return [await items[0].future]
        # Every future is awaited, so a failed batch leaves no "exception never retrieved".
        results = await asyncio.gather(*(item.future for item in items), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    def _call(self, tensors: list[Any], solo: bool = False) -> Outputs:
        """One model call over ``tensors`` (stacked, or the collate hook's input; on the solo
        session if ``solo``); any failure, or a wrong number of rows back, is a ``BatchError``."""
        try:
            x = _stacked(tensors) if self._collate is None else self._collate(tensors)
            out = self.model.run_solo(x) if solo else self.model.run(x)
        except Exception as exc:
            raise exc if isinstance(exc, BatchError) else BatchError(f"inference failed: {exc!r}")
        n = len(tensors)
        if out.probabilities.shape[0] != n or out.embedding.shape[0] != n:
            raise BatchError(f"model returned {out.probabilities.shape[0]} rows for a batch of {n}")
        return out

    def _finished(self, out: Outputs, extras: list[Any]) -> Sequence[Any]:
        """``finish``'s result for every row of a call (Nones without the hook); any failure,
        or a wrong number of results, is a ``BatchError``."""
        if self._finish is None:
            return [None] * len(extras)
        try:
            done = self._finish(out, extras)
        except Exception as exc:
            raise BatchError(f"finishing the call's answers failed: {exc!r}") from exc
        if len(done) != len(extras):
            raise BatchError(f"finish returned {len(done)} results for a batch of {len(extras)}")
        return done

    def _run_inline(self, tensor: Any, extra: Any = None) -> Answered:
        """One item's call on the event loop (see the module doc)."""
        gated = self.solo_gate is not None and self.solo_gate()
        solo = counted = False
        if gated:  # the faster session by the figures; a few in SOLO_PROBE_EVERY, the other
            phase = self._gated % SOLO_PROBE_EVERY
            self._gated += 1
            if phase == SOLO_PROBE_EVERY - SOLO_RETURN_BURST:  # the burst, held to its end
                self._probing_solo = not self.solo_pays()
                self._burst = (SOLO_RETURN_BURST if self._probing_solo else
                               SOLO_PROBE_BURST if self._own_probe_due() else 0)
            solo = (self._probing_solo if phase >= SOLO_PROBE_EVERY - self._burst
                    else self.solo_pays())
            counted = solo == self._on_solo_now  # not the first of a run on a session
            self._on_solo_now = solo
        started = time.perf_counter()
        out = self._call([tensor], solo)
        elapsed = time.perf_counter() - started
        done = self._finished(out, [extra])
        if solo:
            self.solo_calls += 1
            if counted:
                self._on_solo.add(elapsed)
        else:  # solo_s stays what a call on the model's own threads costs
            self._note_call(1, elapsed)
            if counted:
                self._on_own.add(elapsed)
        self.inline_calls += 1
        self.queue_wait_s = 0.0
        if self._on_batch is not None:  # after the answer is written (ServedModel.answer)
            self._loop.call_soon(self._on_batch, BatchStats(1, [0.0], elapsed))
        return out.probabilities[0], out.embedding[0], done[0]

    def _own_probe_due(self) -> bool:
        """Whether a burst on the model's own threads is due: at most one in ``own_probe_s``
        (the module doc)."""
        now = time.perf_counter()
        if now - self._own_probed < self.own_probe_s:
            return False
        self._own_probed = now
        return True

    def inline_pays(self) -> bool:
        """Whether a lone item may run on the event loop: its call is short and batching does
        not pay, both as calibrated."""
        solo = self._calibrated_solo_s
        return solo is not None and solo <= INLINE_MAX_S and not self.batching_pays()

    @property
    def lone_on_solo_s(self) -> float | None:
        """A lone item's call on the solo session: the median of the recent ones."""
        return self._on_solo.median

    @property
    def lone_on_own_s(self) -> float | None:
        """A lone item's call on the model's own threads, gated like a solo one: the median of
        the recent ones."""
        return self._on_own.median

    def solo_pays(self) -> bool:
        """Whether a lone item on an idle server is faster on the solo session, by the recent
        such calls on either (started from ``time_solo``'s figures)."""
        solo, own = self.lone_on_solo_s, self.lone_on_own_s
        return solo is not None and own is not None and solo < SOLO_GAIN * own

    def batching_pays(self) -> bool:
        """Whether a batched call costs clearly less per item than a lone one, as calibrated
        (not calibrated: yes)."""
        solo, batched = self._calibrated_solo_s, self.batched_item_s
        return solo is None or batched is None or batched < BATCH_GAIN * solo

    def _note_call(self, items: int, seconds: float) -> None:
        """Fold a one-item call's duration into ``solo_s`` (both threads call it; a float
        assignment is atomic)."""
        if items == 1:
            self.solo_s = _ewma(self.solo_s, seconds)

    def calibrate(self, one: Batch, many: Batch, items: int, rounds: int = 3) -> None:
        """Time one-item calls in a row, then ``items``-item ones of the same item size in a
        row, then one-item calls in a row again: the best of ``3 * rounds`` (over both windows)
        and of ``rounds``, after one of each window not counted (after the warm-up, in a worker
        thread; the module doc says why in a row, and a one-item call is cheap enough to be
        taken more often): what ``batching_pays`` compares, and the first ``solo_s``."""
        def lone_call() -> Any:
            return self.model.run(one)

        lone = _best_of(lone_call, 3 * rounds)
        batched = _best_of(lambda: self.model.run(many), rounds)
        # Lone calls again, after the batches: the best over two windows some 0.25 s apart. A
        # slowed window (the box, another process) only ever lengthens calls, and a one-item
        # call over-timed by a quarter is enough to find that batching pays where it does not.
        lone = min(lone, _best_of(lone_call, 3 * rounds))
        self.solo_s = self._calibrated_solo_s = lone
        self.batched_item_s = batched / items if items >= BATCHED_MIN else None

    def time_solo(self, one: Batch, rounds: int = 5) -> None:
        """Start the figures ``solo_pays`` compares: ``rounds`` one-item calls on the model's
        solo session and on its own, alternately, after a warm-up of the solo one (in a worker
        thread, at start, like ``calibrate``). What lone calls take later replaces them."""
        for _ in range(rounds):
            self.model.run_solo(one)
        for _ in range(rounds):
            for run, times in ((self.model.run_solo, self._on_solo),
                               (self.model.run, self._on_own)):
                started = time.perf_counter()
                run(one)
                times.add(time.perf_counter() - started)

    def run_sync(self, batch: Batch) -> Outputs:
        """Run one batch directly (warm-up), bypassing the queue."""
        return self.model.run(batch)

    # ---- the model thread ---------------------------------------------------------------------

    def _run(self) -> None:
        loop = self._loop
        while True:
            batch, expired = self._next_batch()
            if expired:
                loop.call_soon_threadsafe(self._expire, expired)
            if batch is None:
                return
            if not batch:  # everything queued had expired
                continue
            started = time.perf_counter()
            try:
                out = self._call([item.tensor for item in batch])
                elapsed = time.perf_counter() - started
                done = self._finished(out, [item.extra for item in batch])
            except BatchError as error:  # every waiting request must hear about it, not hang
                loop.call_soon_threadsafe(self._fail, batch, error)
                continue
            stats = BatchStats(len(batch), [started - it.enqueued for it in batch], elapsed)
            self._note_call(len(batch), elapsed)
            loop.call_soon_threadsafe(self._deliver, batch, out, done, stats)

    def _next_batch(self) -> tuple[list[_Item] | None, list[_Item]]:
        """Wait for work, then take the next call's items (None: stopping) and the expired ones."""
        with self._ready:
            while True:
                if not self._pending and not self._stopping:
                    self.queue_wait_s = 0.0
                    self._idle, self._kicked = True, False
                    while not self._pending and not self._stopping:
                        self._ready.wait()
                    until = time.perf_counter() + COALESCE_S
                    while not self._kicked and not self._stopping:  # the kick, or COALESCE_S
                        remaining = until - time.perf_counter()
                        if remaining <= 0:
                            break
                        self._ready.wait(remaining)
                    self._idle = False
                if self._stopping:
                    return None, []
                if not self._pending:
                    continue
                if self.max_queue_delay_s > 0:
                    self._holding = True
                    self._hold_for_company()
                    self._holding = False
                expired = self._take_expired() if self._earliest <= time.perf_counter() else []
                if self._pending:
                    break
                if expired:
                    return [], expired
            # the oldest item is first: the planner puts what it leaves back in arrival order
            oldest = self._pending[0]
            self.queue_wait_s = time.perf_counter() - (oldest.since or oldest.enqueued)
            if self._plan is None:
                n = min(len(self._pending), self.max_batch_size)
                batch = [self._pending.popleft() for _ in range(n)]
            else:
                batch = self._plan(self._pending, self.max_batch_size)
            # a cancelled item's caller is gone (its client went away): not worth a model call
            return [item for item in batch if not item.future.done()], expired

    def _take_expired(self) -> list[_Item]:
        """Take every item whose deadline has passed (or whose caller is gone) out of the queue;
        recompute the earliest deadline of those left. Holds the lock."""
        now = time.perf_counter()
        kept: deque[_Item] = deque()
        expired: list[_Item] = []
        earliest = NO_DEADLINE
        for item in self._pending:
            if item.future.done():  # cancelled: nobody waits for it
                continue
            if item.deadline <= now:
                expired.append(item)
                continue
            kept.append(item)
            if item.deadline < earliest:
                earliest = item.deadline
        self._pending = kept
        self._earliest = earliest
        self.expired += len(expired)
        return expired

    def _hold_for_company(self) -> None:
        """Hold a partial batch until it fills or its oldest item has waited max_queue_delay_s.
        Holds the lock (``wait`` releases it meanwhile)."""
        deadline = self._pending[0].enqueued + self.max_queue_delay_s
        while self._pending and len(self._pending) < self.max_batch_size and not self._stopping:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._ready.wait(remaining)

    # ---- back on the event loop -----------------------------------------------------------

    def _kick(self) -> None:
        with self._ready:
            self._kicking, self._kicked = False, True
            self._ready.notify()

    def _deliver(self, batch: list[_Item], out: Outputs, done: Sequence[Any],
                 stats: BatchStats) -> None:
        for i, item in enumerate(batch):
            if not item.future.done():  # the client may have gone away
                item.future.set_result((out.probabilities[i], out.embedding[i], done[i]))
        if self._on_batch is not None:
            self._on_batch(stats)

    def _expire(self, items: list[_Item]) -> None:
        now = time.perf_counter()
        for item in items:
            if not item.future.done():
                item.future.set_exception(DeadlineExceeded(
                    f"the request's deadline passed after {(now - item.enqueued) * 1e3:.0f} ms "
                    "in the batch queue; it was dropped before inference"))

    @staticmethod
    def _fail(items: list[_Item], error: Exception) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)


# ---- length grouping for text models ---------------------------------------------------

# A model call has a fixed cost (session overhead, kernel launches) that a few pad tokens per
# row do not outweigh: texts within this many tokens of the group's shortest always share a call.
SLACK_TOKENS = 8


def length_groups(lengths: Sequence[int], max_tokens: int, max_padding: float) -> list[list[int]]:
    """Partition indices of ``lengths`` into model calls, each a run of the length-sorted order.

    A group grows while ``N x longest <= max_tokens`` and its padding is at most ``max_padding``
    of ``N x longest`` (or its lengths are within ``SLACK_TOKENS`` of each other). One text is
    always a group of its own, whatever its length.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)  # stable: ties keep arrival order
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        longest = lengths[i]  # sorted ascending: a newcomer is the group's longest
        if current:
            padded = (len(current) + 1) * longest
            waste = padded - real - longest
            close = longest - lengths[current[0]] <= SLACK_TOKENS
            if padded > max_tokens or (waste > max_padding * padded and not close):
                groups.append(current)
                current, real = [], 0
        current.append(i)
        real += longest
    if current:
        groups.append(current)
    return groups


class LengthPlanner:
    """``Batcher`` plan hook: the next call's texts, grouped by length (see the module doc)."""

    def __init__(self, max_tokens: int, max_padding: float) -> None:
        self.max_tokens = max_tokens
        self.max_padding = max_padding

    def __call__(self, pending: "deque[_Item]", max_items: int) -> "list[_Item]":
        n = min(len(pending), max_items)
        if n == 1:
            return [pending.popleft()]
        candidates = [pending.popleft() for _ in range(n)]
        groups = length_groups([len(c.tensor) for c in candidates], self.max_tokens,
                               self.max_padding)
        chosen = next(g for g in groups if 0 in g)  # the oldest queued text rides now
        taken = set(chosen)
        pending.extendleft(reversed([c for i, c in enumerate(candidates) if i not in taken]))
        return [candidates[i] for i in chosen]


class PadCollate:
    """``Batcher`` collate hook: token id rows -> the text model's padded int64 inputs."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[np.ndarray]) -> dict[str, np.ndarray]:
        input_ids, attention_mask = pad_ids(rows, self.pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}
