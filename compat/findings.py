"""``python -m compat.findings REPORT.json [--summary FILE] > compat/FINDINGS.md``:
a run's report as Markdown, file by file.

For every file that is not IDENTICAL: its category, the divergence (the
statement after which the nodes differed, when the file ran with
``--stepwise``, and the first lines that differ between the nodes'
dumps), then its output blocks grouped by cause (compat.triage's
signature: the first error the cluster printed instead of the
standalone's), each cause with its class (divergence / refusal /
apply-failure / other), how many blocks, the standalone line where the
first one starts and its first differing lines. ``--summary`` puts a
hand-written analysis on top.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

from .expected import Block
from .triage import signature

FIRST_LINES = 6
WIDTH = 200


def _clip(line: str) -> str:
    line = line.replace("|", "\\|")
    return line if len(line) <= WIDTH else line[:WIDTH] + " …"


def _reclass(rep: dict) -> None:
    """Class every block again with this version's rules (a report keeps
    each block's first lines, which is what the classes look at)."""
    for r in rep["results"]:
        for b in r["blocks"]:
            b["kind"] = Block(0, 0, b["standalone"], b["cluster"]).kind
    kinds = [b["kind"] for r in rep["results"] for b in r["blocks"]]
    rep["totals"].update(blocks_refusal=kinds.count("refusal"),
                         blocks_apply_failure=kinds.count("apply-failure"),
                         blocks_other=kinds.count("other"))


def render(rep: dict) -> str:
    _reclass(rep)
    tot = rep["totals"]
    out = [f"## Per file (run of {rep['started'][:10]}, mmproxy {rep['mmproxy']}, "
           f"{rep['regression_sql']})\n\n",
           f"{tot['files_run']} files: {tot['identical']} identical, "
           f"{tot['accepted_differences']} with accepted differences, "
           f"{tot['unexplained_differences']} with unexplained differences, "
           f"{tot['divergences']} divergences, {tot['errors']} errors; "
           f"{rep['wall_s'] / 60:.0f} min. Output blocks: {tot['blocks_refusal']} refusal, "
           f"{tot.get('blocks_apply_failure', 0)} apply-failure, {tot['blocks_other']} other.\n"]
    for r in rep["results"]:
        if r["category"] == "IDENTICAL":
            continue
        out.append(f"\n### {r['file']}: {r['category']}\n\n")
        if r["errors"]:
            out.append("Errors: " + "; ".join(_clip(e) for e in r["errors"]) + "\n\n")
        for note in r.get("interventions", []):
            out.append(f"- note: {_clip(note)}\n")
        if r.get("divergence_prepared"):
            out.append(f"- **divergence**: the nodes hold different prepared transactions: "
                       f"{r['divergence_prepared']}\n")
        for st in r.get("stepwise", []):
            out.append(f"- **divergence** after lines {st['lines']}: "
                       f"`{_clip(' '.join(st['statement']))}`\n")
            for node, lines in st["new_lines"].items():
                out.append(f"  - node {node} vs node 1: "
                           + "; ".join(f"`{_clip(ln)}`" for ln in lines[:FIRST_LINES]) + "\n")
        div = r.get("divergence", {})
        for node, lines in div.get("new_lines", {}).items():
            out.append(f"- **divergence**, node {node} vs node 1 "
                       f"({div.get('new_line_count', len(lines))} new differing lines): "
                       + "; ".join(f"`{_clip(ln)}`" for ln in lines[:FIRST_LINES]) + "\n")
        if div.get("prepared_left"):
            out.append(f"- **prepared transactions left**: {div['prepared_left']}\n")
        if div.get("nodes_differing") and not div.get("new_lines"):
            out.append(f"- nodes {div['nodes_differing']} still differ from node 1 "
                       f"(carried from an earlier file)\n")
        causes: OrderedDict[str, list[dict]] = OrderedDict()
        for b in r["blocks"]:
            causes.setdefault(signature(b["standalone"], b["cluster"]), []).append(b)
        if causes:
            out.append("\n| cause | class | blocks | first at line | first differing lines |\n"
                       "|---|---|---:|---:|---|\n")
        for sig, blocks in causes.items():
            b = blocks[0]
            kinds = "/".join(sorted({x["kind"] for x in blocks}))
            status = sorted({x["status"] for x in blocks})
            first = ([f"-{ln}" for ln in b["standalone"][:3]]
                     + [f"+{ln}" for ln in b["cluster"][:3]])
            accepted = ""
            if status == ["accepted"]:
                reasons = sorted({x["reason"] for x in blocks})
                accepted = " (accepted: " + _clip("; ".join(reasons))[:160] + ")"
            out.append(f"| {_clip(sig)}{accepted} | {kinds} | {len(blocks)} | "
                       f"{b['standalone_line']} | "
                       + "<br>".join(f"`{_clip(x)}`" for x in first) + " |\n")
    return "".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compat.findings")
    ap.add_argument("report", type=Path)
    ap.add_argument("--summary", type=Path, help="Markdown to put on top")
    args = ap.parse_args(argv)
    rep = json.loads(args.report.read_text())
    if args.summary:
        sys.stdout.write(args.summary.read_text().rstrip("\n") + "\n\n")
    sys.stdout.write(render(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
