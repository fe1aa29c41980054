#!/usr/bin/env python3
"""The floors under a single ``POST /send``: bare servers answering each with a canned 200.

    bench/publish_floor.py {epoll,watcher,greenlet} [--port 0]
    bench/publish_floor.py {no-router,no-history} [bin/cometd's options]

What a paced keep-alive publish costs with nothing of ours in it, so that
``bench/bench_publish.py --floors`` can split cometd's figure against nchan's
into what CPython costs, what gevent's loop costs and what is ours:

- ``epoll``: a plain CPython loop on :mod:`select.epoll` (no gevent);
- ``watcher``: gevent's loop, the work done in an io watcher's callback,
  in the hub (no greenlet switch);
- ``greenlet``: gevent's loop, each connection in its own greenlet woken by
  its io watcher, as :mod:`cometd.publish` serves one (two switches a request).

Each reads what has come (one ``recv``), cuts the requests it holds (head,
``Content-Length``, body) and answers all of them with one ``send`` of the
bytes cometd answers a send with (the date fixed). It prints the URL it
serves, as ``bin/cometd`` does, and runs until killed. Loopback only.

Two more split cometd's own figure, each ``bin/cometd`` (the rest of the
arguments are its options) with one part left out, so the differences
between the rows are each part's share:

- ``no-router``: :meth:`cometd.router.Router.send_batch` hands out ids and
  does nothing else (no history, no fan-out, no metrics): the loop's share;
- ``no-history``: :meth:`cometd.history.History.record_batch` hands out ids
  and writes nothing (no LevelDB): the router's Python without the write.

These are measuring tools, never a way to run cometd: what they answer
is not kept anywhere.
"""

from __future__ import annotations

import _socket
import argparse
import select
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

__all__ = ["ANSWER", "answers", "serve_ablated", "main"]

_BODY = b'{"delivered": 0, "id": "1-1"}'
#: the answer to every request: cometd's send answer, byte for byte but for the date
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
          b"Date: Tue, 01 Dec 2026 00:00:00 GMT\r\n\r\n%s" % (len(_BODY), _BODY))


def answers(buf: bytearray) -> bytes:
    """Cut the whole requests off the front of *buf*; the answers to them."""
    n = 0
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            break
        at = buf.find(b"Content-Length:", 0, end)
        length = 0 if at < 0 else int(buf[at + 15:buf.index(b"\r", at)])
        if len(buf) < end + 4 + length:
            break
        del buf[:end + 4 + length]
        n += 1
    return ANSWER * n


def _listener(port: int) -> socket.socket:
    sock = socket.create_server(("127.0.0.1", port), backlog=128)
    sock.setblocking(False)
    print(f"serving on http://127.0.0.1:{sock.getsockname()[1]}/", flush=True)
    return sock


def _accepted(listener: socket.socket) -> _socket.socket | None:
    try:
        fd, _ = listener._accept()  # a bare fd: no Python socket object's layer
    except BlockingIOError:
        return None
    sock = _socket.socket(fileno=fd)
    sock.setblocking(False)
    sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    return sock


def serve_epoll(listener: socket.socket) -> None:
    poll = select.epoll()
    poll.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, tuple[_socket.socket, bytearray]] = {}
    while True:
        for fd, _ in poll.poll():
            if fd == listener.fileno():
                sock = _accepted(listener)
                if sock is not None:
                    conns[sock.fileno()] = (sock, bytearray())
                    poll.register(sock.fileno(), select.EPOLLIN)
                continue
            sock, buf = conns[fd]
            data = sock.recv(65536)
            if not data:
                poll.unregister(fd)
                del conns[fd]
                sock.close()
                continue
            buf += data
            out = answers(buf)
            if out:
                sock.send(out)


def serve_gevent(listener: socket.socket, switch: bool) -> None:
    import gevent
    from greenlet import getcurrent

    hub = gevent.get_hub()
    loop = hub.loop

    def on_readable(sock: _socket.socket, buf: bytearray, watcher) -> bool:
        data = sock.recv(65536)
        if not data:
            watcher.close()
            sock.close()
            return False
        buf += data
        out = answers(buf)
        if out:
            sock.send(out)
        return True

    def in_greenlet(sock: _socket.socket) -> None:
        buf = bytearray()
        watcher = loop.io(sock.fileno(), 1)
        me = getcurrent().switch
        while True:
            watcher.start(me)
            hub.switch()
            watcher.stop()
            if not on_readable(sock, buf, watcher):
                return

    def on_accept() -> None:
        sock = _accepted(listener)
        if sock is None:
            return
        if switch:
            gevent.spawn(in_greenlet, sock)
            return
        watcher = loop.io(sock.fileno(), 1)
        watcher.start(on_readable, sock, bytearray(), watcher)

    accept = loop.io(listener.fileno(), 1)
    accept.start(on_accept)
    hub.join()


def serve_ablated(kind: str, argv: list[str]) -> None:
    """``bin/cometd argv`` with the router's send (``no-router``) or the history write left out."""
    import itertools

    from cometd import cli, history, router

    ids = itertools.count(1)
    if kind == "no-router":
        def send_batch(self, messages, marks=None):
            return [router.Sent(0, f"1-{next(ids)}") for _ in messages]
        router.Router.send_batch = send_batch
    else:
        def record_batch(self, messages, marks=None):
            first = self._last + 1
            self._last += len(messages)
            return list(range(first, self._last + 1))
        history.History.record_batch = record_batch
    sys.argv = ["cometd", *argv]
    cli.main()


def main() -> None:
    if sys.argv[1:2] in (["no-router"], ["no-history"]):
        serve_ablated(sys.argv[1], sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=("epoll", "watcher", "greenlet"))
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    listener = _listener(args.port)
    if args.kind == "epoll":
        serve_epoll(listener)
    else:
        serve_gevent(listener, args.kind == "greenlet")


if __name__ == "__main__":
    main()
