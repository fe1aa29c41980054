"""Live streams: the table of connections and how message bytes reach a socket.

Once the web app has answered ``GET /test/<id>`` or ``GET /events/<id>`` with
headers and a welcome chunk, the socket leaves pywsgi and becomes a
:class:`Connection` in the process's :class:`ConnectionTable`. The router hands
the table a :class:`Message` and its recipients as the table's
:class:`~cometd.online.OnlineIndex` maps them, each user's list of
connections (``deliver_online``; an edge hands user ids to ``deliver``); the
table writes the message to every connection in those lists.

Theory of operation
-------------------
A message is framed once per stream kind (chunked or not, plain or SSE; see
:class:`cometd.streamhttp.Message`) and the same bytes object goes to every
recipient of that kind.

Two connection modes share everything but the writer. Either way
``deliver`` sends straight from the router's greenlet while the connection
has nothing queued (one ``send()`` per delivery, the hot path); only output
the kernel did not take goes to the connection's outbox and its writer:

- ``greenlet`` (default): each connection has one greenlet, parked with a bare
  ``hub.switch()`` (lighter than a queue) while it has nothing to write.
  Output left over is appended to the outbox and the greenlet scheduled; it
  writes the outbox with non-blocking sends and waits for writability while
  the kernel buffer is full.
- ``pool`` (the seed's libevent "dumb connection pool"): no greenlet at all.
  A connection whose kernel buffer is full gets a write watcher until it
  drains.

Either way, output not yet accepted by the kernel is bounded by
``max_pending``: past it the connection is closed and counted as a slow
consumer, so one stalled reader cannot grow the server's memory.

A clean shutdown (:meth:`ConnectionTable.drain`, then
:meth:`ConnectionTable.close`) ends each chunked stream with its last chunk,
``0\r\n\r\n``, after the output it still holds, so a client tells a server
that stopped on purpose from a crash (so does :meth:`ConnectionTable.kick`,
the admin's ``kick``). A drain spreads the ends over ``--drain-seconds``, so
the clients do not all come back in the same second; it waits at most
a second for clients to take those bytes, and one that does not gets closed
mid-stream as before. Each end is counted by why (``table.disconnects``):
``kicked``, ``drain``, and ``shutdown`` for :meth:`~ConnectionTable.end_all`.
A slow consumer dropped for ``max_pending`` is closed
without one: its last chunk may be cut short, and a last chunk after it would
claim the stream was complete.

A stream opened with a token (:mod:`cometd.auth`) is filed in an
:class:`~cometd.expiry.ExpiryWheel` by when its token stops being accepted;
one greenlet sweeps it once a second. An expired stream is logged out at
once (nothing more is routed to it), gets its farewell -- SSE the event
``event: expired``, then chunked streams their last chunk, as at a clean
shutdown -- and is closed a second later, so a client that reads to the end
tells expiry from a crash and reconnects with a fresh token.

Disconnects are noticed without any per-connection watcher: every stream's
descriptor is registered (EPOLLIN | EPOLLRDHUP) in one epoll set, and a single
gevent watcher on that epoll descriptor wakes when any client hangs up or
sends something, typically within milliseconds.

A WebSocket (:mod:`cometd.websocket`) ends the same ways with a close frame
instead of a last chunk (its code says why), and is the one kind whose client
speaks: what it sends is read from the same epoll set and handed to
:func:`cometd.websocket.client_data`, which may answer a ping or end the
stream (:meth:`ConnectionTable.end`). A WebSocket dropped as a slow consumer
keeps only the outbox entry the kernel may have begun (each entry ends at a
frame boundary), so its close frame can follow.
"""

from __future__ import annotations

import errno
import resource
import select
import socket
import time
from collections.abc import Iterable

import gevent
from gevent.hub import get_hub
from greenlet import getcurrent

from cometd import log
from cometd.counts import DISCONNECT_REASONS
from cometd.expiry import ExpiryWheel
from cometd.log import Burst
from cometd.online import OnlineIndex, yield_to_hub
from cometd.streamhttp import (
    CHUNKED,
    EXPIRED_EVENT,
    KEEPALIVE,
    LAST_CHUNK,
    POLL,
    SSE_CHUNKED,
    SSE_RAW,
    WEBSOCKET,
    Message,
    frame_bytes,
)
from cometd.websocket import CLOSE_FRAMES, PING, client_data

__all__ = ["Connection", "ConnectionTable", "MODES"]

MODES = ("greenlet", "pool")
#: how long a clean shutdown waits for clients to take their last bytes
CLOSE_GRACE = 1.0
#: a drain ends at least this many streams a second, however long it may take:
#: a few streams need not wait, and a server takes reconnects at about this rate
DRAIN_MIN_RATE = 2000.0
DRAIN_STEP = 0.02  # seconds between a drain's batches

_EPOLL_FLAGS = select.EPOLLIN | select.EPOLLRDHUP
_GONE = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK)
_SLOW_DROPS = Burst("slow_consumers_dropped",
                    "stream(s) dropped for holding more than --max-pending unsent bytes")
# Deliveries between yields (see cometd.online.yield_to_hub), so a huge
# fan-out does not stall the hub. A concurrent small send needs several loop
# turns (accept, read, dispatch, answer), one per batch: at 1000, a
# 2,000-connection fan-out held a small send until it was done; at 100 it is
# served in the meantime.
_YIELD_EVERY = 100


class Connection:
    """One client stream, owned by a :class:`ConnectionTable`."""

    __slots__ = (
        "user", "kind", "sock", "fd", "table", "_out", "_pending", "_waiter", "_parked", "closed",
        "after", "held", "ordered", "_allowance", "expiry", "address", "ws",
    )

    def __init__(self, table: ConnectionTable, sock: socket.socket, user: str, kind: int) -> None:
        self.table = table
        self.sock = sock
        self.fd = sock.fileno()
        self.user = user
        self.kind = kind
        #: bytes accepted from the router but not yet by the kernel
        self._out: list[bytes] = []
        self._pending = 0
        #: greenlet mode: the connection's greenlet; pool mode: the write watcher, if any
        self._waiter = None
        #: greenlet mode: the greenlet waits for output (not for writability)
        self._parked = False
        self.closed = False
        #: a resumed stream's replay head: messages with keys up to it are not sent
        self.after = 0
        #: while a resumed stream's replay is read: (key, bytes) routed meanwhile
        self.held: list[tuple[int, bytes]] | None = None
        #: (key, bytes) held back until every smaller key is out (ConnectionTable.settle)
        self.ordered: list[tuple[int, bytes]] = []
        #: bytes of a replay held beyond max_pending until the outbox first drains
        self._allowance = 0
        #: the second its token expires under in the table's wheel, if it has one
        self.expiry: int | None = None
        #: the client's address, if the table counts streams per address
        self.address: str | None = None
        #: a WebSocket's parser of client frames, once one is needed (cometd.websocket)
        self.ws = None

    # -- both modes ------------------------------------------------------------

    def deliver(self, data: bytes) -> bool:
        """Send or queue *data*; False when the connection is (now) closed."""
        if self.closed:
            return False
        if self.held is not None:
            self.held.append((0, data))  # a keep-alive: nothing goes before the head
            return True
        if not self._out:
            # Nothing queued, so no writer waits for writability either (see
            # ConnectionTable.deliver, where this send is inlined).
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close("error")
                return False
            if sent == len(data):
                self._allowance = 0
                return True
            data = data[sent:]
        return self._backlog(data)

    def _backlog(self, data: bytes) -> bool:
        """Queue what the kernel did not take and wake the writer; False once closed."""
        self._queue(data)
        if self.closed:
            return False
        if self._parked:
            self._parked = False
            self.table.loop.run_callback(self._waiter.switch)
        elif self._waiter is None and self.table.mode == "pool":
            self._waiter = self.table.loop.io(self.fd, 2)
            self._waiter.start(self._on_writable)
        return True

    def hold(self) -> None:
        """Keep what is routed to this stream until :meth:`release` (a resume)."""
        self.held = []
        self.after = -1  # truthy: ConnectionTable.deliver looks at it

    def release(self, first: bytes, head: int) -> bool:
        """Write *first* (head and replay), then what was held with keys above *head*.

        From then on, messages with keys up to *head* are dropped (they were
        in the replay). A replay may hold up to ``replay_max`` messages, more
        than ``max_pending``: the bound applies again once it is sent.
        """
        held, self.held = self.held or [], None
        self.after = head
        data = b"".join([first, *(frame for key, frame in held if not key or key > head)])
        self._allowance = len(data)
        return self.deliver(data)

    def _queue(self, data: bytes) -> None:
        out = self._out
        out.append(data)
        self._pending += len(data)
        self.table.pending += len(data)
        if self._pending > self.table.max_pending + self._allowance:
            self.table.slow_consumers_dropped += 1
            _SLOW_DROPS.note()
            if self.kind != WEBSOCKET or self.closed:
                self.close("slow")
                return
            # Every outbox entry ends at a frame boundary: keep the one the
            # kernel may have begun, so the close frame (4000) can follow.
            del out[1:]
            self.table.pending -= self._pending - len(out[0])
            self._pending = len(out[0])
            self._allowance = self._pending + len(CLOSE_FRAMES["slow"])
            self.table.end(self, CLOSE_FRAMES["slow"], "slow")

    def _send(self, data: bytes) -> int | None:
        """Bytes the kernel took (0 when its buffer is full); None once closed on an error."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError:
            self.close("error")
            return None

    def _flush(self) -> bool:
        """Send what the kernel takes; True when the outbox is empty."""
        out = self._out
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        sent = self._send(data)
        if sent is None:
            return True
        self._pending -= sent
        self.table.pending -= sent
        if sent < len(data):
            out.append(data[sent:])
            return False
        self._allowance = 0
        return True

    def close(self, reason: str = "error") -> None:
        """Forget the connection and close its socket (idempotent).

        *reason* is counted in ``table.disconnects`` (see :data:`DISCONNECT_REASONS`).
        """
        if self.closed:
            return
        self.closed = True
        self.table.disconnects[reason] += 1
        self._out.clear()
        self.table.pending -= self._pending
        self._pending = 0
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            if self.table.mode == "pool":
                waiter.stop()
                waiter.close()
            elif waiter is not getcurrent():
                self.table.loop.run_callback(waiter.switch)
        self.table._forget(self)
        try:
            self.sock.close()
        except OSError:
            pass

    # -- pool mode -----------------------------------------------------------

    def _on_writable(self) -> None:
        if self.closed or self._flush():
            watcher, self._waiter = self._waiter, None
            if watcher is not None:
                watcher.stop()
                watcher.close()

    # -- greenlet mode -------------------------------------------------------

    def run(self) -> None:
        """Greenlet mode: write this connection's output until it closes."""
        hub = get_hub()
        self._waiter = me = getcurrent()
        writable = None
        try:
            while not self.closed:
                if not self._out:
                    self._parked = True
                    hub.switch()
                    continue
                if self._flush() or self.closed:
                    continue
                if writable is None:
                    writable = hub.loop.io(self.fd, 2)
                # A bare switch, like the parked wait, so that close() can wake
                # either wait the same way (hub.wait() would take close()'s
                # switch for an InvalidSwitchError and log a traceback).
                writable.start(me.switch)
                try:
                    hub.switch()
                finally:
                    writable.stop()
        finally:
            if writable is not None:
                writable.close()
            self.close()


class ConnectionTable:
    """Every live stream of this process, by user id.

    Attributes are the counters ``/stats`` reports.
    """

    def __init__(self, mode: str = "greenlet", max_pending: int = 256 * 1024) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown connection mode {mode!r}; choose from {MODES}")
        #: ``"greenlet"`` or ``"pool"``
        self.mode = mode
        #: bytes of unsent output a connection may hold before it is dropped
        self.max_pending = max_pending
        #: user id -> that user's connections
        self.users: dict[str, list[Connection]] = {}
        #: client address -> its open streams (those adopted with an address)
        self.addresses: dict[str, int] = {}
        self._index: OnlineIndex | None = None
        self._by_fd: dict[int, Connection] = {}
        # Kept as they change, so /metrics (read every second when scaled out)
        # does not walk every connection.
        #: open connections by kind (cometd.streamhttp: CHUNKED ... WEBSOCKET)
        self.by_kind = [0] * (WEBSOCKET + 1)
        #: bytes accepted from the router but not yet by the kernel, all connections
        self.pending = 0
        #: messages written to connections
        self.deliveries = 0
        #: the newest message key routed here: a fresh SSE stream's welcome id
        self.newest = 0
        #: the smallest key the router still routes (0: no router says)
        self.low = 0
        self._waiting: set[Connection] = set()
        #: connections closed because they did not read fast enough
        self.slow_consumers_dropped = 0
        #: streams ended, by reason (see DISCONNECT_REASONS)
        self.disconnects: dict[str, int] = dict.fromkeys(DISCONNECT_REASONS, 0)
        #: reason -> new streams refused for it (see cometd.limits)
        self.rejected: dict[str, int] = {}
        #: called with the user id after each login and logout (the backplane's presence)
        self.on_presence = None
        self._ending = False
        self._wheel = ExpiryWheel()
        #: expired streams given their farewell, closed at the next sweep
        self._expiring: set[Connection] = set()
        self._sweeper = None
        self.loop = get_hub().loop
        self._epoll = select.epoll()
        self._epoll_watcher = self.loop.io(self._epoll.fileno(), 1)
        self._epoll_watcher.start(self._on_epoll)

    @property
    def index(self) -> OnlineIndex:
        """The keys of ``users``, indexed for the router (see :mod:`cometd.online`).

        Built on first use and kept from then on: an edge, whose router is
        elsewhere, never pays its ~100 bytes per user.
        """
        if self._index is None:
            self._index = OnlineIndex()
            for user, conns in self.users.items():
                self._index.add(user, conns)
        return self._index

    @property
    def connections(self) -> int:
        return len(self._by_fd)

    @property
    def users_online(self) -> int:
        return len(self.users)

    def online(self, user: str) -> int:
        return len(self.users.get(user, ()))

    def adopt(self, sock: socket.socket, user: str, kind: int,
              expires: float | None = None, address: str | None = None,
              factory: type[Connection] = Connection) -> Connection:
        """Take over a stream whose headers have been sent; the user logs in.

        *expires*: when its token stops being accepted (Unix time); the stream ends then.
        *address*: the client's, counted in ``addresses`` while the stream is open.
        *factory*: the connection's class (a long poll's is cometd.longpoll's).
        """
        sock.setblocking(False)
        conn = factory(self, sock, user, kind)
        if address is not None:
            conn.address = address
            self.addresses[address] = self.addresses.get(address, 0) + 1
        if expires is not None:
            conn.expiry = self._wheel.add(conn, expires)
            if self._sweeper is None:
                self._sweeper = gevent.spawn(self._sweep)
        self._by_fd[conn.fd] = conn
        self.by_kind[conn.kind] += 1
        self._epoll.register(conn.fd, _EPOLL_FLAGS)
        conns = self.users.get(user)
        if conns is None:
            self.users[user] = conns = [conn]
            if self._index is not None:
                self._index.add(user, conns)
        else:
            conns.append(conn)
        if self.on_presence is not None:
            self.on_presence(user)
        return conn

    def _forget(self, conn: Connection) -> None:
        if self._by_fd.get(conn.fd) is conn:
            del self._by_fd[conn.fd]
            self.by_kind[conn.kind] -= 1
            if conn.address is not None:
                left = self.addresses.pop(conn.address) - 1
                if left:
                    self.addresses[conn.address] = left
            try:
                self._epoll.unregister(conn.fd)
            except (OSError, ValueError):
                pass
        if conn.expiry is not None:
            self._wheel.discard(conn, conn.expiry)
            self._expiring.discard(conn)
        self._logout(conn)

    def _logout(self, conn: Connection) -> None:
        conns = self.users.get(conn.user)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self.users[conn.user]
                if self._index is not None:
                    self._index.discard(conn.user)
            if self.on_presence is not None:
                self.on_presence(conn.user)

    def deliver(self, users: Iterable[str], message: Message) -> int:
        """Write *message* to every connection of *users*; return how many."""
        return self.deliver_online(filter(None, map(self.users.get, users)), message)

    def deliver_online(self, recipients: Iterable[list[Connection]], message: Message) -> int:
        """Write *message* to every connection in *recipients*; return how many.

        *recipients* are lists of ``users``, as :attr:`index` maps its users
        (the router's walk, :func:`cometd.online.recipients`): no lookup per
        recipient. A list emptied meanwhile (its user left) is passed over.
        """
        delivered = 0
        left = _YIELD_EVERY
        key = message.key
        if key > self.newest:
            self.newest = key
        # A smaller key is still on its way: it must reach each stream first.
        hold = self.low and key > self.low
        frames = message.frames  # each kind's bytes, once built
        for conns in recipients:
            for conn in tuple(conns) if len(conns) > 1 else conns:
                kind = conn.kind
                data = frames[kind] or message.frame(kind)
                if conn.after or hold:
                    if conn.after:  # a resumed stream (see cometd.server)
                        if conn.held is not None:
                            conn.held.append((key, data))
                            delivered += 1
                            continue
                        if key <= conn.after:
                            continue  # in its replay
                    if hold and not conn.closed:
                        conn.ordered.append((key, data))
                        self._waiting.add(conn)
                        delivered += 1
                        continue
                if conn._out or conn.closed or kind == POLL:
                    delivered += conn.deliver(data)
                else:
                    # Connection.deliver's hot path, inlined (it runs once
                    # per delivery): nothing queued, so send straight away.
                    # (_allowance is 0 whenever the outbox is empty, but
                    # within Connection.release.)
                    try:
                        sent = conn.sock.send(data)
                    except BlockingIOError:
                        sent = 0
                    except OSError:
                        conn.close("error")
                        sent = -1
                    if sent == len(data):
                        delivered += 1
                    elif sent >= 0:
                        delivered += conn._backlog(data[sent:])
                left -= 1
                if not left:
                    left = _YIELD_EVERY
                    yield_to_hub()
        self.deliveries += delivered
        return delivered

    def settle(self, low: int | None) -> None:
        """The router's smallest key on its way is now *low* (None: none).

        Writes what connections held back (see :mod:`cometd.router`) with
        keys up to *low*, in key order.
        """
        self.low = low or 0
        for conn in list(self._waiting):
            if low is None:
                ready, conn.ordered = conn.ordered, []
            else:
                ready = [e for e in conn.ordered if e[0] <= low]
                if not ready:
                    continue
                conn.ordered = [e for e in conn.ordered if e[0] > low]
            if not conn.ordered:
                self._waiting.discard(conn)
            if not conn.closed:
                ready.sort(key=lambda e: e[0])
                conn.deliver(b"".join(frame for _, frame in ready))

    def keepalive(self, part: int = 0, parts: int = 1) -> int:
        """Write an SSE comment to every SSE stream, a ping to every WebSocket; return how many.

        With *parts*, only to those whose descriptor is *part* modulo *parts*,
        so a round can be spread over its interval (cometd.lifecycle): at 1M,
        every edge writing to all its streams at once was a million writes
        and reads in a few seconds, in the middle of the messages.
        """
        if self._ending:
            return 0  # nothing after a stream's last chunk
        expiring = self._expiring
        by_fd = self._by_fd
        if parts == 1:
            conns = list(by_fd.values())
        else:  # descriptors are below the open-file limit: look up the slice only
            top = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            conns = [c for c in map(by_fd.get, range(part, top, parts)) if c is not None]
        kept = [c for c in conns
                if c.kind in (SSE_CHUNKED, SSE_RAW, WEBSOCKET) and c not in expiring]
        for conn in kept:
            conn.deliver(PING if conn.kind == WEBSOCKET else frame_bytes(conn.kind, KEEPALIVE))
        return len(kept)

    def _sweep(self) -> None:
        """Once a second: close the streams expired a second ago, bid farewell to those due."""
        while True:
            gevent.sleep(1.0)
            for conn in list(self._expiring):
                conn.close("expired")
            for conn in self._wheel.due(time.time()):
                if conn.closed:
                    continue
                self._logout(conn)  # nothing is routed to it any more
                farewell = EXPIRED_EVENT if conn.kind in (SSE_CHUNKED, SSE_RAW) else b""
                farewell = frame_bytes(conn.kind, farewell) if farewell else b""
                if conn.kind in (CHUNKED, SSE_CHUNKED):
                    farewell += LAST_CHUNK
                elif conn.kind == WEBSOCKET:
                    farewell = CLOSE_FRAMES["expired"]
                if not farewell:
                    conn.close("expired")  # a raw plain stream: its end is the close
                    continue
                self._expiring.add(conn)
                conn.deliver(farewell)

    def _on_epoll(self) -> None:
        for fd, events in self._epoll.poll(0, 1024):
            conn = self._by_fd.get(fd)
            if conn is None:
                continue
            try:
                data = conn.sock.recv(4096)
            except BlockingIOError:
                data = None  # nothing to read: a hang-up woke us, if anything
            except OSError:
                data = b""
            # A stream client has nothing to say; whatever it sends is
            # dropped, but for a WebSocket's pings and close. A waiting poll's
            # may not speak before its answer (no pipelining).
            if data and conn.kind == WEBSOCKET:
                client_data(conn, data)
            if data == b"" or events & _GONE or (data and conn.kind == POLL):
                conn.close("client")

    def end_all(self, grace: float = CLOSE_GRACE) -> None:
        """End every stream: chunked ones with their last chunk, within *grace* seconds."""
        conns = list(self._by_fd.values())
        # Nothing may be routed to a stream after its last chunk.
        self._ending = True
        self.users.clear()
        self._index = None  # rebuilt from users (empty) if asked again
        self._end(conns, grace, "shutdown")

    def kick(self, user: str) -> int:
        """End every stream of *user* (as :meth:`end_all` does); return how many."""
        conns = [c for c in self.users.get(user, ()) if c not in self._expiring]
        for conn in conns:
            self._forget(conn)  # nothing more is routed to it; the user logs out
        if conns:
            gevent.spawn(self._end, conns, CLOSE_GRACE, "kicked")
        return len(conns)

    def drain(self, seconds: float, min_rate: float = DRAIN_MIN_RATE) -> None:
        """End every stream, spread evenly over *seconds* (see :data:`DRAIN_MIN_RATE`).

        Streams still open meanwhile go on getting their messages.
        """
        # (An expiring stream has had its last chunk; it closes on its own.)
        conns = [c for c in self._by_fd.values() if c not in self._expiring]
        if not conns:
            return
        span = min(seconds, len(conns) / min_rate)
        log.event("drain", f"draining {len(conns)} streams over {span:.3g} s",
                  streams=len(conns), seconds=round(span, 3))
        start = time.monotonic()
        enders = []
        done = 0
        while done < len(conns):
            due = len(conns) if span <= 0 else min(
                len(conns), int((time.monotonic() - start) / span * len(conns)) + 1)
            batch = conns[done:due]
            done = due
            for conn in batch:
                self._forget(conn)
            enders.append(gevent.spawn(self._end, batch, CLOSE_GRACE, "drain"))
            if done < len(conns):
                gevent.sleep(DRAIN_STEP)
        gevent.joinall(enders)
        log.event("drained", f"drained {len(conns)} streams in {time.monotonic() - start:.3g} s",
                  streams=len(conns))

    def end(self, conn: Connection, farewell: bytes, reason: str) -> None:
        """End *conn* now with *farewell* as its last bytes; close it once they are taken.

        Nothing more is routed to it. (A WebSocket's close, cometd.websocket.)
        """
        self._forget(conn)
        conn.ordered = []
        self._waiting.discard(conn)
        conn.deliver(farewell)
        gevent.spawn(self._close_when_sent, [conn], CLOSE_GRACE, reason)

    def _end(self, conns: list[Connection], grace: float, reason: str) -> None:
        for conn in conns:
            if conn in self._expiring:
                continue  # it has had its farewell
            if conn.kind in (CHUNKED, SSE_CHUNKED):
                conn.deliver(LAST_CHUNK)
            elif conn.kind == WEBSOCKET:
                conn.deliver(CLOSE_FRAMES[reason])
        self._close_when_sent(conns, grace, reason)

    def _close_when_sent(self, conns: list[Connection], grace: float, reason: str) -> None:
        deadline = time.monotonic() + grace
        while any(c._out and not c.closed for c in conns) and time.monotonic() < deadline:
            gevent.sleep(0.01)
        for conn in conns:
            conn.close(reason)

    def close(self) -> None:
        """End every stream (see :meth:`end_all`) and stop watching for disconnects."""
        if self._sweeper is not None:
            self._sweeper.kill()
        self.end_all()
        self._epoll_watcher.stop()
        self._epoll_watcher.close()
        self._epoll.close()
