"""The bare-metal conda environment installs exactly the pins of env/requirements.txt (the one place versions live)
and medq itself; setup.cfg declares the supported ranges (install_requires, extras) and the pins of env/ are the
lock inside them, so that `pip install ".[convert]" -c env/requirements.txt` installs within what CI tested."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from setuptools.config.setupcfg import read_configuration

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


# --- setup.cfg ranges against the env/ lock ---------------------------------------------------------------------

# The lock file of each group of setup.cfg ranges (the base stack's file pins the test runner too).
LOCKS = {"install_requires": "requirements.txt", "test": "requirements.txt",
         "convert": "requirements-convert.txt", "reference": "requirements-reference.txt",
         "serve_ray": "requirements-serve-ray.txt"}  # setuptools reads the extra serve-ray as serve_ray


def setup_cfg_ranges() -> dict[str, dict[str, Requirement]]:
    """What setuptools reads from setup.cfg, by group (install_requires and each extra), by package name."""
    options = read_configuration(REPO / "setup.cfg")["options"]
    groups = {"install_requires": options.get("install_requires", []), **options.get("extras_require", {})}
    return {group: _by_name(map(Requirement, lines)) for group, lines in groups.items()}


def _by_name(requirements) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in requirements}


def lock(file_name: str) -> dict[str, Requirement]:
    return _by_name(map(Requirement, requirement_lines(ENV / file_name)))


def lock_problems(ranges: dict[str, Requirement], pins: dict[str, Requirement], where: str) -> list[str]:
    """Ranges without a pin, and pins outside their range (a range in the lock must be the range itself)."""
    problems = []
    for name, declared in ranges.items():
        pin = pins.get(name)
        if pin is None:
            problems.append(f"setup.cfg's {declared} has no pin in {where}")
            continue
        exact = [s.version for s in pin.specifier if s.operator == "=="]
        if exact and not declared.specifier.contains(exact[0], prereleases=True):
            problems.append(f"{where}: {pin} lies outside setup.cfg's {declared}")
        if not exact and pin.specifier != declared.specifier:
            problems.append(f"{where}: {pin} differs from setup.cfg's {declared}")
    return problems


def test_setup_cfg_has_the_extras_users_install_each_with_its_lock_file():
    groups = setup_cfg_ranges()
    assert set(groups) == set(LOCKS) and {"convert", "reference"} <= set(groups)
    assert all((ENV / file_name).is_file() for file_name in LOCKS.values())


@pytest.mark.parametrize("group", sorted(LOCKS))
def test_every_range_has_a_pin_inside_it(group):
    assert lock_problems(setup_cfg_ranges()[group], lock(LOCKS[group]), f"env/{LOCKS[group]}") == []


@pytest.mark.parametrize("file_name", sorted(set(LOCKS.values())))
def test_every_pin_has_a_range(file_name):
    groups = setup_cfg_ranges()
    declared = {name for group, file in LOCKS.items() if file == file_name for name in groups[group]}
    assert sorted(set(lock(file_name)) - declared) == [], f"env/{file_name}: pins without a range in setup.cfg"


def test_ranges_are_ranges_and_the_lock_is_exact():
    for group, ranges in setup_cfg_ranges().items():
        for requirement in ranges.values():
            operators = {s.operator for s in requirement.specifier}
            assert operators and not operators & {"==", "==="}, \
                f"setup.cfg {group}: {requirement} must be a range (exact versions belong in env/)"
    for file_name in set(LOCKS.values()):
        for name, pin in lock(file_name).items():
            if name != "setuptools":  # the one range in the lock: below 81 (pkg_resources), torch's floor
                assert [s.operator for s in pin.specifier] == ["=="], f"env/{file_name}: {pin} is not exact"


def test_the_lock_check_catches_a_pin_outside_its_range_and_a_missing_pin():
    ranges = setup_cfg_ranges()["install_requires"]
    pins = lock("requirements.txt")
    pins["numpy"] = Requirement("numpy==2.0.0")  # TensorFlow 2.14 fails on NumPy 2: the range must exclude it
    del pins["tqdm"]
    problems = lock_problems(ranges, pins, "lock")
    assert any("numpy==2.0.0 lies outside" in p for p in problems)
    assert any(p.startswith("setup.cfg's tqdm") and "no pin" in p for p in problems)
    assert len(problems) == 2


def test_every_package_of_the_source_tree_is_installed():
    """A package missing from setup.cfg's list is absent from a wheel (docker) while an editable install hides it."""
    packages = set(read_configuration(REPO / "setup.cfg")["options"]["packages"])
    found = {"medq" + "".join(f".{p}" for p in init.parent.relative_to(REPO / "src").parts)
             for init in (REPO / "src").rglob("__init__.py")}
    assert found - packages == set()


def _setup_with_stubs(tmp_path: Path, free_kib: int):
    """env/setup.sh copied beside the repo's requirement files, with a venv whose pip logs its calls and a `df` on
    PATH that reports `free_kib` free. Returns setup(*extras) -> (exit code, pip calls, output)."""
    import os
    import shutil
    import subprocess
    (tmp_path / "env").mkdir()
    for path in [*ENV.glob("requirements*.txt"), ENV / "setup.sh"]:
        shutil.copy(path, tmp_path / "env" / path.name)
    for name in ("setup.cfg", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    calls, bin_dir = tmp_path / "pip-calls", tmp_path / "stub-bin"
    stubs = {tmp_path / ".venv" / "bin" / "python": "exit 0",
             tmp_path / ".venv" / "bin" / "pip": f'echo "$*" >> {calls}',
             bin_dir / "df": f'echo "Filesystem 1024-blocks Used Available Capacity Mounted on"\n'
                             f'echo "/dev/x 1000000000 1 {free_kib} 1% /"'}
    for path, body in stubs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)

    def setup(*extras):
        calls.write_text("")
        environment = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable)
        done = subprocess.run(["bash", str(tmp_path / "env" / "setup.sh"), *extras], capture_output=True,
                              text=True, env=environment, timeout=60)
        return done.returncode, calls.read_text().splitlines(), done.stdout + done.stderr

    return setup


def test_setup_refuses_to_start_an_install_the_disk_cannot_hold(tmp_path):
    # 5 GB for the base stack, 11 more for PyTorch's CUDA build and its downloads, 1 for reference: 17 GB asked.
    setup = _setup_with_stubs(tmp_path, free_kib=16 * 1024 * 1024)
    code, pip_calls, out = setup("convert", "reference")
    assert code == 1 and pip_calls == []
    assert "needs about 17 GB free" in out and "16 GB is free" in out and len(out.strip().splitlines()) == 1
    code, pip_calls, out = setup("reference")  # 6 GB asked, 16 free: installs
    assert code == 0 and len(pip_calls) == 4, out
    assert pip_calls[0].endswith("-r env/requirements.txt") and pip_calls[1].endswith("-r env/requirements-reference.txt")
