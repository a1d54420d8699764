"""The shipped alert rules and dashboard (deploy/): linted, unit-tested, well formed.

  * ``promtool check rules`` lints deploy/prometheus/alerts.yml and ``promtool test rules`` runs
    deploy/prometheus/alerts_test.yml; every alert has a case where it fires and one where it
    stays quiet;
  * the Grafana dashboard (deploy/grafana/clfserve-dashboard.json) has panels with PromQL
    targets, and every query parses (promtool, as recording rules);
  * ``query_metric_names`` lists what the rules and the dashboard read, for the real-scrape test
    (tests/e2e/test_observability.py: every one of them is in the service's /metrics).

promtool is Debian's ``prometheus`` package (``make test`` installs it where it can); without it
the promtool tests skip and say so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
EXAMPLE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "clfserve-dashboard.json"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
needs_promtool = pytest.mark.skipif(
    not os.access(PROMTOOL, os.X_OK),
    reason="no promtool binary: install Debian's package (apt-get install -y prometheus)")
# Dashboard variables, replaced by what Grafana would send
VARIABLES = {"$__rate_interval": "5m", "$job": "clfserve", "$model": ".+"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
             "unless", "bool", "offset", "inf", "nan"}


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, and of the annotations."""
    doc = json.loads(DASHBOARD.read_text())
    out = [(panel["title"], target["expr"]) for panel in doc["panels"]
           for target in panel.get("targets", [])]
    out += [(a["name"], a["expr"]) for a in doc.get("annotations", {}).get("list", [])
            if "expr" in a]
    return out


def expand(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers outside strings, label matchers,
    ranges and label lists, that are neither functions nor keywords."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        name = match.group(0)
        if name.lower() in _KEYWORDS or e[match.end():].lstrip().startswith("("):
            continue
        names.add(name)
    return names


def query_metric_names() -> dict[str, set[str]]:
    """Metric name -> where it is read ("alert X", "panel Y"), over the rules and the dashboard."""
    where: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            where.setdefault(name, set()).add(f"alert {rule['alert']}")
    for title, expr in dashboard_targets():
        for name in metric_names(expr):
            where.setdefault(name, set()).add(f"panel {title!r}")
    return where


def test_metric_names_are_read_from_promql() -> None:
    expr = ('histogram_quantile(0.99, sum by (job, le) (rate(x_seconds_bucket{a="b", c=~"/v1/.+"}'
            '[5m]))) > 0.5 and on (job) (time() - max by (model) (y_ts) > 1e-3) '
            'or absent(up{job="j"} == 1) / on (job) group_left () z_total offset 5m')
    assert metric_names(expr) == {"x_seconds_bucket", "y_ts", "up", "z_total"}
    assert metric_names("sum(rate(a_total{m=~\"$model\"}[$__rate_interval]))") == {"a_total"}


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fires, quiet = set(), set()
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), f"alerts never seen firing in {RULE_TESTS.name}"
    assert names - quiet == set(), f"alerts never seen staying quiet in {RULE_TESTS.name}"
    assert len(names) == len(alert_rules()), "two alerts share a name"


def test_every_alert_has_a_severity_and_a_summary() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_dashboard_is_well_formed() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 30
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert {"job", "model"} <= set(variables)
    panels = doc["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in targets:
            assert target["expr"].strip() and metric_names(target["expr"]), panel["title"]


def test_the_dashboard_shows_what_the_issue_lists() -> None:
    titles = " | ".join(title.lower() for title, _ in dashboard_targets())
    for words in ("request rate", "error rate", "rejections by reason", "latency p50 / p99",
                  "queue wait", "batch size", "inference", "predictions by class", "confidence",
                  "ood rate", "drift share", "drift scores", "estimated accuracy",
                  "prediction log commit time", "prediction log errors",
                  "model version in production", "reloads", "replicas up"):
        assert words in titles, f"no panel about {words!r}"


@needs_promtool
def test_the_alert_rules_pass_promtool_check() -> None:
    run = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in run.stdout


@needs_promtool
def test_the_alert_rules_pass_their_unit_tests() -> None:
    run = subprocess.run([PROMTOOL, "test", "rules", str(RULE_TESTS)], capture_output=True,
                         text=True, timeout=120, cwd=RULE_TESTS.parent)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


@needs_promtool
def test_the_example_prometheus_config_is_valid() -> None:
    run = subprocess.run([PROMTOOL, "check", "config", str(EXAMPLE_CONFIG)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


@needs_promtool
def test_every_dashboard_query_parses(tmp_path) -> None:
    rules = [{"record": f"clfserve:dashboard_query:{i}", "expr": expand(expr)}
             for i, (_, expr) in enumerate(dashboard_targets())]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
