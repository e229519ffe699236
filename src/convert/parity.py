"""Numerical parity between engines on phantom chest radiographs, preprocessed exactly as the model will be fed.

Every pair of engines gets the max and mean absolute difference of the probabilities and the top-class agreement;
the report goes to a JSON file in the run folder and to the console, and a difference above the tolerance (or a
non-finite output) stops the conversion.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from medq import artifacts
from medq.errors import MedqError
from medq.preprocess import PreprocessSpec, preprocess

CAUSES = ("normal", "bacteria", "virus")


def phantom_batch(spec: PreprocessSpec, n: int) -> np.ndarray:
    """``n`` chest phantoms (seeds 0..n-1, normal/bacterial/viral in turn) → float32 ``[n, S, S, C]``."""
    from medq.data.phantoms import draw_chest

    images = [draw_chest(np.random.default_rng(i), spec.image_size, CAUSES[i % len(CAUSES)])[0] for i in range(n)]
    return np.stack([preprocess(image, spec) for image in images]).astype(np.float32)


def run_frozen(graph_def, x: np.ndarray, input_name: str = "input", output_name: str = "output") -> np.ndarray:
    from medq.graph import FrozenGraph

    runner = FrozenGraph(graph_def, input_name, output_name)
    try:
        return runner.predict(x, batch_size=len(x))
    finally:
        runner.close()


def _pair(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    return {"max_abs_diff": float(diff.max()) if finite else float("nan"),
            "mean_abs_diff": float(diff.mean()) if finite else float("nan"),
            "top1_agreement": float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))}


def parity_report(outputs: dict[str, np.ndarray], spec: PreprocessSpec, tolerance: float) -> dict[str, Any]:
    """``outputs``: engine name → probabilities ``[n, classes]`` on the same ``phantom_batch``."""
    shapes = {name: list(y.shape) for name, y in outputs.items()}
    if len({tuple(s) for s in shapes.values()}) != 1:
        return {"passed": False, "tolerance": tolerance, "error": f"output shapes differ: {shapes}"}
    pairs = {f"{a}~{b}": _pair(outputs[a], outputs[b]) for a, b in itertools.combinations(outputs, 2)}
    worst = max(p["max_abs_diff"] for p in pairs.values())
    passed = bool(np.isfinite(worst) and worst <= tolerance)
    n = len(next(iter(outputs.values())))
    return {
        "passed": passed,
        "tolerance": tolerance,
        "max_abs_diff": worst,
        "images": n,
        "inputs": f"medq.data.phantoms.draw_chest seeds 0..{n - 1} ({'/'.join(CAUSES)} in turn), "
                  f"preprocessed with {spec.to_dict()}",
        "engines": list(outputs),
        "pairs": pairs,
    }


def format_report(report: dict[str, Any]) -> str:
    if "pairs" not in report:
        return f"parity: FAILED ({report['error']})"
    lines = [f"parity on {report['images']} phantom images, tolerance {report['tolerance']:.0e}: "
             + ("passed" if report["passed"] else "FAILED")]
    for name, p in report["pairs"].items():
        lines.append(f"  {name:<28} max |diff| {p['max_abs_diff']:.2e}  mean {p['mean_abs_diff']:.2e}  "
                     f"top-1 agreement {p['top1_agreement']:.0%}")
    return "\n".join(lines)


def record(report: dict[str, Any], target: Path, where: str | Path, verbose: bool) -> None:
    """Write the report (also when it failed: it is the diagnosis), print it, and raise if it failed."""
    artifacts.write_json(target, report)
    if verbose:
        print(format_report(report))
    if not report["passed"]:
        detail = report.get("error") or f"max |diff| {report['max_abs_diff']:.2e} > tolerance {report['tolerance']:.0e}"
        raise MedqError(f"{where}: converted model does not match the source ({detail}); details in {target}")


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The parity facts the manifest keeps."""
    return {k: report[k] for k in ("passed", "tolerance", "max_abs_diff", "images") if k in report}
