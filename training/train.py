"""The training command: data -> split -> fit -> test -> export -> model store.

``python -m training --help`` lists the options. ``train(cfg)`` is the part without export, for
tests and notebooks; ``train_and_export(cfg)`` is what the CLI, the demo and retraining call.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from modelstore.layout import CURVES_FILE, EXPORT_FILE, METRICS_FILE
from modelstore.registry import version_path
from preprocessing import ImageSpec

from . import cli, distributed
from .adversarial import FGSMTraining
from .augment import Augment
from .config import TrainConfig, config_from_args
from .data import (DataError, ImageDataset, Splits, data_hash, load_images, stratified_split,
                   stratified_subset)
from .export import PARITY_TOLERANCE, ExportError, build_manifest, export_to_store
from .losses import balanced_class_weights
from .loop import FitResult, evaluate, fit, make_loader, plot_curves, seed_everything
from .metrics import per_class_line, test_report
from .models import CNNConfig, build_model, count_parameters
from .robust_metrics import summary_line
from .robustness import image_variation_names

if TYPE_CHECKING:
    import bentoml

    from modelstore import ModelStore

log = logging.getLogger("training")


@dataclass
class TrainResult:
    """A trained model and everything the export needs to describe it."""

    config: TrainConfig
    model_config: CNNConfig
    spec: ImageSpec
    classes: tuple[str, ...]
    fit: FitResult
    test_loss: float
    test_accuracy: float
    data_hash: str
    splits: Splits
    # Per-class precision/recall/F1 and macro-F1 on the test split (``metrics.test_report``);
    # computed on first use when a caller (retraining) built the result without it.
    report: dict[str, Any] | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.fit.model

    def metrics(self) -> dict[str, Any]:
        """metrics.json: the fields the service and the promotion step read, and the test
        split's ``per_class`` figures and ``macro_f1``."""
        if self.report is None:
            test_set = ImageDataset(self.splits.test, self.spec)
            self.report = test_report(self.model, make_loader(test_set, 256, shuffle=False),
                                      self.classes)
        return {**self.fit.metrics(self.test_loss, self.test_accuracy, self.splits),
                **self.report}


def prepare_splits(cfg: TrainConfig) -> tuple[Splits, str]:
    """Load the configured data, optionally subsample, split; returns the splits and data hash."""
    data = load_images(cfg.data)
    if cfg.limit is not None:
        data = stratified_subset(data, cfg.limit, cfg.seed)
    return stratified_split(data, cfg.seed, cfg.val_fraction, cfg.test_fraction), data_hash(data)


def build_datasets(splits: Splits, spec: ImageSpec, cfg: TrainConfig
                   ) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    """train/val/test datasets; only the training split is augmented."""
    augment = (Augment.robust(cfg.robust_augment, cfg.polarity_varies, flip=cfg.flip,
                              max_rotate_deg=cfg.max_rotate, max_translate=cfg.max_translate)
               if cfg.augment else None)
    return (ImageDataset(splits.train, spec, augment=augment, seed=cfg.seed),
            ImageDataset(splits.val, spec), ImageDataset(splits.test, spec))


def train(cfg: TrainConfig) -> TrainResult:
    """Train and test a model as ``cfg`` says (no export). Same cfg + data -> same metrics.

    Under torchrun every rank calls this (see ``distributed``); each gets the same result."""
    seed_everything(cfg.seed, distributed.threads_per_rank(cfg.num_threads))
    spec = cfg.image_spec()
    splits, digest = prepare_splits(cfg)
    train_set, val_set, test_set = build_datasets(splits, spec, cfg)
    log.info("data %s: %d classes, train/val/test = %d/%d/%d, hash %s", cfg.data,
             len(splits.train.classes), len(train_set), len(val_set), len(test_set), digest[:12])

    model_config = CNNConfig(in_channels=spec.channels, num_classes=len(splits.train.classes),
                             widths=cfg.widths, dropout=cfg.dropout,
                             embedding_dim=cfg.embedding_dim)
    model = build_model(model_config).to(distributed.device(cfg.device))
    log.info("model %s: %d parameters", model_config, count_parameters(model))
    weights = (balanced_class_weights(splits.train.labels, len(splits.train.classes))
               if cfg.loss == "weighted-ce" else None)
    perturb = (FGSMTraining(cfg.adversarial_training, spec, cfg.seed)
               if cfg.adversarial_training > 0 else None)
    result = fit(model, train_set, val_set, cfg, class_weights=weights, perturb=perturb)
    test_loader = make_loader(test_set, 256, shuffle=False)
    test_loss, test_acc = evaluate(result.model, test_loader)
    report = test_report(result.model, test_loader, splits.train.classes)
    log.info("best epoch %d: val_loss %.4f val_acc %.4f; test_acc %.4f macro-F1 %.4f; %.1fs",
             result.best_epoch, result.val_loss, result.val_accuracy, test_acc,
             report["macro_f1"], result.train_seconds)
    return TrainResult(cfg, model_config, spec, splits.train.classes, result, test_loss, test_acc,
                       digest, splits, report)


def export_result(result: TrainResult, curves: str | os.PathLike | None = None,
                  store: "ModelStore | None" = None,
                  tolerance: float = PARITY_TOLERANCE) -> "bentoml.Tag":
    """Save a trained result into the model store (ONNX + spec + reference profile + manifest)."""
    cfg = result.config
    manifest = build_manifest(seed=cfg.seed, data_hash=result.data_hash, data_source=cfg.data,
                              train_config=cfg.to_dict(),
                              model_config=result.model_config.to_dict())
    return export_to_store(
        result.model.cpu(), name=cfg.model_name, spec=result.spec, labels=result.classes,
        reference_blobs=result.splits.val.blobs, reference_labels=result.splits.val.labels,
        metrics=result.metrics(), manifest=manifest, curves=curves, tolerance=tolerance,
        store=store, test_blobs=result.splits.test.blobs, test_labels=result.splits.test.labels,
        variations=image_variation_names(cfg.color_mode, cfg.polarity_varies),
        train_blobs=result.splits.train.blobs, train_labels=result.splits.train.labels)


def train_and_export(cfg: TrainConfig, store: "ModelStore | None" = None
                     ) -> tuple[TrainResult, "bentoml.Tag | None"]:
    """The whole command: train, test, write curves/history to ``cfg.output_dir``, export, save.

    Under torchrun only rank 0 writes and exports; the other ranks get no tag (None)."""
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    result = train(cfg)
    if not distributed.is_main():
        return result, None
    curves = plot_curves(result.fit.history, out / CURVES_FILE)
    (out / METRICS_FILE).write_text(json.dumps(result.metrics(), indent=2) + "\n")
    tag = export_result(result, curves=curves, store=store)
    # The artifact's metrics.json adds the export's robustness and adversarial figures.
    exported = version_path(str(tag), store) / METRICS_FILE
    (out / METRICS_FILE).write_text(exported.read_text())
    return result, tag


def summary(result: TrainResult, tag: "bentoml.Tag", seconds: float) -> str:
    """The lines the CLI prints at the end, parity read back from the saved entry."""
    import bentoml

    export_info = json.loads(Path(bentoml.models.get(tag).path_of(EXPORT_FILE)).read_text())
    f = result.fit
    return "\n".join([
        f"test accuracy  {result.test_accuracy:.4f}  (val {f.val_accuracy:.4f}, best epoch "
        f"{f.best_epoch} of {f.epochs_run} run)",
        per_class_line(result.metrics()),
        f"train seconds  {f.train_seconds:.1f}  (whole command {seconds:.1f})",
        f"parity         max |ORT - torch| = {export_info['max_abs_diff']:.2e} "
        f"(tolerance {export_info['tolerance']:g}; {export_info['exporter']} exporter, "
        f"opset {export_info['opset']})",
        *filter(None, [summary_line(json.loads(
            Path(bentoml.models.get(tag).path_of(METRICS_FILE)).read_text()))]),
        f"saved          {tag}",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: ``python -m training [--data digits|PATH] [--epochs N] ...``, or the same
    under ``torchrun --nproc_per_node=N -m training ...`` (data-parallel, see ``distributed``)."""
    return cli.run(config_from_args(argv), train_and_export, summary,
                   (DataError, ExportError, distributed.DistributedError), distributed_ok=True)


if __name__ == "__main__":
    sys.exit(main())
