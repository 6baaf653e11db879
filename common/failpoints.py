"""Named failpoints: crash (or pause) a process at an exact step.

The fault harness arms a failpoint in one process to kill a coordinator or
a member at a precise point of the commit path (after the local PREPARE,
after the votes, after the precommit is durable, ...), as etcd's robustness
tests do with gofail. Nothing is ever active unless armed:

- ``MMPROXY_FAILPOINTS="name=action;name2=action"`` in the environment at
  start, or
- ``MMPROXY_FAILPOINTS_FILE=/path``: the file holds the same text and is
  (re-)read at start and whenever the process receives SIGUSR2, so a
  running process can be armed (and disarmed, with an empty file).

Actions: ``crash`` (SIGKILL to ourselves: exactly what ``kill -9`` does,
no clean-up), ``crash@N`` (on the N-th hit), ``sleep:MS`` (a blocking
sleep, to widen a race window). A hit is logged before the action runs.

The hot path costs one dict lookup on an empty dict when nothing is armed.
"""
from __future__ import annotations

import os
import signal
import time

# The points the code defines (the harness names them; see harness/).
POINTS = (
    "after_local_prepare",        # coordinator: local PREPARE done, protocol not started
    "after_votes",                # coordinator: every member voted yes, no precommit sent
    "after_precommit_durable",    # coordinator: own precommit record is durable
    "after_local_commit",         # coordinator: COMMIT PREPARED done here, client not told
    "apply_mid_transaction",      # member: an applier in the middle of a peer's transaction
    "member_before_vote",         # member: prepared a peer's transaction, vote not yet sent
    "member_after_precommit",     # member: precommit recorded and acknowledged, not committed
)

_armed: dict[str, list] = {}      # name -> [action, argument, hits so far]


def parse(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for part in text.replace("\n", ";").split(";"):
        part = part.strip()
        if not part:
            continue
        name, _, action = part.partition("=")
        name, action = name.strip(), action.strip() or "crash"
        if name not in POINTS:
            raise ValueError(f"unknown failpoint {name!r}; known: {', '.join(POINTS)}")
        arg = 1
        if action.startswith("crash@"):
            action, arg = "crash", int(action[6:])
        elif action.startswith("sleep:"):
            action, arg = "sleep", int(action[6:])
        elif action != "crash":
            raise ValueError(f"unknown failpoint action {action!r} (crash, crash@N, sleep:MS)")
        out[name] = [action, arg, 0]
    return out


def load() -> None:
    """(Re)arm from the environment and the failpoint file."""
    _armed.clear()
    _armed.update(parse(os.environ.get("MMPROXY_FAILPOINTS", "")))
    path = os.environ.get("MMPROXY_FAILPOINTS_FILE")
    if path:
        try:
            with open(path) as f:
                _armed.update(parse(f.read()))
        except FileNotFoundError:
            pass


def install_signal_handler(loop) -> None:
    """SIGUSR2 re-reads the failpoint file (only when one is configured)."""
    if os.environ.get("MMPROXY_FAILPOINTS_FILE"):
        loop.add_signal_handler(signal.SIGUSR2, load)


def hit(name: str, log=None, **fields) -> None:
    """Called at the named point; does nothing unless armed."""
    fp = _armed.get(name)
    if fp is None:
        return
    fp[2] += 1
    action, arg, hits = fp
    if action == "crash" and hits >= arg:
        if log is not None:
            log.warning("failpoint_crash", failpoint=name, **fields)
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)     # the signal is delivered before this returns
    elif action == "sleep":
        if log is not None:
            log.warning("failpoint_sleep", failpoint=name, ms=arg, **fields)
        time.sleep(arg / 1000)


load()
