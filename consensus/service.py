"""The consensus service: the asyncio shell around the Raft core, the
generation state machine, the failure detector, the read lease and the
leader's policy (consensus/README.md, "How the node shell drives it").

What it owns: one node's ``RaftNode`` on a ``FileStorage``, its
``GenState``, its ``FailureDetector``, ``ReadLease`` and ``LeaderPolicy``,
and the timer that drives them. What it does not own: the transport (the
caller passes ``send(peer, data)`` and feeds what arrives to ``receive``),
the database (the ``Host`` answers the Status fields that need it and
carries out the generation effects).

One task (``_run``) takes events from a queue - ticks, messages, proposals
- so the cores are only ever touched by it; the Ready loop saves to disk in
a worker thread (fsync must not stall the event loop) and the events that
arrive meanwhile wait in the queue. The persistence rule holds: a Ready's
messages are sent only after ``storage.save`` returned.

Wire: every payload starts with a tag byte: ``r`` a Raft message
(``raft.encode_message``), ``s`` a Status or LeaseGrant
(``policy.encode_message``).
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from consensus import policy as pol
from consensus import raft
from consensus.gens import (DEAD, ONLINE, RECOVERY, GenState, decode_entry, encode_entry)
from consensus.storage import FileStorage

TAG_RAFT, TAG_POLICY = b"r", b"s"
COMPACT_EVERY = 500          # applied entries between two snapshots


@dataclass(frozen=True)
class ServiceConfig:
    tick_ms: int = 50            # Raft tick; elections after election_ticks..2x of them
    election_ticks: int = 10
    policy: pol.PolicyConfig = pol.PolicyConfig()

    @property
    def heartbeat_ticks(self) -> int:
        return max(1, self.policy.heartbeat_ms // self.tick_ms)


class Host(Protocol):
    """What the service asks of the node it runs in."""

    def effects(self, effects: list) -> None:
        """Carry out ``gens`` effects, in order (idempotent: a restart
        replays the committed log). Called from the service task: must not
        block; database work goes to tasks of the host."""

    def status_fields(self, num: int, resolving: tuple[str, ...]) -> dict:
        """``prepared_old``, ``answers``, ``join``, ``online`` for this
        node's next Status (from the host's last reading of its database)."""


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class ConsensusService:
    def __init__(self, self_id: int, configured, state_dir: str | os.PathLike,
                 send: Callable[[int, bytes], None], host: Host,
                 config: ServiceConfig | None = None, log=None) -> None:
        self.id = self_id
        self.configured = frozenset(configured)
        self.peers = sorted(self.configured - {self_id})
        self.cfg = config or ServiceConfig()
        self._send = send
        self.host = host
        self.log = log
        os.makedirs(state_dir, exist_ok=True)
        self.storage = FileStorage(state_dir)
        restored = self.storage.load()
        # A node that never ran (no Raft state at all: a new cluster) lost
        # nothing in a restart: it is not "fresh" (below).
        self._new = (restored.hard_state.term == 0 and restored.snapshot is None
                     and not restored.entries)
        now = _now_ms()
        self.raft = raft.RaftNode(self_id, voters=self.configured, state=restored,
                                  rng=random.Random(int.from_bytes(os.urandom(8), "big")),
                                  election_ticks=self.cfg.election_ticks,
                                  heartbeat_ticks=2, debug=False)
        if restored.snapshot is not None:
            self.gens = GenState.restore(self_id, restored.snapshot.data)
        else:
            self.gens = GenState(self_id, self.configured)
        pc = self.cfg.policy
        self.fd = pol.FailureDetector(self_id, self.configured, now, suspect_ms=pc.suspect_ms,
                                      lag_threshold_ms=pc.lag_threshold_ms)
        self.lease = pol.ReadLease(pc.lease_ms)
        self.policy = pol.LeaderPolicy(self_id, self.configured, now, pc)
        self.echo = (0, 0)
        self.resolving: tuple[str, ...] = ()
        # The generation this node was ONLINE in when it (re)started: what
        # its commit cores knew of that generation's transactions is gone,
        # so it takes no part until a later generation (README, Deviations).
        self.fresh_gen: int | None = None
        self._replayed = False
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.timer: asyncio.Task | None = None
        self.ticks = 0
        self.last_status: dict[int, pol.Status] = {}
        self.started = False
        self.paused = False
        self.catching_up = False      # set by the host: outside, links up, streaming
        self.lease_lapses = 0         # times an ONLINE node's read lease ran out
        self._lapsed = True

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Replay the committed log (effects included), then run."""
        if self.raft.snapshot is not None:
            self.host.effects(self.gens.resync_effects())
        await self._drain()      # the first Readies hand out the committed prefix again
        self.fresh_gen = self.gens.gen.num if self.gens.status() == ONLINE and not self._new \
            else None
        self._replayed = True
        self.started = True
        self.task = asyncio.create_task(self._run(), name="consensus")
        self.timer = asyncio.create_task(self._timer(), name="consensus timer")

    async def stop(self) -> None:
        for t in (self.timer, self.task):
            if t is not None:
                t.cancel()
        await asyncio.gather(*(t for t in (self.timer, self.task) if t is not None),
                             return_exceptions=True)
        self.storage.close()

    def mark_fresh(self) -> None:
        """The node lost its volatile protocol state (its PostgreSQL went
        away): like a restart, it takes no part until a later generation."""
        if self.gens.status() == ONLINE:
            self.fresh_gen = self.gens.gen.num
            self.lease.revoke()

    def pause(self, paused: bool) -> None:
        """While paused (the node's database is unreachable) the node is
        silent: it neither ticks nor answers, so the others elect a leader
        without it and exclude it, as they would a crashed node - a node
        that answered but could not vote would stall every commit. Its
        durable state is kept; on resume it takes no part until a later
        generation (``mark_fresh``)."""
        if paused == self.paused:
            return
        self.paused = paused
        self.mark_fresh()
        if not paused:
            now = _now_ms()
            self.fd.loop_tick(now - 10 * self.fd.suspect_ms, now)   # its silence was its own
        self._log("warning" if paused else "info", "consensus_paused" if paused
                  else "consensus_resumed")

    # -- inputs -----------------------------------------------------------------------------------

    def receive(self, peer: int, data: bytes) -> None:
        self.queue.put_nowait((peer, data))

    async def _timer(self) -> None:
        step = self.cfg.tick_ms
        expected = _now_ms() + step
        while True:
            await asyncio.sleep(max(0, expected - _now_ms()) / 1000)
            now = _now_ms()
            self.queue.put_nowait(("tick", expected, now))
            expected = max(expected + step, now + 1)

    async def _run(self) -> None:
        while True:
            ev = await self.queue.get()
            if self.paused:
                continue
            try:
                if ev[0] == "tick":
                    await self._tick(ev[1], ev[2])
                else:
                    await self._message(*ev)
            except (raft.DecodeError, pol.PolicyDecodeError) as e:
                self._log("warning", "consensus_bad_message", error=str(e))

    async def _message(self, peer: int, data: bytes) -> None:
        tag, body = data[:1], data[1:]
        now = _now_ms()
        if tag == TAG_RAFT:
            m = raft.decode_message(body)
            if m.to != self.id or m.frm != peer:
                return
            self.raft.step(m)
            await self._drain()
        elif tag == TAG_POLICY:
            m = pol.decode_message(body)
            if m.__class__ is pol.Status:
                if m.node != peer:
                    return
                self.fd.heard_from(peer, now)
                self.policy.on_status(m, now)
                self.last_status[peer] = m
                if m.round and (m.term, m.round) > self.echo:
                    self.echo = (m.term, m.round)
                    self.resolving = m.resolving
            elif m.node == self.id:
                self.lease.granted(m.sent_ms)

    async def _tick(self, expected: int, now: int) -> None:
        self.fd.loop_tick(expected, now)
        self.raft.tick()
        await self._drain()
        self.ticks += 1
        # The leader steps every tick: a read lease is granted a round after
        # a quorum echoed it, so its rounds set how soon leases are renewed
        # (with a round per heartbeat a lease of 400 ms arrived with ~100 ms
        # left, and a late heartbeat let it lapse on a healthy node).
        if self.ticks % self.cfg.heartbeat_ticks and self.raft.role is not raft.Role.LEADER:
            return
        await self._policy_step(_now_ms())

    async def _policy_step(self, now: int) -> None:
        r = self.raft
        leader = r.role is raft.Role.LEADER
        pending: list = []
        ready = False
        if leader:
            ready = r.term_at(r.applied) == r.term
            pending = [decode_entry(e.data) for e in r.entries(r.applied + 1, r.last_index + 1)
                       if e.type is raft.EntryType.NORMAL and e.data]
        plan = self.policy.tick(now, self.gens, self.fd, leader=leader, term=r.term,
                                log_ready=ready, pending=pending)
        for e in plan.proposals:
            try:
                index = r.propose(encode_entry(e))
            except (raft.NotLeader, raft.ProposalDropped):
                break
            self.policy.proposed(e, index, now)
            self._log("info", "consensus_propose", entry=repr(e))
        if plan.proposals:
            await self._drain()
        for g in plan.grants:
            if g.node == self.id:
                self.lease.granted(g.sent_ms)
            else:
                self._send(g.node, TAG_POLICY + pol.encode_message(g))
        if plan.round:
            self.echo = (r.term, plan.round)
            self.resolving = plan.resolving
        if self.participating() and not self.lease.valid(now):
            if not self._lapsed:
                self._lapsed = True
                self.lease_lapses += 1
                self._log("warning", "read_lease_lapsed", gen=self.gens.gen.num)
        else:
            self._lapsed = False
        st = self._status(now, leader, plan.round)
        self.policy.on_status(st, now)
        self.last_status[self.id] = st
        data = TAG_POLICY + pol.encode_message(st)
        for p in self.peers:
            self._send(p, data)

    def _status(self, now: int, leader: bool, rnd: int) -> pol.Status:
        g = self.gens
        num = g.gen.num
        f = self.host.status_fields(num, self.resolving)
        st = g.status()
        join = online = None
        if st == RECOVERY and f.get("online"):
            online = pol.OnlineRequest(self.id, num)
        elif st == DEAD and f.get("join") is not None:
            join = pol.JoinRequest(self.id, int(f["join"]))
        return pol.Status(self.id, now, self.raft.term, num, g.index, self.fd.sees(now),
                          self.fd.lag_ms, g.last_online_in(self.id),
                          fresh=self.fresh_gen == num, join=join, online=online,
                          prepared_old=frozenset(f.get("prepared_old", ())),
                          answers=tuple(f.get("answers", ())), echo=self.echo,
                          lease=st == ONLINE and self.fresh_gen != num,
                          round=rnd if leader else 0,
                          resolving=self.resolving if leader else (),
                          settled=int(f.get("settled", 0)), disabled=bool(f.get("disabled")))

    # -- the Ready loop ---------------------------------------------------------------------------

    async def _drain(self) -> None:
        r = self.raft
        while r.has_ready():
            rd = r.ready()
            if rd.must_sync:
                await asyncio.to_thread(self.storage.save, rd)
            for m in rd.messages:
                self._send(m.to, TAG_RAFT + raft.encode_message(m))
            if rd.soft_state is not None:
                self._log("info", "raft_role", role=rd.soft_state.role.name.lower(),
                          leader=rd.soft_state.leader, term=r.term)
            if rd.snapshot is not None:
                self.gens = GenState.restore(self.id, rd.snapshot.data)
                self.host.effects(self.gens.resync_effects())
            for e in rd.committed_entries:
                if e.type is raft.EntryType.CONF_CHANGE:
                    r.apply_conf_change(raft.decode_conf_change(e.data))
                    self.gens.note_applied(e.index)
                    continue
                effects = self.gens.apply(e.index, e.data)
                self._after_apply(effects)
                self.host.effects(effects)
            r.advance(rd)
        if r.applied - r.snapshot_index >= COMPACT_EVERY:
            snap = r.compact(r.applied, self.gens.snapshot())
            await asyncio.to_thread(self.storage.compact, snap)

    def _after_apply(self, effects: list) -> None:
        for e in effects:
            name = e.__class__.__name__
            if name == "SwitchTo":
                if self.fresh_gen is not None and e.gen.num > self.fresh_gen:
                    self.fresh_gen = None
                if e.status != ONLINE:
                    self.lease.revoke()
                self._log("info", "generation_switch", gen=e.gen.num,
                          members=sorted(e.gen.members), donors=sorted(e.gen.donors),
                          status=e.status.lower())
            elif name == "BecomeOnline":
                self._log("info", "node_online", gen=e.num)
            elif name == "DecisionMade":
                self._log("info", "in_doubt_decided", gid=e.gid, commit=e.commit)
            elif name == "Ignored":
                self._log("debug", "consensus_entry_ignored", entry=repr(e.entry),
                          reason=e.reason)

    # -- views ------------------------------------------------------------------------------------

    def serving(self, now_ms: int | None = None) -> bool:
        """May this node serve clients (reads too): ONLINE in its generation,
        not fresh, and within a read lease."""
        now = _now_ms() if now_ms is None else now_ms
        return self.participating() and self.lease.valid(now)

    def participating(self) -> bool:
        """May it vote and precommit: ONLINE and not fresh."""
        g = self.gens
        return self._replayed and g.status() == ONLINE and self.fresh_gen != g.gen.num

    def user_status(self, now_ms: int | None = None) -> str:
        """online, recovery, catchup, isolated (consensus/policy.user_status)."""
        now = _now_ms() if now_ms is None else now_ms
        st = self.gens.status()
        if st == ONLINE and self.fresh_gen == self.gens.gen.num:
            return "recovery"
        return pol.user_status(st, lease_valid=self.lease.valid(now),
                               catching_up=st == DEAD and self.catching_up)

    def view(self) -> dict:
        now = _now_ms()
        g = self.gens
        r = self.raft
        return {
            "user_status": self.user_status(now),
            "raft_term": r.term, "raft_leader": r.leader or None,
            "raft_role": r.role.name.lower(), "raft_commit": r.commit,
            "gen_num": g.gen.num, "members": sorted(g.gen.members),
            "donors": sorted(g.gen.donors), "configured": sorted(g.gen.configured),
            "online": sorted(g.online_members()),
            "status": {str(n): g.status(n).lower() for n in sorted(self.configured)},
            "last_online_in": {str(n): g.last_online_in(n) for n in sorted(self.configured)},
            "lease_valid": self.lease.valid(now), "fresh": self.fresh_gen == g.gen.num,
            "suspects": sorted(self.fd.suspects(now)), "lease_lapses": self.lease_lapses, "loop_lag_ms": self.fd.lag_ms,
            "may_commit": g.may_commit(),
            "peer_gens": {str(n): s.gen for n, s in self.last_status.items()},
            "agreed": self.agreed(now),
        }

    def agreed(self, now_ms: int) -> bool:
        """Every other member is heard from and reports this generation."""
        g = self.gens
        sees = self.fd.sees(now_ms)
        return all(m in sees and m in self.last_status
                   and self.last_status[m].gen == g.gen.num
                   for m in g.gen.members - {self.id})

    def _log(self, level: str, event: str, **kw) -> None:
        if self.log is not None:
            getattr(self.log, level)(event, **kw)
