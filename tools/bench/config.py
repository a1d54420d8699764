"""The bench's one config object (from the command line and the service's CLF_* settings) and the
facts about the machine it ran on, both saved with the results."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from service.settings import Settings, SettingsError

# The repository root (tools/bench/config.py -> ../..) and the default results folder in it:
# both derived from this file, never a machine path.
REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
TASKS = ("image", "text", "overload")
LOG_CONCS = (16, 64)  # where the prediction log's cost is measured (the loaded cells)
BUDGET_PER_TASK_S = 420.0


@dataclass(frozen=True)
class BenchConfig:
    quick: bool
    tasks: tuple[str, ...]  # "image", "text", "overload" or all three
    duration_s: float  # measured wrk run per cell
    warmup_s: float  # wrk warm-up run before it
    concs: tuple[int, ...]
    floor_concs: tuple[int, ...]  # CLF_RUNTIME=noop cells; empty with --skip-floor
    log_concs: tuple[int, ...]  # CLF_PREDICTION_LOG on cells; empty with --skip-log
    workers: int
    port: int
    providers: str
    reference_model: str
    default_model: str  # "" skips the default-model section
    text_model: str  # model store name of the text model (trained if absent)
    text_bodies: int  # texts in the rotating mix
    text_short_share: float
    overload_conns: int  # the overload cell (overload.py): wrk connections
    overload_duration_s: float
    overload_normal_conc: int  # its before and after phases
    overload_normal_s: float
    overload_wire: str  # "v1" (multipart PNG) or "v2" (the PNG as a v2 BYTES tensor)
    raw_batches: tuple[int, ...]
    raw_warmup_s: float
    raw_seconds: float
    retries: int  # re-measurements of a cell that others' CPU contaminated
    quiet_wait_s: float  # how long to wait for a quiet box before each measurement
    idle_s: float
    budget_s: float  # no more retries once the run is this old
    out_dir: Path
    service_settings: dict
    scaling_workers: tuple[int, ...] = (1, 2, 4)  # --task scaling: CLF_WORKERS per row
    peers_runs: int = 3  # the peers section (--peers): whole runs, servers interleaved
    peers_dir: Path | None = None  # the peers' harness (default ../shared/peers-bench)
    peers_root: Path | None = None  # its $PEERS_ROOT (venvs, model, bodies; default /tmp/peers)
    soak_seconds: float = 300.0  # --task soak: the load per model (soak.py)
    soak_conc: int = 16
    soak_every_s: float = 15.0  # between samples

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,16,64, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_config(argv: Sequence[str] | None = None) -> BenchConfig:
    """Options over the service's configured CLF_* settings (which are validated on the way)."""
    service_env = {k: v for k, v in os.environ.items() if not k.startswith("CLF_BENCH_")}
    try:
        settings = Settings.from_env(service_env)
    except SettingsError as exc:  # the served cells would fail the same way: stop now, say why
        raise SystemExit(f"python -m tools.bench: {exc}") from None
    p = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description="Benchmark the service like the peers' benchmark (peers-bench): raw ORT "
                    "ceiling, served cells under wrk, the noop floor, the CPU breakdown, the "
                    "default model.")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: 2 s cells, c=1,16, short raw cells (< 2 min per task)")
    p.add_argument("--task", choices=(*TASKS, "peers", "scaling", "soak", "all"), default="all",
                   help="what to benchmark: the image reference model, the text model, the "
                        "overload cell (1,000 connections on the image model), all three "
                        "(default all), only the peers section (see --peers), the scaling "
                        "table (1, 2 and 4 workers; --scaling-workers), or the soak cell "
                        "(memory, fds and threads over a long run with the log on; --soak-*)")
    p.add_argument("--soak-seconds", type=float,
                   help="--task soak: seconds of load per model (default 300; quick 20)")
    p.add_argument("--soak-conc", type=int, default=16,
                   help="--task soak: wrk connections (default 16)")
    p.add_argument("--scaling-workers", type=_ints, default=(1, 2, 4),
                   help="CLF_WORKERS of each scaling row (default 1,2,4)")
    p.add_argument("--peers", action="store_true",
                   help="add the peers section: the peers benchmark's ONNX file served by Triton "
                        "(PyTriton) and by this service, same wrk and cells, one table; needs "
                        "`bash ../shared/peers-bench/setup.sh` first")
    p.add_argument("--peers-runs", type=int,
                   help="whole runs of the peers section, reported min-max (default 3; quick 1)")
    p.add_argument("--peers-dir", type=Path,
                   help="the peers' harness folder (default ../shared/peers-bench)")
    p.add_argument("--peers-root", type=Path,
                   help="its PEERS_ROOT: venvs, model, bodies (default $PEERS_ROOT or /tmp/peers)")
    p.add_argument("--duration", type=float,
                   help="seconds per measured wrk run (default 20; quick 2)")
    p.add_argument("--warmup", type=float,
                   help="seconds of wrk warm-up per cell (default 5; quick 1)")
    p.add_argument("--conc", type=_ints,
                   help="wrk connections per cell (default 1,16,64; quick 1,16)")
    p.add_argument("--workers", type=int, default=settings.workers,
                   help=f"CLF_WORKERS for the served cells (configured: {settings.workers})")
    p.add_argument("--port", type=int, default=3390, help="port on 127.0.0.1 (default 3390)")
    p.add_argument("--skip-floor", action="store_true", help="skip the CLF_RUNTIME=noop cells")
    p.add_argument("--skip-log", action="store_true",
                   help="skip the prediction-log-on cells (CLF_PREDICTION_LOG in a temp folder)")
    p.add_argument("--providers", choices=("cpu", "cuda", "auto"), default=settings.providers,
                   help=f"ONNX Runtime providers, raw and served "
                        f"(configured: {settings.providers})")
    p.add_argument("--reference-model", default="bench-resnet",
                   help="model store name of the reference model (exported if absent)")
    p.add_argument("--default-model", default="digits-cnn:latest",
                   help="the trained default model's tag; skipped with a note if absent ('' skips)")
    p.add_argument("--text-model", default="bench-lang-transformer",
                   help="model store name of the text model; trained if absent (python -m "
                        "training.text --model transformer, ~1 min)")
    p.add_argument("--text-bodies", type=int, default=512,
                   help="texts in the rotating length mix (default 512)")
    p.add_argument("--short-share", type=float, default=0.8,
                   help="share of short texts in the mix (default 0.8; the rest are long)")
    p.add_argument("--overload-conns", type=int, default=1000,
                   help="connections of the overload cell (default 1000)")
    p.add_argument("--overload-duration", type=float,
                   help="seconds of the overload cell's overload phase (default 30; quick 5)")
    p.add_argument("--overload-normal-conc", type=int, default=64,
                   help="connections of its normal-load phases before and after (default 64)")
    p.add_argument("--overload-wire", choices=("v1", "v2"), default="v1",
                   help="what the overload cell posts: the PNG as a /v1 multipart upload "
                        "(default) or as a v2 BYTES tensor to the v2 infer route")
    p.add_argument("--raw-batches", type=_ints, help="raw ORT batch sizes (default 1,8,32,64)")
    p.add_argument("--raw-seconds", type=float, help="seconds per raw cell (default 4; quick 1)")
    p.add_argument("--retries", type=int, help="re-measurements of a contaminated cell (default 1)")
    p.add_argument("--quiet-wait", type=float, help="max wait for a quiet box, s (default 20)")
    p.add_argument("--budget", type=float,
                   help=f"no retries once the run is this many seconds old (default "
                        f"{BUDGET_PER_TASK_S:g} per task)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results folder (default {RESULTS_DIR.relative_to(REPO_ROOT)})")
    a = p.parse_args(argv)
    if a.workers < 1:
        p.error("--workers must be >= 1")
    if a.overload_conns < 1 or a.overload_normal_conc < 1:
        p.error("--overload-conns and --overload-normal-conc must be >= 1")
    if a.text_bodies < 2 or not 0.0 <= a.short_share <= 1.0:
        p.error("--text-bodies must be >= 2 and --short-share in [0, 1]")
    q = a.quick
    concs = a.conc or ((1, 16) if q else (1, 16, 64))
    tasks = TASKS if a.task == "all" else (a.task,)
    if a.peers and "peers" not in tasks:
        tasks = (*tasks, "peers")
    if a.peers_runs is not None and a.peers_runs < 1:
        p.error("--peers-runs must be >= 1")
    if a.soak_conc < 1 or (a.soak_seconds is not None and a.soak_seconds <= 0):
        p.error("--soak-conc must be >= 1 and --soak-seconds > 0")
    log_concs = tuple(c for c in concs if c in LOG_CONCS) or (max(concs),)
    return BenchConfig(
        quick=q, tasks=tasks, duration_s=a.duration or (2.0 if q else 20.0),
        warmup_s=a.warmup or (1.0 if q else 5.0),
        concs=concs, floor_concs=() if a.skip_floor else ((max(concs),) if q else concs),
        log_concs=() if a.skip_log else log_concs,
        workers=a.workers, port=a.port, providers=a.providers, reference_model=a.reference_model,
        default_model=a.default_model, text_model=a.text_model, text_bodies=a.text_bodies,
        text_short_share=a.short_share,
        overload_conns=a.overload_conns,
        overload_duration_s=a.overload_duration or (5.0 if q else 30.0),
        overload_normal_conc=a.overload_normal_conc, overload_normal_s=2.0 if q else 5.0,
        overload_wire=a.overload_wire,
        raw_batches=a.raw_batches or ((1, 64) if q else (1, 8, 32, 64)),
        raw_warmup_s=0.5 if q else 1.0, raw_seconds=a.raw_seconds or (1.0 if q else 4.0),
        retries=a.retries if a.retries is not None else (0 if q else 1),
        quiet_wait_s=a.quiet_wait if a.quiet_wait is not None else (5.0 if q else 20.0),
        idle_s=1.0 if q else 2.0,
        # the overload cell re-measures nothing: the budget is the measured tasks'
        budget_s=a.budget if a.budget is not None else BUDGET_PER_TASK_S * max(
            1, len([t for t in tasks if t != "overload"])) + (
            BUDGET_PER_TASK_S * (a.peers_runs or 3) if "peers" in tasks else 0),
        out_dir=a.out,
        service_settings=settings.to_dict(),
        scaling_workers=a.scaling_workers,
        peers_runs=a.peers_runs or (1 if q else 3), peers_dir=a.peers_dir,
        peers_root=a.peers_root,
        soak_seconds=a.soak_seconds or (20.0 if q else 300.0), soak_conc=a.soak_conc,
        soak_every_s=4.0 if q else 15.0,
    )


def command_line() -> str:
    """The exact command, with the environment that changes what it measures."""
    keep = sorted(k for k in os.environ if k.startswith("CLF_") or k in ("BENTOML_HOME",))
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in keep)
    cmd = f"{shlex.quote(sys.executable)} -m tools.bench {shlex.join(sys.argv[1:])}".rstrip()
    return f"{env} {cmd}".strip()


def machine_info() -> dict:
    import bentoml
    import onnxruntime as ort

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "cpu_model": model,
        "kernel": platform.release(), "python": platform.python_version(),
        "onnxruntime": ort.__version__, "ort_providers_available": ort.get_available_providers(),
        "bentoml": bentoml.__version__, "git": _git_revision(),
    }


def _git_revision() -> str | None:
    root = REPO_ROOT
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{'+dirty' if dirty else ''}" if head else None
