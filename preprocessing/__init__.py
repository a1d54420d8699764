"""Shared preprocessing: raw input -> model tensors and monitored features.

Pure numpy + Pillow (+ tokenizers for text). Never imports torch, onnxruntime, bentoml or
evidently: the serving path and the training path both build on it.
"""

from .errors import REASONS, InputError
from .features import IMAGE_FEATURES, TEXT_FEATURES, image_features, text_features
from .image import (
    ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    decode_image,
    image_to_array,
    preprocess_image_bytes,
    resize_image,
)
from .spec import SPEC_VERSION, ImageSpec, SpecError, TextSpec, load_spec
from .text import (EncodedBatch, TextPreprocessor, TokenStats, decode_text, normalize_text,
                   pad_ids)

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_FEATURES",
    "REASONS",
    "SPEC_VERSION",
    "TEXT_FEATURES",
    "EncodedBatch",
    "ImageSpec",
    "InputError",
    "SpecError",
    "TextPreprocessor",
    "TextSpec",
    "TokenStats",
    "decode_image",
    "decode_text",
    "image_features",
    "image_to_array",
    "load_spec",
    "normalize_text",
    "pad_ids",
    "preprocess_image_bytes",
    "resize_image",
    "text_features",
]
