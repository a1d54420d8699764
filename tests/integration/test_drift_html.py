"""``drift.html`` opens with a summary a person reads first.

A real report (Evidently included) over synthetic windows: brightness shifted, width, height and
aspect ratio constant in both. The page must name the model, the version, the window and the
rows compared, give the verdict, rank the drifted columns, list the constant columns as left
out, and print thresholds and p-values readably. Then headless Chromium (Debian's ``chromium``,
installed by ``make test`` where it can be) renders the page with its scripts: the summary must
be at the top of the first screen, with the verdict and the strongest drifted column inside it,
above Evidently's charts. Skipped, with the reason, where Chromium is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from monitoring.drift import DriftConfig, drift_report, save_report
from monitoring.drift_html import DETAIL_ID, SUMMARY_ID
from preprocessing import IMAGE_FEATURES
from tools.scale_bench import reference_frame

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason="no chromium binary: install Debian's package (apt-get install -y chromium)")
VIEWPORT = (1280, 900)
META = {"model": "digits-cnn", "version": "v7", "since": "2025-05-01T00:00:00+00:00",
        "until": "2025-05-02T00:00:00+00:00", "created": 1_746_144_000.0,
        "estimated_accuracy": 0.873}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict]:
    rng = np.random.default_rng(11)
    reference, current = reference_frame(300, rng), reference_frame(400, rng)
    for frame in (reference, current):  # every input at the model's size, as in production
        frame["width"], frame["height"], frame["aspect_ratio"] = 32.0, 32.0, 1.0
    current["brightness"] += 0.2  # four standard deviations: the one column that drifts
    result = drift_report(reference, current, IMAGE_FEATURES, DriftConfig())
    out = tmp_path_factory.mktemp("drift-html")
    paths = save_report(result, out, META)
    return paths["html"], json.loads(paths["json"].read_text())


def test_the_report_drops_the_constant_columns_and_tests_the_rest(report) -> None:
    _, doc = report
    assert doc["constant_columns"] == {"width": 32.0, "height": 32.0, "aspect_ratio": 1.0}
    tested = {r["feature"] for r in doc["rows"]}
    assert not tested & {"width", "height", "aspect_ratio"}
    assert doc["dataset_drift"] and doc["rows"]
    top = min((r for r in doc["rows"] if r["drifted"]), key=lambda r: r["score"])
    assert top["feature"] == "brightness"
    # Bonferroni over the columns actually tested (the constant ones take no share of alpha)
    assert doc["rows"][0]["threshold"] == pytest.approx(0.05 / len(doc["rows"]))


def test_the_summary_comes_first_in_the_page_and_says_what_a_reader_needs(report) -> None:
    html_path, doc = report
    page = html_path.read_text(encoding="utf-8")
    summary_at, detail_at = page.find(f'id="{SUMMARY_ID}"'), page.find(f'id="{DETAIL_ID}"')
    first_chart = page.find('id="root_metric_')  # Evidently's dashboard mounts here
    assert 0 < summary_at < detail_at < first_chart
    summary = _text(page[summary_at:detail_at])
    assert "Drift report: digits-cnn, version v7" in summary
    assert f"Drift detected: 1 of {len(doc['rows'])} tested columns drifted" in summary
    assert "2025-05-01T00:00:00+00:00 to 2025-05-02T00:00:00+00:00 (24 h)" in summary
    assert "400 logged in the window, against 300 reference rows" in summary
    assert "Estimated accuracy 87.3%" in summary
    drifted = summary.split("Drifted columns, strongest first", 1)[1]
    assert drifted.split("Constant in both windows")[0].split()[7] == "brightness"  # row 1
    assert "width = 32, height = 32, aspect_ratio = 1" in summary
    threshold = f"{0.05 / len(doc['rows']):.3g}"
    assert threshold in summary and "0.00 " not in summary + " "
    assert re.search(r"brightness input Kolmogorov-Smirnov p-value \d\.\d\de-\d+ ", summary)


def test_without_an_estimate_the_summary_says_not_available(report) -> None:
    from monitoring.drift_html import render_summary

    _, doc = report
    doc = {k: v for k, v in doc.items() if k != "estimated_accuracy"}
    assert "Estimated accuracy not available" in _text(render_summary(doc))


@needs_chromium
def test_chromium_shows_the_summary_on_the_first_screen_above_every_chart(report, tmp_path):
    html_path, doc = report
    probe = tmp_path / "probe.html"  # the report plus a script that measures the laid-out page
    probe.write_text(html_path.read_text(encoding="utf-8").replace("</body>", _MEASURE + "</body>"),
                     encoding="utf-8")
    dom = _chromium(["--virtual-time-budget=20000", "--dump-dom", probe.as_uri()], tmp_path)
    found = re.search(r'<pre id="layout">(.*?)</pre>', dom, re.S)
    assert found, f"the measuring script did not run; DOM starts: {dom[:500]}"
    layout = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    height = layout["viewport"][1]
    assert layout["charts"] > 0, "Evidently's charts did not render: nothing to be above"
    assert layout["summary_top"] < 40, layout  # the page opens on it
    assert layout["title"] == "Drift report: digits-cnn, version v7"
    assert layout["verdict"].startswith("Drift detected: 1 of") and layout["verdict_bottom"] < height
    assert layout["first_drifted"] == "brightness" and layout["first_drifted_bottom"] < height
    assert layout["first_chart_top"] >= layout["summary_bottom"], layout
    shot = tmp_path / "first-screen.png"
    _chromium([f"--screenshot={shot}", "--virtual-time-budget=20000", html_path.as_uri()],
              tmp_path)
    assert shot.stat().st_size > 10_000  # drawn, not blank


_MEASURE = """<script>
setTimeout(function () {
  var s = document.getElementById("drift-summary");
  var verdict = s.querySelector(".verdict");
  var row = s.querySelector("table tr:nth-child(2)");
  var charts = document.querySelectorAll(".js-plotly-plot, [id^=root_metric_] svg");
  var firstChart = charts.length ? charts[0].getBoundingClientRect().top + window.scrollY : -1;
  var out = {
    viewport: [window.innerWidth, window.innerHeight],
    title: s.querySelector("h1").textContent,
    summary_top: s.getBoundingClientRect().top,
    summary_bottom: s.getBoundingClientRect().bottom + window.scrollY,
    verdict: verdict.textContent, verdict_bottom: verdict.getBoundingClientRect().bottom,
    first_drifted: row.children[1].textContent,
    first_drifted_bottom: row.getBoundingClientRect().bottom,
    charts: charts.length, first_chart_top: firstChart
  };
  var pre = document.createElement("pre");
  pre.id = "layout";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 5000);
</script>
"""


def _chromium(args: list[str], work: Path) -> str:
    started = time.monotonic()
    run = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--hide-scrollbars", f"--user-data-dir={work / 'chromium-profile'}",
         f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", *args],
        capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, (f"chromium exited {run.returncode} after "
                                 f"{time.monotonic() - started:.0f} s:\n{run.stderr[-2000:]}")
    return run.stdout


def _text(html: str) -> str:
    """The visible words of an HTML fragment, one space apart."""
    import html as html_lib

    return " ".join(html_lib.unescape(re.sub(r"<[^>]+>", " ", html)).split())
