"""The BentoML service: ``bentoml serve service.service:Classifier``.

Settings are read and validated when BentoML imports this module (a bad value stops start-up
before any worker forks); the models (image, text, or both side by side, each with its own ONNX
Runtime session and batcher) load in each worker's ``__init__``, the batchers start and warm up
in the startup hook, and ``/readyz`` answers 200 only after all of them have.
"""

from __future__ import annotations

import gc
import logging
import os

import bentoml

from . import patches
from .api import ClassifyAPI
from .artifact import Artifact, load_artifact, text_preprocessor
from .classifier import ImageClassifier
from .runtime import TEXT_INPUTS, Model, NoopModel, OnnxModel
from .settings import Settings, SettingsError
from .text_classifier import TextClassifier

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

SETTINGS = Settings.from_env()
patches.apply()  # BentoML's per-request timer leak (see patches.py); before any app is built
api = ClassifyAPI()
logger = logging.getLogger("service")


@bentoml.service(
    name="clfserve",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.request_timeout_s},
    logging={"access": {"enabled": False}},
    # A span per request costs ~30% of the hot path's CPU; with no exporter configured it buys
    # nothing. CLF_TRACE_REQUESTS=true traces the classify route like the rest.
    tracing={"excluded_urls": [] if SETTINGS.trace_requests else ["/v1/classify"]},
)
@bentoml.asgi_app(api, path="/v1")
class Classifier:
    def __init__(self) -> None:
        logging.getLogger("service").setLevel(SETTINGS.log_level)
        logger.info("settings: %s", SETTINGS.to_dict())
        self.image = _image_classifier(SETTINGS.image_model) if SETTINGS.image_model else None
        self.text = _text_classifier(SETTINGS.text_model) if SETTINGS.text_model else None
        self.models: list[ImageClassifier | TextClassifier] = [
            m for m in (self.image, self.text) if m is not None]
        api.bind(self.image, self.text, max_body_bytes=SETTINGS.max_body_bytes,
                 max_images=SETTINGS.max_images_per_request,
                 max_texts=SETTINGS.max_texts_per_request, top_k=SETTINGS.top_k)

    @bentoml.on_startup
    async def start_batcher(self) -> None:
        for model in self.models:
            await model.start(SETTINGS.warmup_batches)
        # Everything allocated so far (modules, the model, the app) lives as long as the worker:
        # move it out of the collector's view so full collections under load stay short.
        gc.collect()
        gc.freeze()
        logger.info("warm-up done; ready")

    @bentoml.on_shutdown
    async def stop_batcher(self) -> None:
        for model in self.models:
            await model.stop()

    def __is_ready__(self) -> bool:
        return all(model.ready for model in self.models)


def _model(artifact: Artifact, input_names: tuple[str, ...]) -> Model:
    if SETTINGS.runtime == "noop":
        return NoopModel(len(artifact.labels), embedding_dim=1, input_names=input_names)
    model = OnnxModel(str(artifact.onnx_path), SETTINGS.providers, SETTINGS.ort_threads)
    logger.info(
        "serving %s:%s on %s (spec %s)", artifact.name, artifact.version, model.provider,
        artifact.spec.content_hash[:12],
    )
    return model


def _image_classifier(tag: str) -> ImageClassifier:
    artifact = load_artifact(tag, "image")
    return ImageClassifier(
        artifact,
        _model(artifact, ("input",)),
        max_batch_size=SETTINGS.max_batch_size,
        max_queue_delay_s=SETTINGS.max_queue_delay_ms / 1000.0,
        max_pixels=SETTINGS.max_image_pixels,
    )


def _text_classifier(tag: str) -> TextClassifier:
    artifact = load_artifact(tag, "text")
    preprocessor = text_preprocessor(artifact)
    if SETTINGS.max_batch_tokens < preprocessor.spec.max_length:
        raise SettingsError(
            f"CLF_MAX_BATCH_TOKENS={SETTINGS.max_batch_tokens} is below {artifact.name}'s "
            f"max_length of {preprocessor.spec.max_length} tokens; raise it to at least that")
    return TextClassifier(
        artifact,
        _model(artifact, TEXT_INPUTS),
        preprocessor,
        max_batch_size=SETTINGS.max_batch_size,
        max_batch_tokens=SETTINGS.max_batch_tokens,
        max_padding=SETTINGS.max_padding_fraction,
        max_queue_delay_s=SETTINGS.max_queue_delay_ms / 1000.0,
    )
