"""Unit tests for training/: model shapes, one-batch overfit, LR schedule, determinism,
augmentation, datasets over image bytes, folder loading. Runs in well under a minute on 2 cores."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from preprocessing import ImageSpec, decode_image, image_to_array, preprocess_image_bytes
from training.augment import Augment, random_affine
from training.config import TrainConfig, config_from_args
from training.data import (
    DataError,
    ImageDataset,
    LabelledImages,
    data_hash,
    decode_for_model,
    digits_images,
    folder_images,
    stratified_split,
    stratified_subset,
)
from training.loop import param_groups, warmup_cosine
from training.models import CNNConfig, build_model
from training.train import build_datasets, train

SPEC_L = ImageSpec(height=32, width=32, color_mode="L", mean=(0.5,), std=(0.5,))


@pytest.fixture(scope="module")
def digits() -> LabelledImages:
    return digits_images()


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# --- model -------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels,height,width", [(1, 32, 32), (3, 40, 56)])
def test_cnn_forward_returns_logits_and_embedding(channels: int, height: int, width: int) -> None:
    cfg = CNNConfig(in_channels=channels, num_classes=7, widths=(8, 16, 32), embedding_dim=24)
    logits, embedding = build_model(cfg).eval()(torch.randn(5, channels, height, width))
    assert logits.shape == (5, 7)
    assert embedding.shape == (5, 24)


def test_cnn_config_round_trips_through_json() -> None:
    cfg = CNNConfig(in_channels=3, num_classes=4, widths=(8, 16), dropout=0.2)
    assert CNNConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_cnn_overfits_one_batch(digits: LabelledImages) -> None:
    """Sanity check of model + optimiser + data path: 32 real digits are memorised."""
    torch.manual_seed(0)
    batch = digits.subset(range(32))
    x = torch.stack([torch.from_numpy(preprocess_image_bytes(b, SPEC_L)) for b in batch.blobs])
    y = torch.tensor(batch.labels)
    model = build_model(CNNConfig(widths=(8, 16, 32), dropout=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = F.cross_entropy(model(x)[0], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_weight_decay_skips_biases_and_norm_weights() -> None:
    model = build_model(CNNConfig(widths=(8, 16)))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert any(p is model.stem[1].weight for p in no_decay["params"])  # a BatchNorm scale


# --- schedule ----------------------------------------------------------------------------------

def test_warmup_then_cosine_schedule() -> None:
    warmup, total = 10, 100
    factor = warmup_cosine(warmup, total)
    values = [factor(step) for step in range(total)]
    assert values[0] == pytest.approx(0.1)  # starts low
    assert max(values) == pytest.approx(1.0)
    assert values[warmup - 1] == pytest.approx(1.0) and values[warmup] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(values[:warmup - 1], values[1:warmup]))  # ramps up
    assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1:]))  # then decays
    assert values[-1] < 0.001  # to about zero at the end
    assert factor(total) == pytest.approx(0.0, abs=1e-12)


def test_schedule_drives_the_optimizer_lr() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(4, 20))
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(3e-3 / 4)
    assert lrs[3] == pytest.approx(3e-3)
    assert lrs[-1] < 3e-3 * 0.01



# --- early stopping ----------------------------------------------------------------------------

def _fit_on_scripted_val_losses(monkeypatch: pytest.MonkeyPatch, val_losses: list[float],
                                early_stop_from: float, patience: int = 3):
    """``fit`` on a one-weight model whose validation losses are ``val_losses`` in turn; each
    epoch's training sets the weight to the epoch's number, so the weights restored say which
    epoch was kept."""
    from torch.utils.data import TensorDataset

    from training import loop

    losses = iter(val_losses)
    epochs_trained: list[int] = []

    def train_epoch(model, *args, **kwargs) -> float:
        epochs_trained.append(len(epochs_trained) + 1)
        with torch.no_grad():
            model.weight.fill_(float(len(epochs_trained)))
        return 1.0

    monkeypatch.setattr(loop, "train_epoch", train_epoch)
    monkeypatch.setattr(loop, "evaluate", lambda model, loader: (next(losses), 0.5))
    data = TensorDataset(torch.zeros(4, 1), torch.tensor([0, 1, 0, 1]))
    cfg = TrainConfig(epochs=len(val_losses), patience=patience, early_stop_from=early_stop_from,
                      warmup_epochs=0.0, progress=False, loss="ce")
    result = loop.fit(torch.nn.Linear(1, 2, bias=False), data, data, cfg)
    assert result.model.weight.flatten()[0].item() == result.best_epoch  # its weights restored
    return result, epochs_trained


# A lucky epoch while the LR is high (2), then noisier ones; the annealed end is the real best.
LUCKY_EARLY = [0.9, 0.1, 0.5, 0.4, 0.6, 0.3, 0.2, 0.15, 0.12, 0.11]


def test_early_stopping_from_the_first_epoch_keeps_a_lucky_early_epoch(monkeypatch) -> None:
    result, trained = _fit_on_scripted_val_losses(monkeypatch, LUCKY_EARLY, early_stop_from=0.0)
    assert result.best_epoch == 2 and trained == [1, 2, 3, 4, 5] and result.stopped_early


def test_early_stopping_watches_from_its_share_of_the_epochs(monkeypatch) -> None:
    result, trained = _fit_on_scripted_val_losses(monkeypatch, LUCKY_EARLY, early_stop_from=0.5)
    assert result.best_epoch == 10 and len(trained) == 10 and not result.stopped_early
    assert result.val_loss == pytest.approx(0.11)
    # From its first watched epoch on, patience counts as before.
    flat = [0.9, 0.1, 0.5, 0.4, 0.3, 0.35, 0.4, 0.45, 0.5, 0.5]
    result, trained = _fit_on_scripted_val_losses(monkeypatch, flat, early_stop_from=0.5)
    assert result.best_epoch == 5 and trained == [1, 2, 3, 4, 5, 6, 7, 8]


def test_early_stop_start_is_a_share_of_the_epochs_within_the_run() -> None:
    from training.loop import early_stop_start

    assert [early_stop_start(0.5, 40), early_stop_start(0.5, 7), early_stop_start(0.0, 40),
            early_stop_start(1.0, 40), early_stop_start(0.5, 1)] == [20, 4, 1, 40, 1]
    with pytest.raises(ValueError, match="early_stop_from"):
        TrainConfig(early_stop_from=1.5)
    from training.config import build_parser

    assert "(default 0.5)" in " ".join(build_parser().format_help().split())


# --- determinism -------------------------------------------------------------------------------

def test_same_seed_gives_identical_metrics() -> None:
    cfg = TrainConfig(limit=120, epochs=2, widths=(8, 16), progress=False, warmup_epochs=0.5)
    first, second = train(cfg), train(cfg)
    assert first.fit.history and len(first.fit.history) == len(second.fit.history)
    for a, b in zip(first.fit.history, second.fit.history):
        assert {k: v for k, v in a.items() if k != "seconds"} == \
               {k: v for k, v in b.items() if k != "seconds"}
    assert first.test_accuracy == second.test_accuracy
    assert first.data_hash == second.data_hash


# --- augmentation ------------------------------------------------------------------------------

def test_augment_is_deterministic_for_a_seed(digits: LabelledImages) -> None:
    img = decode_image(digits.blobs[0], SPEC_L)
    augment = Augment()
    a = augment(img, np.random.default_rng(7), SPEC_L)
    b = augment(img, np.random.default_rng(7), SPEC_L)
    c = augment(img, np.random.default_rng(8), SPEC_L)
    assert a.size == img.size and a.mode == img.mode
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_affine_identity_and_fill() -> None:
    img = Image.fromarray(np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8))
    same = random_affine(img, 0.0, 1.0, (0.0, 0.0), fill=0)
    assert np.array_equal(np.asarray(same), np.asarray(img))
    shifted = random_affine(Image.new("L", (32, 32), 255), 0.0, 1.0, (5.0, 0.0), fill=0)
    arr = np.asarray(shifted)
    assert (arr[:, :5] == 0).all() and (arr[:, 6:] == 255).all()  # background fills the gap


def test_only_the_train_split_is_augmented(digits: LabelledImages) -> None:
    data = stratified_subset(digits, 100, seed=0)
    splits = stratified_split(data, seed=0)
    train_set, val_set, test_set = build_datasets(splits, SPEC_L, TrainConfig())
    assert train_set.augment is not None
    assert val_set.augment is None and test_set.augment is None
    # Evaluation tensors are exactly what the service computes from the same bytes.
    for i in range(3):
        expected = preprocess_image_bytes(splits.val.blobs[i], SPEC_L)
        assert np.array_equal(val_set[i][0].numpy(), expected)
    # Training items change with the epoch, and are reproducible for a given epoch.
    train_set.set_epoch(1)
    first = train_set[0][0]
    train_set.set_epoch(2)
    assert not torch.equal(first, train_set[0][0])
    train_set.set_epoch(1)
    assert torch.equal(first, train_set[0][0])


# --- data --------------------------------------------------------------------------------------

def test_digits_are_png_bytes_with_string_labels(digits: LabelledImages) -> None:
    assert len(digits) == 1797 and digits.classes == tuple("0123456789")
    img = Image.open(io.BytesIO(digits.blobs[0]))
    assert img.format == "PNG" and img.size == (32, 32) and img.mode == "L"
    assert max(np.asarray(img).ravel()) > 200  # 0..16 scaled up to the 0..255 range


def test_split_is_stratified_disjoint_and_deterministic(digits: LabelledImages) -> None:
    a, b = stratified_split(digits, seed=3), stratified_split(digits, seed=3)
    assert a.train.names == b.train.names and a.test.names == b.test.names
    names = [set(s.names) for s in (a.train, a.val, a.test)]
    assert sum(len(n) for n in names) == len(digits) and len(set.union(*names)) == len(digits)
    assert abs(len(a.val) - 0.15 * len(digits)) <= 2 and abs(len(a.test) - 0.15 * len(digits)) <= 2
    for split in (a.train, a.val, a.test):
        assert set(split.labels) == set(range(10))
    assert stratified_split(digits, seed=4).test.names != a.test.names


def test_too_small_a_split_is_a_clear_error(digits: LabelledImages) -> None:
    with pytest.raises(DataError, match="too few for a stratified"):
        stratified_split(stratified_subset(digits, 40, seed=0), seed=0)


def test_data_hash_ignores_order_but_not_content(digits: LabelledImages) -> None:
    small = digits.subset(range(20))
    reordered = small.subset(list(range(19, -1, -1)))
    assert data_hash(small) == data_hash(reordered)
    changed = dataclasses.replace(small, blobs=(small.blobs[0] + b"\0",) + small.blobs[1:])
    assert data_hash(changed) != data_hash(small)


def write_class_folder(root: Path, name: str, n: int, value: int, fmt: str) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    suffix = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp"}[fmt]
    for i in range(n):
        img = Image.new("RGB", (20 + i, 16), (value, 255 - value, i * 10))
        (folder / f"img{i}.{suffix}").write_bytes(png_bytes(img, fmt))


def test_folder_of_class_subfolders(tmp_path: Path) -> None:
    write_class_folder(tmp_path, "dog", 4, 200, "JPEG")
    write_class_folder(tmp_path, "cat", 3, 10, "PNG")
    write_class_folder(tmp_path, "bird", 3, 90, "BMP")
    (tmp_path / "cat" / "README.txt").write_text("not an image")
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "empty-class").mkdir()

    data = folder_images(tmp_path)
    assert data.classes == ("bird", "cat", "dog")  # sorted; the empty folder is not a class
    assert len(data) == 10 and data.labels.count(1) == 3 and data.labels.count(2) == 4
    assert all(not n.endswith((".txt", ".DS_Store")) for n in data.names)

    spec = ImageSpec(height=16, width=16, color_mode="RGB")
    ds = ImageDataset(data, spec)
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and int(y) == 0

    cfg = config_from_args(["--data", str(tmp_path)])
    assert cfg.color_mode == "RGB"  # photos default to colour, digits to L


def test_folder_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        folder_images(tmp_path / "missing")
    with pytest.raises(DataError, match="at least 2 class"):
        folder_images(tmp_path)  # empty
    write_class_folder(tmp_path, "only", 3, 0, "PNG")
    with pytest.raises(DataError, match="at least 2 class"):
        folder_images(tmp_path)


def test_a_corrupt_file_is_named(tmp_path: Path) -> None:
    write_class_folder(tmp_path, "a", 3, 0, "PNG")
    write_class_folder(tmp_path, "b", 3, 255, "PNG")
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    data = folder_images(tmp_path)
    with pytest.raises(DataError, match="broken.png"):
        decode_for_model(data, ImageSpec(height=8, width=8))


def test_config_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="existing folder"):
        TrainConfig(data=str(tmp_path / "nope"))
    with pytest.raises(SystemExit):
        config_from_args(["--lr", "-1"])
    cfg = config_from_args(["--epochs", "3", "--widths", "8,16"])
    assert cfg.epochs == 3 and cfg.widths == (8, 16) and cfg.color_mode == "L"
    assert image_to_array(Image.new("L", (32, 32)), cfg.image_spec()).shape == (1, 32, 32)
    assert math.isclose(cfg.image_spec().mean[0], 0.5)
