"""Several replicas, one log: two ``bentoml serve`` replicas (separate ports, one model store,
one real PostgreSQL prediction log) under concurrent load, as the README's deployment recipe
runs them.

  * feedback posted to either replica labels the request wherever it was served;
  * the drift report and the slice report see both replicas' traffic (rows tagged by replica);
  * a promotion is followed by both replicas;
  * a replica SIGKILLed under load loses no record of a request it answered 200.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from modelstore import registry
from monitoring.store import open_log
from tests.conftest import clone_version

from .conftest import ROOT, start_server, stop_server
from .test_serve_monitoring import Load

pytestmark = pytest.mark.slow
NAME = "e2e-replicas"
TOKEN = "replica-token"


@pytest.fixture(scope="module")
def replicas(digits_model, postgres_cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("replicas")
    first = clone_version(digits_model.tag, NAME, work)
    url = postgres_cluster.database()
    common = {"CLF_IMAGE_MODEL": NAME, "CLF_WORKERS": "1", "CLF_PREDICTION_LOG": url,
              "CLF_FEEDBACK_TOKEN": TOKEN, "CLF_SLICE_KEYS": "device=ios|android|web",
              "CLF_RELOAD_INTERVAL_S": "0.5", "CLF_DRIFT_REFRESH_S": "0.5"}
    servers = {}
    try:
        for name in ("a", "b"):
            servers[name] = start_server({**common, "CLF_REPLICA": f"replica-{name}"},
                                         work / f"server-{name}.log")
        yield {"servers": servers, "url": url, "work": work, "first": first,
               "tag": digits_model.tag}
    finally:
        for server in servers.values():
            stop_server(server)


def _classify(server, image: bytes, rid: str) -> dict:
    r = httpx.post(f"{server.url}/v1/classify/image", content=image, timeout=30,
                   headers={"Content-Type": "image/png", "X-Request-ID": rid,
                            "X-Slices": "device=web"})
    assert r.status_code == 200, r.text
    return r.json()


def test_both_replicas_write_one_log_and_feedback_crosses_replicas(replicas, digit_pngs):
    a, b = replicas["servers"]["a"], replicas["servers"]["b"]
    images = [d for d, _ in digit_pngs[:20]]
    with Load(f"{a.url}/v1/classify/image", images, threads=3, max_seconds=20,
              prefix="load-a") as load_a, \
            Load(f"{b.url}/v1/classify/image", images, threads=3, max_seconds=20,
                 prefix="load-b") as load_b:
        load_a.wait_for(100)
        load_b.wait_for(100)
    for load in (load_a, load_b):
        assert {s for _, s, _ in load.results} == {200}
    # Requests served by one replica, labelled through the other.
    served_by_a = [_classify(a, images[i], f"x-a-{i}")["request_id"] for i in range(5)]
    served_by_b = [_classify(b, images[i], f"x-b-{i}")["request_id"] for i in range(5)]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for server, rids in ((b, served_by_a), (a, served_by_b)):
        r = httpx.post(f"{server.url}/v1/feedback", headers=auth, timeout=30,
                       json={"feedback": [{"request_id": rid, "label": "3"} for rid in rids]})
        assert r.status_code == 200, r.text
    with open_log(replicas["url"]) as log:
        stats = log.window_stats(NAME)
        labelled = {x.request_id: x.label for x in log.labelled_inputs(NAME)}
    assert set(stats.replicas) == {"replica-a", "replica-b"}
    assert min(stats.replicas.values()) >= 100
    assert {rid: "3" for rid in served_by_a + served_by_b}.items() <= labelled.items()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitoring", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_reports_see_both_replicas(replicas, bentoml_home):
    url, work = replicas["url"], replicas["work"]
    common = ["--model", NAME, "--log", url, "--since", "1h", "--store", bentoml_home]
    slices = _cli("slices", *common, "--min-count", "5", "--json", str(work / "slices.json"))
    assert slices.returncode == 0, slices.stdout + slices.stderr
    table = json.loads((work / "slices.json").read_text())
    values = {(str(r["slice"]).removeprefix("tag."), r["value"]) for r in table["rows"]}
    assert {("replica", "replica-a"), ("replica", "replica-b")} <= values, slices.stdout
    drift = _cli("drift", *common, "--out", str(work / "drift"))
    assert drift.returncode in (0, 1), drift.stdout + drift.stderr
    report = json.loads((work / "drift" / "drift.json").read_text())
    with open_log(url) as log:
        assert report["current_rows"] == log.window_stats(NAME).rows
    # The verdict is in the database: both replicas' gauges show it.
    deadline = time.monotonic() + 20
    for server in replicas["servers"].values():
        while True:
            text = httpx.get(f"{server.url}/metrics", timeout=10).text
            line = next((x for x in text.splitlines() if x.startswith(
                "clf_drift_last_run_timestamp_seconds{") and NAME in x), "")
            if line and float(line.rsplit(" ", 1)[1]) > 0:
                break
            assert time.monotonic() < deadline, f"{server.url}: no drift verdict in /metrics"
            time.sleep(0.5)


def test_a_promotion_is_followed_by_both_replicas(replicas, digit_pngs):
    second = clone_version(replicas["tag"], NAME, replicas["work"])
    registry.promote(NAME, second, reason="e2e: two replicas follow the pointer")
    image = digit_pngs[0][0]
    deadline = time.monotonic() + 60
    for name, server in replicas["servers"].items():
        while _classify(server, image, f"promo-{name}-{time.monotonic()}")["model_version"] \
                != second:
            assert time.monotonic() < deadline, f"replica {name} still serves the old version"
            time.sleep(0.5)


def test_a_replica_killed_under_load_loses_no_answered_record(replicas, digit_pngs):
    a = replicas["servers"]["a"]
    images = [d for d, _ in digit_pngs[:10]]
    with Load(f"{a.url}/v1/classify/image", images, threads=6, max_seconds=30,
              prefix="kill") as load:
        load.wait_for(150)
        tree = [a.process, *psutil.Process(a.process.pid).children(recursive=True)]
        for proc in tree:  # the whole replica, arbiter and worker (its own process group)
            os.kill(proc.pid, signal.SIGKILL)
        killed_at = len(load.results)
        load.wait_for(killed_at + 20, timeout=5)
    answered = {rid for rid, status, _ in load.results if status == 200}
    assert len(answered) >= 150
    with open_log(replicas["url"]) as log:
        logged = set(log.frame(NAME, since=time.time() - 600)["request_id"])
    lost = answered - logged
    assert not lost, f"{len(lost)} of {len(answered)} answered requests are not in the log"
    b = replicas["servers"]["b"]
    _classify(b, images[0], "after-the-kill")  # the other replica serves on
