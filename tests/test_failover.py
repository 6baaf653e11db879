"""Generations on real processes (issue 13): a node that dies or is cut off
leaves the generation and the others keep committing; it comes back by
itself; a node cut off from the majority refuses reads; an in-doubt
transaction of a dead coordinator is decided by the cluster. Each test
ends with DataSync: nothing left prepared, every node identical, every
node ONLINE in one generation (``harness.run.Campaign.data_sync``'s
checks, here on a plain table)."""
from __future__ import annotations

import signal
import threading
import time

import psycopg
import pytest

from harness.cluster import ClusterUnderTest, _wait

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def c(workdir):
    cl = ClusterUnderTest(workdir / "failover", timeouts={"commit_vote_timeout_ms": 2000})
    cl.start()
    with psycopg.connect(cl.node(1).dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE fo (id bigserial PRIMARY KEY, node int, k int)")
    yield cl
    cl.stop()


def _state(c, i: int) -> tuple:
    try:
        st, num, members = c.direct(i, "SELECT status, gen_num, gen_members FROM mtm.status()")[0]
        return st, num, tuple(members)
    except psycopg.Error:
        return ("unreachable", 0, ())


def _all_online(c) -> bool:
    states = {i: _state(c, i) for i in c.ids}
    return len(set(states.values())) == 1 and all(s[0] == "online" for s in states.values()) \
        and set(next(iter(states.values()))[2]) == set(c.ids)


def _data_sync(c) -> None:
    _wait(lambda: not any(c.prepared(i) for i in c.ids), 30, "nothing left prepared")
    _wait(lambda: _all_online(c), 30, "every node ONLINE in one generation")
    q = "SELECT count(*), coalesce(sum(k), 0), md5(string_agg(id::text || ':' || k, ',' " \
        "ORDER BY id)) FROM fo"
    _wait(lambda: len({tuple(c.direct(i, q)[0]) for i in c.ids}) == 1, 30, "identical nodes")


class Load:
    """Inserts through the given nodes; records what was acknowledged."""

    def __init__(self, c, nodes, seconds: float):
        self.acked: dict[int, list[tuple[float, int]]] = {i: [] for i in nodes}
        self.errors: dict[str, int] = {}
        self.stop_at = time.monotonic() + seconds
        self.threads = [threading.Thread(target=self.run, args=(c, i), daemon=True)
                        for i in nodes]
        for t in self.threads:
            t.start()

    def run(self, c, i: int) -> None:
        k = 0
        conn = None
        while time.monotonic() < self.stop_at:
            try:
                if conn is None:
                    conn = psycopg.connect(c.node(i).dsn(), autocommit=True, connect_timeout=2)
                k += 1
                row = conn.execute("INSERT INTO fo (node, k) VALUES (%s, %s) RETURNING id",
                                   (i, k)).fetchone()
                self.acked[i].append((time.monotonic(), row[0]))
            except psycopg.Error as e:
                key = getattr(e, "sqlstate", None) or type(e).__name__
                self.errors[key] = self.errors.get(key, 0) + 1
                if conn is not None and conn.closed:
                    conn = None
                time.sleep(0.02)
        if conn is not None:
            conn.close()

    def join(self) -> None:
        for t in self.threads:
            t.join(60)

    def first_after(self, t0: float, nodes) -> float | None:
        ts = [t for i in nodes for t, _ in self.acked[i] if t > t0]
        return min(ts) - t0 if ts else None


def _acked_everywhere(c, load: Load) -> None:
    ids = {r for rows in load.acked.values() for _, r in rows}
    for i in c.ids:
        have = {r[0] for r in c.direct(i, "SELECT id FROM fo")}
        assert ids <= have, f"node {i} lacks acknowledged rows {sorted(ids - have)[:5]}"


@pytest.mark.parametrize("how", ["kill-node", "kill-proxy"])
def test_dead_node_leaves_and_comes_back(c, how):
    """Kill node 3 (its proxy, or its proxy and PostgreSQL) under load on
    nodes 1 and 2: they exclude it and go on committing; started again,
    it catches up and is ONLINE in a later generation."""
    _wait(lambda: _all_online(c), 30, "a settled cluster")
    gen0 = _state(c, 1)[1]
    load = Load(c, (1, 2), seconds=9)
    time.sleep(1.5)
    victim = c.node(3)
    t_kill = time.monotonic()
    victim.kill_proxy(signal.SIGKILL)
    if how == "kill-node":
        victim.kill_pg()
    _wait(lambda: _state(c, 1)[2] == (1, 2), 10, "a generation without node 3")
    t_switch = time.monotonic()
    _wait(lambda: load.first_after(t_switch, (1,)) is not None
          and load.first_after(t_switch, (2,)) is not None, 10,
          "commits on nodes 1 and 2 in the generation without node 3")
    resumed = load.first_after(t_kill, (1, 2))
    _wait(lambda: _state(c, 2)[2] == (1, 2), 5, "node 2 showing it too")
    assert c.direct(1, "SELECT status FROM mtm.nodes() WHERE id = 3") == [("dead",)]
    time.sleep(2)
    if how == "kill-node":
        victim.start_pg()
    victim.start_proxy()
    t_back = time.monotonic()
    _wait(lambda: _all_online(c), 30, "node 3 ONLINE again")
    back_s = time.monotonic() - t_back
    load.join()
    assert _state(c, 3)[1] > gen0 + 1      # excluded, then let back in
    _data_sync(c)
    _acked_everywhere(c, load)
    print(f"{how}: first commit on a survivor {resumed:.2f} s after the kill, node 3 ONLINE "
          f"{back_s:.2f} s after its restart; errors seen by clients {load.errors}")


def test_isolated_node_stops_serving_reads(c):
    """Cut node 3 off (every link stalled): within its read lease it refuses
    reads with 57P03 naming its state; an mtm_admin session may still read;
    the majority goes on; healed, node 3 is ONLINE again."""
    _wait(lambda: _all_online(c), 30, "a settled cluster")
    with psycopg.connect(c.node(3).dsn(), autocommit=True) as conn, \
            psycopg.connect(c.node(3).dsn(application_name="mtm_admin"),
                            autocommit=True) as admin:
        assert conn.execute("SELECT count(*) FROM fo").fetchone()[0] >= 0
        c.isolate(3, "stall")
        t0 = time.monotonic()
        refused = None
        while time.monotonic() - t0 < 5:
            try:
                conn.execute("SELECT count(*) FROM fo").fetchone()
            except psycopg.errors.CannotConnectNow as e:
                refused = (time.monotonic() - t0, str(e))
                break
            time.sleep(0.02)
        assert refused is not None, "node 3 kept serving reads while cut off"
        # the lease (400 ms) runs out before the majority can exclude node 3
        assert refused[0] < 1.0, refused
        assert "multimaster node 3 is not online" in refused[1]
        # the majority moved on without it
        _wait(lambda: _state(c, 1)[2] == (1, 2), 10, "a generation without node 3")
        with psycopg.connect(c.node(1).dsn(), autocommit=True) as w:
            w.execute("INSERT INTO fo (node, k) VALUES (1, -1)")
        # the administrator still reads (what this node has)
        st = admin.execute("SELECT status FROM mtm.status()").fetchone()[0]
        assert st in ("isolated", "catchup"), st
        c.heal()
    _wait(lambda: _all_online(c), 30, "node 3 ONLINE again")
    _data_sync(c)


@pytest.mark.parametrize("point, committed", [("after_votes", False),
                                              ("after_local_commit", True)])
def test_in_doubt_transaction_of_a_dead_coordinator_is_decided_by_the_cluster(c, point,
                                                                               committed):
    """Node 1's proxy crashes in the middle of a commit and stays down: its
    transaction is prepared on nodes 2 and 3. The cluster excludes node 1
    and finishes the gid on 2 and 3 - no DBA, node 1 still down: after the
    votes nobody holds a precommit and the cluster decides abort; after
    node 1 committed locally, nodes 2 and 3 hold precommits and it is
    committed (by the log's decision, or by node 1's stream if that got
    out before the crash)."""
    _wait(lambda: _all_online(c), 30, "a settled cluster")
    k = 424242 if committed else 434343
    n1 = c.node(1)
    n1.arm(f"{point}=crash")
    with psycopg.connect(n1.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.OperationalError):
            conn.execute("INSERT INTO fo (node, k) VALUES (1, %s)", (k,))
    _wait(lambda: not n1.proxy_alive(), 10, "node 1's proxy crashed")
    n1.disarm()
    _wait(lambda: _state(c, 2)[2] == (2, 3), 10, "a generation without node 1")
    _wait(lambda: not c.prepared(2) and not c.prepared(3), 15,
          "the in-doubt transaction finished on nodes 2 and 3")
    for i in (2, 3):
        assert c.direct(i, "SELECT count(*) FROM fo WHERE k = %s", (k,)) == [(int(committed),)]
    if not committed:
        decided = [e for i in (2, 3) for e in c.node(i).events()
                   if e.get("event") == "in_doubt_finished" and e.get("commit") is False]
        assert decided, "the abort was not the cluster's decision"
    n1.start_proxy()
    _data_sync(c)
    assert c.direct(1, "SELECT count(*) FROM fo WHERE k = %s", (k,)) == [(int(committed),)]


def test_a_returning_node_joins_through_a_donor_while_another_is_down(c):
    """Node 3 is away while nodes 1 and 2 commit; then node 1 dies too and
    node 2 alone is no majority: writes stop. Node 3 comes back: it copies
    from node 2, the only ONLINE node, every origin's transactions - node
    1's included, which node 1 can no longer send - in node 2's WAL order,
    and the leader forms {2, 3} in one step (node 1 out, node 3 in). Writes
    resume on 2 and 3 without node 1; node 1 comes back last."""
    _wait(lambda: _all_online(c), 30, "a settled cluster")
    load = Load(c, (1, 2), seconds=4)
    time.sleep(0.5)
    c.node(3).kill_proxy(signal.SIGKILL)
    _wait(lambda: _state(c, 1)[2] == (1, 2), 10, "a generation without node 3")
    load.join()
    assert load.acked[1] and load.acked[2]
    c.node(1).kill_proxy(signal.SIGKILL)
    time.sleep(1.0)
    with pytest.raises(psycopg.Error):                  # 2 alone is no majority
        with psycopg.connect(c.node(2).dsn(), autocommit=True, connect_timeout=3) as conn:
            conn.execute("INSERT INTO fo (node, k) VALUES (2, -2)")
    c.node(3).start_proxy()
    _wait(lambda: _state(c, 2)[2] == (2, 3) and _state(c, 2)[0] == "online"
          and _state(c, 3)[0] == "online", 30, "generation {2, 3} with both ONLINE")
    with psycopg.connect(c.node(3).dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO fo (node, k) VALUES (3, -3)")
    # node 3 holds everything node 1 committed, though it got none of it from node 1
    _acked_everywhere_but(c, load, skip=(1,))
    assert any(e["event"] == "catchup_donor" and e.get("donor") == 2
               for e in c.node(3).events())
    c.node(1).start_proxy()
    _data_sync(c)
    _acked_everywhere(c, load)


def test_a_node_killed_many_times_in_turn_with_another_bicrash(c):
    """mmts's bicrash (its removed tests/test_recovery.py): under load on
    every node, kill node 3 and wait until it is ONLINE again, then kill
    node 1 likewise - ten times. DataSync after every round."""
    _wait(lambda: _all_online(c), 30, "a settled cluster")
    for _ in range(10):
        load = Load(c, (1, 2, 3), seconds=6)
        for victim in (3, 1):
            time.sleep(0.3)
            c.node(victim).kill_proxy(signal.SIGKILL)
            time.sleep(0.3)
            c.node(victim).start_proxy()
            _wait(lambda: _all_online(c), 30, f"node {victim} ONLINE again")
        load.join()
        _data_sync(c)
        _acked_everywhere(c, load)


def test_every_node_killed_within_a_second_comes_back_with_nothing_lost(c):
    """Galera 2026's coordinated crash: kill -9 every proxy and PostgreSQL
    under load within a second, start them again: one generation forms,
    nothing is left prepared, every acknowledged write is on every node.
    (Processes are killed, not the machine: what PostgreSQL wrote is in
    the OS's cache, so the servers here may run without fsync.)"""
    _wait(lambda: _all_online(c), 30, "a settled cluster")
    load = Load(c, (1, 2, 3), seconds=3)
    time.sleep(1.5)
    for i in c.ids:
        c.node(i).kill_proxy(signal.SIGKILL)
        c.node(i).kill_pg()
        time.sleep(0.2)
    load.join()
    for i in c.ids:
        c.node(i).start_pg()
    for i in c.ids:
        c.node(i).start_proxy()
    _data_sync(c)
    _acked_everywhere(c, load)


def _acked_everywhere_but(c, load: Load, skip) -> None:
    ids = {r for rows in load.acked.values() for _, r in rows}
    for i in c.ids:
        if i in skip:
            continue
        have = {r[0] for r in c.direct(i, "SELECT id FROM fo")}
        assert ids <= have, f"node {i} lacks acknowledged rows {sorted(ids - have)[:5]}"


def test_a_node_away_past_the_wal_limit_stays_out_and_says_why(workdir):
    """The WAL kept for an absent node is bounded ([limits]
    absent_node_wal_limit_mb -> max_slot_wal_keep_size). Node 3 is down
    while the others' WAL grows past it: their slots for node 3 are
    invalidated. Started again, node 3 does not rejoin - it could never get
    everything - and says so, naming the remedy; the others keep working."""
    cl = ClusterUnderTest(workdir / "wal-limit", limits={"absent_node_wal_limit_mb": 32})
    cl.start()
    try:
        assert cl.direct(1, "SHOW max_slot_wal_keep_size") == [("32MB",)]
        with psycopg.connect(cl.node(1).dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE w (id int PRIMARY KEY)")
            conn.execute("INSERT INTO w VALUES (1)")
        cl.node(3).kill_proxy(signal.SIGKILL)
        _wait(lambda: _state(cl, 1)[2] == (1, 2), 10, "a generation without node 3")
        # WAL past the limit, as over time: a segment (16 MB) at a time, a
        # checkpoint after each. The live peer's slot follows though none of
        # it is for that peer (keepalives are confirmed; its restart point
        # moves with the standby snapshot each checkpoint logs): only node
        # 3's falls behind, and is invalidated at a checkpoint.
        for i in (1, 2):
            live = 2 if i == 1 else 1
            for _ in range(5):
                cl.direct(i, "SELECT pg_logical_emit_message(false, 'filler', 'x'), "
                             "pg_switch_wal()")
                cl.direct(i, "CHECKPOINT")
                _wait(lambda: cl.direct(i, "SELECT pg_current_wal_lsn() - restart_lsn < 1000000 "
                                           "FROM pg_replication_slots WHERE slot_name = "
                                           f"'mtm_slot_{live}'") == [(True,)], 10,
                      f"node {live}'s slot on node {i} to follow")
            assert cl.direct(i, "SELECT wal_status FROM pg_replication_slots "
                                "WHERE slot_name = 'mtm_slot_3'") == [("lost",)]
        cl.node(3).start_proxy()
        # (a state row not refreshed for 3 s also says disabled: wait for
        # one that knows the generation without node 3)
        _wait(lambda: _state(cl, 3)[:2] == ("disabled", _state(cl, 1)[1]), 20,
              "node 3 to say it cannot rejoin")
        with pytest.raises(psycopg.errors.CannotConnectNow,
                           match=r"cannot rejoin.*max_slot_wal_keep_size.*copy it again"):
            with psycopg.connect(cl.node(3).dsn(), autocommit=True) as conn:
                conn.execute("SELECT 1")
        with psycopg.connect(cl.node(2).dsn(), autocommit=True) as conn:
            conn.execute("INSERT INTO w VALUES (2)")
        time.sleep(2)
        assert _state(cl, 3)[0] == "disabled" and _state(cl, 1)[2] == (1, 2)
        assert cl.direct(3, "SELECT count(*) FROM w") == [(1,)]     # nothing half-applied
        assert any(e["event"] == "slot_lost" for e in cl.node(1).events())
    finally:
        cl.stop()
