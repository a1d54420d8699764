"""The PostgreSQL outage bench's table row: requests by when they were sent."""

from __future__ import annotations

from tools.bench.pgoutage import phase_row


def test_a_phase_row_counts_what_was_sent_in_it() -> None:
    sent = [(0.5, 0.002, 200), (1.5, 0.004, 200), (1.6, 0.010, 503), (3.0, 0.001, 200)]
    row = phase_row("down", sent, 1.0, 2.0).split()
    assert row[:4] == ["down", "2", "2", "50.0%"]  # 2 sent in 1 s, one answered 200
    assert [float(v) for v in row[4:]] == [7.0, 10.0, 10.0]  # p50, p99, max in ms
    assert phase_row("after", sent, 5.0, 6.0).split() == ["after", "0"]
