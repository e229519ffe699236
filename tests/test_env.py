"""The bare-metal conda environment installs exactly the pins of env/requirements.txt (the one place versions live)
and medq itself."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import yaml

REPO = Path(__file__).resolve().parents[1]
ENV = REPO / "env"


def requirement_lines(path: Path) -> list[str]:
    """Requirement specifiers of a pip requirements file, comments and blank lines dropped."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def package_name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")


def conda_environment() -> dict:
    return yaml.safe_load((ENV / "environment.yml").read_text())


def pip_section(environment: dict) -> list[str]:
    sections = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml needs exactly one pip: section"
    return [str(s) for s in sections[0]]


def test_conda_pins_are_the_pip_pins_exactly():
    pins = requirement_lines(ENV / "requirements.txt")
    pip = pip_section(conda_environment())
    installs_medq = [s for s in pip if s.startswith("-e")]
    packages = [s for s in pip if not s.startswith("-")]
    assert packages == pins, "env/environment.yml's pip section must list env/requirements.txt's lines, in order"
    assert len(installs_medq) == 1 and len(pip) == len(pins) + 1, "only `-e ..` may be added to the pins"
    for spec in packages:
        assert re.search(r"(==|<|<=|>=|~=)", spec), f"{spec}: unpinned"


def test_conda_section_is_python_311_and_pip_only():
    environment = conda_environment()
    assert environment["name"] == "medq"
    conda = [d for d in environment["dependencies"] if isinstance(d, str)]
    assert "python=3.11" in conda and "pip" in conda
    pinned = {package_name(s) for s in requirement_lines(ENV / "requirements.txt")}
    for dep in conda:
        name = re.split(r"[=<> ]", dep, maxsplit=1)[0]
        assert name in ("python", "pip"), f"{dep}: conda packages beside python/pip would shadow the pip pins"
        assert name not in pinned


def test_editable_install_points_at_the_repository_root():
    (spec,) = [s for s in pip_section(conda_environment()) if s.startswith("-e")]
    target = (ENV / spec.split(None, 1)[1]).resolve()  # conda runs pip from the environment file's folder
    assert target == REPO and (target / "setup.cfg").is_file()
    assert "medq = medq.cli:main" in (REPO / "setup.cfg").read_text()


def test_every_extra_requirements_file_is_version_constrained():
    """The extras (installed on top, by env/setup.sh, the Dockerfile's MEDQ_EXTRAS and the conda route alike)."""
    for extra in sorted(ENV.glob("requirements-*.txt")):
        for spec in requirement_lines(extra):
            assert re.search(r"(==|<|<=|~=)", spec), f"{extra.name}: {spec} has no version bound"


def test_thread_settings_come_from_the_runtime_config():
    from medq.config import load_config
    from medq.hwinfo import physical_cores, thread_environment

    runtime = load_config(REPO / "configs" / "default.yaml").runtime
    env = thread_environment(runtime)
    assert env["OMP_NUM_THREADS"] == str(runtime.intra_op_threads or physical_cores())
    assert env["KMP_AFFINITY"] == runtime.kmp_affinity and env["KMP_BLOCKTIME"] == str(runtime.kmp_blocktime)
    custom = thread_environment(SimpleNamespace(intra_op_threads=3, inter_op_threads=2, kmp_blocktime=0,
                                                kmp_affinity="disabled"))
    assert custom["OMP_NUM_THREADS"] == "3" and custom["TF_NUM_INTEROP_THREADS"] == "2"
