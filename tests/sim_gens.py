"""A seeded deterministic simulator: Raft, generations and the commit protocol together.

One ``random.Random(seed)`` decides everything (TigerBeetle's VOPR): the
cluster (3 to 5 data nodes, every one a Raft voter), the fault profile,
message loss, duplication, delays (and so reordering), partitions
(symmetric, one-way, a "bridge" node that sees both halves, the leader
isolated, one link cut, a recovering node cut from the leader but not
from its donor), crashes (at random, of the leader, and at every
persistence point of the Raft Ready loop: before ``save``, between its durable steps or
in a torn append, after it but before sending everything, after sending but
before applying; a precommit record being written when its node dies lands
or is lost), slow nodes (the event loop stalls: everything for the node
waits), clocks (each runs at its own rate within the drift bound, and some
jump forward), Raft log compactions and membership changes (a learner that
never answers is added and removed: invariant 13).

Each node runs what ``replication/node.py`` will run: a ``RaftNode`` over a
``SimStorage`` (tests/sim_raft.py), a ``GenState`` applied from its committed
entries, a ``FailureDetector``, a ``ReadLease``, a ``LeaderPolicy`` (active
while it leads), and the commit cores (``Coordinator``, ``Participant``).
Its PostgreSQL is a small durable data model: prepared transactions (each
locks one of a few keys; a second prepare on a locked key fails as a lock
timeout), committed ones with a per-key commit order, rolled back ones,
precommit records, its WAL of its own transactions (prepare, commit,
rollback), one ordered stream per origin that every other node reads, and
the donor markers PS(gen) with the state a recovering node copies (its
catch-up from the donor, all origins, up to the marker). Every 50 ms (its
own clock) a node ticks Raft; every 100 ms it also runs the policy, sends
its ``Status`` to every peer and ticks the coordinator. Clients commit on
random nodes and read from random nodes. One message in 50 goes through
its wire codec (Raft's, or policy.py's) and must come back equal.

Invariants (GENERATIONS.md section 7), checked when the event that could
break them happens, so after every event:

1.  At most one leader per term (``leaders``); every entry a node applies
    at an index is the one every other node applied there (``entries``);
    a leader, when first seen in a term, holds every entry committed in an
    earlier term; snapshots made or installed at an index carry the same
    ``GenState`` bytes (``snap_at``) and ``restore`` round-trips them.
2.  No Raft message reflects a term, vote or entry its sender has not
    saved (``durable_violation``, checked on every message sent, with
    crashes cut into every step of ``save``).
3.  A node's applied generation never decreases, within a life and across
    restarts (after the restart re-applies its committed prefix); every
    node applies the same (members, configured, donors) for a number
    (``gen_defs``).
4.  A node votes yes on (prepares) or precommits (``Persist``,
    ``PersistOwn``) a transaction only while its applied generation is the
    transaction's, it is ONLINE in it and has not restarted in it.
5.  When a generation is first applied anywhere it has donors, and each
    donor holds (prepared or committed) every transaction committed
    anywhere in an earlier generation (global oracle ``committed_any``).
6.  The first commit of a transaction anywhere: by its coordinator only
    with precommit records on a majority of its generation's configured
    nodes; by a ``Decide`` only with at least one record (a record means
    every member voted yes). A catch-up copy never commits first.
7.  No gid is both committed and rolled back (``committed_any`` /
    ``aborted_any``); every ``Decide`` a node executes is a committed
    entry (invariant 1) and all agree (``decided``); an abort is never
    decided while a majority holds precommit records.
8.  A node that answered 'n' (no precommit) for T never acknowledges a
    precommit of T, and no precommit record of T lands there afterwards
    (``answered_n``).
9.  Every COMMIT a client heard, of a generation <= g, is held by every
    node when it becomes ONLINE in g (as a donor, or by its ``Online``);
    at the end it is committed on every node.
10. Conflicting commits (same key) are in the same order on every node
    (checked at each commit and at each catch-up copy, ``OrderOk``); at
    quiescence every node holds identical data.
11. A read is served only by a node whose lease is valid in real time
    (sent time of the answered Status + lease x (1 + drift)) and that no
    generation committed anywhere excludes; and when a generation is first
    committed, no node it excludes still holds a lease valid by its own
    clock and in real time (reads are random: this catches the window).
13. At most one uncommitted conf change in a leader's log, and a leader
    accepts one only after committing an entry of its own term.
14. Liveness, after the faults stop and every node restarts: a leader
    within 2 election timeouts (``LEADER_BOUND_MS``); then within
    ``CONVERGE_BOUND_MS`` every node ONLINE in one generation of all of
    them, every in-doubt gid decided, nothing prepared, identical data.
    Then one node crashes: a client's commit succeeds within 1 s
    (``RESUME_BOUND_MS``) when it was a follower; when it was the leader,
    a new leader comes within ``REELECT_BOUND_MS`` and a commit succeeds
    within 1 s of its election (it waits out the old leases, 363 ms,
    before excluding the old leader).

The commit cores' own ``check_invariants`` and ``GenState.check_invariants``
run after every change too, the Raft core's in a third of the runs
(tests/sim_raft.py runs them always). Invariant 12 is the referee (issue 15).

Run shapes: 2 s of faults, or (30% of runs) 4 s in which one node is out
early and rejoins under the faults; most runs skip the first election.

A failure raises ``SimFailure`` naming the seed. ``python tests/sim_gens.py
SEED`` replays one seed verbosely; ``--seeds N [--start S]`` runs many.
"""
from __future__ import annotations

import heapq
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from consensus.gens import (ONLINE, RECOVERY, BecomeOnline, DecisionMade,  # noqa: E402
                            Forgotten, GenState, Ignored, MayCommit, SwitchTo, decode_entry,
                            encode_entry,
                            gid_gen, majority)
from consensus.policy import (FailureDetector, JoinRequest, LeaderPolicy,  # noqa: E402
                              LeaseGrant, OnlineRequest, PolicyConfig, ReadLease, Status)
from consensus.policy import decode_message as decode_policy_message  # noqa: E402
from consensus.policy import encode_message as encode_policy_message  # noqa: E402
from consensus.raft import (ConfChange, ConfChangeRefused, ConfChangeType,  # noqa: E402
                            EntryType, Message, NotLeader, ProposalDropped, RaftNode, Role,
                            decode_conf_change, decode_message, encode_message)
from replication.commit import (STATEMENT_COMPLETION_UNKNOWN, AbortLocal,  # noqa: E402
                                CommitLocal, Coordinator, Decision, FinishLocal, Participant,
                                Persist, PersistOwn, Precommit, PrecommitAck, Reply, Send,
                                VoteRequest, make_gid, parse_gid)
from sim_raft import SimCrash, SimStorage, durable_violation, seed_cli  # noqa: E402

TICK_MS = 50                  # one Raft tick
HEARTBEAT_TICKS = 2           # 100 ms: a Raft heartbeat, and a Status to every peer
# Elections after 500 to 1000 ms (GENERATIONS.md section 6) in ten steps: with
# 100 ms ticks (five steps) two followers whose timers run in step split
# their votes one election in five, several times running now and then.
ELECTION_TICKS = 10
CFG = PolicyConfig()          # suspect 500 ms, lease 300 ms, drift 0.1
N_KEYS = 3
VOTE_TIMEOUT_MS = 1000
SAFETY_MS = 2000
REJOIN_SHARE = 0.3
REJOIN_SAFETY_MS = 4000
LEADER_BOUND_MS = 2 * 2 * ELECTION_TICKS * TICK_MS      # 2 (maximal) election timeouts
CONVERGE_BOUND_MS = 15000
RESUME_BOUND_MS = 1000
REELECT_BOUND_MS = 6 * 2 * ELECTION_TICKS * TICK_MS   # 6 (maximal) election timeouts
STABLE_MS = 500                # how long "converged" must hold before the liveness crash
PHANTOM = 99                  # a learner that never answers (conf changes, invariant 13)

# event kinds
(K_TIMER, K_MSG, K_STREAM, K_WRITE, K_RESTART, K_FAULT, K_CLIENT, K_READ, K_RECOVER,
 K_UNSTALL) = range(10)


class SimFailure(AssertionError):
    pass


@dataclass(frozen=True)
class Marker:
    """A donor's marker PS(num): its data when it switched to ``num``."""
    num: int
    donor: int
    committed: frozenset
    rolled_back: frozenset
    prepared: tuple            # ((gid, key), ...)
    hist: tuple                # per key: (gid, ...) in commit order
    cursors: tuple             # ((origin, position in its WAL), ...)


@dataclass
class Faults:
    drop: float
    dup: float
    delay_max: int
    delay_p: float
    partition: float          # per fault event (every ~50 ms)
    crash: float
    crash_leader: float
    down_max: int
    crash_points: float       # per Ready
    write_crash: float        # a crash right after issuing a precommit write
    jump: float
    stall: float
    clock_rates: bool
    conf: float
    compact: float
    client_gap: int
    read_gap: int


class Node:
    def __init__(self, sim: Sim, nid: int) -> None:
        r = sim.rng
        self.id = nid
        self.storage = SimStorage(random.Random(r.getrandbits(32)))
        # PostgreSQL: durable
        self.prepared: dict[str, int] = {}        # gid -> key
        self.locks: dict[int, set] = {k: set() for k in range(N_KEYS)}
        self.committed: set[str] = set()
        self.rolled_back: set[str] = set()
        self.hist: dict[int, list] = {k: [] for k in range(N_KEYS)}
        self.records: dict[str, str] = {}         # gid -> 'p' (mtm.precommits)
        self.wal: list[tuple] = []                # own transactions: (kind, gid, key)
        self.cursors: dict[int, int] = {o: 0 for o in sim.ids if o != nid}
        self.confirmed: dict[int, int] = dict(self.cursors)
        self.markers: dict[int, Marker] = {}
        self.reached = 0                          # our own marker: recovered in that gen
        self.seq = 0
        # the clock: local = offset + rate * real
        self.offset = r.randrange(1_000_000)
        self.rate = r.uniform(0.96, 1.04) if sim.f.clock_rates else 1.0
        self.stall_until = 0
        self.deferred: list[tuple] = []           # events that wait for the stall to end
        # the process
        self.up = False
        self.lives = 0
        self.incarnation = 0
        self.core: RaftNode | None = None
        self.gens: GenState | None = None
        self.fd: FailureDetector | None = None
        self.lease: ReadLease | None = None
        self.policy: LeaderPolicy | None = None
        self.coord: Coordinator | None = None
        self.part: Participant | None = None
        self.fresh_gen: int | None = None
        self.echo = (0, 0)
        self.resolving: tuple = ()
        self.writes: dict[int, tuple] = {}        # write id -> (kind, gid)
        self.recovering: int | None = None
        self.catchup_at: int | None = None
        self.timer_gen = 0
        self.ticks = 0
        self.next_local = 0
        self.sent_real: dict[int, int] = {}       # Status sent_ms -> real time
        self.lease_real = -1                      # real-time end of the lease in force
        self.max_gen = 0                          # across lives
        self.life_gen = 0                         # within this life
        self.last_commit = 0
        self.leader_seen = None

    def local(self, real: int) -> int:
        return int(self.offset + self.rate * real)

    def real_at(self, local: int) -> int:
        return -int(-(local - self.offset) // self.rate)

    def online(self) -> bool:
        """Serving: ONLINE in its generation and not restarted in it."""
        return self.gens.status() == ONLINE and self.fresh_gen is None


class Sim:
    def __init__(self, seed: int, verbose: bool = False) -> None:
        self.seed = seed
        self.verbose = verbose
        r = self.rng = random.Random(seed)
        n = r.choice((3, 3, 3, 4, 5))
        self.ids = list(range(1, n + 1))
        self.configured = frozenset(self.ids)
        calm = r.random() < 0.15
        # The Raft core's own check_invariants after every call (its own
        # simulator, tests/sim_raft.py, always runs them): in a third of the runs.
        self.raft_debug = r.random() < 0.3
        self.f = Faults(
            drop=0.0 if calm else r.choice((0.0, 0.01, 0.05, 0.15)),
            dup=r.choice((0.0, 0.02, 0.05)),
            delay_max=r.choice((5, 30, 150, 400)), delay_p=r.choice((0.05, 0.3)),
            partition=0.0 if calm else r.choice((0.0, 0.01, 0.03, 0.06)),
            crash=0.0 if calm else r.choice((0.0, 0.005, 0.02)),
            crash_leader=0.0 if calm else r.choice((0.0, 0.005, 0.02)),
            down_max=r.choice((300, 1000, 2000)),
            crash_points=0.0 if calm else r.choice((0.0, 0.002, 0.01)),
            write_crash=0.0 if calm else r.choice((0.0, 0.01, 0.05)),
            jump=r.choice((0.0, 0.0, 0.005, 0.02)), stall=r.choice((0.0, 0.005, 0.02)),
            clock_rates=r.random() < 0.7,
            conf=r.choice((0.0, 0.0, 0.02)), compact=r.choice((0.0, 0.02, 0.1)),
            client_gap=r.choice((10, 25, 60)), read_gap=r.choice((20, 60)))
        self.now = 0
        self.heap: list = []
        self.seq = 0
        self.blocked: set[tuple[int, int]] = set()
        self.faults_on = True
        self.clients_on = True
        self.stream_pending: set[tuple[int, int]] = set()
        self.write_seq = 0
        # oracles
        self.leaders: dict[int, int] = {}
        self.entries: dict[int, tuple[int, bytes]] = {}
        self.commit_term: dict[int, int] = {}      # index -> term it was committed in (or later)
        self.snap_at: dict[int, bytes] = {}
        self.gen_defs: dict[int, tuple] = {1: (self.configured, self.configured,
                                               self.configured)}
        self.decided: dict[str, bool] = {}
        self.committed_any: set[str] = set()
        self.aborted_any: set[str] = set()
        self.commit_basis: dict[str, str] = {}
        self.acked: dict[str, int] = {}
        self.replies: dict[str, Reply] = {}
        self.lost_clients: set[str] = set()
        self.answered_n: set[tuple[int, str]] = set()
        self.stats: dict[str, int] = {}
        self.settled_since: tuple | None = None
        self.nodes = {i: Node(self, i) for i in self.ids}
        for node in self.nodes.values():
            self.start(node)

    # -- plumbing ----------------------------------------------------------------------------------

    def log(self, text: str) -> None:
        if self.verbose:
            print(f"[{self.now:6d}] {text}")

    def fail(self, text: str) -> None:
        raise SimFailure(f"seed {self.seed} at {self.now} ms: {text}")

    def count(self, what: str, n: int = 1) -> None:
        self.stats[what] = self.stats.get(what, 0) + n

    def push(self, t: int, kind: int, a=None, b=None, c=None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b, c))

    def stalled(self, node: Node, kind: int, a, b, c) -> bool:
        """A slow node: what is due for it waits until its loop runs again."""
        if node.stall_until > self.now:
            node.deferred.append((kind, a, b, c))
            return True
        return False

    def stall(self, node: Node, until: int) -> None:
        node.stall_until = max(node.stall_until, until)
        self.push(node.stall_until, K_UNSTALL, node.id)

    def on_unstall(self, nid, _b, _c) -> None:
        node = self.nodes[nid]
        if self.now < node.stall_until:
            return                                 # extended meanwhile
        node.stall_until = 0
        events, node.deferred = node.deferred, []
        for kind, a, b, c in events:               # in their order, now
            self.push(self.now, kind, a, b, c)

    def send(self, src: int, dst: int, msg) -> None:
        if dst not in self.nodes:
            return                                   # the phantom learner
        rnd = self.rng.random
        f = self.f
        faults = self.faults_on
        if faults and rnd() < f.drop:
            return
        if rnd() < 0.02:                             # through the wire codecs now and then
            cls = msg.__class__
            if cls is Message:
                back = decode_message(encode_message(msg))
            elif cls is Status or cls is LeaseGrant:
                back = decode_policy_message(encode_policy_message(msg))
            else:
                back = msg
            if back != msg:
                self.fail(f"codec changed {msg} into {back}")
            msg = back
        for _ in range(2 if faults and rnd() < f.dup else 1):
            delay = 1 + int(rnd() * 4)
            if faults and rnd() < f.delay_p:
                delay += int(rnd() * (f.delay_max + 1))
            self.seq += 1
            heapq.heappush(self.heap, (self.now + delay, self.seq, K_MSG, src, dst, msg))

    # -- process life ------------------------------------------------------------------------------

    def start(self, node: Node) -> None:
        state = node.storage.load()
        node.lives += 1
        node.up = True
        node.core = RaftNode(node.id, voters=self.configured, state=state,
                             rng=random.Random(self.rng.getrandbits(32)),
                             election_ticks=ELECTION_TICKS, heartbeat_ticks=HEARTBEAT_TICKS,
                             pre_vote=True, check_quorum=True, debug=self.raft_debug,
                             log=((lambda ev, f, i=node.id: self.log(f"raft {i}: {ev} {f}"))
                                  if self.verbose else None))
        snap = state.snapshot
        node.gens = (GenState.restore(node.id, snap.data) if snap is not None
                     else GenState(node.id, self.configured))
        now_l = node.local(self.now)
        node.fd = FailureDetector(node.id, self.ids, now_l, suspect_ms=CFG.suspect_ms,
                                  lag_threshold_ms=CFG.lag_threshold_ms)
        node.lease = ReadLease(CFG.lease_ms)
        node.lease_real = -1
        node.policy = LeaderPolicy(node.id, self.configured, now_l, CFG)
        g = node.gens.gen
        node.coord = Coordinator(node.id, g, vote_timeout_ms=VOTE_TIMEOUT_MS, retry_ms=100)
        node.part = Participant(node.id, g, online=False)
        node.fresh_gen = None
        node.echo, node.resolving = (0, 0), ()
        node.recovering = node.catchup_at = None
        node.cursors = dict(node.confirmed)
        node.life_gen = g.num
        node.last_commit = node.core.commit
        node.leader_seen = None
        if snap is not None:
            self.effects(node, node.gens.resync_effects())
        self.drain(node)                              # applies the committed prefix again
        if not node.up:
            return
        if node.gens.gen.num < node.max_gen:
            self.fail(f"node {node.id} restarted in generation {node.gens.gen.num} after "
                      f"applying {node.max_gen}")
        if node.lives > 1 and node.gens.status() == ONLINE:
            # It lost what its commit cores knew of this generation's
            # transactions: it takes part again only in a later one.
            node.fresh_gen = node.gens.gen.num
        node.part.online = node.online()
        node.next_local = now_l + self.rng.randrange(TICK_MS)
        node.timer_gen += 1
        self.push(node.real_at(node.next_local), K_TIMER, node.id, node.timer_gen)
        self.wake_reader(node)

    def crash(self, node: Node, why: str, down_ms: int | None = None) -> None:
        if not node.up:
            return
        self.log(f"crash {node.id} ({why})")
        self.count("crashes")
        node.up = False
        node.incarnation += 1
        node.storage.budget = None
        for kind, gid in node.writes.values():
            if self.rng.random() < 0.5:
                self.land(node, gid)                 # the backend finished it
        node.writes.clear()
        for gid, t in node.coord.txns.items():
            if not t.answered:
                self.lost_clients.add(gid)
        node.core = node.gens = node.fd = node.lease = node.policy = None
        node.coord = node.part = None
        node.recovering = None
        if self.faults_on:
            if down_ms is None:
                down_ms = self.rng.randint(100, self.f.down_max)
            self.push(self.now + down_ms, K_RESTART, node.id)

    def on_restart(self, nid, what, _c) -> None:
        node = self.nodes[nid]
        if what == "crash":                         # the early crash of a rejoin run
            if node.up:
                self.crash(node, "to rejoin later", self.rng.randint(600, 1200))
            return
        if not node.up:
            self.log(f"restart {nid}")
            self.start(node)

    # -- the Raft Ready loop, with crash points ----------------------------------------------------

    def drain(self, node: Node) -> None:
        while node.up and node.core.has_ready():
            self.handle_ready(node)

    def handle_ready(self, node: Node) -> None:
        core = node.core
        rd = core.ready()
        point = -1
        if self.faults_on and self.rng.random() < self.f.crash_points:
            point = self.rng.randrange(4)
        if point == 0:
            return self.crash(node, "before save")
        if point == 1:
            node.storage.budget = self.rng.randrange(4)
        try:
            node.storage.save(rd)
        except SimCrash:
            return self.crash(node, "in the middle of save")
        node.storage.budget = None
        for m in rd.messages:
            why = durable_violation(node.storage, m)
            if why is not None:
                self.fail(why)
        if point == 2:
            for m in rd.messages[:self.rng.randrange(len(rd.messages) + 1)]:
                self.send(m.frm, m.to, m)
            return self.crash(node, "after save, before sending everything")
        for m in rd.messages:
            self.send(m.frm, m.to, m)
        if point == 3:
            return self.crash(node, "after sending, before applying")
        if rd.soft_state is not None and rd.soft_state.role is Role.LEADER:
            self.log(f"node {node.id} leads term {core.term}")
        self.apply(node, rd)
        if not node.up:
            return
        core.advance(rd)
        self.check_node(node)

    def apply(self, node: Node, rd) -> None:
        if rd.snapshot is not None:
            s = rd.snapshot
            want = self.snap_at.get(s.index)
            if want is not None and want != s.data:
                self.fail(f"node {node.id} installs a snapshot at {s.index} unlike the one "
                          f"made there")
            node.gens = GenState.restore(node.id, s.data)
            if node.gens.snapshot() != s.data:
                self.fail("GenState.restore does not round-trip")
            self.count("snapshots_installed")
            self.effects(node, node.gens.resync_effects())
        for e in rd.committed_entries:
            if not node.up:
                return
            want = self.entries.get(e.index)
            if want is None:
                want = self.entries[e.index] = (e.term, e.data)
                self.commit_term[e.index] = node.core.term
            if want != (e.term, e.data):
                self.fail(f"node {node.id} applies {e.index}/{e.term} {e.data!r}, but "
                          f"{e.index}/{want[0]} {want[1]!r} was applied elsewhere")
            if e.type is EntryType.CONF_CHANGE:
                node.core.apply_conf_change(decode_conf_change(e.data))
                node.gens.note_applied(e.index)
                continue
            self.effects(node, node.gens.apply(e.index, e.data))
            node.gens.check_invariants()

    def check_node(self, node: Node) -> None:
        c = node.core
        if c.commit < node.last_commit:
            self.fail(f"node {node.id} commit went back from {node.last_commit} to {c.commit}")
        node.last_commit = c.commit
        if c.role is Role.LEADER:
            prev = self.leaders.setdefault(c.term, node.id)
            if prev != node.id:
                self.fail(f"two leaders in term {c.term}: {prev} and {node.id}")
            if node.leader_seen != (node.lives, c.term):
                node.leader_seen = (node.lives, c.term)
                ct = self.commit_term
                for index, (term, _) in self.entries.items():
                    # A leader of a later term than the commit has the entry
                    # (Leader Completeness); one of an earlier term, elected
                    # with long-delayed votes, may not.
                    if ct[index] < c.term and index > c.snapshot_index \
                            and c.term_at(index) != term:
                        self.fail(f"leader {node.id} of term {c.term} lacks committed entry "
                                  f"{index}/{term}")
                self.check_conf_changes(node)

    def check_conf_changes(self, node: Node) -> None:
        c = node.core
        n = sum(1 for e in c.entries(c.commit + 1, c.last_index + 1)
                if e.type is EntryType.CONF_CHANGE)
        if n > 1:
            self.fail(f"leader {node.id} has {n} uncommitted conf changes")

    # -- generation effects ------------------------------------------------------------------------

    def effects(self, node: Node, effects: list) -> None:
        for e in effects:
            if not node.up:
                return
            cls = e.__class__
            if cls is SwitchTo:
                self.switch(node, e)
            elif cls is BecomeOnline:
                node.part.online = node.online()
                self.check_holds_acked(node, e.num)
            elif cls is DecisionMade:
                self.decision(node, e.gid, e.commit)
            elif cls is Forgotten:
                for gid in e.gids:
                    node.records.pop(gid, None)
                self.count("forgotten", len(e.gids))
            elif cls is MayCommit:
                pass
            elif cls is Ignored:
                self.count("ignored")
                self.log(f"node {node.id} ignores {e.entry}: {e.reason}")
            else:
                self.fail(f"unknown effect {e!r}")

    def switch(self, node: Node, e: SwitchTo) -> None:
        g = e.gen
        d = (g.members, g.configured, g.donors)
        prev = self.gen_defs.get(g.num)
        if prev is None:
            # Invariant 5, when the generation first exists anywhere.
            if not g.donors:
                self.fail(f"generation {g.num} without donors")
            for dn in g.donors:
                dnode = self.nodes[dn]
                for gid in self.committed_any:
                    if gid_gen(gid) < g.num and gid not in dnode.committed \
                            and gid not in dnode.prepared:
                        self.fail(f"donor {dn} of generation {g.num} lacks committed {gid}")
            # Invariant 11, at the source: a generation without X commits only
            # once X's read lease has run out (in real time).
            for x in self.nodes.values():
                if x.id not in g.members and x.up and x.online() and x.lease_real > self.now \
                        and x.lease.valid(x.local(self.now)):
                    self.fail(f"generation {g.num} without node {x.id} committed while its "
                              f"read lease runs for {x.lease_real - self.now} ms more")
            self.gen_defs[g.num] = d
            self.count("generations")
            self.log(f"generation {g.num}: members {sorted(g.members)} donors "
                     f"{sorted(g.donors)}")
        elif prev != d:
            self.fail(f"generation {g.num} is {prev} and {d}")
        if g.num < node.life_gen:
            self.fail(f"node {node.id} went back from generation {node.life_gen} to {g.num}")
        node.life_gen = g.num
        node.max_gen = max(node.max_gen, g.num)
        if node.fresh_gen is not None and g.num > node.fresh_gen:
            node.fresh_gen = None
        node.recovering = None
        node.part.generation_changed(g, online=node.online())
        self.act(node, node.coord.generation_changed(g, node.local(self.now)))
        if not node.up:
            return
        if e.status == ONLINE:
            if g.num not in node.markers:
                node.markers[g.num] = Marker(
                    g.num, node.id, frozenset(node.committed), frozenset(node.rolled_back),
                    tuple(node.prepared.items()),
                    tuple(tuple(node.hist[k]) for k in range(N_KEYS)),
                    tuple(node.cursors.items()) + ((node.id, len(node.wal)),))
            self.check_holds_acked(node, g.num)
        else:
            node.lease.revoke()
            node.lease_real = -1

    def check_holds_acked(self, node: Node, num: int) -> None:
        """Invariant 9: ONLINE in ``num``, it holds every COMMIT a client heard
        in a generation <= ``num``."""
        for gid in self.acked:
            if gid_gen(gid) <= num and gid not in node.committed and gid not in node.prepared:
                self.fail(f"node {node.id} becomes ONLINE in {num} without {gid}, whose "
                          f"COMMIT a client heard")

    def decision(self, node: Node, gid: str, commit: bool) -> None:
        prev = self.decided.get(gid)
        if prev is None:
            held = sum(1 for n in self.nodes.values() if n.records.get(gid) == "p")
            g = gid_gen(gid)
            conf = self.gen_defs[g][1] if g in self.gen_defs else self.configured
            if commit and not held and gid not in self.committed_any:
                self.fail(f"{gid} decided commit without any precommit record")
            if not commit and held >= majority(len(conf)):
                self.fail(f"{gid} decided abort with precommit records on {held} nodes")
            self.decided[gid] = commit
            self.count("decided_commit" if commit else "decided_abort")
            self.log(f"decide {gid}: {'commit' if commit else 'abort'}")
        elif prev != commit:
            self.fail(f"{gid} decided both ways")
        if gid not in node.prepared:
            return
        if node.coord.knows(gid):
            self.act(node, node.coord.decided(gid, commit, node.local(self.now)))
        else:
            self.finish(node, gid, commit, "decide")
            self.act(node, node.part.finished(gid, commit, prepared_here=True))

    # -- the commit cores' actions -----------------------------------------------------------------

    def act(self, node: Node, actions: list) -> None:
        for a in actions:
            if not node.up:
                return
            cls = a.__class__
            if cls is Send:
                if a.msg is None:
                    continue
                if a.msg.__class__ is PrecommitAck and (node.id, a.msg.gid) in self.answered_n:
                    self.fail(f"node {node.id} acknowledges the precommit of {a.msg.gid} "
                              f"after answering it holds none")
                self.send(node.id, a.to, a.msg)
            elif cls is Persist or cls is PersistOwn:
                self.check_may_take_part(node, a.gid, "precommits")
                self.write_seq += 1
                node.writes[self.write_seq] = (cls, a.gid)
                self.push(self.now + self.rng.randint(1, 15), K_WRITE, node.id,
                          node.incarnation, self.write_seq)
                if self.faults_on and self.rng.random() < self.f.write_crash:
                    self.crash(node, "with a precommit record being written")
            elif cls is CommitLocal:
                t = node.coord.txns.get(a.gid)
                basis = "decide" if t is not None and t.decided else "majority"
                self.finish(node, a.gid, True, basis)
                self.act(node, node.coord.local_done(a.gid, True, node.local(self.now)))
            elif cls is AbortLocal:
                self.finish(node, a.gid, False, "coordinator")
                self.act(node, node.coord.local_done(a.gid, False, node.local(self.now)))
            elif cls is FinishLocal:
                if a.gid in node.prepared:
                    self.finish(node, a.gid, a.commit, "decision")
                    self.act(node, node.part.finished(a.gid, a.commit))
            elif cls is Reply:
                if a.gid in self.lost_clients:
                    continue
                if a.gid in self.replies:
                    self.fail(f"{a.gid} answered twice")
                self.replies[a.gid] = a
                if a.committed:
                    if a.gid not in node.committed:
                        self.fail(f"{a.gid} reported committed, not committed on {node.id}")
                    self.acked[a.gid] = self.now
                    self.count("acked")
                elif a.gid in self.committed_any and a.sqlstate != STATEMENT_COMPLETION_UNKNOWN:
                    self.fail(f"{a.gid} reported aborted but committed")
            else:
                self.fail(f"unexpected action {a!r}")
        if node.up:
            node.coord.check_invariants()

    def check_may_take_part(self, node: Node, gid: str, what: str) -> None:
        """Invariant 4."""
        g = gid_gen(gid)
        if node.gens.gen.num != g or not node.online():
            self.fail(f"node {node.id} {what} {gid} in generation {node.gens.gen.num} "
                      f"({node.gens.status()}, fresh {node.fresh_gen})")

    def land(self, node: Node, gid: str) -> None:
        """A precommit record becomes durable."""
        if (node.id, gid) in self.answered_n and node.records.get(gid) != "p":
            self.fail(f"a precommit record of {gid} lands on {node.id} after it answered "
                      f"it holds none")
        node.records.setdefault(gid, "p")

    def on_write(self, nid, inc, wid) -> None:
        node = self.nodes[nid]
        if inc != node.incarnation or wid not in node.writes:
            return
        if self.stalled(node, K_WRITE, nid, inc, wid):
            return
        kind, gid = node.writes.pop(wid)
        self.land(node, gid)
        if kind is PersistOwn:
            self.act(node, node.coord.persisted(gid, node.local(self.now), ok=True))
        else:
            self.act(node, node.part.persisted(gid, True))

    def finish(self, node: Node, gid: str, commit: bool, basis: str) -> None:
        key = node.prepared.pop(gid)
        node.locks[key].discard(gid)
        if commit:
            if gid in self.aborted_any:
                self.fail(f"{gid} committed on {node.id}, rolled back elsewhere")
            if gid not in self.committed_any:
                if basis in ("copy", "decision"):
                    self.fail(f"{gid} first committed by {basis} on {node.id}")
                held = sum(1 for n in self.nodes.values() if n.records.get(gid) == "p")
                g = gid_gen(gid)
                conf = self.gen_defs[g][1] if g in self.gen_defs else self.configured
                need = majority(len(conf)) if basis == "majority" else 1
                if held < need:
                    self.fail(f"{gid} committed ({basis}) with {held} precommit records")
                self.committed_any.add(gid)
                self.commit_basis[gid] = basis
            self.order_ok(node, key, gid)
            node.hist[key].append(gid)
            node.committed.add(gid)
            r = self.replies.get(gid)
            if r is not None and not r.committed and r.sqlstate != STATEMENT_COMPLETION_UNKNOWN:
                self.fail(f"{gid} committed after its client heard it was rolled back")
        else:
            if gid in self.committed_any:
                self.fail(f"{gid} rolled back on {node.id}, committed elsewhere")
            self.aborted_any.add(gid)
            node.rolled_back.add(gid)
        if parse_gid(gid)[0] == node.id:
            node.wal.append(("commit" if commit else "rollback", gid, key))
            self.wake_streams(node)

    def order_ok(self, node: Node, key: int, gid: str) -> None:
        """Invariant 10: ``gid`` goes last in ``node``'s order of ``key``; every
        node that committed it has everything ``node`` committed before it
        there, before it."""
        mine = node.hist[key]
        for other in self.nodes.values():
            if other is node or gid not in other.committed:
                continue
            oh = other.hist[key]
            before = set(oh[:oh.index(gid)])
            for g in mine:
                if g in other.committed and g not in before:
                    self.fail(f"{g} and {gid} on key {key}: in one order on node {node.id}, "
                              f"the other on node {other.id}")

    # -- streams -----------------------------------------------------------------------------------

    def wake_streams(self, origin: Node) -> None:
        for rid in self.ids:
            if rid != origin.id:
                self.wake(rid, origin.id)

    def wake_reader(self, reader: Node) -> None:
        for oid in self.ids:
            if oid != reader.id:
                self.wake(reader.id, oid)

    def wake(self, rid: int, oid: int) -> None:
        if (rid, oid) not in self.stream_pending:
            self.stream_pending.add((rid, oid))
            self.push(self.now + 1 + int(self.rng.random() * 8), K_STREAM, rid, oid)

    def on_stream(self, rid, oid, _c) -> None:
        self.stream_pending.discard((rid, oid))
        node = self.nodes[rid]
        if not node.up or (oid, rid) in self.blocked:
            return                     # woken again by the restart or the heal
        if node.stall_until > self.now:
            self.stream_pending.add((rid, oid))
            node.deferred.append((K_STREAM, rid, oid, None))
            return
        wal = self.nodes[oid].wal
        for _ in range(self.rng.randint(1, 4)):
            pos = node.cursors[oid]
            if pos >= len(wal) or not node.up:
                break
            node.cursors[oid] = pos + 1
            if self.rng.random() < 0.5:
                node.confirmed[oid] = pos + 1      # acknowledged: the slot advances
            self.stream_record(node, wal[pos])
        if node.up and node.cursors[oid] < len(wal):
            self.wake(rid, oid)

    def stream_record(self, node: Node, rec: tuple) -> None:
        kind, gid, key = rec
        if kind == "prepare":
            if gid in node.prepared:
                self.act(node, node.part.applied(gid, True))      # a replay: vote again
            elif gid in node.committed or gid in node.rolled_back:
                pass
            elif node.locks[key]:
                self.act(node, node.part.applied(gid, False, "55P03", "lock timeout"))
            else:
                out = node.part.applied(gid, True)
                if out and out[0].msg.ok:
                    self.check_may_take_part(node, gid, "votes on")
                    node.prepared[gid] = key
                    node.locks[key].add(gid)
                self.act(node, out)
        elif gid in node.prepared:
            commit = kind == "commit"
            self.finish(node, gid, commit, "stream")
            self.act(node, node.part.finished(gid, commit, prepared_here=True))

    # -- recovery (catch-up from a donor's marker) -------------------------------------------------

    def maybe_recover(self, node: Node) -> None:
        g = node.gens.gen
        st = node.gens.status()
        if st == RECOVERY and node.reached != g.num and node.recovering != g.num:
            donors = sorted(g.donors - {node.id})
            if donors:
                node.recovering = g.num
                # applying the donor's backlog up to its marker: usually short,
                # sometimes long (the cluster may move on meanwhile)
                took = self.rng.choice((20, 50, 100, 300, 300, 800, 1500))
                self.push(self.now + self.rng.randint(took // 2, took), K_RECOVER, node.id, g.num,
                          (self.rng.choice(donors), node.incarnation))
        if st != ONLINE and st != RECOVERY:
            if node.catchup_at is None:
                node.catchup_at = self.now + self.rng.randint(0, 600)
        else:
            node.catchup_at = None

    def on_recover(self, nid, num, donor_inc) -> None:
        node = self.nodes[nid]
        donor, inc = donor_inc
        if not node.up or node.incarnation != inc:
            return
        if self.stalled(node, K_RECOVER, nid, num, donor_inc):
            return
        node.recovering = None
        if node.gens.gen.num != num or node.gens.status() != RECOVERY:
            return
        m = self.nodes[donor].markers.get(num)
        if m is None or (donor, nid) in self.blocked:
            return                     # the donor has not switched yet: try again later
        self.copy_marker(node, m)
        node.reached = num
        self.count("recoveries")
        self.log(f"node {nid} reached the marker of {num} from {donor}")

    def copy_marker(self, node: Node, m: Marker) -> None:
        for gid in list(node.prepared):
            if gid in m.committed:
                self.finish(node, gid, True, "copy")
            elif gid in m.rolled_back:
                self.finish(node, gid, False, "copy")
        for k in range(N_KEYS):
            src, mine = m.hist[k], node.hist[k]
            common = set(src) & set(mine)
            if [g for g in src if g in common] != [g for g in mine if g in common]:
                self.fail(f"node {node.id} and donor {m.donor} order key {k} differently")
            srcset = set(src)
            node.hist[k] = list(src) + [g for g in mine if g not in srcset]
        if m.committed & node.rolled_back:
            self.fail(f"node {node.id} rolled back what donor {m.donor} committed")
        node.committed |= m.committed
        node.rolled_back |= m.rolled_back
        for gid, key in m.prepared:
            if gid not in node.prepared and gid not in node.committed \
                    and gid not in node.rolled_back:
                node.prepared[gid] = key
                node.locks[key].add(gid)
        cur = dict(m.cursors)
        node.cursors = {o: cur.get(o, 0) for o in self.ids if o != node.id}
        node.confirmed = dict(node.cursors)
        for gid in list(node.prepared):
            c = node.gens.decision(gid)
            if c is not None:
                self.decision(node, gid, c)
        self.wake_reader(node)

    # -- the heartbeat -----------------------------------------------------------------------------

    def on_timer(self, nid, tgen, _c) -> None:
        node = self.nodes[nid]
        if not node.up or tgen != node.timer_gen:
            return
        if self.stalled(node, K_TIMER, nid, tgen, None):
            return
        now_l = node.local(self.now)
        node.fd.loop_tick(node.next_local, now_l)
        node.next_local = now_l + TICK_MS
        self.push(max(self.now + 1, node.real_at(node.next_local)), K_TIMER, nid, tgen)
        node.core.tick()
        self.drain(node)
        if not node.up:
            return
        node.ticks += 1
        if node.ticks % HEARTBEAT_TICKS:
            return
        self.policy_step(node, now_l)
        if not node.up:
            return
        self.act(node, node.coord.tick(now_l))
        if node.up:
            self.maybe_recover(node)

    def policy_step(self, node: Node, now_l: int) -> None:
        core = node.core
        leader = core.role is Role.LEADER
        pending = ()
        ready = False
        if leader:
            ready = core.term_at(core.applied) == core.term
            pending = [decode_entry(e.data) for e in core.entries(core.applied + 1,
                                                                 core.last_index + 1)
                       if e.type is EntryType.NORMAL and e.data]
        plan = node.policy.tick(now_l, node.gens, node.fd, leader=leader, term=core.term,
                                log_ready=ready, pending=pending)
        for e in plan.proposals:
            try:
                index = core.propose(encode_entry(e))
            except (NotLeader, ProposalDropped):
                break
            node.policy.proposed(e, index, now_l)
            self.count("proposals")
            self.log(f"leader {node.id} proposes {e}")
        if plan.proposals:
            self.drain(node)
            if not node.up:
                return
        for g in plan.grants:
            if g.node == node.id:
                self.grant(node, g)
            else:
                self.send(node.id, g.node, g)
        if leader and self.faults_on:
            if self.rng.random() < self.f.conf:
                self.conf_change(node)
            if node.up and self.rng.random() < self.f.compact:
                self.compact(node)
            if not node.up:
                return
        elif self.faults_on and self.rng.random() < self.f.compact / 3:
            self.compact(node)
            if not node.up:
                return
        if plan.round:
            node.echo = (core.term, plan.round)
            node.resolving = plan.resolving
        st = self.make_status(node, now_l)
        node.policy.on_status(st, now_l)
        for p in self.ids:
            if p != node.id:
                self.send(node.id, p, st)

    def make_status(self, node: Node, now_l: int) -> Status:
        gens = node.gens
        num = gens.gen.num
        st = gens.status()
        prepared_old = frozenset(g for g in node.prepared if gid_gen(g) < num)
        answers = []
        if node.resolving:
            writing = {gid for _, gid in node.writes.values()}
            for gid in node.resolving:
                if node.records.get(gid) == "p":
                    answers.append((gid, "p"))
                elif gid_gen(gid) < num and gid not in writing:
                    answers.append((gid, "n"))
                    self.answered_n.add((node.id, gid))
        join = online = None
        if st == RECOVERY and node.reached == num:
            online = OnlineRequest(node.id, num)
        elif st != ONLINE and node.catchup_at is not None and self.now >= node.catchup_at:
            join = JoinRequest(node.id, 0)
        serving = node.online()
        node.sent_real[now_l] = self.now
        if len(node.sent_real) > 64:
            for k in sorted(node.sent_real)[:32]:
                del node.sent_real[k]
        return Status(node.id, now_l, node.core.term, num, gens.index, node.fd.sees(now_l),
                      node.fd.lag_ms, gens.last_online_in(node.id), fresh=node.fresh_gen == num,
                      join=join, online=online,
                      prepared_old=prepared_old, answers=tuple(answers), echo=node.echo,
                      lease=serving, round=node.echo[1] if node.core.role is Role.LEADER
                      else 0, resolving=node.resolving if node.core.role is Role.LEADER
                      else ())

    def grant(self, node: Node, g: LeaseGrant) -> None:
        before = node.lease.until
        node.lease.granted(g.sent_ms)
        if node.lease.until != before:
            real = node.sent_real.get(g.sent_ms)
            if real is None:
                self.fail(f"node {node.id} granted a lease for a Status it never sent")
            node.lease_real = real + int(CFG.lease_ms * (1 + CFG.drift))

    def on_msg(self, src, dst, msg) -> None:
        node = self.nodes[dst]
        if not node.up or (src, dst) in self.blocked:
            return
        if self.stalled(node, K_MSG, src, dst, msg):
            return
        cls = msg.__class__
        now_l = node.local(self.now)
        if cls is Message:
            node.core.step(msg)
            self.drain(node)
            if node.up:
                self.check_node(node)
        elif cls is Status:
            node.fd.heard_from(src, now_l)
            node.policy.on_status(msg, now_l)
            if msg.round and (msg.term, msg.round) > node.echo:
                node.echo = (msg.term, msg.round)
                node.resolving = msg.resolving
        elif cls is LeaseGrant:
            self.grant(node, msg)
        else:
            if not node.part.knows(msg.gid) and cls in (VoteRequest, Precommit, Decision):
                node.part.recovered(msg.gid, msg.gid in node.prepared,
                                    msg.gid in node.committed)
            self.act(node, node.coord.receive(msg, now_l))
            if node.up:
                self.act(node, node.part.receive(msg))

    # -- clients -----------------------------------------------------------------------------------

    def on_client(self, _a, _b, _c) -> None:
        if not self.clients_on:
            return
        self.push(self.now + 1 + int(self.rng.expovariate(1 / self.f.client_gap)), K_CLIENT)
        node = self.nodes[self.rng.choice(self.ids)]
        if not node.up or node.stall_until > self.now or not node.online() \
                or not node.gens.may_commit():
            self.count("commit_refused")
            return
        key = self.rng.randrange(N_KEYS)
        if node.locks[key]:
            self.count("commit_locked")
            return
        node.seq += 1
        gid = make_gid(node.id, node.gens.gen.num, node.seq)
        self.check_may_take_part(node, gid, "starts")
        node.prepared[gid] = key
        node.locks[key].add(gid)
        node.wal.append(("prepare", gid, key))
        self.wake_streams(node)
        self.count("started")
        self.act(node, node.coord.start(gid, node.local(self.now)))

    def on_read(self, _a, _b, _c) -> None:
        if self.faults_on:
            self.push(self.now + 1 + int(self.rng.expovariate(1 / self.f.read_gap)), K_READ)
        node = self.nodes[self.rng.choice(self.ids)]
        if not node.up or node.stall_until > self.now or not node.online() \
                or not node.lease.valid(node.local(self.now)):
            self.count("read_refused")
            return
        # Invariant 11.
        if self.now >= node.lease_real:
            self.fail(f"node {node.id} reads {self.now - node.lease_real} ms after its lease "
                      f"ended (real time)")
        num = node.gens.gen.num
        for n, (members, _, _) in self.gen_defs.items():
            if n > num and node.id not in members:
                self.fail(f"node {node.id} reads in generation {num} while generation {n} "
                          f"without it is committed")
        self.count("reads")

    # -- faults ------------------------------------------------------------------------------------

    def on_fault(self, _a, _b, _c) -> None:
        if not self.faults_on:
            return
        self.push(self.now + self.rng.randint(20, 80), K_FAULT)
        r, f = self.rng, self.f
        live = [n for n in self.nodes.values() if n.up]
        if live and r.random() < f.crash:
            self.crash(r.choice(live), "random")
        lead = self.leader()
        if lead is not None and r.random() < f.crash_leader:
            self.crash(lead, "the leader")
        if r.random() < f.partition:
            self.repartition()
        elif f.partition and r.random() < 0.05 and any(
                n.up and n.gens.status() == RECOVERY for n in self.nodes.values()):
            self.repartition("recovering")
        if r.random() < f.jump:
            n = self.nodes[r.choice(self.ids)]
            j = r.choice((50, 200, 600, 1500))
            n.offset += j
            self.count("clock_jumps")
            self.log(f"clock of {n.id} jumps {j} ms")
            if n.up:      # its timer fires by its own clock
                n.timer_gen += 1
                self.push(max(self.now + 1, n.real_at(n.next_local)), K_TIMER, n.id,
                          n.timer_gen)
        if r.random() < f.stall:
            n = self.nodes[r.choice(self.ids)]
            self.stall(n, self.now + r.choice((50, 150, 400, 900, 1500)))
            self.count("stalls")
            self.log(f"node {n.id} stalls until {n.stall_until}")

    def repartition(self, kind: str | None = None) -> None:
        ids = list(self.ids)
        kind = kind or self.rng.choice(("heal", "heal", "split", "isolate", "oneway", "bridge",
                                        "link", "link", "recovering"))
        blocked: set[tuple[int, int]] = set()
        if kind in ("split", "bridge"):
            self.rng.shuffle(ids)
            cut = self.rng.randrange(1, len(ids))
            a, b = ids[:cut], ids[cut:]
            bridge = self.rng.choice(ids) if kind == "bridge" else None
            blocked = {(x, y) for x in a for y in b if bridge not in (x, y)}
            blocked |= {(y, x) for x, y in blocked}
        elif kind == "isolate":
            lead = self.leader()
            x = lead.id if lead is not None and self.rng.random() < 0.5 else self.rng.choice(ids)
            blocked = {(x, y) for y in ids if y != x} | {(y, x) for y in ids if y != x}
        elif kind == "recovering":
            # A node catching up from its donor loses the leader (not the
            # donor): the cluster moves on while it copies an old marker.
            lead = self.leader()
            rec = [n.id for n in self.nodes.values() if n.up and n.gens.status() == RECOVERY]
            if lead is not None and rec:
                x = self.rng.choice(rec)
                if x != lead.id:
                    blocked = {(x, lead.id), (lead.id, x)}
        elif kind == "link":
            # Two members that both see the leader but not each other: the
            # clique breaks while both keep their leases alive.
            x, y = self.rng.sample(ids, 2)
            blocked = {(x, y), (y, x)}
        elif kind == "oneway":
            for _ in range(self.rng.randint(1, len(ids))):
                x, y = self.rng.sample(ids, 2)
                blocked.add((x, y))
        self.blocked = blocked
        self.count("partitions")
        self.log(f"partition {kind}: {sorted(blocked)}")
        for node in self.nodes.values():
            if node.up:
                self.wake_reader(node)

    def conf_change(self, node: Node) -> None:
        c = node.core
        cc = ConfChange(ConfChangeType.REMOVE if PHANTOM in c.learners
                        else ConfChangeType.ADD_LEARNER, PHANTOM)
        own_term_committed = c.term_at(c.commit) == c.term
        try:
            c.propose_conf_change(cc)
        except (ConfChangeRefused, ProposalDropped, NotLeader):
            return
        if not own_term_committed:
            self.fail(f"leader {node.id} accepted a conf change before committing an entry "
                      f"of its term {c.term}")
        self.count("conf_changes")
        self.check_conf_changes(node)
        self.drain(node)

    def compact(self, node: Node) -> None:
        c = node.core
        if c.applied - c.snapshot_index < 3:
            return
        if node.gens.index != c.applied:
            self.fail(f"node {node.id}: GenState at {node.gens.index}, Raft applied {c.applied}")
        data = node.gens.snapshot()
        if self.snap_at.setdefault(c.applied, data) != data:
            self.fail(f"node {node.id}: the state at {c.applied} differs from another node's")
        if GenState.restore(node.id, data) != node.gens:
            self.fail("GenState.restore(snapshot()) differs from the state")
        try:
            snap = c.compact(c.applied, data)
        except ValueError:
            return
        self.count("compactions")
        if self.faults_on and self.rng.random() < self.f.crash_points * 10:
            node.storage.budget = self.rng.randrange(2)
        try:
            node.storage.compact(snap)
        except SimCrash:
            return self.crash(node, "in the middle of compact")
        node.storage.budget = None

    def leader(self) -> Node | None:
        best = None
        for n in self.nodes.values():
            if n.up and n.core.role is Role.LEADER and (best is None or
                                                        n.core.term > best.core.term):
                best = n
        return best

    # -- the run -----------------------------------------------------------------------------------

    HANDLERS = None

    def step_until(self, t_end: int, stop=None) -> bool:
        """Run events up to ``t_end``; with ``stop``, return True as soon as
        it holds (tested after each heartbeat)."""
        h = self.HANDLERS
        heap = self.heap
        while heap and heap[0][0] <= t_end:
            t, _, kind, a, b, c = heapq.heappop(heap)
            self.now = t
            h[kind](self, a, b, c)
            if stop is not None and kind == K_TIMER and stop():
                return True
        self.now = t_end
        return stop is not None and stop()

    def heal(self) -> None:
        self.log("heal")
        self.faults_on = False
        self.blocked = set()
        for node in self.nodes.values():
            if node.stall_until > self.now:
                # stalled processes resume each at its own moment (all at
                # once would line their timers up: a split vote every time)
                node.stall_until = self.now + self.rng.randrange(100)
                self.push(node.stall_until, K_UNSTALL, node.id)
        for node in self.nodes.values():
            if not node.up:
                self.start(node)
            else:
                self.wake_reader(node)

    def converged(self) -> bool:
        """Settled, and for ``STABLE_MS``: one generation of every node, all
        ONLINE, nothing prepared or in flight, and the leader plans nothing."""
        lead = self._settled()
        if lead is None:
            self.settled_since = None
            return False
        who = (lead.id, lead.core.term)
        if self.settled_since is None or self.settled_since[0] != who:
            self.settled_since = (who, self.now)
        return self.now - self.settled_since[1] >= STABLE_MS

    def _settled(self) -> Node | None:
        lead = self.leader()
        if lead is None or lead.policy.leader_since_ms is None or lead.policy.excluding:
            return None
        num = lead.gens.gen.num
        if lead.gens.gen.members != self.configured or not lead.gens.may_commit():
            return None
        for n in self.nodes.values():
            if not n.up or n.gens.gen.num != num or not n.online() or n.prepared \
                    or n.coord.txns or n.writes or n.core.term > lead.core.term:
                return None
        return lead

    def run(self) -> dict:
        r = self.rng
        self.push(r.randint(0, 50), K_CLIENT)
        self.push(r.randint(0, 50), K_READ)
        self.push(r.randint(20, 80), K_FAULT)
        safety_ms = SAFETY_MS
        if r.random() < 0.8:
            # Most runs skip the first election (the liveness phase and the
            # leader crashes test elections): the faults get the time.
            self.nodes[r.choice(self.ids)].core.campaign()
        if r.random() < REJOIN_SHARE:
            # A node is out early, comes back and rejoins while the faults go
            # on: exclusion, JoinRequest, a generation with a joiner, catch-up
            # from a donor's marker, Online - all under faults.
            victim = self.nodes[r.choice(self.ids)]
            self.push(r.randint(20, 400), K_RESTART, victim.id, "crash")
            safety_ms = REJOIN_SAFETY_MS
            self.count("rejoin_runs")
        self.step_until(safety_ms)
        self.clients_on = False
        self.heal()
        t0 = self.now
        if not self.step_until(t0 + LEADER_BOUND_MS, lambda: self.leader() is not None):
            self.fail(f"no leader within {LEADER_BOUND_MS} ms after healing: "
                      + self.describe())
        self.stats["leader_ms"] = self.now - t0
        if not self.step_until(t0 + CONVERGE_BOUND_MS, self.converged):
            self.fail(f"not converged within {CONVERGE_BOUND_MS} ms after healing: "
                      + self.describe())
        self.stats["converge_ms"] = self.now - t0
        self.check_quiescent()
        # One crash: writes must resume.
        victim = self.nodes[self.rng.choice(self.ids)]
        was_leader = victim is self.leader()
        self.crash(victim, "the liveness crash")
        t1 = self.now
        n_acked = len(self.acked)
        self.clients_on = True
        self.f.client_gap = 10
        self.push(self.now + 1, K_CLIENT)
        if was_leader:
            # Raft first: a new leader. Its randomized timeouts come in
            # 50 ms steps; followers whose timers run in step can split
            # their votes several elections running (tests/sim_raft.py
            # allows 12 election timeouts).
            if not self.step_until(t1 + REELECT_BOUND_MS, lambda: self.leader() is not None):
                self.fail(f"no leader within {REELECT_BOUND_MS} ms after the leader "
                          f"{victim.id} crashed: " + self.describe())
            self.stats["reelect_ms"] = self.now - t1
            t1 = self.now
        if not self.step_until(t1 + RESUME_BOUND_MS, lambda: len(self.acked) > n_acked):
            self.fail(f"no write committed within {RESUME_BOUND_MS} ms after node {victim.id} "
                      f"crashed" + (", once a new leader was elected" if was_leader else "")
                      + ": " + self.describe())
        self.stats["resume_after_election_ms" if was_leader
                   else "resume_follower_ms"] = self.now - t1
        return self.stats

    def check_quiescent(self) -> None:
        """Invariants 9, 10 and 14 at the end: identical data, every heard
        COMMIT everywhere, nothing prepared."""
        first = self.nodes[self.ids[0]]
        for n in self.nodes.values():
            if n.committed != first.committed or n.hist != first.hist:
                self.fail(f"nodes {first.id} and {n.id} hold different data: "
                          f"{sorted(n.committed ^ first.committed)}")
            missing = set(self.acked) - n.committed
            if missing:
                self.fail(f"node {n.id} lacks {sorted(missing)}, whose COMMIT clients heard")

    def describe(self) -> str:
        parts = []
        for n in self.nodes.values():
            if not n.up:
                parts.append(f"{n.id}: down")
                continue
            c, g = n.core, n.gens
            parts.append(f"{n.id}: {c.role.value} t{c.term} commit={c.commit} gen={g.gen.num}"
                         f"{sorted(g.gen.members)} {g.status()} fresh={n.fresh_gen} "
                         f"prepared={sorted(n.prepared)} txns={sorted(n.coord.txns)} "
                         f"reached={n.reached} stall={n.stall_until}")
        return "; ".join(parts)


Sim.HANDLERS = {
    K_TIMER: Sim.on_timer, K_MSG: Sim.on_msg, K_STREAM: Sim.on_stream, K_WRITE: Sim.on_write,
    K_RESTART: Sim.on_restart, K_FAULT: Sim.on_fault, K_CLIENT: Sim.on_client,
    K_READ: Sim.on_read, K_RECOVER: Sim.on_recover, K_UNSTALL: Sim.on_unstall}


def run_seeds(seeds, verbose: bool = False) -> dict:
    t0 = time.perf_counter()
    totals: dict = {}
    worst: dict = {}
    n = 0
    for seed in seeds:
        try:
            stats = Sim(seed, verbose=verbose).run()
        except SimFailure:
            raise
        except Exception as exc:     # a core's own invariant, a crash of the simulator
            raise SimFailure(f"seed {seed}: {type(exc).__name__}: {exc}") from exc
        n += 1
        for k, v in stats.items():
            if k.endswith("_ms"):
                worst[k] = max(worst.get(k, 0), v)
            else:
                totals[k] = totals.get(k, 0) + v
    return {"seeds": n, "seconds": round(time.perf_counter() - t0, 1),
            "max": dict(sorted(worst.items())), "totals": dict(sorted(totals.items()))}


def main(argv: list[str]) -> None:
    seed_cli(argv, Sim, run_seeds)


if __name__ == "__main__":
    main(sys.argv[1:])
