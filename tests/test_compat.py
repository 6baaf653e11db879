"""The PostgreSQL 15 regression compatibility check (compat/, issue 11), on
a subset that fits the suite's time budget.

- ``test_subset``: real servers (a standalone PostgreSQL 15 and a 3-node
  cluster, compat.targets), files picked for DDL, partitioning,
  sequences, identity, triggers and row-level security run through node
  1 and against the standalone exactly as ``python -m compat.run`` runs
  them; no file may leave the nodes different, and every output
  difference must be one compat/expected.toml explains.
- ``test_divergence_is_caught``: the same nodes, made to differ behind
  the cluster's back (a table and a comment made on node 3's PostgreSQL
  directly, the guards off): the check must report both.
- the rest: the dump normaliser and the statement splitter, without
  servers.

The whole schedule (211 files) runs as a script: ``python -m compat.run``
(docs/compat.md).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

from compat import dump as dumps
from compat import expected as expected_mod
from compat.run import DivergenceTracker, Runner, settle_and_dump
from compat.sources import ensure_sql_dir
from compat.statements import units

pytestmark = pytest.mark.slow

# test_setup first (the tables later files use), then files that exercise
# what the cluster must replicate - DDL, partitioning, sequences, identity,
# triggers, row-level security - and are fast.
SUBSET = ("test_setup", "create_table", "triggers", "inherit", "rowsecurity", "identity",
          "generated", "create_table_like", "truncate", "sequence", "hash_part",
          "partition_info")


@pytest.fixture(scope="module")
def runner():
    base = Path(tempfile.mkdtemp(prefix="mmproxy-compat-test-"))
    os.chmod(base, 0o755)
    r = Runner(ensure_sql_dir(), base / "out", expected_mod.load(), timeout_s=120, settle_s=20)
    try:
        r.start(base / "servers")
        yield r
    finally:
        if r.targets is not None:
            r.targets.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def _describe(res: dict) -> str:
    lines = [f"{res['file']}: {res['category']} {'; '.join(res['errors'])}"]
    div = res.get("divergence", {})
    for node, diff in div.get("new_lines", {}).items():
        lines.append(f"  node {node} differs from node 1: " + " | ".join(diff[:6]))
    for node, gids in div.get("prepared_left", {}).items():
        lines.append(f"  node {node} has prepared transactions left: {gids}")
    for step in res.get("stepwise", []):
        lines.append(f"  after lines {step['lines']}: {step['statement'][:1]}")
    for b in res["blocks"]:
        if b["status"] == "new":
            lines.append(f"  unexplained block {b['fingerprint']} at standalone line "
                         f"{b['standalone_line']}: -{b['standalone'][:3]} +{b['cluster'][:3]}"
                         + (f" (reason {b['reason']!r})" if b["reason"] else ""))
    return "\n".join(lines)


def test_subset(runner):
    results = [runner.run_file(name) for name in SUBSET]
    bad = [r for r in results if r["category"] not in ("IDENTICAL", "ACCEPTED", "DEFECT")]
    assert not bad, ("regression files that diverged or differ without a reason in "
                     "compat/expected.toml (python -m compat.run --files ... --accept records "
                     "them; docs/compat.md):\n" + "\n".join(_describe(r) for r in bad))


def test_divergence_is_caught(runner):
    t = runner.targets
    node3 = t.node_pg(3)
    # A table, and a comment on an existing one, on node 3 only. Replica
    # mode switches the DDL guard off (it is not ENABLE ALWAYS); catalog
    # changes are not decoded, and an unlogged table is in no publication,
    # so nothing of it reaches the peers' streams.
    with psycopg.connect(node3.dsn(dbname="regression")) as c:
        c.execute("SET session_replication_role = replica")
        c.execute("CREATE UNLOGGED TABLE compat_only_on_3 (id int PRIMARY KEY)")
        c.execute("COMMENT ON SCHEMA public IS 'only on node 3'")
    tracker = DivergenceTracker()
    tracker.update({})
    ds, prepared, waited, errors = settle_and_dump(t, timeout_s=10)
    assert not errors
    lines = Runner._node_differences(ds)
    new = tracker.update(lines)
    assert set(new) == {3}, new
    text = "\n".join(new[3])
    assert "+[TABLE public.compat_only_on_3] (the whole entry)" in new[3], text
    assert any(ln.startswith("+[COMMENT") and "only on node 3" in ln for ln in new[3]), text
    assert waited < 15       # a lasting difference is not waited on for the full settle time
    with psycopg.connect(node3.dsn(dbname="regression")) as c:
        c.execute("SET session_replication_role = replica")
        c.execute("DROP TABLE compat_only_on_3")
        c.execute("COMMENT ON SCHEMA public IS 'standard public schema'")


# -- without servers ----------------------------------------------------------------

DUMP = """--
-- PostgreSQL database dump
--

\\restrict abc123

SET statement_timeout = 0;

--
-- Name: t; Type: TABLE; Schema: public; Owner: postgres
--

CREATE TABLE public.t (
    id integer NOT NULL
);

--
-- Name: s; Type: SEQUENCE; Schema: public; Owner: postgres
--

CREATE SEQUENCE public.s
    START WITH 2
    INCREMENT BY 16
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

--
-- Name: u; Type: SEQUENCE; Schema: public; Owner: postgres
--

CREATE SEQUENCE public.u
    START WITH 5
    INCREMENT BY 3
    CACHE 1;

--
-- Data for Name: t; Type: TABLE DATA; Schema: public; Owner: postgres
--

COPY public.t (id) FROM stdin;
3
1
2
\\.

--
-- Name: s; Type: SEQUENCE SET; Schema: public; Owner: postgres
--

SELECT pg_catalog.setval('public.s', 34, true);

--
-- Name: t mtm_commit_guard; Type: TRIGGER; Schema: public; Owner: postgres
--

CREATE CONSTRAINT TRIGGER mtm_commit_guard AFTER INSERT ON public.t FOR EACH ROW EXECUTE FUNCTION mtm.commit_guard();

--
-- Name: mtm_pub; Type: PUBLICATION; Schema: -; Owner: postgres
--

CREATE PUBLICATION mtm_pub FOR ALL TABLES WITH (publish = 'insert, update, delete, truncate');

--
-- Name: mtm_ddl_guard; Type: EVENT TRIGGER; Schema: -; Owner: postgres
--

CREATE EVENT TRIGGER mtm_ddl_guard ON ddl_command_start
   EXECUTE FUNCTION mtm.ddl_guard();

\\unrestrict abc123
"""


def test_dump_normalised_for_what_differs_by_design_only():
    other = (DUMP.replace("START WITH 2", "START WITH 3").replace("34, true", "19, false")
             .replace("3\n1\n2\n", "2\n3\n1\n").replace("abc123", "zzz999"))
    def norm(text):
        return dumps.NodeDump(dumps.normalise_dump(text))
    assert norm(DUMP) == norm(other)
    out = norm(DUMP).text()
    for gone in ("mtm_commit_guard", "mtm_pub", "mtm_ddl_guard", "restrict", "34"):
        assert gone not in out
    assert "START WITH 5" in out          # a sequence the cluster does not step is kept
    # what is not by design still differs: a row, an owner, an increment
    for change in (("3\n1\n2\n", "3\n1\n4\n"), ("Owner: postgres\n--\n\nCREATE TABLE",
                                                  "Owner: alice\n--\n\nCREATE TABLE"),
                   ("INCREMENT BY 3", "INCREMENT BY 1")):
        changed = norm(DUMP.replace(*change))
        assert changed != norm(DUMP) and dumps.differing_lines(norm(DUMP), changed), change
    assert dumps.differing_lines(norm(DUMP), norm(DUMP.replace("3\n1\n2\n", "3\n1\n4\n"))) == [
        "-[TABLE DATA public.t] 2", "+[TABLE DATA public.t] 4"]


def test_dump_is_independent_of_the_order_of_entries():
    a = ("--\n-- Name: a; Type: TABLE; Schema: public; Owner: postgres\n--\n\n"
         "CREATE TABLE public.a (i int);\n\n"
         "SET default_table_access_method = heap2;\n\n"
         "--\n-- Name: b; Type: TABLE; Schema: public; Owner: postgres\n--\n\n"
         "CREATE TABLE public.b (i int);\n")
    # the same objects, dumped in the other order (pg_dump breaks ties by OID)
    b = ("SET default_table_access_method = heap2;\n\n"
         "--\n-- Name: b; Type: TABLE; Schema: public; Owner: postgres\n--\n\n"
         "CREATE TABLE public.b (i int);\n\n"
         "SET default_table_access_method = heap;\n\n"
         "--\n-- Name: a; Type: TABLE; Schema: public; Owner: postgres\n--\n\n"
         "CREATE TABLE public.a (i int);\n")
    # (which access method each table has is compared from pg_class)
    assert dumps.NodeDump(dumps.normalise_dump(a)) == dumps.NodeDump(dumps.normalise_dump(b))


def test_units_never_split_a_statement():
    sql = ("SELECT 1;\n"
           "CREATE FUNCTION f() RETURNS int LANGUAGE sql\nBEGIN ATOMIC\n  SELECT 1;\n"
           "  SELECT CASE WHEN true THEN 2 END;\nEND;\n"
           "SELECT $x$ ; $x$, ';', E'\\';', \"a;b\" /* ; */ ;\n"
           "COPY t FROM stdin;\n1\n\\.\n"
           "\\if :x\nSELECT 2;\n\\endif\n"
           "SELECT 3\n\\gset\n"
           "SELECT (1;\n2);\n")
    got = [(u.first_line, u.last_line) for u in units(sql)]
    assert got == [(1, 1), (2, 6), (7, 7), (8, 10), (11, 13), (14, 15), (16, 17)], got
    assert "".join(u.text for u in units(sql)) == sql


def test_expected_file_reads_and_round_trips():
    exp = expected_mod.load()
    assert expected_mod.dump_toml(exp) == expected_mod.EXPECTED_FILE.read_text()
    for e in exp.entries:
        assert e.blocks, e.file


def test_fingerprints_ignore_the_time_of_the_run_only():
    """A block printing the run's time (now() in an error's DETAIL) keeps
    its fingerprint from run to run, in ISO and in pg_regress's DateStyle
    Postgres; other differences still change it."""
    from compat.expected import Block

    def fp(line: str) -> str:
        return Block(1, 1, [], [line]).fingerprint

    a = "DETAIL:  Partition key of the failing row contains (partkey) = ({})."
    assert fp(a.format("Thu Nov 26 03:31:59.955941 2026")) == \
        fp(a.format("Fri Dec  4 11:02:07.000001 2026")) == \
        fp(a.format("2026-11-26 03:31:59.955941+00"))
    assert fp(a.format("Thu Nov 26 03:31:59.955941 2026")) != fp(a.format("42"))


def test_masks_and_file_rules_cover_what_changes_between_runs_only():
    """OIDs, a COPY's line in an apply failure, an SSI pivot and the run's
    temporary directories do not change a fingerprint; a rule scoped to
    files covers blocks of those files only."""
    from compat.expected import Block, Rule

    def fp(line: str) -> str:
        return Block(1, 1, [], [line]).fingerprint

    assert fp(" 36219 |  |  0 |  36219 | attmp") == fp(" 34709 |  |  0 |  34709 | attmp")
    assert fp(" 36219 |  |  0 |  36219 | attmp") != fp(" 36219 |  |  1 |  36219 | attmp")
    assert fp("CONTEXT:  COPY t, line 144, column c") == fp("CONTEXT:  COPY t, line 143, column c")
    assert fp("DETAIL:  Canceled on conflict out to pivot 12830") == \
        fp("DETAIL:  Canceled on conflict out to pivot 12799")
    assert fp("LINE 1: ...-m0t4z36c/regress-build/x.txt") == fp("LINE 1: ...-au05fx6j/regress-build/x.txt")
    rule = Rule("n", "r", [re.compile(r"^ *\d+$")], [re.compile(r"^ *\d+$")], ("stats",))
    b = Block(1, 1, ["  3"], ["  1"])
    assert rule.covers(b, "stats") and not rule.covers(b, "update")
