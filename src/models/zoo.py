"""The architectures: the reference kit's CNN family, CheXNet, a compound-scaled DenseNet and keras.applications nets.

Every builder takes ``(input_shape, n_classes, task, dropout, weights, **params)`` and returns a model whose last
layer is ``probabilities`` (softmax for binary/multiclass, sigmoid for multilabel). Inputs may have 1 or 3 channels;
nothing is ever downloaded: ``weights`` is a local file (see :func:`load_weights_file`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from medq.errors import ConfigError
from medq.models.registry import head_activation, register

def _classifier_head(features, n_classes: int, task: str, dropout: float):
    import tensorflow as tf

    if dropout > 0:
        features = tf.keras.layers.Dropout(dropout, name="head_dropout")(features)
    return tf.keras.layers.Dense(n_classes, activation=head_activation(task), name="probabilities")(features)


# --- local weights files ----------------------------------------------------------------------------------------

def _file_weights(path: Path) -> dict[str, list[np.ndarray]]:
    """Layer name → weight arrays from a Keras ``.h5`` weights/model file or a ``.keras`` model file."""
    if path.suffix in (".h5", ".hdf5"):
        import h5py

        out: dict[str, list[np.ndarray]] = {}
        with h5py.File(path, "r") as f:
            group = f["model_weights"] if "model_weights" in f else f
            for name in group.attrs.get("layer_names", []):
                name = name.decode() if isinstance(name, bytes) else str(name)
                layer = group[name]
                names = [n.decode() if isinstance(n, bytes) else str(n) for n in layer.attrs.get("weight_names", [])]
                if names:
                    out[name] = [np.asarray(layer[n]) for n in names]
        return out
    if path.suffix == ".keras":
        import tensorflow as tf

        source = tf.keras.models.load_model(path, compile=False)
        return {layer.name: layer.get_weights() for layer in _all_layers(source) if layer.weights}
    raise ConfigError(f"model.weights: {path}: use a Keras .h5 weights file (e.g. keras.applications' *_notop.h5) "
                      "or a .keras model file")


def _all_layers(model) -> list:
    import tensorflow as tf

    out = []
    for layer in model.layers:
        out.extend(_all_layers(layer) if isinstance(layer, tf.keras.Model) else [layer])
    return out


def _adapt(source: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray | None:
    """The source array in the target's shape, or None. A conv kernel trained on RGB feeds a grayscale input by
    summing over its input channels (gray = R = G = B gives the same response); gray → RGB divides by 3."""
    if source.shape == target_shape:
        return source
    if source.ndim == 4 and source.shape[:2] == target_shape[:2] and source.shape[3] == target_shape[3]:
        if source.shape[2] == 3 and target_shape[2] == 1:
            return source.sum(axis=2, keepdims=True)
        if source.shape[2] == 1 and target_shape[2] == 3:
            return np.repeat(source / 3.0, 3, axis=2)
    return None


def load_weights_file(model, weights: str | None) -> dict[str, int]:
    """Copy weights from a local file into ``model`` layer by layer (by name); returns counts loaded/skipped.

    Layers whose shapes differ are skipped (a new head for other classes), except the first convolution, which is
    adapted between 3 and 1 input channels so ImageNet weights serve grayscale radiographs.
    """
    if weights is None:
        return {"loaded": 0, "skipped": 0}
    path = Path(weights)
    if not path.is_file():
        raise ConfigError(f"model.weights: {path} not found; give a local weights file (nothing is downloaded)")
    source = _file_weights(path)
    loaded = skipped = 0
    for layer in _all_layers(model):
        if not layer.weights or layer.name not in source:
            continue
        arrays = source[layer.name]
        targets = [tuple(w.shape) for w in layer.get_weights()]
        adapted = [_adapt(a, t) for a, t in zip(arrays, targets)] if len(arrays) == len(targets) else [None]
        if any(a is None for a in adapted):
            skipped += 1
            continue
        layer.set_weights(adapted)
        loaded += 1
    if not loaded:
        raise ConfigError(f"model.weights: {path} holds no weights for any layer of {model.name} (layer names "
                          "differ); give weights saved from the same architecture")
    return {"loaded": loaded, "skipped": skipped}


# --- the reference kit's CNN ------------------------------------------------------------------------------------

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
    model = tf.keras.Model(inputs, outputs, name="refkit_cnn")
    load_weights_file(model, weights)
    return model


# --- keras.applications backbones -------------------------------------------------------------------------------

APPLICATIONS = {"densenet121": "DenseNet121", "densenet169": "DenseNet169", "resnet50": "ResNet50",
                "vgg16": "VGG16", "efficientnetb0": "EfficientNetB0"}
# Their input, beyond the registry's defaults (the defaults keep the input every existing config had).
APPLICATION_INPUTS = {"efficientnetb0": {"image_size": 224, "channels": 3, "normalization": "raw",
                                         "normalizes_inside": True}}


def _application(name: str, arch: str, input_shape, n_classes, task, dropout, weights):
    """keras.applications ``arch`` without its top (weights=None, so any channel count), plus the task's head."""
    import tensorflow as tf

    backbone = getattr(tf.keras.applications, APPLICATIONS[arch])(include_top=False, weights=None,
                                                                  input_shape=tuple(input_shape), pooling="avg")
    outputs = _classifier_head(backbone.output, n_classes, task, dropout)
    model = tf.keras.Model(backbone.input, outputs, name=name.replace("-", "_"))
    load_weights_file(model, weights)
    return model


@register("chexnet", min_size=32)
def chexnet(input_shape, n_classes, task, dropout=0.0, weights=None):
    """CheXNet (Rajpurkar et al. 2017): DenseNet121 with an N-way head — sigmoid for ChestX-ray14's 14 labels.

    Train it with ``train.loss: weighted-bce`` (CheXNet's per-label weighting). Its registry entry keeps medq's
    original input defaults (96 px, 1 channel, unit), which configs that name chexnet without a ``preprocess:``
    section have always had; CheXNet's own input (224 px, ``normalization: imagenet``) is set in the config, as in
    configs/chestxray14.yaml. ``model.weights`` may name a local ImageNet
    ``densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5`` (its first convolution is folded to one channel for
    grayscale input).
    """
    return _application("chexnet", "densenet121", input_shape, n_classes, task, dropout, weights)


def _register_application(name: str) -> None:
    def build(input_shape, n_classes, task, dropout=0.0, weights=None):
        return _application(name, name, input_shape, n_classes, task, dropout, weights)

    build.__name__ = name
    build.__doc__ = f"keras.applications {APPLICATIONS[name]} (weights=None; ``weights`` may name a local file)."
    register(name, min_size=32, **APPLICATION_INPUTS.get(name, {}))(build)


for _name in APPLICATIONS:
    _register_application(_name)


# --- compound-scaled DenseNet (seed 002, done properly) ---------------------------------------------------------

DENSENET121_DEPTHS = (6, 12, 24, 16)


def compound_scaling(alpha: float, beta: float, phi: float) -> dict[str, float]:
    """EfficientNet's rule: depth α^φ, width β^φ, resolution γ^φ with α·β²·γ² = 2 (FLOPs grow about 2^φ).

    γ is derived from α and β; α, β ≥ 1 and α·β² ≤ 2 keep γ ≥ 1.
    """
    if alpha < 1 or beta < 1 or alpha * beta ** 2 > 2.0 + 1e-9:
        raise ConfigError(f"model.params: scaled-densenet needs alpha >= 1, beta >= 1 and alpha*beta^2 <= 2 "
                          f"(so that gamma >= 1); got alpha={alpha}, beta={beta}")
    gamma = math.sqrt(2.0 / (alpha * beta ** 2))
    return {"alpha": alpha, "beta": beta, "gamma": gamma, "phi": phi, "depth": alpha ** phi, "width": beta ** phi,
            "resolution": gamma ** phi}


def scaled_image_size(base_size: int, alpha: float, beta: float, phi: float, multiple: int = 8) -> int:
    """The input resolution for ``phi``: base · γ^φ rounded to a multiple of 8 (base is the φ = 0 resolution)."""
    factor = compound_scaling(alpha, beta, phi)["resolution"]
    return max(multiple, int(round(base_size * factor / multiple)) * multiple)


@register("scaled-densenet")
def scaled_densenet(input_shape, n_classes, task, dropout=0.0, weights=None, *, alpha: float = 1.2,
                    beta: float = 1.1, phi: float = 0.0, base_depths: Sequence[int] = DENSENET121_DEPTHS,
                    base_growth: int = 32, bottleneck: int = 4, compression: float = 0.5):
    """DenseNet-BC whose block depths scale by α^φ and growth rate by β^φ (Mitra et al. 2020, EfficientNet rule).

    φ = 0 with the defaults is DenseNet121. The input resolution γ^φ is the preprocessing size: the tuner sets it
    per trial with :func:`scaled_image_size`; a trained run uses ``preprocess.image_size`` as given. Smaller bases
    (``base_depths: [2, 4, 6, 4]``, ``base_growth: 12``) make CPU-sized searches.
    """
    import tensorflow as tf

    layers = tf.keras.layers
    scale = compound_scaling(float(alpha), float(beta), float(phi))
    depths = [max(1, int(round(d * scale["depth"]))) for d in base_depths]
    growth = max(4, int(round(base_growth * scale["width"])))
    axis = -1

    def bn_relu(x, name, sep="_"):
        x = layers.BatchNormalization(axis=axis, epsilon=1.001e-5, name=f"{name}{sep}bn")(x)
        return layers.Activation("relu", name=f"{name}{sep}relu")(x)

    # Layer names follow keras.applications.DenseNet121, so its weights file loads into every layer that kept its
    # shape (all of them at phi = 0).
    inputs = layers.Input(shape=input_shape, name="image")
    x = layers.Conv2D(2 * growth, 7, strides=2, padding="same", use_bias=False, name="conv1/conv")(inputs)
    x = bn_relu(x, "conv1", sep="/")
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)
    for b, depth in enumerate(depths):
        for i in range(depth):
            name = f"conv{b + 2}_block{i + 1}"
            y = bn_relu(x, f"{name}_0")
            y = layers.Conv2D(bottleneck * growth, 1, use_bias=False, name=f"{name}_1_conv")(y)
            y = bn_relu(y, f"{name}_1")
            y = layers.Conv2D(growth, 3, padding="same", use_bias=False, name=f"{name}_2_conv")(y)
            x = layers.Concatenate(axis=axis, name=f"{name}_concat")([x, y])
        if b < len(depths) - 1:
            name = f"pool{b + 2}"
            x = bn_relu(x, name)
            x = layers.Conv2D(int(x.shape[axis] * compression), 1, use_bias=False, name=f"{name}_conv")(x)
            x = layers.AveragePooling2D(2, strides=2, padding="same", name=f"{name}_pool")(x)
    x = layers.BatchNormalization(axis=axis, epsilon=1.001e-5, name="bn")(x)
    x = layers.Activation("relu", name="relu")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = _classifier_head(x, n_classes, task, dropout)
    tag = f"a{alpha:g}_b{beta:g}_p{phi:g}".replace(".", "p").replace("-", "m")
    model = tf.keras.Model(inputs, outputs, name=f"scaled_densenet_{tag}")
    load_weights_file(model, weights)
    return model
