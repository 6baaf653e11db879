#!/usr/bin/env bash
# Start a local mmproxy cluster on real PostgreSQL 15 servers (3 nodes by
# default). Arguments go to `mmproxy demo` (see --help). Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/mmproxy demo "$@"
