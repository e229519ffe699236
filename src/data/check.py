"""``medq data check PATH``: what a dataset folder holds and whether medq can use it; and full-decode verification.

- :func:`verify_images` decodes every file of an index and moves failures to ``skipped`` (or raises under strict).
  The data stage calls it for small datasets; indexing itself only checks file headers, and training skips any file
  that still fails to decode.
- :func:`check_dataset` reads a folder as medq would and reports: the format (and whether it was detected), per
  split per class counts (per label for multi-label), image size / channel / bit-depth statistics from a sample of
  files per split, unreadable files with the reason, patients shared between splits, and 16-bit images that use
  only the low bits of their range (12-bit values in a 16-bit PNG without sBIT: read as 16-bit they are near black),
  the problems that would stop a run (``errors``: one image in two splits or with two labels, a class without
  training images) and the warnings (a class missing from val or test), each naming the files and table lines.
- :func:`note_pixel_range`: the low-bits check on a sample of a run's images, for the notes of `medq data` and train.
- :func:`format_check_report` renders that report as text.
"""
from __future__ import annotations

import csv
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from medq.data.decode import MAX_MEGAPIXELS, UnreadableImage, decode_image, low_range_advice
from medq.data.index import METADATA, DatasetIndex
from medq.data.metadata import UNKNOWN
from medq.errors import DataError
from medq.progress import progress

log = logging.getLogger("medq")

SAMPLE_PER_SPLIT = 200
BIT_DEPTH_SAMPLE = 24  # images note_pixel_range decodes
_PIXEL_RANGE = "bit depth:"  # how its note begins
VERIFY_ALL_UP_TO = 3000  # check_dataset decodes every file of datasets up to this size, else a sample per split


def _decode_all(paths: list[str], max_megapixels: float = MAX_MEGAPIXELS, desc: str = "verify images",
                bit_depth: int | str = "auto") -> list[tuple[dict[str, Any] | None, str | None]]:
    """(info, None) or (None, reason) per path, in order; decoded on a few threads (OpenCV releases the GIL), with
    a progress bar."""
    def one(path: str) -> tuple[dict[str, Any] | None, str | None]:
        try:
            return decode_image(path, max_megapixels, bit_depth=bit_depth)[1], None
        except UnreadableImage as exc:
            text = str(exc)
            return None, text[len(path) + 2:] if text.startswith(f"{path}: ") else text
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of the file
            return None, f"decoding failed ({type(exc).__name__}: {exc})"

    if len(paths) < 8:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(progress(pool.map(one, paths), total=len(paths), desc=desc, unit="img"))


def verify_images(index: DatasetIndex, strict: bool = False, max_megapixels: float = MAX_MEGAPIXELS,
                  bit_depth: int | str = "auto") -> DatasetIndex:
    """Decode every image (16-bit ones with ``data.bit_depth``); files that fail move to ``skipped`` with the reason
    (``strict``: UnreadableImage)."""
    splits, skipped, failed = {}, list(index.skipped), 0
    for name, samples in index.splits.items():
        results = _decode_all([s.path for s in samples], max_megapixels, f"verify {name} images", bit_depth)
        kept = []
        for sample, (_, reason) in zip(samples, results):
            if reason is None:
                kept.append(sample)
                continue
            if strict:
                raise UnreadableImage(f"{sample.path}: {reason}; fix or remove the file, or set data.strict: false "
                                      "to skip it")
            skipped.append((sample.path, reason))
            failed += 1
        splits[name] = kept
    if not splits.get("train"):
        raise DataError(f"{index.format}: no decodable training images left after verification")
    total = sum(len(v) for v in index.splits.values())
    notes = list(index.notes) + [f"verified {total} images by decoding them: {failed} unreadable, moved to skipped"]
    return replace(index, splits=splits, skipped=skipped, notes=notes)


SKIPPED_FILES = "skipped_files.csv"


def stage_skipped_files(run_dir: Path, skipped: list[tuple[str, str]], dropped: dict[str, str]) -> Path:
    """Write every file a stage left out — ``skipped`` at indexing, ``dropped`` while loading — as ``path,reason``
    into the run's staging folder (for :func:`medq.runrecord.commit`), and say on the terminal how many and where."""
    from medq import artifacts, runrecord

    rows = sorted(set(skipped) | set(dropped.items()))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "reason"])
    writer.writerows(rows)
    staged = runrecord.staging_path(run_dir, SKIPPED_FILES)
    artifacts.write_text(staged, buffer.getvalue())
    if rows:
        log.warning("%d file(s) left out (unreadable or unlabelled); the list with each reason is in %s", len(rows),
                    Path(run_dir) / SKIPPED_FILES)
    return staged


def _stats(values: list[int]) -> dict[str, int]:
    return {"min": int(min(values)), "median": int(np.median(values)), "max": int(max(values))} if values else {}


def _tally(items: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[str(item)] = out.get(str(item), 0) + 1
    return dict(sorted(out.items()))


def check_dataset(root: Path, format: str = "auto", variant: str | None = None, seed: int = 42,
                  val_fraction: float = 0.2, test_fraction: float = 0.2, val_split: str = "from-train", *,
                  verify_all_up_to: int = VERIFY_ALL_UP_TO, sample_per_split: int = SAMPLE_PER_SPLIT,
                  max_megapixels: float = MAX_MEGAPIXELS, bit_depth: int | str = "auto",
                  cross_split_copies: str = "error", label_conflicts: str = "error",
                  metadata_columns: dict[str, str] | None = None, cache_root: Path | None = None) -> dict:
    """Read ``root`` as medq would (never strict: every problem is listed) and describe what it holds;
    ``bit_depth``: ``data.bit_depth``, how 16-bit images without sBIT are read; ``metadata_columns``: a csv
    table's patient metadata columns (``data.metadata_columns``); ``cache_root``: the data cache's folder
    (:func:`medq.data.cache.cache_root`), None to read every DICOM header from its file."""
    from medq.config import DataConfig
    from medq.data.readers import class_warnings, read_dataset

    config = DataConfig(format=format, root=str(root), variant=variant, val_split=val_split,
                        val_fraction=val_fraction, test_fraction=test_fraction, strict=False, generate=False,
                        max_megapixels=max_megapixels, cross_split_copies=cross_split_copies,
                        label_conflicts=label_conflicts, metadata_columns=dict(metadata_columns or {}))
    index = read_dataset(config, seed=seed, report=True, cache_root=cache_root)
    total = sum(len(s) for s in index.splits.values())
    decode_everything = total <= verify_all_up_to
    rng = np.random.default_rng(seed)
    splits: dict[str, Any] = {}
    image_stats: dict[str, Any] = {}
    unreadable = [{"path": p, "reason": r} for p, r in index.skipped]
    decoded: list[tuple[str, dict[str, Any]]] = []
    for name, samples in index.splits.items():
        splits[name] = {"images": len(samples), "patients": len({s.patient for s in samples}),
                        "per_class": index.counts(name) if samples else {c: 0 for c in index.classes}}
        if any(s.metadata for s in samples):
            splits[name]["metadata"] = _metadata_counts(samples)
        if index.task == "multilabel":
            splits[name]["no_label"] = int((index.labels(name).sum(axis=1) == 0).sum()) if samples else 0
        chosen = list(range(len(samples)))
        if not decode_everything and len(chosen) > sample_per_split:
            chosen = sorted(rng.choice(len(samples), sample_per_split, replace=False).tolist())
        results = _decode_all([samples[i].path for i in chosen], max_megapixels, f"check {name} images", bit_depth)
        infos = [info for info, _ in results if info is not None]
        decoded += [(samples[i].path, info) for i, (info, _) in zip(chosen, results) if info is not None]
        unreadable += [{"path": samples[i].path, "reason": reason}
                       for i, (_, reason) in zip(chosen, results) if reason is not None]
        image_stats[name] = {
            "decoded": len(chosen), "of": len(samples), "sample": len(chosen) < len(samples),
            "width": _stats([i["width"] for i in infos]), "height": _stats([i["height"] for i in infos]),
            "channels": _tally([i["channels"] for i in infos]), "bits": _tally([i["bits"] for i in infos]),
            "formats": _tally([i["format"] for i in infos]),
        }
    overlap = index.patient_overlap()
    pixel_range = _low_range(decoded)
    return {
        "root": str(root), "format": index.format, "detected": format == "auto", "task": index.task,
        "classes": list(index.classes), "notes": list(index.notes), "splits": splits, "images": total,
        "image_stats": image_stats, "verified": "all" if decode_everything else "sample",
        "sample_per_split": sample_per_split,
        "unreadable": unreadable, "patient_overlap": overlap, "pixel_range": pixel_range,
        "errors": list(index.errors), "warnings": class_warnings(index),
        "ok": not unreadable and not index.errors and not any(overlap.values())
        and all(splits[s]["images"] for s in ("train", "val")) and not pixel_range["images"],
    }


def _metadata_counts(samples: list[Any]) -> dict[str, Any]:
    """Per split: images per sex and per view, and how many have a usable age (with the youngest and oldest)."""
    sex, age, view = (METADATA.index(a) for a in ("sex", "age", "view"))
    ages = [float(s.metadata[age]) for s in samples if s.metadata and s.metadata[age] != UNKNOWN]
    return {"sex": _tally([s.metadata[sex] if s.metadata else UNKNOWN for s in samples]),
            "view": _tally([s.metadata[view] if s.metadata else UNKNOWN for s in samples]),
            "age": {"known": len(ages), "unknown": len(samples) - len(ages),
                    "min": min(ages) if ages else None, "max": max(ages) if ages else None}}


def _low_range(decoded: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The decoded 16-bit images flagged ``low_range`` (no sBIT, data.bit_depth auto, maximum far below 65535)."""
    sixteen = [(path, info) for path, info in decoded if "low_range" in info]
    low = [(path, info) for path, info in sixteen if info["low_range"]]
    peak = max((info["max_value"] for _, info in low), default=0)
    return {"images": len(low), "of_16_bit": len(sixteen), "max_value": peak,
            "advice": low_range_advice(peak) if low else None, "files": [path for path, _ in low]}


def note_pixel_range(index: DatasetIndex, bit_depth: int | str = "auto", seed: int = 0,
                     sample: int = BIT_DEPTH_SAMPLE) -> str | None:
    """For `medq data` and train: when, of ``sample`` images of the index (seeded), 16-bit ones without sBIT use only
    the low bits of their range, a warning logged and added to ``index.notes`` (once); returns it. Nothing when
    ``data.bit_depth`` is set (it says how to read them)."""
    if bit_depth != "auto" or any(note.startswith(_PIXEL_RANGE) for note in index.notes):
        return None
    paths = [s.path for samples in index.splits.values() for s in samples]
    if not paths:
        return None
    chosen = np.random.default_rng(seed).choice(len(paths), min(sample, len(paths)), replace=False)
    picked = [paths[i] for i in sorted(chosen)]
    found = _low_range([(p, info) for p, (info, _) in zip(picked, _decode_all(picked, desc="check bit depth"))
                        if info is not None])
    if not found["images"]:
        return None
    note = (f"{_PIXEL_RANGE} {found['images']} of {found['of_16_bit']} sampled 16-bit images have "
            f"{found['advice']} (first: {found['files'][0]}; `medq data check` lists them)")
    log.warning("%s", note)
    index.notes.append(note)
    return note



def format_check_report(report: dict) -> str:
    """The report of :func:`check_dataset` as text for the terminal."""
    how = "detected" if report["detected"] else "as configured"
    lines = [f"dataset: {report['root']}", f"format: {report['format']} ({how}); task: {report['task']}; "
             f"{len(report['classes'])} classes; {report['images']} images"]
    lines += [f"  - {note}" for note in report["notes"]]
    lines.append("")
    classes = report["classes"]
    title = "images per " + ("label" if report["task"] == "multilabel" else "class")
    width = max([len(c) for c in classes] + [len(title)])
    split_names = list(report["splits"])
    lines.append(f"{title:<{width}}  " + "  ".join(f"{s:>8}" for s in split_names))
    for c in classes:
        lines.append(f"{c:<{width}}  " + "  ".join(f"{report['splits'][s]['per_class'].get(c, 0):>8}"
                                                    for s in split_names))
    if report["task"] == "multilabel":
        lines.append(f"{'(no label)':<{width}}  " + "  ".join(f"{report['splits'][s].get('no_label', 0):>8}"
                                                           for s in split_names))
    for key in ("images", "patients"):
        lines.append(f"{'= ' + key:<{width}}  " + "  ".join(f"{report['splits'][s][key]:>8}" for s in split_names))
    lines.append("")
    kind = "every image decoded" if report["verified"] == "all" else \
        f"a random sample of up to {report['sample_per_split']} images per split decoded"
    lines.append(f"image files ({kind}):")
    for split, st in report["image_stats"].items():
        if not st["decoded"]:
            lines.append(f"  {split}: no images")
            continue
        size = "?" if not st["width"] else (
            f"width {st['width']['min']}/{st['width']['median']}/{st['width']['max']}, "
            f"height {st['height']['min']}/{st['height']['median']}/{st['height']['max']} (min/median/max)")
        lines.append(f"  {split}: {st['decoded']} of {st['of']} decoded; {size}; channels "
                     + ", ".join(f"{k} {v}" for k, v in st["channels"].items()) + "; bits "
                     + ", ".join(f"{k}-bit {v}" for k, v in st["bits"].items()) + "; "
                     + ", ".join(f"{k} {v}" for k, v in st["formats"].items()))
    lines.append("")
    bad = report["unreadable"]
    lines.append(f"skipped or unreadable: {len(bad)}")
    for entry in bad[:20]:
        lines.append(f"  {entry['path']}: {entry['reason']}")
    if len(bad) > 20:
        lines.append(f"  ... and {len(bad) - 20} more (--json lists all)")
    for split, counts in ((s, v["metadata"]) for s, v in report["splits"].items() if "metadata" in v):
        age = counts["age"]
        lines.append(f"patient metadata, {split}: sex " + ", ".join(f"{k} {v}" for k, v in counts["sex"].items())
                     + "; view " + ", ".join(f"{k} {v}" for k, v in counts["view"].items())
                     + (f"; age known {age['known']} ({age['min']:g}-{age['max']:g} years), unknown "
                        f"{age['unknown']}" if age["known"] else f"; age unknown {age['unknown']}"))
    overlap = report["patient_overlap"]
    lines.append("patients in two splits: " + ", ".join(f"{pair} {n}" for pair, n in overlap.items())
                 + ("  (none)" if not any(overlap.values()) else "  ← leaks between splits"))
    low = report.get("pixel_range") or {}
    if low.get("images"):
        lines.append(f"16-bit images using only the low bits of their range: {low['images']} of {low['of_16_bit']} "
                     f"decoded 16-bit images have {low['advice']}")
        lines += [f"  {path}" for path in low["files"][:20]]
        if len(low["files"]) > 20:
            lines.append(f"  ... and {len(low['files']) - 20} more (--json lists all)")
    for kind in ("warnings", "errors"):
        lines.append(f"{kind}: {len(report[kind])}" + ("  ← a run stops here" if kind == "errors" and report[kind]
                                                         else ""))
        lines += [f"  {text}" for text in report[kind]]
    usable = report["splits"]["train"]["images"] and not report["errors"]
    lines.append("verdict: " + ("OK" if report["ok"] else "usable with the problems listed above" if usable
                                else "NOT usable"))
    return "\n".join(lines)
