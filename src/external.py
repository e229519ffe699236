"""External validation: `medq evaluate --run NAME --config OTHER.yaml` (or ``--data ROOT``) runs the run's model on
another dataset's split (its test split by default, or ``all`` of it) through a label mapping (:mod:`medq.labelmap`).

The run's own preprocessing and operating thresholds are used (its manifest), never the other config's: only the
other config's ``data:`` section (format, root, variant, splits) and ``external.label_map`` are read. Per mapped
model class, one-vs-rest on the external images (positive: the image carries any external label the class maps to):
AUC with its DeLong interval, prevalence and counts, sensitivity/specificity at the run's threshold with Wilson
intervals (:func:`medq.thresholds.held`), beside the run's own test figures for the class (its ``medq evaluate``)
so the drop is visible. Classes without a counterpart are listed, never dropped silently.

Recorded atomically under the run's lock: the manifest's ``external_evaluations`` (one
:class:`medq.runrecord.ExternalEvaluation` per dataset and split; re-evaluating one replaces it) and the artifact
``external_evaluation_<slug>.json`` with the full result (per-image probabilities included).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from medq import artifacts, labelmap, runrecord, thresholds
from medq.data.common import data_source
from medq.data.index import DatasetIndex, Sample
from medq.data.readers import read_dataset
from medq.errors import ConfigError, DataError
from medq.metrics import shown_probabilities, task_metrics, with_ci
from medq.preprocess import PreprocessSpec

log = logging.getLogger("medq")
SPLITS = ("test", "val", "train", "all")
STAGE = "external"


def run_external(run_dir: str | Path, other: Any, *, split: str = "test",
                 mapping: dict[str, list[str]] | str | None = None, threshold: float | None = None) -> dict[str, Any]:
    """Evaluate the run in ``run_dir`` on ``other.data``'s ``split`` (see the module); returns the full result.
    ``mapping``: parsed ``--map`` (:func:`medq.labelmap.parse_map`), else ``other.external.label_map``, else the
    built-in or identical names; ``threshold``: decide every class at it instead of the run's thresholds."""
    from medq.data.cache import cache_root, image_cache
    from medq.runmodel import open_run_model, probabilities

    run_dir = Path(run_dir)
    if split not in SPLITS:
        raise ConfigError(f"--split {split}: use one of {', '.join(SPLITS)} ('all': every image of the dataset)")
    if not runrecord.is_run(run_dir):
        raise runrecord.RunError(f"{run_dir}: not a medq run (no {runrecord.MANIFEST}); `medq runs list` shows them")
    manifest = runrecord.read_manifest(run_dir)
    facts = manifest.facts
    missing = facts.missing("classes", "task", "preprocess")
    if missing:
        raise runrecord.RunError(f"{run_dir / runrecord.MANIFEST}: no {', '.join(missing)} recorded; train or "
                                 "convert the run's model first")
    classes, task = [str(c) for c in facts.classes], str(facts.task)
    index = read_dataset(other.data, other.run.seed, cache_root=cache_root(other))
    paths, y_ext = _split_images(index, split, other.data.root)
    _refuse_own_images(run_dir, paths, other.data.root)
    where = f"external.label_map in {other.source}" if other.source else "external.label_map"
    given = mapping if mapping else labelmap.from_config(other.external.label_map, where)
    lmap = labelmap.resolve(classes, index.classes, given, "--map" if mapping else where)
    for line in lmap.describe():
        log.info("%s", line)

    spec = PreprocessSpec.from_dict(facts.preprocess)
    with runrecord.writer_lock(run_dir, STAGE):
        manifest = runrecord.read_manifest(run_dir)  # as it is now, under the lock: its entries are kept
        model = open_run_model(run_dir)
        chosen = _own_validation_thresholds(run_dir, manifest, model, spec)
        if chosen is not None:
            manifest.facts.thresholds = chosen  # decided with now, committed with the evaluation
        operating = thresholds.run_thresholds(manifest, task, classes, threshold)
        probs, kept = probabilities(model, paths, spec, image_cache(other, spec))
        if not kept:
            raise DataError(f"{other.data.root}: none of the {len(paths)} {split} images could be decoded")
        y_model = mapped_truth(lmap, classes, index.classes, y_ext[kept])
        per_class = class_metrics(lmap, classes, y_model, probs, operating, _own_test(run_dir, manifest))
        root = Path(other.data.root).resolve()
        identity = f"{index.format}|{root}|{other.data.variant or ''}|{split}"
        slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{index.format}-{root.name}-{split}").strip("-") + \
            "-" + hashlib.sha256(identity.encode()).hexdigest()[:8]
        name = f"external_evaluation_{slug}.json"
        counts = {"images": len(paths), "evaluated": len(kept), "skipped": len(paths) - len(kept),
                  "per_external_class": {c: int(n) for c, n in zip(index.classes, y_ext[kept].sum(axis=0))}}
        entry = runrecord.ExternalEvaluation(
            key=identity, dataset_format=index.format, root=str(root), variant=other.data.variant,
            data_source=data_source(root, index.format), split=split, counts=counts, mapping=lmap.to_dict(),
            metrics=per_class, thresholds={"source": operating.source, "values": operating.values,
                                           "notes": operating.notes},
            model=model.key, model_sha256=model.sha256[:12], artifact=name,
            evaluated_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        skipped = sorted(set(range(len(paths))) - set(kept))
        full = entry.to_dict() | {
            "mapping_text": lmap.describe(), "external_classes": list(index.classes), "model_classes": classes,
            "skipped_files": [paths[i] for i in skipped],
            "images": [{"path": paths[i], "external_labels": [c for c, v in zip(index.classes, y_ext[i]) if v >= 0.5],
                        "probabilities": dict(zip(classes, shown_probabilities(row)))}
                       for i, row in zip(kept, probs)]}
        staged = artifacts.write_json(runrecord.staging_path(run_dir, name), full)
        runrecord.commit(run_dir, STAGE, artifacts={f"external_evaluation_{slug}": staged}, inputs=(model.key,),
                         facts={"external_evaluations": manifest.facts.with_external(entry),
                                **({thresholds.MANIFEST_KEY: chosen} if chosen is not None else {})},
                         dataset=index.format, root=str(root), split=split, artifact=name)
    return full


def _own_validation_thresholds(run_dir: Path, manifest: Any, model: Any, spec: PreprocessSpec) -> dict | None:
    """A converted run without current thresholds gets them as plain `medq evaluate` chooses them: on the run's OWN
    validation split (its pinned split.json, never the external images), by the run's recorded policy (its config's
    ``thresholds:``, else the default); None for every other run. Without a pinned split the run's validation images
    are unknown: said, and the evaluation decides at 0.5 as its note says."""
    from medq.config import config_from_dict
    from medq.runmodel import converted_thresholds

    why = thresholds.to_choose(manifest)
    if why is None:
        return None
    split_file = runrecord.recorded_path(run_dir, "split")
    if split_file is None:
        log.warning("thresholds: %s; the run has no pinned split, so its validation images are unknown: run `medq "
                    "evaluate` with the run's own config first (it pins the split and chooses them there)", why)
        return None
    pinned = json.loads(runrecord.verified_path(run_dir, "split").read_text(encoding="utf-8"))
    val = [Sample(str(row[0]), tuple(row[3]), str(row[2])) for row in pinned["samples"] if row[1] == "val"]
    own = DatasetIndex(pinned.get("format", ""), pinned["task"], list(pinned["classes"]), {"val": val})
    runrecord.check_classes(run_dir, manifest, own)
    return converted_thresholds(config_from_dict(manifest.config or {}), manifest, model, own, spec)


def _split_images(index: Any, split: str, root: Any) -> tuple[list[str], np.ndarray]:
    """The paths and label rows of ``split`` (``all``: every split's images, each once)."""
    names = [s for s in ("train", "val", "test") if s in index.splits] if split == "all" else [split]
    samples = [s for name in names for s in index.splits.get(name, [])]
    if not samples:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in index.splits.items())
        raise DataError(f"{root}: the external dataset's {split} split is empty ({sizes}); choose another --split "
                        "(all: every image)")
    labels = np.asarray([s.label for s in samples], dtype=np.float32).reshape(-1, len(index.classes))
    return [s.path for s in samples], labels


def _refuse_own_images(run_dir: Path, paths: list[str], root: Any) -> None:
    """An "external" image the run was trained or selected on (its pinned train/val split) would inflate every
    figure: refused. Its own test images are not external either: said, so the reader knows."""
    split_file = runrecord.recorded_path(run_dir, "split")
    if split_file is None or not split_file.is_file():
        return
    own = {str(Path(s[0]).resolve()): s[1] for s in json.loads(split_file.read_text(encoding="utf-8"))["samples"]}
    found = [own.get(str(Path(p).resolve())) for p in paths]
    seen = [s for s in found if s in ("train", "val")]
    if seen:
        raise DataError(f"{root}: {len(seen)} of these {len(paths)} images are in the run's own "
                        f"{'/'.join(sorted(set(seen)))} split (its training or selection data), so they are not "
                        "external; evaluate on another dataset, or use `medq evaluate` for the run's own test split")
    if any(found):
        log.warning("external data: %d of the %d images are the run's own test images, not external ones",
                    sum(1 for s in found if s), len(paths))


def mapped_truth(lmap: labelmap.LabelMap, classes: list[str], external_classes: list[str],
                 y_ext: np.ndarray) -> np.ndarray:
    """[N, model classes]: 1 where the image carries any external label the model class maps to (unmapped: 0)."""
    y = np.zeros((len(y_ext), len(classes)), dtype=np.float32)
    for c, targets in lmap.pairs.items():
        columns = [external_classes.index(t) for t in targets]
        y[:, classes.index(c)] = (y_ext[:, columns] >= 0.5).any(axis=1)
    return y


def class_metrics(lmap: labelmap.LabelMap, classes: list[str], y_model: np.ndarray, probs: np.ndarray,
                  operating: thresholds.Thresholds, own: dict[str, Any]) -> dict[str, Any]:
    """Per mapped model class: counts, prevalence, AUC [95% CI], the operating point at its threshold, the run's
    own test figures; per unmapped model class: why it is not evaluated."""
    mapped = list(lmap.pairs)
    columns = [classes.index(c) for c in mapped]
    auc = task_metrics("multilabel", y_model[:, columns], probs[:, columns], mapped)
    points = thresholds.held(operating, y_model, probs)["classes"]
    out: dict[str, Any] = {}
    for c in classes:
        if c not in lmap.pairs:
            out[c] = {"evaluated": False, "reason": "no counterpart in the external dataset: not evaluated"}
            continue
        truth = y_model[:, classes.index(c)] >= 0.5
        n_pos, n_neg = int(truth.sum()), int((~truth).sum())
        entry = {"evaluated": True, "external": lmap.pairs[c], "n_positive": n_pos, "n_negative": n_neg,
                 "prevalence": n_pos / len(truth), "auc": auc["per_class_auc"][c],
                 "auc_ci": auc["ci"]["per_class_auc"][c], "operating_point": None, "own_test": own.get(c)}
        if c in points:
            point = points[c]
            entry["operating_point"] = {k: point[k] for k in ("threshold", "sensitivity", "sensitivity_ci",
                                                              "specificity", "specificity_ci")}
        else:  # a binary model's negative class: called wherever its positive class is not
            positive = thresholds.thresholded_classes(operating.task, classes)[0]
            t = operating.values[positive]
            point = thresholds.figures(truth, probs[:, classes.index(positive)] < t)
            entry["operating_point"] = {"threshold": t, "rule": f"{positive} < {t:.4g}",
                                        **{k: point[k] for k in ("sensitivity", "sensitivity_ci", "specificity",
                                                                 "specificity_ci")}}
        if entry["auc"] is None:
            entry["note"] = f"AUC undefined: {n_pos} positive(s) and {n_neg} negative(s) among the external images"
        out[c] = entry
    return out


def _own_test(run_dir: Path, manifest: Any) -> dict[str, Any]:
    """The run's own figures per class from its last `medq evaluate` (evaluation.json), if it is current."""
    if "evaluation" not in manifest.artifacts or not runrecord.usable(run_dir, "evaluation"):
        return {}
    try:
        report = json.loads(runrecord.verified_path(run_dir, "evaluation").read_text(encoding="utf-8"))
    except (OSError, ValueError, runrecord.RunError):
        return {}
    view = report.get("single_crop") or {}
    points = (view.get("operating_points") or {}).get("classes") or {}
    aucs, cis = view.get("per_class_auc") or {}, (view.get("ci") or {}).get("per_class_auc") or {}
    return {c: {"split": report.get("split"), "auc": aucs.get(c), "auc_ci": cis.get(c),
                "sensitivity": (points.get(c) or {}).get("sensitivity"),
                "specificity": (points.get(c) or {}).get("specificity")} for c in aucs}


# --- what the terminal, `medq runs show` and the model card print --------------------------------------------------

def table_rows(entries: list[Any], current_sha: dict[str, str] | None = None) -> list[list[str]]:
    """One row per evaluated class of each external evaluation (a :class:`medq.runrecord.ExternalEvaluation`):
    dataset, split, images, class → external, n+/n−, AUC [CI] (own test), sensitivity and specificity [CI] at the
    threshold; ``current_sha`` (artifact key → sha256) marks evaluations of a model replaced since."""
    rows = []
    for e in entries:
        stale = current_sha is not None and not str(current_sha.get(e.model or "", "")).startswith(
            e.model_sha256 or "-")
        dataset = f"{e.data_source or e.dataset_format or 'external dataset'}" + (
            " (STALE: model replaced since)" if stale else "")
        images = (e.counts or {}).get("evaluated", "n/a")
        for c, m in (e.metrics or {}).items():
            if not m.get("evaluated"):
                rows.append([dataset, e.split or "-", str(images), c, "no counterpart: not evaluated", "", "", "", ""])
                continue
            own = m.get("own_test") or {}
            point = m.get("operating_point") or {}
            rows.append([
                dataset, e.split or "-", str(images), c, " | ".join(m["external"]),
                f"{m['n_positive']}/{m['n_negative']}",
                (with_ci(m["auc"], m.get("auc_ci")) or "n/a") + (f" (own {own['auc']:.3f})"
                                                                if isinstance(own.get("auc"), float) else ""),
                _point(point, "sensitivity"), _point(point, "specificity")])
    return rows


TABLE_HEADER = ["dataset", "split", "images", "model class", "external class(es)", "n+/n-", "AUC [95% CI]",
                "sensitivity [95% CI]", "specificity [95% CI]"]


def _point(point: dict[str, Any], key: str) -> str:
    if not point:
        return "-"
    at = point.get("rule") or f"{point['threshold']:.3g}"
    return f"{with_ci(point.get(key), point.get(f'{key}_ci')) or 'n/a'} @ {at}"


def report_lines(result: dict[str, Any]) -> list[str]:
    """The terminal report of one external evaluation: the mapping in full, the table, the notes."""
    entry = runrecord.ExternalEvaluation.from_dict(result)
    counts = result.get("counts") or {}
    lines = [f"external evaluation: {result.get('data_source')} at {result.get('root')}, {result.get('split')} split: "
             f"{counts.get('evaluated')} images ({counts.get('skipped')} unreadable, skipped); model "
             f"{result.get('model')} {result.get('model_sha256')}", *result.get("mapping_text", [])]
    rows = table_rows([entry])
    widths = [max(len(str(r[i])) for r in [TABLE_HEADER, *rows]) for i in range(len(TABLE_HEADER))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [TABLE_HEADER, *rows]]
    th = result.get("thresholds") or {}
    lines.append(f"thresholds: {th.get('source')} {th.get('values')}")
    lines += [f"note: {n}" for n in th.get("notes") or []]
    lines += [f"note: {c}: {m['note']}" for c, m in (result.get("metrics") or {}).items() if m.get("note")]
    lines.append(f"recorded: {result.get('artifact')} and the run's external_evaluations")
    return lines
