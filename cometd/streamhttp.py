"""The HTTP of a stream, sans I/O: request bytes in, the stream's bytes out.

A stream is ``GET /test/<id>`` (chunked text) or ``GET /events/<id>``
(Server-Sent Events); over HTTP/1.0 either is sent raw until the connection
closes. This module holds the whole protocol and none of the sockets (h11's
shape): :func:`parse_stream_request` recognises a request and names its kind,
:func:`stream_head` is the status line, headers and welcome (the same bytes
whichever way a stream is opened), a :class:`Message` is framed for each
kind, and a chunked stream ends with :data:`LAST_CHUNK`.
:mod:`cometd.connections` writes these bytes; :mod:`cometd.server` reads the
request.

Theory of operation
-------------------
Streams are nearly all of a comet server's requests, and opening them is all
of its connection ramp. Through gevent's ``StreamServer``, pywsgi and bottle a
stream costs about 250 us of CPU (a greenlet, a handler, a WSGI environ, a
bottle request), and about 800 us when requests come one per loop iteration,
as they do for each of the fifty edges of a million-connection server.

So :class:`cometd.server.CometServer` answers plain stream requests in its
accept callback. Its listening socket has ``TCP_DEFER_ACCEPT``: the kernel
hands a connection over only once the client's first bytes are in, and a
stream request is one small segment, so it is normally complete when
``accept()`` returns. :func:`parse_stream_request` recognises a complete,
plain stream request -- ``GET``, HTTP/1.0 or 1.1, a valid id with no escapes,
well-formed header lines, the whole header block -- and the server sends
:func:`stream_head` and adopts the socket, with no greenlet and no parser
object. Anything else (other routes, a partial request, an invalid id,
``HEAD``, folded headers, an absolute-form target, a body's ``Content-Length``
or ``Transfer-Encoding``, a missing ``Host``) goes on to pywsgi and bottle
with the bytes already read, so this path never has to produce an error of its
own. Its header grammar is :mod:`cometd.httprequest`'s, so it never takes a
request that pywsgi would refuse.

A resuming request (a ``Last-Event-ID`` header, a ``since`` or
``last_event_id`` parameter) is taken too: resumes are rare, except that after
an edge dies or a deploy every client comes back with one at once. The parser
reads where it resumes from with :func:`resume_from`, as the web app does,
and the server opens it with :func:`resumed_head` once the replay is read (see
:meth:`cometd.server.CometServer.resume`). What it cannot read the way the
web app would (a ``Last-Event-ID`` given twice, which pywsgi joins) goes to
pywsgi. A WebSocket resume is an upgrade, and stays pywsgi's.

A message goes to many streams, so :meth:`Message.frame` builds its bytes
once per kind (a WebSocket's text frame too, see :mod:`cometd.websocket`)
and hands the same object to every stream of that kind; it is on the path of
every delivery.

With authentication on, the server also takes the request's token from
:func:`stream_credentials` and opens the stream only for a token that
:class:`cometd.auth.Authenticator` accepts; a refusal goes to pywsgi and
bottle like anything else, which answer it (401 or 403), so both ways give
one answer.
"""

from __future__ import annotations

import json
import random
import re
import time
from email.utils import formatdate
from urllib.parse import parse_qs

from cometd.history import Replay, format_id
from cometd.httprequest import FIELD_VALUE, TCHAR
from cometd.ids import ID_PATTERN
from cometd.websocket import message_frame

__all__ = [
    "CHUNKED", "RAW", "SSE_CHUNKED", "SSE_RAW", "POLL", "WEBSOCKET", "KEEPALIVE", "LAST_CHUNK",
    "EXPIRED_EVENT", "FIRST_READ_BYTES", "RECOVERED_HEADER", "parse_stream_request",
    "plain_fields", "resume_from", "resumed_head", "stream_credentials", "stream_head",
    "stream_kind", "frame_bytes", "sse_event", "poll_entry", "Message",
]

#: stream kinds: plain message bodies or SSE events, with or without chunk framing
CHUNKED, RAW, SSE_CHUNKED, SSE_RAW = range(4)
#: a waiting long poll (cometd.longpoll): its frame is one JSON entry of the answer
POLL = 4
#: a WebSocket (cometd.websocket): one text frame per message
WEBSOCKET = 5
#: the SSE comment sent to keep idle event streams (and proxies) open
KEEPALIVE = b": keepalive\n\n"
#: the zero-length chunk that ends a chunked response (with no trailers)
LAST_CHUNK = b"0\r\n\r\n"
#: what an SSE stream gets when its token expires, before it ends
EXPIRED_EVENT = b"event: expired\ndata: token expired\n\n"

#: what the accept callback reads at once; a longer request goes to pywsgi
FIRST_READ_BYTES = 8192

_STREAM_REQUEST = re.compile(
    rb"GET (/(test|events)/(" + ID_PATTERN.encode() + rb"))(?:\?([!-~]*))? HTTP/1\.([01])\r"
    rb"(\n(?:" + TCHAR.encode() + rb"+:" + FIELD_VALUE.encode() + rb"*\r\n)*)\r\n"
)

_CONTENT_TYPE = {
    False: "Content-Type: text/html; charset=utf-8\r\n",
    True: "Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n",
}
_date = (0, "")
#: the SSE reconnection delay range, milliseconds (--sse-retry-min/max)
DEFAULT_RETRY_MS = (1000, 5000)
#: the response header of a resumed stream: true when the replay is complete
RECOVERED_HEADER = "Cometd-Recovered"


def stream_kind(sse: bool, http10: bool) -> int:
    """The connection kind of a stream: SSE or not, raw (HTTP/1.0) or chunked."""
    if sse:
        return SSE_RAW if http10 else SSE_CHUNKED
    return RAW if http10 else CHUNKED


def resume_from(last_event_id: str | None, query: str, sse: bool) -> str | None:
    """The message id a stream request resumes after, or None for a fresh stream.

    SSE: the ``Last-Event-ID`` header (an empty one, as EventSource never
    sends, is none), else ``last_event_id``; chunked: ``since``. The web app
    and the accept callback both ask this, so a resume means one thing.
    """
    if sse and last_event_id:
        return last_event_id.strip()
    values = parse_qs(query, keep_blank_values=True).get("last_event_id" if sse else "since")
    return values[-1] if values else None


def parse_stream_request(data: bytes) -> tuple[str, int, str, str | None] | None:
    """``(user, kind, path, since)`` when *data* is a complete stream request the
    accept callback takes, else None; *since*: where it resumes (None: fresh).
    """
    match = _STREAM_REQUEST.match(data)
    if match is None:
        return None
    path, route, user, query, minor, fields = match.groups()
    # *fields* starts with the request line's LF, so every name follows one.
    lowered = fields.lower()
    if not plain_fields(lowered, minor == b"0"):
        return None
    sse = route == b"events"
    since = None
    at = lowered.find(b"\nlast-event-id:") if sse else -1
    # The substring tests first: parse_qs costs a few us on a query with a
    # token. An escape may spell a parameter's name, as parse_qs reads it.
    if at >= 0 or (query and (b"since=" in query or b"last_event_id=" in query
                              or b"%" in query)):
        header = None
        if at >= 0:
            if lowered.find(b"\nlast-event-id:", at + 1) >= 0:
                return None  # pywsgi joins the two: the web app reads that
            start = at + 15
            header = fields[start:fields.index(b"\r", start)].strip(b" \t").decode("latin-1")
        since = resume_from(header, (query or b"").decode("latin-1"), sse)
    return user.decode(), stream_kind(sse, minor == b"0"), path.decode(), since


def plain_fields(fields: bytes, http10: bool) -> bool:
    """Whether a GET's lower-cased header block (from the request line's LF) is the
    accept callback's to take: one Host (or none over HTTP/1.0), no body.

    Otherwise pywsgi judges it (a Host missing or doubled, a body).
    """
    hosts = fields.count(b"\nhost:")
    return not ((hosts != 1 and (hosts or not http10)) or b"\ncontent-length:" in fields
                or b"\ntransfer-encoding:" in fields)


def stream_credentials(data: bytes) -> tuple[str | None, str, str | None] | None:
    """``(authorization, query, cookie)`` of a request :func:`parse_stream_request` took,
    in the order :meth:`cometd.auth.Authenticator.stream` takes them.

    None when either header appears twice: pywsgi and bottle decide those.
    """
    line_end = data.index(b"\r\n")
    target = data[4:data.rindex(b" ", 0, line_end)]
    query = target.partition(b"?")[2].decode("latin-1")
    fields = data[line_end:data.index(b"\r\n\r\n") + 2]
    lowered = fields.lower()
    values: list[str | None] = []
    for name in (b"\nauthorization:", b"\ncookie:"):
        at = lowered.find(name)
        if at < 0:
            values.append(None)
            continue
        if lowered.find(name, at + 1) >= 0:
            return None
        start = at + len(name)
        values.append(fields[start:fields.index(b"\r", start)].strip(b" \t").decode("latin-1"))
    return values[0], query, values[1]


def _http_date() -> str:
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True))
    return _date[1]


def stream_head(user: str, kind: int, path: str, headers: str = "",
                retry: tuple[int, int] = DEFAULT_RETRY_MS, last: int = 0) -> bytes:
    """Status line, headers and welcome of a stream of *kind* for *user* at *path*.

    *headers* are more header lines, each ending in CRLF. An SSE welcome
    carries a ``retry:`` drawn from *retry* (milliseconds, low and high) for
    each stream, so that clients cut off together do not all come back in
    the same second, and, with *last* (a message key), an ``id:``: a stream
    that ends before its first message still has an id to resume from.
    """
    sse = kind in (SSE_CHUNKED, SSE_RAW)
    if sse:
        welcome = f": Welcome, Url: '{path}' Id: {user}\nretry: {random.randint(*retry)}\n"
        welcome += f"id: {format_id(last)}\n\n" if last else "\n"
    else:
        welcome = f"Welcome, Url: '{path}' Id: {user}\n"
    chunked = kind in (CHUNKED, SSE_CHUNKED)
    framing = "Transfer-Encoding: chunked" if chunked else "Connection: close"
    head = (f"HTTP/1.1 200 OK\r\n{_CONTENT_TYPE[sse]}{framing}\r\nDate: {_http_date()}\r\n"
            f"{headers}\r\n")
    return head.encode() + frame_bytes(kind, welcome.encode())


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def frame_bytes(kind: int, payload: bytes) -> bytes:
    """*payload* as a stream of *kind* carries it: one chunk, or as is over HTTP/1.0."""
    return _chunk(payload) if kind in (CHUNKED, SSE_CHUNKED) else payload


def sse_event(key: int, subject: str, body: bytes) -> bytes:
    """One SSE event: id the message id of *key*, data the JSON of *subject* and *body*."""
    data = json.dumps({"from": subject, "body": body.decode("utf-8", "replace")})
    return b"id: %s\ndata: %s\n\n" % (format_id(key).encode(), data.encode())


def poll_entry(key: int, subject: str, body: bytes) -> bytes:
    """One message of a long poll's answer: its JSON object and a comma (see cometd.longpoll)."""
    entry = json.dumps({"id": format_id(key), "from": subject,
                        "body": body.decode("utf-8", "replace")})
    return entry.encode() + b","


class Message:
    """One published message; its wire bytes are built once per stream kind."""

    __slots__ = ("key", "subject", "body", "frames")

    def __init__(self, subject: str, body: bytes, key: int = 0) -> None:
        #: the message id as an integer (see :mod:`cometd.history`), the SSE ``id:``
        self.key = key
        self.subject = subject
        self.body = body
        #: by kind: its bytes, or None until :meth:`frame` builds them
        self.frames: list[bytes | None] = [None] * 6

    def frame(self, kind: int) -> bytes:
        frame = self.frames[kind]
        if frame is None:
            if kind == RAW:
                frame = self.body
            elif kind == CHUNKED:
                frame = _chunk(self.body)
            elif kind == POLL:
                frame = poll_entry(self.key, self.subject, self.body)
            elif kind == WEBSOCKET:
                frame = message_frame(self.key, self.subject, self.body)
            else:
                event = sse_event(self.key, self.subject, self.body)
                frame = event if kind == SSE_RAW else _chunk(event)
            self.frames[kind] = frame
        return frame


def resumed_head(user: str, kind: int, path: str, since: str, replay: Replay,
                 retry: tuple[int, int] = DEFAULT_RETRY_MS, headers: str = "") -> bytes:
    """What a resumed stream starts with: its head, a gap event if due, the replay.

    The head says whether the replay is complete (``Cometd-Recovered``); an
    SSE stream that is not recovered also gets ``event: gap`` before the
    replay, naming the id asked for and why, so a page knows to reload.
    """
    recovered = "true" if replay.recovered else "false"
    # The welcome's id is the replay's head: a safe point to resume from
    # again, even when the id asked for was malformed or unknown.
    parts = [stream_head(user, kind, path, f"{RECOVERED_HEADER}: {recovered}\r\n{headers}",
                         retry, replay.head)]
    if not replay.recovered and kind in (SSE_CHUNKED, SSE_RAW):
        gap = json.dumps({"last_event_id": since[:100], "reason": replay.reason})
        parts.append(frame_bytes(kind, b"event: gap\ndata: %s\n\n" % gap.encode()))
    for key, subject, body in replay.messages:
        parts.append(Message(subject, body, key).frame(kind))
    return b"".join(parts)
