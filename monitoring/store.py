"""The prediction log: every served answer and every ground-truth label.

Two backends implement one interface (``PredictionLog``: write, feedback upsert, windows,
retention, migrations):
  * SQLite (``sqlite_log.SQLiteLog``), the embedded default: one file on one host, no server.
  * PostgreSQL (``postgres_log.PostgresLog``): several replicas on several hosts share one log,
    so feedback, drift, slices and retraining see all of their traffic.

``open_log(target)`` picks the backend from the target: a ``postgresql://`` URL or a file path.
Callers (the service, the reports, retraining) hold a ``PredictionLog`` and never know which.

Durability contract, both backends: ``write_batch`` (and ``write_rows``, its form for rows the
caller encoded) returns only once its records are durable
(committed; or, for a SQLite log opened with ``journal=True`` as the service's workers open it,
appended to the process's journal, which every read through this class indexes first:
journal.py), so a service that writes before it answers never answers a request it did not log.

Windows are read in bounded memory: ``frame(..., max_rows=N)`` samples the window in SQL (a
fixed hash of the row id, so the same rows every time) when it holds more than N rows, and
``window_stats`` counts the whole window in SQL; nothing reads a whole window into Python.

Imports json and numpy only (the SQL drivers are imported by their backends): the service
imports this on its request path. Reading into pandas (``frame``) imports pandas lazily.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterable, Mapping, Sequence, Union

import numpy as np

from .journal import (Indexer, JournalError, JournalWriter, delete_unheld, is_held, journals,
                      read_frames)
from .slices import OTHER, cap_values

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import pandas as pd

# 1: the first schema; 2: the raw input column; 3: the replica column; 4: the input reference
# (SQLite keeps inputs in append-only segment files, sqlite_log.py).
SCHEMA_VERSION = 4
# Labels feedback may use: one collection for all requests, or per model name.
ValidLabels = Union[Collection[str], Mapping[str, Collection[str]], None]
# The columns of a prediction row, in the order ``encode_row`` encodes them.
COLUMNS = ("request_id", "item", "ts", "model", "version", "predicted", "confidence", "ood",
           "ood_score", "latency_ms", "slices", "features", "embedding", "probabilities", "input",
           "replica", "input_ref")
_INPUT, _INPUT_REF = COLUMNS.index("input"), COLUMNS.index("input_ref")
_SLICES, _TS = COLUMNS.index("slices"), COLUMNS.index("ts")
# Window sampling: a row is in the sample when a multiplicative hash of its id falls below a
# threshold (Knuth's 2654435761; ids stay far below 2**33, so the product fits in 64 bits).
_HASH = "((p.id * 2654435761) % 4294967296)"
_HASH_RANGE = 4294967296


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
    replica: str = ""  # the server that answered (CLF_REPLICA), when several share the log


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


@dataclass(frozen=True)
class WindowStats:
    """Counts over a whole window, computed in SQL (``PredictionLog.window_stats``)."""

    rows: int
    labelled: int
    correct: int  # labelled rows whose prediction matched the label
    ood: int
    replicas: dict[str, int]  # rows per replica ("" when not tagged)


class UnknownRequestError(KeyError):
    """Feedback for request ids the log has never seen (HTTP 404)."""

    def __init__(self, request_ids: Sequence[str]) -> None:
        super().__init__(f"unknown request id(s): {', '.join(request_ids)}")
        self.request_ids = list(request_ids)


class FeedbackError(ValueError):
    """Feedback that does not fit its request (HTTP 400/422); the message says why."""


class LogOpenError(RuntimeError):
    """The prediction log cannot be opened (a bad path or URL, a server that does not answer,
    a schema newer than this code); the message names the target and the cause."""


def is_postgres(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def open_log(target: str | Path, **options: Any) -> "PredictionLog":
    """The prediction log at ``target``: a ``postgresql://`` URL or a SQLite file path.

    Options: ``max_slice_values`` (both), ``synchronous`` (SQLite), ``pool_size`` (PostgreSQL).
    """
    if is_postgres(target):
        from .postgres_log import PostgresLog

        return PostgresLog(str(target), **options)
    if isinstance(target, str) and "://" in target:
        raise LogOpenError(f"{target!r}: the prediction log is a file path or a postgresql:// URL")
    from .sqlite_log import SQLiteLog

    return SQLiteLog(target, **options)


def display_target(target: str | Path) -> str:
    """A target as it may be logged: a URL without its password."""
    text = str(target)
    if is_postgres(text) and "@" in text.split("//", 1)[1].split("/", 1)[0]:
        scheme, rest = text.split("//", 1)
        creds, host = rest.split("@", 1)
        return f"{scheme}//{creds.split(':', 1)[0]}:***@{host}"
    return text


class Transaction(AbstractContextManager):
    """What a backend's ``_transaction()`` yields: statements written with ``?`` placeholders."""

    def execute(self, sql: str, args: Sequence[object] = ()) -> Any: ...  # a DB-API cursor

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> Any: ...

    def insert_predictions(self, rows: list[list]) -> None: ...


class PredictionLog(ABC):
    """The interface both backends implement, with the SQL they share.

    One object per process, safe to call from several threads of that process. Statements are
    written once, in the SQL both engines accept, with ``?`` placeholders (the PostgreSQL
    backend translates them).
    """

    backend: str  # "sqlite" or "postgresql"
    target: str  # the path or URL (display_target: no password)
    max_slice_values: int

    def __init__(self, max_slice_values: int = 20) -> None:
        self.max_slice_values = max_slice_values
        self._admitted: dict[str, set[str]] = {}  # cache of slice_values, refreshed on a miss
        self._init_journals(None)

    # -- what a backend provides --------------------------------------------------------

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Transaction]:
        """One write transaction (committed on exit, rolled back on an exception)."""

    @abstractmethod
    def _read(self, sql: str, args: Sequence[object] = ()) -> list[tuple]:
        """Rows of one read-only statement."""

    @property
    @abstractmethod
    def schema_version(self) -> int: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def vacuum(self) -> None:
        """Give the space of deleted rows back (SQLite: rewrites the file; run it off-peak)."""

    def _lock_slice_admission(self, tx: Transaction) -> None:
        """Serialise admitting new slice values among writers (SQLite's write lock already
        does; PostgreSQL takes an advisory lock)."""

    def _stash_inputs(self, rows: list[list]) -> None:
        """Move the rows' raw inputs out of the rows before they are inserted, if the backend
        keeps them elsewhere (SQLite: segment files; the rows then carry ``input_ref``)."""

    def _load_input(self, data: bytes | None, ref: str | None) -> bytes | None:
        """A stored input from its row: the bytes, or read back through ``input_ref``."""
        return None if data is None else bytes(data)

    def _inputs_dropped(self) -> None:
        """Called after inputs were pruned: a backend with segment files frees unused ones."""

    def _prepare_write(self, timestamps: Iterable[float]) -> None:
        """Anything rows with these times need before they can be inserted (PostgreSQL: their
        days' partitions)."""

    # -- journals (journal.py): records made durable in local files, indexed into the log later.
    # SQLite: the path of every answer (``journal=True``); PostgreSQL: the spool an outage of the
    # server leaves (``spool_dir``). How far each file is indexed is a row of
    # ``journal_progress``, updated in the transaction that inserts its rows: exactly once.

    def _init_journals(self, folder: Path | None) -> None:
        self.journal_dir = folder  # None: this log has no journals
        self._indexed: dict[str, int] = {}  # journal -> offset indexed to, as last seen
        self._index_lock = threading.Lock()  # one catch-up at a time in this process
        self._catch_up_warned = False
        self._unreadable: set[str] = set()  # journals of another format: left alone
        self._journal: JournalWriter | None = None
        self._indexer: Indexer | None = None
        self.caught_up_at = -math.inf  # time.monotonic() at the start of the last catch-up done

    def _close_journals(self) -> None:
        """Stop the indexing thread and close this process's journal, then index (and delete)
        what it holds, now that no writer holds it."""
        if self._indexer is not None:
            self._indexer.stop()
            self._indexer = None
        if self._journal is not None:
            self._journal.close()
            self._journal = None
            self._catch_up_quietly()

    def _lock_journal_progress(self, tx: Transaction) -> None:
        """Serialise indexing journals among processes (SQLite's write lock already does;
        PostgreSQL takes an advisory lock: the rows of a journal are inserted once)."""

    def _prepare_journal_rows(self, tx: Transaction, rows: list[list]) -> None:
        """What journal rows need before they are inserted in ``tx`` (PostgreSQL: their days'
        partitions)."""

    def catch_up(self) -> int:
        """Index what the journals hold beyond what the table has; the rows indexed."""
        if self.journal_dir is None:
            return 0
        total, started = 0, time.monotonic()
        with self._index_lock:
            while True:
                found = journals(self.journal_dir)
                indexed, more = self._index_pending(found)
                total += indexed
                if not more:
                    break
            self._delete_finished(found)
        self.caught_up_at = started  # every journal was indexed as of this moment
        return total

    def _catch_up_quietly(self) -> None:
        """Catch up before a read; a failure (the file locked past the busy timeout, a read-only
        file) is logged and the read goes on without the journals' newest rows."""
        try:
            self.catch_up()
        except Exception as exc:  # noqa: BLE001 - the backend's errors, OSError, JournalError
            # Once per log object at warning level: a read-only reader would say it every read.
            level = logging.DEBUG if self._catch_up_warned else logging.WARNING
            self._catch_up_warned = True
            logger.log(level, "%s: could not index the journals before reading (rows answered "
                       "in the last moments may be missing): %s", self.target, exc)

    def _index_pending(self, found: list[tuple[str, int]]) -> tuple[int, bool]:
        pending = [(name, size) for name, size in found
                   if size > self._indexed.get(name, 0) and name not in self._unreadable]
        if not pending:
            return 0, False
        total, more, reached = 0, False, {}
        try:
            with self._transaction() as tx:
                self._lock_journal_progress(tx)
                progress = dict(tx.execute(
                    'SELECT name, "offset" FROM journal_progress').fetchall())
                for name, size in pending:
                    done = progress.get(name, 0)
                    reached[name] = done
                    if size <= done:
                        continue
                    path = self.journal_dir / name
                    try:
                        rows, end, stop = read_frames(path, done)
                    except FileNotFoundError:
                        continue
                    except JournalError as exc:
                        if name not in self._unreadable:  # said once; never deleted
                            logger.error("%s; left as it is", exc)
                            self._unreadable.add(name)
                        continue
                    if stop in ("partial", "bad") and not is_held(path):
                        logger.warning("%s: a torn frame at byte %d of %d (a write its killed "
                                       "writer never finished: no answer waited on it); "
                                       "skipped", path, end, size)
                        end = size
                    elif stop == "bad":
                        logger.warning("%s: a frame failed its check at byte %d; retried",
                                       path, end)
                    for row in rows:
                        if row[_SLICES] != "{}":
                            row[_SLICES] = self._capped_slices(tx, json.loads(row[_SLICES]))
                    if rows:
                        self._prepare_journal_rows(tx, rows)
                        tx.insert_predictions(rows)
                    if end != done:
                        tx.execute('INSERT INTO journal_progress (name, "offset") VALUES (?, ?)'
                                   ' ON CONFLICT (name) DO UPDATE SET "offset" = excluded."offset"',
                                   (name, end))
                    reached[name] = end
                    total += len(rows)
                    more = more or stop == "more"
        except BaseException:
            self._admitted = {}  # it may hold values of the rolled-back transaction
            raise
        self._indexed.update(reached)
        return total, more

    def _delete_finished(self, found: list[tuple[str, int]]) -> None:
        """Delete the journals that no writer holds and that are indexed to their end."""
        own = self._journal.current if self._journal is not None else None
        deleted = []
        for name, size in found:
            if name != own and self._indexed.get(name, -1) >= size:
                if delete_unheld(self.journal_dir / name, at_most=self._indexed[name]):
                    deleted.append((name,))
                    self._indexed.pop(name, None)
        if deleted:
            with self._transaction() as tx:
                tx.executemany("DELETE FROM journal_progress WHERE name = ?", deleted)

    # -- the shared interface ------------------------------------------------------------

    def __enter__(self) -> "PredictionLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write_batch(self, records: Sequence[PredictionRecord]) -> None:
        """Append records in ONE transaction; returns once it is committed (a journaled SQLite
        log: once appended to the journal, sqlite_log.py).

        Slice values past the first ``max_slice_values`` of their key are stored as ``other``.
        """
        self.write_rows([_row(r) for r in records])  # encode outside the transaction

    def write_rows(self, rows: list[list]) -> None:
        """``write_batch`` for rows already encoded (``encode_row``: slices not yet capped)."""
        if not rows:
            return
        self._prepare_write(row[_TS] for row in rows)
        self._stash_inputs(rows)  # before the commit: a committed row's input is written
        try:
            with self._transaction() as tx:
                for row in rows:
                    if row[_SLICES] != "{}":
                        row[_SLICES] = self._capped_slices(tx, json.loads(row[_SLICES]))
                tx.insert_predictions(rows)
        except BaseException:
            self._admitted = {}  # it may hold values of the rolled-back transaction
            raise

    def insert_rows(self, rows: Sequence[Sequence[object]]) -> None:
        """Append encoded rows (``COLUMNS`` order, slices already capped) in one transaction:
        the bulk path of migrations and the scale benchmark; the service uses ``write_rows``."""
        if rows:
            rows = [list(r) + [None] * (len(COLUMNS) - len(r)) for r in rows]
            self._prepare_write(r[2] for r in rows)
            self._stash_inputs(rows)
            with self._transaction() as tx:
                tx.insert_predictions(rows)

    def _capped_slices(self, tx: Transaction, slices: Mapping[str, str]) -> str:
        """Slices as stored (JSON), folding values over the cap; runs inside the transaction."""
        locked = False
        for key, value in slices.items():
            seen = self._admitted.get(key)
            if value != OTHER and (seen is None or (value not in seen
                                                    and len(seen) < self.max_slice_values)):
                # A miss: another writer may have admitted values since; read them again.
                if not locked:
                    self._lock_slice_admission(tx)
                    locked = True
                self._admitted[key] = {v for (v,) in tx.execute(
                    "SELECT value FROM slice_values WHERE key = ?", (key,)).fetchall()}
        capped, new = cap_values(slices, self._admitted, self.max_slice_values)
        if new:
            tx.executemany("INSERT INTO slice_values (key, value) VALUES (?, ?)"
                           " ON CONFLICT DO NOTHING", new)
        return compact_json(capped)

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
        with self._transaction() as tx:
            return self._apply_feedback(tx, feedback, valid_labels)

    def _apply_feedback(self, tx: Transaction, feedback: Mapping[str, Sequence[str] | str],
                        valid_labels: ValidLabels) -> list[FeedbackResult]:
        found = {rid: (int(n), model) for rid, n, model in tx.execute(
            f"SELECT request_id, MAX(item) + 1, MAX(model) FROM predictions WHERE request_id IN "
            f"({','.join('?' * len(feedback))}) GROUP BY request_id", list(feedback)).fetchall()}
        unknown = [rid for rid in feedback if rid not in found]
        if unknown:
            raise UnknownRequestError(unknown)
        results, now = [], time.time()
        for rid, given in feedback.items():
            items, model = found[rid]
            valid = valid_labels.get(model) if isinstance(valid_labels, Mapping) else valid_labels
            labels = check_labels(rid, given, items, valid)
            stored = dict(tx.execute(
                "SELECT item, label FROM feedback WHERE request_id = ?", (rid,)).fetchall())
            changes = [(rid, i, lab, now) for i, lab in enumerate(labels) if stored.get(i) != lab]
            if changes:
                tx.executemany(
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
            " p.input_ref, p.slices, p.features, f.ts FROM predictions p JOIN feedback f ON"
            " f.request_id = p.request_id AND f.item = p.item WHERE p.model = ? AND p.ts >= ?"
            " AND p.ts < ? AND (p.input IS NOT NULL OR p.input_ref IS NOT NULL)"
            " ORDER BY p.ts, p.id", (model, since, _finite(until)))
        out = []
        for (rid, item, ts, version, label, predicted, data, ref, slices, features,
             feedback_ts) in rows:
            data = self._load_input(data, ref)
            if data is not None:  # None: its segment is gone (pruned meanwhile)
                out.append(LabelledInput(rid, int(item), float(ts), version, label, predicted,
                                         data, json.loads(slices), json.loads(features),
                                         float(feedback_ts)))
        return out

    def inputs(self, request_id: str) -> list[bytes | None]:
        """The raw inputs logged for one request, in item order (None where not kept)."""
        return [self._load_input(data, ref) for data, ref in self._read(
            "SELECT input, input_ref FROM predictions WHERE request_id = ? ORDER BY item",
            (request_id,))]

    def prune(self, before: float, inputs_only: bool = False, chunk: int = 5000) -> int:
        """Retention: delete predictions (and their feedback) logged before ``before`` (unix
        seconds), or with ``inputs_only`` just drop their raw inputs, the bulk of the log.
        Works in transactions of ``chunk`` rows so the serving workers never wait long for a
        lock; returns the rows affected. SQLite's file shrinks only after ``vacuum()``."""
        done = 0
        while True:
            with self._transaction() as tx:
                if inputs_only:
                    n = tx.execute(
                        "UPDATE predictions SET input = NULL, input_ref = NULL WHERE id IN"
                        " (SELECT id FROM predictions WHERE ts < ? AND (input IS NOT NULL OR"
                        " input_ref IS NOT NULL) LIMIT ?)", (before, chunk)).rowcount
                else:
                    ids = [i for (i,) in tx.execute(
                        "SELECT id FROM predictions WHERE ts < ? LIMIT ?",
                        (before, chunk)).fetchall()]
                    n = 0
                    if ids:
                        marks = ",".join("?" * len(ids))
                        tx.execute(
                            "DELETE FROM feedback WHERE request_id IN (SELECT request_id FROM"
                            f" predictions WHERE id IN ({marks}))", ids)
                        n = tx.execute(f"DELETE FROM predictions WHERE id IN ({marks})",
                                       ids).rowcount
            done += n
            if n < chunk:
                self._inputs_dropped()
                return done

    def count(self, model: str | None = None) -> int:
        sql, args = "SELECT COUNT(*) FROM predictions", ()
        if model is not None:
            sql, args = sql + " WHERE model = ?", (model,)
        return int(self._read(sql, args)[0][0])

    def versions(self, model: str, since: float, until: float) -> list[tuple[str, int]]:
        """Model versions logged in a window with their row counts, most rows first."""
        return [(v, int(n)) for v, n in self._read(
            "SELECT version, COUNT(*) AS n FROM predictions WHERE model = ? AND ts >= ? AND "
            "ts < ? GROUP BY version ORDER BY n DESC, version", (model, since, _finite(until)))]

    def window_stats(self, model: str, since: float = 0.0, until: float = math.inf,
                     version: str | None = None) -> WindowStats:
        """Row, label, accuracy, OOD and per-replica counts of a whole window, in SQL."""
        where, args = _window(model, since, until, version)
        rows, labelled, correct, ood = self._read(
            "SELECT COUNT(*), COUNT(f.label), SUM(CASE WHEN f.label = p.predicted THEN 1 ELSE 0"
            " END), SUM(p.ood) FROM predictions p LEFT JOIN feedback f ON"
            f" f.request_id = p.request_id AND f.item = p.item WHERE {where}", args)[0]
        replicas = {r: int(n) for r, n in self._read(
            f"SELECT p.replica, COUNT(*) FROM predictions p WHERE {where} GROUP BY p.replica"
            " ORDER BY 1", args)}
        return WindowStats(int(rows), int(labelled), int(correct or 0), int(ood or 0), replicas)

    def frame(self, model: str, since: float = 0.0, until: float = math.inf,
              version: str | None = None, probabilities: bool = False,
              max_rows: int | None = None, embeddings: bool = True) -> "pd.DataFrame":
        """Logged predictions of a model in ``[since, until)`` (unix seconds) as a frame.

        Columns: request_id, item, ts, model, version, predicted, confidence, ood, ood_score,
        latency_ms, label (from feedback; missing when none), replica, one column per feature,
        one ``tag.<key>`` column per slice key, ``emb_<i>`` for the embedding and, if asked,
        ``prob_<i>`` for the probabilities.

        ``embeddings=False`` leaves the ``emb_<i>`` columns out (the slice report needs none:
        a quarter of the memory per row).

        ``max_rows``: when the window holds more rows, about that many are read, chosen in SQL
        by a fixed hash of the row id (a uniform sample, the same rows on every call), so memory
        stays bounded whatever the window. ``frame.attrs`` says ``rows_in_window`` and
        ``sampled``.
        """
        where, args = _window(model, since, until, version)
        total = None
        if max_rows is not None:
            total = int(self._read(f"SELECT COUNT(*) FROM predictions p WHERE {where}",
                                   args)[0][0])
            if total > max_rows:
                where += f" AND {_HASH} < ?"
                args = args + [int(_HASH_RANGE * max_rows / total)]
        rows = self._read(
            "SELECT p.request_id, p.item, p.ts, p.model, p.version, p.predicted, p.confidence,"
            " p.ood, p.ood_score, p.latency_ms, f.label, p.features, p.slices,"
            f" {'p.embedding' if embeddings else 'NULL'},"
            " p.probabilities, p.replica FROM predictions p LEFT JOIN feedback f ON"
            f" f.request_id = p.request_id AND f.item = p.item WHERE {where}"
            " ORDER BY p.ts, p.id", args)
        from .frames import rows_to_frame  # pandas: only for reading

        frame = rows_to_frame(rows, probabilities)
        frame.attrs["rows_in_window"] = len(frame) if total is None else total
        frame.attrs["sampled"] = total is not None and total > max_rows
        return frame

    def scan(self, after_id: int, limit: int) -> list[tuple]:
        """Up to ``limit`` whole prediction rows with ids above ``after_id``, in id order:
        ``(id, *COLUMNS)``, each input as its bytes (``input_ref`` resolved). What a migration
        copies."""
        rows = []
        for row in self._read(f"SELECT id, {', '.join(COLUMNS)} FROM predictions WHERE id > ?"
                              " ORDER BY id LIMIT ?", (after_id, limit)):
            row = list(row)
            row[1 + _INPUT] = self._load_input(row[1 + _INPUT], row[1 + _INPUT_REF])
            row[1 + _INPUT_REF] = None
            rows.append(tuple(row))
        return rows

    def feedback_rows(self, after: tuple[str, int], limit: int) -> list[tuple]:
        """Up to ``limit`` feedback rows ``(request_id, item, label, ts)`` after the key
        ``after``, in key order."""
        return self._read(
            "SELECT request_id, item, label, ts FROM feedback WHERE request_id > ? OR"
            " (request_id = ? AND item > ?) ORDER BY request_id, item LIMIT ?",
            (after[0], after[0], after[1], limit))


# One encoder: json.dumps with non-default arguments builds a new JSONEncoder on every call (a
# third of what encoding a row cost).
compact_json = json.JSONEncoder(separators=(",", ":")).encode


def _finite(until: float) -> float:
    return until if math.isfinite(until) else 1e300


def _window(model: str, since: float, until: float, version: str | None
            ) -> tuple[str, list[object]]:
    where, args = "p.model = ? AND p.ts >= ? AND p.ts < ?", [model, since, _finite(until)]
    if version is not None:
        where, args = where + " AND p.version = ?", args + [version]
    return where, args


def _row(r: PredictionRecord) -> list:
    return encode_row(r.request_id, r.item, r.ts, r.model, r.version, r.predicted, r.confidence,
                      r.ood, r.ood_score, r.latency_ms,
                      compact_json(dict(r.slices)) if r.slices else "{}", r.features, r.embedding,
                      r.probabilities, r.input, r.replica)


def encode_row(request_id: str, item: int, ts: float, model: str, version: str, predicted: str,
               confidence: float, ood: bool, ood_score: float | None, latency_ms: float | None,
               slices: str, features: Mapping[str, float] | None, embedding: np.ndarray | None,
               probabilities: np.ndarray | None, input: bytes | None, replica: str) -> list:
    """One prediction row as ``write_rows`` takes it, in ``COLUMNS`` order: ``slices`` already
    JSON (``"{}"`` for none; capped when written), ``input_ref`` None. What a ``PredictionRecord``
    holds, without building one: the service encodes its answers' rows straight from them."""
    return [request_id, int(item), float(ts), model, version, predicted, float(confidence),
            int(bool(ood)), None if ood_score is None else float(ood_score),
            None if latency_ms is None else float(latency_ms), slices,
            features_json(features) if features else "{}",
            _blob(embedding), _blob(probabilities), input, replica, None]


def features_json(features: Mapping[str, float]) -> str:
    """``features`` as compact JSON, values as floats: what ``json`` writes, a little faster
    (a format string per key set, cached; this runs once per logged answer: 9.7 against 11.4 us
    for 20 features alone, most of either the floats' ``repr``). Non-finite values go through
    ``json`` (NaN, Infinity)."""
    keys = tuple(features)
    template = _FEATURE_TEMPLATES.get(keys)
    if template is None:
        template = "{" + ",".join(json.dumps(k).replace("%", "%%") + ":%r" for k in keys) + "}"
        if len(_FEATURE_TEMPLATES) < 64:  # the models' feature sets: a handful
            _FEATURE_TEMPLATES[keys] = template
    values = tuple(map(float, features.values()))
    if not math.isfinite(sum(values)):
        return compact_json(dict(zip(keys, values)))
    return template % values


_FEATURE_TEMPLATES: dict[tuple[str, ...], str] = {}


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
