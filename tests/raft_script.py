"""Golden interaction scripts for the Raft core (etcd-raft's testdata/*.txt).

A script is a sequence of blocks::

    # comments and blank lines between blocks are kept
    command arg arg key=(1,2)
    ----
    expected output (no blank lines; "ok" when there is none)

``run_script(path)`` runs every command on a fresh ``Cluster`` and returns
the blocks with their actual output; ``REWRITE=1`` makes the test write the
actual output back into the file (read the diff before committing it).

Commands (ids are node ids):

- ``add-nodes N voters=(1,2,3) [learners=(4)] [pre-vote=false]
  [check-quorum=false] [election=10] [heartbeat=2] [max-entries=64]
  [max-inflight=32]``: N new nodes with the next free ids, each bootstrapped
  with that configuration and an empty MemoryStorage.
- ``campaign ID``, ``propose ID DATA``, ``transfer-leadership FROM TO``
- ``conf-change ID add-voter|add-learner|remove NODE``: a new NODE is
  created (bootstrapped like the others) when it is first named.
- ``tick ID [N]``, ``tick-heartbeat ID``, ``tick-election ID`` (N ticks,
  heartbeat_ticks ticks, election_ticks ticks)
- ``process-ready [IDS]``: save, send, apply, advance (all nodes if none)
- ``deliver-msgs [IDS] [drop=(IDS)]``: deliver the messages in flight to
  IDS (all if none), in order, and drop those to the nodes in ``drop``
- ``stabilize``: process-ready and deliver-msgs until nothing is left
- ``partition 1 | 2 3``: messages between the groups are dropped at
  delivery; ``heal`` ends it
- ``crash ID``: the node loses everything not saved; messages to it are
  dropped until ``restart ID`` rebuilds it from its storage
- ``compact ID INDEX``: the application snapshots its state at INDEX
- ``status [IDS]``, ``log ID``: print state
"""
from __future__ import annotations

import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from consensus.raft import (ConfChange, ConfChangeType, EntryType, Message, RaftError,  # noqa: E402
                            RaftNode, Ready, Role, decode_conf_change, format_entry,
                            format_message)
from consensus.storage import MemoryStorage  # noqa: E402


@dataclass
class Harness:
    id: int
    storage: MemoryStorage
    opts: dict
    core: RaftNode | None = None
    applied: list[tuple[int, int, bytes]] = field(default_factory=list)  # (index, term, data)
    state_data: bytes = b""       # the application's state: the data applied, joined


def _ids(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def _fmt_ids(ids) -> str:
    return "(" + ",".join(str(i) for i in sorted(ids)) + ")"


def _fmt_event(node: int, event: str, fields: dict) -> str:
    parts = []
    for k, v in fields.items():
        if k == "node":
            continue
        if isinstance(v, (list, tuple, set, frozenset)):
            v = _fmt_ids(v)
        parts.append(f"{k}={v}")
    return f"  {node}: {event} " + " ".join(parts)


class Cluster:
    """Nodes, their storages and a network of messages in flight, driven by
    explicit commands; everything it does is printed to ``out``."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes: dict[int, Harness] = {}
        self.net: list[Message] = []
        self.blocked: set[tuple[int, int]] = set()
        self.out: list[str] = []
        self.seed = seed
        self.bootstrap: tuple[frozenset[int], frozenset[int]] | None = None

    # -- nodes -----------------------------------------------------------------------------

    def add_node(self, nid: int, opts: dict) -> Harness:
        h = Harness(nid, MemoryStorage(), opts)
        self.nodes[nid] = h
        self._start(h)
        return h

    def _start(self, h: Harness) -> None:
        voters, learners = self.bootstrap
        state = h.storage.load()
        o = h.opts
        h.core = RaftNode(h.id, voters=voters, learners=learners, state=state,
                          rng=random.Random(self.seed * 1000 + h.id),
                          election_ticks=o.get("election", 10),
                          heartbeat_ticks=o.get("heartbeat", 2),
                          pre_vote=o.get("pre-vote", True),
                          check_quorum=o.get("check-quorum", True),
                          max_entries_per_msg=o.get("max-entries", 64),
                          max_inflight_msgs=o.get("max-inflight", 32),
                          log=lambda ev, f, nid=h.id: self.out.append(_fmt_event(nid, ev, f)))
        snap = state.snapshot
        h.applied = []
        h.state_data = snap.data if snap else b""

    def core(self, nid: int) -> RaftNode:
        h = self.nodes[nid]
        if h.core is None:
            raise RuntimeError(f"node {nid} is crashed")
        return h.core

    # -- the loop ---------------------------------------------------------------------------

    def process_ready(self, nid: int) -> bool:
        h = self.nodes[nid]
        if h.core is None or not h.core.has_ready():
            return False
        rd = h.core.ready()
        self.out.append(f"> {nid} handling Ready")
        self._print_ready(rd)
        h.storage.save(rd)
        self.net.extend(rd.messages)
        if rd.snapshot is not None:
            h.state_data = rd.snapshot.data
        for e in rd.committed_entries:
            h.applied.append((e.index, e.term, e.data))
            if e.type is EntryType.CONF_CHANGE:
                h.core.apply_conf_change(decode_conf_change(e.data))
            elif e.data:
                h.state_data += e.data + b";"
        h.core.advance(rd)
        return True

    def _print_ready(self, rd: Ready) -> None:
        if rd.soft_state is not None:
            self.out.append(f"  soft: {rd.soft_state.role.value} leader={rd.soft_state.leader}")
        if rd.hard_state is not None:
            hs = rd.hard_state
            self.out.append(f"  hard: term={hs.term} vote={hs.vote} commit={hs.commit}")
        if rd.snapshot is not None:
            s = rd.snapshot
            self.out.append(f"  snapshot: {s.index}/{s.term} voters={_fmt_ids(s.voters)} "
                            f"learners={_fmt_ids(s.learners)} data={s.data!r}")
        if rd.entries:
            self.out.append("  save: " + ", ".join(format_entry(e) for e in rd.entries))
        if rd.committed_entries:
            self.out.append("  apply: " + ", ".join(format_entry(e)
                                                    for e in rd.committed_entries))
        for m in rd.messages:
            self.out.append("  send: " + format_message(m))

    def deliver(self, to: set[int] | None = None, drop: set[int] = frozenset()) -> bool:
        keep, todo = [], []
        for m in self.net:
            (todo if to is None or m.to in to or m.to in drop else keep).append(m)
        self.net = keep
        for m in todo:
            h = self.nodes.get(m.to)
            if m.to in drop:
                self.out.append(f"  dropped: {format_message(m)}")
            elif (m.frm, m.to) in self.blocked:
                self.out.append(f"  dropped (partition): {format_message(m)}")
            elif h is None or h.core is None:
                self.out.append(f"  dropped (node down): {format_message(m)}")
            else:
                self.out.append(f"> {m.to} receiving {format_message(m)}")
                h.core.step(m)
        return bool(todo)

    def stabilize(self) -> None:
        for _ in range(1000):
            busy = False
            for nid in sorted(self.nodes):
                busy |= self.process_ready(nid)
            busy |= self.deliver()
            if not busy:
                return
        raise RuntimeError("stabilize: no fixpoint after 1000 rounds")

    def tick(self, nid: int, n: int) -> None:
        for _ in range(n):
            self.core(nid).tick()

    # -- commands -----------------------------------------------------------------------------

    def run(self, line: str) -> str:
        self.out = []
        cmd, _, rest = line.strip().partition(" ")
        try:
            getattr(self, "cmd_" + cmd.replace("-", "_"))(rest.strip())
        except (RaftError, ValueError, RuntimeError) as e:
            self.out.append(f"error: {type(e).__name__}: {e}")
        return "\n".join(self.out) if self.out else "ok"

    def cmd_add_nodes(self, rest: str) -> None:
        n = int(rest.split()[0])
        opts: dict = {}
        for k, v in re.findall(r"([\w-]+)=(\([^)]*\)|\S+)", rest):
            if v.startswith("("):
                opts[k] = _ids(v)
            elif v in ("true", "false"):
                opts[k] = v == "true"
            else:
                opts[k] = int(v)
        self.bootstrap = (frozenset(opts.pop("voters")), frozenset(opts.pop("learners", ())))
        self.opts = opts
        start = max(self.nodes, default=0) + 1
        for nid in range(start, start + n):
            self.add_node(nid, opts)
        self.cmd_status("")

    def cmd_campaign(self, rest: str) -> None:
        self.core(int(rest)).campaign()

    def cmd_propose(self, rest: str) -> None:
        nid, data = rest.split(maxsplit=1)
        index = self.core(int(nid)).propose(data.encode())
        self.out.append(f"index {index}")

    def cmd_conf_change(self, rest: str) -> None:
        nid, kind, node = rest.split()
        typ = {"add-voter": ConfChangeType.ADD_VOTER, "add-learner": ConfChangeType.ADD_LEARNER,
               "remove": ConfChangeType.REMOVE}[kind]
        index = self.core(int(nid)).propose_conf_change(ConfChange(typ, int(node)))
        self.out.append(f"index {index}")
        if int(node) not in self.nodes:
            self.add_node(int(node), self.opts)
            self.out.append(f"created node {node}")

    def cmd_transfer_leadership(self, rest: str) -> None:
        frm, to = _ids(rest)
        self.core(frm).transfer_leadership(to)

    def cmd_tick(self, rest: str) -> None:
        ids = _ids(rest)
        self.tick(ids[0], ids[1] if len(ids) > 1 else 1)

    def cmd_tick_heartbeat(self, rest: str) -> None:
        nid = int(rest)
        self.tick(nid, self.core(nid)._heartbeat_ticks)

    def cmd_tick_election(self, rest: str) -> None:
        nid = int(rest)
        self.tick(nid, self.core(nid)._election_ticks)

    def cmd_process_ready(self, rest: str) -> None:
        for nid in _ids(rest) or sorted(self.nodes):
            self.process_ready(nid)

    def cmd_deliver_msgs(self, rest: str) -> None:
        drop = set()
        m = re.search(r"drop=\(([^)]*)\)", rest)
        if m:
            drop = set(_ids(m.group(1)))
            rest = rest[:m.start()] + rest[m.end():]
        to = set(_ids(rest)) or None
        self.deliver(to, drop)

    def cmd_stabilize(self, rest: str) -> None:
        self.stabilize()

    def cmd_partition(self, rest: str) -> None:
        groups = [set(_ids(g)) for g in rest.split("|")]
        self.blocked = {(a, b) for g in groups for h in groups if g is not h
                        for a in g for b in h}

    def cmd_heal(self, rest: str) -> None:
        self.blocked = set()

    def cmd_crash(self, rest: str) -> None:
        self.nodes[int(rest)].core = None

    def cmd_restart(self, rest: str) -> None:
        h = self.nodes[int(rest)]
        self._start(h)
        self.cmd_status(rest)

    def cmd_compact(self, rest: str) -> None:
        nid, index = _ids(rest)
        h = self.nodes[nid]
        # The application's state at `index` is what it applied up to there;
        # the script knows it at its applied index only (the core refuses
        # any index beyond that).
        core = self.core(nid)
        if index < core.applied:
            raise ValueError("the script compacts at the applied index only")
        snap = core.compact(index, h.state_data)
        h.storage.compact(snap)
        self.out.append(f"snapshot {snap.index}/{snap.term} voters={_fmt_ids(snap.voters)} "
                        f"learners={_fmt_ids(snap.learners)}")

    def cmd_status(self, rest: str) -> None:
        for nid in _ids(rest) or sorted(self.nodes):
            h = self.nodes[nid]
            if h.core is None:
                self.out.append(f"{nid}: crashed")
                continue
            c = h.core
            self.out.append(f"{nid}: {c.role.value} term={c.term} vote={c.vote} "
                            f"leader={c.leader} commit={c.commit} applied={c.applied} "
                            f"last={c.last_index} snapshot={c.snapshot_index} "
                            f"voters={_fmt_ids(c.voters)} learners={_fmt_ids(c.learners)}")
            if c.role is Role.LEADER:
                for pid, p in c.progress.items():
                    if pid != nid:
                        self.out.append(f"  {pid}: match={p.match} next={p.next} "
                                        f"{p.state.value}" + (" paused" if p.paused else "")
                                        + (" learner" if p.is_learner else ""))

    def cmd_log(self, rest: str) -> None:
        c = self.core(int(rest))
        ents = c.entries(c.first_index, c.last_index + 1)
        self.out.append(f"snapshot {c.snapshot_index}/{c.term_at(c.snapshot_index)}; "
                        + (", ".join(format_entry(e) for e in ents) if ents else "no entries"))


# -- the file format --------------------------------------------------------------------------

@dataclass
class Block:
    prefix: list[str]       # comment and blank lines before the command
    command: str
    expected: str
    actual: str = ""


def parse(text: str) -> tuple[list[Block], list[str]]:
    lines = text.splitlines()
    blocks, prefix, i = [], [], 0
    while i < len(lines):
        line = lines[i]
        if not line.strip() or line.startswith("#"):
            prefix.append(line)
            i += 1
            continue
        if i + 1 >= len(lines) or lines[i + 1] != "----":
            raise ValueError(f"line {i + 1}: a command must be followed by ----")
        j = i + 2
        out = []
        while j < len(lines) and lines[j].strip():
            out.append(lines[j])
            j += 1
        blocks.append(Block(prefix, line, "\n".join(out)))
        prefix = []
        i = j
    return blocks, prefix


def render(blocks: list[Block], trailer: list[str]) -> str:
    out = []
    for b in blocks:
        out += b.prefix + [b.command, "----", b.actual]
    out += trailer
    return "\n".join(out).rstrip("\n") + "\n"


def run_script(path: Path) -> tuple[list[Block], list[str]]:
    blocks, trailer = parse(path.read_text())
    cluster = Cluster()
    for b in blocks:
        b.actual = cluster.run(b.command)
    return blocks, trailer


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        blocks, _ = run_script(Path(arg))
        for b in blocks:
            print(b.command)
            print("----")
            print(b.actual)
            print()
