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
hand-written analysis on top (given compat/FINDINGS.md itself, the part
above the "generated" marker is kept).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import OrderedDict
from pathlib import Path

from .expected import Block, signature

FIRST_LINES = 6
MARKER = ("<!-- Everything below is generated: python -m compat.findings REPORT.json "
          "--summary compat/FINDINGS.md -->")
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


# Errors that only follow from an earlier difference in the same file (an
# object a refused statement would have made is missing, a transaction
# block an error aborted): not causes of their own.
CONSEQUENCE = re.compile(r"(does not exist|current transaction is aborted|already exists"
                         r"|violates foreign key constraint|no partition of relation"
                         r"|is not a partition of|cannot be dropped because some objects"
                         r"|other objects depend on it|contains null values|is violated by some"
                         r"|violates check constraint|violates unique constraint"
                         r"|is not a member of role|not found in parent|is missing column"
                         # data lines of a COPY FROM stdin that failed, read as SQL
                         r"|syntax error at or near)")


def statement_before(lines: list[str], line_no: int, max_lines: int = 8) -> str:
    """The statement psql echoed just before line ``line_no`` (1-based) of
    an output: the echoed lines back to the previous statement's end."""
    out: list[str] = []
    i = line_no - 2
    while i >= 0 and len(out) < max_lines:
        ln = lines[i]
        if out and (ln.rstrip().endswith(";") or not ln.strip()
                    or ln.startswith(("ERROR:", "(", "NOTICE:", "WARNING:", "HINT:", "DETAIL:",
                                      "LINE ", "CONTEXT:", "QUERY:"))):
            break
        if not out and ln.startswith(("ERROR:", "HINT:", "DETAIL:", "NOTICE:", "(", "LINE ")):
            i -= 1
            continue
        out.insert(0, ln)
        i -= 1
    while out and out[0].lstrip().startswith("--"):
        out.pop(0)
    return " ".join(x.strip() for x in out)


def causes(rep: dict, out_dir: Path | None) -> str:
    """Every cause that is not a consequence, across files, with the
    statement the cluster printed it for (from the cluster's output)."""
    by_sig: OrderedDict[str, list[tuple[str, str]]] = OrderedDict()
    for r in rep["results"]:
        lines = None
        if out_dir is not None:
            p = out_dir / "outputs" / f"{r['file']}.cluster.out"
            if p.exists():
                lines = p.read_text(errors="replace").split("\n")
        seen = set()
        for b in r["blocks"]:
            sig = (b.get("cause") or signature(b["standalone"], b["cluster"]))
            if (not sig.startswith("cluster: ") or sig in seen
                    or (CONSEQUENCE.search(sig) and "could not apply it" not in sig)):
                continue
            if b["status"] == "accepted" and b["reason"].startswith("rule "):
                continue
            seen.add(sig)
            stmt = statement_before(lines, b["cluster_line"]) if lines else ""
            by_sig.setdefault(re.sub(r"\d+", "N", sig), []).append((r["file"], stmt))
    out = ["## Causes across files\n\n",
           "Each error the cluster printed where the standalone did not, except those that "
           "only follow from an earlier difference in the same file (a missing object, an "
           "aborted transaction block), with the first statement it was printed for in "
           "each file.\n\n| cause | files | first statement, per file |\n|---|---:|---|\n"]
    for sig, hits in sorted(by_sig.items(), key=lambda kv: -len(kv[1])):
        stmts = "<br>".join(f"{f}: `{_clip(st)[:160]}`" for f, st in hits[:6])
        more = f"<br>(and {len(hits) - 6} more)" if len(hits) > 6 else ""
        out.append(f"| {_clip(sig.removeprefix('cluster: '))} | {len(hits)} | {stmts}{more} |\n")
    return "".join(out) + "\n"


def render(rep: dict) -> str:
    _reclass(rep)
    tot = rep["totals"]
    out = [f"## Per file (run of {rep['started'][:10]}, mmproxy {rep['mmproxy']}, "
           f"{rep['regression_sql']})\n\n",
           f"{tot['files_run']} files: {tot['identical']} identical, "
           f"{tot['accepted_differences']} with accepted (by-design) differences, "
           f"{tot.get('known_defects', 0)} with known defects only, "
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
            causes.setdefault((b.get("cause") or signature(b["standalone"], b["cluster"])), []).append(b)
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
            if set(status) <= {"accepted", "defect"}:
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
        # a FINDINGS.md given as its own summary keeps what is above the marker
        text = args.summary.read_text().split(MARKER)[0]
        sys.stdout.write(text.rstrip("\n") + "\n\n")
    sys.stdout.write(MARKER + "\n\n")
    sys.stdout.write(causes(rep, args.report.parent))
    sys.stdout.write(render(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
