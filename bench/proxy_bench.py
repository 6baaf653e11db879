"""Relay overhead: pgbench directly, through mmproxy and through pgbouncer.

One run starts a PostgreSQL 15 server, an mmproxy in front of it, a
pgbouncer in session mode (installed from Debian's packages if missing)
and ``bench/bare_relay.py`` - a uvloop byte pump that parses nothing, the
floor under any relay built on asyncio/uvloop - then runs pgbench against
the four side by side, interleaved round by round so that machine noise
hits them alike:

- select-only (-S), 8 clients, -M simple and -M prepared;
- the default TPC-B-like script, 8 clients;
- single-client select-only latency (p50 from pgbench's per-transaction log).

It prints TPS (median of the rounds), the ratios to direct, mmproxy's
ratio to the bare pump and to pgbouncer, and the p50 latency each adds
over direct.

    .venv/bin/python bench/proxy_bench.py [--duration 10] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.demo import wait_port  # noqa: E402
from proxy.pgserver import LocalPostgres, free_port, pg_bin_dir  # noqa: E402


def ensure_pgbouncer() -> str:
    path = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if os.path.exists(path):
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing pgbouncer from Debian's packages ...", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "pgbouncer"], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        subprocess.run(["systemctl", "stop", "pgbouncer"], capture_output=True)
        return shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    raise SystemExit("pgbouncer is not installed: apt-get install pgbouncer")


def start_pgbouncer(binary: str, base: Path, pg: LocalPostgres, port: int) -> subprocess.Popen:
    d = base / "pgbouncer"
    d.mkdir()
    (d / "users.txt").write_text('"postgres" ""\n')
    (d / "pgbouncer.ini").write_text(f"""[databases]
* = host={pg.sockdir} port={pg.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {d / 'users.txt'}
pool_mode = session
max_client_conn = 200
default_pool_size = 50
logfile = {d / 'pgbouncer.log'}
pidfile = {d / 'pgbouncer.pid'}
""")
    cmd = [binary, str(d / "pgbouncer.ini")]
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for p in [d, *d.iterdir()]:
            os.chown(p, pw.pw_uid, pw.pw_gid)
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, 20, proc)
    return proc


def start_mmproxy(base: Path, pg: LocalPostgres, port: int) -> subprocess.Popen:
    cfg = base / "mmproxy.toml"
    cfg.write_text(f"""[node]
id = 1
listen = "127.0.0.1:{port}"

[postgres]
host = "{pg.sockdir}"
port = {pg.port}

[log]
level = "warning"
file = "{base / 'mmproxy.log'}"
""")
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "--config", str(cfg)], cwd=ROOT)
    wait_port(port, 20, proc)
    return proc


def start_bare_relay(pg: LocalPostgres, port: int) -> subprocess.Popen:
    sock = str(Path(pg.sockdir) / f".s.PGSQL.{pg.port}")
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bare_relay.py"),
                             str(port), sock], cwd=ROOT)
    wait_port(port, 20, proc)
    return proc


def pgbench(port: int, args: list[str], duration: int, log_dir: Path | None = None) -> tuple[float, list[float]]:
    cmd = [os.path.join(pg_bin_dir(), "pgbench"), "-h", "127.0.0.1", "-p", str(port),
           "-U", "postgres", "-T", str(duration), "-n", *args, "bench"]
    if log_dir is not None:
        cmd[1:1] = ["-l", "--log-prefix", str(log_dir / "tx")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=log_dir or None,
                         timeout=duration * 5 + 60)
    if res.returncode != 0:
        raise RuntimeError(f"pgbench failed on port {port}: {res.stderr}")
    m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", res.stdout)
    tps = float(m.group(1))
    lat = []
    if log_dir is not None:
        for f in log_dir.glob("tx*"):
            for line in f.read_text().splitlines():
                lat.append(int(line.split()[2]) / 1000.0)  # microseconds -> ms
            f.unlink()
    return tps, lat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per pgbench run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per test")
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()

    bouncer_bin = ensure_pgbouncer()
    base = Path(tempfile.mkdtemp(prefix="mmproxy-bench-"))
    os.chmod(base, 0o755)
    pg = LocalPostgres(base / "pg", settings={"max_connections": "100"}).init().start()
    procs = []
    try:
        pg.psql("CREATE DATABASE bench")
        subprocess.run([os.path.join(pg_bin_dir(), "pgbench"), "-i", "-q", "-s", str(args.scale),
                        "-h", str(pg.sockdir), "-p", str(pg.port), "-U", "postgres", "bench"],
                       check=True, capture_output=True)
        ports = {"direct": pg.port}
        ports["mmproxy"] = free_port()
        procs.append(start_mmproxy(base, pg, ports["mmproxy"]))
        ports["bare"] = free_port()
        procs.append(start_bare_relay(pg, ports["bare"]))
        ports["pgbouncer"] = free_port()
        procs.append(start_pgbouncer(bouncer_bin, base, pg, ports["pgbouncer"]))
        targets = list(ports)
        c = str(args.clients)
        tests = {
            f"select-only -M simple, {c} clients": ["-S", "-M", "simple", "-c", c, "-j", "2"],
            f"select-only -M prepared, {c} clients": ["-S", "-M", "prepared", "-c", c, "-j", "2"],
            f"TPC-B-like, {c} clients": ["-M", "prepared", "-c", c, "-j", "2"],
        }
        print(f"machine: {os.cpu_count()} cores, {os.uname().machine}, "
              f"{os.uname().sysname} {os.uname().release}; scale {args.scale}, "
              f"{args.duration}s x {args.rounds} interleaved rounds per cell", flush=True)
        results: dict[str, dict[str, list[float]]] = {t: {k: [] for k in targets} for t in tests}
        for r in range(args.rounds):
            for name, a in tests.items():
                k = r % len(targets)
                order = targets[k:] + targets[:k]  # rotate who goes first
                for target in order:
                    tps, _ = pgbench(ports[target], a, args.duration)
                    results[name][target].append(tps)
                    print(f"  round {r + 1} {name:34s} {target:9s} {tps:10.0f} tps", flush=True)
        lat: dict[str, list[float]] = {k: [] for k in targets}
        logd = base / "latlog"
        logd.mkdir()
        for r in range(args.rounds):
            k = r % len(targets)
            for target in targets[k:] + targets[:k]:
                _, l = pgbench(ports[target], ["-S", "-M", "prepared", "-c", "1"],
                               max(3, args.duration // 2), logd)
                lat[target].append(statistics.median(l))

        print("\n| test | direct TPS | mmproxy TPS | bare uvloop pump TPS | pgbouncer TPS | "
              "mmproxy/direct | bare pump/direct | pgbouncer/direct | mmproxy/bare pump | "
              "mmproxy/pgbouncer |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name in tests:
            med = {k: statistics.median(v) for k, v in results[name].items()}
            d, m, b, pb = med["direct"], med["mmproxy"], med["bare"], med["pgbouncer"]
            print(f"| {name} | {d:.0f} | {m:.0f} | {b:.0f} | {pb:.0f} | {m / d:.2f} | {b / d:.2f} | "
                  f"{pb / d:.2f} | {m / b:.2f} | {m / pb:.2f} |")
        p50 = {k: statistics.median(v) for k, v in lat.items()}
        print(f"\nsingle-client select-only p50 latency: direct {p50['direct']:.3f} ms, "
              f"mmproxy {p50['mmproxy']:.3f} ms (+{p50['mmproxy'] - p50['direct']:.3f} ms), "
              f"bare pump {p50['bare']:.3f} ms (+{p50['bare'] - p50['direct']:.3f} ms), "
              f"pgbouncer {p50['pgbouncer']:.3f} ms (+{p50['pgbouncer'] - p50['direct']:.3f} ms)")
        return 0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        pg.stop("fast")
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
