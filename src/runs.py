"""`medq runs list` / `medq runs show NAME`: what runs exist under run.output_dir and what each produced.

Everything is read from each run's manifest.json (config summary, stage entries, artifacts) and benchmark.json
(the benchmark's ``results`` rows). Partial runs (only some stages done) are shown as far as they got; a run whose
manifest cannot be read gets a one-line warning and the listing goes on.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from medq import runrecord
from medq.errors import MedqError
from medq.metrics import with_ci
from medq.subgroups import recorded as recorded_subgroups

log = logging.getLogger("medq")

BENCHMARK_JSON = "benchmark.json"
METRIC_KEYS = ("accuracy", "auc")
SHORT = {"accuracy": "acc"}
PRECISION_PATHS = ("fp32", "bf16", "int8", "int8-bf16")


def resolve_run(name_or_path: str | None, config: Any) -> Path:
    """A run name under ``run.output_dir`` or a run folder; None → the config's own run (``run.name``)."""
    if not name_or_path:
        return config.run_dir
    under_output = Path(config.run.output_dir) / name_or_path
    path = Path(name_or_path)
    if under_output.is_dir() or (not path.is_dir() and len(path.parts) == 1):
        return under_output
    return path


# --- reading -----------------------------------------------------------------------------------------------------

def _get(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _metrics(data: Any) -> dict[str, float]:
    """accuracy / auc out of a metrics dict (None where undefined)."""
    if not isinstance(data, dict):
        return {}
    return {k: _number(data[k]) for k in METRIC_KEYS if _number(data.get(k)) is not None}


def quantize_metrics(entry: runrecord.QuantizeEntry) -> dict[str, dict[str, float]]:
    """{precision path: {accuracy, auc}} on validation, as the quantize stage recorded them (``fp32_val``,
    ``int8_val`` and ``precision_val``)."""
    measured = entry.precision_val or {}
    found = {p: {**_metrics(entry.path_val(p)), **_metrics(measured.get(p))} for p in PRECISION_PATHS}
    return {p: metrics for p, metrics in found.items() if metrics}


def read_benchmark(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(benchmark.json with its ``results`` a list, or None; a warning or None)."""
    path = run_dir / BENCHMARK_JSON
    if not path.is_file():
        return None, None
    try:
        report = json.loads(path.read_text())
        report["results"] = list(report["results"])
    except (ValueError, OSError, KeyError, TypeError) as exc:
        return None, f"{path}: unreadable ({type(exc).__name__}); re-run `medq benchmark`"
    return report, None


def benchmark_rows(run_dir: Path) -> tuple[list[dict[str, Any]], str | None]:
    """(rows of engine, precision, latency_p50_ms, throughput_ips, accuracy, auc; a warning or None), from the
    ``results`` of benchmark.json (schema: :func:`medq.benchmark.report.check_schema`)."""
    report, warning = read_benchmark(run_dir)
    return _rows(report), warning


def _rows(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    results = (report or {}).get("results") or []
    rows = []
    for row in results:
        metrics = _metrics(row.get("metrics"))
        fidelity = row.get("fidelity") or {}
        rows.append({"engine": row.get("engine", "?"), "precision": row.get("precision", ""),
                     "latency_p50_ms": _number((row.get("latency_ms") or {}).get("p50")),
                     "throughput_ips": _number(row.get("throughput_ips")),
                     "accuracy": metrics.get("accuracy"), "auc": metrics.get("auc"),
                     "auc_ci": ((row.get("metrics") or {}).get("ci") or {}).get("auc"),
                     "vs_fp32": (f"{fidelity['conclusion']} (±{fidelity['margin']:g})"
                                 if fidelity.get("conclusion") and row.get("id") != report.get("baseline") else None)})
    return rows


def summarize(run_dir: Path, manifest: runrecord.Manifest) -> dict[str, Any]:
    """What `medq runs` shows about one run."""
    config = manifest.config or {}
    facts = manifest.facts
    pre = facts.preprocess or config.get("preprocess") or {}
    train = manifest.stage(runrecord.TrainEntry)
    quantize = manifest.stage(runrecord.QuantizeEntry)
    present = {}
    for key, entry in manifest.artifacts.items():
        present[key] = {"path": entry.path, "bytes": entry.bytes, "present": (run_dir / entry.path).exists(),
                        "stale": manifest.stale_reason(key)}
    report, warning = read_benchmark(run_dir)
    if warning:
        log.warning("%s", warning)
    finished = [s.finished_at for s in manifest.stages.values() if s.finished_at]
    selected = facts.selected_val_metrics or train.val_metrics
    return {
        "name": run_dir.name,
        "path": str(run_dir),
        "stages": list(manifest.stages),
        "finished_at": max(finished) if finished else None,
        "task": facts.task,
        "classes": facts.classes or [],
        "model": _get(config, "model.name") or train.model,
        "model_params": _get(config, "model.params") or {},
        "model_source": facts.model_source,
        "hyperparameters": facts.selected_hyperparameters or {},
        "parameters": train.parameters,
        "data_format": facts.dataset_format or _get(config, "data.format"),
        "data_source": facts.data_source,
        "data_root": _get(config, "data.root"),
        "split_sizes": train.split_sizes or manifest.stage(runrecord.DataEntry).split_sizes or {},
        "image_size": pre.get("image_size"),
        "channels": pre.get("channels"),
        "normalization": pre.get("normalization"),
        "val_metrics": _metrics(selected),
        "val_ci": (selected or {}).get("ci") or {},
        "objective": facts.objective or _get(config, "run.objective"),
        "best_epoch": train.best_epoch,
        "quantize": quantize_metrics(quantize),
        "quantize_status": quantize.status,
        "benchmark": _rows(report),
        "artifacts": present,
        "external": [e.to_dict() for e in facts.externals()],
        "thresholds": _thresholds_text(facts.thresholds),
        "subgroups": _subgroups_text(recorded_subgroups(manifest.stage(runrecord.EvaluateEntry).to_dict(), report),
                                     manifest),
        "model_sha256": {k: a.sha256 for k, a in manifest.artifacts.items() if k in ("keras_model", "fp32_pb")},
    }


def _thresholds_text(record: dict[str, Any] | None) -> str:
    """'youden on val: 7 of 14 classes chosen (the others at 0.5)' from the run's thresholds fact."""
    if not record:
        return "- (decisions at 0.5: none chosen on validation)"
    classes = record.get("classes") or {}
    chosen = [c for c, e in classes.items()
              if not any(n.startswith("not chosen") for n in (e or {}).get("notes") or [])]
    target = record.get("target")
    policy = f"{record.get('policy')}" + (f" {target:g}" if isinstance(target, (int, float)) else "")
    return (f"{policy} on {record.get('split')}: {len(chosen)} of {len(classes)} classes chosen"
            + (" (the others at 0.5, with a note)" if len(chosen) < len(classes) else "")
            + "; how they held on test: benchmark.md, model_card.md")


def _subgroups_text(table: dict[str, Any] | None, manifest: runrecord.Manifest) -> str:
    """'sex, age, view on test (medq evaluate, single crop): 8 groups, none below overall' from the run's subgroup
    table, evaluate's or else the benchmark FP32 row's (:func:`medq.subgroups.recorded`, as the model card);
    marked STALE when the report it came from is."""
    if not table:
        return "- (`medq evaluate` or `medq benchmark` writes them where the data has patient metadata)"
    key = "evaluation" if table["source"].startswith("medq evaluate") else "benchmark_json"
    stale = manifest.stale_reason(key) if key in manifest.artifacts else None
    mark = f"  STALE: {stale}" if stale else ""
    if not table.get("available"):
        return f"{table.get('note') or 'this dataset has no patient metadata'} ({table['source']}){mark}"
    flagged = table.get("flagged") or []
    return (f"{', '.join(table.get('attributes') or [])} on {table['split']} ({table['source']}): "
            f"{len(table.get('groups') or [])} groups, "
            f"{'below overall: ' + ', '.join(flagged) if flagged else 'none below overall'}{mark}")


def run_summary(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not (run_dir / runrecord.MANIFEST).is_file():
        known = [r["name"] for r in list_runs(run_dir.parent, warn=False)] if run_dir.parent.is_dir() else []
        hint = f"; runs in {run_dir.parent}: {', '.join(known)}" if known else "; `medq runs list` shows the runs"
        raise MedqError(f"{run_dir}: not a medq run (no {runrecord.MANIFEST}){hint}")
    manifest = runrecord.read_manifest(run_dir)
    return summarize(run_dir, manifest) | {"config": manifest.config or {}, "lineage": manifest.lineage()}


def list_runs(output_dir: str | Path, warn: bool = True) -> list[dict[str, Any]]:
    """Every run folder (a folder with a manifest) under ``output_dir``, by name; unreadable manifests are warned
    about in one line each and left out."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    rows = []
    for run_dir in sorted(p for p in output_dir.iterdir() if p.is_dir() and (p / runrecord.MANIFEST).is_file()):
        try:
            manifest = runrecord.read_manifest(run_dir)
        except MedqError as exc:
            if warn:
                log.warning("%s", exc)
            continue
        rows.append(summarize(run_dir, manifest))
    return rows


# --- formatting --------------------------------------------------------------------------------------------------

def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _metric_text(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "-"


def _ci_text(metrics: dict[str, float], ci: dict[str, Any]) -> str:
    """'accuracy 0.9200 [0.8700, 0.9500], auc …' (the intervals the metrics were recorded with)."""
    return ", ".join(f"{k} {with_ci(v, ci.get(k), 4)}" for k, v in metrics.items()) or "-"


def _quant_text(quant: dict[str, dict[str, float]]) -> str:
    """Every precision path the quantize stage measured on the validation split."""
    return "; ".join(f"{p} {_metric_text(quant[p])}" for p in PRECISION_PATHS if p in quant) or "-"


def _short(metrics: dict[str, float]) -> str:
    return " ".join(f"{SHORT.get(k, k)} {v:.3f}" for k, v in metrics.items()) or "-"


def _short_quant(quant: dict[str, dict[str, float]]) -> str:
    """'acc 0.950→0.944' (FP32 → INT8 on the validation split)."""
    fp32, int8 = quant.get("fp32", {}), quant.get("int8", {})
    if not int8:
        return "-"
    return " ".join(f"{SHORT.get(k, k)} {fp32[k]:.3f}→{v:.3f}" if k in fp32 else f"{SHORT.get(k, k)} {v:.3f}"
                    for k, v in int8.items())


def _best_row(rows: list[dict[str, Any]]) -> str:
    timed = [r for r in rows if r["throughput_ips"] is not None]
    if not timed:
        return "-"
    best = max(timed, key=lambda r: r["throughput_ips"])
    latency = f", p50 {best['latency_p50_ms']:.1f} ms" if best["latency_p50_ms"] is not None else ""
    return f"{best['engine']} {best['precision']}".strip() + f" {best['throughput_ips']:.0f} img/s{latency}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]


def format_runs(rows: list[dict[str, Any]], output_dir: str | Path) -> str:
    if not rows:
        return f"no runs in {output_dir} (a run is a folder with a manifest.json; `medq run` makes one)"
    table = [[r["name"], r["model"] or "-", r["data_source"] or r["data_format"] or "-", str(r["image_size"] or "-"),
              ",".join(r["stages"]) or "-", _short(r["val_metrics"]), _short_quant(r["quantize"]),
              _best_row(r["benchmark"])] for r in rows]
    header = ["NAME", "MODEL", "DATA", "SIZE", "STAGES", "VALIDATION", "FP32→INT8 (VAL)", "FASTEST"]
    return "\n".join([f"{len(rows)} run{'s' if len(rows) != 1 else ''} in {output_dir}", *_table(header, table)])


def _size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "?"


def _train_text(train: dict[str, Any]) -> str:
    if not train:
        return "-"
    low = train.get("low_res") or {}
    return (f"{train.get('epochs')} epochs, batch {train.get('batch_size')}, {train.get('optimizer')} lr "
            f"{train.get('learning_rate')}, loss {train.get('loss')}"
            + (f", first {low['epochs']} at {low['image_size']} px" if low.get("epochs") else ""))


def _hyper_text(s: dict[str, Any]) -> str:
    """The hyperparameters of the run's model itself (a winning tuning trial's, not the training config's)."""
    values = s.get("hyperparameters") or {}
    text = ", ".join(f"{k} {v}" for k, v in values.items()) or "-"
    return f"{text}  (from {s['model_source']})" if s.get("model_source") and values else text


def format_run(s: dict[str, Any]) -> str:
    classes = ", ".join(s["classes"]) or "-"
    params = ", ".join(f"{k}={v}" for k, v in s["model_params"].items())
    model = f"{s['model'] or '-'}" + (f" ({params})" if params else "")
    if s["parameters"]:
        model += f", {s['parameters']:,} parameters"
    if s["model_source"]:
        model += f", selected by {s['model_source']}"
    splits = ", ".join(f"{k} {v}" for k, v in s["split_sizes"].items())
    lines = [
        f"run {s['name']}  ({s['path']})",
        f"  stages      {', '.join(s['stages']) or 'none'}" + (f"  (last {s['finished_at']})" if s["finished_at"] else ""),
        f"  task        {s['task'] or '-'}: {classes}",
        f"  model       {model}",
        f"  data        {s['data_source'] or s['data_format'] or '-'} at {s['data_root'] or '-'}"
        + (f"  ({splits})" if splits else ""),
        f"  preprocess  {s['image_size'] or '-'} px, {s['channels'] or '-'} channel(s), {s['normalization'] or '-'}",
        f"  training    {_train_text(s.get('config', {}).get('train') or {})}",
        f"  selected    {_hyper_text(s)}",
        f"  objective   {s.get('objective') or '- (not recorded)'} (run.objective: epochs, trials and INC)",
        f"  validation  {_ci_text(s['val_metrics'], s.get('val_ci') or {})}"
        + (f"  (best epoch {s['best_epoch']})" if s["best_epoch"] else ""),
        f"  quantize    {_quant_text(s['quantize'])}"
        + (f"  ({s['quantize_status']})" if s.get("quantize_status") else "")
        + ("  STALE (see int8_pb below)" if (s["artifacts"].get("int8_pb") or {}).get("stale") else ""),
        f"  thresholds  {s['thresholds']}",
        f"  subgroups   {s['subgroups']}",
    ]
    if s["artifacts"]:
        lines.append("  artifacts (made from → ...; STALE ones are never loaded)")
        made_from = {row["key"]: row["made_from"] for row in s.get("lineage") or []}
        for key, a in s["artifacts"].items():
            state = _size(a["bytes"]) if a["present"] else "MISSING"
            origin = ", ".join(made_from.get(key) or {})
            lines.append(f"    {key:<14} {a['path']}  {state}" + (f"  ← {origin}" if origin else "")
                         + (f"  STALE: {a['stale']}" if a.get("stale") else ""))
    lines += _external_lines(s)
    if s["benchmark"]:
        stale = (s["artifacts"].get("benchmark_json") or {}).get("stale")
        lines.append("  benchmark" + (f"   STALE: {stale}; rerun `medq benchmark`" if stale else ""))
        table = [[r["engine"], r["precision"], _fmt(r["latency_p50_ms"], 2), _fmt(r["throughput_ips"], 1),
                  _fmt(r["accuracy"], 4), with_ci(r["auc"], r.get("auc_ci"), 4) or "-", r.get("vs_fp32") or "-"]
                 for r in s["benchmark"]]
        lines += ["    " + line for line in _table(["ENGINE", "PRECISION", "P50 MS", "IMG/S", "ACCURACY",
                                                     "AUC [95% CI]", "VS FP32"], table)]
    else:
        lines.append("  benchmark   - (not run)")
    return "\n".join(lines)


def _external_lines(s: dict[str, Any]) -> list[str]:
    """The run's external evaluations (medq.external): one row per model class of each."""
    from medq.external import TABLE_HEADER, table_rows

    entries = [runrecord.ExternalEvaluation.from_dict(e) for e in s.get("external") or []]
    if not entries:
        return ["  external    - (none: `medq evaluate --run NAME --config OTHER.yaml`)"]
    lines = ["  external evaluations (the run's thresholds; own = its own test AUC)"]
    return lines + ["    " + line for line in _table(TABLE_HEADER, table_rows(entries, s.get("model_sha256")))]
