#!/usr/bin/env bash
# Start a private local Ray head for development (never touches other Ray processes).
#   cluster/start_local.sh [--num-cpus N] [--object-store-memory BYTES] [--record FILE]
# Then: eval "$(.venv/bin/python -m cluster.local env)"   # exports for `ray job ...` by hand, or
#       python -m cluster.jobs --head outputs/ray-local-head.json -- pipelines/X.py ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec "$PY" -m cluster.local start "$@"
