"""Output differences between the standalone server and the cluster, and the
checked-in list of accepted ones (compat/expected.toml), each with its
reason.

A difference is cut into *blocks*: the change blocks of ``diff -U0``
between the two normalised outputs (pg_regress diffs with GNU diff too).
A block is what the standalone printed there (``-`` lines) and what the
cluster printed instead (``+`` lines); its fingerprint is a hash of those
lines only, not of where they are, so a block keeps its identity when an
earlier change moves it.

A block is accepted when

- a *rule* covers it: every ``-`` line fully matches one of the rule's
  ``standalone_only`` patterns and every ``+`` line one of its
  ``cluster_only`` patterns (for by-design differences that recur in many
  files, e.g. the cluster's publication listed by ``\\d+``); or
- an *entry* for its file lists its fingerprint.

Entries whose reason still starts with ``TODO`` accept nothing: the
blocks they hold count as unexplained until someone writes the reason.
A reason starting with ``DEFECT`` names a known defect (with its issue):
such blocks are explained, but counted apart from the by-design ones, so
that the figures show what remains to fix.
``--accept`` (compat.run) records every new block of the files it ran,
grouped in one new entry per file with reason ``TODO: explain``, and
keeps existing entries and their reasons; with ``--prune`` it also drops
the blocks of those files that no longer occur (and entries left empty).

The file is TOML, written by ``dump_toml`` here (tomllib reads it; the
standard library has no writer, and its shape is small: tables and arrays
of strings).
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .schedule import SCHEDULE

EXPECTED_FILE = Path(__file__).resolve().parent / "expected.toml"
TODO = "TODO: explain"
DEFECT = "DEFECT"           # a reason starting so lists a known defect, not a by-design difference
EXCERPT_LINES = 2           # lines of each side kept in the file for a reader ...
EXCERPT_WIDTH = 120         # ... each cut to this many characters
HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
# How a block is classed in reports (FINDINGS.md, report.json): where the
# cluster printed an error the standalone did not,
# - "apply-failure": a peer could not apply the transaction, so the
#   cluster aborted it (a statement that does not replay on the peers);
# - "refusal": an error of the cluster's own (docs/cluster.md "Refused
#   with 0A000", the commit and DDL guards), one about the cluster's
#   machinery (schema mtm, its triggers), PostgreSQL's own about a replica
#   identity (which the cluster's FOR ALL TABLES publication needs), or one
#   PostgreSQL raises because the cluster ran the statement in a
#   transaction of its own ("cannot run inside a transaction block",
#   "cannot PREPARE a transaction ...");
# - "other": anything else (different results, messages, notices).
APPLY_FAILURE = re.compile(r"^ERROR:  .*could not apply it")
REFUSAL = re.compile(r"^(ERROR|FATAL|WARNING):  .*(mmproxy|replicat|cluster|cannot also "
                     r"|replica identity|schema mtm|\bmtm\.|mtm_|cannot run inside a "
                     r"transaction block|cannot PREPARE a transaction)")


# What varies from one run of the cluster to the next inside a block, so
# that its fingerprint stays the same: which peer reported an apply failure
# first (a race between the peers), the numbers in the cluster's gids, and
# timestamps (the time of the run).
# Only the fingerprint is masked; outputs and diffs keep the real text.
FINGERPRINT_MASKS = (
    (re.compile(r"\bnode \d+ could not apply it"), "node N could not apply it"),
    (re.compile(r"\bMTM-\d+-\d+-\d+"), "MTM-n-g-seq"),
    # the time of the run (a row with now() in an error's DETAIL)
    (re.compile(r"\b\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d(:\d\d)?)?"), "<timestamp>"),
    # what else changes from run to run: OIDs and relfilenodes (user objects'
    # are 16384 and up), the line of a COPY in an apply failure's CONTEXT, an
    # SSI conflict's pivot transaction, the run's temporary directories
    (re.compile(r"\b(COPY \S+, line )\d+"), r"\1N"),
    (re.compile(r"\bpivot \d+"), "pivot N"),
    (re.compile(r"\S*/regress-(build|src|lib)\b"), r"<dir>/regress-\1"),
    # the same in DateStyle Postgres (pg_regress's): Thu Nov 26 03:31:59.955941 2026
    (re.compile(r"\b(Mon|Tue|Wed|Thu|Fri|Sat|Sun) [A-Z][a-z]{2} +\d\d? \d\d:\d\d:\d\d(\.\d+)? "
                r"\d{4}( [A-Z]{2,5})?"), "<timestamp>"),
    # (last: the timestamps above have runs of digits too)
    (re.compile(r"\b\d{5,}\b"), "<oid>"),
)


def _masked(line: str) -> str:
    for rx, rep in FINGERPRINT_MASKS:
        line = rx.sub(rep, line)
    return line


@dataclass
class Block:
    standalone_line: int          # 1-based line in the standalone output where it starts
    cluster_line: int
    minus: list[str]
    plus: list[str]

    @property
    def fingerprint(self) -> str:
        text = "\n".join(["-" + _masked(ln) for ln in self.minus]
                         + ["+" + _masked(ln) for ln in self.plus])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def kind(self) -> str:
        minus = set(self.minus)
        only = [ln for ln in self.plus if ln not in minus]
        if any(APPLY_FAILURE.search(ln) for ln in only):
            return "apply-failure"
        if any(REFUSAL.search(ln) for ln in only):
            return "refusal"
        return "other"


def blocks(standalone: Path, cluster: Path) -> list[Block]:
    res = subprocess.run(["diff", "-U0", "-a", str(standalone), str(cluster)],
                         capture_output=True, timeout=120)
    if res.returncode not in (0, 1):
        raise RuntimeError(f"diff failed: {res.stderr.decode(errors='replace')}")
    out: list[Block] = []
    for raw in res.stdout.decode(errors="replace").split("\n"):
        m = HUNK.match(raw)
        if m:
            out.append(Block(int(m[1]), int(m[3]), [], []))
        elif out and raw.startswith("-") and not raw.startswith("--- "):
            out[-1].minus.append(raw[1:])
        elif out and raw.startswith("+") and not raw.startswith("+++ "):
            out[-1].plus.append(raw[1:])
    return out


def pretty_diff(standalone: Path, cluster: Path) -> str:
    """The diff a person reads (``diff -U3``, as pg_regress writes it)."""
    res = subprocess.run(["diff", "-U3", "-a", "--label", "standalone", "--label", "cluster",
                          str(standalone), str(cluster)], capture_output=True, timeout=120)
    return res.stdout.decode(errors="replace")


@dataclass
class Rule:
    name: str
    reason: str
    standalone_only: list[re.Pattern]
    cluster_only: list[re.Pattern]
    # the files the rule is for (output that changes from run to run on
    # the cluster's side); empty: every file
    files: tuple[str, ...] = ()

    def covers(self, b: Block, file: str | None = None) -> bool:
        if not (b.minus or b.plus):
            return False
        if self.files and file not in self.files:
            return False
        return (all(any(p.fullmatch(ln) for p in self.standalone_only) for ln in b.minus)
                and all(any(p.fullmatch(ln) for p in self.cluster_only) for ln in b.plus))


@dataclass
class Entry:
    file: str
    reason: str
    blocks: list[dict] = field(default_factory=list)   # fingerprint, lines, excerpts

    @property
    def explained(self) -> bool:
        return bool(self.reason.strip()) and not self.reason.startswith("TODO")

    @property
    def defect(self) -> bool:
        return self.reason.startswith(DEFECT)


@dataclass
class Expected:
    rules: list[Rule] = field(default_factory=list)
    rules_raw: list[dict] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    header: str = ""

    def entry_for(self, file: str, fingerprint: str) -> Entry | None:
        for e in self.entries:
            if e.file == file and any(b["fingerprint"] == fingerprint for b in e.blocks):
                return e
        return None

    def judge(self, file: str, b: Block) -> tuple[str, str]:
        """(status, reason): status is 'accepted' (by design), 'defect' (a
        known defect, listed with a reason starting with DEFECT) or 'new'
        (also for a block listed under a reason still TODO)."""
        for r in self.rules:
            if r.covers(b, file):
                return "accepted", f"rule {r.name}: {r.reason}"
        e = self.entry_for(file, b.fingerprint)
        if e is None:
            return "new", ""
        if not e.explained:
            return "new", e.reason
        return ("defect" if e.defect else "accepted"), e.reason

    # -- updating (--accept) ---------------------------------------------------

    def record(self, file: str, found: list[Block], prune: bool = False) -> int:
        """Put the blocks of ``found`` that no rule or entry covers into one
        new TODO entry for ``file``; with ``prune``, first drop the file's
        blocks that ``found`` does not hold (and entries left empty).
        Returns how many blocks were added.

        Pruning is not the default because a file's differences depend on
        what ran before it: tests/test_compat.py runs a subset, whose
        blocks may not occur in a whole-schedule run, and both kinds live
        here."""
        found = [b for b in found if not any(r.covers(b, file) for r in self.rules)]
        if prune:
            fps = {b.fingerprint for b in found}
            for e in self.entries:
                if e.file == file:
                    e.blocks = [x for x in e.blocks if x["fingerprint"] in fps]
            self.entries = [e for e in self.entries if e.blocks]
        new, seen = [], set()
        for b in found:
            if self.entry_for(file, b.fingerprint) is None and b.fingerprint not in seen:
                seen.add(b.fingerprint)
                new.append(block_record(b))
        if new:
            self.entries.append(Entry(file, TODO, new))
        return len(new)

    def unseen(self, file: str, found: list[Block]) -> list[str]:
        """Fingerprints listed for ``file`` that this run did not find."""
        fps = {b.fingerprint for b in found}
        return [x["fingerprint"] for e in self.entries if e.file == file
                for x in e.blocks if x["fingerprint"] not in fps]


ERROR_LINE = re.compile(r"^(ERROR|WARNING|FATAL):  ")


def signature(minus: list[str], plus: list[str]) -> str:
    """A block's cause, for grouping: the first error the cluster printed
    that the standalone did not (names in quotes masked), else the first
    error only the standalone printed, else "results differ"."""
    only_c = [ln for ln in plus if ln not in set(minus)]
    only_s = [ln for ln in minus if ln not in set(plus)]
    for prefix, lines in (("cluster: ", only_c), ("standalone: ", only_s)):
        for ln in lines:
            if ERROR_LINE.match(ln):
                return prefix + re.sub(r'"[^"]*"', '"…"', ln)[:160]
    return "results differ"


def block_record(b: Block) -> dict:
    def clip(lines):
        return [ln[:EXCERPT_WIDTH] for ln in lines[:EXCERPT_LINES]]
    return {"fingerprint": b.fingerprint, "kind": b.kind, "cause": signature(b.minus, b.plus),
            "lines": f"-{len(b.minus)} +{len(b.plus)}",
            "standalone": clip(b.minus), "cluster": clip(b.plus)}


def load(path: Path = EXPECTED_FILE) -> Expected:
    if not path.exists():
        return Expected()
    text = path.read_text()
    data = tomllib.loads(text)
    # the leading comment block is kept as the header when the file is rewritten
    lead = []
    for ln in text.splitlines():
        if not ln.startswith("#"):
            break
        lead.append(ln)
    header = "\n".join(lead) + ("\n" if lead else "")
    rules = [Rule(r["name"], r["reason"], [re.compile(p) for p in r.get("standalone_only", [])],
                  [re.compile(p) for p in r.get("cluster_only", [])],
                  tuple(r.get("files", ())))
             for r in data.get("rule", [])]
    entries = [Entry(e["file"], e["reason"], list(e.get("block", [])))
               for e in data.get("accept", [])]
    return Expected(rules, list(data.get("rule", [])), entries, header)


# -- a small TOML writer ----------------------------------------------------------

def _str(s: str) -> str:
    out = []
    for ch in s:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif o < 0x20 or o == 0x7F:
            out.append({"\t": "\\t", "\n": "\\n", "\r": "\\r"}.get(ch, f"\\u{o:04X}"))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _literal_or_str(s: str) -> str:
    """Regexes read best as TOML literal strings ('...', no escapes)."""
    if "'" not in s and all(ord(c) >= 0x20 and ord(c) != 0x7F for c in s):
        return "'" + s + "'"
    return _str(s)


def _array(items: list[str], literal: bool = False) -> str:
    if not items:
        return "[]"
    fmt = _literal_or_str if literal else _str
    return "[\n" + "".join(f"  {fmt(x)},\n" for x in items) + "]"


def dump_toml(exp: Expected) -> str:
    out = [exp.header.rstrip("\n") + "\n"] if exp.header else []
    for r in exp.rules_raw:
        out.append("\n[[rule]]\n")
        out.append(f"name = {_str(r['name'])}\n")
        out.append(f"reason = {_str(r['reason'])}\n")
        out.append(f"standalone_only = {_array(r.get('standalone_only', []), True)}\n")
        out.append(f"cluster_only = {_array(r.get('cluster_only', []), True)}\n")
        if r.get("files"):
            out.append(f"files = {_array(r['files'], True)}\n")
    order = {}
    for e in exp.entries:
        order.setdefault(e.file, len(order))
    pos = {n: i for i, n in enumerate(SCHEDULE)}
    entries = sorted(exp.entries, key=lambda e: (pos.get(e.file, len(pos)), order[e.file]))
    for e in entries:
        out.append("\n[[accept]]\n")
        out.append(f"file = {_str(e.file)}\n")
        out.append(f"reason = {_str(e.reason)}\n")
        for b in e.blocks:
            out.append("[[accept.block]]\n")
            out.append(f"fingerprint = {_str(b['fingerprint'])}\n")
            if "kind" in b:
                out.append(f"kind = {_str(b['kind'])}\n")
            if "cause" in b:
                out.append(f"cause = {_str(b['cause'])}\n")
            if "lines" in b:
                out.append(f"lines = {_str(b['lines'])}\n")
            out.append(f"standalone = {_array(b.get('standalone', []))}\n")
            out.append(f"cluster = {_array(b.get('cluster', []))}\n")
    return "".join(out)


def save(exp: Expected, path: Path = EXPECTED_FILE) -> None:
    text = dump_toml(exp)
    tomllib.loads(text)       # never write a file that does not read back
    path.write_text(text)
