"""Unit tests of consensus/gens.py (the generation state machine) and
consensus/policy.py (failure detector, read lease, the leader's policy).
The seeded simulator over all of it is tests/test_gens_sim.py."""
from __future__ import annotations

import json

import pytest

from consensus.gens import (DEAD, ONLINE, RECOVERY, BecomeOnline, Decide, DecisionMade, Forget,
                            Forgotten, Gen, GenState, GensDecodeError, GensInvariantError,
                            Ignored, MayCommit, Online, SwitchTo, decode_entry, encode_entry,
                            gid_gen)
from consensus.policy import (NO_PRECOMMIT, PRECOMMIT_HELD, FailureDetector, JoinRequest,
                              LeaderPolicy, LeaseGrant, OnlineRequest, Plan, PolicyConfig,
                              PolicyDecodeError, ReadLease, Status, decode_message,
                              encode_message, user_status)

C3 = frozenset({1, 2, 3})
C5 = frozenset({1, 2, 3, 4, 5})


def fs(*ids) -> frozenset[int]:
    return frozenset(ids)


class Log:
    """Applies entries to a GenState at consecutive indexes."""

    def __init__(self, state: GenState) -> None:
        self.s = state

    def __call__(self, entry) -> list:
        return self.s.apply(self.s.index + 1, encode_entry(entry))


def gen(state: GenState, members) -> Gen:
    """The next generation with ``members``, with the donors ``state`` computes."""
    members = frozenset(members)
    return Gen(state.gen.num + 1, members, state.gen.configured, state.donors_for(members))


# --- the codec ------------------------------------------------------------------------------------

ENTRIES = [Gen(7, fs(1, 2), C3, fs(2)), Online(3, 7), Decide("MTM-1-6-42", True),
           Decide("MTM-2-6-1:app tx", False), Forget(("MTM-1-2-3", "MTM-2-2-9"))]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: type(e).__name__)
def test_entry_codec_round_trips_and_rejects_every_prefix(entry):
    data = encode_entry(entry)
    assert decode_entry(data) == entry
    assert json.loads(data)["v"] == 1
    for i in range(len(data)):                   # fed byte by byte: no prefix is an entry
        with pytest.raises(GensDecodeError):
            decode_entry(data[:i])
    with pytest.raises(GensDecodeError):         # nor is anything with trailing bytes
        decode_entry(data + b"x")


@pytest.mark.parametrize("bad,why", [
    (b"\xff\xfe", "not JSON"),
    (b"[]", "not an object"),
    (b'{"t":"online","node":1,"num":1}', "version"),
    (b'{"v":2,"t":"online","node":1,"num":1}', "version 2"),
    (b'{"v":true,"t":"online","node":1,"num":1}', "version"),
    (b'{"v":1,"t":"nope"}', "unknown type"),
    (b'{"v":1,"t":"used","num":3}', "reserved"),
    (b'{"v":1,"t":"witness"}', "reserved"),
    (b'{"v":1,"t":"online","node":1}', "fields"),
    (b'{"v":1,"t":"online","node":1,"num":1,"x":0}', "fields"),
    (b'{"v":1,"t":"online","node":true,"num":1}', "positive integer"),
    (b'{"v":1,"t":"online","node":0,"num":1}', "positive integer"),
    (b'{"v":1,"t":"online","node":1,"num":1.0}', "positive integer"),
    (b'{"v":1,"t":"gen","num":2,"members":[1,1],"configured":[1,2],"donors":[1]}', "distinct"),
    (b'{"v":1,"t":"gen","num":2,"members":[],"configured":[1,2],"donors":[1]}', "distinct"),
    (b'{"v":1,"t":"gen","num":2,"members":"12","configured":[1,2],"donors":[1]}', "list"),
    (b'{"v":1,"t":"decide","gid":"","commit":true}', "bad gid"),
    (b'{"v":1,"t":"decide","gid":"MTM-1-1-1","commit":1}', "boolean"),
    (b'{"v":1,"t":"forget","gids":[]}', "1 to"),
    (b'{"v":1,"t":"forget","gids":["a","a"]}', "duplicate"),
])
def test_entry_codec_names_what_is_wrong(bad, why):
    with pytest.raises(GensDecodeError, match=why):
        decode_entry(bad)


def test_gid_gen():
    assert gid_gen("MTM-3-17-99") == 17 and gid_gen("MTM-3-17-99:user") == 17
    assert gid_gen("user-gid") is None and gid_gen("MTM-x-1-2") is None


# --- the state machine ----------------------------------------------------------------------------

def test_bootstrap_is_generation_1_with_everyone_online():
    s = GenState(2, C3)
    assert (s.gen.num, s.gen.members, s.gen.donors) == (1, C3, C3)
    assert s.status() == ONLINE and s.may_commit() and s.online_members() == C3
    s.check_invariants()
    with pytest.raises(ValueError):
        GenState(1, [])


def test_exclusion_then_rejoin_through_recovery():
    s = GenState(3, C3)
    log = Log(s)
    assert log(gen(s, {1, 2})) == [SwitchTo(Gen(2, fs(1, 2), C3, fs(1, 2)), DEAD),
                                   MayCommit(2)]
    assert s.status(3) == DEAD and s.status(1) == ONLINE and s.may_commit()
    # 3 comes back: not a donor (generation 2 could commit without it)
    g3 = gen(s, C3)
    assert g3.donors == fs(1, 2)
    assert log(g3) == [SwitchTo(g3, RECOVERY)]
    assert s.status(3) == RECOVERY and not s.may_commit() and s.last_committable == 2
    assert log(Online(3, 3)) == [BecomeOnline(3), MayCommit(3)]
    assert s.status(3) == ONLINE and s.may_commit() and s.last_committable == 3
    assert s.may_commit(2) and s.may_commit(3) and not s.may_commit(4)
    log(gen(s, {1, 3}))
    log(gen(s, C3))                            # 2 recovering: 5 never could commit
    assert s.may_commit(4) and not s.may_commit(5) and not s.may_commit()
    s.check_invariants()


def test_a_node_excluded_while_nothing_could_commit_stays_a_donor():
    s = GenState(1, C5)
    log = Log(s)
    log(gen(s, {1, 2, 3, 4}))                  # 5 out; everyone else a donor: committable
    log(gen(s, {1, 2, 3, 4, 5}))               # 5 joins: RECOVERY, nothing commits in 3
    assert s.status(5) == RECOVERY and s.last_committable == 2
    log(gen(s, {1, 2, 3, 5}))                  # 4 out while 5 still recovers
    assert s.last_committable == 2 and not s.may_commit()
    # 4 was ONLINE in 3 and nothing committed since: it holds every commit
    assert s.donors_for({1, 2, 3, 4, 5}) == fs(1, 2, 3, 4)
    log(gen(s, {1, 2, 3}))                     # a committable generation without 4...
    assert s.last_committable == 5
    assert s.donors_for({1, 2, 3, 4, 5}) == fs(1, 2, 3)      # ...and 4 is no donor


def test_gen_entries_that_do_not_fit_the_prefix_are_ignored():
    s = GenState(1, C3)
    log = Log(s)
    g2 = gen(s, {1, 2})
    log(g2)
    before = s.snapshot()
    cases = [
        (Gen(2, fs(2, 3), C3, fs(2)), "does not follow"),              # same number again
        (Gen(4, fs(1, 2), C3, fs(1, 2)), "does not follow"),           # a gap
        (Gen(3, fs(1), C3, fs(1)), "not a majority"),
        (Gen(3, fs(1, 2, 4), fs(1, 2, 3, 4), fs(1, 2)), "configured"),
        (Gen(3, fs(1, 2, 3), C3, fs(1, 2, 3)), "computed"),           # 3 is no donor
        (Gen(3, fs(1, 2, 7), C3, fs(1, 2)), "not a majority"),         # 7 not configured
    ]
    for entry, why in cases:
        [ignored] = log(entry)
        assert isinstance(ignored, Ignored) and why in ignored.reason, (entry, ignored)
    # nothing but the applied index moved: one (members, configured) per number
    assert s.gen == g2 and s.gen_index == 1
    after = GenState.restore(1, s.snapshot())
    after.index = GenState.restore(1, before).index
    assert after == GenState.restore(1, before)


def test_donors_are_recomputed_at_apply_not_taken_from_the_proposer():
    s = GenState(1, C3)
    log = Log(s)
    stale = gen(s, C3)                           # proposed while 3 was still a donor...
    log(gen(s, {1, 2}))                          # ...but generation 2 without 3 came first
    assert isinstance(log(stale)[0], Ignored)
    assert s.donors_for({1, 3}) == fs(1)


def test_online_is_a_no_op_unless_for_a_recovering_member_of_the_current_generation():
    s = GenState(3, C3)
    log = Log(s)
    log(gen(s, {1, 2}))
    log(gen(s, C3))                              # generation 3: 3 recovering
    for entry in (Online(3, 2), Online(3, 4), Online(1, 3)):
        assert isinstance(log(entry)[0], Ignored)
    log(gen(s, {1, 2}))                          # 3 out again before its Online applied
    assert isinstance(log(Online(3, 3))[0], Ignored)
    assert s.status(3) == DEAD and s.last_online_in(3) == 1


def test_decide_only_earlier_generations_first_decision_stands():
    s = GenState(1, C3)
    log = Log(s)
    log(gen(s, {1, 2}))
    assert log(Decide("MTM-3-1-5", True)) == [DecisionMade("MTM-3-1-5", True)]
    [ign] = log(Decide("MTM-3-1-5", False))
    assert isinstance(ign, Ignored) and "already decided" in ign.reason
    assert s.decision("MTM-3-1-5") is True and s.decision_index("MTM-3-1-5") == 2
    for gid in ("MTM-1-2-1", "MTM-1-9-1", "not-ours"):     # current, later, foreign
        assert isinstance(log(Decide(gid, False))[0], Ignored)
        assert s.decision(gid) is None
    assert log(Forget(("MTM-3-1-5", "MTM-9-1-1"))) == [Forgotten(("MTM-3-1-5",))]
    assert s.decisions() == {} and s.decision_index("MTM-3-1-5") is None
    assert isinstance(log(Forget(("MTM-3-1-5",)))[0], Ignored)
    # the outcome is kept as a tombstone: a late report cannot have it decided again
    assert s.decision("MTM-3-1-5") is True
    assert isinstance(log(Decide("MTM-3-1-5", False))[0], Ignored)


def test_forgotten_outcomes_are_kept_for_a_bounded_number():
    s = GenState(1, C3, forgotten_max=2)
    log = Log(s)
    log(gen(s, {1, 2}))
    gids = [f"MTM-3-1-{i}" for i in range(3)]
    for g in gids:
        log(Decide(g, True))
    log(Forget(tuple(gids)))
    assert [s.decision(g) for g in gids] == [None, True, True]     # the oldest went
    r = GenState.restore(1, s.snapshot())
    assert r == s and [r.decision(g) for g in gids] == [None, True, True]
    assert log(Decide(gids[0], False)) == [DecisionMade(gids[0], False)]


def test_apply_empty_entries_conf_changes_and_order():
    s = GenState(1, C3)
    assert s.apply(1, b"") == [] and s.index == 1
    s.note_applied(2)
    with pytest.raises(GensInvariantError):
        s.apply(2, encode_entry(Online(1, 1)))
    with pytest.raises(GensDecodeError):
        s.apply(3, b"garbage")


def _history() -> GenState:
    s = GenState(2, C5)
    log = Log(s)
    log(gen(s, {1, 2, 3, 4}))
    log(Decide("MTM-5-1-1", False))
    log(gen(s, C5))
    log(Decide("MTM-4-2-8", True))
    return s


def test_snapshot_round_trips_exactly_and_is_the_same_on_every_node():
    s = _history()
    data = s.snapshot()
    r = GenState.restore(2, data)
    assert r == s and r.snapshot() == data
    assert r.status(5) == RECOVERY and r.decision("MTM-4-2-8") is True
    assert r.gen_def(2) == (fs(1, 2, 3, 4), C5)
    other = GenState.restore(5, data)            # another node: same state, own status
    assert other.snapshot() == data and other.status() == RECOVERY
    # the restored state goes on exactly as the original
    for st in (s, r):
        Log(st)(Online(5, 3))
    assert r == s


def test_snapshot_restore_refuses_garbage_and_inconsistency():
    data = _history().snapshot()
    d = json.loads(data)
    for mutate in (lambda d: d.pop("gen"), lambda d: d.update(v=2),
                   lambda d: d.update(last_committable=9),       # beyond the generation
                   lambda d: d.update(gen=[3, [1], [1, 2, 3, 4, 5], [1]]),   # minority
                   lambda d: d.update(decisions=[["MTM-1-1-1", 1, 2]]),
                   lambda d: d.update(index="x")):
        bad = json.loads(data)
        mutate(bad)
        with pytest.raises(GensDecodeError):
            GenState.restore(1, json.dumps(bad).encode())
    with pytest.raises(GensDecodeError):
        GenState.restore(1, data[:-1])


def test_resync_effects_after_restore():
    s = _history()
    r = GenState.restore(4, s.snapshot())
    eff = r.resync_effects()
    assert eff[0] == SwitchTo(s.gen, ONLINE) and BecomeOnline(3) in eff
    assert DecisionMade("MTM-4-2-8", True) in eff and DecisionMade("MTM-5-1-1", False) in eff
    assert not any(isinstance(e, MayCommit) for e in eff)        # 5 is recovering


def test_check_invariants_catches_corruption():
    s = _history()
    s.last_committable = 99
    with pytest.raises(GensInvariantError):
        s.check_invariants()


# --- failure detector, lease, codec ---------------------------------------------------------------

def test_failure_detector_suspects_silent_peers_after_the_timeout():
    fd = FailureDetector(1, [1, 2, 3], 1000, suspect_ms=500)
    assert fd.sees(1400) == fs(2, 3) and fd.suspects(1500) == frozenset()
    fd.heard_from(2, 1300)
    assert fd.suspects(1501) == fs(3) and fd.sees(1501) == fs(2)
    fd.heard_from(2, 1200)                       # an older receipt changes nothing
    assert fd.suspects(1801) == fs(2, 3)
    fd.heard_from(9, 1800)                       # not a peer
    assert 9 not in fd.sees(1800)


def test_failure_detector_suspects_nobody_while_its_own_loop_lags():
    fd = FailureDetector(1, [1, 2, 3], 0, suspect_ms=500, lag_threshold_ms=100)
    fd.loop_tick(100, 150)                       # 50 ms late: fine
    assert not fd.quiet(150) and fd.lag_ms == 50
    fd.loop_tick(200, 1400)                      # stalled 1.2 s: silence is its own
    assert fd.lag_ms == 1200 and fd.quiet(1400)
    assert fd.suspects(1400) == frozenset() and fd.sees(1400) == fs(2, 3)
    fd.heard_from(2, 1450)                       # the queued heartbeats arrive
    assert fd.suspects(1899) == frozenset()      # grace: a full suspect period after
    assert fd.suspects(1900) == fs(3)            # 3 really is silent


def test_read_lease_counts_from_the_send_time_and_only_grows():
    lease = ReadLease(300)
    assert not lease.valid(0)
    lease.granted(1000)
    assert lease.valid(1299) and not lease.valid(1300)
    lease.granted(900)                           # a late answer to an older Status
    assert lease.until == 1300
    lease.revoke()
    assert not lease.valid(1000)


def test_policy_config_keeps_the_lease_inside_the_suspect_timeout():
    cfg = PolicyConfig()
    assert (cfg.heartbeat_ms, cfg.suspect_ms, cfg.lease_ms) == (100, 500, 300)
    assert cfg.exclusion_wait_ms == 363
    with pytest.raises(ValueError):
        PolicyConfig(lease_ms=460)               # 460 * 1.1 > 500
    with pytest.raises(ValueError):
        PolicyConfig(lease_ms=420)               # 420 * 1.21 > 500: the wait would decide
    with pytest.raises(ValueError):
        PolicyConfig(heartbeat_ms=300)


def test_user_status():
    assert user_status(ONLINE, lease_valid=True) == "online"
    assert user_status(ONLINE, lease_valid=False) == "isolated"
    assert user_status(RECOVERY, lease_valid=False) == "recovery"
    assert user_status(DEAD, lease_valid=False, catching_up=True) == "catchup"
    assert user_status(DEAD, lease_valid=False) == "isolated"
    assert user_status(ONLINE, lease_valid=True, disabled=True) == "disabled"


def test_policy_message_codec():
    st = Status(2, 123456, 7, 4, 88, fs(1, 3), 12, 3, fresh=True, join=JoinRequest(2, 40),
                online=OnlineRequest(2, 4), prepared_old=frozenset({"MTM-1-3-4"}),
                answers=(("MTM-1-3-4", "p"), ("MTM-3-2-1", "n")), echo=(7, 19), lease=True,
                round=3, resolving=("MTM-1-3-4",))
    for m in (st, Status(1, 0, 0, 1, 0, frozenset()), LeaseGrant(3, 5000, 2)):
        data = encode_message(m)
        assert decode_message(data) == m
        for i in range(len(data)):
            with pytest.raises(PolicyDecodeError):
                decode_message(data[:i])
    d = json.loads(encode_message(st))
    # (each case replaces one field; a stray unknown field would be refused
    # whatever the case)
    for key, bad in (("answers", [["g", "x"]]), ("sees", [1, 1]), ("fresh", 1), ("v", 2),
                     ("t", "gen"), ("node", 0), ("sees", [[1]]), ("sees", [{}]),
                     ("answers", [[["x"], "p"]]), ("echo", [1]), ("join", [1, {}]),
                     ("prepared_old", [1]), ("resolving", "abc"), ("lease", None)):
        broken = dict(d, **{key: bad})
        with pytest.raises(PolicyDecodeError):
            decode_message(json.dumps(broken).encode())


# --- the leader's policy --------------------------------------------------------------------------

class Cluster:
    """A leader's view: its GenState, detector and policy, and the Statuses
    it hears. Time is the leader's clock."""

    def __init__(self, configured=C3, me: int = 1, now: int = 0, cfg=None) -> None:
        self.me = me
        self.cfg = cfg or PolicyConfig()
        self.state = GenState(me, configured)
        self.fd = FailureDetector(me, configured, now, suspect_ms=self.cfg.suspect_ms)
        self.policy = LeaderPolicy(me, configured, now, self.cfg)
        self.now = now
        self.term = 1
        self.echo: dict[int, int] = {}

    def status(self, node: int, *, sees=None, **kw) -> Status:
        if sees is None:
            sees = self.state.gen.configured - {node}
        kw.setdefault("echo", (self.term, self.echo.get(node, 0)))
        return Status(node, self.now, self.term, kw.pop("gen", self.state.gen.num),
                      self.state.index, frozenset(sees), **kw)

    def hear(self, node: int, **kw) -> None:
        self.fd.heard_from(node, self.now)
        self.policy.on_status(self.status(node, **kw), self.now)

    def tick(self, **kw) -> Plan:
        kw.setdefault("log_ready", True)
        plan = self.policy.tick(self.now, self.state, self.fd, leader=True, term=self.term, **kw)
        return plan

    def run(self, ms: int, silent=(), per=None) -> list[Plan]:
        """Heartbeats every 100 ms from everyone but ``silent``; each peer
        echoes the round of the leader's previous heartbeat."""
        plans = []
        end = self.now + ms
        while self.now < end:
            self.now += 100
            for n in sorted(self.state.gen.configured - {self.me} - set(silent)):
                self.hear(n, **(per or {}).get(n, {}))
            plan = self.tick()
            for n in self.state.gen.configured:
                self.echo[n] = plan.round
            plans.append(plan)
        return plans

    def apply(self, entry) -> list:
        return self.state.apply(self.state.index + 1, encode_entry(entry))


def proposals(plans) -> list:
    return [p for plan in plans for p in plan.proposals]


def test_policy_plans_nothing_unless_leading_with_its_log_applied():
    c = Cluster()
    assert c.policy.tick(1000, c.state, c.fd, leader=False, term=1) == Plan()
    plan = c.policy.tick(1000, c.state, c.fd, leader=True, term=1, log_ready=False)
    assert plan.round == 1 and not plan.proposals and not plan.grants


def test_a_silent_member_is_excluded_once_suspected():
    c = Cluster()
    c.run(1000)
    assert proposals(c.run(400, silent=[3])) == []            # within the suspect timeout
    props = proposals(c.run(200, silent=[3]))
    assert props == [Gen(2, fs(1, 2), C3, fs(1, 2))]
    c.policy.proposed(props[0], 1, c.now)
    assert proposals(c.run(300, silent=[3])) == []              # deduplicated until applied


def test_no_exclusion_while_the_leader_itself_lags():
    c = Cluster()
    c.run(1000)
    c.fd.loop_tick(c.now, c.now + 200)       # the leader's loop was 200 ms late
    assert proposals(c.run(600, silent=[3])) == []
    assert proposals(c.run(300, silent=[3]))                   # the quiet period is over


def test_a_new_leader_waits_out_leases_it_did_not_grant():
    c = Cluster(now=10_000)
    c.run(600)
    for _ in range(6):                           # 3 falls silent; node 1 does not lead yet
        c.now += 100
        c.hear(2)
        assert c.policy.tick(c.now, c.state, c.fd, leader=False, term=1) == Plan()
    plans = c.run(500, silent=[3])               # 3 long suspected when 1 begins to lead
    assert [bool(p.proposals) for p in plans] == [False] * 4 + [True]
    assert c.now - c.policy.leader_since_ms >= c.cfg.exclusion_wait_ms


def test_leases_are_granted_after_a_quorum_echoes_a_later_round():
    c = Cluster()
    c.run(100)
    c.hear(2, lease=True)                        # sent at 100, received at 100
    plan = c.tick()
    assert plan.grants == ()                     # nobody echoed a round sent after it
    c.echo[2] = plan.round
    c.now += 50
    c.hear(2)                                    # 2 echoes it: with the leader, a quorum
    plan = c.tick()
    assert plan.grants == (LeaseGrant(2, 100, 1),)
    assert c.tick().grants == ()                 # once


def test_no_lease_to_a_node_being_excluded_or_left_out_by_a_pending_gen():
    c = Cluster()
    c.run(600, per={2: {"lease": True}, 3: {"lease": True}})
    granted = {g.node for p in c.run(200, per={2: {"lease": True}, 3: {"lease": True}})
               for g in p.grants}
    assert granted == {2, 3}
    pending = [Gen(2, fs(1, 2), C3, fs(1, 2))]
    plans = []
    for _ in range(3):
        c.now += 100
        for n in (2, 3):
            c.hear(n, lease=True)
        plans.append(c.tick(pending=pending))
        c.echo.update({2: plans[-1].round, 3: plans[-1].round})
    assert {g.node for p in plans for g in p.grants} == {2}
    assert proposals(plans) == []                # and no second Gen while one is pending


def test_an_exclusion_waits_for_the_lease_it_granted():
    c = Cluster()
    c.run(600, per={3: {"lease": True}})
    # 2 and 3 lose each other; both still talk to the leader, and 3 keeps
    # renewing its lease. {1,2} is chosen (a tie: the smallest ids); the
    # leader stops granting to 3, then waits its lease out.
    plans = c.run(1500, per={2: {"sees": {1}}, 3: {"sees": {1}, "lease": True}})
    props = proposals(plans)
    assert props and props[0].members == fs(1, 2)
    first = next(i for i, p in enumerate(plans) if p.proposals)
    assert not any(g.node == 3 for p in plans[first:] for g in p.grants)
    t_first = c.now - (len(plans) - 1 - first) * 100
    last_rx = c.policy._lead.granted_rx[3]       # the receipt of the last Status granted
    assert t_first - last_rx >= c.cfg.exclusion_wait_ms
    assert t_first - last_rx < c.cfg.exclusion_wait_ms + 100    # and no longer


def test_a_briefly_broken_clique_is_not_acted_on():
    c = Cluster()
    c.run(600)
    plans = c.run(200, per={3: {"sees": {1}}})     # 3 lost 2 for 200 ms
    assert proposals(plans) == [] and c.policy.broken_since is not None
    c.run(100)
    assert c.policy.broken_since is None


def test_a_member_that_restarted_while_online_gets_a_new_generation():
    c = Cluster()
    c.run(600)
    props = proposals(c.run(100, per={2: {"fresh": True}}))
    assert props == [Gen(2, C3, C3, C3)]


def test_rejoin_needs_stable_connectivity_a_join_request_and_may_commit():
    c = Cluster()
    c.apply(gen(c.state, {1, 2}))
    c.run(600, silent=[3])
    join = {3: {"join": JoinRequest(3, 0)}}
    plans = c.run(900, per=join)
    assert proposals(plans) == []                # connected for less than 2 x suspect
    plans = c.run(200, per=join)
    assert proposals(plans) == [Gen(3, C3, C3, fs(1, 2))]
    c2 = Cluster()
    c2.apply(gen(c2.state, {1, 2}))
    c2.run(1500, per={3: {"join": JoinRequest(3, 5000)}})        # still far behind
    assert proposals(c2.run(300, per={3: {"join": JoinRequest(3, 5000)}})) == []


def test_online_for_a_member_that_reached_the_marker():
    c = Cluster()
    c.apply(gen(c.state, {1, 2}))
    c.apply(gen(c.state, C3))                   # 3 recovering in 3
    c.run(600, per={3: {"online": OnlineRequest(3, 2)}})          # an old marker: nothing
    assert Online(3, 3) not in proposals(c.run(100, per={3: {"online": OnlineRequest(3, 2)}}))
    assert proposals(c.run(100, per={3: {"online": OnlineRequest(3, 3)}})) == [Online(3, 3)]


@pytest.mark.parametrize("configured,members,answers,want", [
    (C3, C3, {2: PRECOMMIT_HELD}, True),                         # any precommit: commit
    (C3, C3, {2: NO_PRECOMMIT, 3: PRECOMMIT_HELD}, True),
    (C3, C3, {2: NO_PRECOMMIT}, None),                           # 2 of 3 may still hold one
    (C3, C3, {2: NO_PRECOMMIT, 3: NO_PRECOMMIT}, False),
    (C3, fs(1, 2), {2: NO_PRECOMMIT}, False),                    # 3 was never asked
    (frozenset({1, 2, 3, 4}), frozenset({1, 2, 3, 4}), {2: NO_PRECOMMIT, 3: NO_PRECOMMIT},
     False),                                                     # 2 left < majority 3
    (C5, C5, {2: NO_PRECOMMIT, 3: NO_PRECOMMIT}, None),
    (C5, C5, {2: NO_PRECOMMIT, 3: NO_PRECOMMIT, 9: NO_PRECOMMIT}, None),  # 9: not configured
])
def test_decide_rule(configured, members, answers, want):
    s = GenState(1, configured)
    Log(s)(gen(s, members))                      # the transaction's generation 2
    Log(s)(gen(s, members))                      # decided from generation 3
    assert LeaderPolicy.decide("MTM-1-2-5", s, answers) is want


def test_in_doubt_gids_are_asked_about_then_decided():
    c = Cluster()
    c.apply(gen(c.state, C3))                    # generation 2
    c.apply(gen(c.state, {1, 2}))                # 3 out: generation 3
    c.run(600, silent=[3], per={2: {"prepared_old": frozenset({"MTM-3-2-7", "MTM-1-3-1",
                                                              "MTM-3-2-8:user"})}})
    plan = c.run(100, silent=[3], per={2: {"prepared_old": frozenset({"MTM-3-2-7"})}})[0]
    assert plan.resolving == ("MTM-3-2-7",)      # current-gen and client-held gids: not
    plans = c.run(100, silent=[3], per={2: {"prepared_old": frozenset({"MTM-3-2-7"}),
                                          "answers": (("MTM-3-2-7", NO_PRECOMMIT),)}})
    assert proposals(plans) == []                # 2 'n' of 3 needed: the leader's own too
    c.policy.on_status(c.status(1, answers=(("MTM-3-2-7", NO_PRECOMMIT),)), c.now)
    assert proposals(c.run(100, silent=[3], per={2: {"prepared_old": frozenset({"MTM-3-2-7"})}})
                     ) == [Decide("MTM-3-2-7", False)]


def test_forget_once_every_node_finished_after_the_next_generation():
    c = Cluster()
    c.apply(gen(c.state, C3))                    # 2
    c.apply(Decide("MTM-2-1-1", True))           # index 2
    everyone = {n: {"prepared_old": frozenset()} for n in C3}
    c.run(600, per=everyone)
    assert not any(isinstance(p, Forget) for p in proposals(c.run(100, per=everyone)))
    c.apply(gen(c.state, C3))                    # 3: its markers reflect the decision
    c.policy.on_status(c.status(1), c.now)
    still = {**everyone, 3: {"prepared_old": frozenset({"MTM-2-1-1"})}}
    assert not any(isinstance(p, Forget) for p in proposals(c.run(200, per=still)))
    c.policy.on_status(c.status(1), c.now)
    assert Forget(("MTM-2-1-1",)) in proposals(c.run(100, per=everyone))


def test_a_caught_up_non_member_completes_the_majority_a_dead_member_leaves():
    """Generation {1, 2}, node 3 out and catching up from node 1; node 2
    dies. {1} alone is no majority: the leader proposes {1, 3} at once -
    node 2 excluded, node 3 joined - with node 1 (ONLINE in the last
    committable generation) its donor. Without a caught-up joiner it waits."""
    c = Cluster()
    c.apply(gen(c.state, {1, 2}))
    c.run(1500, per={3: {"join": JoinRequest(3, 0), "sees": {1, 2}}})
    # node 2 goes silent; 3 still reaches 1
    plans = c.run(700, silent=[2], per={3: {"join": JoinRequest(3, 0), "sees": {1}}})
    assert set(proposals(plans)) == {Gen(3, fs(1, 3), C3, fs(1))}
    c2 = Cluster()
    c2.apply(gen(c2.state, {1, 2}))
    c2.run(1500, per={3: {"sees": {1, 2}}})                   # 3 connected, not caught up
    assert proposals(c2.run(1000, silent=[2], per={3: {"sees": {1}}})) == []


def test_a_restarted_member_is_given_time_to_reach_every_peer():
    """Node 2 restarted (``fresh``): its links come up one by one, so for a
    while it sees node 1 but not node 3. Its restart asks for a new
    generation, but the clique is not judged before ``restable_ms``: node
    3, healthy, is not excluded for a link that is still coming up."""
    c = Cluster()
    c.run(1000)
    fresh = {2: {"fresh": True, "sees": {1}}, 3: {"sees": {1}}}
    props = proposals(c.run(900, per=fresh))
    assert props and set(props) == {Gen(2, C3, C3, C3)}      # the same members again
    # a clique that stays broken past restable_ms is acted on
    c2 = Cluster()
    c2.run(1000)
    broken = {2: {"fresh": True, "sees": {1}}, 3: {"sees": {1}}}
    props = proposals(c2.run(1300, per=broken))
    assert props[-1].members != C3 and len(props[-1].members) == 2
