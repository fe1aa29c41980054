"""The admin console over real sockets: against `bin/cometd`, and in-process for limits."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request
from typing import Any

import gevent
import pytest
from conftest import StreamClient, start_server

from cometd.admin import MAX_LINE, PROMPT, AdminConsole

GREETING = b"cometd admin console; type help\n"


class Console:
    """A client session: send a line, read the reply up to the next prompt."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"closed; got {self.buf!r}")
            self.buf += data
        head, _, self.buf = self.buf.partition(marker)
        return head + marker

    def read_all(self) -> bytes:
        """Everything until the server closes the session."""
        while True:
            data = self.sock.recv(65536)
            if not data:
                out, self.buf = self.buf, b""
                return out
            self.buf += data

    def start(self, password: str | None = None) -> bytes:
        if password is None:
            return self.read_until(PROMPT)
        self.read_until(b"password: ")
        self.sock.sendall(password.encode() + b"\n")
        return self.read_until(PROMPT)

    def raw(self, data: bytes) -> list[str]:
        """Send raw bytes (ending in a newline); the reply lines before the prompt."""
        self.sock.sendall(data)
        reply = self.read_until(PROMPT)[: -len(PROMPT)]
        return reply.decode("utf-8").splitlines()

    def cmd(self, line: str) -> list[str]:
        return self.raw(line.encode("utf-8") + b"\n")

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def http_json(url: str, method: str = "GET", body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def open_stream(server, user: str) -> socket.socket:
    """A raw HTTP/1.1 streaming client, returned once the welcome chunk arrived."""
    sock = socket.create_connection((server.host, server.port), timeout=5)
    sock.sendall(f"GET /test/{user} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    got = b""
    while b"Welcome" not in got:
        data = sock.recv(4096)
        assert data, got
        got += data
    return sock


def wait_online(console: Console, user: str, n: int) -> None:
    deadline = time.monotonic() + 5
    while console.cmd(f"online {user}") != [f"OK {n}"]:
        assert time.monotonic() < deadline, f"{user} never had {n} connections"
        time.sleep(0.02)


# -- against the real server, in both connection modes ---------------------------


def test_seed_session_end_to_end(server, mode):
    c = Console(server.admin_port)
    assert c.start() == GREETING + PROMPT

    assert c.cmd("subscribe alice rj") == ["OK"]
    assert c.cmd("subscribe bob rj") == ["OK"]
    assert c.cmd("subscribers rj") == ["alice bob", "OK"]
    assert c.cmd("subscriptions alice") == ["rj", "OK"]
    assert c.cmd("unsubscribe bob rj") == ["OK"]
    assert c.cmd("subscribers rj") == ["alice", "OK"]
    assert c.cmd("subscriptions bob") == ["OK"]
    assert c.cmd("send rj hello") == ["OK delivered 0 id 1-1"]  # alice is offline
    assert c.cmd("online alice") == ["OK 0"]

    stream = open_stream(server, "alice")
    try:
        wait_online(c, "alice", 1)
        assert c.cmd("send rj hi") == ["OK delivered 1 id 1-2"]
        got = b""
        while b"2\r\nhi\r\n" not in got:
            data = stream.recv(4096)
            assert data, got
            got += data
        assert b"hello" not in got  # sent while alice was offline: not stored
        assert c.cmd("online alice") == ["OK 1"]

        stats = c.cmd("stats")
        assert stats[-1] == "OK"
        values = dict(line.split(": ", 1) for line in stats[:-1])
        assert values["connections"] == "1"
        assert values["messages_sent"] == "2"
        assert values["mode"] == mode
    finally:
        stream.close()

    assert c.cmd("subscribers charlie") == ["OK"]

    # The HTTP side and the console see the same store, both ways.
    assert http_json(f"{server.url}/subscribers/rj") == {"subscribers": ["alice"]}
    http_json(f"{server.url}/subscriptions", "POST", [["dave", "rj"]])
    assert c.cmd("subscribers rj") == ["alice dave", "OK"]

    c.sock.sendall(b"quit\n")
    assert c.read_all() == b"OK bye\n"
    c.close()


def test_who_lists_the_users_online(server, mode):
    c = Console(server.admin_port)
    c.start()
    assert c.cmd("who") == ["OK 0 of 0 online"]
    users = ["alice", "42", "user:7"]
    streams = [open_stream(server, u) for u in [*users, "alice"]]  # alice twice
    try:
        wait_online(c, "alice", 2)
        for user in users[1:]:
            wait_online(c, user, 1)
        reply = c.cmd("who")
        assert sorted(reply[:-1]) == sorted(users) and reply[-1] == "OK 3 of 3 online"
        reply = c.cmd("who 2")
        assert len(reply) == 3 and set(reply[:-1]) < set(users), reply
        assert reply[-1] == "OK 2 of 3 online"
        assert c.cmd("who 0") == ["OK 0 of 3 online"]
        for bad in ("who -1", "who 10001", "who x", "who 1 2", "who ²"):
            assert c.cmd(bad) == ["ERR usage: who [N] (N from 0 to 10,000)"], bad
    finally:
        for s in streams:
            s.close()
    deadline = time.monotonic() + 5
    while c.cmd("who") != ["OK 0 of 0 online"]:
        assert time.monotonic() < deadline, "the streams never went offline"
        time.sleep(0.02)
    c.close()


# -- one server for the mode-independent commands --------------------------------


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = start_server(str(tmp_path_factory.mktemp("admin") / "db"))
    yield s
    s.stop()


@pytest.fixture
def console(srv):
    c = Console(srv.admin_port)
    c.start()
    yield c
    c.close()


def test_help_lists_every_command(console):
    lines = console.cmd("help")
    assert lines[-1] == "OK"
    names = [line.split()[0] for line in lines[:-1]]
    assert names == ["subscribe", "unsubscribe", "subscribers", "subscriptions", "send",
                     "online", "kick", "who", "stats", "load", "help", "quit"]
    assert all(len(line.split(None, 1)) == 2 for line in lines[:-1])  # each has a description


def test_help_for_one_command(console):
    listed = {line.split()[0]: " ".join(line.split()) for line in console.cmd("help")[:-1]}
    for name, line in listed.items():
        reply = console.cmd(f"help {name}")
        assert len(reply) == 2 and reply[1] == "OK", reply
        assert " ".join(reply[0].split()) == line  # the list's line, unpadded
    assert console.cmd("help subscribe") == [
        "subscribe <subscriber> <subscribee>  subscriber gets subscribee's messages "
        "(not oneself: that is implied)", "OK"]
    assert console.cmd("help ONLINE")[0].startswith("online <id>  ")
    assert console.cmd("help frob") == ["ERR unknown command 'frob'; type help"]
    assert console.cmd("help send online") == ["ERR usage: help [command]"]


def test_quit_closes_the_session(console):
    console.sock.sendall(b"quit\r\n")
    assert console.read_all() == b"OK bye\n"


def test_mistakes_get_one_err_line_and_the_session_goes_on(console):
    assert console.cmd("frobnicate now") == ["ERR unknown command 'frobnicate'; type help"]
    for line in ("subscribe alice", "subscribe a b c", "subscribers", "online a b",
                 "stats now", "send rj", "send rj    ", "load", "load a b"):
        reply = console.cmd(line)
        assert len(reply) == 1 and reply[0].startswith("ERR "), (line, reply)
    reply = console.cmd("subscribe al!ce rj")
    assert len(reply) == 1 and reply[0].startswith("ERR invalid id 'al!ce'")
    assert console.cmd("subscribers " + "x" * 65)[0].startswith("ERR invalid id")
    assert console.cmd("") == []  # an empty line: just a new prompt
    assert console.cmd("subscribe errtest rj") == ["OK"]  # still alive, CRLF too:
    assert console.raw(b"subscribers rj\r\n")[-1] == "OK"


def test_self_subscription_is_refused_and_changes_nothing(console):
    assert console.cmd("subscribe selfie selfie") == [
        "ERR 'selfie' cannot subscribe to itself (everyone always gets their own messages)"]
    assert console.cmd("subscribe 12 12")[0].startswith("ERR '12' cannot subscribe to itself")
    assert console.cmd("subscribers selfie") == ["OK"]
    assert console.cmd("subscriptions selfie") == ["OK"]
    assert console.cmd("unsubscribe selfie selfie") == ["OK"]  # allowed, as over HTTP


def test_send_keeps_the_rest_of_the_line(console, srv):
    stream = open_stream(srv, "textsub")
    try:
        wait_online(console, "textsub", 1)
        reply = console.cmd("send textsub héllo  wörld ")
        assert len(reply) == 1 and re.fullmatch(r"OK delivered 1 id \d+-\d+", reply[0]), reply
        body = "héllo  wörld ".encode()
        want = b"%x\r\n%s\r\n" % (len(body), body)
        got = b""
        while want not in got:
            data = stream.recv(4096)
            assert data, got
            got += data
    finally:
        stream.close()


def test_load_a_friends_file(console, tmp_path):
    good = tmp_path / "friends.txt"
    good.write_text("carol dave\n\neve carol\n")
    assert console.cmd(f"load {good}") == ["OK loaded 4"]
    assert console.cmd("subscribers carol") == ["dave eve", "OK"]
    assert console.cmd("subscriptions carol") == ["dave eve", "OK"]
    assert console.cmd(f"load {good}") == ["OK loaded 0"]  # nothing new

    directed = tmp_path / "directed.txt"
    directed.write_text("fay gus\n")
    assert console.cmd(f"load {directed} --directed") == ["OK loaded 1"]
    assert console.cmd("subscriptions fay") == ["gus", "OK"]
    assert console.cmd("subscriptions gus") == ["OK"]

    bad = tmp_path / "bad.txt"
    bad.write_text("hal ida\njay\n")
    reply = console.cmd(f"load {bad}")
    assert len(reply) == 1 and reply[0].startswith("ERR ") and ":2:" in reply[0]
    assert console.cmd("subscribers hal") == ["OK"]  # nothing stored

    reply = console.cmd(f"load {tmp_path / 'missing.txt'}")
    assert len(reply) == 1 and reply[0].startswith("ERR cannot read")


def test_garbage_never_kills_the_server(srv):
    c = Console(srv.admin_port)
    c.start()
    assert c.raw(b"\xff\xfe\x00garbage\x80\n") == ["ERR line is not valid UTF-8"]
    assert c.raw(b"subscribe a\x00 b\n") == ["ERR control characters in line"]
    assert c.raw(bytes(range(1, 10)) + b"\n") == ["ERR control characters in line"]
    assert c.raw(b"\xff\xf4\xff\xfd\x06\r\n") == ["ERR line is not valid UTF-8"]  # telnet ^C
    reply = c.raw(b"x" * (100 * 1024) + b"\n")
    assert reply == [f"ERR line over {MAX_LINE} bytes"]
    assert c.cmd("subscribers rj")[-1] == "OK"  # the rest of the long line was discarded
    c.close()

    # A client that hangs up mid-command changes nothing.
    c = Console(srv.admin_port)
    c.start()
    c.sock.sendall(b"subscribe midway rj")
    c.close()

    c = Console(srv.admin_port)
    assert c.start() == GREETING + PROMPT
    assert c.cmd("subscriptions midway") == ["OK"]
    c.close()


# -- password ---------------------------------------------------------------------


def test_password(tmp_path):
    srv = start_server(str(tmp_path / "db"), "--admin-password", "s3cret pass")
    try:
        c = Console(srv.admin_port)
        assert c.read_until(b"password: ") == GREETING + b"password: "
        c.sock.sendall(b"s3cret pass\r\n")
        assert c.read_until(PROMPT) == PROMPT
        assert c.cmd("subscribe a b") == ["OK"]
        c.close()

        c = Console(srv.admin_port)
        c.read_until(b"password: ")
        c.sock.sendall(b"s3cret\n")
        assert c.read_until(b"password: ") == b"ERR wrong password\npassword: "
        c.close()

        # Commands sent instead of a password are not run.
        c = Console(srv.admin_port)
        c.read_until(b"password: ")
        c.sock.sendall(b"subscribe x y\nsubscribe x y\nsubscribe x y\n")
        assert c.read_all() == (b"ERR wrong password\npassword: " * 2
                                + b"ERR wrong password 3 times; closing\n")
        c.close()
        assert http_json(f"{srv.url}/subscriptions/x") == {"subscriptions": []}
    finally:
        srv.stop()


# -- limits, in-process with a fake backend ------------------------------------------


class FakeBackend:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def add(self, pairs):
        self.calls.append(("add", pairs))
        return len(pairs)

    def remove(self, pairs):
        return 0

    def subscribers(self, user):
        if user == "boom":
            raise RuntimeError("backend down")
        return []

    def subscriptions(self, user):
        return []

    def send(self, subject, body):
        self.calls.append(("send", subject, body))
        return 0, "7-1"

    def online(self, user):
        return 0

    def who(self, limit):
        self.calls.append(("who", limit))
        return [str(n) for n in range(min(limit, 20_000))], 20_000

    def stats(self):
        return {"connections": 0}

    def load(self, path, directed=False):
        return 0


@pytest.fixture
def local_console():
    """An AdminConsole in its own gevent thread: short idle timeout, two sessions."""
    backend = FakeBackend()
    ready = threading.Event()
    stop = threading.Event()
    box: dict[str, AdminConsole] = {}

    def run() -> None:
        console = AdminConsole(backend, "127.0.0.1", 0, idle_timeout=0.5, max_sessions=2)
        console.start()
        box["console"] = console
        ready.set()
        while not stop.is_set():
            gevent.sleep(0.02)
        console.stop(timeout=0.5)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)
    yield box["console"], backend
    stop.set()
    thread.join(5)


def test_idle_sessions_are_closed(local_console):
    console, _ = local_console
    c = Console(console.server_port)
    c.start()
    started = time.monotonic()
    assert c.read_all() == b""
    assert 0.3 < time.monotonic() - started < 3
    c.close()


def test_sessions_are_limited(local_console):
    console, _ = local_console
    first, second = Console(console.server_port), Console(console.server_port)
    first.start()
    second.start()
    third = Console(console.server_port)
    assert third.read_all().startswith(b"ERR too many admin sessions")
    third.close()
    first.close()
    deadline = time.monotonic() + 3
    while True:  # the slot frees once the server notices the hang-up
        fourth = Console(console.server_port)
        out = fourth.read_until(b"\n")
        if out == GREETING:
            break
        fourth.close()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    fourth.close()
    second.close()


def test_backend_fault_is_one_err_line(local_console):
    console, backend = local_console
    c = Console(console.server_port)
    c.start()
    reply = c.cmd("subscribers boom")
    assert reply == ["ERR internal error: RuntimeError: backend down"]
    assert c.cmd("send rj  two  words") == ["OK delivered 0 id 7-1"]
    assert backend.calls[-1] == ("send", "rj", b"two  words")
    c.close()


def test_who_is_bounded(local_console):
    console, backend = local_console
    c = Console(console.server_port)
    c.start()
    reply = c.cmd("who")
    assert len(reply) == 101 and reply[-1] == "OK 100 of 20000 online"
    reply = c.cmd("who 10000")
    assert len(reply) == 10_001 and reply[-1] == "OK 10000 of 20000 online"
    assert backend.calls[-2:] == [("who", 100), ("who", 10_000)]
    assert c.cmd("who 10001")[0].startswith("ERR usage: who [N]")
    assert backend.calls[-1] == ("who", 10_000)  # the backend was not asked
    c.close()


def test_kick_ends_every_stream_of_the_users_named(server):
    c = Console(server.admin_port)
    c.start()
    alice = [StreamClient.open(server, "/test/alice") for _ in range(2)]
    alice.append(StreamClient.open(server, "/events/alice"))
    alice.append(StreamClient.open(server, "/test/carol"))
    bob = StreamClient.open(server, "/test/bob")
    try:
        for s in [*alice, bob]:
            s.chunk()
        wait_online(c, "alice", 3)
        wait_online(c, "carol", 1)
        # One invalid id refuses the whole command: no one is kicked.
        assert c.cmd("kick alice a/b")[0].startswith("ERR invalid id")
        assert c.cmd("online alice") == ["OK 3"]
        assert c.cmd("kick alice carol alice") == ["OK kicked 4"]
        for s in alice:
            s.wait_closed(5)
            assert s.parser.ended  # chunked: a clean end, with the last chunk
        assert c.cmd("online alice") == ["OK 0"]
        assert c.cmd("kick alice") == ["OK kicked 0"]
        assert c.cmd("kick a/b")[0].startswith("ERR invalid id")
        assert c.cmd("kick")[0].startswith("ERR expected at least 1 argument")
        assert c.cmd("send bob still here")[0].startswith("OK delivered 1 ")
        assert bob.chunk() == b"still here"
    finally:
        for s in [*alice, bob]:
            s.close()
        c.close()


# -- password lockout --------------------------------------------------------------


def test_three_wrong_passwords_close_the_session(tmp_path):
    srv = start_server(str(tmp_path / "db"), "--admin-password", "right")
    try:
        # Two wrong tries still leave the third.
        c = Console(srv.admin_port)
        assert c.read_until(b"password: ") == GREETING + b"password: "
        for guess in (b"wrong1", b"x" * (MAX_LINE + 10)):
            c.sock.sendall(guess + b"\n")
            assert c.read_until(b"password: ") == b"ERR wrong password\npassword: "
        c.sock.sendall(b"right\n")
        assert c.read_until(PROMPT) == PROMPT
        assert c.cmd("online nobody") == ["OK 0"]
        c.close()

        # The third wrong one ends it, each after the delay; a new session starts afresh.
        c = Console(srv.admin_port, timeout=10)
        c.read_until(b"password: ")
        start = time.monotonic()
        for guess in (b"a", b"b", b"c"):
            c.sock.sendall(guess + b"\n")
            if guess != b"c":
                c.read_until(b"password: ")
        assert c.read_all() == b"ERR wrong password 3 times; closing\n"
        assert time.monotonic() - start >= 2.9  # the 1 s delay stays, per wrong password
        c.close()
        c = Console(srv.admin_port)
        assert c.start("right") == PROMPT and c.cmd("online nobody") == ["OK 0"]
        c.close()
    finally:
        srv.stop()
