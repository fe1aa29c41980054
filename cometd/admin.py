"""The admin console: a line protocol for telnet, nc or scripts.

Connect with ``telnet 127.0.0.1 8001`` (or ``nc``) and type ``help``. The
console greets, optionally asks for a password, then writes the prompt
``cometd> `` before reading each command. Every reply ends with one line
starting with ``OK`` or ``ERR``; data lines, if any, come before it, so a
script can read until that line (or until the next prompt).

Commands
--------
``subscribe <subscriber> <subscribee>``     ``OK``
``unsubscribe <subscriber> <subscribee>``   ``OK``
``subscribers <id>``                        ids on one line (none: no line), ``OK``
``subscriptions <id>``                      likewise
``send <subject> <message text...>``        ``OK delivered <N> id <message id>``
``online <id>``                             ``OK <connections of id>``
``kick <id> [<id> ...]``                    ``OK kicked <N>``: ends all streams of
                                            each id (N: streams in all), in one
                                            command (with ``--workers``, one
                                            message to the edges); an invalid id
                                            refuses the whole command
``who [N]``                                 up to N (default 100, at most 10,000)
                                            online ids, one a line, unsorted;
                                            ``OK <shown> of <total> online``
``stats``                                   ``key: value`` lines, ``OK``
``load <file> [--directed]``                ``OK loaded <new subscriptions>``
``help [command]``                          one line per command (or that
                                            command's line), ``OK``
``quit``                                    ``OK bye``, then the session closes

With ``--admin-password``, the console asks for it first; a wrong one gets
``ERR wrong password`` (after a second's delay) and the prompt again, and the
third wrong one in a session gets one last ``ERR`` line and the session closes.

``who`` lists the users online in this process (single-process server) or
anywhere in the cluster (the router, from its presence table), in the order
the server learned of them: sorting every online id to show a hundred would
hold the server for as long as the list is big.

A mistake (unknown command, wrong arguments, bad id, a user subscribing to
itself, bad file) gets a one-line ``ERR <reason>`` and the session goes on. An
empty line just gets a new prompt.

The console faces whoever can reach its port, so it bounds what a session can
make the server hold: lines are capped at :data:`MAX_LINE` bytes, an idle
session is closed after ``idle_timeout`` seconds, and at most
``max_sessions`` sessions run at once (the next one gets ``ERR`` and is
closed). ``load`` reads files on the *server*, with the server's permissions:
only give the console to operators.
"""

from __future__ import annotations

import hmac
import logging
import socket
from collections.abc import Callable
from typing import Any, Protocol

import gevent
from gevent.server import StreamServer

from cometd import log
from cometd.ids import InvalidId, check_id
from cometd.store import SelfSubscription, check_pair

__all__ = ["AdminConsole", "AdminBackend", "MAX_LINE", "PROMPT", "GREETING", "PASSWORD_TRIES"]

#: longest command line accepted, terminator included
MAX_LINE = 64 * 1024
PROMPT = b"cometd> "
GREETING = b"cometd admin console; type help\n"
PASSWORD_PROMPT = b"password: "
WRONG_PASSWORD_DELAY = 1.0  # seconds; slows down guessing over many connections
#: wrong passwords after which a session is closed
PASSWORD_TRIES = 3

WHO_DEFAULT = 100
WHO_MAX = 10_000

#: command -> (usage, description), in the order ``help`` lists them
HELP = {
    "subscribe": ("subscribe <subscriber> <subscribee>",
                  "subscriber gets subscribee's messages (not oneself: that is implied)"),
    "unsubscribe": ("unsubscribe <subscriber> <subscribee>", "undo a subscribe"),
    "subscribers": ("subscribers <id>", "who gets id's messages"),
    "subscriptions": ("subscriptions <id>", "whose messages id gets"),
    "send": ("send <subject> <message text...>",
             "send the text from subject; replies OK delivered N id <message id>"),
    "online": ("online <id>", "number of open streams of id"),
    "kick": ("kick <id> [<id> ...]", "end every stream of each id (chunked ones cleanly), "
                                     "all in one go; replies OK kicked <streams in all>"),
    "who": ("who [N]", f"up to N (default {WHO_DEFAULT}, at most {WHO_MAX:,}) online ids, "
                       "one a line, unsorted; replies OK <shown> of <total> online"),
    "stats": ("stats", "server counters"),
    "load": ("load <file> [--directed]",
             "bulk-load a friends file on the server (one 'A B' a line)"),
    "help": ("help [command]", "this list, or one command's usage"),
    "quit": ("quit", "end the session"),
}


class AdminBackend(Protocol):
    """What the console needs: the single-process backend or a router's."""

    def add(self, pairs: list[tuple[str, str]]) -> int: ...
    def remove(self, pairs: list[tuple[str, str]]) -> int: ...
    def subscribers(self, user: str) -> list[str]: ...
    def subscriptions(self, user: str) -> list[str]: ...
    def send(self, subject: str, body: bytes) -> tuple[int, str]: ...
    def online(self, user: str) -> int: ...
    def kick(self, users: list[str]) -> int: ...
    def who(self, limit: int) -> tuple[list[str], int]: ...
    def stats(self) -> dict[str, Any]: ...
    def load(self, path: str, directed: bool = False) -> int: ...


class CommandError(ValueError):
    """A command the console refuses; its message becomes ``ERR <message>``."""


class _Quit(Exception):
    """The client asked to end the session."""


class _LineTooLong(ValueError):
    """A line over :data:`MAX_LINE` bytes (already discarded up to its newline)."""


def _one_line(text: str, limit: int = 500) -> str:
    # Replies are line-framed: an error text with a newline would desync a script.
    text = " ".join(text.split("\n")).replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown(word: str) -> str:
    return repr(word) if len(word) <= 40 else repr(word[:37]) + "..."


class _Session:
    """One client connection: read a command line, reply, repeat."""

    def __init__(self, console: AdminConsole, sock: socket.socket) -> None:
        self.console = console
        self.sock = sock
        self.rfile = sock.makefile("rb")

    def readline(self) -> bytes | None:
        """The next line without its terminator; None at end of input."""
        line = self.rfile.readline(MAX_LINE + 1)
        if not line:
            return None
        if len(line) > MAX_LINE or not line.endswith(b"\n"):
            if len(line) <= MAX_LINE:
                return None  # the client hung up mid-line: nothing to answer
            # Discard the rest of the line in bounded reads so memory stays capped.
            while not line.endswith(b"\n"):
                line = self.rfile.readline(MAX_LINE + 1)
                if not line:
                    return None
            raise _LineTooLong(f"line over {MAX_LINE} bytes")
        return line.rstrip(b"\n").rstrip(b"\r")

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def run(self) -> None:
        self.write(GREETING)
        if self.console.password is not None and not self.authenticate():
            return
        while True:
            self.write(PROMPT)
            try:
                raw = self.readline()
            except _LineTooLong as exc:
                self.write(b"ERR %s\n" % str(exc).encode())
                continue
            if raw is None:
                return
            try:
                lines = self.console.execute(raw)
            except _Quit:
                self.write(b"OK bye\n")
                return
            if lines:
                self.write("".join(line + "\n" for line in lines).encode("utf-8"))

    def authenticate(self) -> bool:
        """Ask for the password; False (the session ends) at EOF or after the last try."""
        expected = self.console.password.encode("utf-8")  # type: ignore[union-attr]
        for tries_left in range(PASSWORD_TRIES - 1, -1, -1):
            self.write(PASSWORD_PROMPT)
            try:
                raw = self.readline()
            except _LineTooLong:
                raw = b""
            if raw is None:
                return False
            if hmac.compare_digest(raw, expected):
                return True
            gevent.sleep(self.console.wrong_password_delay)
            if tries_left:
                self.write(b"ERR wrong password\n")
        self.write(b"ERR wrong password %d times; closing\n" % PASSWORD_TRIES)
        return False

    def close(self) -> None:
        for closable in (self.rfile, self.sock):
            try:
                closable.close()
            except OSError:
                pass


class AdminConsole(StreamServer):
    """The admin console server: one :class:`_Session` greenlet per connection."""

    def __init__(
        self,
        backend: AdminBackend,
        host: str = "127.0.0.1",
        port: int = 8001,
        password: str | None = None,
        idle_timeout: float = 300.0,
        max_sessions: int = 64,
        wrong_password_delay: float = WRONG_PASSWORD_DELAY,
    ) -> None:
        # The pool is a hard bound on greenlets; sessions past max_sessions are
        # refused politely by handle(), the few extra slots are for that.
        super().__init__((host, port), spawn=max_sessions + 8)
        self.backend = backend
        self.password = password or None
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.wrong_password_delay = wrong_password_delay
        self.sessions = 0
        self._commands: dict[str, Callable[[list[str], str], list[str]]] = {
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
            "subscribers": self._subscribers,
            "subscriptions": self._subscriptions,
            "send": self._send,
            "online": self._online,
            "kick": self._kick,
            "who": self._who,
            "stats": self._stats,
            "load": self._load,
            "help": self._help,
            "quit": self._quit,
        }

    def handle(self, sock: socket.socket, address: Any) -> None:
        # Also bounds writes: a client that stops reading cannot park a session forever.
        sock.settimeout(self.idle_timeout)
        if self.sessions >= self.max_sessions:
            try:
                sock.sendall(b"ERR too many admin sessions, try again later\n")
            except OSError:
                pass
            return
        self.sessions += 1
        session = _Session(self, sock)
        try:
            session.run()
        except OSError:
            pass  # hang-up, reset or idle timeout (socket.timeout is an OSError)
        finally:
            self.sessions -= 1
            session.close()

    # -- commands ---------------------------------------------------------------

    def execute(self, raw: bytes) -> list[str]:
        """The reply lines to one command line (raises :class:`_Quit` on quit)."""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return ["ERR line is not valid UTF-8"]
        if any(ch < " " and ch != "\t" or ch == "\x7f" for ch in line):
            return ["ERR control characters in line"]
        words = line.split(None, 1)
        if not words:
            return []
        name = words[0].lower()
        command = self._commands.get(name)
        if command is None:
            return [f"ERR unknown command {_shown(words[0])}; type help"]
        rest = words[1] if len(words) > 1 else ""
        try:
            return command(rest.split(), rest)
        except _Quit:
            raise
        except (CommandError, InvalidId, SelfSubscription) as exc:
            return ["ERR " + _one_line(str(exc))]
        except Exception as exc:  # noqa: BLE001 - a backend fault must not end the session
            log.event("admin_command_failed", f"admin command {name} failed: "
                      f"{type(exc).__name__}", logging.ERROR, command=name)
            return ["ERR " + _one_line(f"internal error: {type(exc).__name__}: {exc}")]

    @staticmethod
    def _args(args: list[str], names: str) -> list[str]:
        expected = names.split()
        if len(args) != len(expected):
            usage = " ".join(f"<{n}>" for n in expected)
            raise CommandError(f"expected {len(expected)} argument(s): {usage}")
        return [check_id(a) for a in args]

    def _subscribe(self, args: list[str], rest: str) -> list[str]:
        subscriber, subscribee = self._args(args, "subscriber subscribee")
        self.backend.add([check_pair(subscriber, subscribee)])
        return ["OK"]

    def _unsubscribe(self, args: list[str], rest: str) -> list[str]:
        subscriber, subscribee = self._args(args, "subscriber subscribee")
        self.backend.remove([(subscriber, subscribee)])
        return ["OK"]

    def _subscribers(self, args: list[str], rest: str) -> list[str]:
        (user,) = self._args(args, "id")
        ids = self.backend.subscribers(user)
        return [" ".join(ids), "OK"] if ids else ["OK"]

    def _subscriptions(self, args: list[str], rest: str) -> list[str]:
        (user,) = self._args(args, "id")
        ids = self.backend.subscriptions(user)
        return [" ".join(ids), "OK"] if ids else ["OK"]

    def _send(self, args: list[str], rest: str) -> list[str]:
        parts = rest.split(None, 1)
        if len(parts) < 2 or not parts[1].strip():
            raise CommandError("usage: send <subject> <message text...> (the text is required)")
        subject = check_id(parts[0])
        delivered, message_id = self.backend.send(subject, parts[1].encode("utf-8"))
        return [f"OK delivered {delivered} id {message_id}"]

    def _online(self, args: list[str], rest: str) -> list[str]:
        (user,) = self._args(args, "id")
        return [f"OK {self.backend.online(user)}"]

    def _kick(self, args: list[str], rest: str) -> list[str]:
        if not args:
            raise CommandError("expected at least 1 argument: <id> [<id> ...]")
        # Every id checked before any is kicked: a mistake kicks no one.
        users = list(dict.fromkeys(check_id(a) for a in args))
        return [f"OK kicked {self.backend.kick(users)}"]

    def _who(self, args: list[str], rest: str) -> list[str]:
        if len(args) > 1 or args and not (
            args[0].isascii() and args[0].isdigit() and int(args[0]) <= WHO_MAX
        ):
            raise CommandError(f"usage: who [N] (N from 0 to {WHO_MAX:,})")
        users, total = self.backend.who(int(args[0]) if args else WHO_DEFAULT)
        return [*users, f"OK {len(users)} of {total} online"]

    def _stats(self, args: list[str], rest: str) -> list[str]:
        self._no_args(args)
        stats = dict(self.backend.stats())  # a copy: the backend's dict may be shared
        stats["admin_sessions"] = self.sessions
        return [_one_line(f"{key}: {value}") for key, value in stats.items()] + ["OK"]

    def _load(self, args: list[str], rest: str) -> list[str]:
        directed = "--directed" in args
        paths = [a for a in args if a != "--directed"]
        if len(paths) != 1 or len(args) - len(paths) > 1:
            raise CommandError("usage: load <file> [--directed] (no spaces in the file name)")
        from cometd.loader import LoadError  # numpy: ~70 ms no start needs

        try:
            loaded = self.backend.load(paths[0], directed)
        except OSError as exc:
            raise CommandError(f"cannot read {paths[0]}: {exc.strerror or exc}") from None
        except LoadError as exc:
            raise CommandError(str(exc)) from None
        return [f"OK loaded {loaded}"]

    def _help(self, args: list[str], rest: str) -> list[str]:
        if len(args) > 1:
            raise CommandError("usage: help [command]")
        if args:
            entry = HELP.get(args[0].lower())
            if entry is None:
                raise CommandError(f"unknown command {_shown(args[0])}; type help")
            return [f"{entry[0]}  {entry[1]}", "OK"]
        width = max(len(usage) for usage, _ in HELP.values())
        return [f"{usage:<{width}}  {text}" for usage, text in HELP.values()] + ["OK"]

    def _quit(self, args: list[str], rest: str) -> list[str]:
        raise _Quit()

    @staticmethod
    def _no_args(args: list[str]) -> None:
        if args:
            raise CommandError("this command takes no arguments")
