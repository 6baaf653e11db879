"""A real 3-node cluster: three PostgreSQL 15 servers, each behind its own
mmproxy process. Writes through any node are on every node when COMMIT
returns; conflicts abort one side with 40001; nothing commits on one node
only; no prepared transaction is left behind."""
from __future__ import annotations

import random
import threading
import time

import psycopg
import pytest

from conftest import Cluster, wait_for


@pytest.fixture(scope="module")
def cluster(workdir):
    c = Cluster(workdir, 3)
    yield c
    c.stop()


def rows(c: Cluster, i: int, q: str) -> list:
    with psycopg.connect(c.dsn(i)) as conn:
        return conn.execute(q).fetchall()


def table_digest(c: Cluster, i: int, table: str) -> str:
    with psycopg.connect(c.direct(i).dsn()) as conn:
        return conn.execute(f"SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) "
                            f"FROM {table} t").fetchone()[0]


def no_prepared_left(c: Cluster) -> bool:
    return all(psycopg.connect(c.direct(i).dsn()).execute(
        "SELECT count(*) FROM pg_prepared_xacts").fetchone()[0] == 0 for i in range(1, c.n + 1))


def test_writes_on_any_node_are_on_every_node_when_commit_returns(cluster):
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c1:
        c1.execute("CREATE TABLE kv (k int PRIMARY KEY, v text)")
        c1.execute("INSERT INTO kv VALUES (1, 'one')")
    with psycopg.connect(cluster.dsn(2)) as c2:            # explicit transaction
        c2.execute("INSERT INTO kv VALUES (%s, %s)", (2, "two"))   # extended protocol inside
        c2.execute("UPDATE kv SET v = 'uno' WHERE k = 1")
        c2.commit()
    # read right after COMMIT returned, on the other nodes: no waiting
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT * FROM kv ORDER BY k") == [(1, "uno"), (2, "two")]
    with psycopg.connect(cluster.dsn(3)) as c3:
        c3.execute("DELETE FROM kv WHERE k = 2")
        c3.rollback()                                        # rolled back: nowhere
        c3.execute("DELETE FROM kv WHERE k = 1")
        c3.commit()
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT k FROM kv ORDER BY k") == [(2,)]
    assert no_prepared_left(cluster)


def test_ddl_replicates_with_context_and_ctas_rows_once(cluster):
    with psycopg.connect(cluster.dsn(2), autocommit=True) as c:
        c.execute("CREATE SCHEMA app")
        c.execute("SET search_path = app, public")
        c.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")     # lands in app
        c.execute("INSERT INTO items SELECT g, 'n' || g FROM generate_series(1, 50) g")
        c.execute("CREATE INDEX items_name ON items (name)")
        c.execute("ALTER TABLE items ADD COLUMN price numeric DEFAULT 1")
        c.execute("CREATE VIEW cheap AS SELECT * FROM items WHERE price < 2")
        c.execute("CREATE TABLE items_copy AS SELECT * FROM items WHERE id <= 10")
        c.execute("CREATE FUNCTION app.twice(int) RETURNS int LANGUAGE sql AS 'SELECT $1 * 2'")
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT count(*), sum(price) FROM app.items") == [(50, 50)]
        assert rows(cluster, i, "SELECT count(*) FROM app.items_copy") == [(10,)]
        assert rows(cluster, i, "SELECT count(*) FROM app.cheap") == [(50,)]
        assert rows(cluster, i, "SELECT app.twice(21)") == [(42,)]
        assert rows(cluster, i, "SELECT count(*) FROM pg_indexes WHERE indexname = "
                                "'items_name'") == [(1,)]
    with psycopg.connect(cluster.dsn(3), autocommit=True) as c:
        c.execute("DROP VIEW app.cheap")
        c.execute("DROP TABLE app.items_copy")
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT count(*) FROM pg_tables WHERE tablename = "
                                "'items_copy'") == [(0,)]


def test_writes_that_bypass_the_proxy_cannot_commit(cluster):
    """The safety nets: a direct connection to one node's PostgreSQL can
    neither commit a write to a replicated table nor run DDL."""
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE guarded (id int PRIMARY KEY)")
    with psycopg.connect(cluster.direct(2).dsn(), autocommit=True) as d:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as ei:
            d.execute("INSERT INTO guarded VALUES (1)")
        assert "did not go through the cluster commit protocol" in str(ei.value)
        with pytest.raises(psycopg.errors.FeatureNotSupported) as ei:
            d.execute("CREATE TABLE sneaky (id int)")
        assert "was not captured for replication" in str(ei.value)
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT count(*) FROM guarded") == [(0,)]


def test_refused_statements(cluster):
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE IF NOT EXISTS ref_t (id int PRIMARY KEY)")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="CONCURRENTLY"):
            c.execute("CREATE INDEX CONCURRENTLY ref_i ON ref_t (id)")
        assert c.execute("SELECT 1").fetchone() == (1,)   # the session goes on
        # DDL and data changes in one string (psql -c style): run statement
        # by statement, each DDL statement shipped as its own text, the rows
        # through the stream - once
        c.execute("CREATE TABLE ref_mixed (id int PRIMARY KEY); "
                  "INSERT INTO ref_mixed VALUES (1)")
        c.execute("CREATE TABLE ref_two (id int PRIMARY KEY); "
                  "CREATE INDEX ref_two_i ON ref_two (id)")
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT count(*), to_regclass('ref_two_i') IS NOT NULL "
                                "FROM ref_mixed") == [(1, True)]


def test_conflicting_updates_one_wins_other_gets_40001(cluster):
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE hot (id int PRIMARY KEY, n int)")
        c.execute("INSERT INTO hot VALUES (1, 0)")
    results = {}
    barrier = threading.Barrier(2)

    def worker(node: int):
        with psycopg.connect(cluster.dsn(node)) as conn:
            conn.execute("UPDATE hot SET n = n + %s WHERE id = 1", (node,))
            barrier.wait()
            t0 = time.monotonic()
            try:
                conn.commit()
                results[node] = ("ok", time.monotonic() - t0)
            except psycopg.Error as e:
                results[node] = (e.sqlstate, str(e), time.monotonic() - t0)

    threads = [threading.Thread(target=worker, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    oks = [n for n, r in results.items() if r[0] == "ok"]
    assert len(oks) <= 1, results
    for n, r in results.items():
        if r[0] != "ok":
            assert r[0] == "40001" and "on node" in r[1], results
            assert r[2] < 5, "the loser waited too long"
    expected = sum(oks)
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT n FROM hot WHERE id = 1") == [(expected,)]
    assert no_prepared_left(cluster)


def test_read_only_and_failed_transactions(cluster):
    with psycopg.connect(cluster.dsn(1)) as c:
        c.execute("SELECT count(*) FROM pg_class")
        c.commit()                                      # nothing written: local commit
        c.execute("CREATE TABLE IF NOT EXISTS ro_t (id int PRIMARY KEY)")
        c.commit()
        c.execute("INSERT INTO ro_t VALUES (1)")
        with pytest.raises(psycopg.errors.UniqueViolation):
            c.execute("INSERT INTO ro_t VALUES (1)")
        c.commit()                                      # PostgreSQL turns it into ROLLBACK
    with psycopg.connect(cluster.dsn(2), autocommit=True) as c:
        with pytest.raises(psycopg.errors.DivisionByZero):
            c.execute("INSERT INTO ro_t VALUES (1 / 0)")   # failed autocommit statement
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT count(*) FROM ro_t") == [(0,)]


def test_bank_workload(cluster):
    """Transfers through all three proxies at once; readers on every node
    check the total never changes; at the end every node holds the same
    data and no prepared transaction is left."""
    n_accounts, per_worker = 20, 60
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE bank (id int PRIMARY KEY, balance bigint NOT NULL)")
        c.execute(f"INSERT INTO bank SELECT g, 1000 FROM generate_series(1, {n_accounts}) g")
    total = 1000 * n_accounts
    stop = threading.Event()
    errors: list = []
    stats = {"committed": 0, "conflicts": 0, "reads": 0}
    lock = threading.Lock()

    def transfer(node: int, seed: int):
        rng = random.Random(seed)
        with psycopg.connect(cluster.dsn(node)) as conn:
            for _ in range(per_worker):
                a, b = rng.sample(range(1, n_accounts + 1), 2)
                amount = rng.randint(1, 50)
                try:
                    conn.execute("UPDATE bank SET balance = balance - %s WHERE id = %s",
                                 (amount, a))
                    conn.execute("UPDATE bank SET balance = balance + %s WHERE id = %s",
                                 (amount, b))
                    conn.commit()
                    with lock:
                        stats["committed"] += 1
                except psycopg.errors.SerializationFailure:
                    conn.rollback()
                    with lock:
                        stats["conflicts"] += 1
                except psycopg.Error as e:
                    conn.rollback()
                    errors.append(f"node {node}: {e.sqlstate} {e}")

    def reader(node: int):
        with psycopg.connect(cluster.dsn(node), autocommit=True) as conn:
            while not stop.is_set():
                s = conn.execute("SELECT sum(balance) FROM bank").fetchone()[0]
                with lock:
                    stats["reads"] += 1
                if s != total:
                    errors.append(f"node {node} saw total {s}")

    writers = [threading.Thread(target=transfer, args=(n, n * 7)) for n in (1, 2, 3)]
    readers = [threading.Thread(target=reader, args=(n,)) for n in (1, 2, 3)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join(300)
    stop.set()
    for t in readers:
        t.join(30)
    assert not errors, errors[:5]
    assert stats["committed"] > per_worker   # real concurrency, most transfers went through
    assert stats["reads"] > 0
    digests = {table_digest(cluster, i, "bank") for i in (1, 2, 3)}
    assert len(digests) == 1
    wait_for(lambda: no_prepared_left(cluster), what="no prepared transactions")
    print(f"bank: {stats}")


def test_extended_protocol_autocommit_and_commit(cluster):
    """Parameters make psycopg use the extended protocol: autocommit writes
    and an extended-protocol COMMIT go through the commit protocol too."""
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE ext (id int PRIMARY KEY, v text)")
        c.execute("INSERT INTO ext VALUES (%s, %s)", (1, "autocommit"))
        c.execute("INSERT INTO ext VALUES (%s, %s)", (2, "prepared"), prepare=True)
        with pytest.raises(psycopg.errors.UniqueViolation):
            c.execute("INSERT INTO ext VALUES (%s, %s)", (1, "dup"))
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        c.cursor().executemany("INSERT INTO ext VALUES (%s, %s)",
                               [(i, "many") for i in range(10, 20)])
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT count(*) FROM ext") == [(12,)]


async def _asyncpg_work(port: int):
    import asyncpg
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres",
                                 database="postgres")
    try:
        await conn.execute("CREATE TABLE apg_c (id int PRIMARY KEY, v text)")
        ins = await conn.prepare("INSERT INTO apg_c VALUES ($1, $2)")
        for i in range(20):
            await ins.fetch(i, f"v{i}")
        await conn.executemany("INSERT INTO apg_c VALUES ($1, $2)",
                               [(i, "m") for i in range(100, 110)])
        async with conn.transaction():
            await conn.execute("UPDATE apg_c SET v = 'tx' WHERE id < $1", 5)
            await conn.execute("DELETE FROM apg_c WHERE id = $1", 19)
        try:
            async with conn.transaction():
                await conn.execute("DELETE FROM apg_c")
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        return await conn.fetchval("SELECT count(*) FROM apg_c")
    finally:
        await conn.close()


def test_asyncpg_through_the_cluster(cluster):
    import asyncio
    assert asyncio.run(_asyncpg_work(cluster.proxies[1].port)) == 29
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT count(*), count(*) FILTER (WHERE v = 'tx') "
                                "FROM apg_c") == [(29, 5)]


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_through_the_cluster(cluster, mode):
    import os
    import subprocess

    from proxy.pgserver import pg_bin_dir
    pgbench = os.path.join(pg_bin_dir(), "pgbench")
    env = dict(os.environ, PGHOST="127.0.0.1", PGUSER="postgres", PGDATABASE="postgres")
    if mode == "simple":
        init = subprocess.run([pgbench, "-i", "-s", "1", "-q", "-p", str(cluster.proxies[0].port)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert init.returncode == 0, init.stderr
    # One node alone runs the full TPC-B-like script; then all three nodes at
    # once run -N (the same without the branch/teller updates: at scale 1
    # every TPC-B transaction updates the single branch row, so concurrent
    # nodes would mostly abort each other with 40001, which pgbench 15
    # treats as a fatal client error).
    single = subprocess.run([pgbench, "-M", mode, "-c", "2", "-t", "25", "-n",
                             "-p", str(cluster.proxies[0].port)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert "actually processed: 50/50" in single.stdout, single.stderr
    procs = [subprocess.Popen([pgbench, "-M", mode, "-N", "-c", "2", "-t", "25", "-n",
                               "-p", str(p.port)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in cluster.proxies]
    outs = [p.communicate(timeout=300) for p in procs]
    import re
    processed = sum(int(m.group(1)) for out, _ in outs
                    for m in [re.search(r"actually processed: (\d+)/", out)] if m)
    # conflicts on pgbench_accounts rows are possible but rare
    assert processed >= 120, outs
    sums = [rows(cluster, i, "SELECT (SELECT sum(abalance) FROM pgbench_accounts), "
                             "(SELECT sum(tbalance) FROM pgbench_tellers), "
                             "(SELECT sum(bbalance) FROM pgbench_branches), "
                             "(SELECT coalesce(sum(delta), 0) FROM pgbench_history)")
            for i in (1, 2, 3)]
    assert sums[0] == sums[1] == sums[2]
    accounts, tellers, branches, history = sums[0][0]
    # TPC-B runs move all four sums alike; -N runs move accounts and history
    assert accounts == history and tellers == branches
    for table in ("pgbench_accounts", "pgbench_tellers", "pgbench_branches", "pgbench_history"):
        assert len({table_digest(cluster, i, table) for i in (1, 2, 3)}) == 1
    wait_for(lambda: no_prepared_left(cluster), what="no prepared transactions")


def test_sequences_never_collide_across_nodes(cluster):
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE ser (id serial PRIMARY KEY, node int)")
        c.execute("CREATE TABLE ident (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, node int)")
        c.execute("CREATE SEQUENCE free_seq")
    errors = []

    def insert(node: int):
        try:
            with psycopg.connect(cluster.dsn(node), autocommit=True) as conn:
                for _ in range(15):
                    conn.execute("INSERT INTO ser (node) VALUES (%s)", (node,))
                    conn.execute("INSERT INTO ident (node) VALUES (%s)", (node,))
                    conn.execute("SELECT nextval('free_seq')")
        except psycopg.Error as e:
            errors.append(e)
    threads = [threading.Thread(target=insert, args=(n,)) for n in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in (1, 2, 3):
        for table in ("ser", "ident"):
            got = rows(cluster, i, f"SELECT count(*), count(DISTINCT id), "
                                   f"bool_and(id % 16 = node) FROM {table}")
            assert got == [(45, 45, True)], (table, got)
    # each node's own sequence state hands out its own residue
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT nextval('free_seq') % 16") == [(i,)]
    # ...also after a restart: TRUNCATE ... RESTART IDENTITY (replicated
    # through the slot) and ALTER SEQUENCE ... RESTART (shipped as DDL) go
    # back to each node's own start, not to a start shared by all
    with psycopg.connect(cluster.dsn(2), autocommit=True) as c:
        c.execute("TRUNCATE ser, ident RESTART IDENTITY")
        c.execute("ALTER SEQUENCE free_seq RESTART")
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT count(*) FROM ser") == [(0,)]
    for i in (1, 2, 3):
        with psycopg.connect(cluster.dsn(i), autocommit=True) as conn:
            conn.execute("INSERT INTO ser (node) VALUES (%s)", (i,))
            conn.execute("INSERT INTO ident (node) VALUES (%s)", (i,))
        assert rows(cluster, i, "SELECT nextval('free_seq')") == [(i,)]
    for i in (1, 2, 3):
        for table in ("ser", "ident"):
            assert rows(cluster, i, f"SELECT id, node FROM {table} ORDER BY id") == [
                (1, 1), (2, 2), (3, 3)], table
    # a restart at a given value is moved, on each node, to its next own value
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("ALTER SEQUENCE free_seq RESTART WITH 100")
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT nextval('free_seq')") == [(112 + i,)]  # 100 = 4 mod 16


def test_monitoring_functions(cluster):
    for i in (1, 2, 3):
        assert cluster.pings(i)
    for i in (1, 2, 3):
        [st] = rows(cluster, i, "SELECT my_node_id, status, connected, gen_members, "
                                "gen_members_online, gen_configured, gen_donors, lease_valid, "
                                "agreed, raft_role IN ('leader', 'follower'), raft_term > 0, "
                                "raft_leader, suspects, gen_num FROM mtm.status()")
        # (donors: all three in generation 1; a node that started late was
        # excluded and rejoined, and the others were that generation's donors)
        assert st[:12] == (i, "online", sorted({1, 2, 3} - {i}), [1, 2, 3], [1, 2, 3],
                           [1, 2, 3], st[6], True, True, True, True, st[11])
        assert st[6] and set(st[6]) <= {1, 2, 3}
        assert st[11] in (1, 2, 3) and st[12] == []
        # every node agrees on the generation
        gens = {rows(cluster, j, "SELECT gen_num FROM mtm.status()")[0][0] for j in (1, 2, 3)}
        assert gens == {st[13]} and st[13] >= 1
        assert rows(cluster, i, "SELECT catchup_donor, catchup_lag_ms FROM mtm.status()") \
            == [(None, 0)]
        nodes = rows(cluster, i, "SELECT id, conninfo, is_self, connected, "
                                 "replication_lag_bytes >= 0, sender_pid IS NOT NULL OR is_self, "
                                 "status, last_online_in, is_raft_leader, suspected, receiver_mode "
                                 "FROM mtm.nodes()")
        assert [(n[0], n[2], n[3], n[4], n[5], n[6], n[7], n[9], n[10]) for n in nodes] == \
            [(j, j == i, True, True, True, "online", st[13], False, None if j == i else "normal")
             for j in (1, 2, 3)]
        assert [n[0] for n in nodes if n[8]] == [st[11]]
        assert all(n[1].startswith("127.0.0.1:") for n in nodes)
    # a node whose proxy stopped refreshing its state reports itself
    # disabled and ping fails; inside this transaction our row lock keeps
    # the proxy's refresh out until we roll back
    with psycopg.connect(cluster.direct(1).dsn()) as d:
        d.execute("UPDATE mtm.node_state SET updated_at = now() - interval '1 hour'")
        assert d.execute("SELECT status FROM mtm.status()").fetchone() == ("disabled",)
        d.execute("SAVEPOINT s")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState,
                           match='multimaster node is not online: current status "disabled"'):
            d.execute("SELECT mtm.ping()")
        d.rollback()


def test_temp_tables_as_scratch_space(cluster):
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE IF NOT EXISTS perm (id int PRIMARY KEY, v text)")
        c.execute("CREATE TEMP TABLE scratch (id int, v text)")
        c.execute("INSERT INTO scratch SELECT g, 'tmp' || g FROM generate_series(1, 5) g")
        assert c.execute("SELECT count(*) FROM scratch").fetchone() == (5,)
        # replicated writes in their own transactions still replicate
        c.execute("INSERT INTO perm VALUES (1, 'kept')")
        # a transaction mixing both cannot be prepared: refused, nothing kept
        with pytest.raises(psycopg.errors.FeatureNotSupported,
                           match="used temporary tables cannot also write to replicated"):
            with c.transaction():
                c.execute("INSERT INTO scratch VALUES (99, 'x')")
                c.execute("INSERT INTO perm VALUES (2, 'mixed')")
        assert c.execute("SELECT count(*) FROM scratch WHERE id = 99").fetchone() == (0,)
        # DDL on a temporary table stays here; the same DDL on a permanent
        # table named the same way (no schema) is shipped
        c.execute("CREATE INDEX scratch_v ON scratch (v)")
        c.execute("ALTER TABLE scratch ADD COLUMN extra int")
        c.execute("CREATE FUNCTION scratch_trg() RETURNS trigger LANGUAGE plpgsql "
                  "AS $$ BEGIN RETURN NEW; END $$")
        c.execute("CREATE TRIGGER scratch_t BEFORE INSERT ON scratch FOR EACH ROW "
                  "EXECUTE FUNCTION scratch_trg()")
        with c.transaction():
            c.execute("CREATE INDEX ON pg_temp.scratch (extra)")
            c.execute("INSERT INTO scratch (id, v, extra) VALUES (6, 'six', 6)")
        c.execute("CREATE INDEX perm_v ON perm (v)")
        c.execute("ALTER TABLE perm ADD COLUMN note text")
        assert c.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'scratch'"
                         ).fetchone() == (2,)
        # a view over a temporary table is temporary: it stays here too
        c.execute("CREATE VIEW scratch_view AS SELECT id FROM scratch")
        assert c.execute("SELECT count(*) FROM scratch_view").fetchone() == (6,)
        # DDL for the peers in a transaction that used temporary tables can
        # be neither prepared nor committed here only: refused, rolled back
        for ddl in ("CREATE TABLE from_scratch AS SELECT * FROM scratch",
                    "CREATE TABLE perm_side (id int PRIMARY KEY)"):
            with pytest.raises(psycopg.errors.FeatureNotSupported,
                               match="used temporary tables cannot also change the schema"):
                with c.transaction():
                    c.execute("INSERT INTO scratch (id) VALUES (7)")
                    c.execute(ddl)
        assert c.execute("SELECT count(*) FROM scratch WHERE id = 7").fetchone() == (0,)
        c.execute("CREATE TEMP TABLE scratch2 AS SELECT * FROM perm")
        assert c.execute("SELECT count(*) FROM scratch2").fetchone() == (1,)
        # so are privileges on it, while a GRANT on a permanent table is
        # shipped; one GRANT on both kinds is refused
        c.execute("GRANT SELECT ON scratch2 TO public")
        c.execute("REVOKE SELECT ON TABLE pg_temp.scratch2 FROM public")
        c.execute("GRANT SELECT ON perm TO public")
        with pytest.raises(psycopg.errors.FeatureNotSupported,
                           match="GRANT changed temporary and permanent objects together"):
            c.execute("GRANT UPDATE ON scratch2, perm TO public")
        # emptying scratch space is a write to it, not DDL for the peers
        c.execute("TRUNCATE scratch2")
        with c.transaction():
            c.execute("INSERT INTO scratch2 (id) VALUES (8)")
            c.execute("TRUNCATE scratch2")
        assert c.execute("SELECT count(*) FROM scratch2").fetchone() == (0,)
        # dropping temporary objects stays on this node (nothing to ship)...
        c.execute("DROP TABLE scratch2")
        with c.transaction():
            c.execute("DROP TABLE scratch CASCADE")
        # ...a DROP of permanent ones is shipped, and mixing both is refused
        c.execute("CREATE TABLE perm_gone (id int PRIMARY KEY)")
        c.execute("CREATE TEMP TABLE scratch3 (id int)")
        with pytest.raises(psycopg.errors.FeatureNotSupported,
                           match="temporary and permanent objects together"):
            c.execute("DROP TABLE scratch3, perm_gone")
        c.execute("DROP TABLE perm_gone")
        c.execute("DROP TABLE IF EXISTS perm_never_was")
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT * FROM perm") == [(1, "kept", None)]
        assert rows(cluster, i, "SELECT array_to_string(relacl, ',') LIKE '%=r/%' "
                                "FROM pg_class WHERE relname = 'perm'") == [(True,)]
        assert rows(cluster, i, "SELECT indexname FROM pg_indexes WHERE indexname LIKE "
                                "'%scratch%' OR tablename = 'perm' ORDER BY 1") \
            == [("perm_pkey",), ("perm_v",)]
        assert rows(cluster, i, "SELECT count(*) FROM pg_tables WHERE tablename = 'perm_gone'") \
            == [(0,)]
        assert rows(cluster, i, "SELECT count(*) FROM pg_class WHERE relname IN ('scratch', "
                                "'scratch_view', 'from_scratch', 'perm_side')") == [(0,)]


def test_make_table_local(cluster):
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE loc (id int PRIMARY KEY, node int)")
        c.execute("SELECT mtm.make_table_local('loc')")
    for i in (1, 2, 3):
        with psycopg.connect(cluster.dsn(i), autocommit=True) as c:
            c.execute("INSERT INTO loc VALUES (%s, %s)", (i, i))
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT * FROM loc") == [(i, i)]
        assert rows(cluster, i, "SELECT count(*) FROM mtm.local_tables") == [(1,)]
    # TRUNCATE of a local table empties it on its node only
    with psycopg.connect(cluster.dsn(3), autocommit=True) as c:
        c.execute("TRUNCATE loc")
    assert rows(cluster, 3, "SELECT * FROM loc") == []
    for i in (1, 2):
        assert rows(cluster, i, "SELECT * FROM loc") == [(i, i)]
    with psycopg.connect(cluster.dsn(3), autocommit=True) as c:
        c.execute("INSERT INTO loc VALUES (3, 3)")
    # Transactions that only write local tables (or only advance sequences)
    # commit on their node without the commit protocol; one that also
    # writes a replicated table, or ships DDL, goes through it.
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE loc_rep (id int PRIMARY KEY)")
        c.execute("CREATE SEQUENCE loc_seq")

    def protocol_commits() -> int:
        # the coordinator records each commit's precommit before it returns
        with psycopg.connect(cluster.direct(1).dsn()) as d:
            return d.execute("SELECT count(*) FROM mtm.precommits").fetchone()[0]
    before = protocol_commits()
    with psycopg.connect(cluster.dsn(1)) as c:
        c.execute("INSERT INTO loc VALUES (10, 1)")
        c.execute("UPDATE loc SET node = 11 WHERE id = 10")
        c.commit()
        c.execute("SELECT nextval('loc_seq')")
        c.commit()
        c.execute("INSERT INTO loc VALUES (12, 1)")
        c.execute("CREATE FUNCTION loc_f() RETURNS int LANGUAGE sql AS 'SELECT 1'")
        c.commit()                                          # DDL: through the protocol
        c.execute("INSERT INTO loc VALUES (13, 1)")
        c.execute("INSERT INTO loc_rep VALUES (13)")
        c.commit()                                          # replicated row: likewise
    assert protocol_commits() == before + 2
    assert rows(cluster, 1, "SELECT id, node FROM loc ORDER BY id") == [
        (1, 1), (10, 11), (12, 1), (13, 1)]
    for i in (2, 3):
        assert rows(cluster, i, "SELECT id FROM loc ORDER BY id") == [(i,)]
        assert rows(cluster, i, "SELECT loc_f()") == [(1,)]
        assert rows(cluster, i, "SELECT id FROM loc_rep") == [(13,)]


def test_client_two_phase_commit_works_cluster_wide(cluster):
    """A client's PREPARE TRANSACTION returns once every node has prepared
    the transaction; COMMIT PREPARED / ROLLBACK PREPARED, sent to any node,
    finish it everywhere."""
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE tpc (id int PRIMARY KEY, v text)")

    def prepared_as(i: int, user_gid: str) -> list:
        return [g for (g,) in psycopg.connect(cluster.direct(i).dsn()).execute(
            "SELECT gid FROM pg_prepared_xacts") if g.endswith(":" + user_gid)]

    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("BEGIN")
        c.execute("INSERT INTO tpc VALUES (1, 'two-phase')")
        c.execute("PREPARE TRANSACTION 'app-tx-1'")
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    for i in (1, 2, 3):                 # prepared everywhere, visible nowhere yet
        assert len(prepared_as(i, "app-tx-1")) == 1
        assert rows(cluster, i, "SELECT count(*) FROM tpc") == [(0,)]
    with psycopg.connect(cluster.dsn(2), autocommit=True) as c:   # another node
        c.execute("COMMIT PREPARED 'app-tx-1'")
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT v FROM tpc") == [("two-phase",)]

    with psycopg.connect(cluster.dsn(3), autocommit=True) as c:
        c.execute("BEGIN")
        c.execute("INSERT INTO tpc VALUES (2, 'rolled back')")
        c.execute("PREPARE TRANSACTION 'app-tx-2'")
        c.execute("ROLLBACK PREPARED 'app-tx-2'")
        # finished already: PostgreSQL's own error
        with pytest.raises(psycopg.errors.UndefinedObject):
            c.execute("COMMIT PREPARED 'app-tx-2'")
    with psycopg.connect(cluster.dsn(3)) as c:
        # psycopg's two-phase API goes the same way
        c.tpc_begin(c.xid(1, "app-tx-3", "psycopg"))
        c.execute("INSERT INTO tpc VALUES (3, 'psycopg tpc')")
        c.tpc_prepare()
        c.tpc_commit()
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT id FROM tpc ORDER BY id") == [(1,), (3,)]
    assert no_prepared_left(cluster)

    with psycopg.connect(cluster.dsn(2), autocommit=True) as c:
        # gids of the cluster's own protocol cannot be finished by hand
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="managed by the cluster"):
            c.execute("COMMIT PREPARED 'MTM-1-1-5'")
        # and the two-phase commands go on their own, with the simple protocol
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="on their own"):
            c.execute("BEGIN; PREPARE TRANSACTION 'x'")


def test_tables_without_primary_key(cluster):
    """Inserts replicate; UPDATE/DELETE need a replica identity, and
    PostgreSQL itself refuses them on the origin otherwise (55000)."""
    with psycopg.connect(cluster.dsn(3), autocommit=True) as c:
        c.execute("CREATE TABLE nopk (a int, b text)")
        c.execute("INSERT INTO nopk VALUES (1, 'x'), (1, 'x')")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState,
                           match="does not have a replica identity"):
            c.execute("UPDATE nopk SET b = 'y'")
        c.execute("ALTER TABLE nopk REPLICA IDENTITY FULL")
        c.execute("UPDATE nopk SET b = 'y' WHERE ctid = (SELECT min(ctid) FROM nopk)")
        c.execute("DELETE FROM nopk WHERE b = 'x'")
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT * FROM nopk") == [(1, "y")]


def test_copy_and_a_large_transaction_with_bounded_memory(cluster):
    """COPY FROM STDIN in autocommit goes through the commit protocol; a
    100,000-row, ~100 MB transaction replicates while no proxy's memory
    grows by more than a fraction of it."""
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE big (id int PRIMARY KEY, pad text)")
    rss0 = [p.rss_kb() for p in cluster.proxies]
    pad = "x" * 1000
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        with c.cursor().copy("COPY big FROM STDIN") as copy:
            for i in range(100_000):
                copy.write_row((i, pad))
    growth_mb = [(p.rss_kb() - r) / 1024 for p, r in zip(cluster.proxies, rss0)]
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT count(*), sum(length(pad)) FROM big") == \
            [(100_000, 100_000_000)]
    assert max(growth_mb) < 60, f"proxy RSS grew by {growth_mb} MB for a 100 MB transaction"
    with psycopg.connect(cluster.dsn(2), autocommit=True) as c:
        c.execute("DELETE FROM big WHERE id % 2 = 0")        # 50,000 deletes in one go
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT count(*) FROM big") == [(50_000,)]
    wait_for(lambda: no_prepared_left(cluster), what="no prepared transactions")


def test_cross_node_deadlock_is_broken_with_40001(cluster):
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE dl (id int PRIMARY KEY, n int)")
        c.execute("INSERT INTO dl VALUES (1, 0), (2, 0)")
    results = {}
    barrier = threading.Barrier(2)

    def worker(node: int, first: int, second: int):
        with psycopg.connect(cluster.dsn(node)) as conn:
            t0 = time.monotonic()
            try:
                conn.execute("UPDATE dl SET n = n + 1 WHERE id = %s", (first,))
                barrier.wait()
                conn.execute("UPDATE dl SET n = n + 1 WHERE id = %s", (second,))
                conn.commit()
                results[node] = ("ok", time.monotonic() - t0)
            except psycopg.Error as e:
                results[node] = (e.sqlstate, time.monotonic() - t0)

    # each node updates the two rows in the opposite order
    ts = [threading.Thread(target=worker, args=(1, 1, 2)),
          threading.Thread(target=worker, args=(2, 2, 1))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert len(results) == 2, results
    assert all(r[0] in ("ok", "40001") for r in results.values()), results
    assert all(r[1] < 10 for r in results.values()), results
    ok = sum(r[0] == "ok" for r in results.values())
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT sum(n) FROM dl") == [(2 * ok,)]
    assert no_prepared_left(cluster)


def test_local_sessions_queued_on_a_row_give_way_to_a_committing_transaction(cluster):
    """On node 2, session A holds a row and is busy; session B waits for the
    row behind it (so it holds the row's tuple lock). A write to that row
    committed through node 1 is older in commit order: node 2's applier,
    queued behind B, has B and then A cancelled with 40001 instead of
    waiting out the apply lock timeout, which would fail node 1's commit."""
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE queued (id int PRIMARY KEY, n int)")
        c.execute("INSERT INTO queued VALUES (1, 0)")
    errors: dict = {}

    def local(name: str, delta: int, then_sleep: bool):
        with psycopg.connect(cluster.dsn(2)) as conn:
            try:
                conn.execute("UPDATE queued SET n = n + %s WHERE id = 1", (delta,))
                if then_sleep:
                    conn.execute("SELECT pg_sleep(20)")
                conn.commit()
                errors[name] = None
            except psycopg.Error as e:
                errors[name] = (e.sqlstate, str(e))

    a = threading.Thread(target=local, args=("A", 10, True))
    a.start()
    wait_for(lambda: rows(cluster, 2, "SELECT count(*) FROM pg_stat_activity WHERE query = "
                                      "'SELECT pg_sleep(20)'") == [(1,)], what="A busy")
    b = threading.Thread(target=local, args=("B", 100, False))
    b.start()
    wait_for(lambda: rows(cluster, 2, "SELECT count(*) FROM pg_stat_activity WHERE "
                                      "wait_event_type = 'Lock'") == [(1,)], what="B queued")
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("UPDATE queued SET n = n + 1 WHERE id = 1")     # must not fail
    a.join(30)
    b.join(30)
    for name in ("A", "B"):
        assert errors[name] is not None and errors[name][0] == "40001", errors
        assert "of node 1" in errors[name][1], errors
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT n FROM queued") == [(1,)]
    assert no_prepared_left(cluster)


def test_a_session_idle_in_its_transaction_gives_way_at_once(cluster):
    """On node 2 a client holds row 1 and sits idle in its transaction. A
    write to row 1 committed through node 1 began to commit first: node 2's
    applier has the idle transaction failed on the spot (rather than wait
    out the apply lock timeout, which would fail node 1's commit), and the
    client hears the 40001 at its next statement - its COMMIT, which must
    not come back as a plain ROLLBACK the client could take for success."""
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE idle_hold (id int PRIMARY KEY, n int)")
        c.execute("INSERT INTO idle_hold VALUES (1, 0)")
    for verb in ("commit", "update"):
        holder = psycopg.connect(cluster.dsn(2))
        holder.execute("UPDATE idle_hold SET n = n + 1000 WHERE id = 1")
        with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
            c.execute("UPDATE idle_hold SET n = n + 1 WHERE id = 1")     # must not fail
        with pytest.raises(psycopg.errors.SerializationFailure) as e:
            if verb == "commit":
                holder.commit()
            else:
                holder.execute("UPDATE idle_hold SET n = n + 7 WHERE id = 1")
        assert "of node 1" in str(e.value)
        holder.rollback()
        holder.execute("UPDATE idle_hold SET n = n + 10 WHERE id = 1")   # the retry works
        holder.commit()
        holder.close()
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT n FROM idle_hold") == [(22,)]
    assert no_prepared_left(cluster)


def test_parallel_apply_an_independent_transaction_overtakes_a_blocked_one(cluster):
    """Node 1 commits A (row 1) and then B (row 2). On node 2 a session
    connected to PostgreSQL directly (so wound-wait cannot end it; it could
    never commit its write either) sits idle in a transaction holding row 1,
    so node 2's applier of A waits for it. B does not depend on A (they were
    prepared on node 1 at the same time): another applier applies it, and B
    commits while A is still waiting. Serial apply would hold B behind A."""
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE par (id int PRIMARY KEY, n int)")
        c.execute("INSERT INTO par VALUES (1, 0), (2, 0)")
    holder = psycopg.connect(cluster.direct(2).dsn())
    holder.execute("UPDATE par SET n = n + 1000 WHERE id = 1")     # and stays idle
    result: dict = {}

    def commit_a():
        with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
            try:
                c.execute("UPDATE par SET n = n + 10 WHERE id = 1")
                result["A"] = "ok"
            except psycopg.Error as e:
                result["A"] = e.sqlstate

    a = threading.Thread(target=commit_a)
    a.start()
    wait_for(lambda: rows(cluster, 2, "SELECT count(*) FROM pg_stat_activity WHERE "
                                      "application_name LIKE 'mmproxy apply from node 1%' "
                                      "AND wait_event_type = 'Lock'") == [(1,)],
             what="node 2's applier waiting for row 1")
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("UPDATE par SET n = n + 100 WHERE id = 2")
    assert "A" not in result, "B waited for A"
    holder.close()                      # releases row 1: A goes on (or timed out: 40001)
    a.join(30)
    assert result["A"] in ("ok", "40001"), result
    expected = (10 if result["A"] == "ok" else 0, 100)
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT n FROM par ORDER BY id") == [(expected[0],),
                                                                    (expected[1],)]
    assert no_prepared_left(cluster)


def test_a_killed_proxy_restarts_and_nothing_is_lost_or_applied_twice(cluster):
    """Updates through nodes 1 and 3 while node 2's proxy is killed (SIGKILL)
    and started again: node 2's appliers die mid-transaction, the streams
    resume from what node 2 acknowledged, and with parallel apply some of
    what is resent was applied already and some not. In the end every
    committed update is on every node exactly once."""
    import signal
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE restarts_kv (id int PRIMARY KEY, n int NOT NULL)")
        c.execute("INSERT INTO restarts_kv SELECT g, 0 FROM generate_series(1, 40) g")
    committed = [0, 0]
    stop = time.monotonic() + 4

    def load(slot: int, node: int, seed: int):
        rnd = random.Random(seed)
        with psycopg.connect(cluster.dsn(node), autocommit=True) as conn:
            while time.monotonic() < stop:
                try:
                    conn.execute("UPDATE restarts_kv SET n = n + 1 WHERE id = %s",
                                 (rnd.randint(1, 40),))
                    committed[slot] += 1
                except psycopg.errors.SerializationFailure:
                    pass
    threads = [threading.Thread(target=load, args=(k, node, k)) for k, node in enumerate((1, 3))]
    for t in threads:
        t.start()
    wait_for(lambda: sum(committed) >= 50, timeout=30, what="load under way")
    victim = cluster.proxies[1]
    victim.stop(signal.SIGKILL)
    time.sleep(0.5)                     # the node stays down a while, load going on
    victim.start()
    for t in threads:
        t.join(120)
    assert sum(committed) > 0
    # the restarted node serves again once it is back ONLINE (generations)
    wait_for(lambda: cluster.pings(2), timeout=60, what="node 2 online again")
    wait_for(lambda: all(rows(cluster, i, "SELECT sum(n) FROM restarts_kv")
                         == [(sum(committed),)] for i in (1, 2, 3)),
             timeout=60, what="every node has every update")
    assert len({table_digest(cluster, i, "restarts_kv") for i in (1, 2, 3)}) == 1
    wait_for(lambda: no_prepared_left(cluster), timeout=30, what="no prepared transaction left")


def test_ddl_suite_types_functions_alter_drop(cluster):
    with psycopg.connect(cluster.dsn(3), autocommit=True) as c:
        c.execute("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')")
        c.execute("CREATE TYPE pair AS (a int, b text)")
        c.execute("CREATE DOMAIN posint AS int CHECK (VALUE > 0)")
        c.execute("CREATE TABLE people (id posint PRIMARY KEY, m mood, p pair)")
        c.execute("INSERT INTO people VALUES (1, 'ok', ROW(1, 'x'))")
        c.execute("ALTER TYPE mood ADD VALUE 'ecstatic'")
        c.execute("INSERT INTO people VALUES (2, 'ecstatic', ROW(2, 'y'))")
        c.execute("""CREATE FUNCTION bump() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN NEW.m := 'happy'; RETURN NEW; END $$""")
        c.execute("CREATE TRIGGER people_bump BEFORE INSERT ON people FOR EACH ROW "
                  "WHEN (NEW.m = 'sad') EXECUTE FUNCTION bump()")
        c.execute("INSERT INTO people VALUES (3, 'sad', ROW(3, 'z'))")
        c.execute("ALTER TABLE people RENAME COLUMN p TO pr")
        c.execute("COMMENT ON TABLE people IS 'replicated comment'")
        with pytest.raises(psycopg.errors.CheckViolation):
            c.execute("INSERT INTO people VALUES (-1, 'ok', NULL)")
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT id, m::text, (pr).b FROM people ORDER BY id") == \
            [(1, "ok", "x"), (2, "ecstatic", "y"), (3, "happy", "z")]
        assert rows(cluster, i, "SELECT obj_description('people'::regclass)") == \
            [("replicated comment",)]
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("DROP TABLE people")
        c.execute("DROP TYPE mood, pair")
        c.execute("DROP DOMAIN posint")
    for i in (1, 2, 3):
        assert rows(cluster, i, "SELECT count(*) FROM pg_type WHERE typname IN "
                                "('mood', 'pair', 'posint')") == [(0,)]
