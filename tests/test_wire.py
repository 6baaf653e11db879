"""The wire codec: every message type round-trips, and the framer cuts a
stream the same way whether it is fed whole, byte by byte, or coalesced
with the next message (h11's discipline)."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import wire
from proxy.wire import Framer, Message, ProtocolViolation

FRONTEND = [
    wire.Query("SELECT 1; SELECT 'é'"),
    wire.Parse("s1", "SELECT $1::int, $2", (23, 0)),
    wire.Parse("", "SELECT 1"),
    wire.Bind("p1", "s1", (0, 1), (b"42", None, b"\x00\x01"), (1,)),
    wire.Bind("", "", (), (), ()),
    wire.Describe(b"S", "s1"),
    wire.Describe(b"P", ""),
    wire.Execute("p1", 100),
    wire.Close(b"S", "s1"),
    wire.Close(b"P", "p1"),
    wire.Sync(),
    wire.Flush(),
    wire.Terminate(),
    wire.CopyData(b"1\tfoo\n"),
    wire.CopyDone(),
    wire.CopyFail("client gave up"),
    wire.FunctionCall(1598, (0,), (b"abc", None), 1),
    wire.PasswordMessage(b"SCRAM-SHA-256\0\0\0\0\x04n,,x"),
]

BACKEND = [
    wire.Authentication(wire.AUTH_OK),
    wire.Authentication(wire.AUTH_MD5, b"salt"),
    wire.Authentication(wire.AUTH_SASL, b"SCRAM-SHA-256\0\0"),
    wire.Authentication(wire.AUTH_SASL_CONTINUE, b"r=abc,s=xyz,i=4096"),
    wire.Authentication(wire.AUTH_SASL_FINAL, b"v=proof"),
    wire.BackendKeyData(1234, -5678),
    wire.ParameterStatus("server_version", "15.18"),
    wire.ReadyForQuery(b"I"),
    wire.ReadyForQuery(b"T"),
    wire.ReadyForQuery(b"E"),
    wire.RowDescription((("a", 0, 0, 23, 4, -1, 0), ("b", 16384, 2, 25, -1, -1, 1))),
    wire.DataRow((b"1", None, b"")),
    wire.CommandComplete("SELECT 1"),
    wire.ParseComplete(), wire.BindComplete(), wire.CloseComplete(), wire.NoData(),
    wire.EmptyQueryResponse(), wire.PortalSuspended(),
    wire.ParameterDescription((23, 25)),
    wire.CopyInResponse(0, (0, 0)),
    wire.CopyOutResponse(1, (1,)),
    wire.CopyBothResponse(0, ()),
    wire.CopyData(b"\x00" * 10),
    wire.CopyDone(),
    wire.ErrorResponse((("S", "ERROR"), ("V", "ERROR"), ("C", "42P01"), ("M", "no table"))),
    wire.NoticeResponse((("S", "NOTICE"), ("M", "hello"))),
    wire.NotificationResponse(77, "chan", "payload"),
    wire.FunctionCallResponse(b"xyz"),
    wire.FunctionCallResponse(None),
    wire.NegotiateProtocolVersion(0, ("_pq_.foo",)),
]


def test_every_type_is_covered():
    assert {m.type for m in FRONTEND} == set(wire.FRONTEND_DECODERS)
    assert {m.type for m in BACKEND} == set(wire.BACKEND_DECODERS)


@pytest.mark.parametrize("msg", FRONTEND, ids=lambda m: type(m).__name__)
def test_frontend_round_trip(msg):
    raw = msg.encode()
    assert raw[0:1] == msg.type
    assert struct.unpack("!I", raw[1:5])[0] == len(raw) - 1
    assert wire.decode(msg.type, raw[5:], frontend=True) == msg


@pytest.mark.parametrize("msg", BACKEND, ids=lambda m: type(m).__name__)
def test_backend_round_trip(msg):
    raw = msg.encode()
    assert wire.decode(msg.type, raw[5:], frontend=False) == msg


@pytest.mark.parametrize("msg", [
    wire.StartupMessage((("user", "bob"), ("database", "db"), ("application_name", "x y"))),
    wire.SSLRequest(), wire.GSSENCRequest(), wire.CancelRequest(42, -7)])
def test_startup_packets_round_trip(msg):
    raw = msg.encode()
    assert wire.decode_startup_packet(raw) == msg
    framer = wire.StartupFramer()
    for b in raw[:-1]:
        assert framer.feed(bytes([b])) == (None, b"")
    assert framer.feed(raw[-1:] + b"rest") == (raw, b"rest")


def test_startup_rejects_bad_packets():
    with pytest.raises(ProtocolViolation):
        wire.StartupFramer().feed(struct.pack("!i", 20000))
    with pytest.raises(ProtocolViolation, match="unsupported frontend protocol"):
        wire.decode_startup_packet(struct.pack("!ii", 8, 2 << 16))
    with pytest.raises(ProtocolViolation):
        wire.decode_startup_packet(struct.pack("!ii", 8, wire.PROTOCOL_3_0) + b"user")


def _reassemble(items) -> tuple[bytes, list]:
    raw, msgs = [], []
    for it in items:
        if isinstance(it, Message):
            raw.append(it.raw)
            msgs.append(it)
        else:
            raw.append(bytes(it))
    return b"".join(raw), msgs


def _feed_all(framer: Framer, chunks) -> tuple[bytes, list]:
    raw, msgs = [], []
    for c in chunks:
        r, m = _reassemble(framer.feed(c))
        raw.append(r)
        msgs.extend(m)
    return b"".join(raw), msgs


STREAM = b"".join(m.encode() for m in BACKEND)
INSPECT = frozenset(b"ZERK")


def _expected_inspected():
    return [m for m in BACKEND if m.type[0] in INSPECT]


@pytest.mark.parametrize("mode", ["whole", "byte_by_byte", "coalesced"])
def test_framer_modes(mode):
    framer = Framer(INSPECT, frontend=False)
    if mode == "whole":
        chunks = [STREAM]
    elif mode == "byte_by_byte":
        chunks = [STREAM[i:i + 1] for i in range(len(STREAM))]
    else:  # each message coalesced with the first half of the next
        chunks, pos = [], 0
        for m in BACKEND:
            n = len(m.encode())
            chunks.append(STREAM[pos:pos + n + 3])
            pos += n + 3
        chunks.append(STREAM[pos:])
    raw, msgs = _feed_all(framer, chunks)
    assert raw == STREAM
    assert [m.decode(frontend=False) for m in msgs] == _expected_inspected()
    assert framer.at_boundary


@given(st.lists(st.integers(min_value=1, max_value=64), max_size=200))
@settings(max_examples=200, deadline=None)
def test_framer_any_split(sizes):
    framer = Framer(INSPECT, frontend=False)
    chunks, pos = [], 0
    for s in sizes:
        chunks.append(STREAM[pos:pos + s])
        pos += s
    chunks.append(STREAM[pos:])
    raw, msgs = _feed_all(framer, [c for c in chunks if c])
    assert raw == STREAM
    assert [m.decode(frontend=False) for m in msgs] == _expected_inspected()


def test_framer_streams_large_messages_without_buffering():
    """A 1 GB-limit message is passed through piecewise: the framer never
    holds more than the current read."""
    body_len = 50_000_000
    header = b"D" + struct.pack("!I", body_len + 4)
    framer = Framer(INSPECT, frontend=False)
    out = framer.feed(header + b"x" * 1000)
    assert _reassemble(out)[0] == header + b"x" * 1000
    assert not framer.at_boundary
    remaining = body_len - 1000
    chunk = b"y" * 1_000_000
    while remaining > len(chunk):
        assert framer.feed(chunk) == [chunk]
        remaining -= len(chunk)
    z = wire.ReadyForQuery(b"I").encode()
    out = framer.feed(b"y" * remaining + z)
    raw, msgs = _reassemble(out)
    assert raw == b"y" * remaining + z and msgs[0].body == b"I"
    assert framer.at_boundary


def test_framer_counts_boundaries_and_enforces_limits():
    f = Framer(b"X", frontend=True, allowed=b"QPSXB", count=b"QS")
    f.feed(wire.Query("select 1").encode() + wire.Parse("", "x").encode() + wire.Sync().encode())
    assert f.boundaries == 2
    # the largest legal message header is accepted, one byte more is not
    Framer(b"", frontend=True).feed(b"Q" + struct.pack("!I", wire.MAX_MESSAGE_LEN))
    with pytest.raises(ProtocolViolation, match="invalid message length"):
        Framer(b"", frontend=True).feed(b"Q" + struct.pack("!I", wire.MAX_MESSAGE_LEN + 1))
    with pytest.raises(ProtocolViolation, match="invalid message length"):
        Framer(b"", frontend=True).feed(b"S" + struct.pack("!I", 5) + b"x")
    with pytest.raises(ProtocolViolation, match="invalid message length"):
        Framer(b"", frontend=True).feed(b"D" + struct.pack("!I", 20000))
    with pytest.raises(ProtocolViolation, match="invalid message length"):
        Framer(b"", frontend=True).feed(b"Q" + struct.pack("!I", 3))
    with pytest.raises(ProtocolViolation, match="invalid frontend message type"):
        f.feed(b"?" + struct.pack("!I", 4))


@given(st.binary(max_size=300))
@settings(max_examples=500, deadline=None)
def test_decoders_only_raise_protocol_violation(body):
    for table, frontend in ((wire.FRONTEND_DECODERS, True), (wire.BACKEND_DECODERS, False)):
        for t in table:
            try:
                wire.decode(t, body, frontend=frontend)
            except ProtocolViolation:
                pass


def test_error_response_builder():
    raw = wire.error_response("08P01", "bad", severity="FATAL", hint="h")
    err = wire.decode(b"E", raw[5:], frontend=False)
    assert (err.severity, err.sqlstate, err.message, err.get("H")) == ("FATAL", "08P01", "bad", "h")
