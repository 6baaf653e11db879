"""A seeded deterministic simulator for the Raft core (TigerBeetle's VOPR).

One ``random.Random(seed)`` decides everything: the cluster (3 to 5 voters),
the fault profile, when nodes tick (slow nodes tick less often), which
messages are lost, duplicated, delayed or reordered, the partitions
(symmetric, one-directional, a "bridge" node that sees both halves),
crashes at every persistence point of the Ready loop (before ``save``, in
the middle of it - between its durable steps, or with a torn append -,
after it but before sending, after sending but before applying), restarts
from the in-memory storage, proposals, membership changes (add a learner,
promote it, remove a voter or a learner, now and then add a voter
directly), compactions (also cut in the middle) and leadership transfers.
Some crashes and isolations aim at the leader; some clusters run without
PreVote or CheckQuorum (safety must not depend on them); one message in 20
goes through the wire codec and must come back equal.

Safety phase: after every event the invariants are checked:

- at most one leader per term;
- committed entries are never lost: every entry any node handed out as
  committed is in every later leader's log (or under its snapshot), and
  every node applies exactly that entry at that index (a global oracle of
  index -> (term, data), and of the state hash after each index, which also
  checks the snapshots nodes install);
- no message reflects a term, vote or entry that is not durable at its
  sender when it is sent (checked against the sender's storage);
- after a restart a node's commit covers everything it applied before;
- at most one uncommitted conf change in a leader's log, proposed only once
  the leader has committed an entry of its own term;
- the core's own ``check_invariants`` after every call.

Liveness phase: faults stop, every crashed node restarts, the network heals.
A leader must appear within ``LEADER_BOUND_TICKS`` (``..._NO_PRE_VOTE`` for
the clusters that run without PreVote), and proposals made then must be
applied by every member of the leader's configuration within
``COMMIT_BOUND_TICKS`` plus 3 ticks per entry of the backlog left by the
faults (a client re-proposes what a leader change lost).

A failure raises ``SimFailure`` naming the seed. ``python tests/sim_raft.py
SEED`` replays one seed verbosely; ``--seeds N [--start S]`` runs many.
"""
from __future__ import annotations

import heapq
import random
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from consensus.raft import (ConfChange, ConfChangeType, ConfChangeRefused,  # noqa: E402
                            EntryType, Message, MsgType, NotLeader, ProposalDropped, RaftNode,
                            Ready, Role, decode_conf_change, decode_message, encode_message,
                            format_message)
from consensus.storage import MemoryStorage  # noqa: E402

ELECTION_TICKS = 10
HEARTBEAT_TICKS = 2
SAFETY_TICKS = 300
LEADER_BOUND_TICKS = 12 * ELECTION_TICKS
# Without PreVote, nodes whose logs cannot win keep bumping the term and
# spoil the elections of those that can (Raft thesis 9.6): elections then
# converge only by the luck of the randomized timeouts, with a long tail.
LEADER_BOUND_TICKS_NO_PRE_VOTE = 60 * ELECTION_TICKS
COMMIT_BOUND_TICKS = 8 * ELECTION_TICKS
LIVENESS_PROPOSALS = 5
MAX_MEMBERS = 6


class SimFailure(AssertionError):
    pass


class SimCrash(Exception):
    """The simulated process died in the middle of a durable write."""


class SimStorage(MemoryStorage):
    """MemoryStorage whose save/compact can be cut after ``budget`` durable
    steps (an append cut in the middle keeps a prefix of its entries, as a
    torn file tail would after the load drops the torn record)."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng
        self.budget: int | None = None

    def _spend(self) -> bool:
        """True if this step may complete; False if the crash happens in it."""
        if self.budget is None:
            return True
        if self.budget == 0:
            return False
        self.budget -= 1
        return True

    def _write_snapshot(self, snapshot) -> None:
        if not self._spend():
            raise SimCrash
        super()._write_snapshot(snapshot)

    def _reset_log(self, snapshot_index: int) -> None:
        if not self._spend():
            raise SimCrash
        super()._reset_log(snapshot_index)

    def _append(self, entries) -> None:
        if not self._spend():
            keep = self.rng.randrange(len(entries) + 1)
            first = entries[0].index
            start = self.entries[0].index if self.entries else first
            del self.entries[first - start:]        # the cut is durable before the append
            self.entries.extend(entries[:keep])
            raise SimCrash
        super()._append(entries)

    def _write_hard_state(self, hs) -> None:
        if not self._spend():
            raise SimCrash
        super()._write_hard_state(hs)

    def _drop_prefix(self, index: int) -> None:
        if not self._spend():
            raise SimCrash
        super()._drop_prefix(index)

    # durable views for the checks
    def last_index(self) -> int:
        if self.entries:
            return self.entries[-1].index
        return self.snapshot.index if self.snapshot else 0

    def term_at(self, index: int) -> int | None:
        if self.snapshot is not None and index == self.snapshot.index:
            return self.snapshot.term
        if index == 0:
            return 0
        if self.entries and self.entries[0].index <= index <= self.entries[-1].index:
            return self.entries[index - self.entries[0].index].term
        return None


def durable_violation(st: SimStorage, m: Message) -> str | None:
    """Why ``m`` reflects a term, vote or entry not durable in its sender's
    storage ``st``; None if it does not (GENERATIONS.md section 7, invariant 2)."""
    hs = st.hard_state
    pre = m.type is MsgType.PRE_VOTE or (m.type is MsgType.PRE_VOTE_RESP and not m.reject)
    if not pre and m.term > hs.term:
        return f"{format_message(m)}: durable term of {m.frm} is {hs.term}"
    if m.type is MsgType.VOTE and (hs.term, hs.vote) != (m.term, m.frm):
        return f"{format_message(m)}: durable term/vote {hs.term}/{hs.vote}"
    if m.type is MsgType.VOTE_RESP and not m.reject and (hs.term, hs.vote) != (m.term, m.to):
        return f"{format_message(m)}: durable term/vote {hs.term}/{hs.vote}"
    if m.type is MsgType.APP:
        snap_index = st.snapshot.index if st.snapshot else 0
        if m.index >= snap_index and st.term_at(m.index) != m.log_term:
            return f"{format_message(m)}: prev not durable at {m.frm}"
        for e in m.entries:
            if e.index > snap_index and st.term_at(e.index) != e.term:
                return f"{format_message(m)}: {e.index}/{e.term} not durable"
    if m.type is MsgType.APP_RESP and not m.reject and m.index > st.last_index():
        return f"{format_message(m)}: durable log of {m.frm} ends at {st.last_index()}"
    if m.type is MsgType.SNAP and (st.snapshot is None or st.snapshot.index <
                                   m.snapshot.index):
        return f"{format_message(m)}: snapshot not durable at {m.frm}"
    return None


@dataclass
class SimNode:
    id: int
    storage: SimStorage
    core: RaftNode | None = None
    tick_prob: float = 1.0
    app_index: int = 0
    app_crc: int = 0
    max_applied: int = 0        # across lives
    last_commit: int = 0        # within this life
    down_until: int = 0
    lives: int = 0


@dataclass
class Faults:
    drop: float
    dup: float
    delay_max_ticks: int
    crash: float
    crash_leader: float
    restart_after_ticks: int
    partition: float
    propose: float
    conf: float
    compact: float
    transfer: float
    codec: float
    crash_points: float
    pre_vote: bool
    check_quorum: bool


@dataclass
class Stats:
    events: int = 0
    delivered: int = 0
    crashes: int = 0
    elections: int = 0
    committed: int = 0
    conf_changes: int = 0
    snapshots_sent: int = 0
    liveness_leader_ticks: int = 0
    liveness_commit_ticks: int = 0
    extra: dict = field(default_factory=dict)


class Sim:
    def __init__(self, seed: int, verbose: bool = False) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.verbose = verbose
        self.now = 0
        self.seq = 0
        r = self.rng
        n_voters = r.choice((3, 3, 4, 5))
        self.bootstrap = (frozenset(range(1, n_voters + 1)), frozenset())
        self.next_id = n_voters + 1
        self.f = Faults(drop=r.choice((0.0, 0.02, 0.1, 0.2)), dup=r.choice((0.0, 0.02, 0.1)),
                        delay_max_ticks=r.choice((1, 2, 3, 6, 15)),
                        crash=r.choice((0.0, 0.005, 0.02)),
                        crash_leader=r.choice((0.0, 0.0, 0.01, 0.03)),
                        restart_after_ticks=r.choice((5, 20, 60)),
                        partition=r.choice((0.0, 0.01, 0.03)),
                        propose=r.choice((0.1, 0.3, 0.6)),
                        conf=r.choice((0.0, 0.01, 0.03)),
                        compact=r.choice((0.0, 0.01, 0.05)),
                        transfer=r.choice((0.0, 0.005)),
                        codec=0.05,
                        crash_points=r.choice((0.0, 0.002, 0.01)),
                        pre_vote=r.random() < 0.85, check_quorum=r.random() < 0.85)
        self.nodes: dict[int, SimNode] = {}
        for i in sorted(self.bootstrap[0]):
            self._add_node(i)
        self.net: list[tuple[int, int, Message]] = []
        self.blocked: set[tuple[int, int]] = set()
        self.faults_on = True
        self.stats = Stats()
        # oracles
        self.leaders: dict[int, int] = {}                   # term -> leader
        self.committed: dict[int, tuple[int, bytes]] = {}   # index -> (term, data)
        self.crc_at: dict[int, int] = {0: 0}                # index -> state hash after it
        self.index_of: dict[bytes, int] = {}                # data -> index it committed at
        self.leader_seen: dict[int, tuple[int, int]] = {}   # node -> (life, term) checked
        self.proposed = 0

    # -- plumbing ------------------------------------------------------------------------------

    def log(self, text: str) -> None:
        if self.verbose:
            print(f"[{self.now:4d}] {text}")

    def fail(self, text: str) -> None:
        raise SimFailure(f"seed {self.seed} tick {self.now}: {text}")

    def _add_node(self, nid: int) -> SimNode:
        node = SimNode(nid, SimStorage(random.Random(self.rng.getrandbits(32))))
        node.tick_prob = 1.0 if self.rng.random() < 0.7 else self.rng.choice((0.3, 0.6, 0.9))
        self.nodes[nid] = node
        self._start(node)
        return node

    def _start(self, node: SimNode) -> None:
        state = node.storage.load()
        node.core = RaftNode(node.id, voters=self.bootstrap[0], learners=self.bootstrap[1],
                             state=state, rng=random.Random(self.rng.getrandbits(32)),
                             election_ticks=ELECTION_TICKS, heartbeat_ticks=HEARTBEAT_TICKS,
                             pre_vote=self.f.pre_vote, check_quorum=self.f.check_quorum,
                             max_entries_per_msg=self.rng.choice((1, 4, 64)),
                             max_inflight_msgs=self.rng.choice((1, 4, 32)),
                             debug=True, log=self._count_event)
        node.lives += 1
        snap = state.snapshot
        node.app_index, node.app_crc = (struct.unpack(">QI", snap.data) if snap else (0, 0))
        node.last_commit = node.core.commit
        if node.core.commit < node.max_applied:
            self.fail(f"node {node.id} restarted with commit {node.core.commit} below the "
                      f"{node.max_applied} it applied before")
        c = node.core
        for i in range(c.first_index, c.commit + 1):
            self._check_committed_entry(node, i, c.term_at(i))

    def _count_event(self, event: str, fields: dict) -> None:
        self.stats.extra[event] = self.stats.extra.get(event, 0) + 1

    def _check_committed_entry(self, node: SimNode, index: int, term: int | None) -> None:
        want = self.committed.get(index)
        if want is not None and want[0] != term:
            self.fail(f"node {node.id} has {index}/{term} at or below its commit, "
                      f"but {index}/{want[0]} was committed")

    def crash(self, node: SimNode, why: str) -> None:
        self.log(f"crash {node.id} ({why})")
        node.core = None
        node.storage.budget = None
        node.down_until = self.now + self.rng.randrange(1, self.f.restart_after_ticks + 1)
        self.stats.crashes += 1

    def restart(self, node: SimNode) -> None:
        self.log(f"restart {node.id}")
        self._start(node)
        self.drain(node)

    def send(self, m: Message) -> None:
        if self.faults_on and self.rng.random() < self.f.drop:
            return
        if self.rng.random() < self.f.codec:
            wire = encode_message(m)
            back = decode_message(wire)
            if back != m:
                self.fail(f"codec round trip changed {m} into {back}")
            m = back
        copies = 2 if self.faults_on and self.rng.random() < self.f.dup else 1
        for _ in range(copies):
            delay = self.rng.randint(1, self.f.delay_max_ticks) if self.faults_on else 1
            self.seq += 1
            heapq.heappush(self.net, (self.now + delay, self.rng.random(), self.seq, m))

    # -- the Ready loop, with crash points -------------------------------------------------------

    def drain(self, node: SimNode) -> None:
        while node.core is not None and node.core.has_ready():
            self.handle_ready(node)

    def handle_ready(self, node: SimNode) -> None:
        core = node.core
        rd = core.ready()
        crashing = self.faults_on and self.rng.random() < self.f.crash_points
        point = self.rng.randrange(4) if crashing else -1
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
            self.check_durable(node, m)
        if point == 2:
            # after save, before (or while) sending
            for m in rd.messages[:self.rng.randrange(len(rd.messages) + 1)]:
                self.send(m)
            return self.crash(node, "after save, before sending everything")
        for m in rd.messages:
            self.send(m)
        if point == 3:
            return self.crash(node, "after sending, before applying")
        self.apply(node, rd)
        core.advance(rd)
        if rd.soft_state is not None and rd.soft_state.role is Role.LEADER:
            self.stats.elections += 1
        self.check_node(node)

    def apply(self, node: SimNode, rd: Ready) -> None:
        core = node.core
        if rd.snapshot is not None:
            s = rd.snapshot
            index, crc = struct.unpack(">QI", s.data)
            if index != s.index or self.crc_at.get(index) != crc:
                self.fail(f"node {node.id} installed snapshot {s.index} with state "
                          f"{index}/{crc:#x}, oracle {self.crc_at.get(index)}")
            node.app_index, node.app_crc = index, crc
        for e in rd.committed_entries:
            if e.index != node.app_index + 1:
                self.fail(f"node {node.id} applies {e.index} after {node.app_index}")
            want = self.committed.setdefault(e.index, (e.term, e.data))
            if want != (e.term, e.data):
                self.fail(f"node {node.id} applies {e.index}/{e.term} {e.data!r}, but "
                          f"{e.index}/{want[0]} {want[1]!r} was applied elsewhere")
            node.app_crc = zlib.crc32(struct.pack(">QQ", e.index, e.term) + e.data,
                                      node.app_crc)
            node.app_index = e.index
            crc = self.crc_at.setdefault(e.index, node.app_crc)
            if crc != node.app_crc:
                self.fail(f"node {node.id} state after {e.index} differs from the oracle")
            if e.type is EntryType.CONF_CHANGE:
                core.apply_conf_change(decode_conf_change(e.data))
                self.stats.conf_changes += 1
            self.index_of.setdefault(e.data, e.index)
        node.max_applied = max(node.max_applied, node.app_index)
        self.stats.committed = max(self.stats.committed, node.app_index)

    # -- invariants ------------------------------------------------------------------------------

    def check_durable(self, node: SimNode, m: Message) -> None:
        """No message reflects a term, vote or entry its sender has not saved."""
        why = durable_violation(node.storage, m)
        if why is not None:
            self.fail(why)

    def check_node(self, node: SimNode) -> None:
        c = node.core
        if c is None:
            return
        if c.commit < node.last_commit:
            self.fail(f"node {node.id} commit went back from {node.last_commit} to {c.commit}")
        node.last_commit = c.commit
        if c.role is Role.LEADER:
            prev = self.leaders.setdefault(c.term, node.id)
            if prev != node.id:
                self.fail(f"two leaders in term {c.term}: {prev} and {node.id}")
            if self.leader_seen.get(node.id) != (node.lives, c.term):
                self.leader_seen[node.id] = (node.lives, c.term)
                self.check_leader_completeness(node)
                self.check_conf_changes(node)

    def check_leader_completeness(self, node: SimNode) -> None:
        c = node.core
        for index, (term, _) in self.committed.items():
            if index > c.snapshot_index and c.term_at(index) != term:
                self.fail(f"leader {node.id} of term {c.term} lacks committed entry "
                          f"{index}/{term} (has {c.term_at(index)})")

    def check_conf_changes(self, node: SimNode) -> None:
        """At most one uncommitted conf change in a leader's log. Checked when
        a leader is first seen in a term and after each of its conf changes:
        nothing else puts conf changes into a leader's log."""
        c = node.core
        n = sum(1 for e in c.entries(c.commit + 1, c.last_index + 1)
                if e.type is EntryType.CONF_CHANGE)
        if n > 1:
            self.fail(f"leader {node.id} has {n} uncommitted conf changes")

    def check_all(self) -> None:
        for node in self.nodes.values():
            self.check_node(node)

    # -- events ---------------------------------------------------------------------------------

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.core is not None]

    def leader(self) -> SimNode | None:
        best = None
        for n in self.live():
            if n.core.role is Role.LEADER and (best is None or n.core.term > best.core.term):
                best = n
        return best

    def deliver_due(self) -> None:
        while self.net and self.net[0][0] <= self.now:
            _, _, _, m = heapq.heappop(self.net)
            node = self.nodes.get(m.to)
            if node is None or node.core is None or (m.frm, m.to) in self.blocked:
                continue
            self.stats.delivered += 1
            if self.verbose:
                self.log(f"deliver {format_message(m)}")
            node.core.step(m)
            self.drain(node)
            self.check_node(node)

    def tick_all(self) -> None:
        for node in sorted(self.nodes.values(), key=lambda n: n.id):
            if node.core is None:
                if self.now >= node.down_until:
                    self.restart(node)
                continue
            if self.faults_on and self.rng.random() >= node.tick_prob:
                continue
            node.core.tick()
            self.drain(node)
            self.check_node(node)

    def propose(self, node: SimNode) -> bytes | None:
        self.proposed += 1
        data = f"{self.seed}/{self.proposed}".encode()
        try:
            node.core.propose(data)
        except (NotLeader, ProposalDropped):
            return None
        self.log(f"propose {data!r} at {node.id}")
        self.drain(node)
        self.check_node(node)
        return data

    def conf_change(self, node: SimNode) -> None:
        c = node.core
        if c.role is not Role.LEADER:
            return
        voters, learners = c.voters, c.learners
        options = []
        if len(voters | learners) < MAX_MEMBERS:
            options.append(ConfChange(ConfChangeType.ADD_LEARNER, self.next_id))
            if len(voters) < 5 and self.rng.random() < 0.2:
                options.append(ConfChange(ConfChangeType.ADD_VOTER, self.next_id))
        for lrn in learners:
            if len(voters) < 5:
                options.append(ConfChange(ConfChangeType.ADD_VOTER, lrn))
            options.append(ConfChange(ConfChangeType.REMOVE, lrn))
        if len(voters) > 3:
            for v in voters:
                options.append(ConfChange(ConfChangeType.REMOVE, v))
        if not options:
            return
        cc = self.rng.choice(sorted(options, key=lambda x: (x.type, x.node_id)))
        own_term_committed = c.term_at(c.commit) == c.term
        try:
            index = c.propose_conf_change(cc)
        except (ConfChangeRefused, ProposalDropped):
            return
        if not own_term_committed:
            self.fail(f"leader {node.id} accepted a conf change before committing an entry "
                      f"of its term {c.term}")
        self.log(f"conf change {cc} at {node.id}, index {index}")
        self.check_conf_changes(node)
        if cc.node_id == self.next_id:
            self.next_id += 1
            self._add_node(cc.node_id)
        self.drain(node)
        self.check_node(node)

    def compact(self, node: SimNode) -> None:
        c = node.core
        if c.applied - c.snapshot_index < 2:
            return
        try:
            snap = c.compact(c.applied, struct.pack(">QI", node.app_index, node.app_crc))
        except ValueError:
            return      # a conf change at or below applied not yet applied: not possible here
        self.log(f"compact {node.id} at {snap.index}")
        if self.faults_on and self.rng.random() < self.f.crash_points * 10:
            node.storage.budget = self.rng.randrange(2)
        try:
            node.storage.compact(snap)
        except SimCrash:
            return self.crash(node, "in the middle of compact")
        node.storage.budget = None

    def repartition(self) -> None:
        ids = sorted(self.nodes)
        kind = self.rng.choice(("heal", "heal", "split", "isolate", "oneway", "bridge"))
        blocked: set[tuple[int, int]] = set()
        if kind == "split" or kind == "bridge":
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
        elif kind == "oneway":
            for _ in range(self.rng.randint(1, len(ids))):
                x, y = self.rng.sample(ids, 2)
                blocked.add((x, y))
        self.blocked = blocked
        self.log(f"partition {kind}: {sorted(blocked)}")

    def random_events(self) -> None:
        r, f = self.rng, self.f
        live = self.live()
        if live and r.random() < f.crash:
            self.crash(r.choice(live), "random")
        lead = self.leader()
        if lead is not None and r.random() < f.crash_leader:
            # Leaders are where the interesting histories start (Figure 8).
            self.crash(lead, "the leader")
        if r.random() < f.partition:
            self.repartition()
        live = self.live()
        if live and r.random() < f.propose:
            # Mostly a client that found the leader; sometimes one that did not.
            for _ in range(r.choice((1, 1, 1, 3))):
                lead, live = self.leader(), self.live()     # a crash point may have hit
                if live:
                    self.propose(lead if lead is not None and r.random() < 0.8
                                 else r.choice(live))
        lead = self.leader()
        if lead is not None and r.random() < f.conf:
            self.conf_change(lead)
        live = self.live()
        if live and r.random() < f.compact:
            self.compact(r.choice(live))
        lead = self.leader()
        if lead is not None and r.random() < f.transfer:
            to = r.choice(sorted(lead.core.voters))
            try:
                lead.core.transfer_leadership(to)
                self.drain(lead)
            except (NotLeader, ValueError):
                pass

    def step_tick(self) -> None:
        self.now += 1
        if self.faults_on:
            self.random_events()
        self.tick_all()
        self.deliver_due()
        self.check_all()

    # -- phases ---------------------------------------------------------------------------------

    def run(self, safety_ticks: int = SAFETY_TICKS) -> Stats:
        for _ in range(safety_ticks):
            self.step_tick()
        self.heal()
        t0 = self.now
        bound = LEADER_BOUND_TICKS if self.f.pre_vote else LEADER_BOUND_TICKS_NO_PRE_VOTE
        while True:
            lead = self.leader()
            if lead is not None and all(n.core.term <= lead.core.term for n in self.live()
                                        if n.id in lead.core.voters):
                break
            if self.now - t0 > bound:
                self.fail(f"no leader within {bound} ticks after healing: " + self.describe())
            self.step_tick()
        self.stats.liveness_leader_ticks = self.now - t0
        self.stats.extra["pre_vote"] = self.f.pre_vote
        t1 = self.now
        # The backlog left by the safety phase drains at a rate the flow
        # control settings bound (down to one entry per round trip of 2 ticks).
        backlog = lead.core.last_index - min(n.app_index for n in self.live())
        bound = COMMIT_BOUND_TICKS + 3 * backlog
        # data -> (term, index) it was accepted at. A client re-proposes what a
        # leader change lost: once an entry of a later term is committed, an
        # entry of term T not in that leader's log can never commit (a log's
        # terms never decrease).
        wanted: dict[bytes, tuple[int, int]] = {}
        lost = 0
        while True:
            lead = self.leader()
            if lead is not None:
                c = lead.core
                for data, (term, index) in list(wanted.items()):
                    if data not in self.index_of and c.term_at(c.commit) > term and \
                            c.term_at(index) != term:
                        del wanted[data]
                        lost += 1
                while len(wanted) < LIVENESS_PROPOSALS:
                    # A leader may refuse for a while (a transfer in progress).
                    data = self.propose(lead)
                    if data is None:
                        break
                    wanted[data] = (c.term, c.last_index)
            if lead is not None and len(wanted) == LIVENESS_PROPOSALS and \
                    all(d in self.index_of for d in wanted):
                index = max(self.index_of[d] for d in wanted)
                if all(self.nodes[m].core is not None and self.nodes[m].app_index >= index
                       for m in lead.core.voters | lead.core.learners):
                    break
            if self.now - t1 > bound:
                self.fail(f"proposals {sorted(wanted)} not applied everywhere within "
                          f"{bound} ticks (backlog {backlog}): " + self.describe())
            self.step_tick()
        self.stats.extra["lost_proposals"] = lost
        self.stats.liveness_commit_ticks = self.now - t1 - 3 * backlog
        return self.stats

    def heal(self) -> None:
        self.log("heal")
        self.faults_on = False
        self.blocked = set()
        for node in self.nodes.values():
            if node.core is None:
                self.restart(node)
        self.check_all()

    def describe(self) -> str:
        parts = []
        for n in sorted(self.nodes.values(), key=lambda n: n.id):
            c = n.core
            if c is None:
                parts.append(f"{n.id}: down")
            else:
                parts.append(f"{n.id}: {c.role.value} t{c.term} lead={c.leader} "
                             f"commit={c.commit} last={c.last_index} voters={sorted(c.voters)} "
                             f"learners={sorted(c.learners)}")
        return "; ".join(parts)


def run_seeds(seeds, verbose: bool = False) -> dict:
    t0 = time.perf_counter()
    totals = Stats()
    n = 0
    to_leader = {True: 0, False: 0}     # the slowest election after healing, by PreVote
    for seed in seeds:
        s = Sim(seed, verbose=verbose).run()
        n += 1
        totals.crashes += s.crashes
        totals.elections += s.elections
        totals.committed += s.committed
        totals.conf_changes += s.conf_changes
        totals.delivered += s.delivered
        pre_vote = s.extra.pop("pre_vote")
        to_leader[pre_vote] = max(to_leader[pre_vote], s.liveness_leader_ticks)
        for k, v in s.extra.items():
            totals.extra[k] = totals.extra.get(k, 0) + v
        totals.liveness_commit_ticks = max(totals.liveness_commit_ticks,
                                           s.liveness_commit_ticks)
    return {"seeds": n, "seconds": round(time.perf_counter() - t0, 1),
            "delivered": totals.delivered, "crashes": totals.crashes,
            "elections": totals.elections, "entries_applied": totals.committed,
            "conf_changes_applied": totals.conf_changes,
            "max_ticks_to_leader": to_leader[True],
            "max_ticks_to_leader_without_pre_vote": to_leader[False],
            "max_ticks_to_commit": totals.liveness_commit_ticks,
            "events": dict(sorted(totals.extra.items()))}


def seed_cli(argv: list[str], sim_class, run_seeds) -> None:
    """``SEED`` replays one seed verbosely; ``--seeds N [--start S]`` runs
    many (the command line of every seeded simulator here)."""
    if "--seeds" in argv:
        n = int(argv[argv.index("--seeds") + 1])
        start = int(argv[argv.index("--start") + 1]) if "--start" in argv else 0
        print(run_seeds(range(start, start + n)))
    else:
        seed = int(argv[0]) if argv else 1
        sim = sim_class(seed, verbose=True)
        print(sim.run())
        print(sim.describe())


def main(argv: list[str]) -> None:
    seed_cli(argv, Sim, run_seeds)


if __name__ == "__main__":
    main(sys.argv[1:])
