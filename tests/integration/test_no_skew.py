"""No train-serve skew: the same bytes give bit-identical tensors on the training path and the
serving path, and the served answer equals PyTorch's on that image."""

from __future__ import annotations

import asyncio
import importlib
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from training.data import ImageDataset, LabelledImages

pytestmark = pytest.mark.slow


def _odd_images() -> list[bytes]:
    """Inputs that exercise the decoder: other sizes, colour, alpha, JPEG (one large enough for
    the spec's ``jpeg_draft``), 16-bit."""
    rng = np.random.default_rng(7)
    out = []
    for mode, size, fmt in [("RGB", (50, 37), "PNG"), ("RGBA", (32, 32), "PNG"), ("L", (64, 20), "JPEG"),
                            ("RGB", (200, 150), "JPEG"), ("I;16", (40, 40), "PNG"),
                            ("P", (33, 31), "GIF")]:
        if mode == "I;16":
            img = Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16))
        else:
            img = Image.fromarray(rng.integers(0, 255, (*size[::-1], 4), dtype=np.uint8), "RGBA").convert(mode)
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def served(digits_model):
    mp = pytest.MonkeyPatch()
    mp.setenv("CLF_IMAGE_MODEL", digits_model.tag)
    import service.service as module

    module = importlib.reload(module)
    yield module
    mp.undo()


def test_training_and_serving_tensors_are_bit_identical(served, digits_model, digit_pngs):
    blobs = [b for b, _ in digit_pngs[:10]] + _odd_images()
    spec = digits_model.result.spec
    assert spec.jpeg_draft  # the 200x150 JPEG is decoded at a quarter of its size on both paths
    data = LabelledImages(tuple(blobs), (0,) * len(blobs), tuple(map(str, range(len(blobs)))), ("x",), "test")
    training_path = [ImageDataset(data, spec)[i][0].numpy() for i in range(len(blobs))]

    instance = served.Classifier()
    serving_path = instance.image.preprocess(blobs).tensors
    for train_x, serve_x in zip(training_path, serving_path):
        assert train_x.dtype == serve_x.dtype == np.float32
        assert train_x.shape == serve_x.shape == spec.input_shape
        assert train_x.tobytes() == serve_x.tobytes()


def test_served_answer_equals_pytorch(served, digits_model, digit_pngs):
    blobs = [b for b, _ in digit_pngs[:12]]
    spec = digits_model.result.spec
    assert spec.jpeg_draft  # the 200x150 JPEG is decoded at a quarter of its size on both paths
    data = LabelledImages(tuple(blobs), (0,) * len(blobs), tuple(map(str, range(len(blobs)))), ("x",), "test")
    x = torch.stack([ImageDataset(data, spec)[i][0] for i in range(len(blobs))])
    model = digits_model.result.model.eval()
    with torch.no_grad():
        torch_probs = torch.softmax(model(x)[0], dim=1).numpy()

    async def ask():
        instance = served.Classifier()
        await instance.start_batcher()
        try:
            transport = httpx.ASGITransport(app=served.api)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                files = [("image", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
                return await client.post("/v1/classify/image?top_k=10", files=files)
        finally:
            await instance.stop_batcher()

    response = asyncio.run(ask())
    assert response.status_code == 200
    labels = digits_model.result.classes
    for row, pred in zip(torch_probs, response.json()["predictions"]):
        served_probs = {t["label"]: t["probability"] for t in pred["top_k"]}
        assert pred["label"] == labels[int(row.argmax())]
        for j, label in enumerate(labels):
            assert abs(served_probs[label] - row[j]) < 1e-5
