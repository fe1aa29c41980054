"""Ingest: route the messages a backend adds to a Redis Stream.

The seed expected messages "from a message bus, app servers". A backend
publishes one message with one command::

    XADD cometd:messages MAXLEN ~ 1000000 * from 42 body "hello"

and cometd (the single-process server with ``--ingest-stream KEY
--ingest-redis URL``, or the router of ``--workers N`` with ``--ingest-stream
KEY``) routes it as ``POST /send/42`` would. An entry's fields:

``from``   the subject, a valid id (see :mod:`cometd.ids`)
``body``   the message, 1 byte to 64 KiB
``reply``  optional: a Redis list to which cometd RPUSHes ``<entry id> <message id>``
           once the entry is routed, or ``<entry id> rejected <reason>``, so a
           backend (or ``msggen --via redis-stream --record``) learns the id

Any other field is ignored. An entry without ``from`` or ``body``, with an
invalid id or an empty or too large body, is acknowledged, counted as
rejected and logged (once, then counted per :data:`cometd.log.BURST_WINDOW`):
it is never retried.

Theory of operation
-------------------
cometd reads in a consumer group (``--ingest-group``, created at the
stream's end, ``$``, if missing) as one consumer (``--ingest-consumer``,
the host name by default): ``XREADGROUP ... COUNT --ingest-batch BLOCK 1000
STREAMS KEY >``. The entries of one read are routed as one batch (one
history write, see :meth:`cometd.router.Router.send_batch`), in stream
order, and the batches of successive reads are called in stream order too,
so one subject's messages keep their order: the router serialises sends per
subject in call order. Once the batch is routed, one pipelined round trip
sends the replies and
``XACK``\\s them all. Up to ``IN_FLIGHT`` reads are being routed at once:
the next read does not wait for the previous one's fan-out. So an entry
read but not acknowledged, because cometd died or Redis went away, stays in
the group's pending list; each time the reader (re)connects it first lets
the reads under way finish, then reads its own pending entries (``STREAMS
KEY 0``, then on past the last one read), and every ``CLAIM_EVERY`` it
takes over (``XAUTOCLAIM``) entries another consumer has left pending for
``CLAIM_IDLE`` seconds. Nothing a
backend added is lost while the stream keeps it (a ``MAXLEN`` trim of an
entry never read loses it; such entries, read back empty, count as
rejected, "trimmed").

Duplicates: routing an entry writes a *mark* (``i<stream>\\0<group>\\0<entry
id>`` -> the message id) into the history's LevelDB batch, in the same write
as the message itself (see :meth:`cometd.history.History.record`), and the
mark is deleted once the entry is acknowledged. A re-read entry that has a
mark was routed already: it is acknowledged (and answered with its message
id) without being routed again. So after a kill -9, each entry is routed
exactly once, as far as the history survives (it is not synced: a power loss
can lose its last writes, and then the entry is routed again: at least
once). Connections that were being written to when the process died get the
message when they resume from their last id, like any stream that missed
one. A crash between the ``XACK`` and the deletion of the marks leaves those
marks behind (one read's worth at most): harmless, they are never looked at
again.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import redis
from gevent.event import Event
from gevent.pool import Pool
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cometd import log
from cometd.config import MAX_MESSAGE_BYTES, IngestConfig, redacted
from cometd.history import format_id
from cometd.ids import InvalidId, check_id

__all__ = ["Ingest", "mark_prefix", "CLAIM_IDLE", "CLAIM_EVERY"]

BLOCK_MS = 1000  # how long one XREADGROUP waits for entries
RETRY = 0.5  # seconds between attempts while Redis does not answer
REFUSED_RETRY = 5.0  # ... and while it refuses a command (no permission, not a stream)
CLAIM_IDLE = 30.0  # seconds an entry may wait in another consumer's pending list
CLAIM_EVERY = 10.0
INFO_EVERY = 1.0  # how often the lag is read (XINFO GROUPS)
IN_FLIGHT = 4  # reads routed at once
STOP_WAIT = 2.0  # seconds a stop waits for the read under way to be routed and acked


def mark_prefix(stream: str, group: str) -> bytes:
    """The LevelDB prefix of the marks of entries of *stream* routed for *group*."""
    return b"i" + stream.encode() + b"\0" + group.encode() + b"\0"


class Ingest(Collector):
    """Reads *config*'s stream at *url* and routes each read's entries with *send*.

    *send(messages, marks)* routes a batch of ``(subject, body)`` with a mark
    each and returns each one's :class:`~cometd.router.Sent`
    (:meth:`cometd.router.Router.send_batch`); *db* is the plyvel database
    the marks live in (the history's).
    """

    def __init__(self, url: str, config: IngestConfig, send: Callable[..., Any],
                 db: Any) -> None:
        assert config.stream
        self.url = url
        self.stream = config.stream
        self.group = config.group
        self.consumer = config.consumer or socket.gethostname()
        self.batch = config.batch
        self._send = send
        self._db = db
        self._prefix = mark_prefix(self.stream, self.group)
        #: entries routed; entries found already routed (re-read after a crash)
        self.routed = 0
        self.recovered = 0
        #: rejected entries, by reason
        self.rejected: dict[str, int] = {}
        #: the group's pending entries and lag (entries not yet read), as last read
        self.pending = 0
        self.lag: int | None = None
        self._bursts: dict[str, log.Burst] = {}
        self._stopping = Event()
        self._greenlet: gevent.Greenlet | None = None
        self._info_at = 0.0
        self._claim_at = 0.0
        self._reachable: bool | None = None
        self._acks = Pool(IN_FLIGHT)
        self._failed: redis.RedisError | None = None
        self._last_ack: gevent.Greenlet | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        # The group first, before the server says it is ready: an entry added
        # after the banner is then read, never skipped by a group made at "$"
        # a moment later. Redis down: the loop below makes it once it answers.
        try:
            self._create_group(redis.Redis.from_url(self.url, socket_timeout=2))
        except (redis.RedisError, OSError):
            pass
        self._greenlet = gevent.spawn(self._forever)
        log.event("ingest_started", f"routing Redis Stream {self.stream} at "
                  f"{redacted(self.url)} (group {self.group}, consumer {self.consumer})",
                  stream=self.stream, group=self.group, consumer=self.consumer)

    def stop(self) -> None:
        """Let the read under way be routed and acked (bounded), then stop reading."""
        self._stopping.set()
        if self._greenlet is not None:
            self._greenlet.join(STOP_WAIT)
            self._greenlet.kill()
        self._acks.join(STOP_WAIT)
        self._acks.kill()

    def _forever(self) -> None:
        while not self._stopping.is_set():
            try:
                self._run(redis.Redis.from_url(self.url))
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                self._say_reachable(False, type(exc).__name__)
                self._stopping.wait(RETRY)
            except redis.ResponseError as exc:
                # Redis's own words (NOPERM, WRONGTYPE): no secret in them.
                self._say_reachable(False, str(exc).split("\n")[0][:200])
                self._stopping.wait(REFUSED_RETRY)

    def _say_reachable(self, ok: bool, why: str = "") -> None:
        if ok == self._reachable:
            return
        if not ok:
            log.event("ingest_unreachable", f"cannot read Redis Stream {self.stream} at "
                      f"{redacted(self.url)} ({why}); retrying", logging.WARNING,
                      stream=self.stream)
        elif self._reachable is False:
            log.event("ingest_reachable", f"reading Redis Stream {self.stream} again",
                      stream=self.stream)
        self._reachable = ok

    # -- reading -------------------------------------------------------------

    def _create_group(self, client: redis.Redis) -> None:
        try:
            client.xgroup_create(self.stream, self.group, id="$", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _run(self, client: redis.Redis) -> None:
        # Reads still being routed from before a reconnect: let them finish
        # (routed, marked) first, or the re-read below could route one again.
        self._acks.join()
        if self._failed is not None:
            self._failed = None
        self._create_group(client)
        # (Re)connected: first what this consumer read and did not ack.
        after = "0"
        while not self._stopping.is_set():
            entries = self._read(client, after)
            if not entries:
                break
            self._handle(client, entries, reread=True)
            after = entries[-1][0]  # they stay pending until acked: read on past them
        self._say_reachable(True)
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= self._claim_at:
                self._claim_at = now + CLAIM_EVERY
                self._claim(client)
            if now >= self._info_at:
                self._info_at = now + INFO_EVERY
                self._info(client)
            entries = self._read(client, ">")
            if entries:
                self._handle(client, entries, reread=False)

    def _read(self, client: redis.Redis, start: str | bytes) -> list[tuple[bytes, dict | None]]:
        reply = client.xreadgroup(self.group, self.consumer, {self.stream: start},
                                  count=self.batch, block=BLOCK_MS if start == ">" else None)
        return reply[0][1] if reply else []

    def _claim(self, client: redis.Redis) -> None:
        """Take over entries a consumer that went away left pending."""
        # Our own reads still being acked are pending too: XAUTOCLAIM would
        # report one that was trimmed meanwhile a second time.
        self._acks.join()
        start = "0-0"
        while not self._stopping.is_set():
            reply = client.xautoclaim(self.stream, self.group, self.consumer,
                                      int(CLAIM_IDLE * 1000), start, count=self.batch)
            start, entries = reply[0], reply[1]
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:  # trimmed while pending: XAUTOCLAIM already dropped them
                self._reject_many(len(deleted), "trimmed")
            if entries:
                self._handle(client, entries, reread=True)
            if start in (b"0-0", "0-0"):
                return

    def _info(self, client: redis.Redis) -> None:
        for group in client.xinfo_groups(self.stream):
            name = group.get("name")
            if name in (self.group, self.group.encode()):
                self.pending = int(group.get("pending") or 0)
                lag = group.get("lag")
                self.lag = None if lag is None else int(lag)

    # -- routing -------------------------------------------------------------

    def _handle(self, client: redis.Redis, entries: list[tuple[bytes, dict | None]],
                reread: bool) -> None:
        """Start routing one read's entries; a greenlet acks them once they are routed.

        Up to IN_FLIGHT reads are routed at once, so the next read does not
        wait for the previous one's fan-out (the router flushes to the edges
        every few ms). Their sends start here, in stream order, so one
        subject's messages keep that order across reads too.
        """
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed  # an ack failed: reconnect, and re-read what is pending
        jobs, batch = self._route(entries, reread)
        # Waits while IN_FLIGHT are under way; each acks after the one before it.
        self._last_ack = self._acks.spawn(self._acked, client, jobs, batch, self._last_ack)

    def _acked(self, client: redis.Redis, jobs: list[tuple[bytes, Any, bytes | None]],
               batch: gevent.Greenlet | None, before: gevent.Greenlet | None) -> None:
        try:
            if before is not None:
                before.join()  # replies and acks in stream order
            self._finish(client, jobs, batch)
        except redis.RedisError as exc:
            self._failed = exc

    def _route(self, entries: list[tuple[bytes, dict | None]],
               reread: bool) -> tuple[list[tuple[bytes, Any, bytes | None]],
                                      gevent.Greenlet | None]:
        """(entry id, answer or index in the batch, reply) of each entry, and the batch's
        greenlet (None: nothing to route), started now so that successive reads'
        batches are called in stream order."""
        jobs: list[tuple[bytes, Any, bytes | None]] = []
        messages: list[tuple[str, bytes]] = []
        marks: list[bytes] = []
        for entry_id, fields in entries:
            reply_to = fields.get(b"reply") if fields else None
            problem, subject, body = self._check(fields)
            if problem:
                self._reject(problem)
                jobs.append((entry_id, f"rejected {problem}", reply_to))
                continue
            mark = self._prefix + entry_id
            if reread:
                done = self._db.get(mark)
                if done is not None:
                    self.recovered += 1
                    jobs.append((entry_id, format_id(int.from_bytes(done, "big")), reply_to))
                    continue
            jobs.append((entry_id, len(messages), reply_to))
            messages.append((subject, body))
            marks.append(mark)
        return jobs, gevent.spawn(self._send, messages, marks) if messages else None

    def _finish(self, client: redis.Redis, jobs: list[tuple[bytes, Any, bytes | None]],
                batch: gevent.Greenlet | None) -> None:
        """Wait for the batch, then reply and ack in one round trip, then drop the marks."""
        sent = None
        if batch is not None:
            batch.join()
            if batch.successful():
                sent = batch.value
            else:
                log.event("ingest_route_failed", f"routing a read of the stream failed "
                          f"({type(batch.exception).__name__}: {batch.exception})",
                          logging.ERROR)
        answers: list[tuple[bytes, str, bytes | None]] = []
        for entry_id, job, reply_to in jobs:
            if isinstance(job, int):
                if sent is not None:
                    self.routed += 1
                    job = sent[job].id
                else:
                    # The batch took its ids (its marks say which) before it
                    # failed: those entries are in the history, the rest are not.
                    done = self._db.get(self._prefix + entry_id)
                    if done is not None:
                        self.routed += 1
                        job = format_id(int.from_bytes(done, "big"))
                    else:  # a bug, not the entry: said, counted, not retried forever
                        self._reject("error")
                        job = "rejected error"
            answers.append((entry_id, job, reply_to))
        pipe = client.pipeline(transaction=False)
        for entry_id, answer, reply_to in answers:
            if reply_to:
                pipe.rpush(reply_to, b"%s %s" % (entry_id, answer.encode()))
        pipe.xack(self.stream, self.group, *[entry_id for entry_id, _, _ in answers])
        pipe.execute()
        with self._db.write_batch() as batch:
            for entry_id, _, _ in answers:
                batch.delete(self._prefix + entry_id)

    @staticmethod
    def _check(fields: dict | None) -> tuple[str, str, bytes]:
        """(problem, subject, body); problem is "" for an entry that can be routed."""
        if not fields:
            return "trimmed", "", b""  # deleted from the stream while pending
        raw, body = fields.get(b"from"), fields.get(b"body")
        if raw is None or body is None:
            return "missing from or body", "", b""
        try:
            subject = check_id(raw.decode("ascii"))
        except (UnicodeDecodeError, InvalidId):
            return "invalid from", "", b""
        if not body:
            return "empty body", "", b""
        if len(body) > MAX_MESSAGE_BYTES:
            return "body over 64 KiB", "", b""
        return "", subject, body

    def _reject(self, reason: str) -> None:
        self._reject_many(1, reason)

    def _reject_many(self, n: int, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + n
        burst = self._bursts.get(reason)
        if burst is None:
            burst = self._bursts[reason] = log.Burst(
                "ingest_rejected", f"stream entry rejected ({reason}), acknowledged and dropped")
        for _ in range(n):
            burst.note()

    # -- metrics -------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        entries = CounterMetricFamily("cometd_ingest_entries", "Redis Stream entries "
                                      "acknowledged, by result", labels=["result"])
        entries.add_metric(["routed"], self.routed)
        entries.add_metric(["recovered"], self.recovered)
        entries.add_metric(["rejected"], sum(self.rejected.values()))
        yield entries
        yield GaugeMetricFamily("cometd_ingest_pending", "Entries the group read and has "
                                "not acknowledged (XINFO GROUPS)", value=self.pending)
        if self.lag is not None:
            yield GaugeMetricFamily("cometd_ingest_lag", "Entries in the stream the group "
                                    "has not read yet (XINFO GROUPS)", value=self.lag)
