"""The retraining's pure parts: the promotion rule on hand-made numbers, the hash split, the
accuracy tables, the data pool and the config's checks."""

from __future__ import annotations

import pytest

from training.retrain import RetrainConfig
from training.retrain.data import Pool, RetrainData, hash_part, split_by_hash
from training.retrain.evaluate import accuracy_table, compare
from training.retrain.gate import Rules, decide


def table(champion: float, challenger: float, count: int = 200,
          slices: dict[str, tuple[int, float, float]] | None = None) -> dict:
    """A comparison table as ``compare`` makes one: slices are name -> (count, champion,
    challenger)."""
    def row(n: int, a: float, b: float) -> dict:
        return {"count": n, "champion": a, "challenger": b, "delta": round(b - a, 6)}

    return {"overall": row(count, champion, challenger),
            "slices": {name: row(*cell) for name, cell in (slices or {}).items()}}


def test_a_better_challenger_is_promoted() -> None:
    decision = decide(table(0.80, 0.85, slices={"source=traffic": (60, 0.7, 0.8)}), Rules())
    assert decision.promote
    assert decision.reasons[0].startswith("pass: overall accuracy 0.8500 vs champion 0.8000")
    assert "no slice with >= 30 held-out inputs drops more than 0.0500" in decision.reasons[1]


def test_a_tie_is_never_promoted() -> None:
    assert not decide(table(0.80, 0.80), Rules(margin=0.0)).promote
    assert decide(table(0.80, 0.81), Rules(margin=0.0)).promote
    assert decide(table(0.80, 0.79), Rules(margin=-0.02)).promote  # worse, but allowed
    decision = decide(table(0.80, 0.80), Rules(margin=0.01))
    assert not decision.promote
    assert decision.reasons[0].startswith("fail: overall accuracy 0.8000 vs champion 0.8000")
    assert ">= 0.8100" in decision.reasons[0]


def test_the_margin_is_met_despite_float_rounding() -> None:
    assert decide(table(0.7, 0.8), Rules(margin=0.1)).promote  # 0.7 + 0.1 > 0.8 in floats


def test_a_worse_challenger_is_kept_out() -> None:
    assert not decide(table(0.90, 0.85), Rules()).promote


def test_a_slice_regression_blocks_a_better_challenger() -> None:
    slices = {"tag.device=ios": (40, 0.90, 0.80), "source=new": (100, 0.6, 0.9)}
    decision = decide(table(0.80, 0.90, slices=slices), Rules(max_slice_drop=0.05))
    assert not decision.promote
    assert decision.reasons[0].startswith("pass: overall")
    assert decision.reasons[1] == ("fail: slice tag.device=ios (n=40) accuracy 0.8000 vs "
                                   "champion 0.9000 (-0.1000) drops more than 0.0500")


def test_every_regressed_slice_is_named_worst_first() -> None:
    slices = {"a=1": (50, 0.9, 0.8), "b=2": (50, 0.9, 0.6), "c=3": (50, 0.9, 0.9)}
    decision = decide(table(0.80, 0.90, slices=slices), Rules())
    assert [r.split()[2] for r in decision.reasons[1:]] == ["b=2", "a=1"]


def test_a_slice_below_the_support_bound_is_not_judged() -> None:
    slices = {"tag.device=ios": (29, 0.90, 0.10)}
    decision = decide(table(0.80, 0.90, slices=slices), Rules(min_slice_count=30))
    assert decision.promote
    assert "0 judged; 1 below the support bound not judged" in decision.reasons[1]


def test_a_drop_equal_to_the_bound_is_allowed() -> None:
    slices = {"size=small": (100, 0.90, 0.85)}
    assert decide(table(0.80, 0.90, slices=slices), Rules(max_slice_drop=0.05)).promote
    assert not decide(table(0.80, 0.90, slices=slices), Rules(max_slice_drop=0.049)).promote


def test_accuracy_table_and_compare() -> None:
    truth = ["a", "b", "a", "b"]
    slices = [{"source": "original"}, {"source": "traffic", "tag.device": "ios"},
              {"source": "traffic", "tag.device": "ios"}, {"source": "original"}]
    champion = accuracy_table(["a", "a", "a", "b"], truth, slices)
    challenger = accuracy_table(["a", "b", "b", "b"], truth, slices)
    assert champion["accuracy"] == 0.75
    assert champion["slices"]["source=traffic"] == {"count": 2, "accuracy": 0.5}
    assert champion["slices"]["tag.device=ios"] == {"count": 2, "accuracy": 0.5}
    both = compare(champion, challenger)
    assert both["overall"] == {"count": 4, "champion": 0.75, "challenger": 0.75, "delta": 0.0}
    assert both["slices"]["source=original"] == {"count": 2, "champion": 1.0,
                                                 "challenger": 1.0, "delta": 0.0}


def test_hash_part_is_deterministic_and_follows_the_fractions() -> None:
    keys = [f"request-{i}" for i in range(20_000)]
    parts = [hash_part(k, 0.15, 0.15) for k in keys]
    assert parts == [hash_part(k, 0.15, 0.15) for k in keys]
    assert abs(parts.count("test") / len(keys) - 0.15) < 0.01
    assert abs(parts.count("val") / len(keys) - 0.15) < 0.01
    # A key's part does not depend on the other keys: a growing log never moves a row.
    assert hash_part("request-7", 0.15, 0.15) == parts[7]


def pool(n: int, source: str = "traffic") -> Pool:
    return Pool(tuple(f"text {i}" for i in range(n)), tuple(i % 2 for i in range(n)),
                tuple(f"row {i}" for i in range(n)), (source,) * n, ({},) * n)


def test_split_by_hash_keeps_every_row_once() -> None:
    parts = split_by_hash(pool(300), [f"k{i}" for i in range(300)], 0.15, 0.15)
    assert sum(len(p) for p in parts.values()) == 300
    assert sorted(x for p in parts.values() for x in p.inputs) == sorted(pool(300).inputs)


def test_counts_and_data_hash_are_order_independent() -> None:
    a, b = pool(4, "original"), pool(3, "new")
    data = RetrainData(a + b, Pool(), b, labels=("x", "y"))
    assert data.counts()["new"] == {"train": 3, "val": 0, "test": 3}
    assert data.counts()["original"] == {"train": 4, "val": 0, "test": 0}
    swapped = RetrainData(b + a, Pool(), b, labels=("x", "y"))
    assert data.data_hash() == swapped.data_hash()
    relabelled = RetrainData(a + b, Pool(), b, labels=("y", "x"))
    assert data.data_hash() != relabelled.data_hash()


@pytest.mark.parametrize("change, message", [
    ({"model": "digits-cnn:abc"}, "--model takes a model name"),
    ({"margin": 2.0}, "--margin"),
    ({"max_slice_drop": -0.1}, "--max-slice-drop"),
    ({"min_slice_count": 0}, "--min-slice-count"),
    ({"epochs": 0}, "--epochs"),
    ({"since": 10.0, "until": 5.0}, "--since"),
])
def test_config_refuses_bad_values(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetrainConfig(**{"model": "digits-cnn", **change})


def test_cli_times_parse_like_the_monitoring_commands() -> None:
    from training.retrain import config_from_args

    cfg = config_from_args(["--model", "digits-cnn", "--since", "2024-01-01",
                            "--until", "2024-01-02T12:00:00"])
    assert cfg.since == 1704067200.0 and cfg.until == 1704067200.0 + 1.5 * 86400
    assert cfg.describe()["since"] == "2024-01-01T00:00:00+00:00"
    everything = config_from_args(["--model", "digits-cnn"])
    assert everything.since == 0.0 and everything.describe()["until"] is None
