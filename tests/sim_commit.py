"""A seeded deterministic simulator for the commit protocol cores.

One seed picks everything: when clients commit, which applies fail with a
conflict, which inter-node messages are lost, duplicated, delayed or
reordered, how far each node's decoding stream lags, when durable writes
(precommit records, fences) complete, and when a whole node crashes and
restarts. The streams themselves are ordered and reliable (TCP connections
replaying WAL); after a crash a node's position in each peer's stream goes
back to what it had confirmed, and what is resent is recognised from the
node's durable state (as the appliers do with the apply horizon and
``mtm.applied``).

A crash loses everything in memory (the Coordinator and Participant cores,
the clients waiting on that node) and each durable write still in flight
either lands or is lost. On restart the node recovers its own gids that are
still prepared (``Coordinator.recover``), as replication/node.py does.

After every event the invariants are checked; then faults stop, every node
is up, and every transaction must settle within a bounded number of steps
(liveness). A failure names the seed that replays it:
``python tests/sim_commit.py SEED``.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from replication.commit import (STATEMENT_COMPLETION_UNKNOWN,  # noqa: E402
                                AbortLocal, CommitLocal, Coordinator, Fence, FenceOwn,
                                FinishLocal, Generation, Participant, Persist, PersistOwn,
                                Reply, Send, Working, make_gid)


@dataclass
class Node:
    id: int
    coord: Coordinator
    part: Participant
    wal: list = field(default_factory=list)            # ("prepare"|"commit"|"rollback", gid)
    cursors: dict = field(default_factory=dict)        # origin -> position in its wal
    confirmed: dict = field(default_factory=dict)      # origin -> durable (acked) position
    prepared: set = field(default_factory=set)
    committed: set = field(default_factory=set)
    rolled_back: set = field(default_factory=set)
    records: dict = field(default_factory=dict)        # gid -> 'p' | 'x' (mtm.precommits)
    seq: int = 0
    up: bool = True
    incarnation: int = 0


class SimFailure(AssertionError):
    pass


class Sim:
    def __init__(self, seed: int, n: int = 3, *, drop: float = 0.15, dup: float = 0.05,
                 conflict: float = 0.1, wait_peer_commits: bool = True, crashes: bool = True,
                 coordinator=Coordinator):
        self.rng = random.Random(seed)
        self.seed = seed
        self.gen = gen = Generation(1, frozenset(range(1, n + 1)), frozenset(range(1, n + 1)))
        self.coordinator = coordinator
        self.wait_peer_commits = wait_peer_commits
        self.nodes = {i: Node(i, self._coord(i), Participant(i, gen)) for i in gen.members}
        for node in self.nodes.values():
            node.cursors = {o: 0 for o in self.nodes if o != node.id}
            node.confirmed = dict(node.cursors)
        self.net: list[tuple[int, object]] = []
        self.now = 0
        self.drop, self.dup, self.conflict = drop, dup, conflict
        self.crashes = crashes
        self.replies: dict[str, Reply] = {}
        self.started: set[str] = set()
        self.lost_clients: set[str] = set()   # their coordinator crashed: outcome unknown
        # durable writes in flight: (node id, incarnation, kind, gid)
        self.writes: list = []
        self.majority = gen.majority
        # gid -> how its commit was decided: a live coordinator's majority,
        # or a recovery that found a precommit record
        self.commit_basis: dict[str, str] = {}
        self.dirty: set[str] = set()          # gids whose state changed since the last check

    def _coord(self, i: int) -> Coordinator:
        return self.coordinator(i, self.gen, vote_timeout_ms=3000, retry_ms=100,
                                wait_peer_commits=self.wait_peer_commits)

    # -- carrying out actions ------------------------------------------------------

    def run(self, node: Node, actions: list) -> None:
        for a in actions:
            if not node.up:
                return
            cls = a.__class__
            if cls is Send:
                if a.msg is not None:
                    self.net.append((a.to, a.msg))
            elif cls in (Persist, PersistOwn, Fence, FenceOwn):
                # durable later: an event of its own, racing everything else
                self.writes.append((node.id, node.incarnation, cls.__name__, a.gid))
            elif cls is CommitLocal:
                t = node.coord.txns.get(a.gid)
                self.commit_basis[a.gid] = "recovery" if t is not None and t.recovered \
                    else "majority"
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
                if a.gid in self.lost_clients:
                    continue
                if a.gid in self.replies:
                    raise SimFailure(f"seed {self.seed}: {a.gid} answered twice")
                self.replies[a.gid] = a
                self.dirty.add(a.gid)
            else:
                raise SimFailure(f"unknown action {a!r}")

    def _finish(self, node: Node, gid: str, commit: bool) -> None:
        assert gid in node.prepared, (node.id, gid)
        node.prepared.discard(gid)
        self.dirty.add(gid)
        (node.committed if commit else node.rolled_back).add(gid)
        node.wal.append(("commit" if commit else "rollback", gid))

    def complete_write(self, i: int) -> None:
        node_id, inc, kind, gid = self.writes.pop(i)
        node = self.nodes[node_id]
        rec = node.records.setdefault(gid, "p" if kind in ("Persist", "PersistOwn") else "x")
        self.dirty.add(gid)
        if inc != node.incarnation:
            return   # asked by a process that died: an orphaned backend finished it
        if kind == "PersistOwn":
            self.run(node, node.coord.persisted(gid, self.now, ok=rec == "p"))
        elif kind == "Persist":
            self.run(node, node.part.persisted(gid, rec == "p"))
        elif kind == "FenceOwn":
            self.run(node, node.coord.own_fenced(gid, rec, self.now))
        else:
            self.run(node, node.part.fenced(gid, rec == "p", gid in node.committed))

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
        if self.rng.random() < 0.5:
            node.confirmed[origin] = pos + 1       # acknowledged, and the slot confirmed
        if kind == "prepare":
            if gid in node.prepared:
                self.run(node, node.part.applied(gid, True))    # a replay: vote again
            elif gid in node.committed or gid in node.rolled_back:
                pass                                            # a replay of a finished one
            elif self.rng.random() < self.conflict:
                self.run(node, node.part.applied(gid, False, "55P03", "lock timeout"))
            else:
                node.prepared.add(gid)
                self.run(node, node.part.applied(gid, True))
        elif gid in node.prepared:   # COMMIT/ROLLBACK PREPARED of a gid prepared here
            commit = kind == "commit"
            self._finish(node, gid, commit)
            self.run(node, node.part.finished(gid, commit, prepared_here=True))
        return True

    def deliver(self, faults: bool) -> None:
        i = self.rng.randrange(len(self.net))
        to, msg = self.net.pop(i)
        node = self.nodes[to]
        if not node.up or (faults and self.rng.random() < self.drop):
            return
        if faults and self.rng.random() < self.dup:
            self.net.append((to, msg))
        if not node.part.knows(msg.gid) and msg.__class__.__name__ in (
                "VoteRequest", "Precommit", "Decision"):
            # the shell asks the database (node.py _protocol)
            node.part.recovered(msg.gid, msg.gid in node.prepared, msg.gid in node.committed)
        self.run(node, node.coord.receive(msg, self.now))
        self.run(node, node.part.receive(msg))

    def crash(self, node: Node) -> None:
        node.up = False
        node.incarnation += 1
        for gid, t in node.coord.txns.items():
            if not t.answered:
                self.lost_clients.add(gid)
        # each durable write in flight is lost, or lands (now, or later: a
        # backend of the dead process may still be running it)
        self.writes = [w for w in self.writes if w[0] != node.id or self.rng.random() < 0.5]
        node.coord = self._coord(node.id)
        node.part = Participant(node.id, self.gen)
        node.cursors = dict(node.confirmed)      # streams resume from the slots

    def restart(self, node: Node) -> None:
        node.up = True
        for gid in sorted(node.prepared):
            if gid.startswith(f"MTM-{node.id}-"):
                self.run(node, node.coord.recover(gid, node.records.get(gid), self.now))

    def step(self, faults: bool, new_txns: bool) -> bool:
        """One event; returns False when nothing was left to do."""
        self.now += self.rng.randint(1, 20)
        up = [n for n in self.nodes.values() if n.up]
        down = [n for n in self.nodes.values() if not n.up]
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
        if faults and self.crashes and len(down) == 0:
            # Crashes are most telling mid-commit: a coordinator collecting
            # precommits, or with durable writes in flight.
            hot = [n for n in up if any(t.state == "precommitting" for t in n.coord.txns.values())
                   or any(w[0] == n.id for w in self.writes)]
            if (hot and self.rng.random() < 0.08) or self.rng.random() < 0.01:
                choices.append("crash")
        if down and (not faults or self.rng.random() < 0.05):
            choices.append("restart")
        choices.append("tick")
        what = self.rng.choice(choices)
        if what == "commit":
            self.client_commit(self.rng.choice(up))
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
            self.complete_write(self.rng.randrange(len(self.writes)))
        elif what == "crash":
            hot = [n for n in up if n.coord.txns or any(w[0] == n.id for w in self.writes)]
            self.crash(self.rng.choice(hot or up))
        elif what == "restart":
            self.restart(self.rng.choice(down))
        for node in self.nodes.values():
            if node.up:
                self.run(node, node.coord.tick(self.now))
        self.check()
        return bool(self.net or self.lagging() or self.pending() or self.writes or down
                    or any(n.prepared for n in self.nodes.values()))

    def lagging(self) -> list:
        return [(n, o) for n in self.nodes.values() if n.up for o in n.cursors
                if n.cursors[o] < len(self.nodes[o].wal)]

    def pending(self) -> set[str]:
        return self.started - set(self.replies) - self.lost_clients

    # -- invariants ------------------------------------------------------------------------

    def check(self, everything: bool = False) -> None:
        """The invariants, for the gids whose state changed (all of them
        with ``everything``)."""
        gids = set(self.started) if everything else self.dirty
        self.dirty = set()
        nodes = list(self.nodes.values())
        for gid in gids:
            committed_on = [n.id for n in nodes if gid in n.committed]
            rolled_back = any(gid in n.rolled_back for n in nodes)
            if committed_on and rolled_back:
                raise SimFailure(f"seed {self.seed}: {gid} committed on one node, rolled back "
                                 f"on another")
            holders = sum(n.records.get(gid) == "p" for n in nodes)
            if committed_on:
                need = self.majority if self.commit_basis.get(gid) == "majority" else 1
                if holders < need:
                    raise SimFailure(f"seed {self.seed}: {gid} committed with {holders} "
                                     f"precommits ({self.commit_basis.get(gid)})")
            # Paxos Commit's safety (GENERATIONS.md 5): once a majority holds
            # a precommit record the outcome is commit; an abort is decided
            # only when that can no longer happen (a fenced majority).
            if rolled_back and holders >= self.majority:
                raise SimFailure(f"seed {self.seed}: {gid} rolled back with precommit "
                                 f"records on {holders} nodes")
            r = self.replies.get(gid)
            if r is None:
                continue
            if r.committed:
                if self.wait_peer_commits and not r.warning and len(committed_on) != len(nodes):
                    raise SimFailure(f"seed {self.seed}: {gid} reported committed, on "
                                     f"{committed_on} only")
                if not committed_on:
                    raise SimFailure(f"seed {self.seed}: {gid} reported committed, nowhere")
            elif committed_on and r.sqlstate != STATEMENT_COMPLETION_UNKNOWN:
                raise SimFailure(f"seed {self.seed}: {gid} reported aborted but committed")
        for n in nodes:
            n.coord.check_invariants()

    def run_schedule(self, safety_steps: int = 400, liveness_steps: int = 40000) -> dict:
        for _ in range(safety_steps):
            self.step(faults=True, new_txns=self.rng.random() < 0.3)
        for _ in range(liveness_steps):
            if not self.step(faults=False, new_txns=False):
                break
        else:
            raise SimFailure(f"seed {self.seed}: no progress after the faults stopped: "
                             f"{sorted(self.pending())} unanswered, prepared "
                             f"{ {n.id: sorted(n.prepared) for n in self.nodes.values()} }")
        self.check(everything=True)
        committed = set().union(*(n.committed for n in self.nodes.values()))
        for n in self.nodes.values():
            missing = committed - n.committed
            if missing:
                raise SimFailure(f"seed {self.seed}: node {n.id} lacks committed "
                                 f"transactions {sorted(missing)}")
        outcomes = [r.committed for r in self.replies.values()]
        return {"transactions": len(outcomes), "committed": sum(outcomes),
                "crashed_clients": len(self.lost_clients),
                "recovered_commits": sum(v == "recovery" for v in self.commit_basis.values())}


def _main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--seeds":
        n = int(sys.argv[2])
        total: dict = {}
        for seed in range(n):
            for k, v in Sim(seed).run_schedule().items():
                total[k] = total.get(k, 0) + v
        print(total)
        return
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    print(Sim(seed).run_schedule())


if __name__ == "__main__":
    _main()
