"""OOD scores per model call (``ServedModel.score_call``, the batcher's finish hook): a call's
rows scored together get what each would get alone, with or without input features."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

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
