"""What the prediction log costs: served cells with ``CLF_PREDICTION_LOG`` on, next to log off.

Every other cell runs with the log off (``CLF_PREDICTION_LOG=""``: serving alone, and nothing
written into the repository's artifacts/). The log-on cells write to a SQLite file in a
temporary folder that is deleted afterwards, and the bench checks the log against wrk: the
rows a measured run added (``SELECT COUNT(*) FROM predictions`` before and after it) must be at
least the 2xx answers wrk counted (every answer is committed before it is sent), and at most
``c`` more (requests in flight when wrk stops are answered, and logged, after it stopped
counting). The pairing and the table are in ``report.py``.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def count_rows(path: Path) -> int:
    """Rows in the log's ``predictions`` table; 0 while the file or the table does not exist."""
    if not path.exists():
        return 0
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return int(con.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return 0
        raise
    finally:
        con.close()


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
