"""The HTTP/1.1 request grammar every request is held to (RFC 9112, RFC 9110).

:class:`cometd.server.CometHandler` reads each request's head with
:func:`read_head` and its chunked body through :class:`RequestBody`, instead
of pywsgi's lenient parsing; :mod:`cometd.streamhttp` uses the same token and
field grammar, so the accept callback never takes a request pywsgi would
refuse.

Theory of operation
-------------------
Request smuggling needs two parsers -- a proxy in front and this server, or
this server and itself on the next request of a connection -- that disagree
on where a request ends. So where RFC 9112 allows several readings, the
server takes none: a request whose end is not certain gets an error and the
connection is closed, and nothing after it is ever read as a request.

- The body's length is a single ``Content-Length`` of decimal digits, or a
  ``Transfer-Encoding`` whose only coding is ``chunked``. Duplicate
  ``Content-Length`` fields, lists (even ``3, 3``, which RFC 9110 lets a
  server accept) and anything but digits get 400. A final coding other than
  ``chunked`` gets 400, other codings before it 501 (none is implemented);
  ``Transfer-Encoding`` in an HTTP/1.0 request gets 400.
- ``Transfer-Encoding`` with ``Content-Length``: the body is read chunked and
  ``Content-Length`` ignored, and the connection is closed after the response
  (RFC 9112 section 6.3), since a proxy may have read it the other way.
- Lines end with CRLF; a bare LF is not a line end (400). Obsolete line
  folding, whitespace before a field's colon, a field name that is not a
  token, and control characters (but tab) in a field value get 400.
- A chunk-size line is hex digits and well-formed extensions (which are
  ignored) and CRLF; anything else in it is a 400 (raised while the app
  reads the body). Trailer lines follow the header grammar.
- An HTTP/1.1 request has exactly one ``Host`` (RFC 9112 section 3.2); every
  client this project knows sends it.
- Methods are case-sensitive: a token that is not a method this server knows
  gets 501, which bottle's 405 is kept for a known method on a route
  without it.
- The target is origin-form (``/path?query``), absolute-form
  (``http://host/path``, whose path is routed, RFC 9112 section 3.2.2), or
  ``*`` for ``OPTIONS``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import BinaryIO

from gevent.pywsgi import Input, _InvalidClientInput

__all__ = [
    "MAX_HEADER_BYTES", "METHODS", "TCHAR", "FIELD_VALUE", "RequestError", "HeadersTooLarge",
    "RequestHead", "read_head", "RequestBody",
]

MAX_HEADER_BYTES = 64 * 1024
#: RFC 9110 section 9 and PATCH (RFC 5789); any other token gets 501
METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"))
#: a character class of RFC 9110 token characters (usable in str and bytes patterns)
TCHAR = r"[!#$%&'*+.^_`|~0-9A-Za-z-]"
#: a character class of what a field value may hold: visible characters, space, tab, obs-text
FIELD_VALUE = r"[\t -~\x80-\xff]"

_REQUEST_LINE = re.compile(rf"({TCHAR}+) ([!-~]+) HTTP/(\d)\.(\d)\r\n\Z")
_ABSOLUTE = re.compile(r"https?://[^/?#@]+", re.IGNORECASE)
_FIELD = re.compile(rf"({TCHAR}+):[ \t]*({FIELD_VALUE}*?)[ \t]*\Z")
_DIGITS = re.compile(r"[0-9]{1,18}\Z")
_QUOTED = r'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rf"([0-9A-Fa-f]{{1,16}})(?:[ \t]*;[ \t]*{TCHAR}+(?:[ \t]*=[ \t]*(?:{TCHAR}+|{_QUOTED}))?)*"
    r"\r\n\Z".encode())
_MAX_CHUNK_LINE = 8192


class RequestError(ValueError):
    """A request this server will not read on from: answer *status* and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HeadersTooLarge(RequestError):
    """The request's header block is over :data:`MAX_HEADER_BYTES`."""

    def __init__(self) -> None:
        super().__init__(431, "request headers over 64 KiB")


@dataclass
class RequestHead:
    """A request line and header block that passed, and how its body is framed."""

    method: str
    #: the origin-form target, ``/path?query`` (absolute-form reduced to it)
    path: str
    #: ``HTTP/1.0`` or ``HTTP/1.1`` (a later HTTP/1.x is read as 1.1)
    version: str
    #: (name, value) in order; a Content-Length overridden by chunked is left out
    fields: list[tuple[str, str]]
    content_length: int | None
    chunked: bool
    #: close the connection after the response
    close: bool


def _request_line(line: str) -> tuple[str, str, str]:
    match = _REQUEST_LINE.match(line)
    if match is None:
        if line.endswith("\n") and not line.endswith("\r\n"):
            raise RequestError(400, "request line not ended by CRLF")
        raise RequestError(400, "malformed request line")
    method, target, major, minor = match.groups()
    if major != "1":
        raise RequestError(400, "unsupported HTTP version")
    if method not in METHODS:
        raise RequestError(501, "method not implemented")
    if not target.startswith("/"):
        absolute = _ABSOLUTE.match(target)
        if absolute is not None:
            rest = target[absolute.end():]
            target = rest if rest.startswith("/") else "/" + rest
        elif not (target == "*" and method == "OPTIONS"):
            raise RequestError(400, "malformed request target")
    return method, target, "HTTP/1.0" if minor == "0" else "HTTP/1.1"


def _fields(fp: BinaryIO, limit: int = MAX_HEADER_BYTES) -> list[tuple[str, str]]:
    """Field lines up to the empty line (headers, or a chunked body's trailers)."""
    fields: list[tuple[str, str]] = []
    total = 0
    while True:
        line = fp.readline(limit + 1)
        total += len(line)
        if total > limit:
            raise HeadersTooLarge()
        if line == b"\r\n":
            return fields
        if not line.endswith(b"\r\n"):
            if not line.endswith(b"\n"):
                raise RequestError(400, "request ended inside its header block")
            raise RequestError(400, "header line not ended by CRLF")
        text = line[:-2].decode("latin-1")
        if text[:1] in (" ", "\t"):
            raise RequestError(400, "obsolete line folding in a header")
        match = _FIELD.match(text)
        if match is None:
            raise RequestError(400, "malformed header line")
        fields.append((match[1], match[2]))


def _tokens(fields: list[tuple[str, str]], name: str) -> list[str]:
    return [item.strip().lower() for n, v in fields if n.lower() == name for item in v.split(",")]


def _framing(version: str, fields: list[tuple[str, str]]) -> tuple[int | None, bool, bool]:
    """(content_length, chunked, close_after) of a request's body."""
    lengths = [v for n, v in fields if n.lower() == "content-length"]
    codings = _tokens(fields, "transfer-encoding")
    if codings:
        if version == "HTTP/1.0":
            raise RequestError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if codings[-1] != "chunked" or "" in codings:
            raise RequestError(400, "Transfer-Encoding does not end in chunked")
        if len(codings) > 1:
            if "chunked" in codings[:-1]:
                raise RequestError(400, "chunked applied more than once")
            raise RequestError(501, "transfer coding not implemented")
        return None, True, bool(lengths)
    if not lengths:
        return None, False, False
    if len(lengths) > 1 or not _DIGITS.match(lengths[0]):
        raise RequestError(400, "Content-Length is not one decimal number")
    return int(lengths[0]), False, False


def read_head(request_line: str, fp: BinaryIO) -> RequestHead:
    """Parse *request_line* (with its CRLF) and read the header block from *fp*.

    Raises :class:`RequestError` for anything outside the grammar above.
    """
    method, path, version = _request_line(request_line)
    fields = _fields(fp)
    hosts = sum(1 for n, _ in fields if n.lower() == "host")
    if hosts > 1 or (hosts == 0 and version == "HTTP/1.1"):
        raise RequestError(400, "an HTTP/1.1 request needs exactly one Host header")
    content_length, chunked, close = _framing(version, fields)
    if close:  # chunked overrides Content-Length, which must not reach the app
        fields = [(n, v) for n, v in fields if n.lower() != "content-length"]
    options = _tokens(fields, "connection")
    if version == "HTTP/1.0":
        close = close or "keep-alive" not in options
    else:
        close = close or "close" in options
    return RequestHead(method, path, version, fields, content_length, chunked, close)


class RequestBody(Input):
    """pywsgi's request body reader, with the strict chunk grammar above.

    pywsgi's chunk-size reader takes anything (a bare LF too) after a ``;``
    up to a CR, and trailer values likewise; this one overrides that reader
    (a private pywsgi method, which ``tests/test_server.py`` pins through
    the server).
    """

    __slots__ = ("broken",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        #: a read failed (malformed chunks, a client gone or too slow)
        self.broken = False

    def read(self, length: int | None = None) -> bytes:
        try:
            return super().read(length)
        except OSError:
            self.broken = True
            raise

    def readline(self, size: int | None = None) -> bytes:
        try:
            return super().readline(size)
        except OSError:
            self.broken = True
            raise

    def _Input__read_chunk_length(self, rfile: BinaryIO) -> int:  # noqa: N802 - pywsgi's name
        line = rfile.readline(_MAX_CHUNK_LINE + 1)
        match = _CHUNK_LINE.match(line)
        if match is None:
            self._chunked_input_error = True
            raise _InvalidClientInput("malformed chunk-size line")
        size = int(match[1], 16)
        if size == 0:
            try:
                _fields(rfile)  # trailers: read and dropped
            except RequestError as exc:
                self._chunked_input_error = True
                raise _InvalidClientInput(exc.message) from None
        return size

    def complete(self) -> bool:
        """The whole body has been read, and cleanly: the next request begins here."""
        if self.broken:
            return False
        if self.chunked_input:
            return self.chunk_length == 0 and not self._chunked_input_error
        return self.position >= (self.content_length or 0)
