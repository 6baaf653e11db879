"""One node's replication service (asyncio shell around the pure cores).

Owns: the inter-node links, one *sender* per peer (this node's slot for
that peer, filtered, forwarded over the link), one *receiver* per peer (the
peer's stream dispatched to ``[limits] apply_workers`` ``Applier``s and a
finisher, see ``_dispatch``), the commit-protocol cores
(``Coordinator`` for this node's transactions, ``Participant`` for the
peers'), and a small pool of local connections that carry out the cores'
actions (PERSIST, COMMIT/ROLLBACK PREPARED).

What a sender forwards, and to what its slot is confirmed, depends on the
mode the peer asked for (replication/sender.py): this node's own
transactions to an ONLINE peer, every origin's to a peer that catches up
from this node. Which mode to ask each peer for is the generation layer's
choice (replication/generations.py, ``plan_streams``); applying what
arrives is replication/receiver.py's.

Crash story (replication/README.md, "Crash and restart"): nothing here is
kept only in memory that matters after a crash. Prepared transactions,
``mtm.precommits`` records and the apply horizon are durable in
PostgreSQL; the streams resume from the slots' confirmed positions and the
appliers recognise what they did already. At start, and whenever the local
PostgreSQL was lost and is back, the node first ends every backend a
previous life of this proxy left running (so none of them finishes a
PREPARE or a precommit behind our back), then resolves its own gids that
are prepared and that no client is waiting for (``_resolve_orphans``).
"""
from __future__ import annotations

import asyncio
import json
import time
import traceback

import psycopg

from common import failpoints
from common import log as mlog
from common.sql import quote_literal
from config import NodeConfig, parse_address

from . import commit as cp
from . import link
from . import pgoutput as po
from .apply import APPLIED_STATE_SQL, ApplyError
from .cluster import read_secret
from .generations import Generations
from .pgpool import PgUnavailable, Pool
from .receiver import Receiver
from .sender import Sender

TICK_S = 0.05
WATCH_AFTER_MS = 10      # an applier waiting longer than this is looked at
# How often a busy member tells a coordinator it is working: every second,
# and at least four times per commit_vote_timeout_ms (a report every
# timeout would race the coordinator's clock).
WORKING_EVERY_S = 1.0
APPLIED_GC_INTERVAL_S = 10
ORPHAN_SCAN_INTERVAL_S = 1.0
# A gid handed to a session is its own until the session starts the
# protocol with it; one still not started this long after is an orphan
# (the session died between its PREPARE and the protocol).
ISSUED_GRACE_S = 10
POOL_SIZE = 4
# Every backend this proxy opens carries an application_name starting so;
# a previous life's are ended at start (``_fence_previous_life``).
APP_PREFIX = "mmproxy "

# For each waiting backend: who blocks it (pg_blocking_pids; 0 stands for
# prepared transactions) and which prepared transactions hold a lock on the
# object it waits for. A prepared transaction's locks have pid NULL and share
# a virtualtransaction with its own transactionid lock, which names its xid.
_BLOCKERS_SQL = """
WITH l AS MATERIALIZED (SELECT * FROM pg_locks)
SELECT w.pid, pg_blocking_pids(w.pid),
       ARRAY(SELECT px.gid FROM l h
             JOIN l x ON x.virtualtransaction = h.virtualtransaction AND x.pid IS NULL
                     AND x.locktype = 'transactionid' AND x.mode = 'ExclusiveLock'
             JOIN pg_prepared_xacts px ON px.transaction = x.transactionid
             WHERE h.pid IS NULL AND h.granted AND h.locktype = w.locktype
               AND h.database IS NOT DISTINCT FROM w.database
               AND h.relation IS NOT DISTINCT FROM w.relation
               AND h.page IS NOT DISTINCT FROM w.page AND h.tuple IS NOT DISTINCT FROM w.tuple
               AND h.virtualxid IS NOT DISTINCT FROM w.virtualxid
               AND h.transactionid IS NOT DISTINCT FROM w.transactionid
               AND h.classid IS NOT DISTINCT FROM w.classid
               AND h.objid IS NOT DISTINCT FROM w.objid
               AND h.objsubid IS NOT DISTINCT FROM w.objsubid)
FROM l w WHERE NOT w.granted AND w.pid = ANY(%s)
"""


class ReplicationNode:
    def __init__(self, cfg: NodeConfig, *, retry_ms: int = 200, wait_peer_commits: bool = True,
                 wound_backend=None):
        self.cfg = cfg
        self.id = cfg.node.id
        self.peers = {p.id: p for p in cfg.peers}
        ids = frozenset([self.id, *self.peers])
        self.generation = cp.Generation(1, ids, ids)
        self.coord = cp.Coordinator(self.id, self.generation,
                                    vote_timeout_ms=cfg.timeouts.commit_vote_timeout_ms,
                                    retry_ms=retry_ms, wait_peer_commits=wait_peer_commits)
        self.part = cp.Participant(self.id, self.generation)
        self.log = mlog.get().bind(node_id=self.id, subsystem="replication")
        pg = cfg.postgres
        self.conninfo = pg.conninfo()
        self.password = pg.password()
        self._seq = 0
        # the node's secret (mtm.secret), read at start: client sessions pass
        # it to the mtm functions only the proxy may call
        self.token: str | None = None
        # (peer, applier) -> (its backend pid, gid being applied, since when)
        # while it applies a transaction to be prepared
        self.applying: dict[tuple[int, int], tuple[int, str, float]] = {}
        self._wounded: set = set()
        # gid -> the older gid for which its applier's statement was cancelled
        self.cancelled: dict[str, str] = {}
        # peer -> end LSN up to which all its transactions are applied here
        self.acked: dict[int, int] = {}
        # peer -> end LSN up to which the peer reported our stream done there
        self.peer_done: dict[int, int] = {}
        # proxy callback: end a client session's transaction with 40001
        self.wound_backend = wound_backend
        self.out: dict[int, asyncio.StreamWriter] = {}
        self.app_prefix = APP_PREFIX
        # one sender (our slot for the peer) and one receiver (its stream) per peer
        self.senders = {p: Sender(self, p) for p in self.peers}
        self.receivers = {p: Receiver(self, p) for p in self.peers}
        # peer -> the mode we last asked it for (sender.py): OWN, ALL or NONE
        self.wanted: dict[int, bytes] = {p: link.NONE for p in self.peers}
        self.wanted_gen: dict[int, int] = {p: 0 for p in self.peers}
        # backends of stopped appliers, waited for before new ones start
        self.retired_pids: set[int] = set()
        self.unfinished: dict[str, asyncio.Future] = {}     # see prepared_here
        self._trimmed_below = 0     # precommit records below this generation are gone
        self.waiters: dict[str, asyncio.Future] = {}
        self._handlers: set = set()     # protocol messages being handled
        self.pool = Pool(lambda: self.connect(application_name=APP_PREFIX + "pool"), POOL_SIZE,
                         on_lost=self._pg_lost)
        # gid -> when it was handed to a session (see ISSUED_GRACE_S)
        self.issued: dict[str, float] = {}
        # Set once the node can serve: the previous life's backends are
        # gone. Cleared while the local PostgreSQL is unreachable.
        self.ready = asyncio.Event()
        # peer -> the first frame of a new link, read by a dispatcher that
        # then restarted its receiver (see ``_dispatch``)
        self._stash: dict[int, tuple] = {}
        self.tasks: list[asyncio.Task] = []
        self.server: asyncio.AbstractServer | None = None
        # Each incoming connection of a peer is an epoch; frames of an older
        # epoch are discarded, so a reset link restarts the peer's stream at
        # a transaction boundary (its confirmed LSN).
        self.link_epoch: dict[int, int] = {p: 0 for p in self.peers}
        self.incoming: dict[int, asyncio.StreamWriter] = {}
        # peer -> commit time (pgoutput microseconds) of the last transaction
        # of its stream done here: the catch-up lag (generations.py)
        self.applied_ts: dict[int, int] = {}
        # the consensus service and what the node does with its decisions
        self.gens = Generations(self, cfg.state_path())

    # -- lifecycle ----------------------------------------------------------------

    async def connect(self, **kw) -> psycopg.AsyncConnection:
        return await psycopg.AsyncConnection.connect(self.conninfo, password=self.password,
                                                     autocommit=True, **kw)

    async def start(self) -> None:
        await self._fence_previous_life()
        await self._apply_wal_limit()
        host, port = parse_address(self.cfg.node.internode_listen)
        self.server = await asyncio.start_server(self._incoming, host, port, reuse_address=True)
        await self.gens.start()
        for peer in self.peers:
            self._spawn(f"outgoing link to {peer}", self._outgoing, peer)
            self._spawn(f"sender to {peer}", self.senders[peer].run)
            self._spawn(f"receiver from {peer}", self.receivers[peer].run)
        self._spawn("ticker", self._ticker)
        self._spawn("state publisher", self._publish_state)
        self._spawn("conflict watchdog", self._conflict_watchdog)
        self._spawn("applied trimming", self._forget_applied)
        self._spawn("working reports", self._report_working)
        self._spawn("orphan resolver", self._resolve_orphans)
        self.ready.set()
        self.log.info("replication_started", peers=sorted(self.peers),
                      generation=self.generation.num)

    def send_to(self, peer: int, frame: bytes) -> bool:
        """Write a frame on the link to ``peer`` if it is up. A transport
        that closed under us (the link is going down; ``_outgoing`` will
        notice) refuses writes with RuntimeError in uvloop: the frame is
        dropped like any message on a failed link (everything is
        retransmitted or resent from the slot)."""
        w = self.out.get(peer)
        if w is None or w.is_closing():
            return False
        try:
            w.write(frame)
        except RuntimeError:
            return False
        return True

    def _spawn(self, name: str, fn, *args) -> None:
        """Run ``fn(*args)`` for the node's whole life: if it ever raises,
        log the error with its traceback and start it again. A background
        task that died silently would stop a peer's stream for good."""
        async def supervise():
            while True:
                try:
                    await fn(*args)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self.log.error("task_failed", task=name, error=repr(e),
                                   traceback=traceback.format_exc())
                    await asyncio.sleep(0.5)
        self.tasks.append(asyncio.create_task(supervise(), name=name))

    async def _fence_previous_life(self) -> None:
        """End every backend a previous life of this proxy left behind
        (appliers, pool connections, walsenders of our slots) and wait until
        they are gone. Such a backend may still be running a PREPARE or a
        precommit write it received before we died: positions, precommit
        records and prepared gids are read only after it is gone."""
        async with await self.connect(application_name=APP_PREFIX + "start") as conn:
            self.token = await read_secret(conn)
            if self.token is None:
                raise RuntimeError("this node's database has no mtm.secret: it was set up by an "
                                   "older mmproxy; run `mmproxy init-cluster --config <this "
                                   "node's config>` once to update it")
            for attempt in range(100):
                rows = await (await conn.execute(
                    "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE pid <> pg_backend_pid() AND (application_name LIKE %s OR pid IN "
                    "(SELECT active_pid FROM pg_replication_slots WHERE slot_name LIKE "
                    "'mtm\\_slot\\_%%'))", (APP_PREFIX + "%",))).fetchall()
                if not rows:
                    return
                if attempt == 0:
                    self.log.info("previous_life_fenced", backends=sorted(r[0] for r in rows))
                await asyncio.sleep(0.05)
            raise RuntimeError("backends of a previous mmproxy life did not exit")

    async def _apply_wal_limit(self) -> None:
        """Bound the WAL kept for an absent peer: PostgreSQL's
        max_slot_wal_keep_size = ``[limits] absent_node_wal_limit_mb``. A
        slot past it is invalidated, and the peer must be copied again
        (sender.py tells it; docs/generations.md)."""
        mb = self.cfg.limits.absent_node_wal_limit_mb
        want = mb if mb > 0 else -1
        try:
            row = await self._fetchone("SELECT setting::bigint FROM pg_settings "
                                       "WHERE name = 'max_slot_wal_keep_size'")
            if row[0] == want:
                return
            # (utility statements take no parameters: the value is an int)
            await self._sql("ALTER SYSTEM SET max_slot_wal_keep_size = "
                            + (f"'{int(want)}MB'" if want > 0 else "-1"))
            await self._sql("SELECT pg_reload_conf()")
            self.log.info("wal_limit_set", max_slot_wal_keep_size_mb=want, was=row[0])
        except (psycopg.Error, PgUnavailable) as e:
            self.log.warning("wal_limit_not_set", error=str(e).strip(),
                             remedy="set max_slot_wal_keep_size in postgresql.conf to "
                                    "[limits] absent_node_wal_limit_mb (the proxy's role needs "
                                    "superuser rights to do it itself)")

    def _pg_lost(self) -> None:
        """The local PostgreSQL is unreachable: what the cores keep in memory
        about transactions in flight may no longer match it (a crashed
        server keeps prepared transactions, loses running ones). Forget it;
        every client still waiting hears that the outcome is unknown; once
        the server is back, the orphan resolver decides our prepared gids
        and participants answer from the database."""
        self.ready.clear()
        waiting = self.coord.reset()
        self.part.reset()
        for gid in list(self.unfinished):       # no read dependency waits on a lost server
            self.finished_here(gid)
        self.gens.pg_lost()
        self.log.error("postgres_lost", transactions_in_flight=len(waiting))
        for gid in waiting:
            fut = self.waiters.pop(gid, None)
            if fut is not None and not fut.done():
                fut.set_result(cp.Reply(
                    gid, False, cp.STATEMENT_COMPLETION_UNKNOWN,
                    "the connection to the local PostgreSQL server was lost while the "
                    f"transaction {gid} was committing; its outcome is not known yet (it will be "
                    "committed or rolled back everywhere once the server is back)"))
        if not any(t.get_name() == "mmproxy-reconnect" for t in self.tasks if not t.done()):
            self.tasks.append(asyncio.create_task(self._reconnect(), name="mmproxy-reconnect"))

    async def _reconnect(self) -> None:
        while True:
            try:
                await self._fence_previous_life()
                break
            except (psycopg.Error, OSError, RuntimeError):
                await asyncio.sleep(0.2)
        await self.pool.reset()
        self.pool.lost = False
        self.ready.set()
        self.gens.pg_lost(False)
        self.log.info("postgres_back")

    async def stop(self) -> None:
        await self.gens.stop()
        for t in (*self.tasks, *self._handlers):
            t.cancel()
        await asyncio.gather(*self.tasks, *self._handlers, return_exceptions=True)
        if self.server is not None:
            self.server.close()
        # Let the link handlers see EOF and return, rather than be cancelled
        # with the loop (asyncio reports those cancellations as errors).
        for w in list(self.incoming.values()):
            w.close()
        for _ in range(20):
            if not self.incoming:
                break
            await asyncio.sleep(0.01)
        for w in self.out.values():
            w.close()
        for snd in self.senders.values():
            if snd.stream is not None:
                await snd.stream.close()
        await self.pool.close()

    # -- the commit protocol, for client sessions -----------------------------------

    def gate(self) -> str | None:
        """For client sessions: why this node may not serve them now."""
        if self.gens.serving():
            return None
        return self.gens.not_online_message()

    def next_gid(self) -> str:
        # Microseconds since the epoch, strictly increasing: gids order by
        # when their commits began (wound-wait compares them).
        self._seq = max(self._seq + 1, int(time.time() * 1_000_000))
        gid = cp.make_gid(self.id, self.generation.num, self._seq)
        self.issued[gid] = time.monotonic()
        return gid

    async def commit(self, gid: str, hold: bool = False) -> cp.Reply:
        """``gid`` is prepared locally: run the protocol, return the outcome.
        With ``hold`` (a client's PREPARE TRANSACTION), stop once every
        member has prepared it; ``release`` finishes it."""
        self.issued.pop(gid.split(cp.USER_GID_SEP, 1)[0], None)
        failpoints.hit("after_local_prepare", self.log, gid=gid)
        if not self.ready.is_set() or self.coord.knows(gid):
            # The local server was lost between this session's PREPARE and
            # now (the resolver owns the gid), or the resolver took it.
            return cp.Reply(gid, False, cp.STATEMENT_COMPLETION_UNKNOWN,
                            f"the local PostgreSQL server was lost while {gid} was being "
                            "prepared; its outcome is not known yet")
        if not self.gens.participating():
            await self._finish_prepared(gid, False)
            return cp.Reply(gid, False, cp.SERIALIZATION_FAILURE,
                            f"transaction aborted: {self.gens.not_online_message()}")
        fut = asyncio.get_running_loop().create_future()
        self.waiters[gid] = fut
        await self.execute(self.coord.start(gid, _now_ms(), hold=hold))
        return await fut

    async def release(self, gid: str, commit: bool) -> cp.Reply:
        """COMMIT/ROLLBACK PREPARED of a held ``gid`` asked here: its
        coordinator (the node that prepared it) finishes it everywhere."""
        if gid in self.waiters:
            return cp.Reply(gid, not commit, "55006",
                            f"prepared transaction {gid} is already being finished")
        owner = cp.parse_gid(gid)[0]
        fut = asyncio.get_running_loop().create_future()
        self.waiters[gid] = fut
        try:
            if owner == self.id:
                await self.execute(self.coord.release(gid, commit, self.id, _now_ms()))
            else:
                if not self.send_to(owner, link.protocol(cp.Release(gid, self.id, commit))):
                    return cp.Reply(gid, not commit, "08006",
                                    f"node {owner}, which prepared {gid}, is not connected")
            timeout = self.cfg.timeouts.commit_vote_timeout_ms / 1000
            try:
                async with asyncio.timeout(timeout):   # (not wait_for: see stream.py)
                    return await asyncio.shield(fut)
            except TimeoutError:
                return cp.Reply(gid, not commit, "08006",
                                f"node {owner}, which prepared {gid}, did not answer within "
                                f"{timeout:g} s; the transaction is still prepared")
        finally:
            if self.waiters.get(gid) is fut:
                del self.waiters[gid]

    # -- carrying out the cores' actions -------------------------------------------------

    async def execute(self, actions: list) -> None:
        """Carry out the cores' actions in order. A database action that
        fails leaves its transaction to be decided again: the coordinator
        forgets it (its client hears the outcome is unknown) and the
        orphan resolver decides it from the durable records; a participant
        forgets what it was doing, and the coordinator's retransmission
        makes it try again."""
        if any(a.__class__ is cp.PersistOwn for a in actions):
            failpoints.hit("after_votes", self.log)
        for a in actions:
            cls = a.__class__
            if cls is cp.Send:
                if a.msg is not None:
                    self.send_to(a.to, link.protocol(a.msg))
                continue
            if cls is cp.Reply:
                fut = self.waiters.pop(a.gid, None)
                if fut is not None and not fut.done():
                    fut.set_result(a)
                continue
            try:
                await self._execute_db(a)
            except (psycopg.Error, PgUnavailable) as e:
                self.log.warning("protocol_action_failed", action=cls.__name__, gid=a.gid,
                                 error=str(e).strip())
                if cls in (cp.PersistOwn, cp.CommitLocal, cp.AbortLocal, cp.FenceOwn):
                    self._coordinator_lost(a.gid)
                else:
                    self.part.action_failed(a.gid)

    async def _execute_db(self, a) -> None:
        cls = a.__class__
        if cls is cp.PersistOwn:
            self.gens.precommit_writing(a.gid, True)
            try:
                ok = await self._record(a.gid, "p") == "p"
            finally:
                self.gens.precommit_writing(a.gid, False)
            if ok:
                failpoints.hit("after_precommit_durable", self.log, gid=a.gid)
            await self.execute(self.coord.persisted(a.gid, _now_ms(), ok=ok))
        elif cls is cp.Persist:
            self.gens.precommit_writing(a.gid, True)
            try:
                ok = await self._record(a.gid, "p") == "p"
            finally:
                self.gens.precommit_writing(a.gid, False)
            await self.execute(self.part.persisted(a.gid, ok))
            if ok:
                failpoints.hit("member_after_precommit", self.log, gid=a.gid)
        elif cls is cp.Fence:
            state, committed = await self._fence(a.gid)
            await self.execute(self.part.fenced(a.gid, state == "p", committed))
        elif cls is cp.FenceOwn:
            state, _ = await self._fence(a.gid)
            await self.execute(self.coord.own_fenced(a.gid, state, _now_ms()))
        elif cls is cp.CommitLocal or cls is cp.AbortLocal:
            commit = cls is cp.CommitLocal
            await self._finish_prepared(a.gid, commit)
            if commit:
                failpoints.hit("after_local_commit", self.log, gid=a.gid)
            # One line per commit would flood an info-level log on a
            # busy cluster; aborts are the interesting ones.
            (self.log.debug if commit else self.log.info)(
                "transaction_decided", gid=a.gid, commit=commit)
            await self.execute(self.coord.local_done(a.gid, commit, _now_ms()))
        elif cls is cp.FinishLocal:
            await self._finish_prepared(a.gid, a.commit)
            await self.execute(self.part.finished(a.gid, a.commit))

    def _coordinator_lost(self, gid: str) -> None:
        """A coordinator action on ``gid`` failed: forget it; the orphan
        resolver decides it again from the durable records."""
        self.coord.txns.pop(gid, None)
        fut = self.waiters.pop(gid, None)
        if fut is not None and not fut.done():
            fut.set_result(cp.Reply(
                gid, False, cp.STATEMENT_COMPLETION_UNKNOWN,
                f"the commit of {gid} was interrupted by an error on the local PostgreSQL "
                "server; its outcome is not known yet (it will be committed or rolled back "
                "everywhere shortly)"))

    async def _record(self, gid: str, state: str) -> str:
        """Write our precommit record ('p') or fence ('x') for ``gid`` unless
        one is there already; return the record now there."""
        row = await self._fetchone(
            "WITH ins AS (INSERT INTO mtm.precommits (gid, state) VALUES (%s, %s) "
            "ON CONFLICT (gid) DO NOTHING RETURNING state) "
            "SELECT coalesce((SELECT state FROM ins), "
            "(SELECT state FROM mtm.precommits WHERE gid = %s))", (gid, state, gid))
        return row[0]

    async def _fence(self, gid: str) -> tuple[str, bool]:
        """Fence ourselves for ``gid``: (the record now there, committed here?)."""
        state = await self._record(gid, "x")
        row = await self._fetchone("SELECT EXISTS (SELECT 1 FROM mtm.applied WHERE key = %s)",
                                   (gid,))
        return state, bool(row[0])

    async def _resolve_orphans(self) -> None:
        """Decide our own gids that are prepared here and that no client is
        waiting for: a previous life of this proxy (or of the local
        PostgreSQL) left them (``Coordinator.recover``)."""
        pattern = f"MTM-{self.id}-%"
        while True:
            await asyncio.sleep(ORPHAN_SCAN_INTERVAL_S)
            await self.ready.wait()
            now = time.monotonic()
            for gid, at in list(self.issued.items()):
                if now - at > 6 * ISSUED_GRACE_S:
                    del self.issued[gid]        # its PREPARE never happened
            try:
                rows = await (await self._query(
                    "SELECT p.gid, c.state FROM pg_prepared_xacts p "
                    "LEFT JOIN mtm.precommits c ON c.gid = p.gid "
                    "WHERE p.database = current_database() AND p.gid LIKE %s", (pattern,))
                ).fetchall()
            except (psycopg.Error, PgUnavailable) as e:
                self.log.warning("orphan_scan_failed", error=str(e).strip())
                continue
            for gid, own in rows:
                base = gid.split(cp.USER_GID_SEP, 1)[0]
                if self.coord.knows(gid) or gid in self.waiters or (
                        now - self.issued.get(base, -1e9) < ISSUED_GRACE_S):
                    continue
                # With generations the cluster decides in-doubt gids (the
                # log's Decide entries, generations.py): one of an earlier
                # generation is reported there; one of the current
                # generation first makes a new one.
                self.gens.orphan(gid)

    async def is_local(self, namespace: str, name: str) -> bool:
        row = await self._fetchone(
            "SELECT EXISTS (SELECT 1 FROM mtm.local_tables WHERE rel = "
            "to_regclass(format('%%I.%%I', %s::text, %s::text)))", (namespace, name))
        return bool(row[0])

    async def _query(self, query, params=()) -> psycopg.AsyncCursor:
        """Run a statement on a pool connection; the cursor's rows are
        fetched already (client-side cursor), so the connection goes back
        at once."""
        return await self.pool.run(query, params)

    async def _fetchone(self, query, params=()) -> tuple:
        return await (await self._query(query, params)).fetchone()

    async def _sql(self, query, params=()) -> None:
        await self._query(query, params)

    async def _finish_prepared(self, gid: str, commit: bool) -> None:
        verb = "COMMIT PREPARED" if commit else "ROLLBACK PREPARED"
        try:
            await self._sql(verb + " " + quote_literal(gid))
        except psycopg.errors.UndefinedObject:
            pass  # already finished (the stream and a Decision both got here)
        self.finished_here(gid)

    # Peers' transactions prepared here and not finished yet (the receivers
    # register them): a later transaction of another origin that read one
    # of them waits for it (receiver.py, "read dependencies").
    def prepared_here(self, gid: str) -> None:
        if gid not in self.unfinished:
            self.unfinished[gid] = asyncio.get_running_loop().create_future()

    def finished_here(self, gid: str) -> None:
        fut = self.unfinished.pop(gid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self.execute(self.coord.tick(_now_ms()))
            except Exception as e:    # never let the clock stop
                self.log.error("ticker_failed", error=repr(e))

    async def _conflict_watchdog(self) -> None:
        """Wound-wait for the appliers. An applier applying gid A that has
        waited for a lock longer than ``WATCH_AFTER_MS`` is looked at:

        - a prepared transaction B holds the lock and B is younger than A:
          B's coordinator is asked to abort it (``Wound``; it does so if B
          is still collecting votes);
        - another applier, applying the younger B, holds it (or is ahead
          of A in the lock's queue): the same ``Wound``, and that applier's
          statement is cancelled here, which makes it vote no for B;
        - a client session that has not begun to commit holds it: the
          session's transaction ends with 40001 (first committer wins).

        Waits on a *tuple* lock (several backends queued for one row) are
        seen through ``pg_blocking_pids``; a chain (A waits for a queued
        session, which waits for B) unwinds one link per round. Without
        this, every such wait lasts until ``apply_lock_timeout_ms`` and
        everything after it from that peer queues behind it."""
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            appliers = {pid: gid for pid, gid, _ in self.applying.values()}
            waiting = {pid: gid for pid, gid, since in self.applying.values()
                       if now - since >= WATCH_AFTER_MS / 1000}
            if not waiting:
                continue
            try:
                blocked = await (await self._query(_BLOCKERS_SQL, (list(waiting),))).fetchall()
            except (psycopg.Error, PgUnavailable) as e:
                self.log.warning("watchdog_failed", error=str(e))
                continue
            if blocked:
                self.log.debug("watchdog_blocked", waiting=waiting, blocked=blocked)
            for pid, blocker_pids, prepared in blocked:
                by_gid = waiting.get(pid)
                if by_gid is None:
                    continue
                for gid in prepared:
                    await self._wound(gid, by_gid)
                for holder in blocker_pids:
                    if holder == 0 or holder == pid:
                        continue            # 0: a prepared transaction (above)
                    other = appliers.get(holder)
                    if other is None:
                        self._wound_session(holder, by_gid)
                    elif await self._wound(other, by_gid):
                        await self._cancel_applier(holder, other, by_gid)

    async def _wound(self, gid: str, by_gid: str) -> bool:
        """Ask ``gid``'s coordinator to abort it, if it is younger than
        ``by_gid``. True if it is (and was not wounded before)."""
        if gid in self._wounded or not cp.older(by_gid, gid):
            return False
        self._wounded.add(gid)
        if len(self._wounded) > 10000:
            self._wounded.clear()
        owner = cp.parse_gid(gid)[0]
        msg = cp.Wound(gid, self.id, by_gid)
        self.log.info("wound", gid=gid, by_gid=by_gid, owner=owner)
        if owner == self.id:
            await self.execute(self.coord.receive(msg, _now_ms()))
        else:
            self.send_to(owner, link.protocol(msg))
        return True

    async def _cancel_applier(self, pid: int, gid: str, by_gid: str) -> None:
        """The applier ``pid`` applies the wounded ``gid`` and holds what the
        older ``by_gid`` needs: cancel its statement, so it votes no now
        instead of at its lock timeout. (It has not prepared ``gid`` - it
        is still applying it - so the coordinator cannot have decided to
        commit it.)"""
        if not any(p == pid and g == gid for p, g, _ in self.applying.values()):
            return
        if len(self.cancelled) > 10000:
            self.cancelled.clear()
        self.cancelled[gid] = by_gid
        await self.cancel_backend(pid)

    def _wound_session(self, pid: int, by_gid: str) -> None:
        """A client transaction that has not begun to commit holds what the
        older, already prepared ``by_gid`` needs: in commit order it is the
        younger one, so it gives way (first committer wins)."""
        if self.wound_backend is None:
            return
        origin = cp.parse_gid(by_gid)[0]
        if self.wound_backend(pid, "could not serialize access: the transaction conflicts with "
                                   f"the transaction {by_gid} of node {origin}, which began "
                                   "to commit first; retry the transaction",
                              self.cancel_backend):
            self.log.info("wound_session", backend_pid=pid, by_gid=by_gid)

    async def cancel_backend(self, pid: int) -> None:
        # pg_cancel_backend signals the backend alone, at once; a protocol
        # CancelRequest goes through a forked child and signals the
        # backend's process group too (two 57014s for one statement).
        try:
            await self._sql("SELECT pg_cancel_backend(%s)", (pid,))
        except (psycopg.Error, PgUnavailable) as e:
            self.log.warning("cancel_failed", backend_pid=pid, error=str(e).strip())

    def busy_with(self, peer: int) -> str | None:
        """Is ``peer``'s stream being worked on here (received and not yet
        applied, or queued)? Returns the gid being applied ("" if none is
        known yet), or None when nothing of ``peer``'s is pending."""
        for (p, _), (_, gid, _) in self.applying.items():
            if p == peer:
                return gid
        if self.receivers[peer].busy():
            return ""
        return None

    async def _report_working(self) -> None:
        """Tell each peer whose stream we are still applying that we are
        (``Working``): its coordinator then keeps waiting for our votes
        however long a large transaction, or the backlog behind it, takes,
        while a member that stops answering still times out."""
        every = min(WORKING_EVERY_S, self.cfg.timeouts.commit_vote_timeout_ms / 4000)
        while True:
            await asyncio.sleep(every)
            for peer in self.peers:
                gid = self.busy_with(peer)
                if gid is not None:
                    self.send_to(peer, link.protocol(cp.Working(gid, self.id)))

    async def _forget_applied(self) -> None:
        """Advance each peer's durable apply horizon to what is applied
        here contiguously, and drop the ``mtm.applied`` rows at or below
        it, in one transaction (replication/apply.py)."""
        while True:
            await asyncio.sleep(APPLIED_GC_INTERVAL_S)
            await self.forget_applied_round()

    async def forget_applied_round(self) -> None:
        for peer, lsn in list(self.acked.items()):
            at = po.lsn_str(lsn)
            try:
                await self.pool.transaction([
                    ("INSERT INTO mtm.apply_progress (peer, lsn) VALUES (%s, %s) "
                     "ON CONFLICT (peer) DO UPDATE SET lsn = greatest(mtm.apply_progress.lsn, "
                     "excluded.lsn)", (peer, at)),
                    ("DELETE FROM mtm.applied WHERE peer = %s AND lsn <= "
                     "(SELECT lsn FROM mtm.apply_progress WHERE peer = %s)", (peer, peer))])
            except (psycopg.Error, PgUnavailable) as e:
                self.log.warning("applied_gc_failed", peer=peer, error=str(e).strip())
        await self._trim_precommits()
        try:
            # the commit guard's notes of finished transactions (see
            # mtm.guard_q: the check at commit never deletes its own, which
            # would make every SERIALIZABLE writer read the table)
            await self.pool.transaction([
                ("DELETE FROM mtm.guard_q WHERE xid < pg_snapshot_xmin(pg_current_snapshot())",
                 ())])
        except (psycopg.Error, PgUnavailable) as e:
            self.log.warning("guard_gc_failed", error=str(e).strip())

    async def _trim_precommits(self) -> None:
        """Delete our precommit records of gids below the lowest generation
        every configured node reported settled (``Status.settled``: ONLINE,
        nothing of an earlier generation prepared): no node can need them
        to decide an in-doubt transaction any more (GENERATIONS.md 5)."""
        sts = self.gens.service.last_status
        settled = [sts[n].settled if n in sts else 0 for n in self.gens.gen.configured]
        below = min(settled) if settled else 0
        if below <= self._trimmed_below:
            return
        try:
            await self._sql("DELETE FROM mtm.precommits WHERE gid ~ '^MTM-[0-9]+-[0-9]+-' "
                            "AND split_part(gid, '-', 3)::int < %s", (below,))
            self._trimmed_below = below
        except (psycopg.Error, PgUnavailable) as e:
            self.log.warning("precommits_trim_failed", error=str(e).strip())

    def connected_peers(self) -> list[int]:
        """Peers we reach and that reach us."""
        return sorted(p for p in self.peers if p in self.out and p in self.incoming)

    async def _publish_state(self) -> None:
        """Refresh mtm.node_state for mtm.status()/nodes()/ping()."""
        while True:
            connected = self.connected_peers()
            view = self.gens.view()
            try:
                await self.ready.wait()
                await self._sql(
                    "INSERT INTO mtm.node_state (id, status, gen_num, gen_members, connected, "
                    "consensus) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
                    "status = excluded.status, gen_num = excluded.gen_num, "
                    "gen_members = excluded.gen_members, connected = excluded.connected, "
                    "consensus = excluded.consensus, updated_at = clock_timestamp()",
                    (self.id, view["user_status"], view["gen_num"], view["members"], connected,
                     json.dumps(view)))
            except (psycopg.Error, PgUnavailable) as e:
                self.log.warning("state_publish_failed", error=str(e).strip())
            await asyncio.sleep(0.25)

    # -- links ------------------------------------------------------------------------------

    async def _outgoing(self, peer: int) -> None:
        host, port = parse_address(self.peers[peer].node_address)
        while True:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(0.2)
                continue
            writer.write(link.hello(self.id))
            # what we want its sender to send us, again on every new link
            writer.write(link.mode_request(self.wanted[peer], self.wanted_gen[peer]))
            self.out[peer] = writer
            self.senders[peer].link_changed()
            self.log.info("link_up", peer=peer)
            try:
                await reader.read()      # the peer never sends on this connection
            except OSError:
                pass
            self.out.pop(peer, None)
            self.senders[peer].link_changed()
            writer.transport.abort()     # wakes anything still writing to it
            self.log.warning("link_down", peer=peer)
            await asyncio.sleep(0.2)

    async def _incoming(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = link.FrameReader()
        peer = None
        epoch = 0
        control = False
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for kind, payload in frames.feed(data):
                    if control and kind == b"C":
                        self.gens.service.receive(peer, payload)
                    elif kind == b"G" and peer is None:
                        peer = int.from_bytes(payload, "big")
                        if peer not in self.peers:
                            self.log.error("link_refused", peer=peer, reason="unknown node id")
                            return
                        control = True
                    elif control:
                        raise link.LinkError(f"frame {kind!r} on a consensus link")
                    elif kind == b"H":
                        peer = int.from_bytes(payload, "big")
                        if peer not in self.peers:
                            self.log.error("link_refused", peer=peer, reason="unknown node id")
                            return
                        self.link_epoch[peer] += 1
                        epoch = self.link_epoch[peer]
                        old = self.incoming.get(peer)
                        if old is not None:
                            old.close()
                        self.incoming[peer] = writer
                    elif peer is None:
                        return
                    elif kind == b"R" or kind == b"S":
                        if kind == b"S":
                            self.gens.slot_usable(peer)
                        await self.receivers[peer].inbox.put((epoch, kind, payload))
                    elif kind == b"M":
                        self.senders[peer].request(*link.decode_mode_request(payload))
                    elif kind == b"L":
                        self.gens.slot_lost(peer, payload.decode(errors="replace"))
                    elif kind == b"A":
                        self._acked(peer, int.from_bytes(payload, "big"))
                    elif kind == b"J":
                        # Handled on its own: its actions may wait for a
                        # durable write, and the link must go on delivering
                        # the other transactions' votes and acks meanwhile
                        # (the cores take messages in any order).
                        t = asyncio.ensure_future(self._protocol(link.decode_protocol(payload)))
                        self._handlers.add(t)
                        t.add_done_callback(self._handlers.discard)
        except (OSError, link.LinkError) as e:
            self.log.warning("link_error", peer=peer, error=str(e))
        finally:
            if peer is not None and not control and self.incoming.get(peer) is writer:
                del self.incoming[peer]
            writer.close()

    async def _protocol(self, msg) -> None:
        cls = msg.__class__
        if cls is cp.Outcome:     # the answer to a Release we sent
            fut = self.waiters.get(msg.gid)
            if fut is not None and not fut.done():
                fut.set_result(cp.Reply(msg.gid, msg.committed, msg.sqlstate, msg.message))
            return
        try:
            if cls in _ASKS_PARTICIPANT and not self.part.knows(msg.gid) \
                    and (cp.parse_gid(msg.gid) or (self.id,))[0] != self.id:
                # A coordinator retransmits to us, and we have no memory of
                # the transaction (we restarted): ask the database.
                row = await self._fetchone(APPLIED_STATE_SQL, (msg.gid, msg.gid))
                self.part.recovered(msg.gid, *row)
            await self.execute(self.coord.receive(msg, _now_ms()))
            await self.execute(self.part.receive(msg))
        except (psycopg.Error, PgUnavailable) as e:   # the sender retransmits; we answer then
            self.log.warning("protocol_message_failed", gid=msg.gid, error=str(e).strip())

    def reset_link(self, peer: int) -> None:
        """Drop the peer's incoming link: it reconnects and resends from the
        LSN we last acknowledged, starting at a transaction boundary."""
        self.link_epoch[peer] += 1
        w = self.incoming.pop(peer, None)
        if w is not None:
            w.close()

    # -- streams ------------------------------------------------------------------------------

    def _acked(self, peer: int, lsn: int) -> None:
        if lsn > self.peer_done.get(peer, 0):
            self.peer_done[peer] = lsn
        self.senders[peer].acked()

    def request_mode(self, peer: int, mode: bytes, join_gen: int, restart: bool) -> None:
        """Ask ``peer`` for its stream in ``mode`` (sender.py; ``join_gen``:
        the generation we join, whose donor marker ends an ALL stream);
        with ``restart``, stop applying what it sends now and have it start
        a new session on a new link."""
        self.wanted[peer] = mode
        self.wanted_gen[peer] = join_gen
        if restart:
            self.receivers[peer].restart()
        self.send_to(peer, link.mode_request(mode, join_gen))

    async def wait_gone(self, pids: list[int]) -> None:
        """Wait until the backends ``pids`` (stopped appliers) have exited:
        one of them may still be finishing a PREPARE, or hold a replication
        origin."""
        for _ in range(200):
            if not pids:
                return
            try:
                row = await self._fetchone("SELECT count(*) FROM pg_stat_activity "
                                           "WHERE pid = ANY(%s)", (pids,))
            except (psycopg.Error, PgUnavailable):
                await asyncio.sleep(0.1)
                continue
            if row[0] == 0:
                return
            await asyncio.sleep(0.02)
        raise ApplyError(f"appliers {pids} of a stopped receiver did not exit")


_ASKS_PARTICIPANT = (cp.VoteRequest, cp.Precommit, cp.Decision)


def _now_ms() -> int:
    return int(time.monotonic() * 1000)
