"""``python -m training.retrain``: train a challenger on what production taught us, and promote it
only if it is better on data neither model trained on.

    python -m training.retrain --model digits-cnn [--log artifacts/predictions.db]
        [--new-data PATH] [--since 7d] [--until now] [--holdout-newest 0.2 | --cutoff TIME]
        [--margin 0.0] [--max-slice-drop 0.05] [--min-slice-count 30]
        [--max-robustness-drop 0.02] [--max-attack-increase 0.05]
        [--only-if-drifted [--drift-state FILE]]
        [--audit artifacts/retrain/audit.jsonl] [--epochs N] [--seed S] [--store DIR] [--dry-run]

Steps (``pipeline.run``), each a function that returns a frozen result the next ones take; only
steps 5 and 7 touch the store, and nothing at all is written before step 5 (but for the audit
line of a skipped run):
  1. the champion (``champion.resolve_champion`` -> ``Champion``): the production version of
     ``--model`` (``modelstore.registry.resolve``);
  2. with ``--only-if-drifted`` (``gate.check_drift`` -> ``DriftCheck``): the latest drift report
     (``drift_latest.json`` beside the log, written by ``python -m monitoring drift``) must be
     about the champion's version and say the data drifted; otherwise the run is skipped (exit
     4). A report on an older version does not count, so a promotion is not followed by another
     retraining on the same report;
  3. the data (``data.gather_data`` -> ``RetrainData``): the champion's original data split as
     its training run split it (seeded); the labelled traffic of the log split by time: the
     newest ``--holdout-newest`` share (or what was logged after ``--cutoff``) is held out, and
     only older rows whose label was stored by the cutoff train (train/val by hash); and
     ``--new-data``, assigned to train/val/test by hash with the recipe's fractions. Every
     refusal happens here (or in steps 1-2);
  4. the challenger (``fit.train_challenger``): the champion's recipe and preprocessing, trained
     on the train parts with early stopping on the val parts;
  5. it is exported into the store as a new, non-production version (``fit.export_challenger``
     -> ``Challenger``; ``--dry-run``: into a throwaway store). A name without a production
     pointer is first pinned to the champion (``promote.export_target``), or the challenger, as
     the name's first pointer, would become production on export;
  6. champion and challenger are evaluated by ONNX Runtime on the same held-out inputs, the
     test parts of all three sources (``evaluate.evaluate`` -> ``Evaluation``), overall, per
     slice and per variation of their robustness suite (``training.robustness``); their attack
     success rates over the same inputs: the champion's from its metrics.json, the challenger
     attacked the same way on the champion's test split (``evaluate.champion_inputs_attack``);
  7. ``gate.decide`` -> ``Decision``: promote iff the challenger's accuracy >= the champion's +
     ``--margin``, no slice with >= ``--min-slice-count`` held-out inputs loses more than
     ``--max-slice-drop``, no robustness variation trails the champion's by more than
     ``--max-robustness-drop`` and the attack success rate rises by at most
     ``--max-attack-increase`` (skipped, with a note, where a version has none). Promotion
     (``promote.settle`` -> ``Outcome``) is ``modelstore.registry.promote`` (one atomic pointer
     swap), and only if production is still the champion evaluated (two retrainings at once:
     the second loses);
  8. one JSON line (``audit.audit_record`` -> ``AuditRecord``) is appended to ``--audit`` and
     printed on stdout: decision, reasons, notes, both versions, the comparison table, data
     hash and counts per source/part, the traffic's cutoff, rules, drift report, timings,
     library versions. A challenger kept out stays in the store, not production.

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

from .audit import AuditRecord
from .champion import Champion, RetrainError
from .cli import (EXIT_KEPT_OUT, EXIT_PROMOTED, EXIT_REFUSED, EXIT_SKIPPED, build_parser,
                  config_from_args, main)
from .config import DEFAULT_AUDIT, RetrainConfig
from .data import DEFAULT_LOG, RetrainData, Sources
from .evaluate import Evaluation
from .gate import Decision, DriftCheck, Rules
from .pipeline import run
from .promote import Outcome


def __getattr__(name: str) -> object:
    # ``fit`` pulls in the training loop and datasets: imported when first asked for.
    if name == "Challenger":
        from .fit import Challenger

        return Challenger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AuditRecord", "Challenger", "Champion", "Decision", "DriftCheck", "Evaluation", "Outcome",
           "RetrainConfig", "RetrainData", "RetrainError", "Rules", "Sources", "build_parser",
           "config_from_args", "main", "run", "DEFAULT_AUDIT", "DEFAULT_LOG", "EXIT_KEPT_OUT",
           "EXIT_PROMOTED", "EXIT_REFUSED", "EXIT_SKIPPED"]
