"""The model files engines build from the run's graphs (their :class:`medq.engines.Recipe`), for the reference rows.

They are built in a worker process (``kind: prepare``, nothing timed) and cached in ``<run>/benchmark/reference/``:
a model is rebuilt only when the run artifact it is made from (or the calibration set, for a calibrated recipe) or
the ONNX opset changed.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from medq import engines
from medq.errors import first_line


def model_bytes(path: Path, recipe: str | None = None) -> int:
    """Size on disk, with the files its recipe writes beside it (an OpenVINO IR is its .xml plus its .bin)."""
    path = Path(path)
    companions = engines.recipe(recipe).companions if recipe else ()
    return path.stat().st_size + sum(path.with_suffix(s).stat().st_size for s in companions
                                     if path.with_suffix(s).is_file())


def prepare(job: dict[str, Any]) -> dict[str, Any]:
    """Build ``job['build']`` (recipe names, sources first) into ``job['models']`` paths, from ``job['sources']``
    (run artifact paths); one failure does not stop the others that do not depend on it. Returns
    {name: {ok, seconds, error?}}."""
    out: dict[str, Any] = {}
    for name in job["build"]:
        recipe = engines.recipe(name)
        if recipe.source in out and not out[recipe.source]["ok"]:
            out[name] = {"ok": False, "error": f"needs {recipe.source}, which failed"}
            continue
        source = job["models"][recipe.source] if engines.is_recipe(recipe.source) else job["sources"][recipe.source]
        request = engines.BuildRequest(Path(source), job["input_name"], job["output_name"], job["opset"],
                                       Path(job["calibration"]) if job.get("calibration") else None)
        start = time.perf_counter()
        try:
            recipe.build(request, Path(job["models"][name]))
            out[name] = {"ok": True, "seconds": round(time.perf_counter() - start, 2)}
        except Exception as exc:  # noqa: BLE001 - recorded as the reason the row is skipped
            out[name] = {"ok": False, "error": f"{type(exc).__name__}: {first_line(exc)}"}
    return out
