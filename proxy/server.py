"""The asyncio shell around ``proxy.session.Session``: sockets, TLS, timers.

What this module owns: the listening socket, one ``ClientConnection`` per
client and its ``BackendConnection`` to the local PostgreSQL server, the
cancel-key registry, and graceful shutdown. All protocol decisions are the
session core's; this file moves bytes and carries out effects.

Rules kept here:
- One backend connection per client session, opened after the client's
  StartupMessage arrives.
- Backpressure: each transport has a write-buffer bound
  (``[limits] write_buffer_high_bytes``). When the buffer towards one side
  is above it, the proxy stops reading from the other side until it drains
  below ``write_buffer_low_bytes``. So a slow client or backend never makes
  the proxy buffer without bound; the cost is that the fast side waits.
- The hot path (``data_received``) does one core call and at most one write.
"""
from __future__ import annotations

import asyncio
import os
import resource
import secrets
import socket
import ssl
import time
from typing import Callable

from config import NodeConfig

from common import log as mlog
from . import wire
from .session import (CancelQuery, Close, ConnectBackend, Phase, RegisterCancelKey, RunCommit,
                      RunRelease, SendClient, SendServer, Session, StartTLS)

TOO_MANY_CONNECTIONS = "53300"
# After this a wound's cancel signal has landed or was dropped (a backend
# that is idle by then ignores it).
WOUND_CANCEL_SETTLE_S = 0.2


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one: every session holds
    two sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class ProxyServer:
    """Accepts clients on ``[node] listen`` and relays them to PostgreSQL."""

    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.log = mlog.get().bind(node_id=cfg.node.id)
        self.sessions: set[ClientConnection] = set()
        # (backend pid, proxy secret) -> backend secret
        self.cancel_keys: dict[tuple[int, int], int] = {}
        self.by_backend_pid: dict[int, ClientConnection] = {}
        self.ssl_context: ssl.SSLContext | None = None
        if cfg.tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(cfg.tls.cert_file, cfg.tls.key_file)
            self.ssl_context = ctx
        self._server: asyncio.AbstractServer | None = None
        self._closed = asyncio.Event()
        self.node = None                # ReplicationNode once the cluster is initialized
        self._activation: asyncio.Task | None = None
        # With peers configured, sessions are held until we know whether the
        # local node is initialized for the cluster (then: until replication
        # is started and ready) or not (standalone until it is).
        self.standalone = not (cfg.peers and cfg.node.internode_listen)
        self.next_session_id = 1
        self.port: int | None = None

    async def start(self) -> None:
        from config import parse_address
        host, port = parse_address(self.cfg.node.listen)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self), host, port, reuse_address=True, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        self.log.info("listening", address=host, port=self.port,
                      postgres=self.cfg.postgres.where(), tls=self.ssl_context is not None)
        if self.cfg.peers and self.cfg.node.internode_listen:
            self._activation = asyncio.ensure_future(self._activate_cluster())

    async def _activate_cluster(self) -> None:
        """Once ``mmproxy init-cluster`` has set the local node up, start
        replication and route every commit through the cluster protocol."""
        import psycopg

        from replication.cluster import is_initialized
        from replication.node import ReplicationNode
        pg = self.cfg.postgres
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        pg.conninfo(), password=pg.password(), autocommit=True,
                        application_name="mmproxy check") as conn:
                    if await is_initialized(conn):
                        break
                if not self.standalone:
                    self.log.info("standalone_mode",
                                  reason="the local node is not initialized for the cluster "
                                         "(mmproxy init-cluster); commits stay local")
                self.standalone = True
            except psycopg.Error as e:
                self.log.debug("cluster_check_failed", error=str(e))
            await asyncio.sleep(1)
        self.standalone = False
        node = ReplicationNode(self.cfg, wound_backend=self.wound_backend)
        while True:
            try:
                await node.start()
                break
            except (psycopg.Error, OSError, RuntimeError) as e:
                self.log.warning("replication_start_failed", error=str(e).strip())
                await asyncio.sleep(1)
        self.node = node
        for conn in self.sessions:
            conn.core.set_cluster(True, node.next_gid, node.token, node.gate)
        self.log.info("cluster_mode_on", sessions=len(self.sessions))

    def is_ready(self) -> bool:
        if self.node is not None:
            return self.node.ready.is_set()
        return self.standalone

    async def wait_ready(self) -> bool:
        """Hold a new session until the node can serve it (at most
        ``[timeouts] client_ready_wait_ms``)."""
        if self.is_ready():
            return True
        deadline = time.monotonic() + self.cfg.timeouts.client_ready_wait_ms / 1000
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            if self.is_ready():
                return True
        return False

    async def open_backend(self, factory: Callable[[], asyncio.Protocol]):
        pg = self.cfg.postgres
        loop = asyncio.get_running_loop()
        timeout = pg.connect_timeout_ms / 1000
        if pg.is_unix_socket:
            coro = loop.create_unix_connection(factory, pg.socket_path)
        else:
            coro = loop.create_connection(factory, pg.host, pg.port)
        async with asyncio.timeout(timeout):     # (not wait_for: see replication/stream.py)
            return await coro

    async def send_cancel(self, pid: int, secret: int) -> None:
        backend_secret = self.cancel_keys.get((pid, secret))
        if backend_secret is None:
            self.log.info("cancel_request_ignored", backend_pid=pid,
                          reason="no session holds this key")
            return
        try:
            transport, _ = await self.open_backend(asyncio.Protocol)
        except (OSError, asyncio.TimeoutError) as e:
            self.log.error("cancel_request_failed", backend_pid=pid, error=str(e))
            return
        transport.write(wire.CancelRequest(pid, backend_secret).encode())
        transport.close()
        self.log.info("cancel_request_forwarded", backend_pid=pid)

    async def _wound_cancel(self, conn, cancel) -> None:
        seq = conn.core.wound_seq
        try:
            await cancel(conn.core.backend_pid)
        finally:
            asyncio.get_running_loop().call_later(WOUND_CANCEL_SETTLE_S,
                                                  conn.core.wound_cancel_settled, seq)

    def wound_backend(self, pid: int, message: str, cancel) -> bool:
        """Wound-wait (called by the replication node): end the transaction
        of the client session whose backend is ``pid`` with 40001. If a
        statement of it is running, ``cancel(pid)`` (a coroutine function)
        interrupts it; if it sits idle in its transaction, the transaction
        is failed on the backend at once. True if the session is (now)
        wounded."""
        conn = self.by_backend_pid.get(pid)
        if conn is None or conn.closed:
            return False
        if conn.core.wound(message):
            asyncio.ensure_future(self._wound_cancel(conn, cancel))
        if conn.core.effects:
            conn.run_effects()
        return conn.core.is_wounded

    async def shutdown(self, grace_ms: int | None = None) -> None:
        """Stop accepting; end idle sessions at once and busy ones at their
        next idle point; after the grace period end the rest with 57P01."""
        grace_ms = self.cfg.timeouts.shutdown_grace_ms if grace_ms is None else grace_ms
        if self._server is not None:
            self._server.close()
        if self._activation is not None:
            self._activation.cancel()
        self.log.info("shutdown_started", sessions=len(self.sessions), grace_ms=grace_ms)
        for conn in list(self.sessions):
            conn.core.request_shutdown()
            conn.run_effects()
        deadline = time.monotonic() + grace_ms / 1000
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.sessions:
            self.log.warning("shutdown_grace_expired", sessions=len(self.sessions))
        for conn in list(self.sessions):
            conn.core.terminate_now()
            conn.run_effects()
        # Let transports flush their last bytes (the 57P01 messages).
        for _ in range(40):
            if not self.sessions:
                break
            await asyncio.sleep(0.025)
        if self.node is not None:
            await self.node.stop()
        self._closed.set()
        self.log.info("shutdown_complete")

    async def wait_closed(self) -> None:
        await self._closed.wait()


class ClientConnection(asyncio.Protocol):
    """The client side of one session; owns the session core."""

    __slots__ = ("server", "core", "transport", "backend", "sid", "peer", "opened",
                 "bytes_from_client", "bytes_to_client", "closed", "_paused_backend",
                 "cancel_key", "log", "startup_timer", "backend_write")

    def __init__(self, server: ProxyServer):
        self.server = server
        self.core = Session(tls_available=server.ssl_context is not None,
                            proxy_secret=secrets.randbits(31))
        if server.node is not None:
            self.core.set_cluster(True, server.node.next_gid, server.node.token,
                                  server.node.gate)
        self.transport: asyncio.Transport | None = None
        self.backend: BackendConnection | None = None
        self.sid = server.next_session_id
        server.next_session_id += 1
        self.peer = None
        self.opened = time.monotonic()
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self.closed = False
        self.cancel_key: tuple[int, int] | None = None
        self.log = server.log
        self.startup_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        limits = self.server.cfg.limits
        transport.set_write_buffer_limits(limits.write_buffer_high_bytes,
                                          limits.write_buffer_low_bytes)
        if len(self.server.sessions) >= limits.max_client_connections:
            transport.write(wire.error_response(
                TOO_MANY_CONNECTIONS, "sorry, too many clients already", severity="FATAL",
                hint="Raise [limits] max_client_connections in the mmproxy configuration."))
            self.log.warning("connection_refused", peer=self.peer, reason="too many clients")
            self.closed = True
            transport.close()
            return
        self.server.sessions.add(self)
        self.log.info("connection_opened", session=self.sid, peer=self.peer)
        self.startup_timer = asyncio.get_running_loop().call_later(
            self.server.cfg.timeouts.client_startup_timeout_ms / 1000, self._startup_timeout)

    def _startup_timeout(self) -> None:
        self.core.startup_timed_out()
        self.run_effects()

    def data_received(self, data: bytes) -> None:
        # Hot path: one core call, at most one write.
        self.bytes_from_client += len(data)
        core = self.core
        out = core.client_bytes(data)
        if out:
            self.backend_write(out)
        if core.effects:
            self.run_effects()

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        if not self.closed:
            self.core.client_closed()
            self.run_effects()

    def pause_writing(self) -> None:
        # The client is slow: stop reading from the backend.
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.backend is not None and self.backend.transport is not None \
                and not self.backend.closed:
            self.backend.transport.resume_reading()

    # -- effects -------------------------------------------------------------

    def run_effects(self) -> None:
        effects = self.core.effects
        while effects:
            eff = effects.pop(0)
            cls = eff.__class__
            if cls is SendClient:
                if not self.closed:
                    self.bytes_to_client += len(eff.data)
                    self.transport.write(eff.data)
            elif cls is SendServer:
                if self.backend is not None and self.backend.transport is not None:
                    self.backend.transport.write(eff.data)
            elif cls is Close:
                self._close(eff)
            elif cls is ConnectBackend:
                asyncio.ensure_future(self._connect_backend(eff.startup))
            elif cls is RegisterCancelKey:
                if self.startup_timer is not None:
                    self.startup_timer.cancel()
                self.cancel_key = (eff.pid, eff.proxy_secret)
                self.server.cancel_keys[self.cancel_key] = eff.backend_secret
                self.server.by_backend_pid[eff.pid] = self
            elif cls is CancelQuery:
                asyncio.ensure_future(self.server.send_cancel(eff.pid, eff.secret))
            elif cls is StartTLS:
                asyncio.ensure_future(self._start_tls())
            elif cls is RunCommit:
                asyncio.ensure_future(self._run_commit(eff.gid, eff.hold))
            elif cls is RunRelease:
                asyncio.ensure_future(self._run_release(eff.gid, eff.commit))
            else:  # pragma: no cover - a new effect without a handler
                raise AssertionError(f"unhandled effect {eff!r}")

    async def _run_release(self, gid: str, commit: bool) -> None:
        reply = await self.server.node.release(gid, commit)
        self.log.info("prepared_transaction_finished" if reply.committed == commit
                      else "prepared_transaction_finish_failed", session=self.sid, gid=gid,
                      commit=commit, sqlstate=reply.sqlstate, message=reply.message)
        self.core.commit_outcome(reply.committed, reply.sqlstate, reply.message)
        self.run_effects()

    async def _run_commit(self, gid: str, hold: bool = False) -> None:
        reply = await self.server.node.commit(gid, hold)
        if reply.committed:
            self.log.debug("commit", session=self.sid, gid=gid)
        else:
            self.log.info("commit_aborted", session=self.sid, gid=gid, sqlstate=reply.sqlstate,
                          message=reply.message)
        self.core.commit_outcome(reply.committed, reply.sqlstate, reply.message, reply.warning)
        self.run_effects()

    async def _start_tls(self) -> None:
        self.transport.write(b"S")
        loop = asyncio.get_running_loop()
        try:
            self.transport = await loop.start_tls(
                self.transport, self, self.server.ssl_context, server_side=True,
                ssl_handshake_timeout=self.server.cfg.postgres.connect_timeout_ms / 1000)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as e:
            self.log.warning("tls_handshake_failed", session=self.sid, peer=self.peer, error=str(e))
            self.core.client_closed()
            self.run_effects()

    async def _connect_backend(self, startup: wire.StartupMessage) -> None:
        self.transport.pause_reading()
        if not await self.server.wait_ready():
            self.log.warning("connection_refused", session=self.sid, peer=self.peer,
                             reason="node not ready")
            self.core.not_ready(
                "the mmproxy node is not ready: its replication is starting or its local "
                "PostgreSQL server is being recovered",
                "Retry in a moment; other nodes of the cluster can serve meanwhile.")
            self.run_effects()
            return
        if self.closed:
            return
        if self.server.node is not None and not self.core.cluster:
            self.core.set_cluster(True, self.server.node.next_gid, self.server.node.token,
                                  self.server.node.gate)
        backend = BackendConnection(self)
        try:
            await self.server.open_backend(lambda: backend)
        except (OSError, asyncio.TimeoutError) as e:
            err = "timed out" if isinstance(e, asyncio.TimeoutError) else (e.strerror or str(e))
            self.log.error("backend_connect_failed", session=self.sid,
                           postgres=self.server.cfg.postgres.where(), error=err)
            self.core.backend_connect_failed(self.server.cfg.postgres.where(), err)
            self.run_effects()
            return
        if self.closed:
            backend.transport.close()
            return
        self.backend = backend
        self.backend_write = backend.transport.write
        first = self.core.backend_connected()
        if first:
            backend.transport.write(first)
        if self.core.effects:
            self.run_effects()
        if not self.closed:
            self.transport.resume_reading()

    def _close(self, eff: Close) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.sessions.discard(self)
        if self.startup_timer is not None:
            self.startup_timer.cancel()
        if self.cancel_key is not None:
            self.server.cancel_keys.pop(self.cancel_key, None)
            self.server.by_backend_pid.pop(self.cancel_key[0], None)
        if self.transport is not None:
            self.transport.close()
        if self.backend is not None:
            self.backend.closed = True
            if self.backend.transport is not None:
                self.backend.transport.close()
        startup = self.core.startup
        fields = dict(session=self.sid, peer=self.peer,
                      duration_ms=round((time.monotonic() - self.opened) * 1000, 1),
                      bytes_from_client=self.bytes_from_client,
                      bytes_to_client=self.bytes_to_client, reason=eff.reason)
        if startup is not None:
            fields.update(user=startup.get("user"), database=startup.get("database"))
        if eff.sqlstate and eff.sqlstate not in ("57P01",):
            self.log.warning("connection_closed", sqlstate=eff.sqlstate, **fields)
        else:
            self.log.info("connection_closed", **fields)


class BackendConnection(asyncio.Protocol):
    """The PostgreSQL side of one session."""

    __slots__ = ("client", "core", "transport", "closed", "client_write")

    def __init__(self, client: ClientConnection):
        self.client = client
        self.core = client.core
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.client_write = self.client.transport.write
        limits = self.client.server.cfg.limits
        transport.set_write_buffer_limits(limits.write_buffer_high_bytes,
                                          limits.write_buffer_low_bytes)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        # Hot path: one core call, at most one write.
        core = self.core
        out = core.server_bytes(data)
        if out:
            self.client.bytes_to_client += len(out)
            self.client_write(out)
        if core.effects:
            self.client.run_effects()

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        if not self.closed:
            self.closed = True
            self.core.server_closed()
            self.client.run_effects()

    def pause_writing(self) -> None:
        # PostgreSQL is slow to read (e.g. a big COPY): stop reading the client.
        if not self.client.closed:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.client.closed:
            self.client.transport.resume_reading()


async def serve(cfg: NodeConfig, stop: asyncio.Event | None = None) -> None:
    """Run one node's proxy until ``stop`` is set (or SIGTERM/SIGINT)."""
    import signal
    raise_fd_limit()
    server = ProxyServer(cfg)
    await server.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    from common import failpoints
    failpoints.install_signal_handler(loop)
    loop.add_signal_handler(signal.SIGUSR1, _dump_state, server)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.shutdown()


def _dump_state(server: ProxyServer) -> None:
    """SIGUSR1: one log event per asyncio task with where it waits, and one
    per client session in cluster mode with what it waits for (for a DBA
    looking at a proxy, or a session, that seems stuck)."""
    import io
    for task in asyncio.all_tasks():
        buf = io.StringIO()
        task.print_stack(limit=12, file=buf)
        # a task's stack shows its outer coroutine only: follow what each
        # coroutine awaits, down to where it really waits
        chain, coro = [], task.get_coro()
        while coro is not None and len(chain) < 30:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None:
                chain.append(f"{frame.f_code.co_filename}:{frame.f_lineno} "
                             f"{frame.f_code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        server.log.warning("task_stack", task=task.get_name(), stack=buf.getvalue(),
                           awaiting=chain)
    for conn in list(server.sessions):
        cp = conn.core.cp
        if cp is not None:
            server.log.warning("session_state", session=conn.sid, **cp.describe())


def run(cfg: NodeConfig) -> None:
    import uvloop
    mlog.configure(cfg.log.level, open(cfg.log.file, "a", buffering=1) if cfg.log.file else None,
                   node_id=cfg.node.id, pid=os.getpid())
    uvloop.run(serve(cfg))


__all__ = ["ProxyServer", "serve", "run", "Phase"]
