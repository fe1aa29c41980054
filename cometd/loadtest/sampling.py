"""Samplers: the server's RSS and CPU, the kernel's socket memory, over time.

Theory of operation
-------------------
*What is measured.* A sample holds, for the server under test (its process and
any children: nginx's master and worker), the resident set size and the
user+system CPU seconds (psutil); system-wide, ``Slab`` and ``SUnreclaim`` from
``/proc/meminfo`` and the ``TCP: inuse / tw / mem`` counters of
``/proc/net/sockstat`` (``mem`` is in pages); and the server's own connection
count (``GET /stats`` for cometd, ``subscribers:`` of nchan's stub status).
Kernel figures are system-wide and loopback connections have two ends, so the
kernel cost per connection is that of both ends (client and server socket), as
in the baselines it is compared with.

*CPU.* The load tools share the machine's cores with the server, so server
CPU is the server process's own CPU time (psutil), never the machine's.
"""

from __future__ import annotations

import glob
import os
import statistics
import subprocess
import threading
import time
from typing import Any

import psutil

from cometd.loadtest.procs import log
from cometd.loadtest.servers import Server

__all__ = [
    "schedstat_cpu_ns",
    "PAGE", "kernel_counters", "Sampler", "median_of", "wait_quiet", "wait_conns",
    "samples_between", "cpu_pct",
]


PAGE = os.sysconf("SC_PAGE_SIZE")


def schedstat_cpu_ns(pid: int) -> int:
    """CPU time of every thread of *pid* in ns, from schedstat: exact, not in 10 ms ticks."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
        except OSError:
            pass  # a thread that just ended
    return total


def kernel_counters() -> dict[str, int]:
    """System-wide kernel memory and TCP counters, in bytes (``tcp_*`` counts are counts)."""
    out = {"slab": 0, "sunreclaim": 0, "tcp_inuse": 0, "tcp_tw": 0, "tcp_mem": 0}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key == "Slab":
                out["slab"] = int(rest.split()[0]) * 1024
            elif key == "SUnreclaim":
                out["sunreclaim"] = int(rest.split()[0]) * 1024
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()[1:]
                vals = dict(zip(fields[::2], fields[1::2], strict=False))
                out["tcp_inuse"] = int(vals.get("inuse", 0))
                out["tcp_tw"] = int(vals.get("tw", 0))
                out["tcp_mem"] = int(vals.get("mem", 0)) * PAGE
    return out


class Sampler(threading.Thread):
    """Samples *server* and the kernel every *interval* seconds into ``samples``.

    ``clients`` (psutil processes, e.g. msggen and floodtest) are sampled for CPU
    too, so a report can tell which process was the bottleneck.
    """

    def __init__(self, server: Server, interval: float, t0: float | None = None) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.interval = interval
        self.t0 = time.monotonic() if t0 is None else t0
        self.samples: list[dict[str, Any]] = []
        self.clients: dict[str, psutil.Process] = {}
        self.phase = ""
        self._last_client: dict[str, float] = {}
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def watch(self, role: str, proc: subprocess.Popen | None) -> None:
        with self._lock:
            self._last_client.pop(role, None)
            if proc is None:
                self.clients.pop(role, None)
                return
            try:
                self.clients[role] = psutil.Process(proc.pid)
            except psutil.Error:
                pass

    def _client_cpu(self) -> dict[str, float]:
        out = {}
        with self._lock:
            clients = dict(self.clients)
        for role, p in clients.items():
            try:
                total = 0.0
                for q in [p, *p.children(recursive=True)]:
                    t = q.cpu_times()
                    total += t.user + t.system
                out[role] = self._last_client[role] = total
            except psutil.Error:  # exited: keep its last figure
                if role in self._last_client:
                    out[role] = self._last_client[role]
        return out

    def take(self) -> dict[str, Any]:
        t = time.monotonic()
        rss, cpu = self.server.usage()
        ct = psutil.cpu_times()
        busy = sum(ct) - ct.idle - getattr(ct, "iowait", 0.0)
        sample = {"t": t - self.t0, "phase": self.phase, "rss": rss, "cpu": cpu, "busy": busy,
                  **kernel_counters(), **self.server.counters(),
                  "client_cpu": self._client_cpu()}
        self.samples.append(sample)
        return sample

    def run(self) -> None:
        next_t = time.monotonic()
        while not self._halt.is_set():
            self.take()
            next_t += self.interval
            delay = next_t - time.monotonic()
            if delay < 0:
                next_t = time.monotonic()
                delay = 0
            self._halt.wait(delay)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def since(self, t: float) -> list[dict[str, Any]]:
        return [s for s in self.samples if s["t"] >= t]

    def now(self) -> float:
        return time.monotonic() - self.t0


def median_of(samples: list[dict], key: str) -> float:
    vals = [s[key] for s in samples if s.get(key) is not None]
    return float(statistics.median(vals)) if vals else float("nan")


def wait_quiet(max_wait: float, threshold: int = 1000) -> None:
    """Wait (at most *max_wait* s) until TIME_WAIT sockets from earlier runs have drained."""
    deadline = time.monotonic() + max_wait
    last_log = 0.0
    while time.monotonic() < deadline:
        tw = kernel_counters()["tcp_tw"]
        if tw <= threshold:
            return
        if time.monotonic() - last_log > 10:
            log(f"waiting for {tw} TIME_WAIT sockets to expire (at most "
                f"{deadline - time.monotonic():.0f}s more)")
            last_log = time.monotonic()
        time.sleep(1)


def wait_conns(server: Server, target: int, proc: subprocess.Popen, timeout: float,
               stall: float = 8.0, what: str = "connections",
               points: list[tuple[float, int]] | None = None, poll: float = 0.05) -> int:
    """Wait until *server* holds *target* connections (or stalls, or *proc* ends).

    Polls the server's own count every *poll* seconds; appends (monotonic time,
    count) to *points* when given.
    """
    deadline = time.monotonic() + timeout
    best, best_t, last_log, conns = -1, time.monotonic(), time.monotonic(), -1
    while time.monotonic() < deadline:
        c = server.counters().get("conns")
        now = time.monotonic()
        conns = c if c is not None else -1
        if points is not None and c is not None:
            points.append((now, c))
        if conns >= target:
            return conns
        if conns > best:
            best, best_t = conns, now
        elif now - best_t > stall:
            log(f"{what}: stuck at {conns}/{target} for {stall:g}s; going on")
            return conns
        if proc.poll() is not None:
            log(f"{what}: the client exited (code {proc.returncode}) at {conns}/{target}")
            return conns
        if now - last_log > 2:
            log(f"{server.label}: {max(conns, 0)}/{target} {what}")
            last_log = now
        time.sleep(poll)
    log(f"{what}: timed out at {best}/{target}")
    return max(best, conns)


def samples_between(sampler: Sampler, t0: float, t1: float) -> list[dict]:
    return [s for s in sampler.samples if t0 <= s["t"] <= t1]


def cpu_pct(samples: list[dict], role: str | None = None) -> float | None:
    """CPU % (of one core) of the server, of a client *role*, or ``"machine"`` (all cores)."""
    if len(samples) < 2:
        return None
    a, b = samples[0], samples[-1]
    dt = b["t"] - a["t"]
    if dt <= 0:
        return None
    if role is None:
        return 100 * (b["cpu"] - a["cpu"]) / dt
    if role == "machine":
        return 100 * (b["busy"] - a["busy"]) / dt
    ca, cb = a["client_cpu"].get(role), b["client_cpu"].get(role)
    if ca is None or cb is None:
        return None
    return 100 * (cb - ca) / dt
