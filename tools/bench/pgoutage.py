"""A PostgreSQL outage under load: ``python -m tools.bench.pgoutage``.

Serves the reference image model (two workers) with its prediction log in a throwaway
PostgreSQL cluster (tests/postgres.py: Debian's ``postgresql``, on this machine), puts a load of
keep-alive client threads on it, stops the database for ``--down`` seconds and starts it again,
and prints a table of the requests sent before, during and after the outage (count, rate,
share answered 200, p50, p99 and the slowest), then checks the database: every request answered
200 must be in it exactly once once the spool is replayed (``CLF_LOG_SPOOL_DIR``; with
``--no-spool`` the outage's requests are refused 503 instead, and counted as such).

    python -m tools.bench.pgoutage --before 10 --down 15 --after 10 --threads 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import httpx

from .bodies import noise_png
from .server import Server, ServerSpec
from .store import ensure_reference


def phase_row(name: str, sent: list[tuple[float, float, int]], start: float, end: float) -> str:
    """One line of the table: the requests sent in [start, end) (send time, latency, status)."""
    rows = [r for r in sent if start <= r[0] < end]
    if not rows:
        return f"{name:<8} {0:>7}"
    lat = sorted(r[1] * 1e3 for r in rows)
    ok = sum(r[2] == 200 for r in rows)
    return (f"{name:<8} {len(rows):>7} {len(rows) / (end - start):>8.0f} {100 * ok / len(rows):>6.1f}% "
            f"{statistics.median(lat):>7.1f} {lat[min(len(lat) - 1, int(len(lat) * 0.99))]:>7.1f} "
            f"{lat[-1]:>8.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.pgoutage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench-resnet", help="model store name")
    p.add_argument("--threads", type=int, default=4, help="client threads (one connection each)")
    p.add_argument("--before", type=float, default=10.0, help="seconds of load before")
    p.add_argument("--down", type=float, default=15.0, help="seconds the database is stopped")
    p.add_argument("--after", type=float, default=10.0, help="seconds of load after")
    p.add_argument("--port", type=int, default=3995)
    p.add_argument("--no-spool", action="store_true", help="CLF_LOG_SPOOL_DIR=\"\"")
    args = p.parse_args(argv)

    from tests.postgres import PostgresCluster, unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    artifact, _ = ensure_reference(args.model, print)
    png = noise_png(artifact.spec.width, 3, seed=0)
    work = Path(tempfile.mkdtemp(prefix="clfbench-pgoutage-"))
    cluster = PostgresCluster()
    url = cluster.database()
    spool = "" if args.no_spool else str(work / "spool")
    server = Server(ServerSpec(model_tag=f"{artifact.name}:{artifact.version}", runtime="onnx",
                               workers=2, providers="cpu", port=args.port,
                               log_path=work / "server.log",
                               settings=(("CLF_PREDICTION_LOG", url),
                                         ("CLF_LOG_SPOOL_DIR", spool))), print)
    sent: list[tuple[float, float, int, str]] = []
    stop = threading.Event()

    def client(index: int) -> None:
        with httpx.Client(timeout=30.0) as session:
            n = 0
            while not stop.is_set():
                rid, n = f"outage-{index}-{n}", n + 1
                t = time.monotonic()
                try:
                    status = session.post(server.classify_url, content=png, headers={
                        "Content-Type": "image/png", "X-Request-ID": rid}).status_code
                except httpx.HTTPError:
                    status = 0
                sent.append((t, time.monotonic() - t, status, rid))

    try:
        server.start(timeout_s=180)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.threads)]
        began = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(args.before)
        down = time.monotonic()
        cluster.pause()
        time.sleep(max(0.0, args.down - (time.monotonic() - down)))
        cluster.resume()
        up = time.monotonic()
        time.sleep(args.after)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        ended = time.monotonic()
    finally:
        stop.set()
        server.stop()  # a graceful stop: what the spools hold is replayed
    try:
        import psycopg

        with psycopg.connect(url) as con:
            logged = [rid for (rid,) in con.execute(
                "SELECT request_id FROM predictions WHERE request_id LIKE 'outage-%'")]
    finally:
        cluster.stop()
    print(f"\n{artifact.name}:{artifact.version}, {args.threads} client threads, PostgreSQL "
          f"stopped for {up - down:.1f} s, spool {'off' if args.no_spool else 'on'}")
    print(f"{'phase':<8} {'sent':>7} {'req/s':>8} {'200':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'max ms':>8}")
    rows = [(t, lat, status) for t, lat, status, _ in sent]
    print(phase_row("before", rows, began, down))
    print(phase_row("down", rows, down, up))
    print(phase_row("after", rows, up, ended))
    answered = {rid for _, _, status, rid in sent if status == 200}
    missing, doubled = answered - set(logged), len(logged) - len(set(logged))
    print(f"answered 200: {len(answered)}; in the database: {len(logged)} rows; answered and "
          f"missing: {len(missing)}; logged twice: {doubled}")
    return 1 if missing or doubled else 0


if __name__ == "__main__":
    sys.exit(main())
