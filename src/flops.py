"""Parameters, FLOPs and batch-1 latency of a Keras model: the numbers a user trades accuracy against.

FLOPs are counted analytically from the layers' shapes (2 × multiply-accumulates of the convolution and dense layers,
batch 1), which is what dominates a CNN's cost and what papers report; batch-norm, activations, pooling and
concatenation are left out. Counting this way takes milliseconds, where TensorFlow's profiler takes 10-20 s per
DenseNet on this machine. On DenseNet121 at 224 px this gives 5.7 GFLOPs (2 × the usual 2.87 G MACs).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np


def _shape(shape: Any) -> tuple:
    """A layer's (first) input/output shape without the batch axis."""
    if isinstance(shape, list):
        shape = shape[0]
    return tuple(int(d) if d is not None else 1 for d in shape[1:])


def _layer_flops(layer) -> int:
    import tensorflow as tf

    layers = tf.keras.layers
    if isinstance(layer, tf.keras.Model):
        return count_flops(layer)
    try:
        out_shape, in_shape = _shape(layer.output_shape), _shape(layer.input_shape)
    except (AttributeError, RuntimeError):  # a layer that was never called (or called more than once)
        return 0
    if isinstance(layer, layers.SeparableConv2D):
        kh, kw = layer.kernel_size
        c_in, mult = in_shape[-1], layer.depth_multiplier
        spatial = int(np.prod(out_shape[:-1]))
        return 2 * spatial * (kh * kw * c_in * mult + c_in * mult * out_shape[-1])
    if isinstance(layer, layers.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        return 2 * int(np.prod(out_shape)) * kh * kw
    if isinstance(layer, layers.Conv2DTranspose):
        kh, kw = layer.kernel_size
        return 2 * int(np.prod(in_shape)) * kh * kw * out_shape[-1]
    if isinstance(layer, (layers.Conv1D, layers.Conv2D, layers.Conv3D)):
        kernel = int(np.prod(layer.kernel_size))
        groups = getattr(layer, "groups", 1) or 1
        return 2 * int(np.prod(out_shape)) * kernel * (in_shape[-1] // groups)
    if isinstance(layer, layers.Dense):
        return 2 * int(np.prod(in_shape)) * layer.units
    return 0


def count_flops(model) -> int:
    """FLOPs of one forward pass at batch 1 (2 × MACs of conv and dense layers)."""
    return int(sum(_layer_flops(layer) for layer in model.layers))


def model_facts(model) -> dict[str, Any]:
    """{'parameters', 'trainable_parameters', 'flops', 'input_shape'} of a built model."""
    import tensorflow as tf

    trainable = int(sum(int(np.prod(w.shape)) for w in model.trainable_weights))
    return {"parameters": int(model.count_params()), "trainable_parameters": trainable,
            "flops": count_flops(model), "input_shape": [int(d) for d in model.input_shape[1:]],
            "name": model.name if isinstance(model, tf.keras.Model) else str(model)}


def keras_latency_ms(model, runs: int = 10, warmup: int = 2, seed: int = 0) -> float:
    """Median wall time of ``runs`` batch-1 forward passes of a compiled (tf.function) Keras model, in ms.

    A rough in-process number for comparing trials with each other; the benchmark stage measures the deployable
    graphs properly (own process, thread settings, many iterations).
    """
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(seed).uniform(0, 1, (1, *model.input_shape[1:])).astype(np.float32))
    forward = tf.function(lambda t: model(t, training=False))
    for _ in range(max(1, warmup)):
        forward(x).numpy()
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        forward(x).numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000.0)


def human(n: float) -> str:
    """12_345_678 → '12.3M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"
