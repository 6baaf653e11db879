"""Applying a peer's decoded transactions to the local PostgreSQL server.

An ``Applier`` owns one psycopg connection to the local server, set up with
the replication origin of the peer it applies (``mtm_node_<id>``), so that
every transaction it writes is marked with that origin: the local sender
sees the ORIGIN message and never ships it again (PG15's pgoutput has no
origin filter; the sender filters), and ``pg_replication_origin_status``
records how far the peer's stream is applied.

Rules kept here (mmts's apply rules, doc/multimaster.xml):
- A prepared transaction of the peer is applied and then PREPAREd with the
  *same gid*; the result (prepared, or the SQLSTATE and message of the
  failure) is returned to the caller, who votes with it in the commit
  protocol. A failure rolls the local copy back and skips the rest of that
  transaction: the coordinator will abort it everywhere.
- UPDATE or DELETE of a row that does not exist fails the transaction
  (SQLSTATE 02000 from the applier): silently skipping it would diverge.
- Columns sent as "unchanged TOAST" are left alone.
- COMMIT/ROLLBACK PREPARED of a gid that is not prepared here is ignored
  (PG15-FACTS: a nextval-only transaction yields a lone COMMIT PREPARED).
- Row values are passed in PostgreSQL's text form as untyped literals, so
  the server converts them to the column types exactly as it printed them.
- Round trips: the statements of a transaction are sent together, as one
  multi-statement query per ``BATCH_BYTES`` (the last one ends with the
  origin position and the PREPARE TRANSACTION or COMMIT); a run of more
  than ``INSERT_BATCH_ROWS`` inserts into one table goes through COPY, in
  batches of at most ``COPY_BATCH_ROWS`` rows or ``COPY_BATCH_BYTES``
  bytes. Memory stays bounded by these sizes.
- Several appliers may apply one peer's stream (parallel apply, see
  ``node.py``): each has its own origin (``mtm_node_<peer>``,
  ``mtm_node_<peer>_<k>``; PostgreSQL 15 lets one session at a time use an
  origin), and every applied transaction records its gid (or, for a plain
  commit, its end LSN) in ``mtm.applied``, in the transaction itself.
- Replay is normal: a restarted stream resends from the slot's confirmed
  position, which may lag far behind what was applied here (a slot's
  confirmed position reaches disk only at checkpoints, so after a crash of
  the peer's PostgreSQL it can go back minutes). Three zones, by the
  transaction's end LSN E in the peer's stream:
  - E <= the *apply horizon* (``mtm.apply_progress``, durable, advanced
    by the node together with the trimming of ``mtm.applied``, in one
    transaction): everything up to it is done here: ``Skipped``, with no
    look-up (a replay after a crash of the peer's server can be long).
  - horizon < E <= the highest LSN applied by any applier of that peer
    (the origins' progress): it may or may not have been applied (apply is
    parallel), so it is looked up: prepared here - vote again; committed
    here (``mtm.applied``, which keeps every row above the horizon) -
    skip it; neither - apply it.
  - above: applied.
- Catch-up (``catchup_for``): a node that is not ONLINE applies one
  *donor's* stream carrying every origin (replication/sender.py, mode
  ALL). Each transaction then names its true origin: the ORIGIN message
  after BEGIN (the donor applied it from that node; its LSN is the origin's
  own, kept along the chain), or none (the donor's own). The applier waits
  for that message before it decides, always looks the transaction up
  (prepared here? committed here, by ``mtm.applied`` or below the origin's
  horizon?) and applies it under that origin's replication origin
  (``mtm_node_<origin>[_k]``, set for the transaction and reset after it),
  recording it in ``mtm.applied`` as the origin's: when the origin's own
  stream resends it later, it is recognised. This node's own transactions
  are never applied back. A prepared transaction whose COMMIT PREPARED the
  dispatcher has already seen (``commit_plain``) is applied as a plain
  commit instead: one transaction, no PREPARE (receiver.py, "look-ahead").
- DDL arrives as a transactional logical message (prefix ``mtm_ddl``) in
  order with the rows, and is run with the session context it was captured
  with: search_path, the settings that change what DDL does (origin's
  values, set for that one statement), and the role. A superuser's DDL runs
  after SET LOCAL ROLE; any other role's inside a SECURITY DEFINER function
  owned by that role, where PostgreSQL refuses SET ROLE and SET SESSION
  AUTHORIZATION, so code the statement runs (a volatile default, a CHECK
  over existing rows) cannot take the applier's superuser rights. The text
  must be exactly one statement. CREATE TABLE AS arrives WITH NO DATA; its
  rows follow as rows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import psycopg
from psycopg import sql

import pglast

from common.sql import quote_ident, quote_literal

from . import pgoutput as po
from .cluster import APPLY_CHECK_SQL, DDL_SETTINGS

PLAIN_PREFIX = "mtm_plain"       # (sender.py: a catch-up's plain commit, its gid)

DDL_PREFIX = "mtm_ddl"
COPY_BATCH_ROWS = 5000
COPY_BATCH_BYTES = 8 << 20
INSERT_BATCH_ROWS = 50       # more inserts into one table in a row: COPY
BATCH_BYTES = 256 << 10


def origin_name(node_id: int) -> str:
    return f"mtm_node_{node_id}"


@dataclass(frozen=True)
class Prepared:
    gid: str


@dataclass(frozen=True)
class PrepareFailed:
    gid: str
    sqlstate: str
    message: str


@dataclass(frozen=True)
class Skipped:
    """A resent transaction at or below the apply horizon: done here before
    (committed, or rolled back), nothing to do or say."""
    gid: str | None


@dataclass(frozen=True)
class Refused:
    """A prepared transaction of an earlier generation than this node's,
    not applied here before: not applied now (a member that moved on never
    votes for it; mmts: "refusing transaction due to generation switch")."""
    gid: str


@dataclass(frozen=True)
class Finished:
    """COMMIT/ROLLBACK (PREPARED) done locally."""
    gid: str | None
    committed: bool
    applied: bool    # False when nothing was done now (unknown gid, or a replay)
    # The transaction was prepared here (finished now or before a restart):
    # this node may acknowledge its commit even with no vote in memory.
    here: bool = False


class ApplyError(RuntimeError):
    """A failure outside a prepared transaction: cannot be voted away."""


# Is this gid prepared here, and is this transaction (by its mtm.applied
# key: the gid, or for a plain commit its end LSN) committed here?
APPLIED_STATE_SQL = ("SELECT EXISTS (SELECT 1 FROM pg_prepared_xacts WHERE gid = %s "
                     "AND database = current_database()), "
                     "EXISTS (SELECT 1 FROM mtm.applied WHERE key = %s)")
# ... and, in the same snapshot, the peer's durable apply horizon.
REPLAY_STATE_SQL = (APPLIED_STATE_SQL
                    + ", (SELECT lsn FROM mtm.apply_progress WHERE peer = %s)")
DONE_HERE = "MM001"
APPLIED_TABLE_SQL = ("CREATE TABLE IF NOT EXISTS mtm.applied "
                     "(key text PRIMARY KEY, peer int NOT NULL, lsn pg_lsn NOT NULL); "
                     "CREATE TABLE IF NOT EXISTS mtm.apply_progress "
                     "(peer int PRIMARY KEY, lsn pg_lsn NOT NULL)")



def worker_origin(node_id: int, worker: int) -> str:
    """The replication origin applier ``worker`` uses for ``node_id``'s
    transactions (PostgreSQL 15 lets one session at a time use an origin)."""
    return origin_name(node_id) + (f"_{worker}" if worker else "")


class Applier:
    def __init__(self, conn: psycopg.AsyncConnection, peer_id: int, *,
                 lock_timeout_ms: int = 1000, worker: int = 0, log=None,
                 catchup_for: int | None = None):
        assert conn.autocommit, "the applier manages transactions itself"
        self.conn = conn
        self.peer_id = peer_id
        self.worker = worker
        self.origin = worker_origin(peer_id, worker)
        # Catching up (this node's id): the stream is a donor's, every origin
        # in it (module docstring). Switched off at the donor's marker.
        self.catchup_for = catchup_for
        self._session_origin: str | None = None     # "?" after an error: unknown
        self._pending = None        # a catch-up BEGIN waiting for its ORIGIN message
        self._pending_origin: tuple[int, int] | None = None
        self._pending_gid: str | None = None     # ... and its mtm_plain message
        self._src = peer_id         # origin node of the transaction being applied
        self._refuse_next = False
        self._plain = False          # commit the next prepared transaction plainly
        self._plain_gid: str | None = None      # ... the one being applied so
        self._check_plain = False
        self.lock_timeout_ms = lock_timeout_ms
        self.log = log
        self.relations: dict[int, po.Relation] = {}
        self._in_txn = False
        self._gid: str | None = None
        self._failed: PrepareFailed | None = None
        self._commit_lsn = 0
        self._commit_ts = 0
        self._applied_lsn = 0      # highest applied at setup: older may be a replay
        self._horizon_lsn = 0      # durable: everything up to it is done here
        self._replay = None        # what to answer for an already applied transaction
        self._key_lsn = 0          # end LSN the transaction being applied is known by
        # Consecutive inserts into one table are applied together: a
        # multi-row INSERT in the batch, or one COPY when there are many.
        self._copy_rel: po.Relation | None = None
        self._copy_rows: list = []
        self._copy_bytes = 0
        # Statements not sent yet, with what to say if one that must touch
        # exactly one row does not: a transaction costs one round trip per
        # BATCH_BYTES of statements, plus one for its PREPARE or COMMIT.
        self._batch: list[str] = []
        self._checks: list[tuple[int, str]] = []
        self._batch_bytes = 0

    async def setup(self) -> None:
        c = self.conn
        row = await (await c.execute("SELECT roident FROM pg_replication_origin WHERE roname = %s",
                                     (self.origin,))).fetchone()
        if row is None:
            await c.execute("SELECT pg_replication_origin_create(%s)", (self.origin,))
        if self.catchup_for is None:
            await c.execute("SELECT pg_replication_origin_session_setup(%s)", (self.origin,))
            self._session_origin = self.origin
        await c.execute(f"SET lock_timeout = {int(self.lock_timeout_ms)}")
        await c.execute("SET check_function_bodies = off")
        await c.execute("SET session_replication_role = replica")
        await c.execute("SET standard_conforming_strings = on")   # see _quote
        # this session's values of the settings DDL is run with (restored
        # after each statement: the rows after it are applied with these)
        self._settings = (await (await c.execute(
            "SELECT json_object_agg(n, current_setting(n)) FROM unnest(%s::text[]) n",
            (list(DDL_SETTINGS),))).fetchone())[0]
        self._always: dict[int, tuple[po.Relation, frozenset]] = {}
        if not (await (await c.execute("SELECT to_regclass('mtm.apply_progress') IS NOT NULL"))
                .fetchone())[0]:
            try:   # init-cluster makes it; a bare server (tests) gets it here
                await c.execute("CREATE SCHEMA IF NOT EXISTS mtm")
                await c.execute(APPLIED_TABLE_SQL)
            except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable,
                    psycopg.errors.DuplicateSchema):
                pass    # another applier made it at the same time
        if not (await (await c.execute(
                "SELECT to_regprocedure('mtm.apply_check(text,text,int,pg_lsn)') IS NOT NULL"))
                .fetchone())[0]:
            try:   # init-cluster makes it; a node set up by an older mmproxy gets it here
                await c.execute(APPLY_CHECK_SQL)
            except (psycopg.errors.UniqueViolation, psycopg.errors.InternalError):
                pass    # another applier made it at the same time ("tuple concurrently updated")
        self._applied_lsn = await self.applied_lsn()
        row = await (await c.execute("SELECT lsn FROM mtm.apply_progress WHERE peer = %s",
                                     (self.peer_id,))).fetchone()
        self._horizon_lsn = po.parse_lsn(row[0]) if row else 0

    @property
    def idle(self) -> bool:
        """Between transactions."""
        return not self._in_txn and self._replay is None and self._pending is None

    @property
    def horizon_lsn(self) -> int:
        return self._horizon_lsn

    async def applied_lsn(self) -> int:
        """The highest LSN of the peer applied here by any applier: the
        progress of its replication origins, and - belt and braces - the
        highest committed transaction of it recorded in ``mtm.applied``
        (a catch-up records what it applied there too)."""
        base = origin_name(self.peer_id)
        row = await (await self.conn.execute(
            "SELECT greatest((SELECT max(remote_lsn) FROM pg_replication_origin_status s "
            "JOIN pg_replication_origin o ON o.roident = s.local_id "
            "WHERE o.roname = %s OR o.roname LIKE %s), "
            "(SELECT max(lsn) FROM mtm.applied WHERE peer = %s))",
            (base, base.replace("_", "\\_") + "\\_%", self.peer_id))).fetchone()
        return po.parse_lsn(row[0]) if row and row[0] else 0

    def _applied_key(self, gid: str | None, end: int) -> str:
        return gid if gid is not None else f"{self._src}/{po.lsn_str(end)}"

    def commit_plain(self) -> None:
        """Catching up: the next prepared transaction is known to commit
        (its COMMIT PREPARED was read): apply and COMMIT it as one plain
        transaction, recorded under its gid; if it is prepared here already,
        COMMIT PREPARED it."""
        self._plain = True

    def refuse_unknown(self) -> None:
        """The next prepared transaction is of an earlier generation than
        this node's: answer for it if it was applied here, else ``Refused``."""
        self._refuse_next = True

    def stop_catchup(self) -> None:
        """The donor's stream carries only its own transactions from here on
        (its marker of a generation this node joined): apply as usual."""
        self.catchup_for = None

    async def _replay_answer(self, gid: str | None, end: int):
        """A transaction at or below the highest applied LSN: applied
        already (the answer to give for it), or None to apply it."""
        if end <= self._horizon_lsn:
            # Done here: committed, rolled back, or prepared and voted for.
            # A coordinator still waiting for that vote retransmits its
            # VoteRequest, answered from the database (node.py _protocol).
            return Skipped(gid)
        # The durable horizon is read again, in the same snapshot as the
        # look-up: the node advances it and trims mtm.applied below it in
        # one transaction, possibly after this applier was set up, so a
        # row missing here may be one trimmed as done.
        prepared, applied, horizon = await (await self.conn.execute(
            REPLAY_STATE_SQL, (gid or "", self._applied_key(gid, end), self._src))).fetchone()
        if horizon is not None:
            self._horizon_lsn = max(self._horizon_lsn, po.parse_lsn(horizon))
            if end <= self._horizon_lsn:
                return Skipped(gid)
        if gid is not None and prepared:
            return Prepared(gid)
        if applied:
            return Finished(gid, True, False, here=gid is not None)
        return None

    # -- the message loop --------------------------------------------------------

    async def apply(self, msg) -> Prepared | PrepareFailed | Finished | Skipped | None:
        cls = msg.__class__
        if cls is po.Relation:
            self.relations[msg.relid] = msg
            return None
        if self._pending is not None:
            if cls is po.Origin:
                self._pending_origin = (origin_node(msg.name), msg.origin_lsn)
                return None
            if cls is po.Message and msg.prefix == PLAIN_PREFIX \
                    and self._pending.__class__ is po.Begin:
                # a prepared transaction the donor committed plainly, its gid
                self._pending_gid = msg.content.decode("utf-8", "replace")
                return None
            await self._begin_catchup()
            if self._replay is not None and cls is not po.Commit and cls is not po.Prepare:
                return None
        if cls is po.Type or cls is po.Origin:
            return None
        if (cls is po.Begin or cls is po.BeginPrepare) and self.catchup_for is not None:
            if self._in_txn or self._replay is not None:
                raise ApplyError(f"BEGIN inside a transaction from node {self.peer_id}")
            self._pending, self._pending_origin = msg, None
            return None
        if cls is po.Begin or cls is po.BeginPrepare:
            self._src = self.peer_id
            end = msg.final_lsn if cls is po.Begin else msg.end_lsn
            gid = getattr(msg, "gid", None)
            if self._refuse_next and gid is not None:
                self._refuse_next = False
                answer = await self._replay_answer(gid, end)
                self._replay = answer if answer is not None else Refused(gid)
                return None
            if end <= max(self._applied_lsn, self._horizon_lsn):
                self._replay = await self._replay_answer(gid, end)
                if self.log is not None:
                    self.log.debug("apply_replay", peer=self.peer_id, gid=gid,
                                   end=po.lsn_str(end), horizon=po.lsn_str(self._horizon_lsn),
                                   applied=po.lsn_str(self._applied_lsn),
                                   answer=type(self._replay).__name__)
                if self._replay is not None:
                    return None
            elif self.log is not None:
                self.log.debug("apply_fresh", peer=self.peer_id, gid=gid, end=po.lsn_str(end),
                               applied=po.lsn_str(self._applied_lsn))
            await self._begin(gid)
            self._use_origin(self.origin)
            self._key_lsn = end
            self._commit_lsn = end
            self._commit_ts = msg.commit_ts if cls is po.Begin else msg.prepare_ts
            return None
        if self._replay is not None:
            if cls is po.Commit or cls is po.Prepare:
                answer, self._replay = self._replay, None
                if answer.__class__ is _FinishHere:
                    return await self._finish_prepared(answer.gid, True, 0, 0)
                return answer
            return None
        if cls is po.Commit or cls is po.Prepare:
            if not self._in_txn:
                # Never COMMIT or PREPARE what we did not begin: PostgreSQL
                # would only warn, and we would vote for a transaction we
                # do not have.
                raise ApplyError(f"{cls.__name__} without a BEGIN from node {self.peer_id}")
            if cls is po.Prepare and self._plain_gid is not None:
                return await self._commit_plain(msg)
            return await (self._commit(msg) if cls is po.Commit else self._prepare(msg))
        if cls is po.CommitPrepared:
            return await self._finish_prepared(msg.gid, True, msg.end_lsn, msg.commit_ts)
        if cls is po.RollbackPrepared:
            return await self._finish_prepared(msg.gid, False, msg.rollback_end_lsn,
                                               msg.rollback_ts)
        if not self._in_txn:
            if cls is po.Message and not msg.transactional:
                return None
            raise ApplyError(f"{cls.__name__} outside a transaction from node {self.peer_id}")
        if self._failed is not None:
            return None  # skipping the rest of a failed transaction
        try:
            if cls is po.Insert:
                await self._buffer_insert(msg)
            else:
                await self._flush_inserts()
                await self._apply_change(msg)
            if self._batch_bytes >= BATCH_BYTES:
                await self._send_batch()
        except psycopg.Error as e:
            done = await self._done_here(e)
            if done is not None:
                self._replay = done         # the rest of it is not applied
                return None
            await self._fail(e.sqlstate or "XX000", str(e).strip())
        except _MissingRow as e:
            await self._fail("02000", str(e))
        return None

    async def _begin_catchup(self) -> None:
        """Decide a catch-up transaction once its origin is known (the
        ORIGIN message, or none: the donor's own): this node's own - never
        applied back; known here - the answer for it; else apply it under
        its origin's replication origin."""
        msg, origin, named = self._pending, self._pending_origin, self._pending_gid
        self._pending = self._pending_origin = self._pending_gid = None
        prepared_txn = msg.__class__ is po.BeginPrepare
        gid = msg.gid if prepared_txn else named
        end = msg.end_lsn if prepared_txn else msg.final_lsn
        src, key_lsn = origin if origin is not None else (self.peer_id, end)
        # committed as one plain transaction here: one known to commit
        # (look-ahead), or one the donor committed so (mtm_plain)
        plain, self._plain = (self._plain and prepared_txn) or named is not None, False
        if src == self.catchup_for or (gid is not None and cp_owner(gid) == self.catchup_for):
            # our own transaction: we have it (prepared or finished), or rolled it back
            self._replay = _FinishHere(gid) if plain else Skipped(gid)
            return
        self._src = src
        if self.log is not None:
            self.log.debug("apply_catchup", peer=self.peer_id, origin=src, gid=gid,
                           lsn=po.lsn_str(key_lsn), plain=plain)
        await self._begin(gid)
        # done here already? (mtm.apply_check raises DONE_HERE: _done_here)
        self._add(f"SELECT mtm.apply_check({_quote(gid or '')}, "
                  f"{_quote(self._applied_key(gid, key_lsn))}, {int(src)}, "
                  f"'{po.lsn_str(key_lsn)}')")
        if plain:
            # first in it: this node, as a donor later, forwards it by it
            self._add(f"SELECT pg_logical_emit_message(true, '{PLAIN_PREFIX}', "
                      f"{_quote(gid)})")
        self._plain_gid = gid if plain and prepared_txn else None
        self._check_plain = plain
        self._use_origin(worker_origin(src, self.worker))
        self._key_lsn = key_lsn
        self._commit_lsn = key_lsn
        self._commit_ts = msg.commit_ts if not prepared_txn else msg.prepare_ts

    async def _done_here(self, e: psycopg.Error):
        """``mtm.apply_check`` found the catch-up transaction done here
        already (always checked: the donor's stream interleaves every
        origin, so no position of ours says what it holds): roll back what
        was begun and give the answer for it; None for any other error."""
        if e.sqlstate != DONE_HERE:
            return None
        why = e.diag.message_primary or ""
        gid = self._gid
        await self._rollback()
        self._in_txn = False
        self._plain_gid = None
        if why == "horizon":
            return Skipped(gid)
        if why == "prepared":
            return _FinishHere(gid) if self._check_plain else Prepared(gid)
        return Finished(gid, True, False, here=gid is not None)

    def _use_origin(self, name: str) -> None:
        """Have this transaction recorded under replication origin ``name``."""
        if self._session_origin == name:
            return
        if self._session_origin == "?":
            self._add("SELECT pg_replication_origin_session_reset() "
                      "WHERE pg_replication_origin_session_is_setup()")
        elif self._session_origin is not None:
            self._add("SELECT pg_replication_origin_session_reset()")
        self._add(f"SELECT pg_replication_origin_session_setup({_quote(name)})")
        self._session_origin = name

    def _end_origin(self) -> None:
        """After a catch-up transaction: hold no origin between transactions
        (the origin's own stream may start applying with it)."""
        if self.catchup_for is not None and self._session_origin is not None:
            self._add("SELECT pg_replication_origin_session_reset()")
            self._session_origin = None

    def _add(self, text: str, check: str | None = None) -> None:
        if check is not None:
            self._checks.append((len(self._batch), check))
        self._batch.append(text)
        self._batch_bytes += len(text)

    async def _send_batch(self) -> None:
        """Run the statements collected so far as one query; raise the
        first error, or _MissingRow for a change that found no row."""
        batch, checks = self._batch, self._checks
        self._batch, self._checks, self._batch_bytes = [], [], 0
        if not batch:
            return
        cur = await self.conn.execute(";\n".join(batch))
        if not checks:
            return
        counts = [cur.rowcount]
        while cur.nextset():
            counts.append(cur.rowcount)
        for i, message in checks:
            if counts[i] != 1:
                raise _MissingRow(message)

    async def _buffer_insert(self, msg: po.Insert) -> None:
        rel = self._rel(msg.relid)
        if self._copy_rel is not None and self._copy_rel.relid != rel.relid:
            await self._flush_inserts()
        self._copy_rel = rel
        row = [self._text(v) for v in msg.new.values]
        self._copy_rows.append(row)
        self._copy_bytes += sum(len(v) for v in row if v is not None)
        if len(self._copy_rows) >= COPY_BATCH_ROWS or self._copy_bytes >= COPY_BATCH_BYTES:
            await self._flush_inserts()

    async def _flush_inserts(self) -> None:
        rel, rows = self._copy_rel, self._copy_rows
        if not rows:
            return
        self._copy_rel, self._copy_rows, self._copy_bytes = None, [], 0
        table, cols = _names(rel)
        if not cols:        # a table with no columns: n empty rows
            self._add(f"INSERT INTO {table} SELECT FROM generate_series(1, {len(rows)})")
            return
        if len(rows) <= INSERT_BATCH_ROWS:
            self._add(f"INSERT INTO {table} ({cols}) OVERRIDING SYSTEM VALUE VALUES " + ", ".join(
                "(" + ", ".join(map(_quote, row)) + ")" for row in rows))
            return
        await self._send_batch()
        async with self.conn.cursor().copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
            for row in rows:
                await copy.write_row(row)

    async def _begin(self, gid: str | None) -> None:
        if self._in_txn:
            raise ApplyError(f"BEGIN inside a transaction from node {self.peer_id}")
        self._add("BEGIN")
        self._in_txn = True
        self._gid = gid
        self._failed = None

    def _record_applied(self, gid: str | None) -> str:
        return (f"INSERT INTO mtm.applied (key, peer, lsn) VALUES "
                f"({_quote(self._applied_key(gid, self._key_lsn))}, {int(self._src)}, "
                f"'{po.lsn_str(self._key_lsn)}') ON CONFLICT (key) DO NOTHING")

    def _origin_position(self) -> str:
        return (f"SELECT pg_replication_origin_xact_setup('{po.lsn_str(self._commit_lsn)}', "
                f"to_timestamp({self._commit_ts / 1e6 + 946684800!r}))")

    async def _rollback(self) -> None:
        self._copy_rel, self._copy_rows, self._copy_bytes = None, [], 0
        self._batch, self._checks, self._batch_bytes = [], [], 0
        if self.catchup_for is not None:
            self._session_origin = "?"     # the batch may or may not have reset it
        if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            await self.conn.execute("ROLLBACK")

    async def _fail(self, sqlstate: str, message: str) -> None:
        if self._gid is None:
            await self._rollback()
            self._in_txn = False
            raise ApplyError(f"applying a committed transaction of node {self.peer_id} "
                             f"failed: {sqlstate} {message}")
        self._failed = PrepareFailed(self._gid, sqlstate, message)
        await self._rollback()
        # Stay "in" the transaction until its Prepare message arrives.

    async def _commit(self, msg: po.Commit) -> Finished:
        """A plain commit: the peer's own (a marker), or in a donor's stream
        another origin's transaction a catch-up there committed plainly,
        under its gid (``mtm_plain``)."""
        gid = self._gid
        if self._failed is not None:
            failed, self._failed = self._failed, None
            self._in_txn = False
            raise ApplyError(f"applying {gid}, committed, from node {self.peer_id} failed: "
                             f"{failed.sqlstate} {failed.message}")
        if gid is None:
            self._commit_lsn, self._commit_ts = msg.end_lsn, msg.commit_ts
        else:       # the origin's position of it, as for a PREPARE (see _prepare)
            self._commit_lsn, self._commit_ts = self._key_lsn, msg.commit_ts
        try:
            await self._flush_inserts()
            self._add(self._record_applied(gid))
            self._add(self._origin_position())
            self._add("COMMIT")
            self._end_origin()
            await self._send_batch()
        except psycopg.Error as e:
            done = await self._done_here(e)
            if done.__class__ is _FinishHere:
                return await self._finish_prepared(gid, True, 0, 0)
            if done is not None:
                return done
            await self._rollback()
            self._in_txn = False
            raise ApplyError(f"applying a committed transaction of node {self.peer_id} "
                             f"failed: {e.sqlstate} {str(e).strip()}") from None
        except _MissingRow as e:
            await self._rollback()
            self._in_txn = False
            raise ApplyError(f"applying a committed transaction of node {self.peer_id} "
                             f"failed: 02000 {e}") from None
        self._in_txn = False
        return Finished(gid, True, True, here=gid is not None)

    async def _commit_plain(self, msg: po.Prepare) -> Finished | PrepareFailed:
        """A catch-up transaction known to commit: COMMIT instead of
        PREPARE, under its gid in ``mtm.applied``."""
        gid, self._plain_gid = self._plain_gid, None
        self._in_txn = False
        if self._failed is not None:
            failed, self._failed = self._failed, None
            return failed
        # the origin's position of its PREPARE, as a PREPARE applied here
        # would have recorded it
        self._commit_lsn, self._commit_ts = self._key_lsn, msg.prepare_ts
        try:
            await self._flush_inserts()
            self._add(self._record_applied(gid))
            self._add(self._origin_position())
            self._add("COMMIT")
            self._end_origin()
            await self._send_batch()
        except psycopg.Error as e:
            done = await self._done_here(e)
            if done.__class__ is _FinishHere:
                return await self._finish_prepared(gid, True, 0, 0)
            if done is not None:
                return done
            await self._rollback()
            return PrepareFailed(gid, e.sqlstate or "XX000", str(e).strip())
        except _MissingRow as e:
            await self._rollback()
            return PrepareFailed(gid, "02000", str(e))
        return Finished(gid, True, True, here=True)

    async def _prepare(self, msg: po.Prepare) -> Prepared | PrepareFailed:
        self._in_txn = False
        if self._failed is not None:
            failed, self._failed = self._failed, None
            return failed
        # The origin's own position of it (the same as the stream's, except
        # in a donor's stream, where it is the origin's, not the donor's):
        # an origin position from another node's WAL made this origin's
        # progress lie, and its own stream then applied again what the
        # catch-up had committed (found by the restart-safety rounds).
        self._commit_lsn, self._commit_ts = self._key_lsn, msg.prepare_ts
        prepare = "PREPARE TRANSACTION " + _quote(msg.gid)
        try:
            await self._flush_inserts()
            self._add(self._record_applied(msg.gid))
            self._add(self._origin_position())
            self._add(prepare)
            self._end_origin()
            await self._send_batch()
        except psycopg.errors.DuplicateObject:
            # 42710: this gid is prepared here already - by an applier of a
            # previous life of this node that finished it after we read the
            # positions. It is the same transaction: vote for it.
            await self._rollback()
            return Prepared(msg.gid)
        except psycopg.Error as e:
            done = await self._done_here(e)
            if done is not None:
                return done
            # A failed PREPARE rolls the transaction back (PG15-FACTS); a
            # failure before it leaves the transaction aborted.
            await self._rollback()
            return PrepareFailed(msg.gid, e.sqlstate or "XX000", str(e).strip())
        except _MissingRow as e:
            # The checks are read after the batch ran, PREPARE included.
            await self._rollback()
            await self.conn.execute("ROLLBACK PREPARED " + _quote(msg.gid))
            return PrepareFailed(msg.gid, "02000", str(e))
        return Prepared(msg.gid)

    async def _finish_prepared(self, gid: str, commit: bool, end_lsn: int, ts: int) -> Finished:
        # No origin position: the PREPARE recorded this transaction's, and
        # the sender knows a COMMIT/ROLLBACK PREPARED by its gid. One round
        # trip; a gid not prepared here is left alone.
        verb = "COMMIT PREPARED" if commit else "ROLLBACK PREPARED"
        try:
            await self.conn.execute(verb + " " + _quote(gid))
        except (psycopg.errors.UndefinedObject,        # not prepared here
                psycopg.errors.FeatureNotSupported):   # prepared in another database
            return Finished(gid, commit, False)
        return Finished(gid, commit, True, here=True)

    # -- row changes --------------------------------------------------------------

    def _rel(self, relid: int) -> po.Relation:
        rel = self.relations.get(relid)
        if rel is None:
            raise ApplyError(f"change for unknown relation {relid} from node {self.peer_id}")
        return rel

    @staticmethod
    def _text(v) -> str | None:
        return None if v is None else v.decode("utf-8")

    def _where(self, rel: po.Relation, tup: po.Tuple, whole_row: bool) -> str:
        conds = []
        for col, v in zip(rel.columns, tup.values):
            if not (whole_row or col.is_key) or v is po.UNCHANGED_TOAST:
                continue
            if v is None:
                conds.append(f"{quote_ident(col.name)} IS NULL")
            else:
                conds.append(f"{quote_ident(col.name)} = {_literal(v)}")
        if not conds:
            raise ApplyError(f"table {rel.namespace}.{rel.name} has no replica identity: "
                             "UPDATE/DELETE cannot be replicated")
        return " AND ".join(conds)

    def _locate(self, rel: po.Relation, tup: po.Tuple, whole_row: bool) -> str:
        """A WHERE clause matching exactly one row (the first, for
        REPLICA IDENTITY FULL tables, as PostgreSQL's own apply does)."""
        where = self._where(rel, tup, whole_row)
        if whole_row:
            return f"ctid = (SELECT ctid FROM {_names(rel)[0]} WHERE {where} LIMIT 1)"
        return where

    async def _apply_change(self, msg) -> None:
        cls = msg.__class__
        if cls is po.Insert:
            rel = self._rel(msg.relid)
            table, cols = _names(rel)
            if not cols:
                self._add(f"INSERT INTO {table} DEFAULT VALUES")
                return
            self._add(f"INSERT INTO {table} ({cols}) OVERRIDING SYSTEM VALUE VALUES ("
                      + ", ".join(map(_literal, msg.new.values)) + ")")
        elif cls is po.Update:
            rel = self._rel(msg.relid)
            full = rel.replica_identity == "f"
            old = msg.old if msg.old is not None else msg.new
            always = await self._always_columns(rel)
            where = self._locate(rel, old, full and msg.old is not None)
            check = (f"row to update not found in {rel.namespace}.{rel.name} "
                     f"(change from node {self.peer_id})")
            if always and msg.old is not None and any(
                    col.name in always and o is not po.UNCHANGED_TOAST and o != v
                    for col, o, v in zip(rel.columns, msg.old.values, msg.new.values)):
                # a GENERATED ALWAYS identity value changed (UPDATE ... SET
                # id = DEFAULT): only an INSERT may set one
                table, cols = _names(rel)
                self._add(f"WITH d AS (DELETE FROM {table} WHERE {where} RETURNING 1) "
                          f"INSERT INTO {table} ({cols}) OVERRIDING SYSTEM VALUE SELECT "
                          + ", ".join(map(_literal, msg.new.values)) + " FROM d", check=check)
                return
            sets = ", ".join(f"{quote_ident(col.name)} = {_literal(v)}"
                             for col, v in zip(rel.columns, msg.new.values)
                             if v is not po.UNCHANGED_TOAST and col.name not in always)
            if not sets:    # only identity columns, unchanged: the row must exist
                self._add(f"SELECT 1 FROM {_names(rel)[0]} WHERE {where} FOR UPDATE", check=check)
                return
            self._add(f"UPDATE {_names(rel)[0]} SET {sets} WHERE {where}", check=check)
        elif cls is po.Delete:
            rel = self._rel(msg.relid)
            self._add(f"DELETE FROM {_names(rel)[0]} WHERE "
                      + self._locate(rel, msg.old, msg.old_kind == "O"),
                check=f"row to delete not found in {rel.namespace}.{rel.name} "
                      f"(change from node {self.peer_id})")
        elif cls is po.Truncate:
            q = "TRUNCATE " + ", ".join(_names(self._rel(r))[0] for r in msg.relids)
            if msg.restart_identity:
                q += " RESTART IDENTITY"
            # Always CASCADE: pgoutput lists the partitions truncated, not
            # their partitioned tables, and a foreign key declared on a
            # partitioned table makes PostgreSQL refuse that list without
            # it. Nothing more is emptied: the origin's TRUNCATE succeeded,
            # so every table referencing these was truncated there too.
            self._add(q + " CASCADE")
        elif cls is po.Message:
            if msg.prefix == DDL_PREFIX:
                await self._send_batch()
                await self._apply_ddl(json.loads(msg.content))
            # other mtm_* messages (mtm_prepare) only mark the transaction
        else:
            raise ApplyError(f"unexpected {cls.__name__} from node {self.peer_id}")

    async def _apply_ddl(self, ddl: dict) -> None:
        c = self.conn
        text = ddl["sql"]
        try:
            n = len(pglast.parse_sql(text))
        except pglast.parser.ParseError as e:
            raise psycopg.errors.SyntaxError(f"DDL from node {self.peer_id} does not parse: {e}")
        if n != 1:
            raise psycopg.errors.FeatureNotSupported(
                f"DDL from node {self.peer_id} holds {n} statements, not one: refused")
        await c.execute("SAVEPOINT mtm_ddl")
        await c.execute("SELECT set_config('search_path', %s, true)", (ddl.get("search_path", ""),))
        settings = ddl.get("settings")
        if settings:
            await c.execute("SELECT set_config(key, value, true) FROM json_each_text(%s::json)",
                            (json.dumps(settings),))
        # The origin checked the function bodies it was asked to (with its
        # own check_function_bodies); here a body may name what exists only
        # in the origin's session (a temporary table or sequence), so it is
        # not checked again, as pg_restore does not.
        await c.execute("SET LOCAL check_function_bodies = off")
        role = ddl.get("role")
        superuser = True
        if role:
            row = await (await c.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s",
                                         (role,))).fetchone()
            if row is None:
                raise psycopg.errors.UndefinedObject(
                    f"role {role!r} of DDL from node {self.peer_id} does not exist here")
            superuser = row[0]
        if superuser:
            if role:
                await c.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
            await c.execute(text)
            if role:
                await c.execute("RESET ROLE")
        else:
            # A function of the role's, SECURITY DEFINER: inside it the
            # statement runs as the role and cannot leave it.
            fn = f"mtm.apply_ddl_{self.conn.info.backend_pid}"
            await c.execute(f"CREATE FUNCTION {fn}(text) RETURNS void LANGUAGE plpgsql "
                            "SECURITY DEFINER AS 'BEGIN EXECUTE $1; END'")
            await c.execute(sql.SQL("ALTER FUNCTION {}(text) OWNER TO {}").format(
                sql.SQL(fn), sql.Identifier(role)))
            await c.execute(f"SELECT {fn}(%s)", (text,))
            # (DROP OWNED BY the role drops it too)
            await c.execute(f"DROP FUNCTION IF EXISTS {fn}(text)")
        # back to the applier's own settings for the rows that follow
        await c.execute("SELECT set_config(key, value, true) FROM json_each_text(%s::json)",
                        (json.dumps(self._settings),))
        await c.execute("RELEASE SAVEPOINT mtm_ddl")

    async def _always_columns(self, rel: po.Relation) -> frozenset:
        """The table's GENERATED ALWAYS identity columns, which an UPDATE
        may not set (looked up once per Relation message)."""
        hit = self._always.get(rel.relid)
        if hit is not None and hit[0] is rel:
            return hit[1]
        rows = await (await self.conn.execute(
            "SELECT a.attname FROM pg_attribute a WHERE a.attrelid = %s::regclass "
            "AND a.attidentity = 'a' AND NOT a.attisdropped",
            (_names(rel)[0],))).fetchall()
        cols = frozenset(r[0] for r in rows)
        self._always[rel.relid] = (rel, cols)
        return cols


class _MissingRow(Exception):
    pass


@dataclass(frozen=True)
class _FinishHere:
    """A plain-committed catch-up transaction that is this node's own, or
    prepared here already: COMMIT PREPARED it (if prepared) at its end."""
    gid: str


def origin_node(name: str) -> int | None:
    """The node a replication origin name ``mtm_node_<id>[_k]`` stands for."""
    parts = name.split("_")
    if len(parts) >= 3 and parts[0] == "mtm" and parts[1] == "node" and parts[2].isdigit():
        return int(parts[2])
    return None


def cp_owner(gid: str) -> int | None:
    """The node that coordinates an mmproxy gid (``MTM-<node>-...``)."""
    if gid.startswith("MTM-"):
        head = gid[4:].split("-", 1)[0]
        if head.isdigit():
            return int(head)
    return None


# SQL text is built here rather than with psycopg.sql: composing a few
# hundred thousand Composable objects a second was a tenth of the proxy's
# CPU. The appliers run with standard_conforming_strings on, so a literal
# needs only its quotes doubled; pgoutput sends values as text, and an
# untyped literal takes its column's type.

def _quote(text: str | None) -> str:
    return "NULL" if text is None else quote_literal(text)


def _literal(v: bytes | None) -> str:
    """A pgoutput text value as an SQL literal."""
    return "NULL" if v is None else quote_literal(v.decode("utf-8"))


_NAMES: dict[int, tuple[po.Relation, tuple[str, str]]] = {}


def _names(rel: po.Relation) -> tuple[str, str]:
    """The quoted table name and column list of ``rel``, made once per
    Relation message (a new one for an altered table replaces it)."""
    hit = _NAMES.get(id(rel))
    if hit is not None and hit[0] is rel:
        return hit[1]
    if len(_NAMES) > 10000:
        _NAMES.clear()
    # pgoutput writes pg_catalog's name as an empty string (logicalproto.c
    # logicalrep_write_namespace)
    names = (quote_ident(rel.namespace or "pg_catalog") + "." + quote_ident(rel.name),
             ", ".join(quote_ident(c.name) for c in rel.columns))
    _NAMES[id(rel)] = (rel, names)
    return names
