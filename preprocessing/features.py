"""The input features monitoring watches, computed by one function for training and serving.

They describe the raw decoded input (before resizing to the model's size), so drift in what users
send (smaller photos, darker scenes, another aspect ratio) shows even when the model's tensor
hides it. Text features likewise describe the raw string (before lowercasing and truncation),
plus what the tokenizer made of it.
"""

from __future__ import annotations

import unicodedata

import numpy as np
from PIL import Image

from .text import TokenStats

IMAGE_FEATURES = (
    "width",
    "height",
    "aspect_ratio",
    "brightness",
    "contrast",
    "mean_r",
    "mean_g",
    "mean_b",
    "saturation",
    "edge_density",
)

# Statistics are taken on a copy no larger than this; they are global averages, and a 4000x3000
# photo should not cost 12M pixel reads on the request path.
_STATS_SIDE = 64
_GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 luma


def image_features(img: Image.Image) -> dict[str, float]:
    """Monitored features of a decoded image (``L`` or ``RGB``), all plain floats."""
    width, height = img.size
    small = img if max(img.size) <= _STATS_SIDE else img.reduce(max(1, max(img.size) // _STATS_SIDE))
    rgb = np.asarray(small.convert("RGB"))  # uint8 [H, W, 3]
    # One contiguous float plane per channel: reductions over a trailing axis of 3 are slow, and
    # so are reductions over a transposed view (astype keeps the layout unless told: measured
    # 104 us against 17 us for the channel means of a 64x64 image).
    planes = rgb.reshape(-1, 3).T.astype(np.float32, order="C") * np.float32(1.0 / 255.0)
    r, g, b = planes
    gray = _GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b  # [H * W]
    h, w = rgb.shape[:2]
    n = float(h * w)
    # Sums with np.add.reduce (what ndarray.mean does, without its Python wrapper: on images
    # this small the wrappers cost more than the arithmetic).
    means = np.add.reduce(planes, axis=1) / n
    brightness = float(np.add.reduce(gray)) / n
    centred = gray - np.float32(brightness)
    contrast = (float(np.add.reduce(centred * centred)) / n) ** 0.5
    saturation = float(np.add.reduce(np.maximum(np.maximum(r, g), b)
                                     - np.minimum(np.minimum(r, g), b))) / n
    if h > 1 and w > 1:
        plane = gray.reshape(h, w)
        gx = float(np.add.reduce(np.abs(plane[:, 1:] - plane[:, :-1]), axis=None)) / (h * (w - 1))
        gy = float(np.add.reduce(np.abs(plane[1:] - plane[:-1]), axis=None)) / ((h - 1) * w)
        edges = (gx + gy) / 2.0
    else:
        edges = 0.0
    return {
        "width": float(width),
        "height": float(height),
        "aspect_ratio": float(width) / float(height),
        "brightness": brightness,
        "contrast": contrast,
        "mean_r": float(means[0]),
        "mean_g": float(means[1]),
        "mean_b": float(means[2]),
        "saturation": saturation,
        "edge_density": edges,
    }


TEXT_FEATURES = (
    "chars",
    "words",
    "tokens",
    "unknown_rate",
    "truncated",
    "mean_word_length",
    "non_ascii_rate",
    "upper_rate",
    "digit_rate",
    "punct_rate",
)


def text_features(text: str, stats: TokenStats) -> dict[str, float]:
    """Monitored features of one raw text and its tokenization (``EncodedBatch.stats``).

    ``tokens`` counts the text's own tokens before truncation; ``upper_rate`` is over letters,
    the other rates over characters. All plain floats, 0.0 for an empty denominator.
    """
    chars = len(text)
    words = text.split()
    letters = sum(map(str.isalpha, text))
    # str methods mapped in C: a 10,000-character text costs well under a millisecond.
    non_ascii = chars - len(text.encode("ascii", "ignore"))
    punct = sum(1 for ch in text if unicodedata.category(ch).startswith("P"))
    return {
        "chars": float(chars),
        "words": float(len(words)),
        "tokens": float(stats.tokens),
        "unknown_rate": stats.unknown / stats.tokens if stats.tokens else 0.0,
        "truncated": 1.0 if stats.truncated else 0.0,
        "mean_word_length": sum(map(len, words)) / len(words) if words else 0.0,
        "non_ascii_rate": non_ascii / chars if chars else 0.0,
        "upper_rate": sum(map(str.isupper, text)) / letters if letters else 0.0,
        "digit_rate": sum(map(str.isdigit, text)) / chars if chars else 0.0,
        "punct_rate": punct / chars if chars else 0.0,
    }
