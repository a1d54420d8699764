"""A real ``bentoml serve`` on a free loopback port, stopped by its process group at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
BENTOML = str(Path(sys.executable).parent / "bentoml")


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env_overrides: dict[str, str], log: Path, timeout: float = 120.0,
                 preexec_fn=None) -> Server:
    """``preexec_fn``: run in the server's process before it starts (e.g. to lower a limit)."""
    port = free_port()
    env = {**os.environ, **env_overrides}
    with log.open("w") as out:
        process = subprocess.Popen(
            [BENTOML, "serve", "service.service:Classifier", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=preexec_fn,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(server)
    raise RuntimeError(f"server not ready in {timeout} s:\n{server.log_text()[-3000:]}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=10)
    try:  # workers that outlived the arbiter
        os.killpg(server.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def server(digits_model, text_model, tmp_path_factory) -> Server:
    """Both models side by side in one service, as production may run them."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = start_server(
        {"CLF_IMAGE_MODEL": digits_model.tag, "CLF_TEXT_MODEL": text_model.tag, "CLF_WORKERS": "2",
         "CLF_MAX_BODY_BYTES": "300000", "CLF_MAX_IMAGES_PER_REQUEST": "16",
         "CLF_MAX_TEXTS_PER_REQUEST": "16", "CLF_MAX_IMAGE_PIXELS": "1000000"},
        log,
    )
    yield srv
    stop_server(srv)
