"""Numerical parity between engines on phantom chest radiographs, preprocessed exactly as the model will be fed.

Every pair of engines gets the max and mean absolute difference of the probabilities and the top-class agreement,
and, when medq appended the head, the difference of the network's own outputs (logits) relative to their size.
The report goes to a JSON file in the run folder and to the console; a difference above the tolerance (or a
non-finite output) stops the conversion.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medq import artifacts
from medq.errors import MedqError
from medq.preprocess import PreprocessSpec, preprocess

CAUSES = ("normal", "bacteria", "virus")
SATURATED = 1e-6  # a probability this close to 0 or 1 says little about the network behind it


def phantom_batch(spec: PreprocessSpec, n: int) -> np.ndarray:
    """``n`` chest phantoms (seeds 0..n-1, normal/bacterial/viral in turn) → float32 ``[n, S, S, C]``."""
    from medq.data.phantoms import draw_chest

    images = [draw_chest(np.random.default_rng(i), spec.image_size, CAUSES[i % len(CAUSES)])[0] for i in range(n)]
    return np.stack([preprocess(image, spec) for image in images]).astype(np.float32)


def noise_batch(spec: PreprocessSpec, n: int, seed: int = 0) -> np.ndarray:
    """``n`` images of uniform 8-bit noise, preprocessed → float32 ``[n, S, S, C]`` (the whole normalised range)."""
    rng = np.random.default_rng(seed)
    shape = (spec.image_size, spec.image_size) + ((3,) if spec.channels == 3 else ())
    return np.stack([preprocess(rng.integers(0, 256, shape, dtype=np.uint8), spec) for _ in range(n)])


def run_frozen(graph_def, x: np.ndarray, input_name: str = "input", output_name: str = "output",
               batch_size: int | None = None) -> np.ndarray:
    from medq.graph import FrozenGraph

    with FrozenGraph(graph_def, input_name, output_name) as runner:
        return runner.predict(x, batch_size=batch_size or len(x))


def in_batches(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int) -> np.ndarray:
    """``predict`` over ``x`` in chunks of ``batch`` (a model with a fixed batch; the last chunk may be shorter)."""
    return np.concatenate([predict(x[i:i + batch]) for i in range(0, len(x), batch)])


def _pair(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    scale = max(1.0, float(np.abs(a).max())) if finite else 1.0
    return {"max_abs_diff": float(diff.max()) if finite else float("nan"),
            "mean_abs_diff": float(diff.mean()) if finite else float("nan"),
            "max_rel_diff": float(diff.max()) / scale if finite else float("nan"),
            "top1_agreement": float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))}


def _compare(outputs: dict[str, np.ndarray]) -> dict[str, Any] | str:
    shapes = {name: list(y.shape) for name, y in outputs.items()}
    if len({tuple(s) for s in shapes.values()}) != 1:
        return f"output shapes differ: {shapes}"
    return {f"{a}~{b}": _pair(outputs[a], outputs[b]) for a, b in itertools.combinations(outputs, 2)}


def _worst(pairs: dict[str, Any], key: str) -> float:
    values = [p[key] for p in pairs.values()]
    return float("nan") if any(np.isnan(values)) else max(values)


def parity_report(probabilities: dict[str, np.ndarray], spec: PreprocessSpec, tolerance: float,
                  raw: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """``probabilities``: engine → ``[n, classes]`` on the same ``phantom_batch``; the first engine is the reference.

    ``raw``: the same engines' outputs before medq's head (logits), when one was appended. Saturated probabilities
    (exactly 0 or 1) agree whatever the network computes, so logits are compared too, relative to their magnitude.
    """
    n = len(next(iter(probabilities.values())))
    report: dict[str, Any] = {
        "passed": False, "tolerance": tolerance, "images": n,
        "inputs": f"medq.data.phantoms.draw_chest seeds 0..{n - 1} ({'/'.join(CAUSES)} in turn), "
                  f"preprocessed with {spec.to_dict()}",
        "engines": list(probabilities),
    }
    pairs = _compare(probabilities)
    raw_pairs = _compare(raw) if raw else {}
    if isinstance(pairs, str) or isinstance(raw_pairs, str):
        return report | {"error": pairs if isinstance(pairs, str) else raw_pairs}
    reference = next(iter(probabilities.values()))
    report |= {"max_abs_diff": _worst(pairs, "max_abs_diff"), "pairs": pairs,
               "saturated_fraction": float(np.mean(np.minimum(reference, 1.0 - reference) < SATURATED))}
    failed = not report["max_abs_diff"] <= tolerance  # NaN fails too
    if raw_pairs:
        report["raw_outputs"] = {"max_rel_diff": _worst(raw_pairs, "max_rel_diff"), "pairs": raw_pairs}
        failed = failed or not report["raw_outputs"]["max_rel_diff"] <= tolerance
    report["passed"] = not failed
    return report


def format_report(report: dict[str, Any]) -> str:
    if "error" in report:
        return f"parity: FAILED ({report['error']})"
    lines = [f"parity on {report['images']} phantom images, tolerance {report['tolerance']:.0e}: "
             + ("passed" if report["passed"] else "FAILED")]
    for name, p in report["pairs"].items():
        lines.append(f"  {name:<32} max |diff| {p['max_abs_diff']:.2e}  mean {p['mean_abs_diff']:.2e}  "
                     f"top-1 agreement {p['top1_agreement']:.0%}")
    for name, p in report.get("raw_outputs", {}).get("pairs", {}).items():
        lines.append(f"  {name + ' (logits)':<32} max |diff| {p['max_abs_diff']:.2e}  relative {p['max_rel_diff']:.2e}")
    if "note" in report:
        lines.append(f"  note: {report['note']}")
    if report["saturated_fraction"] > 0.5 and "raw_outputs" not in report:
        lines.append(f"  warning: {report['saturated_fraction']:.0%} of the probabilities are saturated at 0 or 1 on "
                     "these inputs, where engines agree whatever they compute; check on real images too")
    return "\n".join(lines)


def record(report: dict[str, Any], target: Path, where: str | Path, verbose: bool) -> None:
    """Write the report (also when it failed: it is the diagnosis), print it, and raise if it failed."""
    artifacts.write_json(target, report)
    if verbose:
        print(format_report(report))
    if not report["passed"]:
        detail = report.get("error") or f"max |diff| {report['max_abs_diff']:.2e}"
        if "raw_outputs" in report:
            detail += f", logits relative {report['raw_outputs']['max_rel_diff']:.2e}"
        detail += f" > tolerance {report['tolerance']:.0e}" if "error" not in report else ""
        raise MedqError(f"{where}: converted model does not match the source ({detail}); details in {target}")


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The parity facts the manifest keeps."""
    keys = ("passed", "tolerance", "max_abs_diff", "saturated_fraction", "images", "batch")
    facts = {k: report[k] for k in keys if k in report}
    if "raw_outputs" in report:
        facts["logits_max_rel_diff"] = report["raw_outputs"]["max_rel_diff"]
    return facts
