from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batching import (SOLO_OWN_PROBE_S, SOLO_RETURN_BURST, SOLO_WINDOW, Batcher,
                               BatchError, RecentTimes, _stacked)
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


class ThreadModel(EchoModel):
    """EchoModel that remembers which thread ran each call."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(delay)
        self.threads: list[str] = []

    def run(self, batch: np.ndarray) -> Outputs:
        self.threads.append(threading.current_thread().name)
        return super().run(batch)


def test_a_lone_request_on_an_idle_fast_model_runs_on_the_event_loop():
    model = ThreadModel()
    stats = []

    async def main():
        batcher = Batcher(model, max_batch_size=64, on_batch=stats.append)
        batcher.start()
        first = await batcher.submit([np.array([1.0], np.float32)])  # measured by the thread
        assert batcher.solo_s is not None
        assert batcher.batching_pays()  # not calibrated: assume it pays
        batcher.calibrate(np.zeros((1, 1), np.float32), np.zeros((64, 1), np.float32), 64)
        batcher.batched_item_s = batcher._calibrated_solo_s  # the reference CNN on a CPU
        assert not batcher.batching_pays()
        del model.threads[1:]  # calibrate ran in this thread (the service runs it in a worker)
        await asyncio.sleep(0.05)  # the model thread is waiting for work again
        second = await batcher.submit([np.array([2.0], np.float32)], alone=True)
        counted_at_return = len(stats)
        await asyncio.sleep(0)  # the request's task waits: its answer is out by now
        assert len(stats) == counted_at_return + 1  # counted after the answer, not before
        await batcher.stop()
        return first, second, batcher.inline_calls

    first, second, inline = _run(main())
    assert model.threads == ["model", threading.current_thread().name]
    assert float(first[0][0][0]) == 1.0 and float(second[0][0][0]) == 2.0 and inline == 1
    assert [s.size for s in stats] == [1, 1]  # the inline call is counted like any other


class CacheModel(EchoModel):
    """A model whose one-item call is slower right after a batched one (its weights pushed out
    of the cache, as a CPU model's are), and which gains nothing from batching in a row."""

    def __init__(self) -> None:
        super().__init__()
        self.after_batch = False

    def run(self, batch):
        n = len(batch)
        time.sleep(0.002 * n if n > 1 else 0.004 if self.after_batch else 0.002)
        self.after_batch = n > 1
        return super().run(batch)


def test_calibration_times_lone_calls_in_a_row_not_after_batches():
    """A lone call after a lone call against a batch after a batch, as each is served: timed
    in turns, every lone call would pay the batch's cold cache and batching would look as if
    it paid (per item 2 ms against 4)."""
    batcher = Batcher(CacheModel(), max_batch_size=8)
    batcher.calibrate(np.zeros((1, 1), np.float32), np.zeros((8, 1), np.float32), 8)
    assert not batcher.batching_pays()


class SlowStartModel(EchoModel):
    """A model whose calls are slowed by a quarter until its first batched call (the box busy
    at the start of the calibration), and which gains nothing from batching."""

    def __init__(self) -> None:
        super().__init__()
        self.batched = False

    def run(self, batch):
        n = len(batch)
        self.batched = self.batched or n > 1
        time.sleep(0.002 * n * (1.0 if self.batched else 1.3))
        return super().run(batch)


def test_calibration_takes_the_best_lone_call_of_two_windows():
    """A window of one-item calls slowed by something else on the box would otherwise make
    batching look as if it paid (per item 2 ms against 2.6)."""
    batcher = Batcher(SlowStartModel(), max_batch_size=8)
    batcher.calibrate(np.zeros((1, 1), np.float32), np.zeros((8, 1), np.float32), 8)
    assert batcher._calibrated_solo_s < 0.0025
    assert not batcher.batching_pays()


def test_requests_go_to_the_model_thread_when_it_is_busy_or_the_model_is_slow():
    model = ThreadModel(delay=0.01)  # a one-item call over INLINE_MAX_S: never inline

    async def main():
        batcher = Batcher(model, max_batch_size=64)
        batcher.start()
        batcher.calibrate(np.zeros((1, 1), np.float32), np.zeros((64, 1), np.float32), 64, 1)
        batcher.batched_item_s = batcher._calibrated_solo_s  # batching would not pay
        del model.threads[:]
        for i in range(3):
            await batcher.submit([np.array([float(i)], np.float32)], alone=True)
            await asyncio.sleep(0.02)
        slow = batcher.inline_calls
        model.delay = 0.0
        batcher._calibrated_solo_s = batcher.batched_item_s = 0.0001
        # a burst (the caller knows of others: not alone) is batched by the model thread
        results = await asyncio.gather(*[batcher.submit([np.array([float(i)], np.float32)])
                                         for i in range(20)])
        await batcher.stop()
        return slow, results

    slow, results = _run(main())
    assert slow == 0 and set(model.threads[:3]) == {"model"}
    assert [float(r[0][0][0]) for r in results] == [float(i) for i in range(20)]
    assert set(model.threads) == {"model"} and len(model.threads) < 3 + 20  # batched



def test_where_batching_pays_a_lone_item_still_goes_to_the_model_thread():
    model = ThreadModel()

    async def main():
        batcher = Batcher(model, max_batch_size=64)
        batcher.start()
        batcher.calibrate(np.zeros((1, 1), np.float32), np.zeros((64, 1), np.float32), 64)
        assert batcher.solo_s is not None and batcher.batched_item_s is not None
        batcher._calibrated_solo_s = 0.001
        batcher.batched_item_s = 0.0001  # a GPU: 10x cheaper batched
        await batcher.submit([np.array([1.0], np.float32)], alone=True)
        batcher.batched_item_s = 0.00075  # under BATCH_GAIN of a lone call: still pays
        await batcher.submit([np.array([1.0], np.float32)], alone=True)
        batcher.batched_item_s = 0.001
        await asyncio.sleep(0.05)  # the model thread is back to waiting for work
        await batcher.submit([np.array([1.0], np.float32)], alone=True)
        await batcher.stop()
        return batcher.inline_calls

    assert _run(main()) == 1
    assert model.threads[-3:] == ["model", "model", threading.current_thread().name]


class SoloModel(EchoModel):
    """A model with a solo session: which session each call ran on, and how long each takes."""

    def __init__(self, own_delay: float, solo_delay: float) -> None:
        super().__init__(own_delay)
        self.solo_delay = solo_delay
        self.sessions: list[str] = []

    def run(self, batch: np.ndarray) -> Outputs:
        self.sessions.append("own")
        return super().run(batch)

    def run_solo(self, batch: np.ndarray) -> Outputs:
        self.sessions.append("solo")
        time.sleep(self.solo_delay)
        n = len(batch)
        probs = np.stack([batch[:, 0], np.full(n, n, np.float32)], axis=1)
        return Outputs(probs, np.zeros((n, 1), np.float32))


def _lone_calls(model: SoloModel, gate, calls: int, own_probe_s: float = SOLO_OWN_PROBE_S,
                solo_figures: float | None = None) -> Batcher:
    """``calls`` lone items through a batcher whose solo gate is ``gate``; ``solo_figures``:
    the solo session's recent calls all took this long before the first (a noisy spell, or
    start-up figures taken while another worker was busy)."""
    async def main() -> Batcher:
        batcher = Batcher(model, max_batch_size=64)
        batcher.own_probe_s = own_probe_s
        batcher.start()
        batcher.calibrate(np.zeros((1, 1), np.float32), np.zeros((64, 1), np.float32), 64, 1)
        batcher._calibrated_solo_s = batcher.batched_item_s = 0.0001  # inline, no batching gain
        batcher.time_solo(np.zeros((1, 1), np.float32), rounds=5)  # a preempted call or two
        # (a loaded CI box) leaves the medians as they are
        for _ in range(SOLO_WINDOW if solo_figures is not None else 0):
            batcher._on_solo.add(solo_figures)
        batcher.solo_gate = gate
        del model.sessions[:]
        await asyncio.sleep(0.05)  # the model thread is waiting for work
        for i in range(calls):
            out = await batcher.submit([np.array([float(i)], np.float32)], alone=True)
            assert float(out[0][0][0]) == float(i)
        await batcher.stop()
        return batcher

    return _run(main())


def test_a_lone_item_on_an_idle_server_runs_on_the_faster_solo_session_and_probes_the_other():
    model = SoloModel(own_delay=0.006, solo_delay=0.0)
    batcher = _lone_calls(model, lambda: True, 128, own_probe_s=0.0)
    assert batcher.solo_pays() and batcher.inline_calls == 128
    # the last 3 of every 64 gated calls run on the other session, so both figures stay current
    assert model.sessions.count("own") == 6 and batcher.solo_calls == 122
    assert model.sessions[61:64] == model.sessions[125:128] == ["own"] * 3


def test_the_slower_session_is_probed_at_most_once_in_own_probe_s():
    # 256 fast lone calls take well under own_probe_s (the default, SOLO_OWN_PROBE_S, is 1 s;
    # 30 here, for a loaded CI box): one burst on the worker's own session (it costs what the
    # solo one saves), the later ones stay on the solo session
    assert SOLO_OWN_PROBE_S == 1.0
    model = SoloModel(own_delay=0.006, solo_delay=0.0)
    batcher = _lone_calls(model, lambda: True, 256, own_probe_s=30.0)
    assert batcher.solo_pays() and batcher.solo_calls == 253
    assert [i for i, s in enumerate(model.sessions) if s == "own"] == [61, 62, 63]
    # 64 lone calls taking longer than own_probe_s: every burst is due again
    model = SoloModel(own_delay=0.006, solo_delay=0.001)
    batcher = _lone_calls(model, lambda: True, 192, own_probe_s=0.03)
    assert [i for i, s in enumerate(model.sessions) if s == "own"] == [
        61, 62, 63, 125, 126, 127, 189, 190, 191]


def test_the_solo_session_is_left_when_it_is_slower_or_the_server_is_busy():
    slower = SoloModel(own_delay=0.0, solo_delay=0.006)
    batcher = _lone_calls(slower, lambda: True, 64)
    # the probes only: a burst of SOLO_RETURN_BURST, long enough to bring it back at once
    assert not batcher.solo_pays() and slower.sessions.count("solo") == SOLO_RETURN_BURST == 6
    assert slower.sessions[58:64] == ["solo"] * 6
    busy = SoloModel(own_delay=0.006, solo_delay=0.0)
    batcher = _lone_calls(busy, lambda: False, 20)  # another request somewhere on the server
    assert busy.sessions == ["own"] * 20 and batcher.solo_calls == 0


def test_a_worker_sent_to_its_own_session_by_a_noisy_spell_comes_back_in_one_burst():
    model = SoloModel(own_delay=0.006, solo_delay=0.0)
    _lone_calls(model, lambda: True, 128, solo_figures=0.024)
    assert model.sessions[:58] == ["own"] * 58
    # one burst of SOLO_RETURN_BURST: its first call uncounted, the other five a majority of the
    # window, so the worker is back on the solo session at once
    assert model.sessions[58:125] == ["solo"] * 67
    assert model.sessions[125:] == ["own"] * 3  # the own session's burst, due (never probed)


class SpikyModel(SoloModel):
    """A solo session that is faster but preempted now and then (a shared machine): every
    ``every``-th solo call takes ``spike_s``."""

    def __init__(self, own_delay: float, spike_s: float, every: int) -> None:
        super().__init__(own_delay, solo_delay=0.0)
        self.spike_s, self.every = spike_s, every

    def run_solo(self, batch: np.ndarray) -> Outputs:
        self.solo_delay = self.spike_s if self.sessions.count("solo") % self.every == 0 else 0.0
        return super().run_solo(batch)


def test_an_odd_slow_call_does_not_send_lone_items_to_the_slower_session():
    # one solo call in 7 takes 60 ms, 10x a call on the worker's own thread: a moving average
    # weighted 0.2 would jump over the own session's figure at each one and stay there
    model = SpikyModel(own_delay=0.006, spike_s=0.06, every=7)
    batcher = _lone_calls(model, lambda: True, 64)
    assert batcher.solo_pays()
    assert model.sessions.count("own") == 3  # the probes only
    assert batcher.lone_on_solo_s < 0.006 <= batcher.lone_on_own_s


class ColdModel(SoloModel):
    """A solo session whose first call after calls on the other session is slow (its threads
    and caches cold), and fast after it; the worker's own session takes ``own_delay``."""

    def __init__(self, own_delay: float, cold_s: float) -> None:
        super().__init__(own_delay, solo_delay=0.0)
        self.cold_s = cold_s

    def run_solo(self, batch: np.ndarray) -> Outputs:
        self.solo_delay = self.cold_s if self.sessions[-1:] != ["solo"] else 0.0
        return super().run_solo(batch)


def test_a_probe_counts_the_other_session_warm_so_a_faster_one_is_found():
    model = ColdModel(own_delay=0.006, cold_s=0.02)
    # the start-up figures were taken while another worker was busy; every burst probes (the
    # count rule alone)
    batcher = _lone_calls(model, lambda: True, 64 * 6, own_probe_s=0.0, solo_figures=0.024)
    assert not model.sessions[10:58].count("solo")  # on its own session at first
    assert batcher.solo_pays()  # the bursts' warm calls found the solo session faster
    assert model.sessions[-30:-3] == ["solo"] * 27  # then the last burst probes its own


def test_the_recent_times_median_ignores_the_outliers_and_follows_a_lasting_change():
    times = RecentTimes(size=5)
    assert times.median is None
    for t in (1.0, 1.0, 9.0, 1.0, 1.0):
        times.add(t)
    assert times.median == 1.0
    for t in (3.0, 3.0, 3.0):  # the machine got slower: three of the last five
        times.add(t)
    assert times.median == 3.0


def test_finish_runs_once_per_call_in_the_model_thread_and_each_row_gets_its_result():
    model = EchoModel(delay=0.01)
    calls = []

    def finish(out: Outputs, extras: list) -> list:
        calls.append((threading.current_thread().name, len(extras)))
        return [(float(p[0]), extra) for p, extra in zip(out.probabilities, extras)]

    async def main():
        batcher = Batcher(model, max_batch_size=8, finish=finish)
        batcher.start()
        results = await asyncio.gather(
            *[batcher.submit([np.array([float(i)], np.float32)], extras=[f"x{i}"])
              for i in range(20)],
            batcher.submit([np.array([20.0], np.float32), np.array([21.0], np.float32)]))
        await batcher.stop()
        return results

    results = _run(main())
    rows = [row for result in results for row in result]
    assert [done for _, _, done in rows] == (
        [(float(i), f"x{i}") for i in range(20)] + [(20.0, None), (21.0, None)])
    assert {name for name, _ in calls} == {"model"}
    assert len(calls) == len(model.calls) < 22 and sum(n for _, n in calls) == 22  # per call


def test_a_failing_finish_fails_every_item_of_its_call_and_the_batcher_goes_on():
    model = EchoModel()
    state = {"fail": True}

    def finish(out: Outputs, extras: list) -> list:
        if state["fail"]:
            raise ValueError("scorer broke")
        return [None] * len(extras)

    async def main():
        batcher = Batcher(model, max_batch_size=8, finish=finish)
        batcher.start()
        with pytest.raises(BatchError, match="finishing the call's answers failed.*scorer broke"):
            await batcher.submit([np.zeros(1, np.float32), np.ones(1, np.float32)])
        state["fail"] = False
        ok = await batcher.submit([np.full(1, 3.0, np.float32)])
        await batcher.stop()
        return ok

    assert float(_run(main())[0][0][0]) == 3.0


def test_an_inline_call_is_finished_on_the_event_loop():
    model = ThreadModel()
    seen = []

    def finish(out: Outputs, extras: list) -> list:
        seen.append(threading.current_thread().name)
        return [extra * 2 for extra in extras]

    async def main():
        batcher = Batcher(model, max_batch_size=64, finish=finish)
        batcher.start()
        batcher.calibrate(np.zeros((1, 1), np.float32), np.zeros((64, 1), np.float32), 64)
        batcher.batched_item_s = batcher._calibrated_solo_s  # batching does not pay: inline
        await asyncio.sleep(0.05)
        answer = await batcher.submit([np.array([2.0], np.float32)], alone=True, extras=[21])
        await batcher.stop()
        return answer, batcher.inline_calls

    (answer,), inline = _run(main())
    assert inline == 1 and answer[2] == 42 and seen == [threading.current_thread().name]


def test_a_lone_contiguous_item_goes_to_the_model_as_a_view_of_itself():
    """A v2 tensor is a view of the request's body: one item is not copied into the call's
    input; several are stacked, and a strided item is copied as before."""
    body = np.arange(2 * 3 * 4, dtype=np.float32).tobytes()
    items = np.frombuffer(body, dtype="<f4").reshape(2, 3, 4)
    lone = _stacked([items[0]])
    assert lone.shape == (1, 3, 4) and np.shares_memory(lone, items)
    both = _stacked([items[0], items[1]])
    assert both.shape == (2, 3, 4) and not np.shares_memory(both, items)
    np.testing.assert_array_equal(both, items)
    strided = items[:, :, ::2][0]
    copied = _stacked([strided])
    assert copied.flags.c_contiguous and not np.shares_memory(copied, items)
    np.testing.assert_array_equal(copied[0], strided)
