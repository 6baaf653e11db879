"""``mmproxy demo``: a local cluster on real PostgreSQL servers, one command.

Layout under the demo directory::

    nodeI/            PostgreSQL data, socket dir and log of node I
    nodeI.toml        the proxy configuration of node I
    nodeI.proxy.log   the proxy's JSON log

Each proxy runs as its own ``mmproxy --config nodeI.toml`` process, exactly
as in a real deployment. Ctrl-C or SIGTERM stops the proxies (SIGTERM, with
their grace period) and then the servers (fast shutdown).
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from config import load_config
from replication.cluster import init_local_node

from .pgserver import LocalPostgres, PgToolsMissing


def node_config(i: int, n: int, base_port: int, pg: LocalPostgres, log_file: Path) -> str:
    peers = "".join(
        f"\n[[peers]]\nid = {j}\nclient_address = \"127.0.0.1:{base_port + j}\"\n"
        f"node_address = \"127.0.0.1:{base_port + 200 + j}\"\n"
        for j in range(1, n + 1) if j != i)
    return f"""# mmproxy node {i} of a local demo cluster (see docs/configuration.md)
[node]
id = {i}
name = "node{i}"
listen = "127.0.0.1:{base_port + i}"
internode_listen = "127.0.0.1:{base_port + 200 + i}"

[postgres]
host = "{pg.sockdir}"
port = {pg.port}
user = "postgres"
database = "postgres"

[timeouts]
shutdown_grace_ms = 5000

[log]
level = "info"
file = "{log_file}"
{peers}"""


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


def wait_online(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Until the node behind the proxy on ``port`` serves: mtm.ping() is
    true there (it is ONLINE and every member agrees on the generation)."""
    import psycopg
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode}")
        try:
            with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres "
                                 "connect_timeout=2", autocommit=True) as conn:
                if conn.execute("SELECT mtm.ping()").fetchone() == (True,):
                    return
        except psycopg.Error:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the node on port {port} is not ONLINE after {timeout:g}s")


def demo_ports(nodes: int, base_port: int) -> list[int]:
    """Proxy i on base+i, its PostgreSQL on base+100+i, inter-node base+200+i."""
    return [base_port + off + i for off in (0, 100, 200) for i in range(1, nodes + 1)]


def ports_in_use(ports: list[int]) -> list[int]:
    busy = []
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


def run_demo(nodes: int, base_dir: str, base_port: int, keep: bool, log_level: str) -> int:
    if not 1 <= nodes <= 9:
        print("mmproxy demo: --nodes must be between 1 and 9", file=sys.stderr)
        return 2
    if not 1024 <= base_port <= 65535 - 210:
        print("mmproxy demo: --port must be between 1024 and 65325", file=sys.stderr)
        return 2
    busy = ports_in_use(demo_ports(nodes, base_port))
    if busy:
        print(f"mmproxy demo: port(s) {', '.join(map(str, busy))} already in use; "
              "stop what uses them or choose another --port", file=sys.stderr)
        return 1
    base = Path(base_dir).resolve()
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    os.chmod(base, 0o755)
    servers: list[LocalPostgres] = []
    proxies: list[subprocess.Popen] = []
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for i in range(1, nodes + 1):
            print(f"starting PostgreSQL for node{i} on port {base_port + 100 + i} ...", flush=True)
            pg = LocalPostgres(base / f"node{i}", port=base_port + 100 + i)
            servers.append(pg)
            pg.init().start()
        for i, pg in enumerate(servers, start=1):
            cfg = base / f"node{i}.toml"
            cfg.write_text(node_config(i, nodes, base_port, pg, base / f"node{i}.proxy.log")
                           .replace('level = "info"', f'level = "{log_level}"'))
            if nodes > 1:
                problems = asyncio.run(init_local_node(load_config(cfg)))
                if problems:
                    raise RuntimeError(f"node{i}: " + "; ".join(problems))
            proxies.append(subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "--config", str(cfg)],
                cwd=Path(__file__).resolve().parent.parent))
        for i, proc in enumerate(proxies, start=1):
            wait_port(base_port + i, 30, proc)
        if nodes > 1:
            print("waiting for every node to be ONLINE in one generation ...", flush=True)
            for i, proc in enumerate(proxies, start=1):
                wait_online(base_port + i, 60, proc)
        kind = "a replicated cluster: write on any node, read on all" if nodes > 1 \
            else "a single node"
        print(f"\nmmproxy demo cluster is up: {nodes} node(s) under {base}, {kind}\n")
        for i in range(1, nodes + 1):
            print(f"  node{i}: psql -h 127.0.0.1 -p {base_port + i} -U postgres postgres"
                  f"    (config {base}/node{i}.toml, log {base}/node{i}.proxy.log)")
        print("\nPress Ctrl-C (or send SIGTERM) to stop the cluster.", flush=True)
        while not stopping:
            for i, proc in enumerate(proxies, start=1):
                if proc.poll() is not None:
                    print(f"proxy of node{i} exited with status {proc.returncode}; stopping",
                          file=sys.stderr)
                    stopping = True
            time.sleep(0.2)
        return 0
    except PgToolsMissing as e:
        print(f"mmproxy demo: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, TimeoutError) as e:
        print(f"mmproxy demo: failed to start: {e}", file=sys.stderr)
        return 1
    finally:
        print("\nstopping the cluster ...", flush=True)
        for proc in proxies:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in proxies:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pg in servers:
            pg.stop("fast")
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
        print("stopped.", flush=True)
