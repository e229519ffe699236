"""One typed config object for every stage.

Loaded from a YAML file (``yaml.safe_load`` semantics through :mod:`medq.yamlio`; a key repeated at any level
is an error naming both lines), checked field by field against the dataclasses below (unknown keys and
wrong types are errors that name the file and the key), then overridden from the command line with
``--set section.key=value``. String values may use ``${VAR}`` or ``${VAR:-default}`` so that ``DATA_DIR`` and
``OUTPUT_DIR`` (the reference kit's habit) work without editing the file.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import yaml

from medq import yamlio
from medq.errors import ConfigError

log = logging.getLogger("medq")
PhantomKind = Literal["chest-pneumonia", "chest-multilabel", "rsna-dicom", "busi"]
Task = Literal["binary", "multiclass", "multilabel"]
Normalization = Literal["unit", "imagenet", "symmetric", "raw"]  # raw: 0-255 pixels, for models that normalise inside
Precision = Literal["fp32", "bf16", "int8", "int8-bf16"]
BitDepth = Literal["auto", 8, 9, 10, 11, 12, 13, 14, 15, 16]


Objective = Literal["auc", "accuracy"]


@dataclass(frozen=True)
class Choices:
    """Marks a string setting whose allowed values come from a registry, read when the config is checked:
    ``Annotated[str, Choices(fn)]`` is checked like ``Literal[*fn()]``."""

    values: Callable[[], tuple[str, ...]]


def _reference_rows() -> tuple[str, ...]:
    from medq.engines import row_ids

    return row_ids(reference=True)


ReferenceRow = Annotated[str, Choices(_reference_rows)]  # <engine>-<precision> of a medq.engines spec


def dataset_formats() -> tuple[str, ...]:
    from medq.data.readers import format_names

    return format_names()


DatasetFormat = Annotated[str, Choices(dataset_formats)]  # "auto" or a reader registered in medq.data.readers


@dataclass
class RunConfig:
    name: str = "default"
    output_dir: str = "${OUTPUT_DIR:-output}"
    seed: int = 42
    # The validation number that picks training's best epoch (and drives early stopping and the LR schedule), ranks
    # the tuner's trials and is INC's accuracy criterion (medq.selection). ROC-AUC (mean over classes for multiclass
    # and multi-label) is threshold-free; accuracy rewards the majority class on imbalanced data: only when asked.
    objective: Objective = "auc"


@dataclass
class PhantomConfig:
    """The built-in offline dataset: written to ``data.root`` in the real layout of its kind, then read back."""

    kind: PhantomKind = "chest-pneumonia"
    n_train: int = 800
    n_val: int = 16  # the Kaggle archive's tiny val split, mimicked; medq validates on a patient-wise carve of train
    n_test: int = 200
    size: int = 128
    seed: int = 7


@dataclass
class DataConfig:
    format: DatasetFormat = "auto"
    root: str = "${DATA_DIR:-data}/chest_xray"
    variant: Optional[str] = None  # e.g. kaggle-pneumonia "3-class", busi "3-class"
    # 'from-train': validation is a patient-wise fraction of train (the Kaggle val split holds 16 images);
    # 'official': the layout's own split where it has one.
    val_split: Literal["from-train", "official"] = "from-train"
    val_fraction: float = 0.2
    test_fraction: float = 0.2  # for layouts without a test split
    strict: bool = False  # unreadable files: error instead of listed skip
    # Images whose header claims more pixels are refused unread, as a listed skip (decompression bombs).
    max_megapixels: float = 100.0
    # The significant bits of 16-bit images without an sBIT chunk (a PNG's sBIT always wins): 'auto' reads all 16
    # and warns about images that use at most 14 of them; 12 reads DICOM→PNG exports of 12-bit data as a viewer
    # told "12-bit" would (4095 is white). Recorded with the run's preprocessing (medq.data.decode).
    bit_depth: BitDepth = "auto"
    # One image (the same file, or a byte-identical copy) in two of the splits the dataset fixes (Kaggle folders,
    # NIH lists, a CSV split column) leaks into the test metrics: 'error' (default) names both files;
    # 'drop-later' keeps it in the earliest of train/val/test and lists the dropped copy as a skip.
    cross_split_copies: Literal["error", "drop-later"] = "error"
    # One image with two labels (one file listed twice, or byte-identical copies): 'error' (default) names both
    # listings; 'drop-both' leaves out every listing of it (neither label can be trusted), each a listed skip.
    label_conflicts: Literal["error", "drop-both"] = "error"
    # Generate the phantom dataset when root does not exist: only at the config's built-in location (its data.root
    # without DATA_DIR), or anywhere with `--phantoms`; elsewhere a missing folder is an error (a typo must not train
    # on phantoms).
    generate: bool = True
    # The preprocessed-image cache on disk (medq.data.cache): 8-bit images at the input size, shared by every run
    # and stage with that size; beside it the DICOM header values (medq.data.headers). "" = <run.output_dir>/cache.
    cache: bool = True
    cache_dir: str = ""
    # csv tables: the columns holding patient metadata for the subgroup analysis (medq.subgroups), e.g.
    # {sex: PatientSex, age: Age, view: View}; they are then not label columns. NIH and RSNA read theirs on their own.
    metadata_columns: dict[str, str] = field(default_factory=dict)
    phantom: PhantomConfig = field(default_factory=PhantomConfig)


@dataclass
class PreprocessConfig:
    image_size: int = 96
    channels: Literal[1, 3] = 1
    normalization: Normalization = "unit"


@dataclass
class ModelConfig:
    name: str = "refkit-cnn"
    params: dict[str, Any] = field(default_factory=dict)
    weights: Optional[str] = None  # a local weights file; nothing is ever downloaded


@dataclass
class AugmentConfig:
    rotation_deg: float = 5.0
    shift: float = 0.05
    zoom: float = 0.08
    brightness: float = 0.08
    contrast: float = 0.1
    horizontal_flip: bool = False  # anatomy is not left-right symmetric: off unless the task allows it


@dataclass
class LowResConfig:
    """Progressive resizing: ``epochs`` epochs at ``image_size`` first, then ``train.epochs`` at
    ``preprocess.image_size`` starting from those weights. Models that end in global pooling (DenseNet, ResNet,
    refkit-cnn) have the same weights at every input size, and half the side trains about four times faster."""

    image_size: int = 0  # 0: off
    epochs: int = 0
    # 0: train.learning_rate. A low-res phase at a high rate, then full resolution at a lower one (the change of
    # scale is a fine-tuning step) works better than one rate for both.
    learning_rate: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 32
    learning_rate: float = 1e-3
    optimizer: Literal["adam", "sgd", "rmsprop"] = "adam"
    loss: Literal["auto", "bce", "weighted-bce", "focal", "cce"] = "auto"
    class_weight: Literal["balanced", "none"] = "balanced"
    dropout: float = 0.2
    early_stopping_patience: int = 6
    focal_gamma: float = 2.0  # loss: focal
    # data-parallel training: 'mirrored' (this machine's devices) or 'multi-worker' (TF_CONFIG names the cluster)
    distribute: Literal["none", "mirrored", "multi-worker"] = "none"
    tensorboard: bool = True  # event files in <run>/logs/tensorboard (a CSV log is always written)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    low_res: LowResConfig = field(default_factory=LowResConfig)


@dataclass
class TuneConfig:
    enabled: bool = True
    tuner: Literal["random", "hyperband", "bayesian"] = "random"
    max_trials: int = 3
    epochs: int = 4
    # name -> list of choices, or a range [loguniform|uniform, low, high] / [int, low, high]. Names: learning_rate,
    # batch_size, dropout, optimizer, loss, and any model.params key (scaled-densenet: alpha, beta, phi).
    search_space: dict[str, list[Any]] = field(
        default_factory=lambda: {"learning_rate": [1e-3, 3e-3], "batch_size": [16, 32]}
    )
    # Trials start from the run's trained model (a fine-tuning search over learning rate, batch size, dropout...):
    # short trials can then beat the full training. Ignored for trials that change the architecture or resolution.
    warm_start: bool = True
    hyperband_factor: int = 3  # tuner: hyperband (its max epochs is tune.epochs)
    latency_runs: int = 10  # batch-1 Keras latency of each trial's model: median of this many runs
    tradeoff_tolerance: float = 0.01  # the trade-off pick: the fastest trial within this of the best metric
    # Distributed search: a worker silent this long (seconds; workers send a heartbeat every sixth of it) is taken
    # for dead, and the chief hands its trial to another worker.
    worker_timeout: int = 120


@dataclass
class FreezeConfig:
    input_name: str = "input"
    output_name: str = "output"


@dataclass
class QuantizeConfig:
    deploy: str = "configs/deploy.yaml"  # INC 2.x deploy.yaml: calibration size, criterion, exit policy, seed
    # Precision paths whose validation metric is measured; paths this CPU cannot run are skipped with the reason.
    precisions: list[Precision] = field(default_factory=lambda: ["fp32", "bf16", "int8", "int8-bf16"])
    # Keep DenseNet-style concatenations (and the BatchNorm+ReLU reading them) in INT8 after INC
    # (medq.inc.rewrite); the rewritten graph is kept only when it still meets deploy.yaml's accuracy criterion.
    int8_concat: bool = True
    # Quantize a model whose FP32 validation score is not above chance (the stage stops otherwise: INT8 matching a
    # model that learned nothing "meets" any accuracy criterion).
    allow_chance: bool = False


@dataclass
class BenchmarkConfig:
    precisions: list[Precision] = field(default_factory=lambda: ["fp32", "bf16", "int8", "int8-bf16"])
    batch_size: int = 32
    warmup: int = 5
    latency_iterations: int = 60
    throughput_iterations: int = 10
    # Throughput sweep (batch_size is always measured too); latency is always at batch 1.
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16, 32])
    # Multi-instance throughput layouts "INSTANCESxCORES" (e.g. "2x1"); "auto": 1 x all cores and all cores x 1.
    # The quantize deploy.yaml's performance configs (num_of_instance, cores_per_instance) are added; [] = none.
    instances: list[str] = field(default_factory=lambda: ["auto"])
    instance_precisions: list[Precision] = field(default_factory=lambda: ["fp32", "int8"])  # TF rows measured so
    # Optional reference rows, each skipped with the reason when its package is not installed (the `reference` extra).
    reference: list[ReferenceRow] = field(default_factory=lambda: [
        "onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32", "openvino-int8"])
    calibration_images: int = 100  # reference INT8 calibration (train split) when the quantize stage recorded none
    onnx_opset: int = 17
    worker_timeout: int = 1800  # seconds per measuring process
    # Measure every row this many times, in rounds (each round runs every row once, each in a fresh process), and
    # report the median of the rounds: on a shared machine this spreads other jobs' load over all rows alike.
    repeats: int = 1
    # Each row is equivalent to TF FP32 iff the 95% interval of its paired AUC difference lies within ±this.
    equivalence_margin: float = 0.005


@dataclass
class ThresholdsConfig:
    """The operating thresholds (medq.thresholds): chosen per class on the validation split after training (and when
    tuning replaces the model), recorded in the manifest, used by evaluate, predict and the benchmark's decisions.
    ``policy``: 'youden' (no target), 'sensitivity' or 'specificity' (``target``: the validation figure to reach),
    or 'fixed' (``target``: the threshold itself)."""

    policy: Literal["youden", "sensitivity", "specificity", "fixed"] = "youden"
    target: Optional[float] = None
    # class name → its own {policy, target} (e.g. Pneumothorax: {policy: sensitivity, target: 0.95}); the classes
    # are checked against the run's when they are known (medq.thresholds.check_per_class)
    per_class: dict[str, "ClassThresholdConfig"] = field(default_factory=dict)


@dataclass
class ClassThresholdConfig:
    """One class's threshold policy (``thresholds.per_class``): as the section's ``policy`` and ``target``."""

    policy: Literal["youden", "sensitivity", "specificity", "fixed"] = "youden"
    target: Optional[float] = None


@dataclass
class ExternalConfig:
    """External validation (`medq evaluate --run NAME --config THIS.yaml`, medq.external): how the run's classes map
    to this config's dataset. ``label_map``: {model class: external class, or a list of them} or a built-in
    mapping's name (medq.labelmap); unset: the built-in for the two class lists, else identical class names."""

    label_map: Any = None


@dataclass
class SubgroupsConfig:
    """Per-subgroup metrics (medq.subgroups) in evaluate and the benchmark, from the patient metadata the dataset's
    reader carries (NIH CSV columns, RSNA DICOM headers; none for Kaggle pneumonia and folder layouts)."""

    # which of sex, age, view to report; [] = every one the dataset has
    attributes: list[Literal["sex", "age", "view"]] = field(default_factory=list)
    # age band edges in years, increasing: [0, 18) [18, 40) … [80, 200); a top edge at or above 120 (the oldest
    # valid age) holds 120 too ('≥ 80'); an age outside the bands is its own row
    age_bands: list[float] = field(default_factory=lambda: [0.0, 18.0, 40.0, 60.0, 80.0, 200.0])
    # a subgroup with fewer images is shown but never flagged ("too few images")
    min_images: int = 30


@dataclass
class RuntimeConfig:
    """Thread settings applied (as environment variables, before TensorFlow starts) in every measuring process."""

    intra_op_threads: int = 0  # 0: every physical core
    inter_op_threads: int = 1
    kmp_blocktime: int = 1
    kmp_affinity: str = "granularity=fine,compact,1,0"


@dataclass
class ServeConfig:
    """`medq serve`: the HTTP inference server (medq.serve); every key has a command-line flag of the same name."""

    runs: list[str] = field(default_factory=list)  # run names or folders; each is one model, named by its run
    # The engine's model of this precision: tensorflow serves the run's graphs (keras: its Keras model); onnxruntime
    # and openvino (the reference extra) serve the models `medq benchmark` built for the run (benchmark.reference).
    model: Literal["int8", "fp32", "bf16", "keras", "int8-bf16"] = "int8"
    engine: Literal["tensorflow", "onnxruntime", "openvino"] = "tensorflow"
    host: str = "127.0.0.1"  # loopback only unless told otherwise
    port: int = 8080
    # Dynamic batching: when the engine is free, a batch takes what is queued, up to max_batch_size images (the
    # benchmark's batch size: the batch its img/s is measured at); with max_queue_delay_ms > 0 it first waits that long
    # after its first request for company: fuller batches under thin steady traffic, that much more latency for every
    # request when traffic is light. 0: no request ever waits for another; under load batches fill on their own
    # while the engine is busy.
    max_batch_size: int = 32
    max_queue_delay_ms: float = 0.0
    # images waiting per model; beyond it a request is answered 503 + Retry-After at once. A request accepted waits
    # at most max_queue_size / max_batch_size batches before its own: the bound of the p99 under overload.
    max_queue_size: int = 64
    decode_threads: int = 0  # images decoded at once for /v1 predict, beside inference; 0: one per physical core
    request_timeout_ms: float = 30000.0  # a request's deadline: queued longer than this it is answered 504
    max_body_mb: float = 32.0  # request bodies above this are refused (413) before they are read
    threshold: Optional[float] = None  # decisions at this probability instead of the run's own (as predict --threshold)
    token_file: Optional[str] = None  # a file holding the bearer token every request but /v2/health/* must carry
    tls_cert: Optional[str] = None  # PEM certificate and key: HTTPS instead of HTTP
    tls_key: Optional[str] = None
    drain_timeout_s: float = 30.0  # SIGTERM: in-flight requests get this long to finish before the server exits


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    thresholds: ThresholdsConfig = field(default_factory=ThresholdsConfig)
    external: ExternalConfig = field(default_factory=ExternalConfig)
    subgroups: SubgroupsConfig = field(default_factory=SubgroupsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    source: Optional[str] = None  # the file this was loaded from (set by load_config, not by the user)
    # The preprocess settings the config left out, which took model.name's registry defaults (set by load_config;
    # recorded with the config in the run's manifest).
    preprocess_from_model: list[str] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_NOT_SETTINGS = ("source", "preprocess_from_model")  # set by load_config, never by the user
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_UNEXPANDED = re.compile(r"\$(\{[^}]*\}?|[A-Za-z_][A-Za-z0-9_]*)")  # $NAME, ${NAME:default}, ${NAME


def expand_env(text: str, where: str) -> str:
    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name) or default
        if value is None:
            raise ConfigError(f"{where}: ${{{name}}} is not set; export {name} or write ${{{name}:-default}}")
        return value

    expanded = _ENV.sub(sub, text)
    left = _UNEXPANDED.search(_ENV.sub("", text))
    if left:  # $DATA_DIR or ${VAR:default} would stay in the path as written: a folder named '$DATA_DIR'
        raise ConfigError(f"{where}: {left.group(0)!r} is not expanded; write ${{NAME}} or ${{NAME:-default}}")
    if expanded == "~" or expanded.startswith("~/"):  # as the shell would: not a folder named '~' in the cwd
        expanded = os.path.expanduser(expanded)
    return expanded


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return {list: "a list", dict: "a mapping"}[origin]
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int → float, env expanded)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        choices = next(m for m in tp.__metadata__ if isinstance(m, Choices))
        return _coerce(value, Literal[choices.values()], where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _coerce(value, inner, where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if not any(value == a and type(value) is type(a) for a in allowed):  # 3.0 is not the choice 3, True not 1
            raise ConfigError(f"{where}: {value!r} is not allowed; use {_type_name(tp)}{_yaml11_hint(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, inner = typing.get_args(tp)
        odd = [k for k in value if k is None or isinstance(k, bool)]
        if odd:  # str(False) would silently be a key 'False' where the file says NO
            raise ConfigError(f"{where}: the key {odd[0]!r} is not a name{_yaml11_hint(odd[0])}")
        return {str(k): _coerce(v, inner, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return _yaml12_numbers(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}{_yaml11_hint(value)}")
        return value
    if tp is float:
        if isinstance(value, str):
            value = _yaml11_float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}{_yaml11_hint(value)}")
        if not math.isfinite(value):  # nan passes every range check (all comparisons are false)
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}{_yaml11_hint(value)}")
        return expand_env(value, where)
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def _yaml11_float(text: str) -> float | str:
    """PyYAML reads ``1e-3`` (no dot) as a string; users mean a number."""
    try:
        return float(text)
    except ValueError:
        return text


_EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _yaml12_numbers(value: Any) -> Any:
    """A free-form value (``model.params``, a search space) with ``1e-3`` read as the number YAML 1.2 makes it:
    PyYAML (YAML 1.1) keeps it a string, which a layer would get as its dropout rate."""
    if isinstance(value, str) and _EXPONENT.match(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_yaml12_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _yaml12_numbers(v) for k, v in value.items()}
    return value


def _yaml11_hint(value: Any) -> str:
    """Why YAML made ``value`` what it is, when the file likely says something else."""
    if isinstance(value, bool):
        return (" (YAML reads yes/no/on/off/true/false, in any case, as true or false: quote a name, e.g. 'NO')")
    if value is None:
        return " (YAML reads an empty value, ~ or null as null: quote a name, e.g. 'null')"
    if isinstance(value, float) and value.is_integer():
        return f" (write {int(value)})"
    return ""


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls) if f.name not in _NOT_SETTINGS}
    unknown = sorted(set(data) - names, key=str)  # a YAML key may be a number, true/false or null
    if unknown:
        section = f"{where}: " if where else ""
        raise ConfigError(f"{section}unknown key {unknown[0]!r}; allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], key)
        elif dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], {}, key)
        elif isinstance(f.default, str):
            kwargs[f.name] = expand_env(f.default, key)
    obj = cls(**kwargs)
    _check_ranges(obj, where)
    return obj


_POSITIVE = {
    "max_megapixels", "n_train", "size", "image_size", "epochs", "batch_size", "max_trials", "latency_iterations",
    "throughput_iterations", "early_stopping_patience", "max_batch_size", "max_queue_size", "request_timeout_ms",
    "max_body_mb", "drain_timeout_s",
}
_FRACTIONS = {"val_fraction", "test_fraction", "dropout", "zoom", "shift", "brightness", "contrast"}


RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_run_name(name: str, where: str = "run.name") -> str:
    """A run name is a plain folder name under run.output_dir: not empty, no path separators, no '..'."""
    if not name:
        raise ConfigError(f"{where}: the run name is empty (an unset shell variable?); give a folder name, "
                          "e.g. --run-name default")
    if not RUN_NAME.match(name):
        raise ConfigError(f"{where}: {name!r} is not a plain folder name; use letters, digits, '.', '_' and '-', "
                          "starting with a letter or digit (the run lives in run.output_dir/<name>)")
    return name


def _check_ranges(obj: Any, where: str) -> None:
    if isinstance(obj, RunConfig):
        check_run_name(obj.name, f"{where}.name" if where else "name")
        if not obj.output_dir.strip():
            raise ConfigError(f"{where}.output_dir: empty; name the folder that holds the runs (default: output)")
    if isinstance(obj, (ThresholdsConfig, ClassThresholdConfig)):
        _check_thresholds(obj, where)
        return
    if isinstance(obj, SubgroupsConfig):
        _check_subgroups(obj, where)
        return
    if isinstance(obj, ExternalConfig):  # a built-in's name, a map file or pairs, checked before any stage runs
        from medq.labelmap import from_config

        from_config(obj.label_map, f"{where}.label_map")
        return
    if isinstance(obj, DataConfig):
        _check_metadata_columns(obj, where)
        if not obj.root.strip():  # '' is the working directory: whatever is there would be read as the dataset
            raise ConfigError(f"{where}.root: empty; name the dataset folder (or its CSV table)")
    if isinstance(obj, LowResConfig):  # 0/0 is "off"; otherwise both are set
        negative = min(obj.image_size, obj.epochs, obj.learning_rate) < 0
        if negative or (obj.image_size == 0) != (obj.epochs == 0):
            raise ConfigError(f"{where}: set both image_size and epochs (> 0) for progressive resizing, or neither; "
                              f"got image_size {obj.image_size}, epochs {obj.epochs}")
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{where}.{f.name}" if where else f.name
        if f.name in _POSITIVE and isinstance(value, (int, float)) and value <= 0:
            raise ConfigError(f"{key}: must be greater than 0, got {value}")
        if f.name in _FRACTIONS and isinstance(value, float) and not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}: must be in [0, 1), got {value}")
        if f.name == "learning_rate" and isinstance(value, float) and not 0.0 < value < 10.0:
            raise ConfigError(f"{key}: must be a positive learning rate, got {value}")


def _check_metadata_columns(obj: DataConfig, where: str) -> None:
    unknown = sorted(set(obj.metadata_columns) - {"sex", "age", "view"})
    if unknown:
        raise ConfigError(f"{where}.metadata_columns: {unknown[0]!r} is not a patient attribute medq reads; use sex, "
                          "age and view, e.g. {sex: PatientSex, age: Age, view: View}")


def _check_subgroups(obj: SubgroupsConfig, where: str) -> None:
    edges = obj.age_bands
    if len(edges) < 2 or edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(f"{where}.age_bands: give at least two increasing ages in years from 0 up, e.g. "
                          f"[0, 18, 40, 60, 80, 200]; got {edges}")
    if obj.min_images < 1:
        raise ConfigError(f"{where}.min_images: must be at least 1, got {obj.min_images}")
    if len(set(obj.attributes)) != len(obj.attributes):
        raise ConfigError(f"{where}.attributes: {obj.attributes} names one twice; list each of sex, age, view once")


def _check_thresholds(obj: ThresholdsConfig, where: str) -> None:
    if obj.policy == "youden":
        if obj.target is not None:
            raise ConfigError(f"{where}.target: the youden policy takes no target (it maximises sensitivity + "
                              f"specificity); remove target, or choose policy sensitivity, specificity or fixed")
        return
    meaning = "the threshold" if obj.policy == "fixed" else f"the validation {obj.policy} to reach"
    if obj.target is None:
        raise ConfigError(f"{where}.target: policy {obj.policy} needs a target ({meaning}), e.g. target: 0.9")
    if not 0.0 < obj.target < 1.0:
        raise ConfigError(f"{where}.target: {meaning} must lie strictly between 0 and 1, got {obj.target}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.epochs=3'`` → (['train', 'epochs'], 3); the value is read as YAML (numbers, lists, true/false)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: write it as section.key=value, e.g. --set train.epochs=3")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not key.strip():
        raise ConfigError(f"--set {text!r}: the key is empty")
    if not all(part.strip() for part in path):
        raise ConfigError(f"--set {text!r}: {key.strip()!r} has an empty part; write section.key=value with one dot "
                          "between names, e.g. --set run.name=x")
    path = [part.strip() for part in path]
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    problem = yamlio.other_base(raw, value)
    if problem:
        raise ConfigError(f"--set {text!r}: {problem}")
    return path, value


def _merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def read_yaml(path: Path) -> dict[str, Any]:
    """The config file as a mapping of sections; a key repeated at any level is an error (YAML would keep the last
    block silently: two ``train:`` sections lose the first one's settings)."""
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a config file; pass a YAML file with --config (see configs/)")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass an existing file with --config (see configs/)")
    data, repeated = yamlio.read_yaml(path)
    yamlio.refuse_repeated(path, repeated)
    if data is None:  # a truncated or unsaved file would otherwise run on the defaults without a word
        raise ConfigError(f"{path}: empty (no settings); write the settings (see configs/), or leave out --config to "
                          "run on the defaults")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (run:, data:, ...), got {type(data).__name__}")
    return data


# Settings run.objective replaced, and the objective each of their values meant (None: the default, no choice).
_REPLACED_BY_OBJECTIVE = {("train", "monitor"): {"auc": "auc", "primary": "accuracy"},
                          ("quantize", "metric"): {"auto": None, "auc": "auc", "accuracy": "accuracy"}}


def _fold_into_objective(data: dict[str, Any], source: str, strict: bool = True) -> None:
    """Read the replaced ``train.monitor`` / ``quantize.metric`` as ``run.objective`` (in place), with a warning;
    ``strict``: settings that disagree with each other or with run.objective are an error (a saved run's config
    is read leniently)."""
    implied: dict[str, str] = {}
    for (section, key), meaning in _REPLACED_BY_OBJECTIVE.items():
        node = data.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        value = node.pop(key)
        where = f"{section}.{key}"
        if value not in meaning:
            raise ConfigError(f"{source}: {where} is replaced by run.objective; remove it and set run.objective to "
                              "auc or accuracy")
        if meaning[value] is not None:
            implied[f"{where}: {value}"] = meaning[value]
        if strict:
            log.warning("%s: %s is replaced by run.objective (one objective for epochs, trials and INC)%s; "
                        "move it there", source, where,
                        f", read as run.objective: {meaning[value]}" if meaning[value] else "")
    if not implied:
        return
    run = data.setdefault("run", {})
    if not isinstance(run, dict):
        return  # _build reports the malformed section
    given = run.get("objective")
    choices = set(implied.values()) | ({given} if given else set())
    if strict and len(choices) > 1:
        said = ", ".join(f"{k} ({v})" for k, v in implied.items()) + (f", run.objective: {given}" if given else "")
        raise ConfigError(f"{source}: {said} disagree, and one run.objective now drives training, tuning and INC; "
                          "set run.objective and remove train.monitor / quantize.metric")
    run.setdefault("objective", next(iter(implied.values())))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← file ← ``--set`` overrides, validated as a whole."""
    data: dict[str, Any] = read_yaml(Path(path)) if path else {}
    source = str(path) if path else "defaults"
    for text in overrides:
        keys, value = parse_override(text)
        _merge(data, keys, value)
    _fold_into_objective(data, source)
    try:
        config = _build(Config, data, "")
        _model_input(config, data.get("preprocess"))
    except ConfigError as exc:
        given = _override_behind(str(exc), overrides)
        raise ConfigError(f"--set {given}: {exc}" if given else f"{source}: {exc}") from None
    config.source = source
    if path:
        config.quantize.deploy = _resolve_beside(config.quantize.deploy, Path(path))
    return config


def _model_input(config: Config, given: Any) -> None:
    """Preprocess settings the config leaves out come from the model's registry entry (their names are recorded in
    ``preprocess_from_model``); a normalisation or channel count the model cannot take is an error. An unknown model
    is left to build_model's error."""
    from medq.models import PREPROCESS_KEYS, model_entry

    entry = model_entry(config.model.name)
    if entry is None:
        return
    config.preprocess_from_model = [k for k in PREPROCESS_KEYS if not (isinstance(given, dict) and k in given)]
    for key in config.preprocess_from_model:
        setattr(config.preprocess, key, entry.defaults()[key])
    entry.check(config.preprocess.channels, config.preprocess.normalization)


def _override_behind(message: str, overrides: list[str] | tuple[str, ...]) -> str | None:
    """The ``--set`` text whose key the error ``message`` is about (the last one given wins, as in the merge)."""
    for text in reversed(list(overrides)):
        keys = [part.strip() for part in text.split("=", 1)[0].split(".")]
        dotted = ".".join(keys)
        unknown = tuple(f"{'.'.join(keys[:i]) + ': ' if i else ''}unknown key {keys[i]!r}" for i in range(len(keys)))
        if message.startswith((f"{dotted}:", f"{dotted}[", f"{dotted}.", *unknown)):
            return text
    return None


def _resolve_beside(relative: str, config_file: Path) -> str:
    """A relative file named in a config: as given when it exists from the working directory, else found beside the
    config file or one folder up (``configs/deploy.yaml`` named in ``configs/x.yaml``, run from anywhere)."""
    given = Path(relative)
    if given.is_absolute() or given.exists():
        return relative
    for base in (config_file.parent, config_file.parent.parent):
        if (base / given).exists():
            return str(base / given)
    return relative


def builtin_data_root(config: Config) -> Path | None:
    """The config's own data.root with every ``${VAR:-default}`` at its default (DATA_DIR unset): the built-in
    location where a missing dataset may be generated as phantoms. None when it names a variable without a default."""
    raw: Any = None
    if config.source not in (None, "defaults"):
        raw = (read_yaml(Path(config.source)).get("data") or {}).get("root")
    if not isinstance(raw, str):
        raw = DataConfig.root
    if any(m.group(2) is None for m in _ENV.finditer(raw)):
        return None
    return Path(_ENV.sub(lambda m: m.group(2), raw))


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config saved in a run's manifest."""
    data = {k: v for k, v in data.items() if k not in _NOT_SETTINGS}
    _fold_into_objective(data, "manifest config", strict=False)
    return _build(Config, data, "")
