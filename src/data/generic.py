"""The generic layouts: a table of paths and labels (``csv``) and a folder per class (``folder``).

csv: a header row; one path column (``path``, ``image``, ``file``, ``filename``, ``image_path`` or ``filepath``),
relative to the table's folder or absolute (a relative path written with Windows backslashes is read with slashes);
optional ``patient`` and ``split`` (train/val/test) columns; every other column is a label, except pandas' unnamed
index column (``Unnamed: 0``, from ``to_csv`` without ``index=False``). One label column: single-label, the classes
are its distinct values (``1`` and ``1.0`` are one class, as are ``NORMAL`` and ``normal``). Several label columns:
multi-label, each a 0/1 column named after its class; a column name written twice is refused. Without a patient
column each image is its own patient.

folder: ``root/<class>/*`` or ``root/{train,val,test}/<class>/*`` (files below a class folder, at any depth, are that
class); PNG, JPEG or DICOM by content, whatever the suffix. Missing splits are carved patient-wise by fraction.
"""
from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path

from medq.data.common import Intake, finish, make_splits, one_hot, read_table, register, subdirs
from medq.data.decode import MAX_MEGAPIXELS
from medq.data.index import METADATA, DatasetIndex, Sample
from medq.data.metadata import Demographics
from medq.errors import DataError

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}
PATH_COLUMNS = ("path", "image", "file", "filename", "image_path", "filepath")
PATIENT_COLUMNS = ("patient", "patient_id", "patientid", "subject")
TRUE, FALSE = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no", ""}
SEPARATORS = (";", "\t", "|")
PANDAS_INDEX = re.compile(r"^Unnamed: \d+$")  # pandas' header for a column without one (the index to_csv wrote)


# Binary tasks report sensitivity, AUC and thresholds for the second class: a class named as the absence of disease
# goes first, whatever the alphabet says ('cancer' before 'normal' made 'normal' the positive class).
NEGATIVE_NAMES = {"normal", "healthy", "negative", "benign", "nofinding", "nodisease", "control", "none", "absent"}


def binary_order(classes: list[str], notes: list[str]) -> list[str]:
    """Two classes with the negative one first (a note names the positive class); other class lists as given."""
    if len(classes) != 2:
        return classes
    negative = [c for c in classes if re.sub(r"[^a-z]", "", c.lower()) in NEGATIVE_NAMES]
    ordered = negative + [c for c in classes if c not in negative] if len(negative) == 1 else classes
    how = f"{ordered[0]!r} is the absence of it" if len(negative) == 1 else "the second in order"
    notes.append(f"positive class: {ordered[1]!r} ({how}); sensitivity, specificity, AUC and the operating threshold "
                 "are about it")
    return ordered


def _task(classes: list[str], multilabel: bool = False) -> str:
    return "multilabel" if multilabel else ("binary" if len(classes) == 2 else "multiclass")


def _sorted_values(values: set[str]) -> list[str]:
    """Class names in a stable order: numerically if they are all integers, else alphabetically."""
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


def label_key(value: str) -> str:
    """What makes two label cells one class: case aside (NORMAL, normal), and the number (1, 1.0, 01: a column a
    spreadsheet or pandas rewrote as floats in part)."""
    try:
        number = float(value)
    except ValueError:
        return value.lower()
    return repr(number) if math.isfinite(number) else value.lower()


def _label_classes(values: list[str]) -> tuple[list[str], dict[str, str], list[str]]:
    """(classes, :func:`label_key` → class, merged spellings): labels that differ only in case (NORMAL, normal) or
    spell one number (1, 1.0) are one class, spelled as most rows spell it."""
    counts: dict[str, dict[str, int]] = {}
    for value in values:
        if value:
            by_spelling = counts.setdefault(label_key(value), {})
            by_spelling[value] = by_spelling.get(value, 0) + 1
    spelling = {key: min(found, key=lambda v: (-found[v], v)) for key, found in counts.items()}
    merged = [" / ".join(sorted(found)) + f" → {spelling[key]}" for key, found in sorted(counts.items())
              if len(found) > 1]
    return _sorted_values(set(spelling.values())), spelling, merged


# --- a CSV table -----------------------------------------------------------------------------------------------

def _header(table: Path) -> list[str]:
    """The header row only (detection must not fail on a table whose body is damaged: reading it says why)."""
    try:
        with open(table, "rb") as fh:
            head = fh.read(65536)
    except OSError:
        return []
    utf16 = head.startswith((b"\xff\xfe", b"\xfe\xff"))  # still detected as a table: reading it says why
    text = head.decode("utf-16" if utf16 else "utf-8-sig", errors="replace")
    first = text.splitlines()[0] if text else ""
    try:
        row = next(csv.reader([first]), [])
    except csv.Error:
        return []
    if len(row) == 1:  # a table separated by ';' or tabs (a spreadsheet's locale): detected, then refused
        for separator in SEPARATORS:
            if separator in first:
                row = first.split(separator)
                break
    return [h.strip() for h in row]


def _pick(header: list[str], names: tuple[str, ...]) -> int | None:
    lowered = [h.lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    return None


def csv_table(root: Path) -> Path | None:
    """``root`` if it is a .csv file, or the one .csv in ``root`` whose header has a path column."""
    if root.is_file():
        return root if root.suffix.lower() == ".csv" else None
    if not root.is_dir():
        return None
    tables = [t for t in sorted(root.glob("*.csv")) if _pick(_header(t), PATH_COLUMNS) is not None]
    return tables[0] if len(tables) == 1 else None


def _detect_csv(root: Path) -> bool:
    return csv_table(root) is not None


@register("csv", _detect_csv)
def read_csv_table(root: Path, *, variant: str | None = None, val_split: str = "from-train",
                   val_fraction: float = 0.2, test_fraction: float = 0.2, strict: bool = False, seed: int = 42,
                   max_megapixels: float = MAX_MEGAPIXELS, copies: str = "error", conflicts: str = "error",
                   report: bool = False, metadata_columns: dict[str, str] | None = None,
                   **_: object) -> DatasetIndex:
    root = Path(root)
    table = csv_table(root)
    if table is None:
        candidates = sorted(root.glob("*.csv")) if root.is_dir() else []
        which = f" (found {', '.join(p.name for p in candidates)})" if candidates else ""
        raise DataError(f"{root}: no single CSV table with a path column{which}; set data.root to the .csv file "
                        f"(header: {PATH_COLUMNS[0]},label[,label...])")
    table_rows = read_table(table)  # the encoding is checked before the header is trusted
    header = [h.strip() for h in table_rows[0]] if table_rows else []
    if len(header) == 1:
        separator = next((sep for sep in SEPARATORS if sep in header[0]), None)
        if separator is not None:
            name = {";": "semicolons", "\t": "tabs", "|": "'|'"}[separator]
            raise DataError(f"{table}: the columns are separated by {name}, not commas (header {header[0]!r}); "
                            "save the table as comma-separated CSV (spreadsheet programs: 'CSV UTF-8 "
                            "(comma delimited)')")
    named = [h for h in header if h]
    twice = next((h for h in named if named.count(h) > 1), None)
    if twice is not None:  # two columns of one name: two classes of one name, or a label read from either
        columns = " and ".join(str(i + 1) for i, h in enumerate(header) if h == twice)
        raise DataError(f"{table}: column {twice!r} appears twice in the header (columns {columns}); rename or "
                        "remove one")
    i_path = _pick(header, PATH_COLUMNS)
    if i_path is None:
        raise DataError(f"{table}: no path column in the header; name it one of {', '.join(PATH_COLUMNS)}")
    i_patient, i_split = _pick(header, PATIENT_COLUMNS), _pick(header, ("split",))
    absent = [c for c in (metadata_columns or {}).values() if c not in header]
    if absent:
        raise DataError(f"{table}: no column {absent[0]!r} (data.metadata_columns); the header has "
                        f"{', '.join(h for h in header if h)} — fix the column name in the config")
    i_meta = [header.index(metadata_columns[a]) if a in (metadata_columns or {}) else None for a in METADATA]
    demographics = Demographics() if metadata_columns else None
    index_cols = [h for h in header if PANDAS_INDEX.match(h)]
    label_cols = [i for i, h in enumerate(header) if h and h not in index_cols
                  and i not in (i_path, i_patient, i_split, *i_meta)]
    if not label_cols:
        raise DataError(f"{table}: no label column; add one (class names) or several 0/1 columns (multi-label)")
    if variant is not None:
        raise DataError(f"{table}: the csv format has no variants; the label columns define the task")
    intake = Intake(strict, max_megapixels, copies, conflicts, report)
    rows = [(line, row) for line, row in enumerate(table_rows, start=1)
            if line > 1 and any(c.strip() for c in row)]
    multilabel = len(label_cols) > 1
    order_notes: list[str] = []
    if multilabel:
        classes = [header[i] for i in label_cols]
        _check_label_columns(table, header, label_cols, rows, (i_path, i_patient, i_split))
    else:
        classes, spelling, merged = _label_classes([row[label_cols[0]].strip() for _, row in rows
                                                    if len(row) > label_cols[0]])
        classes = binary_order(classes, order_notes)
        if len(classes) < 2:
            raise DataError(f"{table}: column {header[label_cols[0]]!r} holds {len(classes)} distinct label(s); "
                            "a classifier needs at least two")
    splits: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    blank_cells = backslashes = 0
    width = max([i_path, *label_cols] + [i for i in (i_patient, i_split) if i is not None]) + 1
    for line, row in rows:
        where = f"{table.name} line {line}"
        if len(row) < width:
            intake.skip(f"{table}:{line}", "row has too few columns", file_problem=False)
            continue
        cell = row[i_path].strip()
        path = Path(cell) if Path(cell).is_absolute() else table.parent / cell
        if "\\" in cell and os.sep == "/" and not path.exists():  # a table written on Windows: imgs\x.png
            path = table.parent / cell.replace("\\", "/")
            backslashes += 1
        if multilabel:
            cells = [row[i].strip().lower() for i in label_cols]
            bad = [header[i] for i, c in zip(label_cols, cells) if c not in TRUE | FALSE]
            if bad:
                intake.skip(path, f"{where}: column {bad[0]!r} is not 0 or 1", file_problem=False)
                continue
            label = tuple(1.0 if c in TRUE else 0.0 for c in cells)
            blank_cells += cells.count("")
        else:
            value = row[label_cols[0]].strip()
            if not value:
                intake.skip(path, f"{where}: empty label", file_problem=False)
                continue
            label = one_hot(classes.index(spelling[label_key(value)]), len(classes))
        split = "train"
        if i_split is not None:
            split = SPLIT_ALIASES.get(row[i_split].strip().lower(), "")
            if not split:
                intake.skip(path, f"{where}: split {row[i_split]!r} is not train, val or test", file_problem=False)
                continue
        if not path.is_file():
            intake.skip(path, f"{where}: file not found")
            continue
        if not intake.admit(path):
            continue
        patient = row[i_patient].strip() if i_patient is not None else ""
        metadata = demographics.of_row(row, i_meta) if demographics else ()
        splits[split].append(intake.sample(path, label, patient or f"file:{cell}", f"{where} ({cell})", metadata))
    notes = [f"table: {table.name}, " + (f"multi-label over columns {', '.join(classes)}" if multilabel
                                         else f"classes from column {header[label_cols[0]]!r}: {', '.join(classes)}"),
             "patients: " + (f"column {header[i_patient]!r}" if i_patient is not None
                             else "no patient column, so each image is its own patient"),
             "split: " + (f"column {header[i_split]!r}" if i_split is not None else "none in the table")]
    notes += order_notes
    if demographics:
        notes.append("patient metadata: " + ", ".join(f"{a} from column {c!r}" for a, c in metadata_columns.items()))
        notes += demographics.notes(table.name)
    if not multilabel and merged:
        notes.append(f"labels differing only in case, read as one class: {'; '.join(merged)}")
    if index_cols:
        notes.append(f"column(s) {', '.join(index_cols)} ignored: pandas' unnamed index column, not a label")
    if backslashes:
        notes.append(f"{backslashes} path(s) written with Windows backslashes, read with '/'")
    if blank_cells:
        notes.append(f"{blank_cells} blank label cell(s) read as 0 (finding absent); write 0 or 1 in every cell if "
                     "blank means something else")
    splits = make_splits(splits, val_split=val_split, val_fraction=val_fraction, test_fraction=test_fraction,
                         seed=seed, notes=notes, intake=intake, classes=classes)
    return finish("csv", _task(classes, multilabel), classes, splits, intake, notes, table)


def _check_label_columns(table: Path, header: list[str], label_cols: list[int], rows: list[tuple[int, list[str]]],
                         known: tuple[int | None, ...]) -> None:
    """Several label columns make a multi-label table of 0/1 columns; a column that is never 0/1 (class names, or
    metadata such as age) means the table was meant otherwise: say so, with the fix, instead of skipping every row."""
    not_binary = {}
    for i in label_cols:
        cells = [row[i].strip().lower() for _, row in rows if len(row) > i]
        odd = [c for c in cells if c not in TRUE | FALSE]
        if cells and len(odd) == len(cells):
            not_binary[header[i]] = sorted(set(odd))[:3]
    if not not_binary:
        return
    used = [header[i] for i in known if i is not None]
    shown = "; ".join(f"{name!r} holds {', '.join(repr(v) for v in values)}" for name, values in not_binary.items())
    raise DataError(f"{table}: every column besides {', '.join(repr(u) for u in used)} is read as a label, so "
                    f"{len(label_cols)} label columns make a multi-label table of 0/1 columns, but {shown}; for one "
                    "label per image keep a single label column (remove metadata columns such as age), for "
                    "multi-label write 0 or 1 in every label column")


# --- folder per class ------------------------------------------------------------------------------------------

def folder_splits(root: Path) -> dict[str, Path]:
    """{'train': ..., 'val': ..., 'test': ...} for the split folders present, or {'train': root} without them."""
    if not root.is_dir():
        return {}
    found = {SPLIT_ALIASES[d.name.lower()]: d for d in subdirs(root) if d.name.lower() in SPLIT_ALIASES}
    return found or {"train": root}


def _beside_splits(root: Path) -> list[str]:
    """The folders beside the split folders, which are not read (a note); a split given by two folders (val/ and
    validation/) is a DataError: reading one of them would leave the other's images out unsaid."""
    by_split: dict[str, list[str]] = {}
    others: list[str] = []
    for d in subdirs(root):
        split = SPLIT_ALIASES.get(d.name.lower())
        (by_split.setdefault(split, []) if split else others).append(d.name)
    for split, names in by_split.items():
        if len(names) > 1:
            raise DataError(f"{root}: {' and '.join(n + '/' for n in names)} are all the {split} split; merge them "
                            "into one folder")
    return others


def _has_file(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(e.is_file() and not e.name.startswith(".") for e in entries)


def _detect_folder(root: Path) -> bool:
    train = folder_splits(root).get("train")
    if train is None:
        return False
    return sum(1 for d in subdirs(train) if _has_file(d)) >= 2


@register("folder", _detect_folder)  # detected last: almost any tree matches
def read_folder(root: Path, *, variant: str | None = None, val_split: str = "from-train", val_fraction: float = 0.2,
                test_fraction: float = 0.2, strict: bool = False, seed: int = 42,
                max_megapixels: float = MAX_MEGAPIXELS, copies: str = "error", conflicts: str = "error",
                report: bool = False, **_: object) -> DatasetIndex:
    root = Path(root)
    if variant is not None:
        raise DataError(f"{root}: the folder layout has no variants; the class folders are the classes")
    layout = folder_splits(root)
    if "train" not in layout:
        raise DataError(f"{root}: expected class folders (root/<class>/*) or split folders with a train/ "
                        "(root/train/<class>/*)")
    unread = _beside_splits(root) if layout != {"train": root} else []
    # Class folders are matched across splits without regard to case (train/NORMAL and test/normal are one class,
    # spelled as in train): otherwise test images would get a class no training image has.
    spelling: dict[str, set[str]] = {}
    canonical: dict[str, str] = {}
    for split in sorted(layout, key=lambda k: k != "train"):
        for d in subdirs(layout[split]):
            spelling.setdefault(d.name.lower(), set()).add(d.name)
            canonical.setdefault(d.name.lower(), d.name)
    order_notes: list[str] = []
    classes = binary_order(sorted(canonical.values()), order_notes)
    if len(classes) < 2:
        raise DataError(f"{layout['train']}: found {len(classes)} class folder(s); a classifier needs at least two "
                        "(root/<class>/image files)")
    intake = Intake(strict, max_megapixels, copies, conflicts, report)
    splits: dict[str, list[Sample]] = {}
    for split, folder in layout.items():
        splits[split] = []
        for class_dir in subdirs(folder):
            label = one_hot(classes.index(canonical[class_dir.name.lower()]), len(classes))
            for path in intake.files(class_dir, recursive=True):
                if intake.admit(path):
                    splits[split].append(intake.sample(path, label, f"file:{path.relative_to(root)}"))
        for path in intake.files(folder):
            intake.skip(path, "not inside a class folder", file_problem=False)
    given = "none (class folders directly under the root)" if layout == {"train": root} else \
        ", ".join(s for s in ("train", "val", "test") if s in layout)
    merged = [" / ".join(sorted(names)) for names in spelling.values() if len(names) > 1]
    notes = [f"classes (folder names): {', '.join(classes)}", *order_notes, f"split folders: {given}",
             *([f"class folders differing only in case, read as one class: {'; '.join(merged)}"] if merged else []),
             *([f"folders beside the split folders, not read: {', '.join(n + '/' for n in unread)} (a split folder "
                "is named train, val or test)"] if unread else []),
             "patients: the folder layout does not identify them, so each image is its own patient "
             "(use format: csv with a patient column when several images share one)"]
    splits = make_splits(splits, val_split=val_split, val_fraction=val_fraction, test_fraction=test_fraction,
                         seed=seed, notes=notes, intake=intake, classes=classes)
    return finish("folder", _task(classes), classes, splits, intake, notes, layout["train"])
