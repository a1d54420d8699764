"""The BentoML service: ``bentoml serve service.service:Classifier``.

A request, in the order it travels (the bare path, prediction log off, is these six files):

  1. ``app.py``         the ASGI shell BentoML mounts at ``/v1``: exact route table, body read
                        within the size limit, error reason -> HTTP status in one table
  2. ``requests.py``    the body, query and headers parsed: images, texts, top_k, slice tags
  3. ``served.py``      the served model: preprocess -> infer -> answer (OOD score, top-k,
                        metrics, prediction log record)
  4. ``preprocessing/`` the shared preprocessing, built from the artifact's spec (``image.py``
                        decode + tensor; ``text.py`` normalise + tokenize)
  5. ``batching.py``    the adaptive batcher: this request's tensors join the next model call
  6. ``runtime.py``     the ONNX Runtime session that runs the batch

With the prediction log on, ``recording.py`` writes each answer's record before it is sent.
Around the path: ``settings.py`` (every ``CLF_*`` setting and its default), ``metrics.py``
(every Prometheus metric), ``reload.py`` (hot reload of promoted versions), ``patches.py``
(two fixes to BentoML 1.4), and this file, which builds it all.

Settings are read and validated when BentoML imports this module (a bad value stops start-up
before any worker forks); the models (image, text, or both side by side, each with its own ONNX
Runtime session and batcher) load in each worker's ``__init__``, the batchers start and warm up
in the startup hook, and ``/readyz`` answers 200 only after all of them have. Each worker also
opens the prediction log (``CLF_PREDICTION_LOG``), refreshes the drift gauges from the latest
drift report, and follows the production pointer of models named without a version.
"""

from __future__ import annotations

import gc
import logging
import os

import bentoml

from modelstore import registry
from modelstore.artifact import Artifact, load_artifact, text_preprocessor

from . import patches
from .app import App
from .metrics import DriftRefresher
from .recording import PredictionRecorder
from .reload import Reloader, tracks_production
from .runtime import TEXT_INPUTS, Model, NoopModel, OnnxModel
from .served import ServedImageModel, ServedModel, ServedTextModel, Slot
from .settings import Settings, SettingsError

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

SETTINGS = Settings.from_env()
patches.apply()  # BentoML's per-request timer leak (see patches.py); before any app is built
patches.isolate_metrics_dir()  # this server's /metrics counts this server only
api = App()
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
        self.recorder = _prediction_recorder()
        builders = {"image": lambda tag: _image_model(tag, self.recorder),
                    "text": lambda tag: _text_model(tag, self.recorder)}
        tags = {"image": SETTINGS.image_model, "text": SETTINGS.text_model}
        self.slots: dict[str, Slot] = {}
        self.reloaders: list[Reloader] = []
        for kind, tag in tags.items():
            if not tag:
                continue
            self.slots[kind] = Slot(builders[kind](_resolve(tag)))
            if tracks_production(tag) and SETTINGS.reload_interval_s > 0:
                self.reloaders.append(Reloader(
                    self.slots[kind], tag.partition(":")[0], builders[kind],
                    SETTINGS.reload_interval_s, SETTINGS.warmup_batches,
                    SETTINGS.request_timeout_s))
        self.drift = (DriftRefresher(SETTINGS.prediction_log, SETTINGS.drift_refresh_s)
                      if SETTINGS.prediction_log and SETTINGS.drift_refresh_s > 0 else None)
        api.bind(self.slots, SETTINGS,
                 prediction_log=self.recorder.store if self.recorder is not None else None)

    @property
    def image(self) -> ServedImageModel | None:
        slot = self.slots.get("image")
        return None if slot is None else slot.current

    @property
    def text(self) -> ServedTextModel | None:
        slot = self.slots.get("text")
        return None if slot is None else slot.current

    @property
    def models(self) -> list[ServedModel]:
        return [slot.current for slot in self.slots.values()]

    @bentoml.on_startup
    async def start_batcher(self) -> None:
        if self.recorder is not None:
            self.recorder.start()
        for model in self.models:
            await model.start(SETTINGS.warmup_batches)
        for reloader in self.reloaders:
            reloader.start()
        if self.drift is not None:
            self.drift.start()
        # Everything allocated so far (modules, the model, the app) lives as long as the worker:
        # move it out of the collector's view so full collections under load stay short.
        gc.collect()
        gc.freeze()
        logger.info("warm-up done; ready")

    @bentoml.on_shutdown
    async def stop_batcher(self) -> None:
        for reloader in self.reloaders:
            await reloader.stop()
        if self.drift is not None:
            await self.drift.stop()
        for model in self.models:
            await model.stop()
        if self.recorder is not None:
            await self.recorder.stop()

    def __is_ready__(self) -> bool:
        return all(model.ready for model in self.models)


def _resolve(tag: str) -> str:
    """A tag that follows production -> its production version now (latest if none yet)."""
    if not tracks_production(tag):
        return tag
    try:
        return registry.resolve(tag)
    except registry.RegistryError as exc:
        raise SettingsError(str(exc)) from None


def _prediction_recorder() -> PredictionRecorder | None:
    if not SETTINGS.prediction_log:
        return None
    from monitoring.store import PredictionLog

    store = PredictionLog(SETTINGS.prediction_log, synchronous=SETTINGS.log_synchronous,
                          max_slice_values=SETTINGS.slice_max_values)
    logger.info("prediction log: %s", store.path.resolve())
    return PredictionRecorder(store, SETTINGS.log_inputs, SETTINGS.log_input_max_bytes,
                              SETTINGS.log_input_sample)


def _model(artifact: Artifact, input_names: tuple[str, ...]) -> Model:
    if SETTINGS.runtime == "noop":
        return NoopModel(len(artifact.labels), embedding_dim=1, input_names=input_names)
    model = OnnxModel(str(artifact.onnx_path), SETTINGS.providers, SETTINGS.ort_threads)
    logger.info(
        "serving %s:%s on %s (spec %s)", artifact.name, artifact.version, model.provider,
        artifact.spec.content_hash[:12],
    )
    return model


def _ood(artifact: Artifact, model: Model):
    """The artifact's OOD scorer, calibrated on its validation profile; None (logged) when the
    profile is missing or does not match what the model returns (e.g. the no-op runtime)."""
    from monitoring.ood import fit_ood
    from monitoring.reference import load_reference

    try:
        scorer = fit_ood(load_reference(artifact.path))
    except (FileNotFoundError, KeyError, ValueError) as exc:
        logger.warning("%s:%s: no OOD flags (%s)", artifact.name, artifact.version, exc)
        return None
    dim = getattr(model, "embedding_dim", None)
    if dim is not None and dim != scorer.dim:
        logger.warning("%s:%s: no OOD flags: the model returns %d-d embeddings, the reference "
                       "profile has %d-d", artifact.name, artifact.version, dim, scorer.dim)
        return None
    return scorer


def _image_model(tag: str, recorder: PredictionRecorder | None = None) -> ServedImageModel:
    artifact = load_artifact(tag, "image")
    model = _model(artifact, ("input",))
    return ServedImageModel(
        artifact,
        model,
        max_batch_size=SETTINGS.max_batch_size,
        max_queue_delay_s=SETTINGS.max_queue_delay_ms / 1000.0,
        max_pixels=SETTINGS.max_image_pixels,
        recorder=recorder,
        ood=_ood(artifact, model),
    )


def _text_model(tag: str, recorder: PredictionRecorder | None = None) -> ServedTextModel:
    artifact = load_artifact(tag, "text")
    preprocessor = text_preprocessor(artifact)
    if SETTINGS.max_batch_tokens < preprocessor.spec.max_length:
        raise SettingsError(
            f"CLF_MAX_BATCH_TOKENS={SETTINGS.max_batch_tokens} is below {artifact.name}'s "
            f"max_length of {preprocessor.spec.max_length} tokens; raise it to at least that")
    model = _model(artifact, TEXT_INPUTS)
    return ServedTextModel(
        artifact,
        model,
        preprocessor,
        max_batch_size=SETTINGS.max_batch_size,
        max_batch_tokens=SETTINGS.max_batch_tokens,
        max_padding=SETTINGS.max_padding_fraction,
        max_queue_delay_s=SETTINGS.max_queue_delay_ms / 1000.0,
        recorder=recorder,
        ood=_ood(artifact, model),
    )
