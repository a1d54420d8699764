"""The two steps that touch the production pointer: pinning it before the challenger's export
(step 5) and promoting the challenger after the decision (step 7), both through
``modelstore.registry``. ``settle`` turns a ``Decision`` into the run's ``Outcome``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .champion import Champion

if TYPE_CHECKING:
    from modelstore import ModelStore

    from .evaluate import Evaluation
    from .fit import Challenger
    from .gate import Decision

# The decisions an audit line records, and what ``main`` exits with for each.
PROMOTED, KEPT_OUT, WOULD_PROMOTE, WOULD_KEEP_OUT, SKIPPED = (
    "promoted", "kept_out", "would_promote", "would_keep_out", "skipped")


@dataclass(frozen=True)
class Outcome:
    """How the run ended: the decision, its reasons (the rules', then what was done), and
    whether the challenger is production now (None where that was not up to this run: a dry
    run, a skipped run)."""

    decision: str
    reasons: tuple[str, ...]
    production: bool | None = None
    notes: tuple[str, ...] = ()  # the decision's notes (robustness/attack rules passed, skipped)


def skipped(why: str) -> Outcome:
    """The drift gate said no: nothing was trained."""
    return Outcome(SKIPPED, (why,))


def export_target(champion: Champion, store: "ModelStore", work_dir: Path,
                  dry_run: bool) -> "ModelStore":
    """Where the challenger goes: the store, its production pinned first; or, on a dry run,
    a throwaway store under ``work_dir``."""
    from modelstore import open_store
    from modelstore.registry import production, promote

    if dry_run:
        return open_store(work_dir / "dry-run-store")
    if production(champion.name, store) is None:
        # The first version saved under a name without a pointer becomes production
        # (modelstore.store.save_version): pin what is served now, so the challenger does not.
        promote(champion.name, champion.version, store=store,
                reason="retrain: pin the served (latest) version before exporting a challenger")
    return store


def settle(decision: "Decision", champion: Champion, challenger: "Challenger",
           evaluation: "Evaluation", store: "ModelStore", dry_run: bool) -> Outcome:
    """Step 7: promote the challenger if the decision says so (a dry run only says what it
    would do); a challenger kept out stays in the store, not production."""
    reasons, notes = decision.reasons, decision.notes
    if dry_run:
        return Outcome(WOULD_PROMOTE if decision.promote else WOULD_KEEP_OUT, reasons,
                       notes=notes)
    if not decision.promote:
        return Outcome(KEPT_OUT, reasons + (
            f"kept out: {challenger.tag} stays in the store, not production; {champion.tag} "
            "serves on",), production=False, notes=notes)
    promoted, why = promote_challenger(champion, challenger, evaluation, store)
    return Outcome(PROMOTED if promoted else KEPT_OUT, reasons + (why,), production=promoted,
                   notes=notes)


def promote_challenger(champion: Champion, challenger: "Challenger", evaluation: "Evaluation",
                       store: "ModelStore") -> tuple[bool, str]:
    """One atomic pointer swap, and only over the champion it was judged against
    (compare-and-swap): (promoted, why)."""
    from modelstore.registry import RegistryError, production, promote

    overall = evaluation.overall
    try:
        promote(champion.name, challenger.version, store=store, expect=champion.version,
                reason=f"retrain: accuracy {overall['challenger']:.4f} vs "
                       f"{overall['champion']:.4f} on {overall['count']} held-out inputs")
    except RegistryError:
        current = production(champion.name, store)
        return False, (f"kept out: production changed to {champion.name}:{current} during the "
                       f"retraining; {challenger.tag} was judged against "
                       f"{champion.version} only and stays in the store, not production")
    return True, f"promoted: {challenger.tag} is production (was {champion.version})"
