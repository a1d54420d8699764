"""Length-aware batching for a text model: the ``plan`` and ``collate`` hooks of ``Batcher``.

A text model's call costs about (texts x longest length) token slots, padding included: one long
text in a call of short ones makes every short one pay for its length. So the planner takes the
queue's oldest ``max_batch_size`` texts, sorts them by token length and cuts the sorted run into
groups where (a) the call's padded size ``N x L`` stays within ``max_batch_tokens`` and (b) at
most ``max_padding`` of its token slots are padding. The group holding the oldest text goes into
the next call (so no text starves behind a stream of shorter ones); the others go back to the
front of the queue in their arrival order and are planned again when the model is free, together
with whatever arrived meanwhile. Each call is padded to its own longest text.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Sequence

import numpy as np

from preprocessing import pad_ids

if TYPE_CHECKING:
    from .batching import _Item

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
