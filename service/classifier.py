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

import numpy as np

from preprocessing import DEFAULT_MAX_PIXELS, InputError, preprocess_image_bytes

from .artifact import Artifact
from .batching import Batcher
from .metrics import ModelMetrics
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

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "top_k": [{"label": lab, "probability": round(p, 6)} for lab, p in self.top_k],
        }


class ImageClassifier:
    def __init__(
        self,
        artifact: Artifact,
        model: Model,
        max_batch_size: int,
        max_queue_delay_s: float = 0.0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.artifact = artifact
        self.max_pixels = max_pixels
        self.spec = artifact.spec
        self.labels = artifact.labels
        self.model = model
        self.metrics = ModelMetrics(artifact.name, artifact.version, self.spec.content_hash,
                                    model.provider)
        self.batcher = Batcher(model, max_batch_size, max_queue_delay_s, on_batch=self.metrics.batch)
        self._decode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        self.ready = False

    @property
    def name(self) -> str:
        return self.artifact.name

    @property
    def version(self) -> str:
        return self.artifact.version

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

    def preprocess(self, images: list[bytes]) -> list[np.ndarray]:
        """Decode and preprocess every image, or raise InputError naming the first bad one."""
        started = time.perf_counter()
        tensors = []
        for i, data in enumerate(images):
            try:
                tensors.append(preprocess_image_bytes(data, self.spec, self.max_pixels))
            except InputError as exc:
                prefix = f"image {i}: " if len(images) > 1 else ""
                raise InputError(exc.reason, prefix + exc.message) from None
        self.metrics.preprocessed(time.perf_counter() - started)
        return tensors

    def reject(self, reason: str) -> None:
        self.metrics.rejected(reason)

    async def classify(self, images: list[bytes], top_k: int) -> list[Prediction]:
        if sum(map(len, images)) <= INLINE_DECODE_BYTES:
            tensors = self.preprocess(images)
        else:
            loop = asyncio.get_running_loop()
            tensors = await loop.run_in_executor(self._decode_pool, self.preprocess, images)
        results = await self.batcher.submit(tensors)
        k = min(top_k, len(self.labels))
        predictions = []
        for probs, embedding in results:
            order = np.argsort(probs)[::-1][:k]
            top = [(self.labels[j], float(probs[j])) for j in order]
            predictions.append(Prediction(top[0][0], top[0][1], top, embedding))
            self.metrics.predicted(top[0][0], top[0][1])
        return predictions

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "task": "image-classification",
            "labels": list(self.labels),
            "provider": self.model.provider,
            "spec": self.spec.to_dict(),
            "spec_hash": self.spec.content_hash,
            "ready": self.ready,
        }
