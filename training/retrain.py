"""``python -m training.retrain``: train a challenger on what production taught us, and promote it
only if it is better on data neither model trained on.

    python -m training.retrain --model digits-cnn [--log artifacts/predictions.db]
        [--new-data PATH] [--since 7d] [--until now] [--margin 0.0] [--max-slice-drop 0.05]
        [--min-slice-count 30] [--only-if-drifted [--drift-state FILE]]
        [--audit artifacts/retrain/audit.jsonl] [--epochs N] [--seed S] [--store DIR] [--dry-run]

Steps (``run``); only steps 5 and 7 touch the store, and nothing at all is written before step 5
(but for the audit line of a skipped run):
  1. the champion: the production version of ``--model`` (``service.registry.resolve``);
  2. with ``--only-if-drifted``: the latest drift report (``drift_latest.json`` beside the log,
     written by ``python -m monitoring drift``) must be about the champion's version and say
     the data drifted; otherwise the run is skipped (exit 4). A report on an older version does
     not count, so a promotion is not followed by another retraining on the same report;
  3. the data (``retrain_data``): the champion's original data split as its training run split
     it, the labelled traffic of the log and ``--new-data``, the last two assigned to
     train/val/test by hash with the recipe's fractions. Every refusal happens here;
  4. the challenger (``retrain_fit``): the champion's recipe and preprocessing, trained on the
     train parts with early stopping on the val parts;
  5. it is exported into the store as a new, non-production version (``--dry-run``: into a
     throwaway store). A name without a production pointer is first pinned to the champion,
     or the challenger, as the name's first pointer, would become production on export;
  6. champion and challenger are evaluated by ONNX Runtime on the same held-out inputs, the
     test parts of all three sources (``retrain_eval``), overall and per slice;
  7. ``decide``: promote iff the challenger's accuracy >= the champion's + ``--margin`` and no
     slice with >= ``--min-slice-count`` held-out inputs loses more than ``--max-slice-drop``.
     Promotion is ``service.registry.promote`` (one atomic pointer swap), and only if
     production is still the champion evaluated (two retrainings at once: the second loses);
  8. one JSON line is appended to ``--audit`` and printed on stdout: decision, reasons, both
     versions, the comparison table, data hash and counts per source/part, rules, drift report,
     timings, library versions. A challenger kept out stays in the store, not production.

A run killed before step 7 leaves production as it was: the pointer changes only there, by one
atomic replace. Killed during training, it leaves nothing; killed later, it may leave the
challenger in the store (during bentoml's copy into place, an incomplete folder), never
production, and no audit line. Killed after step 7, the promotion stands without its audit line
(the registry's own ``production.log.jsonl`` has the change).

Exit codes: 0 = challenger promoted (dry run: would be); 3 = kept out (lost, or production
changed meanwhile); 4 = skipped (``--only-if-drifted`` and no drift on the production version);
2 = refused: bad arguments or input (missing model, no such log, empty or unreadable data,
labels the model does not know), with a one-line message and nothing written; 1 = a crash.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .data import DataError
from .export import ExportError, git_commit, library_versions
from .retrain_data import Champion, RetrainData, RetrainError, build_data, load_champion
from .retrain_eval import Rules, accuracy_table, compare, decide, predict, row_slices

if TYPE_CHECKING:
    from bentoml._internal.models.model import ModelStore

EXIT_PROMOTED, EXIT_REFUSED, EXIT_KEPT_OUT, EXIT_SKIPPED = 0, 2, 3, 4
DEFAULT_LOG = "artifacts/predictions.db"
DEFAULT_AUDIT = "artifacts/retrain/audit.jsonl"

log = logging.getLogger("training.retrain")


@dataclass(frozen=True)
class RetrainConfig:
    """One retraining run, from the command line; printed at start, saved in the audit line."""

    model: str
    log: str | None = None  # None: DEFAULT_LOG if it exists, else no traffic
    new_data: str | None = None
    since: float = 0.0
    until: float = math.inf
    margin: float = 0.0
    max_slice_drop: float = 0.05
    min_slice_count: int = 30
    only_if_drifted: bool = False
    drift_state: str | None = None
    audit: str = DEFAULT_AUDIT
    epochs: int | None = None
    seed: int | None = None
    store: str | None = None  # a BentoML models folder, as service.registry's --store
    dry_run: bool = False

    def __post_init__(self) -> None:
        checks = [
            (bool(self.model) and ":" not in self.model,
             f"--model takes a model name (its production version is the champion), got "
             f"{self.model!r}"),
            (-1.0 <= self.margin <= 1.0, f"--margin must be in [-1, 1], got {self.margin}"),
            (0.0 <= self.max_slice_drop <= 1.0,
             f"--max-slice-drop must be in [0, 1], got {self.max_slice_drop}"),
            (self.min_slice_count >= 1, "--min-slice-count must be >= 1"),
            (self.epochs is None or self.epochs >= 1, "--epochs must be >= 1"),
            (self.seed is None or self.seed >= 0, "--seed must be >= 0"),
            (self.since < self.until, "--since must be before --until"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def rules(self) -> Rules:
        return Rules(self.margin, self.max_slice_drop, self.min_slice_count)

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        out["since"] = _iso(self.since) if self.since > 0 else None
        out["until"] = _iso(self.until) if math.isfinite(self.until) else None
        return out


def build_parser() -> argparse.ArgumentParser:
    from monitoring.timeparse import parse_time

    p = argparse.ArgumentParser(prog="python -m training.retrain", description=__doc__,
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
    p.add_argument("--margin", type=float, default=0.0,
                   help="the challenger's accuracy must be >= the champion's + this")
    p.add_argument("--max-slice-drop", type=float, default=0.05,
                   help="the most accuracy any judged slice may lose")
    p.add_argument("--min-slice-count", type=int, default=30,
                   help="held-out inputs a slice needs to be judged")
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


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (see the module docstring)."""
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
    print(json.dumps(record, default=str))
    return {"promoted": EXIT_PROMOTED, "would_promote": EXIT_PROMOTED,
            "skipped": EXIT_SKIPPED}.get(record["decision"], EXIT_KEPT_OUT)


def open_store(folder: str | None) -> "ModelStore":
    from bentoml._internal.models.model import ModelStore

    from service.registry import model_store

    if folder is None:
        return model_store(None)
    if not Path(folder).is_dir():
        raise RetrainError(f"--store {folder}: no such folder (give a BentoML models folder, "
                           "e.g. $BENTOML_HOME/models)")
    return ModelStore(folder)


def log_path_of(cfg: RetrainConfig) -> Path | None:
    """The log to read traffic from: the one given (which must exist), or the default if any."""
    if cfg.log is None:
        return Path(DEFAULT_LOG) if Path(DEFAULT_LOG).is_file() else None
    if not Path(cfg.log).is_file():
        raise RetrainError(f"--log {cfg.log}: no such prediction log")
    return Path(cfg.log)


def run(cfg: RetrainConfig) -> dict[str, Any]:
    """Steps 1-8 of the module docstring; returns the audit record (appended unless dry run).
    Raises RetrainError (and DataError/ExportError) for input it refuses, before any write."""
    timings: dict[str, float] = {}
    start = clock = time.perf_counter()
    store = open_store(cfg.store)
    champion = load_champion(cfg.model, store)
    log_path = log_path_of(cfg)
    new_data = None if cfg.new_data is None else Path(cfg.new_data)
    if new_data is not None and not new_data.exists():
        raise RetrainError(f"--new-data {new_data}: no such file or folder")
    record = _record(cfg, champion, log_path)
    if cfg.only_if_drifted:
        drifted, record["drift"], why = drift_gate(champion, cfg, log_path)
        log.info("drift gate: %s", why)
        if not drifted:
            return _finish(cfg, record, "skipped", [why], timings, start)

    data = build_data(champion, log_path, new_data, cfg.since, cfg.until)
    record["data"].update(hash=data.data_hash(), counts=data.counts(),
                          held_out=len(data.test))
    log.info("data: %s (held out: %d)", json.dumps(data.counts()), len(data.test))
    timings["data_s"], _ = _lap(clock)
    version, table = challenge(cfg, champion, store, data, log_path, record, timings)
    decision = decide(table, cfg.rules)
    reasons = list(decision.reasons)
    if cfg.dry_run:
        return _finish(cfg, record, "would_promote" if decision.promote else "would_keep_out",
                       reasons, timings, start)
    if decision.promote:
        promoted, why = _promote(champion, version, table, store)
        reasons.append(why)
    else:
        promoted = False
        reasons.append(f"kept out: {champion.name}:{version} stays in the store, not production;"
                       f" {champion.tag} serves on")
    record["challenger"]["production"] = promoted
    return _finish(cfg, record, "promoted" if promoted else "kept_out", reasons, timings, start)


def challenge(cfg: RetrainConfig, champion: Champion, store: "ModelStore", data: RetrainData,
              log_path: Path | None, record: dict[str, Any], timings: dict[str, float]
              ) -> tuple[str, dict[str, Any]]:
    """Steps 4-6: train, export and evaluate the challenger; returns its version and the
    comparison table (both also go into ``record``)."""
    from .retrain_fit import challenger_recipe, export_challenger, train_challenger

    clock = time.perf_counter()
    recipe = challenger_recipe(champion, cfg.epochs, cfg.seed)
    record["recipe"] = {"epochs": recipe.epochs, "seed": recipe.seed,
                        "split_seed": champion.split_seed()}
    with tempfile.TemporaryDirectory(prefix="retrain-") as tmp:
        result = train_challenger(champion, recipe, data)
        timings["train_s"], clock = _lap(clock)
        target = _export_store(cfg, champion, store, Path(tmp))
        version = export_challenger(champion, result,
                                    _retrain_info(cfg, champion, data, log_path),
                                    Path(tmp), target)
        record["challenger"] = {"version": version, "in_store": not cfg.dry_run}
        timings["export_s"], clock = _lap(clock)
        table = evaluate(champion, Path(target.get(f"{champion.name}:{version}").path), data)
        timings["evaluate_s"], _ = _lap(clock)
    record["evaluation"] = table
    return version, table


def evaluate(champion: Champion, challenger_folder: Path, data: RetrainData) -> dict[str, Any]:
    """Both models on the held-out part: the comparison table ``decide`` reads."""
    held_out = data.test
    slices = row_slices(champion, held_out)
    truth = [champion.labels[i] for i in held_out.labels]
    tables = [accuracy_table(predict(folder, held_out.inputs), truth, slices)
              for folder in (champion.path, challenger_folder)]
    return compare(*tables)


def drift_gate(champion: Champion, cfg: RetrainConfig, log_path: Path | None
               ) -> tuple[bool, dict[str, Any] | None, str]:
    """(drifted, the report's summary, why) from the latest drift report on ``champion``."""
    from monitoring.exporter import read_state, state_path_for

    path = Path(cfg.drift_state) if cfg.drift_state else state_path_for(log_path or DEFAULT_LOG)
    try:
        entry = read_state(path).get("models", {}).get(champion.name)
    except (OSError, ValueError, AttributeError) as exc:
        raise RetrainError(f"cannot read the drift state {path}: {exc}") from None
    if entry is None:
        return False, None, (f"no drift report on {champion.name} in {path}: run `python -m "
                             f"monitoring drift --model {champion.name} --log LOG` first")
    keys = ("version", "since", "until", "created", "dataset_drift", "share_drifted",
            "drifted_columns", "columns")
    summary = {k: entry.get(k) for k in keys} | {"state": str(path)}
    report = (f"the latest drift report on {champion.name}:{entry.get('version')} (window "
              f"{entry.get('since')} .. {entry.get('until')})")
    if entry.get("version") != champion.version:
        return False, summary, (f"{report} is not about the production version "
                                f"{champion.version}; run one on it")
    columns = f"{entry.get('drifted_columns')} of {entry.get('columns')} columns drifted"
    if not entry.get("dataset_drift"):
        return False, summary, f"{report} found no drift ({columns})"
    return True, summary, f"{report} found drift ({columns})"


def _export_store(cfg: RetrainConfig, champion: Champion, store: "ModelStore",
                  tmp: Path) -> "ModelStore":
    """Where the challenger goes: the store, its production pinned first; or, on a dry run,
    a throwaway store."""
    from bentoml._internal.models.model import ModelStore

    from service.registry import production, promote

    if cfg.dry_run:
        return ModelStore(str(tmp / "dry-run-store"))
    if production(champion.name, store) is None:
        # The first version saved under a name without a pointer becomes production
        # (training.export.save_staged): pin what is served now, so the challenger does not.
        promote(champion.name, champion.version, store=store,
                reason="retrain: pin the served (latest) version before exporting a challenger")
    return store


def _promote(champion: Champion, version: str, table: dict[str, Any],
             store: "ModelStore") -> tuple[bool, str]:
    from service.registry import RegistryError, production, promote

    overall = table["overall"]
    try:  # compare-and-swap: only over the champion it was judged against
        promote(champion.name, version, store=store, expect=champion.version,
                reason=f"retrain: accuracy {overall['challenger']:.4f} vs "
                       f"{overall['champion']:.4f} on {overall['count']} held-out inputs")
    except RegistryError:
        current = production(champion.name, store)
        return False, (f"kept out: production changed to {champion.name}:{current} during the "
                       f"retraining; {champion.name}:{version} was judged against "
                       f"{champion.version} only and stays in the store, not production")
    return True, f"promoted: {champion.name}:{version} is production (was {champion.version})"


def _record(cfg: RetrainConfig, champion: Champion, log_path: Path | None) -> dict[str, Any]:
    return {
        "time": _iso(time.time()), "model": champion.name, "kind": champion.kind,
        "decision": None, "reasons": [], "dry_run": cfg.dry_run,
        "champion": {"version": champion.version}, "challenger": None,
        "rules": asdict(cfg.rules), "drift": None, "recipe": None, "evaluation": None,
        "data": {"original": champion.manifest["data_source"],
                 "log": None if log_path is None else str(log_path), "new_data": cfg.new_data},
        "config": cfg.describe(),
    }


def _retrain_info(cfg: RetrainConfig, champion: Champion, data: RetrainData,
                  log_path: Path | None) -> dict[str, Any]:
    """What the challenger's manifest says about how it was made."""
    described = cfg.describe()
    return {"champion": champion.version, "split_seed": champion.split_seed(),
            "log": None if log_path is None else str(log_path), "new_data": cfg.new_data,
            "since": described["since"], "until": described["until"], "counts": data.counts()}


def _finish(cfg: RetrainConfig, record: dict[str, Any], decision: str, reasons: list[str],
            timings: dict[str, float], start: float) -> dict[str, Any]:
    record.update(decision=decision, reasons=reasons,
                  timings={**timings, "total_s": round(time.perf_counter() - start, 2)},
                  versions=library_versions(), git_commit=git_commit())
    for reason in reasons:
        log.info("%s", reason)
    if not cfg.dry_run:
        append_audit(Path(cfg.audit), record)
        log.info("decision %s; audit line appended to %s", decision, cfg.audit)
    return record


def append_audit(path: Path, record: dict[str, Any]) -> None:
    """One JSON line, flushed and fsynced before the run reports its decision."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(record, default=str) + "\n")
        out.flush()
        os.fsync(out.fileno())


def _lap(clock: float) -> tuple[float, float]:
    now = time.perf_counter()
    return round(now - clock, 2), now


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


if __name__ == "__main__":
    sys.exit(main())
