#!/usr/bin/env bash
# Run the whole test suite against real PostgreSQL 15 servers it starts.
# Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh test
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
