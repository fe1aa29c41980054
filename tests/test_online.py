"""Who of a subscriber set is online: the intersection, in-process, on real encoded sets.

Each case runs both walks (probing the online ids in the set, scanning the set
against the index) by forcing the cost thresholds, with batches small enough
that the walk pauses between them, and compares with plain set arithmetic.
"""

from __future__ import annotations

import random

import pytest

import cometd.online as online
from cometd.ids import int_value
from cometd.online import OnlineIndex, online_subscribers, recipients
from cometd.store import SetView, encode_set

WALKS = {
    # probe: cost thresholds so low that the online side is always walked
    "probe": {"PROBE_COST": 0, "NAME_PROBE_BYTES": 0},
    "scan": {"PROBE_COST": 10**9, "NAME_PROBE_BYTES": 10**9},
}


@pytest.fixture(params=sorted(WALKS))
def walk(request, monkeypatch):
    for name, value in WALKS[request.param].items():
        monkeypatch.setattr(online, name, value)
    for name, value in (("PROBE_BATCH", 7), ("SCAN_BATCH", 7), ("NAME_PROBE_BATCH", 3),
                        ("NAME_SCAN_BYTES", 16)):
        monkeypatch.setattr(online, name, value)
    return request.param


def view(ids: set[str]) -> SetView:
    ints = {int_value(i) for i in ids} - {None}
    return SetView(encode_set(ints, {i for i in ids if int_value(i) is None}))


def index_of(ids) -> OnlineIndex:
    index = OnlineIndex()
    for user in ids:
        index.add(user)
    return index


class Pauses:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


def test_online_subscribers_is_the_intersection(walk):
    rng = random.Random(7)
    subscribers = {str(n) for n in rng.sample(range(10_000), 300)}
    subscribers |= {f"user:{n}" for n in rng.sample(range(10_000), 200)} | {"007", "4294967296"}
    on = {str(n) for n in rng.sample(range(10_000), 400)} | {"0", "007", "4294967296", "zed"}
    on |= {f"user:{n}" for n in rng.sample(range(10_000), 300)}
    on |= set(rng.sample(sorted(subscribers), 40))  # a sure overlap of both kinds
    pauses = Pauses()
    got = list(online_subscribers(view(subscribers), index_of(on), pauses))
    assert sorted(got) == sorted(subscribers & on)
    assert len(got) == len(set(got))
    assert pauses.n > 5  # the walk went in batches


@pytest.mark.parametrize("subscribers, on", [
    (set(), {"1", "a"}),  # nobody subscribes
    ({"1", "a"}, set()),  # nobody online
    ({"1", "2"}, {"a", "b"}),  # ints against names: no overlap
    ({"a", "b"}, {"1", "2"}),
    ({"4294967295", "0"}, {"4294967295", "0"}),  # the ends of the integer range
    ({"a"}, {"a"}),
    ({"aa", "ab", "b"}, {"a", "ab", "abc", "ba"}),  # prefixes are not matches
])
def test_edge_cases(walk, subscribers, on):
    assert sorted(online_subscribers(view(subscribers), index_of(on), Pauses())) == sorted(
        subscribers & on)


def test_a_user_who_logs_out_mid_walk_is_not_handed_out(walk):
    subscribers = {str(n) for n in range(100)} | {f"n{n}" for n in range(100)}
    index = index_of(subscribers)
    got: list[str] = []
    handed_before_pause: list[int] = []

    def everyone_leaves() -> None:  # at the walk's first pause, all still online log out
        if not handed_before_pause:
            handed_before_pause.append(len(got))
            for user in subscribers:
                index.discard(user)

    for user in online_subscribers(view(subscribers), index, everyone_leaves):
        got.append(user)
    assert handed_before_pause and 0 < handed_before_pause[0] < len(subscribers)
    assert len(got) == handed_before_pause[0]  # nobody after the pause


@pytest.mark.parametrize("kind", ["ints", "names"])
def test_a_hit_that_logs_out_before_it_is_handed_out_is_skipped(walk, kind):
    subscribers = {str(n) if kind == "ints" else f"n{n}" for n in range(50)}
    index = index_of(subscribers)
    got = []
    for user in online_subscribers(view(subscribers), index, Pauses()):
        got.append(user)
        for other in subscribers:  # while the first is served, everyone else leaves
            index.discard(other)
    assert len(got) == 1


def test_recipients_are_the_subject_then_its_online_subscribers_once(walk):
    subject = "42"
    on = {"42", "1", "2", "x"}
    # A self-subscription stored before it was refused is not a second path.
    for subscribers in ({"1", "x", "y"}, {"1", "x", "y", "42"}):
        got = list(recipients(subject, view(subscribers), index_of(on), Pauses()))
        assert got[0] == subject
        assert sorted(got[1:]) == ["1", "x"]
    # The same for a name.
    got = list(recipients("bob", view({"bob", "1", "zed"}), index_of({"bob", "1", "zed"}),
                          Pauses()))
    assert got[0] == "bob" and sorted(got[1:]) == ["1", "zed"]
    # An offline subject is not handed out, nor an offline self-subscription.
    assert list(recipients("bob", view({"1"}), index_of({"1"}), Pauses())) == ["1"]
    assert list(recipients("42", view({"1", "42"}), index_of({"1"}), Pauses())) == ["1"]


def test_the_walks_hand_out_the_index_values(walk):
    # The connection table maps each user to its connections: a recipient
    # costs no second lookup. Each value comes once, the subject's first.
    index = OnlineIndex()
    values = {u: [u.upper()] for u in ("1", "2", "3", "bob", "eve")}
    for user, value in values.items():
        index.add(user, value)
    got = list(recipients("bob", view({"1", "3", "eve", "bob", "9"}), index, Pauses()))
    assert got[0] is values["bob"]
    assert sorted(map(id, got[1:])) == sorted(id(values[u]) for u in ("1", "3", "eve"))


def test_index_splits_ids_as_the_store_does():
    index = index_of(["1", "007", "4294967296", "a:b", "0"])
    assert index.ints == {1: "1", 0: "0"}
    assert set(index.names) == {"007", "4294967296", "a:b"}
    assert len(index) == 5
    index.discard("1")
    index.discard("007")
    index.discard("never-there")
    assert index.ints == {0: "0"} and set(index.names) == {"4294967296", "a:b"}


def test_a_small_set_of_ids_is_looked_up_as_it_is_taken():
    # At the default thresholds a feed's set (integer ids, within one scan
    # batch) is walked in one lazy pass: each id is looked up when the
    # delivery loop takes it, so who logs out meanwhile is not handed out.
    subscribers = {str(n) for n in range(1, 31)}
    index = index_of({str(n) for n in range(1, 31, 2)} | {"99", "x"})
    assert sorted(online_subscribers(view(subscribers), index), key=int) == [
        str(n) for n in range(1, 31, 2)]
    got = []
    for user in recipients("99", view(subscribers), index):
        got.append(user)
        if len(got) == 3:
            for other in subscribers - set(got):
                index.discard(other)
    assert got[0] == "99" and len(got) == 3
