"""A cluster under test: real PostgreSQL 15 servers and real mmproxy
processes, each controllable on its own, with its links through a relay.

Built only through the documented interface: one TOML file per node,
``mmproxy init-cluster --config nodeN.toml`` once, ``mmproxy --config
nodeN.toml`` per proxy. The peers' ``node_address`` in each node's file is
a port of the fault relay (``harness.relay``), one edge per direction
(``link:i>j`` carries what node i sends to node j), so links can be cut,
stalled or delayed edge by edge. With ``relay_clients`` the clients'
connections go through ``client:i`` edges too (partition tests).

Rules: every process it starts it stops (by pid, never by name); every
wait has a deadline; the data directory lives under ``base`` and is
removed by ``destroy``. PostgreSQL refuses to run as root: servers run as
the ``postgres`` user then (proxy.pgserver).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from proxy.demo import wait_port
from proxy.pgserver import LocalPostgres, free_port, process_running

from .relay import Relay

ROOT = Path(__file__).resolve().parent.parent


def _wait(cond, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class NodeUnderTest:
    def __init__(self, cluster: "ClusterUnderTest", i: int):
        self.cluster = cluster
        self.id = i
        self.dir = cluster.base / f"node{i}"
        self.pg = LocalPostgres(self.dir, fsync=cluster.fsync, settings=cluster.pg_settings)
        self.proxy_port = free_port()
        self.internode_port = free_port()
        self.client_port = self.proxy_port
        self.config = cluster.base / f"node{i}.toml"
        self.log_file = cluster.base / f"node{i}.proxy.log"
        self.failpoints_file = cluster.base / f"node{i}.failpoints"
        self.proc: subprocess.Popen | None = None
        self.paused: list[int] = []

    # -- the proxy ----------------------------------------------------------------

    def start_proxy(self, wait: bool = True) -> None:
        assert self.proc is None or self.proc.poll() is not None, "proxy already running"
        env = dict(os.environ, MMPROXY_FAILPOINTS_FILE=str(self.failpoints_file))
        env.pop("MMPROXY_FAILPOINTS", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "--config", str(self.config)], cwd=ROOT,
            env=env, stdout=subprocess.DEVNULL,
            stderr=open(self.cluster.base / f"node{self.id}.proxy.stderr", "a"))
        if wait:
            wait_port(self.proxy_port, 30, self.proc)

    def proxy_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill_proxy(self, sig: int = signal.SIGKILL) -> None:
        if self.proxy_alive():
            if sig == signal.SIGKILL and self.proc.pid in self.paused:
                self.paused.remove(self.proc.pid)
            self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
                try:
                    self.proc.wait(10 if sig != signal.SIGKILL else 30)
                except subprocess.TimeoutExpired:
                    # a graceful stop that hangs is a bug: log every task's
                    # stack (SIGUSR1) before the kill, for the post-mortem
                    self.proc.send_signal(signal.SIGUSR1)
                    time.sleep(0.5)
                    self.proc.kill()
                    self.proc.wait()

    def pause_proxy(self) -> None:
        if self.proxy_alive():
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.paused.append(self.proc.pid)

    def resume_proxy(self) -> None:
        for pid in list(self.paused):
            if self.proc is not None and pid == self.proc.pid:
                os.kill(pid, signal.SIGCONT)
                self.paused.remove(pid)

    def arm(self, spec: str) -> None:
        """Arm failpoints in the running proxy (common/failpoints.py)."""
        self.failpoints_file.write_text(spec)
        if self.proxy_alive():
            os.kill(self.proc.pid, signal.SIGUSR2)

    def disarm(self) -> None:
        self.arm("")

    def events(self) -> list[dict]:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    # -- its PostgreSQL ------------------------------------------------------------

    def pg_processes(self) -> list[int]:
        pm = self.pg.pid()
        if pm is None:
            return []
        pids = [pm]
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    stat = (d / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == pm:
                    pids.append(int(d.name))
        return pids

    def crash_pg(self) -> None:
        """An immediate stop: every backend killed, no checkpoint (as a crash)."""
        self.resume_pg()
        self.pg.stop("immediate")

    def kill_pg(self) -> None:
        """SIGKILL the postmaster and every child (a machine losing the node)."""
        self.resume_pg()
        for pid in self.pg_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait(lambda: self.pg.pid() is None, 30, f"node {self.id}'s PostgreSQL to die")
        # a killed postmaster leaves its pid file: pg_ctl start handles it
        _wait(lambda: not any(process_running(p) for p in self.pg_processes()), 30,
              "its children to exit")

    def start_pg(self) -> None:
        if self.pg.pid() is None:
            # A killed postmaster's pid and socket lock files name a process
            # that is gone or a zombie not reaped yet (PID 1 here reaps
            # late): PostgreSQL cannot tell a zombie from a live postmaster
            # and refuses to start, so the stale files go.
            (self.pg.datadir / "postmaster.pid").unlink(missing_ok=True)
            for lock in Path(self.pg.sockdir).glob(".s.PGSQL.*.lock"):   # (the same)
                lock.unlink(missing_ok=True)
            self.pg.start()

    def pause_pg(self) -> None:
        for pid in self.pg_processes():
            os.kill(pid, signal.SIGSTOP)
            self.paused.append(pid)

    def resume_pg(self) -> None:
        for pid in list(self.paused):
            if self.proc is None or pid != self.proc.pid:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                self.paused.remove(pid)

    # -- connection strings ----------------------------------------------------------

    def dsn(self, **kw) -> str:
        extra = " ".join(f"{k}={v}" for k, v in kw.items())
        return (f"host=127.0.0.1 port={self.client_port} user=postgres "
                f"dbname={self.cluster.database} connect_timeout=3 {extra}").strip()

    def direct_dsn(self) -> str:
        return self.pg.dsn(dbname=self.cluster.database)


class ClusterUnderTest:
    def __init__(self, base: str | os.PathLike, n: int = 3, *, timeouts: dict | None = None,
                 relay_links: bool = True, relay_clients: bool = False, fsync: bool = False,
                 log_level: str = "info", pg_settings: dict | None = None,
                 database: str = "postgres", before_init=None, limits: dict | None = None):
        """``database``: the one the proxies replicate (``[postgres]
        database``); ``before_init(node)`` runs once each server is up,
        before ``mmproxy init-cluster`` (e.g. to create that database)."""
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        self.n = n
        self.timeouts = dict(timeouts or {})
        self.limits = dict(limits or {})
        self.fsync = fsync
        self.log_level = log_level
        self.pg_settings = {"max_connections": "300", **(pg_settings or {})}
        self.relay = Relay() if (relay_links or relay_clients) else None
        self.relay_links = relay_links
        self.relay_clients = relay_clients
        self.database = database
        self.before_init = before_init
        self.nodes = {i: NodeUnderTest(self, i) for i in range(1, n + 1)}

    def node(self, i: int) -> NodeUnderTest:
        return self.nodes[i]

    @property
    def ids(self) -> list[int]:
        return sorted(self.nodes)

    # -- building it ---------------------------------------------------------------

    def _node_address(self, i: int, j: int) -> str:
        """Where node i reaches node j."""
        if self.relay_links:
            return f"127.0.0.1:{self.relay.add(f'link:{i}>{j}', self.nodes[j].internode_port)}"
        return f"127.0.0.1:{self.nodes[j].internode_port}"

    def write_config(self, i: int) -> None:
        node = self.nodes[i]
        peers = "".join(
            f"\n[[peers]]\nid = {j}\nclient_address = \"127.0.0.1:{self.nodes[j].proxy_port}\"\n"
            f"node_address = \"{self._node_address(i, j)}\"\n"
            for j in self.ids if j != i)
        timeouts = "".join(f"{k} = {v}\n" for k, v in self.timeouts.items())
        limits = "".join(f"{k} = {v}\n" for k, v in self.limits.items())
        node.config.write_text(f"""# node {i} of a cluster under test (harness/cluster.py)
[node]
id = {i}
listen = "127.0.0.1:{node.proxy_port}"
internode_listen = "127.0.0.1:{node.internode_port}"

[postgres]
host = "{node.pg.sockdir}"
port = {node.pg.port}
database = "{self.database}"

[timeouts]
shutdown_grace_ms = 2000
{timeouts}
[limits]
{limits}
[log]
level = "{self.log_level}"
file = "{node.log_file}"
{peers}""")

    def start(self, wait: bool = True) -> "ClusterUnderTest":
        for node in self.nodes.values():
            node.pg.init().start()
            if self.before_init is not None:
                self.before_init(node)
        for i in self.ids:
            self.write_config(i)
            node = self.nodes[i]
            if self.relay_clients:
                node.client_port = self.relay.add(f"client:{i}", node.proxy_port)
            res = subprocess.run([sys.executable, "-m", "proxy.cli", "init-cluster", "--config",
                                  str(node.config)], cwd=ROOT, capture_output=True, text=True,
                                 timeout=120)
            if res.returncode != 0:
                raise RuntimeError(f"mmproxy init-cluster failed on node {i}: "
                                   f"{res.stderr}{res.stdout}")
        for node in self.nodes.values():
            node.start_proxy()
        if wait:
            for i in self.ids:
                self.wait_ping(i)
        return self

    # -- faults on links ---------------------------------------------------------

    def link_edges(self, a: int, b: int | None = None) -> list[str]:
        """Edges between a and b (both directions), or every edge of a."""
        others = [b] if b is not None else [j for j in self.ids if j != a]
        out = []
        for j in others:
            out += [f"link:{a}>{j}", f"link:{j}>{a}"]
        return out

    def isolate(self, i: int, mode: str = "stall", clients: bool = False) -> None:
        edges = self.link_edges(i)
        if clients and self.relay_clients:
            edges.append(f"client:{i}")
        (self.relay.stall if mode == "stall" else self.relay.reject)(*edges)

    def cut(self, a: int, b: int, mode: str = "stall") -> None:
        (self.relay.stall if mode == "stall" else self.relay.reject)(*self.link_edges(a, b))

    def cut_direction(self, a: int, b: int, mode: str = "stall") -> None:
        (self.relay.stall if mode == "stall" else self.relay.reject)(f"link:{a}>{b}")

    def heal(self) -> None:
        if self.relay is not None:
            self.relay.heal()

    # -- observing it ---------------------------------------------------------------

    def ping(self, i: int) -> bool:
        try:
            with psycopg.connect(self.nodes[i].dsn(), autocommit=True) as conn:
                return conn.execute("SELECT mtm.ping()").fetchone() == (True,)
        except psycopg.Error:
            return False

    def wait_ping(self, i: int, timeout: float = 60) -> None:
        _wait(lambda: self.ping(i), timeout, f"mtm.ping() on node {i}")

    def settled(self) -> bool:
        """Every node ONLINE, all in one generation (mtm.status())."""
        gens = set()
        for i in self.ids:
            try:
                st, num = self.direct(i, "SELECT status, gen_num FROM mtm.status()")[0]
            except psycopg.Error:
                return False
            if st != "online":
                return False
            gens.add(num)
        return len(gens) == 1

    def wait_settled(self, timeout: float = 60) -> None:
        _wait(self.settled, timeout, "every node ONLINE in one generation")

    def direct(self, i: int, q: str, params=()) -> list:
        with psycopg.connect(self.nodes[i].direct_dsn(), autocommit=True,
                             application_name="mmproxy-harness-check") as conn:
            cur = conn.execute(q, params)
            return cur.fetchall() if cur.description is not None else []

    def prepared(self, i: int) -> list[str]:
        return [r[0] for r in self.direct(i, "SELECT gid FROM pg_prepared_xacts "
                                             "WHERE database = current_database()")]

    # -- tearing it down ------------------------------------------------------------

    def stop(self) -> None:
        for node in self.nodes.values():
            node.resume_proxy()
            node.resume_pg()
            node.kill_proxy(signal.SIGKILL)
        for node in self.nodes.values():
            node.pg.stop("immediate")
        if self.relay is not None:
            self.relay.close()

    def destroy(self) -> None:
        self.stop()
        subprocess.run(["rm", "-rf", str(self.base)], check=False)
