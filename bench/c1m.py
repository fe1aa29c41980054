#!/usr/bin/env python3
"""C1M: hold 1,000,000 concurrent comet streams on this one machine, then push messages.

Everything runs here: Redis (started by this script), one ``cometd router`` and
``--edges`` ``cometd edge --reuse-port`` processes sharing one port, and
``floodtest`` opening the streams from source addresses spread over 127.0.0.0/8
(127.1.0.1 ... , each address has its own ephemeral ports). Once every connect
has resolved, the connections are held for ``--hold`` seconds, then ``msggen``
publishes timestamped messages at ``--msg-rate`` for ``--msg-duration`` seconds
while the connections stay open, and floodtest measures delivery latency. As in
the seed, a message goes to its sender's friends: before the router starts,
``genfriends --m 15`` over the floodtest's user ids is loaded into its store
(``--friends``), so each message reaches ~30 streams on as many edges.

Every process here may hold at most 20,000 open files (hard limit), so the
server runs ~19,000 connections per edge (53 edges for 1M) and the client
~19,000 per floodtest process (53 processes).

The script applies the sysctls that ``cometd check-system --connections N --mode
MODE --workers EDGES --clients-here`` finds short (printed with ``--dry-run``;
see cometd/syscheck.py for each rule), saves the previous values and restores
them at the end, also on
Ctrl-C, SIGTERM, errors and the overall ``--timeout``; it kills every process it
started (each in its own session) and stops the Redis it started.

Results (Markdown, JSON, two PNGs) go to ``--out`` (default bench/results/c1m):

* server userland memory per connection: (edge + router RSS at full - at start) / connections,
  once before the messages and once after them
* kernel memory per connection: (Slab + sockstat TCP mem, delta) / connections.
  Both ends of every loopback connection are in this machine's kernel, so this
  is the cost of a client *and* a server socket.
* total memory used: MemAvailable at start - at full (server, client, kernel, Redis)
* ramp rate: first to last connect (floodtest), and floodtest start to all open (this
  script's own watch); delivery latency p50/p99/max (floodtest, msggen's ts= bodies)

Usage (heavy runs are serialised with other benchmarks)::

    flock /tmp/cometd-bench.lock .venv/bin/python bench/c1m.py
    .venv/bin/python bench/c1m.py --connections 20000 --edges 2 --out /tmp/c1m-small
    # on a shared machine: the net.* sysctls then change only inside the namespace
    ip netns add c1m && ip netns exec c1m ip link set lo up
    ip netns exec c1m .venv/bin/python bench/c1m.py --connections 20000 --edges 2
    .venv/bin/python bench/c1m.py --dry-run
    # in a network namespace of its own, with a TCP established hash sized for the run
    flock /tmp/cometd-bench.lock .venv/bin/python bench/c1m.py --netns
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import re
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil

from cometd.syscheck import PORTS_PER_SOURCE, Plan, Report, check, read_system

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cometd.lifecycle import free_port  # noqa: E402
from cometd.loadtest.procs import tool  # noqa: E402

STREAM = "cometd:messages"  # the stream msggen XADDs to and the router ingests
# Connections per edge (20,000 files per process, minus headroom): SO_REUSEPORT
# spreads them unevenly, and at 19,500 (52 edges) the fullest held 19,522-19,625
# of its ~19,800 cap in the 1M runs, so 53 edges leave ~2% more room.
PER_EDGE = 19_000
PER_CLIENT = 19_000  # connections per floodtest process
PER_SOURCE = PORTS_PER_SOURCE  # connections per source address (well inside 1024-65535)


def log(msg: str) -> None:
    print(f"c1m: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# sysctls
# --------------------------------------------------------------------------------------

def _sysctl_path(name: str) -> str:
    return "/proc/sys/" + name.replace(".", "/")


def read_sysctl(name: str) -> str | None:
    try:
        with open(_sysctl_path(name)) as f:
            return " ".join(f.read().split())
    except OSError:
        return None


def write_sysctl(name: str, value: str) -> None:
    with open(_sysctl_path(name), "w") as f:
        f.write(value)


def system_report(a: argparse.Namespace) -> Report:
    """cometd check-system's answer for this run: both ends of every connection are here."""
    return check(read_system(), Plan(a.connections, a.mode, a.edges, clients_here=True))


def apply_sysctls(sysctls: dict[str, str], saved: dict[str, str]) -> dict[str, str]:
    """Apply *sysctls*, recording previous values in *saved*; return what was applied."""
    applied = {}
    for name, value in sysctls.items():
        old = read_sysctl(name)
        if old is None:
            log(f"sysctl {name}: not present here, skipped")
            continue
        try:
            write_sysctl(name, value)
        except PermissionError:  # e.g. a global one seen from a network namespace
            log(f"sysctl {name}: read-only here, skipped")
            continue
        saved[name] = old
        applied[name] = value
    return applied


def restore_sysctls(saved: dict[str, str]) -> None:
    # conntrack: let entries of the closed connections expire before lowering the limit.
    old_ct = saved.get("net.netfilter.nf_conntrack_max")
    if old_ct:
        end = time.monotonic() + 30
        while time.monotonic() < end:
            count = read_sysctl("net.netfilter.nf_conntrack_count")
            if count is None or int(count) < int(old_ct) * 0.8:
                break
            time.sleep(1)
    for name, value in reversed(list(saved.items())):
        try:
            write_sysctl(name, value)
        except OSError as e:
            log(f"could not restore {name} = {value}: {e}")
    if saved:
        log(f"restored {len(saved)} sysctls")


# A network namespace of the run's own: the host's TCP established hash is
# sized at boot (here 262,144 buckets), and at 1M it holds both ends of every
# connection, 2M sockets: each packet's lookup walks a chain of ~8 of them
# (__inet_lookup_established, ~9% of the machine's CPU while messages flowed
# in attempt 10). A new namespace gets a table of tcp_child_ehash_entries.
CLONE_NEWNET = 0x40000000
# The scheduler's autogroups: with them, CPU is shared between sessions, not
# processes, and nice orders processes only within their session. Each process
# here starts a session of its own (floodtest's workers share one), so the
# router and Redis at nice -10 got an edge's share, and the 53 floodtest
# workers together as much as one edge: at 1M the router was running or
# runnable in 88% of py-spy's samples but had 0.23-0.35 of a core (attempt 10).
AUTOGROUP = "kernel.sched_autogroup_enabled"
EHASH = "net.ipv4.tcp_child_ehash_entries"


def ehash_size(connections: int) -> int:
    """Buckets for both ends of *connections* at a load of at most one (a power of two)."""
    return 1 << max(10, (2 * connections - 1).bit_length())


def enter_netns() -> int:
    """Move this process into a new network namespace, loopback up; return the old one's fd."""
    old = os.open("/proc/self/ns/net", os.O_RDONLY)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        os.close(old)
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    return old


def leave_netns(old: int) -> None:
    """Back to the namespace *old* (from enter_netns), so its sysctls can be restored."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(old, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns back to the previous network namespace failed")
    os.close(old)


# --------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------

def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    return out


def sockstat() -> dict[str, int]:
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()[1:]
                return {parts[i]: int(parts[i + 1]) for i in range(0, len(parts), 2)}
    return {}


#: kernel TCP counters (/proc/net/netstat TcpExt, /proc/net/snmp Tcp) that say who
#: drops, refuses or kills connections; c1m reports how much each grew
KERNEL_COUNTERS = (
    "ListenOverflows", "ListenDrops", "SyncookiesSent", "TCPReqQFullDrop",
    "TCPDeferAcceptDrop", "TCPAbortOnMemory", "TCPAbortOnTimeout", "TCPAbortOnClose",
    "TCPAbortOnData", "TCPMemoryPressures", "TCPTimeWaitOverflow", "TCPOrphanNoMem",
    "TCPSynRetrans", "AttemptFails", "EstabResets", "ActiveOpens", "PassiveOpens",
    "OutRsts")


def kernel_counters() -> dict[str, int]:
    """The machine's TCP counters named in :data:`KERNEL_COUNTERS`."""
    out = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            if names.split(":")[0] not in ("TcpExt", "Tcp"):
                continue
            for k, v in zip(names.split()[1:], values.split()[1:], strict=False):
                if k in KERNEL_COUNTERS:
                    out[k] = int(v)
    return out


_SAMPLE = re.compile(rb"^(cometd_(?:disconnects_total|rejected_requests_total|"
                     rb"streams_refused_total|connections|slow_consumers_dropped_total))"
                     rb"(?:\{([^}]*)\})? ([0-9.e+]+)$", re.M)
_SAMPLE_ANY = re.compile(rb"^(cometd_presence_(?:users|edges))(?:\{([^}]*)\})? ([0-9.e+]+)$",
                         re.M)


def edge_counts(url: str) -> dict:
    """What the edges say of their streams, from the metrics each shares in Redis.

    Streams ended by reason, requests and streams refused, and how evenly the
    shared port spread the streams (fewest and most on one edge).
    """
    import redis

    out: dict = {"disconnects": {}, "rejected": {}, "refused": {}, "slow": 0,
                 "edges": 0, "edge_conns_min": 0, "edge_conns_max": 0}
    try:
        r = redis.Redis.from_url(url)
        keys = list(r.scan_iter(match=b"cometd:metrics:edge:*", count=1000))
        texts = r.mget(keys) if keys else []
        router = [r.get(k) for k in r.scan_iter(match=b"cometd:metrics:router:*", count=100)]
    except redis.RedisError:
        return out
    # The router's presence, to set beside the edges' streams: a user the router
    # does not know online gets nothing routed (attempt 11's missing deliveries).
    for text in filter(None, router):
        for name, _labels, value in _SAMPLE_ANY.findall(text):
            if name in (b"cometd_presence_users", b"cometd_presence_edges"):
                out[name.decode().removeprefix("cometd_")] = int(float(value))
    per_edge = []
    for text in texts:
        if not text:
            continue
        conns = 0
        for name, labels, value in _SAMPLE.findall(text):
            n = int(float(value))
            label = labels.split(b'"')[1].decode() if labels else ""
            if name == b"cometd_connections":
                conns += n
            elif name == b"cometd_slow_consumers_dropped_total":
                out["slow"] += n
            else:
                kind = {b"cometd_disconnects_total": "disconnects",
                        b"cometd_rejected_requests_total": "rejected",
                        b"cometd_streams_refused_total": "refused"}[name]
                out[kind][label] = out[kind].get(label, 0) + n
        per_edge.append(conns)
    for kind in ("disconnects", "rejected", "refused"):
        out[kind] = {k: v for k, v in sorted(out[kind].items()) if v}
    if per_edge:
        out.update(edges=len(per_edge), edge_conns_min=min(per_edge),
                   edge_conns_max=max(per_edge))
    return out


def tree_rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs = [p] + p.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for q in procs:
            try:
                total += q.memory_info().rss
            except psutil.NoSuchProcess:
                pass
    return total


def cpu_seconds(pids: list[int], tree: bool = False) -> float:
    """User + system CPU seconds of *pids* (and, with *tree*, their children)."""
    total = 0.0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs = [p] + (p.children(recursive=True) if tree else [])
        except psutil.NoSuchProcess:
            continue
        for q in procs:
            try:
                t = q.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
    return total


def machine_cpu() -> dict[str, float]:
    """Seconds of CPU time spent by the whole machine, by /proc/stat column."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    hz = os.sysconf("SC_CLK_TCK")
    names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    return {k: int(v) / hz for k, v in zip(names, fields, strict=False)}


def ramp_resolved(tail: str, n: int) -> bool:
    """Whether floodtest's last progress line in *tail* has every one of its *n*
    connects resolved: open, or closed, or failed, and none still connecting.

    Not "none pending once the schedule is over": floodtest sends its request at
    connect, so nothing is pending while a late ramp still has connects to start
    (attempt 15 was taken as done at 978,431 of 1,000,000 that way).
    """
    m = re.findall(r"Open=(\d+) Closed=(\d+) .*?ConnectErrors=(\d+) Pending=(\d+)", tail)
    if not m:
        return False
    opened, closed, errors, pending = map(int, m[-1])
    return opened >= n or (pending == 0 and opened + closed + errors >= n)


def clock_cost() -> dict:
    """The kernel's clocksource and what one time.monotonic() costs here, user and system.

    Every event loop of the run reads the clock several times per connection and
    per delivery. Through the vDSO that is ~50-350 ns of user time; a clocksource
    the vDSO cannot read (or an unstable one) makes each read a system call, which
    would show as the user time of a ramp turning into system time.
    """
    path = "/sys/devices/system/clocksource/clocksource0/current_clocksource"
    try:
        with open(path) as f:
            source = f.read().strip()
    except OSError:
        source = None
    n = 200_000
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(n):
        time.monotonic()
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    return {"clocksource": source, "monotonic_ns": round((t1 - t0) / n * 1e9),
            "user_ns": round((r1.ru_utime - r0.ru_utime) / n * 1e9),
            "system_ns": round((r1.ru_stime - r0.ru_stime) / n * 1e9)}


def rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def wait_port(port: int, timeout: float, procs: list[subprocess.Popen]) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[:4]} exited with {p.returncode} during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"port {port} did not open within {timeout:.0f}s")


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------

class Timeout(Exception):
    pass


class Run:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.procs: list[subprocess.Popen] = []
        self.saved: dict[str, str] = {}
        self.applied: dict[str, str] = {}
        self.samples: list[dict] = []
        self.t0 = time.monotonic()
        self.tmp = tempfile.mkdtemp(prefix="c1m-")
        self.old_ns: int | None = None  # the network namespace to go back to (--netns)
        self.msggen_nice: int | None = None
        self.ehash: str | None = None
        self.clock: dict = {}

    # -- processes ---------------------------------------------------------------------
    def spawn(self, args: list[str], logname: str) -> subprocess.Popen:
        f = open(os.path.join(self.tmp, logname), "w")
        p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                             start_new_session=True)
        f.close()
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        end = time.monotonic() + 15
        for p in reversed(self.procs):
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            # the session may hold children (floodtest workers) even after p exited
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if p.poll() is None:
                p.wait(10)
        log(f"stopped {len(self.procs)} processes (and their sessions)")

    # -- sampling ----------------------------------------------------------------------
    def sample(self, phase: str) -> dict:
        mi, ss = meminfo(), sockstat()
        s = {
            "t": round(time.monotonic() - self.t0, 2),
            "phase": phase,
            "tcp_inuse": ss.get("inuse", 0),
            "tcp_tw": ss.get("tw", 0),
            "tcp_orphan": ss.get("orphan", 0),
            "kernel": kernel_counters(),
            "edge_counts": edge_counts(self.redis_url) if getattr(self, "redis_url", None)
            else {},
            "client": self.client_counts(),
            "tcp_mem_bytes": ss.get("mem", 0) * 4096,
            "slab_bytes": mi["Slab"],
            "mem_available": mi["MemAvailable"],
            "server_rss": rss(self.server_pids),
            "redis_rss": rss([self.redis.pid]),
            "client_rss": tree_rss([self.flood.pid]) if getattr(self, "flood", None) else 0,
            "client_open": self.client_open(),
            "cpu_s": {
                "edges": cpu_seconds(self.server_pids[1:]),
                "router": cpu_seconds(self.server_pids[:1]),
                "redis": cpu_seconds([self.redis.pid]),
                "floodtest": cpu_seconds([self.flood.pid], tree=True)
                if getattr(self, "flood", None) else 0.0,
                "msggen": self.msggen_cpu(),
                "machine": machine_cpu(),
            },
        }
        self.samples.append(s)
        return s

    def msggen_cpu(self) -> float:
        """msggen's CPU seconds so far, also once it has exited (and been reaped)."""
        if getattr(self, "msg", None) is None:
            return 0.0
        if self.msg.poll() is None:
            return cpu_seconds([self.msg.pid])
        # Reaped: only the children's rusage has it (msggen is the only child
        # that ends between its start and the sample after the messages).
        ru, ru0 = resource.getrusage(resource.RUSAGE_CHILDREN), self._children_ru
        return ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime

    def client_counts(self) -> dict[str, int]:
        """floodtest's last progress line: closed streams, connect errors, no response yet."""
        try:
            with open(os.path.join(self.tmp, "floodtest.log"), "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 2000))
                tail = f.read().decode(errors="replace")
        except OSError:
            return {}
        m = re.findall(r"Closed=(\d+).*?ConnectErrors=(\d+) Pending=(\d+) NoResponse=(-?\d+)",
                       tail)
        if not m:
            return {}
        return dict(zip(("closed", "connect_errors", "pending", "no_response"),
                        map(int, m[-1]), strict=True))

    def progress_lines(self) -> list[str]:
        """floodtest's progress lines so far."""
        try:
            with open(os.path.join(self.tmp, "floodtest.log")) as f:
                return re.findall(r"^\[.*Chunks=.*$", f.read(), re.M)
        except OSError:
            return []

    def received_all(self, seen: int) -> bool:
        """Whether a progress line after the first *seen* timed no message: an interval
        (3 s) with no delivery. Chunks do not say it: keep-alives go on."""
        return any(line.endswith("latency -") for line in self.progress_lines()[seen:])

    def client_open(self) -> int:
        try:
            with open(os.path.join(self.tmp, "floodtest.log")) as f:
                text = f.read()
        except OSError:
            return 0
        m = re.findall(r"Open=(\d+)", text)
        return int(m[-1]) if m else 0

    def progress(self, s: dict) -> None:
        b = self.base
        conns = max(0, (s["tcp_inuse"] - b["tcp_inuse"]) // 2)
        kern = s["slab_bytes"] + s["tcp_mem_bytes"] - b["slab_bytes"] - b["tcp_mem_bytes"]
        log(f"[{s['t']:7.1f}s] {s['phase']:<6} conns~{conns:,} (client Open={s['client_open']:,}) "
            f"server RSS {s['server_rss'] / 2**20:,.0f} MiB client RSS "
            f"{s['client_rss'] / 2**20:,.0f} MiB kernel +{kern / 2**20:,.0f} MiB "
            f"used +{(b['mem_available'] - s['mem_available']) / 2**20:,.0f} MiB")
        # Who ends or refuses streams: the kernel, the edges, floodtest (deltas).
        grown = {k: v - b["kernel"].get(k, 0) for k, v in s["kernel"].items()
                 if v != b["kernel"].get(k, 0) and k not in ("ActiveOpens", "PassiveOpens")}
        e = s["edge_counts"]
        log(f"           tw {s['tcp_tw']:,} orphan {s['tcp_orphan']:,} client {s['client']} "
            f"edges {e.get('edges')} ({e.get('edge_conns_min'):,}-{e.get('edge_conns_max'):,} "
            f"streams; router: {e.get('presence_users')} users online) "
            f"ended {e.get('disconnects')} refused {e.get('rejected')} "
            f"{e.get('refused')} kernel +{grown}")

    def check_deadline(self) -> None:
        if time.monotonic() - self.t0 > self.a.timeout:
            raise Timeout(f"overall timeout of {self.a.timeout:.0f}s reached")

    def watch(self, phase: str, until, every: float = 3.0) -> None:
        """Sample every *every* s until until() is true (checks the deadline)."""
        while True:
            self.check_deadline()
            s = self.sample(phase)
            self.progress(s)
            if until(s):
                return
            time.sleep(every)

    def load_friends(self, cometd: list[str], db: str) -> None:
        """genfriends over the floodtest's user ids, bulk-loaded into the router's store."""
        a = self.a
        path = os.path.join(self.tmp, "friends.txt")
        gen = [*tool("genfriends"), "--n", str(a.connections), "--m",
               str(a.friends), "--seed", "1", "--output", path]
        load = cometd + ["load", "--db", db, path]
        for name, cmd in (("genfriends", gen), ("load", load)):
            self.commands[name] = shlex.join(cmd)
            t = time.monotonic()
            with open(os.path.join(self.tmp, f"{name}.log"), "w") as out:
                done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                      timeout=max(60, a.timeout - (time.monotonic() - self.t0)))
            if done.returncode:
                raise RuntimeError(f"{name} failed ({done.returncode}); see {self.tmp}/{name}.log")
            log(f"{name}: {time.monotonic() - t:.1f}s")
        if not a.check:  # the delivery check reads it at the end
            os.remove(path)

    # -- main --------------------------------------------------------------------------
    def run(self) -> dict:
        a = self.a
        sysctls = system_report(self.a).sysctls
        if not a.autogroup:
            sysctls = {**sysctls, AUTOGROUP: "0"}
        if a.netns:
            sysctls = {**sysctls, EHASH: str(ehash_size(a.connections))}
        self.applied = apply_sysctls(sysctls, self.saved)
        log(f"applied {len(self.applied)} sysctls")
        if a.netns:
            self.old_ns = enter_netns()
            # A new namespace starts from the defaults of its own net.* sysctls:
            # set them again in it (it goes, and they with it, when the run ends).
            inside = {k: v for k, v in sysctls.items()
                      if k.startswith("net.") and k != EHASH and read_sysctl(k) is not None}
            apply_sysctls(inside, {})
            log(f"in a network namespace of its own, {len(inside)} of its sysctls set; TCP "
                f"established hash {read_sysctl('net.ipv4.tcp_ehash_entries')} buckets")
        self.ehash = read_sysctl("net.ipv4.tcp_ehash_entries")
        port, rport = free_port(), free_port()

        # Redis and the router are one process each that all 53 edges wait on:
        # among ~110 busy processes on two cores they got too small a share to
        # keep up with presence (see BENCHMARKS.md, C1M attempt 6).
        first = ["nice", "-n", str(a.router_nice)]
        self.redis = self.spawn([*first, "redis-server", "--port", str(rport),
                                 "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no", "--maxclients", "10000"],
                                "redis.log")
        wait_port(rport, 10, [self.redis])
        url = self.redis_url = f"redis://127.0.0.1:{rport}/0"
        cometd = [*tool("cometd")]
        db = os.path.join(self.tmp, "db")
        self.commands = {}
        if a.friends:
            self.load_friends(cometd, db)
        ingest = ["--ingest-stream", STREAM] if a.publish == "redis-stream" else []
        router = self.spawn(first + cometd + ["router", "--redis", url, "--db", db,
                                              "--admin-port", "-1", *ingest], "router.log")
        edges = [self.spawn(cometd + ["edge", "--redis", url, "--port", str(port),
                                      "--reuse-port", "--mode", a.mode,
                                      "--request-timeout", str(a.request_timeout),
                                      "--keepalive", str(a.keepalive)],
                            f"edge{i}.log")
                 for i in range(a.edges)]
        self.server_pids = [router.pid] + [e.pid for e in edges]
        wait_port(port, 60, [router, *edges])
        # every edge prints a banner once it serves
        end = time.monotonic() + 90
        while time.monotonic() < end:
            up = 0
            for i in range(a.edges):
                with open(os.path.join(self.tmp, f"edge{i}.log")) as f:
                    up += "listening" in f.read()
            if up == a.edges:
                break
            for p in [router, *edges]:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[2:4]} exited with {p.returncode}")
            time.sleep(0.5)
        else:
            raise RuntimeError(f"only {up}/{a.edges} edges came up")
        time.sleep(2)
        self.flood = None
        self.base = self.sample("idle")
        self.clock = clock_cost()
        log(f"server up on :{port} ({a.edges} edges, mode {a.mode}); baseline server RSS "
            f"{self.base['server_rss'] / 2**20:,.0f} MiB")

        n = a.connections
        nsrc = math.ceil(n / PER_SOURCE) + 1
        srcs = f"127.1.0.1-127.1.0.{nsrc}" if nsrc < 255 else f"127.1.0.1-127.1.{nsrc // 250}.250"
        # floodtest's hold starts when each worker's own connects finish, which
        # can be minutes before this script sees them all (at 951,215 of 1M, the
        # first workers ended their hold during the messages): so floodtest
        # holds until this script ends it (SIGTERM, after the messages).
        flood_hold = a.timeout
        flood_cmd = [*tool("floodtest"), "--port", str(port), "--n", str(n),
                     "--rate", str(a.ramp_rate), "--duration", str(flood_hold),
                     "--source-ips", srcs, "--processes", str(a.client_processes),
                     "--interval", "3", "--rst-close", "--connect-timeout", "30",
                     "--timeout", str(max(60, a.timeout - (time.monotonic() - self.t0) - 60)),
                     "--json", os.path.join(self.tmp, "floodtest.json")]
        if a.check:
            flood_cmd += ["--events", "--record", os.path.join(self.tmp, "received.txt")]
        self.commands["floodtest"] = shlex.join(flood_cmd)
        self.flood = self.spawn(flood_cmd, "floodtest.log")
        t_ramp = time.monotonic()

        def ramp_done(s: dict) -> bool:
            if self.flood.poll() is not None:
                raise RuntimeError(f"floodtest exited early ({self.flood.returncode}); see "
                                   f"{self.tmp}/floodtest.log")
            with open(os.path.join(self.tmp, "floodtest.log")) as f:
                return ramp_resolved(f.read()[-600:], n)

        self.watch("ramp", ramp_done)
        ramp_wall = time.monotonic() - t_ramp
        time.sleep(3)  # let the last RSS / slab settle
        self.full = self.sample("full")
        self.progress(self.full)
        hold_end = time.monotonic() + a.hold
        self.watch("hold", lambda s: time.monotonic() >= hold_end, every=5)
        self.held = self.sample("held")

        via = (["--via", "redis-stream", "--redis", url, "--stream", STREAM]
               if a.publish == "redis-stream" else ["--url", f"http://127.0.0.1:{port}"])
        check = ["--record", os.path.join(self.tmp, "published.txt")] if a.check else []
        msg_cmd = [*tool("msggen"), *via, *check,
                   "--rate", str(a.msg_rate), "--duration", str(a.msg_duration),
                   "--users", str(n), "--concurrency", str(a.msg_concurrency), "--interval", "5",
                   "--json", os.path.join(self.tmp, "msggen.json")]
        self.commands["msggen"] = shlex.join(msg_cmd)
        self._children_ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        # msggen is the offered load: at the edges' share (one process among
        # ~110 once autogroups are off) it published 1,068 of 3,300 msg/s.
        msg = self.msg = self.spawn(first + msg_cmd, "msggen.log")
        end = time.monotonic() + 2
        while _nice(msg.pid) != a.router_nice and time.monotonic() < end:
            time.sleep(0.01)  # nice(1) sets it, then execs msggen
        self.msggen_nice = _nice(msg.pid)
        self.watch("msgs", lambda s: msg.poll() is not None, every=3)
        if a.publish == "redis-stream":
            # What the router has not routed yet is still in the stream: let it
            # catch up (bounded) before the drain ends floodtest.
            behind_end = time.monotonic() + 120
            self.watch("behind", lambda s: stream_done(url) or time.monotonic() >= behind_end,
                       every=1)
        time.sleep(3)  # as after the ramp: let RSS / slab settle before the sample
        self.after_msgs = self.sample("after msgs")
        self.progress(self.after_msgs)
        # Routed is not received: once the router keeps up, the backlog is in the
        # edges' and floodtest's sockets (attempt 11: p50 9.5 s). So floodtest,
        # which holds until told (see flood_hold), is ended only once one of its
        # progress lines (3 s apart) times no message, or after 120 s.
        drain_end = time.monotonic() + 120
        seen = len(self.progress_lines())
        self.watch("drain", lambda s: self.flood.poll() is not None
                   or time.monotonic() >= drain_end or self.received_all(seen), every=1)
        if self.flood.poll() is None:
            self.flood.send_signal(signal.SIGTERM)  # it writes its summary, then exits
            # At 1M its workers' closes (and the edges' and the router's work on
            # them) took more than a minute: wait as long as the run may last.
            self.flood.wait(max(60.0, a.timeout - (time.monotonic() - self.t0)))
        with open(os.path.join(self.tmp, "floodtest.json")) as f:
            flood = json.load(f)
        with open(os.path.join(self.tmp, "msggen.json")) as f:
            mg = json.load(f)
        res = self.results(flood, mg, ramp_wall)
        if a.check:
            res["delivery_check"] = self.check_deliveries()
        return res

    def check_deliveries(self) -> str:
        """cometd-bench check: every message published reached every friend online, once."""
        t = self.tmp
        cmd = [sys.executable, "-m", "cometd.loadtest.cli", "check",
               os.path.join(t, "friends.txt"), os.path.join(t, "published.txt"),
               os.path.join(t, "received.txt"),
               "--users", f"1-{self.a.connections}"]
        self.commands["check"] = shlex.join(cmd)
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
        log(f"delivery check: {done.stdout.strip()}")
        return done.stdout.strip() or done.stderr.strip()

    def results(self, flood: dict, mg: dict, ramp_wall: float) -> dict:
        a, b, full = self.a, self.base, self.full
        conns = (full["tcp_inuse"] - b["tcp_inuse"]) // 2
        held_conns = (self.held["tcp_inuse"] - b["tcp_inuse"]) // 2
        server_delta = full["server_rss"] - b["server_rss"]
        kernel_delta = (full["slab_bytes"] + full["tcp_mem_bytes"]
                        - b["slab_bytes"] - b["tcp_mem_bytes"])
        used = b["mem_available"] - full["mem_available"]
        per = max(conns, 1)
        # The same figures once messages have flowed: buffers, queues and
        # caches grown by the deliveries stay in RSS and slab.
        am = self.after_msgs
        am_conns = (am["tcp_inuse"] - b["tcp_inuse"]) // 2
        am_per = max(am_conns, 1)
        def grown(later: dict) -> dict[str, int]:
            return {k: v - b["kernel"].get(k, 0) for k, v in later["kernel"].items()
                    if v != b["kernel"].get(k, 0)}

        return {
            "kernel_counters_ramp": grown(full),
            "kernel_counters_run": grown(am),
            "tcp_tw_max": max(s["tcp_tw"] for s in self.samples),
            "edge_counts_full": full["edge_counts"],
            "edge_counts_after_msgs": am["edge_counts"],
            "ramp_cpu_us_per_conn": ramp_cpu(b, full, per),
            "connections_target": a.connections,
            "connections_held": conns,
            "connections_after_hold": held_conns,
            "client_open_max": flood.get("open_max"),
            "hold_s": a.hold,
            "edges": a.edges,
            "keepalive_s": a.keepalive,
            "hold_cpu_cores": hold_cpu(full, self.held),
            "msgs_cpu_us_per_delivery": msgs_cpu(self.held, am, flood.get("messages") or 0),
            "router_nice": _nice(self.server_pids[0]),
            "msggen_nice": self.msggen_nice,
            "autogroup": read_sysctl(AUTOGROUP),
            "client_processes": a.client_processes,
            "mode": a.mode,
            "ramp_rate_target": a.ramp_rate,
            "ramp_rate": flood.get("ramp_rate"),
            "ramp_s": flood.get("ramp_s"),
            "ramp_wall_s": round(ramp_wall, 1),
            "ramp_rate_wall": round(flood.get("opened", 0) / ramp_wall, 1) if ramp_wall else None,
            "connect_errors": flood.get("connect_errors"),
            "connect_errors_by_errno": flood.get("connect_errors_by_errno"),
            "resets": flood.get("resets"),
            "closed_early": flood.get("closed"),
            "server_rss_baseline_bytes": b["server_rss"],
            "server_rss_full_bytes": full["server_rss"],
            "server_userland_bytes_per_conn": round(server_delta / per),
            "kernel_bytes_per_conn": round(kernel_delta / per),
            "connections_after_msgs": am_conns,
            "server_rss_after_msgs_bytes": am["server_rss"],
            "server_userland_bytes_per_conn_after_msgs":
                round((am["server_rss"] - b["server_rss"]) / am_per),
            "kernel_bytes_per_conn_after_msgs":
                round((am["slab_bytes"] + am["tcp_mem_bytes"] - b["slab_bytes"]
                       - b["tcp_mem_bytes"]) / am_per),
            "client_rss_after_msgs_bytes": am["client_rss"],
            "total_bytes_per_conn_after_msgs":
                round((b["mem_available"] - am["mem_available"]) / am_per),
            "slab_delta_bytes": full["slab_bytes"] - b["slab_bytes"],
            "tcp_mem_delta_bytes": full["tcp_mem_bytes"] - b["tcp_mem_bytes"],
            "client_rss_full_bytes": full["client_rss"],
            "client_bytes_per_conn": flood.get("rss_bytes_per_conn"),
            "redis_rss_full_bytes": full["redis_rss"],
            "total_mem_used_bytes": used,
            "total_bytes_per_conn": round(used / per),
            "msg_rate_target": a.msg_rate,
            "publish": a.publish,
            "msg_rate_achieved": mg.get("achieved_rate"),
            "msg_duration_s": a.msg_duration,
            "msgs_sent": mg.get("sent"),
            "msg_errors": mg.get("errors"),
            "msgs_missed": mg.get("missed"),
            "friends_m": a.friends,
            "msg_deliveries_reported": mg.get("deliveries"),
            "msgs_received": flood.get("messages"),
            "delivery_latency_ms": flood.get("latency_ms"),
            "post_latency_ms": mg.get("latency_ms"),
            "wall_s": round(time.monotonic() - self.t0, 1),
            "commands": self.commands,
            "sysctls": self.applied,
            "netns": a.netns,
            "tcp_ehash_entries": int(self.ehash) if self.ehash else None,
            "clock": self.clock,
            "sysctls_previous": dict(self.saved),
            "floodtest": flood,
            "msggen": mg,
        }


def stream_done(url: str) -> bool:
    """Whether the router's group has read and acked every entry of the stream."""
    import redis

    try:
        for group in redis.Redis.from_url(url).xinfo_groups(STREAM):
            return not group["pending"] and not group["lag"]
    except redis.RedisError:
        pass
    return True


def _nice(pid: int) -> int | None:
    try:
        return psutil.Process(pid).nice()
    except psutil.NoSuchProcess:
        return None


def hold_cpu(full: dict, held: dict) -> dict[str, float]:
    """Cores busy by process group while the streams were only held (no ramp, no messages):
    keep-alives and the edges' periodic work."""
    dt = max(held["t"] - full["t"], 1e-9)
    out = {g: (held["cpu_s"][g] - full["cpu_s"][g]) / dt
           for g in ("edges", "router", "redis", "floodtest")}
    mf, mh = full["cpu_s"]["machine"], held["cpu_s"]["machine"]
    for col in ("user", "system", "softirq", "idle", "steal"):
        out[f"machine_{col}"] = (mh[col] - mf[col]) / dt
    return {k: round(v, 3) for k, v in out.items()}


GROUPS = ("edges", "router", "redis", "floodtest", "msggen")


def msgs_cpu(held: dict, after: dict, deliveries: int) -> dict[str, float]:
    """CPU microseconds per delivery received, from the end of the hold to 3 s after
    the last message was routed, by process group; 'rest' is the machine's busy time
    (every /proc/stat column but idle, iowait and steal) less those groups': the kernel's
    softirq work not charged to a process, other processes, other engineers' work.
    """
    per = max(deliveries, 1)
    out = {g: (after["cpu_s"].get(g, 0.0) - held["cpu_s"].get(g, 0.0)) * 1e6 / per
           for g in GROUPS}
    mh, ma = held["cpu_s"]["machine"], after["cpu_s"]["machine"]
    busy = sum(ma[c] - mh[c] for c in ma if c not in ("idle", "iowait", "steal"))
    out["rest"] = busy * 1e6 / per - sum(out.values())
    out["machine_busy"] = busy * 1e6 / per
    for col in ("user", "system", "softirq", "steal"):  # the kernel's share, as in ramp_cpu
        out[f"machine_{col}"] = (ma[col] - mh[col]) * 1e6 / per
    out["machine_idle_cores"] = (ma["idle"] - mh["idle"]) / max(after["t"] - held["t"], 1e-9)
    out["seconds"] = after["t"] - held["t"]
    return {k: round(v, 2) for k, v in out.items()}


def ramp_cpu(base: dict, full: dict, conns: int) -> dict[str, float]:
    """CPU microseconds per connection spent from the first connect to all open.

    By process group ('rest' as in msgs_cpu), and for the whole machine by
    /proc/stat column: the kernel's share of the handshakes shows up in
    'system' and 'softirq', a busy hypervisor in 'steal'.
    """
    out = {}
    for group in ("edges", "router", "redis", "floodtest"):
        out[group] = (full["cpu_s"][group] - base["cpu_s"][group]) * 1e6 / conns
    mb, mf = base["cpu_s"]["machine"], full["cpu_s"]["machine"]
    busy = sum(mf[c] - mb[c] for c in mf if c not in ("idle", "iowait", "steal"))
    out["rest"] = busy * 1e6 / conns - sum(out.values())  # as in msgs_cpu
    out["machine_busy"] = busy * 1e6 / conns
    # steal: time the hypervisor gave another guest while ours wanted to run (attempt
    # 13's slow ramp had 0.11 cores of it, attempt 12's none)
    for col in ("user", "system", "softirq", "idle", "steal"):
        out[f"machine_{col}"] = (mf[col] - mb[col]) * 1e6 / conns
    return {k: round(v, 1) for k, v in out.items()}


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------

def _mib(x: float) -> str:
    return f"{x / 2**20:,.0f} MiB"


def _reported(res: dict) -> str:
    """The server's own delivery count: only POST /send answers carry one (an XADD gets none)."""
    if res["publish"] == "redis-stream":
        return "not reported by the server (published by XADD, which answers no count; "
    n = res["msg_deliveries_reported"]
    return f"{n:,} reported by the server ({n / max(res['msgs_sent'], 1):.1f} per message; "


def _friends(m: int) -> str:
    if not m:
        return "no friends graph: to the sender's own stream"
    return f"to the sender and its friends, genfriends --m {m}"


def write_report(out: str, res: dict, samples: list[dict], argv: list[str]) -> None:
    os.makedirs(out, exist_ok=True)
    res = dict(res, command=argv, samples=samples)
    with open(os.path.join(out, "c1m.json"), "w") as f:
        json.dump(res, f, indent=1)
    plots(out, samples)
    lat, plat = res["delivery_latency_ms"] or {}, res["post_latency_ms"] or {}
    n = res["connections_held"]
    ec, ea = res["edge_counts_full"], res["edge_counts_after_msgs"]
    title = "C1M" if n >= 1_000_000 else f"C1M harness at {n:,} connections (not 1M)"
    lines = [
        f"# {title}",
        "",
        "Server (Redis + 1 router + edges sharing one port, SO_REUSEPORT) and the floodtest",
        "client on the same 2-core, 24 GB Debian 12 machine, over loopback; source addresses",
        "127.1.0.x (127.0.0.0/8). Produced by `bench/c1m.py`.",
        "",
        "Command:",
        "",
        "```",
        " ".join(shlex.quote(x) for x in argv),
        "```",
        "",
        "| | |",
        "|---|---|",
        f"| connections held | {n:,} (target {res['connections_target']:,}; "
        f"{res['connections_after_hold']:,} still open after the hold) |",
        f"| hold | {res['hold_s']} s, then messages for {res['msg_duration_s']} s |",
        "| network namespace | " + ("its own (--netns)" if res["netns"] else "the caller's")
        + f", TCP established hash {res['tcp_ehash_entries']} buckets (negative: shared with "
        "the host's) |",
        f"| clock (before the ramp) | {res['clock']['clocksource']}: time.monotonic() "
        f"{res['clock']['monotonic_ns']} ns (user {res['clock']['user_ns']}, system "
        f"{res['clock']['system_ns']}) |",
        f"| edges / client processes | {res['edges']} ({res['mode']} mode, keep-alive "
        f"{res['keepalive_s']:g} s; router, Redis and msggen at nice {res['router_nice']}, "
        f"{AUTOGROUP} {res['autogroup']}) / "
        f"{res['client_processes']} |",
        "| cores busy during the hold | "
        + ", ".join(f"{k} {v:g}" for k, v in res["hold_cpu_cores"].items()) + " |",
        f"| ramp rate, first to last connect (floodtest) | {res['ramp_rate']:,} conn/s "
        f"(target {res['ramp_rate_target']:,}); ramp {res['ramp_s']} s |",
        f"| ramp rate, floodtest start to all open (this script's watch, 3 s samples) | "
        f"{res['ramp_rate_wall']:,} conn/s over {res['ramp_wall_s']} s |",
        "| CPU per delivery received, end of the hold to 3 s after the last routed (µs) | "
        + ", ".join(f"{k} {v:,}" for k, v in res["msgs_cpu_us_per_delivery"].items()) + " |",
        "| ramp CPU per connection (µs) | "
        + ", ".join(f"{k} {v:,}" for k, v in res["ramp_cpu_us_per_conn"].items()) + " |",
        f"| connect errors | {res['connect_errors']} {res['connect_errors_by_errno'] or ''} |",
        f"| server userland per connection | {res['server_userland_bytes_per_conn']:,} B "
        f"(edge+router RSS {_mib(res['server_rss_baseline_bytes'])} -> "
        f"{_mib(res['server_rss_full_bytes'])}) |",
        f"| kernel per connection (both loopback ends) | {res['kernel_bytes_per_conn']:,} B "
        f"(Slab +{_mib(res['slab_delta_bytes'])}, TCP mem +{_mib(res['tcp_mem_delta_bytes'])}) |",
        f"| after the messages ({res['connections_after_msgs']:,} connections): server "
        f"userland / kernel / total per connection | "
        f"{res['server_userland_bytes_per_conn_after_msgs']:,} B (edge+router RSS "
        f"{_mib(res['server_rss_after_msgs_bytes'])}) / "
        f"{res['kernel_bytes_per_conn_after_msgs']:,} B / "
        f"{res['total_bytes_per_conn_after_msgs']:,} B |",
        f"| streams per edge when all were open (fewest-most) | "
        f"{ec.get('edge_conns_min', 0):,}-{ec.get('edge_conns_max', 0):,} over "
        f"{ec.get('edges', 0)} edges |",
        f"| users online as the router knows, when all were open / after the messages | "
        f"{ec.get('presence_users')} / {ea.get('presence_users')} (over "
        f"{ec.get('presence_edges')} / {ea.get('presence_edges')} edges) |",
        f"| streams ended on the edges, by reason (end of the run) | "
        f"{ea.get('disconnects') or 'none'}; slow consumers {ea.get('slow', 0)} |",
        f"| requests / streams refused by the edges (end of the run) | "
        f"{ea.get('rejected') or 'none'} / {ea.get('refused') or 'none'} |",
        f"| kernel TCP counters grown, ramp / whole run | {res['kernel_counters_ramp']} / "
        f"{res['kernel_counters_run']}; TIME_WAIT at most {res['tcp_tw_max']:,} |",
        f"| client userland per connection | {res['client_bytes_per_conn']} B "
        f"(floodtest RSS {_mib(res['client_rss_full_bytes'])}) |",
        f"| Redis RSS | {_mib(res['redis_rss_full_bytes'])} |",
        f"| total memory used (MemAvailable delta) | {_mib(res['total_mem_used_bytes'])} "
        f"= {res['total_bytes_per_conn']:,} B per connection |",
        f"| messages | {res['msgs_sent']:,} sent at {res['msg_rate_achieved']}/s "
        f"(target {res['msg_rate_target']}/s), {res['msg_errors']} errors, "
        f"{res['msgs_missed']} missed |",
        f"| deliveries | {_reported(res)}"
        f"{_friends(res['friends_m'])}), {res['msgs_received']:,} received by floodtest "
        f"({res['msgs_received'] / max(res['msg_duration_s'], 1e-9):,.0f}/s if divided by the "
        f"{res['msg_duration_s']:g} s of publishing; "
        f"{res['msgs_received'] / max(res['msg_duration_s'] + lat.get('max', 0) / 1000, 1e-9):,.0f}"
        f"/s over those and the latest delivery's delay) |",
        f"| published via | {res['publish']} |",
        f"| delivery check (cometd-bench check) | "
        f"{res.get('delivery_check', 'not run (--check)')} |",
        f"| delivery latency (send -> client) | p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, "
        f"max {lat.get('max')} ms |",
        f"| publish latency (POST /send or XADD) | p50 {plat.get('p50')} ms, "
        f"p99 {plat.get('p99')} ms, "
        f"max {plat.get('max')} ms |",
        f"| wall time | {res['wall_s']} s |",
        "",
        "Userland = (sum of edge + router RSS when all connections are open) - (the same before",
        "the first connect), divided by the connections; sampled 3 s after the ramp and again",
        "3 s after msggen ends, each divided by the connections open at that sample. Kernel =",
        "delta of /proc/meminfo Slab plus /proc/net/sockstat TCP mem pages; it includes both the",
        "client and the server socket of each loopback connection. Connections are counted as",
        "(TCP inuse delta) / 2.",
        "",
        "![connections](connections.png)",
        "",
        "![memory](memory.png)",
        "",
        "## sysctls applied (restored afterwards)",
        "",
        "| sysctl | applied | previous |",
        "|---|---|---|",
    ]
    for k, v in res["sysctls"].items():
        lines.append(f"| {k} | {v} | {res['sysctls_previous'].get(k)} |")
    lines += ["", "Sub-commands as run:", "", "```"]
    lines += [f"{k}: {v}" for k, v in res["commands"].items()]
    lines += ["```", ""]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines))


def plots(out: str, samples: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = samples[0]
    t = [s["t"] for s in samples]
    conns = [max(0, (s["tcp_inuse"] - b["tcp_inuse"]) // 2) for s in samples]
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=80)
    ax.plot(t, conns, label="connections (TCP inuse delta / 2)")
    ax.plot(t, [s["client_open"] for s in samples], "--", label="floodtest Open")
    _finish(plt, fig, ax, samples, "connections", "lower right",
            os.path.join(out, "connections.png"))

    g = 2 ** 30
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=80)
    ax.plot(t, [(b["mem_available"] - s["mem_available"]) / g for s in samples],
            label="total used (MemAvailable delta)")
    ax.plot(t, [(s["slab_bytes"] + s["tcp_mem_bytes"] - b["slab_bytes"] - b["tcp_mem_bytes"]) / g
                for s in samples], label="kernel (Slab + TCP mem delta)")
    ax.plot(t, [s["server_rss"] / g for s in samples], label="server RSS (edges + router)")
    ax.plot(t, [s["client_rss"] / g for s in samples], label="floodtest RSS")
    _finish(plt, fig, ax, samples, "GiB", "upper left", os.path.join(out, "memory.png"))


def _finish(plt, fig, ax, samples: list[dict], ylabel: str, legend: str, path: str) -> None:
    """Phase markers, labels, legend and grid; save the graph to *path*."""
    _phases(ax, samples)
    ax.set_xlabel("seconds")
    ax.set_ylabel(ylabel)
    ax.legend(loc=legend, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _phases(ax, samples: list[dict]) -> None:
    last = None
    for s in samples:
        if s["phase"] != last and s["phase"] in ("hold", "msgs", "behind", "drain"):
            ax.axvline(s["t"], color="grey", lw=0.8, ls=":")
            ax.text(s["t"], ax.get_ylim()[1] * 0.02, " " + s["phase"], fontsize=7, color="grey")
        last = s["phase"]


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--connections", type=int, default=1_000_000)
    p.add_argument("--edges", type=int, default=0,
                   help=f"edge processes (0: ceil(connections / {PER_EDGE}))")
    p.add_argument("--client-processes", type=int, default=0,
                   help=f"floodtest processes (0: ceil(connections / {PER_CLIENT}))")
    p.add_argument("--mode", choices=["pool", "greenlet"], default="pool")
    p.add_argument("--ramp-rate", type=float, default=8000.0,
                   help="floodtest --rate: new connections/s asked for (the report gives the "
                        "rate measured)")
    p.add_argument("--hold", type=float, default=60.0,
                   help="seconds to hold all connections before messages")
    p.add_argument("--msg-rate", type=float, default=1000.0, help="messages/s from msggen")
    p.add_argument("--friends", type=int, default=15, metavar="M",
                   help="friends graph the messages fan out over: genfriends --n CONNECTIONS "
                        "--m M (about 2M friends per user), loaded into the router's store "
                        "before it starts; 0: none, a message reaches its sender's stream only")
    p.add_argument("--request-timeout", type=float, default=60.0,
                   help="edges' --request-timeout: with ~100 processes on two cores, floodtest "
                        "can send a request line more than the default 10 s after its connect "
                        "(at 1M that closed 33,241 streams before their welcome)")
    p.add_argument("--keepalive", type=float, default=300.0,
                   help="edges' --keepalive: seconds between keep-alive comments on the SSE "
                        "streams --check uses (the seed's chunked streams had none); at 1M "
                        "the server's default of 25 s is 40,000 writes and reads a second "
                        "with no message at all, which kept 1.2 of the 2 cores busy while "
                        "951,273 streams were only held")
    p.add_argument("--router-nice", type=int, default=-10,
                   help="nice value of Redis and the router, the two processes every edge "
                        "waits on, and of msggen, the offered load (0: the same share as "
                        "each edge and floodtest process)")
    p.add_argument("--autogroup", action="store_true",
                   help=f"leave {AUTOGROUP} as it is; without this flag it is 0 for the run "
                        "(and restored), so that the scheduler shares CPU between processes "
                        "and --router-nice means what it says (with autogroups each session "
                        "gets one share, whatever its processes' nice values)")
    p.add_argument("--msg-duration", type=float, default=30.0)
    p.add_argument("--publish", choices=["redis-stream", "http"], default="redis-stream",
                   help="how msggen publishes: one XADD per message to the stream the router "
                        "ingests (--ingest-stream), or POST /send through the edges")
    p.add_argument("--check", action="store_true",
                   help="floodtest --events --record and msggen --record, then cometd-bench "
                        "check: every delivery expected arrived, once (the loss checker)")
    p.add_argument("--msg-concurrency", type=int, default=64,
                   help="msggen --concurrency: POSTs in flight (at 1M, 256 gave no more "
                        "messages than 64, only longer queues)")
    p.add_argument("--timeout", type=float, default=1440.0,
                   help="hard limit on the whole run in seconds (then everything is stopped)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "c1m"))
    p.add_argument("--netns", action="store_true",
                   help="run everything in a network namespace of its own, whose TCP "
                        "established hash is sized for both ends of every connection "
                        f"({EHASH}; the host's is fixed at boot: at 1M its chains are ~8 "
                        "sockets long); the host's net.* sysctls are set and restored too")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and the sysctls; change nothing")
    a = p.parse_args(argv)
    if a.edges <= 0:
        a.edges = math.ceil(a.connections / PER_EDGE)
    if a.client_processes <= 0:
        a.client_processes = math.ceil(a.connections / PER_CLIENT)
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    report = system_report(a)
    memory = next(f for f in report.findings if f.limit == "memory")
    plan = (f"plan: {a.connections:,} connections, {a.edges} edges ({a.mode}), "
            f"{a.client_processes} floodtest processes, ramp {a.ramp_rate:g}/s "
            f"(~{a.connections / a.ramp_rate:.0f}s), hold {a.hold:g}s, then {a.msg_rate:g} msg/s "
            f"for {a.msg_duration:g}s; timeout {a.timeout:g}s; out {a.out}")
    log(plan)
    log(f"memory estimate (cometd check-system): {memory.need} needed, {memory.now}")
    for error in report.errors:  # a limit it could not read may still stop the ramp
        log(f"check-system: {error}")
    if a.dry_run:
        for k, v in report.sysctls.items():
            log(f"  sysctl {k} = {v}   (now: {read_sysctl(k)})")
        return 0
    if not memory.ok:
        log("refusing to start: not enough free memory for this size "
            "(use fewer --connections)")
        return 2
    if os.geteuid() != 0:
        log("refusing to start: root is needed to apply the sysctls")
        return 2

    r = Run(a)
    res = None

    def _on_signal(sig, _frame):
        raise KeyboardInterrupt(f"signal {sig}")

    def _on_alarm(_sig, _frame):
        raise Timeout(f"overall timeout of {a.timeout:.0f}s reached")

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(int(a.timeout) + 30)  # backstop if a wait blocks past the deadline
    rc = 1
    try:
        res = r.run()
        rc = 0
    except (Timeout, KeyboardInterrupt, RuntimeError, OSError,
            subprocess.TimeoutExpired) as e:
        log(f"run aborted: {type(e).__name__}: {e}; logs in {r.tmp}")
    finally:
        signal.alarm(0)
        # cleanup must not be interrupted by a second Ctrl-C / TERM
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        try:
            r.stop_all()
        finally:
            if r.old_ns is not None:
                leave_netns(r.old_ns)
            restore_sysctls(r.saved)
    if res is not None:
        write_report(a.out, res, r.samples, ["bench/c1m.py", *argv])
        log(f"report: {a.out}/README.md; connections held {res['connections_held']:,}, "
            f"server {res['server_userland_bytes_per_conn']} B/conn, kernel "
            f"{res['kernel_bytes_per_conn']} B/conn, total used "
            f"{_mib(res['total_mem_used_bytes'])}, ramp {res['ramp_rate']}/s, latency "
            f"{res['delivery_latency_ms']}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
