"""floodtest: open many long-lived cometd streams from one machine and hold them.

Each connection is ``GET /test/<id>`` over HTTP/1.1; the server answers ``200``
with a chunked body whose first chunk is a welcome line and whose later chunks
are the messages delivered to that user. floodtest opens ``--n`` such streams
at ``--rate`` connections per second (ids ``--first-id`` upward), holds them for
``--duration`` seconds once every connect has resolved, closes everything and
exits (a hard ``--timeout`` bounds every run). While it runs it prints
the counters ``Open``, ``Closed``, ``Chunks`` and ``Bytes`` (plus connect errors
and the delivery latency of messages whose body starts with ``ts=<send time>;``,
as published by :mod:`cometd.loadtest.msggen`) every ``--interval`` seconds, and a
summary at the end (``--json FILE`` writes it for tools).

Only loopback addresses (127.0.0.0/8) may be used, as targets and as sources.

Theory of operation
-------------------

*Memory.* The point of the tool is to hold tens of thousands of idle streams, so
the per-connection cost must stay near the ~2 KB of the C/libevent client it
replaces. A thread or greenlet per connection costs far more, so each worker
process is ONE non-blocking ``select.epoll`` loop over raw sockets. A connection
is a socket object plus a five-slot :class:`_Conn` and one dict entry keyed by
its fd: ~270 bytes of RSS per held connection measured with 15,000 connections
(every run reports its own figure as ``rss_bytes_per_conn``; kernel socket
buffers are not part of RSS). Reads go into a fresh bytes object that is parsed and
dropped; only a partial header / chunk-size line or the first few bytes of a
chunk (to find ``ts=``) are ever kept between reads. Latencies go into a fixed
log-bucket histogram (:class:`LatencyHistogram`), never into a list.

*Processes.* A process may hold at most 20,000 open files (a hard limit here),
so ``--n`` is split over ``--processes`` forked workers (default
``ceil(n / 19000)``). Connection ``k`` (0-based, id ``first_id + k``) belongs to
worker ``k % P`` and is due at ``t0 + k / rate``: all workers share one
monotonic ``t0``, so together they follow exactly one global schedule. Workers
send JSON snapshots (cumulative counters, histogram *deltas*) up a pipe twice a
second; the parent merges them, prints the periodic lines and the summary, and
enforces the hard ``--timeout`` (SIGKILL) if a worker overstays.

*Addresses.* Connection ``k`` goes to server ``k % S`` and binds source address
``(k // S) % A``, so every (source, server) pair gets an equal share. A socket
is bound with ``IP_BIND_ADDRESS_NO_PORT`` before ``bind((ip, 0))``: the kernel
then picks the port at ``connect()`` time, unique per 4-tuple, so every source
address brings its own ephemeral port range (~28K-64K ports) - that is how one
host gets past 64,511 connections to one server port.

*Ramp.* A worker sleeps until its next connect is :data:`RAMP_GRAIN` (20 ms)
late, then starts every one due: with 53 workers at 12,000 connects/s, each
would otherwise wake every ~4 ms for one connect, and a wakeup costs more
than the connect (~0.1-0.2 ms with a hundred processes on two cores). The
schedule stays the same on average; a connect starts at most 20 ms late.
The request goes out straight after ``connect()`` when the kernel has made the
connection already, as it does over loopback (``sent_at_connect`` counts
those); a connect still in progress waits for ``EPOLLOUT``.

*Counting.* ``opened`` counts TCP connects that completed; ``open`` is the
current number of established connections (``open_max`` its peak);
``welcomed`` counts streams whose first chunk was the welcome line; ``closed``
counts connections that ended during the run (server EOF, reset, HTTP error,
end of the chunked body) - not the ones floodtest itself closes at the end.
``bytes`` are raw bytes read from the sockets (headers and framing included);
``chunks`` are complete chunks (welcome included); ``messages`` are chunks that
carried ``ts=`` (with ``--events``, an event whose body does) and so fed the
latency histogram. A connect that fails
(``ECONNREFUSED``, ``EADDRNOTAVAIL``, ``EMFILE``, ``ETIMEDOUT``: not made by
the kernel within ``--connect-timeout``; one it made that a busy worker had
not yet seen counts as opened) is counted in ``connect_errors`` (by errno
name too) and is not retried, unless ``--reconnect``.

*Resuming.* With ``--events`` the streams are SSE (``GET /events/<id>``);
with ``--reconnect`` a stream that ends, or a connect that fails, is opened
again after a backoff (0.1 s doubling per failed connect, at most 5 s, each
+-50%) with ``Last-Event-ID`` set to the last id it saw (a message's, or its
welcome's), so it resumes where it was (``reconnects`` counts them). With
``--record FILE`` every SSE message's id is written as ``<user> <id> <time>``
(the unix time it was read; a file per worker, joined at the end) for
:mod:`cometd.loadtest.delivery` and for timing a catch-up (bench/bench_storm.py).

*A secured server.* Each stream sends ``Authorization: Bearer <token>``:
an HS256 token minted for its user (:class:`cometd.auth.Minter`, ~3 us) with
the secret in ``--jwt-secret-file`` or ``COMETD_JWT_SECRET`` (never a command
line argument), valid past the run's ``--timeout``, or one read from
``--tokens-file``. A refused stream counts in ``http_errors``.
"""

from __future__ import annotations

import errno
import gc
import heapq
import ipaddress
import json
import math
import os
import random
import resource
import select
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import click

from cometd.config import setting_lines
from cometd.loadtest.chunked import ChunkedDecoder, End, FramingError
from cometd.loadtest.common import LatencyHistogram, check_loopback, finish, read_secret

__all__ = [
    "FloodConfig",
    "SECRET_ENV",
    "stream_tokens",
    "parse_source_ips",
    "parse_server",
    "default_processes",
    "run",
    "main",
]

# Per-process open-file budget: the hard RLIMIT_NOFILE here is 20,000 and cannot
# be raised, so leave headroom for the pipe, epoll fd, stdio and the like.
PER_PROCESS_CONNECTIONS = 19000
_FD_HEADROOM = 64
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


# --------------------------------------------------------------------------------------
# Configuration and address checks
# --------------------------------------------------------------------------------------


def parse_server(spec: str, default_port: int = 8000) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (or ``HOST``) into a loopback ``(ip, port)`` pair."""
    host, sep, port_s = spec.rpartition(":")
    if not sep:
        host, port_s = spec, str(default_port)
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"server {spec!r}: port must be a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"server {spec!r}: port out of range")
    return check_loopback(host, "server"), port


def parse_source_ips(spec: str) -> list[str]:
    """Expand ``127.0.1.1-127.0.1.20`` (comma-separated ranges or single IPs).

    The short form ``127.0.1.1-20`` (last octet only) is accepted too. Every
    address must be loopback; the result keeps the given order, without
    duplicates.
    """
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo_s, dash, hi_s = part.partition("-")
        lo = ipaddress.IPv4Address(check_loopback(lo_s.strip(), "source address"))
        if dash:
            hi_s = hi_s.strip()
            if hi_s.isdigit():
                hi_s = ".".join(str(lo).split(".")[:3] + [hi_s])
            hi = ipaddress.IPv4Address(check_loopback(hi_s, "source address"))
            if hi < lo:
                raise ValueError(f"source range {part!r}: end is below start")
            if int(hi) - int(lo) >= 1 << 16:
                raise ValueError(f"source range {part!r}: more than 65536 addresses")
            addrs = [str(ipaddress.IPv4Address(i)) for i in range(int(lo), int(hi) + 1)]
        else:
            addrs = [str(lo)]
        for a in addrs:
            if a not in out:
                out.append(a)
    if not out:
        raise ValueError("no source addresses given")
    return out


def default_processes(n: int) -> int:
    """Workers needed for *n* connections: ``ceil(n / 19000)``, capped by RLIMIT_NOFILE."""
    per = min(PER_PROCESS_CONNECTIONS, _per_process_cap())
    return max(1, math.ceil(n / per))


def _per_process_cap() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return PER_PROCESS_CONNECTIONS
    return max(1, hard - _FD_HEADROOM)


@dataclass
class FloodConfig:
    """Everything one floodtest run needs (validated by :func:`run`)."""

    servers: list[tuple[str, int]]
    n: int = 1000
    rate: float = 1000.0
    duration: float = 10.0
    first_id: int = 1
    source_ips: list[str] = field(default_factory=list)
    processes: int = 0  # 0: default_processes(n)
    interval: float = 10.0
    timeout: float = 0.0  # 0: planned ramp + duration + 30 s
    connect_timeout: float = 15.0
    max_pending: int = 1000
    rst_close: bool = False
    path: str = "/test/"
    #: reconnect a stream that ends (backoff with jitter), resuming from its last SSE id
    reconnect: bool = False
    #: write "<user> <message id>" for every SSE event received (see cometd.loadtest.delivery)
    record: str | None = None
    #: user id -> the token its stream sends as Authorization: Bearer (a secured server)
    token: Callable[[str], str] | None = field(default=None, repr=False)


# --------------------------------------------------------------------------------------
# Worker: one epoll loop per process
# --------------------------------------------------------------------------------------

_CONNECTING, _HEADERS, _STREAM, _RAW = range(4)
_HEAD_MAX = 256  # payload bytes kept to find "ts=<float>;", "Welcome" or an SSE id
RECONNECT_FIRST = 0.1  # seconds before the first reconnect; doubles per failure
RECONNECT_MAX = 5.0
#: a worker behind on nothing sleeps until its next connect is this late, so that
#: one wakeup starts several (see "Ramp" in the module docstring)
RAMP_GRAIN = 0.02
_MAX_LINE = 16384


class _Conn(ChunkedDecoder):
    """Per-connection state: the socket, the phase and, while streaming, the decoder.

    Eight slots in all; the decoder's are reused by phase before it starts:

    - ``_CONNECTING``: ``buf`` = the request to send, ``left`` = connect deadline.
    - ``_HEADERS``: ``buf`` = partial header block.
    - ``_STREAM``: the chunked decoder's own ``state``, ``buf``, ``left`` (it keeps
      only each payload's first ``_HEAD_MAX`` bytes).
    - ``_RAW``: a response that is not chunked; its bytes are counted, not parsed.
    """

    __slots__ = ("sock", "phase", "k", "last", "tries")
    keep = _HEAD_MAX

    def __init__(self, sock: socket.socket, request: bytes, deadline: float, k: int = 0,
                 last: bytes = b"", tries: int = 0) -> None:
        self.sock = sock
        self.phase = _CONNECTING
        self.buf = request
        self.left = deadline
        #: the connection's index (its user is first_id + k)
        self.k = k
        #: the last SSE id seen (what a reconnect resumes from)
        self.last = last
        #: failed connects in a row (the reconnect backoff)
        self.tries = tries


def _rss_kb() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    return 0


class _Worker:
    """One process's share of the connections, run as a single epoll loop."""

    def __init__(
        self, cfg: FloodConfig, index: int, nproc: int, t0: float, stop_by: float,
        start: float = 0.0,
    ) -> None:
        self.cfg = cfg
        self.start = start or time.monotonic()
        self.index = index
        self.nproc = nproc
        self.t0 = t0
        self.stop_by = stop_by
        self.n_local = len(range(index, cfg.n, nproc))
        self.j = 0
        self.conns: dict[int, _Conn] = {}
        #: (deadline, fd, conn) of each connect in the order started: all share one
        #: timeout, so the oldest are first and expiry never walks every connection
        self.starts: deque[tuple[float, int, _Conn]] = deque()
        self.hist = LatencyHistogram()  # delta since the last snapshot
        self.stop = False
        self.cut = False
        self.end_at: float | None = None
        # counters
        self.attempted = self.opened = self.open = self.open_max = 0
        self.connecting = self.streaming = self.welcomed = 0
        self.closed = self.resets = self.http_errors = self.protocol_errors = 0
        self.connect_errors = 0
        self.errors_by: dict[str, int] = {}
        self.chunks = self.messages = self.bytes = 0
        self.first_open: float | None = None
        self.last_open: float | None = None
        self.ramp_done: float | None = None
        self.rss0 = 0
        self.ep: select.epoll | None = None
        self.reconnects = 0
        #: connects whose request went out straight from connect() (see _send_request)
        self.sent_at_connect = 0
        #: (due, k, last id, tries): streams to open again (--reconnect)
        self.retry: list[tuple[float, int, bytes, int]] = []
        self.record = None
        if cfg.record:
            self.record = open(f"{cfg.record}.w{index}", "wb")  # noqa: SIM115 - closed in run

    # -- connection set-up ------------------------------------------------------------

    def _start(self, k: int, now: float, last: bytes = b"", tries: int = 0) -> None:
        cfg = self.cfg
        nserv = len(cfg.servers)
        host, port = cfg.servers[k % nserv]
        src = cfg.source_ips[(k // nserv) % len(cfg.source_ips)] if cfg.source_ips else None
        self.attempted += 1
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            self._count_error(e.errno)
            return
        try:
            sock.setblocking(False)
            if src:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((src, 0))
            err = sock.connect_ex((host, port))
        except OSError as e:
            sock.close()
            self._count_error(e.errno)
            return
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._count_error(err)
            return
        user = cfg.first_id + k
        request = b"GET %s%d HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: floodtest\r\n%s%s\r\n" % (
            cfg.path.encode(),
            user,
            host.encode(),
            port,
            b"Last-Event-ID: %s\r\n" % last if last else b"",
            b"Authorization: Bearer %s\r\n" % cfg.token(str(user)).encode() if cfg.token
            else b"",
        )
        fd = sock.fileno()
        c = self.conns[fd] = _Conn(sock, request, now + cfg.connect_timeout, k, last, tries)
        self.connecting += 1
        self._send_request(fd, c, now, True)

    def _count_error(self, err: int | None) -> None:
        self.connect_errors += 1
        name = errno.errorcode.get(err or 0, str(err))
        self.errors_by[name] = self.errors_by.get(name, 0) + 1

    def _connect_failed(self, fd: int, c: _Conn, err: int) -> None:
        del self.conns[fd]
        self.connecting -= 1
        c.sock.close()
        self._count_error(err)
        self._again(c, c.tries + 1)

    def _again(self, c: _Conn, tries: int) -> None:
        """With --reconnect, open *c*'s stream again after a backoff with jitter."""
        if not self.cfg.reconnect or self.stop:
            return
        delay = min(RECONNECT_MAX, RECONNECT_FIRST * 2 ** tries) * random.uniform(0.5, 1.5)
        heapq.heappush(self.retry, (time.monotonic() + delay, c.k, c.last, tries))

    def _on_connect(self, fd: int, c: _Conn, now: float) -> None:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_failed(fd, c, err)
            return
        self._send_request(fd, c, now, False)

    def _send_request(self, fd: int, c: _Conn, now: float, first: bool) -> None:
        """Send *c*'s request; *first*: straight after connect(), before any epoll.

        Over loopback the kernel runs the whole handshake inside connect() (the
        SYN, SYN-ACK and ACK are processed before it returns), so the request
        can go at once: no EPOLLOUT wakeup, SO_ERROR read or epoll re-arm per
        connection. A socket still connecting refuses the send with EAGAIN and
        waits for EPOLLOUT, under the connect timeout, as any connect did before.
        """
        sock = c.sock
        try:
            sent = sock.send(c.buf)
        except BlockingIOError:
            if not first:  # writable but refusing ~80 bytes: count it as failed
                self._connect_failed(fd, c, errno.EAGAIN)
                return
            self.starts.append((c.left, fd, c))
            self.ep.register(fd, select.EPOLLOUT)
            return
        except OSError as e:
            # A refused connect shows as EPIPE to send(); SO_ERROR says why.
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if first else 0
            self._connect_failed(fd, c, err or e.errno or errno.EIO)
            return
        if sent != len(c.buf):  # a fresh socket always takes ~80 bytes
            self._connect_failed(fd, c, errno.EAGAIN)
            return
        if first:
            self.sent_at_connect += 1
        self.connecting -= 1
        self.opened += 1
        self.open += 1
        if self.open > self.open_max:
            self.open_max = self.open
        if self.first_open is None:
            self.first_open = now
        self.last_open = now
        c.phase = _HEADERS
        c.buf = b""
        c.left = 0
        if first:
            self.ep.register(fd, select.EPOLLIN)
        else:
            self.ep.modify(fd, select.EPOLLIN)

    def _expire_connects(self, now: float) -> None:
        """Give up the connects older than --connect-timeout that the kernel did not make.

        One the kernel connected but this loop has not got to yet (a worker
        starved of CPU on a saturated machine) is taken as connected: at 1M,
        counting those as timeouts cost ~49,000 streams, each closed by
        floodtest itself (TIME_WAIT on the client's side), none by a server.
        """
        starts = self.starts
        while starts and starts[0][0] <= now:
            _deadline, fd, c = starts.popleft()
            if c.phase != _CONNECTING or self.conns.get(fd) is not c:
                continue  # connected or failed meanwhile
            try:
                c.sock.getpeername()
            except OSError:  # not connected: still trying, or refused
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                self._connect_failed(fd, c, err or errno.ETIMEDOUT)
                continue
            self._on_connect(fd, c, now)

    # -- reading ----------------------------------------------------------------------

    def _drop(self, fd: int, c: _Conn) -> None:
        """Forget an established connection that ended during the run."""
        del self.conns[fd]
        self.open -= 1
        if c.phase in (_STREAM, _RAW):
            self.streaming -= 1
        self.closed += 1
        c.sock.close()
        self._again(c, 0)

    def _on_readable(self, fd: int, c: _Conn) -> None:
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self.resets += 1
            self._drop(fd, c)
            return
        if not data:
            self._drop(fd, c)
            return
        self.bytes += len(data)
        self._feed(fd, c, data, time.time())

    def _head(self, c: _Conn, head: bytes, now: float) -> None:
        """Look at the first bytes of a chunk payload: ``ts=<float>;``, the welcome, an id."""
        if head.startswith(b"id: "):  # an SSE message
            end = head.find(b"\n")
            if end > 4:
                c.last = head[4:end]
                if self.record is not None:
                    self.record.write(b"%d %s %.3f\n" % (self.cfg.first_id + c.k, c.last, now))
            body = head.find(b'"body": "ts=')  # data: {"from": ..., "body": "ts=...;..."}
            if body > 0:
                self._timed(head[body + 9:], now)
        elif head.startswith(b": Welcome"):  # an SSE welcome, maybe with an id to resume from
            self.welcomed += 1
            at = head.find(b"\nid: ")
            end = head.find(b"\n", at + 5)
            if at > 0 and end > 0:
                c.last = head[at + 5:end]
        elif head.startswith(b"ts="):
            self._timed(head, now)
        elif head.startswith(b"Welcome"):
            self.welcomed += 1

    def _timed(self, head: bytes, now: float) -> None:
        """A message body ``ts=<send time>;...``: count it and time its delivery."""
        semi = head.find(b";", 3)
        try:
            ts = float(head[3:semi] if semi > 0 else head[3:])
        except ValueError:
            return
        self.messages += 1
        self.hist.record(now - ts)

    def _feed(self, fd: int, c: _Conn, data: bytes, now: float) -> None:
        """Advance the HTTP response parser of *c* over *data* (any split is fine)."""
        phase = c.phase
        if phase == _STREAM:
            payload = c.whole(data)  # one recv, one chunk: the usual delivery
            if payload is not None:
                self.chunks += 1
                self._head(c, payload, now)
                return
        else:
            if phase != _HEADERS:  # _RAW: bytes are counted, nothing else to find
                return
            if c.buf:
                data = c.buf + data
                c.buf = b""
            idx = data.find(b"\r\n\r\n")
            if idx < 0:
                if len(data) > _MAX_LINE:
                    self._protocol_error(fd, c)
                    return
                c.buf = data
                return
            block = data[:idx]
            status = block.split(b"\r\n", 1)[0].split(None, 2)
            if len(status) < 2 or status[1] != b"200":
                self.http_errors += 1
                self._drop(fd, c)
                return
            self.streaming += 1
            if b"chunked" not in block.lower():
                c.phase = _RAW
                return
            c.phase = _STREAM
            c.reset()
            data = data[idx + 4:]
        try:
            events = c.feed(data)
        except FramingError:
            self._protocol_error(fd, c)
            return
        for event in events:
            if event.__class__ is End:  # the server ended the stream
                self._drop(fd, c)
                return
            self.chunks += 1
            self._head(c, event.data, now)

    def _protocol_error(self, fd: int, c: _Conn) -> None:
        self.protocol_errors += 1
        self._drop(fd, c)

    # -- the loop ---------------------------------------------------------------------

    def _ramp(self, now: float) -> None:
        cfg = self.cfg
        started = 0
        while (
            self.j < self.n_local and started < 256 and self.connecting < cfg.max_pending
        ):
            k = self.index + self.j * self.nproc
            if cfg.rate and self.t0 + k / cfg.rate > now:
                break
            self._start(k, now)
            self.j += 1
            started += 1
        if self.j >= self.n_local and not self.connecting and self.ramp_done is None:
            # Every connect has been started and has resolved (established,
            # failed or timed out): the hold starts now.
            self.ramp_done = now
            self.end_at = now + cfg.duration

    def _next_due(self) -> float | None:
        if self.j >= self.n_local:
            return None
        if self.connecting >= self.cfg.max_pending:
            return None  # wait for connects to finish; epoll wakes us
        if not self.cfg.rate:
            return 0.0
        return self.t0 + (self.index + self.j * self.nproc) / self.cfg.rate

    def snapshot(self, final: bool = False) -> dict:
        """Cumulative counters plus the histogram delta since the last snapshot."""
        sparse, mx = self.hist.drain()
        snap = {
            "i": self.index,
            "final": final,
            "c": {
                "attempted": self.attempted,
                "opened": self.opened,
                "open": self.open,
                "open_max": self.open_max,
                "connecting": self.connecting,
                "streaming": self.streaming,
                "welcomed": self.welcomed,
                "closed": self.closed,
                "resets": self.resets,
                "http_errors": self.http_errors,
                "protocol_errors": self.protocol_errors,
                "connect_errors": self.connect_errors,
                "chunks": self.chunks,
                "messages": self.messages,
                "bytes": self.bytes,
                "reconnects": self.reconnects,
                "sent_at_connect": self.sent_at_connect,
            },
            "eb": self.errors_by,
            "h": sparse,
            "mx": mx,
            "first_open": self.first_open,
            "last_open": self.last_open,
            "ramp_done": self.ramp_done,
            "cut": self.cut,
        }
        if final:
            snap["rss0_kb"] = self.rss0
            snap["rss_kb"] = _rss_kb()
        return snap

    def run(self, out: int) -> None:
        """Run the loop, writing JSON-line snapshots to fd *out*."""
        cfg = self.cfg
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        # Nothing here forms reference cycles; a collector walking ~20K live
        # objects every few thousand allocations would only cost CPU.
        gc.disable()
        self.ep = select.epoll()
        # Snapshots fall on a grid from the parent's start time that divides the
        # print interval, so each progress line sees counters at most ~50 ms old.
        snap_every = cfg.interval / max(2, math.ceil(cfg.interval / 0.5))
        next_snap = self.start + snap_every
        while next_snap <= time.monotonic():
            next_snap += snap_every
        next_expire = time.monotonic() + 1.0
        self.rss0 = _rss_kb()

        def write(snap: dict) -> None:
            os.write(out, json.dumps(snap, separators=(",", ":")).encode() + b"\n")

        conns = self.conns
        poll = self.ep.poll
        while not self.stop:
            now = time.monotonic()
            if self.end_at is not None and now >= self.end_at:
                break
            if now >= self.stop_by:  # the hard --timeout is near: stop, but report
                self.cut = True
                break
            if now >= self.t0 and self.ramp_done is None:
                self._ramp(now)
            while self.retry and self.retry[0][0] <= now:
                _due, k, last, tries = heapq.heappop(self.retry)
                self.reconnects += 1
                self._start(k, now, last, tries)
            if now >= next_snap:
                write(self.snapshot())
                while next_snap <= now:
                    next_snap += snap_every
            if now >= next_expire:
                if self.connecting:
                    self._expire_connects(now)
                next_expire = now + 1.0
            wake = next_snap
            due = self._next_due()
            if due is not None:
                wake = min(wake, max(due + RAMP_GRAIN, self.t0))
            if self.end_at is not None:
                wake = min(wake, self.end_at)
            if self.retry:
                wake = min(wake, self.retry[0][0])
            timeout = min(max(0.0, wake - now), 0.1)
            for fd, _ev in poll(timeout, 4096):
                c = conns.get(fd)
                if c is None:
                    continue
                if c.phase == _CONNECTING:
                    self._on_connect(fd, c, time.monotonic())
                else:
                    self._on_readable(fd, c)
        write(self.snapshot(final=True))
        if cfg.rst_close:
            linger = struct.pack("ii", 1, 0)
            for c in conns.values():
                try:
                    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                except OSError:
                    pass
        for c in conns.values():
            c.sock.close()
        conns.clear()
        if self.record is not None:
            self.record.close()


def _child(
    cfg: FloodConfig, index: int, nproc: int, t0: float, stop_by: float, start: float, wfd: int
) -> None:
    code = 0
    try:
        worker = _Worker(cfg, index, nproc, t0, stop_by, start)

        def _stop(_sig, _frame):
            worker.stop = True

        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)
        worker.run(wfd)
    except BrokenPipeError:  # the parent went away
        code = 1
    except BaseException:  # report, never hang the parent
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


# --------------------------------------------------------------------------------------
# Parent: fork workers, merge their snapshots, print, summarise
# --------------------------------------------------------------------------------------

_SUM_KEYS = (
    "attempted",
    "opened",
    "open",
    "connecting",
    "streaming",
    "welcomed",
    "closed",
    "resets",
    "http_errors",
    "protocol_errors",
    "connect_errors",
    "chunks",
    "messages",
    "bytes",
    "reconnects",
    "sent_at_connect",
)


class _Aggregate:
    def __init__(self, nproc: int) -> None:
        self.latest: list[dict] = [{} for _ in range(nproc)]
        self.final: list[dict | None] = [None] * nproc
        self.hist = LatencyHistogram()
        self.ihist = LatencyHistogram()
        self.open_max = 0

    def add(self, snap: dict) -> None:
        i = snap["i"]
        self.latest[i] = snap
        if snap["final"]:
            self.final[i] = snap
        self.hist.merge_sparse(snap["h"], snap["mx"])
        self.ihist.merge_sparse(snap["h"], snap["mx"])
        self.open_max = max(self.open_max, self.total("open"))

    def total(self, key: str) -> int:
        return sum(s["c"][key] for s in self.latest if s)

    def errors_by(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.latest:
            for k, v in (s.get("eb") or {}).items():
                out[k] = out.get(k, 0) + v
        return dict(sorted(out.items()))

    def times(self, key: str) -> list[float]:
        return [s[key] for s in self.latest if s and s.get(key) is not None]


def _fmt_ms(h: LatencyHistogram) -> str:
    if not h.count:
        return "latency -"
    s = h.summary_ms()
    return (
        f"latency ms p50={s['p50']:.2f} p99={s['p99']:.2f} max={s['max']:.2f} (n={s['count']})"
    )


def _port_range_size() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = map(int, f.read().split())
        return hi - lo + 1
    except (OSError, ValueError):
        return 28232


def _validate(cfg: FloodConfig) -> FloodConfig:
    if cfg.n < 1:
        raise ValueError("--n must be at least 1")
    if cfg.rate < 0:
        raise ValueError("--rate must be >= 0 (0: as fast as possible)")
    if cfg.duration < 0:
        raise ValueError("--duration must be >= 0")
    if cfg.interval <= 0:
        raise ValueError("--interval must be > 0")
    if not cfg.servers:
        raise ValueError("no server given")
    for host, _port in cfg.servers:
        check_loopback(host, "server")
    for ip in cfg.source_ips:
        check_loopback(ip, "source address")
    if cfg.first_id < 0:
        raise ValueError("--first-id must be >= 0")
    if cfg.record and not cfg.path.startswith("/events/"):
        raise ValueError("--record needs --events: only SSE events carry message ids")
    if cfg.processes <= 0:
        cfg.processes = default_processes(cfg.n)
    cfg.processes = min(cfg.processes, cfg.n)
    per = math.ceil(cfg.n / cfg.processes)
    cap = _per_process_cap()
    if per > cap:
        need = math.ceil(cfg.n / cap)
        raise ValueError(
            f"{per} connections per process exceed the open-file limit ({cap} usable); "
            f"use --processes {need} or more"
        )
    ramp = (cfg.n - 1) / cfg.rate if cfg.rate else cfg.n / 5000.0
    if cfg.timeout <= 0:
        cfg.timeout = ramp + cfg.connect_timeout + cfg.duration + 30.0
    return cfg


def run(cfg: FloodConfig, out=None) -> dict:
    """Run one flood described by *cfg*; print progress to *out*; return the summary."""
    out = out or sys.stdout
    cfg = _validate(cfg)
    nproc = cfg.processes
    pairs = len(cfg.servers) * max(1, len(cfg.source_ips))
    per_pair = math.ceil(cfg.n / pairs)
    if per_pair > _port_range_size():
        print(
            f"warning: {per_pair} connections per (source, server) pair exceed the "
            f"{_port_range_size()} ephemeral ports; expect EADDRNOTAVAIL "
            "(use --source-ips 127.0.1.1-127.0.1.20)",
            file=sys.stderr,
        )
    servers = ", ".join(f"{h}:{p}" for h, p in cfg.servers)
    srcs = f"{len(cfg.source_ips)} source ips" if cfg.source_ips else "default source ip"
    rate = f"{cfg.rate:g}/s" if cfg.rate else "unlimited"
    print(
        f"floodtest: {cfg.n} connections to {servers} from {srcs}, {nproc} process(es), "
        f"rate {rate}, hold {cfg.duration:g}s, ids {cfg.first_id}..{cfg.first_id + cfg.n - 1}",
        file=out,
        flush=True,
    )
    out.flush()
    sys.stderr.flush()

    start = time.monotonic()
    t0 = start + 0.05 + 0.01 * nproc
    deadline = start + cfg.timeout
    stop_by = deadline - min(3.0, cfg.timeout / 4)
    children: dict[int, int] = {}  # read fd -> pid
    bufs: dict[int, bytes] = {}
    for i in range(nproc):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            for fd in children:
                os.close(fd)
            _child(cfg, i, nproc, t0, stop_by, start, w)
        os.close(w)
        children[r] = pid
        bufs[r] = b""

    agg = _Aggregate(nproc)
    stopping = {"sig": None}

    def _on_signal(sig, _frame):
        stopping["sig"] = sig
        for pid in children.values():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    next_print = start + cfg.interval + 0.05  # just after the workers' snapshots
    last_chunks, last_t = 0, start
    timed_out = False
    open_fds = dict(children)
    try:
        while open_fds:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if now >= next_print:
                chunks = agg.total("chunks")
                rate_c = (chunks - last_chunks) / max(1e-9, now - last_t)
                last_chunks, last_t = chunks, now
                print(
                    f"[{now - start:7.1f}s] Open={agg.total('open')} "
                    f"Closed={agg.total('closed')} Chunks={chunks} ({rate_c:.0f}/s) "
                    f"Bytes={agg.total('bytes')} ConnectErrors={agg.total('connect_errors')} "
                    f"Pending={agg.total('connecting')} "
                    f"NoResponse={agg.total('open') - agg.total('streaming')} "
                    f"{_fmt_ms(agg.ihist)}",
                    file=out,
                    flush=True,
                )
                agg.ihist.reset()
                next_print += cfg.interval
            wait = max(0.0, min(next_print, deadline) - now)
            try:
                ready, _, _ = select.select(list(open_fds), [], [], min(wait, 0.25))
            except InterruptedError:
                continue
            for fd in ready:
                data = os.read(fd, 1 << 20)
                if not data:
                    os.close(fd)
                    del open_fds[fd]
                    continue
                buf = bufs[fd] + data
                *lines, bufs[fd] = buf.split(b"\n")
                for line in lines:
                    if line:
                        agg.add(json.loads(line))
    finally:
        for fd in open_fds:
            os.close(fd)
        for pid in children.values():
            if timed_out:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for pid in children.values():
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        for s, h in old.items():
            signal.signal(s, h)
    end = time.monotonic()
    if cfg.record:
        with open(cfg.record, "wb") as merged:
            for i in range(nproc):
                part = f"{cfg.record}.w{i}"
                try:
                    with open(part, "rb") as f:
                        merged.write(f.read())
                    os.remove(part)
                except FileNotFoundError:
                    pass  # a worker that never started
    summary = _summary(cfg, agg, start, t0, end, timed_out, stopping["sig"])
    _print_summary(summary, out)
    return summary


def _summary(cfg, agg: _Aggregate, start, t0, end, timed_out, sig) -> dict:
    tot = {k: agg.total(k) for k in _SUM_KEYS}
    firsts, lasts = agg.times("first_open"), agg.times("last_open")
    ramp_s = (max(lasts) - t0) if lasts else 0.0
    opened = tot["opened"]
    if opened >= 2 and firsts and max(lasts) > min(firsts):
        ramp_rate = (opened - 1) / (max(lasts) - min(firsts))
    elif opened and ramp_s > 0:
        ramp_rate = opened / ramp_s
    else:
        ramp_rate = 0.0
    finals = [f for f in agg.final if f]
    timed_out = timed_out or len(finals) < cfg.processes or any(f["cut"] for f in finals)
    rss_delta = sum(f["rss_kb"] - f["rss0_kb"] for f in finals)
    open_end = sum(f["c"]["open"] for f in finals)
    return {
        "n": cfg.n,
        "processes": cfg.processes,
        "servers": [f"{h}:{p}" for h, p in cfg.servers],
        "source_ips": len(cfg.source_ips),
        "first_id": cfg.first_id,
        "target_rate": cfg.rate,
        "attempted": tot["attempted"],
        "opened": opened,
        "open_max": max(agg.open_max, open_end),
        "open_end": open_end,
        "welcomed": tot["welcomed"],
        "closed": tot["closed"],
        "resets": tot["resets"],
        "http_errors": tot["http_errors"],
        "protocol_errors": tot["protocol_errors"],
        "connect_errors": tot["connect_errors"],
        "connect_errors_by_errno": agg.errors_by(),
        "pending_end": tot["connecting"],
        "chunks": tot["chunks"],
        "messages": tot["messages"],
        "bytes": tot["bytes"],
        "reconnects": tot["reconnects"],
        "sent_at_connect": tot["sent_at_connect"],
        "latency_ms": agg.hist.summary_ms(),
        "duration_s": round(end - start, 3),
        "ramp_s": round(ramp_s, 3),
        "ramp_rate": round(ramp_rate, 1),
        "client_rss_kb": sum(f["rss_kb"] for f in finals),
        # RSS moves in pages and allocator arenas: below ~1000 held connections
        # the per-connection figure would be noise, so it is left out.
        "rss_bytes_per_conn": round(rss_delta * 1024 / open_end) if open_end >= 1000 else None,
        "timed_out": timed_out,
        "interrupted": bool(sig),
        "workers_reported": len(finals),
    }


def _print_summary(s: dict, out) -> None:
    lat = s["latency_ms"]
    lines = [
        "summary:",
        f"  opened {s['opened']}/{s['n']} (open max {s['open_max']}, at end {s['open_end']}, "
        f"welcomed {s['welcomed']}), closed during run {s['closed']} "
        f"(resets {s['resets']}, http errors {s['http_errors']})",
        f"  connect errors {s['connect_errors']} {s['connect_errors_by_errno'] or ''}".rstrip(),
        f"  chunks {s['chunks']} (messages with ts= {s['messages']}), bytes {s['bytes']}",
        f"  latency ms p50 {lat['p50']} p99 {lat['p99']} max {lat['max']} (n={lat['count']})",
        f"  ramp {s['ramp_s']}s at {s['ramp_rate']} conn/s, run {s['duration_s']}s, "
        f"{s['processes']} process(es)",
        f"  client RSS {s['client_rss_kb']} KB"
        + (f", {s['rss_bytes_per_conn']} bytes per held connection"
           if s["rss_bytes_per_conn"] is not None else ""),
    ]
    if s["timed_out"]:
        lines.append("  TIMED OUT: the run hit --timeout; counters are from the workers' "
                     "last reports")
    print("\n".join(lines), file=out, flush=True)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

#: cometd's own variable for its HS256 secret (cometd.config), read when no file is given
SECRET_ENV = "COMETD_JWT_SECRET"


def stream_tokens(secret_file: str | None, tokens_file: str | None, audience: str | None,
                  issuer: str | None, ttl: int, users: range) -> Callable[[str], str] | None:
    """How the streams of *users* get their tokens: minted HS256 from
    --jwt-secret-file or the environment (valid *ttl* seconds from each connect),
    looked up in --tokens-file ("<user> <token>" lines), or None for none."""
    if tokens_file is not None:
        if secret_file is not None:
            raise ValueError("give --jwt-secret-file or --tokens-file, not both")
        tokens: dict[str, str] = {}
        for number, line in setting_lines(tokens_file, "--tokens-file", ValueError):
            fields = line.split()
            if len(fields) != 2:  # never the line itself: it holds a token
                raise ValueError(f"--tokens-file: {tokens_file} line {number} is not "
                                 "'<user> <token>'")
            tokens[fields[0]] = fields[1]
        missing = next((user for user in users if str(user) not in tokens), None)
        if missing is not None:
            raise ValueError(f"--tokens-file: {tokens_file} has no token for user {missing}")
        return tokens.__getitem__
    secret = read_secret(secret_file, SECRET_ENV, "--jwt-secret-file")
    if secret is None:
        return None
    from cometd.auth import Minter

    minter = Minter(secret, audience, issuer)
    return lambda user: minter(user, ttl)



@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Server address (loopback only) when no --server is given.")
@click.option("--port", default=8000, show_default=True, type=int,
              help="Server port when no --server is given.")
@click.option("--server", "servers", multiple=True, metavar="HOST:PORT",
              help="A server address; repeat it to spread connections round-robin "
                   "over several servers. Overrides --host/--port.")
@click.option("--n", "n", default=1000, show_default=True, type=int,
              help="Number of streaming connections to open and hold.")
@click.option("--rate", default=1000.0, show_default=True, type=float,
              help="New connections per second over all processes (0: as fast as possible).")
@click.option("--duration", default=10.0, show_default=True, type=float,
              help="Seconds to hold the connections once every connect has resolved "
                   "(established or failed); then floodtest closes everything and exits.")
@click.option("--first-id", default=1, show_default=True, type=int,
              help="User id of the first connection (GET /test/<id>); the others count up.")
@click.option("--source-ips", default=None, metavar="RANGE",
              help="Local source addresses to spread connections over, e.g. "
                   "127.0.1.1-127.0.1.20 (comma-separated ranges/addresses, loopback only). "
                   "Each address brings its own ~28K-64K ephemeral ports.")
@click.option("--processes", default=0, type=int,
              help="Worker processes (each may hold < 20,000 files). "
                   "Default: ceil(n / 19000).")
@click.option("--interval", default=10.0, show_default=True, type=float,
              help="Seconds between progress lines (Open, Closed, Chunks, Bytes, errors, "
                   "latency over the interval).")
@click.option("--json", "json_path", default=None, metavar="FILE",
              help="Write the end-of-run summary as JSON to FILE ('-' for stdout).")
@click.option("--timeout", default=0.0, type=float,
              help="Hard limit on the whole run in seconds; workers still running then "
                   "are killed. Default: planned ramp + connect timeout + duration + 30.")
@click.option("--connect-timeout", default=15.0, show_default=True, type=float,
              help="Seconds the kernel may take to make a TCP connect before it counts as "
                   "an error (ETIMEDOUT); one it made is never one, however late floodtest "
                   "gets to it.")
@click.option("--max-pending", default=1000, show_default=True, type=int,
              help="Most connects in progress per process; the ramp waits beyond that "
                   "instead of overrunning the server's listen backlog.")
@click.option("--rst-close", is_flag=True,
              help="Close with RST at the end (SO_LINGER 0) so no client ports linger in "
                   "TIME_WAIT; default is a normal FIN close.")
@click.option("--events", is_flag=True,
              help="Open SSE streams (GET /events/<id>) instead of /test: events carry "
                   "message ids (the latency of SSE messages is not measured).")
@click.option("--reconnect", is_flag=True,
              help="Open a stream that ends again, after 0.1 s doubling per failed connect "
                   "up to 5 s, each +-50%; with --events it resumes from the last id it "
                   "saw (Last-Event-ID).")
@click.option("--record", default=None, metavar="FILE",
              help="With --events: write '<user> <message id> <unix time>' to FILE for "
                   "every event received (for the delivery check, cometd.loadtest.delivery).")
@click.option("--jwt-secret-file", default=None, metavar="FILE",
              help="A server with --jwt-secret: mint each stream an HS256 token (sub: its "
                   "user, valid for the whole run) with the secret in FILE (its first line "
                   "that is not blank or a # comment). Default: the secret in "
                   f"${SECRET_ENV}, as cometd reads it; neither: no token.")
@click.option("--jwt-audience", default=None, metavar="AUD",
              help="The aud claim of the minted tokens (the server's --jwt-audience).")
@click.option("--jwt-issuer", default=None, metavar="ISS",
              help="The iss claim of the minted tokens (the server's --jwt-issuer).")
@click.option("--tokens-file", default=None, metavar="FILE",
              help="Send the tokens in FILE instead, one '<user> <token>' a line (minted "
                   "elsewhere, e.g. for a server with --jwt-key); every user needs one.")
def main(host, port, servers, n, rate, duration, first_id, source_ips, processes, interval,
         json_path, timeout, connect_timeout, max_pending, rst_close, events, reconnect,
         record, jwt_secret_file, jwt_audience, jwt_issuer, tokens_file) -> None:
    """Open N long-lived cometd streams (GET /test/<id>) from this machine, hold them
    for --duration seconds, print counters every --interval seconds and a summary.

    Messages whose body starts with ts=<unix time>; (as sent by msggen) are timed:
    the summary and progress lines show their delivery latency p50/p99/max.
    Against a secured server each stream sends a token (Authorization: Bearer),
    minted from --jwt-secret-file or $COMETD_JWT_SECRET, or read from --tokens-file.
    """
    try:
        if servers:
            targets = [parse_server(s) for s in servers]
        else:
            targets = [parse_server(f"{host}:{port}")]
        sources = parse_source_ips(source_ips) if source_ips else []
        cfg = FloodConfig(
            servers=targets, n=n, rate=rate, duration=duration, first_id=first_id,
            source_ips=sources, processes=processes, interval=interval, timeout=timeout,
            connect_timeout=connect_timeout, max_pending=max(1, max_pending),
            rst_close=rst_close, path="/events/" if events else "/test/",
            reconnect=reconnect, record=record,
        )
        _validate(cfg)
        # Valid past the run's hard limit, so no stream outlives its token.
        cfg.token = stream_tokens(jwt_secret_file, tokens_file, jwt_audience, jwt_issuer,
                                  math.ceil(cfg.timeout) + 60, range(first_id, first_id + n))
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    finish(run(cfg), json_path)


if __name__ == "__main__":
    main()
