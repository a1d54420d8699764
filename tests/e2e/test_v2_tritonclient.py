"""End to end: the Open Inference Protocol v2 routes of a real ``bentoml serve`` (image and
text model side by side), driven by ``tritonclient[http]``, the protocol's reference client."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest

from service import v2json

from .test_serve import metric

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.slow

IMAGE, TEXT = "digits-cnn", "lang-tiny"
TEXTS = ["Guten Morgen, wie geht es Ihnen?", "merci beaucoup", "Hello there, how are you?"]


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60.0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def served(server) -> dict[str, dict]:
    return {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}


def bytes_input(name: str, items: list[bytes], binary: bool = True):
    inp = httpclient.InferInput(name, [len(items)], "BYTES")
    inp.set_data_from_numpy(np.array(items, dtype=np.object_), binary_data=binary)
    return inp


def strings(array) -> list[str]:
    """A BYTES output as strings (tritonclient gives bytes from binary data, str from JSON)."""
    return [s.decode() if isinstance(s, bytes) else s for s in array.reshape(-1)]


def v1_probabilities(server, route: str, labels: list[str], **kwargs) -> tuple[list, np.ndarray]:
    answer = httpx.post(f"{server.url}/v1/classify/{route}?top_k={len(labels)}", timeout=30,
                        **kwargs).json()
    rows = [{t["label"]: t["probability"] for t in p["top_k"]} for p in answer["predictions"]]
    return ([p["label"] for p in answer["predictions"]],
            np.array([[row[lab] for lab in labels] for row in rows]))


def test_server_and_model_metadata_and_readiness(client, served):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "clfserve" and "binary_tensor_data" in meta["extensions"]
    for name, inputs in [(IMAGE, {"image", "input"}), (TEXT, {"text"})]:
        version = served[name]["version"]
        assert client.is_model_ready(name) and client.is_model_ready(name, version)
        assert not client.is_model_ready(name, "not-a-version")
        model = client.get_model_metadata(name, version)
        assert model["name"] == name and model["versions"] == [version]
        assert {i["name"] for i in model["inputs"]} == inputs
        outputs = {o["name"]: o for o in model["outputs"]}
        assert outputs["label"]["datatype"] == "BYTES"
        assert outputs["probabilities"] == {"name": "probabilities", "datatype": "FP32",
                                            "shape": [-1, len(served[name]["labels"])]}
        assert model["parameters"]["labels"] == served[name]["labels"]
    spec = served[IMAGE]["spec"]
    (tensor,) = [i for i in client.get_model_metadata(IMAGE)["inputs"] if i["name"] == "input"]
    assert tensor["shape"][1:] == [len(spec["mean"]), spec["height"], spec["width"]]


@pytest.mark.parametrize("binary", [True, False])
def test_images_match_v1_in_binary_and_json_modes(server, client, served, digit_pngs, binary):
    pngs = [data for data, _ in digit_pngs[:5]]
    labels = served[IMAGE]["labels"]
    items = pngs if binary else [base64.b64encode(p) for p in pngs]
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary)
               for n in ("label", "probabilities", "ood", "embedding")]
    result = client.infer(IMAGE, [bytes_input("image", items, binary)], outputs=outputs,
                          request_id="triton-1", headers={"X-Request-ID": f"e2e-v2-{binary}"})
    want_labels, want_probs = v1_probabilities(
        server, "image", labels, files=[("image", (f"{i}.png", p, "image/png"))
                                        for i, p in enumerate(pngs)])
    assert strings(result.as_numpy("label")) == want_labels
    np.testing.assert_allclose(result.as_numpy("probabilities"), want_probs, atol=1e-5)
    assert result.as_numpy("ood").shape == (5,) and result.as_numpy("ood").dtype == np.bool_
    assert result.as_numpy("embedding").shape[0] == 5
    response = result.get_response()
    assert response["id"] == "triton-1" and response["model_name"] == IMAGE
    assert response["parameters"]["request_id"] == f"e2e-v2-{binary}"


def test_default_outputs_and_the_versioned_route(client, served, digit_pngs):
    version = served[IMAGE]["version"]
    result = client.infer(IMAGE, [bytes_input("image", [digit_pngs[0][0]])],
                          model_version=version)
    names = [o["name"] for o in result.get_response()["outputs"]]
    assert names == ["label", "probabilities", "ood"]  # no embedding unless asked
    assert result.as_numpy("probabilities").shape == (1, len(served[IMAGE]["labels"]))


@pytest.mark.parametrize("binary", [True, False])
def test_texts_match_v1(server, client, served, binary):
    labels = served[TEXT]["labels"]
    result = client.infer(TEXT, [bytes_input("text", [t.encode() for t in TEXTS], binary)],
                          outputs=[httpclient.InferRequestedOutput(n, binary_data=binary)
                                   for n in ("label", "probabilities", "truncated")])
    want_labels, want_probs = v1_probabilities(server, "text", labels, json={"texts": TEXTS})
    assert strings(result.as_numpy("label")) == want_labels
    np.testing.assert_allclose(result.as_numpy("probabilities"), want_probs, atol=1e-5)
    assert result.as_numpy("truncated").tolist() == [False] * len(TEXTS)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_the_fp32_tensor_path_equals_the_bytes_path(client, served, digit_pngs, binary):
    """The tensor as raw bytes, and as JSON numbers (``binary_data=False``: a body large enough
    for ``service/v2json.py``'s simdjson path)."""
    from preprocessing import ImageSpec, preprocess_image_bytes

    spec = ImageSpec.from_dict(served[IMAGE]["spec"])
    pngs = [data for data, _ in digit_pngs[5:9]]
    tensors = np.stack([preprocess_image_bytes(p, spec) for p in pngs]).astype(np.float32)
    inp = httpclient.InferInput("input", list(tensors.shape), "FP32")
    inp.set_data_from_numpy(tensors, binary_data=binary)
    assert binary or len(json.dumps(tensors.tolist())) > v2json.MIN_BYTES
    by_tensor = client.infer(IMAGE, [inp])
    by_bytes = client.infer(IMAGE, [bytes_input("image", pngs)])
    assert strings(by_tensor.as_numpy("label")) == strings(by_bytes.as_numpy("label"))
    np.testing.assert_allclose(by_tensor.as_numpy("probabilities"),
                               by_bytes.as_numpy("probabilities"), atol=1e-5)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_answers_as_tritonclient_sends_them(client, served, digit_pngs,
                                                                    algorithm):
    """tritonclient's ``request_compression_algorithm`` (``Content-Encoding``) and
    ``response_compression_algorithm`` (``Accept-Encoding``, which the server may ignore)."""
    pngs = [data for data, _ in digit_pngs[9:12]]
    plain = client.infer(IMAGE, [bytes_input("image", pngs)])
    packed = client.infer(IMAGE, [bytes_input("image", pngs)],
                          request_compression_algorithm=algorithm,
                          response_compression_algorithm=algorithm)
    assert strings(packed.as_numpy("label")) == strings(plain.as_numpy("label"))
    np.testing.assert_allclose(packed.as_numpy("probabilities"), plain.as_numpy("probabilities"),
                               atol=1e-6)


def test_v2_requests_count_in_the_shared_metrics(server, client, digit_pngs):
    before = httpx.get(f"{server.url}/metrics").text
    for _ in range(3):
        client.infer(IMAGE, [bytes_input("image", [digit_pngs[1][0], digit_pngs[2][0]])])
        client.infer(TEXT, [bytes_input("text", [TEXTS[0].encode()])])
    after = httpx.get(f"{server.url}/metrics").text
    grown = {m: metric(after, "clf_predictions_total", model=m)
             - metric(before, "clf_predictions_total", model=m) for m in (IMAGE, TEXT)}
    assert grown == {IMAGE: 6, TEXT: 3}


@pytest.mark.parametrize("call, status, words", [
    (lambda c: c.infer(IMAGE, [bytes_input("pixels", [b"x"])]), "422", "has no input(s)"),
    (lambda c: c.infer(IMAGE, [bytes_input("image", [b"not an image"])]), "415", ""),
    (lambda c: c.infer(IMAGE, [bytes_input("image", [b"%%%"], binary=False)]), "422",
     "not valid base64"),
    (lambda c: c.infer(TEXT, [bytes_input("text", [b"   "])]), "422", "empty"),
    (lambda c: c.infer(TEXT, [bytes_input("text", [b"x"] * 17)]), "413", "limit is 16"),
    (lambda c: c.infer("no-such-model", [bytes_input("text", [b"x"])]), "404",
     "no model named"),
    (lambda c: c.infer(TEXT, [bytes_input("text", [b"x"])], model_version="0"), "404",
     "is not served"),
    (lambda c: c.get_model_metadata("no-such-model"), "404", "no model named"),
])
def test_errors_are_4xx_with_a_message_tritonclient_shows(client, call, status, words):
    with pytest.raises(InferenceServerException) as err:
        call(client)
    assert err.value.status() == status
    assert isinstance(err.value.message(), str) and words in err.value.message()
    assert str(err.value).startswith(f"[{status}] ")


def test_after_errors_the_server_still_serves(client, digit_pngs):
    result = client.infer(IMAGE, [bytes_input("image", [digit_pngs[3][0]])])
    assert result.as_numpy("label").shape == (1,)
