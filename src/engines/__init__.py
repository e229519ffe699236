"""The inference engines medq runs a frozen model in: one spec per engine, in one module of this package each.

An :class:`EngineSpec` says everything the benchmark (and ``medq serve``) needs to know about an engine:

- ``offers``: the rows it offers, one per precision, each naming the model file it runs (a run artifact such as
  ``fp32_pb``, or a :class:`Recipe` built from one), the options its loader takes, extra packages, native BF16;
- ``needs`` / ``install``: the packages it imports (import names) and the one line telling how to install them;
- ``recipes``: how each model file it runs is built, from which run artifact or other recipe, with calibration or not;
- ``load``: ``LoadRequest -> (predict, facts)``, ``predict`` taking a preprocessed ``[N, S, S, C]`` float32 batch and
  returning probabilities ``[N, n_classes]``;
- ``version_keys``: the distributions whose versions the benchmark report shows.

Adding an engine is one module here that calls :func:`register` (modules of this package are found by
:func:`engines`); a spec registered elsewhere works too, its loader's module being imported by every worker. Nothing
here imports an inference runtime: loaders and builders import theirs when called, so a process holds only the one
it runs.
"""
from __future__ import annotations

import importlib
import json
import pkgutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]
REFERENCE_EXTRA = "install the reference extra: .venv/bin/pip install -r env/requirements-reference.txt"
REFERENCE_DIR = Path("benchmark") / "reference"  # under the run: the models recipes build, and their cache keys
CACHE = "cache.json"  # in REFERENCE_DIR: {recipe name: cache_key it was built with}


@dataclass(frozen=True)
class LoadRequest:
    """What a loader gets: the model file and the settings every engine honours."""

    model: Path
    input_name: str = "input"
    output_name: str = "output"
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    options: Mapping[str, Any] = field(default_factory=dict)  # the offer's options (bf16_rewrite, ...)


@dataclass(frozen=True)
class BuildRequest:
    """What a recipe's builder gets: the file it is made from and the facts of the run's graph."""

    source: Path  # the run artifact or the recipe it is made from
    input_name: str = "input"
    output_name: str = "output"
    opset: int = 17  # ONNX opset of exports
    calibration: Path | None = None  # .npy of preprocessed train-split images, for calibrated recipes

    def calibration_images(self) -> np.ndarray:
        if self.calibration is None:
            raise ValueError("this recipe needs calibration images and none were given")
        return np.load(self.calibration, mmap_mode="r")


@dataclass(frozen=True)
class Recipe:
    """A model file an engine builds (not timed), cached until the run artifact it comes from changes."""

    name: str  # e.g. "onnx-int8"
    file: str  # the file name it is written to, e.g. "model_int8.onnx"
    source: str  # a run artifact key ("fp32_pb", "int8_pb") or another recipe's name
    build: Callable[[BuildRequest, Path], None]  # writes the model to the given path, atomically
    calibrated: bool = False  # built with the calibration images (their sha256 is part of its cache key)
    companions: tuple[str, ...] = ()  # suffixes of the files written beside it (an OpenVINO IR's ".bin")


@dataclass(frozen=True)
class Offer:
    """One row an engine offers: ``<engine>-<precision>``."""

    precision: str  # fp32 | bf16 | int8 | int8-bf16 | ...
    model: str  # a run artifact key or a recipe name
    options: Mapping[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # import names beyond the engine's own
    bf16: bool = False  # runs BF16 kernels: skipped on a CPU without native BF16


@dataclass(frozen=True)
class EngineSpec:
    name: str
    offers: tuple[Offer, ...]
    load: Callable[[LoadRequest], tuple[Predict, dict[str, Any]]]
    needs: tuple[str, ...] = ()  # import names, checked without importing them
    install: str = REFERENCE_EXTRA  # said after "<packages> not installed; "
    recipes: tuple[Recipe, ...] = ()
    version_keys: tuple[str, ...] = ()  # distribution names
    reference: bool = True  # rows chosen by benchmark.reference; False: the run's own (benchmark.precisions)
    module: str = ""  # set by register: the module a worker imports to find this spec

    def row_id(self, precision: str) -> str:
        return f"{self.name}-{precision}"

    def offer(self, precision: str) -> Offer | None:
        return next((o for o in self.offers if o.precision == precision), None)

    def needs_for(self, offer: Offer) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.needs + offer.needs))


_ENGINES: dict[str, EngineSpec] = {}
_RECIPES: dict[str, Recipe] = {}
_discovered = False


def register(spec: EngineSpec) -> EngineSpec:
    """Add ``spec`` (and its recipes) to the registry; returns it with ``module`` set to its loader's module."""
    spec = replace(spec, module=spec.module or spec.load.__module__)
    for recipe in spec.recipes:
        if _RECIPES.get(recipe.name, recipe) is not recipe:
            raise ValueError(f"recipe {recipe.name!r} is defined twice")
        _RECIPES[recipe.name] = recipe
    _ENGINES[spec.name] = spec
    return spec


def _discover() -> None:
    """Import every engine module of this package (each registers its spec), in name order; once per process."""
    global _discovered
    if _discovered:
        return
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _discovered = True


def engines() -> list[EngineSpec]:
    """Every registered engine: this package's in module-name order, then any registered elsewhere."""
    _discover()
    builtin = sorted((s for s in _ENGINES.values() if s.module.startswith(f"{__name__}.")), key=lambda s: s.module)
    return builtin + [s for s in _ENGINES.values() if not s.module.startswith(f"{__name__}.")]


def get(name: str) -> EngineSpec:
    if name not in _ENGINES:
        _discover()
    if name not in _ENGINES:
        raise KeyError(f"unknown engine {name!r}; medq knows {', '.join(s.name for s in engines())}")
    return _ENGINES[name]


def find_row(row_id: str) -> tuple[EngineSpec, Offer] | None:
    """The engine and offer of ``<engine>-<precision>``, or None."""
    for spec in engines():
        prefix = f"{spec.name}-"
        if row_id.startswith(prefix) and (offer := spec.offer(row_id[len(prefix):])) is not None:
            return spec, offer
    return None


def row_ids(reference: bool | None = None) -> tuple[str, ...]:
    """Every row any engine offers (``reference``: only reference rows, or only the run's own)."""
    return tuple(spec.row_id(o.precision) for spec in engines() if reference in (None, spec.reference)
                 for o in spec.offers)


def recipe(name: str) -> Recipe:
    if name not in _RECIPES:
        _discover()
    return _RECIPES[name]


def is_recipe(name: str) -> bool:
    _discover()
    return name in _RECIPES


def recipe_chain(names: Iterable[str]) -> list[str]:
    """``names`` and every recipe they are made from, each after its source."""
    out: list[str] = []

    def visit(name: str) -> None:
        if name in out:
            return
        source = recipe(name).source
        if is_recipe(source):
            visit(source)
        out.append(name)

    for name in sorted(names, key=_recipe_order):
        visit(name)
    return out


def _recipe_order(name: str) -> int:
    return [r.name for spec in engines() for r in spec.recipes].index(name)


def root_artifact(name: str) -> str:
    """The run artifact a recipe is ultimately made from."""
    while is_recipe(name):
        name = recipe(name).source
    return name


def cache_key(name: str, source_sha: str, calibration_sha: str | None, opset: int) -> str:
    """What a built model depends on: the sha256 of its run artifact, the opset, the calibration set if it uses it."""
    key = f"{source_sha}|opset{opset}"
    return key + (f"|calib:{calibration_sha}" if recipe(name).calibrated else "")


def built_model(run_dir: Path, name: str, source_sha: str) -> tuple[Path | None, str]:
    """The model recipe ``name`` built for the run in ``run_dir`` if it is current (built from the run artifact whose
    sha256 is ``source_sha``): (path, ""), else (None, why not)."""
    folder = Path(run_dir) / REFERENCE_DIR
    path = folder / recipe(name).file
    cache_file = folder / CACHE
    try:
        key = json.loads(cache_file.read_text()).get(name) if cache_file.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None, f"{cache_file} is unreadable"
    if not path.is_file() or not isinstance(key, str):
        return None, f"no {name} model has been built for this run ({path})"
    if key.split("|", 1)[0] != source_sha:
        return None, (f"{path} is stale: it was built from a {root_artifact(name)} with sha256 "
                      f"{key.split('|', 1)[0][:12]}, the run's is now {source_sha[:12]}")
    return path, ""


def version_keys() -> tuple[str, ...]:
    """Every engine's version keys, in engine order, once each."""
    return tuple(dict.fromkeys(k for spec in engines() for k in spec.version_keys))


def import_modules(modules: Iterable[str]) -> None:
    """Import the modules that register the engines a job names (a worker of a spec registered outside here)."""
    for module in modules:
        importlib.import_module(module)


def open_engine(name: str, request: LoadRequest) -> tuple[Predict, dict[str, Any]]:
    """Load ``request.model`` in engine ``name``; ``predict`` returns a float32 array the engine no longer owns
    (safe to keep across calls)."""
    run, facts = get(name).load(request)

    def predict(batch: np.ndarray) -> np.ndarray:
        return np.array(run(batch), dtype=np.float32, copy=True)

    return predict, facts
