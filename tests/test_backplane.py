"""Scale-out over Redis: a router and edges as real processes, real Redis, real sockets.

Each test starts a throwaway ``redis-server`` (``redis_server`` in conftest), a
``cometd router`` on a fresh database and two ``cometd edge`` processes (one
per connection mode), then talks to the edges over HTTP like any client, to
the router over its admin console, and to Redis directly where the test
counts backplane traffic. The fault tests restart Redis, kill an edge and
restart the router, and require everything back within 5 s.

The four-host test runs the seed's layout (Redis + router, an edge, stream
clients, a publisher) in four network namespaces on one machine. The tests at
the end run in-process: the router's presence table, over a fake Redis client.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import gevent
import numpy as np
import psutil
import pytest
import redis
from conftest import CometdProcess, StreamClient, start_cometd
from prometheus_client.parser import text_string_to_metric_families

from cometd import backplane
from cometd.backplane import (
    CALL_TIMEOUT,
    CONTROL,
    DELIVERY_FLUSH_MAX,
    DENSE_LIMIT,
    EDGE,
    EDGE_TIMEOUT,
    HEARTBEAT,
    LISTENING_TIMEOUT,
    PAYLOAD_RATE,
    PRESENCE,
    BackplaneUnavailable,
    EdgeBackend,
    EdgeLink,
    PayloadError,
    Presence,
    decode_batch,
    encode_batch,
)
from cometd.connections import ConnectionTable
from cometd.history import parse_id
from cometd.loadtest.chunked import Chunk, ChunkedDecoder
from cometd.online import recipients
from cometd.store import SetView, SubscriptionStore, encode_set
from cometd.streamhttp import CHUNKED, SSE_CHUNKED, Message

ROUTER_READY = r"cometd router: redis \S+ db=\S+(?: admin ([\d.]+):(\d+))?"
EDGE_READY = r"cometd edge (\S+): listening on http://([\d.]+):(\d+)/"
PROMPT = b"cometd> "
BACK_WITHIN = 5.0  # seconds a fault may take to heal


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll *pred* until it is truthy (return it) or *timeout* passes (return the last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# -- clients ------------------------------------------------------------------------


def request(base: tuple[str, int], method: str, path: str, body: Any = None,
            timeout: float = 10) -> tuple[int, Any]:
    """One HTTP request; (status, parsed JSON or raw bytes)."""
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    conn = http.client.HTTPConnection(*base, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    if resp.getheader("Content-Type", "").startswith("application/json"):
        return resp.status, json.loads(data)
    return resp.status, data


class Stream:
    """A streaming client (``GET /test/<user>``, HTTP/1.1 chunked) read by a thread."""

    def __init__(self, addr: tuple[str, int], user: str, timeout: float = 5) -> None:
        self.user = user
        self.chunks: list[bytes] = []
        self.eof = False
        self._cond = threading.Condition()
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.sock.sendall(f"GET /test/{user} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = self.sock.recv(4096)
            assert data, f"stream {user}: closed before the headers"
            head += data
        head, _, self._rest = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        self._decoder = ChunkedDecoder()
        self.sock.settimeout(None)
        threading.Thread(target=self._read, daemon=True).start()
        assert self.wait(lambda: self.chunks, timeout), f"stream {user}: no welcome"
        assert self.chunks[0].startswith(b"Welcome"), self.chunks[0]

    def _read(self) -> None:
        data = self._rest
        while True:
            # The zero-length last chunk is kept as an empty one (End -> b"").
            payloads = [e.data if isinstance(e, Chunk) else b"" for e in self._decoder.feed(data)]
            if payloads:
                with self._cond:
                    self.chunks += payloads
                    self._cond.notify_all()
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                with self._cond:
                    self.eof = True
                    self._cond.notify_all()
                return

    @property
    def messages(self) -> list[bytes]:
        return self.chunks[1:]

    def wait(self, pred: Callable[[], Any], timeout: float) -> Any:
        with self._cond:
            self._cond.wait_for(pred, timeout)
            return pred()

    def wait_messages(self, n: int, timeout: float = 5) -> list[bytes]:
        self.wait(lambda: len(self.chunks) > n or self.eof, timeout)
        return self.messages

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def admin(port: int, line: str) -> list[str]:
    """One admin console command; its reply lines (the last is OK... or ERR...)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        buf = b""

        def until_prompt() -> bytes:
            nonlocal buf
            while PROMPT not in buf:
                data = sock.recv(65536)
                assert data, f"admin console closed: {buf!r}"
                buf += data
            head, _, buf = buf.partition(PROMPT)
            return head

        until_prompt()
        sock.sendall(line.encode() + b"\n")
        return until_prompt().decode().splitlines()


# -- the cluster --------------------------------------------------------------------


class Edge:
    def __init__(self, process: CometdProcess, mode: str) -> None:
        self.process = process
        self.mode = mode
        self.id = process.match.group(1)
        self.addr = (process.match.group(2), int(process.match.group(3)))

    def http(self, method: str, path: str, body: Any = None, timeout: float = 10):
        return request(self.addr, method, path, body, timeout)

    def send(self, subject: str, body: bytes, timeout: float = 10) -> tuple[int, Any]:
        """POST /send: status and reply, the reply's message id checked and left out."""
        status, reply = self.http("POST", f"/send/{subject}", body, timeout)
        if status == 200:
            assert parse_id(reply.pop("id")) is not None, reply
        return status, reply


class Cluster:
    """Redis, one router, some edges; every process and stream it starts is cleaned up."""

    def __init__(self, redis_server, db: str) -> None:
        self.redis = redis_server
        self.db = db
        self.router: CometdProcess | None = None
        self.edges: list[Edge] = []
        self.processes: list[CometdProcess] = []
        self.streams: list[Stream] = []

    def start_router(self) -> CometdProcess:
        self.router = start_cometd(["router", "--redis", self.redis.url, "--db", self.db,
                                    "--admin-port", "0"], ROUTER_READY)
        self.processes.append(self.router)
        return self.router

    def start_edge(self, mode: str, *extra: str) -> Edge:
        edge = Edge(start_cometd(["edge", "--redis", self.redis.url, "--port", "0",
                                  "--mode", mode, *extra], EDGE_READY), mode)
        self.processes.append(edge.process)
        self.edges.append(edge)
        return edge

    def stream(self, edge: Edge, user: str) -> Stream:
        stream = Stream(edge.addr, user)
        self.streams.append(stream)
        return stream

    def admin(self, line: str) -> list[str]:
        return admin(int(self.router.match.group(2)), line)

    def stats(self) -> dict[str, str]:
        lines = self.admin("stats")
        assert lines[-1] == "OK", lines
        return dict(line.split(": ", 1) for line in lines[:-1])

    def connections(self) -> int:
        return int(self.stats()["connections"])

    def online(self, user: str) -> int:
        reply = self.admin(f"online {user}")
        assert reply[-1].startswith("OK "), reply
        return int(reply[-1].split()[1])

    def subscribe(self, edge: Edge, pairs: list[list[str]]) -> None:
        status, reply = edge.http("POST", "/subscriptions", pairs)
        assert status == 200, reply

    def assert_healthy(self, *dead: CometdProcess) -> None:
        """Every process still runs (but *dead*) and none printed a traceback."""
        for proc in self.processes:
            out = "".join(proc.output)
            assert "Traceback" not in out, out
            if proc not in dead:
                assert proc.alive(), f"{proc.proc.args[2:4]} exited:\n{out}"

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
        for proc in self.processes:  # all at once: each takes a moment to wind down
            if proc.alive():
                proc.proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            proc.stop(signal.SIGTERM, timeout=10)


@pytest.fixture
def cluster(redis_server, tmp_path):
    """Redis, a router on an empty db, edge A (greenlet mode) and edge B (pool mode)."""
    c = Cluster(redis_server, str(tmp_path / "db"))
    try:
        with ThreadPoolExecutor(3) as pool:  # start the three processes side by side
            started = [pool.submit(c.start_router)]
            started += [pool.submit(c.start_edge, mode) for mode in ("greenlet", "pool")]
            for future in started:
                future.result()
        c.edges.sort(key=lambda edge: edge.mode != "greenlet")  # A, then B
        yield c
    finally:
        c.close()


# -- routing across edges -----------------------------------------------------------


def test_send_on_either_edge_reaches_streams_on_both(cluster):
    a, b = cluster.edges
    on_a, on_b = cluster.stream(a, "alice"), cluster.stream(b, "alice")
    assert wait_until(lambda: cluster.online("alice") == 2, BACK_WITHIN)
    cluster.subscribe(b, [["alice", "rj"]])  # through edge B to the router's store

    assert a.send("rj", b"hello from rj") == (200, {"delivered": 2})
    assert on_a.wait_messages(1) == [b"hello from rj"]
    assert on_b.wait_messages(1) == [b"hello from rj"]

    assert b.send("rj", b"again") == (200, {"delivered": 2})
    assert on_a.wait_messages(2) == [b"hello from rj", b"again"]
    assert on_b.wait_messages(2) == [b"hello from rj", b"again"]
    assert a.http("GET", "/subscriptions/alice") == (200, {"subscriptions": ["rj"]})
    cluster.assert_healthy()


def test_router_console_who_lists_users_on_every_edge(cluster):
    a, b = cluster.edges
    cluster.stream(a, "alice"), cluster.stream(b, "bob"), cluster.stream(b, "alice")
    assert wait_until(lambda: cluster.connections() == 3, BACK_WITHIN)
    reply = cluster.admin("who")
    assert sorted(reply[:-1]) == ["alice", "bob"] and reply[-1] == "OK 2 of 2 online"
    assert cluster.admin("who 1")[-1] == "OK 1 of 2 online"
    assert cluster.admin("help who")[0].startswith("who [N]  ")
    cluster.assert_healthy()


def test_subject_order_and_one_batch_per_edge(cluster, redis_server):
    a, b = cluster.edges
    users = {a.id: ["alice", "bob", "carol"], b.id: ["alice", "dave"]}
    streams = [cluster.stream(edge, u) for edge in (a, b) for u in users[edge.id]]
    cluster.subscribe(a, [[u, "rj"] for u in ("alice", "bob", "carol", "dave")])
    assert wait_until(lambda: cluster.connections() == 5, BACK_WITHIN)

    # Watch the router's delivery channels from here, like a third edge would.
    watcher = redis.Redis.from_url(redis_server.url).pubsub()
    watcher.psubscribe("cometd:edge:*")
    assert watcher.get_message(timeout=5)["type"] == "psubscribe"
    batches: list[tuple[str, list[tuple[Message, list[str]]]]] = []

    def watch() -> None:
        while len(batches) < 2 * n:
            item = watcher.get_message(timeout=10)
            if item is None:
                return
            batches.append((item["channel"].decode(), decode_batch(item["data"])))

    n = 30
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    bodies = [b"m%03d" % i for i in range(n)]
    for i, body in enumerate(bodies):
        edge = (a, b)[i % 2]  # alternate the edge the send enters through
        assert edge.send("rj", body) == (200, {"delivered": 5})
    for stream in streams:
        assert stream.wait_messages(n) == bodies, stream.user
    thread.join(5)
    watcher.close()

    # One batch per edge per send (each send here waits for the one before),
    # naming that edge's recipients, in send order.
    for edge in (a, b):
        channel = f"cometd:edge:{edge.id}"
        mine = [entries for ch, entries in batches if ch == channel]
        assert all(len(entries) == 1 for entries in mine)
        assert [entries[0][0].body for entries in mine] == bodies
        assert all(sorted(entries[0][1]) == users[edge.id] for entries in mine)
        assert all(entries[0][0].subject == "rj" for entries in mine)
    assert len(batches) == 2 * n
    cluster.assert_healthy()


def test_a_batch_carries_several_messages_with_their_recipients():
    first, second = Message("rj", b"one\nline", 3 << 64 | 5), Message("user:7", b"")
    third = Message("rj", "h\u00e9llo".encode(), 7)
    fourth = Message("9", b'\xff\n[{"size": 1}]\n\x00')  # any bytes, even the head's own
    entries = [(first, ["alice", "bob"]), (second, ["carol"]), (third, ["alice"]),
               (fourth, ["1", "2"])]
    decoded = decode_batch(encode_batch(entries))
    assert [(m.key, m.subject, m.body, users) for m, users in decoded] == [
        (m.key, m.subject, m.body, users) for m, users in entries]
    # Each message's SSE frame comes built, as the edge would build it.
    assert [m.frames[SSE_CHUNKED] for m, _ in decoded] == [
        Message(m.subject, m.body, m.key).frame(SSE_CHUNKED) for m, _ in entries]
    assert decode_batch(encode_batch([])) == []


def test_a_payload_in_another_format_or_cut_short_is_refused_by_name():
    payload = encode_batch([(Message("rj", b"hello", 5), ["alice"])])
    # A router of an older version sent JSON; a newer one, another tag.
    for other in (b'[[{"id": 5}, ["alice"]]]', b"cb3\n" + payload[4:], b""):
        with pytest.raises(PayloadError, match="same cometd version"):
            decode_batch(other)
    with pytest.raises(PayloadError, match="cut short"):
        decode_batch(payload[:-len(b"hello") - 30])


def test_an_edge_drops_an_unreadable_payload_says_so_and_delivers_the_next(cluster,
                                                                           redis_server):
    a, _ = cluster.edges
    stream = cluster.stream(a, "alice")
    cluster.subscribe(a, [["alice", "rj"]])
    assert wait_until(lambda: cluster.online("alice") == 1, BACK_WITHIN)
    client = redis.Redis.from_url(redis_server.url)
    assert client.publish(EDGE.format(a.id), b'[[{"id": 1}, ["alice"]]]') == 1
    assert a.send("rj", b"after") == (200, {"delivered": 1})
    assert stream.wait_messages(1) == [b"after"]
    said = "1 delivery payload(s) this edge cannot read, dropped (the router and the edges " \
        "must run the same cometd version)"
    assert wait_until(lambda: said in "".join(a.process.output), 5), a.process.output
    cluster.assert_healthy()


def test_concurrent_sends_all_arrive_in_subject_order(cluster):
    """Sends routed while a flush is in flight share the next one; none is lost."""
    a, b = cluster.edges
    subjects = ["s1", "s2", "s3", "s4"]
    cluster.subscribe(a, [[u, s] for u in ("alice", "bob") for s in subjects])
    streams = [cluster.stream(a, "alice"), cluster.stream(b, "bob")]
    assert wait_until(lambda: cluster.connections() == 2, BACK_WITHIN)
    per_subject = 15

    def burst(subject: str) -> list[tuple[int, dict]]:
        edge = a if subject in ("s1", "s3") else b
        return [edge.send(subject, b"%s-%02d" % (subject.encode(), i))
                for i in range(per_subject)]

    with ThreadPoolExecutor(len(subjects)) as pool:
        replies = [r for rs in pool.map(burst, subjects) for r in rs]
    assert replies == [(200, {"delivered": 2})] * (len(subjects) * per_subject)
    for stream in streams:
        got = stream.wait_messages(len(subjects) * per_subject)
        for subject in subjects:
            mine = [m for m in got if m.startswith(subject.encode() + b"-")]
            assert mine == [b"%s-%02d" % (subject.encode(), i) for i in range(per_subject)]
    cluster.assert_healthy()


def test_lookups_match_the_router_store_and_edges_reject_bad_input(cluster):
    a, b = cluster.edges
    status, reply = a.http("POST", "/subscriptions",
                           [["alice", "rj"], ["bob", "rj"], ["rj", "alice"], ["carol", "bob"]])
    assert (status, reply) == (200, {"added": 4})
    assert b.http("DELETE", "/subscriptions", [["bob", "rj"]]) == (200, {"removed": 1})

    for user in ("rj", "alice", "bob", "carol", "nobody"):
        for key in ("subscribers", "subscriptions"):
            lines = cluster.admin(f"{key} {user}")
            assert lines[-1] == "OK", lines
            expected = lines[0].split() if len(lines) > 1 else []
            for edge in (a, b):
                assert edge.http("GET", f"/{key}/{user}") == (200, {key: expected}), (key, user)
    assert a.http("GET", "/subscribers/rj")[1] == {"subscribers": ["alice"]}

    too_long = "x" * 65
    bad = [
        ("GET", "/subscribers/bad%20id", None, 400),
        ("GET", f"/subscriptions/{too_long}", None, 400),
        ("POST", "/send/bad%20id", b"hi", 400),
        ("POST", "/send/rj", b"", 400),
        ("POST", "/send/rj", b"x" * (64 * 1024 + 1), 413),
        ("POST", "/subscriptions", b"not json", 400),
        ("POST", "/subscriptions", [["alice"]], 400),
        ("POST", "/subscriptions", [["dave", "rj"], ["dave", "dave"]], 400),
        ("DELETE", "/subscriptions", [["alice", "bad id"]], 400),
        ("GET", "/nowhere", None, 404),
        ("PUT", "/send/rj", b"hi", 405),
    ]
    for edge in (a, b):
        for method, path, body, want in bad:
            status, reply = edge.http(method, path, body)
            assert status == want, (edge.id, method, path, reply)
            assert isinstance(reply, dict) and reply["error"], reply
            assert "Traceback" not in json.dumps(reply)
        status, reply = edge.http("GET", "/test/bad%20id")
        assert status == 404 and reply.startswith(b"User id not found"), reply
    # The edges turned all of that away themselves: the router never saw a send,
    # nor dave's pairs; its console refuses a self-subscription as well.
    assert cluster.stats()["messages_sent"] == "0"
    assert cluster.admin("subscriptions dave") == ["OK"]
    assert cluster.admin("subscribe dave dave")[0].startswith("ERR 'dave' cannot subscribe")
    cluster.assert_healthy()


# -- an edge's /stats ----------------------------------------------------------------

PRESENCE_WITHIN = 1.0  # seconds a closed stream, or a dead edge's, may still be counted
HELD = 2000


def test_edge_stats_say_whose_figures_and_drop_closed_streams_within_a_second(cluster):
    a, b = cluster.edges
    alice_a, bob_b = cluster.stream(a, "alice"), cluster.stream(b, "bob")
    totals = lambda: a.http("GET", "/stats")[1]  # noqa: E731
    assert wait_until(lambda: totals()["connections"] == 2, BACK_WITHIN)

    stats = totals()
    assert set(stats) == {"connections", "users_online", "messages_sent", "deliveries",
                          "router_rss_bytes", "edge"}, stats
    assert stats["users_online"] == 2  # the router's figures: both edges
    own = stats["edge"]
    assert (own["id"], own["mode"], own["connections"], own["users_online"]) == (
        a.id, "greenlet", 1, 1), own
    assert b.http("GET", "/stats")[1]["edge"]["mode"] == "pool"

    # Whose memory is whose: idle streams (~7 KiB each in greenlet mode) set
    # edge A's RSS well apart from the router's, then each figure must match
    # its own process.
    held = [socket.create_connection(a.addr) for _ in range(HELD)]
    try:
        for i, sock in enumerate(held):
            sock.sendall(b"GET /test/held%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
        assert wait_until(lambda: totals()["connections"] == 2 + HELD, BACK_WITHIN)
        stats = totals()
        router_rss = psutil.Process(cluster.router.pid).memory_info().rss
        edge_rss = psutil.Process(a.process.pid).memory_info().rss
        assert edge_rss > 1.12 * router_rss or router_rss > 1.12 * edge_rss  # told apart
        assert stats["router_rss_bytes"] == pytest.approx(router_rss, rel=0.05)
        assert stats["edge"]["rss_bytes"] == pytest.approx(edge_rss, rel=0.05)
    finally:
        for sock in held:
            sock.close()
    assert wait_until(lambda: totals()["connections"] == 2, BACK_WITHIN)

    # A stream that closes leaves the edge's count at once and the router's promptly.
    alice_a.close()
    assert wait_until(lambda: totals()["connections"] == 1, PRESENCE_WITHIN), totals()
    stats = totals()
    assert (stats["users_online"], stats["edge"]["connections"]) == (1, 0), stats

    # So do the streams of an edge that dies without a word.
    b.process.proc.kill()
    t0 = time.monotonic()
    assert wait_until(lambda: totals()["connections"] == 0, PRESENCE_WITHIN), totals()
    assert time.monotonic() - t0 < PRESENCE_WITHIN + 0.5  # the last /stats call included
    assert bob_b.wait(lambda: bob_b.eof, 5)
    assert cluster.online("bob") == 0
    cluster.assert_healthy(b.process)


def test_edge_stats_without_the_router_say_so_and_keep_the_edges_own():
    class NoRouter:  # an EdgeLink whose router never answers (a fake: pure logic)
        edge_id = "edge-1"
        table = ConnectionTable("pool")

        def call(self, op: str, *args: Any) -> Any:
            raise BackplaneUnavailable("the router is not reachable; try again")

    try:
        stats = EdgeBackend(NoRouter()).stats()  # type: ignore[arg-type]
    finally:
        NoRouter.table.close()
    assert stats["router_error"] == "the router is not reachable; try again"
    own = stats.pop("edge")
    assert set(stats) == {"router_error"}  # no totals passed off as the whole service's
    assert own.pop("rss_bytes") > 10 * 2**20
    assert own == {"id": "edge-1", "mode": "pool", "connections": 0, "users_online": 0,
                   "deliveries": 0, "slow_consumers_dropped": 0, "rejected": {}}


# -- faults -------------------------------------------------------------------------


def _heal(edge: Edge, subject: str, delivered: int, deadline: float) -> list[tuple[bytes, Any]]:
    """Send fresh bodies until one is delivered to *delivered* connections.

    Every answer on the way must be a JSON 503 or a 200; none is retried away
    or swallowed. Returns [(body, delivered count, or None for a 503)].
    """
    probes: list[tuple[bytes, Any]] = []
    for attempt in range(200):
        body = b"probe-%d" % attempt
        status, reply = edge.send(subject, body, timeout=CALL_TIMEOUT + 5)
        if status == 503:
            assert isinstance(reply, dict) and reply["error"], reply
            probes.append((body, None))
        else:
            assert status == 200 and set(reply) == {"delivered"}, (status, reply)
            probes.append((body, reply["delivered"]))
            if reply["delivered"] == delivered:
                return probes
        assert time.monotonic() < deadline, probes
        time.sleep(0.1)
    raise AssertionError(f"no send got through: {probes}")


def assert_counts_true(probes: list[tuple[bytes, Any]], streams: list[Stream],
                        receivers: list[Stream]) -> None:
    """Each 200 during healing counted exactly the streams that got its body.

    The last probe must reach all of *receivers*; streams get a subject's
    messages in order, so once it has, every earlier probe that reached a
    stream is there too, and the count can be checked against *streams*.
    """
    last = probes[-1][0]
    for stream in receivers:
        assert stream.wait(lambda s=stream: last in s.messages, 5), (stream.user, stream.messages)
    for body, delivered in probes:
        if delivered is not None:
            got = [s.user for s in streams if body in s.messages]
            assert len(got) == delivered, (body, delivered, got, probes)


@pytest.mark.parametrize("kill, outage",
                         [(signal.SIGTERM, 0.0), (signal.SIGKILL, EDGE_TIMEOUT + 1)],
                         ids=["sigterm-brief", "sigkill-past-edge-timeout"])
def test_redis_restart(cluster, redis_server, kill, outage):
    a, b = cluster.edges
    cluster.subscribe(a, [[u, "rj"] for u in ("alice", "bob", "carol", "dave")])
    alice_a, alice_b = cluster.stream(a, "alice"), cluster.stream(b, "alice")
    bob_b = cluster.stream(b, "bob")
    assert wait_until(lambda: cluster.connections() == 3, BACK_WITHIN)

    redis_server.stop(kill)
    down = time.monotonic()
    # Presence changes while Redis is away must reach the router afterwards.
    carol_a, dave_b = cluster.stream(a, "carol"), cluster.stream(b, "dave")
    bob_b.close()
    # Longer than the edge timeout: nobody hears heartbeats, and calls fail
    # with a 503 (never a hang past the call timeout, never a traceback).
    lost = []
    while time.monotonic() - down < outage:
        t = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda e: e.send("rj", b"while redis is down",
                                                     timeout=CALL_TIMEOUT + 5), (a, b)))
        for status, reply in replies:
            assert status == 503 and reply["error"], (status, reply)
        assert time.monotonic() - t < CALL_TIMEOUT + 1
        lost.append(t)
        time.sleep(0.5)
    assert len(lost) >= (1 if outage else 0)
    redis_server.start()
    t0 = time.monotonic()

    # 4 (not the stale 3) once the router knows: alice twice, carol and dave.
    probes = _heal(b, "rj", 4, t0 + BACK_WITHIN)
    streams = [alice_a, alice_b, bob_b, carol_a, dave_b]
    assert_counts_true(probes, streams, [alice_a, alice_b, carol_a, dave_b])
    assert not any(b"while redis is down" in s.messages for s in streams)
    online = lambda: [cluster.online(u) for u in ("alice", "bob", "carol", "dave")]  # noqa: E731
    assert wait_until(lambda: online() == [2, 0, 1, 1], t0 + BACK_WITHIN - time.monotonic())
    assert time.monotonic() - t0 < BACK_WITHIN
    assert a.http("GET", "/subscribers/rj") == (
        200, {"subscribers": ["alice", "bob", "carol", "dave"]})
    cluster.assert_healthy()


def test_edge_killed(cluster):
    a, b = cluster.edges
    cluster.subscribe(a, [["alice", "rj"], ["bob", "rj"]])
    alice_a, alice_b = cluster.stream(a, "alice"), cluster.stream(b, "alice")
    cluster.stream(b, "bob")
    assert wait_until(lambda: cluster.connections() == 3, BACK_WITHIN)

    b.process.proc.kill()
    t0 = time.monotonic()
    assert alice_b.wait(lambda: alice_b.eof, BACK_WITHIN)
    # The router has not heard from B for a while: B's users leave presence.
    assert wait_until(lambda: cluster.connections() == 1, t0 + BACK_WITHIN - time.monotonic())
    assert (cluster.online("alice"), cluster.online("bob")) == (1, 0)
    assert a.send("rj", b"after the kill") == (200, {"delivered": 1})
    assert alice_a.wait_messages(1) == [b"after the kill"]
    assert time.monotonic() - t0 < BACK_WITHIN + 1
    cluster.assert_healthy(b.process)


def test_edge_sigterm_ends_its_streams_with_the_last_chunk(cluster):
    """An edge stopped on purpose ends its chunked streams properly, unlike a kill."""
    streams = [cluster.stream(edge, "carol") for edge in cluster.edges]
    assert wait_until(lambda: cluster.online("carol") == 2, BACK_WITHIN)
    assert cluster.edges[0].send("carol", b"before the stop")[0] == 200
    for edge, stream in zip(cluster.edges, streams, strict=True):
        assert stream.wait_messages(1) == [b"before the stop"]
        assert edge.process.stop(signal.SIGTERM) == 0
        assert stream.wait(lambda s=stream: s.eof, 10)
        # the parser keeps the zero-length last chunk as an empty one
        assert stream.messages == [b"before the stop", b""], (edge.mode, stream.messages)
    cluster.assert_healthy(*(edge.process for edge in cluster.edges))


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_router_restart(cluster, kill):
    a, b = cluster.edges
    cluster.subscribe(a, [["alice", "rj"], ["bob", "rj"]])
    streams = [cluster.stream(a, "alice"), cluster.stream(b, "alice"), cluster.stream(b, "bob")]
    assert wait_until(lambda: cluster.connections() == 3, BACK_WITHIN)

    old = cluster.router
    assert old.stop(kill) == (0 if kill == signal.SIGTERM else -kill)
    store = SubscriptionStore(cluster.db)  # the router let go of its db (or the kernel did)
    try:
        assert store.get_subscribers("rj") == ["alice", "bob"]
    finally:
        store.close()

    # No router: edges answer 503 with JSON, in about CALL_TIMEOUT (5 s).
    results: dict[str, tuple[int, Any]] = {}

    def call(name: str, edge: Edge, method: str, path: str, body: Any) -> None:
        results[name] = edge.http(method, path, body, timeout=15)

    calls = [threading.Thread(target=call, args=("send", a, "POST", "/send/rj", b"while down")),
             threading.Thread(target=call, args=("add", b, "POST", "/subscriptions",
                                                 [["dave", "rj"]]))]
    t0 = time.monotonic()
    for thread in calls:
        thread.start()
    for thread in calls:
        thread.join(15)
    assert time.monotonic() - t0 < 6.5
    for status, reply in results.values():
        assert status == 503 and "router" in reply["error"], reply

    # The same db, a new router: presence comes back from the edges' snapshots.
    cluster.start_router()
    t0 = time.monotonic()
    probes = _heal(a, "rj", 3, t0 + BACK_WITHIN)
    assert_counts_true(probes, streams, streams)
    for stream in streams:
        # ... and what the edges were told had failed (503) is not run late.
        assert b"while down" not in stream.messages, stream.user
    assert time.monotonic() - t0 < BACK_WITHIN
    assert cluster.connections() == 3
    assert b.http("GET", "/subscribers/rj") == (200, {"subscribers": ["alice", "bob"]})
    cluster.assert_healthy(old)


# -- the seed's four hosts, as network namespaces ------------------------------------

NS_ROLES = ("router", "edge", "flood", "msg")
NS_NET = "10.231.0"  # only ever configured inside the namespaces this test creates

STREAM_CLIENT = textwrap.dedent("""
    import json, socket, sys, time
    from cometd.loadtest.chunked import Chunk, ChunkedDecoder
    host, port, n, want = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    socks, got, bufs, decoders = {}, {}, {}, {}
    for i in range(n):
        user = f"f{i}"
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(f"GET /test/{user} HTTP/1.1\\r\\nHost: e\\r\\n\\r\\n".encode())
        socks[user], got[user], bufs[user] = s, [], b""
        decoders[user] = ChunkedDecoder()
    def pump(user):
        data = socks[user].recv(65536)
        if not data:
            return False
        if bufs[user] is not None:  # the response head is not complete yet
            head, sep, rest = (bufs[user] + data).partition(b"\\r\\n\\r\\n")
            if not sep:
                bufs[user] = head
                return True
            bufs[user], data = None, rest
        got[user] += [e.data.decode() for e in decoders[user].feed(data) if isinstance(e, Chunk)]
        return True
    deadline = time.monotonic() + 20
    for user in socks:
        while not got[user] and time.monotonic() < deadline and pump(user):
            pass
    print("ready", sum(1 for g in got.values() if g), flush=True)
    for user in socks:
        socks[user].settimeout(1)
        while len(got[user]) < want + 1 and time.monotonic() < deadline:
            try:
                if not pump(user):
                    break
            except socket.timeout:
                pass
    print(json.dumps({u: g[1:] for u, g in got.items()}), flush=True)
""")

PUBLISHER = textwrap.dedent("""
    import json, sys, time, urllib.request, urllib.error
    base, n, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    def call(method, path, body):
        req = urllib.request.Request(base + path, data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return {"status": exc.code, "body": exc.read().decode()}
    pairs = [[f"f{i}", "pub"] for i in range(n)]
    out = {"added": call("POST", "/subscriptions", json.dumps(pairs).encode())}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the router learns of the streams
        stats = call("GET", "/stats", None)
        if stats.get("connections") == n:
            break
        time.sleep(0.1)
    out["stats"] = stats
    out["sends"] = [call("POST", "/send/pub", f"msg-{k}".encode()) for k in range(m)]
    print(json.dumps(out), flush=True)
""")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture
def namespaces():
    """Four namespaces on a bridge (in a fifth): role -> (namespace, address)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command")
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"`ip netns` is unavailable: {exc}")
    tag = os.getpid() % 100000
    hub = f"cometd-t{tag}-br"
    names = {role: f"cometd-t{tag}-{role}" for role in NS_ROLES}
    created: list[str] = []
    try:
        for ns in (hub, *names.values()):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        hosts = {}
        for i, (role, ns) in enumerate(names.items()):
            _ip("-n", hub, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _ip("-n", hub, "link", "set", f"v{i}", "master", "br0")
            _ip("-n", hub, "link", "set", f"v{i}", "up")
            _ip("-n", ns, "addr", "add", f"{NS_NET}.{i + 1}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            hosts[role] = (ns, f"{NS_NET}.{i + 1}")
    except subprocess.CalledProcessError as exc:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        pytest.skip(f"cannot build the namespaces: {' '.join(exc.cmd)}: {exc.stderr.strip()}")
    try:
        yield hosts
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def test_four_hosts_in_network_namespaces(namespaces, tmp_path):
    # bin/floodtest and bin/msggen only target loopback addresses, and the edge
    # is another "host" here, so small clients stand in for them.
    router_ns, router_ip = namespaces["router"]
    edge_ns, edge_ip = namespaces["edge"]
    flood_ns, msg_ns = namespaces["flood"][0], namespaces["msg"][0]
    exec_in = lambda ns: ["ip", "netns", "exec", ns]  # noqa: E731
    redis_url = f"redis://{router_ip}:6379/0"
    procs: list[subprocess.Popen] = []
    cometds: list[CometdProcess] = []
    try:
        redis_proc = subprocess.Popen(
            [*exec_in(router_ns), shutil.which("redis-server") or "/usr/bin/redis-server",
             "--port", "6379", "--bind", router_ip, "--protected-mode", "no", "--save", "",
             "--appendonly", "no", "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(redis_proc)
        ping = [*exec_in(router_ns), "redis-cli", "-h", router_ip, "-p", "6379", "ping"]
        assert wait_until(lambda: subprocess.run(ping, capture_output=True, text=True,
                                                 timeout=5).stdout.strip() == "PONG", 10)
        router = start_cometd(["router", "--redis", redis_url, "--db", str(tmp_path / "db"),
                               "--admin-port", "-1"], ROUTER_READY, prefix=exec_in(router_ns))
        cometds.append(router)
        # --insecure: a non-loopback address with no authentication, on purpose.
        edge = start_cometd(["edge", "--redis", redis_url, "--host", edge_ip, "--port", "8000",
                             "--insecure"], EDGE_READY, prefix=exec_in(edge_ns))
        cometds.append(edge)

        n, m = 20, 5
        flood = subprocess.Popen(
            [*exec_in(flood_ns), sys.executable, "-c", STREAM_CLIENT, edge_ip, "8000", str(n),
             str(m)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(flood)
        assert flood.stdout.readline().split() == ["ready", str(n)]

        pub = subprocess.run(
            [*exec_in(msg_ns), sys.executable, "-c", PUBLISHER, f"http://{edge_ip}:8000",
             str(n), str(m)], capture_output=True, text=True, timeout=30)
        out = json.loads(pub.stdout or "null") if pub.returncode == 0 else pub.stderr
        assert out["added"] == {"added": n}, out
        assert out["stats"]["connections"] == n, out  # the router counts the edge's streams
        assert [s["delivered"] for s in out["sends"]] == [n] * m, out

        received = json.loads(flood.communicate(timeout=30)[0])
        assert received == {f"f{i}": [f"msg-{k}" for k in range(m)] for i in range(n)}
        for proc in cometds:
            assert proc.alive() and "Traceback" not in "".join(proc.output)
    finally:
        for proc in cometds:
            proc.stop(signal.SIGTERM, timeout=10)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)



# -- more scale-out promises (added after the namespace test to ease merges) ------------


def test_same_subject_from_two_edges_at_once_arrives_in_one_order(cluster):
    """Two edges publish one subject concurrently: every stream, on either edge,
    sees the same order, and each publisher's own sends in the order made."""
    a, b = cluster.edges
    users = ["alice", "bob", "carol"]
    cluster.subscribe(a, [[u, "rj"] for u in users])
    streams = [cluster.stream(a, "alice"), cluster.stream(b, "alice"), cluster.stream(a, "bob"),
               cluster.stream(b, "carol")]
    assert wait_until(lambda: cluster.connections() == len(streams), BACK_WITHIN)
    per_edge, start = 40, threading.Barrier(4)

    def publish(edge: Edge, worker: int) -> list[tuple[int, Any]]:
        start.wait()
        return [edge.send("rj", b"%s-%d-%02d" % (edge.mode.encode(), worker, i))
                for i in range(per_edge)]

    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(publish, edge, w) for edge in (a, b) for w in (0, 1)]
        replies = [r for job in jobs for r in job.result()]
    assert replies == [(200, {"delivered": len(streams)})] * (4 * per_edge)
    orders = [stream.wait_messages(4 * per_edge, timeout=15) for stream in streams]
    assert all(len(order) == 4 * per_edge for order in orders), [len(o) for o in orders]
    assert all(order == orders[0] for order in orders), "streams disagree on the order"
    for edge in (a, b):
        for w in (0, 1):
            prefix = b"%s-%d-" % (edge.mode.encode(), w)
            assert [m for m in orders[0] if m.startswith(prefix)] == [
                prefix + b"%02d" % i for i in range(per_edge)]
    cluster.assert_healthy()


class _At:
    """What conftest's StreamClient needs to reach an edge."""

    def __init__(self, edge: Edge) -> None:
        self.host, self.port = edge.addr


def test_slow_consumer_on_an_edge_is_dropped_and_the_router_hears(cluster):
    a, b = cluster.edges
    max_pending = 64 * 1024
    c = cluster.start_edge("greenlet", "--max-pending", str(max_pending))
    cluster.subscribe(a, [["slowpoke", "rj"], ["reader", "rj"]])
    slow = StreamClient.open(_At(c), "/test/slowpoke", rcvbuf=4096)
    try:
        slow.chunk()  # the welcome; then it reads nothing
        fast = cluster.stream(b, "reader")
        assert wait_until(lambda: cluster.connections() == 2, BACK_WITHIN)
        size, bodies, replies = 32 * 1024, [], []
        for i in range(400):  # the kernels hold ~3 MB first (see test_connections)
            bodies.append(b"%08d" % i + b"s" * (size - 8))
            replies.append(a.send("rj", bodies[-1]))
            if replies[-1] == (200, {"delivered": 1}):
                break
        else:
            raise AssertionError(f"the slow consumer was never dropped: {replies[-5:]}")
        dropped = time.monotonic()
        assert all(r in [(200, {"delivered": 2}), (200, {"delivered": 1})] for r in replies)
        # The edge dropped it and told the router, which no longer counts it.
        assert wait_until(lambda: cluster.online("slowpoke") == 0, 1.0)
        assert time.monotonic() - dropped < 1.0 + 0.5
        assert cluster.connections() == 1
        status, stats = c.http("GET", "/stats")
        assert (status, stats["edge"]["slow_consumers_dropped"],
                stats["edge"]["connections"]) == (200, 1, 0), stats
        # Nobody else suffered: the reader on another edge got everything, in order.
        assert fast.wait_messages(len(bodies), timeout=30) == bodies
        slow.sock.settimeout(30)
        slow.wait_closed(30)  # the edge closed it: it ends once drained
    finally:
        slow.close()
    cluster.assert_healthy()


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_disconnect_through_an_edge_reaches_the_router_within_a_second(cluster, reset):
    a, b = cluster.edges
    for edge in (a, b):
        gone = StreamClient.open(_At(edge), f"/test/gone-{edge.mode}")
        stays = cluster.stream(edge, f"stays-{edge.mode}")
        gone.chunk()
        assert wait_until(lambda e=edge: cluster.online(f"gone-{e.mode}") == 1, BACK_WITHIN)
        # Nothing is sent to the user: only the hang-up can tell the edge, and
        # the edge's presence report the router.
        t0 = time.monotonic()
        gone.close(reset=reset)
        assert wait_until(lambda e=edge: cluster.online(f"gone-{e.mode}") == 0, 1.0)
        assert time.monotonic() - t0 < 1.0
        assert cluster.online(stays.user) == 1
    assert cluster.connections() == 2
    cluster.assert_healthy()


# -- resuming across edges (the router keeps the history) ---------------------------


def _resume(edge: Edge, path: str, last_id: str) -> StreamClient:
    sock = socket.create_connection(edge.addr, timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nLast-Event-ID: {last_id}\r\n\r\n".encode())
    return StreamClient(sock)


def _events(client: StreamClient, n: int) -> list[tuple[str, str, str]]:
    """The next *n* SSE message events as (id, from, body)."""
    out = []
    while len(out) < n:
        chunk = client.chunk().decode()
        if chunk.startswith("id: "):
            id_line, data_line = chunk.strip("\n").split("\n")
            data = json.loads(data_line[len("data: "):])
            out.append((id_line[4:], data["from"], data["body"]))
    return out


def test_a_client_whose_edge_is_killed_resumes_on_another(cluster):
    a, b = cluster.edges
    friends = ["f1", "f2", "f3"]
    cluster.subscribe(a, [["me", f] for f in friends])
    sock = socket.create_connection(a.addr, timeout=10)
    sock.sendall(b"GET /events/me HTTP/1.1\r\nHost: t\r\n\r\n")
    with StreamClient(sock) as first:
        first.chunk()
        assert wait_until(lambda: cluster.online("me") == 1, BACK_WITHIN)
        status, reply = b.http("POST", "/send/f1", b"seen")
        (seen,) = _events(first, 1)
        assert seen == (reply["id"], "f1", "seen")
        a.process.stop(signal.SIGKILL)
    missed = []
    for i in range(3):
        for subject in [*friends, "me", "stranger"]:
            status, reply = b.http("POST", f"/send/{subject}", f"{subject} {i}".encode())
            assert status == 200, reply
            if subject != "stranger":
                missed.append((reply["id"], subject, f"{subject} {i}"))
    with _resume(b, "/events/me", seen[0]) as again:
        assert again.headers["cometd-recovered"] == "true"
        again.chunk()
        assert _events(again, len(missed)) == missed
        status, reply = b.http("POST", "/send/f2", b"live")
        assert _events(again, 1) == [(reply["id"], "f2", "live")]
    cluster.assert_healthy(a.process)


def test_a_router_restart_keeps_the_history(cluster):
    a, b = cluster.edges
    cluster.subscribe(a, [["me", "f"]])
    ids = [a.http("POST", "/send/f", b"m%d" % i)[1]["id"] for i in range(3)]
    cluster.router.stop(signal.SIGKILL)
    cluster.start_router()
    assert wait_until(lambda: "router_error" not in b.http("GET", "/stats")[1], BACK_WITHIN)
    with _resume(b, "/events/me", ids[0]) as c:
        assert c.headers["cometd-recovered"] == "true"
        c.chunk()
        assert _events(c, 2) == [(ids[1], "f", "m1"), (ids[2], "f", "m2")]
        status, reply = a.http("POST", "/send/f", b"after")
        assert status == 200 and parse_id(reply["id"]) > parse_id(ids[-1])  # a new epoch
        assert int(reply["id"].split("-")[0]) == int(ids[0].split("-")[0]) + 1
        assert _events(c, 1) == [(reply["id"], "f", "after")]
    # An id the router cannot place: not recovered, said before any replay.
    with _resume(a, "/events/me", "nonsense") as c:
        assert c.headers["cometd-recovered"] == "false"
        c.chunk()
        gap = c.chunk().decode()
        assert gap.startswith("event: gap\ndata: ") and '"malformed id"' in gap


def test_the_seam_holds_across_edges(cluster):
    """Clients hop between the two edges, resuming, while two subjects publish."""
    from test_history import check_seam

    a, b = cluster.edges
    servers = [SimpleNamespace(host=e.addr[0], port=e.addr[1]) for e in (a, b)]
    check_seam(servers, ["p0", "p1"], [f"c{i}" for i in range(30)], 3)
    cluster.assert_healthy()


def _welcome_id(edge: Edge, user: str) -> str | None:
    """Open a fresh SSE stream of *user*, read its welcome, drop it: the welcome's id."""
    sock = socket.create_connection(edge.addr, timeout=10)
    sock.sendall(f"GET /events/{user} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    with StreamClient(sock) as client:
        welcome = client.chunk().decode()
    lines = [line[4:] for line in welcome.split("\n") if line.startswith("id: ")]
    return lines[0] if lines else None


def test_a_fresh_stream_on_an_edge_that_routed_nothing_can_resume(cluster):
    """The welcome carries the router's head, so connect, drop, resume loses nothing."""
    a, b = cluster.edges
    cluster.subscribe(a, [["me", "f"]])
    ids = [a.http("POST", "/send/f", b"before %d" % i)[1]["id"] for i in range(3)]
    # Nobody is online: no edge has had a message routed to it, yet both
    # learn the head (within a tick) and put it in a fresh stream's welcome.
    for edge in (a, b):
        assert wait_until(lambda e=edge: _welcome_id(e, "me") == ids[-1], BACK_WITHIN)
    welcome = _welcome_id(b, "me")  # connect, and drop at once
    assert welcome == ids[-1]
    after = [a.http("POST", f"/send/{s}", f"{s} after".encode())[1]["id"]
             for s in ("f", "stranger", "me")]
    with _resume(b, "/events/me", welcome) as again:
        assert again.headers["cometd-recovered"] == "true"
        again.chunk()
        assert _events(again, 2) == [(after[0], "f", "f after"), (after[2], "me", "me after")]
    # A router restart starts a new epoch: the edges hear its head at once.
    old = cluster.router
    old.stop(signal.SIGKILL)
    cluster.start_router()
    assert wait_until(lambda: (_welcome_id(a, "me") or "0-0").split("-")[0]
                      == str(int(ids[0].split("-")[0]) + 1), BACK_WITHIN)
    cluster.assert_healthy(old)


def _events_until(client: StreamClient, n: int, timeout: float) -> list[dict]:
    """Up to *n* SSE events (fewer if *timeout* passes first), each as {"id", "event", "data"}."""
    from test_history import events

    out: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n:
            out += events(client, 1, timeout=max(deadline - time.monotonic(), 0.001))
    except TimeoutError:
        pass
    return out


def test_an_edge_sees_ids_in_order_while_a_large_fan_out_races_small_ones(redis_server,
                                                                           tmp_path):
    """A subject with 70,000 subscribers (2,500 online) publishes while a small one does too.

    The large send yields while it looks its subscribers up, so a small one
    given the next id can be routed first: the router must still hand the
    edge both in id order. Follower ``c`` follows both and drops for real
    half-way, then resumes: per subject no gap and no duplicate, and
    ``Cometd-Recovered: true`` only when that holds. Then, from every id
    it saw (as if it had dropped just then), a resume must bring exactly
    what it had not seen yet. Its ids must rise throughout.
    """
    db = str(tmp_path / "db")
    online = [str(100_000 + i) for i in range(2_500)]
    with SubscriptionStore(db) as store:
        store.add_subscriptions([(100_000 + i, "big") for i in range(70_000)]
                                + [("c", "big"), ("c", "small")])
    c = Cluster(redis_server, db)
    try:
        c.start_router()
        edge = c.start_edge("pool")
        fans = []
        for user in online:
            sock = socket.create_connection(edge.addr, timeout=10)
            sock.sendall(f"GET /test/{user} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            fans.append(sock)
        sock = socket.create_connection(edge.addr, timeout=10)
        sock.sendall(b"GET /events/c HTTP/1.1\r\nHost: t\r\n\r\n")
        first = StreamClient(sock)
        first.chunk()
        assert wait_until(lambda: c.connections() == len(online) + 1, BACK_WITHIN)
        sent: dict[str, set[str]] = {"big": set(), "small": set()}
        rounds = threading.Barrier(4)  # each round's four sends leave together

        def publish(subject: str) -> None:
            for i in range(20):
                rounds.wait(timeout=10)
                status, reply = edge.http("POST", f"/send/{subject}", f"{subject}:{i}".encode())
                assert status == 200, reply
                sent[subject].add(reply["id"])

        total = 20 * 4
        seen: list[tuple[str, str]] = []  # (id, subject) in arrival order, across the drop
        with ThreadPoolExecutor(4) as pool:  # one large publisher, three small ones
            runs = [pool.submit(publish, s) for s in ("big", "small", "small", "small")]
            for e in _events_until(first, total // 2, 10):
                seen.append((e["id"], json.loads(e["data"])["from"]))
            first.close()
            for run in runs:
                run.result()
        with _resume(edge, "/events/c", seen[-1][0]) as again:
            recovered = again.headers["cometd-recovered"] == "true"
            again.chunk()
            for e in _events_until(again, total - len(seen), 3):
                seen.append((e["id"], json.loads(e["data"])["from"]))
        for subject, ids in sent.items():
            got = [i for i, s in seen if s == subject]
            assert got == sorted(ids, key=parse_id), (subject, recovered)
        assert recovered
        # Had c dropped after any message it saw, the resume would have been exact.
        everything = {i for ids in sent.values() for i in ids}
        for j in range(total - 1):
            with _resume(edge, "/events/c", seen[j][0]) as later:
                assert later.headers["cometd-recovered"] == "true"
                later.chunk()
                rest = [e["id"] for e in _events_until(later, total - j - 1, 1)]
            assert len(rest) == len(set(rest)) == total - j - 1, (j, sorted(
                everything - {i for i, _ in seen[:j + 1]} - set(rest), key=parse_id))
            assert {i for i, _ in seen[:j + 1]} | set(rest) == everything, j
        ids = [parse_id(i) for i, _ in seen]
        assert ids == sorted(ids), "the edge handed c two subjects' ids out of order"
        for sock in fans:
            sock.close()
        c.assert_healthy()
    finally:
        c.close()


def test_a_report_made_before_a_resume_does_not_undo_it():
    """Presence.resumed counts the user online at once; only a later-stamped report counts."""
    from cometd.backplane import Presence

    p = Presence(redis.Redis(port=1))  # never used: nothing here publishes
    p.update("e1", {"u": 1, "v": 1}, stamp=3)
    p.update("e1", {"u": 0}, stamp=4)  # u's old stream closed
    p.resumed("e1", "u", stamp=6)  # a new one resumes: online before any report
    assert p.online("u") == 1 and len(p.index) == 2
    p.update("e1", {"u": 0}, stamp=5)  # counted before the resume, heard after it
    assert p.online("u") == 1
    p.update("e1", {"v": 1}, snapshot=True, stamp=5)  # likewise a snapshot
    assert (p.online("u"), p.online("v")) == (1, 1)
    p.update("e1", {"u": 0}, stamp=7)  # counted after: the resumed stream is gone
    assert p.online("u") == 0
    p.resumed("e2", "u", stamp=1)
    p.forget_edge("e2")  # a dead edge takes its resumes along
    p.update("e2", {}, stamp=0)
    assert p.online("u") == 0


def test_a_snapshot_or_a_dead_edge_changes_only_that_edges_users():
    """Presence keeps each edge's users: a snapshot drops whom it no longer holds, and
    forgetting an edge leaves another edge's streams of the same user counted."""
    from cometd.backplane import Presence

    p = Presence(redis.Redis(port=1))  # never used: nothing here publishes
    p.update("e1", {"a": 1, "b": 2, "both": 1})
    p.update("e2", {"both": 3, "c": 1})
    p.update("e1", {"b": 1, "d": 1}, snapshot=True)  # a and both left e1
    assert {u: p.online(u) for u in "abcd"} == {"a": 0, "b": 1, "c": 1, "d": 1}
    assert p.online("both") == 3 and len(p.index) == 4  # a is gone from the index
    p.forget_edge("e2")
    assert (p.online("both"), p.online("c"), p.online("b")) == (0, 0, 1)
    assert sorted(p.users) == ["b", "d"] and len(p.index) == 2
    p.forget_edge("e1")
    assert p.users == {} and len(p.index) == 0


def test_an_edge_the_router_does_not_know_alone_sends_its_snapshot(cluster, redis_server):
    """The router forgot edge A (as after taking it for dead): A's next heartbeat gets
    A's snapshot asked for, not every edge's (at 1M, 52 snapshots of 19,000 users)."""
    a, b = cluster.edges
    watcher = redis.Redis.from_url(redis_server.url).pubsub(ignore_subscribe_messages=True)
    watcher.subscribe(PRESENCE)
    def snapshots(seconds: float) -> set[str]:
        seen, deadline = set(), time.monotonic() + seconds
        while time.monotonic() < deadline:
            item = watcher.get_message(timeout=0.1)
            if item is not None and b'"snapshot"' in item["data"]:
                seen.add(json.loads(item["data"])["edge"])
        return seen

    try:
        watcher.get_message(timeout=1)
        for _ in range(10):  # the start-up's snapshots are over
            if not snapshots(1.5):
                break
        redis.Redis.from_url(redis_server.url).publish(
            PRESENCE, json.dumps({"edge": a.id, "bye": True}))  # the router forgets A
        assert snapshots(2 * HEARTBEAT + 1) == {a.id}, (a.id, b.id)
    finally:
        watcher.close()
    cluster.assert_healthy()


def test_kick_on_the_router_ends_the_users_streams_on_every_edge_in_one_message(cluster):
    a, b = cluster.edges
    mine = [cluster.stream(a, "kicked"), cluster.stream(b, "kicked"), cluster.stream(a, "too")]
    other = cluster.stream(b, "stays")
    assert wait_until(lambda: cluster.online("kicked") == 2 and cluster.online("too") == 1,
                      BACK_WITHIN)
    control = redis.Redis.from_url(cluster.redis.url).pubsub(ignore_subscribe_messages=True)
    control.subscribe(CONTROL)
    assert control.get_message(timeout=5) is None  # subscribed
    assert cluster.admin("kick kicked too") == ["OK kicked 3"]
    for stream in mine:
        assert stream.wait(lambda s=stream: s.eof, 5), "a kicked stream stayed open"
    heard = []  # what the edges were told, the kick long since published
    while (message := control.get_message(timeout=0.2)) is not None:
        if b"kick" in message["data"]:
            heard.append(json.loads(message["data"]))
    control.close()
    assert heard == [{"kick": ["kicked", "too"]}]  # both users, one publish
    assert wait_until(lambda: cluster.online("kicked") == 0, BACK_WITHIN)
    assert a.send("stays", b"still here") == (200, {"delivered": 1})
    assert other.wait_messages(1) == [b"still here"]

    def kicked_ends(edge: Edge) -> float:
        # A scrape merges every process's figures, labelled by process: read this edge's.
        status, text = edge.http("GET", "/metrics")
        assert status == 200
        return sum(s.value for f in text_string_to_metric_families(text.decode())
                   for s in f.samples if s.name == "cometd_disconnects_total"
                   and s.labels.get("reason") == "kicked" and edge.id in s.labels["process"])

    # Each stream counted as kicked (not as a shutdown) on its own edge.
    assert wait_until(lambda: (kicked_ends(a), kicked_ends(b)) == (2, 1), BACK_WITHIN)
    cluster.assert_healthy()


# -- in-process: the router's presence table ---------------------------------------


class PublishOnly:
    """A redis client that can only publish through a pipeline (a fake of redis-py).

    *listeners* maps a channel to how many subscribers hear it (default 1);
    with *down*, every pipeline fails as if Redis were gone.
    """

    def __init__(self, listeners: dict[str, int] | None = None, down: bool = False) -> None:
        self.listeners = listeners or {}
        self.down = down
        #: one list of (channel, payload) per pipeline executed
        self.rounds: list[list[tuple[str, bytes]]] = []

    def pipeline(self, transaction: bool = True) -> PublishOnly._Pipe:
        return PublishOnly._Pipe(self)

    class _Pipe:
        def __init__(self, client: PublishOnly) -> None:
            self.client = client
            self.published: list[tuple[str, bytes]] = []

        def publish(self, channel: str, payload: bytes) -> None:
            self.published.append((channel, payload))

        def execute(self) -> list[int]:
            if self.client.down:
                raise redis.ConnectionError("Connection refused")
            self.client.rounds.append(self.published)
            return [self.client.listeners.get(ch, 1) for ch, _ in self.published]


@pytest.fixture
def presence():
    """Presence over a PublishOnly client; its flush greenlet is stopped afterwards."""
    made: list[Presence] = []

    def make(client: PublishOnly | None = None) -> Presence:
        made.append(Presence(client or PublishOnly()))
        return made[-1]

    yield make
    for p in made:
        p.stop()


def _state(presence: Presence) -> tuple[dict, int, int, set[str]]:
    index = presence.index
    return (presence.users, presence.connections, presence.users_online,
            set(index.names) | set(index.ints.values()))


def test_presence_follows_counts_snapshots_and_goodbyes(presence):
    p = presence()
    p.update("e1", {"alice": 2, "7": 1})
    p.update("e2", {"alice": 1})
    assert _state(p) == ({"alice": {"e1": 2, "e2": 1}, "7": {"e1": 1}}, 4, 2, {"alice", "7"})
    assert (p.online("alice"), p.online("7"), p.online("nobody")) == (3, 1, 0)
    assert p.index.ints == {7: "7"}  # integer ids indexed as the store splits them

    p.update("e1", {"alice": 0})  # logged out of e1, still on e2
    assert _state(p) == ({"alice": {"e2": 1}, "7": {"e1": 1}}, 2, 2, {"alice", "7"})
    p.update("e2", {"alice": 0})
    assert _state(p) == ({"7": {"e1": 1}}, 1, 1, {"7"})

    # A snapshot is the edge's whole state: whoever it leaves out is gone from that edge.
    p.update("e2", {"bob": 1})
    p.update("e1", {"carol": 3}, snapshot=True)
    assert _state(p) == ({"bob": {"e2": 1}, "carol": {"e1": 3}}, 4, 2, {"bob", "carol"})

    p.forget_edge("e1")  # goodbye
    assert _state(p) == ({"bob": {"e2": 1}}, 1, 1, {"bob"})
    assert set(p.edges) == {"e2"}


def test_an_edge_not_heard_from_expires_with_its_users(presence):
    p = presence()
    p.update("quiet", {"alice": 1, "bob": 1}, sent=time.time() - EDGE_TIMEOUT - 0.5)
    p.update("live", {"bob": 2})
    p.edges["quiet"] = time.monotonic() - EDGE_TIMEOUT - 0.5
    assert p.expire() == ["quiet"]
    assert _state(p) == ({"bob": {"live": 2}}, 2, 1, {"bob"})
    assert p.expire() == []  # the live edge was heard from just now


def test_a_silent_edge_that_still_listens_is_kept_until_the_longer_timeout(presence):
    """A starved edge still subscribed to its channel gets Redis's copy of each batch:
    forgetting it after EDGE_TIMEOUT would route its open streams nothing."""
    p = presence()
    for quiet_for in (EDGE_TIMEOUT + 0.5, LISTENING_TIMEOUT + 0.5):
        p.update("quiet", {"alice": 1}, sent=time.time() - quiet_for)
        p.update("live", {"bob": 1})
        p.edges["quiet"] = time.monotonic() - quiet_for
        if quiet_for < LISTENING_TIMEOUT:
            assert p.expire(listening={"quiet", "live"}) == []
            assert p.online("alice") == 1
        else:
            assert p.expire(listening={"quiet", "live"}) == ["quiet"]
            assert p.online("alice") == 0


def test_a_router_behind_on_presence_takes_no_edge_for_dead(presence):
    """Silence is judged by when the edges sent their reports, not when a router behind
    on presence (a saturated machine) read them; taking live edges for dead made each
    one's next report ask for its snapshot, putting the router further behind."""
    p = presence()
    sent = time.time() - 20
    p.update("e1", {"alice": 1}, sent=sent)
    p.update("e2", {"bob": 1}, sent=sent + 1)  # e2's next heartbeat, a second later
    now = time.monotonic()
    # Read 8 s and 4 s ago: the router took 4 s over one second of reports.
    p.edges["e1"], p.edges["e2"] = now - 8, now - 4
    assert p.expire() == []
    assert _state(p) == ({"alice": {"e1": 1}, "bob": {"e2": 1}}, 2, 2, {"alice", "bob"})
    # e2 reported EDGE_TIMEOUT + 1 s later by its clock, e1 nothing since: e1 is gone.
    p.update("e2", {}, sent=sent + EDGE_TIMEOUT + 2)
    assert p.expire() == ["e1"]


def _published_entries(client: PublishOnly) -> list[list[tuple[Message, list[str]]]]:
    return [entries for r in client.rounds for _, payload in r
            for entries in [decode_batch(payload)]]


def _published(client: PublishOnly) -> list[dict[str, list[tuple[bytes, list[str]]]]]:
    """Per pipeline round: channel -> the (body, users) of its decoded batch."""
    return [{ch: [(m.body, users) for m, users in decode_batch(payload)] for ch, payload in r}
            for r in client.rounds]


class SlowSnapshots:
    """A redis client that can only publish (a fake of redis-py); a snapshot takes 50 ms.

    As a real one, publishing yields to the hub while it waits on Redis: a big
    snapshot takes longer to send than a report of a few users.
    """

    def __init__(self) -> None:
        self.published: list[dict] = []

    def publish(self, channel: str, payload: str) -> int:
        if '"snapshot"' in payload:
            gevent.sleep(0.05)
        self.published.append(json.loads(payload))
        return 1


def test_an_edges_presence_goes_out_in_the_order_it_was_counted(presence):
    # A snapshot counted before a login must reach the router before the login's
    # report, or the router applies the report, then the snapshot, which does not
    # have the user: offline at the router for as long as the stream stays open
    # (attempt 11 at 1M: thousands of users who got nothing in 60 s of messages).
    table = ConnectionTable()
    link = EdgeLink("redis://127.0.0.1:1/0", table, "e1")  # its client is replaced
    link.client = SlowSnapshots()
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        table.adopt(pairs[0][0], "alice", CHUNKED)
        snapshot = gevent.spawn(link._snapshot)
        gevent.sleep(0)  # the snapshot is counted (alice) and on its way
        table.adopt(pairs[1][0], "bob", CHUNKED)
        link._report()  # bob's login
        snapshot.join()
        got = [("snapshot" in m, m.get("snapshot") or m["counts"])
               for m in link.client.published]
        assert got == [(True, {"alice": 1}), (False, {"bob": 1})]
        router = presence()
        for m in link.client.published:
            router.update("e1", m.get("snapshot") or m["counts"], snapshot="snapshot" in m)
        assert (router.online("alice"), router.online("bob")) == (1, 1)
    finally:
        table.close()
        for a, b in pairs:
            a.close()
            b.close()


def _flushes_while_sending(p: Presence, client: PublishOnly, users: list[str],
                           seconds: float = 0.3) -> list[float]:
    """Send to *users* every ms for *seconds*; the times between successive flushes."""
    times: list[float] = []
    execute = PublishOnly._Pipe.execute

    def timed(pipe):
        times.append(time.monotonic())
        return execute(pipe)

    sends = []
    end = time.monotonic() + seconds
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PublishOnly._Pipe, "execute", timed)
        key = 0
        while time.monotonic() < end:
            key += 1
            sends.append(gevent.spawn(p.deliver, users, Message("s", b"m", key)))
            gevent.sleep(0.001)
        gevent.joinall(sends, timeout=5)
    assert all(g.successful() for g in sends)
    assert sum(len(batch) for r in _published(client) for batch in r.values()) == key * len(
        {e for u in users for e in p.users[u]})  # every message reached every edge, once
    return [b - a for a, b in itertools.pairwise(times)]


def test_a_loaded_router_flushes_to_many_edges_less_often(presence):
    # A flush to one edge: the next follows DELIVERY_FLUSH later, for latency.
    client = PublishOnly()
    p = presence(client)
    p.update("e0", {"u0": 1})
    light = _flushes_while_sending(p, client, ["u0"])
    assert statistics.median(light) < 0.6 * DELIVERY_FLUSH_MAX, light  # not the long pause
    # A flush to 60 edges: each payload costs its edge a wakeup, so the next
    # flush waits longer and carries more, up to DELIVERY_FLUSH_MAX.
    client = PublishOnly()
    p = presence(client)
    for i in range(60):
        p.update(f"e{i}", {f"u{i}": 1})
    loaded = _flushes_while_sending(p, client, [f"u{i}" for i in range(60)])
    median = statistics.median(loaded)  # (a loaded machine delays a few flushes more)
    assert 0.9 * min(DELIVERY_FLUSH_MAX, 60 / PAYLOAD_RATE) <= median, loaded
    assert median < DELIVERY_FLUSH_MAX + 0.03, loaded


def test_a_send_is_one_batch_per_edge_and_counts_connections(presence):
    client = PublishOnly()
    p = presence(client)
    p.update("e1", {"alice": 2, "bob": 1})
    p.update("e2", {"alice": 1, "carol": 1})
    assert p.deliver(["alice", "bob", "carol", "offline"], Message("s", b"hi")) == 5
    assert _published(client) == [{
        EDGE.format("e1"): [(b"hi", ["alice", "bob"])],
        EDGE.format("e2"): [(b"hi", ["alice", "carol"])],
    }]
    assert (p.deliveries, p.batches_lost) == (5, 0)
    assert p.deliver(["offline"], Message("s", b"nobody")) == 0
    assert len(client.rounds) == 1  # nothing published for nobody


def test_sends_routed_together_share_one_payload_per_edge(presence):
    client = PublishOnly()
    p = presence(client)
    p.update("e1", {"alice": 1})
    p.update("e2", {"bob": 1})
    sends = [gevent.spawn(p.deliver, users, Message("s", body))
             for users, body in ((["alice", "bob"], b"1"), (["alice"], b"2"))]
    gevent.joinall(sends, timeout=5, raise_error=True)
    assert [g.value for g in sends] == [2, 1]
    assert _published(client) == [{
        EDGE.format("e1"): [(b"1", ["alice"]), (b"2", ["alice"])],
        EDGE.format("e2"): [(b"1", ["bob"])],
    }]


def test_a_batch_nobody_heard_is_counted_lost_not_delivered(presence):
    client = PublishOnly({EDGE.format("e2"): 0})  # e2 is not (yet) subscribed
    p = presence(client)
    p.update("e1", {"alice": 2})
    p.update("e2", {"bob": 3})
    assert p.deliver(["alice", "bob"], Message("s", b"x")) == 2
    assert (p.deliveries, p.batches_lost) == (2, 1)

    client.down = True
    assert p.deliver(["alice", "bob"], Message("s", b"y")) == 0
    assert (p.deliveries, p.batches_lost) == (2, 3)


def test_a_later_id_grouped_first_waits_for_the_earlier_one(presence):
    """Ids leave in order, each edge's batch sorted; settle() frees one a lookup never grouped."""
    client = PublishOnly()
    p = presence(client)
    p.update("e1", {"alice": 1})
    p.update("e2", {"bob": 1})
    base = 1 << 64
    p.settle(base + 1)  # the router: base + 1 is the smallest id on its way
    later = gevent.spawn(p.deliver, ["alice", "bob"], Message("small", b"2", base + 2))
    gevent.sleep(0.05)
    assert client.rounds == []  # base + 1 is still being grouped
    assert p.deliver(["alice"], Message("big", b"1", base + 1)) == 1
    assert later.get(timeout=5) == 2
    assert _published(client) == [{
        EDGE.format("e1"): [(b"1", ["alice"]), (b"2", ["alice"])],
        EDGE.format("e2"): [(b"2", ["bob"])],
    }]
    # base + 3's lookup failed, so it never reached deliver(): the router's
    # settle() says it is done, and base + 4 goes.
    stuck = gevent.spawn(p.deliver, ["alice"], Message("s", b"4", base + 4))
    gevent.sleep(0.05)
    assert len(client.rounds) == 1
    p.settle(base + 4)
    assert stuck.get(timeout=5) == 1
    assert _published(client)[1:] == [{EDGE.format("e1"): [(b"4", ["alice"])]}]


def test_ids_grouped_in_any_order_leave_sorted_once_the_smallest_is_grouped(presence):
    """Many ids grouped out of order behind a slow one: none leaves early, all leave sorted."""
    import random

    client = PublishOnly()
    p = presence(client)
    p.update("e1", {"alice": 1})
    base = 1 << 64
    p.settle(base + 1)
    later = list(range(base + 2, base + 302))
    random.Random(7).shuffle(later)
    waiting = [gevent.spawn(p.deliver, ["alice"], Message("s", str(k - base).encode(), k))
               for k in later]
    gevent.sleep(0.05)
    assert client.rounds == []  # base + 1 is still being grouped
    p.deliver(["alice"], Message("s", b"1", base + 1))
    gevent.joinall(waiting, timeout=5)
    assert all(g.value == 1 for g in waiting)
    bodies = [body for r in _published(client) for body, _ in r[EDGE.format("e1")]]
    assert bodies == [str(i).encode() for i in range(1, 302)]


def test_a_flush_looks_up_ints_names_and_users_on_several_edges_alike(presence):
    """The router's array path gives what a walk of presence.users gives, encoded canonically."""
    client = PublishOnly()
    p = presence(client)
    big, far = str(DENSE_LIMIT + 5), str(DENSE_LIMIT + 6)  # beyond the lookup table
    p.update("e1", {"1": 1, "2": 2, "alice": 1, "7": 1})
    p.update("e2", {"3": 1, "7": 2, "bob": 1, big: 1})  # 7: on two edges
    p.update("e3", {"4": 1, "007": 3})  # "007" is a name, not 7
    base = 1 << 64
    p.settle(base + 1)
    sends = [
        (["1", "2", "3", "7", "alice", "5", "carol"], Message("rj", b"one", base + 1)),
        ([far, big, "4", "007"], Message("9", b"two\n", base + 2)),
        (["bob"], Message("user:7", b"", base + 3)),
        (["5", far], Message("rj", b"to nobody", base + 4)),
        (["2", "3", "4"], Message("rj", b"\xff three", base + 5)),
    ]
    assert p.deliver_many(sends) == [8, 5, 1, 0, 4]
    assert p.deliveries == 18
    [published] = client.rounds
    got = {ch: decode_batch(payload) for ch, payload in published}
    for ch, payload in published:
        assert encode_batch(got[ch]) == payload  # the router's bytes are encode_batch's
    expected = {}
    for edge in ("e1", "e2", "e3"):
        expected[EDGE.format(edge)] = [
            (m.key, m.subject, m.body, sorted(u for u in users if edge in p.users.get(u, {})))
            for users, m in sends if any(edge in p.users.get(u, {}) for u in users)]
    assert {ch: [(m.key, m.subject, m.body, sorted(users)) for m, users in entries]
            for ch, entries in got.items()} == expected


def test_the_lookup_table_follows_every_presence_change(presence):
    import random

    rng = random.Random(3)
    p = presence()
    edges = [f"e{i}" for i in range(5)]
    ids = np.arange(300, dtype=np.uint32)
    for step in range(400):
        edge, users = rng.choice(edges), [str(rng.randrange(300)) for _ in range(5)]
        action = rng.random()
        if action < 0.6:
            p.update(edge, {u: rng.choice((0, 1, 2, 1 << 16)) for u in users})
        elif action < 0.8:
            p.update(edge, dict.fromkeys(users, 1), snapshot=True)
        elif action < 0.95:
            p.resumed(edge, users[0], step)
        else:
            p.forget_edge(edge)
        values = p._lookup(ids).tolist()
        for number, value in enumerate(values):
            where = p.users.get(str(number), {})
            if not where:
                assert value == 0, (step, number)
            elif value == backplane._ELSEWHERE:
                assert len(where) > 1 or max(where.values()) > backplane._MAX_COUNT
            else:
                edge_of = p._slot_edge[value & backplane._SLOT_MASK]
                assert where == {edge_of: value >> backplane._SLOT_BITS}, (step, number)
    assert len(p._slot_edge) <= len(edges)  # a forgotten edge's slot is used again


def test_the_routers_recipients_are_the_walks_each_once(presence, monkeypatch):
    monkeypatch.setattr(backplane, "GROUP_BATCH", 4)  # the large-set steps, on a small set
    client = PublishOnly()
    p = presence(client)
    p.update("e1", {str(i): 1 for i in range(0, 40, 3)} | {"alice": 1, "rj": 1})
    online = p.index
    cases = [
        ("6", range(1, 3), ()),  # the subject, online, not in its own set
        ("6", range(0, 12), ()),  # the subject in its own set
        ("rj", range(0, 30), ("alice", "bob", "rj")),  # a name, also in its own set
        ("5", range(0, 40), ("alice",)),  # a set larger than a step
        ("41", (), ()),  # nobody
    ]
    # All in one flush: each message's senders are checked against its own set.
    views = [SetView(encode_set(ints, names)) for _, ints, names in cases]
    p.deliver_many([(p.recipients(subject, view, online), Message(subject, b"", k))
                    for k, ((subject, _, _), view) in enumerate(zip(cases, views, strict=True), 1)])
    got = {m.key: users for r in _published_entries(client) for m, users in r}
    for k, ((subject, _, _), view) in enumerate(zip(cases, views, strict=True), 1):
        walked = sorted(u for u in recipients(subject, view, online) if p.online(u))
        assert sorted(got.get(k, [])) == walked, subject  # each once, as the walk
