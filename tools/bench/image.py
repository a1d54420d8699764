"""The image part: the reference model raw and served, its floor, where the CPU goes, what the
prediction log costs, and the trained default model. Results go to the top level of the JSON."""

from __future__ import annotations

from .raw import RAW_CONFIGS, best_cell, fastest_batch_call
from .report import SummaryRow, summary_row
from .sections import (Run, Yardstick, breakdown_section, cell_at, floor_bound_section,
                       image_body, log_cells, print_served, raw_section, served_section,
                       served_threads)
from .store import ensure_reference, find_default, store_path
from .v2cell import run_v2


def run_image(run: Run, results: dict) -> None:
    cfg = run.cfg
    run.heading("Reference model")
    artifact, exported = ensure_reference(cfg.reference_model, run.log)
    results["reference_model"] = {"tag": f"{artifact.name}:{artifact.version}",
                                  "exported_now": exported, "onnx": str(artifact.onnx_path),
                                  "store": store_path()}
    run.log(f"{artifact.name}:{artifact.version} ({'exported now' if exported else 'reused'}), "
            f"input {artifact.spec.input_shape}, {artifact.onnx_path}")

    run.heading(f"Raw ONNX Runtime, in-process (providers={cfg.providers}; p50/p99 per batch "
                "call)")
    raw = results["raw"] = raw_section(run, artifact)
    best = best_cell(raw["cells"])
    b64 = fastest_batch_call(raw["cells"], max(cfg.raw_batches))
    results["raw_best"], results["raw_batch_call"] = best.to_dict(), b64.to_dict()
    run.log(f"Raw best (the ratio denominator): {best.images_per_s:.0f} images/s ({best.config}, "
            f"batch {best.batch}). Fastest batch-{b64.batch} call (the p99 yardstick): "
            f"{b64.p50_ms:.1f} ms p50 ({b64.config}).")

    body = image_body(run, artifact)
    threads = served_threads(cfg)
    run.heading(f"Served {artifact.name} (CLF_WORKERS={cfg.workers}, {threads} intra-op "
                f"thread(s) per worker, prediction log off; wrk -t1 pinned to CPU 1, "
                f"{cfg.warmup_s:g} s warm-up + {cfg.duration_s:g} s)")
    served = results["served"] = served_section(run, artifact, body, "onnx", cfg.concs, "served")
    print_served(run, served, best.images_per_s, b64.p50_ms)
    results["v2"] = run_v2(run, artifact, body, served, max(cfg.concs), best.images_per_s,
                           b64.p50_ms)
    floor = None
    if cfg.floor_concs:
        run.heading("The floor: the same cells with CLF_RUNTIME=noop (the request path, no "
                    "model)")
        floor = results["floor"] = served_section(run, artifact, body, "noop", cfg.floor_concs,
                                                  "floor")
        print_served(run, floor, best.images_per_s, b64.p50_ms)

    top = max(cfg.concs)
    if cell_at(served, top) is not None:
        run.heading(f"Where the server's CPU goes, per request at c={top}")
        yardstick = Yardstick(b64.p50_ms, b64.config, f"the raw batch-{b64.batch} call "
                              f"({b64.p50_ms:.1f} ms p50, {b64.config})")
        results.update(breakdown_section(run, served, floor, top, yardstick))
        results["floor_bound"] = floor_bound_section(run, f"{artifact.name} (images)", served,
                                                     floor, top, best.images_per_s)

    results["log_on"] = log_cells(run, "image", artifact, body, served, best.images_per_s,
                                  b64.p50_ms)

    run.heading(f"Default model ({cfg.default_model or 'skipped'})")
    results["default_model"] = _default_model(run, top)


def _default_model(run: Run, top: int) -> dict:
    cfg = run.cfg
    if not cfg.default_model:
        run.log("skipped (--default-model '')")
        return {"tag": "", "skipped": "--default-model ''"}
    artifact = find_default(cfg.default_model)
    if artifact is None:
        note = (f"{cfg.default_model} is not in the model store ({store_path()}): "
                "section skipped. `make train` (python -m training) exports it there.")
        run.log(note)
        return {"tag": cfg.default_model, "skipped": note}
    raw = raw_section(run, artifact, configs=RAW_CONFIGS[:2], warmup_s=0.5,
                      seconds=min(cfg.raw_seconds, 2.0))
    body = image_body(run, artifact)
    served = served_section(run, artifact, body, "onnx", [top], "default")
    best = best_cell(raw["cells"])
    print_served(run, served, best.images_per_s,
                 fastest_batch_call(raw["cells"], max(cfg.raw_batches)).p50_ms)
    return {"tag": f"{artifact.name}:{artifact.version}", "raw": raw, "raw_best": best.to_dict(),
            "served": served}


def image_summary_rows(results: dict) -> list[SummaryRow]:
    """The README's rows: the reference model raw/served/floor/log on, then the default model."""
    best = results["raw_best"]
    ref = results["reference_model"]["tag"].split(":")[0]
    rows = [SummaryRow(f"{ref} raw ORT in-process ({best['config']}, batch {best['batch']})",
                       None, best["images_per_s"], 1.0)]
    rows += [summary_row(f"{ref} served", c, best["images_per_s"])
             for c in results["served"].get("cells", [])]
    rows += [summary_row(f"{ref} served, v2 binary (tritonclient's default wire)", c,
                         best["images_per_s"]) for c in (results.get("v2") or {}).get("cells", [])]
    floor = results.get("floor") or {}
    top = max((c.conc for c in floor.get("cells", [])), default=None)
    if top is not None:
        rows.append(summary_row(f"{ref} floor (CLF_RUNTIME=noop)", cell_at(floor, top),
                                best["images_per_s"]))
    rows += [summary_row(f"{ref} served, prediction log on", c, best["images_per_s"])
             for c in (results.get("log_on") or {}).get("cells", [])]
    default = results.get("default_model") or {}
    if "served" in default:
        name, d = default["tag"].split(":")[0], default["raw_best"]
        rows.append(SummaryRow(f"{name} raw ORT in-process ({d['config']}, batch {d['batch']})",
                               None, d["images_per_s"], 1.0))
        rows += [summary_row(f"{name} served", c, d["images_per_s"])
                 for c in default["served"].get("cells", [])]
    return rows
