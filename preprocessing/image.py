"""Image bytes -> PIL image -> model tensor. The training dataset and the service both call these.

``decode_image`` is strict about what it accepts (an allow-list of formats, a pixel budget checked
before any pixel is decoded, truncated files refused) and normalises the zoo of PIL modes
(16-bit, palette, CMYK, alpha, EXIF rotation, animation) into plain 8-bit ``L`` or ``RGB``.
``image_to_array`` applies the spec's resize rule and normalisation.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError
from .spec import ImageSpec

# Formats we decode. Everything else PIL knows (EPS through Ghostscript, exotic plugins) is an
# attack surface we do not need.
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}

# The default pixel budget for one image (a 40-megapixel photo); the service sets its own.
DEFAULT_MAX_PIXELS = 40_000_000

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# ``info`` key of a decoded image that ``jpeg_draft`` decoded smaller: (width, height) of the
# image itself, upright, which ``features.image_features`` reports.
SOURCE_SIZE = "clf_source_size"


def decode_image(data: bytes, spec: ImageSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes into an 8-bit image in the spec's colour mode (first frame, upright).

    ``max_pixels`` is checked against the header before any pixel is decoded (decompression bombs).
    """
    if not data:
        raise InputError("empty", "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL's own bomb check warns or raises at 1x/2x of a global limit; ours below is the
            # spec's and runs first, so silence the global one rather than depend on its value.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise InputError(
            "not_an_image",
            f"the bytes are not an image in a supported format ({', '.join(ALLOWED_FORMATS)})",
        ) from None
    except Image.DecompressionBombError:
        raise InputError("too_many_pixels", "the image has too many pixels") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError("corrupt", f"the image header cannot be read: {exc}") from None

    width, height = img.size
    if width * height > max_pixels:
        raise InputError(
            "too_many_pixels",
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
        )
    try:
        drafted = spec.jpeg_draft and img.format == "JPEG" and _draft(img, spec)
        # Image.open leaves an animated GIF/WebP/TIFF on its first frame. Asking for n_frames
        # would walk every frame, and on a truncated GIF raises IndexError/struct.error (a 500).
        img.load()
        turned = ImageOps.exif_transpose(img)
        out = _to_mode(turned, spec)
        if drafted:  # the monitored width and height are the image's, not the draft's
            swapped = (turned.size != img.size) and turned.size == img.size[::-1]
            out.info[SOURCE_SIZE] = (height, width) if swapped else (width, height)
        return out
    except Image.DecompressionBombError:
        raise InputError("too_many_pixels", "the image has too many pixels") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InputError("corrupt", f"the image data is corrupt or truncated: {exc}") from None


def _draft(img: Image.Image, spec: ImageSpec) -> bool:
    """Have libjpeg decode ``img`` (a JPEG, not yet loaded) at the smallest of 1/2, 1/4 and 1/8
    scale that keeps both sides at least twice the model's larger side (``ImageSpec.jpeg_draft``;
    twice, so the resize still averages over the pixels it drops: the tensor then stays within
    a grey level of the full decode's). Whether it did."""
    side = 2 * max(spec.width, spec.height)
    if min(img.size) < 2 * side:
        return False
    before = img.size
    img.draft(None, (side, side))
    return img.size != before


def _to_mode(img: Image.Image, spec: ImageSpec) -> Image.Image:
    """Any PIL mode -> 8-bit ``L`` or ``RGB``; transparency is composited on the spec's background."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        # PIL's convert("L") clips 16-bit values at 255 instead of scaling them.
        arr = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray((arr // 257).clip(0, 255).astype(np.uint8), mode="L")
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), mode="L")
    elif mode == "P" or (mode in ("L", "RGB") and "transparency" in img.info):
        # A palette, or a PNG tRNS colour key on L/RGB, marks transparent pixels: make them alpha.
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "1"):
        img = img.convert("RGB" if mode != "1" else "L")

    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*spec.background, 255))
        img = Image.alpha_composite(canvas, rgba).convert("RGB")

    if img.mode != spec.color_mode:
        img = img.convert(spec.color_mode)
    return img


def resize_image(img: Image.Image, spec: ImageSpec) -> Image.Image:
    """Apply the spec's resize rule; an image already at the input size is returned as is."""
    target = (spec.width, spec.height)
    if img.size == target:
        return img
    resample = _RESAMPLE[spec.interpolation]
    if spec.resize == "stretch":
        return img.resize(target, resample)
    w, h = img.size
    if spec.resize == "center_crop":
        scale = max(spec.width / w, spec.height / h)
        new = (max(spec.width, round(w * scale)), max(spec.height, round(h * scale)))
        img = img.resize(new, resample)
        left = (new[0] - spec.width) // 2
        top = (new[1] - spec.height) // 2
        return img.crop((left, top, left + spec.width, top + spec.height))
    # pad (letterbox)
    scale = min(spec.width / w, spec.height / h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = img.resize(new, resample)
    fill = spec.background if spec.color_mode == "RGB" else round(sum(spec.background) / 3)
    canvas = Image.new(spec.color_mode, target, fill)
    canvas.paste(img, ((spec.width - new[0]) // 2, (spec.height - new[1]) // 2))
    return canvas


def image_to_array(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """A decoded image -> normalised float32 ``[C, H, W]``."""
    if img.mode != spec.color_mode:
        raise ValueError(f"image mode {img.mode} does not match spec {spec.color_mode}; decode first")
    img = resize_image(img, spec)
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None, :, :]
    else:
        arr = arr.transpose(2, 0, 1)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1) * np.float32(255.0)
    scale = 1.0 / (np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1) * np.float32(255.0))
    # (x/255 - mean)/std, folded into one subtract and one multiply; the same arithmetic on
    # every path keeps training and serving tensors bit-identical.
    return np.ascontiguousarray((arr - mean) * scale, dtype=np.float32)


def preprocess_image_bytes(
    data: bytes, spec: ImageSpec, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Image bytes -> model tensor: what the service does for every uploaded image."""
    return image_to_array(decode_image(data, spec, max_pixels), spec)
