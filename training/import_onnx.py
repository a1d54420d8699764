"""Serve an image classifier exported elsewhere: import its ONNX file into the model store.

A model trained outside this project (another team's, the peers benchmark's) is one ONNX file
with an input ``[N, C, H, W]`` and an output of logits ``[N, K]``. The service also wants the
penultimate features as ``embedding`` (drift reports and the out-of-distribution score read it),
so the import exposes that tensor, which the graph already computes, as a second output: one
``Identity`` node and one graph output are added, and no node or weight of the file changes. The
import refuses the result unless its weights are byte-for-byte the file's and its logits equal the
file's own under ONNX Runtime (``max_abs_diff`` 0 on seeded inputs at batch 1, 7 and 64).

    python -m training.import_onnx model.onnx --name peers-resnet
    python -m training.import_onnx model.onnx --name mine --labels cat,dog --spec spec.json

The embedding defaults to the first input of the node that writes the logits when that node is a
``Gemm`` or ``MatMul`` (a final fully connected layer, as torchvision-style classifiers end);
``--embedding TENSOR`` names another ``[N, D]`` tensor. The preprocessing spec (how an uploaded
image becomes the input tensor) is ``--spec`` (a ``spec.json`` as training writes) or, by default,
the input's size and channels with the stretch resize and mean = std = 0.5 (pixels to [-1, 1]);
with no ``--labels``, the classes are named "0".."K-1". The reference profile is computed on
seeded noise images (an imported model brings no data), like the benchmark's reference model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from modelstore.layout import EXPORT_FILE, IMAGE_FILES, MODEL_FILE
from modelstore.store import file_sha256
from preprocessing import ImageSpec, load_spec

from .export import (INPUT_NAME, OUTPUT_NAMES, ExportError, build_manifest, compare_weights,
                     ort_session, reference_profile, store_metadata, weights_digest,
                     write_contract_files)

if TYPE_CHECKING:
    import bentoml
    import onnx

    from modelstore import ModelStore

log = logging.getLogger("training")

PARITY_BATCHES = (1, 7, 64)
FC_OPS = ("Gemm", "MatMul")


def _dims(value_info: Any) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def with_embedding(model: "onnx.ModelProto", embedding: str | None = None
                   ) -> tuple["onnx.ModelProto", str]:
    """``model`` answering ``logits`` and ``embedding`` (a copy); returns it and the tensor the
    embedding is. Raises ExportError where the graph does not fit the contract."""
    import onnx
    from onnx import helper

    graph = model.graph
    inputs = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    outputs = [o.name for o in graph.output]
    if inputs != [INPUT_NAME]:
        raise ExportError(f"the model's inputs are {inputs}; expected one named {INPUT_NAME!r} "
                          "([N, C, H, W] float32)")
    if OUTPUT_NAMES[0] not in outputs:
        raise ExportError(f"the model's outputs are {outputs}; expected {OUTPUT_NAMES[0]!r}")
    if outputs == list(OUTPUT_NAMES):
        return onnx.ModelProto.FromString(model.SerializeToString()), OUTPUT_NAMES[1]
    if OUTPUT_NAMES[1] in outputs:
        raise ExportError(f"the model's outputs are {outputs}; expected {list(OUTPUT_NAMES)} "
                          f"or {OUTPUT_NAMES[0]!r} alone")
    if embedding is None:
        writer = next((n for n in graph.node if OUTPUT_NAMES[0] in n.output), None)
        if writer is None or writer.op_type not in FC_OPS:
            raise ExportError(
                f"the logits are written by {writer.op_type if writer else 'no node'}, not a "
                f"fully connected layer ({'/'.join(FC_OPS)}): name the embedding tensor with "
                "--embedding")
        embedding = writer.input[0]
    produced = {o for n in graph.node for o in n.output}
    if embedding not in produced:
        raise ExportError(f"no node of the graph writes a tensor named {embedding!r}")
    out = onnx.ModelProto.FromString(model.SerializeToString())
    out.graph.node.append(helper.make_node("Identity", [embedding], [OUTPUT_NAMES[1]],
                                           name="import_onnx/embedding"))
    logits = next(o for o in out.graph.output if o.name == OUTPUT_NAMES[0])
    kept = [onnx.ValueInfoProto.FromString(logits.SerializeToString()),
            helper.make_tensor_value_info(OUTPUT_NAMES[1], onnx.TensorProto.FLOAT, ["N", "D"])]
    del out.graph.output[:]  # logits, then embedding, nothing else
    out.graph.output.extend(kept)
    return out, embedding


def logits_parity(original: Path, imported: Path, input_shape: Sequence[int],
                  seed: int = 0) -> dict[str, Any]:
    """Largest |logits(imported) - logits(original)| under ONNX Runtime, per batch size; also
    checks the embedding is ``[N, D]``."""
    a, b = ort_session(original), ort_session(imported)
    rng = np.random.default_rng(seed)
    per_batch: dict[str, float] = {}
    dim = None
    for n in PARITY_BATCHES:
        x = rng.standard_normal((n, *input_shape), dtype=np.float32)
        (want,) = a.run([OUTPUT_NAMES[0]], {INPUT_NAME: x})
        got, emb = b.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        if emb.ndim != 2 or emb.shape[0] != n:
            raise ExportError(f"the embedding tensor has shape {emb.shape} at batch {n}; it must "
                              "be [N, D]: name another with --embedding")
        dim = int(emb.shape[1])
        per_batch[str(n)] = float(np.abs(got - want).max())
    return {"max_abs_diff": max(per_batch.values()), "per_batch": per_batch,
            "embedding_dim": dim}


def default_spec(input_dims: Sequence[Any]) -> ImageSpec:
    """Stretch to the input's H x W, RGB for 3 channels and L for 1, pixels to [-1, 1]."""
    if len(input_dims) != 4 or not all(isinstance(d, int) and d > 0 for d in input_dims[1:]):
        raise ExportError(f"the input's shape is {list(input_dims)}; expected [N, C, H, W] with "
                          "fixed C, H, W (or give --spec)")
    _, channels, height, width = input_dims
    if channels not in (1, 3):
        raise ExportError(f"the input has {channels} channels; expected 1 or 3 (or give --spec)")
    n = int(channels)
    return ImageSpec(height=int(height), width=int(width), color_mode="RGB" if n == 3 else "L",
                     mean=(0.5,) * n, std=(0.5,) * n)


def stage_import(source: Path, folder: Path, *, labels: Sequence[str] | None, spec: ImageSpec | None,
                 embedding: str | None, reference_blobs: Sequence[bytes]) -> dict[str, Any]:
    """Check ``source`` and write every contract file into ``folder``; returns export.json's
    dict (also the model's ``labels`` and ``spec`` as used, under ``_labels`` / ``_spec``)."""
    import onnx

    try:
        original = onnx.load(str(source))
        onnx.checker.check_model(original)
    except Exception as exc:  # onnx raises several types; all mean "not a usable ONNX file"
        raise ExportError(f"{source} is not a valid ONNX model: {exc}") from exc
    model, tensor = with_embedding(original, embedding)
    input_dims = _dims(next(i for i in model.graph.input if i.name == INPUT_NAME))
    spec = spec or default_spec(input_dims)
    if list(spec.input_shape) != list(input_dims[1:]):
        raise ExportError(f"the spec makes {list(spec.input_shape)} tensors; the model takes "
                          f"{list(input_dims[1:])}")
    onnx_path = folder / MODEL_FILE
    onnx.save(model, str(onnx_path))
    onnx.checker.check_model(str(onnx_path))
    weights = compare_weights(source, onnx_path)
    if not weights["identical"]:
        raise ExportError(f"the imported weights differ from {source}: {weights}")
    report = logits_parity(source, onnx_path, spec.input_shape)
    if report["max_abs_diff"] != 0.0:
        raise ExportError(f"the imported model's logits differ from {source}'s by "
                          f"{report['max_abs_diff']:.3g}: {report['per_batch']}; nothing saved")
    session = ort_session(onnx_path)
    classes = int(session.get_outputs()[0].shape[1])
    labels = list(labels) if labels else [str(i) for i in range(classes)]
    if len(labels) != classes:
        raise ExportError(f"the model has {classes} logits but {len(labels)} labels were given")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    export_info = {"max_abs_diff": report["max_abs_diff"], "per_batch": report["per_batch"],
                   "parity_against": "the imported file under ONNX Runtime",
                   "opset": opset, "exporter": "import", "tolerance": 0.0,
                   "weights_sha256": weights_digest(onnx_path),
                   "weights_identical_to_source": True,
                   "source": str(source), "source_sha256": file_sha256(source),
                   "embedding_from": tensor, "embedding_dim": report["embedding_dim"]}
    profile = reference_profile(session, reference_blobs, [-1] * len(reference_blobs), spec)
    metrics = {"test_accuracy": None, "val_accuracy": None, "val_loss": None, "best_epoch": None,
               "epochs_run": 0, "train_seconds": 0.0, "history": [], "imported": True}
    manifest = build_manifest(seed=0, data_hash="", data_source=f"imported: {source.name}",
                              train_config={}, model_config={"imported_from": str(source),
                                                             "sha256": export_info["source_sha256"]})
    write_contract_files(folder, spec=spec, labels=labels, metrics=metrics,
                         export_info=export_info, manifest=manifest, profile=profile, curves=None)
    return {**export_info, "_labels": labels, "_spec": spec, "_manifest": manifest,
            "_metrics": metrics}


def import_onnx(source: str | Path, *, name: str, labels: Sequence[str] | None = None,
                spec: ImageSpec | None = None, embedding: str | None = None,
                store: "ModelStore | None" = None) -> "bentoml.Tag":
    """Import ``source`` as a new version of ``name`` (staged and checked first: a refused file
    leaves the store untouched)."""
    from modelstore.store import save_version

    from .reference_model import noise_images

    source = Path(source)
    if not source.is_file():
        raise ExportError(f"{source}: no such file")
    with tempfile.TemporaryDirectory(prefix="import-") as tmp:
        staged = Path(tmp)
        info = stage_import(source, staged, labels=labels, spec=spec, embedding=embedding,
                            reference_blobs=noise_images())
        public = {k: v for k, v in info.items() if not k.startswith("_")}
        (staged / EXPORT_FILE).write_text(json.dumps(public, indent=2) + "\n")
        metadata = store_metadata(info["_metrics"], info["_spec"], public, info["_manifest"],
                                  info["_labels"], source_sha256=public["source_sha256"])
        return save_version(staged, name, files=IMAGE_FILES, task="image-classification",
                            metadata=metadata, store=store, logger=log)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.import_onnx",
        description="Import an image classifier's ONNX file ([N,C,H,W] 'input' -> 'logits') into "
                    "BentoML's model store, so the service can serve it.")
    parser.add_argument("onnx", type=Path, help="the ONNX file")
    parser.add_argument("--name", required=True, help="model store name")
    parser.add_argument("--labels", help="class names in logit order, comma-separated "
                                         "(default 0..K-1)")
    parser.add_argument("--spec", type=Path, help="a preprocessing spec.json (default: the input "
                                                  "size, stretch, mean = std = 0.5)")
    parser.add_argument("--embedding", help="the [N, D] tensor to expose as 'embedding' "
                                            "(default: the final Gemm/MatMul's input)")
    args = parser.parse_args(argv)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("training").setLevel(logging.INFO)
    spec = None
    if args.spec is not None:
        try:
            loaded = load_spec(args.spec.read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--spec {args.spec}: {exc}")
        if not isinstance(loaded, ImageSpec):
            parser.error(f"--spec {args.spec} is not an image spec")
        spec = loaded
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    try:
        tag = import_onnx(args.onnx, name=args.name, labels=labels, spec=spec,
                          embedding=args.embedding)
    except ExportError as exc:
        print(f"import refused: {exc}", file=sys.stderr)
        return 2
    print(f"saved {tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
