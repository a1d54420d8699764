"""A tiny image model and a tiny text model, trained and exported into a throwaway store: their
metrics.json carries the robustness suite and the attack figures (which the retraining gate's
same-input attack reproduces exactly), and ``python -m modelstore list`` shows the worst
variation and the attack success rate."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")  # before bentoml is imported anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from modelstore import cli as modelstore_cli
from training.adversarial import EPSILONS, REFERENCE_EPS, eps_key
from training.retrain.evaluate import ExportedModel
from training.robust_metrics import image_attack_success, text_attack_success
from training.robustness import CLEAN, TEXT_VARIATIONS, image_variation_names

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    from modelstore import open_store

    return open_store(tmp_path_factory.mktemp("bentoml-robust-models"))


def exported_metrics(store, tag) -> tuple[dict, Path]:
    folder = Path(store.get(tag).path)
    return json.loads((folder / "metrics.json").read_text()), folder


def check_contract(metrics: dict) -> None:
    robustness = metrics["robustness"]
    assert robustness[CLEAN] == pytest.approx(metrics["test_accuracy"], abs=1e-9)
    worst = metrics["robustness_worst"]
    assert worst["accuracy"] == min(v for k, v in robustness.items() if k != CLEAN)
    assert worst["drop"] == pytest.approx(robustness[CLEAN] - worst["accuracy"])
    assert 0.0 <= metrics["attack_success"] <= 1.0
    rate = metrics["adversarial_ood_flag_rate"]
    assert rate is None or 0.0 <= rate <= 1.0


def listed(store, name: str, capsys) -> list[str]:
    assert modelstore_cli.main(["list", name, "--store", str(store._path)]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert "WORST_VARIATION" in header and "ATTACK" in header
    return rows


def test_image_export_measures_robustness_and_attacks(store, tmp_path, capsys) -> None:
    from training.config import TrainConfig
    from training.train import train_and_export

    cfg = TrainConfig(limit=200, epochs=1, widths=(8, 16), embedding_dim=16, progress=False,
                      model_name="digits-robust", out_dir=str(tmp_path))
    result, tag = train_and_export(cfg, store=store)
    metrics, folder = exported_metrics(store, tag)
    check_contract(metrics)
    assert set(metrics["robustness"]) == {CLEAN, *image_variation_names("L")}
    for attack in ("fgsm", "pgd"):
        assert set(metrics["adversarial"][attack]) == {eps_key(e) for e in EPSILONS}
    assert metrics["attack_success"] == metrics["adversarial"]["pgd"][eps_key(REFERENCE_EPS)]
    # The run's own metrics.json is the artifact's, robustness included.
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    info = store.get(tag).info
    assert info.metadata["attack_success"] == metrics["attack_success"]

    # The retraining gate's same-input attack is this one, figure for figure.
    assert image_attack_success(result.model, result.spec, result.splits.test.blobs,
                                result.splits.test.labels) == (
        metrics["attack_success"], metrics["adversarial_info"]["attacked"])

    (row,) = listed(store, "digits-robust", capsys)
    worst = metrics["robustness_worst"]
    assert worst["variation"] in row.split() and f"{worst['accuracy']:.4f}" in row.split()
    assert f"{metrics['attack_success']:.3f}" in row.split()


def test_text_export_measures_robustness_and_attacks(store, tmp_path, capsys) -> None:
    from training.text.config import TextTrainConfig
    from training.text.train import train_and_export

    cfg = TextTrainConfig(model="transformer", demo_per_class=20, epochs=1, vocab_size=400,
                          d_model=16, layers=1, heads=2, ff_dim=32, max_length=32,
                          model_name="lang-robust", progress=False, augment=0.5,
                          out_dir=str(tmp_path))
    result, tag = train_and_export(cfg, store=store)
    metrics, folder = exported_metrics(store, tag)
    check_contract(metrics)
    assert set(metrics["robustness"]) == {CLEAN, *TEXT_VARIATIONS}
    assert set(metrics["adversarial"]) == {"charedit"}
    assert metrics["attack_success"] == metrics["adversarial"]["charedit"]["2"]
    exported = ExportedModel(folder)
    assert text_attack_success(exported.session, exported.pre, result.splits.test.texts,
                               result.splits.test.labels) == (
        metrics["attack_success"], metrics["adversarial_info"]["attacked"])
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics

    (row,) = listed(store, "lang-robust", capsys)
    assert metrics["robustness_worst"]["variation"] in row.split()
