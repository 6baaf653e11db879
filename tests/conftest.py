"""Shared fixtures: real PostgreSQL 15 servers and mmproxy processes.

Every integration test talks to a PostgreSQL server started here (never a
mock) through an ``mmproxy --config`` process started here, exactly as a
user runs it. Servers run as the ``postgres`` user when the suite runs as
root.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from proxy.demo import wait_port
from proxy.pgserver import LocalPostgres, free_port

ROOT = Path(__file__).resolve().parent.parent

PASSWORD = "s3cret-pw"
HBA = [
    "local all all trust",
    "host all md5_user 127.0.0.1/32 md5",
    "host all scram_user 127.0.0.1/32 scram-sha-256",
    "host all all 127.0.0.1/32 trust",
]


def _workdir() -> Path:
    base = Path(tempfile.mkdtemp(prefix="mmproxy-test-"))
    os.chmod(base, 0o755)
    return base


@pytest.fixture(scope="session")
def workdir():
    d = _workdir()
    yield d
    if not os.environ.get("MMPROXY_KEEP_WORKDIR"):     # kept for debugging a failure
        subprocess.run(["rm", "-rf", str(d)], check=False)


@pytest.fixture(scope="session")
def pg(workdir):
    """One PostgreSQL 15 server for the suite, with a SCRAM and an md5 user."""
    server = LocalPostgres(workdir / "pg", hba=HBA, fsync=False,
                           settings={"max_connections": "1100"}).init().start()
    server.psql(f"SET password_encryption = 'scram-sha-256'; "
                f"CREATE ROLE scram_user LOGIN PASSWORD '{PASSWORD}';"
                f"SET password_encryption = 'md5'; "
                f"CREATE ROLE md5_user LOGIN PASSWORD '{PASSWORD}';"
                "GRANT ALL ON SCHEMA public TO PUBLIC;")
    yield server
    server.stop("immediate")


class ProxyProcess:
    """An ``mmproxy --config`` child process."""

    def __init__(self, workdir: Path, pg: LocalPostgres, extra: str = "", *,
                 pg_host: str | None = None, pg_port: int | None = None,
                 grace_ms: int = 5000, startup_timeout_ms: int = 60000,
                 node_id: int = 1, port: int | None = None, internode: str = "",
                 timeouts: str = ""):
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="proxy-", dir=workdir))
        self.log_file = self.dir / "proxy.log"
        self.config = self.dir / "node.toml"
        self.config.write_text(f"""
[node]
id = {node_id}
listen = "127.0.0.1:{self.port}"
{internode}

[postgres]
host = "{pg_host or '127.0.0.1'}"
port = {pg_port or pg.port}
connect_timeout_ms = 2000

[timeouts]
shutdown_grace_ms = {grace_ms}
client_startup_timeout_ms = {startup_timeout_ms}
{timeouts}

[log]
level = "{os.environ.get('MMPROXY_TEST_LOG_LEVEL', 'info')}"
file = "{self.log_file}"
{extra}
""")
        self.start()

    def start(self) -> None:
        """(Re)start the process with the same configuration."""
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "--config",
                                      str(self.config)], cwd=ROOT,
                                     stderr=open(self.dir / "stderr", "a"))
        wait_port(self.port, 20, self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def dsn(self, user: str = "postgres", dbname: str = "postgres", **kw) -> str:
        extra = " ".join(f"{k}={v}" for k, v in kw.items())
        return f"host=127.0.0.1 port={self.port} user={user} dbname={dbname} {extra}".strip()

    def events(self) -> list[dict]:
        try:
            return [json.loads(line) for line in self.log_file.read_text().splitlines() if line]
        except FileNotFoundError:
            return []

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def proxy(workdir, pg):
    """A proxy in front of the suite's server, shared by read-mostly tests."""
    p = ProxyProcess(workdir, pg)
    yield p
    p.stop()


@pytest.fixture
def make_proxy(workdir, pg):
    """Start extra proxies with their own settings; stopped after the test."""
    started: list[ProxyProcess] = []

    def make(extra: str = "", **kw) -> ProxyProcess:
        p = ProxyProcess(workdir, pg, extra, **kw)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


_db_counter = iter(range(1, 1_000_000))


@pytest.fixture
def fresh_dbs(pg):
    """Two new empty databases: one used directly, one through the proxy, so
    the same script can run on both and the outputs be compared."""
    n = next(_db_counter)
    names = (f"direct_{os.getpid()}_{n}", f"proxied_{os.getpid()}_{n}")
    for name in names:
        pg.psql(f"CREATE DATABASE {name}")
    yield names
    for name in names:
        pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class Cluster:
    """N PostgreSQL servers, each initialized for the cluster and fronted by
    its own mmproxy process, all on loopback."""

    def __init__(self, workdir: Path, n: int = 3, name: str = "cluster", fsync: bool = False,
                 timeouts: str = ""):
        import asyncio

        from config import load_config
        from replication.cluster import init_local_node
        self.n = n
        self.pgs = [LocalPostgres(workdir / f"{name}{i}", fsync=fsync).init().start()
                    for i in range(1, n + 1)]
        ports = [free_port() for _ in range(n)]
        links = [free_port() for _ in range(n)]
        self.proxies: list[ProxyProcess] = []
        for i in range(1, n + 1):
            peers = "".join(
                f"\n[[peers]]\nid = {j}\nclient_address = \"127.0.0.1:{ports[j - 1]}\"\n"
                f"node_address = \"127.0.0.1:{links[j - 1]}\"\n"
                for j in range(1, n + 1) if j != i)
            internode = f'internode_listen = "127.0.0.1:{links[i - 1]}"'
            pg = self.pgs[i - 1]
            cfg_text = f"""[node]\nid = {i}\nlisten = "127.0.0.1:{ports[i - 1]}"\n{internode}
[postgres]\nhost = "{pg.sockdir}"\nport = {pg.port}\n{peers}"""
            cfg_file = pg.base / "init.toml"
            cfg_file.write_text(cfg_text)
            problems = asyncio.run(init_local_node(load_config(cfg_file)))
            assert not problems, problems
            # Over the server's unix socket, as the demo and deploy/ do.
            self.proxies.append(ProxyProcess(workdir, pg, peers, node_id=i, port=ports[i - 1],
                                             internode=internode, timeouts=timeouts,
                                             pg_host=str(pg.sockdir)))
        for p in self.proxies:
            wait_for(lambda p=p: any(e["event"] == "cluster_mode_on" for e in p.events()),
                     timeout=30, what="cluster mode")
        for i in range(1, n + 1):
            wait_for(lambda i=i: self.pings(i), timeout=30, what=f"mtm.ping() on node {i}")

    def pings(self, i: int) -> bool:
        import psycopg
        try:
            with psycopg.connect(self.dsn(i), autocommit=True) as conn:
                return conn.execute("SELECT mtm.ping()").fetchone() == (True,)
        except psycopg.Error:
            return False

    def dsn(self, i: int, **kw) -> str:
        return self.proxies[i - 1].dsn(**kw)

    def direct(self, i: int) -> LocalPostgres:
        return self.pgs[i - 1]

    def stop(self) -> None:
        for p in self.proxies:
            p.stop()
        for pg in self.pgs:
            pg.stop("immediate")


def wait_for(cond, timeout: float = 10, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
