"""Scale-out over Redis: one router process, many edge processes.

One process can hold ~19,900 connections here (20,000 open files) and uses
one core, and only one process can open the LevelDB store. So, as the seed
split its Erlang router from its connection handlers, cometd splits:

- the **router** (``cometd router``) owns the store, the presence table (which
  edge holds which user's connections), the admin console and the send logic;
- **edges** (``cometd edge``) hold connections and serve the HTTP interface,
  passing ``POST /send`` and the subscription calls to the router.

Redis keys and channels
-----------------------
``cometd:requests``        list: edge -> router calls (send, add, remove, lookups, stats)
``cometd:reply:<edge>``    channel: router -> one edge, call results
``cometd:edge:<edge>``     channel: router -> one edge, delivery batches
``cometd:presence``        channel: edges -> router, presence changes and heartbeats
``cometd:control``         channel: router -> all edges, "send me a full snapshot",
                           ``{"kick": [user, ...]}``: end those users' streams, or
                           ``{"head": id}``: the newest message id handed out

Theory of operation
-------------------
A send looks subscribers up once, groups the online ones by edge, and
publishes **one batch per edge** (message + user ids), never one Redis
message per recipient; the batches of one send leave in one pipelined round
trip. The grouping is array work, done once per flush for all the messages
in it: presence keeps, per integer user id, the edge holding the user's
connections (:meth:`Presence.batches`), and a batch is laid out to be built
from slices of those arrays and read back with a few (:func:`encode_batch`).
Calls and replies travel in batches as well: an edge pushes every call
made while its previous push was in flight with one RPUSH, and the router pops
up to ``CALL_BATCH`` calls per round trip and pipelines the replies that are
ready. Per-subject ordering holds end to end: the router serialises sends per
subject and Redis keeps a list's and a channel's order. So does id order
across subjects, per edge: the router publishes a message only once every
smaller id is grouped (see :meth:`Presence._grouped_key`), so a stream on an
edge sees ids rise, as in one process, and a resume from its last id misses
nothing.

Presence is soft state, rebuilt rather than persisted. Edges publish the
connection counts of users that changed (batched over 100 ms) and a heartbeat
every second. An edge that stops says goodbye; one that dies cannot, but its
Redis connections close with it, so the router, which asks Redis every
``EXPIRE_EVERY`` which edges still listen on their delivery channel, forgets
it within a second. One that is cut off (a partition, a hung host) is
forgotten once the router has not heard from it in 3 s, or in 30 s while it
still listens on its delivery channel (Redis keeps its batches for it: a
starved edge delivers them late, where a forgotten one would miss them).
Either way its users leave presence. The router asks for full snapshots when it starts, when
its Redis connection comes back, and when it hears from an edge it does not
know (a router restart). Edges re-send a snapshot after their own Redis
reconnects. A starting router answers calls only after ``SYNC_GRACE``, once
the snapshots are in, and an edge that gave up on a call (503) takes it back
off the request list, so a router that returns later does not run it. So
after a Redis restart, an edge kill or a router restart, presence is whole
again within a few seconds, and subscriptions, which live in LevelDB, are
never at stake.

The router also hands out message ids and keeps the history (see
:mod:`cometd.history`); an edge asks it for a resuming stream's replay
(call ``replay``) once the stream is in its table, holding what is routed to
the stream meanwhile (see :mod:`cometd.server`). The router counts the user
online on that edge before it reads the replay (:meth:`Presence.resumed`), so
no message routed after the replay misses the stream.

A fresh SSE stream's welcome carries an ``id:`` to resume from, as in one
process: the newest id this edge knows of, from the messages routed to it and
from the router, which tells every edge its head (``{"head": id}``) when it
hears a snapshot and every ``EXPIRE_EVERY`` when it moved. That id is never
above the router's head when the stream is counted online, so a client that
connects and drops at once resumes without a gap (what was routed in between
is replayed, as is anything from just before it connected).

Both processes run with gevent's monkey patching, so redis-py's blocking
sockets cooperate with the hub (see :mod:`cometd.cli`, which patches by role).
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import socket
import struct
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

import gevent
import numpy as np
import psutil
import redis
from gevent.event import AsyncResult, Event
from gevent.lock import Semaphore

from cometd import log
from cometd.connections import ConnectionTable
from cometd.history import Replay, format_id, parse_id
from cometd.ids import int_value
from cometd.metrics import (
    BACKPLANE_BATCH,
    FANOUT_SIZE,
    PUBLISH_TO_WRITE,
    REDIS_RTT,
    exposition,
)
from cometd.online import OnlineIndex, online_subscribers, yield_to_hub
from cometd.store import SetView
from cometd.streamhttp import SSE_CHUNKED, Message
from cometd.webapp import BackendUnavailable as BackplaneUnavailable

__all__ = ["Presence", "Recipients", "RouterLink", "EdgeLink", "EdgeBackend",
           "BackplaneUnavailable", "PayloadError", "PAYLOAD_FORMAT", "flush_pause",
           "encode_batch", "decode_batch"]

REQUESTS = "cometd:requests"
REPLY = "cometd:reply:{}"
EDGE = "cometd:edge:{}"
PRESENCE = "cometd:presence"
CONTROL = "cometd:control"

EDGE_TIMEOUT = 3.0
# A silent edge that still listens on its delivery channel gets Redis's copy of
# every batch, and delivers it once it runs again (a starved edge, at 1M): it
# is forgotten only after this long. Forgetting it sooner would leave its
# streams open but routed nothing until its snapshot, missing messages.
LISTENING_TIMEOUT = 30.0
EXPIRE_EVERY = 0.5  # how often the router looks for dead and silent edges
HEARTBEAT = 1.0
# An edge whose heartbeats no router has heard for this long is not ready
# (/readyz): a heartbeat a second, so a lost router shows within ~2-3 s.
ROUTER_LOST = 2.0
PRESENCE_BATCH = 0.1
CALL_TIMEOUT = 5.0
RETRY = 0.5
DELIVERY_FLUSH = 0.01  # at most one delivery flush per this many seconds...
DELIVERY_FLUSH_MAX = 0.05  # ... and, under load, up to this (see flush_pause)
PAYLOAD_RATE = 1_000  # delivery payloads a second, all edges together, under load
CALL_BATCH = 64  # most calls the router takes off the request list per round trip
SYNC_GRACE = 0.5  # a starting router's wait for the edges' snapshots before it routes
GROUP_BATCH = 65_536  # subscribers of a large set looked up between yields to the hub (~0.5 ms)
# Integer ids below this are looked up in Presence._where, an array; the
# others (names, larger ids, users on several edges) in Presence.users.
DENSE_LIMIT = 1 << 24
_SLOT_BITS = 16  # a _where value: connections << _SLOT_BITS | the edge's slot
_SLOT_MASK = (1 << _SLOT_BITS) - 1
_MAX_COUNT = (1 << (31 - _SLOT_BITS)) - 1
_ELSEWHERE = -1  # in _where: look the user up in Presence.users


def flush_pause(payloads: int) -> float:
    """The router's pause after a delivery flush that published *payloads* Redis messages.

    Theory: each payload costs its edge a wakeup (~0.15-0.2 ms of CPU at 1M,
    with ~110 processes on two cores and cold caches) whatever it carries, so
    with 53 edges a flush every 10 ms was ~5,300 wakeups a second, more CPU
    than the deliveries they carried. Under light load a flush reaches few
    edges and the pause stays DELIVERY_FLUSH; a flush that reached many
    edges is followed by a longer pause, so all edges together take about
    PAYLOAD_RATE payloads a second, each carrying more, and a message waits
    at most DELIVERY_FLUSH_MAX for its flush.
    """
    return min(DELIVERY_FLUSH_MAX, max(DELIVERY_FLUSH, payloads / PAYLOAD_RATE))


# A delivery payload: messages for one edge, each with the users it goes to.
# Theory: at 1M an entry is mostly one user, so the payload is made for the
# router to build from its arrays (see Presence.batches) with a few calls per
# edge, not per entry, and for the edge to read with a few slices:
#   head: the format's tag PAYLOAD_FORMAT, entries n, subjects' bytes,
#   names' bytes (4 bytes, 3 x uint32)
#   keys (96 bits, see cometd.history) as n x uint64 low parts and n x uint32
#   high parts, int users per entry n x uint32, body sizes n x uint32, SSE
#   frame sizes n x uint32, the int users (uint32, entry after entry), the
#   subjects joined by spaces (ids hold none), the other users as JSON
#   [[entry, [user, ...]], ...] or nothing, the bodies back to back, then
#   each message's SSE frame as an HTTP/1.1 stream carries it.
# An entry's users are its int ids, then its other ids. The SSE frame (a
# JSON dump and the id's text, ~3 us) is built once, by the router, rather
# than on each of the ~25 edges a message reaches: SSE streams are the
# usual kind, and at 53 edges building it was ~60% of an edge's own work
# per delivery (bench/bench_router.py).
_HEAD = struct.Struct("<4sIII")
#: the first bytes of every delivery payload: a router and an edge of cometd
#: versions that frame payloads differently must not misread each other's
PAYLOAD_FORMAT = b"cb2\n"


_UNREADABLE = log.Burst(
    "payload_unreadable", "delivery payload(s) this edge cannot read, dropped (the router "
    "and the edges must run the same cometd version)", logging.ERROR)


class PayloadError(ValueError):
    """A delivery payload this edge cannot read: not in :data:`PAYLOAD_FORMAT`, or cut short."""


_LOW = (1 << 64) - 1


def _key_parts(keys: list[int]) -> bytes:
    return (np.array([k & _LOW for k in keys], np.uint64).tobytes()
            + np.array([k >> 64 for k in keys], np.uint32).tobytes())


def _assemble(keys: bytes, counts: bytes, sizes: bytes, users: bytes, subjects: bytes,
              names: bytes, bodies: bytes, frames: bytes, n: int) -> bytes:
    return b"".join((_HEAD.pack(PAYLOAD_FORMAT, n, len(subjects), len(names)), keys, counts,
                     sizes, users, subjects, names, bodies, frames))


def encode_batch(entries: list[tuple[Message, list[str]]]) -> bytes:
    """Messages for one edge, each with the users it goes to, as one payload.

    The router builds the same bytes from its arrays (:meth:`Presence.batches`).
    """
    counts, ints, names = [], [], []
    for i, (_, users) in enumerate(entries):
        numbers = [int_value(u) for u in users]
        counts.append(sum(n is not None for n in numbers))
        ints += [n for n in numbers if n is not None]
        others = [u for u, n in zip(users, numbers, strict=True) if n is None]
        if others:
            names.append([i, others])
    frames = [m.frame(SSE_CHUNKED) for m, _ in entries]
    return _assemble(
        _key_parts([m.key for m, _ in entries]),
        np.array(counts, np.uint32).tobytes(),
        np.array([len(m.body) for m, _ in entries] + list(map(len, frames)),
                 np.uint32).tobytes(),
        np.array(ints, np.uint32).tobytes(),
        " ".join(m.subject for m, _ in entries).encode(),
        json.dumps(names).encode() if names else b"",
        b"".join(m.body for m, _ in entries), b"".join(frames), len(entries))


def decode_batch(data: bytes) -> list[tuple[Message, list[str]]]:
    """The entries of a payload :func:`encode_batch` (or the router) built.

    Raises :class:`PayloadError` for a payload in another format (a router of
    another cometd version) or one cut short.
    """
    if data[:4] != PAYLOAD_FORMAT or len(data) < _HEAD.size:
        raise PayloadError(f"a delivery payload not in this edge's format (it starts "
                           f"{bytes(data[:4])!r}, not {PAYLOAD_FORMAT!r}): the router and "
                           f"the edges must run the same cometd version")
    try:
        return _decode(data)
    except (ValueError, TypeError, IndexError) as error:
        raise PayloadError(f"a delivery payload cut short or malformed ({len(data)} "
                           f"bytes): {error}") from None


def _decode(data: bytes) -> list[tuple[Message, list[str]]]:
    _, n, subjects_size, names_size = _HEAD.unpack_from(data)
    if not n:
        return []
    view = memoryview(data)
    at = _HEAD.size
    low = view[at : at + 8 * n].cast("Q").tolist()
    at += 8 * n
    high = view[at : at + 4 * n].cast("I").tolist()
    at += 4 * n
    keys = [h << 64 | k for h, k in zip(high, low, strict=True)] if any(high) else low
    counts = view[at : at + 4 * n].cast("I").tolist()
    at += 4 * n
    sizes = view[at : at + 4 * n].cast("I").tolist()
    at += 4 * n
    frame_sizes = view[at : at + 4 * n].cast("I").tolist()
    at += 4 * n
    total = sum(counts)
    users = list(map(str, view[at : at + 4 * total].cast("I").tolist()))
    at += 4 * total
    subjects = data[at : at + subjects_size].decode().split(" ")
    at += subjects_size
    others = dict(json.loads(data[at : at + names_size])) if names_size else {}
    at += names_size
    framed = at + sum(sizes)  # where the SSE frames start
    if framed + sum(frame_sizes) != len(data) or len(subjects) != n:
        raise ValueError(f"its sizes add up to {framed + sum(frame_sizes)} bytes")
    entries = []
    taken = 0
    for i in range(n):
        count, size, frame = counts[i], sizes[i], frame_sizes[i]
        mine = users[taken : taken + count]
        taken += count
        if others:
            mine += others.get(i, ())
        message = Message(subjects[i], data[at : at + size], keys[i])
        message.frames[SSE_CHUNKED] = data[framed : framed + frame]
        entries.append((message, mine))
        at += size
        framed += frame
    return entries


def _forever(fn, *args) -> None:
    """Run fn until it returns; on a Redis error, wait and run it again."""
    while True:
        try:
            fn(*args)
            return
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            gevent.sleep(RETRY)


class _Batches:
    """Items added while one batch is in flight go out together in the next.

    ``send(items)`` runs in one greenlet, one batch at a time, so an idle
    link sends at once and a busy one sends fewer, fuller batches. With
    *pause*, batches start at most once per *pause* seconds.
    """

    def __init__(self, send: Callable[[list[Any]], Any], pause: float = 0.0) -> None:
        self._send = send
        self._pause = pause
        self._items: list[Any] = []
        self._done = AsyncResult()
        self._wanted = Event()
        self._greenlet: gevent.Greenlet | None = None

    def add(self, item: Any) -> AsyncResult:
        """Queue *item*; the result is what ``send`` returns for its batch."""
        self._items.append(item)
        self._wanted.set()
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)
        return self._done

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            items, self._items = self._items, []
            done, self._done = self._done, AsyncResult()
            try:
                done.set(self._send(items))
            except Exception as exc:  # handed to every waiter of the batch
                done.set_exception(exc)
            if self._pause:
                gevent.sleep(self._pause)


# -- router side --------------------------------------------------------------


class Recipients:
    """Who a message goes to, as :class:`Presence` looks them up: int ids in an array.

    ``ints`` are integer ids, sorted, each once (a ``uint32`` buffer, often a
    view of the stored subscriber set itself); ``own`` one more int id unless
    it is among them (the sender: the flush checks); ``others`` the other
    ids, each once.
    """

    __slots__ = ("ints", "own", "others")

    def __init__(self, ints: memoryview | np.ndarray, others: list[str],
                 own: int | None = None) -> None:
        self.ints = ints
        self.own = own
        self.others = others

    @classmethod
    def of(cls, users: Iterable[str]) -> Recipients:
        """Any iterable of ids, split into ints and the others."""
        ints, others = [], []
        for user in users:
            number = int_value(user)
            if number is None:
                others.append(user)
            else:
                ints.append(number)
        return cls(np.unique(np.array(ints, np.uint32)), list(dict.fromkeys(others)))

    def __bool__(self) -> bool:
        return bool(len(self.ints) or self.others or self.own is not None)


class _Flush:
    """One flush's payloads (edge -> bytes) and what each message reached (see batches)."""

    __slots__ = ("payloads", "delivered", "_runs", "_run_msg", "_run_conns")

    def __init__(self, payloads: dict[str, bytes], delivered: list[int],
                 runs: dict[str, tuple[int, int]], run_msg: np.ndarray,
                 run_conns: np.ndarray) -> None:
        self.payloads = payloads
        self.delivered = delivered
        self._runs, self._run_msg, self._run_conns = runs, run_msg, run_conns

    def entries(self, edge: str) -> int:
        """How many messages *edge*'s payload carries."""
        start, end = self._runs[edge]
        return end - start

    def lost(self, edge: str) -> int:
        """Nobody heard *edge*'s payload: take its connections off; how many entries."""
        start, end = self._runs[edge]
        for i, n in zip(self._run_msg[start:end].tolist(), self._run_conns[start:end].tolist(),
                        strict=True):
            self.delivered[i] -= n
        return end - start


class Presence:
    """Which edge holds how many connections of each user; the router's fan-out."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        #: user -> {edge: connection count}
        self.users: dict[str, dict[str, int]] = {}
        #: the keys of ``users``, indexed for the router (see :mod:`cometd.online`)
        self.index = OnlineIndex()
        #: edge -> its users: forgetting an edge, or applying its snapshot, walks
        #: its own users, not everyone's (at 1M a walk of all took the router
        #: seconds per snapshot, and 52 edges' snapshots stalled the ramp)
        self._on_edge: dict[str, set[str]] = {}
        #: edge -> monotonic time last heard from
        self.edges: dict[str, float] = {}
        #: edge -> when it sent what was last heard from it (its clock, time.time())
        self._sent: dict[str, float] = {}
        #: delivery batches that could not be published (Redis down)
        self.batches_lost = 0
        # Routed messages on their way out, in id order (see _publish_in_order)
        #: key -> (message, edge -> users, waiter) of messages grouped, not yet published
        self._outbox: dict[int, tuple[Message, dict[str, list[str]], AsyncResult]] = {}
        #: the outbox's keys as a heap: its smallest, and what is ready, without a
        #: scan of the outbox per message (a batch of n would cost n^2)
        self._outbox_keys: list[int] = []
        #: every key up to this one is grouped (published, queued, or for nobody here)
        self._grouped_upto = 0
        #: keys above _grouped_upto already grouped, a heap (smallest first)
        self._grouped: list[int] = []
        self._newest = 0
        self._unkeyed = itertools.count(-(1 << 62))
        self._wanted = Event()
        self._flusher: gevent.Greenlet | None = None
        #: connections written to, as counted from presence
        self.deliveries = 0
        #: slow consumers are dropped, and counted, by the edges
        self.slow_consumers_dropped = 0
        #: (edge, user) -> the edge's presence stamp when a stream of user resumed there
        self._resumed: dict[tuple[str, str], int] = {}
        # The fan-out's lookup (see batches): int id -> connections << _SLOT_BITS
        # | the slot of the one edge that holds them, 0 offline, _ELSEWHERE in users
        self._where = np.zeros(0, np.int32)
        #: edge -> its slot in _where's values, and back
        self._slot: dict[str, int] = {}
        self._slot_edge: list[str] = []
        self._free_slots: list[int] = []
        #: online users with int ids too large for _where (looked up in users)
        self._outside = 0

    def _set(self, edge: str, user: str, n: int) -> None:
        where = self.users.get(user)
        was_online = where is not None
        if n > 0:
            if where is None:
                where = self.users[user] = {}
                self.index.add(user)
            where[edge] = n
            on_edge = self._on_edge.get(edge)
            if on_edge is None:
                on_edge = self._on_edge[edge] = set()
                self._slot[edge] = (self._free_slots.pop() if self._free_slots
                                    else self._new_slot(edge))
                self._slot_edge[self._slot[edge]] = edge
            on_edge.add(user)
        elif where is not None:
            if where.pop(edge, None) is not None:
                on_edge = self._on_edge[edge]
                on_edge.discard(user)
                if not on_edge:
                    del self._on_edge[edge]
                    self._free_slots.append(self._slot.pop(edge))
            if not where:
                del self.users[user]
                self.index.discard(user)
        else:
            return
        number = int_value(user)
        if number is None:
            return
        if number >= DENSE_LIMIT:
            self._outside += bool(where) - was_online
        else:
            self._place(number, where)

    def _new_slot(self, edge: str) -> int:
        if len(self._slot_edge) > _SLOT_MASK:
            raise ValueError(f"more than {_SLOT_MASK + 1} edges")
        self._slot_edge.append(edge)
        return len(self._slot_edge) - 1

    def _place(self, number: int, where: dict[str, int]) -> None:
        """Write user *number*'s edges (*where*, empty: offline) into _where."""
        table = self._where
        if number >= len(table):
            if not where:
                return
            grown = np.zeros(min(DENSE_LIMIT, max(1024, 2 * number)), np.int32)
            grown[: len(table)] = table
            table = self._where = grown
        if not where:
            table[number] = 0
        elif len(where) == 1:
            [(edge, n)] = where.items()
            table[number] = (_ELSEWHERE if n > _MAX_COUNT
                             else n << _SLOT_BITS | self._slot[edge])
        else:
            table[number] = _ELSEWHERE

    def update(self, edge: str, counts: dict[str, int], snapshot: bool = False,
               stamp: int | None = None, sent: float | None = None) -> None:
        """Apply an edge's report; *stamp* is its presence stamp when it counted, *sent*
        the time it sent it (by its clock; None: now, as far as the router knows)."""
        self.edges[edge] = time.monotonic()
        self._sent[edge] = time.time() if sent is None else sent
        if snapshot:  # whom the edge no longer holds; the rest are set below
            for user in self._on_edge.get(edge, set()) - counts.keys():
                self._set(edge, user, 0)
        for user, n in counts.items():
            self._set(edge, user, n)
        for key, mark in list(self._resumed.items()):
            if key[0] != edge:
                continue
            if stamp is not None and stamp >= mark:
                del self._resumed[key]  # the edge counted after the resume: it knows
            elif not self.users.get(key[1], {}).get(edge):
                self._set(edge, key[1], 1)  # counted before the resume: still online

    def resumed(self, edge: str, user: str, stamp: int) -> None:
        """A stream of *user* resumes on *edge*: route to it there from now on.

        Theory: the edge reports its streams in batches (PRESENCE_BATCH), so
        the router could route a message to nobody between the replay it
        reads and the report of the stream. So the replay call counts the user
        online on its edge first, and a report the edge made before the resume
        (stamped earlier: presence and calls travel apart) does not undo it.
        """
        if not self.users.get(user, {}).get(edge):
            self._set(edge, user, 1)
        self._resumed[(edge, user)] = stamp

    def forget_edge(self, edge: str) -> None:
        for user in list(self._on_edge.get(edge, ())):
            self._set(edge, user, 0)
        self.edges.pop(edge, None)
        self._sent.pop(edge, None)
        for key in [k for k in self._resumed if k[0] == edge]:
            del self._resumed[key]

    def expire(self, listening: Collection[str] = ()) -> list[str]:
        """Forget the edges silent for EDGE_TIMEOUT while others kept reporting.

        An edge in *listening* (still subscribed to its delivery channel) is
        given LISTENING_TIMEOUT instead: Redis holds its batches until it runs.

        Silence is measured in the reports' own time (when each edge sent its
        last one), not in when the router read them: a router behind on
        presence (a saturated machine) reads an hour's worth of reports in
        more than an hour, so by the clock every edge seemed silent, and an
        edge reporting each second seemed silent beside those read last.
        Taken for dead, each one's next report asked for its snapshot, which
        put the router further behind: at 1M, half the router's time went to
        forgetting edges and reading their snapshots again (py-spy).
        """
        now = time.monotonic()
        newest = max(self._sent.values(), default=0.0)
        dead = []
        for e, seen in self.edges.items():
            timeout = LISTENING_TIMEOUT if e in listening else EDGE_TIMEOUT
            if now - seen > timeout and newest - self._sent[e] > timeout:
                dead.append(e)
        for edge in dead:
            self._forget(edge, "silent")
        return dead

    def _forget(self, edge: str, why: str) -> None:
        """forget_edge, said in the log: its users are offline here until it reports again."""
        users = len(self._on_edge.get(edge, ()))
        self.forget_edge(edge)
        log.event("edge_forgotten", f"edge {edge} forgotten ({why}): {users} users offline "
                  "until its snapshot", logging.WARNING, edge=edge, reason=why, users=users)

    def online(self, user: str) -> int:
        return sum(self.users.get(user, {}).values())

    def settle(self, low: int | None) -> None:
        """*low* is the smallest key the router still routes: every smaller one is done."""
        self._grouped_upto = max(self._grouped_upto, self._newest if low is None else low - 1)
        self._advance()

    def stop(self) -> None:
        """Stop publishing (the router's end)."""
        if self._flusher is not None:
            self._flusher.kill()

    def kick_many(self, users: list[str]) -> int:
        """Ask every edge to end the streams of *users*, in one message; how many
        presence counts."""
        n = sum(self.online(user) for user in users)
        try:
            self.client.publish(CONTROL, json.dumps({"kick": users}))
        except redis.RedisError:
            raise BackplaneUnavailable("Redis is not reachable; try again") from None
        return n

    def deliver(self, users: Iterable[str], message: Message) -> int:
        done = self._group(users, message)
        return 0 if done is None else done.get()

    def deliver_many(self, sends: Iterable[tuple[Iterable[str], Message]]) -> list[int]:
        """:meth:`deliver` for each ``(users, message)``, in order, waiting once for all.

        A batch's messages share the next delivery flush, as concurrent
        sends do, rather than waiting a flush (and its pause) each.
        """
        waiters = [self._group(users, message) for users, message in sends]
        return [0 if done is None else done.get() for done in waiters]

    def recipients(self, subject: str, subscribers: SetView, index: OnlineIndex) -> Recipients:
        """Who gets a send of *subject*: itself and its subscribers, looked up at the flush.

        The router's hook (in place of :func:`cometd.online.recipients`): the
        int subscribers stay the stored array, for :meth:`batches` to look up
        with a whole flush's; a large set is cut to its online part first, in
        steps that let the hub run between them. Names are walked as the
        single process walks them.
        """
        ints = subscribers.ints
        if len(ints) > GROUP_BATCH:
            ints = self._online_part(np.frombuffer(ints, np.uint32))
        number = int_value(subject)
        if number is not None and not subscribers.names_text:
            return Recipients(ints, [], number)
        others = [] if number is not None else [subject]
        if subscribers.names_text:
            names = SetView(bytes(4) + subscribers.names_text)
            others += (u for u in online_subscribers(names, index) if u != subject)
        return Recipients(ints, others, number)

    def _online_part(self, ints: np.ndarray) -> np.ndarray:
        parts = []
        for start in range(0, len(ints), GROUP_BATCH):
            if start:
                yield_to_hub()
            chunk = ints[start : start + GROUP_BATCH]
            parts.append(chunk[self._lookup(chunk) != 0])
        return np.concatenate(parts)

    def _lookup(self, ids: np.ndarray) -> np.ndarray:
        """The _where values of *ids* (uint32): beyond the table, 0 or _ELSEWHERE."""
        table = self._where
        if not len(table):
            values = np.zeros(len(ids), np.int32)
        else:
            values = table.take(ids, mode="clip")
            beyond = ids >= len(table)
            if beyond.any():
                values[beyond] = 0
        if self._outside:
            values[ids >= DENSE_LIMIT] = _ELSEWHERE
        return values

    def _group(self, users: Iterable[str], message: Message) -> AsyncResult | None:
        """Put *message* in the outbox for the next flush; its waiter (None: to nobody)."""
        recipients = users if isinstance(users, Recipients) else Recipients.of(users)
        if not recipients:
            self._grouped_key(message.key)
            return None
        done = AsyncResult()
        # A message without an id (not routed by a Router) goes in arrival order.
        key = message.key or next(self._unkeyed)
        self._outbox[key] = (message, recipients, done)
        heapq.heappush(self._outbox_keys, key)
        self._grouped_key(message.key)
        return done

    def batches(self, sends: list[tuple[Message, Recipients]]) -> _Flush:
        """A flush's payloads: *sends*' recipients looked up and grouped by edge at once.

        Theory: grouping each message's ~30 recipients in Python (a dict
        lookup, a walk of the user's edges, an append each) was half the
        router's time at 1M, and encoding the entries as JSON another 7%.
        Here a flush's int recipients are looked up in one gather from
        ``_where`` (the one edge holding each user and its connections) and
        sorted by (edge, message) with one stable argsort; each run of equal
        keys is one entry, each edge's runs one payload, built from slices
        (see :func:`encode_batch`). Users on several edges, names and ids
        beyond the table are looked up one by one in ``users``, as before;
        at 1M there are next to none. Nothing here yields, so the slots
        stay those of the edges named.
        """
        n = len(sends)
        if not n:
            return _Flush({}, [], {}, np.zeros(0, np.intp), np.zeros(0, np.int64))
        parts = [r.ints for _, r in sends]
        ids = np.frombuffer(b"".join(parts), np.uint32)
        msg = np.repeat(np.arange(n), np.fromiter(map(len, parts), np.intp, n))
        owners = [i << 32 | r.own for i, (_, r) in enumerate(sends) if r.own is not None]
        if owners:
            # Each message's ints are sorted and the messages in order, so
            # (message, id) pairs are sorted too: one search finds the senders
            # already among their own subscribers.
            pairs = msg.astype(np.int64) << 32 | ids
            own = np.array(owners, np.int64)
            if len(pairs):
                at = np.minimum(np.searchsorted(pairs, own), len(pairs) - 1)
                own = own[pairs[at] != own]
            ids = np.concatenate((ids, (own & 0xFFFFFFFF).astype(np.uint32)))
            msg = np.concatenate((msg, own >> 32))
        values = self._lookup(ids)
        online = values > 0
        slots = (values[online] & _SLOT_MASK).astype(np.int64)
        conns = (values[online] >> _SLOT_BITS).astype(np.int64)
        msgs = msg[online]
        users = ids[online].astype(np.int64)
        # The rest, one by one: (slot, message, user or -1 - its index in names, connections)
        extra: list[tuple[int, int, int, int]] = []
        names: list[str] = []
        slot_of, where_of = self._slot, self.users
        elsewhere = np.flatnonzero(values == _ELSEWHERE)
        if len(elsewhere):
            by_int = self.index.ints
            for i, number in zip(msg[elsewhere].tolist(), ids[elsewhere].tolist(), strict=True):
                for edge, c in where_of.get(by_int.get(number), {}).items():
                    extra.append((slot_of[edge], i, number, c))
        for i, (_, r) in enumerate(sends):
            for user in r.others:
                where = where_of.get(user)
                if where:
                    names.append(user)
                    for edge, c in where.items():
                        extra.append((slot_of[edge], i, -len(names), c))
        if extra:
            more = np.array(extra, np.int64).T
            slots, msgs = np.concatenate((slots, more[0])), np.concatenate((msgs, more[1]))
            users, conns = np.concatenate((users, more[2])), np.concatenate((conns, more[3]))
        delivered = np.bincount(msgs, weights=conns, minlength=n).astype(np.int64).tolist()
        if not len(slots):
            return _Flush({}, delivered, {}, np.zeros(0, np.intp), np.zeros(0, np.int64))
        key = slots * n + msgs
        order = np.argsort(key, kind="stable")
        key, users, conns = key[order], users[order], conns[order]
        starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
        run_slot, run_msg = np.divmod(key[starts], n)
        run_len = np.diff(np.append(starts, len(key)))
        run_conns = np.add.reduceat(conns, starts)
        firsts = np.flatnonzero(np.concatenate(([True], run_slot[1:] != run_slot[:-1])))
        lasts = np.append(firsts[1:], len(starts))
        bounds = np.append(starts, len(key)).tolist()
        low = np.array([m.key & _LOW for m, _ in sends], np.uint64)
        high = np.array([m.key >> 64 for m, _ in sends], np.uint32)
        sizes = np.array([len(m.body) for m, _ in sends], np.uint32)
        frames = [m.frame(SSE_CHUNKED) for m, _ in sends]  # see encode_batch
        frame_sizes = np.fromiter(map(len, frames), np.uint32, n)
        subjects = [m.subject.encode() for m, _ in sends]
        bodies = [m.body for m, _ in sends]
        payloads, runs = {}, {}
        for r0, r1, slot in zip(firsts.tolist(), lasts.tolist(), run_slot[firsts].tolist(),
                                strict=True):
            edge = self._slot_edge[slot]
            mine = run_msg[r0:r1]
            at = mine.tolist()
            theirs = users[bounds[r0] : bounds[r1]]
            counts = run_len[r0:r1]
            others = b""
            if names and theirs.min() < 0:
                named = theirs < 0
                entry = np.repeat(np.arange(r1 - r0), counts)
                by_entry: dict[int, list[str]] = defaultdict(list)
                for j, code in zip(entry[named].tolist(), theirs[named].tolist(), strict=True):
                    by_entry[j].append(names[-1 - code])
                others = json.dumps(list(by_entry.items())).encode()
                counts = np.bincount(entry[~named], minlength=r1 - r0)
                theirs = theirs[~named]
            payloads[edge] = _assemble(
                low[mine].tobytes() + high[mine].tobytes(), counts.astype(np.uint32).tobytes(),
                sizes[mine].tobytes() + frame_sizes[mine].tobytes(),
                theirs.astype(np.uint32).tobytes(), b" ".join([subjects[i] for i in at]),
                others, b"".join([bodies[i] for i in at]), b"".join([frames[i] for i in at]),
                r1 - r0)
            runs[edge] = (r0, r1)
        return _Flush(payloads, delivered, runs, run_msg, run_conns)

    # Theory of operation (id order per edge): the router gives ids in send
    # order but groups the recipients of several sends at once, and a large
    # fan-out yields while it groups, so a later id could be published first
    # and an edge would write two subjects' ids out of order (then a stream
    # that resumes from the later one would skip the earlier one, and say it
    # recovered). In one process the connection table holds back the later
    # message (ConnectionTable.settle); here it is the publisher that waits,
    # since Redis keeps each edge channel's order and an edge delivers its
    # batches one after the other. Ids come one by one (History.record), so
    # the presence knows which smaller ids are still being grouped: a
    # message goes out once every smaller id is grouped, in the same flush
    # as those or after them, each edge's entries sorted by id. The router's
    # settle() says which ids are done even if their grouping never reached
    # deliver() (a failed lookup). The wait is bounded by the grouping of the
    # smaller ids, not by their publishing: a flush carries all that is ready.

    def _grouped_key(self, key: int) -> None:
        if key <= 0:
            self._wanted.set()
        elif key > self._grouped_upto:
            self._newest = max(self._newest, key)
            heapq.heappush(self._grouped, key)
        self._advance()

    def _advance(self) -> None:
        upto, grouped = self._grouped_upto, self._grouped
        while grouped and grouped[0] <= upto + 1:
            upto = max(upto, heapq.heappop(grouped))
        self._grouped_upto = upto
        if self._ready(upto):
            self._wanted.set()
            if self._flusher is None:
                self._flusher = gevent.spawn(self._publish_in_order)

    def _ready(self, upto: int) -> bool:
        """Whether the outbox's smallest key is at most *upto* (published keys leave the heap)."""
        keys, outbox = self._outbox_keys, self._outbox
        while keys and keys[0] not in outbox:
            heapq.heappop(keys)
        return bool(keys) and keys[0] <= upto

    def _publish_in_order(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            upto, keys, outbox = self._grouped_upto, self._outbox_keys, self._outbox
            sends = []
            while keys and keys[0] <= upto:
                key = heapq.heappop(keys)
                if key in outbox:
                    sends.append(outbox.pop(key))
            if not sends:
                continue
            pause = DELIVERY_FLUSH
            try:
                delivered, payloads = self._publish([(m, r) for m, r, _ in sends])
            except Exception as exc:  # handed to every waiter of the batch
                for _, _, done in sends:
                    done.set_exception(exc)
            else:
                for (_, _, done), n in zip(sends, delivered, strict=True):
                    done.set(n)
                pause = flush_pause(payloads)
            gevent.sleep(pause)
            if self._ready(self._grouped_upto):
                self._wanted.set()

    def _publish(self, sends: list[tuple[Message, Recipients]]) -> tuple[list[int], int]:
        # Theory: a message reaches ~30 friends on ~25 edges, and each Redis
        # message costs its edge ~0.2 ms to receive, whatever it carries. So
        # the sends routed while a flush is in flight, or within its pause
        # after it (flush_pause), share the next one: each edge gets one
        # payload with all of its messages, all edges in one pipelined round
        # trip. Returns how many connections each send reached, and how many
        # payloads went out. A payload nobody heard (Redis down, or the edge
        # not re-subscribed yet after a reconnect) is not "delivered".
        flush = self.batches(sends)
        if flush.payloads:
            pipe = self.client.pipeline(transaction=False)
            for edge, payload in flush.payloads.items():
                pipe.publish(EDGE.format(edge), payload)
                BACKPLANE_BATCH.labels("delivery").observe(flush.entries(edge))
            start = time.perf_counter()
            try:
                listeners = pipe.execute()
            except redis.RedisError:
                listeners = [0] * len(flush.payloads)
            else:
                REDIS_RTT.labels("publish").observe(time.perf_counter() - start)
            for edge, heard in zip(flush.payloads, listeners, strict=True):
                if not heard:
                    self.batches_lost += flush.lost(edge)
        self.deliveries += sum(flush.delivered)
        return flush.delivered, len(flush.payloads)

    @property
    def connections(self) -> int:
        return sum(sum(w.values()) for w in self.users.values())

    @property
    def users_online(self) -> int:
        return len(self.users)


class RouterLink:
    """The router's side of the backplane: presence in, calls in, batches out."""

    def __init__(self, url: str, backend: Any, presence: Presence) -> None:
        self.url = url
        self.backend = backend
        self.presence = presence
        self._synced = Event()
        #: monotonic times: _listen last (re)subscribed; _serve_calls last lost Redis
        self._subscribed = 0.0
        self._calls_failed = 0.0
        self._greenlets: list[gevent.Greenlet] = []
        self._client = redis.Redis.from_url(url)
        self._replies = _Batches(self._publish_replies)
        self._head_told = 0  # the head last told the edges (see _tell_head)
        #: calls answered, by operation
        self.calls: dict[str, int] = {}

    def start(self) -> None:
        self._greenlets = [
            gevent.spawn(_forever, self._listen),
            gevent.spawn(_forever, self._serve_calls),
            gevent.spawn(self._expire),
        ]

    def stop(self) -> None:
        gevent.killall(self._greenlets, timeout=2)
        self._replies.stop()

    def _resync(self) -> None:
        self.presence.client.publish(CONTROL, "resync")  # every edge's snapshot

    def _resync_edge(self, edge: str) -> None:
        # Only that edge's snapshot: all fifty edges' (1M users) for one
        # unknown edge kept a loaded router behind on presence.
        self.presence.client.publish(CONTROL, json.dumps({"resync": edge}))

    def _listen(self) -> None:
        client = redis.Redis.from_url(self.url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(PRESENCE)
        self._resync()  # (re)connected: presence may be stale
        self._subscribed = time.monotonic()
        if not self._synced.is_set():
            gevent.spawn_later(SYNC_GRACE, self._synced.set)
        for item in pubsub.listen():
            update = json.loads(item["data"])
            edge = update["edge"]
            if update.get("bye"):
                self.presence.forget_edge(edge)
                continue
            known = edge in self.presence.edges
            if "snapshot" in update:
                self.presence.update(edge, update["snapshot"], snapshot=True,
                                     stamp=update.get("stamp"), sent=update.get("t"))
                self._tell_head(force=True)  # a new or reconnected edge: its welcome id
            else:
                self.presence.update(edge, update.get("counts", {}), stamp=update.get("stamp"),
                                     sent=update.get("t"))
                if not known:
                    self._resync_edge(edge)

    def _expire(self) -> None:
        while True:
            gevent.sleep(EXPIRE_EVERY)
            self.presence.expire(self._forget_unsubscribed())
            self._tell_head()

    def _tell_head(self, force: bool = False) -> None:
        head = self.backend.router.history.last
        if force or head != self._head_told:
            try:
                self._client.publish(CONTROL, json.dumps({"head": format_id(head)}))
            except redis.RedisError:
                return  # told at the next tick
            self._head_told = head

    def _forget_unsubscribed(self) -> set[str]:
        """Forget the edges nobody listens for; the edges that still listen."""
        # A killed edge sends no goodbye, and waiting out EDGE_TIMEOUT left its
        # closed streams counted (and their users online) for ~3 s. Its Redis
        # connection closed with it, though, taking its subscription along: an
        # edge nobody listens for is gone. One that is only re-subscribing
        # (Redis came back) is forgotten too, and re-learnt from the snapshot
        # it sends once subscribed; one heard from since the question was
        # asked has subscribed meanwhile, so it is kept.
        edges = list(self.presence.edges)
        if not edges:
            return set()
        asked = time.monotonic()
        try:
            counts = self._client.pubsub_numsub(*(EDGE.format(e) for e in edges))
        except redis.RedisError:
            return set()  # Redis is away: EDGE_TIMEOUT still applies
        listening = set()
        for edge, (_, n) in zip(edges, counts, strict=True):
            if n:
                listening.add(edge)
            elif self.presence.edges.get(edge, asked) < asked:
                self.presence._forget(edge, "unsubscribed")
        return listening

    # Calls come in and replies go out in batches: under load, a Redis round
    # trip per call and another per reply were three quarters of the router's
    # CPU. Whatever queued up while one batch was in flight goes in the next.

    def _serve_calls(self) -> None:
        # A fresh router knows no user yet: a send routed now (one queued while
        # it was down) would reach nobody, so let the edges' snapshots in first.
        self._synced.wait()
        if self._calls_failed:
            # Back after losing Redis: so is presence, which changed meanwhile.
            # Wait for _listen to resubscribe (and ask for snapshots) since,
            # then for the snapshots, as a starting router does; bounded, in
            # case only this connection had dropped.
            deadline = time.monotonic() + EDGE_TIMEOUT
            while self._subscribed < self._calls_failed and time.monotonic() < deadline:
                gevent.sleep(0.05)
            gevent.sleep(SYNC_GRACE)
        client = redis.Redis.from_url(self.url)
        try:
            while True:
                item = client.blpop([REQUESTS], timeout=1)
                if item is None:
                    continue
                calls = [item[1], *(client.lpop(REQUESTS, CALL_BATCH - 1) or ())]
                BACKPLANE_BATCH.labels("calls_popped").observe(len(calls))
                for call in calls:
                    gevent.spawn(self._answer, json.loads(call))
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            self._calls_failed = time.monotonic()
            raise

    def _answer(self, call: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"id": call["id"]}
        try:
            if call["op"] == "replay":
                user, since, stamp = call["args"]
                self.presence.resumed(call["edge"], user, stamp)
                replay = self.backend.replay(user, since)  # in the same loop turn
                reply["result"] = [[[k, s, b.decode("latin-1")] for k, s, b in replay.messages],
                                   replay.recovered, replay.reason, replay.head]
            else:
                reply["result"] = self._call(call["op"], call["args"])
        except Exception as exc:  # the edge turns this into a clear HTTP error
            reply["error"] = f"{type(exc).__name__}: {exc}"
        self._replies.add((REPLY.format(call["edge"]), json.dumps(reply)))

    def _publish_replies(self, replies: list[tuple[str, str]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for channel, reply in replies:
            pipe.publish(channel, reply)
        try:
            pipe.execute()
        except redis.RedisError:
            pass  # the edges time out and answer 503

    def _call(self, op: str, args: list[Any]) -> Any:
        b = self.backend
        self.calls[op] = self.calls.get(op, 0) + 1
        if op == "send":
            return b.send(args[0], args[1].encode("latin-1"))
        if op == "send_batch":
            return b.send_batch([(s, body.encode("latin-1")) for s, body in args[0]])
        if op in ("add", "remove"):
            return getattr(b, op)([tuple(p) for p in args[0]])
        if op in ("subscribers", "subscriptions"):
            return getattr(b, op)(args[0])
        if op == "stats":
            return b.stats()
        raise ValueError(f"unknown call {op!r}")


# -- edge side ----------------------------------------------------------------


def _published(pubsub: redis.client.PubSub) -> Iterator[tuple[bytes, bytes]]:
    """(channel, data) of each message published to *pubsub*'s channels, read lean.

    Theory: ``pubsub.listen()`` spends most of an edge's time per Redis
    message on its own machinery (a health check, a dict per message, a
    handler lookup, the channel decoded). This reads the connection's replies
    directly: each recv takes whatever has arrived, hiredis parses it, and the
    messages already in its buffer come out without another wakeup, so under
    load one wakeup handles many. Subscription confirmations are skipped.
    """
    read = pubsub.connection.read_response
    while True:
        # As PubSub.parse_response reads: messages may come as push replies,
        # and the socket's own timeout must not end a quiet wait.
        reply = read(push_request=True, timeout=None)
        if reply[0] == b"message":
            yield reply[1], reply[2]


class EdgeLink:
    """An edge's side: batches in, presence out, calls to the router."""

    def __init__(self, url: str, table: ConnectionTable, edge_id: str | None = None) -> None:
        self.url = url
        self.table = table
        self.edge_id = edge_id or f"{socket.gethostname()}-{os.getpid()}"
        self.client = redis.Redis.from_url(url)
        self._changed: set[str] = set()
        self._flush: gevent.Greenlet | None = None
        self._last_report = 0.0
        self._pending: dict[int, AsyncResult] = {}
        self._ids = itertools.count(1)
        self._greenlets: list[gevent.Greenlet] = []
        self._requests = _Batches(self._push_requests)
        self._presence_lock = Semaphore()  # presence leaves in the order it was counted
        #: set while this edge listens for replies (and deliveries)
        self._listening = Event()
        #: counts presence changes; reports carry it (see Presence.resumed)
        self.stamp = 0
        #: monotonic time a router last heard this edge's presence (0: never)
        self.router_heard = 0.0
        #: calls made, by operation
        self.calls: dict[str, int] = {}
        self._router_said: bool | None = None  # what the log last said
        table.on_presence = self._presence_changed

    def _say_router(self, heard: bool) -> None:
        # One line per change, not per heartbeat.
        if heard == self._router_said:
            return
        if heard:
            log.event("router_found", "the router hears this edge")
        elif self._router_said:
            log.event("router_lost", "no router heard this edge's heartbeat; sends and "
                      "subscription calls get 503 until one does", logging.WARNING)
        self._router_said = heard

    def router_ok(self) -> bool:
        """Whether Redis and a router heard this edge's last heartbeats (see ROUTER_LOST)."""
        return (self._listening.is_set()
                and time.monotonic() - self.router_heard < ROUTER_LOST)

    def start(self) -> None:
        self._greenlets = [
            gevent.spawn(_forever, self._listen),
            gevent.spawn(self._beat),
        ]

    def stop(self) -> None:
        gevent.killall(self._greenlets + ([self._flush] if self._flush else []), timeout=2)
        self._requests.stop()
        try:
            self.client.publish(PRESENCE, json.dumps({"edge": self.edge_id, "bye": True}))
        except (redis.ConnectionError, redis.TimeoutError):
            pass

    # Theory: presence goes out from several greenlets (the listener's
    # snapshots, the batch flush, the heartbeat), and a publish yields while it
    # waits on Redis, each greenlet on a connection of its own: so a report
    # counted after a snapshot could reach the router first (a snapshot of
    # ~19,000 users takes longest to send), and the router, applying the
    # snapshot last, took the report's new users offline for good. Each report
    # is counted and published under one lock, so they leave in the order they
    # were counted.

    def _snapshot(self) -> None:
        with self._presence_lock:
            self._publish_snapshot()

    def _publish_snapshot(self) -> None:
        counts = {u: len(c) for u, c in self.table.users.items()}
        self._changed.clear()
        heard = self.client.publish(PRESENCE, json.dumps(
            {"edge": self.edge_id, "snapshot": counts, "stamp": self.stamp, "t": time.time()}))
        if heard:
            self.router_heard = time.monotonic()
            self._say_router(True)
        else:
            self._changed.update(counts)  # no router listening yet: report them as changes

    def _listen(self) -> None:
        client = redis.Redis.from_url(self.url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(EDGE.format(self.edge_id), REPLY.format(self.edge_id), CONTROL)
            self._snapshot()  # (re)connected: the router may have missed changes
            self._listening.set()
            control, replies = CONTROL.encode(), REPLY.format(self.edge_id).encode()
            for channel, data in _published(pubsub):
                if channel == control:
                    if data == b"resync":
                        self._snapshot()
                        continue
                    command = json.loads(data)
                    if "head" in command:
                        # A fresh SSE stream's welcome id (see the module docstring).
                        head = parse_id(command["head"]) or 0
                        self.table.newest = max(self.table.newest, head)
                    elif "resync" in command:  # the router does not know this edge
                        if command["resync"] == self.edge_id:
                            self._snapshot()
                    else:
                        self.table.kick_many(command["kick"])
                elif channel == replies:
                    reply = json.loads(data)
                    waiter = self._pending.pop(reply["id"], None)
                    if waiter is not None:
                        waiter.set(reply)
                else:
                    try:
                        entries = decode_batch(data)
                    except PayloadError:
                        # Nothing here can deliver it: said, not lost silently.
                        _UNREADABLE.note()
                        continue
                    self._deliver(entries)
        finally:
            self._listening.clear()

    def _deliver(self, entries: list[tuple[Message, list[str]]]) -> None:
        # The metrics per payload, not per entry: at 1M an entry is mostly
        # one user (~30 recipients over ~50 edges), and two histogram
        # observations per entry cost ~3 us, a fifth of the delivery itself.
        # As the router does, each message's time to its write is counted
        # as the whole payload's.
        start = time.perf_counter()
        deliver = self.table.deliver
        sizes = Counter([deliver(users, message) for message, users in entries])
        PUBLISH_TO_WRITE.observe_many(time.perf_counter() - start, len(entries))
        for size, n in sizes.items():
            FANOUT_SIZE.observe_many(size, n)
        BACKPLANE_BATCH.labels("delivery").observe(len(entries))

    # Presence goes out on demand, not on a polling tick: a wakeup costs an
    # edge ~0.2 ms of CPU (cold caches, with a hundred processes on two
    # cores), so fifty edges polling every 50 ms burnt a fifth of a core idle.

    def _presence_changed(self, user: str) -> None:
        self.stamp += 1
        self._changed.add(user)
        if self._flush is None:
            # The first change after a quiet spell starts a batch: one report,
            # PRESENCE_BATCH later, carries every change made meanwhile.
            self._flush = gevent.spawn_later(PRESENCE_BATCH, self._flush_changes)

    def _flush_changes(self) -> None:
        self._flush = None
        self._report()

    def _beat(self) -> None:
        while True:
            gevent.sleep(HEARTBEAT)
            if self._changed or time.monotonic() - self._last_report >= HEARTBEAT / 2:
                self._report()  # a heartbeat, and a retry of changes Redis refused

    def _report(self) -> None:
        with self._presence_lock:  # see _snapshot
            self._publish_report()

    def _publish_report(self) -> None:
        changed, self._changed = self._changed, set()
        counts = {u: self.table.online(u) for u in changed}
        try:
            heard = self.client.publish(PRESENCE, json.dumps(
                {"edge": self.edge_id, "counts": counts, "stamp": self.stamp,
                 "t": time.time()}))
        except (redis.ConnectionError, redis.TimeoutError):
            heard = 0
        if heard:
            self._last_report = self.router_heard = time.monotonic()
        self._say_router(bool(heard))
        if not heard:
            # Redis is down, or the router is not subscribed (restarting, or
            # still re-subscribing after Redis came back): the next heartbeat
            # reports these changes again rather than lose them.
            self._changed |= changed

    def call(self, op: str, *args: Any) -> Any:
        """Ask the router; raise :class:`BackplaneUnavailable` after a timeout."""
        # A call pushed while the reply channel is not subscribed (the half
        # second after Redis comes back, before the listener's retry) has its
        # reply published to nobody: the client waited CALL_TIMEOUT for a 503.
        deadline = time.monotonic() + CALL_TIMEOUT
        if not self._listening.wait(CALL_TIMEOUT):
            raise BackplaneUnavailable("the router is not reachable; try again")
        self.calls[op] = self.calls.get(op, 0) + 1
        call_id = next(self._ids)
        waiter = AsyncResult()
        self._pending[call_id] = waiter
        request = json.dumps({"id": call_id, "edge": self.edge_id, "op": op, "args": list(args)})
        self._requests.add((request, waiter))
        try:
            reply = waiter.get(timeout=max(0.0, deadline - time.monotonic()))
        except gevent.Timeout:
            self._withdraw(request)
            raise BackplaneUnavailable("the router is not reachable; try again") from None
        finally:
            self._pending.pop(call_id, None)
        if "error" in reply:
            raise BackplaneUnavailable(f"the router failed: {reply['error']}")
        return reply["result"]

    def _push_requests(self, batch: list[tuple[str, AsyncResult]]) -> None:
        BACKPLANE_BATCH.labels("calls_pushed").observe(len(batch))
        start = time.perf_counter()
        try:
            self.client.rpush(REQUESTS, *(request for request, _ in batch))
            REDIS_RTT.labels("rpush").observe(time.perf_counter() - start)
        except redis.RedisError:
            for _, waiter in batch:
                waiter.set_exception(
                    BackplaneUnavailable("the router is not reachable; try again"))

    def _withdraw(self, request: str) -> None:
        # The client is told to try again: a router that comes back later must
        # not run the call anyway (a late send, then its retry, twice).
        try:
            self.client.lrem(REQUESTS, 1, request)
        except (redis.ConnectionError, redis.TimeoutError):
            pass


class EdgeBackend:
    """The web app's backend on an edge: everything but streams goes to the router."""

    def __init__(self, link: EdgeLink, sharing: Any = None) -> None:
        self.link = link
        #: the cometd.metrics.Sharing that merges every process's metrics
        self.sharing = sharing
        self._process = psutil.Process()

    def ready(self) -> list[str]:
        """What keeps this edge from serving fully (empty: ready)."""
        if not self.link._listening.is_set():
            return ["redis: not reachable"]
        if not self.link.router_ok():
            return ["router: not heard from"]
        return []

    def metrics(self) -> bytes:
        """Every live process's metrics, this edge's fresh (see cometd.metrics)."""
        return self.sharing.everyone() if self.sharing is not None else exposition()

    def send(self, subject: str, body: bytes) -> tuple[int, str]:
        delivered, message_id = self.link.call("send", subject, body.decode("latin-1"))
        return delivered, message_id

    def send_batch(self, messages: list[tuple[str, bytes]]) -> list[tuple[int, str]]:
        """A batch in one call: the router sends it in order (see cometd.publish)."""
        sent = self.link.call("send_batch", [(s, b.decode("latin-1")) for s, b in messages])
        return [(delivered, message_id) for delivered, message_id in sent]

    def subscribers(self, user: str) -> list[str]:
        return self.link.call("subscribers", user)

    def replay(self, user: str, since: str) -> Replay:
        """What a stream of *user* resuming after *since* gets, from the router's history.

        Call it once the stream is in the table (see :meth:`Presence.resumed`).
        """
        try:
            messages, recovered, reason, head = self.link.call(
                "replay", user, since, self.link.stamp)
        finally:
            # The router counted user online here: report the true count after
            # (a HEAD request, or a stream already gone, has none).
            self.link._presence_changed(user)
        return Replay([(k, s, b.encode("latin-1")) for k, s, b in messages], recovered, reason,
                      head)

    def subscriptions(self, user: str) -> list[str]:
        return self.link.call("subscriptions", user)

    def add(self, pairs: list[tuple[str, str]]) -> int:
        return self.link.call("add", pairs)

    def remove(self, pairs: list[tuple[str, str]]) -> int:
        return self.link.call("remove", pairs)

    def stats(self) -> dict[str, Any]:
        """The router's figures for the whole service, and this edge's own under ``edge``.

        Only an edge knows its slow consumers, so the router's count (always 0)
        is left out; when the router does not answer, ``router_error`` says so.
        """
        table = self.link.table
        own = {
            "id": self.link.edge_id,
            "mode": table.mode,
            "connections": table.connections,
            "users_online": table.users_online,
            "deliveries": table.deliveries,
            "slow_consumers_dropped": table.slow_consumers_dropped,
            "rejected": dict(table.rejected),
            "rss_bytes": self._process.memory_info().rss,
        }
        try:
            router = self.link.call("stats")
        except BackplaneUnavailable as exc:
            return {"router_error": str(exc), "edge": own}
        return {
            "connections": router["connections"],
            "users_online": router["users_online"],
            "messages_sent": router["messages_sent"],
            "deliveries": router["deliveries"],
            "router_rss_bytes": router["rss_bytes"],
            "edge": own,
        }
