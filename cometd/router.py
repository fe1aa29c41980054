"""The router: who gets a message, and handing it to the connections.

This is the seed's ``router.erl``. ``send(subject, body)`` delivers to every
connection of the subject itself and of every user subscribed to the subject.

Theory of operation
-------------------
Each send runs in a greenlet of a bounded pool: it reads the subject's
subscriber set from the store without decoding it, intersects it with the
fan-out target's index of who is online (see :mod:`cometd.online`), and hands
the message and those recipients to the fan-out target (the local
:class:`~cometd.connections.ConnectionTable`, or the backplane's presence in a
scaled-out deployment). So a send costs in proportion to the smaller of "who
is online" and "who subscribes", and both the intersection and the deliveries
yield to the hub every millisecond or so: a subject with a million
subscribers does not stall other requests.

Because a large fan-out yields, two sends from the same subject could
overtake each other. Sends are therefore serialised per subject with a FIFO
lock, so each connection sees one subject's messages in the order they were
sent; sends from different subjects run concurrently.

Each message gets its id (:mod:`cometd.history`) in its subject's lock, so
ids follow that order too. Across subjects, a fan-out that yields could let
a later message reach a connection before an earlier one, and then a stream
that resumes from its last id would skip the earlier one. So the router
tells the fan-out target the smallest key still on its way (``settle``), and
the local connection table holds a message back for a connection while a
smaller key may still come: every stream sees ids in increasing order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from time import perf_counter
from typing import NamedTuple, Protocol

from gevent.lock import Semaphore
from gevent.pool import Pool

from cometd.history import History, format_id
from cometd.metrics import FANOUT_SIZE, PUBLISH_TO_WRITE
from cometd.online import OnlineIndex, recipients, yield_to_hub
from cometd.store import SubscriptionStore
from cometd.streamhttp import Message

__all__ = ["Router", "Fanout", "Sent"]

LARGE_VALUE = 256 * 1024  # bytes of subscriber set (64K integer ids) worth a yield (~0.6 ms)


class Fanout(Protocol):
    """Where a routed message goes: delivers to every connection of *users*."""

    #: who is online, kept up to date by the target
    index: OnlineIndex

    def deliver(self, users: Iterable[str], message: Message) -> int: ...

    def online(self, user: str) -> int: ...

    def settle(self, low: int | None) -> None:
        """*low* is the smallest message key still being routed (None: none)."""


class Sent(NamedTuple):
    """What a send did: connections written to, and the message's id."""

    delivered: int
    id: str


class Router:
    """Routes messages from a subject to its subscribers' connections."""

    def __init__(self, store: SubscriptionStore, fanout: Fanout, history: History,
                 pool_size: int = 64) -> None:
        self.store = store
        self.fanout = fanout
        #: hands out message ids and keeps each subject's recent messages
        self.history = history
        #: messages accepted by :meth:`send`
        self.messages_sent = 0
        self._pool = Pool(pool_size)
        self._subject_locks: dict[str, list] = {}  # subject -> [Semaphore, users]
        # [key, done] of each message from its id to the end of its fan-out, in
        # key order: the fan-out target holds back a message for a connection
        # while a smaller key is still on its way (see ConnectionTable.settle).
        self._inflight: deque[list] = deque()

    def send(self, subject: str, body: bytes, mark: bytes | None = None) -> Sent:
        """Deliver *body* from *subject*: connections written to and the message id.

        *subject* must be a valid id (see :mod:`cometd.ids`); *mark* is written
        with the message's history (see :meth:`History.record`).
        """
        start = perf_counter()
        message = Message(subject, body)
        self.messages_sent += 1
        entry = self._subject_locks.get(subject)
        if entry is None:
            entry = self._subject_locks[subject] = [Semaphore(), 0]
        entry[1] += 1
        try:
            with entry[0]:
                # The id comes in lock order, so one subject's ids follow its
                # delivery order; it is kept in the same loop turn (see
                # cometd.history: every id handed out is in the history).
                message.key = self.history.record(subject, body, mark)
                flight = [message.key, False]
                self._inflight.append(flight)
                if len(self._inflight) == 1:
                    self.fanout.settle(message.key)
                delivered = self._pool.spawn(self._dispatch, message, flight).get()
            # Once per message, never per recipient (see cometd.metrics).
            PUBLISH_TO_WRITE.observe(perf_counter() - start)
            FANOUT_SIZE.observe(delivered)
            return Sent(delivered, format_id(message.key))
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._subject_locks[subject]

    def _dispatch(self, message: Message, flight: list) -> int:
        try:
            return self._fan_out(message)
        finally:
            flight[1] = True
            inflight = self._inflight
            if inflight[0] is flight:
                while inflight and inflight[0][1]:
                    inflight.popleft()
                self.fanout.settle(inflight[0][0] if inflight else None)

    def _fan_out(self, message: Message) -> int:
        subscribers = self.store.subscriber_view(message.subject)
        if subscribers.nbytes > LARGE_VALUE:
            # Unless the store had it in memory, LevelDB copied (and maybe
            # decompressed) the whole value: ~2.5 ms for a million ids. Let the
            # loop go round before the next step, or the queued sends of this
            # subject would each run their lookup in the same loop turn (the
            # lock hands over by callback) and hold every other request for
            # all of them.
            yield_to_hub()
        return self.fanout.deliver(
            recipients(message.subject, subscribers, self.fanout.index), message
        )

    def online(self, user: str) -> int:
        return self.fanout.online(user)
