"""Post-training static quantization of a frozen graph with INC 2.6, driven by a validated :class:`DeployConfig`.

INC 2.6 has two APIs: the yaml one (``experimental.Quantization``, deprecated since 2.0, gone in 3.0) and
``quantization.fit(model, PostTrainingQuantConfig(...))``. medq reads and validates deploy.yaml itself
(:mod:`medq.inc.deploy`) and maps every value onto the second: ``build_ptq_config`` is that map, and ``run_ptq``
records what INC actually held (its strategy's config and global options) so that tests can prove the values arrived.

``quantization.fit`` swallows every exception raised during tuning (it logs it and returns ``None`` or the best model
so far); ``run_ptq`` re-raises errors of the evaluation function instead. INC's timeout interrupts the main thread
(KeyboardInterrupt, which ``fit`` treats as "stop tuning"); a Ctrl-C or SIGTERM from the user is told apart from it
and raised again once ``fit`` returns, so the command stops instead of reporting a failed tuning.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from yaml.constructor import SafeConstructor

from medq.inc.deploy import DeployConfig, DeployError

_NULL = "tag:yaml.org,2002:null"
_LOG_FORMAT = logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")


@dataclass
class Trial:
    """One quantization INC tried: its per-op decision (INC's tune config) and the metric eval_func returned."""

    number: int
    int8_ops: list[str]
    fp32_ops: list[str]
    bf16_ops: list[str]
    metric: float | None = None


@dataclass
class PtqResult:
    graph_def: Any | None  # the best INT8 GraphDef, or None when no trial met the criterion
    baseline: float | None  # INC's FP32 baseline (eval_func on the FP32 graph)
    trials: list[Trial]
    op_table: dict[str, dict[str, int]]  # INC's "Mixed Precision Statistics" of the returned graph
    int8_ops: list[str]  # INC's final decision (q_config): ops quantized
    fp32_ops: list[str]  # ops INC kept in FP32
    bf16_ops: list[str]
    capability: list[tuple[str, str]]  # (op name, op type) INC's TensorFlow adaptor can quantize in this graph
    received: dict[str, Any]  # what INC's tuning strategy held: the deploy values as INC saw them
    log_path: str
    seconds: float


@dataclass
class _Record:
    strategies: list[Any] = field(default_factory=list)
    adaptor: Any = None
    trials: list[Trial] = field(default_factory=list)
    baseline: float | None = None
    error: Exception | None = None
    timed_out: bool = False  # INC's own timer interrupted the main thread (tuning.exit_policy.timeout)
    interrupted: tuple[int, Any] | None = None  # (signal, its handler): the user's Ctrl-C or SIGTERM during fit()


def build_ptq_config(deploy: DeployConfig, inputs: list[str], outputs: list[str], sampling_sizes: list[int]):
    """deploy.yaml → ``PostTrainingQuantConfig``; every field comes from the file or INC's printed default."""
    from neural_compressor.config import AccuracyCriterion, PostTrainingQuantConfig, TuningCriterion

    op_type_dict: dict[str, Any] = {}
    if deploy.model_wise:
        op_type_dict[".*"] = _op_settings(deploy.model_wise)  # INC matches op types as regular expressions
    for op_type, settings in (deploy.optype_wise or {}).items():
        op_type_dict[op_type] = _op_settings(settings)
    op_name_dict = {name: _op_settings(s) for name, s in (deploy.op_wise or {}).items()} or None
    conf = PostTrainingQuantConfig(
        device=deploy.device,
        approach="static",  # deploy.approach is 'post_training_static_quant', the only one the schema admits
        inputs=list(inputs), outputs=list(outputs),
        calibration_sampling_size=list(sampling_sizes),
        recipes=dict(deploy.recipes),
        op_type_dict=op_type_dict or None, op_name_dict=op_name_dict,
        excluded_precisions=[] if deploy.use_bf16 else ["bf16"],
        quant_level=deploy.quant_level,
        # fresh objects: INC's defaults are shared module-level instances
        accuracy_criterion=AccuracyCriterion(higher_is_better=deploy.criterion.higher_is_better,
                                             criterion=deploy.criterion.kind,
                                             tolerable_loss=float(deploy.criterion.tolerance)),
        tuning_criterion=TuningCriterion(strategy=deploy.strategy, timeout=deploy.timeout,
                                         max_trials=deploy.max_trials, objective=deploy.objective),
    )
    conf.model_name = deploy.model_name
    return conf


def _op_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {side: dict(values) for side, values in settings.items() if values}


def run_ptq(graph_def, deploy: DeployConfig, *, inputs: list[str], outputs: list[str], sampling_sizes: list[int],
            calib_dataloader: Any, eval_func: Callable[[Any], float], workspace: Path, log_path: Path,
            verbose: bool = False) -> PtqResult:
    """Quantize ``graph_def`` with INC's accuracy-aware tuning; INC's logger writes to ``log_path`` (and to the
    terminal when ``verbose``). The caller decides where stdout/stderr (TensorFlow's C++ log) go."""
    start = time.perf_counter()
    record = _Record()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    workspace.mkdir(parents=True, exist_ok=True)
    with _global_yaml_kept(), _inc_log(log_path, verbose):
        from neural_compressor import quantization
        from neural_compressor.config import options

        conf = build_ptq_config(deploy, inputs, outputs, sampling_sizes)
        saved = (options.random_seed, options.workspace, options.tensorboard, options.resume_from)
        try:
            options.random_seed = deploy.random_seed
            options.workspace = str(workspace)
            options.tensorboard = deploy.tensorboard
            options.resume_from = None
            with _recording(record), _interrupts_pass_through(record):
                q_model = quantization.fit(graph_def, conf, calib_dataloader=calib_dataloader,
                                           eval_func=_recorded_eval(eval_func, record))
            received = _received(record, options)
        finally:
            options.random_seed, options.workspace, options.tensorboard, options.resume_from = saved
        if record.error is not None:
            raise record.error
        table: dict[str, dict[str, int]] = {}
        q_config: dict[str, Any] = {}
        if q_model is not None:
            q_config = dict(q_model.q_config or {})
            if record.adaptor is not None:  # INC's own statistics, recomputed on the graph it returned
                record.adaptor._dump_model_op_stats(q_model.graph_def)
                table = _op_table(record.adaptor.optype_statistics)
    capability = _capability(record)
    return PtqResult(
        graph_def=q_model.graph_def if q_model is not None else None, baseline=record.baseline, trials=record.trials,
        op_table=table, int8_ops=sorted(q_config.get("op_wise_config", {})),
        fp32_ops=sorted(q_config.get("fp32_ops", [])), bf16_ops=sorted(q_config.get("bf16_ops", [])),
        capability=capability, received=received, log_path=str(log_path),
        seconds=time.perf_counter() - start)


def check_with_inc(deploy: DeployConfig) -> None:
    """Run INC 2.6's own yaml schema over the file as read (INC's loader reads ``null`` as ``{}``)."""
    with _global_yaml_kept():
        from schema import SchemaError

        from neural_compressor.conf.config import schema

        try:
            schema.validate(_nulls_as_inc_reads_them(copy.deepcopy(deploy.document)))
        except SchemaError as exc:
            detail = [line for line in str(exc).splitlines() if line.strip()]
            reason = detail[-1] if detail else exc
            raise DeployError(f"{deploy.path}: INC 2.6's own schema rejects the file ({reason}); fix that key "
                              "(see configs/deploy.yaml)") from None


def inc_schema_defaults() -> dict[str, Any]:
    """INC's defaults for a deploy.yaml of empty sections (the tests check medq's copy of them against these)."""
    with _global_yaml_kept():
        from neural_compressor.conf.config import schema

        return schema.validate({"model": {"name": "m", "framework": "tensorflow"},
                                "quantization": {"calibration": {}, "recipes": {}}, "tuning": {},
                                "evaluation": {"performance": {"configs": {}}}})


def _nulls_as_inc_reads_them(value: Any) -> Any:
    if value is None:
        return {}
    if isinstance(value, dict):
        return {k: _nulls_as_inc_reads_them(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nulls_as_inc_reads_them(v) for v in value]
    return value


@contextlib.contextmanager
def _global_yaml_kept() -> Iterator[None]:
    """Importing ``neural_compressor.conf.config`` makes every ``yaml.safe_load`` read ``null`` as ``{}`` (process
    wide); INC reads its own yaml files that way while it runs, then the standard behaviour is restored.

    Also imports INC (about 15 s the first time) without its pkg_resources deprecation warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        import neural_compressor  # noqa: F401
    try:
        yield
    finally:
        yaml.SafeLoader.add_constructor(_NULL, SafeConstructor.construct_yaml_null)


@contextlib.contextmanager
def _inc_log(log_path: Path, verbose: bool) -> Iterator[None]:
    """INC's logger writes to ``log_path``, and to the terminal too only when ``verbose``."""
    from neural_compressor.utils import logger as _  # noqa: F401  (creates INC's logger and its console handler)

    with open(log_path, "a", buffering=1) as log:
        handler = logging.StreamHandler(log)
        handler.setFormatter(_LOG_FORMAT)
        logger = logging.getLogger("neural_compressor")
        saved = logger.handlers[:]
        logger.handlers = [handler] + (saved if verbose else [])
        try:
            yield
        finally:
            logger.handlers = saved


@contextlib.contextmanager
def _recording(record: _Record) -> Iterator[None]:
    """Note every tuning strategy INC creates and every quantization its TensorFlow adaptor performs (and make
    INC's calibration capture read file descriptor 2)."""
    from neural_compressor.adaptor import FRAMEWORKS
    from neural_compressor.strategy.strategy import TuneStrategy

    from neural_compressor.adaptor.tf_utils import graph_converter, smooth_quant_calibration
    from neural_compressor.utils.utility import CaptureOutputToFile

    adaptor_cls = FRAMEWORKS["tensorflow"]
    strategy_init, adaptor_quantize = TuneStrategy.__init__, adaptor_cls.quantize

    def capture_fd2(path, stream=None):
        # INC reads calibration ranges back from what its tf.print nodes write to file descriptor 2, but captures
        # ``sys.stderr`` as bound when INC was imported: wrong when that was a redirected or pytest-captured stream.
        return CaptureOutputToFile(path, stream=_Fd2())

    def init(self, *args, **kwargs):
        strategy_init(self, *args, **kwargs)
        record.strategies.append(self)

    def quantize(self, tune_cfg, *args, **kwargs):
        record.adaptor = self
        decided: dict[str, list[str]] = {"int8": [], "fp32": [], "bf16": []}
        for (name, _type), op_cfg in tune_cfg.get("op", {}).items():
            dtype = op_cfg.get("activation", {}).get("dtype")
            decided[dtype if dtype in ("fp32", "bf16") else "int8"].append(name)
        record.trials.append(Trial(len(record.trials) + 1, sorted(decided["int8"]), sorted(decided["fp32"]),
                                   sorted(decided["bf16"])))
        return adaptor_quantize(self, tune_cfg, *args, **kwargs)

    TuneStrategy.__init__, adaptor_cls.quantize = init, quantize
    graph_converter.CaptureOutputToFile = smooth_quant_calibration.CaptureOutputToFile = capture_fd2
    try:
        yield
    finally:
        TuneStrategy.__init__, adaptor_cls.quantize = strategy_init, adaptor_quantize
        graph_converter.CaptureOutputToFile = smooth_quant_calibration.CaptureOutputToFile = CaptureOutputToFile


@contextlib.contextmanager
def _interrupts_pass_through(record: _Record) -> Iterator[None]:
    """``fit`` catches KeyboardInterrupt as "timeout: stop tuning" and returns; a signal from the user during it is
    raised again afterwards by its own handler. INC's timer is wrapped to say which is which (it interrupts the main
    thread through the same SIGINT handler)."""
    import _thread
    import signal
    import threading

    from neural_compressor import quantization

    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return

    @contextlib.contextmanager
    def time_limit(seconds):
        def expire():
            record.timed_out = True
            _thread.interrupt_main()

        timer = threading.Timer(seconds or 3600 * 24 * 365, expire)  # 0: no limit (INC's own workaround)
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def noted(previous):
        def handler(signum, frame):
            if signum == signal.SIGINT and record.timed_out and record.interrupted is None:
                raise KeyboardInterrupt  # INC's timeout: fit() stops tuning and returns its best model
            record.interrupted = (signum, previous)
            previous(signum, frame)

        return handler

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    real_time_limit = quantization.time_limit
    quantization.time_limit = time_limit
    for sig, previous in saved.items():
        if callable(previous):  # Python-level handlers only (SIG_DFL kills the process anyway)
            signal.signal(sig, noted(previous))
    try:
        yield
    finally:
        quantization.time_limit = real_time_limit
        for sig, previous in saved.items():
            signal.signal(sig, previous)
    if record.interrupted is not None:
        signum, previous = record.interrupted
        previous(signum, None)  # raises what the user's signal raises (KeyboardInterrupt for Ctrl-C)
        raise KeyboardInterrupt


class _Fd2:
    """The process's standard error, whatever ``sys.stderr`` is at the moment."""

    @staticmethod
    def fileno() -> int:
        return 2


def _recorded_eval(eval_func: Callable[[Any], float], record: _Record) -> Callable[[Any], float]:
    def evaluate(model) -> float:
        try:
            value = float(eval_func(model))
        except Exception as exc:  # fit() would swallow it; run_ptq re-raises it
            record.error = exc
            raise
        if not record.trials:
            record.baseline = value
        elif record.trials[-1].metric is None:
            record.trials[-1].metric = value
        return value

    return evaluate


def _received(record: _Record, options: Any) -> dict[str, Any]:
    """The deploy values as INC's tuning strategy held them."""
    if not record.strategies:
        return {}
    strategy = record.strategies[0]
    cfg = strategy.config
    return {
        "strategy_classes": [type(s).__name__ for s in record.strategies],
        "calibration_sampling_size": [int(s) for s in cfg.calibration_sampling_size],
        "accuracy_criterion": {"criterion": cfg.accuracy_criterion.criterion,
                               "tolerable_loss": cfg.accuracy_criterion.tolerable_loss,
                               "higher_is_better": cfg.accuracy_criterion.higher_is_better},
        "tuning_criterion": {"strategy": cfg.tuning_criterion.strategy,
                             "max_trials": cfg.tuning_criterion.max_trials,
                             "timeout": cfg.tuning_criterion.timeout,
                             "objective": cfg.tuning_criterion.objective},
        "quant_level": cfg.quant_level, "recipes": dict(cfg.recipes), "use_bf16": cfg.use_bf16,
        "inputs": list(cfg.inputs), "outputs": list(cfg.outputs), "device": cfg.device, "approach": cfg.approach,
        "op_type_dict": cfg.op_type_dict, "op_name_dict": cfg.op_name_dict, "model_name": cfg.model_name,
        "random_seed": options.random_seed, "workspace": options.workspace, "tensorboard": options.tensorboard,
        "calib_batch_size": getattr(strategy.calib_dataloader, "batch_size", None),
        "trials_run": max(getattr(s, "trials_count", 0) for s in record.strategies),
    }


def _capability(record: _Record) -> list[tuple[str, str]]:
    for strategy in record.strategies:
        capability = getattr(strategy, "_capability", None)
        if capability:
            return sorted(tuple(key) for key in capability.get("opwise", {}))
    return []


def _op_table(statistics: Any) -> dict[str, dict[str, int]]:
    if not statistics:
        return {}
    names, rows = statistics
    table = {}
    for row in rows:
        counts = dict(zip(names[1:], row[1:]))
        if counts.get("Total"):
            table[str(row[0])] = {"total": int(counts["Total"]), "int8": int(counts.get("INT8", 0)),
                                  "bf16": int(counts.get("BF16", 0)), "fp32": int(counts.get("FP32", 0))}
    return dict(sorted(table.items()))
