"""The fault harness's short run in the suite (issue 12): a few rounds of
the list-append workload (Elle-style multi-key transactions on every node)
on a real 3-node cluster, one per fault family the campaign script draws
from - a proxy paused with SIGSTOP, one cut edge of the link graph, a
clogged network, and a member crashing at a failpoint after its vote -
each followed by DataSync and the full checker (no G0/G1/G-single, no lost
acknowledged append, nodes identical, nothing left prepared). The bank
workload's rounds (kill -9, failpoints of the coordinator, PostgreSQL
crashes, isolation) are tests/test_restart_safety.py; long campaigns over
every fault: ``python -m harness.run --faults all --rounds 100``."""
from __future__ import annotations

import pytest

from harness.run import Campaign

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def camp(workdir):
    c = Campaign(workdir / "fault-rounds", workload="append", seed=5, warm_s=1.5, hold_s=3.0,
                 settle_s=3.0, timeouts={"commit_vote_timeout_ms": 1500})
    c.start()
    yield c
    c.cluster.stop()


@pytest.mark.parametrize("k, fault", list(enumerate([
    "pause-proxy", "edge-cut", "clog", "fp:member_after_precommit", "restart-proxy",
    "slow-links"])))
def test_append_round(camp, k, fault):
    r = camp.run_round(k, fault=fault)
    assert not r.violations, "\n".join(r.violations)
    if fault == "restart-proxy":
        # SIGTERM under load: the proxy ends its sessions within the grace
        # (2 s) and stops; its senders' streams once hung in close() (the
        # harness then SIGKILLed it after 10 s, and the cluster had waited
        # on a member that no longer voted)
        assert r.detail.startswith("graceful stop took"), r.detail
        assert float(r.detail.split()[3]) < 5, r.detail
    # the checker saw real transactions, acknowledged ones among them
    assert camp.last_check.valid
    oks = [op for op in camp.history.ops if op.type == "ok" and op.f == "txn"]
    assert len(oks) > 50
    # writes resumed cluster-wide after the heal
    assert any(rate["after"][0] > 0 for rate in r.rates.values()), r.rates
