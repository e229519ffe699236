"""The package's layering, read from the source: stages never import each other, only medq.inc imports INC."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# A stage is a module or package that `medq <command>` runs; the orchestrators (cli, pipeline) may import them all.
STAGES = ("train", "tune", "freeze", "quantize", "benchmark", "convert", "predict", "serve")


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def stage_of(path: Path) -> str | None:
    top = path.relative_to(SRC).parts[0].removesuffix(".py")
    return top if top in STAGES else None


def sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", [p for p in sources() if stage_of(p)], ids=lambda p: str(p.relative_to(SRC)))
def test_a_stage_imports_no_other_stage(path):
    own = stage_of(path)
    crossing = sorted(name for name in imports(path)
                      if name.startswith("medq.") and name.split(".")[1] in STAGES and name.split(".")[1] != own)
    assert not crossing, f"{path.relative_to(SRC)} imports another stage: {crossing}"


def test_only_medq_inc_imports_neural_compressor():
    outside = [str(p.relative_to(SRC)) for p in sources() if p.relative_to(SRC).parts[0] != "inc"
               and any(n == "neural_compressor" or n.startswith("neural_compressor.") for n in imports(p))]
    assert outside == []


def test_the_layering_check_sees_a_crossing_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from medq.train import fit_model\n")
    assert "medq.train" in imports(probe)
