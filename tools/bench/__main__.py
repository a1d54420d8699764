"""``python -m tools.bench``: the whole benchmark, printed as it goes, saved to
tools/bench/results/<UTC>.json (or ``--out``).

    python -m tools.bench                 # full run, images and texts (~14 min on 2 cores)
    python -m tools.bench --quick         # CI smoke (~3 min)
    python -m tools.bench --task text     # the text model only (image | text | overload | all)
    python -m tools.bench --task overload # 1,000 connections for 30 s: shed, bounded, recovered
    python -m tools.bench --workers 2 --conc 64 --skip-floor --skip-log
    python -m tools.bench --task peers    # Triton and this service, same ONNX file (--peers adds
                                          # it to a full run; needs ../shared/peers-bench/setup.sh)
    python -m tools.bench --task soak     # 5 min per model with the log on: memory, fds, threads
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from .config import command_line, machine_info, parse_config
from .image import image_summary_rows, run_image
from .overload import overload_table, run_overload, verdict_line
from .peers import run_peers
from .scaling import run_scaling
from .soak import run_soak
from .report import log_table, summary_table
from .sections import Run
from .store import store_path
from .text import run_text, text_summary_rows

TASKS = {"image": run_image, "text": run_text, "overload": run_overload, "peers": run_peers,
         "scaling": run_scaling, "soak": run_soak}


def log(msg: str) -> None:
    print(msg, flush=True)


def run_bench(run: Run, results: dict) -> None:
    """Each task in turn; a failed task is recorded and the next one still runs."""
    for task in run.cfg.tasks:
        try:
            TASKS[task](run, results)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the other task and the summary still run
            results.setdefault("errors", {})[task] = f"{type(exc).__name__}: {exc}"
            log(f"\n{task} FAILED: {results['errors'][task]}")
    run.heading("Summary")
    results["summary_markdown"] = _summary(results)
    log(results["summary_markdown"])


def _summary(results: dict) -> str:
    """The README's tables: images, texts, the prediction log's cost, and the method line."""
    parts = []
    text = results.get("text") or {}
    if "raw_best" in results and "served" in results:
        parts.append(summary_table(image_summary_rows(results), unit="img/s"))
    if "raw_best" in text and "served" in text:
        parts.append(f"Text mix: {text['mix']['description']}.\n\n"
                     + summary_table(text_summary_rows(text), unit="texts/s"))
    bounds = [b["line"] for b in (results.get("floor_bound"), text.get("floor_bound"),
                                  (text.get("v2") or {}).get("bound")) if b]
    if bounds:
        parts.append("\n".join(f"- {line}." for line in bounds))
    logged = [r for section in (results.get("log_on"), text.get("log_on")) if section
              for r in section.get("comparison", [])]
    if logged:
        parts.append("The prediction log's cost (log on vs off at the same c; rows = "
                     "SELECT COUNT(*) FROM predictions over the measured run):\n\n"
                     + log_table(logged))
    overload = results.get("overload") or {}
    if overload.get("phases"):
        parts.append(f"Overload ({overload['model']}, {overload['body']}):\n\n"
                     + overload_table(overload) + "\n\n" + verdict_line(overload))
    peers = results.get("peers") or {}
    if peers.get("table"):
        parts.append(f"Peers ({peers['model']['tag']}, the peers' file {peers['model']['source']}):"
                     "\n\n" + peers["table"] + "\n\n"
                     + "\n".join(f"- {v}" for v in peers.get("verdict", [])))
    scaling = results.get("scaling") or {}
    if scaling.get("table"):
        parts.append(f"Scaling ({scaling['model']}, {scaling['body']}):\n\n" + scaling["table"])
    soak = results.get("soak") or {}
    if soak.get("table"):
        parts.append(f"Soak (the prediction log on, c={soak['conc']}, {soak['seconds']:g} s per "
                     f"model, CLF_WORKERS={soak['workers']}):\n\n" + soak["table"])
    m, cfg = results["machine"], results["config"]
    provider = (results.get("raw_best") or text.get("raw_best") or peers.get("raw_best")
                or {}).get("provider")
    parts.append(
        f"{m['nproc']} cores ({m['cpu_model']}), onnxruntime {m['onnxruntime']}"
        + (f" ({provider})" if provider else "") + ", "
        f"CLF_WORKERS={cfg['workers']}; wrk -t1 closed loop pinned to CPU 1, "
        f"{cfg['duration_s']:g} s after {cfg['warmup_s']:g} s warm-up; x raw best = req/s over "
        "the same model's best raw in-process items/s; items/batch = mean items per model call; "
        "⚠ = other processes took > 0.25 cores during the cell; ⚖ = every wrk connection landed "
        "on one worker (the kernel picks the accepting worker; such a cell is measured again "
        "once and kept only if no attempt spread); every cell but the log-on ones"
        + (" and the soak's" if soak.get("table") else "")
        + " runs with CLF_PREDICTION_LOG=\"\".")
    return "\n\n".join(parts)


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
    sections = [results.get(k) for k in ("served", "v2", "floor", "log_on")]
    sections += [(results.get("text") or {}).get(k) for k in ("served", "floor", "log_on")]
    sections += [((results.get("text") or {}).get("v2") or {}).get(k) for k in ("served", "floor")]
    sections.append(results.get("overload"))
    sections += (results.get("scaling") or {}).get("rows", [])
    sections += (results.get("soak") or {}).get("models", [])
    sections += [row for r in (results.get("peers") or {}).get("runs", [])
                 for row in r["rows"].values()]
    failed = results.get("errors") or [s for s in sections if (s or {}).get("error")]
    return 1 if status or failed else 0


if __name__ == "__main__":
    sys.exit(main())
