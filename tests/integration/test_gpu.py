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


def test_cuda_image_model_at_fixed_batch_shapes_matches_cpu(digits_model):
    """What the service runs image models with on CUDA (service._model): the batcher's calls of
    any size padded to 8 or the largest size, each row's answer the CPU's own."""
    import bentoml

    from service.runtime import OnnxModel, cuda_batch_shapes

    path = f"{bentoml.models.get(digits_model.tag).path}/model.onnx"
    gpu = OnnxModel(path, providers="cuda", intra_op_threads=1)
    gpu.fix_batch_shapes(cuda_batch_shapes(64))
    cpu = OnnxModel(path, providers="cpu", intra_op_threads=1)
    assert gpu.batch_shapes == (8, 64)
    x = np.random.default_rng(1).standard_normal((70, 1, 32, 32)).astype(np.float32)
    for n in (1, 5, 8, 9, 64, 70):
        got, want = gpu.run(x[:n]), cpu.run(x[:n])
        assert got.probabilities.shape == (n, want.probabilities.shape[1])
        assert np.abs(got.probabilities - want.probabilities).max() < 1e-4
