"""Per-slice quality figures of a logged window, and the slices that fall short of the whole.

For every value of every slice column (and for the whole window, the row ``all``):
  * on all rows: count, predicted-class distribution, mean confidence, share of low-confidence
    answers, share of OOD-flagged answers; and, when the frame has a ``calibrated`` column (the
    confidence calibrated on the reference profile, ``performance.py``), the estimated accuracy
    ``est_accuracy``: the mean calibrated confidence, the expected share of right answers
    without any label;
  * on the rows with a ground-truth label: their count, accuracy, macro-F1 (over the classes
    that occur in the slice's labels or predictions, as scikit-learn's ``f1_score`` does) and
    expected calibration error (ECE: ``bins`` equal-width confidence bins, the
    count-weighted mean of |accuracy - mean confidence| per bin).

A slice is flagged when it is at least ``margin`` worse than the whole on a figure and has at
least ``min_count`` rows for it (labelled rows for the labelled figures): lower accuracy,
macro-F1, estimated accuracy or mean confidence; higher ECE, low-confidence share or OOD share.
Everything is grouped arithmetic on whole columns, so a million rows take seconds, not minutes.

``class_metrics`` is the per-class view of the labelled rows (feedback labels): for every class
that occurs as a label or a prediction, its support, precision, recall and F1. A class is
flagged when its recall is at least ``margin`` below the window's accuracy with at least
``min_count`` labelled rows: a minority class the model misses hides in the accuracy.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .slices import (BRIGHTNESS_BUCKETS, BRIGHTNESS_TOP, MISSING, SIZE_BUCKETS, SIZE_TOP,
                     TEXT_LENGTH_BUCKETS, TEXT_LENGTH_TOP)

ALL = "all"
# figure -> (direction, needs labels): "lower" = a smaller value is worse
FIGURES = {
    "accuracy": ("lower", True),
    "macro_f1": ("lower", True),
    "ece": ("higher", True),
    "est_accuracy": ("lower", False),  # only when the frame has a ``calibrated`` column
    "mean_confidence": ("lower", False),
    "low_conf_share": ("higher", False),
    "ood_share": ("higher", False),
}


def add_derived_slices(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Add the slice columns the features imply; returns the frame and their names."""
    derived = {}
    if {"width", "height"} <= set(frame.columns):
        side = np.maximum(frame["width"].to_numpy(float), frame["height"].to_numpy(float))
        derived["size"] = buckets(side, SIZE_BUCKETS, SIZE_TOP)
    if "brightness" in frame.columns:
        derived["brightness_bucket"] = buckets(frame["brightness"].to_numpy(float),
                                               BRIGHTNESS_BUCKETS, BRIGHTNESS_TOP)
    if "chars" in frame.columns:  # preprocessing.TEXT_FEATURES
        derived["length_bucket"] = buckets(frame["chars"].to_numpy(float), TEXT_LENGTH_BUCKETS,
                                           TEXT_LENGTH_TOP)
    return frame.assign(**derived), list(derived)


def buckets(values: np.ndarray, edges: tuple[tuple[float, str], ...], top: str) -> np.ndarray:
    """Vectorised ``slices._bucket``: the name of the first edge a value is below, else ``top``."""
    bounds = np.array([bound for bound, _ in edges], dtype=np.float64)
    names = np.array([name for _, name in edges] + [top], dtype=object)
    return names[np.searchsorted(bounds, values, side="right")]


def slice_metrics(frame: pd.DataFrame, slices: Sequence[str], margin: float = 0.05,
                  min_count: int = 30, low_confidence: float = 0.5, bins: int = 10
                  ) -> pd.DataFrame:
    """One row per (slice, value) plus the ``all`` row; see the module docstring.

    ``frame`` needs ``predicted``, ``confidence``; ``label`` (missing = unlabelled), ``ood`` and
    ``calibrated`` are optional.
    """
    base = _prepared(frame, low_confidence, bins)
    parts = [_figures(base, pd.Series(ALL, index=base.index), ALL)]
    for name in slices:
        keys = frame[name].astype(object).where(frame[name].notna(), MISSING).astype(str)
        parts.append(_figures(base, keys, name))
    table = pd.concat(parts, ignore_index=True)
    return _flag(table, margin, min_count)


def _prepared(frame: pd.DataFrame, low_confidence: float, bins: int) -> pd.DataFrame:
    labels = frame["label"] if "label" in frame.columns else pd.Series(None, index=frame.index)
    conf = frame["confidence"].to_numpy(np.float64)
    calibrated = (frame["calibrated"].to_numpy(np.float64) if "calibrated" in frame.columns
                  else np.full(len(frame), np.nan))
    return pd.DataFrame({
        "predicted": frame["predicted"].astype(str),
        "label": labels.astype(object).where(labels.notna(), None),
        "labelled": labels.notna(),
        "confidence": conf,
        "low": conf < low_confidence,
        "ood": frame["ood"].astype(bool) if "ood" in frame.columns else False,
        "bin": np.minimum((conf * bins).astype(np.int64), bins - 1),
        "calibrated": calibrated,
    }, index=frame.index)


def _figures(base: pd.DataFrame, keys: pd.Series, slice_name: str) -> pd.DataFrame:
    grouped = base.groupby(keys, sort=True)
    table = pd.DataFrame({
        "n": grouped.size(),
        "est_accuracy": grouped["calibrated"].mean(),  # all nan without a calibration
        "mean_confidence": grouped["confidence"].mean(),
        "low_conf_share": grouped["low"].mean(),
        "ood_share": grouped["ood"].mean(),
    })
    table["predicted_dist"] = _distribution(base["predicted"], keys).reindex(table.index)
    labelled = base[base["labelled"]]
    lkeys = keys[base["labelled"]]
    correct = (labelled["predicted"] == labelled["label"].astype(str)).astype(np.float64)
    table["n_labelled"] = lkeys.groupby(lkeys).size().reindex(table.index, fill_value=0)
    table["accuracy"] = correct.groupby(lkeys).mean().reindex(table.index)
    table["macro_f1"] = macro_f1(labelled["label"].astype(str), labelled["predicted"],
                                 lkeys).reindex(table.index)
    table["ece"] = ece(labelled["confidence"], correct, labelled["bin"], lkeys).reindex(table.index)
    table.insert(0, "value", table.index.astype(str))
    table.insert(0, "slice", slice_name)
    return table.reset_index(drop=True)


def macro_f1(label: pd.Series, predicted: pd.Series, keys: pd.Series) -> pd.Series:
    """Macro-F1 per group, over the classes present in the group's labels or predictions."""
    if label.empty:
        return pd.Series(dtype=np.float64)
    true_n = label.groupby([keys, label]).size()
    pred_n = predicted.groupby([keys, predicted]).size()
    hit = label == predicted
    tp = label[hit].groupby([keys[hit], label[hit]]).size()
    for s in (true_n, pred_n, tp):
        s.index.names = ["key", "cls"]
    counts = pd.concat({"true": true_n, "pred": pred_n, "tp": tp}, axis=1).fillna(0.0)
    f1 = 2.0 * counts["tp"] / (counts["true"] + counts["pred"])
    return f1.groupby(level="key").mean()


def ece(confidence: pd.Series, correct: pd.Series, bins: pd.Series, keys: pd.Series
        ) -> pd.Series:
    """Expected calibration error per group, from each row's confidence bin."""
    if confidence.empty:
        return pd.Series(dtype=np.float64)
    per_bin = pd.DataFrame({"conf": confidence, "ok": correct}).groupby([keys, bins]).agg(
        n=("conf", "size"), conf=("conf", "mean"), ok=("ok", "mean"))
    gap = (per_bin["ok"] - per_bin["conf"]).abs() * per_bin["n"]
    return gap.groupby(level=0).sum() / per_bin["n"].groupby(level=0).sum()


def _distribution(predicted: pd.Series, keys: pd.Series) -> pd.Series:
    counts = predicted.groupby([keys, predicted]).size().sort_values(ascending=False, kind="stable")
    totals = counts.groupby(level=0).sum()
    out: dict[str, dict[str, float]] = {}
    for (key, cls), n in counts.items():  # one entry per (group, class): small
        out.setdefault(key, {})[str(cls)] = round(float(n / totals[key]), 4)
    return pd.Series(out, dtype=object)


def _flag(table: pd.DataFrame, margin: float, min_count: int) -> pd.DataFrame:
    whole = table.iloc[0]
    reasons: list[list[str]] = [[] for _ in range(len(table))]
    for figure, (direction, needs_labels) in FIGURES.items():
        count = table["n_labelled"] if needs_labels else table["n"]
        gap = table[figure] - whole[figure]
        if direction == "lower":
            gap = -gap
        hit = (gap > margin) & (count >= min_count) & table[figure].notna()
        for i in np.flatnonzero(hit.to_numpy()):
            reasons[i].append(figure)
    table["flagged"] = [bool(r) for r in reasons]
    table["reasons"] = [",".join(r) for r in reasons]
    return table


def format_table(table: pd.DataFrame, top: int = 3) -> str:
    """A fixed-width rendering: one line per slice value, flagged ones marked with ``!``."""
    head = (f"  {'slice':<18} {'value':<14} {'n':>8} {'n_lab':>7} {'acc':>6} {'est':>6} "
            f"{'mF1':>6} {'ECE':>6} {'conf':>6} {'low':>6} {'ood':>6}  predicted (top {top})  "
            "flags")
    lines = [head]
    for row in table.itertuples(index=False):
        dist = " ".join(f"{k}:{v:.2f}" for k, v in list((row.predicted_dist or {}).items())[:top])
        lines.append(
            f"{'!' if row.flagged else ' '} {row.slice:<18.18} {row.value:<14.14} {row.n:>8d} "
            f"{row.n_labelled:>7d} {_f(row.accuracy)} {_f(row.est_accuracy)} "
            f"{_f(row.macro_f1)} {_f(row.ece)} "
            f"{_f(row.mean_confidence)} {_f(row.low_conf_share)} {_f(row.ood_share)}  "
            f"{dist:<22} {row.reasons}")
    return "\n".join(lines)


def class_metrics(frame: pd.DataFrame, margin: float = 0.05, min_count: int = 30
                  ) -> pd.DataFrame:
    """One row per class over the labelled rows of ``frame`` (``label``, ``predicted``):
    ``class, support, n_predicted, precision, recall, f1, flagged``; empty without labels.

    The same definitions as the training artifact's ``per_class`` (``training.metrics``):
    support = labelled rows of the class, precision = right / predicted as the class,
    recall = right / support, F1 = 2 right / (support + predicted); a zero denominator gives 0.
    """
    columns = ["class", "support", "n_predicted", "precision", "recall", "f1", "flagged"]
    if "label" not in frame.columns or not frame["label"].notna().any():
        return pd.DataFrame(columns=columns)
    labelled = frame[frame["label"].notna()]
    label = labelled["label"].astype(str)
    predicted = labelled["predicted"].astype(str)
    classes = sorted(set(label) | set(predicted))
    support = label.value_counts().reindex(classes, fill_value=0).to_numpy(np.float64)
    n_pred = predicted.value_counts().reindex(classes, fill_value=0).to_numpy(np.float64)
    tp = label[label == predicted].value_counts().reindex(classes, fill_value=0).to_numpy(
        np.float64)
    zeros = np.zeros(len(classes))
    precision = np.divide(tp, n_pred, out=zeros.copy(), where=n_pred > 0)
    recall = np.divide(tp, support, out=zeros.copy(), where=support > 0)
    f1 = np.divide(2 * tp, support + n_pred, out=zeros.copy(), where=(support + n_pred) > 0)
    accuracy = tp.sum() / max(1.0, support.sum())
    flagged = (support >= min_count) & (recall < accuracy - margin)
    return pd.DataFrame({"class": classes, "support": support.astype(np.int64),
                         "n_predicted": n_pred.astype(np.int64), "precision": precision,
                         "recall": recall, "f1": f1, "flagged": flagged}, columns=columns)


def format_class_table(table: pd.DataFrame) -> str:
    """Per-class rows (``class_metrics``), flagged ones marked with ``!``."""
    if table.empty:
        return "  per class: no labelled rows (no feedback in the window)"
    lines = [f"  {'class':<18} {'support':>8} {'n_pred':>8} {'prec':>6} {'recall':>6} {'F1':>6}"]
    for row in table.itertuples(index=False):
        lines.append(f"{'!' if row.flagged else ' '} {str(row[0]):<18.18} {row.support:>8d} "
                     f"{row.n_predicted:>8d} {_f(row.precision)} {_f(row.recall)} {_f(row.f1)}")
    return "\n".join(lines)


def _f(value: float) -> str:
    return f"{'-':>6}" if value is None or pd.isna(value) else f"{value:>6.3f}"


def to_records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-ready rows (missing figures become null)."""
    return json.loads(table.to_json(orient="records"))
