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
(every Prometheus metric), ``v2.py`` (the Open Inference Protocol v2 routes on the same app,
mounted at ``/v2``), ``reload.py`` (hot reload of promoted versions), ``lifecycle.py``
(start-up checks and the graceful stop), ``patches.py`` (fixes to BentoML 1.4 and the servers
under it), and this file, which builds it all.

Settings are read and validated when BentoML imports this module, and in the ``bentoml serve``
process every configured model is loaded once (``_preflight``) before any worker starts: a bad
value, a missing model or one that cannot load prints ``error: <reason>`` and exits 2. The models
(image, text, or both side by side, each with its own ONNX Runtime session and batcher) load in
each worker's ``__init__``, the batchers start and warm up in the startup hook, and ``/readyz``
answers 200 only after all of them have. Each worker also opens the prediction log
(``CLF_PREDICTION_LOG``), refreshes the drift gauges from the latest drift report, and follows
the production pointer of models named without a version. On SIGTERM each worker drains
(``/readyz`` 503, requests on their way answered and logged, new connections 503
``shutting_down``) within ``CLF_DRAIN_TIMEOUT_S``; see lifecycle.py.
"""

from __future__ import annotations

import gc
import logging
import os
import socket

import bentoml

from modelstore import registry
from modelstore.artifact import Artifact, ArtifactError, load_artifact, text_preprocessor
from preprocessing import TextPreprocessor

from . import lifecycle, listeners, logformat, openapi, patches, rootapp, shedding, v2
from .app import MOUNT_PREFIXES, App, OverloadShortcut
from .metrics import DriftRefresher, get_metrics
from .recording import PredictionRecorder
from .reload import Reloader, tracks_production
from .runtime import (TEXT_INPUTS, Model, NoopModel, OnnxModel, cuda_batch_shapes,
                      limit_blas_threads, resolve_providers)
from .served import ServedImageModel, ServedModel, ServedTextModel, Slot
from .settings import Settings, SettingsError
from .workerboard import WORKERS

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

ROLE = lifecycle.role()  # "parent" (`bentoml serve`), "worker" or "library" (see lifecycle.py)
SETTINGS = lifecycle.check_before_start(ROLE, Settings.from_env)
if ROLE != "library":
    logformat.install(SETTINGS.log_format)  # CLF_LOG_FORMAT=json: one JSON object a line
patches.apply()  # BentoML's per-request timer leak (see patches.py); before any app is built
patches.isolate_metrics_dir()  # this server's /metrics counts this server only
# /docs.json valid OpenAPI 3.0, with this service's info (not BentoML's badges and contact)
patches.fix_openapi_document(openapi.info("clfserve", v2.server_version(), SETTINGS))
# the docs page at / without BentoML's Google Tag Manager; errors outside /v1 and /v2 in JSON
rootapp.install("clfserve", v2.server_version())
api = App(SETTINGS)
# What BentoML mounts: per prefix, a FastAPI app that documents the route table's routes under it
# (so /docs.json and the Swagger UI at / list them) and hands every request to ``api``.
MOUNTS = openapi.build_mounts(api, MOUNT_PREFIXES, title="clfserve", version="1")
logger = logging.getLogger("service")


@bentoml.service(
    name="clfserve",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.request_timeout_s},
    logging={"access": {"enabled": False}},
    # A span per request costs a large share of the hot path's CPU (docs/benchmark-history.md,
    # "Earlier runs"); with no exporter configured it buys nothing. CLF_TRACE_REQUESTS=true traces
    # the classify route like the rest (and the v2 infer route, regex).
    tracing={"excluded_urls": [] if SETTINGS.trace_requests else
             ["/v1/classify", r"/v2/models/[^/]+(?:/versions/[^/]+)?/infer"]},
)
# the last mount (decorators apply bottom-up): GET /v2 exactly (see v2.root_app)
@bentoml.asgi_app(v2.root_app(api), path="/")
@bentoml.asgi_app(MOUNTS[0], path="/v1")
@bentoml.asgi_app(MOUNTS[1], path="/v2")
class Classifier:
    def __init__(self) -> None:
        # A worker that cannot load what the settings name stops the server (lifecycle.py).
        lifecycle.check_before_start(ROLE, self._load)

    def _load(self) -> None:
        logging.getLogger("service").setLevel(SETTINGS.log_level)
        logger.info("settings: %s", SETTINGS.to_dict())
        for line in SETTINGS.advice():
            logger.warning("settings: %s", line)
        logger.info("numpy's BLAS: %s", limit_blas_threads())
        if ROLE == "worker":
            listeners.raise_open_files_limit()  # each connection holds a file descriptor
            from modelstore._bentoml import worker_index

            # the server's own directory (patches.isolate_metrics_dir), shared by its workers;
            # opened before the models load, so the others wait for this one (``measuring``)
            WORKERS.open(os.environ.get("PROMETHEUS_MULTIPROC_DIR"), worker_index(),
                         SETTINGS.workers)
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
        self.drift = (DriftRefresher(SETTINGS.prediction_log, SETTINGS.drift_refresh_s,
                                     [slot.current.name for slot in self.slots.values()])
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
        try:
            await self._start()
        except Exception as exc:
            if ROLE != "worker":
                raise
            lifecycle.worker_cannot_start(exc)

    async def _start(self) -> None:
        if ROLE == "worker":
            lifecycle.exit_with_the_arbiter()
        # Loaded, and BentoML's app around the service built: the other workers may time their
        # models now (``WORKERS.measuring``, which waits for every worker to get here).
        WORKERS.mark_loaded()
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
        WORKERS.close()

    def __is_ready__(self) -> bool:
        # 503 from the moment SIGTERM reaches this worker (lifecycle.py)
        return not lifecycle.DRAIN.active and all(model.ready for model in self.models)


# Under overload, a classify request to a full model is refused in front of BentoML's own
# middlewares (app.py OverloadShortcut): most of a refusal's cost otherwise.
Classifier.add_asgi_middleware(OverloadShortcut, api=api)
SHORTCUT_FIRST = patches.run_first(OverloadShortcut)


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
    from monitoring.store import LogOpenError, display_target, open_log

    options = {"max_slice_values": SETTINGS.slice_max_values}
    if SETTINGS.prediction_log.startswith(("postgresql://", "postgres://")):
        options["pool_size"] = SETTINGS.log_pool_size
        options["spool_dir"] = SETTINGS.log_spool_dir or None
        options["spool_max_bytes"] = SETTINGS.log_spool_max_mb << 20
        if SETTINGS.log_pg_journal:  # answers durable in the spool, indexed every interval
            options.update(journal=True, spool_retry_s=SETTINGS.log_index_ms / 1000.0)
    else:  # SQLite: checkpoints off the commits the answers wait on (sqlite_log._Checkpointer)
        options.update(synchronous=SETTINGS.log_synchronous, background_checkpoints=True)
        if SETTINGS.log_index_ms > 0:  # answers durable in a journal (monitoring/journal.py)
            options.update(journal=True, index_interval_s=SETTINGS.log_index_ms / 1000.0,
                           on_index_error=lambda exc: get_metrics().log_errors.inc())
    try:
        store = open_log(SETTINGS.prediction_log, **options)
    except LogOpenError as exc:
        raise SettingsError(f"CLF_PREDICTION_LOG={display_target(SETTINGS.prediction_log)!r} "
                            f"cannot be opened: {exc}") from None
    replica = SETTINGS.replica or socket.gethostname()
    logger.info("prediction log: %s (%s), rows tagged replica=%s", store.target, store.backend,
                replica)
    return PredictionRecorder(store, SETTINGS.log_inputs, SETTINGS.log_input_max_bytes,
                              SETTINGS.log_input_sample, replica=replica,
                              group_wait_s=SETTINGS.log_group_wait_ms / 1000.0)


def _model(artifact: Artifact, input_names: tuple[str, ...]) -> Model:
    if SETTINGS.runtime == "noop":
        return NoopModel(len(artifact.labels), _embedding_dim(artifact), input_names)
    model = OnnxModel(str(artifact.onnx_path), SETTINGS.providers, SETTINGS.ort_threads)
    logger.info(
        "serving %s:%s on %s (spec %s)", artifact.name, artifact.version, model.provider,
        artifact.spec.content_hash[:12],
    )
    return model


def _embedding_dim(artifact: Artifact) -> int:
    """The width of the version's embeddings, from its reference profile (1 without one): what
    the no-op runtime returns, so that the OOD scorer runs in the floor too."""
    from monitoring.reference import load_reference

    try:
        return int(load_reference(artifact.path).embeddings.shape[1])
    except (FileNotFoundError, KeyError, ValueError):
        return 1


def _ood(artifact: Artifact, model: Model):
    """The artifact's OOD scorer, calibrated on its validation profile; None (logged) when the
    profile is missing or does not match what the model returns."""
    from monitoring.ood import fit_ood
    from monitoring.reference import load_reference

    try:
        scorer = (fit_ood(load_reference(artifact.path)) if SETTINGS.ood_input_features
                  else fit_ood(load_reference(artifact.path), feature_quantile=None))
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
    if isinstance(model, OnnxModel) and model.provider == "CUDAExecutionProvider":
        model.fix_batch_shapes(cuda_batch_shapes(SETTINGS.max_batch_size))  # runtime.py says why
    return ServedImageModel(
        artifact,
        model,
        max_batch_size=SETTINGS.max_batch_size,
        max_queue_delay_s=SETTINGS.max_queue_delay_ms / 1000.0,
        max_queue_items=SETTINGS.max_queue_items,
        max_queue_requests=SETTINGS.max_queue_requests,
        max_pixels=SETTINGS.max_image_pixels,
        recorder=recorder,
        ood=_ood(artifact, model),
        solo_threads=SETTINGS.solo_session_threads,
    )


def _text_preprocessor(artifact: Artifact) -> TextPreprocessor:
    """The artifact's tokenizer and spec, once checked to fit CLF_MAX_BATCH_TOKENS."""
    preprocessor = text_preprocessor(artifact)
    if SETTINGS.max_batch_tokens < preprocessor.spec.max_length:
        raise SettingsError(
            f"CLF_MAX_BATCH_TOKENS={SETTINGS.max_batch_tokens} is below {artifact.name}'s "
            f"max_length of {preprocessor.spec.max_length} tokens; raise it to at least that")
    return preprocessor


def _text_model(tag: str, recorder: PredictionRecorder | None = None) -> ServedTextModel:
    artifact = load_artifact(tag, "text")
    preprocessor = _text_preprocessor(artifact)
    model = _model(artifact, TEXT_INPUTS)
    return ServedTextModel(
        artifact,
        model,
        preprocessor,
        max_batch_size=SETTINGS.max_batch_size,
        max_batch_tokens=SETTINGS.max_batch_tokens,
        max_padding=SETTINGS.max_padding_fraction,
        max_queue_delay_s=SETTINGS.max_queue_delay_ms / 1000.0,
        max_queue_items=SETTINGS.max_queue_items,
        max_queue_requests=SETTINGS.max_queue_requests,
        recorder=recorder,
        ood=_ood(artifact, model),
        solo_threads=SETTINGS.solo_session_threads,
    )


def _preflight() -> None:
    """What every worker will load, checked once in the serving parent before any worker starts
    (lifecycle.py): each configured tag resolved, its artifact and spec read, a text model's
    tokenizer built (and CLF_MAX_BATCH_TOKENS checked against it), its ONNX graph opened and run
    once on an input of its spec's shape, then dropped. The session is a CPU one, so the parent
    holds no GPU memory; CLF_PROVIDERS=cuda on an onnxruntime without CUDA is refused here too."""
    for kind, tag in (("image", SETTINGS.image_model), ("text", SETTINGS.text_model)):
        if not tag:
            continue
        artifact = load_artifact(_resolve(tag), kind)
        preprocessor = _text_preprocessor(artifact) if kind == "text" else None
        if SETTINGS.runtime == "onnx":
            _check_graph(artifact, preprocessor)
        logger.info("start-up check: %s %s:%s loads", kind, artifact.name, artifact.version)


def _check_graph(artifact: Artifact, preprocessor: TextPreprocessor | None) -> None:
    import numpy as np
    import onnxruntime

    resolve_providers(SETTINGS.providers, onnxruntime.get_available_providers())
    runtime_log = logging.getLogger(OnnxModel.__module__)
    level = runtime_log.level
    runtime_log.setLevel(logging.WARNING)  # "session on CPU" would read as a serving choice
    try:
        model = OnnxModel(str(artifact.onnx_path), "cpu", 1)
    finally:
        runtime_log.setLevel(level)
    if preprocessor is None:
        sample = np.zeros((1, *artifact.spec.input_shape), dtype=np.float32)
    else:
        sample = {name: np.ones((1, 8), dtype=np.int64) for name in model.input_names}
    try:
        model.run(sample)
    except Exception as exc:  # ORT's own exception types: the graph does not fit the spec
        raise ArtifactError(
            f"model {artifact.name}:{artifact.version} cannot be served: its graph does not run "
            f"on its spec's input ({' '.join(str(exc).split())})") from None


# Start-up and stop (lifecycle.py): the parent checks what the workers will load before it starts
# any, and stops them gracefully; each worker drains on SIGTERM. Each worker listens on a socket
# of its own (listeners.py), which the parent holds the address for.
if ROLE == "parent":
    lifecycle.check_before_start(ROLE, _preflight)
    lifecycle.mark_parent()
    patches.stop_arbiter_gracefully(SETTINGS.drain_timeout_s, lifecycle.exit_if_a_worker_failed)
    listeners.install_in_arbiter(SETTINGS.reuseport, lifecycle.refuse)
elif ROLE == "worker":
    patches.drain_on_stop(SETTINGS.drain_timeout_s)
    listeners.install_in_worker(SETTINGS.reuseport)
    # most refusals in uvicorn's protocol, before ASGI; what it admits takes the fast lane
    shedding.install(api, SHORTCUT_FIRST, SETTINGS.fast_lane, SETTINGS.max_header_bytes,
                     SETTINGS.request_timeout_s)
