"""The typed entries of a run's manifest: its top-level facts and one entry per stage.

Each entry is a dataclass over one JSON object. Keys this medq does not know (a field added by a newer medq, or by a
stage added since) are kept in ``extra`` and the keys' order in ``order``, so reading an entry and writing it back
gives the same JSON, byte for byte. Fields the stage did not record are ``None``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

_BOOKKEEPING = ("extra", "order")


@dataclass
class Entry:
    """A JSON object with typed fields; unknown keys and the key order survive a round trip."""

    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this medq does not know, as they were
    order: tuple[str, ...] = field(default=(), repr=False, compare=False)  # the keys in the order they were read

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _BOOKKEEPING)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Entry":
        known = set(cls.names())
        return cls(**{k: v for k, v in raw.items() if k in known},
                   extra={k: v for k, v in raw.items() if k not in known}, order=tuple(raw))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: keys read keep their place, fields set since follow, then unknown keys added since."""
        values = {name: getattr(self, name) for name in self.names()}
        out: dict[str, Any] = {}
        for key in self.order:
            if key in values:
                out[key] = values.pop(key)
            elif key in self.extra:
                out[key] = self.extra[key]
        out.update({k: v for k, v in values.items() if v is not None})
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    def update(self, items: Mapping[str, Any]) -> None:
        """``dict.update``: known keys set their field, others go to ``extra``; new keys go last."""
        known = set(self.names())
        for key, value in items.items():
            if key in known:
                setattr(self, key, value)
            else:
                self.extra[key] = value
            if key not in self.order:
                self.order += (key,)


@dataclass
class Facts(Entry):
    """The manifest's top level: what every later stage needs to know about the run's model."""

    classes: list[str] | None = None
    task: str | None = None  # binary | multiclass | multilabel
    preprocess: dict[str, Any] | None = None  # medq.preprocess.PreprocessSpec.to_dict()
    dataset_format: str | None = None
    data_source: str | None = None  # 'synthetic phantoms (...)' or the real layout (medq.data.common.data_source)
    input_name: str | None = None  # the frozen graph's tensors (freeze, convert)
    output_name: str | None = None
    input_shape: list[int] | None = None
    model_source: str | None = None  # train | tune | convert: who made the run's model
    objective: str | None = None  # the metric the model was selected by (medq.selection)
    selected_val_metrics: dict[str, Any] | None = None
    selected_hyperparameters: dict[str, Any] | None = None
    tuned_hyperparameters: dict[str, Any] | None = None
    source_model: dict[str, Any] | None = None  # convert: the file converted and what loading it found
    # the operating thresholds chosen on validation for the run's Keras model (medq.thresholds.choose's record)
    thresholds: dict[str, Any] | None = None
    # `medq evaluate --run NAME --config OTHER.yaml`: one ExternalEvaluation's JSON per dataset and split
    external_evaluations: list[dict[str, Any]] | None = None

    def externals(self) -> list["ExternalEvaluation"]:
        """The run's external evaluations, typed, in the order they were first made."""
        return [ExternalEvaluation.from_dict(e) for e in self.external_evaluations or [] if isinstance(e, dict)]

    def with_external(self, entry: "ExternalEvaluation") -> list[dict[str, Any]]:
        """The ``external_evaluations`` list with ``entry`` added, replacing the one of the same dataset and split."""
        kept = [e.to_dict() for e in self.externals() if e.key != entry.key]
        return kept + [entry.to_dict()]

    def missing(self, *names: str) -> list[str]:
        """Which of ``names`` the run has not recorded (absent, null or empty)."""
        return [n for n in names if getattr(self, n) in (None, "", [], {})]

    def tensor_names(self) -> tuple[str, str]:
        """The frozen graph's input and output tensor names; medq's own names when none were recorded."""
        return self.input_name or "input", self.output_name or "output"


@dataclass
class ExternalEvaluation(Entry):
    """One external evaluation of the run's model (medq.external): another dataset's split through a label mapping."""

    key: str | None = None  # format, root, variant and split: re-evaluating the same one replaces this entry
    dataset_format: str | None = None
    root: str | None = None
    variant: str | None = None
    data_source: str | None = None  # 'synthetic phantoms (... layout)' or the real layout
    split: str | None = None  # test | val | train | all
    counts: dict[str, Any] | None = None  # images, skipped, per external class
    mapping: dict[str, Any] | None = None  # medq.labelmap.LabelMap.to_dict()
    metrics: dict[str, Any] | None = None  # per mapped model class: AUC [CI], prevalence, operating point
    thresholds: dict[str, Any] | None = None  # the run's thresholds used, and where they came from
    model: str | None = None  # the artifact evaluated: keras_model | fp32_pb
    model_sha256: str | None = None  # its sha256 prefix
    artifact: str | None = None  # external_evaluation_<slug>.json, the full result
    evaluated_at: str | None = None


@dataclass
class StageEntry(Entry):
    """``stages[<stage>]``: what the stage's last run recorded (a stage without a class of its own gets this)."""

    STAGE: ClassVar[str] = ""
    finished_at: str | None = None


class _SplitSizes:
    split_sizes: dict[str, int] | None

    def split_size(self, split: str) -> int | None:
        """How many images ``split`` had when the stage ran (None: not recorded)."""
        return (self.split_sizes or {}).get(split)


@dataclass
class DataEntry(StageEntry, _SplitSizes):
    STAGE: ClassVar[str] = "data"
    format: str | None = None
    task: str | None = None
    classes: list[str] | None = None
    split_sizes: dict[str, int] | None = None
    class_counts: dict[str, Any] | None = None
    patient_overlap: Any = None
    skipped: list[dict[str, str]] | None = None
    notes: list[str] | None = None
    warnings: list[str] | None = None  # classes missing from a split, too few images (medq.data.common)


@dataclass
class SplitEntry(StageEntry, _SplitSizes):
    STAGE: ClassVar[str] = "split"
    pinned_by: str | None = None
    resplit: bool | None = None
    split_sizes: dict[str, int] | None = None
    settings: dict[str, Any] | None = None
    warnings: list[str] | None = None


@dataclass
class TrainEntry(StageEntry, _SplitSizes):
    STAGE: ClassVar[str] = "train"
    model: str | None = None
    parameters: int | None = None
    flops: Any = None
    best_epoch: int | None = None
    val_metrics: dict[str, Any] | None = None
    seconds: float | None = None
    epochs_run: int | None = None
    resumed: bool | None = None
    low_res: Any = None  # False, or {image_size, epochs, best_epoch}
    split_sizes: dict[str, int] | None = None
    skipped: int | None = None
    notes: list[str] | None = None
    dropped_while_loading: list[dict[str, str]] | None = None


@dataclass
class EvaluateEntry(StageEntry):
    STAGE: ClassVar[str] = "evaluate"
    split: str | None = None
    ten_crop: bool | None = None
    threshold: float | dict[str, float] | None = None  # per thresholded class (a number: one for all, older runs)
    threshold_source: str | None = None  # validation | fallback | override (medq.thresholds.Thresholds.source)
    objective: str | None = None
    single_crop: dict[str, Any] | None = None
    ten_crop_metrics: dict[str, Any] | None = None
    subgroups: dict[str, Any] | None = None  # medq.subgroups' table on the single-crop view


@dataclass
class TuneEntry(StageEntry):
    STAGE: ClassVar[str] = "tune"
    tuner: str | None = None
    objective: str | None = None
    trials: list[dict[str, Any]] | None = None
    best_trial: str | None = None
    tradeoff_trial: str | None = None
    replaced: bool | None = None
    decision: str | None = None
    best_values: dict[str, Any] | None = None
    seconds: float | None = None
    dropped_workers: Any = None


@dataclass
class FreezeEntry(StageEntry):
    STAGE: ClassVar[str] = "freeze"
    parity_max_abs_diff: float | None = None
    parity_images: int | None = None


@dataclass
class QuantizeEntry(StageEntry):
    STAGE: ClassVar[str] = "quantize"
    status: str | None = None  # ok | failed
    error: str | None = None
    metric: str | None = None
    fp32_val: dict[str, Any] | None = None
    int8_val: dict[str, Any] | None = None
    best_int8_val: float | None = None
    precision_val: dict[str, Any] | None = None
    criterion: dict[str, Any] | None = None
    deploy: dict[str, Any] | None = None  # the deploy.yaml INC ran with (medq.inc.deploy), and its path
    calibration: dict[str, Any] | None = None
    precision_paths: dict[str, Any] | None = None
    trials: list[dict[str, Any]] | None = None
    op_table: dict[str, Any] | None = None
    int8_concat: dict[str, Any] | None = None
    fallback_ops: Any = None
    quantized_kernels: int | None = None
    seconds: float | None = None

    def path_val(self, path: str) -> dict[str, Any] | None:
        """The validation metrics recorded as ``<path>_val`` for precision path ``path`` (fp32, int8, ...)."""
        return self.to_dict().get(f"{path}_val")


@dataclass
class BenchmarkEntry(StageEntry):
    STAGE: ClassVar[str] = "benchmark"
    rows: list[str] | None = None
    skipped: Any = None
    seconds: float | None = None
    inputs_sha256: str | None = None


@dataclass
class ConvertEntry(StageEntry):
    STAGE: ClassVar[str] = "convert"
    saved_model: str | None = None
    saved_model_outputs: str | None = None
    onnx_input_layout: str | None = None
    parity: dict[str, Any] | None = None


@dataclass
class ExportOnnxEntry(StageEntry):
    STAGE: ClassVar[str] = "export-onnx"
    source: str | None = None
    opset: int | None = None
    onnx_input_layout: str | None = None
    parity: dict[str, Any] | None = None


@dataclass
class RunEntry(StageEntry):
    """``medq run``: the seconds each stage took."""
    STAGE: ClassVar[str] = "run"
    stage_seconds: dict[str, float] | None = None
    total_seconds: float | None = None


@dataclass
class PresetEntry(StageEntry):
    STAGE: ClassVar[str] = "preset"
    name: str | None = None
    config_file: str | None = None
    overrides: list[str] | None = None
    command: str | None = None
    stage_seconds: dict[str, float] | None = None
    total_seconds: float | None = None


STAGE_ENTRIES: dict[str, type[StageEntry]] = {
    cls.STAGE: cls for cls in (DataEntry, SplitEntry, TrainEntry, EvaluateEntry, TuneEntry, FreezeEntry,
                               QuantizeEntry, BenchmarkEntry, ConvertEntry, ExportOnnxEntry, RunEntry, PresetEntry)}


def stage_entry(stage: str, raw: Mapping[str, Any]) -> StageEntry:
    """``raw`` as the typed entry of ``stage`` (a :class:`StageEntry` for a stage without its own class)."""
    return STAGE_ENTRIES.get(stage, StageEntry).from_dict(raw)
