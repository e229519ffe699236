"""Model registry: ``build_model(name, ...)`` builds any registered architecture with a head for the task.

Every model takes ``[N, S, S, C]`` float32 preprocessed images and ends in a layer named ``probabilities``:
softmax for binary/multiclass (binary = two classes), sigmoid for multilabel.
"""
from __future__ import annotations

from typing import Any, Callable

from medq.errors import ConfigError

MODELS: dict[str, Callable[..., Any]] = {}


def register(name: str):
    def wrap(fn):
        MODELS[name] = fn
        return fn

    return wrap


def build_model(name: str, input_shape: tuple[int, int, int], n_classes: int, task: str, *, dropout: float = 0.2,
                weights: str | None = None, **params: Any):
    """Build ``name`` for ``input_shape`` with an ``n_classes`` head suited to ``task``."""
    from medq.models import zoo  # noqa: F401  (registers the architectures)

    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    try:
        return MODELS[name](input_shape=tuple(input_shape), n_classes=n_classes, task=task, dropout=dropout,
                            weights=weights, **params)
    except TypeError as exc:
        raise ConfigError(f"model.params: {name} does not take these parameters ({exc})") from None


def head_activation(task: str) -> str:
    return "sigmoid" if task == "multilabel" else "softmax"


def custom_objects() -> dict[str, Any]:
    """Custom layers and losses needed to reload saved models."""
    from medq.models import zoo  # noqa: F401

    return dict(zoo.CUSTOM_OBJECTS)


def model_names() -> list[str]:
    from medq.models import zoo  # noqa: F401

    return sorted(MODELS)
