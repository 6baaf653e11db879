"""The atomic commit protocol (3PC over PREPARE TRANSACTION): pure cores.

What this module owns: the coordinator (the node whose client committed)
and the participant (every other member) as state machines that take
events and time and return actions; no I/O, clocks or randomness. The
shells (proxy sessions, the applier, the inter-node link) carry the actions
out *in order* - a ``Persist`` before the ``Send`` that follows it, as in
etcd-raft's Ready/Advance.

The protocol (mmts doc/multimaster.xml; Gray & Lamport, "Consensus on
Transaction Commit"):

1. The coordinator PREPAREs the transaction locally with gid
   ``MTM-<node>-<generation>-<seq>``. The PREPARE reaches every member
   through logical decoding, *in WAL order*; each member applies it,
   prepares the same gid and votes (``Vote``: ok, or its SQLSTATE/message).
2. When every member of the transaction's generation voted ok, the
   coordinator asks the members to record PRECOMMIT durably (``Precommit``)
   and records it itself (``PersistOwn``, at the same time). Durable records
   on a majority of the *configured* nodes make the decision final:
   ``CommitLocal``.
3. COMMIT PREPARED reaches the members through the stream (in WAL order, so
   a later transaction that depends on this one never overtakes it); each
   acknowledges (``CommitAck``). By default the client hears COMMIT only
   when every member has committed (``wait_peer_commits``).
- Any failed vote, a generation switch, or a member silent for
  ``vote_timeout_ms`` before the precommit: ``AbortLocal`` (ROLLBACK
  PREPARED, which also flows to the members) and the client hears why.
  A member still applying this coordinator's stream says so (``Working``,
  about once a second), which restarts its clock: a transaction of a
  million rows, or one queued behind it, is waited for as long as the
  member keeps working on it; only a member that stops answering runs out
  the timeout.
- After the precommit the outcome is commit, always: the coordinator keeps
  retransmitting until it is done.
- Bounded waits after the vote: a precommit majority that does not form
  within ``vote_timeout_ms`` (every member that could give it silent)
  answers the client 40003 (outcome not known yet) while the coordinator
  keeps trying; commit acknowledgements missing from members silent that
  long answer the client COMMIT with a warning naming them (the
  transaction is committed and durable on a majority; they apply it when
  they catch up).
- Recovery of a coordinator's own gids after a restart (``recover``): a
  gid it finds prepared here but no longer knows is decided by the rule of
  Gray & Lamport's Paxos Commit with a single proposer (GENERATIONS.md
  section 5): COMMIT if a precommit record of it exists anywhere (its own,
  or a member's) or a member committed it; ABORT once a majority of the
  configured nodes, itself included, is *fenced* with no precommit. A
  fenced node has durably promised never to acknowledge a precommit of
  that gid (``mtm.precommits`` row with state 'x'), so a commit majority
  and an abort majority can never both exist. A client's own PREPARE
  TRANSACTION (``MTM-...:x``) is not decided: it is held again, as
  PostgreSQL keeps a prepared transaction across a restart.
- Generations (consensus/gens.py): a participant takes part only while ONLINE
  in the transaction's generation (``Participant.online``), and once it
  has moved to a later generation it never records a precommit of an
  earlier one (the fence, GENERATIONS.md section 5). The cluster then
  decides in-doubt transactions of earlier generations through the Raft
  log, and a coordinator still holding one carries the decision out
  (``Coordinator.decided``). With generations, a restarted node does not
  ``recover`` its gids itself: the cluster bumps the generation and
  decides them (consensus/README.md).
- Conflicts between prepared transactions are settled by age (wound-wait):
  a ``Wound`` from a node whose applier waits on this transaction aborts
  it if it is younger than the one waiting and still collecting votes.
- Lost messages are retransmitted every ``retry_ms``: ``VoteRequest`` for
  missing votes, ``Precommit`` for missing acks, ``Decision`` for missing
  commit acks. Every handler is idempotent, so duplicates are harmless.

Invariants (``check_invariants``): a transaction is never both committed
and aborted; ``CommitLocal`` only after a majority of precommits;
``Reply(committed=True)`` only after the local commit (and, with
``wait_peer_commits``, every member's).
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

# SQLSTATEs the client sees when the protocol aborts its transaction.
SERIALIZATION_FAILURE = "40001"
TRANSACTION_ROLLBACK = "40000"
# A member's failure that means "another transaction holds what I need":
# the client gets 40001, as mmts reports global deadlocks and conflicts.
CONFLICT_STATES = frozenset({"55P03", "40P01", "40001"})

# A client's own PREPARE TRANSACTION 'x' is prepared as MTM-n-g-s:x.
_GID_RE = re.compile(r"^MTM-(\d+)-(\d+)-(\d+)(?::.*)?$", re.S)
USER_GID_SEP = ":"


def make_gid(node_id: int, generation: int, seq: int) -> str:
    return f"MTM-{node_id}-{generation}-{seq}"


def older(a: str, b: str) -> bool:
    """Is transaction ``a`` older than ``b``? gids carry a time-based
    sequence, so their order is the order their commits began; the node id
    breaks ties. Unknown gids are never older."""
    pa, pb = parse_gid(a), parse_gid(b)
    if pa is None or pb is None:
        return False
    return (pa[2], pa[0]) < (pb[2], pb[0])


def parse_gid(gid: str) -> tuple[int, int, int] | None:
    """(origin node, generation, sequence) of an mmproxy gid, else None."""
    m = _GID_RE.match(gid)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


@dataclass(frozen=True)
class Generation:
    num: int
    members: frozenset[int]
    configured: frozenset[int]

    @property
    def majority(self) -> int:
        return len(self.configured) // 2 + 1


# --- messages between nodes ----------------------------------------------------

@dataclass(frozen=True)
class Vote:
    gid: str
    sender: int
    ok: bool
    sqlstate: str = ""
    message: str = ""


@dataclass(frozen=True)
class VoteRequest:
    gid: str
    sender: int


@dataclass(frozen=True)
class Working:
    """A member is still applying the stream of the node it is sent to
    (a large transaction, or a backlog): the coordinator's votes from it
    are on their way. ``gid`` names what it is applying (for logs)."""
    gid: str
    sender: int


@dataclass(frozen=True)
class Precommit:
    gid: str
    sender: int


@dataclass(frozen=True)
class PrecommitAck:
    gid: str
    sender: int


@dataclass(frozen=True)
class Decision:
    """The outcome, retransmitted to members whose commit ack is missing."""
    gid: str
    sender: int
    commit: bool


@dataclass(frozen=True)
class Wound:
    """Sent by a node whose applier, applying the older transaction
    ``by_gid``, waits for a lock held by the prepared ``gid``: abort ``gid``
    if it is still collecting votes (wound-wait; the older one wins)."""
    gid: str
    sender: int
    by_gid: str


@dataclass(frozen=True)
class Release:
    """A node asks the coordinator of a held transaction (a client's own
    PREPARE TRANSACTION) to commit or roll it back."""
    gid: str
    sender: int
    commit: bool


@dataclass(frozen=True)
class Outcome:
    """The coordinator tells the node that asked for a Release how the
    transaction ended (or why it could not be released)."""
    gid: str
    sender: int
    committed: bool
    sqlstate: str = ""
    message: str = ""


@dataclass(frozen=True)
class CommitAck:
    gid: str
    sender: int


@dataclass(frozen=True)
class TxStatusQuery:
    """A coordinator recovering ``gid`` after a restart asks a member what
    it holds; the member fences itself first (never acknowledges a
    precommit of ``gid`` afterwards, unless it already has)."""
    gid: str
    sender: int


# TxStatus.state: a precommit record exists, the member committed it, or
# the member is fenced without a precommit.
PRECOMMITTED, COMMITTED, FENCED = "precommitted", "committed", "fenced"


@dataclass(frozen=True)
class TxStatus:
    gid: str
    sender: int
    state: str


# --- actions for the shells --------------------------------------------------------

@dataclass(frozen=True)
class Send:
    to: int
    msg: object


@dataclass(frozen=True)
class Persist:
    """Participant: record durably that ``gid`` is precommitted here (unless
    this node is fenced for it), then report with ``Participant.persisted``;
    the acknowledgement is sent only after that."""
    gid: str


@dataclass(frozen=True)
class Fence:
    """Participant: durably promise never to acknowledge a precommit of
    ``gid`` (unless one is recorded already), look up what this node holds,
    and report with ``Participant.fenced``."""
    gid: str


@dataclass(frozen=True)
class FenceOwn:
    """Coordinator recovering ``gid``: fence itself as ``Fence`` does, and
    report the record found with ``Coordinator.own_fenced``."""
    gid: str


@dataclass(frozen=True)
class PersistOwn:
    """Coordinator: record durably that ``gid`` is precommitted here (unless
    fenced), then report it with ``Coordinator.persisted``. The Precommits to the members
    are sent first (they are in the same list, before this), so the
    members' records are written while this one is: the coordinator's own
    precommit counts only once it is durable."""
    gid: str


@dataclass(frozen=True)
class CommitLocal:
    gid: str


@dataclass(frozen=True)
class AbortLocal:
    gid: str


@dataclass(frozen=True)
class FinishLocal:
    """Participant: COMMIT/ROLLBACK PREPARED ``gid`` here now (a decision
    reached us before the stream did)."""
    gid: str
    commit: bool


@dataclass(frozen=True)
class Reply:
    """Tell the client: committed (with a ``warning`` when some member did
    not confirm in time), or not, with SQLSTATE and message (40003: the
    outcome is not known yet)."""
    gid: str
    committed: bool
    sqlstate: str = ""
    message: str = ""
    warning: str = ""


class ProtocolInvariantError(AssertionError):
    pass


# --- coordinator -------------------------------------------------------------------

VOTING, PRECOMMITTING, COMMITTING, WAITING_ACKS, ABORTING, DONE, HELD, RESOLVING = (
    "voting", "precommitting", "committing", "waiting_acks", "aborting", "done", "held",
    "resolving")
STATEMENT_COMPLETION_UNKNOWN = "40003"
REFUSING = "refusing transaction"     # a member's vote refused by the generation rules


@dataclass
class _CoordTxn:
    gid: str
    generation: Generation
    started_ms: int
    state: str = VOTING
    votes: dict = field(default_factory=dict)          # node -> Vote
    precommit_acks: set = field(default_factory=set)
    commit_acks: set = field(default_factory=set)
    last_retry_ms: int = 0
    phase_ms: int = 0                # when the current phase (precommit, acks) began
    reply: Reply | None = None
    committed_local: bool = False
    aborted_local: bool = False
    hold: bool = False               # a client's PREPARE TRANSACTION: wait for a Release
    requester: int | None = None     # the node whose Release decides it
    answered: bool = False           # the client (or requester) has had its answer
    recovered: bool = False          # found after a restart: nobody waits for it
    fenced: set = field(default_factory=set)           # RESOLVING: fenced, no precommit
    own_fenced: bool = False         # our own precommit record is refused (state 'x')
    decided: bool = False            # the cluster's Decide settled it (``decided``)

    @property
    def peers(self) -> frozenset[int]:
        return self.generation.members


class Coordinator:
    def __init__(self, node_id: int, generation: Generation, *, vote_timeout_ms: int = 5000,
                 retry_ms: int = 200, wait_peer_commits: bool = True):
        self.node_id = node_id
        self.generation = generation
        self.vote_timeout_ms = vote_timeout_ms
        self.retry_ms = retry_ms
        self.wait_peer_commits = wait_peer_commits
        self.txns: dict[str, _CoordTxn] = {}
        self.working_ms: dict[int, int] = {}    # member -> when it last said Working

    def _peers(self, t: _CoordTxn) -> frozenset[int]:
        return t.generation.members - {self.node_id}

    def start(self, gid: str, now_ms: int, *, hold: bool = False) -> list:
        """The local PREPARE of ``gid`` succeeded. With ``hold`` (a client's
        own PREPARE TRANSACTION) the transaction stops once every member
        has prepared it: Reply(committed=True) then means "prepared
        everywhere", and ``release`` finishes it later."""
        assert gid not in self.txns, gid
        t = self.txns[gid] = _CoordTxn(gid, self.generation, now_ms, last_retry_ms=now_ms,
                                       hold=hold)
        num = (parse_gid(gid) or (0, 0))[1]
        if num != self.generation.num:
            # Prepared under an earlier generation: its members' votes are
            # refused (the generation fence), so it aborts now.
            return self._abort(t, SERIALIZATION_FAILURE,
                               "transaction aborted because the cluster switched to "
                               f"generation {self.generation.num} while it was being "
                               "prepared")
        return self._maybe_precommit(t, now_ms)

    def knows(self, gid: str) -> bool:
        return gid in self.txns

    def recover(self, gid: str, own: str | None, now_ms: int,
                generation: Generation | None = None) -> list:
        """``gid`` (ours) is prepared here and unknown to this coordinator
        (we restarted, or lost our local database connection): decide it.
        ``own`` is our own precommit record's state: 'p', 'x' or None."""
        if gid in self.txns:
            return []
        gen = generation or self.generation
        t = self.txns[gid] = _CoordTxn(gid, gen, now_ms, last_retry_ms=now_ms,
                                       phase_ms=now_ms, recovered=True)
        if USER_GID_SEP in gid:
            # A client's own prepared transaction: held until its COMMIT/
            # ROLLBACK PREPARED, whose release collects the votes again.
            t.state, t.hold, t.answered = HELD, True, True
            return []
        if own == "p":
            return self._decide_commit(t)
        if own is None:
            t.state = RESOLVING
            return [FenceOwn(gid)]
        t.own_fenced = True
        return self._resolve(t)

    def own_fenced(self, gid: str, own: str, now_ms: int) -> list:
        """FenceOwn done: ``own`` is the record now there ('p' if a precommit
        of our previous life got there first, else 'x')."""
        t = self.txns.get(gid)
        if t is None or t.state != RESOLVING:
            return []
        if own == "p":
            return self._decide_commit(t)
        t.own_fenced = True
        return self._resolve(t)

    def _resolve(self, t: _CoordTxn) -> list:
        t.state = RESOLVING
        if len(t.fenced) + 1 >= t.generation.majority:
            # A majority, us included, is fenced with no precommit: no
            # commit majority can ever form (Paxos Commit, GENERATIONS.md 5).
            t.state = ABORTING
            t.reply = Reply(t.gid, False, TRANSACTION_ROLLBACK, "recovered after a restart: "
                            "no precommit was recorded, rolled back")
            t.answered = True
            return [AbortLocal(t.gid)]
        return [Send(p, TxStatusQuery(t.gid, self.node_id))
                for p in sorted(self._peers(t) - t.fenced)]

    def _decide_commit(self, t: _CoordTxn) -> list:
        """A precommit exists (or a member committed): the outcome is commit."""
        t.state = COMMITTING
        t.answered = True
        t.precommit_acks.add(self.node_id)
        return [CommitLocal(t.gid)]

    def release(self, gid: str, commit: bool, requester: int, now_ms: int) -> list:
        """Commit or roll back the held ``gid`` for ``requester`` (a node id,
        this one included); its answer is a Reply (here) or an Outcome."""
        t = self.txns.get(gid)
        if t is None or t.state != HELD:
            r = Reply(gid, False, "42704", f"prepared transaction {gid} is not held by node "
                                           f"{self.node_id} (unknown, or being finished)")
            return self._answer(requester, r)
        t.hold = False
        t.requester = requester
        t.answered = False
        t.state = VOTING
        t.started_ms = t.last_retry_ms = now_ms
        if t.recovered:
            t.recovered = False
            t.votes.clear()     # collect them again: we kept none across the restart
        if commit:
            return self._maybe_precommit(t, now_ms) + [Send(p, VoteRequest(gid, self.node_id))
                                               for p in sorted(self._peers(t) - set(t.votes))]
        return self._abort(t, "", "rolled back")

    def _answer(self, requester: int | None, r: Reply) -> list:
        if requester is None or requester == self.node_id:
            return [r]
        return [r, Send(requester, Outcome(r.gid, self.node_id, r.committed, r.sqlstate,
                                           r.message))]

    def _tell(self, t: _CoordTxn, r: Reply) -> list:
        """The client's (or requester's) one answer for this phase."""
        if t.answered:
            return []
        t.answered = True
        return self._answer(t.requester, r)

    def receive(self, msg, now_ms: int) -> list:
        if msg.__class__ is Working:
            if msg.sender in self.generation.members:
                self.working_ms[msg.sender] = now_ms
            return []
        t = self.txns.get(msg.gid)
        if t is None:
            if msg.__class__ is Release and (parse_gid(msg.gid) or (0,))[0] == self.node_id:
                return self.release(msg.gid, msg.commit, msg.sender, now_ms)
            return []
        cls = msg.__class__
        if cls is Release:
            return self.release(msg.gid, msg.commit, msg.sender, now_ms)
        if cls is Wound:
            if t.state != VOTING or not older(msg.by_gid, msg.gid):
                return []   # past the precommit, the outcome is commit
            return self._abort(t, SERIALIZATION_FAILURE,
                               f"could not serialize access: the transaction conflicts with the "
                               f"older transaction {msg.by_gid} on node {msg.sender}")
        if msg.sender not in self._peers(t):
            return []
        if cls is Vote:
            if t.state != VOTING or msg.sender in t.votes:
                return []
            t.votes[msg.sender] = msg
            if not msg.ok:
                return self._abort(t, *self._client_error(msg))
            return self._maybe_precommit(t, now_ms)
        if cls is PrecommitAck:
            if t.state != PRECOMMITTING:
                return []
            t.precommit_acks.add(msg.sender)
            return self._maybe_commit(t)
        if cls is CommitAck:
            t.commit_acks.add(msg.sender)
            return self._maybe_reply(t)
        if cls is TxStatus:
            if t.state != RESOLVING:
                return []
            if msg.state in (PRECOMMITTED, COMMITTED):
                return self._decide_commit(t)
            if msg.sender in t.fenced or not t.own_fenced:
                return []
            t.fenced.add(msg.sender)
            return self._resolve(t) if len(t.fenced) + 1 >= t.generation.majority else []
        return []

    def _client_error(self, v: Vote) -> tuple[str, str]:
        if v.message.startswith(REFUSING):
            return (SERIALIZATION_FAILURE,
                    f"transaction aborted by a generation change (node {v.sender}: "
                    f"{v.message})")
        if v.sqlstate in CONFLICT_STATES:
            return (SERIALIZATION_FAILURE,
                    f"could not serialize access: the transaction conflicts with a concurrent "
                    f"transaction on node {v.sender} ({v.sqlstate}: {v.message})")
        return (v.sqlstate or TRANSACTION_ROLLBACK,
                f"transaction aborted: node {v.sender} could not apply it: {v.message}")

    def _maybe_precommit(self, t: _CoordTxn, now_ms: int) -> list:
        if t.state != VOTING or len(t.votes) < len(self._peers(t)):
            return []
        if t.hold:
            t.state = HELD
            return self._tell(t, Reply(t.gid, True))     # prepared on every member
        t.state = PRECOMMITTING
        t.phase_ms = now_ms
        out: list = [Send(p, Precommit(t.gid, self.node_id)) for p in sorted(self._peers(t))]
        return out + [PersistOwn(t.gid)]

    def persisted(self, gid: str, now_ms: int, ok: bool = True) -> list:
        """The PersistOwn of ``gid`` is done: durable (``ok``), or refused
        because this node is fenced for it (it then does not count)."""
        t = self.txns.get(gid)
        if t is None or t.state != PRECOMMITTING:
            return []
        if not ok:
            t.own_fenced = True
            return []
        t.precommit_acks.add(self.node_id)
        return self._maybe_commit(t)

    def _maybe_commit(self, t: _CoordTxn) -> list:
        if t.state != PRECOMMITTING or len(t.precommit_acks) < t.generation.majority:
            return []
        t.state = COMMITTING
        return [CommitLocal(t.gid)]

    def local_done(self, gid: str, committed: bool, now_ms: int) -> list:
        """CommitLocal/AbortLocal was carried out."""
        t = self.txns[gid]
        if committed:
            assert t.state == COMMITTING
            t.committed_local = True
            t.state = WAITING_ACKS
            t.last_retry_ms = t.phase_ms = now_ms
            return self._maybe_reply(t)
        assert t.state == ABORTING
        t.aborted_local = True
        t.state = DONE
        out = self._tell(t, t.reply) if not t.recovered else []
        del self.txns[gid]
        return out

    def _maybe_reply(self, t: _CoordTxn, warning: str = "") -> list:
        if t.state != WAITING_ACKS:
            return []
        if self.wait_peer_commits and not warning and not self._peers(t) <= t.commit_acks:
            return []
        t.state = DONE
        t.reply = Reply(t.gid, True, warning=warning)
        out = self._tell(t, t.reply) if not t.recovered or t.requester is not None else []
        del self.txns[t.gid]
        return out

    def _abort(self, t: _CoordTxn, sqlstate: str, message: str) -> list:
        assert t.state == VOTING, "after the precommit the outcome is commit"
        t.state = ABORTING
        t.reply = Reply(t.gid, False, sqlstate, message)
        return [AbortLocal(t.gid)]

    def decided(self, gid: str, commit: bool, now_ms: int) -> list:
        """The cluster decided ``gid`` (a ``Decide`` entry of the log applied,
        consensus/gens.py): carry the decision out. The cluster decides only
        transactions of an earlier generation, from the precommit records it
        found (GENERATIONS.md section 5): commit if one exists, abort only
        once a precommit majority can no longer form - so an abort never
        meets a transaction committed here."""
        t = self.txns.get(gid)
        if t is None or t.state in (COMMITTING, WAITING_ACKS, ABORTING, DONE):
            if t is not None and not commit and (t.committed_local or t.state in (
                    COMMITTING, WAITING_ACKS)):
                raise ProtocolInvariantError(f"{gid} decided abort, committed here")
            return []
        t.decided = True
        if commit:
            t.state = COMMITTING
            t.precommit_acks.add(self.node_id)
            return [CommitLocal(gid)]
        t.state = ABORTING
        t.reply = Reply(gid, False, SERIALIZATION_FAILURE,
                        f"transaction aborted: the cluster switched to generation "
                        f"{self.generation.num} before it was precommitted on a majority, "
                        f"and decided to roll it back")
        return [AbortLocal(gid)]

    def generation_changed(self, gen: Generation, now_ms: int) -> list:
        self.generation = gen
        out = []
        for t in list(self.txns.values()):
            if t.state == VOTING and t.generation.num != gen.num:
                out += self._abort(t, SERIALIZATION_FAILURE,
                                   "transaction aborted because the cluster switched to "
                                   f"generation {gen.num} while it was being prepared")
            elif t.state == WAITING_ACKS and t.generation.num != gen.num:
                # Committed; members that left the generation will apply it
                # when they catch up: the client need not wait for them.
                gone = sorted(self._peers(t) - t.commit_acks - gen.members)
                if gone:
                    out += self._maybe_reply(t, warning=(
                        f"the transaction is committed, but node(s) "
                        f"{', '.join(map(str, gone))} did not confirm that they applied it "
                        f"before they left the cluster's generation; they will apply it "
                        f"when they catch up, and reads there may not see it until then"))
        return out

    def _silent(self, t: _CoordTxn, waiting_for, since_ms: int, now_ms: int) -> list[int]:
        """Members in ``waiting_for`` that have said nothing (not even
        Working) for ``vote_timeout_ms`` since ``since_ms``."""
        return sorted(p for p in waiting_for
                      if now_ms - max(since_ms, self.working_ms.get(p, since_ms))
                      >= self.vote_timeout_ms)

    def tick(self, now_ms: int) -> list:
        out: list = []
        for t in list(self.txns.values()):
            if t.state == VOTING and now_ms - t.started_ms >= self.vote_timeout_ms:
                silent = self._silent(t, self._peers(t) - set(t.votes), t.started_ms, now_ms)
                if silent:
                    out += self._abort(t, TRANSACTION_ROLLBACK,
                                       f"transaction aborted: no answer from node(s) "
                                       f"{', '.join(map(str, silent))} for "
                                       f"{self.vote_timeout_ms} ms")
                    continue
            elif (t.state == PRECOMMITTING and not t.answered
                  and now_ms - t.phase_ms >= self.vote_timeout_ms):
                missing = self._peers(t) - t.precommit_acks
                silent = self._silent(t, missing, t.phase_ms, now_ms)
                # Only when the majority can no longer form without a silent one.
                if silent and len(t.precommit_acks) + len(missing) - len(silent) \
                        < t.generation.majority:
                    out += self._tell(t, Reply(
                        t.gid, False, STATEMENT_COMPLETION_UNKNOWN,
                        f"the outcome of this commit is not known yet: node(s) "
                        f"{', '.join(map(str, silent))} did not confirm the precommit within "
                        f"{self.vote_timeout_ms} ms; node {self.node_id} keeps trying and the "
                        f"transaction {t.gid} will commit once a majority has confirmed"))
            elif t.state == WAITING_ACKS and now_ms - t.phase_ms >= self.vote_timeout_ms:
                silent = self._silent(t, self._peers(t) - t.commit_acks, t.phase_ms, now_ms)
                if silent:
                    out += self._maybe_reply(t, warning=(
                        f"the transaction is committed, but node(s) "
                        f"{', '.join(map(str, silent))} did not confirm within "
                        f"{self.vote_timeout_ms} ms that they applied it; they will apply it "
                        f"when they catch up, and reads there may not see it until then"))
                    continue
            if now_ms - t.last_retry_ms < self.retry_ms:
                continue
            if t.state == VOTING:
                t.last_retry_ms = now_ms
                out += [Send(p, VoteRequest(t.gid, self.node_id))
                        for p in sorted(self._peers(t) - set(t.votes))]
            elif t.state == PRECOMMITTING:
                t.last_retry_ms = now_ms
                out += [Send(p, Precommit(t.gid, self.node_id))
                        for p in sorted(self._peers(t) - t.precommit_acks)]
            elif t.state == WAITING_ACKS:
                t.last_retry_ms = now_ms
                out += [Send(p, Decision(t.gid, self.node_id, True))
                        for p in sorted(self._peers(t) - t.commit_acks)]
            elif t.state == RESOLVING and t.own_fenced:
                t.last_retry_ms = now_ms
                out += [Send(p, TxStatusQuery(t.gid, self.node_id))
                        for p in sorted(self._peers(t) - t.fenced)]
        return out

    def forget(self, gid: str) -> None:
        """Kept for the shells: a finished transaction is dropped by the
        core itself once its answer is out."""
        t = self.txns.get(gid)
        if t is not None and t.state == DONE:
            del self.txns[gid]

    def reset(self) -> list[str]:
        """Forget every transaction (the local database connection was lost:
        what was in flight is decided again by ``recover``). Returns the
        gids whose clients were still waiting."""
        waiting = [g for g, t in self.txns.items() if not t.answered]
        self.txns.clear()
        return waiting

    def check_invariants(self) -> None:
        for t in self.txns.values():
            if t.committed_local and t.aborted_local:
                raise ProtocolInvariantError(f"{t.gid} both committed and aborted")
            if (t.state in (COMMITTING, WAITING_ACKS) or t.committed_local) \
                    and not t.recovered and not t.decided:
                if len(t.precommit_acks) < t.generation.majority:
                    raise ProtocolInvariantError(f"{t.gid} committed without a majority")
            if t.reply is not None and t.reply.committed:
                if not t.committed_local:
                    raise ProtocolInvariantError(f"{t.gid} reported before the local commit")
                if self.wait_peer_commits and not t.reply.warning \
                        and not self._peers(t) <= t.commit_acks:
                    raise ProtocolInvariantError(f"{t.gid} reported before the members")


# --- participant ---------------------------------------------------------------------

@dataclass
class _PartTxn:
    gid: str
    coordinator: int
    vote: Vote | None = None
    precommitted: bool = False        # our precommit record is durable
    persisting: bool = False          # Persist issued, not yet reported
    fenced: bool = False              # we promised never to acknowledge a precommit
    finished: bool | None = None      # True committed, False rolled back
    finishing: bool = False           # FinishLocal issued, not yet done


class Participant:
    """One member's view of the transactions other nodes coordinate."""

    def __init__(self, node_id: int, generation: Generation, *, max_finished: int = 100_000,
                 online: bool = True):
        self.node_id = node_id
        self.generation = generation
        # Only a node ONLINE in its generation takes part (mmts: PREPARE
        # requires ONLINE; GENERATIONS.md section 7 invariant 4).
        self.online = online
        self.txns: dict[str, _PartTxn] = {}
        self.max_finished = max_finished
        self._finished_order: deque[str] = deque()

    def _txn(self, gid: str) -> _PartTxn | None:
        t = self.txns.get(gid)
        if t is None:
            parsed = parse_gid(gid)
            if parsed is None or parsed[0] == self.node_id:
                return None
            t = self.txns[gid] = _PartTxn(gid, parsed[0])
        return t

    def applied(self, gid: str, ok: bool, sqlstate: str = "", message: str = "") -> list:
        """The applier prepared ``gid`` (ok) or failed to."""
        t = self._txn(gid)
        if t is None:
            return []
        gen = parse_gid(gid)[1]
        if ok and gen != self.generation.num:
            # mmts: a node of generation N does not take part in older ones.
            ok, sqlstate = False, SERIALIZATION_FAILURE
            message = (f"{REFUSING} of generation {gen}: node {self.node_id} is in "
                       f"generation {self.generation.num}")
        elif ok and not self.online:
            # A member not ONLINE yet (recovering, or restarted) does not
            # vote - and does not refuse either: once ONLINE it answers the
            # coordinator's next VoteRequest from its database (recovered).
            return []
        if t.vote is None:
            t.vote = Vote(gid, self.node_id, ok, sqlstate, message)
        return [Send(t.coordinator, t.vote)]

    def receive(self, msg) -> list:
        t = self._txn(msg.gid)
        if t is None or msg.sender != t.coordinator:
            return []
        cls = msg.__class__
        if cls is VoteRequest:
            return [Send(t.coordinator, t.vote)] if t.vote is not None else []
        if cls is Precommit:
            if t.finished is not None or t.vote is None or not t.vote.ok or t.fenced:
                return []
            if t.precommitted:
                return [Send(t.coordinator, PrecommitAck(t.gid, self.node_id))]
            if t.persisting:
                return []
            if parse_gid(t.gid)[1] != self.generation.num or not self.online:
                # The generation fence (GENERATIONS.md section 5): a node past
                # the transaction's generation never records its precommit,
                # so the cluster may count it as "no precommit, ever".
                return []
            t.persisting = True
            return [Persist(t.gid)]
        if cls is Decision:
            if t.finished is not None:
                return [Send(t.coordinator, CommitAck(t.gid, self.node_id))] \
                    if t.finished and t.vote is not None and t.vote.ok else []
            if t.vote is not None and t.vote.ok and not t.finishing:
                t.finishing = True
                return [FinishLocal(t.gid, msg.commit)]
        if cls is TxStatusQuery:
            return [Fence(t.gid)]
        return []

    def persisted(self, gid: str, ok: bool) -> list:
        """Persist done: our precommit record is durable (``ok``), or we are
        fenced for ``gid`` and must not acknowledge."""
        t = self._txn(gid)
        if t is None:
            return []
        t.persisting = False
        if not ok:
            t.fenced = True
            return []
        t.precommitted = True
        return [Send(t.coordinator, PrecommitAck(t.gid, self.node_id))]

    def fenced(self, gid: str, precommitted: bool, committed: bool) -> list:
        """Fence done: the record is 'p' (``precommitted``) or now 'x'."""
        t = self._txn(gid)
        if t is None:
            return []
        if precommitted:
            t.precommitted = True
        else:
            t.fenced = True
        state = COMMITTED if committed else PRECOMMITTED if precommitted else FENCED
        return [Send(t.coordinator, TxStatus(gid, self.node_id, state))]

    def recovered(self, gid: str, prepared: bool, committed: bool) -> None:
        """What this node's database says of ``gid`` when the participant
        has no memory of it (after a restart): still prepared here, or
        committed here. Lets it answer a coordinator that retransmits."""
        t = self._txn(gid)
        if t is None or t.vote is not None or not (prepared or committed):
            return
        if not committed and (parse_gid(gid)[1] != self.generation.num or not self.online):
            return      # only an ONLINE member of its generation votes (invariant 4)
        t.vote = Vote(gid, self.node_id, True)
        if committed and t.finished is None:
            self.finished(gid, True)

    def knows(self, gid: str) -> bool:
        t = self.txns.get(gid)
        return t is not None and t.vote is not None

    def finished(self, gid: str, committed: bool, prepared_here: bool = False) -> list:
        """COMMIT/ROLLBACK PREPARED of ``gid`` was done here (from the stream
        or after a FinishLocal). ``prepared_here``: the database showed it
        was prepared here, whatever this participant remembers."""
        t = self._txn(gid)
        if t is None:
            return []
        if prepared_here and t.vote is None:
            t.vote = Vote(gid, self.node_id, True)
        if t.finished is not None and t.finished != committed:
            raise ProtocolInvariantError(f"{gid} finished both ways on node {self.node_id}")
        first = t.finished is None
        t.finished = committed
        t.finishing = False
        if first:
            self._finished_order.append(gid)
            while len(self._finished_order) > self.max_finished:
                self.txns.pop(self._finished_order.popleft(), None)
        # Only a member that prepared the transaction here can say it
        # committed it here (a COMMIT PREPARED of a gid we never prepared
        # changes nothing on this node).
        voted_ok = t.vote is not None and t.vote.ok
        return [Send(t.coordinator, CommitAck(gid, self.node_id))] if committed and voted_ok \
            else []

    def action_failed(self, gid: str) -> None:
        """A Persist, Fence or FinishLocal could not be carried out: forget
        that it was under way (the coordinator's retransmission retries)."""
        t = self.txns.get(gid)
        if t is not None:
            t.persisting = t.finishing = False

    def reset(self) -> None:
        """Forget everything (the local database connection was lost); what
        matters is durable and is looked up again (``recovered``)."""
        self.txns.clear()
        self._finished_order.clear()

    def generation_changed(self, gen: Generation, online: bool = True) -> None:
        self.generation = gen
        self.online = online
