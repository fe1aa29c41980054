"""Who is online, indexed so that a send finds its online recipients cheaply.

A send goes to the subject's subscribers who are online. Decoding the whole
subscriber set and looking every id up cost ~77 ms of a single event loop per
send for a user with 200,000 subscribers, even with nobody online. Here the
set stays encoded (a :class:`~cometd.store.SetView`) and is intersected with
an :class:`OnlineIndex`, which both fan-out targets keep up to date as users
log in and out: the :class:`~cometd.connections.ConnectionTable` of a single
process and the router's :class:`~cometd.backplane.Presence`.

Theory of operation
-------------------
The index holds integer ids as ``int`` keys and names as ``str`` keys, as the
store splits them, so no stored id is converted to a string; each maps to
what its target delivers to (the connection table's: the user's list of
connections), and the walks hand out those values. :func:`online_subscribers`
walks the smaller side:

- **probe** (few online, many subscribers): each online id is looked up in
  the sorted subscriber array by binary search (~0.6 us each);
- **scan** (many online, few subscribers, the usual case): each subscriber is
  looked up in the index (~27 ns each, in C via ``map``).

The walk goes in batches of roughly a millisecond and yields to the hub
between them, so even a set both huge and mostly offline delays other
requests by about one batch. Each id is looked up in the index when it is
handed out (a probe's hits again), since the consumer (a delivery loop)
yields too and a user may have logged out meanwhile. The batches
reach the delivery loop through C iterators (``chain``, ``map``, ``filter``):
a generator of ours resumes once per batch, never once per recipient. The
probe walks a copy of the index's keys: logins during the walk must not
break it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from typing import TYPE_CHECKING

import gevent

from cometd.ids import int_value

if TYPE_CHECKING:
    from cometd.store import SetView

__all__ = ["OnlineIndex", "online_subscribers", "recipients", "yield_to_hub"]

# Relative cost of probing one online id versus scanning one subscriber
# (binary search ~0.6 us, dict lookup ~27 ns; measured, see BENCHMARKS.md).
PROBE_COST = 20
PROBE_BATCH = 1_000  # online ids probed between yields (~0.6 ms)
SCAN_BATCH = 32_768  # subscribers scanned between yields (~0.9 ms)
# Names: probing one is a binary search over the text (~6 us); scanning costs
# a split and a set lookup per name, ~5 ns per byte of names text.
NAME_PROBE_BYTES = 1_000  # probe when online names x this < bytes of names text
NAME_PROBE_BATCH = 100  # (~0.6 ms)
NAME_SCAN_BYTES = 256 * 1024  # (~1.3 ms)


def yield_to_hub() -> None:
    """Let the event loop go round once (poll sockets, run what is due)."""
    # A timer due at once, not sleep(0): sleep(0) only queues a callback, and
    # gevent polls sockets after 50 of those, so a fan-out made of callbacks
    # let no request in. A due timer makes the loop go round once, polling
    # sockets without blocking (~3 us).
    gevent.sleep(1e-6)


class OnlineIndex:
    """The users online, split into integer ids and names as the store does.

    Each maps to what its fan-out target delivers to: the user id itself
    unless the target says (the connection table: the user's list of
    connections, so a delivery costs no second lookup).
    """

    __slots__ = ("ints", "names")

    def __init__(self) -> None:
        #: integer id -> its value
        self.ints: dict[int, object] = {}
        #: the other ids -> their values
        self.names: dict[str, object] = {}

    def add(self, user: str, value: object = None) -> None:
        """*user* is online; the walks hand out *value* for it (None: *user*)."""
        if value is None:
            value = user
        number = int_value(user)
        if number is None:
            self.names[user] = value
        else:
            self.ints[number] = value

    def discard(self, user: str) -> None:
        number = int_value(user)
        if number is None:
            self.names.pop(user, None)
        else:
            self.ints.pop(number, None)

    def __len__(self) -> int:
        return len(self.ints) + len(self.names)


def online_subscribers(
    subscribers: SetView, index: OnlineIndex, pause: Callable[[], None] = yield_to_hub
) -> Iterator:
    """The values in *index* of *subscribers* who are online, each once; *pause* between
    batches."""
    return _online(subscribers, index, pause, None)


def recipients(
    subject: str, subscribers: SetView, index: OnlineIndex,
    pause: Callable[[], None] = yield_to_hub,
) -> Iterator:
    """Who gets a send, as *index*'s values: *subject* itself if online ("always
    subscribed to ourselves"), then its online subscribers, each once (a stored
    self-subscription is not a second path)."""
    # Filtering the subject out costs every recipient (~25 ns, a third of the
    # walk's share), so only a set that holds its own subject gets the filter.
    number = int_value(subject)
    if number is None:
        me, stored = index.names.get(subject), subscribers.has_name(subject)
    else:
        me, stored = index.ints.get(number), subscribers.has_int(number)
    found = _online(subscribers, index, pause, me if stored else None)
    return found if me is None else chain((me,), found)


def _online(subscribers: SetView, index: OnlineIndex, pause, skip: object) -> Iterator:
    # No Python code of ours runs per recipient: each level of generators
    # between the batches and the delivery loop costs every recipient a
    # resume (four levels took about a fifth of the fan-out's Python time in
    # the profile in BENCHMARKS.md). So each batch is mapped and filtered
    # lazily, in C: an id is looked up in the index only when the consumer
    # takes it, once, and since the consumer (a delivery loop) yields too, a
    # user who logged out meanwhile is dropped (``get`` gives None). A set
    # of integer ids that one scan batch covers (a friends feed's, the usual
    # send) is one ``map`` over the stored array: no generator, no list of
    # hits.
    online, names = index.ints, index.names
    ints = subscribers.ints
    if (not subscribers.names_text and len(ints) <= SCAN_BATCH
            and len(online) * PROBE_COST >= len(ints)):
        found = filter(None, map(online.get, ints))
    else:
        found = filter(None, chain.from_iterable(chain(
            (map(online.get, part) for part in _online_ints(ints, online, pause)),
            (map(names.get, hits) for hits in _online_names(subscribers, names, pause)),
        )))
    return found if skip is None else filter(skip.__ne__, found)


def _online_ints(followers: memoryview, online: dict[int, object], pause
                 ) -> Iterator[Sequence[int]]:
    """Batches of ids in *followers* to look up in *online*: probed hits, or scanned slices."""
    n = len(followers)
    if not n or not online:
        return
    if len(online) * PROBE_COST < n:
        ids = list(online)
        for start in range(0, len(ids), PROBE_BATCH):
            if start:
                pause()
            hits = []
            for number in ids[start : start + PROBE_BATCH]:
                i = bisect_left(followers, number)
                if i < n and followers[i] == number:
                    hits.append(number)
            yield hits
    else:
        for start in range(0, n, SCAN_BATCH):
            if start:
                pause()
            yield followers[start : start + SCAN_BATCH]


def _online_names(subscribers: SetView, online: dict[str, object], pause
                  ) -> Iterator[list[str]]:
    """Batches of the names in *subscribers* that are in *online*."""
    text = subscribers.names_text
    if not text or not online:
        return
    if len(online) * NAME_PROBE_BYTES < len(text):
        names = list(online)
        for start in range(0, len(names), NAME_PROBE_BATCH):
            if start:
                pause()
            yield [u for u in names[start : start + NAME_PROBE_BATCH] if subscribers.has_name(u)]
    else:
        start = 0
        while start < len(text):
            if start:
                pause()
            end = text.find(b" ", start + NAME_SCAN_BYTES)
            if end < 0:
                end = len(text)
            words = text[start:end].decode("ascii").split(" ")
            yield list(filter(online.__contains__, words))
            start = end + 1
