"""``run``: the steps of a retraining in order, each taking the results of the ones before.

    store      = store_at(cfg.store)
    champion   = resolve_champion(cfg.model, store)                       -> Champion
    sources    = locate_sources(cfg.log, cfg.new_data)                    -> Sources
    drift      = check_drift(champion, sources.log, cfg.drift_state)      -> DriftCheck
    data       = gather_data(champion, sources, cfg.since, cfg.until,
                             cfg.holdout_newest, cfg.cutoff)             -> RetrainData
    trained    = train_challenger(champion, recipe, data)                 (training's result)
    challenger = export_challenger(champion, trained, ..., target)        -> Challenger
    evaluation = evaluate(champion, challenger, data)                     -> Evaluation
    decision   = decide(evaluation.table, cfg.rules)                      -> Decision
    outcome    = settle(decision, champion, challenger, evaluation, ...)  -> Outcome
    record     = audit_record(cfg, ..., outcome, ...)                     -> AuditRecord
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from monitoring.store import display_target

from ..export import git_commit, library_versions
from .audit import AuditRecord, append_audit, audit_record
from .champion import Champion, resolve_champion, store_at
from .config import RetrainConfig, iso
from .data import RetrainData, Sources, gather_data, locate_sources
from .evaluate import evaluate
from .gate import check_drift, decide
from .promote import export_target, settle, skipped

log = logging.getLogger("training.retrain")


def run(cfg: RetrainConfig) -> AuditRecord:
    """Every step (see the package docstring); returns the audit record (appended to
    ``cfg.audit`` unless a dry run). Raises RetrainError (and DataError/ExportError) for input
    it refuses, before any write."""
    from .fit import challenger_recipe, export_challenger, train_challenger

    started = iso(time.time())
    start = time.perf_counter()
    store = store_at(cfg.store)
    champion = resolve_champion(cfg.model, store)
    sources = locate_sources(cfg.log, cfg.new_data)
    drift = None
    if cfg.only_if_drifted:
        drift = check_drift(champion, sources.log, cfg.drift_state)
        log.info("drift gate: %s", drift.why)
        if not drift.drifted:
            return finish(cfg, audit_record(
                cfg, started, champion, sources, skipped(drift.why),
                timings={"total_s": _since(start)}, versions=library_versions(),
                git_commit=git_commit(), drift=drift))

    data = gather_data(champion, sources, cfg.since, cfg.until, cfg.holdout_newest, cfg.cutoff)
    log.info("data: %s (held out: %d)", json.dumps(data.counts()), len(data.test))
    if data.traffic_split is not None:
        log.info("traffic split by time: %s", json.dumps(data.traffic_split.describe()))
    data_s = _since(start)
    with tempfile.TemporaryDirectory(prefix="retrain-") as tmp:
        clock = time.perf_counter()
        recipe = challenger_recipe(champion, cfg.epochs, cfg.seed)
        trained = train_challenger(champion, recipe, data)
        train_s, clock = _since(clock), time.perf_counter()
        target = export_target(champion, store, Path(tmp), cfg.dry_run)
        challenger = export_challenger(champion, trained,
                                       manifest_info(cfg, champion, data, sources),
                                       Path(tmp), target, in_store=not cfg.dry_run)
        export_s, clock = _since(clock), time.perf_counter()
        evaluation = evaluate(champion, challenger, data,
                              model=trained.model if champion.kind == "image" else None)
        evaluate_s = _since(clock)
    decision = decide(evaluation.table, cfg.rules)
    outcome = settle(decision, champion, challenger, evaluation, store, cfg.dry_run)
    timings = {"data_s": data_s, "train_s": train_s, "export_s": export_s,
               "evaluate_s": evaluate_s, "total_s": _since(start)}
    return finish(cfg, audit_record(cfg, started, champion, sources, outcome, timings,
                                    library_versions(), git_commit(), drift=drift, data=data,
                                    challenger=challenger, evaluation=evaluation))


def finish(cfg: RetrainConfig, record: AuditRecord) -> AuditRecord:
    """Log the reasons and, unless a dry run, append the audit line."""
    for reason in record.reasons:
        log.info("%s", reason)
    if not cfg.dry_run:
        append_audit(Path(cfg.audit), record)
        log.info("decision %s; audit line appended to %s", record.decision, cfg.audit)
    return record


def manifest_info(cfg: RetrainConfig, champion: Champion, data: RetrainData,
                  sources: Sources) -> dict[str, Any]:
    """What the challenger's manifest says about how it was made."""
    described = cfg.describe()
    return {"champion": champion.version, "split_seed": champion.split_seed(),
            "log": None if sources.log is None else display_target(sources.log),
            "new_data": cfg.new_data,
            "since": described["since"], "until": described["until"], "counts": data.counts(),
            "traffic_split": (None if data.traffic_split is None
                              else data.traffic_split.describe())}


def _since(clock: float) -> float:
    return round(time.perf_counter() - clock, 2)

