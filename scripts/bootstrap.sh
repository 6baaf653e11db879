#!/usr/bin/env bash
# Shared set-up for scripts/demo.sh and scripts/test.sh: makes sure the
# PostgreSQL 15 binaries are there and that .venv holds mmproxy and what it
# needs. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
PG_BIN="${MMPROXY_PG_BIN:-/usr/lib/postgresql/15/bin}"

if [ ! -x "$PG_BIN/postgres" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "PostgreSQL 15 not found: installing it with apt-get ..." >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null
        # we start our own servers; the distribution's default one is not needed
        (command -v pg_ctlcluster >/dev/null && pg_ctlcluster 15 main stop) 2>/dev/null || true
    else
        echo "PostgreSQL 15 server binaries are missing ($PG_BIN/postgres)." >&2
        echo "Install them: sudo apt-get install postgresql-15 (Debian/Ubuntu)," >&2
        echo "or set MMPROXY_PG_BIN to the directory that holds initdb, pg_ctl and postgres." >&2
        exit 1
    fi
fi
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    # PostgreSQL refuses to run as root: servers run as this user.
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=".venv/.installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "installing mmproxy${extras:+ with [$extras]} into .venv (log: .venv/install.log) ..." >&2
    if ! .venv/bin/python -m pip install -e ".${extras:+[$extras]}" > .venv/install.log 2>&1; then
        tail -n 30 .venv/install.log >&2
        echo "pip install failed; the whole log is in .venv/install.log" >&2
        exit 1
    fi
    .venv/bin/python -c "import proxy, uvloop, psycopg, structlog, pglast"
    touch "$stamp"
fi
