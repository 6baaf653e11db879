"""The cluster path of one client session: PostgreSQL's transaction
semantics, with every commit turned into the cluster's commit protocol
(pure; no I/O).

``Session`` hands this class every client message and every backend message
of a session in cluster mode, in order. It keeps the rules:

- **Never reorder.** Client messages are handled strictly in order. When
  the proxy must act before one (open a transaction, run the commit
  protocol), that message and every later one wait in ``inq`` until it is
  done. The proxy may hold, never overtake. Its own statements are
  interleaved in the backend's input, and ``BackendTracker`` says which
  answer belongs to whom (proxy/txstate.py).
- **Follow the client's own transaction boundaries**, as postgres.c and
  xact.c do, in every protocol form. Two views of the block state:
  ``st`` is PostgreSQL's, driven by the answers in their order, as xact.c's
  blockState moves (I: none; S: an implicit transaction in progress; SA: one
  that failed, ignored until Sync; T: a transaction block; E: a failed one),
  with ``ours`` telling a block the proxy began; ``blk`` is the client's
  view after everything forwarded, predicted as messages go out assuming
  they succeed (I: none, R: implicit reads so far, W: an implicit
  transaction the proxy made a block of its own before its first statement
  that may write, so that it can PREPARE it, T: the client's block, E: its
  failed block), and set from ``st`` whenever nothing is outstanding. An
  error can only make a prediction wrong within its own batch, where the
  backend then ignores everything up to Sync, the proxy's own statements
  included; every decision that needs more waits for the answers. Commit points: COMMIT in T;
  the end of an implicit transaction (Sync, the end of a simple Query, a
  COMMIT inside one); PREPARE TRANSACTION. At each, the transaction is
  checked (did it write replicated data?) and, if so, prepared and run
  through the cluster's commit protocol (``RunCommit``); the client then
  gets exactly what PostgreSQL would have sent: for a simple Query the
  last statement's CommandComplete only after the commit (postgres.c
  commits before EndCommand), for the extended protocol CommandComplete at
  Execute and the commit's error, if any, at Sync.
- **Nothing done is shown before it is committed.** A write whose commit
  fails is answered with the error only (simple Query), or with the error at
  Sync (extended protocol, as PostgreSQL does).
- **The proxy's own statements never disturb the client's**: inside an
  extended-protocol exchange they use a statement and a portal named
  ``mtm_proxy`` (a simple Query would destroy the client's unnamed
  statement and portal), followed by a Flush; an error in one is followed
  by a Sync of the proxy's own. During a client's simple Query they are
  simple Queries (that Query destroys the unnamed ones anyway).
- A multi-statement query string with transaction commands or DDL is run
  statement by statement with PostgreSQL's implicit-block semantics
  (xact.c TBLOCK_IMPLICIT_INPROGRESS): the statements outside explicit
  blocks form one transaction, COMMIT and ROLLBACK inside it end it with
  PostgreSQL's warning, SAVEPOINT inside it fails as it does there.
- NOTIFY, LISTEN and UNLISTEN inside a transaction are answered by the
  proxy and run after the transaction commits (PostgreSQL cannot PREPARE a
  transaction that ran one; it would deliver them at commit too).

Programs (the ``_p_*`` generators) yield what they wait for: ``("idle",)``
(every answer in), ``("known",)`` (no Sync pending: the block state at the
start of the current batch is exact), ``("call", call)``, ``("op", op)``,
``("outcome",)``; the session resumes them as answers arrive.
"""
from __future__ import annotations

from collections import deque

from common.sql import to_conforming
from replication.commit import USER_GID_SEP

from . import intercept, wire
from .txstate import BackendTracker, Op
from .wire import Message

CLIENT = "client"
I, R, W, T, E = "I", "R", "W", "T", "E"
_STATUS_BLK = {b"I": I, b"T": T, b"E": E}
MTM = "mtm_proxy"           # the proxy's own statement and portal

_Q, _P, _B, _D, _E, _C, _S, _H, _F, _X = (ord(c) for c in "QPBDECSHFX")
_Z, _ERR, _NOTICE, _CC, _PSTATUS, _COPY_IN, _DATA = (ord(c) for c in "ZENCSGD")
FEATURE_NOT_SUPPORTED = "0A000"
NOT_SERVING = "57P03"         # the node is not ONLINE (or has no read lease)
NO_ACTIVE_TXN = "25P01"
ACTIVE_TXN = "25001"
_STMT_CACHE_MAX = 10000

_NO_TXN_WARNING = wire.error_response(NO_ACTIVE_TXN, "there is no transaction in progress",
                                      severity="WARNING", notice=True)
_DEFERRED_TAGS = {"notify": "NOTIFY", "listen": "LISTEN", "unlisten": "UNLISTEN"}
PROCEDURE_COMMIT_MESSAGE = (
    "a procedure that runs COMMIT or ROLLBACK cannot be called through a cluster node "
    "outside a transaction block: every commit must go through the cluster's commit "
    "protocol, which a procedure's inner COMMIT bypasses; nothing it did was committed")


class Call:
    """One statement of the proxy's own and its answer."""
    __slots__ = ("ops", "rows", "tag", "error", "status", "skipped", "relay_error")

    def __init__(self, relay_error: bool = False):
        self.ops: list[Op] = []
        self.rows: list = []
        self.tag: bytes | None = None
        self.error: bytes | None = None     # ErrorResponse body
        self.status: bytes | None = None
        self.skipped = False                 # the backend ignored it (an earlier error)
        # fire-and-forget: an error in it is the client's to hear
        self.relay_error = relay_error

    @property
    def done(self) -> bool:
        return all(op.finished for op in self.ops)


class Tok:
    """How to relay the answers to one client op."""
    __slots__ = ("swallow_z", "hold_cc", "held", "drop", "prepend", "procedure", "status",
                 "errored", "seen")

    def __init__(self, *, swallow_z=False, hold_cc=False, drop=(), prepend=b"",
                 procedure=False):
        self.swallow_z = swallow_z      # the program answers ReadyForQuery itself
        self.hold_cc = hold_cc          # keep the last CommandComplete until the commit
        self.held: bytes | None = None
        self.drop = frozenset(drop)     # notices (SQLSTATEs) not to relay
        self.prepend = prepend          # sent before the op's first answer
        self.procedure = procedure      # a CALL the proxy wrapped: 2D000 means an inner COMMIT
        self.status: bytes | None = None
        self.errored = False
        self.seen = False


def _sqlstate(body: bytes) -> bytes:
    i = body.find(b"C")
    while i != -1:
        if i == 0 or body[i - 1] == 0:
            j = body.index(b"\0", i)
            return body[i + 1:j]
        i = body.find(b"C", i + 1)
    return b""


def _error_body(err: bytes) -> bytes:
    return err[5:]


class ClusterPath:
    def __init__(self, session):
        self.s = session
        self.trk = BackendTracker()
        self.inq: deque = deque()
        self.prog = None
        self.wait = None
        self.blk = I
        self.st = I                  # PostgreSQL's block state, from the answers
        self.ours = False            # the backend's current block is one the proxy began
        self.began_in_batch = False  # the proxy began a block since the last Sync
        self.since_sync = 0          # client messages forwarded since the last Sync/Query
        self.stmts: dict[str, intercept.Plan] = {}
        self.portals: dict[str, str] = {}
        self.plans: dict[str, intercept.Plan] = {}
        self.unflushed = False
        self.cout: list = []
        self.sout: list = []
        self.after_commit: list[str] = []
        self.uses_temp = False
        self.client_copy: Op | None = None
        self.drain_error: str | None = None
        self.framer_all = False
        self.wounding = False        # a wound_idle program runs

    # -- entry points --------------------------------------------------------------

    def on_client(self, items: list) -> bytes | None:
        for it in items:
            if self.client_copy is not None and not self.inq and it.__class__ is not Message:
                self.sout.append(it)        # COPY data for the backend's current COPY
                continue
            self.inq.append(it)
        self._pump()
        return self._take_out()

    def on_server(self, items: list) -> bytes | None:
        for it in items:
            if it.__class__ is not Message:
                op = self.trk.pending[0] if self.trk.pending else None
                if op is None or op.owner is CLIENT:
                    self.cout.append(it)
                continue
            self._server_msg(it)
        self._after_answers()
        return self._take_out(to_client=True)

    def commit_outcome(self, committed: bool, sqlstate: str, message: str,
                       warning: str) -> None:
        if self.wait != ("outcome",):
            return
        self.wait = None
        self._resume((committed, sqlstate, message, warning))
        self._flush_effects()

    @property
    def idle(self) -> bool:
        return (self.prog is None and not self.trk.pending and not self.inq
                and self.s.txn_status == b"I")

    def describe(self) -> dict:
        """What this session waits for (for the SIGUSR1 dump)."""
        return {"program": getattr(self.prog, "__name__", None), "waits_for": str(self.wait),
                "queued": len(self.inq), "blk": self.blk, "st": self.st, "ours": self.ours,
                "skipping": self.trk.skipping, "copy": self.client_copy is not None,
                "pending": [(chr(op.kind), "client" if op.owner is CLIENT else "proxy")
                            for op in self.trk.pending]}

    def running_statement(self) -> bool:
        """A statement of the client's may be running on the backend (a
        cancel could reach it): an Execute, Query or FunctionCall of its is
        unanswered."""
        return any(op.owner is CLIENT and op.kind in (_E, _Q, _F) for op in self.trk.pending)

    def idle_in_transaction(self) -> bool:
        return (self.prog is None and not self.trk.pending and not self.inq
                and self.blk in (T, W))

    # -- output ------------------------------------------------------------------------

    def _take_out(self, to_client: bool = False) -> bytes | None:
        """Bytes for the side being served; the other side's go to effects."""
        from .session import SendClient, SendServer
        c, s = b"".join(self.cout), b"".join(self.sout)
        self.cout, self.sout = [], []
        if to_client:
            if s:
                self.s.effects.append(SendServer(s))
            return c or None
        if c:
            self.s.effects.append(SendClient(c))
        return s or None

    def _flush_effects(self) -> None:
        from .session import SendClient, SendServer
        c, s = b"".join(self.cout), b"".join(self.sout)
        self.cout, self.sout = [], []
        if c:
            self.s.effects.append(SendClient(c))
        if s:
            self.s.effects.append(SendServer(s))

    def reply(self, data: bytes) -> None:
        self.cout.append(data)

    def ready(self, status: bytes) -> None:
        self.s.txn_status = status
        self.cout.append(wire.ReadyForQuery(status).encode())
        self.blk = _STATUS_BLK[status]

    # -- sending -----------------------------------------------------------------------

    def _fwd(self, m: Message, tok: Tok | None = None, txn: str = "") -> Op | None:
        """Forward a client message to the backend (``txn``: the transaction
        command an Execute runs)."""
        t = m.type
        self.sout.append(m.raw)
        if t in (_S, _Q, _F):
            self.unflushed = False
            self.since_sync = 0
        elif t == _H:
            self.unflushed = False
        else:
            self.unflushed = True
            self.since_sync += 1
        op = self.trk.sent(t, CLIENT, token=tok,
                           describes_statement=t == _D and m.body[:1] == b"S")
        if op is not None:
            if t == _E:
                plan = self._portal_plan(m.decode(frontend=True).portal)
                op.txn = txn or plan.txn or ("prepare" if plan.kind == intercept.USER_PREPARE
                                             else "")
            else:
                op.txn = txn
        return op

    def _send(self, data: bytes, kinds: list, call: Call | None) -> None:
        self.sout.append(data)
        for k in kinds:
            op = self.trk.sent(k, call if call is not None else "proxy")
            if op is not None and call is not None:
                call.ops.append(op)
                if op.skipped:
                    call.skipped = True

    def _flush(self) -> None:
        if self.unflushed:
            self.sout.append(wire.Flush().encode())
            self.unflushed = False

    def own_q(self, sql: str) -> Call:
        """A simple Query of the proxy's own (only while serving a client's
        simple Query: it destroys the unnamed statement and portal)."""
        call = Call()
        self._send(wire.Query(sql).encode(), [_Q], call)
        call.ops[-1].txn = _own_txn(sql)
        self.unflushed = False
        self._framer(True)
        return call

    def own_x(self, sql: str, *, relay_error: bool = False, txn: str = "",
              params: tuple = ()) -> Call:
        """One statement of the proxy's own through the extended protocol,
        with its own named statement and portal, not followed by Sync;
        ``params`` are text parameters ($1...)."""
        call = Call(relay_error)
        bind = wire.Bind(MTM, MTM, params=tuple(None if p is None else p.encode() for p in params))
        self._send(wire.Close(b"P", MTM).encode() + wire.Close(b"S", MTM).encode()
                   + wire.Parse(MTM, sql).encode() + bind.encode()
                   + wire.Execute(MTM, 0).encode(), [_C, _C, _P, _B, _E], call)
        call.ops[-1].txn = txn or _own_txn(sql)
        self.unflushed = True
        self._framer(True)
        return call

    def own_p(self, extended: bool, call: tuple[str, tuple]):
        """A statement of the proxy's own with parameters (``call``: text
        and parameters), in either flow: in a simple Query's flow it is
        followed by a Sync of its own (the backend is inside a block there,
        which a Sync leaves open). Yields the calls; returns the
        statement's."""
        c = self.own_x(call[0], params=call[1])
        if extended:
            yield ("call", c)
            return c
        sync = self.own_sync()
        yield ("call", c)
        yield ("call", sync)
        return c

    def own_sync(self) -> Call:
        call = Call()
        self._send(wire.Sync().encode(), [_S], call)
        self.unflushed = False
        return call

    def _framer(self, all_types: bool) -> None:
        """While the proxy's own statements are answered, every backend
        message is inspected (their DataRows are read)."""
        if all_types != self.framer_all:
            self.framer_all = all_types
            self.s.set_server_framer(all_types)

    # -- the client's messages, in order -----------------------------------------------

    def _pump(self) -> None:
        from .session import Phase
        while self.prog is None and self.inq and self.s.phase is Phase.READY:
            it = self.inq.popleft()
            if it.__class__ is not Message:
                self.sout.append(it)       # COPY data, CopyDone, CopyFail
                continue
            self._handle(it)
        if self.prog is None and not self.inq:
            self._framer(False)
            if self.drain_error is not None and not self.trk.pending:
                self.s.drain_done(self.drain_error)

    def _handle(self, m: Message) -> None:
        t = m.type
        if t == _Q:
            self._on_query(m)
        elif t == _P:
            p = m.decode(frontend=True)
            if len(self.stmts) >= _STMT_CACHE_MAX:
                self.stmts.clear()
            self.stmts[p.name] = self.plan(p.sql)
            self._fwd(m)
        elif t == _B:
            b = m.decode(frontend=True)
            self.portals[b.portal] = b.statement
            self._fwd(m)
        elif t == _E:
            self._on_execute(m)
        elif t == _S:
            self._on_sync(m)
        elif t == _F:
            self._on_function_call(m)
        elif t == _X:
            self._fwd(m)
            self.s.client_terminated()
        else:                              # Describe, Close, Flush
            self._fwd(m)

    def plan(self, sql: str) -> intercept.Plan:
        # A session with standard_conforming_strings off takes backslashes
        # in '...' as escapes: its text is classified (and DDL shipped) in
        # the form that means the same either way.
        off = self.s.server_params.get("standard_conforming_strings") == "off"
        key = "\0off:" + sql if off else sql
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) >= _STMT_CACHE_MAX:
                self.plans.clear()
            plan = self.plans[key] = intercept.classify(to_conforming(sql) if off else sql)
        return plan

    def _start(self, gen) -> None:
        self.prog = gen
        self.wait = None
        self._resume(None)

    def _resume(self, value) -> None:
        while self.prog is not None:
            try:
                w = self.prog.send(value)
            except StopIteration:
                self.prog = None
                self.wait = None
                break
            if self._satisfied(w):
                if w[0] == "idle":
                    self.blk = self._derived()
                value = self._result(w)
                continue
            self.wait = w
            if w[0] in ("idle", "op", "call", "known"):
                self._flush()
            return
        self._pump()

    def _satisfied(self, w) -> bool:
        kind = w[0]
        if kind == "idle":
            return not self.trk.pending
        if kind == "known":
            return self.trk.syncs_pending == 0
        if kind == "call":
            return w[1].done
        if kind == "op":
            return w[1].finished
        if kind == "outcome":
            return False              # only commit_outcome resumes it
        raise AssertionError(w)

    def _result(self, w):
        if w[0] == "call":
            return w[1]
        if w[0] == "op":
            return w[1]
        return None

    def _after_answers(self) -> None:
        for op in self.trk.take_done():
            call = op.owner
            if call.__class__ is Call and op.skipped and op.kind == _E:
                call.skipped = True
        if not self.trk.pending:
            self.blk = self._derived()      # nothing in flight: prediction = reality
        if self.prog is not None and self.wait is not None and self._satisfied(self.wait):
            w, self.wait = self.wait, None
            if w[0] == "idle":
                self.blk = self._derived()
            self._resume(self._result(w))
        elif self.prog is None:
            self._pump()

    # -- the backend's messages --------------------------------------------------------

    def _server_msg(self, m: Message) -> None:
        t = m.type
        op, finished = self.trk.on_backend(t, m.body if t in (_ERR, _CC, _Z) else b"")
        if op is not None and t in (_Z, _CC, _ERR):
            self._block_moves(op, t, m.body)
        if finished and op is self.client_copy:
            # (whichever way the answer is relayed or swallowed: data sent
            # for a later COPY must wait for that COPY's CopyInResponse)
            self.client_copy = None
        owner = op.owner if op is not None else CLIENT
        if owner is not CLIENT:
            self._own_answer(owner, m, t)
            return
        tok = op.token if op is not None else None
        if t == _ERR:
            self.s.note_error(m)
        elif t == _PSTATUS:
            ps = m.decode(frontend=False)
            self.s.server_params[ps.name] = ps.value
        if tok is None:
            self._relay_plain(m, t, op, finished)
            return
        if not tok.seen:
            tok.seen = True
            if tok.prepend:
                self.cout.append(tok.prepend)
        if tok.held is not None and t != _Z:
            self.cout.append(tok.held)      # not the last: PostgreSQL sent it at once
            tok.held = None
        if t == _NOTICE and tok.drop and _sqlstate(m.body) in tok.drop:
            return
        if t == _CC and tok.hold_cc:
            tok.held = m.raw
            return
        if t == _ERR:
            tok.errored = True
            if tok.procedure and _sqlstate(m.body) == b"2D000":
                self.cout.append(wire.error_response(FEATURE_NOT_SUPPORTED,
                                                     PROCEDURE_COMMIT_MESSAGE))
                return
            self.cout.append(self.s.rewrite_error(m))
            return
        if t == _Z:
            tok.status = m.body[:1]
            if tok.swallow_z:
                return
            self._client_ready(m, op)
            return
        if t == _COPY_IN:
            self._copy_started(op)
        self.cout.append(m.raw)

    def _relay_plain(self, m: Message, t: int, op: Op | None, finished: bool) -> None:
        if t == _Z:
            self._client_ready(m, op)
            return
        if t == _ERR:
            self.cout.append(self.s.rewrite_error(m))
        else:
            if t == _COPY_IN:
                self._copy_started(op)
            self.cout.append(m.raw)

    def _copy_started(self, op: Op | None) -> None:
        """The backend reads the client's COPY data now: let through what
        the client sent already (it may not wait for CopyInResponse)."""
        self.client_copy = op
        while self.inq and self.inq[0].__class__ is not Message:
            self.sout.append(self.inq.popleft())

    def _client_ready(self, m: Message, op: Op | None) -> None:
        status = m.body[:1]
        self.s.txn_status = status
        self.s.ready_seen(status)
        self.cout.append(m.raw)
        if status == b"I" and not self.trk.pending:
            self.after_commit.clear()      # its transaction ended some other way
        self.s.after_cycle(self.cout)

    def _block_moves(self, op: Op, t: int, body: bytes) -> None:
        """PostgreSQL's block state after this answer (xact.c): ReadyForQuery
        says it; a transaction command's completion moves it; any other
        statement starts an implicit transaction; an error in the extended
        protocol fails the block (or the implicit transaction)."""
        st = self.st
        if t == _Z:
            self.st = {b"I": I, b"T": T, b"E": E}.get(body[:1], st)
            if self.st == I:
                self.ours = False
            elif op.kind == _Q and op.txn == "begin":
                # a BEGIN as a simple Query: ours, or the client's (which
                # makes the block its own)
                self.ours = op.owner.__class__ is Call
            return
        if t == _ERR:
            if op.kind in (_P, _B, _E, _D, _C):
                self.st = E if st == T else "SA" if st in (I, "S") else st
            return
        if op.kind != _E:
            return                      # inside a simple Query: its ReadyForQuery tells
        txn = op.txn
        if txn == "begin":
            self.st = T
            if op.owner.__class__ is Call:
                self.ours = True
            else:
                self.ours = False        # the client's BEGIN makes the block its own
        elif txn in ("commit", "rollback", "prepare"):
            self.st = I
            self.ours = False
        elif txn == "rollback_to":
            if st == E:
                self.st = T
        elif st == I:
            self.st = "S"

    def _derived(self) -> str:
        """The client's view of the block state, from PostgreSQL's."""
        st = self.st
        if st == I:
            return I
        if st in ("S", "SA"):
            return R
        if self.ours:
            return W                    # (failed or not: the client's Sync decides)
        return T if st == T else E

    def _own_answer(self, call, m: Message, t: int) -> None:
        if call.__class__ is not Call:
            return                          # an answer to a message nobody waits on
        if t == _DATA:
            call.rows.append(m.decode(frontend=False).values)
        elif t == _CC:
            call.tag = m.body.rstrip(b"\0")
        elif t == _ERR:
            if call.error is None:
                call.error = m.body
            if call.relay_error:
                self.cout.append(m.raw)
        elif t == _Z:
            call.status = m.body[:1]

    # -- simple Query --------------------------------------------------------------------

    def _gated(self, plan) -> str | None:
        """Why this node may not serve this statement now (it is not ONLINE,
        or its read lease ran out), or None. Ending a transaction is always
        allowed."""
        if plan.txn == "rollback":
            return None
        return self.s.not_serving()

    def _p_not_serving(self, why: str):
        yield ("idle",)
        if self.trk.skipping:
            yield from self._refuse_q(why, E)
            return
        yield from self._refuse_q(why, self.blk, sqlstate=NOT_SERVING)

    def _on_query(self, m: Message) -> None:
        sql = m.body[:-1].decode("utf-8", "replace")
        plan = self.plan(sql)
        s = self.s
        why = self._gated(plan)
        if why is not None:
            self._start(self._p_not_serving(why))
            return
        if (s.wounded is None and s.wound_answer is None and self.blk != W
                and not plan.deferred and not self.trk.skipping):
            if plan.kind == intercept.PASS:
                if plan.txn == "begin" and self.blk in (I, R):
                    self.blk = T
                elif plan.txn == "rollback":
                    self.blk = I
                    self.after_commit.clear()
                self._fwd(m)
                return
            if (plan.kind == intercept.WRAP and self.blk == T
                    and not (plan.ddl or plan.temp)):
                self._fwd(m)            # a write inside the client's block: as it is
                return
        self._start(self._p_query(m, plan, sql))

    def _p_query(self, m: Message, plan, sql: str):
        yield ("idle",)
        if self.trk.skipping:
            self._fwd(m)                  # an earlier error: PostgreSQL ignores it
            return
        s = self.s
        b = self.blk
        kind = plan.kind
        if s.wound_answer is not None and b == E and (kind in (intercept.COMMIT,
                                                               intercept.USER_PREPARE)):
            # PostgreSQL would answer a failed transaction's COMMIT with a
            # plain "ROLLBACK": the client, who has not heard of the wound,
            # gets its 40001 instead.
            self.reply(s.take_wound_answer())
            self.ready(b"E")
            return
        if s.wounded is not None and b == T:
            msg = s.take_wound()
            yield self.own_call_q(intercept.wound_sql(msg))
            self.reply(wire.error_response(intercept.SERIALIZATION_FAILURE, msg))
            self.ready(b"E")
            return
        if kind == intercept.REFUSE:
            yield from self._refuse_q(plan.reason, b)
            return
        if plan.deferred and b in (T, W):
            self.after_commit.append(plan.deferred)
            self.reply(wire.CommandComplete(plan.deferred.split()[0].upper()).encode())
            if b == W:
                ok = yield from self._commit_now(False, None)
                self.ready(b"I")
            else:
                self.ready(b"T")
            return
        if b == W:
            yield from self._query_in_our_block(m, plan)
            return
        if kind == intercept.COMMIT:
            if b == T:
                yield from self._p_commit_q(m)
            else:
                self._fwd(m)
            return
        if kind == intercept.USER_PREPARE:
            if b == T:
                yield from self._p_user_prepare(m, plan, extended=False)
            else:
                self._fwd(m)
            return
        if kind == intercept.USER_FINISH:
            if b == I:
                yield from self._p_user_finish(m, plan, extended=False)
            else:
                self._fwd(m)
            return
        if kind == intercept.SPLIT:
            if b == E:
                self._fwd(m)              # PostgreSQL refuses all but ROLLBACK/COMMIT
            else:
                yield from self._p_split(plan.parts, I if b == R else b)
            return
        if kind == intercept.WRAP:
            if b in (I, R):
                yield from self._p_wrap_q(m, plan)
            elif b == T:
                yield from self._statement_in_block(m, plan, implicit=False, last=False)
            else:
                self._fwd(m)
            return
        if plan.deferred:
            self._fwd(m)
            return
        self._fwd(m)

    def _query_in_our_block(self, m: Message, plan):
        """A simple Query in the middle of an extended-protocol implicit
        transaction that the proxy made a block of its own. PostgreSQL
        (TBLOCK_STARTED): BEGIN makes it an explicit block, silently;
        COMMIT and ROLLBACK end it with a warning; SAVEPOINT and its kin
        fail; any other statement joins it and the Query's end commits it
        (exec_simple_query's finish_xact_command)."""
        txn = plan.txn
        if txn == "begin":
            tok = Tok(drop=(ACTIVE_TXN.encode(),))
            self._fwd(m, tok, txn="begin")
            self.blk = T
            return
        if plan.kind == intercept.COMMIT:
            ok = yield from self._commit_now(False, None)
            # the client's COMMIT then finds no transaction: PostgreSQL's
            # warning and COMMIT, as for an implicit one
            self._fwd(m)
            self.blk = I
            return
        if txn == "rollback":
            self._fwd(m, Tok(prepend=_NO_TXN_WARNING))
            self.blk = I
            self.after_commit.clear()
            return
        if txn in ("savepoint", "release", "rollback_to"):
            name = {"savepoint": "SAVEPOINT", "release": "RELEASE SAVEPOINT",
                    "rollback_to": "ROLLBACK TO SAVEPOINT"}[txn]
            self.reply(wire.error_response(NO_ACTIVE_TXN,
                                           f"{name} can only be used in transaction blocks"))
            yield ("call", self.own_q("ROLLBACK"))
            self.after_commit.clear()
            self.ready(b"I")
            return
        if plan.kind == intercept.SPLIT:
            yield from self._p_split(plan.parts, I, implicit=True)
            return
        if plan.kind == intercept.REFUSE:
            yield from self._refuse_q(plan.reason, W)
            return
        if plan.kind in (intercept.USER_PREPARE, intercept.USER_FINISH):
            # PostgreSQL's own answer, once ours is committed
            yield from self._commit_now(False, None)
            self._fwd(m)
            return
        yield from self._statement_in_block(m, plan, implicit=True, last=True)

    def own_call_q(self, sql: str):
        return ("call", self.own_q(sql))

    def _refuse_q(self, reason: str, b: str, sqlstate: str = FEATURE_NOT_SUPPORTED):
        err = wire.error_response(sqlstate, reason)
        if b == T:
            # an error leaves the transaction failed: make it so on the backend
            yield self.own_call_q(intercept.fail_sql(sqlstate, reason))
            self.reply(err)
            self.ready(b"E")
        elif b == E:
            self.reply(wire.error_response(
                "25P02", "current transaction is aborted, commands ignored until end of "
                         "transaction block"))
            self.ready(b"E")
        elif b == W:
            # an error ends the implicit transaction it arrived in
            self.reply(err)
            yield ("call", self.own_q("ROLLBACK"))
            self.after_commit.clear()
            self.ready(b"I")
        else:
            self.reply(err)
            self.ready(b"I")

    def _p_wrap_q(self, m: Message, plan):
        """A simple Query that may write, outside a transaction: BEGIN of our
        own, the client's Query, then the commit protocol."""
        yield self.own_call_q("BEGIN")
        yield from self._statement_in_block(m, plan, implicit=True, last=True)

    def _statement_in_block(self, m: Message, plan, *, implicit: bool, last: bool):
        """Run the client's Query ``m`` inside the block (ours when
        ``implicit``), with DDL capture around it; for an implicit block,
        commit at the end, holding the last CommandComplete until then."""
        token = self.s.token
        if plan.temp:
            self.uses_temp = True
            yield from self.own_p(False, intercept.capture_local_call(token))
        elif plan.ddl:
            c = yield from self.own_p(False, intercept.capture_call(plan, token))
            if c.error is not None:
                self._relay_own_error(c)
                yield from self._end_failed(implicit)
                return
        tok = Tok(swallow_z=True, hold_cc=(implicit and last) or bool(plan.refresh),
                  procedure=plan.procedure and implicit)
        op = self._fwd(m, tok)
        yield ("op", op)
        if tok.status == b"E":
            yield from self._end_failed(implicit)
            return
        if not (yield from self._refresh(plan, False)):
            tok.held = None
            yield from self._end_failed(implicit)
            return
        if not implicit:
            if tok.held is not None:
                self.reply(tok.held)
                tok.held = None
            self.ready(tok.status or b"T")
            return
        ok = yield from self._commit_now(False, tok)
        self.ready(b"I")

    def _refresh(self, plan, extended: bool):
        """After an ALTER TABLE that made each node compute a column's
        values: ship this node's (mtm.refresh_column). False if refused (the
        error went to the client)."""
        for call in intercept.refresh_calls(plan, self.s.token):
            c = yield from self.own_p(extended, call)
            if c.error is not None:
                self._relay_own_error(c)
                return False
        return True

    def _end_failed(self, implicit: bool):
        if implicit:
            yield self.own_call_q("ROLLBACK")
            self.after_commit.clear()
            self.ready(b"I")
        else:
            self.ready(b"E")

    def _relay_own_error(self, c: Call) -> None:
        if c.error is not None:
            self.cout.append(wire.frame(b"E", c.error))

    def _p_commit_q(self, m: Message):
        """The client's COMMIT of its explicit block (simple Query)."""
        yield from self._commit_now(False, None, client_commit=True)
        self.ready(b"I")

    def _commit_now(self, extended: bool, tok: Tok | None, *, client_commit: bool = False):
        """Commit the current transaction block (ours, or the client's at
        its COMMIT): check it, then PREPARE and run the protocol, or commit
        it plainly. Sends the client what PostgreSQL would: the held
        CommandComplete (``tok``) or COMMIT tag on success, the error on
        failure. Returns True when committed."""
        own = self.own_x if extended else self.own_q
        check = own(intercept.COMMIT_CHECK_SQL[self.uses_temp])
        yield ("call", check)
        if check.skipped:
            return False
        if check.error is not None:
            self._relay_own_error(check)
            if extended:
                yield ("call", self.own_sync())
            yield ("call", own("ROLLBACK"))
            return False
        row = check.rows[0] if check.rows else (b"f",) * 5
        wrote, used_temp, for_peers, ddl_shipped, large_objects = (v == b"t" for v in row)
        tag = wire.CommandComplete("COMMIT").encode() if client_commit else b""
        if large_objects:
            yield ("call", own("ROLLBACK"))
            self.reply(wire.error_response(FEATURE_NOT_SUPPORTED, intercept.LARGE_OBJECTS_REFUSED,
                                           hint=intercept.LARGE_OBJECTS_HINT))
            self.after_commit.clear()
            return False
        if wrote and used_temp and ddl_shipped:
            yield ("call", own("ROLLBACK"))
            self.reply(wire.error_response(
                FEATURE_NOT_SUPPORTED,
                "a transaction that used temporary tables cannot also change the schema of "
                "replicated objects; it was rolled back",
                hint="Run the DDL in a transaction of its own."))
            self.after_commit.clear()
            return False
        if for_peers and not used_temp:
            gid = self.s.next_gid()
            c = yield from self.own_p(extended, intercept.mark_call(gid, self.s.token))
            c2 = own(intercept.prepare_sql(gid))
            yield ("call", c2)
            err = c.error or c2.error
            if err is not None:
                # A failed PREPARE rolls the transaction back (PG15-FACTS).
                if extended:
                    yield ("call", self.own_sync())
                self.reply(_rewrite_prepare_error(err))
                self.after_commit.clear()
                return False
            from .session import RunCommit
            self.s.effects.append(RunCommit(gid))
            committed, sqlstate, message, warning = yield ("outcome",)
            if not committed:
                self.reply(wire.error_response(sqlstate or "40000", message))
                self.after_commit.clear()
                return False
            if warning:
                self.reply(wire.error_response("01000", warning, severity="WARNING",
                                               notice=True))
        else:
            if wrote and used_temp:
                yield ("call", own(intercept.TEMP_COMMIT_MARK_SQL))
            c = own("COMMIT")
            yield ("call", c)
            if c.error is not None:
                if extended:
                    yield ("call", self.own_sync())
                self._relay_own_error(c)
                self.after_commit.clear()
                return False
        if tok is not None and tok.held is not None:
            self.reply(tok.held)
            tok.held = None
        self.reply(tag)
        yield from self._run_after_commit(extended)
        return True

    def _run_after_commit(self, extended: bool):
        pending, self.after_commit = self.after_commit, []
        own = self.own_x if extended else self.own_q
        for sql in pending:
            c = own(sql)
            yield ("call", c)
            if extended:
                yield ("call", self.own_sync())

    def _p_split(self, parts, b: str, implicit: bool = False):
        """A query string with transaction commands or DDL, statement by
        statement, with PostgreSQL's semantics for multi-statement strings.
        ``implicit``: a block of ours is open already (the string arrived
        inside an implicit transaction of the extended protocol)."""
        st = b                    # I, T
        n = len(parts)
        for k, (text, p) in enumerate(parts):
            last = k == n - 1
            raw = wire.Query(text).encode()
            m = Message(_Q, raw[5:], raw)
            if p.txn == "begin":
                tok = Tok(swallow_z=True, drop=(ACTIVE_TXN.encode(),) if implicit else ())
                yield ("op", self._fwd(m, tok, txn="begin"))
                if tok.errored:
                    break
                implicit, st = False, T
                continue
            if p.kind == intercept.COMMIT:
                if st == T or implicit:
                    ok = yield from self._commit_now(False, None)
                    if not ok:
                        implicit, st = False, I
                        break
                    tok = Tok(swallow_z=True, drop=() if implicit else (NO_ACTIVE_TXN.encode(),))
                    yield ("op", self._fwd(m, tok))   # answers COMMIT (and its warning)
                    implicit, st = False, I
                    continue
                tok = Tok(swallow_z=True)
                yield ("op", self._fwd(m, tok))
                continue
            if p.txn == "rollback":
                tok = Tok(swallow_z=True, prepend=_NO_TXN_WARNING if implicit else b"")
                yield ("op", self._fwd(m, tok))
                self.after_commit.clear()
                implicit, st = False, I
                continue
            if p.txn in ("savepoint", "release", "rollback_to") and (implicit or st == I):
                # xact.c: only in transaction blocks, not in an implicit one
                name = {"savepoint": "SAVEPOINT", "release": "RELEASE SAVEPOINT",
                        "rollback_to": "ROLLBACK TO SAVEPOINT"}[p.txn]
                self.reply(wire.error_response(NO_ACTIVE_TXN,
                                               f"{name} can only be used in transaction blocks"))
                if implicit:
                    yield ("call", self.own_q("ROLLBACK"))
                    self.after_commit.clear()
                implicit = False
                self.ready(b"I")
                return
            if p.deferred and (st == T or implicit):
                self.after_commit.append(p.deferred)
                self.reply(wire.CommandComplete(p.deferred.split()[0].upper()).encode())
                continue
            if st == I and not implicit:
                # the statements outside explicit blocks form one transaction
                yield ("call", self.own_q("BEGIN"))
                implicit = True
            if p.temp:
                self.uses_temp = True
                yield from self.own_p(False, intercept.capture_local_call(self.s.token))
            elif p.ddl:
                c = yield from self.own_p(False, intercept.capture_call(p, self.s.token))
                if c.error is not None:
                    self._relay_own_error(c)
                    break
            hold = implicit and last
            tok = Tok(swallow_z=True, hold_cc=hold or bool(p.refresh),
                      procedure=p.procedure and implicit)
            yield ("op", self._fwd(m, tok))
            if tok.errored:
                break
            if not (yield from self._refresh(p, False)):
                tok.held = None
                break
            if p.refresh and not hold and tok.held is not None:
                self.reply(tok.held)
                tok.held = None
        else:
            if implicit:
                yield from self._commit_now(False, tok if implicit else None)
                self.ready(b"I")
            else:
                self.ready(b"T" if st == T else b"I")
            return
        # an error ended the string: PostgreSQL skips the rest
        if implicit:
            yield ("call", self.own_q("ROLLBACK"))
            self.after_commit.clear()
            self.ready(b"I")
        else:
            self.ready(b"E" if st == T else b"I")

    def _p_user_prepare(self, m: Message, plan, *, extended: bool):
        """The client's PREPARE TRANSACTION 'x': the protocol's first phase
        (every node prepares it as MTM-...:x), held for its COMMIT/ROLLBACK
        PREPARED, which any node may receive."""
        own = self.own_x if extended else self.own_q
        check = own(intercept.COMMIT_CHECK_SQL[self.uses_temp])
        yield ("call", check)
        row = check.rows[0] if check.rows else (b"f",) * 5
        wrote, used_temp, for_peers, _, large_objects = (v == b"t" for v in row)
        if large_objects and check.error is None:
            yield ("call", own("ROLLBACK"))
            if extended:
                yield ("call", self.own_sync())
            self.reply(wire.error_response(FEATURE_NOT_SUPPORTED, intercept.LARGE_OBJECTS_REFUSED,
                                           hint=intercept.LARGE_OBJECTS_HINT))
            self._after_reply(extended, I)
            return
        if check.error is not None or not for_peers or used_temp:
            # nothing for the peers: PostgreSQL prepares it here, under 'x'
            if extended:
                if check.error is not None:
                    yield ("call", self.own_sync())
                self._fwd(m)
            else:
                self._fwd(m)
            self.blk = I
            return
        gid = self.s.next_gid() + USER_GID_SEP + plan.gid
        c = yield from self.own_p(extended, intercept.mark_call(gid, self.s.token))
        c2 = own(intercept.prepare_sql(gid))
        yield ("call", c2)
        err = c.error or c2.error
        if err is not None:
            if extended:
                yield ("call", self.own_sync())
            self.reply(_rewrite_prepare_error(err))
            self._after_reply(extended, I)
            return
        from .session import RunCommit
        self.s.effects.append(RunCommit(gid, hold=True))
        committed, sqlstate, message, _ = yield ("outcome",)
        if committed:
            self.reply(wire.CommandComplete("PREPARE TRANSACTION").encode())
        else:
            self.reply(wire.error_response(sqlstate or "40000", message))
        self._after_reply(extended, I)

    def _after_reply(self, extended: bool, blk: str) -> None:
        self.blk = blk
        if not extended:
            self.ready(b"I" if blk == I else b"T" if blk == T else b"E")

    def _p_user_finish(self, m: Message, plan, *, extended: bool):
        own = self.own_x if extended else self.own_q
        c = own(intercept.user_gid_lookup_sql(plan.gid))
        yield ("call", c)
        if extended and c.error is not None:
            yield ("call", self.own_sync())
        if not c.rows or c.error is not None:
            self._fwd(m)                    # not the cluster's: PostgreSQL's
            return
        gid = c.rows[0][0].decode()
        from .session import RunRelease
        self.s.effects.append(RunRelease(gid, plan.commit))
        committed, sqlstate, message, _ = yield ("outcome",)
        if committed == plan.commit:
            self.reply(wire.CommandComplete(
                "COMMIT PREPARED" if committed else "ROLLBACK PREPARED").encode())
        else:
            self.reply(wire.error_response(sqlstate or "40000", message))
        self._after_reply(extended, I)

    # -- extended protocol ---------------------------------------------------------------

    def _portal_plan(self, portal: str) -> intercept.Plan:
        plan = self.stmts.get(self.portals.get(portal, ""))
        # A statement prepared before cluster mode began is unknown: treat
        # it as a possible write.
        return plan if plan is not None else intercept.Plan(intercept.WRAP)

    def _on_execute(self, m: Message) -> None:
        if self.trk.skipping:
            self._fwd(m)                  # an earlier error: PostgreSQL ignores it
            return
        portal = m.decode(frontend=True).portal
        plan = self._portal_plan(portal)
        b = self.blk
        s = self.s
        kind, txn = plan.kind, plan.txn
        if (s.wounded is not None and b in (T, W)) or (s.wound_answer is not None and b == E):
            self._start(self._p_fail_exec(m, None))
            return
        if kind == intercept.REFUSE:
            self._start(self._p_fail_exec(m, plan.reason))
            return
        why = self._gated(plan)
        if why is not None:
            self._start(self._p_fail_exec(m, why, NOT_SERVING))
            return
        if txn == "begin":
            self._fwd(m, Tok(drop=(ACTIVE_TXN.encode(),)) if b == W else None)
            if b != E:
                self.blk = T
            return
        if kind == intercept.COMMIT:
            if b in (T, W):
                self._start(self._p_commit_exec(m, b))
            else:
                self._fwd(m)
                if b == R:
                    self.blk = I
            return
        if txn == "rollback":
            self._fwd(m, Tok(prepend=_NO_TXN_WARNING) if b == W else None)
            self.blk = I
            self.after_commit.clear()
            return
        if txn in ("savepoint", "release", "rollback_to") and b == W:
            name = {"savepoint": "SAVEPOINT", "release": "RELEASE SAVEPOINT",
                    "rollback_to": "ROLLBACK TO SAVEPOINT"}[txn]
            self._start(self._p_fail_exec(m, f"{name} can only be used in transaction blocks",
                                          sqlstate=NO_ACTIVE_TXN))
            return
        if kind == intercept.USER_PREPARE and b == T:
            self._start(self._p_ext(m, self._p_user_prepare(m, plan, extended=True)))
            return
        if kind == intercept.USER_FINISH and b in (I, R):
            self._start(self._p_ext(m, self._p_user_finish(m, plan, extended=True)))
            return
        if plan.deferred and b in (T, W):
            self._start(self._p_deferred_exec(plan, m))
            return
        if kind in (intercept.WRAP, intercept.SPLIT):
            if b in (I, R) and self.trk.syncs_pending:
                # the block state at this batch's start is not known yet
                self._start(self._p_rehandle(m))
                return
            if b in (I, R):
                self.own_x("BEGIN", relay_error=True)
                self.blk = b = W
                self.began_in_batch = True
            token = self.s.token
            if plan.temp:
                self.uses_temp = True
                sql, params = intercept.capture_local_call(token)
                self.own_x(sql, params=params, relay_error=True)
            elif plan.ddl:
                sql, params = intercept.capture_call(plan, token)
                self.own_x(sql, params=params, relay_error=True)
            self._fwd(m, Tok(procedure=True) if plan.procedure and b == W else None)
            for sql, params in intercept.refresh_calls(plan, token):
                self.own_x(sql, params=params, relay_error=True)
            return
        self._fwd(m)
        if b == I:
            self.blk = R

    def _p_rehandle(self, m: Message):
        yield ("known",)
        self._on_execute(m)

    def _p_ext(self, m: Message, inner):
        yield ("idle",)
        if self.blk == E or self.trk.skipping:
            self._fwd(m)
            return
        yield from inner

    def _p_fail_exec(self, m: Message, reason: str | None, sqlstate: str = FEATURE_NOT_SUPPORTED):
        """Answer the client's Execute with an error of the proxy's (a
        refusal, or a wound) and leave the backend as PostgreSQL would be
        after it: the transaction failed, every message up to Sync ignored."""
        yield ("idle",)
        s = self.s
        if self.trk.skipping:
            self._fwd(m)                  # an earlier error: PostgreSQL ignores it too
            return
        if reason is None:
            if s.wound_answer is not None and self.blk == E:
                err = s.take_wound_answer()
            else:
                msg = s.take_wound()
                err = wire.error_response(intercept.SERIALIZATION_FAILURE, msg)
            sqlstate = intercept.SERIALIZATION_FAILURE
            reason = _message_of(err)
        else:
            err = wire.error_response(sqlstate, reason)
        c = self.own_x(intercept.fail_sql(sqlstate, reason))
        yield ("call", c)
        self.reply(err)
        if self.blk == T:
            self.blk = E

    def _p_deferred_exec(self, plan, m: Message):
        yield ("idle",)
        if self.trk.skipping:
            self._fwd(m)
            return
        self.after_commit.append(plan.deferred)
        self.reply(wire.CommandComplete(plan.deferred.split()[0].upper()).encode())

    def _p_commit_exec(self, m: Message, b: str):
        """The client's COMMIT through the extended protocol, in its
        explicit block (T) or in an implicit transaction we opened (W)."""
        yield ("idle",)
        if self.trk.skipping or self.blk == E:
            self._fwd(m)
            return
        ok = yield from self._commit_now(True, None)
        if ok:
            # Answered here: the commit ended the transaction, and with it
            # the portal the client bound its COMMIT to. PostgreSQL answers
            # COMMIT, with a warning when the transaction was implicit.
            if b == W:
                self.reply(_NO_TXN_WARNING)
            self.reply(wire.CommandComplete("COMMIT").encode())
        else:
            # the error answered the COMMIT; PostgreSQL skips to Sync
            c = self.own_x(intercept.fail_sql("40000", "commit failed"))
            yield ("call", c)
        self.blk = I

    def _on_sync(self, m: Message) -> None:
        if self.blk == W or self.began_in_batch:
            self.began_in_batch = False
            self._start(self._p_sync(m))
            return
        self._fwd(m)
        if self.blk == R:
            self.blk = I

    def _p_sync(self, m: Message):
        """The end of a batch in which the proxy began a block: decided on
        the exact state, once every answer before it is in. Its block, fine:
        commit it through the protocol, then let the client's Sync through
        (answered I). Its block, failed (an error made the backend ignore
        everything up to this Sync, its check included): PostgreSQL would
        roll the implicit transaction back here and answer I; ours is a
        failed explicit block there, so it is rolled back after the Sync.
        Not its block any more (the client's BEGIN made it the client's, or
        our BEGIN was ignored): the Sync goes through as it is."""
        yield ("idle",)
        if not self.ours:
            self._fwd(m)
            return
        if self.st == T and not self.trk.skipping:
            yield from self._commit_now(True, None)
        tok = Tok(swallow_z=True)
        yield ("op", self._fwd(m, tok))
        if tok.status == b"E":
            yield ("call", self.own_x("ROLLBACK"))
            yield ("call", self.own_sync())
            self.after_commit.clear()
        self.ready(b"I")

    def _on_function_call(self, m: Message) -> None:
        why = self.s.not_serving()
        if why is not None:
            self._start(self._p_not_serving(why))
            return
        if self.blk in (I, R):
            self._start(self._p_function_call(m))
            return
        self._fwd(m)

    def _p_function_call(self, m: Message):
        """A FunctionCall outside a transaction block: like a simple Query
        that may write (postgres.c commits after it)."""
        yield ("idle",)
        if self.trk.skipping or self.blk not in (I, R):
            self._fwd(m)
            return
        yield ("call", self.own_x("BEGIN"))
        tok = Tok(swallow_z=True)
        yield ("op", self._fwd(m, tok))
        if tok.status == b"E":
            yield ("call", self.own_x("ROLLBACK"))
            self.ready(b"I")
            return
        yield from self._commit_now(True, None)
        self.ready(b"I")

    # -- wound-wait ---------------------------------------------------------------------

    def wound_idle(self, message: str) -> None:
        """Fail the idle transaction on the backend now (its locks go at
        once); the client hears of it at its next statement."""
        self.wounding = True
        self._start(self._p_wound_idle(message))
        self._flush_effects()

    def _p_wound_idle(self, message: str):
        c = self.own_x(intercept.wound_sql(message))
        yield ("call", c)
        yield ("call", self.own_sync())
        self.s.set_wound_answer(wire.error_response(intercept.SERIALIZATION_FAILURE, message))
        self.wounding = False
        if self.blk == T:
            self.blk = E
        # In W (our block) it stays W: failed on the backend, the client's
        # Sync rolls it back (``_p_sync_commit``).


def _own_txn(sql: str) -> str:
    """The transaction command one of the proxy's own statements is."""
    head = sql[:20].upper()
    if head == "BEGIN":
        return "begin"
    if head == "COMMIT":
        return "commit"
    if head == "ROLLBACK":
        return "rollback"
    if head.startswith("PREPARE TRANSACTION"):
        return "prepare"
    return ""


def _message_of(err: bytes) -> str:
    body = err[5:]
    for part in body.split(b"\0"):
        if part[:1] == b"M":
            return part[1:].decode("utf-8", "replace")
    return ""


def _rewrite_prepare_error(body: bytes) -> bytes:
    """PostgreSQL refuses to PREPARE a transaction that ran LISTEN, UNLISTEN
    or NOTIFY (pg_notify in a function or trigger; the statements themselves
    are run by the proxy after the commit): say what to do."""
    if _sqlstate(body) == b"0A000" and b"LISTEN, UNLISTEN, or NOTIFY" in body:
        return wire.error_response(
            FEATURE_NOT_SUPPORTED,
            "this transaction called pg_notify() (or LISTEN/UNLISTEN from a function) and wrote "
            "replicated data, which the cluster cannot commit together; nothing was committed",
            hint="Use the NOTIFY statement instead: the cluster delivers it after the commit. "
                 "Or notify in a transaction of its own.")
    return wire.frame(b"E", body)
