"""Receiving one peer's stream: dispatching it to appliers, acknowledging it.

A ``Receiver`` owns what this node does with the slot stream one peer sends
it (replication/sender.py): ``[limits] apply_workers`` appliers plus a
finisher, each its own PostgreSQL connection, and the order in which the
stream's transactions may run side by side (``_dispatch``). It
acknowledges the stream (link frame 'A') only up to where everything before
is done, so a restarted stream resends whatever was in flight, and the
appliers recognise what they did already (replication/apply.py).

The stream's mode is announced by the sender ('S' frames):

- ``OWN`` (this node is ONLINE, or a member that reached its donor's
  marker): the peer's own transactions, and the COMMIT PREPARED of other
  origins' transactions as the peer committed them - not applied here
  (their origin's stream carries that), but as *read dependencies*: what
  the peer committed after one of them may have read it, so it is applied
  here only once that one is finished here too. (Without it a reader on
  the peer could see T, write elsewhere, and a third transaction here see
  that write but not T: a G-single cycle across nodes, which the fault
  harness's list-append checker found.) A prepared transaction is applied
  only if it belongs to this node's generation while this node is ONLINE in
  it (or has caught up to join it); one of a later generation waits for
  this node's log to get there; one of an earlier generation is answered
  from the database if it was applied here, else refused (mmts: "refusing
  transaction due to generation switch") - a member that moved on never
  votes for it, and a node ONLINE in a later generation already holds every
  earlier transaction that commits.
- ``ALL`` (this node catches up from this donor): every origin, applied in
  the donor's WAL order (the appliers' catch-up mode), without votes. A
  failure cannot be voted away - the transaction committed elsewhere - so
  the stream starts over from what was acknowledged. At the donor's
  marker of a generation this node joined, the sender switches to ``OWN``
  and the generation layer hears that the marker was reached.
  *Look-ahead*: a prepared transaction is held (up to ``HOLD_MAX_TXNS``
  transactions and ``HOLD_MAX_BYTES``) until its outcome shows up in the
  stream - usually a few transactions later - and is then applied as one
  plain commit at its COMMIT PREPARED (in commit order: what it depended
  on committed before it there, and later transactions that read it wait
  for it), or dropped at its ROLLBACK PREPARED; a PREPARE + COMMIT PREPARED
  pair is three times the round trips and two WAL flushes. What is still
  held when the stream pauses (``HOLD_IDLE_S``), fills the buffer, or
  reaches a plain commit (a marker), a schema message or a change of mode
  is applied as a PREPARE, as before: those are the transactions still in
  doubt, which must be prepared here.

Every failure restarts the appliers and the stream (from what was
acknowledged); a new link from the peer does too (``_NewLink``), and so does
``restart()``, which the node calls when it asks the peer for another mode.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque

import psycopg

from common import failpoints

from . import commit as cp
from . import link
from . import pgoutput as po
from .apply import (Applier, ApplyError, Finished, PrepareFailed, Prepared, Refused, Skipped,
                    worker_origin)
from .sender import MARKER_PREFIX, parse_marker

OWN, ALL = link.OWN, link.ALL
RECEIVE_QUEUE_FRAMES = 2000      # per peer; a full queue stops reading the link
# Per applier: messages handed to it and not yet applied. A full queue stops
# the dispatcher, which stops reading the inbox, which stops reading the link:
# a transaction of any size crosses the node in bounded memory.
WORKER_QUEUE_MESSAGES = 500
HOLD_POLL_S = 0.02
# catch-up look-ahead (module docstring)
HOLD_MAX_TXNS = 1000
HOLD_MAX_BYTES = 16 << 20
HOLD_IDLE_S = 0.05
ACK_EVERY_S = 0.005


class _NewLink(Exception):
    """The peer's link was re-established: restart its receiver."""


class _SetMode:
    """Queued to every worker where the stream's mode changes."""
    __slots__ = ("mode",)

    def __init__(self, mode: bytes) -> None:
        self.mode = mode


class _Held:
    """A prepared transaction of a catch-up stream, held until its outcome."""
    __slots__ = ("gid", "msgs", "after", "entry", "complete", "size")

    def __init__(self, msg, after: list, entry: list) -> None:
        self.gid = msg.gid
        self.msgs = [msg]
        self.after = after          # the commits before it in the stream
        self.entry = entry          # its acknowledgement entry (done once applied)
        self.complete = False       # its PREPARE was read
        self.size = 0


class _Worker:
    """An applier of ``_dispatch``, with its queue of (message, answer
    future, what to wait for first, option)."""
    __slots__ = ("k", "applier", "pid", "queue", "current", "lock_timeout")

    def __init__(self, k: int, applier: Applier, pid: int):
        self.k = k
        self.applier = applier
        self.pid = pid
        self.queue: asyncio.Queue = asyncio.Queue(WORKER_QUEUE_MESSAGES)
        self.current: asyncio.Future | None = None    # the answer of its transaction
        self.lock_timeout = applier.lock_timeout_ms   # as set on its connection


def _all_done(futs: list, loop) -> asyncio.Future | None:
    """A future done once all of ``futs`` are (None if they are already)."""
    pending = [f for f in futs if not f.done()]
    if not pending:
        return None
    out = loop.create_future()
    left = [len(pending)]

    def one(_):
        left[0] -= 1
        if left[0] == 0 and not out.done():
            out.set_result(None)
    for f in pending:
        f.add_done_callback(one)
    return out


async def _free_worker(workers: list) -> _Worker:
    while True:
        for w in workers:
            if w.current is None or w.current.done():
                return w
        await asyncio.wait([w.current for w in workers], return_when=asyncio.FIRST_COMPLETED)


_ROW_CHANGES = (po.Insert, po.Update, po.Delete, po.Truncate)


class Receiver:
    def __init__(self, node, peer: int) -> None:
        self.node = node
        self.peer = peer
        self.log = node.log
        self.inbox: asyncio.Queue = asyncio.Queue(RECEIVE_QUEUE_FRAMES)  # (epoch, kind, payload)
        # its stream items not yet done here (``_dispatch``'s order)
        self.in_flight: deque = deque()
        self.mode: bytes | None = None     # of the stream being applied
        self._stash: tuple | None = None   # the first frame of a new link
        self._attempt: asyncio.Task | None = None
        self.catching_up = False
        self.open_conns = 0                # appliers' connections not closed yet

    # -- control ------------------------------------------------------------------------------

    def restart(self) -> None:
        """Stop applying now (the node asked the peer for another mode):
        frames of the current link are dropped and the appliers closed; the
        next link starts afresh."""
        self.node.reset_link(self.peer)      # the peer starts a new session on a new link
        self._stash = None
        while not self.inbox.empty():
            self.inbox.get_nowait()
        if self._attempt is not None and not self._attempt.done():
            self._attempt.cancel()

    def busy(self) -> bool:
        return bool(self.in_flight) or not self.inbox.empty()

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Apply the peer's stream; any failure restarts the appliers and
        the stream (from what we acknowledged)."""
        node = self.node
        while True:
            conns: list = []
            attempt = self._attempt = asyncio.ensure_future(self._run_once(conns))
            try:
                await asyncio.wait([attempt])
            except asyncio.CancelledError:
                attempt.cancel()
                await asyncio.gather(attempt, return_exceptions=True)
                await self._close(conns)
                raise
            try:
                if attempt.cancelled():
                    self.log.info("receiver_restart", peer=self.peer, reason="mode change")
                elif attempt.exception() is not None:
                    e = attempt.exception()
                    errors = e.exceptions if isinstance(e, BaseExceptionGroup) else [e]
                    if all(isinstance(x, _NewLink) for x in errors):
                        self.log.info("receiver_restart", peer=self.peer, reason="new link")
                    elif all(isinstance(x, asyncio.CancelledError) for x in errors):
                        self.log.info("receiver_restart", peer=self.peer, reason="mode change")
                    else:
                        self.log.error("apply_failed", peer=self.peer,
                                       error="; ".join(map(str, errors)))
                        node.reset_link(self.peer)
                        await asyncio.sleep(0.5)
            finally:
                await self._close(conns)

    async def _close(self, conns: list) -> None:
        node = self.node
        for key in [k for k in node.applying if k[0] == self.peer]:
            del node.applying[key]
        self.in_flight.clear()
        self.mode = None
        self.catching_up = False
        for conn in conns:
            if not conn.closed:
                node.retired_pids.add(conn.info.backend_pid)
            await conn.close()
        self.open_conns = 0

    async def _run_once(self, conns: list) -> None:
        node = self.node
        await node.ready.wait()
        # Nothing is set up before the peer sends: a receiver whose peer
        # sends nothing (NONE) holds no connection and no replication origin.
        while self._stash is None:
            item = await self.inbox.get()
            if item[0] != node.link_epoch[self.peer]:
                continue
            if item[1] == b"S" and item[2] != node.wanted[self.peer]:
                # A session the peer began on an earlier request of ours
                # (requests and sessions cross on the two links): not
                # applied; ask again, on a new link.
                self.log.info("stream_refused", peer=self.peer, mode=_mode_name(item[2]),
                              wanted=_mode_name(node.wanted[self.peer]))
                node.reset_link(self.peer)
                node.send_to(self.peer, link.mode_request(node.wanted[self.peer],
                                                          node.wanted_gen[self.peer]))
                continue
            self._stash = item
        if self._stash[1] == b"S" and self._stash[2] == ALL:
            # Catching up applies every origin's transactions: no other
            # receiver may be applying any (an origin's own stream would
            # not know what the catch-up applied after it read its
            # positions, and could apply it again).
            while any(r.open_conns for r in node.receivers.values() if r is not self):
                await asyncio.sleep(0.02)
        # Closed appliers of any receiver may still hold a replication origin
        # this one's appliers take (catch-up applies every origin's
        # transactions under that origin's name), or still be finishing a
        # PREPARE whose position we are about to read.
        await node.wait_gone(sorted(node.retired_pids))
        node.retired_pids.clear()
        workers = []
        n = node.cfg.limits.apply_workers
        for k in range(n + 1):
            name = f"{node.app_prefix}apply from node {self.peer}" + (
                "" if k == 0 else " #finish" if k == n else f" #{k}")
            conn = await node.connect(application_name=name)
            conns.append(conn)
            self.open_conns = len(conns)
            applier = Applier(conn, self.peer, worker=k, log=self.log,
                              lock_timeout_ms=node.cfg.timeouts.apply_lock_timeout_ms)
            await applier.setup()
            workers.append(_Worker(k, applier, conn.info.backend_pid))
        # the replication origins catch-up may use, made once (creating one
        # inside an applied transaction could collide with another applier's)
        await ensure_origins(conns[0], origins_for(node.peers, n + 1))
        # Tell the peer how far its stream is known done here: its
        # sender need not forward any of that again (after a crash of
        # its server the slot may resend minutes of it).
        horizon = workers[0].applier.horizon_lsn
        if horizon:
            node.acked[self.peer] = max(node.acked.get(self.peer, 0), horizon)
            node.send_to(self.peer, link.applied(horizon))
        async with asyncio.TaskGroup() as tg:
            for w in workers:
                tg.create_task(self._work(w))
            tg.create_task(self._dispatch(workers[:-1], workers[-1]))

    async def _dispatch(self, workers: list, finisher: _Worker) -> None:
        """Hand the peer's transactions to the appliers, in parallel where
        they do not depend on each other.

        Transactions a peer prepared at the same time held their locks
        together there, so none of them saw the others' writes: they are
        independent, and each goes to a free worker. What a transaction can
        depend on is what was *committed* before it began - a COMMIT/ROLLBACK
        PREPARED or a plain commit earlier in the stream - so a PREPAREd
        transaction starts only after those are done here. COMMIT/ROLLBACK
        PREPARED go to the finisher, after their own PREPARE (in the normal
        case it is done already: the coordinator needed our vote); a
        ROLLBACK PREPARED of a transaction still being applied cancels that
        applier. A plain (non-prepared) commit waits for everything before
        it. The same rules hold for a donor's stream of every origin: it is
        the donor's WAL order, in which a transaction comes after what it
        depended on had committed there. The stream is acknowledged only up
        to where everything before is done."""
        node = self.node
        peer = self.peer
        inbox = self.inbox
        epoch0 = None
        last_end = 0            # highest transaction end seen on this link
        order = self.in_flight      # [end lsn or None, answer, ts] in stream order
        order.clear()
        prepares: dict[str, asyncio.Future] = {}    # gid -> answer, while being applied
        finishes: list[asyncio.Future] = []         # not yet done: later prepares wait
        target: _Worker | None = None       # receives the rest of the current transaction
        entry: list | None = None
        marker: dict | None = None          # the generation marker in the current transaction
        mode: bytes | None = None
        loop = asyncio.get_running_loop()
        held: dict[str, _Held] = {}         # catch-up look-ahead, in stream order
        reading: _Held | None = None        # ... the one whose messages are being read
        held_bytes = 0
        foreign = False                     # the current transaction came with an ORIGIN

        ack_due = [False]

        def send_ack() -> None:
            ack_due[0] = False
            if node.link_epoch[peer] == epoch0:
                node.send_to(peer, link.applied(node.acked[peer]))

        def acknowledge(_=None) -> None:
            last = None
            while order and order[0][0] is not None and order[0][1].done():
                last = order.popleft()
            if last is None:
                return
            node.acked[peer] = last[0]
            node.applied_ts[peer] = last[2]
            # one frame for the acknowledgements of ACK_EVERY_S (a frame per
            # transaction was a system call per transaction)
            if not ack_due[0]:
                ack_due[0] = True
                loop.call_later(ACK_EVERY_S, send_ack)

        def track(end, fut, ts=0) -> list:
            e = [end, fut, ts]
            order.append(e)
            fut.add_done_callback(acknowledge)
            return e

        async def flush() -> None:
            """Apply every held transaction as a PREPARE, in stream order
            (module docstring); one still being read continues as usual."""
            nonlocal held_bytes, target, entry, reading
            for h in list(held.values()):
                pending = [f for f in h.after if not f.done()]
                if pending:
                    await asyncio.wait(pending)
                w = await _free_worker(workers)
                w.current = fut = h.entry[1]
                prepares[h.gid] = fut
                fut.add_done_callback(lambda f, g=h.gid: prepares.pop(g, None))
                for m in h.msgs:
                    await w.queue.put((m, fut, None, None))
                del held[h.gid]
                if h is reading:
                    target, entry, reading = w, h.entry, None
            held_bytes = 0
        foreign = False                     # the current transaction came with an ORIGIN

        async def next_item():
            if not held:
                return await inbox.get()
            try:
                async with asyncio.timeout(HOLD_IDLE_S):
                    return await inbox.get()
            except TimeoutError:
                if reading is None:
                    await flush()
                return await inbox.get()

        def marker_done(f, m: dict, catching_up: bool) -> None:
            if f.cancelled() or f.exception() is not None:
                return
            if catching_up:
                node.gens.donor_marker_reached(peer, m["gen"])
            else:
                node.gens.marker_applied(peer, m["gen"])

        while True:
            stashed, self._stash = self._stash, None
            epoch, kind, payload = stashed if stashed is not None else await next_item()
            if epoch != node.link_epoch[peer]:
                continue            # from a link that was reset
            if epoch != epoch0:
                if epoch0 is not None:
                    # A new link: the peer resends from its slot's confirmed
                    # position, which may be far behind what we applied.
                    # Start over with fresh appliers that read the durable
                    # positions again (this frame is the new stream's first).
                    self._stash = (epoch, kind, payload)
                    raise _NewLink()
                epoch0 = epoch
            if kind == b"S":
                if reading is not None:
                    raise ApplyError(f"the stream from node {peer} changed its mode inside a "
                                     "transaction")
                await flush()
                if target is not None:
                    raise ApplyError(f"the stream from node {peer} changed its mode inside a "
                                     "transaction")
                if mode is not None and not (mode == ALL and payload == OWN):
                    raise ApplyError(f"the stream from node {peer} changed its mode from "
                                     f"{mode!r} to {payload!r}")
                if payload != mode:
                    for w in (*workers, finisher):
                        await w.queue.put((_SetMode(payload), None, None, None))
                mode = self.mode = payload
                self.catching_up = mode == ALL
                self.log.info("stream_applying", peer=peer, mode="all" if mode == ALL else "own")
                continue
            if mode is None:
                raise ApplyError(f"the stream from node {peer} did not announce its mode")
            lsn, raw = link.unpack_lsn(payload)
            msg = po.decode(raw)
            cls = msg.__class__
            if cls is po.BeginPrepare or cls is po.Begin:
                end = msg.end_lsn if cls is po.BeginPrepare else msg.final_lsn
                if end <= last_end:
                    # One link carries one walsender session, whose
                    # transactions end in increasing LSN order: a resend
                    # within a link would meet appliers with stale positions.
                    raise ApplyError(f"the stream from node {peer} went back from "
                                     f"{po.lsn_str(last_end)} to {po.lsn_str(end)} on one link")
                last_end = end
            if cls is po.Relation or cls is po.Type:
                if len(held) > (reading is not None):
                    # held rows were read with the description they had
                    await flush()
                for w in (*workers, finisher):
                    await w.queue.put((msg, None, None, None))
                continue
            if reading is not None:
                reading.msgs.append(msg)
                reading.size += len(raw)
                held_bytes += len(raw)
                if cls is po.Prepare:
                    reading.entry[0] = msg.end_lsn
                    reading.entry[2] = msg.prepare_ts
                    reading.complete = True
                    reading = None
                    if len(held) >= HOLD_MAX_TXNS or held_bytes >= HOLD_MAX_BYTES:
                        await flush()
                elif held_bytes >= HOLD_MAX_BYTES:
                    await flush()           # a big one: applied as it comes
                continue
            if target is not None:
                if cls is po.Message and msg.prefix == MARKER_PREFIX:
                    marker = parse_marker(msg.content)
                elif cls is po.Origin:
                    foreign = True          # another origin's: its markers are no cut here
                await target.queue.put((msg, target.current, None, None))
                if cls is po.Prepare or cls is po.Commit:
                    entry[0] = msg.end_lsn
                    entry[2] = msg.prepare_ts if cls is po.Prepare else msg.commit_ts
                    if marker is not None and not foreign:
                        # A plain commit starts once everything before it
                        # in the stream is done: when it is done, so is
                        # everything the peer wrote before its switch to
                        # that generation (a donor: every origin's).
                        catching_up = mode == ALL and marker["donor"] \
                            and node.id in marker["members"]
                        entry[1].add_done_callback(
                            lambda f, m=marker, c=catching_up: marker_done(f, m, c))
                        marker = None
                    target = entry = None
                    marker, foreign = None, False
                    acknowledge()
                continue
            if cls is po.BeginPrepare and mode == ALL:
                finishes = [f for f in finishes if not f.done()]
                reading = _Held(msg, list(finishes), track(None, loop.create_future()))
                held[msg.gid] = reading
                continue
            if cls is po.BeginPrepare:
                finishes = [f for f in finishes if not f.done()]
                if finishes:
                    await asyncio.wait(finishes)
                opt = None
                if mode == OWN:
                    opt = await self._generation_rule(msg.gid, epoch0)
                target = await _free_worker(workers)
                fut = target.current = loop.create_future()
                prepares[msg.gid] = fut
                fut.add_done_callback(lambda f, g=msg.gid: prepares.pop(g, None))
                entry = track(None, fut)
                await target.queue.put((msg, fut, None, opt))
            elif cls is po.Begin:
                await flush()
                pending = [f for f in (*finishes, *prepares.values()) if not f.done()]
                if pending:
                    await asyncio.wait(pending)
                target = finisher
                fut = target.current = loop.create_future()
                finishes.append(fut)
                entry = track(None, fut)
                await target.queue.put((msg, fut, None, None))
            elif mode == OWN and cls is po.CommitPrepared \
                    and (cp.parse_gid(msg.gid) or (peer,))[0] != peer:
                # a read dependency (module docstring): later transactions
                # of this stream wait until it is finished here too
                fut = loop.create_future()
                pending = node.unfinished.get(msg.gid)
                if pending is None or pending.done():
                    fut.set_result(None)
                else:
                    pending.add_done_callback(lambda _, f=fut: f.done() or f.set_result(None))
                finishes.append(fut)
                track(msg.end_lsn, fut, msg.commit_ts)
            elif cls is po.CommitPrepared and msg.gid in held:
                # known to commit: one plain commit, here in commit order
                h = held.pop(msg.gid)
                held_bytes -= h.size
                # the worker waits for the commits it followed, not the
                # dispatcher: later ones that did not can go on meanwhile
                w = await _free_worker(workers)
                w.current = fut = h.entry[1]
                await w.queue.put((h.msgs[0], fut, _all_done(h.after, loop), "plain"))
                for m in h.msgs[1:]:
                    await w.queue.put((m, fut, None, None))
                finishes.append(fut)
                done = loop.create_future()
                fut.add_done_callback(lambda f, d=done: d.done() or d.set_result(None))
                track(msg.end_lsn, done, msg.commit_ts)
            elif cls is po.RollbackPrepared and msg.gid in held:
                # rolled back: its rows are dropped; the finisher still rolls
                # back a copy prepared here before (or this node's own)
                h = held.pop(msg.gid)
                held_bytes -= h.size
                h.entry[1].set_result(Skipped(msg.gid))
                fut = loop.create_future()
                finishes.append(fut)
                track(msg.rollback_end_lsn, fut, msg.rollback_ts)
                await finisher.queue.put((msg, fut, None, None))
            elif cls is po.CommitPrepared or cls is po.RollbackPrepared:
                before = prepares.get(msg.gid)
                if before is not None and cls is po.RollbackPrepared:
                    await self._abandon(msg.gid)
                fut = loop.create_future()
                finishes.append(fut)
                track(msg.end_lsn if cls is po.CommitPrepared else msg.rollback_end_lsn, fut,
                      msg.commit_ts if cls is po.CommitPrepared else msg.rollback_ts)
                await finisher.queue.put((msg, fut, before, None))
            elif cls is po.Message and not msg.transactional:
                continue
            else:
                raise ApplyError(f"{cls.__name__} outside a transaction from node {peer}")

    async def _generation_rule(self, gid: str, epoch0: int) -> str | None:
        """OWN mode: may a prepared transaction of the peer be applied now
        (module docstring)? Waits while it belongs to a generation this node
        is not (yet) ONLINE in; returns "old" for an earlier generation's."""
        node = self.node
        parsed = cp.parse_gid(gid)
        if parsed is None:
            return None
        gt = parsed[1]
        held = False
        while True:
            g = node.generation.num
            if gt < g:
                return "old"
            if gt == g and node.gens.applying_own():
                if held:
                    self.log.info("apply_released", peer=self.peer, gid=gid, gen=g)
                return None
            if not held:
                held = True
                self.log.info("apply_held", peer=self.peer, gid=gid, gen=g, txn_gen=gt)
            if node.link_epoch[self.peer] != epoch0:
                raise _NewLink()
            await asyncio.sleep(HOLD_POLL_S)

    async def _work(self, w: _Worker) -> None:
        """One applier: applies what ``_dispatch`` queued for it, votes."""
        node = self.node
        key = (self.peer, w.k)
        while True:
            msg, fut, after, opt = await w.queue.get()
            if msg.__class__ is _SetMode:
                if msg.mode == ALL:
                    w.applier.catchup_for = node.id
                else:
                    w.applier.stop_catchup()
                continue
            if after is not None and not after.done():
                await asyncio.wait([after])   # COMMIT/ROLLBACK PREPARED after its PREPARE
            catching_up = w.applier.catchup_for is not None
            if msg.__class__ is po.BeginPrepare:
                # Catching up, a transaction waits for its locks as long as
                # it takes: what holds them is a prepared transaction whose
                # outcome comes later in this stream or from the log.
                want = 0 if catching_up else node.cfg.timeouts.apply_lock_timeout_ms
                if w.lock_timeout != want:
                    await w.applier.conn.execute(f"SET lock_timeout = {int(want)}")
                    w.lock_timeout = want
                if opt == "old":
                    w.applier.refuse_unknown()
                elif opt == "plain":
                    w.applier.commit_plain()
                if not catching_up:
                    node.applying[key] = (w.pid, msg.gid, time.monotonic())
            elif msg.__class__ in _ROW_CHANGES and not w.applier.idle:
                failpoints.hit("apply_mid_transaction", self.log, peer=self.peer)
            r = await w.applier.apply(msg)
            if w.applier.idle:
                node.applying.pop(key, None)
            if r is not None:
                await self._applied(msg, r, catching_up)
                if fut is not None and not fut.done():
                    fut.set_result(r)

    async def _abandon(self, gid: str) -> None:
        """``gid`` is being rolled back by its coordinator while one of our
        appliers still applies it (it may be waiting for a lock): cancel
        that applier's statement rather than finish applying it."""
        node = self.node
        for (p, _), (pid, g, _) in list(node.applying.items()):
            if p == self.peer and g == gid:
                await node.cancel_backend(pid)

    async def _applied(self, msg, r, catching_up: bool) -> None:
        node = self.node
        peer = self.peer
        self.log.debug("applied", peer=peer, result=type(r).__name__, gid=getattr(r, "gid", None),
                       catchup=catching_up)
        if isinstance(r, Prepared):
            node.prepared_here(r.gid)
        elif isinstance(r, Finished) and r.gid is not None:
            node.finished_here(r.gid)
        if catching_up:
            if isinstance(r, PrepareFailed):
                # Committed or not elsewhere, it was applied on the donor:
                # it must apply here too, and nothing after it before it.
                raise ApplyError(f"could not apply {r.gid} while catching up from node {peer} "
                                 f"({r.sqlstate}: {r.message}); starting the stream over")
            return
        if isinstance(r, Prepared):
            failpoints.hit("member_before_vote", self.log, gid=r.gid)
            await node.execute(node.part.applied(r.gid, True))
        elif isinstance(r, Refused):
            owner = cp.parse_gid(r.gid)[0]
            self.log.info("apply_refused", peer=peer, gid=r.gid, gen=node.generation.num)
            node.send_to(owner, link.protocol(cp.Vote(
                r.gid, node.id, False, cp.SERIALIZATION_FAILURE,
                f"refusing transaction {r.gid} due to generation switch: node {node.id} is in "
                f"generation {node.generation.num}")))
        elif isinstance(r, Skipped):
            pass
        elif isinstance(r, PrepareFailed):
            by_gid = node.cancelled.pop(r.gid, None)
            if r.sqlstate == "57014":
                # We cancel appliers for wound-wait (or a DBA did): the
                # transaction may well succeed if retried.
                r = PrepareFailed(r.gid, cp.SERIALIZATION_FAILURE,
                                  f"conflicts with the older transaction {by_gid}"
                                  if by_gid else "its apply was cancelled")
            self.log.info("apply_vote_failed", peer=peer, gid=r.gid, sqlstate=r.sqlstate,
                          message=r.message)
            # Applied only in its generation while this node is a member
            # of it (``_generation_rule``): it cannot commit without our
            # vote, so a failure is a "no".
            await node.execute(node.part.applied(r.gid, False, r.sqlstate, r.message))
        elif isinstance(r, Finished) and r.gid is not None:
            await node.execute(node.part.finished(r.gid, r.committed, r.here))


def _mode_name(mode: bytes) -> str:
    return {link.OWN: "own", link.ALL: "all", link.NONE: "none"}.get(mode, repr(mode))


def origins_for(nodes, workers: int) -> list[str]:
    """Every replication origin the appliers may use for ``nodes``' transactions."""
    return [worker_origin(n, k) for n in nodes for k in range(workers)]


async def ensure_origins(conn: psycopg.AsyncConnection, names: list[str]) -> None:
    await conn.execute(
        "SELECT pg_replication_origin_create(n) FROM unnest(%s::text[]) n "
        "WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = n)", (names,))

