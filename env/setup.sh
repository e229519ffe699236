#!/usr/bin/env bash
# Create .venv/ in the repo root and install the pinned stack (env/requirements*.txt) plus medq itself.
# Idempotent: reinstalls only when a requirements file, setup.cfg or pyproject.toml changed.
# Extras by name: `env/setup.sh convert` adds PyTorch (env/requirements-convert.txt), `reference` adds
# OpenVINO/NNCF (env/requirements-reference.txt), `serve-ray` Ray Serve for `medq serve --ray`
# (env/requirements-serve-ray.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python_bin="$candidate"; break
    fi
  done
fi
if [ -z "$python_bin" ]; then
  echo "env/setup.sh: Python 3.11 is required (intel-tensorflow 2.14 has no wheels for other versions); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

files=(env/requirements.txt)
for extra in "$@"; do
  if [ ! -f "env/requirements-$extra.txt" ]; then
    echo "env/setup.sh: unknown extra '$extra'; choose from: $(ls env/requirements-*.txt | sed 's|env/requirements-||; s|\.txt||' | tr '\n' ' ')" >&2
    exit 1
  fi
  files+=("env/requirements-$extra.txt")
done

[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
stamp=.venv/.medq-installed
want=$(cat "${files[@]}" setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # Free space first: pip fails an install that fills the disk half-way with a bare OSError. Measured sizes in
  # .venv: base 2.1 GB, convert 5.7 GB (PyPI's torch brings its CUDA libraries), reference and serve-ray 0.3 GB each;
  # pip holds the downloaded wheels in $TMPDIR while it installs them, about as much again.
  need_gb=5
  for extra in "$@"; do
    case $extra in convert) need_gb=$((need_gb + 11)) ;; *) need_gb=$((need_gb + 1)) ;; esac
  done
  free_gb=$(df -Pk .venv "${TMPDIR:-/tmp}" 2>/dev/null | awk 'NR > 1 {print int($4 / 1048576)}' | sort -n | head -n 1)
  if [ -n "$free_gb" ] && [ "$free_gb" -lt "$need_gb" ]; then
    echo "env/setup.sh: installing ${files[*]} needs about $need_gb GB free in $PWD/.venv and ${TMPDIR:-/tmp}; $free_gb GB is free: free some space (or set TMPDIR to a roomier folder) and rerun" >&2
    exit 1
  fi
  for f in "${files[@]}"; do
    echo "installing $f" >&2
    .venv/bin/pip install --quiet --disable-pip-version-check -r "$f"
  done
  # torch's install upgrades setuptools; INC imports pkg_resources, gone from setuptools>=81: re-pin last.
  .venv/bin/pip install --quiet --disable-pip-version-check "setuptools<81"
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi
