"""The scaling table (``--task scaling``): the image reference model served with 1, 2 and 4
workers (``--scaling-workers``) at the loaded concurrencies, each with its req/s, p99, how its
model calls were batched, and the memory of each worker; then a cell of 4 long-lived connections
beside a 64-connection one (``spread.py``: does every worker serve them?). Run it where the service runs (2 CPU
cores here; on a GPU machine with ``--providers cuda``) to choose CLF_WORKERS."""

from __future__ import annotations

import dataclasses

from .cells import bench_served
from .report import fmt, markdown_table
from .sections import Run, checks_for, image_body, served_threads
from .server import ServerSpec
from .spread import spread_line, spread_section
from .store import ensure_reference


def run_scaling(run: Run, results: dict) -> None:
    cfg = run.cfg
    artifact, _ = ensure_reference(cfg.reference_model, run.log)
    body = image_body(run, artifact)
    checks = checks_for(run, artifact, body, "onnx")
    concs = [c for c in cfg.concs if c >= 16] or [max(cfg.concs)]
    section: dict = results.setdefault("scaling", {"model": f"{artifact.name}:{artifact.version}",
                                                   "body": body.description, "rows": []})
    run.heading(f"Scaling: {artifact.name} with {', '.join(map(str, cfg.scaling_workers))} "
                f"worker(s), prediction log off, c={', '.join(map(str, concs))}")
    for workers in cfg.scaling_workers:
        threads = served_threads(dataclasses.replace(cfg, workers=workers))
        spec = ServerSpec(model_tag=f"{artifact.name}:{artifact.version}", runtime="onnx",
                          workers=workers, providers=cfg.providers, port=cfg.port,
                          log_path=run.work_dir / f"server-scale-{workers}.log", task="image")
        served = bench_served(spec, body, checks, concs, run.plan(), run.log,
                              f"workers={workers}")
        section["rows"].append({"workers": workers, "intra_op_threads": threads, **served})
    section["table"] = scaling_table(section["rows"])
    run.log("\n" + section["table"])
    run.heading(f"A few long-lived connections (CLF_WORKERS={cfg.workers}): does every worker "
                "serve them?")
    spread = spread_section(run, artifact, body)
    section["spread"], section["spread_line"] = spread.get("spread"), spread_line(
        "spread", spread["spread"]) if spread.get("spread") else spread.get("error")
    section["table"] += "\n\n" + (section["spread_line"] or "").strip()


def scaling_table(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        workers_mb = (row.get("rss_mb") or {}).get("workers") or []
        for cell in row.get("cells", []):
            dist = " ".join(f"{label}:{share:.0%}" for label, share in (cell.batch_dist or []))
            lines.append([str(row["workers"]), str(row["intra_op_threads"]), str(cell.conc),
                          fmt(cell.rps, ".0f"), fmt(cell.wrk.p("50")), fmt(cell.wrk.p("99")),
                          fmt(cell.cpu.server_cores, ".2f"), fmt(cell.items_per_batch),
                          dist or "-",
                          "+".join(map(str, cell.conns_per_worker or [])) or "-",
                          " / ".join(f"{mb:.0f}" for mb in workers_mb) or "-",
                          str(cell.wrk.errors) + (" ⚠" if cell.contaminated else "")])
    return markdown_table(["workers", ">intra-op", ">c", ">req/s", ">p50 ms", ">p99 ms",
                           ">srv cores", ">items/call", "model calls by batch size",
                           "conns/worker", "RSS MB per worker", ">errors"], lines)
