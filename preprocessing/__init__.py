"""Shared preprocessing: raw input -> model tensors and monitored features.

Pure numpy + Pillow (+ tokenizers for text). Never imports torch, onnxruntime, bentoml or
evidently: the serving path and the training path both build on it.
"""

from .errors import REASONS, InputError
from .features import IMAGE_FEATURES, image_features
from .image import (
    ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    decode_image,
    image_to_array,
    preprocess_image_bytes,
    resize_image,
)
from .spec import SPEC_VERSION, ImageSpec, SpecError, load_spec

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_FEATURES",
    "REASONS",
    "SPEC_VERSION",
    "ImageSpec",
    "InputError",
    "SpecError",
    "decode_image",
    "image_features",
    "image_to_array",
    "load_spec",
    "preprocess_image_bytes",
    "resize_image",
]
