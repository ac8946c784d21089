#!/usr/bin/env bash
# Stop ONLY the head started by cluster/start_local.sh (found by its record), delete its temp dir.
#   cluster/stop_local.sh [--record FILE] [--keep-logs]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec "$PY" -m cluster.local stop "$@"
