"""``python -m tools.scale_bench``: how the prediction log and its reports scale, per backend.

For each backend (SQLite, PostgreSQL) one log grows through the sizes asked for (default 100k,
1M, 10M rows; 1M rows per day of timestamps, so a large log spans days). At each size:

  * append: 6,400 records written through ``write_batch`` in batches of 64, the service's
    pattern (microseconds per record, at that size);
  * drift: the real ``python -m monitoring drift`` over the whole log, in a subprocess: wall
    seconds and its peak resident memory (``ru_maxrss``). Windows are read in bounded memory:
    the command reads at most ``--max-rows`` (20,000) rows, sampled in SQL, so its memory must
    not grow with the log;
  * slices: the real ``python -m monitoring slices`` likewise (at most 200,000 rows);
  * size on disk.
Then retention: one day pruned (PostgreSQL: dropped as a partition, and the next day deleted
row by row for comparison; SQLite: deleted in chunks).

Synthetic rows have the digits model's shapes (10 image features, a 128-d embedding, 10
classes, one slice tag); the bulk fill reuses a pool of encoded rows with fresh ids and times.
PostgreSQL: a throwaway cluster (tests/postgres.py: Debian's package) unless ``--postgres URL``.
The server's own memory is not in the figures (it is PostgreSQL's shared buffers and caches).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
import pandas as pd

from monitoring.frames import embedding_columns
from monitoring.reference import softmax
from monitoring.store import PredictionLog, PredictionRecord, _row, open_log
from preprocessing import IMAGE_FEATURES

T = TypeVar("T")
CLASSES = tuple(str(i) for i in range(10))
ROOT = Path(__file__).resolve().parents[1]
DAY_ROWS = 1_000_000  # rows per day of timestamps
START = 1_790_000_000.0  # 2026-09-21 (UTC): a fixed start, days are whole
MODEL = "bench"


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
            "logits": logits, "classes": classes}


def reference_frame(n: int, rng: np.random.Generator) -> pd.DataFrame:
    data = synthetic(n, rng)
    frame = pd.DataFrame(data["features"], columns=list(IMAGE_FEATURES))
    emb = pd.DataFrame(data["embeddings"], columns=embedding_columns(data["embeddings"].shape[1]))
    frame = pd.concat([frame, emb], axis=1)
    frame["predicted"] = np.array(CLASSES)[data["probs"].argmax(1)]
    frame["confidence"] = data["probs"].max(1)
    return frame


def write_reference(folder: Path, n: int, rng: np.random.Generator) -> Path:
    """A model version folder with a synthetic reference profile (what the reports read)."""
    data = synthetic(n, rng)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "reference.npz", feature_names=np.array(IMAGE_FEATURES),
             features=data["features"], embeddings=data["embeddings"],
             logits=data["logits"].astype(np.float32), labels=data["classes"],
             predicted=data["probs"].argmax(1), confidence=data["probs"].max(1))
    (folder / "labels.json").write_text(json.dumps(list(CLASSES)))
    return folder


def records(start: int, n: int, data: dict[str, np.ndarray]) -> list[PredictionRecord]:
    pool = len(data["classes"])
    return [PredictionRecord(
        f"req-{i}", 0, START + i * 86_400 / DAY_ROWS, MODEL, "v1",
        CLASSES[int(data["probs"][i % pool].argmax())], float(data["probs"][i % pool].max()),
        data["probs"][i % pool], data["embeddings"][i % pool],
        dict(zip(IMAGE_FEATURES, data["features"][i % pool].tolist())),
        {"device": ("ios", "android", "web")[i % 3]}, 4.2) for i in range(start, start + n)]


class Filler:
    """Grows a log with encoded rows from a pool (fresh request ids and times)."""

    def __init__(self, log: PredictionLog, rng: np.random.Generator, pool: int = 20_000) -> None:
        self.log, self.next = log, 0
        self.data = synthetic(pool, rng)
        self.pool = [_row(r) for r in records(0, pool, self.data)]

    def fill_to(self, n: int, batch: int = 5_000) -> None:
        while self.next < n:
            k = min(batch, n - self.next)
            rows = []
            for i in range(self.next, self.next + k):
                row = list(self.pool[i % len(self.pool)])
                row[0], row[2] = f"req-{i}", START + i * 86_400 / DAY_ROWS
                rows.append(row)
            self.log.insert_rows(rows)
            self.next += k

    def append(self, n: int, batch: int = 64) -> float:
        """Seconds per record for ``n`` records written as the service writes them."""
        started = time.perf_counter()
        for s in range(0, n, batch):
            self.log.write_batch(records(self.next + s, min(batch, n - s), self.data))
        self.next += n
        return (time.perf_counter() - started) / n


def run_cli(args: list[str]) -> tuple[float, float, str]:
    """A monitoring command in a subprocess: (seconds, peak RSS in MB, output tail)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "monitoring", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"monitoring {args[0]} failed ({proc.returncode}):\n{out[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, out[-500:]


def disk_mb(log: PredictionLog, target: str) -> float:
    if log.backend == "sqlite":
        return sum(p.stat().st_size for p in Path(target).parent.glob(Path(target).name + "*")
                   ) / 1e6
    return log._read("SELECT pg_database_size(current_database())")[0][0] / 1e6


def bench_backend(backend: str, target: str, sizes: Sequence[int], reference: Path,
                  work: Path) -> list[dict]:
    rng = np.random.default_rng(1)
    out: list[dict] = []
    with open_log(target) as log:
        filler = Filler(log, rng)
        for size in sizes:
            _, fill_s = timed(lambda: filler.fill_to(size))
            append_us = filler.append(6_400) * 1e6
            common = ["--log", target, "--model", MODEL, "--since", "2020-01-01T00:00:00",
                      "--reference", str(reference)]
            drift_s, drift_mb, _ = run_cli(["drift", *common, "--out", str(work / "drift"),
                                            "--state", str(work / "state.json")])
            slices_s, slices_mb, _ = run_cli(["slices", *common])
            row = {"backend": backend, "rows": log.count(), "fill_s": round(fill_s, 1),
                   "append_us": round(append_us, 1), "drift_s": round(drift_s, 1),
                   "drift_rss_mb": round(drift_mb), "slices_s": round(slices_s, 1),
                   "slices_rss_mb": round(slices_mb), "disk_mb": round(disk_mb(log, target))}
            print(json.dumps(row), flush=True)
            out.append(row)
        day = 86_400.0
        first_day_end = START - START % day + day
        how = "as a partition" if log.backend == "postgresql" else "in chunks"
        n, s = timed(lambda: log.prune(first_day_end))
        out.append({"backend": backend, "prune": f"first day {how}", "rows": n,
                    "seconds": round(s, 2)})
        print(json.dumps(out[-1]), flush=True)
        if log.backend == "postgresql" and log.count() > DAY_ROWS:
            n, s = timed(lambda: log.prune(first_day_end + day, by_partition=False))
            out.append({"backend": backend, "prune": "second day row by row", "rows": n,
                        "seconds": round(s, 2)})
        print(json.dumps(out[-1]), flush=True)
    return out


def table(rows: list[dict]) -> str:
    sizes = [r for r in rows if "fill_s" in r]
    lines = ["| backend | rows | fill s | append µs/record (batches of 64) | drift s | drift "
             "peak RSS MB | slices s | slices peak RSS MB | on disk MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['backend']} | {r['rows']:,} | {r['fill_s']} | {r['append_us']} | "
              f"{r['drift_s']} | {r['drift_rss_mb']} | {r['slices_s']} | {r['slices_rss_mb']} | "
              f"{r['disk_mb']:,} |" for r in sizes]
    prunes = [r for r in rows if "prune" in r]
    if prunes:
        lines += ["", "| backend | retention | rows | seconds |", "|---|---|---|---|"]
        lines += [f"| {r['backend']} | {r['prune']} | {r['rows']:,} | {r['seconds']} |"
                  for r in prunes]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.scale_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="sqlite,postgresql",
                        help="comma-separated: sqlite, postgresql (default both)")
    parser.add_argument("--rows", default="100000,1000000,10000000",
                        help="comma-separated log sizes, grown in order")
    parser.add_argument("--postgres", help="a postgresql:// URL of an empty database (default: "
                                           "a throwaway cluster of Debian's package)")
    parser.add_argument("--work", help="folder for the SQLite file and reports (default: temp)")
    parser.add_argument("--reference-rows", type=int, default=270,
                        help="rows in the reference profile (the digits validation split: 270)")
    args = parser.parse_args(argv)
    sizes = sorted(int(x) for x in args.rows.split(","))
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    print(f"scale bench: backends {backends}, sizes {sizes}", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        reference = write_reference(work / "reference", args.reference_rows,
                                    np.random.default_rng(7))
        for backend in backends:
            if backend == "sqlite":
                rows += bench_backend(backend, str(work / "log.db"), sizes, reference, work)
            elif backend == "postgresql":
                cluster = None
                url = args.postgres
                if url is None:
                    from tests.postgres import PostgresCluster, unavailable_reason

                    reason = unavailable_reason()
                    if reason:
                        print(f"postgresql skipped: {reason}")
                        continue
                    cluster = PostgresCluster()
                    url = cluster.database("scale")
                try:
                    rows += bench_backend(backend, url, sizes, reference, work)
                finally:
                    if cluster is not None:
                        cluster.stop()
            else:
                parser.error(f"unknown backend {backend!r}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
