"""Confidence intervals (DeLong, Wilson), operating points, calibration and the paired FP32-vs-row comparison."""
import numpy as np
import pytest

from medq import metrics


def _brute_force_delong(truth, score):
    """DeLong 1988 straight from its definition, O(m·n): the Heaviside kernel's placements and their variances."""
    truth = np.asarray(truth) >= 0.5
    x, y = score[truth], score[~truth]
    kernel = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
    v10, v01 = kernel.mean(axis=1), kernel.mean(axis=0)
    return kernel.mean(), v10.var(ddof=1) / len(x) + v01.var(ddof=1) / len(y)


def test_delong_on_a_hand_computed_case():
    # sklearn's roc_auc_score example: AUC 0.75; placements V10 = (0.5, 1), V01 = (1, 0.5) → var 0.125/2 + 0.125/2
    auc, psi = metrics.auc_influence(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert auc == pytest.approx(0.75) and psi @ psi == pytest.approx(0.125)


@pytest.mark.parametrize("ties", [False, True])
def test_fast_delong_equals_the_definition(ties):
    rng = np.random.default_rng(0)
    truth = rng.random(300) < 0.3
    score = rng.normal(size=300) + truth
    if ties:
        score = np.round(score, 1)  # many ties: the midranks must count them as half
    auc, psi = metrics.auc_influence(truth, score)
    ref_auc, ref_var = _brute_force_delong(truth, score)
    assert auc == pytest.approx(ref_auc, abs=1e-12) and psi @ psi == pytest.approx(ref_var, rel=1e-9)


def test_delong_standard_errors_match_a_stratified_bootstrap():
    """The DeLong standard errors of one AUC and of a paired difference against 4000 stratified resamples."""
    rng = np.random.default_rng(1)
    truth = np.r_[np.ones(80), np.zeros(120)]
    latent = rng.normal(size=200) + 1.2 * truth
    a = latent + rng.normal(scale=0.5, size=200)
    b = latent + rng.normal(scale=0.5, size=200)
    y = np.stack([1 - truth, truth], axis=1)
    pos, neg = np.flatnonzero(truth == 1), np.flatnonzero(truth == 0)
    boot_auc, boot_diff = [], []
    for _ in range(4000):
        i = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        auc_a = metrics.auc_influence(truth[i], a[i])[0]
        boot_auc.append(auc_a)
        boot_diff.append(metrics.auc_influence(truth[i], b[i])[0] - auc_a)
    _, psi = metrics.auc_influence(truth, a)
    assert np.sqrt(psi @ psi) == pytest.approx(np.std(boot_auc), rel=0.08)
    test = metrics.delong_difference(y, np.stack([1 - a, a], 1), np.stack([1 - b, b], 1), [1])
    assert test["se"] == pytest.approx(np.std(boot_diff), rel=0.08)
    assert test["difference"] == pytest.approx(metrics.auc_influence(truth, b)[0] - metrics.auc_influence(truth, a)[0])


def test_identical_models_differ_by_exactly_zero():
    rng = np.random.default_rng(2)
    truth = rng.random(50) < 0.5
    p = rng.random(50)
    y = np.stack([1 - truth, truth], 1).astype(float)
    probs = np.stack([1 - p, p], 1)
    out = metrics.paired_comparison("binary", y, probs, probs, margin=0.005)
    assert out["auc_difference"] == 0 and out["auc_difference_ci"] == [0.0, 0.0] and out["equivalent"] is True
    assert out["flipped_fraction"] == 0 and out["max_abs_diff"] == 0


def test_wilson_interval_reference_values():
    # Wilson's interval for 8 of 10 (Newcombe 1998, table I): 0.4902 to 0.9433
    assert metrics.wilson_ci(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-4)
    assert metrics.wilson_ci(0, 10)[0] == 0.0 and metrics.wilson_ci(0, 0) is None


def test_task_metrics_carry_intervals_per_class():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0], [0, 1]], np.float32)
    p = np.array([[0.9, 0.2], [0.3, 0.8], [0.6, 0.4], [0.1, 0.7], [0.7, 0.1], [0.2, 0.9]])
    m = metrics.task_metrics("multilabel", y, p, ["a", "b"])
    ci = m["ci"]
    assert set(ci["per_class_auc"]) == {"a", "b"} and set(ci["sensitivity"]) == {"a", "b"}
    low, high = ci["auc"]
    assert low <= m["auc"] <= high and 0 <= low and high <= 1
    a_low, a_high = ci["per_class_auc"]["a"]
    assert a_low <= m["per_class_auc"]["a"] <= a_high
    assert ci["sensitivity"]["b"] == metrics.wilson_ci(2, 3)


def test_flip_fraction_is_exact_on_a_constructed_case():
    y = np.eye(2)[[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]]
    base = np.array([0.1, 0.2, 0.45, 0.55, 0.6, 0.7, 0.8, 0.9, 0.95, 0.49])
    other = base.copy()
    other[2], other[3] = 0.51, 0.5  # 0.45 → 0.51 crosses the threshold; 0.55 → 0.50 stays positive (≥ 0.5)
    other[9] = 0.52  # 0.49 → 0.52 crosses
    out = metrics.paired_comparison("binary", y, np.stack([1 - base, base], 1), np.stack([1 - other, other], 1),
                                    margin=0.005)
    assert out["flipped_images"] == 2 and out["flipped_fraction"] == pytest.approx(0.2)
    assert out["max_abs_diff"] == pytest.approx(0.06)
    assert out["mean_abs_diff"] == pytest.approx((0.06 + 0.05 + 0.03) / 10)
    # multi-label: an image flips when any of its findings does
    base_ml = np.array([[0.2, 0.7], [0.6, 0.6], [0.1, 0.1], [0.9, 0.3]])
    other_ml = np.array([[0.2, 0.4], [0.6, 0.6], [0.6, 0.6], [0.9, 0.3]])
    ml = metrics.paired_comparison("multilabel", np.array([[0, 1], [1, 0], [0, 1], [1, 0]], float), base_ml,
                                   other_ml, margin=0.005)
    assert ml["flipped_images"] == 2 and ml["flipped_fraction"] == 0.5


def test_equivalence_verdict_follows_the_margin():
    rng = np.random.default_rng(3)
    truth = np.r_[np.ones(100), np.zeros(100)]
    p = 1 / (1 + np.exp(-(rng.normal(size=200) + 1.5 * truth)))
    noisy = np.clip(p + rng.normal(scale=0.01, size=200), 0, 1)
    y = np.stack([1 - truth, truth], 1)
    ref, other = np.stack([1 - p, p], 1), np.stack([1 - noisy, noisy], 1)
    out = metrics.paired_comparison("binary", y, ref, other, margin=0.005)
    low, high = out["auc_difference_ci"]
    wide = metrics.paired_comparison("binary", y, ref, other, margin=max(abs(low), abs(high)) * 1.01)
    narrow = metrics.paired_comparison("binary", y, ref, other, margin=max(abs(low), abs(high)) * 0.99)
    assert wide["equivalent"] is True and wide["verdict"].startswith("equivalent to FP32 within")
    assert narrow["equivalent"] is False and narrow["verdict"].startswith("not shown equivalent")
    worse = np.clip(p * 0.3 + 0.7 * rng.random(200), 0, 1)  # a much worse model: outside the margin
    far = metrics.paired_comparison("binary", y, ref, np.stack([1 - worse, worse], 1), margin=0.005)
    assert far["equivalent"] is False and far["verdict"].startswith("different from FP32")


def test_operating_points_and_calibration():
    # 10 negatives at 0.0..0.9, 10 positives at 0.45..0.9 (step 0.05)
    neg = np.arange(10) / 10
    pos = 0.45 + np.arange(10) * 0.05
    truth, score = np.r_[np.zeros(10), np.ones(10)], np.r_[neg, pos]
    # specificity ≥ 0.9 allows one negative above the threshold (0.9 itself ties with a positive at 0.9):
    # threshold just above 0.8 → positives 0.85 and 0.9 called: sensitivity 0.2
    assert metrics.sensitivity_at_specificity(truth, score, 0.90) == pytest.approx(0.2)
    # sensitivity ≥ 0.9: threshold 0.5 calls 9 positives and the negatives 0.5..0.9 (5): specificity 0.5
    assert metrics.specificity_at_sensitivity(truth, score, 0.90) == pytest.approx(0.5)
    perfect = metrics.clinical_metrics("binary", np.eye(2)[[0, 1]], np.array([[1.0, 0.0], [0.0, 1.0]]), ["n", "p"])
    assert perfect["brier"] == 0 and perfect["ece"] == 0
    # always 0.8 on a 50 % positive set: Brier (0.64 + 0.04) / 2, ECE |0.5 - 0.8|
    flat = metrics.clinical_metrics("binary", np.eye(2)[[0, 1]], np.array([[0.2, 0.8], [0.2, 0.8]]), ["n", "p"])
    assert flat["brier"] == pytest.approx(0.34) and flat["ece"] == pytest.approx(0.3)


def test_midranks_average_ties():
    assert metrics.midranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_evaluate_prints_intervals_operating_points_and_calibration():
    from medq.cli import _evaluation_lines

    rng = np.random.default_rng(4)
    truth = np.r_[np.ones(30), np.zeros(30)]
    p = np.clip(0.3 * truth + 0.7 * rng.random(60), 0, 1)
    y, probs = np.stack([1 - truth, truth], 1), np.stack([1 - p, p], 1)
    single = metrics.task_metrics("binary", y, probs, ["n", "p"]) | {
        "clinical": metrics.clinical_metrics("binary", y, probs, ["n", "p"])}
    lines = _evaluation_lines({"objective": "auc", "n_images": 60, "split": "test", "single_crop": single,
                               "ten_crop": None})
    low, high = single["ci"]["auc"]
    assert lines[0] == "objective: auc; 60 test images"
    assert f"auc {single['auc']:.4f} [{low:.4f}, {high:.4f}]" in lines[1]
    assert "sensitivity at specificity 0.90" in lines[1] and "Brier" in lines[1] and len(lines) == 2
