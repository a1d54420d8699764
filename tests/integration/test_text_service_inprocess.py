"""One service instance serving the image and the text model side by side, in-process.

httpx drives the ASGI app directly with many requests at once, so the text batcher really groups
texts of mixed lengths; served probabilities are checked against ONNX Runtime run directly on
``TextPreprocessor.encode`` of the same strings.
"""

from __future__ import annotations

import asyncio
import importlib

import numpy as np
import pytest

from tests.conftest import run_service as run

from preprocessing import TextPreprocessor, load_spec
from service.metrics import get_metrics

pytestmark = pytest.mark.slow
TEXT_URL = "http://test/v1/classify/text"
IMAGE_URL = "http://test/v1/classify/image"

TEXTS = [
    "Hallo Welt, wie geht es dir heute?", "bonjour", "The weather is lovely today in London.",
    "Привет, как дела?", "dzień dobry " * 20, "ciao", "Dobrý den, jak se máte? " * 6,
    "hola amigos, ¿qué tal el fin de semana en Madrid con la familia?", "hej", "Goedemorgen!",
]


@pytest.fixture(scope="module")
def service_module(digits_model, text_model, monkeypatch_module):
    monkeypatch_module.setenv("CLF_IMAGE_MODEL", digits_model.tag)
    monkeypatch_module.setenv("CLF_TEXT_MODEL", text_model.tag)
    monkeypatch_module.setenv("CLF_MAX_TEXTS_PER_REQUEST", "16")
    monkeypatch_module.setenv("CLF_MAX_BODY_BYTES", "200000")
    monkeypatch_module.setenv("CLF_MAX_BATCH_TOKENS", "1024")
    import service.service as module

    return importlib.reload(module)  # settings are read at import


@pytest.fixture(scope="module")
def direct(text_model):
    """The exported artifact run without the service: its own preprocessor and ORT session."""
    import bentoml
    import onnxruntime as ort

    path = bentoml.models.get(text_model.tag).path
    spec = load_spec(open(f"{path}/spec.json").read())
    pre = TextPreprocessor.from_folder(path, spec)
    session = ort.InferenceSession(f"{path}/model.onnx", providers=["CPUExecutionProvider"])

    def probabilities(texts: list[str]) -> np.ndarray:
        ids, mask = pre.encode(texts)
        (logits,) = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    return probabilities


def _distribution(prediction: dict, labels: list[str]) -> np.ndarray:
    by_label = {t["label"]: t["probability"] for t in prediction["top_k"]}
    return np.array([by_label[label] for label in labels])


def test_both_models_are_served_side_by_side(service_module, digit_pngs, text_model):
    async def body(client, instance):
        assert instance.__is_ready__() and instance.image.ready and instance.text.ready
        models = await client.get("/v1/models")
        image = await client.post(IMAGE_URL, files={"image": ("d.png", digit_pngs[0][0], "image/png")})
        one = await client.post(TEXT_URL, json={"text": TEXTS[0]})
        many = await client.post(TEXT_URL, json={"texts": TEXTS[:4]})
        return models, image, one, many

    models, image, one, many = run(service_module, body)
    tasks = {m["name"]: m["task"] for m in models.json()["models"]}
    assert tasks == {"digits-cnn": "image-classification", "lang-tiny": "text-classification"}
    assert image.status_code == 200 and image.json()["model"] == "digits-cnn"
    for response, n in ((one, 1), (many, 4)):
        assert response.status_code == 200, response.text
        doc = response.json()
        assert doc["model"] == "lang-tiny" and doc["model_version"] == text_model.tag.split(":")[1]
        assert doc["request_id"] == response.headers["x-request-id"]
        assert len(doc["predictions"]) == n
        for pred in doc["predictions"]:
            assert pred["label"] == pred["top_k"][0]["label"] and pred["truncated"] is False
    assert one.json()["predictions"][0]["label"] == many.json()["predictions"][0]["label"]


def test_concurrent_mixed_lengths_form_batches_keep_order_and_match_onnx(service_module, direct):
    probabilities = direct

    async def body(client, instance):
        shapes = []
        model = instance.text.batcher.model
        original = model.run
        model.run = lambda batch: (shapes.append(batch["input_ids"].shape), original(batch))[1]
        labels = [m for m in (await client.get("/v1/models")).json()["models"]
                  if m["name"] == "lang-tiny"][0]["labels"]
        k = f"?top_k={len(labels)}"
        singles = await asyncio.gather(*[
            client.post(TEXT_URL + k, json={"text": TEXTS[i % len(TEXTS)]}) for i in range(40)])
        lists = await asyncio.gather(*[
            client.post(TEXT_URL + k, json={"texts": TEXTS[i:] + TEXTS[:i]}) for i in range(6)])
        model.run = original
        return singles, lists, shapes, labels

    singles, lists, shapes, labels = run(service_module, body)
    assert all(r.status_code == 200 for r in singles + lists)
    assert max(n for n, _ in shapes) > 1, shapes  # concurrent texts shared model calls
    assert all(n * length <= 1024 for n, length in shapes)  # CLF_MAX_BATCH_TOKENS
    expected = probabilities(TEXTS)
    for i, response in enumerate(singles):
        served = _distribution(response.json()["predictions"][0], labels)
        np.testing.assert_allclose(served, expected[i % len(TEXTS)], atol=1e-5)
    for i, response in enumerate(lists):  # each answer in its request's own order
        served = np.stack([_distribution(p, labels) for p in response.json()["predictions"]])
        np.testing.assert_allclose(served, np.roll(expected, -i, axis=0), atol=1e-5)


def test_a_text_over_max_length_tokens_is_truncated_and_the_answer_says_so(service_module):
    async def body(client, instance):
        return await client.post(TEXT_URL, json={"texts": ["kurz", "sehr lange Worte " * 80]})

    response = run(service_module, body)
    assert response.status_code == 200
    assert [p["truncated"] for p in response.json()["predictions"]] == [False, True]


@pytest.mark.parametrize("kwargs, status, reason", [
    ({"json": {"text": ""}}, 422, "empty_text"),
    ({"json": {"texts": ["fine", " \n\t "]}}, 422, "empty_text"),
    ({"json": {"text": "x" * 10_001}}, 413, "text_too_long"),
    ({"content": b'{"text": "\xff\xfe bad"}', "headers": {"Content-Type": "application/json"}}, 422, "bad_encoding"),
    ({"json": {"text": "nul\u0000inside"}}, 422, "bad_encoding"),
    ({"json": {"text": 12345}}, 422, "bad_field"),
    ({"json": {"texts": ["a", None]}}, 422, "bad_field"),
    ({"json": {"texts": ["a"], "extra": 1}}, 422, "bad_field"),
    ({"json": {"texts": []}}, 422, "empty"),
    ({"json": {"texts": ["a"] * 17}}, 413, "too_many_items"),
    ({"content": b"{broken", "headers": {"Content-Type": "application/json"}}, 400, "bad_request"),
])
def test_bad_text_input_is_a_4xx_and_the_next_request_is_served(service_module, kwargs, status, reason):
    rejected = get_metrics().rejected.labels("lang-tiny", reason)
    before = rejected._value.get()

    async def body(client, instance):
        bad = await client.post(TEXT_URL, **kwargs)
        after = await client.post(TEXT_URL, json={"texts": TEXTS[:3]})
        return bad, after

    bad, after = run(service_module, body)
    assert bad.status_code == status, bad.text
    doc = bad.json()
    assert doc["error"]["reason"] == reason and doc["request_id"]
    assert len(doc["error"]["message"]) > 15 and "Traceback" not in doc["error"]["message"]
    assert after.status_code == 200 and len(after.json()["predictions"]) == 3
    assert rejected._value.get() == before + 1  # counted once, under the text model's name


def test_a_model_of_the_wrong_kind_stops_start_up_naming_the_right_setting(text_model):
    from modelstore.artifact import ArtifactError, load_artifact

    with pytest.raises(ArtifactError, match="a text model; serve it with CLF_TEXT_MODEL"):
        load_artifact(text_model.tag, "image")
