"""A tiny blocking protocol client built on proxy.wire, for tests that must
send exactly the bytes they choose (bad input, slow reading)."""
from __future__ import annotations

import socket
import struct

from proxy import wire


class RawClient:
    def __init__(self, port: int, user: str = "postgres", database: str = "postgres",
                 timeout: float = 10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.user, self.database = user, database

    def startup(self) -> list:
        self.send(wire.StartupMessage((("user", self.user), ("database", self.database))).encode())
        return self.read_until(b"Z")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_message(self):
        """One backend message, or None at EOF."""
        while len(self.buf) < 5:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        t = self.buf[:1]
        n = struct.unpack("!I", self.buf[1:5])[0]
        while len(self.buf) < 1 + n:
            chunk = self.sock.recv(max(65536, 1 + n - len(self.buf)))
            if not chunk:
                return None
            self.buf += chunk
        body, self.buf = self.buf[5:1 + n], self.buf[1 + n:]
        return wire.decode(t, body, frontend=False)

    def read_until(self, type_byte: bytes) -> list:
        out = []
        while True:
            m = self.read_message()
            if m is None:
                return out
            out.append(m)
            if m.type == type_byte:
                return out

    def read_all(self) -> list:
        out = []
        while (m := self.read_message()) is not None:
            out.append(m)
        return out

    def close(self) -> None:
        self.sock.close()


def errors(msgs) -> list:
    return [m for m in msgs if isinstance(m, wire.ErrorResponse)]
