"""Real PostgreSQL 15 servers on this machine: initdb, start, stop, kill.

Used by ``mmproxy demo``, the test suite and the benchmarks, so that all
three start servers the same way. PostgreSQL refuses to run as root: when we
are root, every server command runs as the ``postgres`` system user (via
``runuser``) on a data directory that user owns. Servers listen on
127.0.0.1 and on a unix socket in a directory of their own.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PG_BIN_CANDIDATES = ("/usr/lib/postgresql/15/bin",)

# What every server gets: ready for logical decoding and prepared
# transactions (the replication issues build on these), quick to start.
BASE_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "wal_level": "logical",
    "max_prepared_transactions": "300",
    "max_replication_slots": "10",
    "max_wal_senders": "10",
    "wal_sender_timeout": "0",
    "max_connections": "200",
    "shared_buffers": "128MB",
    "logging_collector": "off",
    "log_min_messages": "warning",
    "password_encryption": "'scram-sha-256'",
}


class PgToolsMissing(RuntimeError):
    pass


def pg_bin_dir() -> str:
    env = os.environ.get("MMPROXY_PG_BIN")
    candidates = ([env] if env else []) + list(PG_BIN_CANDIDATES)
    for d in candidates:
        if d and os.path.exists(os.path.join(d, "postgres")):
            return d
    pg_config = shutil.which("pg_config")
    if pg_config:
        d = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
        if os.path.exists(os.path.join(d, "postgres")):
            return d
    raise PgToolsMissing(
        "PostgreSQL 15 server binaries not found (looked in "
        f"{', '.join(candidates)} and pg_config --bindir). Install them with "
        "'apt-get install postgresql-15' on Debian/Ubuntu, or set MMPROXY_PG_BIN "
        "to the directory holding initdb, pg_ctl and postgres.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_running(pid: int) -> bool:
    """Alive and not a zombie (a daemonized postmaster's zombie lingers where
    PID 1 does not reap, e.g. in containers)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _as_postgres() -> list[str]:
    """Prefix to run a command as the postgres user when we are root."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


def _chown_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)


class LocalPostgres:
    """One PostgreSQL server under ``base_dir`` (data/, sock/, log)."""

    def __init__(self, base_dir: str | os.PathLike, port: int | None = None,
                 settings: dict[str, str] | None = None,
                 hba: list[str] | None = None, fsync: bool = True):
        self.base = Path(base_dir)
        self.port = port or free_port()
        self.datadir = self.base / "data"
        self.sockdir = self.base / "sock"
        self.logfile = self.base / "postgres.log"
        self.settings = dict(BASE_SETTINGS)
        if not fsync:
            # Fast, not durable: for tests. synchronous_commit stays on:
            # logical decoding only sends flushed WAL, so asynchronous
            # commits would reach the peers late (up to wal_writer_delay).
            self.settings.update(fsync="off", full_page_writes="off")
        self.settings.update(settings or {})
        self.hba = hba
        self.bindir = pg_bin_dir()

    # -- commands ------------------------------------------------------------

    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = _as_postgres() + [os.path.join(self.bindir, args[0]), *args[1:]]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}{res.stderr}"
                               + self.log_tail())
        return res

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return ""
        return "\n--- postgres.log ---\n" + "\n".join(lines)

    def _check_reachable(self) -> None:
        """As root, the server runs as ``postgres``: every directory above
        ``base`` must let that user through."""
        if os.geteuid() != 0:
            return
        for parent in self.base.resolve().parents:
            if parent.exists() and not os.stat(parent).st_mode & 0o001:
                raise RuntimeError(
                    f"directory {parent} is not accessible to the postgres user, which "
                    f"PostgreSQL runs as when started by root; choose a directory under "
                    f"/tmp, or run: chmod o+x {parent}")

    def init(self) -> "LocalPostgres":
        self._check_reachable()
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        _chown_to_postgres(self.base)
        for d in (self.sockdir,):
            d.mkdir(exist_ok=True)
            os.chmod(d, 0o777)
            _chown_to_postgres(d)
        self._run("initdb", "-D", str(self.datadir), "-U", "postgres", "-E", "UTF8",
                  "--locale=C", "--auth=trust", "--no-sync")
        conf = "\n".join(f"{k} = {v}" for k, v in self.settings.items())
        conf += f"\nport = {self.port}\nunix_socket_directories = '{self.sockdir}'\n"
        self._append(self.datadir / "postgresql.auto.conf", conf)
        if self.hba is not None:
            self._write(self.datadir / "pg_hba.conf", "\n".join(self.hba) + "\n")
        return self

    def _append(self, path: Path, text: str) -> None:
        with open(path, "a") as f:
            f.write(text)

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        _chown_to_postgres(path)

    def start(self, timeout: float = 60) -> "LocalPostgres":
        if not self.logfile.exists():
            self.logfile.touch()
            _chown_to_postgres(self.logfile)
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-w",
                  "-t", str(int(timeout)), "start", timeout=timeout + 10)
        return self

    def stop(self, mode: str = "fast") -> None:
        if self.pid() is None:
            return
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)

    def pid(self) -> int | None:
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if process_running(pid) else None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        pid = self.pid()
        if pid is not None:
            os.kill(pid, sig)

    def wait_stopped(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.pid() is not None:
            if time.monotonic() > deadline:
                raise TimeoutError("postgres did not stop")
            time.sleep(0.05)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    # -- connection strings ----------------------------------------------------

    def dsn(self, user: str = "postgres", dbname: str = "postgres", tcp: bool = False) -> str:
        host = "127.0.0.1" if tcp else str(self.sockdir)
        return f"host={host} port={self.port} user={user} dbname={dbname}"

    def psql(self, sql: str, dbname: str = "postgres", check: bool = True) -> str:
        res = subprocess.run(
            [os.path.join(self.bindir, "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1",
             "-d", self.dsn(dbname=dbname), "-c", sql],
            capture_output=True, text=True, timeout=120)
        if check and res.returncode != 0:
            raise RuntimeError(f"psql failed: {res.stderr}")
        return res.stdout
