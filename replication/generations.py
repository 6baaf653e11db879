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
- ``online``: a RECOVERY member that applied its donor's marker of the
  current generation from the donor's stream of every origin (so it holds
  everything committed before the generation: GENERATIONS.md section 6,
  "Recovery handoff");
- ``join``: a node outside the generation that catches up from a donor
  and is within ``join_lag_ms`` of it.

Which stream to ask each peer for (``plan_streams``, every reading and
after every effect): a node ONLINE in its generation, or a member that
reached its donor's marker, takes each peer's own transactions (OWN); any
other node takes every origin from one donor (ALL) - an ONLINE member of
the generation it is connected to, one of the generation's donors when it
is a member - and nothing from the others: applying several origins'
streams side by side lets a transaction overtake one it depends on.
"""
from __future__ import annotations

import asyncio
import json
import time

import psycopg

from consensus import gens as g
from consensus.policy import NO_PRECOMMIT, PRECOMMIT_HELD, PolicyConfig
from consensus.service import ConsensusService, ServiceConfig

from . import commit as cp
from . import link
from .control import ControlLinks
from .pgpool import PgUnavailable
from .sender import MARKER_PREFIX

PG_EPOCH_US = 946_684_800_000_000       # 2000-01-01 in Unix microseconds
READ_EVERY_S = 0.1


def plan_streams(self_id: int, peers, *, status: str, reached: bool, members, online,
                 donors, connected, donor: int | None) -> tuple[dict[int, bytes], int | None]:
    """The mode to ask each peer for, and the donor (module docstring).
    ``status``: this node's in the generation (gens ONLINE, RECOVERY,
    DEAD); ``reached``: a RECOVERY member that applied its donor's marker
    of the generation; ``online``: the members ONLINE in it; ``donors``:
    the generation's; ``connected``: peers linked both ways; ``donor``: the
    current one, kept while it qualifies."""
    if status == g.ONLINE or (status == g.RECOVERY and reached):
        return {p: link.OWN for p in peers}, None
    cands = [p for p in sorted(online) if p != self_id and p in connected and p in members]
    if status == g.RECOVERY:
        # only a donor's marker is a cut of everything committed before
        cands = [p for p in cands if p in donors]
    if donor not in cands:
        preferred = [p for p in cands if p in donors]
        donor = (preferred or cands or [None])[0]
    return {p: link.ALL if p == donor else link.NONE for p in peers}, donor


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
        # generations whose donor marker this node applied from the donor's
        # stream of every origin, as a member of them (it may go ONLINE)
        self.reached_markers: set[int] = set()
        self.donor: int | None = None               # the node we catch up from
        self.lost: dict[int, str] = {}              # peer -> why our slot there is gone
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
        # The current generation's marker, again: a restart may have come
        # between the switch and its marker. A second copy later in the WAL
        # is still a cut (everything the first had before it, it has too).
        self._marker(self.gen)
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
        status = self.user_status()
        online = ", ".join(map(str, sorted(st.online_members()))) or "none"
        msg = (f'multimaster node {self.node.id} is not online: current status "{status}" '
               f"(generation {st.gen.num}; online nodes: {online})")
        if self.lost and st.status() != g.ONLINE:
            peer, why = sorted(self.lost.items())[0]
            msg += (f"; it cannot rejoin: {why}; copy it again from a donor (a new base "
                    f"backup of an ONLINE node, then mmproxy init-cluster) to bring it back")
        return msg

    def user_status(self) -> str:
        if self.lost and self.service.gens.status() != g.ONLINE:
            return "disabled"
        return self.service.user_status()

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
                # Only a switch happening now gets a marker: one written
                # again for an earlier generation (the log replayed at a
                # restart) would sit after later transactions, and a
                # donor's stream switches to OWN at it (sender.py).
                if self.service.started:
                    self._marker(e.gen)
                self._log_moved()
            elif cls is g.BecomeOnline or cls is g.MayCommit:
                self._sync_cores()
                self._log_moved()
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

    def _marker(self, gen: g.Gen) -> None:
        if gen.num not in self.markers_written and self.node.id in gen.members:
            self.markers_written.add(gen.num)
            self._spawn(self._write_marker(gen.num, sorted(gen.members),
                                           self.node.id in gen.donors))

    def _log_moved(self) -> None:
        """The log moved: what the streams should be, and what the senders
        may confirm, may have changed."""
        if self.service.started:
            self.plan()
        for snd in self.node.senders.values():
            snd.recheck()

    async def _write_marker(self, num: int, members: list[int], donor: bool) -> None:
        """This node's marker of generation ``num`` in its WAL: where its
        transactions of earlier generations end, and - if it was a donor
        of ``num`` (ONLINE when it switched) - a cut holding everything
        committed before ``num`` that a joining member copies up to."""
        content = json.dumps({"gen": num, "members": members, "donor": donor},
                             separators=(",", ":"))
        while True:
            try:
                await self.node._sql("SELECT pg_logical_emit_message(true, %s, %s)",
                                     (MARKER_PREFIX, content))
                self.log.info("generation_marker_written", gen=num, donor=donor)
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
            self.log.debug("generation_marker_applied", peer=peer, gen=num)

    def donor_marker_reached(self, peer: int, num: int) -> None:
        """We applied ``peer``'s marker of generation ``num``, written while
        it was a donor of it and naming us a member, from its stream of
        every origin: we hold everything committed before ``num``."""
        self.marker_applied(peer, num)
        if num not in self.reached_markers:
            self.reached_markers.add(num)
            if len(self.reached_markers) > 64:
                self.reached_markers = set(sorted(self.reached_markers)[-32:])
            self.log.info("donor_marker_reached", donor=peer, gen=num)
            self.plan()

    def applying_own(self) -> bool:
        """May a peer's own transactions of our generation be applied (and
        voted on): we are ONLINE in it, or a member that reached its
        donor's marker."""
        st = self.service.gens
        status = st.status()
        return status == g.ONLINE or (status == g.RECOVERY and st.gen.num in self.reached_markers)

    def last_online_in(self, node: int) -> int:
        return self.service.gens.last_online_in(node)

    def slot_lost(self, peer: int, text: str) -> None:
        """``peer`` no longer holds the WAL we need from it: we can never
        get all of its transactions again, so we stay out of the cluster
        (never a silent divergence) until copied again."""
        if peer not in self.lost:
            self.log.error("cannot_catch_up", peer=peer, reason=text,
                           remedy="this node must be copied again from a donor (a new "
                                  "base backup, then mmproxy init-cluster) to rejoin")
        self.lost[peer] = text
        self.plan()

    def slot_usable(self, peer: int) -> None:
        if self.lost.pop(peer, None) is not None:
            self.log.info("catch_up_possible_again", peer=peer)

    def plan(self) -> None:
        """Ask each peer for the stream this node needs now (module docstring)."""
        node = self.node
        st = self.service.gens
        gen = st.gen
        # heard from over the consensus links: the data links are restarted
        # by every change of mode, and must not make the choice flap
        connected = set(self.service.fd.sees(_now_ms())) - set(self.lost)
        modes, donor = plan_streams(
            node.id, sorted(node.peers), status=st.status(),
            reached=gen.num in self.reached_markers, members=gen.members,
            online=st.online_members(), donors=gen.donors, connected=connected,
            donor=self.donor)
        if self.lost and st.status() != g.ONLINE:
            # a node that cannot get every peer's WAL again stays out
            modes, donor = {p: link.NONE for p in node.peers}, None
        if donor != self.donor:
            self.log.info("catchup_donor", donor=donor, gen=gen.num,
                          status=st.status().lower())
            self.donor = donor
        # the generation we join: the current one as a RECOVERY member,
        # else the next (a donor's marker of an earlier one is no cut for us)
        join_gen = gen.num if st.status() == g.RECOVERY else gen.num + 1
        for p, mode in modes.items():
            old = node.wanted[p]
            jg = join_gen if mode == link.ALL else 0
            if mode == old and jg == node.wanted_gen[p]:
                continue
            # a donor's stream turns to OWN by itself at its marker; a new
            # generation to join changes nothing already applied
            keep = (old == link.ALL and mode == link.OWN and node.receivers[p].mode == link.OWN) \
                or mode == old
            node.request_mode(p, mode, jg, restart=not keep)

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
            out["online"] = num in self.reached_markers and not self.lost
        elif status == g.DEAD and not self.lost:
            out["join"] = self.join_lag_ms()
        self.service.catching_up = out.get("join") is not None
        # precommit records below the lowest generation every node has
        # settled may go (``settled_gen``)
        out["settled"] = self.settled_gen(num, status)
        out["disabled"] = bool(self.lost)
        return out

    def settled_gen(self, num: int, status: str) -> int:
        """0 unless ONLINE; else the lowest generation of a gid still
        prepared here (or ``num``). An ONLINE node never again holds an
        earlier generation's gid prepared: its own streams refuse them,
        and a catch-up recognises what it committed (replication/apply.py)."""
        if status != g.ONLINE:
            return 0
        gens = [gg for gg in (g.gid_gen(x) for x in self.prepared) if gg is not None]
        return min([num, *gens])

    def join_lag_ms(self) -> int | None:
        """How far behind its donor this node is, or None if it is not
        catching up from one."""
        node = self.node
        d = self.donor
        if d is None or d in self.lost:
            return None
        r = node.receivers[d]
        if not r.catching_up or d not in node.connected_peers() or d not in self.links.out:
            return None
        if not r.busy():
            return 0
        ts = node.applied_ts.get(d)
        if ts is None:
            return None
        return max(0, (time.time_ns() // 1000 - (ts + PG_EPOCH_US)) // 1000)

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
            self.plan()
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
        v["user_status"] = self.user_status()
        node = self.node
        v["markers_reached"] = {str(p): n for p, n in sorted(self.reached.items())}
        v["catchup_donor"] = self.donor
        v["streams"] = {str(p): {"wanted": _MODE_NAMES[node.wanted[p]],
                                 "applying": _MODE_NAMES.get(node.receivers[p].mode, "none"),
                                 "sending": _MODE_NAMES[node.senders[p].mode]}
                        for p in sorted(node.peers)}
        v["slot_lost"] = {str(p): t for p, t in sorted(self.lost.items())}
        v["serving"] = self.serving()
        v["catchup_lag_ms"] = self.join_lag_ms() if self.service.gens.status() != g.ONLINE \
            else 0
        return v


_MODE_NAMES = {link.OWN: "own", link.ALL: "all", link.NONE: "none", None: "none"}


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000
