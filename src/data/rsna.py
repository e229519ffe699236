"""RSNA Pneumonia Detection Challenge: ``stage_2_detailed_class_info.csv`` + ``stage_2_train_images/*.dcm``.

Three classes ("Lung Opacity", "Normal", "No Lung Opacity / Not Normal"), or with variant 'binary' lung opacity or
not. The class table has one row per box, so a patient with two boxes has two identical rows: they collapse to one
image and one class; a patient with two *different* classes is a listed skip. When ``stage_2_train_labels.csv`` is
there its Target (1 = opacity) is cross-checked against the class. The layout has no test split: train/val/test are
carved patient-wise with data.test_fraction and data.val_fraction.
"""
from __future__ import annotations

import os
from pathlib import Path

from medq.data.common import Intake, finish, make_splits, one_hot, read_table, register
from medq.data.decode import MAX_MEGAPIXELS
from medq.data.headers import HeaderCache
from medq.data.index import DatasetIndex, Sample
from medq.data.metadata import Demographics
from medq.errors import DataError

RSNA_CLASSES = ["Lung Opacity", "Normal", "No Lung Opacity / Not Normal"]
BINARY_CLASSES = ["No Lung Opacity", "Lung Opacity"]
OPACITY = "Lung Opacity"
HEADER_TAGS = ("PatientSex", "PatientAge", "ViewPosition")  # → Sample.metadata (sex, age, view)


def rsna_files(root: Path) -> tuple[Path, Path, Path | None] | None:
    """(class table, image folder, box table or None) of the newest stage present, or None."""
    if not root.is_dir():
        return None
    tables = sorted(root.glob("stage_*_detailed_class_info.csv"))
    if not tables:
        return None
    table = tables[-1]
    stage = table.name.split("_detailed_class_info")[0]  # 'stage_2'
    images = root / f"{stage}_train_images"
    if not images.is_dir():
        found = sorted(p for p in root.glob("stage_*_train_images") if p.is_dir())
        images = found[-1] if found else images
    labels = root / f"{stage}_train_labels.csv"
    return table, images, labels if labels.is_file() else None


def _detect_rsna(root: Path) -> bool:
    return rsna_files(root) is not None


def _rows(table: Path, columns: tuple[str, ...]):
    rows = read_table(table)
    fields = [f.strip() for f in rows[0]] if rows else []
    absent = [c for c in columns if c not in fields]
    if absent:
        raise DataError(f"{table}: no column {absent[0]!r}; expected {', '.join(columns)} as in the RSNA download")
    where = {c: fields.index(c) for c in columns}
    for line, row in enumerate(rows[1:], start=2):
        if any(cell.strip() for cell in row):
            yield line, {c: (row[i] if i < len(row) else "").strip() for c, i in where.items()}


def _targets(labels: Path | None) -> dict[str, set[str]]:
    targets: dict[str, set[str]] = {}
    if labels is not None:
        for _, row in _rows(labels, ("patientId", "Target")):
            targets.setdefault(row["patientId"], set()).add(row["Target"])
    return targets


@register("rsna-pneumonia", _detect_rsna)
def read_rsna_pneumonia(root: Path, *, variant: str | None = None, val_split: str = "from-train",
                        val_fraction: float = 0.2, test_fraction: float = 0.2, strict: bool = False,
                        seed: int = 42, max_megapixels: float = MAX_MEGAPIXELS, copies: str = "error",
                        conflicts: str = "error", report: bool = False, cache_root: Path | None = None,
                        **_: object) -> DatasetIndex:
    """``cache_root``: the data cache's folder, where the DICOM header values are kept (medq.data.headers); None
    reads every header from its file."""
    root = Path(root)
    found = rsna_files(root)
    if found is None:
        raise DataError(f"{root}: no stage_2_detailed_class_info.csv; point data.root at the unpacked RSNA "
                        "challenge folder (with stage_2_train_images/)")
    table, images, labels = found
    if variant not in (None, "3-class", "binary"):
        raise DataError(f"{root}: rsna-pneumonia has no variant {variant!r}; use '3-class' (default) or 'binary'")
    if not images.is_dir():
        raise DataError(f"{images}: missing; the RSNA layout keeps the DICOM files in stage_2_train_images/")
    binary = variant == "binary"
    classes = BINARY_CLASSES if binary else RSNA_CLASSES
    intake = Intake(strict, max_megapixels, copies, conflicts, report)
    by_patient: dict[str, list[str]] = {}
    rows = 0
    for _, row in _rows(table, ("patientId", "class")):
        rows += 1
        if row["patientId"]:
            by_patient.setdefault(row["patientId"], []).append(row["class"])
    targets = _targets(labels)
    with os.scandir(images) as entries:
        files = {Path(e.name).stem: e.path for e in entries
                 if e.name.lower().endswith(".dcm") and not e.name.startswith("._")}
    samples: list[Sample] = []
    demographics = Demographics()
    headers = HeaderCache(cache_root, images, HEADER_TAGS)
    for patient in sorted(by_patient):
        names = set(by_patient[patient])
        unknown = names - set(RSNA_CLASSES)
        if unknown:
            intake.skip(patient, f"unknown class {sorted(unknown)[0]!r} in {table.name}", file_problem=False)
            continue
        if len(names) > 1:
            intake.skip(patient, f"conflicting classes in {table.name}: {', '.join(sorted(names))}",
                        file_problem=False)
            continue
        (name,) = names
        target = targets.get(patient)
        if target is not None and target != {"1" if name == OPACITY else "0"}:
            intake.skip(patient, f"{labels.name} Target {'/'.join(sorted(target))} contradicts class {name!r}",
                        file_problem=False)
            continue
        path = files.get(patient)
        if path is None:
            intake.skip(images / f"{patient}.dcm", f"listed in {table.name} but the file is missing")
            continue
        if not intake.admit(path):
            continue
        index = int(name == OPACITY) if binary else RSNA_CLASSES.index(name)
        header = headers.values(intake.real_path(path))
        samples.append(intake.sample(path, one_hot(index, len(classes)), patient,
                                     metadata=demographics(*(header[t] for t in HEADER_TAGS))))
    headers.save()
    notes = [f"labels: {table.name}: {rows} rows for {len(by_patient)} patients, duplicate rows collapsed"
             + ("; cross-checked with " + labels.name if labels else ""),
             f"classes: {', '.join(classes)}"]
    notes += demographics.notes(f"the DICOM headers ({', '.join(HEADER_TAGS)})") + [headers.summary()]
    unused = len(set(files) - set(by_patient))
    if unused:
        notes.append(f"{unused} DICOM files have no row in {table.name} and are unused")
    splits = make_splits({"train": samples}, val_split=val_split, val_fraction=val_fraction,
                         test_fraction=test_fraction, seed=seed, notes=notes, intake=intake, classes=classes)
    return finish("rsna-pneumonia", "binary" if binary else "multiclass", list(classes), splits, intake, notes, table)
