"""RSNA-style 3-class DICOM chest phantoms.

    root/stage_2_train_images/<uuid-like patientId>.dcm
    root/stage_2_detailed_class_info.csv   patientId,class — one row per box, so duplicate rows for opacities
    root/stage_2_train_labels.csv          patientId,x,y,width,height,Target — one row per box (Target 1) or one
                                           empty row (Target 0)

Classes: "Lung Opacity" (consolidation and/or patchy airspace opacities), "No Lung Opacity / Not Normal" (an
enlarged heart, nodules or a mass, no airspace opacity), "Normal". Storage varies as clinical files do: most are
12-bit with a rescale slope/intercept and a VOI window (sometimes several presets, sometimes none), a share is
MONOCHROME1 (stored inverted: bright air), and a share is 8-bit JPEG Baseline as the challenge's own files are.
The decoded image is the same drawing whichever way it was stored.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from medq.artifacts import write_bytes, write_text
from medq.data.dicom import dicom_bytes
from medq.data.phantoms_chest import draw_chest
from medq.data.rsna import RSNA_CLASSES

CLASS_SHARE = {"Lung Opacity": 0.34, "No Lung Opacity / Not Normal": 0.36, "Normal": 0.30}
NOT_NORMAL = (("cardiomegaly",), ("nodule",), ("mass",), ("cardiomegaly", "nodule"))
OPACITIES = (("consolidation",), ("patchy",), ("consolidation", "patchy"))
STORAGE = {"mono2-12bit": 0.55, "mono1-12bit": 0.25, "jpeg-8bit": 0.20}


def patient_uuid(rng: np.random.Generator) -> str:
    h = bytes(rng.integers(0, 256, 16, dtype=np.uint8)).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def opacity_boxes(opacity: np.ndarray, most: int = 2) -> list[tuple[int, int, int, int]]:
    """(x, y, width, height) of the largest drawn opacity regions, as the challenge's boxes."""
    binary = (opacity > 0.25 * max(float(opacity.max()), 1e-6)).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(binary)
    regions = sorted((stats[i] for i in range(1, n)), key=lambda s: -s[cv2.CC_STAT_AREA])[:most]
    return [(int(s[0]), int(s[1]), int(s[2]), int(s[3])) for s in regions]


def demographics(rng: np.random.Generator) -> dict[str, str]:
    """PatientSex, PatientAge, ViewPosition as the challenge's headers hold them: the age a plain number (not a DICOM
    '058Y' Age String), a few of them impossible (the real set has ages such as 148), AP films common."""
    age = int(rng.integers(18, 91)) if rng.random() > 0.01 else int(rng.integers(140, 160))
    return {"PatientSex": "MF"[int(rng.integers(2))], "PatientAge": str(age),
            "ViewPosition": "AP" if rng.random() < 0.45 else "PA"}


def encode_dicom(image: np.ndarray, storage: str, rng: np.random.Generator, patient: str,
                 header: dict[str, str] | None = None) -> bytes:
    """The display image (0 = air dark) stored as ``storage`` so that medq's decoding gives it back."""
    if storage == "jpeg-8bit":
        return dicom_bytes(np.round(image * 255).astype(np.uint8), patient_id=patient, jpeg_quality=90,
                           uid_seed="medq-rsna", header=header)
    slope = float(rng.choice([1.0, 0.5, 2.0]))
    intercept = float(rng.choice([0.0, -1024.0, 100.0]))
    lo, hi = rng.uniform(150, 600), rng.uniform(3300, 4000)  # the stored values the window spans
    shown = image if storage == "mono2-12bit" else 1.0 - image  # MONOCHROME1 stores bright air
    stored = np.clip(np.round(lo + shown * (hi - lo)), 0, 4095).astype(np.uint16)
    center, width = (slope * (lo + hi) / 2 + intercept), slope * (hi - lo)
    choice = rng.random()
    window = None if choice < 0.1 else ([center, center * 0.8], [width, width * 0.6]) if choice < 0.3 else \
        (center, width)
    if window is None:  # no VOI: medq scales the full 12-bit range; keep the drawing's contrast there
        stored = np.round(shown * 4095).astype(np.uint16)
    photometric = "MONOCHROME2" if storage == "mono2-12bit" else "MONOCHROME1"
    return dicom_bytes(stored, photometric=photometric, bits_stored=12, rescale=(slope, intercept), window=window,
                       patient_id=patient, uid_seed="medq-rsna", header=header)


def generate_rsna_dicom(root: str | Path, n_train: int, n_val: int, n_test: int, size: int = 128,
                        seed: int = 7) -> dict:
    root = Path(root)
    n = n_train + n_val + n_test
    class_rows, label_rows = [], []
    counts = {c: 0 for c in RSNA_CLASSES}
    storage_counts = {s: 0 for s in STORAGE}
    for i in range(n):
        rng = np.random.default_rng([seed, 21, i])
        patient = patient_uuid(rng)
        name = str(rng.choice(list(CLASS_SHARE), p=list(CLASS_SHARE.values())))
        findings: tuple[str, ...] = ()
        if name == "Lung Opacity":
            findings = OPACITIES[int(rng.integers(len(OPACITIES)))]
        elif name != "Normal":
            findings = NOT_NORMAL[int(rng.integers(len(NOT_NORMAL)))]
        image, opacity = draw_chest(rng, size, findings=findings)
        storage = str(rng.choice(list(STORAGE), p=list(STORAGE.values())))
        header = demographics(np.random.default_rng([seed, 22, i]))  # its own stream: the drawings stay as they were
        write_bytes(root / "stage_2_train_images" / f"{patient}.dcm",
                    encode_dicom(image, storage, rng, patient, header))
        boxes = opacity_boxes(opacity) if name == "Lung Opacity" else []
        class_rows += [f"{patient},{name}"] * max(1, len(boxes))  # one row per box, as in the challenge
        if boxes:
            label_rows += [f"{patient},{x},{y},{w},{h},1" for x, y, w, h in boxes]
        else:
            label_rows.append(f"{patient},,,,,{int(name == 'Lung Opacity')}")
        counts[name] += 1
        storage_counts[storage] += 1
    write_text(root / "stage_2_detailed_class_info.csv", "patientId,class\n" + "\n".join(class_rows) + "\n")
    write_text(root / "stage_2_train_labels.csv", "patientId,x,y,width,height,Target\n" + "\n".join(label_rows) + "\n")
    return {"images": n, "counts": {"all": counts}, "storage": storage_counts,
            "duplicate_rows": len(class_rows) - n}
