import cv2
import numpy as np
import pytest

from medq.data.decode import UnreadableImage, load_image
from medq.preprocess import PreprocessSpec, load_and_preprocess, preprocess


def test_jpeg_gray_rgb_and_16bit_png_decode_to_the_same_unit_range(tmp_path):
    gray = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    cv2.imwrite(str(tmp_path / "rgb.png"), np.stack([gray] * 3, axis=2))
    cv2.imwrite(str(tmp_path / "g16.png"), gray.astype(np.uint16) * 257)
    spec = PreprocessSpec(32, 1, "unit")
    a, b, c = (load_and_preprocess(tmp_path / n, spec) for n in ("g.png", "rgb.png", "g16.png"))
    assert a.shape == (32, 32, 1) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1 / 255)
    # 8-bit pixels are resized as uint8 and 16-bit ones in float: a mean that falls on a half rounds up in one
    # and to even in the other, one 8-bit step at most
    np.testing.assert_allclose(a, c, atol=1 / 255 + 1e-6)
    assert 0.0 <= a.min() and a.max() <= 1.0


def test_scaling_to_unit_happens_exactly_once(tmp_path):
    """The reference kit divided by 255 twice; a white image must come out at 1.0, not 1/255."""
    cv2.imwrite(str(tmp_path / "w.png"), np.full((40, 40), 255, np.uint8))
    x = load_and_preprocess(tmp_path / "w.png", PreprocessSpec(20, 1, "unit"))
    assert x.max() == pytest.approx(1.0)


GRAY = 128 / 255  # an 8-bit gray level: preprocessing keeps 8 bits after resizing


@pytest.mark.parametrize("normalization, expected", [("unit", GRAY), ("symmetric", 2 * GRAY - 1),
                                                     ("imagenet", (GRAY - 0.449) / 0.226)])
def test_normalisations(normalization, expected):
    x = preprocess(np.full((10, 10), GRAY, np.float32), PreprocessSpec(8, 1, normalization))
    assert x.shape == (8, 8, 1)
    assert float(x.mean()) == pytest.approx(expected, abs=1e-3)


def test_preprocess_is_the_cached_8_bit_resize_then_normalisation():
    from medq.preprocess import normalize, resize

    rng = np.random.default_rng(1)
    for image, spec, stored_channels in [(rng.uniform(0, 1, (40, 30)).astype(np.float32), PreprocessSpec(16, 3,
                                          "imagenet"), 1),
                                         (rng.uniform(0, 1, (40, 30, 3)).astype(np.float32), PreprocessSpec(16, 3,
                                          "symmetric"), 3),
                                         (rng.uniform(0, 1, (40, 30, 3)).astype(np.float32), PreprocessSpec(16, 1,
                                          "unit"), 1)]:
        stored = resize(image, spec)
        assert stored.dtype == np.uint8 and stored.shape == (16, 16, stored_channels)  # the source's own channels
        np.testing.assert_array_equal(normalize(stored, spec), preprocess(image, spec))
        # 8 bits after resizing: within half a gray level of the float resize
        assert np.abs(stored / 255.0 - np.clip(cv2_resize(image, spec), 0, 1)).max() <= 0.5 / 255 + 1e-6


def cv2_resize(image, spec):
    import cv2

    if image.ndim == 3 and spec.channels == 1:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    out = cv2.resize(image, (spec.image_size,) * 2, interpolation=cv2.INTER_AREA)
    return out[:, :, None] if out.ndim == 2 else out


def test_channel_count_follows_the_model():
    rgb = np.random.default_rng(0).uniform(0, 1, (20, 30, 3)).astype(np.float32)
    gray = rgb.mean(axis=2)
    assert preprocess(rgb, PreprocessSpec(16, 1, "unit")).shape == (16, 16, 1)
    three = preprocess(gray, PreprocessSpec(16, 3, "unit"))
    assert three.shape == (16, 16, 3)
    assert np.array_equal(three[..., 0], three[..., 2])
    imagenet = preprocess(rgb, PreprocessSpec(16, 3, "imagenet"))
    assert not np.allclose(imagenet[..., 0], imagenet[..., 2])


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b"not an image at all", "bad.jpeg: not a")])
def test_unreadable_files_raise_a_clear_error(tmp_path, content, reason):
    path = tmp_path / "bad.jpeg"
    path.write_bytes(content)
    with pytest.raises(UnreadableImage, match=reason) as info:
        load_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("channels, normalization", [(3, "imagenet"), (1, "symmetric"), (3, "unit")])
def test_training_batches_equal_the_per_image_preprocessing(tmp_path, channels, normalization):
    """Training decodes whole batches in threads inside tf.data; evaluation, calibration and prediction preprocess
    one image at a time. Both must give the model the same numbers."""
    from medq.tfdata import image_dataset, iter_split_arrays

    rng = np.random.default_rng(3)
    paths = []
    for i, shape in enumerate([(50, 40), (50, 40, 3), (30, 60), (64, 64, 3), (20, 20)]):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, shape, dtype=np.uint8))
        paths.append(str(path))
    spec = PreprocessSpec(24, channels, normalization)
    expected = np.stack([load_and_preprocess(p, spec) for p in paths])
    labels = np.eye(2, dtype=np.float32)[[0, 1, 0, 1, 0]]
    batches = list(image_dataset(paths, labels, spec, batch_size=2))
    trained_on = np.concatenate([x.numpy() for x, _ in batches])
    assert trained_on.dtype == np.float32 and trained_on.shape == (5, 24, 24, channels)
    np.testing.assert_array_equal(trained_on, expected)
    np.testing.assert_array_equal(np.concatenate([y.numpy() for _, y in batches]), labels)
    (chunk, kept), = list(iter_split_arrays(paths, spec, chunk=8))
    np.testing.assert_array_equal(chunk, expected)
    assert list(kept) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("shape, channels", [((300, 257), 1), ((300, 257, 3), 3), ((300, 257, 3), 1), ((20, 13), 1)])
def test_8bit_pixels_resize_to_the_float_paths_result_within_one_step(shape, channels):
    from medq.preprocess import resize

    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    spec = PreprocessSpec(32, channels, "unit")
    direct, via_float = resize(pixels, spec), resize(pixels / np.float32(255), spec)
    assert direct.dtype == via_float.dtype == np.uint8 and direct.shape == via_float.shape == (32, 32, channels)
    # OpenCV resizes uint8 in fixed point: one step apart at most, and rounded (truncation would differ at half)
    assert np.abs(direct.astype(int) - via_float).max() <= 1 and (direct == via_float).mean() > 0.8
