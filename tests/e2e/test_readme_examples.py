"""The README's API examples, run as a user would paste them: every ``curl`` line of its Serving
section (the ``/v1`` routes, the OpenAPI document, the v2 protocol) and its ``tritonclient``
snippet, against a real ``bentoml serve`` with both models, from a folder holding the files they
name (``digit-3.png``, ``digit-7.png``, ``note.txt``). Only the address and the model names are
put in (the README's ``127.0.0.1:3000``, ``digits-cnn`` and ``lang-transformer`` are the demo's);
each answer must be a 200 of the shape the README shows beside it. An example that stops
working, or a route, field or option it uses that changes, fails here."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import Settings

from .conftest import ROOT

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
SECTION = ("\n## Serving\n", "\n### Errors\n")  # the API examples lie between these headings
ADDRESS = "127.0.0.1:3000"
IMAGE_MODEL, TEXT_MODEL = "digits-cnn", "lang-transformer"


def _section() -> str:
    text = README.read_text()
    start = text.index(SECTION[0])
    return text[start:text.index(SECTION[1], start)]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", _section(), flags=re.S)


def readme_curls() -> list[str]:
    """Every curl command of the section's bash blocks, continuation lines joined."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("curl "):
                commands.append(line.strip())
    return commands


def test_the_section_has_the_examples_this_test_runs():
    curls = readme_curls()
    routes = [re.search(r"http://[^/\s']+(/[^\s'?|]*)", c).group(1) for c in curls]
    assert routes.count("/v1/classify/image") == 3 and routes.count("/v1/classify/text") == 4
    assert "/docs.json" in routes and f"/v2/models/{TEXT_MODEL}/infer" in routes
    assert any("tritonclient" in block for block in _blocks("python"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, digit_pngs) -> Path:
    """The files the examples name, as a user would have them beside the shell."""
    folder = tmp_path_factory.mktemp("readme")
    pngs = {label: png for png, label in reversed(digit_pngs)}  # the first of each digit
    (folder / "digit-3.png").write_bytes(pngs[3])
    (folder / "digit-7.png").write_bytes(pngs[7])
    (folder / "note.txt").write_text("Guten Morgen, wie geht es dir heute?\n", encoding="utf-8")
    return folder


def _put_in(text: str, server, digits_model, text_model) -> str:
    host = server.url.removeprefix("http://")
    return (text.replace(ADDRESS, host)
            .replace(IMAGE_MODEL, digits_model.tag.partition(":")[0])
            .replace(TEXT_MODEL, text_model.tag.partition(":")[0]))


def _shell_env() -> dict[str, str]:
    # `python` in the examples is the one running the tests (a venv may have no `python` on PATH)
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("base64") is None,
                    reason="curl and base64 (coreutils) are needed to run the README's examples")
@pytest.mark.parametrize("index", range(len(readme_curls())))
def test_a_readme_curl_example_answers_as_documented(index, server, workdir, digits_model,
                                                     text_model):
    command = _put_in(readme_curls()[index], server, digits_model, text_model)
    piped = "|" in command
    if not piped:  # the status after the body, on its own line
        command = command.replace("curl -s ", "curl -s -w '\\n%{http_code}' ", 1)
    done = subprocess.run(["bash", "-c", command], cwd=workdir, env=_shell_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{command}\n{done.stderr}"
    if piped:  # `curl .../docs.json | python -m json.tool | head`: the document's first lines
        assert done.stdout.startswith("{") and '"openapi": "3.' in done.stdout, done.stdout
        return
    body, _, status = done.stdout.rpartition("\n")
    assert status == "200", f"{command}\n{done.stdout}"
    answer = json.loads(body)
    if "/v1/classify/" in command:
        predictions = answer["predictions"]
        assert len(predictions) == _inputs_sent(command) and answer["request_id"]
        top_k = (int(re.search(r"top_k=(\d+)", command).group(1)) if "top_k=" in command
                 else Settings.top_k)  # CLF_TOP_K's default, the fixture leaves it
        for p in predictions:
            assert {"label", "confidence", "ood", "ood_score", "top_k"} <= set(p)
            assert len(p["top_k"]) == top_k and p["top_k"][0]["label"] == p["label"]
    elif "/infer" in command:
        outputs = {o["name"]: o for o in answer["outputs"]}
        assert {"label", "probabilities", "ood"} <= set(outputs), answer
        shape = int(re.search(r'shape\\?": \[(\d+)\]', command).group(1))
        assert outputs["label"]["shape"] == [shape] and len(outputs["label"]["data"]) == shape
    else:  # a model's metadata
        assert answer["name"] and {i["name"] for i in answer["inputs"]} & {"text", "image"}


def _inputs_sent(command: str) -> int:
    """How many images or texts a /v1 example sends."""
    if "-d '{" in command:  # a JSON body of texts
        doc = json.loads(re.search(r"-d '(\{.*?\})'", command).group(1))
        return len(doc["texts"]) if "texts" in doc else 1
    return (command.count("@digit-") + command.count("base64 -w0") + command.count("@note.txt")
            + command.count("gzip -c note.txt"))


def test_the_readme_tritonclient_example_prints_what_it_says(server, workdir, digits_model,
                                                             text_model):
    pytest.importorskip("tritonclient.http")
    snippet = next(b for b in _blocks("python") if "tritonclient" in b)
    done = subprocess.run([sys.executable, "-c", _put_in(snippet, server, digits_model, text_model)],
                          cwd=workdir, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # the README's comment: `[b'3'] (1, 10)`: one label of the ten digits, and their probabilities
    assert re.fullmatch(r"\[b'\d'\] \(1, 10\)\n", done.stdout), done.stdout
