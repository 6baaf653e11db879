"""Authentication relayed end to end (md5, SCRAM-SHA-256: the proxy never
sees a password), TLS towards clients, and query cancellation."""
from __future__ import annotations

import subprocess
import threading
import time

import psycopg
import pytest

from conftest import PASSWORD, wait_for


def wait_active(conn, query: str) -> None:
    # ``conn`` must be in autocommit: PostgreSQL caches pg_stat_activity for
    # the length of a transaction (stats_fetch_consistency).
    assert conn.autocommit
    wait_for(lambda: conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE query = %s AND state = 'active'",
        (query,)).fetchone()[0], what=f"{query!r} to run")


@pytest.mark.parametrize("user", ["scram_user", "md5_user"])
def test_password_auth_through_proxy(proxy, user):
    with psycopg.connect(proxy.dsn(user=user, password=PASSWORD)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)
    with pytest.raises(psycopg.OperationalError) as ei:
        psycopg.connect(proxy.dsn(user=user, password="wrong"))
    assert "password authentication failed" in str(ei.value)
    # the proxy's log never holds the password
    assert PASSWORD not in proxy.log_file.read_text()


def test_scram_auth_method_is_really_scram(pg):
    assert pg.psql("SELECT left(rolpassword, 13) FROM pg_authid WHERE rolname = 'scram_user'") \
        .strip() == "SCRAM-SHA-256"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem")], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def test_tls_sslmode_require(make_proxy, tls_files):
    cert, key = tls_files
    p = make_proxy(f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n')
    with psycopg.connect(p.dsn(sslmode="require", user="scram_user", password=PASSWORD)) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 'over tls', current_user").fetchone() == \
            ("over tls", "scram_user")
        big = conn.execute("SELECT repeat('z', 2000000)").fetchone()[0]
        assert len(big) == 2000000
    # verify-ca against the proxy's certificate
    with psycopg.connect(p.dsn(sslmode="verify-ca", sslrootcert=str(cert))) as conn:
        assert conn.pgconn.ssl_in_use
    # plain clients still work
    with psycopg.connect(p.dsn(sslmode="disable")) as conn:
        assert not conn.pgconn.ssl_in_use


def test_tls_required_but_not_configured(proxy):
    with pytest.raises(psycopg.OperationalError) as ei:
        psycopg.connect(proxy.dsn(sslmode="require"))
    assert "server does not support SSL" in str(ei.value)


def test_cancel_running_query_within_a_second(proxy):
    with psycopg.connect(proxy.dsn()) as conn, psycopg.connect(proxy.dsn(), autocommit=True) as other:
        result = {}

        def run():
            t0 = time.monotonic()
            try:
                conn.execute("SELECT pg_sleep(30)")
            except psycopg.errors.QueryCanceled as e:
                result["sqlstate"] = e.sqlstate
            result["elapsed"] = time.monotonic() - t0

        t = threading.Thread(target=run)
        t.start()
        wait_active(other, "SELECT pg_sleep(30)")
        t_cancel = time.monotonic()
        conn.cancel()
        t.join(15)
        assert result.get("sqlstate") == "57014"
        assert time.monotonic() - t_cancel < 1.0
        # the session is still usable after the cancel
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)
    events = [e["event"] for e in proxy.events()]
    assert "cancel_request_forwarded" in events


def test_cancel_with_wrong_key_does_nothing(proxy):
    """A CancelRequest with a made-up secret must not cancel anything."""
    import socket
    import struct
    with psycopg.connect(proxy.dsn()) as conn:
        pid = conn.info.backend_pid
        done = threading.Event()
        err = {}

        def run():
            try:
                conn.execute("SELECT pg_sleep(1.5)")
            except psycopg.Error as e:
                err["e"] = e
            done.set()
        t = threading.Thread(target=run)
        t.start()
        with psycopg.connect(proxy.dsn(), autocommit=True) as other:
            wait_active(other, "SELECT pg_sleep(1.5)")
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            s.sendall(struct.pack("!iiii", 16, 80877102, pid, 12345))
        t.join(10)
        assert done.is_set() and "e" not in err
