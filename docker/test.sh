#!/usr/bin/env bash
# Build the image here, air-gapped from the wheelhouse, and run the compose services on the phantoms as users run
# them: the pipeline service's `medq run` to the end, the serve service on that run (ready, one image predicted over
# the port published on 127.0.0.1, a clean drain on SIGTERM), then `medq data` and `medq train` one by one in the
# interactive service. Checks that the container's user is not root, that the run's files land in the host folders owned by the
# calling user, and that a missing or unwritable host folder stops with one line naming it. Prints each step's time;
# exits non-zero on the first failure. Needs root (it installs packages and starts its own Docker daemon).
#   sudo docker/test.sh
# Drives docker/docker-compose.yml with Debian's docker-compose 1.29 (users' `docker compose` reads the same file).
# MEDQ_DOCKER_CACHE (default /var/cache/medq-docker) holds the daemon's data root, so the base image and the layer
# cache survive between runs. The base is python:3.11-slim when the daemon has it or can pull it, else a Debian
# bookworm image with Debian's Python 3.11 made here with mmdebstrap from Debian's packages.
# The container runs as the calling user (SUDO_UID under sudo); under a plain root login as uid/gid 4242, since the
# container must not write as root.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

cache=${MEDQ_DOCKER_CACHE:-/var/cache/medq-docker}
exec_root=${MEDQ_DOCKER_EXEC_ROOT:-/run/medq-docker}  # tests/test_docker.py runs this script against stubs
socket=$exec_root/docker.sock
local_base=local/bookworm-python:3.11
project=medq-test
uid=${MEDQ_UID:-${SUDO_UID:-$(id -u)}}
gid=${MEDQ_GID:-${SUDO_GID:-$(id -g)}}
if [ "$uid" = 0 ]; then uid=4242 gid=4242; fi

step=""
timings=()
started=$SECONDS
step_started=$SECONDS
dockerd_pid=""
work=""

# begin NAME: start timing a step (the previous one's time is recorded)
begin() {
  finish_step
  step=$1
  step_started=$SECONDS
  echo "== $step"
}

finish_step() {
  if [ -n "$step" ]; then
    timings+=("$(printf '%5d s  %s' $((SECONDS - step_started)) "$step")")
    echo "-- $step: $((SECONDS - step_started)) s"
  fi
  step=""
}

fail() {
  echo "docker/test.sh: $*" >&2
  exit 1
}

cleanup() {
  local status=$?
  [ "$status" = 0 ] || [ -z "$step" ] || echo "docker/test.sh: FAILED in '$step' (exit $status)" >&2
  step=""
  if [ -n "$dockerd_pid" ]; then
    compose down --remove-orphans > /dev/null 2>&1 || true
    kill "$dockerd_pid" 2> /dev/null || true
    for _ in $(seq 30); do kill -0 "$dockerd_pid" 2> /dev/null || break; sleep 1; done
  fi
  [ -z "$work" ] || rm -rf "$work"
  if [ "${#timings[@]}" -gt 0 ]; then
    echo "docker/test.sh: step times"
    printf '%s\n' "${timings[@]}"
  fi
  echo "docker/test.sh: $([ "$status" = 0 ] && echo passed || echo FAILED) in $((SECONDS - started)) s"
}
trap cleanup EXIT
trap 'exit 143' TERM  # stopped from outside (CI's time budget): clean up all the same
trap 'exit 130' INT

# compose ARGS...: docker-compose on this repository's compose file, with the test's host folders and user
compose() {
  (cd docker && docker-compose -p "$project" "$@")
}

[ "$(id -u)" = 0 ] || { echo "docker/test.sh: run as root (it installs packages and starts dockerd): sudo docker/test.sh" >&2; exit 1; }

begin "tools (docker.io, docker-compose, mmdebstrap)"
missing=()
command -v dockerd > /dev/null || missing+=(docker.io)
command -v docker-compose > /dev/null || missing+=(docker-compose)
command -v mmdebstrap > /dev/null || missing+=(mmdebstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > /dev/null
fi

begin "dockerd"
mkdir -p "$cache" "$exec_root"
if [ -f "$exec_root/dockerd.pid" ] && kill -0 "$(cat "$exec_root/dockerd.pid")" 2> /dev/null; then
  fail "a dockerd on $socket is running already (pid $(cat "$exec_root/dockerd.pid")): another docker/test.sh?"
fi
rm -f "$exec_root/dockerd.pid"
# Its own socket, state and data root beside any other daemon on the machine; no iptables rules, so containers
# reach no network (nothing in the image may need one).
dockerd --data-root "$cache/docker" --exec-root "$exec_root" --pidfile "$exec_root/dockerd.pid" \
  --host "unix://$socket" --iptables=false > "$cache/dockerd.log" 2>&1 &
dockerd_pid=$!
export DOCKER_HOST="unix://$socket"
for _ in $(seq 60); do docker info > /dev/null 2>&1 && break; sleep 1; done
docker info > /dev/null 2>&1 || fail "dockerd did not start; see $cache/dockerd.log"

begin "wheelhouse (docker/wheelhouse.sh)"
docker/wheelhouse.sh

begin "base image"
base_image=${MEDQ_BASE_IMAGE:-python:3.11-slim}
if docker image inspect "$base_image" > /dev/null 2>&1 || docker pull "$base_image" > /dev/null 2>&1; then
  echo "base: $base_image"
else
  echo "cannot pull $base_image (no registry): Debian bookworm with Debian's Python 3.11 instead"
  base_image=$local_base
  if ! docker image inspect "$base_image" > /dev/null 2>&1; then
    rootfs=$cache/bookworm-rootfs.tar
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$rootfs"
    docker import "$rootfs" "$base_image" > /dev/null
    rm -f "$rootfs"
  fi
  echo "base: $base_image ($(docker run --rm "$base_image" python3 --version))"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/medq-docker-test.XXXXXX")
mkdir "$work/data" "$work/output" "$work/models" "$work/root-owned"
chown "$uid:$gid" "$work/data" "$work/output" "$work/models"
export MEDQ_BASE_IMAGE=$base_image MEDQ_UID=$uid MEDQ_GID=$gid
export DATA_DIR=$work/data OUTPUT_DIR=$work/output MODELS_DIR=$work/models

begin "build (docker-compose build, base $base_image)"
compose build pipeline | tee "$work/build.log"  # the services share one image
# Each build leaves the image it replaced untagged; removed, the cache keeps one build's layers instead of growing by
# an image per source change until the disk is full. Not `docker image prune`: the build stage's layers (the
# installed stack, the next build's cache) belong to no tagged image either, so only untagged images that this
# build did not print (`---> ID`) go.
for image in $(docker images --quiet --filter dangling=true); do
  grep -q -- "---> $image" "$work/build.log" || docker rmi "$image" > /dev/null 2>&1 || true
done
echo "image medq:latest: $(docker image inspect --format '{{.Size}}' medq:latest | awk '{printf "%.2f GB", $1 / 1e9}')"

begin "container user and bad input"
container_uid=$(compose run -T --rm interactive id -u 2> /dev/null | tr -d '\r')
[ "$container_uid" = "$uid" ] && [ "$container_uid" != 0 ] \
  || fail "the container runs as uid '$container_uid', expected $uid (not root)"
echo "the container runs as uid $container_uid"
# expect_refusal WHAT TEXT VAR=VALUE...: the interactive service, started with these settings, stops at once with
# a message containing TEXT
expect_refusal() {
  local what=$1 text=$2 output
  shift 2
  if output=$( (export "$@"; compose run -T --rm interactive true) 2>&1); then
    fail "$what: the container started"
  fi
  grep -qF -- "$text" <<< "$output" || fail "$what: no message naming $text in: $output"
  echo "refused, $what: $(grep -F -- "$text" <<< "$output" | head -n 1)"
}
expect_refusal "missing DATA_DIR" "bind source path does not exist: $work/missing" DATA_DIR="$work/missing"
[ ! -e "$work/missing" ] || fail "a missing DATA_DIR was created on the host"
expect_refusal "OUTPUT_DIR not writable" "host folder $work/root-owned (OUTPUT_DIR" OUTPUT_DIR="$work/root-owned"
expect_refusal "DATA_DIR not writable" "host folder $work/root-owned (DATA_DIR" DATA_DIR="$work/root-owned"

# owned_by_caller FOLDER...: every file and folder under them belongs to the container's (the calling) user
owned_by_caller() {
  local strangers
  strangers=$(find "$@" \( ! -uid "$uid" -o ! -gid "$gid" \) -printf '%u:%g %p\n' | head -n 5)
  [ -z "$strangers" ] || fail "files on the host not owned by $uid:$gid: $strangers"
}

begin "pipeline: MEDQ_CONFIG=configs/smoke.yaml docker-compose run --rm pipeline (medq run)"
MEDQ_CONFIG=configs/smoke.yaml compose run -T --rm pipeline
for file in manifest.json model.keras model_fp32.pb model_int8.pb benchmark.json benchmark.md; do
  [ -s "$work/output/smoke/$file" ] || fail "medq run left no output/smoke/$file on the host"
done
owned_by_caller "$work/output" "$work/data"

begin "serve: docker-compose up -d serve (medq serve on the smoke run), ready and one predict over the published port"
serve_port=${MEDQ_SERVE_PORT:-18080}
export MEDQ_SERVE_PORT=$serve_port
MEDQ_SERVE_RUN=smoke MEDQ_CONFIG=configs/smoke.yaml compose up -d serve
image=$(find "$work/data" -type f \( -name '*.jpeg' -o -name '*.jpg' -o -name '*.png' \) | sort | sed -n 1p)  # sed reads to the end: no SIGPIPE under pipefail
[ -n "$image" ] || fail "no phantom image under $work/data to send to the serve service"
# GET /v2/health/ready until 200 (bounded), then POST one image to /v1/models/smoke/predict: 200 with a probability
# for each of the model's classes, summing to 1 (softmax).
if ! python3 - "$serve_port" "$image" <<'PY'; then
import json, sys, time, urllib.error, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.monotonic() + 300
while True:
    try:
        if urllib.request.urlopen(f"{base}/v2/health/ready", timeout=5).status == 200:
            break
    except (OSError, urllib.error.HTTPError):
        pass
    if time.monotonic() > deadline:
        sys.exit("the serve service did not become ready on 127.0.0.1:" + sys.argv[1])
    time.sleep(2)
classes = json.load(urllib.request.urlopen(f"{base}/v2/models/smoke", timeout=30))["parameters"]["classes"]
request = urllib.request.Request(f"{base}/v1/models/smoke/predict", data=open(sys.argv[2], "rb").read(),
                                 headers={"Content-Type": "application/octet-stream"}, method="POST")
answer = json.load(urllib.request.urlopen(request, timeout=60))
probabilities = answer["probabilities"]
assert sorted(probabilities) == sorted(classes), (probabilities, classes)
assert abs(sum(probabilities.values()) - 1) < 1e-3, probabilities
print(f"serve: ready; predict {sys.argv[2].rsplit('/', 1)[-1]} -> {answer['prediction']} {probabilities}")
PY
  compose logs --tail 30 serve >&2 || true
  fail "the serve service did not answer (its log is above)"
fi
compose stop serve  # SIGTERM: medq serve drains and exits 0
serve_exit=$(docker inspect --format '{{.State.ExitCode}}' "$(compose ps -q serve)")
[ "$serve_exit" = 0 ] || fail "the serve service exited $serve_exit after SIGTERM, not 0"
compose rm -f serve > /dev/null

begin "interactive: medq data"
compose run -T --rm interactive medq data
[ -f "$work/data/chest_xray/.medq-phantom.json" ] || fail "no phantoms in the host's data folder"

begin "interactive: medq train --set train.epochs=1"
compose run -T --rm interactive medq train --set train.epochs=1
[ -s "$work/output/default/model.keras" ] || fail "medq train left no output/default/model.keras on the host"
owned_by_caller "$work/output" "$work/data"
echo "the run's files are on the host, owned by $uid:$gid"
finish_step
