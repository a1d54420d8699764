"""``drift.html``: a summary a person reads first, then Evidently's per-column charts.

Evidently's own page opens on the first tested column's chart (whatever its verdict), keeps the
verdict on a second tab, names no model, version, window or row counts, and prints small
thresholds as "0.00". The summary says, in this order: which model and version, the verdict,
the window and the rows compared, the estimated accuracy (when the report has one), the drifted
columns ranked by how far past their threshold they are, the estimated accuracy per slice, the
columns left out because they hold one value in both windows, and the columns that did not
drift. Numbers show three significant digits, tiny p-values in scientific notation.

``render_report(doc, evidently_html)`` is pure: ``doc`` is what ``drift.json`` holds (the
command's meta, ``DriftResult.to_dict()``); an ``estimated_accuracy`` in it (a number in [0, 1],
a mapping with a ``value``, or ``performance.performance_report``'s entry, whose interval,
realised accuracy, calibration and slices show too) shows in the summary, otherwise "not
available".
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from html import escape
from typing import Any, Iterable, Mapping

from .drift import P_VALUE_METHODS

SUMMARY_ID = "drift-summary"
DETAIL_ID = "drift-detail"
METHOD_NAMES = {
    "ks": "Kolmogorov-Smirnov p-value",
    "chi2_2sample": "chi-square 2-sample p-value",
    "chisquare": "chi-square goodness-of-fit p-value",
    "z": "z-test p-value",
    "wasserstein": "Wasserstein distance (normed)",
    "jensenshannon": "Jensen-Shannon distance",
    "psi": "population stability index",
}
_TINY_P = 1e-300

_CSS = """
#drift-summary { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: #1d1d1f; max-width: 1100px; margin: 16px auto 24px; padding: 0 24px; }
#drift-summary h1 { font-size: 24px; margin: 8px 0 4px; }
#drift-summary h2 { font-size: 17px; margin: 20px 0 6px; }
#drift-summary .verdict { font-size: 19px; font-weight: 600; padding: 10px 14px;
  border-radius: 6px; margin: 10px 0; }
#drift-summary .verdict.drifted { background: #fde8e8; color: #8a1111; border: 1px solid #f3b4b4; }
#drift-summary .verdict.stable { background: #e6f4ea; color: #0f5c24; border: 1px solid #a8d5b5; }
#drift-summary dl { display: grid; grid-template-columns: max-content auto; gap: 2px 16px;
  margin: 8px 0; }
#drift-summary dt { font-weight: 600; }
#drift-summary dd { margin: 0; }
#drift-summary table { border-collapse: collapse; margin: 4px 0; }
#drift-summary th, #drift-summary td { padding: 3px 10px; border-bottom: 1px solid #ddd;
  text-align: left; }
#drift-summary td.num { text-align: right; font-variant-numeric: tabular-nums; }
#drift-summary .note { color: #555; font-size: 13px; }
#drift-detail { font: 600 17px system-ui, sans-serif; max-width: 1100px; margin: 24px auto 0;
  padding: 12px 24px 0; border-top: 2px solid #ccc; }
"""


def readable(x: float | None) -> str:
    """3 significant digits; scientific below 0.001 (p-values) and from 100,000 up."""
    if x is None:
        return "n/a"
    x = float(x)
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    if abs(x) < 1e-3 or abs(x) >= 1e5:
        return f"{x:.2e}"
    return f"{x:.3g}"


def is_p_value(method: str) -> bool:
    return method in P_VALUE_METHODS


def strength(row: Mapping[str, Any]) -> float:
    """How far past its threshold a column's score is, comparable across methods: 1 at the
    threshold, more when stronger (p-values on a log scale: 1e-12 against 0.0025 is 4.6)."""
    score, threshold = float(row["score"]), float(row["threshold"])
    if is_p_value(row["method"]):
        return -math.log10(max(score, _TINY_P)) / -math.log10(min(max(threshold, _TINY_P), 0.5))
    return score / threshold if threshold > 0 else math.inf


def ranked(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Strongest first; ties by name, so the order is stable."""
    return sorted(rows, key=lambda r: (-strength(r), r["feature"]))


def score_text(row: Mapping[str, Any]) -> str:
    score = float(row["score"])
    if is_p_value(row["method"]) and score < _TINY_P:
        return f"< {_TINY_P:.0e}"
    return readable(score)


def accuracy_text(value: Any) -> str:
    if isinstance(value, Mapping) and "estimated" in value:
        return _estimate_text(value)
    if isinstance(value, Mapping):
        extra = ", ".join(f"{k}: {_plain(v)}" for k, v in value.items() if k != "value")
        head = accuracy_text(value.get("value"))
        return f"{head} ({extra})" if extra and head != "not available" else head
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{100 * value:.1f}%" if 0 <= value <= 1 else readable(value)
    return "not available"


def render_summary(doc: Mapping[str, Any]) -> str:
    """The summary section (HTML)."""
    rows = list(doc.get("rows", []))
    drifted = ranked(r for r in rows if r["drifted"])
    stable = ranked(r for r in rows if not r["drifted"])
    model = escape(str(doc.get("model", "unknown model")))
    version = escape(str(doc.get("version", "unknown")))
    verdict = (f"Drift detected: {len(drifted)} of {len(rows)} tested columns drifted "
               f"({_percent(len(drifted), len(rows))})" if doc.get("dataset_drift") else
               f"No drift detected: {len(drifted)} of {len(rows)} tested columns drifted")
    parts = [f'<section id="{SUMMARY_ID}">',
             f"<h1>Drift report: {model}, version {version}</h1>",
             f'<p class="verdict {"drifted" if doc.get("dataset_drift") else "stable"}">'
             f"{escape(verdict)}</p>",
             "<dl>", *_facts(doc), "</dl>",
             "<h2>Drifted columns, strongest first</h2>",
             _table(drifted) if drifted else "<p>None.</p>"]
    estimate = doc.get("estimated_accuracy")
    if isinstance(estimate, Mapping) and estimate.get("by_slice"):
        parts += ["<h2>Estimated accuracy by slice</h2>", _slice_table(estimate["by_slice"])]
    constant = doc.get("constant_columns") or {}
    parts.append("<h2>Constant in both windows (left out: nothing to test)</h2>")
    parts.append("<p>" + (", ".join(f"{escape(str(k))} = {escape(_plain(v))}"
                                    for k, v in constant.items()) or "None.") + "</p>")
    if stable:
        parts += [f"<h2>Not drifted ({len(stable)})</h2>", _table(stable)]
    parts.append(f'<p class="note">{escape(_how_to_read(doc))}</p>')
    parts.append("</section>")
    return "\n".join(parts)


def render_report(doc: Mapping[str, Any], evidently_html: str | None) -> str:
    """The whole page: the summary first in ``<body>``, Evidently's page (if any) below it."""
    title = escape(f"Drift: {doc.get('model', '')} {doc.get('version', '')}".strip())
    summary = render_summary(doc)
    if not evidently_html:
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="UTF-8"><title>{title}'
                f"</title><style>{_CSS}</style></head><body>\n{summary}\n</body></html>\n")
    detail = (f'<h2 id="{DETAIL_ID}">Per-column detail (Evidently): distributions of the tested '
              "columns, reference against the window</h2>")
    head = f"<title>{title}</title><style>{_CSS}</style>"
    page, n = re.subn(r"<head>", lambda _: f"<head>{head}", evidently_html, count=1)
    page, m = re.subn(r"<body[^>]*>", lambda b: f"{b.group(0)}\n{summary}\n{detail}\n", page,
                      count=1)
    if not (n and m):
        raise ValueError("Evidently's HTML has no <head> or <body>: cannot add the summary")
    return page


def _facts(doc: Mapping[str, Any]) -> list[str]:
    config = doc.get("config") or {}
    tested, current = doc.get("tested_rows"), doc.get("current_rows")
    sample = "" if tested == current else f", {tested} sampled for the tests"
    facts = [
        ("Window", _window(doc.get("since"), doc.get("until"))),
        ("Rows compared", f"{current} logged in the window{sample}, against "
                          f"{doc.get('reference_rows')} reference rows (the model's validation "
                          "profile)"),
        ("Estimated accuracy", accuracy_text(doc.get("estimated_accuracy"))),
        ("Decision rule", _rule(doc, config)),
    ]
    if doc.get("created"):
        facts.append(("Report made", _iso(float(doc["created"]))))
    return [f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in facts]


def _table(rows: list[Mapping[str, Any]]) -> str:
    head = ("<tr><th>#</th><th>column</th><th>group</th><th>test</th><th>score</th>"
            "<th>threshold</th></tr>")
    body = [f'<tr><td class="num">{i}</td><td>{escape(r["feature"])}</td>'
            f'<td>{escape(r.get("group", ""))}</td>'
            f'<td>{escape(METHOD_NAMES.get(r["method"], r["method"]))}</td>'
            f'<td class="num">{escape(score_text(r))}</td>'
            f'<td class="num">{escape(readable(r["threshold"]))}</td></tr>'
            for i, r in enumerate(rows, 1)]
    return "<table>" + head + "".join(body) + "</table>"


def _estimate_text(report: Mapping[str, Any]) -> str:
    """``performance.performance_report``'s entry in one line."""
    head = accuracy_text(report.get("estimated"))
    if head == "not available":
        return head
    text = (f"{head} (95% interval {accuracy_text(report.get('low'))} to "
            f"{accuracy_text(report.get('high'))}, over {report.get('n')} rows, from confidence "
            "calibrated on the reference profile")
    cal = report.get("calibration") or {}
    if cal:
        method = {"isotonic": "isotonic regression", "identity": "raw confidence, already "
                  "calibrated"}.get(cal.get("method"), str(cal.get("method")))
        text += (f": {method}; reference accuracy {accuracy_text(cal.get('reference_accuracy'))}"
                 f" on {cal.get('reference_rows')} rows")
    if report.get("n_labelled"):
        text += (f"). Realised {accuracy_text(report.get('realised'))} on the "
                 f"{report['n_labelled']} rows with feedback (estimated "
                 f"{accuracy_text(report.get('estimated_labelled'))} on those)")
    else:
        text += "). No feedback labels in the window: no realised accuracy"
    if report.get("warning"):
        text += f". Warning: {report['warning']}"
    return text


def _slice_table(rows: list[Mapping[str, Any]]) -> str:
    head = ("<tr><th>slice</th><th>value</th><th>rows</th><th>estimated</th>"
            "<th>95% interval</th><th>OOD-flagged</th><th>with feedback</th><th>realised</th>"
            "</tr>")
    body = [f'<tr><td>{escape(str(r["slice"]))}</td><td>{escape(str(r["value"]))}</td>'
            f'<td class="num">{r["n"]}</td>'
            f'<td class="num">{escape(accuracy_text(r.get("estimated")))}</td>'
            f'<td class="num">{escape(accuracy_text(r.get("low")))} to '
            f'{escape(accuracy_text(r.get("high")))}</td>'
            f'<td class="num">{escape(accuracy_text(r.get("ood_share")))}</td>'
            f'<td class="num">{r.get("n_labelled", 0)}</td>'
            f'<td class="num">{escape(accuracy_text(r.get("realised")))}</td></tr>'
            for r in rows]
    return "<table>" + head + "".join(body) + "</table>"


def _rule(doc: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    min_share = float(config.get("min_share") or 0.0)
    needed = ("at least one column" if min_share <= 0 else
              f"a share of at least {readable(min_share)} of the columns")
    text = f"the window drifted when {needed} drifted"
    alpha, rows = config.get("alpha"), doc.get("rows", [])
    n_p = sum(is_p_value(r["method"]) for r in rows)
    if alpha is not None and n_p:
        text += (f"; each p-value test at {readable(alpha)} / {n_p} = {readable(alpha / n_p)} "
                 f"(Bonferroni: at most a {readable(alpha)} chance that a window like the "
                 "reference shows any drifted column)")
    distances = sorted({readable(r["threshold"]) for r in rows if not is_p_value(r["method"])})
    if distances:
        text += f"; distances drift from {' / '.join(distances)}"
    return text


def _how_to_read(doc: Mapping[str, Any]) -> str:
    return ("How to read: a p-value test (Kolmogorov-Smirnov, chi-square) flags a column when "
            "its p-value is below the threshold; a distance (Wasserstein, Jensen-Shannon) when "
            "it reaches the threshold. Columns are ranked by how far past the threshold they are "
            "(p-values on a log scale). embedding.pcN are the model's embedding projected on "
            "the N-th principal axis of both windows pooled; 'predicted' is the predicted class. "
            "The estimated accuracy needs no labels: it is the mean confidence, calibrated on "
            "the reference profile, so it follows shifts the model is unsure about but not "
            "new labels for the same inputs (concept shift) or inputs the model is confidently "
            "wrong on; compare it with the realised accuracy where feedback exists.")


def _window(since: Any, until: Any) -> str:
    if not since or not until:
        return "unknown"
    try:
        hours = (datetime.fromisoformat(str(until)) - datetime.fromisoformat(str(since))
                 ).total_seconds() / 3600
    except ValueError:
        return f"{since} to {until}"
    span = f"{readable(hours)} h" if hours < 48 else f"{readable(hours / 24)} days"
    return f"{since} to {until} ({span})"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "0%"


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return readable(value)
    return str(value)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")
