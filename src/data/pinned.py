"""The run's pinned split: which file is in which split, fixed the first time a stage of the run reads the data.

:func:`run_index` writes the split (file → split, patient, label, size, mtime) into the run's ``split.json``
artifact (committed through :mod:`medq.runrecord`); every later stage of that run uses it, so no stage ever sees
another split than the one the model was trained and validated on.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medq import artifacts as files
from medq import runrecord
from medq.data.cache import cache_root
from medq.data.common import class_warnings, data_source
from medq.data.index import DatasetIndex, Sample
from medq.data.readers import read_dataset
from medq.runrecord import RunError

SPLIT = "split.json"
SPLIT_SETTINGS = ("root", "format", "variant", "val_split", "val_fraction", "test_fraction")


def split_settings(config: Any) -> dict[str, Any]:
    """The settings a split depends on: changing one after the split was pinned needs `medq data --resplit`."""
    return {**{key: getattr(config.data, key) for key in SPLIT_SETTINGS}, "seed": config.run.seed}


def run_index(config: Any, index: DatasetIndex | None = None, *, resplit: bool = False, stage: str = "data",
              write: bool = True) -> DatasetIndex:
    """The run's dataset index with its pinned split.

    ``write=False`` never pins (a process that shares the run without writing it). The first call for a run (or
    ``resplit``) pins ``index`` (default: the dataset read now) into ``split.json``;
    later calls read the dataset again only to see what changed: files added since are ignored with a note, files
    gone are dropped and counted, and changed split settings or classes are an error that names `--resplit`.
    """
    run_dir = config.run_dir
    current = index if index is not None else read_dataset(config.data, seed=config.run.seed, cache_root=cache_root(config))
    hint = runrecord.command(config, "data --resplit")
    if not write:  # a process that shares the run without writing it (a tuning worker): the pin if there is one
        if "split" not in runrecord.load(run_dir).artifacts:
            return current
        path = runrecord.verified_path(run_dir, "split", config, hint=hint)
        return _apply_pin(config, json.loads(path.read_text(encoding="utf-8")), current, path)
    with runrecord.writer_lock(run_dir, stage):
        manifest = runrecord.load(run_dir)
        if "split" not in manifest.artifacts or resplit:
            _pin(config, current, stage, replaced="split" in manifest.artifacts)
            return current
        path = runrecord.verified_path(run_dir, "split", config, hint=hint)
    pinned = json.loads(path.read_text(encoding="utf-8"))
    return _apply_pin(config, pinned, current, path)


def _pin(config: Any, index: DatasetIndex, stage: str, replaced: bool) -> None:
    samples = []
    for split, members in index.splits.items():
        for s in members:
            try:
                st = os.stat(s.path)
                identity = [st.st_size, st.st_mtime_ns]
            except OSError:
                identity = [None, None]
            samples.append([s.path, split, s.patient, list(s.label), *identity])
    body = {"schema": 1, "settings": split_settings(config), "format": index.format, "task": index.task,
            "classes": list(index.classes), "samples": samples,
            "columns": ["path", "split", "patient", "label", "bytes", "mtime_ns"]}
    staged = runrecord.staging_path(config.run_dir, SPLIT)
    files.write_text(staged, json.dumps(files.finite(body), separators=(",", ":"), allow_nan=False))
    runrecord.commit(config.run_dir, "split", artifacts={"split": staged}, pinned_by=stage, resplit=replaced,
                     facts={"data_source": data_source(config.data.root, index.format)},
                     split_sizes={k: len(v) for k, v in index.splits.items()}, settings=split_settings(config),
                     warnings=class_warnings(index))


def _apply_pin(config: Any, pinned: dict[str, Any], current: DatasetIndex, path: Path) -> DatasetIndex:
    fix = f"`{runrecord.command(config, 'data --resplit')}` splits again (and makes every model of the run stale)"
    now = split_settings(config)
    changed = [f"{k} {pinned['settings'].get(k)!r} → {now[k]!r}" for k in now if pinned["settings"].get(k) != now[k]]
    if changed:
        raise RunError(f"{path}: this run's split was made with other data settings ({'; '.join(changed)}); "
                       f"restore them, or {fix}")
    if list(current.classes) != list(pinned["classes"]) or current.task != pinned["task"]:
        raise RunError(f"{path}: the dataset's classes are now {current.task} {current.classes}, the run was split "
                       f"with {pinned['task']} {pinned['classes']} (a class folder renamed or added?); restore the "
                       f"dataset, or {fix}")
    present = {s.path: s for members in current.splits.values() for s in members}  # real paths
    splits: dict[str, list[Any]] = {name: [] for name in current.splits}
    gone: list[tuple[str, str]] = []
    used: set[str] = set()
    modified = relabelled = 0
    for listed, split, patient, label, size, mtime in pinned["samples"]:
        file = os.path.realpath(listed)  # a pin made before paths were resolved names aliases of one file
        sample = present.pop(file, None)
        if sample is None:
            gone.append((listed, "the same file as an earlier entry of the pinned split (a path alias); used once"
                         if file in used else "in the pinned split but no longer readable in the dataset"))
            continue
        used.add(file)
        if sample.label != tuple(label):
            relabelled += 1
        try:
            st = os.stat(file)
            modified += (st.st_size, st.st_mtime_ns) != (size, mtime)
        except OSError:
            pass
        splits.setdefault(split, []).append(Sample(file, tuple(label), patient, metadata=sample.metadata))
    notes = list(current.notes) + [f"split pinned in {path.name} ({sum(map(len, splits.values()))} files)"]
    if present:
        notes.append(f"{len(present)} file(s) added to the dataset since the split was pinned are not used; {fix}")
    if gone:
        notes.append(f"{len(gone)} file(s) of the pinned split are gone or unreadable and were dropped")
    if modified:
        notes.append(f"{modified} file(s) changed on disk since the split was pinned (same split, new content)")
    if relabelled:
        notes.append(f"{relabelled} file(s) have another label in the dataset now; the pinned labels are used; {fix}")
    return DatasetIndex(current.format, current.task, list(current.classes), splits,
                        skipped=list(current.skipped) + gone, notes=notes)
