"""Cluster throughput: mmproxy's 3-node cluster against synchronous replication.

One run, on this machine:
- vanilla PostgreSQL 15 with two synchronous standbys
  (synchronous_standby_names = 'ANY 1 (s1, s2)'), pgbench against the primary;
- the 3-node mmproxy cluster (three PostgreSQL servers, three proxies),
  pgbench clients spread over the three proxies;
both with fsync on, pgbench scale 10, 8 clients, TPC-B-like and -N (no
branch/teller updates), and single-client commit latency. pgbench 15
retries serialization failures (--max-tries), which the cluster reports
for conflicting transactions on different nodes.

It also measures where the CPU goes during each 8-client run: the whole
machine's busy time (/proc/stat) and the proxies' own. What is left per
cluster transaction (PostgreSQL's work on three nodes, pgbench, the
kernel) bounds the cluster's TPS on this machine even with a proxy that
cost nothing: the script prints that ceiling beside the measured ratio.

    .venv/bin/python bench/cluster_bench.py [--duration 20]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import wait_for  # noqa: E402
from proxy.pgserver import LocalPostgres, _as_postgres, pg_bin_dir  # noqa: E402


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores)."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = f
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Machine and per-process CPU over one measured run."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.busy0 = machine_busy_s()
        self.procs0 = sum(process_cpu_s(p) for p in pids)

    def stop(self) -> dict:
        return {"busy_s": machine_busy_s() - self.busy0,
                "procs_s": sum(process_cpu_s(p) for p in self.pids) - self.procs0}


def pgbench(port: int, args: list[str], duration: int) -> dict:
    cmd = [os.path.join(pg_bin_dir(), "pgbench"), "-h", "127.0.0.1", "-p", str(port),
           "-U", "postgres", "-n", "-T", str(duration), "--max-tries=1000", *args, "postgres"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=duration * 4 + 120)
    out = res.stdout
    m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    lat = re.search(r"latency average = ([\d.]+) ms", out)
    retried = re.search(r"number of transactions retried: (\d+)", out)
    if m is None:
        raise RuntimeError(f"pgbench failed on port {port}:\n{out}\n{res.stderr}")
    return {"tps": float(m.group(1)), "latency_ms": float(lat.group(1)) if lat else None,
            "retried": int(retried.group(1)) if retried else 0}


def wait_caught_up(cluster, timeout: float = 120) -> None:
    """After pgbench -i, every slot has to stream the loaded rows back to
    our senders (they skip what was applied from elsewhere): start
    measuring once every walsender has sent what is flushed."""
    import psycopg
    for pg in cluster.pgs:
        with psycopg.connect(pg.dsn(), autocommit=True) as c:
            wait_for(lambda c=c: c.execute(
                "SELECT bool_and(pg_current_wal_flush_lsn() - sent_lsn < 65536) "
                "FROM pg_stat_replication").fetchone()[0], timeout=timeout, interval=0.2,
                what=f"the walsenders of {pg.base.name} to catch up")


def start_sync_rep(base: Path) -> list[LocalPostgres]:
    primary = LocalPostgres(base / "primary", settings={
        "synchronous_standby_names": "'ANY 1 (s1, s2)'", "max_connections": "100"})
    primary.init().start()
    standbys = []
    for name in ("s1", "s2"):
        sb = LocalPostgres(base / name)
        sb.base.mkdir(parents=True)
        os.chmod(sb.base, 0o755)
        if os.geteuid() == 0:
            subprocess.run(["chown", "postgres", str(sb.base)], check=True)
        sb.sockdir.mkdir()
        os.chmod(sb.sockdir, 0o777)
        subprocess.run(_as_postgres() + [
            os.path.join(pg_bin_dir(), "pg_basebackup"), "-D", str(sb.datadir), "-R",
            "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres", "-X", "stream",
            "-d", f"application_name={name}"], check=True, capture_output=True)
        with open(sb.datadir / "postgresql.auto.conf", "a") as f:
            f.write(f"\nport = {sb.port}\nunix_socket_directories = '{sb.sockdir}'\n"
                    f"primary_conninfo = 'host=127.0.0.1 port={primary.port} user=postgres "
                    f"application_name={name}'\n")
        sb.start()
        standbys.append(sb)
    wait_for(lambda: primary.psql("SELECT count(*) FROM pg_stat_replication WHERE sync_state "
                                  "IN ('quorum', 'sync')").strip() == "2",
             timeout=30, interval=0.2, what="both standbys to become synchronous")
    return [primary, *standbys]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=20, help="seconds per pgbench run")
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="mmproxy-cbench-"))
    os.chmod(base, 0o755)
    from conftest import Cluster
    servers: list[LocalPostgres] = []
    cluster = None
    results: dict = {}
    try:
        print(f"machine: {os.cpu_count()} cores; scale {args.scale}, {args.clients} clients, "
              f"{args.duration}s per run, fsync on everywhere", flush=True)
        servers = start_sync_rep(base)
        primary = servers[0]
        subprocess.run([os.path.join(pg_bin_dir(), "pgbench"), "-i", "-q", "-s", str(args.scale),
                        "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres", "postgres"],
                       check=True, capture_output=True)
        c = str(args.clients)
        for name, extra in (("TPC-B-like", []), ("-N", ["-N"])):
            meter = CpuMeter([])
            results[("sync", name)] = pgbench(primary.port, ["-c", c, "-j", "2", *extra],
                                              args.duration)
            results[("sync", name)]["cpu"] = meter.stop()
            print(f"  sync-rep  {name:10s} {results[('sync', name)]}", flush=True)
        results[("sync", "latency")] = pgbench(primary.port, ["-c", "1"], max(5, args.duration // 2))
        for s in servers:
            s.stop("fast")

        cluster = Cluster(base, 3, name="cnode", fsync=True)
        p1 = cluster.proxies[0]
        init = subprocess.run([os.path.join(pg_bin_dir(), "pgbench"), "-i", "-q", "-s",
                               str(args.scale), "-h", "127.0.0.1", "-p", str(p1.port),
                               "-U", "postgres", "postgres"], capture_output=True, text=True)
        if init.returncode != 0:
            raise RuntimeError(f"pgbench -i through the cluster failed: {init.stderr}")
        wait_caught_up(cluster)
        per = [args.clients // 3 + (1 if i < args.clients % 3 else 0) for i in range(3)]
        for name, extra in (("TPC-B-like", []), ("-N", ["-N"])):
            procs = []
            meter = CpuMeter([p.pid for p in cluster.proxies])
            for p, n in zip(cluster.proxies, per):
                cmd = [sys.executable, __file__, "--one", str(p.port), str(n), str(args.duration),
                       *extra]
                procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
            outs = [eval(pr.communicate()[0].strip().splitlines()[-1]) for pr in procs]
            results[("cluster", name)] = {"tps": sum(o["tps"] for o in outs),
                                          "retried": sum(o["retried"] for o in outs),
                                          "cpu": meter.stop()}
            print(f"  cluster   {name:10s} {results[('cluster', name)]}", flush=True)
        results[("cluster", "latency")] = pgbench(p1.port, ["-c", "1"], max(5, args.duration // 2))

        print("\n| pgbench, scale %d, %d clients | sync rep TPS | cluster TPS | cluster/sync |"
              % (args.scale, args.clients))
        print("|---|---:|---:|---:|")
        for name in ("TPC-B-like", "-N"):
            s, cl = results[("sync", name)]["tps"], results[("cluster", name)]["tps"]
            print(f"| {name} | {s:.0f} | {cl:.0f} | {cl / s:.2f} |")
        cores = os.cpu_count()
        print(f"\nCPU per transaction, whole machine ({cores} cores), 8-client runs:\n")
        print("| pgbench | sync rep | cluster | cluster: proxies | cluster: the rest "
              "(PostgreSQL x3, pgbench, kernel) | cluster ceiling with a free proxy | "
              "ceiling/sync |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name in ("TPC-B-like", "-N"):
            sr, cr = results[("sync", name)], results[("cluster", name)]
            s_ms = sr["cpu"]["busy_s"] / (sr["tps"] * args.duration) * 1000
            n_cluster = cr["tps"] * args.duration
            c_ms = cr["cpu"]["busy_s"] / n_cluster * 1000
            p_ms = cr["cpu"]["procs_s"] / n_cluster * 1000
            rest_ms = c_ms - p_ms
            ceiling = cores / (rest_ms / 1000)
            print(f"| {name} | {s_ms:.2f} ms | {c_ms:.2f} ms | {p_ms:.2f} ms | {rest_ms:.2f} ms | "
                  f"{ceiling:.0f} TPS | {ceiling / sr['tps']:.2f} |")
        sl, cll = results[("sync", "latency")], results[("cluster", "latency")]
        print(f"\nsingle-client TPC-B-like latency: sync rep {sl['latency_ms']:.2f} ms, "
              f"cluster {cll['latency_ms']:.2f} ms")
        print(f"cluster retries after 40001: TPC-B-like "
              f"{results[('cluster', 'TPC-B-like')]['retried']}, -N {results[('cluster', '-N')]['retried']}")
        return 0
    finally:
        if cluster is not None:
            cluster.stop()
        for s in servers:
            s.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        port, n, duration = int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
        print(pgbench(port, ["-c", n, "-j", "1", *sys.argv[5:]], duration))
        sys.exit(0)
    sys.exit(main())
