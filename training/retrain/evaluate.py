"""Step 6: champion and challenger on the same held-out inputs.

Both models are run by ONNX Runtime from their exported ``model.onnx``, each fed by the shared
``preprocessing`` package with its own ``spec.json`` (and ``tokenizer.json``): what the service
would answer, not what PyTorch would. Accuracy is reported overall and per slice, where a row's
slices are
  * ``source=original|traffic|new``: where the row came from;
  * ``tag.<key>=<value>``: the request tags logged with a traffic row (``device=ios``...);
  * the derived slices of ``monitoring.slices.derived_slices`` (image ``size``/``brightness``,
    text ``length``), from features computed by ``preprocessing.image_features``/``text_features``.

``evaluate`` returns an ``Evaluation``, whose comparison table the promotion rule
(``gate.decide``) reads.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from modelstore.layout import LABELS_FILE, MODEL_FILE, SPEC_FILE
from monitoring.slices import derived_slices
from preprocessing import (TextPreprocessor, decode_image, image_features, image_to_array,
                           load_spec, text_features)

from ..export import ort_session
from .champion import Champion
from .data import Input, Pool, RetrainData

if TYPE_CHECKING:
    from .fit import Challenger

BATCH = 64


@dataclass(frozen=True)
class Evaluation:
    """Both models on the held-out part: ``table`` is ``compare``'s comparison table,
    ``{"overall": {count, champion, challenger, delta}, "slices": {name: {...}}}``."""

    table: Mapping[str, Any]

    @property
    def overall(self) -> Mapping[str, Any]:
        return self.table["overall"]


def evaluate(champion: Champion, challenger: "Challenger", data: RetrainData) -> Evaluation:
    """Both models on the held-out part (``data.test``), overall and per slice."""
    held_out = data.test
    slices = row_slices(champion, held_out)
    truth = [champion.labels[i] for i in held_out.labels]
    tables = [accuracy_table(predict(folder, held_out.inputs), truth, slices)
              for folder in (champion.path, challenger.path)]
    return Evaluation(compare(*tables))


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
    spec = load_spec((folder / SPEC_FILE).read_text())
    labels = json.loads((folder / LABELS_FILE).read_text())
    session = ort_session(folder / MODEL_FILE)
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
