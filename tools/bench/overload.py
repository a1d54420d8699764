"""The overload cell: far more connections than the server can serve, with the service's settings
as configured (their defaults unless CLF_* says otherwise).

One server (the reference image model, prediction log off) goes through three phases, each a
wrk run posting the same one-PNG multipart body, each answer timed by its status
(``overload.lua``):

  before    normal load (``--overload-normal-conc``, 64) after a warm-up: the rate the implied
            bound is computed from, and the server's resident memory at normal load
  overload  ``wrk -t2 -c1000 -d30s --timeout 2s``: every request must be answered (200, or 503
            ``overloaded`` at once) within 2 s; the 200s' p99 must stay within the bound the
            settings imply; the server's memory is sampled every few seconds
  after     normal load again, at once: it must serve as before (no error, the same rate)

The bound the settings imply for an accepted request: ``CLF_REQUEST_DEADLINE_MS``, counted from
its admission at the door, plus the one model call it may be in when that passes (an item still
queued at its deadline is dropped, 504; the cell checks the 200s' p99 against it). The queue bound
is no time bound: it sets how many requests are held, and so, by Little's law, the
*mean* time an accepted request spends in a server whose admitted queue is full
(``CLF_MAX_QUEUE_REQUESTS`` x workers / the rate it answers at under the flood of one-image
requests, where it is the smaller bound). The cell prints that
figure beside the measured p50; a p99 cannot be below it, which is why it is not the bound.

wrk needs a file descriptor per connection and so does the server: the cell raises this
process's soft ``RLIMIT_NOFILE`` (wrk and the server inherit it) to the hard limit while it
runs. Other processes' CPU is recorded like every cell's, not retried: the cell is a
behaviour check (answered, bounded, flat, recovered), not a rate to compare.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from service.settings import Settings

from .bodies import Body, write_v2_image_body
from .cells import Check, check_answer
from .cpu import CpuWindow, proc_status, rss_mb
from .prometheus import BATCH_ITEMS, INFERENCE, QUEUE_WAIT, Samples, deltas, total
from .report import fmt, markdown_table
from .sections import Run, expected_answer, image_body
from .server import Server, ServerSpec, running
from .store import ensure_reference
from .wrk import WRK_CPU, WrkError, parse_wrk

OVERLOAD_LUA = Path(__file__).with_name("overload.lua")
TIMEOUT_S = 2  # an answer later than this counts as none (wrk --timeout)
RSS_EVERY_S = 5.0
_STATUS_LINE = re.compile(r"^OVERLOAD status=(\d+) count=(\d+) p50=([\d.]+) p90=([\d.]+) "
                          r"p99=([\d.]+) max=([\d.]+)$", re.M)
_PENDING_LINE = re.compile(r"^OVERLOAD pending=(\d+) pending_over_timeout=(\d+) "
                           r"unmatched=(\d+)$", re.M)


@dataclass
class StatusLatency:
    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class Phase:
    """One wrk run of the cell: answers by status with their latencies, and what wrk saw."""

    name: str
    conns: int
    threads: int
    duration_s: float
    requests: int  # answers wrk counted
    statuses: dict[int, StatusLatency]
    pending: int  # sent and never answered before wrk stopped
    pending_over_timeout: int  # of those, sent more than TIMEOUT_S before it stopped
    wrk_timeouts: int  # wrk's own count of answers later than --timeout (and its checks)
    socket_errors: dict[str, int]
    server_cores: float
    noise: float
    rss_mb: list[float] = field(default_factory=list)  # the server tree's, sampled during it
    shed: dict[str, float] = field(default_factory=dict)  # clf_shed_requests_total deltas
    conns_per_worker: list[int] | None = None  # mid-run, most first (``ss``)
    # the service's own histograms over the run (means): queue wait, model call, items per call
    queue_wait_ms: float | None = None
    # BentoML's request_duration_seconds for the 200s over the run: the upper bound of the
    # bucket holding their p99, in ms (server side: from when the server took the request)
    server_p99_200_le_ms: float | None = None
    model_call_ms: float | None = None
    items_per_call: float | None = None
    command: str = ""

    def count(self, status: int) -> int:
        s = self.statuses.get(status)
        return s.count if s else 0

    def ok_per_s(self) -> float:
        return self.count(200) / self.duration_s if self.duration_s else 0.0

    @property
    def unanswered(self) -> int:
        """Requests without an answer within the timeout: wrk's timeouts and the ones still
        waiting at the end for longer than it."""
        return self.wrk_timeouts + self.pending_over_timeout

    @property
    def other(self) -> int:
        return sum(s.count for code, s in self.statuses.items() if code not in (200, 503, 504))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["statuses"] = {str(k): asdict(v) for k, v in self.statuses.items()}
        d["ok_per_s"] = round(self.ok_per_s(), 1)
        d["unanswered"] = self.unanswered
        return d


def parse_phase(name: str, conns: int, threads: int, out: str) -> Phase:
    wrk = parse_wrk(out)
    statuses = {int(m[0]): StatusLatency(int(m[1]), float(m[2]), float(m[3]), float(m[4]),
                                         float(m[5])) for m in _STATUS_LINE.findall(out)}
    m = _PENDING_LINE.search(out)
    if m is None:
        raise WrkError(f"the overload script printed no summary:\n{out[-2000:]}")
    pending, late, _ = map(int, m.groups())
    errors = dict(wrk.socket_errors)
    return Phase(name, conns, threads, wrk.duration_s, wrk.requests, statuses, pending, late,
                 errors.pop("timeout", 0), errors, 0.0, 0.0)


@contextmanager
def open_files(want: int = 65536) -> Iterator[int]:
    """This process's soft RLIMIT_NOFILE raised towards ``want`` (its children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    raised = max(soft, target)
    resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    try:
        yield raised
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def drain(server: Server, model: str, limit_s: float = 10.0) -> float | None:
    """Seconds until the server holds no admitted item (``clf_queue_items`` 0): what it still
    computes after wrk closed its connections (the requests it had read). None: not in time."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if total(server.metrics(), "clf_queue_items", model=model) == 0:
            return round(time.monotonic() - t0, 2)
        time.sleep(0.1)
    return None


def tree_rss_mb(server: Server) -> float:
    """Resident memory of the server's whole process tree (VmRSS summed), in MB."""
    return sum(rss_mb(status) for status in map(proc_status, server.tree.refresh())
               if status is not None)


def run_phase(server: Server, body: Body, name: str, conns: int, threads: int,
              seconds: float, sample_rss: bool = False) -> Phase:
    """One bounded wrk run with ``overload.lua``, the server's CPU, shed counters and (when
    asked) its memory every RSS_EVERY_S seconds."""
    cmd = ["taskset", "-c", WRK_CPU, "wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds:g}s",
           f"--timeout={TIMEOUT_S}s", "-s", str(OVERLOAD_LUA)]
    for header in body.headers:
        cmd += ["-H", header]
    cmd.append(server.base + body.route)
    env = dict(os.environ, CLF_BENCH_BODY=str(body.path),
               CLF_BENCH_TIMEOUT_MS=str(TIMEOUT_S * 1000))
    model = server.spec.model_tag.split(":", 1)[0]
    before = server.metrics()
    samples: list[float] = []
    spread: list = []
    stop = threading.Event()

    def sample() -> None:
        start = time.monotonic()
        while not stop.wait(min(RSS_EVERY_S, seconds / 2)):
            if sample_rss:
                samples.append(round(tree_rss_mb(server), 1))
            if not spread and time.monotonic() - start >= seconds / 2:
                spread.append(server.connections_per_worker())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    window = CpuWindow(server.tree)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 60)
    except FileNotFoundError as exc:
        raise WrkError(f"cannot run {cmd[0]!r}: {exc}; install wrk (apt-get install wrk)") from None
    finally:
        stop.set()
    cpu = window.close()
    sampler.join()
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise WrkError(f"wrk exited with {proc.returncode}:\n{out[-2000:]}")
    phase = parse_phase(name, conns, threads, out)
    phase.server_cores, phase.noise = round(cpu.server_cores, 2), round(cpu.noise, 2)
    phase.rss_mb = samples
    phase.conns_per_worker = spread[0] if spread else None
    time.sleep(1.0)  # answers in flight at wrk's stop land in the counters too
    after = server.metrics()
    phase.server_p99_200_le_ms = server_p99_le_ms(before, after, body.route)
    hist = deltas(before, after, model)
    phase.queue_wait_ms = _ms(hist[QUEUE_WAIT].mean)
    phase.model_call_ms = _ms(hist[INFERENCE].mean)
    phase.items_per_call = (round(hist[BATCH_ITEMS].mean, 1)
                            if hist[BATCH_ITEMS].mean is not None else None)
    for reason in ("overloaded", "deadline"):
        phase.shed[reason] = (total(after, "clf_shed_requests_total", model=model, reason=reason)
                              - total(before, "clf_shed_requests_total", model=model,
                                      reason=reason))
    phase.command = " ".join(cmd)
    return phase


def server_p99_le_ms(before: Samples, after: Samples, route: str, status: str = "200",
                     q: float = 0.99) -> float | None:
    """The upper bound (ms) of the bucket of BentoML's ``*request_duration_seconds`` histogram
    that holds the ``q`` quantile of the run's ``status`` answers on ``route``."""
    buckets: dict[float, float] = {}
    for source, sign in ((after, 1.0), (before, -1.0)):
        for (name, labels), value in source.items():
            if not name.endswith("request_duration_seconds_bucket"):
                continue
            d = dict(labels)
            if d.get("http_response_code") != status or route not in d.get("endpoint", ""):
                continue
            le = float(d["le"])
            buckets[le] = buckets.get(le, 0.0) + sign * value
    if not buckets or not buckets.get(float("inf")):
        return None
    count = buckets[float("inf")]
    return next((le * 1e3 for le in sorted(buckets) if buckets[le] >= q * count), None)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


def one_input_bound(settings: Settings) -> int:
    """The requests of one input each that a worker holds at most (the flood's): the smaller of
    ``CLF_MAX_QUEUE_REQUESTS`` and ``CLF_MAX_QUEUE_ITEMS`` (0: no bound)."""
    bounds = [b for b in (settings.max_queue_requests, settings.max_queue_items) if b]
    return min(bounds) if bounds else 0


def implied_bound_ms(settings: Settings, workers: int, overload_rps: float,
                     model_call_ms: float) -> dict:
    """What the settings promise an accepted request (``bound_ms``: the deadline plus the model
    call an item may be in when it passes; None without a deadline) and what the queue bound
    predicts (``little_ms``: the mean time in a server whose admitted queue is full, answering
    at ``overload_rps``)."""
    held = one_input_bound(settings)
    little_ms = held * workers / overload_rps * 1e3 if held and overload_rps else None
    deadline_ms = (settings.request_deadline_ms + model_call_ms
                   if settings.request_deadline_ms else None)
    return {"little_ms": little_ms, "deadline_ms": deadline_ms, "bound_ms": deadline_ms}


def overload_section(run: Run, spec: ServerSpec, body: Body, check: Check) -> dict:
    cfg = run.cfg
    settings = Settings(**cfg.service_settings)
    result: dict = {"model": spec.model_tag, "workers": spec.workers, "body": body.description,
                    "max_queue_items": settings.max_queue_items,
                    "max_queue_requests": settings.max_queue_requests,
                    "queue_bound": one_input_bound(settings),
                    "request_deadline_ms": settings.request_deadline_ms,
                    "max_batch_size": settings.max_batch_size, "phases": []}
    normal, conns = cfg.overload_normal_conc, cfg.overload_conns
    try:
        with open_files(max(4096, conns * 4)) as nofile, running(spec, run.log) as server:
            result["nofile"] = nofile
            check_answer(server, body, check)
            run_phase(server, body, "warm-up", normal, 1, cfg.warmup_s)
            result["rss_before_mb"] = round(tree_rss_mb(server), 1)
            before = run_phase(server, body, "before", normal, 1, cfg.overload_normal_s)
            overload = run_phase(server, body, "overload", conns, 2, cfg.overload_duration_s,
                                 sample_rss=True)
            result["rss_after_overload_mb"] = round(tree_rss_mb(server), 1)
            result["drain_s"] = drain(server, spec.model_tag.split(":", 1)[0])
            after = run_phase(server, body, "after", normal, 1, cfg.overload_normal_s)
            result["rss_after_mb"] = round(tree_rss_mb(server), 1)
            metrics = server.metrics()
            model = spec.model_tag.split(":", 1)[0]
            calls = total(metrics, "clf_inference_seconds_count", model=model)
            call_ms = total(metrics, "clf_inference_seconds_sum", model=model) / calls * 1e3 \
                if calls else 0.0
            result["model_call_ms_mean"] = round(call_ms, 1)
        result["phases"] = [before, overload, after]
        result["bound"] = implied_bound_ms(settings, spec.workers, overload.ok_per_s(), call_ms)
        result["verdict"] = verdict(result, before, overload, after)
        for phase in result["phases"]:
            run.log(f"  [overload] {phase.command}")
        run.log("\n" + overload_table(result))
        run.log("\n" + verdict_line(result))
    except Exception as exc:  # noqa: BLE001 - recorded and reported; the rest still runs
        result["error"] = f"{type(exc).__name__}: {exc}"
        run.log(f"  [overload] FAILED: {result['error']}")
    return result


def verdict(result: dict, before: Phase, overload: Phase, after: Phase) -> dict:
    bound = result["bound"]["bound_ms"]
    ok = overload.statuses.get(200)
    during = overload.rss_mb
    return {
        "every_request_answered": overload.unanswered == 0 and overload.other == 0,
        "only_200_or_503": overload.other == 0 and overload.count(504) == 0,
        "p99_200_within_bound": bool(ok and bound and ok.p99_ms <= bound),
        "server_p99_200_within_bound": bool(overload.server_p99_200_le_ms and bound
                                            and overload.server_p99_200_le_ms <= bound),
        # memory: its growth while the overload lasted (first to last sample), and after it
        # against the normal-load figure before it
        "rss_growth_during_mb": round(during[-1] - during[0], 1) if len(during) > 1 else None,
        "rss_after_vs_before_mb": round(result["rss_after_mb"] - result["rss_before_mb"], 1),
        "after_serves_normally": (after.other + after.count(503) + after.count(504) == 0
                                  and after.unanswered == 0
                                  and after.ok_per_s() >= 0.8 * before.ok_per_s()),
    }


def overload_table(result: dict) -> str:
    headers = ["phase", "conns", "s", "answers/s", "200", "503", "504", "other",
               "no answer ≤ 2 s", "200/s", "200 p50 ms", "200 p99 ms", "200 max ms",
               "server 200 p99 ≤ ms", "503 p50 ms", "503 p99 ms", "queue wait ms",
               "items/call", "server cores", "others' cores", "conns/worker", "server RSS MB"]
    rss = {"before": result["rss_before_mb"], "overload": result["rss_after_overload_mb"],
           "after": result["rss_after_mb"]}
    rows = []
    for p in result["phases"]:
        ok, shed = p.statuses.get(200), p.statuses.get(503)
        during = f"{p.rss_mb[0]:.0f}..{max(p.rss_mb):.0f} → " if p.rss_mb else ""
        rows.append([p.name, str(p.conns), f"{p.duration_s:.0f}",
                     fmt(p.requests / p.duration_s if p.duration_s else None, ".0f"),
                     str(p.count(200)), str(p.count(503)), str(p.count(504)), str(p.other),
                     str(p.unanswered), fmt(p.ok_per_s(), ".0f"),
                     fmt(ok.p50_ms if ok else None), fmt(ok.p99_ms if ok else None),
                     fmt(ok.max_ms if ok else None), fmt(p.server_p99_200_le_ms, ".0f"),
                     fmt(shed.p50_ms if shed else None), fmt(shed.p99_ms if shed else None),
                     fmt(p.queue_wait_ms), fmt(p.items_per_call),
                     f"{p.server_cores:.2f}", f"{p.noise:.2f}",
                     "+".join(map(str, p.conns_per_worker)) if p.conns_per_worker else "-",
                     f"{during}{rss[p.name]:.0f}"])
    return markdown_table(headers, rows)


def verdict_line(result: dict) -> str:
    b, v = result["bound"], result["verdict"]
    phase = next((p for p in result["phases"] if p.name == "overload"), None)
    ok = phase.statuses.get(200) if phase else None
    server = phase.server_p99_200_le_ms if phase else None
    growth = v["rss_growth_during_mb"]
    drained = result.get("drain_s")
    if b["deadline_ms"] is not None:
        bound = (f"CLF_REQUEST_DEADLINE_MS={result['request_deadline_ms']:g} + a mean model call "
                 f"({result['model_call_ms_mean']:.0f} ms) = {b['deadline_ms']:.0f} ms")
    else:
        bound = "none (CLF_REQUEST_DEADLINE_MS=0)"
    little = ""
    if b["little_ms"] is not None:
        little = (f" The queue bound ({result.get('queue_bound', result['max_queue_items'])} "
                  "one-input requests per worker, the smaller of CLF_MAX_QUEUE_REQUESTS and "
                  f"CLF_MAX_QUEUE_ITEMS, x {result['workers']} workers) predicts a mean of {b['little_ms']:.0f} ms at "
                  f"the flood's 200 rate (Little's law); measured 200 p50 "
                  f"{fmt(ok.p50_ms if ok else None, '.0f')} ms.")
    return (f"Bound the settings imply for an accepted request: {bound}. Overload: 200 p99 "
            f"{fmt(ok.p99_ms if ok else None, '.0f')} ms at the client "
            f"({'within' if v['p99_200_within_bound'] else 'OVER'}), <= "
            f"{fmt(server, '.0f')} ms in the server "
            f"({'within' if v['server_p99_200_within_bound'] else 'OVER'}).{little} Every "
            f"request answered within {TIMEOUT_S} s: "
            f"{'yes' if v['every_request_answered'] else 'NO'}; "
            f"server RSS {fmt(growth, '+.0f')} MB while it lasted, "
            f"{v['rss_after_vs_before_mb']:+.0f} MB after vs before; what it had read when wrk "
            f"stopped was done {fmt(drained, '.1f')} s later (+1 s settle), then: "
            f"{'serves normally' if v['after_serves_normally'] else 'NOT NORMAL'}.")


def run_overload(run: Run, results: dict) -> None:
    """The overload cell on the reference image model (exported first if absent)."""
    cfg = run.cfg
    artifact, _ = ensure_reference(cfg.reference_model, run.log)
    wire = "v2 BYTES tensors to the v2 infer route" if cfg.overload_wire == "v2" else \
        "/v1 multipart PNG uploads"
    run.heading(f"Overload: {cfg.overload_conns} connections on {artifact.name}, {wire} "
                f"(CLF_WORKERS={cfg.workers}, settings as configured, prediction log off; "
                f"wrk -t2 --timeout {TIMEOUT_S}s pinned to CPU {WRK_CPU}, "
                f"{cfg.overload_duration_s:g} s between {cfg.overload_normal_s:g} s at "
                f"c={cfg.overload_normal_conc} before and after)")
    body = image_body(run, artifact)
    if cfg.overload_wire == "v2":
        body = write_v2_image_body(run.work_dir, artifact.name, body.image, body.description,
                                   artifact.name)
    spec = ServerSpec(model_tag=f"{artifact.name}:{artifact.version}", runtime="onnx",
                      workers=cfg.workers, providers=cfg.providers, port=cfg.port,
                      log_path=run.work_dir / "server-overload.log", task="image")
    check = Check(body.path.read_bytes(), expected_answer(run, artifact, body, "onnx"))
    results["overload"] = overload_section(run, spec, body, check)
