"""The robustness suites (training/robustness.py), the attacks (training/adversarial.py) and the
metrics keys the export writes (training/robust_metrics.py), without an ONNX export."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from preprocessing import ImageSpec, decode_image, image_to_array
from training import adversarial as adv
from training.augment import Augment
from training.robust_metrics import image_metrics, summary_line, text_metrics
from training.robustness import (CLEAN, IMAGE_VARIATIONS, TEXT_VARIATIONS, image_suite,
                                 image_variation_names, no_accents, suite_accuracy, text_suite,
                                 truncate, worst_variation)

SPEC = ImageSpec(height=16, width=16, color_mode="L", mean=(0.3,), std=(0.2,))


def digit_like(seed: int, size: int = 16) -> bytes:
    """A white stroke on black (a small 'digit') as PNG bytes."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((size, size), np.uint8)
    r = int(rng.integers(3, size - 3))
    arr[2:size - 2, r - 1:r + 1] = 255
    arr[r, 3:size - 3] = int(rng.integers(120, 255))
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


BLOBS = [digit_like(i) for i in range(6)]


# -- suites ------------------------------------------------------------------------------------

def test_image_variations_are_named_for_what_users_do() -> None:
    names = set(IMAGE_VARIATIONS)
    for method in ("nearest", "bilinear", "bicubic"):
        assert {f"resize_{method}_down", f"resize_{method}_up", f"lowres_{method}"} <= names
    assert {"jpeg_q90", "jpeg_q60", "jpeg_q30", "rotate", "shift", "brightness", "contrast",
            "invert", "noise"} <= names
    assert "invert" in image_variation_names("L")
    assert "invert" not in image_variation_names("RGB")
    assert "invert" in image_variation_names("RGB", invert=True)
    assert "invert" not in image_variation_names("L", invert=False)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_every_image_variation_returns_an_image_of_the_same_mode(mode: str) -> None:
    img = decode_image(BLOBS[0], ImageSpec(height=16, width=16, color_mode=mode,
                                           mean=(0.5,) * (1 if mode == "L" else 3),
                                           std=(0.5,) * (1 if mode == "L" else 3)))
    for name, fn in IMAGE_VARIATIONS.items():
        out = fn(img, np.random.default_rng(0))
        assert isinstance(out, Image.Image) and out.mode == mode, name
    assert IMAGE_VARIATIONS["resize_nearest_down"](img, None).size == (8, 8)
    assert IMAGE_VARIATIONS["resize_bicubic_up"](img, None).size == (40, 40)
    assert IMAGE_VARIATIONS["lowres_nearest"](img, None).size == img.size


def test_image_suite_is_seeded_deterministic_and_encoded() -> None:
    a = image_suite(BLOBS, seed=3, spec=SPEC)
    b = image_suite(BLOBS, seed=3, spec=SPEC)
    c = image_suite(BLOBS, seed=4, spec=SPEC)
    assert list(a) == [CLEAN, *IMAGE_VARIATIONS]
    assert a == b
    assert a[CLEAN] == BLOBS
    for name in ("rotate", "shift", "brightness", "contrast", "noise"):
        assert a[name] != c[name], name  # random per seed
    assert a["invert"] == c["invert"]  # deterministic variations do not depend on it
    for name, blobs in a.items():
        assert len(blobs) == len(BLOBS)
        fmt = Image.open(io.BytesIO(blobs[0])).format
        assert fmt == ("JPEG" if name.startswith("jpeg_") else "PNG"), name
    # A prefix of the inputs gets the same variations (per-item seeding).
    assert image_suite(BLOBS[:2], seed=3, names=["rotate"], spec=SPEC)["rotate"] == \
        a["rotate"][:2]
    with pytest.raises(KeyError, match="unknown image variations"):
        image_suite(BLOBS, names=["sepia"])


def test_jpeg_variation_returns_the_decoded_jpeg() -> None:
    img = decode_image(BLOBS[1], SPEC)
    out = IMAGE_VARIATIONS["jpeg_q30"](img, np.random.default_rng(0))
    sent = image_suite([BLOBS[1]], names=["jpeg_q30"], spec=SPEC)["jpeg_q30"][0]
    assert np.array_equal(np.asarray(out), np.asarray(decode_image(sent, SPEC)))
    assert not np.array_equal(np.asarray(out), np.asarray(img))


def test_text_suite_is_seeded_deterministic_and_named() -> None:
    texts = ["Příliš žluťoučký kůň úpěl ďábelské ódy.", "Привет, как дела?", "hello world"]
    a, b, c = text_suite(texts, 1), text_suite(texts, 1), text_suite(texts, 2)
    assert list(a) == [CLEAN, *TEXT_VARIATIONS]
    assert set(TEXT_VARIATIONS) == {"upper", "random_case", "typos", "no_accents",
                                    "whitespace", "punctuation", "truncate"}
    assert a == b and a[CLEAN] == texts
    assert a["typos"] != c["typos"]
    for name, out in a.items():
        assert all(isinstance(t, str) and t.strip() for t in out), name
    assert a["upper"][2] == "HELLO WORLD"
    assert a["truncate"] == ["Příliš žluťoučký kůň", "Привет, как", "hello"]


def test_no_accents_drops_latin_diacritics_only() -> None:
    assert no_accents("Łódź, Straße, ça été, Ørsted") == "Lodz, Strasse, ca ete, Orsted"
    assert no_accents("Всё хорошо, й") == "Всё хорошо, й"
    assert truncate("one") == "one"


def test_suite_accuracy_and_worst_variation() -> None:
    suite = {CLEAN: [0, 1, 2, 3], "a": [0, 1, 2, 0], "b": [9, 9, 2, 3]}
    acc = suite_accuracy(lambda items: np.array(items) % 10, suite, [0, 1, 2, 3])
    assert acc == {CLEAN: 1.0, "a": 0.75, "b": 0.5}
    assert worst_variation(acc) == {"variation": "b", "accuracy": 0.5, "drop": 0.5}
    with pytest.raises(KeyError):
        suite_accuracy(lambda items: np.zeros(len(items)), {"a": [1]}, [1])


def test_augment_covers_the_variations_and_stays_seeded() -> None:
    img = decode_image(BLOBS[2], SPEC)
    augment = Augment.robust(1.0, invert=True)
    outs = [augment(img, np.random.default_rng(i), SPEC) for i in range(4)]
    assert all(o.size == img.size and o.mode == img.mode for o in outs)
    again = augment(img, np.random.default_rng(0), SPEC)
    assert again.tobytes() == outs[0].tobytes()
    assert Augment.robust(0.5, invert=False).p_invert == 0.0
    plain = Augment()
    assert (plain.p_resample, plain.p_jpeg, plain.p_invert) == (0.0, 0.0, 0.0)


# -- attacks ----------------------------------------------------------------------------------

class Tiny(nn.Module):
    """A [N,1,16,16] -> (logits, embedding) model with batch norm, like the CNNs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(emb), emb


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.stack([image_to_array(decode_image(b, SPEC), SPEC) for b in BLOBS]))
    return x, Tiny().eval()(x)[0].argmax(1)  # labels = its own predictions: all correct


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_attacks_stay_in_the_pixel_ball_whatever_the_normalisation(attack: str) -> None:
    model = Tiny().eval()
    x, y = inputs()
    mean, std = adv.pixel_affine(SPEC)
    eps = 8 / 255
    out = (adv.fgsm(model, x, y, eps, mean, std) if attack == "fgsm"
           else adv.pgd(model, x, y, eps, mean, std, 5, torch.Generator().manual_seed(0)))
    before, after = x * std + mean, out * std + mean
    assert float((after - before).abs().max()) <= eps + 1e-5
    assert float(after.min()) >= -1e-6 and float(after.max()) <= 1 + 1e-6
    assert float((after - before).abs().max()) > eps / 2  # it did move
    assert all(p.grad is None for p in model.parameters())


def test_image_attack_success_is_over_correct_inputs() -> None:
    model = Tiny()
    x, y = inputs()
    wrong = y.clone()
    wrong[0] = (y[0] + 1) % 3  # one input the model gets wrong: not attacked
    report = adv.image_attacks(model, x.numpy(), wrong.numpy(), SPEC, epsilons=(0.0, 0.5))
    assert report.attacked == len(BLOBS) - 1
    assert report.fgsm["0.0000"] == 0.0 and report.pgd["0.0000"] == 0.0
    assert set(report.fgsm) == set(report.pgd) == {"0.0000", "0.5000"}
    assert 0.0 <= report.pgd["0.5000"] <= 1.0


def test_fgsm_training_doubles_the_batch_and_keeps_batchnorm_stats() -> None:
    model = Tiny().train()
    x, y = inputs()
    stats = (model.bn.running_mean.clone(), model.bn.num_batches_tracked.clone())
    perturb = adv.FGSMTraining(4 / 255, SPEC, seed=0)
    x2, y2 = perturb(model, x, y)
    assert x2.shape[0] == 2 * len(x) and torch.equal(y2, torch.cat([y, y]))
    assert torch.equal(x2[:len(x)], x)
    mean, std = adv.pixel_affine(SPEC)
    assert float(((x2[len(x):] - x) * std).abs().max()) <= 4 / 255 + 1e-5
    assert torch.equal(model.bn.running_mean, stats[0])
    assert torch.equal(model.bn.num_batches_tracked, stats[1])
    again = adv.FGSMTraining(4 / 255, SPEC, seed=0)(model, x, y)[0]
    assert torch.equal(again, x2)


def test_char_attack_counts_flips_within_the_edit_budget() -> None:
    # A "model" that says class 1 iff the text contains a "z": deleting/replacing letters of
    # "zzz" needs more edits than "za".
    def proba(texts: list[str]) -> np.ndarray:
        return np.array([[0.2, 0.8] if "z" in t else [0.8, 0.2] for t in texts])

    report = adv.char_attack(proba, ["za", "zzzzzzzz", "abc"], [1, 1, 1], candidates=32,
                             seed=0)
    assert report.attacked == 2  # "abc" is misclassified to begin with
    assert set(report.charedit) == {"1", "2", "3"}
    assert report.charedit["1"] == 0.5  # "za" -> "a" in one edit; "zzzzzzzz" survives
    assert report.adversarial_texts and all("z" not in t for t in report.adversarial_texts)


# -- the metrics keys --------------------------------------------------------------------------

class TorchSession:
    """An ONNX Runtime session stand-in: ``run`` answers with a PyTorch model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    def run(self, names, feed):
        with torch.no_grad():
            return [t.numpy() for t in self.model(torch.from_numpy(feed["input"]))]


def profile_of(model: nn.Module, n: int = 30) -> dict[str, np.ndarray]:
    blobs = [digit_like(100 + i) for i in range(n)]
    x = torch.from_numpy(np.stack([image_to_array(decode_image(b, SPEC), SPEC) for b in blobs]))
    with torch.no_grad():
        logits, emb = model.eval()(x)
    pred = logits.argmax(1).numpy()
    return {"feature_names": np.array(["mean"]), "features": np.zeros((n, 1)),
            "embeddings": emb.numpy(), "logits": logits.numpy(), "labels": pred,
            "predicted": pred, "confidence": torch.softmax(logits, 1).max(1).values.numpy()}


def check_contract(metrics: dict, attack_keys: set[str]) -> None:
    assert metrics["robustness"][CLEAN] >= 0 and list(metrics["robustness"])[0] == CLEAN
    worst = metrics["robustness_worst"]
    assert set(worst) == {"variation", "accuracy", "drop"}
    assert worst["variation"] in metrics["robustness"]
    assert worst["accuracy"] == min(v for k, v in metrics["robustness"].items() if k != CLEAN)
    assert abs(worst["drop"] - (metrics["robustness"][CLEAN] - worst["accuracy"])) < 1e-12
    assert set(metrics["adversarial"]) == attack_keys
    assert "attack_success" in metrics and "adversarial_ood_flag_rate" in metrics
    json.dumps(metrics)  # JSON-serialisable as written into metrics.json
    assert summary_line(metrics).startswith("robustness     worst ")


def test_image_metrics_have_the_contract_keys() -> None:
    model = Tiny()
    x, y = inputs()
    metrics = image_metrics(model, TorchSession(model), SPEC, BLOBS, y.tolist(), profile_of(model),
                            ["a", "b", "c"])
    check_contract(metrics, {"fgsm", "pgd"})
    assert set(metrics["robustness"]) == {CLEAN, *image_variation_names("L")}
    assert set(metrics["adversarial"]["pgd"]) == {adv.eps_key(e) for e in adv.EPSILONS}
    assert metrics["attack_success"] == metrics["adversarial"]["pgd"]["0.0314"]
    assert metrics["robustness"][CLEAN] == 1.0  # labels are its own predictions


def test_text_metrics_have_the_contract_keys() -> None:
    from preprocessing import TextPreprocessor, TextSpec
    from training.text.tokenizer import train_bpe_tokenizer

    texts = ["hello world", "bonjour le monde", "hallo welt wie gehts", "hola mundo", "ciao"] * 4
    tokenizer = train_bpe_tokenizer(texts, 200)
    pre = TextPreprocessor(TextSpec(max_length=32), tokenizer)

    class BagSession:  # logits: does the text have an "o" token-ish? (ids parity)
        def run(self, names, feed):
            ids, mask = feed["input_ids"], feed["attention_mask"]
            s = ((ids % 2) * mask).sum(1, keepdims=True).astype(np.float32)
            logits = np.concatenate([s, mask.sum(1, keepdims=True) - s], 1).astype(np.float32)
            return [logits, logits]

    session = BagSession()
    labels = [int(np.argmax(session.run(None, {"input_ids": a, "attention_mask": m})[0]))
              for a, m in (pre.encode([t]) for t in texts)]
    from training.text.export import text_reference_profile

    profile = text_reference_profile(session, pre, texts, labels)
    metrics = text_metrics(session, pre, texts, labels, profile, ["x", "y"], max_attack=8)
    check_contract(metrics, {"charedit"})
    assert set(metrics["robustness"]) == {CLEAN, *TEXT_VARIATIONS}
    assert set(metrics["adversarial"]["charedit"]) == {"1", "2", "3"}
    assert metrics["attack_success"] == metrics["adversarial"]["charedit"]["2"]
    assert metrics["adversarial_info"]["attack_sample"] == 8


def test_fit_mixes_fgsm_examples_into_every_training_batch() -> None:
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    from training.config import TrainConfig, config_from_args
    from training.loop import fit

    x, y = inputs()
    data = TensorDataset(x.repeat(3, 1, 1, 1), y.repeat(3))
    cfg = SimpleNamespace(batch_size=6, lr=1e-3, weight_decay=0.0, warmup_epochs=0.0, epochs=2,
                          patience=5, label_smoothing=0.0, seed=0, progress=False)
    calls: list[int] = []
    fgsm_training = adv.FGSMTraining(8 / 255, SPEC)

    def perturb(model, xb, yb):
        calls.append(len(xb))
        return fgsm_training(model, xb, yb)

    fit(Tiny(), data, data, cfg, perturb=perturb)
    assert calls == [6, 6, 6] * 2  # every batch of both epochs
    assert config_from_args(["--adversarial-training", "0.0314"]).adversarial_training == 0.0314
    with pytest.raises(ValueError, match="adversarial_training"):
        TrainConfig(adversarial_training=2.0)


def test_polarity_follows_the_colour_mode_unless_told() -> None:
    from training.config import TrainConfig, config_from_args

    assert TrainConfig().polarity_varies
    assert not TrainConfig(color_mode="RGB").polarity_varies
    assert TrainConfig(color_mode="RGB", invert=True).polarity_varies
    assert not config_from_args(["--no-invert"]).polarity_varies
    assert config_from_args(["--robust-augment", "0"]).robust_augment == 0.0
    with pytest.raises(ValueError, match="robust_augment"):
        TrainConfig(robust_augment=1.5)
