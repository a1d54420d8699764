"""The versioned preprocessing spec: the facts that turn raw input into a model tensor.

A spec travels inside the model artifact as JSON. Training writes it, the service reads it and
builds its preprocessing from it alone, so what the model saw in training is what it sees in
production. ``SPEC_VERSION`` is the schema version this code can honour; a spec written by a newer
schema is refused with a clear message rather than half-understood.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

SPEC_VERSION = 1
SUPPORTED_SPEC_VERSIONS = frozenset({1})

RESIZE_RULES = ("stretch", "center_crop", "pad")
NORMALIZATION_FORMS = ("NFC", "NFKC")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box")
COLOR_MODES = {"L": 1, "RGB": 3}


class SpecError(ValueError):
    """A spec that this code cannot honour (unknown version, bad field)."""


class _SpecJSON:
    """JSON round-trip and content hash, shared by every spec kind (frozen dataclasses)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @property
    def content_hash(self) -> str:
        """sha256 of the canonical JSON: two specs with the same hash preprocess identically
        (a text spec pins its tokenizer file through ``tokenizer_sha256``)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        _check_version(data.get("version"))
        unknown = set(data) - set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
        if unknown:
            raise SpecError(
                f"preprocessing spec has fields this code does not know: {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise SpecError(f"preprocessing spec is incomplete: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> Any:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"preprocessing spec is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise SpecError("preprocessing spec must be a JSON object")
        return cls.from_dict(data)


@dataclass(frozen=True)
class ImageSpec(_SpecJSON):
    """How image bytes become a float32 ``[C, H, W]`` tensor.

    ``resize``: ``stretch`` resizes to ``height x width`` ignoring aspect; ``center_crop`` scales the
    shorter side to fit and crops the centre; ``pad`` scales the longer side to fit and pads with
    ``background`` (letterbox). ``background`` also fills transparent pixels.

    ``jpeg_draft``: a JPEG whose sides are both at least four times the model's larger input side
    is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (PIL's ``draft``), never below twice that
    side, before the resize: a 12-megapixel photo to 64x64 in a fifth of the time, its tensor
    within a grey level of the full decode's (``preprocessing.image.decode_image``). Written by
    training since it was added; a spec without it (older artifacts) decodes every pixel, as
    before, and its ``to_dict`` leaves it out, so their JSON and content hash are unchanged.
    """

    height: int
    width: int
    color_mode: str = "RGB"
    resize: str = "stretch"
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    background: tuple[int, int, int] = (0, 0, 0)
    jpeg_draft: bool = False
    kind: str = field(default="image")
    version: int = field(default=SPEC_VERSION)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.jpeg_draft:  # what specs before the field wrote (and a server before it reads)
            del out["jpeg_draft"]
        return out

    def __post_init__(self) -> None:
        # JSON gives lists; keep the dataclass hashable and its hash stable.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "background", tuple(int(b) for b in self.background))
        self._validate()

    def _validate(self) -> None:
        if self.kind != "image":
            raise SpecError(f"ImageSpec got kind={self.kind!r}")
        if self.version not in SUPPORTED_SPEC_VERSIONS:
            raise SpecError(
                f"preprocessing spec version {self.version} is not supported by this code "
                f"(supported: {sorted(SUPPORTED_SPEC_VERSIONS)}); upgrade the server or re-export "
                "the model"
            )
        if self.height < 1 or self.width < 1:
            raise SpecError(f"image size must be positive, got {self.height}x{self.width}")
        if self.color_mode not in COLOR_MODES:
            raise SpecError(f"color_mode must be one of {sorted(COLOR_MODES)}, got {self.color_mode!r}")
        if self.resize not in RESIZE_RULES:
            raise SpecError(f"resize must be one of {RESIZE_RULES}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise SpecError(
                f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )
        channels = COLOR_MODES[self.color_mode]
        if len(self.mean) != channels or len(self.std) != channels:
            raise SpecError(
                f"mean and std need {channels} values for color_mode {self.color_mode}, "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise SpecError("mean and std values must be finite numbers")
        if any(s <= 0 for s in self.std):
            raise SpecError("std values must be positive")
        if len(self.background) != 3 or not all(0 <= b <= 255 for b in self.background):
            raise SpecError("background must be three values in 0..255")
        if not isinstance(self.jpeg_draft, bool):
            raise SpecError(f"jpeg_draft must be true or false, got {self.jpeg_draft!r}")

    @property
    def channels(self) -> int:
        return COLOR_MODES[self.color_mode]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


@dataclass(frozen=True)
class TextSpec(_SpecJSON):
    """How a string becomes ``input_ids`` and ``attention_mask`` (int64 ``[N, L]``).

    Per text: refuse NUL and over-long input, drop control characters (``strip_control``; tabs
    and line breaks become spaces), Unicode-normalise (``normalization``), lowercase
    (``lowercase``). Then the Hugging Face ``tokenizers`` file ``tokenizer`` (shipped next to the
    spec; ``tokenizer_sha256`` pins its content) splits it, and the ids are truncated to
    ``max_length`` tokens including the tokenizer's special tokens. A batch is padded with
    ``pad_token`` to its own longest sequence. ``max_chars`` bounds the raw text's length so a
    huge request never reaches the tokenizer.
    """

    tokenizer: str = "tokenizer.json"
    tokenizer_sha256: str = ""
    max_length: int = 128
    normalization: str = "NFC"
    lowercase: bool = True
    strip_control: bool = True
    max_chars: int = 10_000
    pad_token: str = "[PAD]"
    unk_token: str = "[UNK]"
    kind: str = field(default="text")
    version: int = field(default=SPEC_VERSION)

    def __post_init__(self) -> None:
        if self.kind != "text":
            raise SpecError(f"TextSpec got kind={self.kind!r}")
        _check_version(self.version)
        for name in ("lowercase", "strip_control"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("max_length", "max_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise SpecError(f"{name} must be an integer, got {value!r}")
        if not 2 < self.max_length <= 8192:
            raise SpecError(f"max_length must be in 3..8192 tokens, got {self.max_length}")
        if self.max_chars < 1:
            raise SpecError(f"max_chars must be positive, got {self.max_chars}")
        if self.normalization not in NORMALIZATION_FORMS:
            raise SpecError(
                f"normalization must be one of {NORMALIZATION_FORMS}, got {self.normalization!r}")
        # A bare file name: the spec must never point the service outside the artifact folder.
        if (not isinstance(self.tokenizer, str) or not self.tokenizer.endswith(".json")
                or "/" in self.tokenizer or "\\" in self.tokenizer
                or self.tokenizer.startswith(".")):
            raise SpecError(f"tokenizer must be a plain .json file name, got {self.tokenizer!r}")
        if self.tokenizer_sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.tokenizer_sha256):
            raise SpecError("tokenizer_sha256 must be 64 lowercase hex digits or empty")
        if not (isinstance(self.pad_token, str) and self.pad_token
                and isinstance(self.unk_token, str) and self.unk_token):
            raise SpecError("pad_token and unk_token must be non-empty strings")


def _check_version(version: object) -> None:
    if version not in SUPPORTED_SPEC_VERSIONS:
        raise SpecError(
            f"preprocessing spec version {version!r} is not supported by this code "
            f"(supported: {sorted(SUPPORTED_SPEC_VERSIONS)}); upgrade the server or re-export "
            "the model"
        )


def load_spec(text: str) -> ImageSpec | TextSpec:
    """Parse a spec of any kind this code knows: ``"image"`` or ``"text"``."""
    try:
        kind = json.loads(text).get("kind")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise SpecError(f"preprocessing spec is not a JSON object: {exc}") from exc
    if kind == "image":
        return ImageSpec.from_json(text)
    if kind == "text":
        return TextSpec.from_json(text)
    raise SpecError(f"unknown preprocessing spec kind {kind!r}")
