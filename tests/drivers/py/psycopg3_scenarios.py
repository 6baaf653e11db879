"""psycopg 3 scenarios of tests/test_drivers.py (see scenario_kit.py for the
command line and the transcript). Tables: psycopg3_*."""
from __future__ import annotations

import hashlib

import psycopg

from scenario_kit import TARGET, describe, out, run, step


def connect(other: bool = False, autocommit: bool = False) -> psycopg.Connection:
    return psycopg.connect(TARGET.dsn(other), autocommit=autocommit)


def table(name: str, columns: str) -> None:
    with connect(autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")
        conn.execute(f"CREATE TABLE {name} ({columns})")


def seen_elsewhere(sql: str) -> None:
    def read():
        with connect(other=True) as conn:
            return conn.execute(sql).fetchall()
    step("seen by another session", read)


def status(conn) -> None:
    step("transaction status", lambda: conn.info.transaction_status.name)


def pipeline_run(conn, statements: list[str], sync_after: int | None = None) -> None:
    """Send the statements in one pipeline (with a Sync after statement
    ``sync_after``, if given); print the error psycopg raised, then what
    each statement's cursor got. psycopg raises the error when it reads the
    failed statement's result, which may be during a later execute() or at
    the end of the block: the cursors, not the moment, say where it failed."""
    curs = [conn.cursor() for _ in statements]
    try:
        with conn.pipeline() as p:
            for i, (cur, sql) in enumerate(zip(curs, statements), 1):
                cur.execute(sql)
                if i == sync_after:
                    p.sync()
        out("pipeline: no error")
    except psycopg.Error as e:
        detail = e.diag.message_detail or ""
        out(f"pipeline raised: {describe(e)} ({detail})")
    for i, (cur, sql) in enumerate(zip(curs, statements), 1):
        got = cur.statusmessage
        if got and cur.description is not None:
            got += " " + str(cur.fetchall())
        out(f"  statement {i} {sql!r}: {got or 'no result'}")


def pipeline_error_in_the_middle():
    table("psycopg3_pipe", "id int PRIMARY KEY")
    ins = "INSERT INTO psycopg3_pipe VALUES ({}) RETURNING id".format
    statements = [ins(1), ins(2), ins(1), ins(3), "SELECT count(*) FROM psycopg3_pipe"]
    with connect(autocommit=True) as conn:
        out("-- autocommit, one Sync at the end")
        pipeline_run(conn, statements)
        status(conn)
        seen_elsewhere("SELECT id FROM psycopg3_pipe ORDER BY id")
        out("-- autocommit, a Sync after statement 2")
        pipeline_run(conn, statements, sync_after=2)
        seen_elsewhere("SELECT id FROM psycopg3_pipe ORDER BY id")
    with connect() as conn:
        out("-- in a transaction")
        pipeline_run(conn, [ins(10), ins(11), ins(1), ins(12)])
        status(conn)
        step("rollback", conn.rollback)
        out("-- in a transaction, no error")
        pipeline_run(conn, [ins(20), ins(21), "SELECT count(*) FROM psycopg3_pipe"])
        status(conn)
        step("commit", conn.commit)
        seen_elsewhere("SELECT id FROM psycopg3_pipe ORDER BY id")
        out("-- 50 prepared inserts and a commit in one pipeline")

        def prepared():
            with conn.pipeline():
                cur = conn.cursor()
                for i in range(100, 150):
                    cur.execute("INSERT INTO psycopg3_pipe VALUES (%s)", (i,), prepare=True)
                conn.commit()
        step("pipeline", prepared)
        seen_elsewhere("SELECT count(*), sum(id) FROM psycopg3_pipe")


def autocommit_and_transactions():
    table("psycopg3_tx", "id int PRIMARY KEY, v text")
    with connect(autocommit=True) as conn:
        step("autocommit insert 1", lambda: conn.execute(
            "INSERT INTO psycopg3_tx VALUES (%s, %s)", (1, "one")).rowcount)
        status(conn)
        seen_elsewhere("SELECT id FROM psycopg3_tx ORDER BY id")

        def block(ok: bool):
            with conn.transaction():
                conn.execute("INSERT INTO psycopg3_tx VALUES (%s, 'tx')", (2 if ok else 3,))
                if not ok:
                    raise psycopg.Rollback()
            return "left the block"
        step("transaction block", lambda: block(True))
        step("transaction block ending in Rollback", lambda: block(False))
        status(conn)
        seen_elsewhere("SELECT id FROM psycopg3_tx ORDER BY id")
    with connect() as conn:
        step("insert 4", lambda: conn.execute("INSERT INTO psycopg3_tx VALUES (4, 'r')").rowcount)
        status(conn)
        step("rollback", conn.rollback)
        step("insert 5", lambda: conn.execute("INSERT INTO psycopg3_tx VALUES (5, 'c')").rowcount)
        step("update 1",
             lambda: conn.execute("UPDATE psycopg3_tx SET v = 'uno' WHERE id = 1").rowcount)
        step("commit", conn.commit)
        seen_elsewhere("SELECT id, v FROM psycopg3_tx ORDER BY id")
        step("insert 5 again",
             lambda: conn.execute("INSERT INTO psycopg3_tx VALUES (5, 'c')").rowcount)
        status(conn)
        step("commit of the failed transaction", conn.commit)
        status(conn)
        step("binary parameters and results", lambda: conn.cursor(binary=True).execute(
            "SELECT %b::bytea, %s::int + 1", (b"\x00\x01", 41)).fetchone())
        step("rollback", conn.rollback)


def nested_transactions():
    table("psycopg3_nest", "id int PRIMARY KEY")
    with connect(autocommit=True) as conn:
        ins = "INSERT INTO psycopg3_nest VALUES (%s)"

        def nested():
            with conn.transaction():
                conn.execute(ins, (1,))
                with conn.transaction():
                    conn.execute(ins, (2,))
                    raise psycopg.Rollback()             # back to the savepoint
                try:
                    with conn.transaction():
                        conn.execute(ins, (3,))
                        conn.execute(ins, (1,))          # duplicate: the savepoint is rolled back
                except psycopg.errors.UniqueViolation as e:
                    out(f"inner block raised: {describe(e)}")
                with conn.transaction() as outer_inner:
                    conn.execute(ins, (4,))
                    with conn.transaction():
                        conn.execute(ins, (5,))
                        raise psycopg.Rollback(outer_inner)    # both levels
                conn.execute(ins, (6,))
                ids = conn.execute("SELECT array_agg(id ORDER BY id) FROM psycopg3_nest")
                out(f"rows in the outer block: {ids.fetchone()[0]}")
            return "committed"
        step("nested blocks", nested)
        seen_elsewhere("SELECT id FROM psycopg3_nest ORDER BY id")

        def failing_outer():
            with conn.transaction():
                conn.execute(ins, (7,))
                with conn.transaction():
                    conn.execute(ins, (8,))
                conn.execute("SELECT 1/0")
        step("outer block failing after a released savepoint", failing_outer)
        status(conn)
        seen_elsewhere("SELECT id FROM psycopg3_nest ORDER BY id")


def copy_both_ways():
    table("psycopg3_copy", "id int PRIMARY KEY, v text, b bytea")
    rows = [(i, f"line {i}", bytes([i % 256])) for i in range(1, 301)]
    with connect() as conn:
        cur = conn.cursor()

        def copy_in(sql, data):
            with cur.copy(sql) as cp:
                cp.set_types(["int4", "text", "bytea"])
                for r in data:
                    cp.write_row(r)
            return cur.rowcount
        step("copy from stdin (text) 200", lambda: copy_in(
            "COPY psycopg3_copy FROM STDIN", rows[:200]))
        step("copy from stdin (binary) 100", lambda: copy_in(
            "COPY psycopg3_copy FROM STDIN (FORMAT binary)", rows[200:]))
        step("commit", conn.commit)
        step("copy with a duplicate", lambda: copy_in(
            "COPY psycopg3_copy FROM STDIN", [(301, "x", b""), (1, "dup", b"")]))
        status(conn)
        step("rollback", conn.rollback)
        step("copy, rolled back", lambda: copy_in(
            "COPY psycopg3_copy FROM STDIN", [(302, "x", b"")]))
        step("rollback", conn.rollback)

        def copy_out(fmt: str):
            got = []
            with cur.copy(f"COPY (SELECT * FROM psycopg3_copy ORDER BY id) TO STDOUT {fmt}") as cp:
                cp.set_types(["int4", "text", "bytea"])
                for r in cp.rows():
                    got.append(tuple(r))
            conv = [(a, b, bytes(c)) for a, b, c in got]
            return (f"{len(got)} rows, same as copied in: {conv == rows}, "
                    f"md5 {hashlib.md5(repr(conv).encode()).hexdigest()}")
        step("copy to stdout (binary)", lambda: copy_out("(FORMAT binary)"))
        step("copy to stdout (text)", lambda: copy_out(""))

        def copy_out_raw():
            with cur.copy("COPY (SELECT id, v FROM psycopg3_copy ORDER BY id) TO STDOUT") as cp:
                data = b"".join(bytes(b) for b in cp)
            lines = data.count(b"\n")
            return f"{lines} lines, md5 {hashlib.md5(data).hexdigest()}"
        step("copy to stdout (text) raw", copy_out_raw)
        step("commit", conn.commit)
    seen_elsewhere("SELECT count(*), sum(id), sum(length(b)) FROM psycopg3_copy")


if __name__ == "__main__":
    run([("pipeline_error_in_the_middle", pipeline_error_in_the_middle),
         ("autocommit_and_transactions", autocommit_and_transactions),
         ("nested_transactions", nested_transactions),
         ("copy_both_ways", copy_both_ways)])
