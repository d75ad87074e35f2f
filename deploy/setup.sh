#!/usr/bin/env bash
# Set up lungnode on this machine: system packages (when missing), a virtual
# environment in .venv with the package and its pinned dependencies, and the
# database schema of the default configuration.  Safe to run again.
#   deploy/setup.sh          # the node
#   deploy/setup.sh --dev    # the node plus test tools (Orthanc, DCMTK, dicom3tools, pytest) and lungmask
#   deploy/setup.sh --lungmask  # the node plus the optional learned lung segmenter (lungmask)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DEV=0
LUNGMASK=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1; LUNGMASK=1 ;;
    --lungmask) LUNGMASK=1 ;;
    *) echo "unknown option $arg (use --dev and/or --lungmask)" >&2; exit 2 ;;
  esac
done

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  echo "need root for: $*" >&2; return 1; fi; }

missing=()
if [ "$DEV" -eq 1 ]; then
  command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
  command -v storescu >/dev/null || missing+=(dcmtk)
  command -v dciodvfy >/dev/null || missing+=(dicom3tools)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  as_root apt-get update -q
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q "${missing[@]}"
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# reinstall only when the project's dependencies changed
stamp=.venv/.lungnode-installed
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)-$DEV-$LUNGMASK
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  extras=()
  [ "$DEV" -eq 1 ] && extras+=(dev)
  [ "$LUNGMASK" -eq 1 ] && extras+=(lungmask)
  if [ ${#extras[@]} -gt 0 ]; then
    .venv/bin/python -m pip install -q -e ".[$(IFS=,; echo "${extras[*]}")]"
  else
    .venv/bin/python -m pip install -q -e .
  fi
  echo "$want" > "$stamp"
fi
.venv/bin/lungnode db upgrade >/dev/null
echo "lungnode set up in $ROOT/.venv"
