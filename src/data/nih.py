"""NIH ChestX-ray14: ``Data_Entry_2017*.csv`` + ``images_*/images/*.png``, 14 labels in CheXNet's order.

- ``No Finding`` is the all-zero label vector; a label name outside the 14 (or ``No Finding`` mixed with findings)
  makes the row a listed skip rather than a silently wrong label. A name spelt otherwise only in case, spaces,
  hyphens or underscores (``Pleural Thickening``, ``effusion``, a re-typed or re-exported table) is that finding,
  with a note: skipping those rows would take every image of the finding out of training.
- An ``Image Index`` on several rows is handed to :func:`medq.data.duplicates.reconcile` like any file listed twice:
  with one label it is used once (a note), with two it is ``data.label_conflicts``' error (or drop-both), never
  the first row's label chosen silently.
- The official ``train_val_list.txt`` / ``test_list.txt`` (patient-disjoint) are used when present, validation carved
  patient-wise from train_val; without them the split is patient-wise by ``Patient ID``.
- Image files are found with one directory scan per ``images*`` folder (a name → path dict), so a 112,120-row table
  is indexed in seconds. Rows whose file is missing (e.g. only some of the 12 archives unpacked) are counted and
  listed as skips, not fatal unless nothing is left (or ``strict`` is set).
"""
from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

from medq.data.common import Intake, finish, make_splits, read_table, read_text, register, subdirs
from medq.data.decode import MAX_MEGAPIXELS
from medq.data.index import DatasetIndex, Sample
from medq.data.metadata import Demographics
from medq.errors import DataError

CHEXNET_CLASSES = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
]
NO_FINDING = "No Finding"
ENTRY_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
METADATA_COLUMNS = ("Patient Gender", "Patient Age", "View Position")  # → Sample.metadata (sex, age, view)
CSV_COLUMNS = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
               "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
TRAIN_VAL_LIST, TEST_LIST = "train_val_list.txt", "test_list.txt"
VARIANTS = (None, "14-label", "chexnet")


def entry_table(root: Path) -> Path | None:
    """Data_Entry_2017_v2020.csv if present (the corrected release), else Data_Entry_2017.csv (or any variant)."""
    if not root.is_dir():
        return None
    tables = sorted(root.glob("Data_Entry_2017*.csv"))
    if not tables:
        return None
    newest = [t for t in tables if "v2020" in t.name.lower()]
    return (newest or tables)[0]


def _detect_nih(root: Path) -> bool:
    return entry_table(root) is not None


def image_files(root: Path) -> tuple[dict[str, str], int]:
    """name → path of every file in ``root/images*/images/`` (or ``root/images*/``): one scan per folder.

    Returns (the dict, how many names occurred in more than one folder — the first is kept)."""
    names: dict[str, str] = {}
    duplicates = 0
    for folder in subdirs(root):
        if not folder.name.lower().startswith("images"):
            continue
        inner = folder / "images"
        scan = inner if inner.is_dir() else folder
        with os.scandir(scan) as entries:
            for entry in entries:
                if entry.name.startswith("._") or not entry.name.lower().endswith(".png"):
                    continue
                if entry.name in names:
                    duplicates += 1
                else:
                    names[entry.name] = entry.path
    return names, duplicates


def _spelling(name: str) -> str:
    return re.sub(r"[\s_-]+", " ", name).strip().lower()


CANONICAL = {_spelling(n): n for n in [*CHEXNET_CLASSES, NO_FINDING]}


def label_vector(text: str, cache: dict[str, tuple[float, ...] | str]) -> tuple[float, ...] | str:
    """'Cardiomegaly|Effusion' → multi-hot in CheXNet order; 'No Finding' → zeros; a str is the reason to skip."""
    if text in cache:
        return cache[text]
    names = [CANONICAL.get(_spelling(t), t.strip()) for t in text.split("|") if t.strip()]
    if not names:
        result: tuple[float, ...] | str = "empty Finding Labels"
    elif NO_FINDING in names:
        result = (0.0,) * len(CHEXNET_CLASSES) if names == [NO_FINDING] else \
            f"'{NO_FINDING}' together with findings ({text})"
    else:
        unknown = [n for n in names if n not in CHEXNET_CLASSES]
        result = f"unknown finding {unknown[0]!r}" if unknown else \
            tuple(1.0 if c in names else 0.0 for c in CHEXNET_CLASSES)
    cache[text] = result
    return result


def _read_list(path: Path) -> dict[str, int]:
    """Image name → its line in an official list file."""
    return {text.strip(): line for line, text in enumerate(read_text(path).splitlines(), start=1) if text.strip()}


@register("nih-chestxray14", _detect_nih)
def read_nih_chestxray14(root: Path, *, variant: str | None = None, val_split: str = "from-train",
                         val_fraction: float = 0.2, test_fraction: float = 0.2, strict: bool = False,
                         seed: int = 42, max_megapixels: float = MAX_MEGAPIXELS, copies: str = "error",
                         conflicts: str = "error", report: bool = False, **_: object) -> DatasetIndex:
    root = Path(root)
    table = entry_table(root)
    if table is None:
        raise DataError(f"{root}: no Data_Entry_2017*.csv; point data.root at the folder holding it and images_*/")
    if variant not in VARIANTS:
        raise DataError(f"{root}: nih-chestxray14 has no variant {variant!r}; it is the 14-label task")
    files, duplicate_files = image_files(root)
    intake = Intake(strict, max_megapixels, copies, conflicts, report)
    cache: dict[str, tuple[float, ...] | str] = {}
    samples: list[tuple[str, Sample]] = []  # every row's listing, repeats included: reconcile judges them
    missing = 0
    listed: set[str] = set()
    rows = iter(read_table(table))
    header = [h.strip() for h in next(rows, [])]
    columns = {h: i for i, h in enumerate(header) if h}
    absent = [c for c in ENTRY_COLUMNS if c not in columns]
    if absent:
        raise DataError(f"{table}: no column {absent[0]!r} in the header; expected the NIH Data_Entry columns "
                        f"({', '.join(ENTRY_COLUMNS)}, ...)")
    i_name, i_labels, i_patient = (columns[c] for c in ENTRY_COLUMNS)
    width = max(i_name, i_labels, i_patient) + 1
    i_meta = [columns.get(c) for c in METADATA_COLUMNS]
    demographics = Demographics() if any(i is not None for i in i_meta) else None
    for line, row in enumerate(rows, start=2):
        if len(row) < width:
            if any(cell.strip() for cell in row):
                intake.skip(f"{table}:{line}", "row has too few columns", file_problem=False)
            continue
        name = row[i_name].strip()
        listed.add(name)
        label = label_vector(row[i_labels], cache)
        if isinstance(label, str):
            intake.skip(name, label, file_problem=False)
            continue
        path = files.get(name)
        if path is None:
            missing += 1
            intake.skip(name, "listed in the table but no such file in images_*/images/")
            continue
        patient = row[i_patient].strip().lstrip("0") or name.split("_")[0].lstrip("0") or "0"
        metadata = demographics.of_row(row, i_meta) if demographics else ()
        samples.append((name, intake.sample(path, label, patient, f"{table.name} line {line} ({name})", metadata)))
    admitted: dict[str, bool] = {}  # the header check, once per file: ~20 µs a file
    for _, sample in samples:
        if sample.path not in admitted:
            admitted[sample.path] = intake.admit(sample.path)
    checked = [(name, sample) for name, sample in samples if admitted[sample.path]]
    notes = [f"labels: {table.name}, {len(CHEXNET_CLASSES)} findings in CheXNet order; '{NO_FINDING}' = all zero"]
    respelled = sorted({t.strip() for text in cache for t in text.split("|")
                        if t.strip() and t.strip() not in CANONICAL.values() and _spelling(t) in CANONICAL})
    if respelled:
        notes.append("finding names spelt otherwise, read as CheXNet's: "
                     + ", ".join(f"{t!r} → {CANONICAL[_spelling(t)]!r}" for t in respelled))
    if missing:
        notes.append(f"missing image files: {missing} of the table's rows have no file (unpack every images_*.tar.gz "
                     "to use them); listed in skipped")
    notes += demographics.notes(table.name) if demographics else [
        f"{table.name} has none of the columns {', '.join(METADATA_COLUMNS)}: no patient metadata"]
    if duplicate_files:
        notes.append(f"{duplicate_files} image names occur in two images_* folders; the first copy is used")
    unlisted = len(set(files) - listed)
    if unlisted:
        notes.append(f"{unlisted} PNG files are not in {table.name} and are unused")
    splits: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    lists = root / TRAIN_VAL_LIST, root / TEST_LIST
    if all(p.is_file() for p in lists):
        train_val, test = (_read_list(p) for p in lists)
        neither = 0
        for name, sample in checked:  # a name in both lists goes to both: reconcile refuses the leak
            for split, lines, file in (("train", train_val, TRAIN_VAL_LIST), ("test", test, TEST_LIST)):
                if name in lines:
                    splits[split].append(replace(sample, source=f"{file} line {lines[name]} ({name})"))
            neither += name not in train_val and name not in test
        unlisted_names = len((set(train_val) | set(test)) - listed)  # e.g. a table cut down, or another release's
        notes.append(f"split: the official {TRAIN_VAL_LIST} / {TEST_LIST}"
                     + (f"; {neither} images in neither list are unused" if neither else "")
                     + (f"; {unlisted_names} names in the lists have no row in {table.name}" if unlisted_names else ""))
        if val_split == "official":
            notes.append("the official lists have no validation split: it is carved from train_val")
    else:
        splits["train"] = [sample for _, sample in checked]
        notes.append(f"split: patient-wise by Patient ID ({TRAIN_VAL_LIST} / {TEST_LIST} not found)")
    splits = make_splits(splits, val_split="from-train", val_fraction=val_fraction, test_fraction=test_fraction,
                         seed=seed, notes=notes, intake=intake, classes=CHEXNET_CLASSES)
    return finish("nih-chestxray14", "multilabel", list(CHEXNET_CLASSES), splits, intake, notes, table)
