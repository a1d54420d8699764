"""One served text model: its preprocessor (from the artifact's spec and tokenizer), its
length-grouping batcher, its metrics, its answers.

Transport-free like ``classifier.py``: takes strings, returns per-text answers. Documented
behaviour for long input: a text over the spec's ``max_chars`` characters is refused
(``text_too_long``, 413) before it reaches the tokenizer; a text over ``max_length`` tokens is
truncated to it, classified, and its answer says ``"truncated": true``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from preprocessing import InputError, TextPreprocessor

from .artifact import Artifact, ArtifactError
from .batching import Batcher
from .classifier import Prediction
from .metrics import ModelMetrics
from .runtime import TEXT_INPUTS, Model
from .text_batching import LengthPlanner, PadCollate


@dataclass(frozen=True)
class TextPrediction(Prediction):
    truncated: bool = False

    def to_dict(self) -> dict:
        return {**super().to_dict(), "truncated": self.truncated}


class TextClassifier:
    def __init__(
        self,
        artifact: Artifact,
        model: Model,
        preprocessor: TextPreprocessor,
        max_batch_size: int,
        max_batch_tokens: int,
        max_padding: float,
        max_queue_delay_s: float = 0.0,
    ) -> None:
        if tuple(model.input_names) != TEXT_INPUTS:
            raise ArtifactError(f"model {artifact.name} takes inputs {list(model.input_names)}; a text "
                             f"model must take {list(TEXT_INPUTS)}")
        self.artifact = artifact
        self.spec = preprocessor.spec
        self.preprocessor = preprocessor
        self.labels = artifact.labels
        self.model = model
        self.metrics = ModelMetrics(artifact.name, artifact.version, self.spec.content_hash,
                                    model.provider)
        self.batcher = Batcher(
            model, max_batch_size, max_queue_delay_s, on_batch=self.metrics.batch,
            plan=LengthPlanner(max_batch_tokens, max_padding),
            collate=PadCollate(preprocessor.pad_id),
        )
        self.ready = False

    @property
    def name(self) -> str:
        return self.artifact.name

    @property
    def version(self) -> str:
        return self.artifact.version

    async def start(self, warmup_batches: int) -> None:
        """Start the batcher and warm up at a short, the longest and a mid-size shape."""
        self.batcher.start()
        collate = PadCollate(self.preprocessor.pad_id)
        full = self.spec.max_length
        shapes = [(1, min(8, full)), (min(8, self.batcher.max_batch_size), full), (8, full // 2)]
        loop = asyncio.get_running_loop()
        for n, length in shapes[:warmup_batches]:
            batch = collate([np.full(length, self.preprocessor.pad_id, np.int64)] * n)
            await loop.run_in_executor(None, self.batcher.run_sync, batch)
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.batcher.stop()

    def preprocess(self, texts: Sequence[Any]) -> tuple[list[np.ndarray], list[bool]]:
        """Validate, normalise and tokenize every text -> unpadded id rows and truncated flags,
        or raise InputError naming the first bad text (``text 2: ...``)."""
        if not texts:
            raise InputError("empty", "the request contains no text")
        started = time.perf_counter()
        prepared = []
        for i, text in enumerate(texts):
            try:
                prepared.append(self.preprocessor.prepare(text))
            except InputError as exc:
                prefix = f"text {i}: " if len(texts) > 1 else ""
                raise InputError(exc.reason, prefix + exc.message) from None
        encoded = self.preprocessor.tokenize(prepared)
        lengths = encoded.attention_mask.sum(axis=1)
        rows = [encoded.input_ids[i, :n] for i, n in enumerate(lengths)]
        self.metrics.preprocessed(time.perf_counter() - started)
        return rows, [s.truncated for s in encoded.stats]

    def reject(self, reason: str) -> None:
        self.metrics.rejected(reason)

    async def classify(self, texts: Sequence[Any], top_k: int) -> list[TextPrediction]:
        rows, truncated = self.preprocess(texts)
        results = await self.batcher.submit(rows)
        k = min(top_k, len(self.labels))
        predictions = []
        for (probs, embedding), cut in zip(results, truncated):
            order = np.argsort(probs)[::-1][:k]
            top = [(self.labels[j], float(probs[j])) for j in order]
            predictions.append(TextPrediction(top[0][0], top[0][1], top, embedding, cut))
            self.metrics.predicted(top[0][0], top[0][1])
        return predictions

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "task": "text-classification",
            "labels": list(self.labels),
            "provider": self.model.provider,
            "spec": self.spec.to_dict(),
            "spec_hash": self.spec.content_hash,
            "ready": self.ready,
        }
