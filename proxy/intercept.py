"""What a client's Query means for the cluster (pure; pglast parses).

``classify(sql)`` says how the proxy must run a simple-protocol Query when
the node is in a cluster:

- ``COMMIT``: a lone COMMIT/END: intercepted and turned into the commit
  protocol (PREPARE TRANSACTION + 3PC);
- ``PASS``: forwarded as it is: reads that cannot write (SELECT without
  function calls, SHOW, SET, EXPLAIN without ANALYZE, cursor commands...),
  statements PostgreSQL refuses inside a transaction block (VACUUM, CREATE
  DATABASE, ALTER SYSTEM, ...), and multi-statement strings that contain
  their own transaction control (the commit guard stops any write in them
  from committing outside the protocol);
- ``WRAP``: anything that may write: run inside BEGIN ... commit protocol;
- ``REFUSE``: cannot be replicated correctly; answered with 0A000.

``ddl`` is set when the Query holds DDL to ship as text (with ``makes_rows``
when the statement fills the table itself, e.g. CREATE TABLE AS).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pglast
from pglast import ast
from pglast.enums import GrantTargetType, ObjectType, TransactionStmtKind

from common.sql import quote_ident, quote_literal, quote_literal_any

COMMIT, PASS, WRAP, REFUSE = "commit", "pass", "wrap", "refuse"
# A multi-statement query string with transaction commands or DDL in it: run
# statement by statement, with PostgreSQL's implicit-block semantics.
SPLIT = "split"
# A client's own PREPARE TRANSACTION, and COMMIT/ROLLBACK PREPARED of it.
USER_PREPARE, USER_FINISH = "user_prepare", "user_finish"
SERIALIZATION_FAILURE = "40001"

_LONE_COMMIT = re.compile(r"^\s*(commit|end)(\s+(work|transaction))?\s*;?\s*$", re.I)

# Statements that never write replicated data, or must not be wrapped.
_PASS_TYPES = (ast.VariableSetStmt, ast.VariableShowStmt, ast.VacuumStmt, ast.CheckPointStmt,
               ast.ListenStmt, ast.UnlistenStmt, ast.NotifyStmt, ast.DiscardStmt,
               ast.PrepareStmt, ast.DeallocateStmt, ast.DeclareCursorStmt, ast.FetchStmt,
               ast.ClosePortalStmt, ast.LoadStmt, ast.CreatedbStmt, ast.DropdbStmt,
               ast.AlterSystemStmt, ast.AlterDatabaseSetStmt, ast.ReindexStmt,
               ast.ClusterStmt, ast.LockStmt, ast.ExecuteStmt)
# Writes to data (shipped as rows, not text). TRUNCATE is one: the slot
# carries it (pgoutput's Truncate), for replicated tables only, so it is not
# shipped as text (which would also truncate a peer's local tables, and
# refuse a transaction that truncates a temporary one).
_DML_TYPES = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.CallStmt, ast.DoStmt,
              ast.MergeStmt, ast.TruncateStmt)


@dataclass(frozen=True)
class Plan:
    kind: str
    ddl: bool = False
    makes_rows: bool = False
    reason: str = ""
    sql: str = ""            # the statement text, kept for DDL capture
    temp: bool = False       # creates a temporary object: local, committed plainly
    drop: bool = False       # one DROP: shipped unless it dropped only temporary objects
    # one statement on a table named without a schema (or in pg_temp), which
    # may be a temporary table: shipped unless it touched only temporary objects
    staged: bool = False
    # staged GRANT/REVOKE: the tables it names, which event triggers do not
    # report (mtm.on_ddl_end looks them up itself)
    rels: tuple = ()
    gid: str = ""            # USER_PREPARE / USER_FINISH: the client's gid
    commit: bool = False     # USER_FINISH: COMMIT (else ROLLBACK) PREPARED
    # A transaction command: begin, commit, rollback, savepoint, release,
    # rollback_to (PREPARE TRANSACTION and COMMIT/ROLLBACK PREPARED have
    # their own kinds).
    txn: str = ""
    # NOTIFY, LISTEN, UNLISTEN: PostgreSQL cannot PREPARE a transaction that
    # ran one, so inside a transaction the proxy runs it after the commit
    # (this is the statement to run then).
    deferred: str = ""
    # SPLIT: a query string run statement by statement (see Session):
    # ((statement text, its Plan), ...)
    parts: tuple = ()
    procedure: bool = False  # a CALL: may COMMIT inside (refused with a clear error)


def _has_function_call(node) -> bool:
    for n in _walk(node):
        if isinstance(n, (ast.FuncCall, ast.SubLink)) or (
                isinstance(n, ast.SelectStmt) and n.lockingClause):
            return True
    return False


def _walk(node):
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.Node):
            yield n
            for name in n.__slots__:
                stack.append(getattr(n, name, None))
        elif isinstance(n, (tuple, list)):
            stack.extend(n)


def _is_temp_ddl(s) -> bool:
    """CREATE TEMP TABLE / SEQUENCE / VIEW, CREATE TEMP TABLE AS."""
    rel = None
    if isinstance(s, (ast.CreateStmt, ast.CreateSeqStmt)):
        rel = s.relation if isinstance(s, ast.CreateStmt) else s.sequence
    elif isinstance(s, ast.CreateTableAsStmt):
        rel = s.into.rel
    elif isinstance(s, ast.ViewStmt):
        rel = s.view
    return rel is not None and rel.relpersistence == "t"


# DDL on one table that PostgreSQL reports to ddl_command_end event triggers
# with the objects it made or changed (and the field naming the table).
_ON_TABLE = {ast.IndexStmt: "relation", ast.AlterTableStmt: "relation",
             ast.CreateTrigStmt: "relation", ast.RuleStmt: "relation",
             ast.CreatePolicyStmt: "table", ast.AlterPolicyStmt: "table",
             # a view over a temporary table is made temporary by PostgreSQL
             ast.ViewStmt: "view"}


def _maybe_on_temp(s) -> bool:
    """Is ``s`` DDL on a table that may be temporary (its name has no
    schema, or the schema pg_temp)? Only the server knows: such DDL is
    staged, and the ddl_command_end event trigger (mtm.on_ddl_end) ships
    it unless every object it touched is temporary."""
    field = _ON_TABLE.get(type(s))
    rel = getattr(s, field, None) if field else None
    return rel is not None and rel.schemaname in (None, "pg_temp")


def _qualified(rel) -> str:
    parts = [p for p in (rel.catalogname, rel.schemaname, rel.relname) if p]
    return ".".join(quote_ident(p) for p in parts)


def _grant_rels(s) -> tuple:
    """GRANT/REVOKE on tables or sequences one of which is named without a
    schema (or in pg_temp), so may be temporary: the names it gives."""
    if (isinstance(s, ast.GrantStmt) and s.targtype == GrantTargetType.ACL_TARGET_OBJECT
            and s.objtype in (ObjectType.OBJECT_TABLE, ObjectType.OBJECT_SEQUENCE)
            and any(o.schemaname in (None, "pg_temp") for o in s.objects or ())):
        return tuple(_qualified(o) for o in s.objects)
    return ()


def _calls_make_table_local(s) -> bool:
    for n in _walk(s):
        if isinstance(n, ast.FuncCall):
            name = [getattr(x, "sval", "") for x in n.funcname]
            if name == ["mtm", "make_table_local"]:
                return True
    return False


_TWO_PHASE = (TransactionStmtKind.TRANS_STMT_PREPARE, TransactionStmtKind.TRANS_STMT_COMMIT_PREPARED,
              TransactionStmtKind.TRANS_STMT_ROLLBACK_PREPARED)


# Plans of plain queries and DML by the statement's shape: pg_query's
# fingerprint of the parse tree, which leaves out constants, so the
# "same statement with other values" that clients send over and over is
# parsed in C (a few microseconds) instead of turned into a Python tree.
_SHAPES: dict[str, Plan] = {}
_SHAPES_MAX = 4096
_SHAPE_TYPES = (ast.SelectStmt, ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt)


def classify(sql: str) -> Plan:
    if _LONE_COMMIT.match(sql):
        return Plan(COMMIT)
    try:
        shape = pglast.parser.fingerprint(sql)
    except pglast.parser.ParseError:
        return Plan(PASS)   # PostgreSQL reports the syntax error itself
    plan = _SHAPES.get(shape)
    if plan is not None:
        return plan
    stmts = pglast.parse_sql(sql)
    plan = _classify(sql, stmts)
    # Only plans that cannot depend on a constant: no DDL text, gid or
    # temp/drop handling, and only reads and DML (whose plan is fixed by
    # their tree's node types and function names, which the fingerprint
    # keeps).
    if (plan.kind in (PASS, WRAP) and not (plan.ddl or plan.temp or plan.drop or plan.sql)
            and stmts and all(isinstance(r.stmt, _SHAPE_TYPES) for r in stmts)):
        if len(_SHAPES) >= _SHAPES_MAX:
            _SHAPES.clear()
        _SHAPES[shape] = plan
    return plan


_TXN = {TransactionStmtKind.TRANS_STMT_BEGIN: "begin", TransactionStmtKind.TRANS_STMT_START: "begin",
        TransactionStmtKind.TRANS_STMT_COMMIT: "commit",
        TransactionStmtKind.TRANS_STMT_ROLLBACK: "rollback",
        TransactionStmtKind.TRANS_STMT_SAVEPOINT: "savepoint",
        TransactionStmtKind.TRANS_STMT_RELEASE: "release",
        TransactionStmtKind.TRANS_STMT_ROLLBACK_TO: "rollback_to"}


def _commits_inside(s) -> bool:
    """A DO block whose PL/pgSQL code runs COMMIT or ROLLBACK (keywords, not
    text in string literals: the scanner tells them apart)."""
    body = lang = None
    for a in s.args or ():
        if a.defname == "as":
            body = a.arg.sval
        elif a.defname == "language":
            lang = a.arg.sval
    if body is None or (lang or "plpgsql").lower() != "plpgsql":
        return False
    try:
        tokens = pglast.parser.scan(body)
    except pglast.parser.ParseError:
        return False
    return any(t.name in ("COMMIT", "ROLLBACK") for t in tokens)


def _classify_one(text: str, s) -> Plan:
    """The plan of one statement ``s`` (its text ``text``)."""
    if isinstance(s, ast.TransactionStmt):
        finish = s.kind in (TransactionStmtKind.TRANS_STMT_COMMIT_PREPARED,
                            TransactionStmtKind.TRANS_STMT_ROLLBACK_PREPARED)
        if finish and (s.gid or "").startswith("MTM-"):
            return Plan(REFUSE, reason=f"transaction {s.gid} is managed by the cluster's "
                                       "commit protocol and cannot be finished by hand")
        if s.kind == TransactionStmtKind.TRANS_STMT_PREPARE:
            return Plan(USER_PREPARE, gid=s.gid)
        if finish:
            return Plan(USER_FINISH, gid=s.gid,
                        commit=s.kind == TransactionStmtKind.TRANS_STMT_COMMIT_PREPARED)
        if s.chain:
            return Plan(REFUSE, reason="COMMIT AND CHAIN / ROLLBACK AND CHAIN is not "
                                       "supported by the cluster")
        txn = _TXN.get(s.kind, "")
        return Plan(COMMIT if txn == "commit" else PASS, txn=txn)
    if isinstance(s, ast.IndexStmt) and s.concurrent:
        return Plan(REFUSE, reason="CREATE INDEX CONCURRENTLY cannot be replicated; "
                                   "use CREATE INDEX")
    if isinstance(s, ast.DropStmt) and s.concurrent:
        return Plan(REFUSE, reason="DROP INDEX CONCURRENTLY cannot be replicated; "
                                   "use DROP INDEX")
    if isinstance(s, (ast.NotifyStmt, ast.ListenStmt, ast.UnlistenStmt)):
        return Plan(PASS, deferred=text)
    if isinstance(s, ast.DoStmt) and _commits_inside(s):
        return Plan(REFUSE, reason="a DO block that runs COMMIT or ROLLBACK cannot run through "
                                   "a cluster node: every commit must go through the cluster's "
                                   "commit protocol, which a block's inner COMMIT bypasses; "
                                   "commit from the client instead")
    if isinstance(s, _PASS_TYPES):
        return Plan(PASS)
    if isinstance(s, ast.ExplainStmt):
        analyze = any(getattr(o, "defname", "") == "analyze" for o in (s.options or ()))
        return Plan(WRAP) if analyze else Plan(PASS)
    if isinstance(s, ast.SelectStmt) and _calls_make_table_local(s):
        return Plan(WRAP, ddl=True, sql=text)
    if isinstance(s, ast.SelectStmt):
        if s.intoClause is not None and s.intoClause.rel.relpersistence == "t":
            return Plan(WRAP, temp=True)
        if s.intoClause is not None:
            return Plan(WRAP, ddl=True, makes_rows=True, sql=text)
        return Plan(WRAP) if _has_function_call(s) else Plan(PASS)
    if isinstance(s, ast.CopyStmt):
        return Plan(WRAP) if s.is_from else Plan(PASS)
    if isinstance(s, _DML_TYPES):
        return Plan(WRAP, procedure=isinstance(s, ast.CallStmt))
    if _is_temp_ddl(s):
        return Plan(WRAP, temp=True)
    if _calls_make_table_local(s):
        return Plan(WRAP, ddl=True, sql=text)
    rels = _grant_rels(s)
    return Plan(WRAP, ddl=True, makes_rows=isinstance(s, ast.CreateTableAsStmt), sql=text,
                drop=isinstance(s, ast.DropStmt),
                staged=not isinstance(s, ast.CreateTableAsStmt) and (
                    _maybe_on_temp(s) or bool(rels)), rels=rels)


def _classify(sql: str, stmts) -> Plan:
    if not stmts:
        return Plan(PASS)
    if len(stmts) == 1:
        return _classify_one(sql, stmts[0].stmt)
    texts = pglast.parser.split(sql, with_parser=True)
    plans = [_classify_one(t, r.stmt) for t, r in zip(texts, stmts)]
    if any(p.kind in (USER_PREPARE, USER_FINISH) for p in plans):
        return Plan(REFUSE, reason="PREPARE TRANSACTION, COMMIT PREPARED and ROLLBACK PREPARED "
                                   "must be sent on their own")
    refused = next((p for p in plans if p.kind == REFUSE), None)
    if refused is not None:
        return refused
    if all(p.kind == PASS and not p.txn and not p.deferred for p in plans):
        return Plan(PASS)
    if any(p.txn or p.ddl or p.temp or p.deferred for p in plans):
        # Transaction commands, DDL (shipped statement by statement) or a
        # NOTIFY among the statements: run them one by one.
        return Plan(SPLIT, parts=tuple(zip(texts, plans)))
    # Reads and data changes only: one implicit transaction, wrapped whole.
    return Plan(WRAP, procedure=any(p.procedure for p in plans))


def capture_sql(query: str, makes_rows: bool, drop: bool = False, staged: bool = False,
                rels: tuple = ()) -> str:
    """One statement, run before a DDL statement, in its transaction: lets
    the DDL guard pass and ships the statement as text with the session
    context it needs. A DROP is only staged: the sql_drop event trigger
    (mtm.on_sql_drop) ships it unless everything it dropped was temporary,
    which exists on this node only. So is DDL on a table that may be
    temporary (``staged``): the ddl_command_end event trigger
    (mtm.on_ddl_end) ships it, after the statement ran, unless every object
    it made or changed is temporary (for GRANT/REVOKE: every table in
    ``rels``). Literals are E'...': they mean the same whatever the
    session's standard_conforming_strings, so the text shipped is exactly
    the text the client sent."""
    extra = f", 'rels', {quote_literal_any(json.dumps(list(rels)))}::json" if rels else ""
    ddl = (f"json_build_object('sql', {quote_literal_any(query)}, "
           "'search_path', current_setting('search_path'), 'role', current_user, "
           f"'makes_rows', {'true' if makes_rows else 'false'}{extra})::text")
    capture = "set_config('mtm.capture', 'on', true)"
    if drop:
        return f"SELECT {capture}, set_config('mtm.pending_drop', {ddl}, true)"
    if staged:
        return f"SELECT {capture}, set_config('mtm.pending_ddl', {ddl}, true)"
    return (f"SELECT {capture}, set_config('mtm.ddl_shipped', 'on', true), "
            f"pg_logical_emit_message(true, 'mtm_ddl', {ddl})")


# Lets temporary-table DDL past the DDL guard without shipping it.
CAPTURE_LOCAL_SQL = "SELECT set_config('mtm.capture', 'on', true)"
DDL_END_SQL = "SELECT pg_logical_emit_message(true, 'mtm_ddl_end', '')"
# At COMMIT: did the transaction write (has an xid), did it touch a
# temporary table, and does it have anything for the peers - DDL it shipped,
# or a lock of a writing mode on a permanent table that is neither local
# (mtm.make_table_local) nor in the mtm schema? A transaction keeps its locks
# on every relation it used until it ends, and writing a table takes at
# least ROW EXCLUSIVE on it (a trigger's writes included). One that only
# wrote local, unlogged or temporary tables, or only advanced sequences
# (node-local by design), commits here without the protocol.
_TEMP_USED = ("EXISTS (SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
              "WHERE l.pid = pg_backend_pid() AND c.relpersistence = 't')")
_DDL_SHIPPED = "coalesce(current_setting('mtm.ddl_shipped', true), '') = 'on'"
_FOR_PEERS = (
    _DDL_SHIPPED + " OR EXISTS ("
    "SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
    "WHERE l.pid = pg_backend_pid() AND l.locktype = 'relation' "
    "AND l.mode NOT IN ('AccessShareLock', 'RowShareLock') "
    "AND c.relkind IN ('r', 'p') AND c.relpersistence = 'p' "
    "AND c.relnamespace <> 'mtm'::regnamespace "
    "AND NOT EXISTS (SELECT 1 FROM mtm.local_tables t WHERE t.rel = c.oid))")


def _commit_check_sql(uses_temp: bool) -> str:
    temp = f"CASE WHEN x IS NULL THEN false ELSE {_TEMP_USED} END" if uses_temp else "false"
    return (f"SELECT x IS NOT NULL, {temp}, CASE WHEN x IS NULL THEN false ELSE {_FOR_PEERS} END, "
            f"{_DDL_SHIPPED} FROM (SELECT pg_current_xact_id_if_assigned() AS x) s")


# by whether the session used temporary tables (the temp check costs a scan)
COMMIT_CHECK_SQL = {False: _commit_check_sql(False), True: _commit_check_sql(True)}


# Before a plain COMMIT of a transaction that used temporary tables: the
# commit guard refuses it if it also wrote replicated tables.
TEMP_COMMIT_MARK_SQL = "SELECT set_config('mtm.temp_commit', 'on', true)"


def prepare_sql(gid: str) -> tuple[str, str]:
    """Our PREPARE, as two statements. The first lets the commit guard pass
    and writes a logical message, which makes sure the transaction decodes
    with content: one that only advanced sequences would otherwise reach the
    peers as a lone COMMIT PREPARED (PG15-FACTS), with nothing to vote on."""
    g = quote_literal_any(gid)
    return (f"SELECT set_config('mtm.preparing', 'on', true), "
            f"pg_logical_emit_message(true, 'mtm_prepare', {g})", f"PREPARE TRANSACTION {g}")


def user_gid_lookup_sql(user_gid: str) -> str:
    """The cluster gid under which the client's ``user_gid`` is prepared."""
    return ("SELECT gid FROM pg_prepared_xacts WHERE database = current_database() "
            "AND gid ~ '^MTM-[0-9]+-[0-9]+-[0-9]+:' "
            f"AND substr(gid, strpos(gid, ':') + 1) = {quote_literal_any(user_gid)}")


def wound_sql(message: str) -> str:
    """Fails the current transaction with 40001 (see Session.wound)."""
    return fail_sql("40001", message)


def fail_sql(sqlstate: str, message: str) -> str:
    """A statement that fails with ``sqlstate``: puts the backend's
    transaction in the state an error leaves it in (the proxy answered the
    client's statement itself, with this error)."""
    return (f"DO $mtm$BEGIN RAISE EXCEPTION USING ERRCODE = '{sqlstate}', MESSAGE = "
            f"{quote_literal_any(message)}; END$mtm$")
