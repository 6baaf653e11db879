"""PostgreSQL frontend/backend protocol 3.0: a pure codec (no I/O).

What this module owns:
- one frozen dataclass per message type of both directions, with
  ``encode() -> bytes`` and a decoder table per direction, so every message
  round-trips (PostgreSQL docs, "Message Formats", 55.7);
- ``Framer``: a streaming splitter that cuts a byte stream into messages.
  Types the caller asks to *inspect* are delivered whole as ``Message``;
  every other message is passed through as runs of raw bytes, so a 1 GB
  DataRow or CopyData never sits in memory whole: the proxy forwards bytes
  as they arrive and only remembers how many bytes of the current message
  are still to come.

Rules kept here:
- Lengths are checked against PostgreSQL's own limits: 1 GB for any message
  (PQ_LARGE_MESSAGE_LIMIT), 10,000 bytes for small frontend messages and
  for the startup packet (PQ_SMALL_MESSAGE_LIMIT, MAX_STARTUP_PACKET_LENGTH).
  A violation raises ``ProtocolViolation`` carrying SQLSTATE 08P01.
- Nothing here touches sockets, clocks or randomness.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

# Limits from src/include/libpq/libpq.h and postmaster.c (PostgreSQL 15).
MAX_MESSAGE_LEN = 0x3FFFFFFF          # PQ_LARGE_MESSAGE_LIMIT: 1 GB - 1
MAX_SMALL_MESSAGE_LEN = 10000         # PQ_SMALL_MESSAGE_LIMIT
MAX_STARTUP_PACKET_LEN = 10000        # MAX_STARTUP_PACKET_LENGTH

PROTOCOL_3_0 = 196608                 # (3 << 16) | 0
SSL_REQUEST_CODE = 80877103           # (1234 << 16) | 5679
GSSENC_REQUEST_CODE = 80877104        # (1234 << 16) | 5680
CANCEL_REQUEST_CODE = 80877102        # (1234 << 16) | 5678

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I16 = struct.Struct("!h")
_HDR = struct.Struct("!cI")
_unpack_u32 = _U32.unpack_from


class ProtocolViolation(Exception):
    """Bytes that break the protocol. The proxy answers ErrorResponse 08P01
    and closes that one connection."""

    sqlstate = "08P01"

    def __init__(self, message: str):
        super().__init__(message)
        # Set by ``Framer.feed``: the complete messages that came before the
        # bad bytes in the same read (PostgreSQL would have run them).
        self.before: list = []


# ---------------------------------------------------------------------------
# Low-level readers/writers
# ---------------------------------------------------------------------------

class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes):
        self.buf = bytes(buf)
        self.pos = 0

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise ProtocolViolation("message body is shorter than its fields")

    def int32(self) -> int:
        self._need(4)
        v = _I32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return v

    def int16(self) -> int:
        self._need(2)
        v = _I16.unpack_from(self.buf, self.pos)[0]
        self.pos += 2
        return v

    def byte(self) -> int:
        self._need(1)
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def bytes_(self, n: int) -> bytes:
        if n < 0:
            raise ProtocolViolation("negative length")
        self._need(n)
        v = self.buf[self.pos:self.pos + n]
        self.pos += n
        return v

    def cstr(self) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolViolation("unterminated string in message")
        v = self.buf[self.pos:end]
        self.pos = end + 1
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            # Identifiers and settings travel in the client encoding; keep the
            # bytes intact rather than failing the connection.
            return v.decode("latin-1")

    def rest(self) -> bytes:
        v = self.buf[self.pos:]
        self.pos = len(self.buf)
        return v

    def value(self) -> bytes | None:
        n = self.int32()
        if n == -1:
            return None
        return self.bytes_(n)

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolViolation("message body is longer than its fields")


def _cstr(s: str) -> bytes:
    b = s.encode("utf-8")
    if b"\0" in b:
        raise ValueError("string contains a NUL byte")
    return b + b"\0"


def _value(v: bytes | None) -> bytes:
    if v is None:
        return _I32.pack(-1)
    return _I32.pack(len(v)) + v


def frame(type_byte: bytes, body: bytes) -> bytes:
    """A typed message: type byte, Int32 length (self included), body."""
    return type_byte + _U32.pack(len(body) + 4) + body


# ---------------------------------------------------------------------------
# Message classes
# ---------------------------------------------------------------------------

class PgMessage:
    """Base of every message class; ``type`` is the type byte (b"" for the
    untyped startup-phase packets)."""

    type: ClassVar[bytes] = b""

    def body(self) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    def encode(self) -> bytes:
        return frame(self.type, self.body())


# --- untyped startup-phase packets (frontend) ------------------------------

@dataclass(frozen=True)
class StartupMessage(PgMessage):
    params: tuple[tuple[str, str], ...]
    protocol: int = PROTOCOL_3_0

    def get(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.params:
            if k == key:
                return v
        return default

    def encode(self) -> bytes:
        body = _I32.pack(self.protocol) + b"".join(
            _cstr(k) + _cstr(v) for k, v in self.params) + b"\0"
        return _I32.pack(len(body) + 4) + body


@dataclass(frozen=True)
class SSLRequest(PgMessage):
    def encode(self) -> bytes:
        return _I32.pack(8) + _I32.pack(SSL_REQUEST_CODE)


@dataclass(frozen=True)
class GSSENCRequest(PgMessage):
    def encode(self) -> bytes:
        return _I32.pack(8) + _I32.pack(GSSENC_REQUEST_CODE)


@dataclass(frozen=True)
class CancelRequest(PgMessage):
    pid: int
    secret: int

    def encode(self) -> bytes:
        return _I32.pack(16) + _I32.pack(CANCEL_REQUEST_CODE) + _I32.pack(
            self.pid) + _I32.pack(self.secret)


def decode_startup_packet(packet: bytes) -> PgMessage:
    """Decode a whole untyped startup-phase packet (length word included)."""
    if len(packet) < 8:
        raise ProtocolViolation("invalid length of startup packet")
    r = _Reader(packet)
    length = r.int32()
    if length != len(packet):
        raise ProtocolViolation("invalid length of startup packet")
    code = r.int32()
    if code == SSL_REQUEST_CODE:
        r.done()
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        r.done()
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        pid = r.int32()
        secret = r.int32()
        r.done()
        return CancelRequest(pid, secret)
    if code >> 16 != 3:
        raise ProtocolViolation(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
            "server supports 3.0 to 3.0")
    params = []
    while True:
        key = r.cstr()
        if key == "":
            break
        params.append((key, r.cstr()))
    r.done()
    return StartupMessage(tuple(params), code)


# --- frontend typed messages ----------------------------------------------

@dataclass(frozen=True)
class Query(PgMessage):
    type = b"Q"
    sql: str

    def body(self) -> bytes:
        return _cstr(self.sql)


@dataclass(frozen=True)
class Parse(PgMessage):
    type = b"P"
    name: str
    sql: str
    param_types: tuple[int, ...] = ()

    def body(self) -> bytes:
        return (_cstr(self.name) + _cstr(self.sql) + _I16.pack(len(self.param_types))
                + b"".join(_U32.pack(t) for t in self.param_types))


@dataclass(frozen=True)
class Bind(PgMessage):
    type = b"B"
    portal: str
    statement: str
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    def body(self) -> bytes:
        return (_cstr(self.portal) + _cstr(self.statement)
                + _I16.pack(len(self.param_formats))
                + b"".join(_I16.pack(f) for f in self.param_formats)
                + _I16.pack(len(self.params))
                + b"".join(_value(p) for p in self.params)
                + _I16.pack(len(self.result_formats))
                + b"".join(_I16.pack(f) for f in self.result_formats))


@dataclass(frozen=True)
class Describe(PgMessage):
    type = b"D"
    kind: bytes  # b"S" statement or b"P" portal
    name: str

    def body(self) -> bytes:
        return self.kind + _cstr(self.name)


@dataclass(frozen=True)
class Execute(PgMessage):
    type = b"E"
    portal: str
    max_rows: int = 0

    def body(self) -> bytes:
        return _cstr(self.portal) + _I32.pack(self.max_rows)


@dataclass(frozen=True)
class Close(PgMessage):
    type = b"C"
    kind: bytes
    name: str

    def body(self) -> bytes:
        return self.kind + _cstr(self.name)


@dataclass(frozen=True)
class Sync(PgMessage):
    type = b"S"

    def body(self) -> bytes:
        return b""


@dataclass(frozen=True)
class Flush(PgMessage):
    type = b"H"

    def body(self) -> bytes:
        return b""


@dataclass(frozen=True)
class Terminate(PgMessage):
    type = b"X"

    def body(self) -> bytes:
        return b""


@dataclass(frozen=True)
class CopyData(PgMessage):
    type = b"d"
    data: bytes

    def body(self) -> bytes:
        return self.data


@dataclass(frozen=True)
class CopyDone(PgMessage):
    type = b"c"

    def body(self) -> bytes:
        return b""


@dataclass(frozen=True)
class CopyFail(PgMessage):
    type = b"f"
    message: str

    def body(self) -> bytes:
        return _cstr(self.message)


@dataclass(frozen=True)
class FunctionCall(PgMessage):
    type = b"F"
    oid: int
    arg_formats: tuple[int, ...] = ()
    args: tuple[bytes | None, ...] = ()
    result_format: int = 0

    def body(self) -> bytes:
        return (_U32.pack(self.oid) + _I16.pack(len(self.arg_formats))
                + b"".join(_I16.pack(f) for f in self.arg_formats)
                + _I16.pack(len(self.args)) + b"".join(_value(a) for a in self.args)
                + _I16.pack(self.result_format))


@dataclass(frozen=True)
class PasswordMessage(PgMessage):
    """'p': PasswordMessage, SASLInitialResponse, SASLResponse or GSSResponse;
    which one depends on the authentication request before it, so the proxy
    keeps the body opaque and relays it as it is."""
    type = b"p"
    data: bytes

    def body(self) -> bytes:
        return self.data


# --- backend messages -----------------------------------------------------

AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12
# Authentication requests the client must answer with a 'p' message.
AUTH_NEEDS_RESPONSE = frozenset(
    {AUTH_CLEARTEXT, AUTH_MD5, AUTH_GSS, AUTH_GSS_CONTINUE, AUTH_SSPI,
     AUTH_SASL, AUTH_SASL_CONTINUE})


@dataclass(frozen=True)
class Authentication(PgMessage):
    type = b"R"
    code: int
    data: bytes = b""

    def body(self) -> bytes:
        return _I32.pack(self.code) + self.data


@dataclass(frozen=True)
class BackendKeyData(PgMessage):
    type = b"K"
    pid: int
    secret: int

    def body(self) -> bytes:
        return _I32.pack(self.pid) + _I32.pack(self.secret)


@dataclass(frozen=True)
class ParameterStatus(PgMessage):
    type = b"S"
    name: str
    value: str

    def body(self) -> bytes:
        return _cstr(self.name) + _cstr(self.value)


@dataclass(frozen=True)
class ReadyForQuery(PgMessage):
    type = b"Z"
    status: bytes  # b"I" idle, b"T" in transaction, b"E" failed transaction

    def body(self) -> bytes:
        return self.status


@dataclass(frozen=True)
class RowDescription(PgMessage):
    type = b"T"
    # (name, table_oid, column_no, type_oid, type_size, type_mod, format)
    fields: tuple[tuple[str, int, int, int, int, int, int], ...]

    def body(self) -> bytes:
        out = [_I16.pack(len(self.fields))]
        for name, table, col, typ, size, mod, fmt in self.fields:
            out.append(_cstr(name) + struct.pack("!IhIhih", table, col, typ, size, mod, fmt))
        return b"".join(out)


@dataclass(frozen=True)
class DataRow(PgMessage):
    type = b"D"
    values: tuple[bytes | None, ...]

    def body(self) -> bytes:
        return _I16.pack(len(self.values)) + b"".join(_value(v) for v in self.values)


@dataclass(frozen=True)
class CommandComplete(PgMessage):
    type = b"C"
    tag: str

    def body(self) -> bytes:
        return _cstr(self.tag)


@dataclass(frozen=True)
class _Empty(PgMessage):
    def body(self) -> bytes:
        return b""


@dataclass(frozen=True)
class ParseComplete(_Empty):
    type = b"1"


@dataclass(frozen=True)
class BindComplete(_Empty):
    type = b"2"


@dataclass(frozen=True)
class CloseComplete(_Empty):
    type = b"3"


@dataclass(frozen=True)
class NoData(_Empty):
    type = b"n"


@dataclass(frozen=True)
class EmptyQueryResponse(_Empty):
    type = b"I"


@dataclass(frozen=True)
class PortalSuspended(_Empty):
    type = b"s"


@dataclass(frozen=True)
class ParameterDescription(PgMessage):
    type = b"t"
    type_oids: tuple[int, ...]

    def body(self) -> bytes:
        return _I16.pack(len(self.type_oids)) + b"".join(_U32.pack(t) for t in self.type_oids)


@dataclass(frozen=True)
class _CopyResponse(PgMessage):
    overall_format: int
    column_formats: tuple[int, ...]

    def body(self) -> bytes:
        return (bytes([self.overall_format]) + _I16.pack(len(self.column_formats))
                + b"".join(_I16.pack(f) for f in self.column_formats))


@dataclass(frozen=True)
class CopyInResponse(_CopyResponse):
    type = b"G"


@dataclass(frozen=True)
class CopyOutResponse(_CopyResponse):
    type = b"H"


@dataclass(frozen=True)
class CopyBothResponse(_CopyResponse):
    type = b"W"


@dataclass(frozen=True)
class _Fields(PgMessage):
    """ErrorResponse / NoticeResponse: (field code, value) pairs."""
    fields: tuple[tuple[str, str], ...]

    def get(self, code: str, default: str | None = None) -> str | None:
        for k, v in self.fields:
            if k == code:
                return v
        return default

    @property
    def severity(self) -> str:
        return self.get("V") or self.get("S") or ""

    @property
    def sqlstate(self) -> str:
        return self.get("C") or ""

    @property
    def message(self) -> str:
        return self.get("M") or ""

    def body(self) -> bytes:
        return b"".join(k.encode("ascii") + _cstr(v) for k, v in self.fields) + b"\0"


@dataclass(frozen=True)
class ErrorResponse(_Fields):
    type = b"E"


@dataclass(frozen=True)
class NoticeResponse(_Fields):
    type = b"N"


@dataclass(frozen=True)
class NotificationResponse(PgMessage):
    type = b"A"
    pid: int
    channel: str
    payload: str

    def body(self) -> bytes:
        return _I32.pack(self.pid) + _cstr(self.channel) + _cstr(self.payload)


@dataclass(frozen=True)
class FunctionCallResponse(PgMessage):
    type = b"V"
    value: bytes | None

    def body(self) -> bytes:
        return _value(self.value)


@dataclass(frozen=True)
class NegotiateProtocolVersion(PgMessage):
    type = b"v"
    newest_minor: int
    unrecognized: tuple[str, ...] = ()

    def body(self) -> bytes:
        return (_I32.pack(self.newest_minor) + _I32.pack(len(self.unrecognized))
                + b"".join(_cstr(o) for o in self.unrecognized))


# ---------------------------------------------------------------------------
# Decoders
# ---------------------------------------------------------------------------

def _formats(r: _Reader) -> tuple[int, ...]:
    n = r.int16()
    return tuple(r.int16() for _ in range(max(n, 0)))


def _dec_fields(cls):
    def dec(r: _Reader):
        fields = []
        while True:
            code = r.byte()
            if code == 0:
                break
            fields.append((chr(code), r.cstr()))
        return cls(tuple(fields))
    return dec


def _dec_row_description(r: _Reader) -> RowDescription:
    fields = []
    for _ in range(max(r.int16(), 0)):
        name = r.cstr()
        r._need(18)
        fields.append((name,) + struct.unpack_from("!IhIhih", r.buf, r.pos))
        r.pos += 18
    return RowDescription(tuple(fields))


def _dec_copy_response(cls):
    def dec(r: _Reader):
        fmt = r.byte()
        return cls(fmt, _formats(r))
    return dec


FRONTEND_DECODERS: dict[bytes, Callable[[_Reader], PgMessage]] = {
    b"Q": lambda r: Query(r.cstr()),
    b"P": lambda r: Parse(r.cstr(), r.cstr(), tuple(
        _U32.unpack(r.bytes_(4))[0] for _ in range(max(r.int16(), 0)))),
    b"B": lambda r: Bind(r.cstr(), r.cstr(), _formats(r),
                         tuple(r.value() for _ in range(max(r.int16(), 0))),
                         _formats(r)),
    b"D": lambda r: Describe(r.bytes_(1), r.cstr()),
    b"E": lambda r: Execute(r.cstr(), r.int32()),
    b"C": lambda r: Close(r.bytes_(1), r.cstr()),
    b"S": lambda r: Sync(),
    b"H": lambda r: Flush(),
    b"X": lambda r: Terminate(),
    b"d": lambda r: CopyData(r.rest()),
    b"c": lambda r: CopyDone(),
    b"f": lambda r: CopyFail(r.cstr()),
    b"F": lambda r: FunctionCall(_U32.unpack(r.bytes_(4))[0], _formats(r),
                                 tuple(r.value() for _ in range(max(r.int16(), 0))),
                                 r.int16()),
    b"p": lambda r: PasswordMessage(r.rest()),
}

BACKEND_DECODERS: dict[bytes, Callable[[_Reader], PgMessage]] = {
    b"R": lambda r: Authentication(r.int32(), r.rest()),
    b"K": lambda r: BackendKeyData(r.int32(), r.int32()),
    b"S": lambda r: ParameterStatus(r.cstr(), r.cstr()),
    b"Z": lambda r: ReadyForQuery(r.bytes_(1)),
    b"T": _dec_row_description,
    b"D": lambda r: DataRow(tuple(r.value() for _ in range(max(r.int16(), 0)))),
    b"C": lambda r: CommandComplete(r.cstr()),
    b"1": lambda r: ParseComplete(),
    b"2": lambda r: BindComplete(),
    b"3": lambda r: CloseComplete(),
    b"n": lambda r: NoData(),
    b"I": lambda r: EmptyQueryResponse(),
    b"s": lambda r: PortalSuspended(),
    b"t": lambda r: ParameterDescription(tuple(
        _U32.unpack(r.bytes_(4))[0] for _ in range(max(r.int16(), 0)))),
    b"G": _dec_copy_response(CopyInResponse),
    b"H": _dec_copy_response(CopyOutResponse),
    b"W": _dec_copy_response(CopyBothResponse),
    b"d": lambda r: CopyData(r.rest()),
    b"c": lambda r: CopyDone(),
    b"E": _dec_fields(ErrorResponse),
    b"N": _dec_fields(NoticeResponse),
    b"A": lambda r: NotificationResponse(r.int32(), r.cstr(), r.cstr()),
    b"V": lambda r: FunctionCallResponse(r.value()),
    b"v": lambda r: NegotiateProtocolVersion(r.int32(), tuple(
        r.cstr() for _ in range(max(r.int32(), 0)))),
}

FRONTEND_TYPES = frozenset(FRONTEND_DECODERS)
BACKEND_TYPES = frozenset(BACKEND_DECODERS)

# Frontend messages PostgreSQL reads with the small limit (postgres.c,
# SocketBackend): everything but Query, Parse, Bind, FunctionCall, CopyData
# and the authentication responses.
FRONTEND_LARGE_TYPES = frozenset(b"QPBFdp")
# Messages whose body must be empty.
FRONTEND_EMPTY_TYPES = frozenset(b"SHXc")


def decode(type_byte: bytes, body: bytes, *, frontend: bool) -> PgMessage:
    """Decode one typed message body (the bytes after the length word)."""
    table = FRONTEND_DECODERS if frontend else BACKEND_DECODERS
    dec = table.get(type_byte)
    if dec is None:
        side = "frontend" if frontend else "backend"
        raise ProtocolViolation(f"invalid {side} message type {type_byte!r}")
    r = _Reader(body)
    msg = dec(r)
    r.done()
    return msg


# ---------------------------------------------------------------------------
# Builders used by the proxy itself
# ---------------------------------------------------------------------------

def error_response(sqlstate: str, message: str, *, severity: str = "ERROR",
                   detail: str | None = None, hint: str | None = None,
                   notice: bool = False) -> bytes:
    fields = [("S", severity), ("V", severity), ("C", sqlstate), ("M", message)]
    if detail:
        fields.append(("D", detail))
    if hint:
        fields.append(("H", hint))
    cls = NoticeResponse if notice else ErrorResponse
    return cls(tuple(fields)).encode()


# ---------------------------------------------------------------------------
# Streaming framer
# ---------------------------------------------------------------------------

@dataclass(slots=True)
class Message:
    """A whole inspected message as the framer delivers it."""
    type: int          # the type byte as an int (e.g. ord("Z"))
    body: bytes
    raw: bytes         # header + body, to forward unchanged

    def decode(self, *, frontend: bool) -> PgMessage:
        return decode(bytes((self.type,)), self.body, frontend=frontend)


# What the framer does with each message type (a 256-entry table).
_DENY, _PASS, _COUNT, _PEEK, _INSPECT = 0, 1, 2, 3, 4


class Framer:
    """Cuts one direction of a connection into messages, in order.

    ``feed(data)`` returns a list whose items are either ``bytes`` (a run of
    raw bytes to forward: whole uninspected messages and/or pieces of one) or
    ``Message`` (a whole message of a type in ``inspect``). Joining the raw
    runs and the messages' ``raw`` in order gives back the input exactly.

    Per type, from a table built once: *pass* (stream through), *count*
    (stream through, ``boundaries += 1``), *peek* (stream through whole,
    ``peeked += 1`` and ``last_peek`` = its first body byte - this is how
    ReadyForQuery is tracked without splitting the run or allocating), or
    *inspect* (deliver as ``Message``). Types not ``allowed`` are refused.
    So the common read - complete messages, none inspected - comes back as
    the very same bytes object, and the relay forwards it untouched.

    Memory: at most one partial header (< 5 bytes) or one partial
    peeked/inspected message (<= ``max_inspect_len`` bytes) is held between
    calls; every other message is streamed as it arrives.
    """

    __slots__ = ("_actions", "_limits", "max_inspect_len", "boundaries", "peeked",
                 "last_peek", "_buf", "_skip", "frontend")

    def __init__(self, inspect: Iterable[int], *, frontend: bool,
                 allowed: Iterable[int] | None = None,
                 max_inspect_len: int = MAX_MESSAGE_LEN,
                 count: Iterable[int] = (), peek: Iterable[int] = ()):
        actions = bytearray([_DENY if allowed is not None else _PASS]) * 256
        for t in allowed or ():
            actions[t] = _PASS
        for act, types in ((_COUNT, count), (_PEEK, peek), (_INSPECT, inspect)):
            for t in types:
                actions[t] = act
        self._actions = bytes(actions)
        # Largest legal length word per type, with the refusals folded in so
        # the hot loop makes one comparison: -1 for types not allowed,
        # max_inspect_len for types that must be buffered whole.
        limits = [MAX_MESSAGE_LEN] * 256
        for t in range(256):
            if frontend and t in FRONTEND_EMPTY_TYPES:
                limits[t] = 4
            elif frontend and t not in FRONTEND_LARGE_TYPES:
                limits[t] = MAX_SMALL_MESSAGE_LEN + 4
            if actions[t] == _DENY:
                limits[t] = -1
            elif actions[t] >= _PEEK:
                limits[t] = min(limits[t], max_inspect_len)
        self._limits = tuple(limits)
        self.frontend = frontend
        self.max_inspect_len = max_inspect_len
        self.boundaries = 0    # messages of the ``count`` types seen
        self.peeked = 0        # messages of the ``peek`` types seen
        self.last_peek = -1    # first body byte of the last peeked message
        self._buf = b""
        self._skip = 0         # bytes of the current pass-through message to come

    def carry_from(self, old: "Framer") -> "Framer":
        """Take over the partial-message state of ``old`` (used when a
        session switches framers between phases)."""
        self._buf, self._skip = old._buf, old._skip
        return self

    @property
    def at_boundary(self) -> bool:
        """True when everything fed so far ended on a message boundary."""
        return not self._buf and not self._skip


    def _violation(self, typ: int, length: int, action: int) -> ProtocolViolation:
        side = "frontend" if self.frontend else "backend"
        if action == _DENY:
            return ProtocolViolation(f"invalid {side} message type {chr(typ)!r}")
        if action >= _PEEK and 4 <= length <= MAX_MESSAGE_LEN:
            return ProtocolViolation(f"message of type {chr(typ)!r} too long ({length} bytes)")
        return ProtocolViolation(f"invalid message length {length} for message type {chr(typ)!r}")

    def feed(self, data: bytes) -> list:
        out: list = []
        n = len(data)
        pos = 0
        skip = self._skip
        if skip:
            if skip >= n:
                self._skip = skip - n
                out.append(data)
                return out
            pos = skip
            self._skip = 0
        elif self._buf:
            data = self._buf + data
            n = len(data)
            self._buf = b""
        actions = self._actions
        limits = self._limits
        run_start = 0
        while pos + 5 <= n:
            typ = data[pos]
            action = actions[typ]
            length = _unpack_u32(data, pos + 1)[0]
            if length < 4 or length > limits[typ]:
                if pos > run_start:
                    out.append(data[run_start:pos])
                e = self._violation(typ, length, action)
                e.before = out  # the complete messages before the bad bytes
                raise e
            end = pos + 1 + length
            if action <= _COUNT:
                if action == _COUNT:
                    self.boundaries += 1
                if end > n:
                    self._skip = end - n
                    pos = n
                    break
                pos = end
            elif end > n:
                break  # peek/inspect: wait for the whole message
            elif action == _PEEK:
                self.peeked += 1
                self.last_peek = data[pos + 5] if length > 4 else -1
                pos = end
            else:
                if pos > run_start:
                    out.append(data[run_start:pos])
                out.append(Message(typ, data[pos + 5:end], data[pos:end]))
                pos = end
                run_start = end
        if pos > run_start:
            out.append(data[run_start:pos] if (run_start or pos < n) else data)
        if pos < n:
            self._buf = data[pos:]
        return out


class StartupFramer:
    """Collects the untyped startup-phase packets (Int32 length first)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> tuple[bytes | None, bytes]:
        """Returns (packet or None, leftover bytes after the packet)."""
        buf = self._buf + data
        if len(buf) < 4:
            self._buf = buf
            return None, b""
        length = _I32.unpack_from(buf, 0)[0]
        if length < 8 or length > MAX_STARTUP_PACKET_LEN:
            raise ProtocolViolation("invalid length of startup packet")
        if len(buf) < length:
            self._buf = buf
            return None, b""
        self._buf = b""
        return buf[:length], buf[length:]
