"""A photo's way to the model's tensor with and without ``ImageSpec.jpeg_draft``, in process.

    python -m tools.bench.jpegdraft [--sizes 1024x768,2016x1512,4032x3024] [--side 64] [--seconds 3]

For each size, a seeded photo-like JPEG (smooth gradients and a little noise, quality 90) goes
through what the service does for an uploaded image (``decode_image``, ``image_to_array``,
``image_features``) under the same spec with the draft off (every artifact before it) and on
(what training writes now), one after the other, for ``--seconds`` each; the table gives the
median milliseconds an image, their ratio, and how far the two tensors are apart, in grey levels
of the 0..255 scale. One thread, as each of the service's decode threads is.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import statistics
import time
from typing import Sequence

import numpy as np
from PIL import Image

from preprocessing import ImageSpec, decode_image, image_to_array
from preprocessing.features import image_features

from .report import markdown_table


def photo_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A seeded photo-like RGB JPEG: smooth gradients, a little noise (what phones upload)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    planes = [(np.sin(x / (width / 27)) + np.cos(y / (height / 33))) * 60 + 128,
              x / width * 255, y / height * 255]
    noise = np.random.default_rng(seed).normal(0, 6, (height, width, 3)).astype(np.float32)
    pixels = (np.stack(planes, -1) + noise).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def served_path(data: bytes, spec: ImageSpec) -> np.ndarray:
    """What ``ServedImageModel.preprocess`` does for one image with the prediction log on."""
    img = decode_image(data, spec)
    tensor = image_to_array(img, spec)
    image_features(img)
    return tensor


def time_path(data: bytes, spec: ImageSpec, seconds: float) -> float:
    """Median milliseconds of ``served_path`` over ``seconds`` (at least 5 runs, after one)."""
    served_path(data, spec)
    times: list[float] = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop or len(times) < 5:
        started = time.perf_counter()
        served_path(data, spec)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.jpegdraft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024x768,2016x1512,4032x3024",
                   help="photo sizes, WIDTHxHEIGHT, comma-separated")
    p.add_argument("--side", type=int, default=64, help="the model's input side (RGB, stretch)")
    p.add_argument("--seconds", type=float, default=3.0, help="per size and setting")
    args = p.parse_args(argv)
    off = ImageSpec(height=args.side, width=args.side)
    on = dataclasses.replace(off, jpeg_draft=True)
    rows = []
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.lower().split("x"))
        data = photo_jpeg(width, height)
        full_ms, draft_ms = time_path(data, off, args.seconds), time_path(data, on, args.seconds)
        apart = np.abs(served_path(data, on) - served_path(data, off)) * (0.5 * 255)  # std 0.5
        drafted = decode_image(data, on).size
        rows.append([f"{width}x{height}", f"{len(data) / 1e6:.2f} MB",
                     f"{drafted[0]}x{drafted[1]}",
                     f"{full_ms:.1f}", f"{draft_ms:.1f}", f"{full_ms / draft_ms:.2f}x",
                     f"{apart.max():.2f}", f"{apart.mean():.3f}"])
    print(f"JPEG photo -> {args.side}x{args.side} RGB tensor and monitored features, one thread, "
          f"median ms an image\n")
    print(markdown_table(["photo", ">JPEG", ">decoded as", ">full decode ms", ">draft ms",
                          ">full / draft", ">max grey levels apart", ">mean apart"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
