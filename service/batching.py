"""Adaptive batching across concurrent requests, on the event loop of one worker: step 4 of
the request path (``service.py`` lists them all).

The policy is greedy: when the model is free, everything queued (up to ``max_batch_size``) goes in
one batch at once. While a batch runs in the model thread, new requests keep arriving and queue
up, so the batch size follows the load by itself: 1 when traffic is light (no added latency),
large under pressure. ``max_queue_delay_s`` optionally holds a partial batch a little longer, but
the wait is measured from the oldest item's arrival, so no item waits longer than that in total
for company.

Two optional hooks make the same loop serve a text model: ``plan`` picks which queued items go
into the next call (``LengthPlanner``: length grouping, below), ``collate`` builds the model
input from their tensors (``PadCollate``: padding). Without them, the image path is the cheap
default: up to ``max_batch_size`` items from the front of the queue, ``np.stack``-ed.

Length grouping for a text model: a call costs about (texts x longest length) token slots,
padding included, so one long text in a call of short ones makes every short one pay for its
length. The planner takes the queue's oldest ``max_batch_size`` texts, sorts them by token length
and cuts the sorted run into groups where (a) the call's padded size ``N x L`` stays within
``max_batch_tokens`` and (b) at most ``max_padding`` of its token slots are padding. The group
holding the oldest text goes into the next call (so no text starves behind a stream of shorter
ones); the others go back to the front of the queue in their arrival order and are planned again
when the model is free, together with whatever arrived meanwhile. Each call is padded to its own
longest text.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from preprocessing import pad_ids

from .runtime import Batch, Model, Outputs


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


# plan(pending, max_batch_size) removes and returns the items of the next call (at least one);
# collate(tensors) -> the model's input for those items, in that order.
Plan = Callable[["deque[_Item]", int], "list[_Item]"]
Collate = Callable[[list], Batch]


class Batcher:
    def __init__(
        self,
        model: Model,
        max_batch_size: int,
        max_queue_delay_s: float = 0.0,
        on_batch: Callable[[BatchStats], None] | None = None,
        plan: Plan | None = None,
        collate: Collate | None = None,
    ) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self._on_batch = on_batch
        self._plan = plan
        self._collate = collate
        self._pending: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        # One model thread: one batch in flight per worker. ORT releases the GIL while it runs,
        # so the event loop keeps reading and decoding the next requests meanwhile.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None
        self._executor.shutdown(wait=True)

    async def submit(self, tensors: list[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Queue one request's items; returns (probabilities, embedding) per item, in order."""
        loop = asyncio.get_running_loop()
        items = [_Item(t, loop.create_future()) for t in tensors]
        self._pending.extend(items)
        self._wakeup.set()
        if len(items) == 1:
            return [await items[0].future]
        # Every future is awaited, so a failed batch leaves no "exception never retrieved".
        results = await asyncio.gather(*(item.future for item in items), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    def run_sync(self, batch: Batch) -> Outputs:
        """Run one batch directly (warm-up), bypassing the queue."""
        return self.model.run(batch)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_queue_delay_s > 0 and len(self._pending) < self.max_batch_size:
                await self._hold_for_company()
            if self._plan is None:
                batch = [self._pending.popleft() for _ in range(min(len(self._pending), self.max_batch_size))]
            else:
                batch = self._plan(self._pending, self.max_batch_size)
            started = time.perf_counter()
            try:
                if self._collate is None:
                    x = np.stack([item.tensor for item in batch])
                else:
                    x = self._collate([item.tensor for item in batch])
                out = await loop.run_in_executor(self._executor, self.model.run, x)
                if out.probabilities.shape[0] != len(batch) or out.embedding.shape[0] != len(batch):
                    raise BatchError(
                        f"model returned {out.probabilities.shape[0]} rows for a batch of {len(batch)}"
                    )
            except Exception as exc:  # every waiting request must hear about it, not hang
                error = exc if isinstance(exc, BatchError) else BatchError(f"inference failed: {exc!r}")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            elapsed = time.perf_counter() - started
            for i, item in enumerate(batch):
                if not item.future.done():  # the client may have gone away
                    item.future.set_result((out.probabilities[i], out.embedding[i]))
            if self._on_batch is not None:
                self._on_batch(BatchStats(len(batch), [started - it.enqueued for it in batch], elapsed))

    async def _hold_for_company(self) -> None:
        deadline = self._pending[0].enqueued + self.max_queue_delay_s
        while len(self._pending) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return


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
