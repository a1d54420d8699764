"""The OOD scorer on synthetic embeddings: calibration, flags, JSON round trip, cost."""

from __future__ import annotations

import time

import numpy as np
import pytest

from monitoring.ood import OODScorer, fit_ood, ledoit_wolf
from monitoring.reference import Reference

DIM, CLASSES = 32, 5


def synthetic(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings around class centres (fixed across seeds) and confident logits."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(0, 3, (CLASSES, DIM))
    labels = rng.integers(0, CLASSES, n)
    emb = centres[labels] + rng.normal(0, 1, (n, DIM)) + shift
    logits = rng.normal(0, 1, (n, CLASSES))
    logits[np.arange(n), labels] += 5.0
    return emb.astype(np.float32), logits.astype(np.float32), labels


def reference(n: int = 400, seed: int = 0) -> Reference:
    emb, logits, labels = synthetic(n, seed)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return Reference(feature_names=("brightness",), features=np.zeros((n, 1)), embeddings=emb,
                     logits=logits, labels=labels.astype(np.int64),
                     predicted=probs.argmax(1).astype(np.int64),
                     confidence=probs.max(1).astype(np.float32),
                     classes=tuple(str(c) for c in range(CLASSES)))


def _probs(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_ledoit_wolf_matches_scikit_learn() -> None:
    from sklearn.covariance import ledoit_wolf as sk_ledoit_wolf

    x = np.random.default_rng(0).normal(size=(60, 20)) @ np.diag(np.linspace(0.5, 3, 20))
    x = x - x.mean(0)
    np.testing.assert_allclose(ledoit_wolf(x), sk_ledoit_wolf(x, assume_centered=True)[0],
                               rtol=1e-10, atol=1e-12)


def test_fresh_in_distribution_rows_are_flagged_near_the_nominal_rate() -> None:
    scorer = fit_ood(reference(), distance_quantile=0.99, confidence_quantile=0.02)
    emb, logits, _ = synthetic(5000, seed=7)
    _, flags = scorer.score(_probs(logits), emb)
    # nominal: 1% by distance + 2% by confidence (overlapping); cross-fitting keeps it honest
    assert 0.01 <= flags.mean() <= 0.06


def test_far_embeddings_and_unsure_answers_are_flagged() -> None:
    scorer = fit_ood(reference())
    emb, logits, _ = synthetic(200, seed=8, shift=4.0)
    assert scorer.score(_probs(logits), emb)[1].mean() > 0.95
    emb, _, _ = synthetic(200, seed=9)
    flat = np.full((200, CLASSES), 1.0 / CLASSES)
    assert scorer.score(flat, emb)[1].all()


def test_score_above_one_is_exactly_the_flag() -> None:
    scorer = fit_ood(reference())
    near, near_logits, _ = synthetic(300, seed=3)
    far, far_logits, _ = synthetic(300, seed=4, shift=4.0)
    logits = np.vstack([near_logits, far_logits])
    scores, flags = scorer.score(_probs(logits), np.vstack([near, far]))
    assert np.array_equal(flags, scores > 1.0)
    assert 0 < flags.mean() < 1


def test_cross_fitted_threshold_is_above_the_in_sample_quantile() -> None:
    ref = reference(n=150)
    scorer = fit_ood(ref)
    in_sample = np.quantile(scorer.distances(ref.embeddings), 0.99)
    assert scorer.distance_threshold > in_sample


def test_json_round_trip_gives_the_same_scores() -> None:
    scorer = fit_ood(reference())
    again = OODScorer.from_json(scorer.to_json())
    emb, logits, _ = synthetic(100, seed=4)
    np.testing.assert_array_equal(scorer.score(_probs(logits), emb)[0],
                                  again.score(_probs(logits), emb)[0])
    with pytest.raises(ValueError, match="format"):
        OODScorer.from_json('{"format": 99}')


def test_scoring_a_batch_is_cheap() -> None:
    scorer = fit_ood(reference())
    emb, logits, _ = synthetic(64, seed=5)
    probs = _probs(logits)
    started = time.perf_counter()
    for _ in range(200):
        scorer.score(probs, emb)
    per_batch = (time.perf_counter() - started) / 200
    assert per_batch < 0.005, f"{per_batch * 1e3:.2f} ms per batch of 64"


def test_text_profiles_add_a_fragmentation_signal_calibrated_on_validation():
    from monitoring.ood import OODScorer, fit_ood, fragmentation_of
    from monitoring.reference import Reference

    rng = np.random.default_rng(0)
    n, d, k = 200, 8, 3
    classes = rng.integers(0, k, n)
    emb = rng.normal(size=(n, d)).astype(np.float32) + classes[:, None]
    logits = np.eye(k)[classes] * 4.0
    chars = rng.integers(20, 200, n).astype(float)
    tokens = np.round(chars * rng.uniform(0.2, 0.4, n))
    ref = Reference(("chars", "tokens"), np.column_stack([chars, tokens]), emb,
                    logits.astype(np.float32), classes, classes, np.ones(n, np.float32),
                    tuple("abc"))
    scorer = fit_ood(ref)
    assert 0.35 < scorer.fragmentation_threshold <= 0.4
    probs = np.eye(k)[classes[:2]] * 0.98 + 0.01
    words = [{"chars": 100.0, "tokens": 30.0}, {"chars": 40.0, "tokens": 36.0}]  # noise: ~1/char
    _, flags = scorer.score(probs, emb[:2], words)
    assert list(flags) == [False, True]
    assert fragmentation_of({"chars": 0.0, "tokens": 0.0}) == 0.0
    again = OODScorer.from_json(scorer.to_json())
    assert again.fragmentation_threshold == scorer.fragmentation_threshold
    image_like = Reference(("brightness",), chars[:, None], emb, logits.astype(np.float32),
                           classes, classes, np.ones(n, np.float32), tuple("abc"))
    assert fit_ood(image_like).fragmentation_threshold is None


def test_the_expected_flag_rate_is_the_calibrated_tails_summed() -> None:
    """What clf_ood_reference_rate exports: 1% by distance + 2% by confidence (+ 0.5% by
    fragmentation for text), an upper bound of the share flagged on in-distribution inputs."""
    scorer = fit_ood(reference(), distance_quantile=0.99, confidence_quantile=0.02)
    assert scorer.expected_flag_rate == pytest.approx(0.03)
    emb, logits, _ = synthetic(5000, seed=8)
    _, flags = scorer.score(_probs(logits), emb)
    assert flags.mean() <= scorer.expected_flag_rate + 0.02
    text = OODScorer(scorer.means, scorer.whitening, 1.0, 0.5, 0.99, 0.02, 0.4, 0.995)
    assert text.expected_flag_rate == pytest.approx(0.035)
