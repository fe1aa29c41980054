"""Long polling: ``GET /poll/<id>?since=<message id>&timeout=<s>``.

For a client that can hold neither a stream nor an event source (a proxy that
buffers responses, a runtime without streaming reads), a poll asks once and
gets a single JSON answer::

    {"messages": [{"id": "3-17", "from": "alice", "body": "hi"}, ...],
     "last_event_id": "3-17", "recovered": true}

at once when messages for the user after ``since`` exist, else as soon as the
next one is routed, else after ``timeout`` seconds (default 25, at most 60)
with none. ``last_event_id`` is what the next poll passes as ``since``;
``recovered`` is false (with a ``reason``) when messages after ``since`` may
be missing (the history no longer reaches back, or the id is unknown). A
poll is admitted, counted, limited and authenticated as a stream is (the
same token, :mod:`cometd.limits`, CORS headers, the ``poll`` transport in
``/metrics``).

Theory of operation
-------------------
A plain poll request (the grammar of :mod:`cometd.streamhttp`, whole in its
first segment, a valid query and token) is taken in the server's accept
callback (:func:`accept_poll`), as a plain stream is; anything else goes to
pywsgi and the web app, which parse it (:func:`parse_poll_query`), answer
its errors, and mark the WSGI environ with a :class:`PollRequest`, and
:func:`take` (from the handler) admits it and takes the socket from pywsgi.
Either way :func:`open_poll` files it in the
:class:`~cometd.connections.ConnectionTable` as a :class:`PollConnection` of
kind :data:`~cometd.streamhttp.POLL`. So a waiting poll is what an idle
stream is, a connection in the table, with no greenlet in either connection
mode (nothing is written to it until its answer) and no timer of its own:
the timeouts of one table's polls are filed in a wheel of 0.1 s ticks that
one timer sweeps while any poll waits (:class:`_Deadlines`).

A message's frame for a poll is its JSON entry and a comma
(:func:`cometd.streamhttp.poll_entry`), built once per message. The first
one routed to a poll schedules its answer for the end of the loop turn
(``loop.run_callback``): whatever else reaches it in the same turn (the
messages a resume found, those the router held back for ordering and
releases together) goes in the same answer; there is no coalescing window
beyond that. Answering takes the poll out of the table first, so a message
routed after it is not lost but waits in the history for the next poll.

The seam: a poll with ``since`` is opened as a resuming stream is (see
:mod:`cometd.server`): it holds what is routed to it, reads the replay
(in this process, or from the router on an edge, which counts the user
online here first), then keeps the replay and what was held with ids above
the replay's head. ``last_event_id`` is the id of the last message in the
answer, and the messages reach a connection in id order (the router's
``settle``), so every message after it was either not yet routed or held
back, and both are in the history for the next poll: none lost, none twice.
An answer with no messages carries the point the poll started from (the
replay's head, or for a poll without ``since`` the newest id this process
had routed; ``null`` when it had routed none yet), so a message routed while
the poll waited but missed is replayed by the next one. Scaled out, an
edge sees ids in order too: the router publishes a message only once every
smaller id is grouped (see :mod:`cometd.backplane`).

After its answer a poll over HTTP/1.1 keeps its connection (unless the
client asked to close): a read watcher, again no greenlet, waits up to the
request timeout for the next request (:class:`_Kept`), takes it if it is a
plain poll, else hands it to pywsgi. A client that sends anything while its poll waits
is closed (no pipelining). At a drain, shutdown or kick a waiting poll is
answered with no messages and ``Connection: close``.
"""

from __future__ import annotations

import _socket
import json
import re
import time
from email.utils import formatdate
from typing import Any, NamedTuple
from urllib.parse import parse_qs
from weakref import WeakKeyDictionary

import gevent
from gevent import socket as gsocket

from cometd.auth import AuthError
from cometd.connections import Connection
from cometd.cors import with_lines
from cometd.counts import COUNTS
from cometd.expiry import ExpiryWheel
from cometd.history import Replay, format_id, parse_id
from cometd.httprequest import FIELD_VALUE, TCHAR
from cometd.ids import ID_PATTERN
from cometd.streamhttp import (
    FIRST_READ_BYTES,
    POLL,
    plain_fields,
    poll_entry,
    stream_credentials,
)

__all__ = ["POLL_KEY", "DEFAULT_TIMEOUT", "MAX_TIMEOUT", "TICK", "PollError", "PollRequest",
           "PollConnection", "deadlines", "parse_poll_query", "parse_poll_request", "answer_body",
           "answer_response", "accept_poll", "take", "open_poll"]

#: the WSGI environ key the web app marks a poll request with
POLL_KEY = "cometd.poll"
#: seconds a poll waits when it names no timeout, and the most it may name
DEFAULT_TIMEOUT = 25.0
MAX_TIMEOUT = 60.0
#: seconds per tick of the poll timeouts' wheel: how late past its timeout a poll may answer
TICK = 0.1

_POLL_REQUEST = re.compile(
    rb"GET /poll/(" + ID_PATTERN.encode() + rb")(?:\?([!-~]*))? HTTP/1\.([01])\r"
    rb"(\n(?:" + TCHAR.encode() + rb"+:" + FIELD_VALUE.encode() + rb"*\r\n)*)\r\n"
)
_TIMEOUT = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3})?\Z")
#: how each entry of an answer starts (json.dumps' separators; see PollConnection._answer)
_ENTRY_START = b'{"id": "'
#: the ends of a waiting poll that still get an (empty) answer
_ANSWERED_ENDS = ("drain", "shutdown", "kicked")
_STATUS = {200: "OK", 503: "Service Unavailable"}


class PollError(ValueError):
    """A poll request's query is not valid (400)."""


class PollRequest(NamedTuple):
    """A parsed, authenticated poll request."""

    user: str
    #: the message id to answer after; None: wait for the next message
    since: str | None
    #: seconds to wait for a message
    timeout: float
    #: when the request's token stops being accepted (Unix time), if it has one
    expires: float | None


def parse_poll_query(query: str) -> tuple[str | None, float]:
    """``(since, timeout)`` of a poll's query string; :class:`PollError` when either is bad.

    An empty ``since`` is none; of a parameter given twice the last counts.
    """
    params = parse_qs(query, keep_blank_values=True)
    since = (params.get("since") or [""])[-1] or None
    if since is not None and parse_id(since) is None:
        raise PollError("since must be a message id, like 1-42 (a last_event_id)")
    timeout = DEFAULT_TIMEOUT
    values = params.get("timeout")
    if values:
        text = values[-1]
        if not _TIMEOUT.match(text) or float(text) > MAX_TIMEOUT:
            raise PollError(f"timeout must be a number of seconds from 0 to {MAX_TIMEOUT:g}")
        timeout = float(text)
    return since, timeout


def answer_body(entries: bytes, last: str | None, recovered: bool, reason: str = "") -> bytes:
    """A poll's JSON answer from *entries* (each entry followed by a comma, or empty).

    *last* is the answer's ``last_event_id`` when it has no entries; with
    entries it is the id of the last one.
    """
    if entries:
        start = entries.rindex(_ENTRY_START) + len(_ENTRY_START)
        last = entries[start:entries.index(b'"', start)].decode()
        entries = entries[:-1]
    tail = {"last_event_id": last, "recovered": recovered}
    if not recovered:
        tail["reason"] = reason
    return b'{"messages": [%s], %s' % (entries, json.dumps(tail)[1:].encode())


def answer_response(status: int, body: bytes, headers: str = "", keep: bool = False) -> bytes:
    """The whole HTTP response carrying a poll's *body*; *headers* are more header lines."""
    connection = "" if keep else "Connection: close\r\n"
    return (f"HTTP/1.1 {status} {_STATUS[status]}\r\nContent-Type: application/json\r\n"
            f"Cache-Control: no-store\r\nContent-Length: {len(body)}\r\n"
            f"Date: {formatdate(usegmt=True)}\r\n{headers}{connection}\r\n").encode() + body


class _Waiting(NamedTuple):
    """What a waiting poll answers with, besides its messages: shared by many polls."""

    server: Any
    lines: str
    keep: bool


#: (server, CORS lines, keep-alive) -> their one _Waiting: a poll holds no tuple of its own
_WAITING: dict[tuple[Any, str, bool], _Waiting] = {}


class _Deadlines:
    """Every waiting poll (and kept connection, :class:`_Kept`, and publisher's connection,
    :mod:`cometd.publish`) of one table by the tick its timeout ends at; one timer sweeps
    them, calling each one's ``_answer``.

    An :class:`~cometd.expiry.ExpiryWheel` counting ticks of :data:`TICK`
    seconds (of the monotonic clock) instead of seconds: a poll costs a set
    entry rather than a timer of its own, and the timer runs only while some
    poll waits. A poll is answered no earlier than its timeout and at most a
    tick later.
    """

    def __init__(self, loop: Any) -> None:
        self.wheel = ExpiryWheel(now=time.monotonic() / TICK)
        self.count = 0  # polls filed
        self.timer = loop.timer(TICK, TICK)

    def add(self, conn: Any, timeout: float) -> int:
        """File *conn* to be answered *timeout* seconds from now; the tick it is under."""
        tick = self.wheel.add(conn, (time.monotonic() + timeout) / TICK)
        self.count += 1
        if self.count == 1:
            self.timer.start(self._sweep)
        return tick

    def discard(self, conn: Any, tick: int) -> None:
        self.wheel.discard(conn, tick)
        self.count -= 1
        if not self.count:
            self.timer.stop()

    def _sweep(self) -> None:
        due = self.wheel.due(time.monotonic() / TICK)
        self.count -= len(due)
        if not self.count:
            self.timer.stop()
        for conn in due:
            conn._tick = None
            conn._answer()


#: table -> its polls' deadlines (one timer per table's loop)
_DEADLINES: WeakKeyDictionary[Any, _Deadlines] = WeakKeyDictionary()


def deadlines(table: Any) -> _Deadlines:
    """The tick wheel of *table*'s loop (its polls, kept connections and publishers)."""
    wheel = _DEADLINES.get(table)
    if wheel is None:
        wheel = _DEADLINES[table] = _Deadlines(table.loop)
    return wheel


class PollConnection(Connection):
    """A waiting poll in the connection table: collects entries, answers once.

    ``after`` (a stream's replay head) is also where the poll started: an
    answer with no messages gives it as its last_event_id.
    """

    __slots__ = ("_entries", "_tick", "_due", "waiting", "recovered", "reason")

    def __init__(self, table, sock, user: str, kind: int) -> None:
        super().__init__(table, sock, user, kind)
        self._entries: list[bytes] | None = None
        #: the tick its timeout is filed under, while it is
        self._tick: int | None = None
        #: the answer is scheduled
        self._due = False
        self.waiting: _Waiting | None = None
        self.recovered = True
        self.reason = ""

    def deliver(self, data: bytes) -> bool:
        if self.closed:
            return False  # answered: the message waits in the history for the next poll
        if self._entries is None:
            self._entries = [data]
        else:
            self._entries.append(data)
        if not self._due:
            self._due = True
            self.table.loop.run_callback(self._answer)
        return True

    def wait(self, timeout: float) -> None:
        """Answer after *timeout* seconds unless a message comes first."""
        if self._entries or timeout <= 0:
            self._due = True
            self.table.loop.run_callback(self._answer)
            return
        self._tick = deadlines(self.table).add(self, timeout)

    def release_replay(self, replay: Replay, timeout: float) -> None:
        """Keep the *replay* and what was held after its head (see :meth:`Connection.hold`)."""
        held, self.held = self.held or [], None
        self.after = replay.head
        self.recovered, self.reason = replay.recovered, replay.reason
        entries = [poll_entry(*m) for m in replay.messages]
        entries.extend(frame for key, frame in held if key > replay.head)
        self._entries = entries or None
        self.wait(timeout)

    def close(self, reason: str = "error") -> None:
        if reason in _ANSWERED_ENDS and not self.closed:
            self.table.disconnects[reason] += 1
            self._answer(keep=False)
            return
        self._unfile()
        super().close(reason)

    def _unfile(self) -> None:
        tick, self._tick = self._tick, None
        if tick is not None:
            deadlines(self.table).discard(self, tick)

    def _answer(self, keep: bool = True) -> None:
        if self.closed:
            return
        self._unfile()
        self.closed = True
        self.table._forget(self)
        entries = b"".join(self._entries or ())
        self._entries = None
        COUNTS.polls_answered["messages" if entries else "empty"] += 1
        waiting = self.waiting
        keep = keep and waiting.keep
        start = format_id(self.after) if self.after > 0 else None
        body = answer_body(entries, start, self.recovered, self.reason)
        _finish(waiting, self.sock, answer_response(200, body, waiting.lines, keep), keep)


def _finish(waiting: _Waiting, sock: _socket.socket, response: bytes, keep: bool) -> None:
    """Send *response* (non-blocking, from the hub), then close or wait for the next request."""
    try:
        sent = sock.send(response)
    except BlockingIOError:
        sent = 0
    except OSError:
        sock.close()
        return
    if sent < len(response):
        gevent.spawn(_finish_later, waiting, sock, response[sent:], keep)
    elif keep and not waiting.server.closed:
        _Kept(waiting.server, sock)
    else:
        sock.close()


def _finish_later(waiting: _Waiting, sock: _socket.socket, rest: bytes, keep: bool) -> None:
    server = waiting.server
    gsock = gsocket.socket(fileno=sock.detach())
    try:
        gsock.settimeout(server.request_timeout)
        gsock.sendall(rest)
    except OSError:
        gsock.close()
        return
    sock = _socket.socket(fileno=gsock.detach())
    if keep and not server.closed:
        sock.setblocking(False)
        _Kept(server, sock)
    else:
        sock.close()


class _Kept:
    """A kept connection between an answer and its next request: a read watcher, no greenlet.

    Filed in the table's timeout wheel, so it is closed after the request
    timeout if no request comes. The next request, once its first bytes are
    in, is taken here if it is a plain poll, else handed to pywsgi.
    """

    __slots__ = ("server", "sock", "watcher", "_tick")

    def __init__(self, server: Any, sock: _socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.watcher = server.table.loop.io(sock.fileno(), 1)
        self.watcher.start(self._readable)
        self._tick: int | None = deadlines(server.table).add(self, server.request_timeout)

    def _stop(self) -> None:
        self.watcher.stop()
        self.watcher.close()
        tick, self._tick = self._tick, None
        if tick is not None:
            deadlines(self.server.table).discard(self, tick)

    def _answer(self) -> None:
        """The request timeout ran out (the wheel's call): close."""
        self._tick = None
        self._stop()
        self.sock.close()

    def _readable(self) -> None:
        sock = self.sock
        try:
            first = sock.recv(FIRST_READ_BYTES)
            address = sock.getpeername()
        except BlockingIOError:
            return
        except OSError:
            first = b""
        self._stop()
        if not first:
            sock.close()
            return
        server = self.server
        if first.startswith(b"GET /poll/") and accept_poll(server, sock, address, first):
            return
        gsock = gsocket.socket(fileno=sock.detach())
        # Not spawn(server.handle, ..., first): gevent prints a failed
        # greenlet's arguments, and a token in them would reach the log.
        gevent.spawn(lambda: server.handle(gsock, address, first))


def _host(address: Any) -> str:
    return address[0] if isinstance(address, tuple) else str(address)


def parse_poll_request(data: bytes) -> tuple[str, str, bool] | None:
    """``(user, query, keep-alive)`` when *data* is a complete plain poll request, else None.

    The same grammar as :func:`cometd.streamhttp.parse_stream_request`;
    anything else goes to pywsgi and the web app, which answer it.
    """
    match = _POLL_REQUEST.match(data)
    if match is None:
        return None
    user, query, minor, fields = match.groups()
    fields = fields.lower()
    if not plain_fields(fields, minor == b"0"):
        return None
    keep = minor == b"1"
    at = fields.find(b"\nconnection:")
    if at >= 0:
        if fields.find(b"\nconnection:", at + 1) >= 0:
            return None  # pywsgi decides
        keep = keep and b"close" not in fields[at:fields.index(b"\r", at)]
    return user.decode(), (query or b"").decode("latin-1"), keep


def accept_poll(server: Any, sock: _socket.socket, address: Any, first: bytes) -> bool:
    """From the accept callback: take a plain, valid, admitted poll request (True).

    False leaves the request (and *sock*) to pywsgi and the web app: not a
    plain poll, a bad query, or a refused token, each of which they answer.
    """
    parsed = parse_poll_request(first)
    if parsed is None:
        return False
    user, query, keep = parsed
    try:
        since, timeout = parse_poll_query(query)
    except PollError:
        return False
    expires = None
    if server.auth.enabled:
        credentials = stream_credentials(first)
        if credentials is None:
            return False
        try:
            expires = server.auth.stream(user, *credentials).expires
        except AuthError:
            return False
    cors = server.cors
    lines = "" if cors is None else cors.stream_lines_for(first)
    refused = server.admission.admit(user, _host(address))
    if refused is not None:
        try:
            sock.send(with_lines(refused, lines) if lines else refused, _socket.MSG_DONTWAIT)
        except OSError:
            pass
        sock.close()
        return True
    request = PollRequest(user, since, timeout, expires)
    if since is None:
        open_poll(server, sock, address, request, lines, keep)
    else:
        gevent.spawn(open_poll, server, sock, address, request, lines, keep)  # reads the replay
    return True


def take(handler: Any, request: PollRequest) -> tuple[Any, ...] | None:
    """From the server's handler: admit the poll and take its socket from pywsgi.

    What :func:`open_poll` needs, or None when the limits refused it (answered here).
    """
    server = handler.server
    cors = server.cors
    lines = "" if cors is None else cors.stream_lines(handler.environ.get("HTTP_ORIGIN"))
    refused = server.admission.admit(request.user, _host(handler.client_address))
    keep = handler.request_version == "HTTP/1.1" and not handler.close_connection
    handler.close_connection = True
    if refused is not None:
        handler.socket.sendall(with_lines(refused, lines) if lines else refused)
        return None
    gsock, handler.socket = handler.socket, None  # pywsgi must not close it: the table owns it
    try:
        sock = _socket.socket(fileno=gsock.detach())
    except OSError:
        return None
    return sock, handler.client_address, request, lines, keep


def open_poll(server: Any, sock: _socket.socket, address: Any, request: PollRequest,
              lines: str, keep: bool) -> None:
    """File the poll in the table; answer it from the history or wait (module docstring)."""
    table = server.table
    conn = table.adopt(sock, request.user, POLL, None, _host(address), factory=PollConnection)
    waiting = _WAITING.get((server, lines, keep))
    if waiting is None:
        waiting = _WAITING[(server, lines, keep)] = _Waiting(server, lines, keep)
    conn.waiting = waiting
    timeout = request.timeout
    if request.expires is not None:
        # Answered by the time its token expires: the next poll needs a fresh one.
        timeout = min(timeout, max(0.0, request.expires - time.time()))
    if request.since is None:
        conn.after = table.newest
        conn.wait(timeout)
        return
    conn.hold()
    replay = server.replay(request.user, request.since)
    if conn.closed:
        return
    if not replay.head:
        # No history could be read (a router out of reach): answering without
        # it would skip what it holds, so the client is told to try again.
        conn.closed = True
        table._forget(conn)
        COUNTS.rejected["503"] += 1
        body = json.dumps({"error": replay.reason}).encode()
        _finish(conn.waiting, sock, answer_response(503, body, lines), False)
        return
    conn.release_replay(replay, timeout)
