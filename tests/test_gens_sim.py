"""Raft, generations and the commit protocol under the seeded simulator
(tests/sim_gens.py).

10,000 seeds, each a fault schedule (loss, duplication, delays, partitions,
crashes at every persistence point, stalls, clock drift and jumps,
compactions, conf changes) checked against the invariants of
GENERATIONS.md section 7 after every event, then healed: a leader, every
node ONLINE again, every in-doubt transaction decided, nothing prepared,
identical data, then writes resuming after one more crash. A failure names
its seed; replay it with ``python tests/sim_gens.py SEED``.

Then the simulator itself is checked: a planted bug in the state machine,
the policy or the commit cores must make some seed fail.
"""
from __future__ import annotations

import pytest

import consensus.gens as gens
import consensus.policy as policy
import replication.commit as commit
from sim_gens import RESUME_BOUND_MS, Sim, SimFailure, run_seeds

SEEDS = 10_000
CHUNK = 500


@pytest.mark.parametrize("start", range(0, SEEDS, CHUNK))
def test_seeds(start: int) -> None:
    stats = run_seeds(range(start, start + CHUNK))
    t, worst = stats["totals"], stats["max"]
    # The faults happened and the interesting paths ran: not vacuous.
    for what in ("crashes", "partitions", "stalls", "clock_jumps", "conf_changes",
                 "compactions", "snapshots_installed", "generations", "recoveries",
                 "decided_commit", "decided_abort", "forgotten", "acked", "reads",
                 "read_refused"):
        assert t.get(what, 0) > 0, (what, stats)
    assert worst["resume_follower_ms"] <= RESUME_BOUND_MS
    assert worst["resume_after_election_ms"] <= RESUME_BOUND_MS
    assert t["acked"] > CHUNK                    # clients do commit, despite the faults


def _donors_are_all_members(self, members):
    return frozenset(members)


def _decide_ignoring_precommits(gid, state, answers):
    members, configured = state.gen_def(gens.gid_gen(gid))
    fenced = (configured - members) | {n for n in answers if n in configured}
    return False if len(configured - fenced) < gens.majority(len(configured)) else None


def _exclude_without_waiting_for_leases(self, node, now_ms):
    return self._lead is not None


_applied = commit.Participant.applied


def _vote_while_not_online(self, gid, ok, sqlstate="", message=""):
    online, self.online = self.online, True
    try:
        return _applied(self, gid, ok, sqlstate, message)
    finally:
        self.online = online


def _online_before_the_marker(self, ld, state, out):
    for m in sorted(state.gen.members):
        if state.status(m) == gens.RECOVERY and ("online", m, state.gen.num) not in ld.inflight:
            out.append(gens.Online(m, state.gen.num))


_receive = commit.Participant.receive


def _precommit_past_the_fence(self, msg):
    """Records a precommit of a transaction of another generation, or while
    not ONLINE (the fence dropped)."""
    gen, online = self.generation, self.online
    if msg.__class__ is commit.Precommit and commit.parse_gid(msg.gid):
        num = commit.parse_gid(msg.gid)[1]
        self.generation = commit.Generation(num, gen.members, gen.configured)
        self.online = True
    try:
        return _receive(self, msg)
    finally:
        self.generation, self.online = gen, online


@pytest.mark.parametrize("cls,attr,bug,caught", [
    (gens.GenState, "donors_for", _donors_are_all_members, "donor .* lacks committed"),
    (policy.LeaderPolicy, "decide", staticmethod(_decide_ignoring_precommits),
     "decided abort with precommit records"),
    (policy.LeaderPolicy, "can_exclude", _exclude_without_waiting_for_leases,
     "read lease|reads"),
    (commit.Participant, "applied", _vote_while_not_online, "votes on"),
    (policy.LeaderPolicy, "_plan_online", _online_before_the_marker, "becomes ONLINE .* without"),
    (commit.Participant, "receive", _precommit_past_the_fence, "precommits"),
], ids=["donors-without-every-commit", "abort-despite-a-precommit",
        "exclusion-before-the-lease-ends", "vote-while-not-online", "online-before-the-marker",
        "precommit-past-the-fence"])
def test_simulator_catches_a_planted_bug(monkeypatch, cls, attr, bug, caught) -> None:
    """Each bug breaks one invariant (the message names it) within a few
    hundred seeds; the seed is in the message."""
    monkeypatch.setattr(cls, attr, bug)
    with pytest.raises(SimFailure, match=rf"^seed \d+ .*({caught})"):
        for seed in range(400):
            Sim(seed).run()
