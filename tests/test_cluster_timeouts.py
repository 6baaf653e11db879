"""How long a commit waits for a member's vote (``commit_vote_timeout_ms``):
as long as the member keeps working on the coordinator's stream, and no
longer than the timeout once it falls silent. A 2-node cluster with a 1 s
timeout."""
from __future__ import annotations

import signal
import threading
import time

import psycopg
import pytest

from conftest import Cluster, wait_for


@pytest.fixture(scope="module")
def cluster(workdir):
    c = Cluster(workdir, 2, name="timeouts", timeouts="commit_vote_timeout_ms = 1000")
    yield c
    c.stop()


def count(c: Cluster, i: int, q: str) -> int:
    with psycopg.connect(c.direct(i).dsn()) as conn:
        return conn.execute(q).fetchone()[0]


def test_a_transaction_that_takes_longer_to_apply_than_the_timeout_commits(cluster):
    """Node 2 applies each row of ``slow`` in 20 ms (an ENABLE ALWAYS
    trigger made on node 2 only), so a 150-row transaction takes about 3 s
    there - three times the vote timeout - and a small transaction that
    node 1 commits meanwhile queues behind it. Node 2 reports that it is
    working on node 1's stream, so both commit, on both nodes."""
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE slow (id int PRIMARY KEY)")
        c.execute("CREATE TABLE quick (id int PRIMARY KEY)")
    with psycopg.connect(cluster.direct(2).dsn(), autocommit=True) as c:
        c.execute("SET session_replication_role = replica")   # local DDL, past the DDL guard
        c.execute("CREATE FUNCTION public.slow_row() RETURNS trigger LANGUAGE plpgsql AS "
                  "$$ BEGIN PERFORM pg_sleep(0.02); RETURN NEW; END $$")
        c.execute("CREATE TRIGGER slow_row BEFORE INSERT ON slow FOR EACH ROW "
                  "EXECUTE FUNCTION public.slow_row()")
        c.execute("ALTER TABLE slow ENABLE ALWAYS TRIGGER slow_row")
    result: dict = {}

    def big():
        with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
            t0 = time.monotonic()
            try:
                c.execute("INSERT INTO slow SELECT generate_series(1, 150)")
                result["big"] = time.monotonic() - t0
            except psycopg.Error as e:
                result["big"] = e

    t = threading.Thread(target=big)
    t.start()
    wait_for(lambda: count(cluster, 2, "SELECT count(*) FROM pg_stat_activity WHERE "
                                       "application_name LIKE 'mmproxy apply%' AND "
                                       "wait_event = 'PgSleep'") > 0,
             what="node 2 applying the large transaction")
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("INSERT INTO quick VALUES (1)")      # queued behind it on node 2
    t.join(60)
    assert isinstance(result["big"], float), result
    assert result["big"] > 2.0          # it did outlast the 1 s timeout
    for i in (1, 2):
        assert count(cluster, i, "SELECT count(*) FROM slow") == 150
        assert count(cluster, i, "SELECT count(*) FROM quick") == 1
    with psycopg.connect(cluster.direct(2).dsn(), autocommit=True) as c:
        c.execute("SET session_replication_role = replica")
        c.execute("DROP TRIGGER slow_row ON slow")


def test_a_silent_member_still_times_out(cluster):
    """Node 2's proxy is paused (SIGSTOP): it says nothing, so node 1's
    commit aborts with 40000 naming node 2 once the timeout has passed, and
    the row is nowhere."""
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE paused (id int PRIMARY KEY)")
    victim = cluster.proxies[1]
    victim.proc.send_signal(signal.SIGSTOP)
    try:
        with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
            t0 = time.monotonic()
            with pytest.raises(psycopg.Error) as e:
                c.execute("INSERT INTO paused VALUES (1)")
            waited = time.monotonic() - t0
    finally:
        victim.proc.send_signal(signal.SIGCONT)
    assert e.value.sqlstate == "40000"
    assert "no answer from node(s) 2" in str(e.value)
    assert 0.9 < waited < 10
    wait_for(lambda: all(count(cluster, i, "SELECT count(*) FROM pg_prepared_xacts") == 0
                         for i in (1, 2)), timeout=30, what="the aborted gid rolled back")
    for i in (1, 2):
        assert count(cluster, i, "SELECT count(*) FROM paused") == 0
