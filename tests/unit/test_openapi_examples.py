"""The OpenAPI document's examples and model names, from the route table (no server): every
example is valid by the schema beside it and is an input the shared preprocessing takes; the v2
routes name the models the settings serve. ``tests/e2e/test_openapi_fuzz.py`` sends the examples
to a real server (each answers 200 from the model of its kind)."""

from __future__ import annotations

import base64
import json

import pytest
from openapi_schema_validator import OAS30Validator

from preprocessing import InputError
from preprocessing.image import decode_image
from preprocessing.spec import ImageSpec, TextSpec
from preprocessing.text import normalize_text
from service.app import App
from service.requests import EXAMPLE_PNG_BASE64, EXAMPLE_TEXT
from service.settings import Settings

BOTH = {"CLF_IMAGE_MODEL": "digits-cnn", "CLF_TEXT_MODEL": "lang-transformer:v7"}


def operations(settings: Settings) -> dict[tuple[str, str], dict]:
    return {(method, route.template): doc for route in App(settings).routes
            for method, doc in route.docs.items()}


def examples(media: dict) -> dict[str, object]:
    out = {"example": media["example"]} if "example" in media else {}
    return {**out, **{name: e["value"] for name, e in media.get("examples", {}).items()}}


def test_every_example_is_valid_by_its_own_schema() -> None:
    seen = 0
    for (method, path), doc in operations(Settings.from_env(BOTH)).items():
        for media_type, media in doc.get("requestBody", {}).get("content", {}).items():
            for name, value in examples(media).items():
                errors = list(OAS30Validator(media["schema"]).iter_errors(value))
                assert not errors, f"{method} {path} {media_type} {name}: {errors[0].message}"
                seen += 1
    assert seen >= 9  # image JSON, text JSON and plain, feedback x2, v2 infer x4


def test_the_v2_routes_name_the_served_models_and_offer_examples_of_their_kinds() -> None:
    docs = operations(Settings.from_env(BOTH))
    for (method, path), doc in docs.items():
        if "{name}" in path:
            name = next(p for p in doc["parameters"] if p["name"] == "name")
            assert name["schema"]["enum"] == ["digits-cnn", "lang-transformer"], (method, path)
    infer = docs[("POST", "/v2/models/{name}/infer")]["requestBody"]["content"]
    offered = infer["application/json"]["examples"]
    assert set(offered) == {"image", "image, the label and the 3 best", "text",
                            "text, the label and the 3 best"}
    assert offered["image"]["summary"].startswith("digits-cnn: ")
    assert offered["text"]["summary"].startswith("lang-transformer: ")
    text_only = operations(Settings.from_env({"CLF_IMAGE_MODEL": "", "CLF_TEXT_MODEL": "t"}))
    infer = text_only[("POST", "/v2/models/{name}/infer")]["requestBody"]["content"]
    assert {e["value"]["inputs"][0]["name"]
            for e in infer["application/json"]["examples"].values()} == {"text"}


def test_without_settings_the_names_are_free_and_both_kinds_are_shown() -> None:
    from service import v2_docs

    doc = v2_docs.infer(False)
    assert "enum" not in doc["parameters"][0]["schema"]
    kinds = {e["value"]["inputs"][0]["name"]
             for e in doc["requestBody"]["content"]["application/json"]["examples"].values()}
    assert kinds == {"image", "text"}


def test_the_examples_are_inputs_the_preprocessing_takes() -> None:
    img = decode_image(base64.b64decode(EXAMPLE_PNG_BASE64), ImageSpec(8, 8, "L", mean=(0.5,), std=(0.5,)))
    assert img.size == (8, 8)
    assert normalize_text(EXAMPLE_TEXT, TextSpec()).startswith("hello")


@pytest.mark.parametrize("text, valid", [("hi", True), (" 7 ", True), ("", False), (" \t\n", False)])
def test_a_text_holds_something_visible_by_the_schema(text: str, valid: bool) -> None:
    """The schema's part of what the preprocessing refuses (``empty_text``): the empty string
    and whitespace only; invisible characters and NUL are beyond it (answered 422)."""
    schema = operations(Settings.from_env(BOTH))[("POST", "/v1/classify/text")][
        "requestBody"]["content"]
    for media_type, body in (("text/plain", text), ("application/json", {"text": text}),
                             ("application/json", {"texts": ["ok", text]})):
        ok = OAS30Validator(schema[media_type]["schema"]).is_valid(body)
        assert ok is valid, (media_type, json.dumps(body))
    if not valid:
        with pytest.raises(InputError):
            normalize_text(text, TextSpec())


def test_the_documents_info_names_the_served_models_and_replaces_bentomls() -> None:
    from types import SimpleNamespace

    from service import openapi, patches

    settings = SimpleNamespace(image_model="digits-cnn:abc", text_model="")
    info = openapi.info("clfserve", "0.1.0", settings)
    assert info["version"] == "0.1.0" and "Serving: image `digits-cnn`." in info["description"]

    class Spec:  # BentoML's spec object: asdict() with its own info
        def asdict(self):
            return {"openapi": "3.0.2", "info": {"title": "x", "version": "None",
                                                 "contact": {"name": "BentoML Team"}},
                    "paths": {"/p": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}

    doc = patches._FixedSpec(Spec(), info).asdict()
    assert doc["info"] == info and doc["paths"]["/p"] == {"type": "string", "nullable": True}
    assert patches._FixedSpec(Spec()).asdict()["info"]["version"] == "None"  # no info: as it was
