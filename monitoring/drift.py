"""Drift of a logged window against the model's reference profile, with Evidently 0.7.

What is compared, column by column (one Evidently ``ValueDrift`` each):
  * the monitored input features (``preprocessing.IMAGE_FEATURES`` for images);
  * the embedding, as its projection on the top principal axes of the reference and the window
    pooled (``embedding.pc1`` ...). Why not Evidently's ``EmbeddingsDrift``: it always fits a
    t-SNE for its plot, which takes seconds; per-axis tests cost milliseconds and plot as
    ordinary histograms. Why pooled axes: axes fitted on the reference alone are the directions
    where the reference happens to spread most, so its projections are wider than any fresh
    sample's (with a small reference, K-S tells two samples of one distribution apart); pooled
    axes treat both sides alike and turn towards a real shift (figures: monitoring/README.md).
    The price: ``pc1`` of one report is not ``pc1`` of the next;
  * the predicted class (categorical) and the confidence.

The tests follow Evidently's defaults for the reference size (p-values up to 1,000 reference
rows: K-S for numbers, a chi-square for categories and few-valued numbers; normed Wasserstein /
Jensen-Shannon distances above), chosen here explicitly so the table names what ran. One
exception: Evidently's ``chisquare`` is a goodness-of-fit test that takes the reference's
proportions as exact, so with a small reference and a much larger window it calls the
reference's own sampling noise drift (see monitoring/README.md). A two-sample chi-square
(homogeneity of the 2 x K count table, ``chi2_2sample``) is registered with Evidently and used
instead. Why Bonferroni: the columns are many and correlated
(``mean_r/g/b`` equal ``brightness`` on grey images), so a share-of-columns rule flags or misses
depending on how many copies a signal has. Instead each p-value test runs at ``alpha / n_tests``,
which bounds the chance that a window drawn from the reference distribution shows *any*
drifted column by ``alpha``; the window drifted when at least one column (or ``min_share`` of
them) drifted. Distance tests keep Evidently's effect-size thresholds (0.1).

The current window is subsampled to ``max_rows`` (seeded) before testing: past a few thousand
rows the tests' power is bounded by the reference size anyway, and Evidently's per-column
histograms cost time in the row count.

A column that holds one value in both windows (an image model's width, height and aspect ratio
when every input has the model's size) cannot show drift: it is not tested (so it takes no share
of ``alpha`` either) and the report lists it as constant, with its value. ``drift.html`` opens
with a summary a person reads first (``drift_html.py``); Evidently's per-column charts follow.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .frames import embedding_matrix

TWO_SAMPLE_CHI2 = "chi2_2sample"
P_VALUE_METHODS = {"ks", TWO_SAMPLE_CHI2, "chisquare", "z", "fisher_exact", "cramer_von_mises",
                   "anderson", "mannw", "t_test", "g_test", "epps_singleton"}
DISTANCE_THRESHOLD = 0.1  # Evidently's default for wasserstein / jensenshannon
LARGE_REFERENCE = 1000  # Evidently switches from p-values to distances above this
PC_PREFIX = "embedding.pc"


@dataclass(frozen=True)
class DriftConfig:
    alpha: float = 0.05  # family-wise false-alarm rate of the p-value tests together
    min_share: float = 0.0  # share of columns that must drift (0 = any one column)
    max_rows: int = 20_000  # subsample each side to at most this many rows
    embedding_components: int = 8
    num_method: str | None = None  # e.g. "wasserstein" to override the size-based default
    cat_method: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class DriftRow:
    feature: str
    group: str  # "input", "embedding" or "output"
    method: str
    score: float
    threshold: float
    drifted: bool


@dataclass
class DriftResult:
    rows: list[DriftRow]
    dataset_drift: bool
    reference_rows: int
    current_rows: int
    tested_rows: int
    config: DriftConfig
    snapshot: Any = field(default=None, repr=False)  # Evidently's Snapshot (HTML, raw JSON)
    constant: dict[str, Any] = field(default_factory=dict)  # untested column -> its one value

    @property
    def drifted(self) -> list[DriftRow]:
        return [r for r in self.rows if r.drifted]

    @property
    def share_drifted(self) -> float:
        return len(self.drifted) / len(self.rows) if self.rows else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset_drift": self.dataset_drift,
            "share_drifted": self.share_drifted,
            "drifted_columns": len(self.drifted),
            "columns": len(self.rows),
            "reference_rows": self.reference_rows,
            "current_rows": self.current_rows,
            "tested_rows": self.tested_rows,
            "constant_columns": self.constant,
            "config": asdict(self.config),
            "rows": [asdict(r) for r in self.rows],
        }


def drift_report(reference: pd.DataFrame, current: pd.DataFrame, features: Sequence[str],
                 config: DriftConfig = DriftConfig()) -> DriftResult:
    """Compare ``current`` with ``reference`` (frames with the log's columns: features,
    ``emb_<i>``, ``predicted``, ``confidence``) and decide whether the window drifted."""
    if current.empty or reference.empty:
        raise ValueError(f"cannot test drift on {len(reference)} reference and "
                         f"{len(current)} current rows")
    ref = _sample(reference, config.max_rows, config.seed)
    cur = _sample(current, config.max_rows, config.seed)
    ref_table, cur_table, groups = drift_tables(ref, cur, features, config.embedding_components)
    constant = constant_columns(ref_table, cur_table)
    groups = {c: g for c, g in groups.items() if c not in constant}
    plan = test_plan(ref_table, cur_table, groups, config)
    snapshot = _run_evidently(ref_table[list(groups)], cur_table[list(groups)], plan, groups) \
        if plan else None
    rows = _rows(snapshot, plan, groups) if plan else []
    needed = max(1, math.ceil(config.min_share * len(rows)))
    return DriftResult(rows, sum(r.drifted for r in rows) >= needed, len(reference), len(current),
                       len(cur), config, snapshot, constant)


def constant_columns(ref: pd.DataFrame, cur: pd.DataFrame) -> dict[str, Any]:
    """Columns holding one and the same value in both windows -> that value (nothing to test)."""
    out: dict[str, Any] = {}
    for column in ref.columns:
        values = pd.concat([ref[column], cur[column]], ignore_index=True)
        if values.nunique(dropna=False) == 1:
            value = values.iloc[0]
            out[column] = value.item() if isinstance(value, np.generic) else value
    return out


def drift_tables(ref: pd.DataFrame, cur: pd.DataFrame, features: Sequence[str], components: int
                 ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """The columns the tests see, for both sides, and each column's group."""
    missing = [f for f in features if f not in ref.columns or f not in cur.columns]
    if missing:
        raise ValueError(f"features missing from the reference or the window: {missing}")
    groups = {f: "input" for f in features}
    ref_cols = {f: ref[f].to_numpy(np.float64) for f in features}
    cur_cols = {f: cur[f].to_numpy(np.float64) for f in features}
    ref_emb, cur_emb = embedding_matrix(ref), embedding_matrix(cur)
    if ref_emb.shape[1] and ref_emb.shape[1] == cur_emb.shape[1]:
        mean, axes = principal_axes(np.vstack([ref_emb, cur_emb]), components)
        ref_pc, cur_pc = (ref_emb - mean) @ axes.T, (cur_emb - mean) @ axes.T
        for i in range(axes.shape[0]):
            name = f"{PC_PREFIX}{i + 1}"
            groups[name] = "embedding"
            ref_cols[name], cur_cols[name] = ref_pc[:, i], cur_pc[:, i]
    for name, kind in (("predicted", "output"), ("confidence", "output")):
        groups[name] = kind
        ref_cols[name] = _column(ref, name)
        cur_cols[name] = _column(cur, name)
    return pd.DataFrame(ref_cols), pd.DataFrame(cur_cols), groups


def principal_axes(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the top-``k`` principal axes (rows, unit length) of ``x`` [N, D], by SVD."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    k = max(1, min(k, vt.shape[0], x.shape[0] - 1))
    # SVD's sign is arbitrary; fix it so the same data give the same axes everywhere.
    axes = vt[:k] * np.sign(vt[:k, [0]] + 1e-30)
    return mean, axes


@dataclass(frozen=True)
class _Test:
    column: str
    method: str
    threshold: float | None
    p_value: bool


def test_plan(ref: pd.DataFrame, cur: pd.DataFrame, groups: dict[str, str], config: DriftConfig
              ) -> list[_Test]:
    """Which test and threshold each column gets (Evidently's size-based defaults, made explicit,
    with Bonferroni-corrected p-value thresholds)."""
    draft = [_choose(c, ref[c], cur[c], c == "predicted", config) for c in groups]
    n_p = sum(t.p_value for t in draft) or 1
    return [t if not t.p_value else _Test(t.column, t.method, config.alpha / n_p, True)
            for t in draft]


def _choose(column: str, ref: pd.Series, cur: pd.Series, categorical: bool, config: DriftConfig
            ) -> _Test:
    large = len(ref) > LARGE_REFERENCE
    override = config.cat_method if categorical else config.num_method
    if override:
        p_value = override in P_VALUE_METHODS
        return _Test(column, override, None, p_value)
    few = pd.concat([ref, cur]).nunique() <= 5
    if large and (categorical or few):
        return _Test(column, "jensenshannon", DISTANCE_THRESHOLD, False)
    if large:
        return _Test(column, "wasserstein", DISTANCE_THRESHOLD, False)
    if categorical or few:
        return _Test(column, TWO_SAMPLE_CHI2, None, True)
    return _Test(column, "ks", None, True)


def two_sample_chi2(reference: np.ndarray, current: np.ndarray) -> float:
    """p-value of the chi-square test that two samples share one categorical distribution."""
    from scipy.stats import chi2_contingency

    ref = pd.Series(reference).value_counts()
    cur = pd.Series(current).value_counts()
    table = pd.concat([ref, cur], axis=1).fillna(0).to_numpy(np.float64).T
    if table.shape[1] < 2:
        return 1.0  # one value on both sides: nothing can differ
    return float(chi2_contingency(table, correction=False).pvalue)


def _two_sample_chi2_test(reference: pd.Series, current: pd.Series, feature_type: Any,
                          threshold: float) -> tuple[float, bool]:
    p_value = two_sample_chi2(reference.to_numpy(), current.to_numpy())
    return p_value, p_value < threshold


def _register_two_sample_chi2() -> None:
    from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
    from evidently.legacy.core import ColumnType

    test = StatTest(name=TWO_SAMPLE_CHI2, display_name="chi-square 2-sample p_value",
                    allowed_feature_types=[ColumnType.Categorical, ColumnType.Numerical])
    register_stattest(test, default_impl=_two_sample_chi2_test)


def _run_evidently(ref: pd.DataFrame, cur: pd.DataFrame, plan: list[_Test], groups: dict[str, str]
                   ) -> Any:
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    _register_two_sample_chi2()
    numerical = [c for c in groups if c != "predicted"]
    categorical = [c for c in groups if c == "predicted"]
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    metrics = [ValueDrift(column=t.column, method=t.method, threshold=t.threshold) for t in plan]
    report = Report(metrics, include_tests=True)
    return report.run(Dataset.from_pandas(cur, data_definition=definition),
                      Dataset.from_pandas(ref, data_definition=definition))


def _rows(snapshot: Any, plan: list[_Test], groups: dict[str, str]) -> list[DriftRow]:
    """Scores from Evidently's metric results, drift verdicts from its tests (same order)."""
    metrics = snapshot.dict()["metrics"]
    failed = {t.metric_config.params.get("column") for t in snapshot.tests_results
              if t.status.value == "FAIL"}
    rows = []
    for test, metric in zip(plan, metrics):
        config = metric["config"]
        threshold = test.threshold if test.threshold is not None else config.get("threshold")
        rows.append(DriftRow(test.column, groups[test.column], test.method,
                             float(metric["value"]), float(threshold), test.column in failed))
    return rows


def _column(frame: pd.DataFrame, name: str) -> np.ndarray:
    if name == "predicted":
        return frame[name].astype(str).to_numpy(object)
    return frame[name].to_numpy(np.float64)


def _sample(frame: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    return frame if len(frame) <= n else frame.sample(n=n, random_state=seed)


def format_table(result: DriftResult) -> str:
    """The report as a fixed-width table and a summary line."""
    head = f"{'feature':<22} {'group':<10} {'method':<14} {'score':>10} {'threshold':>10}"
    lines = [head + "  drifted"]
    for r in result.rows:
        lines.append(f"{r.feature:<22} {r.group:<10} {r.method:<14} {r.score:>10.4g} "
                     f"{r.threshold:>10.4g}  {'YES' if r.drifted else 'no'}")
    lines.append(f"drifted columns: {len(result.drifted)}/{len(result.rows)} "
                 f"(share {result.share_drifted:.3f}); dataset drift: "
                 f"{'YES' if result.dataset_drift else 'no'}; tested {result.tested_rows} of "
                 f"{result.current_rows} logged rows against {result.reference_rows} "
                 "reference rows")
    if result.constant:
        lines.append("constant in both windows (not tested): " + ", ".join(
            f"{name} = {value}" for name, value in result.constant.items()))
    return "\n".join(lines)


def save_report(result: DriftResult, out_dir: str | Path, meta: dict[str, Any]) -> dict[str, Path]:
    """Write ``drift.html`` (our summary, then Evidently's per-column charts) and ``drift.json``
    (our rows + Evidently's results). ``meta`` names the model, version and window; an
    ``estimated_accuracy`` in it shows in the summary."""
    from .drift_html import render_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": out / "drift.html", "json": out / "drift.json"}
    snapshot = result.snapshot
    doc = {**meta, **result.to_dict()}
    evidently_html = snapshot.get_html_str(as_iframe=False) if snapshot is not None else None
    paths["html"].write_text(render_report(doc, evidently_html), encoding="utf-8")
    doc["evidently"] = snapshot.dict() if snapshot is not None else None
    paths["json"].write_text(json.dumps(doc, indent=1, default=_json_default))
    return paths


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
