"""``python -m monitoring {drift,slices,exporter,prune,migrate}``: the monitoring jobs.

``--log`` is the prediction log: a SQLite file or a ``postgresql://`` URL.

``drift`` and ``slices`` also estimate the window's accuracy without labels (confidence
calibrated on the reference profile, ``performance.py``), next to the realised accuracy of the
rows that have feedback.

Exit codes of ``drift``: 0 = the window did not drift, 1 = it drifted, 2 = the report could not
be made (bad arguments, no logged rows in the window, no such model or reference profile).
``slices``, ``exporter``, ``prune`` and ``migrate`` exit 0 on success and 2 on error.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from .timeparse import parse_time

EXIT_OK, EXIT_DRIFT, EXIT_ERROR = 0, 1, 2


class CommandError(RuntimeError):
    """A failure the user can act on; printed without a traceback, exit code 2."""


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m monitoring", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    drift = sub.add_parser("drift", help="drift of a logged window against the reference profile")
    _window_args(drift)
    drift.add_argument("--out", default="artifacts/drift", help="folder for drift.html/drift.json")
    drift.add_argument("--store", help="BENTOML_HOME of the model store (default: environment)")
    drift.add_argument("--reference", help="a model version folder, instead of the model store")
    drift.add_argument("--state", help="latest-scores file (default: drift_latest.json next to "
                                       "the log)")
    drift.add_argument("--alpha", type=float, default=0.05,
                       help="family-wise false-alarm rate of the p-value tests (default 0.05)")
    drift.add_argument("--min-share", type=float, default=0.0,
                       help="share of columns that must drift (default 0: any one)")
    drift.add_argument("--max-rows", type=int, default=20_000,
                       help="subsample the window to this many rows for the tests")
    slices = sub.add_parser("slices", help="per-slice accuracy, F1, calibration, confidence, OOD")
    _window_args(slices)
    slices.add_argument("--margin", type=float, default=0.05)
    slices.add_argument("--min-count", type=int, default=30)
    slices.add_argument("--low-confidence", type=float, default=0.5,
                        help="answers below this confidence count as low-confidence")
    slices.add_argument("--json", help="also write the table as JSON here")
    slices.add_argument("--max-rows", type=int, default=200_000,
                        help="read at most about this many rows of the window (a uniform sample "
                             "chosen in SQL), so memory stays bounded on any log")
    slices.add_argument("--store", help="BENTOML_HOME of the model store, for the reference "
                                        "profile the estimated accuracy is calibrated on")
    slices.add_argument("--reference", help="a model version folder, instead of the model store")
    exporter = sub.add_parser("exporter", help="serve the latest drift scores to Prometheus")
    exporter.add_argument("--state", help="latest-scores file (or give --log)")
    exporter.add_argument("--log", help="prediction log whose drift_latest.json to serve")
    exporter.add_argument("--port", type=int, default=9108)
    exporter.add_argument("--host", default="127.0.0.1")
    exporter.add_argument("--model", action="append", default=[], dest="models",
                          help="a model to expose at 0 until its first report (repeatable)")
    prune = sub.add_parser("prune", help="retention: delete old predictions, or just their inputs")
    prune.add_argument("--log", required=True,
                       help="the prediction log (SQLite file or postgresql:// URL)")
    prune.add_argument("--older-than", required=True, type=parse_time, dest="before",
                       help="a duration (30d, 12h) or an ISO 8601 time: rows logged before it")
    prune.add_argument("--inputs-only", action="store_true",
                       help="keep the rows (reports, feedback) and drop only their raw inputs")
    prune.add_argument("--vacuum", action="store_true",
                       help="then give the space back (SQLite rewrites the file: run off-peak)")
    migrate = sub.add_parser("migrate", help="copy a SQLite prediction log into PostgreSQL "
                                             "(resumable: run it again after an interruption)")
    migrate.add_argument("--from", required=True, dest="source", help="the SQLite log file")
    migrate.add_argument("--to", required=True, help="a postgresql:// URL")
    migrate.add_argument("--batch", type=int, default=5000, help="rows per transaction")
    return parser


def _window_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name as logged (e.g. digits-cnn)")
    p.add_argument("--version", help="model version (default: the one with most rows logged)")
    p.add_argument("--log", required=True,
                   help="the prediction log (SQLite file or postgresql:// URL)")
    p.add_argument("--since", type=parse_time, default="24h",
                   help="ISO 8601, or a duration before now: 90m, 24h (default), 7d")
    p.add_argument("--until", type=parse_time, default="now", help="ISO 8601 or now (default)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"drift": run_drift, "slices": run_slices, "exporter": run_exporter,
                "prune": run_prune, "migrate": run_migrate}
    try:
        return commands[args.command](args)
    except (CommandError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _open(target: str) -> Any:
    """The prediction log at a path or URL; a missing SQLite file is an error, not a new log."""
    from .store import LogOpenError, is_postgres, open_log

    if not is_postgres(target) and not Path(target).exists():
        raise CommandError(f"no prediction log at {target}")
    try:
        return open_log(target)
    except LogOpenError as exc:
        raise CommandError(str(exc)) from None


def run_prune(args: argparse.Namespace) -> int:
    with _open(args.log) as log:
        n = log.prune(args.before, inputs_only=args.inputs_only)
        what = "raw inputs dropped from" if args.inputs_only else "predictions deleted:"
        print(f"{what} {n} rows logged before {_iso(args.before)}")
        if args.vacuum:
            log.vacuum()
            if log.backend == "sqlite":
                print(f"vacuumed: {Path(args.log).stat().st_size / 1e6:.1f} MB")
            else:
                print("vacuumed")
    return EXIT_OK


def run_migrate(args: argparse.Namespace) -> int:
    from .migrate import MigrationError, migrate

    try:
        report = migrate(args.source, args.to, batch=args.batch,
                         progress=lambda line: print(line, file=sys.stderr))
    except MigrationError as exc:
        raise CommandError(str(exc)) from None
    print(report)
    return EXIT_OK


def _open_window(args: argparse.Namespace, embeddings: bool = True) -> tuple[Any, str]:
    """The window's rows as a frame, read in bounded memory: past ``--max-rows`` a uniform
    sample chosen in SQL (``frame.attrs``: ``rows_in_window``, ``sampled``)."""
    log = _open(args.log)
    try:
        versions = log.versions(args.model, args.since, args.until)
        if not versions:
            raise CommandError(f"no predictions of model {args.model!r} logged between "
                               f"{_iso(args.since)} and {_iso(args.until)} in {log.target}")
        version = args.version or versions[0][0]
        if version not in dict(versions):
            raise CommandError(f"version {version!r} has no rows in the window; logged: "
                               f"{versions}")
        frame = log.frame(args.model, args.since, args.until, version=version,
                          max_rows=args.max_rows, embeddings=embeddings)
    finally:
        log.close()
    if frame.attrs.get("sampled"):
        print(f"window: {frame.attrs['rows_in_window']} rows; read a uniform sample of "
              f"{len(frame)} (--max-rows {args.max_rows})", file=sys.stderr)
    return frame, version


def _reference_folder(args: argparse.Namespace, version: str) -> Path:
    if args.reference:
        return Path(args.reference)
    if args.store:
        os.environ["BENTOML_HOME"] = str(Path(args.store).resolve())  # read at bentoml's import
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    from modelstore.registry import RegistryError, version_path

    try:
        return version_path(f"{args.model}:{version}")
    except RegistryError:
        raise CommandError(f"model {args.model}:{version} is not in the model store; pass "
                           "--store BENTOML_HOME or --reference VERSION_FOLDER") from None


def run_drift(args: argparse.Namespace) -> int:
    from .drift import DriftConfig, drift_report, format_table, save_report
    from .exporter import state_path_for, write_state
    from .frames import reference_frame
    from .performance import format_estimate, window_performance
    from .reference import load_reference

    config = DriftConfig(alpha=args.alpha, min_share=args.min_share, max_rows=args.max_rows)
    current, version = _open_window(args)
    reference = load_reference(_reference_folder(args, version))
    print(f"drift: model {args.model}:{version}, window {_iso(args.since)} .. {_iso(args.until)}, "
          f"{len(current)} rows; {config}", file=sys.stderr)
    result = drift_report(reference_frame(reference), current, reference.feature_names, config)
    estimated = window_performance(reference, current)  # None: the reference has no labels
    meta = {"model": args.model, "version": version, "since": _iso(args.since),
            "until": _iso(args.until), "created": time.time(), "estimated_accuracy": estimated}
    paths = save_report(result, args.out, meta)
    entry = {**meta, **{k: v for k, v in result.to_dict().items() if k != "config"}}
    write_state(args.state or state_path_for(args.log), args.model, entry)
    print(format_table(result))
    print(format_estimate(estimated) if estimated else
          "estimated accuracy: not available (the reference profile has no labels)")
    print(f"wrote {paths['html']} and {paths['json']}")
    return EXIT_DRIFT if result.dataset_drift else EXIT_OK


def run_slices(args: argparse.Namespace) -> int:
    from .performance import calibrate_reference, correct_column, foreign_prior
    from .reference import load_reference
    from .slice_metrics import (add_derived_slices, class_metrics, format_class_table,
                                format_table, slice_metrics, to_records)

    frame, version = _open_window(args, embeddings=False)
    prior = None
    try:  # the estimated accuracy needs the reference profile; the rest of the report does not
        reference = load_reference(_reference_folder(args, version))
        calibrator = calibrate_reference(reference)
        prior = foreign_prior(reference) if "ood" in frame.columns else None
    except (CommandError, FileNotFoundError) as exc:
        calibrator = None
        print(f"no estimated accuracy: {exc}", file=sys.stderr)
    if calibrator is not None:
        calibrated = calibrator(frame["confidence"].to_numpy())
        if prior is not None:  # OOD-flagged rows beyond the reference rate: at chance, or as
            # the window's feedback on them says, by its flagged share (performance.py, 3 and 4)
            flags = frame["ood"].to_numpy(bool)
            prior = prior.learn(calibrated, flags, correct_column(
                frame["predicted"].to_numpy(object), frame["label"].to_numpy(object)))
            calibrated = prior.adjust(calibrated, flags)
        frame = frame.assign(calibrated=calibrated)
        print(f"estimated accuracy (est): {calibrator.describe()}", file=sys.stderr)
    frame, derived = add_derived_slices(frame)
    columns = sorted(c for c in frame.columns if c.startswith("tag.")) + derived
    print(f"slices: model {args.model}:{version}, window {_iso(args.since)} .. "
          f"{_iso(args.until)}, {len(frame)} rows ({int(frame['label'].notna().sum())} labelled); "
          f"slices {columns}; margin {args.margin}, min count {args.min_count}", file=sys.stderr)
    table = slice_metrics(frame, columns, args.margin, args.min_count, args.low_confidence)
    print(format_table(table))
    flagged = table[table["flagged"]]
    print(f"{len(flagged)} of {len(table) - 1} slice values flagged")
    classes = class_metrics(frame, args.margin, args.min_count)
    print("per class (labelled rows; ! = recall below the window's accuracy by the margin):")
    print(format_class_table(classes))
    if args.json:
        doc = {"model": args.model, "version": version, "since": _iso(args.since),
               "until": _iso(args.until), "margin": args.margin, "min_count": args.min_count,
               "low_confidence": args.low_confidence, "rows": to_records(table),
               "per_class": to_records(classes),
               "calibration": calibrator.to_dict() if calibrator is not None else None}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return EXIT_OK


def run_exporter(args: argparse.Namespace) -> int:
    from .exporter import serve, state_path_for

    if not (args.state or args.log):
        raise CommandError("give --state FILE or --log LOG (its drift_latest.json is served)")
    path = Path(args.state) if args.state else state_path_for(args.log)
    server = serve(path, args.port, args.host, args.models)
    from .store import display_target

    print(f"serving {display_target(str(path))} on http://{args.host}:{args.port}/metrics",
          file=sys.stderr, flush=True)
    stop = {"now": False}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.update(now=True))
    while not stop["now"]:
        time.sleep(0.2)
    server.shutdown()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
