"""Ranking an answer's labels (``ServedModel.rank``): the top one by ``argmax`` where one is
asked for, the top k by a stable sort otherwise; the two agree, ties included."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from service.served import ServedModel

LABELS = ("a", "b", "c", "d")


def _rank(probs: np.ndarray, top_k: int):
    n = len(probs)
    return ServedModel.rank(SimpleNamespace(labels=LABELS), probs, np.zeros((n, 2), np.float32),
                            [None] * n, [False] * n, top_k, None)


def test_the_top_label_is_the_first_of_the_top_k_ties_included():
    probs = np.array([[0.25, 0.5, 0.5, 0.25 - 1e-7], [0.1, 0.2, 0.3, 0.4],
                      [0.25, 0.25, 0.25, 0.25]], np.float32)
    one, three = _rank(probs, 1), _rank(probs, 3)
    assert [p.label for p in one] == ["b", "d", "a"]  # the first of equal maxima
    assert [p.top_k[0] for p in three] == [p.top_k[0] for p in one]
    assert [p.top_k for p in three][0] == [("b", 0.5), ("c", 0.5), ("a", 0.25)]
    assert all(p.confidence == p.top_k[0][1] and len(p.top_k) == 1 for p in one)
    rng = np.random.default_rng(0)
    many = rng.dirichlet(np.ones(4), 200).astype(np.float32)
    many[::7] = np.round(many[::7], 1)  # some ties
    assert [p.top_k[0] for p in _rank(many, 1)] == [p.top_k[0] for p in _rank(many, 4)]
