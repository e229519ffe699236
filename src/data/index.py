"""What every reader returns: samples with labels, split by patient, plus the files it had to skip."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Sample:
    path: str
    label: tuple[float, ...]  # one-hot (binary, multiclass) or multi-hot (multilabel), in the order of `classes`
    patient: str


@dataclass
class DatasetIndex:
    format: str
    task: str  # 'binary' | 'multiclass' | 'multilabel'
    classes: list[str]
    splits: dict[str, list[Sample]]  # 'train', 'val', 'test'
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    notes: list[str] = field(default_factory=list)  # what the reader decided (detection, split source, ...)

    def paths(self, split: str) -> list[str]:
        return [s.path for s in self.splits[split]]

    def labels(self, split: str) -> np.ndarray:
        return np.asarray([s.label for s in self.splits[split]], dtype=np.float32).reshape(-1, len(self.classes))

    def counts(self, split: str) -> dict[str, int]:
        totals = self.labels(split).sum(axis=0) if self.splits[split] else np.zeros(len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, totals)}

    def patient_overlap(self) -> dict[str, int]:
        patients = {name: {s.patient for s in samples} for name, samples in self.splits.items()}
        names = sorted(patients)
        return {f"{a}/{b}": len(patients[a] & patients[b]) for i, a in enumerate(names) for b in names[i + 1:]}
