"""SQL text helpers used by both the proxy and replication.

The proxy's own statements and the appliers' statements are built as text
(composing psycopg.sql objects per row was a tenth of the proxy's CPU).
They always run with ``standard_conforming_strings = on`` (the appliers set
it; the proxy's statements on a client's session use the E'' form where
the session's setting could differ - see ``quote_literal_any``).
"""
from __future__ import annotations


def quote_literal(s: str) -> str:
    """A standard-conforming SQL string literal (backslashes are plain)."""
    return "'" + s.replace("'", "''") + "'"


def quote_literal_any(s: str) -> str:
    """A string literal that means the same whatever the session's
    ``standard_conforming_strings``: the escape form E'...', in which a
    backslash always escapes (PostgreSQL docs 4.1.2.2)."""
    return "E'" + s.replace("\\", "\\\\").replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'
