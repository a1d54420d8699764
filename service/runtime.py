"""ONNX Runtime sessions: provider choice, threads, and the batch call the batcher makes.

An image model takes one float32 input ``[N, C, H, W]``; a text model takes int64 ``input_ids``
and ``attention_mask`` ``[N, L]``, fed as a dict. Both answer ``logits`` and ``embedding``.

Threads are set on purpose: ORT's default spins its pool threads while idle, and on a 2-core box
those spinning threads take the core the HTTP event loop needs. We size the intra-op pool to the
cores a worker owns and turn spinning off. A small model may also get *solo* sessions (every
core, spinning) for a lone request on an otherwise idle server
(``add_solo_session``, ``workerboard.py``).

On CUDA an image model runs at fixed batch sizes (``fix_batch_shapes``): ORT's CUDA convolutions
rebuild their cuDNN plans whenever the input shape differs from the call before (measured on an
H200: 115-147 ms for a one-item call after a 64-item one), and the adaptive batcher's batches
change size from call to call.

numpy's BLAS gets one thread (``limit_blas_threads``): the OOD scorer's matrix products run in
the model thread once per call, and OpenBLAS's own pool (a thread per core, spinning after each
product) took 1.1 ms of CPU a text there, three times the model's (the bench-lang transformer
at c=64 on the 2-core box: 650 texts/s against 1,420 with one BLAS thread).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Union

import numpy as np

logger = logging.getLogger(__name__)

# How long ORT's pool threads spin on after a call before they sleep (measured: 56 ms of CPU
# after one call of the reference CNN, none after that): a solo call within this time of the
# last one finds them spinning (``OnnxModel.add_solo_session``).
SOLO_SPIN_S = 0.05


class RuntimeStartError(RuntimeError):
    """The model cannot be run as configured (missing onnxruntime, provider, bad graph)."""


@dataclass
class Outputs:
    """One batch's results, row i belonging to input row i."""

    probabilities: np.ndarray  # [N, K] float32, softmax of the logits
    embedding: np.ndarray  # [N, D] float32


# One model call's input: an image batch, or a text model's named inputs.
Batch = Union[np.ndarray, dict[str, np.ndarray]]
TEXT_INPUTS = ("input_ids", "attention_mask")


class Model(Protocol):
    provider: str
    input_names: tuple[str, ...]

    def run(self, batch: Batch) -> Outputs: ...


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32, copy=False)


def resolve_providers(requested: str, available: list[str]) -> list[str]:
    """Map the ``providers`` setting to an ORT provider list, refusing what cannot be had."""
    if requested == "cpu":
        return ["CPUExecutionProvider"]
    if requested == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeStartError(
                "CLF_PROVIDERS=cuda but this onnxruntime has no CUDAExecutionProvider "
                f"(available: {available}); install the [gpu] extra (onnxruntime-gpu, not both) "
                "or set CLF_PROVIDERS=auto"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxModel:
    """An ONNX Runtime session over a classifier with outputs ``logits`` and ``embedding``."""

    def __init__(self, path: str, providers: str = "auto", intra_op_threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeStartError(
                "onnxruntime is not installed: install the [cpu] or [gpu] extra"
            ) from exc
        self._path = path
        self.intra_op_threads = intra_op_threads
        chosen = resolve_providers(providers, ort.get_available_providers())
        try:
            self._session = ort.InferenceSession(
                path, sess_options=_options(ort, intra_op_threads, spin=False), providers=chosen)
        except Exception as exc:  # ORT raises its own exception types; all mean "cannot start"
            raise RuntimeStartError(f"cannot load ONNX model {path}: {exc}") from exc
        self._solo = self._solo_stopping = None  # add_solo_session
        self._fixed: list[tuple[int, object]] = []  # fix_batch_shapes: (batch size, session)
        self._solo_ended = -math.inf  # when the last solo call returned (perf_counter)
        self.solo_threads = 0
        # ORT silently falls back to CPU when CUDA fails to initialise: report what it really uses.
        self.provider = self._session.get_providers()[0]
        names = [o.name for o in self._session.get_outputs()]
        if names[:2] != ["logits", "embedding"]:
            raise RuntimeStartError(f"model outputs are {names}; expected ['logits', 'embedding']")
        self.input_names = tuple(i.name for i in self._session.get_inputs())
        self._input = self.input_names[0]
        self.embedding_dim = int(self._session.get_outputs()[1].shape[1])
        self.num_classes = int(self._session.get_outputs()[0].shape[1])
        logger.info(
            "ONNX Runtime session: provider=%s intra_op_threads=%d model=%s",
            self.provider, intra_op_threads, path,
        )

    def run(self, batch: Batch) -> Outputs:
        if self._fixed and not isinstance(batch, dict):
            return self._run_fixed(batch)
        return self._run(self._session, batch)

    def fix_batch_shapes(self, sizes: Sequence[int]) -> None:
        """Run every image batch at one of ``sizes``: a session per size, each call padded
        with zero rows up to the smallest size that holds it (a larger batch in chunks of the
        largest), the rows beyond the batch's own dropped from the answer.

        For CUDA, where a convolution's cuDNN plans are rebuilt (and, by default, searched
        for exhaustively) each time a session sees a new input shape: a session per size
        sees one shape, searched once at warm-up. On a GPU the padding costs little (the
        reference CNN: 0.4-0.6 ms a call at 1 or 8 images, 1.0 ms at 64, measured on an
        H200). Each row's answer is its own: the models' layers do not mix rows."""
        import onnxruntime as ort

        sizes = sorted({int(n) for n in sizes if int(n) >= 1})
        if not sizes:
            raise ValueError("fix_batch_shapes needs at least one batch size >= 1")
        providers = self._session.get_providers()
        options = _options(ort, self.intra_op_threads, spin=False)
        self._fixed = [(n, self._session if n == sizes[-1] else
                        ort.InferenceSession(self._path, sess_options=options,
                                             providers=providers)) for n in sizes]
        logger.info("fixed batch shapes: %s (a session each)", ", ".join(map(str, sizes)))

    @property
    def batch_shapes(self) -> tuple[int, ...]:
        """The fixed batch sizes (``fix_batch_shapes``); empty when calls run at their own."""
        return tuple(n for n, _ in self._fixed)

    def _run_fixed(self, batch: np.ndarray) -> Outputs:
        n = len(batch)
        largest = self._fixed[-1][0]
        if n > largest:
            parts = [self._run_fixed(batch[i:i + largest]) for i in range(0, n, largest)]
            return Outputs(np.concatenate([p.probabilities for p in parts]),
                           np.concatenate([p.embedding for p in parts]))
        size, session = next((s, sess) for s, sess in self._fixed if s >= n)
        if size != n:
            padded = np.zeros((size, *batch.shape[1:]), dtype=batch.dtype)
            padded[:n] = batch
            batch = padded
        out = self._run(session, batch)
        if size == n:
            return out
        return Outputs(out.probabilities[:n], out.embedding[:n])

    def add_solo_session(self, threads: int) -> None:
        """Solo sessions over the same file for one-item calls on an otherwise idle server
        (``workerboard.py`` says when): ``threads`` intra-op threads that spin, so the few short
        parallel sections of a small model's call do not each wait for a thread to wake up.

        Two of them, for what follows a call. ORT's pool threads spin on after a call for about
        55 ms (``SOLO_SPIN_S``; measured: 56 ms of CPU after one call, nothing more after 0.1 s)
        and then sleep. A lone call within that time of the last one runs on the session that
        leaves them spinning, so back-to-back lone requests find them awake: stopped at each
        call's end instead (``session.force_spinning_stop``) they had to be woken at every call,
        and in the serving worker at c=1 on a 2-core box the solo calls took 1.4-3.4 ms (median
        of the recent ones, three server starts) against 1.0-1.5, the server answering 290-420
        against 440-450 requests/s. A lone call after a longer pause (its threads asleep
        either way) runs on the session that stops them at its end, so an isolated request does
        not leave a core spinning for 55 ms: a request every 100 ms would otherwise keep half a
        core busy. A stream of lone requests less than 50 ms apart keeps one core spinning
        while it lasts, as ORT's default sessions do. CPU only; a GPU call gains nothing."""
        import onnxruntime as ort

        def session(stop: bool):
            return ort.InferenceSession(self._path, sess_options=_options(ort, threads, True, stop),
                                        providers=["CPUExecutionProvider"])

        self._solo, self._solo_stopping = session(False), session(True)
        self._solo_ended = -math.inf
        self.solo_threads = threads

    def drop_solo_session(self) -> None:
        self._solo = self._solo_stopping = None
        self.solo_threads = 0

    @property
    def has_solo(self) -> bool:
        return self._solo is not None

    def run_solo(self, batch: Batch) -> Outputs:
        """One call on a solo session (``add_solo_session``: the one that leaves its threads
        spinning within ``SOLO_SPIN_S`` of the last solo call, the one that stops them after a
        longer pause), or on the usual one where there is none."""
        if self._solo is None:
            return self._run(self._session, batch)
        streaming = time.perf_counter() - self._solo_ended < SOLO_SPIN_S
        try:
            return self._run(self._solo if streaming else self._solo_stopping, batch)
        finally:
            self._solo_ended = time.perf_counter()

    def _run(self, session, batch: Batch) -> Outputs:
        feed = batch if isinstance(batch, dict) else {self._input: batch}
        logits, embedding = session.run(["logits", "embedding"], feed)
        return Outputs(probabilities=softmax(logits), embedding=embedding)


def cuda_batch_shapes(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes an image model runs at on CUDA (``OnnxModel.fix_batch_shapes``): up to 8
    items in one call of 8, more in one of ``max_batch_size`` (on an H200 the reference CNN took
    0.4-0.6 ms a call at 1 to 8 images and 1.0 ms at 64: smaller steps buy little)."""
    return tuple(sorted({min(8, max_batch_size), max_batch_size}))


def limit_blas_threads() -> list[dict]:
    """One thread for every BLAS library numpy (and anything else in this process) has loaded
    (see the module doc); returns what threadpoolctl found, for the log."""
    from threadpoolctl import threadpool_info, threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    return [{k: lib.get(k) for k in ("internal_api", "num_threads", "version")}
            for lib in threadpool_info() if lib.get("user_api") == "blas"]


def _options(ort, intra_op_threads: int, spin: bool, stop_spinning: bool = False):
    """Session options: ``intra_op_threads`` threads, sequential; spinning only for a solo
    session, stopped at each call's end if ``stop_spinning`` (see the module doc and
    ``add_solo_session``)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if spin and stop_spinning:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    return opts


class NoopModel:
    """Answers uniform probabilities without running anything: the request path's floor.

    Its embeddings are fixed seeded rows of the reference profile's width (``service._model``
    passes it), so the OOD scorer runs on them as it does on a model's: the floor is everything
    the server does for a request but the model call, OOD scores included."""

    provider = "noop"

    def __init__(self, num_classes: int, embedding_dim: int,
                 input_names: tuple[str, ...] = ("input",)) -> None:
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.input_names = input_names
        self._rows = np.random.default_rng(0).normal(size=(64, embedding_dim)).astype(np.float32)

    def run(self, batch: Batch) -> Outputs:
        n = len(batch["input_ids"]) if isinstance(batch, dict) else batch.shape[0]
        probs = np.full((n, self.num_classes), 1.0 / self.num_classes, dtype=np.float32)
        return Outputs(probabilities=probs, embedding=np.resize(self._rows, (n, self.embedding_dim)))
