"""Slice rules, derived slices and per-slice figures checked against hand-computed values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from monitoring.slice_metrics import add_derived_slices, buckets, slice_metrics, to_records
from monitoring.slices import (BRIGHTNESS_BUCKETS, BRIGHTNESS_TOP, MISSING, OTHER, SIZE_BUCKETS,
                               SIZE_TOP, SliceError, SliceRules, brightness_bucket, cap_values,
                               derived_slices, size_bucket, text_length_bucket)

# Ten answers on two devices; labels on six of them.
#  i  device pred label conf  ood
FRAME = pd.DataFrame([
    ("ios", "a", "a", 0.95, False),
    ("ios", "a", "a", 0.85, False),
    ("ios", "b", "a", 0.65, False),
    ("ios", "b", "b", 0.55, True),
    ("ios", "a", None, 0.45, False),
    ("ios", "b", None, 0.35, True),
    ("web", "a", "b", 0.90, False),
    ("web", "b", "b", 0.80, False),
    ("web", "a", None, 0.30, False),
    ("web", "a", None, 0.10, False),
], columns=["tag.device", "predicted", "label", "confidence", "ood"])


def _row(table: pd.DataFrame, value: str) -> pd.Series:
    return table.set_index("value").loc[value]


def test_hand_computed_figures() -> None:
    table = slice_metrics(FRAME, ["tag.device"], margin=0.05, min_count=2)
    whole, ios, web = _row(table, "all"), _row(table, "ios"), _row(table, "web")
    assert (whole.n, ios.n, web.n) == (10, 6, 4)
    assert (whole.n_labelled, ios.n_labelled, web.n_labelled) == (6, 4, 2)
    # accuracy: ios 3 of 4 right, web 1 of 2, all 4 of 6
    assert ios.accuracy == pytest.approx(0.75)
    assert web.accuracy == pytest.approx(0.5)
    assert whole.accuracy == pytest.approx(4 / 6)
    # macro-F1 = mean over classes of 2tp / (n_true + n_pred)
    # ios: a 2*2/(3+2) = 0.8, b 2*1/(1+2); web: a 0/(0+1), b 2*1/(2+1); all: a 4/6, b 4/6
    assert ios.macro_f1 == pytest.approx((0.8 + 2 / 3) / 2)
    assert web.macro_f1 == pytest.approx((0 + 2 / 3) / 2)
    assert whole.macro_f1 == pytest.approx(4 / 6)
    # ECE, 10 bins. ios: one row per bin: (.05 + .15 + .65 + .45) / 4
    assert ios.ece == pytest.approx(1.3 / 4)
    # web: bins 9 and 8: (|0 - .9| + |1 - .8|) / 2
    assert web.ece == pytest.approx(0.55)
    # all: bin 9 {.95 ok, .9 wrong}: 2*|.5 - .925|; bin 8 {.85, .8 ok}: 2*|1 - .825|; .65; .45
    assert whole.ece == pytest.approx((0.85 + 0.35 + 0.65 + 0.45) / 6)
    assert ios.mean_confidence == pytest.approx(3.8 / 6)
    assert web.mean_confidence == pytest.approx(0.525)
    assert (ios.low_conf_share, web.low_conf_share, whole.low_conf_share) == \
        pytest.approx((2 / 6, 0.5, 0.4))
    assert (ios.ood_share, web.ood_share, whole.ood_share) == pytest.approx((2 / 6, 0.0, 0.2))
    assert ios.predicted_dist == {"a": 0.5, "b": 0.5}
    assert web.predicted_dist == {"a": 0.75, "b": 0.25}


def test_macro_f1_matches_scikit_learn() -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    n = 500
    frame = pd.DataFrame({"predicted": rng.integers(0, 6, n).astype(str),
                          "label": rng.integers(0, 5, n).astype(str),
                          "confidence": rng.random(n), "tag.k": rng.choice(["x", "y"], n)})
    table = slice_metrics(frame, ["tag.k"])
    for value in ("x", "y"):
        part = frame[frame["tag.k"] == value]
        expected = f1_score(part["label"], part["predicted"], average="macro")
        assert _row(table, value).macro_f1 == pytest.approx(expected)


def test_flags_need_the_margin_and_the_minimum_count() -> None:
    table = slice_metrics(FRAME, ["tag.device"], margin=0.05, min_count=2)
    assert _row(table, "web").reasons == "accuracy,macro_f1,ece,mean_confidence,low_conf_share"
    assert _row(table, "ios").reasons == "ood_share"  # 2/6 vs 0.2 overall
    assert not _row(table, "all").flagged
    # web has 2 labelled rows: with min_count 3 only its unlabelled figures can flag it
    table = slice_metrics(FRAME, ["tag.device"], margin=0.05, min_count=3)
    assert _row(table, "web").reasons == "mean_confidence,low_conf_share"
    table = slice_metrics(FRAME, ["tag.device"], margin=0.5, min_count=2)
    assert not table["flagged"].any()


def test_unlabelled_slices_and_missing_tags() -> None:
    frame = FRAME.assign(label=None)
    frame.loc[8:, "tag.device"] = None
    table = slice_metrics(frame, ["tag.device"])
    assert set(table["value"]) == {"all", "ios", "web", MISSING}
    assert table["accuracy"].isna().all() and (table["n_labelled"] == 0).all()
    assert _row(table, MISSING).n == 2
    records = to_records(table)
    assert records[0]["accuracy"] is None and records[0]["n"] == 10


def test_rules_fold_unlisted_values_and_refuse_unknown_keys() -> None:
    rules = SliceRules.parse("device=ios|android|web; customer", max_values=5)
    assert rules.apply({"device": "ios", "customer": "acme"}) == {"device": "ios",
                                                                  "customer": "acme"}
    assert rules.apply({"device": "windows"}) == {"device": OTHER}
    with pytest.raises(SliceError, match="unknown slice key"):
        rules.apply({"colour": "red"})
    with pytest.raises(SliceError, match="string"):
        rules.apply({"device": 3})
    with pytest.raises(SliceError, match="reserved"):
        SliceRules.parse("device=ios|other")
    with pytest.raises(SliceError, match="slice key"):
        SliceRules.parse("Bad Key=x")


def test_cap_values_admits_the_first_n_per_key() -> None:
    admitted: dict[str, set[str]] = {"customer": {"acme"}}
    out, new = cap_values({"customer": "globex", "region": "eu"}, admitted, max_values=2)
    assert out == {"customer": "globex", "region": "eu"}
    assert new == [("customer", "globex"), ("region", "eu")]
    out, new = cap_values({"customer": "initech"}, admitted, max_values=2)
    assert out == {"customer": OTHER} and new == []
    out, _ = cap_values({"customer": "acme"}, admitted, max_values=2)
    assert out == {"customer": "acme"}


def test_derived_buckets() -> None:
    assert size_bucket(32, 32) == "tiny"
    assert size_bucket(64, 10) == "small"  # edges are exclusive upper bounds
    assert size_bucket(5000, 1) == "huge"
    assert brightness_bucket(0.2) == "dim"
    assert brightness_bucket(0.95) == "very_bright"
    assert text_length_bucket(3) == "short"
    assert derived_slices({"width": 300.0, "height": 200.0, "brightness": 0.5}) == {
        "size": "medium", "brightness": "mid"}
    values = np.linspace(-0.1, 1.1, 121)
    assert list(buckets(values, BRIGHTNESS_BUCKETS, BRIGHTNESS_TOP)) == \
        [brightness_bucket(v) for v in values]
    sides = np.array([0, 63, 64, 255, 256, 1023, 1024, 4095, 4096, 10_000], dtype=float)
    assert list(buckets(sides, SIZE_BUCKETS, SIZE_TOP)) == [size_bucket(s, 1) for s in sides]


def test_add_derived_slices_from_features() -> None:
    frame = pd.DataFrame({"width": [32.0, 800.0], "height": [32.0, 600.0],
                          "brightness": [0.1, 0.7]})
    out, names = add_derived_slices(frame)
    assert names == ["size", "brightness_bucket"]
    assert list(out["size"]) == ["tiny", "medium"]
    assert list(out["brightness_bucket"]) == ["dark", "bright"]
    _, names = add_derived_slices(pd.DataFrame({"chars": [3.0, 80.0]}))
    assert names == ["length_bucket"]
    assert derived_slices({"chars": 80.0}) == {"length": "long"}
