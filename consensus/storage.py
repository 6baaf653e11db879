"""Durable storage for the Raft core: what a node must remember across a crash.

What this module owns: the hard state (term, vote, commit), the log of
entries after the last snapshot, and the snapshot, for one node; plus an
in-memory storage with the same interface for the simulator. No asyncio:
the caller runs ``save`` between ``ready()`` and sending the Ready's
messages (persist before send).

Rules it keeps (the crash story, in more words, is in README.md here):

- ``save(ready)`` writes the snapshot, then the entries, then the hard state,
  each durable before the next starts. The hard state's commit may then
  only refer to durable entries, and a snapshot is durable before the log
  it replaces is cut.
- Whatever ``save`` leaves behind when it is interrupted, ``load`` returns
  a consistent state: the log reconciled with the snapshot (``reconcile``),
  a torn or corrupt log tail dropped.
- ``FileStorage`` layout, one directory per node: ``hardstate`` and
  ``snapshot`` are replaced whole (tmp file, fsync, rename, fsync the
  directory); ``log`` is an append-only file of length-prefixed,
  CRC32-checked records, fsynced after each batch. Replacing a suffix cuts
  the file at that record's boundary and fsyncs the cut before appending,
  so old and new records never mix after a crash. At load the first record
  that is torn, fails its CRC or does not follow its predecessor ends the
  log: it and everything after it are dropped (and cut from the file). A
  torn tail is an unacknowledged append and dropping it is safe; a bad
  record in the middle means the disk lost acknowledged data, which Raft
  does not tolerate - it is dropped all the same, so the node comes back
  shorter rather than not at all.
- ``compact(snapshot)`` writes the snapshot, then rewrites the log without
  the entries it covers (tmp, fsync, rename).
- A save that changes nothing (a Ready with only messages, e.g. heartbeats)
  writes nothing.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from consensus.raft import (DecodeError, Entry, EntryType, HardState, Ready, RestoredState,
                            Snapshot, decode_snapshot, encode_snapshot)


class StorageError(Exception):
    """The stored state is inconsistent beyond what a crash can explain."""


def reconcile(hard_state: HardState, snapshot: Snapshot | None,
              entries: list[Entry]) -> tuple[RestoredState, bool]:
    """The state to restore from what is on disk, and whether the log had to
    change to get there. ``entries`` are consecutive (the log's own check).

    Entries the snapshot covers are dropped. If the log holds the snapshot's
    index with another term, it is a log the snapshot replaced (a crash after
    the snapshot of an install was written, before the log was cut): all of
    it goes. The hard state is returned as stored; the core derives its term
    from it and the log (see RaftNode.__init__).
    """
    kept = entries
    if snapshot is not None and entries:
        s = snapshot.index
        first = entries[0].index
        if first > s + 1:
            raise StorageError(f"log starts at {first}, after snapshot {s} + 1: entries lost")
        if first <= s:
            at = entries[s - first] if s - first < len(entries) else None
            kept = entries[s - first + 1:] if at is not None and at.term == snapshot.term else []
    elif snapshot is None and entries and entries[0].index != 1:
        raise StorageError(f"log starts at {entries[0].index} without a snapshot")
    last = kept[-1].index if kept else (snapshot.index if snapshot else 0)
    commit = max(hard_state.commit, snapshot.index if snapshot else 0)
    if commit > last:
        raise StorageError(f"commit {commit} is beyond the log's last index {last}: "
                           "committed entries were lost")
    return RestoredState(hard_state, snapshot, tuple(kept)), len(kept) != len(entries)


class _Storage:
    """The order of ``save`` and ``compact``, shared by both storages; the
    subclasses provide the durable steps."""

    def save(self, ready: Ready) -> None:
        """Make ``ready``'s snapshot, entries and hard state durable, in that
        order. A Ready without them writes nothing."""
        if ready.snapshot is not None:
            self._install_snapshot(ready.snapshot)
        if ready.entries:
            self._append(ready.entries)
        if ready.hard_state is not None:
            self._write_hard_state(ready.hard_state)

    def compact(self, snapshot: Snapshot) -> None:
        """Record a snapshot the application made (``RaftNode.compact``) and
        drop the entries it covers."""
        self._write_snapshot(snapshot)
        self._drop_prefix(snapshot.index)

    def _install_snapshot(self, snapshot: Snapshot) -> None:
        """A snapshot from the leader replaces the whole log: write it, then cut the log."""
        self._write_snapshot(snapshot)
        self._reset_log(snapshot.index)

    # the durable steps
    def _write_snapshot(self, snapshot: Snapshot) -> None:
        raise NotImplementedError

    def _reset_log(self, snapshot_index: int) -> None:
        raise NotImplementedError

    def _append(self, entries: tuple[Entry, ...]) -> None:
        raise NotImplementedError

    def _write_hard_state(self, hs: HardState) -> None:
        raise NotImplementedError

    def _drop_prefix(self, index: int) -> None:
        raise NotImplementedError


class MemoryStorage(_Storage):
    """Storage in memory with FileStorage's semantics, for the simulator and
    tests: what ``save`` stored survives a simulated crash, nothing else does.
    Each durable step is one method, so a simulator can cut ``save`` between
    them."""

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []

    def load(self) -> RestoredState:
        state, changed = reconcile(self.hard_state, self.snapshot, self.entries)
        if changed:
            self.entries = list(state.entries)
        return state

    def _write_snapshot(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def _reset_log(self, snapshot_index: int) -> None:
        self.entries = []

    def _append(self, entries: tuple[Entry, ...]) -> None:
        first = entries[0].index
        start = self.entries[0].index if self.entries else self._next_index()
        if first > self._next_index() or first < start:
            raise StorageError(f"entries from {first} do not fit the log [{start}, "
                               f"{self._next_index()})")
        del self.entries[first - start:]
        self.entries.extend(entries)

    def _next_index(self) -> int:
        if self.entries:
            return self.entries[-1].index + 1
        return (self.snapshot.index if self.snapshot else 0) + 1

    def _write_hard_state(self, hs: HardState) -> None:
        self.hard_state = hs

    def _drop_prefix(self, index: int) -> None:
        self.entries = [e for e in self.entries if e.index > index]


# -- files ---------------------------------------------------------------------------------------
#
# hardstate: b"MMRHS\0\0\1" | term u64 | vote u64 | commit u64 | crc32 u32 (big-endian)
# snapshot:  b"MMRSN\0\0\1" | length u32 | crc32 u32 | encode_snapshot() bytes
# log:       b"MMRLG\0\0\1" | records...
#   record:  length u32 | crc32 u32 (of the payload) | payload
#   payload: index u64 | term u64 | type u8 | data

HS_MAGIC = b"MMRHS\0\0\1"
SNAP_MAGIC = b"MMRSN\0\0\1"
LOG_MAGIC = b"MMRLG\0\0\1"
_HS = struct.Struct(">QQQ")
_REC = struct.Struct(">II")
_PAYLOAD = struct.Struct(">QQB")
_MAX_RECORD_BYTES = 1 << 30     # a longer length field is garbage (a torn header)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _atomic_write(path: Path, data: bytes) -> None:
    """tmp file, fsync, rename over ``path``, fsync the directory: after a
    crash the file is either the old one or the new one, whole."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _record(e: Entry) -> bytes:
    payload = _PAYLOAD.pack(e.index, e.term, int(e.type)) + e.data
    return _REC.pack(len(payload), zlib.crc32(payload)) + payload


class FileStorage(_Storage):
    """One node's Raft state in a directory (see the module docstring).
    ``load()`` first, then ``save``/``compact``; ``close()`` at the end."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self._fd: int | None = None
        self._first_index = 1        # index of the log's first record (or where it will go)
        self._offsets: list[int] = []  # file offset of each record, from _first_index on
        self._end = len(LOG_MAGIC)    # offset after the last good record

    @property
    def _hs_path(self) -> Path:
        return self.dir / "hardstate"

    @property
    def _snap_path(self) -> Path:
        return self.dir / "snapshot"

    @property
    def _log_path(self) -> Path:
        return self.dir / "log"

    # -- load -------------------------------------------------------------------------------

    def load(self) -> RestoredState:
        """Read the directory (creating it on first use), drop a torn log
        tail, reconcile the log with the snapshot; returns what to restore."""
        self.close()
        self.dir.mkdir(parents=True, exist_ok=True)
        for leftover in (self._hs_path, self._snap_path, self._log_path):
            tmp = leftover.with_name(leftover.name + ".tmp")
            if tmp.exists():
                tmp.unlink()    # an unfinished replace: the file it was to replace stands
        hs = self._read_hard_state()
        snap = self._read_snapshot()
        if not self._log_path.exists():
            self._create_log()
        entries, offsets, end = self._scan_log()
        self._fd = os.open(self._log_path, os.O_RDWR)
        if end < os.fstat(self._fd).st_size:
            os.ftruncate(self._fd, end)     # the torn or corrupt tail (module docstring)
            os.fsync(self._fd)
        state, changed = reconcile(hs, snap, entries)
        if changed:
            self._rewrite_log(state.entries, snap.index + 1 if snap else 1)
        else:
            self._first_index = entries[0].index if entries else \
                (snap.index + 1 if snap else 1)
            self._offsets, self._end = offsets, end
        return state

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _read_hard_state(self) -> HardState:
        try:
            data = self._hs_path.read_bytes()
        except FileNotFoundError:
            return HardState()
        body = len(HS_MAGIC) + _HS.size
        if len(data) != body + 4 or not data.startswith(HS_MAGIC) or \
                zlib.crc32(data[:body]) != struct.unpack(">I", data[body:])[0]:
            raise StorageError(f"{self._hs_path}: corrupt hard state")
        return HardState(*_HS.unpack_from(data, len(HS_MAGIC)))

    def _read_snapshot(self) -> Snapshot | None:
        try:
            data = self._snap_path.read_bytes()
        except FileNotFoundError:
            return None
        head = len(SNAP_MAGIC) + 8
        if len(data) < head or not data.startswith(SNAP_MAGIC):
            raise StorageError(f"{self._snap_path}: not a snapshot file")
        length, crc = struct.unpack_from(">II", data, len(SNAP_MAGIC))
        body = data[head:]
        if len(body) != length or zlib.crc32(body) != crc:
            raise StorageError(f"{self._snap_path}: corrupt snapshot")
        try:
            return decode_snapshot(body)
        except DecodeError as e:
            raise StorageError(f"{self._snap_path}: {e}") from e

    def _create_log(self) -> None:
        tmp = self._log_path.with_name("log.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, LOG_MAGIC, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._log_path)
        _fsync_dir(self.dir)

    def _scan_log(self) -> tuple[list[Entry], list[int], int]:
        data = self._log_path.read_bytes()
        if not data.startswith(LOG_MAGIC):
            raise StorageError(f"{self._log_path}: not a log file")
        entries: list[Entry] = []
        offsets: list[int] = []
        pos = len(LOG_MAGIC)
        while pos + _REC.size <= len(data):
            length, crc = _REC.unpack_from(data, pos)
            start = pos + _REC.size
            if length < _PAYLOAD.size or length > _MAX_RECORD_BYTES or \
                    start + length > len(data):
                break                       # torn: the header or payload did not make it
            payload = data[start:start + length]
            if zlib.crc32(payload) != crc:
                break
            index, term, etype = _PAYLOAD.unpack_from(payload)
            if etype not in EntryType._value2member_map_:
                break
            if entries and (index != entries[-1].index + 1 or term < entries[-1].term):
                break                       # does not follow: not part of this log
            entries.append(Entry(index, term, EntryType(etype), payload[_PAYLOAD.size:]))
            offsets.append(pos)
            pos = start + length
        return entries, offsets, pos

    # -- durable steps ------------------------------------------------------------------------

    def _write_hard_state(self, hs: HardState) -> None:
        body = HS_MAGIC + _HS.pack(hs.term, hs.vote, hs.commit)
        _atomic_write(self._hs_path, body + struct.pack(">I", zlib.crc32(body)))

    def _write_snapshot(self, snapshot: Snapshot) -> None:
        body = encode_snapshot(snapshot)
        _atomic_write(self._snap_path,
                      SNAP_MAGIC + struct.pack(">II", len(body), zlib.crc32(body)) + body)

    def _reset_log(self, snapshot_index: int) -> None:
        self._cut(len(LOG_MAGIC))
        self._offsets = []
        self._first_index = snapshot_index + 1

    def _cut(self, offset: int) -> None:
        # The cut is durable before anything is appended after it: otherwise a
        # crash could leave new records followed by old ones that happen to
        # chain, a log that never existed.
        assert self._fd is not None, "load() first"
        os.ftruncate(self._fd, offset)
        os.fsync(self._fd)
        self._end = offset

    def _append(self, entries: tuple[Entry, ...]) -> None:
        assert self._fd is not None, "load() first"
        first = entries[0].index
        nxt = self._first_index + len(self._offsets)
        if first > nxt or first < self._first_index:
            raise StorageError(f"entries from {first} do not fit the log "
                               f"[{self._first_index}, {nxt})")
        if first < nxt:
            i = first - self._first_index
            self._cut(self._offsets[i])
            del self._offsets[i:]
        buf = bytearray()
        for e in entries:
            self._offsets.append(self._end + len(buf))
            buf += _record(e)
        _write_all(self._fd, bytes(buf), self._end)
        os.fsync(self._fd)
        self._end += len(buf)

    def _drop_prefix(self, index: int) -> None:
        assert self._fd is not None, "load() first"
        keep = max(index + 1 - self._first_index, 0)
        if keep == 0:
            return
        if keep >= len(self._offsets):
            tail = b""
        else:
            start = self._offsets[keep]
            tail = os.pread(self._fd, self._end - start, start)
        entries_after = len(self._offsets) - min(keep, len(self._offsets))
        tmp = self._log_path.with_name("log.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, LOG_MAGIC + tail, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._log_path)
        _fsync_dir(self.dir)
        os.close(self._fd)
        self._fd = os.open(self._log_path, os.O_RDWR)
        shift = (self._offsets[keep] - len(LOG_MAGIC)) if entries_after else 0
        self._offsets = [o - shift for o in self._offsets[keep:]]
        self._first_index = index + 1
        self._end = len(LOG_MAGIC) + len(tail)

    def _rewrite_log(self, entries: tuple[Entry, ...], first_index: int) -> None:
        """Replace the log file with ``entries`` (tmp, fsync, rename); an empty
        log continues at ``first_index``."""
        buf = bytearray(LOG_MAGIC)
        offsets = []
        for e in entries:
            offsets.append(len(buf))
            buf += _record(e)
        tmp = self._log_path.with_name("log.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, bytes(buf), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._log_path)
        _fsync_dir(self.dir)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self._log_path, os.O_RDWR)
        self._first_index = entries[0].index if entries else first_index
        self._offsets, self._end = offsets, len(buf)
