"""docker/: the Dockerfile, the compose file, the entry point and the scripts, checked without a Docker engine
(docker/test.sh builds the image and runs both services for real; CI runs it after this suite). Static checks that
fail if the files regress, plus the entry point's and the install script's refusals run on this host."""
from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from medq.cli import build_parser
from medq.config import load_config
from medq.inc.deploy import load_deploy

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
# Commands a Debian image with python3 has, plus what the Dockerfile itself puts there.
IMAGE_COMMANDS = {"python3", "sh", "bash", "test", "groupadd", "useradd", "mkdir", "chown", "chmod", "rm", "medq",
                  "/opt/medq/bin/pip"}
VERSION = re.compile(r"[A-Za-z0-9_.\-\[\]]+\s*(==|>=|<=|~=|!=|<|>)\s*\d")
MOUNTS = {"DATA_DIR": "/data", "OUTPUT_DIR": "/output", "MODELS_DIR": "/models"}


# --- the Dockerfile ------------------------------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with comments dropped and backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        instruction, _, arguments = line.partition(" ")
        out.append((instruction.upper(), " ".join(arguments.split())))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, each starting with its FROM (global ARGs before the first dropped)."""
    out: list[list[tuple[str, str]]] = []
    for instruction, arguments in instructions:
        if instruction == "FROM":
            out.append([])
        if out:
            out[-1].append((instruction, arguments))
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((DOCKER / "Dockerfile").read_text())


def test_base_image_is_a_build_argument_defaulting_to_python_311_slim(dockerfile):
    assert dockerfile[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    build, runtime = stages(dockerfile)
    assert build[0] == ("FROM", "${BASE_IMAGE} AS build") and runtime[0] == ("FROM", "${BASE_IMAGE}")
    known = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "USER", "CMD", "ENTRYPOINT"}
    assert {i for i, _ in dockerfile} <= known


def test_build_stage_installs_the_lock_into_a_venv_from_the_wheelhouse_only(dockerfile):
    build, _ = stages(dockerfile)
    runs = [a for i, a in build if i == "RUN"]
    assert "python3 -m venv /opt/medq" in runs
    (install,) = [r for r in runs if "install-wheels.sh" in r]
    assert shlex.split(install)[2:4] == ["/opt/medq", "/wheelhouse"] and "$MEDQ_EXTRAS" in install
    assert ("COPY", "docker/wheelhouse/ /wheelhouse/") in build
    script = (DOCKER / "install-wheels.sh").read_text()
    assert '--no-index --find-links "$wheelhouse" -r env/requirements.txt' in script
    assert 'requirements="$requirements -r env/requirements-$extra.txt"' in script
    (medq_wheel,) = [r for r in runs if " wheel " in r]
    assert "--no-index" in medq_wheel and "--no-deps" in medq_wheel
    assert not VERSION.search(" ".join(runs)), "the Dockerfile repeats a version: they live in env/requirements*.txt"


def test_a_code_edit_leaves_the_dependency_layers_cached(dockerfile):
    build, runtime = stages(dockerfile)
    order = [(i, a) for i, a in build]
    install = next(n for n, (i, a) in enumerate(order) if i == "RUN" and "install-wheels.sh" in a)
    copies_code = [n for n, (i, a) in enumerate(order) if i == "COPY" and a.split()[0] in ("src/", "setup.cfg")]
    assert copies_code and install < min(copies_code), "COPY src/ before the dependency install rebuilds it per edit"
    copies = [a for i, a in runtime if i == "COPY"]
    assert copies[0] == "--from=build /opt/medq /opt/medq", "the venv first: it is cached until env/ changes"
    assert any(c.startswith("--from=build /dist/") for c in copies[1:]), "medq arrives as its own wheel"


def test_runtime_stage_runs_as_a_non_root_user_through_the_entry_point(dockerfile):
    _, runtime = stages(dockerfile)
    users = [a for i, a in runtime if i == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    (create_user,) = [a for i, a in runtime if i == "RUN" and "useradd" in a]
    assert 'test "$MEDQ_UID" != 0' in create_user  # an image built for root stops
    (entrypoint,) = [a for i, a in runtime if i == "ENTRYPOINT"]
    copied = dict(reversed(a.split()) for i, a in runtime if i == "COPY" and not a.startswith("--"))
    assert yaml.safe_load(entrypoint) == ["medq-entrypoint"]
    assert copied["/usr/local/bin/medq-entrypoint"] == "docker/entrypoint.sh"
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK), "COPY keeps the mode: the entry point must be executable"
    env = " ".join(a for i, a in runtime if i == "ENV")
    for variable, mount in MOUNTS.items():
        assert f"{variable}={mount}" in env
    assert "PATH=/opt/medq/bin:" in env and "/usr/bin" in env  # an imported base image has no PATH to extend


def test_dockerfile_variables_are_defined_and_commands_exist(dockerfile):
    parser = build_parser()
    for stage in stages(dockerfile):
        defined = {"BASE_IMAGE"}
        for instruction, arguments in stage:
            if instruction == "ARG":
                defined.add(arguments.split("=", 1)[0])
            elif instruction == "ENV":
                defined.update(re.findall(r"([A-Z_][A-Z0-9_]*)=", arguments))
            elif instruction == "RUN":
                for name in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", arguments):
                    assert name in defined, f"RUN uses ${name}, which no ARG/ENV of its stage defines"
                for command in re.split(r"&&|\|\||;|\|", arguments):
                    words = [w for w in shlex.split(command) if w != ">" and not w.startswith("/dev/")]
                    assert words[0] in IMAGE_COMMANDS, f"RUN calls {words[0]!r}, which the image lacks"
                    if words[0] == "medq":
                        with pytest.raises(SystemExit) as done:
                            parser.parse_args(words[1:])
                        assert done.value.code == 0  # --help


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides; '!' re-includes."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(c, pattern) or fnmatch.fnmatchcase(c, pattern.replace("**/", "")) for c in candidates):
            excluded = not negated
    return excluded


def test_every_copied_path_is_in_the_build_context_and_nothing_heavy_is(dockerfile):
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for heavy in (".venv/bin/python", ".git/HEAD", "data/chest_xray", "output/default/model.keras", "models/x.pt",
                  "tests/test_docker.py", "src/__pycache__/cli.cpython-311.pyc"):
        assert dockerignore_excludes(heavy, patterns), f".dockerignore lets {heavy} into the build context"
    assert not dockerignore_excludes("docker/wheelhouse/numpy-1.26.4-cp311-cp311-manylinux2014_x86_64.whl", patterns)
    for instruction, arguments in dockerfile:
        if instruction != "COPY" or arguments.startswith("--from"):
            continue
        for source in arguments.split()[:-1]:
            rel = source.rstrip("/")
            assert dockerignore_excludes(rel, patterns) is False, f"COPY {source}: excluded by .dockerignore"
            if rel != "docker/wheelhouse":  # filled by docker/wheelhouse.sh, git-ignored
                assert (REPO / rel).exists(), f"COPY {source}: not in the repository"
    assert "docker/wheelhouse/" in (REPO / ".gitignore").read_text().split()


# --- the compose file ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def _interpolate(value: str, where: str) -> str:
    """Compose interpolation with every variable's default; a variable without a default is an error here."""
    def sub(match: re.Match) -> str:
        assert match.group(3) is not None, f"{where}: ${{{match.group(1)}}} has no default (write ${{NAME:-...}})"
        return match.group(3)

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-([^}]*))?\}", sub, value)


def test_compose_services_mount_the_host_folders_and_run_as_the_callers_ids(compose):
    services = compose["services"]
    assert set(services) == {"interactive", "pipeline", "serve"}
    for name, service in services.items():
        build = service["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
        assert build["args"]["BASE_IMAGE"] == "${MEDQ_BASE_IMAGE:-python:3.11-slim}"
        assert service["user"] == "${MEDQ_UID:-1000}:${MEDQ_GID:-1000}"
        assert "0" not in _interpolate(service["user"], name).split(":")
        mounts = {v["target"]: v for v in service["volumes"]}
        for variable, target in MOUNTS.items():
            volume = mounts[target]
            # the long form: a missing host folder is an error naming it, never created as root
            assert volume["type"] == "bind" and volume["source"].startswith(f"${{{variable}:-")
            assert service["environment"][variable] == target
            assert service["environment"][f"MEDQ_HOST_{variable}"] == volume["source"]
        configs = mounts["/workspace/configs"]
        assert configs["read_only"] and (DOCKER / configs["source"]).resolve() == REPO / "configs"
        assert service["working_dir"] == "/workspace"
    assert services["interactive"]["stdin_open"] and services["interactive"]["tty"]
    assert services["interactive"]["command"] == ["bash"]


def test_compose_pipeline_runs_medq_run_on_the_config_MEDQ_CONFIG_names(compose):
    command = compose["services"]["pipeline"]["command"]
    assert command[command.index("--config") + 1] == "${MEDQ_CONFIG:-configs/default.yaml}"
    args = build_parser().parse_args([_interpolate(part, "pipeline.command") for part in command[1:]])
    # inside the container DATA_DIR=/data is never the built-in data location: phantoms need asking for
    assert command[0] == "medq" and args.command == "run" and args.phantoms
    for config in (args.config, "configs/smoke.yaml"):  # docker/test.sh runs the smoke config
        assert load_config(REPO / config).data.root.endswith("/chest_xray")


def test_compose_serve_publishes_medq_serve_on_the_hosts_loopback_only(compose):
    from medq.config import ServeConfig

    service = compose["services"]["serve"]
    command = [_interpolate(part, "serve.command") for part in service["command"]]
    args = build_parser().parse_args(command[1:])
    assert command[0] == "medq" and args.command == "serve" and args.runs == ["default"] and args.model == "int8"
    assert args.host == "0.0.0.0"  # the container's own interfaces: what a published port reaches
    (published,) = [_interpolate(p, "serve.ports") for p in service["ports"]]
    host_ip, host_port, container_port = published.split(":")
    assert host_ip == "127.0.0.1" and int(container_port) == args.port and host_port.isdigit()
    assert "${MEDQ_SERVE_PORT:-" in service["ports"][0]
    assert f"127.0.0.1:{args.port}/v2/health/ready" in " ".join(service["healthcheck"]["test"])
    grace = service["stop_grace_period"]
    assert service["stop_signal"] == "SIGTERM" and grace.endswith("s")
    assert float(grace[:-1]) > ServeConfig().drain_timeout_s, "docker must not SIGKILL a server still draining"


def test_smoke_config_is_the_default_job_at_toy_size_on_the_default_phantoms():
    default, smoke = load_config(REPO / "configs/default.yaml"), load_config(REPO / "configs/smoke.yaml")
    assert smoke.data == default.data, "medq data in the interactive service must find the pipeline's phantoms"
    assert smoke.run.name != default.run.name
    assert smoke.train.epochs == 1 and smoke.tune.max_trials == 1 and smoke.preprocess.image_size <= 32
    assert "int8" in smoke.benchmark.precisions
    deploy = load_deploy(smoke.quantize.deploy)  # one INC trial that any INT8 model passes: seconds, not minutes
    assert deploy.max_trials == 1 and deploy.criterion.kind == "absolute" and deploy.criterion.tolerance >= 1.0


# --- the entry point and the install script, run here --------------------------------------------------------------

def _as_unprivileged() -> list[str]:
    """A command prefix that drops root (root can write anything), or nothing when this is not root."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv (util-linux) to check permissions as root")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]


def _entrypoint(tmp_path: Path, prefix: list[str], **folders: Path) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"]}
    for variable in MOUNTS:
        env[variable] = str(folders.get(variable, tmp_path / variable.lower()))
        env[f"MEDQ_HOST_{variable}"] = f"/host/{variable.lower()}"
    return subprocess.run([*prefix, "sh", str(tmp_path / "entrypoint.sh"), "echo", "started"], env=env,
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)


def _reachable_by_everyone(folder: Path) -> bool:
    """Every folder from / down to ``folder`` lets other users through (o+x)."""
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in (folder, *folder.parents))


@pytest.fixture
def folders():
    """The three folders and a copy of the entry point, in a directory the unprivileged user can reach: neither
    pytest's tmp_path (root's alone) nor the checkout (a clone under a 0700 home or temp folder) may be."""
    parents = [Path(tempfile.gettempdir()), Path("/tmp"), Path("/var/tmp"), Path("/dev/shm")]
    parent = next((p for p in parents if p.is_dir() and _reachable_by_everyone(p) and os.access(p, os.W_OK)), None)
    if parent is None:
        pytest.skip(f"no temporary folder other users can enter among {', '.join(map(str, parents))}")
    root = Path(tempfile.mkdtemp(prefix="medq-entrypoint-", dir=parent))
    os.chmod(root, 0o755)
    shutil.copy(DOCKER / "entrypoint.sh", root / "entrypoint.sh")
    os.chmod(root / "entrypoint.sh", 0o755)
    for variable in MOUNTS:
        (root / variable.lower()).mkdir()
        os.chmod(root / variable.lower(), 0o777)
    yield root
    shutil.rmtree(root)


def test_entrypoint_runs_the_command_when_the_folders_are_writable(folders):
    done = _entrypoint(folders, _as_unprivileged())
    assert (done.returncode, done.stdout, done.stderr) == (0, "started\n", "")


@pytest.mark.parametrize("variable", ["OUTPUT_DIR", "DATA_DIR"])
def test_entrypoint_refuses_a_folder_it_cannot_write_in_one_line_naming_the_host_folder(folders, variable):
    os.chmod(folders / variable.lower(), 0o755)
    prefix = _as_unprivileged()
    if not prefix:
        os.chmod(folders / variable.lower(), 0o555)
    done = _entrypoint(folders, prefix)
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert f"host folder /host/{variable.lower()} ({variable}" in line and "not writable" in line


def test_entrypoint_refuses_a_missing_folder(folders):
    done = _entrypoint(folders, _as_unprivileged(), DATA_DIR=folders / "nowhere")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"medq container: DATA_DIR={folders / 'nowhere'} does not exist in the "
                                        "container; mount the host folder there"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_entrypoint_refuses_to_run_as_root(folders):
    done = _entrypoint(folders, [])
    assert done.returncode == 2 and "runs as root" in done.stderr and done.stdout == ""


def test_install_script_names_the_missing_wheel_in_one_line(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    (tmp_path / "wheelhouse").mkdir()
    shutil.copytree(REPO / "env", tmp_path / "env")
    # as in the image: no pip configuration, no other wheel folder (this host's pip config names some), and an
    # index that answers nothing, so that a script which lost --no-index fails here without downloading
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {
        "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0"}
    done = subprocess.run(["sh", str(DOCKER / "install-wheels.sh"), str(venv), str(tmp_path / "wheelhouse"),
                           "convert"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    missing = re.fullmatch(r"docker build: docker/wheelhouse/ has no wheel for (\S+); run docker/wheelhouse.sh "
                           r"convert and build again", line)
    assert missing, line
    pins = (REPO / "env/requirements.txt").read_text() + (REPO / "env/requirements-convert.txt").read_text()
    assert missing.group(1) in pins.splitlines()
    assert not list((venv / "lib").glob("python3*/site-packages/numpy")), "nothing is installed before the check"


@pytest.mark.parametrize("script", ["install-wheels.sh", "wheelhouse.sh"])
def test_scripts_refuse_an_unknown_extra_in_one_line(tmp_path, script):
    args = [str(tmp_path), str(tmp_path)] if script == "install-wheels.sh" else []
    done = subprocess.run(["bash", str(DOCKER / script), *args, "nosuch"], cwd=REPO, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert "unknown extra 'nosuch'" in line and "convert" in line and "reference" in line


# --- docker/test.sh, docker/wheelhouse.sh and CI -------------------------------------------------------------------

def test_wheelhouse_script_downloads_binary_wheels_for_the_images_platform():
    script = (DOCKER / "wheelhouse.sh").read_text()
    subprocess.run(["bash", "-n", str(DOCKER / "wheelhouse.sh")], check=True)
    for option in ("--only-binary=:all:", "--python-version 3.11", "--implementation cp", "--abi cp311",
                   "--platform manylinux2014_x86_64", '--dest "$wheelhouse"', 'files=(env/requirements.txt)',
                   'files+=("env/requirements-$extra.txt")', 'requirements+=(-r "$file")'):
        assert option in script
    assert 'wheelhouse="${MEDQ_WHEELHOUSE:-docker/wheelhouse}"' in script


def test_wheelhouse_script_skips_the_index_only_while_its_stamp_and_wheels_are_intact(tmp_path):
    wheel = "numpy-1.26.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
    (tmp_path / wheel).write_bytes(b"")
    digest = hashlib.sha256((REPO / "env/requirements.txt").read_bytes()).hexdigest()
    (tmp_path / ".medq-wheelhouse").write_text(f"{digest}\n{wheel}\n")
    env = {**os.environ, "MEDQ_WHEELHOUSE": str(tmp_path), "PYTHON": "false"}  # any pip call fails

    def run(*extras):
        return subprocess.run(["bash", str(DOCKER / "wheelhouse.sh"), *extras], env=env, capture_output=True,
                              text=True, timeout=30)

    done = run()
    assert done.returncode == 0 and "up to date (1 wheels)" in done.stdout
    assert run("convert").returncode != 0, "another set of requirement files must download again"
    (tmp_path / wheel).unlink()
    assert run().returncode != 0, "a wheel gone from the folder must download again"


DOCKER_STUBS = {
    "dockerd": 'echo dockerd >> "$CALLS"; echo $$ > "$CALLS.dockerd"; exec sleep 300',
    "docker": """echo "docker $*" >> "$CALLS"
case "$*" in
  *"{{.State.ExitCode}}"*) echo 0 ;;
  *"--format"*) echo 1500000000 ;;
  run*) echo "Python 3.11.2" ;;
  "images --quiet --filter dangling=true") printf "5a1e0b5e0000\\nb0110e100000\\n" ;;  # last build's, this build's
esac""",
    # the container as the entry point and the services behave: refusals, and the files a run leaves on the host
    "docker-compose": """echo "compose MEDQ_CONFIG=${MEDQ_CONFIG:-} ${*:3}" >> "$CALLS"
owned() { chown -R "$MEDQ_UID:$MEDQ_GID" "$@"; }
case "${*:3}" in
  "build pipeline") printf "Step 10/27 : RUN sh docker/install-wheels.sh\\n ---> b0110e100000\\n" ;;
  "run -T --rm interactive id -u") echo "${STUB_CONTAINER_UID:-$MEDQ_UID}" ;;
  "run -T --rm interactive true")
    [ -z "${STUB_STARTS_ANYWAY:-}" ] || exit 0
    [ -d "$DATA_DIR" ] || { echo "Error: bind source path does not exist: $DATA_DIR"; exit 1; }
    for v in OUTPUT_DIR DATA_DIR; do
      [ "$(stat -c %u "${!v}")" = "$MEDQ_UID" ] || { echo "host folder ${!v} ($v) is not writable"; exit 2; }
    done ;;
  "run -T --rm pipeline")
    mkdir -p "$OUTPUT_DIR/smoke" "$DATA_DIR/chest_xray/test/NORMAL"
    echo x > "$DATA_DIR/chest_xray/test/NORMAL/a.jpeg"
    for f in manifest.json model.keras model_fp32.pb model_int8.pb benchmark.json benchmark.md; do
      [ "$f" = "${STUB_RUN_LEAVES_NO:-}" ] || echo x > "$OUTPUT_DIR/smoke/$f"
    done
    owned "$OUTPUT_DIR" "$DATA_DIR" ;;
  "run -T --rm interactive medq data")
    mkdir -p "$DATA_DIR/chest_xray" && echo "{}" > "$DATA_DIR/chest_xray/.medq-phantom.json" && owned "$DATA_DIR" ;;
  "run -T --rm interactive medq train --set train.epochs=1")
    mkdir -p "$OUTPUT_DIR/default" && echo x > "$OUTPUT_DIR/default/model.keras"
    [ -n "${STUB_ROOT_OWNED:-}" ] || owned "$OUTPUT_DIR" ;;
  "ps -q serve") echo serve-container ;;
esac""",
    "python3": 'cat > /dev/null; echo "serve: ready (stub)"; exit "${STUB_SERVE_STATUS:-0}"',  # a serve check's client
    "mmdebstrap": 'echo mmdebstrap >> "$CALLS"',
    "id": 'case "$1" in -u|-g) echo 0 ;; *) /usr/bin/id "$@" ;; esac',  # the script wants root; it gets a stub
}


def _docker_test_with_stubs(tmp_path: Path):
    """docker/test.sh copied into a folder laid out like the repository, with dockerd, docker, docker-compose,
    mmdebstrap, id and docker/wheelhouse.sh stubbed. Returns run(**env) -> (exit code, calls, output)."""
    repo = tmp_path / "repo"
    (repo / "docker").mkdir(parents=True)
    shutil.copy(DOCKER / "test.sh", repo / "docker" / "test.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {bin_dir / name: body for name, body in DOCKER_STUBS.items()}
    stubs[repo / "docker" / "wheelhouse.sh"] = 'echo wheelhouse >> "$CALLS"'
    for path, body in stubs.items():
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    calls = tmp_path / "calls"

    def run(**env):
        calls.write_text("")
        environment = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls),
                           TMPDIR=str(tmp_path), MEDQ_DOCKER_CACHE=str(tmp_path / "cache"),
                           MEDQ_DOCKER_EXEC_ROOT=str(tmp_path / "exec-root"), **env)
        if os.geteuid() != 0:  # the script's own files are then owned by this user, not by uid 4242
            environment |= {"MEDQ_UID": str(os.getuid()), "MEDQ_GID": str(os.getgid())}
        done = subprocess.run(["bash", str(repo / "docker" / "test.sh")], capture_output=True, text=True,
                              env=environment, timeout=120)
        return done.returncode, calls.read_text().splitlines(), done.stdout + done.stderr

    return run


def test_docker_test_script_runs_both_services_in_order_and_stops_its_daemon(tmp_path):
    code, calls, out = _docker_test_with_stubs(tmp_path)()
    assert code == 0, out
    compose = [c.removeprefix("compose ") for c in calls if c.startswith("compose")]
    services = ["MEDQ_CONFIG= build pipeline",
                "MEDQ_CONFIG= run -T --rm interactive id -u",
                *["MEDQ_CONFIG= run -T --rm interactive true"] * 3,  # missing DATA_DIR, unwritable OUTPUT/DATA
                "MEDQ_CONFIG=configs/smoke.yaml run -T --rm pipeline",
                "MEDQ_CONFIG= run -T --rm interactive medq data",
                "MEDQ_CONFIG= run -T --rm interactive medq train --set train.epochs=1",
                "MEDQ_CONFIG= down --remove-orphans"]
    assert [c for c in compose if c in services] == services  # in this order (other services' checks may sit between)
    assert compose[-1] == "MEDQ_CONFIG= down --remove-orphans"
    assert calls.index("wheelhouse") < calls.index("compose MEDQ_CONFIG= build pipeline")
    # the untagged image the build replaced is removed (the cache does not grow by an image per change), the build
    # stage's untagged layers the build printed are kept (the next build's cache)
    assert calls.index("compose MEDQ_CONFIG= build pipeline") < calls.index("docker rmi 5a1e0b5e0000")
    assert "docker rmi b0110e100000" not in calls
    assert "docker/test.sh: passed" in out and not list(tmp_path.glob("medq-docker-test.*"))  # its folder removed
    dockerd = int((tmp_path / "calls.dockerd").read_text())
    assert not Path(f"/proc/{dockerd}").exists()  # the daemon it started was stopped on exit
    parser = build_parser()  # the interactive commands are medq commands as users type them
    for command in ("data", "train --set train.epochs=1"):
        parser.parse_args(shlex.split(command))


@pytest.mark.parametrize("fault, message", [
    ({"STUB_CONTAINER_UID": "0"}, "the container runs as uid '0'"),
    ({"STUB_STARTS_ANYWAY": "1"}, "missing DATA_DIR: the container started"),
    ({"STUB_RUN_LEAVES_NO": "model_int8.pb"}, "medq run left no output/smoke/model_int8.pb on the host"),
    ({"STUB_ROOT_OWNED": "1"}, "files on the host not owned by"),
])
def test_docker_test_script_fails_on_each_broken_promise(tmp_path, fault, message):
    code, _, out = _docker_test_with_stubs(tmp_path)(**fault)
    assert code != 0 and message in out and "docker/test.sh: FAILED" in out, out


def _ci_with_stubs(tmp_path: Path):
    """.ci/run copied beside stubs of env/setup.sh, the venv's python (pytest) and docker/test.sh that log their
    call; each exits with SETUP_STATUS / FAST_STATUS / SLOW_STATUS / DOCKER_STATUS (default 0) and sleeps
    FAST_SLEEP seconds if set. Returns ci(**env) -> (exit code, calls, stdout + stderr)."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "run", tmp_path / ".ci" / "run")
    calls = tmp_path / "calls"
    pytest_stub = """
case "$*" in
  *"-m not slow"*) echo fast >> "$CALLS"; sleep "${FAST_SLEEP:-0}"; exit "${FAST_STATUS:-0}" ;;
  *"-m slow"*) echo "slow@${MEDQ_CI_DEADLINE:-none}" >> "$CALLS"; exit "${SLOW_STATUS:-0}" ;;
  *) echo "pytest-without-a-tier:$*" >> "$CALLS"; exit 99 ;;
esac"""
    stubs = {"env/setup.sh": 'echo setup >> "$CALLS"; exit "${SETUP_STATUS:-0}"', ".venv/bin/python": pytest_stub,
             "docker/test.sh": 'echo docker >> "$CALLS"; exit "${DOCKER_STATUS:-0}"'}
    for rel, body in stubs.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (tmp_path / rel).chmod(0o755)

    def ci(**env):
        calls.write_text("")
        for variable in ("MEDQ_CI_DEADLINE", "MEDQ_CI_BUDGET_SECONDS", "MEDQ_CI_LONGEST_SLOW_SECONDS"):
            env.setdefault(variable, "")  # not inherited from a CI run of this suite
        environment = {k: v for k, v in dict(os.environ, CALLS=str(calls), **env).items() if v != ""}
        done = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True,
                              env=environment, timeout=120)
        return done.returncode, calls.read_text().split(), done.stdout + done.stderr

    return ci


def test_ci_runs_setup_the_fast_tier_docker_test_and_the_slow_tier_in_that_order(tmp_path):
    ci = _ci_with_stubs(tmp_path)
    before = time.time()
    code, calls, out = ci()
    assert code == 0 and "CI: passed" in out
    assert calls[:3] == ["setup", "fast", "docker"] and len(calls) == 4 and calls[3].startswith("slow@")
    # the slow tier's deadline: the budget's end (35 min) less the longest slow test's room (5 min), from CI's start
    deadline = int(calls[3].split("@")[1])
    assert before + 2100 - 300 - 5 <= deadline <= time.time() + 2100 - 300


@pytest.mark.parametrize("failing, named", [("FAST_STATUS", "fast tier (exit 1)"),
                                            ("DOCKER_STATUS", "docker/test.sh (exit 1)"),
                                            ("SLOW_STATUS", "slow tier (exit 1)")])
def test_ci_fails_when_any_step_fails_and_still_runs_the_others(tmp_path, failing, named):
    code, calls, out = _ci_with_stubs(tmp_path)(**{failing: "1"})
    assert code != 0 and [c.split("@")[0] for c in calls] == ["setup", "fast", "docker", "slow"]
    assert "CI: FAILED after" in out and named in out.splitlines()[-1]


def test_ci_stops_at_a_failed_setup(tmp_path):
    code, calls, out = _ci_with_stubs(tmp_path)(SETUP_STATUS="2")
    assert code != 0 and calls == ["setup"] and "CI: FAILED: setup" in out


def test_ci_no_test_selected_fails_the_fast_tier_but_not_the_slow_one(tmp_path):
    ci = _ci_with_stubs(tmp_path)
    code, calls, out = ci(SLOW_STATUS="5")
    assert code == 0 and "no test is marked slow" in out
    code, calls, out = ci(FAST_STATUS="5")
    assert code != 0 and "fast tier (no tests)" in out.splitlines()[-1]


def test_ci_stops_a_step_still_running_at_the_budgets_end_and_fails(tmp_path):
    code, calls, out = _ci_with_stubs(tmp_path)(MEDQ_CI_BUDGET_SECONDS="2", FAST_SLEEP="30")
    assert code != 0 and calls == ["setup", "fast"]  # docker/test.sh and the slow tier had no time left
    assert "fast tier: pytest -m 'not slow': still running at the budget's end" in out
    assert "docker/test.sh: not started, CI's budget is spent" in out


def test_a_test_not_started_by_ci_s_deadline_is_skipped_with_the_reason(tmp_path):
    """The conftest hook .ci/run's slow tier relies on, run in a real pytest."""
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tmp_path / "test_probe.py").write_text("def test_probe():\n    pass\n")

    def pytest_with(deadline):
        env = dict(os.environ, MEDQ_CI_DEADLINE=deadline) if deadline else \
            {k: v for k, v in os.environ.items() if k != "MEDQ_CI_DEADLINE"}
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                              capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path).stdout

    late = pytest_with(str(int(time.time()) - 1))
    assert "1 skipped" in late and "CI's time budget ran out" in late
    assert "1 passed" in pytest_with(str(int(time.time()) + 600))
    assert "1 passed" in pytest_with(None)  # the README's command: everything runs
