"""tf.data input pipelines built on the one preprocessing function (medq.preprocess).

Files that fail to decode mid-epoch are dropped from the batch and recorded (``dropped``: path → reason), never a
crash and never a wrong label.
Augmentation runs on training batches only, after preprocessing, in the model's input units.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Iterator

import numpy as np

from medq.data.cache import ImageCache
from medq.data.decode import UnreadableImage
from medq.preprocess import PreprocessSpec, normalize, read_source, resize

# One unit of brightness in [0, 1] image terms, expressed in each normalisation's units.
_INTENSITY_SCALE = {"unit": 1.0, "symmetric": 2.0, "imagenet": 1.0 / 0.226, "raw": 255.0}


def _loader(spec: PreprocessSpec, dropped: dict[str, str] | None = None, cache: ImageCache | None = None):
    """path → (uint8 [S, S, 1 or 3] stored image, ok): the decode half of the preprocessing (zeros when unreadable)."""

    def load(path: bytes) -> tuple[np.ndarray, bool]:
        name = path.decode()
        try:
            stored = cache.get(name) if cache is not None else resize(read_source(name, spec), spec)
            return stored, True
        except UnreadableImage as exc:
            if dropped is not None:
                dropped[name] = str(exc)
            return np.zeros(spec.input_shape, np.uint8), False

    return load


def image_dataset(paths: list[str], labels: np.ndarray, spec: PreprocessSpec, *, batch_size: int,
                  shuffle: bool = False, seed: int = 0, augment: Any = None, cache: ImageCache | None = None,
                  dropped: dict[str, str] | None = None):
    """(images [B, S, S, C], labels [B, K]) batches streamed from disk (through ``cache`` when given): memory does
    not grow with the number of images. ``shuffle`` reshuffles the file list every epoch; ``augment`` is an
    AugmentConfig for training, else None; files that fail to decode are left out and, given ``dropped``, recorded
    there (path → reason)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((np.asarray(paths), labels.astype(np.float32)))
    if shuffle:  # file names, not decoded images: a full shuffle costs a few bytes per image
        ds = ds.shuffle(max(1, len(paths)), seed=seed, reshuffle_each_iteration=True)
    return _decoded_batches(ds, spec, batch_size, seed, augment, _loader(spec, dropped, cache)).prefetch(2)


def shard_steps(n_images: int, workers: int, local_batch: int) -> int:
    """Training steps per epoch when ``workers`` each read their 1/``workers`` of ``n_images``: the same number on
    every worker (their gradients are averaged step by step), whole local batches only."""
    return max(1, (n_images // workers) // local_batch)


def sharded_image_dataset(paths: list[str], labels: np.ndarray, spec: PreprocessSpec, *, local_batch: int,
                          workers: int, worker: int, seed: int, augment: Any = None, cache: ImageCache | None = None,
                          dropped: dict[str, str] | None = None, class_weight: dict[int, float] | None = None):
    """One multi-worker training worker's input: every worker shuffles the file list with the same seed (the same
    permutation each epoch) and keeps its ``worker``-th of every ``workers`` files, so the workers together read
    each image at most once per epoch and each decodes only its own share. Sharding is explicit, by file name
    before decoding (tf.data's automatic sharding would fall back to decoding everything and dropping 1/N).
    Repeats forever: fit with ``steps_per_epoch=shard_steps(...)``. ``class_weight`` becomes per-image sample
    weights (Keras takes no class_weight with a distributed dataset)."""
    import tensorflow as tf

    steps = shard_steps(len(paths), workers, local_batch)
    ds = tf.data.Dataset.from_tensor_slices((np.asarray(paths), labels.astype(np.float32)))
    ds = ds.shuffle(max(1, len(paths)), seed=seed, reshuffle_each_iteration=True)
    ds = ds.shard(workers, worker).take(steps * local_batch)
    ds = _decoded_batches(ds, spec, local_batch, seed, augment, _loader(spec, dropped, cache))
    if class_weight:
        weights = tf.constant([class_weight[k] for k in range(len(class_weight))], tf.float32)
        ds = ds.map(lambda x, y: (x, y, tf.reduce_sum(y * weights, axis=1)))  # one-hot labels: the class's weight
    ds = ds.repeat()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(2)


def _decoded_batches(ds, spec: PreprocessSpec, batch_size: int, seed: int, augment: Any, load):
    import tensorflow as tf

    def load_batch(names: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images, ok = _fill(names, spec, load, _decode_pool())
        return (images, labels) if ok.all() else (images[ok], labels[ok])

    def decode(paths, labels):
        images, kept = tf.numpy_function(load_batch, [paths, labels], [tf.float32, tf.float32], stateful=False)
        images.set_shape((None, *spec.input_shape))
        kept.set_shape(labels.shape)
        return images, kept

    # One Python call per batch; its files are decoded and normalised by the same functions every other stage
    # uses, in a thread per core (OpenCV, pydicom and the cache's reads release the GIL). Normalising in
    # TensorFlow instead took 0.5 ms an image (three passes over the batch), more than reading it from the cache.
    ds = ds.batch(batch_size).map(decode, num_parallel_calls=_BATCHES_IN_FLIGHT, deterministic=True)
    ds = ds.filter(lambda x, y: tf.shape(x)[0] > 0)  # a batch of unreadable files only
    if augment is not None:
        augmenter = build_augmenter(augment, spec, seed)

        def augment_batch(x, y):
            return augmenter(x, training=True), y

        ds = ds.map(augment_batch, num_parallel_calls=tf.data.AUTOTUNE)
    # Without the autotuning thread, AUTOTUNE above means one call per core. That thread held up the teardown of
    # an epoch's iterator by 1-8 s (measured on 2 cores).
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def _fill(names, spec: PreprocessSpec, load, pool) -> tuple[np.ndarray, np.ndarray]:
    """Decode and normalise ``names`` in ``pool`` straight into one float32 array: (images, ok per file); the row
    of an unreadable file holds a normalised black image, for the caller to drop."""
    images = np.empty((len(names), *spec.input_shape), np.float32)

    def fill(i: int) -> bool:
        name = names[i]
        stored, ok = load(name if isinstance(name, bytes) else name.encode())
        normalize(stored, spec, out=images[i])
        return ok

    return images, np.fromiter(pool.map(fill, range(len(names))), dtype=bool, count=len(names))


_BATCHES_IN_FLIGHT = 2  # the next batch decodes while the model consumes this one; each uses every core
_POOL = None
_POOL_LOCK = threading.Lock()


def _decode_pool():
    """The threads that decode training batches, shared by every pipeline of the process (tuning trials build new
    pipelines; a pool each would leave idle threads behind)."""
    global _POOL
    with _POOL_LOCK:  # two batches may ask first at the same time
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="medq-decode")
        return _POOL


def build_augmenter(augment: Any, spec: PreprocessSpec, seed: int = 0):
    """Small geometric and intensity changes a radiograph tolerates; left-right flip only when allowed."""
    import tensorflow as tf

    layers = tf.keras.layers
    steps = []
    if augment.rotation_deg > 0:
        steps.append(layers.RandomRotation(augment.rotation_deg / 360.0, fill_mode="reflect", seed=seed))
    if augment.shift > 0:
        steps.append(layers.RandomTranslation(augment.shift, augment.shift, fill_mode="reflect", seed=seed + 1))
    if augment.zoom > 0:
        steps.append(layers.RandomZoom(augment.zoom, fill_mode="reflect", seed=seed + 2))
    if augment.horizontal_flip:
        steps.append(layers.RandomFlip("horizontal", seed=seed + 3))
    if augment.contrast > 0 or augment.brightness > 0:
        delta = augment.brightness * _INTENSITY_SCALE[spec.normalization]
        steps.append(_random_intensity(augment.contrast, delta, seed=seed + 4))
    return tf.keras.Sequential(steps, name="augment")


def _random_intensity(contrast: float, brightness: float, seed: int):
    """Per image: contrast factor in [1 - contrast, 1 + contrast] around the image's mean, then a brightness offset
    in [-brightness, brightness]. Unclipped: keras' RandomContrast clips to [0, 255], which zeroes every negative
    pixel of an imagenet- or symmetric-normalised image in training only."""
    import tensorflow as tf

    class RandomIntensity(tf.keras.layers.Layer):
        def call(self, x, training=None):
            if not training:
                return x
            shape = [tf.shape(x)[0], 1, 1, 1]
            factor = tf.random.uniform(shape, 1.0 - contrast, 1.0 + contrast, seed=seed)
            offset = tf.random.uniform(shape, -brightness, brightness, seed=seed + 1)
            mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
            return mean + factor * (x - mean) + offset

    return RandomIntensity(name="random_intensity")


def load_split_arrays(paths: list[str], spec: PreprocessSpec, dropped: dict[str, str] | None = None,
                      cache: ImageCache | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Preprocess a bounded number of files into memory (a calibration set, a chunk); returns (images, index of the
    files kept) — unreadable files are dropped (and recorded in ``dropped``)."""
    images, kept = [], []
    load = _loader(spec, dropped, cache)
    for i, path in enumerate(paths):
        stored, ok = load(path.encode())
        if ok:
            images.append(normalize(stored, spec))
            kept.append(i)
    shape = (0, *spec.input_shape)
    return (np.stack(images) if images else np.zeros(shape, np.float32)), np.asarray(kept, dtype=int)


def iter_split_arrays(paths: list[str], spec: PreprocessSpec, chunk: int = 64, dropped: dict[str, str] | None = None,
                      cache: ImageCache | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`load_split_arrays` chunk by chunk, decoding in threads straight into one array per chunk: (images,
    indices into ``paths`` kept) per chunk, so a whole split never sits in memory."""
    from concurrent.futures import ThreadPoolExecutor

    load = _loader(spec, dropped, cache)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for start in range(0, len(paths), chunk):
            images, ok = _fill(paths[start:start + chunk], spec, load, pool)
            yield (images if ok.all() else images[ok]), np.flatnonzero(ok) + start
