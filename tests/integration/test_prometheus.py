"""Drift gauges reach a real Prometheus, and the exposition passes ``promtool check metrics``.

A real Prometheus (Debian's ``prometheus`` package: ``apt-get install -y prometheus``) scrapes
the standalone exporter (``python -m monitoring exporter``) on loopback; a PromQL query over its
HTTP API must return the drift gauges. Skipped, with the reason, where the binary is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from monitoring.exporter import DriftCollector, DriftGauges, metric_samples, write_state

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
needs_prometheus = pytest.mark.skipif(
    not os.access(PROMETHEUS, os.X_OK),
    reason="no prometheus binary: install Debian's package (apt-get install -y prometheus)")

ENTRY = {
    "model": "digits-cnn", "version": "v1", "created": 1_700_000_000.0, "dataset_drift": True,
    "share_drifted": 0.25,
    "rows": [
        {"feature": "brightness", "group": "input", "method": "ks", "score": 1e-12,
         "threshold": 0.0025, "drifted": True},
        {"feature": "embedding.pc1", "group": "embedding", "method": "ks", "score": 0.4,
         "threshold": 0.0025, "drifted": False},
    ],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def start_prometheus(folder: Path, job: str, target_port: int, port: int) -> subprocess.Popen:
    """Debian's prometheus on 127.0.0.1:``port`` scraping 127.0.0.1:``target_port`` every second."""
    config = folder / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: {job}\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n")
    return _start([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}",
                   f"--web.listen-address=127.0.0.1:{port}"], folder / "prometheus.log")


def _wait_for(url: str, process: subprocess.Popen, log: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited:\n{log.read_text()[-2000:]}")
        try:
            response = httpx.get(url, timeout=1.0)
            if response.status_code == 200:
                return response.text
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready in {timeout} s:\n{log.read_text()[-2000:]}")


def test_collector_and_gauges_expose_the_same_series(tmp_path) -> None:
    from prometheus_client import CollectorRegistry

    state = tmp_path / "drift_latest.json"
    write_state(state, "digits-cnn", ENTRY)
    collected, gauged = CollectorRegistry(), CollectorRegistry()
    collected.register(DriftCollector(state))
    DriftGauges(gauged).refresh(state)
    for registry in (collected, gauged):
        assert registry.get_sample_value("clf_drift_detected", {"model": "digits-cnn"}) == 1.0
        assert registry.get_sample_value("clf_drift_share", {"model": "digits-cnn"}) == 0.25
        assert registry.get_sample_value(
            "clf_drift_score", {"model": "digits-cnn", "feature": "brightness"}) == 1e-12
    assert metric_samples({})["clf_drift_score"] == []  # no report yet: no series, no error


@needs_prometheus
def test_prometheus_scrapes_the_drift_gauges(tmp_path) -> None:
    state = tmp_path / "drift_latest.json"
    write_state(state, "digits-cnn", ENTRY)
    exporter_port, prom_port = free_port(), free_port()
    exporter = _start([sys.executable, "-m", "monitoring", "exporter", "--state", str(state),
                       "--port", str(exporter_port)], tmp_path / "exporter.log")
    prometheus = None
    try:
        text = _wait_for(f"http://127.0.0.1:{exporter_port}/metrics", exporter,
                         tmp_path / "exporter.log")
        if os.access(PROMTOOL, os.X_OK):
            lint = subprocess.run([PROMTOOL, "check", "metrics"], input=text, text=True,
                                  capture_output=True, timeout=30)
            assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr
        prometheus = start_prometheus(tmp_path, "clf-monitoring", exporter_port, prom_port)
        base = f"http://127.0.0.1:{prom_port}"
        _wait_for(f"{base}/-/ready", prometheus, tmp_path / "prometheus.log")
        result = _query_until_found(base, 'clf_drift_score{feature="brightness"}', prometheus)
        assert result[0]["metric"]["model"] == "digits-cnn"
        assert float(result[0]["value"][1]) == pytest.approx(1e-12)
        detected = _query_until_found(base, "clf_drift_detected", prometheus)
        assert float(detected[0]["value"][1]) == 1.0
    finally:
        if prometheus is not None:
            _stop(prometheus)
        _stop(exporter)


def _query_until_found(base: str, promql: str, process: subprocess.Popen,
                       timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "prometheus exited"
        body = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=5.0).json()
        if body["status"] == "success" and body["data"]["result"]:
            return body["data"]["result"]
        time.sleep(0.5)
    raise AssertionError(f"no result for {promql} in {timeout} s: {json.dumps(body)[:500]}")


def test_served_models_have_their_drift_gauges_at_zero_before_any_report(tmp_path) -> None:
    """The service names its models: their per-model series exist from the start (last run at
    timestamp 0), so an alert on a stale report has a series to fire on."""
    from prometheus_client import CollectorRegistry

    state = tmp_path / "drift_latest.json"  # not written yet
    collected, gauged = CollectorRegistry(), CollectorRegistry()
    collected.register(DriftCollector(state, ["digits-cnn"]))
    gauges = DriftGauges(gauged)
    gauges.refresh(state, ["digits-cnn"])
    for registry in (collected, gauged):
        for name in ("clf_drift_detected", "clf_drift_share",
                     "clf_drift_last_run_timestamp_seconds"):
            assert registry.get_sample_value(name, {"model": "digits-cnn"}) == 0.0, name
        assert registry.get_sample_value(
            "clf_drift_score", {"model": "digits-cnn", "feature": "brightness"}) is None
    write_state(state, "digits-cnn", ENTRY)
    gauges.refresh(state, ["digits-cnn"])
    assert gauged.get_sample_value("clf_drift_last_run_timestamp_seconds",
                                   {"model": "digits-cnn"}) == ENTRY["created"]


def test_the_estimated_accuracy_gauge_is_nan_until_a_report_has_one(tmp_path) -> None:
    """``clf_estimated_accuracy{model}`` exists from the start at NaN (a rule comparing it is
    false; 0 would read as every answer wrong), then follows the report's estimate."""
    import math

    from prometheus_client import CollectorRegistry

    state = tmp_path / "drift_latest.json"
    collected, gauged = CollectorRegistry(), CollectorRegistry()
    collected.register(DriftCollector(state, ["digits-cnn"]))
    gauges = DriftGauges(gauged)
    gauges.refresh(state, ["digits-cnn"])
    for registry in (collected, gauged):
        assert math.isnan(registry.get_sample_value("clf_estimated_accuracy",
                                                    {"model": "digits-cnn"}))
    write_state(state, "digits-cnn", ENTRY)  # a report without an estimate: still NaN
    gauges.refresh(state, ["digits-cnn"])
    assert math.isnan(gauged.get_sample_value("clf_estimated_accuracy", {"model": "digits-cnn"}))
    write_state(state, "digits-cnn", {**ENTRY, "estimated_accuracy": {
        "value": 0.87, "estimated": 0.87, "low": 0.84, "high": 0.9, "by_slice": []}})
    gauges.refresh(state, ["digits-cnn"])
    for registry in (collected, gauged):
        assert registry.get_sample_value("clf_estimated_accuracy",
                                         {"model": "digits-cnn"}) == 0.87
