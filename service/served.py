"""One served model: its preprocessing (from the artifact's spec), its batcher, its answers:
step 3 of the request path (``service.py`` lists them all).

Transport-free: takes image bytes or strings, returns per-input predictions; ``app.py`` never
touches the model, and this module knows nothing of HTTP. ``classify`` is the path in order:

  preprocess  decode (images) or normalise + tokenize (texts) with the shared ``preprocessing``
              package, built from the artifact's spec; a bad input raises ``InputError``
  infer       queue the tensors on the batcher and await this request's rows of the batch,
              each with its OOD score (``score_call``: once per model call, in the model thread)
  answer      the per-answer steps: ``rank`` (top-k) -> ``count`` (metrics) -> ``record`` (the
              prediction log, when on; durable before the answer returns)

Documented behaviour for long text: a text over the spec's ``max_chars`` characters is refused
(``text_too_long``) before it reaches the tokenizer; a text over ``max_length`` tokens is
truncated to it, classified, and its answer says ``"truncated": true``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from modelstore.artifact import Artifact, ArtifactError
from preprocessing import (DEFAULT_MAX_PIXELS, InputError, TextPreprocessor, decode_image,
                           image_features, image_to_array, text_features)

from .batching import (NO_DEADLINE, Answered, Batcher, BatchStats, DeadlineExceeded,
                       LengthPlanner, PadCollate)
from .metrics import ModelMetrics
from .runtime import TEXT_INPUTS, Model, Outputs
from .workerboard import WORKERS

if TYPE_CHECKING:
    from monitoring.ood import OODScorer

    from .recording import PredictionRecorder

# Requests with more image bytes than this are decoded in a thread pool: a large photo takes
# tens of milliseconds to decode and resize, and on the event loop it would stall every other
# connection of the worker. Small uploads (the common case) stay inline, where a thread hop
# would cost more than the decode.
INLINE_DECODE_BYTES = 256 * 1024

logger = logging.getLogger(__name__)


class _UnderWay:
    """The requests this worker's HTTP server is handling now: uvicorn's request tasks
    (``ServerState.tasks``, one per request from its parsed headers to its answer). shedding.py
    hands the state over when the server makes its first connection; without a server (tests,
    the app called in-process) it is unknown, and taken as none.

    A request's task starts when its headers are parsed and runs on the event loop's next pass,
    so by then every request read in the same pass is counted: that is what makes "alone" in
    ``classify`` safe to run inline. A request started earlier (in the protocol's callback, say)
    would see none of those its pass has yet to read and run inline in front of them (tried:
    0.79x the requests a second at 64 connections; docs/benchmark-history.md, "A lone request,
    paired", session 23)."""

    state: Any = None

    def count(self) -> int:
        state = self.state
        return len(state.tasks) if state is not None else 0


UNDER_WAY = _UnderWay()


class Overloaded(RuntimeError):
    """The model's queue is full: the request is refused before its body is read."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.message, self.retry_after_s = message, retry_after_s


@dataclass(frozen=True)
class RequestContext:
    """What the HTTP layer knows about a request that the prediction log needs."""

    request_id: str
    slices: Mapping[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


# The JSON schema of ``Prediction.to_dict()`` (the OpenAPI document's answer; a test validates
# real answers against it).
PREDICTION_SCHEMA: dict = {
    "type": "object",
    "required": ["label", "confidence", "top_k", "ood", "ood_score"],
    "properties": {
        "label": {"type": "string", "description": "the most probable class"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1,
                       "description": "its probability"},
        "top_k": {"type": "array", "description": "the k most probable classes, best first",
                  "items": {"type": "object", "required": ["label", "probability"],
                            "properties": {"label": {"type": "string"},
                                           "probability": {"type": "number", "minimum": 0,
                                                           "maximum": 1}}}},
        "ood": {"type": "boolean",
                "description": "the input looks unlike the training data (out of distribution)"},
        "ood_score": {"type": "number", "nullable": True,
                      "description": "the OOD score (higher = stranger); null when the model "
                                     "has no reference profile"},
        "truncated": {"type": "boolean",
                      "description": "texts only: the text was cut to the model's max_length"},
    },
}


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float
    top_k: list[tuple[str, float]]
    embedding: np.ndarray
    ood: bool = False
    ood_score: float | None = None
    truncated: bool | None = None  # texts only: the text was cut to the spec's max_length
    probabilities: np.ndarray | None = None  # every label's, in label order (the v2 answer's)

    def to_dict(self) -> dict:
        out = {
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "top_k": [{"label": lab, "probability": round(p, 6)} for lab, p in self.top_k],
            "ood": self.ood,
            "ood_score": None if self.ood_score is None else round(self.ood_score, 4),
        }
        if self.truncated is not None:
            out["truncated"] = self.truncated
        return out


@dataclass(frozen=True)
class Preprocessed:
    """One request's inputs, ready for the batcher."""

    tensors: list[np.ndarray]  # an image's float32 array; a text's unpadded token ids
    features: list[dict] | None  # monitored input features, when something reads them
    truncated: list[bool] | None = None  # texts only


class Tensors(list):
    """Image inputs the client already preprocessed (the v2 ``FP32`` input): float32
    ``[C, H, W]`` arrays in the spec's shape. ``classify`` takes them past decode and the shared
    preprocessing, straight to the batcher; their log records have no input features and no raw
    input."""


class ServedModel:
    """What a served image model and a served text model share: the artifact, the batcher, the
    per-answer steps, metrics, in-flight tracking for hot reload, admission, and ``describe``.

    Admission (overload): ``admitted`` counts the items this worker has taken on and not yet
    answered, ``requests_admitted`` the requests: ``admit()`` counts a request, and one item,
    before its body is read, ``classify`` adds the rest of its inputs once they are known, and
    ``release()`` (the caller's, after the answer) takes them off again. ``admit()`` refuses
    (``Overloaded``: 503 with Retry-After) when ``max_queue_requests`` requests or
    ``max_queue_items`` items are held, or when the last model call's oldest item waited over
    half the request's deadline from its admission to the call (reading, decoding and queueing:
    a newcomer would wait as long, and risk being dropped after costing its decode); a request
    whose other inputs do not fit is refused once its body is parsed, before any of them is
    decoded (unless it is the only one held: a big request is not refused forever on an idle
    worker). Two bounds, because one bound of items cannot serve both: the requests' (64 by
    default) is what keeps a flood of one-input requests short (``tools/bench/overload.py``); the
    items' (128: that plus one request of the most inputs, 64) leaves room for such a request
    beside others. With one bound of 64 items a 64-image request was admitted only on an idle
    worker, and beside 8 connections of one-image requests 70-80% of them were refused
    (``tools.bench.bigbody``, two runs); letting it past that bound instead refused the small
    requests (59-64%) while it held the count. What is admitted then carries its deadline into
    the batcher, which drops it unanswered if the deadline passes before its model call
    (``DeadlineExceeded``: 504).
    """

    task = ""

    batcher: Batcher  # made by the subclass, reporting to ``self.metrics``

    def __init__(self, artifact: Artifact, model: Model, recorder: PredictionRecorder | None,
                 ood: OODScorer | None, max_queue_items: int = 0, solo_threads: int = 0,
                 max_queue_requests: int = 0) -> None:
        self.artifact = artifact
        self.solo_threads = solo_threads  # a solo session's threads, tried at start (> 1)
        self.labels = artifact.labels
        self.model = model
        self.recorder = recorder
        self.ood = ood
        self.metrics = ModelMetrics(artifact.name, artifact.version, artifact.spec.content_hash,
                                    model.provider)
        if ood is not None:
            self.metrics.ood_reference(ood.expected_flag_rate)
        self.ready = False
        self.inflight = 0  # requests between entry and answer; a replaced version drains to 0
        if recorder is not None:
            recorder.watch(self)  # its requests under way are records on their way
        self.max_queue_items = max_queue_items or sys.maxsize  # 0 = no bound
        self.max_queue_requests = max_queue_requests or sys.maxsize  # 0 = no bound
        self.admitted = 0  # items admitted and not yet answered (see the class doc)
        self.requests_admitted = 0  # requests admitted and not yet answered
        # requests that chose this version and are reading their body (App.read_then_admit):
        # not admitted yet, but a replaced version must not stop under them (drain)
        self.reading = 0

    @property
    def name(self) -> str:
        return self.artifact.name

    @property
    def version(self) -> str:
        return self.artifact.version

    # ---- the request path -------------------------------------------------------------------

    def admit(self, budget_s: float = NO_DEADLINE) -> None:
        """Take one request on, or raise ``Overloaded`` when this model cannot take it now (the
        bound is reached, or the queue's wait is over half ``budget_s``, the request's deadline
        in seconds: see ``refuses``). Called at the door, before the body is read, so a refusal
        costs next to nothing; every admitted request must be paired with one ``release()``, in
        a ``finally``."""
        self.check(budget_s)
        self.admitted += 1
        self.requests_admitted += 1

    def check(self, budget_s: float = NO_DEADLINE) -> None:
        """``Overloaded`` where ``admit`` would refuse now, without taking the request on: for
        one whose body is still on its way, which is admitted once its body is here
        (``App.read_then_admit``)."""
        if self.refuses(budget_s):
            self._refuse(self.admitted, 1, budget_s)

    def refuses(self, budget_s: float = NO_DEADLINE) -> bool:
        """Whether ``admit(budget_s)`` would refuse now: the bound is reached, or the queue's
        wait (the last model call's oldest item's) is over half the deadline, which leaves the
        rest for decoding, the request's own model call and the answer. Nothing held: never."""
        held = self.admitted
        return held > 0 and (held >= self.max_queue_items
                             or self.requests_admitted >= self.max_queue_requests
                             or self.batcher.queue_wait_s * 2 > budget_s)

    def recheck(self, budget_s: float) -> None:
        """For a request admitted under the default deadline whose client asked for a shorter
        one: ``Overloaded`` if the queue's wait is over half of that (it stays admitted; the
        caller's ``release()`` still follows)."""
        held = self.admitted - 1  # the others
        if held > 0 and self.batcher.queue_wait_s * 2 > budget_s:
            self._refuse(held, 1, budget_s)

    def release(self) -> None:
        """An admitted request was answered (or failed): it and its item are no longer held."""
        self.requests_admitted -= 1
        self._release_items(1)

    def _release_items(self, items: int) -> None:
        self.admitted -= items
        if not self.admitted:
            self.metrics.queue(0)

    def _refuse(self, held: int, items: int, budget_s: float) -> None:
        self.metrics.shed("overloaded")
        wait_s = self.batcher.queue_wait_s
        retry_s = min(60, max(1, math.ceil(wait_s)))
        if held + items > self.max_queue_items:
            why = (f"{held} items are admitted and not yet answered on this worker; the bound "
                   f"is {self.max_queue_items} (CLF_MAX_QUEUE_ITEMS)")
        elif self.requests_admitted >= self.max_queue_requests:
            why = (f"{self.requests_admitted} requests are admitted and not yet answered on this "
                   f"worker; the bound is {self.max_queue_requests} (CLF_MAX_QUEUE_REQUESTS)")
        else:
            why = (f"requests wait {wait_s * 1e3:.0f} ms from admission to their model call "
                   f"now, over half this request's deadline of {budget_s * 1e3:.0f} ms")
        raise Overloaded(f"{self.name} is overloaded: {why}; retry after {retry_s} s", retry_s)

    async def classify(self, inputs: Sequence[Any], top_k: int,
                       ctx: RequestContext | None = None,
                       deadline: float = NO_DEADLINE) -> list[Prediction]:
        """Answer every input; ``deadline`` (a ``time.perf_counter()`` instant) is when the
        caller stops waiting: inputs not in a model call by then are dropped."""
        extra = len(inputs) - 1  # the request itself was admitted as one item
        if extra > 0:
            held = self.admitted
            if held > 1 and held + extra > self.max_queue_items:
                self._refuse(held - 1, len(inputs), NO_DEADLINE)
            self.admitted = held + extra
        self.inflight += 1
        WORKERS.enter()
        try:
            prepared = await self.preprocess_async(inputs)
            try:
                # alone: no other request is admitted or under way here (see Batcher: it
                # may run inline)
                alone = self.admitted <= 1 and UNDER_WAY.count() <= 1
                outputs = await self.batcher.submit(prepared.tensors, deadline, alone=alone,
                                                    since=ctx.started if ctx else 0.0,
                                                    extras=prepared.features)
            except DeadlineExceeded:
                self.metrics.shed("deadline")
                raise
            return await self.answer(outputs, top_k, ctx, prepared, inputs)
        finally:
            self.inflight -= 1
            WORKERS.leave()
            if extra > 0:
                self._release_items(extra)

    def on_batch(self, stats: BatchStats) -> None:
        """The batcher's report of one model call: its metrics and the queue gauge."""
        self.metrics.queue(self.admitted)
        self.metrics.batch(stats)

    async def preprocess_async(self, inputs: Sequence[Any]) -> Preprocessed:
        return self.preprocess(inputs)

    def preprocess(self, inputs: Sequence[Any]) -> Preprocessed:
        raise NotImplementedError

    async def answer(self, outputs: Sequence[Answered], top_k: int,
                     ctx: RequestContext | None, prepared: Preprocessed,
                     inputs: Sequence[Any]) -> list[Prediction]:
        """Model outputs -> answers, recorded (committed) before they are returned. Their
        metrics are counted once the request's task next waits (``call_soon``): for a lone
        request answered without waiting (an inline call, the log off), once its answer is
        written, so the count is not part of its latency (nor is the call's, ``Batcher``)."""
        if len(outputs) == 1:  # a lone answer: views of its rows, not np.stack's copies
            probs, embeddings = outputs[0][0][None], outputs[0][1][None]
        else:
            probs = np.stack([p for p, _, _ in outputs])
            embeddings = np.stack([e for _, e, _ in outputs])
        if self.ood is None:
            scores, flags = [None] * len(outputs), [False] * len(outputs)
        else:
            scores, flags = [s for _, _, (s, _) in outputs], [f for _, _, (_, f) in outputs]
        predictions = self.rank(probs, embeddings, scores, flags, top_k, prepared.truncated)
        asyncio.get_running_loop().call_soon(self.count, predictions, flags)
        if self.recorder is not None and ctx is not None:
            await self.recorder.record(self, ctx, predictions, probs, prepared.features,
                                       self.raw_inputs(inputs))
        return predictions

    def score_call(self, out: Outputs, features: list[Mapping[str, float] | None]
                   ) -> list[tuple[float, bool]]:
        """The batcher's ``finish`` hook: the OOD score and flag of every row of one model call,
        in the model thread. The scorer's matrix products and partitions cost per row several
        times less over a call's rows together than over one answer alone (the bench-lang
        transformer's scorer on a 2-core AMD EPYC: 197 us a row alone, 78 in fours, 29 in
        sixteens). Rows from requests without input features (v2 tensors) are scored without
        the input signals, as they would be alone. A call of one row (a lone request) goes
        through ``OODScorer.score_one``, which makes fewer numpy calls on one-element arrays.
        Installed only where there is a scorer."""
        ood: OODScorer = self.ood  # type: ignore[assignment]
        if len(features) == 1:  # a lone answer, right after its call (``score_one``)
            return [ood.score_one(out.probabilities[0], out.embedding[0], features[0])]
        have = [i for i, f in enumerate(features) if f is not None]
        if len(have) in (0, len(features)):
            scores, flags = ood.score(out.probabilities, out.embedding,
                                      features if have else None)
            return list(zip(scores.tolist(), flags.tolist()))
        done: list[Any] = [None] * len(features)
        for rows, feats in ((have, [features[i] for i in have]),
                            ([i for i, f in enumerate(features) if f is None], None)):
            scores, flags = ood.score(out.probabilities[rows], out.embedding[rows], feats)
            for i, score, flag in zip(rows, scores.tolist(), flags.tolist()):
                done[i] = (score, flag)
        return done

    def rank(self, probs: np.ndarray, embeddings: np.ndarray, scores: Sequence[float | None],
             flags: Sequence[bool], top_k: int,
             truncated: Sequence[bool] | None) -> list[Prediction]:
        """The top-k labels of each row, with its OOD verdict."""
        k = min(top_k, len(self.labels))
        if k == 1:  # argmax takes the first of equal maxima, as the stable sort below does
            order = probs.argmax(axis=1)[:, None]
        else:
            order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        predictions = []
        for i, row in enumerate(order):
            top = [(self.labels[j], float(probs[i, j])) for j in row]
            predictions.append(Prediction(
                top[0][0], top[0][1], top, embeddings[i], bool(flags[i]),
                None if scores[i] is None else float(scores[i]),
                None if truncated is None else truncated[i], probs[i]))
        return predictions

    def count(self, predictions: Sequence[Prediction], flags: Sequence[bool]) -> None:
        self.metrics.flagged(int(sum(flags)))
        for p in predictions:
            self.metrics.predicted(p.label, p.confidence)

    def raw_inputs(self, inputs: Sequence[Any]) -> Sequence[bytes]:
        """The inputs as the prediction log keeps them (bytes)."""
        return inputs

    # ---- life cycle ---------------------------------------------------------------------------

    async def start(self, warmup_batches: int) -> None:
        """Start the batcher and run warm-up batches so the first user request is not the slow one."""
        self.batcher.start()
        if warmup_batches:  # one worker at a time, so no other's start-up skews the figures
            async with WORKERS.measuring():
                await self._warm_up(warmup_batches)
        self.ready = True

    async def _warm_up(self, warmup_batches: int) -> None:
        """Run the warm-up batches, then time what the batcher's choices need: a lone and a
        batched call (the inline rule) and, where it may pay, the solo session."""
        loop = asyncio.get_running_loop()
        for batch in self.warmup_batches()[:warmup_batches]:
            await loop.run_in_executor(None, self.batcher.run_sync, batch)
        one, many, items = self.calibration()
        await loop.run_in_executor(None, self.batcher.calibrate, one, many, items)
        b = self.batcher
        logger.info("%s: a one-item call %.2f ms, per item in a batch %.2f ms: %s", self.name,
                    (b.solo_s or 0) * 1e3, (b.batched_item_s or 0) * 1e3,
                    "batching pays" if b.batching_pays() else
                    "batching does not pay (a lone request on an idle model runs inline)"
                    if b.inline_pays() else "batching does not pay, but a lone call is too long "
                    "to run on the event loop (lone requests go to the model thread)")
        if (self.solo_threads > 1 and b.inline_pays()
                and getattr(self.model, "provider", "") == "CPUExecutionProvider"):
            await loop.run_in_executor(None, self._add_solo, one)

    def _add_solo(self, one: Any) -> None:
        """Give a lone request on an otherwise idle server a session on every core
        (``OnnxModel.add_solo_session``, ``workerboard.py``); the batcher uses it while it is
        measured to be faster (``Batcher.solo_pays``). ``one``: the calibration's one-item
        batch."""
        b = self.batcher
        self.model.add_solo_session(self.solo_threads)
        b.time_solo(one)
        b.solo_gate = WORKERS.alone
        logger.info("%s: a one-item call on a solo session (%d threads, spinning) "
                    "%.2f ms against %.2f ms: lone requests on an otherwise idle server start on "
                    "the %s one", self.name, self.solo_threads, b.lone_on_solo_s * 1e3,
                    b.lone_on_own_s * 1e3, "solo" if b.solo_pays() else "worker's own")

    def calibration(self) -> tuple[Any, Any, int]:
        """A one-item batch, a full batch of the same items, and its size."""
        batches = self.warmup_batches()
        return batches[0], batches[1], self.batcher.max_batch_size

    def warmup_batches(self) -> list:
        raise NotImplementedError

    async def stop(self) -> None:
        self.ready = False
        await self.batcher.stop()
        b = self.batcher
        if b.inline_calls:
            logger.info("%s: %d lone requests ran inline, %d of them on the solo session (its "
                        "recent calls %s ms, the worker's own %s ms)", self.name, b.inline_calls,
                        b.solo_calls, _ms(b.lone_on_solo_s), _ms(b.lone_on_own_s))

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) for requests that started on this version to be answered: those in
        ``classify``, those admitted to it, and those reading their body before their admission
        (they reach ``classify`` on this version after it was replaced; stopping its batcher
        before that failed them 500 "the model is stopping": 1 request in 3,222 of a hot reload
        under load, once bodies were read before admission)."""
        deadline = time.monotonic() + timeout_s
        while (self.inflight or self.admitted or self.reading) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def reject(self, reason: str) -> None:
        self.metrics.rejected(reason)

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


class ServedImageModel(ServedModel):
    task = "image-classification"

    def __init__(self, artifact: Artifact, model: Model, max_batch_size: int,
                 max_queue_delay_s: float = 0.0, max_pixels: int = DEFAULT_MAX_PIXELS,
                 recorder: PredictionRecorder | None = None, ood: OODScorer | None = None,
                 max_queue_items: int = 0, solo_threads: int = 0,
                 max_queue_requests: int = 0) -> None:
        super().__init__(artifact, model, recorder, ood, max_queue_items, solo_threads,
                         max_queue_requests)
        self.batcher = Batcher(model, max_batch_size, max_queue_delay_s, on_batch=self.on_batch,
                               finish=None if ood is None else self.score_call)
        self.max_pixels = max_pixels
        self.spec = artifact.spec
        # Features feed the prediction log and the OOD score's input-feature signal; without
        # either nothing reads them.
        self.wants_features = recorder is not None or (ood is not None and ood.reads_features)
        self._decode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")

    def warmup_batches(self) -> list:
        x = np.zeros((1, *self.spec.input_shape), dtype=np.float32)
        return [np.repeat(x, n, axis=0) for n in (1, self.batcher.max_batch_size, 8)]

    async def stop(self) -> None:
        await super().stop()
        self._decode_pool.shutdown(wait=True)

    async def preprocess_async(self, images: Sequence[bytes]) -> Preprocessed:
        if isinstance(images, Tensors):
            return Preprocessed(list(images), None)
        if sum(map(len, images)) <= INLINE_DECODE_BYTES:
            return self.preprocess(images)
        return await asyncio.get_running_loop().run_in_executor(self._decode_pool,
                                                                self.preprocess, images)

    def preprocess(self, images: Sequence[bytes]) -> Preprocessed:
        """Decode and preprocess every image (and take its monitored features when something
        reads them), or raise InputError naming the first bad one."""
        started = time.perf_counter()
        tensors: list[np.ndarray] = []
        features: list[dict] | None = [] if self.wants_features else None
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
        return Preprocessed(tensors, features)

    def raw_inputs(self, images: Sequence[Any]) -> Sequence[bytes] | None:
        return None if isinstance(images, Tensors) else images


class ServedTextModel(ServedModel):
    task = "text-classification"

    def __init__(self, artifact: Artifact, model: Model, preprocessor: TextPreprocessor,
                 max_batch_size: int, max_batch_tokens: int, max_padding: float,
                 max_queue_delay_s: float = 0.0, recorder: PredictionRecorder | None = None,
                 ood: OODScorer | None = None, max_queue_items: int = 0,
                 solo_threads: int = 0, max_queue_requests: int = 0) -> None:
        if tuple(model.input_names) != TEXT_INPUTS:
            raise ArtifactError(f"model {artifact.name} takes inputs {list(model.input_names)}; "
                                f"a text model must take {list(TEXT_INPUTS)}")
        super().__init__(artifact, model, recorder, ood, max_queue_items, solo_threads,
                         max_queue_requests)
        self.batcher = Batcher(model, max_batch_size, max_queue_delay_s, on_batch=self.on_batch,
                               plan=LengthPlanner(max_batch_tokens, max_padding),
                               collate=PadCollate(preprocessor.pad_id),
                               finish=None if ood is None else self.score_call)
        self.spec = preprocessor.spec
        self.preprocessor = preprocessor

    def calibration(self) -> tuple[Any, Any, int]:
        """One and eight mid-length texts (the same length: per item, only batching differs)."""
        collate = PadCollate(self.preprocessor.pad_id)
        row = np.full(max(1, self.spec.max_length // 4), self.preprocessor.pad_id, np.int64)
        n = min(8, self.batcher.max_batch_size)
        return collate([row]), collate([row] * n), n

    def warmup_batches(self) -> list:
        """A short, the longest and a mid-size shape."""
        collate = PadCollate(self.preprocessor.pad_id)
        full = self.spec.max_length
        shapes = [(1, min(8, full)), (min(8, self.batcher.max_batch_size), full), (8, full // 2)]
        return [collate([np.full(length, self.preprocessor.pad_id, np.int64)] * n)
                for n, length in shapes]

    def preprocess(self, texts: Sequence[Any]) -> Preprocessed:
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
        return Preprocessed(rows, features, [s.truncated for s in encoded.stats])

    def raw_inputs(self, texts: Sequence[Any]) -> Sequence[bytes]:
        return [t.encode("utf-8") for t in texts]


class Slot:
    """Holds the served model currently answering for one kind; hot reload replaces ``current``."""

    def __init__(self, current: ServedModel) -> None:
        self.current = current


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"
