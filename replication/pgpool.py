"""A small pool of autocommit connections to the node's own PostgreSQL
(asyncio shell).

The replication node carries out the protocol cores' actions (precommit
records, COMMIT/ROLLBACK PREPARED, look-ups) on these connections. Rules:

- A connection that broke (its backend was terminated, or PostgreSQL
  restarted) is replaced on the next use, never handed out again.
- ``run`` retries a statement once on a fresh connection when the one it
  used broke under it; every statement the node sends through it is
  idempotent (``INSERT ... ON CONFLICT DO NOTHING``, ``COMMIT PREPARED``
  whose "already gone" answer is taken as done, look-ups).
- When PostgreSQL cannot be reached at all, ``run`` raises ``PgUnavailable``
  and calls ``on_lost`` once per outage, so the node can forget what it
  kept in memory about transactions in flight and recover them from the
  database when it is back (replication/README.md, "Crash and restart").
- Bounded: ``size`` connections; a caller waits for a free one.
"""
from __future__ import annotations

import asyncio
from typing import Callable

import psycopg


class PgUnavailable(RuntimeError):
    pass


class Pool:
    def __init__(self, connect: Callable, size: int, *, on_lost: Callable[[], None] | None = None):
        self._connect = connect            # async () -> psycopg.AsyncConnection
        self._free: asyncio.Queue = asyncio.Queue()
        for _ in range(size):
            self._free.put_nowait(None)    # a slot: None until first used
        self.on_lost = on_lost
        self.lost = False

    async def _checkout(self, fresh: bool = False) -> psycopg.AsyncConnection:
        conn = await self._free.get()
        if conn is not None and not conn.closed and not conn.broken and not fresh:
            return conn
        if conn is not None:
            await _close(conn)
        try:
            conn = await self._connect()
        except psycopg.OperationalError as e:
            self._free.put_nowait(None)
            self._mark_lost()
            raise PgUnavailable(f"cannot reach the local PostgreSQL server: {e}") from e
        self.lost = False
        return conn

    def _mark_lost(self) -> None:
        if not self.lost:
            self.lost = True
            if self.on_lost is not None:
                self.on_lost()

    async def run(self, query, params=()) -> psycopg.AsyncCursor:
        """Run one statement; the cursor's rows are fetched already."""
        for attempt in (1, 2):
            # The retry connects anew: the other idle connections may be
            # as dead as the one that just failed.
            conn = await self._checkout(fresh=attempt == 2)
            try:
                return await conn.execute(query, params)
            except psycopg.OperationalError:
                if not conn.broken and not conn.closed:
                    raise              # a statement error of that class, not the connection
                await _close(conn)
                conn = None
                if attempt == 2:
                    self._mark_lost()
                    raise
            finally:
                self._free.put_nowait(conn)
        raise AssertionError("unreachable")

    async def transaction(self, statements: list[tuple[str, tuple]]) -> None:
        """Run ``statements`` in one transaction (no retry: the caller
        repeats the whole transaction later if it fails)."""
        conn = await self._checkout()
        try:
            async with conn.transaction():
                for q, p in statements:
                    await conn.execute(q, p)
        except psycopg.OperationalError:
            if conn.broken or conn.closed:
                await _close(conn)
                conn = None
            raise
        finally:
            self._free.put_nowait(conn)

    async def reset(self) -> None:
        """Close every idle connection (the server restarted: they are all
        dead); the next uses connect anew."""
        n = self._free.qsize()
        for _ in range(n):
            conn = self._free.get_nowait()
            if conn is not None:
                await _close(conn)
            self._free.put_nowait(None)

    async def close(self) -> None:
        while not self._free.empty():
            conn = self._free.get_nowait()
            if conn is not None:
                await _close(conn)


async def _close(conn) -> None:
    try:
        await conn.close()
    except Exception:      # closing a dead connection: nothing to save
        pass
