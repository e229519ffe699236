"""Model registry: ``build_model(name, ...)`` builds any registered architecture with a head for the task.

Every model takes ``[N, S, S, C]`` float32 preprocessed images (C = 1 or 3) and ends in a layer named
``probabilities``: softmax for binary/multiclass (binary = two classes), sigmoid for multilabel.

| name | what (medq.models.zoo) | params, FLOPs at 96×96×1 |
|---|---|---|
| refkit-cnn | the reference kit's conv/LeakyReLU family, global-pooled | 0.30 M, 0.24 G |
| chexnet | DenseNet121 + N-way head (CheXNet); weighted-bce for multi-label | 7.0 M, 1.0 G |
| scaled-densenet | DenseNet-BC, depths × α^φ, growth × β^φ (alpha, beta, phi, base_*) | 7.0 M, 1.0 G at φ = 0 |
| densenet121 | keras.applications, weights=None | 7.0 M, 1.0 G |
| densenet169 | keras.applications, weights=None | 12.6 M, 1.2 G |
| resnet50 | keras.applications, weights=None | 23.6 M, 1.4 G |
| vgg16 | keras.applications, weights=None | 14.7 M, 5.6 G |
| efficientnetb0 | keras.applications, weights=None; scales its own input (normalization raw) | 4.1 M, 0.14 G |

Each entry carries its input (:class:`ModelEntry`): the default image size, channels and normalisation a config
that leaves them out gets (``medq.config`` applies them and records which settings came from the model), its
smallest input side and channel counts, and whether it normalises inside itself (then only ``raw`` pixels are fed).

``model.weights`` names a local file (``.h5`` or ``.keras``): nothing is downloaded. Parameters and FLOPs of any
model: :func:`medq.flops.model_facts`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medq.errors import ConfigError, MedqError, first_line
from medq.models.registry import ENTRIES, MODELS, PREPROCESS_KEYS, ModelEntry, head_activation, register

__all__ = ["ENTRIES", "MODELS", "PREPROCESS_KEYS", "ModelEntry", "build_model", "head_activation", "load_keras_model",
           "model_entry", "model_names", "register", "with_bn_momentum"]


def model_entry(name: str) -> ModelEntry | None:
    from medq.models import zoo  # noqa: F401  (registers the architectures)

    return ENTRIES.get(name)


def build_model(name: str, input_shape: tuple[int, int, int], n_classes: int, task: str, *, dropout: float = 0.2,
                weights: str | None = None, **params: Any):
    """Build ``name`` for ``input_shape`` with an ``n_classes`` head suited to ``task``."""
    from medq.models import zoo  # noqa: F401  (registers the architectures)

    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    entry = ENTRIES[name]
    if min(input_shape[:2]) < entry.min_size:
        raise ConfigError(f"preprocess.image_size: {name} needs at least {entry.min_size} px, got {input_shape[0]}")
    try:
        model = MODELS[name](input_shape=tuple(input_shape), n_classes=n_classes, task=task, dropout=dropout,
                             weights=weights, **params)
    except TypeError as exc:
        raise ConfigError(f"model.params: {name} does not take these parameters ({exc})") from None
    return with_bn_momentum(model, BN_MOMENTUM)


# keras.applications builds BatchNormalization with momentum 0.99: after the few hundred steps of a short run its
# moving statistics are still near their initial values, and the inference-mode model (the one that is frozen,
# quantized and benchmarked) outputs constants. 0.9 tracks the batch statistics within ~50 steps.
BN_MOMENTUM = 0.9


def with_bn_momentum(model, momentum: float):
    import tensorflow as tf

    for layer in model.submodules:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.momentum = momentum
    return model


def model_names() -> list[str]:
    from medq.models import zoo  # noqa: F401

    return sorted(MODELS)


def load_keras_model(path: str | Path, *, trust_legacy: bool = False):
    """Load a Keras model for inference. The ``.keras`` zip format loads with Keras' safe mode (no code from the
    file runs); HDF5 and SavedModel go through the legacy loader, where it does not apply, so they need
    ``trust_legacy`` (the CLI's --trust-model-file)."""
    import tensorflow as tf

    path = Path(path)
    if not path.exists():
        raise MedqError(f"{path}: Keras model not found; run `medq train` (or `medq tune`) for this run first")
    legacy = path.is_dir() or path.suffix.lower() != ".keras"
    if legacy and not trust_legacy:
        raise MedqError(f"{path}: not a .keras file; HDF5 and SavedModel files load through Keras' legacy loader, "
                        "which can run code stored in them: pass --trust-model-file only for a file you trust, "
                        "or save the model as .keras")
    try:
        return tf.keras.models.load_model(path, compile=False, **({} if legacy else {"safe_mode": True}))
    except (OSError, ValueError) as exc:
        raise MedqError(f"{path}: not a loadable Keras model ({first_line(exc)}); "
                        "re-run `medq train`") from None
