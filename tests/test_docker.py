"""docker/Dockerfile and docker/docker-compose.yml, checked without a Docker engine (none runs here): the files parse,
every path they COPY or mount exists, every variable they use is defined, every command they run exists (medq
subcommands parse with medq's own CLI parser), and versions come only from env/requirements*.txt.

Not checked here (needs an engine): that the image builds, that pip resolves inside it, and that the services start.
"""
from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path

import pytest
import yaml

from medq.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
# Commands a python:3.11-slim (Debian) image has, plus what the Dockerfile installs (pip's medq entry point).
IMAGE_COMMANDS = {"pip", "python", "python3", "groupadd", "useradd", "mkdir", "chown", "chmod", "set", "for", "done",
                  "medq", "bash", "sh", "rm", "ln", "echo", "true", "test", "cp"}
SHELL_KEYWORDS = {"do", "then", "fi", "else", "if"}
VERSION = re.compile(r"[A-Za-z0-9_.\-\[\]]+\s*(==|>=|<=|~=|!=|<|>)\s*\d")


# --- a small Dockerfile parser ------------------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with comments dropped and backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        instruction, _, arguments = line.partition(" ")
        out.append((instruction.upper(), arguments.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((DOCKER / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def _context(compose: dict) -> Path:
    contexts = {(DOCKER / s["build"]["context"]).resolve() for s in compose["services"].values() if "build" in s}
    assert len(contexts) == 1
    return contexts.pop()


def test_dockerfile_instructions_are_known_and_start_from_python_311_slim(dockerfile):
    known = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "USER", "CMD", "ENTRYPOINT", "LABEL", "EXPOSE"}
    assert {i for i, _ in dockerfile} <= known
    froms = [a for i, a in dockerfile if i == "FROM"]
    assert froms == ["python:3.11-slim"]
    assert dockerfile[0][0] in ("FROM", "ARG")
    users = [a for i, a in dockerfile if i == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "the container must not run as root"
    cmd = [a for i, a in dockerfile if i == "CMD"][-1]
    assert cmd.startswith("[") and yaml.safe_load(cmd)[0] in IMAGE_COMMANDS


def test_every_copied_path_exists_and_survives_dockerignore(dockerfile, compose):
    context = _context(compose)
    assert context == REPO
    ignore = [p.strip() for p in (context / ".dockerignore").read_text().splitlines()
              if p.strip() and not p.startswith("#")]
    for heavy in (".venv", ".git", "data", "output"):
        assert heavy in ignore, f".dockerignore must keep {heavy} out of the build context"
    copies = [a.split() for i, a in dockerfile if i == "COPY"]
    assert copies
    for args in copies:
        sources = [a for a in args[:-1] if not a.startswith("--")]
        for source in sources:
            matches = list(context.glob(source.rstrip("/")))
            assert matches, f"COPY {source}: nothing in the build context"
            for match in matches:
                rel = match.relative_to(context).as_posix()
                assert not any(fnmatch.fnmatch(rel, p) or rel.split("/")[0] == p for p in ignore), \
                    f"COPY {source}: {rel} is excluded by .dockerignore"


def test_dockerfile_variables_are_defined_and_commands_exist(dockerfile):
    defined: set[str] = set()
    parser = build_parser()
    for instruction, arguments in dockerfile:
        if instruction == "ARG":
            defined.add(arguments.split("=", 1)[0])
        elif instruction == "ENV":
            defined.update(re.findall(r"([A-Z_][A-Z0-9_]*)=", arguments))
        elif instruction == "RUN":
            local = set(re.findall(r"(?:^|[;&|\s])([A-Za-z_][A-Za-z0-9_]*)=", arguments))
            local |= set(re.findall(r"\bfor\s+([A-Za-z_][A-Za-z0-9_]*)\s+in\b", arguments))
            for name in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", arguments):
                assert name in defined | local, f"RUN uses ${name}, which no ARG/ENV defines"
            for command in re.split(r"&&|\|\||;|\|", arguments):
                words = shlex.split(command)
                while words and (words[0] in SHELL_KEYWORDS or "=" in words[0]):
                    words = words[1:]
                if not words:
                    continue
                assert words[0] in IMAGE_COMMANDS, f"RUN calls {words[0]!r}, not in the image"
                if words[0] == "medq" and words[1:] and not words[1].startswith("-"):
                    _parse_medq(parser, words[1:])


def test_dockerfile_installs_versions_only_from_env_requirements(dockerfile):
    runs = " ".join(a for i, a in dockerfile if i == "RUN")
    copies = " ".join(a for i, a in dockerfile if i == "COPY")
    assert "-r env/requirements.txt" in runs and ("env/" in copies.split() or "env/requirements.txt" in copies)
    assert not VERSION.search(runs), "the Dockerfile repeats a version: install from env/requirements*.txt"
    assert "pip install --no-deps -e ." in runs  # medq itself
    # extras are named by the MEDQ_EXTRAS build argument and read from the same env/ files
    assert re.search(r"for (\w+) in \$MEDQ_EXTRAS; do .*-r env/requirements-\$\1\.txt", runs)


def _parse_medq(parser, argv: list[str]):
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"`medq {' '.join(argv)}` is not a valid medq command line")


def _interpolate(value: str, where: str) -> str:
    """Compose interpolation with every variable's default; a variable without a default is an error here."""
    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(3)
        assert default is not None, f"{where}: ${{{name}}} has no default (write ${{{name}:-...}})"
        return default

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-([^}]*))?\}", sub, value)


def _strings(node, where: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, f"{where}[{i}]")
    elif isinstance(node, str):
        yield where, node


def test_compose_services_mounts_and_environment(compose):
    services = compose["services"]
    assert {"interactive", "pipeline"} <= set(services)
    for where, value in _strings(compose):
        _interpolate(value, where)
        assert "$" not in re.sub(r"\$\{[^}]*\}", "", value), f"{where}: bare $VAR; use ${{VAR:-default}}"
    for name, service in services.items():
        build = service["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
        env = service["environment"]
        mounts = {}
        for volume in service["volumes"]:
            host, container = _interpolate(volume, name).split(":")[:2]
            mounts[container] = host
        for variable in ("DATA_DIR", "OUTPUT_DIR", "MODELS_DIR"):
            assert env[variable] in mounts, f"{name}: {variable}={env[variable]} is not a mount point"
            assert f"${{{variable}:-" in " ".join(service["volumes"]), f"{name}: host {variable} is not mounted"
        assert not Path(service.get("working_dir", "/workspace")).is_relative_to("/data")
    interactive = services["interactive"]
    assert interactive["stdin_open"] and interactive["tty"]
    assert (DOCKER / interactive["volumes"][0].split(":")[0]).resolve() == REPO  # the repository, live
    assert interactive["volumes"][0].split(":")[1] == interactive["working_dir"] == "/workspace"
    assert _interpolate(" ".join(interactive["command"]), "interactive") in IMAGE_COMMANDS


def test_compose_pipeline_runs_a_real_medq_command(compose):
    command = [_interpolate(part, "pipeline.command") for part in compose["services"]["pipeline"]["command"]]
    assert command[0] == "medq"
    args = _parse_medq(build_parser(), command[1:])
    assert args.command == "run"
    assert (REPO / args.config).is_file(), f"{args.config} is not in the image (COPY configs/)"
