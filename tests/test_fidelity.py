"""Issue 11: a cluster node behaves like PostgreSQL for every role and every
statement, and DDL never leaves the nodes different. A real 3-node cluster;
after each scenario every node is compared (catalog facts and table
digests read directly from each PostgreSQL)."""
from __future__ import annotations

import psycopg
import pytest

from conftest import Cluster, wait_for


@pytest.fixture(scope="module")
def cluster(workdir):
    c = Cluster(workdir, 3, name="fidelity")
    with psycopg.connect(c.dsn(1), autocommit=True) as conn:
        conn.execute("CREATE ROLE app LOGIN")
        conn.execute("CREATE ROLE other LOGIN")
        conn.execute("CREATE TABLE app_t (id int PRIMARY KEY, v text)")
        conn.execute("GRANT ALL ON app_t TO app")
        conn.execute("CREATE SCHEMA app_s AUTHORIZATION app")
    yield c
    c.stop()


def direct(c: Cluster, i: int, q: str, params=None, user: str = "postgres") -> list:
    with psycopg.connect(c.direct(i).dsn(user=user), autocommit=True) as conn:
        return conn.execute(q, params).fetchall()


def same_everywhere(c: Cluster, q: str, expect=None) -> list:
    """``q`` gives the same answer on every node (read on each PostgreSQL
    directly) once replication settled; returns it."""
    def answers():
        return [direct(c, i, q) for i in range(1, c.n + 1)]
    wait_for(lambda: all(a == answers()[0] for a in answers()[1:]), timeout=10,
             what=f"the same answer to {q!r} on every node")
    a = answers()[0]
    if expect is not None:
        assert a == expect
    return a


def digest(table: str) -> str:
    return (f"SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) "
            f"FROM {table} t")


def sqlstate(c: Cluster, dsn: str, q: str) -> str | None:
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(q)
    except psycopg.Error as e:
        return e.sqlstate
    return None


# -- 1. ordinary roles --------------------------------------------------------------------

def test_a_plain_role_writes_every_way(cluster):
    with psycopg.connect(cluster.dsn(1, user="app"), autocommit=True) as c:
        c.execute("INSERT INTO app_t VALUES (1, 'simple')", prepare=False)   # simple Query
        c.execute("INSERT INTO app_t VALUES (%s, %s)", (2, "extended"))
        with c.transaction():                                      # BEGIN ... COMMIT
            c.execute("INSERT INTO app_t VALUES (3, 'block')")
            c.execute("UPDATE app_t SET v = v || '!' WHERE id = 1")
    with psycopg.connect(cluster.dsn(2), autocommit=True) as c:    # a superuser, SET ROLE
        c.execute("SET ROLE app")
        c.execute("INSERT INTO app_t VALUES (4, 'set role')")
        assert c.execute("SELECT current_user").fetchone() == ("app",)
    # the proxy's commit marking leaves the client's lastval() alone (PDO's
    # lastInsertId reads it after an autocommit INSERT)
    with psycopg.connect(cluster.dsn(1, user="app"), autocommit=True) as c:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            c.execute("SELECT lastval()")
        c.execute("INSERT INTO app_t VALUES (5, 'five')")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            c.execute("SELECT lastval()")
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE serials (id serial PRIMARY KEY)")
        c.execute("INSERT INTO serials DEFAULT VALUES")
        assert c.execute("SELECT lastval() = (SELECT max(id) FROM serials)").fetchone() == (True,)
        c.execute("DELETE FROM app_t WHERE id = 5")
    same_everywhere(cluster, "SELECT * FROM app_t ORDER BY id",
                    [(1, "simple!"), (2, "extended"), (3, "block"), (4, "set role")])
    # what PostgreSQL refuses the role, the cluster refuses it too
    assert sqlstate(cluster, cluster.dsn(3, user="other"),
                    "INSERT INTO app_t VALUES (9, 'no')") == "42501"


def test_a_plain_role_runs_ddl_owned_by_it_everywhere(cluster):
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE SCHEMA appschema AUTHORIZATION app")
    with psycopg.connect(cluster.dsn(2, user="app"), autocommit=True) as c:
        c.execute("CREATE TABLE appschema.mine (id serial PRIMARY KEY, v text)")
        c.execute("INSERT INTO appschema.mine (v) VALUES ('a'), ('b')")
        c.execute("CREATE INDEX ON appschema.mine (v)")
    same_everywhere(cluster, "SELECT relname, relowner::regrole::text FROM pg_class "
                             "WHERE relnamespace = 'appschema'::regnamespace ORDER BY 1",
                    [("mine", "app"), ("mine_id_seq", "app"), ("mine_pkey", "app"),
                     ("mine_v_idx", "app")])
    same_everywhere(cluster, "SELECT v FROM appschema.mine ORDER BY v", [("a",), ("b",)])
    # DDL the role may not run is refused on the origin, as PostgreSQL does
    assert sqlstate(cluster, cluster.dsn(1, user="other"),
                    "CREATE TABLE appschema.theirs (id int)") == "42501"


def test_a_plain_role_cannot_forge_protocol_state_or_call_admin_functions(cluster):
    app_direct = cluster.direct(2).dsn(user="app")
    refused = {
        "SELECT pg_logical_emit_message(true, 'mtm_ddl', '{\"sql\": \"DROP TABLE app_t\"}')":
            "42501",
        "SELECT mtm.capture('guess', 'ship', 'DROP TABLE app_t', 'public', 'app', true)": "42501",
        "SELECT mtm.capture_local('guess')": "42501",
        "SELECT mtm.mark_prepare('guess', 'MTM-1-1-1')": "42501",
        "SELECT * FROM mtm.secret": "42501",
        "SELECT mtm._arm()": "42501",
        "SELECT mtm._mac('capture')": "42501",
        "SELECT mtm.adjust_sequence('app_t')": "42501",
        "SELECT mtm.alter_sequences()": "42501",
        "SELECT mtm._replica_mode('guess', true)": "42501",
        "SELECT mtm.make_table_local('app_t')": "42501",     # not its owner
        "DELETE FROM mtm.precommits": "42501",
        "INSERT INTO mtm.local_tables VALUES ('app_t')": "42501",
        # a flag set by hand lets nothing through: DDL (in a schema it may
        # create in), or a commit without the protocol
        "SET mtm.capture = 'on'; SET mtm.uncaptured = ''; CREATE TABLE app_s.forged (id int)":
            "0A000",
        # (55000: the mark's proof is a sequence only mtm.mark_prepare advances,
        # which this session never did)
        "BEGIN; INSERT INTO app_t VALUES (50, 'x'); SET LOCAL mtm.preparing = '1:1'; COMMIT":
            "55000",
    }
    for q, code in refused.items():
        assert sqlstate(cluster, app_direct, q) == code, q
    # through a proxy too: the token is the node's, not something to guess
    assert sqlstate(cluster, cluster.dsn(1, user="app"),
                    "SELECT mtm.capture('guess', 'ship', 'DROP TABLE app_t', 'public', "
                    "'app', true)") == "42501"
    # the monitoring functions are for everyone
    with psycopg.connect(cluster.dsn(3, user="app"), autocommit=True) as c:
        assert c.execute("SELECT mtm.ping()").fetchone() == (True,)
        assert c.execute("SELECT count(*) FROM mtm.nodes()").fetchone() == (3,)
        assert c.execute("SELECT status FROM mtm.status()").fetchone() == ("online",)
    same_everywhere(cluster, "SELECT count(*) FROM app_t WHERE id = 50", [(0,)])
    same_everywhere(cluster, "SELECT to_regclass('app_s.forged') IS NULL", [(True,)])


def test_rls_definer_functions_and_default_privileges_replicate(cluster):
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT ON TABLES "
                  "TO app")
        c.execute("CREATE TABLE docs (id int PRIMARY KEY, owner name NOT NULL, body text)")
        c.execute("ALTER TABLE docs ENABLE ROW LEVEL SECURITY")
        c.execute("CREATE POLICY own_docs ON docs USING (owner = current_user) "
                  "WITH CHECK (owner = current_user)")
        c.execute("CREATE TABLE audit (who name, what text)")
        c.execute("REVOKE ALL ON audit FROM app")
        c.execute("CREATE FUNCTION log_it(t text) RETURNS void LANGUAGE sql SECURITY DEFINER "
                  "SET search_path = public AS $$INSERT INTO audit VALUES (session_user, t)$$")
        c.execute("INSERT INTO docs VALUES (1, 'other', 'theirs')")
    with psycopg.connect(cluster.dsn(2, user="app"), autocommit=True) as c:
        c.execute("INSERT INTO docs VALUES (2, 'app', 'mine')")
        assert c.execute("SELECT id FROM docs").fetchall() == [(2,)]      # RLS
        c.execute("SELECT log_it('hello')")              # writes audit as its owner
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("INSERT INTO audit VALUES ('app', 'direct')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):        # WITH CHECK
            c.execute("INSERT INTO docs VALUES (3, 'other', 'forged')")
    same_everywhere(cluster, "SELECT * FROM docs ORDER BY id",
                    [(1, "other", "theirs"), (2, "app", "mine")])
    same_everywhere(cluster, "SELECT * FROM audit", [("app", "hello")])
    same_everywhere(cluster, "SELECT relacl::text, relrowsecurity FROM pg_class "
                             "WHERE oid = 'docs'::regclass")
    same_everywhere(cluster, "SELECT has_table_privilege('app', 'docs', 'INSERT'), "
                             "has_table_privilege('app', 'audit', 'INSERT')", [(True, False)])
    same_everywhere(cluster, "SELECT polname, pg_get_expr(polqual, polrelid) FROM pg_policy")


# -- 2. DDL that must mean the same on every node -----------------------------------------

def test_ddl_text_and_session_settings_travel_exactly(cluster):
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("SET standard_conforming_strings = off")
        c.execute("SET escape_string_warning = off")
        c.execute("CREATE TABLE scs (id int PRIMARY KEY, p text DEFAULT E'C:\\\\dir', "
                  "q text DEFAULT 'D:\\\\dir', r text DEFAULT 'it\\'s')")
        c.execute("INSERT INTO scs (id) VALUES (1)")
        c.execute("RESET standard_conforming_strings")
        c.execute("CREATE ACCESS METHOD heap2 TYPE TABLE HANDLER heap_tableam_handler")
        c.execute("SET default_table_access_method = heap2")
        c.execute("SET DateStyle = 'SQL, DMY'")
        c.execute("CREATE TABLE am_t (id int PRIMARY KEY, d date DEFAULT '01/02/2020')")
        c.execute("RESET default_table_access_method")
        c.execute("RESET DateStyle")
    same_everywhere(cluster, "SELECT p, q, r FROM scs", [("C:\\dir", "D:\\dir", "it's")])
    same_everywhere(cluster, "SELECT amname FROM pg_class c JOIN pg_am a ON a.oid = c.relam "
                             "WHERE c.oid = 'am_t'::regclass", [("heap2",)])
    same_everywhere(cluster, "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef "
                             "WHERE adrelid = 'am_t'::regclass", [("'2020-02-01'::date",)])


def test_volatile_ddl_leaves_every_node_with_the_origins_values(cluster):
    with psycopg.connect(cluster.dsn(2), autocommit=True) as c:
        c.execute("CREATE TABLE vol (id int PRIMARY KEY, n int)")
        c.execute("INSERT INTO vol SELECT g, g FROM generate_series(1, 30) g")
        c.execute("CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS "
                  "$$BEGIN NEW.n := -1; RETURN NEW; END$$")
        c.execute("CREATE TRIGGER touch BEFORE UPDATE ON vol FOR EACH ROW "
                  "EXECUTE FUNCTION touch()")
        c.execute("ALTER TABLE vol ADD COLUMN r float8 DEFAULT random()")
        c.execute("ALTER TABLE vol ADD COLUMN ts timestamptz DEFAULT clock_timestamp(), "
                  "ADD COLUMN s serial, ADD COLUMN k int DEFAULT 7")
        c.execute("ALTER TABLE vol ADD COLUMN t timestamptz DEFAULT now()")
        # in a transaction block, through the simple and the extended protocol
        c.execute("BEGIN")
        c.execute("ALTER TABLE vol ADD COLUMN r2 float8 DEFAULT random()")
        c.execute("COMMIT")
        with c.transaction():
            c.execute("ALTER TABLE vol ADD COLUMN r3 float8 DEFAULT random()", prepare=True)
        c.execute("ALTER TABLE vol ALTER COLUMN n TYPE float8 USING n + random()")
        c.execute("CREATE TABLE ctas AS SELECT g AS id, random() AS r FROM generate_series(1, 20) g")
        c.execute("SELECT g AS id, random() AS r INTO sel_into FROM generate_series(1, 20) g")
        c.execute("ALTER TABLE ctas ADD PRIMARY KEY (id)")
    # the rows were rewritten with this node's values, not through the
    # table's own UPDATE trigger (n was not set to -1)
    assert direct(cluster, 2, "SELECT count(*) FROM vol WHERE n < 0") == [(0,)]
    for t in ("vol", "ctas", "sel_into"):
        same_everywhere(cluster, digest(t))
    same_everywhere(cluster, "SELECT count(*) FROM ctas", [(20,)])
    # a table with no replica identity cannot carry the origin's values
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE nokey (n int)")
        c.execute("INSERT INTO nokey VALUES (1), (2)")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="replica identity"):
            c.execute("ALTER TABLE nokey ADD COLUMN r float8 DEFAULT random()")
        c.execute("ALTER TABLE nokey ADD COLUMN k int DEFAULT 1")      # a constant is fine
        c.execute("CREATE TABLE idt (n int PRIMARY KEY)")
        c.execute("INSERT INTO idt VALUES (1)")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="GENERATED ALWAYS"):
            c.execute("ALTER TABLE idt ADD COLUMN i int GENERATED ALWAYS AS IDENTITY")
        c.execute("ALTER TABLE idt ADD COLUMN i int GENERATED BY DEFAULT AS IDENTITY")
    same_everywhere(cluster, "SELECT attname FROM pg_attribute WHERE attrelid = "
                             "'nokey'::regclass AND attnum > 0 ORDER BY attnum",
                    [("n",), ("k",)])
    same_everywhere(cluster, digest("idt"))


def test_event_trigger_ddl_replicates_and_mmproxys_own_are_protected(cluster):
    with psycopg.connect(cluster.dsn(3), autocommit=True) as c:
        c.execute("CREATE FUNCTION note_ddl() RETURNS event_trigger LANGUAGE plpgsql AS "
                  "$$BEGIN RAISE NOTICE 'ddl %', tg_tag; END$$")
        c.execute("CREATE EVENT TRIGGER note_ddl ON ddl_command_start "
                  "EXECUTE FUNCTION note_ddl()")
        same_everywhere(cluster, "SELECT evtenabled FROM pg_event_trigger "
                                 "WHERE evtname = 'note_ddl'", [("O",)])
        c.execute("ALTER EVENT TRIGGER note_ddl DISABLE")
        same_everywhere(cluster, "SELECT evtenabled FROM pg_event_trigger "
                                 "WHERE evtname = 'note_ddl'", [("D",)])
        c.execute("DROP EVENT TRIGGER note_ddl")
        # the guard was not left armed by it: DDL from a DO block is still refused
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            c.execute("DO $$BEGIN EXECUTE 'CREATE TABLE sneaky (id int)'; END$$")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            c.execute("DROP EVENT TRIGGER mtm_ddl_guard")
    same_everywhere(cluster, "SELECT count(*) FROM pg_event_trigger WHERE evtname = 'note_ddl'",
                    [(0,)])
    same_everywhere(cluster, "SELECT to_regclass('sneaky') IS NULL", [(True,)])


def test_large_objects_are_refused_and_nothing_commits(cluster):
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="large objects"):
            c.execute("SELECT lo_from_bytea(0, 'abc')")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="large objects"):
            with c.transaction():
                c.execute("INSERT INTO app_t VALUES (60, 'with a large object')")
                c.execute("SELECT lo_create(0)")
    for i in (1, 2, 3):
        assert direct(cluster, i, "SELECT count(*) FROM pg_largeobject_metadata") == [(0,)]
    same_everywhere(cluster, "SELECT count(*) FROM app_t WHERE id = 60", [(0,)])


# -- 3. partitioning and identity -----------------------------------------------------------

def test_partitioning_in_all_its_forms(cluster):
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE meas (id int, region text, v int, PRIMARY KEY (id, region)) "
                  "PARTITION BY RANGE (id)")
        c.execute("CREATE TABLE meas_1 PARTITION OF meas FOR VALUES FROM (0) TO (100)")
        c.execute("CREATE TABLE meas_2 (LIKE meas INCLUDING ALL)")
        c.execute("ALTER TABLE meas ATTACH PARTITION meas_2 FOR VALUES FROM (100) TO (200)")
        c.execute("CREATE TABLE meas_3 PARTITION OF meas FOR VALUES FROM (200) TO (300) "
                  "PARTITION BY LIST (region)")
        c.execute("CREATE TABLE meas_3_eu PARTITION OF meas_3 FOR VALUES IN ('eu')")
        c.execute("CREATE TABLE meas_3_rest PARTITION OF meas_3 DEFAULT")
        c.execute("CREATE TABLE meas_def PARTITION OF meas DEFAULT")
        c.execute("INSERT INTO meas SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, g "
                  "FROM generate_series(0, 400, 7) g")
        c.execute("ALTER TABLE meas DETACH PARTITION meas_2")
        c.execute("ALTER TABLE meas_2 ALTER COLUMN region SET NOT NULL")
        c.execute("ALTER TABLE meas ATTACH PARTITION meas_2 FOR VALUES FROM (100) TO (200)")
    with psycopg.connect(cluster.dsn(2), autocommit=True) as c:
        c.execute("UPDATE meas SET v = v + 1 WHERE id < 250")
        c.execute("UPDATE meas SET id = 150 WHERE id = 7")      # moves across partitions
    for t in ("meas", "meas_1", "meas_2", "meas_3_eu", "meas_3_rest", "meas_def"):
        same_everywhere(cluster, digest(t))
    same_everywhere(cluster, "SELECT count(*) FROM pg_inherits WHERE inhparent = "
                             "'meas'::regclass", [(4,)])
    # every table of the tree carries the commit guard, once
    same_everywhere(cluster, "SELECT c.relname, count(*) FROM pg_trigger t JOIN pg_class c "
                             "ON c.oid = t.tgrelid WHERE t.tgname = 'mtm_commit_guard' AND "
                             "c.relname LIKE 'meas%' GROUP BY 1 ORDER BY 1",
                    [("meas", 1), ("meas_1", 1), ("meas_2", 1), ("meas_3", 1), ("meas_3_eu", 1),
                     ("meas_3_rest", 1), ("meas_def", 1)])
    assert sqlstate(cluster, cluster.direct(3).dsn(),
                    "INSERT INTO meas VALUES (5, 'eu', 1)") == "0A000"


def test_generated_always_identity_rows_update_on_every_node(cluster):
    with psycopg.connect(cluster.dsn(3), autocommit=True) as c:
        c.execute("CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v int)")
        c.execute("INSERT INTO ident (v) SELECT g FROM generate_series(1, 5) g")
        c.execute("UPDATE ident SET v = v * 10")
        c.execute("UPDATE ident SET id = DEFAULT WHERE v = 30")
        c.execute("DELETE FROM ident WHERE v = 50")
    same_everywhere(cluster, digest("ident"))
    assert len(direct(cluster, 1, "SELECT * FROM ident")) == 4
    assert direct(cluster, 1, "SELECT count(*) FROM pg_prepared_xacts") == [(0,)]


def test_writes_that_do_not_look_like_writes_go_through_the_commit_protocol(cluster):
    """EXECUTE of a statement PREPAREd in SQL, a data-modifying WITH under a
    SELECT and COPY (INSERT ... RETURNING) TO, each in autocommit: they
    commit on every node (before, the commit guard refused them)."""
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE hidden_w (id int PRIMARY KEY, how text)")
        c.execute("PREPARE ins(int, text) AS INSERT INTO hidden_w VALUES ($1, $2)",
                  prepare=False)
        c.execute("EXECUTE ins(1, 'execute')", prepare=False)
        c.execute("WITH x AS (INSERT INTO hidden_w VALUES (2, 'with') RETURNING id) "
                  "SELECT id FROM x", prepare=False)
        with c.cursor().copy("COPY (INSERT INTO hidden_w VALUES (3, 'copy') RETURNING id) "
                             "TO STDOUT") as cp:
            assert b"".join(bytes(b) for b in cp) == b"3\n"
        c.execute("PREPARE sel AS SELECT count(*) FROM hidden_w", prepare=False)
        assert c.execute("EXECUTE sel", prepare=False).fetchone() == (3,)
    same_everywhere(cluster, "SELECT id, how FROM hidden_w ORDER BY id",
                    [(1, "execute"), (2, "with"), (3, "copy")])


def test_a_table_written_in_a_transaction_can_then_be_altered_in_it(cluster):
    """The commit guard leaves no trigger event pending on the user's table:
    PostgreSQL lets a transaction write a table and then ALTER, index,
    TRUNCATE or DROP it (Django's migrations do), and so does the cluster.
    (Before: 55006 "cannot ALTER TABLE because it has pending trigger
    events".) A direct write is still refused, and the user's own event
    triggers do not see the cluster's CREATE TRIGGER for the guard."""
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        with c.transaction():
            c.execute("CREATE TABLE mig (id int PRIMARY KEY, v int)")
            c.execute("INSERT INTO mig SELECT g, g FROM generate_series(1, 10) g")
            c.execute("ALTER TABLE mig ADD COLUMN w int")
            c.execute("UPDATE mig SET w = v * 2")
            c.execute("CREATE INDEX mig_w ON mig (w)")
            c.execute("ALTER TABLE mig ALTER COLUMN w SET NOT NULL")
        with c.transaction():
            c.execute("CREATE TABLE mig_tmp (id int PRIMARY KEY)")
            c.execute("INSERT INTO mig_tmp VALUES (1)")
            c.execute("TRUNCATE mig_tmp")
            c.execute("DROP TABLE mig_tmp")
        c.execute("CREATE TABLE mig_p (id int, v int) PARTITION BY RANGE (id)")
        c.execute("CREATE TABLE mig_p1 PARTITION OF mig_p FOR VALUES FROM (0) TO (100)")
        with c.transaction():
            c.execute("INSERT INTO mig_p VALUES (1, 1)")
            c.execute("ALTER TABLE mig_p ADD COLUMN w int")
        # the user's event triggers see the user's DDL only
        c.execute("CREATE TABLE ddl_seen (tag text, id serial PRIMARY KEY)")
        c.execute("CREATE FUNCTION see_ddl() RETURNS event_trigger LANGUAGE plpgsql AS "
                  "$$BEGIN INSERT INTO ddl_seen (tag) VALUES (tg_tag); END$$")
        c.execute("CREATE EVENT TRIGGER see_ddl ON ddl_command_end EXECUTE FUNCTION see_ddl()")
        try:
            c.execute("CREATE TABLE seen_t (id int PRIMARY KEY)")
        finally:
            c.execute("DROP EVENT TRIGGER see_ddl")
        assert c.execute("SELECT tag FROM ddl_seen ORDER BY id").fetchall() == \
            [("CREATE TABLE",)]
    same_everywhere(cluster, digest("mig"))
    same_everywhere(cluster, digest("mig_p"))
    same_everywhere(cluster, "SELECT count(*) FROM mig WHERE w = v * 2", [(10,)])
    same_everywhere(cluster, "SELECT to_regclass('mig_tmp') IS NULL", [(True,)])
    # statement-level guards on the partitioned table and on its partition
    same_everywhere(cluster, "SELECT c.relname FROM pg_trigger t JOIN pg_class c ON "
                             "c.oid = t.tgrelid WHERE t.tgname = 'mtm_commit_guard' AND "
                             "c.relname LIKE 'mig_p%' ORDER BY 1", [("mig_p",), ("mig_p1",)])
    for q in ("INSERT INTO mig_p VALUES (2, 2)", "INSERT INTO mig_p1 VALUES (3, 3)",
              "TRUNCATE mig"):
        assert sqlstate(cluster, cluster.direct(2).dsn(), q) == "0A000", q
    same_everywhere(cluster, "SELECT count(*) FROM mig", [(10,)])
    # the notes of finished transactions are removed by the node
    wait_for(lambda: direct(cluster, 1, "SELECT count(*) FROM mtm.guard_q") == [(0,)],
             timeout=20, what="mtm.guard_q emptied of finished transactions")


def test_ddl_that_names_session_objects_or_drops_its_owner_replicates(cluster):
    """Found by the compatibility check (rangefuncs, dependency, select_into,
    matview): a function whose body names a temporary sequence (checked on
    the origin, not again on the peers); DROP OWNED BY a plain role, which
    also drops what the peers run that role's DDL with; CREATE TABLE AS,
    SELECT INTO and CREATE MATERIALIZED VIEW under EXPLAIN ANALYZE."""
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE ROLE dep_owner LOGIN")
        c.execute("GRANT CREATE ON SCHEMA public TO dep_owner")
    with psycopg.connect(cluster.dsn(2, user="dep_owner"), autocommit=True) as c:
        c.execute("CREATE TEMP SEQUENCE dep_seq")
        c.execute("CREATE FUNCTION dep_next() RETURNS bigint LANGUAGE sql AS "
                  "'SELECT nextval(''dep_seq'')'")
        assert c.execute("SELECT dep_next()").fetchone() == (1,)
        c.execute("CREATE TABLE dep_t (id int PRIMARY KEY)")
    same_everywhere(cluster, "SELECT count(*) FROM pg_proc WHERE proname = 'dep_next'", [(1,)])
    with psycopg.connect(cluster.dsn(2, user="dep_owner"), autocommit=True) as c:
        c.execute("DROP OWNED BY dep_owner")
    same_everywhere(cluster, "SELECT count(*) FROM pg_proc WHERE proname = 'dep_next' OR "
                             "proname LIKE 'apply\\_ddl\\_%'", [(0,)])
    same_everywhere(cluster, "SELECT to_regclass('dep_t') IS NULL", [(True,)])
    with psycopg.connect(cluster.dsn(3), autocommit=True) as c:
        c.execute("EXPLAIN (ANALYZE, COSTS OFF) CREATE TABLE ex_ctas (a) AS "
                  "SELECT g FROM generate_series(1, 3) g")
        c.execute("EXPLAIN ANALYZE SELECT g AS a INTO ex_into FROM generate_series(1, 4) g")
        c.execute("EXPLAIN ANALYZE CREATE MATERIALIZED VIEW ex_mv AS SELECT 1 AS a")
    same_everywhere(cluster, "SELECT (SELECT count(*) FROM ex_ctas), "
                             "(SELECT count(*) FROM ex_into), (SELECT count(*) FROM ex_mv)",
                    [(3, 4, 1)])


def test_rows_of_unusual_tables_apply_and_volatile_bounds_are_refused(cluster):
    """A table with no columns (the peers were sent INSERT INTO t () ...),
    one row and a batch; a partition bound computed by a function is
    refused (each node would compute its own bound)."""
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE nocols ()")
        c.execute("INSERT INTO nocols DEFAULT VALUES")
        c.execute("INSERT INTO nocols SELECT FROM generate_series(1, 120)")
        c.execute("CREATE TABLE byday (d timestamptz, v int) PARTITION BY RANGE (d)")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            c.execute("CREATE TABLE byday_old PARTITION OF byday "
                      "FOR VALUES FROM (MINVALUE) TO (current_timestamp)")
        c.execute("CREATE TABLE byday_2020 PARTITION OF byday "
                  "FOR VALUES FROM ('2020-01-01') TO ('2021-01-01')")
    same_everywhere(cluster, "SELECT count(*) FROM nocols", [(121,)])
    same_everywhere(cluster, "SELECT count(*) FROM pg_inherits WHERE inhparent = "
                             "'byday'::regclass", [(1,)])


def test_truncate_of_tables_referenced_from_a_partitioned_table(cluster):
    """TRUNCATE of a table and of the partitioned table whose foreign key
    references it: the peers get the partitions' names, which PostgreSQL
    refused without CASCADE (found by the compatibility check,
    foreign_key)."""
    with psycopg.connect(cluster.dsn(2), autocommit=True) as c:
        c.execute("CREATE TABLE tr_pk (a int PRIMARY KEY)")
        c.execute("CREATE TABLE tr_fk (a int REFERENCES tr_pk, b int) PARTITION BY RANGE (a)")
        c.execute("CREATE TABLE tr_fk1 PARTITION OF tr_fk FOR VALUES FROM (0) TO (10)")
        c.execute("CREATE TABLE tr_fk2 PARTITION OF tr_fk FOR VALUES FROM (10) TO (20)")
        c.execute("INSERT INTO tr_pk SELECT generate_series(0, 19)")
        c.execute("INSERT INTO tr_fk SELECT g, g FROM generate_series(0, 19) g")
        c.execute("TRUNCATE tr_pk, tr_fk")
        c.execute("INSERT INTO tr_pk VALUES (5)")
    same_everywhere(cluster, "SELECT (SELECT count(*) FROM tr_pk), (SELECT count(*) FROM tr_fk)",
                    [(1, 0)])


def test_ddl_inside_functions_on_temporary_objects_only_runs(cluster):
    """A function's CREATE TEMP TABLE (and its index and DROP) is the
    session's own, as on PostgreSQL (found by the compatibility check:
    plancache, transactions); DDL on permanent objects inside a function is
    still refused, also when it comes after temporary DDL in the block."""
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE FUNCTION scratch(n int) RETURNS bigint LANGUAGE plpgsql AS $$"
                  "DECLARE r bigint; BEGIN "
                  "CREATE TEMP TABLE scratch_t (x int); CREATE INDEX ON scratch_t (x); "
                  "INSERT INTO scratch_t SELECT generate_series(1, n); "
                  "SELECT sum(x) INTO r FROM scratch_t; DROP TABLE scratch_t; RETURN r; END$$")
        assert c.execute("SELECT scratch(10)").fetchone() == (55,)
        assert c.execute("SELECT scratch(4)").fetchone() == (10,)
        c.execute("DO $$BEGIN CREATE TEMP TABLE IF NOT EXISTS do_tmp (a int); END$$")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            c.execute("DO $$BEGIN CREATE TEMP TABLE do_tmp2 (a int); "
                      "CREATE TABLE do_perm (a int); END$$")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            c.execute("DO $$BEGIN ALTER TABLE app_t ADD COLUMN sneaky int; END$$")
        c.execute("CREATE TABLE perm_drop (a int)")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            c.execute("DO $$BEGIN DROP TABLE perm_drop; END$$")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            c.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY ex_mv")
    same_everywhere(cluster, "SELECT to_regclass('do_perm') IS NULL, "
                             "to_regclass('perm_drop') IS NOT NULL", [(True, True)])
    same_everywhere(cluster, "SELECT count(*) FROM pg_attribute WHERE attrelid = "
                             "'app_t'::regclass AND attname = 'sneaky'", [(0,)])


def test_the_commit_guard_reads_nothing_in_a_serializable_transaction(cluster):
    """The commit guard's check at commit reads nothing: a SERIALIZABLE
    writer holds no predicate (SIRead) lock on mtm.guard_q, which would
    tie every serializable writer to every other (the regression check's
    prepared_xacts saw a serialization failure raised inside the guard's
    DELETE). A prepared transaction keeps its SIRead locks, so they can be
    looked at after PREPARE TRANSACTION."""
    with psycopg.connect(cluster.dsn(1), autocommit=True) as c:
        c.execute("CREATE TABLE ser_a (id int PRIMARY KEY)")
        c.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
        c.execute("INSERT INTO ser_a VALUES (1)")
        c.execute("PREPARE TRANSACTION 'ser_guard'")
        try:
            held = direct(cluster, 1, "SELECT count(*) FROM pg_locks WHERE mode = 'SIReadLock' "
                                      "AND relation IN ('mtm.guard_q'::regclass, "
                                      "'mtm.guard_q_pkey'::regclass)")
            assert held == [(0,)]
        finally:
            c.execute("COMMIT PREPARED 'ser_guard'")
    same_everywhere(cluster, "SELECT count(*) FROM ser_a", [(1,)])
