"""Schemathesis hooks for the fuzz test: binary and base64 strings in the document are images, so
the generated ones are real encoded images (PNG, JPEG, GIF, BMP of random sizes and modes) most
of the time and arbitrary bytes otherwise. Without this nearly every schema-valid request would
be a corrupt image, and the positive path (decode, batch, infer, answer, log) would go untested.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image


@st.composite
def encoded_images(draw) -> bytes:
    width = draw(st.integers(1, 48))
    height = draw(st.integers(1, 48))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA"]))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP"]))
    seed = draw(st.integers(0, 2**32 - 1))
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), np.uint8)
    img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    if fmt == "JPEG" and mode == "RGBA":
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


IMAGE_BYTES = st.one_of(encoded_images(), encoded_images(), encoded_images(), st.binary(max_size=64))

schemathesis.openapi.format("binary", IMAGE_BYTES)
schemathesis.openapi.format("byte", IMAGE_BYTES.map(lambda b: base64.b64encode(b).decode()))
