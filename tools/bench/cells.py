"""Served measurements: one server, checked once, then one cell per concurrency.

A cell is the peers' procedure: a wrk warm-up run, then a measured ``wrk --latency`` run, with the
server tree's CPU taken from /proc over the measured window and the service's own histograms
scraped from ``/metrics`` just before and just after it (after a short settle, so requests still
in flight when wrk stops are counted on both sides or neither). With the prediction log on, the
log's rows are counted at the same two moments, so each cell says how many answers it logged.
Mid-run, ``ss`` says which worker holds each of wrk's connections: the worker that wakes first
accepts every pending connection, so a cell can end up measuring one worker alone; such a cell
is measured again (once, like a contaminated one) and marked if it stays so.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .bodies import Body
from .cpu import CpuUse, CpuWindow, least_contaminated, proc_status, rss_mb
from .predlog import count_rows
from .prometheus import (BATCH_ITEMS, INFERENCE, PREPROCESS, QUEUE_WAIT, HistogramDelta,
                         bucket_deltas, deltas, distribution)
from .server import Server, ServerError, ServerSpec, running
from .wrk import WrkResult, run_wrk

SETTLE_S = 1.0
PROB_TOLERANCE = 1e-4  # the service rounds probabilities to 6 decimals


@dataclass
class Cell:
    conc: int
    wrk: WrkResult
    cpu: CpuUse
    hist: dict[str, HistogramDelta]
    wrk_output: str
    noise_per_attempt: list[float] = field(default_factory=list)
    contaminated: bool = False
    warmup_ok: int = 0  # 2xx answers of the warm-up run before the measured one
    log_rows: int | None = None  # prediction-log rows added over the measured run (log on)
    # wrk's connections held by each worker mid-run, most first. Which worker accepts a
    # connection is the kernel's choice, and a keep-alive connection stays where it landed.
    conns_per_worker: list[int] | None = None
    # model calls per batch size range over the measured run: [("2-4", share), ...]
    batch_dist: list[tuple[str, float]] | None = None

    @property
    def one_worker(self) -> bool:
        """Every connection went to one worker although there were enough for each."""
        c = self.conns_per_worker
        return bool(c) and len(c) > 1 and self.conc >= len(c) and c[1] == 0

    @property
    def ok(self) -> int:
        """2xx answers wrk counted in the measured run."""
        return self.wrk.requests - self.wrk.non2xx

    @property
    def rps(self) -> float:
        return self.wrk.ok_per_s

    @property
    def items_per_batch(self) -> float | None:
        """Mean items per model call (batch_size_items sum/count): per call, not per request."""
        return self.hist[BATCH_ITEMS].mean

    @property
    def server_cpu_ms_per_request(self) -> float | None:
        return self.cpu.server_cpu_s * 1e3 / self.wrk.requests if self.wrk.requests else None

    def hist_mean_ms(self, name: str) -> float | None:
        mean = self.hist[name].mean
        return None if mean is None else mean * 1e3

    @property
    def ort_wall_ms_per_item(self) -> float | None:
        """Model-call wall time divided over the items it served."""
        items = self.hist[BATCH_ITEMS].sum
        return self.hist[INFERENCE].sum * 1e3 / items if items else None

    def to_dict(self) -> dict:
        return {
            "conc": self.conc, "rps": round(self.rps, 2), "requests": self.wrk.requests,
            "duration_s": self.wrk.duration_s, "p50_ms": self.wrk.p("50"),
            "p75_ms": self.wrk.p("75"), "p90_ms": self.wrk.p("90"), "p99_ms": self.wrk.p("99"),
            "non2xx": self.wrk.non2xx, "socket_errors": self.wrk.socket_errors,
            "errors": self.wrk.errors, "items_per_batch": self.items_per_batch,
            "model_calls": self.hist[BATCH_ITEMS].count,
            "server_cpu_ms_per_request": self.server_cpu_ms_per_request,
            "preprocess_ms_mean": self.hist_mean_ms(PREPROCESS),
            "queue_wait_ms_mean": self.hist_mean_ms(QUEUE_WAIT),
            "inference_ms_per_call_mean": self.hist_mean_ms(INFERENCE),
            "ort_wall_ms_per_item": self.ort_wall_ms_per_item,
            "histograms": {k: {"sum": v.sum, "count": v.count} for k, v in self.hist.items()},
            "cpu": self.cpu.to_dict(), "noise_per_attempt": self.noise_per_attempt,
            "contaminated": self.contaminated, "warmup_ok": self.warmup_ok,
            "log_rows": self.log_rows, "connections_per_worker": self.conns_per_worker,
            "one_worker": self.one_worker, "batch_distribution": self.batch_dist,
            "wrk_output": self.wrk_output,
        }


@dataclass(frozen=True)
class CellPlan:
    warmup_s: float
    duration_s: float
    retries: int
    quiet_wait_s: float
    idle_s: float
    may_retry: Callable[[], bool]


@dataclass(frozen=True)
class Check:
    """One request the bench sends before measuring, and the probabilities it must get back."""

    body: bytes
    expected: Mapping[str, float]
    what: str = ""


def measure_once(server: Server, body: Body, conc: int, plan: CellPlan, model: str,
                 log_db: Path | None = None) -> tuple[Cell, CpuUse]:
    warmup, _ = run_wrk(server.base + body.route, body, conc, plan.warmup_s, latency=False)
    time.sleep(SETTLE_S)
    rows_before = count_rows(log_db) if log_db else None
    before = server.metrics()
    spread: list = []
    sampler = threading.Timer(plan.duration_s / 2,
                              lambda: spread.append(server.connections_per_worker()))
    window = CpuWindow(server.tree)
    sampler.start()
    result, output = run_wrk(server.base + body.route, body, conc, plan.duration_s, latency=True)
    cpu = window.close()
    sampler.join()
    time.sleep(SETTLE_S)
    after = server.metrics()
    cell = Cell(conc, result, cpu, deltas(before, after, model), output,
                warmup_ok=warmup.requests - warmup.non2xx,
                conns_per_worker=spread[0] if spread else None,
                batch_dist=distribution(bucket_deltas(before, after, BATCH_ITEMS, model=model)))
    if log_db:
        cell.log_rows = count_rows(log_db) - rows_before
    return cell, cpu


def check_answer(server: Server, body: Body, check: Check) -> None:
    """One real request: 200, and the probabilities the bench computes itself for its input."""
    if body.route.startswith("/v2/"):
        return check_v2_answer(server, body, check)
    status, answer = server.post_classify(check.body, body.headers)
    if status != 200:
        raise ServerError(f"the check request{check.what} got HTTP {status}: {answer}")
    top_k = answer["predictions"][0]["top_k"]
    for entry in top_k:
        want = check.expected.get(entry["label"])
        if want is None or abs(want - entry["probability"]) > PROB_TOLERANCE:
            raise ServerError(f"wrong answer{check.what}: {top_k}; expected "
                              f"{dict(check.expected)}")


def check_v2_answer(server: Server, body: Body, check: Check) -> None:
    """``check_answer`` for a v2 body: the binary answer's ``probabilities`` (the full vector,
    in label order, which is ``check.expected``'s order) against the bench's own."""
    import json
    import urllib.error
    import urllib.request

    import numpy as np

    request = urllib.request.Request(server.base + body.route, data=check.body, method="POST")
    for header in body.headers:
        key, _, value = header.partition(":")
        request.add_header(key.strip(), value.strip())
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            raw, length = r.read(), r.headers.get("Inference-Header-Content-Length")
    except urllib.error.HTTPError as exc:
        raise ServerError(f"the v2 check request{check.what} got HTTP {exc.code}: "
                          f"{exc.read()[:500]!r}") from None
    split = int(length) if length else len(raw)
    header, pos = json.loads(raw[:split]), split
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if output["name"] == "probabilities":
            got = (np.frombuffer(raw[pos:pos + size], "<f4") if size is not None
                   else np.asarray(output["data"], np.float32))
            want = np.array(list(check.expected.values()), np.float32)
            if got.shape != want.shape or np.abs(got - want).max() > PROB_TOLERANCE:
                raise ServerError(f"wrong v2 answer{check.what}: {got.tolist()}; expected "
                                  f"{want.tolist()}")
            return
        pos += size or 0
    raise ServerError(f"the v2 answer{check.what} has no probabilities: {header}")


def bench_served(spec: ServerSpec, body: Body, checks: Sequence[Check], concs: list[int],
                 plan: CellPlan, log: Callable[[str], None], tag: str) -> dict:
    """Start one server, check it, measure its idle CPU and every concurrency; always stop it.
    With ``spec.prediction_log`` set, each cell also counts the log rows it added."""
    result: dict = {"runtime": spec.runtime, "model": spec.model_tag, "workers": spec.workers,
                    "prediction_log": spec.prediction_log, "body": body.description,
                    "checks": len(checks), "cells": []}
    model = spec.model_tag.split(":", 1)[0]
    log_db = Path(spec.prediction_log) if spec.prediction_log else None
    try:
        with running(spec, log) as server:
            result["startup_s"] = round(server.startup_s or 0.0, 2)
            for check in checks:
                check_answer(server, body, check)
            result["processes"] = len(server.tree.refresh())
            window = CpuWindow(server.tree)
            time.sleep(plan.idle_s)
            result["idle_server_cores"] = round(window.close().server_cores, 3)
            log(f"  [{tag}] ready in {result['startup_s']} s, answer checked, "
                f"{result['processes']} processes, idle {result['idle_server_cores']} cores")
            answered = len(checks)  # 2xx answers sent in all, retried attempts included

            def measure(conc: int) -> tuple[Cell, CpuUse]:
                nonlocal answered
                cell, cpu = measure_once(server, body, conc, plan, model, log_db)
                answered += cell.warmup_ok + cell.ok
                return cell, cpu

            for conc in concs:
                attempts = least_contaminated(
                    lambda: measure(conc), what=f"{tag} c={conc}",
                    retries=plan.retries, quiet_wait=plan.quiet_wait_s, may_retry=plan.may_retry,
                    log=log, unsuitable=_one_worker)
                cell = attempts.best
                cell.noise_per_attempt = attempts.noise_per_attempt
                cell.contaminated = attempts.contaminated
                log(_cell_line(tag, cell))
                result["cells"].append(cell)
            result["rss_mb"] = tree_rss_mb(server.tree.refresh())
            if log_db:
                result["answered_2xx"] = answered
                result["log_rows_total"] = count_rows(log_db)
    except Exception as exc:  # noqa: BLE001 - recorded and reported; the other sections still run
        result["error"] = f"{type(exc).__name__}: {exc}"
        log(f"  [{tag}] FAILED: {result['error']}")
    return result


def tree_rss_mb(pids: set[int]) -> dict[str, list[float]]:
    """Resident memory (MB) of a server's processes after its cells: ``workers`` (BentoML's
    HTTP workers, by their ``--worker-id`` argument) and ``others`` (the arbiter, helpers)."""
    out: dict[str, list[float]] = {"workers": [], "others": []}
    for pid in sorted(pids):
        status = proc_status(pid)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                worker = b"--worker-id" in f.read()
        except OSError:
            continue
        if status is not None:
            out["workers" if worker else "others"].append(round(rss_mb(status), 1))
    return out


def _one_worker(cell: Cell) -> str | None:
    """A cell where one worker got every connection measures one worker, not the server."""
    if not cell.one_worker:
        return None
    return f"all {cell.conc} connections went to one worker ({cell.conns_per_worker})"


def _cell_line(tag: str, c: Cell) -> str:
    def f(v: float | None, spec: str = ".1f") -> str:
        return "-" if v is None else format(v, spec)

    return (f"  [{tag}] c={c.conc:3d} {c.rps:7.1f} req/s  p50={f(c.wrk.p('50'))} ms  "
            f"p99={f(c.wrk.p('99'))} ms  items/batch={f(c.items_per_batch)}  "
            f"errors={c.wrk.errors}  conns/worker={conns(c)}  "
            f"srv={c.cpu.server_cores:.2f} cores ({f(c.server_cpu_ms_per_request, '.2f')} ms/req)  "
            f"foreign+steal={c.cpu.noise:.2f}{' !' if c.contaminated else ''}"
            + ("" if c.log_rows is None else f"  log rows +{c.log_rows} (2xx {c.ok})"))


def conns(c: Cell) -> str:
    """'10+6' connections per worker; '-' where not known."""
    return "+".join(map(str, c.conns_per_worker)) if c.conns_per_worker else "-"
