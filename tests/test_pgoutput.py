"""The pgoutput decoder against what a real PostgreSQL 15 slot emits: plain
and prepared transactions (two-phase decoding), COMMIT/ROLLBACK PREPARED,
logical messages, replication origins, every DML kind and TOAST."""
from __future__ import annotations

import struct

import psycopg
import pytest

from replication import pgoutput as po

OPTS = ("'proto_version', '3', 'publication_names', 'mm_pub', 'messages', 'true', "
        "'two_phase', 'true'")


@pytest.fixture
def db(pg):
    name = "pgout"
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    pg.psql(f"CREATE DATABASE {name}")
    conn = psycopg.connect(pg.dsn(dbname=name), autocommit=True)
    conn.execute("CREATE TABLE acc (id int PRIMARY KEY, owner text, amount bigint, doc text)")
    conn.execute("CREATE TABLE full_t (a int, b text)")
    conn.execute("ALTER TABLE full_t REPLICA IDENTITY FULL")
    conn.execute("CREATE PUBLICATION mm_pub FOR ALL TABLES")
    conn.execute("SELECT pg_create_logical_replication_slot('s1', 'pgoutput', false, true)")
    yield conn
    conn.execute("SELECT pg_drop_replication_slot('s1')")
    conn.close()
    pg.psql(f"DROP DATABASE {name} WITH (FORCE)")


def changes(conn) -> list:
    rows = conn.execute(f"SELECT data FROM pg_logical_slot_get_binary_changes("
                        f"'s1', NULL, NULL, {OPTS})").fetchall()
    return [po.decode(bytes(r[0])) for r in rows]


def kinds(msgs) -> list[str]:
    return [type(m).__name__ for m in msgs]


def test_plain_transaction_all_dml(db):
    with db.transaction():
        db.execute("INSERT INTO acc VALUES (1, 'ann', 100, NULL), (2, 'bob', 50, 'x')")
        db.execute("UPDATE acc SET amount = amount - 10 WHERE id = 1")
        db.execute("UPDATE acc SET id = 3 WHERE id = 2")   # key change: old key sent
        db.execute("DELETE FROM acc WHERE id = 1")
        db.execute("INSERT INTO full_t VALUES (1, 'a')")
        db.execute("UPDATE full_t SET b = 'b'")
    msgs = changes(db)
    assert kinds(msgs) == ["Begin", "Relation", "Insert", "Insert", "Update", "Update", "Delete",
                           "Relation", "Insert", "Update", "Commit"]
    rel = msgs[1]
    assert (rel.namespace, rel.name, rel.replica_identity) == ("public", "acc", "d")
    assert [(c.name, c.is_key, c.type_oid) for c in rel.columns] == \
        [("id", True, 23), ("owner", False, 25), ("amount", False, 20), ("doc", False, 25)]
    assert msgs[2].new.values == (b"1", b"ann", b"100", None)
    upd = msgs[4]
    assert upd.old is None and upd.new.values == (b"1", b"ann", b"90", None)
    keychange = msgs[5]
    assert keychange.old_kind == "K" and keychange.old.values[0] == b"2"
    assert msgs[6].old_kind == "K" and msgs[6].old.values[0] == b"1"
    assert msgs[7].replica_identity == "f"
    full_upd = msgs[9]
    assert full_upd.old_kind == "O" and full_upd.old.values == (b"1", b"a")
    assert msgs[0].xid > 0 and msgs[-1].commit_lsn > 0


def test_prepared_transaction_decoded_at_prepare(db):
    db.execute("BEGIN")
    db.execute("INSERT INTO acc VALUES (10, 'p', 1, NULL)")
    db.execute("SELECT pg_logical_emit_message(true, 'mtm_ddl', 'CREATE TABLE x ()')")
    db.execute("PREPARE TRANSACTION 'MTM-1-1-7'")
    msgs = changes(db)
    assert kinds(msgs) == ["BeginPrepare", "Relation", "Insert", "Message", "Prepare"]
    assert msgs[0].gid == msgs[-1].gid == "MTM-1-1-7"
    m = msgs[3]
    assert (m.transactional, m.prefix, m.content) == (True, "mtm_ddl", b"CREATE TABLE x ()")
    db.execute("COMMIT PREPARED 'MTM-1-1-7'")
    [cp] = changes(db)
    assert isinstance(cp, po.CommitPrepared) and cp.gid == "MTM-1-1-7"
    assert cp.xid == msgs[0].xid
    db.execute("BEGIN")
    db.execute("INSERT INTO acc VALUES (11, 'q', 1, NULL)")
    db.execute("PREPARE TRANSACTION 'MTM-1-1-8'")
    changes(db)
    db.execute("ROLLBACK PREPARED 'MTM-1-1-8'")
    [rp] = changes(db)
    assert isinstance(rp, po.RollbackPrepared) and rp.gid == "MTM-1-1-8"


def test_nextval_only_prepared_yields_lone_commit_prepared(db):
    db.execute("CREATE SEQUENCE sq")
    changes(db)
    db.execute("BEGIN")
    db.execute("SELECT nextval('sq')")
    db.execute("PREPARE TRANSACTION 'MTM-1-1-9'")
    db.execute("COMMIT PREPARED 'MTM-1-1-9'")
    # PG15-FACTS: consumers must ignore gids they never saw prepared
    assert kinds(changes(db)) == ["CommitPrepared"]


def test_origin_truncate_toast_and_nontransactional_message(db):
    db.execute("SELECT pg_replication_origin_create('mtm_node_2')")
    db.execute("SELECT pg_replication_origin_session_setup('mtm_node_2')")
    with db.transaction():
        db.execute("SELECT pg_replication_origin_xact_setup('0/ABCDEF', now())")
        db.execute("INSERT INTO acc VALUES (20, 'from-peer', 5, repeat('z', 300000))")
    db.execute("SELECT pg_replication_origin_session_reset()")
    msgs = changes(db)
    assert kinds(msgs) == ["Begin", "Origin", "Relation", "Insert", "Commit"]
    assert msgs[1].name == "mtm_node_2" and msgs[1].origin_lsn == po.parse_lsn("0/ABCDEF")
    assert len(msgs[3].new.values[3]) == 300000
    # an update that leaves the TOASTed column alone does not resend it
    db.execute("UPDATE acc SET amount = 6 WHERE id = 20")
    upd = [m for m in changes(db) if isinstance(m, po.Update)][0]
    assert upd.new.values[3] is po.UNCHANGED_TOAST
    db.execute("TRUNCATE acc, full_t RESTART IDENTITY CASCADE")
    tr = [m for m in changes(db) if isinstance(m, po.Truncate)][0]
    assert tr.cascade and tr.restart_identity and len(tr.relids) == 2
    db.execute("SELECT pg_logical_emit_message(false, 'mtm_hb', 'now')")
    # a non-transactional message is sent once its WAL is flushed: a commit
    # flushes it, and it comes out ahead of that transaction
    db.execute("INSERT INTO acc VALUES (21, 'flush', 1, NULL)")
    msgs = changes(db)
    assert kinds(msgs) == ["Message", "Begin", "Relation", "Insert", "Commit"]
    assert not msgs[0].transactional and msgs[0].content == b"now"
    db.execute("SELECT pg_replication_origin_drop('mtm_node_2')")


def test_refuses_garbage():
    for bad in [b"", b"Z", b"B\x00", b"I" + struct.pack("!I", 1) + b"X", b"S\x00\x00\x00\x01"]:
        with pytest.raises(po.DecodeError):
            po.decode(bad)


def test_replication_wrapping():
    w = b"w" + struct.pack("!QQq", 10, 20, 30) + b"Bpayload"
    assert po.decode_copy_data(w) == po.XLogData(10, 20, 30, b"Bpayload")
    k = b"k" + struct.pack("!QqB", 99, 5, 1)
    assert po.decode_copy_data(k) == po.Keepalive(99, 5, True)
    r = po.standby_status_update(1, 2, 3, po.PG_EPOCH_OFFSET_US + 7)
    assert r == b"r" + struct.pack("!QQQqB", 1, 2, 3, 7, 0)
    assert po.lsn_str(po.parse_lsn("16/B374D848")) == "16/B374D848"
