"""Decoding medical inputs: PNG 8/16-bit, gray/RGB/RGBA, JPEG, DICOM (MONOCHROME1/2, rescale, VOI, bit depths),
and the files that must be rejected with a message naming them."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from medq.data.decode import UnreadableImage, check_header, decode_image, load_image
from medq.data.dicom import dicom_bytes, load_dicom, read_dicom
from medq.preprocess import PreprocessSpec, load_and_preprocess

RAMP = np.linspace(0.0, 1.0, 32 * 40, dtype=np.float32).reshape(32, 40)  # air (0) top-left → bone (1)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def encoded(array: np.ndarray, suffix: str) -> bytes:
    ok, data = cv2.imencode(suffix, array)
    assert ok
    return data.tobytes()


# --- PNG and JPEG ------------------------------------------------------------------------------------------------

def test_png_8bit_gray_is_exact(tmp_path):
    pixels = np.round(RAMP * 255).astype(np.uint8)
    image, info = decode_image(write(tmp_path / "a.png", encoded(pixels, ".png")))
    assert image.dtype == np.float32 and image.shape == (32, 40)
    np.testing.assert_allclose(image, pixels / 255.0, atol=1e-6)
    assert info == {"format": "png", "width": 40, "height": 32, "channels": "gray", "bits": 8}


def test_png_16bit_uses_the_full_16_bit_range(tmp_path):
    pixels = np.round(RAMP * 65535).astype(np.uint16)
    image, info = decode_image(write(tmp_path / "a.png", encoded(pixels, ".png")))
    np.testing.assert_allclose(image, pixels / 65535.0, atol=1e-6)
    assert info["bits"] == 16
    np.testing.assert_allclose(image, RAMP, atol=1e-4)  # same normalisation as the 8-bit file, finer steps


def test_rgb_and_rgba_png_come_out_rgb_in_rgb_order(tmp_path):
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 2] = 200  # red in OpenCV's BGR order
    rgba = np.dstack([bgr, np.full((8, 8), 17, np.uint8)])
    for name, pixels, kind in (("rgb.png", bgr, "RGB"), ("rgba.png", rgba, "RGBA")):
        image, info = decode_image(write(tmp_path / name, encoded(pixels, ".png")))
        assert image.shape == (8, 8, 3) and info["channels"] == kind
        np.testing.assert_allclose(image[0, 0], [200 / 255, 0, 0], atol=1e-6)


def test_gray_and_three_channel_jpeg_normalise_the_same_way(tmp_path):
    gray = np.round(RAMP * 255).astype(np.uint8)
    one = load_image(write(tmp_path / "gray.jpeg", encoded(gray, ".jpg")))
    three = load_image(write(tmp_path / "color.jpeg", encoded(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), ".jpg")))
    assert one.shape == (32, 40) and three.shape == (32, 40, 3)
    np.testing.assert_allclose(three.mean(axis=2), one, atol=0.03)
    spec = PreprocessSpec(16, 1, "unit")
    np.testing.assert_allclose(load_and_preprocess(tmp_path / "color.jpeg", spec),
                               load_and_preprocess(tmp_path / "gray.jpeg", spec), atol=0.03)


def test_content_decides_not_the_suffix(tmp_path):
    pixels = np.round(RAMP * 255).astype(np.uint8)
    png_named_jpeg = write(tmp_path / "x.jpeg", encoded(pixels, ".png"))
    assert check_header(png_named_jpeg) is None
    np.testing.assert_allclose(load_image(png_named_jpeg), pixels / 255.0, atol=1e-6)


@pytest.mark.parametrize("name, content, reason", [
    ("empty.png", b"", "empty file (0 bytes)"),
    ("page.jpeg", b"<!DOCTYPE html><html>Access denied</html>", "not a PNG, JPEG or DICOM file"),
    ("notes.png", b"just some text\n", "a text file"),
    ("archive.png", b"PK\x03\x04" + bytes(60), "a ZIP archive"),
])
def test_non_images_are_rejected_at_the_header_and_at_decoding(tmp_path, name, content, reason):
    path = write(tmp_path / name, content)
    assert reason in check_header(path)
    with pytest.raises(UnreadableImage) as err:
        load_image(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_files_are_caught_by_the_cheap_header_check(tmp_path, suffix):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    data = encoded(noise, suffix)
    path = write(tmp_path / f"cut{suffix}", data[: len(data) // 2])
    assert "truncated" in check_header(path)
    with pytest.raises(UnreadableImage, match="truncated"):
        load_image(path)


def test_missing_file(tmp_path):
    assert check_header(tmp_path / "nope.png") == "file not found"
    with pytest.raises(UnreadableImage, match="file not found"):
        load_image(tmp_path / "nope.png")


# --- DICOM -------------------------------------------------------------------------------------------------------

def stored_for(display: np.ndarray, lo: float, hi: float, invert: bool = False) -> np.ndarray:
    shown = 1.0 - display if invert else display
    return np.round(lo + shown * (hi - lo)).astype(np.uint16)


def test_monochrome2_12bit_rescale_and_multivalued_window(tmp_path):
    slope, intercept, lo, hi = 2.0, -1024.0, 300, 3800
    window = ([slope * (lo + hi) / 2 + intercept, 40.0], [slope * (hi - lo), 400.0])  # the first preset applies
    path = write(tmp_path / "a.dcm", dicom_bytes(stored_for(RAMP, lo, hi), bits_stored=12,
                                                   rescale=(slope, intercept), window=window))
    image, info = read_dicom(path)
    np.testing.assert_allclose(image, RAMP, atol=2e-3)
    assert info["bits"] == 12 and info["photometric"] == "MONOCHROME2" and info["channels"] == "gray"


def test_monochrome1_is_inverted_so_air_is_dark(tmp_path):
    slope, intercept, lo, hi = 1.0, 0.0, 200, 4000
    window = (slope * (lo + hi) / 2 + intercept, slope * (hi - lo))
    mono1 = write(tmp_path / "m1.dcm", dicom_bytes(stored_for(RAMP, lo, hi, invert=True), photometric="MONOCHROME1",
                                                     bits_stored=12, rescale=(slope, intercept), window=window))
    mono2 = write(tmp_path / "m2.dcm", dicom_bytes(stored_for(RAMP, lo, hi), bits_stored=12,
                                                     rescale=(slope, intercept), window=window))
    one, two = load_dicom(mono1), load_dicom(mono2)
    assert one[0, 0] < 0.01 and one[-1, -1] > 0.99  # air (top-left) dark, as in MONOCHROME2
    np.testing.assert_allclose(one, two, atol=2e-3)


def test_without_a_window_12_bit_data_fills_the_unit_range(tmp_path):
    stored = np.round(RAMP * 4095).astype(np.uint16)
    image = load_dicom(write(tmp_path / "a.dcm", dicom_bytes(stored, bits_stored=12, rescale=(0.5, 100.0))))
    np.testing.assert_allclose(image, RAMP, atol=1e-3)  # BitsStored (12), not BitsAllocated (16), sets the range


def test_16bit_unsigned_and_signed(tmp_path):
    unsigned = np.round(RAMP * 65535).astype(np.uint16)
    np.testing.assert_allclose(load_dicom(write(tmp_path / "u.dcm", dicom_bytes(unsigned))), RAMP, atol=1e-4)
    signed = np.round(RAMP * 65535 - 32768).astype(np.int16)
    image, info = read_dicom(write(tmp_path / "s.dcm", dicom_bytes(signed)))
    np.testing.assert_allclose(image, RAMP, atol=1e-4)
    assert info["bits"] == 16


def test_voi_lut_sequence_and_window_functions(tmp_path):
    stored = np.round(RAMP * 4095).astype(np.uint16)
    lut = np.round(np.sqrt(np.arange(4096) / 4095) * 4095).astype(int)  # a gamma curve, 12-bit output
    image = load_dicom(write(tmp_path / "lut.dcm", dicom_bytes(stored, bits_stored=12, voi_lut=(0, 12, lut),
                                                                 window=(100.0, 50.0))))  # the LUT wins
    np.testing.assert_allclose(image, np.sqrt(RAMP), atol=2e-3)
    exact = load_dicom(write(tmp_path / "exact.dcm", dicom_bytes(stored, bits_stored=12, window=(2048.0, 4096.0),
                                                                   voi_function="LINEAR_EXACT")))
    np.testing.assert_allclose(exact, RAMP, atol=1e-3)
    sigmoid = load_dicom(write(tmp_path / "sig.dcm", dicom_bytes(stored, bits_stored=12, window=(2048.0, 1000.0),
                                                                   voi_function="SIGMOID")))
    assert sigmoid[0, 0] < 0.01 and sigmoid[-1, -1] > 0.99 and np.all(np.diff(sigmoid.ravel()) >= -1e-6)


def test_rgb_and_jpeg_baseline_dicom(tmp_path):
    rgb = (np.stack([RAMP, 1 - RAMP, RAMP / 2], axis=-1) * 255).round().astype(np.uint8)
    image, info = read_dicom(write(tmp_path / "rgb.dcm", dicom_bytes(rgb, modality="US")))
    np.testing.assert_allclose(image, rgb / 255.0, atol=1e-6)
    assert info["channels"] == "RGB"
    gray = np.round(RAMP * 255).astype(np.uint8)  # the RSNA challenge files: 8-bit JPEG Baseline in DICOM
    np.testing.assert_allclose(load_dicom(write(tmp_path / "jpeg.dcm", dicom_bytes(gray, jpeg_quality=95))),
                               RAMP, atol=0.03)


def test_dicom_is_recognised_by_content_and_reaches_preprocessing(tmp_path):
    stored = np.round(RAMP * 4095).astype(np.uint16)
    path = write(tmp_path / "IM00001", dicom_bytes(stored, bits_stored=12))  # no suffix, as on PACS exports
    assert check_header(path) is None
    np.testing.assert_allclose(load_image(path), RAMP, atol=1e-3)
    assert load_and_preprocess(path, PreprocessSpec(16, 3, "imagenet")).shape == (16, 16, 3)


@pytest.mark.parametrize("kind, message", [
    ("multiframe", "multi-frame DICOM (3 frames)"),
    ("no-pixels", "DICOM object without pixel data"),
    ("truncated", "pixel data cannot be decoded"),
    ("bad-header", "malformed DICOM header"),
])
def test_dicom_that_is_not_one_2d_image_is_rejected_naming_the_file(tmp_path, kind, message):
    if kind == "multiframe":
        data = dicom_bytes(np.zeros((3, 8, 8), np.uint16), frames=3)
    elif kind == "no-pixels":
        data = dicom_bytes(np.zeros((1, 1), np.uint8), with_pixels=False)
    elif kind == "bad-header":  # a VOI window whose width is not a number: real exports have worse
        data = dicom_bytes(np.round(RAMP * 4095).astype(np.uint16), bits_stored=12, window=(2048.0, 4096.0))
        data = data.replace(b"4096", b"wide")
    else:
        data = dicom_bytes(np.round(RAMP * 4095).astype(np.uint16), bits_stored=12)
        data = data[: len(data) - 1000]
    path = write(tmp_path / f"{kind}.dcm", data)
    with pytest.raises(UnreadableImage) as err:
        load_image(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_8bit_files_keep_their_own_pixels_in_rgb_order_and_16bit_ones_become_unit_floats(tmp_path):
    from medq.data.decode import load_pixels

    rng = np.random.default_rng(3)
    bgra = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "bgra.png"), bgra)
    cv2.imwrite(str(tmp_path / "bgr.jpeg"), bgra[:, :, :3], [cv2.IMWRITE_JPEG_QUALITY, 95])
    cv2.imwrite(str(tmp_path / "g16.png"), bgra[:, :, 0].astype(np.uint16) * 257)
    rgb = load_pixels(tmp_path / "bgra.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (20, 30, 3)
    np.testing.assert_array_equal(rgb, bgra[:, :, 2::-1])  # alpha dropped, BGR → RGB
    for name in ("bgra.png", "bgr.jpeg"):  # the float decode is the same pixels scaled once
        np.testing.assert_array_equal(load_image(tmp_path / name), load_pixels(tmp_path / name) / np.float32(255))
    g16 = load_pixels(tmp_path / "g16.png")
    assert g16.dtype == np.float32 and g16.shape == (20, 30)
    np.testing.assert_array_equal(g16, load_image(tmp_path / "g16.png"))


def test_dicoms_decoded_in_many_threads_leave_the_warning_filters_as_they_were(tmp_path, monkeypatch):
    """pydicom warns about excess pixel-data padding (a harmless oddity of real files); silencing it must not touch
    other code's warnings: while 8 threads decode such files, a warning raised elsewhere still shows, and afterwards
    the process's filter list is exactly what it was (catch_warnings from threads, unguarded, leaves one thread's
    'ignore' behind for good)."""
    import io
    import threading
    import warnings

    import pydicom

    rng = np.random.default_rng(0)
    stored = rng.integers(0, 65536, (128, 128), dtype=np.uint16)
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(stored)))
    ds.PixelData += b"\0" * 64  # pydicom: "... contains 64 bytes of excess padding to be removed"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    path = tmp_path / "padded.dcm"
    path.write_bytes(buffer.getvalue())
    with warnings.catch_warnings(record=True) as seen:  # the oracle that the file does trigger pydicom's warning
        warnings.simplefilter("always")
        pydicom.dcmread(path).pixel_array
    assert any("excess padding" in str(w.message) for w in seen)

    shown: list[str] = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args, **kwargs: shown.append(str(message)))
    before = list(warnings.filters)
    stop, images, failures = threading.Event(), [], []

    def decode() -> None:
        try:
            while not stop.is_set():
                images.append(read_dicom(path)[0])
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=decode) for _ in range(8)]
    for t in threads:
        t.start()
    for n in range(200):  # each message new, so the default action shows every one
        warnings.warn(f"raised elsewhere {n}", UserWarning)
    stop.set()
    for t in threads:
        t.join()
    assert not failures and images
    assert warnings.filters == before
    assert [m for m in shown if m.startswith("raised elsewhere")] == [f"raised elsewhere {n}" for n in range(200)]
    assert not any("excess padding" in m for m in shown)  # the decoder's own warning stays silenced
    for image in images[:3]:
        np.testing.assert_allclose(image, stored / 65535.0, atol=1e-6)
