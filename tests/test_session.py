"""The session core, driven without sockets: phases, authentication relay,
cancel keys, transaction state, protocol violations and shutdown."""
from __future__ import annotations

import struct

import pytest

from proxy import wire
from proxy.session import (CancelQuery, Close, ConnectBackend, Phase, RegisterCancelKey,
                           SendClient, SendServer, Session, StartTLS)

STARTUP = wire.StartupMessage((("user", "alice"), ("database", "db"),
                               ("application_name", "app"))).encode()
HELLO = (wire.Authentication(wire.AUTH_OK).encode()
         + wire.ParameterStatus("server_version", "15.18").encode()
         + wire.BackendKeyData(4242, 1111).encode()
         + wire.ReadyForQuery(b"I").encode())


def errors(effects) -> list[wire.ErrorResponse]:
    out = []
    for e in effects:
        if isinstance(e, SendClient) and e.data[:1] == b"E":
            out.append(wire.decode(b"E", e.data[5:], frontend=False))
    return out


def connected(tls: bool = False) -> Session:
    s = Session(tls_available=tls, proxy_secret=999)
    assert s.client_bytes(STARTUP) is None
    assert s.effects == [ConnectBackend(wire.decode_startup_packet(STARTUP))]
    s.effects.clear()
    assert s.backend_connected() == STARTUP
    return s


def ready() -> Session:
    s = connected()
    out = s.server_bytes(HELLO)
    assert s.phase is Phase.READY
    s.effects.clear()
    assert out is not None
    return s


def test_trust_startup_rewrites_cancel_secret():
    s = connected()
    out = s.server_bytes(HELLO)
    assert s.phase is Phase.READY
    assert wire.BackendKeyData(4242, 999).encode() in out
    assert wire.BackendKeyData(4242, 1111).encode() not in out
    assert s.effects == [RegisterCancelKey(4242, 999, 1111)]
    assert s.server_params == {"server_version": "15.18"}


def test_scram_exchange_is_relayed_and_ordered():
    s = connected()
    sasl = wire.Authentication(wire.AUTH_SASL, b"SCRAM-SHA-256\0\0").encode()
    assert s.server_bytes(sasl) == sasl
    first = wire.PasswordMessage(b"SCRAM-SHA-256\0....").encode()
    assert s.client_bytes(first) == first
    cont = wire.Authentication(wire.AUTH_SASL_CONTINUE, b"r=1").encode()
    assert s.server_bytes(cont) == cont
    final = wire.PasswordMessage(b"c=biws,r=1,p=x").encode()
    # delivered byte by byte, the message is still relayed whole once
    outs = [s.client_bytes(final[i:i + 1]) for i in range(len(final))]
    assert b"".join(o for o in outs if o) == final
    s.server_bytes(wire.Authentication(wire.AUTH_SASL_FINAL, b"v=1").encode())
    # no request outstanding now: another 'p' is out of order
    assert s.client_bytes(wire.PasswordMessage(b"again").encode()) is None
    assert errors(s.effects)[0].sqlstate == "08P01"
    assert s.phase is Phase.CLOSED


def test_query_before_authentication_is_refused():
    s = connected()
    s.server_bytes(wire.Authentication(wire.AUTH_MD5, b"salt").encode())
    s.client_bytes(wire.Query("select 1").encode())
    [err] = errors(s.effects)
    assert (err.severity, err.sqlstate) == ("FATAL", "08P01")
    assert isinstance(s.effects[-1], Close)


def test_transaction_state_and_statement_boundaries():
    s = ready()
    q = wire.Query("BEGIN; INSERT INTO t VALUES (1)").encode()
    assert s.client_bytes(q) == q
    assert s.pending_syncs == 1
    s.server_bytes(wire.CommandComplete("BEGIN").encode())
    assert s.pending_syncs == 1
    s.server_bytes(wire.CommandComplete("INSERT 0 1").encode() + wire.ReadyForQuery(b"T").encode())
    assert (s.pending_syncs, s.txn_status) == (0, b"T")
    # pipelined extended protocol: two syncs in flight
    batch = (wire.Parse("", "select 1").encode() + wire.Bind("", "").encode()
             + wire.Execute("").encode() + wire.Sync().encode()) * 2
    assert s.client_bytes(batch) == batch
    assert s.pending_syncs == 2
    s.server_bytes(wire.ReadyForQuery(b"E").encode())
    assert (s.pending_syncs, s.txn_status) == (1, b"E")


@pytest.mark.parametrize("bad", [
    b"p" + struct.pack("!I", 8) + b"pass",             # password after auth
    b"?" + struct.pack("!I", 4),                       # unknown type
    b"Q" + struct.pack("!I", 2),                       # length too small
    b"S" + struct.pack("!I", 9) + b"xxxxx",           # Sync with a body
    b"\x00\x00\x00\x08\x04\xd2\x16\x2f",                # a second SSLRequest
])
def test_protocol_violations_close_only_this_session(bad):
    s = ready()
    good = wire.Query("select 1").encode()
    out = s.client_bytes(good + bad)
    assert out == good  # what came before the bad bytes still reaches the server
    assert s.phase is Phase.DRAINING and s.effects == []
    assert s.client_bytes(wire.Query("select 2").encode()) is None  # never read
    answer = wire.DataRow((b"1",)).encode() + wire.ReadyForQuery(b"I").encode()
    out = s.server_bytes(answer)
    assert out.startswith(answer)  # the answer first, then the FATAL
    err = wire.decode(b"E", out[len(answer) + 5:], frontend=False)
    assert (err.severity, err.sqlstate) == ("FATAL", "08P01")
    assert isinstance(s.effects[-1], Close) and s.phase is Phase.CLOSED


def test_protocol_violation_with_nothing_pending_closes_at_once():
    s = ready()
    assert s.client_bytes(b"?" + struct.pack("!I", 4)) is None
    [err] = errors(s.effects)
    assert (err.severity, err.sqlstate) == ("FATAL", "08P01")
    assert s.phase is Phase.CLOSED


def test_replication_connections_are_refused():
    s = Session(tls_available=False, proxy_secret=1)
    s.client_bytes(wire.StartupMessage((("user", "u"), ("replication", "database"))).encode())
    [err] = errors(s.effects)
    assert err.sqlstate == "0A000" and "replication" in err.message
    assert s.phase is Phase.CLOSED


def test_ssl_negotiation():
    s = Session(tls_available=False, proxy_secret=1)
    s.client_bytes(wire.SSLRequest().encode())
    assert s.effects == [SendClient(b"N")]
    s.effects.clear()
    s.client_bytes(wire.GSSENCRequest().encode())
    assert s.effects == [SendClient(b"N")]
    t = Session(tls_available=True, proxy_secret=1)
    t.client_bytes(wire.SSLRequest().encode())
    assert t.effects == [StartTLS()]
    # bytes after SSLRequest, before the handshake: refused (CVE-2021-23214)
    u = Session(tls_available=True, proxy_secret=1)
    u.client_bytes(wire.SSLRequest().encode() + STARTUP)
    assert errors(u.effects)[0].sqlstate == "08P01"


def test_cancel_request_effect():
    s = Session(tls_available=False, proxy_secret=1)
    s.client_bytes(wire.CancelRequest(4242, 999).encode())
    assert s.effects == [CancelQuery(4242, 999), Close("cancel request")]


def test_backend_loss_reports_error_at_boundary_only():
    s = ready()
    s.server_closed()
    [err] = errors(s.effects)
    assert err.sqlstate == "08006"
    # mid-message: an injected error would corrupt the stream, so just close
    t = ready()
    t.server_bytes(b"D" + struct.pack("!I", 100) + b"partial")
    t.server_closed()
    assert errors(t.effects) == [] and isinstance(t.effects[-1], Close)


def test_backend_fatal_is_not_doubled():
    s = ready()
    fatal = wire.error_response("57P01", "terminating connection due to administrator command",
                                severity="FATAL")
    assert s.server_bytes(fatal) == fatal
    s.server_closed()
    assert errors(s.effects) == [] and s.effects[-1].sqlstate == "57P01"


def test_connect_failure_tells_the_client():
    s = Session(tls_available=False, proxy_secret=1)
    s.client_bytes(STARTUP)
    s.effects.clear()
    s.backend_connect_failed("/tmp/.s.PGSQL.5432", "Connection refused")
    [err] = errors(s.effects)
    assert err.severity == "FATAL" and err.sqlstate == "08006"
    assert "Connection refused" in err.message


def test_shutdown_waits_for_idle_point():
    s = ready()
    s.client_bytes(wire.Query("BEGIN").encode())
    s.server_bytes(wire.CommandComplete("BEGIN").encode() + wire.ReadyForQuery(b"T").encode())
    s.request_shutdown()
    assert s.effects == []  # in a transaction: let it finish
    s.client_bytes(wire.Query("COMMIT").encode())
    out = s.server_bytes(wire.CommandComplete("COMMIT").encode() + wire.ReadyForQuery(b"I").encode())
    err = wire.decode(b"E", out[out.index(b"E\x00") + 5:], frontend=False)
    assert err.sqlstate == "57P01"
    assert out.startswith(wire.CommandComplete("COMMIT").encode())
    assert SendServer(wire.Terminate().encode()) in s.effects
    assert s.phase is Phase.CLOSED


def test_shutdown_of_idle_session_is_immediate_and_grace_expiry_ends_the_rest():
    s = ready()
    s.request_shutdown()
    assert errors(s.effects)[0].sqlstate == "57P01"
    t = ready()
    t.client_bytes(wire.Query("select pg_sleep(100)").encode())
    t.request_shutdown()
    assert t.effects == []
    t.terminate_now()
    assert errors(t.effects)[0].sqlstate == "57P01" and t.phase is Phase.CLOSED


def cluster_ready() -> Session:
    s = Session(tls_available=False, proxy_secret=999)
    s.set_cluster(True, lambda: "MTM-1-1-1")
    s.client_bytes(STARTUP)
    s.effects.clear()
    s.backend_connected()
    s.server_bytes(HELLO)
    s.effects.clear()
    return s


def messages(data: bytes) -> list:
    """Frontend messages in ``data``."""
    out, pos = [], 0
    while pos < len(data):
        t = data[pos:pos + 1]
        n = struct.unpack("!I", data[pos + 1:pos + 5])[0]
        out.append(wire.decode(t, data[pos + 5:pos + 1 + n], frontend=True))
        pos += 1 + n
    return out


def sent(s: Session, returned: bytes | None = None) -> list:
    """The frontend messages the session sent the backend: ``returned``
    (what ``client_bytes`` returned) and its SendServer effects (cleared)."""
    out = messages(returned) if returned else []
    for e in s.effects:
        if isinstance(e, SendServer):
            out += messages(e.data)
    s.effects[:] = [e for e in s.effects if not isinstance(e, SendServer)]
    return out


def to_client(s: Session, out: bytes | None = None) -> bytes:
    data = out or b""
    data += b"".join(e.data for e in s.effects if isinstance(e, SendClient))
    s.effects[:] = [e for e in s.effects if not isinstance(e, SendClient)]
    return data


def answers(msgs: list, *, execute=b"", status=b"T") -> bytes:
    """A backend's answers to extended-protocol messages of the proxy's own:
    ``execute`` answers the Execute (an ErrorResponse makes the backend skip
    to Sync, as PostgreSQL does)."""
    out, skipping = b"", False
    for m in msgs:
        if skipping and not isinstance(m, wire.Sync):
            continue
        if isinstance(m, wire.Close):
            out += wire.CloseComplete().encode()
        elif isinstance(m, wire.Parse):
            out += wire.ParseComplete().encode()
        elif isinstance(m, wire.Bind):
            out += wire.BindComplete().encode()
        elif isinstance(m, wire.Execute):
            out += execute or wire.CommandComplete("DO").encode()
            skipping = execute[:1] == b"E"
        elif isinstance(m, wire.Sync):
            out += wire.ReadyForQuery(status).encode()
            skipping = False
    return out


def in_transaction(s: Session) -> None:
    s.client_bytes(wire.Query("BEGIN").encode())
    s.server_bytes(wire.CommandComplete("BEGIN").encode() + wire.ReadyForQuery(b"T").encode())
    s.client_bytes(wire.Query("UPDATE t SET n = 1").encode())
    s.server_bytes(wire.CommandComplete("UPDATE 1").encode() + wire.ReadyForQuery(b"T").encode())
    s.effects.clear()


WOUND = wire.error_response("40001", "conflicts with MTM-2-1-5")


def wound_idle(s: Session) -> None:
    """Wound a session idle in its transaction: the proxy fails the
    transaction on the backend at once, and the client hears nothing yet."""
    assert s.wound("conflicts with MTM-2-1-5") is False     # nothing to cancel
    msgs = sent(s)
    assert [m.__class__.__name__ for m in msgs] == ["Close", "Close", "Parse", "Bind",
                                                    "Execute", "Flush"]
    assert "RAISE EXCEPTION" in msgs[2].sql and "40001" in msgs[2].sql
    assert msgs[2].name == "mtm_proxy"          # the client's unnamed statement is left alone
    assert s.is_wounded
    assert s.wound("again") is False            # the watchdog asks again: one is enough
    assert s.server_bytes(answers(msgs, execute=WOUND)) is None
    [sync] = sent(s)                           # the backend skips to a Sync of ours
    assert isinstance(sync, wire.Sync)
    assert s.server_bytes(wire.ReadyForQuery(b"E").encode()) is None
    assert not to_client(s)
    assert s.is_wounded


def test_wound_while_idle_fails_the_transaction_at_once_and_answers_the_next_statement():
    s = cluster_ready()
    in_transaction(s)
    wound_idle(s)
    # the client's next statement reaches PostgreSQL, whose "current
    # transaction is aborted" becomes the wound's 40001
    upd = wire.Query("UPDATE t SET n = 2").encode()
    assert s.client_bytes(upd) == upd
    aborted = wire.error_response("25P02", "current transaction is aborted, commands ignored "
                                           "until end of transaction block")
    out = s.server_bytes(aborted + wire.ReadyForQuery(b"E").encode())
    assert out == WOUND + wire.ReadyForQuery(b"E").encode()
    assert not s.is_wounded
    # from then on PostgreSQL's own answers pass
    assert s.client_bytes(upd) == upd
    assert s.server_bytes(aborted + wire.ReadyForQuery(b"E").encode()) == \
        aborted + wire.ReadyForQuery(b"E").encode()


def test_wound_while_idle_then_commit_gets_40001_not_a_silent_rollback():
    # PostgreSQL answers COMMIT of a failed transaction with "ROLLBACK" and
    # no error: the client, who has not heard of the wound, must not take
    # that for a commit.
    for stmt in ("COMMIT", "PREPARE TRANSACTION 'mine'"):
        s = cluster_ready()
        in_transaction(s)
        wound_idle(s)
        assert s.client_bytes(wire.Query(stmt).encode()) is None
        assert not sent(s)
        assert to_client(s) == WOUND + wire.ReadyForQuery(b"E").encode()
        assert s.txn_status == b"E" and not s.is_wounded


def test_wound_while_idle_then_rollback_passes():
    s = cluster_ready()
    in_transaction(s)
    wound_idle(s)
    rb = wire.Query("ROLLBACK").encode()
    assert s.client_bytes(rb) == rb
    done = wire.CommandComplete("ROLLBACK").encode() + wire.ReadyForQuery(b"I").encode()
    assert s.server_bytes(done) == done
    assert s.txn_status == b"I" and not s.is_wounded


def test_a_statement_sent_while_the_wound_runs_is_held_then_answered():
    s = cluster_ready()
    in_transaction(s)
    assert s.wound("conflicts with MTM-2-1-5") is False
    msgs = sent(s)
    assert s.client_bytes(wire.Query("COMMIT").encode()) is None    # held
    assert not sent(s) and not to_client(s)
    s.server_bytes(answers(msgs, execute=WOUND))
    [sync] = sent(s)
    out = s.server_bytes(wire.ReadyForQuery(b"E").encode())
    assert to_client(s, out) == WOUND + wire.ReadyForQuery(b"E").encode()
    assert not sent(s)


def test_wound_with_a_half_sent_batch_fails_the_next_statement_with_40001():
    s = cluster_ready()
    in_transaction(s)
    first = wire.Parse("", "UPDATE t SET n = 2").encode() + wire.Bind("", "").encode()
    assert s.client_bytes(first) == first
    assert s.wound("conflicts with MTM-2-1-5") is False     # not idle: no statement of ours
    assert not s.effects
    s.server_bytes(wire.ParseComplete().encode() + wire.BindComplete().encode())
    returned = s.client_bytes(wire.Execute("", 0).encode() + wire.Sync().encode())
    # the proxy makes the transaction fail on the backend for real, instead
    # of running the client's Execute (its Sync waits)...
    msgs = sent(s, returned)
    assert not any(isinstance(m, wire.Execute) and m.portal == "" for m in msgs)
    assert "RAISE EXCEPTION" in msgs[2].sql and "40001" in msgs[2].sql
    out = s.server_bytes(answers(msgs, execute=wire.error_response("40001", "x")))
    # ...and the client gets the 40001 for its Execute; its Sync then
    # reaches the backend, which answers E
    assert to_client(s, out) == WOUND
    assert [type(m) for m in sent(s)] == [wire.Sync]
    out = s.server_bytes(wire.ReadyForQuery(b"E").encode())
    assert out == wire.ReadyForQuery(b"E").encode()
    assert s.txn_status == b"E" and s.wounded is None


def test_wound_while_running_rewrites_the_cancel():
    s = cluster_ready()
    in_transaction(s)
    s.client_bytes(wire.Query("UPDATE t SET n = 3").encode())
    assert s.wound("conflicts with MTM-2-1-6") is True      # running: the shell cancels
    cancel = wire.error_response("57014", "canceling statement due to user request")
    out = s.server_bytes(cancel + wire.ReadyForQuery(b"E").encode())
    err = wire.decode(b"E", out[5:out.index(b"Z\x00")], frontend=False)
    assert (err.sqlstate, err.message) == ("40001", "conflicts with MTM-2-1-6")


def test_one_wound_cancel_is_rewritten_wherever_its_57014s_land():
    # PostgreSQL's postmaster signals a backend and its process group, so one
    # cancel can produce two 57014 errors for one statement; and a cancel can
    # land after the statement it was meant for. Until the shell says the
    # cancel has settled, every 57014 is the wound's.
    s = cluster_ready()
    in_transaction(s)
    s.client_bytes(wire.Query("UPDATE t SET n = 3").encode())
    assert s.wound("conflicts with MTM-2-1-7") is True
    seq = s.wound_seq
    cancel = wire.error_response("57014", "canceling statement due to user request")
    out = s.server_bytes(cancel + cancel + wire.ReadyForQuery(b"E").encode())
    assert out.count(b"C40001\0") == 2 and b"C57014" not in out
    # the retried transaction blocks again: while the first cancel is in
    # flight no second one is asked for...
    s.client_bytes(wire.Query("ROLLBACK").encode())
    s.server_bytes(wire.CommandComplete("ROLLBACK").encode() + wire.ReadyForQuery(b"I").encode())
    in_transaction(s)
    s.client_bytes(wire.Query("UPDATE t SET n = 4").encode())
    assert s.wound("conflicts with MTM-2-1-8") is False
    # ...once it has settled, the session (still wounded, still running) is
    # cancelled again
    s.wound_cancel_settled(seq)
    assert s.wound("conflicts with MTM-2-1-9") is True and s.wound_seq == seq + 1
    s.wound_cancel_settled(seq)             # a stale timer changes nothing
    out = s.server_bytes(cancel + wire.ReadyForQuery(b"E").encode())
    assert b"C40001\0" in out and b"MTM-2-1-8" in out
    s.wound_cancel_settled(s.wound_seq)
    # after that a 57014 is the client's own cancel again
    s.client_bytes(wire.Query("ROLLBACK").encode())
    s.server_bytes(wire.CommandComplete("ROLLBACK").encode() + wire.ReadyForQuery(b"I").encode())
    in_transaction(s)
    s.client_bytes(wire.Query("SELECT pg_sleep(10)").encode())
    out = s.server_bytes(cancel + wire.ReadyForQuery(b"E").encode())
    assert b"C57014\0" in out


def test_wound_outside_a_transaction_does_nothing():
    s = cluster_ready()
    assert s.wound("x") is False and s.wounded is None


def test_copy_data_waits_for_its_own_copy_not_the_previous_one():
    """A client that sends COPY data without waiting for CopyInResponse
    (asyncpg): the data of a second COPY, arriving while the proxy's own
    BEGIN for it is unanswered, must not reach the backend before that
    COPY (the backend drops COPY data it gets outside a COPY)."""
    s = cluster_ready()
    begin_done = wire.CommandComplete("BEGIN").encode() + wire.ReadyForQuery(b"T").encode()
    copy = wire.Query("COPY t FROM STDIN").encode()
    data = wire.CopyData(b"1\n").encode() + wire.CopyDone().encode()
    for k in range(2):
        returned = s.client_bytes(copy)
        assert [type(m) for m in sent(s, returned)] == [wire.Query]      # our BEGIN
        # the COPY's data arrives while our BEGIN is unanswered: held
        assert s.client_bytes(data) is None and not sent(s)
        out = s.server_bytes(begin_done)
        assert out is None and messages(b"".join(
            e.data for e in s.effects if isinstance(e, SendServer))) == [
            wire.Query("COPY t FROM STDIN")]
        sent(s)
        out = s.server_bytes(wire.CopyInResponse(0, ()).encode())
        assert [type(m) for m in sent(s)] == [wire.CopyData, wire.CopyDone]
        assert to_client(s, out)[:1] == b"G"
        # the COPY ends; our commit check finds nothing for the peers (a
        # table of this node only, say): a plain COMMIT
        s.server_bytes(wire.CommandComplete("COPY 1").encode() + wire.ReadyForQuery(b"T").encode())
        [check] = sent(s)
        s.server_bytes(wire.DataRow((b"t", b"f", b"f", b"f", b"f")).encode()
                       + wire.CommandComplete("SELECT 1").encode()
                       + wire.ReadyForQuery(b"T").encode())
        [commit] = sent(s)
        assert commit.sql == "COMMIT"
        out = s.server_bytes(wire.CommandComplete("COMMIT").encode()
                             + wire.ReadyForQuery(b"I").encode())
        assert to_client(s, out).endswith(wire.CommandComplete("COPY 1").encode()
                                          + wire.ReadyForQuery(b"I").encode())
