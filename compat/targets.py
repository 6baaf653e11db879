"""The two targets every regression file runs against, and the environment
psql gets, as pg_regress gives it.

- ``standalone``: one plain PostgreSQL 15 (proxy.pgserver.LocalPostgres);
- ``cluster``: three PostgreSQL 15 servers, each behind its own mmproxy,
  built by harness.cluster.ClusterUnderTest through the documented
  ``mmproxy init-cluster`` / ``mmproxy --config``; files run through node
  1's proxy port.

Rules kept here:

- Both sides get the same server settings: the standalone is made by the
  same LocalPostgres with the same ``settings`` and ``fsync`` the cluster
  gives its nodes (``PG_SETTINGS``: wal_level=logical,
  max_prepared_transactions=300, ... from proxy.pgserver.BASE_SETTINGS,
  plus max_connections=300 as ClusterUnderTest sets it), so a setting
  never explains a difference.
- The database is ``regression``, made on every server as pg_regress makes
  it (``create_database`` in src/test/regress/pg_regress.c of PostgreSQL
  15): template0, then lc_messages, lc_monetary, lc_numeric, lc_time = C,
  bytea_output = hex, timezone_abbreviations = Default. On the nodes it is
  made before ``init-cluster`` (``before_init``), so each node starts with
  the same empty database and init-cluster sets up that one.
- Both sides are reached the same way: TCP on 127.0.0.1, user postgres.
- Every process started here is stopped by ``stop`` (by pid: pg_ctl stop
  on the data directories, the proxies' Popen objects), every wait has a
  deadline.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psycopg

from harness.cluster import ClusterUnderTest, _wait
from proxy.pgserver import LocalPostgres, _chown_to_postgres

REGRESS_DB = "regression"
# What ClusterUnderTest gives each node on top of proxy.pgserver's
# BASE_SETTINGS (its pg_settings default); the standalone gets the same.
PG_SETTINGS = {"max_connections": "300"}
FSYNC = False

# pg_regress.c (PostgreSQL 15), create_database().
CREATE_DB = f'CREATE DATABASE "{REGRESS_DB}" TEMPLATE=template0'
ALTER_DB = "".join(
    f"ALTER DATABASE \"{REGRESS_DB}\" SET {name} TO '{value}';"
    for name, value in (("lc_messages", "C"), ("lc_monetary", "C"), ("lc_numeric", "C"),
                        ("lc_time", "C"), ("bytea_output", "hex"),
                        ("timezone_abbreviations", "Default")))


def create_regression_db(pg: LocalPostgres) -> None:
    pg.psql(CREATE_DB)          # CREATE DATABASE cannot share a transaction
    pg.psql(ALTER_DB)


def regress_dirs(base: Path) -> dict[str, Path]:
    """``PG_ABS_SRCDIR`` with an empty ``data/`` (the sdist has no data
    files: a COPY from one fails the same way on both sides),
    ``PG_ABS_BUILDDIR`` with a ``results/`` the servers can write to (COPY
    TO a file, then FROM it, in the same file), and an empty ``PG_LIBDIR``
    (regress.so is not built here: its functions fail the same way on both
    sides)."""
    dirs = {"src": base / "regress-src", "build": base / "regress-build",
            "lib": base / "regress-lib"}
    for sub in (dirs["src"] / "data", dirs["build"] / "results", dirs["lib"]):
        sub.mkdir(parents=True, exist_ok=True)
    for d in (base, dirs["src"], dirs["src"] / "data", dirs["build"], dirs["lib"]):
        os.chmod(d, 0o755)
    os.chmod(dirs["build"] / "results", 0o777)
    _chown_to_postgres(dirs["build"] / "results")
    return dirs


def psql_env(dirs: dict[str, Path], port: int, test: str) -> dict[str, str]:
    """The environment pg_regress gives psql (pg_regress.c
    initialize_environment, pg_regress_main.c psql_start_test, PostgreSQL
    15): C messages, PST8PDT, 'Postgres, MDY', the four directories the
    files read with \\getenv, and application_name pg_regress/<test>.
    LANG is C.UTF-8 so that psql's client encoding is UTF8 on both sides."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PG", "LC_")) and k not in ("LANGUAGE", "LANG")}
    env.update({
        "LANG": "C.UTF-8",
        "LC_MESSAGES": "C",
        "PGTZ": "PST8PDT",
        "PGDATESTYLE": "Postgres, MDY",
        "PGAPPNAME": f"pg_regress/{test}",
        "PGHOST": "127.0.0.1",
        "PGPORT": str(port),
        "PGUSER": "postgres",
        "PG_ABS_SRCDIR": str(dirs["src"]),
        "PG_ABS_BUILDDIR": str(dirs["build"]),
        "PG_LIBDIR": str(dirs["lib"]),
        "PG_DLSUFFIX": ".so",
    })
    return env


class Targets:
    """The standalone server and the 3-node cluster, under ``base``."""

    def __init__(self, base: Path, n_nodes: int = 3, log=print):
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        self.log = log
        self.dirs = regress_dirs(self.base)
        self.standalone = LocalPostgres(self.base / "standalone", settings=PG_SETTINGS,
                                        fsync=FSYNC)
        self.cluster = ClusterUnderTest(
            self.base / "cluster", n_nodes, relay_links=False, fsync=FSYNC,
            pg_settings=PG_SETTINGS, database=REGRESS_DB,
            before_init=lambda node: create_regression_db(node.pg))
        assert self.cluster.pg_settings == {**PG_SETTINGS}, "settings differ between sides"

    # -- life cycle -------------------------------------------------------------

    def start(self) -> "Targets":
        t0 = time.monotonic()
        self.standalone.init().start()
        create_regression_db(self.standalone)
        self.cluster.start()
        self.log(f"standalone on port {self.standalone.port}; cluster node 1 on port "
                 f"{self.node_port()} ({time.monotonic() - t0:.1f} s to start)")
        return self

    def stop(self) -> None:
        try:
            self.cluster.stop()
        finally:
            self.standalone.stop("immediate")

    def destroy(self) -> None:
        self.stop()
        subprocess.run(["rm", "-rf", str(self.base)], check=False)

    # -- what the runner needs --------------------------------------------------

    def node_port(self, i: int = 1) -> int:
        return self.cluster.node(i).client_port

    def standalone_port(self) -> int:
        return self.standalone.port

    def node_ids(self) -> list[int]:
        return self.cluster.ids

    def node_pg(self, i: int) -> LocalPostgres:
        return self.cluster.node(i).pg

    def proxies_alive(self) -> list[int]:
        """Ids of nodes whose proxy process has exited."""
        return [i for i in self.cluster.ids if not self.cluster.node(i).proxy_alive()]

    def replacements(self) -> list[tuple[str, str]]:
        """Strings that differ between the sides only because they are
        different servers: ports and directories (longest first)."""
        pairs = [(str(self.standalone.datadir), "<datadir>"),
                 (str(self.standalone.sockdir), "<sockdir>")]
        for i in self.cluster.ids:
            node = self.cluster.node(i)
            pairs += [(str(node.pg.datadir), "<datadir>"), (str(node.pg.sockdir), "<sockdir>")]
        return sorted(pairs, key=lambda p: -len(p[0]))

    def ports(self) -> list[int]:
        out = [self.standalone.port]
        for i in self.cluster.ids:
            node = self.cluster.node(i)
            out += [node.pg.port, node.proxy_port, node.client_port]
        return sorted(set(out))

    def end_sessions(self, test: str, timeout: float = 30) -> None:
        """Terminate what is left of a test's sessions (after its psql was
        killed at the time limit), on every server, directly."""
        app = f"pg_regress/{test}"
        servers = [self.standalone] + [self.node_pg(i) for i in self.cluster.ids]
        for pg in servers:
            def gone(pg=pg) -> bool:
                with psycopg.connect(pg.dsn(), autocommit=True) as c:
                    c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE application_name = %s", (app,))
                    return c.execute("SELECT count(*) FROM pg_stat_activity "
                                     "WHERE application_name = %s", (app,)).fetchone()[0] == 0
            try:
                _wait(gone, timeout, f"{test}'s sessions to end on {pg.base}", interval=0.5)
            except (TimeoutError, psycopg.Error) as e:
                self.log(f"warning: {e}")
