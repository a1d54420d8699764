"""Reading the service's ``/metrics`` text: samples, and histogram sum/count deltas over a window.

Only what the bench needs from the Prometheus text format: ``name{labels} value`` lines, comments
skipped. With several workers BentoML's ``/metrics`` already sums the per-worker files, so one
scrape before and one after a measured window give the window's totals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]

_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')

# The histograms the bench reads, by what they mean.
PREPROCESS = "clf_preprocess_seconds"
INFERENCE = "clf_inference_seconds"
QUEUE_WAIT = "clf_queue_wait_seconds"
BATCH_ITEMS = "clf_batch_size_items"
HISTOGRAMS = (PREPROCESS, INFERENCE, QUEUE_WAIT, BATCH_ITEMS)
# The prediction log's commits (one transaction each; no model label: one log per worker).
LOG_COMMIT = "clf_prediction_log_commit_seconds"


def parse_samples(text: str) -> Samples:
    """Every sample in an exposition, keyed by (metric name, sorted label pairs)."""
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        try:
            samples[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            continue
    return samples


def total(samples: Samples, name: str, **match: str) -> float:
    """Sum of a metric's samples over every label set that has the given label values."""
    want = set(match.items())
    return sum(v for (n, labels), v in samples.items() if n == name and want <= set(labels))


@dataclass(frozen=True)
class HistogramDelta:
    """What one histogram observed between two scrapes."""

    sum: float
    count: float

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None


def histogram_delta(before: Samples, after: Samples, name: str, **match: str) -> HistogramDelta:
    """``<name>_sum`` and ``<name>_count`` increase from ``before`` to ``after``."""
    return HistogramDelta(
        sum=total(after, f"{name}_sum", **match) - total(before, f"{name}_sum", **match),
        count=total(after, f"{name}_count", **match) - total(before, f"{name}_count", **match),
    )


def deltas(before: Samples, after: Samples, model: str) -> dict[str, HistogramDelta]:
    """The four request-path histograms for one model and the log's commits, as deltas over
    the window."""
    out = {name: histogram_delta(before, after, name, model=model) for name in HISTOGRAMS}
    out[LOG_COMMIT] = histogram_delta(before, after, LOG_COMMIT)
    return out


def bucket_deltas(before: Samples, after: Samples, name: str, **match: str
                  ) -> list[tuple[float, float]]:
    """A histogram's cumulative ``(le, count)`` increases over the window, ``le`` ascending
    (``+Inf`` last)."""
    want = set(match.items())
    edges: dict[float, float] = {}
    for (n, labels), value in after.items():
        if n != f"{name}_bucket" or not want <= set(labels):
            continue
        le = float(dict(labels)["le"])
        edges[le] = edges.get(le, 0.0) + value - before.get((n, labels), 0.0)
    return sorted(edges.items())


def distribution(cumulative: list[tuple[float, float]]) -> list[tuple[str, float]]:
    """Cumulative bucket counts as shares per range (``"2-4"``: 2 <= x <= 4 for integer
    observations), ranges with no observations left out."""
    total_count = cumulative[-1][1] if cumulative else 0.0
    out, low, seen = [], 1, 0.0
    for le, count in cumulative:
        share = (count - seen) / total_count if total_count else 0.0
        high = "" if le == float("inf") else int(le)
        if share > 0:
            label = f"{low}+" if high == "" else (str(high) if low == high else f"{low}-{high}")
            out.append((label, share))
        seen = count
        if high != "":
            low = high + 1
    return out
