"""Fault campaigns: rounds of fault, heal and DataSync on a real cluster.

    python -m harness.run --rounds 100 --seed 7 --faults kill-proxy,crash-pg,fp:after_votes

One seed decides every round's fault and victim (round k draws from
``Random(f"{seed}:{k}")``, so ``--first-round k --rounds 1`` replays the
schedule of round k alone). A round: the workload runs on every node;
warm-up; the fault is injected on the victim and held; healed; the
cluster settles; the workload stops; then **DataSync**:

- no prepared transaction left on any node (queried on PostgreSQL
  directly, as mmts's tests do with ``mtm_admin``),
- every workload table has the same contents on every node (hash of the
  ordered rows),
- the checker over the whole history so far (bank: every read summed to the
  total, every acknowledged transfer present exactly once everywhere, no
  failed one anywhere; list-append: Elle's anomalies, lost writes).

Per round it measures, from the history's clock: fault -> first commit
acknowledged on a surviving node, the longest gap between acknowledged
commits anywhere, commits and aborts per second per node before, during
and after the fault, and heal -> the victim's first acknowledged commit.
It prints a compact table and writes the history (``history.jsonl``), the
final states and a JSON summary into ``--dir``. A round that breaks
safety prints its seed and the command that replays it, and the run exits
with status 1.
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import threading
import time

import psycopg
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import nemesis
from .cluster import ClusterUnderTest
from .history import History, write_final_states
from .workloads import AppendWorkload, BankWorkload

TABLES = {"bank": ("bank_accounts", "bank_ledger"),
          "append": ("append0", "append1", "append2")}


@dataclass
class RoundResult:
    round: int
    fault: str
    victim: int
    other: int | None
    detail: str
    fault_at: float
    heal_at: float
    end_at: float
    first_survivor_commit_s: float | None
    longest_gap_s: float | None
    victim_back_s: float | None
    rates: dict = field(default_factory=dict)   # node -> phase -> [ok/s, fail+info/s]
    prepared_wait_s: float = 0.0
    online_wait_s: float = 0.0          # DataSync: until every node is ONLINE in one generation
    violations: list = field(default_factory=list)


class Campaign:
    def __init__(self, base: Path, *, workload: str = "bank", nodes: int = 3, seed: int = 1,
                 faults: list[str] | None = None, warm_s: float = 2.0, hold_s: float = 4.0,
                 settle_s: float = 4.0, timeouts: dict | None = None, log=print,
                 clients_per_node: int | None = None, log_level: str = "info"):
        self.base = Path(base)
        self.seed = seed
        self.faults = faults or list(nemesis.PROCESS_FAULTS + nemesis.NETWORK_FAULTS)
        self.warm_s, self.hold_s, self.settle_s = warm_s, hold_s, settle_s
        self.log = log
        self.workload_name = workload
        if workload == "bank":
            kw = {} if clients_per_node is None else {"transfer_clients_per_node":
                                                      clients_per_node}
            self.workload = BankWorkload(seed=seed, **kw)
        else:
            kw = {} if clients_per_node is None else {"clients_per_node": clients_per_node}
            # REPEATABLE READ: snapshot isolation on each node, where the
            # checker allows only G2-item (write skew; mmts documents
            # SERIALIZABLE as node-local). Under READ COMMITTED PostgreSQL
            # itself shows G-single and lost updates.
            self.workload = AppendWorkload(seed=seed, isolation="repeatable read", **kw)
        self.cluster = ClusterUnderTest(
            self.base / "cluster", nodes, relay_clients=True, log_level=log_level,
            timeouts={"commit_vote_timeout_ms": 2000, **(timeouts or {})})
        self.history = History()
        self._saved = 0          # ops of the history already in history.jsonl
        self.results: list[RoundResult] = []

    # -- running ------------------------------------------------------------------

    def start(self) -> None:
        self.cluster.start()
        self.workload.setup(self.cluster.node(1).dsn())

    def _load(self) -> tuple[threading.Thread, threading.Event]:
        stop = threading.Event()
        dsns = {i: self.cluster.node(i).dsn() for i in self.cluster.ids}
        errors: list = []

        def run():
            try:
                self.workload.run(dsns, stop=stop, history=self.history)
            except BaseException as e:      # reported by the round
                errors.append(e)
        t = threading.Thread(target=run, name="workload", daemon=True)
        t.errors = errors
        t.start()
        return t, stop

    def run_round(self, k: int, fault: str | None = None,
                  victim: int | None = None) -> RoundResult:
        rng = random.Random(f"{self.seed}:{k}")
        drawn_fault = rng.choice(self.faults)
        drawn_victim = rng.choice(self.cluster.ids)
        fault = fault or drawn_fault
        victim = victim or drawn_victim
        c = self.cluster
        first_op = len(self.history.ops)
        load, stop = self._load()
        start_at = self.history.now()
        time.sleep(self.warm_s)
        fault_at = self.history.now()
        inj = nemesis.inject(c, fault, victim, rng, self.hold_s)
        time.sleep(self.hold_s)
        heal_at = self.history.now()
        nemesis.heal(c, inj, rng)
        time.sleep(self.settle_s)
        stop.set()
        load.join(120)
        end_at = self.history.now()
        r = RoundResult(k, fault, victim, inj.other, inj.detail, fault_at - start_at,
                        heal_at - start_at, end_at - start_at, None, None, None)
        self._measure(r, start_at, fault_at, heal_at, end_at, first_op)
        if load.is_alive():
            r.violations.append("the workload did not stop within 120 s")
        for e in getattr(load, "errors", []):
            r.violations.append(f"workload error: {e!r}")
        r.violations += self.data_sync(r)
        self.results.append(r)
        return r

    def _measure(self, r: RoundResult, start: float, fault: float, heal: float,
                 end: float, first_op: int = 0) -> None:
        # (only this round's part of the history: a long campaign's grows)
        ops = [op for op in self.history.ops[first_op:] if start <= op.time <= end]
        oks = sorted((op.time, op.node) for op in ops
                     if op.type == "ok" and op.f in ("transfer", "txn"))
        survivors = [t for t, n in oks if t > fault and n != r.victim]
        r.first_survivor_commit_s = round(survivors[0] - fault, 3) if survivors else None
        back = [t for t, n in oks if t > heal and n == r.victim]
        r.victim_back_s = round(back[0] - heal, 3) if back else None
        times = [start] + [t for t, _ in oks] + [end]
        r.longest_gap_s = round(max(b - a for a, b in zip(times, times[1:])), 3)
        phases = {"before": (start, fault), "during": (fault, heal), "after": (heal, end)}
        for i in self.cluster.ids:
            r.rates[i] = {}
            for name, (a, b) in phases.items():
                span = max(b - a, 1e-3)
                done = [op for op in ops if op.node == i and a <= op.time < b
                        and op.f in ("transfer", "txn") and op.type != "invoke"]
                r.rates[i][name] = [round(sum(op.type == "ok" for op in done) / span, 1),
                                    round(sum(op.type != "ok" for op in done) / span, 1)]

    # -- DataSync -------------------------------------------------------------------

    def data_sync(self, r: RoundResult | None = None, timeout_s: float = 60) -> list[str]:
        c = self.cluster
        problems: list[str] = []
        t0 = time.monotonic()
        left, ok = _poll(lambda: {i: c.prepared(i) for i in c.ids},
                         lambda v: not any(v.values()), timeout_s)
        if not ok:
            problems.append(f"prepared transactions left after {timeout_s:g} s: {left}")
        if r is not None:
            r.prepared_wait_s = round(time.monotonic() - t0, 2)
        hashes, ok = _poll(lambda: {i: self._hashes(i) for i in c.ids},
                           lambda v: len({json.dumps(h, sort_keys=True)
                                          for h in v.values()}) == 1, 30)
        if not ok:
            problems.append(f"nodes differ: {hashes}")
        t2 = time.monotonic()
        states, ok = _poll(lambda: {i: self._state(i) for i in c.ids},
                           lambda v: len(set(v.values())) == 1
                           and all(s[0] == "online" for s in v.values()), 30)
        if not ok:
            problems.append(f"nodes not all ONLINE in one generation: {states}")
        if r is not None:
            r.online_wait_s = round(time.monotonic() - t2, 2)
        finals = {i: self.workload.final_state(c.node(i).direct_dsn()) for i in c.ids}
        self.finals = finals
        result = self.workload.check(self.history, finals)
        if not result.valid:
            problems.append("checker: " + result.report())
        self.last_check = result
        return problems

    def _state(self, i: int) -> tuple:
        """(status, generation, members) as node i's mtm.status() shows them."""
        try:
            st, num, members = self.cluster.direct(
                i, "SELECT status, gen_num, gen_members FROM mtm.status()")[0]
            return (st, num, tuple(members))
        except psycopg.Error as e:
            return ("unreachable", str(e).strip()[:60], ())

    def _hashes(self, i: int) -> dict:
        out = {}
        for t in TABLES[self.workload_name]:
            out[t] = self.cluster.direct(
                i, f"SELECT md5(coalesce(string_agg(x::text, ',' ORDER BY x::text), '')) "
                   f"FROM {t} x")[0][0]
        return out

    # -- reporting ------------------------------------------------------------------

    def save(self) -> None:
        # appended, not rewritten: a 100-round history is hundreds of MB
        n = len(self.history.ops)
        with open(self.base / "history.jsonl", "a" if self._saved else "w") as f:
            for op in self.history.ops[self._saved:n]:
                f.write(op.to_json() + "\n")
        self._saved = n
        if getattr(self, "finals", None):
            write_final_states(self.base / "final.json", self.finals,
                               workload=self.workload_name, params=self.workload.params())
        (self.base / "summary.json").write_text(json.dumps(
            {"seed": self.seed, "rounds": [asdict(r) for r in self.results]}, indent=1))

    def replay_command(self, k: int) -> str:
        r = next((r for r in self.results if r.round == k), None)
        faults = r.fault if r is not None else ",".join(self.faults)
        return (f"python -m harness.run --seed {self.seed} --first-round {k} --rounds 1 "
                f"--workload {self.workload_name} --faults {faults} --hold-s {self.hold_s:g}")


def _poll(read, good, timeout_s: float, interval_s: float = 0.2) -> tuple:
    """Read until ``good(value)`` or ``timeout_s``: (last value, whether good)."""
    t0 = time.monotonic()
    while True:
        v = read()
        if good(v):
            return v, True
        if time.monotonic() - t0 >= timeout_s:
            return v, False
        time.sleep(interval_s)


def format_round(r: RoundResult) -> str:
    def s(v):
        return "-" if v is None else f"{v:.2f}"
    victim = f"{r.victim}" + (f"~{r.other}" if r.other else "")
    during = " ".join(f"{n}:{v['during'][0]:g}" for n, v in r.rates.items())
    return (f"{r.round:>4} {r.fault:<26} {victim:<5} {s(r.first_survivor_commit_s):>9} "
            f"{s(r.longest_gap_s):>8} {s(r.victim_back_s):>8} {r.prepared_wait_s:>6.2f}  "
            f"{during:<22} {'OK' if not r.violations else 'VIOLATION'}")


HEADER = (f"{'rnd':>4} {'fault':<26} {'node':<5} {'1st ok s':>9} {'gap s':>8} "
          f"{'back s':>8} {'sync s':>6}  {'ok/s during per node':<22} safety")


def summarize(results: list[RoundResult]) -> str:
    by: dict[str, list[RoundResult]] = {}
    for r in results:
        by.setdefault(r.fault, []).append(r)
    lines = [f"{'fault':<26} {'rounds':>6} {'violations':>10} {'1st ok p50 s':>12} "
             f"{'gap max s':>9} {'back p50 s':>10}"]
    for f, rs in sorted(by.items()):
        firsts = sorted(r.first_survivor_commit_s for r in rs
                        if r.first_survivor_commit_s is not None)
        backs = sorted(r.victim_back_s for r in rs if r.victim_back_s is not None)
        gaps = [r.longest_gap_s for r in rs if r.longest_gap_s is not None]
        med = (lambda xs: f"{xs[len(xs) // 2]:.2f}" if xs else "-")
        lines.append(f"{f:<26} {len(rs):>6} {sum(bool(r.violations) for r in rs):>10} "
                     f"{med(firsts):>12} {max(gaps) if gaps else 0:>9.2f} {med(backs):>10}")
    return "\n".join(lines)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--first-round", type=int, default=0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--faults", default=",".join(nemesis.PROCESS_FAULTS + nemesis.NETWORK_FAULTS),
                   help="comma-separated fault names (see harness/nemesis.py); 'all' for "
                        "every kind including every failpoint")
    p.add_argument("--cycle", action="store_true",
                   help="round k takes fault k mod the number of faults (an equal share each) "
                        "instead of a random one; the victim is still drawn from the seed")
    p.add_argument("--workload", choices=("bank", "append"), default="bank")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the cluster, history and summary go")
    p.add_argument("--warm-s", type=float, default=2.0)
    p.add_argument("--hold-s", type=float, default=4.0)
    p.add_argument("--settle-s", type=float, default=4.0)
    p.add_argument("--keep", action="store_true", help="keep the cluster's files")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning"),
                   help="the proxies' log level")
    a = p.parse_args(argv)
    faults = list(nemesis.FAULTS) if a.faults == "all" else a.faults.split(",")
    for f in faults:
        if f not in nemesis.FAULTS:
            p.error(f"unknown fault {f!r}; known: {', '.join(nemesis.FAULTS)}")
    base = Path(a.dir or tempfile.mkdtemp(prefix="mmproxy-campaign-"))
    # SIGTERM ends the campaign like Ctrl-C: everything it started is stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    camp = Campaign(base, workload=a.workload, nodes=a.nodes, seed=a.seed, faults=faults,
                    warm_s=a.warm_s, hold_s=a.hold_s, settle_s=a.settle_s,
                    log_level=a.log_level)
    print(f"campaign: seed {a.seed}, {a.rounds} rounds, workload {a.workload}, files in {base}",
          flush=True)
    bad = 0
    try:
        camp.start()
        print(HEADER, flush=True)
        for k in range(a.first_round, a.first_round + a.rounds):
            r = camp.run_round(k, fault=faults[k % len(faults)] if a.cycle else None)
            print(format_round(r), flush=True)
            if r.violations:
                bad += 1
                for v in r.violations:
                    print(f"     ! {v}", flush=True)
                print(f"     replay: {camp.replay_command(k)}", flush=True)
            camp.save()
        print()
        print(summarize(camp.results))
        print(f"\n{len(camp.results)} rounds, {bad} with safety violations; history: "
              f"{base / 'history.jsonl'}")
    finally:
        camp.save()
        if a.keep:
            camp.cluster.stop()
        else:
            camp.cluster.destroy()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
