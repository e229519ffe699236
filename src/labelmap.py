"""Label mappings between two datasets' classes, for external validation (`medq evaluate --run NAME --config
OTHER.yaml`): which external label(s) each class of the run's model stands for.

Direction: model class → external class(es). An external image is a positive of a model class when it carries any
of the external labels that class maps to (RSNA-trained ``Lung Opacity`` → NIH ``Pneumonia|Consolidation``), and a
negative otherwise, whatever else it carries. Model classes without a counterpart are not evaluated, external
classes without one contribute only negatives; both are listed in every result, never dropped silently.

Where a mapping comes from, first found: ``--map MODEL=EXT[|EXT...]`` (repeatable) or ``--map NAME`` (a built-in by
name, ``<model list>:<external list>`` such as ``kaggle:rsna``, or the external list's name alone), else ``external.label_map`` in the other config (a mapping, or a built-in's name), else the built-in for the
two datasets' class lists (:data:`BUILTIN`), else the classes both lists name identically. Every mapping is checked
against both class lists (an unknown class is a one-line ConfigError naming it and the two lists), and the known
semantic gaps between the datasets (:data:`LOSSY`) are stated with it.

The semantics (../shared/DATASETS.md): Kaggle ``NORMAL`` is a normal paediatric film and ``PNEUMONIA`` clinically
diagnosed (bacterial or viral) pneumonia; RSNA ``Lung Opacity`` is an opacity suggestive of pneumonia on an adult
film, ``Normal`` a normal film and ``No Lung Opacity / Not Normal`` an abnormal film without such an opacity (its
binary variant's ``No Lung Opacity`` joins the last two, so it is *not* "normal"); NIH's 14 findings are mined from
reports, ``No Finding`` being no label at all (not a class).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from medq import yamlio
from medq.errors import ConfigError

MAP_FILE_SUFFIXES = (".yaml", ".yml", ".json")  # `--map FILE` (one item without '='): a mapping file

KAGGLE = ("NORMAL", "PNEUMONIA")
KAGGLE_CAUSE = ("NORMAL", "BACTERIA", "VIRUS")
RSNA = ("Lung Opacity", "Normal", "No Lung Opacity / Not Normal")
RSNA_BINARY = ("No Lung Opacity", "Lung Opacity")
NIH = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
       "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
# medq's built-in class lists (the readers' classes, in their order), by the name a mapping uses for them
CLASS_LISTS = {"kaggle": KAGGLE, "kaggle-3class": KAGGLE_CAUSE, "rsna": RSNA, "rsna-binary": RSNA_BINARY, "nih": NIH}

_OPACITY_VS_PNEUMONIA = ("RSNA 'Lung Opacity' is a radiological opacity on adult films, Kaggle 'PNEUMONIA' a clinical "
                         "diagnosis on paediatric films: the same disease seen two ways, not the same label")
_NIH_REPORT_LABELS = "NIH labels are mined from reports (about 90% accurate by the dataset's own estimate)"
_PNEUMONIA_CAUSE = "Kaggle's BACTERIA and VIRUS together are its PNEUMONIA"

_NORMAL_VS_NO_OPACITY = ("NORMAL is not mapped: RSNA's 'No Lung Opacity' includes abnormal films ('Not Normal'), so "
                         "it is not Kaggle's NORMAL")
_NORMAL_VS_NIH = "NORMAL is not mapped: NIH has no normal class ('No Finding' is the absence of labels)"
_NIH_VS_KAGGLE = _OPACITY_VS_PNEUMONIA.replace("RSNA 'Lung Opacity' is a radiological opacity on adult films",
                                               "NIH 'Pneumonia' is a report finding on adult films")
_CAUSES = ("BACTERIA", "VIRUS")  # Kaggle 3-class: the cause of its PNEUMONIA, from the file names

# (model's class list, external class list) → (model class → external classes, notes)
BUILTIN: dict[tuple[str, str], tuple[dict[str, tuple[str, ...]], tuple[str, ...]]] = {
    ("kaggle", "kaggle-3class"): ({"NORMAL": ("NORMAL",), "PNEUMONIA": _CAUSES}, (_PNEUMONIA_CAUSE,)),
    ("kaggle", "rsna"): ({"NORMAL": ("Normal",), "PNEUMONIA": ("Lung Opacity",)}, (_OPACITY_VS_PNEUMONIA,)),
    ("kaggle", "rsna-binary"): ({"PNEUMONIA": ("Lung Opacity",)}, (_OPACITY_VS_PNEUMONIA, _NORMAL_VS_NO_OPACITY)),
    ("kaggle", "nih"): ({"PNEUMONIA": ("Pneumonia",)}, (_NIH_REPORT_LABELS, _NORMAL_VS_NIH)),
    ("kaggle-3class", "kaggle"): ({"BACTERIA": ("PNEUMONIA",), "VIRUS": ("PNEUMONIA",), "NORMAL": ("NORMAL",)},
                                  (_PNEUMONIA_CAUSE,)),
    ("kaggle-3class", "rsna"): ({"NORMAL": ("Normal",), "BACTERIA": ("Lung Opacity",), "VIRUS": ("Lung Opacity",)},
                                (_OPACITY_VS_PNEUMONIA,)),
    ("kaggle-3class", "rsna-binary"): ({"BACTERIA": ("Lung Opacity",), "VIRUS": ("Lung Opacity",)},
                                       (_OPACITY_VS_PNEUMONIA, _NORMAL_VS_NO_OPACITY)),
    ("kaggle-3class", "nih"): ({"BACTERIA": ("Pneumonia",), "VIRUS": ("Pneumonia",)},
                               (_NIH_REPORT_LABELS, _NORMAL_VS_NIH)),
    ("rsna", "kaggle"): ({"Lung Opacity": ("PNEUMONIA",), "Normal": ("NORMAL",)}, (_OPACITY_VS_PNEUMONIA,)),
    ("rsna", "kaggle-3class"): ({"Lung Opacity": _CAUSES, "Normal": ("NORMAL",)}, (_OPACITY_VS_PNEUMONIA,)),
    ("rsna", "rsna-binary"): ({"Lung Opacity": ("Lung Opacity",)}, ()),
    ("rsna", "nih"): ({"Lung Opacity": ("Pneumonia", "Consolidation")}, (_NIH_REPORT_LABELS,)),
    ("rsna-binary", "kaggle"): ({"Lung Opacity": ("PNEUMONIA",)}, (_OPACITY_VS_PNEUMONIA,)),
    ("rsna-binary", "kaggle-3class"): ({"Lung Opacity": _CAUSES}, (_OPACITY_VS_PNEUMONIA,)),
    ("rsna-binary", "rsna"): ({"Lung Opacity": ("Lung Opacity",), "No Lung Opacity": (RSNA[1], RSNA[2])}, ()),
    ("rsna-binary", "nih"): ({"Lung Opacity": ("Pneumonia", "Consolidation")}, (_NIH_REPORT_LABELS,)),
    ("nih", "kaggle"): ({"Pneumonia": ("PNEUMONIA",)}, (_NIH_VS_KAGGLE,)),
    ("nih", "kaggle-3class"): ({"Pneumonia": _CAUSES}, (_NIH_VS_KAGGLE,)),
    ("nih", "rsna"): ({"Pneumonia": ("Lung Opacity",)}, (_NIH_REPORT_LABELS,)),
    ("nih", "rsna-binary"): ({"Pneumonia": ("Lung Opacity",)}, (_NIH_REPORT_LABELS,)),
}

# (model class, external class) pairs whose meanings differ: said with any mapping that pairs them
LOSSY = {
    ("NORMAL", "No Lung Opacity"): "RSNA's 'No Lung Opacity' includes abnormal films ('Not Normal'): positives of "
                                   "NORMAL there include abnormal images",
    ("NORMAL", "No Lung Opacity / Not Normal"): "'No Lung Opacity / Not Normal' films are abnormal, not NORMAL",
    ("BACTERIA", "PNEUMONIA"): _PNEUMONIA_CAUSE + ": BACTERIA's positives there include viral pneumonia",
    ("VIRUS", "PNEUMONIA"): _PNEUMONIA_CAUSE + ": VIRUS's positives there include bacterial pneumonia",
    ("BACTERIA", "Lung Opacity"): "an opacity does not tell bacterial from viral pneumonia",
    ("VIRUS", "Lung Opacity"): "an opacity does not tell bacterial from viral pneumonia",
    ("BACTERIA", "Pneumonia"): "NIH's Pneumonia does not tell bacterial from viral pneumonia",
    ("VIRUS", "Pneumonia"): "NIH's Pneumonia does not tell bacterial from viral pneumonia",
}


@dataclass
class LabelMap:
    """Model class → the external classes it stands for, where the mapping came from, and what it leaves out."""

    pairs: dict[str, list[str]]
    source: str  # 'built-in kaggle:rsna' | '--map' | 'external.label_map in x.yaml' | 'identical class names'
    model_classes: list[str]
    external_classes: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def unmapped_model(self) -> list[str]:
        """Model classes without a counterpart: not evaluated."""
        return [c for c in self.model_classes if c not in self.pairs]

    @property
    def unmapped_external(self) -> list[str]:
        """External classes no model class maps to: their images count only as negatives."""
        used = {e for targets in self.pairs.values() for e in targets}
        return [c for c in self.external_classes if c not in used]

    def describe(self) -> list[str]:
        """The mapping in full, for the terminal and the report."""
        lines = [f"label mapping ({self.source}), model class → external class(es):"]
        lines += [f"  {c} → {' | '.join(targets)}" for c, targets in self.pairs.items()]
        lines += [f"  {c} → no counterpart: not evaluated" for c in self.unmapped_model]
        lines += [f"  external {c}: no counterpart: its images count as negatives only" for c in self.unmapped_external]
        lines += [f"  note: {n}" for n in self.notes]
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "pairs": self.pairs, "model_classes_without_counterpart": self.unmapped_model,
                "external_classes_without_counterpart": self.unmapped_external, "notes": self.notes}


def list_name(classes: Iterable[str]) -> str | None:
    """The built-in class list ``classes`` is (its name in :data:`CLASS_LISTS`), or None."""
    classes = tuple(classes)
    return next((name for name, known in CLASS_LISTS.items() if known == classes), None)


def builtin_names() -> list[str]:
    return [f"{a}:{b}" for a, b in BUILTIN]


def parse_map(items: Iterable[str], where: str = "--map") -> dict[str, list[str]] | str:
    """``['PNEUMONIA=Lung Opacity', 'NORMAL=Normal|No Lung Opacity / Not Normal']`` → {model class: [external]};
    a single item without '=' is a built-in mapping's name (returned as the string)."""
    items = [str(i) for i in items]
    if len(items) == 1 and "=" not in items[0]:
        if Path(items[0]).suffix.lower() in MAP_FILE_SUFFIXES or Path(items[0]).is_file():
            return read_map_file(Path(items[0]), where)
        return items[0].strip()
    pairs: dict[str, list[str]] = {}
    for item in items:
        model, sep, targets = item.partition("=")
        external = [t.strip() for t in targets.split("|") if t.strip()]
        if not sep or not model.strip() or not external:
            raise ConfigError(f"{where} {item!r}: write MODEL_CLASS=EXTERNAL_CLASS (several external classes joined "
                              f"by '|'), or one built-in mapping's name ({', '.join(builtin_names())})")
        if model.strip() in pairs:
            raise ConfigError(f"{where}: model class {model.strip()!r} is mapped twice; join its external classes "
                              "with '|' in one mapping")
        pairs[model.strip()] = external
    return pairs


class MapFile(dict):
    """The pairs of a ``--map FILE``: ``source`` names the file in every message about them."""

    source: str = "--map"


def read_map_file(path: Path, where: str = "--map") -> MapFile:
    """``--map mapping.yaml``: a YAML (or JSON) mapping {model class: external class, or a list of them}; a missing
    file, a repeated key, a list or a value that is no class name is a one-line ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"{where}: no such label map file {path}; give a YAML file of MODEL_CLASS: EXTERNAL_CLASS "
                          f"lines, MODEL=EXT pairs, or a built-in's name ({', '.join(builtin_names())})")
    data, repeated = yamlio.read_yaml(path)
    yamlio.refuse_repeated(path, repeated)
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(f"{path}: expected a mapping of MODEL_CLASS: EXTERNAL_CLASS (or a list of them) lines, "
                          f"e.g. 'PNEUMONIA: Lung Opacity'; got {type(data).__name__ if data else 'nothing'}")
    pairs = MapFile(from_config(data, str(path)))
    pairs.source = str(path)
    return pairs


def is_builtin_name(name: str) -> bool:
    """Whether ``name`` names a built-in mapping: ``model list:external list``, or an external list alone (the
    model's list is known only with the run)."""
    return name in builtin_names() or name in _externals()


def _externals() -> list[str]:
    return list(dict.fromkeys(external for _, external in BUILTIN))


def from_config(value: Any, where: str) -> dict[str, list[str]] | str | None:
    """``external.label_map`` of a config: {model class: external class or [classes]}, a built-in's name or a map
    file (as ``--map`` takes them). Checked when the config loads (medq.config), so a typo stops every command at
    once, not only the external evaluation that would use it: an unknown name is a one-line ConfigError listing the
    built-ins."""
    if value in (None, "", {}):
        return None
    if isinstance(value, str):
        given = parse_map([value.strip()], where)
        if isinstance(given, str) and not is_builtin_name(given):
            raise ConfigError(f"{where}: {given!r} is no built-in mapping (built-ins: {', '.join(builtin_names())}, "
                              f"or an external list's name alone: {', '.join(_externals())}) and no map file "
                              f"({'/'.join(MAP_FILE_SUFFIXES)}); or write MODEL_CLASS: EXTERNAL_CLASS lines")
        return given
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping MODEL_CLASS: EXTERNAL_CLASS (or a list of them), or a "
                          f"built-in mapping's name ({', '.join(builtin_names())}); got {value!r}")
    for model, targets in value.items():
        names = targets if isinstance(targets, list) else [targets]
        if not names or not all(isinstance(t, str) and t.strip() for t in names):
            raise ConfigError(f"{where}: {model!r}: {targets!r} is not an external class name (or a list of them); "
                              "write MODEL_CLASS: EXTERNAL_CLASS")
    return parse_map([f"{k}={'|'.join(v) if isinstance(v, list) else v}" for k, v in value.items()], where)


def resolve(model_classes: list[str], external_classes: list[str], given: dict[str, list[str]] | str | None = None,
            given_source: str = "--map") -> LabelMap:
    """The label mapping from the run's classes to the external dataset's (see the module for the order of
    sources); a ConfigError when none applies or one names a class the lists do not have."""
    model_classes, external_classes = [str(c) for c in model_classes], [str(c) for c in external_classes]
    given_source = getattr(given, "source", given_source)  # a --map file names itself
    model_list, external_list = list_name(model_classes), list_name(external_classes)
    notes: list[str] = []
    if isinstance(given, str):
        if ":" in given:
            pair = tuple(p.strip() for p in given.split(":", 1))
        else:
            pair = (model_list or "?", given)  # the external side named alone
        if pair not in BUILTIN:
            raise ConfigError(f"{given_source} {given!r}: no built-in mapping of that name; built-ins: "
                              f"{', '.join(builtin_names())}")
        pairs, builtin_notes = BUILTIN[pair]
        source, notes = f"built-in {pair[0]}:{pair[1]}", list(builtin_notes)
        pairs = {k: list(v) for k, v in pairs.items()}
    elif given:
        pairs, source = {k: list(v) for k, v in given.items()}, given_source
    elif (model_list, external_list) in BUILTIN:
        builtin, builtin_notes = BUILTIN[(model_list, external_list)]
        pairs, notes = {k: list(v) for k, v in builtin.items()}, list(builtin_notes)
        source = f"built-in {model_list}:{external_list}"
    else:
        pairs = {c: [c] for c in model_classes if c in external_classes}
        source = "identical class names"
        if not pairs:
            raise ConfigError(f"no label mapping between the run's classes {model_classes} and the external "
                              f"dataset's {external_classes}; give one with --map MODEL_CLASS=EXTERNAL_CLASS "
                              "(repeatable; '|' joins several external classes) or external.label_map in the config")
    for model, targets in pairs.items():
        if model not in model_classes:
            raise ConfigError(f"{source}: {model!r} is not a class of the run's model {model_classes} (external "
                              f"dataset: {external_classes}); the left side names the model's class")
        for target in targets:
            if target not in external_classes:
                raise ConfigError(f"{source}: {target!r} is not a class of the external dataset {external_classes} "
                                  f"(the run's model: {model_classes}); the right side names the external class")
    notes += [f"{model} → {target}: {LOSSY[(model, target)]}" for model, targets in pairs.items()
              for target in targets if (model, target) in LOSSY]
    shared = {t: [m for m, targets in pairs.items() if t in targets] for t in external_classes}
    notes += [f"{' and '.join(models)} map to {target} together: each is evaluated against every {target} "
              f"image, so a {target} image the model calls {models[1]} is a miss for {models[0]}"
              for target, models in shared.items() if len(models) > 1]
    return LabelMap(pairs, source, model_classes, external_classes, notes)
