"""Each node's schema and data, dumped directly from its PostgreSQL, and
normalised only for what differs between nodes by design.

What is dumped (as the postgres superuser, over the server's unix socket,
never through a proxy):

- ``pg_dump --create --exclude-schema=mtm`` of the ``regression``
  database, plain format, with owners and privileges (ownership must
  match), large objects included;
- ``pg_dumpall --globals-only --no-role-passwords``: roles, memberships,
  role settings and tablespaces, which regression files create and which
  live outside any database.

What is normalised, and why (nothing else is):

- the ``mtm`` schema (left out by pg_dump): each node's own protocol
  state (its node id, precommit records, applied positions);
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
- blank lines and bare ``--`` comment lines, and the ``\\restrict KEY`` /
  ``\\unrestrict KEY`` lines pg_dump 15.14 and later wrap a dump in (a
  random key per run, CVE-2025-8714).

Comparing: node 1's normalised dump against each other node's; any
difference is a divergence.
"""
from __future__ import annotations

import difflib
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from proxy.pgserver import LocalPostgres

HEADER = re.compile(r"^-- (Data for )?Name: (?P<name>.*); Type: (?P<type>[A-Z ]+); "
                    r"Schema: (?P<schema>.*); Owner: (?P<owner>.*)$")
SETVAL = re.compile(r"^(SELECT pg_catalog\.setval\('.*', )-?\d+, (true|false)\);$")
START_WITH = re.compile(r"\bSTART WITH -?\d+\b")
CLUSTER_STEP = 16           # replication/cluster.py MAX_NODES: sequences step by it
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
            entries.append(Entry(line, m["type"], m["name"], []))
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


def normalise_dump(text: str) -> str:
    kept = [n for e in parse_entries(text) if (n := normalise_entry(e)) is not None]
    return "\n".join(sorted(e.text() for e in kept)) + "\n"


def normalise_globals(text: str) -> str:
    lines = [LOCATION.sub(r"\1<location>\2", ln) for ln in text.splitlines()
             if ln.strip() and ln != "--" and not RESTRICT.match(ln)]
    return "\n".join(lines) + "\n"


def _run(pg: LocalPostgres, *args: str) -> str:
    cmd = [f"{pg.bindir}/{args[0]}", *args[1:]]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=DUMP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DumpError(f"{args[0]} of {pg.base} did not finish in {DUMP_TIMEOUT_S} s")
    if res.returncode != 0:
        raise DumpError(f"{args[0]} of {pg.base} failed: {res.stderr.strip()[-2000:]}")
    return res.stdout


def dump_node(pg: LocalPostgres, dbname: str) -> str:
    """The normalised dump of one node: its database, then its globals."""
    common = ["-h", str(pg.sockdir), "-p", str(pg.port), "-U", "postgres"]
    db = _run(pg, "pg_dump", *common, "--create", "--exclude-schema=mtm",
              "--lock-wait-timeout=10s", "-d", dbname)
    glob = _run(pg, "pg_dumpall", *common, "--globals-only", "--no-role-passwords",
                "-l", dbname)
    return (normalise_dump(db) + "-- (globals: pg_dumpall --globals-only)\n"
            + normalise_globals(glob))


def prepared_xacts(pg: LocalPostgres) -> list[str]:
    """Prepared transactions left on a node (any database)."""
    out = pg.psql("SELECT gid || ' (' || database || ')' FROM pg_prepared_xacts ORDER BY 1",
                  check=False)
    return [ln for ln in out.splitlines() if ln]


def differing_lines(base: str, other: str) -> list[str]:
    """The lines only one of the two has, each prefixed with - (only in
    base) or + (only in other), in diff order."""
    return [ln for ln in difflib.unified_diff(base.splitlines(), other.splitlines(),
                                              lineterm="", n=0)
            if ln[:1] in "+-" and not ln.startswith(("---", "+++"))]


def unified(base: str, other: str, a: str, b: str, n: int = 3) -> str:
    return "\n".join(difflib.unified_diff(base.splitlines(), other.splitlines(), a, b,
                                          lineterm="", n=n)) + "\n"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
