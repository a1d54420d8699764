"""The bench's sections: each measures one thing, prints its table and returns its record."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from preprocessing import preprocess_image_bytes
from service.artifact import Artifact

from .bodies import Body, digit_png, noise_png, write_image_body
from .cells import CellPlan, bench_served
from .config import BenchConfig
from .cpu import least_contaminated
from .raw import RAW_CONFIGS, RawConfig, bench_config, expected_probabilities
from .report import raw_table
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


def served_section(run: Run, artifact: Artifact, body: Body, runtime: str, concs: Sequence[int],
                   tag: str) -> dict:
    """One server (CLF_RUNTIME=runtime) measured at each concurrency; stopped however it ends."""
    cfg = run.cfg
    spec = ServerSpec(model_tag=f"{artifact.name}:{artifact.version}", runtime=runtime,
                      workers=cfg.workers, providers=cfg.providers, port=cfg.port,
                      log_path=run.work_dir / f"server-{tag}.log")
    expected = expected_answer(run, artifact, body, runtime)
    run.log(f"  [{tag}] body: {body.description}")
    return bench_served(spec, body, expected, list(concs), run.plan(), run.log, tag)
