"""One client session of the proxy as a pure state machine (no I/O).

The asyncio shell (``proxy.server``) feeds it the bytes each side sends and
carries out what it returns. The rules it keeps:

- Phases run STARTUP -> CONNECTING -> AUTH -> READY [-> DRAINING] -> CLOSED,
  never back.
- A protocol violation is answered like PostgreSQL answers it: the complete
  messages before the bad bytes are still executed and answered (DRAINING),
  then the client gets FATAL 08P01 and the connection is closed.
- ``client_bytes``/``server_bytes`` return the bytes to forward to the other
  side (or ``None``); anything else the session wants done is appended to
  ``effects`` and must be carried out by the shell *after* writing the
  returned bytes, in order.
- Authentication is relayed end to end: the proxy never learns a password.
  A client may send a 'p' message only after an authentication request that
  asks for one; any other message during authentication, or a 'p' after it,
  is a protocol violation (08P01), as in PostgreSQL's own postgres.c.
- The proxy hands the client its own cancel secret (and the backend's real
  pid, so ``pg_backend_pid()`` and the client's idea of its pid agree); the
  shell maps it to the backend's secret.
- The proxy injects its own ErrorResponse towards the client only at a
  message boundary of the server->client stream; otherwise it just closes.
- Statement boundaries and the transaction state are known at every moment:
  ``txn_status`` (ReadyForQuery I/T/E) and ``pending_syncs`` (Query or Sync
  messages sent whose ReadyForQuery has not come back). These are the hook
  points commit interception is built on.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

from replication.commit import USER_GID_SEP

from . import intercept, wire
from .wire import Framer, Message, ProtocolViolation

# SQLSTATEs the proxy itself raises (PostgreSQL Appendix A).
PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"
FEATURE_NOT_SUPPORTED = "0A000"
ADMIN_SHUTDOWN = "57P01"
CANNOT_CONNECT_NOW = "57P03"
QUERY_CANCELED = "57014"


class Phase(enum.Enum):
    STARTUP = "startup"          # waiting for SSLRequest / StartupMessage
    CONNECTING = "connecting"    # backend connection being opened
    AUTH = "auth"                # relaying authentication
    READY = "ready"              # relaying queries
    DRAINING = "draining"        # after a protocol violation: relaying the
                                 # answers to what was forwarded, then FATAL
    CLOSED = "closed"


# --- effects the shell carries out ------------------------------------------

@dataclass(frozen=True)
class SendClient:
    data: bytes


@dataclass(frozen=True)
class SendServer:
    data: bytes


@dataclass(frozen=True)
class StartTLS:
    """Write b"S" to the client, then run the TLS handshake as the server."""


@dataclass(frozen=True)
class ConnectBackend:
    startup: wire.StartupMessage


@dataclass(frozen=True)
class CancelQuery:
    """A CancelRequest arrived: find the session holding (pid, secret) and
    cancel its backend query."""
    pid: int
    secret: int


@dataclass(frozen=True)
class RegisterCancelKey:
    pid: int
    proxy_secret: int
    backend_secret: int


@dataclass(frozen=True)
class RunCommit:
    """``gid`` is prepared on the local node: run the cluster commit
    protocol and call ``Session.commit_outcome`` with the result. With
    ``hold`` (the client's own PREPARE TRANSACTION) the protocol stops once
    every node has prepared it."""
    gid: str
    hold: bool = False


@dataclass(frozen=True)
class RunRelease:
    """The client's COMMIT/ROLLBACK PREPARED of the cluster gid ``gid``:
    have it finished everywhere and call ``Session.commit_outcome`` (with
    committed = the outcome)."""
    gid: str
    commit: bool


@dataclass(frozen=True)
class Close:
    """Close both connections. ``reason`` is logged; ``sqlstate`` is set
    when the close is due to an error the proxy raised or relayed."""
    reason: str
    sqlstate: str | None = None


# Backend messages inspected while authenticating / while relaying.
_AUTH_SERVER_INSPECT = frozenset(b"RKESZv")
# ReadyForQuery is peeked (status byte read in place), errors and parameter
# changes are inspected whole; everything else streams through.
_READY_SERVER_INSPECT = frozenset(b"ES")
_READY_SERVER_PEEK = frozenset(b"Z")
_TXN_STATUS = {ord("I"): b"I", ord("T"): b"T", ord("E"): b"E"}
# Frontend: only 'X' (Terminate) is looked at whole; Query and Sync are
# counted as they pass (their bodies may be up to 1 GB and are streamed).
_READY_CLIENT_INSPECT = frozenset(b"X")
_READY_CLIENT_ALLOWED = frozenset(b"BCdcfDEHFPQSX")
_Z, _E, _S, _K, _R, _X = (ord(c) for c in "ZESKRX")
_Q, _SYNC, _F = ord("Q"), ord("S"), ord("F")
_P, _B, _EXEC, _FLUSH = ord("P"), ord("B"), ord("E"), ord("H")
# In cluster mode every statement cycle is looked at: simple Query, and the
# extended-protocol messages that say which statement runs (Parse, Bind,
# Execute) and where a cycle ends (Sync, Flush).
# Everything but COPY data is inspected, so a raw run is always COPY data.
_CLUSTER_CLIENT_INSPECT = frozenset(b"QPBESHXDCF")
_DESCRIBE, _CLOSE = ord("D"), ord("C")
_STMT_CACHE_MAX = 10000


def _truthy(v: str) -> bool:
    return v.lower() in ("true", "on", "yes", "1", "database")


class Session:
    """The pure core of one proxied client connection."""

    __slots__ = (
        "phase", "tls_available", "tls_active", "proxy_secret", "startup",
        "effects", "txn_status", "pending_syncs", "shutting_down",
        "backend_pid", "backend_secret", "server_params", "last_fatal",
        "_startup_framer", "_cf", "_sf", "_awaiting_password", "_auth_ok", "_queued", "_counted",
        "_drain_error", "_zseen", "cluster", "next_gid", "_flow", "_held", "_batch",
        "_batch_plans", "_stmts", "_portals", "_plan_cache", "_uses_temp", "wounded",
        "_wound_cancel", "wound_seq", "_wound_answer")

    def __init__(self, *, tls_available: bool, proxy_secret: int):
        self.phase = Phase.STARTUP
        self.tls_available = tls_available
        self.tls_active = False
        self.proxy_secret = proxy_secret
        self.startup: wire.StartupMessage | None = None
        self.effects: list = []
        self.txn_status = b"I"
        self.pending_syncs = 0
        self.shutting_down = False
        self.backend_pid: int | None = None
        self.backend_secret: int | None = None
        self.server_params: dict[str, str] = {}
        self.last_fatal: wire.ErrorResponse | None = None
        self._startup_framer = wire.StartupFramer()
        self._cf = Framer((ord("p"),), frontend=True, allowed=(ord("p"),),
                          max_inspect_len=wire.MAX_SMALL_MESSAGE_LEN)
        self._sf = Framer(_AUTH_SERVER_INSPECT, frontend=False)
        self._awaiting_password = False
        self._auth_ok = False
        self._queued = b""
        self._counted = 0          # self._cf.boundaries already added to pending_syncs
        self._drain_error = ""
        self._zseen = 0            # self._sf.peeked already applied
        self.cluster = False       # commits go through the cluster protocol
        self.next_gid: Callable[[], str] | None = None
        self._flow: _Flow | None = None
        self._held = b""           # client bytes held while a flow runs
        self._batch: list | None = None   # extended-protocol messages up to Sync
        self._batch_plans: list = []
        self._stmts: dict[str, object] = {}     # prepared statement -> Plan
        self._portals: dict[str, str] = {}      # portal -> statement
        self._plan_cache: dict[str, object] = {}
        self._uses_temp = False    # this session created temporary objects
        # Set by wound-wait: this session's transaction holds a lock an
        # older cluster transaction needs. The message the client gets.
        self.wounded: str | None = None
        # The message of a wound whose cancel request may still be on its
        # way: a cancel can land after the statement it was meant for, so
        # the next 57014 is the wound's, whichever statement it hits.
        self._wound_cancel: str | None = None
        self.wound_seq = 0
        # The 40001 owed to the client after a wound failed its transaction
        # on the backend while it sat idle in it (see ``wound``): the client
        # has not heard of it yet.
        self._wound_answer: bytes | None = None

    # -- helpers -------------------------------------------------------------

    def _fail(self, sqlstate: str, message: str, *, hint: str | None = None,
              severity: str = "FATAL") -> None:
        """Tell the client (if the stream to it is at a boundary) and close."""
        if self.phase is Phase.CLOSED:
            return
        if self._sf.at_boundary:
            self.effects.append(SendClient(wire.error_response(
                sqlstate, message, severity=severity, hint=hint)))
        self.effects.append(Close(message, sqlstate))
        self.phase = Phase.CLOSED

    @property
    def idle(self) -> bool:
        """Outside any transaction with nothing in flight: a safe point to
        end the session without losing work."""
        return (self.phase is Phase.READY and self.txn_status == b"I"
                and self.pending_syncs == 0 and self._cf.at_boundary
                and self._sf.at_boundary)

    def _ready_client_framer(self) -> Framer:
        if self.cluster:
            inspect, count = _CLUSTER_CLIENT_INSPECT, ()
        else:
            inspect, count = _READY_CLIENT_INSPECT, (_Q, _SYNC, _F)
        return Framer(inspect, frontend=True, allowed=_READY_CLIENT_ALLOWED,
                      max_inspect_len=wire.MAX_MESSAGE_LEN, count=count)

    def set_cluster(self, on: bool, next_gid: Callable[[], str] | None = None) -> None:
        """Turn commit interception on: from now on every Query is looked at
        (intercept.classify) and writes go through the commit protocol."""
        self.cluster = on
        self.next_gid = next_gid
        if self._auth_ok:
            self._cf = self._ready_client_framer().carry_from(self._cf)
            self._counted = 0

    # -- client side ---------------------------------------------------------

    def client_bytes(self, data: bytes) -> bytes | None:
        """Bytes from the client. Returns what to send to the backend."""
        phase = self.phase
        if self._flow is not None and phase is Phase.READY:
            return self._flow_client_bytes(data)
        try:
            if phase is Phase.READY or (phase is Phase.AUTH and self._auth_ok):
                # Hot path, inlined: complete messages, none inspected. (After
                # AuthenticationOk a client may pipeline queries before the
                # server's ReadyForQuery, so AUTH takes this path too.)
                cf = self._cf
                items = cf.feed(data)
                if cf.boundaries != self._counted:
                    self.pending_syncs += cf.boundaries - self._counted
                    self._counted = cf.boundaries
                if len(items) == 1 and items[0].__class__ is not Message:
                    return items[0]
                return self._client_ready_items(items)
            if phase is Phase.AUTH:
                return self._client_auth(data)
            if phase is Phase.STARTUP:
                self._client_startup(data)
                return None
            if phase is Phase.DRAINING:
                return None  # PostgreSQL would never read past the bad bytes
            if phase is Phase.CONNECTING:
                # libpq waits for the server before speaking; hold anything
                # a client pipelines (bounded by the startup packet limit).
                if len(self._queued) + len(data) > wire.MAX_STARTUP_PACKET_LEN:
                    raise ProtocolViolation("unexpected data before authentication")
                self._queued += data
            return None
        except ProtocolViolation as e:
            before = [it.raw if it.__class__ is Message else it for it in e.before]
            if before and (phase is Phase.READY or self._auth_ok):
                self.pending_syncs += self._cf.boundaries - self._counted
                self._counted = self._cf.boundaries
                if self.pending_syncs and phase is Phase.READY:
                    self.phase = Phase.DRAINING
                    self._drain_error = str(e)
                else:
                    self._fail(PROTOCOL_VIOLATION, str(e))
                return b"".join(before)
            self._fail(PROTOCOL_VIOLATION, str(e))
            return None

    def _client_ready_items(self, items: list) -> bytes | None:
        out = []
        for i, it in enumerate(items):
            if it.__class__ is not Message:
                if self._batch is not None:
                    self._batch.append(it)
                else:
                    out.append(it)
                continue
            t = it.type
            if t == _Q:
                fwd = self._on_query(it, items[i + 1:])
                if fwd is None:
                    break           # a flow took over; the rest is held
                out.append(fwd)
            elif t in (_P, _B, _EXEC):
                self._batch_add(it)
            elif t == _DESCRIBE or t == _CLOSE:
                if self._batch is None:
                    self._batch = []
                self._batch.append(it.raw)
            elif t == _F:
                self.pending_syncs += 1     # FunctionCall ends with ReadyForQuery
                out.append(it.raw)
            elif t == _SYNC:
                if self._batch is None:
                    self._batch = []
                self._batch.append(it.raw)
                fwd = self._on_batch(items[i + 1:])
                if fwd is None:
                    break
                out.append(fwd)
            elif t == _FLUSH:
                # The client wants answers before its Sync: send what we
                # have (a write in it is stopped by the commit guard at Sync
                # if it was not inside a transaction).
                if self._batch:
                    out.extend(self._batch)
                self._batch = None
                self._batch_plans = []
                out.append(it.raw)
            else:
                # Terminate: forward it, then close both sides.
                out.append(it.raw)
                self.effects.append(Close("client terminated"))
                self.phase = Phase.CLOSED
                break
        return b"".join(out) if out else None

    def _client_auth(self, data: bytes) -> bytes | None:
        out = []
        for it in self._cf.feed(data):
            if it.__class__ is not Message:
                # Only 'p' is allowed and it is inspected, so a raw run can
                # only be the start of one: still incomplete.
                raise ProtocolViolation("unexpected data during authentication")
            if not self._awaiting_password:
                raise ProtocolViolation(
                    "unexpected password message: the server did not ask for one")
            self._awaiting_password = False
            out.append(it.raw)
        return b"".join(out) if out else None

    def _client_startup(self, data: bytes) -> None:
        packet, rest = self._startup_framer.feed(data)
        if packet is None:
            return
        msg = wire.decode_startup_packet(packet)
        if isinstance(msg, wire.SSLRequest) or isinstance(msg, wire.GSSENCRequest):
            if rest:
                # Bytes sent before the TLS handshake would be trusted as if
                # encrypted (CVE-2021-23214): refuse them.
                raise ProtocolViolation("received unencrypted data after SSL request")
            if isinstance(msg, wire.SSLRequest) and self.tls_available and not self.tls_active:
                self.effects.append(StartTLS())
                self.tls_active = True
            else:
                self.effects.append(SendClient(b"N"))
            return
        if isinstance(msg, wire.CancelRequest):
            self.effects.append(CancelQuery(msg.pid, msg.secret))
            self.effects.append(Close("cancel request"))
            self.phase = Phase.CLOSED
            return
        assert isinstance(msg, wire.StartupMessage)
        if msg.get("user") is None:
            self._fail("28000", "no PostgreSQL user name specified in startup packet")
            return
        repl = msg.get("replication")
        if repl is not None and _truthy(repl):
            self._fail(FEATURE_NOT_SUPPORTED,
                       "replication connections are not accepted through mmproxy",
                       hint="Connect to the PostgreSQL server directly for "
                            "replication, base backups and pg_receivewal.")
            return
        self.startup = msg
        self.phase = Phase.CONNECTING
        self._queued = rest
        self.effects.append(ConnectBackend(msg))

    # -- backend connection lifecycle ------------------------------------------

    def backend_connected(self) -> bytes | None:
        """The backend connection is open: returns the startup packet to send
        (with anything the client pipelined after it)."""
        if self.phase is not Phase.CONNECTING:
            return None
        assert self.startup is not None
        self.phase = Phase.AUTH
        first = self.startup.encode()
        queued, self._queued = self._queued, b""
        if queued:
            more = self._client_auth_or_fail(queued)
            if more:
                first += more
        return first

    def _client_auth_or_fail(self, data: bytes) -> bytes | None:
        try:
            return self._client_auth(data)
        except ProtocolViolation as e:
            self._fail(PROTOCOL_VIOLATION, str(e))
            return None

    def not_ready(self, message: str, hint: str) -> None:
        """The node cannot serve sessions now (starting, or its PostgreSQL
        is being recovered): FATAL 57P03, as PostgreSQL answers while it
        starts up."""
        self._fail(CANNOT_CONNECT_NOW, message, hint=hint)

    def backend_connect_failed(self, where: str, error: str) -> None:
        self._fail(CONNECTION_FAILURE,
                   f"mmproxy could not connect to its local PostgreSQL server at {where}: {error}",
                   hint="Check that the local PostgreSQL server is running and "
                        "that [postgres] in the mmproxy configuration points at it.")

    def server_closed(self) -> None:
        """The backend connection ended."""
        if self.phase is Phase.CLOSED:
            return
        if self.last_fatal is not None:
            # PostgreSQL said why (e.g. 57P01 on shutdown, 28P01 bad
            # password); the client already has that message.
            self.effects.append(Close(self.last_fatal.message, self.last_fatal.sqlstate))
            self.phase = Phase.CLOSED
            return
        self._fail(CONNECTION_FAILURE,
                   "mmproxy lost the connection to its local PostgreSQL server",
                   hint="The server process may have crashed or been terminated; "
                        "see the PostgreSQL log. Reconnect to retry.")

    def startup_timed_out(self) -> None:
        """The client did not finish startup/authentication in time."""
        if self.phase in (Phase.STARTUP, Phase.CONNECTING, Phase.AUTH):
            self._fail(QUERY_CANCELED, "canceling authentication due to timeout",
                       hint="The client did not complete its startup and authentication "
                            "within [timeouts] client_startup_timeout_ms.")

    def client_closed(self) -> None:
        if self.phase is not Phase.CLOSED:
            self.effects.append(Close("client disconnected"))
            self.phase = Phase.CLOSED

    # -- server side ---------------------------------------------------------

    def server_bytes(self, data: bytes) -> bytes | None:
        """Bytes from the backend. Returns what to send to the client."""
        sf = self._sf
        try:
            items = sf.feed(data)
        except ProtocolViolation as e:
            self._fail(PROTOCOL_VIOLATION, f"invalid data from PostgreSQL: {e}")
            return None
        phase = self.phase
        if phase is not Phase.READY and phase is not Phase.DRAINING:
            if phase is Phase.AUTH:
                return self._server_auth(items)
            return None  # closed: drop
        if self._flow is not None and self._flow.final != "deferred":
            return self._flow_server(items)
        if sf.peeked != self._zseen:
            # ReadyForQuery seen: a statement cycle ended.
            done = sf.peeked - self._zseen
            self._zseen = sf.peeked
            self.pending_syncs = max(0, self.pending_syncs - done)
            self.txn_status = _TXN_STATUS.get(sf.last_peek, self.txn_status)
            if self._wound_answer is not None and self.txn_status != b"E":
                self._wound_answer = None   # rolled back (to a savepoint) by the client
            if phase is Phase.DRAINING or self.shutting_down:
                return self._after_cycle(items)
            if self._flow is not None and self.pending_syncs == 0:
                out = self._join_ready(items) if len(items) > 1 or items[0].__class__ is \
                    Message else items[0]
                self._resume_deferred()
                return out
        if len(items) == 1 and items[0].__class__ is not Message:
            return items[0]
        return self._join_ready(items)

    def wound(self, message: str) -> bool:
        """Wound-wait: end this session's transaction with 40001. Returns
        True when a statement is running (the shell then cancels it, and
        calls ``wound_cancel_settled(wound_seq)`` once a late cancel can no
        longer arrive; the cancel's 57014 is rewritten). While a cancel is
        in flight no second one is asked for; once it has settled, a
        session still wounded and still running (the cancel landed between
        statements, and the next one blocks) is cancelled again.

        A session idle in its transaction is failed on the backend at once
        (a statement of the proxy's own raises the 40001 there), so its
        locks go now rather than when the client next speaks; the client
        gets the 40001 as the answer to its next statement (see
        ``_wound_answer``). Otherwise (a commit flow is running, or a
        batch is half sent) the next statement fails."""
        if self.phase is not Phase.READY or self.txn_status != b"T":
            return False
        if self._flow is not None and self._flow.final == "wound_idle":
            return False
        if self.wounded is None and self._idle_in_transaction():
            self._flow = _Flow(raw=b"", plan=None, steps=[("own", intercept.wound_sql(message))],
                               final="wound_idle")
            self._sf = Framer(_ALL_BACKEND, frontend=False).carry_from(self._sf)
            self._flow_advance()
            return False
        if self.wounded is None:
            self.wounded = message
        if self.pending_syncs > 0 and self._wound_cancel is None:
            self._wound_cancel = self.wounded
            self.wound_seq += 1
            return True
        return False

    @property
    def is_wounded(self) -> bool:
        """A wound is pending or its 40001 is still owed to the client."""
        return (self.wounded is not None or self._wound_answer is not None
                or (self._flow is not None and self._flow.final == "wound_idle"))

    def _idle_in_transaction(self) -> bool:
        return (self.cluster and self._flow is None and self.pending_syncs == 0
                and self._batch is None and not self._held and self._cf.at_boundary
                and self._sf.at_boundary)

    def wound_cancel_settled(self, seq: int) -> None:
        if seq == self.wound_seq:
            self._wound_cancel = None

    def _rewrite_wound(self, m: Message) -> bytes:
        """A cancel we sent for wound-wait reaches the client as 40001.
        (A cancel can land after the statement it was meant for, and a
        protocol CancelRequest signals the backend's process group too, so
        one cancel can end a statement with two 57014 errors: every 57014
        until the cancel has settled is the wound's.)"""
        if b"C57014\0" in m.body and (self.wounded or self._wound_cancel):
            msg = self.wounded or self._wound_cancel
            self.wounded = None
            return wire.error_response(intercept.SERIALIZATION_FAILURE, msg)
        if self._wound_answer is not None and b"C25P02\0" in m.body:
            # "current transaction is aborted": the client's first word
            # since the wound failed its transaction; it gets the wound's.
            answer, self._wound_answer = self._wound_answer, None
            return answer
        return m.raw

    def _join_ready(self, items: list) -> bytes:
        out = []
        for it in items:
            if it.__class__ is Message:
                if it.type == _E:
                    self._note_error(it)
                    out.append(self._rewrite_wound(it))
                    continue
                else:
                    ps = it.decode(frontend=False)
                    self.server_params[ps.name] = ps.value
                out.append(it.raw)
            else:
                out.append(it)
        return b"".join(out)

    def _after_cycle(self, items: list) -> bytes:
        """A statement cycle ended while draining or shutting down: end the
        session here if nothing else is in flight."""
        out = [self._join_ready(items)]
        if self.phase is Phase.DRAINING:
            if self.pending_syncs == 0 and self._sf.at_boundary:
                out.append(wire.error_response(PROTOCOL_VIOLATION, self._drain_error,
                                               severity="FATAL"))
                self.effects.append(Close(self._drain_error, PROTOCOL_VIOLATION))
                self.phase = Phase.CLOSED
        elif self.idle:
            self._end_for_shutdown(out)
        return b"".join(out)

    def _note_error(self, m: Message) -> None:
        err = m.decode(frontend=False)
        if err.severity in ("FATAL", "PANIC"):
            self.last_fatal = err

    def _server_auth(self, items: list) -> bytes | None:
        out = []
        for it in items:
            if it.__class__ is not Message:
                out.append(it)
                continue
            t = it.type
            if t == _R:
                auth = it.decode(frontend=False)
                self._awaiting_password = auth.code in wire.AUTH_NEEDS_RESPONSE
                if auth.code == wire.AUTH_OK:
                    # From here on the client may send queries (it may
                    # pipeline them before the server's ReadyForQuery).
                    self._auth_ok = True
                    self._cf = self._ready_client_framer().carry_from(self._cf)
                    self._counted = 0
                out.append(it.raw)
            elif t == _K:
                key = it.decode(frontend=False)
                self.backend_pid, self.backend_secret = key.pid, key.secret
                self.effects.append(RegisterCancelKey(key.pid, self.proxy_secret, key.secret))
                out.append(wire.BackendKeyData(key.pid, self.proxy_secret).encode())
            elif t == _Z:
                self.txn_status = it.body
                out.append(it.raw)
                self.phase = Phase.READY
                self._sf = Framer(_READY_SERVER_INSPECT, frontend=False,
                                  peek=_READY_SERVER_PEEK).carry_from(self._sf)
                self._zseen = 0
            else:
                if t == _E:
                    self._note_error(it)
                elif t == _S:
                    ps = it.decode(frontend=False)
                    self.server_params[ps.name] = ps.value
                out.append(it.raw)
        return b"".join(out) if out else None


    # -- cluster commit interception (simple protocol) ---------------------------
    #
    # A flow runs the proxy's own statements on the session's backend around
    # the client's Query: BEGIN (+ DDL capture), the client's Query, the
    # xid check, PREPARE TRANSACTION, then RunCommit; the client sees only
    # the answers to its own Query and one ReadyForQuery at the end. While
    # a flow runs, client bytes are held (COPY data of the client's own
    # Query excepted) and replayed when it ends.

    def _plan(self, sql: str):
        plan = self._plan_cache.get(sql)
        if plan is None:
            if len(self._plan_cache) >= _STMT_CACHE_MAX:
                self._plan_cache.clear()
            plan = self._plan_cache[sql] = intercept.classify(sql)
        return plan

    def _batch_add(self, m: Message) -> None:
        if self._batch is None:
            self._batch = []
        self._batch.append(m.raw)
        msg = m.decode(frontend=True)
        if m.type == _P:
            if len(self._stmts) >= _STMT_CACHE_MAX:
                self._stmts.clear()
            self._stmts[msg.name] = self._plan(msg.sql)
        elif m.type == _B:
            self._portals[msg.portal] = msg.statement
        else:
            plan = self._stmts.get(self._portals.get(msg.portal, ""))
            # A statement prepared before cluster mode began is unknown:
            # treat it as a possible write.
            self._batch_plans.append(plan or intercept.Plan(intercept.WRAP))

    def _on_batch(self, rest: list) -> bytes | None:
        raw = b"".join(self._batch)
        plans, self._batch, self._batch_plans = self._batch_plans, None, []
        return self._intercept(raw, intercept.combine(plans), None, rest, extended=True)

    def _on_query(self, m: Message, rest: list) -> bytes | None:
        """A client Query in cluster mode: forward it (returns its bytes) or
        start a flow (returns None; ``rest`` is held)."""
        sql = m.body[:-1].decode("utf-8", "replace")
        return self._intercept(m.raw, self._plan(sql), sql, rest, extended=False)

    def _intercept(self, raw: bytes, plan, sql: str | None, rest: list, *,
                   extended: bool) -> bytes | None:
        status = self.txn_status
        kind = plan.kind
        steps: list = []
        final = ""
        if self._wound_answer is not None and status == b"E" and kind in (
                intercept.COMMIT, intercept.USER_PREPARE):
            # PostgreSQL would answer COMMIT / PREPARE TRANSACTION of a
            # failed transaction with a plain "ROLLBACK": the client, who
            # has not heard of the wound yet, gets its 40001 instead.
            final = "refuse"
        elif self.wounded is not None and status == b"T":
            # Wounded while idle in its transaction: fail the transaction on
            # the backend for real (so a later COMMIT becomes ROLLBACK) and
            # answer this statement with the 40001.
            msg, self.wounded = self.wounded, None
            steps = [("own", intercept.wound_sql(msg))]
            final = "wound"
        elif kind == intercept.REFUSE:
            final = "refuse"
        elif plan.temp:
            # Temporary objects stay on this node and PostgreSQL cannot
            # PREPARE a transaction that used them: run the DDL past the DDL
            # guard without shipping it, and commit plainly.
            self._uses_temp = True
            if status == b"I":
                steps = [("own", "BEGIN; SET LOCAL mtm.capture = 'on'"), ("client",),
                         ("own", "COMMIT")]
                final = "wrap"
            elif status == b"T":
                steps, final = [("own", "SET LOCAL mtm.capture = 'on'"), ("client",)], "relay"
            else:
                self.pending_syncs += 1
                return raw
        elif kind == intercept.COMMIT and status == b"T":
            steps, final = [("xid",)], ("xcommit" if extended else "commit")
        elif kind == intercept.USER_PREPARE and status == b"T":
            steps, final = [("xid",)], "uprepare"
        elif kind == intercept.USER_FINISH and status == b"I":
            steps, final = [("lookup",)], "ufinish"
        elif kind == intercept.WRAP and status == b"I":
            first = "BEGIN"
            if plan.ddl:
                first += "; " + self._capture(plan, sql)
            steps = [("own", first), ("client",)]
            if plan.makes_rows:
                steps.append(("own", intercept.DDL_END_SQL))
            steps.append(("xid",))
            final = "wrap"
        elif kind == intercept.WRAP and status == b"T" and plan.ddl:
            steps = [("own", self._capture(plan, sql)), ("client",)]
            if plan.makes_rows:
                steps.append(("own", intercept.DDL_END_SQL))
            final = "relay"
        else:
            self.pending_syncs += 1
            return raw
        if self.pending_syncs or not self._sf.at_boundary:
            # Answers to earlier cycles are still coming: hold this one and
            # everything after it until they are in.
            self._held += raw
            self._hold_from(None, rest)
            self._flow = _Flow(raw=raw, plan=None, steps=[], final="deferred")
            return None
        self._hold_from(None, rest)
        if final == "refuse":
            if self._wound_answer is not None and status == b"E":
                err, self._wound_answer = self._wound_answer, None
            else:
                err = wire.error_response(FEATURE_NOT_SUPPORTED, plan.reason)
            self.effects.append(SendClient(
                err + wire.ReadyForQuery(b"E" if status != b"I" else b"I").encode()))
            if status != b"I":
                self.txn_status = b"E"
            self._release_held()
            return None
        self._flow = _Flow(raw=raw, plan=plan, steps=steps, final=final)
        self._sf = Framer(_ALL_BACKEND, frontend=False).carry_from(self._sf)
        self._flow_advance()
        return None

    @staticmethod
    def _capture(plan, sql: str | None) -> str:
        if sql is None:
            # DDL through the extended protocol: the statement text is in
            # the Parse message; ship it as the DDL guard's refusal would
            # otherwise stop it.
            sql = plan.sql
        return intercept.capture_sql(sql, plan.makes_rows, plan.drop, plan.staged, plan.rels)

    def _hold_from(self, m: Message | None, rest: list) -> None:
        parts = [m.raw] if m is not None else []
        parts += [it.raw if it.__class__ is Message else it for it in rest]
        self._held += b"".join(parts)

    def _flow_client_bytes(self, data: bytes) -> bytes | None:
        f = self._flow
        if f.step == ("client",) and not self._held:
            # COPY FROM STDIN of the client's own statement: raw runs are
            # COPY data (every other type is inspected in cluster mode) and
            # pass; the first other message and all after it are held.
            try:
                items = self._cf.feed(data)
            except ProtocolViolation as e:
                self._fail(PROTOCOL_VIOLATION, str(e))
                return None
            out = []
            for i, it in enumerate(items):
                if it.__class__ is Message:
                    self._hold_from(it, items[i + 1:])
                    break
                out.append(it)
            return b"".join(out) if out else None
        if len(self._held) + len(data) > wire.MAX_MESSAGE_LEN:
            self._fail(PROTOCOL_VIOLATION, "too much data pipelined during a commit")
            return None
        self._held += data
        return None

    def _flow_advance(self) -> None:
        f = self._flow
        if not f.steps:
            self._flow_finish(f.pending_error)
            return
        f.step = step = f.steps.pop(0)
        f.rows = []
        f.error = None
        if step[0] == "own":
            self.effects.append(SendServer(wire.Query(step[1]).encode()))
        elif step[0] == "client":
            self.effects.append(SendServer(f.raw))
        elif step[0] == "xid":
            self.effects.append(SendServer(wire.Query(
                intercept.COMMIT_CHECK_SQL[self._uses_temp]).encode()))
        elif step[0] == "prepare":
            f.gid = self.next_gid()
            if f.final == "uprepare":
                f.gid += USER_GID_SEP + f.plan.gid
            self.effects.append(SendServer(wire.Query(intercept.prepare_sql(f.gid)).encode()))
        elif step[0] == "lookup":
            self.effects.append(SendServer(wire.Query(
                intercept.user_gid_lookup_sql(f.plan.gid)).encode()))

    def _flow_server(self, items: list) -> bytes | None:
        """Backend messages while a flow runs (every type inspected)."""
        f = self._flow
        out = []
        for it in items:
            if self._flow is not f:     # the flow ended mid-read: relay the rest
                out.append(it.raw if it.__class__ is Message else it)
                continue
            t = it.type
            if f.step == ("client",):
                if t == _Z:
                    self._flow_step_done(it.body)
                elif t == ord("N") and f.quiet_commit and b"C25P01\0" in it.body:
                    pass            # "there is no transaction in progress"
                elif t == _E:
                    self._note_error(it)
                    out.append(self._rewrite_wound(it))
                else:
                    out.append(it.raw)
                continue
            if t == _Z:
                self._flow_step_done(it.body)
            elif t == _E:
                self._note_error(it)
                f.error = self._rewrite_wound(it)
            elif t == ord("D"):
                f.rows.append(it.decode(frontend=False).values)
            elif t in (ord("N"), ord("A"), _S):
                out.append(it.raw)  # notices, notifications, parameter changes: the client's
        return b"".join(out) if out else None

    def _flow_step_done(self, status: bytes) -> None:
        f = self._flow
        step = f.step
        self.txn_status = status
        if f.final == "wound_idle":
            # The client is not waiting for anything: it hears of this at
            # its next statement.
            self._wound_answer = f.error
            self._flow_finish(None, tell_client=False)
            return
        if f.error is not None and step[0] != "client" and f.final != "wound":
            # One of our own statements failed: the client gets its error,
            # and a transaction the proxy opened is rolled back first.
            if f.final == "wrap" and status != b"I" and f.pending_error is None:
                f.pending_error = f.error
                f.steps = [("own", "ROLLBACK")]
                self._flow_advance()
                return
            self._flow_finish(f.pending_error or f.error)
            return
        if f.final == "wound":
            self._flow_finish(f.error)
            return
        if step[0] == "client" and status == b"E":
            if f.final == "wrap":
                f.steps = [("own", "ROLLBACK")]
            else:
                f.steps = []
        elif step[0] == "xid":
            row = f.rows[0] if f.rows else (b"f", b"f", b"f", b"f")
            wrote, used_temp, for_peers, ddl_shipped = (v == b"t" for v in row)
            if f.final == "uprepare":
                if for_peers and not used_temp:
                    f.steps = [("prepare",)]
                else:   # nothing for the peers: PostgreSQL prepares it here
                    f.steps, f.final = [("client",)], "relay"
            elif wrote and used_temp and ddl_shipped:
                # Cannot be prepared, and committed here only its DDL would
                # reach the peers outside the protocol: refused.
                f.pending_error = wire.error_response(
                    FEATURE_NOT_SUPPORTED,
                    "a transaction that used temporary tables cannot also change the schema "
                    "of replicated objects; it was rolled back",
                    hint="Run the DDL in a transaction of its own.")
                f.steps, f.final = [("own", "ROLLBACK")], "refused"
            elif wrote and used_temp:
                # Cannot be prepared: commit it here only. The commit guard
                # refuses it if it also wrote replicated tables.
                if f.final in ("commit", "xcommit"):
                    f.steps = [("own", "SET LOCAL mtm.temp_commit = 'on'"), ("client",)]
                    f.final = "relay"
                else:
                    f.steps = [("own", intercept.TEMP_COMMIT_SQL)]
            elif for_peers:
                f.steps = [("prepare",)]
            elif f.final in ("commit", "xcommit"):
                f.steps = [("client",)]      # nothing to replicate: plain COMMIT
                f.final = "relay"
            else:
                f.steps = [("own", "COMMIT")]
        elif step[0] == "prepare":
            self.effects.append(RunCommit(f.gid, hold=f.final == "uprepare"))
            f.step = ("outcome",)
            return
        elif step[0] == "lookup":
            if f.rows and f.rows[0][0]:
                f.gid = f.rows[0][0].decode()
                self.effects.append(RunRelease(f.gid, f.plan.commit))
                f.step = ("outcome",)
                return
            f.steps, f.final = [("client",)], "relay"   # not the cluster's: PostgreSQL's
        self._flow_advance()

    def commit_outcome(self, committed: bool, sqlstate: str = "", message: str = "",
                       warning: str = "") -> None:
        """The cluster decided the flow's transaction. ``warning``: it is
        committed, but some node did not confirm it in time (sent to the
        client as a WARNING notice before the COMMIT tag)."""
        f = self._flow
        if f is None or f.step != ("outcome",) or self.phase is not Phase.READY:
            return
        if committed and warning:
            self.effects.append(SendClient(wire.error_response(
                "01000", warning, severity="WARNING", notice=True)))
        self.txn_status = b"I"
        if f.final == "uprepare":
            self._flow_finish(wire.CommandComplete("PREPARE TRANSACTION").encode() if committed
                              else wire.error_response(sqlstate or "40000", message))
        elif f.final == "ufinish":
            if committed == f.plan.commit:
                self._flow_finish(wire.CommandComplete(
                    "COMMIT PREPARED" if committed else "ROLLBACK PREPARED").encode())
            else:
                self._flow_finish(wire.error_response(sqlstate or "40000", message))
        elif committed and f.final == "xcommit":
            # Let PostgreSQL answer the client's own extended-protocol COMMIT
            # (ParseComplete, BindComplete, CommandComplete, in the order the
            # client asked for them); it only adds a "no transaction in
            # progress" warning, which is dropped.
            f.steps = [("client",)]
            f.final = "relay"
            f.quiet_commit = True
            self._flow_advance()
        elif committed:
            self._flow_finish(wire.CommandComplete("COMMIT").encode()
                              if f.final == "commit" else b"")
        else:
            self._flow_finish(wire.error_response(sqlstate, message))

    def _flow_finish(self, extra: bytes | None, *, tell_client: bool = True) -> None:
        """End the flow: tell the client, restore relaying, replay held bytes."""
        self._flow = None
        self._sf = Framer(_READY_SERVER_INSPECT, frontend=False,
                          peek=_READY_SERVER_PEEK).carry_from(self._sf)
        self._zseen = 0
        if tell_client:
            # (With final "relay" and no extra, the client's own statement
            # was answered but for its ReadyForQuery, held back until now.)
            self.effects.append(SendClient(
                (extra or b"") + wire.ReadyForQuery(self.txn_status).encode()))
        self._release_held()

    def _release_held(self) -> None:
        held, self._held = self._held, b""
        if held and self.phase is Phase.READY:
            out = self.client_bytes(held)
            if out:
                self.effects.append(SendServer(out))

    def _resume_deferred(self) -> None:
        """Answers to earlier messages are in: run the held Query now."""
        self._flow = None
        self._release_held()

    # -- shutdown --------------------------------------------------------------

    def request_shutdown(self) -> None:
        """The proxy is stopping: end this session at its next idle point."""
        self.shutting_down = True
        if self.phase in (Phase.STARTUP, Phase.CONNECTING):
            self._fail(ADMIN_SHUTDOWN, "terminating connection because mmproxy is shutting down")
        elif self.idle:
            self._end_for_shutdown(None)

    def terminate_now(self) -> None:
        """The shutdown grace period is over: end the session wherever it is."""
        self._fail(ADMIN_SHUTDOWN,
                   "terminating connection because mmproxy is shutting down",
                   hint="The shutdown grace period ran out; the open transaction was rolled back.")

    def _end_for_shutdown(self, out: list | None) -> None:
        err = wire.error_response(ADMIN_SHUTDOWN,
                                  "terminating connection because mmproxy is shutting down",
                                  severity="FATAL")
        if out is not None:
            out.append(err)
        else:
            self.effects.append(SendClient(err))
        self.effects.append(SendServer(wire.Terminate().encode()))
        self.effects.append(Close("shutdown", ADMIN_SHUTDOWN))
        self.phase = Phase.CLOSED


_ALL_BACKEND = frozenset(t[0] for t in wire.BACKEND_TYPES)


@dataclass
class _Flow:
    """A commit-interception flow in progress (see Session._on_query)."""
    raw: bytes                       # the client's Query message
    plan: object
    steps: list
    final: str                       # "commit" | "wrap" | "relay" | "deferred"
    step: tuple | None = None
    rows: list = field(default_factory=list)
    error: bytes | None = None
    gid: str | None = None
    pending_error: bytes | None = None
    quiet_commit: bool = False

