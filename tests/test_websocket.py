"""WebSocket streams, ``GET /ws/<id>``: frames, the upgrade and its refusals, client frames.

The fast tier checks the frames cometd builds against wsproto's client-side
parser and the handshake rules; the system tests run real servers in both
connection modes (and one ``--workers`` case) against raw sockets and the
``websockets`` client library.
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import random
import signal
import socket
import struct
import threading
import time
from contextlib import ExitStack

import pytest
from browser import needs_chromium
from conftest import get_stats, http_request, send, start_server, unique_id, wait_for
from test_auth import KEY, SECRET, token
from test_backplane import admin
from test_cors import browser_run
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionType
from wsproto.events import CloseConnection, Message, Ping, Pong, TextMessage

from cometd.auth import LEEWAY
from cometd.connections import MODES
from cometd.history import Replay, format_id
from cometd.streamhttp import WEBSOCKET, sse_event
from cometd.streamhttp import Message as CometMessage
from cometd.websocket import (
    CLOSE_CODES,
    CLOSE_FRAMES,
    MAX_CLIENT_MESSAGE,
    PING,
    HandshakeError,
    _whole_pong,
    accept_response,
    check_handshake,
    close_frame,
    frame,
    message_frame,
    resumed_frames,
    welcome_frame,
)

# -- the fast tier: frames and handshake rules --------------------------------------


def client_events(data: bytes) -> list:
    """What a client's wsproto makes of server bytes *data*."""
    client = WsConnection(ConnectionType.CLIENT)
    client.receive_data(data)
    return list(client.events())


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_server_frames_parse_as_one_unmasked_final_frame(size):
    payload = bytes(random.Random(size).choices(range(32, 127), k=size))
    data = frame(0x1, payload)
    (event,) = client_events(data)
    assert isinstance(event, TextMessage) and event.message_finished
    assert event.data == payload.decode()
    assert data[1] & 0x80 == 0  # server frames are never masked
    header = {0: 2, 125: 2, 126: 4, 65535: 4}.get(size, 2 if size < 126 else 10)
    assert len(data) == header + size  # the shortest length encoding


def test_a_message_frame_is_the_sse_data_plus_the_id_built_once_per_message():
    key = (7 << 64) | 42
    message = CometMessage("alice", "h\u00e9llo \xff".encode("latin-1"), key)
    first = message.frame(WEBSOCKET)
    assert message.frame(WEBSOCKET) is first  # one bytes object for every WebSocket
    (event,) = client_events(first)
    sse = sse_event(key, "alice", message.body)
    sse_data = json.loads(sse.split(b"data: ", 1)[1])
    assert json.loads(event.data) == {"id": format_id(key), **sse_data}
    assert first == message_frame(key, "alice", message.body)


def test_close_frames_carry_each_reasons_code():
    for reason, (code, text) in CLOSE_CODES.items():
        (event,) = client_events(CLOSE_FRAMES[reason])
        assert isinstance(event, CloseConnection), reason
        assert (event.code, event.reason) == (code, text)
    (event,) = client_events(close_frame(1000, "x" * 300))
    assert event.code == 1000 and len(event.reason) == 123  # a control frame's limit
    (event,) = client_events(PING)
    assert isinstance(event, Ping) and event.payload == b""


def test_welcome_and_resumed_frames_say_whether_the_replay_is_complete():
    (event,) = client_events(welcome_frame("/ws/a", 0))
    assert json.loads(event.data) == {"welcome": "/ws/a"}
    key = (1 << 64) | 5
    ok = Replay([(key, "a", b"m1"), (key + 1, "b", b"m2")], True, "", key + 1)
    events = client_events(resumed_frames("/ws/a", format_id(key - 1), ok))
    assert [json.loads(e.data) for e in events] == [
        {"welcome": "/ws/a", "id": format_id(key + 1), "recovered": True},
        {"id": format_id(key), "from": "a", "body": "m1"},
        {"id": format_id(key + 1), "from": "b", "body": "m2"},
    ]
    lost = Replay([], False, "the id predates the history", key)
    (event,) = client_events(resumed_frames("/ws/a", "x" * 500, lost))
    assert json.loads(event.data) == {"welcome": "/ws/a", "id": format_id(key),
                                      "recovered": False, "last_event_id": "x" * 100,
                                      "reason": "the id predates the history"}


def handshake_environ(**changes) -> dict:
    environ = {"REQUEST_METHOD": "GET", "SERVER_PROTOCOL": "HTTP/1.1",
               "HTTP_UPGRADE": "WebSocket", "HTTP_CONNECTION": "keep-alive, Upgrade",
               "HTTP_SEC_WEBSOCKET_VERSION": "13",
               "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ=="}
    environ.update(changes)
    return {k: v for k, v in environ.items() if v is not None}


@pytest.mark.parametrize("changes, message", [
    ({"REQUEST_METHOD": "HEAD"}, "a GET over HTTP/1.1"),
    ({"SERVER_PROTOCOL": "HTTP/1.0"}, "a GET over HTTP/1.1"),
    ({"HTTP_UPGRADE": None}, "not a WebSocket handshake"),
    ({"HTTP_UPGRADE": "h2c"}, "not a WebSocket handshake"),
    ({"HTTP_CONNECTION": "keep-alive"}, "not a WebSocket handshake"),
    ({"HTTP_SEC_WEBSOCKET_VERSION": "8"}, "unsupported Sec-WebSocket-Version"),
    ({"HTTP_SEC_WEBSOCKET_VERSION": None}, "unsupported Sec-WebSocket-Version"),
    ({"HTTP_SEC_WEBSOCKET_KEY": None}, "missing or malformed Sec-WebSocket-Key"),
    ({"HTTP_SEC_WEBSOCKET_KEY": "c2hvcnQ="}, "missing or malformed Sec-WebSocket-Key"),
    ({"HTTP_SEC_WEBSOCKET_KEY": "not base64 at all!!!!!!="}, "missing or malformed"),
])
def test_handshakes_that_are_refused(changes, message):
    with pytest.raises(HandshakeError, match=message):
        check_handshake(handshake_environ(**changes))


def test_the_accept_token_is_rfc_6455s_example():
    key = check_handshake(handshake_environ())
    head = accept_response(key)
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n") and head.endswith(b"\r\n\r\n")
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head


def test_only_a_whole_masked_pong_skips_the_parser():
    client = WsConnection(ConnectionType.CLIENT)
    assert _whole_pong(client.send(Pong(b"")))
    assert _whole_pong(client.send(Pong(b"abc")))
    assert not _whole_pong(client.send(Pong(b"abc"))[:-1])  # cut short
    assert not _whole_pong(client.send(Pong(b"")) + client.send(Ping(b"")))  # more after it
    assert not _whole_pong(client.send(Ping(b"")))
    assert not _whole_pong(b"\x8a\x00")  # unmasked: the parser refuses it
    assert not _whole_pong(b"\x8a\x00" * 3)  # three unmasked, six bytes like a masked one


# -- system tests -------------------------------------------------------------------


class RawWebSocket:
    """A WebSocket client on a plain socket: the test says exactly which bytes go out."""

    def __init__(self, srv, path: str, headers: dict[str, str] | None = None,
                 rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect((srv.host, srv.port))
        fields = {"Host": f"{srv.host}:{srv.port}", "Upgrade": "websocket",
                  "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                  "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}
        fields.update(headers or {})
        request = f"GET {path} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in fields.items() if v is not None) + "\r\n"
        self.sock.sendall(request.encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = self.sock.recv(65536)
            if not data:
                break
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1]) if lines[0] else 0
        self.headers = {k.lower(): v.strip() for k, _, v in (
            line.partition(":") for line in lines[1:])}
        self.body = rest
        self.parser = WsConnection(ConnectionType.CLIENT)
        self.events: list = []
        if self.status == 101:
            self.parser.receive_data(rest)
        else:
            length = int(self.headers.get("content-length", 0))
            while len(self.body) < length:
                self.body += self.sock.recv(65536)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_event(self, timeout: float = 5):
        """The next event from the server; None once the socket is closed."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.parser.events():
                self.events.append(event)
            if self.events:
                return self.events.pop(0)
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return None
            self.parser.receive_data(data)

    def past_pings(self, timeout: float = 5):
        """The next event that is not one of the server's keep-alive pings (answered)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = self.next_event(deadline - time.monotonic())
            if not isinstance(event, Ping) or event.payload:
                return event
            self.send(self.parser.send(Pong(b"")))
        raise AssertionError("only keep-alive pings within the timeout")

    def json(self) -> dict:
        event = self.next_event()
        assert isinstance(event, TextMessage), event
        return json.loads(event.data)

    def closed_with(self, timeout: float = 10) -> int | None:
        """The code of the server's close frame, after which the server ends the connection."""
        code = None
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, "the server did not end the connection"
            event = self.next_event(deadline - time.monotonic())
            if event is None:
                return code
            if isinstance(event, CloseConnection):
                code = event.code

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module", params=MODES)
def srv(request, tmp_path_factory):
    """A server per mode: keep-alive pings every 0.3 s, small pending output, 2 streams an id."""
    s = start_server(str(tmp_path_factory.mktemp("ws") / "db"), "--mode", request.param,
                     "--keepalive", "0.3", "--max-pending", str(64 * 1024),
                     "--max-streams-per-user", "2")
    yield s
    s.stop()
    assert "Traceback" not in "".join(s.output), "".join(s.output)


def ws_url(srv, path: str) -> str:
    return f"ws://{srv.host}:{srv.port}{path}"


def test_websockets_client_gets_welcome_messages_and_resumes(srv):
    user = unique_id("ws")
    with connect(ws_url(srv, f"/ws/{user}"), ping_interval=None) as ws:
        welcome = json.loads(ws.recv(timeout=5))
        assert welcome["welcome"] == f"/ws/{user}"
        assert send(srv, user, "hello") == 1
        first = json.loads(ws.recv(timeout=5))
        assert first["from"] == user and first["body"] == "hello"
        assert send(srv, user, b"caf\xc3\xa9") == 1
        second = json.loads(ws.recv(timeout=5))
        assert second["body"] == "caf\u00e9"
        ws.ping(b"mine").wait(timeout=5)  # a client's ping is answered
    assert send(srv, user, "missed") == 0
    with connect(ws_url(srv, f"/ws/{user}?since={first['id']}"), ping_interval=None) as ws:
        head = json.loads(ws.recv(timeout=5))
        assert head["recovered"] is True, head
        assert [json.loads(ws.recv(timeout=5))["body"] for _ in range(2)] == ["caf\u00e9",
                                                                              "missed"]
        assert send(srv, user, "live") == 1
        assert json.loads(ws.recv(timeout=5))["body"] == "live"
    with connect(ws_url(srv, f"/ws/{user}?since=bogus"), ping_interval=None) as ws:
        head = json.loads(ws.recv(timeout=5))
        assert head["recovered"] is False and head["last_event_id"] == "bogus", head
        assert head["reason"]


@pytest.mark.parametrize("headers, status", [
    ({"Sec-WebSocket-Key": None}, 400),
    ({"Sec-WebSocket-Version": "8"}, 400),
    ({"Upgrade": None, "Connection": None}, 400),
])
def test_handshake_errors_are_400_before_any_upgrade(srv, headers, status):
    c = RawWebSocket(srv, f"/ws/{unique_id('hs')}", headers)
    try:
        assert c.status == status, c.body
        assert c.headers["sec-websocket-version"] == "13"
        assert "error" in json.loads(c.body)
        assert c.sock.recv(10) == b""  # and the connection is closed
    finally:
        c.close()


def test_bad_id_is_404_and_the_limits_refuse_before_the_upgrade(srv):
    c = RawWebSocket(srv, "/ws/a%2Fb")
    assert c.status == 404 and b"/ws/123" in c.body
    c.close()
    user = unique_id("lim")
    kept = [RawWebSocket(srv, f"/ws/{user}") for _ in range(2)]
    try:
        assert [k.status for k in kept] == [101, 101]
        over = RawWebSocket(srv, f"/ws/{user}")
        assert over.status == 429 and over.headers["retry-after"]
        over.close()
    finally:
        for k in kept:
            k.close()


def test_client_frames_ping_pong_close_and_data_ignored(srv):
    c = RawWebSocket(srv, f"/ws/{unique_id('frames')}")
    client = c.parser
    try:
        assert c.status == 101 and "welcome" in c.json()
        c.send(client.send(Ping(b"are you there")))
        event = c.past_pings()
        assert isinstance(event, Pong) and event.payload == b"are you there", event
        # data is ignored, fragmented or not; the connection stays
        c.send(client.send(Message(data="ignored", message_finished=False)))
        c.send(client.send(Message(data=" too")))
        c.send(client.send(Message(data=b"\x00\x01")))
        c.send(client.send(Ping(b"still")))
        event = c.past_pings()
        assert isinstance(event, Pong) and event.payload == b"still", event
        c.send(client.send(CloseConnection(code=1000, reason="bye")))
        assert c.closed_with() == 1000
    finally:
        c.close()


def test_keepalive_pings_and_answering_pongs_keep_the_stream(srv):
    user = unique_id("ka")
    c = RawWebSocket(srv, f"/ws/{user}")
    try:
        c.json()
        for _ in range(3):
            event = c.next_event(timeout=3)
            assert isinstance(event, Ping), event
            c.send(c.parser.send(Pong(b"")))
        assert send(srv, user, "after pings") == 1
        assert json.loads(c.past_pings().data)["body"] == "after pings"
    finally:
        c.close()


def masked(first_byte: int, payload: bytes, length: int | None = None) -> bytes:
    """A client frame with header byte *first_byte*, masked, optionally lying about its length."""
    n = len(payload) if length is None else length
    mask = os.urandom(4)
    if n < 126:
        head = bytes((first_byte, 0x80 | n))
    elif n < 0x10000:
        head = struct.pack("!BBH", first_byte, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first_byte, 0x80 | 127, n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_unmasked_oversized_and_malformed_client_frames_are_closed(srv):
    cases = [
        (bytes((0x89, 0)), 1002),  # an unmasked ping: clients must mask (RFC 6455 5.1)
        (b"\x8a\x00" * 3, 1002),  # unmasked pongs, as long as a masked one
        (masked(0x81, b"x" * (MAX_CLIENT_MESSAGE + 1)), 1009),
        (masked(0x81, b"\xff\xfe"), 1007),  # text that is not UTF-8
        (masked(0x83, b""), 1002),  # a reserved opcode
    ]
    for data, code in cases:
        c = RawWebSocket(srv, f"/ws/{unique_id('bad')}")
        try:
            c.json()
            c.send(data)
            assert c.closed_with() == code, data[:4]
        finally:
            c.close()


def garbage_frame(rng: random.Random) -> bytes:
    """A client frame broken in one of the ways RFC 6455 forbids, chosen by *rng*."""
    payload = rng.randbytes(rng.randrange(0, 200))
    way = rng.randrange(6)
    if way == 0:  # a reserved opcode
        return masked(0x80 | rng.choice([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]), payload)
    if way == 1:  # reserved bits set (no extension was agreed)
        return masked(0x80 | rng.choice([0x40, 0x20, 0x10]) | rng.choice([1, 2, 9]), payload)
    if way == 2:  # unmasked
        return bytes((rng.choice([0x81, 0x82, 0x89]), len(payload) % 126)) + payload[:125]
    if way == 3:  # a control frame too long or fragmented
        return masked(rng.choice([0x89, 0x8A, 0x88]), payload + b"x" * 126) if rng.random() < .5 \
            else masked(rng.choice([0x09, 0x0A]), payload[:10])
    if way == 4:  # a continuation with nothing to continue
        return masked(0x80, payload)
    return masked(0x81, b"\xc3\x28" + payload)  # invalid UTF-8 in a text frame


def test_200_garbage_frames_are_each_closed_and_the_server_lives_on(srv):
    rng = random.Random(15)
    codes = set()
    for i in range(200):
        c = RawWebSocket(srv, f"/ws/garbage{i}-{os.getpid()}")
        try:
            assert c.status == 101
            c.send(garbage_frame(rng))
            code = c.closed_with()
            assert code in (1002, 1007, 1009), code
            codes.add(code)
        finally:
            c.close()
    assert codes >= {1002, 1007}
    user = unique_id("alive")
    with connect(ws_url(srv, f"/ws/{user}"), ping_interval=None) as ws:
        ws.recv(timeout=5)
        assert send(srv, user, "still here") == 1
        assert json.loads(ws.recv(timeout=5))["body"] == "still here"


def test_a_client_that_never_reads_is_dropped_and_counted(srv):
    user = unique_id("slow")
    before = get_stats(srv)["slow_consumers_dropped"]
    c = RawWebSocket(srv, f"/ws/{user}", rcvbuf=4096)
    try:
        assert c.status == 101
        body = b"y" * 60_000
        deadline = time.monotonic() + 20
        for _ in range(400):
            if send(srv, user, body) == 0 or time.monotonic() > deadline:
                break
        assert send(srv, user, body) == 0, "a client that never reads is still fed"
        # Read at once, within the second the server gives the frame under
        # way and the close after it.
        assert c.closed_with() == 4000
        wait_for(lambda: get_stats(srv)["slow_consumers_dropped"] > before, 5,
                 what="the drop counted")
    finally:
        c.close()


def test_kick_closes_with_4001_and_metrics_count_ws(srv):
    user = unique_id("kick")
    c = RawWebSocket(srv, f"/ws/{user}")
    try:
        c.json()
        status, _, text = http_request(srv, "GET", "/metrics")
        line = next(t for t in text.decode().splitlines()
                    if t.startswith('cometd_connections{') and 'transport="ws"' in t)
        assert float(line.rsplit(" ", 1)[1]) >= 1, line
        assert admin(srv.admin_port, f"kick {user}") == ["OK kicked 1"]
        assert c.closed_with() == 4001
    finally:
        c.close()


@pytest.mark.parametrize("mode", MODES)
def test_tokens_origin_expiry_and_drain(tmp_path, mode):
    s = start_server(str(tmp_path / "db"), "--mode", mode, "--jwt-secret", SECRET,
                     "--api-key", KEY, "--cors-origin", "https://app.example",
                     "--drain-seconds", "0.2")
    try:
        user = unique_id("tok")
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url(s, f"/ws/{user}"))
        assert refused.value.response.status_code == 401
        bad = RawWebSocket(s, f"/ws/{user}?token={token('someone-else')}")
        assert bad.status == 403 and b"another user" in bad.body
        other = RawWebSocket(s, f"/ws/{user}?token={token(user)}",
                             {"Origin": "https://evil.example"})
        assert other.status == 403 and b"origin" in other.body
        expiring = RawWebSocket(s, f"/ws/{user}?token={token(user, ttl=1 - LEEWAY)}",
                                {"Origin": "https://app.example"})
        assert expiring.status == 101
        assert expiring.closed_with() == 1008  # token expired
        with connect(ws_url(s, f"/ws/{user}?token={token(user)}"), ping_interval=None) as kept:
            kept.recv(timeout=5)
            s.proc.send_signal(signal.SIGTERM)  # a drain: 1013, try again later
            with pytest.raises(ConnectionClosed):
                kept.recv(timeout=10)
            assert kept.close_code == 1013
        assert s.proc.wait(10) == 0
    finally:
        s.stop()
    assert "Traceback" not in "".join(s.output)
    assert token(user) not in "".join(s.output)


def test_workers_stream_websockets_from_the_edges(tmp_path, redis_server):
    s = start_server(str(tmp_path / "db"), "--workers", "2", "--redis", redis_server.url,
                     timeout=40)
    stack = ExitStack()
    try:
        user = unique_id("edge")
        socks = [stack.enter_context(connect(ws_url(s, f"/ws/{user}"), ping_interval=None))
                 for _ in range(2)]
        for ws in socks:
            ws.recv(timeout=5)
        # The two sockets may be on different edges, each reporting on its own:
        # wait for the router to count both, not for the first report.
        wait_for(lambda: get_stats(s)["connections"] >= 2, 5, what="the router hearing both")
        delivered = send(s, user, "via the router")
        assert delivered == 2
        first = [json.loads(ws.recv(timeout=5)) for ws in socks]
        assert {m["body"] for m in first} == {"via the router"}
        stack.close()
        send(s, user, "while away")
        with connect(ws_url(s, f"/ws/{user}?since={first[0]['id']}"), ping_interval=None) as ws:
            assert json.loads(ws.recv(timeout=5))["recovered"] is True
            assert json.loads(ws.recv(timeout=5))["body"] == "while away"
    finally:
        stack.close()
        s.stop()
    assert "Traceback" not in "".join(s.output)



# -- a real browser -----------------------------------------------------------------

BROWSER_PAGE = """<!doctype html><html><body><pre id="out">pending</pre><script>
const cometd = location.hash.slice(1);
let finished = false;
function finish(result) {
  if (finished) return;
  finished = true;
  document.getElementById("out").textContent = JSON.stringify(result);
}
const ws = new WebSocket(cometd.replace(/^http/, "ws") + "/ws/b1");
ws.onmessage = ev => {
  const m = JSON.parse(ev.data);
  if ("welcome" in m) fetch(cometd + "/send/b1", {method: "POST", body: "hi"});
  else { ws.close(); finish({from: m.from, body: m.body, id: typeof m.id}); }
};
ws.onclose = () => finish({closed: true});
</script></body></html>
"""


@needs_chromium
def test_a_websocket_opened_by_a_page_receives_a_message_if_its_origin_is_allowed(driver,
                                                                                  tmp_path):
    (tmp_path / "page.html").write_text(BROWSER_PAGE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    pages = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{pages.server_port}"  # another port: another origin
    try:
        for allowed_origin, expected in (
                (origin, {"from": "b1", "body": "hi", "id": "string"}),
                ("http://127.0.0.1:1", {"closed": True})):
            srv = start_server(str(tmp_path / "db"), "--cors-origin", allowed_origin)
            try:
                got = browser_run(driver, f"{origin}/page.html#{srv.url}")
            finally:
                srv.stop()
            assert got == expected, allowed_origin
    finally:
        pages.shutdown()
        pages.server_close()
