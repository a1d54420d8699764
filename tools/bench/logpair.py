"""What the prediction log costs, paired: ``python -m tools.bench.logpair --task image``.

The bench's log-on cells run after its log-off ones, minutes apart, and on these shared 2-core
machines the speed moves by a third within minutes, which is as large as what is measured. This
serves the model twice at once, one server with the log off and one with it on (a SQLite file
in a temporary folder), and runs wrk against them in turn, in short cells (5 s by default),
the order swapped every round (off-on, on-off, ...). Each round gives a ratio of two cells taken
seconds apart; the table shows the median of the rounds' ratios with their range, and the
median p99 ratio. The idle server costs little: its workers sleep while the other is loaded.

As in the bench, the log is checked against wrk: the rows a log-on cell added must be at least
the 2xx answers wrk counted (each answer is durable in the log before it is sent), and at most ``c``
more (requests answered after wrk stopped counting).

    python -m tools.bench.logpair --task image --conc 16,64 --rounds 8
    python -m tools.bench.logpair --task text --conc 16,64 --rounds 8
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .bodies import Body, noise_png, write_image_body
from .compare import round_order
from .config import REPO_ROOT
from .predlog import count_rows
from .server import Server, ServerSpec
from .store import ensure_reference, ensure_text_model
from .textmix import MixSpec, build_mix, demo_data, write_text_body
from .wrk import run_wrk


@dataclass(frozen=True)
class Cell:
    rps: float
    p99: float
    errors: int


def image_body(work: Path, model: str) -> tuple[str, Body]:
    artifact, _ = ensure_reference(model, print)
    png = noise_png(artifact.spec.width, 3, seed=0)
    return (f"{artifact.name}:{artifact.version}",
            write_image_body(work, artifact.name, png, "seeded noise RGB PNG"))


def text_body(work: Path, model: str) -> tuple[str, Body]:
    artifact, _ = ensure_text_model(model, work, print)
    spec = MixSpec()
    texts, labels = demo_data(work, spec.demo_per_class, spec.seed, REPO_ROOT)
    items = build_mix(texts, labels, spec)
    return (f"{artifact.name}:{artifact.version}",
            write_text_body(work, artifact.name, items, "the bench's text mix"))


def ratios(pairs: Sequence[tuple[Cell, Cell]]) -> tuple[float, float, float, float]:
    """Median, min and max of the rounds' log-on/log-off req/s, and the median p99 ratio."""
    rps = [on.rps / off.rps for off, on in pairs if off.rps > 0]
    p99 = [on.p99 / off.p99 for off, on in pairs if off.p99 > 0]
    return (statistics.median(rps), min(rps), max(rps),
            statistics.median(p99) if p99 else float("nan"))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.logpair", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("image", "text"), default="image")
    p.add_argument("--model", default=None,
                   help="model store name (default: bench-resnet, bench-lang-transformer)")
    p.add_argument("--conc", default="16,64", help="wrk connections per cell (comma-separated)")
    p.add_argument("--rounds", type=int, default=8, help="paired rounds per concurrency")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measured cell")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load per server first")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--port", type=int, default=3997, help="log off; log on is the next port")
    p.add_argument("--keep", action="store_true",
                   help="keep the working folder (the log, the bodies, the servers' logs)")
    args = p.parse_args(argv)
    concs = [int(c) for c in args.conc.split(",")]

    work = Path(tempfile.mkdtemp(prefix="clfbench-logpair-"))
    model = args.model or {"image": "bench-resnet", "text": "bench-lang-transformer"}[args.task]
    tag, body = (image_body if args.task == "image" else text_body)(work, model)
    db = work / "predictions.db"
    servers = {on: Server(ServerSpec(model_tag=tag, runtime="onnx", workers=args.workers,
                                     providers="cpu", port=args.port + on,
                                     log_path=work / f"server-{'on' if on else 'off'}.log",
                                     task=args.task, prediction_log=str(db) if on else ""),
                          lambda line: None)
               for on in (False, True)}
    results: dict[int, list[tuple[Cell, Cell]]] = {}
    bad: list[str] = []
    try:
        for server in servers.values():
            server.start(timeout_s=180)
        for conc in concs:
            for server in servers.values():
                run_wrk(server.base + body.route, body, conc, args.warmup, latency=False)
            for rnd in range(args.rounds):
                cells: dict[bool, Cell] = {}
                for on in round_order([False, True], rnd):
                    before = count_rows(db) if on else 0
                    res, _ = run_wrk(servers[on].base + body.route, body, conc, args.duration,
                                     latency=True)
                    cells[on] = Cell(res.ok_per_s, res.p("99") or float("nan"), res.errors)
                    if on:
                        time.sleep(0.2)  # requests in flight when wrk stopped get committed
                        added, ok = count_rows(db) - before, res.requests - res.non2xx
                        if not ok <= added <= ok + conc:
                            bad.append(f"c={conc} round {rnd + 1}: wrk counted {ok} answers, "
                                       f"the log gained {added} rows")
                results.setdefault(conc, []).append((cells[False], cells[True]))
                off, on_ = cells[False], cells[True]
                print(f"c={conc:<3} round {rnd + 1}: log off {off.rps:7.1f} req/s p99 "
                      f"{off.p99:6.1f} ms | log on {on_.rps:7.1f} req/s p99 {on_.p99:6.1f} ms | "
                      f"on/off {on_.rps / off.rps:5.2f}"
                      + (f" | errors {off.errors}/{on_.errors}" if off.errors or on_.errors
                         else ""), flush=True)
    finally:
        for server in servers.values():
            server.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)  # the log grows by ~10 MB a second of load
    print(f"\n{tag}, {body.description} to {body.route}, {args.workers} workers per server, "
          f"{args.rounds} paired rounds x {args.duration:g} s per cell")
    print(f"{'c':>4} | {'off req/s':>9} {'on req/s':>9} | {'on/off (median of rounds)':>25} "
          f"{'min-max':>11} | {'off p99':>8} {'on p99':>8} {'p99 on/off':>10}")
    for conc, pairs in results.items():
        med, lo, hi, p99 = ratios(pairs)
        print(f"{conc:>4} | {statistics.median(o.rps for o, _ in pairs):9.1f} "
              f"{statistics.median(n.rps for _, n in pairs):9.1f} | {med:25.2f} "
              f"{lo:5.2f}-{hi:<5.2f} | {statistics.median(o.p99 for o, _ in pairs):6.1f}ms "
              f"{statistics.median(n.p99 for _, n in pairs):6.1f}ms {p99:10.2f}")
    for line in bad:
        print("LOG CHECK FAILED:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
