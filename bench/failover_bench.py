"""Failover and recovery of a 3-node cluster under load (issue 13's benchmark).

One run, on this machine, real processes (harness/cluster.py), mmproxy's
default timeouts (heartbeat 100 ms, suspect 500 ms), PostgreSQL with fsync
on. A load of ``--clients`` threads spread over the three nodes inserts one
row per transaction, each recording when it began and when it was
acknowledged.

- ``kills``: kill -9 a node (its proxy and its PostgreSQL) ``--kills`` times
  with a node that is not the Raft leader, then as many times with the
  leader's node. Each time: from the kill to the first acknowledged commit
  of a transaction that *began* after the kill on a surviving node (a
  commit already past its votes does not count); the victim stays down
  ``--down-s``, then from its restart to it being ONLINE again, with the
  backlog it had to copy (transactions the others committed meanwhile).
- ``outage``: one node down ``--outage-s`` (30 s) under load, then from
  its restart to ONLINE, and the backlog.
- ``quiet``: ``--quiet-minutes`` of full load with no fault: generation
  switches that left a node out (false exclusions), read leases that
  lapsed on a healthy node, and statements refused with 57P03.

    .venv/bin/python bench/failover_bench.py [--parts kills,outage,quiet] [--kills 20]
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from harness.cluster import ClusterUnderTest, _wait  # noqa: E402


class Load:
    """``clients`` threads inserting through the nodes in turn (3/3/2 for 8)."""

    def __init__(self, c: ClusterUnderTest, clients: int):
        self.c = c
        self.ops: list[tuple[int, float, float]] = []      # (node, began, acknowledged)
        self.errors: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(c.ids[k % len(c.ids)],),
                                         daemon=True) for k in range(clients)]
        for t in self.threads:
            t.start()

    def run(self, node: int) -> None:
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self.c.node(node).dsn(), autocommit=True,
                                           connect_timeout=2)
                t0 = time.monotonic()
                conn.execute("INSERT INTO fb (node) VALUES (%s)", (node,))
                t1 = time.monotonic()
                with self.lock:
                    self.ops.append((node, t0, t1))
            except psycopg.Error as e:
                key = getattr(e, "sqlstate", None) or type(e).__name__
                with self.lock:
                    self.errors[key] = self.errors.get(key, 0) + 1
                if conn is not None and (conn.closed or conn.broken):
                    conn = None
                time.sleep(0.02)
        if conn is not None:
            conn.close()

    def first_commit_after(self, t: float, nodes) -> float | None:
        with self.lock:
            ends = [t1 for n, t0, t1 in self.ops if t0 > t and n in nodes]
        return min(ends) - t if ends else None

    def commits_between(self, a: float, b: float) -> int:
        with self.lock:
            return sum(1 for _, _, t1 in self.ops if a <= t1 < b)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def state(c: ClusterUnderTest, i: int) -> tuple:
    try:
        st, num, members, leader = c.direct(
            i, "SELECT status, gen_num, gen_members, raft_leader FROM mtm.status()")[0]
        return st, num, tuple(members), leader
    except psycopg.Error:
        return ("unreachable", 0, (), None)


def settled(c: ClusterUnderTest) -> bool:
    states = [state(c, i) for i in c.ids]
    return len({s[:3] for s in states}) == 1 and all(s[0] == "online" for s in states) \
        and set(states[0][2]) == set(c.ids)


def leader(c: ClusterUnderTest) -> int | None:
    for i in c.ids:
        s = state(c, i)
        if s[0] == "online" and s[3]:
            return s[3]
    return None


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    xs = sorted(xs)
    return xs[max(0, min(len(xs) - 1, int(round(p / 100 * len(xs) + 0.5)) - 1))]


def kill_cycle(c: ClusterUnderTest, load: Load, victim: int, down_s: float) -> dict:
    _wait(lambda: settled(c), 60, "a settled cluster")
    time.sleep(0.5)
    node = c.node(victim)
    t_kill = time.monotonic()
    node.kill_proxy(signal.SIGKILL)
    node.kill_pg()
    survivors = [i for i in c.ids if i != victim]
    _wait(lambda: load.first_commit_after(t_kill, survivors) is not None, 30,
          "a commit on a survivor")
    resume = load.first_commit_after(t_kill, survivors)
    time.sleep(max(0.0, t_kill + down_s - time.monotonic()))
    t_restart = time.monotonic()
    node.start_pg()
    node.start_proxy(wait=False)
    _wait(lambda: state(c, victim)[0] == "online" and settled(c), 120, "the victim ONLINE")
    online = time.monotonic() - t_restart
    return {"victim": victim, "resume_s": resume, "online_s": online,
            "backlog_txns": load.commits_between(t_kill, t_restart)}


def report(title: str, rows: list[dict]) -> None:
    print(f"\n{title} ({len(rows)} kills)")
    for key, unit in (("resume_s", "kill -> first commit on a survivor"),
                      ("online_s", "restart -> victim ONLINE")):
        xs = [r[key] for r in rows]
        print(f"  {unit:42s} p50 {pct(xs, 50):6.3f} s  p99 {pct(xs, 99):6.3f} s  "
              f"max {max(xs):6.3f} s")
    b = [r["backlog_txns"] for r in rows]
    print(f"  {'backlog copied (transactions)':42s} p50 {pct(b, 50):6.0f}    max {max(b):6.0f}")


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)       # stop what was started, as on Ctrl-C
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="kills,outage,quiet")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--down-s", type=float, default=2.0)
    ap.add_argument("--outage-s", type=float, default=30.0)
    ap.add_argument("--quiet-minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    parts = a.parts.split(",")
    base = Path(a.dir or tempfile.mkdtemp(prefix="mmproxy-failover-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    c = ClusterUnderTest(base / "cluster", 3, relay_links=False, fsync=True)
    out: dict = {"clients": a.clients}
    print(f"failover benchmark: 3 nodes, {a.clients} clients, fsync on, files in {base}",
          flush=True)
    c.start()
    load = None
    try:
        with psycopg.connect(c.node(1).dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE fb (id bigserial PRIMARY KEY, node int, "
                         "at timestamptz DEFAULT now())")
        load = Load(c, a.clients)
        time.sleep(2)
        if "kills" in parts:
            for kind in ("follower", "leader"):
                rows = []
                for k in range(a.kills):
                    _wait(lambda: settled(c), 60, "a settled cluster")
                    lead = leader(c)
                    victim = lead if kind == "leader" else next(
                        i for i in (3, 2, 1) if i != lead)
                    r = kill_cycle(c, load, victim, a.down_s)
                    print(f"  {kind} kill {k + 1}: node {victim}: first commit "
                          f"{r['resume_s']:.3f} s, ONLINE {r['online_s']:.2f} s after restart "
                          f"(backlog {r['backlog_txns']} txns)", flush=True)
                    rows.append(r)
                report(f"kill -9 of a {'Raft leader' if kind == 'leader' else 'non-leader'}'s "
                       "node (proxy and PostgreSQL)", rows)
                out[kind] = rows
        if "outage" in parts:
            _wait(lambda: settled(c), 60, "a settled cluster")
            lead = leader(c)
            victim = next(i for i in (3, 2, 1) if i != lead)
            r = kill_cycle(c, load, victim, a.outage_s)
            print(f"\n{a.outage_s:g} s outage of node {victim} under load: ONLINE "
                  f"{r['online_s']:.2f} s after its restart, backlog {r['backlog_txns']} "
                  f"transactions copied", flush=True)
            out["outage"] = r
        if "quiet" in parts:
            _wait(lambda: settled(c), 60, "a settled cluster")
            counts = {i: len(c.node(i).events()) for i in c.ids}
            gen0 = state(c, 1)[1]
            err0 = dict(load.errors)
            t0 = time.monotonic()
            ops0 = len(load.ops)
            time.sleep(a.quiet_minutes * 60)
            span = time.monotonic() - t0
            new = [e for i in c.ids for e in c.node(i).events()[counts[i]:]]
            # each node logs each switch: count generations
            switches = {e["gen"] for e in new if e.get("event") == "generation_switch"}
            excl = {e["gen"] for e in new if e.get("event") == "generation_switch"
                    and len(e.get("members", [])) < len(c.ids)}
            lapses = [e for e in new if e.get("event") == "read_lease_lapsed"]
            refused = load.errors.get("57P03", 0) - err0.get("57P03", 0)
            tps = (len(load.ops) - ops0) / span
            print(f"\n{a.quiet_minutes:g} minutes of load with no fault ({tps:.0f} commits/s): "
                  f"{len(excl)} false exclusions, {len(switches)} generation switches "
                  f"(from generation {gen0}), {len(lapses)} read-lease lapses, {refused} "
                  f"statements refused with 57P03", flush=True)
            out["quiet"] = {"minutes": a.quiet_minutes, "tps": tps,
                            "false_exclusions": len(excl), "switches": len(switches),
                            "lease_lapses": len(lapses), "refused_57P03": refused}
        print(f"\nclient errors over the run: {load.errors}")
        (base / "failover_bench.json").write_text(json.dumps(out, indent=1, default=str))
    finally:
        if load is not None:
            load.finish()
        c.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
