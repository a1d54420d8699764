"""The prediction log in one SQLite file: the embedded default, for one host.

SQLite needs no server, and in WAL mode readers (the reports) never block the writers (the
service's workers). With ``synchronous=NORMAL`` a commit is appended to the WAL file with
``write()`` but not fsynced: it survives the process being killed (SIGKILL, OOM) because the data
is in the kernel's page cache, and can only be lost if the whole machine goes down before the
next checkpoint. ``synchronous="FULL"`` fsyncs every commit for power-loss durability, at a cost.

Raw inputs (a 12 KB PNG per image answer, ten times the rest of a row) do not go through SQLite:
each writing process appends them to a segment file of its own in ``<log>.inputs/`` (one
``writev`` per batch, before the transaction commits; fsynced first under ``FULL``) and the row
keeps ``input_ref`` = ``segment@offset+length``. SQLite then writes a 1 KB row twice (WAL, then
checkpoint) instead of 13 KB, checkpoints a tenth as often, and holds the write lock that the
workers share for a tenth of the bytes. Retention frees a segment once no row refers to it (and
no writer holds it: writers keep a shared flock on their open segment). A committed row's input
was written before the commit, so a killed process loses no answered input. What each step
bought: monitoring/README.md, Cheap logging.

Imports sqlite3 only: the service imports this on its request path.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from .journal import Indexer, JournalWriter, delete_unheld, journal_dir
from .store import (_INPUT, _INPUT_REF, COLUMNS, SCHEMA_VERSION, FeedbackResult,
                    LogOpenError, PredictionLog, ValidLabels)

logger = logging.getLogger(__name__)
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
    input BLOB,                      -- the raw input, if kept in the row (small, or older logs)
    replica TEXT NOT NULL DEFAULT '', -- the server that answered (CLF_REPLICA)
    input_ref TEXT                   -- where the raw input is kept: "segment@offset+length"
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
# How far each journal is indexed (journal.py); SQLite only, so outside the schema versions.
_JOURNAL_PROGRESS = """CREATE TABLE IF NOT EXISTS journal_progress (
    name TEXT PRIMARY KEY,
    offset INTEGER NOT NULL
)"""
# Schema upgrades: from version N to N + 1.
_UPGRADES = {
    1: "ALTER TABLE predictions ADD COLUMN input BLOB",
    2: "ALTER TABLE predictions ADD COLUMN replica TEXT NOT NULL DEFAULT ''",
    3: "ALTER TABLE predictions ADD COLUMN input_ref TEXT",
}
SEGMENT_BYTES = 64 * 1024 * 1024  # a writer starts a new segment file past this size
SEGMENT_GRACE_S = 600.0  # an unreferenced segment younger than this is never deleted
# Inputs up to this size (texts, mostly) stay in their row: a segment write would cost the
# request a lock and a system call (15 us of its worker's CPU under load) to move ~100 bytes.
INLINE_INPUT_BYTES = 1024
_IOV_MAX = 1024  # buffers per writev call (Linux's limit)
_INSERT = (f"INSERT INTO predictions ({', '.join(COLUMNS)})"
           f" VALUES ({', '.join('?' * len(COLUMNS))})")


class SQLiteLog(PredictionLog):
    """One connection per process; safe to call from several threads of that process."""

    backend = "sqlite"

    def __init__(self, path: str | Path, synchronous: str = "NORMAL",
                 max_slice_values: int = 20, input_segments: bool = True,
                 background_checkpoints: bool = False, journal: bool = False,
                 index_interval_s: float = 0.1,
                 on_index_error: Callable[[Exception], None] | None = None) -> None:
        """``background_checkpoints``: checkpoint the WAL from a thread of its own instead of
        inside the commit that crosses the threshold (the service's writers: a checkpoint's
        fsyncs took a commit's p99 from under 1 ms to 25 ms, see Checkpoints below).

        ``journal``: ``write_batch`` appends to this process's journal and returns, and a thread
        indexes the journal into the table every ``index_interval_s`` (the service's workers;
        journal.py). Every log reads through the journals whether it writes to one or not."""
        super().__init__(max_slice_values)
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be NORMAL or FULL")
        self.path = Path(path)
        self.fsync_inputs = synchronous.upper() == "FULL"
        # input_segments=False keeps inputs in the row (what every log did before schema 4).
        self.inputs_dir = Path(str(self.path) + ".inputs") if input_segments else None
        self._segment: tuple[str, int, int] | None = None  # (name, fd, size) being appended
        self._segment_lock = threading.Lock()
        self.target = str(self.path)
        self._init_journals(journal_dir(self.path))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves: one call = one transaction.
            self._db = sqlite3.connect(str(self.path), isolation_level=None,
                                       check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
        except (OSError, sqlite3.Error) as exc:
            raise LogOpenError(f"{self.path}: {exc}") from None
        self._lock = threading.Lock()
        # Writers queue on an flock of a side file before they ask SQLite for its write lock:
        # a waiting writer wakes the moment the holder is done. SQLite's own busy handler
        # polls with sleeps of up to 100 ms, and under load every worker's answers wait out
        # those sleeps (see monitoring/README.md, Cheap logging).
        try:
            self._queue_fd = os.open(str(self.path) + "-writers", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LogOpenError(f"{self.path}: {exc}") from None
        self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._enable_wal()
        self._db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        self._checkpointer: _Checkpointer | None = None
        self._migrate()
        if background_checkpoints:
            self._db.execute("PRAGMA wal_autocheckpoint = 0")
            # The WAL file keeps its size when a checkpoint lets writers start over at its
            # beginning; the checkpointer is poked by that size, so the first commit after the
            # restart cuts the file back to below the poke threshold (see _Checkpointer).
            self._db.execute(f"PRAGMA journal_size_limit = {_Checkpointer.KEEP_BYTES}")
            self._checkpointer = _Checkpointer(self.path, synchronous.upper())
        if journal:
            self._journal = JournalWriter(self.journal_dir, fsync=self.fsync_inputs)
            self._catch_up_quietly()  # what a killed writer left behind
            self._indexer = Indexer(self.catch_up, index_interval_s, on_index_error)

    @property
    def journaled(self) -> bool:
        """Whether ``write_batch`` appends to a journal (cheap, no shared lock) rather than
        committing a transaction."""
        return self._journal is not None

    def write_rows(self, rows: list[list]) -> None:
        """With a journal: durable once appended to it (see journal.py); indexed within
        ``index_interval_s``, and seen by every read through this class before that."""
        if self._journal is None:
            return super().write_rows(rows)
        if rows:
            self._stash_inputs(rows)  # before the journal: an answered row's input is written
            self._journal.append(rows)

    def add_feedback_many(self, feedback: Mapping[str, Sequence[str] | str],
                          valid_labels: ValidLabels = None) -> list[FeedbackResult]:
        self._catch_up_quietly()  # the request may have been answered a moment ago
        return super().add_feedback_many(feedback, valid_labels)

    def prune(self, before: float, inputs_only: bool = False, chunk: int = 5000) -> int:
        self._catch_up_quietly()  # rows a dead worker's journal still holds are pruned too
        return super().prune(before, inputs_only, chunk)

    # -- the journals ------------------------------------------------------------------------

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
                    raise LogOpenError(f"{self.path}: {exc}") from None
                time.sleep(0.02)
            except sqlite3.DatabaseError as exc:
                raise LogOpenError(f"{self.path}: {exc}") from None
        if mode.lower() != "wal":
            raise LogOpenError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); "
                               "is it on a network file system?")

    def close(self) -> None:
        self._close_journals()
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        with self._lock:
            self._db.close()
            if self._queue_fd >= 0:
                os.close(self._queue_fd)
                self._queue_fd = -1
        with self._segment_lock:
            if self._segment is not None:
                os.close(self._segment[1])  # closing releases its flock
                self._segment = None

    # -- input segments ----------------------------------------------------------------------

    def _stash_inputs(self, rows: list[list]) -> None:
        if self.inputs_dir is None:
            return
        blobs = [(i, r[_INPUT]) for i, r in enumerate(rows)
                 if r[_INPUT] and len(r[_INPUT]) > INLINE_INPUT_BYTES]
        if not blobs:
            return
        with self._segment_lock:
            name, fd, size = self._open_segment()
            offset = size
            for i, data in blobs:
                rows[i][_INPUT_REF] = f"{name}@{offset}+{len(data)}"
                rows[i][_INPUT] = None
                offset += len(data)
            written = 0
            views = [memoryview(data) for _, data in blobs]
            total = offset - size
            while written < total:  # writev may write less than asked (a signal, a full disk)
                n = os.writev(fd, views[:_IOV_MAX])
                written += n
                views = _advance(views, n)
            if self.fsync_inputs:
                os.fsync(fd)
            self._segment = (name, fd, offset)

    def _open_segment(self) -> tuple[str, int, int]:
        if self._segment is not None and self._segment[2] < SEGMENT_BYTES:
            return self._segment
        if self._segment is not None:
            os.close(self._segment[1])
        self.inputs_dir.mkdir(parents=True, exist_ok=True)
        name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}-" \
               f"{os.urandom(4).hex()}.seg"
        fd = os.open(self.inputs_dir / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)  # "in use": retention never deletes it
        self._segment = (name, fd, 0)
        return self._segment

    def _load_input(self, data: bytes | None, ref: str | None) -> bytes | None:
        if data is not None:
            return bytes(data)
        if ref is None or self.inputs_dir is None and not self._ref_dir().exists():
            return None
        name, _, span = ref.partition("@")
        offset, _, length = span.partition("+")
        try:
            with open(self._ref_dir() / name, "rb") as f:
                f.seek(int(offset))
                blob = f.read(int(length))
        except FileNotFoundError:
            return None
        return blob if len(blob) == int(length) else None

    def _ref_dir(self) -> Path:
        return self.inputs_dir or Path(str(self.path) + ".inputs")

    def _inputs_dropped(self) -> None:
        """Delete the segments no row refers to, that no writer holds, and that are older than
        SEGMENT_GRACE_S (a writer may be between appending and committing)."""
        folder = self._ref_dir()
        if not folder.is_dir():
            return
        used = {ref.partition("@")[0] for (ref,) in self._read(
            "SELECT DISTINCT substr(input_ref, 1, instr(input_ref, '@') - 1) FROM predictions"
            " WHERE input_ref IS NOT NULL")}
        now = time.time()
        for seg in folder.glob("*.seg"):
            if seg.name not in used and now - seg.stat().st_mtime >= SEGMENT_GRACE_S:
                delete_unheld(seg)  # kept while a writer holds it

    def _migrate(self) -> None:
        with self._transaction() as db:  # two workers starting at once: one creates
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LogOpenError(f"{self.path} has schema {version}; this code knows "
                                   f"{SCHEMA_VERSION}: upgrade the project")
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
            else:
                for step in range(version, SCHEMA_VERSION):
                    db.execute(_UPGRADES[step])
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute(_JOURNAL_PROGRESS)

    @contextmanager
    def _transaction(self) -> Iterator["_Tx"]:
        with self._lock:  # one connection, shared by this process's threads
            fcntl.flock(self._queue_fd, fcntl.LOCK_EX)  # other processes' writers: in turn
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield _Tx(self._db)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            finally:
                fcntl.flock(self._queue_fd, fcntl.LOCK_UN)
        if self._checkpointer is not None:
            self._checkpointer.poke()

    def _read(self, sql: str, args: Sequence[object] = ()) -> list[tuple]:
        self._catch_up_quietly()  # what the journals hold is part of the log
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @property
    def schema_version(self) -> int:
        return int(self._read("PRAGMA user_version")[0][0])

    def vacuum(self) -> None:
        """Give freed pages back to the file system (rewrites the file: run it off-peak)."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.execute("VACUUM")


class _Tx:
    """The connection inside a transaction (sqlite3 takes ``?`` placeholders as they are)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.execute = db.execute
        self.executemany = db.executemany
        self._db = db

    def insert_predictions(self, rows: list[list]) -> None:
        self._db.executemany(_INSERT, rows)


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """The buffers left to write after ``n`` bytes of ``views`` were written."""
    while views and n >= len(views[0]):
        n -= len(views[0])
        views = views[1:]
    if views and n:
        views = [views[0][n:], *views[1:]]
    return views


class _Checkpointer:
    """Checkpoints the WAL from a thread and connection of its own.

    SQLite's automatic checkpoint runs inside the commit that takes the WAL past 1,000 pages:
    that commit, and the answers waiting on it, wait for the copy into the database file and its
    fsyncs. Here a writer only pokes (a ``stat`` of the WAL after its commit); past
    ``PASSIVE_BYTES`` this thread runs a PASSIVE checkpoint, which copies what it can without
    blocking any writer, as the automatic one does. Writers that never pause can keep a passive
    checkpoint from ever reaching the WAL's end, and the WAL from restarting: past
    ``RESTART_BYTES`` the thread runs a RESTART checkpoint, which holds new writers back until it
    is done (rare: once per ``RESTART_BYTES`` of traffic), so the file stays bounded.

    A checkpoint that reached the WAL's end lets the next writer start over at the file's
    beginning, but the file keeps its size: without a limit, once it had grown past
    ``PASSIVE_BYTES`` every commit would poke and this thread would checkpoint after every
    commit (found as the log-on cells losing a third of their throughput, most of it to this
    thread's checkpoints and their fsyncs). The writers' ``journal_size_limit`` of
    ``KEEP_BYTES`` makes the first commit after such a restart cut the file back, so the size
    measures what was written since.
    """

    PASSIVE_BYTES = 4 * 1024 * 1024
    RESTART_BYTES = 64 * 1024 * 1024
    KEEP_BYTES = 1024 * 1024  # journal_size_limit: below PASSIVE_BYTES

    def __init__(self, path: Path, synchronous: str) -> None:
        self.wal = Path(str(path) + "-wal")
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
        self._db.execute(f"PRAGMA synchronous = {synchronous}")
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="predlog-checkpoint", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        try:
            if self.wal.stat().st_size >= self.PASSIVE_BYTES:
                self._wake.set()
        except FileNotFoundError:
            pass

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                size = self.wal.stat().st_size
                mode = "RESTART" if size >= self.RESTART_BYTES else "PASSIVE"
                self._db.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
            except (OSError, sqlite3.Error) as exc:  # the next commit pokes again
                logger.warning("WAL checkpoint failed: %s", exc)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        self._db.close()
