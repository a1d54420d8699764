"""The peers section's pieces (no server): bodies, batch statistics, the table and verdicts;
the scaling table and the batch-size distribution."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.unit.tools.test_bench_report import make_cell
from tools.bench.bodies import Body
from tools.bench.cpu import CpuUse
from tools.bench.peers import (LAUNCHER, PEERS, Harness, PeerCell, PeersMissing, _wait_answer,
                               batch_histogram, check_numpy, find_logits, json_tensor_body,
                               mean_batch, numpy_major, peer_command, peers_table, tensor_body,
                               verdicts)
from tools.bench.prometheus import bucket_deltas, distribution, parse_samples
from tools.bench.scaling import scaling_table
from tools.bench.server import ServerError
from tools.bench.wrk import WrkResult

pytestmark = pytest.mark.tools


def peer_cell(conc: int, rps: float, p50: float = 5.0, p99: float = 10.0) -> PeerCell:
    wrk = WrkResult(requests=int(rps * 20), duration_s=20.0,
                    percentiles_ms={"50": p50, "99": p99})
    cpu = CpuUse(seconds=20.0, server_cpu_s=30.0, wrk_cores=0.03, foreign_cores=0.0,
                 steal_cores=0.0, system_busy_cores=1.6)
    return PeerCell(conc, wrk, cpu, 12.0, "")


def ours(conc: int, rps: float, p50: float = 60.0, p99: float = 120.0):
    cell = make_cell(conc=conc, requests=int(rps * 20) + 2)  # make_cell counts 2 non-2xx
    cell.wrk.percentiles_ms.update({"50": p50, "99": p99})
    return cell


def test_a_missing_harness_says_how_to_set_it_up(tmp_path: Path) -> None:
    harness = Harness(tmp_path / "peers-bench", tmp_path / "root")
    with pytest.raises(PeersMissing, match=r"setup\.sh") as err:
        harness.check(["triton"])
    assert "venv-triton" in str(err.value)


def test_a_triton_environment_with_numpy_2_is_refused_with_the_reason(tmp_path: Path) -> None:
    harness = Harness(tmp_path / "peers-bench", tmp_path / "root")
    python = harness.python("triton")
    python.parent.mkdir(parents=True)
    for version, refused in (("2.4.6", True), ("1.26.4", False)):
        python.write_text(f"#!/bin/sh\necho {version}\n")
        python.chmod(0o755)
        assert numpy_major(python) == int(version.split(".")[0])
        if refused:
            with pytest.raises(PeersMissing, match=r"numpy 2\.x.*numpy < 2.*HTTP 500"):
                check_numpy(harness, PEERS["triton"])
        else:
            check_numpy(harness, PEERS["triton"])
    check_numpy(harness, PEERS["fastapi"])  # no bound: not even run
    python.write_text("#!/bin/sh\nexit 1\n")  # no numpy there: the start-up says what is wrong
    assert numpy_major(python) is None
    check_numpy(harness, PEERS["triton"])


def test_the_tensor_body_is_tritons_tensor_asking_for_probabilities(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    np.savez(root / "model.ref.npz", x=x, y=np.zeros((4, 10), np.float32))
    body, first = tensor_body(Harness(tmp_path, root), tmp_path / "work", "peers-resnet")
    data = body.path.read_bytes()
    length = int(body.headers[1].split(":")[1])
    header = json.loads(data[:length])
    assert header["inputs"][0] == {"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 49152}}
    assert header["outputs"] == [{"name": "probabilities", "parameters": {"binary_data": False}}]
    assert np.array_equal(np.frombuffer(data[length:], "<f4").reshape(3, 64, 64), x[0])
    assert np.array_equal(first, x[0]) and body.route == "/v2/models/peers-resnet/infer"


def test_the_json_tensor_body_is_the_same_tensor_as_json_numbers(tmp_path: Path) -> None:
    """``compare --wire v2-json``: the tensor's numbers nested as its shape, read by the
    service's simdjson path into the same float32 values."""
    from service import v2, v2json

    root = tmp_path / "root"
    root.mkdir()
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    np.savez(root / "model.ref.npz", x=x, y=np.zeros((4, 10), np.float32))
    body = json_tensor_body(Harness(tmp_path, root), tmp_path / "work", "peers-resnet")
    raw = body.path.read_bytes()
    assert body.headers == ["Content-Type: application/json"]
    assert body.route == "/v2/models/peers-resnet/infer"
    assert v2json.fast_document(raw) is not None
    (tensor,) = v2.parse_infer(raw).inputs
    assert tensor.shape == [1, 3, 64, 64] and np.array_equal(tensor.data, x[0].reshape(-1))


def test_batch_statistics_over_a_window(tmp_path: Path) -> None:
    (tmp_path / "pytriton-1.json").write_text(json.dumps({"1": 3, "16": 10}))
    (tmp_path / "pytriton-2.json").write_text(json.dumps({"16": 2}))
    (tmp_path / "pytriton-3.json.tmp").write_text("{not json")  # being replaced: ignored
    after = batch_histogram(tmp_path)
    assert after == Counter({1: 3, 16: 12})
    assert mean_batch(Counter({1: 3, 16: 2}), after) == 16.0  # only the window's 10 calls
    assert mean_batch(after, after) is None


def test_find_logits_in_each_peers_answer() -> None:
    triton = {"outputs": [{"name": "logits", "datatype": "FP32", "data": list(range(10))}]}
    assert find_logits(triton, 10) == list(range(10))
    assert find_logits([0.5] * 10, 10) == [0.5] * 10
    assert find_logits({"x": [1, 2]}, 10) is None


def runs() -> list[dict]:
    def one(triton_rps: float, ours_rps: float) -> dict:
        return {"rows": {
            "triton": {"cells": [peer_cell(1, 150.0, 6.0), peer_cell(64, triton_rps, 90, 150)]},
            "tensor": {"cells": [ours(1, 550.0, 1.2), ours(64, ours_rps, 70.0, 140.0)]},
            "png": {"cells": [ours(64, 0.9 * triton_rps)]},
            "fastapi": {"cells": [peer_cell(1, 600.0, 1.1)]}}}
    return [one(500.0, 650.0), one(520.0, 600.0)]


def test_the_peers_table_gives_min_max_and_ratios_within_each_run() -> None:
    text = peers_table(runs(), batch1_ms=0.4)
    lines = text.splitlines()
    assert lines[0].startswith("| server | wire | log | c | req/s | x Triton |")
    tensor64 = next(line for line in lines if line.startswith("| this service | v2 binary FP32 "
                                                              "tensor | off | 64 |"))
    assert "| 600-650 | 1.15-1.30 |" in tensor64
    assert "2 run(s)" in text and "0.40 ms" in text


def test_verdicts_say_met_or_short_with_the_figures() -> None:
    lines = verdicts(runs(), [1, 64], batch1_ms=0.4)
    assert lines[0].startswith("tensor path, c=64: 1.15-1.30x Triton's req/s (target >= 1.2: "
                               "short), p99 0.93x Triton's (target <= 1: met)")
    assert any(v.startswith("PNG path, c=64: 0.90x") and "short" in v for v in lines)
    c1 = next(v for v in lines if "c=1" in v)
    assert "+ 0.80 ms (target <= +1 ms: met)" in c1
    assert c1.endswith("; 0.92x FastAPI's req/s (target >= 1: short)")
    ahead = runs()
    for r in ahead:
        r["rows"]["fastapi"]["cells"] = [peer_cell(1, 500.0, 1.1)]
    c1 = next(v for v in verdicts(ahead, [1, 64], batch1_ms=0.4) if "c=1" in v)
    assert c1.endswith("; 1.10x FastAPI's req/s (target >= 1: met)")
    # Without the raw batch-1 figure the rate still gets its verdict.
    assert verdicts(ahead, [1, 64], batch1_ms=None)[-1] == (
        "tensor path, c=1: 1.10x FastAPI's req/s (target >= 1: met)")


def test_on_cuda_x_triton_is_over_the_faster_triton_configuration_of_the_run() -> None:
    both = runs()
    both[0]["rows"]["triton-heuristic"] = {"cells": [peer_cell(64, 600.0)]}  # faster than 500
    both[1]["rows"]["triton-heuristic"] = {"cells": [peer_cell(64, 100.0)]}  # slower than 520
    lines = peers_table(both, batch1_ms=0.4).splitlines()
    tensor64 = next(line for line in lines if line.startswith("| this service | v2 binary FP32 "
                                                              "tensor | off | 64 |"))
    assert "| 600-650 | 1.08-1.15 |" in tensor64  # 650/600 and 600/520
    assert any(line.startswith("| Triton (PyTriton), cuDNN heuristic |") for line in lines)
    assert verdicts(both, [1, 64], batch1_ms=0.4)[0].startswith(
        "tensor path, c=64: 1.08-1.15x Triton's req/s (target >= 1.2: short)")


def test_the_peers_run_on_cuda_through_the_launcher(tmp_path: Path) -> None:
    harness = Harness(tmp_path / "peers-bench", tmp_path / "root")
    cmd, env = peer_command(harness, PEERS["triton"], 8103, "cpu")
    assert cmd == [str(harness.python("triton")), "servers/pytriton_server.py", "--port", "8103"]
    assert env == {}
    cmd, env = peer_command(harness, PEERS["triton-heuristic"], 8103, "cuda")
    assert cmd[:2] == [str(harness.python("triton")), str(LAUNCHER)]
    assert cmd[2:] == ["servers/pytriton_server.py", "--port", "8103"]
    assert env == {"PEERS_ORT_PROVIDER": "cuda", "PEERS_CUDNN_CONV_ALGO_SEARCH": "HEURISTIC"}
    assert peer_command(harness, PEERS["fastapi"], 8104, "cuda")[1][
        "PEERS_CUDNN_CONV_ALGO_SEARCH"] == "EXHAUSTIVE"


EXPOSITION = """
clf_batch_size_items_bucket{le="1.0",model="m"} %d
clf_batch_size_items_bucket{le="2.0",model="m"} %d
clf_batch_size_items_bucket{le="4.0",model="m"} %d
clf_batch_size_items_bucket{le="+Inf",model="m"} %d
clf_batch_size_items_bucket{le="1.0",model="other"} 99
"""


def test_the_batch_size_distribution_of_a_window() -> None:
    before = parse_samples(EXPOSITION % (5, 5, 5, 5))
    after = parse_samples(EXPOSITION % (15, 15, 35, 45))
    cumulative = bucket_deltas(before, after, "clf_batch_size_items", model="m")
    assert cumulative == [(1.0, 10.0), (2.0, 10.0), (4.0, 30.0), (float("inf"), 40.0)]
    assert distribution(cumulative) == [("1", 0.25), ("3-4", 0.5), ("5+", 0.25)]
    assert distribution([]) == []


def test_the_scaling_table_has_a_line_per_worker_count_and_c() -> None:
    cell = make_cell(conc=64)
    cell.batch_dist = [("5-8", 0.4), ("9-16", 0.6)]
    cell.conns_per_worker = [32, 32]
    rows = [{"workers": 2, "intra_op_threads": 1, "cells": [cell],
             "rss_mb": {"workers": [180.0, 182.4], "others": [90.0]}}]
    line = scaling_table(rows).splitlines()[2]
    assert line.startswith("| 2 | 1 | 64 | 500 |")
    assert "5-8:40% 9-16:60%" in line and "32+32" in line and "180 / 182" in line


def test_the_v2_text_mix_carries_the_same_texts_as_bytes_tensors(tmp_path: Path) -> None:
    from tools.bench.bodies import Body
    from tools.bench.textmix import write_v2_text_body

    texts = ("hello", 'a "quoted"\ttext é')
    v1 = Body(path=tmp_path / "m.jsonl", headers=[], description="two texts", texts=texts)
    body = write_v2_text_body(tmp_path, "lang", v1)
    lines = body.path.read_bytes().splitlines()
    assert [json.loads(line)["inputs"][0]["data"][0] for line in lines] == list(texts)
    assert json.loads(lines[0])["inputs"][0]["datatype"] == "BYTES"
    assert body.route == "/v2/models/lang/infer" and body.texts == texts


class _Answers(http.server.BaseHTTPRequestHandler):
    """Answers POSTs with the statuses of ``codes`` in turn (the last one from then on)."""

    codes: list[int] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        code = self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]
        body = b'{"outputs": [1, 2]}' if code == 200 else b'{"error": "output tensor shape"}'
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(("codes", "answered"), [([404, 503, 404, 200], True), ([500], False)])
def test_a_peer_is_awaited_through_4xx_but_not_through_repeated_5xx(
        tmp_path: Path, codes: list[int], answered: bool) -> None:
    handler = type("Handler", (_Answers,), {"codes": list(codes)})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    body_path = tmp_path / "body.bin"
    body_path.write_bytes(b"x")
    body = Body(path=body_path, headers=["Content-Type: application/octet-stream"],
                route="/infer", description="x")
    proc = subprocess.Popen(["sleep", "30"])
    try:
        url = f"http://127.0.0.1:{server.server_port}/infer"
        if answered:
            assert _wait_answer(proc, url, body, tmp_path / "log", timeout_s=30) == {
                "outputs": [1, 2]}
        else:
            with pytest.raises(ServerError, match="HTTP 500.*3 times in a row"):
                _wait_answer(proc, url, body, tmp_path / "log", timeout_s=30)
    finally:
        proc.kill()
        proc.wait()
        server.shutdown()
