"""ONNX export, a PyTorch/ONNX Runtime parity check, and saving the artifact to BentoML's store.

The files written into the model store entry are the contract the service reads (see
``CONTRACT_FILES``: ``modelstore.layout.IMAGE_FILES``); ``modelstore.store.save_version`` writes
the version. Nothing is saved unless the exported graph passes ``onnx.checker`` and agrees with
PyTorch to ``PARITY_TOLERANCE`` (cf. timm's onnx_validate.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import math
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from modelstore.layout import (CURVES_FILE, EXPORT_FILE, IMAGE_FILES, LABELS_FILE,
                               MANIFEST_FILE, METRICS_FILE, MODEL_FILE, REFERENCE_FILE, SPEC_FILE)
from modelstore.store import save_version
from preprocessing import IMAGE_FEATURES, ImageSpec, decode_image, image_features, image_to_array

if TYPE_CHECKING:  # bentoml and onnxruntime are heavy; imported where used
    import bentoml
    import onnx
    import onnxruntime as ort

    from modelstore import ModelStore

ONNX_OPSET = 18
PARITY_TOLERANCE = 1e-4
PARITY_BATCHES = (1, 7, 64)
INPUT_NAME, OUTPUT_NAMES = "input", ("logits", "embedding")
CONTRACT_FILES = IMAGE_FILES

log = logging.getLogger("training")


class ExportError(RuntimeError):
    """The exported model cannot be trusted (checker failure, parity over tolerance)."""


def export_onnx(model: nn.Module, input_shape: Sequence[int], path: str | Path,
                opset: int = ONNX_OPSET, exporter: str = "auto") -> str:
    """Write ``model`` ([N,C,H,W] -> logits, embedding) to one self-contained ONNX file.

    ``exporter="auto"`` uses torch's dynamo exporter (the default in 2.13, and what we measured
    to work for these CNNs) and falls back to the legacy TorchScript exporter, with a logged
    warning, only if dynamo raises; the parity check that follows judges either result.
    Returns the exporter used: "dynamo" or "legacy".
    """
    if exporter not in ("auto", "dynamo", "legacy"):
        raise ValueError(f"exporter must be auto, dynamo or legacy, got {exporter!r}")
    model.eval()
    # Batch 2, not 1: torch.export specialises size-1 dims, which would pin the batch axis.
    example = torch.zeros(2, *input_shape)
    if exporter != "legacy":
        try:
            _export_dynamo(model, example, path, opset)
            return "dynamo"
        except Exception as exc:  # noqa: BLE001 - any exporter failure -> try the other one
            if exporter == "dynamo":
                raise ExportError(f"dynamo ONNX export failed: {exc}") from exc
            log.warning("dynamo ONNX export failed (%s); falling back to the legacy exporter", exc)
    _export_legacy(model, example, path, opset)
    return "legacy"


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int) -> None:
    # external_data=False keeps the weights inside model.onnx; the default writes a side
    # .onnx.data file that the service does not look for.
    batch = torch.export.Dim("batch", min=1, max=4096)
    with _quiet_exporter():
        torch.onnx.export(
            model, (example,), str(path), input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES), dynamic_shapes=({0: batch},), external_data=False,
            opset_version=opset, dynamo=True, verbose=False,
        )


def _export_legacy(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int) -> None:
    # TorchScript exporter: fine for CNNs (it bakes a transformer's sequence length in, which
    # is why it is not the default); dynamic_axes gives the dynamic batch.
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (example,), str(path), input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES), dynamic_axes=axes, opset_version=opset,
            do_constant_folding=True, dynamo=False,
        )


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence torch 2.13's exporter noise that says nothing about our model: one warning per
    torchvision op it cannot register (there is no torchvision here) and a FutureWarning from
    its own pytree code. Real export errors still raise."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")
            yield
    finally:
        registration.setLevel(level)


def checked_graph(path: str | Path, input_names: Sequence[str]) -> "onnx.ModelProto":
    """The exported graph after ``onnx.checker``, with the expected input names and outputs
    ``logits`` and ``embedding``; ExportError otherwise."""
    import onnx

    proto = onnx.load(str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the export: {exc}") from exc
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != list(input_names) or outputs != list(OUTPUT_NAMES):
        raise ExportError(f"unexpected graph I/O: inputs {inputs}, outputs {outputs}")
    return proto


def check_onnx(path: str | Path, input_shape: Sequence[int]) -> int:
    """``onnx.checker`` plus the I/O contract (names, dtypes, dynamic batch); returns the opset."""
    proto = checked_graph(path, [INPUT_NAME])
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if not dims[0].dim_param or [d.dim_value for d in dims[1:]] != list(input_shape):
        raise ExportError(f"input must be [batch, {', '.join(map(str, input_shape))}], got {dims}")
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def onnx_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The graph's initializers (its weights and constants) by name, as numpy arrays."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    return {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}


def weights_digest(path: str | Path) -> str:
    """sha256 over the ONNX initializers (name, dtype, shape, bytes; sorted by name): equal for
    two exports whose weights are byte-identical, whatever else differs in the files (graph
    metadata, node names). export.json records it, so two runs compare by one field."""
    digest = hashlib.sha256()
    for name, array in sorted(onnx_weights(path).items()):
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def compare_weights(path_a: str | Path, path_b: str | Path) -> dict[str, Any]:
    """How far two exports' weights are apart: ``identical`` (every initializer byte-equal, the
    same names), ``max_abs_diff`` over the tensors both have with the same shape (inf where a
    name or shape differs), ``differing`` (the names that are not byte-equal) and ``tensors``."""
    a, b = onnx_weights(path_a), onnx_weights(path_b)
    differing = sorted(set(a) ^ set(b))
    worst = math.inf if differing else 0.0
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            differing.append(name)
            worst = math.inf
        elif x.tobytes() != y.tobytes():
            differing.append(name)
            if np.issubdtype(x.dtype, np.number):
                diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
                worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return {"identical": not differing, "max_abs_diff": worst, "differing": differing,
            "tensors": len(a)}


def ort_session(path: str | Path) -> "ort.InferenceSession":
    """A CPU session with explicit threads: ORT's spinning pool would starve a 2-core box."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def parity(model: nn.Module, session: "ort.InferenceSession", input_shape: Sequence[int],
           batch_sizes: Sequence[int] = PARITY_BATCHES, seed: int = 0) -> dict[str, Any]:
    """Largest |ORT - PyTorch| of logits and embedding on seeded random inputs, per batch size."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    per_batch: dict[str, dict[str, float]] = {}
    for n in batch_sizes:
        x = torch.randn(n, *input_shape, generator=generator)
        expected = [t.numpy() for t in model(x)]
        got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
        if [g.shape for g in got] != [e.shape for e in expected]:
            raise ExportError(f"batch {n}: ORT shapes {[g.shape for g in got]} != torch "
                              f"{[e.shape for e in expected]}")
        per_batch[str(n)] = {name: float(np.abs(g - e).max())
                             for name, g, e in zip(OUTPUT_NAMES, got, expected)}
    worst = max(v for d in per_batch.values() for v in d.values())
    return {"max_abs_diff": worst, "per_batch": per_batch}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def reference_profile(session: "ort.InferenceSession", blobs: Sequence[bytes],
                      labels: Sequence[int], spec: ImageSpec, batch_size: int = 64
                      ) -> dict[str, np.ndarray]:
    """Monitored features and model outputs of images (un-augmented): what drift reports compare
    production traffic against. Computed from the files' bytes with the service's own steps:
    ``decode_image`` -> ``image_features`` on the decoded image, ``image_to_array`` -> ONNX."""
    features, logits, embeddings = [], [], []
    for start in range(0, len(blobs), batch_size):
        images = [decode_image(b, spec) for b in blobs[start:start + batch_size]]
        features += [[image_features(img)[k] for k in IMAGE_FEATURES] for img in images]
        x = np.stack([image_to_array(img, spec) for img in images])
        out_logits, out_emb = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        logits.append(out_logits)
        embeddings.append(out_emb)
    return profile_arrays(IMAGE_FEATURES, features, logits, embeddings, labels)


TRAIN_ROWS = 4000  # training rows whose embeddings the reference profile keeps (seeded sample)


def training_arrays(profile_of: Callable[[Sequence[Any], Sequence[int]], dict[str, np.ndarray]],
                    inputs: Sequence[Any], labels: Sequence[int], max_rows: int = TRAIN_ROWS,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """``train_embeddings`` (float16) and ``train_labels`` of a seeded sample of at most
    ``max_rows`` training inputs, through ``profile_of`` (the reference profile's own steps):
    what the OOD scorer fits its class means, covariance and neighbours on, so that the
    validation rows are left to calibrate its thresholds (``monitoring.ood.fit_ood``)."""
    n = len(inputs)
    chosen = (np.arange(n) if n <= max_rows
              else np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False)))
    part = profile_of([inputs[i] for i in chosen], [int(labels[i]) for i in chosen])
    return {"train_embeddings": part["embeddings"].astype(np.float16),
            "train_labels": np.asarray(labels, dtype=np.int64)[chosen]}


def profile_arrays(feature_names: Sequence[str], features: list[list[float]],
                   logits: list[np.ndarray], embeddings: list[np.ndarray],
                   labels: Sequence[int]) -> dict[str, np.ndarray]:
    """The arrays of ``reference.npz`` (image and text alike) from per-batch model outputs."""
    logits_arr = np.concatenate(logits).astype(np.float32)
    probs = softmax(logits_arr.astype(np.float64))
    return {
        "feature_names": np.array(feature_names, dtype=str),
        "features": np.array(features, dtype=np.float64).reshape(len(features), len(feature_names)),
        "embeddings": np.concatenate(embeddings).astype(np.float32),
        "logits": logits_arr,
        "labels": np.asarray(labels, dtype=np.int64),
        "predicted": probs.argmax(axis=1).astype(np.int64),
        "confidence": probs.max(axis=1).astype(np.float32),
    }


def library_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import PIL

    return {"torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "pillow": PIL.__version__, "python": platform.python_version()}


def git_commit() -> str:
    """HEAD of the repository this code runs from, or "unknown" (no git, no commits yet)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def build_manifest(*, seed: int, data_hash: str, data_source: str,
                   train_config: dict[str, Any], model_config: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to reproduce the artifact (the model config rebuilds the network)."""
    return {
        "seed": seed, "data_hash": data_hash, "data_source": data_source,
        "train_config": train_config, "model_config": model_config,
        "versions": library_versions(), "git_commit": git_commit(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def stage_artifact(model: nn.Module, folder: Path, *, spec: ImageSpec, labels: Sequence[str],
                   reference_blobs: Sequence[bytes], reference_labels: Sequence[int],
                   metrics: dict[str, Any], manifest: dict[str, Any], curves: str | Path | None,
                   tolerance: float = PARITY_TOLERANCE,
                   test_blobs: Sequence[bytes] | None = None,
                   test_labels: Sequence[int] | None = None,
                   variations: Sequence[str] | None = None,
                   train_blobs: Sequence[bytes] | None = None,
                   train_labels: Sequence[int] | None = None) -> dict[str, Any]:
    """Export, check and write every contract file into ``folder``; returns export.json's dict.

    With ``train_blobs`` and ``train_labels`` (the training split) the reference profile keeps
    a sample of their embeddings for the OOD scorer (``training_arrays``).

    With ``test_blobs`` and ``test_labels`` (the test split), metrics.json gains the robustness
    suite's accuracies (``variations``, default by colour mode: see
    ``robustness.image_variation_names``) and the FGSM/PGD figures (``robust_metrics``).

    Raises ``ExportError`` before anything is written beyond the candidate model.onnx.
    """
    onnx_path = folder / MODEL_FILE
    exporter = export_onnx(model, spec.input_shape, onnx_path)
    opset = check_onnx(onnx_path, spec.input_shape)
    session = ort_session(onnx_path)
    report = parity(model, session, spec.input_shape)
    check_export(report, report["per_batch"], session, labels, tolerance)
    export_info = {**report, "opset": opset, "exporter": exporter, "tolerance": tolerance,
                   "weights_sha256": weights_digest(onnx_path)}
    profile = reference_profile(session, reference_blobs, reference_labels, spec)
    if train_blobs is not None and train_labels is not None:
        profile.update(training_arrays(
            lambda blobs, labs: reference_profile(session, blobs, labs, spec),
            train_blobs, train_labels))
    if test_blobs is not None and test_labels is not None:
        from .robust_metrics import image_metrics

        metrics = {**metrics, **image_metrics(model, session, spec, test_blobs, test_labels,
                                              profile, labels, variations)}
    write_contract_files(folder, spec=spec, labels=labels, metrics=metrics,
                         export_info=export_info, manifest=manifest, profile=profile,
                         curves=curves)
    return export_info


def check_export(report: dict[str, Any], detail: Any, session: "ort.InferenceSession",
                 labels: Sequence[str], tolerance: float) -> None:
    """Refuse an export whose ONNX outputs stray from PyTorch's or whose logits and labels
    disagree in number; ``detail`` (per batch / per shape) goes into the message."""
    if not report["max_abs_diff"] <= tolerance:  # "not <=" also catches NaN
        raise ExportError(f"ONNX Runtime and PyTorch disagree by {report['max_abs_diff']:.3g} "
                          f"(tolerance {tolerance:g}): {detail}; nothing saved")
    logits_dim = session.get_outputs()[0].shape[1]
    if logits_dim != len(labels):
        raise ExportError(f"model has {logits_dim} logits but {len(labels)} labels")


def write_contract_files(folder: Path, *, spec: Any, labels: Sequence[str],
                         metrics: dict[str, Any], export_info: dict[str, Any],
                         manifest: dict[str, Any], profile: dict[str, np.ndarray],
                         curves: str | Path | None) -> None:
    """Every contract file but model.onnx (already there) and a text model's tokenizer."""
    np.savez(folder / REFERENCE_FILE, **profile)
    (folder / SPEC_FILE).write_text(spec.to_json() + "\n")
    _write_json(folder / LABELS_FILE, list(labels))
    _write_json(folder / METRICS_FILE, metrics)
    _write_json(folder / EXPORT_FILE, export_info)
    _write_json(folder / MANIFEST_FILE, manifest)
    if curves is not None:
        shutil.copyfile(curves, folder / CURVES_FILE)
    else:
        _blank_png(folder / CURVES_FILE)


def store_metadata(metrics: dict[str, Any], spec: Any, export_info: dict[str, Any],
                   manifest: dict[str, Any], labels: Sequence[str], **extra: Any
                   ) -> dict[str, Any]:
    """The model store entry's metadata (what `bentoml models get` and the registry show)."""
    return {
        "test_accuracy": metrics.get("test_accuracy"),
        "val_accuracy": metrics.get("val_accuracy"),
        "spec_hash": spec.content_hash,
        **extra,
        "parity_max_abs_diff": export_info["max_abs_diff"],
        "data_hash": manifest.get("data_hash"),
        "opset": export_info["opset"],
        "exporter": export_info["exporter"],
        "num_classes": len(labels),
        # The robustness figures (metrics.json has the full tables), where measured.
        **{k: v for k, v in (("robustness_worst_accuracy",
                               (metrics.get("robustness_worst") or {}).get("accuracy")),
                              ("attack_success", metrics.get("attack_success")))
           if v is not None},
    }


def _blank_png(path: Path) -> None:
    """A placeholder curves.png for models that were never trained (the reference model)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (255, 255, 255)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def export_to_store(model: nn.Module, *, name: str, spec: ImageSpec, labels: Sequence[str],
                    reference_blobs: Sequence[bytes], reference_labels: Sequence[int],
                    metrics: dict[str, Any], manifest: dict[str, Any],
                    curves: str | Path | None = None, tolerance: float = PARITY_TOLERANCE,
                    store: "ModelStore | None" = None,
                    test_blobs: Sequence[bytes] | None = None,
                    test_labels: Sequence[int] | None = None,
                    variations: Sequence[str] | None = None,
                    train_blobs: Sequence[bytes] | None = None,
                    train_labels: Sequence[int] | None = None) -> "bentoml.Tag":
    """Export ``model`` and save it as a new version of ``name`` in BentoML's model store.

    Everything is staged and checked in a temporary folder first, so a failed export leaves
    the store untouched. ``store`` overrides the default store (``$BENTOML_HOME/models``); tests
    pass one to stay off the user's store. ``test_blobs``/``test_labels``: measure robustness
    and adversarial attacks on them into metrics.json (see ``stage_artifact``).
    """
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        staged = Path(tmp)
        export_info = stage_artifact(
            model, staged, spec=spec, labels=labels, reference_blobs=reference_blobs,
            reference_labels=reference_labels, metrics=metrics, manifest=manifest,
            curves=curves, tolerance=tolerance, test_blobs=test_blobs,
            test_labels=test_labels, variations=variations, train_blobs=train_blobs,
            train_labels=train_labels)
        metrics = json.loads((staged / METRICS_FILE).read_text())  # with the robustness keys
        metadata = store_metadata(metrics, spec, export_info, manifest, labels)
        return save_version(staged, name, files=CONTRACT_FILES, task="image-classification",
                            metadata=metadata, store=store, logger=log)

