"""The HTTP interface against a real `bin/cometd`, in both connection modes, and in-process.

Streams (chunked, HTTP/1.0 raw, SSE), the id grammar, publishing limits, the
subscription API and `/stats`, and the seed's shell session end to end. One
server per mode, and one publishing through bottle (``--no-fast-publish``),
serves the whole module; every test uses its own user ids.
The in-process tests at the end call the bottle app of ``make_app`` through
WSGI over a fake backend, for each route's answers and errors.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import socket
import threading
import time
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from conftest import (
    VARIANTS,
    StreamClient,
    get_stats,
    http_json,
    http_request,
    send,
    start_server,
    unique_id,
    variant_args,
    wait_for,
)

from cometd.streamhttp import CHUNKED, RAW, SSE_CHUNKED, SSE_RAW
from cometd.webapp import MAX_MESSAGE_BYTES, STREAM_KEY, BackendUnavailable, make_app

KEEPALIVE = 0.3


@pytest.fixture(scope="module", params=VARIANTS)
def srv(request, tmp_path_factory):
    s = start_server(str(tmp_path_factory.mktemp("webapp") / "db"), *variant_args(request.param),
                     "--admin-port", "-1", "--keepalive", str(KEEPALIVE))
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def no_leftover_streams(request):
    # Streams of the previous test are gone before this one counts anything
    # (only for tests of the server: the in-process tests below start none).
    if "srv" in request.fixturenames:
        srv = request.getfixturevalue("srv")
        wait_for(lambda: get_stats(srv)["connections"] == 0, 5, what="no connections left")


def test_stream_head_and_welcome_chunk(srv):
    user = unique_id("u")
    with StreamClient.open(srv, f"/test/{user}") as c:
        assert c.status_line == "HTTP/1.1 200 OK"
        assert c.headers["content-type"] == "text/html; charset=utf-8"
        assert c.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in c.headers
        assert c.chunk() == f"Welcome, Url: '/test/{user}' Id: {user}\n".encode()


def test_integer_and_typed_ids_are_streams_too(srv):
    for user in ("123", "user:42", "a.b_c-d", "x" * 64):
        with StreamClient.open(srv, f"/test/{user}") as c:
            assert c.status == 200
            assert c.chunk() == f"Welcome, Url: '/test/{user}' Id: {user}\n".encode()


def test_each_message_is_one_chunk_with_the_exact_body(srv):
    user = unique_id("bin")
    bodies = [
        b"hello",
        b"x",
        b"line one\nline two\r\n\r\nafter a blank line\n",
        bytes(range(256)),
        b"0\r\n\r\n",  # looks like a last chunk: framing must not be confused by it
        "unicod\u00e9 \u2603".encode(),
        bytes((i * 7 + 3) % 256 for i in range(64 * 1024)),  # the largest message allowed
    ]
    with StreamClient.open(srv, f"/test/{user}") as c:
        c.chunk()  # welcome
        for body in bodies:
            assert send(srv, user, body) == 1
            assert c.chunk() == body


def test_http10_stream_is_unframed_and_ends_by_closing(srv):
    user = unique_id("old")
    c = StreamClient.open(srv, f"/test/{user}", http10=True)
    try:
        assert c.status_line.startswith("HTTP/1.0 200") or c.status_line.startswith("HTTP/1.1 200")
        assert "transfer-encoding" not in c.headers
        assert "content-length" not in c.headers
        welcome = f"Welcome, Url: '/test/{user}' Id: {user}\n".encode()
        assert c.read_raw(len(welcome)) == welcome
        payloads = [b"first\r\n", bytes(range(256)), b"3\r\nabc\r\n"]
        for body in payloads:
            assert send(srv, user, body) == 1
        expected = b"".join(payloads)
        assert c.read_raw(len(expected)) == expected  # no chunk framing around them
    finally:
        c.close()


def _sse_events(client: StreamClient, n: int, timeout: float = 10) -> tuple[list[dict], int]:
    """The next *n* SSE events (one per chunk), and how many keep-alives passed meanwhile."""
    events, keepalives = [], 0
    deadline = time.monotonic() + timeout
    while len(events) < n:
        text = client.chunk(max(deadline - time.monotonic(), 0.001)).decode()
        assert text.endswith("\n\n"), text
        if text.startswith(":"):
            keepalives += 1
            continue
        fields = dict(line.split(": ", 1) for line in text.strip("\n").split("\n"))
        events.append(fields)
    return events, keepalives


def test_sse_events_carry_id_sender_and_body(srv):
    user = unique_id("sse")
    sender = unique_id("from")
    http_json(srv, "POST", "/subscriptions", [[user, sender]])
    with StreamClient.open(srv, f"/events/{user}") as c:
        assert c.status == 200
        assert c.headers["content-type"].startswith("text/event-stream")
        assert c.headers["transfer-encoding"] == "chunked"
        # The welcome: a comment, a retry (the defaults: 1-5 s) and an id to resume from.
        welcome = re.fullmatch(rf": Welcome, Url: '/events/{user}' Id: {user}\n"
                               r"retry: (\d+)\nid: \d+-\d+\n\n", c.chunk().decode())
        assert welcome and 1000 <= int(welcome.group(1)) <= 5000
        bodies = ["plain", "two\nlines", 'quotes " and \\ and \u00e9']
        for body in bodies:
            assert send(srv, sender, body) == 1
        assert send(srv, user, "to myself") == 1
        events, _ = _sse_events(c, 4)
    assert [json.loads(e["data"]) for e in events] == (
        [{"from": sender, "body": b} for b in bodies] + [{"from": user, "body": "to myself"}])
    assert set(events[0]) == {"id", "data"}
    ids = [tuple(map(int, e["id"].split("-"))) for e in events]  # epoch-seq
    assert ids == sorted(set(ids)), ids


def test_a_body_that_is_not_utf8_is_raw_on_test_and_replaced_on_events(srv):
    # The README's promise: /test passes bytes through, SSE (text) shows each
    # invalid UTF-8 sequence as U+FFFD.
    user = unique_id("bytes")
    body = b"ok \xff\xfe caf\xc3\xa9 cut \xe2\x82"
    with StreamClient.open(srv, f"/test/{user}") as raw, \
            StreamClient.open(srv, f"/events/{user}") as sse:
        raw.chunk(), sse.chunk()  # welcomes
        assert send(srv, user, body) == 2
        assert raw.chunk() == body
        events, _ = _sse_events(sse, 1)
    assert json.loads(events[0]["data"]) == {
        "from": user, "body": "ok \ufffd\ufffd caf\u00e9 cut \ufffd"}


def test_sse_keepalive_comments_every_period(srv):
    user = unique_id("ka")
    with StreamClient.open(srv, f"/events/{user}") as c:
        c.chunk()  # welcome
        times = []
        for _ in range(3):
            assert c.chunk(timeout=10 * KEEPALIVE) == b": keepalive\n\n"
            times.append(time.monotonic())
        # one comment a period: the three span about two periods, not one burst
        assert times[2] - times[0] >= KEEPALIVE, times
        # plain streams get no keep-alives: their next chunk is the next message
        with StreamClient.open(srv, f"/test/{user}") as plain:
            plain.chunk()
            time.sleep(2 * KEEPALIVE)
            assert send(srv, user, "after the pause") == 2
            assert plain.chunk() == b"after the pause"


def test_sse_over_http10_is_unframed(srv):
    user = unique_id("sse10")
    c = StreamClient.open(srv, f"/events/{user}", http10=True)
    try:
        welcome = f": Welcome, Url: '/events/{user}' Id: {user}\nretry: ".encode()
        assert c.read_raw(len(welcome)) == welcome
        assert 1000 <= int(c.read_until(b"\n")) <= 5000
        assert re.fullmatch(rb"id: \d+-\d+\n\n", c.read_until(b"\n\n"))
        assert send(srv, user, "hi") == 1
        # skip keep-alives, then exactly one event: id line, data line, blank line
        while True:
            line = b""
            while not line.endswith(b"\n\n"):
                line += c.read_raw(1)
            if not line.startswith(b":"):
                break
        id_line, data_line = line.decode().strip("\n").split("\n")
        assert re.fullmatch(r"id: [0-9]+-[0-9]+", id_line), id_line
        assert json.loads(data_line[len("data: "):]) == {"from": user, "body": "hi"}
    finally:
        c.close()


@pytest.mark.parametrize("path", ["/test/", "/events/"])
def test_bad_stream_id_is_404_with_a_hint(srv, path):
    # /test keeps the seed's exact words; /events points at itself, not at /test
    hint = f"User id not found, try {path}123 instead".encode()
    for bad in ["a%20b", "x" * 65, "%C3%A9", "a%2Fb", "a/b", "", "semi%3Bcolon", "%00", "a*b"]:
        status, headers, body = http_request(srv, "GET", path + bad)
        assert (status, body) == (404, hint), bad
        assert headers["content-type"].startswith("text/plain")
    assert get_stats(srv)["connections"] == 0


def test_message_size_limit(srv):
    user = unique_id("big")
    with StreamClient.open(srv, f"/test/{user}") as c:
        c.chunk()
        status, answer = http_json(srv, "POST", f"/send/{user}", b"z" * (64 * 1024 + 1))
        assert status == 413 and "error" in answer
        status, answer = http_json(srv, "POST", f"/send/{user}", b"")
        assert status == 400 and "error" in answer
        status, answer = http_json(srv, "POST", "/send/bad%20subject", b"hello")
        assert status == 400 and "error" in answer
        limit = b"L" * (64 * 1024)
        assert send(srv, user, limit) == 1
        assert c.chunk() == limit  # the first message this stream saw: the rejected never came


def test_chunked_request_body_is_the_message(srv):
    user = unique_id("te")
    with StreamClient.open(srv, f"/test/{user}") as c:
        c.chunk()
        body = b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
        status, _, answer = http_request(
            srv, "POST", f"/send/{user}", body, headers={"Transfer-Encoding": "chunked"})
        assert (status, json.loads(answer)["delivered"]) == (200, 1)
        assert c.chunk() == b"hello, world"
        status, _, answer = http_request(
            srv, "POST", "/subscriptions", b"b\r\n[[\"x\",\"y\"]]\r\n0\r\n\r\n",
            headers={"Transfer-Encoding": "chunked"})
        assert (status, json.loads(answer)) == (200, {"added": 1})


def test_subscription_api(srv):
    a, b, c, s = (unique_id(p) for p in "abcs")
    status, answer = http_json(srv, "POST", "/subscriptions", [[c, s], [a, s], [b, s], [a, b]])
    assert (status, answer) == (200, {"added": 4})
    assert http_json(srv, "POST", "/subscriptions", [[a, s], [a, s]]) == (200, {"added": 0})
    assert http_json(srv, "GET", f"/subscribers/{s}") == (200, {"subscribers": sorted([a, b, c])})
    assert http_json(srv, "GET", f"/subscriptions/{a}") == (200, {"subscriptions": sorted([b, s])})
    assert http_json(srv, "GET", f"/subscribers/{a}") == (200, {"subscribers": []})
    assert http_json(srv, "DELETE", "/subscriptions", [[b, s], [b, s], [a, c]]) == (
        200, {"removed": 1})
    assert http_json(srv, "GET", f"/subscribers/{s}") == (200, {"subscribers": sorted([a, c])})
    assert http_json(srv, "GET", f"/subscriptions/{b}") == (200, {"subscriptions": []})
    # integer ids sort numerically, before names
    n = unique_id("n")
    http_json(srv, "POST", "/subscriptions", [["10", n], ["9", n], [a, n], [100, n]])
    assert http_json(srv, "GET", f"/subscribers/{n}") == (
        200, {"subscribers": ["9", "10", "100", a]})


@pytest.mark.parametrize("method", ["POST", "DELETE"])
def test_bad_subscription_requests_change_nothing(srv, method):
    a, s = unique_id("a"), unique_id("s")
    http_json(srv, "POST", "/subscriptions", [[a, s]])
    before = {"subscribers": [a]}
    fresh = unique_id("fresh")
    for body in [
        b"[[",
        b"\xff\xfe",
        b"not json",
        json.dumps({"pairs": [[a, s]]}).encode(),
        json.dumps([[fresh, s], [a]]).encode(),
        json.dumps([[fresh, s], [a, s, "x"]]).encode(),
        json.dumps([[fresh, s], "ab"]).encode(),
        json.dumps([[fresh, s], [a, s], [a, "bad id"]]).encode(),
        json.dumps([[fresh, s], [None, s]]).encode(),
        json.dumps([[fresh, s], [a, "x" * 65]]).encode(),
        json.dumps([[fresh, s], [True, s]]).encode(),
        json.dumps([[fresh, s], [-1, s]]).encode(),
    ]:
        status, answer = http_json(srv, method, "/subscriptions", body)
        assert status == 400, (body, answer)
        assert set(answer) == {"error"} and "Traceback" not in answer["error"]
        assert http_json(srv, "GET", f"/subscribers/{s}") == (200, before), body
        assert http_json(srv, "GET", f"/subscriptions/{fresh}") == (200, {"subscriptions": []})
    for path in ["/subscribers/bad%20id", "/subscriptions/" + "x" * 65]:
        status, answer = http_json(srv, "GET", path)
        assert status == 400 and set(answer) == {"error"}


def test_self_subscription_is_refused_and_changes_nothing(srv):
    a, fresh = unique_id("a"), unique_id("fresh")
    for pair in ([a, a], [7, "7"]):
        status, answer = http_json(srv, "POST", "/subscriptions", [[fresh, a], pair])
        assert status == 400, answer
        assert answer["error"].startswith("item 1: ") and "cannot subscribe to itself" in (
            answer["error"])
    assert http_json(srv, "GET", f"/subscriptions/{fresh}") == (200, {"subscriptions": []})
    assert http_json(srv, "GET", f"/subscribers/{a}") == (200, {"subscribers": []})
    # Removing one is allowed (nothing to remove here): a stored self-loop can be cleaned up.
    assert http_json(srv, "DELETE", "/subscriptions", [[a, a]]) == (200, {"removed": 0})


def test_stats_counts_what_happened(srv):
    user = unique_id("st")
    before = get_stats(srv)
    for key in ("connections", "users_online", "messages_sent", "deliveries",
                "slow_consumers_dropped", "rss_bytes"):
        assert isinstance(before[key], int), key
    assert before["rss_bytes"] > 10 * 1024 * 1024
    with StreamClient.open(srv, f"/test/{user}") as c1, \
            StreamClient.open(srv, f"/events/{user}") as c2:
        c1.chunk(), c2.chunk()
        now = get_stats(srv)
        assert (now["connections"], now["users_online"]) == (2, 1)
        assert send(srv, user, "one") == 2
        assert send(srv, unique_id("nobody"), "two") == 0
        after = get_stats(srv)
    assert after["messages_sent"] - before["messages_sent"] == 2
    assert after["deliveries"] - before["deliveries"] == 2
    assert after["slow_consumers_dropped"] == before["slow_consumers_dropped"]


def test_seed_shell_session(srv):
    """The seed README's curl session: rj, alice and bob."""
    alice, bob, rj, charlie = (unique_id(n) for n in ("alice", "bob", "rj", "charlie"))
    assert http_json(srv, "POST", "/subscriptions", [[alice, rj], [bob, rj]]) == (
        200, {"added": 2})
    assert http_json(srv, "GET", f"/subscribers/{rj}") == (
        200, {"subscribers": sorted([alice, bob])})
    assert http_json(srv, "DELETE", "/subscriptions", [[bob, rj]]) == (200, {"removed": 1})
    assert http_json(srv, "GET", f"/subscribers/{rj}") == (200, {"subscribers": [alice]})
    assert send(srv, rj, "while alice is away") == 0
    with StreamClient.open(srv, f"/test/{alice}") as c, \
            StreamClient.open(srv, f"/test/{bob}") as other:
        assert c.chunk() == f"Welcome, Url: '/test/{alice}' Id: {alice}\n".encode()
        other.chunk()
        assert send(srv, rj, "hello alice") == 1
        assert c.chunk() == b"hello alice"  # the message sent while she was away is gone
        assert send(srv, bob, "bob's own") == 1
        assert other.chunk() == b"bob's own"  # bob, unsubscribed, never saw "hello alice"
    assert http_json(srv, "GET", f"/subscribers/{charlie}") == (200, {"subscribers": []})


def test_a_body_that_arrives_slowly_stays_with_its_request(srv):
    """While one request's body trickles in, others are served, and bodies never mix."""
    slow_user, quick_user = unique_id("slowbody"), unique_id("quick")
    with StreamClient.open(srv, f"/test/{slow_user}") as slow_stream, \
            StreamClient.open(srv, f"/test/{quick_user}") as quick_stream:
        slow_stream.chunk(), quick_stream.chunk()
        slow_body, quick_body = b"S" * 6000 + b"-slow-end", b"quick request body"
        sock = socket.create_connection((srv.host, srv.port), timeout=10)
        try:
            sock.sendall(b"POST /send/%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                         % (slow_user.encode(), len(slow_body), slow_body[:3000]))
            get_stats(srv)  # a round trip: the server is now waiting for the rest
            assert send(srv, quick_user, quick_body) == 1
            sock.sendall(slow_body[3000:])
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert (response.status, json.loads(response.read())["delivered"]) == (200, 1)
        finally:
            sock.close()
        assert quick_stream.chunk() == quick_body
        assert slow_stream.chunk() == slow_body


def test_concurrent_publishers_each_deliver_their_own_bodies(srv):
    users = [unique_id("pub") for _ in range(6)]
    streams = [StreamClient.open(srv, f"/test/{u}") for u in users]
    try:
        for c in streams:
            c.chunk()
        sizes = [60000, 30000, 9000, 3, 17, 1]
        results: list = []

        def publish(i: int) -> None:
            for k in range(15):
                body = (b"%d:%d:" % (i, k)).ljust(sizes[i], b"%c" % (97 + i))
                status, answer = http_json(srv, "POST", f"/send/{users[i]}", body)
                results.append((i, k, status, answer))

        threads = [threading.Thread(target=publish, args=(i,)) for i in range(len(users))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r[2] == 200 and r[3]["delivered"] == 1 for r in results), [
            r for r in results if r[2] != 200 or r[3].get("delivered") != 1]
        for i, c in enumerate(streams):
            assert c.chunks(15) == [(b"%d:%d:" % (i, k)).ljust(sizes[i], b"%c" % (97 + i))
                                    for k in range(15)]
    finally:
        for c in streams:
            c.close()


# -- in-process: the bottle app through WSGI, over a fake backend ----------------------


class FakeBackend:
    """The app's backend as a fake (pure logic): fixed answers, every call recorded.

    With *error* set, every call raises it instead.
    """

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[tuple[Any, ...]] = []

    def _call(self, *call: Any) -> None:
        self.calls.append(call)
        if self.error is not None:
            raise self.error

    def send(self, subject: str, body: bytes) -> tuple[int, str]:
        self._call("send", subject, body)
        return 3, "2-9"

    def send_batch(self, messages: list[tuple[str, bytes]]) -> list[tuple[int, str]]:
        self._call("send_batch", messages)
        return [(i, f"2-{i}") for i in range(len(messages))]

    def subscribers(self, user: str) -> list[str]:
        self._call("subscribers", user)
        return ["1", "bob"]

    def subscriptions(self, user: str) -> list[str]:
        self._call("subscriptions", user)
        return ["carol"]

    def add(self, pairs: list[tuple[str, str]]) -> int:
        self._call("add", pairs)
        return len(pairs)

    def remove(self, pairs: list[tuple[str, str]]) -> int:
        self._call("remove", pairs)
        return 1

    def stats(self) -> dict[str, Any]:
        self._call("stats")
        return {"connections": 2, "mode": "pool"}


class BrokenInput(io.BytesIO):
    """A request body whose client went away mid-read (pywsgi raises OSError)."""

    def read(self, size: int = -1) -> bytes:
        raise OSError("client gone")


def call_app(backend, method: str, path: str, body: bytes = b"",
             headers: dict[str, str] | None = None, protocol: str = "HTTP/1.1",
             wsgi_input: io.BytesIO | None = None) -> tuple[int, dict[str, str], bytes, dict]:
    """One WSGI call of ``make_app(backend)``: (status, headers, body, environ)."""
    path, _, query = path.partition("?")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
        "SERVER_PROTOCOL": protocol,
        "wsgi.input": wsgi_input or io.BytesIO(body), "wsgi.errors": io.StringIO(),
    }
    if body and "Transfer-Encoding" not in (headers or {}):
        environ["CONTENT_LENGTH"] = str(len(body))
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        environ[key if key in ("CONTENT_LENGTH", "CONTENT_TYPE") else "HTTP_" + key] = value
    setup_testing_defaults(environ)
    answer: list[Any] = []
    app = make_app(backend)
    data = b"".join(app(environ, lambda status, hdrs, exc=None: answer.extend((status, hdrs))))
    status, hdrs = answer
    return int(status.split()[0]), {k.lower(): v for k, v in hdrs}, data, environ


def json_answer(status: int, headers: dict[str, str], data: bytes) -> tuple[int, Any]:
    assert headers["content-type"] == "application/json", (status, headers, data)
    return status, json.loads(data)


@pytest.mark.parametrize("path, protocol, stream", [
    # (user, kind, path, expiry: no token, since: no resume)
    ("/test/42", "HTTP/1.1", ("42", CHUNKED, "/test/42", None, None)),
    ("/test/42", "HTTP/1.0", ("42", RAW, "/test/42", None, None)),
    ("/events/user:7", "HTTP/1.1", ("user:7", SSE_CHUNKED, "/events/user:7", None, None)),
    ("/events/a.b-c_d", "HTTP/1.0", ("a.b-c_d", SSE_RAW, "/events/a.b-c_d", None, None)),
    # resumes: since= on /test, last_event_id= on /events (since= there is not one)
    ("/test/42?since=1-5", "HTTP/1.1", ("42", CHUNKED, "/test/42", None, "1-5")),
    ("/test/42?since=", "HTTP/1.1", ("42", CHUNKED, "/test/42", None, "")),
    ("/events/u?last_event_id=2-1", "HTTP/1.1", ("u", SSE_CHUNKED, "/events/u", None, "2-1")),
    ("/events/u?since=2-1", "HTTP/1.1", ("u", SSE_CHUNKED, "/events/u", None, None)),
])
def test_a_stream_route_hands_the_stream_to_the_server(path, protocol, stream):
    backend = FakeBackend()
    status, _, body, environ = call_app(backend, "GET", path, protocol=protocol)
    assert (status, body, environ[STREAM_KEY]) == (200, b"", stream)
    assert backend.calls == []


def test_an_sse_stream_resumes_from_its_last_event_id_header_first():
    _, _, _, environ = call_app(FakeBackend(), "GET", "/events/u?last_event_id=1-1",
                                headers={"Last-Event-ID": "3-4"})
    assert environ[STREAM_KEY][4] == "3-4"
    _, _, _, environ = call_app(FakeBackend(), "GET", "/events/u", headers={"Last-Event-ID": ""})
    assert environ[STREAM_KEY][4] is None  # empty: EventSource has no id yet
    _, _, _, environ = call_app(FakeBackend(), "GET", "/test/u", headers={"Last-Event-ID": "3-4"})
    assert environ[STREAM_KEY][4] is None  # /test resumes with ?since= only


@pytest.mark.parametrize("path", ["/test/", "/test/a/b", "/test/a b", "/test/" + "x" * 65,
                                  "/events/", "/events/x y"])
def test_a_bad_stream_id_is_404_with_the_seeds_hint(path):
    status, headers, body, environ = call_app(FakeBackend(), "GET", path)
    route = "/events/" if path.startswith("/events/") else "/test/"
    assert (status, body) == (404, f"User id not found, try {route}123 instead".encode())
    assert headers["content-type"].startswith("text/plain")
    assert STREAM_KEY not in environ


@pytest.mark.parametrize("headers, body", [
    ({}, b"hello"),
    ({"Transfer-Encoding": "chunked"}, b""),
])
def test_a_stream_request_with_a_body_is_400(headers, body):
    status, hdrs, data, environ = call_app(FakeBackend(), "GET", "/test/42", body, headers)
    assert json_answer(status, hdrs, data) == (400, {"error": "a stream request has no body"})
    assert STREAM_KEY not in environ


def test_send_publishes_the_body_and_answers_the_count():
    backend = FakeBackend()
    body = bytes(range(256)) * (MAX_MESSAGE_BYTES // 256)  # any bytes, up to the limit
    status, headers, data, _ = call_app(backend, "POST", "/send/user:7", body)
    assert json_answer(status, headers, data) == (200, {"delivered": 3, "id": "2-9"})
    assert backend.calls == [("send", "user:7", body)]


@pytest.mark.parametrize("path, body, headers, wsgi_input, answer", [
    ("/send/a b", b"x", {}, None, (400, "invalid id 'a b'")),
    ("/send/" + "x" * 65, b"x", {}, None, (400, "invalid id")),
    ("/send/s", b"", {}, None, (400, "empty message")),
    ("/send/s", b"x" * (MAX_MESSAGE_BYTES + 1), {}, None, (413, "over 65536 bytes")),
    # no Content-Length (a chunked body): the limit holds on what is read
    ("/send/s", b"x" * (MAX_MESSAGE_BYTES + 1), {"Transfer-Encoding": "chunked"}, None,
     (413, "over 65536 bytes")),
    ("/send/s", b"x", {}, BrokenInput(), (400, "incomplete request body")),
])
def test_a_bad_send_is_refused_and_sends_nothing(path, body, headers, wsgi_input, answer):
    backend = FakeBackend()
    status, hdrs, data, _ = call_app(backend, "POST", path, body, headers, wsgi_input=wsgi_input)
    code, error = json_answer(status, hdrs, data)
    assert code == answer[0] and answer[1] in error["error"], (code, error)
    assert backend.calls == []


@pytest.mark.parametrize("route", ["subscribers", "subscriptions"])
def test_lookups_answer_the_backends_list_and_refuse_bad_ids(route):
    backend = FakeBackend()
    status, headers, data, _ = call_app(backend, "GET", f"/{route}/007")
    expected = {"subscribers": ["1", "bob"], "subscriptions": ["carol"]}[route]
    assert json_answer(status, headers, data) == (200, {route: expected})
    assert backend.calls == [(route, "007")]  # "007" is a name, passed on as it is

    status, headers, data, _ = call_app(backend, "GET", f"/{route}/a b")
    assert json_answer(status, headers, data)[0] == 400
    assert len(backend.calls) == 1


def test_subscription_changes_pass_checked_pairs():
    backend = FakeBackend()
    pairs = json.dumps([["alice", "bob"], [1, 2], ["user:7", "007"]]).encode()
    status, headers, data, _ = call_app(backend, "POST", "/subscriptions", pairs)
    assert json_answer(status, headers, data) == (200, {"added": 3})
    status, headers, data, _ = call_app(backend, "DELETE", "/subscriptions", pairs)
    assert json_answer(status, headers, data) == (200, {"removed": 1})
    checked = [("alice", "bob"), ("1", "2"), ("user:7", "007")]
    assert backend.calls == [("add", checked), ("remove", checked)]


@pytest.mark.parametrize("method, body, problem", [
    ("POST", b"[[1, 2]", "body is not JSON"),
    ("POST", b"\xff", "body is not JSON"),
    ("POST", b'{"1": 2}', "body must be a JSON list"),
    ("POST", b"[[1, 2], [3]]", "item 1 is not a [subscriber, subscribee] pair"),
    ("POST", b'[[1, 2], "ab"]', "item 1 is not a [subscriber, subscribee] pair"),
    ("POST", b'[[1, 2], ["a b", 3]]', "item 1: invalid id 'a b'"),
    ("POST", b'[[1, 2], [true, 3]]', "item 1: invalid id True"),
    ("POST", b"[[1, 2], [5, 5]]", "item 1:"),  # everyone already gets their own messages
    ("DELETE", b"[[1, 2], [-1, 3]]", "item 1: invalid id -1"),
    ("DELETE", b"[1]", "item 0 is not a [subscriber, subscribee] pair"),
])
def test_a_bad_subscription_change_is_refused_whole(method, body, problem):
    backend = FakeBackend()
    status, headers, data, _ = call_app(backend, method, "/subscriptions", body)
    code, error = json_answer(status, headers, data)
    assert code == 400 and error["error"].startswith(problem), error
    assert backend.calls == []  # not even the good pairs before the bad one


def test_publish_passes_the_checked_batch_and_answers_each():
    backend = FakeBackend()
    body = b'{"from": "a", "body": "x"}\n\n{"from": "b", "body": "\xc3\xa9"}'
    status, headers, data, _ = call_app(backend, "POST", "/publish", body)
    assert json_answer(status, headers, data) == (
        200, {"results": [{"delivered": 0, "id": "2-0"}, {"delivered": 1, "id": "2-1"}]})
    assert backend.calls == [("send_batch", [("a", b"x"), ("b", "é".encode())])]


def test_stats_are_the_backends():
    status, headers, data, _ = call_app(FakeBackend(), "GET", "/stats")
    assert json_answer(status, headers, data) == (200, {"connections": 2, "mode": "pool"})


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/send/s", b"x"),
    ("POST", "/publish", b'{"from": "s", "body": "x"}\n'),
    ("GET", "/subscribers/s", b""),
    ("GET", "/subscriptions/s", b""),
    ("POST", "/subscriptions", b"[[1, 2]]"),
    ("DELETE", "/subscriptions", b"[[1, 2]]"),
    ("GET", "/stats", b""),
])
def test_every_route_answers_503_when_the_backend_is_unavailable(method, path, body):
    backend = FakeBackend(BackendUnavailable("the router is not reachable; try again"))
    status, headers, data, _ = call_app(backend, method, path, body)
    assert json_answer(status, headers, data) == (
        503, {"error": "the router is not reachable; try again"})
    assert len(backend.calls) == 1


def test_an_unexpected_error_is_a_500_without_a_traceback():
    backend = FakeBackend(RuntimeError("secret-detail at /srv/cometd/store.py"))
    status, headers, data, environ = call_app(backend, "POST", "/send/s", b"x")
    assert json_answer(status, headers, data) == (500, {"error": "internal error"})
    assert b"secret-detail" not in data and b"Traceback" not in data
    assert "secret-detail" in environ["wsgi.errors"].getvalue()  # it goes to the log instead


@pytest.mark.parametrize("method, path, answer", [
    ("GET", "/nowhere", (404, "not found")),
    ("GET", "/send/s", (405, "method not allowed")),
    ("PUT", "/subscriptions", (405, "method not allowed")),
    ("POST", "/stats", (405, "method not allowed")),
])
def test_unknown_routes_and_methods_get_short_json_errors(method, path, answer):
    backend = FakeBackend()
    status, headers, data, _ = call_app(backend, method, path)
    assert json_answer(status, headers, data) == (answer[0], {"error": answer[1]})
    assert backend.calls == []
