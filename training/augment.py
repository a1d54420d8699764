"""Training-only augmentation on the decoded PIL image: small random affine moves, optional flip,
and the variations of the robustness suite (``training/robustness.py``) users really produce.

It runs on the image after ``preprocessing.decode_image`` and ``resize_image`` and before
``image_to_array``, so the tensor still comes from the shared preprocessing code. Randomness
comes from a numpy Generator the caller seeds, which makes an epoch's augmented images a pure
function of (seed, epoch, index).

Per image, after the affine move, each robustness family is drawn independently with its
probability: resampling (nearest, bilinear or bicubic; down, up, or a low-resolution copy
enlarged back; then the spec's resize back to the model size), brightness and contrast,
inverted polarity, Gaussian noise, and last JPEG re-compression (as a user's file would be).
The ranges cover the suite's (e.g. rotation up to the suite's 12 degrees, JPEG quality 20-95
against the suite's 30-90), so a model trained with them is measured on variations it has seen.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from preprocessing import ImageSpec, resize_image

_METHODS = (Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class Augment:
    """A random affine about the image centre, then an optional horizontal flip.

    ``max_translate`` is a fraction of the image side (0.08 is about 2.5 px at 32 px), so the same
    setting means the same thing for photos of any size.
    """

    max_rotate_deg: float = 10.0
    max_translate: float = 0.08
    scale_range: tuple[float, float] = (0.9, 1.1)
    flip: bool = False
    # The robustness families, each drawn per image with its probability (0: off).
    p_resample: float = 0.0
    p_photometric: float = 0.0
    p_invert: float = 0.0
    p_noise: float = 0.0
    p_jpeg: float = 0.0
    max_brightness: float = 50.0  # levels of 255, either way
    contrast_range: tuple[float, float] = (0.4, 1.2)
    max_noise_sigma: float = 15.0  # levels of 255
    jpeg_quality: tuple[int, int] = (20, 95)

    @classmethod
    def robust(cls, p: float, invert: bool, **kw: object) -> "Augment":
        """The affine move plus every robustness family at probability ``p`` (inverted polarity
        at ``p`` too where ``invert``)."""
        return cls(p_resample=p, p_photometric=p, p_noise=p, p_jpeg=p,
                   p_invert=p if invert else 0.0, **kw)  # type: ignore[arg-type]

    def __call__(self, img: Image.Image, rng: np.random.Generator, spec: ImageSpec) -> Image.Image:
        angle = rng.uniform(-self.max_rotate_deg, self.max_rotate_deg)
        scale = rng.uniform(*self.scale_range)
        tx, ty = rng.uniform(-self.max_translate, self.max_translate, size=2) * np.array(img.size)
        out = random_affine(img, angle, scale, (float(tx), float(ty)), fill_for(img, spec))
        if self.flip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # One coin per family, drawn together: the families are independent of each other.
        coins = rng.random(5)
        if coins[0] < self.p_resample:
            out = random_resample(out, rng, spec)
        if coins[1] < self.p_photometric:
            out = random_photometric(out, rng, self.max_brightness, self.contrast_range)
        if coins[2] < self.p_invert:
            out = ImageOps.invert(out)
        if coins[3] < self.p_noise:
            out = add_noise(out, rng, rng.uniform(0.0, self.max_noise_sigma))
        if coins[4] < self.p_jpeg:
            out = jpeg_roundtrip(out, int(rng.integers(self.jpeg_quality[0],
                                                       self.jpeg_quality[1] + 1)))
        return out


def random_resample(img: Image.Image, rng: np.random.Generator, spec: ImageSpec) -> Image.Image:
    """The image as another resampling would give it: at 0.35-0.75 or 1.5-3 times its side
    (a quarter of the draws each), or a 0.2-0.35 copy enlarged back (half), with nearest,
    bilinear or bicubic; then the spec's resize back to the model's size (what
    ``image_to_array`` would do with it)."""
    method = _METHODS[int(rng.integers(len(_METHODS)))]
    # Half the draws a low-resolution copy: enlarging few pixels is what changes an image most
    # (scaling down and back up barely does).
    kind = int(rng.choice(3, p=(0.25, 0.25, 0.5)))
    w, h = img.size
    if kind == 2:
        f = rng.uniform(0.2, 0.35)
        small = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BOX)
        return small.resize(img.size, method)
    f = rng.uniform(0.35, 0.75) if kind == 0 else rng.uniform(1.5, 3.0)
    return resize_image(img.resize((max(1, round(w * f)), max(1, round(h * f))), method), spec)


def random_photometric(img: Image.Image, rng: np.random.Generator, max_brightness: float,
                       contrast_range: tuple[float, float]) -> Image.Image:
    """A brightness offset (+-``max_brightness`` levels) and a contrast factor about the mean."""
    out = ImageEnhance.Contrast(img).enhance(float(rng.uniform(*contrast_range)))
    offset = rng.uniform(-max_brightness, max_brightness)
    arr = np.asarray(out, dtype=np.float32) + np.float32(offset)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode=img.mode)


def add_noise(img: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, sigma, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode=img.mode)


def jpeg_roundtrip(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    out = Image.open(io.BytesIO(buf.getvalue()))
    out.load()
    return out.convert(img.mode)


def fill_for(img: Image.Image, spec: ImageSpec) -> int | tuple[int, int, int]:
    """The spec's background in the image's mode: the colour padding and transparency get."""
    if img.mode == "L":
        return round(sum(spec.background) / 3)
    return tuple(spec.background)  # type: ignore[return-value]


def random_affine(
    img: Image.Image,
    angle_deg: float,
    scale: float,
    translate: tuple[float, float],
    fill: int | tuple[int, int, int],
) -> Image.Image:
    """Rotate by ``angle_deg``, scale and translate (pixels) about the image centre.

    PIL's ``Image.transform`` wants the *inverse* map (output pixel -> input pixel), so we build
    the forward matrix's inverse directly.
    """
    cx, cy = img.size[0] / 2.0, img.size[1] / 2.0
    tx, ty = translate
    theta = math.radians(angle_deg)
    # Forward: p' = s R (p - c) + c + t. Inverse: p = R^-1 (p' - c - t) / s + c; the inverse of
    # a rotation is the rotation by -angle, whose matrix is written out below.
    cos, sin = math.cos(theta) / scale, math.sin(theta) / scale
    a, b = cos, sin
    d, e = -sin, cos
    ox, oy = cx + tx, cy + ty
    c = cx - a * ox - b * oy
    f = cy - d * ox - e * oy
    return img.transform(
        img.size, Image.Transform.AFFINE, (a, b, c, d, e, f),
        resample=Image.Resampling.BILINEAR, fillcolor=fill,
    )
