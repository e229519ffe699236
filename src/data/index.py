"""What every reader returns: samples with labels, split by patient, plus the files it had to skip."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The patient metadata a sample may carry, in the order of ``Sample.metadata``'s values (medq.data.metadata).
METADATA = ("sex", "age", "view")


@dataclass(frozen=True)
class Sample:
    path: str
    label: tuple[float, ...]  # one-hot (binary, multiclass) or multi-hot (multilabel), in the order of `classes`
    patient: str
    # where the reader found it, for messages: 'labels.csv line 3 (./imgs/../x.jpeg)' or the path as listed
    # (``path`` is the real path: aliases and symlinked folders are one file)
    source: str = field(default="", compare=False)
    # (sex, age, view) as in METADATA, normalised by medq.data.metadata ('unknown' where the row had none usable);
    # () when the layout has no patient metadata. Not compared: splits and duplicates are about files and labels.
    metadata: tuple[str, ...] = field(default=(), compare=False)


@dataclass
class DatasetIndex:
    format: str
    task: str  # 'binary' | 'multiclass' | 'multilabel'
    classes: list[str]
    splits: dict[str, list[Sample]]  # 'train', 'val', 'test'
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    notes: list[str] = field(default_factory=list)  # what the reader decided (detection, split source, ...)
    # problems that make the dataset unusable for a run; only `medq data check` gets an index with any (a run's
    # read raises the first as a DataError)
    errors: list[str] = field(default_factory=list)

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

    def missing_classes(self) -> dict[str, list[str]]:
        """Per non-empty split, the classes (multi-label: labels) it has no image of."""
        return {name: [c for c, n in self.counts(name).items() if n == 0]
                for name, samples in self.splits.items() if samples}
