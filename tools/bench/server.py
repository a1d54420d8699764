"""One ``bentoml serve service.service:Classifier`` under test: start, wait, talk, stop by PID.

The service is configured only through ``CLF_*`` variables: one model (image or text, the other
one off) and the prediction log set explicitly ("" = off, so no cell ever writes into the
repository's artifacts/). It is started in its own session on 127.0.0.1 and stopped in a
``finally``: SIGTERM to the leader, then SIGTERM and later SIGKILL to every remaining PID of its
process tree (circus puts workers in sessions of their own).

Each server gets a BENTOML_HOME of its own (a temporary folder whose ``models`` links to the
bench's model store): ``bentoml serve`` empties ``$BENTOML_HOME/prometheus_multiproc_dir`` when
it starts, so two servers sharing a home (another developer's, a test's) delete each other's
metric files, and /metrics silently answers for the wrong server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .bodies import IMAGE_ROUTE, TEXT_ROUTE
from .config import REPO_ROOT
from .cpu import ProcessTree
from .prometheus import Samples, parse_samples

ROUTES = {"image": IMAGE_ROUTE, "text": TEXT_ROUTE}
MODEL_SETTINGS = {"image": "CLF_IMAGE_MODEL", "text": "CLF_TEXT_MODEL"}
BENCH_PREFIX = "CLF_BENCH_"  # e.g. CLF_BENCH_WRK_CPU (wrk.py): the bench's, not the service's


class ServerError(RuntimeError):
    """The server did not start, did not answer, or answered wrongly."""


# what each worker logs once its models are warm and timed (service/service.py)
WORKERS_READY = "warm-up done; ready"


@dataclass(frozen=True)
class ServerSpec:
    model_tag: str
    runtime: str  # "onnx", or "noop" for the request path's floor
    workers: int
    providers: str
    port: int
    log_path: Path
    task: str = "image"  # which model setting gets model_tag; the other model is off
    prediction_log: str = ""  # CLF_PREDICTION_LOG: "" = off (serving alone)
    cwd: Path | None = None  # the source tree to serve from (default: this repository)
    settings: tuple[tuple[str, str], ...] = ()  # more CLF_ settings, (name, value)

    @property
    def route(self) -> str:
        return ROUTES[self.task]

    def env(self, bentoml_home: Path | None = None) -> dict[str, str]:
        env = dict(os.environ, BENTOML_DO_NOT_TRACK="true", PYTHONUNBUFFERED="1",
                   CLF_IMAGE_MODEL="", CLF_TEXT_MODEL="", CLF_RUNTIME=self.runtime,
                   CLF_WORKERS=str(self.workers), CLF_PROVIDERS=self.providers,
                   CLF_PREDICTION_LOG=self.prediction_log,
                   CLF_LOG_LEVEL="INFO")  # Server.start waits for each worker's ready line
        env[MODEL_SETTINGS[self.task]] = self.model_tag
        env.update(self.settings)
        env.pop("CLF_PORT", None)  # the port comes from the command line
        env.pop("CLF_HOST", None)
        for key in [k for k in env if k.startswith(BENCH_PREFIX)]:
            del env[key]  # the bench's own knobs; the service refuses CLF_ names it does not know
        if bentoml_home is not None:
            env["BENTOML_HOME"] = str(bentoml_home)
        return env


def private_home(model_store: Path) -> Path:
    """A fresh BENTOML_HOME whose ``models`` is a link to ``model_store`` (see the module doc)."""
    home = Path(tempfile.mkdtemp(prefix="clfbench-bentoml-"))
    (home / "models").symlink_to(model_store.resolve(), target_is_directory=True)
    return home


class Server:
    def __init__(self, spec: ServerSpec, log: Callable[[str], None]) -> None:
        self.spec = spec
        self.log = log
        self.base = f"http://127.0.0.1:{spec.port}"
        self.proc: subprocess.Popen | None = None
        self.tree: ProcessTree | None = None
        self.startup_s: float | None = None
        self.home: Path | None = None

    @property
    def classify_url(self) -> str:
        return self.base + self.spec.route

    def start(self, timeout_s: float) -> None:
        if _port_in_use(self.spec.port):
            raise ServerError(f"port {self.spec.port} on 127.0.0.1 is in use by another process; "
                              "pick another with --port")
        from .store import store_path  # lazily: store imports this module

        bentoml = Path(sys.executable).with_name("bentoml")
        cmd = [str(bentoml), "serve", "service.service:Classifier", "--host", "127.0.0.1",
               "--port", str(self.spec.port)]
        self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.home = private_home(Path(store_path()))
        t0 = time.monotonic()
        with open(self.spec.log_path, "wb") as logf:
            self.proc = subprocess.Popen(cmd, cwd=self.spec.cwd or REPO_ROOT,
                                         env=self.spec.env(self.home),
                                         stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.tree = ProcessTree(self.proc.pid)
        self.log(f"  [server] pid {self.proc.pid}: CLF_RUNTIME={self.spec.runtime} "
                 f"{MODEL_SETTINGS[self.spec.task]}={self.spec.model_tag} "
                 f"CLF_WORKERS={self.spec.workers} "
                 f"CLF_PREDICTION_LOG={self._log_target() or '(off)'} port {self.spec.port}")
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with rc={self.proc.returncode} during start-up:\n"
                                  + self.log_tail())
            if time.monotonic() - t0 > timeout_s:
                raise ServerError(f"/readyz not 200 after {timeout_s:.0f} s:\n" + self.log_tail())
            if self._get_status("/readyz") == 200 and self._workers_ready():
                break
            time.sleep(0.25)
        self.startup_s = time.monotonic() - t0

    def _workers_ready(self) -> bool:
        """Whether every worker has logged the end of its warm-up (``WORKERS_READY``). /readyz
        answers from whichever worker takes the connection, the first one ready: the others
        may still be warming up and timing their calls, one at a time, and a cell started then
        loads the cores under that timing (measured: 1 of 2 workers had logged it when /readyz
        first said 200) and counts a warm-up as served traffic."""
        if dict(self.spec.settings).get("CLF_LOG_LEVEL", "INFO").upper() not in ("INFO", "DEBUG"):
            return True  # the lines are not logged: /readyz alone, as before
        return self.log_tail(1 << 22).count(WORKERS_READY) >= self.spec.workers

    def _log_target(self) -> str:
        from monitoring.store import display_target

        target = dict(self.spec.settings).get("CLF_PREDICTION_LOG", self.spec.prediction_log)
        return display_target(target) if target else ""

    def stop(self, grace_s: float = 20.0) -> list[int]:
        """Stop the whole tree by PID; returns PIDs still alive afterwards (none, normally)."""
        left = stop_tree(self.proc, self.tree, self.log, grace_s)
        if not left and self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)  # the link only, never the store
        return left

    def metrics(self) -> Samples:
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
            return parse_samples(r.read().decode())

    def post_classify(self, body: bytes, headers: list[str]) -> tuple[int, dict]:
        request = urllib.request.Request(self.classify_url, data=body, method="POST")
        for header in headers:
            key, _, value = header.partition(":")
            request.add_header(key.strip(), value.strip())
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def connections_per_worker(self) -> list[int] | None:
        """Established client connections held by each worker now, most first (a worker with
        none counts 0); None where ``ss`` cannot say which process owns a socket."""
        try:
            out = subprocess.run(["ss", "-tnpH", "state", "established",
                                  f"( sport = :{self.spec.port} )"], capture_output=True,
                                 text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        per_pid = socket_owners(out)
        if not per_pid:
            return None
        return spread(per_pid, self.spec.workers)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.spec.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"

    def _get_status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(self.base + path, timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (OSError, ValueError):
            return None


@contextmanager
def running(spec: ServerSpec, log: Callable[[str], None],
            timeout_s: float = 120.0) -> Iterator[Server]:
    """A started server that is stopped, with its whole process tree, however the block ends."""
    server = Server(spec, log)
    try:
        server.start(timeout_s)
        yield server
    finally:
        left = server.stop()
        if left:
            log(f"  [server] could not stop PIDs {left}; stop them by hand")


def stop_tree(proc: subprocess.Popen | None, tree: ProcessTree | None,
              log: Callable[[str], None], grace_s: float = 20.0) -> list[int]:
    """SIGTERM to the leader, then SIGTERM and later SIGKILL to every remaining PID of its tree;
    returns PIDs still alive afterwards (none, normally)."""
    if proc is None or tree is None:
        return []
    tree.refresh()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log(f"  [server] leader {proc.pid} alive after {grace_s:.0f} s: SIGKILL")
            proc.kill()
            proc.wait(timeout=10)
    for sig, wait_s in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 5.0)):
        left = sorted(tree.refresh() - {proc.pid})
        if not left:
            break
        log(f"  [server] {len(left)} leftover process(es) of {proc.pid}: {sig.name} {left}")
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and tree.refresh() - {proc.pid}:
            time.sleep(0.2)
    left = sorted(tree.refresh() - {proc.pid})
    if left:
        log(f"  [server] WARNING: still alive after SIGKILL: {left}")
    return left


def socket_owners(ss_output: str) -> dict[int, int]:
    """``ss -tnpH`` lines -> sockets per owning pid (a socket shared by several counts once
    for each)."""
    owners: dict[int, int] = {}
    for line in ss_output.splitlines():
        for pid in set(re.findall(r"pid=(\d+)", line)):
            owners[int(pid)] = owners.get(int(pid), 0) + 1
    return owners


def spread(per_pid: dict[int, int], workers: int) -> list[int]:
    """Connections per worker, most first, padded with 0 for workers that hold none."""
    counts = sorted(per_pid.values(), reverse=True)
    return counts + [0] * (workers - len(counts))


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0
