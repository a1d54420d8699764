"""Out-of-distribution flags for served answers, calibrated on the version's reference profile.

Fitted on the training rows, calibrated on the validation rows. The export keeps a sample of the
training split's embeddings in the profile (``train_embeddings``, ``train_labels``); the class
means, the covariance and the neighbour bank come from them, and each threshold is a quantile of
the validation rows, which stand for new in-distribution traffic because the fit never saw them.
Profiles written before (format 2 and earlier) have only validation rows: then the fit is on
them, with cross-fitting and leave-one-out against the bias of measuring rows against themselves
(see ``fit_ood``). Measured on the digits CNN: held-out digits flagged 9.3% when fitted and
calibrated on the 270 validation rows against a nominal 4%, 4.1% against 3.5% fitted on the
training rows (monitoring/README.md, OOD flags).

The signals, each flagged above its threshold:
  * neighbours: the distance of the L2-normalised embedding to its k-th nearest bank embedding
    (Sun et al. 2022, "Out-of-distribution detection with deep nearest neighbors"). A foreign
    domain (newspaper prose sent to an SMS model, letters sent to a digits model) often lands
    near a class mean under one broad shared covariance, yet away from every real example. The
    bank is at most ``KNN_MAX_ROWS`` rows (a seeded sample), stored as float16;
  * distance: the Mahalanobis distance of the embedding to the nearest class mean, with one
    covariance shared by the classes (Lee et al. 2018) shrunk towards a scaled identity
    (Ledoit-Wolf); it catches what is far from everything (noise, photos);
  * input features: the distance of the input's monitored features (``preprocessing``'s image
    or text features, through ``signed_log`` and standardised on the reference; columns
    constant there left out) to its k-th nearest reference input, leave-one-out on the
    validation rows. It sees what the embedding may not: word salad in a Latin-script language
    tokenizes much like SMS slang, but its words are longer and its letters accented; letters
    drawn like digits have other strokes and brightness;
  * fragmentation (text models): tokens per character of the raw text. A tokenizer trained on
    the model's languages cuts real words into few tokens; random strings fall apart;
  * low confidence (off by default, ``confidence_quantile > 0`` turns it on): the weakest
    signal against a foreign domain;
  * joint (format 4): Fisher's combination of the signals above, ``-sum(log p)`` with each p the
    share of validation rows at or above the input on that signal. It catches an input a little
    unusual in several signals and extreme in none: Dutch or Spanish word salad sent to an SMS
    model sits in the top few per cent of both the neighbour and the input-feature distances.

The score of an answer is the largest of its signals divided by their thresholds, so
``score > 1`` is exactly ``flag``. The flag budget (0.5% distance, 1.5% neighbours, 1.5% input
features, 0.5% fragmentation: 3.5% for images, 4% for texts) is split: each signal keeps half
of its share as its own tail and the joint signal gets the other half (``JOINT_SHARE``). The
sum is an upper bound of the in-distribution flag rate since the signals overlap, kept under 5%
because fresh data exceeds a threshold taken on a few hundred rows. The input signals need the
features: a request of preprocessed tensors (v2 ``input``) is scored without them (and its
joint signal by the threshold of the signals it has). Pure numpy: the service calls
``score`` on every batch (its cost is in monitoring/README.md, OOD flags). Scorers stored in
formats 1 to 3 still load and score as they did.
"""

from __future__ import annotations

import base64
import functools
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .reference import Reference

FORMAT_VERSION = 4  # 4: the joint signal; 3: input features, training rows; 2: neighbours
READABLE_FORMATS = (1, 2, 3, 4)
KNN_K = 5
KNN_MAX_ROWS = 4000  # bank rows: 4,000 x 384-d float16 = 3 MB
JOINT_SHARE = 0.5  # of each signal's flag budget, what goes to the joint signal
INPUT_SIGNALS = ("fragmentation", "features")  # what a request without features lacks


@dataclass(frozen=True)
class OODScorer:
    means: np.ndarray  # [C, D] class means in the whitened space
    whitening: np.ndarray  # [D, D]: d^2(x, m) = |x @ W - m|^2
    distance_threshold: float
    confidence_threshold: float
    distance_quantile: float
    confidence_quantile: float
    fragmentation_threshold: float | None = None  # text models: tokens per character
    fragmentation_quantile: float | None = None
    knn_bank: np.ndarray | None = None  # [M, D] float32 unit rows (float16 values); None: off
    knn_k: int = KNN_K
    knn_threshold: float | None = None
    knn_quantile: float | None = None
    # the input-feature signal (format 3): the monitored features kept (those that vary in the
    # reference), their centre and scale after ``signed_log``, the reference rows so scaled
    feature_columns: tuple[str, ...] | None = None
    feature_centre: np.ndarray | None = None  # [F]
    feature_scale: np.ndarray | None = None  # [F]
    feature_bank: np.ndarray | None = None  # [M, F]; None: off
    feature_k: int = KNN_K
    feature_threshold: float | None = None
    feature_quantile: float | None = None
    fitted_on: str = "validation"  # where the means, covariance and neighbours come from
    # the joint signal (format 4): per signal, the calibration rows' values (divided by the
    # signal's threshold, sorted) that p-values are read from; the threshold of Fisher's
    # statistic for each set of signals a batch may have ("distance+knn+features", ...)
    joint_reference: Mapping[str, np.ndarray] | None = None
    joint_thresholds: Mapping[str, float] | None = None
    joint_quantile: float | None = None

    @property
    def dim(self) -> int:
        return int(self.whitening.shape[0])

    @property
    def expected_flag_rate(self) -> float:
        """The share of in-distribution inputs this scorer flags, by its calibration: each
        signal's nominal tail summed (an upper bound: the signals overlap). Exported as
        ``clf_ood_reference_rate`` so an alert can compare the served share with it."""
        rate = (1.0 - self.distance_quantile) + max(self.confidence_quantile, 0.0)
        if self.fragmentation_threshold is not None and self.fragmentation_quantile is not None:
            rate += 1.0 - self.fragmentation_quantile
        if self.knn_bank is not None and self.knn_quantile is not None:
            rate += 1.0 - self.knn_quantile
        if self.feature_bank is not None and self.feature_quantile is not None:
            rate += 1.0 - self.feature_quantile
        if self.joint_thresholds and self.joint_quantile is not None:
            rate += 1.0 - self.joint_quantile
        return rate

    @property
    def reads_features(self) -> bool:
        """Whether ``score`` uses the inputs' monitored features (the service computes them
        for the OOD flag then, even with the prediction log off)."""
        return self.fragmentation_threshold is not None or self.feature_bank is not None

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each embedding [N, D] to its nearest class mean."""
        z = np.asarray(embeddings, dtype=np.float64) @ self.whitening
        # |z - m|^2 = |z|^2 - 2 z.m + |m|^2, one matrix product instead of N*C differences
        d2 = (z * z).sum(1)[:, None] - 2.0 * z @ self.means.T + (self.means**2).sum(1)[None, :]
        return np.sqrt(np.maximum(d2.min(axis=1), 0.0))

    def neighbour_distances(self, embeddings: np.ndarray) -> np.ndarray:
        """Distance of each unit-normalised embedding [N, D] to its k-th nearest bank row."""
        if self.knn_bank is None:
            raise ValueError("this scorer has no neighbour bank (format 1, or fitted without)")
        return kth_neighbour_distance(unit_rows(embeddings), self.knn_bank, self.knn_k)

    def feature_distances(self, features: Sequence[Mapping[str, float]]) -> np.ndarray:
        """Distance of each input's scaled monitored features to its k-th nearest reference
        input (``feature_bank``)."""
        if self.feature_bank is None or self.feature_columns is None:
            raise ValueError("this scorer has no input-feature signal (format 1 or 2, or off)")
        rows = np.array([[f[c] for c in self.feature_columns] for f in features], np.float64)
        z = (signed_log(rows) - self.feature_centre) / self.feature_scale
        return kth_euclidean_distance(z, self.feature_bank, self.feature_k)

    def signals(self, probabilities: np.ndarray, embeddings: np.ndarray,
                features: "Sequence[Mapping[str, float]] | None" = None
                ) -> dict[str, np.ndarray]:
        """Each signal of a batch divided by its threshold (> 1 flags), by name. The input
        signals (fragmentation, features) need ``features``: without them (a v2 request of
        preprocessed tensors) they are left out. ``score_one`` computes the same for one answer:
        a signal added here goes there too (``tests/unit/test_served_ood.py`` compares them)."""
        out = {"distance": self.distances(embeddings) / self.distance_threshold}
        if self.confidence_quantile > 0:
            confidence = np.asarray(probabilities, dtype=np.float64).max(axis=1)
            out["confidence"] = (1.0 - confidence) / max(1.0 - self.confidence_threshold, 1e-6)
        if self.knn_bank is not None and self.knn_threshold is not None:
            out["knn"] = self.neighbour_distances(embeddings) / max(self.knn_threshold, 1e-6)
        if self.fragmentation_threshold is not None and features is not None:
            fragmentation = np.array([fragmentation_of(f) for f in features])
            out["fragmentation"] = fragmentation / self.fragmentation_threshold
        if self.feature_bank is not None and self.feature_threshold is not None and features:
            out["features"] = (self.feature_distances(features)
                               / max(self.feature_threshold, 1e-6))
        if self.joint_reference is not None and self.joint_thresholds:
            joined = {name: v for name, v in out.items() if name in self.joint_reference}
            threshold = self.joint_thresholds.get(joint_key(joined))
            if threshold is not None:
                out["joint"] = fisher_statistic(joined, self.joint_reference) / threshold
        return out

    def score(self, probabilities: np.ndarray, embeddings: np.ndarray,
              features: "Sequence[Mapping[str, float]] | None" = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Scores (> 1 means flagged) and flags for a batch of answers; ``features`` (the inputs'
        monitored features, one mapping per answer) feed the fragmentation signal of text
        models."""
        signals = self.signals(probabilities, embeddings, features).values()
        scores = functools.reduce(np.maximum, signals)  # cheaper than a stack at batch 1
        return scores, scores > 1.0

    def score_one(self, probabilities: np.ndarray, embedding: np.ndarray,
                  features: Mapping[str, float] | None = None) -> tuple[float, bool]:
        """``score`` of one answer (its probabilities [C], its embedding [D], its input's
        features or None), with Python floats where ``score`` makes numpy calls on one-element
        arrays: what a lone request's answer costs after its model call, when the scorer's
        arrays are out of the cache and each numpy call costs several microseconds (the peers'
        CNN scorer: 38 against 47 us, median of 1,000, each after a model call, 2-core AMD
        EPYC). The same matrix products as ``score`` (the neighbour signal's in float32, whose
        ``2 - 2 * similarity`` cancels: another order of its sums moved it by up to 3e-5); the
        rest agrees to rounding (below 1e-11 relative), so a flag can differ only for an answer
        that close to the threshold."""
        z = np.asarray(embedding, dtype=np.float64) @ self.whitening
        d2 = float(z @ z) - 2.0 * (self.means @ z) + self._mean_norms
        out = {"distance": math.sqrt(max(float(d2.min()), 0.0)) / self.distance_threshold}
        if self.confidence_quantile > 0:
            confidence = float(np.max(probabilities))
            out["confidence"] = (1.0 - confidence) / max(1.0 - self.confidence_threshold, 1e-6)
        if self.knn_bank is not None and self.knn_threshold is not None:
            similarity = (unit_rows(np.asarray(embedding)[None]) @ self.knn_bank.T)[0]
            kth = float(np.partition(similarity, len(similarity) - self.knn_k)[-self.knn_k])
            out["knn"] = math.sqrt(max(2.0 - 2.0 * kth, 0.0)) / max(self.knn_threshold, 1e-6)
        if self.fragmentation_threshold is not None and features is not None:
            out["fragmentation"] = fragmentation_of(features) / self.fragmentation_threshold
        if self.feature_bank is not None and self.feature_threshold is not None and features:
            out["features"] = (float(self.feature_distances([features])[0])
                               / max(self.feature_threshold, 1e-6))
        if self.joint_reference is not None and self.joint_thresholds:
            joined = {name: v for name, v in out.items() if name in self.joint_reference}
            threshold = self.joint_thresholds.get(joint_key(joined))
            if threshold is not None:  # scalars in, a numpy float out: the same lookups
                out["joint"] = float(fisher_statistic(joined, self.joint_reference)) / threshold
        score = max(out.values())
        return score, score > 1.0

    @functools.cached_property
    def _mean_norms(self) -> np.ndarray:
        """``|m|^2`` of each whitened class mean (``score_one``)."""
        return (self.means**2).sum(1)

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "kind": "mahalanobis-tied+max-softmax+knn-cosine",
            "means": _encode(self.means),
            "whitening": _encode(self.whitening),
            "distance_threshold": self.distance_threshold,
            "confidence_threshold": self.confidence_threshold,
            "distance_quantile": self.distance_quantile,
            "confidence_quantile": self.confidence_quantile,
            "fragmentation_threshold": self.fragmentation_threshold,
            "fragmentation_quantile": self.fragmentation_quantile,
            "knn_bank": None if self.knn_bank is None else _encode(self.knn_bank, "<f2"),
            "knn_k": self.knn_k,
            "knn_threshold": self.knn_threshold,
            "knn_quantile": self.knn_quantile,
            "feature_columns": None if self.feature_columns is None else list(self.feature_columns),
            "feature_centre": None if self.feature_centre is None else _encode(self.feature_centre),
            "feature_scale": None if self.feature_scale is None else _encode(self.feature_scale),
            "feature_bank": None if self.feature_bank is None else _encode(self.feature_bank),
            "feature_k": self.feature_k,
            "feature_threshold": self.feature_threshold,
            "feature_quantile": self.feature_quantile,
            "fitted_on": self.fitted_on,
            "joint_reference": None if self.joint_reference is None else {
                name: _encode(values, "<f4") for name, values in self.joint_reference.items()},
            "joint_thresholds": None if self.joint_thresholds is None else dict(
                self.joint_thresholds),
            "joint_quantile": self.joint_quantile,
        }
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> "OODScorer":
        """A stored scorer; formats 1 (before the neighbour signal), 2 (before the
        input-feature signal) and 3 (before the joint signal) load without what they lack and
        score as they did."""
        doc = json.loads(text)
        if doc.get("format") not in READABLE_FORMATS:
            raise ValueError(f"OOD scorer format {doc.get('format')!r}; this code reads "
                             f"{READABLE_FORMATS}: refit it with fit_ood()")
        bank = doc.get("knn_bank")
        optional = {key: (None if doc.get(key) is None else _decode(doc[key]))
                    for key in ("feature_centre", "feature_scale", "feature_bank")}
        columns = doc.get("feature_columns")
        return cls(_decode(doc["means"]), _decode(doc["whitening"]),
                   float(doc["distance_threshold"]), float(doc["confidence_threshold"]),
                   float(doc["distance_quantile"]), float(doc["confidence_quantile"]),
                   doc.get("fragmentation_threshold"), doc.get("fragmentation_quantile"),
                   None if bank is None else _decode(bank).astype(np.float32),
                   int(doc.get("knn_k", KNN_K)), doc.get("knn_threshold"),
                   doc.get("knn_quantile"),
                   None if columns is None else tuple(columns), **optional,
                   feature_k=int(doc.get("feature_k", KNN_K)),
                   feature_threshold=doc.get("feature_threshold"),
                   feature_quantile=doc.get("feature_quantile"),
                   fitted_on=doc.get("fitted_on", "validation"),
                   joint_reference=None if doc.get("joint_reference") is None else {
                       name: _decode(values) for name, values in doc["joint_reference"].items()},
                   joint_thresholds=doc.get("joint_thresholds"),
                   joint_quantile=doc.get("joint_quantile"))


def fragmentation_of(features: Mapping[str, float]) -> float:
    """Tokens per character of a text input (0.0 for an empty text)."""
    return float(features["tokens"]) / max(float(features["chars"]), 1.0)


def fit_ood(reference: Reference, distance_quantile: float = 0.995,
            confidence_quantile: float = 0.0, folds: int = 5, seed: int = 0,
            fragmentation_quantile: float = 0.995, knn_quantile: float | None = 0.985,
            knn_k: int = KNN_K, knn_max_rows: int = KNN_MAX_ROWS,
            feature_quantile: float | None = 0.985, feature_k: int = KNN_K,
            use_training_rows: bool = True, joint_share: float = JOINT_SHARE) -> OODScorer:
    """Fit the scorer on a version's reference profile and calibrate its thresholds.

    Where the profile carries training rows (``train_embeddings``, written by the export since
    format 3) and ``use_training_rows``, the class means, covariance and neighbour bank come
    from them and every threshold is a quantile of the validation rows, which the fit never
    saw: they stand for new in-distribution traffic. Otherwise all come from the validation
    rows, with cross-fitting and leave-one-out against the bias of measuring rows against
    themselves. The fragmentation threshold exists only where the profile has the text
    features ``tokens`` and ``chars``; the neighbour signal unless ``knn_quantile`` is None,
    the input-feature signal unless ``feature_quantile`` is None, the confidence signal only
    with ``confidence_quantile > 0``.

    The quantiles give each signal's share of the in-distribution flag budget; ``joint_share``
    of every share goes to the joint signal instead (Fisher's combination of the signals'
    p-values, ``fit_joint``), the rest stays with the signal's own tail, so the budget
    (``expected_flag_rate``) is the same whatever the share. The defaults are what
    ``monitoring/README.md`` (OOD flags) measured; ``joint_share=0`` is format 3, and
    ``use_training_rows=False, distance_quantile=0.99, confidence_quantile=0.005,
    knn_quantile=0.975, feature_quantile=None, joint_share=0`` format 2."""
    emb = np.asarray(reference.embeddings, dtype=np.float64)
    classes = np.where(reference.labels >= 0, reference.labels, reference.predicted)
    if len(emb) < 2 * folds:
        raise ValueError(f"{len(emb)} reference rows are too few to calibrate an OOD scorer")
    if not 0.0 <= joint_share < 1.0:
        raise ValueError(f"joint_share must be in [0, 1), not {joint_share}")
    train = reference.train_embeddings
    use_train = (use_training_rows and train is not None and reference.train_labels is not None
                 and len(train) >= 2 * folds)
    # each signal's value on every validation row, as a new input's would be measured
    values: dict[str, np.ndarray] = {}
    budget: dict[str, float] = {"distance": distance_quantile}
    bank, k = None, knn_k
    if use_train:
        means, whitening = fit_gaussian(np.asarray(train, dtype=np.float64),
                                        np.asarray(reference.train_labels))
        values["distance"] = OODScorer(means, whitening, 1.0, 0.0, 0.0, 0.0).distances(emb)
        if knn_quantile is not None:
            bank, k = neighbour_bank(train, knn_k, knn_max_rows, seed)
            values["knn"] = _chunked(lambda part: kth_neighbour_distance(unit_rows(part), bank, k),
                                     reference.embeddings)
    else:
        values["distance"] = _cross_fitted_distances(emb, classes, folds, seed)
        means, whitening = fit_gaussian(emb, classes)
        if knn_quantile is not None:
            bank, values["knn"], k = fit_neighbours(reference.embeddings, knn_k, knn_max_rows,
                                                    seed)
    if bank is not None:
        budget["knn"] = knn_quantile
    confidence = reference.probabilities.max(axis=1)
    if confidence_quantile > 0:
        values["confidence"], budget["confidence"] = 1.0 - confidence, 1.0 - confidence_quantile
    names = list(reference.feature_names)
    if "tokens" in names and "chars" in names:
        rows = [dict(zip(names, row)) for row in reference.features]
        values["fragmentation"] = np.array([fragmentation_of(r) for r in rows])
        budget["fragmentation"] = fragmentation_quantile
    space = None
    if feature_quantile is not None:
        space = fit_feature_space(names, reference.features, feature_k, knn_max_rows, seed)
    if space is not None:
        values["features"], budget["features"] = space.leave_one_out, feature_quantile
    # each signal keeps (1 - joint_share) of its tail; the joint signal gets the rest
    quantile = {name: 1.0 - (1.0 - q) * (1.0 - joint_share) for name, q in budget.items()}
    threshold = {name: float(np.quantile(values[name], q)) for name, q in quantile.items()}
    joint: dict[str, Any] = {}
    if joint_share > 0 and len(values) > 1:
        tail = joint_share * sum(1.0 - q for q in budget.values())
        ratios = {name: v / max(threshold[name], 1e-6) for name, v in values.items()}
        joint = fit_joint(ratios, 1.0 - tail, knn_max_rows, seed)
    q = quantile.get
    return OODScorer(means, whitening,
                     distance_threshold=threshold["distance"],
                     confidence_threshold=(1.0 - threshold["confidence"] if "confidence"
                                           in threshold else float(confidence.min())),
                     distance_quantile=q("distance"),
                     confidence_quantile=1.0 - q("confidence", 1.0),
                     fragmentation_threshold=threshold.get("fragmentation"),
                     fragmentation_quantile=q("fragmentation"),
                     knn_bank=bank, knn_k=k, knn_threshold=threshold.get("knn"),
                     knn_quantile=q("knn"),
                     **({} if space is None else {
                         "feature_columns": space.columns, "feature_centre": space.centre,
                         "feature_scale": space.scale, "feature_bank": space.bank,
                         "feature_k": space.k, "feature_threshold": threshold["features"],
                         "feature_quantile": q("features")}),
                     fitted_on="training split" if use_train else "validation", **joint)


def fit_joint(ratios: Mapping[str, np.ndarray], quantile: float, max_rows: int, seed: int
              ) -> dict[str, Any]:
    """The joint signal: Fisher's combination of the signals' p-values, each p-value read from
    the calibration rows' values of that signal (``ratios``: validation rows, each signal
    divided by its threshold). An input that is a little unusual in several signals (Dutch
    word salad sent to an SMS model: neighbours and input features both in their top few per
    cent) is flagged where no single signal's tail would catch it. Thresholded at ``quantile``
    of the validation rows' own statistics, each row's p-values taken against the others
    (exchangeable, as a conformal p-value is), for the full set of signals and for the set a
    request without input features has. The p-value tables are at most ``max_rows`` rows."""
    keep = _sample(len(next(iter(ratios.values()))), max_rows, seed)
    reference = {name: np.sort(_f32(v[keep])) for name, v in ratios.items()}
    full = list(ratios)
    without_inputs = [n for n in full if n not in INPUT_SIGNALS]
    subsets = [full] if len(without_inputs) == len(full) else [full, without_inputs]
    thresholds = {}
    for names in subsets:
        if len(names) < 2:
            continue
        own = {n: _f32(ratios[n][keep]) for n in names}  # as rounded in the table
        statistic = fisher_statistic(own, reference, leave_one_out=True)
        thresholds[joint_key(names)] = float(np.quantile(statistic, quantile))
    return {"joint_reference": reference, "joint_thresholds": thresholds,
            "joint_quantile": quantile}


def _f32(values: np.ndarray) -> np.ndarray:
    """Values rounded to float32, as they are stored, held as float64 (what the signals are)."""
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def joint_key(names: Sequence[str] | Mapping[str, Any]) -> str:
    """The joint threshold's key for a set of signals (order does not matter)."""
    return "+".join(sorted(names))


def fisher_statistic(signals: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                     leave_one_out: bool = False) -> np.ndarray:
    """``-sum(log p)`` over the signals that have a reference, where p is the share of the
    reference values at or above the input's, counted as one more reference row: ``(1 + #)
    / (n + 1)``, never 0. ``leave_one_out``: the inputs are the reference rows themselves, each
    counted once among the values at or above it, so ``# / (n + 1)``."""
    total = None
    for name, value in signals.items():
        ref = reference.get(name)
        if ref is None:
            continue
        term = _neg_log_p(len(ref), leave_one_out)[np.searchsorted(ref, value, side="left")]
        total = term if total is None else total + term
    return np.zeros(0) if total is None else total


@functools.lru_cache(maxsize=16)
def _neg_log_p(n: int, leave_one_out: bool) -> np.ndarray:
    """``-log p`` by the input's position among ``n`` sorted reference values (0: at or below
    all of them, so ``n`` are at or above it): one lookup per signal on the hot path."""
    at_or_above = n - np.arange(n + 1) + (0 if leave_one_out else 1)
    table = -np.log(np.maximum(at_or_above, 1) / (n + 1))
    table.flags.writeable = False  # shared by every caller (cached)
    return table


@dataclass(frozen=True)
class FeatureSpace:
    """The input-feature signal's fit (``fit_feature_space``)."""

    columns: tuple[str, ...]
    centre: np.ndarray
    scale: np.ndarray
    bank: np.ndarray
    k: int
    leave_one_out: np.ndarray  # each reference row's k-th neighbour among the others


def signed_log(x: np.ndarray) -> np.ndarray:
    """``sign(x) log(1 + |x|)``: counts that span orders of magnitude (characters, tokens,
    pixels) come to a scale like the rates' in [0, 1], which it barely bends."""
    return np.sign(x) * np.log1p(np.abs(x))


def fit_feature_space(names: Sequence[str], features: np.ndarray, k: int, max_rows: int,
                      seed: int) -> FeatureSpace | None:
    """The reference inputs' monitored features, through ``signed_log`` and standardised, as a
    neighbour bank. Columns constant in the reference (a digits set's width and height) are left
    out: they have no scale to measure a difference by, and the preprocessing resizes anyway.
    None when no column varies or there are too few rows."""
    x = signed_log(np.asarray(features, dtype=np.float64))
    if x.ndim != 2 or len(x) < k + 2:
        return None
    scale = x.std(axis=0)
    keep = scale > 1e-9 * np.maximum(1.0, np.abs(x.mean(axis=0)))
    if not keep.any():
        return None
    centre = x[:, keep].mean(axis=0)
    z = (x[:, keep] - centre) / scale[keep]
    chosen = _sample(len(z), max_rows, seed)
    bank = z[chosen]
    k = max(1, min(k, len(bank) - 1))
    position = np.full(len(z), -1)
    position[chosen] = np.arange(len(chosen))
    leave_one_out = _chunked(lambda part, pos: kth_euclidean_distance(part, bank, k, pos),
                             z, position)
    return FeatureSpace(tuple(n for n, kept in zip(names, keep) if kept), centre, scale[keep],
                        bank, k, leave_one_out)


def kth_euclidean_distance(x: np.ndarray, bank: np.ndarray, k: int,
                           exclude: np.ndarray | None = None) -> np.ndarray:
    """Euclidean distance of rows [N, F] to their k-th nearest bank row [M, F]; ``exclude`` as
    in ``kth_neighbour_distance``."""
    d2 = ((x * x).sum(axis=1)[:, None] - 2.0 * x @ bank.T + (bank * bank).sum(axis=1)[None, :])
    if exclude is not None:
        rows = np.flatnonzero(exclude >= 0)
        d2[rows, exclude[rows]] = np.inf
    kth = np.partition(d2, k - 1, axis=1)[:, k - 1]
    return np.sqrt(np.maximum(kth, 0.0))


def _sample(n: int, max_rows: int, seed: int) -> np.ndarray:
    """All row indices, or a seeded sorted sample of ``max_rows`` of them."""
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))


def _chunked(fn: Any, x: np.ndarray, *aligned: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """``fn`` over row chunks of ``x`` (and of arrays aligned with it): bounded memory for the
    [chunk, bank] distance matrices of large reference sets."""
    return np.concatenate([fn(x[i:i + chunk], *(a[i:i + chunk] for a in aligned))
                           for i in range(0, len(x), chunk)]) if len(x) else np.empty(0)


def fit_gaussian(emb: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the whitening matrix of the shared, shrunk covariance (whitened means)."""
    labels = np.unique(classes)
    means = np.stack([emb[classes == c].mean(axis=0) for c in labels])
    residuals = emb - means[np.searchsorted(labels, classes)]
    eigval, eigvec = np.linalg.eigh(ledoit_wolf(residuals))
    whitening = eigvec / np.sqrt(np.maximum(eigval, 1e-12))
    return means @ whitening, whitening


def ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrunk covariance of centred rows ``x`` [N, D] (as scikit-learn computes it)."""
    n, p = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / p
    x2 = x**2
    beta_ = (x2.T @ x2).sum() / n
    delta_ = (s**2).sum()
    beta = (beta_ - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * np.trace(s) + p * mu**2) / p
    shrinkage = 0.0 if delta == 0 else min(beta, delta) / delta
    return (1.0 - shrinkage) * s + shrinkage * mu * np.eye(p)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # a third of linalg.norm's time
    return x / np.maximum(norms, 1e-12)


def kth_neighbour_distance(units: np.ndarray, bank: np.ndarray, k: int,
                           exclude: np.ndarray | None = None) -> np.ndarray:
    """Euclidean distance of unit rows [N, D] to their k-th nearest unit bank row [M, D];
    ``exclude[i]`` (a bank index, or -1) leaves row i's own copy out (leave-one-out)."""
    similarity = units @ bank.T  # |a - b|^2 = 2 - 2 a.b for unit rows
    if exclude is not None:
        rows = np.flatnonzero(exclude >= 0)
        similarity[rows, exclude[rows]] = -np.inf
    m = similarity.shape[1]
    kth = np.partition(similarity, m - k, axis=1)[:, m - k]  # the k-th largest similarity
    return np.sqrt(np.maximum(2.0 - 2.0 * kth.astype(np.float64), 0.0))


def neighbour_bank(embeddings: np.ndarray, k: int, max_rows: int, seed: int
                   ) -> tuple[np.ndarray, int]:
    """At most ``max_rows`` unit rows (seeded sample; rounded to float16 so that a scorer read
    back from JSON scores exactly as this one) and k, lowered where the bank has under k + 1
    rows."""
    bank = unit_rows(embeddings)[_sample(len(embeddings), max_rows, seed)]
    bank = bank.astype(np.float16).astype(np.float32)
    return bank, max(1, min(k, len(bank) - 1))


def fit_neighbours(embeddings: np.ndarray, k: int, max_rows: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """The neighbour bank of the reference rows themselves (``neighbour_bank``), every
    reference row's leave-one-out k-th neighbour distance, and k."""
    bank, k = neighbour_bank(embeddings, k, max_rows, seed)
    chosen = _sample(len(embeddings), max_rows, seed)
    position = np.full(len(embeddings), -1)
    position[chosen] = np.arange(len(chosen))
    out = _chunked(lambda part, pos: kth_neighbour_distance(unit_rows(part), bank, k, pos),
                   np.asarray(embeddings), position)
    return bank, out, k


def _cross_fitted_distances(emb: np.ndarray, classes: np.ndarray, folds: int, seed: int
                            ) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(len(emb))
    out = np.empty(len(emb))
    for held in np.array_split(order, folds):
        train = np.setdiff1d(order, held)
        means, whitening = fit_gaussian(emb[train], classes[train])
        scorer = OODScorer(means, whitening, 1.0, 0.0, 0.0, 0.0)
        out[held] = scorer.distances(emb[held])
    return out


def _encode(array: np.ndarray, dtype: str = "<f8") -> dict[str, Any]:
    data = np.ascontiguousarray(array, dtype=dtype).tobytes()
    key = {"<f8": "f8", "<f4": "f4", "<f2": "f2"}[dtype]
    return {"shape": list(array.shape), key: base64.b64encode(data).decode("ascii")}


def _decode(doc: dict[str, Any]) -> np.ndarray:
    key = next(k for k in ("f8", "f4", "f2") if k in doc)
    dtype = "<" + key
    raw = base64.b64decode(doc[key])
    return np.frombuffer(raw, dtype=dtype).reshape(doc["shape"]).astype(np.float64)
