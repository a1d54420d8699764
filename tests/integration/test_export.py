"""Train briefly, export to ONNX, save into a throwaway BentoML model store, and load it back the
way the service will: ONNX Runtime, spec.json, labels.json, reference.npz."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")  # before bentoml is imported anywhere

import numpy as np
import onnx
import pytest
import torch

from preprocessing import IMAGE_FEATURES, ImageSpec, preprocess_image_bytes
from training import export as export_mod
from training.config import TrainConfig
from monitoring.ood import fit_ood
from monitoring.reference import load_reference
from training.export import CONTRACT_FILES, TRAIN_ROWS, ExportError, ort_session
from training.models import CNNConfig, build_model
from training.reference_model import SPEC as REFERENCE_SPEC
from training.reference_model import export_reference
from training.train import TrainResult, export_result, train_and_export

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """A model store in a temp folder: the user's ~/bentoml is never touched."""
    from modelstore import open_store

    return open_store(tmp_path_factory.mktemp("bentoml-models"))


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, Path]:
    """One short run (2 epochs on 200 digits), exported; returns the result and entry folder."""
    cfg = TrainConfig(limit=200, epochs=2, widths=(8, 16, 32), progress=False,
                      model_name="digits-test", out_dir=str(tmp_path_factory.mktemp("art")))
    result, tag = train_and_export(cfg, store=store)
    assert str(tag).startswith("digits-test:")
    return result, Path(store.get(tag).path)


def read_json(folder: Path, name: str):
    return json.loads((folder / name).read_text())


def test_every_contract_file_is_saved(trained) -> None:
    _, folder = trained
    for name in CONTRACT_FILES:
        assert (folder / name).is_file(), name
    assert not list(folder.glob("*.onnx.data"))  # weights live inside model.onnx


def test_onnx_graph_passes_the_checker_with_a_dynamic_batch(trained) -> None:
    _, folder = trained
    proto = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits", "embedding"]
    session = ort_session(folder / "model.onnx")
    for n in (1, 7, 64):
        x = np.random.default_rng(n).standard_normal((n, 1, 32, 32)).astype(np.float32)
        logits, embedding = session.run(None, {"input": x})
        assert logits.shape == (n, 10) and logits.dtype == np.float32
        assert embedding.shape == (n, 128) and embedding.dtype == np.float32


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_both_exporters_give_a_checked_graph_within_tolerance(exporter: str,
                                                              tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(CNNConfig(in_channels=3, num_classes=4, widths=(8, 16))).eval()
    path = tmp_path / "m.onnx"
    assert export_mod.export_onnx(model, (3, 24, 40), path, exporter=exporter) == exporter
    assert export_mod.check_onnx(path, (3, 24, 40)) == export_mod.ONNX_OPSET
    assert export_mod.parity(model, ort_session(path), (3, 24, 40))["max_abs_diff"] <= 1e-4


def test_parity_is_recorded_and_within_tolerance(trained) -> None:
    _, folder = trained
    info = read_json(folder, "export.json")
    assert set(info["per_batch"]) == {"1", "7", "64"}
    assert 0 <= info["max_abs_diff"] <= 1e-4
    assert info["max_abs_diff"] == max(v for d in info["per_batch"].values() for v in d.values())
    assert info["exporter"] in ("dynamo", "legacy") and info["opset"] >= 17


def test_spec_labels_metrics_and_manifest(trained, store) -> None:
    result, folder = trained
    spec = ImageSpec.from_json((folder / "spec.json").read_text())
    assert spec == result.spec and spec.input_shape == (1, 32, 32)
    assert read_json(folder, "labels.json") == [str(d) for d in range(10)]
    metrics = read_json(folder, "metrics.json")
    assert metrics["test_accuracy"] == result.test_accuracy
    assert metrics["epochs_run"] == len(metrics["history"]) == 2
    for key in ("val_accuracy", "val_loss", "best_epoch", "train_seconds"):
        assert key in metrics
    manifest = read_json(folder, "manifest.json")
    assert manifest["seed"] == 0 and manifest["data_hash"] == result.data_hash
    assert CNNConfig.from_dict(manifest["model_config"]) == result.model_config
    assert manifest["train_config"]["limit"] == 200
    versions = {"torch", "onnx", "onnxruntime", "numpy", "pillow", "python"}
    assert versions <= set(manifest["versions"])
    assert manifest["git_commit"] and manifest["created_at"]
    info = store.get(f"digits-test:{folder.name}").info
    assert info.labels == {"task": "image-classification"}
    assert info.metadata["spec_hash"] == spec.content_hash


def test_reference_profile_matches_the_validation_set(trained) -> None:
    result, folder = trained
    ref = np.load(folder / "reference.npz")
    n = len(result.splits.val)
    assert list(ref["feature_names"]) == list(IMAGE_FEATURES)
    assert ref["features"].shape == (n, len(IMAGE_FEATURES)) and ref["features"].dtype == np.float64
    assert ref["embeddings"].shape == (n, 128) and ref["embeddings"].dtype == np.float32
    assert ref["logits"].shape == (n, 10) and ref["logits"].dtype == np.float32
    assert ref["labels"].tolist() == list(result.splits.val.labels)
    assert ref["predicted"].dtype == np.int64 and ref["confidence"].dtype == np.float32
    assert np.array_equal(ref["predicted"], ref["logits"].argmax(axis=1))
    assert ((ref["confidence"] > 0) & (ref["confidence"] <= 1)).all()
    # The service's path (bytes -> preprocess -> ORT) reproduces the stored logits.
    session = ort_session(folder / "model.onnx")
    x = np.stack([preprocess_image_bytes(b, result.spec) for b in result.splits.val.blobs[:5]])
    np.testing.assert_allclose(session.run(["logits"], {"input": x})[0], ref["logits"][:5],
                               atol=1e-5)
    # and a sample of the training split's embeddings, which the OOD scorer fits on
    train = result.splits.train
    assert len(train) <= TRAIN_ROWS  # all of them, in order
    assert ref["train_embeddings"].shape == (len(train), 128)
    assert ref["train_embeddings"].dtype == np.float16
    assert ref["train_labels"].tolist() == list(train.labels)
    x = np.stack([preprocess_image_bytes(b, result.spec) for b in train.blobs[:3]])
    np.testing.assert_allclose(session.run(["embedding"], {"input": x})[0],
                               ref["train_embeddings"][:3].astype(np.float32), rtol=2e-3, atol=2e-3)
    assert fit_ood(load_reference(folder)).fitted_on == "training split"


def test_a_broken_export_raises_and_saves_nothing(trained, store, monkeypatch) -> None:
    """Swap in an ONNX file of a different network: parity must catch it before the store."""
    result, _ = trained
    before = len(store.list("digits-test"))
    real_export = export_mod.export_onnx

    def export_other_model(model, input_shape, path, opset=export_mod.ONNX_OPSET):
        torch.manual_seed(123)
        return real_export(build_model(result.model_config).eval(), input_shape, path, opset)

    monkeypatch.setattr(export_mod, "export_onnx", export_other_model)
    with pytest.raises(ExportError, match="disagree"):
        export_result(result, store=store)
    assert len(store.list("digits-test")) == before


def test_an_impossible_tolerance_refuses_to_save(trained, store) -> None:
    result, _ = trained
    before = len(store.list("digits-test"))
    with pytest.raises(ExportError):
        export_result(result, store=store, tolerance=-1.0)
    assert len(store.list("digits-test")) == before


def test_reference_model_has_the_same_contract(store) -> None:
    tag = export_reference("bench-test", store=store)
    folder = Path(store.get(tag).path)
    for name in CONTRACT_FILES:
        assert (folder / name).is_file(), name
    assert ImageSpec.from_json((folder / "spec.json").read_text()) == REFERENCE_SPEC
    assert read_json(folder, "metrics.json")["test_accuracy"] is None
    assert read_json(folder, "export.json")["max_abs_diff"] <= 1e-4
    manifest = read_json(folder, "manifest.json")
    assert manifest["model_config"]["parameters"] == 308_826  # the peers' model
    ref = np.load(folder / "reference.npz")
    assert ref["features"].shape == (64, len(IMAGE_FEATURES))
    assert ref["embeddings"].shape == (64, 128) and ref["logits"].shape == (64, 10)
    assert (ref["labels"] == -1).all()  # noise has no true class


def test_a_folder_of_photos_trains_and_exports(store, tmp_path: Path) -> None:
    """RGB photos of mixed sizes and formats: the reference features describe the raw images
    (their own width and height), while the model sees the spec's 32x32."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, (name, fmt) in enumerate([("cats", "JPEG"), ("dogs", "PNG")]):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(12):
            size = (40 + 7 * i, 30 + 5 * i)
            pixels = rng.integers(0, 90, (size[1], size[0], 3)) + 150 * label
            path = tmp_path / "data" / name / f"{i}.{fmt.lower()}"
            Image.fromarray(pixels.astype(np.uint8)).save(path, format=fmt)
    cfg = TrainConfig(data=str(tmp_path / "data"), model_name="photos-test", color_mode="RGB",
                      epochs=1, widths=(8, 16), progress=False, out_dir=str(tmp_path / "art"),
                      val_fraction=0.25, test_fraction=0.25)
    result, tag = train_and_export(cfg, store=store)
    folder = Path(store.get(tag).path)
    assert read_json(folder, "labels.json") == ["cats", "dogs"]
    ref = np.load(folder / "reference.npz")
    widths = ref["features"][:, list(IMAGE_FEATURES).index("width")]
    assert len(widths) == len(result.splits.val) and (widths >= 40).all()
    assert ref["logits"].shape == (len(widths), 2)
