"""Publishing: what ``POST /send/<subject>`` and ``POST /publish`` do, and their fast path.

The semantics live here once -- :func:`answer_send` and :func:`answer_publish`
check the credential, the subject and the body, send through the backend and
say what to answer -- and both ways in call them: the bottle routes of
:mod:`cometd.webapp` and :func:`serve_publisher`, so the two cannot drift.

``POST /publish`` takes many messages in one body, one JSON object per line,
``{"from": "<subject>", "body": "<text>"}`` (blank lines are skipped), and
answers ``{"results": [{"delivered": N, "id": "<id>"}, ...]}`` in the same
order. Validation is all or nothing: one bad line, or one subject the
credential may not publish as, and nothing of the batch is sent.

Theory of operation: the fast path
----------------------------------
Through pywsgi and bottle a request costs 150-400 us before the router sees
it (a handler, a WSGI environ, a bottle request and response, the plugins),
several times what nchan spends on a whole publish. Publishers are few and
keep their connection, so :meth:`cometd.server.CometServer.handle` gives a
connection whose first bytes begin a publish to :func:`serve_publisher`,
which serves it in a loop, one request after another, on one buffer:

- The head is cut at its empty line and read by
  :func:`cometd.httprequest.read_head`, the same strict grammar as pywsgi's
  path, so the request-smuggling defences hold here too.
- The path takes only the plain case: an HTTP/1.1 ``POST`` to
  ``/send/<subject>`` (no escapes) or ``/publish`` whose body has a
  ``Content-Length``, no ``Expect``, no doubled credential or ``Origin``
  header. Anything else -- a malformed head, a chunked body, another route,
  a head longer than :data:`FAST_HEAD_BYTES` -- goes on to pywsgi and bottle
  with every byte read so far, and the connection stays there: this path
  never produces an error of the HTTP grammar itself.
- Each request, and the idle wait before it, gets ``request_timeout`` in
  all, as on pywsgi's path. A body left unread (a refusal before it was
  needed) is read and dropped after the answer, as pywsgi does, and a body
  cut short closes the connection, since where the next request would begin
  is not certain.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from bottle import HTTP_CODES  # the reason phrases bottle's answers carry
from gevent import socket as gsocket

from cometd.auth import Authenticator, AuthError
from cometd.config import MAX_MESSAGE_BYTES
from cometd.counts import COUNTS
from cometd.httprequest import RequestError, read_head
from cometd.ids import InvalidId, check_id
from cometd.log import Burst
from cometd.streamhttp import _http_date

__all__ = [
    "Answer", "BackendUnavailable", "BodyError", "Publisher", "MAX_BATCH_BYTES",
    "MAX_BATCH_MESSAGES", "FAST_PREFIXES", "FAST_HEAD_BYTES", "answer_send", "answer_publish",
    "parse_batch", "serve_publisher", "AUTH_FAILURES",
]

#: most bytes of one ``POST /publish`` body
MAX_BATCH_BYTES = 16 * 1024 * 1024
#: most messages in one batch
MAX_BATCH_MESSAGES = 10_000
#: what a request's first bytes begin with for the fast path to be tried
FAST_PREFIXES = (b"POST /send/", b"POST /publish")
#: a longer head (headers and all) goes to pywsgi, which bounds heads at 64 KiB
FAST_HEAD_BYTES = 8192

AUTH_FAILURES = Burst("auth_failures", "request(s) refused for no or a bad credential (401)")
_EMPTY = "empty message: the request body is the message"
_SEND_PATH = re.compile(r"/send/([^/?#%]+)(?:\?.*)?\Z")
_PUBLISH_PATH = re.compile(r"/publish(?:\?.*)?\Z")


class BackendUnavailable(RuntimeError):
    """The backend cannot answer now (a scaled-out router is unreachable): 503."""


class Publisher(Protocol):
    """The part of the web app's backend that publishing needs."""

    def send(self, subject: str, body: bytes) -> tuple[int, str]: ...
    def send_batch(self, messages: list[tuple[str, bytes]]) -> list[tuple[int, str]]: ...


class BodyError(Exception):
    """A request body that could not be read, or is too long: *status* and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Answer:
    """What to answer: a status, a JSON payload and any more headers."""

    status: int
    payload: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()


def _refused(status: int, message: str) -> Answer:
    COUNTS.rejected[str(status)] += 1
    return Answer(status, {"error": message})


def _auth_refused(exc: AuthError) -> Answer:
    COUNTS.rejected[str(exc.status)] += 1
    if exc.status == 401:
        AUTH_FAILURES.note()  # a count only: never the credential
    return Answer(exc.status, {"error": exc.description},
                  (("WWW-Authenticate", exc.www_authenticate),))


#: what a publish answers with an error instead of an id
_REFUSALS = (AuthError, BodyError, BackendUnavailable)


def _refusal(exc: Exception) -> Answer:
    if isinstance(exc, AuthError):
        return _auth_refused(exc)
    if isinstance(exc, BodyError):
        return _refused(exc.status, exc.message)
    return _refused(503, str(exc))  # BackendUnavailable


def answer_send(backend: Publisher, auth: Authenticator, authorization: str | None,
                api_key: str | None, subject: str, read_body: Callable[[int], bytes]) -> Answer:
    """``POST /send/<subject>``: publish the body that *read_body(limit)* returns.

    *read_body* raises :class:`BodyError`; it is called only once the caller
    may publish as *subject*.
    """
    try:
        verdict = auth.caller(authorization, api_key)
        try:
            subject = check_id(subject)
        except InvalidId as exc:
            return _refused(400, str(exc))
        auth.permit(verdict, subject)
        body = read_body(MAX_MESSAGE_BYTES)
        if not body:
            return _refused(400, _EMPTY)
        delivered, message_id = backend.send(subject, body)
    except _REFUSALS as exc:
        return _refusal(exc)
    return Answer(200, {"delivered": delivered, "id": message_id})


def parse_batch(body: bytes) -> list[tuple[str, bytes]]:
    """The ``(subject, body)`` of each line of a ``POST /publish`` body.

    Raises :class:`BodyError` (400) naming the first bad line.
    """
    messages: list[tuple[str, bytes]] = []
    for number, line in enumerate(body.split(b"\n"), 1):
        if not line.strip():
            continue
        if len(messages) == MAX_BATCH_MESSAGES:
            raise BodyError(400, f"more than {MAX_BATCH_MESSAGES} messages in one batch")
        try:
            item = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BodyError(400, f"line {number}: not JSON: {exc}") from None
        if not (isinstance(item, dict) and isinstance(item.get("from"), str)
                and isinstance(item.get("body"), str)):
            raise BodyError(400, f'line {number}: not an object with a "from" and a "body" '
                            "string")
        extra = sorted(set(item) - {"from", "body"})
        if extra:
            raise BodyError(400, f"line {number}: unknown field {extra[0]!r}")
        try:
            subject = check_id(item["from"])
        except InvalidId as exc:
            raise BodyError(400, f"line {number}: {exc}") from None
        try:
            message = item["body"].encode()
        except UnicodeEncodeError:
            raise BodyError(400, f"line {number}: body is not valid Unicode") from None
        if not message:
            raise BodyError(400, f"line {number}: {_EMPTY}")
        if len(message) > MAX_MESSAGE_BYTES:
            raise BodyError(400, f"line {number}: body over {MAX_MESSAGE_BYTES} bytes")
        messages.append((subject, message))
    if not messages:
        raise BodyError(400, "empty batch: one JSON object per line")
    return messages


def answer_publish(backend: Publisher, auth: Authenticator, authorization: str | None,
                   api_key: str | None, read_body: Callable[[int], bytes]) -> Answer:
    """``POST /publish``: validate every message of the batch, then send them in order."""
    try:
        verdict = auth.caller(authorization, api_key)
        messages = parse_batch(read_body(MAX_BATCH_BYTES))
        for subject, _ in messages:  # all or nothing
            auth.permit(verdict, subject)
        sent = backend.send_batch(messages)
    except _REFUSALS as exc:
        return _refusal(exc)
    return Answer(200, {"results": [{"delivered": d, "id": i} for d, i in sent]})


# -- the fast path ----------------------------------------------------------------

def _answer_bytes(answer: Answer, extra: list[tuple[str, str]], close: bool) -> bytes:
    """*answer* as pywsgi and bottle would write it."""
    body = json.dumps(answer.payload).encode()
    lines = [f"HTTP/1.1 {answer.status} {HTTP_CODES[answer.status]}\r\n"
             f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"]
    # Names as bottle writes the app's (title case), the CORS policy's as they are.
    lines.extend(f"{name.title()}: {value}\r\n" for name, value in answer.headers)
    lines.extend(f"{name}: {value}\r\n" for name, value in extra)
    lines.append(f"Date: {_http_date()}\r\n")
    if close:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1") + body


class _Connection:
    """One publisher's connection: a buffer and the deadline of the request under way."""

    __slots__ = ("sock", "buf", "deadline", "timeout")

    def __init__(self, sock: gsocket.socket, first: bytes, timeout: float) -> None:
        self.sock = sock
        self.buf = bytearray(first)
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout

    def fill(self) -> bool:
        """Read more into the buffer before the deadline; False: closed or out of time."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except OSError:  # socket.timeout included
            return False
        self.buf += data
        return bool(data)

    def skip(self, n: int) -> bool:
        """Drop the next *n* bytes, reading them as needed; False: they did not come."""
        while len(self.buf) < n:
            n -= len(self.buf)
            self.buf.clear()
            if not self.fill():
                return False
        del self.buf[:n]
        return True


def _fields_of(fields: list[tuple[str, str]]) -> dict[str, list[str]] | None:
    """The values of the headers the fast path reads; None for a request it leaves to pywsgi."""
    found: dict[str, list[str]] = {}
    for name, value in fields:
        lowered = name.lower()
        if lowered in ("authorization", "x-api-key", "origin", "expect"):
            found.setdefault(lowered, []).append(value)
    if "expect" in found or any(len(v) > 1 for v in found.values()):
        return None
    return found


def serve_publisher(server: Any, sock: gsocket.socket, first: bytes) -> bytes | None:
    """Serve publishes on *sock* while they come; the bytes to hand to pywsgi, or None.

    *first* is what the accept callback read; *server* is the
    :class:`cometd.server.CometServer` (its backend, authenticator, CORS
    policy and request timeout).
    """
    conn = _Connection(sock, first, server.request_timeout)
    backend, auth, cors = server.publisher, server.auth, server.cors
    buf = conn.buf
    while True:
        # Wait for a whole head that is a publish; anything else goes to pywsgi.
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(buf) > FAST_HEAD_BYTES or not (
                    buf.startswith(FAST_PREFIXES)
                    or any(p.startswith(bytes(buf)) for p in FAST_PREFIXES)):
                return bytes(buf)
            if not conn.fill():
                return None
        if not buf.startswith(FAST_PREFIXES) or end + 4 > FAST_HEAD_BYTES:
            return bytes(buf)
        line_end = buf.index(b"\r\n")
        block = io.BytesIO(bytes(buf[line_end + 2:end + 4]))
        try:
            head = read_head(buf[:line_end + 2].decode("latin-1"), block)
        except RequestError:
            return bytes(buf)  # pywsgi gives the same error
        if (block.tell() != end + 2 - line_end or head.version != "HTTP/1.1" or head.chunked
                or head.method != "POST"):
            return bytes(buf)
        fields = _fields_of(head.fields)
        if fields is None:
            return bytes(buf)
        send = _SEND_PATH.match(head.path)
        if send is None and _PUBLISH_PATH.match(head.path) is None:
            return bytes(buf)
        start = end + 4
        length = head.content_length or 0
        cut: list[bool] = []  # the body ended early: no next request

        def read_body(limit: int, start: int = start, length: int = length,
                      cut: list[bool] = cut) -> bytes:
            if length > limit:
                raise BodyError(413, f"request body over {limit} bytes")
            while len(buf) < start + length:
                if not conn.fill():
                    cut.append(True)
                    raise BodyError(400, "incomplete request body")
            return bytes(buf[start:start + length])

        authorization = fields.get("authorization", (None,))[0]
        api_key = fields.get("x-api-key", (None,))[0]
        if send is not None:
            answer = answer_send(backend, auth, authorization, api_key, send[1], read_body)
        else:
            answer = answer_publish(backend, auth, authorization, api_key, read_body)
        COUNTS.fast_publishes += 1
        close = head.close or bool(cut)
        extra = [] if cors is None else cors.headers(fields.get("origin", (None,))[0])
        try:
            sock.sendall(_answer_bytes(answer, extra, close))
        except OSError:
            return None
        if close or not conn.skip(start + length):
            return None
        conn.deadline = time.monotonic() + conn.timeout
        if not buf and not conn.fill():
            return None
        if buf.startswith(b"\r\n"):
            del buf[:2]  # RFC 9112 2.2: one empty line before a request is ignored
