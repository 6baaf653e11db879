"""Setting a node up for the cluster (``mmproxy init-cluster``).

``check_settings`` compares a node's PostgreSQL settings with what
replication needs and names each one that falls short. ``init_node``
creates, idempotently, what the node needs:

- schema ``mtm``: ``mtm.nodes`` (this node's id and the configured nodes),
  ``mtm.precommits`` (durable PRECOMMIT records of the commit protocol),
  ``mtm.local_tables``; nothing in ``mtm`` is ever shipped to peers;
- publication ``mtm_pub`` FOR ALL TABLES (new tables are picked up by it);
- per peer: a two-phase logical slot ``mtm_slot_<peer>`` (this node's
  changes for that peer) and a replication origin ``mtm_node_<peer>``
  (marks what was applied from that peer);
- the safety nets. *Commit guard*: a deferred constraint trigger on every
  table that holds replicated rows fails the COMMIT of any transaction that
  wrote to it without going through the commit protocol (the proxy marks
  the transaction with ``mtm.mark_prepare`` just before its PREPARE
  TRANSACTION), so no write can commit on one node only, whatever path it
  took. *DDL guard*: an event trigger refuses DDL that did not come
  through the proxy's capture path (``mtm.capture``). Appliers run with
  ``session_replication_role = replica``, where neither fires; the event
  trigger that adds the commit guard to new tables is ENABLE ALWAYS so it
  also runs for replicated DDL;
- the node's secret (``mtm.secret``), without which the functions that
  only the proxy may call refuse, and the privileges: every role may use
  what docs/cluster.md "Roles and privileges" lists, nothing else in mtm,
  and not ``pg_logical_emit_message`` (peers trust mtm_* messages).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import psycopg
from psycopg import sql

PUBLICATION = "mtm_pub"
# Sequences step by MAX_NODES and each node takes the values congruent to
# its id (mmts: increment = max node id, start = own id): nodes never hand
# out the same value. Node ids must be below MAX_NODES.
MAX_NODES = 16


def slot_name(peer_id: int) -> str:
    return f"mtm_slot_{peer_id}"


@dataclass(frozen=True)
class Requirement:
    name: str
    needed: int | str
    why: str


def requirements(n_nodes: int) -> list[Requirement]:
    peers = n_nodes - 1
    return [
        Requirement("wal_level", "logical", "changes are shipped through logical decoding"),
        Requirement("max_prepared_transactions", 50 * n_nodes,
                    "every commit is a PREPARE TRANSACTION on every node"),
        Requirement("max_replication_slots", peers + 2, "one logical slot per peer, plus spares"),
        Requirement("max_wal_senders", peers + 2, "one walsender per peer, plus spares"),
    ]


async def check_settings(conn: psycopg.AsyncConnection, n_nodes: int) -> list[str]:
    """Problems, each naming the setting, its value and what is needed."""
    problems = []
    for req in requirements(n_nodes):
        value = (await (await conn.execute("SELECT current_setting(%s)", (req.name,))).fetchone())[0]
        if isinstance(req.needed, int):
            ok = int(value) >= req.needed
            need = f">= {req.needed}"
        else:
            ok = value == req.needed
            need = f"= {req.needed}"
        if not ok:
            problems.append(f"{req.name} is {value}, needs {need} ({req.why}); set it in "
                            "postgresql.conf and restart PostgreSQL")
    return problems


# Settings of the origin session that change what a DDL statement does (how
# it parses literals, where and how it stores what it makes, how it checks
# function bodies): captured with each shipped statement and set on the
# peers before they run it (mmts replays the settings a session changed).
# search_path and the role travel on their own.
DDL_SETTINGS = (
    "DateStyle", "IntervalStyle", "TimeZone", "timezone_abbreviations",
    "standard_conforming_strings", "backslash_quote", "array_nulls", "transform_null_equals",
    "default_table_access_method", "default_tablespace", "default_toast_compression",
    "default_text_search_config", "xmloption", "xmlbinary",
    "lc_monetary", "lc_numeric", "lc_time", "password_encryption", "extra_float_digits",
    "bytea_output", "allow_system_table_mods")

# Catching up, a transaction starts with this check instead of a look-up
# round trip of its own: it raises MM001 ('horizon', 'prepared' or
# 'applied') if the transaction is done here already, and the batch stops
# there (Applier._begin_catchup).
APPLY_CHECK_SQL = r"""
CREATE OR REPLACE FUNCTION mtm.apply_check(g text, k text, src int, l pg_lsn) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog AS $f$
BEGIN
  IF l <= (SELECT lsn FROM mtm.apply_progress WHERE peer = src) THEN
    RAISE EXCEPTION 'horizon' USING ERRCODE = 'MM001';
  END IF;
  IF g <> '' AND EXISTS (SELECT 1 FROM pg_prepared_xacts
                         WHERE gid = g AND database = current_database()) THEN
    RAISE EXCEPTION 'prepared' USING ERRCODE = 'MM001';
  END IF;
  IF EXISTS (SELECT 1 FROM mtm.applied WHERE key = k) THEN
    RAISE EXCEPTION 'applied' USING ERRCODE = 'MM001';
  END IF;
END $f$;
REVOKE ALL ON FUNCTION mtm.apply_check(text, text, int, pg_lsn) FROM PUBLIC;
"""
GUARD_SQL = r"""
CREATE SCHEMA IF NOT EXISTS mtm;
-- Every role may use what is granted below, and nothing else in mtm.
REVOKE ALL ON SCHEMA mtm FROM PUBLIC;
GRANT USAGE ON SCHEMA mtm TO PUBLIC;
CREATE TABLE IF NOT EXISTS mtm.nodes (id int PRIMARY KEY, is_self bool NOT NULL, address text);
CREATE TABLE IF NOT EXISTS mtm.node_state (
  id int PRIMARY KEY, status text NOT NULL, gen_num bigint NOT NULL, gen_members int[] NOT NULL,
  connected int[] NOT NULL, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
-- what the consensus service shows (replication/generations.py view())
ALTER TABLE mtm.node_state ADD COLUMN IF NOT EXISTS consensus jsonb NOT NULL DEFAULT '{}';
-- Precommit records of the commit protocol: state 'p' = precommitted here;
-- 'x' = fenced: this node promised never to acknowledge a precommit of the
-- gid (a recovering coordinator asked; replication/commit.py).
CREATE TABLE IF NOT EXISTS mtm.precommits (gid text PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());
ALTER TABLE mtm.precommits ADD COLUMN IF NOT EXISTS state "char" NOT NULL DEFAULT 'p';
CREATE TABLE IF NOT EXISTS mtm.applied (key text PRIMARY KEY, peer int NOT NULL, lsn pg_lsn NOT NULL);
-- Per peer: every transaction of its stream ending at or below lsn is done
-- here (replication/apply.py, the apply horizon).
CREATE TABLE IF NOT EXISTS mtm.apply_progress (peer int PRIMARY KEY, lsn pg_lsn NOT NULL);
@APPLY_CHECK@
CREATE TABLE IF NOT EXISTS mtm.local_tables (rel regclass PRIMARY KEY);
GRANT SELECT ON mtm.local_tables TO PUBLIC;
-- This node's secret (one row, readable by its owner only): the proxy
-- passes it, as a bind parameter, to the mtm functions that only the proxy
-- may call, and it keys the MACs of the flags those functions set.
CREATE TABLE IF NOT EXISTS mtm.secret (k text NOT NULL);
REVOKE ALL ON mtm.secret FROM PUBLIC;
-- Set only by mtm.mark_prepare (SECURITY DEFINER, proxy only); any role
-- may read currval, which is this session's own: the commit guard's cheap
-- proof that the proxy marked this transaction.
CREATE SEQUENCE IF NOT EXISTS mtm.auth_seq;
REVOKE ALL ON SEQUENCE mtm.auth_seq FROM PUBLIC;
GRANT SELECT ON SEQUENCE mtm.auth_seq TO PUBLIC;
-- One row per transaction in flight that wrote a guarded table (see
-- mtm.guard_note): the commit guard's deferred check hangs on this table,
-- not on the user's, so that a table written earlier in a transaction can
-- still be altered, indexed, truncated or dropped in it (PostgreSQL
-- refuses that while the table has deferred trigger events pending).
-- Unlogged: never in WAL, never published. The proxy deletes the rows of
-- finished transactions every few seconds (ReplicationNode.forget_applied_round).
CREATE UNLOGGED TABLE IF NOT EXISTS mtm.guard_q (xid xid8 PRIMARY KEY, rel text NOT NULL);
REVOKE ALL ON mtm.guard_q FROM PUBLIC;
-- The peers trust every mtm_* logical message in the WAL: only superusers,
-- and the mtm functions below on the proxy's behalf, may write one.
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, bytea) FROM PUBLIC;

-- A MAC of purpose, bound to this transaction, keyed by the secret.
CREATE OR REPLACE FUNCTION mtm._mac(purpose text) RETURNS text
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog AS $f$
  SELECT encode(sha256(convert_to(s.k || ':' || purpose || ':' || pg_current_xact_id()::text,
                                  'UTF8')), 'hex')
  FROM mtm.secret s
$f$;

CREATE OR REPLACE FUNCTION mtm._authorize(token text, what text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
BEGIN
  IF token IS NULL OR NOT EXISTS (SELECT 1 FROM mtm.secret s WHERE s.k = token) THEN
    RAISE EXCEPTION 'mmproxy: % may only be called by the cluster''s proxy', what
      USING ERRCODE = '42501';
  END IF;
END $f$;

-- The DDL guard passes one statement: the next one to start.
CREATE OR REPLACE FUNCTION mtm._arm() RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog AS $f$
  SELECT set_config('mtm.capture', mtm._mac('capture'), true);
$f$;

CREATE OR REPLACE FUNCTION mtm._ddl_settings() RETURNS json
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $f$
  SELECT json_object_agg(n, current_setting(n)) FROM unnest(ARRAY[@DDL_SETTINGS@]::text[]) n
$f$;

-- Called by the proxy before a DDL statement of its client's, in its
-- transaction: lets the DDL guard pass that statement (arm) and ships it
-- as text (mode 'ship': now, as a transactional logical message, in order
-- with the rows; 'drop' / 'staged': after it ran, from the sql_drop /
-- ddl_command_end event trigger, unless it touched only temporary objects).
-- The role it is shipped with must be one the session may become (SET
-- ROLE): the peers run the statement as that role.
CREATE OR REPLACE FUNCTION mtm.capture(token text, mode text, ddl text, path text, role name,
                                       arm bool, rels json DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE payload text;
BEGIN
  PERFORM mtm._authorize(token, 'mtm.capture');
  IF NOT pg_has_role(session_user, role, 'MEMBER') THEN
    RAISE EXCEPTION 'mmproxy: session user % cannot act as role %', session_user, role
      USING ERRCODE = '42501';
  END IF;
  payload := json_build_object('sql', ddl, 'search_path', path, 'role', role,
                               'settings', mtm._ddl_settings(), 'rels', rels)::text;
  IF mode = 'ship' THEN
    PERFORM pg_logical_emit_message(true, 'mtm_ddl', payload);
    PERFORM set_config('mtm.ddl_shipped', 'on', true);
  ELSIF mode IN ('drop', 'staged') THEN
    PERFORM set_config(CASE mode WHEN 'drop' THEN 'mtm.pending_drop' ELSE 'mtm.pending_ddl' END,
                       mtm._mac('pending:' || md5(payload)) || payload, true);
  ELSE
    RAISE EXCEPTION 'mmproxy: unknown capture mode %', mode;
  END IF;
  IF arm THEN
    PERFORM mtm._arm();
  END IF;
END $f$;

-- DDL on temporary objects: passes the guard, is not shipped.
CREATE OR REPLACE FUNCTION mtm.capture_local(token text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
BEGIN
  PERFORM mtm._authorize(token, 'mtm.capture_local');
  PERFORM mtm._arm();
END $f$;

-- Just before the proxy's PREPARE TRANSACTION: lets the commit guard pass
-- this transaction, and writes a logical message, which makes sure it
-- decodes with content (one that only advanced sequences would otherwise
-- reach the peers as a lone COMMIT PREPARED, PG15-FACTS).
CREATE OR REPLACE FUNCTION mtm.mark_prepare(token text, gid text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
BEGIN
  PERFORM mtm._authorize(token, 'mtm.mark_prepare');
  -- setval, not nextval: it sets this session's currval of auth_seq without
  -- touching lastval(), which the client's own sequences own (PDO's
  -- lastInsertId reads it after an autocommit INSERT)
  PERFORM set_config('mtm.preparing',
                     setval('mtm.auth_seq', pg_current_xact_id()::text::bigint, true)::text
                     || ':' || pg_current_xact_id()::text, true);
  PERFORM pg_logical_emit_message(true, 'mtm_prepare', gid);
END $f$;

-- At COMMIT: did the transaction write (has an xid), did it touch a
-- temporary table, does it have anything for the peers - DDL it shipped,
-- or a lock of a writing mode on a permanent table that is neither local
-- (mtm.make_table_local) nor in the mtm schema - and did it change large
-- objects (which the cluster cannot replicate)? A transaction keeps its
-- locks on every relation it used until it ends, and writing a table takes
-- at least ROW EXCLUSIVE on it (a trigger's writes included). One that
-- only wrote local, unlogged or temporary tables, or only advanced
-- sequences (node-local by design), commits here without the protocol.
CREATE OR REPLACE FUNCTION mtm.commit_check(uses_temp bool, OUT wrote bool, OUT used_temp bool,
                                            OUT for_peers bool, OUT ddl_shipped bool,
                                            OUT large_objects bool)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
BEGIN
  wrote := pg_current_xact_id_if_assigned() IS NOT NULL;
  ddl_shipped := coalesce(current_setting('mtm.ddl_shipped', true), '') = 'on';
  IF NOT wrote THEN
    used_temp := false; for_peers := false; large_objects := false;
    RETURN;
  END IF;
  used_temp := uses_temp AND EXISTS (
    SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
    WHERE l.pid = pg_backend_pid() AND c.relpersistence = 't');
  for_peers := ddl_shipped OR EXISTS (
    SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
    WHERE l.pid = pg_backend_pid() AND l.locktype = 'relation'
      AND l.mode NOT IN ('AccessShareLock', 'RowShareLock')
      AND c.relkind IN ('r', 'p') AND c.relpersistence = 'p'
      AND c.relnamespace <> 'mtm'::regnamespace
      AND NOT EXISTS (SELECT 1 FROM mtm.local_tables t WHERE t.rel = c.oid));
  -- (catalog code releases its locks on pg_largeobject at once; the
  -- transaction's own statistics count its changes to any table)
  large_objects := EXISTS (
    SELECT 1 FROM pg_stat_xact_all_tables s
    WHERE s.relid IN ('pg_catalog.pg_largeobject'::regclass,
                      'pg_catalog.pg_largeobject_metadata'::regclass)
      AND s.n_tup_ins + s.n_tup_upd + s.n_tup_del > 0);
END $f$;

-- After ALTER TABLE ... ADD COLUMN with a default that is not a constant
-- (random(), now(), nextval(), an identity or serial column) or ALTER
-- COLUMN ... TYPE ... USING an expression: every node computed the values
-- of its own rows; rewriting the column with the values it has here ships
-- them as row changes, so the peers store this node's values. Runs as the
-- client's role (SECURITY INVOKER): it may update only what it may.
CREATE OR REPLACE FUNCTION mtm._replica_mode(token text, on_ bool) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
BEGIN
  PERFORM mtm._authorize(token, 'mtm.refresh_column');
  PERFORM set_config('session_replication_role', CASE WHEN on_ THEN 'replica' ELSE 'origin' END,
                     true);
END $f$;

CREATE OR REPLACE FUNCTION mtm.refresh_column(token text, rel regclass, col name, only_rel bool,
                                              always bool)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog AS $f$
DECLARE
  has_rows bool;
  ident "char";
  expr text;
  c pg_class%ROWTYPE;
BEGIN
  SELECT * INTO c FROM pg_class WHERE oid = rel;
  IF c.relpersistence <> 'p' OR EXISTS (SELECT 1 FROM mtm.local_tables t WHERE t.rel = c.oid) THEN
    RETURN;     -- not replicated
  END IF;
  SELECT a.attidentity, pg_get_expr(d.adbin, d.adrelid) INTO ident, expr
    FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE a.attrelid = rel AND a.attname = col AND NOT a.attisdropped;
  IF NOT always AND ident = '' AND (expr IS NULL OR NOT mtm._varies(rel, col)) THEN
    RETURN;     -- an immutable default: every node stored the same
  END IF;
  EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s %s)', CASE WHEN only_rel THEN 'ONLY' ELSE '' END, rel)
    INTO STRICT has_rows;
  IF NOT has_rows THEN
    RETURN;     -- no rows: nothing differs
  END IF;
  IF ident = 'a' THEN
    RAISE EXCEPTION 'mmproxy: adding a GENERATED ALWAYS identity column to table % that has rows cannot be replicated', rel
      USING ERRCODE = '0A000',
            HINT = 'Each node would number the existing rows itself. Add the column GENERATED BY DEFAULT AS IDENTITY (then ALTER COLUMN ... SET GENERATED ALWAYS), or add it before the table has rows.';
  END IF;
  IF c.relreplident = 'n' OR (c.relreplident = 'd' AND c.relkind = 'r' AND NOT EXISTS (
        SELECT 1 FROM pg_index i WHERE i.indrelid = rel AND i.indisprimary)) THEN
    RAISE EXCEPTION 'mmproxy: this change to column %.% computes a value per row that every node would compute differently, and table % has no replica identity to ship this node''s values with', rel, col, rel
      USING ERRCODE = '0A000',
            HINT = 'Give the table a primary key (or REPLICA IDENTITY FULL) first, or add the column with a constant default and fill it with UPDATE.';
  END IF;
  -- The rewrite must not look like an UPDATE to the table's own triggers
  -- (an "updated_at" trigger would change the rows): replica mode, as the
  -- client's role, for this one statement.
  PERFORM mtm._replica_mode(token, true);
  EXECUTE format('UPDATE %s %s SET %I = %I', CASE WHEN only_rel THEN 'ONLY' ELSE '' END, rel,
                 col, col);
  PERFORM mtm._replica_mode(token, false);
END $f$;

-- Does the stored default of rel.col call anything that is not immutable
-- (or read a sequence, the clock, a subquery)? Then each node computed its
-- own values (a stable default like now() is even evaluated once per node,
-- at ALTER time, and kept as the rows' "missing" value).
CREATE OR REPLACE FUNCTION mtm._varies(rel regclass, col name) RETURNS bool
LANGUAGE sql STABLE SET search_path = pg_catalog AS $f$
  WITH e AS (SELECT d.adbin::text AS t FROM pg_attrdef d JOIN pg_attribute a
               ON a.attrelid = d.adrelid AND a.attnum = d.adnum
             WHERE d.adrelid = rel AND a.attname = col)
  SELECT e.t ~ '\{(SUBLINK|SQLVALUEFUNCTION|NEXTVALUEEXPR)'
         OR EXISTS (SELECT 1 FROM regexp_matches(e.t, ':funcid (\d+)', 'g') m
                    JOIN pg_proc p ON p.oid = m[1]::oid WHERE p.provolatile <> 'i')
         OR EXISTS (SELECT 1 FROM regexp_matches(e.t, ':opno (\d+)', 'g') m
                    JOIN pg_operator o ON o.oid = m[1]::oid
                    JOIN pg_proc p ON p.oid = o.oprcode WHERE p.provolatile <> 'i')
  FROM e
$f$;

CREATE OR REPLACE FUNCTION mtm.commit_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE mark text := coalesce(current_setting('mtm.preparing', true), '');
BEGIN
  IF coalesce(current_setting('mtm.temp_commit', true), '') = 'on' THEN
    RAISE EXCEPTION 'mmproxy: a transaction that used temporary tables cannot also write to replicated table %', NEW.rel
      USING ERRCODE = '0A000',
            HINT = 'PostgreSQL cannot PREPARE a transaction that touched temporary objects, so it cannot be committed on every node. Write to temporary and replicated tables in separate transactions. Nothing was committed.';
  END IF;
  -- mtm.mark_prepare set the mark from this session's auth_seq, which only
  -- it advances: a session that did not go through the proxy cannot make one.
  IF mark = '' OR mark <> currval('mtm.auth_seq')::text || ':' || pg_current_xact_id()::text THEN
    RAISE EXCEPTION 'mmproxy: this transaction wrote to replicated table % but did not go through the cluster commit protocol', NEW.rel
      USING ERRCODE = '0A000',
            HINT = 'Connect through an mmproxy port, not to PostgreSQL directly; the transaction was rolled back on this node only, so no node diverged.';
  END IF;
  -- (the row stays: deleting it here would read mtm.guard_q in the
  -- client's transaction, and under SERIALIZABLE every writer would then
  -- conflict with every other; the node removes the rows of finished
  -- transactions now and then)
  RETURN NULL;
END $f$;

-- The commit guard's first half, on every guarded table: a statement-level
-- trigger (one call per statement, whatever the number of rows; TRUNCATE
-- included) that queues the transaction's one deferred check by a row in
-- mtm.guard_q. Statement triggers are not cloned onto partitions, so
-- partitioned tables carry one too (a statement on a partitioned table
-- fires the partitioned table's, one on a partition the partition's).
CREATE OR REPLACE FUNCTION mtm.guard_note() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
BEGIN
  INSERT INTO mtm.guard_q VALUES (pg_current_xact_id(), format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME))
    ON CONFLICT DO NOTHING;
  RETURN NULL;
END $f$;

-- Our own DDL (the guard's CREATE/DROP TRIGGER) runs in replica mode, so
-- that the user's own event triggers (ENABLE ORIGIN, the default) do not
-- see a statement the user never ran; mmproxy's (ENABLE ALWAYS) still do.
CREATE OR REPLACE FUNCTION mtm._own_ddl(stmt text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE
  was text := current_setting('session_replication_role');
  -- the user's uncaptured DDL this runs under is judged after it, on its
  -- own objects (see mtm.ddl_guard), not on ours
  uncaptured text := coalesce(current_setting('mtm.uncaptured', true), '');
BEGIN
  PERFORM mtm._arm();    -- our own DDL, run on every node by its own trigger
  PERFORM set_config('mtm.uncaptured', '', true);
  PERFORM set_config('session_replication_role', 'replica', true);
  EXECUTE stmt;
  PERFORM set_config('session_replication_role', was, true);
  PERFORM set_config('mtm.uncaptured', uncaptured, true);
END $f$;

CREATE OR REPLACE FUNCTION mtm._add_commit_guard(rel regclass) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
BEGIN
  -- (an older mmproxy's guard was a deferred row-level constraint trigger)
  IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'mtm_commit_guard'
             AND tgconstraint <> 0) THEN
    PERFORM mtm._own_ddl(format('DROP TRIGGER mtm_commit_guard ON %s', rel));
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'mtm_commit_guard') THEN
    PERFORM mtm._own_ddl(format(
      'CREATE TRIGGER mtm_commit_guard AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s '
      'FOR EACH STATEMENT EXECUTE FUNCTION mtm.guard_note()', rel));
  END IF;
END $f$;

CREATE OR REPLACE FUNCTION mtm._drop_commit_guard(rel regclass) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'mtm_commit_guard'
             AND tgparentid = 0) THEN
    PERFORM mtm._own_ddl(format('DROP TRIGGER mtm_commit_guard ON %s', rel));
  END IF;
END $f$;

-- Which tables carry the guard: permanent tables and partitioned tables,
-- outside mtm, not made local. Reconciled after every CREATE/ALTER TABLE (SET
-- LOGGED / UNLOGGED change it).
CREATE OR REPLACE FUNCTION mtm._guard_wanted(rel regclass) RETURNS bool
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $f$
  SELECT c.relkind IN ('r', 'p') AND c.relpersistence = 'p' AND n.nspname <> 'mtm'
         AND n.nspname NOT LIKE 'pg\_%' AND n.nspname <> 'information_schema'
         AND NOT EXISTS (SELECT 1 FROM mtm.local_tables t WHERE t.rel = c.oid)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel
$f$;

CREATE OR REPLACE FUNCTION mtm.on_create_table() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE r record;
BEGIN
  FOR r IN SELECT DISTINCT objid FROM pg_event_trigger_ddl_commands()
           WHERE object_type = 'table' AND schema_name NOT IN ('mtm', 'pg_temp')
             AND schema_name NOT LIKE 'pg_temp%'
  LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_class WHERE oid = r.objid) THEN
      CONTINUE;
    END IF;
    IF mtm._guard_wanted(r.objid::regclass) THEN
      PERFORM mtm._add_commit_guard(r.objid::regclass);
    ELSE
      PERFORM mtm._drop_commit_guard(r.objid::regclass);
    END IF;
  END LOOP;
END $f$;

CREATE OR REPLACE FUNCTION mtm.adjust_sequence(seq regclass) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE
  me int := (SELECT id FROM mtm.nodes WHERE is_self);
  step int := @MAX_NODES@;
  inc bigint; st bigint; lv bigint; called bool; cur bigint; nxt bigint; st2 bigint;
BEGIN
  SELECT increment_by, start_value INTO inc, st FROM pg_sequences
   WHERE format('%I.%I', schemaname, sequencename)::regclass = seq;
  IF inc IS DISTINCT FROM 1 AND inc IS DISTINCT FROM step THEN
    RETURN;   -- custom or descending increments are left as they are
  END IF;
  EXECUTE format('SELECT last_value, is_called FROM %s', seq) INTO lv, called;
  cur := CASE WHEN called THEN lv + inc ELSE lv END;   -- the value it gives next
  nxt := cur + ((me - cur) % step + step) % step;
  -- START moves too: a later plain RESTART (ALTER SEQUENCE ... RESTART,
  -- TRUNCATE ... RESTART IDENTITY) must stay on this node's values.
  st2 := st + ((me - st) % step + step) % step;
  IF inc = step AND nxt = cur AND st2 = st THEN
    RETURN;   -- on this node's values already (also ends the recursion below)
  END IF;
  -- (an ALTER SEQUENCE fires this trigger again)
  PERFORM mtm._arm();
  EXECUTE format('ALTER SEQUENCE %s INCREMENT BY %s START WITH %s RESTART WITH %s',
                 seq, step, st2, nxt);
END $f$;

CREATE OR REPLACE FUNCTION mtm.alter_sequences() RETURNS int
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE r record; n int := 0;
BEGIN
  FOR r IN SELECT c.oid FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace
           WHERE c.relkind = 'S' AND ns.nspname NOT IN ('mtm', 'pg_catalog', 'information_schema')
  LOOP
    PERFORM mtm.adjust_sequence(r.oid::regclass);
    n := n + 1;
  END LOOP;
  RETURN n;
END $f$;

CREATE OR REPLACE FUNCTION mtm.on_create_sequence() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE r record;
BEGIN
  -- (a temporary sequence is the session's own: it counts 1, 2, 3 as on
  -- PostgreSQL)
  FOR r IN SELECT d.objid FROM pg_event_trigger_ddl_commands() d
             JOIN pg_class c ON c.oid = d.objid
           WHERE d.object_type = 'sequence' AND d.schema_name <> 'mtm'
             AND c.relpersistence <> 't'
  LOOP
    PERFORM mtm.adjust_sequence(r.objid::regclass);
  END LOOP;
END $f$;

-- A table whose changes stay on its node. Called through a proxy, the call
-- is shipped like DDL, so every node marks the table local. Only the
-- table's owner (or a member of the owning role) may.
CREATE OR REPLACE FUNCTION mtm.make_table_local(rel regclass) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
BEGIN
  IF NOT pg_has_role(session_user, (SELECT relowner FROM pg_class WHERE oid = rel), 'USAGE') THEN
    RAISE EXCEPTION 'must be owner of table %', rel USING ERRCODE = '42501';
  END IF;
  INSERT INTO mtm.local_tables VALUES (rel) ON CONFLICT DO NOTHING;
  PERFORM mtm._drop_commit_guard(rel);
END $f$;

-- Monitoring, with mmts's columns. The proxy refreshes mtm.node_state every
-- half second; a state older than 3 s means its proxy is not running.
DROP FUNCTION IF EXISTS mtm.status();
CREATE FUNCTION mtm.status(
    OUT my_node_id int, OUT status text, OUT connected int[], OUT gen_num bigint,
    OUT gen_members int[], OUT gen_members_online int[], OUT gen_configured int[],
    OUT gen_donors int[], OUT raft_term bigint, OUT raft_leader int, OUT raft_role text,
    OUT lease_valid bool, OUT suspects int[], OUT agreed bool, OUT catchup_lag_ms bigint,
    OUT catchup_donor int)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $f$
  SELECT n.id,
         CASE WHEN s.id IS NULL OR s.updated_at < clock_timestamp() - interval '3 seconds'
              THEN 'disabled' ELSE s.status END,
         coalesce(s.connected, '{}'), coalesce(s.gen_num, 0), coalesce(s.gen_members, '{}'),
         ARRAY(SELECT k::int FROM jsonb_each_text(s.consensus -> 'status') e(k, v)
               WHERE v = 'online' ORDER BY k::int),
         ARRAY(SELECT id FROM mtm.nodes ORDER BY id),
         ARRAY(SELECT x::int FROM jsonb_array_elements_text(s.consensus -> 'donors') x),
         (s.consensus ->> 'raft_term')::bigint, (s.consensus ->> 'raft_leader')::int,
         s.consensus ->> 'raft_role', (s.consensus ->> 'lease_valid')::bool,
         ARRAY(SELECT x::int FROM jsonb_array_elements_text(s.consensus -> 'suspects') x),
         coalesce((s.consensus ->> 'agreed')::bool, false),
         (s.consensus ->> 'catchup_lag_ms')::bigint,
         (s.consensus ->> 'catchup_donor')::int
  FROM mtm.nodes n LEFT JOIN mtm.node_state s ON s.id = n.id
  WHERE n.is_self
$f$;

DROP FUNCTION IF EXISTS mtm.nodes();
CREATE FUNCTION mtm.nodes()
RETURNS TABLE (id int, conninfo text, is_self bool, enabled bool, connected bool,
               sender_pid int, receiver_pid int, n_workers int, receiver_mode text,
               replication_lag_bytes numeric, applied_remote_lsn pg_lsn,
               status text, last_online_in bigint, marker_reached bigint,
               is_raft_leader bool, suspected bool)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $f$
  SELECT n.id, n.address, n.is_self, true,
         n.is_self OR coalesce(n.id = ANY((SELECT st.connected FROM mtm.status() st)::int[]),
                               false),
         sl.active_pid, aw.pid, CASE WHEN n.is_self THEN 0 ELSE aw.workers::int END,
         -- what this node applies from the peer (replication/receiver.py): its
         -- own transactions (normal), every origin to catch up (recovery), nothing
         CASE WHEN n.is_self THEN NULL
              ELSE CASE me.consensus -> 'streams' -> n.id::text ->> 'applying'
                     WHEN 'own' THEN 'normal' WHEN 'all' THEN 'recovery' ELSE 'off' END END,
         CASE WHEN n.is_self THEN 0
              ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), sl.confirmed_flush_lsn) END,
         ap.remote_lsn,
         me.consensus -> 'status' ->> n.id::text,
         (me.consensus -> 'last_online_in' ->> n.id::text)::bigint,
         (me.consensus -> 'markers_reached' ->> n.id::text)::bigint,
         (me.consensus ->> 'raft_leader')::int IS NOT DISTINCT FROM n.id,
         n.id IN (SELECT x::int FROM jsonb_array_elements_text(me.consensus -> 'suspects') x)
  FROM mtm.nodes n
  LEFT JOIN mtm.node_state me ON me.id = (SELECT id FROM mtm.nodes WHERE is_self)
  LEFT JOIN pg_replication_slots sl ON sl.slot_name = 'mtm_slot_' || n.id
  -- each applier of a peer has its own origin: mtm_node_<id>, mtm_node_<id>_<k>
  LEFT JOIN LATERAL (
    SELECT max(os.remote_lsn) AS remote_lsn FROM pg_replication_origin o
      JOIN pg_replication_origin_status os ON os.local_id = o.roident
     WHERE o.roname = 'mtm_node_' || n.id OR o.roname LIKE 'mtm\_node\_' || n.id || '\_%') ap ON true
  LEFT JOIN LATERAL (
    SELECT min(a.pid) AS pid, count(*) AS workers FROM pg_stat_activity a
     WHERE a.application_name = 'mmproxy apply from node ' || n.id
        OR a.application_name LIKE 'mmproxy apply from node ' || n.id || ' #%') aw ON true
  ORDER BY n.id
$f$;

CREATE OR REPLACE FUNCTION mtm.ping() RETURNS bool
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE st record;
BEGIN
  SELECT * INTO st FROM mtm.status();
  IF st.status IS DISTINCT FROM 'online' THEN
    RAISE EXCEPTION 'multimaster node is not online: current status "%"', coalesce(st.status, 'disabled')
      USING ERRCODE = '55000';
  END IF;
  IF st.gen_members_online <> st.gen_members THEN
    RAISE EXCEPTION 'node(s) % of generation % are not online',
      ARRAY(SELECT unnest(st.gen_members) EXCEPT SELECT unnest(st.gen_members_online)), st.gen_num
      USING ERRCODE = '55000';
  END IF;
  IF NOT st.agreed THEN
    RAISE EXCEPTION 'the members of generation % do not all agree on it yet', st.gen_num
      USING ERRCODE = '55000';
  END IF;
  RETURN true;
END $f$;

-- Refuses DDL that the proxy did not capture. Each capture lets exactly
-- one statement through (the flag is a MAC bound to the transaction, and
-- is consumed here), so DDL run later in the transaction from a function
-- or DO block is refused too.
CREATE OR REPLACE FUNCTION mtm.ddl_guard() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE flag text := coalesce(current_setting('mtm.capture', true), '');
BEGIN
  IF flag <> '' AND flag = mtm._mac('capture') THEN
    PERFORM set_config('mtm.capture', '', true);
    RETURN;
  END IF;
  -- DDL that may touch only temporary objects (a function's CREATE TEMP
  -- TABLE, REFRESH MATERIALIZED VIEW's work table): judged once it ran, by
  -- mtm.on_ddl_end / mtm.on_sql_drop, which refuse it unless every object
  -- it touched is temporary (and so this node's only).
  IF tg_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'CREATE INDEX',
                'CREATE SEQUENCE', 'CREATE VIEW', 'ALTER TABLE', 'ALTER SEQUENCE',
                'ALTER INDEX', 'ALTER VIEW', 'CREATE TRIGGER', 'CREATE RULE', 'COMMENT',
                'DROP TABLE', 'DROP INDEX', 'DROP SEQUENCE', 'DROP VIEW', 'DROP TRIGGER',
                'DROP RULE') THEN
    PERFORM set_config('mtm.uncaptured', tg_tag, true);
    RETURN;
  END IF;
  PERFORM mtm._not_captured(tg_tag);
END $f$;

-- Is an object a DDL command reported temporary: in the session's
-- temporary schema, or belonging to a temporary table (a trigger, rule or
-- policy on one)?
CREATE OR REPLACE FUNCTION mtm._temp_object(schema_name text, classid oid, objid oid)
RETURNS bool LANGUAGE sql STABLE SET search_path = pg_catalog AS $f$
  SELECT schema_name = 'pg_temp' OR EXISTS (
    SELECT 1 FROM pg_depend d JOIN pg_class c ON c.oid = d.refobjid
    WHERE d.classid = $2 AND d.objid = $3
      AND d.refclassid = 'pg_class'::regclass AND c.relpersistence = 't')
$f$;

CREATE OR REPLACE FUNCTION mtm._not_captured(tag text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
BEGIN
  RAISE EXCEPTION 'mmproxy: % was not captured for replication', tag
    USING ERRCODE = '0A000',
          HINT = 'Run DDL through an mmproxy port, as a statement of its own; DDL inside DO blocks and functions cannot be replicated (DDL on temporary objects only can). To change this node only, a superuser may SET session_replication_role = replica first.';
END $f$;
"""


def _ship_staged_sql(func: str, setting: str, counts: str, refusal: str,
                     uncaptured: str) -> str:
    """An event trigger function that ships the DDL the proxy staged in
    ``setting`` (see mtm.capture) unless every object it touched - ``counts``
    sets n_temp and n_all - is temporary, and so exists on this node only;
    touching both kinds at once is refused. The staged text carries a MAC
    (mtm._mac): a session cannot stage a statement of its own making."""
    return f"""
CREATE OR REPLACE FUNCTION mtm.{func}() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE
  staged text := coalesce(current_setting('mtm.{setting}', true), '');
  pending text;
  n_temp int;
  n_all int;
BEGIN
  IF coalesce(current_setting('mtm.uncaptured', true), '') <> '' THEN
    -- DDL the DDL guard let run uncaptured (see mtm.ddl_guard): only on
    -- temporary objects may it stay
    {uncaptured}
    RETURN;
  END IF;
  IF staged = '' THEN
    RETURN;
  END IF;
  PERFORM set_config('mtm.{setting}', '', true);
  pending := substr(staged, 65);
  IF left(staged, 64) <> mtm._mac('pending:' || md5(pending)) THEN
    RAISE EXCEPTION 'mmproxy: staged DDL was not staged by the proxy' USING ERRCODE = '42501';
  END IF;
  {counts}
  IF n_all > 0 AND n_temp = n_all THEN
    RETURN;     -- only temporary objects: they exist on this node only
  END IF;
  IF n_temp > 0 THEN
    RAISE EXCEPTION {refusal};
  END IF;
  PERFORM pg_logical_emit_message(true, 'mtm_ddl', pending);
  PERFORM set_config('mtm.ddl_shipped', 'on', true);
END $f$;
"""


# A DROP is staged by the proxy and shipped from the sql_drop event.
ON_SQL_DROP_SQL = _ship_staged_sql(
    "on_sql_drop", "pending_drop",
    "SELECT count(*) FILTER (WHERE is_temporary), count(*) INTO n_temp, n_all\n"
    "    FROM pg_event_trigger_dropped_objects() WHERE original;",
    "'mmproxy: a DROP of temporary and permanent objects together cannot be replicated'\n"
    "      USING ERRCODE = '0A000', HINT = 'Drop the temporary objects in a statement of "
    "their own.'",
    # (ddl_command_end follows, and finds the flag cleared)
    "IF EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() WHERE original\n"
    "                AND NOT is_temporary) THEN\n"
    "      PERFORM mtm._not_captured(current_setting('mtm.uncaptured'));\n"
    "    END IF;\n"
    "    PERFORM set_config('mtm.uncaptured', '', true);")

# So is DDL on a table that may be temporary, from ddl_command_end, after
# the statement ran: temporary are the objects in the session's temporary
# schema, and those belonging to a temporary table (a trigger, rule or
# policy on one). Both triggers are ENABLE ALWAYS: a staged statement is
# never left unshipped.
ON_DDL_END_SQL = _ship_staged_sql(
    "on_ddl_end", "pending_ddl",
    # GRANT/REVOKE are reported without their objects: the proxy staged the
    # names it gave (see intercept.capture_sql).
    "IF tg_tag IN ('GRANT', 'REVOKE') THEN\n"
    "    SELECT count(*) FILTER (WHERE c.relpersistence = 't'), count(*) INTO n_temp, n_all\n"
    "      FROM json_array_elements_text(coalesce(pending::json -> 'rels', '[]')) r(name)\n"
    "      LEFT JOIN pg_class c ON c.oid = to_regclass(r.name);\n"
    "  ELSE\n"
    "    SELECT count(*) FILTER (WHERE mtm._temp_object(x.schema_name, x.classid, x.objid)),\n"
    "           count(*)\n"
    "      INTO n_temp, n_all FROM pg_event_trigger_ddl_commands() x;\n"
    "  END IF;",
    "'mmproxy: % changed temporary and permanent objects together; it cannot be "
    "replicated', tg_tag\n      USING ERRCODE = '0A000'",
    # a DROP was judged by mtm.on_sql_drop (one that dropped nothing changed
    # nothing); anything else must have touched temporary objects only
    "PERFORM set_config('mtm.uncaptured', '', true);\n"
    "    IF tg_tag NOT LIKE 'DROP %' AND NOT EXISTS (\n"
    "        SELECT 1 FROM pg_event_trigger_ddl_commands() x) OR EXISTS (\n"
    "        SELECT 1 FROM pg_event_trigger_ddl_commands() x\n"
    "        WHERE NOT mtm._temp_object(x.schema_name, x.classid, x.objid)) THEN\n"
    "      PERFORM mtm._not_captured(tg_tag);\n"
    "    END IF;")

EVENT_TRIGGERS_SQL = r"""
DO $d$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'mtm_on_create_table') THEN
    CREATE EVENT TRIGGER mtm_on_create_table ON ddl_command_end
      WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')
      EXECUTE FUNCTION mtm.on_create_table();
    ALTER EVENT TRIGGER mtm_on_create_table ENABLE ALWAYS;
  ELSIF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'mtm_on_create_table'
                    AND 'ALTER TABLE' = ANY(evttags)) THEN
    -- older versions did not reconcile the guard after ALTER TABLE
    DROP EVENT TRIGGER mtm_on_create_table;
    CREATE EVENT TRIGGER mtm_on_create_table ON ddl_command_end
      WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')
      EXECUTE FUNCTION mtm.on_create_table();
    ALTER EVENT TRIGGER mtm_on_create_table ENABLE ALWAYS;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'mtm_on_create_sequence') THEN
    CREATE EVENT TRIGGER mtm_on_create_sequence ON ddl_command_end
      WHEN TAG IN ('CREATE SEQUENCE', 'ALTER SEQUENCE', 'CREATE TABLE', 'ALTER TABLE',
                   'CREATE TABLE AS')
      EXECUTE FUNCTION mtm.on_create_sequence();
    ALTER EVENT TRIGGER mtm_on_create_sequence ENABLE ALWAYS;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'mtm_on_sql_drop') THEN
    CREATE EVENT TRIGGER mtm_on_sql_drop ON sql_drop EXECUTE FUNCTION mtm.on_sql_drop();
  END IF;
  ALTER EVENT TRIGGER mtm_on_sql_drop ENABLE ALWAYS;
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'mtm_on_ddl_end') THEN
    CREATE EVENT TRIGGER mtm_on_ddl_end ON ddl_command_end EXECUTE FUNCTION mtm.on_ddl_end();
  END IF;
  ALTER EVENT TRIGGER mtm_on_ddl_end ENABLE ALWAYS;
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'mtm_ddl_guard') THEN
    CREATE EVENT TRIGGER mtm_ddl_guard ON ddl_command_start EXECUTE FUNCTION mtm.ddl_guard();
  END IF;
END $d$;
"""


# The functions of mtm that any role may call (the proxy calls the first
# five in its clients' sessions, with the node's secret); everything else in
# mtm is for the proxy's own connections and superusers.
PUBLIC_FUNCTIONS = (
    "capture(text, text, text, text, name, bool, json)", "capture_local(text)",
    "mark_prepare(text, text)", "commit_check(bool)",
    "refresh_column(text, regclass, name, bool, bool)", "_varies(regclass, name)",
    "_replica_mode(text, bool)",
    "commit_guard()", "guard_note()", "make_table_local(regclass)", "status()", "nodes()", "ping()")


async def init_node(conn: psycopg.AsyncConnection, node_id: int, all_ids: list[int],
                    addresses: dict[int, str] | None = None) -> None:
    """Idempotent: safe to run again on a node that is already set up."""
    assert conn.autocommit
    c = conn
    # Our own DDL: replica mode keeps the DDL guard (and every other
    # ordinary event trigger) out of it.
    await c.execute("SET session_replication_role = replica")
    settings = ", ".join(f"'{name}'" for name in DDL_SETTINGS)
    await c.execute(GUARD_SQL.replace("@MAX_NODES@", str(MAX_NODES))
                    .replace("@DDL_SETTINGS@", settings).replace("@APPLY_CHECK@", APPLY_CHECK_SQL))
    # Older versions' functions that the ones above replace.
    await c.execute("DROP FUNCTION IF EXISTS mtm.add_commit_guard(regclass)")
    await c.execute("DROP FUNCTION IF EXISTS mtm.refresh_column(regclass, name, bool)")
    await c.execute("DROP FUNCTION IF EXISTS mtm.refresh_column(text, regclass, name, bool)")
    async with c.transaction():
        if not await (await c.execute("SELECT 1 FROM mtm.secret")).fetchone():
            await c.execute("INSERT INTO mtm.secret VALUES (%s)", (secrets.token_hex(32),))
        await c.execute("DELETE FROM mtm.nodes")
        for i in all_ids:
            await c.execute("INSERT INTO mtm.nodes VALUES (%s, %s, %s)",
                            (i, i == node_id, (addresses or {}).get(i)))
    await c.execute("""
        DO $d$ BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'mtm.guard_q'::regclass
                         AND tgname = 'mtm_guard_check') THEN
            CREATE CONSTRAINT TRIGGER mtm_guard_check AFTER INSERT ON mtm.guard_q
              DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION mtm.commit_guard();
          END IF;
        END $d$""")
    # The commit guard on every replicated table (also converting an older
    # mmproxy's row-level guard), and on nothing else.
    await c.execute("""
        SELECT CASE WHEN mtm._guard_wanted(c.oid::regclass)
                    THEN mtm._add_commit_guard(c.oid::regclass)
                    ELSE mtm._drop_commit_guard(c.oid::regclass) END
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p')
          AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'mtm')
          AND n.nspname NOT LIKE 'pg_toast%'
        ORDER BY c.relkind DESC""")
    if not await (await c.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                                   (PUBLICATION,))).fetchone():
        await c.execute(sql.SQL("CREATE PUBLICATION {} FOR ALL TABLES").format(
            sql.Identifier(PUBLICATION)))
    await c.execute(ON_SQL_DROP_SQL)
    await c.execute(ON_DDL_END_SQL)
    await c.execute(EVENT_TRIGGERS_SQL)
    await c.execute("REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA mtm FROM PUBLIC")
    for f in PUBLIC_FUNCTIONS:
        await c.execute(f"GRANT EXECUTE ON FUNCTION mtm.{f} TO PUBLIC")
    await c.execute("SELECT mtm.alter_sequences()")
    await c.execute("RESET session_replication_role")
    for peer in all_ids:
        if peer == node_id:
            continue
        slot = slot_name(peer)
        if not await (await c.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                                       (slot,))).fetchone():
            await c.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput', false, true)",
                            (slot,))
        origin = f"mtm_node_{peer}"
        if not await (await c.execute("SELECT 1 FROM pg_replication_origin WHERE roname = %s",
                                       (origin,))).fetchone():
            await c.execute("SELECT pg_replication_origin_create(%s)", (origin,))


async def read_secret(conn: psycopg.AsyncConnection) -> str | None:
    """This node's secret (see mtm.secret), or None on a node set up by an
    older version (``mmproxy init-cluster`` adds it)."""
    if not (await (await conn.execute("SELECT to_regclass('mtm.secret') IS NOT NULL")).fetchone())[0]:
        return None
    row = await (await conn.execute("SELECT k FROM mtm.secret")).fetchone()
    return row[0] if row else None


async def is_initialized(conn: psycopg.AsyncConnection) -> bool:
    row = await (await conn.execute("SELECT to_regclass('mtm.nodes') IS NOT NULL")).fetchone()
    return bool(row[0])


async def init_local_node(cfg) -> list[str]:
    """``mmproxy init-cluster``: check and set up the node ``cfg`` describes.
    Returns the problems found (nothing is changed when there are any)."""
    pg = cfg.postgres
    ids = sorted([cfg.node.id] + [p.id for p in cfg.peers])
    async with await psycopg.AsyncConnection.connect(pg.conninfo(), password=pg.password(),
                                                     autocommit=True) as conn:
        problems = await check_settings(conn, len(ids))
        if not problems:
            addresses = {cfg.node.id: cfg.node.listen}
            addresses.update({p.id: p.client_address for p in cfg.peers})
            await init_node(conn, cfg.node.id, ids, addresses)
        return problems
