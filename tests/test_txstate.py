"""The backend tracker (proxy/txstate.py) against PostgreSQL's own answers.

Each test sends a sequence of frontend messages to a real PostgreSQL 15
server (no proxy), feeds the same messages and every answer to a
``BackendTracker``, and checks that it attributes each answer to the
message that caused it (a ParseComplete to a Parse, a BindComplete to a
Bind, ...), drops exactly the messages PostgreSQL ignored after an error
(until Sync), and ends with nothing outstanding. Hypothesis generates the
sequences: mixtures of simple and extended messages, Syncs, Flushes,
errors at parse, bind and execute time, and transaction commands.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import wire
from proxy.txstate import BackendTracker
from rawpg import RawClient

MARKER = "SELECT 424242"

# which frontend message kinds may cause each backend message
_CAUSES = {b"1": b"P", b"2": b"B", b"3": b"C", b"t": b"D", b"n": b"DE", b"T": b"DQE",
           b"D": b"EQ", b"C": b"EQ", b"I": b"EQ", b"s": b"E", b"Z": b"SQF", b"E": b"QPBDECSF",
           b"G": b"EQ", b"H": b"EQ", b"d": b"EQ", b"c": b"EQ", b"N": b"QPBDECSF",
           b"S": b"QPBDECSF", b"V": b"F"}


def converse(port: int, msgs: list[wire.PgMessage]):
    """Send ``msgs`` plus Sync and a marker query; feed everything to a
    tracker; return (tracker, ops in order, [(backend message, op)])."""
    c = RawClient(port)
    c.startup()
    msgs = list(msgs) + [wire.Sync(), wire.Query(MARKER)]
    trk = BackendTracker()
    ops = []
    for k, m in enumerate(msgs):
        kind = m.type[0]
        describes = isinstance(m, wire.Describe) and m.kind == b"S"
        ops.append(trk.sent(kind, (k, m.type), describes_statement=describes))
    c.send(b"".join(m.encode() for m in msgs))
    seen = []
    marker_seen = False
    while True:
        m = c.read_message()
        assert m is not None, "connection closed"
        body = m.encode()[5:]
        op, finished = trk.on_backend(m.type[0], body)
        seen.append((m, op.owner if op is not None else "client", finished))
        if isinstance(m, wire.DataRow) and m.values == (b"424242",):
            marker_seen = True
        if marker_seen and m.type == b"Z":
            break
    c.close()
    return trk, ops, seen


def check(trk: BackendTracker, ops: list, seen: list) -> None:
    assert trk.outstanding == 0 and not trk.skipping
    for m, owner, _ in seen:
        assert owner != "client", f"{m!r} attributed to nobody"
        k, kind = owner
        assert kind in _CAUSES[m.type], f"{m!r} attributed to {kind!r} #{k}"
    answered = {owner for _, owner, _ in seen}
    for op in ops:
        if op is None:
            continue
        assert op.skipped == (op.owner not in answered), op


@pytest.fixture(scope="module")
def port(pg):
    pg.psql("CREATE TABLE IF NOT EXISTS txs_t (id int PRIMARY KEY)")
    return pg.port


def test_an_error_skips_everything_up_to_the_sync(port):
    msgs = [wire.Parse("", "SELECT 1"), wire.Bind("", ""), wire.Execute("", 0),
            wire.Parse("", "SELEC oops"), wire.Bind("", ""), wire.Describe(b"P", ""),
            wire.Execute("", 0), wire.Query("SELECT 2"), wire.Flush(), wire.Sync(),
            wire.Parse("", "SELECT 3"), wire.Bind("", ""), wire.Execute("", 0)]
    trk, ops, seen = converse(port, msgs)
    check(trk, ops, seen)
    assert [op.skipped for op in ops[4:8]] == [True, True, True, True]
    assert ops[3].error is not None and b"42601" in ops[3].error
    assert not ops[10].skipped and ops[12].tag == b"SELECT 1"


def test_statuses_and_tags_of_transaction_commands(port):
    msgs = [wire.Parse("", "BEGIN"), wire.Bind("", ""), wire.Execute("", 0), wire.Sync(),
            wire.Query("SAVEPOINT a; SELECT 1/0"), wire.Query("ROLLBACK TO a"),
            wire.Parse("", "COMMIT"), wire.Bind("", ""), wire.Execute("", 0), wire.Sync()]
    trk, ops, seen = converse(port, msgs)
    check(trk, ops, seen)
    assert ops[2].tag == b"BEGIN" and ops[3].status == b"T"
    assert ops[4].status == b"E" and b"22012" in ops[4].error    # no skip inside a Query
    assert ops[5].status == b"T"
    assert ops[8].tag == b"COMMIT" and ops[9].status == b"I"


def test_describe_of_a_statement_and_of_a_portal(port):
    msgs = [wire.Parse("s1", "SELECT $1::int AS x"), wire.Describe(b"S", "s1"),
            wire.Bind("p1", "s1", params=(b"7",)), wire.Describe(b"P", "p1"),
            wire.Execute("p1", 0), wire.Close(b"P", "p1"), wire.Close(b"S", "s1"),
            wire.Parse("", "INSERT INTO txs_t VALUES (1) ON CONFLICT DO NOTHING"),
            wire.Describe(b"S", "")]
    trk, ops, seen = converse(port, msgs)
    check(trk, ops, seen)
    assert ops[1].got_param_desc and ops[4].tag == b"SELECT 1"


def test_copy_both_ways(port):
    msgs = [wire.Query("COPY (SELECT 1) TO STDOUT"),
            wire.Parse("", "COPY txs_t FROM STDIN"), wire.Bind("", ""), wire.Execute("", 0),
            wire.CopyData(b"100\n"), wire.CopyDone(), wire.Sync(),
            wire.Query("DELETE FROM txs_t WHERE id = 100")]
    trk, ops, seen = converse(port, msgs)
    check(trk, ops, seen)
    assert ops[3].tag == b"COPY 1"


_SQL = ["SELECT 1", "SELECT generate_series(1, 3)", "SELEC broken", "SELECT 1/0", "BEGIN",
        "COMMIT", "ROLLBACK", "SAVEPOINT s", "INSERT INTO txs_t VALUES (1) ON CONFLICT DO NOTHING",
        "SELECT 1; SELECT 2", ""]
_names = st.sampled_from(["", "n1"])
_message = st.one_of(
    st.builds(wire.Parse, _names, st.sampled_from([s for s in _SQL if ";" not in s])),
    st.builds(lambda p, s: wire.Bind(p, s), _names, _names),
    st.builds(wire.Describe, st.sampled_from([b"S", b"P"]), _names),
    st.builds(wire.Execute, _names, st.sampled_from([0, 1])),
    st.builds(wire.Close, st.sampled_from([b"S", b"P"]), _names),
    st.builds(wire.Query, st.sampled_from(_SQL)),
    st.just(wire.Flush()), st.just(wire.Sync()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=st.lists(_message, max_size=14))
def test_generated_sequences_are_tracked_exactly(port, msgs):
    trk, ops, seen = converse(port, msgs + [wire.Sync(), wire.Query("ROLLBACK")])
    check(trk, ops, seen)
