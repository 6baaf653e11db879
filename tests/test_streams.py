"""The stream design's pure parts (replication/sender.py, generations.py, link.py):
what a slot may be confirmed to, which stream a node asks each peer for,
generation markers, and the mode request frame."""
from __future__ import annotations

import pytest

from consensus.gens import DEAD, ONLINE, RECOVERY
from replication import link
from replication.generations import plan_streams
from replication.sender import Coverage, parse_marker

OWN, ALL, NONE = link.OWN, link.ALL, link.NONE


# --- Coverage: what the peer can never need again from this slot ----------------------------------

def test_sent_transactions_are_confirmed_once_acknowledged():
    c = Coverage()
    c.add(10, None)
    c.add(20, None)
    never = lambda g: False         # noqa: E731
    assert c.advance(0, never) == 0
    assert c.advance(10, never) == 10
    assert c.advance(25, never) == 20
    assert not c.q


def test_covered_transactions_confirm_at_once_when_nothing_is_pending():
    c = Coverage()
    c.add(5, 0)                     # this node's, reported done, or empty
    assert c.confirmable == 5 and not c.q
    c.add(10, None)
    c.add(15, 0)                    # behind a sent one: waits for its ack
    assert c.advance(0, lambda g: False) == 5
    assert c.advance(10, lambda g: False) == 15


def test_a_foreign_transaction_holds_the_slot_until_the_peer_is_online_in_its_generation():
    """Another origin's transaction of generation 4, skipped in OWN mode:
    the peer may still have to catch up from this node from before it."""
    c = Coverage()
    c.add(10, None)
    c.add(20, 4)
    c.add(30, None)
    online_in = {"peer": 3}
    covered = lambda g: online_in["peer"] >= g      # noqa: E731
    assert c.advance(30, covered) == 10             # acknowledged past it, still held
    online_in["peer"] = 4
    assert c.advance(30, covered) == 30


def test_runs_of_skipped_transactions_merge_to_the_highest_generation():
    c = Coverage()
    c.add(10, None)
    for end, gen in ((11, 2), (12, 0), (13, 5), (14, 3)):
        c.add(end, gen)
    assert [list(e) for e in c.q] == [[10, None], [14, 5]]      # bounded by what is in flight
    assert c.advance(10, lambda g: g <= 4) == 10
    assert c.advance(10, lambda g: g <= 5) == 14


def test_confirmable_never_goes_back():
    c = Coverage()
    c.add(50, 0)
    c.add(60, None)
    assert c.advance(55, lambda g: True) == 50
    assert c.advance(70, lambda g: True) == 60


# --- which stream to ask each peer for ------------------------------------------------------------

def _plan(**kw):
    args = dict(status=ONLINE, reached=False, members={1, 2, 3}, online={1, 2, 3},
                donors={1, 2, 3}, connected={2, 3}, donor=None)
    args.update(kw)
    return plan_streams(1, [2, 3], **args)


def test_an_online_node_takes_each_peers_own_transactions():
    assert _plan() == ({2: OWN, 3: OWN}, None)


def test_a_node_out_of_the_generation_catches_up_from_one_donor_only():
    modes, donor = _plan(status=DEAD, members={2, 3}, online={2, 3}, donors={2, 3})
    assert donor == 2 and modes == {2: ALL, 3: NONE}
    # the donor is kept while it qualifies
    assert _plan(status=DEAD, members={2, 3}, online={2, 3}, donors={2, 3}, donor=3) \
        == ({2: NONE, 3: ALL}, 3)
    # not connected: another one; nobody: nothing at all
    assert _plan(status=DEAD, members={2, 3}, online={2, 3}, donors={2, 3}, donor=3,
                 connected={2})[1] == 2
    assert _plan(status=DEAD, members={2, 3}, online={2, 3}, connected=set()) \
        == ({2: NONE, 3: NONE}, None)


def test_a_recovering_member_copies_from_a_donor_of_its_generation_until_its_marker():
    # 3 went ONLINE in this generation after the switch: its marker is no cut
    modes, donor = _plan(status=RECOVERY, online={2, 3}, donors={2})
    assert donor == 2 and modes == {2: ALL, 3: NONE}
    assert _plan(status=RECOVERY, online={3}, donors={2}, connected={3}) \
        == ({2: NONE, 3: NONE}, None)
    # once it applied the donor's marker it takes every peer's own transactions
    assert _plan(status=RECOVERY, reached=True, online={2, 3}, donors={2}) \
        == ({2: OWN, 3: OWN}, None)


# --- markers and the mode request -----------------------------------------------------------------

def test_markers_say_their_generation_members_and_whether_written_as_a_donor():
    assert parse_marker(b'{"gen":7,"members":[1,3],"donor":true}') == \
        {"gen": 7, "members": [1, 3], "donor": True}
    assert parse_marker("5") == {"gen": 5, "members": [], "donor": False}   # an older marker
    for bad in (b"", b"x", b"[1]", b'{"members":[1]}', b'{"gen":"7"}'):
        assert parse_marker(bad) is None


@pytest.mark.parametrize("mode, gen", [(OWN, 0), (ALL, 12), (NONE, 0), (ALL, 2 ** 32 - 1)])
def test_mode_request_round_trips(mode, gen):
    [(kind, payload)] = link.FrameReader().feed(link.mode_request(mode, gen))
    assert kind == b"M" and link.decode_mode_request(payload) == (mode, gen)


@pytest.mark.parametrize("payload", [b"", b"o", b"x\0\0\0\0", b"a\0\0\0", b"a\0\0\0\0\0"])
def test_bad_mode_requests_are_refused(payload):
    with pytest.raises(link.LinkError):
        link.decode_mode_request(payload)
