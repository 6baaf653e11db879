"""``intercept.classify``: what the proxy does with a client's Query in a
cluster, including through its cache of statement shapes."""
from __future__ import annotations

import pglast
import pytest

from proxy import intercept
from proxy.intercept import (COMMIT, PASS, REFUSE, SPLIT, USER_FINISH, USER_PREPARE, WRAP,
                             classify)

CASES = [
    ("COMMIT", COMMIT, {}),
    ("end work;", COMMIT, {}),
    ("SELECT abalance FROM pgbench_accounts WHERE aid = 7", PASS, {}),
    ("SELECT * FROM t WHERE a IN (1, 2, 3)", PASS, {}),
    ("SELECT f(1)", WRAP, {}),                       # a function may write
    ("SELECT (SELECT 1)", WRAP, {}),
    ("SELECT * FROM t FOR UPDATE", WRAP, {}),
    # writes that do not start with INSERT/UPDATE/DELETE
    ("WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x", WRAP, {}),
    ("COPY (INSERT INTO t VALUES (1) RETURNING *) TO stdout", WRAP, {}),
    ("COPY (SELECT f()) TO stdout", WRAP, {}),
    ("COPY (SELECT a FROM t) TO stdout", PASS, {}),
    ("COPY t TO stdout", PASS, {}),
    ("EXECUTE ins(1)", WRAP, {}),
    # PostgreSQL runs these outside any transaction block: refused, with why
    ("CREATE TABLESPACE ts LOCATION '/srv/ts'", REFUSE, {}),
    ("DROP TABLESPACE ts", REFUSE, {}),
    ("ALTER TABLE p DETACH PARTITION c CONCURRENTLY", REFUSE, {}),
    ("ALTER TABLE p DETACH PARTITION c", WRAP, {"ddl": True}),
    ("CREATE SUBSCRIPTION s CONNECTION 'host=x' PUBLICATION p", REFUSE, {}),
    ("DROP SUBSCRIPTION s", REFUSE, {}),
    # each node would compute its own bound
    ("CREATE TABLE p1 PARTITION OF p FOR VALUES FROM ('2020-01-01') TO (current_timestamp)",
     REFUSE, {}),
    ("ALTER TABLE p ATTACH PARTITION p1 FOR VALUES FROM (now()) TO (MAXVALUE)", REFUSE, {}),
    ("CREATE TABLE p1 PARTITION OF p FOR VALUES FROM ('2020-01-01'::date) TO (MAXVALUE)",
     WRAP, {"ddl": True}),
    ("CREATE TABLE p1 PARTITION OF p FOR VALUES IN (1, 2)", WRAP, {"ddl": True}),
    ('CREATE RULE "_RETURN" AS ON SELECT TO t DO INSTEAD SELECT * FROM u', REFUSE, {}),
    ("REFRESH MATERIALIZED VIEW CONCURRENTLY m", REFUSE, {}),
    ("REFRESH MATERIALIZED VIEW m", WRAP, {"ddl": True}),
    ("CREATE RULE r AS ON INSERT TO t DO INSTEAD NOTHING", WRAP, {"ddl": True}),          # a PREPAREd INSERT, perhaps
    # the peers make the table empty; the rows reach them as rows
    ("SELECT 1 INTO t", WRAP, {"ddl": True, "sql": "CREATE TABLE t AS SELECT 1 WITH NO DATA"}),
    ("CREATE TABLE t AS SELECT random() r", WRAP,
     {"ddl": True, "sql": "CREATE TABLE t AS SELECT random() r WITH NO DATA"}),
    ("create table t as select 1 with data;", WRAP,
     {"ddl": True, "sql": "create table t as select 1 WITH NO DATA;"}),
    ("CREATE TABLE t AS SELECT 1 WITH NO DATA", WRAP,
     {"ddl": True, "sql": "CREATE TABLE t AS SELECT 1 WITH NO DATA"}),
    ("CREATE MATERIALIZED VIEW m AS SELECT 1", WRAP,
     {"ddl": True, "sql": "CREATE MATERIALIZED VIEW m AS SELECT 1"}),
    ("CREATE TABLE t AS EXECUTE q", REFUSE, {}),
    # no event trigger fires for these: shipped at once, the guard not armed
    ("CREATE ROLE app LOGIN", WRAP, {"ddl": True, "fires": False}),
    ("DROP EVENT TRIGGER et", WRAP, {"ddl": True, "fires": False}),
    ("ALTER EVENT TRIGGER et DISABLE", WRAP, {"ddl": True, "fires": False}),
    ("COMMENT ON ROLE app IS 'x'", WRAP, {"ddl": True, "fires": False}),
    ("GRANT CREATE ON DATABASE postgres TO app", WRAP, {"ddl": True, "fires": False}),
    ("COMMENT ON TABLE public.t IS 'x'", WRAP, {"ddl": True, "fires": True}),
    ("DROP EVENT TRIGGER mtm_ddl_guard", REFUSE, {}),
    ("ALTER EVENT TRIGGER mtm_on_ddl_end DISABLE", REFUSE, {}),
    # each node would compute its own values: refreshed from the origin's
    ("ALTER TABLE public.t ADD COLUMN r float8 DEFAULT random()", WRAP,
     {"refresh": (('"public"."t"', "r", False, False),)}),
    ("ALTER TABLE ONLY public.t ADD COLUMN s serial, ADD COLUMN k int DEFAULT 5", WRAP,
     {"refresh": (('"public"."t"', "s", True, False),)}),
    ("ALTER TABLE public.t ADD COLUMN i int GENERATED ALWAYS AS IDENTITY", WRAP,
     {"refresh": (('"public"."t"', "i", False, False),)}),
    ("ALTER TABLE public.t ALTER COLUMN a TYPE text USING a || now()", WRAP,
     {"refresh": (('"public"."t"', "a", False, True),)}),
    ("ALTER TABLE public.t ALTER COLUMN a TYPE bigint USING a + 1", WRAP, {"refresh": ()}),
    ("SELECT 1 INTO TEMP t", WRAP, {"temp": True}),
    ("SELECT mtm.make_table_local('t')", WRAP, {"ddl": True}),
    ("UPDATE pgbench_accounts SET abalance = abalance + 5 WHERE aid = 7", WRAP, {}),
    ("INSERT INTO t VALUES (1, 'x')", WRAP, {}),
    ("DELETE FROM t WHERE id = 3", WRAP, {}),
    # TRUNCATE travels through the slot like the rows it removes
    ("TRUNCATE t RESTART IDENTITY CASCADE", WRAP, {"ddl": False}),
    ("CREATE TABLE a (id int); TRUNCATE b", SPLIT, {}),
    ("CREATE TABLE t (id int)", WRAP, {"ddl": True}),
    ("CREATE TEMP TABLE t (id int)", WRAP, {"temp": True}),
    ("DROP TABLE t", WRAP, {"ddl": True, "drop": True}),
    # GRANT/REVOKE on a table that may be temporary: staged with its names
    ("GRANT SELECT ON t, public.u TO public", WRAP,
     {"ddl": True, "staged": True, "rels": ('"t"', '"public"."u"')}),
    ('REVOKE ALL ON SEQUENCE pg_temp."S" FROM public', WRAP,
     {"ddl": True, "staged": True, "rels": ('"pg_temp"."S"',)}),
    ("GRANT SELECT ON public.u TO public", WRAP, {"ddl": True, "staged": False, "rels": ()}),
    ("GRANT SELECT ON ALL TABLES IN SCHEMA public TO public", WRAP,
     {"ddl": True, "staged": False}),
    ("EXPLAIN SELECT 1", PASS, {}),
    ("EXPLAIN (ANALYZE) DELETE FROM t", WRAP, {}),
    # EXPLAIN ANALYZE runs its statement: DDL under it is captured as DDL
    ("EXPLAIN (ANALYZE, COSTS OFF) CREATE TABLE t (a) AS SELECT 1 WITH DATA", WRAP,
     {"ddl": True, "sql": "CREATE TABLE t (a) AS SELECT 1 WITH NO DATA"}),
    ("explain analyze verbose create materialized view m as select 1", WRAP,
     {"ddl": True, "sql": "create materialized view m as select 1"}),
    ("EXPLAIN ANALYZE SELECT 1 AS a INTO t", WRAP,
     {"ddl": True, "sql": "CREATE TABLE t AS SELECT 1 AS a WITH NO DATA"}),
    ("EXPLAIN (ANALYZE) SELECT 1 INTO TEMP t", WRAP, {"temp": True}),
    ("SET search_path = a, b", PASS, {}),
    ("VACUUM t", PASS, {}),
    ("BEGIN", PASS, {"txn": "begin"}),
    ("SAVEPOINT s", PASS, {"txn": "savepoint"}),
    ("ROLLBACK TO SAVEPOINT s", PASS, {"txn": "rollback_to"}),
    ("COMMIT AND NO CHAIN", COMMIT, {"txn": "commit"}),
    # answered by the proxy inside a transaction, run after its commit
    ("NOTIFY ch, 'x'", PASS, {"deferred": "NOTIFY ch, 'x'"}),
    ("LISTEN ch", PASS, {"deferred": "LISTEN ch"}),
    # a DO block that commits inside: refused before it runs anything
    ("DO $$BEGIN INSERT INTO t VALUES ('commit'); COMMIT; END$$", REFUSE, {}),
    ("DO $$BEGIN INSERT INTO t VALUES ('commit'); END$$", WRAP, {}),
    ("CALL p(1)", WRAP, {"procedure": True}),
    ("ROLLBACK AND CHAIN", REFUSE, {}),
    ("CREATE INDEX CONCURRENTLY i ON t (a)", REFUSE, {}),
    ("PREPARE TRANSACTION 'a'", USER_PREPARE, {"gid": "a"}),
    ("COMMIT PREPARED 'b'", USER_FINISH, {"gid": "b", "commit": True}),
    ("ROLLBACK PREPARED 'MTM-1-1-5'", REFUSE, {}),
    ("SELEC 1", PASS, {}),                           # PostgreSQL reports the error
    # Strings with DDL or transaction commands run statement by statement
    # (each DDL statement shipped with its own text); reads and writes only:
    # one implicit transaction, wrapped whole
    ("CREATE TABLE a (id int); CREATE INDEX ON a (id)", SPLIT, {}),
    ("CREATE TABLE a (id int); INSERT INTO a VALUES (1)", SPLIT, {}),
    ("INSERT INTO b VALUES (1); ALTER TABLE b ADD c int", SPLIT, {}),
    ("BEGIN; INSERT INTO b VALUES (1); COMMIT", SPLIT, {}),
    ("INSERT INTO b VALUES (1); NOTIFY ch", SPLIT, {}),
    ("INSERT INTO b VALUES (1); INSERT INTO b VALUES (2)", WRAP, {}),
    ("SELECT 1; SELECT 2", PASS, {}),
    ("SELECT 1; PREPARE TRANSACTION 'x'", REFUSE, {}),
]


def test_split_parts_keep_each_statement_text():
    plan = classify("CREATE TABLE a (id int); INSERT INTO a VALUES (1);COMMIT")
    assert [(t, p.kind, p.ddl) for t, p in plan.parts] == [
        ("CREATE TABLE a (id int)", WRAP, True), ("INSERT INTO a VALUES (1)", WRAP, False),
        ("COMMIT", COMMIT, False)]
    assert plan.parts[0][1].sql == "CREATE TABLE a (id int)"


@pytest.mark.parametrize("sql,kind,fields", CASES, ids=[c[0] for c in CASES])
def test_plans(sql, kind, fields):
    for _ in range(2):          # the second time through the shape cache, if cached
        plan = classify(sql)
        assert plan.kind == kind, plan
        for k, v in fields.items():
            assert getattr(plan, k) == v, (k, plan)


# Statements with one fingerprint (constants differ) but a plan that must
# follow the constant: these are never answered from the cache.
SAME_SHAPE = [
    ("PREPARE TRANSACTION 'a'", "PREPARE TRANSACTION 'b'"),
    ("CREATE TABLE t AS SELECT 1", "CREATE TABLE t AS SELECT 2"),
    ("ROLLBACK", "ROLLBACK AND CHAIN"),
    ("SELECT * FROM t", "SELECT * FROM pg_temp.t"),
    ("UPDATE t SET a = 1", "UPDATE t SET a = 2"),
]


@pytest.mark.parametrize("a,b", SAME_SHAPE)
def test_the_shape_cache_gives_what_a_fresh_parse_gives(a, b):
    intercept._SHAPES.clear()
    classify(a)                       # may fill the cache for the shape
    assert classify(b) == intercept._classify(b, pglast.parse_sql(b))


def test_the_shape_cache_is_bounded():
    intercept._SHAPES.clear()
    for i in range(intercept._SHAPES_MAX + 10):
        classify(f"SELECT c{i} FROM t")
    assert 0 < len(intercept._SHAPES) <= intercept._SHAPES_MAX
