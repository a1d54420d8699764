"""Per-class figures of a test split: precision, recall, F1 and support per class, macro-F1.

Accuracy hides a minority class the model never predicts (13% spam: 0.87 accuracy by always
answering "ham"); per-class recall and macro-F1 do not. They go into every artifact's
metrics.json (``per_class``, ``macro_f1``), computed on the test split.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .loop import _to_device, forward


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, predicted labels) over ``loader``, in eval mode and float32."""
    model.eval()
    device = next(model.parameters()).device
    truth, predicted = [], []
    for x, y in loader:
        logits, _ = forward(model, _to_device(x, device))
        truth.append(y.cpu().numpy())
        predicted.append(logits.argmax(dim=1).cpu().numpy())
    return np.concatenate(truth), np.concatenate(predicted)


def classification_report(truth: Sequence[int] | np.ndarray, predicted: Sequence[int] | np.ndarray,
                          classes: Sequence[str]) -> dict[str, Any]:
    """``{"per_class": {label: {precision, recall, f1, support}}, "macro_f1": float}``.

    Every class of ``classes`` is listed; a class with no support and no predictions has
    precision, recall and F1 of 0 and is left out of the macro average (as scikit-learn's
    ``f1_score(average="macro")`` does over the labels present); a figure whose denominator is
    0 is 0.
    """
    truth = np.asarray(truth, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    k = len(classes)
    support = np.bincount(truth, minlength=k)[:k]
    predicted_n = np.bincount(predicted, minlength=k)[:k]
    tp = np.bincount(truth[truth == predicted], minlength=k)[:k]
    precision = np.divide(tp, predicted_n, out=np.zeros(k), where=predicted_n > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * tp, support + predicted_n, out=np.zeros(k),
                   where=(support + predicted_n) > 0)
    present = (support + predicted_n) > 0
    per_class = {
        str(name): {"precision": round(float(precision[i]), 6),
                    "recall": round(float(recall[i]), 6), "f1": round(float(f1[i]), 6),
                    "support": int(support[i])}
        for i, name in enumerate(classes)}
    macro = float(f1[present].mean()) if present.any() else 0.0
    return {"per_class": per_class, "macro_f1": round(macro, 6)}


def per_class_line(metrics: dict[str, Any]) -> str:
    """The training summary's line: macro-F1 and the class with the lowest recall."""
    per_class = metrics.get("per_class") or {}
    if not per_class:
        return "macro-F1       -"
    worst = min(per_class, key=lambda c: (per_class[c]["recall"], c))
    return (f"macro-F1       {metrics['macro_f1']:.4f}  (lowest recall: {worst} "
            f"{per_class[worst]['recall']:.3f} of {per_class[worst]['support']})")


def test_report(model: nn.Module, loader: DataLoader, classes: Sequence[str]) -> dict[str, Any]:
    """``classification_report`` of ``model`` on ``loader`` (the test split)."""
    truth, predicted = predict(model, loader)
    return classification_report(truth, predicted, classes)


test_report.__test__ = False  # not a pytest test, whatever its name
