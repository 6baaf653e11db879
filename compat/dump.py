"""Each node's schema and data, dumped directly from its PostgreSQL, and
normalised only for what differs between nodes by design.

What is dumped (as the postgres superuser, over the server's unix socket,
never through a proxy):

- ``pg_dump --create --exclude-schema=mtm --no-unlogged-table-data`` of
  the ``regression`` database, plain format, with owners and privileges
  (ownership must match), large objects included;
- ``pg_dumpall --globals-only --no-role-passwords``: roles, memberships,
  role settings and tablespaces, which regression files create and which
  live outside any database.

What is normalised, and why (nothing else is):

- the ``mtm`` schema (left out by pg_dump): each node's own protocol
  state (its node id, precommit records, applied positions);
- the rows of unlogged tables (left out by pg_dump; their definitions are
  compared): writes to them stay on their node by design (docs/cluster.md:
  a transaction that wrote only local, unlogged or temporary tables
  commits on its node; an unlogged table is in no publication);
- the publication ``mtm_pub``, the event triggers ``mtm_*`` and the
  triggers ``mtm_commit_guard``: made by init-cluster and the cluster's
  event triggers, the machinery of replication, not user objects;
- sequences: ``setval`` positions (each node hands out its own values,
  docs/cluster.md "Sequences"), and ``START WITH`` of sequences stepping by
  16 (the cluster moves each node's START to its residue);
- row order: the lines of each table's COPY block are sorted (a heap's
  physical order depends on each node's history);
- entry order: the dump's entries (one per ``-- Name: ...; Type: ...``
  header) are sorted, because pg_dump breaks some ties between objects
  by OID, and OIDs differ between nodes;
- role passwords are not dumped (SCRAM secrets carry a random salt per
  node) and tablespace locations (in-place tablespaces are named by OID);
- ``SET default_tablespace`` / ``SET default_table_access_method`` lines:
  pg_dump writes them only where the value changes, so where they fall
  depends on the order of entries; each relation's access method and
  tablespace are compared from pg_class instead;
- blank lines and bare ``--`` comment lines, and the ``\\restrict KEY`` /
  ``\\unrestrict KEY`` lines pg_dump 15.14 and later wrap a dump in (a
  random key per run, CVE-2025-8714).

Comparing: node 1's normalised dump against each other node's; any
difference is a divergence.
"""
from __future__ import annotations

import difflib
import re
from collections import Counter
import subprocess
from dataclasses import dataclass
from pathlib import Path

from proxy.pgserver import LocalPostgres

HEADER = re.compile(r"^-- (Data for )?Name: (?P<name>.*); Type: (?P<type>[A-Z ]+); "
                    r"Schema: (?P<schema>.*); Owner: (?P<owner>.*)$")
SETVAL = re.compile(r"^(SELECT pg_catalog\.setval\('.*', )-?\d+, (true|false)\);$")
START_WITH = re.compile(r"\bSTART WITH -?\d+\b")
CLUSTER_STEP = 16           # replication/cluster.py MAX_NODES: sequences step by it
SET_LINE = re.compile(r"^SET [a-z_]+ = .*;$")
# pg_dump sets these only when the next entry needs another value, so where
# they appear depends on the order of entries (which differs by OID ties):
# they are dropped, and each relation's access method and tablespace are
# compared from the catalog instead (RELATIONS_SQL).
STATEFUL_SET = re.compile(r"^SET (default_tablespace|default_table_access_method) = ")
RELATIONS_SQL = """
SELECT format('%I.%I', n.nspname, c.relname), c.relkind, c.relpersistence,
       coalesce(am.amname, '-'), coalesce(ts.spcname, '-')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_am am ON am.oid = c.relam
LEFT JOIN pg_tablespace ts ON ts.oid = c.reltablespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'mtm')
  AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
ORDER BY 1"""
RESTRICT = re.compile(r"^\\(un)?restrict \S+$")
LOCATION = re.compile(r"( LOCATION ')[^']*(';)$")
DUMP_TIMEOUT_S = 120


class DumpError(RuntimeError):
    pass


def _dropped(kind: str, name: str) -> bool:
    if kind == "EVENT TRIGGER" and name.startswith("mtm_"):
        return True
    if kind == "PUBLICATION" and name == "mtm_pub":
        return True
    if kind == "TRIGGER" and name.split(" ")[-1] == "mtm_commit_guard":
        return True
    return False


@dataclass
class Entry:
    header: str
    kind: str
    name: str
    lines: list[str]

    def text(self) -> str:
        return "\n".join([self.header] + self.lines)


def parse_entries(text: str) -> list[Entry]:
    """Split a plain-format dump into its entries; lines before the first
    header form an entry of their own (the SET preamble)."""
    entries = [Entry("-- (preamble)", "", "", [])]
    for line in text.splitlines():
        m = HEADER.match(line)
        if m:
            # pg_dump writes the SETs an entry needs (default_tablespace,
            # default_table_access_method, ...) before its header: they
            # belong to the entry that follows, not to the one before
            prev = entries[-1].lines
            k = len(prev)
            while k > 0 and SET_LINE.match(prev[k - 1]):
                k -= 1
            carried, prev[k:] = prev[k:], []
            carried = [x for x in carried if not STATEFUL_SET.match(x)]
            entries.append(Entry(line, m["type"], m["name"], carried))
        elif line.strip() and line != "--" and not RESTRICT.match(line):
            entries[-1].lines.append(line)
    return entries


def normalise_entry(e: Entry) -> Entry | None:
    if _dropped(e.kind, e.name):
        return None
    lines = e.lines
    if e.kind == "SEQUENCE SET":
        lines = [SETVAL.sub(r"\1<position>);", ln) for ln in lines]
    elif e.kind == "SEQUENCE" and any(f"INCREMENT BY {CLUSTER_STEP}" in ln for ln in lines):
        lines = [START_WITH.sub("START WITH <start>", ln) for ln in lines]
    elif e.kind == "TABLE DATA":
        lines = _sort_copy_blocks(lines)
    return Entry(e.header, e.kind, e.name, lines)


def _sort_copy_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    block: list[str] | None = None
    for ln in lines:
        if block is None:
            out.append(ln)
            if ln.startswith("COPY ") and ln.endswith(" FROM stdin;"):
                block = []
        elif ln == "\\.":
            out += sorted(block)
            out.append(ln)
            block = None
        else:
            block.append(ln)
    if block is not None:
        out += sorted(block)
    return out


class NodeDump:
    """One node's normalised dump: its entries by key (the entry's header;
    the globals are one entry), compared entry by entry."""

    def __init__(self, entries: dict[str, list[str]]):
        self.entries = entries

    def __eq__(self, other) -> bool:
        return isinstance(other, NodeDump) and self.entries == other.entries

    def text(self) -> str:
        return "".join(k + "\n" + "".join(ln + "\n" for ln in v)
                       for k, v in sorted(self.entries.items()))


def normalise_dump(text: str) -> dict[str, list[str]]:
    """The kept, normalised entries of a plain dump, by header (a header
    that occurs twice gets a counter)."""
    out: dict[str, list[str]] = {}
    for e in parse_entries(text):
        n = normalise_entry(e)
        if n is None:
            continue
        key, k = n.header, 1
        while key in out:
            k += 1
            key = f"{n.header} (#{k})"
        out[key] = n.lines
    return out


def _short(header: str) -> str:
    m = HEADER.match(header)
    if not m:
        return header.removeprefix("-- ")
    return f"{m['type']} {m['schema']}.{m['name']}".replace("-.", "")


def differing_lines(base: NodeDump, other: NodeDump) -> list[str]:
    """What only one of two dumps holds, line by line, each line saying
    which entry it is in: ``-[TABLE DATA public.t] 1 a`` is only in
    ``base``, ``+[...]`` only in ``other``. Linear in the dumps' size (a
    table of millions of rows is compared as a multiset of lines)."""
    out: list[str] = []
    for key in sorted(set(base.entries) | set(other.entries)):
        a, b = base.entries.get(key), other.entries.get(key)
        if a == b:
            continue
        where = _short(key)
        if a is None or b is None:
            sign = "+" if a is None else "-"
            out += [f"{sign}[{where}] (the whole entry)"] + [
                f"{sign}[{where}] {ln}" for ln in (b if a is None else a)]
            continue
        ca, cb = Counter(a), Counter(b)
        only_a, only_b = ca - cb, cb - ca
        if not only_a and not only_b:          # same lines, another order
            out.append(f"~[{where}] same lines in another order")
            continue
        out += [f"-[{where}] {ln}" for ln in _take(a, only_a)]
        out += [f"+[{where}] {ln}" for ln in _take(b, only_b)]
    return out


def _take(lines: list[str], counts: Counter) -> list[str]:
    """The lines of ``lines`` that ``counts`` holds, in order, each as many
    times as counted."""
    out = []
    for ln in lines:
        if counts.get(ln, 0) > 0:
            counts[ln] -= 1
            out.append(ln)
    return out


def unified(base: NodeDump, other: NodeDump, a: str, b: str, n: int = 3,
            max_lines: int = 20000) -> str:
    """A readable diff of the differing entries only (entries longer than
    ``max_lines`` as their differing lines)."""
    parts = []
    for key in sorted(set(base.entries) | set(other.entries)):
        x, y = base.entries.get(key, []), other.entries.get(key, [])
        if x == y:
            continue
        if len(x) + len(y) > max_lines:
            parts.append(f"@@ {key}: differing lines only\n" + "".join(
                ln + "\n" for ln in differing_lines(NodeDump({key: x}), NodeDump({key: y}))))
        else:
            parts.append("".join(ln + "\n" for ln in difflib.unified_diff(
                [key] + x, [key] + y, a, b, lineterm="", n=n)))
    return "".join(parts)


def normalise_globals(text: str) -> list[str]:
    return [LOCATION.sub(r"\1<location>\2", ln) for ln in text.splitlines()
            if ln.strip() and ln != "--" and not RESTRICT.match(ln)]


def _run(pg: LocalPostgres, *args: str) -> str:
    cmd = [f"{pg.bindir}/{args[0]}", *args[1:]]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=DUMP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DumpError(f"{args[0]} of {pg.base} did not finish in {DUMP_TIMEOUT_S} s")
    if res.returncode != 0:
        raise DumpError(f"{args[0]} of {pg.base} failed: {res.stderr.strip()[-2000:]}")
    return res.stdout


def dump_node(pg: LocalPostgres, dbname: str) -> NodeDump:
    """The normalised dump of one node: its database and its globals."""
    common = ["-h", str(pg.sockdir), "-p", str(pg.port), "-U", "postgres"]
    db = _run(pg, "pg_dump", *common, "--create", "--exclude-schema=mtm",
              "--no-unlogged-table-data", "--lock-wait-timeout=10s", "-d", dbname)
    glob = _run(pg, "pg_dumpall", *common, "--globals-only", "--no-role-passwords",
                "-l", dbname)
    entries = normalise_dump(db)
    entries["-- (globals: pg_dumpall --globals-only)"] = normalise_globals(glob)
    rels = _run(pg, "psql", *common, "-X", "-A", "-t", "-F", " ", "-v", "ON_ERROR_STOP=1",
                "-d", dbname, "-c", RELATIONS_SQL)
    entries["-- (relations: kind, persistence, access method, tablespace)"] = rels.splitlines()
    return NodeDump(entries)


def prepared_xacts(pg: LocalPostgres, with_database: bool = True) -> list[str]:
    """Prepared transactions left on a server (any database), as 'gid (db)'
    or the gid alone."""
    col = "gid || ' (' || database || ')'" if with_database else "gid"
    out = pg.psql(f"SELECT {col} FROM pg_prepared_xacts ORDER BY 1", check=False)
    return [ln for ln in out.splitlines() if ln]


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
