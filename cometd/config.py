"""The server's configuration: every option, its default, type, range and help, once.

A :class:`Config` is a frozen tree of eight sections (``http``, ``admin``,
``store``, ``history``, ``backplane``, ``ingest``, ``auth``, ``log``). Each field carries its
own description (see :func:`_option`); the command line (:mod:`cometd.cli`), the environment, the
TOML file, ``cometd config`` and the README all read it from here.

Theory of operation
-------------------
:func:`load` merges the sources, in increasing priority: the defaults, a TOML
file (``--config FILE`` or ``COMETD_CONFIG``), ``COMETD_<OPTION>`` variables
and the command-line flags. Every value, whatever its source, goes through
one converter (:func:`_convert`), so a bad one is the same one-line
:class:`ConfigError` naming the option and the source, e.g.
``--keepalive: 0 is not in the range 0.1..3600 (from COMETD_KEEPALIVE)``.
Checks between options that depend on the role (a router needs ``--redis``)
come after the merge and name the source of the value they reject.

``cometd --workers N`` hands its children the effective configuration whole,
as JSON in ``COMETD_CONFIG_JSON`` (:func:`to_json`); a process that finds it
there takes it as its entire configuration and reads no other source, so a
child cannot drift from its supervisor through its inherited environment.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# cometd.webapp.MAX_MESSAGE_BYTES and cometd.connections.MODES
# (tests/test_config.py checks they agree): importing the web app or the
# connection table here would import bottle or pywsgi, and with them ssl,
# before the scale-out roles monkey-patch.
MAX_MESSAGE_BYTES = 64 * 1024
MODES = ("greenlet", "pool")
# A cookie name is an HTTP token (cometd.httprequest.TCHAR, not imported for the same reason).
_COOKIE_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: an API key: printable ASCII, no space and no comma (the environment's list separator)
API_KEY = re.compile(r"[!-+\--~]+")

__all__ = [
    "Config", "HttpConfig", "AdminConfig", "StoreConfig", "HistoryConfig", "BackplaneConfig",
    "IngestConfig", "AuthConfig", "LogConfig", "ConfigError", "Option", "OPTIONS", "CHILD_ENV",
    "CONFIG_ENV",
    "load", "from_json", "to_json", "to_toml", "redacted", "url_host", "API_KEY", "setting_lines",
]

#: the variable holding a supervisor's configuration for its children
CHILD_ENV = "COMETD_CONFIG_JSON"
#: the variable naming a TOML file, like --config
CONFIG_ENV = "COMETD_CONFIG"


class ConfigError(Exception):
    """A bad option value or combination; the message is one line naming option and source."""


def setting_lines(path: str, flag: str, error: type[Exception] = ConfigError
                  ) -> list[tuple[int, str]]:
    """The (line number, stripped line) of *path* that are neither blank nor ``#`` comments.

    The file of keys, secrets or tokens that *flag* names; a file that cannot be
    read raises *error* naming *flag* and the reason, never a line of it.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise error(f"{flag}: cannot read {path}: {reason}") from None
    return [(number, line) for number, line in enumerate(map(str.strip, lines), 1)
            if line and not line.startswith("#")]


def _option(default: Any, help: str, *, flag: str, kind: type, low: float | None = None,
            high: float | None = None, choices: tuple[str, ...] = (), metavar: str | None = None,
            secret: bool = False) -> Any:
    """A dataclass field whose metadata says how to set, check and show it."""
    meta = {"help": help, "flag": flag, "kind": kind, "low": low, "high": high,
            "choices": choices, "metavar": metavar, "secret": secret}
    return field(default=default, metadata=meta, repr=not secret)


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP listener and the streams it holds."""

    host: str = _option("127.0.0.1", "HTTP address to listen on", flag="--host", kind=str,
                        metavar="ADDRESS")
    port: int = _option(8000, "HTTP port (0: any free port)", flag="--port", kind=int,
                        low=0, high=65535)
    mode: str = _option("greenlet", "greenlet: one parked greenlet per connection writes what "
                        "the kernel did not take at once; pool: no greenlet per connection, a "
                        "write watcher does (both send straight from the router first)",
                        flag="--mode", kind=str, choices=MODES)
    keepalive: float = _option(25.0, "seconds between SSE keep-alive comments and "
                               "WebSocket pings",
                               flag="--keepalive", kind=float, low=0.1, high=3600,
                               metavar="SECONDS")
    max_pending: int = _option(256 * 1024, "bytes of unsent output a connection may hold "
                               "before it is dropped (at least one largest message)",
                               flag="--max-pending", kind=int, low=MAX_MESSAGE_BYTES,
                               high=1 << 30, metavar="BYTES")
    request_timeout: float = _option(
        10.0, "seconds a client may take to send a whole request before it is closed (one that "
        "sends nothing waits in the kernel first, at no cost to the server, for about as long "
        "again)", flag="--request-timeout", kind=float, low=0.1, high=3600, metavar="SECONDS")
    drain_seconds: float = _option(10.0, "on SIGTERM, end the streams spread over at most this "
                                   "long (at least 2,000 a second), so clients do not all "
                                   "come back at once", flag="--drain-seconds", kind=float,
                                   low=0, high=3600, metavar="SECONDS")
    sse_retry_min: float = _option(1.0, "least SSE reconnection delay (retry:) a stream is "
                                   "given; each gets its own, up to --sse-retry-max",
                                   flag="--sse-retry-min", kind=float, low=0, high=3600,
                                   metavar="SECONDS")
    sse_retry_max: float = _option(5.0, "most SSE reconnection delay (retry:) a stream is given",
                                   flag="--sse-retry-max", kind=float, low=0, high=3600,
                                   metavar="SECONDS")
    max_connections: int = _option(
        0, "streams this process holds before it answers new ones 503 with Retry-After (0: "
        "its open-file limit less 200, kept for other descriptors)", flag="--max-connections",
        kind=int, low=0, high=100_000_000, metavar="N")
    max_streams_per_user: int = _option(
        10, "streams one id may hold in this process; one more is answered 429 (0: no limit)",
        flag="--max-streams-per-user", kind=int, low=0, high=100_000_000, metavar="N")
    max_streams_per_address: int = _option(
        0, "streams one client address may hold; one more is answered 429 (0: no limit; "
        "behind a proxy every client has the proxy's address)",
        flag="--max-streams-per-address",
        kind=int, low=0, high=100_000_000, metavar="N")
    stream_rate_per_address: float = _option(
        0.0, "new streams a second one client address may open (a second's worth at once); "
        "faster is answered 429 with Retry-After (0: no limit)",
        flag="--stream-rate-per-address", kind=float, low=0, high=1_000_000, metavar="PER_SECOND")
    reuse_port: bool = _option(False, "share --port with other edges on this machine "
                               "(SO_REUSEPORT)", flag="--reuse-port", kind=bool)
    cors_origin: tuple[str, ...] | None = _option(
        None, "let pages of this origin (scheme://host[:port], or * for any) read responses "
        "and streams (CORS); repeatable, or several in one variable separated by spaces",
        flag="--cors-origin", kind=tuple, metavar="ORIGIN")
    fast_publish: bool = _option(True, "serve POST /send and POST /publish on keep-alive "
                                 "connections without pywsgi and bottle (--no-fast-publish: "
                                 "through them, like every other request)",
                                 flag="--fast-publish", kind=bool)
    insecure: bool = _option(False, "serve with no authentication on a non-loopback --host "
                             "(refused without this flag)", flag="--insecure", kind=bool)


@dataclass(frozen=True)
class AdminConfig:
    """The telnet-style admin console."""

    host: str = _option("127.0.0.1", "admin console address; a non-loopback one requires "
                        "--admin-password", flag="--admin-host", kind=str, metavar="ADDRESS")
    port: int = _option(8001, "admin console port (0: any free port, -1: no console)",
                        flag="--admin-port", kind=int, low=-1, high=65535)
    password: str | None = _option(None, "password the admin console asks for first",
                                   flag="--admin-password", kind=str, secret=True)


@dataclass(frozen=True)
class StoreConfig:
    """The subscription store."""

    db: str = _option("data/subscriptions", "subscription database directory (created if "
                      "missing)", flag="--db", kind=str, metavar="DIR")


@dataclass(frozen=True)
class HistoryConfig:
    """Message history, kept beside the subscriptions, for streams that resume."""

    size: int = _option(100, "messages kept per subject for resuming streams (0: no history)",
                        flag="--history-size", kind=int, low=0, high=1_000_000,
                        metavar="MESSAGES")
    ttl: float = _option(3600.0, "seconds a message is kept for resuming streams (at most "
                         "a second more)",
                         flag="--history-ttl", kind=float, low=1, high=365 * 86400,
                         metavar="SECONDS")
    max_bytes: int = _option(64 * 1024 * 1024, "bytes of message bodies the whole history "
                             "keeps (the oldest go first); also bounds its memory and its "
                             "scan at startup", flag="--history-bytes", kind=int,
                             low=MAX_MESSAGE_BYTES, high=1 << 40, metavar="BYTES")
    replay_max: int = _option(1000, "most messages replayed to one resuming stream (the "
                              "newest; more is reported as not recovered)",
                              flag="--replay-max", kind=int, low=1, high=1_000_000,
                              metavar="MESSAGES")


@dataclass(frozen=True)
class BackplaneConfig:
    """Scale-out over Redis."""

    redis: str | None = _option(None, "Redis backplane, e.g. redis://127.0.0.1:6379/0 (for "
                                "--workers, router and edge)", flag="--redis", kind=str,
                                metavar="URL")
    workers: int | None = _option(None, "run one router and this many edge processes sharing "
                                  "--port (needs --redis)", flag="--workers", kind=int, low=1,
                                  high=1024, metavar="N")


@dataclass(frozen=True)
class IngestConfig:
    """Messages read from a Redis Stream (see cometd.ingest)."""

    stream: str | None = _option(None, "route the entries of this Redis Stream (fields from "
                                 "and body), read in a consumer group and acknowledged once "
                                 "routed", flag="--ingest-stream", kind=str, metavar="KEY")
    redis: str | None = _option(None, "Redis holding --ingest-stream (default: --redis; the "
                                "single-process server needs this one)", flag="--ingest-redis",
                                kind=str, metavar="URL")
    group: str = _option("cometd", "consumer group cometd reads --ingest-stream in",
                         flag="--ingest-group", kind=str, metavar="NAME")
    consumer: str | None = _option(None, "this reader's consumer name in the group (default: "
                                   "the host name); keep it across restarts, so entries read "
                                   "but not acknowledged are re-read", flag="--ingest-consumer",
                                   kind=str, metavar="NAME")
    batch: int = _option(100, "most entries read (and routed side by side) per round trip",
                         flag="--ingest-batch", kind=int, low=1, high=10_000, metavar="N")


@dataclass(frozen=True)
class AuthConfig:
    """Who may open a stream (JWT tokens for users) and call the API (keys); see cometd.auth."""

    jwt_secret: str | None = _option(None, "verify stream tokens signed HS256 with this "
                                     "secret (at least 32 bytes)", flag="--jwt-secret", kind=str,
                                     secret=True, metavar="SECRET")
    jwt_key: str | None = _option(None, "verify stream tokens with this PEM public key (RS256, "
                                  "ES256 or EdDSA, by the key's type)", flag="--jwt-key",
                                  kind=str, metavar="FILE")
    jwt_audience: str | None = _option(None, "tokens must carry this aud claim",
                                       flag="--jwt-audience", kind=str)
    jwt_issuer: str | None = _option(None, "tokens must carry this iss claim",
                                     flag="--jwt-issuer", kind=str)
    token_cookie: str = _option("cometd_token", "cookie a stream may take its token from",
                                flag="--token-cookie", kind=str, metavar="NAME")
    api_keys: tuple[str, ...] | None = _option(
        None, "API key for publishers and operators (repeatable; in the environment and TOML "
        "a comma-separated list or a list)", flag="--api-key", kind=tuple, secret=True,
        metavar="KEY")
    api_keys_file: str | None = _option(None, "file of API keys, one per line",
                                        flag="--api-keys-file", kind=str, metavar="FILE")


@dataclass(frozen=True)
class LogConfig:
    """Operator logs on stderr (see cometd.log)."""

    format: str = _option("text", "operator log lines on stderr: text, or json (one object "
                          "a line, for collectors)", flag="--log-format", kind=str,
                          choices=("text", "json"))


@dataclass(frozen=True)
class Config:
    """Every server option, by section."""

    http: HttpConfig = field(default_factory=HttpConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    backplane: BackplaneConfig = field(default_factory=BackplaneConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def auth_enabled(self) -> bool:
        """Whether any authentication is configured (tokens or API keys)."""
        a = self.auth
        return bool(a.jwt_secret or a.jwt_key or a.api_keys or a.api_keys_file)

    @property
    def admin_port(self) -> int | None:
        """The console's port, None for no console."""
        return None if self.admin.port < 0 else self.admin.port

    @property
    def open_to_network(self) -> bool:
        """Whether the HTTP listener is on a non-loopback address with no authentication."""
        return not self.auth_enabled and not _is_loopback(self.http.host)


@dataclass(frozen=True)
class Option:
    """One option as the sources see it."""

    section: str
    name: str
    flag: str
    kind: type
    default: Any
    help: str
    low: float | None
    high: float | None
    choices: tuple[str, ...]
    metavar: str | None
    secret: bool

    @property
    def key(self) -> str:
        """The option's name in Python (``admin_port``) and, upper-cased, in the environment."""
        return self.flag[2:].replace("-", "_")

    @property
    def env(self) -> str:
        return "COMETD_" + self.key.upper()

    @property
    def optional(self) -> bool:
        return self.default is None

    @property
    def range(self) -> str:
        """``low..high`` as help and errors show it ("" when unbounded)."""
        if self.low is None:
            return ""
        return f"{_num(self.low)}..{_num(self.high)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


_SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}

#: every option, by its key (``admin_port``)
OPTIONS: dict[str, Option] = {
    opt.key: opt for opt in (Option(section, f.name, default=f.default, **f.metadata)
                             for section, cls in _SECTIONS.items()
                             for f in dataclasses.fields(cls))
}


def _number(value: Any, kind: type) -> int | float:
    """*value* (text, or a TOML/JSON number) as an int or float; bools are not numbers."""
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            pass
    elif isinstance(value, int | float) and not isinstance(value, bool) and (
            kind is float or isinstance(value, int)):
        return kind(value)
    raise ValueError(f"{value!r} is not {'an integer' if kind is int else 'a number'}")


def _origin(value: str) -> str:
    """A configured CORS origin as browsers serialise it (lower case, no default port)."""
    if value == "*":
        return value
    if value.lower() == "null":
        raise ValueError("'null' is not allowed: sandboxed and file: pages all send it")
    parts = urlsplit(value.lower())
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.scheme or not parts.hostname or port == -1 or parts.username is not None or (
            value.count("/") != 2 or "?" in value or "#" in value):
        raise ValueError(f"{value!r} is not an origin (scheme://host[:port], or *)")
    if {"http": 80, "https": 443}.get(parts.scheme) == port:
        return f"{parts.scheme}://{parts.netloc.rsplit(':', 1)[0]}"
    return f"{parts.scheme}://{parts.netloc}"


def _origins(value: Any) -> tuple[str, ...] | None:
    """CORS origins from a list (flags, TOML, JSON) or text separated by spaces or commas."""
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"{value!r} is not a list of strings")
    return tuple(dict.fromkeys(_origin(item) for item in items)) or None


def _convert(opt: Option, value: Any) -> Any:
    """*value* (a string from flags or the environment, or a TOML/JSON value) as opt's type."""
    if value is None and opt.optional:
        return None
    if opt.kind is bool:
        if isinstance(value, bool):
            return value
        words = {"1": True, "true": True, "yes": True, "on": True,
                 "0": False, "false": False, "no": False, "off": False}
        if isinstance(value, str) and value.strip().lower() in words:
            return words[value.strip().lower()]
        raise ValueError(f"{value!r} is not true or false")
    if opt.kind in (int, float):
        value = _number(value, opt.kind)
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        if (opt.low is not None and value < opt.low) or (opt.high is not None
                                                         and value > opt.high):
            raise ValueError(f"{_num(value)} is not in the range {opt.range}")
        return value
    if opt.kind is tuple:
        return _api_keys(value) if opt.key == "api_key" else _origins(value)
    if not isinstance(value, str):
        raise ValueError("the value is not a string" if opt.secret else
                         f"{value!r} is not a string")
    if opt.choices and value not in opt.choices:
        raise ValueError(f"{value!r} is not one of {', '.join(opt.choices)}")
    if not value and not opt.secret:
        raise ValueError("the value is empty")
    if opt.key in ("redis", "ingest_redis") and urlsplit(value).scheme not in (
            "redis", "rediss", "unix"):
        raise ValueError(f"{redacted(value)!r} is not a redis://, rediss:// or unix:// URL")
    if opt.key == "jwt_secret" and len(value.encode()) < 32:
        # RFC 7518 3.2: an HS256 key is at least as long as the hash (256 bits).
        raise ValueError("the secret is shorter than 32 bytes")
    if opt.key == "token_cookie" and not _COOKIE_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a cookie name")
    return value


def _api_keys(value: Any) -> tuple[str, ...]:
    """API keys from a list (flags, TOML, JSON) or a comma-separated string (environment)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(k, str) for k in items):
        raise ValueError("API keys are a list of strings")
    keys = tuple(k.strip() for k in items)
    for i, key in enumerate(keys, 1):
        # Never the key itself in the message: it is a secret.
        if not API_KEY.fullmatch(key):
            raise ValueError(f"API key {i} is empty or has a character other than printable "
                             "ASCII (no space or comma)")
    if not keys:
        raise ValueError("no API key given")
    return keys


def _toml_values(path: str) -> dict[str, tuple[Any, str]]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    by_place = {(o.section, o.name): o for o in OPTIONS.values()}
    values: dict[str, tuple[Any, str]] = {}
    for section, table in data.items():
        if section not in _SECTIONS or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown section [{section}] (known: "
                              f"{', '.join(_SECTIONS)})")
        for name, value in table.items():
            opt = by_place.get((section, name))
            if opt is None:
                raise ConfigError(f"{path}: unknown key [{section}] {name}")
            values[opt.key] = (value, f"{path}: [{section}] {name}")
    return values


def _env_values(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    values = {}
    for opt in OPTIONS.values():
        text = env.get(opt.env)
        if text is None or (text == "" and opt.optional):
            continue
        values[opt.key] = (text, opt.env)
    return values


def _build(values: dict[str, tuple[Any, str]]) -> Config:
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for key, (value, source) in values.items():
        opt = OPTIONS[key]
        try:
            sections[opt.section][opt.name] = _convert(opt, value)
        except ValueError as exc:
            raise ConfigError(f"{opt.flag}: {exc} (from {source})") from None
    return Config(**{name: _SECTIONS[name](**kw) for name, kw in sections.items()})


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check(config: Config, role: str, sources: dict[str, str]) -> None:
    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{OPTIONS[key].flag}: {problem} (from {sources.get(key, 'default')})")

    bp = config.backplane
    if config.http.sse_retry_min > config.http.sse_retry_max:
        raise fail("sse_retry_min", f"{_num(config.http.sse_retry_min)} is more than "
                                    f"--sse-retry-max {_num(config.http.sse_retry_max)}")
    if role == "supervisor" and not bp.redis:
        raise fail("workers", "needs --redis URL")
    if role in ("router", "edge") and not bp.redis:
        raise ConfigError(f"{role} needs --redis URL")
    if role == "single" and bp.redis:
        raise fail("redis", "needs --workers N, or the router or edge subcommand")
    if role in ("single", "supervisor", "edge") and config.open_to_network and (
            not config.http.insecure):
        # Secure by default: open only where just this machine can reach it.
        raise fail("host", f"{config.http.host} is not a loopback address and no "
                           "authentication is configured: set --jwt-secret, --jwt-key or "
                           "--api-key, or give --insecure to serve it openly")
    if role in ("single", "supervisor", "router") and config.admin_port is not None and (
            not _is_loopback(config.admin.host) and not config.admin.password):
        raise fail("admin_host", f"the admin console on non-loopback address "
                                 f"{config.admin.host} needs --admin-password")
    ingest = config.ingest
    if ingest.redis and not ingest.stream:
        raise fail("ingest_redis", "needs --ingest-stream KEY")
    if role == "single" and ingest.stream and not ingest.redis:
        raise fail("ingest_stream", "needs --ingest-redis URL (or --workers N and --redis)")
    auth = config.auth
    if auth.jwt_secret and auth.jwt_key:
        raise fail("jwt_key", "give --jwt-secret or --jwt-key, not both")
    for key in ("jwt_audience", "jwt_issuer"):
        if getattr(auth, key) and not (auth.jwt_secret or auth.jwt_key):
            raise fail(key, "needs --jwt-secret or --jwt-key")


def load(role: str | None, flags: Mapping[str, Any], env: Mapping[str, str],
         path: str | None = None) -> Config:
    """The effective configuration for *role* from all sources.

    *role* is what the process runs as: ``single`` (the whole server),
    ``supervisor`` (of ``--workers``), ``router`` or ``edge``; ``cometd`` is
    single or supervisor as ``workers`` says; None checks the values only
    (``cometd config``, ``cometd load``).

    *flags* maps option keys (``admin_port``) to the command line's values
    (strings, True for a given boolean flag); *path* is the TOML file, if
    any, else ``COMETD_CONFIG`` names one. For a router or an edge with
    ``COMETD_CONFIG_JSON`` in *env*, that is the whole configuration.
    """
    if CHILD_ENV in env and role in ("router", "edge"):  # what a supervisor's children are
        config = from_json(env[CHILD_ENV])
        _check(config, role, {})
        return config
    values: dict[str, tuple[Any, str]] = {}
    path = path or env.get(CONFIG_ENV) or None
    if path:
        values.update(_toml_values(path))
    values.update(_env_values(env))
    for key, value in flags.items():
        if value is not None:
            values[key] = (value, "the command line")
    config = _build(values)
    if role == "cometd":
        role = "single" if config.backplane.workers is None else "supervisor"
    if role is not None:
        _check(config, role, {key: source for key, (_, source) in values.items()})
    return config


def to_json(config: Config) -> str:
    """The whole configuration, secrets included, for a child process (see CHILD_ENV)."""
    return json.dumps(dataclasses.asdict(config))


def from_json(text: str) -> Config:
    """The inverse of :func:`to_json`, checked like any other source."""
    try:
        data = json.loads(text)
        values = {opt.key: (data[opt.section][opt.name], CHILD_ENV) for opt in OPTIONS.values()}
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{CHILD_ENV} does not hold a whole configuration") from None
    return _build(values)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)  # a JSON string is a TOML basic string


def to_toml(config: Config) -> str:
    """The configuration as a commented TOML file that :func:`load` reads back.

    Unset options are shown commented out; a secret (the admin password, a
    password in the Redis URL) is never written.
    """
    lines = ["# cometd configuration: cometd --config FILE (or COMETD_CONFIG=FILE).",
             "# Each option can also be set with its COMETD_<OPTION> variable or its flag;",
             "# flags win over variables, variables over this file."]
    for section in _SECTIONS:
        lines += ["", f"[{section}]"]
        for opt in OPTIONS.values():
            if opt.section != section:
                continue
            lines.append(f"# {opt.help} ({opt.flag}, {opt.env})")
            value = getattr(getattr(config, section), opt.name)
            if opt.secret and value:
                lines.append(f"# {opt.name} = (set, not shown)")
            elif opt.key in ("redis", "ingest_redis") and value and redacted(value) != value:
                lines.append(f"# {opt.name} = {_toml_value(redacted(value))}  "
                             "(its password is not shown)")
            elif value is None:
                lines.append(f"# {opt.name} = (unset)")
            else:
                lines.append(f"{opt.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


#: ``:password@`` in text that is not a URL urlsplit reads (``redis//:pw@h``, no scheme)
_LOOSE_PASSWORD = re.compile(r":[^:@/]*@")


def redacted(url: str) -> str:
    """*url* with any password replaced, fit for a banner or a log."""
    parts = urlsplit(url)
    if parts.password is None:
        # A mistyped URL is shown in its error: hide what looks like a password in it too.
        return url if parts.netloc else _LOOSE_PASSWORD.sub(":***@", url)
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


def url_host(host: str) -> str:
    """*host* as it goes in a URL or ``host:port``: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host

