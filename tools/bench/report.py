"""Tables (markdown, so the same text goes to the terminal and the README) and the per-request
CPU breakdown. Pure functions over measured numbers: no I/O here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .cells import Cell, conns
from .prometheus import LOG_COMMIT, PREPROCESS, QUEUE_WAIT
from .raw import RawCell

P99_TARGET_X = 3.0  # the service's target: p99 at c=64 below 3x one raw batch-64 call


def fmt(value: float | int | None, spec: str = ".1f") -> str:
    """A table value; None (not measured) prints as '-'."""
    return "-" if value is None else format(value, spec)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; numbers are right-aligned when the header says so with '>'."""
    names = [h.lstrip(">") for h in headers]
    align = ["---:" if h.startswith(">") else "---" for h in headers]
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join(align) + "|"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, table has {len(headers)} columns: {row}")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def ratio(value: float | None, denominator: float | None) -> float | None:
    return value / denominator if value is not None and denominator else None


def floor_bound(raw_best: float | None, floor_rps: float | None) -> float | None:
    """The most a served model can reach if every request pays the request path (the noop
    floor's rate) and the model (the raw best rate) one after the other on the same cores:
    1 / (1/raw + 1/floor). Overlap of the two (ORT runs without the GIL) can beat it a little."""
    if not raw_best or not floor_rps:
        return None
    return 1.0 / (1.0 / raw_best + 1.0 / floor_rps)


def tail_context(conc: int, rps: float, p99_ms: float, floor_p99_ms: float | None,
                 yardstick_ms: float) -> dict:
    """What a served p99 under ``conc`` closed-loop connections is made of, beside the p99
    target's verdict: the connections' mean latency at the measured rate (Little's law:
    ``conc / rps``; no request can do better on average), the p99 over that mean (the tail),
    and the no-op floor's p99 against the same yardstick (where the request path alone comes
    near the target, as for the text model on 2 cores, the model's calls are not why a served
    p99 misses it)."""
    mean_ms = 1e3 * conc / rps if rps else None
    return {"closed_loop_mean_ms": mean_ms, "closed_loop_mean_x": ratio(mean_ms, yardstick_ms),
            "p99_over_mean": ratio(p99_ms, mean_ms), "floor_p99_ms": floor_p99_ms,
            "floor_p99_x": ratio(floor_p99_ms, yardstick_ms)}


def tail_line(t: dict) -> str | None:
    """``tail_context`` as one sentence (None without a rate)."""
    if t["closed_loop_mean_ms"] is None:
        return None
    line = (f"the connections' mean latency at this rate (c / req/s) is "
            f"{t['closed_loop_mean_ms']:.1f} ms = {t['closed_loop_mean_x']:.1f}x the yardstick, "
            f"the p99 {t['p99_over_mean']:.2f}x that mean")
    if t["floor_p99_x"] is not None:
        line += (f"; the no-op floor's p99 is {t['floor_p99_ms']:.1f} ms = "
                 f"{t['floor_p99_x']:.1f}x the yardstick")
    return line


def bound_line(what: str, served_rps: float | None, raw_best: float | None,
               floor_rps: float | None, conc: int) -> str | None:
    """One sentence: the floor-allowed bound at ``conc`` and how much of it is served."""
    bound = floor_bound(raw_best, floor_rps)
    if bound is None or served_rps is None:
        return None
    return (f"{what} at c={conc}: raw best {raw_best:.0f}/s and floor {floor_rps:.0f} req/s allow "
            f"1/(1/raw + 1/floor) = {bound:.0f} req/s ({bound / raw_best:.2f} x raw); served "
            f"{served_rps:.0f} req/s = {served_rps / bound:.2f} of that bound")


def raw_table(cells: Sequence[RawCell]) -> str:
    rows = [[c.config, str(c.batch), fmt(c.images_per_s, ".0f"), fmt(c.p50_ms, ".2f"),
             fmt(c.p99_ms, ".2f")] for c in cells]
    return markdown_table(["config", ">batch", ">images/s", ">p50 ms/call", ">p99 ms/call"], rows)


def text_raw_table(cells: Sequence) -> str:
    """The text ceiling's cells (``textraw.TextRawCell``): per config, batch and call order."""
    rows = [[c.config, str(c.batch), c.order, fmt(c.images_per_s, ".0f"),
             f"{100 * c.padding_share:.0f}%", fmt(c.mean_ms, ".2f"), fmt(c.p50_ms, ".2f"),
             fmt(c.p99_ms, ".2f")] for c in cells]
    return markdown_table(["config", ">batch", "calls", ">texts/s", ">padding", ">mean ms/call",
                           ">p50 ms/call", ">p99 ms/call"], rows)


def served_table(cells: Sequence[Cell], raw_best: float | None, raw_b64_ms: float | None) -> str:
    rows = []
    for c in cells:
        p99 = c.wrk.p("99")
        rows.append([
            str(c.conc), fmt(c.rps, ".0f"), fmt(ratio(c.rps, raw_best), ".2f"), fmt(c.wrk.p("50")),
            fmt(p99), _times(ratio(p99, raw_b64_ms)), fmt(c.items_per_batch),
            str(c.wrk.errors), conns(c) + (" ⚖" if c.one_worker else ""),
            fmt(c.cpu.server_cores, ".2f"),
            fmt(c.server_cpu_ms_per_request, ".2f"),
            fmt(c.cpu.noise, ".2f") + (" ⚠" if c.contaminated else ""),
        ])
    return markdown_table([">c", ">req/s", ">ratio to raw best", ">p50 ms", ">p99 ms",
                           ">p99 / raw b64", ">items/batch", ">errors", ">conns/worker",
                           ">server CPU (cores)",
                           ">CPU ms/req", ">foreign+steal"], rows)


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}x"


@dataclass(frozen=True)
class Breakdown:
    """Server CPU per request at one concurrency, split by where it goes (milliseconds)."""

    conc: int
    total_ms: float | None
    preprocess_ms: float | None
    inference_ms: float | None
    http_ms: float | None
    queue_wait_ms: float | None  # wall time, not CPU
    inference_ort_ms: float | None  # ORT wall per item x intra-op threads (cross-check)
    method: str

    @property
    def residual_ms(self) -> float | None:
        parts = (self.total_ms, self.preprocess_ms, self.inference_ms, self.http_ms)
        return None if None in parts else parts[0] - parts[1] - parts[2] - parts[3]


def breakdown(model: Cell, floor: Cell | None, intra_op_threads: int) -> Breakdown:
    """Per-request CPU: total from /proc; preprocessing from its histogram (it runs on the event
    loop, so wall ~ CPU); inference = total minus the noop floor's total at the same concurrency;
    HTTP/framework = the floor's total minus the floor's own preprocessing. Without a floor,
    inference is ORT wall per item x threads and HTTP/framework is what is left."""
    total = model.server_cpu_ms_per_request
    pre = model.hist_mean_ms(PREPROCESS)
    ort_wall = model.ort_wall_ms_per_item
    ort_est = ort_wall * intra_op_threads if ort_wall is not None else None
    if floor is not None and floor.server_cpu_ms_per_request is not None and total is not None:
        floor_total = floor.server_cpu_ms_per_request
        floor_pre = floor.hist_mean_ms(PREPROCESS) or 0.0
        return Breakdown(model.conc, total, pre, total - floor_total, floor_total - floor_pre,
                         model.hist_mean_ms(QUEUE_WAIT), ort_est, "floor-difference")
    http = None if None in (total, pre, ort_est) else total - pre - ort_est
    return Breakdown(model.conc, total, pre, ort_est, http, model.hist_mean_ms(QUEUE_WAIT), ort_est,
                     "ort-wall-x-threads")


def breakdown_table(b: Breakdown) -> str:
    def share(v: float | None) -> str:
        r = ratio(v, b.total_ms)
        return "-" if r is None else f"{100 * r:.0f}%"

    residual_how = "total minus the three above"
    if b.method == "floor-difference":
        inf_how = "server CPU/req minus the noop floor's, same c"
        http_how = "floor CPU/req minus floor preprocessing"
        # = floor preprocessing - this run's: its wall time grows where ORT shares the core
        residual_how += " (floor's preprocessing wall minus this run's)"
    else:
        inf_how = "ORT wall/item x intra-op threads (no floor measured)"
        http_how = "total minus preprocessing minus inference"
    rows = [
        ["total server CPU", fmt(b.total_ms, ".2f"), "100%",
         "/proc utime+stime of the tree / requests"],
        ["preprocessing (decode+preprocess)", fmt(b.preprocess_ms, ".2f"), share(b.preprocess_ms),
         "clf_preprocess_seconds mean (event loop: wall ~ CPU)"],
        ["inference (ONNX Runtime)", fmt(b.inference_ms, ".2f"), share(b.inference_ms), inf_how],
        ["HTTP/framework (BentoML, ASGI, JSON)", fmt(b.http_ms, ".2f"), share(b.http_ms), http_how],
        ["residual", fmt(b.residual_ms, ".2f"), share(b.residual_ms), residual_how],
        ["cross-check: ORT wall/item x threads", fmt(b.inference_ort_ms, ".2f"),
         share(b.inference_ort_ms),
         "clf_inference_seconds sum / items x intra-op threads (upper bound)"],
        ["queue wait (wall, not CPU)", fmt(b.queue_wait_ms, ".2f"), "",
         "clf_queue_wait_seconds mean"],
    ]
    return markdown_table(["where", ">ms/request", ">share", "how"], rows)


@dataclass(frozen=True)
class SummaryRow:
    what: str
    conc: int | None
    per_s: float | None
    x_raw: float | None  # per_s over the raw in-process best of the same model
    p50_ms: float | None = None
    p99_ms: float | None = None
    items_per_batch: float | None = None
    server_cores: float | None = None
    cpu_ms_per_req: float | None = None
    flagged: bool = False
    one_worker: bool = False  # every connection landed on one worker


def summary_row(what: str, cell: Cell, raw_best: float | None) -> SummaryRow:
    return SummaryRow(what, cell.conc, cell.rps, ratio(cell.rps, raw_best), cell.wrk.p("50"),
                      cell.wrk.p("99"), cell.items_per_batch, cell.cpu.server_cores,
                      cell.server_cpu_ms_per_request, cell.contaminated, cell.one_worker)


def summary_table(rows: Sequence[SummaryRow], unit: str = "img/s") -> str:
    """The README's table: one line per setup and concurrency, against its model's raw best;
    ``unit`` names what a request carries (one image, or one text)."""
    out = []
    for r in rows:
        flags = (" ⚠" if r.flagged else "") + (" ⚖" if r.one_worker else "")
        out.append([r.what + flags, fmt(r.conc, "d"), fmt(r.per_s, ".0f"),
                    fmt(r.x_raw, ".2f"), fmt(r.p50_ms), fmt(r.p99_ms), fmt(r.items_per_batch),
                    fmt(r.server_cores, ".2f"), fmt(r.cpu_ms_per_req, ".2f")])
    return markdown_table(["setup", ">c", f">req/s ({unit})", ">x raw best", ">p50 ms", ">p99 ms",
                           ">items/batch", ">server CPU (cores)", ">CPU ms/req"], out)


@dataclass(frozen=True)
class LogRow:
    """One concurrency: log off vs on, and the log's rows vs wrk's 2xx answers."""

    task: str
    conc: int
    off_rps: float | None
    on_rps: float
    off_p99_ms: float | None
    on_p99_ms: float | None
    rows: int | None  # rows added over the measured run
    ok: int  # 2xx answers wrk counted in it
    commits: float | None = None  # log transactions over the measured run
    commit_ms: float | None = None  # mean time of one
    flagged: bool = False  # others' CPU contaminated one of the two cells
    one_worker: bool = False  # one of the two cells had every connection on one worker

    @property
    def on_off(self) -> float | None:
        return ratio(self.on_rps, self.off_rps)

    @property
    def rows_per_commit(self) -> float | None:
        return ratio(self.rows, self.commits)

    @property
    def consistent(self) -> bool:
        """Every counted answer was logged, and at most the c in flight at the end besides."""
        return self.rows is not None and 0 <= self.rows - self.ok <= self.conc

    def to_dict(self) -> dict:
        return {"task": self.task, "conc": self.conc, "off_rps": self.off_rps,
                "on_rps": self.on_rps, "on_off": self.on_off, "off_p99_ms": self.off_p99_ms,
                "on_p99_ms": self.on_p99_ms, "rows": self.rows, "ok_2xx": self.ok,
                "consistent": self.consistent, "commits": self.commits,
                "commit_ms_mean": self.commit_ms, "rows_per_commit": self.rows_per_commit,
                "contaminated": self.flagged, "one_worker": self.one_worker}


def log_rows(task: str, off_cells: Sequence, on_cells: Sequence) -> list[LogRow]:
    """Pair each log-on cell with the log-off cell at the same concurrency (if measured)."""
    off = {c.conc: c for c in off_cells}
    rows = []
    for c in on_cells:
        o = off.get(c.conc)
        commit = c.hist.get(LOG_COMMIT)
        rows.append(LogRow(
            task, c.conc, o.rps if o else None, c.rps, o.wrk.p("99") if o else None,
            c.wrk.p("99"), c.log_rows, c.ok, commit.count if commit else None,
            commit.mean * 1e3 if commit and commit.mean is not None else None,
            c.contaminated or bool(o and o.contaminated), c.one_worker or bool(o and o.one_worker)))
    return rows


def log_table(rows: Sequence[LogRow]) -> str:
    out = []
    for r in rows:
        diff = None if r.rows is None else r.rows - r.ok
        out.append([
            r.task + (" ⚠" if r.flagged else "") + (" ⚖" if r.one_worker else ""), str(r.conc),
            fmt(r.off_rps, ".0f"),
            fmt(r.on_rps, ".0f"), fmt(r.on_off, ".2f"), fmt(r.off_p99_ms), fmt(r.on_p99_ms),
            fmt(r.rows, "d"), str(r.ok), fmt(diff, "+d") + ("" if r.consistent else " ✗"),
            fmt(r.rows_per_commit), fmt(r.commit_ms, ".2f"),
        ])
    return markdown_table(["task", ">c", ">log off req/s", ">log on req/s", ">on/off",
                           ">p99 off ms", ">p99 on ms", ">log rows", ">wrk 2xx", ">rows - 2xx",
                           ">rows/write", ">write ms"], out)
