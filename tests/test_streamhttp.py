"""The stream protocol: the request parser, stream heads, message framing, and
both ways into a stream.

The parser decides which requests the accept callback answers itself; the
server tests check that a request it declines (split over two sends, an
absolute-form target) gets the very same stream from pywsgi and bottle. The
framing tests run in-process: bytes in, bytes out.
"""

from __future__ import annotations

import json
import re
import socket
import time

import pytest
from conftest import StreamClient, get_stats, send, start_server, unique_id, wait_for

from cometd.connections import MODES
from cometd.streamhttp import (
    CHUNKED,
    KEEPALIVE,
    LAST_CHUNK,
    RAW,
    SSE_CHUNKED,
    SSE_RAW,
    Message,
    frame_bytes,
    parse_stream_request,
    stream_head,
    stream_kind,
)


@pytest.mark.parametrize("request_bytes, expected", [
    (b"GET /test/42 HTTP/1.1\r\nHost: x\r\n\r\n", ("42", CHUNKED, "/test/42", None)),
    (b"GET /test/42 HTTP/1.0\r\n\r\n", ("42", RAW, "/test/42", None)),
    (b"GET /events/user:7 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
     ("user:7", SSE_CHUNKED, "/events/user:7", None)),
    (b"GET /events/a.b-c_d HTTP/1.0\r\nX: \r\n\r\n", ("a.b-c_d", SSE_RAW, "/events/a.b-c_d", None)),
    (b"GET /test/42?seen=3&x=%20 HTTP/1.1\r\nhOsT: x\r\n\r\n", ("42", CHUNKED, "/test/42", None)),
    # What follows the header block is the client's business, not the request's.
    (b"GET /test/42 HTTP/1.1\r\nHost: x\r\n\r\nGET /stats HTTP/1.1\r\n\r\n",
     ("42", CHUNKED, "/test/42", None)),
    (b"GET /test/42 HTTP/1.1\r\nHost: x\r\nX-Content-Length: 5\r\nX: a\tb\xe9\r\n\r\n",
     ("42", CHUNKED, "/test/42", None)),
])
def test_plain_stream_requests_are_recognised(request_bytes, expected):
    assert parse_stream_request(request_bytes) == expected


@pytest.mark.parametrize("request_bytes", [
    b"GET /test/42 HTTP/1.1\r\nHost: x\r\n",  # header block not complete yet
    b"GET /test/42 HTT",  # request line not complete yet
    b"",
    b"HEAD /test/42 HTTP/1.1\r\n\r\n",
    b"POST /test/42 HTTP/1.1\r\n\r\n",
    b"GET /test/ HTTP/1.1\r\n\r\n",  # no id: bottle answers 404 with a hint
    b"GET /test/a%20b HTTP/1.1\r\n\r\n",  # escapes: bottle decodes them
    b"GET /test/a/b HTTP/1.1\r\n\r\n",
    b"GET /test/" + b"x" * 65 + b" HTTP/1.1\r\n\r\n",  # id over 64 characters
    b"GET /test/42 HTTP/2.0\r\n\r\n",
    b"GET /test/42 HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
    b"GET /test/42 HTTP/1.1\r\nno colon\r\n\r\n",
    b"GET /test/42 HTTP/1.1\r\n: empty name\r\n\r\n",
    b"GET /test/42 HTTP/1.1\nHost: x\n\n",  # bare LF: pywsgi's call
    b"GET /stats HTTP/1.1\r\n\r\n",
    b"GET http://x/test/42 HTTP/1.1\r\nHost: x\r\n\r\n",
    # pywsgi judges a body, and a missing or doubled Host
    b"GET /test/42 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"GET /test/42 HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\r\n",
    b"GET /test/42 HTTP/1.1\r\n\r\n",
    b"GET /test/42 HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    b"GET /test/42 HTTP/1.0\r\nHost: x\r\nHost: y\r\n\r\n",
    # the header grammar is pywsgi's: token names, no control characters in values
    b"GET /test/42 HTTP/1.1\r\nHost: x\r\nX(y): 1\r\n\r\n",
    b"GET /test/42 HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    b"GET /test/42 HTTP/1.1\r\nHost: x\r\nHost : x\r\n\r\n",
    # two Last-Event-IDs: pywsgi joins them, and the web app reads that
    b"GET /events/42 HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 1-5\r\nlast-event-id: 1-6\r\n\r\n",
])
def test_everything_else_goes_to_pywsgi(request_bytes):
    assert parse_stream_request(request_bytes) is None


@pytest.mark.parametrize("target, fields, since", [
    ("/test/42?since=1-5", "", "1-5"),
    ("/test/42?x=1&since=", "", ""),  # blank: a malformed id, answered as one
    ("/test/42?since=1-5&since=1-7", "", "1-7"),  # the last one, as parse_qs has it
    ("/test/42?si%6Ece=1-5", "", "1-5"),  # parse_qs decodes the name
    ("/test/42?last_event_id=1-5", "Last-Event-ID: 1-6\r\n", None),  # chunked: since only
    ("/test/42?seen=1", "", None),
    ("/events/42?last_event_id=1-5", "", "1-5"),
    ("/events/42?since=1-5", "", None),
    ("/events/42?last_event_id=1-5", "last-Event-ID:  1-6 \r\n", "1-6"),  # the header first
    ("/events/42?last_event_id=1-5", "Last-Event-ID:\r\n", "1-5"),  # empty: none
    ("/events/42", "Last-Event-ID: x\xe9y\r\n", "x\xe9y"),  # as pywsgi decodes it
])
def test_resumes_are_recognised_where_the_web_app_finds_them(target, fields, since):
    request = f"GET {target} HTTP/1.1\r\nHost: x\r\n{fields}\r\n".encode("latin-1")
    user, _, path, got = parse_stream_request(request)
    assert (user, path, got) == ("42", target.partition("?")[0], since)


def test_stream_kinds():
    assert [stream_kind(sse, http10) for sse in (False, True) for http10 in (False, True)] == [
        CHUNKED, RAW, SSE_CHUNKED, SSE_RAW]


def test_stream_heads():
    chunked = stream_head("42", CHUNKED, "/test/42")
    head, _, body = chunked.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n")
    assert b"\r\nTransfer-Encoding: chunked\r\nDate: " in head
    assert body == b"20\r\nWelcome, Url: '/test/42' Id: 42\n\r\n"

    raw = stream_head("42", SSE_RAW, "/events/42", retry=(2500, 2500))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n" in head
    assert b"Connection: close" in head and b"Transfer-Encoding" not in head
    assert body == b": Welcome, Url: '/events/42' Id: 42\nretry: 2500\n\n"


def test_each_sse_stream_gets_its_own_retry_within_the_range():
    retries = [int(stream_head("42", SSE_CHUNKED, "/events/42", retry=(1000, 5000))
                   .split(b"retry: ")[1].split(b"\n")[0]) for _ in range(200)]
    assert all(1000 <= r <= 5000 for r in retries) and len(set(retries)) > 100
    assert b"retry:" not in stream_head("42", CHUNKED, "/test/42", retry=(1000, 5000))
    # With a message key, the welcome also says where to resume from.
    assert stream_head("42", SSE_RAW, "/events/42", retry=(1, 1), last=3 << 64 | 7).endswith(
        b"retry: 1\nid: 3-7\n\n")
    assert b"id:" not in stream_head("42", CHUNKED, "/test/42", last=3 << 64 | 7)


def _sse_fields(event: bytes) -> tuple[str, dict]:
    """(id, data as JSON) of one SSE event, which must end its only blank line."""
    assert event.endswith(b"\n\n") and event.count(b"\n\n") == 1, event
    lines = event[:-2].split(b"\n")
    assert [line.split(b":")[0] for line in lines] == [b"id", b"data"], event
    return lines[0][4:].decode(), json.loads(lines[1][6:])


def test_a_message_is_framed_for_every_kind():
    message = Message("user:7", b"ts=1;seq=2;\n", 3 << 64 | 9)
    assert message.frame(RAW) == b"ts=1;seq=2;\n"
    assert message.frame(CHUNKED) == b"c\r\nts=1;seq=2;\n\r\n"
    event = message.frame(SSE_RAW)
    assert _sse_fields(event) == ("3-9", {"from": "user:7", "body": "ts=1;seq=2;\n"})
    assert message.frame(SSE_CHUNKED) == b"%x\r\n%s\r\n" % (len(event), event)


def test_each_kind_is_framed_once_and_shared():
    # The same bytes object goes to every stream of a kind (Message.frame is per delivery).
    message = Message("1", b"hello")
    for kind in (CHUNKED, RAW, SSE_CHUNKED, SSE_RAW):
        assert message.frame(kind) is message.frame(kind)


@pytest.mark.parametrize("body, text", [
    (b"one\n\ndata: forged\n\nid: 1", "one\n\ndata: forged\n\nid: 1"),  # no injected event
    (b"\r\n0\r\n\r\n", "\r\n0\r\n\r\n"),  # chunk framing in a body is data
    ("h\u00e9 \"q\" \\".encode(), "h\u00e9 \"q\" \\"),
    (b"\xff\xfeok", "\ufffd\ufffdok"),  # not UTF-8: replaced, the event is still sent
])
def test_an_sse_event_carries_any_body_as_one_event(body, text):
    message = Message("a.b", body, 1 << 64 | 5)
    assert _sse_fields(message.frame(SSE_RAW)) == ("1-5", {"from": "a.b", "body": text})
    assert message.frame(RAW) == body  # /test streams get the bytes as they are


def test_keepalive_and_last_chunk_framing():
    assert frame_bytes(SSE_CHUNKED, KEEPALIVE) == b"d\r\n: keepalive\n\n\r\n"
    assert frame_bytes(SSE_RAW, KEEPALIVE) == KEEPALIVE
    assert frame_bytes(CHUNKED, b"x" * 300) == b"12c\r\n" + b"x" * 300 + b"\r\n"
    # An SSE comment is a line starting with a colon; the last chunk has size 0, no trailers.
    assert KEEPALIVE.startswith(b":") and KEEPALIVE.endswith(b"\n\n")
    assert LAST_CHUNK == b"0\r\n\r\n"


# -- both ways into a stream, on a real server ------------------------------------------


@pytest.fixture(scope="module", params=MODES)
def srv(request, tmp_path_factory):
    s = start_server(str(tmp_path_factory.mktemp("streamhttp") / "db"), "--mode", request.param,
                     "--admin-port", "-1")
    yield s
    s.stop()


def _open(srv, parts: list[bytes]) -> StreamClient:
    sock = socket.create_connection((srv.host, srv.port), timeout=10)
    for i, part in enumerate(parts):
        if i:
            time.sleep(0.05)  # the first part is all the accept callback sees
        sock.sendall(part)
    return StreamClient(sock)


def _same_head(a: StreamClient, b: StreamClient) -> None:
    assert a.status_line == b.status_line == "HTTP/1.1 200 OK"
    assert {k: v for k, v in a.headers.items() if k != "date"} == {
        k: v for k, v in b.headers.items() if k != "date"}


@pytest.mark.parametrize("path, version", [
    ("/test/{}", "1.1"), ("/test/{}", "1.0"), ("/events/{}", "1.1"), ("/events/{}", "1.0")])
def test_a_declined_request_gets_the_same_stream(srv, path, version):
    user = unique_id("both")
    target = path.format(user)
    whole = f"GET {target} HTTP/{version}\r\nHost: x\r\n\r\n".encode()
    split = [whole[:9], whole[9:]]
    absolute = [f"GET http://x{target}?q=1 HTTP/{version}\r\nHost: x\r\n\r\n".encode()]
    streams = [_open(srv, [whole]), _open(srv, split), _open(srv, absolute)]
    try:
        for other in streams[1:]:
            _same_head(streams[0], other)
        wait_for(lambda: send(srv, user, "ping") == 3, 5, what="all three streams online")
        firsts = []
        for c in streams:
            if c.chunked:
                firsts.append(c.chunk())
                assert b"ping" in c.chunk()
            else:
                firsts.append(c.read_until(b"\n\n" if "events" in path else b"\n"))
                assert c.read_until(b"ping")
        # The same welcome, but for each stream's own SSE retry (see stream_head).
        firsts = [re.sub(rb"retry: \d+\n", b"retry: N\n", first) for first in firsts]
        assert firsts[0] == firsts[1] == firsts[2]
        assert f"Url: '{target}' Id: {user}".encode() in firsts[0]
    finally:
        for c in streams:
            c.close()
    wait_for(lambda: get_stats(srv)["connections"] == 0, 5, what="streams closed")


def test_the_configured_retry_reaches_both_ways_into_a_stream(tmp_path):
    s = start_server(str(tmp_path / "db"), "--admin-port", "-1", "--sse-retry-min", "2.5",
                     "--sse-retry-max", "2.5")
    try:
        for path in ("/events/r", "/events/r?last_event_id=1-0", "/events/r?x=%20"):
            with StreamClient.open(s, path) as c:
                assert b"\nretry: 2500\nid: " in c.chunk(), path
    finally:
        s.stop()
