"""The server process against hostile input and signals, in both connection modes.

Malformed requests, oversized headers, unknown paths and methods, slowloris
clients and binary garbage each get a short answer (or a close) and never a
traceback, and the server goes on serving. A request-smuggling corpus, each
case with a pipelined request behind it, gets exactly the answers RFC 9112
allows and nothing after them. SIGINT and SIGTERM stop it cleanly: exit code
0, chunked streams ended with their last chunk, every stream closed, the
database closed and reusable.
"""

from __future__ import annotations

import json
import random
import re
import signal
import socket
import threading
import time

import gevent
import pytest
from conftest import (
    StreamClient,
    get_stats,
    http_json,
    http_request,
    send,
    start_server,
    unique_id,
    wait_for,
)
from gevent import socket as gsocket

from cometd.connections import MODES, ConnectionTable
from cometd.store import SubscriptionStore

REQUEST_TIMEOUT = 1.0


@pytest.fixture(scope="module", params=MODES)
def srv(request, tmp_path_factory):
    s = start_server(str(tmp_path_factory.mktemp("server") / "db"), "--mode", request.param,
                     "--admin-port", "-1", "--request-timeout", str(REQUEST_TIMEOUT))
    yield s
    s.stop()


def _exchange(srv, data: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send *data* on a fresh connection; everything the server answers until it closes."""
    sock = socket.create_connection((srv.host, srv.port), timeout=timeout)
    start = time.monotonic()
    out = b""
    try:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it may answer and close before reading all of it
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        sock.close()
    return out, time.monotonic() - start


def _status(response: bytes) -> int:
    assert response.startswith(b"HTTP/1."), response[:200]
    return int(response.split(b" ", 2)[1])


def _still_serving(srv, watcher: StreamClient, user: str) -> None:
    text = f"alive {time.monotonic()}"
    assert send(srv, user, text) == 1
    assert watcher.chunk() == text.encode()
    assert get_stats(srv)["connections"] >= 1


@pytest.fixture
def watcher(srv):
    """A stream open across the abuse: it must keep working after each case."""
    user = unique_id("watch")
    seen = len(srv.output)
    with StreamClient.open(srv, f"/test/{user}") as c:
        c.chunk()
        yield c, user
    output = "".join(srv.output[seen:])
    assert "Traceback" not in output, output  # nor in the server's log


@pytest.mark.parametrize("request_bytes, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET\r\n\r\n", 400),
    (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
    (b"\r\n\r\n", 400),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    (b"G@T /stats HTTP/1.1\r\n\r\n", 400),  # a method must be a token
    (b"\x01\x02 /stats HTTP/1.1\r\n\r\n", 400),
    (b"GET /stats HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /send/x HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
    (b"POST /send/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
     b"\r\nzz\r\n", 400),
    (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /no/such/path HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404),
    (b"GET /send HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404),
    (b"POST /stats HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 405),
    (b"GET /send/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
    (b"DELETE /test/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
    (b"PUT /subscriptions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n"
     b"\r\n[]", 405),
])
def test_bad_requests_get_short_answers(srv, watcher, request_bytes, status):
    response, _ = _exchange(srv, request_bytes)
    assert _status(response) == status, response[:300]
    assert b"Traceback" not in response and b'File "' not in response
    head, _, body = response.partition(b"\r\n\r\n")
    if body:
        assert set(json.loads(body[:body.index(b"}") + 1])) == {"error"}
    _still_serving(srv, watcher[0], watcher[1])


@pytest.mark.parametrize("headers", [
    b"X-Big: " + b"b" * (66 * 1024) + b"\r\n",
    b"".join(b"X-H%05d: %s\r\n" % (i, b"v" * 40) for i in range(1400)),
], ids=["one-huge-header", "many-headers"])
def test_headers_over_64k_get_431(srv, watcher, headers):
    request = b"GET /stats HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    assert len(request) > 64 * 1024
    response, _ = _exchange(srv, request)
    assert _status(response) == 431
    # just under the limit is fine
    request = b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: " + (
        b"p" * (60 * 1024)) + b"\r\n\r\n"
    response, _ = _exchange(srv, request)
    assert _status(response) == 200
    _still_serving(srv, watcher[0], watcher[1])


def test_binary_garbage(srv, watcher):
    rng = random.Random(1234)
    samples = [
        bytes(range(256)) * 4,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200),  # a TLS hello
        bytes(rng.randrange(256) for _ in range(5000)),
        bytes(rng.randrange(256) for _ in range(70000)),
        b"\x00" * 1000,
    ]
    for data in samples:
        response, elapsed = _exchange(srv, data)
        if response:
            assert 400 <= _status(response) < 500, response[:200]
            assert b"Traceback" not in response
        # answered at once, or closed when the request timeout ran out
        assert elapsed < REQUEST_TIMEOUT + 3
        _still_serving(srv, watcher[0], watcher[1])


@pytest.mark.parametrize("opening, trickle", [
    (b"GET /stats HTTP/1.1\r\nHost: x\r\n", b"X-Slow: 1\r\n"),  # headers that never end
    (b"POST /send/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n", b"y"),  # a body
    (b"GET /sta", b"t"),  # even the request line
    (b"", b""),  # a connection that says nothing
], ids=["headers", "body", "request-line", "silent"])
def test_slowloris_is_closed_after_the_request_timeout(srv, watcher, opening, trickle):
    sock = socket.create_connection((srv.host, srv.port), timeout=10)
    start = time.monotonic()
    closed_after = None
    try:
        sock.sendall(opening)
        # A byte or line well inside every per-read timeout, again and again.
        while time.monotonic() - start < REQUEST_TIMEOUT + 4:
            try:
                if trickle:
                    sock.sendall(trickle)
                sock.settimeout(REQUEST_TIMEOUT / 4)
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                data = b""
            if not data or data.startswith(b"HTTP/1.1 4"):
                closed_after = time.monotonic() - start
                break
    finally:
        sock.close()
    assert closed_after is not None, "the slow client was never closed"
    assert REQUEST_TIMEOUT * 0.8 <= closed_after < REQUEST_TIMEOUT + 2, closed_after
    _still_serving(srv, watcher[0], watcher[1])


def test_streams_outlive_the_request_timeout(srv):
    """The request timeout bounds requests, not the streams they turn into."""
    user = unique_id("long")
    streams = [StreamClient.open(srv, f"/test/{user}"), StreamClient.open(srv, f"/events/{user}"),
               StreamClient.open(srv, f"/test/{user}", http10=True)]
    try:
        streams[0].chunk(), streams[1].chunk()
        welcome = f"Welcome, Url: '/test/{user}' Id: {user}\n".encode()
        assert streams[2].read_raw(len(welcome)) == welcome
        time.sleep(REQUEST_TIMEOUT * 1.5)  # the point is the time passing, nothing to poll
        assert send(srv, user, "later") == 3
        assert streams[0].chunk() == b"later"
        assert b'"body": "later"' in streams[1].chunk()
        assert streams[2].read_raw(5) == b"later"
    finally:
        for c in streams:
            c.close()


def test_a_normal_keepalive_client_is_served_request_after_request(srv, watcher):
    sock = socket.create_connection((srv.host, srv.port), timeout=10)
    try:
        for _ in range(3):
            sock.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(65536)
            assert _status(head) == 200
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            body = head.partition(b"\r\n\r\n")[2]
            while len(body) < length:
                body += sock.recv(65536)
            assert "connections" in json.loads(body)
    finally:
        sock.close()
    _still_serving(srv, watcher[0], watcher[1])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly(tmp_path, mode, sig):
    db = str(tmp_path / "db")
    s = start_server(db, "--mode", mode, "--admin-port", "-1")
    streams = []
    try:
        assert http_json(s, "POST", "/subscriptions", [["alice", "rj"], ["bob", "rj"]]) == (
            200, {"added": 2})
        streams = [StreamClient.open(s, "/test/alice"), StreamClient.open(s, "/events/bob"),
                   StreamClient.open(s, "/test/rj", http10=True)]
        stalled = StreamClient.open(s, "/test/stalled", rcvbuf=4096)
        streams.append(stalled)
        for c in streams[:2]:
            c.chunk()
        # the stalled reader has output pending in the server when the signal comes
        for _ in range(3):
            assert send(s, "stalled", b"s" * 60000) == 1
        assert send(s, "rj", "before the signal") == 3
        assert streams[0].chunk() == b"before the signal"
        idle = socket.create_connection((s.host, s.port))  # keep-alive, between requests
        idle.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: b"\r\n\r\n" in idle.recv(65536, socket.MSG_PEEK), 5)
        s.proc.send_signal(sig)
        assert s.proc.wait(15) == 0
        for c in streams:
            c.wait_closed(5)  # every stream ended; no stream hangs on
            assert c.eof
        idle.settimeout(5)
        rest = b""
        while data := idle.recv(65536):
            rest += data
        idle.close()
    finally:
        for c in streams:
            c.close()
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(5)
    output = "".join(s.output)
    assert "Traceback" not in output, output
    # The database was closed: this process can open it, with everything in it.
    with SubscriptionStore(db) as store:
        assert store.get_subscribers("rj") == ["alice", "bob"]
    # and a new server starts on it
    again = start_server(db, "--mode", mode, "--admin-port", "-1")
    try:
        assert http_json(again, "GET", "/subscribers/rj") == (
            200, {"subscribers": ["alice", "bob"]})
    finally:
        assert again.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_clean_shutdown_ends_chunked_streams_with_the_last_chunk(tmp_path, mode, sig):
    """What a stream was sent arrives whole, then the last chunk: unlike after a crash."""
    # max-pending above the kernel's buffers (tcp_wmem's 4 MiB maximum) leaves
    # output in the server's own outbox for the late reader below
    server = start_server(str(tmp_path / "db"), "--mode", mode, "--admin-port", "-1",
                          "--max-pending", str(16 << 20))
    user = unique_id("end")
    streams = [StreamClient.open(server, f"/test/{user}"),
               StreamClient.open(server, f"/events/{user}")]
    old = StreamClient.open(server, f"/test/{user}", http10=True)
    # Output held in the server's outbox when the signal comes: this reader
    # starts reading only after it, and gets all of it, then the last chunk.
    late_user = unique_id("late")
    late = StreamClient.open(server, f"/test/{late_user}", rcvbuf=4096)
    # and this one never reads
    stalled = StreamClient.open(server, f"/test/{unique_id('stalled')}", rcvbuf=4096)
    try:
        for c in [*streams, late]:
            c.chunk()
        body = b"last words " * 5000
        assert send(server, user, body) == 3
        backlog = [bytes([65 + i % 26]) * 60000 for i in range(100)]
        for message in backlog:
            assert send(server, late_user, message) == 1
        reader = threading.Thread(target=lambda: (time.sleep(0.2), late.wait_closed(10)))
        started = time.monotonic()
        server.proc.send_signal(sig)
        reader.start()
        assert server.proc.wait(15) == 0
        reader.join(15)
        assert late.eof and late.parser.ended
        assert list(late.parser.chunks) == backlog  # all of it, and then the last chunk
        # A client that takes nothing does not hold up the shutdown for long.
        assert time.monotonic() - started < 8
        for c in streams:
            c.wait_closed(5)
            assert c.eof and c.parser.ended, c.status_line
        assert streams[0].parser.chunks[-1] == body
        assert b"last words" in streams[1].parser.chunks[-1]
        old.wait_closed(5)  # HTTP/1.0: the close is the end
        assert old.eof and old.raw.endswith(body)
        stalled.wait_closed(5)
        assert stalled.eof
    finally:
        for c in [*streams, old, late, stalled]:
            c.close()
        server.stop(signal.SIGKILL)
    assert "Traceback" not in "".join(server.output)


def test_unknown_paths_and_methods_over_http_client(srv, watcher):
    for method, path, status in [("GET", "/index.html", 404), ("GET", "/favicon.ico", 404),
                                 ("GET", "/test", 404), ("HEAD", "/send/x", 405),
                                 ("PATCH", "/subscriptions", 405), ("OPTIONS", "/stats", 405),
                                 ("GET", "/../../etc/passwd", 404)]:
        got, headers, body = http_request(srv, method, path)
        assert got == status, (method, path, got, body)
        if method != "HEAD":
            assert json.loads(body)["error"]
    _still_serving(srv, watcher[0], watcher[1])


# -- request smuggling: every request ends where exactly one reading says ----------------

PIPELINED = b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n"


def _responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split what the server sent into responses; anything left over fails."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"stray bytes after {len(out)} responses: {data[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        fields = (line.partition(":") for line in lines[1:])
        headers = {k.strip().lower(): v.strip() for k, _, v in fields}
        length = int(headers["content-length"])  # every answer here has one
        out.append((_status(data), headers, rest[:length]))
        data = rest[length:]
    return out


def _post(user: str, fields: bytes, body: bytes) -> bytes:
    return b"POST /send/%s HTTP/1.1\r\nHost: x\r\n%s\r\n%s" % (user.encode(), fields, body)


# Each request publishes to the watcher, then a pipelined GET /stats follows; the
# expected statuses are all the answers there may be, and then the server closes.
# A refused request delivers nothing: the watcher's next chunk is _still_serving's.
SMUGGLING = {
    "duplicate-content-length": (b"Content-Length: 2\r\nContent-Length: 3\r\n", b"hiX", [400]),
    "identical-duplicate-content-length": (
        b"Content-Length: 3\r\nContent-Length: 3\r\n", b"hiX", [400]),
    "content-length-list": (b"Content-Length: 3, 3\r\n", b"hiX", [400]),
    "content-length-differing-list": (b"Content-Length: 2, 3\r\n", b"hiX", [400]),
    "content-length-plus": (b"Content-Length: +3\r\n", b"hiX", [400]),
    "content-length-underscore": (b"Content-Length: 1_0\r\n", b"hiXhiXhiXh", [400]),
    "content-length-hex": (b"Content-Length: 0x3\r\n", b"hiX", [400]),
    "space-before-colon": (b"Content-Length : 3\r\n", b"hiX", [400]),
    "tab-before-colon": (b"Transfer-Encoding\t: chunked\r\n", b"3\r\nhiX\r\n0\r\n\r\n", [400]),
    "chunked-then-identity": (
        b"Transfer-Encoding: chunked, identity\r\n", b"3\r\nhiX\r\n0\r\n\r\n", [400]),
    "chunked-twice": (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                      b"3\r\nhiX\r\n0\r\n\r\n", [400]),
    "unknown-coding": (b"Transfer-Encoding: gzip, chunked\r\n", b"3\r\nhiX\r\n0\r\n\r\n", [501]),
    "not-chunked": (b"Transfer-Encoding: xchunked\r\n", b"3\r\nhiX\r\n0\r\n\r\n", [400]),
    "obs-fold-in-te": (b"Transfer-Encoding:\r\n chunked\r\n", b"3\r\nhiX\r\n0\r\n\r\n", [400]),
    "obs-fold-elsewhere": (b"X-A: 1\r\n\t2\r\nContent-Length: 3\r\n", b"hiX", [400]),
    "chunk-size-garbage": (b"Transfer-Encoding: chunked\r\n", b"3x\r\nhiX\r\n0\r\n\r\n", [400]),
    "chunk-size-0x": (b"Transfer-Encoding: chunked\r\n", b"0x3\r\nhiX\r\n0\r\n\r\n", [400]),
    "chunk-size-negative": (b"Transfer-Encoding: chunked\r\n", b"-3\r\nhiX\r\n0\r\n\r\n", [400]),
    "chunk-size-bare-lf": (b"Transfer-Encoding: chunked\r\n", b"3\nhiX\r\n0\r\n\r\n", [400]),
    "chunk-ext-bare-lf": (b"Transfer-Encoding: chunked\r\n", b"3;a\nhiX\r\n0\r\n\r\n", [400]),
    "chunk-ext-garbage": (b"Transfer-Encoding: chunked\r\n", b"3;a b\r\nhiX\r\n0\r\n\r\n", [400]),
    "chunk-data-overrun": (b"Transfer-Encoding: chunked\r\n", b"2\r\nhiX\r\n0\r\n\r\n", [400]),
    "trailer-obs-fold": (
        b"Transfer-Encoding: chunked\r\n", b"3\r\nhiX\r\n0\r\nX-T: 1\r\n 2\r\n\r\n", [400]),
    "trailer-bare-lf": (b"Transfer-Encoding: chunked\r\n", b"3\r\nhiX\r\n0\r\nX-T: 1\n\r\n", [400]),
    "header-bare-lf": (b"X-A: 1\nContent-Length: 3\r\n", b"hiX", [400]),
    "header-bare-cr": (b"X-A: 1\rContent-Length: 3\r\n", b"hiX", [400]),
    "header-nul": (b"X-A: 1\x00\r\nContent-Length: 3\r\n", b"hiX", [400]),
    "header-name-not-a-token": (b"X(A): 1\r\nContent-Length: 3\r\n", b"hiX", [400]),
    "headers-end-bare-lf": (b"Content-Length: 3\r\n\n", b"hiX", [400]),
}


def _smuggle(srv, request: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    response, _ = _exchange(srv, request + PIPELINED)
    return _responses(response)


@pytest.mark.parametrize("case", SMUGGLING)
def test_smuggling_corpus_is_refused_and_the_rest_never_read(srv, watcher, case):
    fields, body, statuses = SMUGGLING[case]
    answers = _smuggle(srv, _post(watcher[1], fields, body))
    assert [status for status, _, _ in answers] == statuses, answers
    assert answers[0][1]["connection"] == "close"
    assert set(json.loads(answers[0][2])) == {"error"}
    _still_serving(srv, watcher[0], watcher[1])  # nothing was delivered


def test_bare_lf_request_line_is_refused(srv, watcher):
    answers = _smuggle(srv, b"POST /send/%s HTTP/1.1\nHost: x\r\nContent-Length: 3\r\n\r\nhiX"
                       % watcher[1].encode())
    assert [a[0] for a in answers] == [400]
    _still_serving(srv, watcher[0], watcher[1])


@pytest.mark.parametrize("fields, body, message", [
    (b"Transfer-Encoding: chunked\r\n", b"3;name=value\r\nhiX\r\n0\r\n\r\n", b"hiX"),
    (b"Transfer-Encoding: chunked\r\n", b'2 ; a = "b; c" ;d\r\nhi\r\n1\r\nX\r\n0\r\n\r\n', b"hiX"),
    (b"Transfer-Encoding: Chunked\r\n", b"3\r\nhiX\r\n0\r\nX-Trailer: t\r\n\r\n", b"hiX"),
    (b"Content-Length: 3\r\n", b"hiX", b"hiX"),
    (b"Content-Length: 3\r\n", b"hiX\r\n", b"hiX"),  # RFC 9112 2.2: one CRLF is ignored
], ids=["chunk-extension", "quoted-extension", "trailer", "content-length", "extra-crlf"])
def test_well_framed_bodies_keep_the_connection(srv, watcher, fields, body, message):
    """Chunk extensions and trailers are legal and ignored; the next request is read."""
    answers = _smuggle(srv, _post(watcher[1], fields, body + PIPELINED[:-2]
                                  + b"Connection: close\r\n\r\n"))
    assert [a[0] for a in answers] == [200, 200], answers
    assert json.loads(answers[0][2])["delivered"] == 1
    assert "connections" in json.loads(answers[1][2])
    assert watcher[0].chunk() == message
    _still_serving(srv, watcher[0], watcher[1])


def test_chunked_with_content_length_reads_chunked_then_closes(srv, watcher):
    """RFC 9112 6.3: Transfer-Encoding overrides Content-Length; close after the answer."""
    fields = b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"
    answers = _smuggle(srv, _post(watcher[1], fields, b"5\r\nhello\r\n0\r\n\r\n"))
    assert [a[0] for a in answers] == [200], answers
    assert json.loads(answers[0][2])["delivered"] == 1
    assert answers[0][1]["connection"] == "close"
    assert watcher[0].chunk() == b"hello"
    _still_serving(srv, watcher[0], watcher[1])


@pytest.mark.parametrize("request_bytes, statuses", [
    (b"POST /send/{u} HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhiX\r\n0\r\n\r\n", [400]),
    (b"POST /send/{u} HTTP/1.1\r\nContent-Length: 3\r\n\r\nhiX", [400]),  # no Host
    (b"POST /send/{u} HTTP/1.1\r\nHost: x\r\nHost: y\r\nContent-Length: 3\r\n\r\nhiX", [400]),
    # the app refuses a stream with a body, which is well framed: the next request is read
    (b"GET /test/{u} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nhiX", [400, 200]),
    (b"GET /test/{u} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n", [400]),
    (b"GET /events/{u} HTTP/1.1\r\n\r\n", [400]),
    (b"post /send/{u} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nhiX", [501]),
    (b"get /test/{u} HTTP/1.1\r\nHost: x\r\n\r\n", [501]),
    (b"Get /stats HTTP/1.1\r\nHost: x\r\n\r\n", [501]),
    (b"FOO /stats HTTP/1.1\r\nHost: x\r\n\r\n", [501]),
], ids=["http10-chunked", "no-host", "two-hosts", "stream-with-body", "stream-two-lengths",
        "stream-no-host", "lower-case-post", "lower-case-get", "mixed-case", "unknown-method"])
def test_requests_refused_outright(srv, watcher, request_bytes, statuses):
    answers = _smuggle(srv, request_bytes.replace(b"{u}", watcher[1].encode()))
    assert [a[0] for a in answers] == statuses, answers
    assert set(json.loads(answers[0][2])) == {"error"}
    _still_serving(srv, watcher[0], watcher[1])


@pytest.mark.parametrize("target", ["http://x", "HTTP://127.0.0.1:9", "https://x"])
def test_absolute_form_targets_are_routed_by_their_path(srv, watcher, target):
    user = watcher[1]
    request = b"POST %s/send/%s HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab" % (
        target.encode(), user.encode())
    answers = _smuggle(srv, request + PIPELINED[:-2] + b"Connection: close\r\n\r\n")
    assert [(a[0], json.loads(a[2]).get("delivered")) for a in answers] == [(200, 1), (200, None)]
    assert watcher[0].chunk() == b"ab"
    for path in (f"/test/{user}", f"/events/{user}"):
        with StreamClient.open(srv, target + path) as c:
            assert c.status == 200 and c.chunked
            assert f"Url: '{path}' Id: {user}".encode() in c.chunk()
    _still_serving(srv, watcher[0], watcher[1])


@pytest.mark.parametrize("route, status", [("POST /send/{u}", 400), ("GET /stats", 200)],
                         ids=["read-by-the-app", "discarded"])
def test_a_body_cut_short_by_the_timeout_is_no_next_request(srv, watcher, route, status):
    """A body the request timeout cut off leaves no place a next request could start."""
    sock = socket.create_connection((srv.host, srv.port), timeout=10)
    try:
        line = route.replace("{u}", watcher[1]).encode()
        sock.sendall(line + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npartial")
        head = b""
        while b"}" not in head:
            head += sock.recv(65536)
        assert _status(head) == status
        # (the 200 came before the body: the timeout runs out while it is discarded)
        time.sleep(REQUEST_TIMEOUT * 1.5)  # the point is the time passing
        sock.sendall(b"x" * 93 + PIPELINED)  # the rest of the body, then a request
        sock.settimeout(5)
        rest = b""
        try:
            while data := sock.recv(65536):
                rest += data
        except ConnectionResetError:
            pass
        assert rest == b"", rest
    finally:
        sock.close()
    _still_serving(srv, watcher[0], watcher[1])


@pytest.mark.parametrize("route", ["test", "events"])
def test_head_of_a_stream_is_its_head_alone(srv, watcher, route):
    """HEAD gets the stream's status and headers, no content, and opens no stream."""
    user = unique_id("head")
    with StreamClient.open(srv, f"/{route}/{user}") as stream:
        sock = socket.create_connection((srv.host, srv.port), timeout=10)
        try:
            sock.sendall(f"HEAD /{route}/{user} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                         + PIPELINED[:-2] + b"Connection: close\r\n\r\n")
            out = b""
            while data := sock.recv(65536):
                out += data
        finally:
            sock.close()
        head, _, rest = out.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        assert (lines[0], stream.status_line) == ("HTTP/1.1 200 OK", "HTTP/1.1 200 OK")
        headers.pop("date"), stream.headers.pop("date")
        assert headers == stream.headers
        # no content: what follows is the answer to the pipelined GET /stats
        stats = _responses(rest)
        assert [s[0] for s in stats] == [200]
        assert json.loads(stats[0][2])["connections"] == 2  # the watcher and `stream`
    _still_serving(srv, watcher[0], watcher[1])


def _wakeups(pid: int) -> int:
    """Times the server's main thread went to sleep (in epoll_wait) so far."""
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


def test_streams_arriving_one_by_one_are_accepted_in_batches(srv):
    """A stream every 5 ms does not wake the server for each (ACCEPT_PAUSE, 20 ms),
    and each still gets its welcome, a few ms later at most."""
    n, gap = 40, 0.005
    socks = []
    before = _wakeups(srv.proc.pid)
    started = time.monotonic()
    try:
        for i in range(n):
            s = socket.create_connection((srv.host, srv.port), timeout=5)
            s.sendall(b"GET /test/%s HTTP/1.1\r\nHost: x\r\n\r\n" % unique_id("b").encode())
            socks.append(s)
            time.sleep(max(0.0, started + (i + 1) * gap - time.monotonic()))
        for s in socks:
            head = b""
            while b"Welcome" not in head:
                data = s.recv(4096)
                assert data, head
                head += data
        woken = _wakeups(srv.proc.pid) - before
    finally:
        for s in socks:
            s.close()
    # one wakeup a stream without batching; ~(40 x 5 ms) / 20 ms = 10 with it
    assert woken < n * 0.6, woken


def test_a_start_loads_neither_numpy_nor_pyjwt_until_it_needs_them(tmp_path):
    """A server start leaves out ~100 ms of imports: an edge never needs numpy,
    a server with no JWT key never needs PyJWT and cryptography. numpy comes
    with the first subscription write (PyJWT with a secret: the auth tests)."""
    def loaded(pid: int) -> set[str]:
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read()
        return {name for name in ("numpy", "cryptography") if f"/{name}/" in maps}

    srv = start_server(str(tmp_path / "db"), "--admin-port", "-1")
    try:
        assert loaded(srv.proc.pid) == set()
        assert http_json(srv, "POST", "/subscriptions", [["a", "b"]]) == (200, {"added": 1})
        assert loaded(srv.proc.pid) == {"numpy"}
    finally:
        srv.stop()


# -- in process: a resume is answered in the accept callback, as pywsgi answers it ---------


APP = "https://app.example"


@pytest.fixture
def local(tmp_path):
    """A single-process server in this process (pool mode, CORS for APP), over a real
    store and history: 3 messages kept a subject (and a few more), 10 a replay."""
    from cometd.cors import CorsPolicy
    from cometd.history import History
    from cometd.lifecycle import listener
    from cometd.router import Router
    from cometd.server import CometServer, LocalBackend
    from cometd.webapp import make_app

    store = SubscriptionStore(str(tmp_path / "db"))
    table = ConnectionTable("pool")
    router = Router(store, table, History(store.db, size=3))
    table.newest = router.history.last
    backend = LocalBackend(store, router, table, replay_max=10)
    server = CometServer(listener("127.0.0.1", 0), make_app(backend), table,
                         replay=backend.replay, cors=CorsPolicy([APP]))
    server.start()
    yield server, backend
    server.stop(timeout=1)
    table.close()
    store.close()


def test_a_resume_is_answered_in_the_accept_callback_byte_for_byte_as_pywsgi_would(local):
    server, backend = local
    router = backend.router
    me, friend = unique_id("me"), unique_id("f")
    backend.store.add_subscriptions([(me, friend)])
    first = router.send(me, b"m0").id
    sent = [router.send(friend, b"f%d" % i).id for i in range(2)]
    host, port = server.address[:2]
    origin = f"Origin: {APP}\r\n"
    cases = [  # (target, header lines, HTTP minor version)
        (f"/events/{me}", f"Last-Event-ID: {first}\r\n", 1),  # recovered, 2 replayed
        (f"/events/{me}", f"Last-Event-ID: {sent[-1]}\r\n{origin}", 1),  # nothing to replay
        (f"/events/{me}", "Last-Event-ID: not-an-id\r\n", 1),  # a gap event
        (f"/events/{me}?last_event_id={first}", origin, 0),  # raw SSE
        (f"/test/{me}?since={first}", "", 1),
        (f"/test/{me}?since=", "", 0),  # blank: malformed
        (f"/test/{me}?since={first}", "Last-Event-ID: 1-1\r\n", 1),  # not chunked's: ignored
    ]
    replays = []
    for i, (target, lines, minor) in enumerate(cases):
        # The same request both ways in: whole, and with an absolute-form target,
        # which the accept callback leaves to pywsgi.
        requests = [f"GET {via}{target} HTTP/1.{minor}\r\nHost: {host}\r\n{lines}\r\n".encode()
                    for via in ("", f"http://{host}:{port}")]
        handed = server._handed
        socks = []
        for request in requests:
            sock = gsocket.create_connection((host, port), timeout=5)
            sock.sendall(request)
            socks.append(sock)
        end = b"end %d" % i
        with gevent.Timeout(5):
            while backend.table.online(me) < 2:  # both held, their replays read
                gevent.sleep(0.005)
        router.send(me, end)
        got = []
        for sock in socks:
            data = b""
            while end not in data:
                more = sock.recv(65536)
                assert more, (target, data)
                data += more
            sock.close()
            # the only bytes that may differ: the Date and the drawn retry
            got.append(re.sub(rb"retry: \d+", b"retry: R",
                              re.sub(rb"Date: [^\r]*", b"Date: D", data)))
        assert got[0] == got[1], (target, got)
        assert got[0].startswith(b"HTTP/1.1 200 OK\r\n") and b"Cometd-Recovered: " in got[0]
        assert (b"Access-Control-Allow-Origin: " + APP.encode() in got[0]) == bool(origin in lines)
        # One of the two went to pywsgi, the whole one did not.
        assert server._handed == handed + 1, target
        replays.append(got[0])
    assert b"Cometd-Recovered: true" in replays[0] and b'"body": "f1"' in replays[0]
    assert b"event: gap" in replays[2] and b"malformed id" in replays[2]
    assert b"Cometd-Recovered: true" in replays[4] and b"\r\n2\r\nf1\r\n" in replays[4]
    assert b"Cometd-Recovered: false" in replays[5]


def test_a_resume_whose_replay_fails_is_closed_and_said_both_ways_in(local, caplog):
    server, backend = local
    me = unique_id("me")

    def failing(user: str, since: str):
        raise RuntimeError("the store went away")

    server._replay = failing  # the fault: the history read raises
    host, port = server.address[:2]
    for via in ("", f"http://{host}:{port}"):  # the accept callback's way, then pywsgi's
        sock = gsocket.create_connection((host, port), timeout=5)
        sock.sendall(f"GET {via}/events/{me} HTTP/1.1\r\nHost: {host}\r\n"
                     "Last-Event-ID: 1-1\r\n\r\n".encode())
        with gevent.Timeout(5):
            assert sock.recv(65536) == b""  # closed, not held for good
        sock.close()
    assert backend.table.online(me) == 0
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert said == ["a resume's replay failed (RuntimeError: the store went away); "
                    "the stream was closed"] * 2, said
