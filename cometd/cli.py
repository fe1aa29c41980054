"""The ``cometd`` command line: the server and its database tools.

``cometd`` with no subcommand runs the whole server in one process;
``cometd load FILE`` bulk-loads a friends file into the subscription store.
"""

from __future__ import annotations

import ipaddress
import sys

import click

from cometd.connections import MODES
from cometd.loader import LoadError, load_friends
from cometd.store import StoreError, SubscriptionStore

__all__ = ["main", "cli"]

DEFAULT_DB = "data/subscriptions"


class _StageProgress:
    """A progress bar on stderr per load stage, shown only on a terminal."""

    def __init__(self) -> None:
        self._stage: str | None = None
        self._bar = None
        self._done = 0
        self._tty = sys.stderr.isatty()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self._tty:
            return
        if stage != self._stage:
            self.close()
            self._stage, self._done = stage, 0
            self._bar = click.progressbar(length=max(total, 1), label=stage, file=sys.stderr)
            self._bar.__enter__()
        self._bar.update(done - self._done)
        self._done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


def open_store(db: str) -> SubscriptionStore:
    """Open the store or exit with a one-line error."""
    try:
        return SubscriptionStore(db)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None


def _options(*decorators):
    """Apply a shared list of click options (the server and its subcommands share them)."""
    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


_admin_options = _options(
    click.option("--admin-host", default="127.0.0.1", show_default=True,
                 help="admin console address; a non-loopback one requires --admin-password"),
    click.option("--admin-port", default=8001, show_default=True,
                 help="admin console port (0: any free port, -1: no console)"),
    click.option("--admin-password", envvar="COMETD_ADMIN_PASSWORD",
                 help="password the admin console asks for first (env COMETD_ADMIN_PASSWORD)"),
)
_db_option = click.option("--db", default=DEFAULT_DB, show_default=True,
                          help="subscription database directory (created if missing)")
_http_options = _options(
    click.option("--host", default="127.0.0.1", show_default=True,
                 help="HTTP address to listen on"),
    click.option("--port", default=8000, show_default=True, help="HTTP port (0: any free port)"),
    click.option("--mode", type=click.Choice(MODES), default="greenlet", show_default=True,
                 help="greenlet: one parked greenlet per connection; "
                      "pool: no greenlet per connection, writes straight from the router"),
    click.option("--keepalive", default=25.0, show_default=True,
                 help="seconds between SSE keep-alive comments"),
    click.option("--max-pending", default=256 * 1024, show_default=True,
                 help="bytes of unsent output a connection may hold before it is dropped"),
    click.option("--request-timeout", default=10.0, show_default=True,
                 help="seconds a client may take to send a whole request before it is closed "
                      "(one that sends nothing waits in the kernel first, at no cost to the "
                      "server, for about as long again)"),
)
_redis_option = click.option("--redis", "redis_url", metavar="URL",
                             help="Redis backplane, e.g. redis://127.0.0.1:6379/0")


def _admin_port(admin_host: str, admin_port: int, admin_password: str | None) -> int | None:
    if admin_port < 0:
        return None
    if not _is_loopback(admin_host) and not admin_password:
        raise click.UsageError(
            f"the admin console on non-loopback address {admin_host} needs --admin-password")
    return admin_port


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@_http_options
@_admin_options
@_db_option
@click.option("--workers", type=click.IntRange(min=1),
              help="run one router and this many edge processes sharing --port (needs --redis)")
@_redis_option
@click.pass_context
def cli(ctx: click.Context, host: str, port: int, mode: str, keepalive: float, max_pending: int,
        request_timeout: float, admin_host: str, admin_port: int, admin_password: str | None,
        db: str, workers: int | None, redis_url: str | None) -> None:
    """cometd: a comet (HTTP push) server.

    With no subcommand, runs the whole server in one process: HTTP streams,
    the router, the subscription store and the admin console. With --workers N
    and --redis, runs one router and N edge processes on this machine instead
    (see the router and edge subcommands).

    Clients hold GET /test/<id> (chunked) or GET /events/<id> (Server-Sent
    Events) open; POST /send/<subject> pushes the request body to the
    subject's own connections and to everyone subscribed to the subject.
    SIGINT or SIGTERM stops the server cleanly.
    """
    if ctx.invoked_subcommand is not None:
        return
    admin = _admin_port(admin_host, admin_port, admin_password)
    open_store(db).close()  # fail early, with a one-line error, if the db is unusable
    if workers is not None:
        if not redis_url:
            raise click.UsageError("--workers needs --redis URL")
        from cometd.workers import supervise

        supervise(workers, redis_url, db=db, host=host, port=port, mode=mode,
                  admin_host=admin_host, admin_port=admin, admin_password=admin_password,
                  extra=["--keepalive", str(keepalive), "--max-pending", str(max_pending),
                         "--request-timeout", str(request_timeout)])
        return
    from cometd.server import serve

    _serving(serve, db, host=host, port=port, admin_host=admin_host, admin_port=admin,
          admin_password=admin_password, mode=mode, keepalive=keepalive,
          max_pending=max_pending, request_timeout=request_timeout)


@cli.command("router")
@_redis_option
@_db_option
@_admin_options
def router_command(redis_url: str | None, db: str, admin_host: str, admin_port: int,
                   admin_password: str | None) -> None:
    """Run the scale-out router: the store, presence, the admin console and sends.

    Edges (cometd edge) hold the connections; they reach the router through
    Redis. Only one router may run per database.
    """
    if not redis_url:
        raise click.UsageError("router needs --redis URL")
    admin = _admin_port(admin_host, admin_port, admin_password)
    open_store(db).close()
    from cometd.server import serve_router

    _serving(serve_router, db, redis_url, admin_host=admin_host, admin_port=admin,
                 admin_password=admin_password)


@cli.command("edge")
@_redis_option
@_http_options
@click.option("--reuse-port", is_flag=True,
              help="share --port with other edges on this machine (SO_REUSEPORT)")
def edge_command(redis_url: str | None, host: str, port: int, mode: str, keepalive: float,
                 max_pending: int, request_timeout: float, reuse_port: bool) -> None:
    """Run an edge: hold connections and serve HTTP; the router does the rest.

    POST /send and the subscription calls are passed to the router through
    Redis (503 if it does not answer within 5 s); logins and logouts are
    reported to it in batches. GET /stats answers the router's figures for
    the whole service, and this edge's own under "edge".
    """
    if not redis_url:
        raise click.UsageError("edge needs --redis URL")
    from cometd.server import serve_edge

    _serving(serve_edge, redis_url, host=host, port=port, mode=mode, reuse_port=reuse_port,
               keepalive=keepalive, max_pending=max_pending, request_timeout=request_timeout)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@cli.command("load")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--db", default=DEFAULT_DB, show_default=True, help="subscription database directory")
@click.option(
    "--directed",
    is_flag=True,
    help='store only "A subscribes to B" for each line "A B" (default: both directions)',
)
def load_command(file: str, db: str, directed: bool) -> None:
    """Bulk-load FILE, one friendship "A B" per line, into the database.

    Each line holds two ids separated by white space; blank lines are allowed.
    The whole file is checked first: a malformed line stops the load with its
    line number and nothing is stored. Loading the same file twice stores
    nothing new.
    """
    store = open_store(db)
    progress = _StageProgress()
    try:
        result = load_friends(store, file, directed=directed, progress=progress)
    except LoadError as exc:
        progress.close()
        raise click.ClickException(str(exc)) from None
    finally:
        progress.close()
        store.close()
    click.echo(f"{file} -> {db}: {result.summary()}")


def _serving(fn, *args, **kwargs) -> None:
    """Run a serve function; a port that cannot be bound is a one-line error."""
    from cometd.server import ListenError

    try:
        fn(*args, **kwargs)
    except ListenError as exc:
        raise click.ClickException(str(exc)) from None


def main() -> None:
    # The scale-out processes talk to Redis through redis-py's blocking
    # sockets: patch them to cooperate with gevent before anything imports them.
    if {"router", "edge", "--workers"} & set(sys.argv[1:]):
        from gevent import monkey

        monkey.patch_all(select=False)  # keep select.epoll: the connection table uses it
    cli(prog_name="cometd")
