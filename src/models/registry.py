"""The architecture registry: each builder in :mod:`medq.models.zoo` registers here with the input it expects.

Its own module so the zoo can register into it without importing the package that imports the zoo.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from medq.errors import ConfigError

MODELS: dict[str, Callable[..., Any]] = {}
ENTRIES: dict[str, "ModelEntry"] = {}
PREPROCESS_KEYS = ("image_size", "channels", "normalization")


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture and the input it expects (as timm's ``default_cfg`` travels with its model): the
    preprocessing a config that leaves it out gets, and the inputs it cannot take."""

    name: str
    image_size: int = 96  # default input side
    channels: int = 1  # default channel count
    normalization: str = "unit"  # default medq.preprocess normalisation
    min_size: int = 1  # smallest input side it builds at
    channel_choices: tuple[int, ...] = (1, 3)
    # Its first layers scale and normalise raw pixels themselves (keras.applications EfficientNet): it takes
    # normalization 'raw' (0-255) only, so the pixels are never normalised twice.
    normalizes_inside: bool = False

    def defaults(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in PREPROCESS_KEYS}

    def check(self, channels: int, normalization: str) -> None:
        """A ConfigError naming the setting when the model cannot take these inputs (the size is checked when the
        model is built: the tuner may change it per trial)."""
        if channels not in self.channel_choices:
            raise ConfigError(f"preprocess.channels: {self.name} takes {' or '.join(map(str, self.channel_choices))} "
                              f"channels, got {channels}")
        if self.normalizes_inside and normalization != "raw":
            raise ConfigError(f"preprocess.normalization: {self.name} rescales and normalises its input itself, so "
                              f"{normalization!r} would normalise twice; set raw (0-255 pixels) or leave it unset")


def register(name: str, **entry: Any):
    """Register a builder under ``name``; ``entry``: its :class:`ModelEntry` fields (input defaults, limits)."""
    def wrap(fn):
        MODELS[name] = fn
        ENTRIES[name] = ModelEntry(name, **entry)
        return fn

    return wrap


def head_activation(task: str) -> str:
    return "sigmoid" if task == "multilabel" else "softmax"
