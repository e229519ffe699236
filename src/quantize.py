"""Stage 5: INC post-training static quantization of the run's frozen FP32 graph, driven by deploy.yaml.

What the reference kit got wrong, and what happens here instead:

- its deploy.yaml was parsed and never given to INC → every INC setting comes from the validated deploy.yaml
  (:mod:`medq.inc.deploy`) or from INC's default, printed;
- it had no evaluation function, so "meets the accuracy goal" meant nothing → INC's tuning evaluates the task metric
  (accuracy, or mean AUC for multi-label) on the validation split, with the training preprocessing;
- it calibrated on validation/test images divided by 255 twice → calibration images are drawn (class-stratified) from
  the training split only (:func:`calibration_indices`), preprocessed once by :mod:`medq.preprocess`, and the files
  INC actually consumed are recorded.

Besides ``model_int8.pb`` and ``quantized_ops.json`` (INC's op table), the stage measures the validation metric of
each precision path the CPU can run (:func:`select_precisions`): FP32, BF16 (oneDNN's auto-mixed-precision rewrite
of the FP32 graph), INT8, and INT8 with the BF16 rewrite for the ops left out of INT8.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import sys
import time
from functools import reduce
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from medq import artifacts, runrecord
from medq.errors import DataError, MedqError

INT8_PB = "model_int8.pb"
QUANTIZED_OPS = "quantized_ops.json"
PRECISIONS = ("fp32", "bf16", "int8", "int8-bf16")
BF16_PATHS = ("bf16", "int8-bf16")
CALIBRATION_SPLIT = "train"
MAX_CALIBRATION_BATCH = 32
# Float op types that INC's TensorFlow adaptor can turn into quantized kernels: the ones worth reporting when they
# stay FP32 ("fallback ops").
COMPUTE_OPS = frozenset({
    "Conv2D", "_FusedConv2D", "Conv3D", "_FusedConv3D", "DepthwiseConv2dNative", "_FusedDepthwiseConv2dNative",
    "MatMul", "_FusedMatMul", "BatchMatMul", "BatchMatMulV2", "Conv2DBackpropInput", "Conv3DBackpropInputV2",
})


# --- precision paths ----------------------------------------------------------------------------------------------

def select_precisions(requested: list[str], features: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The requested precision paths this CPU can run, in order, and ``{skipped path: reason}``.

    ``features`` is :func:`medq.hwinfo.cpu_features` (or a simulated dict with ``bf16``/``avx512_bf16``/``amx_bf16``).
    FP32 and INT8 run everywhere (without VNNI oneDNN's INT8 kernels are merely slower); the BF16 paths need
    AVX512-BF16 or AMX-BF16, otherwise oneDNN's BF16 rewrite would run emulated or not at all.
    """
    kept: list[str] = []
    skipped: dict[str, str] = {}
    has_bf16 = bool(features.get("bf16") or features.get("avx512_bf16") or features.get("amx_bf16"))
    for path in requested:
        if path in kept or path in skipped:
            continue
        if path not in PRECISIONS:
            skipped[path] = f"unknown precision path; medq knows {', '.join(PRECISIONS)}"
        elif path in BF16_PATHS and not has_bf16:
            skipped[path] = ("this CPU has neither AVX512-BF16 nor AMX-BF16, so oneDNN's BF16 rewrite would not "
                             "run natively")
        else:
            kept.append(path)
    return kept, skipped


def describe_cpu(features: dict[str, Any]) -> str:
    """'<model>: VNNI yes, AVX512-BF16 no, AMX-BF16 no, AMX-INT8 no'."""
    def yes(flag: str) -> str:
        return "yes" if features.get(flag) else "no"

    return (f"{features.get('model', 'unknown CPU')}: VNNI {yes('vnni')}, AVX512-BF16 {yes('avx512_bf16')}, "
            f"AMX-BF16 {yes('amx_bf16')}, AMX-INT8 {yes('amx_int8')}")


# --- calibration --------------------------------------------------------------------------------------------------

def calibration_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``min(n, N)`` indices into the training split's ``labels`` [N, K], stratified by class.

    Each class (the first positive label; none for an all-negative multi-label row) is shuffled with ``seed`` and
    spread evenly over the order, so every prefix keeps the split's class proportions: asking for all N gives the
    order in which to replace unreadable files.
    """
    labels = np.asarray(labels, dtype=np.float32)
    total = len(labels)
    if total == 0 or n <= 0:
        return np.zeros(0, dtype=int)
    rng = np.random.default_rng(seed)
    keys = np.where(labels.max(axis=1) > 0, labels.argmax(axis=1), -1)
    position = np.empty(total, dtype=np.float64)
    for key in np.unique(keys):
        members = rng.permutation(np.flatnonzero(keys == key))
        position[members] = (np.arange(len(members)) + 0.5) / len(members)
    order = np.lexsort((keys, position))
    return order[:min(n, total)].astype(int)


def calibration_batch_size(sampling_sizes: list[int], limit: int = MAX_CALIBRATION_BATCH) -> int:
    """The largest batch ≤ ``limit`` dividing every sampling size, so INC consumes exactly that many images."""
    common = reduce(math.gcd, sampling_sizes)
    return max(d for d in range(1, min(limit, common) + 1) if common % d == 0)


class CalibrationLoader:
    """INC's calibration dataloader: ``batch_size`` and ``(images, labels)`` batches; it records, per pass, the
    files it handed to INC."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, paths: list[str], batch_size: int):
        self.images, self.labels, self.paths = images, labels, list(paths)
        self.batch_size = batch_size
        self.passes: list[list[str]] = []

    def __iter__(self):
        fed: list[str] = []
        self.passes.append(fed)
        for start in range(0, len(self.images), self.batch_size):
            stop = start + self.batch_size
            fed.extend(self.paths[start:stop])
            yield self.images[start:stop], self.labels[start:stop]

    @property
    def paths_fed(self) -> set[str]:
        return {p for fed in self.passes for p in fed}

    @property
    def images_per_pass(self) -> list[int]:
        return [len(fed) for fed in self.passes]


def load_calibration(index: Any, spec: Any, sampling_sizes: list[int], seed: int,
                     dropped: dict[str, str] | None = None):
    """(images, labels, paths) of up to ``max(sampling_sizes)`` readable training images, in stratified order;
    unreadable ones are replaced by the next in that order (and recorded in ``dropped``)."""
    from medq.tfdata import load_split_arrays

    train = index.splits[CALIBRATION_SPLIT]
    wanted = max(sampling_sizes)
    order = calibration_indices(index.labels(CALIBRATION_SPLIT), len(train), seed)
    images, labels, paths = [], [], []
    position = 0
    while len(paths) < wanted and position < len(order):
        chunk = [train[i] for i in order[position:position + wanted - len(paths)]]
        position += len(chunk)
        loaded, kept = load_split_arrays([s.path for s in chunk], spec, dropped)
        images.extend(loaded)
        labels.extend(chunk[k].label for k in kept)
        paths.extend(chunk[k].path for k in kept)
    shape = (0, *spec.input_shape)
    return (np.stack(images) if images else np.zeros(shape, np.float32),
            np.asarray(labels, np.float32).reshape(len(paths), -1), paths)


# --- evaluation ---------------------------------------------------------------------------------------------------

CHANCE_MARGIN = 0.05


def chance_level(metric: str, labels: np.ndarray, task: str) -> float:
    """What a model that learned nothing scores: AUC 0.5; the accuracy of always answering the commonest class (per
    label, for multi-label)."""
    labels = np.asarray(labels, dtype=np.float64)
    if metric == "auc" or not len(labels):
        return 0.5
    if task == "multilabel":
        positive = labels.mean(axis=0)
        return float(np.maximum(positive, 1 - positive).mean())
    return float(labels.sum(axis=0).max() / len(labels))


def graph_metrics(graph_def, x: np.ndarray, y: np.ndarray, task: str, classes: list[str], input_name: str,
                  output_name: str, bf16_rewrite: bool = False) -> dict[str, Any]:
    from medq.graph import FrozenGraph
    from medq.metrics import task_metrics

    runner = FrozenGraph(graph_def, input_name, output_name, bf16_rewrite=bf16_rewrite)
    try:
        probabilities = runner.predict(x, batch_size=64)
    finally:
        runner.close()
    return task_metrics(task, y, probabilities, classes)


def make_eval_func(x: np.ndarray, y: np.ndarray, task: str, classes: list[str], metric: str, input_name: str,
                   output_name: str) -> Callable[[Any], float]:
    """INC's ``eval_func``: the task metric of a candidate graph (a tf.Graph or GraphDef) on the validation split."""
    def evaluate(model) -> float:
        graph_def = model.as_graph_def() if hasattr(model, "as_graph_def") else model
        return float(graph_metrics(graph_def, x, y, task, classes, input_name, output_name)[metric])

    return evaluate


# --- what stayed FP32, and why ------------------------------------------------------------------------------------

def quantized_names(graph_def) -> set[str]:
    """Original op names of the quantized kernels in an INC INT8 graph ('<name>_eightbit_requantize' → '<name>')."""
    return {node.name.split("_eightbit")[0] for node in graph_def.node if "Quantized" in node.op}


def fallback_ops(fp32_graph, int8_graph, result: Any, deploy: Any) -> list[dict[str, str]]:
    """Ops of the FP32 graph that are not quantized kernels in the INT8 graph — the Conv/MatMul-type ops, and every
    op of a type INC's op table counts in FP32 (DenseNet's ConcatV2s) — with their type there, the precision they
    run in (from the graph), and why (deploy.yaml, a recipe, INC's tuning, INC's capability)."""
    quantized = quantized_names(int8_graph)
    in_int8 = {node.name: node for node in int8_graph.node}
    capable = {name for name, _ in result.capability}
    final_int8 = set(result.int8_ops)
    left_in_fp32 = {op for op, counts in result.op_table.items()
                    if counts.get("fp32") and op not in ("QuantizeV2", "Dequantize")}
    compute = [(node.name, node.op) for node in fp32_graph.node if node.op in COMPUTE_OPS]
    reported = compute + [(node.name, node.op) for node in fp32_graph.node
                          if node.op in left_in_fp32 and node.op not in COMPUTE_OPS]
    out = []
    for name, op_type in reported:
        if name in quantized:
            continue
        position = compute.index((name, op_type)) if op_type in COMPUTE_OPS else None
        node = in_int8.get(name)
        runs_as = _precision_of(node) if node is not None else "fused/removed"
        int8_before = [t for t in result.trials if name in t.int8_ops]
        if any(re.fullmatch(p, name) for p, s in (deploy.op_wise or {}).items() if _asks_fp32(s)) \
                or any(re.fullmatch(p, op_type) for p, s in (deploy.optype_wise or {}).items() if _asks_fp32(s)) \
                or (deploy.model_wise and _asks_fp32(deploy.model_wise)):
            reason = "deploy.yaml asks for FP32 (quantization.op_wise / optype_wise / model_wise)"
        elif position == 0 and not deploy.recipes.get("first_conv_or_matmul_quantization", True):
            reason = "recipe first_conv_or_matmul_quantization: false"
        elif position == len(compute) - 1 and not deploy.recipes.get("last_conv_or_matmul_quantization", True):
            reason = "recipe last_conv_or_matmul_quantization: false"
        elif name in final_int8:
            reason = ("INC's final configuration puts it in INT8, but its graph rewrite matched no quantized kernel "
                      "for it here, so it runs in FP32 between Dequantize and QuantizeV2")
        elif int8_before:
            trial = int8_before[-1]
            value = "n/a" if trial.metric is None else f"{trial.metric:.4f}"
            reason = (f"INC's tuning took it out of INT8 to meet the accuracy criterion (with it in INT8, trial "
                      f"{trial.number} scored {value})")
        elif name not in capable:
            reason = "INC's TensorFlow adaptor has no INT8 pattern for it in this graph (not in its capability)"
        else:
            reason = "INC's tuning kept it out of INT8 in every trial"
        out.append({"name": name, "op_type": op_type, "in_int8_graph": node.op if node is not None else runs_as,
                    "runs_as": runs_as, "reason": reason})
    return out


def _precision_of(node) -> str:
    from tensorflow.core.framework import types_pb2

    dtype = node.attr["T"].type if "T" in node.attr else types_pb2.DT_FLOAT
    return "BF16" if dtype == types_pb2.DT_BFLOAT16 else "FP32"


def _asks_fp32(settings: dict[str, Any]) -> bool:
    return any("fp32" in (side or {}).get("dtype", []) and "int8" not in (side or {}).get("dtype", [])
               and "uint8" not in (side or {}).get("dtype", []) for side in settings.values())


# --- the stage ----------------------------------------------------------------------------------------------------

def run_quantize(config: Any, verbose: bool = False) -> Path:
    """Quantize the run's ``model_fp32.pb`` with INC as ``config.quantize.deploy`` says; returns ``model_int8.pb``.

    Prints a short summary; INC's log (and TensorFlow's, unless ``verbose``) goes to ``<run>/logs/quantize.log``.
    """
    from medq.graph import read_graph_def
    from medq.inc.deploy import load_deploy

    start = time.perf_counter()
    run_dir = config.run_dir
    deploy = load_deploy(config.quantize.deploy)
    with runrecord.writer_lock(run_dir, "quantize"):
        fp32_path = runrecord.verified_path(run_dir, "fp32_pb", config)
        manifest = runrecord.read_manifest(run_dir)
        missing = [k for k in ("task", "classes", "preprocess", "input_name", "output_name") if k not in manifest]
        if missing:
            raise MedqError(f"{run_dir / runrecord.MANIFEST}: lacks {', '.join(missing)}; re-run "
                            f"`{runrecord.command(config, 'train')}` and `medq freeze` for this run")
        inputs = _tensor_names(deploy, "inputs", deploy.inputs, manifest["input_name"])
        outputs = _tensor_names(deploy, "outputs", deploy.outputs, manifest["output_name"])
        log_path = run_dir / "logs" / "quantize.log"
        with output_to_log(log_path, verbose) as say:
            _announce(say, deploy, inputs, outputs, run_dir)
            fp32_graph = read_graph_def(fp32_path)
            run = _QuantizeRun(config, manifest, deploy, say)
            return run.execute(fp32_graph, inputs, outputs, log_path, verbose, start)


class _QuantizeRun:
    """The stage's state: the data, the INC result, the numbers recorded in the manifest."""

    def __init__(self, config: Any, manifest: dict[str, Any], deploy: Any, say: Callable[..., None]):
        from medq.selection import objective

        self.config, self.deploy, self.say = config, deploy, say
        self.run_dir = config.run_dir
        self.task, self.classes = manifest["task"], list(manifest["classes"])
        self.input_name, self.output_name = manifest["input_name"], manifest["output_name"]
        self.preprocess = manifest["preprocess"]
        self.metric = objective(config, manifest)  # the run's one objective (run.objective), as its model was chosen

    def metrics(self, graph_def, bf16_rewrite: bool = False) -> dict[str, Any]:
        return graph_metrics(graph_def, self.x_val, self.y_val, self.task, self.classes, self.input_name,
                             self.output_name, bf16_rewrite=bf16_rewrite)

    def load_data(self) -> CalibrationLoader:
        """Calibration images from the training split, validation images for the tuning metric; never test."""
        from medq.preprocess import PreprocessSpec
        from medq.tfdata import load_split_arrays

        data = self.config.data
        index = runrecord.run_index(self.config, stage="quantize")  # the run's pinned split: never the test images
        runrecord.check_classes(self.run_dir, {"classes": self.classes, "task": self.task}, index)
        for split in (CALIBRATION_SPLIT, "val"):
            if not index.splits[split]:
                raise DataError(f"{data.root}: the {split} split is empty; quantization needs training images to "
                                "calibrate and validation images to judge the accuracy")
        spec = PreprocessSpec.from_dict(self.preprocess)
        self.dropped: dict[str, str] = {}
        x_cal, y_cal, cal_paths = load_calibration(index, spec, self.deploy.sampling_sizes, self.deploy.random_seed,
                                                   self.dropped)
        if not cal_paths:
            raise DataError(f"{data.root}: no readable training image to calibrate with")
        self.sizes = sorted({min(s, len(cal_paths)) for s in self.deploy.sampling_sizes})
        if self.sizes != sorted(set(self.deploy.sampling_sizes)):
            self.say(f"  note: quantization.calibration.sampling_size {self.deploy.sampling_sizes} exceeds the "
                     f"{len(cal_paths)} readable training images; calibrating on {self.sizes}")
        self.x_val, kept = load_split_arrays(index.paths("val"), spec, self.dropped)
        if self.dropped:
            self.say(f"  warning: {len(self.dropped)} file(s) failed to decode and were left out (first: "
                     f"{next(iter(self.dropped.values()))})", warning=True)
        self.y_val = index.labels("val")[kept]
        self.balance = {c: int(n) for c, n in zip(self.classes, y_cal.sum(axis=0))}
        loader = CalibrationLoader(x_cal, y_cal, cal_paths, calibration_batch_size(self.sizes))
        self.say(f"  calibration: {len(cal_paths)} images from the {CALIBRATION_SPLIT} split "
                 f"({', '.join(f'{c} {n}' for c, n in self.balance.items())}), batch {loader.batch_size}; "
                 f"tuning metric: {self.metric} on {len(self.x_val)} validation images")
        return loader

    def execute(self, fp32_graph, inputs: list[str], outputs: list[str], log_path: Path, verbose: bool,
                start: float) -> Path:
        from medq.graph import op_type_counts
        from medq.hwinfo import cpu_features
        from medq.inc.ptq import check_with_inc, run_ptq

        deploy, metric, say = self.deploy, self.metric, self.say
        features = cpu_features()
        kept, skipped = select_precisions(list(self.config.quantize.precisions), features)
        say(f"  CPU {describe_cpu(features)}")
        say(f"  precision paths: {', '.join(kept) or 'none'}"
            + "".join(f"; skipped {p}: {why}" for p, why in skipped.items()))
        check_with_inc(deploy)
        loader = self.load_data()
        fp32_val = self.metrics(fp32_graph)
        baseline = fp32_val[metric]
        if not np.isfinite(baseline):
            raise DataError(f"{self.config.data.root}: the FP32 {metric} on the validation split is undefined (a "
                            "class is missing there); set run.objective: accuracy or raise data.val_fraction")
        chance = chance_level(metric, self.y_val, self.task)
        near_chance = bool(baseline <= chance + CHANCE_MARGIN)
        if near_chance:
            say(f"  warning: the FP32 model scores {metric} {baseline:.4f} on validation, about chance "
                f"({chance:.4f}): INT8 matching an untrained model proves nothing; train it longer first",
                warning=True)
        workspace = _workspace(deploy, self.run_dir)
        result = run_ptq(fp32_graph, deploy, inputs=inputs, outputs=outputs, sampling_sizes=self.sizes,
                         calib_dataloader=loader, workspace=workspace, log_path=log_path, verbose=verbose,
                         eval_func=make_eval_func(self.x_val, self.y_val, self.task, self.classes, metric,
                                                  self.input_name, self.output_name))
        threshold = deploy.criterion.threshold(baseline)
        criterion = {"kind": deploy.criterion.kind, "tolerance": deploy.criterion.tolerance, "metric": metric,
                     "split": "val", "fp32": baseline, "threshold": threshold}
        facts = {"deploy": _deploy_facts(deploy), "cpu_features": features,
                 "calibration": {"n": len(loader.paths), "source_split": CALIBRATION_SPLIT,
                                 "class_balance": self.balance, "sampling_sizes": self.sizes,
                                 "batch_size": loader.batch_size, "images_fed_per_pass": loader.images_per_pass,
                                 "distinct_images_fed": len(loader.paths_fed)},
                 "precision_paths": {"kept": kept, "skipped": skipped}, "trials": _trial_facts(result),
                 "inc_received": result.received, "log": os.path.relpath(log_path, self.run_dir),
                 "dropped_while_loading": [{"path": p, "reason": r} for p, r in sorted(self.dropped.items())],
                 "fp32_near_chance": {"near": near_chance, "chance": chance, "margin": CHANCE_MARGIN}}
        if result.graph_def is None:
            tried = [t.metric for t in result.trials if t.metric is not None]
            best = max(tried) if tried else float("nan")
            stale = (f"the last `medq quantize` ({time.strftime('%Y-%m-%d %H:%M')}, {deploy.path}) failed, so the "
                     "INT8 graph from before it is not served")
            runrecord.commit(self.run_dir, "quantize", invalidate={"int8_pb": stale, "quantized_ops": stale},
                             status="failed", criterion=criterion | {"met": False}, fp32_val=fp32_val,
                             best_int8_val=best, **facts)
            if not tried:
                raise MedqError(f"{deploy.path}: INC could not produce an INT8 graph in any of its "
                                f"{len(result.trials)} trial(s); its error is in {log_path}")
            raise MedqError(
                f"{deploy.path}: INC found no INT8 model within the accuracy criterion ({deploy.criterion.describe()}"
                f": FP32 val {metric} {baseline:.4f} needs INT8 ≥ {threshold:.4f}; best of {len(tried)} trial(s) "
                f"{best:.4f}); raise tuning.exit_policy.max_trials, relax tuning.accuracy_criterion, or raise "
                f"quantization.calibration.sampling_size (INC's log: {log_path})")

        int8_graph = result.graph_def
        int8_val = self.metrics(int8_graph)
        if not deploy.criterion.met(baseline, int8_val[metric]):  # INC's evaluation said yes; ours must agree
            raise MedqError(f"{deploy.path}: the INT8 graph INC returned scores {int8_val[metric]:.4f} {metric} on "
                            f"validation, below {threshold:.4f} ({deploy.criterion.describe()}); this is a bug, "
                            f"please report it with {log_path}")
        paths_val = self.precision_paths(kept, fp32_graph, int8_graph, fp32_val, int8_val)
        fallbacks = fallback_ops(fp32_graph, int8_graph, result, deploy)
        int8_counts = op_type_counts(int8_graph)
        staged = artifacts.write_bytes(runrecord.staging_path(self.run_dir, INT8_PB), int8_graph.SerializeToString())
        ops_path = artifacts.write_json(runrecord.staging_path(self.run_dir, QUANTIZED_OPS), result.op_table)
        calibration_list = "\n".join(sorted(loader.paths)).encode()
        runrecord.commit(
            self.run_dir, "quantize", artifacts={"int8_pb": staged, "quantized_ops": ops_path},
            inputs=("fp32_pb", "split"), sources={"deploy_yaml": artifacts.sha256(deploy.path),
                                                  "calibration_list": hashlib.sha256(calibration_list).hexdigest()},
            status="ok",
            metric=metric, fp32_val=fp32_val, int8_val=int8_val, criterion=criterion | {"met": True},
            op_table=result.op_table, fallback_ops=fallbacks, precision_val=paths_val,
            quantized_kernels=sum(n for op, n in int8_counts.items() if "Quantized" in op),
            seconds=round(time.perf_counter() - start, 1), **facts)
        target = self.run_dir / INT8_PB
        _summary(say, result, metric, baseline, int8_val[metric], threshold, deploy, fallbacks, paths_val,
                 log_path, target)
        return target

    def precision_paths(self, kept: list[str], fp32_graph, int8_graph, fp32_val: dict[str, Any],
                        int8_val: dict[str, Any]) -> dict[str, dict[str, float]]:
        """The validation metrics of each precision path this CPU runs (BF16: oneDNN's rewrite, measured)."""
        out = {}
        for path in kept:
            if path == "fp32":
                values = fp32_val
            elif path == "int8":
                values = int8_val
            else:
                values = self.metrics(fp32_graph if path == "bf16" else int8_graph, bf16_rewrite=True)
            out[path] = {"accuracy": values["accuracy"], "auc": values["auc"], self.metric: values[self.metric]}
        return out


def _announce(say: Callable[..., None], deploy: Any, inputs: list[str], outputs: list[str], run_dir: Path) -> None:
    say(f"quantize: {deploy.path} → INC 2.6 post-training static quantization (strategy {_strategy(deploy)}, "
        f"criterion {deploy.criterion.describe()}, max_trials {deploy.max_trials}, timeout {deploy.timeout} s, "
        f"random_seed {deploy.random_seed})")
    for line in deploy.warnings:
        say(f"  warning: {line}", warning=True)
    for line in deploy.notes:
        say(f"  note: {line}")
    defaults = deploy.inc_defaults()
    if "tuning.workspace.path" in defaults:  # medq's default, not INC's ./nc_workspace/<time>
        defaults["tuning.workspace.path"] = str(_workspace(deploy, run_dir))
    if defaults:
        say("  INC defaults used (not in the file): " + ", ".join(f"{k}={v!r}" for k, v in defaults.items()))
    if not deploy.inputs or not deploy.outputs:
        say(f"  model.inputs/outputs: empty in the file → {inputs}/{outputs} from the run's manifest")


def _workspace(deploy: Any, run_dir: Path) -> Path:
    return Path(deploy.workspace) if deploy.workspace else run_dir / "nc_workspace"


def _tensor_names(deploy: Any, key: str, given: list[str], recorded: str) -> list[str]:
    from medq.inc.deploy import DeployError

    if not given:
        return [recorded]
    if given != [recorded]:
        raise DeployError(f"{deploy.path}: model.{key}: {given} is not the frozen graph's {key[:-1]} {recorded!r} "
                          f"(recorded by `medq freeze` in manifest.json); write {key}: {recorded} or {key}: []")
    return given


def _strategy(deploy: Any) -> str:
    if deploy.quant_level == "auto":
        return "INC auto (quant_level auto)"
    if deploy.quant_level == 0:
        return "conservative (quant_level 0)"
    return deploy.strategy


def _deploy_facts(deploy: Any) -> dict[str, Any]:
    facts = deploy.to_dict()
    facts["strategy_run"] = _strategy(deploy)
    return facts


def _trial_facts(result: Any) -> list[dict[str, Any]]:
    return [{"trial": t.number, "metric": t.metric, "int8_ops": len(t.int8_ops), "fp32_ops": t.fp32_ops,
             "bf16_ops": t.bf16_ops} for t in result.trials]


@contextlib.contextmanager
def output_to_log(log_path: Path, verbose: bool) -> Iterator[Callable[..., None]]:
    """Unless ``verbose``, what INC and TensorFlow print to file descriptors 1 and 2 (Python's stdout/stderr and
    warnings, the C++ runtime's log) goes to ``log_path``. Yields ``say(line, warning=False)`` for the summary:
    through the ``medq`` logger when the CLI configured it (its console handlers keep the terminal), else printed."""
    if verbose:
        yield _sayer(sys.stdout)
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as log:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        terminal_out = os.fdopen(os.dup(saved[0]), "w", buffering=1)
        terminal_err = os.fdopen(os.dup(saved[1]), "w", buffering=1)
        consoles = [(h, h.stream) for h in logging.getLogger("medq").handlers
                    if type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.stderr)]
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            for handler, stream in consoles:
                handler.setStream(terminal_out if stream is sys.stdout else terminal_err)
            yield _sayer(terminal_out)
        finally:
            for handler, stream in consoles:
                handler.setStream(stream)
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, original in zip((1, 2), saved):
                os.dup2(original, fd)
                os.close(original)
            terminal_out.close()
            terminal_err.close()


def _sayer(stream) -> Callable[..., None]:
    logger = logging.getLogger("medq.quantize")

    def say(line: str, warning: bool = False) -> None:
        if logging.getLogger("medq").handlers:
            logger.log(logging.WARNING if warning else logging.INFO, line)
        else:
            stream.write(line + "\n")
            stream.flush()

    return say


def _summary(say: Callable[..., None], result: Any, metric: str, fp32: float, int8: float, threshold: float,
             deploy: Any, fallbacks: list[dict[str, str]], paths_val: dict[str, dict[str, float]], log_path: Path,
             target: Path) -> None:
    say(f"  validation {metric}: FP32 {fp32:.4f}, INT8 {int8:.4f}; criterion {deploy.criterion.describe()}: "
        f"INT8 ≥ {threshold:.4f} → met ({len(result.trials)} trial(s), {result.seconds:.0f} s in INC)")
    table = ", ".join(f"{op} {c['int8']}/{c['total']} INT8" + (f" {c['bf16']} BF16" if c["bf16"] else "")
                      for op, c in result.op_table.items())
    say(f"  INC op table: {table or 'empty'}")
    groups: dict[tuple[str, str, str], list[str]] = {}
    for op in fallbacks:
        groups.setdefault((op["op_type"], op["runs_as"], op["reason"]), []).append(op["name"])
    for (op_type, runs_as, reason), names in groups.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        say(f"  not INT8: {len(names)} {op_type} ({shown}; runs in {runs_as}): {reason}")
    if not fallbacks:
        say("  not INT8: none (every op INC's table counts is INT8)")
    if paths_val:
        values = ", ".join(f"{p} {v[metric]:.4f}" for p, v in paths_val.items())
        say(f"  validation {metric} per precision path: {values}")
    say(f"  wrote {target} and {target.parent / QUANTIZED_OPS}; INC's log: {log_path}")
