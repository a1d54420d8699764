"""The large-body bench's bodies are requests the service takes, of the size they claim."""

from __future__ import annotations

import pytest

from preprocessing.spec import ImageSpec
from service import requests, v2
from tools.bench.bigbody import large_body

pytestmark = pytest.mark.tools


def test_the_v2_json_body_is_an_fp32_tensor_of_the_items() -> None:
    spec = ImageSpec(width=8, height=8)
    path, body = large_body("v2-json", "m", spec, 5)
    assert path == "/v2/models/m/infer"
    request = v2.parse_infer(body)  # JSON (no binary framing)
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("input", "FP32", [5, *spec.input_shape])
    assert len(tensor.data) == 5 * 3 * 8 * 8 and not tensor.binary


def test_the_v1_json_body_holds_the_items_as_base64_pngs() -> None:
    path, body = large_body("v1-json", "m", ImageSpec(width=8, height=8), 3)
    assert path == "/v1/classify/image"
    images = requests.images(body, "application/json", 64)
    assert len(images) == 3 and all(i.startswith(b"\x89PNG") for i in images)
