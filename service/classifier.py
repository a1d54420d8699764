"""One served image model: preprocessing from its spec, its batcher, its metrics, its answers.

Transport-free: takes image bytes, returns per-image answers. The HTTP layer (``api.py``) never
touches the model, and this module knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from monitoring.ood import OODScorer
from monitoring.store import PredictionRecord
from preprocessing import (DEFAULT_MAX_PIXELS, InputError, decode_image, image_features,
                           image_to_array)

from .artifact import Artifact
from .batching import Batcher
from .metrics import ModelMetrics
from .monitor import PredictionLogger, RequestContext
from .runtime import Model

logger = logging.getLogger(__name__)

# Requests with more image bytes than this are decoded in a thread pool: a large photo takes
# tens of milliseconds to decode and resize, and on the event loop it would stall every other
# connection of the worker. Small uploads (the common case) stay inline, where a thread hop
# would cost more than the decode.
INLINE_DECODE_BYTES = 256 * 1024


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float
    top_k: list[tuple[str, float]]
    embedding: np.ndarray
    ood: bool = False
    ood_score: float | None = None

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "top_k": [{"label": lab, "probability": round(p, 6)} for lab, p in self.top_k],
            "ood": self.ood,
            "ood_score": None if self.ood_score is None else round(self.ood_score, 4),
        }


class BaseClassifier:
    """What the image and the text classifier share: the artifact, metrics, OOD flags, the
    prediction log, in-flight tracking for hot reload, and ``describe``."""

    task = ""

    def __init__(self, artifact: Artifact, model: Model, log: PredictionLogger | None,
                 ood: OODScorer | None) -> None:
        self.artifact = artifact
        self.labels = artifact.labels
        self.model = model
        self.log = log
        self.ood = ood
        self.metrics = ModelMetrics(artifact.name, artifact.version, artifact.spec.content_hash,
                                    model.provider)
        self.ready = False
        self.inflight = 0  # requests between entry and answer; a replaced version drains to 0

    @property
    def name(self) -> str:
        return self.artifact.name

    @property
    def version(self) -> str:
        return self.artifact.version

    def reject(self, reason: str) -> None:
        self.metrics.rejected(reason)

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) for requests that started on this version to be answered."""
        deadline = time.monotonic() + timeout_s
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _answer(self, results: Sequence[tuple[np.ndarray, np.ndarray]], top_k: int,
                      ctx: RequestContext | None, features: Sequence[dict] | None,
                      inputs: Sequence[bytes] | None, extra: Sequence[dict] | None = None,
                      ) -> list[Any]:
        """Model outputs -> answers; logged (committed) before they are returned."""
        probs = np.stack([p for p, _ in results])
        embeddings = np.stack([e for _, e in results])
        if self.ood is not None:
            scores, flags = self.ood.score(probs, embeddings, features)
            self.metrics.flagged(int(flags.sum()))
        else:
            scores, flags = [None] * len(results), [False] * len(results)
        k = min(top_k, len(self.labels))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        predictions = []
        for i, row in enumerate(order):
            top = [(self.labels[j], float(probs[i, j])) for j in row]
            score = None if scores[i] is None else float(scores[i])
            predictions.append(self._prediction(
                top[0][0], top[0][1], top, embeddings[i], bool(flags[i]), score,
                **(extra[i] if extra else {})))
            self.metrics.predicted(top[0][0], top[0][1])
        if self.log is not None and ctx is not None:
            now, latency = time.time(), (time.perf_counter() - ctx.started) * 1000.0
            sampled = self.log.sampled(ctx.request_id)
            await self.log.write([
                PredictionRecord(
                    request_id=ctx.request_id, item=i, ts=now, model=self.name,
                    version=self.version, predicted=p.label, confidence=p.confidence,
                    probabilities=probs[i], embedding=embeddings[i],
                    features=features[i] if features else {}, slices=ctx.slices,
                    latency_ms=latency, ood=p.ood, ood_score=p.ood_score,
                    input=self.log.keep(inputs[i], sampled) if inputs else None)
                for i, p in enumerate(predictions)])
        return predictions

    def _prediction(self, *args: Any, **extra: Any) -> Prediction:
        return Prediction(*args, **extra)

    def retire(self) -> None:
        self.metrics.retire()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "labels": list(self.labels),
            "provider": self.model.provider,
            "spec": self.artifact.spec.to_dict(),
            "spec_hash": self.artifact.spec.content_hash,
            "ood_flags": self.ood is not None,
            "ready": self.ready,
        }


class ImageClassifier(BaseClassifier):
    task = "image-classification"

    def __init__(
        self,
        artifact: Artifact,
        model: Model,
        max_batch_size: int,
        max_queue_delay_s: float = 0.0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        log: PredictionLogger | None = None,
        ood: OODScorer | None = None,
    ) -> None:
        super().__init__(artifact, model, log, ood)
        self.max_pixels = max_pixels
        self.spec = artifact.spec
        self.batcher = Batcher(model, max_batch_size, max_queue_delay_s, on_batch=self.metrics.batch)
        self._decode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")

    async def start(self, warmup_batches: int) -> None:
        """Start the batcher and run warm-up batches so the first user request is not the slow one."""
        self.batcher.start()
        x = np.zeros((1, *self.spec.input_shape), dtype=np.float32)
        for size in [1, self.batcher.max_batch_size, 8][:warmup_batches]:
            batch = np.repeat(x, size, axis=0)
            await asyncio.get_running_loop().run_in_executor(None, self.batcher.run_sync, batch)
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.batcher.stop()
        self._decode_pool.shutdown(wait=True)

    def preprocess(self, images: list[bytes]) -> tuple[list[np.ndarray], list[dict] | None]:
        """Decode and preprocess every image (and, when logging, take its monitored features),
        or raise InputError naming the first bad one."""
        started = time.perf_counter()
        tensors, features = [], [] if self.log is not None else None
        for i, data in enumerate(images):
            try:
                img = decode_image(data, self.spec, self.max_pixels)
                tensors.append(image_to_array(img, self.spec))
            except InputError as exc:
                prefix = f"image {i}: " if len(images) > 1 else ""
                raise InputError(exc.reason, prefix + exc.message) from None
            if features is not None:
                features.append(image_features(img))
        self.metrics.preprocessed(time.perf_counter() - started)
        return tensors, features

    async def classify(self, images: list[bytes], top_k: int,
                       ctx: RequestContext | None = None) -> list[Prediction]:
        self.inflight += 1
        try:
            if sum(map(len, images)) <= INLINE_DECODE_BYTES:
                tensors, features = self.preprocess(images)
            else:
                loop = asyncio.get_running_loop()
                tensors, features = await loop.run_in_executor(self._decode_pool, self.preprocess,
                                                               images)
            results = await self.batcher.submit(tensors)
            return await self._answer(results, top_k, ctx, features, images)
        finally:
            self.inflight -= 1
