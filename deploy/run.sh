#!/usr/bin/env bash
# Set up (idempotent) and start the node on its embedded defaults:
# config/lungnode.toml, SQLite in var/, storage in var/storage, DICOM port 11112, AE LUNGNODE.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
exec .venv/bin/lungnode serve --config "${LUNGNODE_CONFIG:-config/lungnode.toml}" "$@"
