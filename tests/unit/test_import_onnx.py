"""Importing an ONNX file made elsewhere: the embedding exposed, nothing else changed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from modelstore.artifact import load_artifact  # noqa: E402
from training.export import ExportError, compare_weights, ort_session  # noqa: E402
from training.import_onnx import default_spec, import_onnx, main, with_embedding  # noqa: E402


def classifier(path: Path, channels: int = 3, size: int = 8, classes: int = 4,
               last_op: str = "Gemm") -> Path:
    """input [N,C,H,W] -> Conv -> GlobalAveragePool -> Flatten -> Gemm -> logits, seeded."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((6, channels, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((classes, 6)).astype(np.float32), "fc")
    nodes = [helper.make_node("Conv", ["input", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["conv"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["features"])]
    if last_op == "Gemm":
        nodes.append(helper.make_node("Gemm", ["features", "fc"], ["logits"], transB=1))
    else:  # a classifier whose logits come out of something else
        nodes += [helper.make_node("Gemm", ["features", "fc"], ["pre"], transB=1),
                  helper.make_node("Relu", ["pre"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                      ["N", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], [w, fc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_the_embedding_is_the_final_layers_input_and_nothing_else_changes(tmp_path: Path) -> None:
    source = classifier(tmp_path / "m.onnx")
    model, tensor = with_embedding(onnx.load(str(source)))
    assert tensor == "features"
    assert [o.name for o in model.graph.output] == ["logits", "embedding"]
    onnx.save(model, str(tmp_path / "out.onnx"))
    assert compare_weights(source, tmp_path / "out.onnx")["identical"]
    x = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    (want,) = ort_session(source).run(["logits"], {"input": x})
    logits, emb = ort_session(tmp_path / "out.onnx").run(["logits", "embedding"], {"input": x})
    assert np.array_equal(logits, want) and emb.shape == (5, 6)


def test_a_model_without_a_final_fully_connected_layer_needs_the_tensor_named(
        tmp_path: Path) -> None:
    source = classifier(tmp_path / "m.onnx", last_op="Relu")
    with pytest.raises(ExportError, match="--embedding"):
        with_embedding(onnx.load(str(source)))
    model, tensor = with_embedding(onnx.load(str(source)), "features")
    assert tensor == "features" and model.graph.output[1].name == "embedding"
    with pytest.raises(ExportError, match="no node"):
        with_embedding(onnx.load(str(source)), "nope")


def test_the_default_spec_follows_the_input() -> None:
    spec = default_spec([0, 1, 28, 28])
    assert (spec.height, spec.width, spec.color_mode, spec.mean) == (28, 28, "L", (0.5,))
    with pytest.raises(ExportError, match="channels"):
        default_spec(["N", 4, 8, 8])
    with pytest.raises(ExportError, match="fixed"):
        default_spec(["N", 3, "H", "W"])


def test_import_saves_a_servable_version(tmp_path: Path) -> None:
    source = classifier(tmp_path / "m.onnx")
    tag = import_onnx(source, name="imported-tiny", labels=["a", "b", "c", "d"])
    artifact = load_artifact(str(tag))
    assert list(artifact.labels) == ["a", "b", "c", "d"]
    export = artifact.read_json("export.json")
    assert export["max_abs_diff"] == 0.0 and export["weights_identical_to_source"]
    assert export["embedding_from"] == "features" and export["embedding_dim"] == 6
    from service.runtime import OnnxModel

    out = OnnxModel(str(artifact.onnx_path)).run(np.zeros((2, 3, 8, 8), np.float32))
    assert out.probabilities.shape == (2, 4) and out.embedding.shape == (2, 6)


def test_the_command_refuses_a_wrong_label_count_and_saves_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = classifier(tmp_path / "m.onnx")
    assert main([str(source), "--name", "refused-tiny", "--labels", "a,b"]) == 2
    assert "4 logits but 2 labels" in capsys.readouterr().err
    import bentoml
    from bentoml.exceptions import NotFound

    with pytest.raises(NotFound):
        bentoml.models.get("refused-tiny:latest")


def test_a_solo_session_answers_what_the_worker_session_answers(tmp_path: Path) -> None:
    """The solo session (every core, spinning) is the same model: a lone
    request gets the same answer whichever session the batcher picks."""
    from service.runtime import OnnxModel

    model, _ = with_embedding(onnx.load(str(classifier(tmp_path / "m.onnx"))))
    onnx.save(model, str(tmp_path / "served.onnx"))
    served = OnnxModel(str(tmp_path / "served.onnx"), "cpu", 1)
    assert not served.has_solo
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    served.add_solo_session(2)
    assert served.has_solo and served.solo_threads == 2
    own, solo = served.run(x), served.run_solo(x)
    np.testing.assert_allclose(solo.probabilities, own.probabilities, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(solo.embedding, own.embedding, rtol=1e-5, atol=1e-6)
    served.drop_solo_session()
    assert not served.has_solo and np.array_equal(served.run_solo(x).probabilities,
                                                  own.probabilities)


def test_a_lone_call_in_a_stream_leaves_the_threads_spinning_an_isolated_one_stops_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two solo sessions (runtime.add_solo_session): a call within SOLO_SPIN_S of the last solo
    call runs on the one whose threads ORT leaves spinning (stopped at every call's end they
    had to be woken at the next: 1.4-3.4 ms a lone call in the serving worker against
    1.0-1.5); a call after a longer pause runs on the one that stops them at its end, so an
    isolated request leaves no core spinning. Both answer what the worker's session answers."""
    import onnxruntime as ort

    from service import runtime
    from service.runtime import OnnxModel, _options

    solo, stopping, own = (_options(ort, 2, spin=True), _options(ort, 2, True, True),
                           _options(ort, 1, spin=False))
    assert solo.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert stopping.get_session_config_entry("session.force_spinning_stop") == "1"
    assert own.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    for opts in (solo, own):
        with pytest.raises(RuntimeError, match="does not have configuration"):
            opts.get_session_config_entry("session.force_spinning_stop")

    model, _ = with_embedding(onnx.load(str(classifier(tmp_path / "m.onnx"))))
    onnx.save(model, str(tmp_path / "served.onnx"))
    served = OnnxModel(str(tmp_path / "served.onnx"), "cpu", 1)
    served.add_solo_session(2)
    used: list[str] = []
    names = {id(served._solo): "spinning", id(served._solo_stopping): "stopping"}
    real_run = served._run
    monkeypatch.setattr(served, "_run", lambda session, batch: (
        used.append(names.get(id(session), "own")), real_run(session, batch))[1])
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    answers = [served.run_solo(x) for _ in range(3)]  # the first after a pause, then a stream
    monkeypatch.setattr(runtime, "SOLO_SPIN_S", 0.0)  # every call now comes "after a pause"
    answers.append(served.run_solo(x))
    assert used == ["stopping", "spinning", "spinning", "stopping"]
    own_answer = served.run(x)
    for answer in answers:
        np.testing.assert_allclose(answer.probabilities, own_answer.probabilities,
                                   rtol=1e-5, atol=1e-6)


def test_fixed_batch_shapes_answer_each_row_as_its_own_call_would(tmp_path: Path) -> None:
    """What CUDA serving runs image models with (runtime.OnnxModel.fix_batch_shapes): padded up
    to the next fixed size, chunked above the largest, the same answers row for row."""
    from service.runtime import OnnxModel, cuda_batch_shapes

    model, _ = with_embedding(onnx.load(str(classifier(tmp_path / "m.onnx"))))
    onnx.save(model, str(tmp_path / "served.onnx"))
    plain = OnnxModel(str(tmp_path / "served.onnx"), "cpu", 1)
    fixed = OnnxModel(str(tmp_path / "served.onnx"), "cpu", 1)
    fixed.fix_batch_shapes([4, 2, 4])
    assert fixed.batch_shapes == (2, 4) and plain.batch_shapes == ()
    x = np.random.default_rng(2).standard_normal((11, 3, 8, 8)).astype(np.float32)
    for n in (1, 2, 3, 4, 5, 11):  # padded to 2 or 4; 5 and 11 in chunks of 4
        want, got = plain.run(x[:n]), fixed.run(x[:n])
        assert got.probabilities.shape == (n, 4) and got.embedding.shape == (n, 6)
        np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.embedding, want.embedding, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        fixed.fix_batch_shapes([0])
    assert cuda_batch_shapes(64) == (8, 64) and cuda_batch_shapes(8) == (8,)
    assert cuda_batch_shapes(4) == (4,)
