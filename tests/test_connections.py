"""The connection table against a real `bin/cometd`, in both connection modes, and in-process.

Several connections per user, noticing disconnects with nothing to send, and
slow consumers: a client that stops reading is dropped once its pending output
passes `--max-pending`, without hurting anyone else or the server's memory.
The in-process tests at the end drive a ConnectionTable over loopback socket
pairs in this process: framing per kind, keepalives, the last chunk of a
clean shutdown, slow consumers and hang-ups.
"""

from __future__ import annotations

import socket
import time

import gevent
import pytest
from conftest import (
    StreamClient,
    get_stats,
    http_json,
    peak_rss,
    send,
    start_server,
    tcp_queues,
    unique_id,
    wait_for,
)
from gevent import socket as gsocket
from greenlet import greenlet

from cometd.connections import MODES, ConnectionTable
from cometd.online import recipients
from cometd.store import SetView, encode_set
from cometd.streamhttp import CHUNKED, KEEPALIVE, LAST_CHUNK, RAW, SSE_CHUNKED, SSE_RAW, Message

MAX_PENDING = 64 * 1024  # --max-pending, well under the 256 KiB default


@pytest.fixture(scope="module", params=MODES)
def srv(request, tmp_path_factory):
    s = start_server(str(tmp_path_factory.mktemp("conns") / "db"), "--mode", request.param,
                     "--admin-port", "-1", "--max-pending", str(MAX_PENDING))
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def no_leftover_streams(request):
    if "srv" in request.fixturenames:  # the in-process tests below start no server
        srv = request.getfixturevalue("srv")
        wait_for(lambda: get_stats(srv)["connections"] == 0, 5, what="no connections left")


def _counts(srv) -> tuple[int, int]:
    s = get_stats(srv)
    return s["connections"], s["users_online"]


def test_every_connection_of_a_user_gets_every_message(srv):
    user = unique_id("multi")
    clients = [StreamClient.open(srv, f"/test/{user}") for _ in range(3)]
    sse = StreamClient.open(srv, f"/events/{user}")
    old = StreamClient.open(srv, f"/test/{user}", http10=True)
    try:
        for c in clients:
            c.chunk()
        sse.chunk()
        welcome = f"Welcome, Url: '/test/{user}' Id: {user}\n".encode()
        assert old.read_raw(len(welcome)) == welcome
        assert _counts(srv) == (5, 1)
        bodies = [f"message {i}".encode() for i in range(20)]
        for body in bodies:
            assert send(srv, user, body) == 5
        for c in clients:
            assert c.chunks(len(bodies)) == bodies
        assert old.read_raw(sum(map(len, bodies))) == b"".join(bodies)
        got = []
        while len(got) < len(bodies):
            text = sse.chunk().decode()
            if not text.startswith(":"):
                got.append(text)
        assert all(f'"body": "message {i}"' in text for i, text in enumerate(got))
    finally:
        for c in [*clients, sse, old]:
            c.close()


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_disconnect_is_noticed_within_a_second_without_traffic(srv, reset):
    user, other = unique_id("gone"), unique_id("stays")
    a = StreamClient.open(srv, f"/test/{user}")
    b = StreamClient.open(srv, f"/events/{user}")
    keep = StreamClient.open(srv, f"/test/{other}")
    try:
        for c in (a, b, keep):
            c.chunk()
        assert _counts(srv) == (3, 2)
        # Nothing is ever sent to `user`: only the hang-up itself can tell the server.
        start = time.monotonic()
        a.close(reset=reset)
        wait_for(lambda: _counts(srv) == (2, 2), 1.0, what="first connection dropped")
        assert time.monotonic() - start < 1.0
        assert send(srv, user, "to the one left") == 1
        assert b.chunk().startswith(b"id: ")
        start = time.monotonic()
        b.close(reset=reset)
        wait_for(lambda: _counts(srv) == (1, 1), 1.0, what="user gone offline")
        assert time.monotonic() - start < 1.0
        assert send(srv, user, "to nobody") == 0
        assert send(srv, other, "still here") == 1
        assert keep.chunk() == b"still here"
    finally:
        for c in (a, b, keep):
            c.close()


def test_half_close_and_stray_bytes(srv):
    user = unique_id("half")
    # A client that half-closes its side has hung up.
    c = StreamClient.open(srv, f"/test/{user}")
    c.chunk()
    c.sock.shutdown(1)  # SHUT_WR
    wait_for(lambda: _counts(srv) == (0, 0), 1.0, what="half-closed stream dropped")
    c.wait_closed(5)
    c.close()
    # One that sends stray bytes on its stream is ignored, not dropped.
    c = StreamClient.open(srv, f"/test/{user}")
    try:
        c.chunk()
        c.sock.sendall(b"GET /stats HTTP/1.1\r\n\r\nnoise\x00\xff")
        assert send(srv, user, "still streaming") == 1
        assert c.chunk() == b"still streaming"
        assert _counts(srv) == (1, 1)
    finally:
        c.close()


def _server_pending(srv, clients: list[StreamClient], offered: int) -> int:
    """The most bytes offered to one of *clients* (since it was last drained)
    that no kernel holds.

    The clients read nothing more, so everything the server's kernel accepted
    is still in its socket's send queue (SIOCOUTQ) or in the client's receive
    queue (SIOCINQ); the rest can only be in the server's own memory.
    """
    queues = tcp_queues(srv.port)
    there = f"{srv.host}:{srv.port}"
    most = None
    for client in clients:
        host, port = client.sock.getsockname()
        here = f"{host}:{port}"
        server_side, client_side = queues.get((there, here)), queues.get((here, there))
        assert server_side is not None and client_side is not None, "stream socket gone"
        pending = offered - server_side[0] - client_side[1]
        most = pending if most is None else max(most, pending)
    return most


def test_slow_consumers_are_dropped_and_nobody_else_suffers(srv):
    subject, reader = unique_id("src"), unique_id("reader")
    slow_users = [unique_id("slow") for _ in range(6)]
    http_json(srv, "POST", "/subscriptions", [[u, subject] for u in [reader, *slow_users]])
    slow = [StreamClient.open(srv, f"/test/{u}", rcvbuf=4096) for u in slow_users]
    fast = StreamClient.open(srv, f"/test/{reader}")
    for c in [*slow, fast]:
        c.chunk()  # the welcome: from here on the slow clients read nothing
    before = get_stats(srv)
    peak_before = peak_rss(srv.proc.pid)
    size = 32 * 1024
    got, bodies, deliveries, held = [], [], [], []
    offered = 0  # bytes of message frames sent to each slow client
    try:
        for i in range(400):
            body = b"%08d" % i + bytes([65 + i % 26]) * (size - 8)
            bodies.append(body)
            deliveries.append(send(srv, subject, body))
            if deliveries[-1] == 1:
                break
            offered += len(b"%x\r\n%s\r\n" % (len(body), body))
            # the fast reader keeps up as it goes
            got.extend(fast.chunks(1, timeout=30))
            # While a slow client is kept, what the server holds for it is within
            # --max-pending: all the rest of what it was offered is in the kernels.
            held.append(_server_pending(srv, slow, offered))
            assert held[-1] <= MAX_PENDING, (i, held)
        assert deliveries[-1] == 1, f"slow consumers still fed after {len(deliveries)} messages"
        assert deliveries == [1 + len(slow)] * (len(deliveries) - 1) + [1], deliveries
        # ...and it was dropped for passing the limit, not before: the message it
        # was dropped at would have taken it past --max-pending.
        assert held[-1] + size > MAX_PENDING, (held, offered)
        # a few more, with only the fast reader left
        for i in range(len(bodies), len(bodies) + 5):
            body = b"%08d" % i + b"z" * 100
            bodies.append(body)
            assert send(srv, subject, body) == 1
        got.extend(fast.chunks(len(bodies) - len(got), timeout=30))
        assert got == bodies  # every message, in order, none lost to its neighbours' stall
        after = get_stats(srv)
        assert after["slow_consumers_dropped"] - before["slow_consumers_dropped"] == len(slow)
        assert (after["connections"], after["users_online"]) == (1, 1)
        # memory: at its peak the server held no more than ~max_pending per stalled client
        growth = peak_rss(srv.proc.pid) - peak_before
        assert growth < len(slow) * (MAX_PENDING + size) + 4 * 1024 * 1024, (growth, offered)
        # each slow client's stream was closed by the server: it ends when drained
        for c in slow:
            c.sock.settimeout(30)
            c.wait_closed(30)
            assert c.eof
    finally:
        fast.close()
        for c in slow:
            c.close()
    assert "Traceback" not in "".join(srv.output)


def test_rss_stays_bounded_with_many_stalled_readers(srv):
    """Many readers stall at once while a lot is published: memory does not follow."""
    subject = unique_id("flood")
    users = [unique_id("stall") for _ in range(40)]
    http_json(srv, "POST", "/subscriptions", [[u, subject] for u in users])
    stalled = [StreamClient.open(srv, f"/test/{u}", rcvbuf=4096) for u in users]
    try:
        before = get_stats(srv)
        peak_before = peak_rss(srv.proc.pid)
        body = b"m" * (32 * 1024)
        total = 0
        for _ in range(400):
            delivered = send(srv, subject, body)
            total += delivered * len(body)
            if delivered == 0:
                break
        assert delivered == 0, "stalled readers were never dropped"
        after = get_stats(srv)
        assert after["slow_consumers_dropped"] - before["slow_consumers_dropped"] == len(users)
        # peak, not current, memory: buffers freed at the drop do not hide what was held
        growth = peak_rss(srv.proc.pid) - peak_before
        # each was dropped for holding more than max_pending, not for anything else
        assert total > len(users) * MAX_PENDING
        assert growth < len(users) * (MAX_PENDING + len(body)) + 4 * 1024 * 1024, (growth, total)
    finally:
        for c in stalled:
            c.close()


def test_sigterm_drains_streams_spread_over_drain_seconds(tmp_path, srv):
    """2,000 streams, --drain-seconds 1: each ends with its last chunk, spread over ~1 s."""
    import selectors
    import signal
    import socket

    mode = get_stats(srv)["mode"]
    drained = start_server(str(tmp_path / "db"), "--mode", mode, "--admin-port", "-1",
                           "--drain-seconds", "1")
    n = 2000
    clients = StreamClient.open_many(drained, [f"/test/d{i}" for i in range(n)])
    try:
        for c in clients:
            assert c.chunk().startswith(b"Welcome")
        wait_for(lambda: get_stats(drained)["connections"] == n, 10, what="all streams open")
        sel = selectors.DefaultSelector()
        for c in clients:
            c.sock.setblocking(False)
            sel.register(c.sock, selectors.EVENT_READ, c)
        ended: dict[StreamClient, float] = {}
        drained.proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        refused = None
        deadline = stopped + 15
        while len(ended) < n and time.monotonic() < deadline:
            for key, _ in sel.select(0.05):
                c = key.data
                data = c.sock.recv(65536)
                c._feed(data)
                if not data or c.parser.ended:
                    ended.setdefault(c, time.monotonic())
                    sel.unregister(c.sock)
            if refused is None and len(ended) < n / 2:
                try:  # no new stream while draining
                    socket.create_connection((drained.host, drained.port), timeout=1).close()
                except ConnectionRefusedError:
                    refused = True
        assert len(ended) == n
        assert all(c.parser.ended for c in clients)  # the last chunk, not a cut
        assert refused
        times = sorted(ended.values())
        assert times[-1] - times[0] > 0.7, times[-1] - times[0]
        # Spread, not bunched: the middle half takes about half the time.
        assert times[3 * n // 4] - times[n // 4] > 0.3
        assert drained.proc.wait(10) == 0
        # The operator is told when the drain starts and ends.
        said = wait_for(lambda: [ln for ln in drained.output if ln.startswith("cometd: drain")], 5,
                        what="the drain's log lines")
        assert [line.split(" streams")[0] for line in said] == [
            "cometd: draining 2000", "cometd: drained 2000"], said
    finally:
        for c in clients:
            c.close()
        drained.stop()


# -- in-process: a ConnectionTable over loopback socket pairs --------------------------


@pytest.fixture(params=MODES)
def table(request):
    t = ConnectionTable(request.param, max_pending=MAX_PENDING)
    t.presence_log = []
    t.on_presence = t.presence_log.append
    yield t
    t.close()


class Peer:
    """The client end of one adopted stream (a gevent socket, so reads let the table run)."""

    def __init__(self, table: ConnectionTable, user: str, kind: int, rcvbuf: int = 0) -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            self.sock = gsocket.socket()
            if rcvbuf:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.connect(listener.getsockname())
            server, _ = listener.accept()
        if rcvbuf:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
        self.conn = table.adopt(server, user, kind)
        if table.mode == "greenlet":  # as cometd.server adopts a stream
            hub = gevent.get_hub()
            hub.loop.run_callback(greenlet(self.conn.run, parent=hub).switch)
        self.data = b""

    def read(self, n: int, timeout: float = 5) -> bytes:
        """Exactly *n* more bytes."""
        with gevent.Timeout(timeout):
            while len(self.data) < n:
                chunk = self.sock.recv(65536)
                assert chunk, f"closed after {self.data!r}"
                self.data += chunk
        data, self.data = self.data[:n], self.data[n:]
        return data

    def rest(self, timeout: float = 5) -> bytes:
        """Everything until the table closes the stream."""
        with gevent.Timeout(timeout):
            while chunk := self.sock.recv(65536):
                self.data += chunk
        data, self.data = self.data, b""
        return data

    def nothing_more(self, wait: float = 0.05) -> bool:
        """No byte arrived, nor the end of the stream, within *wait* seconds."""
        gevent.sleep(wait)
        self.sock.setblocking(False)
        try:
            self.sock.recv(1)
        except (BlockingIOError, TimeoutError):
            return True
        finally:
            self.sock.setblocking(True)
        return False


def test_each_connection_gets_the_message_framed_for_its_kind(table):
    peers = {kind: Peer(table, "u", kind) for kind in (CHUNKED, RAW, SSE_CHUNKED, SSE_RAW)}
    other = Peer(table, "v", CHUNKED)
    message = Message("s", b"hello")
    assert table.deliver(["u", "offline"], message) == 4
    for kind, peer in peers.items():
        assert peer.read(len(message.frame(kind))) == message.frame(kind)
    assert other.nothing_more()
    assert table.deliveries == 4 and (table.connections, table.users_online) == (5, 2)

    assert table.keepalive() == 2  # SSE streams only
    assert peers[SSE_CHUNKED].read(len(KEEPALIVE) + 5) == b"d\r\n" + KEEPALIVE + b"\r\n"
    assert peers[SSE_RAW].read(len(KEEPALIVE)) == KEEPALIVE
    assert peers[CHUNKED].nothing_more() and peers[RAW].nothing_more()


def test_a_clean_shutdown_ends_chunked_streams_with_the_last_chunk(table):
    chunked, raw = Peer(table, "u", CHUNKED), Peer(table, "u", RAW)
    sse = Peer(table, "w", SSE_CHUNKED)
    table.deliver(["u"], Message("s", b"last words"))
    table.end_all(grace=2)
    assert chunked.rest() == b"a\r\nlast words\r\n" + LAST_CHUNK
    assert raw.rest() == b"last words"  # HTTP/1.0: the close is the end
    assert sse.rest() == LAST_CHUNK
    # Nothing reaches a stream after its last chunk.
    assert table.deliver(["u", "w"], Message("s", b"late")) == 0 and table.keepalive() == 0
    assert table.connections == 0


def test_kick_drain_and_shutdown_count_their_own_reason(table):
    kicked = [Peer(table, "k", CHUNKED), Peer(table, "k", SSE_RAW)]
    drained = [Peer(table, f"d{i}", RAW) for i in range(3)]
    assert table.kick("k") == 2
    for peer in kicked:
        peer.rest()
    table.drain(0.05)
    for peer in drained:
        peer.rest()
    late = Peer(table, "late", SSE_CHUNKED)
    table.end_all(grace=1)
    assert late.rest() == LAST_CHUNK
    assert {r: n for r, n in table.disconnects.items() if n} == {
        "kicked": 2, "drain": 3, "shutdown": 1}


def test_a_reader_that_stops_is_dropped_and_others_keep_up(table):
    stalled = Peer(table, "slow", CHUNKED, rcvbuf=4096)
    healthy = Peer(table, "fast", RAW)
    body = b"x" * 16384
    for _ in range(200):  # bounded: kernel buffers of a few hundred KiB, then MAX_PENDING
        table.deliver(["slow", "fast"], Message("s", body))
        assert healthy.read(len(body)) == body
        if stalled.conn.closed:
            break
    assert stalled.conn.closed and table.slow_consumers_dropped == 1
    assert (table.online("slow"), table.online("fast")) == (0, 1)
    assert table.presence_log.count("slow") == 2  # logged in, then out


def test_a_reader_that_pauses_gets_everything_in_order_when_it_reads_again(table):
    # Each message is sent straight from deliver while nothing is queued; once
    # the kernel buffer is full, the rest waits in the outbox for the writer.
    paused = Peer(table, "p", RAW, rcvbuf=4096)
    gevent.sleep(0.01)  # a greenlet-mode writer starts and parks
    # the first small, then 56 KB: past the kernel's buffers, within MAX_PENDING
    messages = [b"%04d" % i + b"y" * (100 if i == 0 else 8000) for i in range(8)]
    for i, body in enumerate(messages):
        assert table.deliver(["p"], Message("s", body)) == 1
        if i == 0:
            assert not paused.conn._out  # the first went straight to the kernel
    assert paused.conn._out and not paused.conn.closed  # the rest is queued, within bounds
    assert paused.read(sum(map(len, messages))) == b"".join(messages)
    with gevent.Timeout(2):
        while paused.conn._out:
            gevent.sleep(0.005)
    late = Message("s", b"after the backlog")
    assert table.deliver(["p"], late) == 1
    assert paused.read(len(late.body)) == late.body


def test_the_index_hands_the_router_each_users_connections(table):
    first = Peer(table, "1", CHUNKED)
    index = table.index  # built from who is online, then kept as they come and go
    two = [Peer(table, "2", CHUNKED), Peer(table, "2", RAW)]
    bob = Peer(table, "bob", CHUNKED)
    assert index.ints[1] is table.users["1"] and index.ints[2] is table.users["2"]
    assert index.names["bob"] is table.users["bob"]
    message = Message("2", b"hi", 1)
    walk = recipients("2", SetView(encode_set({1, 2, 3}, {"bob", "eve"})), index)
    assert table.deliver_online(walk, message) == 4
    for peer in (first, *two, bob):
        assert peer.read(len(message.frame(peer.conn.kind))) == message.frame(peer.conn.kind)
    bob.conn.close()
    assert "bob" not in index.names and len(index) == 2
    # A list handed out before its user left is passed over.
    left = table.users["1"]
    first.conn.close()
    assert 1 not in index.ints
    assert table.deliver_online([left, table.users["2"]], Message("2", b"x", 2)) == 2
    assert table.deliveries == 6


def test_a_stream_whose_send_fails_is_closed_uncounted_and_the_fan_out_goes_on(table):
    gone = Peer(table, "gone", CHUNKED)
    both = [Peer(table, "two", CHUNKED), Peer(table, "two", SSE_RAW)]
    last = Peer(table, "last", RAW)
    # The client resets its end; no loop turn lets the table notice before the send.
    gone.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    gone.sock.close()
    message = Message("s", b"still here", 7)
    assert table.deliver(["gone", "two", "last"], message) == 3
    for peer in (*both, last):
        assert peer.read(len(message.frame(peer.conn.kind))) == message.frame(peer.conn.kind)
    assert table.deliveries == 3 and table.disconnects["error"] == 1
    assert (table.online("gone"), table.online("two"), table.connections) == (0, 2, 3)


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_a_hang_up_is_noticed_with_nothing_to_send(table, reset):
    peer = Peer(table, "u", SSE_RAW)
    if reset:
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    peer.sock.close()
    with gevent.Timeout(1):
        while table.online("u"):
            gevent.sleep(0.005)
    assert table.connections == 0 and table.presence_log == ["u", "u"]


def test_counts_by_kind_and_pending_output_follow_the_connections(table):
    """What /metrics reads (kept as things change, not walked) agrees with a walk."""

    def walked() -> tuple[list[int], int]:
        by_kind = [0] * len(table.by_kind)
        for conn in table._by_fd.values():
            by_kind[conn.kind] += 1
        return by_kind, sum(conn._pending for conn in table._by_fd.values())

    peers = [Peer(table, "a", CHUNKED), Peer(table, "b", SSE_CHUNKED), Peer(table, "c", RAW)]
    paused = Peer(table, "p", RAW, rcvbuf=4096)
    stalled = Peer(table, "s", CHUNKED, rcvbuf=4096)
    gevent.sleep(0.01)
    assert (table.by_kind, table.pending) == walked() == ([2, 2, 1, 0, 0, 0], 0)
    body = b"z" * 8000
    for _ in range(8):  # past the kernel's buffers, within MAX_PENDING
        table.deliver(["p"], Message("s", body))
    assert table.pending > 0 and (table.by_kind, table.pending) == walked()
    assert paused.read(8 * len(body)) == body * 8  # read: the outbox drains
    with gevent.Timeout(2):
        while paused.conn._out:
            gevent.sleep(0.005)
    assert (table.by_kind, table.pending) == walked() and table.pending == 0
    for _ in range(200):  # a slow consumer dropped with output queued
        table.deliver(["s"], Message("s", b"x" * 16384))
        if stalled.conn.closed:
            break
    assert stalled.conn.closed and table.slow_consumers_dropped == 1
    peers[1].sock.close()  # a hang-up
    with gevent.Timeout(2):
        while table.by_kind[SSE_CHUNKED]:
            gevent.sleep(0.005)
    assert (table.by_kind, table.pending) == walked() == ([1, 2, 0, 0, 0, 0], 0)


def test_a_keepalive_round_spread_over_parts_reaches_each_stream_once(table):
    sse = [Peer(table, f"s{i}", SSE_RAW) for i in range(6)]
    chunked = [Peer(table, f"c{i}", CHUNKED) for i in range(2)]
    done = [table.keepalive(part, 3) for part in range(3)]
    assert sum(done) == 6 and max(done) < 6  # each slice its own streams, not all of them
    for peer in sse:
        assert peer.read(len(KEEPALIVE)) == KEEPALIVE
        assert peer.nothing_more()  # one each
    assert all(peer.nothing_more() for peer in chunked)
