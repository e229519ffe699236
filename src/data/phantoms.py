"""The built-in phantom datasets, each written in the real layout of its kind and read back by that layout's reader.

| kind | layout (reader) | module |
|---|---|---|
| chest-pneumonia | Kaggle chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg (kaggle-pneumonia) | here |
| chest-multilabel | NIH Data_Entry_2017.csv + images_00N/images/*.png + split lists (nih-chestxray14) | phantoms_nih |
| rsna-dicom | RSNA stage_2_train_images/*.dcm + class and box tables (rsna-pneumonia) | phantoms_rsna |
| busi | Dataset_BUSI_with_GT/{benign,malignant,normal}/*.png + masks (busi) | phantoms_busi |

:func:`generate_phantoms` is the one entry point (the data stage calls it). Every image depends only on the seed
and its own index (and its patient, whose anatomy all of the patient's films share): generation is deterministic,
order-independent, and writes each file atomically.

The chest-pneumonia kind: each patient has 1–3 films of the same chest (see medq.data.phantoms_chest); pneumonia adds
patchy opacities inside a lung field: bacterial cases one dense lobar consolidation, viral cases fainter bilateral
interstitial patches, with file names that carry the patient and the cause as in the Kaggle archive.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from medq.data.phantoms_chest import FINDINGS, ChestAnatomy, chest_anatomy, draw_chest  # noqa: F401
from medq.data.phantoms_draw import to_uint, write_image

SPLITS = ("train", "val", "test")
PNEUMONIA_FRACTION = 0.62  # the Kaggle train split is 74% pneumonia; imbalance is part of the task
SPLIT_OFFSETS = {"train": 0, "val": 1_000_000, "test": 2_000_000}
COLOR_EVERY = 12  # about one Kaggle JPEG in twelve is stored with three (equal) channels


@dataclass(frozen=True)
class ChestCase:
    label: str  # 'NORMAL' | 'PNEUMONIA'
    cause: str  # 'normal' | 'bacteria' | 'virus'
    patient: int
    view: int  # the n-th image of this patient


def plan_cases(n: int, rng: np.random.Generator) -> list[ChestCase]:
    """n images from patients with 1-3 films each; pneumonia cases split bacterial/viral about 2:1."""
    cases: list[ChestCase] = []
    patient = 0
    while len(cases) < n:
        patient += 1
        sick = rng.random() < PNEUMONIA_FRACTION
        cause = ("bacteria" if rng.random() < 0.65 else "virus") if sick else "normal"
        for view in range(1, int(rng.integers(1, 4)) + 1):
            if len(cases) < n:
                cases.append(ChestCase("PNEUMONIA" if sick else "NORMAL", cause, patient, view))
    return cases


def kaggle_file_name(case: ChestCase, split: str) -> str:
    """File names as in the Kaggle archive: the patient and (for pneumonia) the cause are in the name."""
    pid = case.patient + SPLIT_OFFSETS[split]
    if case.cause == "normal":
        return f"IM-{pid:07d}-{case.view:04d}.jpeg" if pid % 2 else f"NORMAL2-IM-{pid:07d}-{case.view:04d}.jpeg"
    return f"person{pid}_{case.cause}_{case.view}.jpeg"


def generate_chest_pneumonia(root: str | Path, n_train: int, n_val: int, n_test: int, size: int = 128,
                             seed: int = 7) -> dict[str, dict[str, int]]:
    """Write ``root/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`` and return the counts per split and class."""
    root = Path(root)
    counts: dict[str, dict[str, int]] = {}
    for split, n in zip(SPLITS, (n_train, n_val, n_test)):
        counts[split] = {"NORMAL": 0, "PNEUMONIA": 0}
        anatomies: dict[int, ChestAnatomy] = {}
        for case_index, case in enumerate(plan_cases(n, np.random.default_rng([seed, SPLIT_OFFSETS[split]]))):
            if case.patient not in anatomies:
                anatomies[case.patient] = chest_anatomy(np.random.default_rng([seed, SPLIT_OFFSETS[split],
                                                                               case.patient, 2]))
            rng = np.random.default_rng([seed, SPLIT_OFFSETS[split] + case_index, 1])
            side = int(size * rng.uniform(1.0, 1.35))  # real films vary in size
            image, _ = draw_chest(rng, side, case.cause, anatomy=anatomies[case.patient])
            pixels = to_uint(image)
            if case_index % COLOR_EVERY == COLOR_EVERY - 1:
                pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
            write_image(root / split / case.label / kaggle_file_name(case, split), pixels, quality=92)
            counts[split][case.label] += 1
    return counts


# --- the one entry point ----------------------------------------------------------------------------------------

PHANTOM_FORMATS = {"chest-pneumonia": "kaggle-pneumonia", "chest-multilabel": "nih-chestxray14",
                   "rsna-dicom": "rsna-pneumonia", "busi": "busi"}


def generate_phantoms(kind: str, root: Path, n_train: int, n_val: int, n_test: int, size: int,
                      seed: int) -> dict[str, Any]:
    """Write the phantom dataset ``kind`` at ``root`` in its real layout.

    ``root`` is the folder the reader is pointed at (data.root): the chest_xray folder, the NIH folder, the RSNA
    folder, Dataset_BUSI_with_GT. Layouts without a split of their own (RSNA, BUSI) get n_train + n_val + n_test
    images; NIH puts n_train + n_val in train_val_list.txt and n_test in test_list.txt (patient-disjoint).
    Returns {kind, format (the reader to use), root, images, counts, and facts of the kind (rsna: storage,
    duplicate_rows; busi: masks)}.
    """
    from medq.data.phantoms_busi import generate_busi
    from medq.data.phantoms_nih import generate_chest_multilabel
    from medq.data.phantoms_rsna import generate_rsna_dicom

    if kind not in PHANTOM_FORMATS:
        raise ValueError(f"unknown phantom kind {kind!r}; use one of {', '.join(PHANTOM_FORMATS)}")
    root = Path(root)
    if kind == "chest-pneumonia":
        counts = generate_chest_pneumonia(root, n_train, n_val, n_test, size=size, seed=seed)
        result: dict[str, Any] = {"images": sum(sum(c.values()) for c in counts.values()), "counts": counts}
    else:
        generate = {"chest-multilabel": generate_chest_multilabel, "rsna-dicom": generate_rsna_dicom,
                    "busi": generate_busi}[kind]
        result = generate(root, n_train, n_val, n_test, size=size, seed=seed)
    return {"kind": kind, "format": PHANTOM_FORMATS[kind], "root": str(root), **result}
