"""The command line of ``python -m training.retrain`` (see the package docstring): flags, the
log handler, the exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Sequence

from ..data import DataError
from ..export import ExportError
from .champion import RetrainError
from .config import DEFAULT_AUDIT, RetrainConfig
from .data import DEFAULT_LOG
from .pipeline import run
from .promote import PROMOTED, SKIPPED, WOULD_PROMOTE

EXIT_PROMOTED, EXIT_REFUSED, EXIT_KEPT_OUT, EXIT_SKIPPED = 0, 2, 3, 4

log = logging.getLogger("training.retrain")


def build_parser() -> argparse.ArgumentParser:
    from monitoring.timeparse import parse_time

    p = argparse.ArgumentParser(prog="python -m training.retrain",
                                description=sys.modules[__package__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model name; its production version is the "
                                                  "champion")
    p.add_argument("--log", default=None,
                   help=f"prediction log with labelled traffic (default {DEFAULT_LOG} if it "
                        "exists; a path given must exist)")
    p.add_argument("--new-data", default=None,
                   help="images: a folder with one sub-folder per class; texts: a "
                        ".csv/.tsv/.jsonl file (the champion's text/label columns)")
    p.add_argument("--since", type=parse_time, default=None,
                   help="traffic from (ISO 8601, or 7d, 24h before now; default: all)")
    p.add_argument("--until", type=parse_time, default=None, help="traffic until (default: now)")
    held = p.add_mutually_exclusive_group()
    held.add_argument("--holdout-newest", type=float, default=0.2,
                      help="the newest share of the labelled traffic (by logged time) is held out "
                           "for evaluation; training takes only older rows whose label was "
                           "stored by the cutoff (default 0.2)")
    held.add_argument("--cutoff", type=parse_time, default=None,
                      help="instead: hold out the traffic logged after this time (ISO 8601, or "
                           "24h, 7d before now); training takes rows logged, and labels stored, "
                           "at or before it")
    p.add_argument("--margin", type=float, default=0.0,
                   help="the challenger's accuracy must be >= the champion's + this")
    p.add_argument("--max-slice-drop", type=float, default=0.05,
                   help="the most accuracy any judged slice may lose")
    p.add_argument("--min-slice-count", type=int, default=30,
                   help="held-out inputs a slice needs to be judged (and attacked inputs an "
                        "attack success rate needs)")
    p.add_argument("--max-robustness-drop", type=float, default=0.02,
                   help="the most accuracy the challenger may trail the champion by on any "
                        "variation of the held-out inputs' robustness suite (resampled, "
                        "JPEG, rotated, ...; default 0.02)")
    p.add_argument("--max-attack-increase", type=float, default=0.05,
                   help="the most the adversarial attack success rate may rise over the "
                        "champion's, both over the champion's test inputs (default 0.05; skipped "
                        "where a version has no figure, or one over fewer attacked inputs "
                        "than --min-slice-count)")
    p.add_argument("--only-if-drifted", action="store_true",
                   help="skip (exit 4) unless the latest drift report on the production "
                        "version found drift")
    p.add_argument("--drift-state", default=None,
                   help="drift_latest.json to read (default: beside the log)")
    p.add_argument("--audit", default=DEFAULT_AUDIT, help="JSON-lines file the record goes to")
    p.add_argument("--epochs", type=int, default=None, help="default: the champion's recipe")
    p.add_argument("--seed", type=int, default=None,
                   help="training seed (default: the champion's); the original data's split "
                        "keeps the champion's")
    p.add_argument("--store", default=None,
                   help="a BentoML models folder (default: $BENTOML_HOME/models)")
    p.add_argument("--dry-run", action="store_true",
                   help="train, evaluate and decide, but write nothing (no version, no "
                        "promotion, no audit line)")
    return p


def config_from_args(argv: Sequence[str] | None = None) -> RetrainConfig:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    args["since"] = 0.0 if args["since"] is None else args["since"]
    args["until"] = math.inf if args["until"] is None else args["until"]
    try:
        return RetrainConfig(**args)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def exit_code(decision: str) -> int:
    return {PROMOTED: EXIT_PROMOTED, WOULD_PROMOTE: EXIT_PROMOTED,
            SKIPPED: EXIT_SKIPPED}.get(decision, EXIT_KEPT_OUT)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (see the package docstring)."""
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    cfg = config_from_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    training_log = logging.getLogger("training")
    training_log.addHandler(handler)
    level = training_log.level
    training_log.setLevel(logging.INFO)
    try:
        log.info("retrain config %s", json.dumps(cfg.describe(), default=str))
        record = run(cfg)
    except (RetrainError, DataError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        training_log.removeHandler(handler)
        training_log.setLevel(level)
    print(record.to_json())
    return exit_code(record.decision)
