"""``python -m bench``: the whole benchmark, printed as it goes, saved to bench/results/<UTC>.json.

    python -m bench                 # full run (~6-8 min on 2 cores)
    python -m bench --quick         # CI smoke (< 2 min)
    python -m bench --workers 2 --conc 64 --skip-floor
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from service.settings import Settings

from .cells import Cell
from .config import BenchConfig, command_line, machine_info, parse_config
from .raw import RAW_CONFIGS, RawCell, best_cell, fastest_batch_call
from .report import (P99_TARGET_X, SummaryRow, breakdown, breakdown_table, ratio, served_table,
                     summary_row, summary_table)
from .sections import Run, image_body, raw_section, served_section
from .store import ensure_reference, find_default, store_path


def log(msg: str) -> None:
    print(msg, flush=True)


def heading(text: str) -> None:
    log(f"\n## {text}\n")


def served_threads(cfg: BenchConfig) -> int:
    """Intra-op threads each served worker's session gets, as the service computes them."""
    return dataclasses.replace(Settings(**cfg.service_settings), workers=cfg.workers).ort_threads


def cell_at(section: dict | None, conc: int) -> Cell | None:
    return next((c for c in (section or {}).get("cells", []) if c.conc == conc), None)


def run_bench(run: Run, results: dict) -> None:
    cfg = run.cfg
    heading("Reference model")
    artifact, exported = ensure_reference(cfg.reference_model, log)
    results["reference_model"] = {"tag": f"{artifact.name}:{artifact.version}",
                                  "exported_now": exported, "onnx": str(artifact.onnx_path),
                                  "store": store_path()}
    log(f"{artifact.name}:{artifact.version} ({'exported now' if exported else 'reused'}), "
        f"input {artifact.spec.input_shape}, {artifact.onnx_path}")

    heading(f"Raw ONNX Runtime, in-process (providers={cfg.providers}; p50/p99 per batch call)")
    raw = results["raw"] = raw_section(run, artifact)
    best = best_cell(raw["cells"])
    b64 = fastest_batch_call(raw["cells"], max(cfg.raw_batches))
    results["raw_best"], results["raw_batch_call"] = best.to_dict(), b64.to_dict()
    log(f"Raw best (the ratio denominator): {best.images_per_s:.0f} images/s ({best.config}, "
        f"batch {best.batch}). Fastest batch-{b64.batch} call (the p99 yardstick): "
        f"{b64.p50_ms:.1f} ms p50 ({b64.config}).")

    body = image_body(run, artifact)
    threads = served_threads(cfg)
    heading(f"Served {artifact.name} (CLF_WORKERS={cfg.workers}, {threads} intra-op thread(s) per "
            f"worker; wrk -t1 pinned to CPU 1, {cfg.warmup_s:g} s warm-up + {cfg.duration_s:g} s)")
    served = results["served"] = served_section(run, artifact, body, "onnx", cfg.concs, "served")
    _print_served(served, best.images_per_s, b64.p50_ms)
    floor = None
    if cfg.floor_concs:
        heading("The floor: the same cells with CLF_RUNTIME=noop (the request path, no model)")
        floor = served_section(run, artifact, body, "noop", cfg.floor_concs, "floor")
        results["floor"] = floor
        _print_served(floor, best.images_per_s, b64.p50_ms)

    top = max(cfg.concs)
    if cell_at(served, top) is not None:
        heading(f"Where the server's CPU goes, per request at c={top}")
        _breakdown(results, cell_at(served, top), cell_at(floor, top), threads, b64)

    heading(f"Default model ({cfg.default_model or 'skipped'})")
    results["default_model"] = _default_model(run, top)

    heading("Summary")
    results["summary_markdown"] = _summary(results, best, top)
    log(results["summary_markdown"])


def _breakdown(results: dict, model: Cell, floor: Cell | None, threads: int, b64: RawCell) -> None:
    b = breakdown(model, floor, threads)
    results["breakdown"] = dataclasses.asdict(b) | {"residual_ms": b.residual_ms}
    log(breakdown_table(b))
    how = ("inference = served CPU/req minus the noop floor's CPU/req at the same c"
           if b.method == "floor-difference" else
           "no floor measured: inference = ORT wall time per item x intra-op threads")
    log(f"\nMethod: {how}; CPU = utime+stime of the server's process tree from /proc over the "
        "measured window / wrk's requests; preprocessing and queue wait = the service's histograms "
        "(/metrics deltas over the same window).")
    p99 = model.wrk.p("99")
    x = ratio(p99, b64.p50_ms)
    if x is None:
        return
    results["p99_target"] = {"conc": model.conc, "p99_ms": p99, "raw_batch_call_ms": b64.p50_ms,
                             "raw_batch_call_config": b64.config, "x": x, "target_x": P99_TARGET_X,
                             "met": x < P99_TARGET_X}
    log(f"p99 target at c={model.conc}: {p99:.1f} ms = {x:.1f}x the raw batch-{b64.batch} call "
        f"({b64.p50_ms:.1f} ms, {b64.config}); target < {P99_TARGET_X:g}x: "
        f"{'met' if x < P99_TARGET_X else 'MISSED'}")


def _print_served(section: dict, raw_best: float, raw_b64_ms: float) -> None:
    if section.get("cells"):
        log("\n" + served_table(section["cells"], raw_best, raw_b64_ms))


def _default_model(run: Run, top: int) -> dict:
    cfg = run.cfg
    if not cfg.default_model:
        log("skipped (--default-model '')")
        return {"tag": "", "skipped": "--default-model ''"}
    artifact = find_default(cfg.default_model)
    if artifact is None:
        note = (f"{cfg.default_model} is not in the model store ({store_path()}): "
                "section skipped. `make train` (python -m training) exports it there.")
        log(note)
        return {"tag": cfg.default_model, "skipped": note}
    raw = raw_section(run, artifact, configs=RAW_CONFIGS[:2], warmup_s=0.5,
                      seconds=min(cfg.raw_seconds, 2.0))
    body = image_body(run, artifact)
    served = served_section(run, artifact, body, "onnx", [top], "default")
    best = best_cell(raw["cells"])
    _print_served(served, best.images_per_s,
                  fastest_batch_call(raw["cells"], max(cfg.raw_batches)).p50_ms)
    return {"tag": f"{artifact.name}:{artifact.version}", "raw": raw, "raw_best": best.to_dict(),
            "served": served}


def _summary(results: dict, best: RawCell, top: int) -> str:
    """The README's table: the reference model raw/served/floor, then the default model."""
    ref = results["reference_model"]["tag"].split(":")[0]
    rows = [SummaryRow(f"{ref} raw ORT in-process ({best.config}, batch {best.batch})", None,
                       best.images_per_s, 1.0)]
    rows += [summary_row(f"{ref} served", c, best.images_per_s)
             for c in results["served"].get("cells", [])]
    floor_cell = cell_at(results.get("floor"), top)
    if floor_cell:
        rows.append(summary_row(f"{ref} floor (CLF_RUNTIME=noop)", floor_cell, best.images_per_s))
    default = results.get("default_model") or {}
    if "served" in default:
        name, d = default["tag"].split(":")[0], default["raw_best"]
        rows.append(SummaryRow(f"{name} raw ORT in-process ({d['config']}, batch {d['batch']})",
                               None, d["images_per_s"], 1.0))
        rows += [summary_row(f"{name} served", c, d["images_per_s"])
                 for c in default["served"].get("cells", [])]
    m, cfg = results["machine"], results["config"]
    return (summary_table(rows) + "\n\n"
            f"{m['nproc']} cores ({m['cpu_model']}), onnxruntime {m['onnxruntime']} "
            f"({best.provider}), CLF_WORKERS={cfg['workers']}; wrk -t1 closed loop pinned to "
            f"CPU 1, {cfg['duration_s']:g} s after {cfg['warmup_s']:g} s warm-up; x raw best = "
            "req/s over the same model's best raw in-process images/s; items/batch = mean images "
            "per model call; ⚠ = other processes took > 0.25 cores during the cell.")


def _to_json(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def main(argv: Sequence[str] | None = None) -> int:
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    cfg = parse_config(argv)
    # A TERM (CI timeout, make interrupted) must still run the finally blocks that stop servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    now = datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    run = Run(cfg, log, time.monotonic(), cfg.out_dir / f"{stamp}-work")
    results: dict = {"started_utc": now.isoformat(timespec="seconds"), "command": command_line(),
                     "machine": machine_info(), "config": cfg.to_dict()}
    m = results["machine"]
    log(f"# clfserve benchmark, {results['started_utc']}\n\ncommand: {results['command']}\n"
        f"machine: {m['nproc']} cores ({m['cpu_model']}), kernel {m['kernel']}, "
        f"Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']} (available: {', '.join(m['ort_providers_available'])}), "
        f"bentoml {m['bentoml']}, git {m['git']}\nmodel store: {store_path()}")
    status = 0
    try:
        run_bench(run, results)
    except (KeyboardInterrupt, SystemExit):
        results["error"] = "interrupted"
        log("\nINTERRUPTED: every server started was stopped; partial results are saved")
        raise
    except Exception as exc:  # noqa: BLE001 - the partial results are still written below
        results["error"] = f"{type(exc).__name__}: {exc}"
        log(f"\nFAILED: {results['error']}")
        status = 1
    finally:
        results["elapsed_s"] = round(time.monotonic() - run.started, 1)
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        path = cfg.out_dir / f"{stamp}.json"
        path.write_text(json.dumps(results, indent=1, default=_to_json))
        log(f"\nresults: {path} (bodies and server logs: {run.work_dir}); "
            f"took {results['elapsed_s']:.0f} s")
    failed = [k for k in ("served", "floor") if (results.get(k) or {}).get("error")]
    return 1 if status or failed else 0


if __name__ == "__main__":
    sys.exit(main())
