"""benchmark.json → comparisons against TensorFlow FP32, benchmark.md, benchmark.png and the one-screen summary."""
from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Any

from medq import artifacts, engines
from medq.metrics import OPERATING_POINTS, with_ci

BENCHMARK_JSON = "benchmark.json"
BENCHMARK_MD = "benchmark.md"
BENCHMARK_PNG = "benchmark.png"
FLAG_NAMES = (("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"), ("avx512_bf16", "AVX512-BF16"),
              ("amx_bf16", "AMX-BF16"), ("amx_int8", "AMX-INT8"))
VERSION_KEYS = ("python", "intel-tensorflow", "numpy", "neural-compressor")  # then each engine's (medq.engines)


def _ratio(a: Any, b: Any) -> float | None:
    return float(a) / float(b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def _delta(a: Any, b: Any) -> float | None:
    return float(a) - float(b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def baseline_row(report: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in report["results"] if r["id"] == report.get("baseline")), None)


def add_comparisons(report: dict[str, Any]) -> None:
    """Each row's ``vs_fp32``: throughput (main batch) and latency p50 speed-ups over TensorFlow FP32, per-batch and
    multi-instance throughput ratios, and metric deltas. All None when the FP32 row is missing."""
    base = baseline_row(report)
    for row in report["results"]:
        b = base or {}
        bm, rm = b.get("metrics", {}), row.get("metrics", {})
        row["vs_fp32"] = {
            "throughput_speedup": _ratio(row.get("throughput_ips"), b.get("throughput_ips")),
            "latency_speedup": _ratio(b.get("latency_ms", {}).get("p50"), row["latency_ms"]["p50"]),
            "throughput_speedup_by_batch": {bs: _ratio(v, b.get("throughput_by_batch", {}).get(bs))
                                            for bs, v in row.get("throughput_by_batch", {}).items()},
            "accuracy_delta": _delta(rm.get("accuracy"), bm.get("accuracy")),
            "auc_delta": _delta(rm.get("auc"), bm.get("auc")),
        }
        base_mi = {m["layout"]: m for m in b.get("multi_instance", []) if "throughput_ips" in m}
        for m in row.get("multi_instance", []):
            if "throughput_ips" in m:
                m["speedup_vs_fp32"] = _ratio(m["throughput_ips"], base_mi.get(m["layout"], {}).get("throughput_ips"))


# --- formatting helpers -----------------------------------------------------------------------------------------

def _f(value: Any, digits: int = 2, suffix: str = "") -> str:
    return f"{value:.{digits}f}{suffix}" if isinstance(value, (int, float)) else "—"


def _x(value: Any) -> str:
    return f"{value:.2f}×" if isinstance(value, (int, float)) else "—"


def _signed(value: Any) -> str:
    return f"{value:+.4f}" if isinstance(value, (int, float)) else "—"


def _size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "—"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def environment_lines(report: dict[str, Any]) -> list[str]:
    env = report["environment"]
    cpu = env["cpu"]
    flags = ", ".join(f"{label} {'yes' if cpu.get(key) else 'no'}" for key, label in FLAG_NAMES)
    threads = ", ".join(f"{k}={v}" for k, v in env["thread_environment"].items())
    keys = dict.fromkeys(VERSION_KEYS + engines.version_keys())
    versions = ", ".join(f"{k} {env['versions'][k]}" for k in keys if k in env["versions"])
    load = env.get("load_average", {})
    return [f"CPU: {cpu.get('model')} ({cpu.get('physical_cores')} physical cores, {cpu.get('logical_cpus')} logical)",
            f"Flags: {flags}", f"Threads: {threads}", f"Versions: {versions}",
            f"Load average (1 min) before/after: {_f((load.get('before') or [None])[0])} / "
            f"{_f((load.get('after') or [None])[0])}"]


def _ci(metrics: dict[str, Any], key: str) -> str:
    return with_ci(metrics.get(key), (metrics.get("ci") or {}).get(key), 4) or "—"


def main_table(report: dict[str, Any]) -> str:
    bs = report["settings"]["batch_size"]
    header = ["engine", "precision", "size", "p50 ms", "p90 ms", "p99 ms", f"img/s @{bs}", "× throughput",
              "× latency", "accuracy [95% CI]", "AUC [95% CI]", "Δ accuracy", "Δ AUC"]
    rows = []
    for r in report["results"]:
        lat, vs, m = r["latency_ms"], r.get("vs_fp32", {}), r.get("metrics", {})
        rows.append([r["engine"], r["precision"], _size(r.get("model_bytes")), _f(lat["p50"]), _f(lat["p90"]),
                     _f(lat["p99"]), _f(r["throughput_ips"], 1), _x(vs.get("throughput_speedup")),
                     _x(vs.get("latency_speedup")), _ci(m, "accuracy"), _ci(m, "auc"),
                     _signed(vs.get("accuracy_delta")), _signed(vs.get("auc_delta"))])
    return _table(header, rows)


def _thresholds_text(report: dict[str, Any], threshold: Any) -> str:
    """'0.42' (one for all), 'A 0.3, B 0.5' (a few classes) or where they are listed: the run's operating thresholds
    every row decides at."""
    values = (report.get("thresholds") or {}).get("values")
    if values and len(values) > 3:
        return "the run's thresholds (see the operating-threshold section)"
    if values:
        return ", ".join(f"{c} {v:.3g}" for c, v in values.items())
    return f"{threshold:g}" if isinstance(threshold, (int, float)) else "the run's thresholds"


def fidelity_section(report: dict[str, Any]) -> list[str]:
    """Every row paired with TF FP32 on the same images: AUC difference (paired DeLong) with its interval, the
    verdict against the margin in words, decisions flipped at the threshold, |Δ probability|."""
    rows = [r for r in report["results"] if r.get("fidelity") and r["id"] != report["baseline"]]
    if not rows:
        return []
    first = rows[0]["fidelity"]
    margin, n = first["margin"], first["n_images"]
    table = []
    for r in rows:
        f = r["fidelity"]
        ci = f.get("auc_difference_ci")
        diff = f"{_signed(f.get('auc_difference'))} [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "—"
        table.append([r["id"], diff, f["verdict"], f"{f['flipped_images']} ({100 * f['flipped_fraction']:.1f}%)",
                      _f(f["max_abs_diff"], 5), _f(f["mean_abs_diff"], 5)])
    return [f"## Fidelity against {report['baseline']} (paired, the same {n} test images)", "",
            _table(["row", "Δ AUC [95% CI]", f"verdict (margin ±{margin:g} AUC)",
                    f"decisions flipped at {_thresholds_text(report, first['threshold'])}", r"max \|Δ probability\|",
                    r"mean \|Δ probability\|"],
                   table), "",
            f"Δ AUC: row − FP32, {'mean AUC over the classes, ' if report['task'] != 'binary' else ''}"
            "DeLong's test for correlated ROC curves on the same images. Equivalent means the whole 95% interval of "
            f"the difference lies within ±{margin:g} (benchmark.equivalence_margin); an interval that crosses the "
            "margin proves neither. A flipped decision: the image's call (the class, or any finding for multi-label) "
            "at the threshold differs from FP32's.", ""]


def thresholds_section(report: dict[str, Any]) -> list[str]:
    """Sensitivity and specificity at the run's operating thresholds on the test split, every row at FP32's
    thresholds: a quantized path that keeps its AUC can still move a clinical operating point. The figures are
    :func:`medq.thresholds.held`'s (the decision rule's calls: multiclass, the one class arg-max(p − t))."""
    from medq.thresholds import at

    rows = [r for r in report["results"] if ((r.get("metrics") or {}).get("operating_points") or {}).get("classes")]
    if not rows:
        return []
    points = rows[0]["metrics"]["operating_points"]
    table, unjudged = [], {}
    for c in points["classes"]:
        if not points["classes"][c]["n_positive"]:  # no sensitivity to show: one line below instead of a row each
            unjudged[c] = [r["metrics"]["operating_points"]["classes"][c]["specificity"] for r in rows
                           if c in r["metrics"]["operating_points"]["classes"]]
            continue
        for r in rows:
            p = r["metrics"]["operating_points"]["classes"].get(c)
            if p is None:
                continue
            val = p.get("validation") or {}
            table.append([c, f"{p['threshold']:.4g}", r["id"],
                          with_ci(p["sensitivity"], p["sensitivity_ci"], 3) or "n/a",
                          with_ci(p["specificity"], p["specificity_ci"], 3) or "n/a",
                          f"{p['n_positive']}+ / {p['n_negative']}−",
                          f"{_f(val.get('sensitivity'), 3)} / {_f(val.get('specificity'), 3)}" if val else "—"])
    return (["## Operating thresholds on the test split (every row at the run's thresholds)", "",
             _table(["class", "threshold", "row", "sensitivity [95% CI]", "specificity [95% CI]", "test images",
                     "validation sens. / spec. (chosen at)"], table), "",
             f"Thresholds: {points['source']}; {points['decision_rule']}. Intervals: Wilson 95%."]
            + ([f"No positives in the test split (no sensitivity; specificity over the rows): " + ", ".join(
                f"{at(points.get('task'), c, points['classes'][c]['threshold'])}: {_f(min(v), 3)}–{_f(max(v), 3)}"
                if None not in v else c for c, v in unjudged.items())] if unjudged else [])
            + [f"Note: {n}" for n in points.get("notes") or []] + [""])


def clinical_section(report: dict[str, Any]) -> list[str]:
    """Operating points and calibration per row: a quantized model can keep its AUC and move its operating point."""
    rows = [r for r in report["results"] if r.get("clinical")]
    if not rows:
        return []
    points = [f"{p:.2f}" for p in OPERATING_POINTS]
    header = (["row"] + [f"sensitivity @ specificity {p}" for p in points]
              + [f"specificity @ sensitivity {p}" for p in points] + ["Brier", "ECE"])
    table = [[r["id"]] + [_f(r["clinical"]["sensitivity_at_specificity"].get(p), 4) for p in points]
             + [_f(r["clinical"]["specificity_at_sensitivity"].get(p), 4) for p in points]
             + [_f(r["clinical"].get("brier"), 4), _f(r["clinical"].get("ece"), 4)] for r in rows]
    scope = {"binary": "of the positive class", "multilabel": "means over the labels (per label in benchmark.json)",
             "multiclass": "one-vs-rest means over the classes; Brier multi-class, ECE of the top class"}
    return ["## Clinical operating points and calibration", "", _table(header, table), "",
            f"Operating points ({scope.get(report['task'], '')}): the best sensitivity of any threshold that keeps the "
            "specificity at least as stated, and the other way round. ECE: 10 equal-width probability bins.", ""]


def subgroup_section(report: dict[str, Any]) -> list[str]:
    """Each precision path's subgroup table (medq.subgroups), with each subgroup's paired AUC difference to the
    baseline: a quantized model must not fail one group only."""
    from medq.subgroups import markdown as subgroup_lines

    rows = [r for r in report["results"] if r.get("subgroups")]
    if not rows:
        return []
    if not rows[0]["subgroups"].get("available"):
        return ["## Subgroups", "", *subgroup_lines(rows[0]["subgroups"]), ""]
    out = ["## Subgroups (test split, at the run's thresholds, 95% intervals)", ""]
    for r in rows:
        paired = r["id"] != report.get("baseline") and "vs_reference" in r["subgroups"]["overall"]
        out += [f"### {r['id']}", "", *subgroup_lines(r["subgroups"], report.get("baseline") if paired else None), ""]
    return out


def markdown(report: dict[str, Any]) -> str:
    s, inputs = report["settings"], report["inputs"]
    out = [f"# Benchmark: {report['run']}", "",
           f"{report['created_at']} · {report['task']} · data: {report.get('data_source') or 'not recorded'} · "
           f"test split: {inputs['n_images']} images "
           f"(`{inputs['path']}`, sha256 `{inputs['sha256'][:16]}…`, identical for every row) · "
           f"selection objective: {report['objective']} (run.objective)", "", "## Environment", ""]
    out += [f"- {line}" for line in environment_lines(report)]
    out += ["", f"## Results (speed-ups and deltas against {report['baseline']})", "", main_table(report), ""]
    if report["results"]:
        sizes = [str(b) for b in s["batch_sizes"]]
        out += ["## Throughput by batch size (img/s; speed-up vs TF FP32)", "",
                _table(["engine", "precision"] + [f"batch {b}" for b in sizes],
                       [[r["engine"], r["precision"]] + [
                           f"{_f(r['throughput_by_batch'].get(b), 1)} ({_x(r['vs_fp32']['throughput_speedup_by_batch'].get(b))})"
                           for b in sizes] for r in report["results"]]), ""]
    layouts = s.get("instances") or []
    mi_rows = [r for r in report["results"] if r.get("multi_instance")]
    if layouts and mi_rows:
        out += [f"## Multi-instance throughput (img/s at batch {s['batch_size']}, instances × cores each, "
                "each instance pinned to its cores; the sum of the instances' medians, then in brackets all images "
                "over the wall time from the first start to the last end)", ""]
        cells = []
        for r in mi_rows:
            by = {m["layout"]: m for m in r["multi_instance"]}
            cells.append([r["engine"], r["precision"]] + [
                (f"{_f(by[name]['throughput_ips'], 1)} ({_x(by[name].get('speedup_vs_fp32'))}) "
                 f"[wall {_f(by[name].get('wall_throughput_ips'), 1)}]"
                 if "throughput_ips" in by.get(name, {}) else "failed" if name in by else "—") for name in layouts])
        out += [_table(["engine", "precision"] + [name.replace("x", " × ") for name in layouts], cells), ""]
    out += fidelity_section(report) + thresholds_section(report) + clinical_section(report) + subgroup_section(report)
    if report["task"] in ("multilabel", "multiclass") and report["results"]:
        out += ["## Per-class AUC [95% DeLong CI]", "",
                _table(["class"] + [r["id"] for r in report["results"]],
                       [[c] + [with_ci(r["metrics"].get("per_class_auc", {}).get(c),
                                       (r["metrics"].get("ci") or {}).get("per_class_auc", {}).get(c), 3) or "—"
                               for r in report["results"]] for c in report["classes"]]), ""]
    if report["skipped"]:
        out += ["## Skipped", ""] + [f"- **{s_['id']}**: {s_['reason']}" for s_ in report["skipped"]] + [""]
    preset = report.get("preset")
    if preset:
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in preset["stage_seconds"].items())
        out += ["## Preset", "", f"- Command: `{preset['command']}` (config `{preset['config_file']}`)",
                f"- Wall time: {preset['total_seconds']:.0f} s ({stages})", ""]
    out += ["## Method", "",
            "- Each row ran in its own process (`python -m medq.benchmark.worker`), one after another; the "
            "multi-instance rows run their instances concurrently on purpose, each pinned with sched_setaffinity.",
            f"- Latency: batch 1, {s['warmup']} warm-up runs, then {s['latency_iterations']} timed runs "
            "(percentiles of those). Throughput: per batch size, "
            f"{s['warmup']} warm-up + {s['throughput_iterations']} timed batches; batch size / median batch time "
            "(the mean-based figure is in benchmark.json)."
            + (f" Every row was measured in {s['repeats']} rounds (a fresh process each, rounds interleaved across "
               "rows); the figures are the medians of the rounds." if s.get("repeats", 1) > 1 else ""),
            "- Metrics: every test image, predicted in the same process after timing; the thread environment above "
            "was set for every worker before its runtime started. 95% intervals: DeLong for AUC (per class, and "
            "the mean over classes), Wilson for accuracy (over images), sensitivity and specificity.",
            "- OpenVINO rows set INFERENCE_PRECISION_HINT explicitly (f32 or bf16): its CPU default on AMX hardware "
            "is bf16."]
    perf = s.get("deploy_performance")
    if perf:
        out += [f"- `{perf['file']}` evaluation.performance: its num_of_instance × cores_per_instance "
                f"({perf.get('num_of_instance')} × {perf.get('cores_per_instance')}) is a multi-instance layout above; "
                "its warmup, iteration and thread keys are for INC's own benchmark, which medq does not run — "
                "warm-up, iterations and threads here come from the medq config (benchmark:, runtime:)."]
    out += [f"- Note: {n}" for n in report.get("notes", [])]
    return "\n".join(out) + "\n"


def chart_png(report: dict[str, Any]) -> bytes:
    """Throughput at the main batch size, latency p50 (p90/p99 whiskers) and the primary metric, one row each."""
    import matplotlib.pyplot as plt

    fig = chart_figure(report)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def chart_figure(report: dict[str, Any]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = [r["id"] for r in rows] or ["(no rows)"]
    primary = report["objective"]
    footer = "\n".join(textwrap.fill(line, 200) for line in environment_lines(report)[:4])
    footer_inches = 0.16 + 0.13 * (footer.count("\n") + 1)
    height = 1.8 + 0.45 * len(labels) + footer_inches
    fig, axes = plt.subplots(1, 3, figsize=(15, height), sharey=True)
    y = range(len(rows))
    thr = [r["throughput_ips"] for r in rows]
    axes[0].barh(list(y), thr, color="#4C72B0")
    for i, r in enumerate(rows):
        axes[0].text(thr[i], i, f" {_x(r['vs_fp32']['throughput_speedup'])}", va="center", fontsize=8)
    axes[0].set_title(f"throughput, batch {report['settings']['batch_size']} (img/s)")
    p50 = [r["latency_ms"]["p50"] for r in rows]
    whisker = [[0 for _ in rows], [r["latency_ms"]["p99"] - r["latency_ms"]["p50"] for r in rows]]
    axes[1].barh(list(y), p50, xerr=whisker if rows else None, color="#DD8452", capsize=3)
    for i, r in enumerate(rows):
        axes[1].text(p50[i], i, f" {_x(r['vs_fp32']['latency_speedup'])}", va="bottom", fontsize=8)
    axes[1].set_title("latency, batch 1 (ms; p50, whisker to p99)")
    _metric_panel(axes[2], rows, primary)
    axes[0].set_yticks(list(range(len(labels))))
    axes[0].set_yticklabels(labels)
    axes[0].invert_yaxis()
    fig.suptitle(f"medq benchmark: {report['run']}", fontsize=11)
    fig.text(0.01, 0.01, footer, fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, (footer_inches + 0.1) / height, 1, 1 - 0.35 / height))
    return fig


def _metric_panel(ax, rows: list[dict[str, Any]], primary: str) -> None:
    """Each row's metric as a point with its 95% interval, on an axis zoomed to the values and intervals (INT8 and
    FP32 differ in the third decimal: on a 0-1 axis every bar looks the same)."""
    ends: list[float] = []
    for i, r in enumerate(rows):
        value = r["metrics"].get(primary)
        if value is None:
            ax.text(0.5, i, "n/a", va="center", ha="center", fontsize=8, transform=ax.get_yaxis_transform())
            continue
        ci = (r["metrics"].get("ci") or {}).get(primary)
        low, high = (ci[0], ci[1]) if ci else (value, value)
        ax.errorbar([value], [i], xerr=[[value - low], [high - value]], fmt="o", color="#55A868", capsize=3)
        ax.annotate(f"{value:.4f}", (value, i), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        ends += [low, high, value]
    if ends:
        pad = max(0.005, 0.08 * (max(ends) - min(ends)))
        ax.set_xlim(max(0.0, min(ends) - pad), min(1.0, max(ends) + pad))
    fp32 = next((r["metrics"].get(primary) for r in rows if r["id"] == "tensorflow-fp32"), None)
    if fp32 is not None:
        ax.axvline(fp32, color="grey", linewidth=0.8, linestyle="--")
    ax.set_title(f"test {primary} (95% interval; dashed: TF FP32)")


def write_reports(run_dir: str | Path, report: dict[str, Any]) -> dict[str, Path]:
    """benchmark.json, benchmark.md, benchmark.png in the run folder, each written atomically."""
    run_dir = Path(run_dir)
    return {"benchmark_json": artifacts.write_json(run_dir / BENCHMARK_JSON, report),
            "benchmark_md": artifacts.write_text(run_dir / BENCHMARK_MD, markdown(report)),
            "benchmark_png": artifacts.write_bytes(run_dir / BENCHMARK_PNG, chart_png(report))}


def summary_text(report: dict[str, Any]) -> str:
    """One screen: each row's latency, throughput, metric and speed-up against TF FP32, then INT8 vs FP32."""
    bs = report["settings"]["batch_size"]
    primary = report["objective"]
    cpu = report["environment"]["cpu"]
    flags = "/".join(label for key, label in (("vnni", "VNNI"), ("bf16", "BF16"), ("amx_int8", "AMX")) if cpu.get(key))
    lines = [f"benchmark {report['run']}: {report['inputs']['n_images']} test images, {cpu.get('model')} "
             f"({flags or 'no VNNI/BF16/AMX'}), {report['environment']['thread_environment'].get('OMP_NUM_THREADS')} "
             "threads",
             f"{'row':<26}{'p50 ms':>9}{'img/s@' + str(bs):>11}{'×thr':>7}{'×lat':>7}{primary:>10}{'Δ':>9}"]
    for r in report["results"]:
        vs = r["vs_fp32"]
        delta = vs.get("auc_delta" if primary == "auc" else "accuracy_delta")
        lines.append(f"{r['id']:<26}{_f(r['latency_ms']['p50']):>9}{_f(r['throughput_ips'], 1):>11}"
                     f"{_x(vs['throughput_speedup']):>7}{_x(vs['latency_speedup']):>7}"
                     f"{_f(r['metrics'].get(primary), 4):>10}{_signed(delta):>9}")
    by_id = {r["id"]: r for r in report["results"]}
    if "tensorflow-int8" in by_id and "tensorflow-fp32" in by_id:
        vs = by_id["tensorflow-int8"]["vs_fp32"]
        delta = vs.get("auc_delta" if primary == "auc" else "accuracy_delta")
        lines.append(f"INT8 vs FP32 (TensorFlow): {_x(vs['throughput_speedup'])} throughput, "
                     f"{_x(vs['latency_speedup'])} latency, {primary} {_signed(delta)}")
        fidelity = by_id["tensorflow-int8"].get("fidelity")
        if fidelity:
            lines.append(f"  {fidelity['verdict']}; {100 * fidelity['flipped_fraction']:.1f}% of decisions flipped")
    for s in report["skipped"]:  # wrapped whole, never cut: a reason may end in a command to paste
        lines += _wrapped(f"skipped {s['id']}: {s['reason']}")
    for note in report.get("notes", []):
        if note.startswith("the machine was busy"):
            lines += _wrapped(f"note: {note}")
    return "\n".join(lines)


def _wrapped(text: str, width: int = 110) -> list[str]:
    """``text`` over lines of at most ``width`` characters, broken between words only (paths, file names and
    hyphenated words stay whole), continuation lines indented."""
    return textwrap.wrap(text, width, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)
