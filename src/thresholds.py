"""Operating thresholds: the probability at which each class counts as a positive call, chosen on the validation
split by a policy (``thresholds:`` in the config), recorded in the run's manifest with the validation figures it
was chosen at, and used by every stage that makes a decision (evaluate, predict, the benchmark's flips).

Per class, one-vs-rest, from the class's probability column: binary → the positive class (the second) only;
multi-label and multiclass → every class. A class is called positive when ``p >= threshold``.

Policies (``Policy``), each over the validation ROC's points (every distinct score, ``sklearn.metrics.roc_curve``
with ``drop_intermediate=False``), so the figures recorded are exactly the validation split's; the threshold
recorded lies midway between the chosen point's score and the next lower one (same calls, robust to rounding):
- ``youden``: the largest sensitivity + specificity − 1; ties → the highest threshold (fewer positive calls).
- ``sensitivity`` t: the highest threshold whose sensitivity is ≥ t (the best specificity that meets it).
- ``specificity`` t: the lowest threshold whose specificity is ≥ t (the best sensitivity that meets it).
- ``fixed`` v: v for every class; the validation figures at v are still recorded.
A sensitivity/specificity target can always be met on the validation split (call every image positive, or none),
but not always meaningfully: when one image moves the figure by more than the target's slack (e.g. 0.90 with fewer
than 10 positives) the chosen point is kept and a note says the split cannot resolve the target. A class without
positives or without negatives on validation gets ``FALLBACK`` (0.5) and a note; it is never chosen silently.

Decision rule (``medq.metrics.decisions``, re-exported here): binary, the positive class iff p ≥ t; multi-label,
each label iff p ≥ t; multiclass, the class whose probability exceeds its threshold by the most, arg-max(p − t) (with equal thresholds: arg-max p).
A multiclass image is called one class, so every figure reported at the thresholds (the validation figures
recorded, :func:`held` on another split) is of those calls, not of each class's p ≥ t alone; a multiclass target
the calls fall short of on validation is said in a note.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from medq.errors import ConfigError
from medq.metrics import decisions, wilson_ci  # noqa: F401  (decisions: THE decision rule)

log = logging.getLogger("medq")
FALLBACK = 0.5
POLICIES = ("youden", "sensitivity", "specificity", "fixed")
MANIFEST_KEY = "thresholds"  # the manifest's top-level fact
DECISION_RULES = {
    "binary": "the positive class iff its probability >= its threshold",
    "multilabel": "each label iff its probability >= its threshold",
    "multiclass": "the class whose probability exceeds its threshold by the most: argmax(p - threshold)",
}


@dataclass(frozen=True)
class Policy:
    """How a threshold is chosen: ``name`` in POLICIES; ``target`` the sensitivity or specificity to reach, or the
    fixed threshold (None for youden)."""

    name: str = "youden"
    target: float | None = None

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f"unknown threshold policy {self.name!r}; one of {', '.join(POLICIES)}")
        if (self.name == "youden") != (self.target is None):
            raise ValueError(f"threshold policy {self.name!r}: " +
                             ("takes no target" if self.name == "youden" else "needs a target in (0, 1)"))
        if self.target is not None and not 0.0 < self.target < 1.0:
            raise ValueError(f"threshold policy {self.name!r}: target {self.target} must lie in (0, 1)")

    @classmethod
    def from_config(cls, section: Any) -> "Policy":
        return cls(section.policy, section.target)

    def describe(self) -> str:
        return self.name if self.target is None else f"{self.name} {self.target:g}"


def figures(truth: np.ndarray, called: np.ndarray) -> dict[str, Any]:
    """Sensitivity and specificity of the calls ``called`` against ``truth`` (one class, one-vs-rest), with Wilson
    95% intervals and the counts; None (and no interval) without positives/negatives."""
    truth, called = np.asarray(truth) >= 0.5, np.asarray(called, dtype=bool)
    tp, tn = int((called & truth).sum()), int((~called & ~truth).sum())
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    return {"sensitivity": tp / n_pos if n_pos else None, "specificity": tn / n_neg if n_neg else None,
            "sensitivity_ci": wilson_ci(tp, n_pos), "specificity_ci": wilson_ci(tn, n_neg),
            "n_positive": n_pos, "n_negative": n_neg}


def calls(task: str, y_prob: np.ndarray, values: np.ndarray) -> np.ndarray:
    """[N, K] bool: whether each image is called each class under the decision rule at per-class ``values``
    (binary, multi-label: p ≥ t; multiclass: the one class arg-max(p − t), as predict and serve call it)."""
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if task != "multiclass":
        return y_prob >= values
    return np.eye(y_prob.shape[1], dtype=bool)[decisions(task, y_prob, values)]


def choose_one(truth: np.ndarray, score: np.ndarray, policy: Policy) -> dict[str, Any]:
    """The threshold ``policy`` picks for one class (see the module), with the validation figures at it."""
    truth = np.asarray(truth) >= 0.5
    score = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    notes: list[str] = []
    if policy.name == "fixed":
        value = float(policy.target)
    elif not n_pos or not n_neg:
        value = FALLBACK
        notes.append(f"not chosen: the validation split has {n_pos} positive(s) and {n_neg} negative(s) of this "
                     f"class; {FALLBACK:g} used")
    else:
        fpr, tpr, candidates = roc_curve(truth, score, drop_intermediate=False)  # thresholds descending
        if policy.name == "youden":
            j = tpr - fpr
            idx = int(np.flatnonzero(j >= j.max() - 1e-12)[0])
        elif policy.name == "sensitivity":
            idx = int(np.flatnonzero(tpr >= policy.target - 1e-12)[0])
        else:
            idx = int(np.flatnonzero(1.0 - fpr >= policy.target - 1e-12)[-1])
        value = _between(candidates, idx, score)
        if (tpr - fpr).max() <= 1e-12:
            notes.append("at chance on validation: no threshold calls this class better than chance (best "
                         "sensitivity + specificity - 1 is 0: tied or inverted scores), so this threshold means "
                         "nothing; check the model and the labels")
        if policy.name in ("sensitivity", "specificity"):
            n = n_pos if policy.name == "sensitivity" else n_neg
            if 1.0 / n > 1.0 - policy.target:
                notes.append(f"{n} validation {'positives' if policy.name == 'sensitivity' else 'negatives'}: one "
                             f"image moves the {policy.name} by {1.0 / n:.3f}, more than the target {policy.target:g} "
                             f"leaves, so the split cannot resolve it; the chosen point is kept")
    return {"value": value, "policy": policy.name, "target": policy.target,
            "validation": figures(truth, score >= value), "notes": notes}


def _between(candidates: np.ndarray, idx: int, score: np.ndarray) -> float:
    """The chosen ROC point as a threshold: midway between its score and the next lower one, so the same images are
    called as at the point itself and a probability recomputed with rounding noise does not change sides; the
    lowest score itself for "call every image"; for "call none", midway between the highest score and 1 (just above
    1 when the highest is 1): a number, and one that the top score recomputed in float32 (INT8, another engine)
    does not reach."""
    if not np.isfinite(candidates[idx]):
        top = float(score.max())
        return (top + 1.0) / 2 if top < 1.0 else float(np.nextafter(1.0, np.inf))
    if idx + 1 >= len(candidates):
        return float(candidates[idx])
    return float((candidates[idx] + candidates[idx + 1]) / 2)


def thresholded_classes(task: str, classes: list[str]) -> list[str]:
    """The classes a run holds a threshold for: binary, the positive class (the second); otherwise all."""
    return [classes[1]] if task == "binary" else list(classes)


def check_per_class(section: Any, task: str, classes: list[str]) -> dict[str, Policy]:
    """``thresholds.per_class`` as policies, each naming a class the run holds a threshold for; any other name is a
    one-line ConfigError listing the valid ones (checked as soon as a stage knows the classes)."""
    wanted = thresholded_classes(task, classes)
    policies = {}
    for name, entry in (getattr(section, "per_class", None) or {}).items():
        if name not in wanted:
            why = " (a binary run holds a threshold for its positive class only)" if task == "binary" else ""
            raise ConfigError(f"thresholds.per_class: {name!r} is not a class this run holds a threshold for{why}; "
                              f"use one of {', '.join(wanted)}")
        policies[name] = Policy.from_config(entry)
    return policies


def choose(task: str, y_true: np.ndarray, y_prob: np.ndarray, classes: list[str], policy: Policy,
           chosen_for: dict[str, str] | None = None, per_class: dict[str, Policy] | None = None) -> dict[str, Any]:
    """The manifest's ``thresholds`` record: per class ``choose_one`` on the validation labels and probabilities,
    by ``per_class``'s policy for the classes it names and ``policy`` for the others; ``chosen_for``: the artifacts
    (key → sha256) whose outputs they were chosen on."""
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    policies = {c: (per_class or {}).get(c, policy) for c in thresholded_classes(task, classes)}
    chosen = {c: choose_one(y_true[:, classes.index(c)], y_prob[:, classes.index(c)], policies[c])
              for c in policies}
    if task == "multiclass" and len(y_prob):
        _under_the_decision_rule(chosen, classes, y_true, y_prob, policies)
    return {"policy": policy.name, "target": policy.target, "split": "val", "task": task,
            "per_class": {c: p.describe() for c, p in (per_class or {}).items()},
            "decision_rule": DECISION_RULES[task], "chosen_for": dict(chosen_for or {}), "classes": chosen}


def _under_the_decision_rule(per_class: dict[str, Any], classes: list[str], y_true: np.ndarray, y_prob: np.ndarray,
                             policies: dict[str, Policy]) -> None:
    """A multiclass image is called one class, arg-max(p − t): each class's validation figures are recorded for
    those calls (what predict and serve do), not for its own p ≥ t, which another class's call can overrule; a
    target the calls fall short of is said."""
    called = calls("multiclass", y_prob, np.array([per_class[c]["value"] for c in classes]))
    for k, c in enumerate(classes):
        entry = per_class[c]
        alone, policy = entry["validation"], policies[c]
        entry["validation"] = figures(y_true[:, k], called[:, k])
        if policy.name not in ("sensitivity", "specificity") or alone[policy.name] is None:
            continue
        reached = entry["validation"][policy.name]
        if reached < policy.target <= alone[policy.name]:
            entry["notes"].append(
                f"its threshold reaches {policy.name} {alone[policy.name]:.3f} on its own, but under the multiclass "
                f"decision rule (the class exceeding its threshold by the most) other classes take some of these "
                f"images: validation {policy.name} {reached:.3f}, below the target {policy.target:g}")


def for_run(config: Any, task: str, classes: list[str], y_true: np.ndarray, y_prob: np.ndarray,
            model_sha: str, model_key: str = "keras_model") -> dict[str, Any]:
    """The ``thresholds`` record for a run's new model (artifact ``model_key``, sha256 ``model_sha``: the Keras
    model, or a converted run's ``fp32_pb``) by the config's policy, from its validation labels and probabilities;
    logged per class with the figures reached and every note as a warning. Every stage that makes or replaces the
    run's model (and, for a converted run, the first evaluate or quantize) commits this as the fact ``MANIFEST_KEY``."""
    policy = Policy.from_config(config.thresholds)
    per_class = check_per_class(config.thresholds, task, classes)
    record = choose(task, y_true, y_prob, classes, policy, chosen_for={model_key: model_sha}, per_class=per_class)
    for name, entry in record["classes"].items():
        val = entry["validation"]
        log.info("threshold %s: %.4g (%s on validation: sensitivity %s, specificity %s; %d+/%d-)", name,
                 entry["value"], per_class.get(name, policy).describe(), _figure(val["sensitivity"]),
                 _figure(val["specificity"]),
                 val["n_positive"], val["n_negative"])
        for note in entry["notes"]:
            log.warning("threshold %s: %s", name, note)
    return record


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@dataclass
class Thresholds:
    """The thresholds a stage decides with: ``values`` per thresholded class, where they came from and why."""

    task: str
    classes: list[str]
    values: dict[str, float]
    source: str  # 'validation' | 'fallback' | 'override'
    notes: list[str] = field(default_factory=list)
    record: dict[str, Any] | None = None  # the manifest record they were read from

    @classmethod
    def uniform(cls, task: str, classes: list[str], value: float, source: str, note: str | None = None):
        return cls(task, list(classes), {c: float(value) for c in thresholded_classes(task, classes)}, source,
                   [note] if note else [])

    @classmethod
    def from_manifest(cls, manifest: Any, task: str, classes: list[str]) -> "Thresholds":
        """The thresholds of a run's record (a ``medq.runrecord.Manifest``): its ``facts.thresholds``, checked
        against the model they belong to (:func:`deciding_model`; :meth:`from_record`)."""
        key, sha = deciding_model(manifest)
        return cls.from_record(manifest.facts.thresholds, sha, task, classes, key)

    @classmethod
    def from_record(cls, record: Any, model_sha: str | None, task: str, classes: list[str],
                    model_key: str = "keras_model") -> "Thresholds":
        """The recorded thresholds (:func:`choose`'s record); a run without them (made before medq chose them), or
        whose record does not fit its classes or its current model (artifact ``model_key``, sha256 ``model_sha``:
        replaced without choosing again), decides at ``FALLBACK`` with a note saying so."""
        wanted = thresholded_classes(task, classes)
        rerun = "rerun `medq train`" if model_key == "keras_model" else \
            "run `medq evaluate` (or `medq quantize`), which chooses them on validation for a converted model,"
        if not isinstance(record, dict) or not isinstance(record.get("classes"), dict):
            return cls.uniform(task, classes, FALLBACK, "fallback",
                               f"the run records no operating thresholds (not yet chosen on validation); deciding "
                               f"at {FALLBACK:g} — {rerun} to choose them")
        values = {c: (record["classes"].get(c) or {}).get("value") for c in wanted}
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values.values()):
            return cls.uniform(task, classes, FALLBACK, "fallback",
                               f"the run's thresholds do not name every class of {wanted}; deciding at "
                               f"{FALLBACK:g} — {rerun}")
        chosen_for = record.get("chosen_for") or {}
        if model_sha and chosen_for and chosen_for.get(model_key) != model_sha:
            return cls.uniform(task, classes, FALLBACK, "fallback",
                               f"the run's thresholds were chosen for an earlier model; deciding at {FALLBACK:g} — "
                               f"{rerun if model_key != 'keras_model' else 'rerun `medq train` (or `medq tune`)'} "
                               "to choose them for this one")
        notes = [f"{c}: {n}" for c in wanted for n in (record["classes"][c].get("notes") or [])]
        return cls(task, list(classes), {c: float(v) for c, v in values.items()}, "validation", notes, record)

    def per_column(self) -> float | np.ndarray:
        """What ``medq.metrics`` decides with: binary, the positive class's threshold; else one per class column."""
        if self.task == "binary":
            return self.values[self.classes[1]]
        return np.array([self.values[c] for c in self.classes])

    def describe(self) -> str:
        """'PNEUMONIA 0.3712 (validation: youden)' for logs and reports."""
        shown = ", ".join(f"{c} {v:.4g}" for c, v in self.values.items())
        how = self.source
        if self.record:
            target = self.record.get("target")
            how += f": {self.record.get('policy')}" + ("" if target is None else f" {target:g}")
        return f"{shown} ({how})"


def deciding_model(manifest: Any) -> tuple[str, str | None]:
    """(artifact key, sha256) of the model a run's thresholds belong to: its Keras model, or, for a converted run
    (``medq convert``: no Keras model), its frozen FP32 graph."""
    key = "keras_model" if "keras_model" in manifest.artifacts or "fp32_pb" not in manifest.artifacts else "fp32_pb"
    model = manifest.artifacts.get(key)
    return key, model.sha256 if model is not None else None


def to_choose(manifest: Any) -> str | None:
    """Why a converted run (no Keras model: train and tune never choose its thresholds) needs its thresholds chosen
    on validation now, or None: it has current ones, or it has a Keras model (thresholds are train's and tune's,
    never overwritten elsewhere)."""
    key, sha = deciding_model(manifest)
    if key != "fp32_pb" or sha is None:
        return None
    task, classes = manifest.facts.task, manifest.facts.classes
    if task not in DECISION_RULES or not classes:
        return None
    current = Thresholds.from_record(manifest.facts.thresholds, sha, task, list(classes), key)
    return current.notes[0] if current.source == "fallback" else None


def held(thresholds: Thresholds, y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, Any]:
    """How the chosen points held on another split: per thresholded class, sensitivity/specificity of the calls the
    decision rule makes (one-vs-rest; multiclass: the one class called, :func:`calls`) with Wilson 95% intervals,
    beside the validation figures it was chosen at."""
    y_true, y_prob = np.asarray(y_true) >= 0.5, np.asarray(y_prob, dtype=np.float64)
    values = thresholds.per_column()
    called = calls(thresholds.task, y_prob, values) if len(y_prob) else np.zeros(y_prob.shape, dtype=bool)
    out: dict[str, Any] = {}
    for c, value in thresholds.values.items():
        k = thresholds.classes.index(c)
        chosen = ((thresholds.record or {}).get("classes") or {}).get(c, {}).get("validation")
        out[c] = {"threshold": value, **figures(y_true[:, k], called[:, k]), "validation": chosen}
    return {"source": thresholds.source, "notes": thresholds.notes, "task": thresholds.task,
            "decision_rule": DECISION_RULES[thresholds.task], "classes": out}


def at(task: str | None, name: str, value: float) -> str:
    """'PNEUMONIA ≥ 0.3712' where a class is called when p ≥ t; a multiclass class is called by arg-max(p − t), not by
    its own threshold alone: 'B (threshold 0.275)'."""
    return f"{name} (threshold {value:.4g})" if task == "multiclass" else f"{name} ≥ {value:.4g}"


def run_thresholds(manifest: Any, task: str, classes: list[str],
                   override: float | None = None) -> Thresholds:
    """The thresholds a stage decides with: ``override`` for every class when given, else the run's (with their
    notes logged: a run without them decides at 0.5 and says so)."""
    if override is not None:
        return Thresholds.uniform(task, classes, override, "override",
                                 f"--threshold {override:g} overrides the run's thresholds")
    chosen = Thresholds.from_manifest(manifest, task, classes)
    for note in chosen.notes:
        log.warning("thresholds: %s", note)
    return chosen
