"""A cell of a few long-lived connections: does every worker serve them (service/listeners.py)?

A proxy or load balancer in front of a replica holds a few keep-alive connections, and a
keep-alive connection stays with the worker that accepted it. With one shared listening socket
that worker is whichever accepted first, so 4 connections could all land on one worker and the
replica ran at half its throughput; with ``CLF_REUSEPORT`` (the default) each worker listens on a
socket of its own and the kernel spreads connections by a hash of their addresses. This section
measures, on one server, a cell of ``few`` connections (4) beside a many-connection one and
reports the connections each worker held mid-run and the few cell's throughput against the many
one. (As in every served cell, one where all connections landed on one worker is measured once
more; ``every_worker_serves`` says whether the kept one spread.)

    from .spread import spread_section
    record = spread_section(run, artifact, body)  # after image_body(run, artifact)

The record is ``served_section``'s (``cells``: the two ``Cell`` objects) plus ``"spread"``, a plain
dict for the results file (``summarize``).
"""

from __future__ import annotations

from modelstore.artifact import Artifact

from .bodies import Body
from .cells import Cell
from .sections import Run, cell_at, served_section

FEW = 4  # a proxy's handful of connections: two per worker at the default CLF_WORKERS=2
MANY = 64  # the main table's largest cell


def spread_section(run: Run, artifact: Artifact, body: Body, few: int = FEW,
                   many: int | None = None, runtime: str = "onnx", tag: str = "spread") -> dict:
    """One server (``run.cfg.workers`` workers, the service's settings from the environment,
    CLF_REUSEPORT included) measured at ``few`` and ``many`` connections (``many`` defaults to
    the run's largest concurrency, at least ``MANY`` when that is not above ``few``); logs one
    line and returns the section's record with its ``"spread"`` summary."""
    largest = max(run.cfg.concs, default=MANY)
    many = many or (largest if largest > few else MANY)
    result = served_section(run, artifact, body, runtime, (few, many), tag)
    summary = summarize(cell_at(result, few), cell_at(result, many), run.cfg.workers)
    summary["reuseport"] = run.cfg.service_settings.get("reuseport")
    result["spread"] = summary
    run.log(spread_line(tag, summary))
    return result


def summarize(few: Cell | None, many: Cell | None, workers: int) -> dict:
    """The two cells as the results file keeps them: req/s of each, their ratio, and the few
    cell's connections per worker (most first) and whether every worker held one."""
    per_worker = few.conns_per_worker if few else None
    ratio = (few.rps / many.rps) if few and many and many.rps else None
    return {
        "few": few.conc if few else None, "many": many.conc if many else None,
        "few_rps": round(few.rps, 2) if few else None,
        "many_rps": round(many.rps, 2) if many else None,
        "few_vs_many": round(ratio, 3) if ratio is not None else None,
        "connections_per_worker": per_worker,
        "every_worker_serves": (None if not per_worker else
                                len(per_worker) >= workers and min(per_worker) > 0),
    }


def spread_line(tag: str, s: dict) -> str:
    """``  [spread] c=4: 1290.1 req/s, 0.97 x c=64's 1330.0; conns/worker 3+1 (...)``"""
    if s["few_rps"] is None:
        return f"  [{tag}] no c={s['few']} cell (see the error above)"
    per_worker = "+".join(map(str, s["connections_per_worker"] or [])) or "-"
    verdict = {True: "every worker serves", False: "NOT every worker serves",
               None: "who serves is unknown"}[s["every_worker_serves"]]
    versus = ("" if s["few_vs_many"] is None else
              f", {s['few_vs_many']:.2f} x c={s['many']}'s {s['many_rps']:.1f}")
    return (f"  [{tag}] c={s['few']}: {s['few_rps']:.1f} req/s{versus}; conns/worker "
            f"{per_worker} ({verdict}; CLF_REUSEPORT={s.get('reuseport')})")

