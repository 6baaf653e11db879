"""The Raft core under the seeded simulator (tests/sim_raft.py).

600 seeds of faults (loss, duplication, reordering, delays, partitions,
crashes at every persistence point, membership changes, compactions),
each followed by a healed phase that must elect a leader and apply fresh
proposals everywhere within bounds. A failure names its seed; replay it
with ``python tests/sim_raft.py SEED``. Then the simulator itself is checked:
a core with a planted bug must fail it.
"""
from __future__ import annotations

import pytest

import consensus.raft as raft
from sim_raft import Sim, SimFailure, run_seeds

SEEDS = 600
CHUNK = 100


@pytest.mark.parametrize("start", range(0, SEEDS, CHUNK))
def test_seeds(start: int) -> None:
    stats = run_seeds(range(start, start + CHUNK))
    ev = stats["events"]
    # The faults did happen: the run is not vacuous.
    assert stats["crashes"] > 0 and stats["conf_changes_applied"] > 0
    assert ev.get("snapshot_restored", 0) > 0 and ev.get("stepped_down", 0) > 0
    assert ev.get("leader_removed", 0) > 0 and ev.get("vote_ignored_in_lease", 0) > 0


def _grant_without_recording(self, m):
    resp = raft.MsgType.VOTE_RESP if m.type is raft.MsgType.VOTE else raft.MsgType.PRE_VOTE_RESP
    self._send(m.frm, resp, term=m.term)        # the vote is never recorded, nor persisted


def _no_log_check(self, index, term):
    return True                                 # votes for any log (Raft paper 5.4.1 dropped)


def _heartbeat_commits_everything(self):
    saved = {i: p.match for i, p in self._prs.items()}
    for p in self._prs.values():                # heartbeats carry the leader's commit
        p.match = max(p.match, self._committed)
    try:
        _tick_leader(self)
    finally:
        for i, p in self._prs.items():
            p.match = saved.get(i, p.match)


_tick_leader = raft.RaftNode._tick_leader


@pytest.mark.parametrize("attr,bug", [
    ("_handle_vote_request", _grant_without_recording),
    ("_is_up_to_date", _no_log_check),
    ("_tick_leader", _heartbeat_commits_everything),
], ids=["vote-not-persisted", "no-up-to-date-check", "heartbeat-commit"])
def test_simulator_catches_a_planted_bug(monkeypatch, attr, bug) -> None:
    monkeypatch.setattr(raft.RaftNode, attr, bug)
    with pytest.raises((SimFailure, AssertionError)):
        for seed in range(50):
            Sim(seed).run()
