"""Checkers: a history (and what each node held at the end) in, a ``Result`` out.

This module is pure: no database, no clock, no randomness, no threads. It owns
the definitions of the anomalies the fault harness can report and which of
them make a run invalid. Rules it keeps:

- Outcomes follow ``harness.history``: ``ok`` committed, ``fail`` did not,
  ``info`` (or an invocation the history never completed) may have. Only
  ``ok`` operations say what they read.
- Every anomaly is an entry in ``Result.anomalies[kind]``: a dict with the
  transactions involved, the key, the cycle with its edge kinds, and a
  ``why`` line (or lines) a person can follow without the code.
- ``Result.valid`` is False iff some anomaly kind that is not ``allowed`` was
  found. By default only G2-item is allowed: mmproxy documents cross-node
  write skew (as mmts does: serializable "only with respect to local
  transactions"), so it is reported, never hidden, but does not fail a run.
- Transactions are named ``T<index>`` after the index of their completion
  record (of the invocation, for one the history never completed).

The bank checker follows Jepsen's ``jepsen.tests.bank``; the list-append
checker follows Elle's ``elle.list-append`` (Kingsbury & Alvaro, "Elle:
Inferring Isolation Anomalies from Experimental Observations", VLDB 2020) and
the anomaly names of Adya's thesis ("Weak Consistency", 1999), as in
FAULT-TESTING.md section 2.1. Written here rather than calling Elle because
Elle is a JVM library and the harness must stay Python with no new
dependencies.
"""
from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from harness.history import History, Op, pair_ops

# G2-item (and its realtime form) is reported but does not fail a run by default.
DEFAULT_ALLOWED = frozenset({"G2-item", "G2-item-realtime"})

# How many edge visits the whole cycle search may spend before it gives up on
# classifying the rest (Elle has a cycle-search timeout for the same reason).
DEFAULT_CYCLE_SEARCH_BUDGET = 5_000_000

_INIT = None   # the initial, empty state of a key: "read the key before any append"


@dataclass
class Result:
    """What a checker found. ``allowed`` kinds are reported but do not make
    the result invalid."""

    checker: str
    anomalies: dict[str, list[dict]]
    counts: dict[str, int]
    allowed: frozenset[str] = frozenset()
    notes: list[str] = field(default_factory=list)

    @property
    def failing(self) -> list[str]:
        return sorted(k for k, v in self.anomalies.items() if v and k not in self.allowed)

    @property
    def valid(self) -> bool:
        return not self.failing

    def report(self, max_per_kind: int = 5) -> str:
        lines = [f"{self.checker}: {'VALID' if self.valid else 'INVALID'}"]
        if self.failing:
            lines.append("  failing: " + ", ".join(self.failing))
        lines.append("  counts: " + ", ".join(f"{k}={v}" for k, v in self.counts.items()))
        for note in self.notes:
            lines.append(f"  note: {note}")
        for kind in sorted(self.anomalies):
            entries = self.anomalies[kind]
            if not entries:
                continue
            tag = "allowed" if kind in self.allowed else "FAILS"
            lines.append(f"  {kind} ({len(entries)}, {tag}):")
            for entry in entries[:max_per_kind]:
                why = entry.get("why", repr(entry)).splitlines()
                lines.append(f"    - {why[0]}")
                lines.extend(f"      {w}" for w in why[1:])
            if len(entries) > max_per_kind:
                lines.append(f"    ... and {len(entries) - max_per_kind} more")
        return "\n".join(lines)


def _ops(history: History | Iterable[Op]) -> list[Op]:
    return history.ops if isinstance(history, History) else list(history)


def _ref(op: Op) -> dict:
    """A completion (or unfinished invocation) as anomaly detail."""
    return {"index": op.index, "time": op.time, "process": op.process, "node": op.node,
            "type": op.type, "f": op.f, "value": op.value}


def _short(values: Iterable, limit: int = 8) -> str:
    """A long list shown by its tail, where appends happen."""
    v = list(values)
    if len(v) <= limit:
        return repr(v)
    return "[..." + ", ".join(repr(x) for x in v[-limit:]) + "]"


# ================================================================================
# Bank (jepsen.tests.bank)
# ================================================================================

def check_bank(history: History | Iterable[Op], final_states: Mapping[int, dict] | None = None,
               *, n_accounts: int, total: int, negative_ok: bool = True,
               initial_balance: int | None = None,
               allowed: Iterable[str] = ()) -> Result:
    """Check a bank history (``harness.workloads.BankWorkload``).

    Reads: every ok read holds exactly accounts ``0..n_accounts-1``, no nulls,
    sums to ``total`` (and no negatives unless ``negative_ok``). Bad reads are
    summarised per kind and node: count, first, lowest and highest total.

    Final states (``{node: {"accounts": {id: balance}, "ledger": [[id, from,
    to, amount], ...]}}``, read after heal): each node's ledger holds every
    ok transfer exactly once, no failed transfer, each unknown (info)
    transfer at most once and the same unknown ones as every other node;
    balances equal the initial balance plus the ledger's effects (a replayed
    UPDATE shows here, the ledger has no primary key so a replayed INSERT
    shows as a duplicate row); all nodes hold the same state.
    """
    ops = _ops(history)
    initial = total // n_accounts if initial_balance is None else initial_balance
    accounts = set(range(n_accounts))
    anomalies: dict[str, list[dict]] = defaultdict(list)
    counts: Counter = Counter()

    transfers: dict[str, tuple[str, Op, Op]] = {}    # id -> (outcome, invocation, last record)
    bad: dict[tuple[str, int], list[tuple[Op, int]]] = defaultdict(list)
    for inv, comp in pair_ops(ops):
        outcome = comp.type if comp is not None else "info"
        counts[f"{inv.f}-{outcome}"] += 1
        if inv.f == "transfer":
            tid = str(inv.value["id"])
            if tid in transfers:
                raise ValueError(f"op {inv.index}: transfer id {tid} invoked twice")
            transfers[tid] = (outcome, inv, comp or inv)
        elif inv.f == "read" and outcome == "ok":
            for kind, read_total in _bad_read_kinds(comp.value, accounts, total, negative_ok):
                bad[(kind, comp.node)].append((comp, read_total))
    for (kind, node), reads in sorted(bad.items()):
        anomalies[kind].append(_bad_read_summary(kind, node, reads))

    if final_states is not None:
        states = {int(n): _bank_state(s) for n, s in final_states.items()}
        info_sets: dict[int, frozenset[str]] = {}
        for node, (balances, ledger) in sorted(states.items()):
            info_sets[node] = _check_ledger(node, balances, ledger, transfers, accounts,
                                            initial, total, negative_ok, anomalies)
        if len(set(info_sets.values())) > 1:
            union = frozenset().union(*info_sets.values())
            anomalies["info-transfers-differ"].append({
                "nodes": {n: sorted(s) for n, s in info_sets.items()},
                "why": "nodes applied different unknown-outcome transfers: " + "; ".join(
                    f"node {n} lacks {sorted(union - s)[:5]}" for n, s in info_sets.items()
                    if union - s)})
        _check_bank_divergence(states, anomalies)
        counts["nodes"] = len(states)
    return Result("bank", {k: v for k, v in anomalies.items() if v}, dict(counts),
                  frozenset(allowed))


def _bad_read_kinds(value: Any, accounts: set[int], total: int,
                    negative_ok: bool) -> list[tuple[str, int | None]]:
    balances = {int(k): v for k, v in (value or {}).items()}
    kinds: list[tuple[str, int | None]] = []
    present = [v for v in balances.values() if v is not None]
    read_total = sum(present)
    if accounts - balances.keys():
        kinds.append(("missing-account", read_total))
    if balances.keys() - accounts:
        kinds.append(("unexpected-account", read_total))
    if len(present) < len(balances):
        kinds.append(("null-balance", read_total))
    elif read_total != total:
        kinds.append(("wrong-total", read_total))
    if not negative_ok and any(v < 0 for v in present):
        kinds.append(("negative-balance", read_total))
    return kinds


def _bad_read_summary(kind: str, node: int, reads: list[tuple[Op, int]]) -> dict:
    first = reads[0]
    lowest = min(reads, key=lambda r: r[1])
    highest = max(reads, key=lambda r: r[1])

    def show(r: tuple[Op, int]) -> str:
        return f"T{r[0].index} (p{r[0].process}, t={r[0].time:.3f}s) total={r[1]}"
    return {"node": node, "count": len(reads), "first": _ref(first[0]),
            "lowest": _ref(lowest[0]), "highest": _ref(highest[0]),
            "totals": {"first": first[1], "lowest": lowest[1], "highest": highest[1]},
            "why": f"node {node}: {len(reads)} ok reads with {kind}; first {show(first)}, "
                   f"lowest {show(lowest)}, highest {show(highest)}"}


def _bank_state(state: dict) -> tuple[dict[int, Any], list[tuple[str, int, int, int]]]:
    balances = {int(k): v for k, v in state["accounts"].items()}
    ledger = [(str(t), int(a), int(b), int(m)) for t, a, b, m in state["ledger"]]
    return balances, ledger


def _check_ledger(node: int, balances: dict[int, Any], ledger: list[tuple[str, int, int, int]],
                  transfers: dict[str, tuple[str, Op, Op]], accounts: set[int], initial: int,
                  total: int, negative_ok: bool,
                  anomalies: dict[str, list[dict]]) -> frozenset[str]:
    """One node's ledger and balances; returns the unknown transfers it applied."""
    seen = Counter(row[0] for row in ledger)
    for tid, n in sorted(seen.items()):
        if n > 1:
            anomalies["ledger-duplicate"].append({
                "node": node, "transfer": tid, "rows": n,
                "why": f"node {node}: transfer {tid} is in the ledger {n} times "
                       f"(outcome {transfers.get(tid, ('unknown',))[0]})"})
    for tid, (outcome, inv, last) in transfers.items():
        if outcome == "ok" and tid not in seen:
            anomalies["ledger-missing-ok"].append({
                "node": node, "transfer": tid, "op": _ref(last),
                "why": f"node {node}: acknowledged transfer {tid} (T{last.index}, "
                       f"p{last.process} on node {last.node}) is missing from the ledger"})
        elif outcome == "fail" and tid in seen:
            anomalies["ledger-has-failed"].append({
                "node": node, "transfer": tid, "op": _ref(last),
                "why": f"node {node}: failed transfer {tid} (T{last.index}: {last.error}) "
                       f"is in the ledger"})
    for tid, a, b, m in ledger:
        known = transfers.get(tid)
        if known is None:
            anomalies["ledger-unknown"].append({
                "node": node, "row": [tid, a, b, m],
                "why": f"node {node}: ledger row {[tid, a, b, m]} matches no invoked transfer"})
            continue
        v = known[1].value
        if (int(v["from"]), int(v["to"]), int(v["amount"])) != (a, b, m):
            anomalies["ledger-mismatch"].append({
                "node": node, "row": [tid, a, b, m], "invoked": v,
                "why": f"node {node}: ledger row {[tid, a, b, m]} differs from the "
                       f"invoked transfer {v}"})

    expected = {acct: initial for acct in accounts}
    for _tid, a, b, m in ledger:
        expected[a] = expected.get(a, initial) - m
        expected[b] = expected.get(b, initial) + m
    wrong = {acct: (expected.get(acct), balances.get(acct))
             for acct in sorted(expected.keys() | balances.keys())
             if expected.get(acct) != balances.get(acct)}
    if wrong:
        anomalies["balance-mismatch"].append({
            "node": node, "accounts": {a: {"expected": e, "actual": x}
                                       for a, (e, x) in wrong.items()},
            "why": f"node {node}: balances differ from initial + ledger effects for "
                   f"{len(wrong)} accounts, e.g. " + ", ".join(
                       f"account {a}: expected {e}, has {x}"
                       for a, (e, x) in list(wrong.items())[:3])})
    for kind, read_total in _bad_read_kinds(balances, accounts, total, negative_ok):
        anomalies["final-" + kind].append({
            "node": node, "total": read_total,
            "why": f"node {node}: final accounts show {kind} (total {read_total})"})
    return frozenset(t for t in seen if transfers.get(t, ("",))[0] == "info")


def _check_bank_divergence(states: dict[int, tuple[dict, list]],
                           anomalies: dict[str, list[dict]]) -> None:
    if len(states) < 2:
        return
    ref_node = min(states)
    ref_bal, ref_ledger = states[ref_node]
    ref_rows = Counter(ref_ledger)
    for node, (bal, ledger) in sorted(states.items()):
        if node == ref_node:
            continue
        rows = Counter(ledger)
        accts = sorted(a for a in ref_bal.keys() | bal.keys() if ref_bal.get(a) != bal.get(a))
        only_ref, only_here = ref_rows - rows, rows - ref_rows
        if accts or only_ref or only_here:
            anomalies["divergent-final-state"].append({
                "nodes": [ref_node, node], "accounts": accts,
                "ledger_only_on": {ref_node: sorted(only_ref.elements())[:20],
                                   node: sorted(only_here.elements())[:20]},
                "why": f"node {node} differs from node {ref_node}: {len(accts)} balances, "
                       f"{sum(only_ref.values())} ledger rows only on node {ref_node}, "
                       f"{sum(only_here.values())} only on node {node}"})


# ================================================================================
# List-append (elle.list-append)
# ================================================================================

@dataclass
class _Txn:
    id: int                  # index of the completion record (invocation if none)
    type: str                # ok | fail | info (info also for never completed)
    process: int
    node: int
    invoke_index: int
    complete_index: int | None   # None unless ok or fail: info never "completed"
    mops: list               # [f, k, v] micro-ops; reads filled in only when ok
    op: Op

    def label(self) -> str:
        return f"T{self.id}"

    def ref(self) -> dict:
        return _ref(self.op)


@dataclass(frozen=True)
class _Read:
    key: Any
    value: tuple
    txn: _Txn | None         # None: a final-state read
    node: int                # the node of the reader (or of the final state)
    mop_index: int | None

    def who(self) -> str:
        if self.txn is None:
            return f"final state of node {self.node}"
        return f"{self.txn.label()} (p{self.txn.process} on node {self.node})"


# Which edge kind explains a step best: data dependencies before realtime,
# and the weakest data dependency first, so a cycle gets the mildest name the
# evidence allows (a pair linked by ww and rw is a ww step).
_KIND_ORDER = ("ww", "wr", "rw", "rt")

# Cycle searches, each a first edge of one kind then a path back of others,
# in order of severity (Adya; Elle's base-cycle-anomaly-specs). A G-single is
# exactly one rw edge closed by ww/wr edges; G2-item allows any number.
_DATA_SHAPES = (
    ("G0", frozenset({"ww"}), frozenset({"ww"})),
    ("G1c", frozenset({"wr"}), frozenset({"ww", "wr"})),
    ("G-single", frozenset({"rw"}), frozenset({"ww", "wr"})),
    ("G2-item", frozenset({"rw"}), frozenset({"ww", "wr", "rw"})),
)
# With realtime edges (T1 completed before T2 was invoked), as Elle checks
# strict serializability: cycles that need an rt edge are reported apart.
# G-single-realtime is what Jepsen's analyses call a stale read.
_REALTIME_SHAPES = (
    ("G0-realtime", frozenset({"rt"}), frozenset({"ww", "rt"})),
    ("G1c-realtime", frozenset({"rt"}), frozenset({"ww", "wr", "rt"})),
    ("G-single-realtime", frozenset({"rw"}), frozenset({"ww", "wr", "rt"})),
    ("G2-item-realtime", frozenset({"rt"}), frozenset({"ww", "wr", "rw", "rt"})),
)


def check_list_append(history: History | Iterable[Op],
                      final_states: Mapping[int, dict] | None = None, *,
                      allowed: Iterable[str] = DEFAULT_ALLOWED, realtime: bool = False,
                      cycle_search_budget: int = DEFAULT_CYCLE_SEARCH_BUDGET) -> Result:
    """Check a list-append history (``harness.workloads.AppendWorkload``).

    ``final_states`` is ``{node: {"lists": {key: [elements]}}}`` read after
    heal; with it the checker also finds lost acknowledged writes and nodes
    that disagree, and uses the final lists as reads for the version order.
    ``realtime`` adds realtime edges and reports the cycles that need them as
    ``<kind>-realtime`` (off by default: the cluster promises snapshot-like
    behaviour per node, not strict serializability).

    Anomaly kinds: incompatible-order, duplicate-elements, unknown-element,
    internal, future-read, G1a, G1b, lost-update, G0, G1c, G-single,
    G2-item, the -realtime cycle kinds, lost-write, partially-visible-txn,
    divergent-final-state, cycle-search-truncated.
    """
    ops = _ops(history)
    an: dict[str, list[dict]] = defaultdict(list)
    counts: Counter = Counter()
    notes: list[str] = []

    txns = _append_txns(ops, counts)
    writer, intermediate = _write_index(txns)
    finals = _final_lists(final_states)
    reads = _reads(txns, finals)
    counts["reads"] = len(reads)
    counts["appends"] = len(writer)

    _read_anomalies(reads, writer, intermediate, an)
    for t in txns:
        if t.type == "ok":
            _internal(t, an)
    _lost_updates(txns, an)
    order = _version_orders(reads, an)
    counts["keys"] = len(order)

    observed = {(r.key, e) for r in reads for e in r.value}
    graph = {t.id: t for t in txns
             if t.type == "ok" or (t.type == "info" and any(
                 (k, v) in observed for f, k, v in t.mops if f == "append"))}
    adj = _dependency_edges(graph, reads, writer, order)
    for kinds in adj.values():
        for ks in kinds.values():
            counts.update(f"edges-{k}" for k in ks)
    counts["graph-txns"] = len(graph)
    budget = _Budget(cycle_search_budget)
    _cycles(graph, adj, _DATA_SHAPES, budget, an, counts, require_rt=False)
    if realtime:
        _realtime_edges(ops, graph, adj, counts)
        _cycles(graph, adj, _REALTIME_SHAPES, budget, an, counts, require_rt=True)
    if budget.exhausted:
        notes.append(f"cycle search stopped after {cycle_search_budget} edge visits; "
                     "some strongly connected components are only partly classified")

    if finals:
        _final_state_anomalies(txns, writer, finals, an)
    counts["nodes"] = len(finals)
    return Result("list-append", {k: v for k, v in an.items() if v}, dict(counts),
                  frozenset(allowed), notes)


def _append_txns(ops: list[Op], counts: Counter) -> list[_Txn]:
    txns = []
    for inv, comp in pair_ops(ops):
        if inv.f != "txn":
            continue
        outcome = comp.type if comp is not None else "info"
        counts[f"txn-{outcome}"] += 1
        # Only an ok completion says what was read; the others repeat the
        # invocation (reads unknown), so use the invocation's micro-ops.
        src = comp if outcome == "ok" else inv
        mops = [list(m) for m in src.value]
        for m in mops:
            if len(m) != 3 or m[0] not in ("append", "r"):
                raise ValueError(f"op {src.index}: micro-op {m!r} is not [append|r, k, v]")
        last = comp or inv
        txns.append(_Txn(id=last.index, type=outcome, process=inv.process, node=inv.node,
                         invoke_index=inv.index,
                         complete_index=comp.index if outcome in ("ok", "fail") else None,
                         mops=mops, op=last))
    return txns


def _write_index(txns: list[_Txn]) -> tuple[dict[tuple, _Txn], set[tuple]]:
    """(key, element) -> appending txn; and the (key, element) pairs that a
    txn appended before appending to the same key again (intermediate)."""
    writer: dict[tuple, _Txn] = {}
    intermediate: set[tuple] = set()
    for t in txns:
        last: dict[Any, Any] = {}
        for f, k, v in t.mops:
            if f != "append":
                continue
            if (k, v) in writer:
                # Elle refuses such histories too: the order of appends could
                # no longer be read off the lists.
                raise ValueError(f"element {v!r} appended to key {k!r} by both "
                                 f"T{writer[(k, v)].id} and T{t.id}; elements must be unique")
            writer[(k, v)] = t
            if k in last:
                intermediate.add((k, last[k]))
            last[k] = v
    return writer, intermediate


def _final_lists(final_states: Mapping[int, dict] | None) -> dict[int, dict]:
    if not final_states:
        return {}
    out = {}
    for node, state in final_states.items():
        lists = state["lists"] if "lists" in state else state
        out[int(node)] = {_key(k): list(v or ()) for k, v in lists.items()}
    return out


def _key(k: Any) -> Any:
    """JSON made int keys of a final-state object strings."""
    if isinstance(k, str) and k.lstrip("-").isdigit():
        return int(k)
    return k


def _reads(txns: list[_Txn], finals: dict[int, dict]) -> list[_Read]:
    reads = []
    for t in txns:
        if t.type != "ok":
            continue
        for i, (f, k, v) in enumerate(t.mops):
            if f == "r" and v is not None:
                reads.append(_Read(k, tuple(v), t, t.node, i))
    for node, lists in sorted(finals.items()):
        for k, v in lists.items():
            reads.append(_Read(k, tuple(v), None, node, None))
    return reads


def _read_anomalies(reads: list[_Read], writer: dict, intermediate: set,
                    an: dict[str, list[dict]]) -> None:
    """Anomalies of single reads: duplicates, elements nobody appended, G1a
    (aborted read: an element of a failed txn) and G1b (intermediate read:
    the read ends at an append its writer followed with another)."""
    for r in reads:
        reader = r.txn.ref() if r.txn else {"final_state_of_node": r.node}
        dups = {e: n for e, n in Counter(r.value).items() if n > 1}
        if dups:
            an["duplicate-elements"].append({
                "key": r.key, "reader": reader, "duplicates": dups,
                "why": f"{r.who()} read key {r.key} with elements repeated: {dups}"})
        for e in dict.fromkeys(r.value):
            w = writer.get((r.key, e))
            if w is None:
                an["unknown-element"].append({
                    "key": r.key, "element": e, "reader": reader,
                    "why": f"{r.who()} read element {e!r} of key {r.key}, which no "
                           f"transaction appended"})
            elif w.type == "fail":
                an["G1a"].append({
                    "key": r.key, "element": e, "reader": reader, "writer": w.ref(),
                    "why": f"{r.who()} read element {e!r} of key {r.key}, appended by "
                           f"failed {w.label()} ({w.op.error})"})
        if r.txn is not None and r.value and (r.key, r.value[-1]) in intermediate:
            w = writer[(r.key, r.value[-1])]
            if w is not r.txn:
                an["G1b"].append({
                    "key": r.key, "element": r.value[-1], "reader": reader,
                    "writer": w.ref(),
                    "why": f"{r.who()} read key {r.key} = {_short(r.value)}, ending at "
                           f"{w.label()}'s intermediate append of {r.value[-1]!r}"})


_UNKNOWN_PREFIX = object()


def _internal(t: _Txn, an: dict[str, list[dict]]) -> None:
    """A read that disagrees with the txn's own earlier reads and appends of
    the key (Cerone et al.'s INT axiom; Elle's op-int-case), and a read that
    shows an element the txn appends only later (Elle's future-read)."""
    state: dict[Any, list] = {}
    seen: dict[Any, set] = defaultdict(set)
    for i, (f, k, v) in enumerate(t.mops):
        if f == "append":
            if v in seen[k]:
                an["future-read"].append({
                    "txn": t.ref(), "key": k, "element": v,
                    "why": f"{t.label()} read element {v!r} of key {k} before appending it"})
                return
            state[k] = (state[k] if k in state else [_UNKNOWN_PREFIX]) + [v]
        elif v is not None:
            expected = state.get(k)
            if expected is not None:
                if expected and expected[0] is _UNKNOWN_PREFIX:
                    suffix = expected[1:]
                    bad = len(v) < len(suffix) or list(v[len(v) - len(suffix):]) != suffix
                    shown = ["..."] + suffix
                else:
                    bad = list(v) != expected
                    shown = expected
                if bad:
                    an["internal"].append({
                        "txn": t.ref(), "key": k, "mop_index": i, "read": list(v),
                        "expected": shown,
                        "why": f"{t.label()} read key {k} = {_short(v)} but its own earlier "
                               f"operations imply {_short(shown)}"})
                    return
            state[k] = list(v)
            seen[k].update(v)


def _lost_updates(txns: list[_Txn], an: dict[str, list[dict]]) -> None:
    """P4, lost update (Adya's H_lu; Elle's lost-update-cases): two committed
    txns read the same version of a key and both append to it. Found directly,
    without a version order: in the graph it is a one-key ww+rw cycle, which
    the cycle search would name G-single if it saw both appends."""
    by_version: dict[tuple, list[_Txn]] = defaultdict(list)
    for t in txns:
        if t.type != "ok":
            continue
        first_read: dict[Any, tuple] = {}
        written: set = set()
        for f, k, v in t.mops:
            if f == "r":
                if k not in first_read and k not in written and v is not None:
                    first_read[k] = tuple(v)
            elif k not in written:
                written.add(k)
                if k in first_read:
                    by_version[(k, first_read[k])].append(t)
    for (k, v), ts in by_version.items():
        if len(ts) > 1:
            an["lost-update"].append({
                "key": k, "read": list(v), "txns": [t.ref() for t in ts],
                "why": f"{', '.join(t.label() for t in ts)} all read key {k} = {_short(v)} "
                       f"and all appended to it and committed"})


def _version_orders(reads: list[_Read], an: dict[str, list[dict]]) -> dict[Any, dict[Any, int]]:
    """Per key, the order of appends: all reads of a key sorted by length
    must each be a prefix of the next (appends only add at the end);
    otherwise incompatible-order. The longest read is the version order."""
    by_key: dict[Any, dict[tuple, _Read]] = defaultdict(dict)
    for r in reads:
        by_key[r.key].setdefault(r.value, r)
    order: dict[Any, dict[Any, int]] = {}
    for k, values in by_key.items():
        ranked = sorted(values, key=len)
        for a, b in zip(ranked, ranked[1:]):
            if b[:len(a)] != a:
                at = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                ra, rb = values[a], values[b]
                an["incompatible-order"].append({
                    "key": k, "values": [list(a), list(b)], "diverge_at": at,
                    "readers": [ra.who(), rb.who()],
                    "why": f"key {k}: {ra.who()} read {_short(a[:at + 1])} but {rb.who()} "
                           f"read {_short(b[:at + 1])} (position {at}); neither is a prefix "
                           f"of the other"})
        longest = ranked[-1]
        order[k] = {e: i for i, e in enumerate(dict.fromkeys(longest))}
    return order


# -- the dependency graph ---------------------------------------------------------

# adj[a][b] = {kind: explanation}: an edge a -> b means a must precede b.
_Adj = dict[int, dict[int, dict[str, tuple]]]


def _link(adj: _Adj, a: int, b: int, kind: str, why: tuple) -> None:
    if a != b:
        adj[a].setdefault(b, {}).setdefault(kind, why)


def _dependency_edges(graph: dict[int, _Txn], reads: list[_Read], writer: dict,
                      order: dict[Any, dict[Any, int]]) -> _Adj:
    """Adya's direct dependencies, as Elle infers them for list-append:
    wr: the writer of a read's last element -> the reader;
    ww: the writer of the element before e in version order -> e's writer;
    rw: each reader of the state before e -> e's writer.
    An append never read comes after every read element (a read is a prefix
    of the final list), so its predecessor is the key's last known element:
    that edge may skip versions, which keeps cycles and their rw counts."""
    adj: _Adj = defaultdict(dict)
    last_of = {k: (next(reversed(o)) if o else _INIT) for k, o in order.items()}
    seq = {k: list(o) for k, o in order.items()}
    readers: dict[tuple, list[int]] = defaultdict(list)
    for r in reads:
        if r.txn is None or r.txn.id not in graph:
            continue
        readers[(r.key, r.value[-1] if r.value else _INIT)].append(r.txn.id)
        if r.value:
            w = writer.get((r.key, r.value[-1]))
            if w is not None and w.id in graph:
                _link(adj, w.id, r.txn.id, "wr", (r.key, r.value[-1], None))
    for t in graph.values():
        for f, k, e in t.mops:
            if f != "append":
                continue
            pos = order.get(k, {}).get(e)
            if pos is None:
                prev = last_of.get(k, _INIT)
            else:
                prev = seq[k][pos - 1] if pos > 0 else _INIT
            if prev is not _INIT:
                w = writer.get((k, prev))
                if w is not None and w.id in graph:
                    _link(adj, w.id, t.id, "ww", (k, prev, e))
            for rid in readers.get((k, prev), ()):
                _link(adj, rid, t.id, "rw", (k, prev, e))
    return adj


def _realtime_edges(ops: list[Op], graph: dict[int, _Txn], adj: _Adj, counts: Counter) -> None:
    """T1 -> T2 when T1 completed ok before T2 was invoked. Only the
    transitive reduction is linked, as in Elle's realtime graph: a frontier
    of completed txns none of which precedes another; a txn invoked links
    from the frontier, and when it completes it replaces its predecessors."""
    by_invoke = {t.invoke_index: t for t in graph.values()}
    by_complete = {t.complete_index: t for t in graph.values()
                   if t.type == "ok" and t.complete_index is not None}
    frontier: set[int] = set()
    preds: dict[int, frozenset[int]] = {}
    for op in ops:
        t = by_invoke.get(op.index)
        if t is not None:
            preds[t.id] = frozenset(frontier)
            for p in frontier:
                _link(adj, p, t.id, "rt", (None, graph[p].complete_index, t.invoke_index))
                counts["edges-rt"] += 1
            continue
        t = by_complete.get(op.index)
        if t is not None:
            frontier -= preds.get(t.id, frozenset())
            frontier.add(t.id)


class _Budget:
    def __init__(self, visits: int):
        self.left = visits
        self.exhausted = False

    def spend(self, n: int = 1) -> bool:
        self.left -= n
        if self.left < 0:
            self.exhausted = True
        return not self.exhausted


def _best_kind(kinds: Mapping[str, tuple], allowed: frozenset[str]) -> str | None:
    for k in _KIND_ORDER:
        if k in allowed and k in kinds:
            return k
    return None


def _tarjan(nodes: Iterable[int], adj: _Adj, allowed: frozenset[str],
            within: set[int] | None = None) -> list[list[int]]:
    """Strongly connected components of the edges of ``allowed`` kinds
    between ``within`` (default all) nodes, in reverse topological order.
    Iterative (Tarjan 1972 with an explicit stack): histories of tens of
    thousands of txns would overflow Python's recursion limit."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[int] = []
    sccs: list[list[int]] = []

    def successors(v: int):
        for w, kinds in adj.get(v, {}).items():
            if (within is None or w in within) and not allowed.isdisjoint(kinds):
                yield w

    counter = 0
    for root in nodes:
        if root in index:
            continue
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        work = [(root, successors(root))]
        while work:
            v, it = work[-1]
            descended = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, successors(w)))
                    descended = True
                    break
                if w in on_stack and index[w] < low[v]:
                    low[v] = index[w]
            if descended:
                continue
            work.pop()
            if work:
                u = work[-1][0]
                if low[v] < low[u]:
                    low[u] = low[v]
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                sccs.append(comp)
    return sccs


def _find_cycle(scc: set[int], adj: _Adj, first: frozenset[str], path: frozenset[str],
                budget: _Budget) -> list[tuple[int, int, str]] | None:
    """A short cycle in ``scc`` made of one edge a -> b of a ``first`` kind
    and a shortest path b -> a over ``path`` kinds (BFS), or None.

    To stay near linear on big components, the path kinds' own components
    are ranked in topological order: b can reach a only if rank(b) <=
    rank(a), and the BFS from b never leaves the ranks between them. Under
    snapshot isolation an rw edge joins concurrent txns, so that window is
    about the concurrency of the run, not the size of the history."""
    comps = _tarjan(sorted(scc), adj, path, within=scc)
    rank = {v: len(comps) - 1 - i for i, comp in enumerate(comps) for v in comp}
    targets: dict[int, list[int]] = defaultdict(list)   # b -> candidate a's
    for a in scc:
        for b, kinds in adj.get(a, {}).items():
            if b in scc and not first.isdisjoint(kinds) and rank[b] <= rank[a]:
                targets[b].append(a)
    for b in sorted(targets, key=lambda b: (min(rank[a] for a in targets[b]) - rank[b], b)):
        sources = set(targets[b])
        hi = max(rank[a] for a in sources)
        lo = rank[b]
        parent: dict[int, int | None] = {b: None}
        queue = deque([b])
        found = None
        while queue and found is None:
            v = queue.popleft()
            if v in sources:
                found = v
                break
            for w, kinds in adj.get(v, {}).items():
                if not budget.spend():
                    return None
                if (w in parent or w not in scc or path.isdisjoint(kinds)
                        or not lo <= rank[w] <= hi):
                    continue
                parent[w] = v
                queue.append(w)
        if found is None:
            continue
        nodes = [found]
        while parent[nodes[-1]] is not None:
            nodes.append(parent[nodes[-1]])
        nodes.reverse()                      # b ... a
        a = found
        steps = [(a, b, _best_kind(adj[a][b], first))]
        steps += [(x, y, _best_kind(adj[x][y], path)) for x, y in zip(nodes, nodes[1:])]
        return steps
    return None


def _classify(steps: list[tuple[int, int, str]]) -> str:
    """Adya's names by edge kinds (Elle's cycle-explainer): one rw edge is
    G-single, more is G2-item, else any wr is G1c, else G0; -realtime when
    the cycle needs a realtime edge."""
    c = Counter(kind for _, _, kind in steps)
    if c["rw"] == 1:
        base = "G-single"
    elif c["rw"] > 1:
        base = "G2-item"
    elif c["wr"]:
        base = "G1c"
    else:
        base = "G0"
    return base + ("-realtime" if c["rt"] else "")


def _cycles(graph: dict[int, _Txn], adj: _Adj, shapes, budget: _Budget,
            an: dict[str, list[dict]], counts: Counter, *, require_rt: bool) -> None:
    """Per strongly connected component of all edges, one cycle of each
    anomaly kind found (the shapes are tried in order of severity)."""
    all_kinds = frozenset(k for _, first, path in shapes for k in first | path)
    sccs = [c for c in _tarjan(sorted(graph), adj, all_kinds) if len(c) > 1]
    counts["sccs-realtime" if require_rt else "sccs"] = len(sccs)
    if sccs:
        key = "largest-scc-realtime" if require_rt else "largest-scc"
        counts[key] = max(len(c) for c in sccs)
    sccs.sort(key=len)
    for i, comp in enumerate(sccs):
        members = set(comp)
        found: set[str] = set()
        for _name, first, path in shapes:
            steps = _find_cycle(members, adj, first, path, budget)
            if budget.exhausted:
                rest = sccs[i:]
                an["cycle-search-truncated"].append({
                    "scc_sizes": [len(c) for c in rest], "txns": sorted(comp)[:50],
                    "why": f"{len(rest)} strongly connected components (sizes "
                           f"{[len(c) for c in rest][:10]}) were not fully classified: the "
                           f"cycle search budget ran out; each holds some cycle"})
                return
            if steps is None:
                continue
            kind = _classify(steps)
            if require_rt and not kind.endswith("-realtime"):
                continue           # a data cycle: the data pass reported it
            if kind in found:
                continue
            found.add(kind)
            an[kind].append(_explain_cycle(kind, steps, graph, adj))


def _explain_cycle(kind: str, steps: list[tuple[int, int, str]], graph: dict[int, _Txn],
                   adj: _Adj) -> dict:
    lines = [f"{kind} cycle of {len(steps)} txns:"]
    detail = []
    for a, b, k in steps:
        ta, tb = graph[a], graph[b]
        key, x, y = adj[a][b][k]
        if k == "ww":
            text = f"{tb.label()} appended {y!r} after {ta.label()}'s {x!r} to key {key}"
        elif k == "wr":
            text = f"{tb.label()} read {ta.label()}'s append of {x!r} to key {key}"
        elif k == "rw":
            seen = "the initial (empty) state" if x is _INIT else f"up to {x!r}"
            text = (f"{ta.label()} read key {key} {seen}, and {tb.label()} appended "
                    f"{y!r} after it")
        else:
            text = f"{ta.label()} completed (op {x}) before {tb.label()} was invoked (op {y})"
        lines.append(f"{ta.label()} (p{ta.process} node {ta.node}) -{k}-> {tb.label()}: {text}")
        detail.append({"from": ta.ref(), "to": tb.ref(), "edge": k, "key": key,
                       "explanation": text})
    return {"cycle": detail, "txns": [graph[a].ref() for a, _, _ in steps],
            "why": "\n".join(lines)}


# -- final states -------------------------------------------------------------------

def _final_state_anomalies(txns: list[_Txn], writer: dict, finals: dict[int, dict],
                           an: dict[str, list[dict]]) -> None:
    """Lost acknowledged writes (an ok append missing from a node's list
    after heal), unknown-outcome txns half applied, and nodes that differ."""
    present = {node: {(k, e) for k, v in lists.items() for e in v}
               for node, lists in finals.items()}
    for t in txns:
        appends = [(k, e) for f, k, e in t.mops if f == "append"]
        if not appends or t.type == "fail":
            continue
        for node, have in sorted(present.items()):
            missing = [ke for ke in appends if ke not in have]
            if not missing:
                continue
            if t.type == "ok":
                for k, e in missing:
                    an["lost-write"].append({
                        "key": k, "element": e, "node": node, "writer": t.ref(),
                        "why": f"{t.label()} (p{t.process} on node {t.node}) appended {e!r} "
                               f"to key {k} and committed, but node {node}'s final list "
                               f"lacks it"})
            elif len(missing) < len(appends):
                an["partially-visible-txn"].append({
                    "node": node, "writer": t.ref(), "missing": [list(m) for m in missing],
                    "why": f"node {node} holds some but not all appends of unknown-outcome "
                           f"{t.label()}: missing {missing}"})
    nodes = sorted(finals)
    for k in sorted({k for lists in finals.values() for k in lists}, key=repr):
        values = {n: finals[n].get(k, []) for n in nodes}
        if len({tuple(v) for v in values.values()}) > 1:
            an["divergent-final-state"].append({
                "key": k, "values": values,
                "why": f"key {k} differs between nodes: " + "; ".join(
                    f"node {n} has {len(v)} elements ending {_short(v, 4)}"
                    for n, v in values.items())})
