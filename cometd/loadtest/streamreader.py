"""streamreader: hold one stream per line of a paths file and count messages received.

The side-by-side fan-out bench (:mod:`cometd.loadtest.versus`) needs the same
reading client for cometd and for nginx + nchan, whose streams are framed
differently (chunks, raw bytes) and whose subscribers ask for different paths
(``/test/<id>``; nchan's multiplexed ``/sub/<a>,<b>,...``). So this reader
does not parse streams at all: every message :mod:`cometd.loadtest.msggen`
publishes starts with ``ts=``, which no welcome, header or chunk size
contains, and a delivery is one occurrence of those three bytes.

Theory of operation
-------------------
One process, one ``epoll`` set, no greenlets: connections are opened at
``--rate`` per second with a non-blocking ``connect``, each sends its GET once
writable, and every readable socket is read with one ``recv``. A marker split
across two reads is caught by keeping each connection's last two bytes. The
process writes its counts to ``--status`` (atomically, by rename) every
``--interval`` seconds and once more when it ends (SIGTERM, or ``--timeout``),
so the harness reads how many streams answered and how many messages arrived
without a control channel. CPU per delivery here is a few microseconds: the
bench pins this process to the core the server does not use.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import time

import click

from cometd.loadtest.common import check_loopback

__all__ = ["MARKER", "count_markers", "read_streams", "main"]

#: what every published message starts with (see cometd.loadtest.msggen.make_body)
MARKER = b"ts="


def count_markers(tail: bytes, data: bytes) -> tuple[int, bytes]:
    """Markers in *data* (after *tail*, the end of the previous read); the new tail."""
    joined = tail + data
    return joined.count(MARKER), joined[-(len(MARKER) - 1):]


def read_streams(host: str, port: int, paths: list[str], status: str, rate: float,
                 interval: float, timeout: float) -> dict:
    """Open a stream per path, count markers until SIGTERM or *timeout*; the last counts."""
    stop = False

    def _term(_sig, _frame) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    ep = select.epoll()
    socks: dict[int, socket.socket] = {}
    state: dict[int, list] = {}  # fd -> [request bytes or None once sent, tail, answered]
    counts = {"streams": len(paths), "connected": 0, "answered": 0, "closed": 0,
              "errors": 0, "deliveries": 0, "bytes": 0}
    t0 = time.monotonic()
    end = t0 + timeout
    next_status = t0
    opened = 0

    def write_status() -> None:
        tmp = status + ".tmp"
        with open(tmp, "w") as f:
            json.dump(counts, f)
        os.replace(tmp, status)

    while not stop and time.monotonic() < end:
        now = time.monotonic()
        due = len(paths) if not rate else min(len(paths), int((now - t0) * rate) + 1)
        while opened < due:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex((host, port))
            if err not in (0, errno.EINPROGRESS):
                counts["errors"] += 1
                s.close()
            else:
                fd = s.fileno()
                socks[fd] = s
                req = f"GET {paths[opened]} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
                state[fd] = [req, b"", False]
                ep.register(fd, select.EPOLLOUT)
            opened += 1
        for fd, ev in ep.poll(0.05, 1024):
            s, st = socks[fd], state[fd]
            if st[0] is not None:  # connected (or failed): send the request once
                if ev & (select.EPOLLERR | select.EPOLLHUP):
                    counts["errors"] += 1
                    ep.unregister(fd)
                    del socks[fd], state[fd]
                    s.close()
                    continue
                s.send(st[0])
                st[0] = None
                counts["connected"] += 1
                ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = s.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                counts["closed"] += 1
                ep.unregister(fd)
                del socks[fd], state[fd]
                s.close()
                continue
            if not st[2]:
                st[2] = True
                counts["answered"] += 1
            n, st[1] = count_markers(st[1], data)
            counts["deliveries"] += n
            counts["bytes"] += len(data)
        if now >= next_status:
            write_status()
            next_status = now + interval
    counts["timed_out"] = not stop
    write_status()
    for s in socks.values():
        s.close()
    ep.close()
    return counts


@click.command()
@click.option("--server", required=True, help="host:port of the server (loopback only).")
@click.option("--paths", "paths_file", required=True, type=click.Path(exists=True),
              help="File of request paths, one stream per line.")
@click.option("--status", required=True, help="JSON file the counts are written to.")
@click.option("--rate", default=2000.0, show_default=True, type=float,
              help="Streams opened per second (0: all at once).")
@click.option("--interval", default=0.1, show_default=True, type=float,
              help="Seconds between writes of --status.")
@click.option("--timeout", default=600.0, show_default=True, type=float,
              help="Hard limit on the run, seconds.")
def main(server: str, paths_file: str, status: str, rate: float, interval: float,
         timeout: float) -> None:
    """Hold a stream per line of --paths and count the messages (``ts=``) they carry."""
    host, _, port = server.rpartition(":")
    try:
        host = check_loopback(host, "--server")
        if not port.isdigit():
            raise ValueError(f"--server {server!r}: expected host:port")
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--server") from None
    with open(paths_file) as f:
        paths = [line.strip() for line in f if line.strip()]
    read_streams(host, int(port), paths, status, rate, interval, timeout)


if __name__ == "__main__":
    main()
