"""The text route over a real ``ServedTextModel`` with a no-op model: every bad input of the
issue's list gets its 4xx (and the next request is served), without training anything."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import httpx
import pytest

from preprocessing import TextPreprocessor, TextSpec
from modelstore.artifact import Artifact
from service.app import App
from service.runtime import TEXT_INPUTS, NoopModel
from service.served import ServedTextModel, Slot
from service.settings import Settings

URL = "http://test/v1/classify/text"
LABELS = ("de", "en", "fr")


@pytest.fixture(scope="module")
def preprocessor() -> TextPreprocessor:
    from training.text.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["hello world", "bonjour le monde", "hallo welt"] * 5,
                                    vocab_size=120, min_frequency=1)
    spec = TextSpec(max_length=16, max_chars=200,
                    tokenizer_sha256=hashlib.sha256(tokenizer.encode()).hexdigest())
    return TextPreprocessor(spec, tokenizer)


def serve(preprocessor: TextPreprocessor, body, max_texts: int = 4):
    async def main():
        artifact = Artifact("lang-unit", "v1", Path("."), preprocessor.spec, LABELS, {})
        text = ServedTextModel(artifact, NoopModel(3, 1, TEXT_INPUTS), preprocessor,
                              max_batch_size=8, max_batch_tokens=256, max_padding=0.25)
        api = App()
        api.bind({"text": Slot(text)}, Settings(image_model="", text_model="lang-unit",
                 max_body_bytes=10_000, max_images_per_request=4,
                 max_texts_per_request=max_texts, top_k=2))
        await text.start(warmup_batches=3)
        try:
            transport = httpx.ASGITransport(app=api)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await body(client)
        finally:
            await text.stop()

    return asyncio.run(main())


def test_one_text_and_a_list_answer_per_text_and_say_when_truncated(preprocessor):
    async def body(client):
        one = await client.post(URL, json={"text": "hello world"})
        many = await client.post(URL + "?top_k=3", json={"texts": ["hallo", "hello " * 30]})
        plain = await client.post(URL, content="bonjour".encode(),
                                  headers={"Content-Type": "text/plain; charset=utf-8"})
        models = await client.get("/v1/models")
        return one, many, plain, models

    one, many, plain, models = serve(preprocessor, body)
    assert one.status_code == 200, one.text
    doc = one.json()
    assert doc["model"] == "lang-unit" and doc["model_version"] == "v1" and doc["request_id"]
    (pred,) = doc["predictions"]
    assert pred["truncated"] is False and len(pred["top_k"]) == 2 and pred["label"] in LABELS
    assert [p["truncated"] for p in many.json()["predictions"]] == [False, True]
    assert len(many.json()["predictions"][0]["top_k"]) == 3
    assert plain.status_code == 200 and len(plain.json()["predictions"]) == 1
    (model,) = models.json()["models"]
    assert model["task"] == "text-classification" and model["spec"]["max_length"] == 16


@pytest.mark.parametrize("kwargs, status, reason, words", [
    ({"json": {"text": ""}}, 422, "empty_text", "empty"),
    ({"json": {"text": " \t\n\u200b "}}, 422, "empty_text", "whitespace"),
    ({"json": {"texts": ["ok", "   "]}}, 422, "empty_text", "text 1:"),
    ({"json": {"text": "a" * 201}}, 413, "text_too_long", "limit is 200"),
    ({"content": b'{"text": "caf\xe9"}', "headers": {"Content-Type": "application/json"}},
     422, "bad_encoding", "UTF-8"),
    ({"content": b"caf\xe9", "headers": {"Content-Type": "text/plain"}}, 422, "bad_encoding", "UTF-8"),
    ({"json": {"text": "a\u0000b"}}, 422, "bad_encoding", "NUL"),
    ({"json": {"texts": ["fine", "nul\u0000"]}}, 422, "bad_encoding", "text 1:"),
    ({"content": b'{"text": "\\ud800 lone"}', "headers": {"Content-Type": "application/json"}},
     422, "bad_encoding", "surrogate"),
    ({"json": {"text": 42}}, 422, "bad_field", "a number"),
    ({"json": {"texts": ["ok", 3.5]}}, 422, "bad_field", "texts[1]"),
    ({"json": {"texts": "one string"}}, 422, "bad_field", "list of strings"),
    ({"json": {"texts": ["a"], "lang": "en"}}, 422, "bad_field", "lang"),
    ({"json": {"sentences": ["a"]}}, 422, "bad_field", "sentences"),
    ({"json": ["a", "b"]}, 422, "bad_field", "list"),
    ({"json": {"texts": []}}, 422, "empty", "empty list"),
    ({"json": {"texts": ["a"] * 5}}, 413, "too_many_items", "limit is 4"),
    ({"content": b"{nope", "headers": {"Content-Type": "application/json"}}, 400, "bad_request", "JSON"),
    ({"content": b'{"texts": ' + b"[" * 4000 + b"]" * 4000 + b"}",
      "headers": {"Content-Type": "application/json"}}, 400, "bad_request", "nested too deeply"),
    ({"content": b"x", "headers": {"Content-Type": "image/png"}}, 400, "bad_request", "Content-Type"),
    ({"content": b"x" * 10_001, "headers": {"Content-Type": "text/plain"}}, 413, "too_large", "limit"),
])
def test_bad_input_is_a_4xx_and_the_next_request_is_served(preprocessor, kwargs, status, reason, words):
    async def body(client):
        bad = await client.post(URL, **kwargs)
        after = await client.post(URL, json={"texts": ["hello", "welt"]})
        return bad, after

    bad, after = serve(preprocessor, body)
    assert bad.status_code == status, bad.text
    error = bad.json()["error"]
    assert error["reason"] == reason and words in error["message"], error
    assert after.status_code == 200 and len(after.json()["predictions"]) == 2


def test_a_route_for_a_model_not_configured_is_a_404_naming_the_setting(preprocessor):
    async def body(client):
        return await client.post("http://test/v1/classify/image", content=b"x",
                                 headers={"Content-Type": "image/png"})

    response = serve(preprocessor, body)
    assert response.status_code == 404 and "CLF_IMAGE_MODEL" in response.json()["error"]["message"]
