"""The prediction log in PostgreSQL: one log shared by every replica on every host.

``CLF_PREDICTION_LOG=postgresql://user:password@host:5432/dbname`` (psycopg 3 with a connection
pool; ``pip install -e .[postgres]``). The same interface and SQL as the SQLite backend
(``store.PredictionLog``), with three differences:

  * Predictions are partitioned by day (range partitions on ``ts``, UTC days, created before the
    first row of a day is written, under an advisory lock so replicas do not race). Retention
    drops whole days with ``DROP TABLE`` instead of deleting rows one by one: the cost of
    dropping a day does not grow with its rows, and there is no table bloat left for VACUUM
    (measured: ``python -m tools.scale_bench --backend postgresql``, see monitoring/README.md).
  * Rows are written with ``COPY`` inside the transaction (one round trip for a batch).
  * New slice values are admitted under a transaction-scoped advisory lock, so every replica
    agrees on the first ``max_slice_values`` values of a key (SQLite's write lock does this).

Durability: a commit returns after PostgreSQL has flushed its WAL (``synchronous_commit=on``, the
server's default), so an answered request's record survives the loss of the replica, and of
the database server's process.
"""

from __future__ import annotations

import calendar
import errno
import hashlib
import re
import socket
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .journal import Indexer, JournalWriter, journals
from .store import (_TS, COLUMNS, SCHEMA_VERSION, FeedbackResult, LogOpenError, PredictionLog,
                    ValidLabels, display_target)

DAY_S = 86_400
_PARTITION = re.compile(r"^predictions_d(\d{8})$")
# Advisory lock keys (any two constants this project owns).
_LOCK_SCHEMA, _LOCK_PARTITIONS, _LOCK_SLICES = 741_001, 741_002, 741_003
_LOCK_JOURNALS = 741_004  # replaying spools (journal_progress)
# How long a write waits for a pooled connection (psycopg_pool's default is 30 s): with the
# server gone, every group of answers waited that long before it failed.
WAIT_TIMEOUT_S = 5.0
# libpq's connection options where the URL does not set them: a connect gives up after
# CONNECT_TIMEOUT_S, and TCP keepalives find a connection whose server vanished (a host down,
# a network cut with no reset) in about 25 s instead of the kernel's two hours.
_CONNECT_DEFAULTS = {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10,
                     "keepalives_interval": 5, "keepalives_count": 3}
# The spool's progress (store.PredictionLog's journals); outside the schema versions, as in SQLite
_JOURNAL_PROGRESS = """CREATE TABLE IF NOT EXISTS journal_progress (
    name text PRIMARY KEY,
    "offset" bigint NOT NULL)"""

_SCHEMA = [
    "CREATE SEQUENCE IF NOT EXISTS predictions_id_seq AS bigint",
    """CREATE TABLE IF NOT EXISTS predictions (
        id bigint NOT NULL DEFAULT nextval('predictions_id_seq'),
        request_id text NOT NULL,
        item integer NOT NULL,
        ts double precision NOT NULL,
        model text NOT NULL,
        version text NOT NULL,
        predicted text NOT NULL,
        confidence double precision NOT NULL,
        ood integer NOT NULL DEFAULT 0,
        ood_score double precision,
        latency_ms double precision,
        slices text NOT NULL DEFAULT '{}',
        features text NOT NULL DEFAULT '{}',
        embedding bytea,
        probabilities bytea,
        input bytea,
        replica text NOT NULL DEFAULT '',
        input_ref text  -- unused here: PostgreSQL keeps inputs in the row (every host reads them)
    ) PARTITION BY RANGE (ts)""",
    "CREATE INDEX IF NOT EXISTS predictions_model_ts ON predictions (model, ts)",
    "CREATE INDEX IF NOT EXISTS predictions_request ON predictions (request_id, item)",
    "CREATE INDEX IF NOT EXISTS predictions_id ON predictions (id)",
    """CREATE TABLE IF NOT EXISTS feedback (
        request_id text NOT NULL,
        item integer NOT NULL,
        label text NOT NULL,
        ts double precision NOT NULL,
        PRIMARY KEY (request_id, item))""",
    """CREATE TABLE IF NOT EXISTS slice_values (
        key text NOT NULL, value text NOT NULL, PRIMARY KEY (key, value))""",
    # This project's own bookkeeping: the schema version, and how far each migration got.
    "CREATE TABLE IF NOT EXISTS clf_meta (key text PRIMARY KEY, value text NOT NULL)",
    # The latest drift report per model (monitoring/exporter.py): what every replica's gauges show.
    """CREATE TABLE IF NOT EXISTS clf_reports (
        model text PRIMARY KEY, entry text NOT NULL, updated double precision NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS clf_migrations (
        source text PRIMARY KEY, last_id bigint NOT NULL, feedback_done boolean NOT NULL,
        updated double precision NOT NULL)""",
]


_UPGRADES = {3: "ALTER TABLE predictions ADD COLUMN IF NOT EXISTS input_ref text"}


def spool_name(conninfo: dict) -> str:
    """The folder, inside the spool folder, of one database's spool: records are replayed only
    into the database they were meant for (another ``CLF_PREDICTION_LOG`` on the same host, or
    the same folder after the setting changed, has a folder of its own)."""
    key = "|".join(str(conninfo.get(k, "")) for k in ("host", "hostaddr", "port", "dbname", "user"))
    database = re.sub(r"[^A-Za-z0-9_.-]", "_", str(conninfo.get("dbname") or "postgres"))[:40]
    return f"{database}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _qmarks(sql: str) -> str:
    """``?`` placeholders (the shared SQL) to psycopg's ``%s``; a literal ``%`` doubled."""
    return sql.replace("%", "%%").replace("?", "%s")


class PostgresLog(PredictionLog):
    """A connection pool per process; safe to call from several threads of that process."""

    backend = "postgresql"

    def __init__(self, url: str, max_slice_values: int = 20, pool_size: int = 4,
                 connect_timeout_s: float = 10.0, synchronous: str | None = None,
                 spool_dir: str | Path | None = None, spool_retry_s: float = 1.0,
                 wait_timeout_s: float = WAIT_TIMEOUT_S, journal: bool = False,
                 spool_max_bytes: int = 0) -> None:
        """``spool_dir``: where this process's records go while the server cannot take them
        (``spool_rows``, the service's writer decides when), replayed into the table every
        ``spool_retry_s`` by a thread, exactly once; what a previous process left there is
        replayed from the start. None: no spool.

        ``journal`` (needs ``spool_dir``): every write goes to the spool and returns, as a
        journaled SQLite log's does (``write_rows``), indexed every ``spool_retry_s``: a
        record is then on the replica's disk only, for up to that interval, before it is in the
        database (the default commits before it returns).

        ``spool_max_bytes``: past this many bytes in the spool folder not yet in the database
        (all its files, as the replaying thread last listed them, plus what this process
        appended since), a write to the spool raises OSError (ENOSPC) instead of filling the
        disk through a long outage; 0: no bound."""
        if journal and spool_dir is None:
            raise ValueError("a journaled PostgreSQL log needs a spool folder")
        super().__init__(max_slice_values)
        del synchronous  # SQLite's setting; PostgreSQL's is the server's synchronous_commit
        self._url = url
        self.target = display_target(url)
        try:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise LogOpenError("a postgresql:// prediction log needs psycopg 3: "
                               "pip install -e '.[postgres]'") from None
        self._psycopg = psycopg
        try:
            given = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise LogOpenError(f"{self.target}: {exc}") from None
        options = {k: v for k, v in _CONNECT_DEFAULTS.items() if k not in given}
        self._pool = ConnectionPool(url, min_size=1, max_size=max(1, pool_size), open=False,
                                    timeout=wait_timeout_s,
                                    kwargs={"autocommit": False, **options}, name="predlog")
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except Exception as exc:  # noqa: BLE001 - PoolTimeout, OperationalError: say which
            self._pool.close()
            raise LogOpenError(f"{self.target}: cannot connect: {exc}") from None
        self._days: set[int] = set()  # day partitions known to exist
        self._days_lock = threading.Lock()
        try:
            self._migrate()
        except LogOpenError:
            self._pool.close()
            raise
        except psycopg.Error as exc:
            self._pool.close()
            raise LogOpenError(f"{self.target}: {exc}") from None
        if spool_dir is not None:
            self._init_journals(Path(spool_dir) / spool_name(given))
            where = f"{socket.gethostname()}:{Path(self.journal_dir).resolve()}".encode()
            self._spool_key = zlib.crc32(where) - (1 << 31)  # an int4
            self._journal = JournalWriter(self.journal_dir)
            # What a process stopped during an outage left there is replayed by the thread, from
            # its first tick: not here, where a large spool would hold the worker's start-up.
            self._indexer = Indexer(self.catch_up, spool_retry_s, what="spool",
                                    expected=self.outage_errors)
        self._journaled = journal
        self.spool_max_bytes = spool_max_bytes
        self._spool_bytes = self._appended = 0  # the folder as last listed; appended since

    @property
    def outage_errors(self) -> tuple[type[BaseException], ...]:
        """What a write raises when the server takes no writes (down, restarting, unreachable,
        no connection free in time), as opposed to a fault of the rows or the SQL: the writer
        spools on these only (records that fail for another reason would fail again when
        replayed, and hold the spool up behind them)."""
        from psycopg_pool import PoolTimeout

        return (self._psycopg.OperationalError, self._psycopg.InterfaceError, PoolTimeout)

    @property
    def journaled(self) -> bool:
        """Whether ``write_rows`` appends to the spool (one write, nothing shared) rather than
        committing a transaction."""
        return self._journaled and self._journal is not None

    def add_feedback_many(self, feedback: Mapping[str, Sequence[str] | str],
                          valid_labels: ValidLabels = None) -> list[FeedbackResult]:
        if self.journaled:  # the request may have been answered here a moment ago
            self._catch_up_quietly()
        return super().add_feedback_many(feedback, valid_labels)

    def write_rows(self, rows: list[list]) -> None:
        """Journaled: durable once appended to the spool, indexed within the interval."""
        if not self.journaled:
            return super().write_rows(rows)
        if rows:
            self.spool_rows(rows)

    def catch_up(self) -> int:
        try:
            return super().catch_up()
        finally:  # what the spool holds beyond what is indexed, whether or not this one worked
            if self.journal_dir is not None:
                mark = self._appended  # appends from here on may be counted twice: never short
                self._spool_bytes = sum(max(0, size - self._indexed.get(name, 0))
                                        for name, size in journals(self.journal_dir))
                self._appended -= mark

    # -- the spool --------------------------------------------------------------------------

    @property
    def spooled(self) -> bool:
        """Whether ``spool_rows`` can take records (a spool folder is set)."""
        return self._journal is not None

    def spool_rows(self, rows: list[list]) -> None:
        """Make ``rows`` (``encode_row``) durable in this process's spool file, for the
        replaying thread to insert once the server takes writes again. One append, as
        durable as the SQLite journal under ``synchronous=NORMAL`` (it survives the process
        being killed, not the host losing power). OSError where the folder cannot be written."""
        if self._journal is None:
            raise OSError("this log has no spool folder")
        held = self._spool_bytes + self._appended
        if self.spool_max_bytes and held > self.spool_max_bytes:
            raise OSError(errno.ENOSPC, f"the spool {self.journal_dir} holds {held >> 20} MB, "
                          f"over its bound of {self.spool_max_bytes >> 20} MB")
        self._appended += self._journal.append(rows)

    # -- backend hooks ---------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator["_Tx"]:
        with self._pool.connection() as conn:  # commits on a clean exit, rolls back otherwise
            with conn.cursor() as cur:
                yield _Tx(cur)

    def _read(self, sql: str, args: Sequence[object] = ()) -> list[tuple]:
        with self._pool.connection() as conn:
            return conn.execute(_qmarks(sql), list(args)).fetchall()

    def _lock_slice_admission(self, tx: "_Tx") -> None:
        tx.execute("SELECT pg_advisory_xact_lock(?)", (_LOCK_SLICES,))

    def _prepare_write(self, timestamps: Iterable[float]) -> None:
        days = {int(ts // DAY_S) for ts in timestamps}
        if not days <= self._days:
            self.ensure_partitions(days)

    @property
    def schema_version(self) -> int:
        rows = self._read("SELECT value FROM clf_meta WHERE key = 'schema_version'")
        return int(rows[0][0]) if rows else 0

    def close(self) -> None:
        self._close_journals()
        self._pool.close()

    def _lock_journal_progress(self, tx: "_Tx") -> None:
        """Only the processes of one host see its spool folder: they take turns, replicas on
        other hosts do not wait (the lock's second key is the host and folder's)."""
        tx.execute("SELECT pg_advisory_xact_lock(?, ?)", (_LOCK_JOURNALS, self._spool_key))

    def _prepare_journal_rows(self, tx: "_Tx", rows: list[list]) -> None:
        """The day partitions of replayed rows, inside the replay's transaction (an outage
        across two midnights outlasts the partitions made ahead)."""
        missing = sorted({int(row[_TS] // DAY_S) for row in rows} - self._days)
        if missing:
            tx.execute("SELECT pg_advisory_xact_lock(?)", (_LOCK_PARTITIONS,))
            for day in missing:
                tx.execute(f"CREATE TABLE IF NOT EXISTS {_partition_name(day)} PARTITION OF"
                           f" predictions FOR VALUES FROM ({day * DAY_S}) TO"
                           f" ({(day + 1) * DAY_S})")

    def vacuum(self) -> None:
        with self._pool.connection() as conn:
            conn.autocommit = True  # VACUUM cannot run inside a transaction
            try:
                conn.execute("VACUUM ANALYZE")
            finally:
                conn.autocommit = False

    # -- schema and partitions -----------------------------------------------------------

    def _migrate(self) -> None:
        with self._transaction() as tx:  # replicas starting at once: one creates, others wait
            tx.execute("SELECT pg_advisory_xact_lock(?)", (_LOCK_SCHEMA,))
            exists = tx.execute("SELECT to_regclass('clf_meta') IS NOT NULL").fetchone()[0]
            version = 0
            if exists:
                row = tx.execute("SELECT value FROM clf_meta WHERE key = 'schema_version'"
                                 ).fetchone()
                version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise LogOpenError(f"{self.target} has schema {version}; this code knows "
                                   f"{SCHEMA_VERSION}: upgrade the project")
            if version == 0:
                for statement in _SCHEMA:
                    tx.execute(statement)
            for step in range(max(version, 3), SCHEMA_VERSION) if version else ():
                tx.execute(_UPGRADES[step])  # version N -> N + 1 (PostgreSQL logs began at 3)
            if version < SCHEMA_VERSION:
                tx.execute("INSERT INTO clf_meta (key, value) VALUES ('schema_version', ?) ON "
                           "CONFLICT (key) DO UPDATE SET value = excluded.value",
                           (str(SCHEMA_VERSION),))
            tx.execute(_JOURNAL_PROGRESS)
        now = int(time.time() // DAY_S)
        self.ensure_partitions({now, now + 1})  # today's and tomorrow's: no stall at midnight

    def days(self) -> list[int]:
        """The days (unix day numbers) that have a partition, oldest first."""
        rows = self._read(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'predictions'::regclass")
        out = []
        for (name,) in rows:
            m = _PARTITION.match(name)
            if m:
                out.append(calendar.timegm(time.strptime(m.group(1), "%Y%m%d")) // DAY_S)
        return sorted(out)

    def ensure_partitions(self, days: set[int]) -> None:
        """Create the day partitions that do not exist yet (idempotent, safe across replicas)."""
        with self._days_lock:
            missing = sorted(days - self._days)
            if not missing:
                return
            with self._transaction() as tx:
                tx.execute("SELECT pg_advisory_xact_lock(?)", (_LOCK_PARTITIONS,))
                for day in missing:
                    tx.execute(f"CREATE TABLE IF NOT EXISTS {_partition_name(day)} PARTITION OF"
                               f" predictions FOR VALUES FROM ({day * DAY_S}) TO"
                               f" ({(day + 1) * DAY_S})")
            self._days.update(missing)

    # -- retention -------------------------------------------------------------------------

    def prune(self, before: float, inputs_only: bool = False, chunk: int = 5000,
              by_partition: bool = True) -> int:
        """As ``PredictionLog.prune``; whole days before ``before`` are dropped as partitions
        (their feedback deleted in the same transaction), the rest deleted in chunks.
        ``by_partition=False`` deletes row by row (what the scale benchmark compares)."""
        if inputs_only or not by_partition:
            return super().prune(before, inputs_only, chunk)
        done = 0
        for day in self.days():
            if (day + 1) * DAY_S > before:
                break
            name = _partition_name(day)
            with self._transaction() as tx:
                tx.execute("SELECT pg_advisory_xact_lock(?)", (_LOCK_PARTITIONS,))
                n = tx.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0]
                tx.execute(f"DELETE FROM feedback f USING {name} p WHERE"
                           " f.request_id = p.request_id AND f.item = p.item")
                tx.execute(f"DROP TABLE {name}")
            with self._days_lock:
                self._days.discard(day)
            done += int(n)
        return done + super().prune(before, inputs_only, chunk)

    # -- migration bookkeeping -------------------------------------------------------------

    def migration_progress(self, source: str) -> tuple[int, bool]:
        """(last source id copied, whether feedback was copied) of a migration from ``source``."""
        rows = self._read("SELECT last_id, feedback_done FROM clf_migrations WHERE source = ?",
                          (source,))
        return (int(rows[0][0]), bool(rows[0][1])) if rows else (0, False)

    def copy_rows(self, source: str, rows: Sequence[tuple], feedback_done: bool = False) -> None:
        """Insert migrated prediction rows ``(source_id, *COLUMNS)`` and record how far the
        migration got, in one transaction: a migration killed at any point resumes exactly."""
        self._prepare_write(r[3] for r in rows)
        with self._transaction() as tx:
            if rows:
                tx.insert_predictions([[bytes(v) if isinstance(v, memoryview) else v
                                        for v in r[1:]] for r in rows])
            last = rows[-1][0] if rows else self.migration_progress(source)[0]
            tx.execute("INSERT INTO clf_migrations (source, last_id, feedback_done, updated)"
                       " VALUES (?, ?, ?, ?) ON CONFLICT (source) DO UPDATE SET"
                       " last_id = excluded.last_id, feedback_done = excluded.feedback_done,"
                       " updated = excluded.updated", (source, last, feedback_done, time.time()))

    def copy_feedback(self, rows: Sequence[tuple]) -> None:
        """Upsert migrated feedback rows ``(request_id, item, label, ts)`` (idempotent)."""
        with self._transaction() as tx:
            tx.executemany("INSERT INTO feedback (request_id, item, label, ts) VALUES"
                           " (?, ?, ?, ?) ON CONFLICT (request_id, item) DO UPDATE SET"
                           " label = excluded.label, ts = excluded.ts", rows)

    def copy_slice_values(self, values: dict[str, list[str]]) -> None:
        with self._transaction() as tx:
            tx.executemany("INSERT INTO slice_values (key, value) VALUES (?, ?)"
                           " ON CONFLICT DO NOTHING",
                           [(k, v) for k, vs in values.items() for v in vs])


def _partition_name(day: int) -> str:
    return "predictions_d" + time.strftime("%Y%m%d", time.gmtime(day * DAY_S))


class _Tx:
    """A cursor inside a transaction, taking the shared SQL's ``?`` placeholders."""

    def __init__(self, cur: Any) -> None:
        self._cur = cur

    def execute(self, sql: str, args: Sequence[object] = ()) -> Any:
        return self._cur.execute(_qmarks(sql), list(args))

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> Any:
        self._cur.executemany(_qmarks(sql), rows)
        return self._cur

    def insert_predictions(self, rows: list[list]) -> None:
        with self._cur.copy(f"COPY predictions ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
