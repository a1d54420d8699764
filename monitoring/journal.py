"""The SQLite log's journal: answered records made durable by one append, indexed in bulk later.

A service worker's answer waits until its records are durable. Committing them to SQLite costs a
transaction per group of answers (about 100 us of CPU, the write lock the workers share, the
WAL frames of three B-trees), and under load the answers of a worker wait for that commit with
nothing else to do: at 16 connections the log took 15% of the served rate. Here a worker appends
the encoded rows of each answer to a journal file of its own instead: one ``write()``, no lock
shared with anyone, as durable as a WAL commit with ``synchronous=NORMAL`` (in the page cache:
it survives the process being killed; ``FULL`` fsyncs it as well). A thread of the worker then
indexes the journal into SQLite every ``interval`` (100 ms by default) in one transaction of
everything appended since, where a commit's fixed cost is shared by tens to hundreds of rows.

What readers see: every read of the log (reports, feedback, retraining, ``python -m
monitoring``) first indexes what the journals hold beyond what is indexed (``catch_up``), so
reading through ``open_log`` sees every answered record, as before. A reader of the file with
bare ``sqlite3`` sees records up to one interval late.

Exactly once: how far each journal is indexed is a row of ``journal_progress``, updated in the
transaction that inserts its rows, so any process may index any journal (the worker's own
thread, a report, the worker that replaces a killed one) and no row is inserted twice.

Files: ``<log>.journal/<time>-<pid>-<random>.jnl``, each written by one process, which holds a
shared ``flock`` on it while it may still append (a killed process's lock is released by the
kernel). A journal that no process holds and that is indexed to its end is deleted. A writer
starts a new file past ``JOURNAL_BYTES``. Each file starts with ``MAGIC``; then frames of
``<u32 length><u32 crc32><payload>``, the payload a ``marshal`` dump of the rows (lists of
str, int, float, bytes and None in ``store.COLUMNS`` order, slices not yet capped): the
journal is written and read by this code only, in the log's own folder, like the database.
A frame that is incomplete or fails its CRC ends what can be read of a journal still held (its
writer is appending it); in a journal nobody holds it is a torn last write of a killed process,
whose request was never answered: it is skipped with a warning.

Imports the standard library only: the service imports this on its request path.
"""

from __future__ import annotations

import fcntl
import logging
import marshal
import os
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

MAGIC = b"CLFJ\x01" + bytes([marshal.version])
FRAME = struct.Struct("<II")  # payload length, crc32 of the payload
JOURNAL_BYTES = 16 * 1024 * 1024  # a writer starts a new journal past this size
READ_BYTES = 8 * 1024 * 1024  # at most this much of one journal is read into one transaction
SUFFIX = ".jnl"


class JournalError(RuntimeError):
    """A file in the journal folder that is not a journal this code can read."""


def journal_dir(log_path: Path) -> Path:
    return Path(str(log_path) + ".journal")


class JournalWriter:
    """Appends frames of rows to this process's journal; safe to call from several threads."""

    def __init__(self, folder: Path, fsync: bool = False) -> None:
        self.folder = folder
        self.fsync = fsync
        self._file: tuple[str, int, int] | None = None  # (name, fd, size)
        self._lock = threading.Lock()

    def append(self, rows: list[list]) -> int:
        """One frame with ``rows``; returns (its size in bytes) once it is written (and fsynced
        under FULL)."""
        payload = marshal.dumps(rows)
        frame = FRAME.pack(len(payload), zlib.crc32(payload)) + payload
        with self._lock:
            name, fd, size = self._open()
            view = memoryview(frame)
            while view:  # write may write less than asked (a signal, a full disk)
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
            self._file = (name, fd, size + len(frame))
        return len(frame)

    @property
    def current(self) -> str | None:
        """The name of the journal being appended, if any."""
        return self._file[0] if self._file else None

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                os.close(self._file[1])  # releases the flock: indexers may now finish and delete it
                self._file = None

    def _open(self) -> tuple[str, int, int]:
        if self._file is not None and self._file[2] < JOURNAL_BYTES:
            return self._file
        if self._file is not None:
            os.close(self._file[1])
            self._file = None
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"{time.time_ns():020d}-{os.getpid()}-{os.urandom(4).hex()}"
        # Made under a name no indexer reads, locked, and only then renamed: an indexer must
        # never see a journal before its writer holds it (it would take it for a dead one).
        tmp = self.folder / (stem + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.write(fd, MAGIC)
            if self.fsync:
                os.fsync(fd)
            os.rename(tmp, self.folder / (stem + SUFFIX))
        except BaseException:
            os.close(fd)
            raise
        self._file = (stem + SUFFIX, fd, len(MAGIC))
        return self._file


def read_frames(path: Path, offset: int, limit: int = READ_BYTES) -> tuple[list[list], int, str]:
    """The rows of the whole frames of ``path`` from ``offset`` (0: the file's start), read up
    to about ``limit`` bytes, and the offset after them; and why the read stopped: ``"end"``
    (the file's end), ``"more"`` (the limit: read again), ``"partial"`` (an incomplete frame at
    the file's end: still being written, or torn) or ``"bad"`` (a frame failed its CRC).
    """
    with open(path, "rb") as f:
        if offset == 0:
            head = f.read(len(MAGIC))
            if len(head) < len(MAGIC):
                return [], 0, "partial" if head else "end"
            if head != MAGIC:
                raise JournalError(f"{path} is not a journal of this version "
                                   f"(starts {head!r}, expected {MAGIC!r})")
            offset = len(MAGIC)
        f.seek(offset)
        # Asked for no more than the file holds (and a byte more, to see its end): a read asks
        # the allocator for all it may return, and 8 MB for the ~200 KB a 100-ms interval
        # appends cost 6x the read itself.
        want = min(limit, max(os.fstat(f.fileno()).st_size - offset, 0) + 1)
        data = f.read(want)
        at_eof = len(data) < want
        rows: list[list] = []
        pos = 0
        while True:
            if pos + FRAME.size > len(data):
                stop = ("end" if pos == len(data) else "partial") if at_eof else "more"
                break
            length, crc = FRAME.unpack_from(data, pos)
            end = pos + FRAME.size + length
            if end > len(data):
                if pos == 0 and not at_eof:  # one frame larger than the limit: read all of it
                    data += f.read(end - len(data))
                    at_eof = True  # as far as this read goes
                    continue
                stop = "partial" if at_eof else "more"
                break
            payload = data[pos + FRAME.size:end]
            if zlib.crc32(payload) != crc:
                stop = "bad"
                break
            rows.extend(marshal.loads(payload))
            pos = end
    return rows, offset + pos, stop


def journals(folder: Path) -> list[tuple[str, int]]:
    """(name, size) of the journals in ``folder``, oldest first; [] when there is none."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        if entry.name.endswith(SUFFIX):
            try:
                found.append((entry.name, entry.stat().st_size))
            except FileNotFoundError:
                continue  # deleted since the listing
    return sorted(found)


def delete_unheld(path: Path, at_most: int | None = None) -> bool:
    """Delete ``path`` unless a writer holds it (its shared ``flock``) or it is larger than
    ``at_most`` bytes; whether it is gone. The input segments are retired the same way."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its writer holds it
        if at_most is not None and os.fstat(fd).st_size > at_most:
            return False
        path.unlink()
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def is_held(path: Path) -> bool:
    """Whether a writer holds ``path`` (it may still append to it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the probe's own lock


class Indexer:
    """A thread that calls ``catch_up`` every ``interval_s`` until stopped (the log's ``close``
    makes the last call, once its own file is closed)."""

    def __init__(self, catch_up: Callable[[], int], interval_s: float,
                 on_error: Callable[[Exception], None] | None = None, what: str = "journal",
                 expected: tuple[type[BaseException], ...] = ()) -> None:
        """``what`` names the files in the log's lines; an error of an ``expected`` class (a
        PostgreSQL server away, for its spool) is logged without its traceback."""
        self.interval_s = interval_s
        self._catch_up = catch_up
        self._on_error = on_error
        self._what, self._expected = what, expected
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="predlog-index", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.interval_s):
            try:
                self._catch_up()
                if failing:
                    logger.info("prediction log %s: indexing works again", self._what)
                failing = False
            except Exception as exc:  # the records stay in the journal: the next tick retries
                if not failing:
                    logger.error("prediction log %s: indexing failed (%s: %s); answered records "
                                 "stay in the %s until it works", self._what,
                                 type(exc).__name__, str(exc).strip(), self._what,
                                 exc_info=not isinstance(exc, self._expected))
                failing = True
                if self._on_error is not None:
                    self._on_error(exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
