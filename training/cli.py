"""The shell both training commands share: logging to the console and a file, run, summarise.

``python -m training`` (images) and ``python -m training.text`` differ in their config and their
``train_and_export``; how a run is logged, timed and reported, and which errors are a user's to
fix (a message and exit code 2, no traceback), is the same.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("training")


def setup_logging(output_dir: Path) -> None:
    """INFO lines to stderr and to ``output_dir/train.log``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stderr),
                    logging.FileHandler(output_dir / "train.log", mode="w")):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def run(cfg: Any, train_and_export: Callable[[Any], tuple[Any, Any]],
        summary: Callable[[Any, Any, float], str],
        user_errors: tuple[type[Exception], ...]) -> int:
    """Train and export ``cfg``; print the summary. Returns the process exit code."""
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    setup_logging(cfg.output_dir)
    log.info("config %s", cfg.describe())
    start = time.perf_counter()
    try:
        result, tag = train_and_export(cfg)
    except user_errors as exc:  # a fixable problem: say what, no traceback
        log.error("error: %s", exc)
        return 2
    print(summary(result, tag, time.perf_counter() - start))
    return 0
