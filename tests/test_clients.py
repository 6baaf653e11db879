"""Real clients through the proxy give the same results as directly against
PostgreSQL: psql, psycopg 3, asyncpg and pgbench."""
from __future__ import annotations

import os
import re
import subprocess
import threading
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path
from uuid import UUID

import asyncpg
import psycopg
import pytest
from psycopg import sql

from proxy.pgserver import pg_bin_dir

HERE = Path(__file__).resolve().parent


def run_psql(dsn: str, script: Path, tmp_path: Path) -> tuple[int, str]:
    res = subprocess.run(
        [os.path.join(pg_bin_dir(), "psql"), "-X", "-d", dsn, "-f", str(script)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    out = res.stdout + res.stderr
    # Large-object OIDs come from a cluster-wide counter: the only difference
    # allowed between the two runs.
    return res.returncode, re.sub(r"lo_import \d+", "lo_import <oid>", out)


def test_psql_script_matches_direct(pg, proxy, fresh_dbs, tmp_path):
    direct_db, proxied_db = fresh_dbs
    script = HERE / "sql" / "client_script.sql"
    rc1, direct = run_psql(pg.dsn(dbname=direct_db, tcp=True), script, tmp_path)
    rc2, proxied = run_psql(proxy.dsn(dbname=proxied_db), script, tmp_path)
    assert "first is 1 apple" in direct and "hello from plpgsql" in direct
    assert "division by zero" in direct and "lo_import <oid>" in direct
    assert (rc2, proxied) == (rc1, direct)


VALUES_SQL = """SELECT 42::int4, 9000000000::int8, 3.14159::numeric(10,5), 'héllo'::text,
    '\\x00ff10'::bytea, true, '2024-02-29'::date, '2024-02-29 12:34:56+00'::timestamptz,
    '{"a": [1, 2]}'::jsonb, ARRAY[1, 2, NULL]::int[],
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, NULL::text"""
EXPECTED_VALUES = (42, 9000000000, Decimal("3.14159"), "héllo", b"\x00\xff\x10", True,
                   date(2024, 2, 29), datetime(2024, 2, 29, 12, 34, 56, tzinfo=timezone.utc),
                   {"a": [1, 2]}, [1, 2, None],
                   UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), None)


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_psycopg_types_text_and_binary(proxy, binary):
    with psycopg.connect(proxy.dsn()) as conn:
        row = conn.execute(VALUES_SQL, binary=binary).fetchone()
        assert row == EXPECTED_VALUES
        # parameters sent in binary as well
        cur = conn.cursor(binary=binary)
        cur.execute("SELECT %b::bytea, %s::int + 1, %s::text", (b"\x01\x02", 41, "x"))
        assert cur.fetchone() == (b"\x01\x02", 42, "x")


def test_psycopg_pipeline_prepared_and_errors(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS pipe_t; CREATE TABLE pipe_t (id int PRIMARY KEY, v text)")
        with conn.pipeline():
            cur = conn.cursor()
            for i in range(200):
                cur.execute("INSERT INTO pipe_t VALUES (%s, %s)", (i, f"v{i}"), prepare=True)
            c2 = conn.execute("SELECT count(*), max(id) FROM pipe_t")
        assert c2.fetchone() == (200, 199)
        # an error in a pipeline aborts the rest of it and the session recovers
        with pytest.raises(psycopg.errors.UniqueViolation):
            with conn.pipeline():
                conn.execute("INSERT INTO pipe_t VALUES (1, 'dup')")
                conn.execute("INSERT INTO pipe_t VALUES (1000, 'never')")
        assert conn.execute("SELECT count(*) FROM pipe_t").fetchone() == (200,)
        # executemany uses the pipeline under the hood
        conn.cursor().executemany("INSERT INTO pipe_t VALUES (%s, 'm')",
                                  [(i,) for i in range(300, 400)])
        assert conn.execute("SELECT count(*) FROM pipe_t").fetchone() == (300,)


def test_psycopg_copy_text_and_binary(proxy, pg):
    rows = [(i, f"name-{i}", i * 1.5) for i in range(5000)]
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("DROP TABLE IF EXISTS copy_t; CREATE TABLE copy_t (id int, name text, x float8)")
        with conn.cursor().copy("COPY copy_t FROM STDIN") as copy:
            for r in rows:
                copy.write_row(r)
        with conn.cursor().copy("COPY copy_t FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "text", "float8"])
            for r in rows:
                copy.write_row((r[0] + 100000, r[1], r[2]))
        conn.commit()
        out = []
        with conn.cursor().copy("COPY (SELECT * FROM copy_t WHERE id < 5000 ORDER BY id) TO STDOUT") as copy:
            copy.set_types(["int4", "text", "float8"])
            out = list(copy.rows())
        assert out == rows
        # a COPY the client aborts leaves the session usable
        with pytest.raises(psycopg.errors.QueryCanceled):
            with conn.cursor().copy("COPY copy_t FROM STDIN") as copy:
                copy.write_row((1, "x", 1.0))
                raise psycopg.errors.QueryCanceled("client abort")
        conn.rollback()
    with psycopg.connect(pg.dsn()) as direct:
        assert direct.execute("SELECT count(*), sum(id) FROM copy_t").fetchone() == \
            (10000, sum(r[0] for r in rows) * 2 + 100000 * 5000)


def test_psycopg_server_side_cursor(proxy):
    with psycopg.connect(proxy.dsn()) as conn:
        with conn.cursor(name="big") as cur:
            cur.itersize = 333
            cur.execute("SELECT g, repeat('x', g % 50) FROM generate_series(1, 20000) g")
            total = n = 0
            for g, s in cur:
                total += g
                n += 1
                assert len(s) == g % 50
        assert (n, total) == (20000, 20000 * 20001 // 2)
        # scrollable cursor
        with conn.cursor(name="scroll", scrollable=True) as cur:
            cur.execute("SELECT g FROM generate_series(1, 100) g")
            cur.scroll(50, mode="absolute")
            assert cur.fetchone() == (51,)
            cur.scroll(-10)
            assert cur.fetchone() == (42,)


def test_psycopg_listen_notify_notices_and_parameters(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as listener, \
            psycopg.connect(proxy.dsn(), autocommit=True) as sender:
        listener.execute("LISTEN chan_a")
        notices = []
        sender.add_notice_handler(lambda d: notices.append(d.message_primary))

        def send():
            for i in range(3):
                sender.execute("SELECT pg_notify('chan_a', %s)", (f"msg{i}",))
        t = threading.Thread(target=send)
        t.start()
        got = []
        for n in listener.notifies(timeout=10, stop_after=3):
            got.append((n.channel, n.payload, n.pid))
        t.join()
        sender_pid = sender.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert got == [("chan_a", f"msg{i}", sender_pid) for i in range(3)]
        sender.execute("DO $$ BEGIN RAISE NOTICE 'careful: %', 7; END $$")
        assert notices == ["careful: 7"]
        sender.execute("SET application_name = 'renamed'")
        assert sender.info.parameter_status("application_name") == "renamed"
        # the pid the client was told is the backend's real pid
        assert sender.info.backend_pid == sender_pid


def test_psycopg_transactions_and_errors(proxy):
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("DROP TABLE IF EXISTS tx_t; CREATE TABLE tx_t (id int PRIMARY KEY)")
        conn.commit()
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        conn.execute("INSERT INTO tx_t VALUES (1)")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        with pytest.raises(psycopg.errors.UniqueViolation) as ei:
            conn.execute("INSERT INTO tx_t VALUES (1)")
        assert ei.value.sqlstate == "23505"
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM tx_t").fetchone() == (0,)
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier("no_such_table")))


async def test_asyncpg_prepared_binary_copy_and_transactions(proxy, pg):
    conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="postgres",
                                 database="postgres")
    try:
        await conn.execute("DROP TABLE IF EXISTS apg; CREATE TABLE apg "
                           "(id int PRIMARY KEY, v text, n numeric, ts timestamptz, b bytea)")
        stmt = await conn.prepare("INSERT INTO apg VALUES ($1, $2, $3, $4, $5)")
        now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
        for i in range(100):
            await stmt.fetch(i, f"v{i}", Decimal(i) / 7, now, bytes([i]))
        await conn.executemany("INSERT INTO apg (id, v) VALUES ($1, $2)",
                               [(i, "many") for i in range(100, 300)])
        await conn.copy_records_to_table("apg", records=[(i, "copied", None, None, None)
                                                         for i in range(300, 1300)],
                                         columns=["id", "v", "n", "ts", "b"])
        sel = await conn.prepare("SELECT id, v, n, ts, b FROM apg WHERE id = $1")
        row = await sel.fetchrow(7)
        assert tuple(row) == (7, "v7", Decimal(7) / 7, now, b"\x07")
        assert await conn.fetchval("SELECT count(*) FROM apg") == 1300
        async with conn.transaction():
            await conn.execute("DELETE FROM apg WHERE id >= 1000")
        try:
            async with conn.transaction():
                await conn.execute("DELETE FROM apg")
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        assert await conn.fetchval("SELECT count(*) FROM apg") == 1000
        with pytest.raises(asyncpg.exceptions.UndefinedColumnError):
            await conn.fetch("SELECT nope FROM apg")
        # cursors inside a transaction
        async with conn.transaction():
            ids = [r["id"] async for r in conn.cursor("SELECT id FROM apg ORDER BY id", prefetch=77)]
        assert ids == list(range(1000))
    finally:
        await conn.close()


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_through_proxy(pg, proxy, mode):
    db = f"bench_{mode}"
    pg.psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    pg.psql(f"CREATE DATABASE {db}")
    pgbench = os.path.join(pg_bin_dir(), "pgbench")
    env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(proxy.port), PGUSER="postgres")
    init = subprocess.run([pgbench, "-i", "-s", "1", "-q", db], env=env,
                          capture_output=True, text=True, timeout=300)
    assert init.returncode == 0, init.stderr
    run = subprocess.run([pgbench, "-M", mode, "-c", "4", "-j", "2", "-t", "250", db], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "number of transactions actually processed: 1000/1000" in run.stdout
    assert "number of failed transactions: 0" in run.stdout
    # TPC-B-like invariants, checked directly on the server
    sums = pg.psql("SELECT (SELECT sum(abalance) FROM pgbench_accounts), "
                   "(SELECT sum(tbalance) FROM pgbench_tellers), "
                   "(SELECT sum(bbalance) FROM pgbench_branches), "
                   "(SELECT sum(delta) FROM pgbench_history), "
                   "(SELECT count(*) FROM pgbench_history)", dbname=db).strip().split("|")
    assert len(set(sums[:4])) == 1 and sums[4] == "1000"
    pg.psql(f"DROP DATABASE {db} WITH (FORCE)")
