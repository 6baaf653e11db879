"""The history of a fault run: one record per client operation event, after Jepsen.

This module owns the record format that workloads write and checkers read.
Rules it keeps:

- A client operation is two records: an ``invoke`` written before the
  client sends anything, then exactly one completion by the same process:
  ``ok`` (committed), ``fail`` (definitely not committed) or ``info``
  (outcome unknown). A process has at most one operation outstanding. After
  an ``info`` the client reconnects under a NEW process id, as in Jepsen
  (``jepsen.history``), so a process never has an unknown operation
  followed by another one.
- ``index`` is the position in the history and ``time`` the seconds since the
  history was created, from a monotonic clock; both are taken under one lock,
  so index order is real-time order of the events as the clients saw them.
- A completion carries the invocation's ``value`` unless it knows more: an
  ``ok`` list-append transaction carries its reads filled in. ``fail`` and
  ``info`` completions repeat the invocation's value.
- On disk a history is JSON Lines, one ``Op`` per line with the fields in
  declaration order. JSON object keys are strings, so a bank read's
  ``{account id: balance}`` is read back with int keys (``Op.from_json``).

Final states (what each node holds after heal) travel beside a history in one
JSON file: ``{"workload": "bank"|"append", "params": {...}, "nodes": {node id:
state}}``; see ``write_final_states``.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

OP_TYPES = ("invoke", "ok", "fail", "info")
COMPLETION_TYPES = ("ok", "fail", "info")
FUNCTIONS = ("transfer", "read", "txn")


class _SameValue:
    """``History.complete``'s default: repeat the invocation's value (None is
    a value a completion may carry)."""

    def __repr__(self) -> str:
        return "SAME_VALUE"


SAME_VALUE: Any = _SameValue()


@dataclass(frozen=True)
class Op:
    """One event of a client operation (see the module docstring)."""

    index: int
    time: float
    process: int
    node: int
    type: str
    f: str
    value: Any
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> "Op":
        d = json.loads(line)
        value = d.get("value")
        if d.get("f") == "read" and isinstance(value, dict):
            # JSON turned the bank's int account ids into strings.
            value = {int(k): v for k, v in value.items()}
        op = cls(index=int(d["index"]), time=float(d["time"]), process=int(d["process"]),
                 node=int(d["node"]), type=d["type"], f=d["f"], value=value,
                 error=d.get("error"))
        op.validate()
        return op

    def validate(self) -> None:
        if self.type not in OP_TYPES:
            raise ValueError(f"op {self.index}: type {self.type!r} is not one of {OP_TYPES}")
        if self.f not in FUNCTIONS:
            raise ValueError(f"op {self.index}: f {self.f!r} is not one of {FUNCTIONS}")


class History:
    """A thread-safe, append-only recorder of ``Op`` records.

    Clients call ``invoke`` before they send anything and ``complete`` once
    they know the outcome. The list only grows: readers get copies.
    """

    def __init__(self, ops: Iterable[Op] = (), *,
                 clock: Callable[[], float] = time.monotonic):
        self._lock = threading.Lock()
        self._ops: list[Op] = list(ops)
        self._clock = clock
        # A loaded history keeps its times; new records continue after them.
        last = self._ops[-1].time if self._ops else 0.0
        self._t0 = clock() - last

    # -- recording ---------------------------------------------------------------

    def now(self) -> float:
        """Seconds since the history started, on the clock its records use
        (so a fault schedule can log its events on the same scale)."""
        return self._clock() - self._t0

    def _append(self, process: int, node: int, type_: str, f: str, value: Any,
                error: str | None) -> Op:
        with self._lock:
            op = Op(index=len(self._ops), time=round(self.now(), 6), process=process,
                    node=node, type=type_, f=f, value=value, error=error)
            op.validate()
            self._ops.append(op)
            return op

    def invoke(self, process: int, node: int, f: str, value: Any) -> Op:
        return self._append(process, node, "invoke", f, value, None)

    def complete(self, invocation: Op, type_: str, value: Any = SAME_VALUE,
                 error: str | None = None) -> Op:
        """Record the completion of ``invocation``; ``value`` defaults to the
        invocation's value (what Jepsen does for fail and info)."""
        if invocation.type != "invoke":
            raise ValueError(f"op {invocation.index} is a completion, not an invocation")
        if type_ not in COMPLETION_TYPES:
            raise ValueError(f"completion type {type_!r} is not one of {COMPLETION_TYPES}")
        return self._append(invocation.process, invocation.node, type_, invocation.f,
                            invocation.value if value is SAME_VALUE else value, error)

    # -- reading -----------------------------------------------------------------

    @property
    def ops(self) -> list[Op]:
        with self._lock:
            return list(self._ops)

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def __len__(self) -> int:
        with self._lock:
            return len(self._ops)

    def pairs(self) -> list[tuple[Op, Op | None]]:
        return pair_ops(self.ops)

    # -- files -------------------------------------------------------------------

    def write_jsonl(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            for op in self.ops:
                f.write(op.to_json() + "\n")

    @classmethod
    def read_jsonl(cls, path: str | os.PathLike) -> "History":
        with open(path) as f:
            return cls(Op.from_json(line) for line in f if line.strip())


def pair_ops(ops: Iterable[Op]) -> list[tuple[Op, Op | None]]:
    """Each invocation with its completion (None if the history ended before
    it completed), in invocation order. Raises ValueError on a malformed
    history: a completion without an invocation, or a process with two
    operations outstanding."""
    pending: dict[int, int] = {}     # process -> position in result
    result: list[tuple[Op, Op | None]] = []
    for op in ops:
        if op.type == "invoke":
            if op.process in pending:
                raise ValueError(f"op {op.index}: process {op.process} invoked while "
                                 f"op {result[pending[op.process]][0].index} is outstanding")
            pending[op.process] = len(result)
            result.append((op, None))
        else:
            pos = pending.pop(op.process, None)
            if pos is None:
                raise ValueError(f"op {op.index}: {op.type} completion by process "
                                 f"{op.process} without an invocation")
            inv = result[pos][0]
            if inv.f != op.f:
                raise ValueError(f"op {op.index}: completes {inv.f!r} invocation "
                                 f"{inv.index} with f={op.f!r}")
            result[pos] = (inv, op)
    return result


def completions(ops: Iterable[Op]) -> list[tuple[Op, Op]]:
    """(invocation, completion) pairs of the operations that completed. An
    invocation without a completion has an unknown outcome, like ``info``:
    the checkers read ``pair_ops`` and treat it so."""
    return [(i, c) for i, c in pair_ops(ops) if c is not None]


# -- final states ---------------------------------------------------------------

def write_final_states(path: str | os.PathLike, final_states: dict[int, dict], *,
                       workload: str, params: dict | None = None) -> None:
    """Write what each node held at the end (``Workload.final_state``), with
    the workload name and the parameters its checker needs."""
    doc = {"workload": workload, "params": params or {},
           "nodes": {str(n): s for n, s in final_states.items()}}
    with open(path, "w") as f:
        json.dump(doc, f, separators=(",", ":"))


def read_final_states(path: str | os.PathLike) -> tuple[str, dict, dict[int, dict]]:
    """(workload, params, {node id: state}) from ``write_final_states``'s file.
    States keep JSON's string keys; the checkers accept both."""
    with open(path) as f:
        doc = json.load(f)
    return doc["workload"], doc.get("params", {}), {int(n): s for n, s in doc["nodes"].items()}
