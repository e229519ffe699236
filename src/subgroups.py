"""Metrics per patient subgroup (sex, age band, view position), with the same 95% intervals as the overall metrics,
and the flag for a subgroup the model serves worse than the whole test set.

Per subgroup (and for all images): n, positives per class, the summary AUC (binary: the positive class's; multiclass
and multi-label: the mean over the classes with at least 2 images with and 2 without the label in that subgroup) and
each class's AUC, all with DeLong intervals (:mod:`medq.metrics`); sensitivity and specificity at the run's operating
thresholds per thresholded class, with Wilson intervals (:func:`medq.thresholds.held`). A class without positives or
negatives in a subgroup has no AUC there, and the row says why.

The flag, "below overall": a subgroup of at least ``subgroups.min_images`` images is flagged on a metric when the
upper bound of its 95% interval lies below the lower bound of the overall 95% interval of the same metric (same
class, same threshold; the summary AUC compared over the same classes). The intervals do not overlap, so the
shortfall is not sampling noise of this test set — a conservative test (the subgroup's images are part of the
overall set). Smaller subgroups are shown but not judged ("too few images"); a metric without an interval on either
side is not judged.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from medq.data.index import METADATA, DatasetIndex
from medq.data.metadata import KAGGLE_NOTE, MAX_AGE, NO_METADATA, UNKNOWN, age_years
from medq.metrics import auc_ci, delong_difference, mean_auc_influence, normal_ci, with_ci
from medq.thresholds import Thresholds, held

TITLES = {"sex": "sex", "age": "age band (years)", "view": "view position"}
TOO_FEW, BELOW, OK = "too few images", "below overall", "ok"


@dataclass
class Subgroups:
    """The test images' patient metadata (``Sample.metadata``, in the order of the probabilities) and the run's
    ``subgroups:`` settings: what evaluate and the benchmark hand over with their labels and probabilities."""

    metadata: list[tuple[str, ...]]
    settings: Any  # medq.config.SubgroupsConfig
    dataset_format: str = ""

    @classmethod
    def of(cls, index: DatasetIndex, split: str, settings: Any) -> "Subgroups":
        return cls([s.metadata for s in index.splits[split]], settings, index.format)

    def kept(self, indices: Any) -> "Subgroups":
        """The same for the images a stage could decode (``indices`` into the split)."""
        return replace(self, metadata=[self.metadata[int(i)] for i in indices])

    def table(self, task: str, classes: list[str], y_true: np.ndarray, y_prob: np.ndarray,
              thresholds: Thresholds, reference: np.ndarray | None = None) -> dict[str, Any]:
        """The subgroup table (JSON-ready): ``overall``, ``groups`` (one row per attribute value), ``flagged``.
        ``reference``: another model's probabilities on the same images (the benchmark's FP32 row); each row then
        has ``vs_reference``, the paired DeLong difference of its summary AUC (this − reference) with its 95%
        interval: a precision path that loses one group shows it there."""
        if not any(self.metadata):
            note = NO_METADATA + ("; " + KAGGLE_NOTE if self.dataset_format == "kaggle-pneumonia" else "")
            return {"available": False, "note": note}
        y_true = np.asarray(y_true, dtype=np.float64) >= 0.5
        y_prob = np.asarray(y_prob, dtype=np.float64)
        if len(self.metadata) != len(y_true):
            raise ValueError(f"{len(self.metadata)} metadata rows for {len(y_true)} images")
        s = self.settings
        every = np.ones(len(y_true), dtype=bool)
        reference = None if reference is None else np.asarray(reference, dtype=np.float64)
        overall = _row("all images", "", every, task, classes, y_true, y_prob, thresholds, reference)
        attributes = list(s.attributes) or [a for i, a in enumerate(METADATA)
                                            if any(m and m[i] != UNKNOWN for m in self.metadata)]
        groups = []
        for attribute in attributes:
            values = [m[METADATA.index(attribute)] if m else UNKNOWN for m in self.metadata]
            if attribute == "age":
                values = [age_band(v, s.age_bands) for v in values]
            values = np.asarray(values, dtype=object)
            for value in _ordered(set(values), attribute, s.age_bands):
                row = _row(attribute, value, values == value, task, classes, y_true, y_prob, thresholds, reference)
                row["flags"] = _below(task, row, overall, y_true, y_prob) if row["n"] >= s.min_images else []
                row["status"] = TOO_FEW if row["n"] < s.min_images else BELOW if row["flags"] else OK
                groups.append(row)
        return {"available": True, "attributes": attributes, "age_bands": list(s.age_bands),
                "min_images": s.min_images, "interval": "95%: DeLong (AUC), Wilson (sensitivity, specificity)",
                "rule": "below overall: n >= min_images and the subgroup's 95% upper bound < the overall 95% lower "
                        "bound of the same metric",
                "overall": overall, "groups": groups,
                "flagged": [f"{g['attribute']} {g['value']}" for g in groups if g["status"] == BELOW]}


def recorded(evaluated: dict[str, Any] | None, benchmark: dict[str, Any] | None) -> dict[str, Any] | None:
    """The run's subgroup table with its ``split`` and ``source`` named: `medq evaluate`'s (``stages.evaluate``,
    single crop, its split), else the benchmark's reference row's on the test split (`medq run` has no evaluate
    stage); None without either. The one choice `medq runs show` and the model card both make."""
    evaluated = evaluated or {}
    table = evaluated.get("subgroups")
    if isinstance(table, dict) and "available" in table:
        return {**table, "split": evaluated.get("split"), "source": "medq evaluate, single crop"}
    reference = [r for r in (benchmark or {}).get("results") or []
                 if isinstance(r, dict) and r.get("id") == (benchmark or {}).get("baseline")]
    if reference and isinstance(reference[0].get("subgroups"), dict):
        return {**reference[0]["subgroups"], "split": "test", "source": f"medq benchmark, {reference[0]['id']}"}
    return None


def band_labels(edges: list[float]) -> list[str]:
    """'[18, 40)' per band, the lower edge included; a top band reaching the oldest valid age (its edge at or beyond
    MAX_AGE, 120) holds every age from its lower edge on, 120 included: '≥ 80'."""
    return [f"≥ {lo:g}" if hi >= MAX_AGE else f"[{lo:g}, {hi:g})" for lo, hi in zip(edges, edges[1:])]


def age_band(age: str, edges: list[float]) -> str:
    """'58' → '[40, 60)'; 'unknown' stays; an age outside the bands → 'outside [0, 90)', a row of its own (counted,
    never dropped). Bands are [lo, hi), except that a top edge at MAX_AGE includes it: ages run 0–120 inclusive
    (medq.data.metadata), so the edges [0, 65, 120] band every valid age, 120 in '≥ 65'."""
    years = age_years(age) if age != UNKNOWN else None
    if years is None:
        return UNKNOWN
    for (lo, hi), label in zip(zip(edges, edges[1:]), band_labels(edges)):
        if lo <= years < hi or (hi >= MAX_AGE and lo <= years <= MAX_AGE):
            return label
    return _outside(edges)


def _outside(edges: list[float]) -> str:
    return f"outside [{edges[0]:g}, {edges[-1]:g}{']' if edges[-1] >= MAX_AGE else ')'}"


def _ordered(values: set[str], attribute: str, edges: list[float]) -> list[str]:
    if attribute == "age":
        order = band_labels(edges) + [_outside(edges), UNKNOWN]
        return [v for v in order if v in values]
    return sorted(values - {UNKNOWN}) + ([UNKNOWN] if UNKNOWN in values else [])


def _summary_columns(task: str, truth: np.ndarray) -> list[int]:
    """The classes the summary AUC is over: binary the positive one, else every class with ≥ 2 images with and ≥ 2
    without its label (DeLong's minimum)."""
    n = len(truth)
    positives = truth.sum(axis=0)
    wanted = [1] if task == "binary" else range(truth.shape[1])
    return [k for k in wanted if 2 <= positives[k] <= n - 2]


def _summary_auc(truth: np.ndarray, prob: np.ndarray, columns: list[int]) -> tuple[float, list[float]]:
    auc, psi = mean_auc_influence(truth.astype(np.float64), prob, columns)
    return auc, normal_ci(auc, float(psi @ psi), 0.0, 1.0)


def _row(attribute: str, value: str, mask: np.ndarray, task: str, classes: list[str], y_true: np.ndarray,
         y_prob: np.ndarray, thresholds: Thresholds, reference: np.ndarray | None) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    truth, prob = y_true[mask], y_prob[mask]
    n = int(mask.sum())
    positives = truth.sum(axis=0)
    row: dict[str, Any] = {"attribute": attribute, "value": value, "n": n,
                           "positives": {c: int(positives[k]) for k, c in enumerate(classes)}}
    columns = _summary_columns(task, truth)
    if columns:
        row["auc"], row["auc_ci"] = _summary_auc(truth, prob, columns)
    else:
        row["auc"], row["auc_ci"] = None, None
        row["auc_note"] = "undefined: no class has 2 images with and 2 without its label here"
    row["auc_classes"] = [classes[k] for k in columns]
    if reference is not None and columns:
        paired = delong_difference(truth.astype(np.float64), reference[mask], prob, columns)
        row["vs_reference"] = {"auc_difference": paired["difference"], "ci": paired["ci"]}
    per_class = {}
    for k, c in enumerate(classes):
        if positives[k] == 0 or positives[k] == n:
            per_class[c] = {"value": None, "ci": None, "note": "no positives" if positives[k] == 0 else "no negatives"}
        else:
            per_class[c] = {"value": float(roc_auc_score(truth[:, k], prob[:, k])),
                            "ci": auc_ci(truth[:, k], prob[:, k])}
    row["per_class_auc"] = per_class
    row["operating_points"] = {c: {k: point[k] for k in ("threshold", "sensitivity", "sensitivity_ci", "specificity",
                                                          "specificity_ci", "n_positive", "n_negative")}
                               for c, point in held(thresholds, truth, prob)["classes"].items()}
    return row


def _below(task: str, row: dict[str, Any], overall: dict[str, Any], y_true: np.ndarray,
           y_prob: np.ndarray) -> list[dict[str, Any]]:
    """The metrics on which ``row`` lies below ``overall`` (the module's rule): metric, value, ci, overall,
    overall_ci each."""
    compared: list[tuple[str, Any, Any, Any, Any]] = []
    if row["auc_ci"] is not None:
        if row["auc_classes"] == overall["auc_classes"]:
            whole, whole_ci = overall["auc"], overall["auc_ci"]
        else:  # the overall summary over the subgroup's classes
            names = list(overall["per_class_auc"])
            whole, whole_ci = _summary_auc(y_true, y_prob, [names.index(c) for c in row["auc_classes"]])
        compared.append(("AUC", row["auc"], row["auc_ci"], whole, whole_ci))
    for c, point in row["per_class_auc"].items() if task != "binary" else ():  # binary: the summary is the AUC
        compared.append((f"{c} AUC", point["value"], point["ci"], overall["per_class_auc"][c]["value"],
                         overall["per_class_auc"][c]["ci"]))
    for c, point in row["operating_points"].items():
        for metric in ("sensitivity", "specificity"):
            whole = overall["operating_points"][c]
            compared.append((f"{c} {metric}", point[metric], point[f"{metric}_ci"], whole[metric],
                             whole[f"{metric}_ci"]))
    return [{"metric": name, "value": value, "ci": ci, "overall": whole, "overall_ci": whole_ci}
            for name, value, ci, whole, whole_ci in compared
            if ci is not None and whole_ci is not None and ci[1] < whole_ci[0]]


def markdown(table: dict[str, Any], reference: str | None = None, per_class: bool = False) -> list[str]:
    """The table as Markdown lines (the CLI report, benchmark.md, the model card); ``reference`` names the model of
    the rows' ``vs_reference`` (a column of its own); ``per_class``: with several thresholded classes, also a table
    of each class's sensitivity and specificity per subgroup (the model card)."""
    if not table.get("available"):
        return [f"- Subgroups: {table.get('note', NO_METADATA)}"]
    overall = table["overall"]
    single = list(overall["operating_points"])
    point = single[0] if len(single) == 1 else None
    head = "| subgroup | n | AUC (95% CI) |" + (f" {point} sensitivity | {point} specificity |" if point else "") \
        + (f" Δ AUC vs {reference} |" if reference else "") + " status |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in [overall] + table["groups"]:
        name = "all images" if row is overall else f"{TITLES.get(row['attribute'], row['attribute'])}: {row['value']}"
        auc = with_ci(row["auc"], row["auc_ci"]) if row["auc"] is not None else "undefined"
        cells = [name, str(row["n"]), auc]
        if point:
            op = row["operating_points"][point]
            cells += [with_ci(op["sensitivity"], op["sensitivity_ci"]) if op["sensitivity"] is not None else "n/a",
                      with_ci(op["specificity"], op["specificity_ci"]) if op["specificity"] is not None else "n/a"]
        if reference:
            paired = row.get("vs_reference")
            cells.append("n/a" if paired is None else f"{paired['auc_difference']:+.3f} "
                                                      f"[{paired['ci'][0]:+.3f}, {paired['ci'][1]:+.3f}]")
        status = "" if row is overall else row["status"]
        if row is not overall and row["flags"]:
            status += ": " + ", ".join(flag["metric"] for flag in row["flags"])
        lines.append("| " + " | ".join(cells + [status]) + " |")
    if per_class and not point:
        lines += ["", *_per_class_lines(table)]
    lines.append(f"- {table['rule']}; subgroups under {table['min_images']} images are shown, not judged; "
                 f"intervals {table['interval']}")
    lines.append("- flagged: " + (", ".join(table["flagged"]) or "none"))
    return lines


def _per_class_lines(table: dict[str, Any]) -> list[str]:
    """Sensitivity / specificity at each class's threshold per subgroup (95% Wilson), for the classes the test
    split has positives of."""
    overall = table["overall"]
    shown = [c for c, point in overall["operating_points"].items() if point["n_positive"]]
    lines = ["| subgroup | " + " | ".join(f"{c} sensitivity / specificity" for c in shown) + " |",
             "|" + "---|" * (len(shown) + 1)]
    for row in [overall] + table["groups"]:
        name = "all images" if row is overall else f"{TITLES.get(row['attribute'], row['attribute'])}: {row['value']}"
        cells = []
        for c in shown:
            point = row["operating_points"][c]
            cells.append(" / ".join(with_ci(point[m], point[f"{m}_ci"]) if point[m] is not None else "n/a"
                                    for m in ("sensitivity", "specificity")))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
