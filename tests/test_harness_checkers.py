"""The fault harness's checkers on hand-made histories (one anomaly each,
found and named; clean ones pass), the history format, the CLI, and a
20,000-operation history for speed. Pure: no database."""
from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import check as cli
from harness.checkers import check_bank, check_list_append
from harness.history import History, Op, pair_ops, read_final_states, write_final_states

ROOT = Path(__file__).resolve().parent.parent


def new_history() -> History:
    ticks = itertools.count()
    return History(clock=lambda: next(ticks) / 1000)


# -- history format ---------------------------------------------------------------------

def test_history_records_pairs_and_round_trips(tmp_path):
    h = new_history()
    a = h.invoke(0, 1, "read", None)
    b = h.invoke(1, 2, "txn", [["append", 3, 7], ["r", 3, None]])
    h.complete(a, "ok", {0: 1000, 1: 1000})
    h.complete(b, "info", error="08006: connection lost")
    c = h.invoke(2, 2, "transfer", {"id": "t0", "from": 0, "to": 1, "amount": 5})
    assert [op.index for op in h] == [0, 1, 2, 3, 4]
    assert all(x.time < y.time for x, y in zip(h.ops, h.ops[1:]))
    pairs = h.pairs()
    assert [(i.index, c_ and c_.type) for i, c_ in pairs] == [(0, "ok"), (1, "info"), (4, None)]
    # an info completion repeats the invocation's value
    assert pairs[1][1].value == [["append", 3, 7], ["r", 3, None]]

    path = tmp_path / "h.jsonl"
    h.write_jsonl(path)
    first = json.loads(path.read_text().splitlines()[0])
    assert list(first) == ["index", "time", "process", "node", "type", "f", "value", "error"]
    back = History.read_jsonl(path)
    assert back.ops == h.ops          # the bank read's int keys survive JSON
    assert back.ops[2].value == {0: 1000, 1: 1000}
    d = back.invoke(9, 1, "read", None)   # a loaded history keeps counting
    assert d.index == 5 and d.time >= h.ops[-1].time
    assert c.type == "invoke"


def test_history_rejects_malformed_sequences():
    h = new_history()
    h.invoke(0, 1, "read", None)
    ops = h.ops + [Op(1, 0.1, 0, 1, "invoke", "read", None)]
    with pytest.raises(ValueError, match="outstanding"):
        pair_ops(ops)
    with pytest.raises(ValueError, match="without an invocation"):
        pair_ops([Op(0, 0.0, 5, 1, "ok", "read", {})])
    with pytest.raises(ValueError):
        h.complete(h.ops[0], "maybe")
    with pytest.raises(ValueError):
        h.invoke(1, 1, "write", None)


# -- bank -----------------------------------------------------------------------------------

N, BALANCE = 4, 100
TOTAL = N * BALANCE


class Bank:
    """Builds a bank history and final states by hand."""

    def __init__(self):
        self.h = new_history()
        self.ids = itertools.count()
        self.process = itertools.count()

    def transfer(self, a, b, amount, outcome="ok", node=1, error=None):
        v = {"id": f"t{next(self.ids)}", "from": a, "to": b, "amount": amount}
        inv = self.h.invoke(next(self.process), node, "transfer", v)
        if outcome is not None:
            self.h.complete(inv, outcome, error=error or ("40001: could not serialize"
                                                          if outcome == "fail" else None))
        return v

    def read(self, balances, node=1):
        inv = self.h.invoke(next(self.process), node, "read", None)
        self.h.complete(inv, "ok", dict(balances))

    @staticmethod
    def state(transfers):
        acc = {i: BALANCE for i in range(N)}
        for t in transfers:
            acc[t["from"]] -= t["amount"]
            acc[t["to"]] += t["amount"]
        return {"accounts": acc,
                "ledger": [[t["id"], t["from"], t["to"], t["amount"]] for t in transfers]}


def bank_check(b, finals, **kw):
    return check_bank(b.h, finals, n_accounts=N, total=TOTAL, **kw)


def clean_bank():
    b = Bank()
    t1 = b.transfer(0, 1, 10)
    b.read({0: 90, 1: 110, 2: 100, 3: 100})
    t2 = b.transfer(2, 3, 5, node=2)
    b.transfer(1, 2, 7, outcome="fail")
    t4 = b.transfer(3, 0, 20, outcome="info", error="08006: server closed the connection")
    b.read({0: 110, 1: 110, 2: 95, 3: 85}, node=2)
    return b, [t1, t2, t4]


def test_bank_clean_history_is_valid():
    b, applied = clean_bank()
    finals = {1: Bank.state(applied), 2: Bank.state(applied), 3: Bank.state(applied)}
    r = bank_check(b, finals)
    assert r.valid, r.report()
    assert r.anomalies == {}
    assert r.counts["transfer-ok"] == 2 and r.counts["transfer-info"] == 1
    # an info transfer that no node applied is fine too
    r = bank_check(b, {n: Bank.state(applied[:2]) for n in (1, 2)})
    assert r.valid, r.report()


def test_bank_bad_total_in_reads_summarised_per_node():
    b, applied = clean_bank()
    b.read({0: 90, 1: 100, 2: 100, 3: 100})        # a transfer half seen: 390
    b.read({0: 90, 1: 120, 2: 100, 3: 100}, node=2)
    b.read({0: 95, 1: 100, 2: 100, 3: 100})        # 395
    r = bank_check(b, None)
    assert not r.valid and r.failing == ["wrong-total"]
    by_node = {e["node"]: e for e in r.anomalies["wrong-total"]}
    assert by_node[1]["count"] == 2
    assert by_node[1]["totals"] == {"first": 390, "lowest": 390, "highest": 395}
    assert by_node[2]["totals"]["first"] == 410
    assert "wrong-total" in r.report()


def test_bank_missing_account_and_nulls():
    b, _ = clean_bank()
    b.read({0: 200, 1: 100, 2: 100})
    b.read({0: 100, 1: 100, 2: 100, 3: None})
    r = bank_check(b, None)
    assert set(r.failing) == {"missing-account", "null-balance"}


def test_bank_negative_balance_only_when_asked():
    b, _ = clean_bank()
    b.read({0: -10, 1: 210, 2: 100, 3: 100})
    assert bank_check(b, None).valid
    assert bank_check(b, None, negative_ok=False).failing == ["negative-balance"]


def test_bank_transfer_twice_in_ledger():
    b, applied = clean_bank()
    twice = Bank.state(applied + [applied[0]])
    r = bank_check(b, {1: twice, 2: twice})
    assert "ledger-duplicate" in r.failing
    assert r.anomalies["ledger-duplicate"][0]["transfer"] == applied[0]["id"]


def test_bank_failed_transfer_in_ledger():
    b, applied = clean_bank()
    failed = b.transfer(0, 3, 1, outcome="fail")
    s = Bank.state(applied + [failed])
    r = bank_check(b, {1: s, 2: s})
    assert r.failing == ["ledger-has-failed"]


def test_bank_ok_transfer_missing():
    b, applied = clean_bank()
    s = Bank.state(applied[1:])
    r = bank_check(b, {1: s, 2: s})
    assert r.failing == ["ledger-missing-ok"]
    assert "acknowledged transfer t0" in r.report()


def test_bank_different_info_transfers_on_two_nodes():
    b, applied = clean_bank()
    r = bank_check(b, {1: Bank.state(applied), 2: Bank.state(applied[:2])})
    assert set(r.failing) == {"info-transfers-differ", "divergent-final-state"}


def test_bank_balances_not_matching_ledger():
    b, applied = clean_bank()
    s = Bank.state(applied)
    s["accounts"][0] -= 10          # an UPDATE replayed without its ledger row...
    s["accounts"][1] += 10          # ...keeps the total, but not the ledger's sums
    r = bank_check(b, {1: s, 2: s})
    assert r.failing == ["balance-mismatch"]
    assert set(r.anomalies["balance-mismatch"][0]["accounts"]) == {0, 1}


def test_bank_divergent_final_state_with_string_keys():
    b, applied = clean_bank()
    s1 = json.loads(json.dumps(Bank.state(applied)))      # as read back from a file
    s2 = Bank.state(applied)
    assert bank_check(b, {1: s1, 2: s2}).valid
    s2["accounts"][2] += 1
    s2["accounts"][3] -= 1
    r = bank_check(b, {1: s1, 2: s2})
    assert "divergent-final-state" in r.failing


# -- list-append ------------------------------------------------------------------------------

class Append:
    """Builds a list-append history by hand. ``txn`` records an invocation
    and its completion at once; ``begin``/``end`` let transactions overlap."""

    def __init__(self):
        self.h = new_history()
        self.process = itertools.count()

    def begin(self, mops, node=1):
        value = [[f, k, None if f == "r" else v] for f, k, v in mops]
        return self.h.invoke(next(self.process), node, "txn", value), mops

    def end(self, started, outcome="ok"):
        inv, mops = started
        if outcome == "ok":
            return self.h.complete(inv, "ok", [list(m) for m in mops])
        return self.h.complete(inv, outcome, error="40001: could not serialize access"
                               if outcome == "fail" else "08006: connection lost")

    def txn(self, *mops, outcome="ok", node=1):
        return self.end(self.begin(mops, node), outcome)


def r(k, v):
    return ("r", k, v)


def a(k, e):
    return ("append", k, e)


def kinds(result):
    return sorted(result.anomalies)


def test_append_clean_history_is_valid():
    x = Append()
    x.txn(a(1, 1), a(2, 2))
    x.txn(r(1, [1]), a(1, 3), r(1, [1, 3]))
    x.txn(r(2, [2]), r(1, [1, 3]), a(2, 4))
    x.txn(a(3, 5), outcome="fail")
    x.txn(a(3, 6), outcome="info")            # unknown, never seen: fine
    x.txn(r(3, []), r(2, [2, 4]))
    finals = {n: {"lists": {1: [1, 3], 2: [2, 4]}} for n in (1, 2, 3)}
    res = check_list_append(x.h, finals, realtime=True)
    assert res.valid and res.anomalies == {}, res.report()
    assert res.counts["txn-ok"] == 4 and res.counts["graph-txns"] == 4
    assert "VALID" in res.report()


def test_append_incompatible_order():
    x = Append()
    x.txn(a(1, 1))
    x.txn(a(1, 2))
    x.txn(a(1, 3))
    x.txn(r(1, [1, 2]))
    x.txn(r(1, [1, 3, 2]))
    res = check_list_append(x.h)
    assert "incompatible-order" in res.failing
    assert res.anomalies["incompatible-order"][0]["diverge_at"] == 1


def test_append_duplicate_element():
    x = Append()
    x.txn(a(1, 1))
    x.txn(r(1, [1, 1]))
    res = check_list_append(x.h)
    assert res.failing == ["duplicate-elements"]


def test_append_internal_inconsistency():
    x = Append()
    x.txn(a(1, 1))
    x.txn(a(1, 2), r(1, [1]))                 # its own append is missing
    x.txn(r(2, []), r(2, [7]))                # two reads disagree (7 is unknown too)
    x.txn(a(2, 7))
    res = check_list_append(x.h)
    assert "internal" in res.failing
    assert len(res.anomalies["internal"]) == 2
    assert res.anomalies["internal"][0]["expected"] == ["...", 2]


def test_append_g1a_aborted_read():
    x = Append()
    x.txn(a(1, 9), outcome="fail")
    x.txn(r(1, [9]))
    res = check_list_append(x.h)
    assert res.failing == ["G1a"]
    # an aborted element in a node's final state is G1a too
    x2 = Append()
    x2.txn(a(1, 9), outcome="fail")
    assert check_list_append(x2.h, {1: {"lists": {1: [9]}}}).failing == ["G1a"]


def test_append_g1b_intermediate_read():
    x = Append()
    x.txn(a(1, 1), a(1, 2))
    x.txn(r(1, [1]))
    res = check_list_append(x.h)
    # The reader also sits in a cycle with the writer (wr, then rw to the
    # writer's own later append): Elle reports that G-single too.
    assert res.failing == ["G-single", "G1b"]
    assert res.anomalies["G1b"][0]["element"] == 1


def test_append_g0_write_cycle():
    x = Append()
    x.txn(a(1, 1), a(2, 2))
    x.txn(a(1, 3), a(2, 4))
    x.txn(r(1, [1, 3]), r(2, [4, 2]))         # T1 before T2 on key 1, after on key 2
    res = check_list_append(x.h)
    assert res.failing == ["G0"]
    cycle = res.anomalies["G0"][0]["cycle"]
    assert [s["edge"] for s in cycle] == ["ww", "ww"]
    assert {s["key"] for s in cycle} == {1, 2}


def test_append_g1c_circular_information_flow():
    x = Append()
    t1 = x.begin([a(1, 1), r(2, [2])])
    t2 = x.begin([a(2, 2), r(1, [1])])
    x.end(t1)
    x.end(t2)
    res = check_list_append(x.h)
    assert res.failing == ["G1c"]
    assert sorted(s["edge"] for s in res.anomalies["G1c"][0]["cycle"]) == ["wr", "wr"]


def test_append_g_single_read_skew():
    x = Append()
    t2 = x.begin([r(1, []), r(2, [2])])       # sees T1 on key 2 but not on key 1
    x.txn(a(1, 1), a(2, 2))
    x.end(t2)
    x.txn(r(1, [1]))
    res = check_list_append(x.h)
    assert res.failing == ["G-single"]
    edges = sorted(s["edge"] for s in res.anomalies["G-single"][0]["cycle"])
    assert edges == ["rw", "wr"]
    assert "read key 1 the initial (empty) state" in res.report()


def test_append_g2_item_write_skew_reported_not_failing():
    x = Append()
    t1 = x.begin([r(1, []), r(2, []), a(1, 1)])
    t2 = x.begin([r(1, []), r(2, []), a(2, 2)])
    x.end(t1)
    x.end(t2)
    finals = {1: {"lists": {1: [1], 2: [2]}}, 2: {"lists": {1: [1], 2: [2]}}}
    res = check_list_append(x.h, finals)
    assert kinds(res) == ["G2-item"]
    assert res.valid, "G2-item is allowed by default"
    assert "allowed" in res.report()
    strict = check_list_append(x.h, finals, allowed=())
    assert strict.failing == ["G2-item"]


def test_append_lost_update_p4():
    x = Append()
    t1 = x.begin([r(1, [5]), a(1, 6)])
    t2 = x.begin([r(1, [5]), a(1, 7)])
    x.end(t1)
    x.end(t2)
    x.txn(a(1, 5), outcome="ok")      # the writer of 5 (recorded later: order is by reads)
    finals = {1: {"lists": {1: [5, 6, 7]}}}
    res = check_list_append(x.h, finals)
    assert "lost-update" in res.failing
    lu = res.anomalies["lost-update"][0]
    assert lu["key"] == 1 and lu["read"] == [5] and len(lu["txns"]) == 2
    # in the graph the same thing is a one-key ww + rw cycle
    assert [sorted(s["edge"] for s in c["cycle"]) for c in res.anomalies["G-single"]] == [
        ["rw", "ww"]]


def test_append_lost_acknowledged_write_and_divergence():
    x = Append()
    x.txn(a(1, 1))
    x.txn(a(1, 2))
    x.txn(r(1, [1, 2]))
    finals = {1: {"lists": {1: [1, 2]}}, 2: {"lists": {1: [1]}}}
    res = check_list_append(x.h, finals)
    assert set(res.failing) == {"lost-write", "divergent-final-state"}
    lost = res.anomalies["lost-write"]
    assert [(e["node"], e["element"]) for e in lost] == [(2, 2)]


def test_append_divergent_final_states_after_unknown_txn():
    x = Append()
    x.txn(a(1, 1))
    x.txn(a(2, 3), outcome="info")
    finals = {1: {"lists": {"1": [1], "2": [3]}}, 2: {"lists": {1: [1]}}}
    res = check_list_append(x.h, finals)
    assert res.failing == ["divergent-final-state"]
    assert res.anomalies["divergent-final-state"][0]["key"] == 2


def test_append_partially_visible_unknown_txn():
    x = Append()
    x.txn(a(1, 5), a(2, 6), outcome="info")
    finals = {1: {"lists": {1: [5]}}}
    assert check_list_append(x.h, finals).failing == ["partially-visible-txn"]


def test_append_unknown_element_and_future_read():
    x = Append()
    x.txn(r(1, [42]))
    x.txn(r(2, [8]), a(2, 8))
    res = check_list_append(x.h)
    assert "unknown-element" in res.failing and "future-read" in res.failing


def test_append_info_txn_observed_joins_the_graph():
    x = Append()
    t3 = x.begin([r(2, [])])
    x.txn(a(1, 1), a(2, 2), outcome="info")      # unknown outcome, but seen
    x.txn(r(1, [1]), a(3, 3))
    x.end(t3)
    # t3 saw key 2 without the info txn's append, yet t3 ... is alone: no cycle
    assert check_list_append(x.h).valid
    x.txn(r(3, [3]), r(2, []))     # read skew through the info txn: G-single
    res = check_list_append(x.h)
    assert res.failing == ["G-single"]


def test_append_realtime_stale_read_only_when_asked():
    x = Append()
    x.txn(a(1, 1))
    x.txn(r(1, []))                # invoked after the append was acknowledged
    x.txn(r(1, [1]))
    assert check_list_append(x.h).valid
    res = check_list_append(x.h, realtime=True)
    assert res.failing == ["G-single-realtime"]
    edges = sorted(s["edge"] for s in res.anomalies["G-single-realtime"][0]["cycle"])
    assert edges == ["rt", "rw"]
    # concurrent transactions are not ordered by realtime
    y = Append()
    t1 = y.begin([a(1, 1)])
    t2 = y.begin([r(1, [])])
    y.end(t1)
    y.end(t2)
    assert check_list_append(y.h, realtime=True).valid


def test_append_component_with_write_skew_and_read_skew_is_g_single():
    # T1 and T2 write-skew (G2-item); T3 saw T1's append to key 1 but not
    # its append to key 4 (G-single). One component: the worse kind fails it.
    x = Append()
    t1 = x.begin([r(1, []), r(2, []), a(1, 1), a(4, 10)])
    t2 = x.begin([r(1, []), r(2, []), a(2, 2)])
    x.end(t1)
    x.end(t2)
    x.txn(r(1, [1]), r(4, []))
    res = check_list_append(x.h)
    assert res.counts["sccs"] == 1 and res.counts["largest-scc"] == 3
    assert res.failing == ["G-single"]
    cycle = res.anomalies["G-single"][0]["cycle"]
    assert sorted(s["edge"] for s in cycle) == ["rw", "wr"]


def test_append_budget_exhausted_is_reported():
    x = Append()
    t1 = x.begin([r(1, []), a(2, 2)])
    t2 = x.begin([r(2, []), a(1, 1)])
    x.end(t1)
    x.end(t2)
    res = check_list_append(x.h, cycle_search_budget=0)
    assert "cycle-search-truncated" in res.failing
    assert res.notes


# -- CLI ----------------------------------------------------------------------------------------

def test_cli_reports_and_exits_by_validity(tmp_path, capsys):
    x = Append()
    x.txn(a(1, 1))
    x.txn(r(1, [1]))
    hp = tmp_path / "append.jsonl"
    x.h.write_jsonl(hp)
    fp = tmp_path / "append.final.json"
    write_final_states(fp, {1: {"lists": {1: [1]}}, 2: {"lists": {1: []}}}, workload="append")
    assert read_final_states(fp)[0] == "append"
    assert cli.main([str(hp)]) == 0
    assert "list-append: VALID" in capsys.readouterr().out
    assert cli.main([str(hp), "--final", str(fp)]) == 1
    assert "lost-write" in capsys.readouterr().out

    b, applied = clean_bank()
    b.read({0: 1, 1: 2, 2: 3, 3: 4})
    bp = tmp_path / "bank.jsonl"
    b.h.write_jsonl(bp)
    bf = tmp_path / "bank.final.json"
    write_final_states(bf, {1: Bank.state(applied)}, workload="bank",
                       params={"n_accounts": N, "total": TOTAL})
    proc = subprocess.run([sys.executable, "-m", "harness.check", str(bp), "--final", str(bf)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "bank: INVALID" in proc.stdout and "wrong-total" in proc.stdout
    assert cli.main([str(tmp_path / "missing.jsonl")]) == 2


# -- a long history ---------------------------------------------------------------------------

def simulated_append_history(n_txns: int, max_lag: int, *, first_committer_wins: bool = False,
                             seed: int = 7) -> tuple[History, dict]:
    """A list-append history from an in-memory store where each transaction
    reads a snapshot up to ``max_lag`` commits old and appends to the
    current state. With ``first_committer_wins`` a transaction that appends
    to a key changed since its snapshot fails: snapshot isolation, which
    allows write skew (G2-item) and nothing worse. Without it, lost updates,
    read skew and orders that disagree abound. Lag 0 is serial."""
    rng = random.Random(seed)
    h = new_history()
    states: list[dict[int, tuple]] = [{}]
    active, next_key, writes = list(range(10)), 10, {k: 0 for k in range(10)}
    element = itertools.count(1)
    for p in range(n_txns):
        snap = states[max(0, len(states) - 1 - rng.randint(0, max_lag))]
        cur = dict(states[-1])
        mops, own = [], {}
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(active))
            k = active[i]
            if rng.random() < 0.5:
                mops.append(["r", k, list(snap.get(k, ())) + own.get(k, [])])
            else:
                e = next(element)
                mops.append(["append", k, e])
                own.setdefault(k, []).append(e)
                cur[k] = cur.get(k, ()) + (e,)
                writes[k] += 1
                if writes[k] >= 64:
                    active[i], writes[next_key] = next_key, 0
                    next_key += 1
        conflict = any(snap.get(k) != states[-1].get(k) for k in own)
        inv = h.invoke(p, 1 + p % 3, "txn", [[f, k, None if f == "r" else v] for f, k, v in mops])
        if first_committer_wins and conflict:
            h.complete(inv, "fail", error="40001: could not serialize access")
        else:
            h.complete(inv, "ok", mops)
            states.append(cur)
    final = {"lists": {k: list(v) for k, v in states[-1].items()}}
    return h, {1: final, 2: final}


def test_append_checker_finds_only_write_skew_under_snapshot_isolation():
    h, finals = simulated_append_history(3000, max_lag=5, first_committer_wins=True)
    res = check_list_append(h, finals)
    assert kinds(res) == ["G2-item"], res.report()
    assert res.valid and res.counts["txn-fail"] > 100


def test_append_checker_on_20000_operations_is_fast():
    serial, finals = simulated_append_history(10_000, max_lag=0)
    t0 = time.monotonic()
    res = check_list_append(serial, finals, realtime=True)
    serial_s = time.monotonic() - t0
    assert res.valid and res.anomalies == {}, res.report()

    skewed, finals = simulated_append_history(10_000, max_lag=30)
    t0 = time.monotonic()
    res = check_list_append(skewed, finals, realtime=True)
    skewed_s = time.monotonic() - t0
    assert {"lost-update", "G-single"} <= set(res.failing), res.report()
    assert "cycle-search-truncated" not in res.anomalies
    assert res.counts["largest-scc"] > 1000
    print(f"\n20,000 ops: serial {serial_s:.2f}s, skewed {skewed_s:.2f}s (with realtime); "
          f"largest SCC {res.counts['largest-scc']}")
    assert serial_s < 20 and skewed_s < 20
