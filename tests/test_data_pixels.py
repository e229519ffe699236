"""Pixels read as a viewer shows them: 16-bit PNG significant bits (sBIT, data.bit_depth) and EXIF Orientation.

Fixtures are made the way real files are: 16-bit PNGs by OpenCV's encoder with an sBIT chunk written into them before
IDAT (as DICOM→PNG exporters do), JPEGs with an EXIF Orientation tag as phones write it (PIL's writer, and a
big-endian EXIF block built by hand as iPhones write it). Oracles: hand-computed values and PIL's exif_transpose.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from medq.config import DataConfig, load_config
from medq.data.cache import ImageCache
from medq.data.check import check_dataset, format_check_report, note_pixel_range
from medq.data.decode import UnreadableImage, decode_image, load_image, load_pixels
from medq.data.readers import read_dataset
from medq.errors import ConfigError
from medq.preprocess import PreprocessSpec, load_and_preprocess, resize

# 12-bit detector values as DICOM→PNG exports store them: 0 … 4095 in a 16-bit PNG
VALUES = (np.arange(32 * 40).reshape(32, 40) * 4095 // (32 * 40 - 1)).astype(np.uint16)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16(path: Path, samples: np.ndarray, sbit: bytes | None = None) -> Path:
    """A 16-bit PNG of ``samples`` (gray, or BGR as OpenCV takes it), with an sBIT chunk before IDAT if given."""
    data = cv2.imencode(".png", samples)[1].tobytes()
    if sbit is not None:
        at = data.index(b"IDAT") - 4
        data = data[:at] + chunk(b"sBIT", sbit) + data[at:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- 16-bit PNG: sBIT --------------------------------------------------------------------------------------------

def test_12_bit_values_with_sbit_12_are_read_on_their_12_bit_scale(tmp_path):
    path = png16(tmp_path / "export.png", VALUES, sbit=bytes([12]))
    image, info = decode_image(path)
    np.testing.assert_allclose(image, VALUES / 4095.0, atol=1e-6)  # 4095 is white, not 4095/65535 = 0.06
    assert image.max() == pytest.approx(1.0)
    assert (info["bits"], info["significant_bits"], info["bits_from"], info["low_range"]) == (16, 12, "sBIT", False)
    np.testing.assert_array_equal(load_pixels(path), image)  # the resize path reads the same pixels


def test_sbit_with_samples_scaled_up_as_the_png_specification_says_reads_the_top_bits(tmp_path):
    # libpng's left shift with bit replication and pypng's linear map both put the 12-bit value in the top 12 bits.
    # A dark image (values up to 255) keeps every sample below 4096, so "all samples ≤ 4095 → unscaled" would be wrong.
    for values in (VALUES, VALUES // 16):
        v = values.astype(np.uint32)
        for name, samples in (("replicated", (v << 4) | (v >> 8)), ("linear", np.rint(v * 65535 / 4095))):
            path = png16(tmp_path / f"{name}{int(values.max())}.png", samples.astype(np.uint16), sbit=bytes([12]))
            np.testing.assert_allclose(load_image(path), values / 4095.0, atol=1e-6, err_msg=name)


def test_16_bit_rgb_with_a_three_byte_sbit_keeps_rgb_order(tmp_path):
    bgr = np.zeros((8, 10, 3), np.uint16)
    bgr[..., 2], bgr[..., 1], bgr[..., 0] = 4095, 1000, 0  # red, some green, no blue
    image = load_image(png16(tmp_path / "rgb.png", bgr, sbit=bytes([12, 12, 12])))
    np.testing.assert_allclose(image[0, 0], [1.0, 1000 / 4095, 0.0], atol=1e-6)


def test_sbit_16_or_a_malformed_sbit_says_nothing_and_all_16_bits_count(tmp_path):
    for name, sbit in (("sixteen.png", bytes([16])), ("zero.png", bytes([0])), ("long.png", bytes([12, 12]))):
        image, info = decode_image(png16(tmp_path / name, VALUES, sbit=sbit))
        np.testing.assert_allclose(image, VALUES / 65535.0, atol=1e-7, err_msg=name)
        assert info["bits_from"] == "stored"


# --- 16-bit PNG without sBIT: data.bit_depth ---------------------------------------------------------------------

def test_without_sbit_auto_keeps_16_bits_and_flags_an_image_using_only_the_low_bits(tmp_path):
    path = png16(tmp_path / "plain.png", VALUES)
    image, info = decode_image(path)
    np.testing.assert_allclose(image, VALUES / 65535.0, atol=1e-7)
    assert info["low_range"] is True and info["max_value"] == 4095 and info["significant_bits"] == 16
    full = png16(tmp_path / "full.png", (VALUES.astype(np.uint32) * 16).astype(np.uint16))
    assert decode_image(full)[1]["low_range"] is False  # uses the top bits: a real 16-bit image


def test_data_bit_depth_sets_the_scale_and_refuses_a_value_above_it(tmp_path):
    path = png16(tmp_path / "plain.png", VALUES)
    image, info = decode_image(path, bit_depth=12)
    np.testing.assert_allclose(image, VALUES / 4095.0, atol=1e-6)
    assert info["bits_from"] == "data.bit_depth" and info["low_range"] is False
    np.testing.assert_allclose(load_image(path, bit_depth=14), VALUES / 16383.0, atol=1e-6)
    over = png16(tmp_path / "over.png", VALUES + 1)  # 4096 does not fit in 12 bits
    with pytest.raises(UnreadableImage) as caught:
        load_pixels(over, bit_depth=12)
    message = str(caught.value)
    assert message.startswith(f"{over}: a pixel value of 4096 is above 4095") and "data.bit_depth" in message
    # an sBIT chunk is the file's own statement and wins over the setting
    np.testing.assert_allclose(load_image(png16(tmp_path / "s.png", VALUES, bytes([12])), bit_depth=16),
                               VALUES / 4095.0, atol=1e-6)
    # 8-bit files are 8-bit whatever the setting
    eight = tmp_path / "eight.png"
    cv2.imwrite(str(eight), (VALUES // 16).astype(np.uint8))
    np.testing.assert_array_equal(load_image(eight, bit_depth=12), load_image(eight))


def test_the_setting_is_typed_and_travels_with_the_preprocessing(tmp_path):
    assert load_config(None).data.bit_depth == "auto"
    config = load_config(None, ["data.bit_depth=12"])
    spec = PreprocessSpec.from_config(config)
    assert spec.bit_depth == 12 and PreprocessSpec.from_dict(spec.to_dict()) == spec
    # a manifest written before the setting existed reads as auto
    assert PreprocessSpec.from_dict({"image_size": 8, "channels": 1, "normalization": "unit"}).bit_depth == "auto"
    from medq.data.index import DatasetIndex
    from medq.fitting import dataset_facts

    # what train (and tune) record in the manifest, where quantize, benchmark and predict read the spec from
    facts = dataset_facts(config, DatasetIndex("folder", "binary", ["a", "b"], {"train": [], "val": [], "test": []}))
    assert PreprocessSpec.from_dict(facts["preprocess"]).bit_depth == 12
    with pytest.raises(ConfigError, match="data.bit_depth: 7 is not allowed; use one of 'auto', 8,"):
        load_config(None, ["data.bit_depth=7"])
    path = png16(tmp_path / "plain.png", VALUES)
    twelve, auto = PreprocessSpec(8, 1, "unit", 12), PreprocessSpec(8, 1, "unit")
    # the one preprocessing function reads with the spec's bit depth: hand-computed mean of the 12-bit image
    assert load_and_preprocess(path, twelve).mean() == pytest.approx(VALUES.mean() / 4095, abs=2e-3)
    assert load_and_preprocess(path, auto).mean() == pytest.approx(VALUES.mean() / 65535, abs=2e-3)


def test_the_image_cache_is_keyed_by_the_bit_depth_and_stores_what_the_decode_gives(tmp_path):
    path = png16(tmp_path / "plain.png", VALUES)
    twelve, auto = PreprocessSpec(16, 1, "unit", 12), PreprocessSpec(16, 1, "unit")
    by_twelve, by_auto = ImageCache(tmp_path / "c", twelve), ImageCache(tmp_path / "c", auto)
    assert by_twelve.folder != by_auto.folder
    np.testing.assert_array_equal(by_auto.get(path), resize(load_image(path), auto))  # stored first with auto
    np.testing.assert_array_equal(by_twelve.get(path), resize(load_image(path, bit_depth=12), twelve))
    assert by_twelve.stats.misses == 1 and by_twelve.get(path).max() > 200 > 20 > by_auto.get(path).max()


def test_data_check_warns_per_file_with_the_fix_and_the_setting_clears_it(tmp_path):
    root = tmp_path / "ds"
    for c, cls in enumerate(("normal", "pneumonia")):
        for i in range(4):  # each file its own content, the brightest 4095
            png16(root / cls / f"{cls}{i}.png", np.clip(VALUES.astype(int) - 2 * i - c, 0, None).astype(np.uint16))
    png16(root / "normal" / "tagged.png", VALUES, sbit=bytes([12]))  # says its bit depth: no warning
    report = check_dataset(root, seed=1)
    low = report["pixel_range"]
    assert (low["images"], low["of_16_bit"], low["max_value"]) == (8, 9, 4095)
    assert sorted(Path(p).name for p in low["files"]) == sorted(f"{c}{i}.png" for c in ("normal", "pneumonia")
                                                                 for i in range(4))
    assert report["ok"] is False
    text = format_check_report(report)
    assert "8 of 9 decoded 16-bit images have no sBIT chunk" in text and "set data.bit_depth: 12" in text
    assert "verdict: OK" not in text
    fixed = check_dataset(root, seed=1, bit_depth=12)
    assert fixed["pixel_range"]["images"] == 0 and not fixed["unreadable"]


def test_the_data_and_train_note_samples_the_index_once(tmp_path):
    root = tmp_path / "ds"
    for c, cls in enumerate(("normal", "pneumonia")):
        for i in range(6):
            png16(root / cls / f"{cls}{i}.png", (VALUES - VALUES // (10 + 2 * i + c)).astype(np.uint16))
    index = read_dataset(DataConfig(format="folder", root=str(root), generate=False), seed=1)
    note = note_pixel_range(index, "auto", seed=1)
    assert note.startswith("bit depth: 12 of 12 sampled 16-bit images have no sBIT chunk")
    assert "set data.bit_depth: 12" in note and index.notes[-1] == note
    assert note_pixel_range(index, "auto", seed=1) is None and index.notes.count(note) == 1  # once
    assert note_pixel_range(read_dataset(DataConfig(format="folder", root=str(root), generate=False), seed=1),
                            12) is None


def test_predict_warns_on_a_low_range_image_and_reads_it_as_the_run_did(tmp_path):
    from medq.predict import ImageInput, _load_one

    path = png16(tmp_path / "plain.png", VALUES)
    x, _, error, warning = _load_one(ImageInput(path), PreprocessSpec(8, 1, "unit"), False, False)
    assert error is None and "set data.bit_depth: 12" in warning and "data.bit_depth auto" in warning
    np.testing.assert_allclose(x, load_and_preprocess(path, PreprocessSpec(8, 1, "unit")))
    x, _, error, warning = _load_one(ImageInput(path), PreprocessSpec(8, 1, "unit", 12), False, False)
    assert error is None and warning is None
    assert x.mean() == pytest.approx(VALUES.mean() / 4095, abs=2e-3)


# --- EXIF Orientation ----------------------------------------------------------------------------------------------

def photo() -> np.ndarray:
    """An asymmetric RGB scene (a bright block in one corner, a ramp): any wrong rotation or flip shows."""
    rgb = np.zeros((24, 40, 3), np.uint8)
    rgb[..., 0] = np.linspace(0, 200, 40, dtype=np.uint8)[None, :]
    rgb[2:10, 3:15] = (250, 250, 40)
    return rgb


def pil_saved(path: Path, rgb: np.ndarray, orientation: int, fmt: str) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(path, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def viewer(path: Path) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_jpeg_exif_orientation_is_applied_as_pil_exif_transpose_does(tmp_path, orientation):
    path = pil_saved(tmp_path / f"phone{orientation}.jpg", photo(), orientation, "JPEG")
    expected = viewer(path)
    image, info = decode_image(path)
    assert image.shape == expected.shape and (info["height"], info["width"]) == expected.shape[:2]
    # PIL's and OpenCV's libjpeg builds may round the inverse DCT differently: a few levels, never a rotation
    assert np.abs(load_pixels(path).astype(int) - expected).max() <= 3
    np.testing.assert_array_equal(load_image(path), load_pixels(path) / np.float32(255))


def test_png_exif_orientation_is_applied_exactly(tmp_path):
    path = pil_saved(tmp_path / "scan.png", photo(), 6, "PNG")
    np.testing.assert_array_equal(load_pixels(path), viewer(path))


def test_big_endian_exif_as_iphones_write_it_is_applied(tmp_path):
    # APP1 "Exif\0\0" + TIFF header "MM" + IFD0 with one entry: Orientation (0x0112), SHORT, count 1, value 8
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + \
        struct.pack(">HHIHH", 0x0112, 3, 1, 8, 0) + struct.pack(">I", 0)
    plain = io.BytesIO()
    Image.fromarray(photo()).save(plain, "JPEG", quality=95)
    data = plain.getvalue()
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(tiff)) + b"Exif\x00\x00" + tiff
    path = tmp_path / "iphone.jpg"
    path.write_bytes(data[:2] + app1 + data[2:])
    expected = viewer(path)
    assert expected.shape == (40, 24, 3)  # the oracle itself rotated it
    assert np.abs(load_pixels(path).astype(int) - expected).max() <= 3


def test_the_cache_and_the_model_input_see_the_rotated_image(tmp_path):
    path = pil_saved(tmp_path / "phone.jpg", photo(), 6, "JPEG")
    spec = PreprocessSpec(16, 3, "unit")
    upright = resize(viewer(path), spec)
    stored = ImageCache(tmp_path / "cache", spec).get(path)
    assert np.abs(stored.astype(int) - upright).max() <= 3
    np.testing.assert_allclose(load_and_preprocess(path, spec), stored / 255.0, atol=1e-6)


def test_verification_lists_a_file_brighter_than_the_bit_depth_set_as_a_skip(tmp_path):
    from medq.data.check import verify_images

    root = tmp_path / "ds"
    for c, cls in enumerate(("normal", "pneumonia")):
        for i in range(4):
            png16(root / cls / f"{cls}{i}.png", (VALUES - VALUES // (10 + 2 * i + c)).astype(np.uint16))
    bright = png16(root / "normal" / "bright.png", (VALUES.astype(np.uint32) * 16).astype(np.uint16))
    index = read_dataset(DataConfig(format="folder", root=str(root), generate=False), seed=1)
    assert verify_images(index).skipped == []
    verified = verify_images(index, bit_depth=12)
    assert [(Path(p), r.split(";")[0]) for p, r in verified.skipped] == [
        (bright, "a pixel value of 65520 is above 4095, the largest 12-bit value, but data.bit_depth is 12")]
