"""Task metrics, computed per image (the reference kit averaged over the batch axis instead).

binary / multiclass: labels one-hot [N, K], probabilities [N, K]; the prediction is the arg-max class.
multilabel: labels multi-hot [N, K], probabilities [N, K]; each label is thresholded on its own.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score


def per_class_auc(y_true: np.ndarray, y_prob: np.ndarray, classes: list[str]) -> dict[str, float | None]:
    """One-vs-rest ROC-AUC per class; None where the split holds only one value of that label."""
    out: dict[str, float | None] = {}
    for k, name in enumerate(classes):
        column = y_true[:, k]
        out[name] = float(roc_auc_score(column, y_prob[:, k])) if 0 < column.sum() < len(column) else None
    return out


def task_metrics(task: str, y_true: np.ndarray, y_prob: np.ndarray, classes: list[str],
                 threshold: float = 0.5) -> dict[str, Any]:
    """accuracy, auc (the primary AUC), per-class AUC, sensitivity/specificity, confusion matrix."""
    y_true = np.asarray(y_true, dtype=np.float32)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_true.shape != y_prob.shape:
        raise ValueError(f"labels {y_true.shape} and probabilities {y_prob.shape} differ in shape")
    n = len(y_true)
    aucs = per_class_auc(y_true, y_prob, classes)
    valid = [a for a in aucs.values() if a is not None]
    result: dict[str, Any] = {"n_images": n, "per_class_auc": aucs}
    if task == "multilabel":
        predicted = y_prob >= threshold
        truth = y_true >= 0.5
        result["accuracy"] = float((predicted == truth).mean()) if n else float("nan")  # per label, per image
        result["exact_match"] = float((predicted == truth).all(axis=1).mean()) if n else float("nan")
        result["auc"] = float(np.mean(valid)) if valid else float("nan")
        tp = (predicted & truth).sum(axis=0)
        fn = (~predicted & truth).sum(axis=0)
        tn = (~predicted & ~truth).sum(axis=0)
        fp = (predicted & ~truth).sum(axis=0)
        result["sensitivity"] = {c: _ratio(tp[k], tp[k] + fn[k]) for k, c in enumerate(classes)}
        result["specificity"] = {c: _ratio(tn[k], tn[k] + fp[k]) for k, c in enumerate(classes)}
        # one 2x2 per label, rows truth (negative, positive), columns prediction
        result["confusion_matrix"] = {c: [[int(tn[k]), int(fp[k])], [int(fn[k]), int(tp[k])]]
                                      for k, c in enumerate(classes)}
        result["threshold"] = threshold
        return result
    true_class = y_true.argmax(axis=1)
    pred_class = y_prob.argmax(axis=1)
    result["accuracy"] = float((true_class == pred_class).mean()) if n else float("nan")
    k = len(classes)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (true_class, pred_class), 1)
    result["confusion_matrix"] = confusion.tolist()  # rows: truth, columns: prediction
    if task == "binary":
        # The positive class is the second (NORMAL/PNEUMONIA, benign/malignant); AUC on its probability.
        result["auc"] = aucs[classes[1]] if aucs[classes[1]] is not None else float("nan")
        positive = true_class == 1
        predicted_positive = y_prob[:, 1] >= threshold
        result["sensitivity"] = _ratio((positive & predicted_positive).sum(), positive.sum())
        result["specificity"] = _ratio((~positive & ~predicted_positive).sum(), (~positive).sum())
        result["threshold"] = threshold
    else:
        result["auc"] = float(np.mean(valid)) if valid else float("nan")
        result["sensitivity"] = {c: _ratio(confusion[i, i], confusion[i].sum()) for i, c in enumerate(classes)}
        # one-vs-rest: of the images not of class i, the share not predicted as i
        result["specificity"] = {c: _ratio(confusion.sum() - confusion[i].sum() - confusion[:, i].sum()
                                           + confusion[i, i], confusion.sum() - confusion[i].sum())
                                 for i, c in enumerate(classes)}
    return result


def primary_metric(task: str) -> str:
    """The number a model is selected and quantization is judged by: mean AUC for multi-label, else accuracy."""
    return "auc" if task == "multilabel" else "accuracy"


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
