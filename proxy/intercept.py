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

``ddl`` is set when the Query holds DDL to ship as text. The text shipped
is the statement the client sent, except for CREATE TABLE AS / SELECT
INTO, which the peers run WITH NO DATA: the rows the origin made reach
them as rows (an expression like random() gives each node other values).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pglast
from pglast import ast
from pglast.enums import AlterTableType, ConstrType, GrantTargetType, ObjectType, TransactionStmtKind

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
               ast.ClusterStmt, ast.LockStmt)
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
    # DDL that fires event triggers (everything but DDL on shared objects and
    # on event triggers): the DDL guard must let it pass (see capture_call)
    fires: bool = True
    # ALTER TABLE that made every node compute a column's values itself:
    # ((table, column, ONLY, always), ...) for mtm.refresh_column, run after it
    refresh: tuple = ()


def _has_function_call(node) -> bool:
    """Can this read write, or lock rows? A function call, a sub-query, a
    locking clause, or a data-modifying WITH (``WITH x AS (INSERT ...
    RETURNING ...) SELECT ...``)."""
    for n in _walk(node):
        if isinstance(n, (ast.FuncCall, ast.SubLink, ast.InsertStmt, ast.UpdateStmt,
                          ast.DeleteStmt, ast.MergeStmt)) or (
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


# DDL that PostgreSQL runs without firing event triggers: on databases,
# roles, tablespaces, parameters, and on event triggers themselves.
_SHARED_OBJECTS = {ObjectType.OBJECT_DATABASE, ObjectType.OBJECT_ROLE,
                   ObjectType.OBJECT_TABLESPACE, ObjectType.OBJECT_EVENT_TRIGGER,
                   ObjectType.OBJECT_PARAMETER_ACL}
_NO_EVENT_TRIGGERS = (ast.CreateRoleStmt, ast.AlterRoleStmt, ast.AlterRoleSetStmt,
                      ast.DropRoleStmt, ast.GrantRoleStmt, ast.ReassignOwnedStmt,
                      ast.CreateEventTrigStmt, ast.AlterEventTrigStmt, ast.CreateTableSpaceStmt,
                      ast.DropTableSpaceStmt, ast.AlterTableSpaceOptionsStmt,
                      ast.AlterDatabaseStmt, ast.AlterDatabaseRefreshCollStmt)


def _fires_event_triggers(s) -> bool:
    if isinstance(s, _NO_EVENT_TRIGGERS):
        return False
    kind = None
    if isinstance(s, ast.DropStmt):
        kind = s.removeType
    elif isinstance(s, ast.RenameStmt):
        kind = s.renameType
    elif isinstance(s, (ast.AlterOwnerStmt, ast.AlterObjectSchemaStmt)):
        kind = s.objectType
    elif isinstance(s, (ast.CommentStmt, ast.SecLabelStmt, ast.GrantStmt)):
        kind = s.objtype
    return kind not in _SHARED_OBJECTS


def _on_own_event_trigger(s) -> bool:
    names = []
    if isinstance(s, ast.AlterEventTrigStmt):
        names = [s.trigname]
    elif isinstance(s, ast.DropStmt) and s.removeType == ObjectType.OBJECT_EVENT_TRIGGER:
        names = [getattr(o, "sval", "") for o in s.objects or ()]
    elif isinstance(s, (ast.RenameStmt, ast.AlterOwnerStmt)) and (
            getattr(s, "renameType", None) or getattr(s, "objectType", None)) \
            == ObjectType.OBJECT_EVENT_TRIGGER:
        names = [getattr(s.object, "sval", "")]
    return any((n or "").startswith("mtm_") for n in names)


def _with_no_data(text: str, s) -> str:
    """CREATE TABLE AS as the peers run it: WITH NO DATA (the rows come as
    rows). Token surgery on the client's own text, so nothing else in it
    changes."""
    if s.into.skipData:
        return text
    tokens = pglast.parser.scan(text)
    while tokens and tokens[-1].name == "ASCII_59":      # trailing ';'
        tokens.pop()
    end = tokens[-1].end + 1
    if len(tokens) >= 2 and tokens[-2].name == "WITH" and tokens[-1].name == "DATA_P":
        return text[:tokens[-2].start] + "WITH NO DATA" + text[end:]
    return text[:end] + " WITH NO DATA" + text[end:]


def _partition_bound(s):
    """The FOR VALUES of a CREATE TABLE ... PARTITION OF or an ATTACH
    PARTITION, else None."""
    if isinstance(s, ast.CreateStmt):
        return s.partbound
    if isinstance(s, ast.AlterTableStmt):
        for c in s.cmds or ():
            if getattr(c, "subtype", None) == AlterTableType.AT_AttachPartition:
                return c.def_.bound
    return None


def _explained_text(text: str) -> str:
    """The statement an EXPLAIN runs: its text from the first keyword after
    EXPLAIN and its options (a parenthesised list, or ANALYZE/VERBOSE)."""
    depth, started = 0, False
    for t in pglast.parser.scan(text):
        if not started:
            started = t.name == "EXPLAIN"
            continue
        if t.name == "ASCII_40":
            depth += 1
        elif t.name == "ASCII_41":
            depth -= 1
        elif depth == 0 and t.name not in ("ANALYZE", "ANALYSE", "VERBOSE"):
            return text[t.start:]
    return text


def _select_into_as_ctas(s) -> str:
    """SELECT ... INTO t ... as CREATE TABLE t AS SELECT ... WITH NO DATA
    (what PostgreSQL itself turns it into)."""
    from pglast.stream import RawStream
    into = s.intoClause
    query = ast.SelectStmt(**{k: getattr(s, k) for k in s.__slots__ if k != "intoClause"})
    ctas = ast.CreateTableAsStmt(query=query, objtype=ObjectType.OBJECT_TABLE,
                                 into=ast.IntoClause(**{k: getattr(into, k) for k in into.__slots__
                                                        if k != "skipData"}, skipData=True),
                                 is_select_into=False, if_not_exists=False)
    return RawStream()(ctas)


def _nondeterministic(expr) -> bool:
    """Might the expression give each node other values (a function call,
    a subquery, CURRENT_TIMESTAMP and the like)?"""
    return any(isinstance(n, (ast.FuncCall, ast.SubLink, ast.SQLValueFunction))
               for n in _walk(expr))


_SERIAL = {"serial", "serial4", "bigserial", "serial8", "smallserial", "serial2"}


def _refreshes(s) -> tuple:
    """ALTER TABLE ... ADD COLUMN with a default other than a constant, an
    identity or serial column; ALTER COLUMN ... TYPE ... USING an
    expression that calls a function: each node computes the column for
    its own rows. mtm.refresh_column then ships the origin's values (for
    ADD COLUMN only if the default stored is not immutable: it checks)."""
    if not isinstance(s, ast.AlterTableStmt) or s.objtype != ObjectType.OBJECT_TABLE:
        return ()
    out = []
    rel = _qualified(s.relation)
    only = not s.relation.inh
    for cmd in s.cmds or ():
        if not isinstance(cmd, ast.AlterTableCmd) or not isinstance(cmd.def_, ast.ColumnDef):
            continue
        col = cmd.def_
        if cmd.subtype == AlterTableType.AT_AddColumn:
            typ = col.typeName.names[-1].sval if col.typeName and col.typeName.names else ""
            if typ in _SERIAL or any(
                    c.contype == ConstrType.CONSTR_IDENTITY or (
                        c.contype == ConstrType.CONSTR_DEFAULT and _nondeterministic(c.raw_expr))
                    for c in col.constraints or ()):
                out.append((rel, col.colname, only, False))
        elif cmd.subtype == AlterTableType.AT_AlterColumnType and col.raw_default is not None:
            if _nondeterministic(col.raw_default):
                out.append((rel, cmd.name, only, True))
    return tuple(out)


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
    if isinstance(s, ast.RefreshMatViewStmt) and s.concurrent:
        return Plan(REFUSE, reason="REFRESH MATERIALIZED VIEW CONCURRENTLY cannot be "
                                   "replicated: it works in a temporary table, and PostgreSQL "
                                   "cannot PREPARE a transaction that used one; use REFRESH "
                                   "MATERIALIZED VIEW")
    if isinstance(s, ast.DropStmt) and s.concurrent:
        return Plan(REFUSE, reason="DROP INDEX CONCURRENTLY cannot be replicated; "
                                   "use DROP INDEX")
    if isinstance(s, (ast.CreateTableSpaceStmt, ast.DropTableSpaceStmt)):
        return Plan(REFUSE, reason="CREATE/DROP TABLESPACE cannot run through a cluster node: "
                                   "PostgreSQL runs it outside any transaction, and a "
                                   "tablespace is a directory on each node's own disk; create "
                                   "or drop it on every node's PostgreSQL directly, then use "
                                   "it through the cluster (CREATE TABLE ... TABLESPACE and "
                                   "ALTER ... SET TABLESPACE replicate)")
    if isinstance(s, ast.AlterTableStmt) and any(
            getattr(c, "subtype", None) == AlterTableType.AT_DetachPartition
            and getattr(c.def_, "concurrent", False) for c in s.cmds or ()):
        return Plan(REFUSE, reason="DETACH PARTITION CONCURRENTLY cannot be replicated; use "
                                   "DETACH PARTITION")
    bound = _partition_bound(s)
    if bound is not None and _nondeterministic(bound):
        return Plan(REFUSE, reason="a partition bound computed by a function or CURRENT_* "
                                   "cannot be replicated: each node would compute its own "
                                   "bound; write the bound as a constant")
    if isinstance(s, ast.RuleStmt) and s.rulename == "_RETURN":
        return Plan(REFUSE, reason="turning a table into a view with CREATE RULE \"_RETURN\" "
                                   "is not supported by the cluster (PostgreSQL 16 removed it "
                                   "too); use CREATE VIEW")
    if isinstance(s, (ast.CreateSubscriptionStmt, ast.AlterSubscriptionStmt,
                      ast.DropSubscriptionStmt)):
        return Plan(REFUSE, reason="subscriptions are not supported through a cluster node: "
                                   "every node would apply the publisher's changes, and their "
                                   "slots cannot be created or dropped in the transaction that "
                                   "replicates the statement; to load data from another "
                                   "server, subscribe one node's PostgreSQL directly to it "
                                   "with a table made local (mtm.make_table_local) and copy "
                                   "from there through the cluster")
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
        if not analyze:
            return Plan(PASS)
        # EXPLAIN ANALYZE runs the statement: CREATE TABLE AS, SELECT INTO
        # and CREATE MATERIALIZED VIEW under it are DDL like without it
        q = s.query
        if isinstance(q, ast.CreateTableAsStmt) and not isinstance(q.query, ast.ExecuteStmt):
            inner = _explained_text(text)
            if q.objtype == ObjectType.OBJECT_TABLE:
                inner = _with_no_data(inner, q)
            return Plan(WRAP, ddl=True, sql=inner)
        if isinstance(q, ast.SelectStmt) and q.intoClause is not None:
            if q.intoClause.rel.relpersistence == "t":
                return Plan(WRAP, temp=True)
            return Plan(WRAP, ddl=True, sql=_select_into_as_ctas(q))
        return Plan(WRAP)
    if isinstance(s, ast.SelectStmt) and _calls_make_table_local(s):
        return Plan(WRAP, ddl=True, sql=text)
    if isinstance(s, ast.SelectStmt):
        if s.intoClause is not None and s.intoClause.rel.relpersistence == "t":
            return Plan(WRAP, temp=True)
        if s.intoClause is not None:
            return Plan(WRAP, ddl=True, sql=_select_into_as_ctas(s))
        return Plan(WRAP) if _has_function_call(s) else Plan(PASS)
    if isinstance(s, ast.CopyStmt):
        # COPY ... FROM writes; so may COPY (INSERT ... RETURNING ...) TO
        # and COPY (SELECT f()) TO
        return Plan(WRAP) if s.is_from or (s.query is not None and _has_function_call(
            s.query)) else Plan(PASS)
    if isinstance(s, ast.ExecuteStmt):
        # EXECUTE of a statement PREPAREd in SQL: it may be an INSERT,
        # UPDATE, DELETE or MERGE, which must go through the commit protocol
        return Plan(WRAP)
    if isinstance(s, _DML_TYPES):
        return Plan(WRAP, procedure=isinstance(s, ast.CallStmt))
    if _is_temp_ddl(s):
        return Plan(WRAP, temp=True)
    if _calls_make_table_local(s):
        return Plan(WRAP, ddl=True, sql=text)
    if _on_own_event_trigger(s):
        return Plan(REFUSE, reason="the event triggers named mtm_* are mmproxy's own: without "
                                   "them the cluster cannot keep the nodes the same")
    if not _fires_event_triggers(s):
        # no event trigger sees it: shipped now, and the DDL guard is not armed
        return Plan(WRAP, ddl=True, sql=text, fires=False)
    if isinstance(s, ast.CreateTableAsStmt):
        if isinstance(s.query, ast.ExecuteStmt):
            return Plan(REFUSE, reason="CREATE TABLE AS EXECUTE cannot be replicated: the "
                                       "peers do not have the prepared statement; use CREATE "
                                       "TABLE AS SELECT ...")
        if s.objtype == ObjectType.OBJECT_TABLE:
            return Plan(WRAP, ddl=True, sql=_with_no_data(text, s))
        return Plan(WRAP, ddl=True, sql=text)   # a materialized view: each node fills its own
    rels = _grant_rels(s)
    return Plan(WRAP, ddl=True, sql=text, drop=isinstance(s, ast.DropStmt),
                staged=_maybe_on_temp(s) or bool(rels), rels=rels, refresh=_refreshes(s))


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


# The proxy's own calls into mtm in a client's session. Those that only
# the proxy may make take the node's secret (``token``) as a bind
# parameter, so it never appears in a query text (pg_stat_activity shows
# other sessions of the same role their queries' text, not parameters).

CAPTURE_CALL = ("SELECT mtm.capture($1, $2, $3, current_setting('search_path'), current_user, "
                "$4, $5::json)")


def capture_call(plan: Plan, token: str) -> tuple[str, tuple]:
    """Run before a DDL statement, in its transaction: lets the DDL guard
    pass that one statement (if it fires event triggers at all) and ships
    it as text with the session context it needs (search_path, role, the
    settings that change what DDL does: mtm._ddl_settings). A DROP is only
    staged: the sql_drop event trigger (mtm.on_sql_drop) ships it unless
    everything it dropped was temporary, which exists on this node only.
    So is DDL on a table that may be temporary (``plan.staged``): the
    ddl_command_end event trigger (mtm.on_ddl_end) ships it, after the
    statement ran, unless every object it made or changed is temporary (for
    GRANT/REVOKE: every table in ``plan.rels``)."""
    if not plan.fires:
        mode = "ship"       # no event trigger would ship it later
    else:
        mode = "drop" if plan.drop else "staged" if plan.staged else "ship"
    rels = json.dumps(list(plan.rels)) if plan.rels else None
    return CAPTURE_CALL, (token, mode, plan.sql, "t" if plan.fires else "f", rels)


def capture_local_call(token: str) -> tuple[str, tuple]:
    """Lets temporary-table DDL past the DDL guard without shipping it."""
    return "SELECT mtm.capture_local($1)", (token,)


def refresh_calls(plan: Plan, token: str) -> list[tuple[str, tuple]]:
    return [("SELECT mtm.refresh_column($1, $2::regclass, $3, $4, $5)",
             (token, rel, col, "t" if only else "f", "t" if always else "f"))
            for rel, col, only, always in plan.refresh]


def mark_call(gid: str, token: str) -> tuple[str, tuple]:
    """Just before our PREPARE TRANSACTION: lets the commit guard pass this
    transaction, and writes a logical message, which makes sure it decodes
    with content: one that only advanced sequences would otherwise reach the
    peers as a lone COMMIT PREPARED (PG15-FACTS), with nothing to vote on."""
    return "SELECT mtm.mark_prepare($1, $2)", (token, gid)


def prepare_sql(gid: str) -> str:
    return f"PREPARE TRANSACTION {quote_literal_any(gid)}"


# At COMMIT (mtm.commit_check): did the transaction write, did it touch a
# temporary table, has it anything for the peers, did it ship DDL, did it
# change large objects? Five booleans.
COMMIT_CHECK_SQL = {b: f"SELECT * FROM mtm.commit_check({'true' if b else 'false'})"
                    for b in (False, True)}
LARGE_OBJECTS_REFUSED = (
    "large objects cannot be replicated by the cluster, and this transaction created, "
    "changed or removed one; it was rolled back")
LARGE_OBJECTS_HINT = "Store binary data in a bytea column: it is replicated like any value."


# Before a plain COMMIT of a transaction that used temporary tables: the
# commit guard refuses it if it also wrote replicated tables.
TEMP_COMMIT_MARK_SQL = "SELECT set_config('mtm.temp_commit', 'on', true)"


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
