"""Admission limits (cometd.limits) against real servers, in both modes, both ways in.

Every stream request here goes either the accept callback's way (a plain
request) or pywsgi's (the same request with ``Content-Length: 0``, which the
fast path leaves to pywsgi); each limit must refuse both alike, with its
status, ``Retry-After``, a JSON error, a closed connection and its counter.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from conftest import COMETD, ROOT, StreamClient, get_stats, start_server, unique_id, wait_for

from cometd import limits

WAYS = ("fast", "pywsgi")


def _connect(srv, source: str | None) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(10)
    if source:
        sock.bind((source, 0))
    sock.connect((srv.host, srv.port))
    return sock


def open_stream(srv, user: str, way: str = "fast", source: str | None = None) -> StreamClient:
    """A stream of *user* from *source*, its request taking *way* into the server."""
    sock = _connect(srv, source)
    extra = "Content-Length: 0\r\n" if way == "pywsgi" else ""
    sock.sendall(f"GET /test/{user} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    return StreamClient(sock)


def assert_refused(client: StreamClient, status: int, words: str) -> int:
    """*client* got *status* with a JSON error saying *words* and was closed; its Retry-After."""
    assert client.status == status, (client.status_line, client.headers)
    assert client.headers["content-type"] == "application/json"
    assert client.headers["connection"] == "close"
    retry = int(client.headers["retry-after"])
    assert retry >= 1
    body = bytes(client.raw)
    while len(body) < int(client.headers["content-length"]):
        more = client.sock.recv(4096)
        assert more, body
        body += more
    assert words in json.loads(body)["error"]
    client.sock.settimeout(5)
    assert client.sock.recv(1) == b""  # closed after the answer
    client.close()
    return retry


def test_an_eleventh_stream_of_one_id_is_429_by_default(tmp_path, mode):
    srv = start_server(str(tmp_path / "db"), "--mode", mode)
    try:
        user = unique_id("u")
        held = [open_stream(srv, user, WAYS[i % 2]) for i in range(10)]
        assert all(c.status == 200 for c in held)
        for way in WAYS:
            assert_refused(open_stream(srv, user, way), 429, "too many streams for this id")
        # Another id is not affected, and a closed stream frees its place.
        with open_stream(srv, unique_id("other")) as other:
            assert other.status == 200
        held.pop().close()
        wait_for(lambda: get_stats(srv)["connections"] == 9, 10, what="the hang-up noticed")
        with open_stream(srv, user) as again:
            assert again.status == 200
            stats = get_stats(srv)
        assert stats["rejected"]["per_user"] == 2
        assert stats["connections"] == 10
        for c in held:
            c.close()
    finally:
        srv.stop()


def test_streams_per_address(tmp_path, mode):
    srv = start_server(str(tmp_path / "db"), "--mode", mode, "--max-streams-per-address", "3")
    try:
        held = [open_stream(srv, unique_id("a"), WAYS[i % 2], "127.0.0.2") for i in range(3)]
        for way in WAYS:
            assert_refused(open_stream(srv, unique_id("a"), way, "127.0.0.2"), 429,
                           "too many streams from this address")
        with open_stream(srv, unique_id("b"), source="127.0.0.3") as elsewhere:
            assert elsewhere.status == 200
        held.pop().close()
        wait_for(lambda: get_stats(srv)["connections"] == 2, 10, what="the hang-up noticed")
        with open_stream(srv, unique_id("a"), source="127.0.0.2") as again:
            assert again.status == 200
        assert get_stats(srv)["rejected"]["per_address"] == 2
        for c in held:
            c.close()
    finally:
        srv.stop()


@pytest.mark.parametrize("way", WAYS)
def test_new_streams_per_second_per_address(tmp_path, mode, way):
    # 0.5 a second: one at once, then one every two seconds.
    srv = start_server(str(tmp_path / "db"), "--mode", mode,
                       "--stream-rate-per-address", "0.5")
    try:
        first = open_stream(srv, unique_id("r"), way, "127.0.0.4")
        assert first.status == 200
        retry = assert_refused(open_stream(srv, unique_id("r"), way, "127.0.0.4"), 429,
                               "too many new streams from this address")
        assert retry == 2
        with open_stream(srv, unique_id("r"), way, "127.0.0.5") as other:
            assert other.status == 200
        time.sleep(retry)
        with open_stream(srv, unique_id("r"), way, "127.0.0.4") as later:
            assert later.status == 200
        assert get_stats(srv)["rejected"]["rate"] == 1
        first.close()
    finally:
        srv.stop()


def test_process_wide_limit_is_503(tmp_path, mode):
    srv = start_server(str(tmp_path / "db"), "--mode", mode, "--max-connections", "4")
    try:
        held = [open_stream(srv, unique_id("p"), WAYS[i % 2]) for i in range(4)]
        for way in WAYS:
            assert_refused(open_stream(srv, unique_id("p"), way), 503, "server full")
        held.pop().close()
        wait_for(lambda: get_stats(srv)["connections"] == 3, 10, what="the hang-up noticed")
        with open_stream(srv, unique_id("p")) as again:
            assert again.status == 200
        stats = get_stats(srv)  # other requests are still served
        assert stats["rejected"] == {"connections": 2, "per_user": 0, "per_address": 0,
                                     "rate": 0}
        for c in held:
            c.close()
    finally:
        srv.stop()


def test_limits_off(tmp_path):
    srv = start_server(str(tmp_path / "db"), "--max-streams-per-user", "0")
    try:
        user = unique_id("many")
        held = [open_stream(srv, user) for _ in range(12)]
        assert all(c.status == 200 for c in held)
        assert get_stats(srv)["rejected"]["per_user"] == 0
        for c in held:
            c.close()
    finally:
        srv.stop()


@pytest.mark.parametrize("flag,value", [("--max-streams-per-user", "-1"),
                                        ("--max-connections", "many"),
                                        ("--stream-rate-per-address", "-0.5")])
def test_a_bad_limit_is_a_clear_error(tmp_path, flag, value):
    proc = subprocess.run([sys.executable, COMETD, "--db", str(tmp_path / "db"), flag, value],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"cometd: error: {flag}: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "db").exists()


def test_by_default_the_cap_is_the_open_file_limit_less_200(tmp_path, mode):
    # RLIMIT_NOFILE 230: at most 30 streams, the rest kept for everything else.
    srv = start_server(str(tmp_path / "db"), "--mode", mode,
                       prefix=["prlimit", "--nofile=230:230"])
    try:
        held = [open_stream(srv, unique_id("d")) for _ in range(30)]
        assert all(c.status == 200 for c in held)
        assert_refused(open_stream(srv, unique_id("d")), 503, "server full")
        # Requests that hold descriptors past the headroom (unfinished ones, in
        # pywsgi until their timeout): accepting pauses, nothing fails or logs.
        idle = []
        for _ in range(220):
            sock = socket.socket()
            sock.connect((srv.host, srv.port))
            sock.sendall(b"GET /stats HTTP/1.1\r\n")
            idle.append(sock)
        time.sleep(1)
        for sock in idle:
            sock.close()
        stats = wait_for(lambda: _stats_or_none(srv), 10, what="an answer after EMFILE")
        assert stats["connections"] == 30 and stats["rejected"]["connections"] == 1
        assert "Traceback" not in "".join(srv.output), "".join(srv.output)
        for c in held:
            c.close()
    finally:
        srv.stop()


def _stats_or_none(srv):
    try:
        return get_stats(srv)
    except OSError:
        return None


class _Table:
    """What Admission reads of a ConnectionTable: counts only (pure logic)."""

    def __init__(self) -> None:
        self.rejected: dict[str, int] = {}
        self.addresses: dict[str, int] = {}
        self.connections = 0

    def online(self, user: str) -> int:
        return 0


def test_rate_buckets_stay_bounded(monkeypatch):
    monkeypatch.setattr(limits, "MAX_BUCKETS", 100)
    admission = limits.Admission(_Table(), 0, 0, 0, rate=1000.0)  # full again within 1 s
    for i in range(100):
        assert admission.admit("u", f"10.0.0.{i}") is None
    assert len(admission._buckets) == 100
    time.sleep(1.05)
    for i in range(50):
        assert admission.admit("u", f"10.0.1.{i}") is None
    # The 151st address: the 100 idle (full) buckets are swept, the 50 fresh ones kept.
    assert admission.admit("u", "10.0.2.1") is None
    assert len(admission._buckets) == 51
    # A flood of fresh addresses: never more than MAX_BUCKETS entries.
    for i in range(1000):
        admission.admit("u", f"10.1.{i // 250}.{i % 250}")
        assert len(admission._buckets) <= 100


def test_an_edge_behind_workers_applies_the_limits(tmp_path, redis_server):
    srv = start_server(str(tmp_path / "db"), "--workers", "1", "--redis", redis_server.url,
                       "--max-streams-per-user", "2", timeout=40)
    try:
        user = unique_id("w")
        held = [open_stream(srv, user, way) for way in WAYS]
        assert all(c.status == 200 for c in held)
        assert_refused(open_stream(srv, user), 429, "too many streams for this id (at most 2)")
        assert get_stats(srv)["edge"]["rejected"]["per_user"] == 1
        for c in held:
            c.close()
    finally:
        srv.stop()
