"""Request bodies as users send them: a real PNG file in the multipart field ``image``.

The reference model gets seeded random noise (it has random weights, so the picture does not
matter, only its size and format); the digits model gets a digit rendered exactly the way the
training data is (``training.data.digits_images``), reproduced here so the bench needs no torch.
Text bodies (a rotating mix of JSON bodies) are built in ``textmix.py``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

BOUNDARY = "clfbench0123456789"
IMAGE_ROUTE = "/v1/classify/image"
TEXT_ROUTE = "/v1/classify/text"
V2_INFER_ROUTE = "/v2/models/{name}/infer"  # Open Inference Protocol v2 (service/v2.py)
# wrk scripts: one fixed body per request, or a file of bodies (one per line) sent in turn.
POST_LUA = Path(__file__).with_name("post.lua")
ROTATE_LUA = Path(__file__).with_name("rotate.lua")


@dataclass(frozen=True)
class Body:
    """What wrk posts: a body file (``script`` reads it from $CLF_BENCH_BODY), its headers and
    route, and what it holds (for the bench's own correctness checks)."""

    path: Path
    headers: list[str]
    description: str
    image: bytes = b""  # image bodies: the PNG inside
    texts: tuple[str, ...] = ()  # text bodies: the texts, in the order wrk sends them
    route: str = IMAGE_ROUTE
    script: Path = POST_LUA


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def noise_png(size: int = 64, channels: int = 3, seed: int = 0) -> bytes:
    """A seeded uniform-noise RGB (or L) PNG: the worst case for PNG compression, as photos are."""
    rng = np.random.default_rng(seed)
    if channels == 1:
        return png_bytes(Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L"))
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return png_bytes(Image.fromarray(pixels, "RGB"))


def digit_png(index: int = 0, size: int = 32) -> bytes:
    """scikit-learn's digit ``index``: 8x8 values 0..16 -> *255/16 uint8 -> bicubic -> PNG."""
    from sklearn.datasets import load_digits  # heavy import; only when the digits model is benched

    pixels = np.clip(np.rint(load_digits().images[index] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return png_bytes(Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC))


def multipart(files: list[tuple[str, str, bytes]], boundary: str = BOUNDARY) -> tuple[bytes, str]:
    """A multipart/form-data body of ``(field, filename, data)`` files and its Content-Type."""
    b = boundary.encode()
    chunks = []
    for field, filename, data in files:
        disposition = f'Content-Disposition: form-data; name="{field}"; filename="{filename}"'
        chunks.append(b"--" + b + b"\r\n" + disposition.encode() + b"\r\n"
                      + b"Content-Type: image/png\r\n\r\n" + data + b"\r\n")
    chunks.append(b"--" + b + b"--\r\n")
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def write_image_body(folder: Path, name: str, png: bytes, description: str) -> Body:
    """Write a one-image multipart body to ``folder/name.bin``."""
    data, content_type = multipart([("image", f"{name}.png", png)])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.bin"
    path.write_bytes(data)
    return Body(path=path, headers=[f"Content-Type: {content_type}"], image=png,
                description=f"{description}, {len(png):,} B PNG in a {len(data):,} B "
                            "multipart body")


def write_v2_image_body(folder: Path, name: str, png: bytes, description: str,
                        model: str) -> Body:
    """The same PNG as one v2 inference request, as ``tritonclient`` sends it by default: the
    binary tensor extension (a JSON header, then the image as one BYTES element: a 4-byte
    little-endian length and the bytes), every output asked for in binary."""
    import json
    import struct

    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 4 + len(png)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    data = header + struct.pack("<I", len(png)) + png
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-v2.bin"
    path.write_bytes(data)
    return Body(path=path, headers=["Content-Type: application/octet-stream",
                                    f"Inference-Header-Content-Length: {len(header)}"],
                image=png, route=V2_INFER_ROUTE.format(name=model),
                description=f"{description}, {len(png):,} B PNG as a v2 BYTES tensor in a "
                            f"{len(data):,} B binary-extension body")
