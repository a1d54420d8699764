"""OOD scores per model call (``ServedModel.score_call``, the batcher's finish hook): a call's
rows scored together get what each would get alone, with or without input features."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from monitoring.ood import fit_ood
from service.runtime import Outputs
from service.served import ServedModel
from tests.unit.test_monitoring_ood import _probs, feature_dicts, feature_rows, reference, synthetic


def test_a_calls_rows_are_scored_as_each_would_be_alone_features_or_not():
    scorer = fit_ood(reference(400, seed=0, train=600, features=True))
    emb, logits, _ = synthetic(6, seed=9, shift=0.0)
    emb[4] += 8.0  # far from everything: flagged
    probs = _probs(logits).astype(np.float32)
    feats: list = feature_dicts(feature_rows(6, seed=9))
    feats[1] = feats[3] = None  # rows of a v2 tensor request: no input features
    out = Outputs(probabilities=probs, embedding=emb)

    done = ServedModel.score_call(SimpleNamespace(ood=scorer), out, feats)

    alone = [scorer.score(probs[i:i + 1], emb[i:i + 1], None if f is None else [f])
             for i, f in enumerate(feats)]
    assert np.allclose([s for s, _ in done], [float(s[0]) for s, _ in alone], rtol=1e-5)
    assert [f for _, f in done] == [bool(f[0]) for _, f in alone]
    assert done[4][1] and not any(f for i, (_, f) in enumerate(done) if i != 4)
    # every row with features, or none: one scoring over the whole call
    for given in (feature_dicts(feature_rows(6, seed=9)), [None] * 6):
        whole = ServedModel.score_call(SimpleNamespace(ood=scorer), out, given)
        each = [scorer.score(probs[i:i + 1], emb[i:i + 1], None if g is None else [g])[0][0]
                for i, g in enumerate(given)]
        assert np.allclose([s for s, _ in whole], each, rtol=1e-5)


def test_a_lone_answer_scores_as_in_a_batch_whatever_the_scorer_has():
    ref = reference(400, seed=0, train=600, features=True)
    full = fit_ood(ref)
    scorers = [full, fit_ood(ref, confidence_quantile=0.01), fit_ood(ref, joint_share=0),
               fit_ood(ref, knn_quantile=None, feature_quantile=None),
               dataclasses.replace(full, fragmentation_threshold=0.3, fragmentation_quantile=0.995)]
    emb, logits, _ = synthetic(40, seed=9, shift=0.0)
    emb[::8] += 6.0  # some far away: flagged
    probs = _probs(logits).astype(np.float32)
    feats: list = feature_dicts(feature_rows(40, seed=9))
    for i, f in enumerate(feats):
        f.update(tokens=float(10 + i), chars=float(40 + 3 * i))  # a text's, for fragmentation
    flagged = 0
    for scorer in scorers:
        for given in (feats, [None] * 40):
            for i in range(40):
                batch_scores, batch_flags = scorer.score(probs[i:i + 1], emb[i:i + 1],
                                                         None if given[i] is None else [given[i]])
                score, flag = scorer.score_one(probs[i], emb[i], given[i])
                assert score == pytest.approx(float(batch_scores[0]), rel=1e-9)
                assert flag is bool(batch_flags[0])
                flagged += flag
        # the batcher's hook takes this way for a call of one row
        out = Outputs(probabilities=probs[:1], embedding=emb[:1])
        assert ServedModel.score_call(SimpleNamespace(ood=scorer), out, [feats[0]]) == [
            scorer.score_one(probs[0], emb[0], feats[0])]
    assert flagged >= 5 * 2 * 5  # the far rows, in every scorer
