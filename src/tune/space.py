"""``tune.search_space`` → keras-tuner hyperparameters, and a trial's values → medq's training settings.

Every name and value of the space is checked before any trial runs: a setting the model does not take, a range the
wrong way round, a loss the task cannot use or an (alpha, beta) outside the compound-scaling constraint is a
ConfigError naming the key.
"""
from __future__ import annotations

import dataclasses
import inspect
import itertools
from typing import Any

from medq.errors import ConfigError
from medq.losses import resolve_loss_name

FIT_KEYS = ("learning_rate", "batch_size", "dropout", "optimizer", "loss")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
RANGE_KINDS = ("loguniform", "uniform", "int")
SCALING_KEYS = ("alpha", "beta", "phi")


def _model_params(model_name: str) -> set[str]:
    from medq.models import MODELS, model_names

    model_names()  # registers the zoo
    fn = MODELS.get(model_name)
    if fn is None:
        raise ConfigError(f"model.name: unknown model {model_name!r}; choose one of {', '.join(sorted(MODELS))}")
    return {name for name, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY}


def _scaling_defaults() -> dict[str, float]:
    from medq.models import zoo

    params = inspect.signature(zoo.scaled_densenet).parameters
    return {k: params[k].default for k in SCALING_KEYS}


def declare_space(config: Any, task: str):
    """``tune.search_space`` → keras_tuner.HyperParameters, every name and value checked before any trial runs."""
    import keras_tuner as kt

    space = config.tune.search_space
    if not space:
        raise ConfigError("tune.search_space: empty; give at least learning_rate and batch_size choices")
    allowed = set(FIT_KEYS) | _model_params(config.model.name)
    hp = kt.HyperParameters()
    for name, spec in space.items():
        where = f"tune.search_space.{name}"
        if name not in allowed:
            raise ConfigError(f"{where}: {config.model.name} has no such setting; "
                              f"use one of {', '.join(sorted(allowed))}")
        if not spec:
            raise ConfigError(f"{where}: empty list; give choices or [loguniform, low, high]")
        if isinstance(spec[0], str) and spec[0] in RANGE_KINDS:
            if len(spec) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec[1:]) \
                    or not spec[1] < spec[2]:
                raise ConfigError(f"{where}: a range is [{spec[0]}, low, high] with low < high, got {spec}")
            kind, low, high = spec
            if kind == "int":
                hp.Int(name, int(low), int(high))
            else:
                if kind == "loguniform" and low <= 0:
                    raise ConfigError(f"{where}: a loguniform range needs low > 0, got {low}")
                hp.Float(name, float(low), float(high), sampling="log" if kind == "loguniform" else "linear")
            continue
        values = list(spec)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and \
                any(isinstance(v, float) for v in values):
            values = [float(v) for v in values]  # keras-tuner wants one type per Choice
        if len({type(v) for v in values}) > 1:
            raise ConfigError(f"{where}: choices must all be numbers or all be names, got {values}")
        if name == "loss":
            for v in values:
                resolve_loss_name(v, task)
        if name == "optimizer" and set(values) - set(OPTIMIZERS):
            raise ConfigError(f"{where}: optimizers are {', '.join(OPTIMIZERS)}, got {values}")
        if name == "batch_size" and any(not isinstance(v, int) or v <= 0 for v in values):
            raise ConfigError(f"{where}: batch sizes are positive integers, got {values}")
        hp.Choice(name, values)
    _check_scaling(config, space)
    return hp


def _check_scaling(config: Any, space: dict[str, list[Any]]) -> None:
    """Every (alpha, beta) the search can pick must satisfy the compound-scaling constraint."""
    if config.model.name != "scaled-densenet":
        return
    from medq.models.zoo import compound_scaling

    base = _scaling_defaults() | {k: v for k, v in config.model.params.items() if k in SCALING_KEYS}

    def options(key):
        spec = space.get(key)
        if spec is None:
            return [base[key]]
        return [spec[1], spec[2]] if isinstance(spec[0], str) else list(spec)

    for alpha, beta in itertools.product(options("alpha"), options("beta")):
        try:
            compound_scaling(float(alpha), float(beta), 0.0)
        except ConfigError as exc:
            raise ConfigError(f"tune.search_space: {exc}") from None


def trial_settings(config: Any, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int]:
    """A trial's values → (fit_model keyword arguments, model params, input resolution).

    For scaled-densenet searches over alpha/beta/phi the resolution is preprocess.image_size · γ^φ (the φ = 0
    size is the config's); every other model keeps preprocess.image_size.
    """
    fit = {k: values[k] for k in FIT_KEYS if k in values}
    params = {k: v for k, v in values.items() if k not in FIT_KEYS and not k.startswith("tuner/")}
    size = config.preprocess.image_size
    if config.model.name == "scaled-densenet" and any(k in params for k in SCALING_KEYS):
        from medq.models.zoo import scaled_image_size

        s = _scaling_defaults() | {k: v for k, v in config.model.params.items() if k in SCALING_KEYS} | \
            {k: v for k, v in params.items() if k in SCALING_KEYS}
        size = scaled_image_size(size, float(s["alpha"]), float(s["beta"]), float(s["phi"]))
    return fit, params, size


def with_image_size(config: Any, size: int) -> Any:
    if size == config.preprocess.image_size:
        return config
    return dataclasses.replace(config, preprocess=dataclasses.replace(config.preprocess, image_size=size))
