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
  path, so the request-smuggling defences hold here too; the common shape
  (a few headers, no ``Connection``) is read by a plain reading that takes
  only what read_head would read alike (:func:`_plain_request`).
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
- The connection is served on its raw socket, without gevent's socket
  layer (see :class:`_Publisher`); pipelined requests are answered in
  order, in one write.
"""

from __future__ import annotations

import _socket
import io
import json
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol

from bottle import HTTP_CODES  # the reason phrases bottle's answers carry
from gevent import get_hub
from greenlet import getcurrent

from cometd.auth import Authenticator, AuthError
from cometd.config import MAX_MESSAGE_BYTES
from cometd.counts import COUNTS
from cometd.httprequest import FIELD_VALUE, TCHAR, RequestError, read_head
from cometd.ids import ID_PATTERN, InvalidId, check_id
from cometd.log import Burst
from cometd.longpoll import TICK, deadlines
from cometd.streamhttp import _http_date

__all__ = [
    "Answer", "BackendUnavailable", "BodyError", "Publisher", "MAX_BATCH_BYTES",
    "MAX_BATCH_MESSAGES", "FAST_PREFIXES", "FAST_HEAD_BYTES", "answer_send", "answer_publish",
    "parse_batch", "results_json", "serve_publisher", "AUTH_FAILURES",
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
#: what check_id takes of a string, for a batch's plain reading
_ID_TEXT = re.compile(ID_PATTERN + r"\Z")


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


class Answer(NamedTuple):
    """What to answer: a status, a JSON payload (or its text) and any more headers.

    (A named tuple: one is made per publish, and a frozen dataclass takes three times as long.)
    """

    status: int
    #: a payload for ``json.dumps``, or the very text it would write (a batch's results)
    payload: dict[str, Any] | str
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

    Theory of operation: the common body is read as one JSON array (its
    newlines made commas) with one ``json.loads``, instead of one a line,
    and its items checked by :func:`_checked`. That reading is taken only
    where it must agree with the line by line one: every newline sits
    between a ``}`` and a ``{`` (so no blank or padded line), there is one
    item a newline and one more, and every item is a flat object of the two
    string fields. No string holds a raw newline, so the ``}`` before each
    newline is outside the strings, and outside its strings a flat item's
    only ``}`` is its last byte: each newline ends an item, and with the
    count, each line is exactly one item, what ``json.loads`` of that line
    gives. Anything else, every error included, is read again line
    by line (:func:`_parse_lines`), which alone words the errors, so they
    name the line at fault as they always have.
    """
    text = body.strip(b" \t\r\n")  # JSON's whitespace: the blank lines at either end
    newlines = text.count(b"\n")
    if text[:1] == b"{" and text[-1:] == b"}" and text.count(b"}\n{") == newlines:
        try:
            items = json.loads(b"[" + text.replace(b"\n", b",") + b"]")
        except (ValueError, UnicodeDecodeError, RecursionError):
            items = None
        if items is not None and len(items) == newlines + 1:
            messages = _checked(items)
            if messages is not None:
                return messages
    return _parse_lines(body)


def _checked(items: list[Any]) -> list[tuple[str, bytes]] | None:
    """*items* as messages if every one is a plain, valid message, else None."""
    if len(items) > MAX_BATCH_MESSAGES:
        return None
    messages = []
    append, match = messages.append, _ID_TEXT.match
    for item in items:
        # A dict of exactly the two string fields (json.loads makes exact types).
        if type(item) is not dict or len(item) != 2:
            return None
        subject, text = item.get("from"), item.get("body")
        if type(subject) is not str or type(text) is not str or match(subject) is None:
            return None
        try:
            message = text.encode()
        except UnicodeEncodeError:
            return None
        if not message or len(message) > MAX_MESSAGE_BYTES:
            return None
        append((subject, message))
    return messages


def _parse_lines(body: bytes) -> list[tuple[str, bytes]]:
    """:func:`parse_batch`, one line at a time: the reading that words every error."""
    messages: list[tuple[str, bytes]] = []
    for number, line in enumerate(body.split(b"\n"), 1):
        if not line.strip():
            continue
        if len(messages) == MAX_BATCH_MESSAGES:
            raise BodyError(400, f"more than {MAX_BATCH_MESSAGES} messages in one batch")
        try:
            item = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # too deep: not JSON here
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
    return Answer(200, results_json(sent))


def results_json(sent: Iterable[tuple[int, str]]) -> str:
    """A batch's answer, ``{"results": [{"delivered": N, "id": "<id>"}, ...]}``, as text.

    The very text ``json.dumps`` writes for it, from pieces: a dict a message
    and their ``json.dumps`` cost ~4 times as long. An id (``<epoch>-<seq>``,
    see :mod:`cometd.history`) holds nothing JSON escapes.
    """
    return '{"results": [' + ", ".join(
        [f'{{"delivered": {d}, "id": "{i}"}}' for d, i in sent]) + "]}"


# -- the fast path ----------------------------------------------------------------

#: a publish request's head as the fast path reads it: (subject of ``POST /send/<subject>``
#: (unchecked; None for ``POST /publish``), the body's Content-Length (0 when there is none),
#: close after the answer, Authorization, X-API-Key, Origin). A plain tuple: one is made per
#: request, and a named tuple's constructor is a Python call.
_Request = tuple[str | None, int, bool, str | None, str | None, str | None]


#: the common shape, whole: an HTTP/1.1 POST to /send/<a valid id> or /publish, no
#: query, header lines of the strict grammar (a value's padding is part of FIELD_VALUE)
_PLAIN_HEAD = re.compile(
    rb"POST /(?:send/(" + ID_PATTERN.encode() + rb")|publish) HTTP/1\.1"
    rb"(\r\n(?:" + TCHAR.encode() + rb"+:" + FIELD_VALUE.encode() + rb"*\r\n)*)\r\n")
#: headers the fast path reads, each at most once (a field begins after a CRLF)
_READ = (b"\r\nauthorization:", b"\r\nx-api-key:", b"\r\norigin:")


def _plain_request(head: bytes) -> _Request | None:
    """*head* (through its empty line) when it has the common shape, else None.

    Theory of operation: an accept-only reading, as :mod:`cometd.auth`'s fast
    HS256 check is for tokens. It takes a head only where :func:`_general_request` (the strict
    grammar of :func:`cometd.httprequest.read_head`) would read it the same,
    and leaves everything else to it: so it never decides an error, and the
    smuggling defences are read_head's. The regular expression holds every
    line to the field grammar (no bare CR or LF, no folding, token names), so
    in the lower-cased block a CRLF followed by a name and a colon can only
    begin a field of that name.
    """
    match = _PLAIN_HEAD.fullmatch(head)
    if match is None:
        return None
    block = match[2]
    low = block.lower()
    if (low.count(b"\r\nhost:") != 1 or b"\r\ntransfer-encoding:" in low
            or b"\r\nexpect:" in low or b"\r\nconnection:" in low):
        return None  # framing or options beyond the common shape: read_head reads them
    at = low.find(b"\r\ncontent-length:")
    length = 0
    if at >= 0:
        if low.find(b"\r\ncontent-length:", at + 1) >= 0:
            return None
        start = at + 17
        digits = block[start:block.index(b"\r", start)].strip(b" \t")
        if not (0 < len(digits) <= 18 and digits.isdigit()):
            return None
        length = int(digits)
    values: list[str | None] = []
    for name in _READ:
        at = low.find(name)
        if at < 0:
            values.append(None)
            continue
        if low.find(name, at + 1) >= 0:
            return None
        start = at + len(name)
        values.append(block[start:block.index(b"\r", start)].strip(b" \t").decode("latin-1"))
    subject = match[1]
    return (None if subject is None else subject.decode(), length, False, *values)


def _general_request(head: bytes) -> _Request | None:
    """*head* (through its empty line) read by the strict grammar; None: pywsgi's to serve.

    None for a head the grammar refuses (pywsgi gives the same error), and
    for one outside the fast path: not HTTP/1.1, not a ``POST`` to
    ``/send/<subject>`` (no escapes) or ``/publish``, a chunked body, an
    ``Expect``, a doubled credential or ``Origin`` header.
    """
    line_end = head.index(b"\r\n")
    block = io.BytesIO(head[line_end + 2:])
    try:
        parsed = read_head(head[:line_end + 2].decode("latin-1"), block)
    except RequestError:
        return None
    if (block.tell() != len(head) - line_end - 2 or parsed.version != "HTTP/1.1"
            or parsed.chunked or parsed.method != "POST"):
        return None
    found: dict[str, list[str]] = {}
    for name, value in parsed.fields:
        lowered = name.lower()
        if lowered in ("authorization", "x-api-key", "origin", "expect"):
            found.setdefault(lowered, []).append(value)
    if "expect" in found or any(len(v) > 1 for v in found.values()):
        return None
    send = _SEND_PATH.match(parsed.path)
    if send is None and _PUBLISH_PATH.match(parsed.path) is None:
        return None
    return (None if send is None else send[1], parsed.content_length or 0, parsed.close,
            *(found.get(n, (None,))[0] for n in ("authorization", "x-api-key", "origin")))


_OK = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
_CLOSE = "Connection: close\r\n"


def _answer_bytes(answer: Answer, send: bool, lines: str, close: bool) -> bytes:
    """*answer* (to a ``/send`` when *send*) as pywsgi and bottle would write it.

    *lines* are the CORS policy's header lines. A send's success, the common
    answer, is written from a template: the same bytes as ``json.dumps``.
    """
    payload = answer.payload
    if send and answer.status == 200:
        body = f'{{"delivered": {payload["delivered"]}, "id": "{payload["id"]}"}}'
        return (f"{_OK}{len(body)}\r\n{lines}Date: {_http_date()}\r\n"
                f"{_CLOSE if close else ''}\r\n{body}").encode()
    body = payload if type(payload) is str else json.dumps(payload)
    # Names as bottle writes the app's (title case), the CORS policy's as they are.
    extra = "".join(f"{name.title()}: {value}\r\n" for name, value in answer.headers)
    return (f"HTTP/1.1 {answer.status} {HTTP_CODES[answer.status]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body.encode())}\r\n"
            f"{extra}{lines}Date: {_http_date()}\r\n"
            f"{_CLOSE if close else ''}\r\n").encode("latin-1") + (
        body.encode())


class _Publisher:
    """One publisher's connection: its raw socket, buffer, pending answers and deadline.

    Theory of operation: waiting without gevent's socket
    -----------------------------------------------------
    A gevent socket's ``recv`` with a timeout costs, per request, a failed
    ``recv``, a ``Timeout`` (a libev timer started and stopped), a ``Waiter``
    and an io watcher started and stopped, around the two greenlet switches
    that are the whole of the wait. Here the connection's greenlet waits on
    its own io watchers, which call its ``switch`` straight from the loop,
    and the request deadline is not a timer per read but an entry in the
    server's tick wheel (:func:`cometd.longpoll.deadlines`, 0.1 s ticks),
    filed once and moved only when it comes due: the wheel's sweep calls
    :meth:`_answer`, which files it again if the deadline moved on (a later
    request) or the greenlet is not waiting (sending), else wakes the greenlet
    with False, and the connection closes. So a request costs a store of its
    deadline, and a slow client is closed at most a tick after it.

    Answers go out with a plain non-blocking ``send``; pipelined requests
    (several in one read) queue theirs in :attr:`out`, sent in one write
    before the connection next waits to read, hands over or closes.
    """

    __slots__ = ("sock", "buf", "out", "timeout", "deadline", "switch", "hub", "reader", "writer",
                 "wheel", "waiting", "_tick", "start", "length", "cut")

    def __init__(self, server: Any, sock: _socket.socket, first: bytes) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.buf = bytearray(first)
        #: answers not yet written, in order
        self.out: list[bytes] = []
        self.timeout = server.request_timeout
        self.deadline = time.monotonic() + self.timeout
        #: the connection's greenlet's switch
        self.switch = getcurrent().switch
        self.hub = get_hub()
        loop = self.hub.loop
        self.reader = loop.io(sock.fileno(), 1)
        self.writer: Any = None  # made when a write first has to wait
        self.wheel = deadlines(server.table)
        self.waiting = False
        #: the wheel's tick this connection is filed under, while it is
        self._tick: int | None = None
        #: where the body of the request under way starts in the buffer, its length,
        #: and whether it ended early (then no request follows it)
        self.start = self.length = 0
        self.cut = False

    def _wait(self, watcher: Any) -> bool:
        """Wait until *watcher* fires (True) or the deadline passes (False)."""
        if self._tick is None:
            self._tick = self.wheel.add(self, max(self.deadline - time.monotonic(), 0.0))
        watcher.start(self.switch, True)
        self.waiting = True
        try:
            return self.hub.switch()
        finally:
            self.waiting = False
            watcher.stop()

    def _answer(self) -> None:
        """The wheel's sweep: this connection's tick came (see the class docstring)."""
        remaining = self.deadline - time.monotonic()
        if remaining > 0 or not self.waiting:
            self._tick = self.wheel.add(self, max(remaining, TICK))
            return
        self.switch(False)

    def fill(self, wait_first: bool = False) -> bool:
        """Read more into the buffer (first sending what is queued); False: closed or out of time.

        *wait_first*: wait for the socket before reading (no request is
        expected to be in yet: the client has just been answered).
        """
        if self.out and not self.flush():
            return False
        while True:
            if wait_first and not self._wait(self.reader):
                return False
            wait_first = True
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                return False
            if not data:
                return False
            self.buf += data
            return True

    def flush(self) -> bool:
        """Write the queued answers; False: the client is gone or did not read in time."""
        data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
        self.out.clear()
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return False
        if sent == len(data):
            return True
        # A full send buffer: each wait for room gets request_timeout, as a socket timeout.
        view = memoryview(data)[sent:]
        if self.writer is None:
            self.writer = self.hub.loop.io(self.sock.fileno(), 2)
        while view:
            self.deadline = time.monotonic() + self.timeout
            if not self._wait(self.writer):
                return False
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                pass
            except OSError:
                return False
        return True

    def read_body(self, limit: int) -> bytes:
        """The body of the request under way (see :func:`answer_send`)."""
        start, length = self.start, self.length
        if length > limit:
            raise BodyError(413, f"request body over {limit} bytes")
        while len(self.buf) < start + length:
            if not self.fill():
                self.cut = True
                raise BodyError(400, "incomplete request body")
        return bytes(self.buf[start:start + length])

    def skip(self, n: int) -> bool:
        """Drop the next *n* bytes, reading them as needed; False: they did not come."""
        while len(self.buf) < n:
            n -= len(self.buf)
            self.buf.clear()
            if not self.fill():
                return False
        del self.buf[:n]
        return True

    def close(self) -> None:
        """Stop waiting on the socket (its owner next closes it or hands it on)."""
        tick, self._tick = self._tick, None
        if tick is not None:
            self.wheel.discard(self, tick)
        self.reader.close()
        if self.writer is not None:
            self.writer.close()


def _maybe_fast(buf: bytearray) -> bool:
    """Whether *buf* may still begin a request the fast path takes."""
    return buf.startswith(FAST_PREFIXES) or any(p.startswith(bytes(buf)) for p in FAST_PREFIXES)


def serve_publisher(server: Any, sock: _socket.socket, first: bytes) -> bytes | None:
    """Serve publishes on *sock* while they come; the bytes to hand to pywsgi, or None.

    *first* is what the accept callback read; *server* is the
    :class:`cometd.server.CometServer` (its backend, authenticator, CORS
    policy, connection table and request timeout). Runs in the
    connection's greenlet. None: the connection is done (closed by the
    client, timed out, or answered with ``Connection: close``), and the
    caller closes *sock*.
    """
    conn = _Publisher(server, sock, first)
    try:
        return _serve(server, conn)
    finally:
        conn.close()


def _serve(server: Any, conn: _Publisher) -> bytes | None:
    backend, auth, cors = server.publisher, server.auth, server.cors
    buf, out = conn.buf, conn.out
    while True:
        # Wait for a whole head that is a publish; anything else goes to pywsgi.
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            if len(buf) > FAST_HEAD_BYTES or not _maybe_fast(buf):
                return bytes(buf) if not out or conn.flush() else None
            if not conn.fill():
                return None
            end = buf.find(b"\r\n\r\n")
        start = end + 4
        if start > FAST_HEAD_BYTES or not buf.startswith(FAST_PREFIXES):
            return bytes(buf) if not out or conn.flush() else None
        head = bytes(buf[:start])
        request = _plain_request(head) or _general_request(head)
        if request is None:
            return bytes(buf) if not out or conn.flush() else None
        subject, length, close, authorization, api_key, origin = request
        conn.start, conn.length, conn.cut = start, length, False
        if subject is not None:
            answer = answer_send(backend, auth, authorization, api_key, subject, conn.read_body)
        else:
            answer = answer_publish(backend, auth, authorization, api_key, conn.read_body)
        COUNTS.fast_publishes += 1
        close = close or conn.cut
        lines = "" if cors is None else cors.stream_lines(origin)
        out.append(_answer_bytes(answer, subject is not None, lines, close))
        if close:
            conn.flush()
            return None
        if len(buf) >= start + length:
            del buf[:start + length]
        elif not conn.skip(start + length):  # a body left unread: read and dropped
            return None
        conn.deadline = time.monotonic() + conn.timeout
        if not buf and not conn.fill(wait_first=True):
            return None
        if buf.startswith(b"\r\n"):
            del buf[:2]  # RFC 9112 2.2: one empty line before a request is ignored
