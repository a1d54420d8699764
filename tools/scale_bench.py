"""``python -m tools.scale_bench``: how the monitoring jobs scale, on synthetic data.

Times (one process, wall clock):
  * writing N logged predictions through ``PredictionLog.write_batch`` in batches (the cost the
    service pays per answer), then reading the window back with ``PredictionLog.frame``;
  * the drift report (Evidently) over those N rows against a reference of ``--reference-rows``;
  * the per-slice metrics over M rows (an in-memory frame: three tag slices, two derived ones,
    60% of rows labelled).

Synthetic data has the shapes of the digits model (10 image features, 128-d embeddings,
10 classes); the figures depend on shapes and row counts, not on what the numbers mean.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
import pandas as pd

from monitoring.drift import DriftConfig, drift_report
from monitoring.frames import embedding_columns
from monitoring.reference import softmax
from monitoring.slice_metrics import add_derived_slices, slice_metrics
from monitoring.store import PredictionLog, PredictionRecord
from preprocessing import IMAGE_FEATURES

T = TypeVar("T")
CLASSES = tuple(str(i) for i in range(10))


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def synthetic(n: int, rng: np.random.Generator, dim: int = 128, shift: float = 0.0
              ) -> dict[str, np.ndarray]:
    """Features, embeddings and probabilities with the digits model's shapes."""
    features = rng.normal(0.3, 0.05, (n, len(IMAGE_FEATURES))) + shift
    features[:, :2] = rng.choice([32.0, 64.0, 300.0], (n, 1))  # width = height
    features[:, 2] = 1.0
    classes = rng.integers(0, len(CLASSES), n)
    centres = np.random.default_rng(0).normal(0, 1, (len(CLASSES), dim))
    embeddings = (centres[classes] + rng.normal(0, 0.7, (n, dim))).astype(np.float32)
    logits = rng.normal(0, 1, (n, len(CLASSES)))
    logits[np.arange(n), classes] += 4.0
    return {"features": features, "embeddings": embeddings, "probs": softmax(logits),
            "classes": classes}


def reference_frame(n: int, rng: np.random.Generator) -> pd.DataFrame:
    data = synthetic(n, rng)
    frame = pd.DataFrame(data["features"], columns=list(IMAGE_FEATURES))
    emb = pd.DataFrame(data["embeddings"], columns=embedding_columns(data["embeddings"].shape[1]))
    frame = pd.concat([frame, emb], axis=1)
    frame["predicted"] = np.array(CLASSES)[data["probs"].argmax(1)]
    frame["confidence"] = data["probs"].max(1)
    return frame


def log_rows(log: PredictionLog, n: int, rng: np.random.Generator, batch: int = 64) -> None:
    data = synthetic(n, rng)
    now = time.time()
    for start in range(0, n, batch):
        records = [
            PredictionRecord(f"req-{i // 4}", i % 4, now + i * 1e-3, "bench", "v1",
                             CLASSES[int(data["probs"][i].argmax())], float(data["probs"][i].max()),
                             data["probs"][i], data["embeddings"][i],
                             dict(zip(IMAGE_FEATURES, data["features"][i].tolist())),
                             {"device": ("ios", "android", "web")[i % 3]}, 4.2)
            for i in range(start, min(start + batch, n))]
        log.write_batch(records)


def slice_frame(n: int, rng: np.random.Generator) -> pd.DataFrame:
    predicted = rng.integers(0, 10, n)
    label = np.where(rng.random(n) < 0.9, predicted, rng.integers(0, 10, n)).astype(str)
    return pd.DataFrame({
        "predicted": predicted.astype(str),
        "confidence": rng.beta(8, 2, n),
        "label": pd.Series(label).where(rng.random(n) < 0.6, None),
        "ood": rng.random(n) < 0.05,
        "tag.device": rng.choice(["ios", "android", "web", "other"], n),
        "tag.region": rng.choice(["eu", "us", "apac"], n),
        "tag.customer": rng.choice([f"c{i}" for i in range(20)], n),
        "width": rng.choice([32.0, 300.0, 2000.0], n),
        "height": rng.choice([32.0, 300.0, 2000.0], n),
        "brightness": rng.random(n),
    })


def run(log_n: int, slice_n: int, reference_n: int) -> list[tuple[str, float]]:
    rng = np.random.default_rng(1)
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        log = PredictionLog(Path(tmp) / "bench.db")
        _, seconds = timed(lambda: log_rows(log, log_n, rng))
        rows.append((f"write {log_n:,} predictions (batches of 64)", seconds))
        rows.append(("  per record (us)", seconds / log_n * 1e6))
        current, seconds = timed(lambda: log.frame("bench"))
        rows.append((f"read {len(current):,} rows into a frame", seconds))
        reference = reference_frame(reference_n, rng)
        _, seconds = timed(lambda: __import__("evidently"))
        rows.append(("import evidently (once per report command)", seconds))
        config = DriftConfig()
        result, seconds = timed(lambda: drift_report(reference, current, IMAGE_FEATURES, config))
        rows.append((f"drift report over {log_n:,} rows (tests on {result.tested_rows:,})",
                     seconds))
        log.close()
    frame = slice_frame(slice_n, rng)
    (derived_frame, derived), seconds = timed(lambda: add_derived_slices(frame))
    rows.append((f"derived slices over {slice_n:,} rows", seconds))
    columns = ["tag.device", "tag.region", "tag.customer", *derived]
    table, seconds = timed(lambda: slice_metrics(derived_frame, columns))
    rows.append((f"slice metrics over {slice_n:,} rows ({len(table) - 1} slice values)", seconds))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.scale_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-rows", type=int, default=100_000)
    parser.add_argument("--slice-rows", type=int, default=1_000_000)
    parser.add_argument("--reference-rows", type=int, default=270,
                        help="rows in the reference profile (the digits validation split: 270)")
    args = parser.parse_args(argv)
    print(f"scale bench: {vars(args)}")
    for name, seconds in run(args.log_rows, args.slice_rows, args.reference_rows):
        print(f"{name:<58} {seconds:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
