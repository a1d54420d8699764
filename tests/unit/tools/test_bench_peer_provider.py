"""``tools/bench/peer_provider.py``: a peer's server script run with every ONNX Runtime session
of its process on the provider asked for, or stopped when that provider cannot be had."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tools.bench.peer_provider import providers_from_env
from tools.bench.peers import LAUNCHER

pytestmark = pytest.mark.tools

COMMON = '''
import onnxruntime as ort
MODEL = {model!r}
def make_session():
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(MODEL, sess_options=so, providers=["CPUExecutionProvider"])
'''
SERVER = '''
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import make_session
session = make_session()
print("served by", session.get_providers()[0], "args", sys.argv[1:], "main", __name__)
'''


@pytest.fixture
def harness(tmp_path: Path) -> Path:
    """A harness laid out like ``../shared/peers-bench``: ``common.make_session`` and a server."""
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              model)
    (tmp_path / "common.py").write_text(COMMON.format(model=str(model)))
    (tmp_path / "servers").mkdir()
    (tmp_path / "servers" / "srv.py").write_text(SERVER)
    return tmp_path


def launch(harness: Path, provider: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LAUNCHER), "servers/srv.py", "--port", "1"],
                          cwd=harness, env={"PEERS_ORT_PROVIDER": provider, "PATH": "/usr/bin"},
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_server_script_runs_as_main_with_its_arguments(harness: Path) -> None:
    done = launch(harness, "cpu")
    assert done.returncode == 0, done.stderr
    assert "served by CPUExecutionProvider args ['--port', '1'] main __main__" in done.stdout


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this onnxruntime has the CUDA provider")
def test_no_silent_cpu_fallback_when_cuda_is_asked_for(harness: Path) -> None:
    done = launch(harness, "cuda")
    assert done.returncode != 0
    assert "asked ONNX Runtime for CUDAExecutionProvider, got ['CPUExecutionProvider']" in (
        done.stdout + done.stderr)
    assert "served by" not in done.stdout


def test_the_provider_list_from_the_environment() -> None:
    assert providers_from_env({"PEERS_ORT_PROVIDER": "cpu"}) == ["CPUExecutionProvider"]
    assert providers_from_env({}) == [
        ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"}), "CPUExecutionProvider"]
    assert providers_from_env({"PEERS_CUDNN_CONV_ALGO_SEARCH": "heuristic"})[0] == (
        "CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"})
    with pytest.raises(SystemExit, match="expected one of EXHAUSTIVE, HEURISTIC, DEFAULT"):
        providers_from_env({"PEERS_CUDNN_CONV_ALGO_SEARCH": "FAST"})
    with pytest.raises(SystemExit, match="expected cuda or cpu"):
        providers_from_env({"PEERS_ORT_PROVIDER": "rocm"})
