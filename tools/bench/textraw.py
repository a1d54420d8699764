"""The raw ceiling of a text model: ONNX Runtime in this process, on the bench's text mix.

The mix is tokenized once with the artifact's own ``TextPreprocessor`` (the service's code),
then cut into model calls, each padded to its own longest text (``preprocessing.pad_ids``, as
the service's batcher pads):
  batch 1           each text alone at its own length (no padding at all);
  batch B, arrival  B consecutive texts of the mix: what a first-come batcher gets;
  batch B, sorted   the mix sorted by token length, cut into B-text calls: the least padding
                    B-text calls can have, so the best the model can do at batch B.
Calls run one after another, cycling through the mix, for a fixed time; texts/s counts texts.
Session configs are ``raw.RAW_CONFIGS`` (the service's own session at 2 and 1 threads, and
ORT's spinning default), as for images, plus ``2x intra1``: two processes, each with the
service's session at 1 thread, measured at the same time and summed. That is exactly what the
server's two workers have (CLF_WORKERS=2 gives each one thread), so it is the ceiling of the
server's own session options on this machine.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from preprocessing import TextPreprocessor, pad_ids

from .cpu import CpuUse, CpuWindow
from .raw import RawCell, RawConfig, make_runner

SORTED, ARRIVAL = "sorted", "arrival"


@dataclass
class TextRawCell(RawCell):
    order: str = ARRIVAL  # how the mix was cut into calls (see the module docstring)
    padding_share: float = 0.0  # share of the calls' token slots that are padding
    mean_ms: float = 0.0  # mean per call: calls differ (short or long texts), so p50 misleads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["texts_per_s"] = d.pop("images_per_s")
        return d


def token_rows(pre: TextPreprocessor, texts: Sequence[str]) -> tuple[list[np.ndarray], list[bool]]:
    """Each text's token ids (special tokens in, truncated to max_length, unpadded), as the
    service's ``TextClassifier.preprocess`` makes them, and whether it was truncated."""
    encoded = pre.encode_batch(texts)
    lengths = encoded.attention_mask.sum(axis=1)
    rows = [encoded.input_ids[i, :n].copy() for i, n in enumerate(lengths)]
    return rows, [s.truncated for s in encoded.stats]


def plan_calls(lengths: Sequence[int], batch: int, order: str) -> list[list[int]]:
    """Indices of the texts in each model call of ``batch`` texts, cut in ``order``."""
    if batch < 1 or order not in (SORTED, ARRIVAL):
        raise ValueError(f"need batch >= 1 and order in {(SORTED, ARRIVAL)}, got {batch}, {order}")
    idx = list(range(len(lengths)))
    if order == SORTED:
        idx.sort(key=lambda i: lengths[i])  # stable: ties keep the mix's order
    return [idx[k:k + batch] for k in range(0, len(idx), batch)]


def padding_share(lengths: Sequence[int], calls: Sequence[Sequence[int]]) -> float:
    """Padding tokens over all token slots the calls feed the model (each padded to its max)."""
    slots = sum(len(c) * max(lengths[i] for i in c) for c in calls)
    real = sum(lengths[i] for c in calls for i in c)
    return 1.0 - real / slots if slots else 0.0


def make_feeds(rows: Sequence[np.ndarray], calls: Sequence[Sequence[int]], pad_id: int
               ) -> list[dict[str, np.ndarray]]:
    feeds = []
    for call in calls:
        input_ids, attention_mask = pad_ids([rows[i] for i in call], pad_id)
        feeds.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return feeds


def time_cycle(run: Callable[[dict], object], feeds: Sequence[dict], warmup_s: float,
               seconds: float) -> tuple[float, np.ndarray, int]:
    """Call ``run`` on the feeds in turn for ``seconds`` after a warm-up, stopping at the end of
    a whole pass so every text of the mix counts equally. Returns (wall s, per-call ms, texts)."""
    k, t_end = 0, time.perf_counter() + warmup_s
    while time.perf_counter() < t_end:
        run(feeds[k % len(feeds)])
        k += 1
    latencies, texts = [], 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    k = 0
    while True:
        feed = feeds[k % len(feeds)]
        a = time.perf_counter()
        run(feed)
        b = time.perf_counter()
        latencies.append(b - a)
        texts += len(feed["input_ids"])
        k += 1
        if b >= deadline and k % len(feeds) == 0:
            break
    return time.perf_counter() - t0, np.asarray(latencies) * 1e3, texts


def bench_text_config(config: RawConfig, onnx_path: str, providers: str,
                      rows: Sequence[np.ndarray], pad_id: int,
                      plans: Sequence[tuple[int, str]], warmup_s: float, seconds: float,
                      log: Callable[[str], None]) -> tuple[list[TextRawCell], CpuUse]:
    """Every (batch, order) plan for one session config; the CPU window covers the config."""
    window = CpuWindow()
    run, provider = make_runner(config, onnx_path, providers)
    lengths = [len(r) for r in rows]
    cells = []
    for batch, order in plans:
        calls = plan_calls(lengths, batch, order)
        wall, lat, texts = time_cycle(run, make_feeds(rows, calls, pad_id), warmup_s, seconds)
        cell = TextRawCell(config.name, batch, texts / wall, float(np.percentile(lat, 50)),
                           float(np.percentile(lat, 99)), len(lat), provider, order,
                           padding_share(lengths, calls), float(lat.mean()))
        log(f"  [raw] {config.name:14s} batch={batch:3d} {order:8s} {cell.images_per_s:8.1f} "
            f"texts/s  mean={cell.mean_ms:7.2f} p50={cell.p50_ms:7.2f} p99={cell.p99_ms:7.2f} "
            "ms/call  "
            f"padding {100 * cell.padding_share:4.1f}%  ({cell.calls} calls, {provider})")
        cells.append(cell)
    del run
    return cells, window.close()


def _calls_in_a_process(config: RawConfig, onnx_path: str, providers: str,
                        rows: Sequence[np.ndarray], pad_id: int,
                        plans: Sequence[tuple[int, str]], warmup_s: float, seconds: float,
                        barrier, queue) -> None:
    """One process of ``bench_text_parallel``: each plan warmed up, then timed in step with the
    other processes (the barrier), results sent back as (texts, wall s, per-call ms)."""
    run, provider = make_runner(config, onnx_path, providers)
    lengths = [len(r) for r in rows]
    out = []
    for batch, order in plans:
        feeds = make_feeds(rows, plan_calls(lengths, batch, order), pad_id)
        time_cycle(run, feeds, warmup_s, 0.0)
        barrier.wait(timeout=120)
        wall, lat, texts = time_cycle(run, feeds, 0.0, seconds)
        out.append((texts, wall, lat.tolist()))
    queue.put((provider, out))


def bench_text_parallel(config: RawConfig, processes: int, onnx_path: str, providers: str,
                        rows: Sequence[np.ndarray], pad_id: int,
                        plans: Sequence[tuple[int, str]], warmup_s: float, seconds: float,
                        log: Callable[[str], None]) -> tuple[list[TextRawCell], CpuUse]:
    """``processes`` copies of one session config running the same plans at the same time;
    texts/s is their sum. Spawned (not forked) so no ORT state is shared."""
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    args = (config, onnx_path, providers, list(rows), pad_id, list(plans), warmup_s, seconds,
            barrier, queue)
    window = CpuWindow()
    procs = [ctx.Process(target=_calls_in_a_process, args=args, daemon=True)
             for _ in range(processes)]
    for p in procs:
        p.start()
    try:
        budget = 120 + len(plans) * (warmup_s + seconds + 30)
        results = [queue.get(timeout=budget) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    cpu = window.close()
    name, provider = f"{processes}x {config.name}", results[0][0]
    lengths = [len(r) for r in rows]
    cells = []
    for k, (batch, order) in enumerate(plans):
        parts = [r[1][k] for r in results]
        lat = np.asarray([ms for _, _, ms_list in parts for ms in ms_list])
        cell = TextRawCell(name, batch, sum(t / w for t, w, _ in parts),
                           float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), len(lat),
                           provider, order, padding_share(lengths, plan_calls(lengths, batch, order)),
                           float(lat.mean()))
        log(f"  [raw] {name:14s} batch={batch:3d} {order:8s} {cell.images_per_s:8.1f} texts/s  "
            f"mean={cell.mean_ms:7.2f} p50={cell.p50_ms:7.2f} p99={cell.p99_ms:7.2f} ms/call  "
            f"padding {100 * cell.padding_share:4.1f}%  ({cell.calls} calls, {provider})")
        cells.append(cell)
    return cells, cpu


def text_plans(batches: Sequence[int]) -> list[tuple[int, str]]:
    """Batch 1 once (order does not matter), every larger batch sorted and in arrival order."""
    return [(b, o) for b in batches for o in ((ARRIVAL,) if b == 1 else (SORTED, ARRIVAL))]


def tokenize_cost_ms(pre: TextPreprocessor, texts: Sequence[str], seconds: float = 0.5) -> float:
    """Mean ms to validate, normalise and tokenize one text on its own (one text per request,
    as the served cells send them), cycling through the mix for about ``seconds``."""
    done, t0 = 0, time.perf_counter()
    while True:
        for text in texts:
            pre.encode_batch([text])
        done += len(texts)
        if time.perf_counter() - t0 >= seconds:
            return (time.perf_counter() - t0) * 1e3 / done
