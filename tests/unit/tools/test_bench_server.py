"""The environment a served cell's server gets: one model, the log off unless asked for."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from service.settings import Settings
from tools.bench.bodies import IMAGE_ROUTE, TEXT_ROUTE
from tools.bench.server import WORKERS_READY, Server, ServerSpec

pytestmark = pytest.mark.tools  # the benchmark tool's own tests (fast; in `make test`)


def spec(**kw) -> ServerSpec:
    return ServerSpec(model_tag="m:1", runtime="onnx", workers=2, providers="cpu", port=3390,
                      log_path=Path("server.log"), **kw)  # never opened here


def test_image_cells_serve_the_image_model_alone_with_the_log_off(monkeypatch) -> None:
    monkeypatch.setenv("CLF_TEXT_MODEL", "someone-elses:latest")
    monkeypatch.setenv("CLF_PREDICTION_LOG", "artifacts/predictions.db")
    env = spec().env()
    assert (env["CLF_IMAGE_MODEL"], env["CLF_TEXT_MODEL"]) == ("m:1", "")
    assert env["CLF_PREDICTION_LOG"] == ""
    assert spec().route == IMAGE_ROUTE


def test_text_cells_serve_the_text_model_and_may_log_to_a_given_path(tmp_path) -> None:
    log = str(tmp_path / "d" / "predictions.db")
    s = spec(task="text", prediction_log=log)
    env = s.env()
    assert (env["CLF_IMAGE_MODEL"], env["CLF_TEXT_MODEL"]) == ("", "m:1")
    assert env["CLF_PREDICTION_LOG"] == log
    assert s.route == TEXT_ROUTE


def test_the_server_env_is_one_the_service_accepts(monkeypatch) -> None:
    monkeypatch.setenv("CLF_BENCH_WRK_CPU", "0-1")
    monkeypatch.setenv("CLF_PORT", "9999")
    env = spec(task="text").env()
    assert not [k for k in env if k.startswith("CLF_BENCH_")] and "CLF_PORT" not in env
    settings = Settings.from_env(env)
    assert (settings.text_model, settings.image_model, settings.prediction_log) == ("m:1", "", "")


def test_each_server_gets_a_private_home_linked_to_the_store(tmp_path) -> None:
    import shutil

    from tools.bench.server import private_home

    store = tmp_path / "store"
    (store / "m" / "1").mkdir(parents=True)
    (store / "m" / "1" / "model.onnx").write_bytes(b"x")
    home = private_home(store)
    try:
        assert (home / "models" / "m" / "1" / "model.onnx").read_bytes() == b"x"
        assert spec().env(home)["BENTOML_HOME"] == str(home)
    finally:
        shutil.rmtree(home)
    assert not home.exists() and (store / "m" / "1" / "model.onnx").exists()  # link, not store


def test_socket_owners_and_spread_from_ss_output() -> None:
    from tools.bench.server import socket_owners, spread

    out = ('0 0 127.0.0.1:3390 127.0.0.1:50000 users:(("python3",pid=11,fd=20))\n'
           '0 0 127.0.0.1:3390 127.0.0.1:50001 users:(("python3",pid=11,fd=21))\n'
           '0 0 127.0.0.1:3390 127.0.0.1:50002 users:(("python3",pid=12,fd=20))\n')
    assert socket_owners(out) == {11: 2, 12: 1}
    assert spread({11: 2, 12: 1}, workers=2) == [2, 1]
    assert spread({11: 3}, workers=2) == [3, 0]
    assert socket_owners("") == {}


def test_a_server_is_ready_once_every_worker_has_logged_its_warm_up(tmp_path) -> None:
    """/readyz answers from the first worker ready; the cells wait for all of them."""
    log = tmp_path / "server.log"
    spec = ServerSpec(model_tag="m:1", runtime="onnx", workers=2, providers="cpu", port=1,
                      log_path=log)
    server = Server(spec, lambda line: None)
    assert spec.env()["CLF_LOG_LEVEL"] == "INFO"
    log.write_text(f"[INFO] [entry_service:clfserve:1] {WORKERS_READY}\n")
    assert not server._workers_ready()
    log.write_text(log.read_text() + f"[INFO] [entry_service:clfserve:2] {WORKERS_READY}\n")
    assert server._workers_ready()
    quiet = Server(dataclasses.replace(spec, settings=(("CLF_LOG_LEVEL", "WARNING"),)),
                   lambda line: None)
    log.write_text("")
    assert quiet._workers_ready()  # nothing to wait for in the log: /readyz alone
