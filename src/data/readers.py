"""Readers for the dataset layouts users bring (../shared/DATASETS.md), selected by ``data.format`` or detected.

A reader turns a folder into a :class:`DatasetIndex`: every usable image with its label vector and patient, split
train/val/test with no patient in two splits, and the files it skipped with the reason. Each reader has the signature
``fn(root, *, variant, val_split, val_fraction, test_fraction, strict, seed, **_) -> DatasetIndex``.

| format | module | layout |
|---|---|---|
| kaggle-pneumonia | here | chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}/*.jpeg |
| nih-chestxray14 | medq.data.nih | Data_Entry_2017*.csv + images_*/images/*.png (+ train_val_list.txt, test_list.txt) |
| rsna-pneumonia | medq.data.rsna | stage_2_detailed_class_info.csv + stage_2_train_images/*.dcm |
| busi | medq.data.busi | Dataset_BUSI_with_GT/{benign,malignant,normal}/*.png (+ *_mask*.png) |
| csv | medq.data.generic | a table path,label[,label...] (+ optional patient, split columns) |
| folder | medq.data.generic | root/[train|val|test/]<class>/* |

Detection (``data.format: auto``) tries DETECTORS in that order; the generic folder layout comes last.
"""
from __future__ import annotations

import re
from pathlib import Path

from medq.data.common import (  # noqa: F401 - the public names of medq.data.readers
    DETECTORS, READERS, SPLITS, Intake, child_dir, child_dirs, class_warnings, finish, is_junk, make_splits, one_hot,
    patient_split, register,
)
from medq.data.decode import MAX_MEGAPIXELS
from medq.data.index import DatasetIndex, Sample
from medq.errors import DataError

# --- Kaggle "Chest X-Ray Images (Pneumonia)" -------------------------------------------------------------------

KAGGLE_SPLITS = ("train", "val", "test")
KAGGLE_VARIANTS = {None: False, "binary": False, "3-class": True, "3class": True, "cause": True}
_KAGGLE_PATIENT = [
    re.compile(r"^(person\d+)_(bacteria|virus)_\d+", re.IGNORECASE),
    re.compile(r"^NORMAL2-IM-(\d+)-\d+", re.IGNORECASE),
    re.compile(r"^IM-(\d+)-\d+", re.IGNORECASE),
]


def kaggle_patient_and_cause(name: str) -> tuple[str, str]:
    """'person1_bacteria_1.jpeg' → ('person1', 'bacteria'); 'NORMAL2-IM-1427-0001.jpeg' → ('normal2-1427', 'normal')."""
    stem = Path(name).stem
    m = _KAGGLE_PATIENT[0].match(stem)
    if m:
        return m.group(1).lower(), m.group(2).lower()
    m = _KAGGLE_PATIENT[1].match(stem)
    if m:
        return f"normal2-{int(m.group(1))}", "normal"
    m = _KAGGLE_PATIENT[2].match(stem)
    if m:
        return f"im-{int(m.group(1))}", "normal"
    return f"file:{stem}", "unknown"


def _kaggle_root(root: Path) -> Path:
    """The folder holding train/ and test/: ``root`` itself, or ``root/chest_xray`` (the archive's outer folder), or
    the nested duplicate ``chest_xray/chest_xray`` only when nothing else is there."""
    for candidate in (root, root / "chest_xray", root / "chest_xray" / "chest_xray"):
        if child_dir(candidate, "train") and child_dir(candidate, "test"):
            return candidate
    raise DataError(f"{root}: not a Kaggle pneumonia folder (expected train/ and test/ with NORMAL/ and PNEUMONIA/); "
                    "point data.root at the unpacked chest_xray folder")


def _detect_kaggle(root: Path) -> bool:
    try:
        train = child_dir(_kaggle_root(root), "train")
    except (DataError, OSError):
        return False
    return bool(child_dir(train, "NORMAL") and child_dir(train, "PNEUMONIA"))


@register("kaggle-pneumonia", _detect_kaggle)
def read_kaggle_pneumonia(root: Path, *, variant: str | None = None, val_split: str = "from-train",
                          val_fraction: float = 0.2, test_fraction: float = 0.2, strict: bool = False,
                          seed: int = 42, max_megapixels: float = MAX_MEGAPIXELS, copies: str = "error",
                          conflicts: str = "error", report: bool = False, **_: object) -> DatasetIndex:
    """Binary NORMAL/PNEUMONIA, or with variant '3-class' NORMAL/BACTERIA/VIRUS from the file names."""
    base = _kaggle_root(Path(root))
    if variant not in KAGGLE_VARIANTS:
        raise DataError(f"{root}: kaggle-pneumonia has no variant {variant!r}; use 'binary' or '3-class'")
    three_class = KAGGLE_VARIANTS[variant]
    classes = ["NORMAL", "BACTERIA", "VIRUS"] if three_class else ["NORMAL", "PNEUMONIA"]
    intake = Intake(strict, max_megapixels, copies, conflicts, report)
    notes = [f"classes: {', '.join(classes)}" + (" (the cause is read from the file names)" if three_class else "")]
    if base.name == "chest_xray" and (base / "chest_xray").is_dir():
        notes.append(f"ignored the archive's nested duplicate {base / 'chest_xray'}")
    splits: dict[str, list[Sample]] = {}
    for split in KAGGLE_SPLITS:
        split_dir = child_dir(base, split)
        splits[split] = []
        if split_dir is None:
            continue
        for folder in ("NORMAL", "PNEUMONIA"):
            class_dirs = child_dirs(split_dir, folder)
            if not class_dirs:
                raise DataError(f"{split_dir / folder}: missing; each split of the Kaggle layout has NORMAL/ and "
                                "PNEUMONIA/")
            if len(class_dirs) > 1:
                notes.append(f"class folders differing only in case, read as one class {folder}: "
                             + " / ".join(str(d.relative_to(base)) for d in class_dirs))
            for path in (p for class_dir in class_dirs for p in intake.files(class_dir)):
                if not intake.admit(path):
                    continue
                patient, cause = kaggle_patient_and_cause(path.name)
                if not three_class:
                    label_index = 0 if folder == "NORMAL" else 1
                elif folder == "NORMAL":
                    label_index = 0
                elif cause in ("bacteria", "virus"):
                    label_index = 1 if cause == "bacteria" else 2
                else:
                    intake.skip(path, "pneumonia file name names no cause (bacteria/virus)", file_problem=False)
                    continue
                splits[split].append(intake.sample(path, one_hot(label_index, len(classes)), patient))
    if not splits["test"]:
        raise DataError(f"{base}: the Kaggle layout has a test/ split; it is missing or empty")
    splits = make_splits(splits, val_split=val_split, val_fraction=val_fraction, test_fraction=test_fraction,
                         seed=seed, notes=notes, intake=intake, classes=classes)
    return finish("kaggle-pneumonia", "multiclass" if three_class else "binary", classes, splits, intake, notes,
                  base / "train")


# --- dispatch ---------------------------------------------------------------------------------------------------

# The other layouts register themselves on import.
from medq.data import nih, rsna, busi, generic  # noqa: E402,F401

DETECTION_ORDER = ("kaggle-pneumonia", "nih-chestxray14", "rsna-pneumonia", "busi")
GENERIC = ("csv", "folder")  # they match almost any tree: tried after every specific layout, in this order


def _detection_rank(entry: tuple[str, object]) -> tuple[int, int]:
    name = entry[0]
    if name in GENERIC:
        return 2, GENERIC.index(name)
    return (0, DETECTION_ORDER.index(name)) if name in DETECTION_ORDER else (1, 0)


def format_names() -> tuple[str, ...]:
    """The values ``data.format`` (and ``medq data check --format``) accepts: ``auto`` and every registered reader."""
    return ("auto", *READERS)


def detect_format(root: Path) -> str:
    """The first layout whose detector recognises ``root`` (specific layouts first, generic ones last)."""
    DETECTORS.sort(key=_detection_rank)  # stable: layouts registered later keep their order among themselves
    for name, detect in DETECTORS:
        try:
            if detect(root):
                return name
        except OSError:
            continue
    raise DataError(f"{root}: could not tell the dataset layout; set data.format to one of {', '.join(sorted(READERS))}")


def _metadata_columns(data_config, name: str) -> dict[str, dict[str, str]]:
    """data.metadata_columns for the csv reader; any other layout reads its own metadata, so setting it is an error."""
    columns = dict(getattr(data_config, "metadata_columns", None) or {})
    if columns and name != "csv":
        raise DataError(f"data.metadata_columns: only csv tables take it; the {name} reader reads the patient "
                        "metadata its layout has on its own — remove the setting")
    return {"metadata_columns": columns} if columns else {}


def read_dataset(data_config, seed: int = 42, *, report: bool = False, cache_root: Path | None = None
                 ) -> DatasetIndex:
    """Read ``data.root`` with the configured (or detected) reader; notes say what was detected and decided.
    ``report`` (`medq data check`): problems that would stop a run are listed in ``index.errors`` instead of raised.
    ``cache_root`` (:func:`medq.data.cache.cache_root`): where a reader keeps what it reads slowly (RSNA's DICOM
    header values, medq.data.headers); None: nothing is kept.
    """
    root = Path(data_config.root)
    if not root.exists():
        raise DataError(f"{root}: dataset folder not found; set data.root (or DATA_DIR) to your dataset, or run "
                        "`medq data` (add --phantoms outside the built-in location) to generate the phantoms")
    name = data_config.format
    if name == "auto":
        name = detect_format(root)
    if name not in READERS:
        raise DataError(f"data.format {name!r} has no reader; use one of {', '.join(sorted(READERS))}")
    try:
        index = READERS[name](root, variant=data_config.variant, val_split=data_config.val_split,
                              val_fraction=data_config.val_fraction, test_fraction=data_config.test_fraction,
                              strict=data_config.strict, seed=seed, max_megapixels=data_config.max_megapixels,
                              copies=data_config.cross_split_copies, conflicts=data_config.label_conflicts,
                              report=report, cache_root=cache_root, **_metadata_columns(data_config, name))
    except OSError as exc:  # a folder the readers scan cannot be listed (permissions, a vanished mount)
        raise DataError(f"{exc.filename or root}: cannot be read ({exc.strerror or exc}); check that the dataset "
                        "folder is readable by this user") from None
    if data_config.format == "auto":
        index.notes.insert(0, f"detected format: {name} (set data.format to override)")
    shared = {pair: n for pair, n in index.patient_overlap().items() if n}
    if shared:
        index.notes.append("patients in two splits (from the dataset's own split files): "
                           + ", ".join(f"{pair}: {n}" for pair, n in shared.items()))
    return index


DETECTORS.sort(key=_detection_rank)
