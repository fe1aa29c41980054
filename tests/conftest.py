"""Shared fixtures: real cometd server processes on ephemeral ports."""

from __future__ import annotations

import collections
import http.client
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import gevent
import pytest
from browser import chrome
from tiers import *  # noqa: F403 -- the system marker and the fast tier's guard

from cometd.lifecycle import BANNER, free_port
from cometd.loadtest.chunked import Chunk, ChunkedDecoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMETD = os.path.join(ROOT, "bin", "cometd")


@dataclass
class ServerProcess:
    """A running `bin/cometd` and where to reach it."""

    proc: subprocess.Popen
    host: str
    port: int
    admin_port: int | None
    db: str
    output: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_server(db: str, *args: str, timeout: float = 20,
                 prefix: tuple[str, ...] | list[str] = ()) -> ServerProcess:
    """Start `bin/cometd --port 0 --admin-port 0 --db DB ARGS` (after *prefix*, e.g.
    `strace ...`) and wait until it listens."""
    started = start_cometd(["--port", "0", "--admin-port", "0", "--db", db, *args],
                           BANNER.pattern, timeout, prefix)
    m = started.match
    return ServerProcess(started.proc, m.group(1), int(m.group(2)),
                         int(m.group(4)) if m.group(4) else None, db, started.output)


#: server variants a module's server runs as: each connection mode, and publishes
#: through bottle (--no-fast-publish) instead of cometd.publish's fast path
VARIANTS = ("greenlet", "pool", "bottle-publish")


def variant_args(variant: str) -> tuple[str, ...]:
    """The flags of a server variant of :data:`VARIANTS`."""
    if variant == "bottle-publish":
        return ("--mode", "greenlet", "--no-fast-publish")
    return ("--mode", variant)


@pytest.fixture(autouse=True)
def _fresh_hub_clock() -> None:
    """Bring the gevent loop's clock to now before each test.

    The loop reads the clock once per turn, and gevent times a timer from that
    reading. Between two in-process gevent tests this process may spend
    minutes in tests that never run the loop, so a `joinall(timeout=10)` (or
    any gevent timeout) would be due the moment the loop next turns, before
    the 20 ms sleep of a greenlet started after it.
    """
    gevent.get_hub().loop.update_now()


@pytest.fixture(params=["greenlet", "pool"])
def mode(request) -> str:
    """Both connection modes: the server suite runs against each."""
    return request.param


@pytest.fixture
def server(tmp_path, mode):
    """A fresh single-process server on an empty database, in each mode."""
    srv = start_server(str(tmp_path / "db"), "--mode", mode)
    yield srv
    srv.stop()


# -- scale-out: a real redis-server and router/edge processes ----------------------


class RedisServer:
    """A throwaway `redis-server` (no persistence) on one port, restartable on it."""

    def __init__(self, workdir: str, port: int | None = None, host: str = "127.0.0.1") -> None:
        import shutil

        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.workdir = workdir
        self.host = host
        #: a port of our own choosing may be taken between the pick and the bind
        self._pick_port = port is None
        self.port = port or free_port(host)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def ping(self) -> bool:
        import socket

        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, timeout: float = 10) -> None:
        """Start on `.port`; on the first start, on another port if that one was taken."""
        attempts = 0
        while attempts < 5:
            attempts += 1
            if self._start_once(timeout):
                self._pick_port = False  # restarts keep this port
                return
            if not self._pick_port or not self._port_was_taken():
                break
            self.port = free_port(self.host)
        raise RuntimeError(f"redis-server did not start on port {self.port} "
                           f"(after {attempts} attempts); see {self.workdir}/redis.log")

    def _port_was_taken(self) -> bool:
        with open(os.path.join(self.workdir, "redis.log"), errors="replace") as f:
            return "Address already in use" in f.read()[-2000:]

    def _start_once(self, timeout: float) -> bool:
        cmd = [self.binary, "--port", str(self.port), "--bind", self.host, "--save", "",
               "--appendonly", "no", "--dir", self.workdir, "--daemonize", "no"]
        log = open(os.path.join(self.workdir, "redis.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                return False
            time.sleep(0.02)
        return True

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def restart(self) -> None:
        """Stop (SIGTERM: Redis closes its clients) and start again on the same port."""
        self.stop(signal.SIGTERM)
        self.start()


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server on a free ephemeral port; `.url`, `.restart()`; killed at teardown."""
    workdir = tmp_path / "redis"
    workdir.mkdir()
    srv = RedisServer(str(workdir))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """One headless Chromium (tests/browser.py) for a test module: starting one is slow here."""
    browser = chrome(str(tmp_path_factory.mktemp("chrome")))
    yield browser
    browser.quit()


@dataclass
class CometdProcess:
    """A `bin/cometd` subcommand process, its ready line's match and its output."""

    proc: subprocess.Popen
    match: re.Match
    output: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


def start_cometd(args: list[str], ready: str, timeout: float = 20,
                 prefix: tuple[str, ...] | list[str] = ()) -> CometdProcess:
    """Start `bin/cometd ARGS` (after *prefix*, e.g. `ip netns exec NS`); wait for *ready*."""
    cmd = [*prefix, sys.executable, COMETD, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    lines: list[str] = []
    found: list[re.Match] = []
    pattern = re.compile(ready)
    event = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            match = pattern.search(line)
            if match and not found:
                found.append(match)
                event.set()
        event.set()

    # The banner wakes this at once: no poll interval is added to every start.
    threading.Thread(target=read, daemon=True).start()
    event.wait(timeout)
    if not found:
        proc.kill()
        proc.wait(5)
        raise RuntimeError(f"cometd {' '.join(args[:1])} did not start:\n" + "".join(lines))
    return CometdProcess(proc, found[0], lines)


# -- stream and HTTP clients for the server suites (webapp, connections, router, server) --


class ChunkParser:
    """The payloads of a chunked body as they complete (cometd.loadtest.chunked decodes)."""

    def __init__(self) -> None:
        self.decoder = ChunkedDecoder()
        self.chunks: collections.deque[bytes] = collections.deque()

    @property
    def ended(self) -> bool:
        """The zero-length last chunk arrived."""
        return self.decoder.ended

    @property
    def buf(self) -> bytes:
        """Bytes held for the next feed (a partial line or chunk); bytes after the end
        raise FramingError instead."""
        return self.decoder.buf

    def feed(self, data: bytes) -> None:
        """Decode *data*; FramingError (a ValueError) on bad framing."""
        self.chunks.extend(e.data for e in self.decoder.feed(data) if isinstance(e, Chunk))


class StreamClient:
    """A raw-socket client holding `GET <path>` open; parses the response incrementally.

    With chunked framing, `chunk()` returns one payload at a time; otherwise
    (HTTP/1.0) `read_raw()` returns the body bytes as they come.
    """

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        """Take *sock*, whose request has been sent, and read the response head."""
        self.sock = sock
        self.eof = False
        head = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in head:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"closed before the response head: {head!r}")
            head += data
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status_line = lines[0]
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        self.parser = ChunkParser() if self.chunked else None
        self.raw = bytearray()
        self._feed(rest)

    @staticmethod
    def _request(srv, path: str, http10: bool = False, rcvbuf: int | None = None,
                 timeout: float = 10.0) -> socket.socket:
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect((srv.host, srv.port))
        version = "1.0" if http10 else "1.1"
        sock.sendall(f"GET {path} HTTP/{version}\r\nHost: {srv.host}\r\n\r\n".encode())
        return sock

    @classmethod
    def open(cls, srv, path: str, http10: bool = False, rcvbuf: int | None = None,
             timeout: float = 10.0) -> StreamClient:
        """`GET <path>` on a fresh connection to the server *srv*."""
        return cls(cls._request(srv, path, http10, rcvbuf, timeout), timeout)

    @classmethod
    def open_many(cls, srv, paths: list[str], timeout: float = 60.0) -> list[StreamClient]:
        """Many streams at once: all requests are sent before any answer is read."""
        socks = []
        try:
            for path in paths:
                socks.append(cls._request(srv, path, timeout=timeout))
            return [cls(sock, timeout) for sock in socks]
        except BaseException:
            for sock in socks:
                sock.close()
            raise

    def _feed(self, data: bytes) -> None:
        if self.parser is not None:
            self.parser.feed(data)
        else:
            self.raw += data

    def _recv(self, deadline: float) -> bool:
        """Read once; False on end of stream (FIN or reset)."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("nothing more arrived in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self._feed(data)
        return True

    def chunk(self, timeout: float = 10.0) -> bytes:
        """The next chunk's payload; EOFError if the stream ends first."""
        deadline = time.monotonic() + timeout
        while not self.parser.chunks:
            if not self._recv(deadline):
                raise EOFError("stream closed")
        return self.parser.chunks.popleft()

    def chunks(self, n: int, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        return [self.chunk(max(deadline - time.monotonic(), 0.001)) for _ in range(n)]

    def read_raw(self, n: int, timeout: float = 10.0) -> bytes:
        """Exactly *n* body bytes of an unframed stream."""
        deadline = time.monotonic() + timeout
        while len(self.raw) < n:
            if not self._recv(deadline):
                raise EOFError(f"stream closed after {len(self.raw)} of {n} bytes")
        data = bytes(self.raw[:n])
        del self.raw[:n]
        return data

    def read_until(self, marker: bytes, timeout: float = 10.0) -> bytes:
        """Body bytes of an unframed stream up to and including *marker*."""
        deadline = time.monotonic() + timeout
        while (end := self.raw.find(marker)) < 0:
            if not self._recv(deadline):
                raise EOFError(f"stream closed before {marker!r}: {bytes(self.raw)!r}")
        data = bytes(self.raw[:end + len(marker)])
        del self.raw[:end + len(marker)]
        return data

    def wait_closed(self, timeout: float = 10.0) -> None:
        """Read (and keep) whatever still comes until the server closes the stream."""
        deadline = time.monotonic() + timeout
        while self._recv(deadline):
            pass

    def close(self, reset: bool = False) -> None:
        """Close; with *reset*, abort with an RST instead of a FIN."""
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def __enter__(self) -> StreamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def http_request(srv, method: str, path: str, body: bytes | str | None = None,
                 headers: dict[str, str] | None = None,
                 timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def http_json(srv, method: str, path: str, body=None, **kwargs) -> tuple[int, object]:
    """A request whose answer must be JSON; a non-bytes *body* is sent as JSON."""
    if body is not None and not isinstance(body, bytes | str):
        body = json.dumps(body)
    status, headers, data = http_request(srv, method, path, body, **kwargs)
    assert headers.get("content-type") == "application/json", (status, headers, data)
    return status, json.loads(data)


def send(srv, subject: str, body: bytes | str) -> int:
    """`POST /send/<subject>`; the number of connections written to."""
    status, answer = http_json(srv, "POST", f"/send/{subject}", body.encode()
                               if isinstance(body, str) else body)
    assert status == 200, answer
    return answer["delivered"]


def get_stats(srv) -> dict:
    status, answer = http_json(srv, "GET", "/stats")
    assert status == 200, answer
    return answer


def wait_for(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll *predicate* until it returns a true value (returned) or *timeout* passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s (last: {value!r})")
        time.sleep(interval)


def unique_id(prefix: str) -> str:
    """A fresh user id, so tests sharing one server do not see each other's users."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def tcp_queues(port: int | None = None) -> dict[tuple[str, str], tuple[int, int]]:
    """IPv4 TCP sockets' (tx_queue, rx_queue), from one read of /proc/net/tcp.

    Keyed by (local, remote) as ``"ip:port"``; with *port*, only sockets with
    that port at either end. tx_queue is what SIOCOUTQ reports for the socket
    (written, not yet acknowledged), rx_queue what SIOCINQ does (received, not
    yet read); /proc shows them for another process's sockets too. One read,
    so bytes moving from one socket's queue to its peer's are not counted twice.
    """
    with open("/proc/net/tcp") as f:
        text = f.read()
    mark = f":{port:04X} " if port is not None else ""
    queues = {}
    for line in text.splitlines()[1:]:
        if mark not in line:  # cheap: the machine may have tens of thousands of sockets
            continue
        fields = line.split()
        ends = []
        for addr in fields[1:3]:
            ip, hexport = addr.split(":")
            ends.append(f"{socket.inet_ntoa(bytes.fromhex(ip)[::-1])}:{int(hexport, 16)}")
        tx, rx = fields[4].split(":")
        queues[tuple(ends)] = (int(tx, 16), int(rx, 16))
    return queues


def peak_rss(pid: int) -> int:
    """The process's peak resident set size so far (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")
