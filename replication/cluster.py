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
  replicated table fails the COMMIT of any transaction that wrote to it
  without going through the commit protocol (the proxy sets
  ``mtm.preparing`` just before its PREPARE TRANSACTION), so no write can
  commit on one node only, whatever path it took. *DDL guard*: an event
  trigger refuses DDL that did not come through the proxy's capture path
  (``mtm.capture``). Appliers run with ``session_replication_role =
  replica``, where neither fires; the event trigger that adds the commit
  guard to new tables is ENABLE ALWAYS so it also runs for replicated DDL.
"""
from __future__ import annotations

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


GUARD_SQL = r"""
CREATE SCHEMA IF NOT EXISTS mtm;
CREATE TABLE IF NOT EXISTS mtm.nodes (id int PRIMARY KEY, is_self bool NOT NULL, address text);
CREATE TABLE IF NOT EXISTS mtm.node_state (
  id int PRIMARY KEY, status text NOT NULL, gen_num bigint NOT NULL, gen_members int[] NOT NULL,
  connected int[] NOT NULL, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
-- Precommit records of the commit protocol: state 'p' = precommitted here;
-- 'x' = fenced: this node promised never to acknowledge a precommit of the
-- gid (a recovering coordinator asked; replication/commit.py).
CREATE TABLE IF NOT EXISTS mtm.precommits (gid text PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());
ALTER TABLE mtm.precommits ADD COLUMN IF NOT EXISTS state "char" NOT NULL DEFAULT 'p';
CREATE TABLE IF NOT EXISTS mtm.applied (key text PRIMARY KEY, peer int NOT NULL, lsn pg_lsn NOT NULL);
-- Per peer: every transaction of its stream ending at or below lsn is done
-- here (replication/apply.py, the apply horizon).
CREATE TABLE IF NOT EXISTS mtm.apply_progress (peer int PRIMARY KEY, lsn pg_lsn NOT NULL);
CREATE TABLE IF NOT EXISTS mtm.local_tables (rel regclass PRIMARY KEY);

CREATE OR REPLACE FUNCTION mtm.commit_guard() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  IF coalesce(current_setting('mtm.temp_commit', true), '') = 'on' THEN
    RAISE EXCEPTION 'mmproxy: a transaction that used temporary tables cannot also write to replicated table %.%', TG_TABLE_SCHEMA, TG_TABLE_NAME
      USING ERRCODE = '0A000',
            HINT = 'PostgreSQL cannot PREPARE a transaction that touched temporary objects, so it cannot be committed on every node. Write to temporary and replicated tables in separate transactions. Nothing was committed.';
  END IF;
  IF coalesce(current_setting('mtm.preparing', true), '') <> 'on' THEN
    RAISE EXCEPTION 'mmproxy: this transaction wrote to replicated table %.% but did not go through the cluster commit protocol', TG_TABLE_SCHEMA, TG_TABLE_NAME
      USING ERRCODE = '0A000',
            HINT = 'Connect through an mmproxy port, not to PostgreSQL directly; the transaction was rolled back on this node only, so no node diverged.';
  END IF;
  RETURN NULL;
END $f$;

CREATE OR REPLACE FUNCTION mtm.add_commit_guard(rel regclass) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'mtm_commit_guard') THEN
    EXECUTE format('CREATE CONSTRAINT TRIGGER mtm_commit_guard AFTER INSERT OR UPDATE OR DELETE ON %s '
                   'DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION mtm.commit_guard()', rel);
  END IF;
END $f$;

CREATE OR REPLACE FUNCTION mtm.on_create_table() RETURNS event_trigger LANGUAGE plpgsql AS $f$
DECLARE r record;
BEGIN
  FOR r IN SELECT objid FROM pg_event_trigger_ddl_commands()
           WHERE object_type = 'table' AND schema_name NOT IN ('mtm', 'pg_temp')
             AND schema_name NOT LIKE 'pg_temp%'
  LOOP
    IF (SELECT relpersistence FROM pg_class WHERE oid = r.objid) = 'p' THEN
      PERFORM mtm.add_commit_guard(r.objid::regclass);
    END IF;
  END LOOP;
END $f$;

CREATE OR REPLACE FUNCTION mtm.adjust_sequence(seq regclass) RETURNS void LANGUAGE plpgsql AS $f$
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
  EXECUTE format('ALTER SEQUENCE %s INCREMENT BY %s START WITH %s RESTART WITH %s',
                 seq, step, st2, nxt);
END $f$;

CREATE OR REPLACE FUNCTION mtm.alter_sequences() RETURNS int LANGUAGE plpgsql AS $f$
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

CREATE OR REPLACE FUNCTION mtm.on_create_sequence() RETURNS event_trigger LANGUAGE plpgsql AS $f$
DECLARE r record;
BEGIN
  FOR r IN SELECT objid FROM pg_event_trigger_ddl_commands()
           WHERE object_type = 'sequence'
  LOOP
    PERFORM mtm.adjust_sequence(r.objid::regclass);
  END LOOP;
END $f$;

-- A table whose changes stay on its node. Called through a proxy, the call
-- is shipped like DDL, so every node marks the table local.
CREATE OR REPLACE FUNCTION mtm.make_table_local(rel regclass) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
  INSERT INTO mtm.local_tables VALUES (rel) ON CONFLICT DO NOTHING;
  EXECUTE format('DROP TRIGGER IF EXISTS mtm_commit_guard ON %s', rel);
END $f$;

-- Monitoring, with mmts's columns. The proxy refreshes mtm.node_state every
-- half second; a state older than 3 s means its proxy is not running.
CREATE OR REPLACE FUNCTION mtm.status(
    OUT my_node_id int, OUT status text, OUT connected int[], OUT gen_num bigint,
    OUT gen_members int[], OUT gen_members_online int[], OUT gen_configured int[])
LANGUAGE sql STABLE AS $f$
  SELECT n.id,
         CASE WHEN s.id IS NULL OR s.updated_at < clock_timestamp() - interval '3 seconds'
              THEN 'disabled' ELSE s.status END,
         coalesce(s.connected, '{}'), coalesce(s.gen_num, 0), coalesce(s.gen_members, '{}'),
         ARRAY(SELECT m FROM unnest(coalesce(s.gen_members, '{}')) m
               WHERE m = n.id OR m = ANY(s.connected) ORDER BY m),
         ARRAY(SELECT id FROM mtm.nodes ORDER BY id)
  FROM mtm.nodes n LEFT JOIN mtm.node_state s ON s.id = n.id
  WHERE n.is_self
$f$;

CREATE OR REPLACE FUNCTION mtm.nodes()
RETURNS TABLE (id int, conninfo text, is_self bool, enabled bool, connected bool,
               sender_pid int, receiver_pid int, n_workers int, receiver_mode text,
               replication_lag_bytes numeric, applied_remote_lsn pg_lsn)
LANGUAGE sql STABLE AS $f$
  SELECT n.id, n.address, n.is_self, true,
         n.is_self OR coalesce(n.id = ANY((SELECT st.connected FROM mtm.status() st)::int[]),
                               false),
         sl.active_pid, aw.pid, CASE WHEN n.is_self THEN 0 ELSE aw.workers::int END,
         CASE WHEN n.is_self THEN NULL ELSE 'normal' END,
         CASE WHEN n.is_self THEN 0
              ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), sl.confirmed_flush_lsn) END,
         ap.remote_lsn
  FROM mtm.nodes n
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

CREATE OR REPLACE FUNCTION mtm.ping() RETURNS bool LANGUAGE plpgsql STABLE AS $f$
DECLARE st record;
BEGIN
  SELECT * INTO st FROM mtm.status();
  IF st.status IS DISTINCT FROM 'online' THEN
    RAISE EXCEPTION 'multimaster node is not online: current status "%"', coalesce(st.status, 'disabled')
      USING ERRCODE = '55000';
  END IF;
  IF st.gen_members_online <> st.gen_members THEN
    RAISE EXCEPTION 'node(s) % of generation % are not connected',
      ARRAY(SELECT unnest(st.gen_members) EXCEPT SELECT unnest(st.gen_members_online)), st.gen_num
      USING ERRCODE = '55000';
  END IF;
  RETURN true;
END $f$;

CREATE OR REPLACE FUNCTION mtm.ddl_guard() RETURNS event_trigger LANGUAGE plpgsql AS $f$
BEGIN
  IF coalesce(current_setting('mtm.capture', true), '') <> 'on' THEN
    RAISE EXCEPTION 'mmproxy: % was not captured for replication', tg_tag
      USING ERRCODE = '0A000',
            HINT = 'Run DDL through an mmproxy port; inside DO blocks and functions it cannot be replicated.';
  END IF;
END $f$;
"""

def _ship_staged_sql(func: str, setting: str, counts: str, refusal: str) -> str:
    """An event trigger function that ships the DDL the proxy staged in
    ``setting`` (see intercept.capture_sql) unless every object it touched
    - ``counts`` sets n_temp and n_all - is temporary, and so exists on
    this node only; touching both kinds at once is refused."""
    return f"""
CREATE OR REPLACE FUNCTION mtm.{func}() RETURNS event_trigger LANGUAGE plpgsql AS $f$
DECLARE
  pending text := coalesce(current_setting('mtm.{setting}', true), '');
  n_temp int;
  n_all int;
BEGIN
  IF pending = '' THEN
    RETURN;
  END IF;
  PERFORM set_config('mtm.{setting}', '', true);
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
    "their own.'")

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
    "    SELECT count(*) FILTER (WHERE x.schema_name = 'pg_temp' OR EXISTS (\n"
    "             SELECT 1 FROM pg_depend d JOIN pg_class c ON c.oid = d.refobjid\n"
    "             WHERE d.classid = x.classid AND d.objid = x.objid\n"
    "               AND d.refclassid = 'pg_class'::regclass AND c.relpersistence = 't')),\n"
    "           count(*)\n"
    "      INTO n_temp, n_all FROM pg_event_trigger_ddl_commands() x;\n"
    "  END IF;",
    "'mmproxy: % changed temporary and permanent objects together; it cannot be "
    "replicated', tg_tag\n      USING ERRCODE = '0A000'")

EVENT_TRIGGERS_SQL = r"""
DO $d$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'mtm_on_create_table') THEN
    CREATE EVENT TRIGGER mtm_on_create_table ON ddl_command_end
      WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
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


async def init_node(conn: psycopg.AsyncConnection, node_id: int, all_ids: list[int],
                    addresses: dict[int, str] | None = None) -> None:
    """Idempotent: safe to run again on a node that is already set up."""
    assert conn.autocommit
    c = conn
    await c.execute("SET mtm.capture = 'on'")   # our own DDL passes the DDL guard
    await c.execute(GUARD_SQL.replace("@MAX_NODES@", str(MAX_NODES)))
    async with c.transaction():
        await c.execute("DELETE FROM mtm.nodes")
        for i in all_ids:
            await c.execute("INSERT INTO mtm.nodes VALUES (%s, %s, %s)",
                            (i, i == node_id, (addresses or {}).get(i)))
    # guard every existing replicated table
    await c.execute("""
        SELECT mtm.add_commit_guard(c.oid::regclass) FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'p'
          AND n.nspname NOT IN ('mtm', 'pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg_toast%'""")
    if not await (await c.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                                   (PUBLICATION,))).fetchone():
        await c.execute(sql.SQL("CREATE PUBLICATION {} FOR ALL TABLES").format(
            sql.Identifier(PUBLICATION)))
    await c.execute(ON_SQL_DROP_SQL)
    await c.execute(ON_DDL_END_SQL)
    await c.execute(EVENT_TRIGGERS_SQL)
    await c.execute("SELECT mtm.alter_sequences()")
    await c.execute("RESET mtm.capture")
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
