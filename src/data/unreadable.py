"""What every decoder (medq.data.decode, medq.data.dicom) refuses, in one module both import: the error an
unreadable file raises and the pixel limit a header is held to."""
from __future__ import annotations

from medq.errors import DataError


class UnreadableImage(DataError):
    """A file that cannot be decoded as an image; readers list it as a skip, or raise it under strict mode."""


def pixel_problem(size: tuple[int, int] | None, max_megapixels: float) -> str | None:
    """medq's own refusal of an image whose header claims more pixels than ``data.max_megapixels``."""
    if size is None:
        return None
    width, height = size
    megapixels = width * height / 1e6
    if megapixels <= max_megapixels:
        return None
    return (f"{width}×{height} pixels ({megapixels:,.0f} megapixels) is above data.max_megapixels "
            f"({max_megapixels:g}); refused unread (a decompression bomb would exhaust memory) — raise "
            "data.max_megapixels if the image is real")
