"""The promotion gate's robustness and attack rules, planted with two real ONNX models.

A two-class image task: a bright square in the top half ("a") or the bottom half ("b") of a
dark 16x16 image. The champion compares the pixel variance of the two halves: blind to
polarity (an inverted image has the same variance), but it misses the few held-out images whose
whole top half is bright (no variance anywhere). The challenger compares the halves' mean
brightness: right on every clean held-out image, so it wins on the held-out set, but an inverted
image fools it every time. Both run through the real path: ``evaluate`` (ONNX Runtime behind the
shared preprocessing, on the robustness suite of the same held-out inputs), ``decide``,
``settle`` and ``audit_record``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import png_bytes

SIDE = 16
LABELS = ("a", "b")


def half_model(feature: str) -> "object":
    """input [N,1,16,16] -> logits [N,2] = [d - 0.01, -d], d = feature(top) - feature(bottom);
    feature ``variance`` or ``mean`` over the half's pixels (a tie answers "b")."""
    from onnx import TensorProto, helper

    def const(name: str, values: list, dtype: int = TensorProto.INT64) -> object:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(
            name + "_v", dtype, [len(values)], values))

    nodes = [const("zero", [0]), const("mid", [SIDE // 2]), const("end", [SIDE]),
             const("axis2", [2]), const("axis1", [1]),
             const("bias", [0.01], TensorProto.FLOAT),
             helper.make_node("Slice", ["input", "zero", "mid", "axis2"], ["top"]),
             helper.make_node("Slice", ["input", "mid", "end", "axis2"], ["bottom"])]
    for half in ("top", "bottom"):
        nodes.append(helper.make_node("ReduceMean", [half], [f"{half}_mean"], axes=[1, 2, 3],
                                      keepdims=0))
        if feature == "variance":
            nodes += [helper.make_node("Mul", [half, half], [f"{half}_sq"]),
                      helper.make_node("ReduceMean", [f"{half}_sq"], [f"{half}_msq"],
                                       axes=[1, 2, 3], keepdims=0),
                      helper.make_node("Mul", [f"{half}_mean", f"{half}_mean"],
                                       [f"{half}_mean2"]),
                      helper.make_node("Sub", [f"{half}_msq", f"{half}_mean2"],
                                       [f"{half}_f"])]
        else:
            nodes.append(helper.make_node("Identity", [f"{half}_mean"], [f"{half}_f"]))
    nodes += [helper.make_node("Sub", ["top_f", "bottom_f"], ["d"]),
              helper.make_node("Sub", ["d", "bias"], ["a_logit"]),
              helper.make_node("Neg", ["d"], ["b_logit"]),
              helper.make_node("Unsqueeze", ["a_logit", "axis1"], ["a_col"]),
              helper.make_node("Unsqueeze", ["b_logit", "axis1"], ["b_col"]),
              helper.make_node("Concat", ["a_col", "b_col"], ["logits"], axis=1)]
    graph = helper.make_graph(
        nodes, f"halves-{feature}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, SIDE, SIDE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def version_folder(root: Path, feature: str, metrics: dict) -> Path:
    """A store version folder as ``evaluate`` reads one: model, spec, labels, metrics."""
    import onnx

    from preprocessing import ImageSpec

    folder = root / feature
    folder.mkdir()
    onnx.save(half_model(feature), folder / "model.onnx")
    spec = ImageSpec(height=SIDE, width=SIDE, color_mode="L", mean=(0.5,), std=(0.5,))
    (folder / "spec.json").write_text(spec.to_json())
    (folder / "labels.json").write_text(json.dumps(list(LABELS)))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def held_out() -> tuple[list[bytes], list[int]]:
    """54 squares well inside their half (either class), then 6 "a" images whose whole top
    half is bright."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(54):
        label = i % 2
        img = np.full((SIDE, SIDE), 30, np.uint8)
        y = int(rng.integers(1, 3)) + label * SIDE // 2
        x = int(rng.integers(2, SIDE - 6))
        img[y:y + 4, x:x + 4] = 200
        images.append(png_bytes(img))
        labels.append(label)
    for _ in range(6):
        img = np.full((SIDE, SIDE), 30, np.uint8)
        img[:SIDE // 2] = 200
        images.append(png_bytes(img))
        labels.append(0)
    return images, labels


def judge(tmp_path: Path, champion_metrics: dict, challenger_metrics: dict,
          dry_run: bool = False, **rules: float) -> tuple[object, object]:
    """evaluate -> decide -> settle -> audit_record on the planted pair: (evaluation, record).
    Not a dry run, ``settle`` keeps a loser out without touching any store (it has none: only a
    dry run may be asked to promote)."""
    from preprocessing import load_spec
    from training.retrain.audit import audit_record
    from training.retrain.champion import Champion
    from training.retrain.config import RetrainConfig
    from training.retrain.data import Pool, RetrainData, Sources
    from training.retrain.evaluate import evaluate
    from training.retrain.fit import Challenger
    from training.retrain.gate import decide
    from training.retrain.promote import settle

    champ_dir = version_folder(tmp_path, "variance", champion_metrics)
    chall_dir = version_folder(tmp_path, "mean", challenger_metrics)
    spec = load_spec((champ_dir / "spec.json").read_text())
    champion = Champion("planted", "champ", champ_dir, "image", spec, LABELS,
                        {"data_source": "planted", "train_config": {"seed": 0}})
    challenger = Challenger("planted", "chall", chall_dir, epochs=1, seed=0, in_store=True)
    images, labels = held_out()
    test = Pool(tuple(images), tuple(labels), tuple(f"img{i}" for i in range(len(images))),
                ("new",) * len(images), ({},) * len(images))
    data = RetrainData(Pool(), Pool(), test, LABELS)
    cfg = RetrainConfig(model="planted", dry_run=dry_run, **rules)
    evaluation = evaluate(champion, challenger, data)
    decision = decide(evaluation.table, cfg.rules)
    assert dry_run or not decision.promote, decision
    outcome = settle(decision, champion, challenger, evaluation, store=None, dry_run=dry_run)
    record = audit_record(cfg, "now", champion, Sources(None, None), outcome, {}, {}, None,
                          data=data, challenger=challenger, evaluation=evaluation)
    return evaluation, json.loads(record.to_json())


def test_a_challenger_better_on_the_held_out_set_but_fragile_to_one_variation_is_kept_out(
        tmp_path: Path) -> None:
    evaluation, record = judge(tmp_path, {"attack_success": 0.2}, {"attack_success": 0.2})
    table = evaluation.table
    assert table["overall"]["champion"] == 0.9 and table["overall"]["challenger"] == 1.0
    variations = table["robustness"]["variations"]
    assert list(variations)[0] == "clean" and variations["clean"]["delta"] == 0.1
    assert variations["invert"] == {"champion": 0.9, "challenger": 0.0, "delta": -0.9}
    assert {"jpeg_q30", "rotate", "resize_nearest_down", "lowres_bicubic", "noise"} <= set(
        variations)
    # Every other variation: the challenger keeps up.
    assert all(cell["challenger"] >= cell["champion"] - 0.02
               for name, cell in variations.items() if name != "invert"), variations
    assert record["decision"] == "kept_out" and record["challenger"]["production"] is False
    assert [r.split(":")[0] for r in record["reasons"]] == ["pass", "pass", "fail", "kept out"]
    assert record["reasons"][2].startswith(
        "fail: robustness: invert 0.0000 < champion 0.9000 - 0.0200 (-0.9000 on the 60 held-out")
    assert record["notes"] == ["pass: attack success rate 0.2000 vs champion 0.2000 (+0.0000); "
                               "at most +0.0500 allowed"]
    assert record["evaluation"]["robustness"]["seed"] == 0
    assert record["rules"]["max_robustness_drop"] == 0.02


def test_a_challenger_easier_to_attack_is_kept_out(tmp_path: Path) -> None:
    # Robustness accepted whatever it says: only the attack rule can keep it out.
    attacked = {"adversarial_info": {"attacked": 54}}
    _, record = judge(tmp_path, {"attack_success": 0.10, **attacked},
                      {"attack_success": 0.30, **attacked}, max_robustness_drop=1.0)
    assert record["decision"] == "kept_out"
    assert [r.split(":")[0] for r in record["reasons"]] == ["pass", "pass", "fail", "kept out"]
    assert record["reasons"][2] == (
        "fail: attack: 0.3000 > champion 0.1000 + 0.0500: the challenger is easier to attack "
        "(attack success rate 0.3000 vs champion 0.1000 (+0.2000))")
    assert record["notes"][0].startswith("pass: robustness: no variation of the 60 held-out")
    assert record["evaluation"]["attack"]["delta"] == 0.2
    assert record["evaluation"]["attack"]["attacked"] == {"champion": 54, "challenger": 54}


def test_an_attack_rate_over_few_attacked_inputs_is_noted_not_judged(tmp_path: Path) -> None:
    _, record = judge(tmp_path, {"attack_success": 0.0, "adversarial_info": {"attacked": 5}},
                      {"attack_success": 1.0, "adversarial_info": {"attacked": 54}},
                      dry_run=True, max_robustness_drop=1.0)
    assert record["decision"] == "would_promote"
    assert record["notes"][1].startswith("skip: attack success rate 1.0000 vs champion 0.0000: "
                                         "the champion's is over 5 attacked")


@pytest.mark.parametrize("bound, promoted", [(0.25, True), (0.15, False)])
def test_the_attack_bound_is_configurable(tmp_path: Path, bound: float, promoted: bool) -> None:
    _, record = judge(tmp_path, {"attack_success": 0.10}, {"attack_success": 0.30},
                      dry_run=True, max_robustness_drop=1.0, max_attack_increase=bound)
    assert record["decision"] == ("would_promote" if promoted else "would_keep_out")


def test_a_champion_without_attack_figures_skips_that_rule_with_a_note(tmp_path: Path) -> None:
    _, record = judge(tmp_path, {"test_accuracy": 0.9}, {"attack_success": 0.9},
                      dry_run=True, max_robustness_drop=1.0)
    assert record["decision"] == "would_promote"
    assert [r.split(":")[0] for r in record["reasons"]] == ["pass", "pass"]
    assert record["notes"][1] == (
        "skip: attack success rate: the champion has no attack_success in metrics.json "
        "(exported before attacks were measured); rule not applied")
    assert record["evaluation"]["attack"]["champion"] is None


def test_the_gate_varies_the_held_out_set_as_the_robustness_suites_do_in_any_chunks(
        tmp_path: Path) -> None:
    """The gate builds the suite a chunk at a time; it is ``image_suite``/``text_suite`` of the
    whole held-out set all the same (same seed, same per-item randomness)."""
    from preprocessing import ImageSpec
    from training.retrain.champion import Champion
    from training.retrain.evaluate import max_side, robustness_suite, variation_names
    from training.robustness import image_suite, text_suite

    spec = ImageSpec(height=SIDE // 4, width=SIDE // 4, color_mode="L", mean=(0.5,),
                     std=(0.5,))  # max_side 16: the 16x16 images are not shrunk...
    images, _ = held_out()
    big = np.zeros((40, 30), np.uint8)
    big[5:20, 10:25] = 255
    images.append(png_bytes(big))  # ...but this one is
    image_champion = Champion("planted", "v", tmp_path, "image", spec, LABELS, {})
    assert max_side(image_champion) == SIDE
    whole = image_suite(images, 7, variation_names(image_champion), spec=spec, max_side=SIDE)
    chunks = [robustness_suite(image_champion, images[i:i + 25], 7, i) for i in (0, 25, 50)]
    assert sum(len(c["clean"]) for c in chunks) == 61
    assert list(whole) == list(chunks[0]) and "invert" in whole
    # The champion's recipe says whether inverted inputs are valid (default: yes for grayscale).
    assert "invert" not in variation_names(Champion("planted", "v", tmp_path, "image", spec,
                                                    LABELS, {"train_config": {"invert": False}}))
    assert {name: sum((c[name] for c in chunks), []) for name in whole} == whole

    texts = ["Das ist ein kleiner Test", "¿Dónde está la estación?", "hello world", "ok"]
    text_champion = Champion("planted", "v", tmp_path, "text", spec, LABELS,
                             {"train_config": {"invert": True}})  # (images only)
    whole_texts = text_suite(texts, 3)
    parts = [robustness_suite(text_champion, texts[i:i + 3], 3, i) for i in (0, 3)]
    assert {name: sum((c[name] for c in parts), []) for name in whole_texts} == whole_texts
