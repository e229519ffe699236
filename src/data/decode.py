"""Decode an image file (JPEG, PNG 8/16-bit, DICOM) to float32 in [0, 1], grayscale [H, W] or RGB [H, W, 3].

Decoding is the only place that knows file formats; everything after it (src/preprocess.py) sees one kind of array.
The file's content decides how it is read, not its name: a PNG saved as ``.jpeg`` decodes as the PNG it is, a DICOM
file without a suffix decodes as DICOM, and a text or HTML file named ``.png`` is reported as not an image.

Two levels of checking:
- :func:`check_header` — cheap (one open, a few small reads): empty, not an image, visibly truncated, or more pixels
  than ``data.max_megapixels`` (a decompression bomb: a 1 MB PNG can claim 32,000×32,000 pixels). Readers run it on
  every file at index time, which keeps indexing 100k-image datasets to seconds.
- :func:`load_image` / :func:`decode_image` — the full decode, strict: the pixel limit is checked from the header
  before any pixel is decoded, and a JPEG whose entropy-coded body is corrupt (libjpeg warns "Corrupt JPEG data" and
  returns grey garbage) is unreadable. ``verify_images`` (medq.data.check) runs it on every file of small datasets
  and ``medq data check`` on a sample.

Pixels are read as a viewer shows them:
- EXIF Orientation (phone and scanner JPEGs, PNG's eXIf chunk) is applied, as viewers and PIL's
  ``ImageOps.exif_transpose`` do: OpenCV applies it unless asked for ``IMREAD_UNCHANGED``, which medq used to ask for.
- 16-bit samples are divided by the largest value of their *significant* bits, not always by 65535
  (:func:`significant_samples`): a PNG's ``sBIT`` chunk says how many bits are significant (OpenCV and PIL ignore it);
  without one, ``data.bit_depth`` says it (``auto``: all 16, and an image that uses at most 14 of them, as 12-bit
  DICOM exports do, is flagged ``low_range`` for the warnings of ``medq data``, ``data check``, train and predict).
"""
from __future__ import annotations

import os
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from medq.data.unreadable import UnreadableImage, pixel_problem  # re-exported: the decoders' shared refusals

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm", ".dicom"}
DICOM_SUFFIXES = {".dcm", ".dicom", ""}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
_TAIL = 1024  # bytes read from the end of a JPEG to find its end-of-image marker
MAX_MEGAPIXELS = 100.0  # data.max_megapixels' default: far above any radiograph (a 4k×4k film is 16)
# JPEG start-of-frame markers (SOF0-SOF15 without DHT C4, JPG C8, DAC CC): they carry the image size.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# libjpeg reports a damaged body only as a warning on the process's stderr (no file name, no error), so JPEG decodes
# run one at a time with file descriptor 2 pointed at a capture file: the warning becomes this file's reason.
_LIBJPEG_LOCK = threading.Lock()
_CAPTURE = None  # the capture file, opened on first use and reused under the lock
_LIBJPEG_WARNINGS = ("Corrupt JPEG data", "Premature end of JPEG file", "Invalid JPEG", "Bogus", "Huffman")
# OpenCV's read: the file's own depth (8/16-bit) and colour (gray stays gray), alpha dropped (it carries no anatomy),
# EXIF Orientation applied (IMREAD_UNCHANGED would ignore it).
_IMREAD = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
LOW_RANGE_MAX = 2 ** 14 - 1  # a 16-bit image whose maximum is at most this uses at most 14 of its 16 bits
# PNG colour type → (sBIT bytes, how many of them are colour channels, has alpha)
_PNG_COLOUR = {0: (1, 1, False), 2: (3, 3, False), 3: (3, 3, False), 4: (2, 1, True), 6: (4, 3, True)}


def sniff(head: bytes, suffix: str = "") -> str | None:
    """'png' | 'jpeg' | 'dicom' from a file's first 132 bytes, or None when it is none of them."""
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head[128:132] == b"DICM":
        return "dicom"
    # DICOM written without the 128-byte preamble starts with a group 0002 or 0008 tag (little endian).
    if suffix.lower() in DICOM_SUFFIXES and head[:2] in (b"\x02\x00", b"\x08\x00") and len(head) >= 8:
        return "dicom"
    return None


def _describe_content(head: bytes) -> str:
    text = head.lstrip()[:16].lower()
    if text.startswith((b"<!doctype", b"<html", b"<?xml")):
        return "an HTML/XML page"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    if head.startswith((b"GIF8", b"BM", b"II*\x00", b"MM\x00*")):
        return "an image format medq does not read (GIF/BMP/TIFF)"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head[:64]):
        return "a text file"
    return f"unknown content (starts with {head[:8].hex(' ')})"


def not_an_image(suffix: str, head: bytes) -> str:
    """The one reason for a file that is no PNG, JPEG or DICOM (TIFF, BMP, text...): check and decode say the same."""
    return f"not a PNG, JPEG or DICOM file: named {suffix or '(no suffix)'}, content is {_describe_content(head)}"


def _truncation(kind: str, tail: bytes) -> str | None:
    if kind == "png" and tail[-12:][4:8] != b"IEND":
        return "truncated PNG (no IEND chunk at the end of the file)"
    if kind == "jpeg" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    return None


def _png_size(read) -> tuple[int, int] | None:
    ihdr = read(12, 12)  # after the signature and the chunk length: b"IHDR", width, height
    if len(ihdr) < 12 or ihdr[:4] != b"IHDR":
        return None
    return int.from_bytes(ihdr[4:8], "big"), int.from_bytes(ihdr[8:12], "big")


def _jpeg_size(read) -> tuple[int, int] | None:
    """(width, height) from the first start-of-frame segment, walking the segments from the start of the file."""
    offset = 2
    for _ in range(512):  # a real file reaches its SOF within a few segments
        marker = read(offset, 4)
        if len(marker) < 4 or marker[0] != 0xFF:
            return None
        kind = marker[1]
        if kind == 0xFF:  # fill byte
            offset += 1
            continue
        if kind in _SOF:
            frame = read(offset + 4, 5)
            return (int.from_bytes(frame[3:5], "big"), int.from_bytes(frame[1:3], "big")) if len(frame) == 5 else None
        if kind in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        offset += 2 + int.from_bytes(marker[2:4], "big")
    return None


def image_size(kind: str, read) -> tuple[int, int] | None:
    """(width, height) a PNG or JPEG header claims, or None when it cannot be read; ``read(offset, n)`` → bytes."""
    return _png_size(read) if kind == "png" else _jpeg_size(read) if kind == "jpeg" else None


def check_header(path: str | Path, max_megapixels: float = MAX_MEGAPIXELS) -> str | None:
    """Why ``path`` cannot be an image (empty, not PNG/JPEG/DICOM, truncated, too many pixels), or None if its
    header looks right.

    One open and a few small reads, no pathlib: it runs on every file of 100k-image datasets at index time."""
    name = os.fspath(path)
    try:
        fh = open_regular(name)
        if fh is None:
            return NOT_REGULAR
        with fh:
            head = fh.read(132)
            if not head:
                return "empty file (0 bytes)"
            suffix = os.path.splitext(name)[1]
            kind = sniff(head, suffix)
            if kind is None:
                return not_an_image(suffix, head)
            if kind == "dicom":
                return None if len(head) == 132 and fh.read(1) else "truncated DICOM (header only)"
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - (_TAIL if kind == "jpeg" else 12)))
            problem = _truncation(kind, fh.read())
            if problem:
                return problem

            def read(offset: int, n: int) -> bytes:
                fh.seek(offset)
                return fh.read(n)

            return pixel_problem(image_size(kind, read), max_megapixels)
    except FileNotFoundError:
        return missing(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"


BROKEN_LINK = "broken symbolic link (its target does not exist)"
NOT_REGULAR = "not a regular file (a named pipe, device or socket); give an image file"


def open_regular(name: str | Path):
    """``name`` opened for reading (unbuffered), or None when it is no regular file: a named pipe would block the
    read until a writer comes (forever), a device such as /dev/zero never end it. Opened without blocking, so a pipe
    is found out at once; for a regular file the flag changes nothing."""
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK)
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return open(fd, "rb", buffering=0)
    os.close(fd)
    return None


def missing(path: Path) -> str:
    """Why a listed input cannot be opened: a symbolic link whose target does not exist (`ls` still shows the
    link, so "file not found" would puzzle), or gone."""
    return BROKEN_LINK if os.path.islink(path) else "file not found"


def is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return sniff(fh.read(132), Path(path).suffix) == "dicom"
    except OSError:
        return False


def _libjpeg_decode(raw: np.ndarray) -> tuple[np.ndarray | None, str]:
    """OpenCV's decode of a JPEG and what libjpeg warned on stderr meanwhile (other text there is passed on)."""
    global _CAPTURE
    with _LIBJPEG_LOCK:
        if _CAPTURE is None:
            _CAPTURE = tempfile.TemporaryFile()
        _CAPTURE.seek(0)
        _CAPTURE.truncate()
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(_CAPTURE.fileno(), 2)
            image = cv2.imdecode(raw, _IMREAD)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        _CAPTURE.seek(0)
        text = _CAPTURE.read().decode("utf-8", errors="replace")
    warnings = [line.strip() for line in text.splitlines() if line.strip().startswith(_LIBJPEG_WARNINGS)]
    others = [line for line in text.splitlines() if line.strip() and line.strip() not in warnings]
    if others:
        print("\n".join(others), file=sys.stderr)
    return image, "; ".join(warnings)


def decode_image(path: str | Path, max_megapixels: float = MAX_MEGAPIXELS, *,
                 bit_depth: int | str = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """Full decode: (float32 [0, 1] gray [H, W] or RGB [H, W, 3], facts about the stored file).

    The facts: ``format`` (png/jpeg/dicom), ``width``, ``height`` (as shown, after EXIF Orientation), ``channels``
    (gray/RGB/RGBA), ``bits`` (stored bit depth); for 16-bit images (PNG) also ``significant_bits`` (what 1.0 is),
    ``bits_from`` ('sBIT' | 'data.bit_depth' | 'stored'), ``max_value`` (the largest stored sample) and
    ``low_range`` (see :func:`significant_samples`). ``bit_depth``: ``data.bit_depth``. Raises
    :class:`UnreadableImage` naming the file and what is wrong with it.
    """
    image, info = _decode(Path(path), max_megapixels, bit_depth)
    if info["format"] == "dicom":
        return image, info
    return to_unit_float(image, path, info.get("significant_bits")), info


def decode_pixels(path: str | Path, max_megapixels: float = MAX_MEGAPIXELS, *,
                  bit_depth: int | str = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`decode_image` without the conversion to float: 8-bit files stay uint8 (gray [H, W] or RGB [H, W, 3],
    alpha dropped), 16-bit files and DICOM are float32 [0, 1]. Resizing the 8-bit pixels directly is what keeps a
    first pass over 1024² PNGs close to OpenCV's own speed (a full-resolution float copy costs as much as the
    resize)."""
    image, info = _decode(Path(path), max_megapixels, bit_depth)
    if info["format"] == "dicom":
        return image, info
    if image.dtype == np.uint8:
        return rgb_order(image, path), info
    return to_unit_float(image, path, info.get("significant_bits")), info


def _decode(path: Path, max_megapixels: float, bit_depth: int | str) -> tuple[np.ndarray, dict[str, Any]]:
    """OpenCV's pixels (gray or BGR; uint8, or uint16 on the scale of ``info['significant_bits']``) or DICOM's
    float32 [0, 1] gray, and the file's facts."""
    try:
        fh = open_regular(path)
        if fh is None:
            raise UnreadableImage(f"{path}: {NOT_REGULAR}")
        with fh:
            raw = np.fromfile(fh, dtype=np.uint8)
    except FileNotFoundError:
        raise UnreadableImage(f"{path}: {missing(path)}") from None
    except OSError as exc:
        raise UnreadableImage(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if raw.size == 0:
        raise UnreadableImage(f"{path}: empty file (0 bytes)")
    head = raw[:132].tobytes()
    kind = sniff(head, path.suffix)
    if kind == "dicom":
        from medq.data.dicom import read_dicom

        return read_dicom(path, max_megapixels)
    if kind is None:
        raise UnreadableImage(f"{path}: {not_an_image(path.suffix, head)}")
    problem = _truncation(kind, raw[-_TAIL:].tobytes()) or pixel_problem(
        image_size(kind, lambda offset, n: raw[offset:offset + n].tobytes()), max_megapixels)
    if problem:
        raise UnreadableImage(f"{path}: {problem}")
    if kind == "jpeg":
        image, warning = _libjpeg_decode(raw)
        if warning:
            raise UnreadableImage(f"{path}: corrupt JPEG data (libjpeg: {warning}); the decoded pixels would be "
                                  "garbage — replace the file from the original source, or remove it")
    else:
        image = cv2.imdecode(raw, _IMREAD)
    if image is None:
        raise UnreadableImage(f"{path}: not a decodable {kind.upper()} (corrupt data)")
    chunks = png_chunks(raw) if kind == "png" else {}
    channels = 1 if image.ndim == 2 else image.shape[2]
    name = {1: "gray", 3: "RGB"}.get(channels, f"{channels}-channel")
    if _has_alpha(chunks):
        name = "RGBA"
    info = {"format": kind, "width": int(image.shape[1]), "height": int(image.shape[0]), "channels": name,
            "bits": 16 if image.dtype == np.uint16 else 8}
    if image.dtype == np.uint16:
        image, facts = significant_samples(image, png_sbit(chunks), bit_depth, path)
        info |= facts
    return image, info


def png_chunks(raw: np.ndarray) -> dict[bytes, bytes]:
    """The chunks of a PNG before its first IDAT (IHDR, sBIT, PLTE, tRNS, eXIf, ...): type → data. A few small
    reads from the start of the file; a damaged chunk table ends the walk (OpenCV reports a corrupt file)."""
    chunks: dict[bytes, bytes] = {}
    offset = len(PNG_MAGIC)
    while offset + 8 <= raw.size:
        length = int.from_bytes(raw[offset:offset + 4].tobytes(), "big")
        kind = raw[offset + 4:offset + 8].tobytes()
        if kind == b"IDAT" or offset + 12 + length > raw.size:
            break
        chunks.setdefault(kind, raw[offset + 8:offset + 8 + length].tobytes())
        offset += 12 + length
    return chunks


def _has_alpha(chunks: dict[bytes, bytes]) -> bool:
    ihdr = chunks.get(b"IHDR", b"")
    if len(ihdr) < 10:
        return False
    colour = ihdr[9]
    return _PNG_COLOUR.get(colour, (0, 0, False))[2] or (colour != 0 and b"tRNS" in chunks)


def png_sbit(chunks: dict[bytes, bytes]) -> int | None:
    """The significant bits of a 16-bit PNG's colour samples from its sBIT chunk (the largest, should the channels
    differ); None without a valid chunk, or when it says all 16 (what some writers always write: no information)."""
    ihdr, sbit = chunks.get(b"IHDR", b""), chunks.get(b"sBIT")
    if sbit is None or len(ihdr) < 10 or ihdr[8] != 16 or ihdr[9] not in _PNG_COLOUR:
        return None
    size, colour, _ = _PNG_COLOUR[ihdr[9]]
    if len(sbit) != size or not all(1 <= b <= 16 for b in sbit):
        return None  # libpng ignores an invalid sBIT too
    bits = max(sbit[:colour])
    return bits if bits < 16 else None


def significant_samples(image: np.ndarray, sbit: int | None, bit_depth: int | str,
                        path: Path | str) -> tuple[np.ndarray, dict[str, Any]]:
    """16-bit samples → (the same samples on the scale of their significant bits, 0 … 2**bits − 1; facts).

    - ``sbit`` (the file's sBIT chunk, < 16): the PNG specification has the exporter scale N-bit values up to 16 bits
      (so the top N bits are the value), but DICOM→PNG exporters commonly store the N-bit values as they are. Samples
      that are all at most 2**N − 1 and not all scaled-up values are the latter; otherwise the top N bits are taken.
      Either way 1.0 is the largest N-bit value.
    - no sBIT and ``bit_depth`` N (``data.bit_depth``): the samples are N-bit values; a larger sample makes the file
      unreadable (never silently clipped).
    - no sBIT and ``bit_depth`` 'auto': all 16 bits, as before; ``low_range`` flags an image whose maximum is at most
      :data:`LOW_RANGE_MAX` (read as 16-bit it is near black: likely 10-, 12- or 14-bit values).
    """
    peak = int(image.max()) if image.size else 0
    if sbit is not None:
        as_written = peak < 2 ** sbit and not _scaled_up(image, sbit)
        facts = {"significant_bits": sbit, "bits_from": "sBIT", "max_value": peak, "low_range": False}
        return (image if as_written else image >> (16 - sbit)), facts
    if bit_depth != "auto":
        bits = int(bit_depth)
        if peak >= 2 ** bits:
            raise UnreadableImage(f"{path}: a pixel value of {peak} is above {2 ** bits - 1}, the largest {bits}-bit "
                                  f"value, but data.bit_depth is {bits}; set data.bit_depth to the bit depth the "
                                  "exporter wrote (auto reads all 16 bits)")
        return image, {"significant_bits": bits, "bits_from": "data.bit_depth", "max_value": peak,
                       "low_range": False}
    return image, {"significant_bits": 16, "bits_from": "stored", "max_value": peak,
                   "low_range": peak <= LOW_RANGE_MAX}


def _scaled_up(image: np.ndarray, bits: int) -> bool:
    """Whether every 16-bit sample is its top ``bits`` bits scaled to 16 bits in a way the PNG specification names:
    a left shift, a shift with the high bits repeated in the low ones, or the linear map v · 65535 / (2**bits − 1).
    """
    shift = 16 - bits
    value = image >> shift
    ok = (image == value << shift) | (image == np.rint(value * (65535.0 / (2 ** bits - 1))))
    if bits >= shift:
        ok |= image == (value << shift) | (value >> (bits - shift))
    return bool(ok.all())


def low_range_advice(max_value: int) -> str:
    """What is wrong with 16-bit images of this maximum that ``data.bit_depth: auto`` read as 16-bit, and the fix."""
    used = max(1, int(max_value).bit_length())
    likely = next((b for b in (10, 12, 14) if max_value < 2 ** b), 16)
    return (f"no sBIT chunk and use at most {used} of their 16 bits (maximum {max_value}): read as 16-bit they are "
            f"near black; if the exporter wrote {likely}-bit values (DICOM→PNG exports usually write 12), set "
            f"data.bit_depth: {likely}")


def load_image(path: str | Path, max_megapixels: float = MAX_MEGAPIXELS, *,
               bit_depth: int | str = "auto") -> np.ndarray:
    """float32 [0, 1], gray [H, W] or RGB [H, W, 3]; :class:`UnreadableImage` if the file cannot be decoded."""
    return decode_image(path, max_megapixels, bit_depth=bit_depth)[0]


def load_pixels(path: str | Path, max_megapixels: float = MAX_MEGAPIXELS, *,
                bit_depth: int | str = "auto") -> np.ndarray:
    """What :func:`medq.preprocess.resize` takes: uint8 for 8-bit files, float32 [0, 1] otherwise (see
    :func:`decode_pixels`)."""
    return decode_pixels(path, max_megapixels, bit_depth=bit_depth)[0]


def to_unit_float(image: np.ndarray, path: Path | str = "<array>", bits: int | None = None) -> np.ndarray:
    """uint8/uint16 gray, BGR or BGRA (OpenCV's order) → float32 [0, 1], gray [H, W] or RGB [H, W, 3]; ``bits``:
    the significant bits of uint16 samples (1.0 is 2**bits − 1; default all 16)."""
    if image.dtype in (np.uint8, np.uint16):  # in place: one full-resolution float copy, not two
        scaled = image.astype(np.float32)
        peak = 255.0 if image.dtype == np.uint8 else float(2 ** (bits or 16) - 1)
        np.divide(scaled, np.float32(peak), out=scaled)
    elif np.issubdtype(image.dtype, np.floating):
        scaled = np.clip(image.astype(np.float32), 0.0, 1.0)
    else:
        raise UnreadableImage(f"{path}: unsupported pixel type {image.dtype}")
    return rgb_order(scaled, path)


def rgb_order(scaled: np.ndarray, path: Path | str = "<array>") -> np.ndarray:
    """Gray [H, W] or RGB [H, W, 3] from OpenCV's gray, BGR or BGRA of any pixel type (alpha carries no anatomy)."""
    if scaled.ndim == 3 and scaled.shape[2] == 1:
        scaled = scaled[:, :, 0]
    if scaled.ndim == 3:
        if scaled.shape[2] == 4:
            scaled = scaled[:, :, :3]
        if scaled.shape[2] != 3:
            raise UnreadableImage(f"{path}: {scaled.shape[2]} channels; expected gray, RGB or RGBA")
        scaled = np.ascontiguousarray(scaled[:, :, ::-1])  # BGR → RGB
    elif scaled.ndim != 2:
        raise UnreadableImage(f"{path}: {scaled.ndim}-D pixel array; expected a 2-D image")
    return scaled
