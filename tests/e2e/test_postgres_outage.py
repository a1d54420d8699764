"""A real ``bentoml serve`` (two workers) logging to a real PostgreSQL that is stopped under load
and started again (a restart, a failover): with the spool (``CLF_LOG_SPOOL_DIR``, the default)
every request is answered 200 through the outage, ``/metrics`` says the workers are spooling,
and once the database is back every answered request is in it exactly once and the spool is
empty. Its own cluster: stopping the session's would disturb the other tests."""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest

from monitoring import journal
from monitoring.store import open_log

from .conftest import start_server, stop_server
from .test_serve_monitoring import Load

pytestmark = pytest.mark.slow


def _metric(text: str, name: str) -> float | None:
    """The value of an unlabelled sample (or the largest over its labels) in /metrics."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith((name + " ", name + "{"))]
    return max(values) if values else None


@pytest.fixture()
def cluster(own_postgres_cluster):
    return own_postgres_cluster


def test_a_database_restart_under_load_loses_no_answer_and_no_record(cluster, digits_model,
                                                                      digit_pngs, tmp_path):
    url = cluster.database()
    spool = tmp_path / "spool"
    server = start_server({"CLF_IMAGE_MODEL": digits_model.tag, "CLF_WORKERS": "2",
                           "CLF_PREDICTION_LOG": url, "CLF_LOG_SPOOL_DIR": str(spool),
                           "CLF_SLICE_KEYS": "device=ios|android|web",
                           "CLF_RELOAD_INTERVAL_S": "0", "CLF_DRIFT_REFRESH_S": "0"},
                          tmp_path / "server.log")
    spooling = []
    try:
        with Load(f"{server.url}/v1/classify/image", [d for d, _ in digit_pngs[:10]],
                  threads=4, max_seconds=90, prefix="outage") as load:
            load.wait_for(100)
            cluster.pause()
            try:
                paused, down_since = len(load.results), time.monotonic()
                load.wait_for(paused + 300)
                time.sleep(max(0.0, 3.0 - (time.monotonic() - down_since)))  # 3 s at least
                metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
                spooling = [_metric(metrics, "clf_prediction_log_spooling"),
                            _metric(metrics, "clf_prediction_log_spooled_total")]
            finally:
                cluster.resume()
            resumed = len(load.results)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # until the workers commit to it again
                metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
                if _metric(metrics, "clf_prediction_log_spooling") == 0:
                    break
                time.sleep(0.2)
            load.wait_for(len(load.results) + 100)
    finally:
        stop_server(server)  # a graceful stop: each worker replays what its spool still holds
    log_text = server.log_text()
    statuses = Counter(status for _, status, _ in load.results)
    assert set(statuses) == {200}, (statuses, log_text[-3000:])
    assert resumed - paused >= 300, "the load went on while the database was away"
    assert spooling[0] == 1 and spooling[1] > 0, spooling
    assert "takes no writes" in log_text and "takes writes again" in log_text
    answered = [rid for rid, _, _ in load.results]
    with open_log(url) as log:
        logged = [rid for (rid,) in log._read(
            "SELECT request_id FROM predictions WHERE request_id LIKE 'outage-%'")]
    assert sorted(logged) == sorted(answered), (
        f"{len(set(answered) - set(logged))} answered and not logged, "
        f"{len(logged) - len(set(logged))} logged twice")
    left = [f for folder in spool.iterdir() for f in journal.journals(folder)]
    assert not left, left
    assert "Traceback" not in log_text.split("takes no writes")[0], log_text[-3000:]
