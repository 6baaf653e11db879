"""What the Python driver scenario programs share: their command line, the
transcript they print and a time limit per scenario.

A program is run as ``python <driver>_scenarios.py <host> <port> [<host2>
<port2>]``; host2:port2 is where a second session reads back what was
committed (another cluster node, or the same plain server). Environment:
``SCENARIO=<name>`` runs one scenario only.

The transcript is what tests/test_drivers.py compares between a plain
PostgreSQL 15 and a cluster node, line by line: ``== <scenario>`` headers,
then ``<step>: <result>`` or ``<step>: ERROR <SQLSTATE> <primary message>``.
Nothing that legitimately differs between the two may be printed (sequence
values, OIDs, pids, times).

A scenario that hangs (a proxy that never answers) must not take the others
with it: synchronous scenarios run in a daemon thread that is abandoned
after ``SCENARIO_TIMEOUT_S`` and muted, so that nothing it prints later
lands in another scenario's part of the transcript; asynchronous ones are
cancelled by ``asyncio.wait_for``. The program ends with ``os._exit`` so an
abandoned thread cannot keep it alive.
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading

SCENARIO_TIMEOUT_S = 20
NOTIFY_WAIT_S = 5

_local = threading.local()
_print_lock = threading.Lock()


class Target:
    def __init__(self, argv: list[str]):
        self.host = argv[1]
        self.port = int(argv[2])
        self.host2 = argv[3] if len(argv) > 3 else self.host
        self.port2 = int(argv[4]) if len(argv) > 4 else self.port

    def dsn(self, other: bool = False) -> str:
        host, port = (self.host2, self.port2) if other else (self.host, self.port)
        return f"host={host} port={port} user=postgres dbname=postgres"

    def url(self, scheme: str, other: bool = False) -> str:
        host, port = (self.host2, self.port2) if other else (self.host, self.port)
        return f"{scheme}://postgres@{host}:{port}/postgres"


TARGET = Target(sys.argv)


class _Scenario:
    def __init__(self, name: str):
        self.name = name
        self.muted = False
        self.step = "(setup)"


def out(line: str) -> None:
    sc = getattr(_local, "scenario", None)
    with _print_lock:
        if sc is not None and sc.muted:
            return
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def describe(e: BaseException) -> str:
    """``ERROR <SQLSTATE> <primary message>`` for a server error, whatever
    the driver (psycopg2, psycopg, asyncpg, or SQLAlchemy wrapping one)."""
    orig = getattr(e, "orig", None)            # sqlalchemy.exc.DBAPIError
    inner = orig if isinstance(orig, BaseException) else e
    state = getattr(inner, "sqlstate", None) or getattr(inner, "pgcode", None)
    diag = getattr(inner, "diag", None)
    msg = (getattr(diag, "message_primary", None) or getattr(inner, "message", None)
           or str(inner) or type(inner).__name__)
    msg = str(msg).splitlines()[0] if str(msg) else ""
    if state:
        prefix = f"{type(e).__name__} " if inner is not e else ""
        return f"{prefix}ERROR {state} {msg}"
    if type(e).__module__.startswith("sqlalchemy"):
        return type(e).__name__        # its message quotes the library's version-bound advice
    return f"{type(e).__name__} {msg}"


def show(value) -> str:
    """Rows as ``[(1, a), (2, b)]``, one-column rows as ``[1, 2]``, one row
    as ``(1, a)``."""
    if isinstance(value, list):
        items = []
        for row in value:
            if isinstance(row, (tuple, list)) or hasattr(row, "_fields") or _is_record(row):
                cells = [_cell(x) for x in tuple(row)]
                items.append(cells[0] if len(cells) == 1 else "(" + ", ".join(cells) + ")")
            else:
                items.append(_cell(row))
        return "[" + ", ".join(items) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(_cell(x) for x in value) + ")"
    return _cell(value)


def _is_record(row) -> bool:
    return type(row).__name__ == "Record"      # asyncpg.Record


def _cell(x) -> str:
    if x is None:
        return "NULL"
    if isinstance(x, bool):
        return "t" if x else "f"
    return str(x)


def step(what: str, fn):
    """Run one step; print its result (``ok`` for None) or its error."""
    sc = getattr(_local, "scenario", None)
    if sc is not None:
        sc.step = what
    try:
        r = fn()
    except Exception as e:      # noqa: BLE001 - the transcript records it
        out(f"{what}: {describe(e)}")
        return None
    out(f"{what}: {'ok' if r is None else show(r)}")
    return r


async def astep(what: str, coro):
    sc = getattr(_local, "scenario", None)
    if sc is not None:
        sc.step = what
    try:
        r = await coro
    except Exception as e:      # noqa: BLE001
        out(f"{what}: {describe(e)}")
        return None
    out(f"{what}: {'ok' if r is None else show(r)}")
    return r


def _selected(scenarios):
    only = os.environ.get("SCENARIO")
    return [(n, f) for n, f in scenarios if not only or n == only]


def run(scenarios) -> None:
    """Run synchronous scenarios, each in a thread with a time limit."""
    for name, fn in _selected(scenarios):
        sc = _Scenario(name)
        out(f"== {name}")

        def body(sc=sc, fn=fn):
            _local.scenario = sc
            try:
                fn()
            except Exception as e:      # noqa: BLE001
                out(f"scenario aborted in step {sc.step!r}: {describe(e)}")

        t = threading.Thread(target=body, daemon=True, name=name)
        t.start()
        t.join(SCENARIO_TIMEOUT_S)
        if t.is_alive():
            out(f"scenario aborted in step {sc.step!r}: TIMEOUT after {SCENARIO_TIMEOUT_S} s")
            with _print_lock:
                sc.muted = True
    _finish()


def run_async(scenarios, cleanup=None) -> None:
    """Run asynchronous scenarios, each cancelled past its time limit;
    ``cleanup()`` runs after each one (to drop what a cancelled one left
    open without waiting on it)."""
    async def main():
        for name, fn in _selected(scenarios):
            sc = _Scenario(name)
            _local.scenario = sc
            out(f"== {name}")
            try:
                await asyncio.wait_for(fn(), SCENARIO_TIMEOUT_S)
            except asyncio.TimeoutError:
                out(f"scenario aborted in step {sc.step!r}: TIMEOUT after {SCENARIO_TIMEOUT_S} s")
            except Exception as e:      # noqa: BLE001
                out(f"scenario aborted in step {sc.step!r}: {describe(e)}")
            if cleanup is not None:
                cleanup()
            _local.scenario = None
    asyncio.run(main())
    _finish()


def _finish() -> None:
    _local.scenario = None
    out("== done")
    os._exit(0)
