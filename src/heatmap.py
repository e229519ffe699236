"""Grad-CAM heatmaps: where in the image the model found the evidence for a class.

Grad-CAM (Selvaraju et al. 2017): the feature maps A of the last convolutional layer, weighted per channel by the
spatially averaged gradient of the class score, summed and rectified: ``relu(sum_c mean_hw(dy/dA_c) * A_c)``. With a
global-average-pooled backbone and a linear head (CheXNet's DenseNet121, medq's refkit-cnn) this is the CAM CheXNet
drew, up to scale. The class score is the logit (the head's input times its kernel plus bias), not the softmax or
sigmoid output: a confident prediction's saturated probability has almost no gradient.

The map is computed on the model input (the preprocessed S×S image, which is the whole original image resized), so it
is resized back onto the original image and drawn over it at the original size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from medq import artifacts
from medq.errors import MedqError

OVERLAY_ALPHA = 0.45


def find_cam_layer(model: Any) -> str:
    """The last layer with a 4-D (N, H, W, C) output that is not a pooling layer: the last conv block's activation.

    refkit-cnn: the last block's LeakyReLU (before its max-pool); DenseNet121: the final ``relu``.
    """
    for layer in reversed(model.layers):
        shape = _output_shape(layer)
        if shape is None or len(shape) != 4 or "pool" in type(layer).__name__.lower():
            continue
        if type(layer).__name__ == "InputLayer":
            break
        if shape[1] and shape[2] and min(shape[1], shape[2]) >= 2:
            return layer.name
    raise MedqError(f"{getattr(model, 'name', 'model')}: no convolutional feature layer found for Grad-CAM; "
                    "heatmaps need a CNN whose last feature map is at least 2×2 (pass --heatmap-layer NAME)")


def _output_shape(layer: Any) -> tuple | None:
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):
        return None
    return tuple(shape) if shape.rank is not None else None


class GradCAM:
    """``cams(x, class_indices)`` → ``[N, len(class_indices), h, w]`` maps in [0, 1] for a Keras classifier."""

    def __init__(self, model: Any, layer_name: str | None = None):
        import tensorflow as tf

        self.layer_name = layer_name or find_cam_layer(model)
        try:
            features = model.get_layer(self.layer_name).output
        except ValueError:
            raise MedqError(f"--heatmap-layer {self.layer_name}: no such layer in {model.name}; "
                            f"4-D layers: {', '.join(_feature_layers(model))}") from None
        head = model.layers[-1]
        activation = getattr(getattr(head, "activation", None), "__name__", "")
        self._linear_head = type(head).__name__ == "Dense" and activation in ("softmax", "sigmoid")
        score_source = head.input if self._linear_head else model.output
        self._kernel = head.kernel if self._linear_head else None
        self._bias = head.bias if self._linear_head and head.use_bias else None
        self._model = tf.keras.Model(model.inputs, [features, score_source])

    def cams(self, x: np.ndarray, class_indices: Sequence[int]) -> np.ndarray:
        import tensorflow as tf

        x = tf.convert_to_tensor(np.asarray(x, dtype=np.float32))
        with tf.GradientTape(persistent=True) as tape:
            features, source = self._model(x, training=False)
            scores = source
            if self._linear_head:
                scores = tf.matmul(source, self._kernel)
                if self._bias is not None:
                    scores = scores + self._bias
            # Images are independent in inference mode: the gradient of the batch sum is each image's own gradient.
            totals = [tf.reduce_sum(scores[:, k]) for k in class_indices]
        maps = []
        for total in totals:
            grads = tape.gradient(total, features)
            weights = tf.reduce_mean(grads, axis=(1, 2))  # [N, C]
            maps.append(tf.nn.relu(tf.einsum("nhwc,nc->nhw", features, weights)).numpy())
        del tape
        cams = np.stack(maps, axis=1).astype(np.float32)  # [N, K, h, w]
        peak = cams.max(axis=(2, 3), keepdims=True)
        return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0)


def _feature_layers(model: Any) -> list[str]:
    return [layer.name for layer in model.layers if len(_output_shape(layer) or ()) == 4]


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 BGR [H, W, 3]: the image (8-bit pixels or float [0, 1], gray or RGB) with the map resized to it in the
    JET colour map."""
    height, width = image.shape[:2]
    heat = cv2.resize(np.asarray(cam, np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    heat = np.clip(heat, 0.0, 1.0)
    colour = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET).astype(np.float32)
    base = image.astype(np.float32) if image.dtype == np.uint8 else np.clip(image, 0.0, 1.0) * 255.0
    base = np.repeat(base[:, :, None], 3, axis=2) if base.ndim == 2 else base[:, :, ::-1]  # RGB → BGR
    weight = alpha * heat[:, :, None]  # cold regions keep the image, hot ones take the colour
    return np.round(base * (1.0 - weight) + colour * weight).astype(np.uint8)


def write_overlay(path: str | Path, image: np.ndarray, cam: np.ndarray) -> Path:
    ok, encoded = cv2.imencode(".png", overlay(image, cam))
    if not ok:
        raise MedqError(f"{path}: PNG encoding failed")
    return artifacts.write_bytes(path, encoded.tobytes())
