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


def _ident_char(ch: str) -> bool:
    return ch.isalnum() or ch in "_$" or ord(ch) > 127


def to_conforming(sql: str) -> str:
    """``sql`` as sent in a session with ``standard_conforming_strings =
    off``, rewritten to mean the same with it on (and off): every plain
    '...' literal, in which such a session takes backslashes as escapes,
    gets the E prefix that says so (also one with no backslash in it: a
    later part of it may have one). Nothing else changes: comments, quoted
    identifiers, dollar quotes, E'' and bit strings are stepped over. A
    literal continued on the next line (``'a'`` newline ``'b'``) is one
    literal: only its first part gets the prefix.
    The proxy parses what such a session sends in this form (pglast's
    scanner knows only standard-conforming strings) and ships it so."""
    out = []
    i, n = 0, len(sql)
    last_string_end = -1     # where the last string literal ended (for continuations)
    while i < n:
        ch = sql[i]
        if ch == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            j = n if j < 0 else j
            out.append(sql[i:j])
            i = j
            continue
        if ch == "/" and sql.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if sql.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif sql.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(sql[i:j])
            i = j
            continue
        if ch == '"':
            j = i + 1
            while j < n:
                if sql[j] == '"':
                    if j + 1 < n and sql[j + 1] == '"':
                        j += 2
                        continue
                    break
                j += 1
            out.append(sql[i:j + 1])
            i = j + 1
            continue
        if ch == "$" and (i == 0 or not _ident_char(sql[i - 1])):
            k = i + 1
            while k < n and (sql[k].isalnum() or sql[k] == "_" or ord(sql[k]) > 127):
                k += 1
            if k < n and sql[k] == "$" and not sql[i + 1:k][:1].isdigit():
                tag = sql[i:k + 1]
                j = sql.find(tag, k + 1)
                j = n if j < 0 else j + len(tag)
                out.append(sql[i:j])
                i = j
                continue
        if ch == "'":
            prev = sql[i - 1] if i else ""
            prev2 = sql[i - 2] if i >= 2 else ""
            prefixed = prev and prev in "bBxXeEnN" and not (prev2 and _ident_char(prev2))
            unicode = prev == "&" and prev2 in "uU"
            continuation = (last_string_end >= 0 and not prefixed
                            and sql[last_string_end:i].strip(" \t\r\n\f") == ""
                            and "\n" in sql[last_string_end:i])
            backslashes = not (prefixed and prev in "bBxX") and not unicode
            j = i + 1
            while j < n:
                c = sql[j]
                if c == "\\" and backslashes:
                    j += 2
                    continue
                if c == "'":
                    if j + 1 < n and sql[j + 1] == "'":
                        j += 2
                        continue
                    break
                j += 1
            literal = sql[i:j + 1]
            if not prefixed and not unicode and not continuation:
                out.append("E")
            out.append(literal)
            i = j + 1
            last_string_end = i
            continue
        if not ch.isspace():
            last_string_end = -1
        out.append(ch)
        i += 1
    return "".join(out)
