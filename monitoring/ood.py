"""Out-of-distribution flags for served answers, calibrated on the validation reference profile.

Two signals, each thresholded on the validation set so their false-flag rate on in-distribution
inputs is known:
  * low confidence: the top-1 probability below its ``confidence_quantile`` on validation;
  * distance: the Mahalanobis distance of the embedding to the nearest class mean, with one
    covariance shared by the classes (Lee et al. 2018, "A simple unified framework for detecting
    out-of-distribution samples") shrunk towards a scaled identity (Ledoit-Wolf) because a
    validation set has few rows per embedding dimension; flagged above its
    ``distance_quantile`` on validation.

Why cross-fitting: distances of the rows the means and covariance were fitted on are biased
low (with 128 dimensions and a few hundred rows, badly), so a threshold taken on them flags far
more than the nominal share of new in-distribution inputs. The threshold is taken on
out-of-fold distances instead (fit on k-1 folds, measure the k-th), then the final means and
covariance are fitted on all rows.

Text models add a third signal on the input itself: fragmentation, the tokens per character of
the raw text (from ``preprocessing.text_features``), flagged above its ``fragmentation_quantile``
on validation. A tokenizer trained on the model's languages cuts real words into few tokens;
random strings and unseen scripts fall apart into one token per character or two, while the
model's embedding of such noise can still land near a class, so confidence and distance alone
miss many random strings that fragmentation catches (see monitoring/README.md, OOD flags).

The score of an answer is the largest of its signals divided by their thresholds, so
``score > 1`` is exactly ``flag``. Pure numpy: the service calls ``score`` on every batch,
which costs a small fraction of a model call (see monitoring/README.md, Measured).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .reference import Reference

FORMAT_VERSION = 1


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

    @property
    def dim(self) -> int:
        return int(self.whitening.shape[0])

    @property
    def expected_flag_rate(self) -> float:
        """The share of in-distribution inputs this scorer flags, by its calibration: each
        signal's nominal tail summed (an upper bound: the signals overlap). Exported as
        ``clf_ood_reference_rate`` so an alert can compare the served share with it."""
        rate = (1.0 - self.distance_quantile) + self.confidence_quantile
        if self.fragmentation_threshold is not None and self.fragmentation_quantile is not None:
            rate += 1.0 - self.fragmentation_quantile
        return rate

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each embedding [N, D] to its nearest class mean."""
        z = np.asarray(embeddings, dtype=np.float64) @ self.whitening
        # |z - m|^2 = |z|^2 - 2 z.m + |m|^2, one matrix product instead of N*C differences
        d2 = (z * z).sum(1)[:, None] - 2.0 * z @ self.means.T + (self.means**2).sum(1)[None, :]
        return np.sqrt(np.maximum(d2.min(axis=1), 0.0))

    def score(self, probabilities: np.ndarray, embeddings: np.ndarray,
              features: "Sequence[Mapping[str, float]] | None" = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Scores (> 1 means flagged) and flags for a batch of answers; ``features`` (the inputs'
        monitored features, one mapping per answer) feed the fragmentation signal of text
        models."""
        confidence = np.asarray(probabilities, dtype=np.float64).max(axis=1)
        by_distance = self.distances(embeddings) / self.distance_threshold
        by_confidence = (1.0 - confidence) / max(1.0 - self.confidence_threshold, 1e-6)
        scores = np.maximum(by_distance, by_confidence)
        if self.fragmentation_threshold is not None and features is not None:
            fragmentation = np.array([fragmentation_of(f) for f in features])
            scores = np.maximum(scores, fragmentation / self.fragmentation_threshold)
        return scores, scores > 1.0

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT_VERSION,
            "kind": "mahalanobis-tied+max-softmax",
            "means": _encode(self.means),
            "whitening": _encode(self.whitening),
            "distance_threshold": self.distance_threshold,
            "confidence_threshold": self.confidence_threshold,
            "distance_quantile": self.distance_quantile,
            "confidence_quantile": self.confidence_quantile,
            "fragmentation_threshold": self.fragmentation_threshold,
            "fragmentation_quantile": self.fragmentation_quantile,
        })

    @classmethod
    def from_json(cls, text: str) -> "OODScorer":
        doc = json.loads(text)
        if doc.get("format") != FORMAT_VERSION:
            raise ValueError(f"OOD scorer format {doc.get('format')!r}; this code reads "
                             f"{FORMAT_VERSION}: refit it with fit_ood()")
        return cls(_decode(doc["means"]), _decode(doc["whitening"]),
                   float(doc["distance_threshold"]), float(doc["confidence_threshold"]),
                   float(doc["distance_quantile"]), float(doc["confidence_quantile"]),
                   doc.get("fragmentation_threshold"), doc.get("fragmentation_quantile"))


def fragmentation_of(features: Mapping[str, float]) -> float:
    """Tokens per character of a text input (0.0 for an empty text)."""
    return float(features["tokens"]) / max(float(features["chars"]), 1.0)


def fit_ood(reference: Reference, distance_quantile: float = 0.99,
            confidence_quantile: float = 0.02, folds: int = 5, seed: int = 0,
            fragmentation_quantile: float = 0.995) -> OODScorer:
    """Fit means and covariance on the reference embeddings and calibrate the thresholds (the
    fragmentation one only when the profile has the text features ``tokens`` and ``chars``)."""
    emb = np.asarray(reference.embeddings, dtype=np.float64)
    classes = np.where(reference.labels >= 0, reference.labels, reference.predicted)
    if len(emb) < 2 * folds:
        raise ValueError(f"{len(emb)} reference rows are too few to calibrate an OOD scorer")
    out_of_fold = _cross_fitted_distances(emb, classes, folds, seed)
    means, whitening = fit_gaussian(emb, classes)
    confidence = reference.probabilities.max(axis=1)
    fragmentation = None
    names = list(reference.feature_names)
    if "tokens" in names and "chars" in names:
        rows = [dict(zip(names, row)) for row in reference.features]
        fragmentation = float(np.quantile([fragmentation_of(r) for r in rows],
                                          fragmentation_quantile))
    return OODScorer(means, whitening,
                     distance_threshold=float(np.quantile(out_of_fold, distance_quantile)),
                     confidence_threshold=float(np.quantile(confidence, confidence_quantile)),
                     distance_quantile=distance_quantile, confidence_quantile=confidence_quantile,
                     fragmentation_threshold=fragmentation,
                     fragmentation_quantile=fragmentation_quantile if fragmentation else None)


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


def _encode(array: np.ndarray) -> dict[str, Any]:
    data = np.ascontiguousarray(array, dtype="<f8").tobytes()
    return {"shape": list(array.shape), "f8": base64.b64encode(data).decode("ascii")}


def _decode(doc: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(doc["f8"])
    return np.frombuffer(raw, dtype="<f8").reshape(doc["shape"]).astype(np.float64)
