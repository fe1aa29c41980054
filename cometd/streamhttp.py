"""The HTTP of a stream: recognising a stream request, and the bytes that open one.

A stream is ``GET /test/<id>`` (chunked text) or ``GET /events/<id>``
(Server-Sent Events); over HTTP/1.0 either is sent raw until the connection
closes. Both ways into a stream write the same opening bytes,
:func:`stream_head`: the status line, the headers and the welcome.

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

With authentication on, the server also takes the request's token from
:func:`stream_credentials` and opens the stream only for a token that
:class:`cometd.auth.Authenticator` accepts; a refusal goes to pywsgi and
bottle like anything else, which answer it (401 or 403), so both ways give
one answer.
"""

from __future__ import annotations

import re
import time
from email.utils import formatdate

from cometd.connections import CHUNKED, RAW, SSE_CHUNKED, SSE_RAW, frame_bytes
from cometd.httprequest import FIELD_VALUE, TCHAR
from cometd.ids import ID_PATTERN

__all__ = ["FIRST_READ_BYTES", "parse_stream_request", "stream_credentials", "stream_head",
           "stream_kind"]

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
