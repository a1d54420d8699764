"""The docs page and the JSON errors of BentoML's own app (``service/rootapp.py``)."""

from __future__ import annotations

import base64
import hashlib
import re

from service import rootapp


def test_the_page_names_no_other_host_and_its_one_inline_script_is_allowed_by_hash() -> None:
    page = rootapp.page("clfserve", "1.2.3")
    assert "<title>clfserve 1.2.3: API</title>" in page
    assert not re.search(r"(https?:)?//[a-z]", page), "the page must load nothing from elsewhere"
    assert "googletagmanager" not in page and "validatorUrl: null" in page
    inline = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert inline == [rootapp.INITIALIZER]
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    policy = rootapp.page_headers()["content-security-policy"]
    script_src = next(d for d in policy.split(";") if d.strip().startswith("script-src"))
    assert script_src.split() == ["script-src", "'self'", f"'sha256-{digest}'"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy


def test_the_title_is_escaped() -> None:
    assert "<title>a&lt;b&gt; 1: API</title>" in rootapp.page("a<b>", "1")


def test_errors_take_the_v1_shape() -> None:
    reason, body = rootapp.error_payload(404, "GET", "/nope", "Not Found", None, "r1")
    assert reason == "not_found"
    assert body == {"error": {"reason": "not_found", "message": "no route GET /nope"},
                    "request_id": "r1"}
    reason, body = rootapp.error_payload(405, "POST", "/metrics", "Method Not Allowed",
                                         "HEAD, GET", "r2")
    assert (reason, body["error"]["message"]) == ("method_not_allowed", "use HEAD, GET")
    reason, body = rootapp.error_payload(416, "GET", "/static_content/x.css", "Range bad", None,
                                         "r3")
    assert (reason, body["error"]["message"]) == ("requested_range_not_satisfiable", "Range bad")
    assert rootapp.error_payload(599, "GET", "/", None, None, "r4")[1]["error"]["message"] \
        == "HTTP 599"


def test_install_is_idempotent_and_answers_errors_in_json() -> None:
    from _bentoml_impl.server.app import ServiceAppFactory
    from starlette.applications import Starlette
    from starlette.routing import Route
    from starlette.responses import PlainTextResponse
    from starlette.testclient import TestClient

    from service.v2 import server_version

    assert rootapp.install("clfserve", "1")
    patched = ServiceAppFactory.__call__
    try:
        assert rootapp.install("clfserve", "2") and ServiceAppFactory.__call__ is patched
        assert "clfserve 2: API" in ServiceAppFactory._clf_page
    finally:  # the page as the service installs it, for whatever runs next in this process
        rootapp.install("clfserve", server_version())

    from starlette.exceptions import HTTPException

    app = Starlette(routes=[Route("/metrics", lambda r: PlainTextResponse("ok"))])
    app.add_exception_handler(HTTPException, rootapp.http_error)
    client = TestClient(app)
    r = client.post("/metrics", headers={"X-Request-ID": "abc"})
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert r.json() == {"error": {"reason": "method_not_allowed",
                                  "message": f"use {r.headers['allow']}"}, "request_id": "abc"}
    assert r.headers["x-request-id"] == "abc"
    r = client.get("/elsewhere")
    assert r.status_code == 404 and r.json()["error"]["message"] == "no route GET /elsewhere"
    assert r.headers["x-request-id"] == r.json()["request_id"]
