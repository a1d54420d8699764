"""A v2 JSON body's FP32 data read by simdjson (``service/v2json.py``): the request
``parse_infer`` makes of a body is the same, or the same error, whichever way it is read, and
the fast way is taken for the bodies clients send and refused for the ones it cannot vouch for."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from service import v2, v2json
from service.requests import RequestError


def body(data, shape=None, datatype="FP32", **entry) -> bytes:
    tensor = {"name": "input", "datatype": datatype,
              "shape": shape if shape is not None else [len(np.ravel(data))], "data": data,
              **entry}
    return json.dumps({"id": "r", "inputs": [tensor]}).encode()


def usual(raw: bytes, monkeypatch) -> object:
    with monkeypatch.context() as m:
        m.setattr(v2json, "fast_document", lambda _body: None)
        return outcome(raw)


def outcome(raw: bytes) -> object:
    """What ``parse_infer`` makes of ``raw``, comparable: the request's fields with each input's
    data as (dtype, shape, bytes) (so -0.0, NaN and the dtype count), or the error."""
    try:
        req = v2.parse_infer(raw)
    except RequestError as exc:
        return ("error", exc.reason, exc.message)
    inputs = [(t.name, t.datatype, t.shape, t.binary,
               (t.data.dtype.str, t.data.shape, t.data.tobytes())
               if isinstance(t.data, np.ndarray) else t.data) for t in req.inputs]
    return (req.id, inputs, req.outputs, req.binary_output)


TAKEN = [  # bodies the fast way reads
    body(np.linspace(-1, 1, 12).tolist()),
    body(np.arange(24, dtype=float).reshape(2, 3, 4).tolist(), [2, 3, 4]),
    body([[1, 2], [3, 4]], [4]),  # evenly nested in another shape: the shape's count decides,
    body([[1, 2], [3, 4]], [3]),  # as the usual way
    body([0.1, -0.0, 1e-45, 3.4028235e38, 1e39, -1e39, 2, -7, 16777217]),  # rounding, overflow
    body([18446744073709551615, 9007199254740993]),  # integers past 2^53 and at 64 bits
    body([]),
    body([[], []], [2, 0]),  # evenly nested, no numbers
    body([[0.5]] * 16, [16, 1]),  # an array for each number
    body([1.5], parameters={"note": "x"}),
    json.dumps({"id": "r", "parameters": {"binary_data_output": True, "k": [1, {"a": [2]}]},
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2],
                            "data": [[0.5, 0.25]]},
                           {"name": "text", "datatype": "BYTES", "shape": [2],
                            "data": ["a", "é"]}],
                "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]
                }).encode(),
    body([1, 2], binary_data_size=8),  # "has both": the usual message
]
NOT_TAKEN = [  # bodies only the usual way may read, each with why
    body([1, [2]], [2]),  # an array hidden among the numbers (simdjson flattens it)
    body([[1, [2]], [3, 4]], [4]),  # ... in an innermost array
    body([[1, 2], [3], [4, 5, 6]], [6]),  # ragged, with as many arrays and numbers as even
    body([[1], 2], [2]),
    body([1, True], [2]),
    body([1, None], [2]),
    body([1, "2"], [2]),
    body([1.5], name="in[put]"),  # a "[" inside a string
    b'{"id": "r", "id": "s", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1], '
    b'"data": [1]}]}',  # a repeated key: orjson keeps the last, simdjson finds the first
    b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [1], '
    b'"data": [2]}]}',
    b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [NaN]}]}',
    b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [1e400]}]}',
    b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [1]}], '
    b'"x": "\\ud800"}',  # a lone surrogate escape
    b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [1]}]} x',
    b' {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [1]}]}',
    b'\xef\xbb\xbf{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [1]}]}',
    b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [1]}], "x": "\xff"}',
    b'{"inputs": [], "x": ' + b"[" * 1000 + b"]" * 1000 + b"}",  # deeper than Python's frames
    b'{"inputs": [], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # ... and simdjson's 1,024
]


@pytest.fixture
def every_size(monkeypatch):
    monkeypatch.setattr(v2json, "MIN_BYTES", 0)


@pytest.mark.parametrize("raw", TAKEN)
def test_a_body_the_fast_way_reads_gives_the_same_request(raw, every_size, monkeypatch):
    assert v2json.fast_document(raw) is not None
    assert outcome(raw) == usual(raw, monkeypatch)


@pytest.mark.parametrize("raw", NOT_TAKEN)
def test_a_body_it_cannot_vouch_for_goes_the_usual_way(raw, every_size, monkeypatch):
    assert v2json.fast_document(raw) is None
    assert outcome(raw) == usual(raw, monkeypatch)


def test_random_bodies_read_the_same_either_way(every_size, monkeypatch):
    """Nested data of random shapes, some spoiled (a number made an array, a bool, a null or a
    string, an innermost array cut or lengthened): the same request or the same error, and the
    unspoiled ones take the fast way."""
    rng = random.Random(7)
    taken = 0
    for case in range(400):
        shape = [rng.randint(1, 4) for _ in range(rng.randint(1, 4))]
        data = np.asarray([rng.uniform(-3, 3) for _ in range(int(np.prod(shape)))])
        nested = data.reshape(shape).tolist()
        spoiled = case % 2 == 1
        if spoiled:
            node = nested
            while isinstance(node[0], list) and rng.random() < 0.8:
                node = node[rng.randrange(len(node))]
            i = rng.randrange(len(node))
            node[i] = rng.choice([[node[i]], True, None, "1", [], node[i] if isinstance(
                node[i], float) else node[i] + [0.5], node[i][:-1] if isinstance(
                node[i], list) else {"a": 1}])
        raw = body(nested, shape if rng.random() < 0.8 else [int(np.prod(shape))])
        fast = v2json.fast_document(raw)
        assert outcome(raw) == usual(raw, monkeypatch), raw
        taken += fast is not None
        if not spoiled:
            assert fast is not None, raw
    assert taken >= 200


def test_a_large_body_the_fast_way_reads():
    """At the default threshold: one 64x64 RGB image, flat and nested, and 64 of them."""
    rng = np.random.default_rng(0)
    for shape in ([1, 3, 64, 64], [64, 3, 64, 64]):
        x = rng.random(int(np.prod(shape)), dtype=np.float32)
        for data in (x.tolist(), x.reshape(shape).tolist()):
            raw = body(data, shape)
            assert len(raw) > v2json.MIN_BYTES and v2json.fast_document(raw) is not None
            (tensor,) = v2.parse_infer(raw).inputs
            assert tensor.data.dtype == np.float32 and np.array_equal(tensor.data, x)


def test_a_small_body_goes_the_usual_way():
    assert v2json.fast_document(body([1.0, 2.0])) is None


def test_the_threads_parser_is_reused_for_small_bodies_and_not_for_large_ones(monkeypatch):
    assert v2json._parser(1000) is v2json._parser(2000)
    assert v2json._parser(v2json.REUSE_BYTES + 1) is not v2json._parser(1000)
    monkeypatch.setattr(v2json, "MIN_BYTES", 0)
    for raw in (body([1.0, 2.0]), body([1, True], [2]), body([3.0])):  # one after a refusal
        v2json.fast_document(raw)
    assert np.array_equal(v2json.fast_document(body([3.0]))["inputs"][0]["data"], [3.0])


def test_counting_brackets_in_chunks():
    raw = b"[" * 5 + b"x" * 100 + b"[[" + b"]" * 7
    assert v2json._count_open(raw, chunk=3) == raw.count(b"[") == 7
