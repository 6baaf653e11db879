"""Node configuration: TOML (stdlib ``tomllib``) into typed, frozen objects.

Rules kept here:
- Every key is declared below; an unknown key, a wrong type, a missing
  required value or an out-of-range value is refused with ``ConfigError``
  naming the file, the key (``[section] key``) and what is expected.
- Loading has no side effects: reading a password file or an environment
  variable happens only when ``PostgresConfig.password()`` is called.
- Durations carry their unit in the name (``*_ms``).

See docs/configuration.md for the reference, and deploy/ for examples.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ConfigError", "NodeConfig", "load_config", "parse_config", "parse_address"]

LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A configuration file that cannot be used, with a message for the DBA."""


def parse_address(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 < int(port) < 65536):
        raise ValueError(f"expected \"host:port\" with a port from 1 to 65535, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _address(v: str) -> str:
    parse_address(v)
    return v


@dataclass(frozen=True)
class NodeSection:
    id: int
    listen: str = field(metadata={"check": _address, "doc": "client address host:port"})
    internode_listen: str | None = field(
        default=None, metadata={"check": _address, "doc": "address peers connect to"})
    name: str | None = None
    # Where the consensus log of this node lives (Raft hard state, log,
    # snapshot). Default: "mmproxy-state-<id>" next to the config file.
    state_dir: str | None = None


@dataclass(frozen=True)
class PostgresConfig:
    """How the proxy reaches its local PostgreSQL server."""
    host: str = "127.0.0.1"        # host name, IP, or a unix socket directory (starts with /)
    port: int = 5432
    user: str = "postgres"
    database: str = "postgres"
    password_env: str | None = None
    password_file: str | None = None
    connect_timeout_ms: int = 5000

    def password(self) -> str | None:
        if self.password_env:
            return os.environ.get(self.password_env)
        if self.password_file:
            return Path(self.password_file).read_text().strip()
        return None

    @property
    def is_unix_socket(self) -> bool:
        return self.host.startswith("/")

    @property
    def socket_path(self) -> str:
        return os.path.join(self.host, f".s.PGSQL.{self.port}")

    def where(self) -> str:
        return self.socket_path if self.is_unix_socket else f"{self.host}:{self.port}"

    def conninfo(self) -> str:
        parts = [f"host={self.host}", f"port={self.port}", f"user={self.user}",
                 f"dbname={self.database}"]
        return " ".join(parts)


@dataclass(frozen=True)
class PeerConfig:
    id: int
    client_address: str = field(metadata={"check": _address})
    node_address: str = field(metadata={"check": _address})
    name: str | None = None


@dataclass(frozen=True)
class RefereeConfig:
    address: str = field(metadata={"check": _address})


@dataclass(frozen=True)
class TimeoutsConfig:
    shutdown_grace_ms: int = 30000
    # A client must finish its startup and authentication within this time
    # (PostgreSQL's authentication_timeout is 1 min).
    client_startup_timeout_ms: int = 60000
    # Failure detection (consensus/policy.py): every node sends a Status to
    # every peer each heartbeat_interval_ms; a peer silent for
    # heartbeat_timeout_ms is suspected and leaves the generation.
    heartbeat_interval_ms: int = 100
    heartbeat_timeout_ms: int = 500
    # A node serves clients (reads too) only within this long of a
    # heartbeat the Raft leader confirmed; read_lease_ms x 1.21 must not
    # exceed heartbeat_timeout_ms (the leader waits that out before it
    # excludes a node).
    read_lease_ms: int = 400
    # A commit aborts when a member has not voted within this time (until
    # failure detection decides membership, this is how a dead peer is seen).
    commit_vote_timeout_ms: int = 60000
    # How long an applier waits for a row lock before it gives up; the
    # transaction it applies then aborts with 40001 on its origin node.
    apply_lock_timeout_ms: int = 1000
    # A new session waits at most this long for the node to be ready (its
    # replication starting, or its local PostgreSQL being recovered), then
    # gets FATAL 57P03.
    client_ready_wait_ms: int = 10000


@dataclass(frozen=True)
class LogConfig:
    level: str = field(default="info", metadata={"choices": LOG_LEVELS})
    file: str | None = None        # default: standard error


@dataclass(frozen=True)
class TLSConfig:
    cert_file: str
    key_file: str


@dataclass(frozen=True)
class LimitsConfig:
    max_client_connections: int = 10000
    # Per direction: above this many bytes queued towards a slow peer, the
    # proxy stops reading from the other side until it drains (backpressure).
    write_buffer_high_bytes: int = 256 * 1024
    write_buffer_low_bytes: int = 64 * 1024
    # Appliers per peer: transactions of one peer that were prepared there
    # at the same time are applied side by side (replication/node.py).
    apply_workers: int = 4
    # WAL this node keeps for a peer that is away (PostgreSQL's
    # max_slot_wal_keep_size, set by the proxy; 0: unbounded). A peer away
    # for longer cannot catch up and must be copied again
    # (docs/generations.md, "A node that was away too long").
    absent_node_wal_limit_mb: int = 4096


@dataclass(frozen=True)
class NodeConfig:
    node: NodeSection
    postgres: PostgresConfig = PostgresConfig()
    peers: tuple[PeerConfig, ...] = ()
    referee: RefereeConfig | None = None
    timeouts: TimeoutsConfig = TimeoutsConfig()
    log: LogConfig = LogConfig()
    tls: TLSConfig | None = None
    limits: LimitsConfig = LimitsConfig()
    source: str = field(default="<string>", metadata={"internal": True})

    def state_path(self) -> str:
        """The consensus state directory: ``[node] state_dir``, else
        ``mmproxy-state-<id>`` next to the config file."""
        if self.node.state_dir:
            return self.node.state_dir
        base = os.path.dirname(os.path.abspath(self.source)) if os.path.exists(self.source) \
            else os.getcwd()
        return os.path.join(base, f"mmproxy-state-{self.node.id}")

    def check(self) -> None:
        ids = [self.node.id] + [p.id for p in self.peers]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"{self.source}: node ids must be unique, got {sorted(ids)}")
        if self.tls is not None:
            for key in ("cert_file", "key_file"):
                path = getattr(self.tls, key)
                if not os.path.exists(path):
                    raise ConfigError(f"{self.source}: [tls] {key}: file {path!r} does not exist")
        t = self.timeouts
        try:
            from consensus.policy import PolicyConfig
            PolicyConfig.from_timeouts(t.heartbeat_interval_ms, t.heartbeat_timeout_ms,
                                       t.read_lease_ms)
        except ValueError as e:
            raise ConfigError(f"{self.source}: [timeouts] heartbeat_interval_ms, "
                              f"heartbeat_timeout_ms, read_lease_ms: {e}") from None
        if self.limits.apply_workers > 64:
            raise ConfigError(f"{self.source}: [limits] apply_workers: expected at most 64, "
                              f"got {self.limits.apply_workers}")
        if self.limits.write_buffer_low_bytes > self.limits.write_buffer_high_bytes:
            raise ConfigError(f"{self.source}: [limits] write_buffer_low_bytes must not exceed "
                              "write_buffer_high_bytes")


_POSITIVE = {"id", "port", "connect_timeout_ms", "shutdown_grace_ms", "heartbeat_interval_ms",
             "heartbeat_timeout_ms", "max_client_connections", "client_startup_timeout_ms",
             "commit_vote_timeout_ms", "apply_lock_timeout_ms", "client_ready_wait_ms", "read_lease_ms",
             "write_buffer_high_bytes", "write_buffer_low_bytes", "apply_workers"}
_NON_NEGATIVE = {"absent_node_wal_limit_mb"}

def _describe(v: object) -> str:
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "an array"
    kind = {bool: "a boolean", int: "an integer", str: "a string", float: "a number"}.get(
        type(v), type(v).__name__)
    return f"{kind} ({v!r})"


def _build(cls, table: object, section: str, src: str):
    """Build dataclass ``cls`` from a TOML table shown to users as
    ``section`` ("" for the file's top level, "[postgres]", "[[peers]] #2")."""
    where = section or "top level"
    if not isinstance(table, dict):
        raise ConfigError(f"{src}: {where}: expected a table, got {_describe(table)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"{src}: {where}: unknown key {unknown[0]!r}; known keys: "
                          f"{', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{section} {name}" if section else name
        if name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                what = f"[{name}]" if not section else key
                raise ConfigError(f"{src}: {what}: required value is missing")
            continue
        value = table[name]
        tp = hints[name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) is tuple:
            item_tp = typing.get_args(tp)[0]
            if not isinstance(value, list):
                raise ConfigError(f"{src}: [[{name}]]: expected an array of tables, "
                                  f"got {_describe(value)}")
            kwargs[name] = tuple(_build(item_tp, v, f"[[{name}]] #{i + 1}", src)
                                 for i, v in enumerate(value))
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"[{name}]", src)
        else:
            kwargs[name] = _scalar(tp, value, name, key, src, f)
    return cls(**kwargs)


def _scalar(tp, value, name: str, key: str, src: str, f):
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{src}: {key}: expected an integer, got {_describe(value)}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{src}: {key}: expected a string, got {_describe(value)}")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{src}: {key}: expected true or false, got {_describe(value)}")
    if tp is int and name in _POSITIVE and value <= 0:
        raise ConfigError(f"{src}: {key}: expected a positive integer, got {value}")
    if tp is int and name in _NON_NEGATIVE and value < 0:
        raise ConfigError(f"{src}: {key}: expected 0 or a positive integer, got {value}")
    check = f.metadata.get("check")
    if check is not None:
        try:
            check(value)
        except ValueError as e:
            raise ConfigError(f"{src}: {key}: {e}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{src}: {key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def parse_config(text: str, source: str = "<string>") -> NodeConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    cfg = dataclasses.replace(_build(NodeConfig, data, "", source), source=source)
    cfg.check()
    return cfg


def load_config(path: str | os.PathLike) -> NodeConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read configuration file: {e.strerror}") from None
    return parse_config(text, str(p))
