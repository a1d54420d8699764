"""Same seed, same data -> the same metrics and byte-identical ONNX weights (image and text).

Each run is a fresh train + export into a throwaway store; the two artifacts' initializers are
compared tensor by tensor, and ``export.json``'s ``weights_sha256`` (a digest of them) must be
equal too, which is how two artifacts are compared without loading them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")  # before bentoml is imported anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from modelstore.layout import EXPORT_FILE, METRICS_FILE, MODEL_FILE
from training.export import compare_weights, onnx_weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    from modelstore import open_store

    return open_store(tmp_path_factory.mktemp("bentoml-repro"))


def _artifact(store, tag) -> tuple[Path, dict, dict]:
    folder = Path(store.get(tag).path)
    return (folder, json.loads((folder / METRICS_FILE).read_text()),
            json.loads((folder / EXPORT_FILE).read_text()))


def _without_timings(value):
    """``value`` without the wall-clock fields (any key with "seconds" in it), at any depth."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _assert_same(store, first_tag, second_tag) -> None:
    folder_a, metrics_a, export_a = _artifact(store, first_tag)
    folder_b, metrics_b, export_b = _artifact(store, second_tag)
    assert _without_timings(metrics_a) == _without_timings(metrics_b)
    comparison = compare_weights(folder_a / MODEL_FILE, folder_b / MODEL_FILE)
    # On CPU in torch's deterministic mode every kernel these models use is deterministic, so
    # the weights are byte-identical; the comparison names any tensor that is not.
    assert comparison["identical"], comparison
    assert comparison["max_abs_diff"] == 0.0
    assert export_a["weights_sha256"] == export_b["weights_sha256"]
    assert export_a["max_abs_diff"] == export_b["max_abs_diff"]


def test_two_image_runs_give_the_same_metrics_and_onnx_weights(store, tmp_path: Path) -> None:
    from training.config import TrainConfig
    from training.train import train_and_export

    cfg = TrainConfig(limit=150, epochs=2, widths=(8, 16), embedding_dim=16, warmup_epochs=0.5,
                      progress=False, model_name="digits-repro", out_dir=str(tmp_path))
    _, first = train_and_export(cfg, store=store)
    _, second = train_and_export(cfg, store=store)
    _assert_same(store, first, second)


def test_two_text_runs_give_the_same_metrics_and_onnx_weights(store, tmp_path: Path) -> None:
    """The BPE tokenizer is learnt in each run (a source of run-to-run change if it were not
    deterministic), then the transformer is trained with dropout and length-grouped batches."""
    from training.text.config import TextTrainConfig
    from training.text.train import train_and_export

    cfg = TextTrainConfig(model="transformer", demo_per_class=20, epochs=2, vocab_size=500,
                          d_model=32, layers=1, heads=2, ff_dim=64, max_length=48,
                          progress=False, model_name="lang-repro", out_dir=str(tmp_path))
    first_result, first = train_and_export(cfg, store=store)
    second_result, second = train_and_export(cfg, store=store)
    assert first_result.tokenizer_json == second_result.tokenizer_json
    _assert_same(store, first, second)


def test_compare_weights_reports_the_largest_difference(tmp_path: Path) -> None:
    import torch

    from training.export import export_onnx, weights_digest
    from training.models import CNNConfig, build_model

    torch.manual_seed(0)
    model = build_model(CNNConfig(widths=(8,), embedding_dim=8)).eval()
    export_onnx(model, (1, 16, 16), tmp_path / "a.onnx")
    with torch.no_grad():
        model.head.weight[0, 0] += 0.25
    export_onnx(model, (1, 16, 16), tmp_path / "b.onnx")
    comparison = compare_weights(tmp_path / "a.onnx", tmp_path / "b.onnx")
    assert not comparison["identical"]
    assert comparison["max_abs_diff"] == pytest.approx(0.25, abs=1e-6)
    assert comparison["differing"] and all(isinstance(n, str) for n in comparison["differing"])
    same = compare_weights(tmp_path / "a.onnx", tmp_path / "a.onnx")
    assert same == {"identical": True, "max_abs_diff": 0.0, "differing": [], "tensors":
                    len(onnx_weights(tmp_path / "a.onnx"))}
    assert np.isfinite(comparison["max_abs_diff"])
    # the digest export.json records: the same for the same weights, another for others
    export_onnx(model, (1, 16, 16), tmp_path / "b2.onnx")
    assert weights_digest(tmp_path / "b.onnx") == weights_digest(tmp_path / "b2.onnx")
    assert weights_digest(tmp_path / "a.onnx") != weights_digest(tmp_path / "b.onnx")
