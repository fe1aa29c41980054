"""The router: who gets a message, and handing it to the connections.

This is the seed's ``router.erl``. ``send(subject, body)`` delivers to every
connection of the subject itself and of every user subscribed to the subject.

Theory of operation
-------------------
A send reads the subject's
subscriber set from the store without decoding it, intersects it with the
fan-out target's index of who is online (see :mod:`cometd.online`), and hands
the message and those recipients to the fan-out target (the local
:class:`~cometd.connections.ConnectionTable`, or the backplane's presence in a
scaled-out deployment). So a send costs in proportion to the smaller of "who
is online" and "who subscribes", and both the intersection and the deliveries
yield to the hub every millisecond or so: a subject with a million
subscribers does not stall other requests.

Because a large fan-out yields, two sends from the same subject could
overtake each other. Sends are therefore serialised per subject: each
subject has a line (FIFO) of the sends that want it, and a send goes once it
is first in the line of every subject it has, so each connection sees one
subject's messages in the order they were sent; sends from different
subjects run concurrently.

A batch (:meth:`Router.send_batch`, ``POST /publish``, one ingest read) is
one send with many subjects: it joins all its subjects' lines in the same
loop turn, when it is called, so it keeps its place relative to every send
called before or after it (two reads of the ingest stream, one subject in
both, stay in stream order), and nothing deadlocks: the oldest send waiting
is first in each of its lines. It then takes consecutive ids for all its
messages, writes them to the history in one LevelDB write, and fans them out
one after the other in id order, in the caller's greenlet (the backplane's
presence, which waits for a delivery flush per message, groups the whole
batch first and waits once: ``deliver_many``). At most ``pool_size``
fan-outs run at once. With nobody online a message costs no subscriber
lookup: it is handed to the target with no recipients, so the target still
sees its key (a batch for nobody hands the connection table only its newest
message). And when nothing else is on its way either, a batch for nobody
takes no line, flight or slot: nothing it does yields, so none would be seen.

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
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from time import perf_counter
from typing import NamedTuple, Protocol

from gevent.event import Event
from gevent.lock import BoundedSemaphore

from cometd.history import History, format_ids
from cometd.metrics import FANOUT_SIZE, PUBLISH_TO_WRITE
from cometd.online import OnlineIndex, recipients, yield_to_hub
from cometd.store import SubscriptionStore
from cometd.streamhttp import Message

__all__ = ["Router", "Fanout", "Sent"]

LARGE_VALUE = 256 * 1024  # bytes of subscriber set (64K integer ids) worth a yield (~0.6 ms)


class Fanout(Protocol):
    """Where a routed message goes: delivers to every connection of *users*.

    A target whose index maps users to something else than their ids (the
    connection table: their connections) has ``deliver_online``, which the
    router hands the walk's values instead (see :mod:`cometd.online`).
    """

    #: who is online, kept up to date by the target
    index: OnlineIndex

    def deliver(self, users: Iterable[str], message: Message) -> int:
        """Write *message* to *users*' connections; *users* is empty with nobody online."""

    def online(self, user: str) -> int: ...

    def settle(self, low: int | None) -> None:
        """*low* is the smallest message key still being routed (None: none)."""


class Sent(NamedTuple):
    """What a send did: connections written to, and the message's id."""

    delivered: int
    id: str


#: Sent._make without its Python frame (one a message of a batch)
_new_sent = partial(tuple.__new__, Sent)


class _Ticket:
    """A send's place in the lines of its subjects."""

    __slots__ = ("ahead", "turn")

    def __init__(self) -> None:
        self.ahead = 0  # lines where another send is first
        self.turn: Event | None = None  # set when ahead drops to 0


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
        # At most pool_size fan-outs at once, each in its caller's greenlet.
        self._slots = BoundedSemaphore(pool_size)
        # subject -> the sends holding (first) or waiting for it, in arrival order
        self._subject_locks: dict[str, deque[_Ticket]] = {}
        # [key, done] of each message from its id to the end of its fan-out, in
        # key order: the fan-out target holds back a message for a connection
        # while a smaller key is still on its way (see ConnectionTable.settle).
        self._inflight: deque[list] = deque()

    def send(self, subject: str, body: bytes, mark: bytes | None = None) -> Sent:
        """Deliver *body* from *subject*: connections written to and the message id.

        *subject* must be a valid id (see :mod:`cometd.ids`); *mark* is written
        with the message's history (see :meth:`History.record`).
        """
        return self.send_batch(((subject, body),), None if mark is None else (mark,))[0]

    def send_batch(self, messages: Sequence[tuple[str, bytes]],
                   marks: Sequence[bytes | None] | None = None) -> list[Sent]:
        """Deliver each ``(subject, body)`` in order; what each send did, in order.

        The batch gets consecutive ids in its order, one history write (with
        *marks*, one per message or None, see :meth:`History.record_batch`)
        and one fan-out. Every message is validated by the caller: a failure
        here (a store read that fails) raises, and then the messages before
        it were delivered and all of them are in the history.
        """
        if not messages:
            return []
        start = perf_counter()
        self.messages_sent += len(messages)
        lines = self._subject_locks
        if not lines and not self.fanout.index:
            # Nothing else on its way and nobody online: nothing below yields
            # (no recipients, and every fan-out slot is free), so no other
            # send can come in between, and the lines, the flight and the
            # slot would each be taken and given back unseen.
            keys = self.history.record_batch(messages, marks)
            return list(map(_new_sent, zip(self._to_nobody(messages, keys, start),
                                           format_ids(keys[0], len(keys)), strict=True)))
        # A place in every subject's line at once (see the module docstring).
        ticket = _Ticket()
        subjects = dict.fromkeys([subject for subject, _ in messages])
        for subject in subjects:
            line = lines.get(subject)
            if line is None:
                lines[subject] = deque((ticket,))
            else:
                line.append(ticket)
                ticket.ahead += 1
        try:
            if ticket.ahead:
                ticket.turn = Event()
                ticket.turn.wait()
            # The ids come in lock order, so one subject's ids follow its
            # delivery order, and in one loop turn, so the batch's are
            # consecutive; they are kept in that turn too (see
            # cometd.history: every id handed out is in the history).
            keys = self.history.record_batch(messages, marks)
            # One flight for the whole batch: [its smallest key not yet
            # fanned out, done]. Its keys are consecutive, so the flights
            # stay in key order and the first one's key is the smallest
            # still on its way (see settle).
            flight = [keys[0], False]
            self._inflight.append(flight)
            if len(self._inflight) == 1:
                self.fanout.settle(keys[0])
            with self._slots:
                delivered = self._dispatch(messages, keys, flight, start)
            return list(map(_new_sent, zip(delivered, format_ids(keys[0], len(keys)),
                                           strict=True)))
        finally:
            for subject in subjects:
                line = lines[subject]
                if line[0] is not ticket:
                    line.remove(ticket)  # killed while waiting
                    continue
                line.popleft()
                if not line:
                    del lines[subject]
                    continue
                after = line[0]
                after.ahead -= 1
                if not after.ahead:
                    after.turn.set()

    def _dispatch(self, messages: Sequence[tuple[str, bytes]], keys: list[int],
                  flight: list, start: float) -> list[int]:
        """Fan out each message in id order; how many connections each reached."""
        fanout = self.fanout
        index = fanout.index
        inflight = self._inflight
        many = getattr(fanout, "deliver_many", None)
        try:
            if not index:
                return self._to_nobody(messages, keys, start)
            if many is not None and len(messages) > 1:
                # The backplane's presence waits for a flush per deliver:
                # group the whole batch, then wait once; its messages are
                # written by the same flush.
                delivered = many(self._grouped(messages, keys, index))
                PUBLISH_TO_WRITE.observe_many(perf_counter() - start, len(delivered))
                for n in delivered:
                    FANOUT_SIZE.observe(n)
                return delivered
            delivered = []
            deliver, last = getattr(fanout, "deliver_online", fanout.deliver), keys[-1]
            idle = 0  # messages for nobody: their metrics go in once
            for key, (subject, body) in zip(keys, messages, strict=True):
                message = Message(subject, body, key)
                if not index:
                    # Nobody online any more (they left while a fan-out
                    # yielded): see _to_nobody, here message by message.
                    delivered.append(deliver((), message))
                    idle += 1
                    continue
                try:
                    n = deliver(self._recipients(message, index), message)
                finally:
                    flight[0] = key + 1
                    if key != last and inflight[0] is flight:
                        fanout.settle(key + 1)
                # Once per message, never per recipient (see cometd.metrics).
                PUBLISH_TO_WRITE.observe(perf_counter() - start)
                FANOUT_SIZE.observe(n)
                delivered.append(n)
            if idle:
                PUBLISH_TO_WRITE.observe_many(perf_counter() - start, idle)
                FANOUT_SIZE.observe_many(0, idle)
            return delivered
        finally:
            # Done, or a failure (a store read) ended the batch: the messages
            # left are in the history, not on their way any more.
            flight[1] = True
            if inflight[0] is flight:
                while inflight and inflight[0][1]:
                    inflight.popleft()
                fanout.settle(inflight[0][0] if inflight else None)

    def _to_nobody(self, messages: Sequence[tuple[str, bytes]], keys: list[int],
                   start: float) -> list[int]:
        """Hand a batch to the target with nobody online: 0 connections each.

        Nothing here yields, so nobody logs in before the batch ends: no
        subscriber lookups, nothing to hold back. The target still sees the
        keys: the connection table is handed only the newest message (what
        it keeps is the newest key, a fresh stream's welcome id), the
        backplane's presence, which groups every key in order, each one.
        """
        fanout = self.fanout
        many = getattr(fanout, "deliver_many", None)
        if many is not None and len(messages) > 1:
            many(((), Message(subject, body, key))
                 for key, (subject, body) in zip(keys, messages, strict=True))
        else:
            subject, body = messages[-1]
            fanout.deliver((), Message(subject, body, keys[-1]))
        PUBLISH_TO_WRITE.observe_many(perf_counter() - start, len(keys))
        FANOUT_SIZE.observe_many(0, len(keys))
        return [0] * len(keys)

    def _grouped(self, messages: Sequence[tuple[str, bytes]], keys: list[int],
                 index: OnlineIndex) -> Iterator[tuple[Iterable[str], Message]]:
        """Each message of a batch and its recipients, for ``deliver_many``."""
        for key, (subject, body) in zip(keys, messages, strict=True):
            message = Message(subject, body, key)
            yield (self._recipients(message, index) if index else ()), message

    def _recipients(self, message: Message, index: OnlineIndex) -> Iterable[str]:
        subscribers = self.store.subscriber_view(message.subject)
        if subscribers.nbytes > LARGE_VALUE:
            # Unless the store had it in memory, LevelDB copied (and maybe
            # decompressed) the whole value: ~2.5 ms for a million ids. Let the
            # loop go round before the next step, or the queued sends of this
            # subject would each run their lookup in the same loop turn (the
            # lock hands over by callback) and hold every other request for
            # all of them.
            yield_to_hub()
        # The backplane's presence looks recipients up its own way (see
        # cometd.backplane.Presence.recipients); the connection table walks them.
        walk = getattr(self.fanout, "recipients", recipients)
        return walk(message.subject, subscribers, index)

    def online(self, user: str) -> int:
        return self.fanout.online(user)
