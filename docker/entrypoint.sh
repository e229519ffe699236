#!/bin/sh
# The image's entry point: checks the mounted folders before the command (and TensorFlow) starts, each problem one
# line naming the host folder and the fix, then runs the command.
set -eu

me="uid $(id -u), gid $(id -g)"
fail() {
  echo "medq container: $*" >&2
  exit 2
}

if [ "$(id -u)" = 0 ]; then
  fail "runs as root, so the files it writes into the host folders would be root's; set MEDQ_UID/MEDQ_GID to your ids (id -u, id -g)"
fi

# check_folder VARIABLE FOLDER HOST_FOLDER NEEDS_WRITE: FOLDER must exist and be readable; when NEEDS_WRITE is
# "write" (or "write-unless-ro": unless it is mounted read-only) also writable by the container's user.
check_folder() {
  variable=$1 folder=$2 host=$3 needs=$4
  where="$folder ($variable)"
  [ -z "$host" ] || where="host folder $host ($variable, mounted at $folder)"
  [ -d "$folder" ] || fail "$variable=$folder does not exist in the container; mount the host folder there"
  [ -r "$folder" ] && [ -x "$folder" ] || fail "$where is not readable by $me; chmod/chown the host folder, or set MEDQ_UID/MEDQ_GID to its owner (ls -ln)"
  [ "$needs" != none ] || return 0
  if [ "$needs" = write-unless-ro ] && mount_options "$folder" | grep -qw ro; then
    return 0
  fi
  fix="chown -R $(id -u):$(id -g) the host folder, or set MEDQ_UID/MEDQ_GID to its owner (ls -ln)"
  [ "$needs" != write-unless-ro ] || fix="$fix, or mount it read-only if medq only reads a dataset there"
  [ -w "$folder" ] || fail "$where is not writable by $me; $fix"
}

# mount_options FOLDER: the options of the mount at FOLDER (empty when it is no mount point)
mount_options() {
  awk -v target="$1" '$5 == target { options = $6 } END { print options }' /proc/self/mountinfo | tr ',' ' '
}

check_folder OUTPUT_DIR "$OUTPUT_DIR" "${MEDQ_HOST_OUTPUT_DIR:-}" write
# Phantoms are generated into DATA_DIR; a dataset medq only reads can be mounted read-only.
check_folder DATA_DIR "$DATA_DIR" "${MEDQ_HOST_DATA_DIR:-}" write-unless-ro
check_folder MODELS_DIR "$MODELS_DIR" "${MEDQ_HOST_MODELS_DIR:-}" none

exec "$@"
