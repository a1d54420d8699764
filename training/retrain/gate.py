"""The two gates of a retraining: whether to run at all, and whether to promote.

* ``check_drift`` (step 2a, with ``--only-if-drifted``): the latest drift report
  (``drift_latest.json`` beside the log, written by ``python -m monitoring drift``) must be about
  the champion's version and say the data drifted; a report on an older version does not count,
  so a promotion is not followed by another retraining on the same report. Returns a
  ``DriftCheck``.
* ``decide`` (step 7): promote iff the challenger's accuracy >= the champion's + ``margin``, no
  slice with >= ``min_slice_count`` held-out inputs loses more than ``max_slice_drop``, no
  variation of the robustness suite (the held-out inputs resampled, re-compressed, rotated...;
  ``training.robustness``) loses more than ``max_robustness_drop`` against the champion, and the
  adversarial attack success rate (the champion's metrics.json ``attack_success``, the
  challenger's on the same inputs: ``evaluate.champion_inputs_attack``) rises by no more than
  ``max_attack_increase``. A champion exported before attacks were measured has no
  ``attack_success``: that rule is then skipped, with a note. A pure function of the comparison
  table (``Evaluation.table``), testable with hand-made numbers; returns a ``Decision``: a failed
  rule is a reason (which the audit record lists), a passed or skipped robustness or attack rule
  a note.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .champion import Champion, RetrainError
from .data import DEFAULT_LOG

# Accuracies are ratios of counts: compare with a little slack so 0.1 + 0.2 >= 0.3 holds.
_EPS = 1e-9


@dataclass(frozen=True)
class DriftCheck:
    """The drift gate's answer: ``drifted`` (run the retraining), ``why`` (one line), and the
    summary of the report it read (None where there was none on the model)."""

    drifted: bool
    why: str
    report: Mapping[str, Any] | None = None


def check_drift(champion: Champion, log_path: Path | None,
                drift_state: str | None = None) -> DriftCheck:
    """The latest drift report on ``champion``: from ``drift_state``, or the state file beside
    the log (``DEFAULT_LOG``'s where there is none)."""
    from monitoring.exporter import read_state, state_path_for

    path = Path(drift_state) if drift_state else state_path_for(log_path or DEFAULT_LOG)
    try:
        entry = read_state(path).get("models", {}).get(champion.name)
    except (OSError, ValueError, AttributeError) as exc:
        raise RetrainError(f"cannot read the drift state {path}: {exc}") from None
    if entry is None:
        return DriftCheck(False, (f"no drift report on {champion.name} in {path}: run `python -m "
                                  f"monitoring drift --model {champion.name} --log LOG` first"))
    keys = ("version", "since", "until", "created", "dataset_drift", "share_drifted",
            "drifted_columns", "columns")
    summary = {k: entry.get(k) for k in keys} | {"state": str(path)}
    report = (f"the latest drift report on {champion.name}:{entry.get('version')} (window "
              f"{entry.get('since')} .. {entry.get('until')})")
    if entry.get("version") != champion.version:
        return DriftCheck(False, (f"{report} is not about the production version "
                                  f"{champion.version}; run one on it"), summary)
    columns = f"{entry.get('drifted_columns')} of {entry.get('columns')} columns drifted"
    if not entry.get("dataset_drift"):
        return DriftCheck(False, f"{report} found no drift ({columns})", summary)
    return DriftCheck(True, f"{report} found drift ({columns})", summary)


@dataclass(frozen=True)
class Rules:
    """Promote iff overall accuracy >= champion's + ``margin``, no slice with at least
    ``min_slice_count`` held-out inputs loses more than ``max_slice_drop`` accuracy, no
    robustness variation loses more than ``max_robustness_drop`` against the champion on the
    same variation, and the attack success rate rises by at most ``max_attack_increase``."""

    margin: float = 0.0
    max_slice_drop: float = 0.05
    min_slice_count: int = 30
    max_robustness_drop: float = 0.02
    max_attack_increase: float = 0.05


@dataclass(frozen=True)
class Decision:
    """Whether the challenger should be promoted, with one reason per rule (figures included);
    the robustness and attack rules give a reason only when they fail, else a note (passed, or
    skipped for want of figures)."""

    promote: bool
    reasons: tuple[str, ...]
    notes: tuple[str, ...] = ()


def decide(table: Mapping[str, Any], rules: Rules) -> Decision:
    """Promote iff both rules pass; one reason per rule, with the figures that decided it."""
    overall = table["overall"]
    needed = overall["champion"] + rules.margin
    # With a margin >= 0 a win is strictly better, by at least the margin: a tie never replaces
    # the champion. A negative margin says how much worse the challenger may be (e.g. to
    # promote a smaller, faster model); then the bound alone decides.
    strict = rules.margin >= 0
    wins = overall["challenger"] >= needed - _EPS and (overall["delta"] > _EPS or not strict)
    needs = (f"> {overall['champion']:.4f} and >= {needed:.4f}" if strict
             else f">= {needed:.4f}")
    reasons = [f"{'pass' if wins else 'fail'}: overall accuracy {overall['challenger']:.4f} vs "
               f"champion {overall['champion']:.4f} ({overall['delta']:+.4f}) on "
               f"{overall['count']} held-out inputs; a win needs {needs}"]
    judged = {name: cell for name, cell in table["slices"].items()
              if cell["count"] >= rules.min_slice_count}
    dropped = {name: cell for name, cell in judged.items()
               if cell["delta"] < -rules.max_slice_drop - _EPS}
    for name, cell in sorted(dropped.items(), key=lambda item: item[1]["delta"]):
        reasons.append(f"fail: slice {name} (n={cell['count']}) accuracy {cell['challenger']:.4f}"
                       f" vs champion {cell['champion']:.4f} ({cell['delta']:+.4f}) drops more "
                       f"than {rules.max_slice_drop:.4f}")
    if not dropped:
        worst = min(judged.items(), key=lambda item: item[1]["delta"], default=None)
        reasons.append(
            f"pass: no slice with >= {rules.min_slice_count} held-out inputs drops more than "
            f"{rules.max_slice_drop:.4f} ({len(judged)} judged"
            + (f"; the worst: {worst[0]} {worst[1]['delta']:+.4f}" if worst else "")
            + f"; {len(table['slices']) - len(judged)} below the support bound not judged)")
    robust_fails, robust_notes = robustness_rule(table.get("robustness"), rules)
    attack_fails, attack_notes = attack_rule(table.get("attack"), rules)
    return Decision(promote=wins and not dropped and not robust_fails and not attack_fails,
                    reasons=tuple(reasons + robust_fails + attack_fails),
                    notes=tuple(robust_notes + attack_notes))


def robustness_rule(robustness: Mapping[str, Any] | None, rules: Rules
                    ) -> tuple[list[str], list[str]]:
    """(failures, notes) of the robustness rule: every variation of the suite (but ``clean``,
    the overall rule's) on which the challenger's accuracy is below the champion's minus
    ``max_robustness_drop``, worst first. None: not measured (no rule, no note)."""
    if robustness is None:
        return [], []
    bound = rules.max_robustness_drop
    judged = {name: cell for name, cell in robustness.get("variations", {}).items()
              if name != "clean"}
    if not judged or not robustness.get("count"):
        return [], ["skip: robustness: no held-out inputs to vary; rule not applied"]
    count = robustness["count"]
    dropped = sorted(((name, cell) for name, cell in judged.items()
                      if cell["challenger"] < cell["champion"] - bound - _EPS),
                     key=lambda item: item[1]["delta"])
    fails = [f"fail: robustness: {name} {cell['challenger']:.4f} < champion "
             f"{cell['champion']:.4f} - {bound:.4f} ({cell['delta']:+.4f} on the {count} held-out "
             f"inputs varied)" for name, cell in dropped]
    if fails:
        return fails, []
    worst = min(judged.items(), key=lambda item: item[1]["delta"])
    return [], [f"pass: robustness: no variation of the {count} held-out inputs loses more than "
                f"{bound:.4f} against the champion ({len(judged)} variations, seed "
                f"{robustness.get('seed')}; the worst: {worst[0]} {worst[1]['challenger']:.4f} "
                f"vs {worst[1]['champion']:.4f}, {worst[1]['delta']:+.4f})"]


def attack_rule(attack: Mapping[str, Any] | None, rules: Rules) -> tuple[list[str], list[str]]:
    """(failures, notes) of the attack rule: the challenger's attack success rate (over the
    champion's inputs where they can be matched, ``evaluate.attack_table``) may exceed the
    champion's (metrics.json ``attack_success``) by at most ``max_attack_increase``. Skipped,
    with a note, where either artifact has no figure, or where one is a rate over fewer than
    ``min_slice_count`` attacked inputs (the correctly classified ones: a near-chance model has
    few, and a rate of 0 over 5 says nothing). None: not measured (no rule, no note)."""
    if attack is None:
        return [], []
    bound = rules.max_attack_increase
    missing = [who for who in ("champion", "challenger") if attack.get(who) is None]
    if missing:
        return [], [f"skip: attack success rate: the {' and the '.join(missing)} "
                    f"{'has' if len(missing) == 1 else 'have'} no attack_success in "
                    "metrics.json (exported before attacks were measured); rule not applied"]
    attacked = attack.get("attacked") or {}
    few = [f"the {who}'s is over {attacked[who]}" for who in ("champion", "challenger")
           if attacked.get(who) is not None and attacked[who] < rules.min_slice_count]
    if few:
        return [], [f"skip: attack success rate {float(attack['challenger']):.4f} vs champion "
                    f"{float(attack['champion']):.4f}: {' and '.join(few)} attacked "
                    f"(correctly classified) input(s), fewer than {rules.min_slice_count}; "
                    "rule not applied"]
    champion, challenger = float(attack["champion"]), float(attack["challenger"])
    line = (f"attack success rate {challenger:.4f} vs champion {champion:.4f} "
            f"({challenger - champion:+.4f})")
    if challenger > champion + bound + _EPS:
        return [f"fail: attack: {challenger:.4f} > champion {champion:.4f} + {bound:.4f}: the "
                f"challenger is easier to attack ({line})"], []
    return [], [f"pass: {line}; at most +{bound:.4f} allowed"]
