"""Task metrics, computed per image (the reference kit averaged over the batch axis instead), with their 95%
confidence intervals, clinical operating points, calibration, and the paired comparison of two models.

binary / multiclass: labels one-hot [N, K], probabilities [N, K]; the prediction is the arg-max class.
multilabel: labels multi-hot [N, K], probabilities [N, K]; each label is thresholded on its own.

AUC intervals are DeLong's (DeLong, DeLong & Clarke-Pearson 1988) computed with Sun & Xu's midrank algorithm
(IEEE SPL 2014, O(n log n)), written per image as influence values so that one formula gives the variance of one
AUC, of a mean AUC over classes, and of the paired difference of two models on the same images. Proportions
(accuracy, sensitivity, specificity) get Wilson score intervals.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
OPERATING_POINTS = (0.90, 0.95)
ECE_BINS = 10


# --- DeLong --------------------------------------------------------------------------------------------------------

def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    # each run of equal values: first and last 1-based position → their mean for every member
    starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]
    ends = np.r_[starts[1:], len(x)]
    ranks_sorted = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    out = np.empty(len(x))
    out[order] = ranks_sorted
    return out


def auc_influence(truth: np.ndarray, score: np.ndarray) -> tuple[float, np.ndarray]:
    """(AUC, per-image influence ψ) for one binary label; the DeLong variance of the AUC is ``sum(ψ²)`` and the
    covariance of two AUCs on the same images is ``sum(ψ₁ψ₂)``.

    Sun & Xu: with m positives and n negatives, the placement of positive i is V10ᵢ = (Rᵢ − R⁺ᵢ)/n (R: midrank among
    all, R⁺: among positives), of negative j V01ⱼ = 1 − (Rⱼ − R⁻ⱼ)/m; AUC = mean V10 = mean V01, and DeLong's
    variance is var(V10)/m + var(V01)/n (ddof 1). ψ is scaled so that its squares sum to exactly that."""
    truth = np.asarray(truth) >= 0.5
    score = np.asarray(score, dtype=np.float64)
    m, n = int(truth.sum()), int((~truth).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least 2 positives and 2 negatives, got {m} and {n}")
    overall = midranks(score)
    v10 = (overall[truth] - midranks(score[truth])) / n
    v01 = 1.0 - (overall[~truth] - midranks(score[~truth])) / m
    auc = float(v10.mean())
    psi = np.empty(len(score))
    psi[truth] = (v10 - auc) / np.sqrt(m * (m - 1))
    psi[~truth] = (v01 - auc) / np.sqrt(n * (n - 1))
    return auc, psi


def judged_columns(task: str, y_true: np.ndarray) -> list[int]:
    """The classes an AUC is over (binary: the positive one; else all), or [] when DeLong cannot judge one of them
    (fewer than 2 images with or without its label)."""
    counts = (np.asarray(y_true) >= 0.5).sum(axis=0)
    judged = [k for k, c in enumerate(counts) if 2 <= c <= len(y_true) - 2]
    wanted = [1] if task == "binary" else [k for k, c in enumerate(counts) if 0 < c < len(y_true)]
    return wanted if wanted and set(wanted) <= set(judged) else []


def mean_auc_influence(y_true: np.ndarray, y_prob: np.ndarray, columns: list[int]) -> tuple[float, np.ndarray]:
    """The mean AUC over ``columns`` and its per-image influence (the classes' correlation included)."""
    pairs = [auc_influence(y_true[:, k], y_prob[:, k]) for k in columns]
    return float(np.mean([a for a, _ in pairs])), np.mean([psi for _, psi in pairs], axis=0)


def normal_ci(value: float, variance: float, low: float = -np.inf, high: float = np.inf) -> list[float]:
    half = Z95 * float(np.sqrt(max(variance, 0.0)))
    return [float(max(low, value - half)), float(min(high, value + half))]


def auc_ci(truth: np.ndarray, score: np.ndarray) -> list[float] | None:
    """DeLong 95% interval of one AUC, clipped to [0, 1]; None when a label value has fewer than 2 images."""
    try:
        auc, psi = auc_influence(truth, score)
    except ValueError:
        return None
    return normal_ci(auc, float(psi @ psi), 0.0, 1.0)


def delong_difference(y_true: np.ndarray, p_reference: np.ndarray, p_other: np.ndarray,
                      columns: list[int]) -> dict[str, Any]:
    """Paired DeLong test of mean AUC(other) − mean AUC(reference) over ``columns``, both models scored on the
    same images: the difference, its standard error, 95% interval and two-sided p-value."""
    from scipy.stats import norm

    a_ref, psi_ref = mean_auc_influence(y_true, p_reference, columns)
    a_other, psi_other = mean_auc_influence(y_true, p_other, columns)
    diff, d_psi = a_other - a_ref, psi_other - psi_ref
    se = float(np.sqrt(d_psi @ d_psi))
    p_value = float(2 * norm.sf(abs(diff) / se)) if se > 0 else (1.0 if diff == 0 else 0.0)
    return {"difference": float(diff), "se": se, "ci": normal_ci(diff, se * se), "p_value": p_value}


def wilson_ci(successes: float, total: float) -> list[float] | None:
    """Wilson score 95% interval of a proportion; None without a denominator."""
    if not total:
        return None
    p, z2 = successes / total, Z95 * Z95
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = Z95 * np.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


# --- task metrics ---------------------------------------------------------------------------------------------------

def per_class_auc(y_true: np.ndarray, y_prob: np.ndarray, classes: list[str]) -> dict[str, float | None]:
    """One-vs-rest ROC-AUC per class; None where the split holds only one value of that label."""
    out: dict[str, float | None] = {}
    for k, name in enumerate(classes):
        column = y_true[:, k]
        out[name] = float(roc_auc_score(column, y_prob[:, k])) if 0 < column.sum() < len(column) else None
    return out


def task_metrics(task: str, y_true: np.ndarray, y_prob: np.ndarray, classes: list[str],
                 threshold: float | np.ndarray = 0.5) -> dict[str, Any]:
    """accuracy, auc (the mean AUC for multi-label and multiclass), per-class AUC, sensitivity/specificity,
    confusion matrix, and ``ci``: the 95% interval of each (same keys, [low, high] or None). The decisions are
    :func:`decisions` at ``threshold`` (one for all, or one per class column: the run's operating thresholds)."""
    y_true = np.asarray(y_true, dtype=np.float32)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_true.shape != y_prob.shape:
        raise ValueError(f"labels {y_true.shape} and probabilities {y_prob.shape} differ in shape")
    n = len(y_true)
    aucs = per_class_auc(y_true, y_prob, classes)
    valid = [a for a in aucs.values() if a is not None]
    result: dict[str, Any] = {"n_images": n, "per_class_auc": aucs}
    ci: dict[str, Any] = {"per_class_auc": {c: auc_ci(y_true[:, k], y_prob[:, k]) for k, c in enumerate(classes)}}
    result["ci"] = ci
    if task == "multilabel":
        predicted = decisions(task, y_prob, threshold)
        truth = y_true >= 0.5
        result["accuracy"] = float((predicted == truth).mean()) if n else float("nan")  # per label, per image
        # the per-label decisions of one image are correlated: the interval counts images, not decisions
        ci["accuracy"] = wilson_ci(result["accuracy"] * n, n)
        result["exact_match"] = float((predicted == truth).all(axis=1).mean()) if n else float("nan")
        result["auc"] = float(np.mean(valid)) if valid else float("nan")
        ci["auc"] = _mean_auc_ci(task, y_true, y_prob)
        tp = (predicted & truth).sum(axis=0)
        fn = (~predicted & truth).sum(axis=0)
        tn = (~predicted & ~truth).sum(axis=0)
        fp = (predicted & ~truth).sum(axis=0)
        result["sensitivity"] = {c: _ratio(tp[k], tp[k] + fn[k]) for k, c in enumerate(classes)}
        result["specificity"] = {c: _ratio(tn[k], tn[k] + fp[k]) for k, c in enumerate(classes)}
        ci["sensitivity"] = {c: wilson_ci(tp[k], tp[k] + fn[k]) for k, c in enumerate(classes)}
        ci["specificity"] = {c: wilson_ci(tn[k], tn[k] + fp[k]) for k, c in enumerate(classes)}
        # one 2x2 per label, rows truth (negative, positive), columns prediction
        result["confusion_matrix"] = {c: [[int(tn[k]), int(fp[k])], [int(fn[k]), int(tp[k])]]
                                      for k, c in enumerate(classes)}
        result["threshold"] = _plain_threshold(threshold)
        return result
    true_class = y_true.argmax(axis=1)
    pred_class = decisions(task, y_prob, threshold).astype(int)
    result["accuracy"] = float((true_class == pred_class).mean()) if n else float("nan")
    ci["accuracy"] = wilson_ci(int((true_class == pred_class).sum()), n)
    k = len(classes)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (true_class, pred_class), 1)
    result["confusion_matrix"] = confusion.tolist()  # rows: truth, columns: prediction
    if task == "binary":
        # The positive class is the second (NORMAL/PNEUMONIA, benign/malignant); AUC on its probability.
        result["auc"] = aucs[classes[1]] if aucs[classes[1]] is not None else float("nan")
        ci["auc"] = ci["per_class_auc"][classes[1]]
        positive = true_class == 1
        predicted_positive = pred_class == 1
        tp, tn = (positive & predicted_positive).sum(), (~positive & ~predicted_positive).sum()
        result["sensitivity"] = _ratio(tp, positive.sum())
        result["specificity"] = _ratio(tn, (~positive).sum())
        ci["sensitivity"], ci["specificity"] = wilson_ci(tp, positive.sum()), wilson_ci(tn, (~positive).sum())
        result["threshold"] = _plain_threshold(threshold)
    else:
        result["auc"] = float(np.mean(valid)) if valid else float("nan")
        ci["auc"] = _mean_auc_ci(task, y_true, y_prob)
        total = confusion.sum()
        # one-vs-rest: of the images not of class i, the share not predicted as i
        true_negatives = [total - confusion[i].sum() - confusion[:, i].sum() + confusion[i, i] for i in range(k)]
        result["sensitivity"] = {c: _ratio(confusion[i, i], confusion[i].sum()) for i, c in enumerate(classes)}
        result["specificity"] = {c: _ratio(true_negatives[i], total - confusion[i].sum())
                                 for i, c in enumerate(classes)}
        ci["sensitivity"] = {c: wilson_ci(confusion[i, i], confusion[i].sum()) for i, c in enumerate(classes)}
        ci["specificity"] = {c: wilson_ci(true_negatives[i], total - confusion[i].sum())
                             for i, c in enumerate(classes)}
    return result


def _mean_auc_ci(task: str, y_true: np.ndarray, y_prob: np.ndarray) -> list[float] | None:
    """DeLong interval of the mean AUC over the classes that have both label values."""
    columns = judged_columns(task, y_true)
    if not columns:
        return None
    auc, psi = mean_auc_influence(y_true, y_prob, columns)
    return normal_ci(auc, float(psi @ psi), 0.0, 1.0)


# --- clinical operating points and calibration ----------------------------------------------------------------------

def sensitivity_at_specificity(truth: np.ndarray, score: np.ndarray, specificity: float) -> float | None:
    """The highest sensitivity of any threshold whose specificity is at least ``specificity``."""
    truth = np.asarray(truth) >= 0.5
    if truth.all() or not truth.any():
        return None
    fpr, tpr, _ = roc_curve(truth, score)
    return float(tpr[1 - fpr >= specificity - 1e-12].max())


def specificity_at_sensitivity(truth: np.ndarray, score: np.ndarray, sensitivity: float) -> float | None:
    """The highest specificity of any threshold whose sensitivity is at least ``sensitivity``."""
    truth = np.asarray(truth) >= 0.5
    if truth.all() or not truth.any():
        return None
    fpr, tpr, _ = roc_curve(truth, score)
    return float((1 - fpr[tpr >= sensitivity - 1e-12]).max())


def expected_calibration_error(truth: np.ndarray, score: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ over equal-width probability bins of (share of images in the bin) · |observed rate − mean probability|."""
    truth = np.asarray(truth, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64)
    which = np.minimum((score * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(which):
        member = which == b
        total += member.mean() * abs(truth[member].mean() - score[member].mean())
    return float(total)


def _clinical_one(truth: np.ndarray, score: np.ndarray) -> dict[str, Any]:
    return {"sensitivity_at_specificity": {f"{s:.2f}": sensitivity_at_specificity(truth, score, s)
                                           for s in OPERATING_POINTS},
            "specificity_at_sensitivity": {f"{s:.2f}": specificity_at_sensitivity(truth, score, s)
                                           for s in OPERATING_POINTS},
            "brier": float(np.mean((np.asarray(score, np.float64) - truth) ** 2)),
            "ece": expected_calibration_error(truth, score)}


def clinical_metrics(task: str, y_true: np.ndarray, y_prob: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Operating points (sensitivity at specificity 0.90/0.95, specificity at sensitivity 0.90/0.95), Brier score
    and expected calibration error: of the positive class (binary), per class one-vs-rest (``per_class``) with
    their means (multiclass, multi-label)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if task == "binary":
        return _clinical_one(y_true[:, 1], y_prob[:, 1])
    per_class = {c: _clinical_one(y_true[:, k], y_prob[:, k]) for k, c in enumerate(classes)}

    def mean(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return float(np.mean(known)) if known else None

    out: dict[str, Any] = {name: {key: mean([p[name][key] for p in per_class.values()])
                                  for key in per_class[classes[0]][name]}
                           for name in ("sensitivity_at_specificity", "specificity_at_sensitivity")}
    if task == "multiclass":  # the multi-class Brier score and the top-label ECE
        out["brier"] = float(np.mean(((y_prob - y_true) ** 2).sum(axis=1)))
        correct = (y_prob.argmax(axis=1) == y_true.argmax(axis=1)).astype(np.float64)
        out["ece"] = expected_calibration_error(correct, y_prob.max(axis=1))
    else:
        out["brier"] = mean([p["brier"] for p in per_class.values()])
        out["ece"] = mean([p["ece"] for p in per_class.values()])
    return out | {"per_class": per_class}


# --- paired comparison of two models on the same images -------------------------------------------------------------

def shown_probabilities(probs: Any) -> list[float]:
    """One image's probabilities as every per-image output writes them (predict, serve, the external evaluation's
    per-image file): 9 significant digits, so every float32 reads back exactly. Fewer lose the order of a saturated
    model's scores (a few float32 steps apart; 6 decimals made them all 1.0), and a threshold chosen between two of
    them would no longer call the written values as it calls the model's."""
    return [float(f"{float(p):.9g}") for p in np.asarray(probs).ravel()]


def decisions(task: str, y_prob: np.ndarray, threshold: float | np.ndarray = 0.5) -> np.ndarray:
    """Each image's call at the operating thresholds (``threshold``: one for all, or one per class column, as
    ``medq.thresholds.Thresholds.per_column`` gives): binary, the positive class iff p ≥ its threshold ([N] bool);
    multi-label, each label iff p ≥ its threshold ([N, K] bool); multiclass, the class whose probability exceeds its
    threshold by the most, arg-max(p − threshold) ([N] index; one threshold for all: the arg-max)."""
    y_prob = np.asarray(y_prob)
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), y_prob.shape[1:])
    if task == "multilabel":
        return y_prob >= t
    if task == "binary":
        return y_prob[:, 1] >= t[1]
    return np.argmax(y_prob - t, axis=1)


def _plain_threshold(threshold: float | np.ndarray) -> float | list[float]:
    """The threshold(s) as JSON: a number, or one per class column."""
    t = np.asarray(threshold, dtype=np.float64)
    return float(t) if t.ndim == 0 else [float(v) for v in t]


def paired_comparison(task: str, y_true: np.ndarray, p_reference: np.ndarray, p_other: np.ndarray,
                      margin: float, threshold: float | np.ndarray = 0.5) -> dict[str, Any]:
    """``p_other`` against ``p_reference`` on the same images: the paired DeLong AUC difference (other − reference;
    the mean AUC for multiclass and multi-label) with its 95% interval, the share of images whose decision at
    ``threshold`` flips, max/mean |Δp|, and the verdict: equivalent iff the interval lies within ±``margin``."""
    y_true = np.asarray(y_true, dtype=np.float64)
    p_reference = np.asarray(p_reference, dtype=np.float64)
    p_other = np.asarray(p_other, dtype=np.float64)
    changed = decisions(task, p_reference, threshold) != decisions(task, p_other, threshold)
    if changed.ndim == 2:
        changed = changed.any(axis=1)
    gap = np.abs(p_other - p_reference)
    out: dict[str, Any] = {"n_images": len(y_true), "threshold": _plain_threshold(threshold), "margin": margin,
                           "flipped_fraction": float(changed.mean()), "flipped_images": int(changed.sum()),
                           "max_abs_diff": float(gap.max()), "mean_abs_diff": float(gap.mean())}
    columns = judged_columns(task, y_true)
    if not columns:
        out |= {"auc_difference": None, "auc_difference_ci": None, "p_value": None, "equivalent": None,
                "conclusion": "not judged",
                "verdict": "not judged: the test images lack 2 positives and 2 negatives of every class"}
        return out
    test = delong_difference(y_true, p_reference, p_other, columns)
    conclusion, verdict = equivalence_verdict(test["ci"], margin)
    out |= {"auc_difference": test["difference"], "auc_difference_se": test["se"], "auc_difference_ci": test["ci"],
            "p_value": test["p_value"], "equivalent": conclusion == "equivalent", "conclusion": conclusion,
            "verdict": verdict}
    return out


def equivalence_verdict(ci: list[float], margin: float) -> tuple[str, str]:
    """(conclusion: 'equivalent' | 'different' | 'not shown equivalent', the sentence a report prints)."""
    span = f"95% CI of the AUC difference [{ci[0]:+.4f}, {ci[1]:+.4f}]"
    if -margin <= ci[0] and ci[1] <= margin:
        return "equivalent", f"equivalent to FP32 within ±{margin:g} AUC ({span} lies inside)"
    if ci[1] < -margin or ci[0] > margin:
        return "different", f"different from FP32 by more than {margin:g} AUC ({span} lies outside ±{margin:g})"
    return "not shown equivalent", (f"not shown equivalent within ±{margin:g} AUC ({span} crosses the margin; more "
                                    "test images would tell)")


def with_ci(value: Any, ci: list[float] | None, digits: int = 3) -> str:
    """'0.812 [0.751, 0.873]' for reports; the value alone without an interval, '' without a value."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
        return ""  # an undefined metric (NaN) is never printed as 'nan': callers say n/a or undefined
    return f"{value:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _ratio(a: Any, b: Any) -> float | None:
    return float(a) / float(b) if b else None


# A model within this margin of chance level has learned nothing worth keeping (or quantizing).
CHANCE_MARGIN = 0.05


def chance_level(metric: str, labels: np.ndarray, task: str) -> float:
    """What a model that learned nothing scores: AUC 0.5; the accuracy of always answering the commonest class (per
    label, for multi-label)."""
    labels = np.asarray(labels, dtype=np.float64)
    if metric == "auc" or not len(labels):
        return 0.5
    if task == "multilabel":
        positive = labels.mean(axis=0)
        return float(np.maximum(positive, 1 - positive).mean())
    return float(labels.sum(axis=0).max() / len(labels))
