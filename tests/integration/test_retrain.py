"""``python -m training.retrain`` end to end on tiny models in a private model store.

A digits champion is trained for one epoch on 300 images (chance level); 300 other digits are
logged as labelled production traffic. A challenger trained on both for a few epochs wins and
is promoted; a margin it cannot meet keeps it out; refused input, a skipped run and a run killed
mid-training leave the pointer and the store's versions as they were. The text model gets the
same treatment on generated demo texts.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import ROOT

IMAGE_NAME, TEXT_NAME = "retrain-digits", "retrain-lang"


@dataclass(frozen=True)
class Setup:
    name: str
    models: Path  # the --store folder
    log: Path
    first: str  # the champion's version, the name's first (and production) version
    root: Path

    @property
    def store(self) -> Any:
        from modelstore import open_store

        return open_store(self.models)

    def snapshot(self) -> tuple[Any, list[str]]:
        """The production pointer and the store's versions of the name."""
        from modelstore import registry

        versions = sorted(v.version for v in registry.list_versions(self.name, self.store))
        return registry.read_pointer(self.name, self.store), versions

    def argv(self, audit: Path, *extra: str) -> list[str]:
        return ["--model", self.name, "--store", str(self.models), "--log", str(self.log),
                "--audit", str(audit), *extra]


def log_traffic(path: Path, model: str, version: str, inputs: list[bytes],
                labels: list[str]) -> None:
    """One single-input request per input, tagged device=ios|android, each with feedback that
    arrived half a second after its prediction (so a time split's cutoff keeps every older
    row's label)."""
    from monitoring.store import PredictionRecord, open_log

    records = [PredictionRecord(
        request_id=f"req-{i}", item=0, ts=1_000.0 + i, model=model, version=version,
        predicted=labels[0], confidence=0.5, probabilities=np.zeros(len(set(labels))),
        embedding=np.zeros(4), features={}, slices={"device": ("ios", "android")[i % 2]},
        input=blob) for i, blob in enumerate(inputs)]
    with open_log(path) as log:
        log.write_batch(records)
        log.add_feedback_many({f"req-{i}": label for i, label in enumerate(labels)})
    # The log stamps a label with the time it is stored (now): move it to the made-up clock.
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE feedback SET ts = (SELECT p.ts + 0.5 FROM predictions p WHERE "
                   "p.request_id = feedback.request_id AND p.item = feedback.item)")


@pytest.fixture(scope="module")
def image_setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    from modelstore import open_store
    from training.config import TrainConfig
    from training.data import digits_images, stratified_subset
    from training.train import train_and_export

    root = tmp_path_factory.mktemp("retrain-image")
    cfg = TrainConfig(model_name=IMAGE_NAME, limit=300, epochs=1, warmup_epochs=0.5,
                      widths=(8, 16, 32), embedding_dim=32, progress=False,
                      out_dir=str(root / "train"))
    _, tag = train_and_export(cfg, store=open_store(root / "models"))
    # Traffic: 300 digits outside the champion's 300-image subset (so outside its test split).
    digits = digits_images()
    seen = set(stratified_subset(digits, cfg.limit, cfg.seed).names)
    fresh = [i for i, name in enumerate(digits.names) if name not in seen][:300]
    log_traffic(root / "predictions.db", IMAGE_NAME, str(tag.version),
                [digits.blobs[i] for i in fresh], [str(digits.labels[i]) for i in fresh])
    return Setup(IMAGE_NAME, root / "models", root / "predictions.db", str(tag.version), root)


def last_audit(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text().splitlines()[-1])


def write_drift_state(path: Path, model: str, version: str, drifted: bool) -> None:
    from monitoring.exporter import write_state

    write_state(path, model, {"model": model, "version": version, "since": "s", "until": "u",
                              "created": time.time(), "dataset_drift": drifted,
                              "share_drifted": 0.5 if drifted else 0.0,
                              "drifted_columns": 2 if drifted else 0, "columns": 4, "rows": []})


@pytest.fixture(scope="module")
def promoted(image_setup: Setup) -> tuple[int, dict[str, Any], tuple[Any, list[str]]]:
    """One retraining, gated on a drift report that says the production version drifted, that
    trains long enough to beat the one-epoch champion: (exit code, audit line, snapshot
    before)."""
    from monitoring.exporter import state_path_for
    from training.retrain import main

    before = image_setup.snapshot()
    write_drift_state(state_path_for(image_setup.log), IMAGE_NAME, before[0].version, True)
    audit = image_setup.root / "promoted-audit.jsonl"
    code = main(image_setup.argv(audit, "--epochs", "8", "--only-if-drifted"))
    return code, last_audit(audit), before


def test_a_better_challenger_is_promoted(image_setup: Setup, promoted: tuple) -> None:
    code, record, (pointer_before, versions_before) = promoted
    assert code == 0, record["reasons"]
    pointer, versions = image_setup.snapshot()
    new = record["challenger"]["version"]
    assert versions == sorted(versions_before + [new])
    assert pointer.version == new and pointer.history[0] == pointer_before.version
    assert pointer.reason.startswith("retrain: accuracy")
    assert record["decision"] == "promoted" and record["challenger"]["production"]
    assert record["champion"]["version"] == pointer_before.version
    assert record["drift"]["dataset_drift"] is True
    assert [r.split(":")[0] for r in record["reasons"]] == ["pass", "pass", "promoted"]
    counts = record["data"]["counts"]
    assert counts["original"] == {"train": 210, "val": 45, "test": 45}  # the champion's split
    # the attack rule compares the two over the same inputs: the champion's 45 test digits
    attack = record["evaluation"]["attack"]
    assert "same inputs" in attack["source"] and attack["challenger"] is not None
    assert 0 < attack["attacked"]["challenger"] <= 45
    assert sum(counts["traffic"].values()) == 300 and counts["traffic"]["test"] > 0
    table = record["evaluation"]
    assert table["overall"]["count"] == record["data"]["held_out"]
    assert table["overall"]["challenger"] > table["overall"]["champion"]
    for name in ("source=original", "source=traffic", "tag.device=ios", "size=tiny"):
        assert name in table["slices"], sorted(table["slices"])
    assert len(record["data"]["hash"]) == 64 and record["recipe"]["epochs"] == 8
    # The challenger's manifest says how it was made, and keeps the original split's seed.
    manifest = json.loads((image_setup.models / IMAGE_NAME / new / "manifest.json").read_text())
    assert manifest["data_source"] == "digits"
    assert manifest["retrain"]["champion"] == pointer_before.version
    assert manifest["retrain"]["split_seed"] == 0


def test_a_slice_regression_blocks_promotion(image_setup: Setup, promoted: tuple) -> None:
    """Real ONNX predictions of the two versions on held-out digits, with a crafted slice: the
    rows the better model gets right and the worse one wrong. With the better one as champion
    and any overall result accepted (margin -1), the slice alone keeps the worse one out."""
    from training.data import digits_images
    from training.retrain.evaluate import accuracy_table, compare, predict
    from training.retrain.gate import Rules, decide

    _, record, _ = promoted
    better = image_setup.models / IMAGE_NAME / record["challenger"]["version"]
    worse = image_setup.models / IMAGE_NAME / record["champion"]["version"]
    digits = digits_images()
    inputs, truth = digits.blobs[-400:], [str(y) for y in digits.labels[-400:]]
    good, bad = predict(better, inputs), predict(worse, inputs)
    crafted = [{"tag.cohort": "hard"} if g == t != b else {} for g, b, t in zip(good, bad, truth)]
    support = sum(map(bool, crafted))
    assert support > 0
    rules = Rules(margin=-1.0, max_slice_drop=0.05, min_slice_count=support)
    plain = [{} for _ in truth]
    assert decide(compare(accuracy_table(good, truth, plain),
                          accuracy_table(bad, truth, plain)), rules).promote
    decision = decide(compare(accuracy_table(good, truth, crafted),
                              accuracy_table(bad, truth, crafted)), rules)
    assert not decision.promote
    assert decision.reasons[1].startswith(f"fail: slice tag.cohort=hard (n={support}) accuracy "
                                          "0.0000 vs champion 1.0000")


def test_a_margin_the_challenger_cannot_meet_keeps_it_out(image_setup: Setup,
                                                         tmp_path: Path) -> None:
    from training.retrain import main

    pointer_before, versions_before = image_setup.snapshot()
    audit = tmp_path / "audit.jsonl"
    assert main(image_setup.argv(audit, "--epochs", "1", "--margin", "1.0")) == 3
    record = last_audit(audit)
    pointer, versions = image_setup.snapshot()
    assert pointer == pointer_before
    new = record["challenger"]["version"]
    assert versions == sorted(versions_before + [new])  # kept in the store, not production
    assert record["decision"] == "kept_out" and record["challenger"]["production"] is False
    assert record["reasons"][0].startswith("fail: overall accuracy")
    assert record["reasons"][-1].startswith(f"kept out: {IMAGE_NAME}:{new} stays in the store")


def test_a_dry_run_writes_nothing(image_setup: Setup, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from training.retrain import main

    before = image_setup.snapshot()
    audit = tmp_path / "audit.jsonl"
    # Rules any challenger passes, so the dry run would promote.
    assert main(image_setup.argv(audit, "--epochs", "1", "--margin", "-1", "--max-slice-drop",
                                 "1", "--max-robustness-drop", "1", "--max-attack-increase", "1",
                                 "--dry-run")) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["decision"] == "would_promote" and record["dry_run"] is True
    assert record["challenger"]["in_store"] is False
    assert image_setup.snapshot() == before
    assert not audit.exists()


@pytest.mark.parametrize("state", ["absent", "no drift", "another version"])
def test_only_if_drifted_skips_without_drift_on_production(
        image_setup: Setup, tmp_path: Path, state: str) -> None:
    from training.retrain import main

    before = image_setup.snapshot()
    drift_state = tmp_path / "drift_latest.json"
    if state != "absent":
        version = before[0].version if state == "no drift" else "someoldversion"
        write_drift_state(drift_state, IMAGE_NAME, version, drifted=state != "no drift")
    audit = tmp_path / "audit.jsonl"
    code = main(image_setup.argv(audit, "--only-if-drifted", "--drift-state", str(drift_state)))
    assert code == 4
    assert image_setup.snapshot() == before
    record = last_audit(audit)
    assert record["decision"] == "skipped" and record["challenger"] is None
    expected = {"absent": "no drift report on", "no drift": "found no drift",
                "another version": "is not about the production version"}[state]
    assert expected in record["reasons"][0]


def _unreadable(path: Path) -> None:
    """A file whose read fails. Root reads any file whatever its mode, so there: a link to a
    file every read of which fails with EIO."""
    if os.geteuid() == 0:
        path.symlink_to("/proc/self/mem")
    else:
        path.write_bytes(b"x")
        path.chmod(0)


def _bad_image_input(case: str, tmp: Path, setup: Setup) -> tuple[list[str], str]:
    """(extra argv, expected message part) for one kind of bad input."""
    from tests.conftest import png_bytes

    digit = png_bytes(np.zeros((8, 8), dtype=np.uint8))
    new = tmp / "new"
    if case == "missing model":
        return ["--model", "no-such-model"], "no model named 'no-such-model'"
    if case == "no such log":
        return ["--log", str(tmp / "missing.db")], "no such prediction log"
    if case == "log is not a log":
        (tmp / "garbage.db").write_bytes(b"this is not SQLite" * 100)
        return ["--log", str(tmp / "garbage.db")], "cannot read the prediction log"
    if case == "no such store":
        return ["--store", str(tmp / "nowhere")], "--store"
    if case == "no such new data":
        return ["--new-data", str(new)], "no such file or folder"
    if case == "empty folder":
        new.mkdir()
        (new / "3").mkdir()
        return ["--new-data", str(new)], "holds no images"
    if case == "unknown class":
        for label in ("3", "eleven"):
            (new / label).mkdir(parents=True)
            (new / label / "a.png").write_bytes(digit)
        return ["--new-data", str(new)], "label(s) ['eleven'] that"
    if case == "corrupt image":
        (new / "3").mkdir(parents=True)
        (new / "3" / "a.png").write_bytes(digit)
        (new / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        return ["--new-data", str(new)], "broken.png"
    if case == "unreadable file":
        (new / "3").mkdir(parents=True)
        _unreadable(new / "3" / "locked.png")
        return ["--new-data", str(new)], "cannot read"
    if case == "a file for an image model":
        (tmp / "new.csv").write_text("text,label\nhello,3\n")
        return ["--new-data", str(tmp / "new.csv")], "takes a folder"
    if case == "unknown feedback label":
        log_traffic(tmp / "bad.db", IMAGE_NAME, setup.first, [digit, digit], ["3", "eleven"])
        return ["--log", str(tmp / "bad.db")], "label(s) ['eleven'] that"
    raise AssertionError(case)


IMAGE_BAD_INPUTS = ["missing model", "no such log", "log is not a log", "no such store",
                    "no such new data", "empty folder", "unknown class", "corrupt image",
                    "unreadable file", "a file for an image model", "unknown feedback label"]


@pytest.mark.parametrize("case", IMAGE_BAD_INPUTS)
def test_bad_input_is_refused_and_changes_nothing(
        image_setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        case: str) -> None:
    from training.retrain import main

    before = image_setup.snapshot()
    extra, message = _bad_image_input(case, tmp_path, image_setup)
    audit = tmp_path / "audit.jsonl"
    assert main(image_setup.argv(audit, *extra)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert image_setup.snapshot() == before
    assert not audit.exists()


def test_a_retraining_killed_midway_leaves_production_untouched(image_setup: Setup,
                                                                tmp_path: Path) -> None:
    before = image_setup.snapshot()
    audit = tmp_path / "audit.jsonl"
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.retrain", *image_setup.argv(audit, "--epochs", "500")],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    seen, deadline = [], time.monotonic() + 120
    try:
        while not any(" epoch " in line for line in seen):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        proc.send_signal(signal.SIGKILL)  # mid-training, as the OOM killer would
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert image_setup.snapshot() == before
    assert not audit.exists()
    assert not [p for p in (image_setup.models / IMAGE_NAME).iterdir() if p.name.startswith(".")
                and p.name.endswith(".tmp")]


# ---- text --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    from modelstore import open_store
    from training.text.config import TextTrainConfig
    from training.text.demo import demo_texts
    from training.text.train import train_and_export

    root = tmp_path_factory.mktemp("retrain-text")
    cfg = TextTrainConfig(model="transformer", model_name=TEXT_NAME, demo_per_class=40,
                          limit=440, epochs=1, vocab_size=600, d_model=32, layers=1, heads=2,
                          ff_dim=64, max_length=64, progress=False, out_dir=str(root / "train"))
    _, tag = train_and_export(cfg, store=open_store(root / "models"))
    fresh = demo_texts(50, seed=7)  # another seed: other texts than the champion's
    # Production traffic arrives in no particular class order (demo_texts lists its texts class
    # by class): a seeded shuffle, so the time split's newest 20% holds every class too.
    order = np.random.default_rng(7).permutation(300)
    log_traffic(root / "predictions.db", TEXT_NAME, str(tag.version),
                [fresh.texts[i].encode() for i in order],
                [fresh.classes[fresh.labels[i]] for i in order])
    with open(root / "new.csv", "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["text", "label"])
        writer.writerows((t, fresh.classes[y]) for t, y in zip(fresh.texts[300:500],
                                                               fresh.labels[300:500]))
    return Setup(TEXT_NAME, root / "models", root / "predictions.db", str(tag.version), root)


def test_text_challenger_from_traffic_and_a_csv_is_promoted(text_setup: Setup,
                                                           tmp_path: Path) -> None:
    from training.retrain import main

    pointer_before, versions_before = text_setup.snapshot()
    audit = tmp_path / "audit.jsonl"
    code = main(text_setup.argv(audit, "--epochs", "5", "--new-data",
                                str(text_setup.root / "new.csv")))
    record = last_audit(audit)
    assert code == 0, record["reasons"]
    pointer, versions = text_setup.snapshot()
    assert pointer.version == record["challenger"]["version"] != pointer_before.version
    assert len(versions) == len(versions_before) + 1
    assert record["kind"] == "text"
    assert sum(record["data"]["counts"]["new"].values()) == 200
    assert sum(record["data"]["counts"]["traffic"].values()) == 300
    assert {"source=new", "source=traffic", "tag.device=ios"} <= set(
        record["evaluation"]["slices"])
    assert any(s.startswith("length=") for s in record["evaluation"]["slices"])
    # the attack rule: the challenger attacked on the champion's own test texts
    assert "same inputs" in record["evaluation"]["attack"]["source"]
    assert record["evaluation"]["attack"]["challenger"] is not None
    # Same preprocessing as the champion: the spec (and so the tokenizer) did not change.
    spec = [(text_setup.models / TEXT_NAME / v / "spec.json").read_text()
            for v in (pointer_before.version, pointer.version)]
    assert spec[0] == spec[1]


@pytest.mark.parametrize("case, content, message", [
    ("empty file", "", "is empty"),
    ("unknown label", "text,label\nbonjour tout le monde,fr\nhallo welt,klingon\n",
     "label(s) ['klingon'] that"),
    ("not UTF-8", None, "is not UTF-8"),
    ("a folder for a text model", None, "takes one .csv/.tsv/.jsonl file"),
])
def test_text_bad_input_is_refused(text_setup: Setup, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str], case: str,
                                   content: str | None, message: str) -> None:
    from training.retrain import main

    before = text_setup.snapshot()
    new = tmp_path / "new.csv"
    if case == "not UTF-8":
        new.write_bytes("text,label\ncaf\u00e9,fr\n".encode("latin-1"))
    elif case == "a folder for a text model":
        new = tmp_path / "folder"
        new.mkdir()
    else:
        new.write_text(content, encoding="utf-8")
    audit = tmp_path / "audit.jsonl"
    assert main(text_setup.argv(audit, "--new-data", str(new))) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert text_setup.snapshot() == before
    assert not audit.exists()
