"""Sending this node's WAL to one peer: its slot, streamed and filtered by mode.

Each node keeps one logical slot per peer (``mtm_slot_<peer>``). The peer
chooses what it wants from it with a mode request (link.py, 'M'):

- ``OWN``: the transactions made on this node, and the COMMIT/ROLLBACK
  PREPARED of the gids it coordinates - what an ONLINE member needs from
  each other node (it gets every other origin from that origin) - plus the
  COMMIT PREPARED of other origins' gids as read dependencies (the peer
  applies nothing for them: receiver.py).
- ``ALL`` (this node is the peer's *donor*): every transaction in this
  node's WAL, whatever its origin, in WAL order, with the ORIGIN message
  that names the true origin, and every COMMIT/ROLLBACK PREPARED - what a
  node that is not ONLINE copies to catch up (GENERATIONS.md section 6,
  "Recovery handoff"; mmts's recovery mode). Skipped: the peer's own
  transactions, and other nodes' generation markers. (Other origins'
  plain transactions are either those markers or prepared transactions a
  catch-up here committed plainly, which carry their gid in an
  ``mtm_plain`` message first: forwarded.)
  At this node's marker of the generation the peer joins (the request
  names it: any later one naming the peer will do), written while this
  node was a donor of it, the session switches to ``OWN`` (an 'S' frame
  after the marker): everything committed in earlier generations is before
  the marker, and the generation's own transactions reach the peer from
  their origins, since it votes on them. An older marker naming the peer
  (of a generation it was ONLINE in before it left) is no such cut for it
  now.
- ``NONE``: no session.

A new mode starts a new walsender session and a new link (the peer's
receiver starts over on a new link: replication/receiver.py).

**What the slot is confirmed to** (``Coverage``). PostgreSQL keeps the WAL
from the slot's confirmed position, and a new session resends from there,
so the slot may pass a transaction only once the peer can never need it
again from this node:

- one sent: once the peer acknowledged it (it acknowledges in stream order
  only what is done);
- one of this node's that was not sent: the peer reported it done already,
  or it was empty;
- another origin's, skipped in ``OWN`` mode: once the generation log says
  the peer was ONLINE in a generation at least the transaction's (an
  ONLINE node holds every transaction of its and earlier generations that
  commits: it voted on those of its generation, and caught up from a donor
  holding the rest). Until then this node may be the donor the peer
  catches up from, and that catch-up must start before the transaction;
- other origins' COMMIT/ROLLBACK PREPARED, their markers, the peer's own:
  never needed (the origin's own slot keeps the outcome until the peer
  applied it, and the log decides what is in doubt); another origin's
  transaction committed plainly by a catch-up here counts as its gid's
  generation (the ``mtm_plain`` message), or - without one - this node's
  generation when it was read.

Runs of such transactions are merged, so the queue holds about two entries
per transaction in flight. With nothing pending and no transaction open, a
keepalive's position is confirmed too (the walsender decoded everything
before it): a peer that is up to date never holds WAL back, however much
WAL other work writes - else ``max_slot_wal_keep_size`` would cut off a
live peer.
"""
from __future__ import annotations

import asyncio
import json
import struct
from collections import deque

import psycopg

from . import commit as cp
from . import link
from . import pgoutput as po
from .apply import PLAIN_PREFIX, origin_node
from .cluster import PUBLICATION, slot_name
from .stream import SlotStream, StreamError

OWN, ALL, NONE = link.OWN, link.ALL, link.NONE
MARKER_PREFIX = "mtm_marker"
# (PLAIN_PREFIX: a catch-up applies a prepared transaction it knows
# committed as one plain commit - receiver.py, look-ahead - with this
# message first, naming the gid: so this node, as a donor later, forwards it
# and says which one it is.)
# pgoutput messages inside a transaction, told apart by their first byte
_ROW_KINDS = frozenset(b"IUDTM")
_TRUNCATE, _MESSAGE = ord("T"), ord("M")
_RELID = struct.Struct("!I")
DRAIN_ABOVE_BYTES = 1 << 20
# Frames are gathered and written together when the walsender has nothing
# more buffered, or past this size: a write per message was a system call
# per message (a catch-up's donor spent most of its time there).
FLUSH_ABOVE_BYTES = 256 << 10
SLOT_CHECK_EVERY_S = 2.0
# the walsender's error when max_slot_wal_keep_size removed what a slot needs
_LOST_SLOT_TEXTS = ("can no longer get changes from replication slot",
                    "This slot has been invalidated")


class Coverage:
    """The prefix of one session's stream the peer no longer needs (module
    docstring). Entries ``[end, need]`` in stream order: ``need`` None -
    sent, wait for the peer's acknowledgement; an int g - covered once the
    peer was ONLINE in a generation >= g (0: covered now)."""

    __slots__ = ("q", "confirmable")

    def __init__(self) -> None:
        self.q: deque = deque()
        self.confirmable = 0

    def add(self, end: int, need: int | None) -> None:
        q = self.q
        if need == 0 and not q:
            self.confirmable = max(self.confirmable, end)
        elif need is not None and q and q[-1][1] is not None:
            last = q[-1]
            last[0] = end
            last[1] = max(last[1], need)
        else:
            q.append([end, need])

    def advance(self, acked: int, covered) -> int:
        """The position the slot may be confirmed to, given the peer's
        highest acknowledgement and ``covered(g)``."""
        q = self.q
        while q:
            end, need = q[0]
            if need is None:
                if end > acked:
                    break
            elif need and not covered(need):
                break
            self.confirmable = max(self.confirmable, end)
            q.popleft()
        return self.confirmable


class _Txn:
    """The transaction being read from the slot."""
    __slots__ = ("prepared", "end", "gid", "held", "skip", "own", "origin", "need", "data",
                 "marker")

    def __init__(self, prepared: bool, end: int, gid: str | None, first: bytes) -> None:
        self.prepared = prepared
        self.end = end
        self.gid = gid
        self.held = [first]         # frames not sent yet (BEGIN, ORIGIN)
        self.skip = False
        self.own = True             # no ORIGIN message (yet): made on this node
        self.origin: int | None = None
        self.need = 0               # what covers it if it is skipped
        self.data = False           # something besides the framing was sent
        self.marker: dict | None = None


def parse_marker(content: bytes | str) -> dict | None:
    """A generation marker's content: {"gen", "members", "donor"}; None if
    it is not one (an older marker held only the number)."""
    try:
        d = json.loads(content)
    except (ValueError, TypeError):
        return None
    if isinstance(d, int):
        return {"gen": d, "members": [], "donor": False}
    if not isinstance(d, dict) or type(d.get("gen")) is not int:
        return None
    return {"gen": d["gen"], "members": [int(m) for m in d.get("members", ())],
            "donor": bool(d.get("donor"))}


class Sender:
    """One peer's sender: waits for the peer's mode request and the link,
    then streams the peer's slot in that mode until the link, the mode or
    the stream changes."""

    def __init__(self, node, peer: int) -> None:
        self.node = node
        self.peer = peer
        self.log = node.log
        self.requested = NONE          # the peer's last mode request
        self.join_gen = 0              # ... and the generation it joins
        self.mode = NONE               # the mode the current session sends in
        self.poke = asyncio.Event()    # a new request, or the link changed
        self.stream: SlotStream | None = None
        self.coverage = Coverage()
        self.lost: str | None = None   # the slot was invalidated: why
        self._checked = -1e9
        self._open = False             # a transaction is being read from the slot

    # -- inputs from the node -------------------------------------------------------------------

    def request(self, mode: bytes, join_gen: int = 0) -> None:
        if mode != self.requested or join_gen != self.join_gen:
            self.log.info("stream_mode_requested", peer=self.peer, mode=_name(mode),
                          join_gen=join_gen)
        self.requested = mode
        self.join_gen = join_gen
        self.poke.set()

    def link_changed(self) -> None:
        self.poke.set()

    def acked(self) -> None:
        """The peer acknowledged more: confirm what is covered now."""
        self._confirm()

    def recheck(self) -> None:
        """The generation log moved (the peer may be ONLINE in a later
        generation now): foreign transactions it needed may be covered."""
        if self.coverage.q:
            self._confirm()

    def _keepalive(self, lsn: int) -> None:
        if not self._open and not self.coverage.q and lsn > self.coverage.confirmable:
            self.coverage.confirmable = lsn
            self._confirm()

    def _covered(self, gen: int) -> bool:
        return self.node.gens.last_online_in(self.peer) >= gen

    def _confirm(self) -> None:
        if self.stream is not None:
            self.stream.confirm(self.coverage.advance(self.node.peer_done.get(self.peer, 0),
                                                      self._covered))

    # -- the session loop -----------------------------------------------------------------------

    async def _check_slot(self, writer) -> None:
        """Tell the peer if the WAL it needs from us is gone, even while it
        asks nothing of this node (it must not rejoin: this node's own
        transactions would never reach it)."""
        now = asyncio.get_running_loop().time()
        if now - self._checked < SLOT_CHECK_EVERY_S:
            return
        self._checked = now
        try:
            row = await self.node._fetchone(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
                (slot_name(self.peer),))
        except Exception as e:      # the database: the next round asks again
            self.log.debug("slot_check_failed", peer=self.peer, error=str(e))
            return
        if row is not None and row[0] == "lost":
            self._slot_lost(writer, "the slot's wal_status is 'lost'")
        elif self.lost is not None:
            self.lost = None            # made again (the peer was copied again)
            self.log.info("slot_usable_again", peer=self.peer)

    async def run(self) -> None:
        node = self.node
        while True:
            self.poke.clear()
            writer = node.out.get(self.peer)
            if writer is not None and not writer.is_closing() and node.ready.is_set():
                await self._check_slot(writer)
            if writer is None or writer.is_closing() or self.requested not in (OWN, ALL) \
                    or not node.ready.is_set() or self.lost is not None:
                # (not node.ready.wait() while it is set: that returns at
                # once, and this loop spun on a core)
                waits = [asyncio.ensure_future(self.poke.wait())]
                if not node.ready.is_set():
                    waits.append(asyncio.ensure_future(node.ready.wait()))
                try:
                    await asyncio.wait(waits, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
                continue
            mode = self.requested
            session = asyncio.ensure_future(self._session(writer, mode))
            try:
                while not session.done():
                    poke = asyncio.ensure_future(self.poke.wait())
                    try:
                        await asyncio.wait([session, poke], return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        poke.cancel()
                    self.poke.clear()
                    if session.done():
                        break
                    if node.out.get(self.peer) is not writer or writer.is_closing() \
                            or self.requested != self.mode:
                        session.cancel()
                        await asyncio.gather(session, return_exceptions=True)
                        break
                if session.done() and not session.cancelled() and session.exception():
                    raise session.exception()
            except (StreamError, psycopg.Error, OSError) as e:
                self.log.warning("sender_restart", peer=self.peer, error=str(e))
            finally:
                if not session.done():
                    session.cancel()
                    await asyncio.gather(session, return_exceptions=True)
                # One walsender session per link: a new session resends from
                # the slot's confirmed position, and the peer's receiver must
                # start over to read its positions again. End the link (it is
                # re-established at once, a new epoch over there).
                if node.out.get(self.peer) is writer and not writer.is_closing():
                    writer.transport.abort()
            await asyncio.sleep(0.2)

    async def _session(self, writer, mode: bytes) -> None:
        node = self.node
        stream = SlotStream(node.conninfo + (f" password={node.password}" if node.password
                                             else ""), slot_name(self.peer), PUBLICATION,
                            application_name=f"{node.app_prefix}send to node {self.peer}")
        self.coverage = Coverage()
        self.mode = mode
        try:
            try:
                await stream.start()
            except StreamError as e:
                if any(t in str(e) for t in _LOST_SLOT_TEXTS):
                    self._slot_lost(writer, str(e))
                raise
            self.stream = stream
            self._open = False
            stream.on_keepalive = self._keepalive
            self.log.info("stream_session", peer=self.peer, mode=_name(mode))
            _write(writer, link.stream_mode(mode))
            await self._forward(stream, writer)
        finally:
            self.stream = None
            self.mode = NONE
            await stream.close()

    def _slot_lost(self, writer, error: str) -> None:
        text = (f"the WAL node {self.peer} needs from node {self.node.id} was removed: its "
                f"replication slot {slot_name(self.peer)} there fell more than "
                f"max_slot_wal_keep_size ([limits] absent_node_wal_limit_mb = "
                f"{self.node.cfg.limits.absent_node_wal_limit_mb}) behind ({error})")
        if self.lost is None:
            self.log.error("slot_lost", peer=self.peer, slot=slot_name(self.peer), error=error,
                           remedy=f"node {self.peer} cannot catch up any more: copy it again "
                                  "from a donor (re-clone) to bring it back")
        self.lost = text
        try:
            _write(writer, link.slot_lost(text))
        except StreamError:
            pass

    async def _forward(self, stream: SlotStream, link_writer) -> None:
        """Forward the slot's transactions in ``self.mode`` (module docstring).

        Most of a slot's traffic can be transactions applied from other
        nodes (after a peer's bulk load, millions of rows), which OWN mode
        skips: a message is looked at by its first byte, and only the
        transaction framing, schema messages and the relation id of a row
        change are decoded."""
        node = self.node
        peer = self.peer
        own_id = node.id
        mtm_rels: set[int] = set()     # tables whose changes are never shipped
        peer_done = node.peer_done
        cov = self.coverage
        t: _Txn | None = None

        out: list[bytes] = []
        size = [0]

        def flush() -> None:
            # Checked before every write: the link may have closed during
            # any await (uvloop refuses writes to a closed transport).
            if not out:
                return
            if node.out.get(peer) is not link_writer:
                raise StreamError("link to peer is down or changed")
            data = b"".join(out)
            out.clear()
            size[0] = 0
            _write(link_writer, data)

        def write(data: bytes) -> None:
            out.append(data)
            size[0] += len(data)
            if size[0] >= FLUSH_ABOVE_BYTES:
                flush()

        def idle() -> None:
            try:
                flush()
            except StreamError:
                pass            # the next write finds the link gone

        stream.on_idle = idle

        async for lsn, payload in stream.raw_messages():
            kind = payload[0]
            if kind in _ROW_KINDS:
                if t is None:
                    continue
                if t.skip:
                    if t.need is None and kind == _MESSAGE:
                        # another origin's plain transaction skipped in OWN
                        # mode: its generation, if a catch-up named its gid
                        m = po.decode(payload)
                        parsed = cp.parse_gid(m.content.decode(errors="replace")) \
                            if m.prefix == PLAIN_PREFIX else None
                        t.need = parsed[1] if parsed is not None else (
                            0 if m.prefix == MARKER_PREFIX else node.generation.num)
                    continue
                if kind != _TRUNCATE and kind != _MESSAGE:
                    if _RELID.unpack_from(payload, 1)[0] in mtm_rels:
                        continue
                elif kind == _TRUNCATE and mtm_rels.intersection(po.decode(payload).relids):
                    continue
                elif kind == _MESSAGE and (t.own or not t.data):
                    m = po.decode(payload)
                    if m.prefix == MARKER_PREFIX:
                        if not t.own:       # another origin's marker: nothing to forward
                            t.skip, t.held = True, []
                            continue
                        t.marker = parse_marker(m.content)
                for f in t.held:
                    write(f)
                t.held = []
                t.data = True
                write(link.replication(lsn, payload))
                if link_writer.transport.get_write_buffer_size() > DRAIN_ABOVE_BYTES:
                    flush()
                    await link_writer.drain()
                continue
            msg = po.decode(payload)
            cls = msg.__class__
            if cls is po.Begin or cls is po.BeginPrepare:
                prepared = cls is po.BeginPrepare
                end = msg.end_lsn if prepared else msg.final_lsn
                t = _Txn(prepared, end, msg.gid if prepared else None,
                         link.replication(lsn, payload))
                self._open = True
                # what the peer reported done already (a replay) is not sent
                t.skip = end <= peer_done.get(peer, 0)
                continue
            if cls is po.Origin:
                if t is None:
                    continue
                t.own = False
                t.origin = origin_node(msg.name)
                owner = cp.parse_gid(t.gid)[0] if t.prepared and cp.parse_gid(t.gid) else None
                if self.mode == ALL and t.origin != peer and owner != peer:
                    t.skip = False                  # every origin goes to a catching-up peer
                    t.held.append(link.replication(lsn, payload))
                else:
                    t.skip = True
                    t.held = []
                    if self.mode == OWN and t.origin != peer and owner != peer:
                        if t.prepared:
                            parsed = cp.parse_gid(t.gid)
                            t.need = parsed[1] if parsed is not None else 0
                        else:
                            t.need = None           # decided by its first message, below
                continue
            if cls is po.Relation or cls is po.Type:
                # Schema messages are sent once per walsender session, even
                # inside a transaction we skip: always forward them. A
                # Relation is re-sent after any change to its table, so this
                # is where a table becoming local is noticed.
                if cls is po.Relation and (msg.namespace == "mtm" or
                                           await node.is_local(msg.namespace, msg.name)):
                    mtm_rels.add(msg.relid)
                else:
                    mtm_rels.discard(getattr(msg, "relid", None))
                    write(link.replication(lsn, payload))
                continue
            if cls is po.Commit or cls is po.Prepare:
                if t is None:
                    raise StreamError(f"{cls.__name__} without a BEGIN in the slot stream")
                end = msg.end_lsn
                self._open = False
                if t.skip or (cls is po.Commit and not t.data):
                    # (another origin's plain one without an mtm_plain
                    # message: this node's generation, conservatively)
                    cov.add(end, node.generation.num if t.need is None else t.need)
                    t = None
                    self._confirm()
                    continue
                for f in t.held:
                    write(f)
                write(link.replication(lsn, payload))
                cov.add(end, None)
                if cls is po.Prepare:
                    self.log.debug("sent_prepare", peer=peer, gid=msg.gid)
                marker, t = t.marker, None
                if marker is not None and self.mode == ALL and marker["donor"] \
                        and peer in marker["members"] and self.join_gen \
                        and marker["gen"] >= self.join_gen:
                    # The peer joined this generation and everything it
                    # lacked from earlier ones is before this marker: from
                    # here on it gets each origin from that origin.
                    self.mode = OWN
                    write(link.stream_mode(OWN))
                    self.log.info("stream_mode_switched", peer=peer, mode="own",
                                  gen=marker["gen"], lsn=po.lsn_str(end))
                if link_writer.transport.get_write_buffer_size() > DRAIN_ABOVE_BYTES:
                    flush()
                    await link_writer.drain()
                continue
            if cls is po.CommitPrepared or cls is po.RollbackPrepared:
                parsed = cp.parse_gid(msg.gid)
                end = msg.end_lsn if cls is po.CommitPrepared else msg.rollback_end_lsn
                ours = parsed is not None and parsed[0] == own_id
                send = parsed is not None and (
                    (ours and end > peer_done.get(peer, 0))
                    or (not ours and parsed[0] != peer and (
                        self.mode == ALL or (cls is po.CommitPrepared
                                             and end > peer_done.get(peer, 0)))))
                if not send:
                    cov.add(end, 0)
                    self._confirm()
                    continue
                write(link.replication(lsn, payload))
                cov.add(end, None)
                if link_writer.transport.get_write_buffer_size() > DRAIN_ABOVE_BYTES:
                    flush()
                    await link_writer.drain()
                continue
            raise StreamError(f"unexpected {cls.__name__} in the slot stream")


def _write(writer, data: bytes) -> None:
    """Write on a link; a transport that closed under us (uvloop raises
    RuntimeError) ends the session like a closed link."""
    if writer.is_closing():
        raise StreamError("link to peer is down")
    try:
        writer.write(data)
    except RuntimeError as e:
        raise StreamError(f"link to peer is down ({e})") from None


def _name(mode: bytes) -> str:
    return {OWN: "own", ALL: "all", NONE: "none"}.get(mode, repr(mode))

