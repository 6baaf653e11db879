"""Through a cluster node, a client's messages get exactly PostgreSQL's
answers (issue 10).

Each test sends the same frontend messages, byte for byte, to a standalone
PostgreSQL 15 and to node 1 of a 3-node cluster, and compares the answers
message by message. Only what identifies PostgreSQL's own source code in an
error or notice (fields F, L, R: file, line, routine) is left out, since an
answer the proxy gives itself has none, and so is the table OID in a
RowDescription (OIDs differ between any two databases); everything else - every message,
its order, severity, SQLSTATE, text, ReadyForQuery status - must be equal.
Then the committed data must be equal too, and the same on every node.

The scripted sequences are the ones that broke drivers (issue 10); the
generated ones mix simple and extended messages, Syncs, Flushes, errors
and transaction commands.
"""
from __future__ import annotations

import itertools
import os
import time

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Cluster, wait_for
from proxy import wire
from rawpg import RawClient

MARKER = "SELECT 424242"
TABLE = "wcmp"
_counter = itertools.count(1)


@pytest.fixture(scope="module")
def targets(workdir, pg):
    c = Cluster(workdir, 3, name="wcmp")
    schema = (f"CREATE TABLE {TABLE} (id int PRIMARY KEY, v text); "
              f"CREATE TABLE {TABLE}_d (id int PRIMARY KEY "
              "DEFERRABLE INITIALLY DEFERRED)")
    pg.psql(f"DROP TABLE IF EXISTS {TABLE}, {TABLE}_d; {schema}")
    with psycopg.connect(c.dsn(1), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, v text)")
        conn.execute(f"CREATE TABLE {TABLE}_d (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED)")
    yield pg, c
    c.stop()


def _normalize(m) -> tuple:
    if isinstance(m, (wire.ErrorResponse, wire.NoticeResponse)):
        return (m.type, tuple((k, v) for k, v in m.fields if k not in "FLR"))
    if isinstance(m, wire.ParameterStatus):
        return (m.type, m.name)          # values such as application_name are the same
    if isinstance(m, wire.RowDescription):
        # a table's OID differs between any two databases
        return (m.type, tuple((f[0], 0) + tuple(f[2:]) for f in m.fields))
    return (m.type, m.encode())


def converse(port: int, msgs: list) -> list:
    c = RawClient(port)
    c.startup()
    # ROLLBACK first: the marker must run whatever state the sequence left
    # (a transaction left open would be rolled back at disconnect anyway)
    c.send(b"".join(m.encode() for m in msgs) + wire.Sync().encode()
           + wire.Query("ROLLBACK").encode() + wire.Query(MARKER).encode())
    out = []
    marker = False
    while True:
        m = c.read_message()
        assert m is not None, f"connection closed after {out}"
        if isinstance(m, wire.DataRow) and m.values == (b"424242",):
            marker = True
        out.append(m)
        if marker and m.type == b"Z":
            break
    c.close()
    return out


def reset(targets) -> None:
    pg, c = targets
    pg.psql(f"TRUNCATE {TABLE}, {TABLE}_d")
    with psycopg.connect(c.dsn(1), autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLE}, {TABLE}_d")


def data(dsn: str) -> list:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(f"SELECT * FROM {TABLE} ORDER BY id").fetchall()


def compare(targets, msgs: list) -> list:
    """Run ``msgs`` on both; assert equal answers and data; return the answers."""
    pg, c = targets
    reset(targets)
    want = converse(pg.port, msgs)
    got = converse(c.proxies[0].port, msgs)
    assert [_normalize(m) for m in got] == [_normalize(m) for m in want], (
        "answers differ:\n  postgres: " + " ".join(m.type.decode() for m in want)
        + "\n  cluster:  " + " ".join(m.type.decode() for m in got))
    expected = data(pg.dsn())
    for i in (1, 2, 3):
        wait_for(lambda i=i: data(c.direct(i).dsn()) == expected, timeout=10,
                 what=f"node {i} to hold what PostgreSQL holds")
    for i in (1, 2, 3):
        assert psycopg.connect(c.direct(i).dsn()).execute(
            "SELECT count(*) FROM pg_prepared_xacts").fetchone() == (0,)
    return want


def ext(sql: str, name: str = "", portal: str = "", describe: bool = False) -> list:
    msgs = [wire.Parse(name, sql), wire.Bind(portal, name)]
    if describe:
        msgs.append(wire.Describe(b"P", portal))
    return msgs + [wire.Execute(portal, 0)]


def ins(n: int) -> str:
    return f"INSERT INTO {TABLE} VALUES ({n}, 'v{n}')"


def test_jdbc_begin_in_the_batch_of_the_first_statement_then_rollback(targets):
    """pgjdbc with autocommit off: BEGIN through the extended protocol in
    the same batch as the first statement; its rollback() rolls back."""
    compare(targets, ext("BEGIN") + ext(ins(1)) + [wire.Sync()]
            + ext("ROLLBACK") + [wire.Sync()] + ext(f"SELECT count(*) FROM {TABLE}")
            + [wire.Sync()])
    # and a statement after a failed one in that transaction gets 25P02
    answers = compare(targets, ext("BEGIN") + ext(ins(1)) + [wire.Sync()]
                      + ext(ins(1)) + [wire.Sync()] + ext(ins(2)) + [wire.Sync()]
                      + ext("COMMIT") + [wire.Sync()])
    codes = [dict(m.fields)["C"] for m in answers if isinstance(m, wire.ErrorResponse)]
    assert codes == ["23505", "25P02"]


def test_autosave_always_a_query_between_extended_messages(targets):
    """pgjdbc autosave=always: Parse/Bind/Execute BEGIN, Query SAVEPOINT,
    Parse/Bind/Execute INSERT, Sync in one write: answered in order."""
    compare(targets, ext("BEGIN") + [wire.Query("SAVEPOINT s1")] + ext(ins(1))
            + [wire.Sync()] + [wire.Query("SAVEPOINT s1")] + ext(ins(1))
            + [wire.Sync(), wire.Query("ROLLBACK TO s1")] + ext(ins(2)) + [wire.Sync()]
            + ext("COMMIT") + [wire.Sync()])


def test_a_write_answered_before_sync_flush_then_sync(targets):
    """node-postgres pg-cursor: INSERT ... RETURNING in autocommit with
    Flush and no Sync, read in pieces, then Sync: committed once."""
    compare(targets, [wire.Parse("", f"{ins(1)} RETURNING id"), wire.Bind("c1", ""),
                      wire.Describe(b"P", "c1"), wire.Execute("c1", 1), wire.Flush(),
                      wire.Execute("c1", 1), wire.Flush(), wire.Sync()])


def test_an_autocommit_statement_whose_commit_fails_gets_only_the_error(targets):
    """A deferred constraint fails at commit: PostgreSQL sends the error and
    no CommandComplete for a simple Query; at Sync for the extended
    protocol."""
    pg, _ = targets
    msgs = [wire.Query(f"INSERT INTO {TABLE}_d VALUES (1), (1)")]
    answers = compare(targets, msgs)
    assert [m.type for m in answers[:2]] == [b"E", b"Z"]
    compare(targets, ext(f"INSERT INTO {TABLE}_d VALUES (2), (2)") + [wire.Sync()])


def test_a_query_string_with_its_own_transaction(targets):
    compare(targets, [wire.Query(f"BEGIN; {ins(1)}; COMMIT")])
    compare(targets, [wire.Query(f"{ins(1)}; BEGIN; {ins(2)}; COMMIT; {ins(3)}")])
    compare(targets, [wire.Query(f"{ins(1)}; COMMIT; {ins(2)}")])          # warning
    compare(targets, [wire.Query(f"{ins(1)}; ROLLBACK; {ins(2)}")])        # warning
    compare(targets, [wire.Query(f"{ins(1)}; SAVEPOINT a; {ins(2)}")])      # error
    compare(targets, [wire.Query(f"BEGIN; {ins(1)}; {ins(1)}; COMMIT"), wire.Query("ROLLBACK")])
    # A documented limit: one transaction with a temporary table and a
    # replicated write cannot be prepared; refused, nothing committed.
    _, c = targets
    reset(targets)
    got = converse(c.proxies[0].port, [wire.Query(f"CREATE TEMP TABLE x (i int); {ins(1)}")])
    assert [m.type for m in got[:3]] == [b"C", b"E", b"Z"]
    assert dict(got[1].fields)["C"] == "0A000" and "temporary" in dict(got[1].fields)["M"]
    assert data(c.direct(1).dsn()) == []


def test_answers_stay_in_order_under_pipelining(targets):
    compare(targets, ext(ins(1)) + [wire.Sync()] + [wire.Query(f"SELECT * FROM {TABLE}")]
            + ext(ins(2)) + ext(ins(2)) + [wire.Sync()] + ext(ins(3)) + [wire.Sync()]
            + [wire.Query("BEGIN")] + ext(ins(4)) + [wire.Sync(), wire.Query("COMMIT")])


def test_copy_data_sent_before_the_copy_in_response(targets):
    """asyncpg's copy_records_to_table in autocommit: COPY, then its data and
    CopyDone without waiting for CopyInResponse (a separate write, read
    separately by the proxy); once that is answered, the same again (failing
    on a duplicate key), then once more. Each COPY's data must wait for
    that COPY (PostgreSQL drops COPY data it gets outside a COPY)."""
    pg, c = targets

    def run(port: int) -> list:
        client = RawClient(port)
        client.startup()
        out = []
        for rows in (b"1\ta\n2\tb\n", b"3\tc\n1\tdup\n", b"4\td\n"):
            client.send(wire.Query(f"COPY {TABLE} FROM STDIN").encode())
            time.sleep(0.05)
            client.send(wire.CopyData(rows).encode() + wire.CopyDone().encode())
            out += [_normalize(m) for m in client.read_until(b"Z")]
        client.close()
        return out
    reset(targets)
    want = run(pg.port)
    got = run(c.proxies[0].port)
    assert got == want
    for i in (1, 2, 3):
        wait_for(lambda i=i: data(c.direct(i).dsn()) == data(pg.dsn()), timeout=10,
                 what=f"node {i} to hold what PostgreSQL holds")


def test_notify_in_a_transaction_that_writes(targets):
    """Delivered after the commit, on the node, as PostgreSQL delivers it."""
    _, c = targets
    reset(targets)
    with psycopg.connect(c.dsn(1), autocommit=True) as listener:
        listener.execute("LISTEN ch")
        compare(targets, [wire.Query("BEGIN"), wire.Query(ins(1)),
                          wire.Query("NOTIFY ch, 'after commit'"), wire.Query("COMMIT")])
        compare(targets, ext("BEGIN") + ext(ins(1)) + ext("NOTIFY ch, 'extended'")
                + ext("COMMIT") + [wire.Sync()])
        compare(targets, [wire.Query(f"BEGIN; {ins(1)}; NOTIFY ch, 'rolled back'; ROLLBACK")])
        got = [n.payload for n in listener.notifies(timeout=2, stop_after=2)]
    assert got == ["after commit", "extended"]


def test_procedures_and_do_blocks_that_commit_are_refused_before_they_commit(targets):
    """A documented difference: refused with 0A000, nothing committed."""
    _, c = targets
    reset(targets)
    with psycopg.connect(c.dsn(1), autocommit=True) as conn:
        conn.execute(f"""CREATE OR REPLACE PROCEDURE wcmp_p() LANGUAGE plpgsql AS $$
                         BEGIN {ins(7)}; COMMIT; {ins(8)}; END $$""")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="COMMIT or ROLLBACK"):
            conn.execute("CALL wcmp_p()")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="COMMIT or ROLLBACK"):
            conn.execute(f"DO $$BEGIN {ins(9)}; COMMIT; END$$")
        conn.execute("BEGIN")           # inside a transaction PostgreSQL itself refuses
        with pytest.raises(psycopg.errors.InvalidTransactionTermination):
            conn.execute("CALL wcmp_p()")
        conn.execute("ROLLBACK")
    for i in (1, 2, 3):
        assert data(c.direct(i).dsn()) == []


# -- generated sequences --------------------------------------------------------------

_STATEMENTS = ["BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT s", "RELEASE s", "ROLLBACK TO s",
               "SELECT 1/0", f"SELECT count(*) FROM {TABLE}", "INS", "DUP", "UPD", "RET",
               f"SELECT id FROM {TABLE}", "END"]


def _sql(kind: str, n: int) -> str:
    if kind == "INS":
        return ins(100 + n)
    if kind == "DUP":
        return ins(1)
    if kind == "UPD":
        return f"UPDATE {TABLE} SET v = 'u{n}' WHERE id = 1"
    if kind == "RET":
        return f"INSERT INTO {TABLE} VALUES ({200 + n}, 'r'), ({300 + n}, 'r') RETURNING id"
    return kind


@st.composite
def _sequences(draw):
    msgs = []
    for n in range(draw(st.integers(1, 10))):
        form = draw(st.sampled_from(["query", "multi", "ext", "ext", "named", "sync", "sync",
                                     "flush"]))
        kind = draw(st.sampled_from(_STATEMENTS))
        if form == "query":
            msgs.append(wire.Query(_sql(kind, n)))
        elif form == "multi":
            other = draw(st.sampled_from(_STATEMENTS))
            msgs.append(wire.Query(f"{_sql(kind, n)}; {_sql(other, n + 50)}"))
        elif form == "ext":
            msgs += ext(_sql(kind, n), describe=draw(st.booleans()))
        elif form == "named":
            # a named statement and portal, Described, run a row at a time
            # (a suspended portal), then closed
            name = f"s{n}"
            msgs += [wire.Parse(name, _sql(kind, n)), wire.Describe(b"S", name),
                     wire.Bind("p", name), wire.Describe(b"P", "p"), wire.Execute("p", 1)]
            if draw(st.booleans()):
                msgs += [wire.Flush(), wire.Execute("p", 0)]
            msgs += [wire.Close(b"P", "p"), wire.Close(b"S", name)]
        elif form == "sync":
            msgs.append(wire.Sync())
        else:
            msgs.append(wire.Flush())
    return [wire.Query(ins(1))] + msgs


@settings(max_examples=int(os.environ.get("MMPROXY_COMPARE_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(msgs=_sequences())
def test_generated_sequences_answer_and_commit_as_postgresql_does(targets, msgs):
    compare(targets, msgs)
