"""``cometd check-system``: can this machine hold N connections, and what to change if not.

Three parts:

- :func:`read_system` reads the limits that matter (RLIMIT_NOFILE, fs.*,
  net.* sysctls, conntrack if loaded, memory, a cgroup memory limit) from a
  ``/proc`` and ``/sys`` tree, the real one or a fake one for tests;
- :func:`check` is pure: readings and a :class:`Plan` in, a :class:`Report`
  out, with one :class:`Finding` per limit, each with the fix for a shortfall;
- :func:`apply` writes the sysctl fixes and returns how to undo them.

``bench/c1m.py`` takes the sysctls it applies from here.

Theory of operation
-------------------
Every connection costs a descriptor in a server process and, when the
clients run here too (``clients_here``, as in ``bench/c1m.py``), another in a
client process: so file descriptors, ports and kernel memory count
*sockets*, twice the connections then. A process holds at most its
RLIMIT_NOFILE less :data:`HEADROOM` (the store, Redis, requests in
progress), so N sets the number of edge processes, as ``bench/c1m.py``
runs them. Each finding also says at how many connections its limit breaks
(``breaks_at``); the failing one with the smallest is what breaks first.
Memory is estimated from the per-connection figures measured in
BENCHMARKS.md; the send and receive buffer and ``tcp_mem`` findings are about
load, not the ramp: every stream with a message in flight holds at least a
page of socket buffer.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Plan", "Finding", "Report", "read_system", "check", "apply", "sysctl_path",
           "HEADROOM", "PORTS_PER_SOURCE", "SYSCTLS"]

KiB, MiB, GiB = 1024, 1024 ** 2, 1024 ** 3
PAGE = 4096
# Per-connection memory, BENCHMARKS.md "Idle connections" (server RSS per idle
# connection, medians of 3): pool 0.48 KiB, greenlet 6.66 KiB; kernel 9.73 KiB
# for both loopback ends, so ~half of it for a server socket alone.
USERLAND_BYTES = {"pool": int(0.48 * KiB), "greenlet": int(6.66 * KiB)}
KERNEL_BYTES_BOTH_ENDS = int(9.73 * KiB)
# BENCHMARKS.md "C1M": floodtest per connection, 275 B.
CLIENT_BYTES = 275
#: baseline RSS of one edge or floodtest process (bench/c1m.py's estimate)
PROCESS_BYTES = 45 * MiB
#: memory left over for everything else
SAFETY_BYTES = 2 * GiB
#: descriptors a server process keeps for other things than streams
HEADROOM = 500
#: a client process's: floodtest's own budget (cometd/floodtest.py)
CLIENT_HEADROOM = 1000
#: ephemeral ports a client source address uses (bench/c1m.py spreads sources so)
PORTS_PER_SOURCE = 20_000
#: cometd's listen backlog (cometd.lifecycle.listener); somaxconn caps it
LISTEN_BACKLOG = 4096
#: the sysctls read, by name
SYSCTLS = ("fs.file-max", "fs.nr_open", "fs.file-nr", "net.core.somaxconn",
           "net.ipv4.ip_local_port_range", "net.ipv4.tcp_mem", "net.ipv4.tcp_rmem",
           "net.ipv4.tcp_wmem", "net.ipv4.tcp_max_orphans", "net.ipv4.tcp_max_tw_buckets",
           "net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_count")


@dataclass(frozen=True)
class Plan:
    """What the operator plans: *connections* streams in *mode*."""

    connections: int
    mode: str = "pool"
    #: edge processes (None: as many as the descriptor limit needs)
    workers: int | None = None
    #: the clients run on this machine too (a load test over loopback)
    clients_here: bool = False


@dataclass
class Finding:
    """One limit: what it is, what the plan needs, and the fix if it falls short."""

    limit: str
    now: str
    need: str
    ok: bool
    #: connections at which it breaks (0: at once; None: not before the plan's N)
    breaks_at: int | None = None
    #: a shell line that fixes it (a ``sysctl -w`` or a ``ulimit``), when not ok
    fix: str | None = None
    why: str = ""
    #: the sysctl and value ``apply`` writes, when not ok
    sysctl: tuple[str, str] | None = None


@dataclass
class Report:
    plan: Plan
    findings: list[Finding]
    processes: int
    client_processes: int
    per_process: int
    memory_bytes: int
    memory_available: int
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and all(f.ok for f in self.findings)

    @property
    def first_to_break(self) -> Finding | None:
        failing = [f for f in self.findings if not f.ok]
        never = self.plan.connections  # None: not before the plan's N
        return min(failing, key=lambda f: never if f.breaks_at is None else f.breaks_at,
                   default=None)

    @property
    def sysctls(self) -> dict[str, str]:
        """The sysctl fixes, name -> value."""
        return dict(f.sysctl for f in self.findings if not f.ok and f.sysctl)

    def as_dict(self) -> dict[str, Any]:
        first = self.first_to_break
        return {
            "plan": asdict(self.plan), "ok": self.ok, "processes": self.processes,
            "client_processes": self.client_processes, "per_process": self.per_process,
            "memory_bytes": self.memory_bytes, "memory_available_bytes": self.memory_available,
            "first_to_break": first.limit if first else None,
            "findings": [{k: v for k, v in asdict(f).items() if k != "sysctl"}
                         for f in self.findings],
            "sysctls": self.sysctls, "errors": self.errors,
        }

    def text(self) -> str:
        p = self.plan
        lines = [f"plan: {p.connections:,} connections, mode {p.mode}"
                 + (", clients on this machine" if p.clients_here else "")]
        lines += [f"error: {e}" for e in self.errors]
        servers = (f"{self.processes - 1} edges + a router" if self.processes > 1
                   else "1 server")
        lines.append(f"processes: {servers} (up to {self.per_process:,} connections each)"
                     + (f"; {self.client_processes} client processes" if p.clients_here
                        else ""))
        lines.append(f"memory: ~{self.memory_bytes / GiB:.1f} GiB needed, "
                     f"{self.memory_available / GiB:.1f} GiB available")
        for f in self.findings:
            mark = "ok  " if f.ok else "SHORT"
            lines.append(f"{mark} {f.limit}: now {f.now}, needs {f.need}"
                         + (f" ({f.why})" if f.why and not f.ok else ""))
        first = self.first_to_break
        if first is None and not self.errors:
            lines.append(f"verdict: this machine can hold {p.connections:,} connections")
        else:
            if first is not None:
                at = "at once" if not first.breaks_at else f"near {first.breaks_at:,} connections"
                lines.append(f"verdict: NO; {first.limit} breaks first, {at} ({first.why})")
            fixes = [f.fix for f in self.findings if not f.ok and f.fix]
            if fixes:
                lines.append("fix (as root; cometd check-system --apply writes the sysctls):")
                lines += [f"  {fix}" for fix in fixes]
        return "\n".join(lines) + "\n"


def sysctl_path(name: str, proc_root: str = "/proc") -> str:
    return os.path.join(proc_root, "sys", *name.split("."))


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return " ".join(f.read().split())
    except OSError:
        return None


def read_system(proc_root: str = "/proc", sys_root: str = "/sys") -> dict[str, Any]:
    """This machine's readings (the sysctls by name; None for one that is absent)."""
    readings: dict[str, Any] = {name: _read(sysctl_path(name, proc_root)) for name in SYSCTLS}
    readings["nofile"] = None
    for line in _read_lines(os.path.join(proc_root, "self", "limits")):
        if line.startswith("Max open files"):
            words = line.split()
            try:
                readings["nofile"] = (_count(words[3]), _count(words[4]))
            except (IndexError, ValueError):
                pass
    meminfo = {}
    for line in _read_lines(os.path.join(proc_root, "meminfo")):
        name, _, rest = line.partition(":")
        if rest.split() and rest.split()[0].isdigit():
            meminfo[name] = int(rest.split()[0]) * KiB
    readings["mem_total"] = meminfo.get("MemTotal")
    readings["mem_available"] = meminfo.get("MemAvailable")
    cgroup = _read(os.path.join(sys_root, "fs", "cgroup", "memory.max"))
    readings["cgroup_memory_max"] = int(cgroup) if cgroup and cgroup.isdigit() else None
    readings["conntrack_loaded"] = os.path.isdir(os.path.join(sys_root, "module",
                                                              "nf_conntrack"))
    return readings


def _read_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except OSError:
        return []


def _count(word: str) -> int:
    return 1 << 62 if word == "unlimited" else int(word)


def _ints(value: str | None) -> list[int] | None:
    try:
        return [int(x) for x in value.split()] if value else None
    except ValueError:
        return None


def _round_up(n: float, step: int) -> int:
    return int(math.ceil(n / step) * step)


def check(readings: dict[str, Any], plan: Plan) -> Report:
    """The findings for *plan* on a machine with these *readings* (from :func:`read_system`)."""
    n = plan.connections
    errors: list[str] = []
    findings: list[Finding] = []
    sockets = 2 * n if plan.clients_here else n

    def need_sysctl(name: str) -> list[int] | None:
        values = _ints(readings.get(name))
        if values is None:
            errors.append(f"cannot read {name} (missing or not numbers: "
                          f"{readings.get(name)!r})")
        return values

    # -- descriptors per process, and so the processes -----------------------
    nofile = readings.get("nofile")
    if not nofile:
        errors.append("cannot read the open-file limit (Max open files in /proc/self/limits)")
        soft = hard = 1024
    else:
        soft, hard = nofile
    nr_open = (need_sysctl("fs.nr_open") or [1 << 20])[0]
    cap = max(hard - HEADROOM, 1)
    workers = plan.workers or max(1, math.ceil(n / cap))
    per_process = math.ceil(n / workers)
    fds = per_process + HEADROOM
    processes = workers + 1 if workers > 1 else 1  # a scale-out has a router too
    client_processes = math.ceil(n / max(hard - CLIENT_HEADROOM, 1)) if plan.clients_here else 0
    findings.append(Finding(
        "RLIMIT_NOFILE (soft)", f"{soft:,}", f"{fds:,}", soft >= fds,
        None if soft >= fds else workers * max(soft - HEADROOM, 0),
        None if soft >= fds else f"ulimit -n {fds}",
        "each process's open files: its connections plus headroom"))
    if fds > hard:
        findings.append(Finding(
            "RLIMIT_NOFILE (hard)", f"{hard:,}", f"{fds:,}", False, workers * cap,
            f"ulimit -Hn {fds}  # or nofile in /etc/security/limits.conf; or more --workers",
            "a process cannot raise its soft limit past it"))
    if fds > nr_open:
        value = str(_round_up(fds, 1 << 20))
        findings.append(Finding(
            "fs.nr_open", f"{nr_open:,}", f"{fds:,}", False, workers * (nr_open - HEADROOM),
            f"sysctl -w fs.nr_open={value}", "no process can have more open files",
            ("fs.nr_open", value)))
    # -- the whole machine's descriptors --------------------------------------
    file_max = need_sysctl("fs.file-max")
    in_use = (_ints(readings.get("fs.file-nr")) or [0])[0]
    if file_max is not None:
        need = in_use + sockets + (processes + client_processes) * HEADROOM
        ok = file_max[0] >= need
        value = str(_round_up(2 * need, 100_000))
        findings.append(Finding(
            "fs.file-max", f"{file_max[0]:,}", f"{need:,}", ok,
            None if ok else max(0, (file_max[0] - in_use) * n // max(need - in_use, 1)),
            None if ok else f"sysctl -w fs.file-max={value}",
            f"{in_use:,} open now, plus a descriptor per socket (kern.log: VFS: file-max "
            "limit reached)", ("fs.file-max", value)))
    somax = need_sysctl("net.core.somaxconn")
    if somax is not None:
        ok = somax[0] >= LISTEN_BACKLOG
        findings.append(Finding(
            "net.core.somaxconn", f"{somax[0]:,}", f"{LISTEN_BACKLOG:,}", ok,
            None if ok else 0, None if ok else f"sysctl -w net.core.somaxconn={LISTEN_BACKLOG}",
            "it caps cometd's listen backlog: a ramp burst beyond it is dropped SYNs",
            ("net.core.somaxconn", str(LISTEN_BACKLOG))))
    if plan.clients_here:
        ports = need_sysctl("net.ipv4.ip_local_port_range")
        if ports is not None and len(ports) == 2:
            have = ports[1] - ports[0] + 1
            want = min(n, PORTS_PER_SOURCE)
            ok = have >= want
            findings.append(Finding(
                "net.ipv4.ip_local_port_range", f"{ports[0]} {ports[1]} ({have:,} ports)",
                f"{want:,} ports per client source address "
                f"({math.ceil(n / PORTS_PER_SOURCE)} addresses)", ok,
                None if ok else have, None if ok else
                'sysctl -w net.ipv4.ip_local_port_range="1024 65535"',
                "each client connection from one source address takes an ephemeral port",
                ("net.ipv4.ip_local_port_range", "1024 65535")))
    # -- memory ------------------------------------------------------------------
    per_conn = USERLAND_BYTES.get(plan.mode, USERLAND_BYTES["greenlet"]) + (
        KERNEL_BYTES_BOTH_ENDS + CLIENT_BYTES if plan.clients_here
        else KERNEL_BYTES_BOTH_ENDS // 2)
    memory = n * per_conn + (processes + client_processes) * PROCESS_BYTES
    available = readings.get("mem_available")
    if available is None:
        errors.append("cannot read MemAvailable from meminfo")
        available = 0
    cgroup = readings.get("cgroup_memory_max")
    if cgroup is not None:
        available = min(available, cgroup)
    usable = available - SAFETY_BYTES
    ok = memory <= usable
    findings.append(Finding(
        "memory", f"{available / GiB:.1f} GiB available", f"{(memory + SAFETY_BYTES) / GiB:.1f} "
        "GiB", ok, None if ok else max(0, usable - (processes + client_processes)
                                         * PROCESS_BYTES) // per_conn,
        None if ok else "# fewer connections on this machine, or more memory",
        f"{per_conn:,} B a connection (BENCHMARKS.md), {PROCESS_BYTES // MiB} MiB a process, "
        f"{SAFETY_BYTES // GiB} GiB to spare"))
    # -- socket buffers under load ------------------------------------------------
    total = readings.get("mem_total") or available
    budget = total // 4  # what idle-ish socket buffers may take at most
    # The server's sockets send (wmem); only the clients' receive (rmem), and
    # they are this machine's only when they run here.
    buffers = [("net.ipv4.tcp_wmem", n)]
    if plan.clients_here:
        buffers.append(("net.ipv4.tcp_rmem", n))
    for name, count in buffers:
        values = need_sysctl(name)
        if values is None or len(values) != 3:
            continue
        default = values[1]
        ok = count * default <= budget
        fit = 1 << int(math.log2(max(budget // count, 1)))  # a power of two that fits
        fit = max(PAGE, min(fit, default))
        value = f"{PAGE} {fit} {4 * fit}"
        # when full buffers and the connections themselves no longer fit in memory
        room = usable - (processes + client_processes) * PROCESS_BYTES
        findings.append(Finding(
            name, " ".join(map(str, values)), f"a default of at most {budget // count:,} B",
            ok, None if ok else max(0, room) // (default + per_conn),
            None if ok else f'sysctl -w {name}="{value}"',
            f"{count:,} sockets with full default buffers (a slow or stalled reader each) "
            f"would take {count * default / GiB:.1f} GiB, over a quarter of memory",
            (name, value)))
    pages = sockets  # a page of buffered data on every socket
    limit = total // PAGE * 8 // 10
    value = " ".join(str(min(limit, pages * k // 2)) for k in (2, 3, 4))
    if readings.get("net.ipv4.tcp_mem") is None and readings.get("net.ipv4.tcp_wmem") is not None:
        # tcp_mem is global: a network namespace other than the host's has no
        # tcp_mem file at all, yet the host's limit still holds its sockets
        # (a 1M run stalled at ~690,000 that way, at the default maximum).
        errors.append("cannot read net.ipv4.tcp_mem: it is global and not visible in this "
                      "network namespace; in the host's, check it holds a maximum of "
                      f'{pages:,} pages (sysctl -w net.ipv4.tcp_mem="{value}")')
        tcp_mem = None
    else:
        tcp_mem = need_sysctl("net.ipv4.tcp_mem")
    if tcp_mem is not None and len(tcp_mem) == 3:
        ok = tcp_mem[2] >= pages
        findings.append(Finding(
            "net.ipv4.tcp_mem", " ".join(map(str, tcp_mem)), f"a maximum of {pages:,} pages",
            ok, None if ok else tcp_mem[2] // (2 if plan.clients_here else 1),
            None if ok else f'sysctl -w net.ipv4.tcp_mem="{value}"',
            "pages for all sockets' buffers: past it the kernel drops and kills sockets "
            "(kern.log: TCP: out of memory -- consider tuning tcp_mem)",
            ("net.ipv4.tcp_mem", value)))
    # -- closing many at once ------------------------------------------------------
    for name, why in (("net.ipv4.tcp_max_orphans",
                       "closing every stream at once (a restart) orphans them (kern.log: "
                       "too many orphaned sockets)"),
                      ("net.ipv4.tcp_max_tw_buckets",
                       "each closed connection waits in TIME_WAIT on the side that closed "
                       "(kern.log: time wait bucket table overflow)")):
        values = need_sysctl(name)
        if values is None:
            continue
        ok = values[0] >= n
        value = str(_round_up(2 * n, 100_000))
        findings.append(Finding(
            name, f"{values[0]:,}", f"{n:,}", ok, None if ok else values[0],
            None if ok else f"sysctl -w {name}={value}", why, (name, value)))
    # -- conntrack, when it is loaded --------------------------------------------
    ct = readings.get("net.netfilter.nf_conntrack_max")
    if readings.get("conntrack_loaded") or ct is not None:
        values = _ints(ct)
        if values is None:
            errors.append("nf_conntrack is loaded but net.netfilter.nf_conntrack_max cannot "
                          "be read")
        else:
            count = (_ints(readings.get("net.netfilter.nf_conntrack_count")) or [0])[0]
            need = count + n
            ok = values[0] >= need
            value = str(_round_up(need * 5 // 2, 100_000))
            findings.append(Finding(
                "net.netfilter.nf_conntrack_max", f"{values[0]:,}", f"{need:,}", ok,
                None if ok else max(0, values[0] - count),
                None if ok else f"sysctl -w net.netfilter.nf_conntrack_max={value}",
                "a tracked entry per connection; past it new connections are dropped "
                "(kern.log: nf_conntrack: table full)", ("net.netfilter.nf_conntrack_max", value)))
    return Report(plan, findings, processes, client_processes,
                  per_process, memory + SAFETY_BYTES, available, errors)


def apply(report: Report, proc_root: str = "/proc") -> list[tuple[str, str, str]]:
    """Write the report's sysctl fixes; return (name, previous, new) for each one written.

    Raises OSError for the first that cannot be written, after undoing those written.
    """
    done: list[tuple[str, str, str]] = []
    try:
        for name, value in report.sysctls.items():
            path = sysctl_path(name, proc_root)
            old = _read(path)
            with open(path, "w") as f:
                f.write(value)
            done.append((name, old or "", value))
    except OSError:
        undo(done, proc_root)
        raise
    return done


def undo(done: list[tuple[str, str, str]], proc_root: str = "/proc") -> None:
    """Put back what :func:`apply` changed, newest first."""
    for name, old, _ in reversed(done):
        with open(sysctl_path(name, proc_root), "w") as f:
            f.write(old)
