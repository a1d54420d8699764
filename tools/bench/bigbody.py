"""Large JSON bodies beside small requests, two source trees in one run:
``python -m tools.bench.bigbody --rev REV``.

A worker parses a request's JSON and base64 on its event loop, so while it parses a large body
every other connection it holds waits. This measures that wait as the small requests see it: wrk
posts the reference model's one-image PNG upload at ``--conc`` connections to one worker, and a
client thread of this process posts large bodies back to back to the same worker, each after the
previous one's answer:

  v2-json  a v2 infer request of ``--items`` preprocessed images as a JSON FP32 tensor (the
           Open Inference Protocol's JSON wire, what a client without the binary extension sends)
  v1-json  ``{"images": [<base64>, ...]}`` of ``--items`` 256x256 noise PNGs to /v1

Each tree (REV from a git worktree, and this working tree) serves the same model from the same
store, rounds interleaved as in ``tools.bench.compare``; per cell the small requests' req/s, p50,
p99, max and error share (wrk), and the large requests' median latency, count and share not
answered 200. A cell ``small only`` is the baseline of each tree. Each tree runs with its own
default bounds, so what they refuse shows; ``--queue-items 0`` (no bound on inputs) measures the
wait alone.

    python -m tools.bench.bigbody --rev HEAD~1 --rounds 3 --duration 10
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .bodies import noise_png, write_image_body
from .compare import drop_worktree, round_order, worktree
from .config import REPO_ROOT
from .server import Server, ServerSpec
from .store import ensure_reference
from .wrk import run_wrk

KINDS = ("v2-json", "v1-json")
MAX_LARGE = 10_000  # large requests per cell at most (the cell's duration bounds it first)


def large_body(kind: str, model: str, spec, items: int) -> tuple[str, bytes]:
    """(path, body) of one large request of ``kind``."""
    rng = np.random.default_rng(0)
    if kind == "v2-json":
        shape = [items, *spec.input_shape]
        data = rng.random(int(np.prod(shape)), dtype=np.float32).tolist()
        doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": data}]}
        return f"/v2/models/{model}/infer", json.dumps(doc).encode()
    pngs = [noise_png(256, 3, seed=i) for i in range(items)]
    doc = {"images": [base64.b64encode(p).decode("ascii") for p in pngs]}
    return "/v1/classify/image", json.dumps(doc).encode()


class LargeSender(threading.Thread):
    """Posts one body back to back on one keep-alive connection until stopped."""

    def __init__(self, port: int, path: str, body: bytes) -> None:
        super().__init__(daemon=True)
        self.port, self.path, self.body = port, path, body
        self.stopping = threading.Event()
        self.latencies_s: list[float] = []
        self.statuses: dict[int, int] = {}

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            while not self.stopping.is_set() and len(self.latencies_s) < MAX_LARGE:
                t0 = time.perf_counter()
                conn.request("POST", self.path, self.body,
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                self.latencies_s.append(time.perf_counter() - t0)
                self.statuses[resp.status] = self.statuses.get(resp.status, 0) + 1
        finally:
            conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.bigbody", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", required=True, help="the 'before' git revision (e.g. HEAD~1)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"large bodies: {', '.join(KINDS)}")
    p.add_argument("--items", type=int, default=64, help="images per large request")
    p.add_argument("--conc", type=int, default=8, help="wrk connections of small requests")
    p.add_argument("--large-conns", type=int, default=1,
                   help="connections posting large bodies, each back to back (more than one: "
                        "a flood of large requests)")
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds (interleaved)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured cell")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of small load first")
    p.add_argument("--workers", type=int, default=1,
                   help="workers (1: every connection on the worker that parses)")
    p.add_argument("--queue-items", type=int, default=None,
                   help="CLF_MAX_QUEUE_ITEMS of both served trees (default: each tree's own "
                        "default; 0 = no bound, which measures the wait alone)")
    p.add_argument("--model", default="bench-resnet", help="the reference model's name")
    p.add_argument("--port", type=int, default=3998)
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        p.error(f"unknown --kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")

    work = Path(tempfile.mkdtemp(prefix="clfbench-bigbody-"))
    artifact, _ = ensure_reference(args.model, print)
    small = write_image_body(work, artifact.name, noise_png(artifact.spec.width, 3, seed=0),
                             "seeded noise RGB PNG")
    large = {k: large_body(k, artifact.name, artifact.spec, args.items) for k in kinds}
    for k, (path, body) in large.items():
        print(f"large {k}: {len(body) / 1e6:.1f} MB to {path}")
    cells = ["small only", *kinds]
    before = worktree(args.rev, work)
    trees = {f"before ({args.rev})": before, "after (working tree)": REPO_ROOT}
    # (tree, cell) -> per round (small req/s, p50, p99, max, large median s, large count)
    results: dict[tuple[str, str], list[tuple[float, ...]]] = {}
    try:
        for rnd in range(args.rounds):
            for label in round_order(list(trees), rnd):
                spec = ServerSpec(model_tag=f"{artifact.name}:{artifact.version}",
                                  runtime="onnx", workers=args.workers, providers="cpu",
                                  port=args.port, log_path=work / "server.log",
                                  cwd=trees[label],
                                  settings=() if args.queue_items is None else
                                  (("CLF_MAX_QUEUE_ITEMS", str(args.queue_items)),))
                server = Server(spec, lambda line: None)
                try:
                    server.start(timeout_s=180)
                    url = server.base + small.route
                    run_wrk(url, small, args.conc, args.warmup, latency=False)
                    for cell in cells:
                        senders = [LargeSender(args.port, *large[cell])
                                   for _ in range(args.large_conns if cell in large else 0)]
                        for sender in senders:
                            sender.start()
                        if senders:
                            time.sleep(0.5)
                        try:
                            res, _ = run_wrk(url, small, args.conc, args.duration, latency=True)
                        finally:
                            for sender in senders:
                                sender.stopping.set()
                            for sender in senders:
                                sender.join(timeout=120)
                        lat = [x for sender in senders for x in sender.latencies_s]
                        bad: dict[int, int] = {}
                        for sender in senders:
                            for status, n in sender.statuses.items():
                                if status != 200:
                                    bad[status] = bad.get(status, 0) + n
                        row = (res.ok_per_s, res.p("50") or math.nan, res.p("99") or math.nan,
                               res.max_ms or math.nan,
                               statistics.median(lat) if lat else math.nan, len(lat),
                               100.0 * sum(bad.values()) / len(lat) if lat else math.nan,
                               100.0 * res.errors / res.requests if res.requests else math.nan)
                        results.setdefault((label, cell), []).append(row)
                        print(f"round {rnd + 1} {label:<24} {cell:<10} {row[0]:7.1f} req/s "
                              f"p50 {row[1]:6.1f} p99 {row[2]:6.1f} max {row[3]:6.1f} ms"
                              + (f" | large {row[5]} x {row[4] * 1e3:6.0f} ms" if lat else "")
                              + (f" NOT 200: {bad}" if bad else "") + (
                                  f" wrk errors {res.errors}" if res.errors else ""),
                              flush=True)
                finally:
                    server.stop()
    finally:
        drop_worktree(before)
    print(f"\n{artifact.name}, {args.workers} worker(s), small: {small.description} at "
          f"c={args.conc}; large: {args.items} items back to back on "
          f"{args.large_conns} more connection(s); "
          f"{args.rounds} rounds x {args.duration:g} s per cell (medians of rounds)")
    print("small: wrk's requests (req/s answered 2xx; error %: non-2xx and socket errors); "
          "large: the client's (ms: median latency; n: sent; not 200 %)")
    print(f"{'cell':<10} {'tree':<24} | {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'error %':>7} | {'large ms':>8} {'large n':>7} {'not 200 %':>9}")
    labels = list(trees)
    for cell in cells:
        for label in labels:
            rows = results[(label, cell)]
            med = [statistics.median(r[i] for r in rows) for i in range(8)]
            print(f"{cell:<10} {label:<24} | {med[0]:7.1f} {med[1]:7.1f} {med[2]:7.1f} "
                  f"{med[3]:7.1f} {med[7]:7.1f} | {med[4] * 1e3:8.0f} {med[5]:7.0f} "
                  f"{med[6]:9.1f}")
        b = results[(labels[0], cell)]
        a = results[(labels[1], cell)]
        p99s = [ra[2] / rb[2] for rb, ra in zip(b, a)]
        print(f"{cell:<10} {'after / before':<24} | p99 x{statistics.median(p99s):.2f} "
              f"(rounds {' '.join(f'{r:.2f}' for r in p99s)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
