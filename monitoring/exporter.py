"""The latest drift scores as Prometheus gauges.

``python -m monitoring drift`` writes its verdict to ``drift_latest.json`` (next to the
prediction log by default; one entry per model, replaced atomically), or, for a PostgreSQL
log, to its ``clf_reports`` table, which every replica reads. Two ways to expose it:
  * ``DriftCollector(path)``: a custom collector that reads the file at every scrape. Register it
    in a registry served over HTTP: the standalone exporter (``python -m monitoring exporter``)
    does exactly that, on 127.0.0.1.
  * ``DriftGauges``: ordinary gauges in ``mostrecent`` multiprocess mode, refreshed from the file
    by the caller (e.g. a worker's periodic task). This is the way into BentoML's own
    ``/metrics`` when it runs several workers: there ``/metrics`` is built from the workers'
    multiprocess files only, and a custom collector registered inside a worker never shows.

Series: ``clf_drift_score{model,feature}`` (the test's score: a p-value or a distance, see
``clf_drift_threshold``), ``clf_drift_column_drifted{model,feature}`` (0/1),
``clf_drift_detected{model}`` (0/1), ``clf_drift_share{model}`` (share of columns drifted),
``clf_drift_last_run_timestamp_seconds{model}`` (alert when it grows stale) and
``clf_estimated_accuracy{model}`` (the window's accuracy estimated without labels from calibrated
confidence, ``performance.py``; NaN while no report has one, so a rule comparing it is false).

The per-model series of the models a caller names (the service: the models it serves) exist
before any report has run, at 0 (last run at timestamp 0), so "no drift report for a day" is an
alert on a series that is there from the start, not on one that is missing (the estimated
accuracy among them, at NaN rather than 0: 0 would read as "every answer wrong").
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

STATE_FILE = "drift_latest.json"
NAMESPACE = "clf"

_PER_FEATURE = (
    ("drift_score", "Drift score of a column in the latest drift report (p-value or distance).",
     "score"),
    ("drift_threshold", "Threshold the drift score was compared with.", "threshold"),
    ("drift_column_drifted", "1 if the column drifted in the latest drift report.", "drifted"),
)
_PER_MODEL = (
    ("drift_detected", "1 if the latest drift report found the data drifted.", "dataset_drift"),
    ("drift_share", "Share of tested columns that drifted in the latest drift report.",
     "share_drifted"),
    ("drift_last_run_timestamp_seconds", "When the latest drift report ran (unix seconds).",
     "created"),
)
# Not a plain number of the entry, and NaN (not 0) until a report has one.
ESTIMATED_ACCURACY = "estimated_accuracy"
_ESTIMATE_HELP = ("Accuracy of the latest drift report's window estimated without labels (top-1 "
                  "confidence calibrated on the reference profile; NaN until a report has one).")


def state_path_for(log_path: str | Path) -> Path | str:
    """Where the drift command writes, and exporters read, the latest scores for a log: the
    file beside a SQLite log; for a PostgreSQL log the database itself (table ``clf_reports``),
    so every replica, on any host, reads the same report."""
    if _is_url(log_path):
        return str(log_path)
    return Path(log_path).resolve().parent / STATE_FILE


def _is_url(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def read_state(path: str | Path) -> dict[str, Any]:
    """``{"models": {name: entry}}``; an absent file is an empty state (no report ran yet)."""
    if _is_url(path):
        return {"models": _pg_state(path)}
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {"models": {}}


def write_state(path: str | Path, model: str, entry: dict[str, Any]) -> None:
    """Replace one model's entry, atomically, under a lock (two reports may finish at once)."""
    if _is_url(path):
        return _pg_state(path, (model, entry))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_suffix(".lock")):
        state = read_state(path)
        state.setdefault("models", {})[model] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".drift-", suffix=".json")
        with os.fdopen(fd, "w") as out:
            json.dump(state, out, indent=1)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def _pg_state(url: str, put: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Read the entries of ``clf_reports`` (created by the PostgreSQL prediction log), or
    upsert one (``put``): one short connection per call (a worker refreshes every ~15 s)."""
    import psycopg

    with psycopg.connect(url, connect_timeout=10) as conn:
        if put is not None:
            conn.execute("INSERT INTO clf_reports (model, entry, updated) VALUES (%s, %s, %s)"
                         " ON CONFLICT (model) DO UPDATE SET entry = excluded.entry,"
                         " updated = excluded.updated",
                         (put[0], json.dumps(put[1], default=float), time.time()))
            return {}
        rows = conn.execute("SELECT model, entry FROM clf_reports").fetchall()
    return {model: json.loads(entry) for model, entry in rows}


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def metric_samples(state: dict[str, Any], models: Iterable[str] = ()
                   ) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Metric name -> [(labels, value)] for a state (pure; both exposures use it). ``models``
    without an entry in the state (no report yet) get their per-model series at 0."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {
        f"{NAMESPACE}_{name}": [] for name, _, _ in _PER_FEATURE + _PER_MODEL}
    out[f"{NAMESPACE}_{ESTIMATED_ACCURACY}"] = []
    entries = dict(state.get("models", {}))
    for model in models:
        entries.setdefault(model, {key: 0.0 for _, _, key in _PER_MODEL})
    for model, entry in sorted(entries.items()):
        for name, _, key in _PER_MODEL:
            out[f"{NAMESPACE}_{name}"].append(({"model": model}, float(entry[key])))
        out[f"{NAMESPACE}_{ESTIMATED_ACCURACY}"].append(
            ({"model": model}, estimated_accuracy(entry)))
        for row in entry.get("rows", []):
            labels = {"model": model, "feature": row["feature"]}
            for name, _, key in _PER_FEATURE:
                out[f"{NAMESPACE}_{name}"].append((labels, float(row[key])))
    return out


def estimated_accuracy(entry: dict[str, Any]) -> float:
    """The entry's estimated accuracy (``performance.performance_report``'s ``value``, or a bare
    number); NaN when the report had none (a reference profile without labels, an older
    report)."""
    value = entry.get(ESTIMATED_ACCURACY)
    if isinstance(value, dict):
        value = value.get("value")
    return math.nan if value is None else float(value)


def _help(name: str) -> str:
    if name == f"{NAMESPACE}_{ESTIMATED_ACCURACY}":
        return _ESTIMATE_HELP
    return next(h for n, h, _ in _PER_FEATURE + _PER_MODEL if f"{NAMESPACE}_{n}" == name)


def _label_names(name: str) -> list[str]:
    per_feature = {f"{NAMESPACE}_{n}" for n, _, _ in _PER_FEATURE}
    return ["model", "feature"] if name in per_feature else ["model"]


class DriftCollector:
    """prometheus_client custom collector over a ``drift_latest.json`` (read at each scrape)."""

    def __init__(self, path: str | Path, models: Iterable[str] = ()) -> None:
        self.path = path if _is_url(path) else Path(path)
        self.models = tuple(models)  # exposed at 0 until their first report

    def describe(self) -> list:
        return list(self._families({}))  # names only: no file read at registration

    def collect(self) -> list:
        return list(self._families(read_state(self.path), self.models))

    @staticmethod
    def _families(state: dict[str, Any], models: Iterable[str] = ()) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        for name, samples in metric_samples(state, models).items():
            family = GaugeMetricFamily(name, _help(name), labels=_label_names(name))
            for labels, value in samples:
                family.add_metric([labels[k] for k in _label_names(name)], value)
            yield family


class DriftGauges:
    """The same series as ordinary gauges, for a multiprocess ``/metrics`` (BentoML workers)."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Gauge

        self._gauges = {
            name: Gauge(name, _help(name), _label_names(name), multiprocess_mode="mostrecent",
                        registry=registry if registry is not None else REGISTRY)
            for name in metric_samples({})}

    def refresh(self, path: str | Path, models: Iterable[str] = ()) -> None:
        """Set every gauge from the state file (call it periodically, e.g. every 30 s);
        ``models`` with no report yet get their per-model gauges at 0."""
        for name, samples in metric_samples(read_state(path), models).items():
            gauge = self._gauges[name]
            for labels, value in samples:
                gauge.labels(**labels).set(value)


def serve(path: str | Path, port: int, host: str = "127.0.0.1", models: Iterable[str] = ()
          ) -> Any:
    """Start the standalone exporter's HTTP server in a thread; returns the server."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(DriftCollector(path, models))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
