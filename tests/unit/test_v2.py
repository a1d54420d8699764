"""Open Inference Protocol v2 (service/v2.py): the wire (JSON and Triton's binary tensor
extension, BYTES elements, answers) as pure functions, then the routes in-process over real
``ServedImageModel`` / ``ServedTextModel`` objects with a small deterministic fake model."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from modelstore.artifact import Artifact
from preprocessing import ImageSpec, TextPreprocessor, TextSpec, preprocess_image_bytes
from service import v2
from service.app import App
from service.requests import RequestError
from service.runtime import TEXT_INPUTS, Outputs, softmax
from service.served import ServedImageModel, ServedTextModel, Slot
from service.settings import Settings

IMAGE_LABELS = ("cat", "dog", "fox")
TEXT_LABELS = ("de", "en", "fr")
SPEC = ImageSpec(height=8, width=8, color_mode="L", mean=(0.5,), std=(0.5,))


# ---- the wire ------------------------------------------------------------------------------

def framed(header: dict, *chunks: bytes) -> tuple[bytes, str]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), str(len(head))


def test_bytes_elements_round_trip_and_cut_elements_are_refused():
    items = [b"", b"a", "é".encode(), bytes(range(256))]
    raw = v2.encode_bytes(items)
    assert raw[:4] == struct.pack("<I", 0) and raw[4:8] == struct.pack("<I", 1)
    assert v2.decode_bytes(raw) == items
    for cut in (raw[:-1], raw + b"\x01\x00"):
        with pytest.raises(RequestError) as err:
            v2.decode_bytes(cut, "input 'text'")
        assert err.value.reason == "bad_request" and "input 'text'" in err.value.message


def test_a_json_request_with_nested_data_parameters_and_outputs():
    req = v2.parse_infer(json.dumps({
        "id": "req-1", "parameters": {"binary_data_output": True, "custom": 3},
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2, 1],
                    "data": [["hallo"], ["héllo"]]}],
        "outputs": [{"name": "label", "parameters": {"binary_data": False}},
                    {"name": "probabilities", "parameters": {"classification": 2}},
                    {"name": "embedding"}],
    }).encode())
    assert req.id == "req-1" and req.binary_output is True
    (t,) = req.inputs
    assert (t.name, t.datatype, t.shape, t.binary) == ("text", "BYTES", [2, 1], False)
    assert t.data == [b"hallo", "héllo".encode()]
    assert [(o.name, o.binary, o.classification) for o in req.outputs] == [
        ("label", False, 0), ("probabilities", None, 2), ("embedding", None, 0)]


def test_a_binary_request_splits_header_and_tensors_in_input_order():
    floats = np.arange(6, dtype="<f4")
    elements = v2.encode_bytes([b"one", b"three"])
    body, length = framed({"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [2, 3],
         "parameters": {"binary_data_size": floats.nbytes}},
        {"name": "b", "datatype": "BYTES", "shape": [2],
         "parameters": {"binary_data_size": len(elements)}},
        {"name": "c", "datatype": "BYTES", "shape": [1], "data": ["json too"]},
    ]}, floats.tobytes(), elements)
    a, b, c = v2.parse_infer(body, length).inputs
    assert a.binary and a.data.dtype == np.float32 and a.data.tolist() == floats.tolist()
    assert b.binary and b.data == [b"one", b"three"]
    assert not c.binary and c.data == [b"json too"]


def test_the_request_tritonclient_builds_parses_in_both_modes():
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.http._utils import _get_inference_request

    pngs = np.array([b"\x89PNG fake", b"\xff\xd8 jpeg"], dtype=np.object_)
    for binary in (True, False):
        inp = httpclient.InferInput("image", [2], "BYTES")
        data = pngs if binary else np.array([base64.b64encode(p) for p in pngs], dtype=np.object_)
        inp.set_data_from_numpy(data, binary_data=binary)
        tensor = httpclient.InferInput("input", [1, 1, 2, 2], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 1, 2, 2), np.float32), binary_data=binary)
        out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
        body, json_size = _get_inference_request(
            [inp, tensor], "rid", [out], 0, False, False, 0, None, None)
        req = v2.parse_infer(body, None if json_size is None else str(json_size))
        image, array = req.inputs
        assert image.binary is binary and array.data.tolist() == [1.0] * 4
        assert image.data == (list(pngs) if binary else [base64.b64encode(p) for p in pngs])
        assert req.id == "rid" and req.outputs[0].binary is binary


@pytest.mark.parametrize("doc, length, reason, words", [
    (b"{nope", None, "bad_request", "not valid JSON"),
    (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", None, "bad_request", "nested too deeply"),
    (b"[]", None, "bad_field", "JSON object"),
    (b'{"inputs": []}', None, "empty", "non-empty list"),
    (b'{"inputs": [{"name": "text", "datatype": "INT64", "shape": [1], "data": [1]}]}', None,
     "bad_field", "INT64"),
    (b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}', None,
     "bad_field", "holds 2 elements, the data has 1"),
    (b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1], "data": ["a"]}]}', None,
     "bad_field", "non-negative integers"),
    (b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [3]}]}', None,
     "bad_field", "must be strings"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": ["a", "b"]}]}', None,
     "bad_field", "must be numbers"),
    (b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1]}]}', None, "bad_field",
     "neither 'data' nor"),
    (b'{"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], '
     b'"parameters": {"binary_data_size": 0}}]}', None, "bad_request",
     "no Inference-Header-Content-Length"),
    (b'{"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}', "999",
     "bad_request", "not a length within"),
    (b'{"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": ["a"], '
     b'"parameters": {"shared_memory_region": "r"}}]}', None, "bad_field", "shared memory"),
    (b'{"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": ["a"]}, '
     b'{"name": "t", "datatype": "BYTES", "shape": [1], "data": ["b"]}]}', None, "bad_field",
     "repeat"),
    (b'{"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": ["a"]}], '
     b'"outputs": [{"name": "label", "parameters": {"binary_data": "yes"}}]}', None,
     "bad_field", "true or false"),
    (b'{"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": ["a"]}], '
     b'"outputs": [{"name": "label", "parameters": {"binary_data": null}}]}', None,
     "bad_field", "true or false"),  # null is not "absent" (found by the fuzz test)
    (b'{"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": ["a"]}], '
     b'"outputs": null}', None, "bad_field", "'outputs' must be a list"),
    (b'{"id": null, "inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}',
     None, "bad_field", "'id' must be a string"),
])
def test_malformed_requests_name_what_is_wrong(doc, length, reason, words):
    with pytest.raises(RequestError) as err:
        v2.parse_infer(doc, length)
    assert err.value.reason == reason and words in err.value.message, err.value.message


def test_binary_framing_errors():
    body, length = framed({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2],
                                       "parameters": {"binary_data_size": 4}}]}, b"\0" * 4)
    with pytest.raises(RequestError, match="holds 2 FP32 values"):
        v2.parse_infer(body, length)
    body, length = framed({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                                       "parameters": {"binary_data_size": 4}}]}, b"\0" * 6)
    with pytest.raises(RequestError, match="2 bytes after the JSON header belong to no input"):
        v2.parse_infer(body, length)
    body, length = framed({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                                       "parameters": {"binary_data_size": 8}}]}, b"\0" * 4)
    with pytest.raises(RequestError, match="more than the 4 bytes left"):
        v2.parse_infer(body, length)


def test_answers_in_json_and_binary_read_back_with_tritonclient():
    outputs = [
        v2.OutputTensor("label", "BYTES", [2], ["cat", "dög"]),
        v2.OutputTensor("probabilities", "FP32", [2, 3],
                        np.array([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]], np.float32)),
        v2.OutputTensor("ood", "BOOL", [2], np.array([False, True])),
    ]
    head = {"model_name": "m", "model_version": "1", "id": "x"}
    body, ctype, headers = v2.encode_response(head, [(o, False) for o in outputs])
    assert ctype == "application/json" and headers == []
    doc = json.loads(body)
    assert doc["outputs"][0] == {"name": "label", "datatype": "BYTES", "shape": [2],
                                 "data": ["cat", "dög"]}
    assert doc["outputs"][2]["data"] == [False, True]
    body, ctype, headers = v2.encode_response(head, [(o, i != 2) for i, o in enumerate(outputs)])
    assert ctype == "application/octet-stream"
    ((name, value),) = headers
    assert name == b"inference-header-content-length"
    header = json.loads(body[:int(value)])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 4 + 3 + 4 + 4
    assert header["outputs"][1]["parameters"]["binary_data_size"] == 24
    assert "data" in header["outputs"][2]
    httpclient = pytest.importorskip("tritonclient.http")
    result = httpclient.InferResult.from_response_body(body, header_length=int(value))
    assert [s.decode() for s in result.as_numpy("label")] == ["cat", "dög"]
    np.testing.assert_array_equal(result.as_numpy("probabilities"), outputs[1].data)
    assert result.as_numpy("ood").tolist() == [False, True]


# ---- the routes, in-process ----------------------------------------------------------------

class FakeImageModel:
    """Deterministic, input-dependent probabilities (so label order and the tensor path can be
    checked); embedding = the first 4 pixels."""

    provider = "fake"
    input_names = ("input",)
    embedding_dim = 4

    def run(self, batch):
        m = batch.reshape(len(batch), -1).mean(axis=1)
        logits = np.stack([m, 2 * m + 0.3, -m], axis=1).astype(np.float32)
        return Outputs(softmax(logits), batch.reshape(len(batch), -1)[:, :4].copy())


class FakeTextModel:
    provider = "fake"
    input_names = TEXT_INPUTS
    embedding_dim = 2

    def run(self, batch):
        ids = batch["input_ids"].astype(np.float32)
        lengths = batch["attention_mask"].sum(axis=1).astype(np.float32)
        logits = np.stack([lengths / 10, -lengths / 10, ids[:, 0] / 100], axis=1)
        return Outputs(softmax(logits.astype(np.float32)), np.stack([lengths, lengths], axis=1))


@pytest.fixture(scope="module")
def preprocessor() -> TextPreprocessor:
    from training.text.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["hello world", "bonjour le monde", "hallo welt"] * 5,
                                    vocab_size=120, min_frequency=1)
    spec = TextSpec(max_length=16, max_chars=200,
                    tokenizer_sha256=hashlib.sha256(tokenizer.encode()).hexdigest())
    return TextPreprocessor(spec, tokenizer)


def png(value: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    pixels = (np.arange(size * size).reshape(size, size) * value % 256).astype(np.uint8)
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


def serve(preprocessor, body, bound: bool = True):
    async def main():
        image = ServedImageModel(Artifact("digits-unit", "v7", Path("."), SPEC, IMAGE_LABELS, {}),
                                 FakeImageModel(), max_batch_size=8)
        text = ServedTextModel(Artifact("lang-unit", "v1", Path("."), preprocessor.spec,
                                        TEXT_LABELS, {}),
                               FakeTextModel(), preprocessor, max_batch_size=8,
                               max_batch_tokens=256, max_padding=0.25)
        api = App()
        if bound:
            api.bind({"image": Slot(image), "text": Slot(text)},
                     Settings(image_model="digits-unit", text_model="lang-unit",
                              max_body_bytes=20_000, max_images_per_request=4,
                              max_texts_per_request=3, top_k=3))
        for model in (image, text):
            await model.start(warmup_batches=1)
        try:
            transport = httpx.ASGITransport(app=api)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await body(client)
        finally:
            for model in (image, text):
                await model.stop()

    return asyncio.run(main())


def binary_infer(name: str, inp: str, datatype: str, shape: list[int], raw: bytes,
                 outputs: list[dict] | None = None, **params) -> dict:
    header: dict = {"inputs": [{"name": inp, "datatype": datatype, "shape": shape,
                                "parameters": {"binary_data_size": len(raw)}}]}
    if outputs is not None:
        header["outputs"] = outputs
    if params:
        header["parameters"] = params
    body, length = framed(header, raw)
    return {"url": f"/v2/models/{name}/infer", "content": body,
            "headers": {"Inference-Header-Content-Length": length,
                        "Content-Type": "application/octet-stream"}}


def read_binary(response: httpx.Response) -> tuple[dict, dict[str, object]]:
    """The answer's JSON header and its outputs decoded (binary or JSON data)."""
    length = response.headers.get("inference-header-content-length")
    raw = response.content
    header = json.loads(raw[:int(length)] if length else raw)
    tail = raw[int(length):] if length else b""
    out, pos = {}, 0
    for o in header["outputs"]:
        size = o.get("parameters", {}).get("binary_data_size")
        if size is None:
            out[o["name"]] = np.array(o["data"]).reshape(o["shape"]).tolist()
            continue
        chunk, pos = tail[pos:pos + size], pos + size
        if o["datatype"] == "BYTES":
            out[o["name"]] = [b.decode() for b in v2.decode_bytes(chunk)]
        elif o["datatype"] == "BOOL":
            out[o["name"]] = np.frombuffer(chunk, np.bool_).tolist()
        else:
            out[o["name"]] = np.frombuffer(chunk, "<f4").reshape(o["shape"]).tolist()
    return header, out


def test_server_and_model_metadata_and_readiness(preprocessor):
    async def body(client):
        paths = ["/v2/", "/v2/health/live", "/v2/health/ready", "/v2/models/digits-unit",
                 "/v2/models/digits-unit/versions/v7", "/v2/models/lang-unit/ready",
                 "/v2/models/lang-unit/versions/v1/ready", "/v2/models/lang-unit",
                 "/v2/models/nope", "/v2/models/digits-unit/versions/v8",
                 "/v2/models/lang-unit/versions/v0/ready"]
        return {p: await client.get(p) for p in paths}

    r = serve(preprocessor, body)
    assert r["/v2/"].json()["name"] == "clfserve"
    assert "binary_tensor_data" in r["/v2/"].json()["extensions"]
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/lang-unit/ready",
                 "/v2/models/lang-unit/versions/v1/ready"):
        assert r[path].status_code == 200, path
        assert r[path].json().get("live", r[path].json().get("ready")) is True, path
    meta = r["/v2/models/digits-unit"].json()
    assert meta == r["/v2/models/digits-unit/versions/v7"].json()
    assert meta["name"] == "digits-unit" and meta["versions"] == ["v7"]
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                              {"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "label": ("BYTES", [-1]), "probabilities": ("FP32", [-1, 3]), "ood": ("BOOL", [-1]),
        "embedding": ("FP32", [-1, 4])}
    assert meta["parameters"]["labels"] == list(IMAGE_LABELS)
    text_meta = r["/v2/models/lang-unit"].json()
    assert text_meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in text_meta["outputs"]] == ["label", "probabilities", "ood",
                                                         "truncated", "embedding"]
    for path, words in [("/v2/models/nope", "no model named 'nope'"),
                        ("/v2/models/digits-unit/versions/v8", "version v7 only"),
                        ("/v2/models/lang-unit/versions/v0/ready", "version v1 only")]:
        doc = r[path].json()
        assert r[path].status_code == 404 and doc["reason"] == "not_found", path
        assert isinstance(doc["error"], str) and words in doc["error"], doc


def test_before_bind_the_server_is_live_not_ready(preprocessor):
    async def body(client):
        return [await client.get(p) for p in ("/v2/health/live", "/v2/health/ready",
                                              "/v2/models/digits-unit")]

    live, ready, meta = serve(preprocessor, body, bound=False)
    assert live.status_code == 200
    assert ready.status_code == 503 and ready.json()["reason"] == "not_ready"
    assert meta.status_code == 503


def test_images_in_binary_and_json_agree_with_v1_and_the_tensor_path(preprocessor):
    pngs = [png(3), png(7)]
    tensors = np.stack([preprocess_image_bytes(p, SPEC) for p in pngs])

    async def body(client):
        v1 = [await client.post("/v1/classify/image?top_k=3",
                                files={"image": ("x.png", p, "image/png")}) for p in pngs]
        binary = await client.post(**binary_infer("digits-unit", "image", "BYTES", [2],
                                                  v2.encode_bytes(pngs), binary_data_output=True),
                                   )
        as_json = await client.post("/v2/models/digits-unit/versions/v7/infer", json={
            "id": "abc", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2, 1],
                                     "data": [base64.b64encode(p).decode() for p in pngs]}],
            "outputs": [{"name": "label"}, {"name": "probabilities"}, {"name": "embedding"}]},
            headers={"X-Request-ID": "my-id-1"})
        tensor = await client.post(**binary_infer(
            "digits-unit", "input", "FP32", [2, 1, 8, 8], tensors.astype("<f4").tobytes(),
            outputs=[{"name": "probabilities", "parameters": {"binary_data": True}},
                     {"name": "label"}]))
        tensor_json = await client.post("/v2/models/digits-unit/infer", json={
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 8, 8],
                        "data": tensors.tolist()}]})
        return v1, binary, as_json, tensor, tensor_json

    v1, binary, as_json, tensor, tensor_json = serve(preprocessor, body)
    expected = []
    for r in v1:
        (pred,) = r.json()["predictions"]
        by_label = {t["label"]: t["probability"] for t in pred["top_k"]}
        expected.append((pred["label"], [by_label[lab] for lab in IMAGE_LABELS]))
    for response in (binary, as_json, tensor, tensor_json):
        assert response.status_code == 200, response.text
        header, out = read_binary(response)
        assert header["model_name"] == "digits-unit" and header["model_version"] == "v7"
        assert out["label"] == [lab for lab, _ in expected]
        np.testing.assert_allclose(out["probabilities"], [p for _, p in expected], atol=1e-6)
    assert binary.headers["content-type"] == "application/octet-stream"
    assert as_json.headers["content-type"] == "application/json"
    header, out = read_binary(as_json)
    assert header["id"] == "abc" and header["parameters"]["request_id"] == "my-id-1"
    assert as_json.headers["x-request-id"] == "my-id-1"
    assert [o["name"] for o in header["outputs"]] == ["label", "probabilities", "embedding"]
    assert np.array(out["embedding"]).shape == (2, 4)
    header, out = read_binary(binary)  # no outputs asked: all but the embedding, all binary
    assert [o["name"] for o in header["outputs"]] == ["label", "probabilities", "ood"]
    assert out["ood"] == [False, False]
    header, _ = read_binary(tensor)
    assert "parameters" in header["outputs"][0] and "data" in header["outputs"][1]


def test_texts_in_both_modes_with_classification(preprocessor):
    texts = ["hello world", "bonjour " * 20]

    async def body(client):
        v1 = await client.post("/v1/classify/text?top_k=3", json={"texts": texts})
        as_json = await client.post("/v2/models/lang-unit/infer", json={
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": texts}],
            "outputs": [{"name": "label"}, {"name": "truncated"},
                        {"name": "probabilities", "parameters": {"classification": 2}}]})
        binary = await client.post(**binary_infer(
            "lang-unit", "text", "BYTES", [2], v2.encode_bytes([t.encode() for t in texts]),
            binary_data_output=True))
        return v1, as_json, binary

    v1, as_json, binary = serve(preprocessor, body)
    preds = v1.json()["predictions"]
    _, out = read_binary(as_json)
    assert out["label"] == [p["label"] for p in preds]
    assert out["truncated"] == [False, True]
    for row, pred in zip(out["probabilities"], preds):
        p, index, label = row[0].split(":")
        assert label == pred["label"] and TEXT_LABELS[int(index)] == label
        assert abs(float(p) - pred["confidence"]) < 1e-5
    _, out = read_binary(binary)
    assert out["label"] == [p["label"] for p in preds] and out["truncated"] == [False, True]


@pytest.mark.parametrize("request_kwargs, status, reason, words", [
    ({"json": {"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [1],
                           "data": ["x"]}]}}, 422, "bad_field", "has no input(s) ['pixels']"),
    ({"json": {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1]}]}},
     422, "bad_field", "must be BYTES"),
    ({"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                           "data": ["%%%"]}]}}, 422, "bad_field", "not valid base64"),
    ({"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                           "data": [base64.b64encode(b"not an image").decode()]}]}},
     415, "not_an_image", ""),
    ({"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [5],
                           "data": ["aGk="] * 5}]}}, 413, "too_many_items", "limit is 4"),
    ({"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [0],
                           "data": []}]}}, 422, "empty", "no items"),
    ({"json": {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4],
                           "data": [0.0] * 16}]}}, 422, "bad_field", "[N, 1, 8, 8]"),
    ({"json": {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                           "data": [0.0] * 63 + [1e39]}]}}, 422, "bad_field", "NaN or infinite"),
    ({"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]},
                          {"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                           "data": [0.0] * 64}]}}, 422, "bad_field", "exactly one input"),
    ({"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}],
               "outputs": [{"name": "truncated"}]}}, 422, "bad_field", "no output 'truncated'"),
    ({"content": b"{", "headers": {"Content-Type": "application/json"}}, 400, "bad_request",
     "not valid JSON"),
    ({"content": b"x" * 30_000}, 413, "too_large", "limit"),
])
def test_image_errors_are_4xx_with_a_string_message(preprocessor, request_kwargs, status,
                                                    reason, words):
    async def body(client):
        bad = await client.post("/v2/models/digits-unit/infer", **request_kwargs)
        good = await client.post(**binary_infer("digits-unit", "image", "BYTES", [1],
                                                v2.encode_bytes([png(1)])))
        return bad, good

    bad, good = serve(preprocessor, body)
    doc = bad.json()
    assert bad.status_code == status and doc["reason"] == reason, doc
    assert isinstance(doc["error"], str) and words in doc["error"], doc
    assert doc["request_id"] == bad.headers["x-request-id"]
    assert good.status_code == 200  # the next request is served


@pytest.mark.parametrize("data, status, reason", [
    (["   "], 422, "empty_text"),
    (["a" * 201], 413, "text_too_long"),
    (["a", "b", "c", "d"], 413, "too_many_items"),
])
def test_text_errors_come_from_the_shared_preprocessing(preprocessor, data, status, reason):
    async def body(client):
        return await client.post("/v2/models/lang-unit/infer", json={
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(data)], "data": data}]})

    response = serve(preprocessor, body)
    assert response.status_code == status and response.json()["reason"] == reason


def test_bad_utf8_in_a_binary_text_is_bad_encoding(preprocessor):
    async def body(client):
        return await client.post(**binary_infer("lang-unit", "text", "BYTES", [2],
                                                v2.encode_bytes([b"ok", b"\xff\xfe"])))

    response = serve(preprocessor, body)
    assert response.status_code == 422 and response.json()["reason"] == "bad_encoding"
    assert response.json()["error"].startswith("text 1:")


def test_a_gzip_body_and_the_wrong_method(preprocessor):
    async def body(client):
        raw = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                      "data": ["hallo welt"]}]}).encode()
        zipped = await client.post("/v2/models/lang-unit/infer", content=gzip.compress(raw),
                                   headers={"Content-Encoding": "gzip"})
        wrong = await client.get("/v2/models/lang-unit/infer")
        return zipped, wrong

    zipped, wrong = serve(preprocessor, body)
    assert zipped.status_code == 200, zipped.text
    assert wrong.status_code == 405


def test_every_v2_route_is_documented_without_refs():
    app = App()
    documented = {r.template: r.docs for r in app.routes if r.template.startswith("/v2")}
    assert set(documented) == {
        "/v2/", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}",
        "/v2/models/{name}/versions/{version}", "/v2/models/{name}/ready",
        "/v2/models/{name}/versions/{version}/ready", "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer"}
    for template, docs in documented.items():
        (doc,) = docs.values()
        assert doc["summary"] and doc["responses"]["200"], template
        assert "$ref" not in json.dumps(doc), template
        params = {p["name"] for p in doc.get("parameters", [])}
        assert {"name", "version"} & params == {
            n for n in ("name", "version") if "{" + n + "}" in template}, template
    infer = documented["/v2/models/{name}/infer"]["POST"]
    assert set(infer["requestBody"]["content"]) == {"application/json",
                                                    "application/octet-stream"}
    error = infer["responses"]["422"]["content"]["application/json"]["schema"]
    assert error["properties"]["error"]["type"] == "string"
    assert "bad_field" in error["properties"]["reason"]["enum"]


def test_the_root_app_answers_get_v2_exactly_and_nothing_else(preprocessor):
    """``GET /v2`` (no slash) as tritonclient sends it reaches the mount root ``/v2/``."""

    async def main():
        api = App()
        api.bind({}, Settings(image_model="x", text_model=""))
        transport = httpx.ASGITransport(app=v2.root_app(api))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/v2"), await client.get("/v2/health/live")

    root, other = asyncio.run(main())
    assert root.status_code == 200 and root.json()["name"] == "clfserve"
    assert other.status_code == 404  # not this app's: BentoML's own routes answer the rest
