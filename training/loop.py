"""The training loop: AdamW, warm-up + cosine per step, validation each epoch, early stopping.

Short enough to hold in your head (cf. nanoGPT's train.py). Same seed + same data gives the
same metrics and byte-identical weights (with the same thread count, CPU and library versions):
seeds are fixed, the loader's shuffle has its own generator, augmentation is seeded per item,
and torch runs in deterministic mode.

The image and the text models share it: a batch is ``(x, y)`` where ``x`` is one tensor (images)
or a tuple of tensors passed as positional arguments (``input_ids, attention_mask``), and a
dataset with a ``collate`` method batches its own items (texts are padded per batch). The
training loss (``losses``) and mixed precision (``precision``) are the config's ``loss``,
``focal_gamma`` and ``precision``.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from . import distributed
from .losses import DEFAULT_FOCAL_GAMMA, LossFn, balanced_class_weights, make_loss
from .precision import MixedPrecision

log = logging.getLogger("training")


class LoopConfig(Protocol):
    """The fields ``fit`` reads; ``TrainConfig`` and the text command's config both have them."""

    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    epochs: int
    patience: int
    label_smoothing: float
    seed: int
    progress: bool
    # Read with getattr, so an older config without them trains as before: loss ("ce"),
    # focal_gamma, precision ("32"), early_stop_from (0).


@dataclass
class FitResult:
    """What ``fit`` hands back; ``model`` holds the best epoch's weights, in eval mode."""

    model: nn.Module
    history: list[dict[str, float]]
    best_epoch: int
    val_loss: float
    val_accuracy: float
    epochs_run: int
    train_seconds: float
    stopped_early: bool = False

    def metrics(self, test_loss: float, test_accuracy: float, splits: Any,
                train_seconds: float | None = None) -> dict[str, Any]:
        """metrics.json (image and text alike): the fields the service, the registry and the
        retraining read; ``splits`` has train/val/test parts."""
        return {
            "test_accuracy": test_accuracy, "test_loss": test_loss,
            "val_accuracy": self.val_accuracy, "val_loss": self.val_loss,
            "best_epoch": self.best_epoch, "epochs_run": self.epochs_run,
            "stopped_early": self.stopped_early,
            "train_seconds": round(self.train_seconds if train_seconds is None else train_seconds, 2),
            "history": self.history,
            "split_sizes": {"train": len(splits.train), "val": len(splits.val),
                            "test": len(splits.test)},
        }


def seed_everything(seed: int, num_threads: int = 2) -> None:
    """Fix every RNG we draw from and the thread count (2 cores: more threads only contend)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(num_threads)
    # Cheap on CPU, where every op we use has a deterministic kernel. warn_only: on CUDA a few
    # ops have none, and a warning there beats refusing to train.
    torch.use_deterministic_algorithms(True, warn_only=True)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay only weight matrices and conv kernels; biases and norm scales stay undecayed
    (decaying them only shrinks the BN gain, it does not regularise; cf. nanoGPT)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier per step: linear ramp to 1 over ``warmup_steps``, then cosine to 0."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0,
                sampler: Sampler | None = None) -> DataLoader:
    """num_workers=0: the data is tiny and decoded once; worker processes would only add startup
    time and fight the training threads for 2 cores.

    A dataset's own ``collate`` (if any) makes its batches, and its ``batch_sampler`` (if any)
    picks them when shuffling: texts are padded per batch, so batches of similar lengths cost
    a fraction of random ones. A ``sampler`` (a rank's shard, see ``distributed``) replaces
    both shuffling and grouping."""
    collate = getattr(dataset, "collate", None)
    if sampler is not None:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0,
                          collate_fn=collate)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    grouped = getattr(dataset, "batch_sampler", None)
    if shuffle and grouped is not None:
        return DataLoader(dataset, batch_sampler=grouped(batch_size, generator),
                          collate_fn=collate, num_workers=0)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=0, collate_fn=collate)


def _to_device(x: torch.Tensor | tuple[torch.Tensor, ...], device: torch.device
               ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in x) if isinstance(x, (tuple, list)) else x.to(device)


def forward(model: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``model(x)`` for one input tensor, ``model(*x)`` for several (ids and mask)."""
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``loader`` (eval mode: no dropout, BN running stats)."""
    model.eval()
    device = next(model.parameters()).device
    total_loss, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = _to_device(x, device), y.to(device)
        logits, _ = forward(model, x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(dim=1) == y).sum().item()
        count += len(y)
    return total_loss / max(1, count), correct / max(1, count)


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    label_smoothing: float = 0.0,
    desc: str = "",
    progress: bool = True,
    class_weights: torch.Tensor | None = None,
    loss_fn: LossFn | None = None,
    amp: MixedPrecision | None = None,
    perturb: Callable[[Any, torch.Tensor], tuple[Any, torch.Tensor]] | None = None,
) -> float:
    """One pass over ``loader``; the scheduler steps per batch. Returns the mean training loss.

    ``loss_fn(logits, y)`` is the training loss (``losses.make_loss``; default: cross-entropy
    with ``label_smoothing`` and ``class_weights``, one per class, if given). ``amp`` runs the
    forward pass under autocast (``precision``); the loss is computed in float32 outside it.
    ``perturb(x, y) -> (x, y)`` rewrites each batch first (adversarial training adds FGSM
    examples: ``adversarial.FGSMTraining``)."""
    model.train()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    # disable=None: tqdm hides itself when stderr is not a terminal, so logs and CI stay readable.
    bar = tqdm(loader, desc=desc, leave=False, disable=None if progress else True, dynamic_ncols=True)
    if loss_fn is None:
        loss_fn = make_loss("ce", class_weights=class_weights, label_smoothing=label_smoothing)
    amp = amp or MixedPrecision("32", device)
    for x, y in bar:
        x, y = _to_device(x, device), y.to(device)
        if perturb is not None:
            x, y = perturb(x, y)
        with amp.autocast():
            logits, _ = forward(model, x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        amp.step(loss, optimizer)
        scheduler.step()
        total += loss.item() * len(y)
        count += len(y)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return total / max(1, count)


def training_loss(cfg: LoopConfig, train_set: Dataset,
                  class_weights: torch.Tensor | None = None) -> LossFn:
    """The loss ``cfg.loss`` names (``ce`` for a config without one). weighted-ce without
    ``class_weights`` takes balanced weights from the training labels, over the model's classes
    (the logits' width, known at the first batch)."""
    kind = getattr(cfg, "loss", None) or "ce"
    options = {"label_smoothing": cfg.label_smoothing,
               "focal_gamma": getattr(cfg, "focal_gamma", DEFAULT_FOCAL_GAMMA)}
    if kind != "weighted-ce" or class_weights is not None:
        return make_loss(kind, class_weights=class_weights, **options)
    labels = dataset_labels(train_set)
    built: list[LossFn] = []

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not built:
            weights = balanced_class_weights(labels, logits.shape[1])
            built.append(make_loss(kind, class_weights=weights, **options))
        return built[0](logits, y)

    return loss


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """The labels of a training set: its ``labels`` (image and text datasets) or the last
    tensor of a ``TensorDataset`` (cached sentence embeddings)."""
    labels = getattr(dataset, "labels", None)
    if labels is None and hasattr(dataset, "tensors"):
        labels = dataset.tensors[-1]
    if labels is None:
        raise ValueError(f"{type(dataset).__name__} has no labels to weight the classes by")
    return torch.as_tensor(labels, dtype=torch.long)


def fit(model: nn.Module, train_set: Dataset, val_set: Dataset, cfg: LoopConfig,
        class_weights: torch.Tensor | None = None,
        perturb: Callable[[nn.Module, Any, torch.Tensor], tuple[Any, torch.Tensor]] | None = None,
        ) -> FitResult:
    """Train ``model`` with early stopping on validation loss; returns the best epoch's model.
    Early stopping watches from ``cfg.early_stop_from`` of the epochs on (``early_stop_start``).

    The training loss is ``cfg.loss`` (``losses``: ce, weighted-ce, focal with
    ``cfg.focal_gamma``); ``class_weights`` override weighted-ce's balanced weights (and weight
    plain ce, for older callers). Validation loss (early stopping) and accuracy stay unweighted
    cross-entropy, comparable across losses. ``cfg.precision`` (``precision``: 32, bf16,
    16-mixed) sets autocast for the training forward pass; weights stay float32 and validation
    runs in float32.

    Under torchrun (see ``distributed``) each rank trains on its shard with its share of the
    global batch; the figures logged and returned are averaged across ranks."""
    shard = distributed.sampler(train_set, cfg.seed)
    train_loader = make_loader(train_set, distributed.per_rank_batch(cfg.batch_size),
                               shuffle=True, seed=cfg.seed, sampler=shard)
    val_loader = make_loader(val_set, 256, shuffle=False)
    trained = distributed.wrap(model)  # ``model`` itself in a single process
    if distributed.active():
        torch.manual_seed(cfg.seed + distributed.rank())  # same init, different dropout masks
    steps_per_epoch = len(train_loader)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    schedule = warmup_cosine(round(cfg.warmup_epochs * steps_per_epoch),
                             cfg.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loss_fn = training_loss(cfg, train_set, class_weights)
    amp = MixedPrecision(getattr(cfg, "precision", "32"), next(model.parameters()).device)

    history: list[dict[str, float]] = []
    best = {"loss": math.inf, "epoch": 0, "accuracy": 0.0, "state": None}
    watch_from = early_stop_start(getattr(cfg, "early_stop_from", 0.0), cfg.epochs)
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)  # fresh (but seeded) augmentations each epoch
        if shard is not None:
            shard.set_epoch(epoch)  # a new (seeded) shuffle and split across ranks each epoch
        train_loss = train_epoch(trained, train_loader, optimizer, scheduler, cfg.label_smoothing,
                                 desc=f"epoch {epoch}/{cfg.epochs}",
                                 progress=cfg.progress and distributed.is_main(),
                                 loss_fn=loss_fn, amp=amp,
                                 perturb=None if perturb is None else partial(perturb, model))
        distributed.sync_buffers(model)
        val_loss, val_acc = evaluate(model, val_loader)
        # Averaged, so every rank takes the same early-stopping branch below.
        train_loss, val_loss, val_acc = distributed.all_reduce_mean(train_loss, val_loss, val_acc)
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            raise RuntimeError(f"training diverged at epoch {epoch} (loss {train_loss}, "
                               f"val loss {val_loss}); lower --lr")
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
               "val_accuracy": val_acc, "lr": lr, "seconds": time.perf_counter() - t0}
        history.append(row)
        log.info("epoch %3d/%d  train_loss %.4f  val_loss %.4f  val_acc %.4f  lr %.2e  %.1fs",
                 epoch, cfg.epochs, train_loss, val_loss, val_acc, lr, row["seconds"])
        if epoch < watch_from:
            continue
        if val_loss < best["loss"]:
            best = {"loss": val_loss, "epoch": epoch, "accuracy": val_acc,
                    "state": copy.deepcopy(model.state_dict())}
        elif epoch - best["epoch"] >= cfg.patience and epoch < cfg.epochs:
            log.info("early stop: no val_loss improvement for %d epochs (best epoch %d)",
                     cfg.patience, best["epoch"])
            break

    model.load_state_dict(best["state"])
    model.eval()
    return FitResult(
        model=model, history=history, best_epoch=int(best["epoch"]), val_loss=float(best["loss"]),
        val_accuracy=float(best["accuracy"]), epochs_run=len(history),
        train_seconds=time.perf_counter() - start, stopped_early=len(history) < cfg.epochs,
    )


def early_stop_start(share: float, epochs: int) -> int:
    """The first epoch early stopping watches: its best epoch and its patience count from there
    (``share`` of ``epochs``, at least the first). Before it, no epoch is kept as the best and
    none ends the run, so a lucky val loss while the LR is still high cannot stop the schedule
    half done (Keras' ``start_from_epoch``)."""
    return min(epochs, max(1, math.ceil(share * epochs)))


def plot_curves(history: list[dict[str, float]], path: str | Path) -> Path:
    """Loss and accuracy per epoch as a PNG. Uses the Agg canvas directly: no pyplot, no GUI
    backend, no global matplotlib state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], label="val", color="tab:orange")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="validation accuracy")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
