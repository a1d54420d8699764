"""Accuracy without labels (monitoring/performance.py) on real digits through the exported model.

The session's digits model (tests/conftest.py) is calibrated on its reference profile (the
validation split); windows are digits it never trained or was validated on (its test split and
the digits outside its subset), passed through the real preprocessing and the ONNX model as the
service would:

  * covariate shift, where the method holds: the digits rotated as the demo's shifted digits
    are (``scripts/demo_traffic.py``'s ``shifted``: 12 degrees, black fill), and the unshifted
    digits. The estimate lands within ``TOLERANCE`` of the realised accuracy;
  * concept shift, where it fails by design: the same unshifted digits with the labels
    permuted (each digit now means the next one). The model's confidence cannot see new labels,
    so the estimate stays at the unshifted window's while the realised accuracy collapses;
  * inputs the model is confidently wrong on: the demo's full shift (rotated and 70 grey
    levels brighter; this small model never saw a brightness change in training). Confidence
    alone fails there (the estimate stays high while the realised accuracy collapses); every
    answer is OOD-flagged, and with the flags counted (``ForeignPrior``: the flagged beyond
    the scorer's reference rate at chance) the estimate lands within ``TOLERANCE`` again, as
    it does on the unshifted and rotated windows; the report warns;
  * the commands: ``python -m monitoring drift`` prints the estimate and writes it, per slice
    and next to the realised accuracy of the rows with feedback, into drift.json, drift.html
    and drift_latest.json (the gauge's source); ``slices`` shows it per slice.

The figures print with ``pytest -s`` (monitoring/README.md, "Accuracy without labels", quotes
them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from PIL import Image

from monitoring.ood import fit_ood
from monitoring.performance import (Estimate, calibrate_reference, estimate, foreign_prior,
                                    format_estimate, performance_report)
from monitoring.store import PredictionRecord, open_log
from preprocessing import IMAGE_FEATURES
from scripts.demo_traffic import shifted
from tests.integration.test_drift import Model, _cli, _png

pytestmark = pytest.mark.slow
TOLERANCE = 0.05  # the bound on |estimated - realised| under covariate shift


def rotated(blob: bytes) -> bytes:
    """The demo's rotation (``scripts/demo_traffic.py``'s ``shifted``) without its brightening."""
    import io

    return _png(Image.open(io.BytesIO(blob)).convert("L").rotate(12, fillcolor=0))


@pytest.fixture(scope="module")
def model(digits_model) -> Model:
    import bentoml

    return Model(Path(bentoml.models.get(digits_model.tag).path))


@pytest.fixture(scope="module")
def unseen(digits_model) -> tuple[list[bytes], np.ndarray]:
    """Digits the model neither trained nor was calibrated on, with their true labels."""
    from training.data import digits_images

    splits = digits_model.result.splits
    used = set(splits.train.names) | set(splits.val.names)
    data = digits_images()
    keep = [i for i, name in enumerate(data.names) if name not in used]
    return [data.blobs[i] for i in keep], np.array([data.labels[i] for i in keep])


@pytest.fixture(scope="module")
def outputs(model, unseen) -> dict[str, dict[str, np.ndarray]]:
    blobs, _ = unseen
    return {"unshifted": model.outputs(blobs),
            "rotated": model.outputs([rotated(b) for b in blobs]),
            "demo shift": model.outputs([shifted(b) for b in blobs])}


def _estimate(model: Model, out: dict[str, np.ndarray], labels: np.ndarray,
              ood_aware: bool = False) -> Estimate:
    """Confidence alone, or (``ood_aware``) with the flags of the OOD scorer the service
    fits on the same reference and its prior."""
    calibrator = calibrate_reference(model.reference)
    probs = out["probs"]
    correct = (probs.argmax(1) == labels).astype(np.float64)
    if not ood_aware:
        return estimate(calibrator, probs.max(1), correct)
    flags = _flags(model, out)
    return estimate(calibrator, probs.max(1), correct, flags, foreign_prior(model.reference))


def _flags(model: Model, out: dict[str, np.ndarray]) -> np.ndarray:
    """The OOD flags the service gives these inputs (the scorer reads their features too)."""
    features = [dict(zip(IMAGE_FEATURES, map(float, row))) for row in out["features"]]
    flags = fit_ood(model.reference).score(out["probs"], out["embeddings"], features)[1]
    print(f"(OOD-flagged {flags.mean():.3f}) ", end="")
    return flags


def _show(name: str, e: Estimate, raw: float) -> None:
    print(f"{name}: {e.n} digits, realised {e.realised:.3f}, estimated {e.estimated:.3f} "
          f"[{e.low:.3f}, {e.high:.3f}] (raw mean confidence {raw:.3f}), "
          f"gap {e.estimated - e.realised:+.3f}")


def test_the_calibration_is_chosen_on_the_reference(model) -> None:
    calibrator = calibrate_reference(model.reference)
    print(calibrator.describe())
    assert calibrator.reference_rows == int((model.reference.labels >= 0).sum())
    assert calibrator.method in ("identity", "isotonic")
    if calibrator.method == "isotonic":
        assert calibrator.ece_isotonic < calibrator.ece_raw


@pytest.mark.parametrize("window", ["unshifted", "rotated"])
def test_under_covariate_shift_the_estimate_lands_near_the_realised_accuracy(
        model, unseen, outputs, window) -> None:
    _, labels = unseen
    out = outputs[window]
    e = _estimate(model, out, labels)
    _show(window, e, float(out["probs"].max(1).mean()))
    assert abs(e.estimated - e.realised) <= TOLERANCE


@pytest.mark.parametrize("window", ["unshifted", "rotated", "demo shift"])
def test_with_the_ood_flags_the_estimate_lands_near_the_realised_accuracy(
        model, unseen, outputs, window) -> None:
    """The OOD-aware estimate (performance.py, step 3) on every covariate shift here, the
    demo's full shift included, where confidence alone is off by over 0.3."""
    _, labels = unseen
    out = outputs[window]
    e = _estimate(model, out, labels, ood_aware=True)
    _show(f"{window}, OOD-aware", e, float(out["probs"].max(1).mean()))
    assert abs(e.estimated - e.realised) <= TOLERANCE


def test_the_rotation_costs_accuracy_and_the_estimate_follows(model, unseen, outputs) -> None:
    """The rotated window is a real test of the method: its accuracy is lower, and the
    estimate moves down with it."""
    _, labels = unseen
    before = _estimate(model, outputs["unshifted"], labels)
    after = _estimate(model, outputs["rotated"], labels)
    assert before.realised - after.realised > 0.02
    assert after.estimated < before.estimated


def test_under_concept_shift_the_estimate_fails_as_documented(model, unseen, outputs) -> None:
    """The documented failure: the same inputs, new labels. The estimate cannot move."""
    _, labels = unseen
    out = outputs["unshifted"]
    permuted = (labels + 1) % len(model.reference.classes)  # each digit now means the next one
    before, after = _estimate(model, out, labels), _estimate(model, out, permuted)
    _show("concept shift (labels permuted)", after, float(out["probs"].max(1).mean()))
    assert after.estimated == before.estimated  # the inputs, hence the estimate, are the same
    assert after.realised < 0.2  # the labels changed: the model is now mostly wrong
    assert after.estimated - after.realised > 0.5  # and the estimate does not see it
    assert not after.low <= after.realised <= after.high
    aware = _estimate(model, out, permuted, ood_aware=True)  # the inputs are not foreign:
    assert aware.estimated - aware.realised > 0.5  # the OOD flags cannot see it either


def test_on_inputs_it_is_confidently_wrong_on_the_estimate_fails_and_the_report_warns(
        model, unseen, outputs) -> None:
    """The demo's full shift on this small model: far outside its training data, answered with
    confidence. Confidence alone cannot be trusted there; the OOD share says so (and with the
    flags counted the estimate holds: the test above)."""
    _, labels = unseen
    out = outputs["demo shift"]
    e = _estimate(model, out, labels)
    _show("demo shift (rotated, 70 levels brighter)", e, float(out["probs"].max(1).mean()))
    assert e.estimated - e.realised > 0.3
    flags = _flags(model, out)
    report = performance_report(calibrate_reference(model.reference), out["probs"].max(1),
                                ood=flags)
    print(f"OOD-flagged: {flags.mean():.3f}")
    assert report["ood_share"] > 0.5 and "out-of-distribution" in report["warning"]
    assert "WARNING" in format_estimate(report)


def _log(path: Path, model: Model, blobs: list[bytes], labels: np.ndarray, device: str,
         start: int) -> None:
    """Log the window as the service would, tagged, with feedback for every other row."""
    out = model.outputs(blobs)
    classes = model.reference.classes
    now = time.time() - 60
    with open_log(path) as log:
        log.write_batch([
            PredictionRecord(f"req-{start + i}", 0, now, "digits-cnn", "v",
                             classes[int(p.argmax())], float(p.max()), p, e,
                             dict(zip(IMAGE_FEATURES, f.tolist())), slices={"device": device})
            for i, (p, e, f) in enumerate(zip(out["probs"], out["embeddings"], out["features"]))])
        log.add_feedback_many({f"req-{start + i}": classes[int(label)]
                               for i, label in enumerate(labels) if i % 2 == 0})


def test_the_commands_report_the_estimate_per_slice_next_to_the_realised(
        model, unseen, tmp_path) -> None:
    """The unseen digits from "ios" devices as they are, and again rotated from "android"."""
    blobs, labels = unseen
    n = len(blobs)
    db = tmp_path / "predictions.db"
    _log(db, model, blobs, labels, "ios", 0)
    _log(db, model, [rotated(b) for b in blobs], labels, "android", n)
    common = ["--model", "digits-cnn", "--log", str(db), "--since", "1h",
              "--reference", str(model.folder)]

    drift = _cli("drift", "--out", str(tmp_path / "drift"), *common)
    assert drift.returncode in (0, 1), drift.stdout + drift.stderr
    assert "estimated accuracy (no labels needed)" in drift.stdout, drift.stdout
    print(drift.stdout[drift.stdout.index("estimated accuracy"):])
    report = json.loads((tmp_path / "drift" / "drift.json").read_text())["estimated_accuracy"]
    assert report["n"] == 2 * n and report["n_labelled"] == 2 * ((n + 1) // 2)
    assert abs(report["estimated_labelled"] - report["realised"]) <= TOLERANCE
    assert report["ood_share"] is not None and report["calibration"]["reference_rows"] > 0
    rows = {(r["slice"], r["value"]): r for r in report["by_slice"]}
    ios, android = rows[("tag.device", "ios")], rows[("tag.device", "android")]
    assert ios["n"] == android["n"] == n
    assert android["realised"] < ios["realised"] and android["estimated"] < ios["estimated"]
    for row in (ios, android):
        assert abs(row["estimated_labelled"] - row["realised"]) <= TOLERANCE
    assert any(s == "brightness_bucket" for s, _ in rows)  # the derived slices too
    state = json.loads((tmp_path / "drift_latest.json").read_text())
    assert state["models"]["digits-cnn"]["estimated_accuracy"]["value"] == report["value"]
    html = (tmp_path / "drift" / "drift.html").read_text()
    assert "Estimated accuracy by slice" in html and "Realised" in html

    slices = _cli("slices", "--json", str(tmp_path / "slices.json"), *common)
    assert slices.returncode == 0, slices.stdout + slices.stderr
    assert " est " in slices.stdout.splitlines()[0]
    table = {(r["slice"], r["value"]): r
             for r in json.loads((tmp_path / "slices.json").read_text())["rows"]}
    assert table[("all", "all")]["est_accuracy"] == pytest.approx(report["value"], abs=1e-9)
    assert table[("tag.device", "android")]["est_accuracy"] == pytest.approx(
        android["estimated"], abs=1e-9)
