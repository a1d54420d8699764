"""One config object per text training run: built from the CLI, validated, logged, saved in the
artifact. Defaults that differ by model (learning rate, epochs) are filled in at construction."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from preprocessing.spec import NORMALIZATION_FORMS

from ..config import DEFAULT_LOSS, add_loss_and_precision_args, recipe_checks
from ..losses import DEFAULT_FOCAL_GAMMA

DEMO = "demo"
MODELS = ("transformer", "minilm")
DATA_SUFFIXES = (".csv", ".tsv", ".jsonl")

# (lr, epochs, patience) per model and mode, measured on the demo data on 2 CPU cores: the
# from-scratch transformer wants a high LR; a frozen MiniLM trains only its head (on cached
# sentence embeddings, so epochs are nearly free); fine-tuning all of MiniLM wants a small LR
# and few epochs (each one is a full forward + backward through 22M parameters).
_DEFAULTS = {
    "transformer": (1e-3, 20, 4),
    "minilm-frozen": (2e-3, 60, 8),
    "minilm-fine-tune": (5e-5, 3, 2),
}


@dataclass(frozen=True)
class TextTrainConfig:
    """A text training run. ``data`` is ``"demo"`` (generated language identification) or a
    ``.csv``, ``.tsv`` or ``.jsonl`` file with ``text_column`` and ``label_column``."""

    model: str = "transformer"
    data: str = DEMO
    text_column: str = "text"
    label_column: str = "label"
    model_name: str = ""  # default lang-<model> for the demo data, text-<model> otherwise
    demo_per_class: int = 400
    # Preprocessing spec (written into the artifact as spec.json).
    max_length: int = 128
    normalization: str = "NFC"
    lowercase: bool = True
    max_chars: int = 10_000
    # The from-scratch transformer and its tokenizer.
    vocab_size: int = 8000
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    ff_dim: int = 256
    # MiniLM: train only the head (frozen encoder) or everything.
    freeze: bool = True
    # Optimisation; None picks the model's default (see _DEFAULTS).
    dropout: float = 0.1
    epochs: int | None = None
    batch_size: int = 32
    lr: float | None = None
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    patience: int | None = None
    # From the first epoch: the text models' val loss is smooth, and the from-scratch
    # transformer overfits within a few epochs (best epoch 5 of 20 on the demo data), so a later
    # start would only cost epochs (training/config.py says when it pays).
    early_stop_from: float = 0.0
    # Training loss (training/losses.py); None: DEFAULT_LOSS, or weighted-ce with class_weights.
    loss: str | None = None
    focal_gamma: float = DEFAULT_FOCAL_GAMMA
    # Deprecated alias of loss="weighted-ce" (the --class-weights flag); kept as given.
    class_weights: bool = False
    precision: str = "32"
    # Text augmentation (training split, the from-scratch transformer and a fine-tuned MiniLM;
    # a frozen MiniLM trains on cached embeddings): the share of training texts a random
    # variation of the robustness suite (training/robustness.py) replaces each epoch; 0: off.
    augment: float = 0.0
    # Data split and reproducibility.
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    limit: int | None = None
    seed: int = 0
    out_dir: str | None = None
    device: str = "cpu"
    num_threads: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        lr, epochs, patience = _DEFAULTS[self.mode]
        for name, value in (("lr", lr), ("epochs", epochs), ("patience", patience)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.class_weights and self.loss not in (None, "weighted-ce"):
            raise ValueError(f"--class-weights is --loss weighted-ce; it contradicts "
                             f"--loss {self.loss}")
        if self.loss is None:
            object.__setattr__(self, "loss", "weighted-ce" if self.class_weights else DEFAULT_LOSS)
        if not self.model_name:
            prefix = "lang" if self.data == DEMO else "text"
            object.__setattr__(self, "model_name", f"{prefix}-{self.model}")
        self._validate()

    @property
    def mode(self) -> str:
        """``transformer``, ``minilm-frozen`` or ``minilm-fine-tune``."""
        if self.model == "transformer":
            return "transformer"
        return "minilm-frozen" if self.freeze else "minilm-fine-tune"

    def _validate(self) -> None:
        checks = [
            *recipe_checks(self),
            (self.limit is None or self.limit >= 20, "limit must be at least 20 texts"),
            (0 <= self.augment <= 1, f"augment must be in [0, 1], got {self.augment}"),
            (self.demo_per_class >= 10, "demo_per_class must be at least 10"),
            (3 <= self.max_length <= 512, f"max_length must be in 3..512, got {self.max_length}"),
            (self.normalization in NORMALIZATION_FORMS,
             f"normalization must be one of {NORMALIZATION_FORMS}"),
            (self.max_chars >= 1, "max_chars must be positive"),
            (self.vocab_size >= 100, f"vocab_size must be >= 100, got {self.vocab_size}"),
            (self.d_model % self.heads == 0, "d_model must be a multiple of heads"),
            (min(self.d_model, self.layers, self.heads, self.ff_dim) >= 1,
             "d_model, layers, heads and ff_dim must be positive"),
            (bool(self.text_column) and bool(self.label_column)
             and self.text_column != self.label_column,
             "text_column and label_column must be two different, non-empty names"),
            (self.lowercase or self.model != "minilm",
             "MiniLM's vocabulary is lowercase: --cased is for the transformer only"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.data != DEMO:
            path = Path(self.data)
            if path.suffix.lower() not in DATA_SUFFIXES or not path.is_file():
                raise ValueError(f"--data must be 'demo' or an existing {'/'.join(DATA_SUFFIXES)} "
                                 f"file, got {self.data!r}")

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path("artifacts") / self.model_name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=str)


def build_parser() -> argparse.ArgumentParser:
    d = TextTrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m training.text",
        description="Train a text classifier (small transformer from scratch, or MiniLM with a "
        "head), export it to ONNX (parity-checked) and save it into BentoML's model store.")
    p.add_argument("--model", choices=MODELS, default=d.model)
    p.add_argument("--data", default=d.data,
                   help="'demo' (generated language identification) or a .csv/.tsv/.jsonl file")
    p.add_argument("--text-column", default=d.text_column)
    p.add_argument("--label-column", default=d.label_column)
    p.add_argument("--model-name", default="",
                   help="model store name (default lang-<model> for the demo, text-<model>)")
    p.add_argument("--demo-per-class", type=int, default=d.demo_per_class)
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help="tokens per text, special tokens included")
    p.add_argument("--normalization", choices=NORMALIZATION_FORMS, default=d.normalization)
    p.add_argument("--cased", dest="lowercase", action="store_false",
                   help="keep case (the transformer only; MiniLM's vocabulary is lowercase)")
    p.add_argument("--max-chars", type=int, default=d.max_chars)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--ff-dim", type=int, default=d.ff_dim)
    freeze = p.add_mutually_exclusive_group()
    freeze.add_argument("--freeze", dest="freeze", action="store_true", default=True,
                        help="MiniLM: train the head only (default)")
    freeze.add_argument("--fine-tune", dest="freeze", action="store_false",
                        help="MiniLM: train the encoder too (minutes per epoch on 2 cores)")
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--epochs", type=int, default=None, help="maximum (default per model)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per model)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--early-stop-from", type=float, default=d.early_stop_from, metavar="F",
                   help="early stopping (and the best epoch) counts from this share of the "
                   "epochs on (default 0: from the first)")
    add_loss_and_precision_args(p, None, d.focal_gamma, d.precision)
    p.add_argument("--class-weights", action="store_true",
                   help="deprecated: the same as --loss weighted-ce")
    p.add_argument("--augment", type=float, default=d.augment, metavar="P",
                   help="share of training texts replaced each epoch by a random variation "
                   "(casing, typos, accents, whitespace, punctuation, truncation); default 0")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--test-fraction", type=float, default=d.test_fraction)
    p.add_argument("--limit", type=int, default=None, help="use a stratified subset of N texts")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out-dir", default=None, help="curves and logs (default artifacts/<name>)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--num-threads", type=int, default=d.num_threads)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def config_from_args(argv: Sequence[str] | None = None) -> TextTrainConfig:
    """Parse the CLI into a validated config; a bad value exits with argparse's message."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    if args["class_weights"]:
        print("warning: --class-weights is deprecated; use --loss weighted-ce", file=sys.stderr)
    try:
        return TextTrainConfig(**args)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
