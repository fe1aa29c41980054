"""The ``cometd`` command line: the server and its database tools.

``cometd`` with no subcommand runs the whole server in one process;
``cometd router`` and ``cometd edge`` run the scale-out parts, ``cometd
--workers N`` a router and N edges; ``cometd config`` prints the effective
configuration, ``cometd load FILE`` bulk-loads a friends file, ``cometd
token USER`` mints a stream token and ``cometd check-system`` says whether
this machine can hold N connections. Every
server flag is generated from :data:`cometd.config.OPTIONS`, so its default,
range, help and ``COMETD_*`` variable are written once, there.
"""

from __future__ import annotations

import os
import sys

import click

from cometd.config import OPTIONS, Config, ConfigError, load, to_toml
from cometd.store import StoreError, SubscriptionStore

__all__ = ["main", "cli"]


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


class Failure(click.ClickException):
    """A one-line ``cometd: error: ...`` and a non-zero exit."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"cometd: error: {self.message}", err=True)


def open_store(db: str) -> SubscriptionStore:
    """Open the store or exit with a one-line error."""
    try:
        return SubscriptionStore(db)
    except StoreError as exc:
        raise Failure(str(exc)) from None


def _flags(*keys: str):
    """The click options of these configuration keys; each arrives as None when not given."""
    def apply(fn):
        for key in reversed(keys):
            opt = OPTIONS[key]
            facts = [] if opt.default is None or opt.secret else [f"default: {opt.default}"]
            if opt.range:
                facts.append(opt.range)
            helptext = f"{opt.help}  [{'; '.join([*facts, 'env ' + opt.env])}]"
            if opt.kind is bool:
                # An option on by default can be turned off: --no-<name>.
                flag = f"{opt.flag}/--no-{opt.flag[2:]}" if opt.default else opt.flag
                decorator = click.option(flag, key, is_flag=True, default=None, help=helptext)
            elif opt.kind is tuple:
                decorator = click.option(opt.flag, key, multiple=True, metavar=opt.metavar,
                                         callback=lambda _c, _p, v: v or None, help=helptext)
            else:
                metavar = opt.metavar or (f"[{'|'.join(opt.choices)}]" if opt.choices else
                                          {int: "INTEGER", float: "NUMBER"}.get(opt.kind, "TEXT"))
                decorator = click.option(opt.flag, key, default=None, metavar=metavar,
                                         help=helptext)
            fn = decorator(fn)
        return click.option("--config", "config_file", metavar="FILE",
                            help="read options from this TOML file (see cometd config)  "
                                 "[env COMETD_CONFIG]")(fn)
    return apply


_HTTP = ("host", "port", "mode", "keepalive", "max_pending", "request_timeout",
         "max_connections", "max_streams_per_user", "max_streams_per_address",
         "stream_rate_per_address", "drain_seconds", "sse_retry_min", "sse_retry_max",
         "cors_origin", "fast_publish", "insecure")
_ADMIN = ("admin_host", "admin_port", "admin_password")
_HISTORY = ("history_size", "history_ttl", "history_bytes", "replay_max")
_INGEST = ("ingest_stream", "ingest_redis", "ingest_group", "ingest_consumer", "ingest_batch")
_AUTH = ("jwt_secret", "jwt_key", "jwt_audience", "jwt_issuer", "token_cookie", "api_key",
         "api_keys_file")


def _config(role: str | None, flags: dict) -> Config:
    """The effective configuration: the group's flags, then the subcommand's, over the rest."""
    ctx = click.get_current_context()
    merged = dict((ctx.obj or {}).get("flags", {}))
    merged.update({k: v for k, v in flags.items() if v is not None})
    path = merged.pop("config_file", None)
    try:
        return load(role, merged, os.environ, path)
    except ConfigError as exc:
        raise Failure(str(exc), exit_code=2) from None


def _serve(config: Config, role: str) -> None:
    """Run one server process in *role*; a port or store it cannot use is a one-line error."""
    if role in ("router", "edge") or config.ingest.stream:
        # redis-py's blocking sockets must cooperate with gevent: patch
        # before anything imports redis (cometd.lifecycle imports it lazily).
        from gevent import monkey

        monkey.patch_all(select=False)  # keep select.epoll: the connection table uses it
    from cometd.lifecycle import ListenError, Server

    try:
        Server(config, role).serve()
    except (ListenError, StoreError) as exc:
        raise Failure(str(exc)) from None
    except ConfigError as exc:  # an auth key file it cannot use
        raise Failure(str(exc), exit_code=2) from None


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@_flags(*_HTTP, *_ADMIN, *_AUTH, "db", *_HISTORY, "workers", "redis", *_INGEST, "log_format")
@click.pass_context
def cli(ctx: click.Context, **flags) -> None:
    """cometd: a comet (HTTP push) server.

    With no subcommand, runs the whole server in one process: HTTP streams,
    the router, the subscription store and the admin console. With --workers N
    and --redis, runs one router and N edge processes on this machine instead
    (see the router and edge subcommands).

    Options come from, in increasing priority: their defaults, a TOML file
    (--config), COMETD_<OPTION> variables and these flags. Options given
    before a subcommand apply to it as well.

    Clients hold GET /test/<id> (chunked) or GET /events/<id> (Server-Sent
    Events) open; POST /send/<subject> pushes the request body to the
    subject's own connections and to everyone subscribed to the subject.
    With --jwt-secret or --jwt-key, a stream needs a token whose sub is its
    id (cometd token USER mints one); with those or --api-key, publishing,
    the subscription API and /stats need an API key (or the user's own
    token for its own affairs). A new stream past a limit (--max-connections:
    503; --max-streams-per-user, 10 by default, and the per-address ones:
    429) is refused with Retry-After and counted in /stats. GET /metrics is
    Prometheus text (an API key when auth is on); GET /healthz and /readyz
    need no credential. With --ingest-stream KEY (and --ingest-redis URL, or
    --workers), the entries a backend adds to that Redis Stream (XADD KEY *
    from ID body TEXT) are routed like sends. Operator events go to stderr
    (--log-format json for collectors). SIGINT or SIGTERM stops the server cleanly.
    """
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"flags": {k: v for k, v in flags.items() if v is not None}}
        return
    config = _config("cometd", flags)
    if config.backplane.workers is None:
        _serve(config, "single")
        return
    from cometd import log
    from cometd.auth import Authenticator
    from cometd.workers import supervise

    log.configure(config.log.format, "supervisor")
    try:
        Authenticator(config.auth)  # each edge reads the key files too: fail here, once
    except ConfigError as exc:
        raise Failure(str(exc), exit_code=2) from None
    sys.exit(supervise(config))


@cli.command("router")
@_flags("redis", "db", *_HISTORY, *_ADMIN, *_INGEST, "log_format")
def router_command(**flags) -> None:
    """Run the scale-out router: the store, presence, the admin console and sends.

    Edges (cometd edge) hold the connections; they reach the router through
    Redis. Only one router may run per database. With --ingest-stream KEY it
    also routes the entries a backend adds to that Redis Stream.
    """
    _serve(_config("router", flags), "router")


@cli.command("edge")
@_flags("redis", *_HTTP, "reuse_port", *_AUTH, "log_format")
def edge_command(**flags) -> None:
    """Run an edge: hold connections and serve HTTP; the router does the rest.

    POST /send and the subscription calls are passed to the router through
    Redis (503 if it does not answer within 5 s); logins and logouts are
    reported to it in batches. GET /stats answers the router's figures for
    the whole service, and this edge's own under "edge"; GET /metrics every
    process's metrics, labelled by process; GET /readyz is 503 while no router
    hears this edge.
    """
    _serve(_config("edge", flags), "edge")


@cli.command("config")
def config_command() -> None:
    """Print the effective configuration as TOML, ready for --config.

    Give options before the subcommand (cometd --port 9000 config) to see
    them applied; a secret such as the admin password is not printed.
    """
    click.echo(to_toml(_config(None, {})), nl=False)


@cli.command("token")
@click.argument("user")
@click.option("--ttl", default=3600, show_default=True, type=click.IntRange(1, 366 * 86400),
              help="seconds the token is valid")
@_flags("jwt_secret", "jwt_audience", "jwt_issuer")
def token_command(user: str, ttl: int, **flags) -> None:
    """Print a token for USER's stream, signed with the configured --jwt-secret.

    For trying things and for scripts; it carries sub, iat and exp, and aud
    and iss when they are configured. Use it as ?token=..., as
    "Authorization: Bearer ..." or in the cometd_token cookie.
    """
    from cometd.auth import mint
    from cometd.ids import InvalidId, check_id

    auth = _config(None, flags).auth
    if not auth.jwt_secret:
        raise Failure("cometd token needs --jwt-secret (or COMETD_JWT_SECRET, or [auth] "
                      "jwt_secret); a --jwt-key public key cannot sign", exit_code=2)
    try:
        check_id(user)
    except InvalidId as exc:
        raise Failure(str(exc), exit_code=2) from None
    click.echo(mint(auth.jwt_secret, user, ttl, auth.jwt_audience, auth.jwt_issuer))


@cli.command("check-system")
@click.option("--connections", "-n", type=click.IntRange(1, 100_000_000), required=True,
              metavar="N", help="connections you plan to hold on this machine")
@click.option("--mode", type=click.Choice(["pool", "greenlet"]), default="greenlet",
              show_default=True, help="the --mode the server will run in")
@click.option("--workers", type=click.IntRange(1, 1024), default=None, metavar="N",
              help="edge processes you plan (default: as many as the open-file limit needs)")
@click.option("--clients-here", is_flag=True,
              help="the clients run on this machine too (a load test over loopback, as "
                   "bench/c1m.py): twice the sockets, and client ports")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--apply", "do_apply", is_flag=True,
              help="write the sysctl fixes (as root), then print what changed and how to undo it")
@click.option("--proc-root", default="/proc", show_default=True, metavar="DIR",
              help="read (and with --apply write) this /proc tree")
@click.option("--sys-root", default="/sys", show_default=True, metavar="DIR",
              help="read this /sys tree")
def check_system_command(connections: int, mode: str, workers: int | None, clients_here: bool,
                         as_json: bool, do_apply: bool, proc_root: str, sys_root: str) -> None:
    """Say whether this machine can hold N connections, and what to change if not.

    Reads the open-file limits, fs.file-max and fs.nr_open, somaxconn, the
    local port range, tcp_mem, tcp_rmem and tcp_wmem, orphan and TIME_WAIT
    limits, conntrack (if loaded) and memory; prints each with what N needs,
    how many processes and how much memory N takes (from BENCHMARKS.md's
    per-connection figures), which limit breaks first, and the sysctl and
    ulimit lines that fix each shortfall. Changes nothing unless --apply is
    given. Exits 0 when the machine can hold N, 1 when it cannot, 2 when
    its limits cannot be read or --apply cannot write them.
    """
    import json

    from cometd.syscheck import Plan, apply, check, read_system

    report = check(read_system(proc_root, sys_root), Plan(connections, mode, workers,
                                                          clients_here))
    changed: list[tuple[str, str, str]] = []
    if do_apply and report.errors:
        click.echo(report.text(), nl=False)
        raise Failure("not applied: some limits cannot be read (see above)", exit_code=2)
    if do_apply and report.sysctls:
        try:
            changed = apply(report, proc_root)
        except OSError as exc:
            raise Failure(f"cannot write {exc.filename}: {exc.strerror} (nothing was "
                          "changed; --apply needs root)", exit_code=2) from None
    if as_json:
        data = report.as_dict()
        if do_apply:
            data["applied"] = [{"sysctl": n, "previous": old, "value": new}
                               for n, old, new in changed]
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(report.text(), nl=False)
        if changed:
            click.echo("applied:")
            for name, old, new in changed:
                click.echo(f"  {name}: {old} -> {new}")
            click.echo("to undo:")
            for name, old, _ in reversed(changed):
                click.echo(f'  sysctl -w {name}="{old}"')
        elif do_apply:
            click.echo("applied: nothing (no sysctl falls short)")
    if report.errors:
        sys.exit(2)
    sys.exit(0 if report.ok else 1)


@cli.command("load")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--db", default=None, metavar="DIR",
              help=f"subscription database directory  [default: {OPTIONS['db'].default}; "
                   f"env {OPTIONS['db'].env}]")
@click.option(
    "--directed",
    is_flag=True,
    help='store only "A subscribes to B" for each line "A B" (default: both directions)',
)
def load_command(file: str, db: str, directed: bool) -> None:
    """Bulk-load FILE, one friendship "A B" per line, into the database.

    Each line holds two different ids separated by white space ("A A" is an
    error: nobody subscribes to themselves); blank lines are allowed. The whole
    file is checked first: a malformed line stops the load with its
    line number and nothing is stored. Loading the same file twice stores
    nothing new.
    """
    from cometd.loader import LoadError, load_friends  # numpy: ~70 ms no server start needs

    db = _config(None, {"db": db}).store.db
    store = open_store(db)
    progress = _StageProgress()
    try:
        result = load_friends(store, file, directed=directed, progress=progress)
    except LoadError as exc:
        progress.close()
        raise Failure(str(exc)) from None
    finally:
        progress.close()
        store.close()
    click.echo(f"{file} -> {db}: {result.summary()}")


def main() -> None:
    cli(prog_name="cometd")
