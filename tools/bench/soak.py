"""The soak cell (``--task soak``): does a server that runs for a long time stay the same size?

Each model (the image reference model with its one-image body, then the text model with the
bench's rotating text mix) is served as in production: the prediction log on (SQLite, in the
run's work folder), the configured settings, ``--soak-conc`` connections in a closed loop for
``--soak-seconds``. Every 15 s (4 in ``--quick``) the cell samples the requests answered so far
(the service's own ``bentoml_service_request_total``, 200s on the route), each process of the
server (the arbiter, each worker): its resident memory, open files (descriptors but sockets,
which come and go with the clients) and threads, and the prediction log's size on disk (the
database, its journals and side files; deleted once measured: a few minutes of images with
their inputs kept make gigabytes).

What it shows. A leak grows with the requests served; warm-up (allocator pools, ONNX Runtime's
arena, caches, the log's first pages) grows once and levels off. So the verdict fits each
process's RSS against requests answered by least squares over the samples after the first
fifth of the run and prints the slope in MB per 100,000 answers, with the open files and
threads then and at the end (growth there is a leak of another kind), and the log's bytes per
answer (what retention has to plan for). A worker that died and came back shows as a new PID.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from . import logpair
from .bodies import Body
from .cpu import proc_status, rss_mb
from .predlog import log_size, remove_log
from .prometheus import total
from .report import fmt, markdown_table
from .sections import Run, image_body
from .server import ROUTES, Server, ServerSpec, running
from .store import ensure_reference
from .wrk import run_wrk

REQUESTS = "bentoml_service_request_total"
SETTLED_SHARE = 0.2  # the slope leaves out the samples of this first share of the run
MB = 1024 * 1024


@dataclass(frozen=True)
class ProcSample:
    rss_mb: float
    files: int  # open file descriptors but sockets (those come and go with the clients)
    threads: int


@dataclass(frozen=True)
class Sample:
    t_s: float
    answered: int  # 200s on the route so far, by the service's counter
    procs: dict[int, ProcSample]  # by PID
    log_bytes: int


def run_soak(run: Run, results: dict) -> None:
    cfg = run.cfg
    out = results["soak"] = {"seconds": cfg.soak_seconds, "conc": cfg.soak_conc,
                             "every_s": cfg.soak_every_s, "workers": cfg.workers, "models": []}
    image, _ = ensure_reference(cfg.reference_model, run.log)
    text_tag, text_body = logpair.text_body(run.work_dir, cfg.text_model)  # the bench's mix
    for task, tag, body in (("image", f"{image.name}:{image.version}", image_body(run, image)),
                            ("text", text_tag, text_body)):
        run.heading(f"Soak: {tag} with the prediction log on, c={cfg.soak_conc} for "
                    f"{cfg.soak_seconds:g} s, sampled every {cfg.soak_every_s:g} s")
        log_path = run.work_dir / f"soak-{task}.db"
        spec = ServerSpec(model_tag=tag, runtime="onnx", workers=cfg.workers,
                          providers=cfg.providers, port=cfg.port, task=task,
                          log_path=run.work_dir / f"server-soak-{task}.log",
                          prediction_log=str(log_path))
        section = {"model": tag, "task": task, "body": body.description}
        out["models"].append(section)
        try:
            with running(spec, run.log) as server:
                section.update(soak(server, body, log_path, cfg.soak_conc, cfg.soak_seconds,
                                    cfg.soak_every_s, run.log))
        except Exception as exc:  # noqa: BLE001 - the other model still runs
            section["error"] = f"{type(exc).__name__}: {exc}"
            run.log(f"soak of {tag} FAILED: {section['error']}")
            continue
        finally:  # gigabytes after a few minutes of images: its size is what was wanted
            remove_log(log_path)
        run.log("\n" + section["table"] + "\n\n" + section["verdict"])
    out["table"] = "\n\n".join(f"{s['model']} ({s['body']}):\n\n{s['table']}\n\n{s['verdict']}"
                               if "table" in s else f"{s['model']}: {s.get('error')}"
                               for s in out["models"])


def soak(server: Server, body: Body, log_path: Path, conc: int, seconds: float, every_s: float,
         log: Callable[[str], None]) -> dict:
    """Load ``server`` for ``seconds`` and sample it every ``every_s`` (the module doc)."""
    leader = server.proc.pid
    route = ROUTES[server.spec.task]
    done: dict = {}

    def load() -> None:
        try:
            done["wrk"] = run_wrk(server.classify_url, body, conc, seconds, True)[0]
        except Exception as exc:  # noqa: BLE001 - reported with the samples
            done["error"] = exc

    samples = [sample(server, route, log_path, 0.0)]
    loader = threading.Thread(target=load, daemon=True)
    started = time.monotonic()
    loader.start()
    while loader.is_alive():
        loader.join(timeout=every_s)
        samples.append(sample(server, route, log_path, time.monotonic() - started))
        log(f"  {samples[-1].t_s:5.0f} s  {samples[-1].answered:>9,} answered  RSS "
            + " / ".join(f"{p.rss_mb:.0f}" for p in samples[-1].procs.values()) + " MB")
    if "error" in done:
        raise done["error"]
    wrk = done["wrk"]
    roles = process_roles(samples, leader)
    return {"samples": [_sample_dict(s) for s in samples], "roles": roles,
            "wrk": {"requests": wrk.requests, "req_per_s": round(wrk.ok_per_s, 1),
                    "p50_ms": wrk.p("50"), "p99_ms": wrk.p("99"), "errors": wrk.errors},
            "table": soak_table(samples, roles),
            "verdict": soak_verdict(samples, roles, wrk.errors)}


def sample(server: Server, route: str, log_path: Path, t_s: float) -> Sample:
    answered = total(server.metrics(), REQUESTS, endpoint=route, http_response_code="200")
    procs = {}
    for pid in sorted(server.tree.refresh()):
        found = proc_sample(pid)
        if found is not None:
            procs[pid] = found
    return Sample(round(t_s, 1), int(answered), procs, log_size(log_path))


def proc_sample(pid: int) -> ProcSample | None:
    """RSS, open files (fds but sockets) and threads of ``pid`` from /proc; None where it is
    gone."""
    status = proc_status(pid)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    if status is None:
        return None
    files = 0
    for fd in fds:
        try:
            files += not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:  # closed meanwhile
            pass
    return ProcSample(round(rss_mb(status), 1), files, int(status.get("Threads", "0")))


def process_roles(samples: Sequence[Sample], leader: int) -> dict[int, str]:
    """A name per PID seen: the arbiter (the ``bentoml serve`` leader), then the workers in the
    order their PIDs first appear ("worker 1", ...)."""
    roles: dict[int, str] = {}
    for s in samples:
        for pid in s.procs:
            if pid not in roles:
                roles[pid] = "arbiter" if pid == leader else (
                    f"worker {sum(1 for r in roles.values() if r != 'arbiter') + 1}")
    return roles


def slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ys on xs; None with fewer than 3 points or no spread in xs."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def soak_table(samples: Sequence[Sample], roles: dict[int, str]) -> str:
    order = list(roles)
    rows = []
    for s in samples:
        cells = [s.procs.get(pid) for pid in order]
        rows.append([f"{s.t_s:.0f}", f"{s.answered:,}",
                     " / ".join("-" if c is None else f"{c.rss_mb:.0f}" for c in cells),
                     " / ".join("-" if c is None else str(c.files) for c in cells),
                     " / ".join("-" if c is None else str(c.threads) for c in cells),
                     f"{s.log_bytes / MB:.1f}"])
    who = " / ".join(roles[pid] for pid in order)
    return markdown_table([">s", ">answered", f"RSS MB ({who})", "open files", "threads",
                           ">log MB"], rows)


def soak_verdict(samples: Sequence[Sample], roles: dict[int, str], errors: int) -> str:
    """Per process: RSS at the start, once settled (after the first fifth of the run) and at the
    end, with its slope per 100,000 answers since it settled; open files and threads, settled
    and at the end; the log's bytes per answer; wrk's errors."""
    end = samples[-1]
    settled = [s for s in samples if s.t_s >= SETTLED_SHARE * end.t_s]
    parts = []
    for pid, role in roles.items():
        seen = [s for s in samples if pid in s.procs]
        calm = [s for s in settled if pid in s.procs] or seen[-1:]
        rate = slope([s.answered for s in calm], [s.procs[pid].rss_mb for s in calm])
        first, settle, last = seen[0].procs[pid], calm[0].procs[pid], seen[-1].procs[pid]
        parts.append(f"{role} (PID {pid}): RSS {first.rss_mb:.0f} MB at the start, "
                     f"{settle.rss_mb:.0f} after the first {SETTLED_SHARE:.0%}, {last.rss_mb:.0f} "
                     f"at the end: {fmt(None if rate is None else rate * 1e5, '+.2f')} MB per "
                     f"100k answers since; open files {settle.files} -> {last.files}, threads "
                     f"{settle.threads} -> {last.threads}"
                     + ("" if seen[-1] is end else " (gone before the end)"))
    answered = end.answered - samples[0].answered
    per_answer = (end.log_bytes - samples[0].log_bytes) / answered if answered else None
    parts.append(f"{answered:,} answers in {end.t_s:.0f} s, wrk errors {errors}; the prediction "
                 f"log grew {fmt(per_answer, ',.0f')} bytes an answer "
                 f"({end.log_bytes / MB:,.1f} MB, its inputs included)")
    return "\n".join(f"- {p}" for p in parts)


def _sample_dict(s: Sample) -> dict:
    return {"t_s": s.t_s, "answered": s.answered, "log_bytes": s.log_bytes,
            "procs": {str(pid): vars(p) for pid, p in s.procs.items()}}
