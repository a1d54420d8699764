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
    ({"holdout_newest": 1.5}, "--holdout-newest"),
    ({"max_robustness_drop": -0.01}, "--max-robustness-drop"),
    ({"max_attack_increase": 1.5}, "--max-attack-increase"),
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
    assert everything.holdout_newest == 0.2 and everything.cutoff is None


def test_cli_takes_a_holdout_share_or_a_cutoff_not_both(capsys) -> None:
    from training.retrain import config_from_args

    cfg = config_from_args(["--model", "m", "--cutoff", "2024-01-01"])
    assert cfg.cutoff == 1704067200.0 and cfg.describe()["cutoff"] == "2024-01-01T00:00:00+00:00"
    assert config_from_args(["--model", "m", "--holdout-newest", "0.3"]).holdout_newest == 0.3
    with pytest.raises(SystemExit):
        config_from_args(["--model", "m", "--cutoff", "2024-01-01", "--holdout-newest", "0.3"])
    assert "not allowed with" in capsys.readouterr().err


# ---- leakage-safe traffic: split by time ---------------------------------------------------

def test_split_by_time_holds_out_the_newest_share() -> None:
    from training.retrain.data import split_by_time

    times = [float(t) for t in (5, 1, 4, 2, 3, 9, 7, 8, 6, 10)]  # logged order is not time order
    split = split_by_time(times, [t + 0.5 for t in times], holdout_newest=0.2)
    assert sorted(times[i] for i in split.held_out) == [9.0, 10.0]
    assert sorted(times[i] for i in split.train) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert split.newest_train == 8.0 <= split.cutoff < split.oldest_held_out == 9.0
    assert split.rule == "newest 20%" and split.late == ()
    # Rows logged at the same instant as the oldest held-out one are held out with it.
    tied = split_by_time([1.0, 2.0, 3.0, 3.0, 3.0], [0.0] * 5, holdout_newest=0.2)
    assert sorted(tied.held_out) == [2, 3, 4] and sorted(tied.train) == [0, 1]
    # Nothing held out: no cutoff, every row (whenever labelled) trains.
    none = split_by_time([1.0, 2.0], [99.0, 99.0], holdout_newest=0.0)
    assert none.cutoff is None and sorted(none.train) == [0, 1] and none.held_out == ()
    everything = split_by_time([1.0, 2.0], [1.0, 2.0], holdout_newest=1.0)
    assert everything.train == () and sorted(everything.held_out) == [0, 1]


def test_split_by_time_at_a_cutoff_drops_labels_that_came_later() -> None:
    from training.retrain.data import split_by_time

    times = [10.0, 20.0, 30.0, 40.0, 50.0]
    feedback = [11.0, 45.0, 30.0, 41.0, 51.0]  # row 1's label came after the cutoff (35)
    split = split_by_time(times, feedback, holdout_newest=0.9, cutoff=35.0)  # cutoff wins
    assert split.rule == "--cutoff" and split.cutoff == 35.0
    assert split.train == (0, 2) and split.late == (1,) and split.held_out == (3, 4)
    assert split.describe() == {
        "cutoff": "1970-01-01T00:00:35.000+00:00", "cutoff_ts": 35.0, "rule": "--cutoff",
        "rows": {"train": 2, "held_out": 2, "late_feedback": 1},
        "newest_train": "1970-01-01T00:00:30.000+00:00",
        "oldest_held_out": "1970-01-01T00:00:40.000+00:00", "champion_cutoff": None,
        "held_out_champion_may_know": 0}


def _digits_champion(limit: int = 100, retrain: dict | None = None):
    """A champion as ``resolve_champion`` reads one, for the data step only (no model);
    ``retrain``: its manifest's retraining info (a champion made by a retraining)."""
    from pathlib import Path

    from training.config import TrainConfig
    from training.retrain.champion import Champion

    cfg = TrainConfig(limit=limit)
    return Champion("digits-cnn", "v1", Path("/nonexistent"), "image",
                    cfg.image_spec(), tuple(str(i) for i in range(10)),
                    {"data_source": "digits", "train_config": cfg.to_dict(),
                     **({} if retrain is None else {"retrain": retrain})})


def test_the_data_step_never_trains_on_traffic_newer_than_what_it_holds_out(tmp_path,
                                                                            monkeypatch) -> None:
    """A log whose rows were logged out of order, with labels that came late: no held-out row is
    older than a training row, no label stored after the cutoff trains, the original data keeps
    its seeded split, and the audit names the cutoff."""
    import numpy as np

    from monitoring.store import PredictionRecord, open_log
    from training.data import digits_images
    from training.retrain.data import Sources, gather_data
    from training.train import prepare_splits

    digits = digits_images()
    rng = np.random.default_rng(3)
    n = 120
    logged = {f"req-{i}": float(t) for i, t in enumerate(rng.permutation(n) * 60.0 + 1e9)}
    # Labels come 10 s to 2 h after the prediction.
    labelled = {rid: ts + float(rng.uniform(10, 7200)) for rid, ts in logged.items()}
    records = [PredictionRecord(
        request_id=rid, item=0, ts=logged[rid], model="digits-cnn", version="v1", predicted="0",
        confidence=0.5, probabilities=np.zeros(10), embedding=np.zeros(4), features={},
        input=digits.blobs[-1 - i]) for i, rid in enumerate(logged)]
    path = tmp_path / "log.db"
    with open_log(path) as log:
        log.write_batch(records)
        for i, rid in enumerate(logged):
            monkeypatch.setattr("time.time", lambda rid=rid: labelled[rid])
            log.add_feedback(rid, str(digits.labels[-1 - i]))
    monkeypatch.undo()

    # The champion came from a retraining whose cutoff was at the 100th oldest row.
    champion_cutoff = sorted(logged.values())[99]
    champion = _digits_champion(retrain={"split_seed": 0,
                                         "traffic_split": {"cutoff_ts": champion_cutoff}})
    data = gather_data(champion, Sources(path, None), holdout_newest=0.25)
    split = data.traffic_split
    assert split is not None and split.rule == "newest 25%"

    def times(part) -> list[float]:
        return [logged[name.split("request ")[1].split(" item")[0]]
                for name, source in zip(part.names, part.sources) if source == "traffic"]

    trained, held = times(data.train) + times(data.val), times(data.test)
    assert len(held) == 30 and trained and times(data.val)
    assert max(trained) <= split.cutoff < min(held)  # no held-out row older than a training row
    assert split.cutoff == np.nextafter(sorted(logged.values())[90], -np.inf)
    # Every older row trains, but those whose label was stored after the cutoff.
    late = {rid for rid, ts in logged.items()
            if ts <= split.cutoff and labelled[rid] > split.cutoff}
    assert late and len(split.late) == len(late)
    trained_ids = {name.split("request ")[1].split(" item")[0]
                   for part in (data.train, data.val) for name, source in
                   zip(part.names, part.sources) if source == "traffic"}
    assert trained_ids == {rid for rid, ts in logged.items()
                           if ts <= split.cutoff and rid not in late}
    assert not trained_ids & late and all(labelled[rid] <= split.cutoff for rid in trained_ids)
    assert len(trained) + len(held) + len(late) == n
    # The original data keeps the champion's seeded split.
    splits, _ = prepare_splits(champion.recipe())
    for part in ("train", "val", "test"):
        pool = getattr(data, part)
        assert [x for x, s in zip(pool.inputs, pool.sources) if s == "original"] == list(
            getattr(splits, part).blobs)
    described = split.describe()
    assert described["cutoff"].startswith("2001-09-09T") and described["rows"] == {
        "train": n - 30 - len(late), "held_out": 30, "late_feedback": len(late)}
    # Held-out rows the champion may have trained on (not newer than its own cutoff) are named.
    assert split.champion_cutoff == champion_cutoff
    assert described["held_out_champion_may_know"] == 10


# ---- robustness and attack rules -------------------------------------------------------------

def robust(table_: dict, variations: dict[str, tuple[float, float]], count: int = 200,
           attack: tuple[float | None, float | None] | None = None) -> dict:
    """``table_`` plus a robustness table (name -> (champion, challenger)) and attack rates."""
    table_["robustness"] = {"seed": 0, "count": count, "variations": {
        name: {"champion": a, "challenger": b, "delta": round(b - a, 6)}
        for name, (a, b) in variations.items()}}
    if attack is not None:
        a, b = attack
        table_["attack"] = {"champion": a, "challenger": b,
                            "delta": None if None in attack else round(b - a, 6)}
    return table_


def test_a_variation_lost_by_more_than_the_bound_keeps_a_better_challenger_out() -> None:
    variations = {"clean": (0.80, 0.90), "jpeg_q30": (0.97, 0.91), "rotate": (0.7, 0.6),
                  "noise": (0.8, 0.79)}
    decision = decide(robust(table(0.80, 0.90), variations), Rules(max_robustness_drop=0.02))
    assert not decision.promote
    assert decision.reasons[2:] == (
        "fail: robustness: rotate 0.6000 < champion 0.7000 - 0.0200 (-0.1000 on the 200 held-out "
        "inputs varied)",
        "fail: robustness: jpeg_q30 0.9100 < champion 0.9700 - 0.0200 (-0.0600 on the 200 "
        "held-out inputs varied)")
    assert decision.notes == ()


def test_a_variation_drop_equal_to_the_bound_passes_and_clean_is_the_overall_rules() -> None:
    variations = {"clean": (0.95, 0.90), "jpeg_q30": (0.97, 0.95)}
    decision = decide(robust(table(0.80, 0.90), variations), Rules(max_robustness_drop=0.02))
    assert decision.promote
    assert len(decision.reasons) == 2  # one per rule that failed or is always judged
    assert decision.notes == (
        "pass: robustness: no variation of the 200 held-out inputs loses more than 0.0200 "
        "against the champion (1 variations, seed 0; the worst: jpeg_q30 0.9500 vs 0.9700, "
        "-0.0200)",)


def test_the_attack_rule_bounds_the_rise_of_the_attack_success_rate() -> None:
    ok = decide(robust(table(0.8, 0.9), {"noise": (0.5, 0.5)}, attack=(0.30, 0.35)), Rules())
    assert ok.promote and ok.notes[1].startswith("pass: attack success rate 0.3500 vs champion")
    worse = decide(robust(table(0.8, 0.9), {"noise": (0.5, 0.5)}, attack=(0.30, 0.36)), Rules())
    assert not worse.promote and worse.reasons[2].startswith(
        "fail: attack: 0.3600 > champion 0.3000 + 0.0500")
    assert decide(robust(table(0.8, 0.9), {}, attack=(0.30, 0.36)),
                  Rules(max_attack_increase=0.1)).promote


@pytest.mark.parametrize("attack, missing", [((None, 0.9), "the champion has"),
                                             ((None, None), "the champion and the challenger "
                                                            "have")])
def test_missing_attack_figures_skip_the_rule_with_a_note(attack, missing) -> None:
    decision = decide(robust(table(0.8, 0.9), {"noise": (0.5, 0.5)}, attack=attack), Rules())
    assert decision.promote
    assert decision.notes[1] == (f"skip: attack success rate: {missing} no attack_success in "
                                 "metrics.json (exported before attacks were measured); rule "
                                 "not applied")


def test_an_empty_held_out_set_skips_the_robustness_rule() -> None:
    decision = decide(robust(table(0.8, 0.9), {}, count=0), Rules())
    assert decision.notes == ("skip: robustness: no held-out inputs to vary; rule not applied",)


def test_an_attack_rate_over_too_few_attacked_inputs_is_not_judged() -> None:
    """A near-chance champion gets few inputs right, so few are attacked: its 0.0 says nothing.
    The slice rule's support bound (``min_slice_count``) applies to the attacked inputs too."""
    table_ = robust(table(0.1, 0.3), {"noise": (0.1, 0.3)}, attack=(0.0, 1.0))
    table_["attack"]["attacked"] = {"champion": 5, "challenger": 40}
    decision = decide(table_, Rules(min_slice_count=30))
    assert decision.promote
    assert decision.notes[1] == ("skip: attack success rate 1.0000 vs champion 0.0000: the "
                                 "champion's is over 5 attacked (correctly classified) input(s), "
                                 "fewer than 30; rule not applied")
    table_["attack"]["attacked"] = {"champion": 30, "challenger": 40}
    assert decide(table_, Rules(min_slice_count=30)).reasons[2].startswith("fail: attack: 1.0000")


@pytest.mark.parametrize("case", ["no original rows", "another count", "not leading",
                                  "no figure", "no model"])
def test_the_same_input_attack_is_given_up_where_the_inputs_cannot_be_matched(
        tmp_path, case: str) -> None:
    """The challenger is attacked on the champion's own test inputs only where the held-out
    part provably holds them first, as many as the champion's figure is over; else the gate
    falls back to the two metrics.json figures."""
    import json
    from types import SimpleNamespace

    from training.retrain.evaluate import attack_table, champion_inputs_attack

    test_inputs = {"another count": 4, "no figure": None}.get(case, 3)
    metrics = ({"attack_success": 0.3, "adversarial_info": {"attacked": 3}} if case == "no figure"
               else {"attack_success": 0.3,
                     "adversarial_info": {"attacked": 3, "test_inputs": test_inputs}})
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    sources = {"no original rows": ("traffic",) * 3,
               "not leading": ("traffic", "original", "original", "original")}.get(
                   case, ("original",) * 3 + ("traffic",))
    held_out = Pool(tuple(b"x" for _ in sources), (0,) * len(sources), ("n",) * len(sources),
                    sources, ({},) * len(sources))
    champion = SimpleNamespace(path=tmp_path, kind="image", spec=None)
    model = None if case == "no model" else object()  # never attacked: the inputs do not match
    assert champion_inputs_attack(champion, None, held_out, model) is None  # nothing loaded
    table_ = attack_table(tmp_path, tmp_path, None)
    assert table_["challenger"] == 0.3 and "over different inputs" in table_["source"]
    matched = attack_table(tmp_path, tmp_path, (0.5, 2))
    assert matched["challenger"] == 0.5 and matched["attacked"]["challenger"] == 2
    assert matched["delta"] == 0.2 and "same inputs" in matched["source"]


def test_a_postgresql_logs_password_is_in_no_log_line_audit_or_manifest() -> None:
    """``retrain config`` (logged), the audit record's config and data, and the challenger's
    manifest carried the prediction log's URL whole, password too."""
    from types import SimpleNamespace

    from training.retrain.pipeline import manifest_info

    url = "postgresql://clf:s3cret@db:5432/clf"
    cfg = RetrainConfig(model="digits-cnn", log=url)
    assert cfg.describe()["log"] == "postgresql://clf:***@db:5432/clf" and cfg.log == url
    champion = SimpleNamespace(version="v1", split_seed=lambda: 7)
    data = SimpleNamespace(counts=lambda: {}, traffic_split=None)
    info = manifest_info(cfg, champion, data, SimpleNamespace(log=url))
    assert "s3cret" not in repr(info) and info["log"] == "postgresql://clf:***@db:5432/clf"
