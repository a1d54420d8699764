"""Every Prometheus metric the project exposes, defined in one place.

They are created lazily (``get_metrics()``) inside the worker, after BentoML has set
``PROMETHEUS_MULTIPROC_DIR``, so with several workers each writes its own file and BentoML's
``/metrics`` sums them. Label values come from small fixed sets: model names, model versions,
class labels and error reasons, never request ids or file names.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from .batching import BatchStats

logger = logging.getLogger(__name__)

NAMESPACE = "clf"

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH = (1, 2, 4, 8, 16, 32, 48, 64, 128, 256)
_CONFIDENCE = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


@dataclass(frozen=True)
class Metrics:
    predictions: object
    confidence: object
    batch_items: object
    queue_wait: object
    inference: object
    preprocess: object
    rejected: object
    shed: object
    abandoned: object
    queue_items: object
    model_info: object
    ood_flagged: object
    ood_reference: object
    log_commit: object
    log_errors: object
    log_spooled: object
    log_spooling: object
    feedback: object
    reloads: object


@lru_cache(maxsize=1)
def get_metrics() -> Metrics:
    from prometheus_client import Counter, Gauge, Histogram

    return Metrics(
        predictions=Counter(
            f"{NAMESPACE}_predictions_total",
            "Predictions served, by model, model version and predicted class.",
            ["model", "version", "predicted_class"],
        ),
        confidence=Histogram(
            f"{NAMESPACE}_prediction_confidence",
            "Top-1 probability of each served prediction.",
            ["model"],
            buckets=_CONFIDENCE,
        ),
        batch_items=Histogram(
            f"{NAMESPACE}_batch_size_items",
            "Items (images) per model call, as formed by the adaptive batcher.",
            ["model"],
            buckets=_BATCH,
        ),
        queue_wait=Histogram(
            f"{NAMESPACE}_queue_wait_seconds",
            "Time an item waited in the batch queue before its model call started.",
            ["model"],
            buckets=_FAST,
        ),
        inference=Histogram(
            f"{NAMESPACE}_inference_seconds",
            "Wall time of one model call (one batch).",
            ["model"],
            buckets=_FAST,
        ),
        preprocess=Histogram(
            f"{NAMESPACE}_preprocess_seconds",
            "Decoding and preprocessing time of one request's inputs.",
            ["model"],
            buckets=_FAST,
        ),
        rejected=Counter(
            f"{NAMESPACE}_rejected_inputs_total",
            "Requests rejected before inference, by reason.",
            ["model", "reason"],
        ),
        shed=Counter(
            f"{NAMESPACE}_shed_requests_total",
            "Requests shed under overload, by reason: overloaded (the queue bound or the "
            "deadline was reached at the door: 503 before the body was read), deadline "
            "(dropped from the queue at its deadline, before inference: 504) or body_bytes "
            "(the worker held CLF_MAX_BUFFERED_BYTES of request bodies: 503).",
            ["model", "reason"],  # overloaded | deadline | body_bytes
        ),
        abandoned=Counter(
            f"{NAMESPACE}_abandoned_requests_total",
            "Admitted requests whose client closed its connection before the answer: given up "
            "(left out of the model call if still queued; nothing answered). Not overload: a "
            "client timing out, or going away.",
            ["model"],
        ),
        queue_items=Gauge(
            f"{NAMESPACE}_queue_items",
            "Items admitted and not yet answered (being read and decoded, queued, in a model "
            "call), summed over workers; CLF_MAX_QUEUE_ITEMS bounds it per worker (and "
            "CLF_MAX_QUEUE_REQUESTS their requests). Sampled at "
            "each model call and when it drops to 0.",
            ["model"],
            multiprocess_mode="livesum",
        ),
        model_info=Gauge(
            f"{NAMESPACE}_model_info",
            "The model version a worker serves (value 1), with its preprocessing spec hash.",
            ["model", "version", "spec_hash", "provider"],
            multiprocess_mode="max",
        ),
        ood_flagged=Counter(
            f"{NAMESPACE}_ood_flagged_total",
            "Answers flagged as unlike the training data (low confidence or far from every class "
            "in embedding space); divide by clf_predictions_total for the share.",
            ["model", "version"],
        ),
        ood_reference=Gauge(
            f"{NAMESPACE}_ood_reference_rate",
            "Share of answers the OOD scorer is calibrated to flag on inputs like the training "
            "data (its validation profile); alert when the served share runs well above it.",
            ["model"],
            multiprocess_mode="mostrecent",
        ),
        log_commit=Histogram(
            f"{NAMESPACE}_prediction_log_commit_seconds",
            "Time to commit one group of records to the prediction log (one transaction).",
            buckets=_FAST,
        ),
        log_errors=Counter(
            f"{NAMESPACE}_prediction_log_errors_total",
            "Commits to the prediction log that failed (their requests answered 503).",
        ),
        log_spooled=Counter(
            f"{NAMESPACE}_prediction_log_spooled_total",
            "Records written to the replica's local spool because the PostgreSQL prediction log "
            "took no writes (CLF_LOG_SPOOL_DIR); replayed into it once it does.",
        ),
        log_spooling=Gauge(
            f"{NAMESPACE}_prediction_log_spooling",
            "1 while a worker writes its answers' records to its local spool instead of the "
            "PostgreSQL prediction log (the database takes no writes), else 0.",
            multiprocess_mode="max",
        ),
        feedback=Counter(
            f"{NAMESPACE}_feedback_labels_total",
            "Ground-truth labels received on /v1/feedback, by what they did.",
            ["result"],  # created | updated | unchanged
        ),
        reloads=Counter(
            f"{NAMESPACE}_model_reloads_total",
            "Hot reloads of a model to a newly promoted version, by outcome.",
            ["model", "result"],  # loaded | failed
        ),
    )


@lru_cache(maxsize=1)
def drift_gauges():
    """The clf_drift_* and clf_estimated_accuracy gauges of this worker
    (monitoring/exporter.py), created once."""
    from monitoring.exporter import DriftGauges

    return DriftGauges()


class ModelMetrics:
    """The project's metrics bound to one served model: what a classifier records."""

    def __init__(self, name: str, version: str, spec_hash: str, provider: str) -> None:
        metrics = get_metrics()
        self.name, self.version = name, version
        self._predictions = metrics.predictions
        self._confidence = metrics.confidence.labels(name)
        self._batch = metrics.batch_items.labels(name)
        self._wait = metrics.queue_wait.labels(name)
        self._infer = metrics.inference.labels(name)
        self._pre = metrics.preprocess.labels(name)
        self._rejected = metrics.rejected
        self._shed = {reason: metrics.shed.labels(name, reason)
                      for reason in ("overloaded", "deadline", "body_bytes")}
        self._abandoned = metrics.abandoned.labels(name)
        self._queue = metrics.queue_items.labels(name)
        self._ood = metrics.ood_flagged.labels(name, version)
        self._ood_reference = metrics.ood_reference.labels(name)
        self._info = metrics.model_info.labels(name, version, spec_hash[:12], provider)
        self._info.set(1)
        for result in ("loaded", "failed"):  # at 0 from the start: increase() sees the first
            metrics.reloads.labels(name, result)

    def ood_reference(self, rate: float) -> None:
        """The OOD flag rate expected on in-distribution inputs (the scorer's calibration)."""
        self._ood_reference.set(rate)

    def retire(self) -> None:
        """This worker no longer serves the version (hot reload replaced it)."""
        self._info.set(0)

    def flagged(self, count: int) -> None:
        if count:
            self._ood.inc(count)

    def preprocessed(self, seconds: float) -> None:
        self._pre.observe(seconds)

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self.name, reason).inc()

    def shed(self, reason: str) -> None:
        """A request refused at the door ("overloaded"), dropped at its deadline ("deadline"),
        or refused for the bodies its worker holds ("body_bytes")."""
        self._shed[reason].inc()

    def abandoned(self) -> None:
        """A request given up because its client went away (``shedding.py``)."""
        self._abandoned.inc()

    def queue(self, items: int) -> None:
        self._queue.set(items)

    def predicted(self, label: str, confidence: float) -> None:
        self._predictions.labels(self.name, self.version, label).inc()
        self._confidence.observe(confidence)

    def batch(self, stats: "BatchStats") -> None:
        """The batcher's ``on_batch`` callback."""
        self._batch.observe(stats.size)
        self._infer.observe(stats.inference_seconds)
        for wait in stats.queue_waits:
            self._wait.observe(wait)


class DriftRefresher:
    """Copies the latest drift scores (``drift_latest.json`` next to the log, written by
    ``python -m monitoring drift``) into this worker's ``clf_drift_*`` gauges and
    ``clf_estimated_accuracy{model}`` (the report's accuracy estimated without labels)
    periodically. The served ``models`` have their per-model gauges from the start: 0, and a
    last-run timestamp of 0, until their first report; the estimated accuracy NaN (so a rule
    comparing it is false) until a report has one."""

    def __init__(self, log_path: str | Path, every_s: float, models: Iterable[str] = ()) -> None:
        from monitoring.exporter import state_path_for

        self.state_path = state_path_for(log_path)
        self.every_s = every_s
        self.models = tuple(models)
        self._gauges = drift_gauges()
        self._task: asyncio.Task | None = None

    def refresh(self) -> None:
        try:
            self._gauges.refresh(self.state_path, self.models)
        except Exception:  # a half-written or foreign file must not take the worker down
            logger.exception("could not read drift state %s", self.state_path)

    def start(self) -> None:
        self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="drift-gauges")

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.every_s)
            await loop.run_in_executor(None, self.refresh)

    async def stop(self) -> None:
        from .batching import cancel_task

        await cancel_task(self._task)
