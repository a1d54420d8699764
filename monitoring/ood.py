"""Out-of-distribution flags for served answers, calibrated on the validation reference profile.

Three signals (four for text models), each thresholded on the validation set so its false-flag
rate on in-distribution inputs is known:
  * low confidence: the top-1 probability below its ``confidence_quantile`` on validation;
  * distance: the Mahalanobis distance of the embedding to the nearest class mean, with one
    covariance shared by the classes (Lee et al. 2018, "A simple unified framework for detecting
    out-of-distribution samples") shrunk towards a scaled identity (Ledoit-Wolf) because a
    validation set has few rows per embedding dimension; flagged above its
    ``distance_quantile`` on validation;
  * neighbours: the distance of the L2-normalised embedding to its k-th nearest validation
    embedding (Sun et al. 2022, "Out-of-distribution detection with deep nearest neighbors"),
    flagged above its ``knn_quantile`` on validation. A foreign domain (newspaper prose sent to
    an SMS model, letters sent to a digits model) often lands near a class mean under one broad
    shared covariance, yet away from every real example: the class Gaussians are a coarse
    summary of where the data is, the neighbours are the data. The bank is the validation
    embeddings, at most ``KNN_MAX_ROWS`` of them (a seeded subsample), stored as float16.

Why cross-fitting: distances of the rows the means and covariance were fitted on are biased
low (with 128 dimensions and a few hundred rows, badly), so a threshold taken on them flags far
more than the nominal share of new in-distribution inputs. The threshold is taken on
out-of-fold distances instead (fit on k-1 folds, measure the k-th), then the final means and
covariance are fitted on all rows. The neighbour signal has the same bias in its extreme form (a
bank row is its own nearest neighbour, at distance 0), so its threshold is taken leave-one-out:
each validation row's k-th neighbour among the bank's other rows.

Text models add a signal on the input itself: fragmentation, the tokens per character of
the raw text (from ``preprocessing.text_features``), flagged above its ``fragmentation_quantile``
on validation. A tokenizer trained on the model's languages cuts real words into few tokens;
random strings and unseen scripts fall apart into one token per character or two, while the
model's embedding of such noise can still land near a class, so confidence and distance alone
miss many random strings that fragmentation catches (see monitoring/README.md, OOD flags).

The score of an answer is the largest of its signals divided by their thresholds, so
``score > 1`` is exactly ``flag``. The default tails (1% distance, 0.5% confidence, 2.5%
neighbours, 0.5% fragmentation) sum to 4% (images) or 4.5% (texts), an upper bound of the
in-distribution false-flag rate since the signals overlap, below 5% because a threshold taken on
a few hundred validation rows lets fresh data exceed its nominal tail. Most of the budget goes to
the neighbours, the signal that separates foreign domains best (tools/ood_report.py measures
each signal's ROC AUC; monitoring/README.md has the figures). Pure numpy: the service calls
``score`` on every batch, which costs a small fraction of a model call (see monitoring/README.md,
Measured).
Scorers stored before the neighbour signal (``to_json`` format 1) still load and score as they
did.
"""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .reference import Reference

FORMAT_VERSION = 2  # 2: the neighbour signal; 1 (no neighbours) still loads
READABLE_FORMATS = (1, 2)
KNN_K = 5
KNN_MAX_ROWS = 2000  # bank rows: 2,000 x 384-d float16 = 1.5 MB, ~30 us per answer


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
        if self.knn_bank is not None and self.knn_quantile is not None:
            rate += 1.0 - self.knn_quantile
        return rate

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

    def signals(self, probabilities: np.ndarray, embeddings: np.ndarray,
                features: "Sequence[Mapping[str, float]] | None" = None
                ) -> dict[str, np.ndarray]:
        """Each signal of a batch divided by its threshold (> 1 flags), by name."""
        confidence = np.asarray(probabilities, dtype=np.float64).max(axis=1)
        out = {"distance": self.distances(embeddings) / self.distance_threshold,
               "confidence": (1.0 - confidence) / max(1.0 - self.confidence_threshold, 1e-6)}
        if self.knn_bank is not None and self.knn_threshold is not None:
            out["knn"] = self.neighbour_distances(embeddings) / max(self.knn_threshold, 1e-6)
        if self.fragmentation_threshold is not None and features is not None:
            fragmentation = np.array([fragmentation_of(f) for f in features])
            out["fragmentation"] = fragmentation / self.fragmentation_threshold
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
        }
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> "OODScorer":
        """A stored scorer; format 1 (before the neighbour signal) loads without it and scores
        as it did."""
        doc = json.loads(text)
        if doc.get("format") not in READABLE_FORMATS:
            raise ValueError(f"OOD scorer format {doc.get('format')!r}; this code reads "
                             f"{READABLE_FORMATS}: refit it with fit_ood()")
        bank = doc.get("knn_bank")
        return cls(_decode(doc["means"]), _decode(doc["whitening"]),
                   float(doc["distance_threshold"]), float(doc["confidence_threshold"]),
                   float(doc["distance_quantile"]), float(doc["confidence_quantile"]),
                   doc.get("fragmentation_threshold"), doc.get("fragmentation_quantile"),
                   None if bank is None else _decode(bank).astype(np.float32),
                   int(doc.get("knn_k", KNN_K)), doc.get("knn_threshold"),
                   doc.get("knn_quantile"))


def fragmentation_of(features: Mapping[str, float]) -> float:
    """Tokens per character of a text input (0.0 for an empty text)."""
    return float(features["tokens"]) / max(float(features["chars"]), 1.0)


def fit_ood(reference: Reference, distance_quantile: float = 0.99,
            confidence_quantile: float = 0.005, folds: int = 5, seed: int = 0,
            fragmentation_quantile: float = 0.995, knn_quantile: float | None = 0.975,
            knn_k: int = KNN_K, knn_max_rows: int = KNN_MAX_ROWS) -> OODScorer:
    """Fit means and covariance on the reference embeddings and calibrate the thresholds (the
    fragmentation one only when the profile has the text features ``tokens`` and ``chars``;
    the neighbour one unless ``knn_quantile`` is None)."""
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
    bank, k, knn_threshold = None, knn_k, None
    if knn_quantile is not None:
        bank, leave_one_out, k = fit_neighbours(reference.embeddings, knn_k, knn_max_rows, seed)
        knn_threshold = float(np.quantile(leave_one_out, knn_quantile))
    return OODScorer(means, whitening,
                     distance_threshold=float(np.quantile(out_of_fold, distance_quantile)),
                     confidence_threshold=float(np.quantile(confidence, confidence_quantile)),
                     distance_quantile=distance_quantile, confidence_quantile=confidence_quantile,
                     fragmentation_threshold=fragmentation,
                     fragmentation_quantile=fragmentation_quantile if fragmentation else None,
                     knn_bank=bank, knn_k=k, knn_threshold=knn_threshold,
                     knn_quantile=knn_quantile if bank is not None else None)


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


def fit_neighbours(embeddings: np.ndarray, k: int, max_rows: int, seed: int,
                   chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, int]:
    """The neighbour bank (at most ``max_rows`` unit rows, seeded subsample, float16 values),
    every reference row's leave-one-out k-th neighbour distance, and k (lowered where the bank
    is smaller than k + 1 rows)."""
    units = unit_rows(embeddings)
    n = len(units)
    if n <= max_rows:
        chosen = np.arange(n)
    else:
        chosen = np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))
    # Rounded to float16 here, so a scorer read back from JSON scores exactly as this one.
    bank = units[chosen].astype(np.float16).astype(np.float32)
    k = max(1, min(k, len(bank) - 1))
    position = np.full(n, -1)
    position[chosen] = np.arange(len(chosen))
    out = np.empty(n)
    for start in range(0, n, chunk):  # bounded memory for large reference sets
        part = slice(start, start + chunk)
        out[part] = kth_neighbour_distance(units[part], bank, k, position[part])
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
    key = {"<f8": "f8", "<f2": "f2"}[dtype]
    return {"shape": list(array.shape), key: base64.b64encode(data).decode("ascii")}


def _decode(doc: dict[str, Any]) -> np.ndarray:
    key, dtype = ("f2", "<f2") if "f2" in doc else ("f8", "<f8")
    raw = base64.b64decode(doc[key])
    return np.frombuffer(raw, dtype=dtype).reshape(doc["shape"]).astype(np.float64)
