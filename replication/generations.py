"""Generations inside a replication node: the host of the consensus service.

``ReplicationNode`` composes this: it runs the ``ConsensusService`` on its
own links (``control.py``), carries out what the generation log decides,
and reads from the local PostgreSQL what the node reports in its Status.

What it does with the log's effects (consensus/gens.py):

- ``SwitchTo``: the commit cores move to the new generation (a transaction
  still collecting votes under the old one aborts with 40001; members of
  the new one refuse votes and precommits of older ones). Every member of
  the new generation writes its *marker* for it into its own WAL: a
  transactional logical message ``mtm_marker`` = the generation number,
  after the switch, so every transaction this node prepared under an
  earlier generation is before it in its stream (one prepared later is
  refused by the coordinator: ``Coordinator.start``).
- ``BecomeOnline``/``MayCommit``: the node takes part again.
- ``DecisionMade``: a reader pass finishes the gid here at once.
- ``Forgotten``: the gids' precommit records are deleted.

The reader (every heartbeat, and at once after a decision): lists this
node's prepared ``MTM-`` gids and the precommit records of the gids the
leader asks about, finishes every prepared gid the log has decided, and
keeps what the next Status reports:

- ``prepared_old``: prepared here, of an earlier generation, not held by a
  client (``:`` gids), not decided yet;
- ``answers``: 'p' if a precommit record is here; 'n' if the reading began
  after this node moved past the gid's generation and no precommit write of
  it was in flight then or since (none can start after the move: the
  participant refuses);
- ``online``: a RECOVERY member that applied every other member's marker
  of the current generation from that member's own stream, and the
  current generation holds every configured node (so every origin's
  transactions came through its own stream; a returning node whose
  generation lacks a configured node waits in RECOVERY);
- ``join``: a node outside the generation whose links to every member are
  up and whose streams from them are within ``join_lag_ms``.
"""
from __future__ import annotations

import asyncio
import time

import psycopg

from consensus import gens as g
from consensus.policy import NO_PRECOMMIT, PRECOMMIT_HELD, PolicyConfig
from consensus.service import ConsensusService, ServiceConfig

from . import commit as cp
from .control import ControlLinks
from .pgpool import PgUnavailable

MARKER_PREFIX = "mtm_marker"
PG_EPOCH_US = 946_684_800_000_000       # 2000-01-01 in Unix microseconds
READ_EVERY_S = 0.1


class Generations:
    def __init__(self, node, state_dir: str) -> None:
        self.node = node
        cfg = node.cfg
        t = cfg.timeouts
        pc = PolicyConfig.from_timeouts(t.heartbeat_interval_ms, t.heartbeat_timeout_ms,
                                        t.read_lease_ms)
        self.links = ControlLinks(node.id, {p.id: p.node_address for p in cfg.peers}, node.log)
        self.service = ConsensusService(
            node.id, [node.id, *node.peers], state_dir, self.links.send, self,
            ServiceConfig(tick_ms=max(10, t.heartbeat_interval_ms // 2), policy=pc),
            log=node.log.bind(subsystem="consensus"))
        self.links.deliver = self.service.receive
        self.log = node.log
        self.markers_written: set[int] = set()
        self.reached: dict[int, int] = {}           # peer -> highest marker applied from it
        self.writing: set[str] = set()              # precommit writes in flight
        self.written_since: set[str] = set()        # ... begun since the last reading began
        # the last reading: (generation when it began, prepared gids, asked gids,
        # their precommit states)
        self.read_gen = 0
        self.prepared: frozenset[str] = frozenset()
        self.asked: frozenset[str] = frozenset()
        self.states: dict[str, str] = {}
        self.finishing: set[str] = set()
        self.poke = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.service.start()
        self._sync_cores()
        for p in self.node.peers:
            self.node._spawn(f"consensus link to {p}", self.links.run, p)
        self.node._spawn("generation reader", self._reader)
        self.log.info("consensus_started", gen=self.gen.num, members=sorted(self.gen.members),
                      status=self.service.gens.status().lower(),
                      fresh=self.service.fresh_gen is not None)

    async def stop(self) -> None:
        await self.service.stop()
        for t in self.tasks:
            t.cancel()
        self.links.close()

    @property
    def gen(self) -> g.Gen:
        return self.service.gens.gen

    def serving(self) -> bool:
        return self.service.serving()

    def participating(self) -> bool:
        return self.service.participating()

    def pg_lost(self, lost: bool = True) -> None:
        self.service.pause(lost)
        self._sync_cores()

    def not_online_message(self) -> str:
        st = self.service.gens
        status = self.service.user_status()
        online = ", ".join(map(str, sorted(st.online_members()))) or "none"
        return (f'multimaster node {self.node.id} is not online: current status "{status}" '
                f"(generation {st.gen.num}; online nodes: {online})")

    def orphan(self, gid: str) -> None:
        """A gid of this node's current generation is prepared here and no
        core knows it (a session died between its PREPARE and the
        protocol): a new generation makes it one the log decides."""
        if cp.USER_GID_SEP not in gid and cp.parse_gid(gid)[1] == self.gen.num:
            self.log.warning("orphan_new_generation", gid=gid)
            self.service.mark_fresh()
            self._sync_cores()

    def _spawn(self, coro) -> None:
        t = asyncio.ensure_future(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    # -- the Host interface of the consensus service ------------------------------------------

    def effects(self, effects: list) -> None:
        for e in effects:
            cls = e.__class__
            if cls is g.SwitchTo:
                self._sync_cores()
                if e.gen.num not in self.markers_written and self.node.id in e.gen.members:
                    self.markers_written.add(e.gen.num)
                    self._spawn(self._write_marker(e.gen.num))
            elif cls is g.BecomeOnline or cls is g.MayCommit:
                self._sync_cores()
            elif cls is g.DecisionMade:
                self.poke.set()
            elif cls is g.Forgotten:
                self._spawn(self._forget(list(e.gids)))

    def _sync_cores(self) -> None:
        node = self.node
        gen = self.gen
        cgen = cp.Generation(gen.num, gen.members, gen.configured)
        if node.generation != cgen:
            node.generation = cgen
            node.part.generation_changed(cgen, online=self.participating())
            self._spawn(node.execute(node.coord.generation_changed(cgen, _now_ms())))
        node.part.online = self.participating()

    async def _write_marker(self, num: int) -> None:
        while True:
            try:
                await self.node._sql("SELECT pg_logical_emit_message(true, %s, %s)",
                                     (MARKER_PREFIX, str(num)))
                self.log.info("generation_marker_written", gen=num)
                return
            except (psycopg.Error, PgUnavailable) as e:
                self.log.warning("generation_marker_failed", gen=num, error=str(e).strip())
                await asyncio.sleep(0.2)

    async def _forget(self, gids: list[str]) -> None:
        try:
            await self.node._sql("DELETE FROM mtm.precommits WHERE gid = ANY(%s)", (gids,))
        except (psycopg.Error, PgUnavailable) as e:
            self.log.warning("precommits_trim_failed", error=str(e).strip())

    def marker_applied(self, peer: int, num: int) -> None:
        if num > self.reached.get(peer, 0):
            self.reached[peer] = num
            self.log.info("generation_marker_reached", peer=peer, gen=num)

    def precommit_writing(self, gid: str, on: bool) -> None:
        if on:
            self.writing.add(gid)
            self.written_since.add(gid)
        else:
            self.writing.discard(gid)

    def status_fields(self, num: int, resolving: tuple[str, ...]) -> dict:
        st = self.service.gens
        prepared_old = [x for x in self.prepared
                        if (g.gid_gen(x) or num) < num and ":" not in x
                        and st.decision(x) is None]
        answers = []
        for gid in resolving:
            if gid not in self.asked:
                continue
            if self.states.get(gid) == "p":
                answers.append((gid, PRECOMMIT_HELD))
            elif ((g.gid_gen(gid) or self.read_gen) < self.read_gen
                  and gid not in self.writing and gid not in self.written_since):
                answers.append((gid, NO_PRECOMMIT))
        out = {"prepared_old": prepared_old, "answers": answers}
        status = st.status()
        if status == g.RECOVERY:
            others = st.gen.configured - {self.node.id}
            out["online"] = (st.gen.members == st.gen.configured
                             and all(self.reached.get(p, 0) >= num for p in others))
        elif status == g.DEAD:
            out["join"] = self.join_lag_ms()
        self.service.catching_up = out.get("join") is not None
        return out

    def join_lag_ms(self) -> int | None:
        """How far behind the members' streams this node is, or None if a
        link to a member is down."""
        node = self.node
        now_us = time.time_ns() // 1000
        lag = 0
        for p in self.gen.members - {node.id}:
            if p not in node.connected_peers() or p not in self.links.out:
                return None
            if node.in_flight[p] or not node.inbox[p].empty():
                ts = node.applied_ts.get(p)
                if ts is None:
                    return None
                lag = max(lag, (now_us - (ts + PG_EPOCH_US)) // 1000)
        return max(0, lag)

    # -- reading the database -------------------------------------------------------------------

    async def _reader(self) -> None:
        node = self.node
        while True:
            try:
                await asyncio.wait_for(self.poke.wait(), READ_EVERY_S)
            except TimeoutError:
                pass
            self.poke.clear()
            await node.ready.wait()
            gen0 = self.gen.num
            self.written_since = set(self.writing)
            asked = tuple(self.service.resolving)
            try:
                rows = await (await node._query(
                    "SELECT p.gid, true, c.state FROM pg_prepared_xacts p "
                    "LEFT JOIN mtm.precommits c ON c.gid = p.gid "
                    "WHERE p.database = current_database() AND p.gid LIKE 'MTM-%%' "
                    "UNION ALL SELECT gid, false, state FROM mtm.precommits "
                    "WHERE gid = ANY(%s)", (list(asked),))).fetchall()
            except (psycopg.Error, PgUnavailable) as e:
                self.log.warning("generation_read_failed", error=str(e).strip())
                await asyncio.sleep(0.2)
                continue
            states = {}
            prepared = set()
            for gid, is_prepared, state in rows:
                if isinstance(state, bytes):
                    state = state.decode()
                if is_prepared:
                    prepared.add(gid)
                if state is not None:
                    states[gid] = state
            self.read_gen, self.prepared, self.asked = gen0, frozenset(prepared), frozenset(asked)
            self.states = states
            await self._finish_decided(prepared)

    async def _finish_decided(self, prepared) -> None:
        node = self.node
        st = self.service.gens
        for gid in sorted(prepared):
            commit = st.decision(gid)
            if commit is None or gid in self.finishing:
                continue
            self.finishing.add(gid)
            try:
                if node.coord.knows(gid):
                    await node.execute(node.coord.decided(gid, commit, _now_ms()))
                else:
                    await node._finish_prepared(gid, commit)
                    self.log.info("in_doubt_finished", gid=gid, commit=commit)
                    await node.execute(node.part.finished(gid, commit, prepared_here=True))
            except (psycopg.Error, PgUnavailable) as e:
                self.log.warning("in_doubt_finish_failed", gid=gid, error=str(e).strip())
            finally:
                self.finishing.discard(gid)

    def view(self) -> dict:
        v = self.service.view()
        v["markers_reached"] = {str(p): n for p, n in sorted(self.reached.items())}
        v["serving"] = self.serving()
        v["catchup_lag_ms"] = self.join_lag_ms() if self.service.gens.status() != g.ONLINE \
            else 0
        return v


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000
