"""The HTTP server: pywsgi serving the web app, handing streams to the table.

:class:`CometServer` is gevent's ``WSGIServer`` with two changes. Stream
requests, resumes too, are answered in the accept callback, without pywsgi (see
:mod:`cometd.streamhttp` for why and how). And when the app marks a request as
a stream, the handler sends the stream's head, and the socket then leaves
pywsgi for the :class:`~cometd.connections.ConnectionTable`. Either way only
the connection (and, in greenlet mode, a parked greenlet with a shallow stack)
stays; no handler, WSGI environ or read buffer does.

A connection whose first request is a publish goes to
:func:`cometd.publish.serve_publisher` instead, which serves publishes on it
without pywsgi and bottle, and hands it on when another request comes.

A resuming stream (see :mod:`cometd.history`) is adopted first, holding what
is routed to it; then, in a greenlet (one the accept callback spawns, or
pywsgi's once its handler is done: :meth:`CometServer.resume`), the replay is
read (in this process, in one loop turn; on an edge, from the router, which
counts the user online on this edge before it reads), then the
head, the replay and what was held with an id above the replay's *head* (the
newest id handed out when it was read) are written. From then on the
connection drops messages with an id up to *head*: each was replayed (or is
reported lost), and only a fan-out already under way can still bring one.
Every message with a later id is routed to the stream. So the seam has no
gap and no duplicate.

The handler holds every request to a strict HTTP/1.1 grammar
(:mod:`cometd.httprequest`, against request smuggling): an error closes the
connection, and so does a body not read to its end, so nothing after it is
ever taken for a request. It also bounds what a client can make the server
hold while reading a request: headers over 64 KiB get 431, and a request that
has not arrived within ``request_timeout`` seconds (slowloris) is closed.
Either way, a new stream is first admitted by :class:`cometd.limits.Admission`
(per id, per address, rate, process-wide cap), which may answer 429 or 503.

Accepting in batches: a process woken for every new connection pays a
wakeup each (~0.1-0.2 ms of cold caches when fifty edges share two cores,
against ~13 us for the accept itself), so once a wakeup has emptied the
listen queue with streams alone, the listener is not watched for
:data:`ACCEPT_PAUSE`; the connections arriving meanwhile wait in the kernel
and are taken together. A busy listener (a full ``max_accept`` batch) is not
paused, so its rate is not capped, nor is one handed any other request (a
send on a fresh connection), so requests do not wait; a new stream waits at
most that long more for its welcome.

:class:`LocalBackend` is what the web app and the admin console call in a
single-process server: the router for sends, the store for subscriptions.
"""

from __future__ import annotations

import _socket
import errno
import io
import json
import logging
import math
import resource
import socket
import time
from collections.abc import Callable
from itertools import islice
from typing import Any

import gevent
import psutil
from gevent import socket as gsocket
from gevent.pywsgi import OldMessage, WSGIHandler, WSGIServer
from greenlet import greenlet

from cometd import log
from cometd.auth import Authenticator, AuthError
from cometd.config import AuthConfig, HttpConfig
from cometd.connections import ConnectionTable
from cometd.cors import CorsPolicy, with_lines
from cometd.counts import COUNTS
from cometd.history import Replay
from cometd.httprequest import RequestBody, RequestError, read_head
from cometd.limits import Admission
from cometd.longpoll import POLL_KEY, accept_poll, open_poll
from cometd.longpoll import take as take_poll
from cometd.metrics import exposition
from cometd.publish import FAST_PREFIXES, Publisher, serve_publisher
from cometd.router import Router, Sent
from cometd.store import SubscriptionStore
from cometd.streamhttp import (
    DEFAULT_RETRY_MS,
    FIRST_READ_BYTES,
    RAW,
    SSE_RAW,
    WEBSOCKET,
    parse_stream_request,
    resumed_head,
    stream_credentials,
    stream_head,
)
from cometd.webapp import STREAM_KEY, BackendUnavailable
from cometd.websocket import resumed_frames, upgrade

__all__ = ["CometServer", "CometHandler", "LocalBackend", "ACCEPT_PAUSE"]

#: seconds a listener rests after a wakeup that emptied its queue (see the docstring)
ACCEPT_PAUSE = 0.02

def _response(status: str, payload: dict[str, str]) -> bytes:
    body = json.dumps(payload).encode()
    return (
        f"HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class _Unshown(bytes):
    """Bytes a request began with, shown as their length only.

    They become an argument of the handler's greenlet, and gevent prints a
    greenlet's arguments when it fails: a token in them would reach the log.
    """

    def __repr__(self) -> str:
        return f"<{len(self)} request bytes>"


_REASONS = {400: "Bad Request", 431: "Request Header Fields Too Large",
            501: "Not Implemented"}


class _DeadlineInput(io.RawIOBase):
    """A handler's socket input where all reads of one request share a deadline.

    A socket timeout alone restarts with every recv, so a client trickling a
    byte every few seconds (slowloris) would be kept forever.
    """

    def __init__(self, sock, timeout: float, first: bytes = b"") -> None:
        self.sock = sock
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        #: bytes the accept callback already read from the socket
        self.first = first

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.first:
            n = min(len(buffer), len(self.first))
            buffer[:n] = self.first[:n]
            self.first = self.first[n:]
            return n
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request not received within the request timeout")
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.timeout)  # for the response's writes


class CometHandler(WSGIHandler):
    """pywsgi's handler, with bounded headers and stream hand-off."""

    #: (socket, user, kind, expires, address, path, since) once the request turned into a stream
    stream: tuple[Any, str, int, float | None, str, str, str | None] | None = None
    #: what cometd.longpoll.open_poll takes, once the request turned into a waiting poll
    poll: tuple[Any, ...] | None = None

    def __init__(self, sock, address, server, first: bytes = b"") -> None:
        sock.settimeout(server.request_timeout)
        super().__init__(sock, address, server)
        self.rfile.close()  # replaced: every read goes through the request deadline
        self._input = _DeadlineInput(sock, server.request_timeout, first)
        self.rfile = io.BufferedReader(self._input)

    def read_requestline(self) -> str:
        # Each request (and the idle wait before it) gets request_timeout in all.
        self._input.deadline = time.monotonic() + self.server.request_timeout
        line = super().read_requestline()
        if line == "\r\n":
            # RFC 9112 2.2: one empty line before a request is ignored (some
            # clients end a POST body with an extra CRLF).
            line = super().read_requestline()
        return line

    def read_request(self, raw_requestline: str) -> bool:
        head = read_head(raw_requestline, self.rfile)
        self.requestline = raw_requestline.rstrip("\r\n")
        self.command, self.path, self.request_version = head.method, head.path, head.version
        self.headers = OldMessage()
        self.headers._headers = head.fields
        self.content_length = head.content_length
        self.close_connection = head.close
        return True

    def get_environ(self) -> dict[str, Any]:
        env = super().get_environ()
        # pywsgi's body reader, swapped for one with the strict chunk grammar
        # that can also tell whether the body was read to its end.
        plain = self.wsgi_input
        self.wsgi_input = env["wsgi.input"] = RequestBody(
            self.rfile, plain.content_length, plain.socket, plain.chunked_input)
        return env

    def _connection_upgrade_requested(self) -> bool:
        return False  # no upgrades: the body is always framed by its own length

    def handle_one_request(self):
        result = super().handle_one_request()
        if isinstance(result, tuple):
            # An error response: sent here, where a client already gone is no
            # traceback, and then the connection closes.
            try:
                self.socket.sendall(result[1])
            except OSError:
                pass
            return None
        return result

    def handle_one_response(self) -> None:
        super().handle_one_response()
        if not self.wsgi_input.complete():
            # The body was cut short, malformed or left unread (the request
            # timeout ran out while discarding it): where the next request
            # would begin is unknown, so there is none.
            self.close_connection = True

    def start_response(self, status, headers, exc_info=None):
        write = super().start_response(status, headers, exc_info)
        if self.wsgi_input.broken:
            self.close_connection = True  # see handle_one_response
        if self.close_connection and self.request_version != "HTTP/1.0" and not any(
                name.lower() == "connection" for name, _ in headers):
            self.response_headers.append((b"Connection", b"close"))
        return write

    def _handle_client_error(self, ex: Exception):
        # A client's mistake: answer briefly, log nothing, never a traceback.
        self.close_connection = True
        if isinstance(ex, TimeoutError):
            return None  # slowloris: just close, it gets no more of our time
        status, message = (ex.status, ex.message) if isinstance(ex, RequestError) else (
            400, "malformed HTTP request")
        COUNTS.rejected[str(status)] += 1
        return (str(status), _response(f"{status} {_REASONS[status]}", {"error": message}))

    def _write_with_headers(self, data: bytes) -> None:
        # One send for status line, headers and body instead of two.
        parts: list[bytes] = []
        self._sendall = parts.append
        try:
            super()._write_with_headers(data)
        finally:
            del self._sendall
        WSGIHandler._sendall(self, b"".join(parts))

    def log_request(self) -> None:
        pass  # no access log: pywsgi would format a line per request only to drop it

    def log_error(self, msg, *args) -> None:
        pass  # client errors are the client's business; server faults go to the hub

    def run_application(self) -> None:
        result = self.application(self.environ, self.start_response)
        poll = self.environ.get(POLL_KEY)
        if poll is not None:  # a long poll: cometd.longpoll answers it
            self.poll = take_poll(self, poll)
            return
        target = self.environ.get(STREAM_KEY)
        if target is None:
            self.result = result
            try:
                self.process_result()
            finally:
                self.result = None
            return
        user, kind, path, expires, since = target
        if kind == WEBSOCKET:
            self.stream = upgrade(self, user, kind, path, expires, since,
                                  _host(self.client_address))
            self.socket = None if self.stream else self.socket
            self.close_connection = True
            return
        cors = self.server.cors
        lines = "" if cors is None else cors.stream_lines(self.environ.get("HTTP_ORIGIN"))
        if self.command == "HEAD":
            if since is None:
                head = stream_head(user, kind, path, lines, retry=self.server.retry,
                                   last=self.server.table.newest)
            else:
                head = resumed_head(user, kind, path, since, self.server.replay(user, since),
                                    self.server.retry, lines)
            # The stream's status line and headers, no content (RFC 9110 9.3.2),
            # and no stream: a raw one's head says the connection closes.
            self.socket.sendall(head[:head.index(b"\r\n\r\n") + 4])
            self.close_connection = self.close_connection or kind in (RAW, SSE_RAW)
            return
        address = _host(self.client_address)
        refused = self.server.admission.admit(user, address)
        if refused is not None:
            self.socket.sendall(with_lines(refused, lines) if lines else refused)
            self.close_connection = True
            return
        if since is None:
            self.socket.sendall(stream_head(user, kind, path, lines, retry=self.server.retry,
                                            last=self.server.table.newest))
        # else a resume: CometServer.handle writes head and replay (see above).
        self.stream = (self.socket, user, kind, expires, address, path, since, lines)
        self.socket = None  # pywsgi must not close it: the table owns it now
        self.close_connection = True


def _host(address: Any) -> str:
    """The client's IP address from a peer address (an AF_UNIX peer's is the socket path)."""
    return address[0] if isinstance(address, tuple) else str(address)


class CometServer(WSGIServer):
    """``WSGIServer`` whose stream requests end up in a connection table.

    With a *cors* policy, the app's responses and every stream's head carry
    its headers (see :mod:`cometd.cors`). With a *publisher* (the app's
    backend), publishes take the fast path of :mod:`cometd.publish`.
    """

    handler_class = CometHandler

    def __init__(self, listener, application, table: ConnectionTable,
                 request_timeout: float = 10.0, auth: Authenticator | None = None,
                 limits: HttpConfig | None = None,
                 replay: Callable[[str, str], Replay] | None = None,
                 retry: tuple[int, int] = DEFAULT_RETRY_MS, cors: CorsPolicy | None = None,
                 publisher: Publisher | None = None, **kwargs: Any) -> None:
        super().__init__(listener, application if cors is None else cors.wrap(application),
                         **kwargs)
        self.table = table
        self.request_timeout = request_timeout
        #: who may open a stream; the app's authenticator, so both ways agree
        self.auth = auth or Authenticator(AuthConfig())
        #: (user, since) -> what a resuming stream of user gets; None: no history here
        self._replay = replay
        #: the SSE ``retry:`` range, milliseconds
        self.retry = retry
        #: which origins' pages may read the answers (None: no CORS headers)
        self.cors = cors
        #: where the fast path publishes (None: publishes go through bottle too)
        self.publisher = publisher
        # The kernel holds a connection until its request begins to arrive, so
        # the accept callback can usually answer a stream at once
        # (cometd.streamhttp), and a client that says nothing costs no
        # descriptor. A short deferral is no good: a loaded client that is a
        # second late gets accepted without its request and takes the slow path.
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT,
                               max(1, math.ceil(request_timeout)))
        self.loop_hub = gevent.get_hub()
        # New streams past max_connections get 503 (cometd.limits), and it is
        # at most the open-file limit less 200: the rest is headroom for
        # requests in progress, the store, Redis and the refusals themselves.
        limits = limits or HttpConfig()
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        ceiling = max(soft - 200, 16)
        self.max_connections = min(limits.max_connections or ceiling, ceiling)
        self.admission = Admission(table, self.max_connections, limits.max_streams_per_user,
                                   limits.max_streams_per_address,
                                   limits.stream_rate_per_address)
        self._guard = None
        self._pause = None
        self._handed = 0

    def _out_of_descriptors(self) -> None:
        # Should the headroom run out anyway, pause accepting rather than spin
        # on EMFILE; pending clients wait in the listen queue meanwhile.
        self.stop_accepting()
        gevent.sleep(0.5)
        self._guard = None
        if not self.closed:
            self.start_accepting()

    def _do_read(self) -> None:
        before, handed = COUNTS.accepts, self._handed
        super()._do_read()
        watcher = self._watcher
        if (watcher is None or self._timer is not None or self.closed
                or COUNTS.accepts - before >= self.max_accept or self._handed != handed):
            # stopped, backing off after an error, more waiting, or a request
            # other than a stream came (a send on a fresh connection must not
            # wait: a fan-out test saw its small sends held up)
            return
        watcher.stop()
        self._pause = self.loop.timer(ACCEPT_PAUSE)
        self._pause.start(self._resume_accepting, watcher)

    def do_handle(self, *args) -> None:
        self._handed += 1  # a connection for pywsgi (or the fast publish path)
        super().do_handle(*args)

    def _resume_accepting(self, watcher) -> None:
        self._pause.close()
        self._pause = None
        if watcher is self._watcher:  # not stopped (or restarted) meanwhile
            watcher.start(self._do_read)

    def do_read(self):
        """Answer plain stream requests here; return the first other connection.

        gevent's loop calls this until it returns None, and hands whatever
        else it returns to :meth:`handle` in a new greenlet.
        """
        listening = self.socket
        cors = self.cors
        for _ in range(self.max_accept):
            if self._guard is not None:
                return None  # full: stopped accepting while in this loop
            try:
                fd, address = listening._accept()
            except BlockingIOError:
                return None
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE) or self._guard is not None:
                    raise
                self._guard = gevent.spawn(self._out_of_descriptors)
                return None
            COUNTS.accepts += 1
            sock = _socket.socket(listening.family, _socket.SOCK_STREAM, 0, fd)
            try:
                first = sock.recv(FIRST_READ_BYTES, _socket.MSG_DONTWAIT)
            except BlockingIOError:
                first = b""  # TCP_DEFER_ACCEPT gave up waiting: pywsgi waits with a deadline
            except OSError:
                sock.close()
                continue
            else:
                if not first:
                    sock.close()  # closed before it asked anything
                    continue
            stream = parse_stream_request(first)
            if stream is None:
                if first.startswith(b"GET /poll/") and accept_poll(self, sock, address, first):
                    continue  # a plain long poll: cometd.longpoll took it
                if self.publisher is not None and first.startswith(FAST_PREFIXES):
                    return sock, address, _Unshown(first)  # serve_publisher takes it raw
                return gsocket.socket(listening.family, _socket.SOCK_STREAM, 0,
                                      sock.detach()), address, _Unshown(first)
            user, kind, path, since = stream
            expires = None
            if self.auth.enabled:
                identity = None
                credentials = stream_credentials(first)
                if credentials is not None:
                    try:
                        identity = self.auth.stream(user, *credentials)
                    except AuthError:
                        pass
                if identity is None:  # refused: pywsgi and bottle say why
                    return gsocket.socket(listening.family, _socket.SOCK_STREAM, 0,
                                          sock.detach()), address, _Unshown(first)
                expires = identity.expires
            lines = "" if cors is None else cors.stream_lines_for(first)
            host = address[0]
            refused = self.admission.admit(user, host)
            if refused is not None:
                if lines:
                    refused = with_lines(refused, lines)
                try:
                    sock.send(refused, _socket.MSG_DONTWAIT)
                except OSError:
                    pass
                sock.close()
                continue
            if since is not None:
                # A resume. The replay may wait for the router (on an edge),
                # so it is read in a greenlet of its own, and the stream holds
                # what is routed to it meanwhile (see the module docstring).
                conn = self._adopt(sock, user, kind, expires, host)
                conn.hold()
                gevent.spawn_raw(self.resume, conn, user, kind, path, since, lines)
                continue
            head = stream_head(user, kind, path, lines, retry=self.retry, last=self.table.newest)
            try:
                sent = sock.send(head, _socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:
                sock.close()
                continue
            conn = self._adopt(sock, user, kind, expires, host)
            if sent < len(head):
                conn.deliver(head[sent:])
        return None

    def handle(self, sock, address, first: bytes = b"") -> None:
        if self.publisher is not None and first.startswith(FAST_PREFIXES):
            # A raw socket from do_read, or a gevent one from a kept poll's connection.
            raw = sock if type(sock) is _socket.socket else _socket.socket(fileno=sock.detach())
            first = serve_publisher(self, raw, first)
            if first is None:
                raw.close()
                return
            sock = gsocket.socket(fileno=raw.detach())
        handler = self.handler_class(sock, address, self, first)
        handler.handle()
        stream, poll = handler.stream, handler.poll
        del handler
        if poll is not None:
            open_poll(self, *poll)
            return
        if stream is None:
            return
        gsock, user, kind, expires, address, path, since, lines = stream
        try:
            raw = _socket.socket(fileno=gsock.detach())
        except OSError:
            return
        conn = self._adopt(raw, user, kind, expires, address)
        if since is not None:
            conn.hold()
            self.resume(conn, user, kind, path, since, lines)

    def resume(self, conn, user: str, kind: int, path: str, since: str, lines: str) -> None:
        """Read the replay of a resuming stream, already adopted and held, and write it.

        The stream holds what is routed to it from before the replay is
        read until it is written (see the module docstring). Both ways in
        (the accept callback's and pywsgi's) end here. A replay that fails
        closes the stream, so its client reconnects rather than waits on a
        stream held for good.
        """
        try:
            replay = self.replay(user, since)
        except Exception as exc:  # noqa: BLE001 - said in the log; the client retries
            conn.close("error")
            log.event("resume_failed", f"a resume's replay failed ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); the stream was closed", logging.ERROR)
            return
        # Counted here, so a single server's and an edge's resumes alike.
        if replay.recovered:
            COUNTS.replays_recovered += 1
        else:
            COUNTS.replays_not_recovered += 1
        if not conn.closed:
            conn.release(resumed_frames(path, since, replay) if kind == WEBSOCKET else
                         resumed_head(user, kind, path, since, replay, self.retry, lines),
                         replay.head)

    def replay(self, user: str, since: str) -> Replay:
        """What a stream of *user* resuming after *since* is sent first."""
        if self._replay is None:
            return Replay([], False, "no history is kept here", 0)
        try:
            return self._replay(user, since)
        except BackendUnavailable as exc:
            return Replay([], False, str(exc), 0)

    def _adopt(self, sock: _socket.socket, user: str, kind: int, expires: float | None,
               address: str):
        conn = self.table.adopt(sock, user, kind, expires, address)
        if self.table.mode == "greenlet":
            # A fresh greenlet, not the handler's: the request's deep call
            # stack touched pages of that greenlet's frame stack that would
            # stay resident for the connection's whole life.
            writer = greenlet(conn.run, parent=self.loop_hub)
            self.loop_hub.loop.run_callback(writer.switch)
        return conn


class LocalBackend:
    """The single-process backend: router, store and table in this process."""

    def __init__(self, store: SubscriptionStore, router: Router, table: ConnectionTable,
                 replay_max: int = 1000) -> None:
        self.store = store
        self.router = router
        self.table = table
        #: most messages one resuming stream is sent
        self.replay_max = replay_max
        self._process = psutil.Process()
        # The router's own: a publish on the fast path costs no call of ours around them.
        self.send: Callable[[str, bytes], Sent] = router.send
        self.send_batch: Callable[[list[tuple[str, bytes]]], list[Sent]] = router.send_batch

    def _blocking(self, fn, *args):
        # Synced LevelDB writes wait for the disk; let the hub run meanwhile.
        return gevent.get_hub().threadpool.apply(fn, args)

    def replay(self, user: str, since: str) -> Replay:
        """What *user* missed after message id *since*: its own and its subscriptions' messages."""
        subjects = [user, *self.store.get_subscriptions(user)]
        return self.router.history.replay(subjects, since, self.replay_max)

    def ready(self) -> list[str]:
        """What keeps this server from serving (empty: ready)."""
        return [] if self.store.is_open else ["store: closed"]

    def metrics(self) -> bytes:
        return exposition()

    def subscribers(self, user: str) -> list[str]:
        return self.store.get_subscribers(user)

    def subscriptions(self, user: str) -> list[str]:
        return self.store.get_subscriptions(user)

    def add(self, pairs: list[tuple[str, str]]) -> int:
        return self._blocking(self.store.add_subscriptions, pairs)

    def remove(self, pairs: list[tuple[str, str]]) -> int:
        return self._blocking(self.store.remove_subscriptions, pairs)

    def online(self, user: str) -> int:
        return self.table.online(user)

    def kick(self, users: list[str]) -> int:
        """End every stream of each of *users*; how many there were in all."""
        return self.table.kick_many(users)

    def who(self, limit: int) -> tuple[list[str], int]:
        """Up to *limit* online ids, unsorted, and how many are online."""
        return list(islice(self.table.users, limit)), len(self.table.users)

    def load(self, path: str, directed: bool = False) -> int:
        from cometd.loader import load_friends  # numpy: ~70 ms no start needs

        return self._blocking(load_friends, self.store, path, directed).stored

    def stats(self) -> dict[str, Any]:
        return {
            "connections": self.table.connections,
            "users_online": self.table.users_online,
            "messages_sent": self.router.messages_sent,
            "deliveries": self.table.deliveries,
            "slow_consumers_dropped": self.table.slow_consumers_dropped,
            **self.router.history.stats,
            "rejected": dict(getattr(self.table, "rejected", {})),
            "rss_bytes": self._process.memory_info().rss,
            "mode": getattr(self.table, "mode", "router"),
        }
