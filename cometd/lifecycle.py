"""One server lifecycle for the three assemblies: single process, router and edge.

``Server(config, role).serve()`` builds the role's parts from the
:class:`~cometd.config.Config`, prints the one-line banner that says it is
ready, waits for SIGINT or SIGTERM and shuts down.

Theory of operation
-------------------
:meth:`Server.startup` starts the parts one by one and registers each part's
stop on an ``ExitStack`` as soon as the part is running; :meth:`Server.shutdown`
closes the stack, so every part that started is stopped exactly once, in the
reverse order: first what takes new work (keep-alives, the HTTP listener, the
admin console), then the Redis link, then the state (connection table, store).
A startup that fails half way (the admin port is taken) runs the same
shutdown for the parts already up, and the caller gets a :class:`ListenError`
or :class:`~cometd.store.StoreError` with a one-line message.

The scale-out roles, and a single server reading a Redis Stream, need
gevent's monkey patching for redis-py; the caller (:mod:`cometd.cli`) applies
it for them before this module is imported.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import logging
import os
import re
import signal
import socket
from typing import Any

import gevent
from gevent import socket as gsocket
from gevent.event import Event

from cometd import log
from cometd.config import Config, redacted, url_host

__all__ = ["BANNER", "Server", "ListenError", "free_port", "listener", "redis_problem"]

#: The address part of the ready line every role prints ("cometd: listening on
#: http://H:P/ admin H:P ...", "cometd edge ID: listening on http://H:P/ ..."): groups
#: host, port and, when the admin console listens, its host and port. IPv6 hosts
#: come in brackets; the groups hold them without. Whatever waits for a server
#: (tests, the bench harness) parses the banner with this.
BANNER = re.compile(r"listening on http://\[?([\d.]+|[0-9a-f:]+)\]?:(\d+)/"
                    r"(?: admin \[?([\d.]+|[0-9a-f:]+)\]?:(\d+))?")


#: sends a scale-out router fans out at once. Its fan-out only groups
#: recipients by edge and waits for the next delivery flush (>= 10 ms apart),
#: so the pool bounds sends per flush: 64 held the ingested stream to ~1,500
#: msg/s at 100,000 connections with the router at 0.3 of a core.
ROUTER_POOL = 1024


class ListenError(Exception):
    """A port could not be bound; the message is one line."""


def _cannot_listen(host: str, port: int, exc: OSError) -> ListenError:
    # gevent's StreamServer puts the address into strerror; say it our way.
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return ListenError(f"cannot listen on {url_host(host)}:{port}: {reason}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now on *host* (the kernel's pick)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listener(host: str, port: int, reuse_port: bool = False) -> gsocket.socket:
    """A listening socket; with *reuse_port*, several processes share the port."""
    sock = gsocket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        sock.listen(4096)
    except OSError as exc:
        sock.close()
        raise _cannot_listen(host, port, exc) from None
    return sock


class Server:
    """One cometd process in one role: ``single``, ``router`` or ``edge``."""

    def __init__(self, config: Config, role: str = "single") -> None:
        if role not in ("single", "router", "edge"):
            raise ValueError(f"no server role {role!r}")
        self.config = config
        self.role = role
        self.banner = ""
        #: where it serves, for the log (never the banner's words: tools search output for those)
        self.serving = ""
        self._stops = contextlib.ExitStack()

    # -- parts ---------------------------------------------------------------

    def _store(self):
        from cometd.store import SubscriptionStore

        store = SubscriptionStore(self.config.store.db)
        self._stops.callback(store.close)
        return store

    def _table(self):
        from cometd.connections import ConnectionTable

        table = ConnectionTable(self.config.http.mode, max_pending=self.config.http.max_pending)
        self._stops.callback(table.close)
        return table

    def _history(self, store: Any):
        from cometd.history import History

        h = self.config.history
        return History(store.db, size=h.size, ttl=h.ttl, max_bytes=h.max_bytes)

    def _http(self, backend: Any, table: Any, replay: Any = None):
        from cometd.auth import Authenticator
        from cometd.cors import CorsPolicy
        from cometd.server import CometServer
        from cometd.webapp import make_app

        http = self.config.http
        auth = Authenticator(self.config.auth)  # a key file it cannot use: ConfigError
        # Credentials (cookies) are in use when a token may come in one: with a JWT key.
        cors = None if http.cors_origin is None else CorsPolicy(
            http.cors_origin, credentials=bool(self.config.auth.jwt_secret
                                               or self.config.auth.jwt_key))
        sock = listener(http.host, http.port, http.reuse_port)
        retry = (round(http.sse_retry_min * 1000), round(http.sse_retry_max * 1000))
        server = CometServer(sock, make_app(backend, auth), table,
                             request_timeout=http.request_timeout, auth=auth, limits=http,
                             replay=replay, retry=retry, cors=cors,
                             publisher=backend if http.fast_publish else None)
        server.start()
        # Stopping: no new connections, the requests under way (sends) finish,
        # then the streams end, spread out (see ConnectionTable.drain).
        self._stops.callback(table.drain, http.drain_seconds)
        self._stops.callback(server.stop, timeout=1)
        every = http.keepalive

        def keepalives() -> None:
            while True:
                gevent.sleep(every)
                table.keepalive()

        self._stops.callback(gevent.spawn(keepalives).kill)
        url = f"http://{url_host(http.host)}:{server.server_port}/"
        if self.config.open_to_network:  # only with --insecure: config refuses it otherwise
            log.event("insecure", f"--insecure: {url} serves with no authentication; anyone "
                      "who can reach it reads every stream and publishes as anyone",
                      logging.WARNING)
        return url

    def _admin(self, backend: Any) -> str:
        admin = self.config.admin
        if self.config.admin_port is None:
            return ""
        from cometd.admin import AdminConsole

        console = AdminConsole(backend, admin.host, admin.port, password=admin.password)
        try:
            console.start()
        except OSError as exc:
            raise _cannot_listen(admin.host, admin.port, exc) from None
        self._stops.callback(console.stop, timeout=1)
        return f" admin {url_host(admin.host)}:{console.server_port}"

    def _check_redis(self) -> None:
        """Say plainly when Redis, or an edge's router, does not answer; the links keep retrying."""
        url = self.config.backplane.redis
        problem = redis_problem(url)
        if problem:
            log.event("redis_unreachable", f"Redis at {redacted(url)} does not answer "
                      f"({problem}); retrying until it does", logging.WARNING)
        elif self.role == "edge" and not _router_listening(url):
            log.event("router_lost", f"no router is listening on Redis at {redacted(url)}; "
                      "sends and subscription calls get 503 until one does", logging.WARNING)

    def _collect(self, **parts: Any) -> None:
        """Expose *parts* at ``/metrics`` (cometd.metrics.StateCollector) while running."""
        from cometd.metrics import REGISTRY, StateCollector

        collector = StateCollector(**parts)
        REGISTRY.register(collector)
        self._stops.callback(REGISTRY.unregister, collector)

    def _share(self, ident: str):
        """Put this process's metrics in Redis every second, for any edge's scrape."""
        import redis

        from cometd.metrics import Sharing

        sharing = Sharing(redis.Redis.from_url(self.config.backplane.redis), self.role, ident)
        self._stops.callback(gevent.spawn(sharing.publish_forever).kill)
        return sharing

    def _ingest(self, store: Any, router: Any) -> str:
        """Route a Redis Stream's entries (--ingest-stream), if configured; for the log."""
        config = self.config.ingest
        if not config.stream:
            return ""
        from cometd.ingest import Ingest
        from cometd.metrics import REGISTRY

        url = config.redis or self.config.backplane.redis
        problem = redis_problem(url)
        if problem:
            log.event("ingest_unreachable", f"Redis at {redacted(url)} does not answer "
                      f"({problem}); reading stream {config.stream} once it does",
                      logging.WARNING)
        ingest = Ingest(url, config, router.send_batch, store.db)
        ingest.start()
        self._stops.callback(ingest.stop)  # first to stop: the reads under way are acked
        REGISTRY.register(ingest)
        self._stops.callback(REGISTRY.unregister, ingest)
        return f", stream {config.stream} at {redacted(url)}"

    # -- lifecycle -----------------------------------------------------------

    def startup(self) -> None:
        """Start every part; on failure, stop those already started and re-raise."""
        try:
            getattr(self, f"_start_{self.role}")()
        except BaseException:
            self.shutdown()
            raise

    def _start_single(self) -> None:
        from cometd.router import Router
        from cometd.server import LocalBackend

        store = self._store()
        table = self._table()
        router = Router(store, table, self._history(store))
        table.newest = router.history.last  # the epoch's start: a first stream's welcome id
        backend = LocalBackend(store, router, table, self.config.history.replay_max)
        self._collect(table=table, router=backend.router)
        url = self._http(backend, table, backend.replay)
        admin = self._admin(backend)
        self.serving = f"HTTP at {url}{admin}{self._ingest(store, router)}"
        self.banner = (f"cometd: listening on {url}{admin} mode={self.config.http.mode} "
                       f"db={self.config.store.db}")

    def _start_router(self) -> None:
        import redis

        from cometd.backplane import Presence, RouterLink
        from cometd.router import Router
        from cometd.server import LocalBackend

        url = self.config.backplane.redis
        self._check_redis()
        store = self._store()
        presence = Presence(redis.Redis.from_url(url))
        router = Router(store, presence, self._history(store), pool_size=ROUTER_POOL)
        backend = LocalBackend(store, router, presence, self.config.history.replay_max)
        link = RouterLink(url, backend, presence)
        link.start()
        self._stops.callback(link.stop)
        self._collect(router=backend.router, presence=presence, calls=link.calls)
        self._share(f"{socket.gethostname()}-{os.getpid()}")
        # Ready means edges can reach it: wait (briefly) for its subscription.
        for _ in range(200):
            if _router_listening(url):
                break
            gevent.sleep(0.01)
        admin = self._admin(backend)
        self.serving = f"Redis at {redacted(url)}{admin}{self._ingest(store, router)}"
        self.banner = f"cometd router: redis {redacted(url)} db={self.config.store.db}{admin}"

    def _start_edge(self) -> None:
        from cometd.backplane import EdgeBackend, EdgeLink

        url = self.config.backplane.redis
        self._check_redis()
        table = self._table()
        link = EdgeLink(url, table)
        link.start()
        self._stops.callback(link.stop)
        self._collect(table=table, link=link, calls=link.calls)
        backend = EdgeBackend(link, self._share(link.edge_id))
        http = self._http(backend, table, backend.replay)
        self.serving = f"HTTP at {http}, edge {link.edge_id}"
        self.banner = (f"cometd edge {link.edge_id}: listening on {http} "
                       f"mode={self.config.http.mode} redis {redacted(url)}")

    def run(self) -> None:
        """Print the banner (the process is ready) and wait for SIGINT or SIGTERM."""
        stopping = Event()
        gevent.signal_handler(signal.SIGTERM, stopping.set)
        gevent.signal_handler(signal.SIGINT, stopping.set)
        print(self.banner, flush=True)  # on stdout, as is: tools parse it
        log.event("listening", f"ready: {self.serving} (pid {os.getpid()})")
        stopping.wait()
        log.event("stopping", "stopping")

    def shutdown(self) -> None:
        """Stop every started part once, newest first."""
        self._stops.close()

    def serve(self) -> None:
        """startup, run, shutdown."""
        log.configure(self.config.log.format, self.role)
        # No line before startup: a start that fails says only its one-line error.
        self.startup()
        try:
            self.run()
        finally:
            self.shutdown()
            log.flush_bursts()
            log.event("stopped", "stopped")


def _router_listening(url: str) -> bool:
    """Whether a router holds the presence channel (it subscribes as it starts)."""
    import redis

    from cometd.backplane import PRESENCE

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        return any(n for _, n in client.pubsub_numsub(PRESENCE))
    except (redis.RedisError, OSError):
        return True  # Redis itself is the problem, and was reported as such


def redis_problem(url: str) -> str | None:
    """Why Redis at *url* does not answer a PING (e.g. "Connection refused"), or None."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
    except (redis.RedisError, OSError) as exc:
        cause: BaseException = exc
        while cause.__cause__ or cause.__context__:
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, OSError) and cause.errno in errnos.errorcode:
            return os.strerror(cause.errno)
        return str(exc).split("\n")[0] or type(exc).__name__
    return None
