"""The bench's sections: each measures one thing, prints its table and returns its record."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from modelstore.artifact import Artifact
from preprocessing import TextPreprocessor, preprocess_image_bytes
from service.runtime import resolve_providers
from service.settings import Settings

from .bodies import Body, digit_png, noise_png, write_image_body
from .cells import CellPlan, Check, bench_served
from .config import BenchConfig
from .cpu import least_contaminated
from .predlog import log_bytes, temp_log
from .raw import RAW_CONFIGS, RawConfig, bench_config, expected_probabilities
from .report import (P99_TARGET_X, bound_line, breakdown, breakdown_table, floor_bound,
                     log_rows, log_table, ratio, raw_table, served_table, tail_context,
                     tail_line)
from .server import ServerSpec


@dataclass
class Run:
    """What every section shares: the config, the log, the clock, the folder for bodies/logs."""

    cfg: BenchConfig
    log: Callable[[str], None]
    started: float
    work_dir: Path

    def may_retry(self) -> bool:
        """Re-measure contaminated cells only while the run is inside its time budget."""
        return time.monotonic() - self.started < self.cfg.budget_s

    def plan(self) -> CellPlan:
        c = self.cfg
        return CellPlan(warmup_s=c.warmup_s, duration_s=c.duration_s, retries=c.retries,
                        quiet_wait_s=c.quiet_wait_s, idle_s=c.idle_s, may_retry=self.may_retry)

    def heading(self, text: str) -> None:
        self.log(f"\n## {text}\n")


def served_threads(cfg: BenchConfig) -> int:
    """Intra-op threads each served worker's session gets, as the service computes them."""
    return dataclasses.replace(Settings(**cfg.service_settings), workers=cfg.workers).ort_threads


def cpu_threads_per_call(cfg: BenchConfig, available: Sequence[str] | None = None) -> int:
    """Cores one model call keeps busy, for the CPU breakdown's ORT estimate: the session's
    intra-op threads on the CPU; on the CUDA provider the one host thread that drives the GPU
    (the call's wall time is mostly the GPU's, not CPU)."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if resolve_providers(cfg.providers, list(available))[0] == "CUDAExecutionProvider":
        return 1
    return served_threads(cfg)


def cell_at(section: dict | None, conc: int):
    return next((c for c in (section or {}).get("cells", []) if c.conc == conc), None)


def print_served(run: Run, section: dict, raw_best: float | None, raw_b64_ms: float | None) -> None:
    if section.get("cells"):
        run.log("\n" + served_table(section["cells"], raw_best, raw_b64_ms))


@dataclass(frozen=True)
class Yardstick:
    """What a served p99 is compared with: one raw model call at the server's max batch size."""

    ms: float
    config: str
    what: str  # e.g. "the raw batch-64 call (37.6 ms p50, intra2_spin)"


def breakdown_section(run: Run, served: dict, floor: dict | None, conc: int,
                      yardstick: Yardstick | None) -> dict:
    """Where the server's CPU goes per request at ``conc`` (printed), and the p99 target."""
    model, floor_cell = cell_at(served, conc), cell_at(floor, conc)
    b = breakdown(model, floor_cell, cpu_threads_per_call(run.cfg))
    out: dict = {"breakdown": dataclasses.asdict(b) | {"residual_ms": b.residual_ms}}
    run.log(breakdown_table(b))
    how = ("inference = served CPU/req minus the noop floor's CPU/req at the same c"
           if b.method == "floor-difference" else
           "no floor measured: inference = ORT wall time per item x intra-op threads (x 1 on "
           "CUDA: the thread that drives the GPU)")
    run.log(f"\nMethod: {how}; CPU = utime+stime of the server's process tree from /proc over "
            "the measured window / wrk's requests; preprocessing and queue wait = the service's "
            "histograms (/metrics deltas over the same window).")
    p99 = model.wrk.p("99")
    x = ratio(p99, yardstick.ms if yardstick else None)
    if x is None:
        return out
    tail = tail_context(model.conc, model.rps, p99,
                        floor_cell.wrk.p("99") if floor_cell else None, yardstick.ms)
    out["p99_target"] = {"conc": model.conc, "p99_ms": p99, "raw_batch_call_ms": yardstick.ms,
                         "raw_batch_call_config": yardstick.config,
                         "raw_batch_call": yardstick.what, "x": x, "target_x": P99_TARGET_X,
                         "met": x < P99_TARGET_X, "tail": tail}
    run.log(f"p99 target at c={model.conc}: {p99:.1f} ms = {x:.1f}x {yardstick.what}; target < "
            f"{P99_TARGET_X:g}x: {'met' if x < P99_TARGET_X else 'MISSED'}")
    if (line := tail_line(tail)) is not None:
        run.log(f"  ({line})")
    return out


def floor_bound_section(run: Run, what: str, served: dict, floor: dict | None, conc: int,
                        raw_best: float) -> dict | None:
    """The served rate at ``conc`` against what the floor and the raw ceiling allow (printed)."""
    cell, floor_cell = cell_at(served, conc), cell_at(floor, conc)
    if cell is None or floor_cell is None:
        return None
    line = bound_line(what, cell.rps, raw_best, floor_cell.rps, conc)
    run.log(line + ".")
    return {"conc": conc, "raw_best": raw_best, "floor_rps": floor_cell.rps,
            "bound_rps": floor_bound(raw_best, floor_cell.rps), "served_rps": cell.rps,
            "served_over_bound": cell.rps / floor_bound(raw_best, floor_cell.rps), "line": line}


def log_cells(run: Run, task: str, artifact: Artifact, body: Body, served: dict,
              raw_best: float | None, raw_b64_ms: float | None) -> dict | None:
    """The prediction log on at ``cfg.log_concs``, printed next to the log-off cells."""
    cfg = run.cfg
    if not cfg.log_concs:
        return None
    inputs = "with" if cfg.service_settings.get("log_inputs") else "without"
    run.heading(f"{task}: the prediction log on (CLF_PREDICTION_LOG in a temporary folder, "
                f"{inputs} raw inputs, synchronous={cfg.service_settings.get('log_synchronous')})")
    section = log_section(run, artifact, body, cfg.log_concs, f"{task}-log")
    print_served(run, section, raw_best, raw_b64_ms)
    rows = log_rows(task, served.get("cells", []), section.get("cells", []))
    section["comparison"] = rows
    if rows:
        run.log("\n" + log_table(rows))
    if "log_rows_total" in section:
        run.log(f"\nlog rows in all: {section['log_rows_total']} (SELECT COUNT(*) FROM "
                f"predictions) vs {section['answered_2xx']} 2xx answers sent (checks, warm-ups "
                f"and measured runs); log size {section['log_bytes'] / 1e6:.1f} MB; "
                f"temporary folder deleted: {section['log_deleted']}")
    return section


def raw_section(run: Run, artifact: Artifact, configs: Sequence[RawConfig] = RAW_CONFIGS,
                batches: Sequence[int] | None = None, warmup_s: float | None = None,
                seconds: float | None = None) -> dict:
    """The in-process ceiling for one model: every config x batch, each config noise-checked."""
    cfg = run.cfg
    cells, per_config = [], []
    for config in configs:
        attempts = least_contaminated(
            lambda: bench_config(config, str(artifact.onnx_path), artifact.spec.input_shape,
                                 cfg.providers, list(batches or cfg.raw_batches),
                                 cfg.raw_warmup_s if warmup_s is None else warmup_s,
                                 cfg.raw_seconds if seconds is None else seconds, run.log),
            what=f"raw {config.name}", retries=cfg.retries, quiet_wait=cfg.quiet_wait_s,
            may_retry=run.may_retry, log=run.log)
        cells.extend(attempts.best)
        per_config.append({"config": config.name, "cpu": attempts.cpu.to_dict(),
                           "noise_per_attempt": attempts.noise_per_attempt,
                           "contaminated": attempts.contaminated})
    print("\n" + raw_table(cells) + "\n", flush=True)
    return {"model": f"{artifact.name}:{artifact.version}", "cells": cells, "configs": per_config}


def image_body(run: Run, artifact: Artifact) -> Body:
    """A one-image multipart body matched to the model's input: a digit for grayscale models
    (the digits model's own kind of input), seeded noise for colour ones."""
    spec = artifact.spec
    if spec.color_mode == "L":
        png = digit_png(0, size=spec.width)
        what = f"sklearn digit #0 as a {spec.width}x{spec.width} grayscale PNG"
    else:
        png = noise_png(spec.width, 3, seed=0)
        what = f"seeded noise {spec.width}x{spec.width} RGB PNG"
    return write_image_body(run.work_dir, artifact.name, png, what)


def expected_answer(run: Run, artifact: Artifact, body: Body, runtime: str) -> dict[str, float]:
    """The probabilities the server must return for the body's image."""
    labels = artifact.labels
    if runtime == "noop":
        return {label: 1.0 / len(labels) for label in labels}
    tensor = preprocess_image_bytes(body.image, artifact.spec)
    probs = expected_probabilities(str(artifact.onnx_path), run.cfg.providers, tensor)
    return {label: float(p) for label, p in zip(labels, probs)}


def text_checks(run: Run, artifact: Artifact, pre: TextPreprocessor, body: Body,
                runtime: str) -> list[Check]:
    """The mix's shortest and longest text, each alone, with the probabilities the bench
    computes for it (the artifact's tokenizer and ONNX model, in this process)."""
    lines = [line for line in body.path.read_bytes().splitlines() if line]  # as rotate.lua
    picks = sorted({min(range(len(body.texts)), key=lambda i: len(body.texts[i])),
                    max(range(len(body.texts)), key=lambda i: len(body.texts[i]))})
    labels = artifact.labels
    checks = []
    for i in picks:
        if runtime == "noop":
            expected = {label: 1.0 / len(labels) for label in labels}
        else:
            input_ids, attention_mask = pre.encode([body.texts[i]])
            probs = expected_probabilities(str(artifact.onnx_path), run.cfg.providers,
                                           {"input_ids": input_ids[0],
                                            "attention_mask": attention_mask[0]})
            expected = {label: float(p) for label, p in zip(labels, probs)}
        checks.append(Check(lines[i], expected, f" (text #{i}, {len(body.texts[i])} chars)"))
    return checks


def checks_for(run: Run, artifact: Artifact, body: Body, runtime: str) -> list[Check]:
    if body.texts:
        from modelstore.artifact import text_preprocessor

        return text_checks(run, artifact, text_preprocessor(artifact), body, runtime)
    return [Check(body.path.read_bytes(), expected_answer(run, artifact, body, runtime))]


def served_section(run: Run, artifact: Artifact, body: Body, runtime: str, concs: Sequence[int],
                   tag: str, prediction_log: str = "") -> dict:
    """One server (CLF_RUNTIME=runtime, the body's model only, the prediction log off unless a
    path is given) measured at each concurrency; stopped however it ends."""
    cfg = run.cfg
    task = "text" if body.texts else "image"
    spec = ServerSpec(model_tag=f"{artifact.name}:{artifact.version}", runtime=runtime,
                      workers=cfg.workers, providers=cfg.providers, port=cfg.port,
                      log_path=run.work_dir / f"server-{tag}.log", task=task,
                      prediction_log=prediction_log)
    checks = checks_for(run, artifact, body, runtime)
    run.log(f"  [{tag}] body: {body.description}")
    return bench_served(spec, body, checks, list(concs), run.plan(), run.log, tag)


def log_section(run: Run, artifact: Artifact, body: Body, concs: Sequence[int], tag: str) -> dict:
    """The same served cells with the prediction log on, in a temporary SQLite file (deleted
    afterwards); the result says how big the log grew."""
    with temp_log() as db:
        result = served_section(run, artifact, body, "onnx", concs, tag, prediction_log=str(db))
        result["log_bytes"] = log_bytes(db)
        result["log_inputs"] = run.cfg.service_settings.get("log_inputs")
        result["log_synchronous"] = run.cfg.service_settings.get("log_synchronous")
    result["log_deleted"] = not db.exists()
    return result
