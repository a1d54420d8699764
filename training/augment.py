"""Training-only augmentation on the decoded PIL image: small random affine moves, optional flip.

It runs on the image after ``preprocessing.decode_image`` and ``resize_image`` and before
``image_to_array``, so the tensor still comes from the shared preprocessing code. Randomness
comes from a numpy Generator the caller seeds, which makes an epoch's augmented images a pure
function of (seed, epoch, index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from preprocessing import ImageSpec


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

    def __call__(self, img: Image.Image, rng: np.random.Generator, spec: ImageSpec) -> Image.Image:
        angle = rng.uniform(-self.max_rotate_deg, self.max_rotate_deg)
        scale = rng.uniform(*self.scale_range)
        tx, ty = rng.uniform(-self.max_translate, self.max_translate, size=2) * np.array(img.size)
        out = random_affine(img, angle, scale, (float(tx), float(ty)), fill_for(img, spec))
        if self.flip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return out


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
