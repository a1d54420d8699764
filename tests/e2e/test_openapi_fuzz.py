"""The OpenAPI document of a real ``bentoml serve``: it lists every route the service answers,
validates as OpenAPI 3, and schemathesis fuzzing every operation in it (bounded in examples and
time) finds no 5xx and no answer that breaks the document; the server serves normally after."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import start_server, stop_server

pytestmark = pytest.mark.slow
FUZZ = Path(__file__).parent / "fuzz"
TOKEN = "fuzz-token"


@pytest.fixture(scope="module")
def fuzzed_server(digits_model, text_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    srv = start_server(
        {"CLF_IMAGE_MODEL": digits_model.tag, "CLF_TEXT_MODEL": text_model.tag,
         "CLF_WORKERS": "1", "CLF_FEEDBACK_TOKEN": TOKEN,
         "CLF_SLICE_KEYS": "device=ios|android|web;region",
         "CLF_PREDICTION_LOG": str(work / "predictions.db"),
         "CLF_MAX_BODY_BYTES": "300000", "CLF_MAX_IMAGES_PER_REQUEST": "8",
         "CLF_MAX_TEXTS_PER_REQUEST": "8"},
        work / "server.log")
    yield srv
    stop_server(srv)


def document(server) -> dict:
    response = httpx.get(f"{server.url}/docs.json", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_document_lists_every_route_and_validates_as_openapi_3(fuzzed_server) -> None:
    from openapi_spec_validator import validate

    from service.service import api

    doc = document(fuzzed_server)
    validate(doc)  # raises with the first problem
    assert doc["openapi"].startswith("3.")
    # this service's info, not BentoML's (version "None" from source, badges, BentoML's contact)
    from service.v2 import server_version

    info = doc["info"]
    assert info["title"] == "clfserve" and info["version"] == server_version() != "None"
    assert "contact" not in info and "bentoml" not in info["description"].lower()
    assert "Open Inference Protocol" in info["description"]
    for route in api.routes:
        for method in route.handlers:
            assert route.template in doc["paths"], f"{route.template} is not in /docs.json"
            assert method.lower() in doc["paths"][route.template], f"{method} {route.template}"
    image = doc["paths"]["/v1/classify/image"]["post"]
    assert set(image["requestBody"]["content"]) >= {"multipart/form-data", "application/json",
                                                     "image/*"}
    names = {p["name"] for p in image["parameters"]}
    assert {"top_k", "X-Request-ID", "X-Slices"} <= names
    reasons = image["responses"]["422"]["content"]["application/json"]["schema"]
    assert "corrupt" in reasons["properties"]["error"]["properties"]["reason"]["enum"]
    feedback = doc["paths"]["/v1/feedback"]["post"]
    assert feedback["security"] and "securitySchemes" in doc["components"]
    swagger = httpx.get(f"{fuzzed_server.url}/", timeout=10)
    assert swagger.status_code == 200 and "html" in swagger.headers["content-type"]


def test_errors_outside_the_api_are_json_with_a_request_id(fuzzed_server) -> None:
    """BentoML's own app (any path outside /v1 and /v2, /metrics, the docs' assets) answered
    404 and 405 in plain text; now in /v1's JSON shape, with X-Request-ID and, on a 405, Allow."""
    url = fuzzed_server.url
    cases = [("GET", "/nope", 404, "not_found", "no route GET /nope"),
             ("GET", "/static_content/nope.js", 404, "not_found", None),
             ("POST", "/metrics", 405, "method_not_allowed", None),
             ("DELETE", "/livez", 405, "method_not_allowed", None)]
    for method, path, status, reason, message in cases:
        r = httpx.request(method, url + path, headers={"X-Request-ID": f"root-{status}"},
                          timeout=10)
        assert r.status_code == status, (method, path, r.text)
        assert r.headers["content-type"] == "application/json", (path, r.text)
        body = r.json()
        assert body["error"]["reason"] == reason and body["request_id"] == f"root-{status}"
        assert r.headers["x-request-id"] == f"root-{status}"
        if message:
            assert body["error"]["message"] == message
        if status == 405:
            assert "GET" in r.headers["allow"] and r.headers["allow"] in body["error"]["message"]
    assert httpx.get(url + "/metrics", timeout=10).status_code == 200  # still served


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason="no chromium binary: install "
                    "Debian's package (apt-get install -y chromium)")
def test_the_docs_page_lists_the_routes_and_loads_nothing_from_elsewhere(fuzzed_server,
                                                                        tmp_path) -> None:
    """The page at / (Swagger UI) in headless Chromium: it renders every route of the document
    with no console message (a script or request the page's Content-Security-Policy blocks is
    one), and it names no other host (BentoML's page loaded Google Tag Manager)."""
    page = httpx.get(f"{fuzzed_server.url}/", timeout=10)
    assert "googletagmanager" not in page.text and "https://" not in page.text
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000",
         "--dump-dom", f"{fuzzed_server.url}/"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    rendered = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', proc.stdout))
    assert {"/v1/classify/image", "/v1/classify/text", "/v2/models/{name}/infer",
            "/metrics"} <= rendered, sorted(rendered)
    assert "<title>clfserve" in proc.stdout


def test_every_documented_example_is_answered(fuzzed_server, digits_model, text_model) -> None:
    """What Swagger UI's "Try it out" sends: each request body example of the document, to the
    model of its kind (a v2 example names its input: ``image`` or ``text``), answers 200; the
    feedback examples once the requests they label have been answered (``req-42`` with one
    image, ``req-43`` with two)."""
    from service.requests import EXAMPLE_PNG_BASE64

    url, auth = fuzzed_server.url, {"Authorization": f"Bearer {TOKEN}"}
    served = {"image": digits_model.tag.partition(":")[0], "text": text_model.tag.partition(":")[0]}
    for rid, count in (("req-42", 1), ("req-43", 2)):
        r = httpx.post(f"{url}/v1/classify/image", json={"images": [EXAMPLE_PNG_BASE64] * count},
                       headers={"X-Request-ID": rid}, timeout=30)
        assert r.status_code == 200, r.text
    doc, sent = document(fuzzed_server), 0
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            names = {p["name"]: p["schema"].get("enum") for p in op.get("parameters", [])}
            for media_type, media in op.get("requestBody", {}).get("content", {}).items():
                cases = ({"": media["example"]} if "example" in media else {}) | {
                    k: e["value"] for k, e in media.get("examples", {}).items()}
                for case, value in cases.items():
                    target = path
                    if "{name}" in path:
                        if "{version}" in path:
                            continue  # the same bodies as the unversioned route
                        kind = value["inputs"][0]["name"]
                        model = served[kind]
                        assert model in names["name"], (path, names)
                        target = path.replace("{name}", model)
                    kwargs = ({"json": value} if media_type == "application/json" else
                              {"content": value.encode(), "headers": {"content-type": media_type}})
                    r = httpx.request(method.upper(), f"{url}{target}", timeout=30,
                                      headers={**auth, **kwargs.pop("headers", {})}, **kwargs)
                    assert r.status_code == 200, f"{method} {target} {media_type} {case}: {r.text}"
                    sent += 1
    assert sent >= 9


def test_schemathesis_finds_nothing(fuzzed_server, tmp_path) -> None:
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "hooks",
           "PYTHONPATH": os.pathsep.join([str(FUZZ), os.environ.get("PYTHONPATH", "")])}
    cmd = [str(Path(sys.executable).parent / "schemathesis"),
           "--config-file", str(FUZZ / "schemathesis.toml"), "run",
           f"{fuzzed_server.url}/docs.json", "--checks", "all",
           "--max-examples", os.environ.get("CLF_FUZZ_EXAMPLES", "40"), "--seed", "20261202",
           "--request-timeout", "20", "--header", f"Authorization: Bearer {TOKEN}"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Fuzzing" in output and "generated" in output, output[-3000:]  # it really ran
    # The server is alive and answers as before.
    assert httpx.get(f"{fuzzed_server.url}/readyz", timeout=10).status_code == 200
    answer = httpx.post(f"{fuzzed_server.url}/v1/classify/text", json={"text": "hello"},
                        timeout=10)
    assert answer.status_code == 200, answer.text
    log = fuzzed_server.log_text()
    assert "unexpected failure" not in log and "inference failed" not in log, log[-4000:]
