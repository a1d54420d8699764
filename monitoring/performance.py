"""Accuracy without labels: confidence-based performance estimation (CBPE).

Labels arrive late or never, so a window's accuracy is estimated from the model's own
confidence, calibrated on the reference profile (the validation rows, which have labels):

  1. **calibrate**: on the reference, fit an isotonic regression (pool adjacent violators) of
     "the answer was right" on the top-1 confidence. It is kept only where it lowers the
     expected calibration error *out of fold* (fit on k-1 of 5 folds, measured on the k-th)
     against the raw confidence; otherwise the raw confidence is used as it is (identity).
     In-sample the isotonic fit always looks better, and on a few hundred rows it can chase
     noise, hence the out-of-fold comparison;
  2. **estimate**: the expected share of right answers in a window is the mean calibrated
     confidence of its rows, overall and per slice. Its interval covers two sources of error:
     the window's outcomes (each row is right with probability ``p_i``: standard error
     ``sqrt(sum p_i (1 - p_i)) / n``) and the calibration fit (the spread of the estimate over
     isotonic fits to bootstrap resamples of the reference). It does not cover a change in
     calibration itself, which is what the method assumes away.

  3. **foreign inputs**: confidence says nothing about inputs far from the training data (a
     model is often confidently wrong on them), so OOD-flagged answers beyond the share the
     OOD scorer flags on in-distribution data by its calibration (``ForeignPrior``) count as
     right by chance only. With ``f`` the window's flagged share and ``r`` that reference rate,
     a flagged row's probability is ``w p + (1 - w) / classes`` with ``w = min(1, r / f)``:
     a window flagged at the reference rate is estimated as before; one flagged throughout
     sinks to chance.
  4. **what feedback says about them**: chance is what nothing else tells; a model trained to
     be robust to a shift answers flagged inputs right far more often (``make demo``'s model on
     its shifted digits: 93.5% right, estimated 12.5% at chance). Where the window has labelled
     flagged rows, the foreign accuracy ``q`` is learned from them (``ForeignPrior.learn``):
     each is right with probability ``w p + (1 - w) q``, so with ``n`` of them, ``R`` right,
     ``q = ((R - w sum p) / (1 - w) + k / classes) / (n + k)``, shrunk towards chance by ``k =
     FOREIGN_PSEUDO_ROWS``, and its standard error joins the interval. It assumes the flagged
     rows that got feedback are right about as often as those that did not.

Where it holds: covariate shift that keeps the model's calibration, i.e. P(right | confidence)
unchanged: a different mix of inputs the model has seen the like of, harder or easier ones
(more of one class, more blurred scans), where the model's confidence falls with its accuracy;
and, through step 3, shifts that take inputs out of the model's domain, where the OOD flags
catch them. Where it fails: concept shift (the same inputs now carry other labels: neither the
confidence nor the OOD flags can know, so the estimate stays at the reference's while the
realised accuracy collapses), and foreign inputs the OOD flags miss. The report carries the
window's share of OOD-flagged answers and warns above ``OOD_WARNING``. Measured figures:
monitoring/README.md, "Accuracy without labels";
``tests/integration/test_performance_estimation.py`` checks each case.

numpy only: the report commands call it; nothing here runs on the request path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .slices import MISSING

IDENTITY, ISOTONIC = "identity", "isotonic"
Z_95 = 1.959964
# The bootstrap fits are kept as their values on this confidence grid: a window's spread over
# them is then one matrix product, whatever its size (rows are rounded to the grid, a change of
# at most half a step in confidence: nothing next to the spread it measures).
GRID = np.linspace(0.0, 1.0, 1001)
# Above this share of OOD-flagged answers the report warns that the estimate is not to be
# trusted (the scorer flags ~3% of validation inputs and ~9% of unseen digits by design).
OOD_WARNING = 0.25
# Step 4: the foreign accuracy learned from feedback starts from this many rows at chance, so a
# handful of labels does not move it all the way (10 right of 10: 0.85 for ten classes; 94 of
# 100: 0.92).
FOREIGN_PSEUDO_ROWS = 2


def isotonic_fit(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing least-squares fit of ``y`` on ``x`` (pool adjacent violators).

    Returns the knots: the distinct ``x`` sorted and the fitted value at each; predict with
    ``np.interp`` (linear between knots, clipped outside them, as scikit-learn's
    ``IsotonicRegression(out_of_bounds="clip")`` does).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64)
    if x.size == 0:
        raise ValueError("isotonic_fit needs at least one point")
    knots, inverse = np.unique(x, return_inverse=True)  # ties: one point with the mean y
    sum_w = np.bincount(inverse, weights=w, minlength=knots.size)
    sum_wy = np.bincount(inverse, weights=w * y, minlength=knots.size)
    # Blocks on a stack: (sum of w*y, sum of w, how many knots); merge while they decrease.
    block_wy: list[float] = []
    block_w: list[float] = []
    block_n: list[int] = []
    for wy, ww in zip(sum_wy.tolist(), sum_w.tolist()):
        block_wy.append(wy)
        block_w.append(ww)
        block_n.append(1)
        while len(block_w) > 1 and block_wy[-2] * block_w[-1] >= block_wy[-1] * block_w[-2]:
            wy_last, w_last, n_last = block_wy.pop(), block_w.pop(), block_n.pop()
            block_wy[-1] += wy_last
            block_w[-1] += w_last
            block_n[-1] += n_last
    means = np.asarray(block_wy) / np.asarray(block_w)
    return knots, np.repeat(means, block_n)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10
                               ) -> float:
    """ECE: ``bins`` equal-width confidence bins, the row-weighted mean of |accuracy - mean
    confidence| per bin (the slice report's definition)."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        return math.nan
    b = np.minimum((conf * bins).astype(np.int64), bins - 1).clip(0)
    n = np.bincount(b, minlength=bins)
    gap = np.abs(np.bincount(b, weights=ok, minlength=bins)
                 - np.bincount(b, weights=conf, minlength=bins))
    return float(gap.sum() / n.sum())


@dataclass(frozen=True)
class Calibrator:
    """Top-1 confidence -> probability that the answer is right, fitted on the reference."""

    method: str  # IDENTITY or ISOTONIC
    knots: np.ndarray = field(repr=False)  # isotonic: distinct confidences; identity: empty
    values: np.ndarray = field(repr=False)  # isotonic: fitted P(right) at each knot
    ece_raw: float  # out-of-fold ECE of the raw confidence on the reference
    ece_isotonic: float  # out-of-fold ECE of the isotonic fit (nan: not tried)
    reference_rows: int  # labelled reference rows it was fitted on
    reference_accuracy: float
    bootstrap: np.ndarray = field(default_factory=lambda: np.empty((0, GRID.size)),
                                  repr=False)  # [fits, GRID.size]: bootstrap fits on GRID

    def __call__(self, confidence: np.ndarray) -> np.ndarray:
        conf = np.asarray(confidence, dtype=np.float64)
        if self.method == IDENTITY:
            return np.clip(conf, 0.0, 1.0)
        return np.interp(conf, self.knots, self.values)

    def calibration_se(self, confidence: np.ndarray) -> float:
        """Spread of the mean calibrated confidence of ``confidence`` over the bootstrap fits
        (0 for the identity, which fits nothing)."""
        conf = np.asarray(confidence, dtype=np.float64)
        if self.bootstrap.shape[0] < 2 or conf.size == 0:
            return 0.0
        cells = np.clip(np.rint(conf * (GRID.size - 1)).astype(np.int64), 0, GRID.size - 1)
        means = self.bootstrap @ np.bincount(cells, minlength=GRID.size) / conf.size
        return float(np.std(means, ddof=1))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "ece_raw": _num(self.ece_raw),
                "ece_isotonic": _num(self.ece_isotonic), "reference_rows": self.reference_rows,
                "reference_accuracy": _num(self.reference_accuracy)}

    def describe(self) -> str:
        iso = ("not tried" if math.isnan(self.ece_isotonic) else f"{self.ece_isotonic:.3f}")
        return (f"calibration {self.method} on {self.reference_rows} reference rows "
                f"(reference accuracy {self.reference_accuracy:.3f}; out-of-fold ECE raw "
                f"{self.ece_raw:.3f}, isotonic {iso})")


def fit_calibrator(confidence: np.ndarray, correct: np.ndarray, folds: int = 5, bins: int = 10,
                   bootstrap: int = 100, min_rows: int = 50, seed: int = 0) -> Calibrator:
    """Choose identity or isotonic by out-of-fold ECE on labelled reference rows (see the
    module docstring). Fewer than ``min_rows`` rows: identity, isotonic not tried."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if conf.shape != ok.shape or conf.ndim != 1:
        raise ValueError(f"confidence {conf.shape} and correct {ok.shape} must be 1-d, aligned")
    if conf.size == 0:
        raise ValueError("no labelled reference rows to calibrate on")
    n = conf.size
    accuracy = float(ok.mean())
    ece_raw = expected_calibration_error(conf, ok, bins)
    if n < max(min_rows, 2 * folds):
        return Calibrator(IDENTITY, np.empty(0), np.empty(0), ece_raw, math.nan, n, accuracy)
    rng = np.random.default_rng(seed)
    fold = rng.permutation(n) % folds
    out_of_fold = np.empty(n)
    for k in range(folds):
        held = fold == k
        x, y = isotonic_fit(conf[~held], ok[~held])
        out_of_fold[held] = np.interp(conf[held], x, y)
    ece_iso = expected_calibration_error(out_of_fold, ok, bins)
    if ece_iso >= ece_raw:  # the identity fits nothing: its out-of-fold ECE is its ECE
        return Calibrator(IDENTITY, np.empty(0), np.empty(0), ece_raw, ece_iso, n, accuracy)
    knots, values = isotonic_fit(conf, ok)
    boots = np.empty((bootstrap, GRID.size))
    for b in range(bootstrap):
        pick = rng.integers(0, n, n)
        boots[b] = np.interp(GRID, *isotonic_fit(conf[pick], ok[pick]))
    return Calibrator(ISOTONIC, knots, values, ece_raw, ece_iso, n, accuracy, boots)


def calibrate_reference(reference: Any, **kwargs: Any) -> Calibrator | None:
    """A calibrator from a ``reference.Reference`` (its labelled rows); None without labels."""
    labels = np.asarray(reference.labels)
    known = labels >= 0
    if not known.any():
        return None
    correct = (np.asarray(reference.predicted)[known] == labels[known]).astype(np.float64)
    return fit_calibrator(np.asarray(reference.confidence)[known], correct, **kwargs)


@dataclass(frozen=True)
class ForeignPrior:
    """How OOD-flagged answers count (steps 3 and 4 of the module doc)."""

    reference_rate: float  # the share of in-distribution inputs the OOD scorer flags
    chance: float  # 1 / classes: how often a foreign input's answer is right, knowing nothing
    # learned from the window's feedback on flagged rows (``learn``); None: ``chance``
    learned: float | None = None
    learned_se: float = 0.0  # its standard error
    learned_from: int = 0  # how many labelled flagged rows it was learned from

    @property
    def accuracy(self) -> float:
        """How often a foreign input's answer is taken to be right."""
        return self.chance if self.learned is None else self.learned

    def weight(self, flags: np.ndarray) -> float | None:
        """``w``: the share of flagged rows that are in-distribution, by the reference rate;
        None where no more are flagged than the reference rate (nothing foreign)."""
        share = float(flags.mean()) if flags.size else 0.0
        return None if share <= self.reference_rate else self.reference_rate / share

    def adjust(self, p: np.ndarray, flags: np.ndarray) -> np.ndarray:
        """Rows' probabilities of being right, the flagged beyond the reference rate at
        ``accuracy`` (``flags``: one bool per row of ``p``)."""
        flags = np.asarray(flags, dtype=bool)
        w = self.weight(flags)
        if w is None:
            return p
        return np.where(flags, w * p + (1.0 - w) * self.accuracy, p)

    def learn(self, p: np.ndarray, flags: np.ndarray, correct: np.ndarray) -> "ForeignPrior":
        """This prior with the foreign accuracy learned from the window's feedback (module doc,
        step 4): a labelled flagged row is right with probability ``w p + (1 - w) q``, so the
        right answers among them give ``q``, shrunk towards chance by ``FOREIGN_PSEUDO_ROWS``.
        ``p``: the rows' calibrated confidences; ``correct``: 1/0, nan where unlabelled."""
        flags = np.asarray(flags, dtype=bool)
        ok = np.asarray(correct, dtype=np.float64)
        w = self.weight(flags)
        labelled = flags & ~np.isnan(ok)
        n = int(labelled.sum())
        if w is None or n == 0:
            return self
        right, expected_in = float(ok[labelled].sum()), w * float(np.asarray(p)[labelled].sum())
        k = FOREIGN_PSEUDO_ROWS
        q = ((right - expected_in) / (1.0 - w) + k * self.chance) / (n + k)
        q = min(1.0, max(0.0, q))
        r = w * np.asarray(p)[labelled] + (1.0 - w) * q  # each labelled row's chance of right
        se = math.sqrt(float((r * (1.0 - r)).sum())) / ((1.0 - w) * (n + k))
        return ForeignPrior(self.reference_rate, self.chance, q, se, n)

    def learned_term_se(self, flags: np.ndarray) -> float:
        """The standard error a learned foreign accuracy adds to the mean over rows with these
        flags: each foreign row's share of the mean times ``learned_se``."""
        w = self.weight(np.asarray(flags, dtype=bool))
        if self.learned is None or w is None:
            return 0.0
        return (1.0 - w) * float(np.mean(flags)) * self.learned_se

    def to_dict(self) -> dict[str, Any]:
        return {"reference_rate": self.reference_rate, "chance": self.chance,
                "accuracy": self.accuracy, "learned_from": self.learned_from,
                "learned_se": self.learned_se if self.learned is not None else None}


def foreign_prior(reference: Any) -> ForeignPrior | None:
    """The prior of the OOD scorer the service fits on this reference profile (the same
    ``fit_ood``); None when it cannot be fitted (too few rows)."""
    from .ood import fit_ood

    try:
        scorer = fit_ood(reference)
    except ValueError:
        return None
    return ForeignPrior(scorer.expected_flag_rate, 1.0 / max(1, len(reference.classes)))


@dataclass(frozen=True)
class Estimate:
    """Estimated accuracy of some rows, with the realised accuracy of those that have labels."""

    n: int
    estimated: float
    se: float  # outcomes and calibration fit together
    low: float  # 95% interval, clipped to [0, 1]
    high: float
    n_labelled: int
    realised: float  # nan without labelled rows
    estimated_labelled: float  # the estimate on the labelled rows only: compare with realised

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "estimated": _num(self.estimated), "se": _num(self.se),
                "low": _num(self.low), "high": _num(self.high), "n_labelled": self.n_labelled,
                "realised": _num(self.realised),
                "estimated_labelled": _num(self.estimated_labelled)}


def estimate(calibrator: Calibrator, confidence: np.ndarray,
             correct: np.ndarray | None = None, ood: np.ndarray | None = None,
             prior: ForeignPrior | None = None) -> Estimate:
    """Estimated accuracy of rows with these top-1 confidences; ``correct`` (1/0, nan where
    unlabelled) adds the realised accuracy of the labelled ones; ``ood`` (their flags) and
    ``prior`` count the flagged beyond the reference rate at chance (module doc, step 3)."""
    conf = np.asarray(confidence, dtype=np.float64)
    n = int(conf.size)
    if n == 0:
        return Estimate(0, math.nan, math.nan, math.nan, math.nan, 0, math.nan, math.nan)
    p = calibrator(conf)
    learned_se = 0.0
    if prior is not None and ood is not None:
        p = prior.adjust(p, ood)
        learned_se = prior.learned_term_se(ood)
    value = float(p.mean())
    se = math.hypot(math.sqrt(float((p * (1 - p)).sum())) / n, calibrator.calibration_se(conf),
                    learned_se)
    ok = np.full(n, np.nan) if correct is None else np.asarray(correct, dtype=np.float64)
    labelled = ~np.isnan(ok)
    n_lab = int(labelled.sum())
    realised = float(ok[labelled].mean()) if n_lab else math.nan
    on_labelled = float(p[labelled].mean()) if n_lab else math.nan
    return Estimate(n, value, se, max(0.0, value - Z_95 * se), min(1.0, value + Z_95 * se),
                    n_lab, realised, on_labelled)


def performance_report(calibrator: Calibrator, confidence: np.ndarray,
                       correct: np.ndarray | None = None,
                       slices: Mapping[str, Sequence[Any]] | None = None,
                       ood: np.ndarray | None = None,
                       prior: ForeignPrior | None = None) -> dict[str, Any]:
    """The ``estimated_accuracy`` entry of a drift report: the whole window (``value``, its
    interval, the realised accuracy where labelled, the OOD-flagged share when ``ood`` is
    given, a ``warning`` above ``OOD_WARNING``), the calibration, and one row per slice value
    (``slices``: column name -> one value per row; missing values count as ``MISSING``).
    With ``ood`` and ``prior``, flagged answers beyond the reference rate count at chance, in
    the window and in each slice by its own flagged share."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.full(conf.size, np.nan) if correct is None else np.asarray(correct, np.float64)
    flags = None if ood is None else np.asarray(ood, dtype=bool)
    if prior is not None and flags is not None:  # the window's feedback on flagged rows
        prior = prior.learn(calibrator(conf), flags, ok)

    def figures(part: np.ndarray | slice) -> dict[str, Any]:
        share = None if flags is None or not flags[part].size else float(flags[part].mean())
        return {**estimate(calibrator, conf[part], ok[part],
                           None if flags is None else flags[part], prior).to_dict(),
                "ood_share": share}

    whole = figures(slice(None))
    rows = []
    for name, column in (slices or {}).items():
        values, groups = np.unique(_keys(column), return_inverse=True)
        order = np.argsort(groups, kind="stable")
        bounds = np.searchsorted(groups[order], np.arange(values.size + 1))
        for i, value in enumerate(values.tolist()):
            rows.append({"slice": name, "value": value,
                         **figures(order[bounds[i]:bounds[i + 1]])})
    warning = None
    if whole["ood_share"] is not None and whole["ood_share"] > OOD_WARNING:
        if prior is None:
            counted = "the estimate may be far too high"
        elif prior.learned is None:
            counted = "the flagged beyond the reference rate count as right by chance only"
        else:
            counted = (f"the flagged beyond the reference rate count as right "
                       f"{100 * prior.learned:.0f}% of the time, as the feedback on "
                       f"{prior.learned_from} of them says")
        learned = prior is not None and prior.learned is not None
        warning = (f"{100 * whole['ood_share']:.0f}% of the window is flagged out-of-"
                   f"distribution: confidence says little about accuracy on such inputs ("
                   f"{counted})" + ("" if learned else "; check with feedback labels"))
    return {"value": whole["estimated"], **whole, "warning": warning,
            "method": "confidence-based (CBPE)" + (", OOD-aware" if prior is not None else ""),
            "calibration": calibrator.to_dict(),
            "foreign_prior": None if prior is None else prior.to_dict(), "by_slice": rows}


def window_performance(reference: Any, frame: Any) -> dict[str, Any] | None:
    """``performance_report`` of a log window (a ``PredictionLog.frame``: ``confidence``,
    ``predicted``, ``label`` from feedback, ``tag.<key>`` columns, the features) against a
    ``reference.Reference``, per slice over the slice report's columns (the tags and the derived
    buckets); None when the reference has no labels to calibrate on. Report code: the derived
    slices come from ``slice_metrics`` (pandas)."""
    from .slice_metrics import add_derived_slices

    calibrator = calibrate_reference(reference)
    if calibrator is None:
        return None
    frame, derived = add_derived_slices(frame)
    columns = sorted(c for c in frame.columns if str(c).startswith("tag.")) + derived
    label = frame["label"].to_numpy(object) if "label" in frame.columns else [None] * len(frame)
    correct = correct_column(frame["predicted"].to_numpy(object), label)
    ood = frame["ood"].to_numpy(bool) if "ood" in frame.columns else None
    return performance_report(calibrator, frame["confidence"].to_numpy(np.float64), correct,
                              {c: frame[c].to_numpy(object) for c in columns}, ood,
                              foreign_prior(reference) if ood is not None else None)


def correct_column(predicted: Sequence[Any], label: Sequence[Any]) -> np.ndarray:
    """1.0 where the label is the prediction, 0.0 where it is another, nan where missing."""
    label = np.asarray(label, dtype=object)
    same = np.asarray(predicted, dtype=object).astype(str) == label.astype(str)
    return np.where(_missing_mask(label), np.nan, same.astype(np.float64))


def format_estimate(report: Mapping[str, Any], top: int | None = None) -> str:
    """The report as text: one line for the window, then one per slice value."""
    cal = report.get("calibration") or {}
    lines = [f"estimated accuracy (no labels needed): {_pct(report.get('estimated'))} "
             f"[95% {_pct(report.get('low'))} .. {_pct(report.get('high'))}] over "
             f"{report.get('n')} rows ({_pct(report.get('ood_share'))} OOD-flagged); "
             f"{_realised(report)}; calibration {cal.get('method')} (reference accuracy "
             f"{_pct(cal.get('reference_accuracy'))} on {cal.get('reference_rows')} rows)"]
    if report.get("warning"):
        lines.append(f"WARNING: {report['warning']}")
    rows = list(report.get("by_slice") or [])[:top]
    if rows:
        lines.append(f"  {'slice':<18} {'value':<14} {'n':>7} {'est':>7} {'95% interval':>16} "
                     f"{'ood':>7} {'n_lab':>6} {'real':>7}")
        for r in rows:
            lines.append(f"  {str(r['slice']):<18.18} {str(r['value']):<14.14} {r['n']:>7d} "
                         f"{_pct(r['estimated']):>7} {_pct(r['low']) + '..' + _pct(r['high']):>16} "
                         f"{_pct(r.get('ood_share')):>7} {r['n_labelled']:>6d} "
                         f"{_pct(r['realised']):>7}")
    return "\n".join(lines)


def _realised(row: Mapping[str, Any]) -> str:
    if not row.get("n_labelled"):
        return "no labelled rows"
    return (f"realised {_pct(row.get('realised'))} on {row['n_labelled']} labelled rows "
            f"(estimated {_pct(row.get('estimated_labelled'))} on those)")


def _pct(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{100 * float(value):.1f}%"


def _num(value: float) -> float | None:
    """JSON-ready: nan -> None."""
    return None if value is None or math.isnan(value) else float(value)


def _missing_mask(values: np.ndarray) -> np.ndarray:
    """None or NaN, elementwise, on an object array (NaN is the one value unequal to itself)."""
    values = np.asarray(values, dtype=object)
    return np.equal(values, None) | (values != values)


def _keys(column: Sequence[Any]) -> np.ndarray:
    """Slice values as strings, missing ones as ``MISSING``."""
    values = np.asarray(column, dtype=object)
    return np.where(_missing_mask(values), MISSING, values.astype(str))
