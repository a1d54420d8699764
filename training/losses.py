"""Training losses for imbalanced labels: cross-entropy, class-weighted cross-entropy, focal loss.

``--loss ce``: plain cross-entropy. ``--loss weighted-ce``: cross-entropy with each class
weighted by n / (k * count_c) (scikit-learn's "balanced"), so every class weighs the same in the
loss whatever its share of the training data. ``--loss focal``: focal loss (Lin et al., 2017,
"Focal Loss for Dense Object Detection"), ``-(1 - p_t)^gamma * log p_t``: examples the model
already gets right with confidence ``p_t`` weigh ``(1 - p_t)^gamma`` as much, so the hard ones
(often the rare class) dominate the gradient; ``gamma = 0`` is plain cross-entropy.

The loss is always computed in float32 (under mixed precision the logits are cast up first):
a softmax over bf16/fp16 logits loses the small probabilities focal loss and the minority
classes depend on. Validation and test loss stay plain cross-entropy (see ``loop.evaluate``),
so early stopping and the figures in metrics.json compare across losses.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

LOSSES = ("ce", "weighted-ce", "focal")
DEFAULT_FOCAL_GAMMA = 2.0

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def balanced_class_weights(labels: Sequence[int] | np.ndarray | torch.Tensor,
                           num_classes: int) -> torch.Tensor:
    """n / (k * count_c) per class (scikit-learn's "balanced"): each class weighs the same in
    the loss, whatever its share of the training data. A class with no training example is an
    error (its weight would be infinite)."""
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels,
                        dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0).tolist()
        raise ValueError(f"class(es) {missing} have no training examples; cannot weight them")
    return torch.tensor(len(labels) / (num_classes * counts), dtype=torch.float32)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = DEFAULT_FOCAL_GAMMA,
               weight: torch.Tensor | None = None, label_smoothing: float = 0.0,
               reduction: str = "mean") -> torch.Tensor:
    """Multi-class focal loss, ``(1 - p_t)^gamma * CE``, per example.

    ``weight`` (one per class, the focal paper's alpha) and ``label_smoothing`` mean what they
    mean for ``F.cross_entropy``, and with ``gamma = 0`` the result equals it exactly, weighted
    mean included (the sum of weighted losses over the sum of the targets' weights).
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    logits = logits.float()
    weight = None if weight is None else weight.to(logits.device, torch.float32)
    # Per example: w_y * CE (with label smoothing, its smoothing part weighs each class by its
    # own weight, as F.cross_entropy does).
    ce = F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing,
                         reduction="none")
    if gamma:
        p_t = torch.softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        # clamp: 1 - p_t can round to a tiny negative; 0 ** gamma is fine, (-tiny) ** 2.5 is NaN
        ce = (1.0 - p_t).clamp(min=0.0).pow(gamma) * ce
    w = None if weight is None else weight[target]
    if reduction == "none":
        return ce
    if reduction == "sum":
        return ce.sum()
    if reduction != "mean":
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    return ce.sum() / w.sum() if w is not None else ce.mean()


def make_loss(kind: str = "ce", *, class_weights: torch.Tensor | None = None,
              focal_gamma: float = DEFAULT_FOCAL_GAMMA, label_smoothing: float = 0.0) -> LossFn:
    """The training loss ``loss(logits, target)`` for ``kind`` (one of ``LOSSES``), in float32.

    ``weighted-ce`` needs ``class_weights``; ``focal`` uses them as alpha if given (the
    training commands give none: plain focal loss)."""
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
    if kind == "weighted-ce" and class_weights is None:
        raise ValueError("weighted-ce needs class weights")
    weight = class_weights  # "ce" given weights (an older caller's class_weights) weighs too

    if kind == "focal":
        def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return focal_loss(logits, target, focal_gamma, weight, label_smoothing)
    else:
        def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            w = None if weight is None else weight.to(logits.device)
            return F.cross_entropy(logits.float(), target, weight=w,
                                   label_smoothing=label_smoothing)
    return loss
