"""What the backend owes, and to whom: a pure model of postgres.c's
message loop as seen on the wire.

Everything that affects this model lives in this file. It is fed every
frontend message the proxy sends to the backend (the client's, forwarded,
and the proxy's own, injected), in order, and every backend message, in
order; it never sees bytes it was not told about. Rules it keeps (the
PostgreSQL 15 protocol, chapter 55.2, and src/backend/tcop/postgres.c):

- Each frontend message that gets an answer becomes a pending *op*, in a
  FIFO. Its answer ends with a known message: Parse '1', Bind '2', Close
  '3', Describe of a statement 't' then 'T' or 'n', Describe of a portal
  'T' or 'n', Execute 'C', 'I' or 's' (after a COPY sub-protocol, 'C'),
  Sync, simple Query and FunctionCall 'Z'; any extended-protocol op may end
  with 'E' instead. Flush, Terminate and COPY data get no answer.
- Every backend message belongs to the op at the head of the FIFO (notices,
  notifications and parameter changes included, as the backend emits them
  while processing it); with nothing pending it is asynchronous and belongs
  to the client.
- After an ErrorResponse that ends an extended-protocol op, the backend
  ignores every message until the next Sync: the pending ops before that
  Sync are dropped unanswered, and so is any such op sent later, until a
  Sync is sent (postgres.c ``ignore_till_sync``). A simple Query and a
  FunctionCall are skipped too.
- ReadyForQuery carries the transaction status: I, T or E.

Owners are opaque to this module (the session uses "client" for the
client's messages and its own objects for the proxy's); ``on_backend``
says which op each backend message belongs to (None: asynchronous) and
whether it finished that op.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# frontend message types
Q, P, B, D, E, C, S, H, F, X = (ord(c) for c in "QPBDECSHFX")
COPY_DATA, COPY_DONE, COPY_FAIL = ord("d"), ord("c"), ord("f")
# backend message types
PARSE_COMPLETE, BIND_COMPLETE, CLOSE_COMPLETE = ord("1"), ord("2"), ord("3")
PARAM_DESC, ROW_DESC, NO_DATA = ord("t"), ord("T"), ord("n")
COMMAND_COMPLETE, EMPTY_QUERY, PORTAL_SUSPENDED = ord("C"), ord("I"), ord("s")
ERROR, READY = ord("E"), ord("Z")
FUNCTION_RESULT = ord("V")

_EXTENDED = frozenset((P, B, D, E, C))
_ANSWERED = frozenset((Q, P, B, D, E, C, S, F))
# what ends each op (besides 'E' for extended ops)
_ENDS = {P: (PARSE_COMPLETE,), B: (BIND_COMPLETE,), C: (CLOSE_COMPLETE,),
         E: (COMMAND_COMPLETE, EMPTY_QUERY, PORTAL_SUSPENDED), S: (READY,), Q: (READY,),
         F: (READY,)}


@dataclass
class Op:
    kind: int                  # the frontend message type
    owner: object
    describes_statement: bool = False   # Describe 'S' (answered 't' then 'T'/'n')
    token: object = None       # the sender's handle (the proxy's own ops)
    skipped: bool = False      # dropped unanswered (ignore_till_sync)
    error: bytes | None = None            # the ErrorResponse that ended it
    tag: bytes | None = None   # CommandComplete tag (Execute)
    got_param_desc: bool = False
    status: bytes | None = None           # ReadyForQuery status (Sync, Query, FunctionCall)
    finished: bool = False     # answered completely, or skipped
    txn: str = ""              # a transaction command (intercept.Plan.txn, or "prepare")


@dataclass
class BackendTracker:
    pending: deque = field(default_factory=deque)
    skipping: bool = False            # the backend ignores messages until Sync
    status: bytes = b"I"              # from the last ReadyForQuery
    # ops finished or dropped since the caller last looked (``take_done``)
    done: list = field(default_factory=list)

    # -- frontend -------------------------------------------------------------

    def sent(self, kind: int, owner: object, *, describes_statement: bool = False,
             token: object = None) -> Op | None:
        """A frontend message went to the backend. Returns its op, or None
        when it gets no answer (Flush, COPY data, Terminate)."""
        if kind not in _ANSWERED:
            return None
        op = Op(kind, owner, describes_statement, token)
        if self.skipping and kind != S:
            # postgres.c: "if (ignore_till_sync && firstchar != EOF) continue"
            op.skipped = op.finished = True
            self.done.append(op)
            return op
        if kind == S:
            self.skipping = False   # the backend will read this Sync and answer it
        self.pending.append(op)
        return op

    @property
    def outstanding(self) -> int:
        return len(self.pending)

    def outstanding_for(self, owner: object) -> int:
        return sum(1 for op in self.pending if op.owner == owner)

    # -- backend ---------------------------------------------------------------

    def on_backend(self, kind: int, body: bytes = b"") -> tuple[Op | None, bool]:
        """A backend message arrived: (the op it belongs to, or None when it
        is asynchronous - a NOTIFY or ParameterStatus with nothing pending;
        whether it finished that op). ``body`` is needed for 'E', 'C' and
        'Z' only."""
        if not self.pending:
            return None, False
        op = self.pending[0]
        if kind == ERROR and op.kind in _EXTENDED:
            self.pending.popleft()
            op.error = body
            op.finished = True
            self.done.append(op)
            self._skip_until_sync()
            return op, True
        if kind == READY:
            op.status = body[:1]
            self.status = op.status
        elif kind == ERROR:
            op.error = body                 # inside a simple Query / FunctionCall
        elif kind == COMMAND_COMPLETE:
            op.tag = body.rstrip(b"\0")
        if op.kind == D:
            if kind == PARAM_DESC:
                op.got_param_desc = True
                return op, False
            if kind in (ROW_DESC, NO_DATA):
                return self._finish(), True
            return op, False
        if kind in _ENDS.get(op.kind, ()):
            return self._finish(), True
        return op, False

    def _finish(self) -> Op:
        op = self.pending.popleft()
        op.finished = True
        self.done.append(op)
        return op

    def _skip_until_sync(self) -> None:
        """Drop the pending ops the backend will now ignore, up to the next
        Sync already sent (or all of them, and later ones, if none is)."""
        while self.pending and self.pending[0].kind != S:
            op = self.pending.popleft()
            op.skipped = op.finished = True
            self.done.append(op)
        if not self.pending:
            self.skipping = True

    @property
    def syncs_pending(self) -> int:
        """Sync, Query and FunctionCall messages not yet answered."""
        return sum(1 for op in self.pending if op.kind in (S, Q, F))

    def take_done(self) -> list:
        d, self.done = self.done, []
        return d
