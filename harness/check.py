"""``python -m harness.check HISTORY.jsonl``: check a recorded history, print
the report, exit 1 if it is invalid (2 if the input is unreadable).

The workload is taken from ``--workload``, else from the final-state file,
else guessed from the operations (``txn`` is list-append, ``transfer`` and
``read`` are bank). The bank's account count and total come from the
final-state file's params, else from ``--accounts``/``--total`` (defaults:
``BankWorkload``'s 20 accounts of 1000).
"""
from __future__ import annotations

import argparse
import sys

from harness import checkers
from harness.history import History, read_final_states


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.check", description=__doc__.split("\n")[0])
    p.add_argument("history", help="history file (JSON Lines)")
    p.add_argument("--workload", choices=("bank", "append"))
    p.add_argument("--final", help="final states file (harness.history.write_final_states)")
    p.add_argument("--accounts", type=int, default=20, help="bank: number of accounts")
    p.add_argument("--total", type=int, default=20000, help="bank: total of all balances")
    p.add_argument("--realtime", action="store_true",
                   help="list-append: also report cycles through realtime edges")
    p.add_argument("--fail-on", action="append", default=[], metavar="KIND",
                   help="make an anomaly kind that is allowed by default (G2-item) fail")
    args = p.parse_args(argv)
    try:
        history = History.read_jsonl(args.history)
        workload, params, finals = (read_final_states(args.final) if args.final
                                    else (None, {}, None))
    except (OSError, ValueError, KeyError) as exc:
        print(f"cannot read input: {exc}", file=sys.stderr)
        return 2
    workload = args.workload or workload or (
        "append" if any(op.f == "txn" for op in history) else "bank")
    if workload == "bank":
        result = checkers.check_bank(history, finals,
                                     n_accounts=params.get("n_accounts", args.accounts),
                                     total=params.get("total", args.total))
    else:
        allowed = checkers.DEFAULT_ALLOWED - set(args.fail_on)
        result = checkers.check_list_append(history, finals, realtime=args.realtime,
                                            allowed=allowed)
    print(result.report())
    return 0 if result.valid else 1


if __name__ == "__main__":
    sys.exit(main())
