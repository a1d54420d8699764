"""Monitoring and the model lifecycle against a real ``bentoml serve`` with 2 workers.

  * hot reload: a version promoted while clients hammer the server takes over with zero
    non-2xx answers, and answers and /metrics name the version that served them;
  * durability: a worker killed with SIGKILL under load loses no record of a request that was
    answered 200;
  * a real Prometheus scrapes the service: the project's metrics and a drift gauge (from a real
    ``python -m monitoring drift`` run over the logged traffic) come back from PromQL, and
    ``promtool check metrics`` finds no problem in the exposition.
"""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from monitoring.store import open_log
from tests.conftest import clone_version
from tests.integration.test_prometheus import (PROMTOOL, _query_until_found, _stop,
                                               _wait_for, free_port, needs_prometheus,
                                               start_prometheus)

from .conftest import ROOT, start_server, stop_server

NAME = "e2e-digits"
TOKEN = "e2e-token"


@pytest.fixture(scope="module")
def served(digits_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve-monitoring")
    first = clone_version(digits_model.tag, NAME, work)
    log_path = work / "predictions.db"
    server = start_server(
        {"CLF_IMAGE_MODEL": NAME, "CLF_WORKERS": "2", "CLF_PREDICTION_LOG": str(log_path),
         "CLF_FEEDBACK_TOKEN": TOKEN, "CLF_SLICE_KEYS": "device=ios|android|web",
         "CLF_RELOAD_INTERVAL_S": "0.5", "CLF_DRIFT_REFRESH_S": "0.5"},
        work / "server.log")
    yield {"server": server, "log": log_path, "work": work, "first": first,
           "tag": digits_model.tag}
    stop_server(server)


class Load:
    """Client threads posting digits until stopped (bounded by ``max_seconds``); records the
    request id, status and model version of every answer (status 0 = no HTTP answer)."""

    def __init__(self, url: str, images: list[bytes], threads: int = 6, max_seconds: float = 60,
                 prefix: str = "load"):
        self.url, self.images, self.prefix = url, images, prefix
        self.results: list[tuple[str, int, str]] = []
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._deadline = time.monotonic() + max_seconds
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _run(self, index: int) -> None:
        with httpx.Client(timeout=30.0) as client:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                rid = f"{self.prefix}-{index}-{next(self._ids)}"
                data = self.images[len(self.results) % len(self.images)]
                try:
                    r = client.post(self.url, content=data, headers={
                        "Content-Type": "image/png", "X-Request-ID": rid,
                        "X-Slices": "device=ios"})
                    version = r.json().get("model_version", "") if r.status_code == 200 else ""
                    self.results.append((rid, r.status_code, version))
                except httpx.HTTPError:
                    self.results.append((rid, 0, ""))

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.results) < count and time.monotonic() < deadline:
            time.sleep(0.05)


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_promoted_version_takes_over_under_load_with_no_failed_request(served, digit_pngs):
    from modelstore import registry

    server = served["server"]
    url = f"{server.url}/v1/classify/image"
    second = clone_version(served["tag"], NAME, served["work"])
    broken = clone_version(served["tag"], NAME, served["work"], corrupt=True)
    try:
        images = [d for d, _ in digit_pngs[:10]]
        with Load(url, images) as load:
            load.wait_for(100)
            registry.promote(NAME, second, reason="e2e: hot reload")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(v == second for _, _, v in load.results[-20:]):
                time.sleep(0.1)
            switched_at = len(load.results)
            load.wait_for(switched_at + 100)
            registry.promote(NAME, broken, reason="e2e: a version that cannot load")
            time.sleep(3)  # both workers try it, refuse it and keep serving
            load.wait_for(len(load.results) + 50)
        statuses = [s for _, s, _ in load.results]
        assert statuses and all(s == 200 for s in statuses), (
            f"{sum(s != 200 for s in statuses)} of {len(statuses)} requests failed during the "
            f"switch: statuses {sorted(set(statuses))} (0 = no HTTP answer)")
        versions = [v for _, _, v in load.results]
        assert served["first"] in versions and second in versions and broken not in versions
        assert set(versions[-40:]) == {second}  # every worker serves the new version, none the broken
        metrics = httpx.get(f"{server.url}/metrics").text
        assert _metric(metrics, "clf_model_info", model=NAME, version=second) == 1.0
        assert _metric(metrics, "clf_model_info", model=NAME, version=served["first"]) == 0.0
        assert _metric(metrics, "clf_model_reloads_total", model=NAME, result="loaded") == 2.0
        assert _metric(metrics, "clf_model_reloads_total", model=NAME, result="failed") == 2.0
        assert _metric(metrics, "clf_predictions_total", model=NAME, version=second) > 0
        assert "failed to load" in server.log_text()
    finally:  # a failure here must not leave the module's server on a version it cannot load
        registry.promote(NAME, second, reason="e2e: restore a loadable production version")


def _predictions(metrics: str) -> float:
    """clf_predictions_total of this module's model, all versions and classes."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("clf_predictions_total{") and f'model="{NAME}"' in line)


def _workers(server) -> list[psutil.Process]:
    """The serving processes: descendants of ``bentoml serve`` that import the service."""
    procs = psutil.Process(server.process.pid).children(recursive=True)
    return [p for p in procs if "worker" in " ".join(p.cmdline())]


def test_a_worker_killed_under_load_loses_no_answered_request(served, digit_pngs):
    server = served["server"]
    workers = _workers(server)
    assert len(workers) >= 2, [p.cmdline() for p in psutil.Process(server.process.pid).children(True)]
    images = [d for d, _ in digit_pngs[:10]]
    with Load(f"{server.url}/v1/classify/image", images, threads=8) as load:
        load.wait_for(200)
        os.kill(workers[0].pid, signal.SIGKILL)
        killed_at = len(load.results)
        load.wait_for(killed_at + 200)
    answered = {rid for rid, status, _ in load.results if status == 200}
    assert len([1 for _, s, _ in load.results[killed_at:] if s == 200]) > 0  # still serving
    # The killed worker's answered records are in its journal (monitoring/journal.py): whoever
    # reads the log next indexes them. Then the bare file has every one of them.
    with open_log(served["log"]) as log:
        log.catch_up()
    db = sqlite3.connect(served["log"])
    try:
        logged = {rid for (rid,) in db.execute(
            "SELECT DISTINCT request_id FROM predictions WHERE request_id LIKE 'load-%'")}
    finally:
        db.close()
    lost = answered - logged
    assert not lost, f"{len(lost)} of {len(answered)} answered requests are not in the log"


@needs_prometheus
def test_prometheus_scrapes_the_service_with_a_drift_gauge(served, tmp_path, bentoml_home):
    server = served["server"]
    drift = subprocess.run(
        [sys.executable, "-m", "monitoring", "drift", "--model", NAME, "--log", str(served["log"]),
         "--since", "1h", "--until", "now", "--out", str(tmp_path / "drift")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "BENTOML_HOME": bentoml_home})
    assert drift.returncode in (0, 1), drift.stdout + drift.stderr  # 2 would be "no report"
    deadline = time.monotonic() + 20  # the workers refresh their drift gauges every 0.5 s
    while time.monotonic() < deadline and "clf_drift_detected{" not in httpx.get(f"{server.url}/metrics").text:
        time.sleep(0.2)
    exposition = httpx.get(f"{server.url}/metrics").text
    if os.access(PROMTOOL, os.X_OK):
        lint = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, text=True,
                              capture_output=True, timeout=30)
        problems = [line for line in (lint.stdout + lint.stderr).splitlines()
                    if line.startswith("clf_")]  # BentoML's own series are not ours to fix
        assert not problems, problems
    port = int(server.url.rsplit(":", 1)[1])
    prom_port = free_port()
    prometheus = start_prometheus(tmp_path, "clfserve", port, prom_port)
    try:
        base = f"http://127.0.0.1:{prom_port}"
        _wait_for(f"{base}/-/ready", prometheus, tmp_path / "prometheus.log")
        total = _query_until_found(base, f'sum(clf_predictions_total{{model="{NAME}"}})', prometheus)
        assert float(total[0]["value"][1]) > 0
        detected = _query_until_found(base, f'clf_drift_detected{{model="{NAME}"}}', prometheus)
        assert float(detected[0]["value"][1]) in (0.0, 1.0)
        assert _query_until_found(base, f'clf_drift_score{{model="{NAME}"}}', prometheus)
        assert _query_until_found(base, f'clf_ood_flagged_total{{model="{NAME}"}}', prometheus)
    finally:
        _stop(prometheus)


def test_a_second_server_on_the_same_store_keeps_its_metrics_apart(served, digits_model, digit_pngs):
    """BentoML 1.4 shares (and empties at start) one metrics directory per BENTOML_HOME; each
    server here has its own (service/patches.py), so neither wipes nor reports the other's."""
    first = served["server"]
    before = _predictions(httpx.get(f"{first.url}/metrics").text)
    httpx.post(f"{first.url}/v1/classify/image", content=digit_pngs[0][0],
               headers={"Content-Type": "image/png"})
    second = start_server({"CLF_IMAGE_MODEL": digits_model.tag, "CLF_WORKERS": "1",
                           "CLF_PREDICTION_LOG": ""}, served["work"] / "second.log")
    try:
        for data, _ in digit_pngs[:5]:
            assert httpx.post(f"{second.url}/v1/classify/image", content=data,
                              headers={"Content-Type": "image/png"}).status_code == 200
        first_metrics = httpx.get(f"{first.url}/metrics").text
        second_metrics = httpx.get(f"{second.url}/metrics").text
    finally:
        stop_server(second)
    name = digits_model.tag.split(":")[0]
    assert f'model="{name}"' not in first_metrics
    assert f'model="{NAME}"' not in second_metrics
    assert _predictions(first_metrics) == before + 1  # nothing of the first server's was wiped
