"""The request-path monitoring helpers: input sampling and the X-Slices header."""

from __future__ import annotations

import pytest

from monitoring.slices import SliceRules
from monitoring.store import open_log
from service.recording import PredictionRecorder
from service.requests import RequestError
from service.requests import slices as parse_slices


def test_input_sampling_is_by_request_id_and_respects_the_cap(tmp_path) -> None:
    with open_log(tmp_path / "log.db") as log:
        half = PredictionRecorder(log, keep_inputs=True, max_input_bytes=10, input_sample=0.5)
        ids = [f"req-{i}" for i in range(2000)]
        kept = [half.sampled(r) for r in ids]
        assert 0.45 < sum(kept) / len(kept) < 0.55
        assert kept == [half.sampled(r) for r in ids]  # the same answer every time, every worker
        assert half.keep(b"x" * 10, True) == b"x" * 10
        assert half.keep(b"x" * 11, True) is None  # over the byte cap
        assert half.keep(b"x", False) is None
        none = PredictionRecorder(log, keep_inputs=True, max_input_bytes=10, input_sample=0.0)
        assert not any(none.sampled(r) for r in ids)
        off = PredictionRecorder(log, keep_inputs=False, max_input_bytes=10, input_sample=1.0)
        assert not any(off.sampled(r) for r in ids)
        every = PredictionRecorder(log, keep_inputs=True, max_input_bytes=10, input_sample=1.0)
        assert all(every.sampled(r) for r in ids)


def test_slices_header() -> None:
    rules = SliceRules.parse("device=ios|android;region")
    assert parse_slices("device=ios; region=eu", rules) == {"device": "ios", "region": "eu"}
    assert parse_slices("device=web", rules) == {"device": "other"}
    assert parse_slices("  ", rules) == {}
    for bad in ("colour=red", "device", "region="):
        with pytest.raises(RequestError) as info:
            parse_slices(bad, rules)
        assert info.value.reason == "bad_field" and "X-Slices" in info.value.message
