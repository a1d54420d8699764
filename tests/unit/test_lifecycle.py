"""Start-up and stop (service/lifecycle.py), in process: who is the parent, what a start-up error
becomes, the drain's refusals, readiness and the CLF_DRAIN_TIMEOUT_S setting. The real thing (a
``bentoml serve`` refusing to start, SIGTERM under load) is tests/e2e/test_start_stop.py; the
uvicorn drain itself is tests/integration/test_graceful_drain.py."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from service import lifecycle
from service.app import STATUS, App
from service.lifecycle import DRAIN
from service.settings import Settings, SettingsError


@pytest.fixture(autouse=True)
def no_drain():
    DRAIN.reset()
    yield
    DRAIN.reset()


def call(app: App, method: str, path: str, client: tuple | None, body: bytes = b"",
         chunks: int = 1) -> tuple[int, dict, dict, int]:
    """The status, JSON answer, headers, and how many body chunks the app read."""
    sent: list[dict] = []
    pieces = [body[i::chunks] for i in range(chunks)] if chunks > 1 else [body]
    read = 0

    async def receive() -> dict:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": pieces[read - 1], "more_body": read < len(pieces)}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "query_string": b"",
             "headers": [(b"content-type", b"image/png")], "client": client}
    asyncio.run(app(scope, receive, send))
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], json.loads(sent[1]["body"]), headers, read


def test_a_library_import_is_neither_parent_nor_worker(monkeypatch) -> None:
    monkeypatch.delenv(lifecycle.SERVER_PID_ENV, raising=False)
    assert lifecycle.role() == "library"
    monkeypatch.setenv(lifecycle.SERVER_PID_ENV, str(os.getpid()))
    assert lifecycle.role() == "parent"
    monkeypatch.setenv(lifecycle.SERVER_PID_ENV, str(os.getpid() + 1))
    assert lifecycle.role() == "worker"


def test_a_library_import_raises_start_up_errors_as_they_are() -> None:
    def bad() -> None:
        raise SettingsError("CLF_TOP_K must be >= 1")

    with pytest.raises(SettingsError):
        lifecycle.check_before_start("library", bad)


def test_the_parent_refuses_with_one_line_and_exit_2(capsys) -> None:
    def bad() -> None:
        raise SettingsError("CLF_TOP_K must\nbe >= 1")

    with pytest.raises(SystemExit) as info:
        lifecycle.check_before_start("parent", bad)
    assert info.value.code == lifecycle.EXIT_CANNOT_START == 2
    assert capsys.readouterr().err == "error: CLF_TOP_K must be >= 1\n"


def test_an_unexpected_error_is_named_by_its_type() -> None:
    assert lifecycle.reason(KeyError("spec")) == "KeyError: 'spec'"
    assert lifecycle.reason(SettingsError("CLF_X is bad")) == "CLF_X is bad"


def test_the_parent_reads_the_reason_a_worker_left(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv(lifecycle.SERVER_DIR_ENV, str(tmp_path))
    assert lifecycle.worker_failure() is None
    lifecycle.exit_if_a_worker_failed()  # nothing failed: returns
    (tmp_path / lifecycle.FAILURE_FILE).write_text("CLF_PREDICTION_LOG='/x' cannot be opened\n")
    with pytest.raises(SystemExit) as info:
        lifecycle.exit_if_a_worker_failed()
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: CLF_PREDICTION_LOG='/x' cannot be opened\n"


def test_the_drain_remembers_the_connections_open_when_it_began() -> None:
    assert not DRAIN.active and not DRAIN.refuses({"client": ("127.0.0.1", 5000)})
    assert DRAIN.begin([("127.0.0.1", 5000), None, ["127.0.0.1", 5001]])
    assert not DRAIN.begin([("127.0.0.1", 6000)])  # once
    assert DRAIN.active
    assert not DRAIN.refuses({"client": ("127.0.0.1", 5000)})
    assert not DRAIN.refuses({"client": ["127.0.0.1", 5001]})
    assert DRAIN.refuses({"client": ("127.0.0.1", 6000)})
    assert not DRAIN.refuses({"client": None})  # a Unix socket's peer: cannot tell, answered


def test_shutting_down_is_a_503_reason() -> None:
    assert STATUS["shutting_down"] == 503


@pytest.mark.parametrize("path", ["/v1/classify/image", "/v1/models"])
def test_a_new_connection_while_draining_gets_503_once_its_body_is_read(path: str) -> None:
    DRAIN.begin([("127.0.0.1", 5000)])
    method = "GET" if path.endswith("models") else "POST"
    status, doc, headers, read = call(App(), method, path, ("127.0.0.1", 6000),
                                      body=b"x" * 3000, chunks=3)
    assert status == 503 and doc["error"]["reason"] == "shutting_down"
    assert headers["retry-after"] == "1"
    assert read == 3  # the whole body, so closing the connection after the answer resets nothing


def test_a_v2_request_on_a_new_connection_gets_the_v2_error_shape() -> None:
    DRAIN.begin([])
    status, doc, _, _ = call(App(), "POST", "/v2/models/digits/infer", ("127.0.0.1", 6000))
    assert status == 503 and doc["reason"] == "shutting_down" and isinstance(doc["error"], str)


def test_a_request_on_a_connection_open_before_the_drain_is_served_as_usual() -> None:
    DRAIN.begin([("127.0.0.1", 5000)])
    status, doc, _, _ = call(App(), "POST", "/v1/classify/image", ("127.0.0.1", 5000))
    assert doc["error"]["reason"] == "not_ready"  # the usual answer of an app with no model


def test_readiness_turns_off_when_the_drain_begins() -> None:
    from service.service import Classifier

    class Ready:
        ready = True

    fake = type("Fake", (), {"models": [Ready()]})()
    assert Classifier.inner.__is_ready__(fake)
    DRAIN.begin([])
    assert not Classifier.inner.__is_ready__(fake)


@pytest.mark.parametrize("value, ok", [("25", True), ("1", True), ("0", False), ("-3", False),
                                       ("4000", False), ("nan", False)])
def test_the_drain_timeout_is_validated(value: str, ok: bool) -> None:
    env = {"CLF_DRAIN_TIMEOUT_S": value}
    if ok:
        assert Settings.from_env(env).drain_timeout_s == float(value)
    else:
        with pytest.raises(SettingsError, match="CLF_DRAIN_TIMEOUT_S"):
            Settings.from_env(env)
