"""Adversarial examples: FGSM and PGD on images, a bounded character-edit attack on texts, and
FGSM adversarial training.

Image attacks are white-box, on the PyTorch model in float32 and eval mode, in the spec's pixel
scale: a test image's tensor ``x`` (``image_to_array``: ``(p - mean) / std`` with ``p`` in
[0, 1]) is mapped back to ``p = x * std + mean``, perturbed within ``|delta|_inf <= eps``,
clipped to [0, 1] and normalised again. So ``eps = 8/255`` is 8 grey levels of an 8-bit image
whatever the spec's mean and std. The adversarial tensors are not re-quantised to 8 bits (a
slightly stronger attacker than one who must send a PNG).

* FGSM (Goodfellow et al. 2015): one step of size ``eps`` along the sign of the input gradient.
* PGD (Madry et al. 2018), small: a uniform random start in the ball, ``PGD_STEPS`` steps of
  ``2.5 * eps / steps``, projected back each step.

Success rate: the share of correctly classified inputs whose prediction the attack flips.

The text attack (``char_attack``) is black-box, through the served path (the ONNX model behind
the shared text preprocessing): greedy, up to ``max_edits`` character edits per text, each step
trying ``candidates`` random edits (delete, swap neighbours, insert or replace a letter with one
of the text's own letters) and keeping the one that lowers the true class's probability most;
it stops on a flip. The success rate at ``k`` edits is the share flipped within ``k`` steps.

Adversarial training (``FGSMTraining``, ``--adversarial-training EPS``): each training batch is
extended with FGSM examples of itself at ``EPS`` with a random start (Wong et al. 2020, "Fast is
better than free": step ``1.25 * EPS`` from a uniform start, projected to the ball), computed on
the current weights in train mode with the batch-norm running statistics left untouched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from preprocessing import ImageSpec

# eps in the spec's pixel scale [0, 1]: 2, 4, 8 and 16 grey levels of 255.
EPSILONS = (2 / 255, 4 / 255, 8 / 255, 16 / 255)
PGD_STEPS = 10
# The strength ``attack_success`` reports: PGD at 8/255 (images), 2 edits (texts).
REFERENCE_EPS = 8 / 255
TEXT_EDITS = (1, 2, 3)
REFERENCE_EDITS = 2
ATTACK_BATCH = 256


def eps_key(eps: float) -> str:
    """The metrics key of an eps: 4 decimals in pixel scale (8/255 -> "0.0314")."""
    return f"{eps:.4f}"


def pixel_affine(spec: ImageSpec, device: torch.device | str = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's mean and std as [1, C, 1, 1] tensors: ``x = (p - mean) / std``."""
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean, std


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def _input_grad(model: nn.Module, pixels: torch.Tensor, y: torch.Tensor, mean: torch.Tensor,
                std: torch.Tensor) -> torch.Tensor:
    """d(cross-entropy)/d(pixels), parameters' gradients untouched."""
    with torch.enable_grad():
        p = pixels.detach().requires_grad_(True)
        loss = F.cross_entropy(_logits(model, (p - mean) / std).float(), y)
        (grad,) = torch.autograd.grad(loss, p)
    return grad


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, mean: torch.Tensor,
         std: torch.Tensor) -> torch.Tensor:
    """FGSM examples of normalised inputs ``x`` (returned normalised)."""
    p = x * std + mean
    adv = (p + eps * _input_grad(model, p, y, mean, std).sign()).clamp(0.0, 1.0)
    return ((adv - mean) / std).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, mean: torch.Tensor,
        std: torch.Tensor, steps: int = PGD_STEPS, generator: torch.Generator | None = None
        ) -> torch.Tensor:
    """PGD examples (L-inf, random start) of normalised inputs ``x`` (returned normalised)."""
    p = x * std + mean
    alpha = 2.5 * eps / steps
    start = torch.rand(p.shape, generator=generator, dtype=p.dtype).to(p.device) * 2 - 1
    adv = (p + eps * start).clamp(0.0, 1.0)
    for _ in range(steps):
        adv = adv + alpha * _input_grad(model, adv, y, mean, std).sign()
        adv = torch.min(torch.max(adv, p - eps), p + eps).clamp(0.0, 1.0)
    return ((adv - mean) / std).detach()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = ATTACK_BATCH) -> torch.Tensor:
    return torch.cat([_logits(model, x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


@dataclass
class ImageAttackReport:
    """Success rates per attack and eps, and the reference attack's successful examples (for
    the OOD flag's rate on them)."""

    fgsm: dict[str, float]
    pgd: dict[str, float]
    attacked: int  # correctly classified inputs the rates are over
    clean_accuracy: float
    adversarial_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    reference_examples: np.ndarray | None = None  # successful PGD@REFERENCE_EPS, normalised

    def metrics(self) -> dict[str, Any]:
        return {"fgsm": self.fgsm, "pgd": self.pgd}


def image_attacks(model: nn.Module, x: np.ndarray | torch.Tensor, y: Sequence[int],
                  spec: ImageSpec, epsilons: Sequence[float] = EPSILONS,
                  steps: int = PGD_STEPS, seed: int = 0) -> ImageAttackReport:
    """FGSM and PGD at every eps on normalised inputs ``x`` [N, C, H, W] with labels ``y``.

    Only the correctly classified inputs are attacked (the others count as wrong under attack
    too); accuracies under attack, over all inputs, go into ``adversarial_accuracy``."""
    model = model.float().eval()
    device = next(model.parameters()).device
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.long, device=device)
    mean, std = pixel_affine(spec, device)
    n = len(yt)
    right = (torch.nonzero(predict(model, xt) == yt).flatten() if n
             else torch.zeros(0, dtype=torch.long))
    xc, yc, correct = xt[right], yt[right], len(right)
    generator = torch.Generator().manual_seed(seed)
    rates: dict[str, dict[str, float]] = {"fgsm": {}, "pgd": {}}
    accs: dict[str, dict[str, float]] = {"fgsm": {}, "pgd": {}}
    reference = None
    for eps in epsilons:
        for kind in ("fgsm", "pgd"):
            adv = torch.cat([
                fgsm(model, xc[i:i + ATTACK_BATCH], yc[i:i + ATTACK_BATCH], eps, mean, std)
                if kind == "fgsm" else
                pgd(model, xc[i:i + ATTACK_BATCH], yc[i:i + ATTACK_BATCH], eps, mean, std, steps,
                    generator)
                for i in range(0, correct, ATTACK_BATCH)]) if correct else xc
            flipped = predict(model, adv) != yc if correct else torch.zeros(0, dtype=torch.bool)
            rates[kind][eps_key(eps)] = int(flipped.sum()) / max(1, correct)
            accs[kind][eps_key(eps)] = (correct - int(flipped.sum())) / n if n else float("nan")
            if kind == "pgd" and abs(eps - REFERENCE_EPS) < 1e-9:
                reference = adv[flipped].cpu().numpy()
    return ImageAttackReport(rates["fgsm"], rates["pgd"], correct,
                             correct / n if n else float("nan"), accs, reference)


# -- adversarial training ---------------------------------------------------------------------

@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Batch norm normalises with the batch's statistics but leaves its running ones alone."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None
              else None) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


@dataclass
class FGSMTraining:
    """A batch perturbation for ``loop.fit``: ``(model, x, y) -> (x + FGSM(x), y + y)``."""

    eps: float
    spec: ImageSpec
    seed: int = 0
    _generator: torch.Generator | None = field(default=None, repr=False)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        mean, std = pixel_affine(self.spec, x.device)
        p = x * std + mean
        start = (torch.rand(p.shape, generator=self._generator) * 2 - 1).to(p.device)
        adv = (p + self.eps * start).clamp(0.0, 1.0)
        with frozen_batchnorm_stats(model):
            grad = _input_grad(model, adv, y, mean, std)
        adv = adv + 1.25 * self.eps * grad.sign()
        adv = torch.min(torch.max(adv, p - self.eps), p + self.eps).clamp(0.0, 1.0)
        return torch.cat([x, ((adv - mean) / std).detach()]), torch.cat([y, y])


# -- texts ------------------------------------------------------------------------------------

def _edit(text: str, rng: np.random.Generator) -> str:
    """One random character edit of ``text``: delete, swap neighbours, insert or replace (with
    one of the text's own letters, so the script stays the same)."""
    if not text:
        return text
    letters = sorted({c for c in text if c.isalpha()}) or sorted(set(text))
    i = int(rng.integers(len(text)))
    op = int(rng.integers(4))
    if op == 0 and len(text) > 1:
        return text[:i] + text[i + 1:]
    if op == 1 and i + 1 < len(text):
        return text[:i] + text[i + 1] + text[i] + text[i + 2:]
    c = letters[int(rng.integers(len(letters)))]
    if op == 2:
        return text[:i] + c + text[i:]
    return text[:i] + c + text[i + 1:]


@dataclass
class TextAttackReport:
    charedit: dict[str, float]  # edits -> success rate
    attacked: int
    adversarial_texts: list[str]  # the successful ones (within max edits)
    adversarial_labels: list[int]


def char_attack(predict_proba: Callable[[list[str]], np.ndarray], texts: Sequence[str],
                labels: Sequence[int], max_edits: int = max(TEXT_EDITS), candidates: int = 16,
                seed: int = 0, edits: Sequence[int] = TEXT_EDITS) -> TextAttackReport:
    """Greedy black-box character-edit attack on the correctly classified ``texts``.

    ``predict_proba(texts) -> [N, K]`` probabilities. Cost: at most ``len(texts) * max_edits *
    candidates`` model calls (batched)."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels, dtype=np.int64)
    probs = predict_proba(list(texts))
    correct = np.flatnonzero(probs.argmax(1) == y)
    current = {int(i): texts[i] for i in correct}
    flipped_at: dict[int, int] = {}
    for step in range(1, max_edits + 1):
        active = [i for i in current if i not in flipped_at]
        if not active:
            break
        batch = [(i, _edit(current[i], rng)) for i in active for _ in range(candidates)]
        p = predict_proba([t for _, t in batch])
        for k, i in enumerate(active):
            rows = p[k * candidates:(k + 1) * candidates]
            others = rows.copy()
            others[:, y[i]] = -np.inf
            margin = rows[:, y[i]] - others.max(1)  # < 0: flipped
            best = int(np.argmin(margin))
            current[i] = batch[k * candidates + best][1]
            if margin[best] < 0:
                flipped_at[i] = step
    n = max(1, len(correct))
    rates = {str(k): sum(1 for s in flipped_at.values() if s <= k) / n for k in edits}
    won = sorted(flipped_at)
    return TextAttackReport(rates, len(correct), [current[i] for i in won],
                            [int(y[i]) for i in won])
