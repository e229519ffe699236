#!/usr/bin/env bash
# Download every wheel the image installs, for the image's platform (Linux x86_64, CPython 3.11), into a folder on
# this host: docker/Dockerfile then installs from it with `pip install --no-index`, so the build needs no network.
#   docker/wheelhouse.sh                    # the pinned stack of env/requirements.txt
#   docker/wheelhouse.sh convert reference  # and the extras the image is built with (MEDQ_EXTRAS="convert reference")
# MEDQ_WHEELHOUSE=DIR downloads elsewhere (default docker/wheelhouse/, which the build copies). Wheels already there
# are kept, so a rerun fetches only what changed. PYTHON=... picks the pip that downloads (any Python 3 with pip).
set -euo pipefail
cd "$(dirname "$0")/.."

wheelhouse="${MEDQ_WHEELHOUSE:-docker/wheelhouse}"
python_bin="${PYTHON:-python3}"
files=(env/requirements.txt)
for extra in "$@"; do
  if [ ! -f "env/requirements-$extra.txt" ]; then
    echo "docker/wheelhouse.sh: unknown extra '$extra'; choose from: $(ls env/requirements-*.txt | sed 's|env/requirements-||; s|\.txt||' | tr '\n' ' ')" >&2
    exit 1
  fi
  files+=("env/requirements-$extra.txt")
done
requirements=()
for file in "${files[@]}"; do requirements+=(-r "$file"); done

mkdir -p "$wheelhouse"
# The stamp: what the folder was filled for, then its wheels. A rerun for the same requirement files with every
# wheel still there asks no index.
stamp="$wheelhouse/.medq-wheelhouse"
want=$(cat "${files[@]}" | sha256sum | cut -d' ' -f1)
if [ "$(head -n 1 "$stamp" 2> /dev/null)" = "$want" ] \
    && tail -n +2 "$stamp" | (cd "$wheelhouse" && xargs -r ls > /dev/null 2>&1); then
  echo "docker/wheelhouse.sh: $wheelhouse is up to date ($(($(wc -l < "$stamp") - 1)) wheels)"
  exit 0
fi
start=$SECONDS
# Binary wheels only (the image has no compiler), for the image's interpreter and glibc (bookworm: 2.36), not this
# host's. pip takes --platform tags literally, so every manylinux tag glibc 2.36 runs is named.
platforms=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
for minor in $(seq 5 36); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
# One resolver run over all files, so that the extras resolve together with the base pins.
"$python_bin" -m pip download --quiet --disable-pip-version-check --only-binary=:all: "${platforms[@]}" \
  --python-version 3.11 --implementation cp --abi cp311 --dest "$wheelhouse" "${requirements[@]}"
{ echo "$want"; (cd "$wheelhouse" && ls -- *.whl); } > "$stamp"
count=$(find "$wheelhouse" -maxdepth 1 -name '*.whl' | wc -l)
echo "docker/wheelhouse.sh: $count wheels, $(du -sh "$wheelhouse" | cut -f1) in $wheelhouse ($((SECONDS - start)) s)"
