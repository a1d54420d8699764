"""The text part: the from-scratch transformer on a short/long length mix, raw ONNX Runtime vs
served (one text per JSON request, wrk rotating through the mix), the floor, where the CPU
goes, and what the prediction log costs. Results go under ``"text"`` in the JSON."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from modelstore.artifact import Artifact, text_preprocessor
from preprocessing import TextPreprocessor

from .bodies import Body
from .config import REPO_ROOT
from .cpu import least_contaminated
from .raw import RAW_CONFIGS, RawConfig, best_cell
from .report import SummaryRow, summary_row, text_raw_table
from .sections import (Run, Yardstick, breakdown_section, cell_at, floor_bound_section,
                       log_cells, print_served, served_section, served_threads)
from .store import ensure_text_model, store_path
from .textmix import (MixSpec, build_mix, demo_data, describe_mix, mix_stats, write_text_body,
                      write_v2_text_body)
from .textraw import (SORTED, TextRawCell, bench_text_config, bench_text_parallel, text_plans,
                      token_rows, tokenize_cost_ms)


def run_text(run: Run, results: dict) -> None:
    cfg = run.cfg
    out = results["text"] = {}
    artifact, pre = _model(run, out)
    body, rows = _mix(run, out, artifact, pre)
    best, yardstick = _raw(run, out, artifact, rows, pre.pad_id)
    raw_best, yard_ms = best.images_per_s, yardstick.ms if yardstick else None

    run.heading(f"Served {artifact.name} (CLF_WORKERS={cfg.workers}, {served_threads(cfg)} "
                f"intra-op thread(s) per worker, prediction log off; one text per request, wrk "
                f"rotating through the mix; {cfg.warmup_s:g} s warm-up + {cfg.duration_s:g} s)")
    served = out["served"] = served_section(run, artifact, body, "onnx", cfg.concs, "text")
    print_served(run, served, raw_best, yard_ms)
    floor = None
    if cfg.floor_concs:
        run.heading("Text floor: the same mix with CLF_RUNTIME=noop")
        floor = out["floor"] = served_section(run, artifact, body, "noop", cfg.floor_concs,
                                              "text-floor")
        print_served(run, floor, raw_best, yard_ms)

    top = max(cfg.concs)
    if cell_at(served, top) is not None:
        run.heading(f"Text: where the server's CPU goes, per request at c={top}")
        out.update(breakdown_section(run, served, floor, top, yardstick))
        out["floor_bound"] = floor_bound_section(run, f"{artifact.name} (texts)", served, floor,
                                                 top, raw_best)

    out["log_on"] = log_cells(run, "text", artifact, body, served, raw_best, yard_ms)
    out["v2"] = _v2(run, artifact, body, raw_best, yard_ms, top)


def _v2(run: Run, artifact: Artifact, body: Body, raw_best: float, yard_ms: float | None,
        conc: int) -> dict:
    """The same mix through the v2 BYTES path at ``conc``, its own floor, and the bound."""
    run.heading(f"Text through Open Inference Protocol v2 (BYTES) at c={conc}: served, floor, "
                "bound")
    v2_body = write_v2_text_body(run.work_dir, artifact.name, body)
    out: dict = {"served": served_section(run, artifact, v2_body, "onnx", [conc], "text-v2")}
    print_served(run, out["served"], raw_best, yard_ms)
    out["floor"] = served_section(run, artifact, v2_body, "noop", [conc], "text-v2-floor")
    print_served(run, out["floor"], raw_best, yard_ms)
    out["bound"] = floor_bound_section(run, f"{artifact.name} (texts, v2 BYTES)", out["served"],
                                       out["floor"], conc, raw_best)
    return out


def _model(run: Run, out: dict) -> tuple[Artifact, TextPreprocessor]:
    """The bench's text model from the store (trained first if absent) and its preprocessor."""
    run.heading("Text model")
    artifact, trained = ensure_text_model(run.cfg.text_model, run.work_dir, run.log)
    pre = text_preprocessor(artifact)
    metrics = artifact.read_json("metrics.json") or {}
    out["model"] = {"tag": f"{artifact.name}:{artifact.version}", "trained_now": trained,
                    "onnx": str(artifact.onnx_path), "store": store_path(),
                    "max_length": pre.spec.max_length, "vocab_size": pre.vocab_size,
                    "test_accuracy": metrics.get("test_accuracy")}
    run.log(f"{artifact.name}:{artifact.version} ({'trained now' if trained else 'reused'}), "
            f"max_length {pre.spec.max_length} tokens, vocabulary {pre.vocab_size}, test "
            f"accuracy {metrics.get('test_accuracy', float('nan')):.3f}, {artifact.onnx_path}")
    return artifact, pre


def _mix(run: Run, out: dict, artifact: Artifact, pre: TextPreprocessor
         ) -> tuple[Body, list[np.ndarray]]:
    """The length mix as wrk's rotating bodies, and its texts' token ids for the raw cells."""
    cfg = run.cfg
    run.heading("The text mix (the project's demo data, python -m training.text.demo)")
    spec = MixSpec(bodies=cfg.text_bodies, short_share=cfg.text_short_share)
    texts, labels = demo_data(run.work_dir, spec.demo_per_class, spec.seed, REPO_ROOT)
    items = build_mix(texts, labels, spec)
    rows, truncated = token_rows(pre, [i.text for i in items])
    stats = mix_stats(items, [len(r) for r in rows], truncated, pre.spec.max_length)
    description = describe_mix(stats, spec)
    body = write_text_body(run.work_dir, artifact.name, items, description)
    tokenize_ms = tokenize_cost_ms(pre, body.texts, seconds=0.3 if cfg.quick else 1.0)
    out["mix"] = {"spec": spec.to_dict(), "stats": stats, "description": description,
                  "bodies_file": str(body.path), "tokenize_ms_per_text": tokenize_ms}
    run.log(f"{description}.\nTokenizing one text alone (validate, normalise, BPE; as the "
            f"service does per request) costs {1e3 * tokenize_ms:.0f} us in this process.")
    return body, rows


def _raw(run: Run, out: dict, artifact: Artifact, rows: Sequence[np.ndarray], pad_id: int
         ) -> tuple[TextRawCell, Yardstick | None]:
    """The raw ceiling on the mix: the best cell (the ratio denominator) and the p99 yardstick
    (the mean length-sorted call at the server's max batch size: calls of short and of long
    texts differ tenfold, so one call's p50 would say little)."""
    run.heading(f"Raw ONNX Runtime on the mix, in-process (providers={run.cfg.providers}; "
                "calls padded to their own longest text; p50/p99 per call)")
    raw = out["raw"] = _raw_section(run, artifact, rows, pad_id)
    best = best_cell(raw["cells"])
    batch = max(raw["batches"])
    b64 = _fastest_sorted_call(raw["cells"], batch)
    out["raw_best"], out["raw_batch_call"] = best.to_dict(), b64.to_dict() if b64 else None
    run.log(f"Raw best (the ratio denominator): {best.images_per_s:.0f} texts/s ({best.config}, "
            f"batch {best.batch}, {best.order}).")
    if b64 is None:
        return best, None
    yardstick = Yardstick(b64.mean_ms, b64.config, f"a raw length-sorted batch-{batch} call of "
                          f"the mix ({b64.mean_ms:.1f} ms mean, {b64.config})")
    run.log(f"The p99 yardstick: {yardstick.what}.")
    return best, yardstick


def _raw_section(run: Run, artifact: Artifact, rows: Sequence[np.ndarray], pad_id: int) -> dict:
    """Every session config at batch 1 and the server's max batch size, each noise-checked;
    then the server's session options once per worker, in parallel processes."""
    cfg = run.cfg
    batches = (1, int(cfg.service_settings["max_batch_size"]))
    plans = text_plans(batches)
    cells: list[TextRawCell] = []
    per_config = []
    threads = served_threads(cfg)
    # the service's own session once per worker, all at the same time (what the server runs)
    server_like = RawConfig(f"intra{threads}", threads, False)
    measures = [(c.name, lambda c=c: bench_text_config(
        c, str(artifact.onnx_path), cfg.providers, rows, pad_id, plans, cfg.raw_warmup_s,
        cfg.raw_seconds, run.log)) for c in RAW_CONFIGS]
    if cfg.workers > 1:
        measures.append((f"{cfg.workers}x {server_like.name}", lambda: bench_text_parallel(
            server_like, cfg.workers, str(artifact.onnx_path), cfg.providers, rows, pad_id,
            plans, cfg.raw_warmup_s, cfg.raw_seconds, run.log)))
    for name, measure in measures:
        attempts = least_contaminated(
            measure, what=f"raw text {name}", retries=cfg.retries, quiet_wait=cfg.quiet_wait_s,
            may_retry=run.may_retry, log=run.log)
        cells.extend(attempts.best)
        per_config.append({"config": name, "cpu": attempts.cpu.to_dict(),
                           "noise_per_attempt": attempts.noise_per_attempt,
                           "contaminated": attempts.contaminated})
    run.log("\n" + text_raw_table(cells) + "\n")
    return {"model": f"{artifact.name}:{artifact.version}", "batches": list(batches),
            "cells": cells, "configs": per_config}


def _fastest_sorted_call(cells: Sequence[TextRawCell], batch: int) -> TextRawCell | None:
    at = [c for c in cells if c.batch == batch and c.order == SORTED]
    return min(at, key=lambda c: c.mean_ms) if at else None


def text_summary_rows(text: dict) -> list[SummaryRow]:
    """Raw best, served at each c, the floor and the log-on cells, against the raw best."""
    best = text["raw_best"]
    name = text["model"]["tag"].split(":")[0]
    per_s = best["texts_per_s"]
    rows = [SummaryRow(f"{name} raw ORT in-process ({best['config']}, batch {best['batch']}, "
                       f"{best['order']})", None, per_s, 1.0)]
    rows += [summary_row(f"{name} served", c, per_s) for c in text["served"].get("cells", [])]
    floor = (text.get("floor") or {}).get("cells", [])
    if floor:
        top = max(floor, key=lambda c: c.conc)
        rows.append(summary_row(f"{name} floor (CLF_RUNTIME=noop)", top, per_s))
    rows += [summary_row(f"{name} served, prediction log on", c, per_s)
             for c in (text.get("log_on") or {}).get("cells", [])]
    return rows
