"""The connection table against a real `bin/cometd`, in both connection modes.

Several connections per user, noticing disconnects with nothing to send, and
slow consumers: a client that stops reading is dropped once its pending output
passes `--max-pending`, without hurting anyone else or the server's memory.
"""

from __future__ import annotations

import time

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

from cometd.connections import MODES

MAX_PENDING = 64 * 1024  # --max-pending, well under the 256 KiB default


@pytest.fixture(scope="module", params=MODES)
def srv(request, tmp_path_factory):
    s = start_server(str(tmp_path_factory.mktemp("conns") / "db"), "--mode", request.param,
                     "--admin-port", "-1", "--max-pending", str(MAX_PENDING))
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def no_leftover_streams(srv):
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
