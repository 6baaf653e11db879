"""Client-driver matrix (issue 10): real drivers cannot tell a cluster node
from a plain PostgreSQL 15.

Each driver has one scenario program under tests/drivers/ (pgjdbc,
node-postgres, psycopg2, psycopg 3, asyncpg, SQLAlchemy) that prints a
deterministic transcript: what each step returned, or the SQLSTATE and
primary message it raised. Every driver runs against two targets started
here, never mocked:

- ``standalone``: one plain PostgreSQL 15; its transcript must equal the
  one checked in under tests/drivers/expected/ (what the scenarios mean,
  reviewed once; ``MMPROXY_DRIVERS_ACCEPT=1`` rewrites it);
- ``cluster``: node 1 of a 3-node cluster, with read-backs through node 2;
  its transcript must equal the standalone run's, line by line. Then every
  table the program left is compared on the three nodes' PostgreSQL
  directly, and no prepared transaction may be left on any node.

Tools a driver needs are installed when missing and the suite runs as root
(apt-get: libpostgresql-jdbc-java, a JDK, nodejs/npm; npm ci for the node
packages); otherwise the test fails and says what to install. Nothing here
skips.
"""
from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from conftest import Cluster
from proxy.pgserver import LocalPostgres

HERE = Path(__file__).resolve().parent
DRIVERS = HERE / "drivers"
EXPECTED = DRIVERS / "expected"
JDBC_JAR = Path("/usr/share/java/postgresql.jar")
RUN_TIMEOUT_S = 300          # a whole program; each scenario has its own limit inside
CONVERGE_WAIT_S = 10         # for a scenario abandoned mid-commit to settle

pytestmark = pytest.mark.slow

# -- tools ------------------------------------------------------------------------


def _apt_install(*packages: str) -> str | None:
    """Install Debian packages when we may; None when done, else why not."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "not root, or no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", *packages]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if res.returncode != 0:      # stale package lists: refresh once
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return None if res.returncode == 0 else (res.stdout + res.stderr)[-2000:]


def _need(what: str, present, packages: tuple[str, ...], advice: str) -> None:
    if present():
        return
    why = _apt_install(*packages)
    if why is None and present():
        return
    pytest.fail(f"{what} is missing and could not be installed ({why}). {advice}", pytrace=False)


@pytest.fixture(scope="module")
def jdbc_classes(tmp_path_factory) -> str:
    """The compiled JdbcScenarios and the pgjdbc jar, as a classpath."""
    _need("A JDK (java and javac)", lambda: shutil.which("javac") and shutil.which("java"),
          ("default-jdk-headless",), "Install one: apt-get install default-jdk-headless.")
    _need(f"pgjdbc ({JDBC_JAR})", JDBC_JAR.exists, ("libpostgresql-jdbc-java",),
          "Install it: apt-get install libpostgresql-jdbc-java.")
    out = tmp_path_factory.mktemp("jdbc-classes")
    res = subprocess.run(["javac", "-d", str(out), "-cp", str(JDBC_JAR),
                          str(DRIVERS / "java" / "JdbcScenarios.java")],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, f"javac failed:\n{res.stdout}{res.stderr}"
    return f"{out}{os.pathsep}{JDBC_JAR}"


@pytest.fixture(scope="module")
def node_ready() -> Path:
    """tests/drivers/node with its node_modules (npm ci from the lock file)."""
    folder = DRIVERS / "node"
    _need("Node.js and npm", lambda: shutil.which("node") and shutil.which("npm"),
          ("nodejs", "npm"), "Install Node.js 18 or later with npm.")
    if not (folder / "node_modules").is_dir():
        res = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=folder,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, (f"npm ci in {folder} failed (is the npm registry "
                                     f"reachable?):\n{res.stdout}{res.stderr}")
    return folder


def _python_modules(*names: str) -> None:
    missing = []
    for name in names:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        pytest.fail(f"Python modules {missing} are missing: run scripts/bootstrap.sh test "
                    f"(installs the [test] extra of pyproject.toml)", pytrace=False)


# -- targets ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def standalone(workdir):
    server = LocalPostgres(workdir / "drivers-standalone", fsync=False).init().start()
    yield server
    server.stop("immediate")


@pytest.fixture(scope="module")
def cluster(workdir):
    c = Cluster(workdir, 3, name="drivers")
    yield c
    c.stop()


# -- programs ---------------------------------------------------------------------

# driver -> the prefix of every table its program makes
PREFIX = {"pgjdbc": "jdbc_", "node-postgres": "node_", "psycopg2": "psycopg2_",
          "psycopg3": "psycopg3_", "asyncpg": "asyncpg_", "sqlalchemy": "sqlalchemy_"}


def command(driver: str, request, hosts: list[str]) -> tuple[list[str], Path]:
    if driver == "pgjdbc":
        return ["java", "-cp", request.getfixturevalue("jdbc_classes"), "JdbcScenarios",
                *hosts], DRIVERS
    if driver == "node-postgres":
        folder = request.getfixturevalue("node_ready")
        return ["node", "scenarios.js", *hosts], folder
    modules = {"psycopg2": ("psycopg2",), "sqlalchemy": ("sqlalchemy", "psycopg")}
    _python_modules(*modules.get(driver, ()))
    return [sys.executable, f"{driver}_scenarios.py", *hosts], DRIVERS / "py"


def run_program(driver: str, request, hosts: list[str]) -> list[str]:
    cmd, cwd = command(driver, request, hosts)
    started = time.monotonic()
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                             timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        so_far = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        pytest.fail(f"{driver} program still running after {RUN_TIMEOUT_S} s against {hosts}; "
                    f"transcript so far:\n{so_far}", pytrace=False)
    lines = res.stdout.splitlines()
    print(f"{driver} against {hosts}: {time.monotonic() - started:.1f} s")
    if res.returncode != 0 or not lines or lines[-1] != "== done":
        pytest.fail(f"{driver} program failed (exit {res.returncode}) against {hosts}:\n"
                    f"{res.stdout}\n--- stderr ---\n{res.stderr[-4000:]}", pytrace=False)
    return lines


def sections(lines: list[str]) -> dict[str, list[str]]:
    """Transcript lines by scenario (``== name`` headers)."""
    out: dict[str, list[str]] = {}
    name = "(start)"
    for line in lines:
        if line.startswith("== "):
            name = line[3:]
            out[name] = []
        else:
            out.setdefault(name, []).append(line)
    return out


def first_differences(expected: list[str], got: list[str]) -> list[str]:
    """One line per scenario that differs: its first differing line in each."""
    want, have = sections(expected), sections(got)
    found = []
    for name in list(want) + [n for n in have if n not in want]:
        a, b = want.get(name), have.get(name)
        if a == b:
            continue
        if a is None or b is None:
            found.append(f"  {name}: {'missing' if b is None else 'unexpected'} scenario")
            continue
        i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        x = a[i] if i < len(a) else "(end of scenario)"
        y = b[i] if i < len(b) else "(end of scenario)"
        found.append(f"  {name}:\n      expected: {x}\n      got:      {y}")
    return found


def transcript_problem(expected: list[str], got: list[str], expected_name: str,
                       got_name: str) -> str | None:
    if expected == got:
        return None
    diff = "\n".join(difflib.unified_diff(expected, got, expected_name, got_name,
                                          lineterm="", n=2))
    summary = first_differences(expected, got)
    return (f"transcript differs in {len(summary)} scenario(s):\n" + "\n".join(summary)
            + f"\n\n{diff}")


# -- cluster checks ----------------------------------------------------------------


def node_tables(c: Cluster, i: int, prefix: str) -> dict[str, str]:
    """Every table of this driver on node i's PostgreSQL, read directly:
    name -> (row count, md5 of the rows in text order)."""
    like = prefix.replace("_", r"\_") + "%"
    with psycopg.connect(c.direct(i).dsn(), autocommit=True) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE %s "
            "ORDER BY tablename", (like,))]
        return {n: "{} rows, md5 {}".format(*conn.execute(
            f"SELECT count(*), md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) "
            f"FROM {n} t").fetchone()) for n in names}


def prepared_left(c: Cluster) -> dict[int, list]:
    left = {}
    for i in range(1, c.n + 1):
        with psycopg.connect(c.direct(i).dsn(), autocommit=True) as conn:
            rows = conn.execute("SELECT gid FROM pg_prepared_xacts ORDER BY gid").fetchall()
        if rows:
            left[i] = [r[0] for r in rows]
    return left


def cluster_problems(c: Cluster, prefix: str) -> list[str]:
    """Tables that differ between nodes, prepared transactions left behind;
    a transaction a scenario abandoned mid-commit gets CONVERGE_WAIT_S to settle."""
    deadline = time.monotonic() + CONVERGE_WAIT_S
    while True:
        tables = {i: node_tables(c, i, prefix) for i in range(1, c.n + 1)}
        left = prepared_left(c)
        same = all(tables[i] == tables[1] for i in tables)
        if (same and not left) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    problems = []
    if not tables[1]:
        problems.append(f"no {prefix}* table on node 1")
    for name in sorted(set().union(*(t.keys() for t in tables.values()))):
        per_node = {i: tables[i].get(name, "missing") for i in tables}
        if len(set(per_node.values())) > 1:
            problems.append(f"table {name} differs between nodes: {per_node}")
    for i, gids in left.items():
        problems.append(f"prepared transactions left on node {i}: {gids}")
    return problems


# -- the check every test makes ------------------------------------------------------

_standalone_runs: dict[str, list[str]] = {}


def standalone_transcript(driver: str, request) -> list[str]:
    if driver not in _standalone_runs:
        server = request.getfixturevalue("standalone")
        _standalone_runs[driver] = run_program(driver, request,
                                               ["127.0.0.1", str(server.port)])
    return _standalone_runs[driver]


def check(driver: str, target: str, request) -> None:
    golden = EXPECTED / f"{driver}.txt"
    if target == "standalone":
        got = standalone_transcript(driver, request)
        if os.environ.get("MMPROXY_DRIVERS_ACCEPT") == "1":
            golden.parent.mkdir(exist_ok=True)
            golden.write_text("\n".join(got) + "\n")
        assert golden.exists(), (f"{golden} is missing; review this run and check it in "
                                 f"(MMPROXY_DRIVERS_ACCEPT=1 writes it):\n" + "\n".join(got))
        problem = transcript_problem(golden.read_text().splitlines(), got,
                                     str(golden.relative_to(HERE.parent)),
                                     "standalone PostgreSQL 15")
        if problem:
            pytest.fail(f"{driver} against a plain PostgreSQL 15: {problem}", pytrace=False)
        return
    expected = standalone_transcript(driver, request)
    c: Cluster = request.getfixturevalue("cluster")
    hosts = ["127.0.0.1", str(c.proxies[0].port), "127.0.0.1", str(c.proxies[1].port)]
    got = run_program(driver, request, hosts)
    problems = []
    problem = transcript_problem(expected, got, "standalone PostgreSQL 15",
                                 "cluster node 1 (read-backs through node 2)")
    if problem:
        problems.append(problem)
    problems += cluster_problems(c, PREFIX[driver])
    if problems:
        pytest.fail(f"{driver} through the cluster: " + "\n\n".join(problems), pytrace=False)


TARGETS = ["standalone", "cluster"]


@pytest.mark.parametrize("target", TARGETS)
def test_pgjdbc(target, request):
    check("pgjdbc", target, request)


@pytest.mark.parametrize("target", TARGETS)
def test_node_postgres(target, request):
    check("node-postgres", target, request)


@pytest.mark.parametrize("target", TARGETS)
def test_psycopg2(target, request):
    check("psycopg2", target, request)


@pytest.mark.parametrize("target", TARGETS)
def test_psycopg3(target, request):
    check("psycopg3", target, request)


@pytest.mark.parametrize("target", TARGETS)
def test_asyncpg(target, request):
    check("asyncpg", target, request)


@pytest.mark.parametrize("target", TARGETS)
def test_sqlalchemy(target, request):
    check("sqlalchemy", target, request)
