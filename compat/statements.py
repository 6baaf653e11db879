"""Where psql's query buffer is empty in a regression file: the points at
which ``compat.run --stepwise`` may stop feeding psql and check the nodes.

psql decides where a statement ends with its own lexer
(src/fe_utils/psqlscan.l of PostgreSQL 15); this module follows the parts
of it that matter for finding those points, and nothing more:

- quotes ('...', E'...', "...", $tag$...$tag$) and comments (-- and
  nested /* */) hide semicolons and backslashes;
- a semicolon ends a statement only outside parentheses and, in CREATE
  [OR REPLACE] FUNCTION/PROCEDURE, outside BEGIN ... END (psqlscan.l's
  begin_depth heuristic, CASE counted inside a BEGIN);
- a backslash outside quotes starts a meta-command that runs to the end
  of the line; ``\\g``, ``\\gx``, ``\\gset``, ``\\gexec``, ``\\gdesc``,
  ``\\crosstabview`` send the buffer, ``\\r`` empties it;
- ``COPY ... FROM stdin`` (and ``\\copy ... from stdin``) reads the lines
  after it up to ``\\.``;
- inside ``\\if`` ... ``\\endif`` nothing is cut (a skipped branch would
  skip the marker too).

A *unit* is a run of lines after which the buffer is empty, there is no
COPY data pending and no ``\\if`` open. Units never split a statement, so
feeding a file unit by unit gives psql exactly the same input.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

SENDING_META = re.compile(r"^\\(g|gx|gset|gexec|gdesc|crosstabview)\b")
COPY_STDIN = re.compile(r"\s*(/\*.*?\*/\s*)*copy\b.*\bfrom\s+stdin\b", re.IGNORECASE | re.DOTALL)
META_COPY_STDIN = re.compile(r"^\\copy\b.*\bfrom\s+(stdin|pstdin)\b", re.IGNORECASE)
IDENT = re.compile(r"[A-Za-z_\x80-\uffff][A-Za-z_0-9$\x80-\uffff]*")
DOLLAR_TAG = re.compile(r"\$([A-Za-z_\x80-\uffff][A-Za-z_0-9\x80-\uffff]*)?\$")


@dataclass
class Unit:
    first_line: int          # 1-based, inclusive
    last_line: int
    text: str                # the lines, each ending with a newline


class _Lexer:
    def __init__(self):
        self.buf_nonempty = False
        self.paren = 0
        self.begin_depth = 0
        self.idents: list[str] = []
        self.quote: str | None = None     # "'", "E'", '"', "$tag$", "/*"
        self.comment_depth = 0
        self.stmt_text: list[str] = []

    def _reset_stmt(self):
        self.buf_nonempty = False
        self.paren = 0
        self.begin_depth = 0
        self.idents = []
        self.stmt_text = []

    def _is_routine(self) -> bool:
        ids = self.idents[:4]
        if not ids or ids[0] != "create":
            return False
        if len(ids) > 1 and ids[1] in ("function", "procedure"):
            return True
        return (len(ids) > 3 and ids[1] == "or" and ids[2] == "replace"
                and ids[3] in ("function", "procedure"))

    def feed_line(self, line: str) -> tuple[list[str], str | None]:
        """Lex one line (without its newline). Returns (statements sent by
        this line, the meta-command at the end of the line if any)."""
        sent: list[str] = []
        i, n = 0, len(line)
        start = 0
        while i < n:
            c = line[i]
            if self.quote is not None:
                q = self.quote
                if q == "/*":
                    if line.startswith("/*", i):
                        self.comment_depth += 1
                        i += 2
                    elif line.startswith("*/", i):
                        self.comment_depth -= 1
                        i += 2
                        if self.comment_depth == 0:
                            self.quote = None
                    else:
                        i += 1
                elif q == "E'":
                    if c == "\\":
                        i += 2
                    elif c == "'":
                        if line.startswith("''", i):
                            i += 2
                        else:
                            self.quote = None
                            i += 1
                    else:
                        i += 1
                elif q in ("'", '"'):
                    if c == q:
                        if i + 1 < n and line[i + 1] == q:
                            i += 2
                        else:
                            self.quote = None
                            i += 1
                    else:
                        i += 1
                else:   # dollar quote
                    if line.startswith(q, i):
                        self.quote = None
                        i += len(q)
                    else:
                        i += 1
                continue
            if line.startswith("--", i):
                break
            if line.startswith("/*", i):
                self.quote = "/*"
                self.comment_depth = 1
                self.buf_nonempty = True
                i += 2
                continue
            if c == "\\":
                # a meta-command: the rest of the line
                self.stmt_text.append(line[start:i])
                meta = line[i:]
                if SENDING_META.match(meta):
                    if self.buf_nonempty:
                        sent.append("".join(self.stmt_text))
                    self._reset_stmt()
                elif meta.startswith("\\r") and re.match(r"^\\r(eset)?\b", meta):
                    self._reset_stmt()
                return sent, meta
            if c in "'\"":
                if c == "'" and i > 0 and line[i - 1] in "eE" and (
                        i < 2 or not (line[i - 2].isalnum() or line[i - 2] == "_")):
                    self.quote = "E'"
                else:
                    self.quote = c
                self.buf_nonempty = True
                i += 1
                continue
            if c == "$":
                m = DOLLAR_TAG.match(line, i)
                prev = line[i - 1] if i > 0 else " "
                if m and not (prev.isalnum() or prev == "_"):
                    self.quote = m.group(0)
                    self.buf_nonempty = True
                    i = m.end()
                    continue
            if c == "(":
                self.paren += 1
            elif c == ")":
                self.paren = max(0, self.paren - 1)
            elif c == ";" and self.paren == 0 and self.begin_depth == 0:
                self.stmt_text.append(line[start:i + 1])
                sent.append("".join(self.stmt_text))
                self._reset_stmt()
                start = i + 1
                i += 1
                continue
            m = IDENT.match(line, i) if (c.isalpha() or c == "_") else None
            if m and (i == 0 or not (line[i - 1].isalnum() or line[i - 1] in "_$")):
                word = m.group(0).lower()
                self.idents.append(word)
                if self._is_routine() and self.paren == 0:
                    if word == "begin":
                        self.begin_depth += 1
                    elif word == "case" and self.begin_depth >= 1:
                        self.begin_depth += 1
                    elif word == "end" and self.begin_depth > 0:
                        self.begin_depth -= 1
                self.buf_nonempty = True
                i = m.end()
                continue
            if not c.isspace():
                self.buf_nonempty = True
            i += 1
        self.stmt_text.append(line[start:] + "\n")
        return sent, None


def units(text: str) -> list[Unit]:
    lines = text.splitlines(keepends=True)
    lex = _Lexer()
    out: list[Unit] = []
    cur: list[str] = []
    first = 1
    in_copy = False
    if_depth = 0
    for no, raw in enumerate(lines, 1):
        line = raw.rstrip("\n")
        if not cur:
            first = no
        cur.append(raw if raw.endswith("\n") else raw + "\n")
        if in_copy:
            if line == "\\.":
                in_copy = False
        else:
            sent, meta = lex.feed_line(line)
            if any(COPY_STDIN.match(s) for s in sent):
                in_copy = True
            if meta is not None:
                word = meta.split()[0] if meta.split() else meta
                if word == "\\if":
                    if_depth += 1
                elif word == "\\endif":
                    if_depth = max(0, if_depth - 1)
                elif META_COPY_STDIN.match(meta):
                    in_copy = True
        if (not in_copy and if_depth == 0 and lex.quote is None and not lex.buf_nonempty):
            out.append(Unit(first, no, "".join(cur)))
            cur = []
    if cur:
        out.append(Unit(first, len(lines), "".join(cur)))
    return out
