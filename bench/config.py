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

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class BenchConfig:
    quick: bool
    duration_s: float  # measured wrk run per cell
    warmup_s: float  # wrk warm-up run before it
    concs: tuple[int, ...]
    floor_concs: tuple[int, ...]  # CLF_RUNTIME=noop cells; empty with --skip-floor
    workers: int
    port: int
    providers: str
    reference_model: str
    default_model: str  # "" skips the default-model section
    raw_batches: tuple[int, ...]
    raw_warmup_s: float
    raw_seconds: float
    retries: int  # re-measurements of a cell that others' CPU contaminated
    quiet_wait_s: float  # how long to wait for a quiet box before each measurement
    idle_s: float
    budget_s: float  # no more retries once the run is this old
    out_dir: Path
    service_settings: dict

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
    try:
        settings = Settings.from_env()
    except SettingsError as exc:  # the served cells would fail the same way: stop now, say why
        raise SystemExit(f"python -m bench: {exc}") from None
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the service like /work/shared/peers-bench: raw ORT ceiling, served "
                    "cells under wrk, the noop floor, the CPU breakdown, the default model.")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: 2 s cells, c=1,16, short raw cells (< 2 min)")
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
    p.add_argument("--providers", choices=("cpu", "cuda", "auto"), default=settings.providers,
                   help=f"ONNX Runtime providers, raw and served "
                        f"(configured: {settings.providers})")
    p.add_argument("--reference-model", default="bench-resnet",
                   help="model store name of the reference model (exported if absent)")
    p.add_argument("--default-model", default="digits-cnn:latest",
                   help="the trained default model's tag; skipped with a note if absent ('' skips)")
    p.add_argument("--raw-batches", type=_ints, help="raw ORT batch sizes (default 1,8,32,64)")
    p.add_argument("--raw-seconds", type=float, help="seconds per raw cell (default 4; quick 1)")
    p.add_argument("--retries", type=int, help="re-measurements of a contaminated cell (default 1)")
    p.add_argument("--quiet-wait", type=float, help="max wait for a quiet box, s (default 20)")
    p.add_argument("--budget", type=float, default=360.0,
                   help="no retries once the run is this many seconds old (default 360)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results folder ({RESULTS_DIR})")
    a = p.parse_args(argv)
    if a.workers < 1:
        p.error("--workers must be >= 1")
    q = a.quick
    concs = a.conc or ((1, 16) if q else (1, 16, 64))
    return BenchConfig(
        quick=q, duration_s=a.duration or (2.0 if q else 20.0),
        warmup_s=a.warmup or (1.0 if q else 5.0),
        concs=concs, floor_concs=() if a.skip_floor else ((max(concs),) if q else concs),
        workers=a.workers, port=a.port, providers=a.providers, reference_model=a.reference_model,
        default_model=a.default_model,
        raw_batches=a.raw_batches or ((1, 64) if q else (1, 8, 32, 64)),
        raw_warmup_s=0.5 if q else 1.0, raw_seconds=a.raw_seconds or (1.0 if q else 4.0),
        retries=a.retries if a.retries is not None else (0 if q else 1),
        quiet_wait_s=a.quiet_wait if a.quiet_wait is not None else (5.0 if q else 20.0),
        idle_s=1.0 if q else 2.0, budget_s=a.budget, out_dir=a.out,
        service_settings=settings.to_dict(),
    )


def command_line() -> str:
    """The exact command, with the environment that changes what it measures."""
    keep = sorted(k for k in os.environ if k.startswith("CLF_") or k in ("BENTOML_HOME",))
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in keep)
    cmd = f"{shlex.quote(sys.executable)} -m bench {shlex.join(sys.argv[1:])}".rstrip()
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
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{'+dirty' if dirty else ''}" if head else None
