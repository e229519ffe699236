"""The architectures: the reference kit's CNN family and DenseNet121 (CheXNet's backbone)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medq.errors import ConfigError
from medq.models import head_activation, register

CUSTOM_OBJECTS: dict[str, Any] = {}


def _classifier_head(features, n_classes: int, task: str, dropout: float):
    import tensorflow as tf

    if dropout > 0:
        features = tf.keras.layers.Dropout(dropout, name="head_dropout")(features)
    return tf.keras.layers.Dense(n_classes, activation=head_activation(task), name="probabilities")(features)


def _load_weights(model, weights: str | None, by_name: bool = False):
    if weights is None:
        return model
    path = Path(weights)
    if not path.is_file():
        raise ConfigError(f"model.weights: {path} not found; give a local weights file (nothing is downloaded)")
    model.load_weights(str(path), by_name=by_name, skip_mismatch=by_name)
    return model


@register("refkit-cnn")
def refkit_cnn(input_shape, n_classes, task, dropout=0.2, weights=None, *, blocks: int = 4, filters: int = 16,
               dense_units: int = 64):
    """The reference kit's conv/LeakyReLU/max-pool family, sized sanely.

    The kit flattened its last feature map into 2400/1600/800-unit dense layers (43 M parameters, most of the
    model); global average pooling and one small dense layer keep the same idea at a few hundred thousand.
    """
    import tensorflow as tf

    layers = tf.keras.layers
    inputs = layers.Input(shape=input_shape, name="image")
    x = inputs
    for b in range(blocks):
        width = filters * 2 ** b
        for c in range(2):
            x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"block{b + 1}_conv{c + 1}")(x)
            x = layers.BatchNormalization(momentum=0.9, name=f"block{b + 1}_bn{c + 1}")(x)
            x = layers.LeakyReLU(0.1, name=f"block{b + 1}_lrelu{c + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"block{b + 1}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(dense_units, name="fc")(x)
    x = layers.LeakyReLU(0.1, name="fc_lrelu")(x)
    outputs = _classifier_head(x, n_classes, task, dropout)
    return _load_weights(tf.keras.Model(inputs, outputs, name="refkit_cnn"), weights)


@register("densenet121")
def densenet121(input_shape, n_classes, task, dropout=0.0, weights=None):
    """keras.applications DenseNet121 (weights=None; a local file may hold ImageNet or earlier weights)."""
    import tensorflow as tf

    backbone = tf.keras.applications.DenseNet121(include_top=False, weights=None, input_shape=input_shape,
                                                 pooling="avg")
    outputs = _classifier_head(backbone.output, n_classes, task, dropout)
    model = tf.keras.Model(backbone.input, outputs, name="densenet121")
    return _load_weights(model, weights, by_name=True)
