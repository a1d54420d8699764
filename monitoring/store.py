"""The prediction log: every served answer and every ground-truth label, in one SQLite file.

SQLite needs no server, and in WAL mode readers (the reports) never block the writers (the
service's workers). Durability contract: ``write_batch`` returns only after its transaction
committed, so a service that writes before it answers never answers a request it did not log.
With ``synchronous=NORMAL`` a commit is appended to the WAL file with ``write()`` but not
fsynced: it survives the process being killed (SIGKILL, OOM) because the data is in the
kernel's page cache, and can only be lost if the whole machine goes down before the next
checkpoint. ``synchronous="FULL"`` fsyncs every commit for power-loss durability, at a cost.

Imports sqlite3, json and numpy only: the service imports this on its request path. Reading
into pandas (``frame``) imports pandas lazily.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Collection, Mapping, Sequence, Union

import numpy as np

from .slices import OTHER, cap_values

if TYPE_CHECKING:
    import pandas as pd

SCHEMA_VERSION = 2
# Labels feedback may use: one collection for all requests, or per model name.
ValidLabels = Union[Collection[str], Mapping[str, Collection[str]], None]
BUSY_TIMEOUT_MS = 10_000  # several workers share the file; a writer waits this long for the lock

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    item INTEGER NOT NULL,           -- index of the input within its request
    ts REAL NOT NULL,                -- unix seconds
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    predicted TEXT NOT NULL,
    confidence REAL NOT NULL,
    ood INTEGER NOT NULL DEFAULT 0,
    ood_score REAL,
    latency_ms REAL,
    slices TEXT NOT NULL DEFAULT '{}',  -- JSON object: slice key -> value
    features TEXT NOT NULL DEFAULT '{}',  -- JSON object: monitored input features
    embedding BLOB,                  -- float32 little-endian
    probabilities BLOB,              -- float32 little-endian, in the model's label order
    input BLOB                       -- the raw input (image file bytes, UTF-8 text), if kept
);
CREATE INDEX IF NOT EXISTS predictions_model_ts ON predictions (model, ts);
CREATE INDEX IF NOT EXISTS predictions_request ON predictions (request_id, item);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT NOT NULL,
    item INTEGER NOT NULL,
    label TEXT NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (request_id, item)
);
-- The values each slice key has admitted, shared by every worker (see slices.py).
CREATE TABLE IF NOT EXISTS slice_values (
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (key, value)
);
"""


@dataclass(frozen=True)
class PredictionRecord:
    """One served answer (one input of a request)."""

    request_id: str
    item: int
    ts: float
    model: str
    version: str
    predicted: str
    confidence: float
    probabilities: np.ndarray
    embedding: np.ndarray
    features: Mapping[str, float]
    slices: Mapping[str, str] = field(default_factory=dict)
    latency_ms: float | None = None
    ood: bool = False
    ood_score: float | None = None
    input: bytes | None = None  # raw image bytes or UTF-8 text, for retraining on traffic


@dataclass(frozen=True)
class LabelledInput:
    """One logged input with its ground-truth label (``PredictionLog.labelled_inputs``)."""

    request_id: str
    item: int
    ts: float
    version: str
    label: str
    predicted: str
    input: bytes
    slices: dict[str, str]
    features: dict[str, float]
    feedback_ts: float = math.nan  # when its label was stored (or last corrected), unix seconds


@dataclass(frozen=True)
class FeedbackResult:
    request_id: str
    items: int  # labels received
    created: int  # labels stored for the first time
    updated: int  # labels that replaced a different earlier label (a correction)
    unchanged: int  # repeats of a stored label: nothing written


class UnknownRequestError(KeyError):
    """Feedback for request ids the log has never seen (HTTP 404)."""

    def __init__(self, request_ids: Sequence[str]) -> None:
        super().__init__(f"unknown request id(s): {', '.join(request_ids)}")
        self.request_ids = list(request_ids)


class FeedbackError(ValueError):
    """Feedback that does not fit its request (HTTP 400/422); the message says why."""


class PredictionLog:
    """One connection per process; safe to call from several threads of that process."""

    def __init__(self, path: str | Path, synchronous: str = "NORMAL",
                 max_slice_values: int = 20) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be NORMAL or FULL")
        self.path = Path(path)
        self.max_slice_values = max_slice_values
        self._admitted: dict[str, set[str]] = {}  # cache of slice_values, refreshed on a miss
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so one call = one transaction.
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
        self._lock = threading.Lock()
        self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._enable_wal()
        self._db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        self._migrate()

    def _enable_wal(self) -> None:
        # Switching a new file to WAL needs an exclusive lock and, unlike a write, does not wait
        # on busy_timeout: workers starting together on a fresh file get "database is locked".
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); "
                               "is it on a network file system?")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "PredictionLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # two workers starting at once: one creates
            try:
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise RuntimeError(f"{self.path} has schema {version}; this code knows "
                                       f"{SCHEMA_VERSION}: upgrade the project")
                if version == 0:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                elif version == 1:  # 1 -> 2: the raw input column
                    self._db.execute("ALTER TABLE predictions ADD COLUMN input BLOB")
                if version < SCHEMA_VERSION:
                    self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: Sequence[object] = ()) -> list[tuple]:
        with self._lock:  # one connection, shared by this process's threads
            return self._db.execute(sql, args).fetchall()

    @property
    def schema_version(self) -> int:
        return int(self._read("PRAGMA user_version")[0][0])

    def write_batch(self, records: Sequence[PredictionRecord]) -> None:
        """Append records in ONE transaction; returns once it is committed.

        Slice values past the first ``max_slice_values`` of their key are stored as ``other``.
        """
        if not records:
            return
        rows = [_row(r) for r in records]  # encode outside the lock: other threads keep writing
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for i, record in enumerate(records):
                    if record.slices:
                        rows[i][10] = self._capped_slices(record.slices)
                self._db.executemany(_INSERT, rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._admitted = {}  # it may hold values of the rolled-back transaction
                self._db.execute("ROLLBACK")
                raise

    def _capped_slices(self, slices: Mapping[str, str]) -> str:
        """Slices as stored (JSON), folding values over the cap; runs inside the transaction."""
        for key, value in slices.items():
            seen = self._admitted.get(key)
            if value != OTHER and (seen is None or (value not in seen
                                                    and len(seen) < self.max_slice_values)):
                # A miss: another worker may have admitted values since; read them again.
                self._admitted[key] = {v for (v,) in self._db.execute(
                    "SELECT value FROM slice_values WHERE key = ?", (key,))}
        capped, new = cap_values(slices, self._admitted, self.max_slice_values)
        if new:
            self._db.executemany("INSERT OR IGNORE INTO slice_values (key, value) VALUES (?, ?)",
                                 new)
        return json.dumps(capped, separators=(",", ":"))

    def slice_values(self) -> dict[str, list[str]]:
        """The values each slice key has admitted so far."""
        out: dict[str, list[str]] = {}
        for key, value in self._read("SELECT key, value FROM slice_values ORDER BY 1, 2"):
            out.setdefault(key, []).append(value)
        return out

    def add_feedback(self, request_id: str, labels: Sequence[str] | str,
                     valid_labels: ValidLabels = None) -> FeedbackResult:
        """Ground truth for one request: a list with one label per input, in order, or a string
        for a one-input request. Repeats are idempotent; a different label replaces the old."""
        return self.add_feedback_many({request_id: labels}, valid_labels)[0]

    def add_feedback_many(self, feedback: Mapping[str, Sequence[str] | str],
                          valid_labels: ValidLabels = None) -> list[FeedbackResult]:
        """Feedback for several requests, all or nothing: an unknown id or a bad label list
        raises before anything is written. ``valid_labels``: one collection for every request,
        or a mapping model name -> its labels (each request checked against its own model's)."""
        if not feedback:
            return []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                results = self._apply_feedback(feedback, valid_labels)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return results

    def _apply_feedback(self, feedback: Mapping[str, Sequence[str] | str],
                        valid_labels: ValidLabels) -> list[FeedbackResult]:
        found = {rid: (n, model) for rid, n, model in self._db.execute(
            f"SELECT request_id, MAX(item) + 1, MAX(model) FROM predictions WHERE request_id IN "
            f"({','.join('?' * len(feedback))}) GROUP BY request_id", list(feedback))}
        unknown = [rid for rid in feedback if rid not in found]
        if unknown:
            raise UnknownRequestError(unknown)
        results, now = [], time.time()
        for rid, given in feedback.items():
            items, model = found[rid]
            valid = valid_labels.get(model) if isinstance(valid_labels, Mapping) else valid_labels
            labels = check_labels(rid, given, items, valid)
            stored = dict(self._db.execute(
                "SELECT item, label FROM feedback WHERE request_id = ?", (rid,)))
            changes = [(rid, i, lab, now) for i, lab in enumerate(labels) if stored.get(i) != lab]
            self._db.executemany(
                "INSERT INTO feedback (request_id, item, label, ts) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (request_id, item) DO UPDATE SET label = excluded.label, "
                "ts = excluded.ts", changes)
            updated = sum(1 for _, i, _, _ in changes if i in stored)
            results.append(FeedbackResult(rid, len(labels), len(changes) - updated, updated,
                                          len(labels) - len(changes)))
        return results

    def labelled_inputs(self, model: str, since: float = 0.0, until: float = math.inf
                        ) -> list[LabelledInput]:
        """Logged inputs of ``model`` that have a ground-truth label and stored bytes, oldest
        first: the production traffic a retraining may learn from."""
        rows = self._read(
            "SELECT p.request_id, p.item, p.ts, p.version, f.label, p.predicted, p.input,"
            " p.slices, p.features, f.ts FROM predictions p JOIN feedback f ON"
            " f.request_id = p.request_id AND f.item = p.item"
            " WHERE p.model = ? AND p.ts >= ? AND p.ts < ? AND p.input IS NOT NULL"
            " ORDER BY p.ts, p.id", (model, since, until if math.isfinite(until) else 1e300))
        return [LabelledInput(rid, int(item), float(ts), version, label, predicted, bytes(data),
                              json.loads(slices), json.loads(features), float(feedback_ts))
                for rid, item, ts, version, label, predicted, data, slices, features, feedback_ts
                in rows]

    def prune(self, before: float, inputs_only: bool = False, chunk: int = 5000) -> int:
        """Retention: delete predictions (and their feedback) logged before ``before`` (unix
        seconds), or with ``inputs_only`` just drop their raw inputs, the bulk of the file.
        Works in transactions of ``chunk`` rows so the serving workers never wait long for the
        write lock; returns the rows affected. The file shrinks only after ``vacuum()``."""
        done = 0
        while True:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    if inputs_only:
                        n = self._db.execute(
                            "UPDATE predictions SET input = NULL WHERE id IN (SELECT id FROM"
                            " predictions WHERE ts < ? AND input IS NOT NULL LIMIT ?)",
                            (before, chunk)).rowcount
                    else:
                        ids = [i for (i,) in self._db.execute(
                            "SELECT id FROM predictions WHERE ts < ? LIMIT ?", (before, chunk))]
                        marks = ",".join("?" * len(ids))
                        if ids:
                            self._db.execute(
                                "DELETE FROM feedback WHERE request_id IN (SELECT request_id FROM"
                                f" predictions WHERE id IN ({marks}))", ids)
                        n = self._db.execute(f"DELETE FROM predictions WHERE id IN ({marks})",
                                             ids).rowcount if ids else 0
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            done += n
            if n < chunk:
                return done

    def vacuum(self) -> None:
        """Give freed pages back to the file system (rewrites the file: run it off-peak)."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.execute("VACUUM")

    def count(self, model: str | None = None) -> int:
        sql, args = "SELECT COUNT(*) FROM predictions", ()
        if model is not None:
            sql, args = sql + " WHERE model = ?", (model,)
        return int(self._read(sql, args)[0][0])

    def versions(self, model: str, since: float, until: float) -> list[tuple[str, int]]:
        """Model versions logged in a window with their row counts, most rows first."""
        return [(v, int(n)) for v, n in self._read(
            "SELECT version, COUNT(*) AS n FROM predictions WHERE model = ? AND ts >= ? AND "
            "ts < ? GROUP BY version ORDER BY n DESC", (model, since, until))]

    def frame(self, model: str, since: float = 0.0, until: float = math.inf,
              version: str | None = None, probabilities: bool = False) -> "pd.DataFrame":
        """Logged predictions of a model in ``[since, until)`` (unix seconds) as a frame.

        Columns: request_id, item, ts, model, version, predicted, confidence, ood, ood_score,
        latency_ms, label (from feedback; missing when none), one column per feature, one
        ``tag.<key>`` column per slice key, ``emb_<i>`` for the embedding and, if asked,
        ``prob_<i>`` for the probabilities.
        """
        sql = ("SELECT p.request_id, p.item, p.ts, p.model, p.version, p.predicted, p.confidence,"
               " p.ood, p.ood_score, p.latency_ms, f.label, p.features, p.slices, p.embedding,"
               " p.probabilities FROM predictions p LEFT JOIN feedback f ON"
               " f.request_id = p.request_id AND f.item = p.item"
               " WHERE p.model = ? AND p.ts >= ? AND p.ts < ?")
        args: list[object] = [model, since, until if math.isfinite(until) else 1e300]
        if version is not None:
            sql, args = sql + " AND p.version = ?", args + [version]
        rows = self._read(sql + " ORDER BY p.ts, p.id", args)
        from .frames import rows_to_frame  # pandas: only for reading

        return rows_to_frame(rows, probabilities)


_INSERT = ("INSERT INTO predictions (request_id, item, ts, model, version, predicted, confidence,"
           " ood, ood_score, latency_ms, slices, features, embedding, probabilities, input)"
           " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def _row(r: PredictionRecord) -> list:
    return [r.request_id, int(r.item), float(r.ts), r.model, r.version, r.predicted,
            float(r.confidence), int(bool(r.ood)),
            None if r.ood_score is None else float(r.ood_score),
            None if r.latency_ms is None else float(r.latency_ms),
            json.dumps(dict(r.slices), separators=(",", ":")),
            json.dumps({k: float(v) for k, v in r.features.items()}, separators=(",", ":")),
            _blob(r.embedding), _blob(r.probabilities), r.input]


def _blob(array: np.ndarray | None) -> bytes | None:
    return None if array is None else np.ascontiguousarray(array, dtype="<f4").tobytes()


def check_labels(request_id: str, given: Sequence[str] | str, items: int,
                 valid_labels: Collection[str] | None) -> list[str]:
    """The feedback labels of one request as a list, or FeedbackError saying what is wrong."""
    labels = [given] if isinstance(given, str) else list(given)
    if len(labels) != items:
        raise FeedbackError(f"request {request_id} had {items} input(s); got {len(labels)} "
                            f"label(s): send one label per input, in order")
    bad = [lab for lab in labels if not isinstance(lab, str) or
           (valid_labels is not None and lab not in valid_labels)]
    if bad:
        raise FeedbackError(f"request {request_id}: unknown label(s) {bad}"
                            + (f"; the model's labels are {sorted(valid_labels)}"
                               if valid_labels is not None else ""))
    return labels
