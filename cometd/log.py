"""Operator logs: one line per event that matters, on stderr, as text or JSON lines.

Events are few and named (``listening``, ``stopping``,
``stopped``, ``redis_unreachable``, ``router_lost``, ``router_found``,
``auth_failures``, ``slow_consumers_dropped``, ...); there is no line per
request. ``--log-format json`` writes one JSON object a line for collectors:
``{"ts": ..., "level": ..., "role": ..., "event": ..., "msg": ..., <fields>}``;
``text`` (the default) writes ``cometd <role>: [warning: ]<msg>``.

Events that come in bursts (refused credentials, slow consumers) go through
a :class:`Burst`: the first is logged at once, the rest are counted and said
in one line per :data:`BURST_WINDOW` seconds. No caller passes a token, a key
or a password: messages carry counts, statuses, ids and redacted URLs only.

The banner that says a server is ready stays on stdout, as tools parse it;
it is not a log line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["configure", "event", "Burst", "flush_bursts", "BURST_WINDOW", "FORMATS"]

FORMATS = ("text", "json")
BURST_WINDOW = 10.0

_logger = logging.getLogger("cometd")
_logger.propagate = False
_role = "single"
_bursts: list[Burst] = []


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        who = "cometd:" if _role in ("single", "supervisor") else f"cometd {_role}:"
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"{who} {level}{record.getMessage()}"


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "role": _role,
                "event": getattr(record, "event", "message"), "msg": record.getMessage()}
        line.update(getattr(record, "fields", {}))
        return json.dumps(line)


def configure(fmt: str = "text", role: str = "single", stream: Any = None) -> None:
    """Send events to *stream* (stderr) in *fmt* (``text`` or ``json``), naming *role*."""
    global _role
    if fmt not in FORMATS:
        raise ValueError(f"no log format {fmt!r}")
    _role = role
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(_Json() if fmt == "json" else _Text())
    for old in list(_logger.handlers):
        _logger.removeHandler(old)
    _logger.addHandler(handler)
    _logger.setLevel(logging.INFO)


def event(name: str, message: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log event *name*; *fields* are extra keys of its JSON line (never a secret)."""
    if not _logger.handlers:
        configure()
    _logger.log(level, message, extra={"event": name, "fields": fields})


class Burst:
    """An event that may come thousands of times a second, said at most once per window."""

    def __init__(self, name: str, what: str, level: int = logging.WARNING,
                 window: float = BURST_WINDOW) -> None:
        self.name = name
        self.what = what  # "refused credential(s)": said with a count
        self.level = level
        self.window = window
        self._count = 0
        self._timer = None
        _bursts.append(self)

    def note(self) -> None:
        """One more occurrence: logged now if the window is quiet, else counted."""
        if self._timer is None:
            event(self.name, f"1 {self.what}", self.level, count=1)
            self._start()
        else:
            self._count += 1

    def _start(self) -> None:
        import gevent

        self._timer = gevent.spawn_later(self.window, self._flush)

    def _flush(self) -> None:
        count, self._count = self._count, 0
        self._timer = None
        if count:
            event(self.name, f"{count} more {self.what} in the last {self.window:g} s",
                  self.level, count=count)
            self._start()


def flush_bursts() -> None:
    """Say every burst's count not yet said (a stopping server loses none)."""
    for burst in _bursts:
        if burst._timer is not None:
            burst._timer.kill()
            burst._flush()
            if burst._timer is not None:
                burst._timer.kill()
                burst._timer = None
