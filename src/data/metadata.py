"""Patient metadata as the readers find it (NIH's CSV columns, RSNA's DICOM header) → one normalised tuple per image.

``Sample.metadata`` is ``(sex, age, view)`` (medq.data.index.METADATA): sex 'M' / 'F' / 'O', age in years as a number
string ('58', '0.5'), view 'PA' / 'AP' / 'LL' … (upper case) — or 'unknown' where the row has nothing usable. An age
outside 0–120 years (NIH has data-entry errors such as 411) is never banded: it becomes 'unknown' and is counted in
the reader's notes. Equal tuples are one object, so 112k NIH rows share a few hundred tuples.
"""
from __future__ import annotations

import re
import sys

UNKNOWN = "unknown"
MAX_AGE = 120.0  # years; above it an age is a data-entry error
SEXES = {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F", "OTHER": "O"}  # DICOM PatientSex: M, F, O
# DICOM Age String (PS3.5 6.2): nnnD, nnnW, nnnM or nnnY; the RSNA challenge files hold plain numbers instead
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([DWMY]?)\s*$", re.IGNORECASE)
_YEARS_PER = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}
NO_METADATA = "this dataset has no patient metadata (sex, age, view): no subgroup analysis is possible"
KAGGLE_NOTE = ("the Kaggle pneumonia set's description says every film is an anterior-posterior chest X-ray of a "
               "child aged 1-5 (Guangzhou Women and Children's Medical Center): results do not transfer to adults")


def age_years(text: str) -> float | None:
    """'058Y' → 58, '006M' → 0.5, '58' → 58; None when it is no age (empty, unparseable)."""
    match = _AGE.match(str(text or ""))
    if not match:
        return None
    return float(match.group(1)) * _YEARS_PER[match.group(2).upper()]


class Demographics:
    """Normalises each image's (sex, age, view) and counts what it could not use, for the reader's notes."""

    def __init__(self) -> None:
        self.out_of_range: dict[str, int] = {}  # the age as written → how many rows
        self.missing = {"sex": 0, "age": 0, "view": 0}
        self._ages: dict[str, str] = {}
        self._seen: dict[tuple[str, str, str], tuple[str, str, str]] = {}

    def __call__(self, sex: str, age: str, view: str) -> tuple[str, str, str]:
        found = self._sex(sex), self._age(age), self._view(view)
        return self._seen.setdefault(found, found)  # a few hundred distinct tuples, shared by every image

    def of_row(self, row: list[str], columns: list[int | None]) -> tuple[str, str, str]:
        """From a table row: ``columns`` are the indices of sex, age and view (None: the table has no such column)."""
        return self(*(row[i] if i is not None and i < len(row) else "" for i in columns))

    def _sex(self, text: str) -> str:
        value = SEXES.get(str(text or "").strip().upper())
        if value is None:
            self.missing["sex"] += 1
            return UNKNOWN
        return value

    def _view(self, text: str) -> str:
        value = str(text or "").strip().upper()
        if not value:
            self.missing["view"] += 1
            return UNKNOWN
        return sys.intern(value)

    def _age(self, text: str) -> str:
        text = str(text or "").strip()
        if text not in self._ages:
            years = age_years(text)
            self._ages[text] = UNKNOWN if years is None or not 0.0 <= years <= MAX_AGE else sys.intern(f"{years:.4g}")
        value = self._ages[text]
        if value == UNKNOWN:
            if text and age_years(text) is not None:
                self.out_of_range[text] = self.out_of_range.get(text, 0) + 1
            else:
                self.missing["age"] += 1
        return value

    def notes(self, source: str) -> list[str]:
        out = [f"patient metadata (sex, age, view) from {source}: subgroups can be reported (medq.subgroups)"]
        if self.out_of_range:
            shown = ", ".join(sorted(self.out_of_range, key=lambda a: -self.out_of_range[a])[:5])
            out.append(f"{sum(self.out_of_range.values())} images have an age outside 0-{MAX_AGE:g} years in {source} "
                       f"(data-entry errors: {shown}); their age is 'unknown', never banded")
        missing = [f"{n} without {what}" for what, n in self.missing.items() if n]
        if missing:
            out.append(f"patient metadata of {source}: " + ", ".join(missing) + " (shown as 'unknown')")
        return out
