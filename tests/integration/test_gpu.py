"""The CUDA path: runs only where onnxruntime-gpu sees a GPU (skipped elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                       reason="needs onnxruntime-gpu and a CUDA device"),
]


def test_cuda_session_matches_cpu(digits_model):
    import bentoml

    from service.runtime import OnnxModel

    path = f"{bentoml.models.get(digits_model.tag).path}/model.onnx"
    gpu = OnnxModel(path, providers="cuda", intra_op_threads=1)
    cpu = OnnxModel(path, providers="cpu", intra_op_threads=1)
    assert gpu.provider == "CUDAExecutionProvider"  # not a silent fall-back to CPU
    x = np.random.default_rng(0).standard_normal((16, 1, 32, 32)).astype(np.float32)
    assert np.abs(gpu.run(x).probabilities - cpu.run(x).probabilities).max() < 1e-4
