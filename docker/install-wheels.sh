#!/bin/sh
# The image's build stage: install env/requirements.txt and the extras named into a virtual environment from the
# wheelhouse alone (no package index), all files in one resolver run so the extras resolve with the base pins.
#   sh docker/install-wheels.sh VENV WHEELHOUSE [EXTRA...]      (run from the folder holding env/)
# A wheel the wheelhouse lacks stops the build, before anything is installed, with one line naming it.
set -eu
venv=$1
wheelhouse=$2
shift 2
extras="$*"
requirements=""
for extra in $extras; do
  if [ ! -f "env/requirements-$extra.txt" ]; then
    echo "docker build: unknown extra '$extra' in MEDQ_EXTRAS; choose from: $(ls env/requirements-*.txt | sed 's|env/requirements-||; s|\.txt||' | tr '\n' ' ')" >&2
    exit 1
  fi
  requirements="$requirements -r env/requirements-$extra.txt"
done

log=$(mktemp)
# shellcheck disable=SC2086  # $requirements is "-r FILE" pairs of repository file names
if ! "$venv/bin/python" -m pip install --no-index --find-links "$wheelhouse" -r env/requirements.txt $requirements \
    > "$log" 2>&1; then
  missing=$(sed -n 's/^ERROR: No matching distribution found for //p' "$log" | head -n 1)
  if [ -n "$missing" ]; then
    echo "docker build: docker/wheelhouse/ has no wheel for $missing; run docker/wheelhouse.sh${extras:+ $extras} and build again" >&2
  else
    cat "$log" >&2
  fi
  exit 1
fi
"$venv/bin/python" -m pip check
echo "installed $("$venv/bin/python" -m pip list --format=freeze | grep -c '') packages from the wheelhouse"
rm -f "$log"
