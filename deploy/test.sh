#!/usr/bin/env bash
# Set up everything the tests need (idempotent) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh --dev
# the PostgreSQL server the database tests use (127.0.0.1:5432, trust auth, database test)
if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432; then
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
fi
# the code checks first: lint (whole repository) and static types (the packages)
.venv/bin/ruff check .
.venv/bin/mypy model node training
export TCP_NODELAY=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
