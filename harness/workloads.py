"""Workloads: client threads that drive a cluster and record a ``History``.

This module owns the bank and list-append workloads: their schemas, the SQL
each operation sends, and how an error becomes an outcome. Rules it keeps:

- Every client is one thread with its own connection (autocommit on, so the
  client sends BEGIN and COMMIT itself and knows whether COMMIT went out).
  It records the invocation before it sends anything (even before it
  connects) and exactly one completion afterwards.
- Outcomes (``classify_error``): an error before COMMIT was sent is ``fail``
  (the server rolls back a transaction whose session errs or dies before
  COMMIT); so is a connection that failed before anything was sent. While
  COMMIT is in flight only SQLSTATEs that mean "rolled back" are ``fail``
  (40001, 40P01, 40000, 23xxx, 0A000, 57P03) and everything else is
  ``info`` (unknown: 08xxx, 40003, 57P01, a lost connection, a timeout).
  After an ``info`` the client closes its connection and continues under a
  new process id, as Jepsen clients do.
- Nothing waits forever: connect_timeout (2 s), a server-side
  statement_timeout (10 s), and a client-side watchdog that shuts the
  socket of a statement that outlives statement_timeout + grace (a paused
  server, SIGSTOP, never fires its own timeout). Every loop ends by itself at
  ``duration_s`` or when ``stop`` is set, after its current operation.
- ``setup`` (re)creates a workload's tables through one node; ``final_state``
  reads what one node holds, for the checker, after heal.

Error codes: PostgreSQL 15 documentation, Appendix A "PostgreSQL Error Codes".
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import psycopg

from harness import checkers
from harness.history import History

ISOLATION_LEVELS = (None, "read committed", "repeatable read", "serializable")

# Errors that say the transaction is rolled back, even in answer to COMMIT:
# serialization failure, deadlock, transaction rollback, integrity
# violations (class 23), feature not supported, and "cannot connect now".
DEFINITE_FAIL_SQLSTATES = frozenset({"40001", "40P01", "40000", "0A000", "57P03"})
DEFINITE_FAIL_CLASSES = ("23",)


class RunError(RuntimeError):
    """A run ended by a harness bug; ``history`` holds what was recorded."""

    def __init__(self, message: str, history: History):
        super().__init__(f"{message} (history so far: {len(history)} records)")
        self.history = history


class DefiniteFailure(Exception):
    """Raised by a workload for an outcome it knows is not committed, e.g.
    COMMIT answered ROLLBACK, or an UPDATE that matched no row."""


def classify_error(exc: BaseException, commit_sent: bool) -> str:
    """``fail`` or ``info`` for an operation that raised ``exc`` (see the
    module docstring)."""
    if not commit_sent or isinstance(exc, DefiniteFailure):
        return "fail"
    state = getattr(exc, "sqlstate", None)
    if state and (state in DEFINITE_FAIL_SQLSTATES or state.startswith(DEFINITE_FAIL_CLASSES)):
        return "fail"
    return "info"


def describe_error(exc: BaseException) -> str:
    """``"SQLSTATE: first line of the message"``, or the exception's class
    name when there is no SQLSTATE (a lost connection)."""
    msg = (str(exc).strip().splitlines() or [""])[0]
    state = getattr(exc, "sqlstate", None)
    return f"{state}: {msg}" if state else f"{type(exc).__name__}: {msg}"


# -- client machinery -----------------------------------------------------------------

class _Slot:
    """What the watchdog knows of one client: its connection and the
    deadline of the statement in flight (None when idle)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: psycopg.Connection | None = None
        self.deadline: float | None = None
        self.timed_out = False


class _Session:
    """One operation on a connection: arms the watchdog per statement and
    remembers whether COMMIT was sent."""

    def __init__(self, slot: _Slot, conn: psycopg.Connection, timeout_s: float):
        self.slot = slot
        self.conn = conn
        self.timeout_s = timeout_s
        self.commit_sent = False

    def execute(self, sql: str, params: tuple | None = None) -> psycopg.Cursor:
        with self.slot.lock:
            self.slot.deadline = time.monotonic() + self.timeout_s
        try:
            return self.conn.execute(sql, params)
        finally:
            with self.slot.lock:
                self.slot.deadline = None

    def commit(self) -> None:
        self.commit_sent = True
        cur = self.execute("COMMIT")
        # PostgreSQL answers COMMIT of a failed transaction with ROLLBACK and
        # no error; mmproxy promises an error instead, but never trust that.
        if cur.statusmessage != "COMMIT":
            raise DefiniteFailure(f"COMMIT answered {cur.statusmessage}")


def _shutdown_socket(conn: psycopg.Connection) -> None:
    """Make a blocked read on ``conn`` return at once (EOF), from another
    thread. The fd stays open (only a duplicate is closed), so the client
    thread never touches a reused descriptor."""
    try:
        s = socket.socket(fileno=os.dup(conn.pgconn.socket))
    except (OSError, psycopg.Error):
        return
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.close()


# An operation: (generate value, execute value on a session -> completion value).
_Generate = Callable[[random.Random], Any]
_Execute = Callable[[_Session, Any], Any]


@dataclass
class _ClientSpec:
    node: int
    dsn: str
    f: str
    generate: _Generate
    execute: _Execute


class _Runner:
    """Runs client threads until ``duration_s`` passes or ``stop`` is set;
    the calling thread is the watchdog."""

    BACKOFF_MIN_S = 0.05
    BACKOFF_MAX_S = 1.0
    WATCHDOG_INTERVAL_S = 0.1

    def __init__(self, history: History, *, duration_s: float | None,
                 stop: threading.Event | None, connect_timeout_s: float,
                 statement_timeout_s: float, grace_s: float, application_name: str,
                 seed: int | None):
        if duration_s is None and stop is None:
            raise ValueError("give duration_s or stop (or both): a run must end by itself")
        self.history = history
        self.deadline = None if duration_s is None else time.monotonic() + duration_s
        self.stop = stop
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_s = statement_timeout_s
        self.grace_s = grace_s
        self.application_name = application_name
        self.seed = seed
        self._halt = threading.Event()     # set once: clients finish their op and leave
        # Process ids continue after those already in the history (a second
        # run into the same history); two runs into one history at once
        # would share ids, so do not do that.
        self._processes = itertools.count(max((op.process for op in history), default=-1) + 1)
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []

    def new_process(self) -> int:
        with self._lock:
            return next(self._processes)

    def _connect(self, dsn: str, slot: _Slot, timeout_s: float) -> psycopg.Connection:
        conn = psycopg.connect(dsn, autocommit=True,
                               connect_timeout=_whole_seconds(self.connect_timeout_s),
                               prepare_threshold=None, application_name=self.application_name)
        with slot.lock:
            slot.conn, slot.timed_out = conn, False
        # Under the watchdog already: the server may stop right after connecting.
        _Session(slot, conn, timeout_s).execute(
            f"SET statement_timeout = {int(self.statement_timeout_s * 1000)}")
        return conn

    def _client(self, spec: _ClientSpec, slot: _Slot, rng: random.Random) -> None:
        process = self.new_process()
        conn: psycopg.Connection | None = None
        backoff = self.BACKOFF_MIN_S
        timeout_s = self.statement_timeout_s + self.grace_s
        try:
            while not self._halt.is_set():
                value = spec.generate(rng)
                inv = self.history.invoke(process, spec.node, spec.f, value)
                session = None
                try:
                    if conn is None:
                        conn = self._connect(spec.dsn, slot, timeout_s)
                    session = _Session(slot, conn, timeout_s)
                    result = spec.execute(session, value)
                except (psycopg.Error, OSError, DefiniteFailure) as exc:
                    outcome = "fail" if session is None else classify_error(
                        exc, session.commit_sent)
                    error = describe_error(exc)
                    if slot.timed_out:
                        error = f"client timeout after {timeout_s:.1f}s: {error}"
                    self.history.complete(inv, outcome, error=error)
                    # Keep a connection only if it got through connecting and
                    # the outcome is known (Jepsen: a new process after info).
                    conn = self._recover(slot, conn if conn is not None else slot.conn,
                                         drop=session is None or outcome == "info")
                    if outcome == "info":
                        process = self.new_process()
                    if conn is None:
                        self._halt.wait(backoff * (0.5 + rng.random()))
                        backoff = min(backoff * 2, self.BACKOFF_MAX_S)
                except BaseException as exc:
                    # A harness bug: record it as unknown (it may have
                    # committed), stop this client and make run() raise.
                    self.history.complete(inv, "info", error=f"harness error: {exc!r}")
                    raise
                else:
                    self.history.complete(inv, "ok", result)
                    backoff = self.BACKOFF_MIN_S
        except BaseException as exc:
            with self._lock:
                self._errors.append(exc)
        finally:
            self._recover(slot, conn if conn is not None else slot.conn, True)

    def _recover(self, slot: _Slot, conn: psycopg.Connection | None,
                 drop: bool) -> psycopg.Connection | None:
        """After an error: keep a healthy connection (rolled back), else close it."""
        if conn is not None and not drop and not conn.closed and not conn.broken:
            if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                return conn
            try:
                _Session(slot, conn, self.statement_timeout_s + self.grace_s).execute("ROLLBACK")
                return conn
            except psycopg.Error:
                pass
        if conn is not None:
            with slot.lock:
                slot.conn = None
            try:
                conn.close()
            except psycopg.Error:
                pass
        return None

    def _watch(self, slots: list[_Slot]) -> None:
        now = time.monotonic()
        for slot in slots:
            with slot.lock:
                if slot.deadline is not None and now > slot.deadline and slot.conn is not None:
                    slot.timed_out = True
                    slot.deadline = None
                    _shutdown_socket(slot.conn)

    def run(self, specs: list[_ClientSpec]) -> History:
        slots = [_Slot() for _ in specs]
        base_seed = self.seed if self.seed is not None else random.randrange(2 ** 32)
        threads = [threading.Thread(target=self._client,
                                    args=(spec, slot, random.Random(base_seed + i)),
                                    name=f"{self.application_name}-{i}", daemon=True)
                   for i, (spec, slot) in enumerate(zip(specs, slots))]
        for t in threads:
            t.start()
        while not self._halt.is_set():
            if ((self.stop is not None and self.stop.is_set())
                    or (self.deadline is not None and time.monotonic() >= self.deadline)):
                self._halt.set()
                break
            self._watch(slots)
            time.sleep(self.WATCHDOG_INTERVAL_S)
        # Each client ends after its operation in flight: a transaction is at
        # most a handful of statements, each cut by the watchdog.
        limit = time.monotonic() + self.connect_timeout_s + 8 * (
            self.statement_timeout_s + self.grace_s) + 5
        while any(t.is_alive() for t in threads):
            if time.monotonic() > limit:
                raise RunError("client threads did not stop", self.history)
            self._watch(slots)
            for t in threads:
                t.join(self.WATCHDOG_INTERVAL_S / len(threads))
        if self._errors:
            raise RunError(f"a client failed: {self._errors[0]!r}",
                           self.history) from self._errors[0]
        return self.history


def _begin_sql(isolation: str | None) -> str:
    if isolation not in ISOLATION_LEVELS:
        raise ValueError(f"isolation {isolation!r} is not one of {ISOLATION_LEVELS}")
    return "BEGIN" if isolation is None else f"BEGIN ISOLATION LEVEL {isolation.upper()}"


@dataclass
class _Common:
    """Settings every workload has. ``run(dsns, duration_s=, stop=,
    history=)`` records into ``history`` when given (so a fault schedule can
    share its clock via ``History.now``; one run at a time), else into a new
    one."""

    statement_timeout_s: float = 10.0
    connect_timeout_s: float = 2.0
    # How long past statement_timeout the watchdog waits for the server's
    # own answer before cutting the socket.
    watchdog_grace_s: float = 2.0
    seed: int | None = None

    def _runner(self, history: History | None, duration_s: float | None,
                stop: threading.Event | None, name: str) -> _Runner:
        return _Runner(history if history is not None else History(), duration_s=duration_s,
                       stop=stop, connect_timeout_s=self.connect_timeout_s,
                       statement_timeout_s=self.statement_timeout_s,
                       grace_s=self.watchdog_grace_s, application_name=name, seed=self.seed)


def _whole_seconds(seconds: float) -> int:
    # libpq takes connect_timeout in whole seconds (and treats 1 as 2).
    return max(1, math.ceil(seconds))


ADMIN_TIMEOUT_S = 60.0


@contextlib.contextmanager
def _admin(dsn: str, connect_timeout_s: float) -> Iterator[psycopg.Connection]:
    """A connection for setup and final reads, cut after ADMIN_TIMEOUT_S in
    all (a paused node must not hang the harness)."""
    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=_whole_seconds(connect_timeout_s),
                           prepare_threshold=None, application_name="mmproxy-harness-admin")
    timer = threading.Timer(ADMIN_TIMEOUT_S, _shutdown_socket, (conn,))
    timer.daemon = True
    timer.start()
    try:
        with conn:
            conn.execute(f"SET statement_timeout = {int(ADMIN_TIMEOUT_S * 1000)}")
            yield conn
    finally:
        timer.cancel()


# -- bank -----------------------------------------------------------------------------

@dataclass
class BankWorkload(_Common):
    """Jepsen's bank: transfers between accounts keep the total; readers
    read all balances in one statement. ``bank_ledger`` has no primary key
    on purpose: a transfer applied twice shows as a duplicate row."""

    name = "bank"
    accounts: int = 20
    initial_balance: int = 1000
    max_transfer: int = 5
    transfer_clients_per_node: int = 2
    reader_clients_per_node: int = 1
    isolation: str | None = None

    @property
    def total(self) -> int:
        return self.accounts * self.initial_balance

    def params(self) -> dict:
        return {"n_accounts": self.accounts, "total": self.total}

    def setup(self, dsn: str) -> None:
        self._ids = None
        with _admin(dsn, self.connect_timeout_s) as conn:
            conn.execute("DROP TABLE IF EXISTS bank_accounts, bank_ledger")
            conn.execute("CREATE TABLE bank_accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
            conn.execute("CREATE TABLE bank_ledger (transfer_id text NOT NULL, "
                         "from_id int NOT NULL, to_id int NOT NULL, amount int NOT NULL)")
            conn.execute("INSERT INTO bank_accounts (id, balance) "
                         "SELECT g, %s FROM generate_series(0, %s) g",
                         (self.initial_balance, self.accounts - 1))

    def run(self, dsns: dict[int, str], *, duration_s: float | None = None,
            stop: threading.Event | None = None, history: History | None = None) -> History:
        begin = _begin_sql(self.isolation)
        # One counter per workload (not per run): several runs into one
        # history, as a fault campaign does, must not reuse transfer ids.
        if getattr(self, "_ids", None) is None:
            self._ids = itertools.count()
        ids = self._ids
        ids_lock = threading.Lock()

        def gen_transfer(rng: random.Random) -> dict:
            a, b = rng.sample(range(self.accounts), 2)
            with ids_lock:
                n = next(ids)
            return {"id": f"t{n}", "from": a, "to": b,
                    "amount": rng.randint(1, self.max_transfer)}

        def transfer(s: _Session, v: dict) -> dict:
            s.execute(begin)
            # Lower id first: two transfers on one node never wait on each
            # other in a cycle, so the node's deadlock detector (1 s) stays idle.
            for acct in sorted((v["from"], v["to"])):
                sign = "-" if acct == v["from"] else "+"
                cur = s.execute(f"UPDATE bank_accounts SET balance = balance {sign} %s "
                                "WHERE id = %s", (v["amount"], acct))
                if cur.rowcount != 1:
                    raise DefiniteFailure(f"UPDATE of account {acct} matched {cur.rowcount} rows")
            s.execute("INSERT INTO bank_ledger (transfer_id, from_id, to_id, amount) "
                      "VALUES (%s, %s, %s, %s)", (v["id"], v["from"], v["to"], v["amount"]))
            s.commit()
            return v

        def read(s: _Session, _v: Any) -> dict:
            rows = s.execute("SELECT id, balance FROM bank_accounts").fetchall()
            return {int(i): b for i, b in rows}

        specs = []
        for node, dsn in sorted(dsns.items()):
            specs += [_ClientSpec(node, dsn, "transfer", gen_transfer, transfer)
                      for _ in range(self.transfer_clients_per_node)]
            specs += [_ClientSpec(node, dsn, "read", lambda rng: None, read)
                      for _ in range(self.reader_clients_per_node)]
        return self._runner(history, duration_s, stop, "mmproxy-harness-bank").run(specs)

    def final_state(self, dsn: str) -> dict:
        """``{"accounts": {id: balance}, "ledger": [[transfer_id, from, to,
        amount], ...]}`` as this node holds them."""
        with _admin(dsn, self.connect_timeout_s) as conn:
            accounts = conn.execute("SELECT id, balance FROM bank_accounts ORDER BY id").fetchall()
            ledger = conn.execute("SELECT transfer_id, from_id, to_id, amount FROM bank_ledger "
                                  "ORDER BY transfer_id, from_id, to_id, amount").fetchall()
        return {"accounts": {int(i): b for i, b in accounts},
                "ledger": [list(r) for r in ledger]}

    def check(self, history: History, final_states: dict[int, dict] | None = None,
              **kw) -> checkers.Result:
        return checkers.check_bank(history, final_states, n_accounts=self.accounts,
                                   total=self.total, **kw)


# -- list-append ------------------------------------------------------------------------

class _KeyPool:
    """The keys transactions pick from: ``key_count`` active keys; after
    ``max_writes_per_key`` appends a key retires and a fresh one takes its
    place (Elle's wr-txns does the same), so lists, reads and the checker's
    work stay small however long the run. Elements come from one counter:
    unique per key, as the checker requires."""

    def __init__(self, key_count: int, max_writes_per_key: int | None):
        self.lock = threading.Lock()
        self.active = list(range(key_count))
        self.next_key = key_count
        self.writes = dict.fromkeys(self.active, 0)
        self.max_writes = max_writes_per_key
        self.elements = itertools.count(1)

    def txn(self, rng: random.Random, min_len: int, max_len: int,
            read_fraction: float) -> list[list]:
        mops = []
        with self.lock:
            for _ in range(rng.randint(min_len, max_len)):
                slot = rng.randrange(len(self.active))
                k = self.active[slot]
                if rng.random() < read_fraction:
                    mops.append(["r", k, None])
                    continue
                mops.append(["append", k, next(self.elements)])
                self.writes[k] += 1
                if self.max_writes is not None and self.writes[k] >= self.max_writes:
                    self.active[slot] = self.next_key
                    self.writes[self.next_key] = 0
                    self.next_key += 1
        return mops


@dataclass
class AppendWorkload(_Common):
    """Elle's list-append, as jepsen-io/postgres's append workload: each
    transaction is 1-4 micro-ops ``["append", k, e]`` / ``["r", k, None]``;
    key k lives in table ``append{k % 3}`` as comma-separated text."""

    name = "append"
    clients_per_node: int = 3
    key_count: int = 10
    max_writes_per_key: int | None = 64
    min_txn_length: int = 1
    max_txn_length: int = 4
    read_fraction: float = 0.5
    isolation: str | None = None
    tables: int = 3

    def params(self) -> dict:
        return {"isolation": self.isolation}

    def table(self, key: int) -> str:
        return f"append{key % self.tables}"

    def setup(self, dsn: str) -> None:
        self._pool = None
        with _admin(dsn, self.connect_timeout_s) as conn:
            names = ", ".join(f"append{i}" for i in range(self.tables))
            conn.execute(f"DROP TABLE IF EXISTS {names}")
            for i in range(self.tables):
                conn.execute(f"CREATE TABLE append{i} (id int PRIMARY KEY, val text NOT NULL)")

    def run(self, dsns: dict[int, str], *, duration_s: float | None = None,
            stop: threading.Event | None = None, history: History | None = None) -> History:
        begin = _begin_sql(self.isolation)
        # One key pool per workload (not per run): elements must stay unique
        # across several runs into one history, and keys keep their lists.
        if getattr(self, "_pool", None) is None:
            self._pool = _KeyPool(self.key_count, self.max_writes_per_key)
        pool = self._pool

        def gen(rng: random.Random) -> list[list]:
            return pool.txn(rng, self.min_txn_length, self.max_txn_length, self.read_fraction)

        def txn(s: _Session, mops: list[list]) -> list[list]:
            s.execute(begin)
            out = []
            for f, k, e in mops:
                if f == "r":
                    row = s.execute(f"SELECT val FROM {self.table(k)} WHERE id = %s",
                                    (k,)).fetchone()
                    out.append(["r", k, _parse_list(row[0]) if row else []])
                else:
                    s.execute(f"INSERT INTO {self.table(k)} AS t (id, val) VALUES (%s, %s) "
                              "ON CONFLICT (id) DO UPDATE SET val = t.val || ',' || excluded.val",
                              (k, str(e)))
                    out.append(["append", k, e])
            s.commit()
            return out

        specs = [_ClientSpec(node, dsn, "txn", gen, txn)
                 for node, dsn in sorted(dsns.items()) for _ in range(self.clients_per_node)]
        return self._runner(history, duration_s, stop, "mmproxy-harness-append").run(specs)

    def final_state(self, dsn: str) -> dict:
        """``{"lists": {key: [elements]}}``: every key this node holds."""
        union = " UNION ALL ".join(f"SELECT id, val FROM append{i}" for i in range(self.tables))
        with _admin(dsn, self.connect_timeout_s) as conn:
            rows = conn.execute(f"SELECT id, val FROM ({union}) a ORDER BY id").fetchall()
        return {"lists": {int(k): _parse_list(v) for k, v in rows}}

    def check(self, history: History, final_states: dict[int, dict] | None = None,
              **kw) -> checkers.Result:
        return checkers.check_list_append(history, final_states, **kw)


def _parse_list(val: str) -> list[int]:
    return [int(x) for x in val.split(",")] if val else []


WORKLOADS: dict[str, type] = {"bank": BankWorkload, "append": AppendWorkload}

__all__ = ["AppendWorkload", "BankWorkload", "DefiniteFailure", "ISOLATION_LEVELS", "RunError",
           "WORKLOADS", "classify_error", "describe_error"]
