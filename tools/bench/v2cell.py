"""The v2 cell: the served reference model with the same PNG at the same load as the ``/v1``
cell, sent through the Open Inference Protocol v2 route (``POST /v2/models/{name}/infer``) as
``tritonclient`` sends it by default (binary tensor extension, binary outputs), so the two
protocols' costs sit side by side."""

from __future__ import annotations

from modelstore.artifact import Artifact

from .bodies import Body, write_v2_image_body
from .cells import Cell
from .report import fmt, markdown_table, ratio
from .sections import Run, cell_at, print_served, served_section


def run_v2(run: Run, artifact: Artifact, v1_body: Body, served: dict, conc: int,
           raw_best: float | None, raw_b64_ms: float | None) -> dict:
    what = v1_body.description.split(",", 1)[0]
    body = write_v2_image_body(run.work_dir, artifact.name, v1_body.image, what, artifact.name)
    run.heading(f"Open Inference Protocol v2: the same image and load at c={conc} "
                f"({body.route}, binary tensor extension)")
    section = served_section(run, artifact, body, "onnx", [conc], "v2")
    print_served(run, section, raw_best, raw_b64_ms)
    v1_cell, v2_cell = cell_at(served, conc), cell_at(section, conc)
    if v1_cell is not None and v2_cell is not None:
        run.log("\n" + v2_table(v1_cell, v2_cell, v1_body, body))
        section["v2_over_v1_rps"] = ratio(v2_cell.rps, v1_cell.rps)
    return section


def v2_table(v1: Cell, v2: Cell, v1_body: Body, v2_body: Body) -> str:
    rows = []
    for name, cell, body in (("/v1 multipart", v1, v1_body), ("/v2 binary", v2, v2_body)):
        rows.append([f"{name} ({body.path.stat().st_size:,} B)", str(cell.conc),
                     fmt(cell.rps, ".0f"), fmt(ratio(cell.rps, v1.rps), ".2f"),
                     fmt(cell.wrk.p("50")), fmt(cell.wrk.p("99")), fmt(cell.items_per_batch),
                     fmt(cell.server_cpu_ms_per_request, ".2f"), str(cell.wrk.errors)
                     + (" ⚠" if cell.contaminated else "")])
    return markdown_table(["route (body)", ">c", ">req/s", ">x /v1", ">p50 ms", ">p99 ms",
                           ">items/batch", ">CPU ms/req", ">errors"], rows)
