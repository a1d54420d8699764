"""The drift report's summary (monitoring/drift_html.py) on hand-made report documents."""

from __future__ import annotations

import pytest

from monitoring.drift_html import (SUMMARY_ID, accuracy_text, ranked, readable, render_report,
                                   render_summary)


def _row(feature: str, method: str, score: float, threshold: float, drifted: bool) -> dict:
    return {"feature": feature, "group": "input", "method": method, "score": score,
            "threshold": threshold, "drifted": drifted}


DOC = {
    "model": "digits-cnn", "version": "v3", "since": "2025-05-01T00:00:00+00:00",
    "until": "2025-05-08T00:00:00+00:00", "dataset_drift": True, "reference_rows": 270,
    "current_rows": 50_000, "tested_rows": 20_000, "config": {"alpha": 0.05, "min_share": 0.0},
    "constant_columns": {"width": 32.0, "predicted": "3"},
    "rows": [_row("contrast", "ks", 0.002, 0.0025, True),
             _row("brightness", "ks", 1e-40, 0.0025, True),
             _row("embedding.pc1", "wasserstein", 0.35, 0.1, True),
             _row("edge_density", "ks", 0.4, 0.0025, False)],
}


@pytest.mark.parametrize("value, text", [
    (0.0025, "0.0025"), (0.05 / 17, "0.00294"), (0.5, "0.5"), (1.0, "1"), (32.0, "32"),
    (3.665e-91, "3.67e-91"), (0.000123456, "1.23e-04"), (0.0, "0"), (123456.0, "1.23e+05"),
    (None, "n/a")])
def test_numbers_are_readable(value, text) -> None:
    assert readable(value) == text


def test_drifted_columns_rank_by_how_far_past_their_threshold() -> None:
    order = [r["feature"] for r in ranked(DOC["rows"])]
    # brightness: -log10(1e-40) / -log10(0.0025) = 15.4; pc1: 0.35 / 0.1 = 3.5; contrast: 1.04
    assert order == ["brightness", "embedding.pc1", "contrast", "edge_density"]


def test_the_summary_names_the_model_window_rows_verdict_and_leaves_constants_out() -> None:
    html = render_summary(DOC)
    assert html.startswith(f'<section id="{SUMMARY_ID}">')
    assert "Drift report: digits-cnn, version v3" in html
    assert "Drift detected: 3 of 4 tested columns drifted (75%)" in html
    assert "(7 days)" in html
    assert "50000 logged in the window, 20000 sampled for the tests, against 270" in html
    assert "0.05 / 3 = 0.0167" in html and "distances drift from 0.1" in html
    assert html.index("brightness") < html.index("embedding.pc1") < html.index("contrast")
    constants = html.split("Constant in both windows", 1)[1]
    assert "width = 32, predicted = 3" in constants.split("</p>")[0]
    assert "Estimated accuracy</dt><dd>not available" in html


def test_no_drift_reads_as_such() -> None:
    doc = {**DOC, "dataset_drift": False,
           "rows": [{**r, "drifted": False} for r in DOC["rows"]], "constant_columns": {}}
    html = render_summary(doc)
    assert "No drift detected: 0 of 4 tested columns drifted" in html and "<p>None.</p>" in html


@pytest.mark.parametrize("value, text", [
    (0.873, "87.3%"), ({"value": 0.9, "method": "confidence"}, "90.0% (method: confidence)"),
    (None, "not available"), ({"method": "confidence"}, "not available"), (True, "not available")])
def test_estimated_accuracy_shows_when_the_report_has_one(value, text) -> None:
    assert accuracy_text(value) == text


def test_the_summary_goes_first_in_evidentlys_page_and_stands_alone_without_it() -> None:
    evidently = ("<!DOCTYPE html><html><head><meta charset='UTF-8'></head>\n<body>"
                 "<div id=\"root_metric_x\"></div></body></html>")
    page = render_report(DOC, evidently)
    assert page.index("<title>Drift: digits-cnn v3</title>") < page.index("</head>")
    summary = page.index(f'<section id="{SUMMARY_ID}">')
    assert page.index("<body>") < summary < page.index("root_metric_x")
    alone = render_report(DOC, None)
    assert alone.startswith("<!DOCTYPE html>") and SUMMARY_ID in alone
    with pytest.raises(ValueError, match="no <head> or <body>"):
        render_report(DOC, "<div>not a page</div>")
