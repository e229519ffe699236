"""The package's layering, read from the source: stages never import each other, only medq.inc imports INC."""
import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# A stage is a module or package that `medq <command>` runs; the orchestrators (cli, pipeline) may import them all.
STAGES = ("train", "tune", "freeze", "quantize", "benchmark", "convert", "predict")


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


def test_only_medq_tune_kt_private_imports_keras_tuners_internals():
    inside = sorted(str(p.relative_to(SRC)) for p in sources()
                    if any(n == "keras_tuner.src" or n.startswith("keras_tuner.src.") for n in imports(p)))
    assert inside == ["tune/kt_private.py"]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(("medq", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def import_cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while not component or member != node:
                member = stack.pop()
                component.add(member)
            if len(component) > 1:
                cycles.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def test_the_tune_package_has_no_import_cycle():
    """Imports inside functions count too: they are cycles that merely have not bitten yet."""
    modules = {module_name(p): p for p in sources()}
    graph = {name: {n for n in imports(path) if n in modules} - {name} for name, path in modules.items()}
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]  # the check works
    tune = [c for c in import_cycles(graph) if any(m == "medq.tune" or m.startswith("medq.tune.") for m in c)]
    assert tune == []


def test_exceptions_become_one_line_through_errors_first_line_only():
    """`str(exc).splitlines()[0]` breaks on an empty message and each copy shortens differently."""
    pattern = re.compile(r"str\(\w+\)[\w.()]*\.splitlines\(\)(\s*or\s*\[[^\]]*\]\))?\[0\]")
    copies = [f"{p.relative_to(SRC)}:{n}" for p in sources() for n, line in
              enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert copies == []
    assert pattern.search('first = (str(exc).strip().splitlines() or [""])[0][:200]')  # the copies it replaced
    assert pattern.search("({str(exc).splitlines()[0][:120]})")
