"""deploy.yaml: Intel Neural Compressor 2.x's yaml schema, read strictly, as the one source of INC's settings.

The reference kit parsed its deploy.yaml and then never passed it to INC. Here every value INC uses comes from this
file or from INC 2.6's own default, and :attr:`DeployConfig.defaults` lists the defaults so the stage can print them.

Reading rules:

- The file is read by :mod:`medq.yamlio` (``yaml.safe_load``'s loader plus a record of repeated keys, ``null``
  pinned to ``None`` whatever INC's import did to the global ``SafeLoader``). ``yaml.safe_load`` and INC silently keep
  the last of a repeated key; here that still happens, but with a warning naming the key, its lines and the winner.
  Unlike the run config (where a repeated key is an error), deploy.yaml is also read by INC itself, which keeps the
  last value, and the reference kit's own file repeats ``evaluation:``: refusing it would reject the file users
  bring from the kit, while the warning says exactly which block is in force.
- The keys and values are INC 2.6's (``neural_compressor/conf/config.py``, ``schema``). A key INC does not know is an
  error naming the file, the dotted key and the keys allowed there. A key INC knows but medq's post-training run
  cannot honour (pruning, QAT, a dataloader section — medq builds the data itself) is accepted only when empty, and
  otherwise an error saying why; it is never silently dropped.
- ``medq.inc.ptq.check_with_inc`` additionally runs INC's own schema over the file in the quantize stage.

Nothing here imports ``neural_compressor``: the benchmark stage reads the ``evaluation.performance`` section too.
"""
from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from medq.errors import ConfigError
from medq.yamlio import RepeatedKey, read_yaml

# INC 2.6 defaults (conf/config.py ``schema``); tests/test_quantize.py checks them against the installed INC.
INC_VERSION_DEFAULT = 2.0
RECIPE_DEFAULTS = {
    "scale_propagation_max_pooling": True, "scale_propagation_concat": True,
    "first_conv_or_matmul_quantization": True, "last_conv_or_matmul_quantization": True,
    "pre_post_process_quantization": True, "fast_bias_correction": False, "weight_correction": False,
}
# INC 2.x strategies medq can run offline on a TensorFlow graph (sigopt needs a network service, hawq_v2 is
# PyTorch-only, tpe needs hyperopt, auto_mixed_precision is not quantization). 'auto' is chosen by quant_level.
STRATEGIES = ("basic", "bayesian", "conservative", "exhaustive", "mse", "mse_v2", "random")
OBJECTIVES = ("performance", "accuracy", "footprint", "modelsize")
KMP_AFFINITY_DEFAULT = "granularity=fine,verbose,compact,1,0"


class DeployError(ConfigError):
    """deploy.yaml is missing, is not YAML, or breaks INC's schema."""


# --- reading: medq.yamlio records repeated keys; here they are warnings ---------------------------------------

def read_deploy_yaml(path: Path) -> tuple[dict[str, Any], list[RepeatedKey]]:
    """The winning document (last value of a repeated key, as ``yaml.safe_load``) and the repeated keys."""
    if not path.is_file():
        raise DeployError(f"{path}: deploy file not found; pass an INC deploy.yaml with --deploy or set "
                          "quantize.deploy (configs/deploy.yaml is the default)")
    data, repeated = read_yaml(path, DeployError)
    if not isinstance(data, dict):
        raise DeployError(f"{path}: expected INC's deploy.yaml mapping (model:, quantization:, tuning:, ...), "
                          f"got {type(data).__name__}; see configs/deploy.yaml")
    return data, repeated


# --- the schema ---------------------------------------------------------------------------------------------------

_MISSING = object()


class _Bad(Exception):
    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


@dataclass(frozen=True)
class Key:
    """One key of the schema: a leaf ``check``, a section of ``children``, or a free-form mapping of ``each``."""

    check: Callable[[Any], Any] | None = None
    children: dict[str, "Key"] | None = None
    each: dict[str, "Key"] | None = None
    default: Any = _MISSING
    required: bool = False
    unused: str | None = None  # INC knows it, medq does not use it: allowed only empty (or at INC's default)


def _integer(minimum: int | None = None, example: str = "10") -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"expected a whole number, got {value!r}", f"write e.g. {example}")
        if minimum is not None and value < minimum:
            raise _Bad(f"must be at least {minimum}, got {value}", f"write e.g. {example}")
        return value

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {value!r}", "write true or false")
    return value


def _choice(*options: Any, why: str = "") -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not any(value == o and type(value) is type(o) for o in options):
            raise _Bad(f"{value!r} is not allowed{why}", "use one of " + ", ".join(repr(o) for o in options))
        return value

    return check


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"expected a non-empty text, got {value!r}", "write a name, e.g. refkit_cnn")
    return value


def _mapping(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Bad(f"expected a mapping, got {value!r}", "write e.g. metric: {topk: 1}")
    return value


def _version(value: Any) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise _Bad(f"expected a version number, got {value!r}", "write version: 2.0") from None


def _tensor_names(value: Any) -> list[str]:
    """INC's input_to_list: 'a,b' or 'a b' or a list."""
    if isinstance(value, str):
        return [s.strip() for s in (value.split(",") if "," in value else value.split()) if s.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise _Bad(f"expected a tensor name or a list of them, got {value!r}", "write e.g. inputs: input (or [])")


def _sampling_sizes(value: Any) -> list[int]:
    """INC accepts 100, '100, 200' or [100, 200]: one calibration size per tuning option."""
    items = value.replace(",", " ").split() if isinstance(value, str) else value if isinstance(value, list) else [value]
    sizes = []
    for item in items:
        if isinstance(item, str) and item.strip().isdigit():
            item = int(item)
        if isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise _Bad(f"expected a positive number of calibration images (or a list of them), got {value!r}",
                       "write e.g. sampling_size: 100")
        sizes.append(item)
    if not sizes:
        raise _Bad("is empty", "write e.g. sampling_size: 100")
    return sizes


def _tolerance(kind: str) -> Callable[[Any], float]:
    """INC's percent_to_float: a float or 'N%'; INC's relative also refuses a bare whole number."""
    def check(value: Any) -> float:
        if isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?%\s*", value):
            number = float(value.strip().rstrip("%")) / 100
        elif isinstance(value, float) or (kind == "absolute" and type(value) is int):
            number = float(value)
        else:
            extra = " and a whole number needs a decimal point, e.g. 0.0" if kind == "relative" else ""
            raise _Bad(f"expected a tolerated loss as a number or a percentage, got {value!r}",
                       f"write e.g. {kind}: 0.01 or {kind}: 1% (YAML reads 1e-2 as text{extra})")
        if number < 0:
            raise _Bad(f"must not be negative, got {value!r}", f"write the loss you accept, e.g. {kind}: 0.01")
        if kind == "relative" and number >= 1:
            raise _Bad(f"must be a fraction below 1 of the FP32 metric, got {value!r}", "write e.g. relative: 0.01")
        return number

    return check


def _option_list(allowed: tuple[str, ...], text_ok: bool, what: str) -> Callable[[Any], list[str]]:
    def check(value: Any) -> list[str]:
        if isinstance(value, str) and text_ok:
            value = [s.strip() for s in (value.split(",") if "," in value else value.split())]
        if not isinstance(value, list):
            raise _Bad(f"expected a list, got {value!r}", f"write e.g. [{allowed[0]}]")
        wrong = [v for v in value if v not in allowed]
        if wrong:
            raise _Bad(f"{wrong[0]!r} is not a {what} INC's TensorFlow adaptor supports",
                       "use " + ", ".join(allowed))
        return value

    return check


def _op_settings(text_ok: bool) -> dict[str, Key]:
    """INC's per-op constraints (model_wise takes text or lists; optype_wise/op_wise lists only, as in INC)."""
    pytorch_only = "a PyTorch-only setting of INC; TensorFlow quantization ignores it"

    def side(algorithms: tuple[str, ...]) -> Key:
        return Key(children={
            "granularity": Key(_option_list(("per_channel", "per_tensor"), text_ok, "granularity")),
            "scheme": Key(_option_list(("sym", "asym"), text_ok, "scheme")),
            "dtype": Key(_option_list(("int8", "uint8", "fp32", "bf16"), text_ok, "dtype")),
            "algorithm": Key(_option_list(algorithms, text_ok, "calibration algorithm")),
            "bit": Key(unused=pytorch_only),
            "compute_dtype": Key(unused=pytorch_only),
        })

    return {"weight": side(("minmax",)), "activation": side(("minmax", "kl"))}


_BF16_NOTE = "medq's BF16 paths use oneDNN's auto-mixed-precision rewrite (quantize.precisions)"
_LOADER_NOTE = "medq builds INC's dataloaders from the dataset (calibration: training split; tuning: validation split)"
_PERF_CONFIGS = {
    "cores_per_instance": Key(_integer(1, "2"), default=None),
    "num_of_instance": Key(_integer(1, "1"), default=1),
    "inter_num_of_threads": Key(_integer(1, "1"), default=None),
    "intra_num_of_threads": Key(_integer(1, "2"), default=None),
    "kmp_blocktime": Key(_integer(0, "1"), default=None),
    "kmp_affinity": Key(_text, default=KMP_AFFINITY_DEFAULT),
}

SCHEMA: dict[str, Key] = {
    "version": Key(_version, default=INC_VERSION_DEFAULT),
    "model": Key(required=True, children={
        "name": Key(_text, required=True),
        "framework": Key(_choice("tensorflow", why=": medq quantizes frozen TensorFlow graphs"), required=True),
        "inputs": Key(_tensor_names, default=[]),
        "outputs": Key(_tensor_names, default=[]),
    }),
    "device": Key(_choice("cpu", why=": medq quantizes for Intel CPUs"), default="cpu"),
    "quantization": Key(children={
        "approach": Key(_choice("post_training_static_quant",
                                why=": TensorFlow graphs take post-training static quantization here"),
                        default="post_training_static_quant"),
        "calibration": Key(children={
            "sampling_size": Key(_sampling_sizes, default=[100]),
            "dataloader": Key(unused=_LOADER_NOTE),
        }),
        "recipes": Key(children={name: Key(_boolean, default=value) for name, value in RECIPE_DEFAULTS.items()}),
        "model_wise": Key(children=_op_settings(text_ok=True)),
        "optype_wise": Key(each=_op_settings(text_ok=False)),
        "op_wise": Key(each=_op_settings(text_ok=False)),
        "quant_level": Key(_choice("auto", 0, 1), default="auto"),
        "advance": Key(unused="bias correction is not available for TensorFlow post-training quantization"),
        "train": Key(unused="it configures quantization-aware training; medq runs post-training quantization"),
    }),
    "use_bf16": Key(_boolean, default=True),
    "graph_optimization": Key(unused=_BF16_NOTE),
    "mixed_precision": Key(unused=_BF16_NOTE),
    "model_conversion": Key(unused="it converts quantization-aware-trained models"),
    "tuning": Key(children={
        "strategy": Key(children={
            "name": Key(_choice(*STRATEGIES, why=" for medq (offline, TensorFlow)"), default="basic", required=True),
            **{name: Key(unused="a setting of the sigopt/hawq_v2 strategies, which medq does not run")
               for name in ("sigopt_api_token", "sigopt_project_id", "sigopt_experiment_name", "accuracy_weight",
                            "latency_weight", "confidence_batches", "hawq_v2_loss")},
        }),
        "accuracy_criterion": Key(children={
            "relative": Key(_tolerance("relative")),
            "absolute": Key(_tolerance("absolute")),
            "higher_is_better": Key(_boolean, default=True),
        }),
        "objective": Key(_choice(*OBJECTIVES), default="performance"),
        "multi_objectives": Key(unused="medq tunes on one task metric"),
        "exit_policy": Key(children={
            "timeout": Key(_integer(0, "600 (seconds; 0: stop at the first model that meets the criterion)"),
                           default=0),
            "max_trials": Key(_integer(1, "50"), default=100),
            "performance_only": Key(unused="it skips the accuracy-aware tuning that medq exists to do", default=False),
        }),
        "random_seed": Key(_integer(None, "1978"), default=1978),
        "tensorboard": Key(_boolean, default=False),
        "workspace": Key(children={
            "path": Key(_text, default=None),
            "resume": Key(unused="resuming loads a pickled tuning history; medq does not load pickles"),
        }),
        "diagnosis": Key(unused="Neural Insights diagnosis is not wired into medq", default=False),
    }),
    "evaluation": Key(children={
        "accuracy": Key(children={
            "metric": Key(_mapping),
            "multi_metrics": Key(unused="medq tunes on one task metric"),
            "configs": Key(unused="INC's accuracy benchmark is not used; medq evaluates on the validation split"),
            "iteration": Key(unused="medq evaluates the whole validation split", default=-1),
            "dataloader": Key(unused=_LOADER_NOTE),
            "postprocess": Key(unused="the frozen graph already ends in probabilities"),
        }),
        "performance": Key(children={
            "warmup": Key(_integer(0, "5"), default=5),
            "iteration": Key(_integer(-1, "100 (or -1: the whole dataloader)"), default=-1),
            "configs": Key(children=_PERF_CONFIGS),
            "dataloader": Key(unused=_LOADER_NOTE),
            "postprocess": Key(unused="the frozen graph already ends in probabilities"),
        }),
        "diagnosis": Key(unused="Neural Insights diagnosis is not wired into medq", default=False),
    }),
    **{name: Key(unused="not part of post-training quantization")
       for name in ("pruning", "distillation", "auto_distillation", "nas", "train")},
}


class _Walk:
    def __init__(self, path: Path):
        self.path = path
        self.defaults: dict[str, Any] = {}
        self.notes: list[str] = []

    def error(self, where: str, problem: str, fix: str) -> DeployError:
        return DeployError(f"{self.path}: {where}: {problem}; {fix}")

    def section(self, spec: dict[str, Key], data: Any, where: str, present: bool) -> dict[str, Any]:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self.error(where, f"expected a section of keys, got {data!r}",
                             "indent the keys below it (see configs/deploy.yaml)")
        for key in data:
            if key not in spec:
                close = difflib.get_close_matches(str(key), list(spec), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise self.error(_join(where, key), "unknown key: INC 2.6's deploy.yaml schema has no such key here",
                                 f"{hint}allowed here: {', '.join(spec)}")
        out: dict[str, Any] = {}
        for name, key in spec.items():
            here = _join(where, name)
            if name in data:
                self.value(key, data[name], here, out, name)
            elif key.required and present:
                raise self.error(here, "is missing", "INC's schema requires it (see configs/deploy.yaml)")
            elif key.unused is not None:
                continue
            elif key.children is not None:
                out[name] = self.section(key.children, {}, here, present=False)
            elif key.default is not _MISSING:
                out[name] = key.default
                self.defaults[here] = key.default
        return out

    def value(self, key: Key, value: Any, here: str, out: dict[str, Any], name: str) -> None:
        if key.unused is not None:
            if value in (None, {}, [], "") or (key.default is not _MISSING and value == key.default):
                self.notes.append(f"{here} ({value!r}) is not used: {key.unused}")
                return
            raise self.error(here, f"INC knows this key but medq does not use it: {key.unused}", "remove it")
        if key.children is not None:
            out[name] = self.section(key.children, value, here, present=True)
        elif key.each is not None:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise self.error(here, f"expected a mapping of names to settings, got {value!r}",
                                 "write e.g. Conv2D: {activation: {dtype: [fp32]}}")
            out[name] = {str(k): self.section(key.each, v, _join(here, str(k)), present=True)
                         for k, v in value.items()}
        else:
            try:
                out[name] = key.check(value)
            except _Bad as bad:
                raise self.error(here, bad.problem, bad.fix) from None


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


# --- the typed result ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Criterion:
    """INC's accuracy criterion: INT8 must reach baseline·(1 − tolerance) (relative) or baseline − tolerance."""

    kind: str  # 'relative' | 'absolute'
    tolerance: float
    higher_is_better: bool = True

    def threshold(self, baseline: float) -> float:
        return baseline * (1.0 - self.tolerance) if self.kind == "relative" else baseline - self.tolerance

    def met(self, baseline: float, value: float) -> bool:
        return bool(value >= self.threshold(baseline) - 1e-9)

    def describe(self) -> str:
        if self.kind == "relative":
            return f"relative {self.tolerance:g} (INT8 ≥ FP32 × {1 - self.tolerance:g})"
        return f"absolute {self.tolerance:g} (INT8 ≥ FP32 − {self.tolerance:g})"


@dataclass(frozen=True)
class PerformanceSettings:
    """``evaluation.performance``: read by the benchmark stage (INC's own benchmark is not used)."""

    warmup: int = 5
    iteration: int = -1
    cores_per_instance: int | None = None
    num_of_instance: int = 1
    inter_num_of_threads: int | None = None
    intra_num_of_threads: int | None = None
    kmp_blocktime: int | None = None
    kmp_affinity: str = KMP_AFFINITY_DEFAULT


@dataclass
class DeployConfig:
    path: str
    sha256: str
    version: float
    model_name: str
    framework: str
    inputs: list[str]
    outputs: list[str]
    device: str
    approach: str
    sampling_sizes: list[int]
    recipes: dict[str, bool]
    model_wise: dict[str, Any] | None
    optype_wise: dict[str, Any] | None
    op_wise: dict[str, Any] | None
    quant_level: str | int
    use_bf16: bool
    strategy: str
    criterion: Criterion
    objective: str
    timeout: int
    max_trials: int
    random_seed: int
    tensorboard: bool
    workspace: str | None  # None: <run folder>/nc_workspace
    accuracy_metric: dict[str, Any] | None  # evaluation.accuracy.metric as written; the task metric replaces it
    performance: PerformanceSettings
    defaults: dict[str, Any] = field(default_factory=dict)  # dotted key -> INC's default, for keys absent here
    warnings: list[str] = field(default_factory=list)  # repeated keys
    notes: list[str] = field(default_factory=list)  # accepted keys medq does not use, derived settings
    document: dict[str, Any] = field(default_factory=dict)  # the file as read (last value of a repeated key)

    def inc_defaults(self) -> dict[str, Any]:
        """The defaults that reach INC (the performance section is the benchmark's)."""
        return {k: v for k, v in self.defaults.items() if not k.startswith("evaluation.")}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("document")
        return out


def load_deploy(path: str | Path) -> DeployConfig:
    """Read, validate and type an INC 2.x deploy.yaml; raises :class:`DeployError` with one line per problem."""
    path = Path(path)
    document, repeated = read_deploy_yaml(path)
    walk = _Walk(path)
    tree = walk.section(SCHEMA, document, "", present=True)
    warnings = [_repeated_warning(path, r) for r in repeated]

    tuning = tree["tuning"]
    raw_criterion = (document.get("tuning") or {}).get("accuracy_criterion")
    given = [k for k in ("relative", "absolute") if k in tuning["accuracy_criterion"]]
    if len(given) == 2:
        raise walk.error("tuning.accuracy_criterion", "has both relative and absolute",
                         "keep one of them (INC accepts exactly one)")
    if not given:
        if raw_criterion is not None:
            raise walk.error("tuning.accuracy_criterion", "has neither relative nor absolute",
                             "write e.g. relative: 0.01")
        tuning["accuracy_criterion"]["relative"] = 0.01
        walk.defaults["tuning.accuracy_criterion.relative"] = 0.01
        given = ["relative"]
    if not tuning["accuracy_criterion"]["higher_is_better"]:
        raise walk.error("tuning.accuracy_criterion.higher_is_better", "false, but medq tunes on accuracy or AUC, "
                         "where higher is better", "remove it or write true")
    criterion = Criterion(given[0], tuning["accuracy_criterion"][given[0]], True)

    quantization = tree["quantization"]
    strategy_given = "name" in ((document.get("tuning") or {}).get("strategy") or {})
    level_given = "quant_level" in (document.get("quantization") or {})
    if strategy_given and not level_given:
        # INC's quant_level 'auto' (its default) runs INC's own 'auto' strategy and ignores the name.
        quantization["quant_level"] = 1
        walk.defaults.pop("quantization.quant_level", None)
        walk.notes.append(f"quantization.quant_level set to 1 so that tuning.strategy.name "
                          f"({tuning['strategy']['name']!r}) is used (INC's default 'auto' would ignore it)")
    elif not strategy_given and quantization["quant_level"] != 1:
        walk.defaults.pop("tuning.strategy.name", None)  # INC's 'auto' / 'conservative' strategy ignores it
    elif strategy_given and quantization["quant_level"] != 1:
        raise walk.error("quantization.quant_level", f"{quantization['quant_level']!r} makes INC ignore "
                         f"tuning.strategy.name ({tuning['strategy']['name']!r})",
                         "write quant_level: 1 to use that strategy, or remove the strategy name")
    if "metric" in ((document.get("evaluation") or {}).get("accuracy") or {}):
        walk.notes.append(f"evaluation.accuracy.metric {tree['evaluation']['accuracy']['metric']!r} is replaced by "
                          "the task metric on the validation split (medq gives INC an evaluation function)")

    perf = tree["evaluation"]["performance"]
    return DeployConfig(
        path=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest(), version=tree["version"],
        model_name=tree["model"]["name"], framework=tree["model"]["framework"], inputs=tree["model"]["inputs"],
        outputs=tree["model"]["outputs"], device=tree["device"], approach=quantization["approach"],
        sampling_sizes=quantization["calibration"]["sampling_size"], recipes=quantization["recipes"],
        model_wise=quantization.get("model_wise") if "model_wise" in (document.get("quantization") or {}) else None,
        optype_wise=quantization.get("optype_wise"), op_wise=quantization.get("op_wise"),
        quant_level=quantization["quant_level"], use_bf16=tree["use_bf16"], strategy=tuning["strategy"]["name"],
        criterion=criterion, objective=tuning["objective"], timeout=tuning["exit_policy"]["timeout"],
        max_trials=tuning["exit_policy"]["max_trials"], random_seed=tuning["random_seed"],
        tensorboard=tuning["tensorboard"], workspace=tuning["workspace"]["path"],
        accuracy_metric=tree["evaluation"]["accuracy"].get("metric"),
        performance=PerformanceSettings(warmup=perf["warmup"], iteration=perf["iteration"], **perf["configs"]),
        defaults=walk.defaults, warnings=warnings, notes=walk.notes, document=document,
    )


def _repeated_warning(path: Path, repeated: RepeatedKey) -> str:
    where = "top-level key" if repeated.top_level else "key"
    lines = ", ".join(str(n) for n in repeated.lines)
    return (f"{path}: {where} {repeated.key!r} appears {len(repeated.lines)} times (lines {lines}); the last one "
            f"(line {repeated.lines[-1]}) wins and the others are ignored, as yaml.safe_load and INC read it")
