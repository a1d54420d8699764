"""``python -m monitoring migrate --from PATH --to URL``: copy a SQLite prediction log into
PostgreSQL, for a deployment that outgrew one host.

Resumable: predictions are copied in id order, ``batch`` rows per transaction, and each
transaction records the last source id it copied (``clf_migrations`` in the target), so a
migration stopped at any point (Ctrl-C, SIGKILL, a lost connection) continues where it stopped
when run again, without duplicates. Feedback (an upsert) and the admitted slice values (insert
if missing) are copied after the predictions and are idempotent. Inputs kept in the source's
segment files (``<log>.inputs/``) are copied into the rows. The source is only read (its schema
is upgraded first if it is older than this code's); the service may keep writing to it
meanwhile: run the command again after switching the service over, to copy what it wrote in
between.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from .store import LogOpenError, is_postgres, open_log


class MigrationError(RuntimeError):
    """A migration that cannot run (no such source, a target that is not PostgreSQL...)."""


def migrate(source: str | Path, target: str, batch: int = 5000,
            progress: Callable[[str], None] = lambda line: None) -> str:
    """Copy ``source`` (SQLite file) into ``target`` (postgresql:// URL); returns a summary."""
    if not Path(source).is_file():
        raise MigrationError(f"no SQLite prediction log at {source}")
    if not is_postgres(target):
        raise MigrationError(f"--to must be a postgresql:// URL, not {target!r}")
    if batch < 1:
        raise MigrationError("--batch must be >= 1")
    key = str(Path(source).resolve())
    started = time.monotonic()
    try:
        src = open_log(source)
        dst = open_log(target)
    except LogOpenError as exc:
        raise MigrationError(str(exc)) from None
    with src, dst:
        last, _ = dst.migration_progress(key)
        total, copied = src.count(), 0
        if last:
            progress(f"resuming after source id {last}")
        while True:
            rows = src.scan(last, batch)
            if not rows:
                break
            dst.copy_rows(key, rows)
            last, copied = rows[-1][0], copied + len(rows)
            progress(f"predictions: {copied} copied (last id {last}, source holds {total})")
        dst.copy_slice_values(src.slice_values())
        after, labels = ("", -1), 0
        while True:
            rows = src.feedback_rows(after, batch)
            if not rows:
                break
            dst.copy_feedback(rows)
            after, labels = (rows[-1][0], rows[-1][1]), labels + len(rows)
        dst.copy_rows(key, [], feedback_done=True)
        return (f"migrated {src.target} -> {dst.target}: {copied} predictions copied this run "
                f"(source holds {total}, target {dst.count()}), {labels} labels, "
                f"{time.monotonic() - started:.1f} s")
