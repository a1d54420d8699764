"""Parsing wrk's report: counts, errors, percentiles in every unit wrk prints."""

from __future__ import annotations

import pytest

from tools.bench.wrk import WrkError, parse_wrk, to_ms, wrk_command

pytestmark = pytest.mark.tools  # the benchmark tool's own tests (fast; in `make test`)

MEASURED = """\
Running 3s test @ http://127.0.0.1:3321/v1/classify/image
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    68.64ms   20.29ms    1.44s    81.50%
    Req/Sec     0.92k   212.35     1.29k    56.67%
  Latency Distribution
     50%  812.00us
     75%   71.53ms
     90%    1.01s
     99%    1.20m
  2758 requests in 3.02s, 1.14MB read
  Socket errors: connect 0, read 12, write 1, timeout 3
  Non-2xx or 3xx responses: 5
Requests/sec:    913.71
Transfer/sec:    388.15KB
"""

WARMUP = """\
Running 1s test @ http://127.0.0.1:3390/v1/classify/image
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.10ms    1.02ms  12.30ms   90.00%
    Req/Sec   240.00     20.00   260.00     70.00%
  241 requests in 1.00s, 100.00KB read
Requests/sec:    240.50
Transfer/sec:    100.00KB
"""


@pytest.mark.parametrize("text, ms", [("812.00us", 0.812), ("71.53ms", 71.53), ("1.01s", 1010.0),
                                      ("1.20m", 72000.0), ("3s", 3000.0)])
def test_to_ms_converts_every_unit(text: str, ms: float) -> None:
    assert to_ms(text) == pytest.approx(ms)


def test_to_ms_refuses_what_is_not_a_duration() -> None:
    with pytest.raises(WrkError):
        to_ms("12.3KB")


def test_parse_measured_run() -> None:
    r = parse_wrk(MEASURED)
    assert r.requests == 2758
    assert r.duration_s == pytest.approx(3.02)
    assert r.non2xx == 5
    assert r.socket_errors == {"connect": 0, "read": 12, "write": 1, "timeout": 3}
    assert r.errors == 5 + 16
    want = {"50": 0.812, "75": 71.53, "90": 1010.0, "99": 72000.0}
    assert r.percentiles_ms == pytest.approx(want)
    assert r.ok_per_s == pytest.approx((2758 - 5) / 3.02)
    assert r.max_ms == pytest.approx(1440.0)


def test_latency_stats_line_is_not_taken_for_a_percentile() -> None:
    """'81.50%' in the Thread Stats block must not become p81.5."""
    assert set(parse_wrk(MEASURED).percentiles_ms) == {"50", "75", "90", "99"}


def test_parse_warmup_run_without_latency_or_errors() -> None:
    r = parse_wrk(WARMUP)
    assert (r.requests, r.non2xx, r.socket_errors, r.percentiles_ms) == (241, 0, {}, {})
    assert r.max_ms == pytest.approx(12.3)
    assert r.p("99") is None
    assert r.ok_per_s == pytest.approx(241.0)


def test_wrk2_style_percentiles_are_normalised() -> None:
    wrk2 = "  Latency Distribution\n 50.000%    2.00ms\n 99.000%    9.50ms\n  241 requests"
    text = WARMUP.replace("  241 requests", wrk2)
    assert parse_wrk(text).percentiles_ms == pytest.approx({"50": 2.0, "99": 9.5})


def test_output_without_a_request_count_is_an_error() -> None:
    with pytest.raises(WrkError, match="no request count"):
        parse_wrk("unable to connect to 127.0.0.1:3390 Connection refused\n")


def test_command_is_pinned_closed_loop_with_latency() -> None:
    cmd = wrk_command("http://127.0.0.1:1/x", 64, 20, ["Content-Type: a/b"], latency=True)
    assert cmd[:6] == ["taskset", "-c", "1", "wrk", "-t1", "-c64"]
    assert "-d20s" in cmd and "--latency" in cmd and "--timeout=10s" in cmd
    assert cmd[-3:] == ["-H", "Content-Type: a/b", "http://127.0.0.1:1/x"]
