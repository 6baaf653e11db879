"""Bad input, lost servers, shutdown, big messages, backpressure and many
connections: the proxy answers with a real SQLSTATE, never hangs, keeps
other sessions going and holds its memory bounded."""
from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import signal
import socket
import struct
import threading
import time

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import wait_for
from proxy import wire
from proxy.pgserver import LocalPostgres, free_port
from rawpg import RawClient, errors


def assert_works(proxy) -> None:
    with psycopg.connect(proxy.dsn(), connect_timeout=5) as conn:
        assert conn.execute("SELECT 40 + 2").fetchone() == (42,)


# --- bad input --------------------------------------------------------------

BAD_AFTER_STARTUP = {
    "unknown type": b"?" + struct.pack("!I", 4),
    "negative length": b"Q" + struct.pack("!i", -5),
    "oversized small message": b"D" + struct.pack("!I", 50000) + b"x" * 100,
    "password out of order": wire.PasswordMessage(b"pw\0").encode(),
    "second startup": wire.StartupMessage((("user", "x"),)).encode(),
}


@pytest.mark.parametrize("name", list(BAD_AFTER_STARTUP))
def test_bad_frontend_message_gets_08P01_others_continue(proxy, name):
    with psycopg.connect(proxy.dsn()) as bystander:
        c = RawClient(proxy.port)
        assert c.startup()[-1] == wire.ReadyForQuery(b"I")
        c.send(wire.Query("SELECT 1").encode() + BAD_AFTER_STARTUP[name])
        msgs = c.read_all()  # ends at EOF: the proxy closed the connection
        errs = errors(msgs)
        assert errs and errs[-1].sqlstate == "08P01" and errs[-1].severity == "FATAL"
        # the good query before the bad bytes was answered first
        assert wire.DataRow((b"1",)) in msgs
        assert bystander.execute("SELECT 'still here'").fetchone() == ("still here",)
    assert proxy.alive()


@pytest.mark.parametrize("packet", [
    struct.pack("!i", 100000),                                   # oversized startup
    struct.pack("!ii", 8, 0x00020000),                           # protocol 2.0
    struct.pack("!ii", 10, wire.PROTOCOL_3_0) + b"us",           # unterminated params
])
def test_bad_startup_packets(proxy, packet):
    c = RawClient(proxy.port)
    c.send(packet)
    errs = errors(c.read_all())
    assert errs and errs[0].sqlstate == "08P01"
    assert_works(proxy)


def test_stalled_startup_times_out(make_proxy):
    p = make_proxy("", startup_timeout_ms=500)
    c = RawClient(p.port)
    c.send(struct.pack("!ii", 40, wire.PROTOCOL_3_0) + b"user\0")  # and then nothing
    t0 = time.monotonic()
    [err] = errors(c.read_all())
    assert err.sqlstate == "57014" and "timeout" in err.message
    assert 0.4 < time.monotonic() - t0 < 3
    assert_works(p)


def test_replication_connection_is_refused(proxy):
    with pytest.raises(psycopg.OperationalError) as ei:
        psycopg.connect(proxy.dsn(replication="database"))
    assert "replication connections are not accepted through mmproxy" in str(ei.value)


@given(st.binary(min_size=1, max_size=400), st.booleans())
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_frontend_bytes(proxy, data, after_startup):
    c = RawClient(proxy.port, timeout=10)
    try:
        if after_startup:
            c.startup()
        c.send(data + wire.Terminate().encode())
        c.sock.shutdown(socket.SHUT_WR)
        msgs = c.read_all()
        for e in errors(msgs):
            assert len(e.sqlstate) == 5 and e.message
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        c.close()
    assert proxy.alive()


def test_other_sessions_survive_fuzzing(proxy):
    # Runs after the fuzz test in file order; also checks the log recorded
    # the violations as events.
    assert_works(proxy)
    assert any(e.get("sqlstate") == "08P01" for e in proxy.events()
               if e["event"] == "connection_closed")


# --- the local server is unreachable or dies ------------------------------------

def test_unreachable_postgres_gives_fatal_not_hang(make_proxy, pg):
    p = make_proxy(pg_port=free_port())  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as ei:
        psycopg.connect(p.dsn(), connect_timeout=10)
    assert time.monotonic() - t0 < 3
    assert "mmproxy could not connect to its local PostgreSQL server" in str(ei.value)
    c = RawClient(p.port)
    c.send(wire.StartupMessage((("user", "postgres"),)).encode())
    [err] = errors(c.read_all())
    assert (err.severity, err.sqlstate) == ("FATAL", "08006")


@pytest.fixture(scope="module")
def victim_pg(workdir):
    """A server of its own for tests that kill backends (a killed backend
    makes the postmaster restart every session)."""
    s = LocalPostgres(workdir / "victim", fsync=False).init().start()
    yield s
    s.stop("immediate")


def test_backend_killed_mid_query_client_gets_error_at_once(make_proxy, victim_pg):
    p = make_proxy(pg_port=victim_pg.port)
    with psycopg.connect(p.dsn()) as conn:
        pid = conn.info.backend_pid
        result = {}

        def run():
            t0 = time.monotonic()
            try:
                conn.execute("SELECT pg_sleep(60)")
            except psycopg.OperationalError as e:
                result["err"] = str(e)
            result["t"] = time.monotonic() - t0
        t = threading.Thread(target=run)
        t.start()
        wait_for(lambda: victim_pg.psql(
            f"SELECT state FROM pg_stat_activity WHERE pid = {pid}").strip() == "active",
            what="the query to start")
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        t.join(20)
        assert "err" in result and time.monotonic() - t_kill < 5
    wait_for(lambda: _accepts(victim_pg), timeout=30, what="postgres to restart")
    assert_works(p)


def _accepts(pg) -> bool:
    try:
        pg.psql("SELECT 1")
        return True
    except RuntimeError:
        return False


def test_backend_terminated_by_admin_relays_57P01(make_proxy, victim_pg):
    p = make_proxy(pg_port=victim_pg.port)
    c = RawClient(p.port)
    c.startup()
    c.send(wire.Query("SELECT pg_backend_pid()").encode())
    pid = int([m for m in c.read_until(b"Z") if isinstance(m, wire.DataRow)][0].values[0])
    victim_pg.psql(f"SELECT pg_terminate_backend({pid})")
    errs = errors(c.read_all())
    assert [e.sqlstate for e in errs] == ["57P01"]  # exactly PostgreSQL's own error


# --- shutdown ---------------------------------------------------------------

def test_sigterm_lets_transactions_finish_then_57P01(make_proxy, pg):
    p = make_proxy(grace_ms=20000)
    idle = psycopg.connect(p.dsn(), autocommit=True)
    busy = psycopg.connect(p.dsn())
    busy.execute("CREATE TABLE IF NOT EXISTS shut_t (v int)")
    busy.commit()
    busy.execute("INSERT INTO shut_t VALUES (1)")       # transaction open
    p.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: _refuses(p.port), what="the listener to close")
    # the idle session was ended with 57P01 at once
    with pytest.raises(psycopg.OperationalError) as ei:
        idle.execute("SELECT 1")
    assert "mmproxy is shutting down" in str(ei.value)
    # the open transaction may still finish and commit
    busy.execute("INSERT INTO shut_t VALUES (2)")
    busy.commit()
    with pytest.raises(psycopg.OperationalError):
        busy.execute("SELECT 1")
    assert p.proc.wait(10) == 0
    assert pg.psql("SELECT count(*) FROM shut_t WHERE v IN (1, 2)").strip() == "2"
    idle.close()
    busy.close()


def _refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return False
    except OSError:
        return True


def test_sigterm_grace_expiry_ends_open_transactions(make_proxy, pg):
    p = make_proxy(grace_ms=700)
    busy = psycopg.connect(p.dsn())
    busy.execute("CREATE TABLE IF NOT EXISTS grace_t (v int)")
    busy.commit()
    busy.execute("INSERT INTO grace_t VALUES (7)")
    t0 = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(10) == 0
    assert 0.6 < time.monotonic() - t0 < 5
    with pytest.raises(psycopg.OperationalError) as ei:
        busy.execute("SELECT 1")
    assert "shutting down" in str(ei.value) or "closed" in str(ei.value)
    # the abandoned transaction was rolled back, not committed
    wait_for(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE state = "
                             "'idle in transaction'").strip() == "0", what="backend to end")
    assert pg.psql("SELECT count(*) FROM grace_t WHERE v = 7").strip() == "0"
    busy.close()
    shutdown = [e for e in p.events() if e["event"] == "shutdown_grace_expired"]
    assert shutdown and shutdown[0]["sessions"] == 1


# --- big messages and bounded memory -------------------------------------------

def test_large_messages_stream_with_bounded_memory(proxy):
    size = 128 * 1024 * 1024
    payload = os.urandom(1024) * (size // 1024)
    digest = hashlib.md5(payload).hexdigest()
    rss0 = proxy.rss_kb()
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("CREATE TEMP TABLE big (b bytea)")
        conn.execute("INSERT INTO big VALUES (%b)", (payload,))
        assert conn.execute("SELECT md5(b), length(b) FROM big").fetchone() == (digest, size)
        back = conn.execute("SELECT b FROM big", binary=True).fetchone()[0]
        assert hashlib.md5(back).hexdigest() == digest
    growth_mb = (proxy.rss_kb() - rss0) / 1024
    # a 128 MB message each way went through; the proxy held only reads
    assert growth_mb < 32, f"proxy RSS grew by {growth_mb:.1f} MB"


def test_slow_client_backpressure(proxy):
    """A client that does not read a 200 MB result: the proxy stops reading
    from PostgreSQL instead of buffering it."""
    rss0 = proxy.rss_kb()
    c = RawClient(proxy.port, timeout=60)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    c.startup()
    c.send(wire.Query("SELECT repeat('x', 1000) FROM generate_series(1, 200000)").encode())
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        wait_for(lambda: other.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'ClientWrite'"
        ).fetchone()[0] == 1, what="the backend to block on writing to the proxy")
    growth_mb = (proxy.rss_kb() - rss0) / 1024
    assert growth_mb < 16, f"proxy RSS grew by {growth_mb:.1f} MB while the client stalled"
    rows = 0
    while (m := c.read_message()) is not None:
        if isinstance(m, wire.DataRow):
            rows += 1
        if isinstance(m, wire.ReadyForQuery):
            break
    assert rows == 200000
    c.close()


def test_slow_backend_backpressure(make_proxy, victim_pg):
    """PostgreSQL stops reading (its backend is paused) during a COPY: the
    proxy stops reading from the client instead of buffering."""
    p = make_proxy(pg_port=victim_pg.port)
    victim_pg.psql("CREATE TABLE IF NOT EXISTS sink (line text)")
    c = RawClient(p.port, timeout=60)
    c.startup()
    c.send(wire.Query("SELECT pg_backend_pid()").encode())
    pid = int([m for m in c.read_until(b"Z") if isinstance(m, wire.DataRow)][0].values[0])
    c.send(wire.Query("COPY sink FROM STDIN").encode())
    c.read_until(b"G")
    rss0 = p.rss_kb()
    os.kill(pid, signal.SIGSTOP)
    sent = 0
    chunk = wire.CopyData(b"y" * 65000 + b"\n").encode()
    c.sock.settimeout(2.0)
    try:
        while sent < 300 * 1024 * 1024:
            c.sock.sendall(chunk)
            sent += len(chunk)
    except (socket.timeout, TimeoutError):
        pass  # the send blocked: backpressure reached the client
    finally:
        stalled_growth_mb = (p.rss_kb() - rss0) / 1024
        os.kill(pid, signal.SIGCONT)
    assert sent < 300 * 1024 * 1024, "the proxy kept accepting data from the client"
    assert stalled_growth_mb < 16, f"proxy RSS grew by {stalled_growth_mb:.1f} MB"
    c.sock.settimeout(60)
    c.send(wire.CopyDone().encode())
    msgs = c.read_until(b"Z")
    assert not errors(msgs)
    c.close()


def test_thousand_concurrent_connections_bounded_memory(make_proxy):
    p = make_proxy("[limits]\nmax_client_connections = 2000\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    rss0 = p.rss_kb()

    async def main():
        sem = asyncio.Semaphore(50)

        async def open_one():
            async with sem:
                return await psycopg.AsyncConnection.connect(p.dsn(), autocommit=True)
        conns = await asyncio.gather(*(open_one() for _ in range(1000)))
        try:
            rss_held = p.rss_kb()
            results = await asyncio.gather(*(c.execute("SELECT pg_backend_pid()") for c in conns))
            pids = {(await r.fetchone())[0] for r in results}
            return rss_held, pids
        finally:
            await asyncio.gather(*(c.close() for c in conns))

    rss_held, pids = asyncio.run(main())
    assert len(pids) == 1000  # one backend per session, all alive at once
    growth_mb = (rss_held - rss0) / 1024
    assert growth_mb < 120, f"1000 idle sessions cost {growth_mb:.1f} MB"
    wait_for(lambda: not [e for e in p.events() if e["event"] == "connection_opened"][-1:] or
             sum(e["event"] == "connection_closed" for e in p.events()) >= 1000,
             timeout=30, what="all sessions to close")
    assert_works(p)
