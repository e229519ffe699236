"""PyTorch side of the converter: the architecture registry, checkpoint reading, strict loading, ONNX export.

The converter's only module that imports torch, and only inside functions: torch and torchvision are the optional
``convert`` extra (``pip install -r env/requirements-convert.txt``).

Checkpoints are read with ``torch.load(..., weights_only=True)``: tensors and plain containers only, no code. They
load strictly: every tensor of the architecture must be matched by name and shape, or the conversion stops with the
names that are missing or left over (``strict=False`` would "work" and silently keep random weights).
TorchScript files are programs, not weights: ``torch.jit.load`` runs code stored in the file, so they are loaded only
with ``trust_torchscript=True``.
"""
from __future__ import annotations

import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from medq.errors import first_line
from medq.errors import MedqError

INSTALL_HINT = "pip install -r env/requirements-convert.txt"
# torchvision renamed DenseNet's layers (norm.1 → norm1, ...); checkpoints from before (CheXNet) carry the old names.
_LEGACY_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                              r"([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
# Containers people wrap a state_dict in: {'state_dict': ..., 'epoch': ..., 'optimizer': ...} and friends.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")
SHOWN = 4  # names shown in an error message


class CheckpointError(MedqError):
    """A checkpoint file is unreadable or does not fit the named architecture."""


def require_torch(where: str | Path):
    try:
        import torch
        import torchvision  # noqa: F401  (the registry's builders need it)
    except ImportError:
        raise MedqError(f"{where}: reading PyTorch files needs torch and torchvision, which are not installed; "
                        f"{INSTALL_HINT} (ONNX files convert without them)") from None
    return torch


def _tv():
    import torchvision

    return torchvision.models


def _chexnet(num_classes: int):
    """arnoweng's CheXNet: torchvision densenet121 whose classifier is Linear(1024, N) followed by Sigmoid."""
    import torch.nn as nn

    model = _tv().densenet121(weights=None)
    model.classifier = nn.Sequential(nn.Linear(model.classifier.in_features, num_classes), nn.Sigmoid())
    return model


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[[int], Any]  # num_classes → torch.nn.Module with random weights (never downloads)
    first_conv: str  # state_dict key of the first convolution's weight: in_channels, and the anchor for prefixes
    classifier: str  # state_dict key of the last linear layer's weight: number of outputs
    legacy_densenet: bool = False
    training_only: tuple[str, ...] = ()  # key prefixes of layers unused at inference (GoogLeNet's aux classifiers)
    normalization: str | None = None  # the preprocessing its published checkpoints were trained with, if known


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    ARCHITECTURES[arch.name] = arch
    return arch


register(Architecture("chexnet", _chexnet, "features.conv0.weight", "classifier.0.weight", legacy_densenet=True,
                      normalization="imagenet"))
register(Architecture("densenet121", lambda n: _tv().densenet121(weights=None, num_classes=n),
                      "features.conv0.weight", "classifier.weight", legacy_densenet=True))
for _vgg in ("vgg16", "vgg16_bn"):
    register(Architecture(_vgg, lambda n, _name=_vgg: getattr(_tv(), _name)(weights=None, num_classes=n),
                          "features.0.weight", "classifier.6.weight"))
register(Architecture("googlenet", lambda n: _tv().googlenet(weights=None, num_classes=n, aux_logits=False,
                                                              init_weights=False),
                      "conv1.conv.weight", "fc.weight", training_only=("aux1.", "aux2.")))
for _depth in (18, 34, 50, 101):
    register(Architecture(f"resnet{_depth}",
                          lambda n, _d=_depth: getattr(_tv(), f"resnet{_d}")(weights=None, num_classes=n),
                          "conv1.weight", "fc.weight"))


def get_architecture(name: str | None, where: str | Path) -> Architecture:
    if name is None:
        raise CheckpointError(f"{where}: a PyTorch checkpoint holds weights, not the network; pass the architecture "
                              f"(arch= / --arch), one of {', '.join(ARCHITECTURES)}")
    if name not in ARCHITECTURES:
        raise CheckpointError(f"{where}: unknown architecture {name!r}; use one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


@dataclass
class LoadedModel:
    """A torch model in eval mode and what loading it found out (recorded in the manifest as ``source_model``)."""

    model: Any
    in_channels: int
    num_outputs: int
    info: dict[str, Any] = field(default_factory=dict)


def is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def _is_state_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """``torch.load(weights_only=True)``; a file that pickles other objects only with ``trust_pickle``."""
    torch = require_torch(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (pickled classes), RuntimeError (corrupt zip), EOFError, ...
        if "weights_only" not in str(exc) and "Unsupported global" not in str(exc):
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first_line(exc)})") from None
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if not trust_pickle:
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: the file pickles Python objects{what}, not just tensors, and is not loaded "
                              "(weights_only=True); save model.state_dict() instead, export ONNX, or, only for a file "
                              "you trust (unpickling runs code stored in it), pass --trust-pickle")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # the class of a pickled model is not importable here, ...
        raise CheckpointError(f"{path}: not loadable even trusted ({first_line(exc)}; a pickled class must be "
                              "importable here); save model.state_dict() or export ONNX where the model was "
                              "made") from None


def _is_safetensors(path: Path) -> bool:
    """Its name, or the safetensors layout: an 8-byte header length, then the JSON header (torch's files start
    with a zip's or a pickle's magic bytes)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return path.suffix.lower() == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")


def _read_safetensors(path: Path) -> dict[str, Any]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{path}: a safetensors file; reading it needs the safetensors package, which is not "
                              f"installed; {INSTALL_HINT}") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # a damaged header or a truncated file
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """``torch.load(weights_only=True)`` (or a safetensors file: tensors only by design) → (state_dict, facts about
    the file's layout). With ``trust_pickle``, a file pickling other objects (numpy scalars, argparse Namespaces, a
    whole model) is unpickled too."""
    path = Path(path)
    require_torch(path)
    if path.is_file() and _is_safetensors(path):
        return _read_safetensors(path), {"layout": "safetensors"}
    obj = _torch_load(path, trust_pickle)
    import torch

    if isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict()), {"layout": f"pickled {type(obj).__name__}"}
    if _is_state_dict(obj):
        return dict(obj), {"layout": "state_dict"}
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            value = obj.get(key)
            if isinstance(value, torch.nn.Module):  # {'model': model, 'epoch': ...} saved trusted
                value = value.state_dict()
            if _is_state_dict(value):
                facts: dict[str, Any] = {"layout": f"dict[{key!r}]",
                                         "other_keys": sorted(str(k) for k in obj if k != key)}
                if isinstance(obj.get("epoch"), int):
                    facts["epoch"] = int(obj["epoch"])
                return dict(value), facts
        keys = ", ".join(str(k) for k in list(obj)[:8])
        raise CheckpointError(f"{path}: no state_dict in this checkpoint (top-level keys: {keys}); expected a "
                              f"state_dict or a dict holding one under {' / '.join(repr(k) for k in STATE_DICT_KEYS)}")
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state_dict; save model.state_dict()")


def normalize_keys(state_dict: dict[str, Any], arch: Architecture) -> tuple[dict[str, Any], dict[str, Any]]:
    """Undo the usual wrappers so names match torchvision's: legacy DenseNet names, then the common key prefix
    (``module.`` from DataParallel, ``densenet121.`` from a wrapping module, ...), found by locating the first
    convolution's weight. Training-only layers the architecture lists (GoogLeNet aux heads) are dropped, and
    recorded. Returns (state_dict, facts)."""
    facts: dict[str, Any] = {}
    renamed, legacy = {}, 0
    for key, value in state_dict.items():
        new = _LEGACY_DENSENET.sub(r"\1\2", key) if arch.legacy_densenet else key
        legacy += new != key
        renamed[new] = value
    if legacy:
        facts["legacy_names_renamed"] = legacy
    # Candidate prefixes end where the first conv's name starts ("conv1.weight" also ends "layer1.0.conv1.weight":
    # the prefix that also holds the classifier, else the shortest, is the wrapper's).
    prefixes = sorted({k[: -len(arch.first_conv)] for k in renamed
                       if k == arch.first_conv or k.endswith("." + arch.first_conv)}, key=len)
    prefix = next((p for p in prefixes if p + arch.classifier in renamed), prefixes[0] if prefixes else "")
    if prefix:
        facts["prefix_stripped"] = prefix
        renamed = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in renamed.items()}
    dropped = sorted(k for k in renamed if k.startswith(arch.training_only)) if arch.training_only else []
    if dropped:
        facts["training_only_dropped"] = {"prefixes": list(arch.training_only), "tensors": len(dropped)}
        renamed = {k: v for k, v in renamed.items() if k not in dropped}
    return renamed, facts


def _other_fits(state_dict: dict[str, Any], arch: Architecture) -> list[str]:
    """Other registry names whose first-conv and classifier keys both appear (after their own normalisation)."""
    fits = []
    for other in ARCHITECTURES.values():
        keys, _ = normalize_keys(state_dict, other)
        if other is not arch and other.first_conv in keys and other.classifier in keys:
            fits.append(other.name)
    return fits


def _mismatch_error(where: str | Path, arch: Architecture, missing: list[str], unexpected: list[str],
                    wrong_shape: list[str], suggest: list[str]) -> CheckpointError:
    def names(items: list[str]) -> str:
        more = f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else ""
        return ", ".join(items[:SHOWN]) + more

    parts = [f"{len(missing)} missing" + (f" [{names(missing)}]" if missing else ""),
             f"{len(unexpected)} unexpected" + (f" [{names(unexpected)}]" if unexpected else "")]
    if wrong_shape:
        parts.append(f"{len(wrong_shape)} of the wrong shape [{names(wrong_shape)}]")
    hint = f"it looks like {' or '.join(suggest)}: pass that arch" if suggest else \
        "check the architecture name and that the file is complete (never loaded with strict=False)"
    return CheckpointError(f"{where}: checkpoint does not fit {arch.name} ({'; '.join(parts)}); {hint}")


def _replace_module(model: Any, dotted: str, new: Any) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _with_in_channels(model: Any, arch: Architecture, in_channels: int) -> Any:
    """Replace the first convolution by one with ``in_channels`` inputs and the same geometry (1-channel models)."""
    import torch.nn as nn

    name = arch.first_conv.rsplit(".", 1)[0]
    old = model.get_submodule(name)
    if old.in_channels != in_channels:
        _replace_module(model, name, nn.Conv2d(in_channels, old.out_channels, old.kernel_size, stride=old.stride,
                                               padding=old.padding, dilation=old.dilation, groups=old.groups,
                                               bias=old.bias is not None, padding_mode=old.padding_mode))
    return model


def model_from_state_dict(arch_name: str | None, state_dict: dict[str, Any], where: str | Path,
                          layout: dict[str, Any] | None = None) -> LoadedModel:
    """Build ``arch`` with the number of outputs and input channels the tensors say, and load it strictly."""
    require_torch(where)
    arch = get_architecture(arch_name, where)
    tensors, facts = normalize_keys(state_dict, arch)
    anchors = arch.first_conv in tensors and arch.classifier in tensors
    # Without both anchors the build below only serves to list the names the architecture expects.
    in_channels = int(tensors[arch.first_conv].shape[1]) if anchors else 3
    num_outputs = int(tensors[arch.classifier].shape[0]) if anchors else 1
    if in_channels not in (1, 3):
        raise CheckpointError(f"{where}: the first convolution takes {in_channels} channels; medq feeds 1 (gray) or "
                              "3 (RGB) channel images")
    model = _with_in_channels(arch.build(num_outputs), arch, in_channels)
    expected = model.state_dict()
    # Checkpoints from before torch 0.4.1 (CheXNet's) have no BatchNorm step counters; torch's own loader fills them
    # with 0 for such files. They play no part in inference.
    counters = [k for k in expected if k.endswith(".num_batches_tracked") and k not in tensors]
    if counters:
        tensors.update({k: expected[k].new_zeros(()) for k in counters})
        facts["num_batches_tracked_filled"] = len(counters)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong_shape = [f"{k} {tuple(tensors[k].shape)}≠{tuple(v.shape)}" for k, v in expected.items()
                   if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong_shape:
        # Another architecture is worth suggesting only when this one's landmarks are absent.
        suggest = [] if anchors else _other_fits(state_dict, arch)
        raise _mismatch_error(where, arch, missing, unexpected, wrong_shape, suggest)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    info = {"kind": "pytorch-checkpoint", "arch": arch.name, **(layout or {}), **facts, "tensors": len(tensors)}
    return LoadedModel(model, in_channels, num_outputs, info)


def load_checkpoint_model(path: str | Path, arch_name: str | None, trust_pickle: bool = False) -> LoadedModel:
    """Strictly into ``arch_name``'s network; a trusted pickled model keeps only its tensors there."""
    get_architecture(arch_name, path)
    state_dict, layout = read_checkpoint(path, trust_pickle)
    return model_from_state_dict(arch_name, state_dict, path, layout)


def load_torchscript(path: str | Path, image_size: int, trust: bool) -> LoadedModel:
    """A TorchScript module: runs code from the file, hence only with ``trust=True``."""
    path = Path(path)
    torch = require_torch(path)
    if not trust:
        raise MedqError(f"{path}: is a TorchScript program; loading it runs code stored in the file, so medq loads it "
                        "only when told the file is trusted (trust_torchscript=True / --trust-torchscript); "
                        "otherwise convert a state_dict checkpoint with --arch, or an ONNX export")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": not the user's to fix
            model = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise MedqError(f"{path}: not a loadable TorchScript file ({first_line(exc)})") from None
    convs = [t for t in model.state_dict().values() if t.ndim == 4]
    if not convs:
        raise MedqError(f"{path}: no convolution weights in this TorchScript module; medq converts image classifiers")
    # The first 4-D tensor is usually the stem's weight, but a module may register its layers in another order:
    # the channel count is the one the module runs with.
    in_channels, out, failure = None, None, ""
    for channels in dict.fromkeys((int(convs[0].shape[1]), 3, 1)):
        if channels not in (1, 3):
            continue
        try:
            with torch.no_grad():
                out = model(torch.zeros(1, channels, image_size, image_size))
        except Exception as exc:  # noqa: BLE001 - the module's refusal of this input; the next shape is tried
            failure = failure or _last_line(exc)
            continue
        in_channels = channels
        break
    if in_channels is None:
        raise MedqError(f"{path}: the module does not run on a {image_size}x{image_size} image of 1 or 3 channels "
                        f"({failure[:200]}); pass the --image-size it was made for")
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise MedqError(f"{path}: the module should return one [N, classes] tensor, got "
                        f"{getattr(out, 'shape', type(out).__name__)}")
    return LoadedModel(model, in_channels, int(out.shape[1]), {"kind": "torchscript"})


def _last_line(exc: Exception) -> str:
    """The cause of a TorchScript error: its message ends with the original exception, after both tracebacks."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def torch_predict(model: Any, x_nchw) -> Any:
    import numpy as np
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x_nchw))).numpy()


def export_onnx_from_torch(loaded: LoadedModel, target: Path, image_size: int, opset: int, where: str | Path) -> Path:
    """``torch.onnx.export`` (the TorchScript-based exporter) with a dynamic batch axis: onnx2tf, given a static
    batch of 20 or fewer RGB images, tries to download calibration samples and fails offline."""
    import torch

    dummy = torch.zeros(2, loaded.in_channels, image_size, image_size)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(loaded.model, (dummy,), str(target), input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "N"}, "output": {0: "N"}}, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
    except Exception as exc:
        raise MedqError(f"{where}: torch.onnx.export failed at {image_size}px, opset {opset} ({first_line(exc)}); "
                        "try another --image-size or --opset") from None
    return target
