"""Error reasons: preprocessing and request parsing name what is wrong; the service alone turns
a reason into an HTTP status, in one table (service/app.py STATUS)."""

from __future__ import annotations

import asyncio

import pytest

from preprocessing import REASONS as INPUT_REASONS
from service import requests
from service.requests import RequestError
from service.app import STATUS, App


def test_every_input_and_request_reason_has_a_4xx_status() -> None:
    for reason in [*INPUT_REASONS, *requests.REASONS]:
        assert reason in STATUS, f"{reason} has no HTTP status in service/app.py STATUS"
        assert 400 <= STATUS[reason] < 500, reason
    assert all(100 <= status < 600 for status in STATUS.values())


def call(app: App, method: str, path: str) -> tuple[int, dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b""}
    asyncio.run(app(scope, receive, send))
    import json

    return sent[0]["status"], json.loads(sent[1]["body"])


@pytest.mark.parametrize("path", ["/v1/classify/image/extra", "/v2/classify/image",
                                  "/anything/v1/models", "/v1/modelsx", "/v1/classify/image/"])
def test_routes_match_exact_paths_only(path: str) -> None:
    status, doc = call(App(), "GET" if "models" in path else "POST", path)
    # /v2 paths answer in the v2 protocol's shape: "error" is the message, "reason" beside it
    reason = doc["reason"] if path.startswith("/v2/") else doc["error"]["reason"]
    assert status == 404 and reason == "not_found"


def test_a_known_path_with_the_wrong_method_is_405() -> None:
    status, doc = call(App(), "GET", "/v1/classify/image")
    assert status == 405 and doc["error"]["reason"] == "method_not_allowed"


def test_a_route_before_bind_is_not_ready() -> None:
    status, doc = call(App(), "POST", "/v1/classify/text")
    assert status == 503 and doc["error"]["reason"] == "not_ready"


# every JSON body's parser: each goes through requests.parse_json
JSON_PARSERS = pytest.mark.parametrize("parse", [
    lambda body: requests.images(body, "application/json", 8),
    lambda body: requests.texts(body, "application/json", 8),
    requests.feedback,
], ids=["images", "texts", "feedback"])


@JSON_PARSERS
def test_json_nested_past_the_parsers_limit_is_a_bad_request(parse) -> None:
    """``[[[...]]]`` deeper than Python's recursion limit made ``json.loads`` raise
    ``RecursionError``, which every JSON body answered 500 ``internal``."""
    with pytest.raises(RequestError) as err:
        parse(b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert err.value.reason == "bad_request" and "nested too deeply" in err.value.message


@JSON_PARSERS
def test_json_with_a_number_past_pythons_digit_bound_says_so(parse) -> None:
    """A 5,000-digit integer made ``json.loads`` raise Python's own hint ("use
    sys.set_int_max_str_digits()"), which meant nothing to a client."""
    with pytest.raises(RequestError) as err:
        parse(b'{"text": ' + b"1" * 5000 + b"}")
    assert err.value.reason == "bad_request"
    assert "a number with more than 4300 digits" in err.value.message
    assert "sys." not in err.value.message
