"""Long polling, ``GET /poll/<id>`` (cometd.longpoll).

In-process: the query's parse and its errors, which requests the accept
callback takes, the answer's JSON (the last id found in the entries,
``reason`` only when not recovered), the poll frame of a message, and (a
real table and socket, a stand-in server) messages routed while a replay is
read, answered once. Against real servers in both connection modes: an immediate
answer from the history, wait and wake, the timeout, successive polls across
concurrent publishing from two subjects (none lost, none twice), bad input,
keep-alive (the accept callback and pywsgi alike on one connection), a
client that leaves, a few hundred concurrent polls woken by one message; with
auth, CORS and a per-user limit: 401/403, both token carriers, the wait cut
at the token's expiry, the CORS headers, 429, a kept connection closed after
the request timeout; a drain answers a waiting poll; and through
``--workers`` with Redis, the same seam via the router's replay.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time

import gevent
import pytest
from conftest import http_json, http_request, start_cometd, start_server, unique_id, wait_for

from cometd.auth import LEEWAY, mint
from cometd.connections import MODES, ConnectionTable
from cometd.history import Replay
from cometd.longpoll import (
    DEFAULT_TIMEOUT,
    PollError,
    PollRequest,
    answer_body,
    answer_response,
    open_poll,
    parse_poll_query,
    parse_poll_request,
)
from cometd.streamhttp import POLL, Message

SECRET = "poll-secret-" + "x" * 20
KEY = "poll-api-key-1234567890"
ORIGIN = "https://app.example"

# -- in-process ----------------------------------------------------------------


def test_query_defaults_and_values():
    assert parse_poll_query("") == (None, DEFAULT_TIMEOUT)
    assert parse_poll_query("since=3-17&timeout=0.5") == ("3-17", 0.5)
    assert parse_poll_query("since=&timeout=60") == (None, 60.0)  # an empty since is none
    assert parse_poll_query("timeout=5&timeout=0&token=abc") == (None, 0.0)  # the last counts


@pytest.mark.parametrize("query, message", [
    ("since=bad", "since must be a message id"),
    ("since=1-2-3", "since must be a message id"),
    ("timeout=61", "timeout must be a number of seconds from 0 to 60"),
    ("timeout=60.001", "timeout must be"),
    ("timeout=-1", "timeout must be"),
    ("timeout=abc", "timeout must be"),
    ("timeout=", "timeout must be"),
    ("timeout=1e3", "timeout must be"),
])
def test_bad_query_is_a_clear_error(query, message):
    with pytest.raises(PollError, match=message):
        parse_poll_query(query)


def test_answer_takes_its_last_id_from_the_entries():
    # A body that looks like an entry's start cannot fool it: JSON escapes its quotes.
    tricky = b'{"id": "9-9"} and more'
    entries = b"".join(Message(s, b, k).frame(POLL) for s, b, k in (
        ("alice", b"hi", 1 << 64 | 5), ("bob", tricky, 1 << 64 | 7)))
    answer = json.loads(answer_body(entries, "1-1", True))
    assert answer == {"messages": [{"id": "1-5", "from": "alice", "body": "hi"},
                                   {"id": "1-7", "from": "bob", "body": tricky.decode()}],
                      "last_event_id": "1-7", "recovered": True}
    assert json.loads(answer_body(b"", "2-0", False, "unknown id")) == {
        "messages": [], "last_event_id": "2-0", "recovered": False, "reason": "unknown id"}
    assert json.loads(answer_body(b"", None, True)) == {
        "messages": [], "last_event_id": None, "recovered": True}


def test_plain_poll_requests_are_recognised_and_others_left_to_pywsgi():
    get = b"GET /poll/alice?since=1-2&timeout=5 HTTP/1.1\r\nHost: x\r\n"
    assert parse_poll_request(get + b"\r\n") == ("alice", "since=1-2&timeout=5", True)
    assert parse_poll_request(get + b"Connection: keep-alive\r\n\r\n")[2] is True
    assert parse_poll_request(get + b"connection: Close\r\n\r\n")[2] is False
    assert parse_poll_request(b"GET /poll/bob HTTP/1.0\r\n\r\n") == ("bob", "", False)
    for other in (get,  # incomplete
                  get + b"Content-Length: 0\r\n\r\n", get + b"Host: y\r\n\r\n",
                  get + b"Connection: close\r\nConnection: close\r\n\r\n",
                  b"GET /poll/a%20b HTTP/1.1\r\nHost: x\r\n\r\n",
                  b"GET /poll/alice HTTP/1.1\r\n\r\n",  # no Host
                  b"HEAD /poll/alice HTTP/1.1\r\nHost: x\r\n\r\n",
                  b"GET /polls/alice HTTP/1.1\r\nHost: x\r\n\r\n"):
        assert parse_poll_request(other) is None, other


class OneServer:
    """What open_poll asks of its server; the replay routes two messages while it is read."""

    closed = False
    request_timeout = 5.0

    def __init__(self, table: ConnectionTable, head: int) -> None:
        self.table = table
        self.head = head

    def replay(self, user: str, since: str) -> Replay:
        # Routed while the history is read: one it has (at its head), one after it.
        self.table.deliver([user], Message(user, b"two", self.head))
        self.table.deliver([user], Message(user, b"three", self.head + 1))
        return Replay([(self.head - 1, user, b"one"), (self.head, user, b"two")], True, "",
                      self.head)


@pytest.mark.parametrize("mode", MODES)
def test_messages_routed_while_the_replay_is_read_are_answered_once(mode):
    epoch = 1 << 64
    table = ConnectionTable(mode)
    ours, theirs = socket.socketpair()
    try:
        open_poll(OneServer(table, epoch | 2), ours, ("127.0.0.1", 1),
                  PollRequest("alice", "1-0", 5.0, None), "", False)
        gevent.sleep(0.05)  # the answer is written at the end of the loop turn
        theirs.settimeout(5)
        head, answer = read_answer(theirs)
        assert head.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in head
        assert [m["id"] for m in answer["messages"]] == ["1-1", "1-2", "1-3"]
        assert answer["last_event_id"] == "1-3" and table.connections == 0
    finally:
        theirs.close()
        table.close()


def test_poll_frame_is_built_once_and_replaces_bad_utf8():
    message = Message("alice", b"caf\xe9", 1 << 64 | 3)
    frame = message.frame(POLL)
    assert frame is message.frame(POLL) and frame.endswith(b",")
    assert json.loads(frame[:-1]) == {"id": "1-3", "from": "alice", "body": "caf\ufffd"}


def test_response_says_whether_the_connection_stays():
    kept = answer_response(200, b"{}", "Vary: Origin\r\n", keep=True)
    closed = answer_response(200, b"{}")
    assert kept.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nVary: Origin\r\n" in kept
    assert b"Connection: close" not in kept and b"\r\nConnection: close\r\n" in closed
    assert b"\r\nContent-Length: 2\r\n" in kept and b"\r\nContent-Type: application/json" in kept
    assert kept.endswith(b"\r\n\r\n{}")


# -- real servers -------------------------------------------------------------------


def poll(srv, path: str, headers: dict[str, str] | None = None,
         timeout: float = 30) -> tuple[int, dict[str, str], dict]:
    status, head, data = http_request(srv, "GET", path, headers=headers, timeout=timeout)
    assert head.get("content-type") == "application/json", (status, head, data)
    return status, head, json.loads(data)


def send(srv, subject: str, body: str, headers: dict[str, str] | None = None) -> str:
    status, head, data = http_request(srv, "POST", f"/send/{subject}", body.encode(),
                                      headers=headers)
    assert status == 200, data
    return json.loads(data)["id"]


def connections(srv, transport: str = "poll") -> int:
    status, _, data = http_request(srv, "GET", "/metrics", headers={"X-API-Key": KEY})
    for line in data.decode().splitlines():
        if line.startswith("cometd_connections{") and f'transport="{transport}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    raise AssertionError("no cometd_connections for " + transport)


class Poller(threading.Thread):
    """One poll in a thread; its answer (status, headers, JSON) in ``answer``."""

    def __init__(self, srv, path: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.srv, self.path, self.headers = srv, path, headers
        self.answer: tuple[int, dict[str, str], dict] | None = None
        self.elapsed = 0.0
        self.start()

    def run(self) -> None:
        started = time.monotonic()
        self.answer = poll(self.srv, self.path, self.headers)
        self.elapsed = time.monotonic() - started

    def result(self, timeout: float = 10) -> tuple[int, dict[str, str], dict]:
        self.join(timeout)
        assert self.answer is not None, "the poll was not answered"
        return self.answer


@pytest.fixture(scope="module", params=MODES)
def srv(request, tmp_path_factory):
    s = start_server(str(tmp_path_factory.mktemp("poll") / "db"), "--mode", request.param,
                     "--admin-port", "-1")
    yield s
    s.stop()
    assert "Traceback" not in "".join(s.output)


def test_answers_at_once_from_the_history(srv):
    me = unique_id("now")
    first = send(srv, me, "one")
    second, third = send(srv, me, "two"), send(srv, me, "thr\u00e9e")
    started = time.monotonic()
    status, head, answer = poll(srv, f"/poll/{me}?since={first}&timeout=20")
    assert time.monotonic() - started < 2
    assert status == 200 and head["cache-control"] == "no-store"
    assert answer == {"messages": [{"id": second, "from": me, "body": "two"},
                                   {"id": third, "from": me, "body": "thr\u00e9e"}],
                      "last_event_id": third, "recovered": True}


def test_waits_for_the_next_message_then_times_out(srv):
    me = unique_id("wait")
    before = send(srv, me, "old")  # before the poll: not in its answer
    waiting = Poller(srv, f"/poll/{me}?timeout=20")
    wait_for(lambda: connections(srv) >= 1, 5, what="the poll waiting")
    time.sleep(0.2)
    assert waiting.answer is None
    sent = send(srv, me, "new")
    status, _, answer = waiting.result()
    assert status == 200 and waiting.elapsed < 10
    assert answer == {"messages": [{"id": sent, "from": me, "body": "new"}],
                      "last_event_id": sent, "recovered": True}
    assert before != sent
    started = time.monotonic()
    status, _, answer = poll(srv, f"/poll/{me}?since={sent}&timeout=0.6")
    assert 0.55 < time.monotonic() - started < 5
    assert answer == {"messages": [], "last_event_id": answer["last_event_id"],
                      "recovered": True}
    # The empty answer's id is where it started: nothing after it is skipped.
    later = send(srv, me, "later")
    _, _, answer2 = poll(srv, f"/poll/{me}?since={answer['last_event_id']}&timeout=5")
    assert [m["id"] for m in answer2["messages"]] == [later]


def test_successive_polls_lose_nothing_and_repeat_nothing(srv):
    me, friend = unique_id("seam"), unique_id("friend")
    status, _ = http_json(srv, "POST", "/subscriptions", [[me, friend]])
    assert status == 200
    start = send(srv, me, "start")
    sent: list[str] = []

    def publish() -> None:
        for i in range(40):
            sent.append(send(srv, friend if i % 2 else me, f"m{i}"))
            time.sleep(0.01 if i % 5 else 0.06)

    publisher = threading.Thread(target=publish)
    publisher.start()
    got: list[str] = []
    since = start
    deadline = time.monotonic() + 30
    answers = batched = 0
    while (publisher.is_alive() or len(got) < 40) and time.monotonic() < deadline:
        status, _, answer = poll(srv, f"/poll/{me}?since={since}&timeout=2")
        assert status == 200 and answer["recovered"], answer
        got.extend(m["id"] for m in answer["messages"])
        batched += len(answer["messages"]) > 1
        since = answer["last_event_id"]
        answers += 1
        if answers % 3 == 0:
            time.sleep(0.05)  # messages pile up in the history meanwhile
    publisher.join()
    assert got == sent, (got, sent)
    assert answers > 2 and batched  # several polls, some answered with several messages


def test_bad_requests_are_clear_400s_and_change_nothing(srv):
    me = unique_id("bad")
    for query, words in (("since=nope", "since must be"), ("timeout=61", "timeout must be"),
                         ("timeout=x", "timeout must be")):
        status, head, answer = poll(srv, f"/poll/{me}?{query}")
        assert status == 400 and words in answer["error"], answer
    status, _, answer = poll(srv, "/poll/no%20such")
    assert status == 400 and "invalid id" in answer["error"], answer
    status, head, data = http_request(srv, "HEAD", f"/poll/{me}")
    assert status == 405 and head["allow"] == "GET"
    status, _, data = http_request(srv, "GET", f"/poll/{me}?timeout=0", b"x")
    assert status == 400 and b"no body" in data
    status, _, data = http_request(srv, "POST", f"/poll/{me}", b"x")
    assert status == 405
    assert connections(srv) == 0


def test_keeps_the_connection_for_the_next_request(srv):
    me = unique_id("keep")
    first = send(srv, me, "a")
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    try:
        conn.request("GET", f"/poll/{me}?timeout=0.2")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Connection") is None
        json.loads(resp.read())
        sock = conn.sock
        conn.request("GET", f"/poll/{me}?since={first}&timeout=0.3")  # the same socket
        resp = conn.getresponse()
        assert conn.sock is sock and json.loads(resp.read())["messages"] == []
    finally:
        conn.close()
    with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
        sock.sendall(f"GET /poll/{me}?timeout=0 HTTP/1.1\r\nHost: x\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):  # to the end: the server closes it
            data += chunk
        assert b"\r\nConnection: close\r\n" in data and data.endswith(b"}")


def read_answer(sock: socket.socket) -> tuple[bytes, dict]:
    """One whole poll answer from *sock*: (head, JSON body)."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            if len(body) >= length:
                return head, json.loads(body[:length])
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk


def test_accept_callback_and_pywsgi_answer_alike_on_one_connection(srv):
    # Each answer leaves the connection open; the next request is whole (taken
    # at once, as in the accept callback) or split in two (pywsgi and bottle).
    me = unique_id("ways")
    first = send(srv, me, "one")
    second = send(srv, me, "two")
    with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
        answers = []
        for split in (False, True, False, True):
            request = (f"GET /poll/{me}?since={first}&timeout=5 HTTP/1.1\r\n"
                       "Host: x\r\n\r\n").encode()
            if split:
                sock.sendall(request[:12])
                time.sleep(0.05)
                sock.sendall(request[12:])
            else:
                sock.sendall(request)
            head, answer = read_answer(sock)
            assert head.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" not in head
            answers.append(answer)
    assert answers == [{"messages": [{"id": second, "from": me, "body": "two"}],
                        "last_event_id": second, "recovered": True}] * 4


def test_a_client_that_leaves_is_forgotten(srv):
    me = unique_id("gone")
    sock = socket.create_connection((srv.host, srv.port))
    sock.sendall(f"GET /poll/{me}?timeout=30 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    wait_for(lambda: connections(srv) == 1, 5, what="the poll waiting")
    sock.close()
    wait_for(lambda: connections(srv) == 0, 5, what="the poll forgotten")


def test_hundreds_of_concurrent_polls_woken_by_one_message(srv):
    n = 300
    boss = unique_id("boss")
    users = [unique_id(f"c{i}") for i in range(n)]
    status, _ = http_json(srv, "POST", "/subscriptions", [[u, boss] for u in users])
    assert status == 200
    socks = []
    try:
        for u in users:
            s = socket.create_connection((srv.host, srv.port), timeout=20)
            s.sendall(f"GET /poll/{u}?timeout=30 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            socks.append(s)
        wait_for(lambda: connections(srv) == n, 20, interval=0.1, what="all polls waiting")
        sent = send(srv, boss, "to all")
        for s in socks:
            data = b""
            while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                chunk = s.recv(65536)
                assert chunk, data
                data += chunk
            answer = json.loads(data.split(b"\r\n\r\n", 1)[1])
            assert [m["id"] for m in answer["messages"]] == [sent]
        wait_for(lambda: connections(srv) == 0, 5, what="every poll answered")
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """Auth, CORS and a per-user limit of 1 (pool mode: auth does not depend on it)."""
    s = start_server(str(tmp_path_factory.mktemp("guarded") / "db"), "--mode", "pool",
                     "--admin-port", "-1", "--jwt-secret", SECRET, "--api-key", KEY,
                     "--cors-origin", ORIGIN, "--max-streams-per-user", "1",
                     "--request-timeout", "1")
    yield s
    s.stop()
    output = "".join(s.output)
    assert SECRET not in output and KEY not in output and "Traceback" not in output


def test_polls_take_the_stream_token(guarded):
    me = unique_id("auth")
    status, head, answer = poll(guarded, f"/poll/{me}?timeout=0")
    assert status == 401 and head["www-authenticate"].startswith("Bearer")
    other = mint(SECRET, unique_id("other"), 60)
    status, _, _ = poll(guarded, f"/poll/{me}?timeout=0&token={other}")
    assert status == 403
    token = mint(SECRET, me, 60)
    status, _, answer = poll(guarded, f"/poll/{me}?timeout=0&token={token}")
    assert status == 200 and answer["messages"] == []
    status, _, answer = poll(guarded, f"/poll/{me}?timeout=0",
                             headers={"Authorization": f"Bearer {token}"})
    assert status == 200


def test_a_poll_ends_when_its_token_does(guarded):
    me = unique_id("exp")
    token = mint(SECRET, me, 2 - LEEWAY)  # accepted for about 2 s more
    started = time.monotonic()
    status, _, answer = poll(guarded, f"/poll/{me}?timeout=30&token={token}")
    assert status == 200 and answer["messages"] == [] and time.monotonic() - started < 5


def test_polls_carry_cors_headers_and_the_stream_limits(guarded):
    me = unique_id("cors")
    token = mint(SECRET, me, 60)
    waiting = Poller(guarded, f"/poll/{me}?timeout=20&token={token}", headers={"Origin": ORIGIN})
    wait_for(lambda: connections(guarded) == 1, 5, what="the poll waiting")
    status, head, answer = poll(guarded, f"/poll/{me}?timeout=20&token={token}",
                                headers={"Origin": ORIGIN})
    assert status == 429 and head["access-control-allow-origin"] == ORIGIN, (head, answer)
    sent = send(guarded, me, "hello", headers={"X-API-Key": KEY})
    status, head, answer = waiting.result()
    assert status == 200 and [m["id"] for m in answer["messages"]] == [sent]
    assert head["access-control-allow-origin"] == ORIGIN and head["vary"] == "Origin"


def test_a_kept_connection_closes_after_the_request_timeout(guarded):
    me = unique_id("idle")
    token = mint(SECRET, me, 60)
    with socket.create_connection((guarded.host, guarded.port), timeout=10) as sock:
        sock.sendall(f"GET /poll/{me}?timeout=0&token={token} HTTP/1.1\r\nHost: x\r\n\r\n"
                     .encode())
        head, answer = read_answer(sock)
        assert b"Connection: close" not in head and answer["messages"] == []
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server, about a second later
        assert 0.9 < time.monotonic() - started < 4


def test_a_drain_answers_a_waiting_poll(tmp_path):
    s = start_server(str(tmp_path / "db"), "--mode", "greenlet", "--admin-port", "-1")
    try:
        me = unique_id("drain")
        waiting = Poller(s, f"/poll/{me}?timeout=30")
        wait_for(lambda: connections(s) == 1, 5, what="the poll waiting")
        s.proc.send_signal(signal.SIGTERM)
        status, head, answer = waiting.result()
        assert status == 200 and answer["messages"] == [] and head["connection"] == "close"
        assert waiting.elapsed < 10
    finally:
        s.stop()


# -- scaled out ----------------------------------------------------------------------


def test_through_workers_the_seam_holds(redis_server, tmp_path):
    proc = start_cometd(["--workers", "1", "--redis", redis_server.url, "--port", "0",
                         "--admin-port", "0", "--db", str(tmp_path / "db")],
                        r"^cometd: listening on http://([\d.]+):(\d+)/", timeout=60)
    try:
        class Addr:
            host, port = proc.match.group(1), int(proc.match.group(2))

        edge = Addr()
        wait_for(lambda: http_request(edge, "GET", "/readyz")[0] == 200, 20, interval=0.1,
                 what="the edge ready")
        me = unique_id("edge")
        start = send(edge, me, "start")
        waiting = Poller(edge, f"/poll/{me}?since={start}&timeout=20")
        wait_for(lambda: connections(edge) == 1, 5, what="the poll waiting")
        sent = [send(edge, me, f"m{i}") for i in range(5)]
        got: list[str] = [m["id"] for m in waiting.result()[2]["messages"]]
        since = got[-1]
        while len(got) < len(sent):
            _, _, answer = poll(edge, f"/poll/{me}?since={since}&timeout=5")
            assert answer["recovered"], answer
            got.extend(m["id"] for m in answer["messages"])
            since = answer["last_event_id"]
        assert got == sent
    finally:
        proc.stop(signal.SIGTERM, timeout=15)
    assert "Traceback" not in "".join(proc.output)
