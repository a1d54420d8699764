"""The bench's v2 cell: its body is what tritonclient sends and the service parses, its answer
check reads the binary answer, and its rows print beside the /v1 ones."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest

from service import v2
from tests.unit.tools.test_bench_report import make_cell
from tools.bench.bodies import noise_png, write_image_body, write_v2_image_body
from tools.bench.cells import Check, check_answer
from tools.bench.image import image_summary_rows
from tools.bench.server import ServerError
from tools.bench.v2cell import v2_table

pytestmark = pytest.mark.tools  # the benchmark tool's own tests (fast; in `make test`)


def test_the_v2_body_is_one_binary_bytes_tensor_the_service_parses(tmp_path) -> None:
    png = noise_png(8, 3)
    body = write_v2_image_body(tmp_path, "m", png, "noise", "bench-resnet")
    assert body.route == "/v2/models/bench-resnet/infer" and body.image == png
    headers = dict(h.split(": ", 1) for h in body.headers)
    assert headers["Content-Type"] == "application/octet-stream"
    request = v2.parse_infer(body.path.read_bytes(), headers["Inference-Header-Content-Length"])
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape, tensor.binary) == ("image", "BYTES", [1],
                                                                          True)
    assert tensor.data == [png] and request.binary_output and request.outputs is None


class _Answer(BaseHTTPRequestHandler):
    probs = np.array([[0.25, 0.75]], np.float32)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        outputs = [(v2.OutputTensor("label", "BYTES", [1], ["b"]), True),
                   (v2.OutputTensor("probabilities", "FP32", [1, 2], self.probs), True)]
        body, ctype, extra = v2.encode_response({"model_name": "m"}, outputs)
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        for key, value in extra:
            self.send_header(key.decode(), value.decode())
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_the_answer_check_reads_the_binary_probabilities(tmp_path) -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        server = SimpleNamespace(base=f"http://127.0.0.1:{httpd.server_address[1]}")
        body = write_v2_image_body(tmp_path, "m", noise_png(8, 3), "noise", "m")
        data = body.path.read_bytes()
        check_answer(server, body, Check(data, {"a": 0.25, "b": 0.75}))
        with pytest.raises(ServerError, match="wrong v2 answer"):
            check_answer(server, body, Check(data, {"a": 0.5, "b": 0.5}))
    finally:
        httpd.shutdown()


def test_the_v2_rows_sit_beside_the_v1_ones(tmp_path) -> None:
    png = noise_png(8, 3)
    v1_body = write_image_body(tmp_path, "m", png, "noise")
    v2_body = write_v2_image_body(tmp_path, "m", png, "noise", "m")
    table = v2_table(make_cell(requests=10_000), make_cell(requests=12_000), v1_body, v2_body)
    lines = table.splitlines()
    assert lines[0].startswith("| route (body) | c | req/s | x /v1 |")
    assert lines[2].startswith("| /v1 multipart") and "| 1.00 |" in lines[2]
    assert lines[3].startswith("| /v2 binary") and "| 1.20 |" in lines[3]
    results = {"reference_model": {"tag": "bench-resnet:x"},
               "raw_best": {"config": "c", "batch": 64, "images_per_s": 1000.0},
               "served": {"cells": [make_cell(conc=64)]}, "v2": {"cells": [make_cell(conc=64)]}}
    assert [r.what for r in image_summary_rows(results)][1:] == [
        "bench-resnet served", "bench-resnet served, v2 binary (tritonclient's default wire)"]
