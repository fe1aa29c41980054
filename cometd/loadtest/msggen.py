"""msggen: publish timestamped messages to cometd at a fixed rate.

Every message is a ``POST /send/<subject>`` through the HTTP API, where the
subject is drawn from ``1..--users`` (uniformly, or Zipf-skewed with ``--zipf S``
so that user ``k`` is picked with weight ``1/k**S``). The body carries its send
time so that :mod:`cometd.loadtest.floodtest` can time delivery::

    ts=1764140000.123456;from=42;seq=17;xxxxxxxx...

(``ts=`` is ``time.time()`` with six decimals, taken just before the request is
written; ``--size`` pads the body with ``x`` to that many bytes.) msggen prints
the achieved rate, the deliveries reported by the server (the sum of
``delivered`` in the replies), errors and the POST latency every ``--interval``
seconds, and a summary at the end (``--json FILE`` writes it for tools).

With ``--via redis-stream`` each message is instead one ``XADD`` to the
Redis Stream cometd ingests (``--ingest-stream``; see :mod:`cometd.ingest`)::

    XADD <--stream> MAXLEN ~ 1000000 * from <subject> body <body>

The latency reported is then the XADD's, and there is no delivered count
(nothing answers with one). ``--record`` adds a ``reply`` list to each entry,
into which cometd writes each entry's message id once routed; msggen reads it
at the end (waiting while they keep coming, up to ``--request-timeout``
without a new one) and writes
``<subject> <message id>`` as for HTTP.

Only loopback URLs are accepted (the Redis one too). Against a secured
cometd every POST carries ``Authorization: Bearer <key>``, the API key from
``--api-key-file`` or ``COMETD_API_KEY`` (never a command line argument).

Theory of operation
-------------------

``--concurrency`` greenlets each own one keep-alive HTTP/1.1 connection and send
one request at a time (no pipelining), so at most ``concurrency`` requests are
ever in flight. Message ``i`` is due at ``t0 + i / rate``; a sender takes the
next slot, sleeps until it is due, sends, waits for the reply, and takes the
next slot. When the server is slower than ``--rate``, a sender finds its slot
already in the past; once it is more than ``SLACK`` (0.25 s) late, the sender
jumps to the present slot and counts the skipped ones as ``missed`` instead of
bursting to catch up. msggen therefore never queues work without bound: it
sends as fast as the server answers, and reports the achieved rate next to the
target. ``--rate 0`` means "as fast as the server answers". A reply that does
not arrive within ``--request-timeout`` is an error and the connection is
replaced; the whole run is also capped by a hard ``--timeout``.

With ``--batch N`` a sender takes N slots and, once the last of them is due,
posts their N messages in one ``POST /publish`` (one JSON object a line, see
:mod:`cometd.publish`): ``--rate`` still counts messages, ``sent`` and the
deliveries count each message the server took, latency is per request.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from signal import SIGINT, SIGTERM
from urllib.parse import unquote, urlsplit

import click
import gevent
import hiredis
import numpy as np
from gevent import socket

from cometd.config import API_KEY
from cometd.loadtest.common import LatencyHistogram, check_loopback, finish, read_secret
from cometd.publish import MAX_BATCH_MESSAGES

__all__ = ["MsgGenConfig", "SubjectSampler", "make_body", "parse_url", "parse_redis_url",
           "run", "main", "VIAS", "API_KEY_ENV"]

SLACK = 0.25  # seconds a slot may be late before the sender skips ahead
_MAX_SIZE = 1 << 20
VIAS = ("http", "redis-stream")
STREAM_MAXLEN = 1_000_000  # entries a stream keeps (MAXLEN ~): cometd reads them in ms
#: cometd's own variable for its API keys (cometd.config), read when no file is given
API_KEY_ENV = "COMETD_API_KEY"


def make_body(subject: int, seq: int, size: int = 0, now: float | None = None) -> bytes:
    """Return a message body ``ts=<now>;from=<subject>;seq=<seq>;`` padded to *size*."""
    ts = time.time() if now is None else now
    body = b"ts=%.6f;from=%d;seq=%d;" % (ts, subject, seq)
    if size > len(body):
        body += b"x" * (size - len(body))
    return body


def parse_url(url: str) -> tuple[str, int, str]:
    """Split ``http://HOST[:PORT][/prefix]`` into a loopback ``(ip, port, prefix)``.

    Raises :class:`ValueError` for other schemes or non-loopback hosts.
    """
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"url {url!r}: only http:// URLs are supported")
    if not parts.hostname:
        raise ValueError(f"url {url!r}: no host")
    ip = check_loopback(parts.hostname, "url host")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"url {url!r}: bad port") from None
    return ip, port, parts.path.rstrip("/")


def parse_redis_url(url: str) -> tuple[str, int, str | None, str | None, int]:
    """Split ``redis://[[user]:password@]HOST[:PORT][/DB]`` into loopback parts.

    Returns ``(ip, port, user, password, db)``; raises :class:`ValueError`.
    """
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ValueError(f"--redis {parts.scheme}://...: only redis:// URLs are supported")
    if not parts.hostname:
        raise ValueError("--redis: no host")
    ip = check_loopback(parts.hostname, "--redis host")
    try:
        port = parts.port or 6379
        db = int(parts.path.strip("/") or 0)
    except ValueError:
        raise ValueError("--redis: bad port or database number") from None
    password = unquote(parts.password) if parts.password is not None else None
    return ip, port, parts.username or None, password, db


def _resp(*args: bytes) -> bytes:
    """One Redis command in RESP."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class _RedisConn:
    """One Redis connection for a sender: a command, its reply (hiredis parses)."""

    __slots__ = ("sock", "reader")

    def __init__(self, url: str, timeout: float) -> None:
        host, port, user, password, db = parse_redis_url(url)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()
        if password is not None:
            self.call(b"AUTH", *([user.encode()] if user else []), password.encode())
        if db:
            self.call(b"SELECT", b"%d" % db)

    def call(self, *args: bytes):
        """Send one command and return its reply; a Redis error raises ValueError."""
        self.sock.sendall(_resp(*args))
        while True:
            reply = self.reader.gets()
            if reply is not False:
                break
            more = self.sock.recv(65536)
            if not more:
                raise ConnectionResetError("Redis closed the connection")
            self.reader.feed(more)
        if isinstance(reply, hiredis.ReplyError):
            raise ValueError(f"redis: {reply}")
        return reply

    def close(self) -> None:
        self.sock.close()


class SubjectSampler:
    """Draws subjects from ``1..users``: uniform, or Zipf-like with exponent *zipf*.

    With ``zipf=S`` user ``k`` has weight ``1/k**S`` (user 1 is the hottest);
    samples come from a precomputed CDF in batches of 4096 via numpy.
    """

    def __init__(self, users: int, zipf: float | None = None, seed: int | None = None) -> None:
        if users < 1:
            raise ValueError("--users must be at least 1")
        if zipf is not None and zipf <= 0:
            raise ValueError("--zipf must be > 0")
        self.users = users
        self.rng = np.random.default_rng(seed)
        self.cdf = None
        if zipf is not None:
            w = np.arange(1, users + 1, dtype=np.float64) ** -float(zipf)
            cdf = np.cumsum(w)
            self.cdf = cdf / cdf[-1]
        self._batch: list[int] = []

    def _refill(self) -> None:
        if self.cdf is None:
            batch = self.rng.integers(1, self.users + 1, size=4096)
        else:
            batch = np.searchsorted(self.cdf, self.rng.random(4096), side="right") + 1
            np.minimum(batch, self.users, out=batch)
        self._batch = batch.tolist()[::-1]

    def __call__(self) -> int:
        """Return the next subject."""
        if not self._batch:
            self._refill()
        return self._batch.pop()


@dataclass
class MsgGenConfig:
    """Everything one msggen run needs."""

    url: str = "http://127.0.0.1:8000"
    rate: float = 100.0
    duration: float = 10.0
    users: int = 1000
    zipf: float | None = None
    concurrency: int = 8
    size: int = 0
    interval: float = 10.0
    request_timeout: float = 5.0
    timeout: float = 0.0  # 0: duration + request_timeout + 10
    seed: int | None = None
    #: stop after this many slots (0: no limit; --duration still bounds the run)
    count: int = 0
    #: write "<subject> <message id>" for every message the server took
    #: (see cometd.loadtest.delivery)
    record: str | None = None
    #: messages per request: 1 posts /send/<subject>, more post a batch to /publish
    batch: int = 1
    #: "http" (POST /send) or "redis-stream" (XADD to *stream* at *redis*)
    via: str = "http"
    redis: str = "redis://127.0.0.1:6379/0"
    stream: str = "cometd:messages"
    #: sent as Authorization: Bearer with every POST (a secured server)
    api_key: str | None = field(default=None, repr=False)


class _Stats:
    def __init__(self) -> None:
        self.sent = 0  # answered 200
        self.deliveries = 0
        self.errors = 0
        self.errors_by: dict[str, int] = {}
        self.missed = 0
        self.hist = LatencyHistogram()
        self.ihist = LatencyHistogram()
        self.last_done = 0.0

    def error(self, kind: str) -> None:
        self.errors += 1
        self.errors_by[kind] = self.errors_by.get(kind, 0) + 1

    def answered(self, started: float) -> None:
        """A reply came for the request sent at *started* (``perf_counter``)."""
        lat = time.perf_counter() - started
        self.hist.record(lat)
        self.ihist.record(lat)
        self.last_done = time.monotonic()


class _HttpConn:
    """One keep-alive connection: send a request, read one Content-Length reply."""

    __slots__ = ("sock", "buf")

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def request(self, data: bytes) -> tuple[int, bytes, bool]:
        """Send *data*; return ``(status, body, keep_alive)``."""
        self.sock.sendall(data)
        while b"\r\n\r\n" not in self.buf:
            more = self.sock.recv(65536)
            if not more:
                raise ConnectionResetError("connection closed before the reply")
            self.buf += more
            if len(self.buf) > 65536:
                raise ValueError("reply headers too long")
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(None, 2)[1])
        length, keep = 0, True
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                keep = False
            elif name == b"transfer-encoding":
                raise ValueError("chunked replies are not supported")
        while len(rest) < length:
            more = self.sock.recv(65536)
            if not more:
                raise ConnectionResetError("connection closed inside the reply body")
            rest += more
        self.buf = rest[length:]
        return status, rest[:length], keep

    def close(self) -> None:
        self.sock.close()


class _Generator:
    def __init__(self, cfg: MsgGenConfig, out) -> None:
        self.cfg = cfg
        self.out = out
        self.host, self.port, self.prefix = parse_url(cfg.url)
        self.sample = SubjectSampler(cfg.users, cfg.zipf, cfg.seed)
        self.stats = _Stats()
        self.next_slot = 0
        self.t0 = 0.0
        self.end = 0.0
        self.hostport = f"{self.host}:{self.port}".encode()
        self.authorization = (b"Authorization: Bearer %s\r\n" % cfg.api_key.encode()
                              if cfg.api_key else b"")
        self.interrupted = False
        self.recorded: list[str] = []
        #: --via redis-stream --record: the list cometd writes ids to, entry id -> subject
        self.reply_key = f"msggen:ids:{os.getpid()}:{time.time_ns()}".encode()
        self.entries: dict[bytes, int] = {}

    def take_slot(self) -> tuple[int, float] | None:
        """Claim the next send slot ``(seq, due time)``, or None when the run is over."""
        now = time.monotonic()
        if now >= self.end:
            return None
        i = self.next_slot
        rate = self.cfg.rate
        if self.cfg.count and i >= self.cfg.count:
            return None
        if not rate:
            self.next_slot = i + 1
            return i, now
        due = self.t0 + i / rate
        if now - due > SLACK:  # the server is behind: skip, do not queue
            j = int((now - self.t0) * rate)
            if self.cfg.count:
                j = min(j, self.cfg.count)
            self.stats.missed += j - i
            i, due = j, self.t0 + j / rate
        if due >= self.end or (self.cfg.count and i >= self.cfg.count):
            return None
        self.next_slot = i + 1
        return i, due

    def stream_sender(self) -> None:
        """One XADD per slot on this sender's own Redis connection (--via redis-stream)."""
        cfg, st = self.cfg, self.stats
        conn: _RedisConn | None = None
        head = [b"XADD", cfg.stream.encode(), b"MAXLEN", b"~", b"%d" % STREAM_MAXLEN, b"*"]
        if cfg.record is not None:
            head += [b"reply", self.reply_key]
        while True:
            slot = self.take_slot()
            if slot is None:
                break
            seq, due = slot
            delay = due - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            if conn is None:
                try:
                    conn = _RedisConn(cfg.redis, cfg.request_timeout)
                except (OSError, ValueError) as e:
                    st.error(f"connect:{type(e).__name__}")
                    gevent.sleep(0.05)
                    continue
            subject = self.sample()
            body = make_body(subject, seq, cfg.size)
            t = time.perf_counter()
            try:
                entry = conn.call(*head, b"from", b"%d" % subject, b"body", body)
            except (OSError, ValueError) as e:
                st.error(type(e).__name__)
                conn.close()
                conn = None
                continue
            st.answered(t)
            st.sent += 1
            if cfg.record is not None:
                self.entries[entry] = subject
        if conn is not None:
            conn.close()

    def collect_ids(self) -> None:
        """--via redis-stream --record: the ids cometd wrote back, as "<subject> <id>" lines."""
        cfg = self.cfg
        conn = _RedisConn(cfg.redis, cfg.request_timeout)
        try:
            # cometd may still be working through a backlog: wait while the
            # ids keep coming, up to --request-timeout without a new one.
            got, deadline = 0, time.monotonic() + cfg.request_timeout
            while got < len(self.entries) and time.monotonic() < deadline:
                gevent.sleep(0.05)
                now = conn.call(b"LLEN", self.reply_key)
                if now > got:
                    got, deadline = now, time.monotonic() + cfg.request_timeout
            seen: set[bytes] = set()
            for line in conn.call(b"LRANGE", self.reply_key, b"0", b"-1"):
                entry, _, answer = line.partition(b" ")
                if entry in seen or entry not in self.entries:
                    continue  # cometd may say it twice after a crash: the same id
                seen.add(entry)
                if answer.startswith(b"rejected"):
                    self.stats.error("rejected")
                else:
                    self.recorded.append(f"{self.entries[entry]} {answer.decode()}\n")
            missing = len(self.entries) - len(seen)
            if missing:
                self.stats.errors_by["no-id"] = missing
                self.stats.errors += missing
            conn.call(b"DEL", self.reply_key)
        finally:
            conn.close()

    def _request(self, seqs: list[int]) -> tuple[bytes, list[int]]:
        """The request for the messages of slots *seqs*, and their subjects."""
        cfg = self.cfg
        subjects = [self.sample() for _ in seqs]
        if cfg.batch == 1:
            body = make_body(subjects[0], seqs[0], cfg.size)
            path = b"%s/send/%d" % (self.prefix.encode(), subjects[0])
        else:
            now = time.time()
            body = b"".join(b'{"from":"%d","body":"%s"}\n' % (
                subject, make_body(subject, seq, cfg.size, now)) for subject, seq in zip(
                    subjects, seqs, strict=True))
            path = self.prefix.encode() + b"/publish"
        return b"POST %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n%s" % (
            path, self.hostport, self.authorization, len(body), body), subjects

    def _slots(self) -> tuple[list[int], float]:
        """The next --batch slots (fewer at the end of the run) and when the last is due."""
        seqs: list[int] = []
        due = 0.0
        while len(seqs) < self.cfg.batch:
            slot = self.take_slot()
            if slot is None:
                break
            seqs.append(slot[0])
            due = slot[1]
        return seqs, due

    def sender(self) -> None:
        cfg, st = self.cfg, self.stats
        conn: _HttpConn | None = None
        while True:
            seqs, due = self._slots()
            if not seqs:
                break
            delay = due - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            if conn is None:
                try:
                    conn = _HttpConn(self.host, self.port, cfg.request_timeout)
                except OSError as e:
                    st.error(f"connect:{type(e).__name__}")
                    gevent.sleep(0.05)  # do not spin on a dead server
                    continue
            req, subjects = self._request(seqs)
            t = time.perf_counter()
            try:
                status, reply, keep = conn.request(req)
            except (OSError, ValueError, IndexError) as e:
                st.error(type(e).__name__)
                conn.close()
                conn = None
                continue
            st.answered(t)
            if status == 200:
                try:
                    answer = json.loads(reply)
                    answers = answer["results"] if cfg.batch > 1 else [answer]
                    if len(answers) != len(subjects):
                        raise ValueError("one answer per message")
                    st.sent += len(answers)
                    for subject, one in zip(subjects, answers, strict=True):
                        st.deliveries += int(one.get("delivered", 0))
                        if cfg.record is not None:
                            self.recorded.append(f"{subject} {one['id']}\n")
                except (ValueError, AttributeError, TypeError, KeyError):
                    st.error("bad-json")
            elif status in (201, 202):  # nginx + nchan's publisher (the fan-out bench's peer)
                st.sent += 1
            else:
                st.error(f"http-{status}")
            if not keep:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def reporter(self) -> None:
        st = self.stats
        last_sent, last_t = 0, self.t0
        k = 1
        while True:
            gevent.sleep(max(0.0, self.t0 + k * self.cfg.interval - time.monotonic()))
            now = time.monotonic()
            rate = (st.sent - last_sent) / max(1e-9, now - last_t)
            last_sent, last_t = st.sent, now
            lat = st.ihist.summary_ms()
            print(
                f"[{now - self.t0:7.1f}s] sent={st.sent} rate={rate:.0f}/s "
                f"deliveries={st.deliveries} errors={st.errors} missed={st.missed} "
                f"post ms p50={lat['p50']:.2f} p99={lat['p99']:.2f} max={lat['max']:.2f}",
                file=self.out,
                flush=True,
            )
            st.ihist.reset()
            k += 1

    def run(self) -> dict:
        cfg = self.cfg
        self.t0 = time.monotonic()
        self.end = self.t0 + cfg.duration
        hard = self.t0 + cfg.timeout
        def _interrupt() -> None:  # Ctrl-C / SIGTERM: stop sending, still summarise
            self.interrupted = True
            self.end = time.monotonic()

        handlers = [gevent.signal_handler(sig, _interrupt) for sig in (SIGINT, SIGTERM)]
        send = self.stream_sender if cfg.via == "redis-stream" else self.sender
        senders = [gevent.spawn(send) for _ in range(cfg.concurrency)]
        rep = gevent.spawn(self.reporter)
        gevent.joinall(senders, timeout=max(0.0, hard - time.monotonic()))
        timed_out = not all(g.dead for g in senders)
        gevent.killall(senders + [rep], block=True, timeout=1)
        for h in handlers:
            h.cancel()
        finished = time.monotonic()
        if cfg.record is not None and cfg.via == "redis-stream":
            try:
                self.collect_ids()
            except (OSError, ValueError) as e:
                self.stats.error(f"collect-ids:{type(e).__name__}")
        if cfg.record is not None:
            with open(cfg.record, "w") as f:
                f.writelines(self.recorded)
        st = self.stats
        span = (st.last_done or finished) - self.t0
        lat = st.hist.summary_ms()
        return {
            "url": cfg.url,
            "via": cfg.via,
            "target_rate": cfg.rate,
            "concurrency": cfg.concurrency,
            "users": cfg.users,
            "zipf": cfg.zipf,
            "size": cfg.size,
            "sent": st.sent,
            "errors": st.errors,
            "errors_by_kind": dict(sorted(st.errors_by.items())),
            "missed": st.missed,
            "deliveries": st.deliveries,
            "achieved_rate": round(st.sent / span, 1) if span > 0 else 0.0,
            "duration_s": round(finished - self.t0, 3),
            "latency_ms": {"p50": lat["p50"], "p99": lat["p99"], "max": lat["max"],
                           "count": lat["count"]},
            "timed_out": timed_out,
            "interrupted": self.interrupted,
        }


def _validate(cfg: MsgGenConfig) -> MsgGenConfig:
    parse_url(cfg.url)
    if cfg.via not in VIAS:
        raise ValueError(f"--via must be one of {', '.join(VIAS)}")
    if cfg.via == "redis-stream":
        parse_redis_url(cfg.redis)
        if not cfg.stream:
            raise ValueError("--stream must not be empty")
    if cfg.rate < 0:
        raise ValueError("--rate must be >= 0 (0: as fast as the server answers)")
    if cfg.duration < 0:
        raise ValueError("--duration must be >= 0")
    if cfg.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    if not 0 <= cfg.size <= _MAX_SIZE:
        raise ValueError(f"--size must be between 0 and {_MAX_SIZE}")
    if cfg.interval <= 0:
        raise ValueError("--interval must be > 0")
    if cfg.request_timeout <= 0:
        raise ValueError("--request-timeout must be > 0")
    if cfg.timeout <= 0:
        cfg.timeout = cfg.duration + cfg.request_timeout + 10.0
    SubjectSampler(1, cfg.zipf)  # validates --zipf
    if cfg.users < 1:
        raise ValueError("--users must be at least 1")
    if not 1 <= cfg.batch <= MAX_BATCH_MESSAGES:
        raise ValueError(f"--batch must be between 1 and {MAX_BATCH_MESSAGES}")
    if cfg.batch > 1 and cfg.via != "http":
        raise ValueError("--batch posts to /publish: it needs --via http")
    if cfg.api_key is not None and not API_KEY.fullmatch(cfg.api_key):
        raise ValueError("the API key has a character other than printable ASCII (no space "
                         "or comma)")  # never the key itself
    return cfg


def run(cfg: MsgGenConfig, out=None) -> dict:
    """Run one msggen session described by *cfg*; print progress to *out*; return the summary."""
    out = out or sys.stdout
    cfg = _validate(cfg)
    gen = _Generator(cfg, out)
    dist = f"zipf {cfg.zipf:g}" if cfg.zipf is not None else "uniform"
    rate = f"{cfg.rate:g}/s" if cfg.rate else "max"
    if cfg.via == "redis-stream":
        where = f"XADD {cfg.stream} at {cfg.redis} from <1..{cfg.users}>"
    elif cfg.batch == 1:
        where = f"POST {cfg.url}/send/<1..{cfg.users}>"
    else:
        where = f"POST {cfg.url}/publish ({cfg.batch} a request from 1..{cfg.users})"
    print(
        f"msggen: {where} ({dist}) at {rate} for "
        f"{cfg.duration:g}s, concurrency {cfg.concurrency}, size {cfg.size or 'unpadded'}",
        file=out,
        flush=True,
    )
    s = gen.run()
    lat = s["latency_ms"]
    print(
        "summary:\n"
        f"  sent {s['sent']} at {s['achieved_rate']}/s (target {rate}), "
        f"deliveries {s['deliveries']}\n"
        f"  errors {s['errors']}{' ' + str(s['errors_by_kind']) if s['errors'] else ''}\n"
        f"  missed slots {s['missed']} (server slower than the target rate)\n"
        f"  post latency ms p50 {lat['p50']} p99 {lat['p99']} max {lat['max']}, "
        f"run {s['duration_s']}s" + ("\n  TIMED OUT" if s["timed_out"] else ""),
        file=out,
        flush=True,
    )
    return s


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", default="http://127.0.0.1:8000", show_default=True,
              help="Base URL of the cometd HTTP API (loopback only); messages go to "
                   "<url>/send/<subject>.")
@click.option("--rate", default=100.0, show_default=True, type=float,
              help="Messages per second to publish (0: as fast as the server answers).")
@click.option("--duration", default=10.0, show_default=True, type=float,
              help="Seconds to publish for; then in-flight requests finish and msggen exits.")
@click.option("--users", default=1000, show_default=True, type=int,
              help="Subjects are drawn from user ids 1..USERS.")
@click.option("--zipf", default=None, type=float, metavar="S",
              help="Skew subjects Zipf-like: user k has weight 1/k**S (user 1 hottest). "
                   "Default: uniform.")
@click.option("--concurrency", default=8, show_default=True, type=int,
              help="Parallel senders, each with one keep-alive connection and at most one "
                   "request in flight.")
@click.option("--size", default=0, show_default=True, type=int,
              help="Pad each body with 'x' to this many bytes (bodies start with "
                   "ts=<send time>;from=<subject>;seq=<n>;). The server rejects > 64 KiB.")
@click.option("--interval", default=10.0, show_default=True, type=float,
              help="Seconds between progress lines (rate, deliveries, errors, POST latency).")
@click.option("--json", "json_path", default=None, metavar="FILE",
              help="Write the end-of-run summary as JSON to FILE ('-' for stdout).")
@click.option("--request-timeout", default=5.0, show_default=True, type=float,
              help="Seconds to wait for a reply before counting an error and reconnecting.")
@click.option("--timeout", default=0.0, type=float,
              help="Hard limit on the whole run in seconds. "
                   "Default: duration + request timeout + 10.")
@click.option("--seed", default=None, type=int, help="Random seed for subject choice.")
@click.option("--count", default=0, show_default=True, type=click.IntRange(min=0),
              help="Stop after this many slots, sent or missed (0: no limit); --duration "
                   "still bounds the run.")
@click.option("--via", type=click.Choice(VIAS), default="http", show_default=True,
              help="http: POST /send/<subject> to --url; redis-stream: one XADD per message "
                   "(fields from, body) to --stream, which cometd reads with --ingest-stream.")
@click.option("--redis", "redis_url", default="redis://127.0.0.1:6379/0", show_default=True,
              metavar="URL", help="With --via redis-stream: the Redis holding --stream "
                                  "(loopback only).")
@click.option("--stream", default="cometd:messages", show_default=True, metavar="KEY",
              help="With --via redis-stream: the stream to XADD to (kept to ~1,000,000 "
                   "entries).")
@click.option("--record", default=None, metavar="FILE",
              help="Write '<subject> <message id>' to FILE for every message the server "
                   "took, in reply order (for the delivery check, cometd.loadtest.delivery); "
                   "with --via redis-stream, from the ids cometd writes back.")
@click.option("--batch", default=1, show_default=True, type=int, metavar="N",
              help="Messages per request: more than 1 posts them together to /publish "
                   "(one JSON object a line); --rate still counts messages. --via http only.")
@click.option("--api-key-file", default=None, metavar="FILE",
              help="A server with API keys: send the key in FILE (its first line that is "
                   "not blank or a # comment, so the server's --api-keys-file will do) as "
                   "Authorization: Bearer with every POST. Default: the first key in "
                   f"${API_KEY_ENV}, as cometd reads it; neither: no key.")
def main(url, rate, duration, users, zipf, concurrency, size, interval, json_path,
         request_timeout, timeout, seed, count, record, via, redis_url, stream, batch,
         api_key_file) -> None:
    """Publish timestamped messages (POST /send/<subject>) at --rate per second for
    --duration seconds, from random subjects in 1..--users.

    Bodies start with ts=<unix time>; so floodtest can measure delivery latency.
    If the server cannot keep up, msggen reports the rate it achieved (and the
    slots it missed) rather than queueing.
    """
    cfg = MsgGenConfig(
        url=url, rate=rate, duration=duration, users=users, zipf=zipf,
        concurrency=concurrency, size=size, interval=interval,
        request_timeout=request_timeout, timeout=timeout, seed=seed, count=count,
        record=record, via=via, redis=redis_url, stream=stream, batch=batch,
    )
    try:
        cfg.api_key = read_secret(api_key_file, API_KEY_ENV, "--api-key-file", ",")
        _validate(cfg)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    finish(run(cfg), json_path)


if __name__ == "__main__":
    main()
