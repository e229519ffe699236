"""The package's layering, read from the source: stages never import each other, only medq.inc imports INC, the run
record imports nothing from the data layer and is in no import cycle."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# A stage is a module or package that `medq <command>` runs; the orchestrators (cli, pipeline) may import them all.
STAGES = ("train", "tune", "freeze", "quantize", "benchmark", "convert", "predict")


# The one import allowed to break the run record's layering, until the branches that still call
# `runrecord.run_index` (benchmark/runner.py, tune) import medq.data.pinned: a lazy forward, run only when asked for.
TRANSITIONAL = {("runrecord/__init__.py", "__getattr__")}


def imports(path: Path, skip: str | None = None) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions (but not inside function ``skip``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == skip for n in ast.walk(f)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
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


def _skip(path: Path) -> str | None:
    return next((f for p, f in TRANSITIONAL if path.relative_to(SRC).as_posix() == p), None)


def package_graph() -> dict[str, set[str]]:
    """medq's top-level modules and packages (``data``, ``runrecord``, ``train`` ...) → those they import."""
    graph: dict[str, set[str]] = {}
    for path in sources():
        unit = path.relative_to(SRC).parts[0].removesuffix(".py")
        for name in imports(path, _skip(path)):
            parts = name.split(".")
            if parts[0] == "medq" and len(parts) > 1 and parts[1] != unit and \
                    ((SRC / parts[1]).is_dir() or (SRC / f"{parts[1]}.py").is_file()):
                graph.setdefault(unit, set()).add(parts[1])
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one member: each is an import cycle."""
    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = {node: reach(node) for node in graph}
    found: list[set[str]] = []
    for node in graph:
        component = {node} | {other for other in reachable[node] if node in reachable.get(other, ())}
        if len(component) > 1 and component not in found:
            found.append(component)
    return found


def test_the_run_record_imports_nothing_from_the_data_layer():
    """medq.data.check stages files through medq.runrecord, so runrecord importing medq.data would be a loop."""
    crossing = {str(p.relative_to(SRC)): sorted(n for n in imports(p, _skip(p)) if n.startswith("medq.data"))
                for p in sources() if p.relative_to(SRC).parts[0].removesuffix(".py") == "runrecord"}
    assert {k: v for k, v in crossing.items() if v} == {}


def test_the_run_record_is_in_no_import_cycle():
    assert [c for c in cycles(package_graph()) if "runrecord" in c] == []


def test_importing_the_run_record_loads_no_data_module():
    code = ("import sys, medq.runrecord, medq.runrecord.folder\n"
            "print(sorted(m for m in sys.modules if m.startswith('medq.data')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_cycle_check_sees_a_cycle_and_the_forward_import(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []
    probe = tmp_path / "probe.py"
    probe.write_text("def __getattr__(name):\n    from medq.data import pinned\n\n"
                     "def f():\n    import medq.data.readers\n")
    assert imports(probe, "__getattr__") == {"medq.data.readers"}
