"""One image in two places: the same file listed under two names, and byte-identical copies of one file.

Every reader resolves each path to its real path (:func:`os.path.realpath`) when it builds the index, so
``imgs/x.jpeg``, ``./imgs/../imgs/x.jpeg`` and the same file through a symlinked folder are one sample path. This
module then finds, before any split is carved (:func:`reconcile`):

- the same real file listed more than once: with one label in one split it is used once (a note); with two labels
  it is an error naming both listings (table lines) — one image has one label, and keeping the first would be a
  silent choice;
- distinct files with identical bytes (:func:`identical_files`): copies with two labels are an error, like above;
- either of them in two of the splits the *dataset* fixes (Kaggle's folders, NIH's lists, a CSV split column): the
  test metrics would be measured on training images. An error naming both files, or with
  ``data.cross_split_copies: drop-later`` the later split's copy is dropped (train < val < test) and listed as a skip.

Splits medq carves itself never separate copies: :func:`reconcile` returns links (patient → group) that make
:func:`medq.data.common.patient_split` treat copies like one patient.

Cost: only files whose byte size equals another file's can be copies, so only those are read: first three 4 KiB
blocks (start, middle, end), then in full only where those agree. For an NIH-sized dataset (112,120 PNGs, ~45 GB)
that is a stat of every file plus a block read of the size-colliding ones: ~1-10 s on a warm cache instead of ~100 s
for hashing everything (tests/perf/hash_copies.py; README, "One image, one split"). Copies that differ in their
bytes (re-encoded, resized) are not found.
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from typing import Callable, Hashable, Iterable

from medq.data.index import Sample
from medq.errors import DataError

BLOCK = 4096  # bytes read at the start, middle and end of a file before a full hash: different images differ there
SPLIT_ORDER = ("train", "val", "test")  # drop-later keeps a copy in the earliest of these
COPIES, CONFLICTS = ("error", "drop-later"), ("error", "drop-both")
_SETTING, _CONFLICTS = "data.cross_split_copies", "data.label_conflicts"


def _digest(path: str) -> bytes | None:
    """sha256 of the file's bytes (faster than blake2b where the CPU has SHA instructions), or None when it cannot be
    read."""
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").digest()
    except OSError:
        return None


def _blocks(path: str, size: int) -> bytes | None:
    """The file's first, middle and last :data:`BLOCK` bytes (an X-ray's black border can make the first block of
    two different images alike; the middle is the lungs' pixels), or None when it cannot be read."""
    try:
        with open(path, "rb", buffering=0) as fh:
            return b"".join(os.pread(fh.fileno(), BLOCK, offset)
                            for offset in (0, (size - BLOCK) // 2, size - BLOCK))
    except OSError:
        return None


def _regroup(groups: Iterable[list[str]], key: Callable[[str], Hashable]) -> list[list[str]]:
    """Each group split by ``key``; only sub-groups of two or more (with a key) are kept."""
    out = []
    for group in groups:
        by_key: dict[Hashable, list[str]] = defaultdict(list)
        for path in group:
            k = key(path)
            if k is not None:
                by_key[k].append(path)
        out += [g for g in by_key.values() if len(g) > 1]
    return out


def identical_files(paths: Iterable[str]) -> list[list[str]]:
    """Groups of two or more distinct files with identical bytes, each in input order (size, then three 4 KiB blocks,
    then the full file: only what a cheaper step could not tell apart is read further)."""
    by_size: dict[int, list[str]] = defaultdict(list)
    for path in dict.fromkeys(paths):
        try:
            by_size[os.stat(path).st_size].append(path)
        except OSError:
            continue
    candidates = []
    for size, group in by_size.items():
        if len(group) > 1:
            candidates += _regroup([group], lambda p: _blocks(p, size)) if size > 3 * BLOCK else [group]
    return _regroup(candidates, _digest)


def label_text(label: tuple[float, ...], classes: list[str]) -> str:
    names = [c for c, v in zip(classes, label) if v]
    return "|".join(names) if names else "no finding"


def _shown(sample: Sample) -> str:
    return sample.source if sample.source and sample.source != sample.path else sample.path


def raise_first(errors: list[str]) -> None:
    """The first error as one DataError line, saying how many more there are (`medq data check` lists them all)."""
    if errors:
        more = f" (and {len(errors) - 1} more problems; `medq data check` lists them all)" if len(errors) > 1 else ""
        raise DataError(errors[0] + more)


def reconcile(splits: dict[str, list[Sample]], classes: list[str], *, copies: str = "error",
              conflicts: str = "error", report: bool = False, notes: list[str], skipped: list[tuple[str, str]]
              ) -> tuple[dict[str, list[Sample]], dict[str, str], list[str]]:
    """The layout's splits with each real file once and no copy in two splits.

    ``copies`` (data.cross_split_copies) says what to do with one image in two of the layout's splits, ``conflicts``
    (data.label_conflicts) with one image under two labels. Returns (splits, links: patient → the patient its
    copies are grouped with, errors). Errors are raised (one DataError) unless ``report`` (``medq data check``),
    where they are returned and the later listing dropped.
    """
    for setting, value, allowed in ((_SETTING, copies, COPIES), (_CONFLICTS, conflicts, CONFLICTS)):
        if value not in allowed:
            raise DataError(f"{setting}: {value!r} is not one of {', '.join(allowed)}")
    errors: list[str] = []
    order = [s for s in SPLIT_ORDER if s in splits] + [s for s in splits if s not in SPLIT_ORDER]
    listed = [(split, s) for split in order for s in splits[split]]
    drop: set[int] = set()  # positions in `listed`
    twice: list[str] = []
    leaks: list[str] = []
    conflicting: list[str] = []
    left_out: set[int] = set()  # every listing of an image with two labels, under drop-both

    def compare(i: int, j: int, same_file: bool) -> None:
        """Listing j against the earlier listing i of the same image (file or copy)."""
        (split_a, a), (split_b, b) = listed[i], listed[j]
        what = f"{a.path}: listed twice" if same_file else "byte-identical copies"
        where = f"{_shown(a)} ({split_a}) and {_shown(b)} ({split_b})"
        if i in left_out or (a.label != b.label and conflicts == "drop-both"):
            if i not in left_out:
                conflicting.append(f"{what} with two labels, {label_text(a.label, classes)} and "
                                   f"{label_text(b.label, classes)}: {where}")
            for k in (i, j):
                if k not in left_out:
                    skipped.append((listed[k][1].path, f"one image with two labels ({where}); left out "
                                                       f"({_CONFLICTS}: drop-both)"))
                    left_out.add(k)
            drop.update((i, j))
        elif a.label != b.label:
            text = f"{what} with two labels, {label_text(a.label, classes)} and {label_text(b.label, classes)}: {where}"
            errors.append(f"{text}; one image has one label: correct the wrong listing or remove the copy, or set "
                          f"{_CONFLICTS}: drop-both to leave it out")
            drop.add(j)
        elif split_a != split_b:
            text = (f"{what} in two splits: {where}; the {split_b} metrics would be measured on a {split_a} image")
            if copies == "drop-later":
                leaks.append(text)
                skipped.append((b.path, f"{_shown(b)}: the same image as {_shown(a)} in {split_a}; dropped from "
                                        f"{split_b} ({_SETTING}: drop-later)"))
            else:
                errors.append(f"{text}; keep it in one split, or set {_SETTING}: drop-later to drop the "
                              f"{split_b} copy")
            drop.add(j)
        elif same_file:
            twice.append(where)
            drop.add(j)

    first_at: dict[str, int] = {}
    for j, (_, sample) in enumerate(listed):
        if sample.path in first_at:
            compare(first_at[sample.path], j, same_file=True)
        else:
            first_at[sample.path] = j
    kept_paths = [listed[i][1].path for i in sorted(first_at.values()) if i not in drop or i in left_out]
    parent: dict[str, str] = {}  # union-find over patients: copies of copies end in one group
    copies_within = 0
    for group in identical_files(kept_paths):
        positions = [first_at[p] for p in group]
        anchor = next((i for i in positions if i in left_out), positions[0])  # a left-out image takes its copies
        for j in positions:
            if j != anchor:
                compare(anchor, j, same_file=False)
                copies_within += j not in drop
        for j in positions[1:]:
            parent[_root(parent, listed[j][1].patient)] = _root(parent, listed[positions[0]][1].patient)
    if not report:
        raise_first(errors)
    if twice:
        notes.append(f"{len(twice)} file(s) listed twice with the same label, each used once (first: {twice[0]})")
    if conflicting:
        notes.append(f"{len(conflicting)} image(s) with two labels left out ({_CONFLICTS}: drop-both; listed in "
                     f"skipped); first: {conflicting[0]}")
    if leaks:
        notes.append(f"{len(leaks)} image(s) in two of the dataset's splits, the later copy dropped ({_SETTING}: "
                     f"drop-later; listed in skipped); first: {leaks[0]}")
    if copies_within:
        notes.append(f"{copies_within} byte-identical cop(ies) of another image in the same split, kept (a split medq "
                     "carves keeps copies together, like one patient)")
    out = {split: [] for split in splits}
    for j, (split, sample) in enumerate(listed):
        if j not in drop:
            out[split].append(sample)
    return out, {p: _root(parent, p) for p in parent}, errors


def _root(parent: dict[str, str], patient: str) -> str:
    while parent.get(patient, patient) != patient:
        patient = parent[patient]
    return patient
