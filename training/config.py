"""One config object per training run: built from the CLI, validated, logged, saved in the
artifact."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from preprocessing import ImageSpec
from preprocessing.spec import COLOR_MODES, INTERPOLATIONS, RESIZE_RULES

from .losses import DEFAULT_FOCAL_GAMMA, LOSSES
from .precision import PRECISIONS, precision_error

DIGITS = "digits"
# The training loss both commands default to: class-weighted cross-entropy (training/losses.py).
# Chosen with tools/imbalance_report.py (plain CE, weighted CE and focal loss with gamma 2, the
# same seed per comparison, three seeds): on a planted imbalance (digits, five classes cut to a
# tenth) plain CE and focal loss all but never predicted the rare classes while weighted CE
# recovered most of them and had by far the best macro-F1, with every seed; on a real one (SMS
# spam, 13% spam) weighted CE had the best spam recall and macro-F1 too, by a small margin. On
# balanced data the balanced weights are all 1 (about 1 on nearly balanced data such as the
# digits), so it changes little or nothing there.
DEFAULT_LOSS = "weighted-ce"


@dataclass(frozen=True)
class TrainConfig:
    """A training run. ``data`` is ``"digits"`` (scikit-learn's built-in digits) or a folder path
    holding one sub-folder of images per class."""

    data: str = DIGITS
    model_name: str = "digits-cnn"
    # Input spec: what the model sees; written into the artifact as spec.json.
    height: int = 32
    width: int = 32
    color_mode: str = "L"
    resize: str = "stretch"
    interpolation: str = "bilinear"
    # Model.
    widths: tuple[int, ...] = (16, 32, 64)
    embedding_dim: int = 128
    dropout: float = 0.1
    # Optimisation.
    # 40 epochs, patience 10: the robustness augmentation below makes the task harder and
    # convergence slower (measured on digits: 20 epochs left test accuracy at 97-98%).
    epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.0
    patience: int = 10
    # Early stopping watches from this share of the epochs on (``fit``): a CNN with batch norm
    # and heavy augmentation has a noisy val loss while the LR is high, and a lucky epoch there
    # (the demo's retraining: val loss 0.058 at epoch 16 of 40, 0.25 the next) ended a run with
    # the schedule half done and restored that epoch's weights (held-out accuracy 0.960, against
    # 0.984 watching from epoch 20; README, Training).
    early_stop_from: float = 0.5
    # Training loss (training/losses.py) and mixed precision (training/precision.py).
    loss: str = DEFAULT_LOSS
    focal_gamma: float = DEFAULT_FOCAL_GAMMA
    precision: str = "32"
    # Augmentation (training split only). Flips are off by default: a mirrored digit is another
    # symbol (or no symbol), so a flip would teach the model the wrong label.
    augment: bool = True
    flip: bool = False
    # Robustness (training/robustness.py): the affine move's range, and each variation family of
    # the robustness suite (resampling, brightness/contrast, polarity, noise, JPEG) drawn per
    # training image with probability robust_augment (0: the affine move only). invert: an
    # inverted-polarity input is valid (augmented and measured); None: yes for grayscale (L),
    # no for RGB.
    robust_augment: float = 0.3
    max_rotate: float = 12.0
    max_translate: float = 0.1
    invert: bool | None = None
    # FGSM adversarial training (training/adversarial.py) at this eps in pixel scale [0, 1]; 0: off.
    adversarial_training: float = 0.0
    # Data split and reproducibility.
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    limit: int | None = None
    seed: int = 0
    # Where curves and logs go; default artifacts/<model_name>/.
    out_dir: str | None = None
    device: str = "cpu"
    num_threads: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        self._validate()

    def _validate(self) -> None:
        checks = [
            *recipe_checks(self),
            (self.limit is None or self.limit >= 20, "limit must be at least 20 images"),
            (0 <= self.robust_augment <= 1, "robust_augment must be in [0, 1]"),
            (0 <= self.max_rotate <= 180 and 0 <= self.max_translate < 0.5,
             "max_rotate must be in [0, 180] degrees and max_translate in [0, 0.5)"),
            (0 <= self.adversarial_training < 1,
             "adversarial_training is an eps in pixel scale: in [0, 1) (e.g. 0.03 = 8/255)"),
            (self.color_mode in COLOR_MODES, f"color_mode must be one of {sorted(COLOR_MODES)}"),
            (self.resize in RESIZE_RULES, f"resize must be one of {RESIZE_RULES}"),
            (self.interpolation in INTERPOLATIONS,
             f"interpolation must be one of {INTERPOLATIONS}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.data != DIGITS and not Path(self.data).is_dir():
            raise ValueError(f"--data must be 'digits' or an existing folder, got {self.data!r}")

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path("artifacts") / self.model_name

    @property
    def polarity_varies(self) -> bool:
        """Inverted-polarity inputs are valid: ``invert``, or by default a grayscale model."""
        return self.color_mode == "L" if self.invert is None else self.invert

    def image_spec(self) -> ImageSpec:
        """The preprocessing spec the model is trained with (and served with)."""
        channels = COLOR_MODES[self.color_mode]
        return ImageSpec(
            height=self.height,
            width=self.width,
            color_mode=self.color_mode,
            resize=self.resize,
            interpolation=self.interpolation,
            mean=(0.5,) * channels,
            std=(0.5,) * channels,
            jpeg_draft=True,  # large JPEGs decoded at a fraction of their size (ImageSpec)
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=str)


def recipe_checks(cfg: Any) -> list[tuple[bool, str]]:
    """The checks every training command's config shares (optimiser, schedule, split, run)."""
    precision_problem = precision_error(cfg.precision, cfg.device)
    return [
        (cfg.loss in LOSSES, f"loss must be one of {LOSSES}, got {cfg.loss!r}"),
        (cfg.focal_gamma >= 0, f"focal_gamma must be >= 0, got {cfg.focal_gamma}"),
        (precision_problem is None, precision_problem or ""),
        (cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.lr > 0, f"lr must be positive, got {cfg.lr}"),
        (cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {cfg.warmup_epochs}"),
        (cfg.patience >= 1, f"patience must be >= 1, got {cfg.patience}"),
        (0 <= cfg.early_stop_from <= 1,
         f"early_stop_from must be in [0, 1], got {cfg.early_stop_from}"),
        (0 <= cfg.dropout < 1, f"dropout must be in [0, 1), got {cfg.dropout}"),
        (0 <= cfg.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
        (0 < cfg.val_fraction < 1 and 0 < cfg.test_fraction < 1
         and cfg.val_fraction + cfg.test_fraction < 1,
         "val_fraction and test_fraction must be in (0, 1) and sum to less than 1"),
        (cfg.num_threads >= 1, "num_threads must be >= 1"),
        (cfg.seed >= 0, f"seed must be >= 0, got {cfg.seed}"),
        (bool(cfg.model_name) and "/" not in cfg.model_name and ":" not in cfg.model_name,
         f"model_name must be a plain name, got {cfg.model_name!r}"),
    ]


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m training",
        description="Train an image classifier, export it to ONNX (parity-checked) and save it "
        "into BentoML's model store.",
    )
    p.add_argument("--data", default=d.data,
                   help="'digits' (built-in) or a folder with one sub-folder of images per class")
    p.add_argument("--model-name", default=d.model_name)
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--color-mode", choices=sorted(COLOR_MODES), default=None,
                   help="default: L for digits, RGB for a folder")
    p.add_argument("--resize", choices=RESIZE_RULES, default=d.resize)
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default=d.interpolation)
    p.add_argument("--widths", type=_int_tuple, default=d.widths,
                   help="channels per residual stage, comma separated (default 16,32,64)")
    p.add_argument("--embedding-dim", type=int, default=d.embedding_dim)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help="maximum; early stopping may end sooner")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--early-stop-from", type=float, default=d.early_stop_from, metavar="F",
                   help="early stopping (and the best epoch) counts from this share of the "
                   f"epochs on; 0: from the first (default {d.early_stop_from})")
    add_loss_and_precision_args(p, d.loss, d.focal_gamma, d.precision)
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--flip", action="store_true", help="random horizontal flips (not for digits)")
    p.add_argument("--robust-augment", type=float, default=d.robust_augment, metavar="P",
                   help="probability per training image of each robustness variation family "
                   "(resampling, brightness/contrast, polarity, noise, JPEG); 0: affine only "
                   f"(default {d.robust_augment})")
    p.add_argument("--max-rotate", type=float, default=d.max_rotate,
                   help=f"augmentation's rotation range in degrees (default {d.max_rotate})")
    p.add_argument("--max-translate", type=float, default=d.max_translate,
                   help="augmentation's shift range, a fraction of the side "
                   f"(default {d.max_translate})")
    p.add_argument("--invert", action=argparse.BooleanOptionalAction, default=None,
                   help="inverted polarity is a valid input: augment with it and measure it "
                   "(default: yes for grayscale, no for RGB)")
    p.add_argument("--adversarial-training", type=float, default=d.adversarial_training,
                   metavar="EPS", help="mix FGSM examples at EPS (pixel scale [0, 1], e.g. "
                   "0.0314 = 8/255) into every training batch; 0: off")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--test-fraction", type=float, default=d.test_fraction)
    p.add_argument("--limit", type=int, default=None, help="use a stratified subset of N images")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out-dir", default=None,
                   help="curves and logs (default artifacts/<model-name>)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--num-threads", type=int, default=d.num_threads)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def add_loss_and_precision_args(p: argparse.ArgumentParser, loss: str | None,
                                focal_gamma: float, precision: str) -> None:
    """``--loss``, ``--focal-gamma`` and ``--precision``, the same on both commands."""
    p.add_argument("--loss", choices=LOSSES, default=loss,
                   help=f"training loss: cross-entropy, class-weighted cross-entropy (balanced "
                   f"weights) or focal loss (default {loss or DEFAULT_LOSS})")
    p.add_argument("--focal-gamma", type=float, default=focal_gamma,
                   help="focal loss's gamma: how much confidently right examples are "
                   "down-weighted (0 = cross-entropy)")
    p.add_argument("--precision", choices=PRECISIONS, default=precision,
                   help="32: float32; bf16: bfloat16 autocast (CPU or CUDA); 16-mixed: float16 "
                   "autocast with a gradient scaler (CUDA only). Weights stay float32 and the "
                   "export is from float32.")


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None


def config_from_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse the CLI into a validated TrainConfig; a bad value exits with argparse's message."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    if args["color_mode"] is None:
        args["color_mode"] = "L" if args["data"] == DIGITS else "RGB"
    try:
        return TrainConfig(**args)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
