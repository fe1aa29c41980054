#!/usr/bin/env python3
"""What one fan-out delivery costs beyond the fan-out's ``send()``, and what that send costs.

    bench/bench_deliver.py                         # both parts, --runs 5
    bench/bench_deliver.py --part python --server-root /tmp/old   # another tree's fan-out code
    bench/bench_deliver.py --part router --server-root /tmp/old   # a whole Router.send

- ``python``: the fan-out's own Python, in-process, with no system call: a
  pool-mode ConnectionTable of 6,000 streams whose sockets' ``send`` is the
  builtin ``len``, fed through ``cometd.online.recipients`` as the router
  feeds it: one subject to 4,000 online subscribers (ns per delivery), and
  3,000 feed messages from random subjects to 30 random users each (µs per
  message). CPU time of the process, the minimum of --runs (what the code
  costs when nothing else is running).
- ``router``: a whole ``Router.send`` of the feed, in-process, with the same
  free sends: the subject's line, its history write, its subscriber read
  (the bench's 6,000-user m=15 database, copied from ``cometd-bench
  fanout``'s cache), the intersection with who is online (everyone) and
  the deliveries. Warm: 3,000 sends back to back, CPU µs per message, the
  minimum of 7 passes. Cold: 1,000 sends, each after writing over 32 MB so
  that no cache holds the server's state (the bench's sends are 2 ms
  apart, with the publish and other processes in between), the median
  thread CPU µs of one send.
- ``kernel``: loopback ``send()`` from this process (pinned to CPU 0) to
  streams read by a child asleep in ``epoll`` (pinned to CPU 1), CPU per
  send: the feed's pattern (30 of 6,000 sockets per message, 500 messages a
  second, so each socket waits ~0.4 s between messages) and the one-subject
  pattern (all 4,000 in a row, 20 a second); each with the sending side's
  knobs: plain, ``TCP_NODELAY``, ``SO_SNDBUF`` 4096, ``os.write`` on the
  descriptor instead of ``send``. And the feed's sockets at ten times its
  rate (5,000 messages a second, plain sends): the cost of the pause between
  messages. Also how often the reader woke per send.
- ``rates``: the feed's sockets at 500, 1,000, 2,000 and 5,000 messages a
  second (a socket's gap between messages 400 down to 40 ms), plain sends:
  CPU per send, and per send the TCP counters' deltas (segments out, ACKs
  delayed; ``/proc/net/netstat`` and ``snmp``, so run it in a network
  namespace of its own, ``unshare -n sh -c 'ip link set lo up; ...'``, or
  other traffic counts too).

Every loop is bounded; loopback only. Each part's variants run interleaved,
--runs rounds; the table gives the median (min–max).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import select
import socket
import statistics
import subprocess
import sys
import time

import bench_costs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY = b"ts=1764140000.123456;from=1;seq=1;" + b"x" * 66  # msggen's 100 bytes


def _pairs(n: int) -> tuple[list[socket.socket], list[socket.socket]]:
    """bench_costs' loopback pairs, with room for n of them."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (20_000, 20_000))
    return bench_costs._pairs(n)


# -- python: the fan-out's code with sends that cost nothing -----------------------

PYTHON = """
import array, gc, random, sys, time
sys.path[:0] = [{root!r}, {bench!r}]
from cometd.connections import ConnectionTable
from cometd.online import recipients
from cometd.store import SetView
from cometd.streamhttp import CHUNKED, Message
from bench_deliver import BODY, _pairs

class FreeSocket:
    __slots__ = ("send",)

N = 6000
clients, servers = _pairs(N)
table = ConnectionTable("pool")
conns = [table.adopt(s, str(u), CHUNKED) for s, u in zip(servers, range(1, N + 1))]
table.index
free = FreeSocket()
free.send = len  # takes everything, no system call
real = [c.sock for c in conns]
for c in conns:
    c.sock = free

def view(ids):
    ids = sorted(ids)
    return SetView(len(ids).to_bytes(4, "little") + array.array("I", ids).tobytes())

star = view(range(2, 4002))
rng = random.Random(1)
feed = [(str(rng.randint(1, N)), view(rng.sample(range(1, N + 1), 30))) for _ in range(3000)]
deliver = getattr(table, "deliver_online", table.deliver)  # given the index's values
gc.disable()
one, per_message = [], []
for _ in range(5):
    t = time.process_time()
    for _ in range(20):
        deliver(recipients("1", star, table.index), Message("1", BODY))
    one.append((time.process_time() - t) / (20 * 4001) * 1e9)
    t = time.process_time()
    for subject, subscribers in feed:
        deliver(recipients(subject, subscribers, table.index), Message(subject, BODY))
    per_message.append((time.process_time() - t) / len(feed) * 1e6)
for c, s in zip(conns, real):
    c.sock = s
print(min(one), min(per_message))
"""


ROUTER = """
import gc, random, shutil, statistics, sys, tempfile, time
sys.path[:0] = [{root!r}, {bench!r}]
from cometd.connections import ConnectionTable
from cometd.history import History
from cometd.router import Router
from cometd.store import SubscriptionStore
from cometd.streamhttp import CHUNKED
from bench_deliver import BODY, _pairs

class FreeSocket:
    __slots__ = ("send",)

tmp = tempfile.mkdtemp()
try:
    shutil.copytree({db!r}, tmp + "/db")
    store = SubscriptionStore(tmp + "/db")
    N = 6000
    clients, servers = _pairs(N)
    table = ConnectionTable("pool")
    conns = [table.adopt(s, str(u), CHUNKED) for s, u in zip(servers, range(1, N + 1))]
    free = FreeSocket()
    free.send = len
    for c in conns:
        c.sock = free
    router = Router(store, table, History(store.db))
    rng = random.Random(1)
    subjects = [str(rng.randint(1, N)) for _ in range(3000)]
    gc.disable()
    warm = []
    for _ in range(8):  # the first pass reads every set once
        t = time.process_time()
        for subject in subjects:
            router.send(subject, BODY)
        warm.append((time.process_time() - t) / len(subjects) * 1e6)
    junk = bytearray(32 * 1024 * 1024)
    cold = []
    for subject in subjects[:1000]:
        junk[::64] = bytes(len(junk) // 64)
        t = time.thread_time_ns()
        router.send(subject, BODY)
        cold.append(time.thread_time_ns() - t)
    print(min(warm[1:]), statistics.median(cold) / 1000)
finally:
    shutil.rmtree(tmp)
"""


def router_costs(root: str, db: str) -> tuple[float, float]:
    """(warm, cold) CPU µs per feed message through *root*'s ``Router.send``."""
    code = ROUTER.format(root=root, bench=os.path.join(ROOT, "bench"), db=db)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=600)
    warm, cold = out.stdout.split()
    return float(warm), float(cold)


def python_costs(root: str) -> tuple[float, float]:
    """(ns per one-subject delivery, µs per feed message) of *root*'s fan-out code."""
    code = PYTHON.format(root=root, bench=os.path.join(ROOT, "bench"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=600)
    one, feed = out.stdout.split()
    return float(one), float(feed)


# -- kernel: a loopback send to a reader asleep in epoll ---------------------------

def _reader(clients: list[socket.socket], ready: int) -> None:
    """The child: read every stream until they close (bounded: 300 s)."""
    os.sched_setaffinity(0, {1})
    ep = select.epoll()
    by_fd = {}
    for c in clients:
        c.setblocking(False)
        ep.register(c.fileno(), select.EPOLLIN)
        by_fd[c.fileno()] = c
    os.write(ready, b"x")
    end = time.monotonic() + 300
    while by_fd and time.monotonic() < end:
        for fd, _ in ep.poll(0.05, 1024):
            try:
                if not by_fd[fd].recv(262144):
                    ep.unregister(fd)
                    del by_fd[fd]
            except BlockingIOError:
                pass
    os._exit(0)


def _woken(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f
                    if line.startswith("voluntary_ctxt_switches"))


PATTERNS = {"feed": (6000, 30, 500.0, 2000), "feed x2": (6000, 30, 1000.0, 3000),
            "feed x4": (6000, 30, 2000.0, 6000), "feed x10": (6000, 30, 5000.0, 10_000),
            "one": (4000, 4000, 20.0, 60)}
#: the TCP counters the rates part reports, per send
COUNTERS = ("Tcp:OutSegs", "TcpExt:DelayedACKs")


def tcp_counters() -> dict[str, int]:
    """This network namespace's TCP and TcpExt counters."""
    found = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        with open(path) as f:
            lines = f.read().splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=True):
            prefix = names.split()[0]
            found.update({prefix + k: int(v) for k, v in zip(names.split()[1:],
                                                             values.split()[1:], strict=True)})
    return found


def kernel_cost(pattern: str, knob: str) -> tuple[float, float, dict[str, float]]:
    """(CPU µs per send, reader wake-ups per send, COUNTERS per send) for *pattern* with
    the sending *knob*."""
    socks, per, rate, messages = PATTERNS[pattern]
    clients, servers = _pairs(socks)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        for s in servers:
            s.close()
        os.close(ready_r)
        _reader(clients, ready_w)
    try:
        os.sched_setaffinity(0, {0})
        for c in clients:
            c.close()
        os.read(ready_r, 1)
        for s in servers:
            s.setblocking(False)
            if knob == "TCP_NODELAY":
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            elif knob == "SO_SNDBUF 4096":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        frame = b"%x\r\n%s\r\n" % (len(BODY), BODY)
        rng = random.Random(1)
        plan = [rng.sample(range(socks), per) if per < socks else range(socks)
                for _ in range(messages)]
        if knob == "os.write":
            fds = [s.fileno() for s in servers]
            write = os.write
            sends = [[(write, fds[k]) for k in targets] for targets in plan]
        else:
            sends = [[(servers[k].send, None) for k in targets] for targets in plan]
        time.sleep(0.5)
        counted = tcp_counters()
        woken, cpu, t0 = _woken(pid), time.process_time(), time.monotonic()
        for i, batch in enumerate(sends):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for fn, fd in batch:
                if fd is None:
                    fn(frame)
                else:
                    fn(fd, frame)
        cpu = time.process_time() - cpu
        woken = _woken(pid) - woken
        time.sleep(0.3)  # the last ACKs
        after = tcp_counters()
        n = messages * per
        return 1e6 * cpu / n, woken / n, {k: (after[k] - counted[k]) / n for k in COUNTERS}
    finally:
        for s in servers:
            s.close()
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("python", "router", "kernel", "rates", "both"),
                    default="both",
                    help="both: python and kernel")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--server-root", default=ROOT,
                    help="the tree whose cometd package the python part measures")
    ap.add_argument("--db", default=os.path.join(ROOT, "data", "bench", "db-U6000-m15-s1"),
                    help="the router part's feed database (cometd-bench fanout's cache)")
    args = ap.parse_args()
    if args.part == "router":
        if not os.path.isdir(args.db):
            sys.exit(f"{args.db} is missing: run bin/cometd-bench fanout once first")
        warm, cold = [], []
        for r in range(args.runs):
            a, b = router_costs(args.server_root, args.db)
            warm.append(a)
            cold.append(b)
            print(f"router round {r + 1}: warm {a:.2f} µs, cold {b:.1f} µs", file=sys.stderr)
        print(f"| Router.send of a feed message ({args.server_root}) | median (min–max) of "
              f"{args.runs} |")
        print("|---|---:|")
        print(f"| warm, CPU µs per message | {statistics.median(warm):.2f} "
              f"({min(warm):.2f}–{max(warm):.2f}) |")
        print(f"| cold, CPU µs per message | {statistics.median(cold):.1f} "
              f"({min(cold):.1f}–{max(cold):.1f}) |")
        return
    if args.part == "rates":
        rates: dict[str, list[tuple[float, float, dict[str, float]]]] = {}
        for r in range(args.runs):
            for pattern in ("feed", "feed x2", "feed x4", "feed x10"):
                rates.setdefault(pattern, []).append(kernel_cost(pattern, "plain"))
            print(f"rates round {r + 1} done", file=sys.stderr)
        print(f"| messages a second (a socket's gap) | CPU µs per send, median (min–max) of "
              f"{args.runs} | " + " | ".join(f"{c} per send" for c in COUNTERS) + " |")
        print("|---|---:|" + "---:|" * len(COUNTERS))
        for pattern, values in rates.items():
            socks, per, rate, _ = PATTERNS[pattern]
            us = [v[0] for v in values]
            print(f"| {rate:,.0f} ({socks / per / rate * 1000:.0f} ms) | "
                  f"{statistics.median(us):.2f} ({min(us):.2f}–{max(us):.2f}) | " + " | ".join(
                      f"{statistics.median(v[2][c] for v in values):.3f}" for c in COUNTERS)
                  + " |")
        return
    if args.part in ("python", "both"):
        one, feed = [], []
        for r in range(args.runs):
            a, b = python_costs(args.server_root)
            one.append(a)
            feed.append(b)
            print(f"python round {r + 1}: {a:.0f} ns, {b:.2f} µs", file=sys.stderr)
        print(f"| fan-out Python ({args.server_root}) | median (min–max) of {args.runs} |")
        print("|---|---:|")
        print(f"| one subject, ns per delivery | {statistics.median(one):.0f} "
              f"({min(one):.0f}–{max(one):.0f}) |")
        print(f"| feed, µs per message (~31 deliveries) | {statistics.median(feed):.2f} "
              f"({min(feed):.2f}–{max(feed):.2f}) |")
    if args.part in ("kernel", "both"):
        knobs = ("plain", "TCP_NODELAY", "SO_SNDBUF 4096", "os.write")
        runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for r in range(args.runs):
            for pattern in ("feed", "feed x10", "one"):
                for knob in knobs if pattern != "feed x10" else knobs[:1]:
                    runs.setdefault((pattern, knob), []).append(kernel_cost(pattern, knob))
            print(f"kernel round {r + 1} done", file=sys.stderr)
        print(f"\n| pattern, sending side | CPU µs per send, median (min–max) of {args.runs} "
              "| reader wake-ups per send |")
        print("|---|---:|---:|")
        for (pattern, knob), values in runs.items():
            us = [v[0] for v in values]
            print(f"| {pattern}, {knob} | {statistics.median(us):.2f} ({min(us):.2f}–"
                  f"{max(us):.2f}) | {statistics.median(v[1] for v in values):.3f} |")


if __name__ == "__main__":
    main()
