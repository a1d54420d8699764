"""Imbalanced labels: plain cross-entropy vs class-weighted cross-entropy vs focal loss.

    .venv/bin/python -m tools.imbalance_report                  # both parts, seed 0
    .venv/bin/python -m tools.imbalance_report --seeds 0 1 --json imbalance.json
    .venv/bin/python -m tools.imbalance_report --part digits    # or: --part sms

Two imbalances, each trained once per loss with the same seed, data and recipe:

a. planted: scikit-learn's digits with classes 5-9 cut to 10% of their examples in the training
   and validation splits (about 12 training images each against 124 for 0-4). The test split is
   left whole (about 27 per class), so every class's recall is measured on enough examples;
   macro-F1 on it weighs every class the same.
b. real: the SMS Spam Collection (``../shared/data/sms-spam/sms_spam.tsv``, 13% spam) with the
   small from-scratch text transformer (``python -m training.text``'s ``train``).

The recipe is the default one, made smaller to stay quick: a narrower CNN (12/24/48 channels)
with batch 32 (the thinned training split is small), up to 20 epochs with early stopping; a
small transformer (64 wide, 1 layer, 6 epochs). The whole report (one seed) takes about a
minute on 2 idle CPU cores. Same seed, same figures: rerunning it reproduces the table.
Per-class recall, macro-F1, the minority classes' recall and accuracy (test split) are printed per loss.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SMS = ROOT.parent / "shared" / "data" / "sms-spam" / "sms_spam.tsv"
LOSSES = ("ce", "weighted-ce", "focal")
CUT_CLASSES = ("5", "6", "7", "8", "9")
KEEP = 0.10


def planted_splits(seed: int, cut: Sequence[str] = CUT_CLASSES, keep: float = KEEP):
    """The digits' usual split with ``cut`` classes thinned to ``keep`` of their examples in
    train and val (seeded, at least 2 kept per split); test untouched."""
    from training.data import Splits, digits_images, stratified_split

    splits = stratified_split(digits_images(), seed, 0.15, 0.15)
    rng = np.random.default_rng(seed)
    cut_ids = {splits.train.classes.index(c) for c in cut}

    def thin(part):
        labels = np.asarray(part.labels)
        keep_idx = []
        for k in range(len(part.classes)):
            idx = np.flatnonzero(labels == k)
            if k in cut_ids:
                idx = np.sort(rng.choice(idx, max(2, round(keep * len(idx))), replace=False))
            keep_idx.extend(idx.tolist())
        return part.subset(sorted(keep_idx))

    return Splits(thin(splits.train), thin(splits.val), splits.test)


def run_digits(loss: str, seed: int, gamma: float, precision: str = "32") -> dict[str, Any]:
    """Train the small digits CNN on the planted imbalance; the test split's figures."""
    from training.config import TrainConfig
    from training.loop import evaluate, fit, make_loader, seed_everything
    from training.losses import balanced_class_weights
    from training.metrics import test_report
    from training.models import CNNConfig, build_model
    from training.train import build_datasets

    cfg = TrainConfig(epochs=20, batch_size=32, widths=(12, 24, 48), embedding_dim=48,
                      seed=seed, loss=loss, focal_gamma=gamma, precision=precision,
                      progress=False)
    seed_everything(cfg.seed, cfg.num_threads)
    splits = planted_splits(seed)
    train_set, val_set, test_set = build_datasets(splits, cfg.image_spec(), cfg)
    classes = splits.train.classes
    model = build_model(CNNConfig(in_channels=1, num_classes=len(classes), widths=cfg.widths,
                                  dropout=cfg.dropout, embedding_dim=cfg.embedding_dim))
    weights = (balanced_class_weights(splits.train.labels, len(classes))
               if loss == "weighted-ce" else None)
    start = time.perf_counter()
    result = fit(model, train_set, val_set, cfg, class_weights=weights)
    loader = make_loader(test_set, 256, shuffle=False)
    _, accuracy = evaluate(result.model, loader)
    report = test_report(result.model, loader, classes)
    return _row("digits", loss, seed, accuracy, report, CUT_CLASSES,
                time.perf_counter() - start, len(splits.train))


def run_sms(loss: str, seed: int, gamma: float, path: Path = SMS) -> dict[str, Any]:
    """Train the small text transformer on the SMS spam data; the test split's figures."""
    from training.text.config import TextTrainConfig
    from training.text.train import train

    cfg = TextTrainConfig(model="transformer", data=str(path), text_column="SMS",
                          label_column="Label", vocab_size=2000, d_model=64, layers=1, heads=2,
                          ff_dim=128, max_length=64, epochs=6, patience=6, seed=seed, loss=loss,
                          focal_gamma=gamma, progress=False)
    start = time.perf_counter()
    result = train(cfg)
    metrics = result.metrics()
    report = {"per_class": metrics["per_class"], "macro_f1": metrics["macro_f1"]}
    return _row("sms-spam", loss, seed, result.test_accuracy, report, ("spam",),
                time.perf_counter() - start, len(result.splits.train))


def _row(part: str, loss: str, seed: int, accuracy: float, report: dict[str, Any],
         minority: Sequence[str], seconds: float, n_train: int) -> dict[str, Any]:
    recall = {c: v["recall"] for c, v in report["per_class"].items()}
    return {"part": part, "loss": loss, "seed": seed, "accuracy": accuracy,
            "macro_f1": report["macro_f1"], "recall": recall,
            "minority_recall": float(np.mean([recall[c] for c in minority])),
            "per_class": report["per_class"], "seconds": round(seconds, 1), "n_train": n_train}


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A markdown table per part: one line per (loss, seed)."""
    out = []
    for part in dict.fromkeys(r["part"] for r in rows):
        part_rows = [r for r in rows if r["part"] == part]
        classes = list(part_rows[0]["recall"])
        head = ["loss", "seed", *[f"recall {c}" for c in classes], "minority recall",
                "macro-F1", "accuracy", "s"]
        out += [f"{part} (train n={part_rows[0]['n_train']})",
                "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for r in part_rows:
            cells = [r["loss"], str(r["seed"]), *[f"{r['recall'][c]:.3f}" for c in classes],
                     f"{r['minority_recall']:.3f}", f"{r['macro_f1']:.3f}",
                     f"{r['accuracy']:.3f}", f"{r['seconds']:.0f}"]
            out.append("| " + " | ".join(cells) + " |")
        if len({r["seed"] for r in part_rows}) > 1:
            for loss in dict.fromkeys(r["loss"] for r in part_rows):
                mine = [r for r in part_rows if r["loss"] == loss]
                out.append(f"  mean {loss:<12} minority recall "
                           f"{np.mean([r['minority_recall'] for r in mine]):.3f}  macro-F1 "
                           f"{np.mean([r['macro_f1'] for r in mine]):.3f}")
        out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.imbalance_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "digits", "sms"), default="all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--focal-gamma", type=float, default=2.0)
    p.add_argument("--sms", type=Path, default=SMS, help="the SMS spam TSV (Label, SMS)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    logging.getLogger("training").setLevel(logging.WARNING)
    rows = []
    for part in (("digits", "sms") if args.part == "all" else (args.part,)):
        if part == "sms" and not args.sms.is_file():
            print(f"skipping sms: {args.sms} not found", file=sys.stderr)
            continue
        for seed in args.seeds:
            for loss in args.losses:
                row = (run_digits(loss, seed, args.focal_gamma) if part == "digits"
                       else run_sms(loss, seed, args.focal_gamma, args.sms))
                print(f"{part} {loss} seed {seed}: minority recall {row['minority_recall']:.3f} "
                      f"macro-F1 {row['macro_f1']:.3f} ({row['seconds']:.0f}s)",
                      file=sys.stderr, flush=True)
                rows.append(row)
    print(format_rows(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
