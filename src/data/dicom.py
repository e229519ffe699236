"""DICOM → float32 [0, 1]: the display pipeline of PS3.3 C.11 (modality LUT, VOI, presentation), done once.

stored values → Modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence)
             → VOI (the first VOI LUT, else the first WindowCenter/WindowWidth pair with its VOILUTFunction, else the
               full range the stored bits can hold — BitsStored, not BitsAllocated, so 12-bit data fills [0, 1])
             → MONOCHROME1 inverted, so air is dark as in MONOCHROME2.
RGB and YBR colour images come out RGB; PALETTE COLOR through its lookup table. Everything else — multi-frame
objects, objects without pixel data (structured reports, presentation states), compressed data no installed decoder
reads — raises :class:`UnreadableImage` with a message that names the file.

:func:`dicom_bytes` writes small synthetic DICOM files (phantoms, tests).
"""
from __future__ import annotations

import contextlib
import io
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from medq.data.unreadable import UnreadableImage, pixel_problem

GRAY = ("MONOCHROME1", "MONOCHROME2")
COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")

# SOP classes used when writing: Computed Radiography, Digital X-Ray (for presentation), Ultrasound.
SOP_CLASSES = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
               "US": "1.2.840.10008.5.1.4.1.1.6.1"}

_QUIET_MODULES = r"pydicom(\.|$)"
_quiet_lock = threading.Lock()
_quiet_users = 0  # decodes inside _pydicom_quiet now, in any thread


@contextlib.contextmanager
def _pydicom_quiet() -> Iterator[None]:
    """pydicom's warnings (harmless header and padding oddities of real-world files) silenced inside the block.

    Files are decoded in parallel threads (serve's decode pool, predict's and tf.data's loaders), and the warning
    filters are one process-wide list: warnings.catch_warnings swaps it whole, so threads entering and leaving it
    interleaved would leave one's filter in place for good (and a lock around it would serialise every decode). So
    one filter, naming pydicom's modules only, is in the list while any thread decodes: the first in adds it, the
    last out removes that entry alone (filters others added meanwhile stay). A warning other code raises meanwhile
    still shows."""
    global _quiet_users
    with _quiet_lock:
        if _quiet_users == 0:
            warnings.filterwarnings("ignore", module=_QUIET_MODULES)
        _quiet_users += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_users -= 1
            if _quiet_users == 0:
                _drop_quiet_filter()


def _drop_quiet_filter() -> None:
    """Remove the entry _pydicom_quiet added (warnings has no public call for it)."""
    for entry in warnings.filters:
        if entry[0] == "ignore" and entry[1] is None and entry[2] is Warning and \
                getattr(entry[3], "pattern", None) == _QUIET_MODULES and entry[4] == 0:
            warnings.filters.remove(entry)
            warnings._filters_mutated()  # noqa: SLF001 - what filterwarnings calls: caches see the change
            return


def load_dicom(path: str | Path) -> np.ndarray:
    """float32 [0, 1]: gray [H, W] (air dark) or RGB [H, W, 3]."""
    return read_dicom(path)[0]


def _read(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass  # no preamble: retry leniently below
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on damaged files
        raise UnreadableImage(f"{path}: damaged DICOM file ({_short(exc)})") from None
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # noqa: BLE001
        raise UnreadableImage(f"{path}: not a readable DICOM file ({_short(exc)})") from None
    if not any(tag.group in (0x0008, 0x0010, 0x0028) for tag in ds.keys()):
        raise UnreadableImage(f"{path}: not a DICOM file")
    return ds


def header_values(path: str | Path, keywords: Sequence[str]) -> dict[str, str] | None:
    """The header elements ``keywords`` (e.g. PatientSex) of a DICOM file as text, '' where absent; None when the
    header cannot be read. Only those tags are parsed, the pixel data is never read (~0.3 ms a file; cached by
    medq.data.headers)."""
    import pydicom

    try:
        with _pydicom_quiet():
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(keywords), force=True)
        return {k: str(ds.get(k, "") or "").strip() for k in keywords}
    except Exception:  # noqa: BLE001 - a damaged header: the image itself is judged by the decoder, not here
        return None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def read_dicom(path: str | Path, max_megapixels: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """(image as :func:`load_dicom` returns it, facts: format, width, height, channels, bits, photometric); an
    image whose Rows × Columns exceed ``max_megapixels`` is refused before its pixel data is decoded."""
    path = Path(path)
    with _pydicom_quiet():
        ds = _read(path)
        try:
            size = (int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0))
            problem = pixel_problem(size, max_megapixels) if max_megapixels is not None else None
            if problem:
                raise UnreadableImage(f"{path}: {problem}")
            return _decode(path, ds)
        except UnreadableImage:
            raise
        except Exception as exc:  # noqa: BLE001 - a malformed header value (NumberOfFrames "", a bad LUT, ...)
            raise UnreadableImage(f"{path}: malformed DICOM header ({_short(exc)}); fix or replace the file") from None


def _decode(path: Path, ds) -> tuple[np.ndarray, dict[str, Any]]:
    if "PixelData" not in ds:
        what = ds.get("SOPClassUID")
        what = getattr(what, "name", None) or str(ds.get("Modality", "") or "unknown kind")
        raise UnreadableImage(f"{path}: DICOM object without pixel data ({what}); only image objects can be "
                              "used — remove it from the dataset folder")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UnreadableImage(f"{path}: multi-frame DICOM ({frames} frames); medq reads single 2-D images — "
                              "export one frame per file")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric not in GRAY + COLOR + ("PALETTE COLOR",):
        raise UnreadableImage(f"{path}: photometric interpretation {photometric or '(missing)'!r} is not a "
                              "grayscale or RGB image")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing codec, short pixel data, bad header
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = f" ({syntax.name})" if syntax is not None and hasattr(syntax, "name") else ""
        text = _short(exc)
        fix = ("install pylibjpeg with pylibjpeg-libjpeg (or gdcm) to read it" if "plugin" in text.lower()
               or "decoder" in text.lower() or "missing" in text.lower() else "the file is damaged; replace it")
        raise UnreadableImage(f"{path}: pixel data cannot be decoded{hint}: {text}; {fix}") from None
    bits = int(ds.get("BitsStored", stored.dtype.itemsize * 8) or 8)
    if photometric in GRAY and samples == 1 and stored.ndim == 2:
        image = _gray(stored, ds, bits)
        if photometric == "MONOCHROME1":
            image = 1.0 - image
        channels = "gray"
    elif photometric == "PALETTE COLOR" and stored.ndim == 2:
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(stored, ds)
        image = rgb.astype(np.float32) / float(np.iinfo(rgb.dtype).max)
        channels = "RGB"
    elif photometric in COLOR and stored.ndim == 3 and stored.shape[2] == 3:
        image = stored.astype(np.float32) / float(2 ** min(bits, 16) - 1)
        channels = "RGB"
    else:
        raise UnreadableImage(f"{path}: pixel array of shape {stored.shape} ({photometric}, {samples} samples "
                              "per pixel) is not a 2-D grayscale or RGB image")
    image = np.ascontiguousarray(np.clip(image, 0.0, 1.0), dtype=np.float32)
    info = {"format": "dicom", "width": int(image.shape[1]), "height": int(image.shape[0]), "channels": channels,
            "bits": bits, "photometric": photometric}
    return image, info


def _stored_range(ds, bits: int) -> tuple[int, int]:
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def _first(value: Any) -> float:
    """WindowCenter/WindowWidth may be multi-valued (several presets): the first is the default view."""
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and not isinstance(value, (str, bytes))):
        value = value[0]
    return float(value)


def _gray(stored: np.ndarray, ds, bits: int) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi

    values = apply_modality_lut(stored, ds).astype(np.float64)
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        if item.get("LUTDescriptor") is not None and item.get("LUTData") is not None:
            n_entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
            lut = apply_voi(np.arange(first, first + n_entries), ds).astype(np.float64)  # every LUT entry
            out = apply_voi(np.round(values).astype(np.int64), ds).astype(np.float64)
            return _unit(out, lut.min(), lut.max())
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        windowed = _window(values, _first(ds.WindowCenter), _first(ds.WindowWidth),
                           str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper())
        if windowed is not None:
            return windowed
    # No usable VOI: the full range the stored bits can hold, through the modality transform.
    lo, hi = _stored_range(ds, bits)
    if ds.get("ModalityLUTSequence"):
        probe = apply_modality_lut(np.arange(lo, hi + 1), ds)
    else:
        probe = apply_modality_lut(np.array([lo, hi]), ds)
    return _unit(values, float(np.min(probe)), float(np.max(probe)))


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray | None:
    """PS3.3 C.11.2.1.2 / C.11.2.1.3 to [0, 1]; None when the window is unusable (width too small)."""
    if function == "SIGMOID":
        if width <= 0:
            return None
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            return None
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        return None
    if width == 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _unit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros_like(values)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


# --- writing synthetic DICOM (phantoms, tests) -----------------------------------------------------------------

def dicom_bytes(stored: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                rescale: tuple[float, float] | None = None,
                window: tuple[float | Sequence[float], float | Sequence[float]] | None = None,
                voi_function: str | None = None, voi_lut: tuple[int, int, Sequence[int]] | None = None,
                patient_id: str = "ANON", modality: str = "CR", jpeg_quality: int | None = None,
                frames: int | None = None, with_pixels: bool = True, uid_seed: str = "medq",
                header: dict[str, str] | None = None) -> bytes:
    """A complete DICOM Part 10 file holding ``stored`` (uint8/uint16/int16 [H, W], [H, W, 3] RGB or [F, H, W]).

    rescale=(slope, intercept); window=(center, width), each a number or a list of presets; voi_lut=(first mapped,
    bits, entries); jpeg_quality encapsulates 8-bit gray pixels as JPEG Baseline (as the RSNA challenge files are);
    frames writes a multi-frame object; with_pixels=False writes an object with no pixel data; header sets more
    elements by keyword (PatientSex, PatientAge, ViewPosition …).
    """
    import cv2
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    stored = np.asarray(stored)
    meta = FileMetaDataset()
    sop_class = SOP_CLASSES.get(modality, SOP_CLASSES["CR"]) if with_pixels else "1.2.840.10008.5.1.4.1.1.88.11"
    sop_instance = generate_uid(entropy_srcs=[uid_seed, patient_id, "sop"])
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg_quality else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, patient_id, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, patient_id, "series"])
    ds.PatientID, ds.PatientName, ds.Modality = patient_id, patient_id, (modality if with_pixels else "SR")
    ds.BodyPartExamined = "CHEST" if modality in ("CR", "DX") else "BREAST"
    with _pydicom_quiet():  # values as real files hold them, e.g. RSNA's PatientAge '58' (not '058Y')
        for keyword, value in (header or {}).items():
            setattr(ds, keyword, value)
    if not with_pixels:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()
    if frames:
        ds.NumberOfFrames = frames
    rgb = stored.ndim == 3 and not frames
    ds.Rows, ds.Columns = int(stored.shape[-2 if not rgb else 0]), int(stored.shape[-1 if not rgb else 1])
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else photometric
    if rgb:
        ds.PlanarConfiguration = 0
    allocated = stored.dtype.itemsize * 8
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored or allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if np.issubdtype(stored.dtype, np.signedinteger) else 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = f"{rescale[0]:g}", f"{rescale[1]:g}"
        ds.RescaleType = "US"
    if window is not None:
        center, width = window
        ds.WindowCenter = [f"{c:g}" for c in center] if isinstance(center, (list, tuple)) else f"{center:g}"
        ds.WindowWidth = [f"{w:g}" for w in width] if isinstance(width, (list, tuple)) else f"{width:g}"
    if voi_function:
        ds.VOILUTFunction = voi_function
    if voi_lut is not None:
        first, lut_bits, entries = voi_lut
        item = Dataset()
        item.LUTDescriptor = [len(entries) % 65536, first, lut_bits]
        item.add_new(0x00283006, "US", [int(v) for v in entries])  # LUTData
        ds.VOILUTSequence = DicomSequence([item])
    if jpeg_quality:
        ok, encoded = cv2.imencode(".jpg", stored.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
        if not ok:
            raise ValueError("JPEG encoding failed")
        ds.PixelData = encapsulate([encoded.tobytes()])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.LossyImageCompression = "01"
    else:
        ds.PixelData = np.ascontiguousarray(stored).astype(stored.dtype.newbyteorder("<"), copy=False).tobytes()
        ds["PixelData"].VR = "OW" if allocated > 8 else "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
