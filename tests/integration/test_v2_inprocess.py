"""The v2 routes over the real service object (ONNX Runtime, batchers, the SQLite prediction
log), in-process: the same answers, log records, OOD flags and slice tags as ``/v1``."""

from __future__ import annotations

import asyncio
import importlib
import json
import sqlite3

import numpy as np
import pytest

from preprocessing import ImageSpec, preprocess_image_bytes
from service import v2
from tests.conftest import run_service

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(digits_model, text_model, tmp_path_factory, monkeypatch_module):
    log_path = tmp_path_factory.mktemp("v2") / "predictions.db"
    env = {"CLF_IMAGE_MODEL": digits_model.tag, "CLF_TEXT_MODEL": text_model.tag,
           "CLF_PREDICTION_LOG": str(log_path), "CLF_LOG_INPUTS": "true",
           "CLF_SLICE_KEYS": "device", "CLF_MAX_IMAGES_PER_REQUEST": "8"}
    for key, value in env.items():
        monkeypatch_module.setenv(key, value)
    import service.service as module

    return {"module": importlib.reload(module), "log": log_path}


def rows(log_path, request_id: str) -> list[dict]:
    """A request's logged rows; ``input`` read back through the log (SQLite keeps raw inputs
    in segment files beside the database)."""
    from monitoring.store import open_log

    db = sqlite3.connect(log_path)
    db.row_factory = sqlite3.Row
    try:
        found = [dict(r) for r in db.execute(
            "SELECT * FROM predictions WHERE request_id = ? ORDER BY item", (request_id,))]
    finally:
        db.close()
    with open_log(log_path) as log:
        for row, data in zip(found, log.inputs(request_id)):
            row["input"] = data
    return found


def infer_binary(name: str, inp: str, datatype: str, shape: list[int], raw: bytes,
                 **headers: str) -> dict:
    head = json.dumps({"inputs": [{"name": inp, "datatype": datatype, "shape": shape,
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return {"url": f"/v2/models/{name}/infer", "content": head + raw,
            "headers": {"Inference-Header-Content-Length": str(len(head)),
                        **{k.replace("_", "-"): v for k, v in headers.items()}}}


def decoded(response) -> dict[str, np.ndarray | list]:
    length = int(response.headers["inference-header-content-length"])
    header, tail = json.loads(response.content[:length]), response.content[length:]
    out, pos = {}, 0
    for o in header["outputs"]:
        size = o["parameters"]["binary_data_size"]
        chunk, pos = tail[pos:pos + size], pos + size
        if o["datatype"] == "BYTES":
            out[o["name"]] = [b.decode() for b in v2.decode_bytes(chunk)]
        else:
            dtype = "<f4" if o["datatype"] == "FP32" else np.bool_
            out[o["name"]] = np.frombuffer(chunk, dtype).reshape(o["shape"])
    return out


def test_images_are_served_and_logged_like_v1_and_tensors_bypass_preprocessing(
        setup, digit_pngs):
    pngs = [data for data, _ in digit_pngs[:4]]

    async def body(client, instance):
        spec: ImageSpec = instance.image.spec
        tensors = np.stack([preprocess_image_bytes(p, spec) for p in pngs]).astype("<f4")
        v1 = await client.post("/v1/classify/image?top_k=10", headers={
            "X-Request-ID": "v1-img", "X-Slices": "device=ios"},
            files=[("image", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)])
        by_bytes = await client.post(**infer_binary(
            "digits-cnn", "image", "BYTES", [4], v2.encode_bytes(pngs),
            X_Request_ID="v2-img", X_Slices="device=ios"))
        by_tensor = await client.post(**infer_binary(
            "digits-cnn", "input", "FP32", list(tensors.shape), tensors.tobytes(),
            X_Request_ID="v2-tensor"))
        concurrent = await asyncio.gather(*[client.post(**infer_binary(
            "digits-cnn", "image", "BYTES", [1], v2.encode_bytes([p]))) for p in pngs * 4])
        return v1, by_bytes, by_tensor, concurrent, instance.image.labels

    v1, by_bytes, by_tensor, concurrent, labels = run_service(setup["module"], body)
    assert v1.status_code == 200 and by_bytes.status_code == 200 and by_tensor.status_code == 200
    preds = v1.json()["predictions"]
    want = np.array([[{t["label"]: t["probability"] for t in p["top_k"]}[lab] for lab in labels]
                     for p in preds])
    for response in (by_bytes, by_tensor):
        out = decoded(response)
        assert out["label"] == [p["label"] for p in preds]
        np.testing.assert_allclose(out["probabilities"], want, atol=1e-5)
        assert out["ood"].tolist() == [p["ood"] for p in preds]
    assert all(r.status_code == 200 for r in concurrent)
    assert [decoded(r)["label"][0] for r in concurrent] == [p["label"] for p in preds] * 4

    logged_v1, logged_v2 = rows(setup["log"], "v1-img"), rows(setup["log"], "v2-img")
    assert len(logged_v1) == len(logged_v2) == 4
    for a, b in zip(logged_v1, logged_v2):
        assert (a["predicted"], a["ood"], a["slices"], a["features"], a["input"]) == (
            b["predicted"], b["ood"], b["slices"], b["features"], b["input"])
        assert json.loads(b["features"])["width"] > 0 and b["input"]
    tensor_rows = rows(setup["log"], "v2-tensor")
    assert [r["predicted"] for r in tensor_rows] == [p["label"] for p in preds]
    assert all(json.loads(r["features"]) == {} and r["input"] is None for r in tensor_rows)


def test_texts_are_logged_with_their_features(setup):
    texts = ["hello there my friend", "bonjour tout le monde"]

    async def body(client, instance):
        raw = v2.encode_bytes([t.encode() for t in texts])
        v2_answer = await client.post(**infer_binary("lang-tiny", "text", "BYTES", [2], raw,
                                                     X_Request_ID="v2-text"))
        v1_answer = await client.post("/v1/classify/text", json={"texts": texts})
        return v2_answer, v1_answer

    v2_answer, v1_answer = run_service(setup["module"], body)
    assert v2_answer.status_code == 200, v2_answer.text
    assert decoded(v2_answer)["label"] == [p["label"] for p in v1_answer.json()["predictions"]]
    logged = rows(setup["log"], "v2-text")
    assert [r["input"] for r in logged] == [t.encode() for t in texts]
    assert all(json.loads(r["features"])["tokens"] > 0 for r in logged)
