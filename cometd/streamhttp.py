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

A message goes to many streams, so :meth:`Message.frame` builds its bytes
once per kind and hands the same object to every stream of that kind; it is
on the path of every delivery.

With authentication on, the server also takes the request's token from
:func:`stream_credentials` and opens the stream only for a token that
:class:`cometd.auth.Authenticator` accepts; a refusal goes to pywsgi and
bottle like anything else, which answer it (401 or 403), so both ways give
one answer.
"""

from __future__ import annotations

import json
import re
import time
from email.utils import formatdate
from itertools import count

from cometd.httprequest import FIELD_VALUE, TCHAR
from cometd.ids import ID_PATTERN

__all__ = [
    "CHUNKED", "RAW", "SSE_CHUNKED", "SSE_RAW", "KEEPALIVE", "LAST_CHUNK", "EXPIRED_EVENT",
    "FIRST_READ_BYTES", "parse_stream_request", "stream_credentials", "stream_head",
    "stream_kind", "frame_bytes", "sse_event", "Message",
]

#: stream kinds: plain message bodies or SSE events, with or without chunk framing
CHUNKED, RAW, SSE_CHUNKED, SSE_RAW = range(4)
#: the SSE comment sent to keep idle event streams (and proxies) open
KEEPALIVE = b": keepalive\n\n"
#: the zero-length chunk that ends a chunked response (with no trailers)
LAST_CHUNK = b"0\r\n\r\n"
#: what an SSE stream gets when its token expires, before it ends
EXPIRED_EVENT = b"event: expired\ndata: token expired\n\n"

#: what the accept callback reads at once; a longer request goes to pywsgi
FIRST_READ_BYTES = 8192

_STREAM_REQUEST = re.compile(
    rb"GET (/(test|events)/(" + ID_PATTERN.encode() + rb"))(?:\?[!-~]*)? HTTP/1\.([01])\r"
    rb"(\n(?:" + TCHAR.encode() + rb"+:" + FIELD_VALUE.encode() + rb"*\r\n)*)\r\n"
)

_CONTENT_TYPE = {
    False: "Content-Type: text/html; charset=utf-8\r\n",
    True: "Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n",
}
_date = (0, "")


def stream_kind(sse: bool, http10: bool) -> int:
    """The connection kind of a stream: SSE or not, raw (HTTP/1.0) or chunked."""
    if sse:
        return SSE_RAW if http10 else SSE_CHUNKED
    return RAW if http10 else CHUNKED


def parse_stream_request(data: bytes) -> tuple[str, int, str] | None:
    """``(user, kind, path)`` when *data* is a complete plain stream request, else None."""
    match = _STREAM_REQUEST.match(data)
    if match is None:
        return None
    path, route, user, minor, fields = match.groups()
    # pywsgi judges a body, and a Host missing (HTTP/1.1) or doubled; *fields*
    # starts with the request line's LF, so every name follows one.
    fields = fields.lower()
    hosts = fields.count(b"\nhost:")
    if (hosts != 1 and (hosts or minor == b"1")) or b"\ncontent-length:" in fields or (
            b"\ntransfer-encoding:" in fields):
        return None
    return user.decode(), stream_kind(route == b"events", minor == b"0"), path.decode()


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


def stream_head(user: str, kind: int, path: str, extra: str = "") -> bytes:
    """Status line, headers and welcome of a stream of *kind* for *user* at *path*.

    *extra* is more header lines, each ending in CRLF (the CORS headers).
    """
    sse = kind in (SSE_CHUNKED, SSE_RAW)
    if sse:
        welcome = f": Welcome, Url: '{path}' Id: {user}\n\n"
    else:
        welcome = f"Welcome, Url: '{path}' Id: {user}\n"
    chunked = kind in (CHUNKED, SSE_CHUNKED)
    framing = "Transfer-Encoding: chunked" if chunked else "Connection: close"
    head = (f"HTTP/1.1 200 OK\r\n{_CONTENT_TYPE[sse]}{framing}\r\nDate: {_http_date()}\r\n"
            f"{extra}\r\n")
    return head.encode() + frame_bytes(kind, welcome.encode())


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def frame_bytes(kind: int, payload: bytes) -> bytes:
    """*payload* as a stream of *kind* carries it: one chunk, or as is over HTTP/1.0."""
    return _chunk(payload) if kind in (CHUNKED, SSE_CHUNKED) else payload


def sse_event(seq: int, subject: str, body: bytes) -> bytes:
    """One SSE event: id *seq*, data the JSON of *subject* and *body*."""
    data = json.dumps({"from": subject, "body": body.decode("utf-8", "replace")})
    return b"id: %d\ndata: %s\n\n" % (seq, data.encode())


class Message:
    """One published message; its wire bytes are built once per stream kind."""

    __slots__ = ("seq", "subject", "body", "_frames")

    _seqs = count(1)

    def __init__(self, subject: str, body: bytes) -> None:
        #: process-wide sequence number, the SSE ``id:``
        self.seq = next(Message._seqs)
        self.subject = subject
        self.body = body
        self._frames: list[bytes | None] = [None, None, None, None]

    def frame(self, kind: int) -> bytes:
        frame = self._frames[kind]
        if frame is None:
            if kind == RAW:
                frame = self.body
            elif kind == CHUNKED:
                frame = _chunk(self.body)
            else:
                event = sse_event(self.seq, self.subject, self.body)
                frame = event if kind == SSE_RAW else _chunk(event)
            self._frames[kind] = frame
        return frame
