"""Fault kinds for the cluster under test (Jepsen's nemesis).

Each fault is injected on a *victim* node and later healed. Process faults
kill or pause real processes the harness started (by pid); network faults
act on the fault relay's edges; failpoint faults arm a named crash point in
the victim's proxy (common/failpoints.py) and restart it once it fired.

Names (``FAULTS``):
  kill-proxy      SIGKILL the victim's proxy; heal: start it again
  restart-proxy   SIGTERM (graceful) then start again
  pause-proxy     SIGSTOP the proxy; heal: SIGCONT
  crash-pg        pg_ctl stop -m immediate; heal: start PostgreSQL
  kill-node       SIGKILL the proxy and every PostgreSQL process; heal: start both
  pause-node      SIGSTOP the proxy and every PostgreSQL process; heal: SIGCONT
  isolate-drop    stall every link of the victim (iptables DROP)
  isolate-reject  reset every link of the victim (iptables REJECT)
  edge-cut        cut the links between the victim and one other node only
  one-way         stall only what the victim sends to one other node
  clog            stall links one by one (swizzle-clog), unclog in random order
  slow-links      delay every link of the victim by 50-300 ms each way; heal: no delay
  fp:<name>       crash the victim's proxy at failpoint <name>; heal: start it
"""
from __future__ import annotations

import random
import signal
import time
from dataclasses import dataclass, field

from common.failpoints import POINTS

from .cluster import ClusterUnderTest

PROCESS_FAULTS = ("kill-proxy", "restart-proxy", "pause-proxy", "crash-pg", "kill-node",
                  "pause-node")
NETWORK_FAULTS = ("isolate-drop", "isolate-reject", "edge-cut", "one-way", "clog", "slow-links")
FAILPOINT_FAULTS = tuple(f"fp:{p}" for p in POINTS)
FAULTS = PROCESS_FAULTS + NETWORK_FAULTS + FAILPOINT_FAULTS


@dataclass
class Injected:
    """What a fault did, for the round's report and for ``heal``."""
    fault: str
    victim: int
    other: int | None = None
    detail: str = ""
    fired: bool = True                  # a failpoint that never fired heals as a no-op
    edges: list = field(default_factory=list)
    stop_s: float | None = None         # restart-proxy: how long the graceful stop took


def inject(c: ClusterUnderTest, fault: str, victim: int, rng: random.Random,
           hold_s: float) -> Injected:
    node = c.node(victim)
    others = [j for j in c.ids if j != victim]
    inj = Injected(fault, victim)
    if fault == "kill-proxy":
        node.kill_proxy(signal.SIGKILL)
    elif fault == "restart-proxy":
        t0 = time.monotonic()
        node.kill_proxy(signal.SIGTERM)
        inj.stop_s = round(time.monotonic() - t0, 2)
        inj.detail = f"graceful stop took {inj.stop_s:g} s"
    elif fault == "pause-proxy":
        node.pause_proxy()
    elif fault == "crash-pg":
        node.crash_pg()
    elif fault == "kill-node":
        node.kill_proxy(signal.SIGKILL)
        node.kill_pg()
    elif fault == "pause-node":
        node.pause_proxy()
        node.pause_pg()
    elif fault in ("isolate-drop", "isolate-reject"):
        c.isolate(victim, "stall" if fault == "isolate-drop" else "reject", clients=True)
    elif fault == "edge-cut":
        inj.other = rng.choice(others)
        c.cut(victim, inj.other, rng.choice(["stall", "reject"]))
    elif fault == "one-way":
        inj.other = rng.choice(others)
        c.cut_direction(victim, inj.other)
    elif fault == "clog":
        edges = [e for e in c.relay.edges if e.startswith("link:")]
        rng.shuffle(edges)
        inj.edges = edges[:rng.randint(1, len(edges))]
        for e in inj.edges:              # one by one over the first part of the hold
            c.relay.stall(e)
            time.sleep(min(0.5, hold_s / (2 * len(inj.edges))))
    elif fault == "slow-links":
        ms = rng.choice([50, 100, 300])
        c.relay.delay(ms, *c.link_edges(victim))
        inj.detail = f"{ms} ms"
    elif fault.startswith("fp:"):
        point = fault[3:]
        node.arm(f"{point}=crash")
        deadline = time.monotonic() + max(hold_s, 5)
        while node.proxy_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        inj.fired = not node.proxy_alive()
        node.disarm()
        if not inj.fired:
            inj.detail = "did not fire"
    else:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
    return inj


def heal(c: ClusterUnderTest, inj: Injected, rng: random.Random) -> None:
    node = c.node(inj.victim)
    f = inj.fault
    if f in ("kill-proxy", "restart-proxy") or (f.startswith("fp:") and inj.fired):
        node.start_proxy()
    elif f == "pause-proxy":
        node.resume_proxy()
    elif f == "crash-pg":
        node.start_pg()
    elif f == "kill-node":
        node.start_pg()
        node.start_proxy()
    elif f == "pause-node":
        node.resume_pg()
        node.resume_proxy()
    elif f == "clog":
        edges = list(inj.edges)
        rng.shuffle(edges)
        for e in edges:                  # unclogged in random order
            c.relay.heal(e)
            time.sleep(0.05)
    elif f in NETWORK_FAULTS:
        c.heal()


def victim_side_down(fault: str) -> bool:
    """Does the fault stop the victim from committing (today, with a fixed
    membership, it stops everyone: see the runner's availability figures)?"""
    return fault not in ("one-way", "clog", "slow-links")
