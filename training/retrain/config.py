"""One retraining run's settings (``RetrainConfig``), as the command line gives them."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass
from typing import Any

from .gate import Rules

DEFAULT_AUDIT = "artifacts/retrain/audit.jsonl"


@dataclass(frozen=True)
class RetrainConfig:
    """One retraining run, from the command line; printed at start, saved in the audit line."""

    model: str
    log: str | None = None  # None: DEFAULT_LOG if it exists, else no traffic
    new_data: str | None = None
    since: float = 0.0
    until: float = math.inf
    # The traffic's time split: held out are the rows logged after ``cutoff`` (unix seconds),
    # or, without one, the newest ``holdout_newest`` share of them (see data.split_by_time).
    holdout_newest: float = 0.2
    cutoff: float | None = None
    margin: float = 0.0
    max_slice_drop: float = 0.05
    min_slice_count: int = 30
    max_robustness_drop: float = 0.02
    max_attack_increase: float = 0.05
    only_if_drifted: bool = False
    drift_state: str | None = None
    audit: str = DEFAULT_AUDIT
    epochs: int | None = None
    seed: int | None = None
    store: str | None = None  # a BentoML models folder, as modelstore's --store
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
            (0.0 <= self.max_robustness_drop <= 1.0,
             f"--max-robustness-drop must be in [0, 1], got {self.max_robustness_drop}"),
            (0.0 <= self.max_attack_increase <= 1.0,
             f"--max-attack-increase must be in [0, 1], got {self.max_attack_increase}"),
            (self.epochs is None or self.epochs >= 1, "--epochs must be >= 1"),
            (self.seed is None or self.seed >= 0, "--seed must be >= 0"),
            (self.since < self.until, "--since must be before --until"),
            (0.0 <= self.holdout_newest <= 1.0,
             f"--holdout-newest must be in [0, 1], got {self.holdout_newest}"),
            (self.cutoff is None or math.isfinite(self.cutoff), "--cutoff must be a time"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def rules(self) -> Rules:
        return Rules(self.margin, self.max_slice_drop, self.min_slice_count,
                     self.max_robustness_drop, self.max_attack_increase)

    def describe(self) -> dict[str, Any]:
        from monitoring.store import display_target

        out = asdict(self)  # as logged and audited: a PostgreSQL URL without its password
        out["log"] = None if self.log is None else display_target(self.log)
        out["since"] = iso(self.since) if self.since > 0 else None
        out["until"] = iso(self.until) if math.isfinite(self.until) else None
        out["cutoff"] = None if self.cutoff is None else iso(self.cutoff)
        return out


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")
