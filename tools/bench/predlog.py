"""What the prediction log costs: served cells with ``CLF_PREDICTION_LOG`` on, next to log off.

Every other cell runs with the log off (``CLF_PREDICTION_LOG=""``: serving alone, and nothing
written into the repository's artifacts/). The log-on cells write to a SQLite file in a
temporary folder that is deleted afterwards, and the bench checks the log against wrk: the
rows a measured run added (the table's rows and those still in the workers' journals, before
and after it) must be at least the 2xx answers wrk counted (every answer is durable in the log
before it is sent), and at most ``c`` more (requests in flight when wrk stops are answered, and
logged, after it stopped counting). The pairing and the table are in ``report.py``.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from monitoring import journal


def count_rows(path: Path) -> int:
    """Rows in the log: the ``predictions`` table and what the workers' journals hold beyond it
    (monitoring/journal.py), read without writing anything (a bench must not index for the
    server); 0 while the file or the table does not exist."""
    if not path.exists():
        return 0

    def snapshot() -> tuple[int, dict[str, int]] | None:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10, isolation_level=None)
        try:
            con.execute("BEGIN")  # one snapshot: the table's rows and how far each journal is in
            rows = int(con.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])
            try:
                indexed = dict(con.execute("SELECT name, offset FROM journal_progress").fetchall())
            except sqlite3.OperationalError:
                indexed = {}
            con.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise
        finally:
            con.close()
        return rows, indexed

    return _count(snapshot, lambda: [journal.journal_dir(path)])


def count_postgres_rows(url: str, spool: Path | None = None) -> int:
    """``count_rows`` of a PostgreSQL log: the table's rows, and what the spool files in
    ``spool`` (a ``CLF_LOG_SPOOL_DIR``: a folder per database) hold beyond their progress."""
    import psycopg

    def snapshot() -> tuple[int, dict[str, int]] | None:
        with psycopg.connect(url) as con:  # one snapshot: the table, how far each file is in it
            con.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            try:
                rows = int(con.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])
                indexed = dict(con.execute('SELECT name, "offset" FROM journal_progress'
                                           ).fetchall())
            except psycopg.errors.UndefinedTable:
                return None
        return rows, indexed

    return _count(snapshot, lambda: list(spool.iterdir()) if spool and spool.exists() else [])


def _count(snapshot, folders, attempts: int = 10) -> int:
    """The snapshot's rows plus what the journal files hold beyond its progress. A file is
    deleted once indexed to its end and no writer holds it: one listed before the snapshot and
    gone after may have been indexed meanwhile, its last rows neither in the snapshot's count
    nor in a file to read (the bench's log check once counted 99 rows short so, at a rotation of
    a PostgreSQL spool file); the count is then taken again."""
    total = 0
    for _ in range(attempts):
        listed = {(folder, name) for folder in folders() for name, _ in journal.journals(folder)}
        taken = snapshot()
        if taken is None:
            return 0
        total, indexed = taken
        found, lost = set(), False
        for folder in folders():
            for name, size in journal.journals(folder):
                found.add((folder, name))
                offset = indexed.get(name, 0)
                try:
                    while offset < size:
                        rows, offset, stop = journal.read_frames(folder / name, offset)
                        total += len(rows)
                        if stop != "more":
                            break
                except FileNotFoundError:
                    lost = True
        lost = lost or any(key not in found for key in listed)
        if not lost:
            return total
    return total


def log_bytes(path: Path) -> int:
    """The log's size on disk: the database and its WAL and shared-memory files."""
    files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
    return sum(f.stat().st_size for f in files if f.exists())


@contextmanager
def temp_log() -> Iterator[Path]:
    """A prediction-log path in a fresh temporary folder, deleted with everything in it after."""
    folder = Path(tempfile.mkdtemp(prefix="clfbench-predlog-"))
    try:
        yield folder / "predictions.db"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def log_size(log_path: Path) -> int:
    """Bytes on disk of the prediction log: the database and everything named after it (its
    journals' folder, segment files, the SQLite side files)."""
    total = 0
    for path in log_path.parent.glob(log_path.name + "*"):
        if path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            total += path.stat().st_size
    return total


def remove_log(log_path: Path) -> None:
    """Delete what ``log_size`` counts."""
    for path in log_path.parent.glob(log_path.name + "*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
