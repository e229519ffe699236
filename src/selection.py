"""The run's one selection rule: the validation number (``run.objective``) that picks training's best epoch, ranks
the tuner's trials, decides tune vs train and is INC's accuracy criterion, and the chance-level guard.

On imbalanced medical data accuracy rewards always answering the majority class, hence ``auc`` by default. A model
whose validation AUC is not above chance by its 95% interval never replaces another one, whatever its objective.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medq.runrecord import Manifest

OBJECTIVES = ("auc", "accuracy")
CHANCE_AUC = 0.5


def objective(config: Any, manifest: Manifest | None = None) -> str:
    """The run's objective: the one its model was selected by (recorded in the manifest), else the config's."""
    recorded = manifest.facts.objective if manifest is not None else None
    return recorded if recorded in OBJECTIVES else config.run.objective


def other_metric(key: str) -> str:
    """The tie-break of ``key``: accuracy saturates on easy splits, AUC can tie between near-identical models."""
    return "accuracy" if key == "auc" else "auc"


def value(metrics: dict[str, Any] | None, key: str) -> float:
    v = (metrics or {}).get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else -math.inf


def at_chance(metrics: dict[str, Any] | None) -> bool:
    """The validation AUC's 95% interval reaches down to 0.5 (0.5 included): the model is not shown to have learned
    anything. Metrics without an interval (an AUC undefined on the split, an older manifest) are not judged."""
    ci = ((metrics or {}).get("ci") or {}).get("auc")
    return bool(ci) and ci[0] <= CHANCE_AUC


def rank(metrics: dict[str, Any] | None, key: str) -> tuple[bool, float, float]:
    """Sort key (higher is better): above chance first, then the objective, then the other metric."""
    return not at_chance(metrics), value(metrics, key), value(metrics, other_metric(key))


def is_better(metrics: dict[str, Any], than: dict[str, Any] | None, key: str) -> bool:
    """Whether a candidate (an epoch, a trial) replaces the incumbent: anything beats nothing; a candidate at
    chance never replaces a model; otherwise the higher ``key`` wins, ties by the other metric."""
    if not than:
        return True
    if at_chance(metrics):
        return False
    return rank(metrics, key) > rank(than, key)
