"""Mixed precision (``--precision``): a few bf16 steps on CPU, exported from float32 within the
unchanged parity bound; 16-mixed (float16 autocast + GradScaler) on CUDA where there is one."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")  # before bentoml is imported anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from modelstore.layout import EXPORT_FILE, METRICS_FILE
from training.config import TrainConfig
from training.export import PARITY_TOLERANCE
from training.precision import cpu_has_native_bf16

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    from modelstore import open_store

    return open_store(tmp_path_factory.mktemp("bentoml-precision"))


def _exported(store, tag) -> tuple[dict, dict]:
    folder = Path(store.get(tag).path)
    return (json.loads((folder / EXPORT_FILE).read_text()),
            json.loads((folder / METRICS_FILE).read_text()))


def test_bf16_on_cpu_trains_and_exports_within_parity(store, tmp_path: Path) -> None:
    from training.train import train_and_export

    cfg = TrainConfig(limit=120, epochs=2, widths=(8, 16), embedding_dim=16, warmup_epochs=0.5,
                      precision="bf16", progress=False, model_name="digits-bf16",
                      out_dir=str(tmp_path))
    result, tag = train_and_export(cfg, store=store)
    # master weights stayed float32; the export is from them and passed the same gate
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    export_info, metrics = _exported(store, tag)
    assert export_info["tolerance"] == PARITY_TOLERANCE
    assert export_info["max_abs_diff"] <= PARITY_TOLERANCE
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in metrics["history"])
    assert set(metrics["per_class"]) == set(result.classes) and "macro_f1" in metrics


def test_bf16_text_transformer_trains_and_exports_within_parity(store, tmp_path: Path) -> None:
    """The transformer (attention via scaled_dot_product_attention, LayerNorm, GELU) under CPU
    bf16 autocast."""
    from training.text.config import TextTrainConfig
    from training.text.train import train_and_export

    cfg = TextTrainConfig(model="transformer", demo_per_class=20, epochs=1, vocab_size=400,
                          d_model=32, layers=1, heads=2, ff_dim=64, max_length=48,
                          precision="bf16", progress=False, model_name="lang-bf16",
                          out_dir=str(tmp_path))
    result, tag = train_and_export(cfg, store=store)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    export_info, metrics = _exported(store, tag)
    assert export_info["max_abs_diff"] <= PARITY_TOLERANCE
    assert metrics["history"][0]["train_loss"] > 0 and "macro_f1" in metrics


def test_bf16_autocast_really_runs_the_models_in_bf16() -> None:
    """Autocast is on where it matters: the CNN's convolutions and the transformer's linear
    layers produce bf16 under it (so the flag is not a silent no-op)."""
    from training.models import CNNConfig, build_model
    from training.precision import MixedPrecision
    from training.text.models import TransformerConfig, build_transformer

    amp = MixedPrecision("bf16", torch.device("cpu"))
    cnn = build_model(CNNConfig(widths=(8, 16), embedding_dim=16))
    text = build_transformer(TransformerConfig(vocab_size=50, num_classes=3, d_model=16,
                                               heads=2, ff_dim=32, max_length=16))
    with amp.autocast():
        logits, _ = cnn(torch.randn(4, 1, 32, 32))
        text_logits, _ = text(torch.randint(0, 50, (4, 9)), torch.ones(4, 9, dtype=torch.long))
    assert logits.dtype == torch.bfloat16 and text_logits.dtype == torch.bfloat16


def test_this_cpu_reports_its_bf16_support() -> None:
    assert isinstance(cpu_has_native_bf16(), bool)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_16_mixed_on_cuda_trains_and_exports_within_parity(store, tmp_path: Path) -> None:
    from training.train import train_and_export

    cfg = TrainConfig(limit=200, epochs=2, widths=(8, 16), embedding_dim=16, warmup_epochs=0.5,
                      device="cuda", precision="16-mixed", progress=False,
                      model_name="digits-fp16", out_dir=str(tmp_path))
    result, tag = train_and_export(cfg, store=store)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    export_info, metrics = _exported(store, tag)
    assert export_info["max_abs_diff"] <= PARITY_TOLERANCE
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in metrics["history"])
