"""The Raft core (consensus/raft.py) and its storage (consensus/storage.py).

- the golden interaction scripts, tests/raft_scripts/*.txt (``REWRITE=1``
  rewrites their expected output: read the diff before committing it);
- unit tests of the core, on nodes built from a RestoredState and a tiny
  in-test network, and on the scripts' Cluster;
- the wire codec fed whole, byte by byte (every prefix), with trailing
  bytes, and mutated at random;
- FileStorage: round trip, torn and corrupt tails, suffix replacement,
  compaction, snapshot installation, crashes between the durable steps, and
  the fsyncs it makes (os.fsync counted).
"""
from __future__ import annotations

import os
import random
import struct
import time
import zlib
from pathlib import Path

import pytest

from consensus.raft import (ConfChange, ConfChangeRefused, ConfChangeType, DecodeError,
                            Entry, EntryType, HardState, Message, MsgType, NotLeader,
                            ProgressState, ProposalDropped, RaftNode, Ready, RestoredState, Role,
                            Snapshot, decode_conf_change, decode_message, decode_snapshot,
                            encode_message, encode_snapshot)
from consensus.storage import FileStorage, MemoryStorage, StorageError, reconcile
from raft_script import Cluster, render, run_script

SCRIPTS = Path(__file__).resolve().parent / "raft_scripts"


# -- golden scripts -----------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(SCRIPTS.glob("*.txt")), ids=lambda p: p.stem)
def test_script(path: Path) -> None:
    blocks, trailer = run_script(path)
    if os.environ.get("REWRITE"):
        path.write_text(render(blocks, trailer))
        return
    for b in blocks:
        assert b.actual == b.expected, (
            f"{path.name}: `{b.command}`\n--- expected\n{b.expected}\n--- actual\n{b.actual}")


def test_there_are_enough_scripts() -> None:
    assert len(list(SCRIPTS.glob("*.txt"))) >= 8


# -- helpers ------------------------------------------------------------------------------------

def mknode(nid: int, voters=(1, 2, 3), terms=(), *, term: int | None = None, vote: int = 0,
           commit: int = 0, learners=(), snapshot: Snapshot | None = None, **kw) -> RaftNode:
    """A node restored with one entry per term in ``terms`` (after ``snapshot``)."""
    base = snapshot.index if snapshot else 0
    entries = tuple(Entry(base + i + 1, t) for i, t in enumerate(terms))
    if term is None:
        term = terms[-1] if terms else (snapshot.term if snapshot else 0)
    return RaftNode(nid, voters=voters, learners=learners,
                    state=RestoredState(HardState(term, vote, commit), snapshot, entries),
                    rng=random.Random(nid), **kw)


class Net:
    """Nodes and the messages between them, without storage: enough for the
    core's own behaviour. ``drop`` filters (frm, to) pairs."""

    def __init__(self, *nodes: RaftNode) -> None:
        self.nodes = {n.id: n for n in nodes}
        self.inflight: list[Message] = []
        self.delivered: list[Message] = []
        self.applied: dict[int, list[Entry]] = {n.id: [] for n in nodes}

    def ready(self, nid: int) -> Ready | None:
        n = self.nodes[nid]
        if not n.has_ready():
            return None
        rd = n.ready()
        self.inflight += rd.messages
        for e in rd.committed_entries:
            self.applied[nid].append(e)
            if e.type is EntryType.CONF_CHANGE:
                n.apply_conf_change(decode_conf_change(e.data))
        n.advance(rd)
        return rd

    def flush(self) -> None:
        for nid in sorted(self.nodes):
            while self.ready(nid):
                pass

    def deliver(self, drop=lambda m: False) -> int:
        msgs, self.inflight = self.inflight, []
        for m in msgs:
            if m.to in self.nodes and not drop(m):
                self.delivered.append(m)
                self.nodes[m.to].step(m)
        return len(msgs)

    def stabilize(self, drop=lambda m: False, rounds: int = 100) -> None:
        for _ in range(rounds):
            self.flush()
            if not self.deliver(drop):
                return
        raise AssertionError("no fixpoint")

    def elect(self, nid: int) -> None:
        self.nodes[nid].campaign()
        self.stabilize()
        assert self.nodes[nid].role is Role.LEADER


def run(c: Cluster, *cmds: str) -> str:
    return "\n".join(c.run(cmd) for cmd in cmds)


def three() -> Cluster:
    c = Cluster()
    run(c, "add-nodes 3 voters=(1,2,3)", "campaign 1", "stabilize")
    assert c.core(1).role is Role.LEADER
    return c


# -- elections ----------------------------------------------------------------------------------

def test_single_voter_commits_alone_in_one_ready() -> None:
    n = mknode(1, voters=(1,))
    n.campaign()
    assert n.role is Role.LEADER and n.term == 1
    idx = n.propose(b"x")
    rd = n.ready()
    # Persist, then apply: the entries and the commit that covers them come together.
    assert [e.index for e in rd.entries] == [1, idx]
    assert rd.hard_state == HardState(1, 1, idx)
    assert [e.index for e in rd.committed_entries] == [1, idx]
    assert rd.messages == ()
    n.advance(rd)
    assert not n.has_ready()


def test_election_timeout_is_randomized_in_range() -> None:
    for seed in range(30):
        n = RaftNode(1, voters={1, 2, 3}, state=None, rng=random.Random(seed), election_ticks=10)
        ticks = 0
        while n.role is Role.FOLLOWER:
            n.tick()
            ticks += 1
        assert n.role is Role.PRE_CANDIDATE
        assert 10 <= ticks < 20


def test_prevote_keeps_a_rejoining_node_from_disrupting_the_leader() -> None:
    for pre_vote, disrupted in ((True, False), (False, True)):
        opts = "" if pre_vote else " pre-vote=false check-quorum=false"
        c = Cluster()
        run(c, f"add-nodes 3 voters=(1,2,3){opts}", "campaign 1", "stabilize",
            "partition 1 2 | 3", "tick 3 60", "stabilize")
        assert c.core(3).term == (1 if pre_vote else c.core(3).term)
        if pre_vote:
            assert c.core(3).role is Role.PRE_CANDIDATE
        else:
            assert c.core(3).term > 2
        run(c, "heal", "tick 3 30", "stabilize", "tick-heartbeat 1", "stabilize")
        assert (c.core(1).role is not Role.LEADER) == disrupted, pre_vote
        if not disrupted:
            assert [c.core(i).term for i in (1, 2, 3)] == [1, 1, 1]
            assert c.core(3).leader == 1


def test_check_quorum_steps_down_an_isolated_leader() -> None:
    for check_quorum in (True, False):
        c = Cluster()
        opts = "" if check_quorum else " check-quorum=false"
        run(c, f"add-nodes 3 voters=(1,2,3){opts}", "campaign 1", "stabilize",
            "partition 1 | 2 3", "tick 1 20", "stabilize")
        assert (c.core(1).role is Role.LEADER) == (not check_quorum)


def test_a_quorum_heard_within_the_election_timeout_keeps_the_leader() -> None:
    c = three()
    run(c, "partition 1 | 3")       # 2 still answers: 1 and 2 are a quorum
    for _ in range(25):
        run(c, "tick-heartbeat 1", "stabilize")
    assert c.core(1).role is Role.LEADER
    assert c.core(1).voters_heard_within(10) == {1, 2}
    assert c.core(1).quorum_contact_ticks() <= 2


def test_stale_leader_learns_the_new_term_from_an_append_response() -> None:
    old = mknode(1, terms=(1,), term=1)
    old.campaign()
    net = Net(old, mknode(2, terms=(1,), term=1))
    old.step(Message(MsgType.PRE_VOTE_RESP, 2, 1, 2))
    old.step(Message(MsgType.PRE_VOTE_RESP, 3, 1, 2))
    net.stabilize(drop=lambda m: m.to == 3)
    assert old.role is Role.LEADER and old.term == 2
    # Node 2 moved on to term 5 meanwhile: the old leader's next append gets
    # an APP_RESP of term 5 back, and it steps down.
    net.nodes[2] = mknode(2, terms=(1,), term=5)
    old.propose(b"x")
    net.stabilize(drop=lambda m: m.to == 3)
    assert old.role is Role.FOLLOWER and old.term == 5


def test_votes_need_an_up_to_date_log() -> None:
    # Raft paper 5.4.1: last term first, then last index.
    n = mknode(2, terms=(1, 2, 2))
    n.step(Message(MsgType.VOTE, 1, 2, 3, log_term=2, index=2))
    n.step(Message(MsgType.VOTE, 3, 2, 3, log_term=1, index=9))
    n.step(Message(MsgType.VOTE, 1, 2, 3, log_term=2, index=3))
    rd = n.ready()
    assert [(m.to, m.reject) for m in rd.messages] == [(1, True), (3, True), (1, False)]
    assert rd.hard_state.vote == 1


def test_a_vote_is_given_once_per_term() -> None:
    n = mknode(2, terms=(1,))
    n.step(Message(MsgType.VOTE, 1, 2, 2, log_term=1, index=1))
    n.step(Message(MsgType.VOTE, 3, 2, 2, log_term=1, index=1))
    n.step(Message(MsgType.VOTE, 1, 2, 2, log_term=1, index=1))   # a duplicate: granted again
    rd = n.ready()
    assert [(m.to, m.reject) for m in rd.messages] == [(1, False), (3, True), (1, False)]


# -- replication --------------------------------------------------------------------------------

def test_conflict_hint_skips_a_whole_term_in_one_rejection() -> None:
    leader = mknode(1, terms=(1, 1, 2, 2, 2, 3, 3), term=4)
    follower = mknode(2, terms=(1, 1, 1, 1, 1, 1, 1, 1, 1), term=4)
    net = Net(leader, follower)
    leader.campaign()
    for v in (2, 3):
        leader.step(Message(MsgType.PRE_VOTE_RESP, v, 1, 5))
    for v in (2, 3):
        leader.step(Message(MsgType.VOTE_RESP, v, 1, 5))
    assert leader.role is Role.LEADER
    net.inflight.clear()
    net.stabilize(drop=lambda m: m.to == 3)
    rejects = [m for m in net.delivered if m.type is MsgType.APP_RESP and m.reject]
    assert len(rejects) == 1, rejects
    assert follower.entries(1, follower.last_index + 1) == leader.entries(1, 9)


def test_commit_only_of_own_term_entries_by_counting_replicas() -> None:
    # Raft paper Figure 8 (c): 2/1 is on a majority under leader 1 of term 3,
    # but its term is not 3, so it stays uncommitted until 3/3 is replicated.
    n1 = mknode(1, voters=(1, 2, 3, 4, 5), terms=(1, 1), term=2)
    n1.campaign()
    for v in (2, 3):
        n1.step(Message(MsgType.PRE_VOTE_RESP, v, 1, 3))
    for v in (2, 3):
        n1.step(Message(MsgType.VOTE_RESP, v, 1, 3))
    assert n1.role is Role.LEADER and n1.last_index == 3
    n1.ready()
    n1.advance(n1._outstanding)
    n1.step(Message(MsgType.APP_RESP, 2, 1, 3, index=2))
    n1.step(Message(MsgType.APP_RESP, 3, 1, 3, index=2))
    assert n1.commit == 0       # 2/1 on 1, 2, 3: not by counting
    n1.step(Message(MsgType.APP_RESP, 2, 1, 3, index=3))
    assert n1.commit == 0       # 3/3 on 1 and 2 only
    n1.step(Message(MsgType.APP_RESP, 3, 1, 3, index=3))
    assert n1.commit == 3       # 3/3 on a majority commits 1..3


def test_heartbeat_carries_min_of_match_and_commit() -> None:
    c = three()
    run(c, "partition 1 2 | 3", "propose 1 x", "stabilize")
    assert c.core(1).commit == 2
    c.core(1).tick()
    c.core(1).tick()
    rd = c.core(1).ready()
    beats = {m.to: m.commit for m in rd.messages if m.type is MsgType.HEARTBEAT}
    c.core(1).advance(rd)
    assert beats == {2: 2, 3: 1}


def test_flow_control_bounds_inflight_appends() -> None:
    leader = mknode(1, voters=(1, 2), terms=(1,), term=1, commit=1,
                    max_entries_per_msg=1, max_inflight_msgs=2)
    net = Net(leader, mknode(2, voters=(1, 2), terms=(1,), term=1, commit=1))
    net.elect(1)
    for i in range(10):
        leader.propose(b"%d" % i)
    rd = leader.ready()
    apps = [m for m in rd.messages if m.type is MsgType.APP and m.to == 2]
    leader.advance(rd)
    assert len(apps) == 2 and all(len(m.entries) == 1 for m in apps)
    assert leader.progress[2].paused
    net.inflight = list(apps)
    net.stabilize()
    assert net.nodes[2].commit == leader.last_index == leader.commit


def test_batching_proposals_between_readies_share_one_append() -> None:
    c = three()
    for i in range(5):
        c.core(1).propose(b"p%d" % i)
    rd = c.core(1).ready()
    apps = [m for m in rd.messages if m.type is MsgType.APP]
    c.core(1).advance(rd)
    assert [(m.to, len(m.entries)) for m in apps] == [(2, 5), (3, 5)]


def test_lost_snapshot_is_sent_again_after_election_ticks() -> None:
    snap = Snapshot(5, 1, frozenset({1, 2, 3}), frozenset(), b"s")
    leader = mknode(1, terms=(1,), commit=6, snapshot=snap)
    net = Net(leader, mknode(2, terms=(1,), commit=6, snapshot=snap), mknode(3))
    leader.campaign()
    net.stabilize(drop=lambda m: m.type is MsgType.SNAP)
    assert leader.role is Role.LEADER
    assert leader.progress[3].state is ProgressState.SNAPSHOT
    sent = [m for m in net.delivered if m.to == 3 and m.type is MsgType.APP]
    for _ in range(2 * 10):
        leader.tick()
        net.stabilize(drop=lambda m: m.type is MsgType.SNAP)
    # Paused while the snapshot may be in flight: no append to 3 meanwhile.
    assert [m for m in net.delivered if m.to == 3 and m.type is MsgType.APP] == sent
    assert leader.progress[3].state is ProgressState.SNAPSHOT   # sent again, lost again
    for _ in range(10):
        leader.tick()
        net.stabilize()
    assert net.nodes[3].snapshot_index == 5 and net.nodes[3].commit == leader.commit == 7


# -- membership ---------------------------------------------------------------------------------

def test_conf_change_refused_before_the_leader_commits_its_own_term() -> None:
    n = mknode(1, voters=(1, 2, 3), terms=(1, 1), term=1, commit=2)
    n.campaign()
    for v in (2, 3):
        n.step(Message(MsgType.PRE_VOTE_RESP, v, 1, 2))
        n.step(Message(MsgType.VOTE_RESP, v, 1, 2))
    assert n.role is Role.LEADER and n.pending_conf_index == 3
    # Everything of term 1 is committed, but not the empty entry of term 2.
    with pytest.raises(ConfChangeRefused, match="first entry of its term 2"):
        n.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    n.advance(n.ready())
    n.step(Message(MsgType.APP_RESP, 2, 1, 2, index=3))
    # Committed, but not yet applied (handed out and advanced).
    with pytest.raises(ConfChangeRefused):
        n.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    n.advance(n.ready())
    assert n.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4)) == 4
    with pytest.raises(ConfChangeRefused, match="not yet applied"):
        n.propose_conf_change(ConfChange(ConfChangeType.REMOVE, 3))


def test_learner_promotion_changes_the_quorum() -> None:
    c = three()
    run(c, "conf-change 1 add-learner 4", "stabilize")
    assert c.core(1).learners == {4} and c.core(4).learners == {4}
    # A learner does not count: with 2 and 3 away, 4 alone cannot commit.
    run(c, "partition 1 4 | 2 3", "propose 1 a", "stabilize")
    assert c.core(1).commit < c.core(1).last_index
    run(c, "heal", "tick-heartbeat 1", "stabilize")
    run(c, "conf-change 1 add-voter 4", "stabilize")
    assert c.core(1).voters == {1, 2, 3, 4}
    # Four voters: 1 and 4 are not a quorum any more, 1, 2 and 4 are.
    run(c, "partition 1 4 | 2 3", "propose 1 b", "stabilize")
    assert c.core(1).commit < c.core(1).last_index
    run(c, "partition 1 2 4 | 3", "tick-heartbeat 1", "stabilize")
    assert c.core(1).commit == c.core(1).last_index


def test_removed_follower_gets_nothing_and_cannot_campaign() -> None:
    c = three()
    run(c, "conf-change 1 remove 3", "stabilize")
    assert c.core(1).voters == {1, 2}
    run(c, "tick-heartbeat 1", "process-ready 1")
    assert not [m for m in c.net if m.to == 3]
    run(c, "stabilize")
    for _ in range(5):
        run(c, "tick-election 3")
    assert c.core(3).role is Role.FOLLOWER and c.core(3).term == 1


def test_removing_the_leader_hands_over_and_steps_down() -> None:
    c = three()
    run(c, "conf-change 1 remove 1")
    with pytest.raises(ProposalDropped, match="being removed"):
        c.core(1).propose(b"x")
    run(c, "stabilize")
    assert c.core(1).role is Role.FOLLOWER
    assert c.core(2).role is Role.LEADER and c.core(2).voters == {2, 3}
    assert c.core(2).term == 2
    run(c, "propose 2 y", "stabilize")
    assert c.core(3).commit == c.core(2).commit == c.core(2).last_index


def test_new_leader_with_its_own_removal_in_the_log_refuses_proposals() -> None:
    cc = ConfChange(ConfChangeType.REMOVE, 1).encode()
    entries = (Entry(1, 1), Entry(2, 1, EntryType.CONF_CHANGE, cc))
    n = RaftNode(1, voters={1, 2, 3}, state=RestoredState(HardState(1, 0, 1), None, entries),
                 rng=random.Random(1))
    n.campaign()
    for v in (2, 3):
        n.step(Message(MsgType.PRE_VOTE_RESP, v, 1, 2))
        n.step(Message(MsgType.VOTE_RESP, v, 1, 2))
    assert n.role is Role.LEADER
    with pytest.raises(ProposalDropped, match="being removed"):
        n.propose(b"x")


def test_conf_change_must_be_applied_in_order_before_advance() -> None:
    c = three()
    run(c, "stabilize")
    core = c.core(1)
    core.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    # deliver by hand to see the committed conf entry
    for _ in range(3):
        run(c, "process-ready 2 3", "deliver-msgs")
        if core.has_ready():
            rd = core.ready()
            c.net.extend(rd.messages)
            if rd.committed_entries:
                break
            core.advance(rd)
    with pytest.raises(RuntimeError, match="apply_conf_change"):
        core.advance(rd)
    with pytest.raises(ValueError):
        core.apply_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 5))
    core.apply_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    core.advance(rd)
    with pytest.raises(RuntimeError):
        core.apply_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))


def test_committed_unapplied_conf_change_defers_a_campaign() -> None:
    cc = ConfChange(ConfChangeType.ADD_VOTER, 4).encode()
    entries = (Entry(1, 1), Entry(2, 1, EntryType.CONF_CHANGE, cc))
    n = RaftNode(1, voters={1, 2, 3}, state=RestoredState(HardState(1, 0, 2), None, entries),
                 rng=random.Random(1))
    n.campaign()
    assert n.role is Role.FOLLOWER
    rd = n.ready()
    n.apply_conf_change(ConfChange(ConfChangeType.ADD_VOTER, 4))
    n.advance(rd)
    n.campaign()
    assert n.role is Role.PRE_CANDIDATE
    assert sorted(m.to for m in n.ready().messages) == [2, 3, 4]


# -- learners -----------------------------------------------------------------------------------

def test_learners_never_campaign_nor_count() -> None:
    lrn = mknode(3, voters=(1, 2), learners=(3,))
    for _ in range(100):
        lrn.tick()
    lrn.campaign()
    assert lrn.role is Role.FOLLOWER and not lrn.has_ready()
    cand = mknode(1, voters=(1, 2), learners=(3,))
    cand.campaign()
    assert [m.to for m in cand.ready().messages] == [2]
    cand.advance(cand._outstanding)
    # A granted pre-vote from the learner does not count.
    cand.step(Message(MsgType.PRE_VOTE_RESP, 3, 1, 1))
    assert cand.role is Role.PRE_CANDIDATE
    cand.step(Message(MsgType.PRE_VOTE_RESP, 2, 1, 1))
    assert cand.role is Role.CANDIDATE
    cand.step(Message(MsgType.VOTE_RESP, 3, 1, 1))
    assert cand.role is Role.CANDIDATE


# -- compaction and snapshots -------------------------------------------------------------------

def test_snapshot_records_the_membership_at_its_index() -> None:
    c = three()
    run(c, "propose 1 a", "stabilize")                  # index 2
    run(c, "conf-change 1 add-learner 4", "stabilize")  # index 3
    run(c, "propose 1 b", "stabilize")                  # index 4
    h = c.nodes[1]
    snap = c.core(1).compact(2, b"state at 2")
    assert (snap.voters, snap.learners) == ({1, 2, 3}, frozenset())
    snap = c.core(1).compact(4, h.state_data)
    assert (snap.voters, snap.learners) == ({1, 2, 3}, {4})
    assert c.core(1).first_index == 5


def test_lagging_follower_installs_the_snapshot() -> None:
    c = three()
    run(c, "partition 1 2 | 3", "propose 1 a", "propose 1 b", "stabilize")
    snap = c.core(1).compact(3, c.nodes[1].state_data)
    c.nodes[1].storage.compact(snap)
    with pytest.raises(ValueError):
        c.core(1).compact(3, b"")
    run(c, "heal", "tick-heartbeat 1")
    for _ in range(10):
        run(c, "process-ready 1 2")
        if [m for m in c.net if m.type is MsgType.SNAP]:
            break
        run(c, "deliver-msgs 1 2", "process-ready 3", "deliver-msgs 3")
    run(c, "deliver-msgs 3")
    applied_before = list(c.nodes[3].applied)
    out = run(c, "process-ready 3")
    assert "snapshot: 3/1" in out and "hard: term=1 vote=1 commit=3" in out
    assert c.nodes[3].storage.snapshot == snap and c.nodes[3].state_data == snap.data
    assert c.nodes[3].applied == applied_before         # the snapshot replaces them
    assert c.core(3).snapshot_index == 3 and c.core(3).last_index == 3
    run(c, "stabilize", "propose 1 c", "stabilize")
    assert c.core(3).commit == 4 and c.nodes[3].applied[-1][2] == b"c"


def test_snapshot_matching_the_log_only_moves_the_commit() -> None:
    n = mknode(2, terms=(1, 1, 1, 1), term=1, commit=1)
    s = Snapshot(3, 1, frozenset({1, 2, 3}), frozenset(), b"")
    n.step(Message(MsgType.SNAP, 1, 2, 1, snapshot=s))
    rd = n.ready()
    assert rd.snapshot is None and n.last_index == 4 and n.commit == 3
    assert [m.index for m in rd.messages] == [3]


# -- the Ready contract and restarts ------------------------------------------------------------

def test_mutations_while_a_ready_is_outstanding_are_refused() -> None:
    n = mknode(1, voters=(1,))
    n.campaign()
    rd = n.ready()
    for call in (n.tick, n.campaign, lambda: n.propose(b"x"), n.ready,
                 lambda: n.step(Message(MsgType.HEARTBEAT, 2, 1, 1))):
        with pytest.raises(RuntimeError, match="outstanding"):
            call()
    assert not n.has_ready()
    with pytest.raises(RuntimeError):
        n.advance(Ready(None, (), None, (), (), None))
    n.advance(rd)


def test_committed_entries_are_handed_out_once_in_bounded_batches() -> None:
    n = mknode(1, voters=(1,), max_committed_entries_per_ready=3)
    n.campaign()
    n.advance(n.ready())
    for i in range(10):
        n.propose(b"%d" % i)
    seen = []
    while n.has_ready():
        rd = n.ready()
        assert len(rd.committed_entries) <= 3
        seen += [e.index for e in rd.committed_entries]
        n.advance(rd)
    assert seen == list(range(2, 12))


def test_heartbeats_need_no_sync() -> None:
    c = three()
    run(c, "stabilize")
    c.core(1).tick()
    c.core(1).tick()
    rd = c.core(1).ready()
    assert rd.messages and not rd.must_sync
    c.core(1).advance(rd)
    c.core(2).step(rd.messages[0])
    rd2 = c.core(2).ready()
    assert rd2.messages and not rd2.must_sync
    c.core(2).advance(rd2)


def test_restart_takes_the_term_of_entries_saved_before_the_hard_state() -> None:
    # A crash between the entries and the hard state of one save: term 3
    # entries are durable, the hard state still says term 2 with a vote.
    n = mknode(2, terms=(1, 3), term=2, vote=1, commit=1)
    assert n.term == 3 and n.vote == 0
    rd = n.ready()
    assert rd.hard_state == HardState(3, 0, 1)      # written before any message


def test_restart_refuses_a_commit_beyond_the_log() -> None:
    with pytest.raises(ValueError, match="beyond"):
        mknode(1, terms=(1,), commit=2)


def test_check_invariants_catches_a_broken_state() -> None:
    n = mknode(1, terms=(1, 1), commit=1)
    n._committed = 5
    with pytest.raises(AssertionError, match="commit"):
        n.check_invariants()


def test_not_leader_names_the_leader_and_bounds_hold() -> None:
    c = three()
    with pytest.raises(NotLeader) as e:
        c.core(2).propose(b"x")
    assert e.value.leader == 1
    with pytest.raises(NotLeader) as e:
        mknode(5).propose(b"x")
    assert e.value.leader is None
    n = mknode(1, voters=(1, 2, 3), max_uncommitted_entries=3)
    n.campaign()
    for v in (2, 3):
        n.step(Message(MsgType.PRE_VOTE_RESP, v, 1, 1))
        n.step(Message(MsgType.VOTE_RESP, v, 1, 1))
    n.propose(b"a")
    n.propose(b"b")
    with pytest.raises(ProposalDropped, match="uncommitted"):
        n.propose(b"c")


def test_leader_contact_information() -> None:
    c = three()
    assert c.core(2).ticks_since_leader_contact == 0
    c.core(2).tick()
    c.core(2).tick()
    assert c.core(2).ticks_since_leader_contact == 2
    assert c.core(1).ticks_since_leader_contact == 0
    assert mknode(9).ticks_since_leader_contact is None


# -- the wire codec -----------------------------------------------------------------------------

def _samples() -> list[Message]:
    snap = Snapshot(9, 3, frozenset({1, 2, 3}), frozenset({7}), b"\x00state" * 10)
    cc = ConfChange(ConfChangeType.ADD_LEARNER, 7).encode()
    return [
        Message(MsgType.APP, 1, 2, 3, log_term=2, index=4, commit=4,
                entries=(Entry(5, 2, EntryType.NORMAL, b"x"), Entry(6, 3),
                         Entry(7, 3, EntryType.CONF_CHANGE, cc), Entry(8, 3, data=b"y" * 300))),
        Message(MsgType.APP, 1, 2, 3, log_term=3, index=8, commit=8),
        Message(MsgType.APP_RESP, 2, 1, 3, index=8),
        Message(MsgType.APP_RESP, 2, 1, 3, index=8, reject=True, reject_hint=6, log_term=2),
        Message(MsgType.VOTE, 3, 1, 4, index=8, log_term=3, transfer=True),
        Message(MsgType.VOTE_RESP, 1, 3, 4, reject=True),
        Message(MsgType.PRE_VOTE, 3, 1, 5, index=8, log_term=3),
        Message(MsgType.PRE_VOTE_RESP, 1, 3, 5),
        Message(MsgType.HEARTBEAT, 1, 2, 1 << 40, commit=(1 << 63) + 5),
        Message(MsgType.HEARTBEAT_RESP, 2, 1, 3),
        Message(MsgType.SNAP, 1, 2, 3, snapshot=snap),
        Message(MsgType.TIMEOUT_NOW, 1, 2, 3),
    ]


def test_codec_round_trip() -> None:
    for m in _samples():
        assert decode_message(encode_message(m)) == m
    assert len(encode_message(Message(MsgType.HEARTBEAT, 1, 2, 7, commit=100))) <= 14


def test_codec_every_prefix_and_trailing_bytes_are_refused() -> None:
    for m in _samples():
        wire = encode_message(m)
        for i in range(len(wire)):
            with pytest.raises(DecodeError):
                decode_message(wire[:i])
        with pytest.raises(DecodeError):
            decode_message(wire + b"\x00")
        decode_message(bytearray(wire))
        decode_message(memoryview(wire))


def test_codec_mutations_raise_only_decode_error() -> None:
    rng = random.Random(7)
    wires = [encode_message(m) for m in _samples()]
    accepted = 0
    for _ in range(20000):
        w = bytearray(rng.choice(wires))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            if op == 0:
                w[rng.randrange(len(w))] = rng.randrange(256)
            elif op == 1 and len(w) > 1:
                del w[rng.randrange(len(w))]
            else:
                w.insert(rng.randrange(len(w) + 1), rng.randrange(256))
        try:
            m = decode_message(bytes(w))
        except DecodeError:
            continue
        accepted += 1
        assert decode_message(encode_message(m)) == m
    for _ in range(5000):
        try:
            decode_message(bytes(rng.randrange(256) for _ in range(rng.randrange(40))))
        except DecodeError:
            pass
    assert accepted > 0


@pytest.mark.parametrize("wire,why", [
    (b"\x02\x07\x00\x01\x02\x01\x00\x00\x00\x00\x00", "version"),
    (b"\x01\x63\x00\x01\x02\x01\x00\x00\x00\x00\x00", "type"),
    (b"\x01\x07\x80\x01\x02\x01\x00\x00\x00\x00\x00", "flags"),
    (b"\x01\x07\x00\x00\x02\x01\x00\x00\x00\x00\x00", "positive"),
    (b"\x01\x07\x00\x01\x02\x01\x05\x00\x00\x00\x00", "log term"),
    (b"\x01\x07\x00\x01\x02\x01\x00\x00\x00\x00\x01\x01\x00\x00", "carries no entries"),
    (b"\x01\x07\x00\x01\x02" + b"\xff" * 10 + b"\x01\x00\x00\x00\x00\x00", "varint"),
    (b"\x01\x01\x00\x01\x02\x01\x00\x00\x00\x00\x01\x02\x00\x00", "terms"),
    (b"\x01\x01\x00\x01\x02\x01\x00\x00\x00\x00\x01\x01\x01\x00", "conf change"),
    (b"\x01\x09\x00\x01\x02\x01\x00\x00\x00\x00\x00", "snapshot"),
])
def test_codec_refuses_malformed(wire: bytes, why: str) -> None:
    with pytest.raises(DecodeError, match=why):
        decode_message(wire)


def test_snapshot_and_conf_change_codecs() -> None:
    s = Snapshot(5, 2, frozenset({1, 2}), frozenset({3}), b"data")
    assert decode_snapshot(encode_snapshot(s)) == s
    for bad in (b"", b"\x01", encode_snapshot(s) + b"x",
                encode_snapshot(Snapshot(5, 2, frozenset({1}), frozenset({1}), b""))):
        with pytest.raises(DecodeError):
            decode_snapshot(bad)
    for t in ConfChangeType:
        cc = ConfChange(t, 300)
        assert decode_conf_change(cc.encode()) == cc
    for bad in (b"", b"\x01\x09\x01", b"\x01\x01\x00", b"\x02\x01\x01", b"\x01\x01\x01\x00"):
        with pytest.raises(DecodeError):
            decode_conf_change(bad)


# -- storage ------------------------------------------------------------------------------------

def ready(*, hs: HardState | None = None, entries=(), snapshot: Snapshot | None = None,
          messages=()) -> Ready:
    return Ready(hs, tuple(entries), snapshot, (), tuple(messages), None)


def ents(first: int, *terms: int) -> list[Entry]:
    return [Entry(first + i, t, EntryType.NORMAL, b"e%d" % (first + i))
            for i, t in enumerate(terms)]


@pytest.fixture
def fsyncs(monkeypatch):
    """Counts os.fsync calls (the storage calls it through the os module)."""
    calls = []
    real = os.fsync

    def counting(fd):
        calls.append(fd)
        return real(fd)
    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_file_storage_round_trip(tmp_path: Path) -> None:
    st = FileStorage(tmp_path / "n1")
    assert st.load() == RestoredState(HardState(), None, ())
    st.save(ready(hs=HardState(2, 1, 3), entries=ents(1, 1, 1, 2, 2)))
    st.close()
    state = FileStorage(tmp_path / "n1").load()
    assert state == RestoredState(HardState(2, 1, 3), None, tuple(ents(1, 1, 1, 2, 2)))


def test_file_storage_fsyncs_each_durable_step(tmp_path: Path, fsyncs) -> None:
    st = FileStorage(tmp_path)
    st.load()
    fsyncs.clear()
    st.save(ready(entries=ents(1, 1, 1, 1)))
    assert len(fsyncs) == 1                         # one batch, one fsync
    fsyncs.clear()
    st.save(ready(hs=HardState(1, 1, 2)))
    assert len(fsyncs) == 2                         # the tmp file, then the directory
    fsyncs.clear()
    st.save(ready(messages=[Message(MsgType.HEARTBEAT, 1, 2, 1)]))
    assert fsyncs == []                             # heartbeats write nothing
    st.save(ready(entries=ents(3, 2)))              # replaces 3: cut, fsync, append, fsync
    assert len(fsyncs) == 2


def test_file_storage_drops_a_torn_tail(tmp_path: Path) -> None:
    st = FileStorage(tmp_path)
    st.load()
    st.save(ready(entries=ents(1, 1, 1, 1)))
    st.close()
    log = tmp_path / "log"
    good = log.read_bytes()
    # A crash in the middle of the next append: half a record.
    record = struct.pack(">QQB", 4, 1, 0) + b"e4"
    torn = struct.pack(">II", len(record), zlib.crc32(record)) + record
    log.write_bytes(good + torn[:len(torn) // 2])
    st = FileStorage(tmp_path)
    assert [e.index for e in st.load().entries] == [1, 2, 3]
    assert log.read_bytes() == good                 # cut off the file too
    st.save(ready(entries=ents(4, 2)))
    st.close()
    assert [(e.index, e.term) for e in FileStorage(tmp_path).load().entries] == \
        [(1, 1), (2, 1), (3, 1), (4, 2)]
    # Zeros where the file grew but the data never made it are torn too.
    log.write_bytes(log.read_bytes() + b"\x00" * 64)
    assert len(FileStorage(tmp_path).load().entries) == 4


def test_file_storage_drops_everything_after_a_bad_record(tmp_path: Path) -> None:
    st = FileStorage(tmp_path)
    st.load()
    st.save(ready(entries=ents(1, 1, 1, 1, 1)))
    st.close()
    log = tmp_path / "log"
    data = bytearray(log.read_bytes())
    rec = (len(data) - 8) // 5
    data[8 + 2 * rec + 12] ^= 0xFF                  # the third record's payload
    log.write_bytes(bytes(data))
    assert [e.index for e in FileStorage(tmp_path).load().entries] == [1, 2]


def test_file_storage_replaces_a_suffix(tmp_path: Path) -> None:
    st = FileStorage(tmp_path)
    st.load()
    st.save(ready(entries=ents(1, 1, 1, 1, 1, 1)))
    st.save(ready(entries=ents(3, 2, 2)))
    st.save(ready(entries=ents(5, 3)))
    with pytest.raises(StorageError):
        st.save(ready(entries=ents(9, 3)))
    st.close()
    got = FileStorage(tmp_path).load().entries
    assert [(e.index, e.term) for e in got] == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)]


def test_file_storage_compaction(tmp_path: Path, fsyncs) -> None:
    st = FileStorage(tmp_path)
    st.load()
    st.save(ready(hs=HardState(1, 1, 4), entries=ents(1, 1, 1, 1, 1, 1)))
    snap = Snapshot(4, 1, frozenset({1, 2, 3}), frozenset(), b"state")
    fsyncs.clear()
    st.compact(snap)
    assert len(fsyncs) == 4                         # snapshot tmp + dir, log tmp + dir
    st.save(ready(entries=ents(6, 2, 2)))
    st.close()
    state = FileStorage(tmp_path).load()
    assert state.snapshot == snap
    assert [(e.index, e.term) for e in state.entries] == [(5, 1), (6, 2), (7, 2)]
    # and again, compacting everything
    st = FileStorage(tmp_path)
    st.load()
    st.compact(Snapshot(7, 2, frozenset({1, 2, 3}), frozenset(), b"s7"))
    st.save(ready(entries=ents(8, 2)))
    st.close()
    state = FileStorage(tmp_path).load()
    assert state.snapshot.index == 7 and [e.index for e in state.entries] == [8]


def test_file_storage_installs_a_snapshot(tmp_path: Path) -> None:
    st = FileStorage(tmp_path)
    st.load()
    st.save(ready(hs=HardState(1, 1, 2), entries=ents(1, 1, 1, 1)))
    snap = Snapshot(10, 3, frozenset({1, 2, 3}), frozenset({4}), b"s10")
    st.save(ready(hs=HardState(3, 0, 10), snapshot=snap, entries=ents(11, 3)))
    st.close()
    state = FileStorage(tmp_path).load()
    assert state.snapshot == snap and state.hard_state == HardState(3, 0, 10)
    assert [e.index for e in state.entries] == [11]


def test_file_storage_crash_between_snapshot_and_log_cut(tmp_path: Path) -> None:
    st = FileStorage(tmp_path)
    st.load()
    st.save(ready(hs=HardState(1, 1, 2), entries=ents(1, 1, 1, 1, 1, 1)))
    # The install wrote the snapshot, then crashed before cutting the log.
    # Entry 4 has term 1, the snapshot says 4/2: the old log is replaced.
    st._write_snapshot(Snapshot(4, 2, frozenset({1, 2, 3}), frozenset(), b"s"))
    st.close()
    st = FileStorage(tmp_path)
    state = st.load()
    assert state.entries == () and state.snapshot.index == 4
    st.save(ready(entries=ents(5, 2)))
    st.close()
    assert [e.index for e in FileStorage(tmp_path).load().entries] == [5]


def test_file_storage_crash_between_snapshot_and_log_rewrite(tmp_path: Path) -> None:
    st = FileStorage(tmp_path)
    st.load()
    st.save(ready(hs=HardState(1, 1, 4), entries=ents(1, 1, 1, 1, 1, 1)))
    st._write_snapshot(Snapshot(4, 1, frozenset({1, 2, 3}), frozenset(), b"s"))
    st.close()                                      # compact() crashed before the rewrite
    st = FileStorage(tmp_path)
    state = st.load()
    assert [e.index for e in state.entries] == [5]
    st.save(ready(entries=ents(6, 2)))
    st.close()
    assert [(e.index, e.term) for e in FileStorage(tmp_path).load().entries] == \
        [(5, 1), (6, 2)]


def test_file_storage_refuses_real_corruption(tmp_path: Path) -> None:
    st = FileStorage(tmp_path)
    st.load()
    st.save(ready(hs=HardState(1, 1, 3), entries=ents(1, 1, 1, 1)))
    st.close()
    log = tmp_path / "log"
    log.write_bytes(log.read_bytes()[:-3])          # entry 3 torn: commit 3 is lost
    with pytest.raises(StorageError, match="commit"):
        FileStorage(tmp_path).load()
    (tmp_path / "hardstate").write_bytes(b"garbage")
    with pytest.raises(StorageError, match="hard state"):
        FileStorage(tmp_path).load()


def test_file_storage_ignores_an_unfinished_replace(tmp_path: Path) -> None:
    st = FileStorage(tmp_path)
    st.load()
    st.save(ready(hs=HardState(1, 1, 0)))
    st.close()
    (tmp_path / "hardstate.tmp").write_bytes(b"half")
    assert FileStorage(tmp_path).load().hard_state == HardState(1, 1, 0)
    assert not (tmp_path / "hardstate.tmp").exists()


def test_memory_storage_matches_file_storage(tmp_path: Path) -> None:
    rng = random.Random(3)
    for trial in range(20):
        fs, ms = FileStorage(tmp_path / str(trial)), MemoryStorage()
        fs.load()
        last, term, snap_index = 0, 1, 0
        for _ in range(30):
            r = rng.random()
            if r < 0.6:
                first = rng.randint(max(snap_index + 1, last - 2), last + 1)
                term += rng.random() < 0.3
                rd = ready(entries=ents(first, *[term] * rng.randint(1, 4)),
                           hs=HardState(term, 0, 0))
                last = rd.entries[-1].index
            elif r < 0.8 and last > snap_index:
                i = rng.randint(snap_index + 1, last)
                t = next(e.term for e in (fs.load().entries) if e.index == i)
                snap_index = i
                s = Snapshot(i, t, frozenset({1}), frozenset(), b"%d" % i)
                fs.compact(s)
                ms.compact(s)
                continue
            else:
                term += 1
                snap_index = last = last + rng.randint(1, 3)
                rd = ready(snapshot=Snapshot(last, term, frozenset({1}), frozenset(), b""),
                           hs=HardState(term, 0, last))
            fs.save(rd)
            ms.save(rd)
        assert fs.load() == ms.load()
        fs.close()


def test_cluster_restarts_from_file_storage(tmp_path: Path) -> None:
    c = three()
    for nid, h in c.nodes.items():
        fs = FileStorage(tmp_path / str(nid))
        fs.load()
        # copy what the memory storage holds, then keep going on files
        if h.storage.snapshot:
            fs.save(ready(snapshot=h.storage.snapshot))
        fs.save(ready(hs=h.storage.hard_state, entries=h.storage.entries))
        h.storage = fs
    run(c, "propose 1 a", "propose 1 b", "stabilize", "compact 1 3", "crash 2", "restart 2",
        "crash 1", "restart 1", "tick 2 40", "stabilize", "tick 3 40", "stabilize")
    leaders = [n for n in (1, 2, 3) if c.core(n).role is Role.LEADER]
    assert len(leaders) == 1
    lead = c.core(leaders[0])
    run(c, f"propose {leaders[0]} c", "stabilize")
    assert all(c.core(i).commit == lead.last_index for i in (1, 2, 3))
    assert c.core(1).snapshot_index == 3
    for h in c.nodes.values():
        h.storage.close()


def test_reconcile_rules() -> None:
    s = Snapshot(3, 2, frozenset({1}), frozenset(), b"")
    same = ents(1, 1, 2, 2, 2)
    state, changed = reconcile(HardState(2, 0, 3), s, same)
    assert [e.index for e in state.entries] == [4] and changed
    other = ents(1, 1, 1, 1, 1)
    state, changed = reconcile(HardState(2, 0, 3), s, other)
    assert state.entries == () and changed
    state, changed = reconcile(HardState(2, 0, 3), s, ents(4, 2))
    assert not changed
    with pytest.raises(StorageError):
        reconcile(HardState(2, 0, 3), s, ents(6, 2))
    with pytest.raises(StorageError):
        reconcile(HardState(2, 0, 3), None, ents(2, 2))


def test_file_storage_is_fast_enough(tmp_path: Path) -> None:
    """A few hundred small entries a second: one save (an fsync) per entry,
    the hard state (two more) every 10."""
    st = FileStorage(tmp_path)
    st.load()
    t0 = time.perf_counter()
    for i in range(1, 201):
        st.save(ready(entries=[Entry(i, 1, data=b"x" * 100)],
                      hs=HardState(1, 1, i) if i % 10 == 0 else None))
    elapsed = time.perf_counter() - t0
    st.close()
    assert elapsed < 10, f"200 saves took {elapsed:.2f} s"
