"""common.sql.to_conforming, checked against PostgreSQL itself: a query
text as a ``standard_conforming_strings = off`` session means it, and its
rewrite run with the setting on (and off), give the same values; the
rewrite also parses in pglast (standard-conforming) as one statement."""
from __future__ import annotations

import random

import pglast
import psycopg
import pytest

from common.sql import to_conforming

TEXTS = [
    r"SELECT 'C:\\dir', 'it\'s', 'a''b', E'x\'y\\z', $$a'b\$$, $t$'\$t$, 'tab\there'",
    "SELECT 'first' -- a comment with a ' quote\n, 'second' /* and ' /* nested ' */ */, 'x'",
    "SELECT 'one'\n  'continued\\nline', 'n'",
    "SELECT \"quo'ted\" FROM (SELECT 1 AS \"quo'ted\") s",
    r"SELECT x'1F'::bit(8)::text, b'101'::text, 'end\\'",
    r"SELECT ARRAY['\\', '\'', '\"']::text",
]


def _values(conn, sql: str, scs: str):
    conn.execute(f"SET standard_conforming_strings = {scs}")
    return conn.execute(sql).fetchall()


@pytest.mark.parametrize("text", TEXTS)
def test_the_rewrite_means_what_the_session_meant(pg, text):
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("SET escape_string_warning = off")
        meant = _values(conn, text, "off")
        rewritten = to_conforming(text)
        assert _values(conn, rewritten, "on") == meant
        assert _values(conn, rewritten, "off") == meant
    assert len(pglast.parse_sql(rewritten)) == 1


def test_generated_literals(pg):
    """Random strings of quotes, backslashes and letters, written as a
    scs=off session would write them (quotes doubled or backslash-escaped,
    backslashes doubled), come back as themselves."""
    rnd = random.Random(11)
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("SET escape_string_warning = off")
        for _ in range(200):
            value = "".join(rnd.choice("ab'\\\n ") for _ in range(rnd.randrange(0, 12)))
            body = "".join({"'": rnd.choice(["''", "\\'"]), "\\": "\\\\"}.get(ch, ch)
                           for ch in value)
            sql = f"SELECT '{body}'"
            assert _values(conn, sql, "off") == [(value,)]
            assert _values(conn, to_conforming(sql), "on") == [(value,)], sql
