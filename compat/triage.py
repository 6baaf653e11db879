"""``python -m compat.triage``: help a person explain a run's differences.

- ``python -m compat.triage REPORT.json`` prints, per file, its category,
  the statements that made the nodes differ (``--stepwise`` runs) or the
  first lines that differ between the nodes' dumps, and its output blocks
  grouped by *signature*: the first error the cluster printed that the
  standalone did not (names in quotes masked), else the first error only
  the standalone printed, else "results differ".
- ``--split`` rewrites compat/expected.toml so that every entry whose
  reason is still TODO is cut into one entry per signature, reason
  ``TODO: explain - <signature>``: one reason can then be written per
  cause rather than per file.
- ``--reason 'REGEX=REASON'`` (repeatable) gives every TODO entry whose
  signature matches REGEX that reason (for causes that recur in many
  files).

Nothing here judges: the reasons are written by people.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from . import expected as expected_mod
from .expected import signature

def show(report: Path) -> None:
    rep = json.loads(report.read_text())
    for r in rep["results"]:
        if r["category"] == "IDENTICAL":
            continue
        print(f"== {r['file']}: {r['category']}"
              + (f"  errors: {'; '.join(r['errors'])}" if r["errors"] else ""))
        for st in r.get("stepwise", []):
            print(f"   nodes differ after lines {st['lines']}: {' '.join(st['statement'])[:200]}")
            for node, lines in st["new_lines"].items():
                print(f"      node {node}: {' | '.join(lines[:4])[:300]}")
        div = r.get("divergence", {})
        for node, lines in div.get("new_lines", {}).items():
            print(f"   node {node} vs node 1: {' | '.join(lines[:6])[:400]}")
        if div.get("prepared_left"):
            print(f"   prepared transactions left: {div['prepared_left']}")
        groups = Counter()
        status = defaultdict(set)
        for b in r["blocks"]:
            sig = (b.get("cause") or signature(b["standalone"], b["cluster"]))
            groups[sig] += 1
            status[sig].add(b["status"])
        for sig, n in groups.most_common():
            print(f"   {n:4d} [{'/'.join(sorted(status[sig]))}] {sig}")


def split(path: Path, reasons: list[tuple[re.Pattern, str]]) -> None:
    exp = expected_mod.load(path)
    out = []
    for e in exp.entries:
        if e.explained:
            out.append(e)
            continue
        by_sig: dict[str, list[dict]] = defaultdict(list)
        for b in e.blocks:
            by_sig[b.get("cause") or signature(b.get("standalone", []),
                                               b.get("cluster", []))].append(b)
        for sig, blocks in by_sig.items():
            reason = e.reason if e.reason != expected_mod.TODO else f"{expected_mod.TODO} - {sig}"
            for rx, text in reasons:
                if rx.search(sig):
                    reason = text
                    break
            out.append(expected_mod.Entry(e.file, reason, blocks))
    exp.entries = out
    expected_mod.save(exp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compat.triage", description=__doc__.split("\n\n")[0])
    ap.add_argument("report", nargs="?", type=Path, help="a run's report.json")
    ap.add_argument("--split", action="store_true")
    ap.add_argument("--reason", action="append", default=[], metavar="REGEX=REASON")
    ap.add_argument("--expected", type=Path, default=expected_mod.EXPECTED_FILE)
    args = ap.parse_args(argv)
    if args.report:
        show(args.report)
    if args.split or args.reason:
        reasons = []
        for item in args.reason:
            rx, _, text = item.partition("=")
            reasons.append((re.compile(rx), text))
        split(args.expected, reasons)
    return 0


if __name__ == "__main__":
    sys.exit(main())
