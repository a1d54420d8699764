"""Image bytes -> model tensor, over every format and PIL mode we accept, and the inputs we refuse.

Every image is drawn in memory with Pillow; nothing is read from disk or downloaded.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from preprocessing import (
    ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    REASONS,
    ImageSpec,
    InputError,
    decode_image,
    image_to_array,
    preprocess_image_bytes,
    resize_image,
)
from service.app import STATUS

BACKGROUND = (0, 128, 255)  # distinctive per channel, so a channel swap shows
RGB_SPEC = ImageSpec(
    height=8,
    width=8,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    background=BACKGROUND,
)
GRAY_SPEC = ImageSpec(
    height=8, width=8, color_mode="L", mean=(0.1307,), std=(0.3081,), background=BACKGROUND
)
COLOR = (200, 30, 61)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def normalised(value: tuple[int, ...] | int, spec: ImageSpec) -> np.ndarray:
    """(x/255 - mean)/std in float64, per channel: the reference the tensor must match."""
    x = np.atleast_1d(np.asarray(value, dtype=np.float64))
    return (x / 255.0 - np.asarray(spec.mean)) / np.asarray(spec.std)


def gray_of(rgb: tuple[int, int, int]) -> int:
    """PIL's own RGB -> L, which decode_image uses for a gray spec."""
    return Image.new("RGB", (1, 1), rgb).convert("L").getpixel((0, 0))


def expect_input_error(
    data: bytes, spec: ImageSpec, reason: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> InputError:
    with pytest.raises(InputError) as info:
        preprocess_image_bytes(data, spec, max_pixels)
    err = info.value
    assert err.reason == reason, err.message
    assert reason in REASONS and 400 <= STATUS[reason] < 500  # the service's table
    assert isinstance(err.message, str) and len(err.message.strip()) > 10
    assert str(err) == err.message
    return err


def palette_image(size: tuple[int, int], colors: list[tuple[int, int, int]]) -> Image.Image:
    """A ``P`` image whose palette is exactly ``colors``, filled with index 0."""
    img = Image.new("P", size, 0)
    flat = [c for rgb in colors for c in rgb]
    img.putpalette(flat + [0] * (768 - len(flat)))
    return img


def animated(fmt: str, colors: list[tuple[int, int, int]], **params: object) -> bytes:
    frames = [Image.new("RGB", (13, 9), c) for c in colors]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=40, **params)


# --------------------------------------------------------------------------- every format / mode

# name -> (bytes of a flat image that is not the target size, its colour, tolerance in 0..255).
# Flat images stay flat under any resampling, so the centre pixel of the tensor is known.
FLAT_SIZE = (13, 9)


def _flat(mode: str, value: object) -> Image.Image:
    return Image.new(mode, FLAT_SIZE, value)


def _rgba_transparent() -> bytes:
    return encode(_flat("RGBA", (255, 0, 0, 0)), "PNG")


def _png_i16() -> bytes:
    img = Image.fromarray(np.full(FLAT_SIZE[::-1], 32896, dtype=np.uint16))
    assert img.mode == "I;16"
    return encode(img, "PNG")


def _tiff_i16() -> bytes:
    return encode(Image.fromarray(np.full(FLAT_SIZE[::-1], 65535, dtype=np.uint16)), "TIFF")


def _p(transparent: bool) -> bytes:
    img = palette_image(FLAT_SIZE, [(0, 0, 0), COLOR])
    img.paste(1, (0, 0, *FLAT_SIZE))
    return encode(img, "PNG", **({"transparency": 1} if transparent else {}))


def _cmyk_jpeg() -> bytes:
    img = _flat("CMYK", (0, 255, 255, 0))  # pure red in CMYK
    data = encode(img, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    return data


FORMAT_CASES: dict[str, Callable[[], tuple[bytes, tuple[int, int, int], float]]] = {
    "png_rgb": lambda: (encode(_flat("RGB", COLOR), "PNG"), COLOR, 0),
    "jpeg": lambda: (encode(_flat("RGB", COLOR), "JPEG", quality=95), COLOR, 4),
    "jpeg_cmyk": lambda: (_cmyk_jpeg(), (255, 0, 0), 4),
    "gif_still": lambda: (encode(_flat("RGB", COLOR), "GIF"), COLOR, 0),
    "gif_animated": lambda: (animated("GIF", [COLOR, (0, 0, 255), (0, 255, 0)]), COLOR, 0),
    "webp_lossless": lambda: (encode(_flat("RGB", COLOR), "WEBP", lossless=True), COLOR, 0),
    "webp_lossy": lambda: (encode(_flat("RGB", COLOR), "WEBP", quality=90), COLOR, 6),
    "webp_animated": lambda: (
        animated("WEBP", [COLOR, (0, 0, 255), (0, 255, 0)], lossless=True),
        COLOR,
        0,
    ),
    "png_gray_L": lambda: (encode(_flat("L", 77), "PNG"), (77, 77, 77), 0),
    "png_rgba_transparent": lambda: (_rgba_transparent(), BACKGROUND, 0),
    "png_rgba_opaque": lambda: (encode(_flat("RGBA", (*COLOR, 255)), "PNG"), COLOR, 0),
    "png_la": lambda: (encode(_flat("LA", (77, 255)), "PNG"), (77, 77, 77), 0),
    "png_i16": lambda: (_png_i16(), (128, 128, 128), 0),
    "tiff_i16": lambda: (_tiff_i16(), (255, 255, 255), 0),
    "png_palette": lambda: (_p(transparent=False), COLOR, 0),
    "png_palette_transparent": lambda: (_p(transparent=True), BACKGROUND, 0),
    "bmp": lambda: (encode(_flat("RGB", COLOR), "BMP"), COLOR, 0),
    "tiff": lambda: (encode(_flat("RGB", COLOR), "TIFF"), COLOR, 0),
    "tiff_lzw": lambda: (encode(_flat("RGB", COLOR), "TIFF", compression="tiff_lzw"), COLOR, 0),
    "png_mode_1": lambda: (encode(_flat("1", 1), "PNG"), (255, 255, 255), 0),
    "bmp_mode_1": lambda: (encode(_flat("1", 0), "BMP"), (0, 0, 0), 0),
    "tiff_mode_1": lambda: (encode(_flat("1", 1), "TIFF"), (255, 255, 255), 0),
}


@pytest.mark.parametrize("spec", [RGB_SPEC, GRAY_SPEC], ids=["RGB", "L"])
@pytest.mark.parametrize("case", sorted(FORMAT_CASES))
def test_every_format_gives_the_model_tensor(case: str, spec: ImageSpec) -> None:
    data, rgb, tol = FORMAT_CASES[case]()
    out = preprocess_image_bytes(data, spec)
    assert out.shape == spec.input_shape
    assert out.dtype == np.float32
    assert out.flags["C_CONTIGUOUS"]
    assert np.isfinite(out).all()
    expected = normalised(rgb if spec.color_mode == "RGB" else gray_of(rgb), spec)
    # Exact formats: (x/255 - mean)/std within 1e-6. Lossy ones: within ``tol`` grey levels.
    atol = 1e-6 + tol / 255.0 / min(spec.std)
    np.testing.assert_allclose(out[:, 4, 4], expected, rtol=0, atol=atol)


@pytest.mark.parametrize("case", sorted(FORMAT_CASES))
def test_decode_gives_spec_mode_and_original_size(case: str) -> None:
    data, _, _ = FORMAT_CASES[case]()
    for spec in (RGB_SPEC, GRAY_SPEC):
        img = decode_image(data, spec)
        assert img.mode == spec.color_mode
        assert img.size == FLAT_SIZE


def test_all_sample_formats_are_allowed() -> None:
    # The cases above must exercise the whole allow-list, or a format slips by untested.
    seen = {Image.open(io.BytesIO(FORMAT_CASES[c]()[0])).format for c in FORMAT_CASES}
    assert seen == set(ALLOWED_FORMATS)


# --------------------------------------------------------------------------- modes in detail


@pytest.mark.parametrize(("orientation", "top", "bottom"), [(6, "red", "blue"), (8, "blue", "red")])
def test_jpeg_exif_orientation_is_applied(orientation: int, top: str, bottom: str) -> None:
    # Landscape, left half red, right half blue; the EXIF tag says "display rotated".
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, "JPEG", quality=95, exif=exif)
    assert Image.open(io.BytesIO(data)).size == (40, 20)

    decoded = decode_image(data, RGB_SPEC)
    assert decoded.size == (20, 40)
    arr = np.asarray(decoded).astype(int)
    colors = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    np.testing.assert_allclose(arr[5, 10], colors[top], atol=6)
    np.testing.assert_allclose(arr[34, 10], colors[bottom], atol=6)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_uses_first_frame(fmt: str) -> None:
    params = {"lossless": True} if fmt == "WEBP" else {}
    data = animated(fmt, [(0, 255, 0), (255, 0, 0), (0, 0, 255)], **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    arr = np.asarray(decode_image(data, RGB_SPEC))
    assert (arr == (0, 255, 0)).all()


def test_rgba_alpha_is_composited_on_background() -> None:
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (255, 0, 0, 255))  # opaque
    img.putpixel((1, 0), (0, 255, 0, 0))  # fully transparent: its colour must not leak
    img.putpixel((2, 0), (255, 255, 255, 128))  # half transparent
    arr = np.asarray(decode_image(encode(img, "PNG"), RGB_SPEC)).astype(int)
    assert tuple(arr[0, 0]) == (255, 0, 0)
    assert tuple(arr[0, 1]) == BACKGROUND
    half = [round(b + (255 - b) * 128 / 255) for b in BACKGROUND]
    np.testing.assert_allclose(arr[0, 2], half, atol=1)


def test_sixteen_bit_gray_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 1000, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    arr = np.asarray(decode_image(data, GRAY_SPEC))
    # PIL's own convert("L") would clip 1000, 32896 and 65535 all to 255.
    assert arr.tolist() == [[0, 1, 3, 128, 255]]
    rgb = np.asarray(decode_image(data, RGB_SPEC))
    assert rgb[0, :, 0].tolist() == [0, 1, 3, 128, 255]


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_with_and_without_transparency(transparent: bool) -> None:
    img = palette_image((2, 1), [(10, 20, 30), COLOR])
    img.putpixel((1, 0), 1)
    params = {"transparency": 0} if transparent else {}
    for fmt in ("PNG", "GIF"):
        data = encode(img, fmt, **params)
        assert Image.open(io.BytesIO(data)).mode == "P"
        arr = np.asarray(decode_image(data, RGB_SPEC)).astype(int)
        assert tuple(arr[0, 0]) == (BACKGROUND if transparent else (10, 20, 30)), fmt
        assert tuple(arr[0, 1]) == COLOR, fmt


@pytest.mark.parametrize(
    ("mode", "key", "other"),
    [("RGB", (10, 20, 30), (200, 30, 61)), ("L", 10, 200)],
)
def test_png_colour_key_transparency(mode: str, key: object, other: object) -> None:
    # A tRNS chunk on an L/RGB PNG marks one colour transparent, like a palette entry.
    img = Image.new(mode, (2, 1), key)
    img.putpixel((1, 0), other)
    data = encode(img, "PNG", transparency=key)
    assert Image.open(io.BytesIO(data)).info["transparency"] == key
    arr = np.asarray(decode_image(data, RGB_SPEC)).astype(int)
    assert tuple(arr[0, 0]) == BACKGROUND
    expected = other if mode == "RGB" else (other,) * 3
    assert tuple(arr[0, 1]) == expected


def test_mode_1_is_black_and_white() -> None:
    img = Image.new("1", (2, 1), 0)
    img.putpixel((1, 0), 1)
    arr = np.asarray(decode_image(encode(img, "PNG"), GRAY_SPEC))
    assert arr.tolist() == [[0, 255]]


def test_gray_spec_uses_luma() -> None:
    arr = np.asarray(decode_image(encode(Image.new("RGB", (2, 2), COLOR), "PNG"), GRAY_SPEC))
    assert (arr == gray_of(COLOR)).all()


# --------------------------------------------------------------------------- resize rules

RED, BLUE = (255, 0, 0), (0, 0, 255)


def banded() -> Image.Image:
    """60x20: blue | red | blue in thirds, so only the centre is red."""
    img = Image.new("RGB", (60, 20), BLUE)
    img.paste(RED, (20, 0, 40, 20))
    return img


def rule_spec(resize: str, **changes: object) -> ImageSpec:
    params = {
        "height": 10,
        "width": 10,
        "resize": resize,
        "interpolation": "nearest",
        "mean": (0.5, 0.25, 0.75),
        "std": (0.5, 0.2, 0.3),
        "background": BACKGROUND,
    }
    params.update(changes)
    return ImageSpec(**params)


def test_stretch_keeps_the_whole_image() -> None:
    spec = rule_spec("stretch")
    out = image_to_array(banded(), spec)
    assert out.shape == (3, 10, 10)
    np.testing.assert_allclose(out[:, 5, 0], normalised(BLUE, spec), atol=1e-6)
    np.testing.assert_allclose(out[:, 5, 5], normalised(RED, spec), atol=1e-6)
    np.testing.assert_allclose(out[:, 5, 9], normalised(BLUE, spec), atol=1e-6)


def test_center_crop_takes_the_centre() -> None:
    spec = rule_spec("center_crop")
    out = image_to_array(banded(), spec)
    assert out.shape == (3, 10, 10)
    red = normalised(RED, spec).reshape(3, 1, 1)
    np.testing.assert_allclose(out, np.broadcast_to(red, out.shape), atol=1e-6)


def test_center_crop_of_a_portrait_takes_the_middle_rows() -> None:
    spec = rule_spec("center_crop")
    out = image_to_array(banded().transpose(Image.Transpose.ROTATE_90), spec)
    red = normalised(RED, spec).reshape(3, 1, 1)
    np.testing.assert_allclose(out, np.broadcast_to(red, out.shape), atol=1e-6)


def test_pad_letterboxes_with_the_background() -> None:
    spec = rule_spec("pad")
    out = image_to_array(banded(), spec)
    assert out.shape == (3, 10, 10)
    # 60x20 -> 10x3 (rounded), pasted at row (10 - 3) // 2 = 3.
    bg = normalised(BACKGROUND, spec)
    for row in (0, 1, 2, 6, 7, 8, 9):
        np.testing.assert_allclose(out[:, row, :], np.tile(bg[:, None], 10), atol=1e-6)
    np.testing.assert_allclose(out[:, 4, 5], normalised(RED, spec), atol=1e-6)
    np.testing.assert_allclose(out[:, 4, 0], normalised(BLUE, spec), atol=1e-6)


def test_pad_gray_fills_with_the_background_grey() -> None:
    spec = rule_spec("pad", color_mode="L", mean=(0.5,), std=(0.25,))
    img = Image.new("L", (60, 20), 200)
    out = image_to_array(img, spec)
    fill = round(sum(BACKGROUND) / 3)
    np.testing.assert_allclose(out[:, 0, :], np.full((1, 10), normalised(fill, spec)[0]), atol=1e-6)
    np.testing.assert_allclose(out[:, 5, 5], normalised(200, spec), atol=1e-6)


@pytest.mark.parametrize("resize", ["stretch", "center_crop", "pad"])
@pytest.mark.parametrize("size", [(1, 1), (1, 500), (500, 1), (7, 13), (6, 10), (11, 6)])
def test_every_rule_gives_the_input_shape(resize: str, size: tuple[int, int]) -> None:
    spec = ImageSpec(height=6, width=10, resize=resize, background=BACKGROUND)
    out = image_to_array(Image.new("RGB", size, COLOR), spec)
    assert out.shape == spec.input_shape == (3, 6, 10)
    assert out.dtype == np.float32


@pytest.mark.parametrize("resize", ["stretch", "center_crop", "pad"])
@pytest.mark.parametrize("spec_kind", ["RGB", "L"])
def test_image_at_target_size_is_not_resampled(resize: str, spec_kind: str) -> None:
    base = RGB_SPEC if spec_kind == "RGB" else GRAY_SPEC
    spec = ImageSpec(**{**base.to_dict(), "resize": resize, "interpolation": "lanczos"})
    rng = np.random.default_rng(0)
    shape = (8, 8, 3) if spec_kind == "RGB" else (8, 8)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    img = Image.fromarray(pixels)
    assert resize_image(img, spec) is img

    out = image_to_array(img, spec)
    chw = pixels.transpose(2, 0, 1) if pixels.ndim == 3 else pixels[None]
    mean = np.asarray(spec.mean).reshape(-1, 1, 1)
    std = np.asarray(spec.std).reshape(-1, 1, 1)
    np.testing.assert_allclose(out, (chw / 255.0 - mean) / std, rtol=0, atol=1e-6)
    # Undoing the normalisation gives back every pixel exactly: nothing was resampled.
    assert np.array_equal(np.rint(out.astype(np.float64) * std * 255 + mean * 255), chw)
    # The bytes path and the in-memory path agree bit for bit.
    assert np.array_equal(preprocess_image_bytes(encode(img, "PNG"), spec), out)


def test_image_to_array_refuses_undecoded_mode() -> None:
    with pytest.raises(ValueError, match="decode first"):
        image_to_array(Image.new("RGBA", (8, 8)), RGB_SPEC)
    with pytest.raises(ValueError, match="decode first"):
        image_to_array(Image.new("RGB", (8, 8)), GRAY_SPEC)


# --------------------------------------------------------------------------- refused input


def noise_png(side: int = 64) -> bytes:
    rng = np.random.default_rng(1)
    return encode(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)), "PNG")


def with_png_size(png: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR width/height of a PNG (and its CRC) without touching the pixel data."""
    # 8-byte signature, then the IHDR chunk: length (4), type (4), data (13), CRC (4).
    assert png[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + png[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return png[:16] + ihdr + crc + png[33:]


def test_empty_bytes() -> None:
    expect_input_error(b"", RGB_SPEC, "empty")


def test_random_bytes() -> None:
    data = np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    expect_input_error(data, RGB_SPEC, "not_an_image")


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is a plain text file\nwith two lines\n",
        b'{"image": "cat.png"}',
        b"<html><body><img src='x.png'></body></html>",
        b"\x89PNG",  # a signature and nothing else
    ],
    ids=["text", "json", "html", "png_signature_only"],
)
def test_text_is_not_an_image(data: bytes) -> None:
    expect_input_error(data, RGB_SPEC, "not_an_image")


def test_truncated_png_is_corrupt() -> None:
    png = noise_png(64)
    assert preprocess_image_bytes(png, RGB_SPEC).shape == RGB_SPEC.input_shape
    err = expect_input_error(png[: len(png) // 2], RGB_SPEC, "corrupt")
    assert "truncated" in err.message or "corrupt" in err.message


def test_broken_pixel_stream_is_corrupt() -> None:
    # A valid header whose compressed pixel data is damaged: the header reads, decoding fails.
    png = bytearray(noise_png(16))
    idat = png.index(b"IDAT") + 4
    png[idat] ^= 0xFF  # the zlib header of the pixel data
    expect_input_error(bytes(png), RGB_SPEC, "corrupt")


def test_header_declaring_huge_size_is_refused_before_decoding() -> None:
    # 100000x100000 is past PIL's own bomb limit, which refuses it in Image.open.
    bomb = with_png_size(noise_png(4), 100_000, 100_000)
    expect_input_error(bomb, RGB_SPEC, "too_many_pixels")


def test_header_over_spec_budget_is_refused_before_decoding() -> None:
    # 2000x2000 passes PIL's limit; the spec's budget refuses it. The data holds only 4x4
    # pixels, so had decoding been tried the answer would be "corrupt".
    spec = ImageSpec(height=8, width=8)
    bomb = with_png_size(noise_png(4), 2000, 2000)
    err = expect_input_error(bomb, spec, "too_many_pixels", max_pixels=1_000_000)
    assert "2000x2000" in err.message and "1000000" in err.message


@pytest.fixture(scope="module")
def black_5000_png() -> bytes:
    data = encode(Image.new("L", (5000, 5000), 0), "PNG")
    assert len(data) < 100_000  # 25 Mpx that compress to a few KB: a decompression bomb
    return data


def test_real_decompression_bomb(black_5000_png: bytes) -> None:
    spec = ImageSpec(height=8, width=8)
    expect_input_error(black_5000_png, spec, "too_many_pixels", max_pixels=1_000_000)


def test_pixel_budget_boundary() -> None:
    spec = ImageSpec(height=8, width=8)
    fits = encode(Image.new("RGB", (10, 10)), "PNG")
    assert preprocess_image_bytes(fits, spec, max_pixels=100).shape == (3, 8, 8)
    expect_input_error(encode(Image.new("RGB", (10, 11)), "PNG"), spec, "too_many_pixels", 100)


def _foreign(fmt: str) -> bytes:
    img = Image.new("RGB", (16, 16), COLOR)
    if fmt == "XBM":
        img = img.convert("1")
    return encode(img, fmt)


FOREIGN = ["ICO", "EPS", "PPM", "PCX", "JPEG2000", "TGA", "SGI", "XBM", "PDF"]


@pytest.mark.parametrize("fmt", FOREIGN)
def test_formats_outside_the_allow_list_are_refused(fmt: str) -> None:
    data = _foreign(fmt)
    if fmt != "PDF":  # PIL writes PDF but cannot read it; every other one PIL would open
        assert Image.open(io.BytesIO(data)).format == fmt
    err = expect_input_error(data, RGB_SPEC, "not_an_image")
    assert "PNG" in err.message  # the message lists what is accepted


def _prefix_cases() -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    return {
        "gif_animated": animated("GIF", [(255, 0, 0), (0, 0, 255), (0, 255, 0)]),
        "webp_animated": animated("WEBP", [(255, 0, 0), (0, 0, 255)]),
        "png": encode(img, "PNG"),
        "jpeg": encode(img, "JPEG"),
        "tiff": encode(img, "TIFF"),
        "bmp": encode(img, "BMP"),
    }


# PIL warns about the EXIF/TIFF tags it finds cut short; the outcome is what is checked here.
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["gif_animated", "webp_animated", "png", "jpeg", "tiff", "bmp"])
def test_every_truncation_is_a_tensor_or_an_input_error(name: str) -> None:
    assert_every_cut_is_a_tensor_or_an_input_error(_prefix_cases()[name], RGB_SPEC, cuts=300)


def assert_every_cut_is_a_tensor_or_an_input_error(data: bytes, spec: ImageSpec, cuts: int) -> None:
    """About ``cuts`` prefixes of ``data``: each gives a tensor or a 4xx input error. A crash
    here (IndexError, struct.error, EOFError) would become a 500 instead of a 4xx."""
    for cut in range(0, len(data), max(1, len(data) // cuts)):
        try:
            out = preprocess_image_bytes(data[:cut], spec)
        except InputError as err:
            assert 400 <= STATUS[err.reason] < 500 and err.message
        else:
            assert out.shape == spec.input_shape


# --------------------------------------------------------------------------- JPEG draft decode

def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image with a little noise (what phones upload)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    planes = [(np.sin(x / 37) + np.cos(y / 23)) * 60 + 128, x / w * 255, y / h * 255]
    noise = np.random.default_rng(seed).normal(0, 6, (h, w, 3))
    return Image.fromarray((np.stack(planes, -1) + noise).clip(0, 255).astype(np.uint8))


DRAFT_SPEC = ImageSpec(height=32, width=32, jpeg_draft=True)  # draft from 2 * 2 * 32 = 128 px


@pytest.mark.parametrize("resize", ["stretch", "center_crop", "pad"])
@pytest.mark.parametrize("size", [(1024, 768), (768, 1024), (2000, 300)])
def test_a_large_jpeg_is_decoded_smaller_and_gives_nearly_the_full_decodes_tensor(
        resize: str, size: tuple[int, int]) -> None:
    from preprocessing.features import image_features

    data = encode(photo(size), "JPEG", quality=92)
    drafted = ImageSpec(height=32, width=32, resize=resize, jpeg_draft=True)
    full = ImageSpec(height=32, width=32, resize=resize)
    small, whole = decode_image(data, drafted), decode_image(data, full)
    assert whole.size == size and small.size != size
    assert all(s >= 64 for s in small.size)  # never below twice the input side
    a, b = image_to_array(small, drafted), image_to_array(whole, full)
    grey_levels = np.abs(a - b) * 0.5 * 255  # std 0.5: back to the 0..255 scale
    assert grey_levels.max() <= 3 and grey_levels.mean() <= 0.5
    features = image_features(small)
    assert (features["width"], features["height"]) == (float(size[0]), float(size[1]))
    assert features["aspect_ratio"] == size[0] / size[1]


def test_what_the_draft_leaves_alone() -> None:
    """PNG, a JPEG under four times the input size, and a spec without ``jpeg_draft`` (every
    artifact before it): decoded whole, as before."""
    big = photo((1024, 768))
    assert decode_image(encode(big, "PNG"), DRAFT_SPEC).size == (1024, 768)
    assert decode_image(encode(photo((127, 300)), "JPEG"), DRAFT_SPEC).size == (127, 300)
    assert decode_image(encode(photo((128, 300)), "JPEG"), DRAFT_SPEC).size == (64, 150)
    assert decode_image(encode(big, "JPEG"), RGB_SPEC).size == (1024, 768)
    assert "clf_source_size" not in decode_image(encode(big, "PNG"), DRAFT_SPEC).info


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_a_drafted_jpeg_is_turned_upright_and_reports_its_upright_size(orientation: int) -> None:
    from preprocessing.features import image_features

    img = photo((1024, 512))
    img.paste((255, 0, 0), (0, 0, 512, 512))  # left half red
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, "JPEG", quality=92, exif=exif)
    small, whole = decode_image(data, DRAFT_SPEC), decode_image(data, RGB_SPEC)
    assert small.size != whole.size
    assert (small.width > small.height) == (whole.width > whole.height)
    features = image_features(small)
    assert (features["width"], features["height"]) == tuple(float(s) for s in whole.size)
    # the red half is where the full decode puts it
    red = np.asarray(whole.resize(small.size))[..., 0] > 200
    assert (red == (np.asarray(small)[..., 0] > 200)).mean() > 0.95


def test_the_spec_writes_jpeg_draft_only_when_on() -> None:
    off, on = ImageSpec(height=8, width=8), ImageSpec(height=8, width=8, jpeg_draft=True)
    assert "jpeg_draft" not in off.to_dict() and on.to_dict()["jpeg_draft"] is True
    assert ImageSpec.from_json(on.to_json()) == on and ImageSpec.from_json(off.to_json()) == off
    assert off.content_hash != on.content_hash
    with pytest.raises(Exception, match="jpeg_draft must be true or false"):
        ImageSpec(height=8, width=8, jpeg_draft="yes")  # type: ignore[arg-type]


def test_training_writes_jpeg_draft() -> None:
    from training.config import TrainConfig

    assert TrainConfig().image_spec().jpeg_draft is True


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_truncation_of_a_drafted_jpeg_is_a_tensor_or_an_input_error() -> None:
    data = encode(photo((512, 384)), "JPEG", quality=85)
    assert decode_image(data, DRAFT_SPEC).size == (128, 96)
    assert_every_cut_is_a_tensor_or_an_input_error(data, DRAFT_SPEC, cuts=80)
