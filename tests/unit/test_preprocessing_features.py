"""image_features: the input statistics monitoring watches, on hand-made images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from preprocessing import IMAGE_FEATURES, image_features


def flat(color: tuple[int, int, int] | int, size: tuple[int, int] = (32, 24)) -> Image.Image:
    return Image.new("L" if isinstance(color, int) else "RGB", size, color)


def smooth_large(width: int = 3000, height: int = 2000) -> Image.Image:
    """Gradients and large blocks: content whose averages survive downsizing."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    arr = np.empty((height, width, 3), dtype=np.uint8)
    arr[..., 0] = np.broadcast_to(x, (height, width))
    arr[..., 1] = np.broadcast_to(y, (height, width))
    arr[..., 2] = 40
    arr[: height // 2, : width // 3, 2] = 220
    return Image.fromarray(arr)


@pytest.mark.parametrize(
    "img", [flat((10, 200, 30)), flat(128), flat(0, (1, 1))], ids=["rgb", "L", "1x1"]
)
def test_keys_and_types(img: Image.Image) -> None:
    feats = image_features(img)
    assert tuple(feats) == IMAGE_FEATURES
    assert all(type(v) is float for v in feats.values())  # plain floats, not numpy scalars
    assert all(np.isfinite(v) for v in feats.values())


@pytest.mark.parametrize("size", [(300, 100), (100, 300), (64, 64), (3000, 2000), (1, 5000)])
def test_size_features_come_from_the_original_image(size: tuple[int, int]) -> None:
    feats = image_features(flat((1, 2, 3), size))
    assert feats["width"] == size[0]
    assert feats["height"] == size[1]
    assert feats["aspect_ratio"] == pytest.approx(size[0] / size[1])


def test_white_and_black() -> None:
    white = image_features(flat((255, 255, 255)))
    black = image_features(flat((0, 0, 0)))
    assert white["brightness"] == pytest.approx(1.0, abs=1e-6)
    assert black["brightness"] == 0.0
    for feats in (white, black):
        assert feats["contrast"] == pytest.approx(0.0, abs=1e-6)
        assert feats["saturation"] == 0.0
        assert feats["edge_density"] == 0.0


@pytest.mark.parametrize("color", [(255, 255, 255), (0, 0, 0), (90, 140, 200), 77])
def test_flat_image_has_no_contrast_or_edges(color: tuple[int, int, int] | int) -> None:
    feats = image_features(flat(color))
    assert feats["contrast"] == pytest.approx(0.0, abs=1e-6)
    assert feats["edge_density"] == pytest.approx(0.0, abs=1e-6)


def test_red_image() -> None:
    feats = image_features(flat((255, 0, 0)))
    assert feats["mean_r"] == pytest.approx(1.0)
    assert feats["mean_g"] == 0.0 and feats["mean_b"] == 0.0
    assert feats["saturation"] == pytest.approx(1.0)
    assert feats["brightness"] == pytest.approx(0.299, abs=1e-6)


def test_gray_image_equals_its_rgb_copy() -> None:
    rng = np.random.default_rng(0)
    gray = Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8))
    a, b = image_features(gray), image_features(gray.convert("RGB"))
    assert a == pytest.approx(b, abs=1e-6)
    assert a["saturation"] == 0.0
    assert a["mean_r"] == a["mean_g"] == a["mean_b"]


def test_contrast_and_edges_rise_with_structure() -> None:
    checker = Image.fromarray((np.indices((32, 32)).sum(axis=0) % 2 * 255).astype(np.uint8))
    feats = image_features(checker)
    assert feats["contrast"] == pytest.approx(0.5, abs=1e-3)  # half 0, half 1
    assert feats["edge_density"] == pytest.approx(1.0, abs=1e-6)  # every neighbour differs
    assert feats["brightness"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("size", [(1, 40), (40, 1)])
def test_one_pixel_wide_image_has_no_edges(size: tuple[int, int]) -> None:
    img = Image.fromarray(np.arange(40, dtype=np.uint8).reshape(size[::-1]) * 6)
    assert image_features(img)["edge_density"] == 0.0


def test_large_image_matches_a_downsized_copy() -> None:
    big = smooth_large()
    small = big.resize((150, 100), Image.Resampling.BOX)
    a, b = image_features(big), image_features(small)
    assert (a["width"], a["height"]) == (3000.0, 2000.0)
    assert a["aspect_ratio"] == pytest.approx(1.5)
    # Global averages do not depend on resolution; edge_density does (a gradient spread over
    # more pixels has smaller steps), so it is left out.
    for name in ("brightness", "contrast", "mean_r", "mean_g", "mean_b", "saturation"):
        assert a[name] == pytest.approx(b[name], abs=0.02), name
    assert 0.0 < a["edge_density"] < 1.0


@pytest.mark.parametrize("shape", [(64, 64, 3), (24, 32, 3), (17, 5), (1, 1, 3)])
def test_values_match_the_definitions_in_float64(shape: tuple[int, ...]) -> None:
    """The fast float32 arithmetic (planes, dot products) against the definitions written
    plainly in float64 on the same pixels."""
    pixels = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    img = Image.fromarray(pixels)
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    gray = rgb @ np.array([0.299, 0.587, 0.114])
    h, w = gray.shape
    edges = ((np.abs(np.diff(gray, axis=1)).mean() + np.abs(np.diff(gray, axis=0)).mean()) / 2
             if h > 1 and w > 1 else 0.0)
    expected = {
        "brightness": gray.mean(), "contrast": gray.std(),
        "mean_r": rgb[..., 0].mean(), "mean_g": rgb[..., 1].mean(), "mean_b": rgb[..., 2].mean(),
        "saturation": (rgb.max(axis=2) - rgb.min(axis=2)).mean(), "edge_density": edges,
    }
    feats = image_features(img)
    for name, value in expected.items():
        assert feats[name] == pytest.approx(value, abs=1e-6), name
