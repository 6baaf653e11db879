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
from .clusterpath import ClusterPath
from .wire import Framer, Message, ProtocolViolation

# SQLSTATEs the proxy itself raises (PostgreSQL Appendix A).
PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"
FEATURE_NOT_SUPPORTED = "0A000"
ADMIN_SHUTDOWN = "57P01"
CANNOT_CONNECT_NOW = "57P03"
# Sessions with this application_name may read and administer a node that is
# not ONLINE (mmts's convention).
ADMIN_APP = "mtm_admin"
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
        "_drain_error", "_zseen", "cluster", "next_gid", "token", "cp", "wounded", "gate",
        "_wound_cancel", "wound_seq", "wound_answer")

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
        # Cluster mode: returns why this node may not serve clients now
        # (not ONLINE, no read lease), else None. None for mtm_admin sessions.
        self.gate: Callable[[], str | None] | None = None
        self.token: str | None = None
        self.cp: ClusterPath | None = None      # the cluster path (proxy/clusterpath.py)
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
        self.wound_answer: bytes | None = None

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
        if self.cp is not None:
            return (self.phase is Phase.READY and self.cp.idle and self._cf.at_boundary
                    and self._sf.at_boundary)
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

    def set_cluster(self, on: bool, next_gid: Callable[[], str] | None = None,
                    token: str | None = None,
                    gate: Callable[[], str | None] | None = None) -> None:
        """Turn commit interception on: from now on every client message
        goes through the cluster path (proxy/clusterpath.py) and writes go
        through the commit protocol. ``token`` is the node's secret, which
        the mtm functions that only the proxy may call require."""
        self.cluster = on
        self.next_gid = next_gid
        self.token = token
        self.gate = gate
        if on and self.cp is None:
            self.cp = ClusterPath(self)
            self.cp.blk = {b"I": "I", b"T": "T", b"E": "E"}[self.txn_status]
        if self._auth_ok:
            self._cf = self._ready_client_framer().carry_from(self._cf)
            self._counted = 0
            if self.phase is Phase.READY and on:
                self.set_server_framer(False)

    def not_serving(self) -> str | None:
        """Why the node may not serve this session's statements now, or
        None (always None for an ``mtm_admin`` session)."""
        if self.gate is None or (self.startup is not None
                                 and self.startup.get("application_name") == ADMIN_APP):
            return None
        return self.gate()

    def set_server_framer(self, all_types: bool) -> None:
        """Cluster mode: every backend message but DataRow and CopyData is
        inspected (every answer is attributed to what caused it); while the
        proxy's own statements run, everything is."""
        self._sf = Framer(_ALL_BACKEND if all_types else _CLUSTER_SERVER_INSPECT,
                          frontend=False).carry_from(self._sf)

    # -- client side ---------------------------------------------------------

    def client_bytes(self, data: bytes) -> bytes | None:
        """Bytes from the client. Returns what to send to the backend."""
        phase = self.phase
        if self.cp is not None and phase is Phase.READY:
            try:
                items = self._cf.feed(data)
            except ProtocolViolation as e:
                self.cp.drain_error = str(e)
                return self.cp.on_client(list(e.before))
            return self.cp.on_client(items)
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
        for it in items:
            if it.__class__ is not Message:
                out.append(it)
                continue
            # Terminate (the only type inspected outside cluster mode):
            # forward it, then close both sides.
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
                out = self._server_auth(items)
                if self.phase is Phase.READY and self.cp is not None:
                    self.set_server_framer(False)
                return out
            return None  # closed: drop
        if self.cp is not None and phase is Phase.READY:
            return self.cp.on_server(items)
        if sf.peeked != self._zseen:
            # ReadyForQuery seen: a statement cycle ended.
            done = sf.peeked - self._zseen
            self._zseen = sf.peeked
            self.pending_syncs = max(0, self.pending_syncs - done)
            self.txn_status = _TXN_STATUS.get(sf.last_peek, self.txn_status)
            if phase is Phase.DRAINING or self.shutting_down:
                return self._after_cycle(items)
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
        ``wound_answer``). Otherwise (a commit is running, or the client
        has messages in flight) the next statement fails."""
        cp = self.cp
        if self.phase is not Phase.READY or cp is None or cp.blk not in ("T", "W"):
            return False
        if cp.wounding:
            return False
        if self.wounded is None and cp.idle_in_transaction() and self._cf.at_boundary \
                and self._sf.at_boundary:
            cp.wound_idle(message)
            return False
        if self.wounded is None:
            self.wounded = message
        if cp.running_statement() and self._wound_cancel is None:
            self._wound_cancel = self.wounded
            self.wound_seq += 1
            return True
        return False

    @property
    def is_wounded(self) -> bool:
        """A wound is pending or its 40001 is still owed to the client."""
        return (self.wounded is not None or self.wound_answer is not None
                or (self.cp is not None and self.cp.wounding))

    def wound_cancel_settled(self, seq: int) -> None:
        if seq == self.wound_seq:
            self._wound_cancel = None

    def take_wound(self) -> str:
        msg, self.wounded = self.wounded, None
        return msg

    def take_wound_answer(self) -> bytes:
        err, self.wound_answer = self.wound_answer, None
        return err

    def set_wound_answer(self, err: bytes) -> None:
        self.wound_answer = err

    def rewrite_error(self, m: Message) -> bytes:
        """A cancel we sent for wound-wait reaches the client as 40001.
        (A cancel can land after the statement it was meant for, and a
        protocol CancelRequest signals the backend's process group too, so
        one cancel can end a statement with two 57014 errors: every 57014
        until the cancel has settled is the wound's.)"""
        if b"C57014\0" in m.body and (self.wounded or self._wound_cancel):
            msg = self.wounded or self._wound_cancel
            self.wounded = None
            return wire.error_response(intercept.SERIALIZATION_FAILURE, msg)
        if self.wound_answer is not None and b"C25P02\0" in m.body:
            # "current transaction is aborted": the client's first word
            # since the wound failed its transaction; it gets the wound's.
            return self.take_wound_answer()
        return m.raw

    _rewrite_wound = rewrite_error

    def ready_seen(self, status: bytes) -> None:
        if self.wound_answer is not None and status != b"E":
            self.wound_answer = None      # rolled back (to a savepoint) by the client

    def after_cycle(self, out: list) -> None:
        """Cluster mode: a ReadyForQuery reached the client; end the session
        here if it is shutting down and nothing else is in flight."""
        if self.shutting_down and self.cp is not None and self.cp.prog is None \
                and not self.cp.inq and len(self.cp.trk.pending) == 0 \
                and self.txn_status == b"I":
            self._end_for_shutdown(out)

    def note_error(self, m: Message) -> None:
        self._note_error(m)

    def client_terminated(self) -> None:
        self.effects.append(Close("client terminated"))
        self.phase = Phase.CLOSED

    def drain_done(self, error: str) -> None:
        """A protocol violation, and every message before it answered."""
        self._fail(PROTOCOL_VIOLATION, error)

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


    def commit_outcome(self, committed: bool, sqlstate: str = "", message: str = "",
                       warning: str = "") -> None:
        """The cluster decided the transaction the cluster path is
        committing (RunCommit / RunRelease). ``warning``: it is committed,
        but some node did not confirm it in time."""
        if self.cp is not None and self.phase is Phase.READY:
            self.cp.commit_outcome(committed, sqlstate, message, warning)

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
# cluster mode: every backend message but DataRow and CopyData
_CLUSTER_SERVER_INSPECT = _ALL_BACKEND - frozenset(b"Dd")
