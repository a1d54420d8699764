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

from monitoring.ood import OODScorer
from preprocessing import InputError, TextPreprocessor, text_features

from .artifact import Artifact, ArtifactError
from .batching import Batcher
from .classifier import BaseClassifier, Prediction
from .monitor import PredictionLogger, RequestContext
from .runtime import TEXT_INPUTS, Model
from .text_batching import LengthPlanner, PadCollate


@dataclass(frozen=True)
class TextPrediction(Prediction):
    truncated: bool = False

    def to_dict(self) -> dict:
        return {**super().to_dict(), "truncated": self.truncated}


class TextClassifier(BaseClassifier):
    task = "text-classification"

    def __init__(
        self,
        artifact: Artifact,
        model: Model,
        preprocessor: TextPreprocessor,
        max_batch_size: int,
        max_batch_tokens: int,
        max_padding: float,
        max_queue_delay_s: float = 0.0,
        log: PredictionLogger | None = None,
        ood: OODScorer | None = None,
    ) -> None:
        if tuple(model.input_names) != TEXT_INPUTS:
            raise ArtifactError(f"model {artifact.name} takes inputs {list(model.input_names)}; a text "
                             f"model must take {list(TEXT_INPUTS)}")
        super().__init__(artifact, model, log, ood)
        self.spec = preprocessor.spec
        self.preprocessor = preprocessor
        self.batcher = Batcher(
            model, max_batch_size, max_queue_delay_s, on_batch=self.metrics.batch,
            plan=LengthPlanner(max_batch_tokens, max_padding),
            collate=PadCollate(preprocessor.pad_id),
        )

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

    def preprocess(self, texts: Sequence[Any]
                   ) -> tuple[list[np.ndarray], list[bool], list[dict] | None]:
        """Validate, normalise and tokenize every text -> unpadded id rows, truncated flags and
        monitored features, or raise InputError naming the first bad text."""
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
        # Always: the OOD flag reads them too (a few microseconds per text).
        features = [text_features(t, st) for t, st in zip(texts, encoded.stats)]
        self.metrics.preprocessed(time.perf_counter() - started)
        return rows, [s.truncated for s in encoded.stats], features

    async def classify(self, texts: Sequence[Any], top_k: int,
                       ctx: RequestContext | None = None) -> list[TextPrediction]:
        self.inflight += 1
        try:
            rows, truncated, features = self.preprocess(texts)
            results = await self.batcher.submit(rows)
            inputs = [t.encode("utf-8") for t in texts] if self.log is not None else None
            return await self._answer(results, top_k, ctx, features, inputs,
                                      [{"truncated": cut} for cut in truncated])
        finally:
            self.inflight -= 1

    def _prediction(self, *args: Any, **extra: Any) -> TextPrediction:
        return TextPrediction(*args, **extra)
