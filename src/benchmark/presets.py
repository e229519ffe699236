"""Benchmark presets: a config in configs/<name>.yaml run end to end by ``medq run``'s pipeline (its tune stage is
off in the preset), so a headline number is one command: ``medq benchmark --preset chexnet-cpu``
(:func:`medq.pipeline.run_preset` runs it)."""
from __future__ import annotations

from pathlib import Path

from medq.errors import ConfigError

PRESETS = {
    "chexnet-cpu": "CheXNet-shaped DenseNet121 at 224x224 (3 channels, ImageNet normalisation), 14-label NIH "
                   "ChestX-ray14 phantoms, trained briefly; every TF precision path plus the reference engines",
}


def preset_path(name: str) -> Path:
    """configs/<name>.yaml of the working directory, else of the medq source tree."""
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: unknown preset; choose one of {', '.join(sorted(PRESETS))}")
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        path = base / "configs" / f"{name}.yaml"
        if path.is_file():
            return path
    raise ConfigError(f"configs/{name}.yaml: preset config not found; run from the medq checkout")
