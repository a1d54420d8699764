"""What logging one answer costs a worker's event loop, alone: ``python -m tools.bench.logappend``.

A journaled SQLite log (what a service worker writes to: monitoring/journal.py), one process,
the CPU of each way the request path can hand its answers over, per answer:

- ``record``: a ``PredictionRecord`` per answer and ``write_batch`` per request (the public
  API; the request path until session 20);
- ``row``: the row encoded straight from the answer (``encode_row``) and ``write_rows`` per
  request;
- ``batch``: the same rows, one ``write_rows`` for all the answers of a batch (what the service
  does: service/recording.py appends once per turn of the event loop, and a batch's answers
  finish in one turn).

Two answer shapes: ``image`` (a 12.4 KB PNG into the input segments, 20 features, a 128-float
embedding, 10 probabilities) and ``text`` (a 50-byte text kept in its row, 8 features). The
figure per cell is the median of ``--reps`` timings of ``--n`` requests each.

    python -m tools.bench.logappend --batches 1,4,16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from typing import Callable, Sequence

import numpy as np

from monitoring.sqlite_log import SQLiteLog
from monitoring.store import PredictionRecord, encode_row

WAYS = ("record", "row", "batch")


def answer_shape(kind: str) -> dict:
    rng = np.random.default_rng(0)
    image = kind == "image"
    return {"features": {f"f{i}": float(v) for i, v in enumerate(rng.random(20 if image else 8))},
            "embedding": rng.standard_normal(128).astype(np.float32),
            "probabilities": rng.random(10).astype(np.float32),
            "input": bytes(rng.integers(0, 256, 12420, dtype=np.uint8)) if image
            else b"free entry in 2 a wkly comp to win fa cup final tkts"}


def writer(log: SQLiteLog, way: str, shape: dict, batch: int) -> Callable[[], None]:
    """One batch's answers handed to the log the ``way`` named (module doc)."""
    f, e, p, x = shape["features"], shape["embedding"], shape["probabilities"], shape["input"]

    def row(i: int) -> list:
        return encode_row(f"req-{i}", 0, 1.0, "m", "1", "label", 0.9, False, 0.1, 3.0, "{}", f,
                          e, p, x, "")

    if way == "record":
        return lambda: [log.write_batch([PredictionRecord(
            request_id=f"req-{i}", item=0, ts=1.0, model="m", version="1", predicted="label",
            confidence=0.9, probabilities=p, embedding=e, features=f, slices={}, latency_ms=3.0,
            ood=False, ood_score=0.1, input=x, replica="")]) for i in range(batch)]
    if way == "row":
        return lambda: [log.write_rows([row(i)]) for i in range(batch)]
    return lambda: log.write_rows([row(i) for i in range(batch)])


def measure(kind: str, way: str, batch: int, n: int = 200, reps: int = 9) -> float:
    """CPU microseconds per answer (process CPU time; one thread does all the work)."""
    with tempfile.TemporaryDirectory(prefix="clfbench-logappend-") as tmp:
        log = SQLiteLog(f"{tmp}/predictions.db", journal=True, index_interval_s=3600.0)
        try:
            write = writer(log, way, answer_shape(kind), batch)
            write()  # the first append opens the journal and the segment
            times = []
            for _ in range(reps):
                started = time.process_time()
                for _ in range(n):
                    write()
                times.append((time.process_time() - started) / (n * batch) * 1e6)
        finally:
            log.close()
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.logappend", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4,16", help="answers per batch (comma-separated)")
    p.add_argument("--n", type=int, default=200, help="batches per timing")
    p.add_argument("--reps", type=int, default=9, help="timings per cell (the median is shown)")
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",") if b.strip()]
    print("CPU us per logged answer (journaled SQLite log; median of "
          f"{a.reps} timings of {a.n} batches)")
    print(f"{'answer':>6} {'batch':>5} | " + " ".join(f"{w:>8}" for w in WAYS))
    for kind in ("image", "text"):
        for batch in batches:
            cells = [measure(kind, way, batch, a.n, a.reps) for way in WAYS]
            print(f"{kind:>6} {batch:>5} | " + " ".join(f"{c:8.1f}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
