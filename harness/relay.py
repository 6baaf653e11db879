"""A fault relay for TCP links on loopback: cut, stall, delay, reject.

Every inter-node link of a cluster under test (and, for partition tests,
every client's connection) passes through one ``Edge`` of this relay: a
listening port that forwards each accepted connection to a target port.
The harness then injects network faults edge by edge, as iptables would
in mmts's tests and toxiproxy in others':

- ``stall`` (iptables DROP): bytes stop flowing in both directions of the
  edge's connections, and new connections are accepted but never reach the
  target. Nothing is lost: TCP retransmits in real life, and here the relay
  simply stops reading, so kernel buffers fill and the sender blocks. On
  ``heal`` the bytes flow again.
- ``reject`` (iptables REJECT): the edge's connections are reset at once
  (SO_LINGER 0) and new ones are reset as soon as they are accepted.
- ``delay_ms``: every chunk is forwarded that much later.
- ``clog``/``unclog`` (FoundationDB's swizzle-clog) are ``stall``/``heal``
  applied to edges one by one, unclogged in random order by the caller.

The relay runs its own asyncio loop in a daemon thread; every control method
is synchronous and returns once the change is in effect. ``close`` stops
everything it started. Memory per connection is bounded by the read size
(64 KiB) times two.
"""
from __future__ import annotations

import asyncio
import socket
import struct
import threading
from dataclasses import dataclass, field

READ_BYTES = 65536


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    tasks: list = field(default_factory=list)


class Edge:
    """One relayed link: ``listen_port`` -> ``target_port`` on 127.0.0.1."""

    def __init__(self, name: str, target_port: int):
        self.name = name
        self.target_port = target_port
        self.listen_port = 0
        self.mode = "ok"                 # ok | stall | reject
        self.delay_ms = 0
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.conns: set[_Conn] = set()
        self.server: asyncio.AbstractServer | None = None
        self.bytes = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.listen_port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reject":
            _reset(writer)
            return
        conn = _Conn(writer)
        self.conns.add(conn)
        try:
            await self.flowing.wait()             # a stalled edge never connects onward
            if self.mode == "reject":
                _reset(writer)
                return
            try:
                sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                _reset(writer)
                return
            conn.server = sw
            up = asyncio.ensure_future(self._pump(reader, sw))
            down = asyncio.ensure_future(self._pump(sr, writer))
            conn.tasks = [up, down]
            await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in conn.tasks:
                t.cancel()
            for w in (conn.client, conn.server):
                if w is not None:
                    w.close()
            self.conns.discard(conn)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while True:
            await self.flowing.wait()
            data = await src.read(READ_BYTES)
            if not data:
                return                          # the whole connection ends (see _accept)
            if self.delay_ms:
                await asyncio.sleep(self.delay_ms / 1000)
            await self.flowing.wait()           # stalled while this chunk was read
            dst.write(data)
            self.bytes += len(data)
            await dst.drain()

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode == "ok":
            self.flowing.set()
        else:
            self.flowing.clear()
        if mode == "reject":
            for c in list(self.conns):
                _reset(c.client)
                if c.server is not None:
                    _reset(c.server)
                for t in c.tasks:
                    t.cancel()

    async def close(self) -> None:
        self.set_mode("reject")
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST, as a REJECT rule (or a crashed peer) does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class Relay:
    """A set of edges served by one background event loop."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fault-relay",
                                       daemon=True)
        self.thread.start()
        self.edges: dict[str, Edge] = {}

    def _call(self, coro_or_fn, *args):
        if asyncio.iscoroutinefunction(coro_or_fn):
            return asyncio.run_coroutine_threadsafe(coro_or_fn(*args), self.loop).result(30)

        async def wrap():
            return coro_or_fn(*args)
        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(30)

    def add(self, name: str, target_port: int) -> int:
        """Relay ``name`` to ``target_port``; returns the port to connect to."""
        edge = Edge(name, target_port)
        self._call(edge.start)
        self.edges[name] = edge
        return edge.listen_port

    def retarget(self, name: str, target_port: int) -> None:
        self.edges[name].target_port = target_port

    def stall(self, *names: str) -> None:
        for n in names:
            self._call(self.edges[n].set_mode, "stall")

    def reject(self, *names: str) -> None:
        for n in names:
            self._call(self.edges[n].set_mode, "reject")

    def heal(self, *names: str) -> None:
        for n in names or tuple(self.edges):
            self._call(self.edges[n].set_mode, "ok")
            self.edges[n].delay_ms = 0

    def delay(self, ms: int, *names: str) -> None:
        for n in names:
            self.edges[n].delay_ms = ms

    def mode(self, name: str) -> str:
        return self.edges[name].mode

    def close(self) -> None:
        for e in list(self.edges.values()):
            try:
                self._call(e.close)
            except Exception:     # the loop may be gone already
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
