"""Step 8: the audit record, one JSON line per run (but dry runs), built from the steps' results.

``audit_record`` takes what the earlier steps returned (a skipped run has no data, challenger or
evaluation) and returns an ``AuditRecord``; ``AuditRecord.to_dict`` is the JSON line's object:
decision, reasons (every failed rule, with its figures), notes (the robustness and attack rules
passed or skipped), both versions, the comparison table (incl. the robustness suite and attack
rates), data hash and counts per source/part with the traffic's time cutoff, rules, drift
report, timings, library versions.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from monitoring.store import display_target

from .champion import Champion
from .config import RetrainConfig

if TYPE_CHECKING:
    from .data import RetrainData, Sources
    from .evaluate import Evaluation
    from .fit import Challenger
    from .gate import DriftCheck
    from .promote import Outcome


@dataclass(frozen=True)
class AuditRecord:
    """One retraining, as its audit line says it (field order is the line's key order)."""

    time: str
    model: str
    kind: str
    decision: str
    reasons: tuple[str, ...]
    notes: tuple[str, ...]
    dry_run: bool
    champion: Mapping[str, Any]
    challenger: Mapping[str, Any] | None
    rules: Mapping[str, Any]
    drift: Mapping[str, Any] | None
    recipe: Mapping[str, Any] | None
    evaluation: Mapping[str, Any] | None
    data: Mapping[str, Any]
    config: Mapping[str, Any]
    timings: Mapping[str, float]
    versions: Mapping[str, str]
    git_commit: str | None

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["reasons"] = list(self.reasons)
        out["notes"] = list(self.notes)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str)


def audit_record(cfg: RetrainConfig, started: str, champion: Champion, sources: "Sources",
                 outcome: "Outcome", timings: Mapping[str, float], versions: Mapping[str, str],
                 git_commit: str | None, drift: "DriftCheck | None" = None,
                 data: "RetrainData | None" = None, challenger: "Challenger | None" = None,
                 evaluation: "Evaluation | None" = None) -> AuditRecord:
    """The record of a run from its steps' results; ``started``: its start time (ISO 8601)."""
    data_info: dict[str, Any] = {
        "original": champion.manifest["data_source"],
        "log": None if sources.log is None else display_target(sources.log),
        "new_data": cfg.new_data}
    if data is not None:
        data_info.update(hash=data.data_hash(), counts=data.counts(), held_out=len(data.test),
                         traffic_split=(None if data.traffic_split is None
                                        else data.traffic_split.describe()))
    challenger_info = recipe = None
    if challenger is not None:
        challenger_info = {"version": challenger.version, "in_store": challenger.in_store}
        if outcome.production is not None:
            challenger_info["production"] = outcome.production
        recipe = {"epochs": challenger.epochs, "seed": challenger.seed,
                  "split_seed": champion.split_seed()}
    return AuditRecord(
        time=started, model=champion.name, kind=champion.kind, decision=outcome.decision,
        reasons=outcome.reasons, notes=outcome.notes, dry_run=cfg.dry_run,
        champion={"version": champion.version},
        challenger=challenger_info, rules=asdict(cfg.rules),
        drift=None if drift is None else drift.report, recipe=recipe,
        evaluation=None if evaluation is None else evaluation.table, data=data_info,
        config=cfg.describe(), timings=timings, versions=versions, git_commit=git_commit)


def append_audit(path: Path, record: AuditRecord) -> None:
    """One JSON line, flushed and fsynced before the run reports its decision."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as out:
        out.write(record.to_json() + "\n")
        out.flush()
        os.fsync(out.fileno())
