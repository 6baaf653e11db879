"""PostgreSQL 15's regression SQL files, fetched into a cache, never checked in.

PostgreSQL's own regression SQL is not installed by the server packages.
The source distribution of pglast 5.10 on PyPI (the release whose parser is
PostgreSQL 15's) carries a copy: libpg_query's Makefile copies
``src/test/regress/sql/*.sql`` of PostgreSQL 15.1 into
``libpg_query/test/sql/postgres_regress/``. ``ensure_sql_dir`` downloads
that sdist with pip (the ordinary client of the registry), checks its
SHA-256 against the one pinned here and that it says PostgreSQL 15.1,
extracts only those ``*.sql`` files into the cache and records what it
extracted; later runs reuse the cache once it checks out.

Not in the sdist: ``data/*.data`` (COPY input), ``input/``/``output/``
and ``expected/``. The files that read data fail the same way on both
sides (``compat.run`` points ``PG_ABS_SRCDIR`` at a directory with an
empty ``data/``), which is fine for a comparison.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PGLAST_VERSION = "5.10"
# sha256 of pglast-5.10.tar.gz as published on PyPI (2026-11-26).
PGLAST_SDIST_SHA256 = "e890582fbc18f01b00bc1724f17fff1396cc94d24ab37fba96aacc8fe742ed68"
PG_VERSION = "15.1"
SQL_MEMBER_DIR = f"pglast-{PGLAST_VERSION}/libpg_query/test/sql/postgres_regress/"
MAKEFILE_MEMBER = f"pglast-{PGLAST_VERSION}/libpg_query/Makefile"
EXPECTED_FILE_COUNT = 213
MARKER = "SOURCE.json"


class SourceError(RuntimeError):
    pass


def default_cache_dir() -> Path:
    env = os.environ.get("MMPROXY_COMPAT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mmproxy" / "pg15-regress"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cached(sql_dir: Path) -> bool:
    marker = sql_dir.parent / MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if info.get("sdist_sha256") != PGLAST_SDIST_SHA256 or info.get("pg_version") != PG_VERSION:
        return False
    files = info.get("files", {})
    if len(files) != EXPECTED_FILE_COUNT:
        return False
    for name, digest in files.items():
        p = sql_dir / name
        if not p.is_file() or _sha256(p) != digest:
            return False
    return True


def _download(into: Path) -> Path:
    """pip download the sdist into ``into``; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
           "--disable-pip-version-check", "-d", str(into), f"pglast=={PGLAST_VERSION}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    sdist = into / f"pglast-{PGLAST_VERSION}.tar.gz"
    if res.returncode != 0 or not sdist.exists():
        raise SourceError(f"could not download the pglast {PGLAST_VERSION} sdist from PyPI "
                          f"({' '.join(cmd)}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return sdist


def extract(sdist: Path, sql_dir: Path) -> None:
    digest = _sha256(sdist)
    if digest != PGLAST_SDIST_SHA256:
        raise SourceError(f"{sdist}: sha256 {digest}, expected {PGLAST_SDIST_SHA256} "
                          f"(pglast {PGLAST_VERSION}'s sdist on PyPI)")
    tmp = Path(tempfile.mkdtemp(prefix="extract-", dir=sql_dir.parent))
    try:
        files: dict[str, str] = {}
        with tarfile.open(sdist, "r:gz") as tar:
            makefile = tar.extractfile(MAKEFILE_MEMBER)
            if makefile is None or f"PG_VERSION = {PG_VERSION}\n" not in makefile.read().decode():
                raise SourceError(f"{sdist}: libpg_query is not built from PostgreSQL "
                                  f"{PG_VERSION}")
            for m in tar.getmembers():
                if not (m.isfile() and m.name.startswith(SQL_MEMBER_DIR)
                        and m.name.endswith(".sql")):
                    continue
                name = m.name[len(SQL_MEMBER_DIR):]
                if "/" in name:
                    continue
                data = tar.extractfile(m).read()
                (tmp / name).write_bytes(data)
                files[name] = hashlib.sha256(data).hexdigest()
        if len(files) != EXPECTED_FILE_COUNT:
            raise SourceError(f"{sdist}: {len(files)} regression files, expected "
                              f"{EXPECTED_FILE_COUNT}")
        shutil.rmtree(sql_dir, ignore_errors=True)
        tmp.rename(sql_dir)
        (sql_dir.parent / MARKER).write_text(json.dumps({
            "pglast": PGLAST_VERSION, "sdist_sha256": digest, "pg_version": PG_VERSION,
            "files": dict(sorted(files.items()))}, indent=1) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_sql_dir(cache_dir: Path | None = None, log=print) -> Path:
    """The directory holding PostgreSQL 15.1's regression ``*.sql`` files."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    sql_dir = root / f"pglast-{PGLAST_VERSION}" / "sql"
    if _cached(sql_dir):
        return sql_dir
    sql_dir.parent.mkdir(parents=True, exist_ok=True)
    log(f"fetching PostgreSQL {PG_VERSION}'s regression SQL (pglast {PGLAST_VERSION} sdist "
        f"from PyPI) into {sql_dir}")
    with tempfile.TemporaryDirectory(prefix="pglast-sdist-") as d:
        extract(_download(Path(d)), sql_dir)
    if not _cached(sql_dir):
        raise SourceError(f"{sql_dir}: extracted files do not check out")
    return sql_dir
