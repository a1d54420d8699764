"""How the server starts and stops, as a production server should.

``bentoml serve`` runs as one parent process (circus's arbiter: it holds the listening socket and
spawns the workers) and ``CLF_WORKERS`` worker processes; both import ``service.service``, the
parent first. ``role()`` tells them apart: the parent is the process running the ``bentoml serve``
command (it marks itself in ``_CLF_SERVER_PID``, which its workers inherit), a worker is a process
BentoML started as one; anything else (a test importing the service, ``bentoml build``) is a
"library" import, where none of this applies and errors are raised as usual.

Start. In the parent, before any worker exists, the settings are validated and every configured
model is loaded as a worker would load it (``service.service._preflight``: the tag resolved, the
artifact and its spec read, the tokenizer built, the ONNX graph opened once and dropped). What
fails prints one line, ``error: <reason>``, and ``bentoml serve`` exits 2 within seconds: no worker
is started, nothing is retried. A worker that still cannot start (what only a worker sees: the
prediction log, a GPU session, warm-up) logs its reason, leaves it in the parent's folder
(``_CLF_SERVER_DIR``) and asks the parent to stop (SIGTERM); the parent stops the other workers
and exits 2 with ``error: <reason>``, instead of respawning the worker every 10 s forever (what
BentoML does with a worker that exits).

Stop. SIGTERM (or Ctrl+C) makes each worker drain (``DRAIN``; the mechanics are in
``patches.py``): ``/readyz`` answers 503 at once, a connection opened after the signal is answered
503 ``shutting_down`` (``Retry-After``) and closed, requests already on their way on existing
connections are answered (and logged) and those connections closed after their answer, then the
listening socket closes (new connections are refused), the batchers and the prediction log finish,
and the process exits; all within ``CLF_DRAIN_TIMEOUT_S``, after which the parent kills what is
left. ``bentoml serve`` exits 0.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, NoReturn

logger = logging.getLogger(__name__)
_PARENT_AT_IMPORT = os.getppid()  # a worker imports this first thing, while its arbiter lives

SERVER_PID_ENV = "_CLF_SERVER_PID"  # not CLF_-prefixed: the settings refuse unknown CLF_ names
SERVER_DIR_ENV = "_CLF_SERVER_DIR"
FAILURE_FILE = "worker-start-failure"
EXIT_CANNOT_START = 2  # as `python -m modelstore`: "error: ..." on stderr, exit 2


def role() -> str:
    """``"parent"``, ``"worker"`` or ``"library"`` (see the module docstring)."""
    marked = os.environ.get(SERVER_PID_ENV)
    if marked == str(os.getpid()) or _running_serve_command():
        return "parent"
    if marked is not None:
        return "worker"
    try:
        from modelstore._bentoml import worker_index

        if worker_index() is not None:
            return "worker"
    except (ImportError, AttributeError):
        pass
    return "library"


def _running_serve_command() -> bool:
    """Whether this process is the ``bentoml serve`` command line (import time of the service)."""
    if "bentoml_cli" not in sys.modules:
        return False
    import click

    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.command.name in ("serve", "serve-http")


def mark_parent() -> None:
    """In the serving parent: let the workers find it (its pid) and a folder of its own where a
    worker that cannot start leaves its reason; the folder goes when the parent exits."""
    if os.environ.get(SERVER_PID_ENV) == str(os.getpid()):
        return
    folder = tempfile.mkdtemp(prefix="clfserve-server-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ[SERVER_DIR_ENV] = folder
    os.environ[SERVER_PID_ENV] = str(os.getpid())


def expected(exc: BaseException) -> bool:
    """Whether ``exc`` is one of the project's start-up errors, whose message says what to do."""
    from modelstore.artifact import ArtifactError
    from modelstore.registry import RegistryError
    from preprocessing import SpecError

    from .runtime import RuntimeStartError
    from .settings import SettingsError

    return isinstance(exc, (SettingsError, ArtifactError, RegistryError, RuntimeStartError,
                            SpecError))


def reason(exc: BaseException) -> str:
    """``exc`` as the one line a user reads (anything unexpected gets its type named)."""
    text = str(exc) if expected(exc) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def refuse(why: str) -> NoReturn:
    """The parent cannot start: one line on stderr, exit 2 (no traceback, no worker)."""
    sys.stdout.flush()
    sys.stderr.write(f"error: {why}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_CANNOT_START)


def check_before_start(current_role: str, step: Callable[[], Any]) -> Any:
    """Run a start-up step; where it fails, a server process stops as the module docstring says
    (the parent refuses, a worker stops the server), a library import raises."""
    try:
        return step()
    except Exception as exc:
        if current_role == "parent":
            refuse(reason(exc))
        if current_role == "worker":
            worker_cannot_start(exc)
        raise


def worker_cannot_start(exc: BaseException) -> NoReturn:
    """A worker failed to start: log why, leave the reason for the parent, ask it to stop the
    server, and exit (``os._exit``: nothing of this worker is worth cleaning up, and raising
    would have uvicorn and BentoML print the traceback twice before circus respawns it)."""
    why = reason(exc)
    logger.error("this worker cannot start: %s; stopping the server", why,
                 exc_info=None if expected(exc) else exc)
    folder, parent = os.environ.get(SERVER_DIR_ENV), os.environ.get(SERVER_PID_ENV)
    if folder:
        try:  # the first worker to fail tells the story
            fd = os.open(os.path.join(folder, FAILURE_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            with os.fdopen(fd, "w") as out:
                out.write(why)
        except OSError:
            pass
    if parent and parent.isdigit():
        try:
            os.kill(int(parent), signal.SIGTERM)
        except OSError:
            pass
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_CANNOT_START)


def worker_failure() -> str | None:
    """In the parent: the reason a worker could not start, if one could not."""
    folder = os.environ.get(SERVER_DIR_ENV)
    if not folder:
        return None
    try:
        with open(os.path.join(folder, FAILURE_FILE)) as f:
            return f.read().strip() or "a worker could not start (see the log above)"
    except OSError:
        return None


def exit_if_a_worker_failed() -> None:
    """In the parent, once the arbiter has stopped: exit 2 with the reason a worker could not
    start, if one could not (otherwise ``bentoml serve`` goes on to exit 0)."""
    why = worker_failure()
    if why is not None:
        refuse(why)


class Drain:
    """This worker's shutdown, once SIGTERM has begun it (``patches.py``): which connections were
    open then (their requests are answered) and since when."""

    def __init__(self) -> None:
        self.started_at: float | None = None
        self.old_peers: frozenset[tuple] = frozenset()

    @property
    def active(self) -> bool:
        return self.started_at is not None

    def begin(self, peers: Iterable[Any]) -> bool:
        """Start draining; ``peers``: the client addresses of the connections open now. False if
        it had begun already."""
        if self.started_at is not None:
            return False
        self.old_peers = frozenset(tuple(p) for p in peers if p)
        self.started_at = time.monotonic()
        return True

    def is_old(self, client: Any) -> bool:
        """Whether a connection from ``client`` was open when the drain began (an unknown address,
        e.g. a Unix socket's, counts as old: its request is answered)."""
        return client is None or tuple(client) in self.old_peers

    def refuses(self, scope: dict) -> bool:
        """Whether this request is refused 503 ``shutting_down``: it came on a connection opened
        after the drain began."""
        return self.started_at is not None and not self.is_old(scope.get("client"))

    def reset(self) -> None:  # tests
        self.started_at, self.old_peers = None, frozenset()


DRAIN = Drain()


def exit_with_the_arbiter() -> None:
    """A worker whose ``bentoml serve`` parent dies (SIGKILL, OOM) gets SIGTERM and drains,
    instead of serving on as an orphan that holds the port and writes the log unsupervised
    (found when a replica SIGKILLed in a test kept answering). Linux only; a no-op elsewhere."""
    import ctypes
    import signal

    parent = _PARENT_AT_IMPORT  # the arbiter may have died while this worker was loading
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    except (OSError, AttributeError) as exc:
        logger.warning("a worker will not follow its arbiter's death: %s", exc)
        return
    if os.getppid() != parent:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
