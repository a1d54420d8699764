"""Losses for imbalanced labels (training/losses.py), the per-class report (training/metrics.py),
the per-class slice table (monitoring/slice_metrics.py) and the --loss/--precision options."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from monitoring.slice_metrics import class_metrics, format_class_table
from training.config import TrainConfig, config_from_args
from training.losses import LOSSES, balanced_class_weights, focal_loss, make_loss
from training.loop import training_loss
from training.metrics import classification_report
from training.precision import MixedPrecision, precision_error
from training.text.config import TextTrainConfig
from training.text.config import config_from_args as text_config_from_args


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 5, generator=g) * 3, torch.randint(0, 5, (32,), generator=g)


# --- the math ----------------------------------------------------------------------------------

def test_balanced_weights_are_n_over_k_count() -> None:
    w = balanced_class_weights([0, 0, 0, 1], 2)
    assert w.tolist() == pytest.approx([4 / (2 * 3), 4 / (2 * 1)])
    # every class then weighs the same in total: count_c * w_c = n / k
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    w = balanced_class_weights(labels, 3)
    assert (np.bincount(labels) * w.numpy()) == pytest.approx([100 / 3] * 3)
    with pytest.raises(ValueError, match=r"\[1\]"):
        balanced_class_weights([0, 0], 2)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_focal_with_gamma_zero_is_cross_entropy(batch, smoothing: float) -> None:
    logits, y = batch
    assert torch.allclose(focal_loss(logits, y, gamma=0.0, label_smoothing=smoothing),
                          F.cross_entropy(logits, y, label_smoothing=smoothing))
    w = torch.tensor([0.5, 1.0, 2.0, 4.0, 1.5])
    assert torch.allclose(focal_loss(logits, y, gamma=0.0, weight=w, label_smoothing=smoothing),
                          F.cross_entropy(logits, y, weight=w, label_smoothing=smoothing))


def test_focal_matches_its_definition(batch) -> None:
    logits, y = batch
    p_t = torch.softmax(logits, 1)[torch.arange(len(y)), y]
    expected = (-(1 - p_t) ** 2 * torch.log(p_t)).mean()
    assert torch.allclose(focal_loss(logits, y, gamma=2.0), expected, rtol=1e-5)
    # alpha-weighted: sum of weighted terms over the sum of the targets' weights
    w = torch.tensor([0.5, 1.0, 2.0, 4.0, 1.5])
    terms = -(1 - p_t) ** 2 * torch.log(p_t) * w[y]
    assert torch.allclose(focal_loss(logits, y, gamma=2.0, weight=w), terms.sum() / w[y].sum(),
                          rtol=1e-5)
    per_item = focal_loss(logits, y, gamma=2.0, reduction="none")
    assert per_item.shape == (32,) and (per_item >= 0).all()


def test_focal_down_weights_easy_examples() -> None:
    """A confident right answer costs far less under focal loss than under CE; a wrong one
    almost as much."""
    y = torch.tensor([0])
    easy, hard = torch.tensor([[4.0, 0.0]]), torch.tensor([[-2.0, 0.0]])
    ratio_easy = (focal_loss(easy, y, gamma=2.0) / F.cross_entropy(easy, y)).item()
    ratio_hard = (focal_loss(hard, y, gamma=2.0) / F.cross_entropy(hard, y)).item()
    assert ratio_easy < 1e-3 and ratio_hard > 0.75


def test_focal_gradient_is_finite_at_certainty() -> None:
    logits = torch.tensor([[60.0, -60.0], [-60.0, 60.0]], requires_grad=True)
    focal_loss(logits, torch.tensor([0, 0]), gamma=2.5).backward()
    assert torch.isfinite(logits.grad).all()


def test_weighted_ce_equals_cross_entropy_with_weights(batch) -> None:
    logits, y = batch
    w = balanced_class_weights(y, 5)
    loss = make_loss("weighted-ce", class_weights=w)
    assert torch.allclose(loss(logits, y), F.cross_entropy(logits, y, weight=w))
    assert torch.allclose(make_loss("ce")(logits, y), F.cross_entropy(logits, y))
    with pytest.raises(ValueError, match="class weights"):
        make_loss("weighted-ce")
    with pytest.raises(ValueError, match="loss must be one of"):
        make_loss("hinge")


def test_the_loss_is_float32_from_low_precision_logits(batch) -> None:
    logits, y = batch
    for kind in LOSSES:
        loss = make_loss(kind, class_weights=torch.ones(5))
        out = loss(logits.to(torch.bfloat16), y)
        assert out.dtype == torch.float32


def test_training_loss_takes_weights_from_the_training_labels(batch) -> None:
    logits, _ = batch
    labels = torch.tensor([0] * 20 + [1] * 6 + [2] * 3 + [3] * 2 + [4])

    class Labelled(torch.utils.data.Dataset):
        def __init__(self):
            self.labels = labels

    cfg = TrainConfig(loss="weighted-ce")
    loss = training_loss(cfg, Labelled())
    expected = F.cross_entropy(logits, labels, weight=balanced_class_weights(labels, 5))
    assert torch.allclose(loss(logits, labels), expected)
    # a TensorDataset (cached sentence embeddings): the last tensor is the labels
    cached = torch.utils.data.TensorDataset(torch.zeros(len(labels), 3), labels)
    assert torch.allclose(training_loss(cfg, cached)(logits, labels), expected)
    # focal with gamma from the config
    focal = training_loss(TrainConfig(loss="focal", focal_gamma=1.0), Labelled())
    assert torch.allclose(focal(logits, labels), focal_loss(logits, labels, gamma=1.0))


# --- per-class report --------------------------------------------------------------------------

def test_classification_report_by_hand() -> None:
    truth = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 0, 1]
    report = classification_report(truth, pred, ["a", "b", "c", "d"])
    a, b, c, d = (report["per_class"][k] for k in "abcd")
    assert a == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                 "f1": pytest.approx(2 / 3), "support": 3}
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((1 / 3, 1 / 2, 2 / 5))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 1)
    assert d["support"] == 0
    # d has no support and no prediction: left out of the macro average (as scikit-learn)
    assert report["macro_f1"] == pytest.approx((2 / 3 + 2 / 5 + 0) / 3, abs=1e-6)
    from sklearn.metrics import f1_score

    assert report["macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro"), abs=1e-6)


def test_slice_report_per_class_figures_and_flags() -> None:
    frame = pd.DataFrame({
        "predicted": ["ham"] * 95 + ["ham"] * 3 + ["spam"] * 2 + ["ham"] * 5,
        "label": ["ham"] * 95 + ["spam"] * 3 + ["spam"] * 2 + [None] * 5,
    })
    table = class_metrics(frame, margin=0.05, min_count=5).set_index("class")
    ham, spam = table.loc["ham"], table.loc["spam"]
    assert (ham.support, ham.n_predicted, spam.support, spam.n_predicted) == (95, 98, 5, 2)
    assert spam.recall == pytest.approx(0.4) and spam.precision == pytest.approx(1.0)
    assert ham.recall == pytest.approx(1.0) and ham.precision == pytest.approx(95 / 98)
    assert spam.f1 == pytest.approx(2 * 2 / (5 + 2))
    # 97% accuracy hides a 40% recall: spam is flagged, ham is not
    assert bool(spam.flagged) and not bool(ham.flagged)
    assert not class_metrics(frame, margin=0.05, min_count=6)["flagged"].any()
    assert "! spam" in format_class_table(class_metrics(frame, min_count=5))
    assert class_metrics(frame.assign(label=None)).empty
    assert "no labelled rows" in format_class_table(class_metrics(frame.drop(columns="label")))


# --- options -----------------------------------------------------------------------------------

def test_loss_and_precision_options_on_both_commands() -> None:
    cfg = config_from_args(["--loss", "focal", "--focal-gamma", "1.5", "--precision", "bf16"])
    assert (cfg.loss, cfg.focal_gamma, cfg.precision) == ("focal", 1.5, "bf16")
    text = text_config_from_args(["--loss", "weighted-ce", "--precision", "bf16"])
    assert (text.loss, text.precision) == ("weighted-ce", "bf16")
    # --class-weights is the deprecated spelling of --loss weighted-ce
    assert text_config_from_args(["--class-weights"]).loss == "weighted-ce"
    assert TextTrainConfig(class_weights=True).loss == "weighted-ce"
    with pytest.raises(ValueError, match="contradicts"):
        TextTrainConfig(class_weights=True, loss="focal")
    with pytest.raises(ValueError, match="focal_gamma"):
        TrainConfig(focal_gamma=-1)


@pytest.mark.parametrize("argv", [["--precision", "16-mixed"], ["--loss", "hinge"],
                                  ["--precision", "8"]])
def test_bad_loss_or_precision_exits_with_a_message(argv, capsys) -> None:
    for parse in (config_from_args, text_config_from_args):
        with pytest.raises(SystemExit) as exc:
            parse(argv)
        assert exc.value.code == 2
    if argv[1] == "16-mixed":
        assert "needs CUDA" in capsys.readouterr().err


def test_16_mixed_is_refused_on_cpu_and_bf16_autocasts() -> None:
    assert "needs CUDA" in precision_error("16-mixed", "cpu")
    assert precision_error("16-mixed", "cuda:0") is None
    with pytest.raises(ValueError, match="needs CUDA"):
        MixedPrecision("16-mixed", torch.device("cpu"))
    amp = MixedPrecision("bf16", torch.device("cpu"))
    layer = torch.nn.Linear(4, 3)
    with amp.autocast():
        out = layer(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    assert amp.scaler is None
    with MixedPrecision("32", torch.device("cpu")).autocast():
        assert layer(torch.randn(2, 4)).dtype == torch.float32
    assert torch.isfinite(out.detach().float()).all()


def test_the_slices_command_shows_and_writes_per_class_figures(tmp_path, capsys) -> None:
    """``python -m monitoring slices``: the per-class table from feedback labels, in the text
    and in --json."""
    import json

    from monitoring.__main__ import main
    from monitoring.store import PredictionRecord, open_log

    def record(i: int, predicted: str) -> PredictionRecord:
        probs = np.array([0.9, 0.1], dtype=np.float32)
        return PredictionRecord(
            request_id=f"r{i}", item=0, ts=1000.0 + i, model="m", version="v1",
            predicted=predicted, confidence=0.9, probabilities=probs,
            embedding=np.zeros(4, dtype=np.float32),
            features={"width": 32.0, "height": 32.0, "brightness": 0.5})

    # 40 ham answered ham; 10 spam, 4 caught: recall 0.4 under a 0.88 accuracy
    truth = ["ham"] * 40 + ["spam"] * 10
    answers = ["ham"] * 40 + ["spam"] * 4 + ["ham"] * 6
    with open_log(tmp_path / "log.db") as log:
        log.write_batch([record(i, p) for i, p in enumerate(answers)])
        log.add_feedback_many({f"r{i}": label for i, label in enumerate(truth)})
    out = tmp_path / "slices.json"
    code = main(["slices", "--model", "m", "--log", str(tmp_path / "log.db"), "--since",
                 "1970-01-01T00:00:00Z", "--min-count", "5", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "per class" in printed and "! spam" in printed
    per_class = {row["class"]: row for row in json.loads(out.read_text())["per_class"]}
    assert per_class["spam"]["recall"] == pytest.approx(0.4)
    assert per_class["spam"]["support"] == 10 and per_class["spam"]["flagged"]
    assert per_class["ham"]["precision"] == pytest.approx(40 / 46)
