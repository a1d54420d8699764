"""What the prediction log costs, paired: ``python -m tools.bench.logpair --task image``.

``--pair A,B`` chooses the two servers (default ``off,sqlite``): ``off`` (no log), ``sqlite``
(a file, its journal on), ``postgresql`` (each answer waits for its commit) and
``postgresql-journal`` (``CLF_LOG_PG_JOURNAL``: an append to the worker's spool, indexed every
100 ms); the PostgreSQL servers log to databases of a throwaway cluster (tests/postgres.py:
Debian's ``postgresql``), on the same machine.

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
    python -m tools.bench.logpair --task image --pair postgresql,postgresql-journal
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
from typing import Callable, Sequence

from .bodies import Body, noise_png, write_image_body
from .compare import round_order
from .config import REPO_ROOT
from .predlog import count_postgres_rows, count_rows
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


LOGS = ("off", "sqlite", "postgresql", "postgresql-journal")


@dataclass
class Log:
    """One server's prediction log: its settings and how to count its rows (None: off)."""

    name: str
    settings: tuple[tuple[str, str], ...]
    count: Callable[[], int] | None


def make_log(name: str, work: Path, cluster_url: Callable[[], str]) -> Log:
    if name == "off":
        return Log(name, (("CLF_PREDICTION_LOG", ""),), None)
    if name == "sqlite":
        db = work / "predictions.db"
        return Log(name, (("CLF_PREDICTION_LOG", str(db)),), lambda: count_rows(db))
    url, spool = cluster_url(), work / f"spool-{name}"
    settings = (("CLF_PREDICTION_LOG", url), ("CLF_LOG_SPOOL_DIR", str(spool)),
                ("CLF_LOG_PG_JOURNAL", "true" if name == "postgresql-journal" else "false"))
    return Log(name, settings, lambda: count_postgres_rows(url, spool))


def ratios(pairs: Sequence[tuple[Cell, Cell]]) -> tuple[float, float, float, float]:
    """Median, min and max of the rounds' second/first req/s, and the median p99 ratio."""
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
    p.add_argument("--port", type=int, default=3997, help="the first server; the second: +1")
    p.add_argument("--pair", default="off,sqlite",
                   help=f"the two servers' logs, A,B (B/A is measured): of {', '.join(LOGS)}")
    p.add_argument("--keep", action="store_true",
                   help="keep the working folder (the log, the bodies, the servers' logs)")
    args = p.parse_args(argv)
    concs = [int(c) for c in args.conc.split(",")]
    names = args.pair.split(",")
    if len(names) != 2 or not set(names) <= set(LOGS) or names[0] == names[1]:
        p.error(f"--pair takes two different logs of {', '.join(LOGS)}")

    work = Path(tempfile.mkdtemp(prefix="clfbench-logpair-"))
    cluster = None

    def cluster_url() -> str:
        nonlocal cluster
        if cluster is None:
            from tests.postgres import PostgresCluster, unavailable_reason

            reason = unavailable_reason()
            if reason:
                raise SystemExit(f"--pair {args.pair}: {reason}")
            cluster = PostgresCluster()
        return cluster.database()

    model = args.model or {"image": "bench-resnet", "text": "bench-lang-transformer"}[args.task]
    tag, body = (image_body if args.task == "image" else text_body)(work, model)
    results: dict[int, list[tuple[Cell, Cell]]] = {}
    bad: list[str] = []
    servers: list[Server] = []
    try:
        logs = [make_log(name, work, cluster_url) for name in names]
        servers = [Server(ServerSpec(model_tag=tag, runtime="onnx", workers=args.workers,
                                     providers="cpu", port=args.port + i,
                                     log_path=work / f"server-{i}-{log.name}.log",
                                     task=args.task, settings=log.settings), lambda line: None)
                   for i, log in enumerate(logs)]
        for server in servers:
            server.start(timeout_s=180)
        for conc in concs:
            for server in servers:
                run_wrk(server.base + body.route, body, conc, args.warmup, latency=False)
            for rnd in range(args.rounds):
                cells: dict[int, Cell] = {}
                for i in round_order([0, 1], rnd):
                    count = logs[i].count
                    before = count() if count else 0
                    res, _ = run_wrk(servers[i].base + body.route, body, conc, args.duration,
                                     latency=True)
                    cells[i] = Cell(res.ok_per_s, res.p("99") or float("nan"), res.errors)
                    if count:
                        time.sleep(0.2)  # requests in flight when wrk stopped get logged
                        added, ok = count() - before, res.requests - res.non2xx
                        if not ok <= added <= ok + conc:
                            bad.append(f"c={conc} round {rnd + 1}, {logs[i].name}: wrk counted "
                                       f"{ok} answers, the log gained {added} rows")
                results.setdefault(conc, []).append((cells[0], cells[1]))
                a, b = cells[0], cells[1]
                print(f"c={conc:<3} round {rnd + 1}: {names[0]} {a.rps:7.1f} req/s p99 "
                      f"{a.p99:6.1f} ms | {names[1]} {b.rps:7.1f} req/s p99 {b.p99:6.1f} ms | "
                      f"ratio {b.rps / a.rps:5.2f}"
                      + (f" | errors {a.errors}/{b.errors}" if a.errors or b.errors else ""),
                      flush=True)
    finally:
        for server in servers:
            server.stop()
        if cluster is not None:
            cluster.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)  # the log grows by ~10 MB a second of load
    a, b = (n[:12] for n in names)
    print(f"\n{tag}, {body.description} to {body.route}, {args.workers} workers per server, "
          f"{args.rounds} paired rounds x {args.duration:g} s per cell; log {names[0]} against "
          f"log {names[1]}")
    print(f"{'c':>4} | {a + ' req/s':>18} {b + ' req/s':>18} | {'ratio (median of rounds)':>24} "
          f"{'min-max':>11} | {a + ' p99':>16} {b + ' p99':>16} {'p99 ratio':>9}")
    for conc, pairs in results.items():
        med, lo, hi, p99 = ratios(pairs)
        print(f"{conc:>4} | {statistics.median(o.rps for o, _ in pairs):18.1f} "
              f"{statistics.median(n.rps for _, n in pairs):18.1f} | {med:24.2f} "
              f"{lo:5.2f}-{hi:<5.2f} | {statistics.median(o.p99 for o, _ in pairs):14.1f}ms "
              f"{statistics.median(n.p99 for _, n in pairs):14.1f}ms {p99:9.2f}")
    for line in bad:
        print("LOG CHECK FAILED:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
