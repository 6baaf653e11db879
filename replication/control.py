"""The consensus links: one TCP connection from this node to each peer,
used only for the consensus service's messages (Raft, Status, LeaseGrant).

Separate from the replication link so that a heartbeat never waits behind
megabytes of a transaction's rows: a false suspicion under load would cost
a generation. Frames are ``link.control`` ('C'); the connection opens with
``link.control_hello`` ('G'). The peer's messages come on the connection it
opened (``ReplicationNode._incoming`` hands them to ``deliver``).

Messages to a peer that is not connected, or whose connection has more
than ``MAX_BUFFER`` bytes queued (a paused process), are dropped: the
consensus tolerates loss, and memory stays bounded.
"""
from __future__ import annotations

import asyncio
import socket

from config import parse_address

from . import link

MAX_BUFFER = 1 << 20
RECONNECT_S = 0.1


class ControlLinks:
    def __init__(self, self_id: int, addresses: dict[int, str], log) -> None:
        self.id = self_id
        self.addresses = addresses
        self.log = log
        self.out: dict[int, asyncio.StreamWriter] = {}
        self.deliver = None            # (peer, payload) -> None, set by the owner

    def send(self, peer: int, payload: bytes) -> None:
        w = self.out.get(peer)
        if w is None or w.is_closing() or w.transport.get_write_buffer_size() > MAX_BUFFER:
            return
        try:
            w.write(link.control(payload))
        except RuntimeError:       # uvloop: the transport closed under us
            pass

    async def run(self, peer: int) -> None:
        """Keep the connection to ``peer`` open, for the node's whole life."""
        host, port = parse_address(self.addresses[peer])
        while True:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(RECONNECT_S)
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            writer.write(link.control_hello(self.id))
            self.out[peer] = writer
            try:
                await reader.read()        # the peer never sends on this connection
            except OSError:
                pass
            if self.out.get(peer) is writer:
                del self.out[peer]
            writer.transport.abort()
            await asyncio.sleep(RECONNECT_S)

    def close(self) -> None:
        for w in self.out.values():
            w.transport.abort()
        self.out.clear()
