"""The pandas side of monitoring: log rows and reference profiles as frames with one layout.

Both have the monitored features as columns, ``emb_<i>`` for the embedding, ``predicted`` and
``label`` as class names and ``confidence``; log frames add request and slice columns
(``tag.<key>``). The drift and slice reports take these frames. Imported only by report code:
the request path never loads pandas.
"""

from __future__ import annotations

import json
from typing import Iterable

import numpy as np
import pandas as pd

from .reference import Reference

EMBEDDING_PREFIX = "emb_"


def embedding_columns(dim: int) -> list[str]:
    return [f"{EMBEDDING_PREFIX}{i}" for i in range(dim)]


def embedding_matrix(frame: pd.DataFrame) -> np.ndarray:
    """The ``emb_<i>`` columns of a frame as one float32 [N, D] array, in index order."""
    cols = sorted((c for c in frame.columns if _is_embedding(c)), key=lambda c: int(c[4:]))
    return frame[cols].to_numpy(dtype=np.float32)


def _is_embedding(column: object) -> bool:
    return isinstance(column, str) and column.startswith(EMBEDDING_PREFIX) and column[4:].isdigit()


def reference_frame(ref: Reference) -> pd.DataFrame:
    """The reference as a frame with the log's columns: features, ``emb_<i>``, predicted, ...

    ``predicted`` and ``label`` hold class names, as the prediction log does; unknown labels
    (-1) become missing values.
    """
    classes = np.array(ref.classes, dtype=object)
    columns: dict[str, object] = {n: ref.features[:, i] for i, n in enumerate(ref.feature_names)}
    columns.update(zip(embedding_columns(ref.embeddings.shape[1]), ref.embeddings.T))
    columns["predicted"] = classes[ref.predicted]
    columns["confidence"] = ref.confidence.astype(np.float64)
    columns["label"] = np.where(ref.labels >= 0, classes[np.clip(ref.labels, 0, None)], None)
    return pd.DataFrame(columns)


def rows_to_frame(rows: Iterable[tuple], probabilities: bool = False) -> pd.DataFrame:
    """Query rows (in ``PredictionLog.frame``'s column order) to the documented frame.

    The replica that answered (when the servers writing the log set ``CLF_REPLICA``) becomes the
    slice tag ``replica``, so the slice report compares replicas like any other slice."""
    rows = list(rows)
    base = ["request_id", "item", "ts", "model", "version", "predicted", "confidence", "ood",
            "ood_score", "latency_ms", "label"]
    frame = pd.DataFrame([r[:11] for r in rows], columns=base)
    frame["ood"] = frame["ood"].astype(bool)
    features = pd.DataFrame([json.loads(r[11]) for r in rows], index=frame.index)
    tags = pd.DataFrame([json.loads(r[12]) for r in rows], index=frame.index)
    replicas = [r[15] if len(r) > 15 else "" for r in rows]
    if any(replicas) and "replica" not in tags.columns:  # a log shared by several replicas
        tags["replica"] = replicas
    parts = [frame, features, tags.add_prefix("tag.")]
    parts.append(_matrix_frame([r[13] for r in rows], EMBEDDING_PREFIX, frame.index))
    if probabilities:
        parts.append(_matrix_frame([r[14] for r in rows], "prob_", frame.index))
    return pd.concat(parts, axis=1)


def _matrix_frame(blobs: list[bytes | None], prefix: str, index: pd.Index) -> pd.DataFrame:
    present = [b for b in blobs if b]
    if not present:
        return pd.DataFrame(index=index)
    width = len(present[0]) // 4
    if len(present) != len(blobs) or any(len(b) != 4 * width for b in present):
        raise ValueError(f"{prefix} blobs differ in length or are missing: mixed model versions?"
                         " read one version at a time")
    matrix = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), width)
    return pd.DataFrame(matrix, columns=[f"{prefix}{i}" for i in range(width)], index=index)
