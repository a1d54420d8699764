"""The shell both training commands share: logging to the console and a file, run, summarise.

``python -m training`` (images) and ``python -m training.text`` differ in their config and their
``train_and_export``; how a run is logged, timed and reported, and which errors are a user's to
fix (a message and exit code 2, no traceback), is the same. Under ``torchrun`` (image command
only, see ``distributed``) every rank runs this; rank 0 logs, writes train.log and prints.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from . import distributed

log = logging.getLogger("training")


def setup_logging(output_dir: Path) -> None:
    """INFO lines to stderr and to ``output_dir/train.log``; on ranks other than 0, warnings and
    errors to stderr only (rank 0 speaks for the run, and owns train.log)."""
    if not distributed.is_main():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s [rank {distributed.rank()}] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.WARNING)
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stderr),
                    logging.FileHandler(output_dir / "train.log", mode="w")):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def run(cfg: Any, train_and_export: Callable[[Any], tuple[Any, Any]],
        summary: Callable[[Any, Any, float], str],
        user_errors: tuple[type[Exception], ...], distributed_ok: bool = False) -> int:
    """Train and export ``cfg``; print the summary. Returns the process exit code.

    ``distributed_ok``: the command's ``train_and_export`` exports on rank 0 only, so it may run
    under torchrun; a command that has not said so refuses to (N ranks would save N models)."""
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    if distributed.launched() and not distributed_ok:
        print("error: this command runs as a single process; start it with python -m, not "
              "torchrun", file=sys.stderr)
        return 2
    try:
        with distributed.session(cfg.device):
            return _run(cfg, train_and_export, summary, user_errors)
    except distributed.DistributedError as exc:  # e.g. NCCL asked for where there is no GPU
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(cfg: Any, train_and_export: Callable[[Any], tuple[Any, Any]],
         summary: Callable[[Any, Any, float], str],
         user_errors: tuple[type[Exception], ...]) -> int:
    setup_logging(cfg.output_dir)
    log.info("config %s", cfg.describe())
    start = time.perf_counter()
    try:
        result, tag = train_and_export(cfg)
    except user_errors as exc:  # a fixable problem: say what, no traceback
        log.error("error: %s", exc)
        return 2
    if distributed.is_main():
        print(summary(result, tag, time.perf_counter() - start))
    return 0
