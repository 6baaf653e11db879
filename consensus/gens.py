"""Generations: a pure state machine applied from the committed Raft log.

What this module owns: the cluster's generation (``Gen``: number, members,
configured nodes, donors), which nodes are ONLINE in it (``last_online_in``),
the outcomes the cluster decided for in-doubt transactions of earlier
generations, and the codec of the log entries that change them. Every node
applies the same committed entries in the same order and so holds the same
``GenState`` (GENERATIONS.md section 3: "every rule a function of the applied
prefix"). No I/O, clocks or randomness; the leader's policy that decides
*what* to propose lives in ``consensus/policy.py``.

Entries (``encode_entry``/``decode_entry``: JSON, a type tag and a version):

- ``Gen(num, members, configured, donors)``: the next generation. Applied
  only if ``num`` is the current number + 1, ``members`` are a majority of
  ``configured`` (which only a future ``Config`` entry may change), and
  ``donors`` equal the donors this state computes for ``members``, which
  must not be empty. Anything else is a no-op (``Ignored``): a proposal made
  from a stale view, or a second proposal for the same number. Donors are
  ONLINE in the new generation at once; the other members are in RECOVERY.
- ``Online(node, num)``: a RECOVERY member reached its donor's marker.
  A no-op unless ``num`` is the current generation (the log orders it
  against switches, GENERATIONS.md section 6).
- ``Decide(gid, commit)``: the cluster's outcome for a transaction of an
  *earlier* generation (GENERATIONS.md section 5). The first decision for a
  gid stands; later ones, and decisions for a transaction of the current or
  a later generation, are no-ops.
- ``Forget(gids)``: drop decisions every node has carried out. The last
  ``forgotten_max`` forgotten outcomes are still kept (in order, without
  their index) so that a late report of such a gid cannot have it decided
  again: the tombstone holds where the policy's precondition for
  forgetting was met from statuses another leader never saw.

Reserved tags (issue 15, the referee, and membership changes): ``used``,
``witness``, ``store_abandoned``, ``config``. They decode to an error that
says so, as any unknown tag or malformed entry does (``GensDecodeError``).

Rules this state keeps (``check_invariants``):

- The generation number never decreases and there is one (members,
  configured, donors) per number: entries are validated against the prefix
  they follow, not against the proposer's view.
- A node is ONLINE iff ``last_online_in[node] == gen.num``; RECOVERY if it is
  a member and not ONLINE; DEAD otherwise (mmts ``MtmGetCurrentStatusInGen``;
  mmts's "members are a quorum" condition holds for every applied gen).
- ``may_commit()``: every member is ONLINE in the current generation.
  Transactions commit only in such a generation (a commit needs every
  member's vote, and a node votes only while ONLINE).
- Donors of a new generation G: members X with ``last_online_in[X] >=
  last_committable``, the last generation in which ``may_commit`` held. A
  generation without may_commit had no commits, so X, ONLINE in that
  generation or a later one, holds every committed transaction
  (GENERATIONS.md section 6, without the referee's store).

The shell (``replication/node.py``) applies each committed entry with
``apply(index, data)`` and carries out the effects it returns, in order and
idempotently (a restart applies the committed prefix again):

- ``SwitchTo(gen, status)``: a new generation. ONLINE (a donor): write the
  marker PS(gen.num) under the prepare barrier, after finishing every
  decided gid. RECOVERY: catch up from a donor's marker. DEAD: refuse
  everything; catch up from a donor before asking to join. In each case
  tell the commit cores (``generation_changed``): transactions of the old
  generation still voting abort, and nothing of an older generation is
  voted on or precommitted any more (the fence).
- ``BecomeOnline(num)``: this node's ``Online`` applied: serve and commit.
- ``MayCommit(num)``: every member is ONLINE: writes may start.
- ``DecisionMade(gid, commit)``: COMMIT/ROLLBACK PREPARED ``gid`` here if it
  is prepared here (``Coordinator.decided`` if this node coordinates it).
- ``Forgotten(gids)``: the precommit records of ``gids`` may be deleted.
- ``Ignored(entry, reason)``: log it; nothing changed.

After ``restore`` (a snapshot from the leader, or a restart from one) the
shell carries out ``resync_effects()`` the same way: the snapshot replaced
entries whose effects this node may never have seen.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

CODEC_VERSION = 1
SNAPSHOT_VERSION = 1

ONLINE, RECOVERY, DEAD = "online", "recovery", "dead"

# gids are replication/commit.py's MTM-<node>-<gen>-<seq>[:<client gid>]
_GID_RE = re.compile(r"^MTM-(\d+)-(\d+)-(\d+)(?::.*)?$", re.S)
MAX_GID_LEN = 200
MAX_FORGET = 1000
RESERVED_TAGS = frozenset({"used", "witness", "store_abandoned", "config"})


class GensDecodeError(ValueError):
    """Bytes that are not a valid generation entry or snapshot."""


class GensInvariantError(AssertionError):
    pass


def gid_gen(gid: str) -> int | None:
    """The generation a gid was started in, or None if it is not ours."""
    m = _GID_RE.match(gid)
    return int(m.group(2)) if m else None


def majority(n: int) -> int:
    return n // 2 + 1


# --- entries -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gen:
    num: int
    members: frozenset[int]
    configured: frozenset[int]
    donors: frozenset[int]

    @property
    def majority(self) -> int:
        """Precommit quorum of this generation's transactions (replication/
        commit.py uses a Gen wherever it takes a Generation)."""
        return majority(len(self.configured))


@dataclass(frozen=True)
class Online:
    node: int
    num: int


@dataclass(frozen=True)
class Decide:
    gid: str
    commit: bool


@dataclass(frozen=True)
class Forget:
    gids: tuple[str, ...]


def _ids(ids) -> list[int]:
    return sorted(ids)


def encode_entry(e) -> bytes:
    cls = e.__class__
    if cls is Gen:
        d = {"t": "gen", "num": e.num, "members": _ids(e.members),
             "configured": _ids(e.configured), "donors": _ids(e.donors)}
    elif cls is Online:
        d = {"t": "online", "node": e.node, "num": e.num}
    elif cls is Decide:
        d = {"t": "decide", "gid": e.gid, "commit": e.commit}
    elif cls is Forget:
        d = {"t": "forget", "gids": list(e.gids)}
    else:
        raise TypeError(f"not a generation entry: {e!r}")
    d["v"] = CODEC_VERSION
    return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()


def _int(d: dict, key: str, what: str) -> int:
    v = d.get(key)
    if type(v) is not int or v <= 0:
        raise GensDecodeError(f"{what}: {key!r} must be a positive integer, not {v!r}")
    return v


def _idset(d: dict, key: str, what: str, allow_empty: bool = False) -> frozenset[int]:
    v = d.get(key)
    if not isinstance(v, list) or any(type(x) is not int or x <= 0 for x in v):
        raise GensDecodeError(f"{what}: {key!r} must be a list of node ids, not {v!r}")
    if len(set(v)) != len(v) or (not v and not allow_empty):
        raise GensDecodeError(f"{what}: {key!r} must be distinct node ids, not {v!r}")
    return frozenset(v)


def _gid(v, what: str) -> str:
    if not isinstance(v, str) or not v or len(v) > MAX_GID_LEN:
        raise GensDecodeError(f"{what}: bad gid {v!r}")
    return v


def _keys(d: dict, keys: set, what: str) -> None:
    if set(d) != keys:
        raise GensDecodeError(f"{what}: fields {sorted(d)} (expected {sorted(keys)})")


def _load_json(data: bytes, what: str):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise GensDecodeError(f"{what}: not bytes but {type(data).__name__}")
    try:
        return json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise GensDecodeError(f"{what}: not JSON ({exc})") from None


def decode_entry(data: bytes):
    """The entry encoded in ``data``; raises ``GensDecodeError`` for anything
    but exactly what ``encode_entry`` produces (up to JSON spacing/order)."""
    d = _load_json(data, "generation entry")
    if not isinstance(d, dict):
        raise GensDecodeError(f"generation entry: not an object but {type(d).__name__}")
    v = d.get("v")
    if type(v) is not int or v != CODEC_VERSION:
        raise GensDecodeError(f"generation entry: version {v!r} (this node reads "
                              f"{CODEC_VERSION})")
    t = d.get("t")
    if t in RESERVED_TAGS:
        raise GensDecodeError(f"generation entry: type {t!r} is reserved (referee and "
                              f"membership changes) and not implemented by this node")
    if t == "gen":
        _keys(d, {"v", "t", "num", "members", "configured", "donors"}, "gen")
        return Gen(_int(d, "num", "gen"), _idset(d, "members", "gen"),
                   _idset(d, "configured", "gen"), _idset(d, "donors", "gen", True))
    if t == "online":
        _keys(d, {"v", "t", "node", "num"}, "online")
        return Online(_int(d, "node", "online"), _int(d, "num", "online"))
    if t == "decide":
        _keys(d, {"v", "t", "gid", "commit"}, "decide")
        if type(d["commit"]) is not bool:
            raise GensDecodeError(f"decide: 'commit' must be a boolean, not {d['commit']!r}")
        return Decide(_gid(d["gid"], "decide"), d["commit"])
    if t == "forget":
        _keys(d, {"v", "t", "gids"}, "forget")
        g = d["gids"]
        if not isinstance(g, list) or not g or len(g) > MAX_FORGET:
            raise GensDecodeError(f"forget: 'gids' must be a list of 1 to {MAX_FORGET} gids")
        gids = tuple(_gid(x, "forget") for x in g)
        if len(set(gids)) != len(gids):
            raise GensDecodeError("forget: duplicate gids")
        return Forget(gids)
    raise GensDecodeError(f"generation entry: unknown type {t!r}")


# --- effects for the shell ------------------------------------------------------------------------

@dataclass(frozen=True)
class SwitchTo:
    gen: Gen
    status: str          # this node's status in it: ONLINE (a donor), RECOVERY or DEAD


@dataclass(frozen=True)
class BecomeOnline:
    num: int


@dataclass(frozen=True)
class MayCommit:
    num: int


@dataclass(frozen=True)
class DecisionMade:
    gid: str
    commit: bool


@dataclass(frozen=True)
class Forgotten:
    gids: tuple[str, ...]


@dataclass(frozen=True)
class Ignored:
    entry: object
    reason: str


# --- the state -----------------------------------------------------------------------------------

class GenState:
    """One node's copy of the generation state. ``self_id`` only shapes the
    effects (this node's status); the state itself is the same everywhere."""

    def __init__(self, self_id: int, configured, *, history_max: int = 1024,
                 forgotten_max: int = 10_000) -> None:
        configured = frozenset(configured)
        if not configured or any(type(n) is not int or n <= 0 for n in configured):
            raise ValueError(f"configured must be positive node ids, not {configured!r}")
        self.self_id = self_id
        self.history_max = history_max
        # Bootstrap (as replication/node.py starts today): generation 1 holds
        # every configured node, all ONLINE (they start from the same data).
        self.index = 0
        self.gen = Gen(1, configured, configured, configured)
        self.gen_index = 0
        self._last_online_in: dict[int, int] = {n: 1 for n in configured}
        self.last_committable = 1
        self._decisions: dict[str, tuple[bool, int]] = {}
        # Forgotten decisions, oldest first, the last ``forgotten_max`` kept:
        # a late report of a forgotten gid finds its outcome instead of
        # having it decided a second time.
        self.forgotten_max = forgotten_max
        self._forgotten: dict[str, bool] = {}
        # num -> (members, configured) of recent generations: the quorums of
        # their in-doubt transactions (policy.py)
        self._history: dict[int, tuple[frozenset[int], frozenset[int]]] = {
            1: (configured, configured)}
        self._committable: set[int] = {1}     # of the generations in _history

    # -- queries ----------------------------------------------------------------------------------

    def last_online_in(self, node: int) -> int:
        return self._last_online_in.get(node, 0)

    def status(self, node: int | None = None) -> str:
        node = self.self_id if node is None else node
        if self._last_online_in.get(node, 0) == self.gen.num:
            return ONLINE
        return RECOVERY if node in self.gen.members else DEAD

    def online_members(self) -> frozenset[int]:
        n = self.gen.num
        return frozenset(m for m in self.gen.members if self._last_online_in.get(m, 0) == n)

    def may_commit(self, num: int | None = None) -> bool:
        """Every member ONLINE in the current generation (``num`` None or
        current); for an earlier ``num``: whether that generation came to
        that, so could have commits (False once no longer remembered)."""
        if num is not None and num != self.gen.num:
            return num < self.gen.num and num in self._committable
        n = self.gen.num
        return all(self._last_online_in.get(m, 0) == n for m in self.gen.members)

    def donors_for(self, members) -> frozenset[int]:
        """Who could hand every committed transaction to the others, were
        ``members`` the next generation."""
        lc = self.last_committable
        return frozenset(m for m in members if self._last_online_in.get(m, 0) >= lc)

    def decision(self, gid: str) -> bool | None:
        """The cluster's outcome for ``gid`` (forgotten ones too, while kept)."""
        d = self._decisions.get(gid)
        return self._forgotten.get(gid) if d is None else d[0]

    def decision_index(self, gid: str) -> int | None:
        d = self._decisions.get(gid)
        return None if d is None else d[1]

    def decisions(self) -> dict[str, bool]:
        """The decisions not forgotten yet."""
        return {g: c for g, (c, _) in self._decisions.items()}

    def gen_def(self, num: int) -> tuple[frozenset[int], frozenset[int]] | None:
        """(members, configured) of generation ``num``, if still remembered."""
        return self._history.get(num)

    # -- applying ---------------------------------------------------------------------------------

    def note_applied(self, index: int) -> None:
        """A committed entry that is not ours (Raft's empty entry, a conf change)."""
        self._advance(index)

    def _advance(self, index: int) -> None:
        if index <= self.index:
            raise GensInvariantError(f"entry {index} applied after {self.index}")
        self.index = index

    def apply(self, index: int, data: bytes) -> list:
        """Apply the committed entry at ``index`` (empty ``data``: Raft's own
        empty entry). Raises ``GensDecodeError`` for bytes that are not an
        entry: a log holding garbage is a bug, and the node must stop."""
        if not data:
            self._advance(index)
            return []
        entry = decode_entry(data)
        return self.apply_entry(index, entry)

    def apply_entry(self, index: int, e) -> list:
        self._advance(index)
        cls = e.__class__
        if cls is Gen:
            return self._apply_gen(index, e)
        if cls is Online:
            return self._apply_online(e)
        if cls is Decide:
            return self._apply_decide(index, e)
        if cls is Forget:
            gone = []
            for g in e.gids:
                d = self._decisions.pop(g, None)
                if d is not None:
                    gone.append(g)
                    self._forgotten[g] = d[0]
            while len(self._forgotten) > self.forgotten_max:
                del self._forgotten[next(iter(self._forgotten))]
            return [Forgotten(tuple(gone))] if gone else [Ignored(e, "nothing to forget")]
        raise TypeError(f"not a generation entry: {e!r}")

    def _apply_gen(self, index: int, e: Gen) -> list:
        cur = self.gen
        if e.num != cur.num + 1:
            return [Ignored(e, f"generation {e.num} does not follow {cur.num}")]
        if e.configured != cur.configured:
            return [Ignored(e, f"configured {sorted(e.configured)} differs from "
                               f"{sorted(cur.configured)} (only Config changes it)")]
        if not e.members <= e.configured or len(e.members) < majority(len(e.configured)):
            return [Ignored(e, f"members {sorted(e.members)} are not a majority of "
                               f"{sorted(e.configured)}")]
        donors = self.donors_for(e.members)
        if not donors:
            return [Ignored(e, f"no member of {sorted(e.members)} holds every commit "
                               f"(last committable generation {self.last_committable})")]
        if donors != e.donors:
            return [Ignored(e, f"donors {sorted(e.donors)} proposed, {sorted(donors)} "
                               f"computed")]
        self.gen = e
        self.gen_index = index
        for d in donors:
            self._last_online_in[d] = e.num
        self._history[e.num] = (e.members, e.configured)
        while len(self._history) > self.history_max:
            old = min(self._history)
            del self._history[old]
            self._committable.discard(old)
        out: list = [SwitchTo(e, self.status())]
        if self.may_commit():
            self._became_committable()
            out.append(MayCommit(e.num))
        return out

    def _became_committable(self) -> None:
        self.last_committable = self.gen.num
        self._committable.add(self.gen.num)

    def _apply_online(self, e: Online) -> list:
        if e.num != self.gen.num:
            return [Ignored(e, f"generation {e.num} is not the current {self.gen.num}")]
        if e.node not in self.gen.members:
            return [Ignored(e, f"node {e.node} is not a member of {self.gen.num}")]
        if self._last_online_in.get(e.node, 0) == e.num:
            return [Ignored(e, f"node {e.node} is already online in {e.num}")]
        self._last_online_in[e.node] = e.num
        out: list = [BecomeOnline(e.num)] if e.node == self.self_id else []
        if self.may_commit():
            self._became_committable()
            out.append(MayCommit(e.num))
        return out

    def _apply_decide(self, index: int, e: Decide) -> list:
        g = gid_gen(e.gid)
        if g is None or g >= self.gen.num:
            return [Ignored(e, f"{e.gid} is not a transaction of an earlier generation than "
                               f"{self.gen.num}")]
        if e.gid in self._decisions or e.gid in self._forgotten:
            return [Ignored(e, f"{e.gid} is already decided")]
        self._decisions[e.gid] = (e.commit, index)
        return [DecisionMade(e.gid, e.commit)]

    def resync_effects(self) -> list:
        """What the shell must (idempotently) make true after ``restore``."""
        out: list = [SwitchTo(self.gen, self.status())]
        if self.status() == ONLINE:
            out.append(BecomeOnline(self.gen.num))
        if self.may_commit():
            out.append(MayCommit(self.gen.num))
        out += [DecisionMade(g, c) for g, (c, _) in sorted(self._decisions.items())]
        return out

    # -- invariants --------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        g = self.gen
        if not (g.donors <= g.members <= g.configured) or not g.donors:
            raise GensInvariantError(f"generation {g}: donors, members, configured")
        if len(g.members) < majority(len(g.configured)):
            raise GensInvariantError(f"generation {g.num} is a minority")
        if not 1 <= self.last_committable <= g.num:
            raise GensInvariantError(f"last committable {self.last_committable} in {g.num}")
        if any(v > g.num for v in self._last_online_in.values()):
            raise GensInvariantError("online in a generation after the current one")
        if any(self._last_online_in.get(d, 0) != g.num for d in g.donors):
            raise GensInvariantError("a donor is not online in its generation")
        if self.may_commit() and (self.last_committable != g.num
                                  or g.num not in self._committable):
            raise GensInvariantError("may commit, but not recorded as committable")
        if self._committable and max(self._committable) != self.last_committable \
                and self.last_committable in self._history:
            raise GensInvariantError("the last committable generation is not the last one "
                                     "recorded as committable")
        if self.gen_index > self.index:
            raise GensInvariantError("current generation applied after the applied index")
        for gid, (_, i) in self._decisions.items():
            if i > self.index or (gid_gen(gid) or g.num) >= g.num:
                raise GensInvariantError(f"decision for {gid} at {i}")

    # -- snapshots ---------------------------------------------------------------------------------

    def _key(self) -> tuple:
        return (self.index, self.gen, self.gen_index, sorted(self._last_online_in.items()),
                self.last_committable, sorted(self._decisions.items()),
                list(self._forgotten.items()), self.forgotten_max,
                sorted(self._history.items()), sorted(self._committable), self.history_max)

    def __eq__(self, other) -> bool:
        return isinstance(other, GenState) and self._key() == other._key()

    def snapshot(self) -> bytes:
        """The state as bytes (Raft's snapshot data); the same on every node
        at the same index."""
        g = self.gen
        d = {"v": SNAPSHOT_VERSION, "index": self.index, "gen_index": self.gen_index,
             "gen": [g.num, _ids(g.members), _ids(g.configured), _ids(g.donors)],
             "last_online_in": sorted([n, v] for n, v in self._last_online_in.items()),
             "last_committable": self.last_committable,
             "decisions": sorted([gid, c, i] for gid, (c, i) in self._decisions.items()),
             "forgotten": [[gid, c] for gid, c in self._forgotten.items()],
             "forgotten_max": self.forgotten_max,
             "history": sorted([n, _ids(m), _ids(c), n in self._committable]
                               for n, (m, c) in self._history.items()),
             "history_max": self.history_max}
        return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def restore(cls, self_id: int, data: bytes) -> GenState:
        d = _load_json(data, "generation snapshot")
        what = "generation snapshot"
        if not isinstance(d, dict) or d.get("v") != SNAPSHOT_VERSION:
            raise GensDecodeError(f"{what}: not a version {SNAPSHOT_VERSION} snapshot")
        _keys(d, {"v", "index", "gen_index", "gen", "last_online_in", "last_committable",
                  "decisions", "forgotten", "forgotten_max", "history", "history_max"}, what)
        try:
            num, members, configured, donors = d["gen"]
            gen = Gen(_int({"n": num}, "n", what), _idset({"m": members}, "m", what),
                      _idset({"c": configured}, "c", what),
                      _idset({"d": donors}, "d", what))
            s = cls(self_id, gen.configured, history_max=_int(d, "history_max", what),
                    forgotten_max=_int(d, "forgotten_max", what))
            s.gen = gen
            s.index = d["index"]
            s.gen_index = d["gen_index"]
            s.last_committable = _int(d, "last_committable", what)
            s._last_online_in = {}
            for n, v in d["last_online_in"]:
                s._last_online_in[_int({"n": n}, "n", what)] = _int({"v": v}, "v", what)
            s._decisions = {}
            for gid, c, i in d["decisions"]:
                if type(c) is not bool or type(i) is not int:
                    raise GensDecodeError(f"{what}: bad decision {gid!r}")
                s._decisions[_gid(gid, what)] = (c, i)
            s._forgotten = {}
            for gid, c in d["forgotten"]:
                if type(c) is not bool or gid in s._decisions:
                    raise GensDecodeError(f"{what}: bad forgotten decision {gid!r}")
                s._forgotten[_gid(gid, what)] = c
            s._history = {}
            s._committable = set()
            for n, m, c, committable in d["history"]:
                s._history[_int({"n": n}, "n", what)] = (_idset({"m": m}, "m", what),
                                                         _idset({"c": c}, "c", what))
                if type(committable) is not bool:
                    raise GensDecodeError(f"{what}: bad history entry {n!r}")
                if committable:
                    s._committable.add(n)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, GensDecodeError):
                raise
            raise GensDecodeError(f"{what}: malformed ({exc})") from None
        if type(s.index) is not int or type(s.gen_index) is not int or s.index < 0 \
                or s.gen_index < 0:
            raise GensDecodeError(f"{what}: bad indexes")
        try:
            s.check_invariants()
        except GensInvariantError as exc:
            raise GensDecodeError(f"{what}: inconsistent ({exc})") from None
        return s
