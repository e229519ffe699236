"""The preprocessed-image cache on disk and the streaming input pipelines (memory independent of N)."""
import errno
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from medq.data.cache import CacheFull, ImageCache
from medq.preprocess import PreprocessSpec, load_and_preprocess, normalize

SPEC = PreprocessSpec(32, 3, "imagenet")


def write_png(path: Path, value: int, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((size, size), value, np.uint8)
    image[: size // 2] = 255 - value
    cv2.imwrite(str(path), image)
    return path


def entries(cache: ImageCache) -> list[Path]:
    return sorted(p for p in cache.folder.rglob("*.npy") if not p.name.startswith(".tmp-"))


def test_a_second_read_is_a_hit_and_equals_the_preprocessing_of_the_source(tmp_path):
    image = write_png(tmp_path / "a.png", 40)
    cache = ImageCache(tmp_path / "cache", SPEC)
    first = cache.get(image)
    second = cache.get(image)
    assert cache.stats.misses == 1 and cache.stats.hits == 1
    # a gray radiograph is stored with one channel, 8-bit, at the input size: expanded to three on the fly
    assert second.dtype == np.uint8 and second.shape == (32, 32, 1) and len(entries(cache)) == 1
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(normalize(second, SPEC), load_and_preprocess(image, SPEC))
    # one cache serves every normalisation: the stored image does not depend on it
    other = ImageCache(tmp_path / "cache", PreprocessSpec(32, 3, "unit"))
    assert other.folder == cache.folder and other.get(image).tobytes() == first.tobytes() and other.stats.hits == 1


def test_a_changed_source_file_is_never_served_from_the_cache(tmp_path):
    image = write_png(tmp_path / "a.png", 40)
    cache = ImageCache(tmp_path / "cache", SPEC)
    before = cache.get(image)
    write_png(image, 200)
    os.utime(image, ns=(os.stat(image).st_atime_ns, os.stat(image).st_mtime_ns + 10**9))
    after = cache.get(image)
    assert cache.stats.misses == 2 and not np.array_equal(before, after)
    np.testing.assert_array_equal(normalize(after, SPEC), load_and_preprocess(image, SPEC))


def test_other_preprocessing_uses_other_entries(tmp_path):
    image = write_png(tmp_path / "a.png", 40)
    small, large = ImageCache(tmp_path / "c", PreprocessSpec(16, 1, "unit")), ImageCache(tmp_path / "c", SPEC)
    assert small.get(image).shape == (16, 16, 1) and large.get(image).shape == (32, 32, 1)
    assert small.folder != large.folder and large.stats.misses == 1


def test_entries_are_plain_npy_files_and_a_foreign_or_short_one_is_rebuilt(tmp_path):
    image = write_png(tmp_path / "a.png", 40)
    cache = ImageCache(tmp_path / "cache", SPEC)
    good = cache.get(image)
    (entry,) = entries(cache)
    np.testing.assert_array_equal(np.load(entry, allow_pickle=False), good)
    np.save(entry, good.astype(np.uint16))  # a valid .npy, but not an entry this cache writes
    np.testing.assert_array_equal(cache.get(image), good)
    entry.write_bytes(entry.read_bytes() + b"\0")  # one byte too many
    np.testing.assert_array_equal(cache.get(image), good)
    assert cache.stats.rebuilt == 2 and cache.stats.hits == 0
    np.testing.assert_array_equal(cache.get(image), good)
    assert cache.stats.hits == 1


def test_a_damaged_entry_is_rebuilt(tmp_path):
    image = write_png(tmp_path / "a.png", 40)
    cache = ImageCache(tmp_path / "cache", SPEC)
    good = cache.get(image)
    (entry,) = entries(cache)
    entry.write_bytes(entry.read_bytes()[:100])  # torn by a crash of something else, or bit rot
    assert np.array_equal(cache.get(image), good) and cache.stats.rebuilt == 1
    assert np.array_equal(np.load(entry), good)


def test_a_file_changing_while_it_is_decoded_is_not_stored(tmp_path, monkeypatch):
    import medq.preprocess as preprocess

    image = write_png(tmp_path / "a.png", 40)
    real = preprocess.read_source

    def changing(path, spec):
        out = real(path, spec)
        write_png(Path(path), 90)  # a download replacing the file mid-read
        os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 10**9))
        return out

    monkeypatch.setattr(preprocess, "read_source", changing)
    cache = ImageCache(tmp_path / "cache", SPEC)
    cache.get(image)
    assert entries(cache) == [] and cache.stats.not_stored == 1


def test_a_full_disk_stops_the_cache_growing_without_failing_the_read_or_leaving_partial_files(tmp_path,
                                                                                               monkeypatch):
    import medq.data.cache as cache_module

    image = write_png(tmp_path / "a.png", 40)
    cache = ImageCache(tmp_path / "cache", SPEC)

    def no_space(fh, array):
        fh.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module, "_write_entry", no_space)
    stored = cache.get(image)
    assert stored.shape == (32, 32, 1) and isinstance(cache.full, CacheFull) and str(tmp_path / "cache") in str(
        cache.full)
    assert list((tmp_path / "cache").rglob("*.npy")) == []  # no partial entry, not even a temporary file


def test_not_enough_disk_for_the_cache_is_one_line_with_the_space_needed_before_work_starts(tmp_path, monkeypatch):
    import medq.data.cache as cache_module

    paths = [str(write_png(tmp_path / f"{i}.png", i)) for i in range(5)]
    cache = ImageCache(tmp_path / "cache", PreprocessSpec(224, 1, "unit"))
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda p: type("Usage", (), {"free": 1000})())
    with pytest.raises(CacheFull) as caught:
        cache.check_space(paths)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "cache") in message and "for 5 images" in message
    assert "245.6 KB more" in message  # 5 × (224² + 128) bytes


def test_the_training_pipeline_streams_from_disk_and_shuffles_file_names_not_images(tmp_path):
    """The memory property, read off the pipeline's structure: no in-memory cache, and the shuffle buffer sits
    before the decoding map (it holds file names); what is decoded is bounded by batch and prefetch."""
    from medq.tfdata import image_dataset

    paths = [str(write_png(tmp_path / f"{i}.png", 10 * i)) for i in range(6)]
    labels = np.eye(2, dtype=np.float32)[[0, 1] * 3]
    ds = image_dataset(paths, labels, SPEC, batch_size=4, shuffle=True, cache=ImageCache(tmp_path / "c", SPEC))
    ops = [node.op for node in graph_of(ds).node]
    assert not any("Cache" in op for op in ops)
    shuffle, decode = ops.index("ShuffleDatasetV3"), ops.index("ParallelMapDatasetV2")
    assert shuffle < decode  # GraphDef nodes are in input order: the shuffle feeds the decoding map
    seen = [tuple(y) for _, ys in ds for y in ys.numpy()]
    assert len(seen) == 6


def test_every_input_pipeline_runs_without_the_autotuning_thread(tmp_path):
    """tf.data's autotuning thread held up each epoch's iterator teardown by seconds; every pipeline turns it off."""
    from medq.tfdata import image_dataset, sharded_image_dataset

    paths = [str(write_png(tmp_path / f"{i}.png", 10 * i)) for i in range(4)]
    labels = np.eye(2, dtype=np.float32)[[0, 1] * 2]
    plain = image_dataset(paths, labels, SPEC, batch_size=2)
    sharded = sharded_image_dataset(paths, labels, SPEC, local_batch=1, workers=2, worker=0, seed=0)
    assert plain.options().autotune.enabled is False and sharded.options().autotune.enabled is False
    assert sum(int(x.shape[0]) for x, _ in plain) == 4


def graph_of(ds):
    import tensorflow as tf

    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(ds._as_serialized_graph().numpy())
    return graph


def test_streamed_chunks_are_bounded_and_skip_unreadable_files_with_their_indices(tmp_path):
    from medq.tfdata import iter_split_arrays

    paths = [str(write_png(tmp_path / f"{i}.png", 10 * i)) for i in range(7)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    paths.insert(3, str(broken))
    dropped: dict[str, str] = {}
    chunks = list(iter_split_arrays(paths, SPEC, chunk=3, dropped=dropped))
    assert [len(x) for x, _ in chunks] == [3, 2, 2] and max(len(x) for x, _ in chunks) <= 3
    assert np.concatenate([k for _, k in chunks]).tolist() == [0, 1, 2, 4, 5, 6, 7]
    assert list(dropped) == [str(broken)]
    np.testing.assert_array_equal(chunks[1][0][0], load_and_preprocess(paths[4], SPEC))


def test_multi_worker_shards_cover_each_image_at_most_once_per_epoch_with_equal_steps(tmp_path):
    from medq.tfdata import shard_steps, sharded_image_dataset

    n, workers, local_batch = 23, 2, 4
    paths = [str(write_png(tmp_path / f"{i}.png", 5 * i, size=16)) for i in range(n)]
    labels = np.arange(n, dtype=np.float32)[:, None]  # the label says which file a row came from
    steps = shard_steps(n, workers, local_batch)
    assert steps == 2  # 11 files per worker → 2 whole batches of 4, on both workers
    epochs = {}
    for worker in range(workers):
        ds = sharded_image_dataset(paths, labels, PreprocessSpec(8, 1, "unit"), local_batch=local_batch,
                                   workers=workers, worker=worker, seed=3)
        rows = [int(v) for _, y in ds.take(2 * steps) for v in y.numpy()[:, 0]]  # two epochs
        epochs[worker] = rows[:steps * local_batch], rows[steps * local_batch:]
    for epoch in range(2):
        seen = [i for worker in range(workers) for i in epochs[worker][epoch]]
        assert len(seen) == len(set(seen)) == workers * steps * local_batch  # never one image twice in an epoch
    assert set(epochs[0][0]) != set(epochs[0][1])  # reshuffled every epoch, identically on every worker


def test_benchmark_inputs_are_written_and_read_back_in_batches_without_a_memory_map(tmp_path):
    from medq.benchmark.runner import write_inputs
    from medq.benchmark.worker import npy_batches, predict_all

    paths = [str(write_png(tmp_path / f"{i}.png", 9 * i, size=16)) for i in range(5)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    spec = PreprocessSpec(8, 3, "imagenet")
    kept = write_inputs(paths[:2] + [str(broken)] + paths[2:], spec, tmp_path / "inputs.npy")
    assert kept.tolist() == [0, 1, 3, 4, 5]
    stored = np.load(tmp_path / "inputs.npy")
    assert stored.shape == (5, 8, 8, 3) and stored.dtype == np.float32
    np.testing.assert_array_equal(stored[2], load_and_preprocess(paths[2], spec))
    assert [len(b) for b in npy_batches(tmp_path / "inputs.npy", 2)] == [2, 2, 1]
    means = predict_all(lambda x: x.mean(axis=(1, 2, 3))[:, None], tmp_path / "inputs.npy", 2)
    np.testing.assert_allclose(means[:, 0], stored.mean(axis=(1, 2, 3)))
