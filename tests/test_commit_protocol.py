"""The commit protocol cores: scripted scenarios with exact expectations,
then the seeded simulator over many fault schedules."""
from __future__ import annotations

import pytest

from replication.commit import (COMMITTED, FENCED, PRECOMMITTED, AbortLocal, CommitAck,
                                CommitLocal, Coordinator, Decision, Fence, FenceOwn, FinishLocal,
                                Generation, Outcome, Participant, Persist, PersistOwn, Precommit,
                                PrecommitAck, ProtocolInvariantError, Release, Reply, Send,
                                TxStatus, TxStatusQuery, Vote, VoteRequest, Working, Wound,
                                make_gid, parse_gid)
from sim_commit import Sim, SimFailure

GEN = Generation(1, frozenset({1, 2, 3}), frozenset({1, 2, 3}))
GID = make_gid(1, 1, 7)


def test_gid_format():
    assert GID == "MTM-1-1-7" and parse_gid(GID) == (1, 1, 7)
    assert parse_gid("user-gid") is None and parse_gid("MTM-1-x-2") is None


def test_two_members_precommits_decide_while_our_own_is_written():
    c = Coordinator(1, GEN)
    c.start(GID, 0)
    c.receive(Vote(GID, 2, True), 1)
    c.receive(Vote(GID, 3, True), 2)
    assert c.receive(PrecommitAck(GID, 2), 3) == []
    assert c.receive(PrecommitAck(GID, 3), 4) == [CommitLocal(GID)]   # 2 durable of 3
    assert c.persisted(GID, 5) == []                 # late: changes nothing
    c.check_invariants()


def test_held_transaction_waits_for_a_release_from_any_node():
    """A client's own PREPARE TRANSACTION: the coordinator stops once every
    member prepared it, nothing (vote timeout, wound) aborts it meanwhile,
    and a Release from another node commits it, answered with an Outcome."""
    g = "MTM-1-1-9:app-tx"
    c = Coordinator(1, GEN, vote_timeout_ms=100)
    assert c.start(g, 0, hold=True) == []
    c.receive(Vote(g, 2, True), 1)
    assert c.receive(Vote(g, 3, True), 2) == [Reply(g, True)]     # prepared everywhere
    c.forget(g)                                        # the client has its answer...
    assert c.tick(10_000) == []                        # ...the transaction stays, held
    assert c.receive(Wound(g, 2, "MTM-2-1-1"), 10_001) == []
    out = c.receive(Release(g, 3, True), 10_002)       # COMMIT PREPARED sent to node 3
    assert out == [Send(2, Precommit(g, 1)), Send(3, Precommit(g, 1)), PersistOwn(g)]
    c.receive(PrecommitAck(g, 2), 10_003)
    assert c.persisted(g, 10_004) == [CommitLocal(g)]
    c.local_done(g, True, 10_005)
    c.receive(CommitAck(g, 2), 10_006)
    assert c.receive(CommitAck(g, 3), 10_007) == [Reply(g, True),
                                                   Send(3, Outcome(g, 1, True))]
    c.check_invariants()


def test_held_transaction_rolled_back_here_and_unknown_releases():
    g = "MTM-1-1-10:x"
    c = Coordinator(1, GEN)
    c.start(g, 0, hold=True)
    c.receive(Vote(g, 2, True), 1)
    c.receive(Vote(g, 3, True), 2)
    assert c.release(g, False, 1, 3) == [AbortLocal(g)]
    assert c.local_done(g, False, 4) == [Reply(g, False, "", "rolled back")]
    # a second release, or one for a gid this node does not hold
    [r] = c.release(g, True, 1, 5)
    assert (r.committed, r.sqlstate) == (False, "42704")
    out = c.receive(Release("MTM-1-1-77:y", 2, True), 6)
    assert [type(a) for a in out] == [Reply, Send] and out[1].msg.sqlstate == "42704"
    assert parse_gid("MTM-1-1-77:y:with:colons") == (1, 1, 77)


def test_happy_path_in_order():
    c = Coordinator(1, GEN)
    assert c.start(GID, 0) == []
    assert c.receive(Vote(GID, 2, True), 1) == []
    out = c.receive(Vote(GID, 3, True), 2)
    # ask the members and write our own record at the same time...
    assert out == [Send(2, Precommit(GID, 1)), Send(3, Precommit(GID, 1)), PersistOwn(GID)]
    # ...which counts only once it is durable
    assert c.receive(PrecommitAck(GID, 2), 3) == []
    assert c.persisted(GID, 3) == [CommitLocal(GID)]       # 2 of 3 configured
    assert c.receive(PrecommitAck(GID, 3), 4) == []
    assert c.local_done(GID, True, 5) == []          # waiting for the members' commits
    assert c.receive(CommitAck(GID, 2), 6) == []
    assert c.receive(CommitAck(GID, 3), 7) == [Reply(GID, True)]
    c.check_invariants()


def test_reply_before_peer_commits_when_configured():
    c = Coordinator(1, GEN, wait_peer_commits=False)
    c.start(GID, 0)
    c.receive(Vote(GID, 2, True), 1)
    c.receive(Vote(GID, 3, True), 1)
    c.receive(PrecommitAck(GID, 2), 2)
    assert c.persisted(GID, 2) == [CommitLocal(GID)]
    assert c.local_done(GID, True, 3) == [Reply(GID, True)]


def test_conflict_on_a_member_gives_40001_naming_it():
    c = Coordinator(1, GEN)
    c.start(GID, 0)
    c.receive(Vote(GID, 2, True), 1)
    assert c.receive(Vote(GID, 3, False, "55P03", "lock timeout"), 2) == [AbortLocal(GID)]
    [reply] = c.local_done(GID, False, 3)
    assert not reply.committed and reply.sqlstate == "40001"
    assert "concurrent transaction on node 3" in reply.message


def test_other_member_errors_keep_their_sqlstate():
    c = Coordinator(1, GEN)
    c.start(GID, 0)
    c.receive(Vote(GID, 2, False, "23505", "duplicate key value"), 1)
    [reply] = c.local_done(GID, False, 2)
    assert reply.sqlstate == "23505" and "node 2 could not apply it" in reply.message


def test_vote_timeout_and_retransmission():
    c = Coordinator(1, GEN, vote_timeout_ms=1000, retry_ms=100)
    c.start(GID, 0)
    c.receive(Vote(GID, 2, True), 10)
    assert c.tick(50) == []
    assert c.tick(120) == [Send(3, VoteRequest(GID, 1))]   # only the missing vote
    assert c.tick(1000) == [AbortLocal(GID)]
    [reply] = c.local_done(GID, False, 1001)
    assert reply.sqlstate == "40000" and "no answer from node(s) 3 for 1000 ms" in reply.message


def test_a_working_member_is_waited_for_and_a_silent_one_is_not():
    """``Working`` from a member restarts its clock: the transaction outlives
    the timeout while the member keeps saying it, and aborts one timeout
    after it stops; a member that never said it is named as the silent one."""
    c = Coordinator(1, GEN, vote_timeout_ms=1000, retry_ms=100)
    c.start(GID, 0)
    c.receive(Vote(GID, 3, True), 10)
    for t in (900, 1800, 2700):
        assert c.receive(Working(GID, 2), t) == []
        assert AbortLocal(GID) not in c.tick(t + 150)
    assert AbortLocal(GID) not in c.tick(3699)
    assert c.tick(3700) == [AbortLocal(GID)]
    [reply] = c.local_done(GID, False, 3701)
    assert "no answer from node(s) 2 for 1000 ms" in reply.message

    other = make_gid(1, 1, 8)
    c.start(other, 5000)
    c.receive(Working("", 2), 5900)       # node 2 works; node 3 says nothing
    assert c.tick(6000) == [AbortLocal(other)]
    [reply] = c.local_done(other, False, 6001)
    assert "no answer from node(s) 3 for" in reply.message
    # a non-member's Working is ignored
    assert c.receive(Working("", 9), 6002) == [] and 9 not in c.working_ms


def test_generation_switch_aborts_only_unprecommitted():
    c = Coordinator(1, GEN)
    c.start(GID, 0)
    other = make_gid(1, 1, 8)
    c.start(other, 0)
    for g in (other,):
        c.receive(Vote(g, 2, True), 1)
        c.receive(Vote(g, 3, True), 1)
    gen2 = Generation(2, frozenset({1, 2}), GEN.configured)
    assert c.generation_changed(gen2, 5) == [AbortLocal(GID)]


def test_wound_aborts_a_younger_transaction_still_voting():
    from replication.commit import Wound, older
    young, old = make_gid(1, 1, 2000), make_gid(2, 1, 1000)
    assert older(old, young) and not older(young, old)
    assert older(make_gid(1, 1, 5), make_gid(2, 1, 5))      # tie: lower node id
    c = Coordinator(1, GEN)
    c.start(young, 0)
    assert c.receive(Wound(young, 2, make_gid(2, 1, 3000)), 1) == []   # by a younger: ignored
    assert c.receive(Wound(young, 2, old), 1) == [AbortLocal(young)]
    [reply] = c.local_done(young, False, 2)
    assert reply.sqlstate == "40001" and old in reply.message
    # after the precommit a wound changes nothing
    c.start(make_gid(1, 1, 3000), 0)
    g = make_gid(1, 1, 3000)
    c.receive(Vote(g, 2, True), 1)
    c.receive(Vote(g, 3, True), 1)
    assert c.receive(Wound(g, 2, old), 2) == []


def test_participant_votes_precommits_and_acks_idempotently():
    p = Participant(2, GEN)
    assert p.applied(GID, True) == [Send(1, Vote(GID, 2, True))]
    assert p.receive(VoteRequest(GID, 1)) == [Send(1, Vote(GID, 2, True))]
    assert p.receive(Precommit(GID, 1)) == [Persist(GID)]
    assert p.receive(Precommit(GID, 1)) == []               # being written: no 2nd persist
    # the acknowledgement goes only once the record is durable
    assert p.persisted(GID, True) == [Send(1, PrecommitAck(GID, 2))]
    assert p.receive(Precommit(GID, 1)) == [Send(1, PrecommitAck(GID, 2))]
    # the decision reached us before the stream's COMMIT PREPARED
    assert p.receive(Decision(GID, 1, True)) == [FinishLocal(GID, True)]
    assert p.receive(Decision(GID, 1, True)) == []          # already finishing
    assert p.finished(GID, True) == [Send(1, CommitAck(GID, 2))]
    assert p.receive(Decision(GID, 1, True)) == [Send(1, CommitAck(GID, 2))]
    # messages claiming to come from another coordinator are ignored
    assert p.receive(Precommit(GID, 3)) == []


def test_participant_never_acks_a_commit_it_did_not_prepare():
    """A COMMIT PREPARED of a gid that failed (or never reached) this node
    changes nothing here: acking it would let the coordinator report a
    commit this node does not have."""
    p = Participant(2, GEN)
    assert p.finished(GID, True) == []                      # never voted
    p.applied(make_gid(1, 1, 9), False, "55P03", "lock timeout")
    assert p.finished(make_gid(1, 1, 9), True) == []        # voted no
    assert p.receive(Decision(make_gid(1, 1, 9), 1, True)) == []


def test_participant_answers_after_a_restart_from_what_the_database_says():
    """A restarted participant remembers no votes. A COMMIT PREPARED that
    found the gid prepared here, or the database saying it is prepared or
    committed here, is enough to answer the coordinator's retransmissions;
    without either it stays silent (it cannot vouch for a transaction it
    may never have had)."""
    p = Participant(2, GEN)
    assert p.finished("MTM-1-1-50", True, prepared_here=True) == [
        Send(1, CommitAck("MTM-1-1-50", 2))]
    assert p.receive(Decision("MTM-1-1-50", 1, True)) == [Send(1, CommitAck("MTM-1-1-50", 2))]
    assert not p.knows("MTM-1-1-51")
    assert p.receive(Decision("MTM-1-1-51", 1, True)) == []
    p.recovered("MTM-1-1-51", prepared=False, committed=True)
    assert p.receive(Decision("MTM-1-1-51", 1, True)) == [Send(1, CommitAck("MTM-1-1-51", 2))]
    p.recovered("MTM-1-1-52", prepared=True, committed=False)
    assert p.receive(Precommit("MTM-1-1-52", 1)) == [Persist("MTM-1-1-52")]
    assert p.persisted("MTM-1-1-52", True) == [Send(1, PrecommitAck("MTM-1-1-52", 2))]
    assert p.receive(Decision("MTM-1-1-52", 1, True)) == [FinishLocal("MTM-1-1-52", True)]
    p.recovered("MTM-1-1-53", prepared=False, committed=False)
    assert p.receive(VoteRequest("MTM-1-1-53", 1)) == []


def test_recovered_gid_with_our_own_precommit_commits():
    c = Coordinator(1, GEN)
    assert c.recover(GID, "p", 0) == [CommitLocal(GID)]
    # members get COMMIT PREPARED from our stream; Decisions speed it up
    assert c.local_done(GID, True, 1) == []
    assert c.tick(300) == [Send(2, Decision(GID, 1, True)), Send(3, Decision(GID, 1, True))]
    c.receive(CommitAck(GID, 2), 301)
    assert c.receive(CommitAck(GID, 3), 302) == []       # nobody waits: no Reply
    assert not c.knows(GID)


def test_recovered_gid_without_a_record_fences_itself_then_asks():
    """Our own precommit may still be on its way to the table (a backend of
    our previous life): we must fence ourselves before counting ourselves."""
    c = Coordinator(1, GEN)
    assert c.recover(GID, None, 0) == [FenceOwn(GID)]
    assert c.receive(TxStatus(GID, 2, FENCED), 1) == []        # we are not fenced yet
    # the record of our previous life landed first: it is a precommit
    assert c.own_fenced(GID, "p", 2) == [CommitLocal(GID)]


def test_recovered_gid_commits_if_any_member_holds_a_precommit():
    c = Coordinator(1, GEN)
    c.recover(GID, None, 0)
    assert c.own_fenced(GID, "x", 1) == [Send(2, TxStatusQuery(GID, 1)),
                                         Send(3, TxStatusQuery(GID, 1))]
    assert c.receive(TxStatus(GID, 3, PRECOMMITTED), 2) == [CommitLocal(GID)]
    c2 = Coordinator(1, GEN)
    c2.recover(GID, "x", 0)
    assert c2.receive(TxStatus(GID, 2, COMMITTED), 2) == [CommitLocal(GID)]


def test_recovered_gid_aborts_once_a_majority_is_fenced():
    c = Coordinator(1, GEN, retry_ms=100)
    assert c.recover(GID, "x", 0) == [Send(2, TxStatusQuery(GID, 1)),
                                      Send(3, TxStatusQuery(GID, 1))]
    assert c.tick(150) == [Send(2, TxStatusQuery(GID, 1)), Send(3, TxStatusQuery(GID, 1))]
    assert c.receive(TxStatus(GID, 2, FENCED), 200) == [AbortLocal(GID)]   # 1 + 2: majority
    assert c.local_done(GID, False, 201) == []      # nobody to tell
    assert not c.knows(GID)


def test_a_fenced_member_never_acknowledges_the_precommit():
    p = Participant(2, GEN)
    p.applied(GID, True)
    assert p.receive(TxStatusQuery(GID, 1)) == [Fence(GID)]
    assert p.fenced(GID, precommitted=False, committed=False) == [
        Send(1, TxStatus(GID, 2, FENCED))]
    assert p.receive(Precommit(GID, 1)) == []        # a late precommit of the old life
    # the database refuses a precommit write that raced the fence
    q = Participant(3, GEN)
    q.applied(GID, True)
    assert q.receive(Precommit(GID, 1)) == [Persist(GID)]
    assert q.persisted(GID, False) == []
    assert q.receive(Precommit(GID, 1)) == []


def test_recovered_client_prepared_transaction_is_held_and_votes_are_collected_again():
    g = "MTM-1-1-9:app-tx"
    c = Coordinator(1, GEN)
    assert c.recover(g, None, 0) == []                  # held, not decided
    assert c.tick(100_000) == []
    out = c.release(g, True, 1, 100_001)
    assert out == [Send(2, VoteRequest(g, 1)), Send(3, VoteRequest(g, 1))]
    c.receive(Vote(g, 2, True), 100_002)
    assert c.receive(Vote(g, 3, True), 100_003)[-1] == PersistOwn(g)


def test_a_precommit_majority_that_does_not_form_answers_40003_and_keeps_trying():
    c = Coordinator(1, GEN, vote_timeout_ms=1000, retry_ms=100)
    c.start(GID, 0)
    c.receive(Vote(GID, 2, True), 10)
    c.receive(Vote(GID, 3, True), 20)              # precommit phase from t=20
    c.persisted(GID, 30)                           # ours is durable; 2 and 3 went silent
    out = [a for a in c.tick(1019) if isinstance(a, Reply)]
    assert out == []
    [reply] = [a for a in c.tick(1020) if isinstance(a, Reply)]
    assert reply.sqlstate == "40003" and "not known yet" in reply.message
    assert [a for a in c.tick(1200) if isinstance(a, Reply)] == []   # told once
    assert c.tick(1300) == [Send(2, Precommit(GID, 1)), Send(3, Precommit(GID, 1))]
    assert c.receive(PrecommitAck(GID, 3), 5000) == [CommitLocal(GID)]
    assert c.local_done(GID, True, 5001) == []
    c.receive(CommitAck(GID, 2), 5002)
    assert c.receive(CommitAck(GID, 3), 5003) == []     # the client had its answer
    assert not c.knows(GID)


def test_missing_commit_acks_end_in_a_commit_with_a_warning():
    c = Coordinator(1, GEN, vote_timeout_ms=1000, retry_ms=100)
    c.start(GID, 0)
    c.receive(Vote(GID, 2, True), 1)
    c.receive(Vote(GID, 3, True), 2)
    c.receive(PrecommitAck(GID, 2), 3)
    c.persisted(GID, 4)
    c.local_done(GID, True, 5)
    c.receive(CommitAck(GID, 2), 6)
    c.receive(Working(GID, 3), 900)            # node 3 is busy applying: waited for
    assert [a for a in c.tick(1500) if isinstance(a, Reply)] == []
    [reply] = [a for a in c.tick(1900) if isinstance(a, Reply)]
    assert reply.committed and "node(s) 3 did not confirm" in reply.warning
    c.check_invariants()


def test_participant_refuses_older_generation():
    p = Participant(2, Generation(2, frozenset({1, 2, 3}), GEN.configured))
    [send] = p.applied(GID, True)
    assert not send.msg.ok and "generation" in send.msg.message


def test_participant_takes_part_only_while_online():
    """consensus/gens.py: a RECOVERY member, or one that restarted in this
    generation, neither votes yes nor records a precommit - nor votes no:
    once ONLINE it answers the coordinator's VoteRequest from its database
    (``recovered``), so a transaction prepared during its recovery can still
    commit."""
    p = Participant(2, GEN, online=False)
    assert p.applied(GID, True) == []
    assert p.receive(VoteRequest(GID, 1)) == []
    p.recovered(GID, prepared=True, committed=False)      # still not online: no vote
    assert not p.knows(GID)
    p.generation_changed(GEN, online=True)
    p.recovered(GID, prepared=True, committed=False)
    assert p.receive(VoteRequest(GID, 1)) == [Send(1, Vote(GID, 2, True))]
    p2 = Participant(2, GEN)
    p2.applied(GID, True)
    p2.generation_changed(GEN, online=False)
    assert p2.receive(Precommit(GID, 1)) == []
    p2.generation_changed(GEN, online=True)
    assert p2.receive(Precommit(GID, 1)) == [Persist(GID)]


def test_participant_never_records_a_precommit_of_an_earlier_generation():
    """The generation fence: past T's generation, a node never records
    PRECOMMIT(T), so the cluster may count it as holding none; a record
    written before the switch is still acknowledged."""
    gen2 = Generation(2, GEN.members, GEN.configured)
    p = Participant(2, GEN)
    p.applied(GID, True)
    other = make_gid(1, 1, 8)
    p.applied(other, True)
    assert p.receive(Precommit(other, 1)) == [Persist(other)]
    assert p.persisted(other, True) == [Send(1, PrecommitAck(other, 2))]
    p.generation_changed(gen2)
    assert p.receive(Precommit(GID, 1)) == []
    assert p.receive(Precommit(other, 1)) == [Send(1, PrecommitAck(other, 2))]


def test_coordinator_carries_out_the_clusters_decision():
    """Coordinator.decided: a transaction still precommitting when the
    generation moved on is decided by the log; commit or abort, the client
    hears once, and an abort of a transaction committed here is refused."""
    c = Coordinator(1, GEN)
    c.start(GID, 0)
    c.receive(Vote(GID, 2, True), 1)
    c.receive(Vote(GID, 3, True), 2)             # precommitting, no majority yet
    c.generation_changed(Generation(2, frozenset({1, 2}), GEN.configured), 3)
    assert c.decided(GID, False, 4) == [AbortLocal(GID)]
    assert c.decided(GID, False, 5) == []
    [reply] = c.local_done(GID, False, 6)
    assert not reply.committed and "decided to roll it back" in reply.message
    g = make_gid(1, 1, 8)
    c2 = Coordinator(1, GEN)
    c2.start(g, 0)
    c2.receive(Vote(g, 2, True), 1)
    c2.receive(Vote(g, 3, True), 2)
    assert c2.decided(g, True, 3) == [CommitLocal(g)]
    c2.check_invariants()                        # committed on one record: the cluster's
    c2.local_done(g, True, 4)
    with pytest.raises(ProtocolInvariantError):
        c2.decided(g, False, 5)
    assert c2.decided("MTM-9-1-1", True, 6) == []   # not ours: the shell finishes it


@pytest.mark.parametrize("wait", [True, False], ids=["wait_peer_commits", "no_wait"])
def test_simulator_many_fault_schedules(wait):
    """1,000 seeds per mode: message loss, duplication, reordering, delays,
    lagging streams, apply conflicts, and whole nodes crashing (losing what
    is in memory and unfinished writes) and recovering their own gids;
    invariants after every event, then every transaction must settle with
    nothing left prepared."""
    totals: dict = {}
    for seed in range(1000):
        for k, v in Sim(seed, wait_peer_commits=wait).run_schedule(safety_steps=200).items():
            totals[k] = totals.get(k, 0) + v
    # the schedules really exercised both outcomes, crashes and recoveries
    assert totals["transactions"] > 5000
    assert 0 < totals["committed"] < totals["transactions"]
    assert totals["crashed_clients"] > 100 and totals["recovered_commits"] > 20, totals


class _EagerCoordinator(Coordinator):
    """A mutant that counts its own precommit before it is durable."""

    def _maybe_precommit(self, t, now_ms):
        out = super()._maybe_precommit(t, now_ms)
        if t.state == "precommitting":
            t.precommit_acks.add(self.node_id)
            out += self._maybe_commit(t)
        return out


class _UnfencedRecovery(Coordinator):
    """A mutant that rolls back a recovered gid that has no precommit record
    here without asking anyone (nor fencing anyone)."""

    def recover(self, gid, own, now_ms, generation=None):
        if own is None and ":" not in gid:
            super().recover(gid, "x", now_ms, generation)
            t = self.txns[gid]
            t.state, t.answered = "aborting", True
            t.reply = Reply(gid, False, "40000", "rolled back")
            return [AbortLocal(gid)]
        return super().recover(gid, own, now_ms, generation)


def test_simulator_catches_a_recovery_that_does_not_fence():
    caught = 0
    for seed in range(300):
        try:
            Sim(seed, coordinator=_UnfencedRecovery).run_schedule(safety_steps=200)
        except SimFailure as e:
            assert "rolled back with precommit records" in str(e), e
            caught += 1
    assert caught >= 2, caught


def test_simulator_catches_a_coordinator_counting_its_precommit_early():
    caught = 0
    for seed in range(100):
        try:
            Sim(seed, coordinator=_EagerCoordinator).run_schedule(safety_steps=200)
        except SimFailure as e:
            assert "precommits" in str(e), e
            caught += 1
    assert caught >= 10, caught
