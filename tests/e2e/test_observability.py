"""The shipped dashboard and alert rules (deploy/) against a real ``bentoml serve``.

  * the drift gauges exist from the service's start: 0, with a last-run timestamp of 0, before
    any drift report has run (so "no drift report for a day" can fire); the estimated accuracy
    at NaN (so "estimated accuracy dropped" cannot);
  * a real Prometheus (Debian's ``prometheus``) scrapes the service with deploy/prometheus's
    alert rules loaded: every rule evaluates without error, the stale-drift-report alert is
    already pending (no report yet) and the no-replica alert is not;
  * every metric the dashboard and the rules read is in a real scrape of the service, after
    ordinary traffic (answers, a bad input, a feedback label, a drift report's scores).

The tests run in file order: the first two need the state before any drift report.
"""

from __future__ import annotations

import math
import time

import httpx
import pytest

from monitoring.exporter import state_path_for, write_state
from tests.integration.test_alerts import RULES, query_metric_names
from tests.integration.test_prometheus import (PROMETHEUS, _start, _stop, _wait_for, free_port,
                                               needs_prometheus)

from .conftest import start_server, stop_server

TOKEN = "observability-token"
# Series Prometheus makes itself, not the service.
FROM_PROMETHEUS = {"up"}
# Read by the rules or the dashboard, exported by changes still being made. Remove a name once
# its change lands (the test then checks it like the rest).
PENDING: set[str] = set()


@pytest.fixture(scope="module")
def served(digits_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("observability")
    log = work / "predictions.db"
    server = start_server(
        {"CLF_IMAGE_MODEL": digits_model.tag, "CLF_WORKERS": "1",
         "CLF_PREDICTION_LOG": str(log), "CLF_FEEDBACK_TOKEN": TOKEN,
         "CLF_DRIFT_REFRESH_S": "0.5", "CLF_LOG_FORMAT": "json"},
        work / "server.log")
    yield {"server": server, "log": log, "work": work,
           "model": digits_model.tag.split(":")[0]}
    stop_server(server)


def _samples(text: str) -> dict[str, list[str]]:
    """Metric name -> its sample lines, from an exposition."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            out.setdefault(line.split("{", 1)[0].split(" ", 1)[0], []).append(line)
    return out


def _value(lines: list[str], **labels: str) -> float | None:
    for line in lines:
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_the_drift_gauges_exist_at_zero_before_any_report(served):
    assert not state_path_for(served["log"]).exists()
    samples = _samples(httpx.get(f"{served['server'].url}/metrics").text)
    model = served["model"]
    for name in ("clf_drift_detected", "clf_drift_share", "clf_drift_last_run_timestamp_seconds"):
        assert _value(samples.get(name, []), model=model) == 0.0, (name, samples.get(name))
    # no estimate yet: NaN, so ClfEstimatedAccuracyDrop's comparisons are false
    estimated = _value(samples.get("clf_estimated_accuracy", []), model=model)
    assert estimated is not None and math.isnan(estimated), samples.get("clf_estimated_accuracy")
    assert _value(samples.get("clf_ood_reference_rate", []), model=model) == pytest.approx(0.035)


@needs_prometheus
def test_prometheus_evaluates_every_shipped_rule_against_the_service(served, tmp_path):
    port = int(served["server"].url.rsplit(":", 1)[1])
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n  - job_name: clfserve\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{port}']\n")
    prometheus = _start([PROMETHEUS, f"--config.file={config}",
                         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                         f"--web.listen-address=127.0.0.1:{prom_port}"],
                        tmp_path / "prometheus.log")
    try:
        base = f"http://127.0.0.1:{prom_port}"
        _wait_for(f"{base}/-/ready", prometheus, tmp_path / "prometheus.log")
        deadline, rules = time.monotonic() + 30, []
        while time.monotonic() < deadline:
            groups = httpx.get(f"{base}/api/v1/rules", timeout=5).json()["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            stale = next((r for r in rules if r["name"] == "ClfDriftReportStale"), {})
            # Until the first scrape lands, `up` is absent and ClfNoReadyReplica is pending:
            # an evaluation before it says nothing about the service (a race on a slow box).
            ready = next((r for r in rules if r["name"] == "ClfNoReadyReplica"), {})
            evaluated = all(r.get("lastEvaluation", "0001") > "2000" for r in rules)
            if (rules and evaluated and stale.get("state") == "pending"
                    and ready.get("state") == "inactive"):
                break
            time.sleep(0.5)
        broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert rules and not broken, broken
        states = {r["name"]: r["state"] for r in rules}
        assert states["ClfDriftReportStale"] == "pending", states  # no report since the start
        assert states["ClfNoReadyReplica"] == "inactive", states
    finally:
        _stop(prometheus)


def test_every_metric_the_dashboard_and_the_alerts_read_is_in_a_real_scrape(served, digit_pngs):
    url, model = served["server"].url, served["model"]
    with httpx.Client(timeout=30) as client:
        answers = [client.post(f"{url}/v1/classify/image", content=data,
                               headers={"Content-Type": "image/png"}) for data, _ in
                   digit_pngs[:8]]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert client.post(f"{url}/v1/classify/image", content=b"not an image",
                           headers={"Content-Type": "image/png"}).status_code == 415
        feedback = client.post(f"{url}/v1/feedback", headers={"Authorization": f"Bearer {TOKEN}"},
                               json={"request_id": answers[0].json()["request_id"],
                                     "labels": [str(digit_pngs[0][1])]})
        assert feedback.status_code == 200, feedback.text
    # the scores a drift report leaves for the workers (python -m monitoring drift writes this
    # file; tests/e2e/test_serve_monitoring.py runs a real report into it)
    write_state(state_path_for(served["log"]), model, {
        "model": model, "version": "v", "created": time.time(), "dataset_drift": True,
        "share_drifted": 0.5, "rows": [
            {"feature": "brightness", "group": "input", "method": "ks", "score": 1e-9,
             "threshold": 0.0025, "drifted": True},
            {"feature": "contrast", "group": "input", "method": "ks", "score": 0.3,
             "threshold": 0.0025, "drifted": False}],
        "estimated_accuracy": {"value": 0.84, "estimated": 0.84, "by_slice": []}})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        samples = _samples(httpx.get(f"{url}/metrics").text)
        if _value(samples.get("clf_drift_score", []), feature="brightness") is not None:
            break
        time.sleep(0.2)
    read = query_metric_names()
    missing = {name: sorted(where) for name, where in read.items()
               if name not in samples and name not in FROM_PROMETHEUS | PENDING}
    assert not missing, ("read by the dashboard or the alert rules but not in the service's "
                         f"/metrics: {missing}")
    assert _value(samples["clf_drift_detected"], model=model) == 1.0
    assert _value(samples["clf_estimated_accuracy"], model=model) == 0.84


def test_what_the_fast_lane_serves_counts_in_bentomls_request_metrics(served, digit_pngs):
    """The alert rules read BentoML's request metrics; the fast lane (service/lane.py), which
    skips most of BentoML's stack, keeps them counting every answer, by route and status."""
    url = served["server"].url
    endpoint = "/v1/classify/image"

    def counts():
        samples = _samples(httpx.get(f"{url}/metrics").text)
        return tuple(_value(samples.get(name, []), endpoint=endpoint, http_response_code=code)
                     or 0.0 for name, code in [
                         ("bentoml_service_request_total", "200"),
                         ("bentoml_service_request_total", "415"),
                         ("bentoml_service_request_duration_seconds_count", "200")])

    before = counts()
    with httpx.Client(timeout=30) as client:
        for data, _ in digit_pngs[:5]:
            assert client.post(f"{url}{endpoint}", content=data,
                               headers={"Content-Type": "image/png"}).status_code == 200
        assert client.post(f"{url}{endpoint}", content=b"not an image",
                           headers={"Content-Type": "image/png"}).status_code == 415
    after = counts()
    assert [b - a for a, b in zip(before, after)] == [5.0, 1.0, 5.0]
    log = (served["work"] / "server.log").read_text()
    assert "fast lane: admitted requests skip to the route (request metrics kept" in log


def test_the_rules_and_the_dashboard_read_only_the_projects_and_bentomls_metrics():
    for name in query_metric_names():
        assert name.startswith(("clf_", "bentoml_service_")) or name in FROM_PROMETHEUS, name


def test_with_clf_log_format_json_every_log_line_is_one_json_object(served):
    """What a log collector reads (this module's server runs with ``CLF_LOG_FORMAT=json``):
    every line of the server's output, the serving parent's and the worker's, is one object
    with the time, level, logger, component, process and message."""
    import json

    lines = served["server"].log_text().splitlines()
    records = [json.loads(line) for line in lines]  # raises on the first line that is not
    assert len(records) > 10
    for record in records:
        assert {"time", "level", "logger", "component", "pid", "message"} <= set(record), record
        assert record["time"].endswith("+00:00")
    ready = [r for r in records if r["message"] == "warm-up done; ready"]
    assert ready and ready[0]["component"] == "entry_service:clfserve:1"
    assert ready[0]["level"] == "INFO" and ready[0]["logger"].startswith("service")
    assert any(r["component"] == "cli" for r in records)  # the serving parent's lines too
