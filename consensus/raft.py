"""Raft consensus: the pure core, in the shape of etcd-raft.

What this module owns: one node's Raft state - term, vote, the log in memory
(from the last snapshot on), commit and applied indexes, role, the election
and heartbeat clocks (in abstract ticks), the leader's view of each follower
(``_Progress``) - and the wire codec of its messages. It does no I/O and has
no clock or randomness of its own: time is ``tick()``, randomness is the
injected ``rng``, and the disk and the network belong to the caller.

The caller's loop (etcd-raft README, "Usage"), one task owning the node::

    node.tick() / node.step(msg) / node.propose(data) / ...
    if node.has_ready():
        rd = node.ready()
        storage.save(rd)            # hard state, entries, snapshot: durable first
        send(rd.messages)           # only now
        apply(rd.snapshot, rd.committed_entries)  # apply_conf_change() per conf entry
        node.advance(rd)

Rules it keeps:

- **Persist before send.** Every message that reflects a term, a vote or an
  entry leaves in the same ``Ready`` as the hard state and entries it
  reflects, and the caller sends only after saving them. This holds on the
  leader too: it counts its own log as replicated as soon as it appends
  (etcd-raft does the same) because a follower can only acknowledge an entry
  it received in a message sent after the leader saved that entry.
- **Between ready() and advance() the node is read-only** (except
  ``apply_conf_change``): mutating calls raise ``RuntimeError``. One task
  owns the node; nothing needs locks.
- **Committed entries are handed out once, in order**, each after it is
  durable (it sits in the same or an earlier Ready's ``entries``).
- **Elections**: randomized timeout in [election_ticks, 2*election_ticks).
  PreVote (Raft thesis 9.6): a pre-candidate asks for votes at term+1
  without bumping its term. CheckQuorum: a leader that has not heard from a
  quorum of voters within ``election_ticks`` steps down. With CheckQuorum a
  node that heard from a leader within ``election_ticks`` ignores vote and
  pre-vote requests of higher terms (etcd-raft's ``inLease``) unless the
  request comes from a leadership transfer.
- **Commit** only of an entry of the leader's own term, by counting voters'
  match indexes (Raft paper 5.4.2, Figure 8); earlier entries are committed
  with it.
- **Membership**: single-server changes (add voter, add learner, promote a
  learner by adding it as a voter, remove), one uncommitted at a time, and a
  new leader proposes none before it has committed *and applied* the empty
  entry of its own term (the fix for the single-server change bug,
  Ongaro raft-dev 2015; etcd-raft's ``pendingConfIndex``). A change takes
  effect when the application calls ``apply_conf_change`` after the entry is
  committed and applied (etcd-raft's semantics); a node with committed but
  unapplied changes does not campaign. A leader whose own removal is in its
  log refuses proposals (they would mostly be lost); once it applies the
  removal it sends ``TIMEOUT_NOW`` to its most caught-up voter if that one
  has its whole log, and steps down.
- **Learners** receive the log, never campaign, and never count for a quorum.
  A node that believes it is a learner still answers vote requests (it may
  have been promoted without having applied it yet, as in etcd-raft); only
  candidates decide whose votes count, and they ask and count voters only.
- **Flow control**: at most ``max_inflight_msgs`` unacknowledged appends per
  follower in replicate state, one probe at a time in probe state, nothing
  while a snapshot is in flight (a snapshot not acknowledged within
  ``election_ticks`` is given up and probed again). Rejections carry a
  conflict hint (index, term) for fast backtracking (etcd-raft's
  ``findConflictByTerm``). Proposals between two Readies leave as one append
  per follower (up to ``max_entries_per_msg`` entries each).
- **Bounds**: ``max_uncommitted_entries`` on the leader (``propose`` raises
  ``ProposalDropped`` beyond it); ``max_committed_entries_per_ready`` per
  Ready. The log in memory holds every entry since the last ``compact``:
  the application bounds it by compacting.
- ``check_invariants()`` runs after every mutating call when ``debug`` is on
  (the default; it is O(number of nodes)).

Leases and liveness information (not used by the core itself):
``ticks_since_leader_contact`` on a follower, and ``voters_heard_within()``
/ ``quorum_contact_ticks()`` on a leader. These count ticks since a message
was *received*, not since the request it answers was sent: a lease built on
them must allow for the message delay.
"""
from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

NONE = 0            # "no node": node ids are positive integers
WIRE_VERSION = 1
_MAX_U64 = (1 << 64) - 1


# -- errors ------------------------------------------------------------------------------------

class RaftError(Exception):
    """Base of the errors the core raises to its caller."""


class NotLeader(RaftError):
    """A proposal reached a node that is not the leader. ``leader`` is the
    leader this node knows of, or None."""

    def __init__(self, leader: int | None):
        self.leader = leader
        super().__init__(f"not the leader (leader: {leader if leader else 'unknown'})")


class ProposalDropped(RaftError):
    """The leader refuses a proposal for now (leadership transfer in progress,
    too many uncommitted entries); retrying later may succeed."""


class ConfChangeRefused(RaftError):
    """A membership change that may not be proposed now or at all; the message
    says which rule refused it."""


class DecodeError(ValueError):
    """Malformed bytes. The only exception the decoders raise."""


# -- data --------------------------------------------------------------------------------------

class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class MsgType(enum.IntEnum):
    APP = 1             # append entries (also the probe and the commit carrier)
    APP_RESP = 2
    VOTE = 3
    VOTE_RESP = 4
    PRE_VOTE = 5
    PRE_VOTE_RESP = 6
    HEARTBEAT = 7
    HEARTBEAT_RESP = 8
    SNAP = 9            # install snapshot
    TIMEOUT_NOW = 10    # leadership transfer: campaign now


class EntryType(enum.IntEnum):
    NORMAL = 0
    CONF_CHANGE = 1


class ConfChangeType(enum.IntEnum):
    ADD_VOTER = 1       # a new node, or the promotion of a learner
    ADD_LEARNER = 2
    REMOVE = 3


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


@dataclass(frozen=True, slots=True)
class Entry:
    index: int
    term: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class ConfChange:
    type: ConfChangeType
    node_id: int

    def encode(self) -> bytes:
        out = bytearray((1, int(self.type)))
        _put_uvarint(out, self.node_id)
        return bytes(out)

    @staticmethod
    def decode(data: bytes) -> ConfChange:
        return decode_conf_change(data)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The application's state at ``index`` (whose entry had ``term``), and the
    membership in force there."""
    index: int
    term: int
    voters: frozenset[int]
    learners: frozenset[int]
    data: bytes


@dataclass(frozen=True, slots=True)
class HardState:
    term: int = 0
    vote: int = NONE
    commit: int = 0


@dataclass(frozen=True, slots=True)
class SoftState:
    role: Role
    leader: int


@dataclass(frozen=True, slots=True)
class RestoredState:
    """What durable storage gives back after a restart: the hard state, the
    snapshot (or None) and the entries after it, consecutive."""
    hard_state: HardState
    snapshot: Snapshot | None
    entries: tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class Message:
    """One message; which fields matter depends on ``type`` (as etcd's
    raftpb.Message):

    - APP: ``index``/``log_term`` = the entry preceding ``entries``; ``commit``.
    - APP_RESP: ``index`` = last index now matching the leader; on ``reject``,
      ``index`` = the rejected preceding index, ``reject_hint``/``log_term`` =
      the follower's conflict hint.
    - VOTE/PRE_VOTE: ``index``/``log_term`` = the candidate's last entry;
      ``transfer`` = leadership transfer (bypasses the lease).
    - HEARTBEAT: ``commit`` = min(follower's match, leader's commit).
    - SNAP: ``snapshot``.
    """
    type: MsgType
    frm: int
    to: int
    term: int
    log_term: int = 0
    index: int = 0
    commit: int = 0
    entries: tuple[Entry, ...] = ()
    reject: bool = False
    reject_hint: int = 0
    snapshot: Snapshot | None = None
    transfer: bool = False


@dataclass(frozen=True, slots=True)
class Ready:
    """What the caller must do, in this order: persist ``snapshot``,
    ``entries`` (the first may replace the persisted suffix from its index
    on) and ``hard_state``; then send ``messages``; then load ``snapshot``
    into the state machine and apply ``committed_entries``; then
    ``advance(ready)``."""
    hard_state: HardState | None
    entries: tuple[Entry, ...]
    snapshot: Snapshot | None
    committed_entries: tuple[Entry, ...]
    messages: tuple[Message, ...]
    soft_state: SoftState | None

    @property
    def must_sync(self) -> bool:
        return self.hard_state is not None or bool(self.entries) or self.snapshot is not None


@dataclass(frozen=True, slots=True)
class ProgressView:
    """A leader's view of one node (read-only copy, for status and tests)."""
    match: int
    next: int
    state: ProgressState
    paused: bool
    inflight_msgs: int
    is_learner: bool
    ticks_since_heard: int


class _Progress:
    """The leader's bookkeeping for one node (etcd-raft's tracker.Progress)."""
    __slots__ = ("match", "next", "state", "probe_sent", "pending_snapshot", "inflights",
                 "last_heard_tick", "is_learner", "snapshot_ticks")

    def __init__(self, next_index: int, heard_tick: int, is_learner: bool):
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.pending_snapshot = 0
        self.inflights: deque[int] = deque()    # last index of each unacknowledged append
        self.last_heard_tick = heard_tick
        self.is_learner = is_learner
        self.snapshot_ticks = 0

    def become_probe(self) -> None:
        self.state = ProgressState.PROBE
        self.next = self.match + 1
        self.probe_sent = False
        self.pending_snapshot = 0
        self.inflights.clear()

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next = self.match + 1
        self.pending_snapshot = 0
        self.inflights.clear()

    def become_snapshot(self, index: int) -> None:
        self.state = ProgressState.SNAPSHOT
        self.pending_snapshot = index
        self.next = index + 1
        self.snapshot_ticks = 0
        self.inflights.clear()

    def is_paused(self, max_inflight: int) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return len(self.inflights) >= max_inflight
        return True

    def maybe_update(self, index: int) -> bool:
        """An acknowledgement up to ``index``; True if the match moved."""
        updated = False
        if self.match < index:
            self.match = index
            self.probe_sent = False
            updated = True
        if self.next < index + 1:
            self.next = index + 1
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """A rejection of the append after ``rejected``; False if it is stale."""
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False        # an old append, overtaken by a later success
            self.next = self.match + 1
            return True
        # Probe (and snapshot) send one append at a time: a rejection of any
        # other than the last one sent is stale.
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True


def quorum(n_voters: int) -> int:
    return n_voters // 2 + 1


_WON, _LOST, _PENDING = "won", "lost", "pending"


# -- the node ----------------------------------------------------------------------------------

class RaftNode:
    """One Raft node. See the module docstring for the loop and the rules."""

    def __init__(self, id: int, *, voters: Iterable[int], learners: Iterable[int] = (),
                 state: RestoredState | None, rng: random.Random,
                 election_ticks: int = 10, heartbeat_ticks: int = 2,
                 pre_vote: bool = True, check_quorum: bool = True,
                 max_entries_per_msg: int = 64, max_inflight_msgs: int = 32,
                 max_uncommitted_entries: int = 4096,
                 max_committed_entries_per_ready: int = 1024,
                 debug: bool = True,
                 log: Callable[[str, dict], None] | None = None) -> None:
        if id <= 0:
            raise ValueError(f"node ids are positive integers, not {id}")
        if heartbeat_ticks < 1 or election_ticks <= heartbeat_ticks:
            raise ValueError("need 1 <= heartbeat_ticks < election_ticks")
        if min(max_entries_per_msg, max_inflight_msgs, max_uncommitted_entries,
               max_committed_entries_per_ready) < 1:
            raise ValueError("the max_* bounds must be positive")
        self.id = id
        self._rng = rng
        self._election_ticks = election_ticks
        self._heartbeat_ticks = heartbeat_ticks
        self._pre_vote = pre_vote
        self._check_quorum = check_quorum
        self._max_entries_per_msg = max_entries_per_msg
        self._max_inflight = max_inflight_msgs
        self._max_uncommitted = max_uncommitted_entries
        self._max_committed_per_ready = max_committed_entries_per_ready
        self._debug = debug
        self._log_fn = log

        if state is None:
            state = RestoredState(HardState(), None, ())
        snap = state.snapshot
        self._snapshot = snap
        if snap is not None:
            voters, learners = snap.voters, snap.learners
            self._snap_index, self._snap_term = snap.index, snap.term
        else:
            self._snap_index = self._snap_term = 0
        self._voters = set(voters)
        self._learners = set(learners)
        if any(n <= 0 for n in self._voters | self._learners):
            raise ValueError("node ids are positive integers")
        if self._voters & self._learners:
            raise ValueError(f"nodes both voter and learner: {self._voters & self._learners}")
        # The membership at the snapshot, and each applied change after it, so
        # that compact() can record the membership in force at its index.
        self._conf_base = (frozenset(self._voters), frozenset(self._learners))
        self._conf_history: list[tuple[int, frozenset[int], frozenset[int]]] = []
        self._conf_to_apply: deque[tuple[int, ConfChange]] = deque()

        self._entries: list[Entry] = list(state.entries)
        prev_index, prev_term = self._snap_index, self._snap_term
        for e in self._entries:
            if e.index != prev_index + 1 or e.term < prev_term:
                raise ValueError(f"restored log is not consecutive at {e.index}/{e.term}")
            prev_index, prev_term = e.index, e.term

        hs = state.hard_state
        # Storage saves entries (and a snapshot) before the hard state, so a
        # crash between them can leave durable entries of a term newer than the
        # durable term. That term was current when they were accepted; any vote
        # this node sent is durable and older, so the vote is cleared with it.
        self._term = max(hs.term, self.last_term)
        self._vote = hs.vote if self._term == hs.term else NONE
        self._committed = max(hs.commit, self._snap_index)
        if self._committed > self.last_index:
            raise ValueError(f"restored commit {self._committed} is beyond the restored log "
                             f"(last index {self.last_index}): committed entries were lost")
        self._applied = self._snap_index
        self._unstable_from = self.last_index + 1
        self._pending_snapshot: Snapshot | None = None
        self._max_term = self._term

        self._role = Role.FOLLOWER
        self._lead = NONE
        self._ticks = 0
        self._leader_contact_tick = 0
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = election_ticks
        self._votes: dict[int, bool] = {}
        self._prs: dict[int, _Progress] = {}
        self._pending_conf_index = 0
        self._self_removal_index = 0
        self._lead_transferee = NONE
        self._bcast_pending = False
        self._msgs: list[Message] = []
        self._outstanding: Ready | None = None
        self._prev_hs = hs
        self._prev_ss = SoftState(Role.FOLLOWER, NONE)
        self._reset(self._term)
        self._after()

    # -- read-only state ------------------------------------------------------------------------

    @property
    def term(self) -> int:
        return self._term

    @property
    def vote(self) -> int:
        return self._vote

    @property
    def role(self) -> Role:
        return self._role

    @property
    def leader(self) -> int:
        """The leader this node follows (its own id when leading), or NONE."""
        return self._lead

    @property
    def commit(self) -> int:
        return self._committed

    @property
    def applied(self) -> int:
        """The last index handed out in an advanced Ready (or the snapshot's)."""
        return self._applied

    @property
    def last_index(self) -> int:
        return self._snap_index + len(self._entries)

    @property
    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self._snap_term

    @property
    def first_index(self) -> int:
        return self._snap_index + 1

    @property
    def snapshot_index(self) -> int:
        return self._snap_index

    @property
    def snapshot(self) -> Snapshot | None:
        """The latest snapshot: made by compact(), received, or restored."""
        return self._snapshot

    @property
    def voters(self) -> frozenset[int]:
        return frozenset(self._voters)

    @property
    def learners(self) -> frozenset[int]:
        return frozenset(self._learners)

    @property
    def hard_state(self) -> HardState:
        return HardState(self._term, self._vote, self._committed)

    @property
    def soft_state(self) -> SoftState:
        return SoftState(self._role, self._lead)

    @property
    def lead_transferee(self) -> int:
        return self._lead_transferee

    @property
    def pending_conf_index(self) -> int:
        """On a leader: no conf change may be proposed until applied >= this."""
        return self._pending_conf_index

    @property
    def ticks_since_leader_contact(self) -> int | None:
        """Ticks since the leader was last heard from (0 on the leader itself),
        or None while no leader is known."""
        if self._lead == NONE:
            return None
        if self._lead == self.id:
            return 0
        return self._ticks - self._leader_contact_tick

    def voters_heard_within(self, ticks: int) -> frozenset[int]:
        """On a leader: the voters it received a message from in the last
        ``ticks`` ticks (itself included). Empty on other roles."""
        if self._role is not Role.LEADER:
            return frozenset()
        return frozenset(v for v in self._voters
                         if v == self.id or self._ticks - self._prs[v].last_heard_tick < ticks)

    def quorum_contact_ticks(self) -> int | None:
        """On a leader: ticks since it last heard from a quorum of voters
        (counting itself as heard now); None on other roles."""
        if self._role is not Role.LEADER:
            return None
        ages = sorted(0 if v == self.id else self._ticks - self._prs[v].last_heard_tick
                      for v in self._voters)
        return ages[quorum(len(ages)) - 1]

    @property
    def progress(self) -> dict[int, ProgressView]:
        return {i: ProgressView(p.match, p.next, p.state, p.is_paused(self._max_inflight),
                                len(p.inflights), p.is_learner, self._ticks - p.last_heard_tick)
                for i, p in sorted(self._prs.items())}

    def term_at(self, index: int) -> int | None:
        """The term of the entry at ``index``; None if compacted or beyond the log."""
        if index == self._snap_index:
            return self._snap_term
        if index < self._snap_index or index > self.last_index:
            return None
        return self._entries[index - self._snap_index - 1].term

    def entries(self, lo: int, hi: int) -> list[Entry]:
        """Entries with lo <= index < hi (lo > snapshot index, hi <= last+1)."""
        if lo <= self._snap_index or hi > self.last_index + 1:
            raise IndexError(f"entries [{lo}, {hi}) outside ({self._snap_index}, "
                             f"{self.last_index}]")
        off = self._snap_index + 1
        return self._entries[lo - off:hi - off]

    # -- inputs ---------------------------------------------------------------------------------

    def tick(self) -> None:
        """One unit of abstract time."""
        self._check_idle("tick")
        self._ticks += 1
        if self._role is Role.LEADER:
            self._tick_leader()
        else:
            self._election_elapsed += 1
            if self._promotable() and self._election_elapsed >= self._randomized_timeout:
                self._election_elapsed = 0
                self._hup(transfer=False)
        self._after()

    def campaign(self) -> None:
        """Start an election now (a pre-vote first when ``pre_vote``)."""
        self._check_idle("campaign")
        self._hup(transfer=False)
        self._after()

    def step(self, m: Message) -> None:
        """Handle one message from the network."""
        self._check_idle("step")
        if m.to != self.id or m.frm == self.id or m.frm <= 0:
            return
        if m.term > self._term:
            if m.type in (MsgType.VOTE, MsgType.PRE_VOTE):
                in_lease = (self._check_quorum and self._lead != NONE
                            and self._election_elapsed < self._election_ticks)
                if in_lease and not m.transfer:
                    # etcd-raft inLease: a leader was heard from within the
                    # minimum election timeout, so this candidate cannot be
                    # needed; ignoring it keeps a rejoining node from deposing
                    # a working leader (Raft thesis 4.2.3).
                    self._event("vote_ignored_in_lease", candidate=m.frm, their_term=m.term)
                    return
            if m.type is MsgType.PRE_VOTE or (m.type is MsgType.PRE_VOTE_RESP and not m.reject):
                pass    # they carry the term a pre-candidate would have: no term change
            elif m.type in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP):
                self._become_follower(m.term, m.frm)
            else:
                self._become_follower(m.term, NONE)
        elif m.term < self._term:
            if (self._check_quorum or self._pre_vote) and m.type in (MsgType.APP,
                                                                       MsgType.HEARTBEAT):
                # A stale leader (partitioned, or its followers moved on under
                # PreVote/CheckQuorum) hears our term and steps down, instead of
                # being ignored forever (etcd-raft does the same).
                self._send(m.frm, MsgType.APP_RESP)
            elif m.type is MsgType.PRE_VOTE:
                self._send(m.frm, MsgType.PRE_VOTE_RESP, reject=True)
            self._after()
            return

        if m.type in (MsgType.VOTE, MsgType.PRE_VOTE):
            self._handle_vote_request(m)
        elif self._role is Role.LEADER:
            self._step_leader(m)
        elif self._role is Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)
        self._after()

    def propose(self, data: bytes) -> int:
        """Append ``data`` to the log (leader only); returns its index."""
        self._check_idle("propose")
        self._check_can_propose()
        index = self._append_own(EntryType.NORMAL, bytes(data))
        self._after()
        return index

    def propose_conf_change(self, cc: ConfChange) -> int:
        """Propose one single-server membership change; returns its index."""
        self._check_idle("propose_conf_change")
        self._check_can_propose()
        if self._pending_conf_index > self._applied or self._conf_to_apply:
            if self._term_at_or_none(self._pending_conf_index) == self._term and \
                    self._entry_type(self._pending_conf_index) is EntryType.NORMAL:
                raise ConfChangeRefused(
                    f"leader {self.id} has not yet committed and applied the first entry of its "
                    f"term {self._term} (index {self._pending_conf_index}, applied "
                    f"{self._applied})")
            raise ConfChangeRefused(f"the conf change at index {self._pending_conf_index} is "
                                    f"not yet applied (applied {self._applied})")
        n = cc.node_id
        if n <= 0:
            raise ConfChangeRefused(f"node ids are positive integers, not {n}")
        if cc.type is ConfChangeType.ADD_VOTER and n in self._voters:
            raise ConfChangeRefused(f"node {n} is already a voter")
        if cc.type is ConfChangeType.ADD_LEARNER:
            if n in self._voters:
                raise ConfChangeRefused(f"node {n} is a voter: demotion is not supported")
            if n in self._learners:
                raise ConfChangeRefused(f"node {n} is already a learner")
        if cc.type is ConfChangeType.REMOVE:
            if n not in self._voters and n not in self._learners:
                raise ConfChangeRefused(f"node {n} is not a member")
            if self._voters == {n}:
                raise ConfChangeRefused(f"removing node {n} would leave no voters")
        index = self._append_own(EntryType.CONF_CHANGE, cc.encode())
        self._pending_conf_index = index
        if cc.type is ConfChangeType.REMOVE and n == self.id:
            self._self_removal_index = index
        self._event("conf_change_proposed", index=index, change=_fmt_cc(cc))
        self._after()
        return index

    def apply_conf_change(self, cc: ConfChange) -> tuple[frozenset[int], frozenset[int]]:
        """Make a committed conf change take effect; call it for each conf
        change entry of ``committed_entries``, in order, before ``advance``.
        Returns (voters, learners)."""
        if not self._conf_to_apply:
            raise RuntimeError("no committed conf change is waiting to be applied")
        index, expected = self._conf_to_apply[0]
        if cc != expected:
            raise ValueError(f"conf change {cc} is not the one committed at {index} ({expected})")
        self._conf_to_apply.popleft()
        before = set(self._voters) | self._learners
        n = cc.node_id
        # Total: every node applies the same committed changes the same way,
        # even one the proposer's checks would now refuse.
        if cc.type is ConfChangeType.ADD_VOTER:
            self._learners.discard(n)
            self._voters.add(n)
        elif cc.type is ConfChangeType.ADD_LEARNER:
            if n not in self._voters:
                self._learners.add(n)
        elif n in self._voters and len(self._voters) == 1:
            pass    # never remove the last voter (refused at proposal too)
        else:
            self._voters.discard(n)
            self._learners.discard(n)
        self._conf_history.append((index, frozenset(self._voters), frozenset(self._learners)))
        self._event("conf_change_applied", index=index, change=_fmt_cc(cc),
                    voters=sorted(self._voters), learners=sorted(self._learners))
        if self._role is Role.LEADER:
            members = self._voters | self._learners
            for i in members - before:
                self._prs[i] = _Progress(self.last_index + 1, self._ticks, i in self._learners)
            for i in before - members:
                del self._prs[i]
            for i, pr in self._prs.items():
                pr.is_learner = i in self._learners
            if self.id not in self._voters:
                self._step_down_removed()
            else:
                if self._maybe_commit():
                    self._bcast_pending = True      # a smaller quorum committed more
                for i in sorted(members - before):
                    self._send_append(i)            # a new member hears from us now
                if self._lead_transferee != NONE and self._lead_transferee not in self._voters:
                    self._abort_transfer("transferee is no longer a voter")
        if self._debug:
            self.check_invariants()
        return frozenset(self._voters), frozenset(self._learners)

    def transfer_leadership(self, to: int) -> None:
        """Leader only: hand leadership to voter ``to`` (proposals are dropped
        until it succeeds or ``election_ticks`` pass)."""
        self._check_idle("transfer_leadership")
        if self._role is not Role.LEADER:
            raise NotLeader(self._lead or None)
        if to not in self._voters:
            raise ValueError(f"node {to} is not a voter")
        if to == self.id or to == self._lead_transferee:
            return
        if self._lead_transferee != NONE:
            self._abort_transfer("a new transfer replaces it")
        self._lead_transferee = to
        self._election_elapsed = 0      # the transfer times out with the next quorum check
        self._event("transfer_started", to=to)
        if self._prs[to].match == self.last_index:
            self._send(to, MsgType.TIMEOUT_NOW)
        else:
            self._send_append(to)
        self._after()

    def compact(self, index: int, data: bytes) -> Snapshot:
        """The application's state at applied ``index`` is ``data``: drop the
        entries up to ``index``. The caller passes the returned snapshot to
        ``storage.compact``."""
        self._check_idle("compact")
        if index <= self._snap_index:
            raise ValueError(f"index {index} is already compacted (snapshot {self._snap_index})")
        if index > self._applied:
            raise ValueError(f"index {index} is not applied yet (applied {self._applied})")
        if self._conf_to_apply and self._conf_to_apply[0][0] <= index:
            raise ValueError(f"the conf change at {self._conf_to_apply[0][0]} is not applied")
        voters, learners = self._conf_base
        for at, v, lrn in self._conf_history:
            if at > index:
                break
            voters, learners = v, lrn
        term = self.term_at(index)
        assert term is not None
        snap = Snapshot(index, term, voters, learners, bytes(data))
        del self._entries[:index - self._snap_index]
        self._snap_index, self._snap_term, self._snapshot = index, term, snap
        self._conf_base = (voters, learners)
        self._conf_history = [h for h in self._conf_history if h[0] > index]
        self._event("compacted", index=index, snapshot_term=term)
        self._after()
        return snap

    # -- Ready / advance ------------------------------------------------------------------------

    def has_ready(self) -> bool:
        """True if ready() has something to do. Flushes the appends batched
        since the last Ready into messages (so it is not a pure query)."""
        if self._outstanding is not None:
            return False
        self._flush()
        return bool(self._msgs or self._pending_snapshot is not None
                    or self._unstable_from <= self.last_index
                    or self._committed > self._applied
                    or self.hard_state != self._prev_hs or self.soft_state != self._prev_ss)

    def ready(self) -> Ready:
        self._check_idle("ready")
        self._flush()
        hs, ss = self.hard_state, self.soft_state
        off = self._snap_index + 1
        hi = min(self._committed, self._applied + self._max_committed_per_ready)
        committed = tuple(self._entries[self._applied + 1 - off:hi + 1 - off])
        rd = Ready(hard_state=hs if hs != self._prev_hs else None,
                   entries=tuple(self._entries[self._unstable_from - off:]),
                   snapshot=self._pending_snapshot,
                   committed_entries=committed,
                   messages=tuple(self._msgs),
                   soft_state=ss if ss != self._prev_ss else None)
        self._msgs = []
        for e in committed:
            if e.type is EntryType.CONF_CHANGE:
                self._conf_to_apply.append((e.index, decode_conf_change(e.data)))
        self._outstanding = rd
        return rd

    def advance(self, rd: Ready) -> None:
        """The caller saved ``rd``, sent its messages and applied it."""
        if rd is not self._outstanding:
            raise RuntimeError("advance() takes the Ready returned by the last ready()")
        if self._conf_to_apply:
            raise RuntimeError(f"the committed conf change at {self._conf_to_apply[0][0]} was "
                               "not applied: call apply_conf_change() before advance()")
        self._outstanding = None
        if rd.hard_state is not None:
            self._prev_hs = rd.hard_state
        if rd.soft_state is not None:
            self._prev_ss = rd.soft_state
        if rd.snapshot is not None:
            self._pending_snapshot = None
        if rd.entries:
            self._unstable_from = rd.entries[-1].index + 1
        if rd.committed_entries:
            self._applied = rd.committed_entries[-1].index
        self._after()

    # -- invariants -----------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Assert the core's invariants (cheap: O(nodes)). Raises AssertionError."""
        li = self.last_index
        if not self._snap_index <= self._applied <= self._committed <= li:
            raise AssertionError(f"node {self.id}: need snapshot {self._snap_index} <= applied "
                                 f"{self._applied} <= commit {self._committed} <= last {li}")
        if not self._snap_index < self._unstable_from <= li + 1:
            raise AssertionError(f"node {self.id}: unstable_from {self._unstable_from} outside "
                                 f"({self._snap_index}, {li + 1}]")
        if self._term < self._max_term:
            raise AssertionError(f"node {self.id}: term went back from {self._max_term} to "
                                 f"{self._term}")
        self._max_term = self._term
        if self._entries:
            first, last = self._entries[0], self._entries[-1]
            if first.index != self._snap_index + 1 or last.index != li:
                raise AssertionError(f"node {self.id}: log indexes {first.index}..{last.index} "
                                     f"do not follow snapshot {self._snap_index}")
            if first.term < self._snap_term or last.term > self._term:
                raise AssertionError(f"node {self.id}: log terms {first.term}..{last.term} "
                                     f"outside [{self._snap_term}, {self._term}]")
        if self._voters & self._learners:
            raise AssertionError(f"node {self.id}: voter and learner: "
                                 f"{self._voters & self._learners}")
        if self._role is Role.LEADER:
            if self._lead != self.id or self._vote != self.id or self.id not in self._voters:
                raise AssertionError(f"node {self.id}: leader with lead {self._lead}, vote "
                                     f"{self._vote}, voters {sorted(self._voters)}")
            if set(self._prs) != self._voters | self._learners:
                raise AssertionError(f"node {self.id}: progress for {sorted(self._prs)}, "
                                     f"members {sorted(self._voters | self._learners)}")
            if self._prs[self.id].match != li:
                raise AssertionError(f"node {self.id}: leader's own match "
                                     f"{self._prs[self.id].match} != last index {li}")
            for i, pr in self._prs.items():
                if not 0 <= pr.match < pr.next <= li + 1 or \
                        len(pr.inflights) > self._max_inflight:
                    raise AssertionError(f"node {self.id}: progress of {i}: match {pr.match} "
                                         f"next {pr.next} inflights {len(pr.inflights)} "
                                         f"last {li}")
            if self._pending_conf_index > li:
                raise AssertionError(f"node {self.id}: pending conf index "
                                     f"{self._pending_conf_index} > last {li}")
        elif self._prs or self._lead_transferee != NONE:
            raise AssertionError(f"node {self.id}: {self._role.value} with leader state")
        if self._role is Role.CANDIDATE and self._vote != self.id:
            raise AssertionError(f"node {self.id}: candidate that voted for {self._vote}")
        if self._role in (Role.CANDIDATE, Role.PRE_CANDIDATE) and self._lead != NONE:
            raise AssertionError(f"node {self.id}: {self._role.value} following {self._lead}")

    # -- internals: helpers ---------------------------------------------------------------------

    def _after(self) -> None:
        if self._debug:
            self.check_invariants()

    def _check_idle(self, what: str) -> None:
        if self._outstanding is not None:
            raise RuntimeError(f"{what}() while a Ready is outstanding: call advance() first")

    def _event(self, event: str, **fields: object) -> None:
        if self._log_fn is not None:
            self._log_fn(event, {"node": self.id, "term": self._term, **fields})

    def _send(self, to: int, type: MsgType, *, term: int | None = None, **fields) -> None:
        self._msgs.append(Message(type, self.id, to, self._term if term is None else term,
                                  **fields))

    def _promotable(self) -> bool:
        return self.id in self._voters

    def _term_at_or_none(self, index: int) -> int | None:
        return self.term_at(index) if index > 0 else None

    def _entry_type(self, index: int) -> EntryType | None:
        if self._snap_index < index <= self.last_index:
            return self._entries[index - self._snap_index - 1].type
        return None

    def _is_up_to_date(self, index: int, term: int) -> bool:
        """Raft paper 5.4.1: the candidate's log is at least as up to date."""
        lt = self.last_term
        return term > lt or (term == lt and index >= self.last_index)

    def _check_can_propose(self) -> None:
        if self._role is not Role.LEADER:
            raise NotLeader(self._lead or None)
        if self._lead_transferee != NONE:
            raise ProposalDropped(f"leadership transfer to {self._lead_transferee} in progress")
        if self._self_removal_index:
            # Entries after its own removal would mostly be lost when it steps
            # down: the client retries at the next leader.
            raise ProposalDropped(f"leader {self.id} is being removed (conf change at "
                                  f"{self._self_removal_index})")
        if self.last_index - self._committed >= self._max_uncommitted:
            raise ProposalDropped(f"{self.last_index - self._committed} uncommitted entries "
                                  f"(max_uncommitted_entries {self._max_uncommitted})")

    # -- internals: role changes ----------------------------------------------------------------

    def _reset(self, term: int) -> None:
        if term != self._term:
            self._term = term
            self._vote = NONE
        self._lead = NONE
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = self._election_ticks + self._rng.randrange(self._election_ticks)
        self._lead_transferee = NONE
        self._votes = {}
        self._prs = {}
        self._pending_conf_index = 0
        self._self_removal_index = 0
        self._bcast_pending = False

    def _become_follower(self, term: int, lead: int) -> None:
        was = self._role
        self._reset(term)
        self._role = Role.FOLLOWER
        self._lead = lead
        if lead != NONE:
            self._leader_contact_tick = self._ticks
        if was is not Role.FOLLOWER:
            self._event("became_follower", leader=lead)

    def _become_pre_candidate(self) -> None:
        # Neither the term nor the vote change (Raft thesis 9.6).
        self._role = Role.PRE_CANDIDATE
        self._lead = NONE
        self._votes = {}
        self._event("became_pre_candidate")

    def _become_candidate(self) -> None:
        self._reset(self._term + 1)
        self._vote = self.id
        self._role = Role.CANDIDATE
        self._event("became_candidate")

    def _become_leader(self) -> None:
        self._reset(self._term)
        self._role = Role.LEADER
        self._lead = self.id
        nxt = self.last_index + 1
        for i in self._voters | self._learners:
            self._prs[i] = _Progress(nxt, self._ticks, i in self._learners)
        me = self._prs[self.id]
        me.match, me.state = self.last_index, ProgressState.REPLICATE
        self._event("became_leader")
        # A removal of this node may wait in the log (proposed by an earlier
        # leader): it steps down once that applies, so it takes no proposals.
        for e in self.entries(self._applied + 1, self.last_index + 1):
            if e.type is EntryType.CONF_CHANGE:
                cc = decode_conf_change(e.data)
                if cc.type is ConfChangeType.REMOVE and cc.node_id == self.id:
                    self._self_removal_index = e.index
        # The empty entry of the new term: committing it commits everything
        # before it (Raft paper 5.4.2, 8). No conf change until it is applied.
        self._pending_conf_index = self._append_own(EntryType.NORMAL, b"")

    def _step_down_removed(self) -> None:
        """The leader applied its own removal: hand leadership to the most
        caught-up voter and step down. (The followers already have the commit
        index of the removal: it left in the Ready that handed it out.)"""
        best = max((i for i in self._voters), key=lambda i: (self._prs[i].match, -i),
                   default=NONE)
        if best != NONE and self._prs[best].match == self.last_index:
            self._send(best, MsgType.TIMEOUT_NOW)
        self._event("leader_removed", handed_to=best)
        self._become_follower(self._term, NONE)

    def _abort_transfer(self, why: str) -> None:
        self._event("transfer_aborted", to=self._lead_transferee, why=why)
        self._lead_transferee = NONE

    # -- internals: elections -------------------------------------------------------------------

    def _has_unapplied_conf_changes(self) -> bool:
        if self._conf_to_apply:
            return True
        if self._committed <= self._applied:
            return False
        return any(e.type is EntryType.CONF_CHANGE
                   for e in self.entries(self._applied + 1, self._committed + 1))

    def _hup(self, transfer: bool) -> None:
        if self._role is Role.LEADER:
            return
        if not self._promotable():
            return
        if self._has_unapplied_conf_changes():
            # Membership takes effect when applied: campaigning before the
            # committed changes are applied would count the wrong voters.
            self._event("campaign_deferred", why="committed conf changes not yet applied")
            return
        self._campaign(pre=self._pre_vote and not transfer, transfer=transfer)

    def _campaign(self, pre: bool, transfer: bool = False) -> None:
        if pre:
            self._become_pre_candidate()
            term, typ = self._term + 1, MsgType.PRE_VOTE
        else:
            self._become_candidate()
            term, typ = self._term, MsgType.VOTE
        self._votes = {self.id: True}
        if self._tally() == _WON:
            if pre:
                self._campaign(pre=False)
            else:
                self._become_leader()
            return
        for v in sorted(self._voters):
            if v != self.id:
                self._send(v, typ, term=term, index=self.last_index, log_term=self.last_term,
                           transfer=transfer)

    def _tally(self) -> str:
        granted = rejected = 0
        for v in self._voters:
            r = self._votes.get(v)
            if r is True:
                granted += 1
            elif r is False:
                rejected += 1
        q = quorum(len(self._voters))
        if granted >= q:
            return _WON
        if rejected > len(self._voters) - q:
            return _LOST
        return _PENDING

    def _handle_vote_request(self, m: Message) -> None:
        can_vote = (self._vote == m.frm
                    or (self._vote == NONE and self._lead == NONE)
                    or (m.type is MsgType.PRE_VOTE and m.term > self._term))
        resp = MsgType.VOTE_RESP if m.type is MsgType.VOTE else MsgType.PRE_VOTE_RESP
        if can_vote and self._is_up_to_date(m.index, m.log_term):
            # The answer carries the request's term (for a pre-vote, the term
            # the pre-candidate would take), as in etcd-raft.
            self._send(m.frm, resp, term=m.term)
            if m.type is MsgType.VOTE:
                self._election_elapsed = 0
                self._vote = m.frm
            self._event("vote_granted", to=m.frm, pre=m.type is MsgType.PRE_VOTE)
        else:
            self._send(m.frm, resp, reject=True)
            self._event("vote_rejected", to=m.frm, pre=m.type is MsgType.PRE_VOTE)

    def _step_candidate(self, m: Message) -> None:
        if m.type in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP):
            self._become_follower(self._term, m.frm)   # a leader of our term exists
            self._step_follower(m)
            return
        mine = MsgType.PRE_VOTE_RESP if self._role is Role.PRE_CANDIDATE else MsgType.VOTE_RESP
        if m.type is not mine:
            return
        self._votes.setdefault(m.frm, not m.reject)
        result = self._tally()
        if result == _WON:
            if self._role is Role.PRE_CANDIDATE:
                self._campaign(pre=False)
            else:
                self._become_leader()
        elif result == _LOST:
            self._become_follower(self._term, NONE)

    # -- internals: follower --------------------------------------------------------------------

    def _step_follower(self, m: Message) -> None:
        if m.type in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP):
            self._lead = m.frm
            self._election_elapsed = 0
            self._leader_contact_tick = self._ticks
            if m.type is MsgType.APP:
                self._handle_append(m)
            elif m.type is MsgType.HEARTBEAT:
                self._commit_to(m.commit)
                self._send(m.frm, MsgType.HEARTBEAT_RESP)
            else:
                self._handle_snapshot(m)
        elif m.type is MsgType.TIMEOUT_NOW:
            self._event("timeout_now", frm=m.frm)
            self._hup(transfer=True)

    def _handle_append(self, m: Message) -> None:
        if m.index < self._committed:
            self._send(m.frm, MsgType.APP_RESP, index=self._committed)
            return
        if self.term_at(m.index) == m.log_term:
            last_new = m.index + len(m.entries)
            conflict = self._find_conflict(m.entries)
            if conflict:
                if conflict <= self._committed:
                    raise AssertionError(f"node {self.id}: entry {conflict} conflicts with "
                                         f"committed entries (commit {self._committed})")
                self._append(m.entries[conflict - m.index - 1:])
            # Only up to the last entry this message vouches for: ours beyond
            # it may not match the leader's (Raft paper Figure 2, step 5).
            self._commit_to(min(m.commit, last_new))
            self._send(m.frm, MsgType.APP_RESP, index=last_new)
            return
        # Reject with a hint: the last index <= the probed one whose term is
        # <= the probed term. The leader skips every index in between (etcd-raft
        # findConflictByTerm; Raft paper 5.3, "the follower can include...").
        hint, hint_term = self._find_conflict_by_term(min(m.index, self.last_index), m.log_term)
        self._send(m.frm, MsgType.APP_RESP, index=m.index, reject=True, reject_hint=hint,
                   log_term=hint_term)

    def _find_conflict(self, entries: tuple[Entry, ...]) -> int:
        for e in entries:
            if self.term_at(e.index) != e.term:
                return e.index
        return 0

    def _find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        i = index
        while i > 0:
            t = self.term_at(i)
            if t is None:
                return i, 0     # compacted or beyond our log: unknown term
            if t <= term:
                return i, t
            i -= 1
        return 0, 0

    def _handle_snapshot(self, m: Message) -> None:
        s = m.snapshot
        assert s is not None
        if s.index <= self._committed:
            self._send(m.frm, MsgType.APP_RESP, index=self._committed)
            return
        if self.term_at(s.index) == s.term:
            # Our log already holds the snapshot's last entry: keep the log,
            # just learn the commit (etcd-raft restore() does the same).
            self._commit_to(s.index)
            self._send(m.frm, MsgType.APP_RESP, index=self._committed)
            return
        # Replace the whole log. A snapshot whose membership lacks this node
        # is accepted too: the node may have been added after the snapshot's
        # index, and it learns that by applying the entries that follow.
        self._entries = []
        self._snap_index, self._snap_term, self._snapshot = s.index, s.term, s
        self._pending_snapshot = s
        self._committed = self._applied = s.index
        self._unstable_from = s.index + 1
        self._voters, self._learners = set(s.voters), set(s.learners)
        self._conf_base = (s.voters, s.learners)
        self._conf_history = []
        self._event("snapshot_restored", index=s.index, snapshot_term=s.term)
        self._send(m.frm, MsgType.APP_RESP, index=self.last_index)

    def _append(self, entries: tuple[Entry, ...] | list[Entry]) -> None:
        first = entries[0].index
        if first <= self.last_index:
            if first <= self._committed:
                raise AssertionError(f"node {self.id}: truncating committed entry {first}")
            del self._entries[first - self._snap_index - 1:]
            self._unstable_from = min(self._unstable_from, first)
        elif first != self.last_index + 1:
            raise AssertionError(f"node {self.id}: gap before {first} (last {self.last_index})")
        self._entries.extend(entries)

    def _commit_to(self, index: int) -> None:
        if index > self._committed:
            if index > self.last_index:
                raise AssertionError(f"node {self.id}: commit {index} beyond last index "
                                     f"{self.last_index}: was the log lost?")
            self._committed = index

    # -- internals: leader ----------------------------------------------------------------------

    def _append_own(self, type: EntryType, data: bytes) -> int:
        index = self.last_index + 1
        self._entries.append(Entry(index, self._term, type, data))
        me = self._prs[self.id]
        me.match, me.next = index, index + 1
        self._maybe_commit()
        self._bcast_pending = True
        return index

    def _maybe_commit(self) -> bool:
        matches = sorted((self._prs[v].match for v in self._voters), reverse=True)
        index = matches[quorum(len(matches)) - 1]
        # Only an entry of our own term is committed by counting replicas
        # (Raft paper 5.4.2, Figure 8).
        if index > self._committed and self.term_at(index) == self._term:
            self._committed = index
            return True
        return False

    def _flush(self) -> None:
        if self._bcast_pending and self._role is Role.LEADER:
            self._bcast_pending = False
            for i in sorted(self._prs):
                # One append each (an empty one carries the commit index), then
                # as many more as flow control allows.
                if i != self.id and self._send_append(i):
                    while self._send_append(i, send_if_empty=False):
                        pass

    def _send_append(self, to: int, send_if_empty: bool = True) -> bool:
        pr = self._prs[to]
        if pr.is_paused(self._max_inflight):
            return False
        prev = pr.next - 1
        prev_term = self.term_at(prev)
        if prev_term is None:
            # The entries this follower needs are compacted: send the snapshot.
            snap = self._snapshot
            assert snap is not None and prev < snap.index
            self._send(to, MsgType.SNAP, snapshot=snap)
            pr.become_snapshot(snap.index)
            self._event("snapshot_sent", to=to, index=snap.index)
            return True
        hi = min(self.last_index, prev + self._max_entries_per_msg)
        ents = tuple(self._entries[prev - self._snap_index:hi - self._snap_index])
        if not ents and not send_if_empty:
            return False
        self._send(to, MsgType.APP, index=prev, log_term=prev_term, entries=ents,
                   commit=self._committed)
        if pr.state is ProgressState.REPLICATE:
            if ents:
                # Optimistic: the next append follows this one without waiting.
                pr.next = ents[-1].index + 1
                pr.inflights.append(ents[-1].index)
        else:
            pr.probe_sent = True
        return True

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        for pr in self._prs.values():
            if pr.state is ProgressState.SNAPSHOT:
                pr.snapshot_ticks += 1
                if pr.snapshot_ticks >= self._election_ticks:
                    pr.become_probe()   # lost or refused: probe, which resends if needed
        if self._election_elapsed >= self._election_ticks:
            self._election_elapsed = 0
            if self._check_quorum and len(self.voters_heard_within(self._election_ticks)) < \
                    quorum(len(self._voters)):
                self._event("stepped_down", why="no quorum heard within election_ticks")
                self._become_follower(self._term, NONE)
                return
            if self._lead_transferee != NONE:
                self._abort_transfer("timed out")
        if self._heartbeat_elapsed >= self._heartbeat_ticks:
            self._heartbeat_elapsed = 0
            for i in sorted(self._prs):
                if i != self.id:
                    self._send(i, MsgType.HEARTBEAT,
                               commit=min(self._prs[i].match, self._committed))

    def _step_leader(self, m: Message) -> None:
        if m.type in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP):
            raise AssertionError(f"node {self.id}: two leaders in term {self._term}: "
                                 f"{self.id} and {m.frm}")
        pr = self._prs.get(m.frm)
        if pr is None:
            return
        if m.type is MsgType.HEARTBEAT_RESP:
            pr.last_heard_tick = self._ticks
            pr.probe_sent = False
            if pr.state is ProgressState.REPLICATE and len(pr.inflights) >= self._max_inflight:
                pr.inflights.popleft()  # one slot, so a lost append cannot stall it
            if pr.match < self.last_index or pr.state is ProgressState.PROBE:
                self._send_append(m.frm)
        elif m.type is MsgType.APP_RESP:
            pr.last_heard_tick = self._ticks
            self._handle_append_response(m, pr)

    def _handle_append_response(self, m: Message, pr: _Progress) -> None:
        if m.reject:
            probe = m.reject_hint
            if m.log_term > 0:
                probe, _ = self._find_conflict_by_term(m.reject_hint, m.log_term)
            if pr.maybe_decr_to(m.index, probe):
                if pr.state is ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.frm)
            return
        was_paused = pr.is_paused(self._max_inflight)
        if not pr.maybe_update(m.index):
            return
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT:
            if pr.match >= self._snap_index:
                pr.become_probe()
                pr.become_replicate()
        else:
            while pr.inflights and pr.inflights[0] <= m.index:
                pr.inflights.popleft()
        if self._maybe_commit():
            self._bcast_pending = True      # every follower learns the new commit
        elif was_paused and not self._bcast_pending:
            self._send_append(m.frm)        # it may lack the latest commit
        while self._send_append(m.frm, send_if_empty=False):
            pass
        if m.frm == self._lead_transferee and pr.match == self.last_index:
            self._send(m.frm, MsgType.TIMEOUT_NOW)


# -- formatting ---------------------------------------------------------------------------------

def _fmt_cc(cc: ConfChange) -> str:
    return f"{cc.type.name.lower().replace('_', '-')} {cc.node_id}"


def format_entry(e: Entry) -> str:
    if e.type is EntryType.CONF_CHANGE:
        try:
            return f"{e.index}/{e.term} conf({_fmt_cc(decode_conf_change(e.data))})"
        except DecodeError:
            return f"{e.index}/{e.term} conf(?)"
    if not e.data:
        return f"{e.index}/{e.term}"
    text = e.data.decode("utf-8", "backslashreplace")
    return f"{e.index}/{e.term} " + (text if text.isidentifier() else repr(text))


def format_message(m: Message) -> str:
    """One line per message, for logs and the golden test scripts."""
    head = f"{m.frm}->{m.to} {m.type.name} term={m.term}"
    t = m.type
    if t is MsgType.APP:
        ents = ", ".join(format_entry(e) for e in m.entries)
        return f"{head} prev={m.index}/{m.log_term} commit={m.commit} entries=[{ents}]"
    if t is MsgType.APP_RESP:
        if m.reject:
            return f"{head} reject index={m.index} hint={m.reject_hint}/{m.log_term}"
        return f"{head} index={m.index}"
    if t in (MsgType.VOTE, MsgType.PRE_VOTE):
        return f"{head} last={m.index}/{m.log_term}" + (" transfer" if m.transfer else "")
    if t in (MsgType.VOTE_RESP, MsgType.PRE_VOTE_RESP):
        return f"{head} {'rejected' if m.reject else 'granted'}"
    if t is MsgType.HEARTBEAT:
        return f"{head} commit={m.commit}"
    if t is MsgType.SNAP:
        s = m.snapshot
        assert s is not None
        return (f"{head} snapshot={s.index}/{s.term} voters={_fmt_ids(s.voters)} "
                f"learners={_fmt_ids(s.learners)}")
    return head


def _fmt_ids(ids: Iterable[int]) -> str:
    return "(" + ",".join(str(i) for i in sorted(ids)) + ")"


# -- wire codec ---------------------------------------------------------------------------------
#
# Version 1, all integers unsigned LEB128 varints unless said otherwise:
#   byte version (1), byte type (MsgType), byte flags (1 reject, 2 transfer, 4 snapshot)
#   frm, to, term, log_term, index, commit, reject_hint
#   n_entries, then per entry: term, byte type (EntryType), len, data
#     (entry i has index = index + 1 + i: an append's entries follow its index)
#   if flags & 4: snapshot = index, term, n_voters, voters..., n_learners,
#     learners..., len, data
# A decoder meets bytes from the network: anything malformed raises DecodeError.

_FLAG_REJECT, _FLAG_TRANSFER, _FLAG_SNAPSHOT = 1, 2, 4


def _put_uvarint(out: bytearray, v: int) -> None:
    if not 0 <= v <= _MAX_U64:
        raise ValueError(f"{v} does not fit an unsigned 64-bit varint")
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, data: bytes):
        self.buf = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise DecodeError("truncated")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def uvarint(self) -> int:
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
            if shift > 63:
                raise DecodeError("varint longer than 10 bytes")
        if result > _MAX_U64:
            raise DecodeError("varint beyond 64 bits")
        return result

    def raw(self, n: int) -> bytes:
        if n > len(self.buf) - self.pos:
            raise DecodeError("truncated")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def remaining(self) -> int:
        return len(self.buf) - self.pos


def _put_snapshot(out: bytearray, s: Snapshot) -> None:
    _put_uvarint(out, s.index)
    _put_uvarint(out, s.term)
    for ids in (s.voters, s.learners):
        _put_uvarint(out, len(ids))
        for i in sorted(ids):
            _put_uvarint(out, i)
    _put_uvarint(out, len(s.data))
    out += s.data


def _get_ids(r: _Reader) -> frozenset[int]:
    n = r.uvarint()
    if n > r.remaining():
        raise DecodeError("node count beyond the message")
    ids = [r.uvarint() for _ in range(n)]
    if any(i == 0 for i in ids) or len(set(ids)) != n:
        raise DecodeError("node ids must be positive and distinct")
    return frozenset(ids)


def _get_snapshot(r: _Reader) -> Snapshot:
    index, term = r.uvarint(), r.uvarint()
    voters, learners = _get_ids(r), _get_ids(r)
    data = r.raw(r.uvarint())
    if index == 0 or term == 0:
        raise DecodeError("a snapshot has a positive index and term")
    if not voters or voters & learners:
        raise DecodeError("a snapshot needs voters, distinct from its learners")
    return Snapshot(index, term, voters, learners, data)


def encode_snapshot(s: Snapshot) -> bytes:
    out = bytearray((WIRE_VERSION,))
    _put_snapshot(out, s)
    return bytes(out)


def decode_snapshot(data: bytes) -> Snapshot:
    try:
        r = _Reader(bytes(data))
        if r.byte() != WIRE_VERSION:
            raise DecodeError("unsupported snapshot version")
        s = _get_snapshot(r)
        if r.remaining():
            raise DecodeError("trailing bytes after the snapshot")
        return s
    except DecodeError:
        raise
    except (IndexError, ValueError, TypeError, OverflowError) as e:
        raise DecodeError(f"malformed snapshot: {e}") from e


def decode_conf_change(data: bytes) -> ConfChange:
    try:
        r = _Reader(bytes(data))
        if r.byte() != 1:
            raise DecodeError("unsupported conf change version")
        t = r.byte()
        if t not in ConfChangeType._value2member_map_:
            raise DecodeError(f"unknown conf change type {t}")
        n = r.uvarint()
        if n == 0 or r.remaining():
            raise DecodeError("malformed conf change")
        return ConfChange(ConfChangeType(t), n)
    except DecodeError:
        raise
    except (IndexError, ValueError, TypeError, OverflowError) as e:
        raise DecodeError(f"malformed conf change: {e}") from e


def encode_message(m: Message) -> bytes:
    flags = ((_FLAG_REJECT if m.reject else 0) | (_FLAG_TRANSFER if m.transfer else 0)
             | (_FLAG_SNAPSHOT if m.snapshot is not None else 0))
    out = bytearray((WIRE_VERSION, int(m.type), flags))
    for v in (m.frm, m.to, m.term, m.log_term, m.index, m.commit, m.reject_hint):
        _put_uvarint(out, v)
    _put_uvarint(out, len(m.entries))
    for i, e in enumerate(m.entries):
        if e.index != m.index + 1 + i:
            raise ValueError(f"entry {e.index} does not follow index {m.index} at position {i}")
        _put_uvarint(out, e.term)
        out.append(int(e.type))
        _put_uvarint(out, len(e.data))
        out += e.data
    if m.snapshot is not None:
        _put_snapshot(out, m.snapshot)
    return bytes(out)


def decode_message(data: bytes) -> Message:
    """Decode one message; DecodeError for anything malformed, nothing else."""
    try:
        return _decode_message(bytes(data))
    except DecodeError:
        raise
    except (IndexError, ValueError, TypeError, OverflowError, KeyError) as e:
        raise DecodeError(f"malformed message: {e}") from e


def _decode_message(data: bytes) -> Message:
    r = _Reader(data)
    if r.byte() != WIRE_VERSION:
        raise DecodeError("unsupported message version")
    t = r.byte()
    if t not in MsgType._value2member_map_:
        raise DecodeError(f"unknown message type {t}")
    typ = MsgType(t)
    flags = r.byte()
    if flags & ~(_FLAG_REJECT | _FLAG_TRANSFER | _FLAG_SNAPSHOT):
        raise DecodeError(f"unknown flags {flags:#x}")
    frm, to, term, log_term, index, commit, hint = (r.uvarint() for _ in range(7))
    if frm == 0 or to == 0:
        raise DecodeError("node ids must be positive")
    if log_term > term:
        raise DecodeError("log term beyond the message term")
    n = r.uvarint()
    if n and typ is not MsgType.APP:
        raise DecodeError(f"{typ.name} carries no entries")
    if n > r.remaining() // 3:      # an entry takes at least 3 bytes
        raise DecodeError("entry count beyond the message")
    if index + n > _MAX_U64:
        raise DecodeError("entry index beyond 64 bits")
    entries = []
    prev_term = log_term
    for i in range(n):
        et, ety = r.uvarint(), r.byte()
        if ety not in EntryType._value2member_map_:
            raise DecodeError(f"unknown entry type {ety}")
        d = r.raw(r.uvarint())
        if not prev_term <= et <= term:
            raise DecodeError("entry terms must not decrease nor exceed the message term")
        prev_term = et
        if ety == EntryType.CONF_CHANGE:
            try:
                decode_conf_change(d)
            except DecodeError as e:
                raise DecodeError(f"entry {index + 1 + i}: bad conf change: {e}") from None
        entries.append(Entry(index + 1 + i, et, EntryType(ety), d))
    snap = _get_snapshot(r) if flags & _FLAG_SNAPSHOT else None
    if (typ is MsgType.SNAP) != (snap is not None):
        raise DecodeError("a SNAP message, and only it, carries a snapshot")
    if snap is not None and snap.term > term:
        raise DecodeError("snapshot term beyond the message term")
    if r.remaining():
        raise DecodeError("trailing bytes after the message")
    return Message(typ, frm, to, term, log_term, index, commit, tuple(entries),
                   bool(flags & _FLAG_REJECT), hint, snap, bool(flags & _FLAG_TRANSFER))
