"""The service's monitoring, in-process: what each answer writes to the prediction log, slice
tags, OOD flags, the feedback route, the drift gauges, and hot reload of a promoted version.

The service object is the real one (ONNX Runtime, batchers, the SQLite log); httpx drives its
ASGI app directly.
"""

from __future__ import annotations

import asyncio
import importlib
import io
import sqlite3
import time

import numpy as np
import pytest
from PIL import Image

from tests.conftest import clone_version, run_service

pytestmark = pytest.mark.slow
IMAGE = "/v1/classify/image"
TEXT = "/v1/classify/text"
FEEDBACK = "/v1/feedback"
TOKEN = "s3cret-token"
NAME = "mon-digits"


@pytest.fixture(scope="module")
def setup(digits_model, text_model, tmp_path_factory, monkeypatch_module):
    """A model name of its own (so promotions here touch nothing else) and a fresh log."""
    tmp = tmp_path_factory.mktemp("monitoring")
    first = clone_version(digits_model.tag, NAME, tmp)  # a name's first version is production
    log_path = tmp / "predictions.db"
    env = {"CLF_IMAGE_MODEL": NAME, "CLF_TEXT_MODEL": text_model.tag,
           "CLF_PREDICTION_LOG": str(log_path), "CLF_FEEDBACK_TOKEN": TOKEN,
           "CLF_SLICE_KEYS": "device=ios|android;customer", "CLF_SLICE_MAX_VALUES": "2",
           "CLF_RELOAD_INTERVAL_S": "3600", "CLF_DRIFT_REFRESH_S": "3600"}
    for key, value in env.items():
        monkeypatch_module.setenv(key, value)
    import service.service as module

    module = importlib.reload(module)
    return {"module": module, "log": log_path, "tmp": tmp, "tag": digits_model.tag, "first": first}


def run(setup, body):
    return run_service(setup["module"], body)


def _rows(log_path, where: str = "", args=()) -> list[sqlite3.Row]:
    db = sqlite3.connect(log_path)
    db.row_factory = sqlite3.Row
    try:
        return db.execute(f"SELECT * FROM predictions {where}", args).fetchall()
    finally:
        db.close()


def _noise_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_every_answer_is_logged_with_features_slices_ood_and_its_input(setup, digit_pngs):
    data, _ = digit_pngs[0]

    async def body(client, instance):
        files = [("image", (f"{i}.png", digit_pngs[i][0], "image/png")) for i in range(3)]
        r = await client.post(IMAGE, files=files, headers={
            "X-Request-ID": "log-1", "X-Slices": "device=ios; customer=acme"})
        assert r.status_code == 200, r.text
        text = await client.post(TEXT, json={"texts": ["hello there my friend", "bonjour"]},
                                 headers={"X-Request-ID": "log-2", "X-Slices": "device=web"})
        assert text.status_code == 200, text.text
        return r.json(), text.json()

    image_answer, text_answer = run(setup, body)
    for prediction in image_answer["predictions"] + text_answer["predictions"]:
        assert isinstance(prediction["ood"], bool) and prediction["ood_score"] >= 0
    rows = _rows(setup["log"], "WHERE request_id = ? ORDER BY item", ("log-1",))
    assert [r["item"] for r in rows] == [0, 1, 2]
    for row, prediction in zip(rows, image_answer["predictions"]):
        assert row["model"] == NAME and row["version"] == image_answer["model_version"]
        assert row["predicted"] == prediction["label"]
        assert row["confidence"] == pytest.approx(prediction["confidence"], abs=1e-6)
        assert bool(row["ood"]) == prediction["ood"]
        assert row["latency_ms"] > 0
        assert __import__("json").loads(row["slices"]) == {"device": "ios", "customer": "acme"}
        features = __import__("json").loads(row["features"])
        assert features["width"] == 32 and 0 <= features["brightness"] <= 1
        assert len(np.frombuffer(row["embedding"], "<f4")) > 1
        probs = np.frombuffer(row["probabilities"], "<f4")
        assert probs.sum() == pytest.approx(1.0, abs=1e-4)
    from monitoring.store import open_log

    with open_log(setup["log"]) as log:  # the inputs live in segment files beside the log
        assert log.inputs("log-1")[0] == digit_pngs[0][0]  # the uploaded file, for retraining
        assert [x.decode() for x in log.inputs("log-2")] == ["hello there my friend", "bonjour"]
    text_rows = _rows(setup["log"], "WHERE request_id = ? ORDER BY item", ("log-2",))
    assert __import__("json").loads(text_rows[0]["slices"]) == {"device": "other"}  # not listed
    assert __import__("json").loads(text_rows[0]["features"])["words"] == 4


def test_slice_tags_are_bounded(setup, digit_pngs):
    data = digit_pngs[0][0]

    async def body(client, instance):
        statuses = {}
        for i, header in enumerate(["customer=a", "customer=b", "customer=c", "colour=red",
                                    "device", "customer=" + "x" * 65]):
            r = await client.post(IMAGE, content=data, headers={
                "Content-Type": "image/png", "X-Slices": header, "X-Request-ID": f"slice-{i}"})
            statuses[header[:12]] = (r.status_code, r.json().get("error", {}).get("message", ""))
        return statuses

    statuses = run(setup, body)
    assert statuses["colour=red"][0] == 422 and "allowed: customer, device" in statuses["colour=red"][1]
    assert statuses["device"][0] == 422 and "key=value" in statuses["device"][1]
    assert statuses["customer=xxx"][0] == 422
    values = [__import__("json").loads(r["slices"])["customer"] for r in _rows(
        setup["log"], "WHERE request_id IN ('slice-0', 'slice-1', 'slice-2') ORDER BY request_id")]
    # "acme" (previous test) and "a" took the 2 free values of the key: the rest fold into other
    assert values == ["a", "other", "other"]


def test_noise_images_are_mostly_flagged_real_digits_mostly_not(setup, digit_pngs):
    async def body(client, instance):
        noise = [(await client.post(IMAGE, content=_noise_png(i), headers={
            "Content-Type": "image/png"})).json()["predictions"][0]["ood"] for i in range(40)]
        real = [(await client.post(IMAGE, content=d, headers={
            "Content-Type": "image/png"})).json()["predictions"][0]["ood"] for d, _ in digit_pngs]
        return noise, real

    noise, real = run(setup, body)
    assert np.mean(noise) >= 0.9, f"noise flagged {np.mean(noise):.0%}"
    assert np.mean(real) <= 0.25, f"real digits flagged {np.mean(real):.0%}"


def test_feedback_needs_the_token_knows_ids_and_is_idempotent(setup, digit_pngs):
    async def body(client, instance):
        data = digit_pngs[1][0]
        r = await client.post(IMAGE, content=data, headers={"Content-Type": "image/png",
                                                            "X-Request-ID": "fb-1"})
        assert r.status_code == 200
        auth = {"Authorization": f"Bearer {TOKEN}"}
        good = {"request_id": "fb-1", "labels": [str(digit_pngs[1][1])]}
        out = {
            "no_token": await client.post(FEEDBACK, json=good),
            "bad_token": await client.post(FEEDBACK, json=good, headers={"Authorization": "Bearer x"}),
            "unknown": await client.post(FEEDBACK, json={"request_id": "nope", "label": "1"}, headers=auth),
            "bad_label": await client.post(FEEDBACK, json={"request_id": "fb-1", "label": "cat"}, headers=auth),
            "two_labels": await client.post(FEEDBACK, json={"request_id": "fb-1", "labels": ["1", "2"]}, headers=auth),
            "malformed": await client.post(FEEDBACK, json={"id": "fb-1"}, headers=auth),
            "first": await client.post(FEEDBACK, json=good, headers=auth),
            "repeat": await client.post(FEEDBACK, json=good, headers=auth),
            "many": await client.post(FEEDBACK, json={"feedback": [good, {"request_id": "log-1", "labels": ["0", "1", "2"]}]}, headers=auth),
        }
        return out

    out = run(setup, body)
    assert out["no_token"].status_code == 401 and "Bearer" in out["no_token"].headers["www-authenticate"]
    assert out["bad_token"].status_code == 401
    assert out["unknown"].status_code == 404 and "nope" in out["unknown"].json()["error"]["message"]
    assert out["bad_label"].status_code == 422 and "cat" in out["bad_label"].json()["error"]["message"]
    assert out["two_labels"].status_code == 422
    assert out["malformed"].status_code == 422
    assert out["first"].status_code == 200 and out["first"].json()["results"][0]["created"] == 1
    assert out["repeat"].status_code == 200 and out["repeat"].json()["results"][0]["unchanged"] == 1
    assert out["many"].status_code == 200
    assert [r["labels"] for r in out["many"].json()["results"]] == [1, 3]
    from monitoring.store import open_log

    with open_log(setup["log"]) as log:
        stored = {x.request_id for x in log.labelled_inputs(NAME)}
    assert {"fb-1", "log-1"} <= stored


def test_a_log_that_cannot_be_written_answers_503_and_the_server_recovers(setup, digit_pngs):
    data = digit_pngs[0][0]

    async def body(client, instance):
        log = instance.recorder.store
        real = log.write_rows

        def broken(rows):
            raise sqlite3.OperationalError("disk I/O error")

        log.write_rows = broken
        failed = await client.post(IMAGE, content=data, headers={"Content-Type": "image/png"})
        log.write_rows = real
        ok = await client.post(IMAGE, content=data, headers={"Content-Type": "image/png"})
        return failed, ok

    failed, ok = run(setup, body)
    assert failed.status_code == 503 and failed.json()["error"]["reason"] == "log_unavailable"
    assert ok.status_code == 200


def test_drift_gauges_show_the_latest_report(setup):
    from prometheus_client import REGISTRY, generate_latest

    from monitoring.exporter import state_path_for, write_state

    write_state(state_path_for(setup["log"]), NAME, {
        "dataset_drift": True, "share_drifted": 0.25, "created": 1700000000.0,
        "rows": [{"feature": "brightness", "score": 0.001, "threshold": 0.05, "drifted": True}]})

    async def body(client, instance):
        instance.drift.refresh()
        return generate_latest(REGISTRY).decode()

    text = run(setup, body)
    assert f'clf_drift_detected{{model="{NAME}"}} 1.0' in text
    assert f'clf_drift_score{{feature="brightness",model="{NAME}"}} 0.001' in text


def test_hot_reload_swaps_a_promoted_version_under_load_and_refuses_a_broken_one(setup, digit_pngs):
    from prometheus_client import REGISTRY

    from modelstore import registry

    second = clone_version(setup["tag"], NAME, setup["tmp"])
    broken = clone_version(setup["tag"], NAME, setup["tmp"], corrupt=True)
    data = digit_pngs[0][0]

    def failures() -> float:
        return REGISTRY.get_sample_value("clf_model_reloads_total", {"model": NAME, "result": "failed"}) or 0.0

    async def body(client, instance):
        reloader = instance.reloaders[0]
        before = instance.image.version
        assert before == setup["first"]
        stop = asyncio.Event()
        seen: list[tuple[int, str]] = []

        async def load():
            while not stop.is_set():
                r = await client.post(IMAGE, content=data, headers={"Content-Type": "image/png"})
                seen.append((r.status_code, r.json().get("model_version", "")))

        clients = [asyncio.create_task(load()) for _ in range(8)]
        await asyncio.sleep(0.2)
        registry.promote(NAME, second, reason="test")
        swapped = await reloader.check()
        await asyncio.sleep(0.2)
        failed_before = failures()
        registry.promote(NAME, broken, reason="test: a broken version")
        refused = await reloader.check()
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*clients)
        models = (await client.get("/v1/models")).json()["models"]
        return swapped, refused, seen, instance.image.version, models, failures() - failed_before

    swapped, refused, seen, serving, models, new_failures = run(setup, body)
    assert swapped and not refused
    assert serving == second  # the broken version was refused; the promoted good one serves
    assert [s for s, _ in seen if s != 200] == []  # no request failed during either switch
    versions = [v for _, v in seen]
    assert setup["first"] in versions and second in versions and broken not in versions
    assert versions.index(second) > versions.index(setup["first"])
    assert {m["version"] for m in models if m["name"] == NAME} == {second}
    assert new_failures == 1
    registry.promote(NAME, second, reason="test: restore")


def test_random_strings_are_mostly_flagged_real_texts_mostly_not(setup):
    import random
    import string

    from training.text.demo import demo_texts

    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " "
    noise = ["".join(rng.choice(alphabet) for _ in range(rng.randint(5, 60))) for _ in range(48)]
    real = list(demo_texts(per_class=4, seed=321).texts)  # texts the model never saw

    async def body(client, instance):
        flags = {}
        for name, texts in (("noise", noise), ("real", real)):
            r = await client.post(TEXT, json={"texts": texts[:16]})
            r2 = await client.post(TEXT, json={"texts": texts[16:32]})
            r3 = await client.post(TEXT, json={"texts": texts[32:48]})
            flags[name] = [p["ood"] for x in (r, r2, r3) for p in x.json()["predictions"]]
        return flags

    flags = run(setup, body)
    assert np.mean(flags["noise"]) >= 0.9, f"random strings flagged {np.mean(flags['noise']):.0%}"
    assert np.mean(flags["real"]) <= 0.25, f"real texts flagged {np.mean(flags['real']):.0%}"


def test_a_shifted_text_mix_drifts_and_the_same_mix_does_not(setup, text_model, tmp_path):
    """Texts logged by the service, then `python -m monitoring drift` over each window: fresh
    texts of the training mix are not flagged; long texts of one language are."""
    from datetime import datetime, timezone

    from monitoring.__main__ import main
    from training.text.demo import demo_texts

    fresh = demo_texts(per_class=12, seed=777)
    same = list(fresh.texts)
    german = [t for t, lab in zip(fresh.texts, fresh.labels) if fresh.classes[lab] == "de"]
    shifted = [" ".join(german[i:] + german[:i]) for i in range(len(german))] * 11

    async def body(client, instance):
        windows = {}
        for name, texts in (("same", same), ("shifted", shifted)):
            start = time.time()
            for i in range(0, len(texts), 16):
                r = await client.post(TEXT, json={"texts": texts[i:i + 16]})
                assert r.status_code == 200, r.text
            windows[name] = (start, time.time() + 0.001)
            await asyncio.sleep(0.05)
        return windows

    windows = run(setup, body)
    iso = lambda ts: datetime.fromtimestamp(ts, timezone.utc).isoformat()  # noqa: E731
    codes = {}
    for name, (since, until) in windows.items():
        codes[name] = main(["drift", "--model", text_model.tag.split(":")[0], "--log",
                            str(setup["log"]), "--since", iso(since), "--until", iso(until),
                            "--out", str(tmp_path / name), "--state", str(tmp_path / "state.json")])
    assert codes == {"same": 0, "shifted": 1}


def test_a_worker_that_missed_a_version_falls_back_to_it_when_the_newest_is_refused(setup):
    """The pointer moves twice between two checks (good, then broken): the worker refuses the
    broken version and ends on the good one, like the workers that saw it in between."""
    from modelstore import registry

    async def body(client, instance):
        reloader = instance.reloaders[0]
        start = instance.image.version
        good = clone_version(setup["tag"], NAME, setup["tmp"])
        broken = clone_version(setup["tag"], NAME, setup["tmp"], corrupt=True)
        registry.promote(NAME, good, reason="test: missed by the worker")
        registry.promote(NAME, broken, reason="test: cannot load")
        swapped = await reloader.check()
        again = await reloader.check()  # nothing moved: nothing retried
        answer = (await client.post(IMAGE, content=b"", headers={"Content-Type": "image/png"}))
        return start, good, swapped, again, instance.image.version, answer.status_code

    start, good, swapped, again, serving, status = run(setup, body)
    assert swapped and not again
    assert serving == good != start
    assert status == 422  # still serving (an empty body is the client's error)


def test_the_ood_input_feature_signal_and_its_switch(setup, monkeypatch):
    """By default the image model's scorer reads the inputs' features, so they are computed even
    without a prediction log; CLF_OOD_INPUT_FEATURES=false leaves the signal (and, with the log
    off, the features) out."""
    import dataclasses

    module = setup["module"]
    on = module._image_model(setup["tag"])  # no recorder: the prediction log off
    assert on.ood.feature_bank is not None and on.wants_features
    assert on.ood.fitted_on == "training split"
    monkeypatch.setattr(module, "SETTINGS",
                        dataclasses.replace(module.SETTINGS, ood_input_features=False))
    off = module._image_model(setup["tag"])
    assert off.ood.feature_bank is None and not off.wants_features
    assert off.ood.expected_flag_rate < on.ood.expected_flag_rate
