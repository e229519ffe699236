"""Multi-label chest phantoms in the NIH ChestX-ray14 layout.

    root/Data_Entry_2017.csv                 all 11 columns + the 2017 file's trailing empty column
    root/images_001/images/00000001_000.png  8-bit gray (a few RGBA, as in the real set), split over images_001/002
    root/train_val_list.txt, test_list.txt   patient-disjoint

Findings drawn (medq.data.phantoms_chest) and their labels: Cardiomegaly, Effusion, Nodule, Mass, Pneumothorax,
Consolidation (lobar) and Pneumonia (patchy airspace opacities). Cardiomegaly, nodules and masses are chronic (every
film of the patient shows them); effusion, pneumothorax and the two airspace patterns come and go between follow-up
films. A film with no finding drawn is labelled 'No Finding'; the other seven NIH labels are never drawn, never given.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from medq.artifacts import write_text
from medq.data.nih import CSV_COLUMNS, NO_FINDING, TEST_LIST, TRAIN_VAL_LIST
from medq.data.phantoms_chest import chest_anatomy, draw_chest
from medq.data.phantoms_draw import to_uint, write_image

LABELS = {"cardiomegaly": "Cardiomegaly", "effusion": "Effusion", "nodule": "Nodule", "mass": "Mass",
          "pneumothorax": "Pneumothorax", "consolidation": "Consolidation", "patchy": "Pneumonia"}
CHRONIC = {"cardiomegaly": 0.2, "nodule": 0.2, "mass": 0.18}  # per patient
# per film; findings are more common than in NIH so that a few hundred films teach every label
ACUTE = {"effusion": 0.18, "pneumothorax": 0.15, "consolidation": 0.15, "patchy": 0.15}
RGBA_EVERY = 25
PER_FOLDER = 0.5  # the first half of the images go to images_001, the rest to images_002


def plan_films(n_train_val: int, n_test: int, rng: np.random.Generator) -> list[tuple[int, int, tuple[str, ...], str]]:
    """(patient, follow-up, findings, list) per film; patients have 1-4 films, all in one list."""
    films = []
    patient = 0
    for group, quota in (("train_val", n_train_val), ("test", n_test)):
        made = 0
        while made < quota:
            patient += 1
            chronic = [f for f, p in CHRONIC.items() if rng.random() < p]
            for follow_up in range(int(rng.integers(1, 5))):
                if made == quota:
                    break
                acute = [f for f, p in ACUTE.items() if rng.random() < p]
                films.append((patient, follow_up, tuple(chronic + acute), group))
                made += 1
    return films


def generate_chest_multilabel(root: str | Path, n_train: int, n_val: int, n_test: int, size: int = 128,
                              seed: int = 7) -> dict:
    root = Path(root)
    films = plan_films(n_train + n_val, n_test, np.random.default_rng([seed, 14]))
    rows, lists = [], {"train_val": [], "test": []}
    counts: dict[str, dict[str, int]] = {"train_val": {}, "test": {}}
    anatomy, demographics = None, None
    for i, (patient, follow_up, findings, group) in enumerate(films):
        if follow_up == 0:
            patient_rng = np.random.default_rng([seed, 14, patient])
            anatomy = chest_anatomy(patient_rng)
            demographics = (int(patient_rng.integers(18, 90)), "MF"[int(patient_rng.integers(2))])
        rng = np.random.default_rng([seed, 15, i])
        image, _ = draw_chest(rng, size, findings=findings, anatomy=anatomy)
        name = f"{patient:08d}_{follow_up:03d}.png"
        pixels = to_uint(image)
        if i % RGBA_EVERY == RGBA_EVERY - 1:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGRA)
        folder = "images_001" if i < len(films) * PER_FOLDER else "images_002"
        write_image(root / folder / "images" / name, pixels)
        labels = sorted(LABELS[f] for f in findings) or [NO_FINDING]
        for label in labels:
            counts[group][label] = counts[group].get(label, 0) + 1
        age, sex = demographics
        width, height = int(rng.integers(2400, 3000)), int(rng.integers(2400, 3000))
        spacing = "0.143" if rng.random() < 0.7 else "0.168"
        rows.append(f"{name},{'|'.join(labels)},{follow_up},{patient},{age + follow_up // 2},{sex},"
                    f"{'PA' if rng.random() < 0.6 else 'AP'},{width},{height},{spacing},{spacing},")
        lists[group].append(name)
    write_text(root / "Data_Entry_2017.csv", ",".join(CSV_COLUMNS) + ",\n" + "\n".join(rows) + "\n")
    write_text(root / TRAIN_VAL_LIST, "\n".join(lists["train_val"]) + "\n")
    write_text(root / TEST_LIST, "\n".join(lists["test"]) + "\n")
    return {"images": len(films), "counts": {g: dict(sorted(c.items())) for g, c in counts.items()}}
