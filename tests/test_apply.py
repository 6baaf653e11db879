"""Node A's slot streamed and applied onto node B, both real PostgreSQL 15
servers: data ends identical, prepared transactions keep their gid, applied
transactions carry B's origin for A (so they are never shipped back), and a
change that cannot be applied fails that transaction's PREPARE with a
SQLSTATE instead of diverging."""
from __future__ import annotations

import asyncio

import psycopg
import pytest

from conftest import wait_for
from proxy.pgserver import LocalPostgres
from replication import pgoutput as po
from replication.apply import (APPLIED_TABLE_SQL, Applier, ApplyError, Finished,
                               PrepareFailed, Prepared, Skipped, origin_name)
from replication.stream import SlotStream

SCHEMA = """
CREATE TABLE acc (id int PRIMARY KEY, owner text, amount bigint, doc text);
CREATE TABLE full_t (a int, b text);
ALTER TABLE full_t REPLICA IDENTITY FULL;
CREATE TABLE kinds (id int PRIMARY KEY, j jsonb, arr int[], ts timestamptz, n numeric,
                    by bytea, f float8, u uuid);
CREATE TABLE "We""ird" ("Key" text PRIMARY KEY, "v al" text);
"""


@pytest.fixture(scope="module")
def pair(workdir):
    a = LocalPostgres(workdir / "apply_a", fsync=False).init().start()
    b = LocalPostgres(workdir / "apply_b", fsync=False).init().start()
    for s in (a, b):
        s.psql(SCHEMA)
    a.psql("CREATE PUBLICATION mm_pub FOR ALL TABLES")
    yield a, b
    a.stop("immediate")
    b.stop("immediate")


@pytest.fixture
def slot(pair):
    a, b = pair
    a.psql("SELECT pg_create_logical_replication_slot('to_b', 'pgoutput', false, true)")
    yield
    a.psql("SELECT pg_drop_replication_slot('to_b')")
    for s in (a, b):
        for (gid,) in psycopg.connect(s.dsn()).execute("SELECT gid FROM pg_prepared_xacts"):
            s.psql(f"ROLLBACK PREPARED '{gid}'")
        s.psql("TRUNCATE acc, full_t, kinds")
        # the applier's backend may still be exiting and holding its origin
        wait_for(lambda: _try(s, "SELECT pg_replication_origin_drop(roname) "
                                 "FROM pg_replication_origin"), what="origin released")


def _try(s: LocalPostgres, q: str) -> bool:
    try:
        s.psql(q)
        return True
    except RuntimeError:
        return False


async def pump(a: LocalPostgres, b: LocalPostgres, until_gids_finished: int = 0,
               until_commits: int = 0, *, slot: str = "to_b", until_vote: bool = False,
               until_skipped: int = 0, after_setup=None):
    """Stream A's slot into B until the given numbers of plain commits and
    finished prepared transactions were applied (or, with ``until_vote``,
    until the first vote); returns the results and B's origin progress."""
    stream = SlotStream(a.dsn(), slot, "mm_pub", status_interval_s=0.2)
    target = await psycopg.AsyncConnection.connect(b.dsn(), autocommit=True)
    applier = Applier(target, peer_id=1)
    await applier.setup()
    if after_setup is not None:
        await after_setup()
    results = []
    await stream.start()
    commits = finished = 0
    try:
        async with asyncio.timeout(30):
            async for lsn, msg in stream.messages():
                r = await applier.apply(msg)
                if r is not None:
                    results.append(r)
                if until_vote and isinstance(r, (Prepared, PrepareFailed)):
                    break
                if isinstance(r, Finished):
                    if r.gid is None:
                        commits += 1
                    else:
                        finished += 1
                    stream.confirm(lsn)
                if isinstance(r, Skipped):
                    until_skipped -= 1
                    if until_skipped == 0:
                        break
                    continue
                if not until_vote and not until_skipped and commits >= until_commits \
                        and finished >= until_gids_finished:
                    break
        return results, await applier.applied_lsn()
    finally:
        await stream.close()
        await target.close()


def dump(s: LocalPostgres) -> list:
    with psycopg.connect(s.dsn()) as c:
        # rows in PostgreSQL's own text form (NaN == NaN there)
        return [c.execute(f"SELECT t::text FROM {t} t ORDER BY 1").fetchall()
                for t in ("acc", "full_t", "kinds", '"We""ird"')]


def test_stream_applies_identically(pair, slot):
    a, b = pair
    a.psql("""
INSERT INTO acc VALUES (1, 'ann', 100, NULL), (2, 'bob', 50, repeat('t', 100000));
UPDATE acc SET amount = amount - 10 WHERE id = 1;
UPDATE acc SET amount = 7 WHERE id = 2;          -- TOAST column unchanged
UPDATE acc SET id = 3 WHERE id = 1;              -- key change
INSERT INTO full_t VALUES (1, 'x'), (1, 'x'), (2, NULL);
UPDATE full_t SET b = 'y' WHERE a = 2;
DELETE FROM full_t WHERE a = 1 AND ctid = (SELECT min(ctid) FROM full_t WHERE a = 1);
INSERT INTO kinds VALUES (1, '{"k": [1, {"x": null}]}', '{1,NULL,3}', '2024-01-01 10:00+03',
    1.500, '\\x00ff', 'NaN', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11');
INSERT INTO kinds (id, n) VALUES (2, -0.0000001);
INSERT INTO "We""ird" VALUES ('it''s', 'back\\slash \\x41'), (E'tab\tand ''quotes''', NULL),
    ('ünï ✓', E'new\nline'), ('plain', 'x');
UPDATE "We""ird" SET "v al" = 'a''b\\' WHERE "Key" = 'it''s';
DELETE FROM "We""ird" WHERE "Key" = E'tab\tand ''quotes''';
UPDATE "We""ird" SET "Key" = 'ke''y' WHERE "Key" = 'plain';
""")
    # psql -c runs the whole string as one implicit transaction
    results, applied = asyncio.run(pump(a, b, until_commits=1))
    assert dump(a) == dump(b)
    assert applied > 0
    # B marked what it applied with A's origin: B's own slot would skip it
    b.psql("CREATE PUBLICATION mm_pub FOR ALL TABLES")
    b.psql("SELECT pg_create_logical_replication_slot('probe', 'pgoutput', false, true)")
    b.psql("INSERT INTO acc VALUES (99, 'local on b', 0, NULL)")
    with psycopg.connect(b.dsn(), autocommit=True) as c:
        rows = c.execute("SELECT data FROM pg_logical_slot_get_binary_changes('probe', NULL, "
                         "NULL, 'proto_version', '3', 'publication_names', 'mm_pub')").fetchall()
        c.execute("SELECT pg_drop_replication_slot('probe')")
        c.execute("DROP PUBLICATION mm_pub")
        c.execute("DELETE FROM acc WHERE id = 99")
    assert not any(isinstance(po.decode(bytes(r[0])), po.Origin) for r in rows)
    origin = psycopg.connect(b.dsn()).execute(
        "SELECT remote_lsn FROM pg_replication_origin_status s JOIN pg_replication_origin o "
        "ON o.roident = s.local_id WHERE roname = %s", (origin_name(1),)).fetchone()
    assert origin is not None and po.parse_lsn(origin[0]) == applied


def test_prepared_transactions_keep_their_gid(pair, slot):
    a, b = pair
    with psycopg.connect(a.dsn(), autocommit=True) as c:
        for gid, verb in (("MTM-1-1-1", "COMMIT"), ("MTM-1-1-2", "ROLLBACK")):
            c.execute("BEGIN")
            c.execute("INSERT INTO acc VALUES (%s, %s, 1, NULL)", (len(gid) + int(gid[-1]), gid))
            c.execute(f"PREPARE TRANSACTION '{gid}'")
        # a nextval-only prepared transaction: a lone COMMIT PREPARED
        c.execute("CREATE SEQUENCE IF NOT EXISTS sq")
        c.execute("BEGIN")
        c.execute("SELECT nextval('sq')")
        c.execute("PREPARE TRANSACTION 'MTM-1-1-3'")
        c.execute("COMMIT PREPARED 'MTM-1-1-3'")

        async def run():
            task = asyncio.create_task(pump(a, b, until_gids_finished=3))
            # B must hold both gids prepared before A decides
            def prepared_on_b():
                with psycopg.connect(b.dsn()) as conn:
                    return {g for (g,) in conn.execute("SELECT gid FROM pg_prepared_xacts")}
            async with asyncio.timeout(20):
                while prepared_on_b() != {"MTM-1-1-1", "MTM-1-1-2"}:
                    await asyncio.sleep(0.05)
            c.execute("COMMIT PREPARED 'MTM-1-1-1'")
            c.execute("ROLLBACK PREPARED 'MTM-1-1-2'")
            return await task
        results, _ = asyncio.run(run())
    assert Prepared("MTM-1-1-1") in results and Prepared("MTM-1-1-2") in results
    assert Finished("MTM-1-1-1", True, True, here=True) in results
    assert Finished("MTM-1-1-2", False, True, here=True) in results
    assert Finished("MTM-1-1-3", True, False) in results   # unknown gid: ignored
    assert dump(a) == dump(b)


def test_unapplicable_change_fails_the_prepare(pair, slot):
    a, b = pair
    a.psql("INSERT INTO acc VALUES (5, 'five', 5, NULL)")
    asyncio.run(pump(a, b, until_commits=1))
    b.psql("DELETE FROM acc WHERE id = 5")           # B diverged (e.g. a local table)
    with psycopg.connect(a.dsn(), autocommit=True) as c:
        c.execute("BEGIN")
        c.execute("UPDATE acc SET amount = 6 WHERE id = 5")
        c.execute("INSERT INTO acc VALUES (6, 'six', 6, NULL)")
        c.execute("PREPARE TRANSACTION 'MTM-1-1-4'")
        results, _ = asyncio.run(_until_vote(a, b))
        c.execute("ROLLBACK PREPARED 'MTM-1-1-4'")
    [vote] = [r for r in results if isinstance(r, (Prepared, PrepareFailed))]
    assert isinstance(vote, PrepareFailed) and vote.sqlstate == "02000"
    assert "row to update not found in public.acc" in vote.message
    # nothing of it stayed on B - not even prepared (the row checks are read
    # after the batch that ends with PREPARE) - and B is not left inside a
    # transaction
    assert psycopg.connect(b.dsn()).execute(
        "SELECT count(*) FROM acc WHERE id = 6").fetchone() == (0,)
    assert psycopg.connect(b.dsn()).execute(
        "SELECT count(*) FROM pg_prepared_xacts").fetchone() == (0,)


async def _until_vote(a, b, slot: str = "to_b"):
    """Apply A's slot onto B until the first vote (prepared or failed)."""
    return await pump(a, b, slot=slot, until_vote=True)


def test_replayed_transactions_are_skipped(pair, slot):
    """A stream restarted from an old position resends transactions B has
    already applied: the applier recognises them by its origin's progress."""
    a, b = pair
    a.psql("SELECT pg_create_logical_replication_slot('replay', 'pgoutput', false, true)")
    a.psql("INSERT INTO acc VALUES (30, 'once', 1, NULL)")
    with psycopg.connect(a.dsn(), autocommit=True) as c:
        c.execute("BEGIN")
        c.execute("INSERT INTO acc VALUES (31, 'prepared once', 1, NULL)")
        c.execute("PREPARE TRANSACTION 'MTM-1-1-30'")
        asyncio.run(_until_vote(a, b))
        # the same transactions again, from a slot that never moved
        results, _ = asyncio.run(_until_vote(a, b, slot="replay"))
        c.execute("COMMIT PREPARED 'MTM-1-1-30'")
    a.psql("SELECT pg_drop_replication_slot('replay')")
    assert Finished(None, True, False) in results    # the plain commit: skipped
    assert Prepared("MTM-1-1-30") in results         # already prepared here
    asyncio.run(pump(a, b, until_gids_finished=1))
    assert dump(a)[0] == dump(b)[0]


def test_replay_below_the_applied_position_applies_what_was_missed(pair, slot):
    """With parallel apply, a later transaction can be applied (and move an
    origin's progress past an earlier one) while the earlier one is not: a
    replay then looks each transaction up (prepared? recorded in
    mtm.applied?) instead of trusting the position, and applies what is
    missing - and only that."""
    a, b = pair
    a.psql("SELECT pg_create_logical_replication_slot('replay2', 'pgoutput', false, true)")
    a.psql("INSERT INTO acc VALUES (40, 'first', 1, NULL)")
    a.psql("INSERT INTO acc VALUES (41, 'second', 1, NULL)")
    a.psql("INSERT INTO acc VALUES (42, 'third', 1, NULL)")
    asyncio.run(pump(a, b, until_commits=3))
    # as if the second had never been applied here
    with psycopg.connect(b.dsn(), autocommit=True) as c:
        c.execute("SET session_replication_role = replica")
        c.execute("DELETE FROM acc WHERE id = 41")
        [key] = c.execute("SELECT key FROM mtm.applied ORDER BY lsn DESC OFFSET 1 LIMIT 1")\
            .fetchone()
        c.execute("DELETE FROM mtm.applied WHERE key = %s", (key,))
    results, _ = asyncio.run(pump(a, b, slot="replay2", until_commits=3))
    a.psql("SELECT pg_drop_replication_slot('replay2')")
    assert [r.applied for r in results if isinstance(r, Finished)][-3:] == [False, True, False]
    assert dump(a)[0] == dump(b)[0]


def test_committed_transaction_that_cannot_apply_is_an_error(pair, slot):
    a, b = pair
    b.psql("INSERT INTO acc VALUES (8, 'already on b', 0, NULL)")
    a.psql("INSERT INTO acc VALUES (8, 'conflict', 0, NULL)")
    with pytest.raises(ApplyError, match="applying a committed transaction of node 1 failed: 23505"):
        asyncio.run(pump(a, b, until_commits=1))


def test_transaction_end_without_begin_is_refused(pair):
    """A stream that restarts mid-transaction must not make the applier
    PREPARE (PostgreSQL would only warn outside a transaction) and vote for
    a transaction it does not hold."""
    a, b = pair

    async def run():
        conn = await psycopg.AsyncConnection.connect(b.dsn(), autocommit=True)
        try:
            applier = Applier(conn, peer_id=1)
            await applier.setup()
            for msg in (po.Prepare(0, 10, 20, 0, 1, "MTM-1-1-99"), po.Commit(0, 10, 20, 0)):
                with pytest.raises(ApplyError, match="without a BEGIN"):
                    await applier.apply(msg)
        finally:
            await conn.close()
    asyncio.run(run())
    assert psycopg.connect(b.dsn()).execute("SELECT count(*) FROM pg_prepared_xacts").fetchone() \
        == (0,)


def test_apply_horizon_is_durable_and_trims_applied_records(pair, tmp_path):
    """The node advances each peer's apply horizon to what it applied
    contiguously and drops the mtm.applied rows at or below it, in one
    transaction; the horizon never moves back."""
    from config import load_config
    from replication.node import ReplicationNode
    _, b = pair
    cfg = tmp_path / "n.toml"
    cfg.write_text(f'[node]\nid = 1\nlisten = "127.0.0.1:1"\ninternode_listen = "127.0.0.1:2"\n'
                   f'[postgres]\nhost = "127.0.0.1"\nport = {b.port}\n'
                   '[[peers]]\nid = 2\nclient_address = "127.0.0.1:3"\n'
                   'node_address = "127.0.0.1:4"\n')

    async def run():
        node = ReplicationNode(load_config(cfg))
        conn = await psycopg.AsyncConnection.connect(b.dsn(), autocommit=True)
        try:
            await conn.execute("CREATE SCHEMA IF NOT EXISTS mtm")
            await conn.execute(APPLIED_TABLE_SQL)
            await conn.execute("DELETE FROM mtm.applied WHERE peer IN (2, 3)")
            await conn.execute("DELETE FROM mtm.apply_progress")
            await conn.execute("INSERT INTO mtm.applied VALUES ('a', 2, '0/10'), "
                               "('b', 2, '0/20'), ('c', 2, '0/30'), ('d', 3, '0/5')")
            node.acked = {2: 0x20}
            await node.forget_applied_round()
            node.acked = {2: 0x15}              # a restarted stream's first acks
            await node.forget_applied_round()
            left = await (await conn.execute(
                "SELECT key FROM mtm.applied WHERE peer IN (2, 3) ORDER BY key")).fetchall()
            assert left == [("c",), ("d",)]
            assert await (await conn.execute("SELECT peer, lsn::text FROM mtm.apply_progress")
                          ).fetchall() == [(2, "0/20")]
        finally:
            await conn.close()
            await node.pool.close()
    asyncio.run(run())


def _drop_replay_slots(a, b) -> None:
    """Undo the two replay tests' slots, rows, horizon and origins."""
    for s in ("to_b", "to_b_again"):
        a.psql(f"SELECT pg_drop_replication_slot('{s}')")
    b.psql("DELETE FROM mtm.apply_progress")
    b.psql("TRUNCATE acc")
    a.psql("TRUNCATE acc")
    wait_for(lambda: _try(b, "SELECT pg_replication_origin_drop(roname) "
                             "FROM pg_replication_origin"), what="origin released")


def test_a_resent_transaction_at_or_below_the_horizon_is_never_applied_again(pair):
    """After a crash of the peer's PostgreSQL its slot's confirmed position
    can go back to its last checkpoint, long after our mtm.applied rows for
    what it resends were trimmed. An UPDATE carries whole new rows: applied
    again, it would write an old value back (money created in a bank).
    Below the durable horizon it is skipped."""
    a, b = pair
    for s in ("to_b", "to_b_again"):
        a.psql(f"SELECT pg_create_logical_replication_slot('{s}', 'pgoutput', false, true)")
    try:
        a.psql("INSERT INTO acc VALUES (1, 'ann', 100, NULL)")
        a.psql("UPDATE acc SET amount = 110 WHERE id = 1")
        a.psql("UPDATE acc SET amount = 120 WHERE id = 1")
        results, _ = asyncio.run(pump(a, b, until_commits=3))
        assert psycopg.connect(b.dsn()).execute("SELECT amount FROM acc").fetchone() == (120,)
        # what the node does once they are acknowledged: the horizon moves
        # past all three (A's current WAL position) and their rows go
        horizon = a.psql("SELECT pg_current_wal_lsn()").strip()
        b.psql("DELETE FROM mtm.applied WHERE peer = 1")
        b.psql(f"INSERT INTO mtm.apply_progress VALUES (1, '{horizon}') "
               "ON CONFLICT (peer) DO UPDATE SET lsn = excluded.lsn")
        results, _ = asyncio.run(pump(a, b, slot="to_b_again", until_skipped=3))
        assert [type(r).__name__ for r in results] == ["Skipped"] * 3
        assert psycopg.connect(b.dsn()).execute("SELECT amount FROM acc").fetchone() == (120,)
    finally:
        _drop_replay_slots(a, b)


def test_a_trim_after_the_appliers_setup_never_lets_a_replay_apply_again(pair):
    """A receiver restarts (a peer's proxy came back) and sets its appliers
    up, reading the durable horizon; then the node's periodic trim commits:
    the horizon moves past what the restarted stream resends and those
    transactions' mtm.applied rows go. The replays must still be skipped:
    found neither prepared nor recorded, they were applied a second time
    (money created in the all-faults campaign, round 83)."""
    a, b = pair
    for s in ("to_b", "to_b_again"):
        a.psql(f"SELECT pg_create_logical_replication_slot('{s}', 'pgoutput', false, true)")
    try:
        a.psql("INSERT INTO acc VALUES (1, 'ann', 100, NULL)")
        a.psql("UPDATE acc SET amount = 110 WHERE id = 1")
        a.psql("UPDATE acc SET amount = 120 WHERE id = 1")
        asyncio.run(pump(a, b, until_commits=3))
        horizon = a.psql("SELECT pg_current_wal_lsn()").strip()

        async def trim():     # what ReplicationNode.forget_applied_round commits
            async with await psycopg.AsyncConnection.connect(b.dsn(), autocommit=True) as c:
                async with c.transaction():
                    await c.execute("INSERT INTO mtm.apply_progress VALUES (1, %s) ON CONFLICT "
                                    "(peer) DO UPDATE SET lsn = excluded.lsn", (horizon,))
                    await c.execute("DELETE FROM mtm.applied WHERE peer = 1")
        results, _ = asyncio.run(pump(a, b, slot="to_b_again", until_skipped=3,
                                      after_setup=trim))
        assert [type(r).__name__ for r in results] == ["Skipped"] * 3
        assert psycopg.connect(b.dsn()).execute("SELECT amount FROM acc").fetchone() == (120,)
    finally:
        _drop_replay_slots(a, b)


def _acc_relation() -> po.Relation:
    return po.Relation(16384, "public", "acc", "d", (
        po.Column(True, "id", 23, -1), po.Column(False, "owner", 25, -1),
        po.Column(False, "amount", 20, -1), po.Column(False, "doc", 25, -1)))


def _insert(gid: str, end: int, row_id: int, origin: po.Origin | None = None) -> list:
    rel = _acc_relation()
    msgs = [rel, po.BeginPrepare(end - 0x40, end, 0, 700, gid)]
    if origin is not None:
        msgs.append(origin)
    msgs += [po.Insert(rel.relid, po.Tuple((str(row_id).encode(), b"ann", b"5", None),
                                            (False,) * 4)),
             po.Prepare(0, end - 0x40, end, 0, 700, gid)]
    return msgs


@pytest.mark.parametrize("plain", [False, True])
def test_a_catch_up_copy_is_recognised_by_the_origins_own_stream(pair, plain):
    """Node 2 catches up from node 1 (the donor) and applies node 3's
    transaction from node 1's stream: under node 3's replication origin, at
    node 3's own LSN (the ORIGIN message's), recorded as node 3's - as a
    PREPARE then COMMIT PREPARED, or (look-ahead) as one plain commit. When
    node 3's own stream sends it later, it is recognised, never applied a
    second time (a PREPARE recorded at the donor's LSN once made node 3's
    progress lie, and the transaction was applied twice)."""
    _, b = pair
    gid = "MTM-3-5-%d" % (100 + plain)
    row = 900 + plain
    b.psql("CREATE SCHEMA IF NOT EXISTS mtm; " + APPLIED_TABLE_SQL)
    b.psql("DELETE FROM mtm.applied WHERE peer IN (1, 3)")
    b.psql("DELETE FROM mtm.apply_progress")
    # (the receiver makes every origin catch-up may use: receiver.ensure_origins)
    b.psql("SELECT pg_replication_origin_create('mtm_node_3') WHERE NOT EXISTS "
           "(SELECT 1 FROM pg_replication_origin WHERE roname = 'mtm_node_3')")

    async def run():
        conn = await psycopg.AsyncConnection.connect(b.dsn(), autocommit=True)
        conn3 = await psycopg.AsyncConnection.connect(b.dsn(), autocommit=True)
        try:
            donor = Applier(conn, peer_id=1, catchup_for=2)
            await donor.setup()
            if plain:
                donor.commit_plain()
            out = []
            for m in _insert(gid, 0x1000, row, po.Origin(0x9000, "mtm_node_3_2")):
                r = await donor.apply(m)
                if r is not None:
                    out.append(r)
            if not plain:
                out.append(await donor.apply(po.CommitPrepared(0, 0x1100, 0x1140, 0, 700, gid)))
            assert [type(r).__name__ for r in out] == (["Finished"] if plain
                                                       else ["Prepared", "Finished"])
            own = Applier(conn3, peer_id=3)         # node 3's stream, set up afresh
            await own.setup()
            assert await own.applied_lsn() >= 0x9000
            got = [r for m in _insert(gid, 0x9000, row) if (r := await own.apply(m))]
            assert got == [Finished(gid, True, False, here=True)]
            # and a donor's stream resent (a restarted catch-up) finds it too,
            # in the same round trip as its rows (mtm.apply_check)
            again = Applier(conn, peer_id=1, catchup_for=2)
            await again.setup()
            if plain:
                again.commit_plain()
            got = [r for m in _insert(gid, 0x1000, row, po.Origin(0x9000, "mtm_node_3_2"))
                   if (r := await again.apply(m))]
            assert got == [Finished(gid, True, False, here=True)]
        finally:
            await conn.close()
            await conn3.close()
    asyncio.run(run())
    assert psycopg.connect(b.dsn()).execute("SELECT count(*) FROM acc WHERE id = %s",
                                            (row,)).fetchone() == (1,)
    rows = psycopg.connect(b.dsn()).execute(
        "SELECT peer, lsn::text FROM mtm.applied WHERE key = %s", (gid,)).fetchall()
    assert rows == [(3, "0/9000")]
    b.psql("TRUNCATE acc")
    wait_for(lambda: _try(b, "SELECT pg_replication_origin_drop(roname) "
                             "FROM pg_replication_origin"), what="origin released")
