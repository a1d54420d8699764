"""ONNX export of a text classifier with dynamic batch *and* sequence axes, a parity check at
lengths the export never saw, and the artifact: the image contract plus ``tokenizer.json``.

Only torch's dynamo exporter is used: the legacy TorchScript exporter bakes the traced sequence
length into a transformer's graph (reshapes, position slices), so a model exported at length 17
would fail or silently misbehave at 40. Parity at other lengths is what proves the axis dynamic.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from modelstore.layout import METRICS_FILE, MODEL_FILE, TEXT_FILES, TOKENIZER_FILE
from modelstore.store import save_version
from preprocessing import TEXT_FEATURES, TextPreprocessor, text_features

from ..export import (ONNX_OPSET, OUTPUT_NAMES, PARITY_TOLERANCE, ExportError, _quiet_exporter,
                      check_export, checked_graph, log, ort_session, profile_arrays,
                      store_metadata, training_arrays, weights_digest, write_contract_files)

if TYPE_CHECKING:
    import bentoml
    import onnxruntime as ort

    from modelstore import ModelStore

INPUT_NAMES = ("input_ids", "attention_mask")
TEXT_CONTRACT_FILES = TEXT_FILES
PARITY_BATCHES = (1, 7, 32)
# The export traces one batch of this length; parity runs at other lengths (and the longest).
EXPORT_LENGTH = 17
PARITY_LENGTHS = (3, 9, 40)


def export_text_onnx(model: nn.Module, path: str | Path, max_length: int,
                     opset: int = ONNX_OPSET) -> None:
    """Write ``model`` (ids, mask -> logits, embedding) to one self-contained ONNX file with
    ``[batch, seq]`` inputs, both axes dynamic (seq up to ``max_length``)."""
    model.eval()
    # Batch 2 and a length that is neither 1 nor max_length: torch.export specialises size-1
    # dims, and a length equal to a model constant could be folded into one.
    length = min(EXPORT_LENGTH, max_length - 1)
    ids = torch.full((2, length), 5, dtype=torch.long)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length // 2:] = 0
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=max_length)
    try:
        with _quiet_exporter(), warnings.catch_warnings():
            # Both inputs share the "batch" and "seq" dims; the exporter notes it at every call.
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints")
            program = torch.onnx.export(
                model, (ids, mask), input_names=list(INPUT_NAMES),
                dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), opset_version=opset,
                dynamo=True, verbose=False)
    except Exception as exc:  # noqa: BLE001 - any exporter failure is an export failure
        raise ExportError(f"dynamo ONNX export failed: {exc}") from exc
    _name_outputs(program.model)
    program.save(str(path), external_data=False)  # weights inside model.onnx


def _name_outputs(model: Any) -> None:
    """Name the graph outputs ``logits`` and ``embedding``.

    Passing ``output_names`` to the exporter gives an invalid graph for these models ("Duplicate
    definition of name (embedding)"): the exporter already calls the output of each
    ``aten.embedding`` lookup ``embedding``. Rename those internal values first.
    """
    outputs = list(model.graph.outputs)
    taken = {v.name for v in outputs}
    for node in model.graph:
        for value in node.outputs:
            if value.name in OUTPUT_NAMES and value not in outputs:
                value.name = f"{value.name}_internal"
    if len(outputs) != len(OUTPUT_NAMES):
        raise ExportError(f"the graph has {len(outputs)} outputs ({sorted(taken)}), expected 2")
    for value, name in zip(outputs, OUTPUT_NAMES):
        value.name = name


def check_text_onnx(path: str | Path) -> int:
    """``onnx.checker`` plus the I/O contract: int64 ``[batch, seq]`` inputs, both axes
    symbolic, outputs ``logits`` and ``embedding``; returns the opset."""
    import onnx

    proto = checked_graph(path, INPUT_NAMES)
    for graph_input in proto.graph.input:
        tensor = graph_input.type.tensor_type
        dims = tensor.shape.dim
        if tensor.elem_type != onnx.TensorProto.INT64 or len(dims) != 2 or not all(
                d.dim_param for d in dims):
            raise ExportError(f"{graph_input.name} must be int64 [batch, seq] with both axes "
                              f"dynamic, got {graph_input.type}")
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def random_batch(n: int, length: int, vocab_size: int, pad_id: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids with ragged real lengths (row 0 uses the full length), padded as
    ``TextPreprocessor`` pads: pad id where the mask is 0."""
    ids = torch.randint(0, vocab_size, (n, length), generator=generator)
    lengths = torch.randint(1, length + 1, (n,), generator=generator)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, pad_id), mask


@torch.no_grad()
def text_parity(model: nn.Module, session: "ort.InferenceSession", *, vocab_size: int,
                pad_id: int, max_length: int, batch_sizes: Sequence[int] = PARITY_BATCHES,
                lengths: Sequence[int] = PARITY_LENGTHS, seed: int = 0) -> dict[str, Any]:
    """Largest |ORT - PyTorch| of logits and embedding on seeded random padded batches, for
    every batch size x sequence length (``max_length`` always included)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    checked = sorted({min(length, max_length) for length in lengths} | {max_length})
    per_shape: dict[str, dict[str, float]] = {}
    for n in batch_sizes:
        for length in checked:
            ids, mask = random_batch(n, length, vocab_size, pad_id, generator)
            expected = [t.numpy() for t in model(ids, mask)]
            got = session.run(list(OUTPUT_NAMES), {"input_ids": ids.numpy(),
                                                   "attention_mask": mask.numpy()})
            if [g.shape for g in got] != [e.shape for e in expected]:
                raise ExportError(f"batch {n} x length {length}: ORT shapes "
                                  f"{[g.shape for g in got]} != torch "
                                  f"{[e.shape for e in expected]}")
            per_shape[f"{n}x{length}"] = {name: float(np.abs(g - e).max())
                                          for name, g, e in zip(OUTPUT_NAMES, got, expected)}
    worst = max(v for d in per_shape.values() for v in d.values())
    return {"max_abs_diff": worst, "per_shape": per_shape, "export_length":
            min(EXPORT_LENGTH, max_length - 1), "lengths": checked,
            "batch_sizes": list(batch_sizes)}


def text_reference_profile(session: "ort.InferenceSession", pre: TextPreprocessor,
                           texts: Sequence[str], labels: Sequence[int], batch_size: int = 64
                           ) -> dict[str, np.ndarray]:
    """Monitored features and model outputs of texts, computed with the service's own steps:
    ``encode_batch`` -> ``text_features`` per text, ids and mask -> ONNX. Same keys as the
    image profile."""
    features, logits, embeddings = [], [], []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        batch = pre.encode_batch(chunk)
        features += [[text_features(t, s)[k] for k in TEXT_FEATURES]
                     for t, s in zip(chunk, batch.stats)]
        out_logits, out_emb = session.run(list(OUTPUT_NAMES), {
            "input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
        logits.append(out_logits)
        embeddings.append(out_emb)
    return profile_arrays(TEXT_FEATURES, features, logits, embeddings, labels)


def stage_text_artifact(model: nn.Module, folder: Path, *, pre: TextPreprocessor,
                        tokenizer_json: str, labels: Sequence[str],
                        reference_texts: Sequence[str], reference_labels: Sequence[int],
                        metrics: dict[str, Any], manifest: dict[str, Any],
                        curves: str | Path | None, tolerance: float = PARITY_TOLERANCE,
                        test_texts: Sequence[str] | None = None,
                        test_labels: Sequence[int] | None = None,
                        train_texts: Sequence[str] | None = None,
                        train_labels: Sequence[int] | None = None) -> dict[str, Any]:
    """Export, check and write every contract file into ``folder``; returns export.json's dict.
    Raises ``ExportError`` (parity over tolerance, wrong I/O) before the other files exist.
    ``train_texts``/``train_labels``: as the image export's ``train_blobs``.

    With ``test_texts`` and ``test_labels`` (the test split), metrics.json gains the text
    robustness suite's accuracies and the character-edit attack's figures
    (``training.robust_metrics.text_metrics``)."""
    spec = pre.spec
    onnx_path = folder / MODEL_FILE
    export_text_onnx(model, onnx_path, spec.max_length)
    opset = check_text_onnx(onnx_path)
    session = ort_session(onnx_path)
    report = text_parity(model, session, vocab_size=pre.vocab_size, pad_id=pre.pad_id,
                         max_length=spec.max_length)
    check_export(report, report["per_shape"], session, labels, tolerance)
    export_info = {**report, "opset": opset, "exporter": "dynamo", "tolerance": tolerance,
                   "weights_sha256": weights_digest(onnx_path)}
    profile = text_reference_profile(session, pre, reference_texts, reference_labels)
    if train_texts is not None and train_labels is not None:
        profile.update(training_arrays(
            lambda texts, labs: text_reference_profile(session, pre, texts, labs),
            train_texts, train_labels))
    if test_texts is not None and test_labels is not None:
        from ..robust_metrics import text_metrics

        metrics = {**metrics, **text_metrics(session, pre, test_texts, test_labels, profile,
                                             labels)}
    write_contract_files(folder, spec=spec, labels=labels, metrics=metrics,
                         export_info=export_info, manifest=manifest, profile=profile,
                         curves=curves)
    (folder / spec.tokenizer).write_text(tokenizer_json, encoding="utf-8")
    return export_info


def export_text_to_store(model: nn.Module, *, name: str, pre: TextPreprocessor,
                         tokenizer_json: str, labels: Sequence[str],
                         reference_texts: Sequence[str], reference_labels: Sequence[int],
                         metrics: dict[str, Any], manifest: dict[str, Any],
                         curves: str | Path | None = None, tolerance: float = PARITY_TOLERANCE,
                         store: "ModelStore | None" = None,
                         test_texts: Sequence[str] | None = None,
                         test_labels: Sequence[int] | None = None,
                         train_texts: Sequence[str] | None = None,
                         train_labels: Sequence[int] | None = None) -> "bentoml.Tag":
    """Export a text classifier and save it as a new version of ``name`` in the model store;
    a failed export leaves the store untouched (everything is staged and checked first)."""
    if pre.spec.tokenizer != TOKENIZER_FILE:
        raise ExportError(f"the artifact contract names {TOKENIZER_FILE}; the spec names "
                          f"{pre.spec.tokenizer!r}")
    with tempfile.TemporaryDirectory(prefix="export-text-") as tmp:
        staged = Path(tmp)
        info = stage_text_artifact(
            model, staged, pre=pre, tokenizer_json=tokenizer_json, labels=labels,
            reference_texts=reference_texts, reference_labels=reference_labels, metrics=metrics,
            manifest=manifest, curves=curves, tolerance=tolerance, test_texts=test_texts,
            test_labels=test_labels, train_texts=train_texts, train_labels=train_labels)
        metrics = json.loads((staged / METRICS_FILE).read_text())  # with the robustness keys
        metadata = store_metadata(metrics, pre.spec, info, manifest, labels,
                                  tokenizer_sha256=pre.tokenizer_sha256,
                                  max_length=pre.spec.max_length)
        return save_version(staged, name, files=TEXT_CONTRACT_FILES, task="text-classification",
                            metadata=metadata, store=store, logger=log)
