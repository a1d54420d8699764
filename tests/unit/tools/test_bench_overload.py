"""The overload cell's parsing and verdict (tools/bench/overload.py), without a server."""

from __future__ import annotations

from service.settings import Settings
from tools.bench.overload import (implied_bound_ms, overload_table, parse_phase,
                                  server_p99_le_ms, verdict, verdict_line)

WRK_OUT = """Running 30s test @ http://127.0.0.1:3471/v1/classify/image
  2 threads and 1000 connections
  74912 requests in 30.03s, 29.10MB read
  Non-2xx or 3xx responses: 70941
Requests/sec:   2494.40
OVERLOAD status=200 count=3971 p50=1121.68 p90=1400.00 p99=1611.44 max=1666.49
OVERLOAD status=503 count=70941 p50=323.23 p90=500.00 p99=767.33 max=947.53
OVERLOAD pending=1000 pending_over_timeout=0 unmatched=0
"""


def test_a_phase_is_parsed_by_status():
    phase = parse_phase("overload", 1000, 2, WRK_OUT)
    assert (phase.count(200), phase.count(503), phase.count(504)) == (3971, 70941, 0)
    assert phase.statuses[200].p99_ms == 1611.44 and phase.statuses[503].max_ms == 947.53
    assert phase.unanswered == 0 and phase.other == 0 and phase.requests == 74912
    late = parse_phase("overload", 1000, 2, WRK_OUT.replace(
        "in 30.03s, 29.10MB read", "in 30.03s, 29.10MB read\n  Socket errors: connect 0, read 0, "
        "write 0, timeout 7").replace("pending_over_timeout=0", "pending_over_timeout=2"))
    assert late.unanswered == 9


def test_the_server_p99_is_read_from_bentomls_histogram_deltas():
    def labels(le):
        return (("endpoint", "/v1/classify/image"), ("http_response_code", "200"), ("le", le))

    def samples(counts):
        return {("bentoml_service_request_duration_seconds_bucket", labels(le)): float(n)
                for le, n in counts.items()}

    before = samples({"0.5": 10, "1.0": 10, "2.5": 10, "+Inf": 10})
    after = samples({"0.5": 60, "1.0": 108, "2.5": 110, "+Inf": 110})
    assert server_p99_le_ms(before, after, "/v1/classify/image") == 2500.0
    assert server_p99_le_ms(before, after, "/v1/classify/image", q=0.5) == 500.0
    assert server_p99_le_ms(before, before, "/v1/classify/image") is None


def test_the_implied_bound_and_the_verdict():
    settings = Settings(max_queue_items=64, request_deadline_ms=1000)
    bound = implied_bound_ms(settings, workers=2, overload_rps=228.0, model_call_ms=37.0)
    assert round(bound["little_ms"]) == 561 and bound["deadline_ms"] == 1037.0
    assert bound["bound_ms"] == bound["deadline_ms"]  # the queue bound is no time bound
    assert implied_bound_ms(Settings(request_deadline_ms=0), 2, 228.0, 37.0)["bound_ms"] is None
    normal = parse_phase("before", 64, 1, WRK_OUT.replace("status=503", "status=999"))
    overload = parse_phase("overload", 1000, 2, WRK_OUT)
    overload.rss_mb = [548.0, 548.2]
    result = {"bound": bound, "rss_before_mb": 521.0, "rss_after_overload_mb": 548.5,
              "rss_after_mb": 548.7, "phases": [normal, overload, normal],
              "max_queue_items": 64, "workers": 2, "request_deadline_ms": 1000.0,
              "model_call_ms_mean": 37.0, "drain_s": 0.0}
    result["verdict"] = v = verdict(result, normal, overload, normal)
    assert v["every_request_answered"] and v["only_200_or_503"]
    assert not v["p99_200_within_bound"] and v["rss_growth_during_mb"] == 0.2
    assert "| overload | 1000 |" in overload_table(result)
    assert "Every request answered within 2 s: yes" in verdict_line(result)
    assert "predicts a mean of 561 ms" in verdict_line(result)
    result["bound"] = implied_bound_ms(Settings(request_deadline_ms=2000), 2, 228.0, 37.0)
    assert verdict(result, normal, overload, normal)["p99_200_within_bound"]  # 1611 <= 2037
