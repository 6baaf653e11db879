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

from common.sql import quote_ident, quote_literal

COMMIT, PASS, WRAP, REFUSE = "commit", "pass", "wrap", "refuse"
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


def combine(plans: list) -> Plan:
    """The plan of an extended-protocol batch: the strictest of its Executes."""
    if not plans:
        return Plan(PASS)
    if any(p.kind in (USER_PREPARE, USER_FINISH) for p in plans):
        return Plan(REFUSE, reason="PREPARE TRANSACTION, COMMIT PREPARED and ROLLBACK PREPARED "
                                   "go through the cluster with the simple query protocol only")
    for kind in (REFUSE, COMMIT):
        for p in plans:
            if p.kind == kind:
                return p
    wraps = [p for p in plans if p.kind == WRAP]
    if not wraps:
        return Plan(PASS)
    ddl = [p for p in wraps if p.ddl]
    if len(ddl) > 1:
        return Plan(REFUSE, reason="more than one DDL statement in one extended-protocol "
                                   "batch cannot be replicated; send them one by one")
    return ddl[0] if ddl else wraps[0]


def _has_function_call(node) -> bool:
    for n in _walk(node):
        if isinstance(n, (ast.FuncCall, ast.SubLink)) or (
                isinstance(n, ast.SelectStmt) and n.lockingClause):
            return True
    return False


def _writes_rows(s) -> bool:
    """May ``s`` write rows (as opposed to DDL)?"""
    if isinstance(s, _DML_TYPES):
        return True
    if isinstance(s, ast.CopyStmt):
        return bool(s.is_from)
    if isinstance(s, ast.ExplainStmt):
        return any(getattr(o, "defname", "") == "analyze" for o in (s.options or ()))
    if isinstance(s, ast.SelectStmt):
        return (s.intoClause is None and not _calls_make_table_local(s)
                and _has_function_call(s))
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


def _classify(sql: str, stmts) -> Plan:
    if not stmts:
        return Plan(PASS)
    if len(stmts) > 1 and any(
            isinstance(r.stmt, ast.TransactionStmt) and r.stmt.kind in _TWO_PHASE for r in stmts):
        return Plan(REFUSE, reason="PREPARE TRANSACTION, COMMIT PREPARED and ROLLBACK PREPARED "
                                   "must be sent on their own")
    kinds = []
    ddl = makes_rows = False
    for raw in stmts:
        s = raw.stmt
        if isinstance(s, ast.TransactionStmt):
            finish = s.kind in (TransactionStmtKind.TRANS_STMT_COMMIT_PREPARED,
                                TransactionStmtKind.TRANS_STMT_ROLLBACK_PREPARED)
            if finish and (s.gid or "").startswith("MTM-"):
                return Plan(REFUSE, reason=f"transaction {s.gid} is managed by the cluster's "
                                           "commit protocol and cannot be finished by hand")
            if s.kind == TransactionStmtKind.TRANS_STMT_PREPARE or finish:
                if s.kind == TransactionStmtKind.TRANS_STMT_PREPARE:
                    return Plan(USER_PREPARE, gid=s.gid)
                return Plan(USER_FINISH, gid=s.gid,
                            commit=s.kind == TransactionStmtKind.TRANS_STMT_COMMIT_PREPARED)
            if s.chain:
                return Plan(REFUSE, reason="COMMIT AND CHAIN / ROLLBACK AND CHAIN is not "
                                           "supported by the cluster")
            return Plan(PASS)   # the client manages its transaction itself
        if isinstance(s, ast.IndexStmt) and s.concurrent:
            return Plan(REFUSE, reason="CREATE INDEX CONCURRENTLY cannot be replicated; "
                                       "use CREATE INDEX")
        if isinstance(s, ast.DropStmt) and s.concurrent:
            return Plan(REFUSE, reason="DROP INDEX CONCURRENTLY cannot be replicated; "
                                       "use DROP INDEX")
        if isinstance(s, _PASS_TYPES):
            kinds.append(PASS)
        elif isinstance(s, ast.ExplainStmt):
            analyze = any(getattr(o, "defname", "") == "analyze" for o in (s.options or ()))
            kinds.append(WRAP if analyze else PASS)
        elif isinstance(s, ast.SelectStmt) and _calls_make_table_local(s):
            ddl = True
            kinds.append(WRAP)
        elif isinstance(s, ast.SelectStmt):
            if s.intoClause is not None and s.intoClause.rel.relpersistence == "t":
                return Plan(WRAP, temp=True)
            if s.intoClause is not None:
                ddl = makes_rows = True
                kinds.append(WRAP)
            else:
                kinds.append(WRAP if _has_function_call(s) else PASS)
        elif isinstance(s, ast.CopyStmt):
            kinds.append(WRAP if s.is_from else PASS)
        elif isinstance(s, _DML_TYPES):
            kinds.append(WRAP)
        elif _is_temp_ddl(s):
            return Plan(WRAP, temp=True)
        elif _calls_make_table_local(s):
            ddl = True
            kinds.append(WRAP)
        else:
            ddl = True
            if isinstance(s, ast.CreateTableAsStmt):
                makes_rows = True
            kinds.append(WRAP)
    if WRAP in kinds:
        if ddl and len(stmts) > 1 and any(_writes_rows(r.stmt) for r in stmts):
            # The DDL is shipped as the string's text and replayed whole on
            # the peers, which would run the data changes twice.
            return Plan(REFUSE, reason="a query string that changes both the schema and data "
                                       "cannot be replicated; send the DDL in a query of its own")
        if ddl:
            sql_text = sql
        else:
            sql_text = ""
        if any(isinstance(r.stmt, _PASS_TYPES) and isinstance(
                r.stmt, (ast.VacuumStmt, ast.CreatedbStmt, ast.DropdbStmt, ast.AlterSystemStmt))
                for r in stmts):
            return Plan(REFUSE, reason="this statement cannot run in the same query string as "
                                       "statements that change data; send it on its own")
        drop = len(stmts) == 1 and isinstance(stmts[0].stmt, ast.DropStmt)
        one = stmts[0].stmt if len(stmts) == 1 and ddl and not makes_rows else None
        rels = _grant_rels(one)
        staged = one is not None and (_maybe_on_temp(one) or bool(rels))
        return Plan(WRAP, ddl=ddl, makes_rows=makes_rows, sql=sql_text, drop=drop,
                    staged=staged, rels=rels)
    return Plan(PASS)


def capture_sql(query: str, makes_rows: bool, drop: bool = False, staged: bool = False,
                rels: tuple = ()) -> str:
    """Run before a DDL Query, in its transaction: lets the DDL guard pass
    and ships the statement as text with the session context it needs.
    A DROP is only staged: the sql_drop event trigger (mtm.on_sql_drop)
    ships it unless everything it dropped was temporary, which exists on
    this node only. So is DDL on a table that may be temporary (``staged``):
    the ddl_command_end event trigger (mtm.on_ddl_end) ships it, after the
    statement ran, unless every object it made or changed is temporary
    (for GRANT/REVOKE: every table in ``rels``)."""
    extra = f", 'rels', {quote_literal(json.dumps(list(rels)))}::json" if rels else ""
    ddl = (f"json_build_object('sql', {quote_literal(query)}, "
           "'search_path', current_setting('search_path'), 'role', current_user, "
           f"'makes_rows', {'true' if makes_rows else 'false'}{extra})::text")
    if drop:
        return f"SET LOCAL mtm.capture = 'on'; SELECT set_config('mtm.pending_drop', {ddl}, true)"
    if staged:
        return f"SET LOCAL mtm.capture = 'on'; SELECT set_config('mtm.pending_ddl', {ddl}, true)"
    return ("SET LOCAL mtm.capture = 'on'; SET LOCAL mtm.ddl_shipped = 'on'; "
            f"SELECT pg_logical_emit_message(true, 'mtm_ddl', {ddl})")


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


TEMP_COMMIT_SQL = "SET LOCAL mtm.temp_commit = 'on'; COMMIT"


def prepare_sql(gid: str) -> str:
    """Our PREPARE. The logical message makes sure the transaction decodes
    with content: one that only advanced sequences would otherwise reach the
    peers as a lone COMMIT PREPARED (PG15-FACTS), with nothing to vote on."""
    g = quote_literal(gid)
    return (f"SET LOCAL mtm.preparing = 'on'; "
            f"SELECT pg_logical_emit_message(true, 'mtm_prepare', {g}); PREPARE TRANSACTION {g}")


def user_gid_lookup_sql(user_gid: str) -> str:
    """The cluster gid under which the client's ``user_gid`` is prepared."""
    return ("SELECT gid FROM pg_prepared_xacts WHERE database = current_database() "
            "AND gid ~ '^MTM-[0-9]+-[0-9]+-[0-9]+:' "
            f"AND substr(gid, strpos(gid, ':') + 1) = {quote_literal(user_gid)}")


def wound_sql(message: str) -> str:
    """Fails the current transaction with 40001 (see Session.wound)."""
    return ("DO $mtm$BEGIN RAISE EXCEPTION USING ERRCODE = '40001', MESSAGE = "
            f"{quote_literal(message)}; END$mtm$")
