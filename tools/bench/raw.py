"""The raw ceiling: ONNX Runtime in this process, no HTTP, one batch call after another.

Configs, named as in the peers' bench so rows compare:
  intra2_nospin  the service's own session (``service.runtime.OnnxModel``): 2 intra-op threads,
                 spinning off. What one worker gets with CLF_WORKERS=1.
  intra1         the same with 1 thread: what each of 2 workers gets.
  intra2_spin    ORT's default spinning thread pool at 2 threads, built here directly: the
                 fastest a model call gets on this box, and the peers' ceiling.
Each (config, batch) cell: a warm-up, then ``run`` in a loop for a fixed time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from service.runtime import OnnxModel, resolve_providers

from .cpu import CpuUse, CpuWindow


@dataclass(frozen=True)
class RawConfig:
    name: str
    intra_op_threads: int
    spinning: bool


RAW_CONFIGS = (RawConfig("intra2_nospin", 2, False), RawConfig("intra1", 1, False),
               RawConfig("intra2_spin", 2, True))


@dataclass
class RawCell:
    config: str
    batch: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    calls: int
    provider: str

    def to_dict(self) -> dict:
        return asdict(self)


def time_calls(run: Callable[[np.ndarray], object], x: np.ndarray, warmup_s: float,
               seconds: float, max_calls: int = 200_000) -> tuple[float, np.ndarray]:
    """Call ``run(x)`` for ``seconds`` after a warm-up; returns (wall seconds, per-call ms)."""
    t_end = time.perf_counter() + warmup_s
    while time.perf_counter() < t_end:
        run(x)
    latencies = []
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while len(latencies) < max_calls:
        a = time.perf_counter()
        run(x)
        b = time.perf_counter()
        latencies.append(b - a)
        if b >= deadline:
            break
    return time.perf_counter() - t0, np.asarray(latencies) * 1e3


def spinning_session(onnx_path: str, providers: str, intra_op_threads: int):
    """ORT's defaults (spinning thread pool) with the peers' other options, built directly."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    chosen = resolve_providers(providers, ort.get_available_providers())
    return ort.InferenceSession(onnx_path, sess_options=opts, providers=chosen)


def make_runner(config: RawConfig, onnx_path: str, providers: str) -> tuple[Callable, str]:
    """A batch -> outputs callable for one config, and the provider ORT really uses."""
    if config.spinning:
        session = spinning_session(onnx_path, providers, config.intra_op_threads)
        name = session.get_inputs()[0].name
        provider = session.get_providers()[0]
        # an image batch is one array; a text batch is already a feed of named inputs
        return (lambda x: session.run(["logits", "embedding"],
                                      x if isinstance(x, dict) else {name: x})), provider
    model = OnnxModel(onnx_path, providers=providers, intra_op_threads=config.intra_op_threads)
    return model.run, model.provider


def bench_config(config: RawConfig, onnx_path: str, input_shape: tuple[int, ...], providers: str,
                 batches: list[int], warmup_s: float, seconds: float,
                 log: Callable[[str], None]) -> tuple[list[RawCell], CpuUse]:
    """Every batch size for one config; the CPU window covers the whole config."""
    window = CpuWindow()
    run, provider = make_runner(config, onnx_path, providers)
    rng = np.random.default_rng(0)
    cells = []
    for batch in batches:
        x = rng.standard_normal((batch, *input_shape), dtype=np.float32)
        wall, lat = time_calls(run, x, warmup_s, seconds)
        cell = RawCell(config.name, batch, len(lat) * batch / wall, float(np.percentile(lat, 50)),
                       float(np.percentile(lat, 99)), len(lat), provider)
        log(f"  [raw] {config.name:14s} batch={batch:3d} {cell.images_per_s:8.1f} img/s  "
            f"p50={cell.p50_ms:7.2f} ms  p99={cell.p99_ms:7.2f} ms  "
            f"({cell.calls} calls, {provider})")
        cells.append(cell)
    del run  # let the session and its thread pool go before the next config starts its own
    return cells, window.close()


def best_cell(cells: list[RawCell]) -> RawCell:
    """The ratio denominator: the highest images/s of the run, whatever config and batch."""
    return max(cells, key=lambda c: c.images_per_s)


def fastest_batch_call(cells: list[RawCell], batch: int) -> RawCell | None:
    """The config with the lowest p50 for one call at ``batch`` (the p99 target's yardstick)."""
    at = [c for c in cells if c.batch == batch]
    return min(at, key=lambda c: c.p50_ms) if at else None


def expected_probabilities(onnx_path: str, providers: str,
                           item: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
    """What the service must answer for one preprocessed input, an image tensor or a text's
    named token arrays (the served cells' check)."""
    model = OnnxModel(onnx_path, providers=providers, intra_op_threads=1)
    batch = {k: v[None] for k, v in item.items()} if isinstance(item, dict) else item[None]
    return model.run(batch).probabilities[0]
