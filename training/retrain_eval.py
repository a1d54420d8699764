"""Champion and challenger on the same held-out inputs, and the rule that promotes one of them.

Both models are run by ONNX Runtime from their exported ``model.onnx``, each fed by the shared
``preprocessing`` package with its own ``spec.json`` (and ``tokenizer.json``): what the service
would answer, not what PyTorch would. Accuracy is reported overall and per slice, where a row's
slices are
  * ``source=original|traffic|new``: where the row came from;
  * ``tag.<key>=<value>``: the request tags logged with a traffic row (``device=ios``...);
  * the derived slices of ``monitoring.slices.derived_slices`` (image ``size``/``brightness``,
    text ``length``), from features computed by ``preprocessing.image_features``/``text_features``.

``decide`` is a pure function of the comparison table, testable with hand-made numbers.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from monitoring.slices import derived_slices
from preprocessing import (TextPreprocessor, decode_image, image_features, image_to_array,
                           load_spec, text_features)

from .export import ort_session
from .retrain_data import Champion, Input, Pool

BATCH = 64
# Accuracies are ratios of counts: compare with a little slack so 0.1 + 0.2 >= 0.3 holds.
_EPS = 1e-9


@dataclass(frozen=True)
class Rules:
    """Promote iff overall accuracy >= champion's + ``margin`` and no slice with at least
    ``min_slice_count`` held-out inputs loses more than ``max_slice_drop`` accuracy."""

    margin: float = 0.0
    max_slice_drop: float = 0.05
    min_slice_count: int = 30


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: tuple[str, ...]


def row_slices(champion: Champion, pool: Pool) -> list[dict[str, str]]:
    """Every held-out row's slices (see the module docstring); features with the champion's
    spec, which the challenger shares."""
    features = input_features(champion, pool.inputs)
    return [{"source": source, **{f"tag.{k}": v for k, v in tags.items()}, **derived_slices(f)}
            for source, tags, f in zip(pool.sources, pool.tags, features)]


def input_features(champion: Champion, inputs: Sequence[Input]) -> list[dict[str, float]]:
    if champion.kind == "image":
        return [image_features(decode_image(x, champion.spec)) for x in inputs]
    pre = champion.text_preprocessor()
    out: list[dict[str, float]] = []
    for chunk in _chunks(inputs):
        batch = pre.encode_batch(chunk)
        out += [text_features(text, stats) for text, stats in zip(chunk, batch.stats)]
    return out


def predict(folder: Path, inputs: Sequence[Input]) -> list[str]:
    """The label an exported model (a store version folder) gives each input."""
    spec = load_spec((folder / "spec.json").read_text())
    labels = json.loads((folder / "labels.json").read_text())
    session = ort_session(folder / "model.onnx")
    pre = TextPreprocessor.from_folder(folder, spec) if spec.kind == "text" else None
    predicted: list[np.ndarray] = []
    for chunk in _chunks(inputs):
        if pre is None:
            feed = {"input": np.stack([image_to_array(decode_image(x, spec), spec)
                                       for x in chunk])}
        else:
            batch = pre.encode_batch(chunk)
            feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        predicted.append(session.run(["logits"], feed)[0].argmax(axis=1))
    return [labels[i] for i in np.concatenate(predicted)] if predicted else []


def _chunks(items: Sequence[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(items), BATCH):
        yield list(items[start:start + BATCH])


def accuracy_table(predicted: Sequence[str], truth: Sequence[str],
                   slices: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """``{"count", "accuracy", "slices": {"key=value": {"count", "accuracy"}}}``."""
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for p, t, row in zip(predicted, truth, slices, strict=True):
        for key, value in row.items():
            cell = hits[f"{key}={value}"]
            cell[0] += p == t
            cell[1] += 1
    correct = sum(p == t for p, t in zip(predicted, truth))
    return {"count": len(truth), "accuracy": correct / len(truth) if truth else 0.0,
            "slices": {name: {"count": n, "accuracy": k / n}
                       for name, (k, n) in sorted(hits.items())}}


def compare(champion: Mapping[str, Any], challenger: Mapping[str, Any]) -> dict[str, Any]:
    """Two accuracy tables over the same rows -> one table of both figures and the change."""
    def row(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
        return {"count": a["count"], "champion": round(a["accuracy"], 6),
                "challenger": round(b["accuracy"], 6),
                "delta": round(b["accuracy"] - a["accuracy"], 6)}

    return {"overall": row(champion, challenger),
            "slices": {name: row(cell, challenger["slices"][name])
                       for name, cell in champion["slices"].items()}}


def decide(table: Mapping[str, Any], rules: Rules) -> Decision:
    """Promote iff both rules pass; one reason per rule, with the figures that decided it."""
    overall = table["overall"]
    needed = overall["champion"] + rules.margin
    # With a margin >= 0 a win is strictly better, by at least the margin: a tie never replaces
    # the champion. A negative margin says how much worse the challenger may be (e.g. to
    # promote a smaller, faster model); then the bound alone decides.
    strict = rules.margin >= 0
    wins = overall["challenger"] >= needed - _EPS and (overall["delta"] > _EPS or not strict)
    needs = (f"> {overall['champion']:.4f} and >= {needed:.4f}" if strict
             else f">= {needed:.4f}")
    reasons = [f"{'pass' if wins else 'fail'}: overall accuracy {overall['challenger']:.4f} vs "
               f"champion {overall['champion']:.4f} ({overall['delta']:+.4f}) on "
               f"{overall['count']} held-out inputs; a win needs {needs}"]
    judged = {name: cell for name, cell in table["slices"].items()
              if cell["count"] >= rules.min_slice_count}
    dropped = {name: cell for name, cell in judged.items()
               if cell["delta"] < -rules.max_slice_drop - _EPS}
    for name, cell in sorted(dropped.items(), key=lambda item: item[1]["delta"]):
        reasons.append(f"fail: slice {name} (n={cell['count']}) accuracy {cell['challenger']:.4f}"
                       f" vs champion {cell['champion']:.4f} ({cell['delta']:+.4f}) drops more "
                       f"than {rules.max_slice_drop:.4f}")
    if not dropped:
        worst = min(judged.items(), key=lambda item: item[1]["delta"], default=None)
        reasons.append(
            f"pass: no slice with >= {rules.min_slice_count} held-out inputs drops more than "
            f"{rules.max_slice_drop:.4f} ({len(judged)} judged"
            + (f"; the worst: {worst[0]} {worst[1]['delta']:+.4f}" if worst else "")
            + f"; {len(table['slices']) - len(judged)} below the support bound not judged)")
    return Decision(promote=wins and not dropped, reasons=tuple(reasons))
