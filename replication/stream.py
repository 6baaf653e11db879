"""Streaming a logical slot with the replication protocol (asyncio shell).

A ``SlotStream`` opens a ``replication=database`` connection with libpq
(through psycopg's low-level ``pgconn``, so every authentication method
libpq knows works), runs ``START_REPLICATION ... LOGICAL`` with pgoutput
protocol 3, ``two_phase`` and ``messages`` on, and yields decoded messages
with the LSN of the XLogData that carried them.

Rules kept here:
- The receiver says how far it got with ``confirm(lsn)``; only confirmed
  positions are reported as flushed, so after a restart PostgreSQL resends
  everything not confirmed (PG15-FACTS: once confirmed past a PREPARE, only
  its COMMIT/ROLLBACK PREPARED follows).
- A keepalive that asks for a reply is answered at once; otherwise status
  is sent every ``status_interval_s``.
- Memory: one CopyData at a time; the walsender is not read faster than the
  consumer iterates (TCP flow control does the rest).
"""
from __future__ import annotations

import asyncio
import struct
import time
from typing import AsyncIterator

import psycopg
from psycopg import pq

from common.sql import quote_literal

from . import pgoutput as po


_XLOGDATA = ord("w")
# closing does not wait longer than this to report the confirmed position
# (the slot keeps the last one it got; the next session reports again)
CLOSE_STATUS_TIMEOUT_S = 1.0
_XLOG_HEADER = struct.Struct("!QQ")     # start LSN, server's end of WAL (then send time)


class StreamError(RuntimeError):
    pass


class SlotStream:
    def __init__(self, conninfo: str, slot: str, publication: str, *,
                 start_lsn: int = 0, status_interval_s: float = 1.0,
                 application_name: str = "mmproxy stream"):
        self.conninfo = conninfo
        self.application_name = application_name
        self.slot = slot
        self.publication = publication
        self.start_lsn = start_lsn
        self.status_interval_s = status_interval_s
        self.confirmed_lsn = start_lsn
        self.server_end_lsn = 0
        self._conn: psycopg.AsyncConnection | None = None
        self._pg: pq.abc.PGconn | None = None
        self._last_status = 0.0
        self._readable = asyncio.Event()
        self._fd: int | None = None
        # called with the position of every keepalive: the walsender has
        # sent (or skipped) everything before it
        self.on_keepalive = None
        # called before the stream waits for the walsender (everything
        # received so far has been yielded): a consumer that batches its
        # output flushes it here
        self.on_idle = None

    async def start(self) -> None:
        self._conn = await psycopg.AsyncConnection.connect(
            self.conninfo, replication="database", autocommit=True,
            application_name=self.application_name)
        pg = self._pg = self._conn.pgconn
        opts = ", ".join(f"{k} {quote_literal(v)}" for k, v in (
            ("proto_version", "3"), ("publication_names", self.publication),
            ("messages", "true"), ("two_phase", "true"), ("streaming", "off")))
        cmd = (f"START_REPLICATION SLOT {self.slot} LOGICAL "
               f"{po.lsn_str(self.start_lsn)} ({opts})")
        pg.send_query(cmd.encode())
        pg.nonblocking = 1
        loop = asyncio.get_running_loop()
        # Remembered: once libpq has dropped a broken connection, pg.socket
        # raises, and the reader must still be removed.
        self._fd = pg.socket
        loop.add_reader(self._fd, self._readable.set)
        while True:
            await self._flush()
            pg.consume_input()
            if not pg.is_busy():
                res = pg.get_result()
                if res is None:
                    raise StreamError("START_REPLICATION returned no result")
                if res.status == pq.ExecStatus.COPY_BOTH:
                    return
                msg = (res.error_message or b"").decode(errors="replace").strip()
                raise StreamError(f"START_REPLICATION failed: {msg}")
            await self._wait_readable()

    async def _wait_readable(self) -> None:
        self._readable.clear()
        # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow
        # the task's cancellation when the wait ends at the same moment, and
        # a sender that lost its cancellation streams on forever (a proxy
        # asked to stop hung until killed)
        try:
            async with asyncio.timeout(self.status_interval_s):
                await self._readable.wait()
        except TimeoutError:
            pass

    async def _flush(self) -> None:
        # While our bytes wait, read what the walsender sends (libpq's
        # advice for PQflush returning 1): a walsender blocked writing to a
        # full socket reads nothing, so not reading would wait forever.
        while self._pg.flush() == 1:
            self._pg.consume_input()
            await asyncio.sleep(0.001)

    def confirm(self, lsn: int) -> None:
        """Everything up to ``lsn`` is applied durably on our side."""
        if lsn > self.confirmed_lsn:
            self.confirmed_lsn = lsn

    async def send_status(self, reply_requested: bool = False) -> None:
        c = self.confirmed_lsn
        data = po.standby_status_update(c, c, c, int(time.time() * 1_000_000), reply_requested)
        if self._pg.put_copy_data(data) != 1:
            raise StreamError("could not send standby status update")
        await self._flush()
        self._last_status = time.monotonic()

    async def raw_messages(self) -> AsyncIterator[tuple[int, bytes]]:
        """Yields (lsn, pgoutput payload) for every XLogData until the
        stream ends, undecoded: a consumer that skips most messages (the
        sender skips every transaction applied from another node) looks at
        the first byte and decodes only what it needs."""
        pg = self._pg
        while True:
            n, data = pg.get_copy_data(1)
            if n == 0:
                if self.on_idle is not None:
                    self.on_idle()
                if time.monotonic() - self._last_status >= self.status_interval_s:
                    await self.send_status()
                await self._wait_readable()
                pg.consume_input()
                continue
            if n == -1:
                res = pg.get_result()
                msg = (res.error_message or b"").decode(errors="replace").strip() if res else ""
                raise StreamError(f"replication stream ended: {msg or 'copy done'}")
            if n == -2:
                raise StreamError(f"replication stream failed: "
                                  f"{pg.error_message.decode(errors='replace').strip()}")
            kind = data[0]
            if kind == _XLOGDATA and n > 25:
                start, end = _XLOG_HEADER.unpack_from(data, 1)
                if end > self.server_end_lsn:
                    self.server_end_lsn = end
                yield start, bytes(data[25:])
                continue
            m = po.decode_copy_data(bytes(data))      # keepalive, or a clear error
            if isinstance(m, po.Keepalive):
                self.server_end_lsn = m.end_lsn
                if self.on_keepalive is not None:
                    self.on_keepalive(m.end_lsn)
                if m.reply_requested:
                    await self.send_status()
                continue
            raise StreamError("empty XLogData from the walsender")

    async def messages(self, with_payload: bool = False) -> AsyncIterator[tuple]:
        """Yields (lsn, pgoutput message) until the stream ends; with
        ``with_payload``, (lsn, message, raw payload) to forward as is."""
        async for lsn, payload in self.raw_messages():
            if with_payload:
                yield lsn, po.decode(payload), payload
            else:
                yield lsn, po.decode(payload)

    async def close(self) -> None:
        if self._pg is not None and self.confirmed_lsn > self.start_lsn:
            try:  # report the last confirmed position before leaving, briefly
                async with asyncio.timeout(CLOSE_STATUS_TIMEOUT_S):
                    await self.send_status()
            except (StreamError, psycopg.Error, OSError, TimeoutError):
                pass
        if self._fd is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._fd)
            except (ValueError, OSError):
                pass
            self._fd = None
        if self._conn is not None:
            await self._conn.close()
