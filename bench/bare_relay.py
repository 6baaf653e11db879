"""A byte pump on uvloop: the floor under any asyncio/uvloop relay.

Not a product and not a proxy: it parses nothing (no startup, no message
framing, no transaction state, no cancel keys), it only copies each read
from one socket to the other, with the same write-buffer backpressure as
mmproxy. ``bench/proxy_bench.py`` runs it beside mmproxy so that the
ratios show how much of mmproxy's cost is its own work and how much is
what uvloop's reads, writes and callbacks cost on the machine.

    python bench/bare_relay.py LISTEN_PORT PG_SOCKET_PATH
"""
from __future__ import annotations

import asyncio
import signal
import sys


class Side(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: Side | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(256 * 1024, 64 * 1024)

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is None or other.transport is None:
            self.pending.append(data)
        else:
            other.transport.write(data)

    def connection_lost(self, exc) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


async def main(port: int, pg_socket: str) -> None:
    loop = asyncio.get_running_loop()

    def client_factory() -> Side:
        client = Side()

        async def connect() -> None:
            backend = Side()
            backend.other = client
            try:
                await loop.create_unix_connection(lambda: backend, pg_socket)
            except OSError:
                if client.transport is not None:
                    client.transport.close()
                return
            client.other = backend
            for data in client.pending:
                backend.transport.write(data)
            client.pending.clear()

        loop.create_task(connect())
        return client

    server = await loop.create_server(client_factory, "127.0.0.1", port,
                                      reuse_address=True, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    import uvloop
    uvloop.run(main(int(sys.argv[1]), sys.argv[2]))
