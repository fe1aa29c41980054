"""Tests for bin/floodtest, run as a real subprocess against a real HTTP server.

The server is a PROTOCOL STAND-IN (``serve`` below), not cometd: a few dozen
lines of gevent that speak the wire protocol the load tools rely on, so these
tests do not wait for the real server. To switch to the real server later,
replace the ``standin`` fixture with one that starts ``bin/cometd``.

What the stand-in does:

- ``GET /test/<id>`` -> 200, chunked; first chunk ``Welcome, Url: '/test/<id>' Id: <id>\\n``,
  then (with ``--tick T``) a ``ts=<time>;tick=<n>;`` chunk every T seconds, and every
  message POSTed to ``<id>``. With ``--drop-every K`` every K-th stream is closed
  right after its welcome.
- ``POST /send/<subject>`` -> 200 ``{"delivered": N}`` (N = streams open for that id);
  413 above 64 KiB; ``--post-delay S`` makes each POST take S seconds.
- ``GET /stats`` -> JSON: stream peers by source address and by server port, POST
  counts by subject and body size, how many bodies started with ``ts=``.

Run it by hand with ``python tests/loadtest/test_floodtest.py --port 8000 --tick 1``.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import resource
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLOODTEST = ROOT / "bin" / "floodtest"


# --------------------------------------------------------------------------------------
# Protocol stand-in server (runs in its own process: python tests/loadtest/test_floodtest.py ...)
# --------------------------------------------------------------------------------------


def serve(ports: list[int], tick: float, drop_every: int, post_delay: float) -> None:
    import resource

    import gevent
    from gevent.server import StreamServer

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    streams: dict[str, set] = defaultdict(set)
    peers, by_port, posts, sizes = Counter(), Counter(), Counter(), Counter()
    ts_bodies = [0]
    seq = itertools.count(1)

    def chunk(payload: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(payload), payload)

    def reply(sock, status: str, obj) -> None:
        body = json.dumps(obj).encode()
        head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)

    def stream(sock, addr, uid: str) -> None:
        peers[addr[0]] += 1
        by_port[sock.getsockname()[1]] += 1
        welcome = f"Welcome, Url: '/test/{uid}' Id: {uid}\n".encode()
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunk(welcome)
        )
        if drop_every and next(seq) % drop_every == 0:
            return
        streams[uid].add(sock)
        try:
            if tick > 0:
                for i in itertools.count(1):
                    gevent.sleep(tick)
                    sock.sendall(chunk(b"ts=%.6f;tick=%d;" % (time.time(), i)))
            else:
                while sock.recv(4096):
                    pass
        finally:
            streams[uid].discard(sock)

    def handle(sock, addr) -> None:
        rfile = sock.makefile("rb")
        try:
            while True:
                line = rfile.readline(65536)
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                length = 0
                while (h := rfile.readline(65536)) not in (b"\r\n", b"\n", b""):
                    name, _, value = h.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = rfile.read(length) if length else b""
                if method == "GET" and path.startswith("/test/"):
                    return stream(sock, addr, path[len("/test/") :])
                if method == "POST" and path.startswith("/send/"):
                    if length > 65536:
                        reply(sock, "413 Payload Too Large", {"error": "too large"})
                        continue
                    if post_delay:
                        gevent.sleep(post_delay)
                    subject = path[len("/send/") :]
                    posts[subject] += 1
                    sizes[len(body)] += 1
                    ts_bodies[0] += body.startswith(b"ts=")
                    targets = list(streams.get(subject, ()))
                    for s in targets:
                        try:
                            s.sendall(chunk(body))
                        except OSError:
                            pass
                    reply(sock, "200 OK", {"delivered": len(targets)})
                elif method == "GET" and path == "/stats":
                    reply(sock, "200 OK", {
                        "peers": peers, "ports": by_port, "posts": posts, "sizes": sizes,
                        "ts_bodies": ts_bodies[0],
                        "streams": sum(len(v) for v in streams.values()),
                    })
                else:
                    reply(sock, "404 Not Found", {"error": "not found"})
        except (OSError, ValueError):
            pass
        finally:
            rfile.close()
            sock.close()

    servers = [StreamServer(("127.0.0.1", p), handle, backlog=4096) for p in ports]
    for s in servers:
        s.start()
    print("PORTS", *[s.server_port for s in servers], flush=True)
    gevent.wait()


def _standin_main() -> None:
    ap = argparse.ArgumentParser(description="cometd protocol stand-in for the load-tool tests")
    ap.add_argument("--port", type=int, action="append", help="listen port (0: ephemeral)")
    ap.add_argument("--tick", type=float, default=0.0, help="seconds between ts= chunks")
    ap.add_argument("--drop-every", type=int, default=0, help="close every K-th stream")
    ap.add_argument("--post-delay", type=float, default=0.0, help="seconds per POST")
    a = ap.parse_args()
    serve(a.port or [0], a.tick, a.drop_every, a.post_delay)


class StandIn:
    """A running stand-in server process (also used by tests/loadtest/test_msggen.py)."""

    def __init__(self, *args: str, nports: int = 1) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve())]
        cmd += ["--port", "0"] * nports + list(args)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "PORTS", f"stand-in did not start: {line}"
        self.ports = [int(p) for p in line[1:]]
        self.port = self.ports[0]

    def stats(self) -> dict:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                data += s.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += s.recv(65536)
        return json.loads(body)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def run_tool(tool: Path, *args: str, tmp_path: Path, timeout: float = 30) -> tuple[dict, str]:
    """Run a load tool with ``--json``; return (summary, stdout+stderr)."""
    out = tmp_path / f"{tool.name}-{time.monotonic_ns()}.json"
    proc = subprocess.run(
        [sys.executable, str(tool), *args, "--json", str(out)],
        capture_output=True, text=True, timeout=timeout,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert "Traceback" not in text, text
    return json.loads(out.read_text()), text


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ticking():
    """A stand-in that sends a ts= chunk every 0.2 s on every stream."""
    s = StandIn("--tick", "0.2")
    yield s
    s.close()


def test_holds_streams_and_measures_latency(ticking, tmp_path):
    s, text = run_tool(
        FLOODTEST, "--port", str(ticking.port), "--n", "200", "--rate", "2000",
        "--duration", "1.5", "--first-id", "1000", "--interval", "0.5", tmp_path=tmp_path,
    )
    assert s["opened"] == 200 and s["open_max"] == 200 and s["open_end"] == 200
    assert s["welcomed"] == 200
    assert s["connect_errors"] == 0 and s["closed"] == 0 and s["http_errors"] == 0
    # ~1.6 s held at 5 ticks/s: each stream saw several ts= chunks.
    assert s["messages"] >= 200 * 4
    assert s["chunks"] == s["welcomed"] + s["messages"]
    lat = s["latency_ms"]
    assert lat["count"] == s["messages"]
    assert 0 <= lat["p50"] <= lat["p99"] <= lat["max"] < 1000
    assert lat["p50"] < 100
    assert s["bytes"] > s["chunks"] * 20
    assert "Open=200" in text and "Chunks=" in text and "latency ms p50=" in text
    assert s["duration_s"] < 6


def test_ramp_rate_is_honoured(ticking, tmp_path):
    s, _ = run_tool(
        FLOODTEST, "--port", str(ticking.port), "--n", "240", "--rate", "200",
        "--duration", "0.3", tmp_path=tmp_path,
    )
    assert s["opened"] == 240
    # Never faster than asked (240 at 200/s take 1.2 s); slower only by what a
    # busy machine costs, not by half (the exact rate is the benchmarks' business).
    assert s["ramp_rate"] <= 200 * 1.05, s
    assert 1.0 <= s["ramp_s"] <= 2.4, s


def test_a_ramp_wakes_once_for_several_connects(tmp_path):
    """At 200 connects/s a worker does not sleep and wake for each one (RAMP_GRAIN):
    without the grain it woke ~2 times a connection (the connect, then its welcome)."""
    server = StandIn()  # no ticks: nothing but the ramp wakes floodtest
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_nvcsw
        s, _ = run_tool(FLOODTEST, "--port", str(server.port), "--n", "200", "--rate", "200",
                        "--duration", "0.1", "--processes", "1", tmp_path=tmp_path)
        woke = resource.getrusage(resource.RUSAGE_CHILDREN).ru_nvcsw - before
    finally:
        server.close()
    assert s["opened"] == s["welcomed"] == 200 and s["ramp_rate"] <= 200 * 1.05, s
    # floodtest and its worker together, start-up and progress lines included
    assert woke < 300, woke  # 359 without the grain on a quiet machine, ~240 with it loaded


def test_a_loopback_connect_sends_its_request_at_once(ticking, tmp_path):
    """Over loopback connect() returns with the handshake done: the request goes out
    then, with no EPOLLOUT round (sent_at_connect); the streams are the same."""
    s, text = run_tool(
        FLOODTEST, "--port", str(ticking.port), "--n", "60", "--rate", "0",
        "--duration", "0.3", "--source-ips", "127.0.1.1-127.0.1.3", tmp_path=tmp_path,
    )
    assert s["opened"] == s["welcomed"] == 60 and s["connect_errors"] == 0, s
    # All of them on a quiet machine; a softirq deferred to ksoftirqd (a loaded
    # one) leaves a connect in progress, and that one waits for EPOLLOUT instead.
    assert s["sent_at_connect"] >= 30, s
    assert s["messages"] > 0, s


def test_processes_servers_and_source_ips_spread(tmp_path):
    server = StandIn(nports=2)
    try:
        s, _ = run_tool(
            FLOODTEST, "--server", f"127.0.0.1:{server.ports[0]}",
            "--server", f"localhost:{server.ports[1]}", "--n", "400", "--rate", "0",
            "--duration", "0.5", "--processes", "3", "--source-ips", "127.0.1.1-127.0.1.4",
            tmp_path=tmp_path,
        )
        stats = server.stats()
    finally:
        server.close()
    assert s["processes"] == 3 and s["workers_reported"] == 3
    assert s["opened"] == 400 and s["welcomed"] == 400 and s["connect_errors"] == 0
    assert stats["peers"] == {f"127.0.1.{i}": 100 for i in range(1, 5)}
    assert stats["ports"] == {str(p): 200 for p in server.ports}


def test_server_closes_are_counted(tmp_path):
    server = StandIn("--drop-every", "4")
    try:
        s, _ = run_tool(
            FLOODTEST, "--port", str(server.port), "--n", "100", "--rate", "0",
            "--duration", "0.5", tmp_path=tmp_path,
        )
    finally:
        server.close()
    assert s["opened"] == 100 and s["welcomed"] == 100
    assert s["closed"] == 25 and s["open_end"] == 75


def test_connect_errors_are_counted_not_raised(tmp_path):
    # A port bound but not listening refuses connections, and stays ours meanwhile
    # (closed, another process could start listening there).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        s, _ = run_tool(
            FLOODTEST, "--port", str(port), "--n", "50", "--rate", "0", "--duration", "0.2",
            tmp_path=tmp_path,
        )
    assert s["opened"] == 0 and s["connect_errors"] == 50
    assert s["connect_errors_by_errno"] == {"ECONNREFUSED": 50}


@pytest.mark.parametrize(
    "args",
    [
        ["--host", "10.1.2.3"],
        ["--server", "192.168.1.1:80"],
        ["--source-ips", "10.0.0.1-10.0.0.4"],
        ["--source-ips", "127.0.1.1-192.168.0.1"],
    ],
)
def test_non_loopback_refused(args):
    proc = subprocess.run(
        [sys.executable, str(FLOODTEST), *args, "--n", "1", "--duration", "0"],
        capture_output=True, text=True, timeout=10,
    )
    assert proc.returncode == 2
    assert "loopback" in proc.stderr and "Traceback" not in proc.stderr


def test_help_explains_options():
    proc = subprocess.run(
        [sys.executable, str(FLOODTEST), "--help"], capture_output=True, text=True, timeout=10
    )
    assert proc.returncode == 0
    for opt in ("--server", "--n", "--rate", "--duration", "--source-ips", "--processes",
                "--interval", "--json", "--first-id"):
        assert opt in proc.stdout


def test_client_memory_per_connection(tmp_path):
    server = StandIn()
    try:
        s, _ = run_tool(
            FLOODTEST, "--port", str(server.port), "--n", "3000", "--rate", "0",
            "--duration", "0.5", tmp_path=tmp_path,
        )
    finally:
        server.close()
    assert s["open_end"] == 3000
    # The budget is 2 KB per held connection (the seed's C client).
    assert s["rss_bytes_per_conn"] <= 2048, s


# -- in-process unit tests of the pieces ----------------------------------------------


def test_parser_handles_any_split():
    from cometd.loadtest.floodtest import _HEADERS, FloodConfig, _Conn, _Worker

    now = time.time()
    chunks = [b"Welcome, Url: '/test/7' Id: 7\n"] + [
        b"ts=%.6f;from=3;seq=%d;%s" % (now - 0.010, i, b"x" * (i * 7)) for i in range(20)
    ] + [b"no timestamp here"]
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in chunks)
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX: y\r\n\r\n" + body
    for step in (1, 2, 3, 7, 31, len(wire)):
        w = _Worker(FloodConfig(servers=[("127.0.0.1", 1)]), 0, 1, 0.0, 0.0)
        c = _Conn(None, b"", 0.0)
        c.phase = _HEADERS
        w.conns[5] = c
        w.open = 1
        for i in range(0, len(wire), step):
            w._feed(5, c, wire[i : i + step], now)
        assert (w.chunks, w.messages, w.welcomed, w.streaming) == (22, 20, 1, 1), step
        assert w.hist.count == 20
        assert 0.0095 <= w.hist.percentile(0.5) <= 0.0105


def test_one_chunk_per_recv_reads_as_the_decoder_does(monkeypatch):
    # The shortcut for a whole chunk per recv (ChunkedDecoder.whole) must agree
    # with the decoder alone, on the same bytes in one recv, for every shape of
    # chunk: counts, timings, SSE ids recorded, protocol errors, closes.
    from cometd.loadtest.floodtest import _HEADERS, FloodConfig, _Conn, _Worker

    now = time.time()
    ts = b"ts=%.6f;from=3;seq=1;x" % (now - 0.010)
    sse = b'id: 1-7\ndata: {"from": "3", "body": "%s"}\n\n' % ts
    chunks = [b"%x\r\n%s\r\n" % (len(p), p) for p in (ts, sse, b"Welcome", b"x" * 300)]
    sized = b"%x" % len(ts)
    mutants = chunks + [
        b"%X\r\n%s\r\n" % (len(sse), sse),  # upper-case hex
        b"%s;ext=1\r\n%s\r\n" % (sized, ts),  # an extension
        b"0x%s\r\n%s\r\n" % (sized, ts), b" %s\r\n%s\r\n" % (sized, ts),
        b"+%s\r\n%s\r\n" % (sized, ts), b"1_%s\r\n%s\r\n" % (sized, ts),
        b"%s \r\n%s\r\n" % (sized, ts), b"g\r\n%s\r\n" % ts, b"\r\n%s\r\n" % ts,
        b"0" * 17 + b"%s\r\n%s\r\n" % (sized, ts),  # a size line too long
        b"%x\r\n%s\r\n" % (len(ts) + 1, ts), b"%x\r\n%s\r\n" % (len(ts) - 1, ts),
        b"%s\r\n%sXY" % (sized, ts), b"%s\r\n%s\r" % (sized, ts),  # no CRLF after it
        chunks[0] + chunks[1],  # two in one recv
        b"0\r\n\r\n",  # the last chunk: the server ended the stream
    ]
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    whole = _Conn.whole
    for mutant in mutants:
        seen = []
        for shortcut in (whole, lambda self, data: None):
            monkeypatch.setattr(_Conn, "whole", shortcut)
            w = _Worker(FloodConfig(servers=[("127.0.0.1", 1)]), 0, 1, 0.0, 0.0)
            w.record = io.BytesIO()
            c = _Conn(socket.socket(), b"", 0.0)
            c.phase = _HEADERS
            w.conns[5] = c
            w.open = 1
            w._feed(5, c, head, now)
            w._feed(5, c, mutant, now)
            seen.append((w.chunks, w.messages, w.welcomed, w.protocol_errors, w.closed,
                         w.hist.count, w.record.getvalue(), c.last))
        assert seen[0] == seen[1], mutant
    monkeypatch.setattr(_Conn, "whole", whole)
    # and the shortcut is taken: a whole plain chunk is one payload, no events
    c = _Conn(None, b"", 0.0)
    c.reset()
    assert c.whole(chunks[0]) == ts and c.whole(mutants[5]) is None


def test_latency_histogram():
    from cometd.loadtest.common import LatencyHistogram

    h = LatencyHistogram()
    for ms in range(1, 1001):
        h.record(ms / 1000)
    assert abs(h.percentile(0.5) - 0.5) < 0.5 * 0.03
    assert abs(h.percentile(0.99) - 0.99) < 0.99 * 0.03
    assert h.max == 1.0 and h.count == 1000
    h2 = LatencyHistogram()
    sparse, mx = h.drain()
    h2.merge_sparse({str(k): v for k, v in sparse.items()}, mx)
    assert h2.count == 1000 and h.count == 0 and h2.summary_ms()["max"] == 1000.0


def test_source_ip_parsing():
    from cometd.loadtest.floodtest import parse_server, parse_source_ips

    assert parse_source_ips("127.0.1.1-127.0.1.3") == ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
    assert parse_source_ips("127.0.1.1-3,127.0.0.9") == [
        "127.0.1.1", "127.0.1.2", "127.0.1.3", "127.0.0.9"
    ]
    assert parse_server("localhost:81") == ("127.0.0.1", 81)
    for bad in ("10.0.0.1", "127.0.0.5-127.0.0.1", "8.8.8.8-9"):
        with pytest.raises(ValueError):
            parse_source_ips(bad)


if __name__ == "__main__":
    _standin_main()


def test_a_connect_the_kernel_made_is_no_timeout_however_late_it_is_seen():
    """A starved worker may see a connect only after --connect-timeout: the kernel made it,
    so it is opened, not ETIMEDOUT; one the kernel did not make still times out."""
    import select

    from cometd.loadtest.floodtest import FloodConfig, _Conn, _Worker

    made = socket.socket()
    made.bind(("127.0.0.1", 0))
    made.listen(64)
    # A backlog of 0 takes one connection; SYNs to it after that get no answer.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    filler = [socket.create_connection(full.getsockname(), timeout=5)]
    try:
        worker = _Worker(FloodConfig(servers=[made.getsockname(), full.getsockname()], n=4,
                                     connect_timeout=1.0), 0, 1, time.monotonic(), 1e12)
        worker.ep = select.epoll()
        now = time.monotonic()
        for k in (1, 3):  # to the full listener: still connecting when _start returns
            worker._start(k, now)
        assert worker.connecting == 2 and worker.sent_at_connect == 0
        for k in (0, 2):  # made after _start looked (as on a busy machine): as it leaves one
            sock = socket.socket()
            sock.connect(made.getsockname())
            sock.setblocking(False)
            c = worker.conns[sock.fileno()] = _Conn(sock, b"GET /test/0 HTTP/1.1\r\n\r\n",
                                                    now + 1.0, k)
            worker.starts.append((c.left, sock.fileno(), c))
            worker.connecting += 1
            worker.ep.register(sock.fileno(), select.EPOLLOUT)
        worker._expire_connects(now + 0.5)  # not late yet: nothing happens
        assert (worker.connecting, worker.opened, worker.connect_errors) == (4, 0, 0)
        worker._expire_connects(now + 2.0)
        assert (worker.opened, worker.connect_errors) == (2, 2), worker.errors_by
        assert worker.errors_by == {"ETIMEDOUT": 2} and worker.connecting == 0
        assert sorted(c.k for c in worker.conns.values()) == [0, 2]
    finally:
        for c in list(worker.conns.values()):
            c.sock.close()
        for s in (made, full, *filler):
            s.close()
