"""pgoutput, protocol version 3 (PostgreSQL 15): a pure decoder (no I/O).

What this module owns: one frozen dataclass per logical replication message
(PostgreSQL docs 55.9 "Logical Replication Message Formats"), ``decode`` for
the payload of one message, and the streaming-replication wrapping around
it (55.4: XLogData 'w', primary keepalive 'k', standby status update 'r').

Rules kept here:
- Streamed in-progress transactions (protocol 2's 'S'/'E'/'c'/'A' and the
  xid prefix on data messages) are never requested by mmproxy: it asks for
  ``streaming 'off'``, so those bytes are refused as unexpected instead of
  being half-understood.
- Tuple values stay as PostgreSQL sent them (text or binary bytes, NULL,
  or "unchanged TOAST"); the applier decides how to use them.
- LSNs are ints; ``lsn_str`` renders them as PostgreSQL does ("0/16B3748").
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

PG_EPOCH_OFFSET_US = 946_684_800_000_000  # 2000-01-01 - 1970-01-01 in microseconds

_Q = struct.Struct("!Q")
_q = struct.Struct("!q")
_I = struct.Struct("!I")
_i = struct.Struct("!i")
_H = struct.Struct("!h")


class DecodeError(ValueError):
    """A pgoutput payload that does not follow the protocol."""


def lsn_str(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


class _R:
    __slots__ = ("b", "p")

    def __init__(self, b: bytes):
        self.b = b
        self.p = 0

    def _take(self, n: int) -> int:
        p = self.p
        if p + n > len(self.b):
            raise DecodeError("pgoutput message shorter than its fields")
        self.p = p + n
        return p

    def u8(self) -> int:
        return self.b[self._take(1)]

    def u16(self) -> int:
        return _H.unpack_from(self.b, self._take(2))[0]

    def u32(self) -> int:
        return _I.unpack_from(self.b, self._take(4))[0]

    def i32(self) -> int:
        return _i.unpack_from(self.b, self._take(4))[0]

    def u64(self) -> int:
        return _Q.unpack_from(self.b, self._take(8))[0]

    def i64(self) -> int:
        return _q.unpack_from(self.b, self._take(8))[0]

    def raw(self, n: int) -> bytes:
        if n < 0:
            raise DecodeError("negative length in pgoutput message")
        p = self._take(n)
        return self.b[p:p + n]

    def cstr(self) -> str:
        end = self.b.find(b"\0", self.p)
        if end < 0:
            raise DecodeError("unterminated string in pgoutput message")
        s = self.b[self.p:end].decode("utf-8")
        self.p = end + 1
        return s

    def end(self) -> None:
        if self.p != len(self.b):
            raise DecodeError("trailing bytes after pgoutput message")


# --- transaction boundaries ------------------------------------------------

@dataclass(frozen=True)
class Begin:
    final_lsn: int
    commit_ts: int
    xid: int


@dataclass(frozen=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts: int


@dataclass(frozen=True)
class BeginPrepare:
    prepare_lsn: int
    end_lsn: int
    prepare_ts: int
    xid: int
    gid: str


@dataclass(frozen=True)
class Prepare:
    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_ts: int
    xid: int
    gid: str


@dataclass(frozen=True)
class CommitPrepared:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts: int
    xid: int
    gid: str


@dataclass(frozen=True)
class RollbackPrepared:
    flags: int
    prepare_end_lsn: int
    rollback_end_lsn: int
    prepare_ts: int
    rollback_ts: int
    xid: int
    gid: str


@dataclass(frozen=True)
class Origin:
    """Sent right after Begin/BeginPrepare for a transaction that an applier
    session with a replication origin made: ``name`` is that origin."""
    origin_lsn: int
    name: str


# --- data -----------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    is_key: bool
    name: str
    type_oid: int
    type_mod: int


@dataclass(frozen=True)
class Relation:
    relid: int
    namespace: str
    name: str
    replica_identity: str   # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]


@dataclass(frozen=True)
class Type:
    oid: int
    namespace: str
    name: str


UNCHANGED_TOAST = object()  # a value PostgreSQL did not send because it did not change


@dataclass(frozen=True)
class Tuple:
    """Column values: ``bytes`` (text form, or binary when ``binary``),
    ``None`` for NULL, or ``UNCHANGED_TOAST``."""
    values: tuple
    binary: tuple[bool, ...]


@dataclass(frozen=True)
class Insert:
    relid: int
    new: Tuple


@dataclass(frozen=True)
class Update:
    relid: int
    old: Tuple | None        # only with REPLICA IDENTITY FULL / key change
    old_kind: str | None     # 'K' key columns only, 'O' whole old row
    new: Tuple


@dataclass(frozen=True)
class Delete:
    relid: int
    old: Tuple
    old_kind: str            # 'K' or 'O'


@dataclass(frozen=True)
class Truncate:
    cascade: bool
    restart_identity: bool
    relids: tuple[int, ...]


@dataclass(frozen=True)
class Message:
    """pg_logical_emit_message(transactional, prefix, content)."""
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


def _tuple(r: _R) -> Tuple:
    n = r.u16()
    values = []
    binary = []
    for _ in range(n):
        kind = r.u8()
        if kind == 0x6E:      # 'n'
            values.append(None)
            binary.append(False)
        elif kind == 0x75:    # 'u'
            values.append(UNCHANGED_TOAST)
            binary.append(False)
        elif kind in (0x74, 0x62):  # 't', 'b'
            values.append(r.raw(r.i32()))
            binary.append(kind == 0x62)
        else:
            raise DecodeError(f"unknown tuple column kind {kind!r}")
    return Tuple(tuple(values), tuple(binary))


def _expect(r: _R, *kinds: str) -> str:
    k = chr(r.u8())
    if k not in kinds:
        raise DecodeError(f"expected one of {kinds} in tuple marker, got {k!r}")
    return k


def _relation(r: _R) -> Relation:
    relid = r.u32()
    ns = r.cstr()
    name = r.cstr()
    ident = chr(r.u8())
    cols = []
    for _ in range(r.u16()):
        flags = r.u8()
        cols.append(Column(bool(flags & 1), r.cstr(), r.u32(), r.i32()))
    return Relation(relid, ns, name, ident, tuple(cols))


def _update(r: _R) -> Update:
    relid = r.u32()
    k = _expect(r, "K", "O", "N")
    old = old_kind = None
    if k in ("K", "O"):
        old_kind = k
        old = _tuple(r)
        _expect(r, "N")
    return Update(relid, old, old_kind, _tuple(r))


def _delete(r: _R) -> Delete:
    relid = r.u32()
    k = _expect(r, "K", "O")
    return Delete(relid, _tuple(r), k)


def _truncate(r: _R) -> Truncate:
    n = r.u32()
    opts = r.u8()
    return Truncate(bool(opts & 1), bool(opts & 2), tuple(r.u32() for _ in range(n)))


def _message(r: _R) -> Message:
    flags = r.u8()
    lsn = r.u64()
    prefix = r.cstr()
    return Message(bool(flags & 1), lsn, prefix, r.raw(r.u32()))


_DECODERS = {
    "B": lambda r: Begin(r.u64(), r.i64(), r.u32()),
    "C": lambda r: Commit(r.u8(), r.u64(), r.u64(), r.i64()),
    "b": lambda r: BeginPrepare(r.u64(), r.u64(), r.i64(), r.u32(), r.cstr()),
    "P": lambda r: Prepare(r.u8(), r.u64(), r.u64(), r.i64(), r.u32(), r.cstr()),
    "K": lambda r: CommitPrepared(r.u8(), r.u64(), r.u64(), r.i64(), r.u32(), r.cstr()),
    "r": lambda r: RollbackPrepared(r.u8(), r.u64(), r.u64(), r.i64(), r.i64(), r.u32(), r.cstr()),
    "O": lambda r: Origin(r.u64(), r.cstr()),
    "R": _relation,
    "Y": lambda r: Type(r.u32(), r.cstr(), r.cstr()),
    "I": lambda r: Insert(r.u32(), (_expect(r, "N"), _tuple(r))[1]),
    "U": _update,
    "D": _delete,
    "T": _truncate,
    "M": _message,
}


def decode(payload: bytes):
    """Decode one pgoutput message (the XLogData payload)."""
    if not payload:
        raise DecodeError("empty pgoutput message")
    kind = chr(payload[0])
    dec = _DECODERS.get(kind)
    if dec is None:
        raise DecodeError(f"unexpected pgoutput message type {kind!r} "
                          "(streaming of in-progress transactions is not requested)")
    r = _R(payload)
    r.p = 1
    msg = dec(r)
    r.end()
    return msg


# --- the streaming replication wrapping (CopyData payloads) -------------------

@dataclass(frozen=True)
class XLogData:
    start_lsn: int
    end_lsn: int       # the server's current end of WAL
    send_time: int
    payload: bytes


@dataclass(frozen=True)
class Keepalive:
    end_lsn: int
    send_time: int
    reply_requested: bool


def decode_copy_data(data: bytes):
    """A CopyData payload from the walsender: XLogData or Keepalive."""
    if data[:1] == b"w":
        if len(data) < 25:
            raise DecodeError("short XLogData")
        start, end, ts = struct.unpack_from("!QQq", data, 1)
        return XLogData(start, end, ts, data[25:])
    if data[:1] == b"k":
        if len(data) != 18:
            raise DecodeError("bad keepalive length")
        end, ts, reply = struct.unpack_from("!QqB", data, 1)
        return Keepalive(end, ts, bool(reply))
    raise DecodeError(f"unexpected replication message {data[:1]!r}")


def standby_status_update(written: int, flushed: int, applied: int, now_us_unix: int,
                          reply_requested: bool = False) -> bytes:
    """The 'r' message (a CopyData payload): LSNs the receiver has written,
    flushed and applied. ``now_us_unix`` is microseconds since 1970; the
    caller supplies time, this module reads no clock."""
    return b"r" + struct.pack("!QQQqB", written, flushed, applied,
                              now_us_unix - PG_EPOCH_OFFSET_US, int(reply_requested))
