"""Step 6: champion and challenger on the same held-out inputs.

Both models are run by ONNX Runtime from their exported ``model.onnx``, each fed by the shared
``preprocessing`` package with its own ``spec.json`` (and ``tokenizer.json``): what the service
would answer, not what PyTorch would. Accuracy is reported overall and per slice, where a row's
slices are
  * ``source=original|traffic|new``: where the row came from;
  * ``tag.<key>=<value>``: the request tags logged with a traffic row (``device=ios``...);
  * the derived slices of ``monitoring.slices.derived_slices`` (image ``size``/``brightness``,
    text ``length``), from features computed by ``preprocessing.image_features``/``text_features``.

Both are also run on the robustness suite of the same held-out inputs (``training.robustness``:
what ``image_suite``/``text_suite`` make of them, seeded with ``SUITE_SEED`` as the export's
suites are, so both models see the very same varied inputs; built ``SUITE_CHUNK`` inputs at a
time, so a large held-out set never sits in memory in every variation at once): accuracy per
variation. And the attack success rates over the same inputs: the champion's from its
metrics.json (its export attacked a seeded sample of its test split), the challenger's by the same
attack on the same sample of the same inputs, which are the held-out part's original rows in
their order (``data.original_parts`` splits the original data as the champion's training run did;
``champion_inputs_attack``). Its own metrics.json figure is over its whole held-out part,
traffic included: after a drift, harder inputs, which make any challenger look easier to attack
(a challenger of the demo: 0.52 over its held-out part, 0.39 over the champion's test digits,
where the champion's is 0.39). Where the inputs cannot be matched (no original rows, a champion
figure over another number of inputs, no PyTorch model for an image challenger), both
metrics.json figures, and the table says so.

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
from PIL import Image

from modelstore.layout import LABELS_FILE, METRICS_FILE, MODEL_FILE, SPEC_FILE
from monitoring.slices import derived_slices
from preprocessing import (InputError, TextPreprocessor, decode_image, image_features,
                           image_to_array, load_spec, text_features)

from ..export import ort_session
from ..robustness import (CLEAN, SUITE_SEED, TEXT_VARIATIONS, decode_raw, encode_variation,
                          image_variation_names, item_rng)
from .champion import Champion
from .data import Input, Pool, RetrainData

if TYPE_CHECKING:
    from torch import nn

    from .fit import Challenger

BATCH = 64
SUITE_CHUNK = 256  # held-out inputs varied at a time


@dataclass(frozen=True)
class Evaluation:
    """Both models on the held-out part: ``table`` is ``compare``'s comparison table,
    ``{"overall": {count, champion, challenger, delta}, "slices": {name: {...}}}``, plus
    ``"robustness": {seed, count, variations: {name: {champion, challenger, delta}}}`` and
    ``"attack": {champion, challenger, delta}`` (attack success rates; None where unknown)."""

    table: Mapping[str, Any]

    @property
    def overall(self) -> Mapping[str, Any]:
        return self.table["overall"]


def evaluate(champion: Champion, challenger: "Challenger", data: RetrainData,
             seed: int = SUITE_SEED, model: "nn.Module | None" = None) -> Evaluation:
    """Both models on the held-out part (``data.test``), overall and per slice, on its
    robustness suite (seeded with ``seed``), and their attack success rates (``model``: the
    challenger's PyTorch model, which an image attack needs)."""
    held_out = data.test
    slices = row_slices(champion, held_out)
    truth = [champion.labels[i] for i in held_out.labels]
    exported = [ExportedModel(folder) for folder in (champion.path, challenger.path)]
    tables = [accuracy_table(m.predict(held_out.inputs), truth, slices) for m in exported]
    table = compare(*tables)
    table["robustness"] = robustness_table(champion, exported, held_out, seed)
    table["attack"] = attack_table(champion.path, challenger.path, champion_inputs_attack(
        champion, exported[1], held_out, model))
    return Evaluation(table)


def variation_names(champion: Champion) -> tuple[str, ...]:
    """The variations a model of the champion's kind is judged on: for images those valid for
    its colour mode and recipe (``image_variation_names``: ``invert`` where its ``train_config``
    says inverted inputs are valid, by default for grayscale), for texts all of
    ``TEXT_VARIATIONS``."""
    if champion.kind == "image":
        invert = (champion.manifest.get("train_config") or {}).get("invert")
        return image_variation_names(champion.spec.color_mode, invert)
    return tuple(TEXT_VARIATIONS)


def max_side(champion: Champion) -> int:
    """The longest side a varied image starts from, as the export's suite has it (4x the
    model's input side): larger held-out photos are first shrunk to it."""
    return 4 * max(champion.spec.height, champion.spec.width)


def robustness_suite(champion: Champion, inputs: Sequence[Input], seed: int = SUITE_SEED,
                     start: int = 0) -> dict[str, list[Input]]:
    """``{"clean": inputs, variation: [varied inputs]}``, as ``image_suite(all_inputs, seed,
    names, spec=champion.spec, max_side=max_side(champion))`` (``text_suite`` for texts) makes
    it for ``inputs``, the items ``start, start + 1, ...`` of all the inputs: each item's
    variation draws from the same ``item_rng(seed, name, index)``, so the suite of a set is the
    same in one piece or in chunks (a test holds the two to each other)."""
    suite: dict[str, list[Input]] = {CLEAN: list(inputs)}
    if champion.kind == "image":
        names, side = variation_names(champion), max_side(champion)
        for name in names:
            suite[name] = []
        for i, x in enumerate(inputs):
            img = decode_raw(bytes(x), champion.spec)
            if max(img.size) > side:
                img = img.copy()
                img.thumbnail((side, side), Image.Resampling.LANCZOS)
            for name in names:
                suite[name].append(encode_variation(name, img, item_rng(seed, name, start + i)))
    else:
        for name in variation_names(champion):
            suite[name] = [TEXT_VARIATIONS[name](str(x), item_rng(seed, name, start + i))
                           for i, x in enumerate(inputs)]
    return suite


def robustness_table(champion: Champion, models: Sequence["ExportedModel"], pool: Pool,
                     seed: int = SUITE_SEED) -> dict[str, Any]:
    """``{"seed", "count", "variations": {name: {champion, challenger, delta}}}``: the accuracy
    of the two exported models (``models``: champion's, challenger's) on every variation of
    ``pool``'s suite, ``clean`` first. A varied input the shared preprocessing refuses counts as
    a miss for both."""
    if not len(pool):
        return {"seed": seed, "count": 0, "variations": {}}
    hits: dict[str, list[int]] = {}
    for start in range(0, len(pool), SUITE_CHUNK):
        truth = pool.labels[start:start + SUITE_CHUNK]
        suite = robustness_suite(champion, pool.inputs[start:start + SUITE_CHUNK], seed, start)
        for name, varied in suite.items():
            counts = hits.setdefault(name, [0] * len(models))
            for k, model in enumerate(models):
                predicted = model.predict_indices(varied, champion.labels)
                counts[k] += sum(int(p == y) for p, y in zip(predicted, truth, strict=True))
    n = len(pool)
    return {"seed": seed, "count": n,
            "variations": {name: {"champion": round(a / n, 6), "challenger": round(b / n, 6),
                                  "delta": round(b / n - a / n, 6)}
                           for name, (a, b) in hits.items()}}


def attack_table(champion_folder: Path, challenger_folder: Path,
                 on_champion_inputs: tuple[float | None, int] | None = None) -> dict[str, Any]:
    """The attack success rates (at the export's reference strength) and how many correctly
    classified inputs each is over (``attacked``): the champion's from its metrics.json
    (``attack_success``, ``adversarial_info.attacked``), the challenger's ``on_champion_inputs``
    where given (``champion_inputs_attack``), else from its own metrics.json; None where there
    is no figure. ``source`` says which."""
    champion = _attack_figures(champion_folder)
    challenger = on_champion_inputs or _attack_figures(challenger_folder)
    rates = [champion[0], challenger[0]]
    delta = None if None in rates else round(rates[1] - rates[0], 6)
    source = (f"{METRICS_FILE} attack_success; the challenger attacked the same way on the "
              "same inputs (the champion's test split)" if on_champion_inputs else
              f"{METRICS_FILE} attack_success of each (over different inputs where their "
              "test sets differ)")
    return {"champion": rates[0], "challenger": rates[1], "delta": delta,
            "attacked": {"champion": champion[1], "challenger": challenger[1]},
            "source": source}


def champion_inputs_attack(champion: Champion, exported: "ExportedModel", held_out: Pool,
                           model: "nn.Module | None" = None) -> tuple[float | None, int] | None:
    """The challenger (``model``, its PyTorch model, for images; its exported model,
    ``exported``, for texts) attacked as the champion's export attacked the champion, on
    the same inputs: the held-out part's original rows, which lead it in the order of the
    champion's test split. None where they cannot be matched: no original rows, rows not
    leading, a champion figure over another number of test inputs
    (``adversarial_info.test_inputs``) or none at all, or an image challenger without ``model``."""
    from ..robust_metrics import image_attack_success, text_attack_success

    count = held_out.sources.count("original")
    try:
        info = json.loads((champion.path / METRICS_FILE).read_text()).get("adversarial_info")
        test_inputs = (info or {}).get("test_inputs")
    except (OSError, ValueError, AttributeError):
        return None
    if (not count or test_inputs != count
            or any(s != "original" for s in held_out.sources[:count])
            or (champion.kind == "image" and model is None)):
        return None
    inputs, labels = list(held_out.inputs[:count]), [int(y) for y in held_out.labels[:count]]
    if champion.kind == "image":
        return image_attack_success(model, champion.spec, inputs, labels)
    return text_attack_success(exported.session, exported.pre, inputs, labels)


def _attack_figures(folder: Path) -> tuple[float | None, int | None]:
    try:
        metrics = json.loads((folder / METRICS_FILE).read_text())
        rate, info = metrics.get("attack_success"), metrics.get("adversarial_info") or {}
        attacked = info.get("attacked")
    except (OSError, ValueError, AttributeError):
        return None, None
    return _number(rate), (None if _number(attacked) is None else int(attacked))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


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
    return ExportedModel(folder).predict(inputs)


class ExportedModel:
    """An exported model (a store version folder) loaded once: ONNX Runtime behind the shared
    preprocessing with its own spec."""

    def __init__(self, folder: Path) -> None:
        self.spec = load_spec((folder / SPEC_FILE).read_text())
        self.labels = json.loads((folder / LABELS_FILE).read_text())
        self.session = ort_session(folder / MODEL_FILE)
        self.pre = (TextPreprocessor.from_folder(folder, self.spec) if self.spec.kind == "text"
                    else None)

    def predict(self, inputs: Sequence[Input]) -> list[str]:
        """The label it gives each input (InputError for one the preprocessing refuses)."""
        predicted: list[np.ndarray] = []
        for chunk in _chunks(inputs):
            if self.pre is None:
                feed = {"input": np.stack([image_to_array(decode_image(x, self.spec), self.spec)
                                           for x in chunk])}
            else:
                batch = self.pre.encode_batch(chunk)
                feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            predicted.append(self.session.run(["logits"], feed)[0].argmax(axis=1))
        return [self.labels[i] for i in np.concatenate(predicted)] if predicted else []

    def predict_indices(self, inputs: Sequence[Input], labels: Sequence[str]) -> list[int]:
        """``predict`` as indices into ``labels``; -1 for an input the preprocessing refuses (a
        variation may make one, e.g. an image enlarged past the decoder's pixel limit) or a
        label ``labels`` lacks."""
        index = {label: i for i, label in enumerate(labels)}
        try:
            return [index.get(p, -1) for p in self.predict(inputs)]
        except InputError:
            out = []
            for x in inputs:
                try:
                    out.append(index.get(self.predict([x])[0], -1))
                except InputError:
                    out.append(-1)
            return out


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
