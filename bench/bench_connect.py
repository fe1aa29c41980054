#!/usr/bin/env python3
"""connect() CPU per connection from one source address as its ephemeral ports fill up.

Why check-system asks for twice the ports a client source address uses: the
kernel's connect() searches one parity of ``ip_local_port_range`` first, so
once half the range is taken every connect walks all of it. This opens
``--n`` connections (default 19,000: a process's open files here) from
127.1.0.1 to a listener (a child process accepts and holds them) and prints
the client's CPU per connect (user + system, so the kernel's port search) for
the first 10,000 and for the last 4,000.

``--how noport``: ``IP_BIND_ADDRESS_NO_PORT`` + ``bind((src, 0))``, floodtest's
way, port picked at connect(); ``--how explicit``: ``bind((src, port))`` with
the ports 1024 upward, no search. Run it in a network namespace of its own so
the range can be set without touching anyone else's::

    unshare -n sh -c 'ip link set lo up; .venv/bin/python bench/bench_connect.py --how noport'
    unshare -n sh -c 'ip link set lo up; echo 1024 65535 > /proc/sys/net/ipv4/ip_local_port_range;
                      .venv/bin/python bench/bench_connect.py --how noport'
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import time

__all__ = ["main"]

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def _hold_accepted(ls: socket.socket, n: int, done: int) -> None:
    held = []
    ls.settimeout(60)
    try:
        while len(held) < n:
            held.append(ls.accept()[0])
    except OSError:
        pass
    os.read(done, 1)
    os._exit(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--how", choices=["noport", "explicit"], default="noport")
    p.add_argument("--n", type=int, default=19_000)
    a = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4096)
    port = ls.getsockname()[1]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)  # so that the parent's end, even by a crash, ends the child's wait
        _hold_accepted(ls, a.n, r)
    ls.close()
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        lo, hi = map(int, f.read().split())
    socks, per = [], []  # per: CPU us of each block of 1,000 connects, per connect
    t = time.process_time()
    for i in range(a.n):
        s = socket.socket()
        if a.how == "noport":
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind(("127.1.0.1", 0))
        else:
            s.bind(("127.1.0.1", 1024 + i))
        s.connect(("127.0.0.1", port))
        socks.append(s)
        if (i + 1) % 1000 == 0:
            now = time.process_time()
            per.append((now - t) * 1e3)
            t = now
    print(f"{a.how}, ip_local_port_range {lo}-{hi} ({hi - lo + 1} ports): CPU per connect "
          f"{statistics.median(per[:10]):.0f} us for the first 10,000, "
          f"{statistics.median(per[-4:]):.0f} us for the last 4,000")
    os.write(w, b"x")
    os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
