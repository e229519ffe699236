"""The search's trials as a table: read from the project folder, ranked, the trade-off picked, written as CSV,
Markdown and a metric-against-cost plot.

Each trial's folder holds keras-tuner's ``trial.json`` (read through :mod:`medq.tune.kt_private`) and medq's
``medq_trial.json`` (values, validation metrics, parameters, FLOPs, batch-1 Keras latency, which tuner ran it).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medq import artifacts
from medq.metrics import with_ci
from medq.selection import at_chance, other_metric, rank

TRIAL_FACTS = "medq_trial.json"
REPORT_CSV, REPORT_MD, REPORT_PNG = "tune_trials.csv", "tune_trials.md", "tune_tradeoff.png"
OBJECTIVE = "val_objective"


@dataclass
class TrialRow:
    """One trial as the table shows it."""

    trial_id: str
    status: str
    values: dict[str, Any]
    tuner_id: str | None = None
    image_size: int | None = None
    epochs: int | None = None
    val_objective: float | None = None
    val_auc: float | None = None
    val_auc_ci: list[float] | None = None
    val_accuracy: float | None = None
    val_accuracy_ci: list[float] | None = None
    at_chance: bool = False  # the validation AUC's 95% interval reaches 0.5
    parameters: int | None = None
    flops: int | None = None
    latency_ms: float | None = None
    seconds: float | None = None
    pareto: bool = False
    message: str | None = None
    val_metrics: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def completed(self) -> bool:
        return self.status == "COMPLETED" and self.val_objective is not None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("val_metrics")
        return out


def collect_trials(project: Path, objective: str, oracle=None) -> list[TrialRow]:
    """Every trial in the project folder (keras-tuner's trial.json + medq's facts), in trial-id order; with the
    search's ``oracle``, the status it holds (newer than a running trial's file)."""
    from medq.tune.kt_private import read_trial

    rows = []
    for trial_dir in sorted(project.glob("trial_*"), key=_trial_order):
        facts_path = trial_dir / TRIAL_FACTS
        facts = json.loads(facts_path.read_text()) if facts_path.is_file() else {}
        trial = read_trial(trial_dir)
        trial_id = trial.get("trial_id") or trial_dir.name[len("trial_"):]
        status = trial.get("status", "RUNNING")
        if oracle is not None and trial_id in getattr(oracle, "trials", {}):
            status = oracle.trials[trial_id].status
        values = trial.get("values") or facts.get("values", {})
        metrics = facts.get("val_metrics", {})
        message = (trial.get("message") or "").strip().splitlines()
        row = TrialRow(trial_id, status, {k: v for k, v in values.items() if not k.startswith("tuner/")},
                       facts.get("tuner_id"), facts.get("image_size"), facts.get("epochs"),
                       message=message[-1][:200] if message else None, val_metrics=metrics)
        if facts:
            ci = metrics.get("ci") or {}
            row.val_objective = number(metrics.get(objective))
            row.val_auc, row.val_auc_ci = number(metrics.get("auc")), ci.get("auc")
            row.val_accuracy, row.val_accuracy_ci = number(metrics.get("accuracy")), ci.get("accuracy")
            row.at_chance = at_chance(metrics)
            row.parameters, row.flops = facts.get("parameters"), facts.get("flops")
            row.latency_ms, row.seconds = facts.get("latency_ms"), facts.get("seconds")
        rows.append(row)
    return rows


def _trial_order(trial_dir: Path) -> tuple[int, str]:
    trial_id = trial_dir.name[len("trial_"):]
    return (int(trial_id), trial_id) if trial_id.isdigit() else (1 << 30, trial_id)


def number(value: Any) -> float | None:
    """A finite number as float, anything else (None, NaN, a string) as None."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _latency(row: TrialRow) -> float:
    return row.latency_ms if row.latency_ms is not None else math.inf


def pick(rows: list[TrialRow], tolerance: float, objective: str) -> tuple[TrialRow | None, TrialRow | None]:
    """(best by :func:`medq.selection.rank`, the fastest trial above chance within ``tolerance`` of the best's
    objective); marks the Pareto front of rank (higher) against latency (lower)."""
    done = [r for r in rows if r.completed]
    if not done:
        return None, None

    def key(r: TrialRow) -> tuple[bool, float, float]:
        return rank(r.val_metrics, objective)

    best = max(done, key=key)
    for r in done:
        r.pareto = not any(key(o) >= key(r) and _latency(o) <= _latency(r) and
                           (key(o) > key(r) or _latency(o) < _latency(r)) for o in done if o is not r)
    near = [r for r in done if r.at_chance == best.at_chance and r.val_objective >= best.val_objective - tolerance]
    tradeoff = min(near, key=lambda r: (_latency(r), [-k for k in key(r)]))
    return best, tradeoff


def _columns(rows: list[TrialRow]) -> list[str]:
    names = []
    for r in rows:
        names += [k for k in r.values if k not in names]
    return names


def trial_table_csv(rows: list[TrialRow], best: TrialRow | None, tradeoff: TrialRow | None) -> str:
    hp_names = _columns(rows)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", "tuner", "status", *hp_names, "image_size", "epochs", "val_objective", "val_auc",
                     "val_auc_ci_low", "val_auc_ci_high", "val_accuracy", "val_accuracy_ci_low",
                     "val_accuracy_ci_high", "at_chance", "parameters", "flops", "latency_ms", "seconds", "pareto",
                     "pick"])
    for r in rows:
        auc_ci, acc_ci = r.val_auc_ci or [None, None], r.val_accuracy_ci or [None, None]
        writer.writerow([r.trial_id, r.tuner_id or "", r.status, *[r.values.get(k, "") for k in hp_names],
                         r.image_size or "", r.epochs or "", fmt(r.val_objective), fmt(r.val_auc),
                         fmt(auc_ci[0]), fmt(auc_ci[1]), fmt(r.val_accuracy), fmt(acc_ci[0]), fmt(acc_ci[1]),
                         int(r.at_chance), r.parameters or "", r.flops or "", fmt(r.latency_ms, 3),
                         r.seconds or "", int(r.pareto), _pick_label(r, best, tradeoff)])
    return out.getvalue()


def trial_table_markdown(rows: list[TrialRow], best: TrialRow | None, tradeoff: TrialRow | None,
                         objective: str) -> str:
    from medq.flops import human

    hp_names = _columns(rows)
    head = ["trial", "tuner", "status", *hp_names, "size", "val AUC [95% CI]", "val accuracy [95% CI]", "params",
            "FLOPs", "bs1 ms", "train s", "pick"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        auc = with_ci(r.val_auc, r.val_auc_ci) + (" (chance)" if r.at_chance else "")
        cells = [r.trial_id, r.tuner_id or "", r.status, *[str(r.values.get(k, "")) for k in hp_names],
                 str(r.image_size or ""), auc, with_ci(r.val_accuracy, r.val_accuracy_ci),
                 human(r.parameters) if r.parameters else "", human(r.flops) if r.flops else "",
                 fmt(r.latency_ms, 2), str(r.seconds or ""),
                 " ".join(filter(None, [_pick_label(r, best, tradeoff), "pareto" if r.pareto else ""]))]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"Objective (run.objective): validation {objective} per image ({OBJECTIVE}, maximised; ties by "
             f"{other_metric(objective)}). A trial marked (chance) has a validation AUC whose 95% DeLong interval "
             "reaches 0.5: it ranks below every trial that does not and never replaces the run's model. "
             "Accuracy intervals: Wilson. "
             "bs1 ms: batch-1 Keras latency, median, measured once per trial model in the search process. "
             "pareto: no other trial is both at least as good and at least as fast."]
    if best is not None:
        notes.append(f"Best: trial {best.trial_id}. Trade-off pick: trial {tradeoff.trial_id} (the fastest within "
                     f"the configured tolerance of the best).")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _pick_label(r: TrialRow, best: TrialRow | None, tradeoff: TrialRow | None) -> str:
    labels = [name for name, t in (("best", best), ("tradeoff", tradeoff)) if t is not None and t is r]
    return "+".join(labels)


def fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def tradeoff_png(rows: list[TrialRow], best: TrialRow | None, tradeoff: TrialRow | None, objective: str,
                 target: Path, reference: float | None = None) -> Path | None:
    """Metric against parameters, FLOPs and latency, one panel each; Pareto trials filled, best/pick labelled, and
    the run's current model's metric (``reference``, the bar a trial must beat) as a dashed line."""
    done = [r for r in rows if r.completed]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from medq.flops import human

    axes_spec = [("parameters", "parameters", True), ("flops", "FLOPs (batch 1)", True),
                 ("latency_ms", "batch-1 Keras latency, ms", False)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, (attr, label, log_scale) in zip(axes, axes_spec):
        for r in done:
            x = getattr(r, attr)
            if x is None:
                continue
            ax.scatter([x], [r.val_objective], s=50, c="tab:blue" if r.pareto else "white", edgecolors="tab:blue",
                       zorder=3)
            tag = r.trial_id + (" best" if r is best else "") + (" pick" if r is tradeoff and r is not best else "")
            ax.annotate(tag, (x, r.val_objective), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if reference is not None:
            ax.axhline(reference, color="tab:red", linestyle="--", linewidth=1,
                       label="the run's model before this tune")
        if log_scale:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v)))
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"validation {objective}")
    if reference is not None:
        axes[0].legend(loc="lower right", fontsize=7)
    fig.suptitle("tuning trials: filled = Pareto front (metric vs latency)")
    fig.tight_layout()
    with artifacts.atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return target
