"""Drift reports on real digits through the real preprocessing and the exported model.

Windows are built from digit images the session's model never saw (neither trained, validated
nor tested on: the fixture trains on a 600-image subset), passed through
``preprocessing.image_features`` and the ONNX model as the service would. Planted drift (brighter,
rotated, noisier images) must be flagged; windows drawn from the same distribution as the
reference must not, and the false-positive rate over seeds is measured and printed.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from monitoring.drift import DriftConfig, drift_report
from monitoring.ood import fit_ood
from monitoring.frames import embedding_columns, reference_frame
from monitoring.reference import load_reference, softmax
from monitoring.store import PredictionRecord, open_log
from preprocessing import IMAGE_FEATURES, decode_image, image_features, image_to_array, load_spec

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
WINDOW = 300
SEEDS = 10
MAX_FPR = 0.2


class Model:
    """The exported model as the service runs it: bytes -> features, outputs."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime as ort

        self.folder = folder
        self.spec = load_spec((folder / "spec.json").read_text())
        self.reference = load_reference(folder)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])

    def outputs(self, blobs: list[bytes]) -> dict[str, np.ndarray]:
        images = [decode_image(b, self.spec) for b in blobs]
        x = np.stack([image_to_array(img, self.spec) for img in images])
        logits, emb = self.session.run(None, {"input": x})
        features = np.array([[image_features(img)[k] for k in IMAGE_FEATURES] for img in images])
        return {"features": features, "embeddings": emb, "probs": softmax(logits)}

    def frame(self, blobs: list[bytes]) -> pd.DataFrame:
        out = self.outputs(blobs)
        columns = {k: out["features"][:, i] for i, k in enumerate(IMAGE_FEATURES)}
        columns.update(zip(embedding_columns(out["embeddings"].shape[1]), out["embeddings"].T))
        columns["predicted"] = np.array(self.reference.classes)[out["probs"].argmax(1)]
        columns["confidence"] = out["probs"].max(1)
        return pd.DataFrame(columns)


@pytest.fixture(scope="module")
def model(digits_model) -> Model:
    import bentoml

    return Model(Path(bentoml.models.get(digits_model.tag).path))


@pytest.fixture(scope="module")
def unseen(digits_model) -> list[bytes]:
    """Digits outside the fixture's train/val/test subset: same distribution, never seen."""
    from training.data import digits_images

    splits = digits_model.result.splits
    used = set(splits.train.names) | set(splits.val.names) | set(splits.test.names)
    data = digits_images()
    return [b for b, name in zip(data.blobs, data.names) if name not in used]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def planted(blob: bytes, kind: str, rng: np.random.Generator) -> bytes:
    img = Image.open(io.BytesIO(blob)).convert("L")
    if kind == "rotated":
        return _png(img.rotate(25, resample=Image.BICUBIC))
    pixels = np.asarray(img, dtype=np.float64)
    pixels = pixels + 40.0 if kind == "brighter" else pixels + rng.normal(0, 25, pixels.shape)
    return _png(Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L"))


@pytest.fixture(scope="module")
def unseen_frame(model, unseen) -> pd.DataFrame:
    return model.frame(unseen)


@pytest.mark.parametrize("kind", ["brighter", "rotated", "noisier"])
def test_planted_drift_is_flagged(model, unseen, kind) -> None:
    rng = np.random.default_rng(0)
    blobs = [planted(unseen[i], kind, rng) for i in rng.choice(len(unseen), WINDOW, replace=False)]
    result = drift_report(reference_frame(model.reference), model.frame(blobs), IMAGE_FEATURES)
    assert result.dataset_drift, f"{kind} not flagged:\n{result.rows}"
    print(f"{kind}: drifted {[r.feature for r in result.drifted]}")


def test_windows_from_the_reference_distribution_are_rarely_flagged(model, unseen_frame) -> None:
    reference = reference_frame(model.reference)
    flagged = []
    for seed in range(SEEDS):
        window = unseen_frame.sample(n=WINDOW, random_state=seed)
        result = drift_report(reference, window, IMAGE_FEATURES, DriftConfig(seed=seed))
        flagged.append(result.dataset_drift)
    fpr = float(np.mean(flagged))
    print(f"false-positive rate over {SEEDS} seeds (windows of {WINDOW}, reference "
          f"{len(reference)} rows): {fpr:.2f}")
    assert fpr <= MAX_FPR


def test_ood_flags_noise_images_but_few_unseen_digits(model, unseen) -> None:
    scorer = fit_ood(model.reference)
    rng = np.random.default_rng(0)
    noise = [_png(Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L"))
             for _ in range(100)]
    noise += [_png(Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), "RGB"))
              for _ in range(100)]
    rates = {}
    for name, blobs in (("noise", noise), ("unseen digits", unseen)):
        out = model.outputs(blobs)
        rates[name] = float(scorer.score(out["probs"], out["embeddings"])[1].mean())
    print(f"OOD flag rate: {rates}")
    assert rates["noise"] >= 0.9
    assert rates["unseen digits"] <= 0.2


def _log(path: Path, model: Model, blobs: list[bytes], version: str) -> None:
    out = model.outputs(blobs)
    now = time.time() - 60
    with open_log(path) as log:
        log.write_batch([
            PredictionRecord(f"req-{i}", 0, now, "digits-cnn", version,
                             model.reference.classes[int(p.argmax())], float(p.max()), p, e,
                             dict(zip(IMAGE_FEATURES, f.tolist())))
            for i, (p, e, f) in enumerate(zip(out["probs"], out["embeddings"], out["features"]))])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitoring", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_cli_exit_codes_and_outputs(backend, model, unseen, digits_model, tmp_path, request
                                    ) -> None:
    """The same report on either backend; PostgreSQL keeps the latest verdict in the database
    (every replica's gauges read it), SQLite in drift_latest.json beside the file."""
    from monitoring.exporter import read_state

    def target(name: str) -> str:
        if backend == "sqlite":
            return str(tmp_path / f"{name}.db")
        return request.getfixturevalue("postgres_cluster").database()

    version = digits_model.tag.split(":")[1]
    rng = np.random.default_rng(1)
    picks = rng.choice(len(unseen), WINDOW, replace=False)
    common = ["--model", "digits-cnn", "--since", "1h", "--reference", str(model.folder)]

    same_log = target("same")
    _log(same_log, model, [unseen[i] for i in picks], version)
    same = _cli("drift", "--log", same_log, "--out", str(tmp_path / "s"), *common)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "dataset drift: no" in same.stdout
    assert (tmp_path / "s" / "drift.html").stat().st_size > 10_000
    state = read_state(tmp_path / "drift_latest.json" if backend == "sqlite" else same_log)
    assert state["models"]["digits-cnn"]["dataset_drift"] is False

    brighter = [planted(unseen[i], "brighter", rng) for i in picks]
    bright_log = target("bright")
    _log(bright_log, model, brighter, version)
    bright = _cli("drift", "--log", bright_log, "--out", str(tmp_path / "b"), *common)
    assert bright.returncode == 1, bright.stdout + bright.stderr
    assert "brightness" in bright.stdout and "YES" in bright.stdout

    missing = _cli("drift", "--log", same_log, "--model", "no-such-model")
    assert missing.returncode == 2 and "no predictions" in missing.stderr
    slices = _cli("slices", "--log", bright_log, *common)
    assert slices.returncode == 0, slices.stdout + slices.stderr


def test_a_large_window_against_a_small_reference_is_not_flagged() -> None:
    """Evidently's goodness-of-fit chi-square flags this (the reference's own sampling noise at
    50k rows); the two-sample test the report uses must not."""
    from tools.scale_bench import reference_frame as synthetic_frame

    rng = np.random.default_rng(3)
    reference, window = synthetic_frame(270, rng), synthetic_frame(50_000, rng)
    result = drift_report(reference, window, IMAGE_FEATURES, DriftConfig(max_rows=50_000))
    assert not result.dataset_drift, [r for r in result.rows if r.drifted]
    methods = {r.method for r in result.rows if r.feature in ("predicted", "width")}
    assert methods == {"chi2_2sample"}
