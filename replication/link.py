"""The inter-node link: framing and message codec (pure), over TCP.

Each node opens one connection to each peer's ``internode_listen`` and sends
everything it has for that peer on it; what a peer sends comes on the
connection that peer opened. Frames: Byte1 type, UInt32 length, payload.

- 'H' hello: UInt32 sender node id (first frame of every connection);
- 'R' replication: UInt64 LSN + one pgoutput message, exactly as the
  sender's walsender produced it (forwarded, never re-encoded);
- 'A' applied: UInt64 LSN the receiver has durably applied (the sender
  confirms its slot up to it);
- 'J' a commit-protocol message (``replication.commit``) as JSON;
- 'M' mode request, from the receiving node to the sender: Byte1 'o' (this
  node's own transactions), 'a' (every origin: the receiver catches up from
  this donor) or 'n' (nothing), then UInt32 the lowest generation whose
  donor marker may end an 'a' stream (the one the receiver joins); resent
  whenever the link comes up;
- 'S' stream mode, from the sender: Byte1 as above, first frame of every
  slot session, and again where the mode changes inside one ('a' to 'o' at
  the donor's marker of a generation the receiver joined);
- 'L' slot lost, from the sender: UTF-8 text - the WAL the receiver needs
  from this node was removed (``max_slot_wal_keep_size``).

A second connection per direction carries the consensus traffic
(``replication/control.py``), so that heartbeats never queue behind a
large transaction: it opens with 'G' (UInt32 sender node id) and carries
'C' frames, each one ``consensus.service`` payload.

A frame longer than ``MAX_FRAME`` is a protocol error: the connection is
dropped and re-established (the stream resumes from the confirmed LSN).
"""
from __future__ import annotations

import json
import struct

from . import commit as cp

MAX_FRAME = 1 << 30
_HDR = struct.Struct("!cI")
_Q = struct.Struct("!Q")
_I = struct.Struct("!I")

_MSG_TYPES = {cls.__name__: cls for cls in (cp.Vote, cp.VoteRequest, cp.Precommit,
                                            cp.PrecommitAck, cp.Decision, cp.CommitAck,
                                            cp.Wound, cp.Release, cp.Outcome, cp.Working,
                                            cp.TxStatusQuery, cp.TxStatus)}


class LinkError(ValueError):
    pass


def frame(kind: bytes, payload: bytes) -> bytes:
    return _HDR.pack(kind, len(payload)) + payload


def hello(node_id: int) -> bytes:
    return frame(b"H", _I.pack(node_id))


def control_hello(node_id: int) -> bytes:
    return frame(b"G", _I.pack(node_id))


def control(payload: bytes) -> bytes:
    return frame(b"C", payload)


def replication(lsn: int, payload: bytes) -> bytes:
    return frame(b"R", _Q.pack(lsn) + payload)


def applied(lsn: int) -> bytes:
    return frame(b"A", _Q.pack(lsn))


OWN, ALL, NONE = b"o", b"a", b"n"
MODES = (OWN, ALL, NONE)


def mode_request(mode: bytes, join_gen: int = 0) -> bytes:
    assert mode in MODES
    return frame(b"M", mode + _I.pack(join_gen))


def decode_mode_request(payload: bytes) -> tuple[bytes, int]:
    if len(payload) != 5 or payload[:1] not in MODES:
        raise LinkError(f"bad stream mode request {payload!r}")
    return payload[:1], _I.unpack_from(payload, 1)[0]


def stream_mode(mode: bytes) -> bytes:
    assert mode in (OWN, ALL)
    return frame(b"S", mode)


def slot_lost(text: str) -> bytes:
    return frame(b"L", text.encode())


def protocol(msg) -> bytes:
    d = dict(msg.__dict__)
    d["t"] = type(msg).__name__
    return frame(b"J", json.dumps(d, separators=(",", ":")).encode())


def decode_protocol(payload: bytes):
    d = json.loads(payload)
    cls = _MSG_TYPES.get(d.pop("t", None))
    if cls is None:
        raise LinkError("unknown commit-protocol message")
    return cls(**d)


class FrameReader:
    """Streaming splitter: feed bytes, get (kind, payload) frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buf += data
        out = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= 5:
            kind, n = _HDR.unpack_from(buf, pos)
            if n > MAX_FRAME:
                raise LinkError(f"frame of {n} bytes exceeds the limit")
            if len(buf) - pos - 5 < n:
                break
            out.append((kind, bytes(buf[pos + 5:pos + 5 + n])))
            pos += 5 + n
        del buf[:pos]
        return out


def unpack_lsn(payload: bytes) -> tuple[int, bytes]:
    return _Q.unpack_from(payload)[0], payload[8:]
