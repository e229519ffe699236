"""Stage 5: INC post-training static quantization of the run's frozen FP32 graph, driven by deploy.yaml.

What the reference kit got wrong, and what happens here instead:

- its deploy.yaml was parsed and never given to INC → every INC setting comes from the validated deploy.yaml
  (:mod:`medq.inc.deploy`) or from INC's default, printed;
- it had no evaluation function, so "meets the accuracy goal" meant nothing → INC's tuning evaluates the task metric
  (accuracy, or mean AUC for multi-label) on the validation split, with the training preprocessing;
- it calibrated on validation/test images divided by 255 twice → calibration images are drawn (class-stratified) from
  the training split only (:mod:`medq.calibration`), preprocessed once by :mod:`medq.preprocess`, and the files
  INC actually consumed are recorded.

Besides ``model_int8.pb`` and ``quantized_ops.json`` (INC's op table), the stage measures the validation metric of
each precision path the CPU can run (:mod:`medq.precision`): FP32, BF16 (oneDNN's auto-mixed-precision rewrite
of the FP32 graph), INT8, and INT8 with the BF16 rewrite for the ops left out of INT8.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from medq import artifacts, runrecord, thresholds
from medq.calibration import CALIBRATION_SPLIT, calibration_batch_size, load_calibration
from medq.errors import DataError, MedqError, first_line
from medq.graph import graph_metrics
from medq.inc import adapters
from medq.metrics import CHANCE_MARGIN, chance_level
from medq.precision import describe_cpu, select_precisions
from medq.progress import counting, progress

INT8_PB = "model_int8.pb"
QUANTIZED_OPS = "quantized_ops.json"


# --- the stage ----------------------------------------------------------------------------------------------------

def run_quantize(config: Any, verbose: bool = False) -> Path:
    """Quantize the run's ``model_fp32.pb`` with INC as ``config.quantize.deploy`` says; returns ``model_int8.pb``.

    Prints a short summary; INC's log (and TensorFlow's, unless ``verbose``) goes to ``<run>/logs/quantize.log``.
    A deploy.yaml INC cannot take is reported before the run is touched; a quantize that fails after that (tensor
    names, data, INC's criterion) marks the run's earlier INT8 graph stale; an interrupted one leaves the run as it
    was.
    """
    from medq.inc.deploy import load_deploy

    start = time.perf_counter()
    run_dir = config.run_dir
    deploy = load_deploy(config.quantize.deploy)  # a file INC cannot take changes nothing in the run
    with runrecord.writer_lock(run_dir, "quantize"):
        fp32_path = runrecord.verified_path(run_dir, "fp32_pb", config)
        try:
            return _quantize(config, deploy, fp32_path, verbose, start)
        except MedqError as exc:
            # The INT8 graph from before no longer matches what the user asked for: never serve it as current.
            stale = (f"the last `medq quantize` ({time.strftime('%Y-%m-%d %H:%M')}, {deploy.path}) failed, so the "
                     "INT8 graph from before it is not served")
            runrecord.commit(run_dir, "quantize", invalidate={"int8_pb": stale, "quantized_ops": stale},
                             status="failed", error=str(exc), **getattr(exc, "facts", {}))
            raise


def _quantize(config: Any, deploy: Any, fp32_path: Path, verbose: bool, start: float) -> Path:
    from medq.graph import read_graph_def

    run_dir = config.run_dir
    manifest = runrecord.read_manifest(run_dir)
    missing = manifest.facts.missing("task", "classes", "preprocess", "input_name", "output_name")
    if missing:
        raise MedqError(f"{run_dir / runrecord.MANIFEST}: lacks {', '.join(missing)}; re-run "
                        f"`{runrecord.command(config, 'train')}` and `medq freeze` for this run")
    inputs = _tensor_names(deploy, "inputs", deploy.inputs, manifest.facts.input_name)
    outputs = _tensor_names(deploy, "outputs", deploy.outputs, manifest.facts.output_name)
    log_path = run_dir / "logs" / "quantize.log"
    with output_to_log(log_path, verbose) as say:
        _announce(say, deploy, inputs, outputs, run_dir)
        fp32_graph = read_graph_def(fp32_path)
        run = _QuantizeRun(config, manifest, deploy, say)
        return run.execute(fp32_graph, inputs, outputs, log_path, verbose, start)


class QuantizeFailed(MedqError):
    """INC found no INT8 graph; ``facts`` (trials, criterion, calibration) go into the manifest all the same."""

    def __init__(self, message: str, facts: dict[str, Any]):
        super().__init__(message)
        self.facts = facts


class _QuantizeRun:
    """The stage's state: the data, the INC result, the numbers recorded in the manifest."""

    def __init__(self, config: Any, manifest: runrecord.Manifest, deploy: Any, say: Callable[..., None]):
        from medq.selection import objective

        self.config, self.deploy, self.say = config, deploy, say
        self.run_dir = config.run_dir
        facts = manifest.facts
        self.task, self.classes = facts.task, list(facts.classes)
        self.input_name, self.output_name = facts.input_name, facts.output_name
        self.preprocess = facts.preprocess
        self.metric = objective(config, manifest)  # the run's one objective (run.objective), as its model was chosen
        self.manifest = manifest

    def metrics(self, graph_def, bf16_rewrite: bool = False) -> dict[str, Any]:
        return graph_metrics(graph_def, self.val_batches, self.y_val, self.task, self.classes, self.input_name,
                             self.output_name, bf16_rewrite=bf16_rewrite)

    def load_data(self) -> adapters.CalibrationLoader:
        """Calibration images from the training split, validation images for the tuning metric; never test."""
        from medq.data import pinned
        from medq.data.cache import image_cache
        from medq.preprocess import PreprocessSpec
        from medq.tfdata import iter_split_arrays

        data = self.config.data
        index = pinned.run_index(self.config, stage="quantize")  # the run's pinned split: never the test images
        runrecord.check_classes(self.run_dir, runrecord.Facts(classes=self.classes, task=self.task), index)
        for split in (CALIBRATION_SPLIT, "val"):
            if not index.splits[split]:
                raise DataError(f"{data.root}: the {split} split is empty; quantization needs training images to "
                                "calibrate and validation images to judge the accuracy")
        spec = PreprocessSpec.from_dict(self.preprocess)
        self.dropped: dict[str, str] = {}
        self.cache = image_cache(self.config, spec)
        x_cal, y_cal, cal_paths = load_calibration(index, spec, self.deploy.sampling_sizes, self.deploy.random_seed,
                                                   self.dropped, self.cache)
        if not cal_paths:
            raise DataError(f"{data.root}: no readable training image to calibrate with")
        self.sizes = sorted({min(s, len(cal_paths)) for s in self.deploy.sampling_sizes})
        if self.sizes != sorted(set(self.deploy.sampling_sizes)):
            self.say(f"  note: quantization.calibration.sampling_size {self.deploy.sampling_sizes} exceeds the "
                     f"{len(cal_paths)} readable training images; calibrating on {self.sizes}")
        # The validation split streams from disk in every evaluation (INC's trials, the precision paths); the first
        # pass finds the readable files (and fills the cache).
        val_paths = index.paths("val")
        kept = np.concatenate([k for _, k in iter_split_arrays(val_paths, spec, dropped=self.dropped,
                                                                cache=self.cache)] or [np.zeros(0, int)])
        self.val_paths = [val_paths[i] for i in kept]
        self.val_batches = lambda: iter_split_arrays(self.val_paths, spec, dropped=self.dropped, cache=self.cache)
        if self.dropped:
            self.say(f"  warning: {len(self.dropped)} file(s) failed to decode and were left out (first: "
                     f"{next(iter(self.dropped.values()))})", warning=True)
        self.y_val = index.labels("val")[kept]
        self.balance = {c: int(n) for c, n in zip(self.classes, y_cal.sum(axis=0))}
        loader = adapters.CalibrationLoader(x_cal, y_cal, cal_paths, calibration_batch_size(self.sizes))
        self.say(f"  calibration: {len(cal_paths)} images from the {CALIBRATION_SPLIT} split "
                 f"({', '.join(f'{c} {n}' for c, n in self.balance.items())}), batch {loader.batch_size}; "
                 f"tuning metric: {self.metric} on {len(self.val_paths)} validation images")
        return loader

    def execute(self, fp32_graph, inputs: list[str], outputs: list[str], log_path: Path, verbose: bool,
                start: float) -> Path:
        from medq.graph import op_type_counts
        from medq.hwinfo import cpu_features
        from medq.inc.fallback import fallback_ops
        from medq.inc.ptq import check_with_inc, run_ptq

        deploy, metric, say = self.deploy, self.metric, self.say
        features = cpu_features()
        kept, skipped = select_precisions(list(self.config.quantize.precisions), features)
        say(f"  CPU {describe_cpu(features)}")
        say(f"  precision paths: {', '.join(kept) or 'none'}"
            + "".join(f"; skipped {p}: {why}" for p, why in skipped.items()))
        check_with_inc(deploy)
        loader = self.load_data()
        fp32_val, chosen = self.fp32_validation(fp32_graph)
        baseline = fp32_val[metric]
        if not np.isfinite(baseline):
            raise DataError(f"{self.config.data.root}: the FP32 {metric} on the validation split is undefined (a "
                            "class is missing there); set run.objective: accuracy or raise data.val_fraction")
        chance = chance_level(metric, self.y_val, self.task)
        near_chance = self.check_above_chance(fp32_val, baseline, chance)
        workspace = _workspace(deploy, self.run_dir)
        with progress(total=deploy.max_trials + 1, desc="INC tuning: baseline + trials (at most)", unit="eval") as bar:
            result = run_ptq(fp32_graph, deploy, inputs=inputs, outputs=outputs, sampling_sizes=self.sizes,
                             calib_dataloader=loader, workspace=workspace, log_path=log_path, verbose=verbose,
                             eval_func=counting(adapters.eval_func(lambda graph_def: self.metrics(graph_def)[metric]),
                                                bar))
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
            facts |= {"criterion": criterion | {"met": False}, "fp32_val": fp32_val, "best_int8_val": best}
            if not tried:
                raise QuantizeFailed(f"{deploy.path}: INC could not produce an INT8 graph in any of its "
                                     f"{len(result.trials)} trial(s); its error is in {log_path}", facts)
            raise QuantizeFailed(
                f"{deploy.path}: INC found no INT8 model within the accuracy criterion ({deploy.criterion.describe()}"
                f": FP32 val {metric} {baseline:.4f} needs INT8 ≥ {threshold:.4f}; best of {len(tried)} trial(s) "
                f"{best:.4f}); raise tuning.exit_policy.max_trials, relax tuning.accuracy_criterion, or raise "
                f"quantization.calibration.sampling_size (INC's log: {log_path})", facts)

        int8_graph = result.graph_def
        int8_val = self.metrics(int8_graph)
        if not deploy.criterion.met(baseline, int8_val[metric]):  # INC's evaluation said yes; ours must agree
            raise MedqError(f"{deploy.path}: the INT8 graph INC returned scores {int8_val[metric]:.4f} {metric} on "
                            f"validation, below {threshold:.4f} ({deploy.criterion.describe()}); this is a bug, "
                            f"please report it with {log_path}")
        int8_graph, int8_val, int8_concat = self.int8_concat(int8_graph, int8_val, baseline, threshold)
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
            facts={thresholds.MANIFEST_KEY: chosen} if chosen is not None else None, status="ok",
            metric=metric, fp32_val=fp32_val, int8_val=int8_val, criterion=criterion | {"met": True},
            op_table=result.op_table, int8_concat=int8_concat, fallback_ops=fallbacks, precision_val=paths_val,
            quantized_kernels=sum(n for op, n in int8_counts.items() if "Quantized" in op),
            seconds=round(time.perf_counter() - start, 1), **facts)
        target = self.run_dir / INT8_PB
        _summary(say, result, metric, baseline, int8_val[metric], threshold, deploy, fallbacks, paths_val,
                 int8_concat, log_path, target, near_chance)
        return target

    def fp32_validation(self, fp32_graph) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The FP32 graph's validation metrics, and — for a converted run without current operating thresholds
        (:func:`medq.thresholds.to_choose`; train and tune choose a trained model's) — the thresholds chosen on the
        same validation outputs by the config's policy, recorded as train records them."""
        from medq.graph import graph_probabilities
        from medq.metrics import task_metrics

        if thresholds.to_choose(self.manifest) is None:
            return self.metrics(fp32_graph), None
        probabilities, kept = graph_probabilities(fp32_graph, self.val_batches, self.input_name, self.output_name)
        y = self.y_val[kept]
        self.say(f"  thresholds: a converted model without them: chosen on {len(kept)} validation images "
                 f"({thresholds.Policy.from_config(self.config.thresholds).describe()})")
        chosen = thresholds.for_run(self.config, self.task, self.classes, y, probabilities,
                                    thresholds.deciding_model(self.manifest)[1], "fp32_pb")
        return task_metrics(self.task, y, probabilities, self.classes), chosen

    def check_above_chance(self, fp32_val: dict[str, Any], baseline: float, chance: float) -> bool:
        """Stop when the FP32 model is at chance on validation (its objective within ``CHANCE_MARGIN`` of chance):
        any INT8 graph would then "meet" the accuracy criterion, and the run would report a success that means
        nothing. ``quantize.allow_chance`` quantizes anyway, with a warning. Returns whether the model is at chance."""
        if baseline > chance + CHANCE_MARGIN:
            return False
        auc_ci = (fp32_val.get("ci") or {}).get("auc")
        interval = f", AUC 95% CI [{auc_ci[0]:.3f}, {auc_ci[1]:.3f}]" if auc_ci else ""
        facts = (f"the FP32 model scores {self.metric} {baseline:.4f} on {len(self.val_paths)} validation images"
                 f"{interval}: not above chance ({chance:.4f})")
        if not self.config.quantize.allow_chance:
            raise MedqError(f"{self.run_dir}: {facts}, so INT8 has nothing to preserve and INC's accuracy criterion "
                            "would be met by any graph; train the model (or check its labels and preprocessing), or "
                            "set quantize.allow_chance=true (`medq quantize --allow-chance`) to quantize anyway")
        self.say(f"  warning: {facts}; quantizing anyway (quantize.allow_chance): INT8 matching it proves nothing",
                 warning=True)
        return True

    def int8_concat(self, graph, val: dict[str, Any], baseline: float,
                    threshold: float) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """INC's graph with its concatenations kept in INT8 (:mod:`medq.inc.rewrite`) when that still meets the
        accuracy criterion on the validation split; else INC's graph as it is. Returns (graph, its metrics, facts)."""
        from medq.inc.rewrite import rewrite_int8_concat

        metric, say = self.metric, self.say
        if not self.config.quantize.int8_concat:
            return graph, val, {"applied": False, "reason": "quantize.int8_concat is false"}

        def keep_inc(reason: str, facts: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
            say(f"  INT8 concatenation: not used: {reason}; INC's graph ({val[metric]:.4f}) is written", warning=True)
            return graph, val, facts | {"applied": False, "reason": reason}

        try:
            rewritten, report = rewrite_int8_concat(graph)
        except Exception as exc:  # a graph the rewrite did not foresee: INC's graph is still good
            traceback.print_exc()  # into the stage's log
            return keep_inc(f"the rewrite failed ({type(exc).__name__}: {first_line(exc)}); a medq bug, please "
                            "report it", {})
        facts = report.to_dict()
        if not (report.groups or report.int8_pads):
            reason = "no concatenation to keep in INT8" + (f" ({next(iter(report.skipped.values()))})"
                                                          if report.skipped else "")
            return graph, val, facts | {"applied": False, "reason": reason}
        try:
            new_val = self.metrics(rewritten)
        except Exception as exc:
            traceback.print_exc()
            if "No OpKernel" in str(exc):  # a TensorFlow build without oneDNN's fused INT8 depthwise kernel
                return keep_inc(f"the rewritten graph does not run here ({first_line(exc)})", facts)
            return keep_inc(f"the rewritten graph failed ({type(exc).__name__}: {first_line(exc)}); a medq bug, "
                            "please report it", facts)
        facts |= {"val": new_val[metric], "inc_val": val[metric]}
        if not self.deploy.criterion.met(baseline, new_val[metric]):
            return keep_inc(f"validation {metric} {new_val[metric]:.4f} is below {threshold:.4f} "
                            f"({self.deploy.criterion.describe()})", facts)
        moved = [f"{report.concats} ConcatV2 in {report.groups} group(s)", f"{report.folded_batchnorms} BatchNorm+ReLU",
                 f"{report.int8_pads} zero padding(s)"]
        say(f"  INT8 concatenation: {', '.join(m for m in moved if not m.startswith('0 '))} moved into INT8; "
            f"validation {metric} {new_val[metric]:.4f} (INC's graph {val[metric]:.4f}), criterion met")
        return rewritten, new_val, facts | {"applied": True}

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
             deploy: Any, fallbacks: list[dict[str, str]], paths_val: dict[str, dict[str, float]],
             int8_concat: dict[str, Any], log_path: Path, target: Path, fp32_at_chance: bool = False) -> None:
    met = "met, which proves nothing (FP32 is at chance)" if fp32_at_chance else "met"
    say(f"  validation {metric}: FP32 {fp32:.4f}, INT8 {int8:.4f}; criterion {deploy.criterion.describe()}: "
        f"INT8 ≥ {threshold:.4f} → {met} ({len(result.trials)} trial(s), {result.seconds:.0f} s in INC)")
    table = ", ".join(f"{op} {c['int8']}/{c['total']} INT8" + (f" {c['bf16']} BF16" if c["bf16"] else "")
                      for op, c in result.op_table.items())
    say(f"  INC op table: {table or 'empty'}" + (" (INC's graph, before medq's INT8 concatenation)"
                                                 if int8_concat.get("applied") else ""))
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
