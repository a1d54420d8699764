"""Text models exported to ONNX with dynamic batch and sequence axes, saved into a throwaway
model store, and loaded back the way the service will: spec.json -> TextPreprocessor with the
artifact's tokenizer.json -> ONNX Runtime. Also: no train-serve skew in the ids and masks."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")  # before bentoml is imported anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnx
import pytest
import torch

from preprocessing import TEXT_FEATURES, TextPreprocessor, TextSpec, load_spec
from training.export import ExportError, ort_session
from training.text import export as text_export
from training.text.config import TextTrainConfig
from training.text.data import TextDataset
from training.text.export import (EXPORT_LENGTH, TEXT_CONTRACT_FILES, check_text_onnx,
                                  export_text_onnx, export_text_to_store, random_batch)
from training.text.models import TransformerConfig, build_minilm, build_transformer
from training.text.tokenizer import minilm_path, minilm_tokenizer_json
from training.text.train import TextTrainResult, export_result, train_and_export

pytestmark = pytest.mark.slow

# What users send that a tokenizer may trip on; every one is valid input.
ODD_TEXTS = [
    "Hallo Welt", "Ça été très bien, señor Müller", "Cafe\u0301 decomposed",
    "emoji 😀👍🏽 👩‍👩‍👧 pizza🍕", "東京は日本の首都です", "مرحبا بالعالم \u200fשלום",
    "tab\there\nnew\rline\x07bell\x1b[31m", "ＦＵＬＬｗｉｄｔｈ ①", "MiXeD İstanbul ΣΊΣΥΦΟΣ",
    "x", "дуже довгий текст " * 300,
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    from modelstore import open_store

    return open_store(tmp_path_factory.mktemp("bentoml-text-models"))


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory: pytest.TempPathFactory) -> tuple[TextTrainResult, Path]:
    """A tiny transformer, one epoch on a small demo set, exported into the store."""
    cfg = TextTrainConfig(model="transformer", demo_per_class=30, epochs=1, vocab_size=600,
                          d_model=32, layers=1, heads=2, ff_dim=64, max_length=64,
                          model_name="lang-test", progress=False,
                          out_dir=str(tmp_path_factory.mktemp("art")))
    result, tag = train_and_export(cfg, store=store)
    return result, Path(store.get(tag).path)


def read_json(folder: Path, name: str):
    return json.loads((folder / name).read_text())


def served_preprocessor(folder: Path) -> TextPreprocessor:
    """What the service does at start-up: the spec, then the tokenizer the spec names."""
    spec = load_spec((folder / "spec.json").read_text())
    assert isinstance(spec, TextSpec)
    return TextPreprocessor.from_folder(folder, spec)


def test_every_contract_file_is_saved(trained, store) -> None:
    result, folder = trained
    for name in TEXT_CONTRACT_FILES:
        assert (folder / name).is_file(), name
    assert "tokenizer.json" in TEXT_CONTRACT_FILES
    assert not list(folder.glob("*.onnx.data"))
    assert (folder / "tokenizer.json").read_text() == result.tokenizer_json
    info = store.get(f"lang-test:{folder.name}").info
    assert info.labels == {"task": "text-classification"}
    assert info.metadata["spec_hash"] == result.spec.content_hash
    assert info.metadata["tokenizer_sha256"] == result.spec.tokenizer_sha256


def test_graph_has_dynamic_batch_and_sequence_axes(trained) -> None:
    result, folder = trained
    proto = onnx.load(str(folder / "model.onnx"))
    assert check_text_onnx(folder / "model.onnx") >= 18
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in proto.graph.output] == ["logits", "embedding"]
    session = ort_session(folder / "model.onnx")
    generator = torch.Generator().manual_seed(0)
    for n in (1, 7, 32):
        for length in (2, 5, 33, 64):  # none is the export's length
            assert length != EXPORT_LENGTH
            ids, mask = random_batch(n, length, 600, 0, generator)
            logits, embedding = session.run(None, {"input_ids": ids.numpy(),
                                                   "attention_mask": mask.numpy()})
            assert logits.shape == (n, 11) and embedding.shape == (n, 32)


def test_parity_is_recorded_at_unseen_lengths(trained) -> None:
    _, folder = trained
    info = read_json(folder, "export.json")
    assert 0 <= info["max_abs_diff"] <= 1e-4 and info["exporter"] == "dynamo"
    assert info["export_length"] not in info["lengths"] and 64 in info["lengths"]
    assert info["batch_sizes"] == [1, 7, 32]
    assert len(info["per_shape"]) == 3 * len(info["lengths"])


def test_spec_labels_metrics_manifest_and_reference(trained) -> None:
    result, folder = trained
    assert load_spec((folder / "spec.json").read_text()) == result.spec
    assert read_json(folder, "labels.json") == list(result.classes)
    metrics = read_json(folder, "metrics.json")
    assert metrics["test_accuracy"] == result.test_accuracy and metrics["epochs_run"] == 1
    manifest = read_json(folder, "manifest.json")
    assert TransformerConfig.from_dict(manifest["model_config"]).d_model == 32
    assert {"torch", "onnxruntime", "tokenizers"} <= set(manifest["versions"])
    ref = np.load(folder / "reference.npz")
    n = len(result.splits.val)
    assert list(ref["feature_names"]) == list(TEXT_FEATURES)
    assert ref["features"].shape == (n, len(TEXT_FEATURES)) and ref["features"].dtype == np.float64
    assert ref["embeddings"].shape == (n, 32) and ref["logits"].shape == (n, 11)
    assert ref["labels"].tolist() == list(result.splits.val.labels)
    assert np.array_equal(ref["predicted"], ref["logits"].argmax(axis=1))
    # The service's path (strings -> artifact's preprocessing -> ORT) gives the stored logits.
    pre = served_preprocessor(folder)
    ids, mask = pre.encode(result.splits.val.texts[:9])
    logits = ort_session(folder / "model.onnx").run(
        ["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    np.testing.assert_allclose(logits, ref["logits"][:9], atol=1e-5)


def test_training_and_serving_ids_are_bit_identical(trained) -> None:
    result, folder = trained
    training_side = TextDataset(result.splits.val, result.pre)
    (ids, mask), _ = training_side.collate([(t, 0) for t in ODD_TEXTS])
    served_ids, served_mask = served_preprocessor(folder).encode(ODD_TEXTS)
    assert served_ids.dtype == served_mask.dtype == np.int64
    assert ids.numpy().tobytes() == served_ids.tobytes()
    assert mask.numpy().tobytes() == served_mask.tobytes()
    assert served_ids.shape[1] == 64  # the long text is truncated to max_length


def test_a_wrong_graph_fails_parity_and_saves_nothing(trained, store, monkeypatch) -> None:
    result, _ = trained
    before = len(store.list("lang-test"))
    real_export = text_export.export_text_onnx

    def export_other_model(model, path, max_length, opset=text_export.ONNX_OPSET):
        torch.manual_seed(123)
        other = build_transformer(TransformerConfig.from_dict(result.model_config))
        return real_export(other.eval(), path, max_length, opset)

    monkeypatch.setattr(text_export, "export_text_onnx", export_other_model)
    with pytest.raises(ExportError, match="disagree"):
        export_result(result, store=store)
    assert len(store.list("lang-test")) == before


def test_minilm_exports_with_dynamic_axes_and_parity(store, tmp_path: Path) -> None:
    """The pretrained encoder with an untrained head: the whole contract, no training."""
    torch.manual_seed(0)
    model = build_minilm(minilm_path(), num_classes=3).eval()
    tokenizer_json = minilm_tokenizer_json()
    import hashlib

    spec = TextSpec(max_length=128,
                    tokenizer_sha256=hashlib.sha256(tokenizer_json.encode()).hexdigest())
    pre = TextPreprocessor(spec, tokenizer_json)
    tag = export_text_to_store(
        model, name="minilm-test", pre=pre, tokenizer_json=tokenizer_json,
        labels=["a", "b", "c"], reference_texts=ODD_TEXTS, reference_labels=[0] * len(ODD_TEXTS),
        metrics={"test_accuracy": None}, manifest={"seed": 0}, store=store)
    folder = Path(store.get(tag).path)
    info = read_json(folder, "export.json")
    assert info["max_abs_diff"] <= 1e-4 and 128 in info["lengths"]
    served = served_preprocessor(folder)
    ids, mask = served.encode(ODD_TEXTS[:4])
    session = ort_session(folder / "model.onnx")
    logits, embedding = session.run(None, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        expected = model(torch.from_numpy(ids), torch.from_numpy(mask))
    assert embedding.shape == (4, 384)
    np.testing.assert_allclose(logits, expected[0].numpy(), atol=1e-4)
    assert np.load(folder / "reference.npz")["features"].shape == (len(ODD_TEXTS),
                                                                    len(TEXT_FEATURES))


def test_the_exporter_failure_is_an_export_error(tmp_path: Path) -> None:
    class NotExportable(torch.nn.Module):
        def forward(self, ids, mask):
            if ids.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return ids.float(), mask.float()
            return mask.float(), ids.float()

    with pytest.raises(ExportError, match="dynamo ONNX export failed"):
        export_text_onnx(NotExportable(), tmp_path / "m.onnx", max_length=16)
