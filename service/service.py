"""The BentoML service: ``bentoml serve service.service:Classifier``.

Settings are read and validated when BentoML imports this module (a bad value stops start-up
before any worker forks); the model loads in each worker's ``__init__``, the batcher starts and
warms up in the startup hook, and ``/readyz`` answers 200 only after that.
"""

from __future__ import annotations

import gc
import logging
import os

import bentoml

from . import patches
from .api import ClassifyAPI
from .artifact import load_artifact
from .classifier import ImageClassifier
from .runtime import NoopModel, OnnxModel
from .settings import Settings

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
        artifact = load_artifact(SETTINGS.image_model)
        if SETTINGS.runtime == "noop":
            model = NoopModel(num_classes=len(artifact.labels), embedding_dim=1)
        else:
            model = OnnxModel(str(artifact.onnx_path), SETTINGS.providers, SETTINGS.ort_threads)
        logger.info(
            "serving %s:%s on %s (spec %s)", artifact.name, artifact.version, model.provider,
            artifact.spec.content_hash[:12],
        )
        self.image = ImageClassifier(
            artifact,
            model,
            max_batch_size=SETTINGS.max_batch_size,
            max_queue_delay_s=SETTINGS.max_queue_delay_ms / 1000.0,
            max_pixels=SETTINGS.max_image_pixels,
        )
        api.bind(self.image, SETTINGS.max_body_bytes, SETTINGS.max_images_per_request, SETTINGS.top_k)

    @bentoml.on_startup
    async def start_batcher(self) -> None:
        await self.image.start(SETTINGS.warmup_batches)
        # Everything allocated so far (modules, the model, the app) lives as long as the worker:
        # move it out of the collector's view so full collections under load stay short.
        gc.collect()
        gc.freeze()
        logger.info("warm-up done; ready")

    @bentoml.on_shutdown
    async def stop_batcher(self) -> None:
        await self.image.stop()

    def __is_ready__(self) -> bool:
        return self.image.ready
