"""Breast ultrasound, BUSI layout: ``Dataset_BUSI_with_GT/{benign,malignant,normal}/benign (1).png``.

The ``*_mask.png`` / ``*_mask_1.png`` files are segmentation masks, not images, and are never read as samples; so are
their copies a file manager or browser makes (``*_mask (1).png``, ``*_mask copy.png``).
Default task: benign vs malignant (the ``normal`` images are left out, and the notes say so); variant '3-class' adds
normal. BUSI does not say which images share a patient, so each image is its own patient; the layout has no split,
so train/val/test are carved with data.test_fraction and data.val_fraction (stratified by class).
"""
from __future__ import annotations

import re
from pathlib import Path

from medq.data.common import Intake, child_dir, child_dirs, finish, make_splits, one_hot, register
from medq.data.decode import MAX_MEGAPIXELS
from medq.data.index import DatasetIndex, Sample
from medq.errors import DataError

BUSI_FOLDER = "Dataset_BUSI_with_GT"
BINARY_CLASSES = ["benign", "malignant"]
THREE_CLASSES = ["benign", "malignant", "normal"]
MASK = re.compile(r"_mask(?![a-z])", re.IGNORECASE)  # _mask, _mask_1, _mask (1), _mask copy; not _masked


def is_mask(path: Path) -> bool:
    return bool(MASK.search(path.stem))


def masked_image(mask: Path) -> str:
    """The stem of the image a mask belongs to: 'benign (1)' for 'benign (1)_mask_2.png'."""
    return MASK.split(mask.stem)[0]


def busi_root(root: Path) -> Path | None:
    for candidate in (root, root / BUSI_FOLDER):
        if child_dir(candidate, "benign") and child_dir(candidate, "malignant"):
            return candidate
    return None


def _detect_busi(root: Path) -> bool:
    return busi_root(root) is not None


@register("busi", _detect_busi)
def read_busi(root: Path, *, variant: str | None = None, val_split: str = "from-train", val_fraction: float = 0.2,
              test_fraction: float = 0.2, strict: bool = False, seed: int = 42,
              max_megapixels: float = MAX_MEGAPIXELS, copies: str = "error", conflicts: str = "error",
              report: bool = False, **_: object) -> DatasetIndex:
    root = Path(root)
    base = busi_root(root)
    if base is None:
        raise DataError(f"{root}: not a BUSI folder (expected benign/ and malignant/, as in {BUSI_FOLDER}); "
                        "point data.root at the unpacked folder")
    if variant not in (None, "binary", "3-class"):
        raise DataError(f"{root}: busi has no variant {variant!r}; use 'binary' (default) or '3-class'")
    classes = THREE_CLASSES if variant == "3-class" else BINARY_CLASSES
    intake = Intake(strict, max_megapixels, copies, conflicts, report)
    notes = [f"classes: {', '.join(classes)}"]
    samples: list[Sample] = []
    masks = unmasked = 0
    for name in THREE_CLASSES:
        folders = child_dirs(base, name)
        if not folders:
            if name in classes:
                raise DataError(f"{base / name}: missing; the BUSI layout has benign/, malignant/ and normal/")
            continue
        if len(folders) > 1:
            notes.append(f"class folders differing only in case, read as one class {name}: "
                         + " / ".join(f.name for f in folders))
        files = [f for folder in folders for f in intake.files(folder)]
        images = [f for f in files if not is_mask(f)]
        masked = {masked_image(f) for f in files if is_mask(f)}
        masks += len(files) - len(images)
        if name not in classes:
            notes.append(f"left out {len(images)} '{name}' images (binary benign/malignant task; "
                         "data.variant: 3-class keeps them)")
            continue
        unmasked += sum(1 for f in images if f.stem not in masked)
        for path in images:
            if intake.admit(path):
                samples.append(intake.sample(path, one_hot(classes.index(name), len(classes)), f"{name}/{path.stem}"))
    notes.append(f"ignored {masks} segmentation masks (*_mask*.png)"
                 + (f"; {unmasked} images have no mask" if unmasked else ""))
    notes.append("patients: BUSI does not identify them, so each image is its own patient")
    splits = make_splits({"train": samples}, val_split=val_split, val_fraction=val_fraction,
                         test_fraction=test_fraction, seed=seed, notes=notes, intake=intake, classes=classes)
    return finish("busi", "multiclass" if len(classes) > 2 else "binary", list(classes), splits, intake, notes, base)
