"""Failure detection, read leases and the Raft leader's generation policy: pure cores.

What this module owns: *when* the cluster changes generation and what it
proposes to the log; ``consensus/gens.py`` owns what an applied entry
means. No I/O, clocks or randomness: the shell passes its monotonic clock
as ``now_ms`` and carries out what the cores return.

- ``FailureDetector``: one per node. ``heard_from(peer, now)`` on every
  ``Status`` received; a peer silent for ``suspect_ms`` is suspected. The
  shell reports each wake-up of its heartbeat timer with ``loop_tick
  (expected, actual)``; while the loop lags more than ``lag_threshold_ms``,
  and for ``suspect_ms`` after, it suspects nobody: the silence it would see
  is its own (GENERATIONS.md section 6: "While its own loop lags more than
  100 ms, it suspects no one").
- ``ReadLease``: one per node. A node serves reads only while ONLINE and
  within ``lease_ms`` of sending a ``Status`` (its own clock) that the
  leader answered with a ``LeaseGrant``. The leader grants only after a
  quorum of voters, in its term, echoed a round it broadcast *after* it
  received that Status (a ReadIndex-style confirmation), and only to an
  ONLINE member it is not about to exclude.
- ``LeaderPolicy``: one per node, active while the node leads. From the
  ``GenState``, the Statuses (connectivity, join and online requests,
  in-doubt gids and the answers about them) and its detector, it plans the
  entries to propose (``Plan.proposals``), the lease grants, and the gids
  to ask about.

Rules of the policy (GENERATIONS.md sections 5 and 6):

- **Exclusion.** A member that is silent (suspected) or outside the best
  clique of mutually connected members, or a member that restarted while
  ONLINE (``Status.fresh``: it lost what its commit cores knew of this
  generation's transactions), leads to ``Gen(members ∩ clique)`` - the
  same members again for a restart. Only with donors, a majority of
  configured nodes, and never while the leader's own loop lags. A clique
  broken among live members is acted on once broken for
  ``clique_grace_ms`` (detectors notice a crash at slightly different
  moments); ties go to the clique whose least recently heard member was
  heard last.
- **Read leases.** Once the policy wants to exclude X it grants X nothing
  more, and it proposes the generation only when every grant to an
  excluded node is ``exclusion_wait_ms = lease_ms * (1 + drift)**2`` old
  (counted from the receipt of the Status it answered, which X sent
  earlier) and it has led that long itself (grants of earlier leaders
  were confirmed by a quorum before this leader's election). A leader
  grants only once it has applied an entry of its own term, and never to
  a node that a Gen in its log (committed or not, not yet applied) leaves
  out. So once a Gen without X is proposed, every later grant to X comes
  from a leader that has the Gen in its log and refuses, or from one whose
  own-term commit made that Gen impossible (a log holding an entry of its
  term cannot hold an entry of an earlier term after it): X stops reading
  before a generation without it can commit.
- **Joining.** One joiner per generation, only when every member is ONLINE
  (``may_commit``), once the joiner has been mutually connected with every
  member for ``restable_ms`` (2 x suspect) and reports its catch-up within
  ``join_lag_ms`` (``Status.join``).
- **Online.** ``Online(m, num)`` for a RECOVERY member that reports it
  reached its donor's marker of the current generation (``Status.online``).
  A member still in RECOVERY ``recovery_timeout_ms`` after the generation
  began is treated as outside the clique.
- **In-doubt transactions** (``Status.prepared_old``: prepared here, of a
  generation older than the reporter's, from each node's newest Status
  received within ``suspect_ms``) are asked about (``Plan.resolving``,
  broadcast in the leader's Status). A node answers 'p' if it holds a
  precommit record, 'n' only when it can never hold one: its applied
  generation is later than the transaction's (the fence) and no precommit
  write of it is in flight. Any 'p' -> ``Decide(commit)`` (a precommit
  means every member voted yes). 'n' from enough of the transaction's
  configured nodes (non-members of its generation count: they are never
  asked to precommit) that a precommit majority can no longer form ->
  ``Decide(abort)``. Otherwise wait.
- **Forget** a decided gid once its Decide precedes the current
  generation's entry (every donor marker of this generation, and so every
  catch-up, reflects the outcome) and every configured node reported, from
  the current generation, an applied index past the Decide and the gid no
  longer prepared.
- Proposals are deduplicated until applied (or ``proposal_timeout_ms``);
  ``GenState`` validates them again when they apply.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import combinations

from consensus.gens import (DEAD, ONLINE, RECOVERY, Decide, Forget, Gen, GenState, Online,
                            gid_gen, majority)

PRECOMMIT_HELD, NO_PRECOMMIT = "p", "n"


@dataclass(frozen=True)
class PolicyConfig:
    heartbeat_ms: int = 100
    suspect_ms: int = 500
    lease_ms: int = 300
    drift: float = 0.1             # bound on the rate difference of two nodes' clocks
    lag_threshold_ms: int = 100
    join_lag_ms: int = 1000
    restable_ms: int = 1000        # 2 x suspect
    clique_grace_ms: int = 250
    recovery_timeout_ms: int = 3000
    proposal_timeout_ms: int = 1000
    max_resolving: int = 64
    max_forget: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_ms * 2 <= self.suspect_ms:
            raise ValueError("need 0 < 2 x heartbeat_ms <= suspect_ms")
        if not 0 <= self.drift < 1:
            raise ValueError("drift is a fraction: 0 <= drift < 1")
        if not 0 < self.lease_ms * (1 + self.drift) < self.suspect_ms:
            raise ValueError("need lease_ms < suspect_ms / (1 + drift)")
        if self.exclusion_wait_ms > self.suspect_ms:
            raise ValueError(f"lease_ms * (1 + drift)^2 = {self.exclusion_wait_ms} ms exceeds "
                             f"suspect_ms: a silent node would wait for its lease, not the "
                             f"detector")
        if self.lag_threshold_ms <= 0 or self.restable_ms < self.suspect_ms:
            raise ValueError("lag_threshold_ms > 0 and restable_ms >= suspect_ms")

    @classmethod
    def from_timeouts(cls, heartbeat_ms: int, suspect_ms: int, lease_ms: int) -> PolicyConfig:
        """The configuration a node's ``[timeouts]`` give (rejoin after
        twice the suspect timeout, at least a second)."""
        return cls(heartbeat_ms=heartbeat_ms, suspect_ms=suspect_ms, lease_ms=lease_ms,
                   restable_ms=max(1000, 2 * suspect_ms))

    @property
    def exclusion_wait_ms(self) -> int:
        """How long after the last grant to X the leader may commit a
        generation without X: X's lease of ``lease_ms`` on a clock up to
        ``drift`` slow, measured on a clock up to ``drift`` fast."""
        return int(self.lease_ms * (1 + self.drift) ** 2 + 0.999)


# --- messages -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JoinRequest:
    """A node outside the generation caught up from a donor to within ``lag_ms``."""
    node: int
    lag_ms: int


@dataclass(frozen=True)
class OnlineRequest:
    """A RECOVERY member reached its donor's marker of generation ``num``."""
    node: int
    num: int


@dataclass(frozen=True)
class Status:
    """Every ``heartbeat_ms`` from every node to every peer (GENERATIONS.md 6).

    ``sent_ms`` is the sender's clock: with ``lease`` it asks the leader for a
    read lease starting then. ``echo`` is the (term, round) of the last
    leader Status it received. ``answers`` answer the leader's ``resolving``:
    (gid, 'p'|'n'). The leader fills ``round`` and ``resolving``."""
    node: int
    sent_ms: int
    term: int
    gen: int
    applied: int
    sees: frozenset[int]
    lag_ms: int = 0
    last_online_in: int = 0        # as its GenState says (the log has it: for status views)
    fresh: bool = False
    join: JoinRequest | None = None
    online: OnlineRequest | None = None
    prepared_old: frozenset[str] = frozenset()
    answers: tuple[tuple[str, str], ...] = ()
    echo: tuple[int, int] = (0, 0)
    lease: bool = False
    round: int = 0
    resolving: tuple[str, ...] = ()
    # 0, or (the node ONLINE) the lowest generation of a gid prepared there,
    # else its generation: precommit records of gids below every node's may
    # go (replication/generations.py, ``settled_gen``)
    settled: int = 0
    # the node can no longer get every peer's transactions (a peer dropped
    # the WAL it needs): it must leave the generation and stay out
    disabled: bool = False


@dataclass(frozen=True)
class LeaseGrant:
    """The leader confirmed the Status ``node`` sent at ``sent_ms`` (its clock)."""
    node: int
    sent_ms: int
    term: int


@dataclass(frozen=True)
class Plan:
    proposals: tuple = ()
    grants: tuple[LeaseGrant, ...] = ()
    round: int = 0
    resolving: tuple[str, ...] = ()


# --- wire codec ----------------------------------------------------------------------------------

WIRE_VERSION = 1


class PolicyDecodeError(ValueError):
    """Bytes that are not a Status or LeaseGrant of this version."""


def encode_message(m) -> bytes:
    """Status or LeaseGrant as compact JSON with a type tag and a version."""
    if m.__class__ is LeaseGrant:
        d = {"t": "grant", "node": m.node, "sent_ms": m.sent_ms, "term": m.term}
    elif m.__class__ is Status:
        d = {"t": "status", "node": m.node, "sent_ms": m.sent_ms, "term": m.term,
             "gen": m.gen, "applied": m.applied, "sees": sorted(m.sees), "lag_ms": m.lag_ms,
             "last_online_in": m.last_online_in,
             "fresh": m.fresh,
             "join": None if m.join is None else [m.join.node, m.join.lag_ms],
             "online": None if m.online is None else [m.online.node, m.online.num],
             "prepared_old": sorted(m.prepared_old),
             "answers": [[g, a] for g, a in m.answers], "echo": list(m.echo),
             "lease": m.lease, "round": m.round, "resolving": list(m.resolving),
             "settled": m.settled, "disabled": m.disabled}
    else:
        raise TypeError(f"not a policy message: {m!r}")
    d["v"] = WIRE_VERSION
    return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()


def _n(v, what: str, lo: int = 0) -> int:
    if type(v) is not int or v < lo:
        raise PolicyDecodeError(f"{what}: expected an integer >= {lo}, got {v!r}")
    return v


def _b(v, what: str) -> bool:
    if type(v) is not bool:
        raise PolicyDecodeError(f"{what}: expected a boolean, got {v!r}")
    return v


def _strs(v, what: str) -> list[str]:
    if not isinstance(v, list) or any(not isinstance(x, str) or not x for x in v):
        raise PolicyDecodeError(f"{what}: expected a list of strings, got {v!r}")
    return v


def _pair(v, what: str) -> list:
    if not isinstance(v, list) or len(v) != 2:
        raise PolicyDecodeError(f"{what}: expected a pair, got {v!r}")
    return v


def decode_message(data: bytes):
    try:
        d = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise PolicyDecodeError(f"not JSON ({exc})") from None
    if not isinstance(d, dict) or d.get("v") != WIRE_VERSION or type(d.get("v")) is not int:
        raise PolicyDecodeError(f"not a version {WIRE_VERSION} policy message")
    t = d.get("t")
    keys = {"grant": {"v", "t", "node", "sent_ms", "term"},
            "status": {"v", "t", "node", "sent_ms", "term", "gen", "applied", "sees",
                       "lag_ms", "last_online_in", "fresh", "join", "online", "prepared_old",
                       "answers", "echo", "lease", "round", "resolving", "settled",
                       "disabled"}}.get(t)
    if keys is None:
        raise PolicyDecodeError(f"unknown message type {t!r}")
    if set(d) != keys:
        raise PolicyDecodeError(f"{t}: fields {sorted(d)} (expected {sorted(keys)})")
    if t == "grant":
        return LeaseGrant(_n(d["node"], "node", 1), _n(d["sent_ms"], "sent_ms"),
                          _n(d["term"], "term"))
    sees = d["sees"]
    if not isinstance(sees, list) or any(type(x) is not int for x in sees) \
            or len(set(sees)) != len(sees):
        raise PolicyDecodeError(f"sees: expected distinct node ids, got {sees!r}")
    join = online = None
    if d["join"] is not None:
        a, b = _pair(d["join"], "join")
        join = JoinRequest(_n(a, "join node", 1), _n(b, "join lag_ms"))
    if d["online"] is not None:
        a, b = _pair(d["online"], "online")
        online = OnlineRequest(_n(a, "online node", 1), _n(b, "online num", 1))
    answers = []
    if not isinstance(d["answers"], list):
        raise PolicyDecodeError("answers: expected a list")
    for x in d["answers"]:
        g, a = _pair(x, "answer")
        if not isinstance(g, str) or a not in (PRECOMMIT_HELD, NO_PRECOMMIT):
            raise PolicyDecodeError(f"answer: bad {x!r}")
        answers.append((g, a))
    e0, e1 = _pair(d["echo"], "echo")
    return Status(_n(d["node"], "node", 1), _n(d["sent_ms"], "sent_ms"), _n(d["term"], "term"),
                  _n(d["gen"], "gen", 1), _n(d["applied"], "applied"),
                  frozenset(_n(x, "sees", 1) for x in sees), _n(d["lag_ms"], "lag_ms"),
                  last_online_in=_n(d["last_online_in"], "last_online_in"),
                  fresh=_b(d["fresh"], "fresh"), join=join, online=online,
                  prepared_old=frozenset(_strs(d["prepared_old"], "prepared_old")),
                  answers=tuple(answers), echo=(_n(e0, "echo term"), _n(e1, "echo round")),
                  lease=_b(d["lease"], "lease"), round=_n(d["round"], "round"),
                  resolving=tuple(_strs(d["resolving"], "resolving")),
                  settled=_n(d["settled"], "settled"), disabled=_b(d["disabled"], "disabled"))


# --- failure detector -----------------------------------------------------------------------------

class FailureDetector:
    def __init__(self, self_id: int, peers, now_ms: int, *, suspect_ms: int = 500,
                 lag_threshold_ms: int = 100, grace_ms: int | None = None) -> None:
        self.self_id = self_id
        self.suspect_ms = suspect_ms
        self.lag_threshold_ms = lag_threshold_ms
        self.grace_ms = suspect_ms if grace_ms is None else grace_ms
        # A node that just started has heard nobody yet: everyone gets a
        # full suspect period.
        self.last_heard: dict[int, int] = {p: now_ms for p in peers if p != self_id}
        self.lag_ms = 0
        self.quiet_until = now_ms

    def heard_from(self, peer: int, now_ms: int) -> None:
        if peer in self.last_heard and now_ms > self.last_heard[peer]:
            self.last_heard[peer] = now_ms

    def loop_tick(self, expected_ms: int, actual_ms: int) -> None:
        """The heartbeat timer meant to wake at ``expected_ms`` woke at
        ``actual_ms`` (a stall, an overloaded loop, a clock step)."""
        self.lag_ms = max(0, actual_ms - expected_ms)
        if self.lag_ms > self.lag_threshold_ms:
            self.quiet_until = max(self.quiet_until, actual_ms + self.grace_ms)

    def quiet(self, now_ms: int) -> bool:
        """True while this node's own lag makes silences meaningless."""
        return now_ms < self.quiet_until

    def suspects(self, now_ms: int) -> frozenset[int]:
        if self.quiet(now_ms):
            return frozenset()
        return frozenset(p for p, t in self.last_heard.items() if now_ms - t > self.suspect_ms)

    def sees(self, now_ms: int) -> frozenset[int]:
        return frozenset(self.last_heard) - self.suspects(now_ms)


# --- read lease -----------------------------------------------------------------------------------

class ReadLease:
    def __init__(self, lease_ms: int = 300) -> None:
        self.lease_ms = lease_ms
        self.until: int | None = None

    def granted(self, sent_ms: int) -> None:
        end = sent_ms + self.lease_ms
        if self.until is None or end > self.until:
            self.until = end

    def valid(self, now_ms: int) -> bool:
        return self.until is not None and now_ms < self.until

    def revoke(self) -> None:
        self.until = None


def user_status(gen_status: str, *, lease_valid: bool, catching_up: bool = False,
                disabled: bool = False) -> str:
    """What ``mtm.status()`` shows: online, recovery, catchup, isolated, disabled."""
    if disabled:
        return "disabled"
    if gen_status == ONLINE:
        return "online" if lease_valid else "isolated"
    if gen_status == RECOVERY:
        return "recovery"
    assert gen_status == DEAD
    return "catchup" if catching_up else "isolated"


# --- the leader's policy --------------------------------------------------------------------------

@dataclass
class _Inflight:
    entry: object
    at_ms: int
    index: int


@dataclass
class _LeaderState:
    term: int
    since_ms: int
    round: int = 0
    requests: dict = field(default_factory=dict)    # node -> [(sent_ms, rx_ms, need_round)]
    granted_rx: dict = field(default_factory=dict)  # node -> rx of the last Status granted
    inflight: dict = field(default_factory=dict)    # key -> _Inflight
    answers: dict = field(default_factory=dict)     # gid -> {node: 'p'|'n'}
    gen_seen: tuple[int, int] = (0, 0)              # (gen num, when this leader saw it)


MAX_PENDING_LEASE_REQUESTS = 8


class LeaderPolicy:
    """The shell calls ``on_status`` for every Status (its own too), ``tick``
    every heartbeat (it returns an empty Plan unless ``leader``), and
    ``proposed`` for each entry of the plan it got into the log."""

    def __init__(self, self_id: int, voters, now_ms: int,
                 config: PolicyConfig | None = None) -> None:
        self.self_id = self_id
        self.voters = frozenset(voters)
        self.config = config or PolicyConfig()
        self.started_ms = now_ms
        self.statuses: dict[int, tuple[Status, int]] = {}     # node -> (latest, rx)
        self.connected_since: dict[tuple[int, int], int] = {}     # (non-member, member)
        self.excluding: frozenset[int] = frozenset()
        self.broken_since: int | None = None
        self._lead: _LeaderState | None = None

    # -- inputs ------------------------------------------------------------------------------------

    def on_status(self, st: Status, now_ms: int) -> None:
        prev = self.statuses.get(st.node)
        if prev is not None and st.sent_ms < prev[0].sent_ms \
                and now_ms - prev[1] <= self.config.suspect_ms:
            return      # overtaken by a newer one (a restarted node's clock is accepted later)
        self.statuses[st.node] = (st, now_ms)
        ld = self._lead
        if ld is None:
            return
        if st.lease:
            q = ld.requests.setdefault(st.node, [])
            q.append((st.sent_ms, now_ms, ld.round + 1))
            del q[:-MAX_PENDING_LEASE_REQUESTS]
        for gid, a in st.answers:
            ld.answers.setdefault(gid, {})[st.node] = a

    def proposed(self, entry, index: int, now_ms: int) -> None:
        if self._lead is not None:
            self._lead.inflight[_key(entry)] = _Inflight(entry, now_ms, index)

    @property
    def leader_since_ms(self) -> int | None:
        return None if self._lead is None else self._lead.since_ms

    def can_exclude(self, node: int, now_ms: int) -> bool:
        """May a generation without ``node`` be proposed now (its lease)?"""
        ld = self._lead
        wait = self.config.exclusion_wait_ms
        if ld is None or now_ms - ld.since_ms < wait:
            return False
        rx = ld.granted_rx.get(node)
        return rx is None or now_ms - rx >= wait

    # -- the plan ----------------------------------------------------------------------------------

    def tick(self, now_ms: int, state: GenState, fd: FailureDetector, *, leader: bool,
             term: int, log_ready: bool = False, pending=()) -> Plan:
        """The plan for this heartbeat. ``log_ready``: this leader has applied
        an entry of its own term (its ``state`` is the cluster's, and no
        entry of an earlier term that its log lacks can commit any more).
        ``pending``: the generation entries in its log after the applied
        index (decoded), committed or not: a Gen there may still commit."""
        if not leader:
            self._lead = None
            self.excluding = frozenset()
            return Plan()
        ld = self._lead
        if ld is None or ld.term != term:
            ld = self._lead = _LeaderState(term, now_ms)
        ld.round += 1
        if not log_ready:
            return Plan(round=ld.round)
        if ld.gen_seen[0] != state.gen.num:
            ld.gen_seen = (state.gen.num, now_ms)
        self._drop_applied(ld, state, now_ms)
        pending_gens = [e for e in pending if e.__class__ is Gen and e.num > state.gen.num]
        proposals: list = []
        self._plan_gen(ld, now_ms, state, fd, proposals, bool(pending_gens))
        # Whoever a Gen in the log leaves out gets no lease: that Gen may
        # commit at any moment (it waited out the leases when proposed).
        unsafe = set(self.excluding)
        for g in pending_gens:
            unsafe |= state.gen.members - g.members
        grants = self._grants(ld, state, term, unsafe)
        self._plan_online(ld, state, proposals)
        resolving = self._plan_decisions(ld, state, proposals, now_ms)
        self._plan_forget(ld, state, proposals)
        return Plan(tuple(proposals), grants, ld.round, resolving)

    def _drop_applied(self, ld: _LeaderState, state: GenState, now_ms: int) -> None:
        timeout = self.config.proposal_timeout_ms
        for k, f in list(ld.inflight.items()):
            if f.index <= state.index or now_ms - f.at_ms >= timeout:
                del ld.inflight[k]

    def _recent(self, node: int, now_ms: int) -> Status | None:
        s = self.statuses.get(node)
        if s is None or now_ms - s[1] > self.config.suspect_ms:
            return None
        return s[0]

    def _plan_gen(self, ld: _LeaderState, now_ms: int, state: GenState, fd: FailureDetector,
                  out: list, gen_pending: bool) -> None:
        cfg = self.config
        gen = state.gen
        sees_self = fd.sees(now_ms)
        alive = sees_self | {self.self_id}
        recent = {n: self._recent(n, now_ms) for n in gen.configured if n != self.self_id}
        own = self.statuses.get(self.self_id)
        recent[self.self_id] = own[0] if own is not None else None

        def sees(a: int) -> frozenset[int]:
            if a == self.self_id:
                return sees_self
            st = recent.get(a)
            return st.sees if st is not None else frozenset()

        def mutual(a: int, b: int) -> bool:
            return b in sees(a) and a in sees(b)

        # Non-members: since when each has been connected to each member
        # (both ways), per pair: a member that dies does not reset a
        # joiner's standing with the others.
        for j in gen.configured - gen.members:
            for m in gen.members:
                if j in alive and m in alive and mutual(j, m):
                    self.connected_since.setdefault((j, m), now_ms)
                else:
                    self.connected_since.pop((j, m), None)
        for key in [k for k in self.connected_since if k[0] in gen.members]:
            del self.connected_since[key]

        def joiner(among) -> int | None:
            """A non-member connected to every node of ``among`` for
            ``restable_ms`` and caught up with its donor (``Status.join``)."""
            for j in sorted(gen.configured - gen.members):
                st = recent.get(j)
                if st is None or not among:
                    continue
                if any(now_ms - self.connected_since.get((j, m), now_ms) < cfg.restable_ms
                       or (j, m) not in self.connected_since for m in among):
                    continue
                if st.join is None or st.join.lag_ms > cfg.join_lag_ms or st.gen != gen.num:
                    continue
                return j
            return None

        # Members that restarted while ONLINE: their links come up one by
        # one after the restart, so their clique is not judged before
        # ``restable_ms`` (a healthy peer they had not reached yet was
        # excluded with a grace of 250 ms).
        restarted = {m for m in gen.members
                     if (st := recent.get(m)) is not None and st.fresh and st.gen == gen.num}
        stuck = frozenset(m for m in gen.members
                          if (st := recent.get(m)) is not None and st.disabled)
        if now_ms - ld.gen_seen[1] >= cfg.recovery_timeout_ms:
            stuck |= frozenset(m for m in gen.members if state.status(m) == RECOVERY)
        cand = sorted((gen.members & alive) - stuck)
        if all(mutual(a, b) for a, b in combinations(cand, 2)):
            clique = frozenset(cand)          # only silent (or stuck) members are out
            self.broken_since = None
        else:
            # Members that see the leader but not each other. Detectors
            # notice a crash at slightly different times (clocks, heartbeat
            # phases): a clique broken only because one member suspected a
            # dead peer first must not cost a live member its place. Act on
            # a broken clique once it has lasted ``clique_grace_ms``.
            if self.broken_since is None:
                self.broken_since = now_ms
            grace = cfg.restable_ms if restarted & set(cand) else cfg.clique_grace_ms
            if now_ms - self.broken_since < grace:
                clique = gen.members
            else:
                heard = fd.last_heard
                clique = _best_clique(cand, mutual, state,
                                      lambda n: heard.get(n, now_ms))
        # A member that restarted while ONLINE lost its commit cores' memory
        # of this generation's transactions: a new generation makes them
        # earlier-generation ones, which the cluster decides.
        fresh = any(st is not None and st.fresh and st.gen == gen.num
                    and state.status(m) == ONLINE
                    for m, st in ((m, recent.get(m)) for m in clique))
        if clique != gen.members or fresh:
            self.excluding = gen.members - clique
        else:
            self.excluding = frozenset()
        if fd.quiet(now_ms) or gen_pending or "gen" in ld.inflight:
            return
        if now_ms - self.started_ms < cfg.suspect_ms:
            return      # statuses not collected for a full suspect period yet
        if clique != gen.members or fresh:
            members = clique
            if len(members) < majority(len(gen.configured)):
                # Too few left for a generation: one that caught up from
                # them may make the majority (its donor holds what the
                # excluded hold of what committed: the donors rule).
                j = joiner(clique)
                if j is None:
                    return
                members = clique | {j}
                if len(members) < majority(len(gen.configured)):
                    return
            if not all(self.can_exclude(x, now_ms) for x in self.excluding):
                return
            donors = state.donors_for(members)
            if donors:
                out.append(Gen(gen.num + 1, members, gen.configured, donors))
            return
        if not state.may_commit() or not gen.members <= alive:
            return
        j = joiner(gen.members)
        if j is not None:
            members = gen.members | {j}
            donors = state.donors_for(members)
            if donors:
                out.append(Gen(gen.num + 1, members, gen.configured, donors))

    def _grants(self, ld: _LeaderState, state: GenState, term: int, unsafe) -> tuple:
        # The highest round a quorum of voters has echoed in this term.
        echoes = []
        for v in self.voters:
            if v == self.self_id:
                echoes.append(ld.round)
                continue
            s = self.statuses.get(v)
            st = s[0] if s is not None else None
            ok = st is not None and st.term == term and st.echo[0] == term
            echoes.append(st.echo[1] if ok else 0)
        echoes.sort(reverse=True)
        confirmed = echoes[majority(len(echoes)) - 1]
        out = []
        gen = state.gen
        for node, q in ld.requests.items():
            best = None
            while q and q[0][2] <= confirmed:
                best = q.pop(0)
            if best is None:
                continue
            st = self.statuses.get(node)
            if node not in gen.members or state.status(node) != ONLINE \
                    or node in unsafe or st is None or st[0].gen != gen.num:
                continue
            sent_ms, rx_ms, _ = best
            ld.granted_rx[node] = max(ld.granted_rx.get(node, rx_ms), rx_ms)
            out.append(LeaseGrant(node, sent_ms, term))
        return tuple(out)

    def _plan_online(self, ld: _LeaderState, state: GenState, out: list) -> None:
        gen = state.gen
        for m in sorted(gen.members):
            if state.status(m) != RECOVERY:
                continue
            s = self.statuses.get(m)
            req = s[0].online if s is not None else None
            if req is not None and req.num == gen.num:
                e = Online(m, gen.num)
                if _key(e) not in ld.inflight:
                    out.append(e)

    def _plan_decisions(self, ld: _LeaderState, state: GenState, out: list,
                        now_ms: int) -> tuple:
        num = state.gen.num
        undecided = set()
        for node in self.statuses:
            st = self._recent(node, now_ms)
            if st is None:
                continue        # what a silent node said long ago may be over
            for gid in st.prepared_old:
                if ":" in gid:
                    continue    # a client's own PREPARE TRANSACTION: held, not in doubt
                g = gid_gen(gid)
                if g is not None and g < num and state.decision(gid) is None:
                    undecided.add(gid)
        for gid in list(ld.answers):
            if gid not in undecided:
                del ld.answers[gid]
        resolving = tuple(sorted(undecided, key=_gid_order)[:self.config.max_resolving])
        for gid in resolving:
            if ("decide", gid) in ld.inflight:
                continue
            commit = self.decide(gid, state, ld.answers.get(gid, {}))
            if commit is not None:
                out.append(Decide(gid, commit))
        return resolving

    @staticmethod
    def decide(gid: str, state: GenState, answers: dict[int, str]) -> bool | None:
        """GENERATIONS.md section 5: any precommit -> commit; a precommit
        majority impossible -> abort; else not yet (None)."""
        if any(a == PRECOMMIT_HELD for a in answers.values()):
            return True
        g = gid_gen(gid)
        d = state.gen_def(g) if g is not None else None
        if d is None:
            # Forgotten generation: no member set, count answers only.
            members = configured = state.gen.configured
        else:
            members, configured = d
        fenced = (configured - members) | {n for n, a in answers.items()
                                           if a == NO_PRECOMMIT and n in configured}
        if len(configured - fenced) < majority(len(configured)):
            return False
        return None

    def _plan_forget(self, ld: _LeaderState, state: GenState, out: list) -> None:
        if "forget" in ld.inflight:
            return
        decisions = state.decisions()
        if not decisions:
            return
        sts = []
        for n in state.gen.configured:
            s = self.statuses.get(n)
            if s is None or s[0].gen != state.gen.num:
                return
            sts.append(s[0])
        done = []
        for gid in sorted(decisions, key=_gid_order):
            i = state.decision_index(gid)
            if i < state.gen_index and all(st.applied >= i and gid not in st.prepared_old
                                           for st in sts):
                done.append(gid)
                if len(done) >= self.config.max_forget:
                    break
        if done:
            out.append(Forget(tuple(done)))


def _key(entry) -> object:
    cls = entry.__class__
    if cls is Gen:
        return "gen"
    if cls is Online:
        return ("online", entry.node, entry.num)
    if cls is Decide:
        return ("decide", entry.gid)
    if cls is Forget:
        return "forget"
    raise TypeError(entry)


def _gid_order(gid: str) -> tuple:
    return (gid_gen(gid) or 0, gid)


def _best_clique(cand: list[int], mutual, state: GenState, heard) -> frozenset[int]:
    """The largest set of mutually connected candidates; ties: the one with
    donors, then more ONLINE nodes, then the one whose least recently heard
    member was heard last (the others are likelier the dead), then the
    smallest ids. Candidates are at most the configured nodes (a handful):
    all subsets are tried."""
    online = state.online_members()
    for size in range(len(cand), 0, -1):
        best = None
        for combo in combinations(cand, size):
            if all(mutual(a, b) for a, b in combinations(combo, 2)):
                s = frozenset(combo)
                key = (bool(state.donors_for(s)), len(s & online), min(heard(n) for n in s))
                if best is None or key > best[0]:
                    best = (key, s)
        if best is not None:
            return best[1]
    return frozenset()
