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
from dataclasses import dataclass

from . import wire
from .wire import Framer, Message, ProtocolViolation

# SQLSTATEs the proxy itself raises (PostgreSQL Appendix A).
PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"
FEATURE_NOT_SUPPORTED = "0A000"
ADMIN_SHUTDOWN = "57P01"
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
_Q, _SYNC = ord("Q"), ord("S")


def _truthy(v: str) -> bool:
    return v.lower() in ("true", "on", "yes", "1", "database")


class Session:
    """The pure core of one proxied client connection."""

    __slots__ = (
        "phase", "tls_available", "tls_active", "proxy_secret", "startup",
        "effects", "txn_status", "pending_syncs", "shutting_down",
        "backend_pid", "backend_secret", "server_params", "last_fatal",
        "_startup_framer", "_cf", "_sf", "_awaiting_password", "_auth_ok", "_queued", "_counted",
        "_drain_error", "_zseen")

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

    # -- client side ---------------------------------------------------------

    def client_bytes(self, data: bytes) -> bytes | None:
        """Bytes from the client. Returns what to send to the backend."""
        phase = self.phase
        try:
            if phase is Phase.READY:
                # Hot path, inlined: complete messages, none inspected.
                cf = self._cf
                items = cf.feed(data)
                if cf.boundaries != self._counted:
                    self.pending_syncs += cf.boundaries - self._counted
                    self._counted = cf.boundaries
                if len(items) == 1 and items[0].__class__ is not Message:
                    return items[0]
                return self._client_ready_items(items)
            if phase is Phase.AUTH:
                if self._auth_ok:
                    return self._client_ready(data)
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

    def _client_ready(self, data: bytes) -> bytes | None:
        cf = self._cf
        items = cf.feed(data)
        self.pending_syncs += cf.boundaries - self._counted
        self._counted = cf.boundaries
        if len(items) == 1 and items[0].__class__ is not Message:
            return items[0]
        return self._client_ready_items(items)

    def _client_ready_items(self, items: list) -> bytes | None:
        out = []
        for it in items:
            if it.__class__ is Message:
                # Terminate: forward it, then close both sides.
                out.append(it.raw)
                self.effects.append(Close("client terminated"))
                self.phase = Phase.CLOSED
                break
            out.append(it)
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

    def _join_ready(self, items: list) -> bytes:
        out = []
        for it in items:
            if it.__class__ is Message:
                if it.type == _E:
                    self._note_error(it)
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
                    self._cf = Framer(_READY_CLIENT_INSPECT, frontend=True,
                                      allowed=_READY_CLIENT_ALLOWED, max_inspect_len=4,
                                      count=(_Q, _SYNC)).carry_from(self._cf)
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

