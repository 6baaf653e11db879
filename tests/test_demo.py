"""`mmproxy demo` starts real servers and proxies, and stops them cleanly."""
from __future__ import annotations

import os
import random
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from proxy.demo import demo_ports, ports_in_use
from proxy.pgserver import process_running

ROOT = Path(__file__).resolve().parent.parent


def free_demo_base(nodes: int) -> int:
    """A base port whose derived ports are all free, below the kernel's
    ephemeral range (32768+) so outgoing connections cannot take them."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - 300, 10)
        if not ports_in_use(demo_ports(nodes, base)):
            return base
    raise RuntimeError("no free port block found")


def test_demo_refuses_busy_ports(workdir):
    base = free_demo_base(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", base + 1))
        s.listen()
        res = subprocess.run([sys.executable, "-m", "proxy.cli", "demo", "--nodes", "1",
                              "--dir", str(workdir / "busy"), "--port", str(base)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert f"port(s) {base + 1} already in use" in res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the servers to another user")
def test_demo_refuses_a_directory_postgres_cannot_reach(tmp_path):
    os.chmod(tmp_path, 0o700)
    res = subprocess.run([sys.executable, "-m", "proxy.cli", "demo", "--nodes", "1",
                          "--dir", str(tmp_path / "demo"), "--port", str(free_demo_base(1))],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert f"directory {tmp_path} is not accessible to the postgres user" in res.stderr


def test_demo_starts_serves_and_stops_cleanly(workdir):
    base = free_demo_base(2)
    d = workdir / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "demo", "--nodes", "2",
                             "--dir", str(d), "--port", str(base)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        out = "".join(lines)
        assert "cluster is up" in out, out
        for i in (1, 2):
            assert f"psql -h 127.0.0.1 -p {base + i} -U postgres postgres" in out
            with psycopg.connect(f"host=127.0.0.1 port={base + i} user=postgres "
                                 "dbname=postgres") as conn:
                assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
                assert conn.execute("SHOW max_prepared_transactions").fetchone() == ("300",)
                assert conn.execute("SHOW port").fetchone() == (str(base + 100 + i),)
        pids = [int((d / f"node{i}" / "data" / "postmaster.pid").read_text().split()[0])
                for i in (1, 2)]
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, rest
    assert "stopped." in rest
    for pid in pids:
        assert not process_running(pid), f"postgres {pid} still running after the demo stopped"
    assert not d.exists()
