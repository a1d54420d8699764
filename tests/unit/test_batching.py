from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batching import Batcher, BatchError
from service.runtime import NoopModel, Outputs, resolve_providers, softmax


class EchoModel:
    """Row i's probability vector is [x_i, batch size]: answers are checkable after batching."""

    provider = "test"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def run(self, batch: np.ndarray) -> Outputs:
        self.gate.wait(5)
        self.calls.append(len(batch))
        time.sleep(self.delay)
        n = len(batch)
        probs = np.stack([batch[:, 0], np.full(n, n, np.float32)], axis=1)
        return Outputs(probs, np.zeros((n, 1), np.float32))


def _run(coro):
    return asyncio.run(coro)


def test_every_item_gets_its_own_row_back_across_batches():
    model = EchoModel(delay=0.01)

    async def main():
        batcher = Batcher(model, max_batch_size=8)
        batcher.start()
        results = await asyncio.gather(*[batcher.submit([np.array([float(i)], np.float32)]) for i in range(50)])
        await batcher.stop()
        return results

    results = _run(main())
    assert [float(r[0][0][0]) for r in results] == [float(i) for i in range(50)]
    assert max(model.calls) <= 8 and max(model.calls) > 1 and sum(model.calls) == 50


def test_a_lone_request_is_not_held_back():
    model = EchoModel()

    async def main():
        batcher = Batcher(model, max_batch_size=64)
        batcher.start()
        t0 = time.perf_counter()
        await batcher.submit([np.zeros(1, np.float32)])
        elapsed = time.perf_counter() - t0
        await batcher.stop()
        return elapsed

    _run(main())
    assert model.calls == [1]


def test_queue_delay_gathers_company_but_is_bounded_from_the_oldest_arrival():
    model = EchoModel()

    async def main():
        batcher = Batcher(model, max_batch_size=64, max_queue_delay_s=0.05)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([np.zeros(1, np.float32)]))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(batcher.submit([np.ones(1, np.float32)]))
        await asyncio.gather(first, second)
        await batcher.stop()

    _run(main())
    assert model.calls == [2]


class WrongLength(EchoModel):
    def run(self, batch):
        out = super().run(batch)
        return Outputs(out.probabilities[:-1], out.embedding[:-1])


class Exploding(EchoModel):
    def run(self, batch):
        raise RuntimeError("boom")


@pytest.mark.parametrize("model, words", [(WrongLength(), "rows for a batch"), (Exploding(), "boom")])
def test_a_failed_batch_fails_every_item_and_the_batcher_goes_on(model, words):
    async def main():
        batcher = Batcher(model, max_batch_size=4)
        batcher.start()
        with pytest.raises(BatchError, match=words):
            await batcher.submit([np.zeros(1, np.float32), np.ones(1, np.float32)])
        batcher.model = EchoModel()
        ok = await batcher.submit([np.full(1, 3.0, np.float32)])
        await batcher.stop()
        return ok

    assert float(_run(main())[0][0][0]) == 3.0


def test_softmax_rows_sum_to_one_and_noop_shapes():
    p = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]], np.float32))
    assert np.allclose(p.sum(axis=1), 1) and p[0, 0] == pytest.approx(1.0)
    out = NoopModel(num_classes=5, embedding_dim=3).run(np.zeros((4, 1), np.float32))
    assert out.probabilities.shape == (4, 5) and out.embedding.shape == (4, 3)


def test_provider_resolution():
    assert resolve_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert resolve_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == "CUDAExecutionProvider"
    assert resolve_providers("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="no CUDAExecutionProvider"):
        resolve_providers("cuda", ["CPUExecutionProvider"])
