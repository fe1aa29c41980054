#!/usr/bin/env python3
"""Server CPU per publish: the fast path, the bottle path and nginx + nchan, single and batched.

    bench/bench_publish.py [--count 10000] [--rate 2000] [--rounds 3] [--batch 100]
                           [--size 100] [--no-nchan] [--profile FILE] [--floors]
                           [--also NAME=DIR ...]

Contenders: ``bin/cometd`` in pool and greenlet mode, each with the fast
path (the default) and with ``--no-fast-publish`` (pywsgi and bottle), and
nginx + nchan (one worker, cometd/loadtest/nchan.conf) when installed. Every
server is pinned to CPU 0 (taskset), this client to CPU 1. Each round sends
--count messages of --size bytes, from subjects cycling over 1..1000 with
nobody online, paced at --rate messages a second on one keep-alive
connection, one request at a time: ``POST /send/<id>`` each, and for cometd
also ``POST /publish`` with --batch messages a request. The figure is the
server's CPU (user + system, from the schedstat of every thread of the process
and its children) divided by the messages answered 2xx. nginx ends a keep-alive
connection after 1,000 requests (keepalive_requests), and the client then
opens the next: 10 connections in 10,000 publishes. Rounds alternate between
the contenders; the table shows the median and each round.

``--floors`` adds ``bench/publish_floor.py``'s servers to the single-send
rounds: the bare ones (CPython's epoll, gevent's io watcher, the watcher
and a greenlet switch: each a canned 200 per request), the floors under
cometd's figure, and cometd in pool mode with the router's send, then
only the history's write, left out: the rows' differences split cometd's
figure into the loop's, the router's and the history's shares.

``--also NAME=DIR`` adds a contender: the fast path in pool mode of the
checkout in DIR (another commit, built by the same virtualenv), so a
before and an after are measured side by side in the same rounds.

With ``--profile DIR``, one more pool-mode fast-path server is sampled by
py-spy (the ``profile`` extra; 500 Hz, idle excluded) through one round of
single sends and one of batches: DIR gets the collapsed stacks
(``single.txt``, ``batch.txt``), and the table printed is CPU µs per message
by function, inclusive, from the samples. Loopback only; every loop is
bounded by --count and a timeout.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cometd.loadtest.sampling import schedstat_cpu_ns  # noqa: E402
from cometd.loadtest.servers import NCHAN_MODULE, NCHAN_TEMPLATE, nchan_available  # noqa: E402

SERVER_CPU, CLIENT_CPU = 0, 1
USERS = 1000


def tree_cpu_ns(pid: int) -> int:
    """CPU nanoseconds run so far by every thread of *pid* and of its children (nginx's worker)."""
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return sum(schedstat_cpu_ns(p) for p in pids)


class Client:
    """One keep-alive connection: a request, its Content-Length answer."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def request(self, data: bytes) -> tuple[int, bool]:
        """Send *data*: the answer's status and whether the connection stays open."""
        self.sock.sendall(data)
        while b"\r\n\r\n" not in self.buf:
            more = self.sock.recv(65536)
            if not more:
                raise RuntimeError("connection closed before the answer")
            self.buf += more
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length, keep = 0, True
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                keep = False
        while len(rest) < length:
            more = self.sock.recv(65536)
            if not more:
                raise RuntimeError("connection closed inside the answer")
            rest += more
        self.buf = rest[length:]
        return int(head.split(b" ", 2)[1]), keep

    def close(self) -> None:
        self.sock.close()


def requests(count: int, size: int, batch: int) -> list[tuple[bytes, int]]:
    """The requests of one round and how many messages each carries."""
    body = b"m" * size
    out = []
    if batch <= 1:
        for i in range(count):
            out.append((b"POST /send/%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                        % (i % USERS + 1, size, body), 1))
        return out
    line = b'{"from": "%d", "body": "' + body + b'"}\n'
    for start in range(0, count, batch):
        n = min(batch, count - start)
        payload = b"".join(line % ((start + j) % USERS + 1) for j in range(n))
        out.append((b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(payload), payload), n))
    return out


def run_round(port: int, pid: int, reqs: list[tuple[bytes, int]], rate: float) -> float:
    """Server CPU microseconds per message answered 2xx, paced at *rate* messages a second."""
    client = Client(port)
    try:
        client.request(reqs[0][0])  # warm: the connection and the first request's path
        before = tree_cpu_ns(pid)
        start = time.monotonic()
        deadline = start + 10 + 2 * sum(n for _, n in reqs) / rate
        sent = due = 0
        for data, n in reqs:
            delay = start + due / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            status, keep = client.request(data)
            if not keep:  # nginx ends a connection after keepalive_requests (1000)
                client.close()
                client = Client(port)
            if 200 <= status < 300:
                sent += n
            due += n
            if time.monotonic() > deadline:
                raise RuntimeError("round over its time limit")
        time.sleep(0.05)  # the last answer's tail of work
        return (tree_cpu_ns(pid) - before) / max(sent, 1) / 1000
    finally:
        client.close()


def _ready_port(proc: subprocess.Popen, what: str) -> int:
    """The port in *proc*'s ready line (``http://127.0.0.1:PORT/``), or it is killed after 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "http://127.0.0.1:" in line:
            return int(line.split("http://127.0.0.1:")[1].split("/")[0])
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"{what} did not start")


def start_cometd(tmp: Path, name: str, mode: str, flags: list[str],
                 root: Path = ROOT) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        ["taskset", "-c", str(SERVER_CPU), sys.executable, str(root / "bin" / "cometd"),
         "--port", "0",
         "--admin-port", "-1", "--mode", mode, "--db", str(tmp / name), *flags],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(root)))
    return proc, _ready_port(proc, f"cometd {name}")


def start_floor(tmp: Path, kind: str) -> tuple[subprocess.Popen, int]:
    """One of ``bench/publish_floor.py``'s servers, pinned as cometd is."""
    flags = [] if kind in ("epoll", "watcher", "greenlet") else [
        "--port", "0", "--admin-port", "-1", "--mode", "pool", "--db", str(tmp / kind)]
    proc = subprocess.Popen(
        ["taskset", "-c", str(SERVER_CPU), sys.executable, str(ROOT / "bench" / "publish_floor.py"),
         kind, *flags], stdout=subprocess.PIPE, text=True)
    return proc, _ready_port(proc, f"floor {kind}")


def start_nchan(nginx: str, tmp: Path) -> tuple[subprocess.Popen, int]:
    work = tmp / "nchan"
    (work / "client_body").mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = NCHAN_TEMPLATE.read_text().format(module=NCHAN_MODULE, nofile=4096, prefix=work,
                                             host="127.0.0.1", port=port,
                                             worker_connections=1024)
    (work / "nginx.conf").write_text(conf)
    proc = subprocess.Popen(["taskset", "-c", str(SERVER_CPU), nginx, "-p", str(work), "-c",
                             str(work / "nginx.conf"), "-e", str(work / "error.log")])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("nginx + nchan did not start")


#: bench/publish_floor.py's servers, and their rows' names
FLOORS = (("epoll", "floor: CPython select.epoll, canned 200"),
          ("watcher", "floor: gevent io watcher callback, canned 200"),
          ("greenlet", "floor: gevent io watcher + greenlet switch, canned 200"),
          ("no-router", "split: cometd pool, fast path, the router answering at once"),
          ("no-history", "split: cometd pool, fast path, the history writing nothing"))

SAMPLE_US = 2000  # py-spy at 500 Hz


def profile(port: int, pid: int, reqs: list[tuple[bytes, int]], rate: float, out: Path,
            title: str) -> None:
    """One round under py-spy; print CPU µs per message by function, inclusive."""
    beside = Path(sys.executable).with_name("py-spy")  # the venv's, when not on PATH
    spy = subprocess.Popen([shutil.which("py-spy") or str(beside), "record", "-r", "500",
                            "--nonblocking", "--format", "raw", "-o", str(out),
                            "--pid", str(pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    measured = run_round(port, pid, reqs, rate)
    spy.send_signal(signal.SIGINT)
    spy.wait(30)
    messages = sum(n for _, n in reqs)
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        names = set()
        for frame in stack.split(";"):
            m = re.match(r"(.*) \((.*?):\d+\)", frame)
            names.add(f"{m[1]} ({Path(m[2]).name})" if m else frame)
        for name in names:
            inclusive[name] += int(count)
    print(f"| {title}: {measured:.1f} µs measured, {total * SAMPLE_US / messages:.1f} µs "
          "sampled | µs per message, inclusive |")
    print("|---|---:|")
    for name, count in inclusive.most_common(25):
        print(f"| `{name}` | {count * SAMPLE_US / messages:.1f} |")
    print()


def print_table(title: str, results: dict[str, list[float]], reference: str | None) -> None:
    ref = statistics.median(results[reference]) if reference in results else None
    print(f"| {title} | server CPU µs per message, median | × nchan | min–max (each round) |")
    print("|---|---:|---:|---|")
    for name, values in results.items():
        med = statistics.median(values)
        ratio = f"{med / ref:.2f}" if ref else "–"
        print(f"| {name} | {med:.1f} | {ratio} | {min(values):.1f}–{max(values):.1f} "
              f"({' / '.join(f'{v:.1f}' for v in values)}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=10_000, help="messages per round")
    ap.add_argument("--rate", type=float, default=2000, help="messages a second")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=100, help="messages per /publish request")
    ap.add_argument("--size", type=int, default=100, help="bytes per message")
    ap.add_argument("--no-nchan", action="store_true")
    ap.add_argument("--profile", metavar="DIR", help="py-spy a fast-path server into DIR")
    ap.add_argument("--floors", action="store_true",
                    help="also measure bench/publish_floor.py's bare servers (single sends)")
    ap.add_argument("--also", metavar="NAME=DIR", action="append", default=[],
                    help="also measure the pool-mode fast path of the checkout in DIR")
    args = ap.parse_args()
    also = [item.partition("=")[::2] for item in args.also]
    for name, path in also:
        if not name or not (Path(path) / "bin" / "cometd").is_file():
            ap.error(f"--also {name}={path}: want NAME=DIR, DIR a cometd checkout")
    os.sched_setaffinity(0, {CLIENT_CPU})
    tmp = Path(tempfile.mkdtemp(prefix="bench-publish-"))
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        for mode in ("pool", "greenlet"):
            servers[f"cometd {mode}, fast path"] = start_cometd(tmp, f"{mode}-fast", mode, [])
            servers[f"cometd {mode}, bottle"] = start_cometd(tmp, f"{mode}-bottle", mode,
                                                             ["--no-fast-publish"])
        for i, (name, path) in enumerate(also):
            servers[f"{name} pool, fast path"] = start_cometd(tmp, f"also-{i}", "pool", [],
                                                              Path(path).resolve())
        if args.floors:
            for kind, label in FLOORS:
                servers[label] = start_floor(tmp, kind)
        nginx = None if args.no_nchan else nchan_available()
        if nginx:
            servers["nginx + nchan"] = start_nchan(nginx, tmp)
        single = requests(args.count, args.size, 1)
        batched = requests(args.count, args.size, args.batch)
        one: dict[str, list[float]] = {name: [] for name in servers}
        many: dict[str, list[float]] = {name: [] for name in servers if name != "nginx + nchan"}
        for _ in range(args.rounds):
            for name, (proc, port) in servers.items():
                one[name].append(run_round(port, proc.pid, single, args.rate))
                if name in many:
                    many[name].append(run_round(port, proc.pid, batched, args.rate))
        print_table(f"POST /send, {args.count} × {args.size} B at {args.rate:g}/s, "
                    f"nobody online ({args.rounds} rounds)", one, "nginx + nchan")
        print()
        many_ref = {**many, "nginx + nchan (single /send)": one["nginx + nchan"]} if nginx else many
        print_table(f"POST /publish, {args.batch} a request, same messages", many_ref,
                    "nginx + nchan (single /send)")
        print(json.dumps({"single": one, "batch": many}), file=sys.stderr)
        if args.profile:
            out = Path(args.profile)
            out.mkdir(parents=True, exist_ok=True)
            proc, port = start_cometd(tmp, "profiled", "pool", [])
            servers["profiled"] = (proc, port)
            print()
            profile(port, proc.pid, single, args.rate, out / "single.txt",
                    "pool, fast path, POST /send")
            profile(port, proc.pid, batched, args.rate, out / "batch.txt",
                    f"pool, fast path, POST /publish of {args.batch}")
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
