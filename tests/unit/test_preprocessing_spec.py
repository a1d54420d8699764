"""ImageSpec: the JSON that travels inside the model artifact, and what it refuses."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from preprocessing import SPEC_VERSION, ImageSpec, SpecError, load_spec

SPEC = ImageSpec(
    height=224,
    width=160,
    color_mode="RGB",
    resize="center_crop",
    interpolation="bicubic",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    background=(255, 128, 0),
)

# One changed value per field; ``color_mode`` has to bring matching mean/std along.
CHANGES: dict[str, dict] = {
    "height": {"height": 225},
    "width": {"width": 161},
    "color_mode": {"color_mode": "L", "mean": (0.5,), "std": (0.5,)},
    "resize": {"resize": "pad"},
    "interpolation": {"interpolation": "bilinear"},
    "mean": {"mean": (0.485, 0.456, 0.407)},
    "std": {"std": (0.229, 0.224, 0.226)},
    "background": {"background": (255, 128, 1)},
    "jpeg_draft": {"jpeg_draft": True},
}


def spec_dict(**changes: object) -> dict:
    """SPEC as the plain dict a JSON file would hold, with some values replaced."""
    data = json.loads(SPEC.to_json())
    data.update(changes)
    return data


def test_json_round_trip_is_equal() -> None:
    again = ImageSpec.from_json(SPEC.to_json())
    assert again == SPEC
    assert again.to_json() == SPEC.to_json()
    assert hash(again) == hash(SPEC)


def test_from_lists_gives_tuples() -> None:
    # json.loads gives lists; the spec must still be equal to, and hash like, the tuple one.
    data = spec_dict()
    assert isinstance(data["mean"], list)
    spec = ImageSpec.from_dict(data)
    assert spec == SPEC
    assert isinstance(spec.mean, tuple) and isinstance(spec.std, tuple)
    assert isinstance(spec.background, tuple)
    assert all(isinstance(m, float) for m in spec.mean)
    assert all(isinstance(b, int) for b in spec.background)
    assert {spec, SPEC} == {SPEC}


def test_a_spec_written_before_jpeg_draft_reads_and_hashes_as_it_did() -> None:
    """An artifact's spec.json from before the field: no draft, and the same JSON and hash (the
    hash of the canonical JSON of exactly its fields, as the export wrote it)."""
    old = {"height": 64, "width": 64, "color_mode": "RGB", "resize": "stretch",
           "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
           "background": [0, 0, 0], "kind": "image", "version": 1}
    spec = ImageSpec.from_dict(old)
    assert spec.jpeg_draft is False and json.loads(spec.to_json()) == old
    canonical = json.dumps(old, sort_keys=True, separators=(",", ":"))
    assert spec.content_hash == hashlib.sha256(canonical.encode()).hexdigest()


def test_json_holds_version_and_kind() -> None:
    data = json.loads(SPEC.to_json())
    assert data["version"] == SPEC_VERSION
    assert data["kind"] == "image"


def test_content_hash_is_stable_across_round_trip() -> None:
    assert ImageSpec.from_json(SPEC.to_json()).content_hash == SPEC.content_hash
    # Integer-valued floats from lists hash like the floats written by the code.
    same = dataclasses.replace(SPEC, background=[255, 128, 0], mean=[0.485, 0.456, 0.406])
    assert same.content_hash == SPEC.content_hash
    assert len(SPEC.content_hash) == 64 and int(SPEC.content_hash, 16) >= 0


def test_every_field_that_can_change_is_covered() -> None:
    # kind and version have a single legal value today; every other field must be in CHANGES,
    # so a field added later also gets a hash test.
    names = {f.name for f in dataclasses.fields(ImageSpec)} - {"kind", "version"}
    assert names == set(CHANGES)


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_content_hash_changes_with_any_field(name: str) -> None:
    other = dataclasses.replace(SPEC, **CHANGES[name])
    assert other != SPEC
    assert other.content_hash != SPEC.content_hash


def test_input_shape() -> None:
    assert SPEC.input_shape == (3, 224, 160)
    gray = ImageSpec(height=28, width=32, color_mode="L", mean=(0.1307,), std=(0.3081,))
    assert gray.channels == 1
    assert gray.input_shape == (1, 28, 32)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"color_mode": "RGBA"}, "color_mode"),
        ({"color_mode": "rgb"}, "color_mode"),
        ({"mean": (0.5, 0.5)}, "mean and std"),
        ({"std": (0.5, 0.5, 0.5, 0.5)}, "mean and std"),
        ({"color_mode": "L"}, "mean and std"),  # RGB mean/std left with a gray spec
        ({"std": (0.5, 0.0, 0.5)}, "std"),
        ({"std": (0.5, -0.1, 0.5)}, "std"),
        ({"resize": "crop"}, "resize"),
        ({"resize": "letterbox"}, "resize"),
        ({"interpolation": "area"}, "interpolation"),
        ({"height": 0}, "size"),
        ({"width": -3}, "size"),
        ({"background": (0, 0, 256)}, "background"),
        ({"background": (0, 0)}, "background"),
        ({"std": (0.5, float("nan"), 0.5)}, "finite"),
        ({"kind": "text"}, "kind"),
    ],
)
def test_invalid_values_raise_spec_error(changes: dict, words: str) -> None:
    with pytest.raises(SpecError, match=words):
        dataclasses.replace(SPEC, **changes)
    # The same mistake arriving as JSON is refused the same way.
    with pytest.raises(SpecError):
        ImageSpec.from_json(json.dumps(spec_dict(**changes)))


@pytest.mark.parametrize("version", [0, 2, SPEC_VERSION + 1, "1", None])
def test_unsupported_version_is_refused(version: object) -> None:
    with pytest.raises(SpecError, match="not supported") as info:
        ImageSpec.from_json(json.dumps(spec_dict(version=version)))
    # The message tells the operator what to do, not only what is wrong.
    assert "upgrade" in str(info.value) or "re-export" in str(info.value)


def test_missing_version_is_refused() -> None:
    data = spec_dict()
    del data["version"]
    with pytest.raises(SpecError, match="not supported"):
        ImageSpec.from_dict(data)


def test_unsupported_version_in_constructor() -> None:
    with pytest.raises(SpecError, match="not supported"):
        ImageSpec(height=8, width=8, version=SPEC_VERSION + 1)


def test_unknown_field_is_refused_by_name() -> None:
    with pytest.raises(SpecError, match="crop_pct"):
        ImageSpec.from_dict(spec_dict(crop_pct=0.875))


def test_missing_required_field() -> None:
    data = spec_dict()
    del data["height"]
    with pytest.raises(SpecError, match="incomplete"):
        ImageSpec.from_dict(data)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"image"', "null"])
def test_from_json_refuses_non_objects(text: str) -> None:
    with pytest.raises(SpecError):
        ImageSpec.from_json(text)


def test_load_spec_image() -> None:
    assert load_spec(SPEC.to_json()) == SPEC


@pytest.mark.parametrize("kind", ["audio", "video", "", None])
def test_load_spec_unknown_kind(kind: object) -> None:
    with pytest.raises(SpecError, match="unknown preprocessing spec kind"):
        load_spec(json.dumps(spec_dict(kind=kind)))


def test_load_spec_without_kind() -> None:
    data = spec_dict()
    del data["kind"]
    with pytest.raises(SpecError, match="kind"):
        load_spec(json.dumps(data))


@pytest.mark.parametrize("text", ["", "{oops", "[]", "3"])
def test_load_spec_refuses_non_objects(text: str) -> None:
    with pytest.raises(SpecError):
        load_spec(text)
