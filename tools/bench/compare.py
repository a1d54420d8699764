"""Two source trees served side by side in one run: ``python -m tools.bench.compare --rev REV``.

Where a change must show "no regression" (a refactor, a new default), the figures before and after
have to come from the same run on the same machine: absolute speeds drift between runs and
machines. This serves the reference model from a git worktree of REV and from this working tree
in turn, interleaved round by round (A B, B A, ...: neither tree always goes first), with the
same wrk load, the same cells and the same model store, and prints req/s and p99 per tree with
the ratio after/before, of the medians and round by round.

    python -m tools.bench.compare --rev HEAD~1 --conc 16,64 --rounds 2 --duration 10

``--wire v2-tensor`` serves the peers' CNN (``../shared/peers-bench``'s file, imported into the
store as ``--task peers`` does) with Triton's binary FP32 tensor to the v2 infer route: the
c=1 comparison with FastAPI in the README is made on that body. ``--wire v2-json``: the same
tensor as JSON numbers (what KServe's and tritonclient's JSON clients send).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence, TypeVar

from .bodies import noise_png, write_image_body, write_v2_image_body
from .config import REPO_ROOT
from .predlog import remove_log
from .server import Server, ServerSpec
from .store import ensure_reference
from .wrk import run_wrk

T = TypeVar("T")


def worktree(rev: str, parent: Path) -> Path:
    """A detached worktree of ``rev`` under ``parent`` (removed by ``drop_worktree``)."""
    path = parent / f"rev-{rev.replace('/', '_').replace('~', '_')}"
    subprocess.run(["git", "worktree", "add", "--detach", "--force", str(path), rev],
                   cwd=REPO_ROOT, check=True, capture_output=True, text=True)
    return path


def drop_worktree(path: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO_ROOT,
                   capture_output=True, text=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", required=True, help="the 'before' git revision (e.g. HEAD~1)")
    p.add_argument("--conc", default="16,64", help="wrk connections per cell (comma-separated)")
    p.add_argument("--rounds", type=int, default=2, help="A/B rounds (interleaved)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured cell")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before each cell")
    p.add_argument("--log", choices=["off", "on", "both"], default="both",
                   help="the prediction log in the served trees (default: both settings)")
    p.add_argument("--model", default="bench-resnet", help="the reference model's name")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--port", type=int, default=3999)
    p.add_argument("--wire", choices=("v1", "v2", "v2-tensor", "v2-json"), default="v1",
                   help="the PNG as a /v1 multipart upload (default) or as a v2 BYTES tensor to "
                        "the v2 infer route; v2-tensor: the peers' CNN and Triton's binary FP32 "
                        "tensor (needs bash ../shared/peers-bench/setup.sh; --model is ignored); "
                        "v2-json: the same tensor as JSON numbers")
    args = p.parse_args(argv)
    concs = [int(c) for c in args.conc.split(",")]
    logs = {"off": [False], "on": [True], "both": [False, True]}[args.log]

    work = Path(tempfile.mkdtemp(prefix="clfbench-compare-"))
    if args.wire in ("v2-tensor", "v2-json"):
        from .peers import Harness, ensure_imported, json_tensor_body, tensor_body

        harness = Harness.locate()
        harness.check([])
        artifact = ensure_imported(harness, print)
        body = (tensor_body(harness, work, artifact.name)[0] if args.wire == "v2-tensor"
                else json_tensor_body(harness, work, artifact.name))
    else:
        artifact, _ = ensure_reference(args.model, print)
        png = noise_png(artifact.spec.width, 3, seed=0)
        body = write_image_body(work, artifact.name, png, "seeded noise RGB PNG")
        if args.wire == "v2":
            body = write_v2_image_body(work, artifact.name, png, "seeded noise RGB PNG",
                                       artifact.name)
    before = worktree(args.rev, work)
    trees = {f"before ({args.rev})": before, "after (working tree)": REPO_ROOT}
    results: dict[tuple[str, bool, int], list[tuple[float, float]]] = {}
    try:
        for rnd in range(args.rounds):
            for label in round_order(list(trees), rnd):
                tree = trees[label]
                for log_on in logs:
                    stem = cell_stem(rnd, label, log_on)
                    db = work / f"{stem}.db"
                    spec = ServerSpec(model_tag=f"{artifact.name}:{artifact.version}",
                                      runtime="onnx", workers=args.workers, providers="cpu",
                                      port=args.port, log_path=work / f"{stem}.log",
                                      prediction_log=str(db) if log_on else "", cwd=tree)
                    server = Server(spec, lambda line: None)
                    try:
                        server.start(timeout_s=180)
                        paying = batching_verdicts(server.log_tail(200_000))
                        for conc in concs:
                            url = server.base + body.route
                            run_wrk(url, body, conc, args.warmup, latency=False)
                            time.sleep(0.5)
                            res, _ = run_wrk(url, body, conc, args.duration, latency=True)
                            rps, p99 = res.ok_per_s, res.p("99") or float("nan")
                            results.setdefault((label, log_on, conc), []).append((rps, p99))
                            print(f"round {rnd + 1} {label:<24} log {'on ' if log_on else 'off'} "
                                  f"c={conc:<3} {rps:8.1f} req/s  p99 {p99:7.1f} ms  "
                                  f"batching pays in {paying}", flush=True)
                    finally:
                        server.stop()
                        remove_log(db)  # the database and the files beside it
    finally:
        drop_worktree(before)
    print(f"\n{artifact.name}, {body.description} to {body.route}, {args.workers} workers, "
          f"{args.rounds} rounds x {args.duration:g} s per cell (median of rounds)")
    print(f"{'log':<4} {'c':>4} | {'before req/s':>12} {'after req/s':>12} {'after/before':>12} | "
          f"{'before p99':>10} {'after p99':>10}")
    labels = list(trees)
    for log_on in logs:
        for conc in concs:
            b = results[(labels[0], log_on, conc)]
            a = results[(labels[1], log_on, conc)]
            b_rps, a_rps = statistics.median(x for x, _ in b), statistics.median(x for x, _ in a)
            b_p99, a_p99 = statistics.median(y for _, y in b), statistics.median(y for _, y in a)
            print(f"{'on' if log_on else 'off':<4} {conc:>4} | {b_rps:12.1f} {a_rps:12.1f} "
                  f"{a_rps / b_rps:12.2f} | {b_p99:8.1f}ms {a_p99:8.1f}ms"
                  f"   rounds: {' '.join(f'{r:.2f}' for r in round_ratios(b, a))}")
    print(f"server logs, one per server start: {work}/r*.log")
    return 0


def cell_stem(rnd: int, label: str, log_on: bool) -> str:
    """The name of one server start's files (its log, its prediction log), unique in the run:
    round, tree and log setting ("r3-after-logon"), so no start writes over, or appends to,
    another's; a round that went astray can be read afterwards in its own log."""
    return f"r{rnd + 1}-{label.split()[0]}-log{'on' if log_on else 'off'}"


def batching_verdicts(server_log: str) -> str:
    """How many of a server's workers found at warm-up that batching pays (``ServedModel``'s
    calibration line), as "k/n" ("?" without such lines): a worker that does sends lone requests
    through its model thread, so a c=1 cell served by one runs at about half the rate, and a
    round's ratio says more beside it."""
    lines = [line for line in server_log.splitlines() if "per item in a batch" in line]
    if not lines:
        return "?"
    return f"{sum(': batching pays' in line for line in lines)}/{len(lines)}"


def round_order(labels: list[T], rnd: int) -> list[T]:
    """The two sides in the order round ``rnd`` measures them (the trees here, log off and on in
    ``logpair``): as given in even rounds, reversed in odd ones, so neither always runs first (a
    box warming up, or slowing down, favours none)."""
    return labels if rnd % 2 == 0 else labels[::-1]


def round_ratios(before: list[tuple[float, float]], after: list[tuple[float, float]]
                 ) -> list[float]:
    """after / before req/s of each round (the two cells of a round are minutes apart at most)."""
    return [a / b for (b, _), (a, _) in zip(before, after) if b > 0]


if __name__ == "__main__":
    sys.exit(main())
