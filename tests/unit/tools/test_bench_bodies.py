"""The bench's request bodies are what users send, and what the service's parser accepts."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.requests import boundary_of, parse_multipart
from tools.bench.bodies import digit_png, multipart, noise_png, write_image_body

pytestmark = pytest.mark.tools  # the benchmark tool's own tests (fast; in `make test`)


def test_noise_png_is_seeded_rgb_at_the_size() -> None:
    img = Image.open(io.BytesIO(noise_png(64, 3, seed=0)))
    assert (img.format, img.mode, img.size) == ("PNG", "RGB", (64, 64))
    assert noise_png(64, 3, seed=0) == noise_png(64, 3, seed=0)
    assert noise_png(64, 3, seed=0) != noise_png(64, 3, seed=1)


def test_digit_png_renders_like_the_training_data() -> None:
    from sklearn.datasets import load_digits

    img = Image.open(io.BytesIO(digit_png(0, size=32)))
    assert (img.format, img.mode, img.size) == ("PNG", "L", (32, 32))
    eight = np.clip(np.rint(load_digits().images[0] * 255.0 / 16.0), 0, 255).astype(np.uint8)
    want = Image.fromarray(eight, mode="L").resize((32, 32), Image.BICUBIC)
    assert np.array_equal(np.asarray(img), np.asarray(want))


def test_multipart_body_round_trips_through_the_service_parser() -> None:
    png = noise_png(8, 3)
    body, content_type = multipart([("image", "a.png", png)])
    parts = parse_multipart(body, boundary_of(content_type), max_parts=4)
    assert parts == [("image", "a.png", png)]


def test_write_image_body_gives_wrk_a_file_and_its_header(tmp_path) -> None:
    body = write_image_body(tmp_path, "m", noise_png(8, 3), "noise")
    assert body.path.read_bytes().startswith(b"--")
    assert body.headers[0].startswith("Content-Type: multipart/form-data; boundary=")
    assert "PNG" in body.description
