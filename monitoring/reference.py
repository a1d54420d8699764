"""The reference profile a model version carries: what its validation data looked like.

``training/export.py`` writes ``reference.npz`` (monitored input features, embeddings, logits,
true and predicted labels of the validation split; a seeded sample of the training split's
embeddings and labels, which the OOD scorer fits on) and ``labels.json`` into each version folder.
Drift reports compare production windows against it (``frames.reference_frame``) and the OOD
scorer is calibrated on it.

numpy only at import time: the service loads it on its request path's start-up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelstore.layout import LABELS_FILE, REFERENCE_FILE


@dataclass(frozen=True)
class Reference:
    """One version's validation profile; arrays are row-aligned, classes in logit order."""

    feature_names: tuple[str, ...]
    features: np.ndarray  # float64 [N, F]
    embeddings: np.ndarray  # float32 [N, D]
    logits: np.ndarray  # float32 [N, K]
    labels: np.ndarray  # int64 [N], -1 = unknown
    predicted: np.ndarray  # int64 [N]
    confidence: np.ndarray  # float32 [N]
    classes: tuple[str, ...]
    # A seeded sample of the training split's embeddings and labels, where the export stored
    # them (``training.export.TRAIN_ROWS``); None in profiles written before.
    train_embeddings: np.ndarray | None = None  # float32 [M, D]
    train_labels: np.ndarray | None = None  # int64 [M]

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def probabilities(self) -> np.ndarray:
        return softmax(self.logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def load_reference(folder: str | Path) -> Reference:
    """Read ``reference.npz`` and ``labels.json`` from a model version folder."""
    folder = Path(folder)
    npz_path, labels_path = folder / REFERENCE_FILE, folder / LABELS_FILE
    for path in (npz_path, labels_path):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: is {folder} an exported model version?")
    with np.load(npz_path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    classes = tuple(json.loads(labels_path.read_text()))
    return Reference(
        feature_names=tuple(str(n) for n in arrays["feature_names"]),
        features=arrays["features"].astype(np.float64),
        embeddings=arrays["embeddings"].astype(np.float32),
        logits=arrays["logits"].astype(np.float32),
        labels=arrays["labels"].astype(np.int64),
        predicted=arrays["predicted"].astype(np.int64),
        confidence=arrays["confidence"].astype(np.float32),
        classes=classes,
        train_embeddings=(arrays["train_embeddings"].astype(np.float32)
                          if "train_embeddings" in arrays else None),
        train_labels=(arrays["train_labels"].astype(np.int64)
                      if "train_labels" in arrays else None),
    )
