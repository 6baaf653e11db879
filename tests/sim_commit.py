"""A seeded deterministic simulator for the commit protocol cores.

One seed picks everything: when clients commit, which applies fail with a
conflict, which inter-node messages are lost, duplicated, delayed or
reordered, and how far each node's decoding stream lags. The streams
themselves are ordered and reliable (they are TCP connections replaying WAL).
After every event the invariants are checked; then faults stop and every
transaction must settle within a bounded number of steps (liveness). A
failure names the seed that replays it: ``python tests/sim_commit.py SEED``.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from replication.commit import (AbortLocal, CommitLocal, Coordinator, FinishLocal,  # noqa: E402
                                Generation, Participant, Persist, PersistOwn, Reply, Send,
                                Working, make_gid)


@dataclass
class Node:
    id: int
    coord: Coordinator
    part: Participant
    wal: list = field(default_factory=list)            # ("prepare"|"commit"|"rollback", gid)
    cursors: dict = field(default_factory=dict)        # origin -> position in its wal
    prepared: set = field(default_factory=set)
    committed: set = field(default_factory=set)
    rolled_back: set = field(default_factory=set)
    precommitted: set = field(default_factory=set)     # durable
    seq: int = 0


class SimFailure(AssertionError):
    pass


class Sim:
    def __init__(self, seed: int, n: int = 3, *, drop: float = 0.15, dup: float = 0.05,
                 conflict: float = 0.1, wait_peer_commits: bool = True,
                 coordinator=Coordinator):
        self.rng = random.Random(seed)
        self.seed = seed
        gen = Generation(1, frozenset(range(1, n + 1)), frozenset(range(1, n + 1)))
        self.nodes = {i: Node(i, coordinator(i, gen, vote_timeout_ms=3000, retry_ms=100,
                                             wait_peer_commits=wait_peer_commits),
                              Participant(i, gen)) for i in gen.members}
        for node in self.nodes.values():
            node.cursors = {o: 0 for o in self.nodes if o != node.id}
        self.net: list[tuple[int, object]] = []
        self.now = 0
        self.drop, self.dup, self.conflict = drop, dup, conflict
        self.replies: dict[str, Reply] = {}
        self.started: set[str] = set()
        self.wait_peer_commits = wait_peer_commits
        self.writes: list = []     # coordinators' own precommit records being written
        self.majority = gen.majority

    # -- carrying out actions ------------------------------------------------------

    def run(self, node: Node, actions: list) -> None:
        for a in actions:
            cls = a.__class__
            if cls is Send:
                if a.msg is not None:
                    self.net.append((a.to, a.msg))
            elif cls is Persist:
                node.precommitted.add(a.gid)
            elif cls is PersistOwn:
                # durable later: an event of its own, racing the members' acks
                self.writes.append((node.id, a.gid))
            elif cls is CommitLocal:
                self._finish(node, a.gid, True)
                self.run(node, node.coord.local_done(a.gid, True, self.now))
            elif cls is AbortLocal:
                self._finish(node, a.gid, False)
                self.run(node, node.coord.local_done(a.gid, False, self.now))
            elif cls is FinishLocal:
                if a.gid in node.prepared:
                    self._finish(node, a.gid, a.commit)
                    self.run(node, node.part.finished(a.gid, a.commit))
            elif cls is Reply:
                if a.gid in self.replies:
                    raise SimFailure(f"seed {self.seed}: {a.gid} answered twice")
                self.replies[a.gid] = a
            else:
                raise SimFailure(f"unknown action {a!r}")

    def _finish(self, node: Node, gid: str, commit: bool) -> None:
        assert gid in node.prepared, (node.id, gid)
        node.prepared.discard(gid)
        (node.committed if commit else node.rolled_back).add(gid)
        node.wal.append(("commit" if commit else "rollback", gid))

    # -- events ----------------------------------------------------------------------

    def client_commit(self, node: Node) -> None:
        node.seq += 1
        gid = make_gid(node.id, 1, node.seq)
        node.prepared.add(gid)
        node.wal.append(("prepare", gid))
        self.started.add(gid)
        self.run(node, node.coord.start(gid, self.now))

    def stream_step(self, node: Node, origin: int) -> bool:
        wal = self.nodes[origin].wal
        pos = node.cursors[origin]
        if pos >= len(wal):
            return False
        kind, gid = wal[pos]
        node.cursors[origin] = pos + 1
        if kind == "prepare":
            if self.rng.random() < self.conflict:
                self.run(node, node.part.applied(gid, False, "55P03", "lock timeout"))
            else:
                node.prepared.add(gid)
                self.run(node, node.part.applied(gid, True))
        elif gid in node.prepared:   # COMMIT/ROLLBACK PREPARED of a gid prepared here
            commit = kind == "commit"
            self._finish(node, gid, commit)
            self.run(node, node.part.finished(gid, commit))
        return True

    def deliver(self, faults: bool) -> None:
        i = self.rng.randrange(len(self.net))
        to, msg = self.net.pop(i)
        if faults and self.rng.random() < self.drop:
            return
        if faults and self.rng.random() < self.dup:
            self.net.append((to, msg))
        node = self.nodes[to]
        self.run(node, node.coord.receive(msg, self.now))
        self.run(node, node.part.receive(msg))

    def step(self, faults: bool, new_txns: bool) -> bool:
        """One event; returns False when nothing was left to do."""
        self.now += self.rng.randint(1, 20)
        choices = []
        if new_txns:
            choices.append("commit")
        if self.net:
            choices += ["deliver"] * 3
        lagging = self.lagging()
        if lagging:
            choices += ["stream"] * 3 + ["working"]
        if self.writes:
            choices += ["write"] * 2
        choices.append("tick")
        what = self.rng.choice(choices)
        if what == "commit":
            self.client_commit(self.rng.choice(list(self.nodes.values())))
        elif what == "deliver":
            self.deliver(faults)
        elif what == "stream":
            n, o = self.rng.choice(lagging)
            self.stream_step(n, o)
        elif what == "working":
            # a member behind on a coordinator's stream says it is busy
            # (lost, duplicated and reordered like every message)
            n, o = self.rng.choice(lagging)
            self.net.append((o, Working(self.nodes[o].wal[n.cursors[o]][1], n.id)))
        elif what == "write":
            node_id, gid = self.writes.pop(self.rng.randrange(len(self.writes)))
            node = self.nodes[node_id]
            node.precommitted.add(gid)
            self.run(node, node.coord.persisted(gid, self.now))
        for node in self.nodes.values():
            self.run(node, node.coord.tick(self.now))
        self.check()
        return bool(self.net or self.lagging() or self.pending() or self.writes)

    def lagging(self) -> list:
        return [(n, o) for n in self.nodes.values() for o in n.cursors
                if n.cursors[o] < len(self.nodes[o].wal)]

    def pending(self) -> set[str]:
        return self.started - set(self.replies)

    # -- invariants ------------------------------------------------------------------------

    def check(self) -> None:
        committed = set().union(*(n.committed for n in self.nodes.values()))
        rolled_back = set().union(*(n.rolled_back for n in self.nodes.values()))
        both = committed & rolled_back
        if both:
            raise SimFailure(f"seed {self.seed}: committed on one node, rolled back on "
                             f"another: {sorted(both)}")
        for gid in committed:
            holders = sum(gid in n.precommitted for n in self.nodes.values())
            if holders < self.majority:
                raise SimFailure(f"seed {self.seed}: {gid} committed with {holders} precommits")
        for gid, r in self.replies.items():
            if r.committed:
                on = [n.id for n in self.nodes.values() if gid in n.committed]
                if self.wait_peer_commits and len(on) != len(self.nodes):
                    raise SimFailure(f"seed {self.seed}: {gid} reported committed, on {on} only")
            elif gid in committed:
                raise SimFailure(f"seed {self.seed}: {gid} reported aborted but committed")
        for n in self.nodes.values():
            n.coord.check_invariants()

    def run_schedule(self, safety_steps: int = 400, liveness_steps: int = 20000) -> dict:
        for _ in range(safety_steps):
            self.step(faults=True, new_txns=self.rng.random() < 0.3)
        for _ in range(liveness_steps):
            if not self.step(faults=False, new_txns=False):
                break
        else:
            raise SimFailure(f"seed {self.seed}: no progress after the faults stopped: "
                             f"{sorted(self.pending())} unanswered")
        committed = set().union(*(n.committed for n in self.nodes.values()))
        for n in self.nodes.values():
            missing = committed - n.committed
            if missing:
                raise SimFailure(f"seed {self.seed}: node {n.id} lacks committed "
                                 f"transactions {sorted(missing)}")
        left = {n.id: sorted(n.prepared) for n in self.nodes.values() if n.prepared}
        if left or self.pending():
            raise SimFailure(f"seed {self.seed}: settled with prepared transactions {left} "
                             f"and unanswered {sorted(self.pending())}")
        outcomes = [r.committed for r in self.replies.values()]
        return {"transactions": len(outcomes), "committed": sum(outcomes)}


if __name__ == "__main__":
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    print(Sim(seed).run_schedule())
