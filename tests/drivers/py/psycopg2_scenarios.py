"""psycopg2 scenarios of tests/test_drivers.py (see scenario_kit.py for the
command line and the transcript). Tables: psycopg2_*."""
from __future__ import annotations

import hashlib
import io

import psycopg2
import psycopg2.extensions as ext

from scenario_kit import TARGET, run, show, step

STATUS = {ext.TRANSACTION_STATUS_IDLE: "idle", ext.TRANSACTION_STATUS_INTRANS: "in transaction",
          ext.TRANSACTION_STATUS_INERROR: "failed transaction",
          ext.TRANSACTION_STATUS_ACTIVE: "active", ext.TRANSACTION_STATUS_UNKNOWN: "unknown"}


def connect(other: bool = False):
    return psycopg2.connect(TARGET.dsn(other))


def table(name: str, columns: str) -> None:
    with connect() as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {name}")
            cur.execute(f"CREATE TABLE {name} ({columns})")
    conn.close()


def query(cur, sql: str, params=None):
    cur.execute(sql, params)
    return cur.fetchall()


def seen_elsewhere(sql: str) -> None:
    def read():
        conn = connect(other=True)
        try:
            with conn.cursor() as cur:
                return query(cur, sql)
        finally:
            conn.close()
    step("seen by another session", read)


def status(conn) -> None:
    step("transaction status", lambda: STATUS[conn.get_transaction_status()])


def default_transaction():
    table("psycopg2_tx", "id int PRIMARY KEY, v text")
    conn = connect()
    cur = conn.cursor()
    status(conn)
    step("insert 1", lambda: cur.execute("INSERT INTO psycopg2_tx VALUES (1, 'rolled back')"))
    status(conn)
    step("rollback", conn.rollback)
    status(conn)
    seen_elsewhere("SELECT id FROM psycopg2_tx ORDER BY id")
    step("insert 2", lambda: cur.execute("INSERT INTO psycopg2_tx VALUES (%s, %s)", (2, "two")))
    step("insert 3", lambda: cur.execute("INSERT INTO psycopg2_tx VALUES (%s, %s)", (3, "three")))
    step("rowcount", lambda: cur.rowcount)
    step("commit", conn.commit)
    status(conn)
    seen_elsewhere("SELECT id, v FROM psycopg2_tx ORDER BY id")
    step("select opens a transaction too", lambda: query(cur, "SELECT count(*) FROM psycopg2_tx"))
    status(conn)
    step("commit", conn.commit)
    with conn:                                    # commits at the end of the block
        step("insert 4 in a with block",
             lambda: cur.execute("INSERT INTO psycopg2_tx VALUES (4, 'w')"))
    status(conn)
    seen_elsewhere("SELECT id, v FROM psycopg2_tx ORDER BY id")
    conn.close()


def autocommit():
    table("psycopg2_auto", "id int PRIMARY KEY")
    conn = connect()
    conn.autocommit = True
    cur = conn.cursor()
    step("insert 1", lambda: cur.execute("INSERT INTO psycopg2_auto VALUES (1)"))
    status(conn)
    seen_elsewhere("SELECT id FROM psycopg2_auto ORDER BY id")
    step("insert 1 again", lambda: cur.execute("INSERT INTO psycopg2_auto VALUES (1)"))
    status(conn)
    step("explicit BEGIN", lambda: cur.execute("BEGIN"))
    step("insert 2", lambda: cur.execute("INSERT INTO psycopg2_auto VALUES (2)"))
    status(conn)
    step("explicit ROLLBACK", lambda: cur.execute("ROLLBACK"))
    step("insert 3 with parameters",
         lambda: cur.execute("INSERT INTO psycopg2_auto VALUES (%s)", (3,)))
    step("select", lambda: query(cur, "SELECT id FROM psycopg2_auto ORDER BY id"))
    seen_elsewhere("SELECT id FROM psycopg2_auto ORDER BY id")
    conn.close()


def failed_then_rollback():
    table("psycopg2_fail", "id int PRIMARY KEY")
    conn = connect()
    cur = conn.cursor()
    step("insert 1", lambda: cur.execute("INSERT INTO psycopg2_fail VALUES (1)"))
    step("divide by zero", lambda: cur.execute("SELECT 1/0"))
    status(conn)
    step("next statement", lambda: cur.execute("SELECT 1"))
    step("commit of the failed transaction", conn.commit)
    status(conn)
    seen_elsewhere("SELECT id FROM psycopg2_fail ORDER BY id")
    step("insert 2", lambda: cur.execute("INSERT INTO psycopg2_fail VALUES (2)"))
    step("insert 2 again", lambda: cur.execute("INSERT INTO psycopg2_fail VALUES (2)"))
    step("rollback", conn.rollback)
    status(conn)
    step("insert 3", lambda: cur.execute("INSERT INTO psycopg2_fail VALUES (3)"))
    step("commit", conn.commit)
    seen_elsewhere("SELECT id FROM psycopg2_fail ORDER BY id")
    conn.close()


def savepoints():
    table("psycopg2_sp", "id int PRIMARY KEY")
    conn = connect()
    cur = conn.cursor()
    for what, sql in [("insert 1", "INSERT INTO psycopg2_sp VALUES (1)"),
                      ("savepoint a", "SAVEPOINT a"),
                      ("insert 2", "INSERT INTO psycopg2_sp VALUES (2)"),
                      ("rollback to a", "ROLLBACK TO SAVEPOINT a"),
                      ("savepoint b", "SAVEPOINT b"),
                      ("insert 1 again", "INSERT INTO psycopg2_sp VALUES (1)"),
                      ("next statement", "INSERT INTO psycopg2_sp VALUES (5)"),
                      ("rollback to b", "ROLLBACK TO SAVEPOINT b"),
                      ("insert 3", "INSERT INTO psycopg2_sp VALUES (3)"),
                      ("release b", "RELEASE SAVEPOINT b"),
                      ("savepoint c", "SAVEPOINT c"),
                      ("insert 4", "INSERT INTO psycopg2_sp VALUES (4)"),
                      ("release c", "RELEASE c")]:
        step(what, lambda sql=sql: cur.execute(sql))
    step("rows before commit", lambda: query(cur, "SELECT id FROM psycopg2_sp ORDER BY id"))
    step("commit", conn.commit)
    seen_elsewhere("SELECT id FROM psycopg2_sp ORDER BY id")
    conn.close()


def executemany():
    table("psycopg2_many", "id int PRIMARY KEY, v text")
    conn = connect()
    cur = conn.cursor()
    step("executemany 50", lambda: cur.executemany(
        "INSERT INTO psycopg2_many VALUES (%s, %s)", [(i, f"v{i}") for i in range(1, 51)]))
    step("rowcount", lambda: cur.rowcount)
    step("commit", conn.commit)
    step("executemany with a duplicate", lambda: cur.executemany(
        "INSERT INTO psycopg2_many VALUES (%s, %s)", [(51, "x"), (52, "y"), (1, "dup")]))
    step("rollback", conn.rollback)
    step("executemany update", lambda: cur.executemany(
        "UPDATE psycopg2_many SET v = %s WHERE id = %s", [("u", i) for i in range(1, 11)]))
    step("rowcount", lambda: cur.rowcount)
    step("commit", conn.commit)
    seen_elsewhere("SELECT count(*), sum(id), count(*) FILTER (WHERE v = 'u') FROM psycopg2_many")
    conn.close()


def copy_expert():
    table("psycopg2_copy", "id int PRIMARY KEY, v text")
    conn = connect()
    cur = conn.cursor()
    data = "".join(f"{i}\tline {i}\n" for i in range(1, 401))
    step("copy from stdin 400", lambda: cur.copy_expert(
        "COPY psycopg2_copy FROM STDIN", io.StringIO(data)))
    step("rowcount", lambda: cur.rowcount)
    step("commit", conn.commit)
    step("copy from stdin with a duplicate", lambda: cur.copy_expert(
        "COPY psycopg2_copy FROM STDIN", io.StringIO("401\tx\n1\tdup\n")))
    step("rollback", conn.rollback)
    step("copy from stdin, rolled back", lambda: cur.copy_expert(
        "COPY psycopg2_copy FROM STDIN", io.StringIO("402\tx\n")))
    step("rollback", conn.rollback)
    buf = io.StringIO()
    step("copy to stdout", lambda: cur.copy_expert(
        "COPY (SELECT * FROM psycopg2_copy ORDER BY id) TO STDOUT", buf))
    step("rowcount", lambda: cur.rowcount)
    step("commit", conn.commit)
    got = buf.getvalue()
    step("copied out", lambda: f"{got.count(chr(10))} lines, same as copied in: {got == data}, "
                               f"md5 {hashlib.md5(got.encode()).hexdigest()}")
    seen_elsewhere("SELECT count(*), sum(id) FROM psycopg2_copy")
    conn.close()


def named_cursor():
    table("psycopg2_big", "id int PRIMARY KEY")
    conn = connect()
    cur = conn.cursor()
    step("fill 1000",
         lambda: cur.execute("INSERT INTO psycopg2_big SELECT generate_series(1, 1000)"))
    step("commit", conn.commit)
    named = conn.cursor(name="psycopg2_cur")
    named.itersize = 100
    step("declare", lambda: named.execute("SELECT id FROM psycopg2_big ORDER BY id"))
    step("fetchmany 3", lambda: named.fetchmany(3))
    step("fetchone", lambda: named.fetchone())
    step("scroll to 500 and fetchone", lambda: (named.scroll(500, mode="absolute"),
                                                named.fetchone())[1])
    step("iterate the rest", lambda: (lambda ids: f"{len(ids)} rows, sum {sum(ids)}")(
        [r[0] for r in named]))
    step("insert while the cursor is open", lambda: cur.execute(
        "INSERT INTO psycopg2_big VALUES (1001)"))
    step("close cursor", named.close)
    step("commit", conn.commit)
    held = conn.cursor(name="psycopg2_held", withhold=True)
    step("declare with hold",
         lambda: held.execute("SELECT id FROM psycopg2_big WHERE id > 995 ORDER BY id"))
    step("commit", conn.commit)
    step("fetchall after commit", lambda: held.fetchall())
    step("close cursor", held.close)
    seen_elsewhere("SELECT count(*), max(id) FROM psycopg2_big")
    conn.close()


def readonly_session():
    table("psycopg2_ro", "id int PRIMARY KEY")
    conn = connect()
    step("set_session readonly", lambda: conn.set_session(readonly=True))
    cur = conn.cursor()
    step("select", lambda: query(cur, "SELECT count(*) FROM psycopg2_ro"))
    step("show transaction_read_only", lambda: query(cur, "SHOW transaction_read_only"))
    step("insert", lambda: cur.execute("INSERT INTO psycopg2_ro VALUES (1)"))
    status(conn)
    step("rollback", conn.rollback)
    step("set_session read write", lambda: conn.set_session(readonly=False))
    step("insert", lambda: cur.execute("INSERT INTO psycopg2_ro VALUES (2)"))
    step("commit", conn.commit)
    conn.autocommit = True
    step("set_session readonly in autocommit", lambda: conn.set_session(readonly=True))
    step("insert in autocommit", lambda: cur.execute("INSERT INTO psycopg2_ro VALUES (3)"))
    seen_elsewhere("SELECT id FROM psycopg2_ro ORDER BY id")
    conn.close()


if __name__ == "__main__":
    assert show([(1,)]) == "[1]"
    run([("default_transaction", default_transaction),
         ("autocommit", autocommit),
         ("failed_then_rollback", failed_then_rollback),
         ("savepoints", savepoints),
         ("executemany", executemany),
         ("copy_expert", copy_expert),
         ("named_cursor", named_cursor),
         ("readonly_session", readonly_session)])
