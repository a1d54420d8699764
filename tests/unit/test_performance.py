"""Accuracy without labels (monitoring/performance.py) on synthetic confidences.

A synthetic model is one whose answer is right with a known probability given its confidence:
``P(right | c) = c`` (calibrated) or ``c ** 3`` (overconfident). Covariate shift moves the
confidences and keeps that probability; concept shift keeps the confidences and changes which
answers are right.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from monitoring.drift_html import accuracy_text, render_summary
from monitoring.performance import (IDENTITY, ISOTONIC, ForeignPrior, calibrate_reference,
                                    correct_column, estimate, expected_calibration_error,
                                    fit_calibrator, format_estimate, isotonic_fit,
                                    performance_report)
from monitoring.slice_metrics import slice_metrics


def _sample(n: int, rng: np.random.Generator, low: float = 0.3, high: float = 1.0,
            power: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    conf = rng.uniform(low, high, n)
    return conf, (rng.random(n) < conf ** power).astype(np.float64)


def test_isotonic_fit_matches_scikit_learn_with_ties_and_weights() -> None:
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(0)
    x = np.round(rng.random(300), 2)  # many ties
    y = (rng.random(300) < x ** 2).astype(float)
    w = rng.random(300) + 0.1
    knots, values = isotonic_fit(x, y, w)
    assert np.all(np.diff(values) >= 0)
    grid = np.linspace(-0.2, 1.2, 301)
    expected = IsotonicRegression(out_of_bounds="clip").fit(x, y, sample_weight=w).predict(grid)
    np.testing.assert_allclose(np.interp(grid, knots, values), expected, atol=1e-12)
    # the fit keeps the weighted mean (pool adjacent violators preserves it)
    counts = np.unique(x, return_counts=True)[1]
    assert knots.size == counts.size


def test_expected_calibration_error_by_hand() -> None:
    conf = np.array([0.95, 0.92, 0.85, 0.45])
    ok = np.array([1.0, 0.0, 1.0, 1.0])
    # bin 9: |0.5 - 0.935| * 2; bin 8: |1 - 0.85|; bin 4: |1 - 0.45|
    assert expected_calibration_error(conf, ok) == pytest.approx((0.87 + 0.15 + 0.55) / 4)


def test_isotonic_is_kept_where_it_lowers_the_out_of_fold_error() -> None:
    rng = np.random.default_rng(1)
    conf, ok = _sample(600, rng, power=3.0)  # overconfident
    cal = fit_calibrator(conf, ok)
    assert cal.method == ISOTONIC
    assert cal.ece_isotonic < cal.ece_raw
    assert cal.reference_rows == 600 and cal.reference_accuracy == pytest.approx(ok.mean())
    # in sample the isotonic fit reproduces the reference accuracy exactly
    assert cal(conf).mean() == pytest.approx(ok.mean())
    assert cal.calibration_se(conf) > 0


def test_already_calibrated_confidence_is_left_as_it_is() -> None:
    rng = np.random.default_rng(2)
    conf, ok = _sample(600, rng, power=1.0)  # calibrated: isotonic only adds noise
    cal = fit_calibrator(conf, ok)
    assert cal.method == IDENTITY and cal.ece_isotonic >= cal.ece_raw
    np.testing.assert_array_equal(cal(conf), conf)
    assert cal.calibration_se(conf) == 0.0


def test_a_small_reference_is_not_fitted() -> None:
    rng = np.random.default_rng(3)
    cal = fit_calibrator(*_sample(30, rng))
    assert cal.method == IDENTITY and math.isnan(cal.ece_isotonic)
    with pytest.raises(ValueError, match="no labelled"):
        fit_calibrator(np.empty(0), np.empty(0))


def test_covariate_shift_is_estimated_and_the_interval_covers_the_realised_accuracy() -> None:
    rng = np.random.default_rng(4)
    cal = fit_calibrator(*_sample(2000, rng))
    # windows with harder inputs (lower confidence), P(right | c) unchanged
    inside, gaps = 0, []
    for _ in range(100):
        conf, ok = _sample(500, rng, low=0.2, high=0.9)
        est = estimate(cal, conf, ok)
        gaps.append(est.estimated - est.realised)
        inside += est.low <= est.realised <= est.high
    assert abs(np.mean(gaps)) < 0.02
    assert inside >= 85  # a 95% interval, out of 100 windows
    raw = estimate(fit_calibrator(*_sample(40, rng)), conf, ok)  # identity: the raw confidence
    assert raw.estimated - raw.realised > 0.15  # overconfidence uncorrected


def test_concept_shift_is_invisible_to_the_estimate() -> None:
    """The documented failure: the same inputs (same confidences), the labels changed."""
    rng = np.random.default_rng(5)
    cal = fit_calibrator(*_sample(2000, rng, low=0.7, power=1.0))  # ~85% right
    conf, ok = _sample(1000, rng, low=0.7, power=1.0)
    before = estimate(cal, conf, ok)
    assert abs(before.estimated - before.realised) < 0.03
    flipped = np.where(rng.random(1000) < 0.6, 0.0, ok)  # 60% of the labels now differ
    after = estimate(cal, conf, flipped)
    assert after.estimated == before.estimated  # confidence cannot see new labels
    assert before.realised - after.realised > 0.2
    assert after.estimated - after.realised > 0.2
    assert not after.low <= after.realised <= after.high


def test_the_report_per_slice_with_partial_labels() -> None:
    rng = np.random.default_rng(6)
    cal = fit_calibrator(*_sample(500, rng))
    conf, ok = _sample(8, rng)
    correct = ok.copy()
    correct[[1, 5]] = np.nan  # no feedback for two rows
    device = np.array(["ios", "ios", "web", "web", "web", None, "ios", "web"], dtype=object)
    report = performance_report(cal, conf, correct, {"tag.device": device})
    assert report["value"] == pytest.approx(cal(conf).mean()) == report["estimated"]
    assert report["n"] == 8 and report["n_labelled"] == 6
    assert report["realised"] == pytest.approx(np.nanmean(correct))
    assert report["low"] <= report["value"] <= report["high"]
    assert report["calibration"]["method"] == cal.method
    rows = {r["value"]: r for r in report["by_slice"]}
    assert set(rows) == {"ios", "web", "(none)"}
    assert rows["ios"]["n"] == 3 and rows["ios"]["n_labelled"] == 2
    assert rows["ios"]["estimated"] == pytest.approx(cal(conf[[0, 1, 6]]).mean())
    assert rows["(none)"]["realised"] is None  # JSON-ready: no labelled rows
    assert report["ood_share"] is None and report["warning"] is None  # no flags given
    text = format_estimate(report)
    assert "estimated accuracy" in text and "realised" in text and "ios" in text


def test_a_window_mostly_out_of_distribution_is_warned_about() -> None:
    rng = np.random.default_rng(8)
    cal = fit_calibrator(*_sample(500, rng))
    conf, _ = _sample(100, rng)
    ood = np.arange(100) < 20
    device = np.array(["ios"] * 50 + ["web"] * 50, dtype=object)
    calm = performance_report(cal, conf, slices={"tag.device": device}, ood=ood)
    assert calm["ood_share"] == pytest.approx(0.2) and calm["warning"] is None
    assert [r["ood_share"] for r in calm["by_slice"]] == pytest.approx([0.4, 0.0])
    flagged = performance_report(cal, conf, ood=np.arange(100) < 90)
    assert "90% of the window is flagged out-of-distribution" in flagged["warning"]
    assert "WARNING" in format_estimate(flagged) and "Warning" in accuracy_text(flagged)


def test_correct_column_and_a_reference_without_labels() -> None:
    got = correct_column(["3", "7", "1", "2"], ["3", "1", None, float("nan")])
    np.testing.assert_array_equal(got[:2], [1.0, 0.0])
    assert np.isnan(got[2:]).all()
    unlabelled = SimpleNamespace(labels=np.full(5, -1), predicted=np.zeros(5, int),
                                 confidence=np.full(5, 0.9))
    assert calibrate_reference(unlabelled) is None
    labelled = SimpleNamespace(labels=np.array([0, 1, -1, 1]), predicted=np.array([0, 0, 1, 1]),
                               confidence=np.array([0.9, 0.6, 0.5, 0.8]))
    cal = calibrate_reference(labelled)
    assert cal.reference_rows == 3 and cal.reference_accuracy == pytest.approx(2 / 3)


def test_the_slice_report_estimates_and_flags_a_slice_without_labels() -> None:
    n = 60
    frame = pd.DataFrame({"tag.device": ["ios"] * n + ["web"] * n, "predicted": "a",
                          "label": None, "confidence": 0.9,
                          "calibrated": [0.9] * n + [0.6] * n})
    table = slice_metrics(frame, ["tag.device"], margin=0.05, min_count=30).set_index("value")
    assert table.loc["all", "est_accuracy"] == pytest.approx(0.75)
    assert table.loc["web", "est_accuracy"] == pytest.approx(0.6)
    assert "est_accuracy" in table.loc["web", "reasons"]
    assert table["accuracy"].isna().all()  # no labels: no realised accuracy
    plain = slice_metrics(frame.drop(columns="calibrated"), ["tag.device"])
    assert plain["est_accuracy"].isna().all() and not plain["flagged"].any()


def test_the_drift_summary_shows_the_estimate_and_its_slices() -> None:
    rng = np.random.default_rng(7)
    cal = fit_calibrator(*_sample(500, rng))
    conf, ok = _sample(200, rng)
    report = performance_report(cal, conf, ok, {"tag.device": np.array(["ios", "web"] * 100)})
    text = accuracy_text(report)
    assert text.startswith(f"{100 * report['value']:.1f}% (95% interval")
    assert f"Realised {100 * report['realised']:.1f}% on the 200 rows with feedback" in text
    html = render_summary({"model": "m", "version": "v", "rows": [],
                           "estimated_accuracy": report})
    assert "Estimated accuracy by slice" in html and "<td>web</td>" in html
    unlabelled = performance_report(cal, conf)
    assert "No feedback labels in the window" in accuracy_text(unlabelled)


def test_flagged_answers_beyond_the_reference_rate_count_at_chance():
    prior = ForeignPrior(reference_rate=0.05, chance=0.1)
    p = np.full(100, 0.9)
    flags = np.zeros(100, dtype=bool)
    flags[:5] = True  # flagged at the reference rate: in-distribution, nothing changes
    assert np.array_equal(prior.adjust(p, flags), p)
    flags[:50] = True  # 50% flagged: one in ten of the flagged is the usual 5%
    q = prior.adjust(p, flags)
    assert np.allclose(q[:50], 0.1 * 0.9 + 0.9 * 0.1) and np.array_equal(q[50:], p[50:])
    everything = prior.adjust(p, np.ones(100, dtype=bool))  # all foreign: near chance
    assert abs(everything.mean() - (0.05 * 0.9 + 0.95 * 0.1)) < 1e-12
    calibrator = fit_calibrator(np.full(200, 0.9), np.r_[np.ones(180), np.zeros(20)])
    plain = estimate(calibrator, p)
    aware = estimate(calibrator, p, ood=np.ones(100, dtype=bool), prior=prior)
    assert aware.estimated < plain.estimated and aware.estimated < 0.2


def test_feedback_on_flagged_rows_teaches_how_often_foreign_answers_are_right():
    """Step 4: a model robust to the shift answers flagged inputs right far more often than
    chance; the window's labelled flagged rows say how often (shrunk towards chance)."""
    prior = ForeignPrior(reference_rate=0.035, chance=0.1)
    p = np.full(200, 0.95)
    flags = np.ones(200, dtype=bool)
    ok = np.full(200, np.nan)
    assert prior.learn(p, flags, ok) is prior  # no labels: chance it stays
    ok[:100] = np.r_[np.ones(94), np.zeros(6)]  # feedback on half: 94% right
    learned = prior.learn(p, flags, ok)
    w = 0.035
    expected = ((94 - w * 0.95 * 100) / (1 - w) + 2 * 0.1) / (100 + 2)
    assert learned.learned == pytest.approx(expected) and learned.learned_from == 100
    assert 0.9 < learned.accuracy < 0.94 and learned.learned_se > 0
    calibrator = fit_calibrator(np.full(200, 0.95), np.r_[np.ones(190), np.zeros(10)])
    at_chance = estimate(calibrator, p, ok, flags, prior)
    taught = estimate(calibrator, p, ok, flags, learned)
    assert at_chance.estimated < 0.15 and taught.estimated > 0.85
    assert abs(taught.estimated_labelled - taught.realised) < 0.03
    # the learned term widens the interval: the same rows with q fixed at that value
    fixed = ForeignPrior(0.035, 0.1, learned.learned, 0.0, 100)
    assert taught.se > estimate(calibrator, p, ok, flags, fixed).se
    # flagged no more than the reference rate: nothing foreign to learn about
    few = np.zeros(200, dtype=bool)
    few[:5] = True
    assert prior.learn(p, few, np.ones(200)) is prior
    # a few labels do not move it all the way: 10 right of 10
    ten = np.full(200, np.nan)
    ten[:10] = 1.0
    assert 0.8 < prior.learn(p, flags, ten).accuracy < 0.9


def test_the_report_learns_the_foreign_accuracy_once_for_the_window_and_its_slices():
    rng = np.random.default_rng(3)
    calibrator = fit_calibrator(*_sample(500, rng))
    conf = np.full(300, 0.97)
    flags = np.ones(300, dtype=bool)
    ok = np.full(300, np.nan)
    ok[::2] = (rng.random(150) < 0.9).astype(float)  # feedback on every other row, ~90% right
    device = np.array(["ios", "android", "web"] * 100)
    prior = ForeignPrior(reference_rate=0.035, chance=0.1)
    report = performance_report(calibrator, conf, ok, {"tag.device": device}, flags, prior)
    assert report["foreign_prior"]["learned_from"] == 150
    assert report["estimated"] > 0.8 and abs(report["estimated"] - report["realised"]) < 0.08
    assert all(row["estimated"] > 0.8 for row in report["by_slice"])
    assert "as the feedback on 150 of them says" in report["warning"]
    unlabelled = performance_report(calibrator, conf, None, None, flags, prior)
    assert unlabelled["estimated"] < 0.15 and "by chance only" in unlabelled["warning"]
    assert unlabelled["foreign_prior"]["learned_from"] == 0
