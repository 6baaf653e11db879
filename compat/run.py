"""``python -m compat.run``: PostgreSQL 15's regression SQL, file by file in
parallel_schedule order, through node 1 of a 3-node cluster and against a
standalone PostgreSQL 15; outputs compared, and after every file the three
nodes' dumps compared (docs/compat.md).

Per file, in this order:

1. ``psql -X -a -q -d regression -v HIDE_TABLEAM=on -v
   HIDE_TOAST_COMPRESSION=on < file`` against the standalone, then against
   node 1's proxy port, stdout and stderr into one file (``2>&1``), as
   pg_regress runs it (pg_regress_main.c), with a time limit;
2. both outputs normalised for ports and server directories only, cut
   into blocks and each block judged against compat/expected.toml
   (compat.expected);
3. the nodes left to settle, then each node's ``regression`` database and
   globals dumped directly and compared (compat.dump); prepared
   transactions left on any node are reported too.

A file's category, worst first: DIVERGENCE (a node's dump differs from
node 1's in a way it did not after the previous file, the nodes hold
different prepared transactions, or one of the protocol's is left in
doubt), ERROR (the check could not be made: a proxy exited, a dump
failed, the time limit), NEW (an output block nobody explained), DEFECT
(every block explained, some as a known defect), ACCEPTED (every block
explained as by design), IDENTICAL. The exit status is 1 when any file is
DIVERGENCE, ERROR or NEW, 2 when the run could not start.

Every process started here is stopped at the end (compat.targets), also on
Ctrl-C; ``--keep`` leaves the servers' directory (stopped) for a look.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import dump as dumps
from . import expected as expected_mod
from .schedule import SCHEDULE, select
from .sources import PG_VERSION, PGLAST_VERSION, ensure_sql_dir
from .targets import REGRESS_DB, Targets, psql_env

ROOT = Path(__file__).resolve().parent.parent
FILE_TIMEOUT_S = 300
SETTLE_TIMEOUT_S = 20
SETTLE_STABLE_S = 5        # a difference unchanged this long is not replication lag
WATCH_INTERVAL_S = 5
STUCK_S = 30               # a session blocked this long by a prepared transaction is stuck
REPORT_LINES = 12          # first differing lines kept per block / node in the report
CLIENT_GID = re.compile(r"^MTM-\d+-\d+-\d+:(.*)$", re.DOTALL)
CATEGORIES = ("DIVERGENCE", "ERROR", "NEW", "DEFECT", "ACCEPTED", "IDENTICAL")


def log(msg: str) -> None:
    print(f"[{dt.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# -- one psql run --------------------------------------------------------------------

def run_psql(sql: Path, env: dict[str, str], out: Path, timeout_s: float,
             watch=None) -> tuple[float, bool]:
    """``psql ... < sql > out 2>&1``; returns (seconds, timed_out). psql runs
    in a process group of its own so that a time limit kills it (and any
    ``\\!`` child) by its pid. ``watch()`` runs every WATCH_INTERVAL_S while
    psql runs."""
    cmd = [os.path.join(_bindir(), "psql"), "-X", "-a", "-q", "-d", REGRESS_DB,
           "-v", "HIDE_TABLEAM=on", "-v", "HIDE_TOAST_COMPRESSION=on"]
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    with open(sql, "rb") as fin, open(out, "wb") as fout:
        proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        while True:
            try:
                proc.wait(max(0.01, min(WATCH_INTERVAL_S, deadline - time.monotonic())))
                return time.monotonic() - t0, False
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    break
                if watch is not None:
                    watch()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with open(out, "ab") as fout:
        fout.write(f"\n*** compat: psql killed at the time limit ({timeout_s:g} s)\n".encode())
    return time.monotonic() - t0, True


def run_psql_stepwise(sql: Path, env: dict[str, str], out: Path, timeout_s: float,
                      markers: Path, check, watch=None) -> tuple[float, bool]:
    """The same psql run, fed unit by unit (compat.statements): after each
    unit, a ``\\! touch`` marker tells that psql has run it, and
    ``check(unit)`` runs while psql waits for more input. The marker lines
    psql echoes are removed from ``out``, so it reads as a plain run's."""
    from .statements import units
    cmd = [os.path.join(_bindir(), "psql"), "-X", "-a", "-q", "-d", REGRESS_DB,
           "-v", "HIDE_TABLEAM=on", "-v", "HIDE_TOAST_COMPRESSION=on"]
    markers.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    timed_out = False
    marker_lines = set()
    with open(out, "wb") as fout:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=fout,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            for k, unit in enumerate(units(sql.read_text(errors="surrogateescape"))):
                mark = markers / f"m{k}"
                line = f"\\! touch {mark}"
                marker_lines.add(line)
                proc.stdin.write((unit.text + line + "\n").encode(errors="surrogateescape"))
                proc.stdin.flush()
                next_watch = time.monotonic() + WATCH_INTERVAL_S
                while not mark.exists():
                    if proc.poll() is not None:
                        break
                    if time.monotonic() > deadline:
                        raise subprocess.TimeoutExpired(cmd, timeout_s)
                    if watch is not None and time.monotonic() > next_watch:
                        watch()
                        next_watch = time.monotonic() + WATCH_INTERVAL_S
                    time.sleep(0.005)
                if proc.poll() is not None:
                    break
                c0 = time.monotonic()
                check(unit)
                deadline += time.monotonic() - c0      # the limit is for psql, not the checks
            proc.stdin.close()
            proc.wait(max(1.0, deadline - time.monotonic()))
        except (subprocess.TimeoutExpired, BrokenPipeError):
            timed_out = proc.poll() is None
            if timed_out:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = out.read_bytes().decode(errors="surrogateescape").split("\n")
    kept = [ln for ln in text if ln not in marker_lines]
    if timed_out:
        kept.append(f"*** compat: psql killed at the time limit ({timeout_s:g} s)\n")
    out.write_bytes("\n".join(kept).encode(errors="surrogateescape"))
    return time.monotonic() - t0, timed_out


def _bindir() -> str:
    from proxy.pgserver import pg_bin_dir
    return pg_bin_dir()


def normalise_output(text: str, replacements: list[tuple[str, str]], ports: list[int]) -> str:
    """Only what differs because the sides are different servers: their
    directories, and their port numbers where a message prints one."""
    for s, r in replacements:
        text = text.replace(s, r)
    if ports:
        alt = "|".join(str(p) for p in ports)
        text = re.sub(rf'(\bport[ =]"?|127\.0\.0\.1:)({alt})\b', r"\1<port>", text)
    return text


# -- the nodes' state ------------------------------------------------------------------

class DivergenceTracker:
    """Differences between node 1's dump and the others', remembered from
    one file to the next: a file is charged only with differing lines that
    were not there after the previous one."""

    def __init__(self):
        self.known: set[tuple[int, str]] = set()

    def update(self, lines_by_node: dict[int, list[str]]) -> dict[int, list[str]]:
        current = {(i, ln) for i, lines in lines_by_node.items() for ln in lines}
        new = {i: [ln for ln in lines if (i, ln) not in self.known]
               for i, lines in lines_by_node.items()}
        self.known = current
        return {i: v for i, v in new.items() if v}


def settle_and_dump(targets: Targets, timeout_s: float = SETTLE_TIMEOUT_S,
                    known: set[tuple[int, str]] | None = None):
    """Dump every node until they agree (apart from differences in
    ``known``, already charged to an earlier file) with no prepared
    transaction left, or until what differs stays unchanged for
    SETTLE_STABLE_S, or until ``timeout_s``. Returns (dumps by node - None
    where a dump failed -, prepared by node, seconds, errors)."""
    t0 = time.monotonic()
    prev = None
    stable_since = t0
    known = known or set()
    while True:
        errors: list[str] = []
        ds: dict[int, str | None] = {}
        prepared: dict[int, list[str]] = {}
        for i in targets.node_ids():
            pg = targets.node_pg(i)
            try:
                ds[i] = dumps.dump_node(pg, REGRESS_DB)
            except dumps.DumpError as e:
                errors.append(f"node {i}: {e}")
                ds[i] = None
            prepared[i] = dumps.prepared_xacts(pg)
        now = time.monotonic()
        lines = Runner._node_differences(ds)
        if lines is not None and not any(prepared.values()) and all(
                (i, ln) in known for i, v in lines.items() for ln in v):
            return ds, prepared, now - t0, errors
        state = (ds, prepared)
        if state != prev:
            stable_since = now
        if now - stable_since >= SETTLE_STABLE_S or now - t0 >= timeout_s:
            return ds, prepared, now - t0, errors
        prev = state
        time.sleep(1)


# -- the run -----------------------------------------------------------------------------

class Runner:
    """Runs files one by one on started targets and judges each (the loop
    is the caller's: compat.run.main, tests/test_compat.py)."""

    def __init__(self, sql_dir: Path, out: Path, exp: expected_mod.Expected, *,
                 timeout_s: float = FILE_TIMEOUT_S, settle_s: float = SETTLE_TIMEOUT_S,
                 stepwise: dict[str, tuple[int, int]] | None = None):
        self.timeout_s = timeout_s
        self.stepwise = stepwise or {}     # file -> (first, last) line checked
        self.settle_s = settle_s
        self.sql_dir = sql_dir
        self.out = out
        self.exp = exp
        self.tracker = DivergenceTracker()
        self.known_prepared: set[tuple[int, str]] = set()   # charged to an earlier file
        self.targets: Targets | None = None
        self.results: list[dict] = []
        self.found_blocks: dict[str, list[expected_mod.Block]] = {}

    def start(self, base: Path) -> None:
        self.targets = Targets(base, log=log).start()
        self.check_baseline()

    def check_baseline(self) -> None:
        """The nodes must agree before the first file (or the run would
        charge a file with what was there before)."""
        ds, prepared, waited, errors = settle_and_dump(self.targets)
        lines = self._node_differences(ds)
        if lines or errors or any(prepared.values()):
            raise RuntimeError(f"the nodes differ before any file ran: {lines} {errors} "
                               f"{prepared}")

    @staticmethod
    def _node_differences(ds: dict[int, str | None]) -> dict[int, list[str]] | None:
        """Node 1's dump against each other node's: the differing lines per
        node; None when a dump is missing (nothing can be said)."""
        if any(d is None for d in ds.values()):
            return None
        ids = sorted(ds)
        base = ds[ids[0]]
        return {i: dumps.differing_lines(base, ds[i]) for i in ids[1:] if ds[i] != base}

    def run_file(self, name: str) -> dict:
        t = self.targets
        sql = self.sql_dir / f"{name}.sql"
        res: dict = {"file": name, "errors": []}
        outs = {}
        for side, port in (("standalone", t.standalone_port()), ("cluster", t.node_port(1))):
            raw = self.out / "outputs" / f"{name}.{side}.out"
            raw.parent.mkdir(parents=True, exist_ok=True)
            env = psql_env(t.dirs, port, name)
            if side == "cluster" and name in self.stepwise:
                steps: list[dict] = []
                res["stepwise"] = steps
                secs, timed_out = run_psql_stepwise(
                    sql, env, raw, self.timeout_s, self.out / "markers" / name,
                    lambda unit: self._check_unit(name, unit, steps, self.stepwise[name]),
                    lambda: self._unstick(name, side, res))
            else:
                secs, timed_out = run_psql(sql, env, raw, self.timeout_s,
                                           lambda: self._unstick(name, side, res))
            res[f"{side}_s"] = round(secs, 2)
            if timed_out:
                res["errors"].append(f"{side}: psql killed at the time limit "
                                     f"({self.timeout_s:g} s)")
                t.end_sessions(name)
            text = raw.read_text(errors="surrogateescape")
            raw.write_text(normalise_output(text, t.replacements(), t.ports()),
                           errors="surrogateescape")
            outs[side] = raw
        found = expected_mod.blocks(outs["standalone"], outs["cluster"])
        self.found_blocks[name] = found
        judged = []
        for b in found:
            status, reason = self.exp.judge(name, b)
            judged.append({"fingerprint": b.fingerprint, "status": status, "kind": b.kind,
                           "cause": expected_mod.signature(b.minus, b.plus),
                           "reason": reason, "standalone_line": b.standalone_line,
                           "cluster_line": b.cluster_line,
                           "standalone": b.minus[:REPORT_LINES],
                           "cluster": b.plus[:REPORT_LINES],
                           "lines": f"-{len(b.minus)} +{len(b.plus)}"})
        res["blocks"] = judged
        res["expected_not_seen"] = self.exp.unseen(name, found)
        if found:
            diff = self.out / "diffs" / f"{name}.diff"
            dumps.write(diff, expected_mod.pretty_diff(outs["standalone"], outs["cluster"]))
            res["diff"] = str(diff.relative_to(self.out))
        else:
            # identical outputs: keep one copy only
            outs["cluster"].unlink()
        dead = t.proxies_alive()
        if dead:
            res["errors"].append(f"proxy of node(s) {dead} exited")
        self._prepared_by_file(res)
        # the nodes' state
        ds, prepared, waited, errors = settle_and_dump(t, self.settle_s, self.tracker.known)
        res["settle_s"] = round(waited, 1)
        res["errors"] += [f"dump: {e}" for e in errors]
        lines = self._node_differences(ds)
        new = self.tracker.update(lines) if lines is not None else {}
        div: dict = {}
        if lines:
            div["nodes_differing"] = sorted(lines)
            div["carried_lines"] = sum(len(v) for v in lines.values()) - sum(
                len(v) for v in new.values())
            ddir = self.out / "divergence"
            first = sorted(ds)[0]
            for i in sorted(lines):
                p = ddir / f"{name}.node{first}-vs-node{i}.diff"
                dumps.write(p, dumps.unified(ds[first], ds[i], f"node{first}", f"node{i}"))
            if new:
                for i in sorted(ds):
                    dumps.write(ddir / f"{name}.node{i}.dump.sql", ds[i].text())
        if new:
            div["new_lines"] = {str(i): v[:REPORT_LINES * 2] for i, v in new.items()}
            div["new_line_count"] = sum(len(v) for v in new.values())
        # the protocol's own transactions left in doubt (a client's were
        # rolled back above)
        left = {str(i): [g for g in v if (i, g) not in self.known_prepared
                         and not CLIENT_GID.match(g.split(" ")[0])]
                for i, v in prepared.items()}
        left = {i: v for i, v in left.items() if v}
        self.known_prepared = {(i, g) for i, v in prepared.items() for g in v}
        if left:
            div["prepared_left"] = left
        res["divergence"] = div
        res["category"] = self._category(res)
        return res

    # -- prepared transactions a file leaves ------------------------------------------

    def _client_prepared(self, side: str, node: int | None = None) -> list[tuple[str, str]]:
        """(gid, name the client gave) of prepared transactions on a side.
        On the cluster a client's 'x' is prepared as MTM-<node>-<gen>-<seq>:x
        (docs/cluster.md); the protocol's own gids have no ':'."""
        t = self.targets
        pg = t.standalone if side == "standalone" else t.node_pg(node or t.node_ids()[0])
        out = []
        for gid in dumps.prepared_xacts(pg, with_database=False):
            if side == "standalone":
                out.append((gid, gid))
            else:
                m = CLIENT_GID.match(gid)
                if m:
                    out.append((gid, m[1]))
        return out

    def _rollback_prepared(self, side: str, names: list[str]) -> None:
        """ROLLBACK PREPARED each, on the standalone directly, on the
        cluster through node 1 (the proxy finishes it everywhere)."""
        t = self.targets
        for name in names:
            q = "ROLLBACK PREPARED " + "'" + name.replace("'", "''") + "'"
            if side == "standalone":
                t.standalone.psql(q, dbname=REGRESS_DB, check=False)
            else:
                subprocess.run([os.path.join(_bindir(), "psql"), "-X", "-q", "-h", "127.0.0.1",
                                "-p", str(t.node_port(1)), "-U", "postgres", "-d", REGRESS_DB,
                                "-c", q], capture_output=True, timeout=120)

    def _unstick(self, name: str, side: str, res: dict) -> None:
        """While psql runs: a file's session blocked for STUCK_S by a
        prepared transaction (pg_blocking_pids reports those as pid 0)
        would wait for ever - a transaction the file prepared and meant to
        fail, as it does on the standalone, and that the cluster let
        through. Roll the file's prepared transactions back (noted in the
        report) so that the file, and the run, go on."""
        t = self.targets
        pg = t.standalone if side == "standalone" else t.node_pg(t.node_ids()[0])
        out = pg.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                      f"'pg_regress/{name}' AND wait_event_type = 'Lock' "
                      f"AND now() - query_start > interval '{STUCK_S} s' "
                      "AND 0 = ANY(pg_blocking_pids(pid))", check=False)
        if out.strip() in ("", "0"):
            return
        left = self._client_prepared(side)
        if not left:
            return
        self._rollback_prepared(side, [n for _, n in left])
        note = (f"{side}: the file's session waited over {STUCK_S} s for a lock held by a "
                f"prepared transaction; rolled back {', '.join(n for _, n in left)}")
        res.setdefault("interventions", []).append(note)
        log(f"    {name}: {note}")

    def _prepared_by_file(self, res: dict) -> None:
        """After both psql runs: client prepared transactions the file left.
        Every node must hold the same ones (else DIVERGENCE); they are
        compared with the standalone's (a difference is noted), then rolled
        back on both sides so that later files are not blocked by them."""
        t = self.targets
        cluster = {i: sorted(n for _, n in self._client_prepared("cluster", i))
                   for i in t.node_ids()}
        standalone = sorted(n for _, n in self._client_prepared("standalone"))
        if any(v != cluster[t.node_ids()[0]] for v in cluster.values()):
            res.setdefault("divergence_prepared", {}).update(
                {str(i): v for i, v in cluster.items()})
        first = cluster[t.node_ids()[0]]
        if first or standalone:
            res["prepared_by_file"] = {"standalone": standalone, "cluster": first}
            self._rollback_prepared("standalone", standalone)
            self._rollback_prepared("cluster", first)
            res.setdefault("interventions", []).append(
                f"rolled back what the file left prepared: standalone {standalone}, "
                f"cluster {first}")

    def _in_transaction(self, name: str) -> bool:
        """Is the file's session (on node 1's PostgreSQL) inside a
        transaction block?"""
        pg = self.targets.node_pg(self.targets.node_ids()[0])
        out = pg.psql("SELECT state FROM pg_stat_activity WHERE application_name = "
                      f"'pg_regress/{name}'", check=False)
        return "idle in transaction" in out

    def _check_unit(self, name: str, unit, steps: list[dict],
                    lines: tuple[int, int] = (1, 1 << 30)) -> None:
        """--stepwise: after one unit of the file ran through node 1, are the
        nodes still the same? Records the units that made them differ
        (the divergence tracker is advanced, so the file's own check after
        the last unit charges it with nothing new; the steps say what)."""
        if unit.last_line < lines[0] or unit.first_line > lines[1]:
            return
        if self._in_transaction(name):
            return      # nothing of it is committed yet, and its locks would stall the dumps
        ds, prepared, waited, errors = settle_and_dump(self.targets, self.settle_s,
                                                       self.tracker.known)
        lines = self._node_differences(ds)
        new = self.tracker.update(lines) if lines is not None else {}
        left = {str(i): v for i, v in prepared.items() if v}
        if new or left or errors:
            steps.append({"lines": f"{unit.first_line}-{unit.last_line}",
                          "statement": unit.text.strip().splitlines()[:REPORT_LINES],
                          "new_lines": {str(i): v[:REPORT_LINES] for i, v in new.items()},
                          "prepared_left": left, "errors": errors})
            log(f"    {name}:{unit.first_line}-{unit.last_line}: the nodes differ after: "
                f"{unit.text.strip().splitlines()[0][:100]}")

    @staticmethod
    def _category(res: dict) -> str:
        div = res.get("divergence", {})
        if res.get("divergence_prepared"):
            return "DIVERGENCE"
        if div.get("new_lines") or div.get("prepared_left") or any(
                st["new_lines"] or st["prepared_left"] for st in res.get("stepwise", [])):
            return "DIVERGENCE"
        if res["errors"]:
            return "ERROR"
        statuses = {b["status"] for b in res["blocks"]}
        if "new" in statuses:
            return "NEW"
        if "defect" in statuses:
            return "DEFECT"
        if statuses:
            return "ACCEPTED"
        return "IDENTICAL"


def totals(results: list[dict]) -> dict:
    c = {k: 0 for k in CATEGORIES}
    for r in results:
        c[r["category"]] += 1
    return {"files_run": len(results), "identical": c["IDENTICAL"],
            "accepted_differences": c["ACCEPTED"], "known_defects": c["DEFECT"],
            "unexplained_differences": c["NEW"],
            "divergences": c["DIVERGENCE"], "errors": c["ERROR"],
            "files_with_carried_divergence": sum(
                1 for r in results if r.get("divergence", {}).get("nodes_differing")),
            "blocks_refusal": sum(1 for r in results for b in r["blocks"]
                                  if b["kind"] == "refusal"),
            "blocks_apply_failure": sum(1 for r in results for b in r["blocks"]
                                        if b["kind"] == "apply-failure"),
            "blocks_other": sum(1 for r in results for b in r["blocks"]
                                if b["kind"] == "other")}


def _git_rev() -> str:
    res = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return res.stdout.strip() + ("+dirty" if dirty else "")


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="python -m compat.run",
        description="Run PostgreSQL 15's regression SQL through node 1 of a 3-node mmproxy "
                    "cluster and against a standalone PostgreSQL 15; compare outputs and the "
                    "nodes' dumps after every file (docs/compat.md).")
    ap.add_argument("--files", nargs="+", metavar="NAME",
                    help="only these files (schedule order is kept; commas also separate)")
    ap.add_argument("--from", dest="from_", metavar="NAME", help="start at this file")
    ap.add_argument("--to", metavar="NAME", help="stop after this file")
    ap.add_argument("--out", type=Path, help="output directory (default: a new one under /tmp)")
    ap.add_argument("--dir", type=Path, help="where the servers live (default: a new "
                    "directory under /tmp, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="leave the servers' directory")
    ap.add_argument("--timeout", type=float, default=FILE_TIMEOUT_S,
                    help=f"seconds per file and side (default {FILE_TIMEOUT_S})")
    ap.add_argument("--settle", type=float, default=SETTLE_TIMEOUT_S,
                    help=f"seconds to wait for the nodes to agree (default {SETTLE_TIMEOUT_S})")
    ap.add_argument("--accept", action="store_true",
                    help="record this run's differences in the expected file: keep existing "
                         "reasons, add new blocks with reason 'TODO: explain'")
    ap.add_argument("--prune", action="store_true",
                    help="with --accept: also drop the blocks of the files run that this "
                         "run did not find")
    ap.add_argument("--expected", type=Path, default=expected_mod.EXPECTED_FILE)
    ap.add_argument("--cache", type=Path, help="where the regression SQL is cached")
    ap.add_argument("--stepwise", nargs="+", metavar="NAME[:FROM-TO]", default=[],
                    help="for these files, check the nodes after every statement (slow: a "
                         "dump of every node per statement), to find the one that made "
                         "them differ; FROM-TO limits the checks to those lines")
    ap.add_argument("--list", action="store_true", help="print the files that would run")
    return ap.parse_args(argv)


def parse_stepwise(items: list[str]) -> dict[str, tuple[int, int]]:
    out = {}
    for item in items:
        for spec in item.split(","):
            name, _, rng = spec.partition(":")
            first, _, last = rng.partition("-")
            out[name] = (int(first or 1), int(last or 1 << 30))
    return out


def pick_files(args) -> list[str]:
    names = None
    if args.files:
        names = [n for item in args.files for n in item.split(",") if n]
    picked = select(names)
    if args.from_:
        if args.from_ not in SCHEDULE:
            raise ValueError(f"--from {args.from_}: not in the schedule")
        picked = [n for n in picked if SCHEDULE.index(n) >= SCHEDULE.index(args.from_)]
    if args.to:
        if args.to not in SCHEDULE:
            raise ValueError(f"--to {args.to}: not in the schedule")
        picked = [n for n in picked if SCHEDULE.index(n) <= SCHEDULE.index(args.to)]
    return picked


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        files = pick_files(args)
    except ValueError as e:
        print(f"compat.run: {e}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(files))
        return 0
    sql_dir = ensure_sql_dir(args.cache, log=log)
    exp = expected_mod.load(args.expected)
    out = args.out or Path(tempfile.mkdtemp(prefix="mmproxy-compat-out-"))
    out.mkdir(parents=True, exist_ok=True)
    base = args.dir or Path(tempfile.mkdtemp(prefix="mmproxy-compat-"))
    report = {"started": dt.datetime.now().isoformat(timespec="seconds"),
              "mmproxy": _git_rev(), "regression_sql": f"PostgreSQL {PG_VERSION} "
              f"(pglast {PGLAST_VERSION} sdist)", "files_requested": files,
              "expected_file": str(args.expected), "results": []}
    runner = Runner(sql_dir, out, exp, timeout_s=args.timeout, settle_s=args.settle,
                    stepwise=parse_stepwise(args.stepwise))
    t0 = time.monotonic()
    interrupted = None
    log(f"{len(files)} file(s); output in {out}; servers in {base}")

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        try:
            runner.start(base)
        except Exception as e:        # noqa: BLE001 - reported, then exit 2
            log(f"could not start: {e}")
            report["fatal"] = f"could not start: {e}"
            _write_report(out, report, runner.results, t0)
            return 2
        for k, name in enumerate(files, 1):
            r = runner.run_file(name)
            runner.results.append(r)
            _write_report(out, report, runner.results, t0)
            n_new = sum(1 for b in r["blocks"] if b["status"] == "new")
            log(f"{k:3d}/{len(files)} {name:<22} {r['category']:<10} "
                f"blocks {len(r['blocks'])} (new {n_new})  "
                f"{r['standalone_s']:.1f}s / {r['cluster_s']:.1f}s, settle {r['settle_s']}s"
                + (f"  {'; '.join(r['errors'])}" if r["errors"] else ""))
            if any("exited" in e for e in r["errors"]):
                log("a proxy exited: stopping the run")
                report["fatal"] = f"after {name}: " + "; ".join(r["errors"])
                break
    except KeyboardInterrupt as e:
        interrupted = str(e) or "interrupted"
        report["fatal"] = f"interrupted ({interrupted})"
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if runner.targets is not None:
            if args.keep:
                runner.targets.stop()
            else:
                runner.targets.destroy()
        elif not args.keep:
            subprocess.run(["rm", "-rf", str(base)], check=False)
    rep = _write_report(out, report, runner.results, t0)
    if args.accept:
        added = 0
        for r in runner.results:
            if not any("time limit" in e for e in r["errors"]):
                added += exp.record(r["file"], runner.found_blocks[r["file"]], args.prune)
        expected_mod.save(exp, args.expected)
        log(f"--accept: {added} new block(s) recorded in {args.expected} "
            f"with reason '{expected_mod.TODO}'")
    tot = rep["totals"]
    log(f"files {tot['files_run']}: identical {tot['identical']}, accepted differences "
        f"{tot['accepted_differences']}, known defects {tot['known_defects']}, "
        f"unexplained differences "
        f"{tot['unexplained_differences']}, divergences {tot['divergences']}, errors "
        f"{tot['errors']}; {rep['wall_s']:.0f} s; report {out / 'report.json'}")
    if interrupted or report.get("fatal"):
        return 2 if not runner.results else 1
    bad = tot["unexplained_differences"] + tot["divergences"] + tot["errors"]
    return 1 if bad else 0


def _write_report(out: Path, report: dict, results: list[dict], t0: float) -> dict:
    rep = dict(report)
    rep["results"] = results
    rep["totals"] = totals(results)
    rep["wall_s"] = round(time.monotonic() - t0, 1)
    rep["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(rep, indent=1) + "\n")
    tmp.rename(out / "report.json")
    return rep


if __name__ == "__main__":
    sys.exit(main())
