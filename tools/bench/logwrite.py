"""The prediction log's write path alone: ``python -m tools.bench.logwrite``.

One process commits image-like records (a 256-float embedding, 10 probabilities, 10 features, a
12.6 KB input into the segment files) in groups of ``--group`` rows, as a service worker's
writer does, into a SQLite log that already holds ``--rows`` rows (written first, without
inputs, in large transactions). Prints CPU and wall time per row and the bytes written per commit
(``wchar`` of /proc/self/io: the WAL frames, the checkpoints into the database, the inputs'
segment), for each way of making request ids: ``uuid4`` (random; what the service made before)
and ``uuid7`` (``service.requests.new_request_id``: time first, so the index on the request id
grows at its right edge).

    python -m tools.bench.logwrite --rows 0,1000000 --group 5
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from monitoring.store import PredictionRecord, open_log
from service.requests import new_request_id

ID_MAKERS: dict[str, Callable[[], str]] = {"uuid4": lambda: uuid.uuid4().hex,
                                           "uuid7": new_request_id}
FEATURES = ("width", "height", "aspect", "brightness", "contrast", "edges", "saturation", "r",
            "g", "b")


def records(n: int, make_id: Callable[[], str], data: bytes | None,
            rng: np.random.Generator) -> list[PredictionRecord]:
    features = dict(zip(FEATURES, map(float, rng.random(len(FEATURES)))))
    return [PredictionRecord(request_id=make_id(), item=0, ts=time.time(), model="bench",
                             version="v1", predicted="3", confidence=0.9,
                             probabilities=rng.random(10).astype(np.float32),
                             embedding=rng.random(256).astype(np.float32), features=features,
                             latency_ms=3.2, ood_score=0.4, input=data) for _ in range(n)]


def measure(ids: str, rows: int, group: int, commits: int, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    make_id = ID_MAKERS[ids]
    data = rng.integers(0, 256, 12_600, dtype=np.uint8).tobytes()
    with tempfile.TemporaryDirectory(prefix="clf-logwrite-") as folder:
        path = Path(folder) / "predictions.db"
        log = open_log(str(path))
        try:
            for start in range(0, rows, 1000):
                log.write_batch(records(min(1000, rows - start), make_id, None, rng))
            batches = [records(group, make_id, data, rng) for _ in range(commits + 20)]
            for batch in batches[:20]:  # warm
                log.write_batch(batch)
            written = _written()
            used = resource.getrusage(resource.RUSAGE_SELF)
            started = time.perf_counter()
            for batch in batches[20:]:
                log.write_batch(batch)
            wall = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_SELF)
            written = _written() - written
        finally:
            log.close()
    n = commits * group
    return {"wall_us": wall / n * 1e6, "user_us": (after.ru_utime - used.ru_utime) / n * 1e6,
            "sys_us": (after.ru_stime - used.ru_stime) / n * 1e6,
            "kb_per_commit": written / commits / 1e3}


def _written() -> int:
    """Bytes this process has passed to write calls so far (Linux)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.logwrite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="0,1000000", help="rows already in the log (comma-separated)")
    p.add_argument("--group", type=int, default=5, help="rows per commit")
    p.add_argument("--commits", type=int, default=800, help="measured commits per cell")
    p.add_argument("--ids", default="uuid4,uuid7", help="id makers to compare")
    p.add_argument("--rounds", type=int, default=2, help="cells per id maker (interleaved)")
    args = p.parse_args(argv)
    print(f"{'rows before':>11} {'ids':>6} {'round':>5} | {'wall us/row':>11} {'user':>6} "
          f"{'sys':>6} | {'KB written/commit':>17}")
    for rows in (int(r) for r in args.rows.split(",")):
        for rnd in range(args.rounds):
            for ids in args.ids.split(","):
                m = measure(ids, rows, args.group, args.commits)
                print(f"{rows:>11,} {ids:>6} {rnd + 1:>5} | {m['wall_us']:11.1f} "
                      f"{m['user_us']:6.1f} {m['sys_us']:6.1f} | {m['kb_per_commit']:17.1f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
