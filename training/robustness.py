"""Robustness suites: named, seeded variations of a test split that users really produce.

An image variation is a function ``(decoded raw image, numpy Generator) -> image``, applied to
the decoded image *before* the shared preprocessing (``preprocessing.image``): the suite
re-encodes its result (PNG, or JPEG for the ``jpeg_q*`` variations, which return the decoded
JPEG), so what is measured is the served path from the bytes on: decode -> resize -> normalise ->
ONNX Runtime. A text variation is ``(text, Generator) -> text``, measured through the shared
text preprocessing.

Every variation draws its randomness from ``numpy.random.default_rng([seed, tag(name), i])``
for item ``i``: a suite is a pure function of (inputs, seed), and adding a variation changes no
other one's images.

The variations (see ``IMAGE_VARIATIONS`` and ``TEXT_VARIATIONS``):

* images: resampling (``resize_{nearest,bilinear,bicubic}_{down,up}``: the image at half or
  2.5 times its side, which the shared preprocessing scales back; ``lowres_*``: a quarter-side
  copy enlarged back with another method, e.g. the 8x8 digits strokes upscaled with nearest
  instead of bicubic), JPEG re-compression (``jpeg_q90/60/30``), ``rotate`` (5-12 degrees
  either way), ``shift`` (6-10% of the side), ``brightness`` (+-20-40 levels), ``contrast``
  (x0.5-0.7), ``invert`` (polarity; only where inverted inputs are valid, see
  ``image_variation_names``), ``noise`` (Gaussian, sigma 10 levels);
* texts: ``upper``, ``random_case``, ``typos`` (one per 12 letters, at least one),
  ``no_accents`` (Latin diacritics dropped, as typed on a plain keyboard), ``whitespace``,
  ``punctuation``, ``truncate`` (the first half of the words).

``suite_accuracy`` measures a predictor on every variation; ``worst_variation`` names the
worst. The export (``training/export.py``, ``training/text/export.py``) writes both into the
artifact's metrics.json (keys ``robustness`` and ``robustness_worst``).
"""

from __future__ import annotations

import io
import math
import unicodedata
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from preprocessing import ImageSpec, decode_image

ImageVariation = Callable[[Image.Image, np.random.Generator], Image.Image]
TextVariation = Callable[[str, np.random.Generator], str]

CLEAN = "clean"
# The seed the export's suites use: fixed, so versions trained with other seeds are measured on
# the same variations of their test split.
SUITE_SEED = 0
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC}
# Down and up factors of the ``resize_*`` variations, and the side of a ``lowres_*`` source.
DOWN_SCALE, UP_SCALE, LOWRES_SCALE = 0.5, 2.5, 0.25


# -- images ----------------------------------------------------------------------------------

def background_of(img: Image.Image) -> int | tuple[int, ...]:
    """The median of the border pixels: the colour rotation and shift pad with."""
    arr = np.asarray(img)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    border = border.reshape(-1, len(img.getbands()))
    med = np.median(border, axis=0).round().astype(int)
    return int(med[0]) if img.mode == "L" else tuple(int(v) for v in med)


def resized(img: Image.Image, factor: float, method: str) -> Image.Image:
    w, h = img.size
    return img.resize((max(1, round(w * factor)), max(1, round(h * factor))), _RESAMPLE[method])


@dataclass(frozen=True)
class Resize:
    """The image at ``factor`` times its side with ``method`` (the preprocessing scales it back)."""

    factor: float
    method: str

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        return resized(img, self.factor, self.method)


@dataclass(frozen=True)
class LowRes:
    """A low-resolution copy (box filter, ``scale`` of the side) enlarged back with ``method``."""

    method: str
    scale: float = LOWRES_SCALE

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        small = img.resize((max(1, round(img.width * self.scale)),
                            max(1, round(img.height * self.scale))), Image.Resampling.BOX)
        return small.resize(img.size, _RESAMPLE[self.method])


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


@dataclass(frozen=True)
class Jpeg:
    """JPEG re-compression at ``quality``; calling it returns the decoded JPEG, ``encode`` the
    bytes a user would send."""

    quality: int

    def encode(self, img: Image.Image, rng: np.random.Generator) -> bytes:
        return jpeg_bytes(img, self.quality)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        out = Image.open(io.BytesIO(self.encode(img, rng)))
        out.load()
        return out.convert(img.mode)


def affine(img: Image.Image, angle_deg: float, translate: tuple[float, float],
           fill: int | tuple[int, ...], scale: float = 1.0) -> Image.Image:
    """Rotate by ``angle_deg``, scale and translate (pixels) about the centre (bilinear)."""
    cx, cy = img.size[0] / 2.0, img.size[1] / 2.0
    theta = math.radians(angle_deg)
    a, b = math.cos(theta) / scale, math.sin(theta) / scale
    d, e = -b, a
    ox, oy = cx + translate[0], cy + translate[1]
    return img.transform(img.size, Image.Transform.AFFINE,
                         (a, b, cx - a * ox - b * oy, d, e, cy - d * ox - e * oy),
                         resample=Image.Resampling.BILINEAR, fillcolor=fill)


def _signed(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high) * rng.choice((-1.0, 1.0)))


def rotate(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A small rotation: 5-12 degrees either way."""
    return affine(img, _signed(rng, 5.0, 12.0), (0.0, 0.0), background_of(img))


def shift(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A shift by 6-10% of the side in a random direction."""
    angle = rng.uniform(0.0, 2.0 * math.pi)
    dist = rng.uniform(0.06, 0.10)
    t = (dist * img.width * math.cos(angle), dist * img.height * math.sin(angle))
    return affine(img, 0.0, t, background_of(img))


def _point(img: Image.Image, fn: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(fn(arr)), 0, 255).astype(np.uint8), mode=img.mode)


def brightness(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Every pixel lighter or darker by 20-40 levels (of 255)."""
    offset = _signed(rng, 20.0, 40.0)
    return _point(img, lambda a: a + offset)


def contrast(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Contrast reduced to 0.5-0.7 of the original, about the image's mean (PIL's enhancer)."""
    return ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.5, 0.7)))


def invert(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Inverted polarity: dark ink on a light background and vice versa."""
    return ImageOps.invert(img)


def noise(img: Image.Image, rng: np.random.Generator, sigma: float = 10.0) -> Image.Image:
    """Gaussian noise, sigma 10 levels (of 255), clipped."""
    arr = np.asarray(img, dtype=np.float32)
    return _point(img, lambda a: a + rng.normal(0.0, sigma, size=arr.shape))


IMAGE_VARIATIONS: dict[str, ImageVariation] = {
    **{f"resize_{m}_{way}": Resize(f, m) for way, f in (("down", DOWN_SCALE), ("up", UP_SCALE))
       for m in _RESAMPLE},
    **{f"lowres_{m}": LowRes(m) for m in _RESAMPLE},
    **{f"jpeg_q{q}": Jpeg(q) for q in (90, 60, 30)},
    "rotate": rotate,
    "shift": shift,
    "brightness": brightness,
    "contrast": contrast,
    "invert": invert,
    "noise": noise,
}

POLARITY_VARIATIONS = ("invert",)


def image_variation_names(color_mode: str = "L", invert: bool | None = None) -> tuple[str, ...]:
    """The variations a model is measured on. ``invert`` (inverted polarity) only where inverted
    inputs are valid: by default for grayscale (ink on a background: digits, documents), not
    for colour photos; ``invert=True/False`` overrides."""
    with_invert = color_mode == "L" if invert is None else invert
    return tuple(n for n in IMAGE_VARIATIONS if with_invert or n not in POLARITY_VARIATIONS)


def decode_raw(blob: bytes, spec: ImageSpec | None = None) -> Image.Image:
    """The decoded raw image (before any resize): with the shared decoder in the spec's colour
    mode, or without a spec in ``L`` for grayscale files and ``RGB`` otherwise."""
    if spec is None:
        with Image.open(io.BytesIO(blob)) as probe:
            mode = "L" if probe.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F") \
                else "RGB"
        channels = 1 if mode == "L" else 3
        spec = ImageSpec(height=1, width=1, color_mode=mode, mean=(0.5,) * channels,
                         std=(0.5,) * channels)
    return decode_image(blob, spec)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def tag(name: str) -> int:
    """A stable number per variation name (its rng stream)."""
    return zlib.crc32(name.encode())


def item_rng(seed: int, name: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), tag(name), int(index)])


def encode_variation(name: str, img: Image.Image, rng: np.random.Generator) -> bytes:
    """The bytes a user would send for variation ``name`` of ``img``."""
    fn = IMAGE_VARIATIONS[name]
    encode = getattr(fn, "encode", None)
    return encode(img, rng) if encode is not None else png_bytes(fn(img, rng))


def image_suite(blobs: Sequence[bytes], seed: int = SUITE_SEED,
                names: Sequence[str] | None = None, spec: ImageSpec | None = None,
                max_side: int | None = None) -> dict[str, list[bytes]]:
    """``{"clean": blobs, variation: [encoded images]}`` for every variation in ``names``
    (default: all of ``IMAGE_VARIATIONS``), seeded and deterministic. ``spec``: decode with the
    shared decoder in its colour mode (default: the file's own, L or RGB). ``max_side``: a
    decoded image with a longer side is first shrunk to it (antialiased), which bounds the
    suite's memory for folders of large photos (the export passes 4x the model's input side)."""
    names = list(IMAGE_VARIATIONS if names is None else names)
    unknown = [n for n in names if n not in IMAGE_VARIATIONS]
    if unknown:
        raise KeyError(f"unknown image variations {unknown}; known: {list(IMAGE_VARIATIONS)}")
    suite: dict[str, list[bytes]] = {CLEAN: list(blobs), **{name: [] for name in names}}
    for i, blob in enumerate(blobs):  # one decoded image in memory at a time
        img = decode_raw(blob, spec)
        if max_side is not None and max(img.size) > max_side:
            img = img.copy()
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        for name in names:
            suite[name].append(encode_variation(name, img, item_rng(seed, name, i)))
    return suite


# -- texts -----------------------------------------------------------------------------------

# Letters typed without their diacritic that Unicode does not decompose.
_PLAIN = {"ł": "l", "Ł": "L", "ø": "o", "Ø": "O", "đ": "d", "Đ": "D", "ß": "ss", "æ": "ae",
          "Æ": "AE", "œ": "oe", "Œ": "OE", "ı": "i"}
_PUNCT = ".,;:!?"


def upper(text: str, rng: np.random.Generator) -> str:
    return text.upper()


def random_case(text: str, rng: np.random.Generator) -> str:
    """Each letter's case flipped with probability 0.3 (a phone's auto-caps gone wrong)."""
    flips = rng.random(len(text)) < 0.3
    return "".join(c.swapcase() if f else c for c, f in zip(text, flips))


def typos(text: str, rng: np.random.Generator, per_letters: int = 12) -> str:
    """One typo per ``per_letters`` letters (at least one): a swap of neighbours, a dropped,
    doubled or replaced letter (replaced by another letter of the same text)."""
    chars = list(text)
    letters = [i for i, c in enumerate(chars) if c.isalpha()]
    if not letters:
        return text
    alphabet = sorted({chars[i] for i in letters})
    for _ in range(max(1, len(letters) // per_letters)):
        letters = [i for i, c in enumerate(chars) if c.isalpha()]
        if not letters:
            break
        i = letters[int(rng.integers(len(letters)))]
        op = int(rng.integers(4))
        if op == 0 and i + 1 < len(chars) and chars[i + 1].isalpha():
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        elif op == 1 and len(letters) > 1:
            del chars[i]
        elif op == 2:
            chars.insert(i, chars[i])
        else:
            chars[i] = alphabet[int(rng.integers(len(alphabet)))]
    return "".join(chars)


def no_accents(text: str, rng: np.random.Generator | None = None) -> str:
    """Latin letters without their diacritics (é -> e, ł -> l, ß -> ss); other scripts as is."""
    out = []
    for c in text:
        if c in _PLAIN:
            out.append(_PLAIN[c])
            continue
        base = unicodedata.normalize("NFD", c)
        if len(base) > 1 and base[0] < "\u0250":  # a Latin letter plus combining marks
            out.append(base[0])
        else:
            out.append(c)
    return "".join(out)


def whitespace(text: str, rng: np.random.Generator) -> str:
    """Doubled spaces, tabs and line breaks between words; leading and trailing whitespace."""
    words = text.split(" ")
    seps = rng.choice(np.array([" ", "  ", "   ", "\t", "\n", " \n "], dtype=object),
                      size=max(0, len(words) - 1), p=[0.4, 0.25, 0.1, 0.1, 0.1, 0.05])
    out = words[0] + "".join(s + w for s, w in zip(seps, words[1:]))
    return " " * int(rng.integers(0, 3)) + str(out) + str(rng.choice(["", " ", "\n", "  \n"]))


def punctuation(text: str, rng: np.random.Generator) -> str:
    """Existing punctuation dropped (each mark with probability 0.5) and marks added after
    about one word in four (and sometimes "!!!" at the end)."""
    kept = "".join(c for c in text if c not in _PUNCT or rng.random() >= 0.5)
    words = kept.split(" ")
    out = [w + (str(rng.choice(list(_PUNCT))) if w and rng.random() < 0.25 else "")
           for w in words]
    return " ".join(out) + ("!!!" if rng.random() < 0.3 else "")


def truncate(text: str, rng: np.random.Generator | None = None) -> str:
    """The first half of the words (at least one): a preview cut short."""
    words = text.split()
    if len(words) <= 1:
        return text
    return " ".join(words[:max(1, math.ceil(len(words) / 2))])


TEXT_VARIATIONS: dict[str, TextVariation] = {
    "upper": upper,
    "random_case": random_case,
    "typos": typos,
    "no_accents": no_accents,
    "whitespace": whitespace,
    "punctuation": punctuation,
    "truncate": truncate,
}


def text_suite(texts: Sequence[str], seed: int = SUITE_SEED,
               names: Sequence[str] | None = None) -> dict[str, list[str]]:
    """``{"clean": texts, variation: [texts]}`` for every variation in ``names`` (default: all
    of ``TEXT_VARIATIONS``), seeded and deterministic."""
    names = list(TEXT_VARIATIONS if names is None else names)
    unknown = [n for n in names if n not in TEXT_VARIATIONS]
    if unknown:
        raise KeyError(f"unknown text variations {unknown}; known: {list(TEXT_VARIATIONS)}")
    suite: dict[str, list[str]] = {CLEAN: list(texts)}
    for name in names:
        fn = TEXT_VARIATIONS[name]
        suite[name] = [fn(t, item_rng(seed, name, i)) for i, t in enumerate(texts)]
    return suite


# -- measuring -------------------------------------------------------------------------------

def suite_accuracy(predict: Callable[[list], np.ndarray], suite: Mapping[str, Sequence[Any]],
                   labels: Sequence[int]) -> dict[str, float]:
    """Accuracy of ``predict`` (inputs -> predicted class indices) on every entry of ``suite``,
    ``"clean"`` first."""
    if CLEAN not in suite:
        raise KeyError("a suite has a 'clean' entry (the unchanged inputs)")
    y = np.asarray(labels, dtype=np.int64)
    out: dict[str, float] = {}
    for name in [CLEAN, *(n for n in suite if n != CLEAN)]:
        items = list(suite[name])
        if len(items) != len(y):
            raise ValueError(f"{name}: {len(items)} inputs for {len(y)} labels")
        predicted = np.asarray(predict(items), dtype=np.int64).reshape(-1)
        out[name] = float((predicted == y).mean()) if len(y) else float("nan")
    return out


def worst_variation(accuracy: Mapping[str, float]) -> dict[str, Any]:
    """``{"variation", "accuracy", "drop"}`` of the lowest-accuracy variation (drop: clean
    accuracy minus its accuracy; the first listed wins a tie)."""
    variations = {k: v for k, v in accuracy.items() if k != CLEAN}
    if not variations:
        return {"variation": None, "accuracy": None, "drop": None}
    name = min(variations, key=lambda k: variations[k])
    return {"variation": name, "accuracy": variations[name],
            "drop": accuracy.get(CLEAN, float("nan")) - variations[name]}
