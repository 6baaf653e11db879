"""asyncpg scenarios of tests/test_drivers.py (see scenario_kit.py for the
command line and the transcript). Tables: asyncpg_*."""
from __future__ import annotations

import asyncpg

from scenario_kit import TARGET, astep, describe, out, run_async

_opened: list[asyncpg.Connection] = []


async def connect(other: bool = False) -> asyncpg.Connection:
    host, port = (TARGET.host2, TARGET.port2) if other else (TARGET.host, TARGET.port)
    conn = await asyncpg.connect(host=host, port=port, user="postgres", database="postgres")
    _opened.append(conn)
    return conn


def drop_connections() -> None:
    """After a scenario: whatever it left open (a cancelled one) is cut."""
    for conn in _opened:
        if not conn.is_closed():
            conn.terminate()
    _opened.clear()


async def table(conn, name: str, columns: str) -> None:
    await conn.execute(f"DROP TABLE IF EXISTS {name}")
    await conn.execute(f"CREATE TABLE {name} ({columns})")


async def seen_elsewhere(sql: str) -> None:
    async def read():
        conn = await connect(other=True)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()
    await astep("seen by another session", read())


async def transactions():
    conn = await connect()
    await table(conn, "asyncpg_tx", "id int PRIMARY KEY, v text")

    async def block(ids, fail: bool):
        async with conn.transaction():
            for i in ids:
                await conn.execute("INSERT INTO asyncpg_tx VALUES ($1, $2)", i, f"v{i}")
            if fail:
                raise RuntimeError("rolled back by the application")
        return "committed"
    await astep("transaction inserting 1, 2", block([1, 2], False))
    await astep("transaction inserting 3, then raising", block([3], True))
    await astep("in transaction after the block", _value(conn.is_in_transaction()))
    await seen_elsewhere("SELECT id, v FROM asyncpg_tx ORDER BY id")

    async def nested():
        async with conn.transaction():
            await conn.execute("INSERT INTO asyncpg_tx VALUES (4, 'outer')")
            try:
                async with conn.transaction():              # a savepoint
                    await conn.execute("INSERT INTO asyncpg_tx VALUES (5, 'inner')")
                    await conn.execute("INSERT INTO asyncpg_tx VALUES (1, 'dup')")
            except asyncpg.PostgresError as e:
                out(f"inner transaction raised: {describe(e)}")
            async with conn.transaction():
                await conn.execute("INSERT INTO asyncpg_tx VALUES (6, 'inner 2')")
        return "committed"
    await astep("nested transactions", nested())
    await seen_elsewhere("SELECT id, v FROM asyncpg_tx ORDER BY id")

    async def manual():
        tr = conn.transaction(isolation="repeatable_read")
        await tr.start()
        await conn.execute("INSERT INTO asyncpg_tx VALUES (7, 'manual')")
        await tr.rollback()
        tr = conn.transaction(isolation="serializable")
        await tr.start()
        await conn.execute("INSERT INTO asyncpg_tx VALUES (8, 'manual')")
        await tr.commit()
        return "done"
    await astep("start/rollback, start/commit", manual())
    await seen_elsewhere("SELECT id, v FROM asyncpg_tx ORDER BY id")
    await conn.close()


async def _value(v):
    return v


async def failed_statement_in_transaction():
    conn = await connect()
    await table(conn, "asyncpg_fail", "id int PRIMARY KEY")

    async def failing():
        async with conn.transaction():
            await conn.execute("INSERT INTO asyncpg_fail VALUES (1)")
            try:
                await conn.fetchval("SELECT 1/0")
            except asyncpg.PostgresError as e:
                out(f"divide by zero: {describe(e)}")
            try:
                await conn.fetchval("SELECT 1")
            except asyncpg.PostgresError as e:
                out(f"next statement: {describe(e)}")
            await conn.execute("INSERT INTO asyncpg_fail VALUES (2)")
    await astep("transaction with a failed statement", failing())
    await astep("in transaction after the block", _value(conn.is_in_transaction()))
    await astep("insert 3 in autocommit", conn.execute("INSERT INTO asyncpg_fail VALUES (3)"))
    await astep("insert 3 again", conn.execute("INSERT INTO asyncpg_fail VALUES (3)"))
    await astep("fetch after the error", conn.fetchval("SELECT count(*) FROM asyncpg_fail"))
    await seen_elsewhere("SELECT id FROM asyncpg_fail ORDER BY id")
    await conn.close()


async def prepared_statements():
    conn = await connect()
    await table(conn, "asyncpg_prep", "id int PRIMARY KEY, v text, n numeric")
    ins = await conn.prepare("INSERT INTO asyncpg_prep VALUES ($1, $2, $3) RETURNING id, v")
    sel = await conn.prepare("SELECT v, n FROM asyncpg_prep WHERE id = $1")
    out(f"parameters: {[t.name for t in ins.get_parameters()]}, "
        f"columns: {[a.name for a in sel.get_attributes()]}")
    for i in (1, 2, 3):
        await astep(f"prepared insert {i}", _row(ins.fetchrow(i, f"v{i}", i / 2)))
    await astep("prepared insert duplicate", _row(ins.fetchrow(1, "dup", 0)))
    await astep("prepared select 2", _row(sel.fetchrow(2)))
    await astep("prepared select 9", _row(sel.fetchrow(9)))

    async def in_tx(commit: bool):
        tr = conn.transaction()
        await tr.start()
        await ins.fetchrow(10 if commit else 11, "tx", 1)
        v = await sel.fetchval(10 if commit else 11)
        await (tr.commit() if commit else tr.rollback())
        return v
    await astep("prepared statements in a rolled back transaction", in_tx(False))
    await astep("prepared statements in a committed transaction", in_tx(True))
    await astep("statement cache: same query again", conn.fetchval(
        "SELECT v FROM asyncpg_prep WHERE id = $1", 3))
    await astep("statement cache: same query again", conn.fetchval(
        "SELECT v FROM asyncpg_prep WHERE id = $1", 10))

    async def cursor():
        async with conn.transaction():
            got = [r[0] async for r in conn.cursor(
                "SELECT g FROM generate_series(1, $1::int) g", 250, prefetch=40)]
        return f"{len(got)} rows, sum {sum(got)}"
    await astep("cursor with prefetch 40", cursor())
    await seen_elsewhere("SELECT id, v, n FROM asyncpg_prep ORDER BY id")
    await conn.close()


async def _row(coro):
    r = await coro
    return "no row" if r is None else tuple(r)


async def copy_records_to_table():
    conn = await connect()
    await table(conn, "asyncpg_copy", "id int PRIMARY KEY, v text")
    records = [(i, f"rec {i}") for i in range(1, 251)]
    await astep("copy_records_to_table 250", conn.copy_records_to_table(
        "asyncpg_copy", records=records))
    await astep("copy_records_to_table with a duplicate", conn.copy_records_to_table(
        "asyncpg_copy", records=[(251, "x"), (1, "dup")]))

    async def in_tx():
        async with conn.transaction():
            await conn.copy_records_to_table("asyncpg_copy", records=[(300, "tx")],
                                             columns=["id", "v"])
            raise RuntimeError("rolled back by the application")
    await astep("copy_records_to_table in a rolled back transaction", in_tx())

    async def copy_out():
        import io
        buf = io.BytesIO()
        status = await conn.copy_from_query(
            "SELECT * FROM asyncpg_copy ORDER BY id", output=buf, format="csv")
        lines = buf.getvalue().decode().splitlines()
        return f"{status}, {len(lines)} lines, first {lines[0]}, last {lines[-1]}"
    await astep("copy_from_query", copy_out())
    await seen_elsewhere("SELECT count(*), sum(id) FROM asyncpg_copy")
    await conn.close()


async def executemany():
    conn = await connect()
    await table(conn, "asyncpg_many", "id int PRIMARY KEY, v text")
    await astep("executemany 100", conn.executemany(
        "INSERT INTO asyncpg_many VALUES ($1, $2)", [(i, f"v{i}") for i in range(1, 101)]))
    await astep("executemany with a duplicate (atomic)", conn.executemany(
        "INSERT INTO asyncpg_many VALUES ($1, $2)", [(101, "a"), (102, "b"), (5, "dup")]))
    await astep("count", conn.fetchval("SELECT count(*) FROM asyncpg_many"))

    async def in_tx():
        async with conn.transaction():
            await conn.executemany("UPDATE asyncpg_many SET v = $1 WHERE id = $2",
                                   [("u", i) for i in range(1, 21)])
            await conn.executemany("DELETE FROM asyncpg_many WHERE id = $1",
                                   [(i,) for i in range(91, 101)])
        return "committed"
    await astep("executemany update and delete in a transaction", in_tx())
    await seen_elsewhere("SELECT count(*), sum(id), count(*) FILTER (WHERE v = 'u') "
                         "FROM asyncpg_many")
    await conn.close()


if __name__ == "__main__":
    run_async([("transactions", transactions),
               ("failed_statement_in_transaction", failed_statement_in_transaction),
               ("prepared_statements", prepared_statements),
               ("copy_records_to_table", copy_records_to_table),
               ("executemany", executemany)], cleanup=drop_connections)
