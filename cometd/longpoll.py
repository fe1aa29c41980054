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
The web app parses the request (:func:`parse_poll_query`) and marks the
WSGI environ with a :class:`PollRequest`; :func:`take` (from the handler)
admits it and takes the socket from pywsgi, and :func:`open_poll` (from
:meth:`cometd.server.CometServer.handle`, once the handler is gone) files it
in the :class:`~cometd.connections.ConnectionTable` as a
:class:`PollConnection` of kind :data:`~cometd.streamhttp.POLL`. So a waiting
poll is what an idle stream is, a connection in the table, plus a libev timer
for its timeout, and it has no greenlet in either connection mode (nothing
is written to it until its answer).

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
edge may still see two subjects' ids out of order (see
:meth:`cometd.backplane.Presence.settle`): the same hole resumed streams have.

After its answer a poll over HTTP/1.1 keeps its connection (unless the
client asked to close): the socket goes back to pywsgi for the next request,
with the request timeout. A client that sends anything while its poll waits
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

import gevent
from gevent import socket as gsocket

from cometd.connections import Connection
from cometd.cors import with_lines
from cometd.counts import COUNTS
from cometd.history import Replay, format_id, parse_id
from cometd.streamhttp import POLL, poll_entry

__all__ = ["POLL_KEY", "DEFAULT_TIMEOUT", "MAX_TIMEOUT", "PollError", "PollRequest",
           "PollConnection", "parse_poll_query", "answer_body", "answer_response", "take",
           "open_poll"]

#: the WSGI environ key the web app marks a poll request with
POLL_KEY = "cometd.poll"
#: seconds a poll waits when it names no timeout, and the most it may name
DEFAULT_TIMEOUT = 25.0
MAX_TIMEOUT = 60.0

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
    """What a waiting poll answers with, besides its messages."""

    server: Any
    address: Any
    lines: str
    keep: bool


class PollConnection(Connection):
    """A waiting poll in the connection table: collects entries, answers once."""

    __slots__ = ("_entries", "_timer", "_due", "waiting", "start", "recovered", "reason")

    def __init__(self, table, sock, user: str, kind: int) -> None:
        super().__init__(table, sock, user, kind)
        self._entries: list[bytes] = []
        self._timer = None
        #: the answer is scheduled
        self._due = False
        self.waiting: _Waiting | None = None
        #: the answer's last_event_id when it has no messages
        self.start: str | None = None
        self.recovered = True
        self.reason = ""

    def deliver(self, data: bytes) -> bool:
        if self.closed:
            return False  # answered: the message waits in the history for the next poll
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
        self._timer = self.table.loop.timer(timeout)
        self._timer.start(self._answer)

    def release_replay(self, replay: Replay, timeout: float) -> None:
        """Keep the *replay* and what was held after its head (see :meth:`Connection.hold`)."""
        held, self.held = self.held or [], None
        self.after = replay.head
        self.start = format_id(replay.head)
        self.recovered, self.reason = replay.recovered, replay.reason
        self._entries = [poll_entry(*m) for m in replay.messages]
        self._entries.extend(frame for key, frame in held if key > replay.head)
        self.wait(timeout)

    def close(self, reason: str = "error") -> None:
        if reason in _ANSWERED_ENDS and not self.closed:
            self.table.disconnects[reason] += 1
            self._answer(keep=False)
            return
        self._stop_timer()
        super().close(reason)

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.stop()
            timer.close()

    def _answer(self, keep: bool = True) -> None:
        if self.closed:
            return
        self._stop_timer()
        self.closed = True
        self.table._forget(self)
        entries = b"".join(self._entries)
        self._entries = []
        COUNTS.polls_answered["messages" if entries else "empty"] += 1
        waiting = self.waiting
        keep = keep and waiting.keep
        body = answer_body(entries, self.start, self.recovered, self.reason)
        _finish(waiting, self.sock, answer_response(200, body, waiting.lines, keep), keep)


def _finish(waiting: _Waiting, sock: _socket.socket, response: bytes, keep: bool) -> None:
    """Send *response* (non-blocking, from the hub), then close or serve the next request."""
    try:
        sent = sock.send(response)
    except BlockingIOError:
        sent = 0
    except OSError:
        sock.close()
        return
    if sent == len(response) and not keep:
        sock.close()
        return
    gevent.spawn(_finish_later, waiting, sock, response[sent:], keep)


def _finish_later(waiting: _Waiting, sock: _socket.socket, rest: bytes, keep: bool) -> None:
    server = waiting.server
    gsock = gsocket.socket(fileno=sock.detach())
    try:
        if rest:
            gsock.settimeout(server.request_timeout)
            gsock.sendall(rest)
    except OSError:
        gsock.close()
        return
    if keep and not server.closed:
        server.handle(gsock, waiting.address)  # the connection's next request
    else:
        gsock.close()


def _host(address: Any) -> str:
    return address[0] if isinstance(address, tuple) else str(address)


def take(handler: Any, request: PollRequest) -> tuple[Any, ...] | None:
    """From the server's handler: admit the poll and take its socket from pywsgi.

    What :func:`open_poll` needs, or None when the limits refused it (answered here).
    """
    server = handler.server
    cors = server.cors
    lines = "" if cors is None else cors.stream_lines(handler.environ.get("HTTP_ORIGIN"))
    refused = server.admission.admit(request.user, _host(handler.client_address))
    handler_keeps = handler.request_version == "HTTP/1.1" and not handler.close_connection
    handler.close_connection = True
    if refused is not None:
        handler.socket.sendall(with_lines(refused, lines) if lines else refused)
        return None
    sock, handler.socket = handler.socket, None  # pywsgi must not close it: the table owns it
    return sock, handler.client_address, request, lines, handler_keeps


def open_poll(server: Any, gsock: Any, address: Any, request: PollRequest, lines: str,
              keep: bool) -> None:
    """File the poll in the table; answer it from the history or wait (module docstring)."""
    try:
        raw = _socket.socket(fileno=gsock.detach())
    except OSError:
        return
    table = server.table
    conn = table.adopt(raw, request.user, POLL, None, _host(address), factory=PollConnection)
    conn.waiting = _Waiting(server, address, lines, keep)
    timeout = request.timeout
    if request.expires is not None:
        # Answered by the time its token expires: the next poll needs a fresh one.
        timeout = min(timeout, max(0.0, request.expires - time.time()))
    if request.since is None:
        conn.after = table.newest
        conn.start = format_id(table.newest) if table.newest else None
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
        _finish(conn.waiting, raw, answer_response(503, body, lines), False)
        return
    conn.release_replay(replay, timeout)
