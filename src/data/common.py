"""What every reader shares: the registry, junk filtering, file intake (skip or raise), patient-wise splits.

Split rules (the same for every layout):
- A split medq makes never puts one patient in two splits, and is deterministic for the seed. Patients are
  stratified by the label of their first image, so small classes land in every split in proportion.
- ``test_fraction`` carves a test split out of all images when the layout has none.
- ``val_fraction`` is the share of the remaining (non-test) images that become validation. With
  ``val_split: from-train`` (the default) validation is always carved from train, and a layout's own val split is
  left unused (Kaggle's holds 16 images); with ``val_split: official`` the layout's val split is used when it has one.
"""
from __future__ import annotations

import csv
import difflib
import io
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from medq.data.decode import BROKEN_LINK, MAX_MEGAPIXELS, NOT_REGULAR, UnreadableImage, check_header
from medq.data.duplicates import raise_first, reconcile
from medq.data.index import DatasetIndex, Sample
from medq.errors import DataError

Reader = Callable[..., DatasetIndex]
READERS: dict[str, Reader] = {}
DETECTORS: list[tuple[str, Callable[[Path], bool]]] = []

JUNK_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}
# Image formats medq recognises but does not decode: a file of one of them is reported as unreadable with the
# decoder's reason (readers, `medq data check` and `medq predict` alike), never passed over as "not an image".
UNREAD_IMAGE_SUFFIXES = {".tif", ".tiff", ".bmp", ".gif", ".webp", ".jp2", ".j2k"}
PHANTOM_MARKER = ".medq-phantom.json"  # in every folder medq generated: its phantom settings
SPLITS = ("train", "val", "test")
TEST_SEED_OFFSET = 1_000_003  # the test carve uses another random stream than the validation carve


def read_text(path: Path) -> str:
    """A label table or list file as text; unreadable or non-UTF-8 files are a DataError naming the file."""
    try:
        raw = Path(path).read_bytes()
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw[:64]:
            raise DataError(f"{path}: not UTF-8 text but UTF-16 (as Excel's 'Unicode Text' saves it); save the "
                            "table as UTF-8 CSV (spreadsheet programs: 'CSV UTF-8')")
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the table as UTF-8 CSV "
                        "(spreadsheet programs: 'CSV UTF-8')") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}); check that it exists and is "
                        "readable") from None


def read_table(path: Path) -> list[list[str]]:
    """Every row of a CSV file (header included), through :func:`read_text`."""
    try:
        return list(csv.reader(io.StringIO(read_text(path), newline="")))
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV table ({exc}); fix the file") from None


def data_source(root: str | Path, layout: str) -> str:
    """What a run's data is, for every report: 'synthetic phantoms (<layout> layout)' or the real layout's name."""
    return f"synthetic phantoms ({layout} layout)" if (Path(root) / PHANTOM_MARKER).is_file() else layout


def register(name: str, detect: Callable[[Path], bool] | None = None):
    def wrap(fn: Reader) -> Reader:
        READERS[name] = fn
        if detect is not None:
            DETECTORS.append((name, detect))
        return fn

    return wrap


def is_junk(path: Path) -> bool:
    """macOS resource forks and archive debris that ship inside the Kaggle and BUSI archives, and hidden entries:
    a hidden folder (Jupyter's ``.ipynb_checkpoints``, ``.git``, ``.Trash-1000``) is never a class or its images."""
    return path.name in JUNK_NAMES or path.name.startswith(".") or "__MACOSX" in path.parts


def walk(folder: Path, recursive: bool = True, skip: Callable[[Path], bool] = is_junk
         ) -> Iterator[tuple[str, Path]]:
    """What is under ``folder``, as ('file' | 'skip' | 'broken link' | 'special' | 'seen', path), each folder's files
    sorted and its sub-folders after them in name order (as os.walk); 'special' is a named pipe, device or socket.
    Symbolic links are followed, but each real folder (st_dev, st_ino) is entered once: a link loop, or a second link
    to a folder, yields 'seen' and ends there."""
    entered: set[tuple[int, int]] = set()
    stack = [folder]
    while stack:
        current = stack.pop()
        st = os.stat(current)
        if (st.st_dev, st.st_ino) in entered:
            yield "seen", current
            continue
        entered.add((st.st_dev, st.st_ino))
        with os.scandir(current) as scan:
            entries = sorted(scan, key=lambda e: e.name)
        folders = []
        for entry in entries:
            path = Path(entry.path)
            try:  # a link to itself (or round a cycle of links) raises ELOOP here: a broken link, not a crash
                kind = "skip" if skip(path) else "folder" if entry.is_dir() else "file" if entry.is_file() else \
                    "broken link" if not os.path.exists(path) else "special"  # a named pipe, device or socket
            except OSError:
                kind = "broken link"
            if kind == "folder":
                folders.append(path)
            elif kind is not None:
                yield kind, path
        if recursive:
            stack.extend(reversed(folders))


def one_hot(index: int, n: int) -> tuple[float, ...]:
    return tuple(1.0 if i == index else 0.0 for i in range(n))


def child_dir(folder: Path, name: str) -> Path | None:
    """``folder/name`` matched case-insensitively (archives differ: NORMAL/normal, Benign/benign)."""
    exact = folder / name
    if exact.is_dir():
        return exact
    if not folder.is_dir():
        return None
    for entry in os.scandir(folder):
        if entry.name.lower() == name.lower() and entry.is_dir() and not is_junk(Path(entry.path)):
            return Path(entry.path)
    return None


def child_dirs(folder: Path, name: str) -> list[Path]:
    """Every ``folder/name`` spelling (NORMAL/ and normal/ side by side are both the class), sorted."""
    if not folder.is_dir():
        return []
    return sorted(Path(e.path) for e in os.scandir(folder)
                  if e.name.lower() == name.lower() and e.is_dir() and not is_junk(Path(e.path)))


def subdirs(folder: Path) -> list[Path]:
    """Non-junk sub-folders, sorted by name."""
    return sorted(Path(e.path) for e in os.scandir(folder) if e.is_dir() and not is_junk(Path(e.path)))


class Intake:
    """Admits files into an index: junk is ignored (and counted), unreadable files are listed with the reason —
    or, under ``strict``, raised as a one-line error naming the file."""

    def __init__(self, strict: bool = False, max_megapixels: float = MAX_MEGAPIXELS, copies: str = "error",
                 conflicts: str = "error", report: bool = False):
        self.strict = strict
        self.max_megapixels = max_megapixels
        self.copies = copies  # data.cross_split_copies (medq.data.duplicates)
        self.conflicts = conflicts  # data.label_conflicts
        self.report = report  # `medq data check`: problems are listed in the index, not raised
        self.skipped: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.junk = 0
        self.seen: list[Path] = []  # symbolic links to a folder already read (loops), not followed again
        self._real_dirs: dict[str, str] = {}  # folder as found → its real path, for this read only

    def sample(self, path: str | Path, label: tuple[float, ...], patient: str, source: str = "",
               metadata: tuple[str, ...] = ()) -> Sample:
        """A sample at the file's real path (aliases such as ``a/../a/x.png`` and symlinked folders are one file),
        remembering where the reader found it (``source``, default the path as found) and its patient metadata."""
        return Sample(self.real_path(path), label, patient, source or str(path), metadata)

    def real_path(self, path: str | Path) -> str:
        """``os.path.realpath``, with each folder resolved once per read (~40 µs a file otherwise: 5 s for NIH)."""
        path = os.fspath(path)
        folder, name = os.path.split(path)
        if name in ("", ".", "..") or os.path.islink(path):
            return os.path.realpath(path)
        if folder not in self._real_dirs:
            self._real_dirs[folder] = os.path.realpath(folder or ".")
        return os.path.join(self._real_dirs[folder], name)

    def skip(self, path: str | Path, reason: str, *, file_problem: bool = True) -> None:
        """List a skip. File problems (unreadable, missing) raise under strict; label problems are always listed."""
        if self.strict and file_problem:
            raise UnreadableImage(f"{path}: {reason}; fix or remove the file, or set data.strict: false to skip it")
        self.skipped.append((str(path), reason))

    def admit(self, path: str | Path) -> bool:
        reason = check_header(path, self.max_megapixels)
        if reason is None:
            return True
        self.skip(path, reason)
        return False

    def files(self, folder: Path, recursive: bool = False) -> list[Path]:
        """Every non-junk file under ``folder`` (sorted); junk counted, not listed."""
        found: list[Path] = []
        for kind, path in walk(folder, recursive):
            if kind == "file":
                found.append(path)
            elif kind == "skip":
                self.junk += 1
            elif kind == "seen":
                self.seen.append(path)
            elif kind == "special":
                self.skip(path, NOT_REGULAR)
            else:
                self.skip(path, BROKEN_LINK)
        return sorted(found)

    def notes(self) -> list[str]:
        out = []
        if self.junk:
            out.append(f"ignored {self.junk} archive junk and hidden entries (__MACOSX, ._*, .DS_Store, "
                       ".ipynb_checkpoints, ...)")
        if self.seen:
            out.append(f"{len(self.seen)} symbolic link(s) lead to a folder already read (a link loop or a second "
                       f"link), not followed again: {self.seen[0]}" + (" ..." if len(self.seen) > 1 else ""))
        if self.skipped:
            out.append(f"skipped {len(self.skipped)} files, each listed with the reason (`medq data check` prints "
                       "them; training writes them to the run's skipped_files.csv)")
        return out


def _stratum(samples: list[Sample]) -> tuple[float, ...]:
    return samples[0].label


def patient_split(samples: list[Sample], fraction: float, seed, links: dict[str, str] | None = None
                  ) -> tuple[list[Sample], list[Sample]]:
    """Split off about ``fraction`` of the patients (whole patients, stratified by label); deterministic for a seed.
    ``links`` (patient → group) keeps patients together that share an image (byte-identical copies).

    Returns (kept, taken).
    """
    if fraction <= 0 or not samples:
        return list(samples), []
    links = links or {}
    by_patient: dict[str, list[Sample]] = {}
    for s in samples:
        by_patient.setdefault(links.get(s.patient, s.patient), []).append(s)
    patients = sorted(by_patient)
    rng = np.random.default_rng(seed)
    order_key = dict(zip(patients, rng.permutation(len(patients))))
    ordered = sorted(patients, key=lambda p: (_stratum(by_patient[p]), order_key[p]))
    # Systematic sampling along the stratified order: about fraction * n patients, proportional in every stratum.
    offset = rng.random()
    taken = {p for i, p in enumerate(ordered)
             if math.floor((i + 1) * fraction + offset) > math.floor(i * fraction + offset)}
    if not taken and len(patients) > 1:
        taken = {ordered[int(rng.integers(len(ordered)))]}
    return ([s for s in samples if links.get(s.patient, s.patient) not in taken],
            [s for s in samples if links.get(s.patient, s.patient) in taken])


def describe(samples: Iterable[Sample]) -> str:
    samples = list(samples)
    return f"{len(samples)} images of {len({s.patient for s in samples})} patients"


def make_splits(splits: dict[str, list[Sample]], *, val_split: str, val_fraction: float, test_fraction: float,
                seed: int, notes: list[str], intake: Intake, classes: list[str]) -> dict[str, list[Sample]]:
    """Complete train/val/test from what the layout provides (missing splits carved patient-wise from train), after
    each real file is made one sample and copies in two of the layout's splits are refused
    (:func:`medq.data.duplicates.reconcile`)."""
    given = {name: list(splits.get(name, [])) for name in SPLITS}
    out, links, errors = reconcile(given, classes, copies=intake.copies, conflicts=intake.conflicts,
                                   report=intake.report, notes=notes, skipped=intake.skipped)
    intake.errors += errors
    if not out["test"]:
        if test_fraction <= 0:
            notes.append("test: none (the layout has no test split and data.test_fraction is 0)")
        else:
            out["train"], out["test"] = patient_split(out["train"], test_fraction, seed + TEST_SEED_OFFSET, links)
            notes.append(f"test: {describe(out['test'])} carved patient-wise (test_fraction={test_fraction})")
    own_val = out["val"]
    if val_split == "official" and own_val:
        notes.append(f"validation: the layout's own val split ({describe(own_val)})")
    else:
        out["train"], out["val"] = patient_split(out["train"], val_fraction, seed, links)
        unused = f"; the layout's own val split ({len(own_val)} images) is unused" if own_val else ""
        notes.append(f"validation: {describe(out['val'])} carved patient-wise from train "
                     f"(val_fraction={val_fraction}){unused}")
    return out


def finish(name: str, task: str, classes: list[str], splits: dict[str, list[Sample]], intake: Intake,
           notes: list[str], where: Path) -> DatasetIndex:
    """The reader's result; a DataError if nothing usable is left to train on, or a class has no training image
    (a model would be trained for a class it never sees). A class missing from val or test is a warning
    (:func:`class_warnings`): its metrics there are undefined."""
    if not splits.get("train"):
        first = f" (first skip: {intake.skipped[0][0]}: {intake.skipped[0][1]})" if intake.skipped else ""
        raise DataError(f"{where}: no usable training images{first}; check data.root and data.format")
    index = DatasetIndex(name, task, classes, {s: splits.get(s, []) for s in SPLITS}, intake.skipped,
                         notes + intake.notes(), intake.errors)
    untrained = index.missing_classes()["train"] if task != "multilabel" else []  # multi-label: a warning
    if untrained:
        elsewhere = {s: {c: n for c, n in index.counts(s).items() if c in untrained and n} for s in ("val", "test")
                     if index.splits[s]}
        found = "; ".join(f"{s}: " + ", ".join(f"{c} {n}" for c, n in counts.items())
                          for s, counts in elsewhere.items() if counts)
        index.errors.append(f"{where}: class {', '.join(untrained)} has no training image"
                            + (f" ({found})" if found else "") + "; a model cannot learn a class it never sees: "
                            "add training images of it (or move some from test), or remove it from the dataset")
    if not intake.report:
        raise_first(index.errors)
    return index


def class_warnings(index: DatasetIndex) -> list[str]:
    """One warning per val/test split that lacks a class (multi-label: has no positive of a label), per multi-label
    training split with a label no image has (its output is never trained), and per single-label class that looks
    like a misspelling of another (:func:`misspelt_classes`)."""
    if index.task != "multilabel":
        return [f"{split} has no image of class {', '.join(missing)}: its {split} sensitivity and AUC are undefined"
                for split, missing in index.missing_classes().items() if split != "train" and missing] + \
            misspelt_classes(index)
    return [f"{split} has no image with label {', '.join(missing)}: "
            + ("the model's output for it is never trained" if split == "train" else
               f"its {split} sensitivity and AUC are undefined")
            for split, missing in index.missing_classes().items() if missing]


def misspelt_classes(index: DatasetIndex) -> list[str]:
    """A class of a few images whose name is a near spelling of a class of many (PNEUMONIAA beside PNEUMONIA, from
    a label typed by hand) is most likely wrong labels, trained as a class of its own: a warning naming both.
    Names that differ only in digits (Type1, Type2) are distinct classes, never flagged."""
    totals = {c: sum(index.counts(s)[c] for s in SPLITS) for c in index.classes}
    letters = {c: "".join(ch for ch in c.lower() if not ch.isdigit()) for c in index.classes}
    out = []
    for rare, n in totals.items():
        for common, m in totals.items():
            if common == rare or n > max(2, m // 20) or letters[rare] == letters[common]:
                continue
            if difflib.SequenceMatcher(None, rare.lower(), common.lower()).ratio() >= 0.8:
                out.append(f"class {rare!r} has {n} image(s) and is spelt like {common!r} ({m}): a misspelt label "
                           f"trains as a class of its own; correct the label, or ignore this if {rare!r} is meant")
                break
    return out
