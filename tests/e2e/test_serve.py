"""End to end: a real server with 2 workers, concurrent clients, a scraped /metrics."""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from .conftest import start_server

pytestmark = pytest.mark.slow


def classify(url: str, data: bytes, client: httpx.Client | None = None, **kw) -> httpx.Response:
    post = client.post if client else httpx.post
    return post(f"{url}/v1/classify/image", files={"image": ("d.png", data, "image/png")}, timeout=30, **kw)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_concurrent_clients_form_batches_and_metrics_count_them(server, digit_pngs):
    before = httpx.get(f"{server.url}/metrics").text
    n_clients, per_client = 32, 6

    def client_loop(i: int) -> list[int]:
        with httpx.Client() as client:
            return [classify(server.url, digit_pngs[(i + j) % len(digit_pngs)][0], client).status_code
                    for j in range(per_client)]

    with ThreadPoolExecutor(n_clients) as pool:
        codes = [c for codes in pool.map(client_loop, range(n_clients)) for c in codes]
    assert codes == [200] * (n_clients * per_client)

    after = httpx.get(f"{server.url}/metrics").text
    sent = n_clients * per_client
    served = metric(after, "clf_predictions_total", model="digits-cnn") - metric(before, "clf_predictions_total", model="digits-cnn")
    assert served == sent  # counted exactly once, summed over both workers
    batches = metric(after, "clf_batch_size_items_count") - metric(before, "clf_batch_size_items_count")
    items = metric(after, "clf_batch_size_items_sum") - metric(before, "clf_batch_size_items_sum")
    assert items == sent and batches < sent  # some model calls carried more than one image
    singles = metric(after, "clf_batch_size_items_bucket", le="1.0") - metric(before, "clf_batch_size_items_bucket", le="1.0")
    assert singles < batches
    for name in ("clf_queue_wait_seconds_count", "clf_inference_seconds_count", "clf_preprocess_seconds_count",
                 "clf_prediction_confidence_count"):
        assert metric(after, name) > metric(before, name), name
    assert metric(after, "bentoml_service_request_total", endpoint="/v1/classify/image", http_response_code="200") >= sent
    assert re.search(r'clf_model_info\{[^}]*model="digits-cnn"', after)


def _png(w: int, h: int, value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h), value).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_inputs_get_4xx_and_the_server_keeps_serving(server, digit_pngs):
    good = digit_pngs[0][0]
    url = f"{server.url}/v1/classify/image"
    cases = {
        "corrupt bytes": (dict(files={"image": ("a.png", np.random.default_rng(0).bytes(500), "image/png")}), 415),
        "truncated png": (dict(files={"image": ("a.png", good[: len(good) // 2], "image/png")}), 422),
        "text named .png": (dict(files={"image": ("a.png", b"just some text\n", "image/png")}), 415),
        "zero bytes": (dict(files={"image": ("a.png", b"", "image/png")}), 422),
        "decompression bomb": (dict(files={"image": ("a.png", _png(3000, 3000), "image/png")}), 413),
        "wrong field": (dict(files={"file": ("a.png", good, "image/png")}), 422),
        "body over limit": (dict(content=b"\0" * 400_000, headers={"Content-Type": "image/png"}), 413),
        "too many images": (dict(files=[("image", ("a.png", good, "image/png"))] * 17), 413),
    }
    before = httpx.get(f"{server.url}/metrics").text
    for name, (kwargs, status) in cases.items():
        response = httpx.post(url, timeout=30, **kwargs)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["message"] and error["reason"], name
        assert classify(server.url, good).status_code == 200, f"not serving after {name}"
    after = httpx.get(f"{server.url}/metrics").text
    rejected = metric(after, "clf_rejected_inputs_total") - metric(before, "clf_rejected_inputs_total")
    assert rejected == len(cases)


def test_missing_model_stops_startup_with_a_clear_message(tmp_path):
    with pytest.raises(RuntimeError) as info:
        start_server({"CLF_IMAGE_MODEL": "no-such-model:latest"}, tmp_path / "s.log", timeout=60)
    assert "not in the BentoML model store" in str(info.value)


def test_bad_setting_stops_startup_with_a_clear_message(tmp_path):
    with pytest.raises(RuntimeError) as info:
        start_server({"CLF_MAX_BATCH_SIZE": "zero"}, tmp_path / "s.log", timeout=60)
    assert "CLF_MAX_BATCH_SIZE='zero' is not a valid int" in str(info.value)
