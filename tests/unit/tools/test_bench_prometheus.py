"""Reading histogram sum/count deltas from the service's Prometheus text."""

from __future__ import annotations

import pytest

from tools.bench.prometheus import (BATCH_ITEMS, PREPROCESS, deltas, histogram_delta, parse_samples,
                                    total)

pytestmark = pytest.mark.tools  # the benchmark tool's own tests (fast; in `make test`)

BEFORE = """\
# HELP clf_batch_size_items Items (images) per model call, as formed by the adaptive batcher.
# TYPE clf_batch_size_items histogram
clf_batch_size_items_bucket{le="1.0",model="bench-resnet"} 1.0
clf_batch_size_items_bucket{le="+Inf",model="bench-resnet"} 3.0
clf_batch_size_items_sum{model="bench-resnet"} 65.0
clf_batch_size_items_count{model="bench-resnet"} 3.0
clf_batch_size_items_sum{model="digits-cnn"} 1000.0
clf_batch_size_items_count{model="digits-cnn"} 10.0
clf_preprocess_seconds_sum{model="bench-resnet"} 0.5
clf_preprocess_seconds_count{model="bench-resnet"} 100.0
clf_predictions_total{model="bench-resnet",predicted_class="2",version="v1"} 60.0
clf_predictions_total{model="bench-resnet",predicted_class="7",version="v1"} 5.0
"""

AFTER = """\
clf_batch_size_items_sum{model="bench-resnet"} 6465.0
clf_batch_size_items_count{model="bench-resnet"} 203.0
clf_batch_size_items_sum{model="digits-cnn"} 1000.0
clf_batch_size_items_count{model="digits-cnn"} 10.0
clf_preprocess_seconds_sum{model="bench-resnet"} 3.7
clf_preprocess_seconds_count{model="bench-resnet"} 6500.0
clf_predictions_total{model="bench-resnet",predicted_class="2",version="v1"} 6000.0
clf_predictions_total{model="bench-resnet",predicted_class="7",version="v1"} 465.0
"""


def test_parse_skips_comments_and_keys_by_name_and_labels() -> None:
    s = parse_samples(BEFORE)
    assert s[("clf_batch_size_items_sum", (("model", "bench-resnet"),))] == 65.0
    assert s[("clf_batch_size_items_bucket", (("le", "+Inf"), ("model", "bench-resnet")))] == 3.0
    assert not any(name.startswith("#") for name, _ in s)


def test_total_sums_over_label_sets_that_match() -> None:
    s = parse_samples(AFTER)
    assert total(s, "clf_predictions_total", model="bench-resnet") == 6465.0
    assert total(s, "clf_predictions_total", predicted_class="7") == 465.0
    assert total(s, "clf_predictions_total", model="nope") == 0.0


def test_histogram_delta_and_mean() -> None:
    before, after = parse_samples(BEFORE), parse_samples(AFTER)
    d = histogram_delta(before, after, BATCH_ITEMS, model="bench-resnet")
    assert (d.sum, d.count) == (6400.0, 200.0)
    assert d.mean == pytest.approx(32.0)


def test_other_models_do_not_leak_into_a_delta() -> None:
    before, after = parse_samples(BEFORE), parse_samples(AFTER)
    d = histogram_delta(before, after, BATCH_ITEMS, model="digits-cnn")
    assert (d.sum, d.count, d.mean) == (0.0, 0.0, None)


def test_deltas_cover_the_request_path_histograms() -> None:
    d = deltas(parse_samples(BEFORE), parse_samples(AFTER), "bench-resnet")
    assert d[PREPROCESS].mean == pytest.approx(3.2 / 6400)
    assert d["clf_queue_wait_seconds"].count == 0.0  # absent before and after: no observations


def test_escaped_quotes_and_exponents_in_values() -> None:
    s = parse_samples('m_sum{model="a\\"b"} 2.5e-05\nm_count{model="a\\"b"} 1\n')
    assert total(s, "m_sum") == pytest.approx(2.5e-05)
