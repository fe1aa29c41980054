"""cometd-bench: run a benchmark scenario end to end and write a report.

``cometd-bench idle`` ramps one fresh server per connection mode (and nginx +
nchan as a peer, when installed) to N idle streams and measures what each
connection costs: server RSS, kernel slab and socket-buffer memory, ramp rate.

``cometd-bench fanout`` loads a Barabási–Albert friends graph, connects C
users, finds the message rate at which the server saturates with a short
step-up, then publishes at half of it for D seconds and measures deliveries
per server CPU-second and delivery latency.

Both start every process themselves (servers, ``floodtest``, ``msggen``),
sample the server and the kernel every ``--interval`` seconds with a thread of
this process, and write ``report.md``, PNG graphs, ``summary.json`` and
``samples.csv`` (raw samples) plus the tools' logs into ``--out``.

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

*Per-connection memory.* "Before" is the median of ``--measure`` seconds of
samples before the ramp starts, "at N" the median of ``--measure`` seconds of
samples from ``--settle`` seconds after the server reports all N connections;
the difference divided by the connections actually held is the per-connection
figure. Medians, because the kernel counters are system-wide and move with
whatever else the machine does. Clients close with RST (``floodtest
--rst-close``) so no TIME_WAIT sockets are left to skew the next server's
kernel figures, and each server waits (``--quiet-wait``) for TIME_WAIT sockets
of earlier runs to drain.

*Ramp rate.* While floodtest ramps, the bench polls the server's own count
every 50 ms; the ramp rate is reported first to last (connections held / time
from the first connection seen to all N) and as the slope between 10% and 90%
of N, which leaves out a slow start or a slow tail.

*CPU.* The load tools share the machine's cores with the server, so server
CPU is the server process's own CPU time (psutil), never the machine's.
Deliveries per CPU-second = deliveries counted by the server during the
measured window / server CPU-seconds in that window.

*Bounds.* Every child is bounded in time (its own ``--timeout`` and a deadline
here), targets only 127.0.0.0/8, and is terminated (SIGTERM, then SIGKILL)
when the bench ends or is interrupted; children also get SIGTERM if the bench
process dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import csv
import ctypes
import datetime as _dt
import http.client
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click
import psutil

__all__ = ["main", "cli", "Sampler", "kernel_counters", "IDLE_BASELINES"]

ROOT = Path(__file__).resolve().parent.parent
NCHAN_TEMPLATE = ROOT / "bench" / "nchan.conf"
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
KIB = 1024.0
PAGE = os.sysconf("SC_PAGE_SIZE")
SOURCE_IPS = "127.0.1.1-127.0.1.20"

#: measured earlier on this machine, not by the bench: KiB per idle connection
IDLE_BASELINES = [
    ("naive bottle on pywsgi", "server RSS", 24.6),
    ("raw gevent, one greenlet per connection", "server RSS", 8.6),
    ("nginx + nchan", "server RSS", 11.5),
    ("kernel, one loopback connection (both ends)", "kernel", 9.6),
]
#: KiB of server RSS per idle connection
IDLE_TARGETS = {"greenlet": 6.0, "pool": 1.0}
#: deliveries per server CPU-second
FANOUT_TARGETS = {"greenlet": 100_000, "pool": 300_000}
P99_TARGET_MS = 100.0
COLORS = {"greenlet": "tab:blue", "pool": "tab:orange", "nchan": "tab:green"}

_T0 = time.monotonic()


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Kernel counters
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


_CHILDREN: list[subprocess.Popen] = []


def spawn(argv: list[str], logfile: Path, **kw: Any) -> subprocess.Popen:
    """Start *argv* with stdout+stderr to *logfile*; it is ended when the bench ends."""
    f = open(logfile, "ab")  # noqa: SIM115 - closed with the process in stop()
    f.write(f"$ {shlex.join(argv)}\n".encode())
    f.flush()
    proc = subprocess.Popen(argv, stdout=kw.pop("stdout", f), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=str(ROOT), preexec_fn=_pdeathsig, **kw)
    proc._bench_log = f  # type: ignore[attr-defined]
    _CHILDREN.append(proc)
    return proc


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM,
         timeout: float = 15) -> int | None:
    """End *proc* (one we started): *sig*, then SIGKILL after *timeout* seconds."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    f = getattr(proc, "_bench_log", None)
    if f is not None:
        f.close()
    if proc in _CHILDREN:
        _CHILDREN.remove(proc)
    return proc.returncode


def stop_all() -> None:
    for proc in list(_CHILDREN):
        stop(proc, timeout=5)


def tool(name: str) -> list[str]:
    """argv prefix that runs one of the project's tools with this interpreter."""
    script = ROOT / "bin" / name
    if script.exists():
        return [sys.executable, str(script)]
    module = {"cometd": "cli", "genfriends": "graphgen"}.get(name, name)
    return [sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; "
            f"from cometd.{module} import main; main()"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Server:
    """A server under test: its processes, its address and its own counters."""

    name = "server"
    label = "server"
    host = "127.0.0.1"
    port = 0
    proc: subprocess.Popen | None = None

    def __init__(self) -> None:
        self._local = threading.local()

    def processes(self) -> list[psutil.Process]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            p = psutil.Process(self.proc.pid)
            return [p, *p.children(recursive=True)]
        except psutil.Error:
            return []

    def cpu_split(self) -> tuple[float, float]:
        """(user, system) CPU seconds over the server's processes."""
        user = system = 0.0
        for p in self.processes():
            try:
                t = p.cpu_times()
                user += t.user
                system += t.system
            except psutil.Error:
                pass
        return user, system

    def usage(self) -> tuple[int, float]:
        """(RSS bytes, user+system CPU seconds) over the server's processes."""
        rss, cpu = 0, 0.0
        for p in self.processes():
            try:
                with p.oneshot():
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    cpu += t.user + t.system
            except psutil.Error:
                pass
        return rss, cpu

    def _get(self, path: str, timeout: float = 2.0) -> bytes | None:
        """GET over a keep-alive connection per thread (no TIME_WAIT per poll)."""
        for _attempt in range(2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(
                    self.host, self.port, timeout=timeout)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                body = resp.read()
                if resp.status == 200:
                    return body
                return None
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
        return None

    def counters(self) -> dict[str, int | None]:
        """{"conns": ..., "deliveries": ..., ...}; None where unknown."""
        raise NotImplementedError

    def stop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        stop(self.proc)


_BANNER = re.compile(r"listening on http://([\d.]+):(\d+)/")


class CometdServer(Server):
    """``bin/cometd`` in one process, one mode, on a free loopback port."""

    def __init__(self, mode: str, db: str, logdir: Path, timeout: float = 60.0) -> None:
        super().__init__()
        self.name = self.label = mode
        self.label = f"cometd {mode}"
        argv = [*tool("cometd"), "--port", "0", "--admin-port", "-1", "--db", db,
                "--mode", mode]
        log_path = logdir / f"server-{mode}.log"
        self.proc = spawn(argv, log_path, stdout=subprocess.PIPE)
        found: list[re.Match] = []
        logf = self.proc._bench_log  # type: ignore[attr-defined]

        def reader() -> None:
            for line in self.proc.stdout:
                logf.write(line)
                logf.flush()
                m = _BANNER.search(line.decode(errors="replace"))
                if m and not found:
                    found.append(m)

        threading.Thread(target=reader, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not found:
            stop(self.proc)
            raise click.ClickException(f"cometd --mode {mode} did not start; see {log_path}")
        self.host, self.port = found[0].group(1), int(found[0].group(2))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def counters(self) -> dict[str, int | None]:
        body = self._get("/stats")
        if body is None:
            return {"conns": None, "deliveries": None, "messages": None, "slow": None}
        s = json.loads(body)
        return {"conns": s.get("connections"), "deliveries": s.get("deliveries"),
                "messages": s.get("messages_sent"), "slow": s.get("slow_consumers_dropped")}


def nchan_available() -> str | None:
    """Path of the nginx binary when nginx and the nchan module are installed."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                      else None)
    if nginx and NCHAN_MODULE.exists() and NCHAN_TEMPLATE.exists():
        return nginx
    return None


class NchanServer(Server):
    """nginx with the nchan module as our own process: one worker, loopback port."""

    name = "nchan"
    label = "nginx + nchan"

    def __init__(self, nginx: str, workdir: Path, logdir: Path, max_conns: int,
                 timeout: float = 30.0) -> None:
        super().__init__()
        self.prefix = workdir
        self.logdir = logdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "client_body").mkdir(exist_ok=True)
        for _attempt in range(5):  # the free port may be taken before nginx binds it
            self.port = free_port()
            nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            conf = NCHAN_TEMPLATE.read_text().format(
                module=NCHAN_MODULE, nofile=nofile, prefix=workdir, host=self.host,
                port=self.port, worker_connections=max(nofile - 100, 1024))
            (workdir / "nginx.conf").write_text(conf)
            (workdir / "error.log").unlink(missing_ok=True)
            argv = [nginx, "-p", str(workdir), "-c", str(workdir / "nginx.conf"),
                    "-e", str(workdir / "error.log")]
            self.proc = spawn(argv, logdir / "server-nchan.log")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._get("/stats", timeout=1.0) is not None:
                    return
                time.sleep(0.1)
            err = (workdir / "error.log").read_text() if (workdir / "error.log").exists() else ""
            stop(self.proc)
            if "Address already in use" not in err:
                break
        raise click.ClickException(f"nginx + nchan did not start:\n{err}")

    def stop(self) -> None:
        super().stop()
        err = self.prefix / "error.log"
        if err.exists():
            shutil.copy(err, self.logdir / "nchan-error.log")

    def counters(self) -> dict[str, int | None]:
        body = self._get("/stats")
        conns = None
        if body is not None:
            m = re.search(rb"^subscribers: (\d+)", body, re.M)
            conns = int(m.group(1)) if m else None
        return {"conns": conns, "deliveries": None, "messages": None, "slow": None}


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


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


def _median(samples: list[dict], key: str) -> float:
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


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def floodtest(url_host: str, port: int, n: int, logdir: Path, tag: str, rate: float = 0,
              first_id: int = 1, hold: float = 600.0, interval: float = 5.0) -> tuple[
                  subprocess.Popen, Path]:
    """Start floodtest holding *n* streams for up to *hold* s (end it with SIGTERM)."""
    json_path = logdir / f"floodtest-{tag}.json"
    ramp = n / rate if rate else n / 1000
    argv = [*tool("floodtest"), "--server", f"{url_host}:{port}", "--n", str(n),
            "--rate", f"{rate:g}", "--duration", f"{hold:g}", "--first-id", str(first_id),
            "--source-ips", SOURCE_IPS, "--interval", f"{interval:g}", "--rst-close",
            "--json", str(json_path), "--timeout", f"{ramp + hold + 60:g}"]
    return spawn(argv, logdir / f"floodtest-{tag}.log"), json_path


def end_floodtest(proc: subprocess.Popen, json_path: Path) -> dict:
    """SIGTERM floodtest (it closes its streams and writes its summary) and read it."""
    stop(proc, signal.SIGTERM, timeout=30)
    return read_json(json_path)


def msggen(url: str, rate: float, duration: float, users: int, concurrency: int,
           logdir: Path, tag: str, seed: int = 1) -> tuple[subprocess.Popen, Path]:
    json_path = logdir / f"msggen-{tag}.json"
    argv = [*tool("msggen"), "--url", url, "--rate", f"{rate:g}", "--duration", f"{duration:g}",
            "--users", str(users), "--concurrency", str(concurrency), "--interval",
            f"{max(1.0, duration / 4):g}", "--json", str(json_path), "--seed", str(seed),
            "--timeout", f"{duration + 20:g}"]
    return spawn(argv, logdir / f"msggen-{tag}.log"), json_path


def wait_proc(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log(f"pid {proc.pid} overran {timeout:g}s; terminating it")
        return stop(proc)


# --------------------------------------------------------------------------------------
# Reports and graphs
# --------------------------------------------------------------------------------------


def command_line() -> str:
    argv = list(sys.argv)
    try:
        argv[0] = os.path.relpath(argv[0], os.getcwd())
    except ValueError:
        pass
    if os.path.basename(argv[0]) in ("cometd-bench", "bench.py") and not argv[0].startswith(
            ("bin/", "./", "/", "..")):
        argv[0] = os.path.basename(argv[0])
    return shlex.join(argv)


def machine_info(nginx: str | None = None) -> dict[str, str]:
    """The machine, the software versions and the commit; *nginx*: the binary, when it runs."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                "cometd", "bin", ":!cometd/bench.py", ":!bin/cometd-bench"],
                               capture_output=True, text=True, timeout=10).stdout
        files = [line[3:] for line in dirty.splitlines() if line.strip()]
        if files:
            commit += f" + uncommitted changes to {', '.join(files)}"
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    try:
        import gevent

        gv = gevent.__version__
    except ImportError:
        gv = "?"
    info = {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gevent": gv,
        "nofile": str(resource.getrlimit(resource.RLIMIT_NOFILE)[1]),
        "commit": commit,
        "load": "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg()),
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if nginx:  # only a run that measured nginx + nchan names its version
        r = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10)
        info["nginx"] = (r.stderr or r.stdout).strip().replace("nginx version: ", "") or "?"
    return info


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _write_report(out: Path, lines: list[str], graphs: list[str], notes: list[str]) -> str:
    """Finish a report: graphs, notes and what else the run wrote; save report.md."""
    lines += ["## Graphs", ""]
    for g in graphs:
        lines += [f"![{g}]({g})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["The run also wrote `samples.csv` (every sample), `summary.json` (every figure) "
              "and `logs/` (each tool's output) next to this report.", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def write_samples_csv(path: Path, runs: dict[str, list[dict]]) -> None:
    keys = ["t", "phase", "rss", "cpu", "slab", "sunreclaim", "tcp_inuse", "tcp_tw", "tcp_mem",
            "conns", "deliveries", "messages", "slow"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["server", *keys, "client_cpu"])
        for name, samples in runs.items():
            for s in samples:
                w.writerow([name, *(s.get(k) for k in keys), json.dumps(s.get("client_cpu", {}))])


def finish_info(info: dict[str, str], notes: list[str]) -> None:
    """Record the end-of-run load; note when other work competed for the CPUs."""
    load = os.getloadavg()
    info["load_end"] = "{:.1f} {:.1f} {:.1f}".format(*load)
    cores = os.cpu_count() or 1
    worst = max(float(info["load"].split()[0]), load[0])
    if worst > 2 * cores + 1:  # the bench and its own tools account for ~2-3
        notes.append(f"The machine was busy with other work (1-minute load average up to "
                     f"{worst:.1f} on {cores} cores): rates, ramp "
                     "speed and latency are pessimistic; per-connection memory and CPU-seconds "
                     "per delivery are much less affected.")


def machine_lines(info: dict[str, str]) -> list[str]:
    return [
        f"- Date: {info['date']}; commit {info['commit']}",
        f"- Machine: {info['cpu']}, {info['memory']} RAM, Linux {info['kernel']}, "
        f"open files limit {info['nofile']} per process",
        f"- Python {info['python']}, gevent {info['gevent']}"
        + (f", nginx {info['nginx']}" if "nginx" in info else ""),
        f"- Load average (1/5/15 min) at the start: {info['load']}; at the end: "
        f"{info.get('load_end', '?')}",
    ]


# --------------------------------------------------------------------------------------
# idle
# --------------------------------------------------------------------------------------


def _ramp_rate(points: list[tuple[float, int]], target: int, base: int) -> float | None:
    """Connections/s while the server went from 10% to 90% of the ramp (interpolated).

    *points* are (time, connections held) pairs polled during the ramp.
    """
    pts = [(t, c - base) for t, c in points]

    def cross(level: float) -> float | None:
        for (t0, c0), (t1, c1) in zip(pts, pts[1:], strict=False):
            if c0 < level <= c1:
                return t0 + (t1 - t0) * (level - c0) / max(c1 - c0, 1e-9)
        return None

    lo, hi = 0.1 * target, 0.9 * target
    t_lo, t_hi = cross(lo), cross(hi)
    if t_lo is None or t_hi is None or t_hi <= t_lo:
        return None
    return (hi - lo) / (t_hi - t_lo)


def idle_one(server: Server, n: int, ramp_rate: float, settle: float, interval: float,
             logdir: Path, measure: float = 2.0) -> dict[str, Any]:
    sampler = Sampler(server, interval)
    sampler.phase = "before"
    sampler.start()
    time.sleep(max(measure, 3 * interval) + interval)
    t_base = sampler.now() - max(measure, 3 * interval)
    base_samples = sampler.since(t_base)
    before = {k: _median(base_samples, k) for k in ("rss", "slab", "sunreclaim", "tcp_mem",
                                                    "tcp_inuse", "conns")}
    base_conns = int(before["conns"]) if math.isfinite(before["conns"]) else 0
    log(f"{server.label}: RSS before ramp {before['rss'] / 2**20:.1f} MiB; ramping to {n}")
    sampler.phase = "ramp"
    t_ramp = sampler.now()
    proc, json_path = floodtest(server.host, server.port, n, logdir, server.name, rate=ramp_rate,
                                hold=600)
    sampler.watch("floodtest", proc)
    timeout = (n / ramp_rate if ramp_rate else n / 500) + 120
    points: list[tuple[float, int]] = []
    reached = wait_conns(server, base_conns + n, proc, timeout, points=points) - base_conns
    t_reached = sampler.now()
    sampler.phase = "held"
    first = next((t for t, c in points if c > base_conns), None)
    if first is not None:
        t_ramp = first - sampler.t0  # graphs and ramp time start at the first connection
    log(f"{server.label}: {reached} connections {t_reached - t_ramp:.2f}s after the first; "
        f"settling {settle:g}s")
    time.sleep(settle)
    t_meas = sampler.now()
    wait_until = time.monotonic() + max(measure, 3 * interval) + interval / 2
    while time.monotonic() < wait_until and proc.poll() is None:
        time.sleep(interval / 2)
    at_samples = sampler.since(t_meas)
    at = {k: _median(at_samples, k) for k in ("rss", "slab", "sunreclaim", "tcp_mem",
                                              "tcp_inuse", "conns")}
    held = int(at["conns"]) - base_conns if math.isfinite(at["conns"]) else reached
    sampler.phase = "closing"
    flood = end_floodtest(proc, json_path)
    sampler.watch("floodtest", None)
    time.sleep(max(0.5, 4 * interval))
    sampler.stop()
    samples = sampler.samples
    for s in samples:
        s["t"] -= t_ramp
    per = max(held, 1)
    kernel_slab = (at["slab"] - before["slab"]) / per
    kernel_sock = (at["tcp_mem"] - before["tcp_mem"]) / per
    result = {
        "server": server.name,
        "label": server.label,
        "n": n,
        "held": held,
        "ramp_s": round(t_reached - t_ramp, 2),
        "ramp_rate": _ramp_rate(points, n, base_conns),
        "ramp_rate_first_last": reached / (t_reached - t_ramp) if t_reached > t_ramp else None,
        "client_ramp_rate": flood.get("ramp_rate"),
        "rss_before": before["rss"],
        "rss_at_n": at["rss"],
        "rss_per_conn": (at["rss"] - before["rss"]) / per,
        "slab_per_conn": kernel_slab,
        "sunreclaim_per_conn": (at["sunreclaim"] - before["sunreclaim"]) / per,
        "sockmem_per_conn": kernel_sock,
        "kernel_per_conn": kernel_slab + kernel_sock,
        "tcp_inuse_delta": at["tcp_inuse"] - before["tcp_inuse"],
        "floodtest": {k: flood.get(k) for k in ("opened", "open_max", "welcomed", "streaming",
                                               "connect_errors", "connect_errors_by_errno",
                                               "http_errors", "protocol_errors", "closed",
                                               "ramp_rate", "client_rss_kb",
                                               "rss_bytes_per_conn")},
        "samples": samples,
    }
    log(f"{server.label}: held {held}, RSS/conn {result['rss_per_conn'] / KIB:.2f} KiB, "
        f"kernel/conn {result['kernel_per_conn'] / KIB:.2f} KiB, ramp "
        f"{_fmt(result['ramp_rate_first_last'], 0)} conn/s first to last, "
        f"{_fmt(result['ramp_rate'], 0)} at 10-90%")
    return result


def idle_graphs(results: list[dict], out: Path) -> list[str]:
    plt = _plt()
    files = []

    def ramp_points(r: dict, key: str) -> tuple[list[float], list[float]]:
        base = [s for s in r["samples"] if s["phase"] == "before"][-8:]
        b_c = _median(base, "conns")
        b_c = b_c if math.isfinite(b_c) else 0
        b_v = _median(base, key)
        xs, ys = [], []
        for s in r["samples"]:
            if s["phase"] not in ("before", "ramp", "held") or s.get("conns") is None:
                continue
            v = s[key]
            xs.append(s["conns"] - b_c)
            ys.append((v - b_v) / 2**20)
        return xs, ys

    for key, fname, title, ylabel, refs in (
        ("rss", "idle-rss.png", "Server RSS while ramping to {n} idle connections",
         "server RSS growth (MiB)", True),
        ("slab", "idle-kernel.png", "Kernel Slab (system-wide: both ends of each connection) "
         "while ramping", "Slab growth (MiB)", False),
    ):
        fig, ax = plt.subplots(figsize=(10, 6.25))
        n = max(r["n"] for r in results)
        for r in results:
            xs, ys = ramp_points(r, key)
            per = r["rss_per_conn"] if key == "rss" else r["slab_per_conn"]
            ax.plot(xs, ys, marker=".", color=COLORS.get(r["server"]),
                    label=f"{r['label']} ({per / KIB:.2f} KiB/conn)")
        if refs:
            for kib, style, lab in ((6.0, "--", "greenlet target 6 KiB/conn"),
                                    (1.0, ":", "pool target 1 KiB/conn"),
                                    (8.6, "-.", "raw gevent baseline 8.6 KiB/conn")):
                ax.plot([0, n], [0, n * kib * KIB / 2**20], style, color="grey", lw=1,
                        label=lab)
        else:
            ax.plot([0, n], [0, n * 9.6 * KIB / 2**20], "--", color="grey", lw=1,
                    label="baseline 9.6 KiB/conn")
        ax.set_xlabel("connections held by the server")
        ax.set_ylabel(ylabel)
        ax.set_title(title.format(n=n))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
        _save(fig, out / fname)
        files.append(fname)

    fig, ax = plt.subplots(figsize=(10, 6.25))
    for r in results:
        pts = [(s["t"], s["conns"]) for s in r["samples"] if s.get("conns") is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=COLORS.get(r["server"]),
                label=f"{r['label']} ({_fmt(r['ramp_rate'], 0)} conn/s)")
    ax.set_xlabel("seconds since the ramp started")
    ax.set_ylabel("connections held")
    ax.set_title("Ramp: connections over time (floodtest as fast as possible)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    _save(fig, out / "idle-ramp.png")
    files.append("idle-ramp.png")
    return files


def idle_report(results: list[dict], notes: list[str], out: Path, opts: dict,
                info: dict[str, str], graphs: list[str]) -> str:
    ramp = "as fast as possible" if not opts["ramp_rate"] else f"{opts['ramp_rate']:g}/s"
    L = [f"# cometd-bench idle: {opts['n']:,} idle connections per server", ""]
    L += ["```", command_line(), "```", ""]
    L += machine_lines(info)
    L += [
        f"- Each server starts fresh; floodtest opens {opts['n']:,} `GET /test/<id>` streams "
        f"({ramp}, "
        f"from {SOURCE_IPS}); the bench samples every {opts['interval']:g}s. 'Before' is the "
        f"median of the {opts['measure']:g}s of samples before the ramp, 'at N' the median "
        f"of {opts['measure']:g}s of samples starting {opts['settle']:g}s after the server "
        "reports all connections; then floodtest closes them with RST.",
        "- KiB = 1024 bytes. RSS/conn = (server RSS at N - RSS before the ramp) / N. "
        "Kernel/conn = (system-wide Slab + sockstat `TCP mem` pages at N - before) / N: "
        "both ends of each loopback connection, like the 9.6 KiB baseline.",
        "",
        "## Results",
        "",
        "| server | held | ramp first to last / 10-90% (conn/s) | RSS before (MiB) | "
        "RSS at N (MiB) | **RSS/conn "
        "(KiB)** | target | kernel/conn (KiB) | of which Slab | of which TCP buffers | "
        "SUnreclaim/conn | TCP sockets + |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        target = IDLE_TARGETS.get(r["server"])
        verdict = ""
        if target is not None:
            ok = r["rss_per_conn"] / KIB <= target
            verdict = f"<= {target:g} {'met' if ok else '**missed**'}"
        L.append(
            f"| {r['label']} | {r['held']:,} | {_fmt(r.get('ramp_rate_first_last'), 0)} / "
            f"{_fmt(r['ramp_rate'], 0)} | "
            f"{r['rss_before'] / 2**20:.1f} | {r['rss_at_n'] / 2**20:.1f} | "
            f"**{r['rss_per_conn'] / KIB:.2f}** | {verdict} | {r['kernel_per_conn'] / KIB:.2f} | "
            f"{r['slab_per_conn'] / KIB:.2f} | {r['sockmem_per_conn'] / KIB:.2f} | "
            f"{r['sunreclaim_per_conn'] / KIB:.2f} | {r['tcp_inuse_delta']:,.0f} |")
    L += ["", "Baselines for comparison, measured earlier on this machine and not by this "
          "run, KiB per idle connection:", "",
          "| what | measured as | KiB/conn |", "|---|---|---:|"]
    for what, kind, kib in IDLE_BASELINES:
        L.append(f"| {what} | {kind} | {kib} |")
    L += ["", "Targets: greenlet mode <= 6 KiB/conn, pool mode <= 1 KiB/conn (server RSS).", ""]
    L += ["## Clients", "", "| server | opened | connect errors | HTTP errors | closed early | "
          "client ramp (conn/s) | floodtest RSS/conn (B) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        f = r["floodtest"]
        errs = f.get("connect_errors")
        by = f.get("connect_errors_by_errno") or {}
        L.append(f"| {r['label']} | {f.get('opened')} | {errs}{' ' + str(by) if by else ''} | "
                 f"{f.get('http_errors')} | {f.get('closed')} | {_fmt(f.get('ramp_rate'), 0)} | "
                 f"{f.get('rss_bytes_per_conn') or 'n/a'} |")
    L += ["", "Server ramp rate: connections held / seconds from the server's first to its "
          "last connection (polled every 50 ms), and connections/s while the server's own count "
          "went from 10% to 90% of N (interpolated between samples). Client ramp rate: "
          "floodtest's connects/s (completed TCP handshakes, which the kernel's listen backlog "
          "can absorb before the server accepts them).", ""]
    return _write_report(out, L, graphs, notes)


def _resolve_out(out: str | None, scenario: str) -> Path:
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join("results", f"{scenario}-{stamp}")
    path = Path(out)
    (path / "logs").mkdir(parents=True, exist_ok=True)
    return path


def _modes(value: str) -> list[str]:
    modes = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("greenlet", "pool")]
    if bad or not modes:
        raise click.BadParameter(f"modes are greenlet and/or pool, comma-separated: {value!r}")
    return modes


def _strip(results: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "samples"} for r in results]


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Run a cometd benchmark scenario end to end and write a Markdown report with graphs.

    Every scenario starts its own servers and load tools on loopback, samples
    server RSS/CPU and kernel socket memory over time, and writes report.md,
    PNG graphs, summary.json, samples.csv and logs/ into --out. Heavy runs on a
    shared machine should be serialised: flock /tmp/cometd-bench.lock cometd-bench ...
    """


_out_option = click.option(
    "--out", default=None, metavar="DIR",
    help="Results folder (created). Default: results/<scenario>-<timestamp>.")
_modes_option = click.option(
    "--modes", default="greenlet,pool", show_default=True,
    help="cometd connection modes to run one after the other, each on a fresh server.")


@cli.command("idle")
@click.option("--n", default=15000, show_default=True, type=click.IntRange(min=1),
              help="Idle connections to ramp each server to (< 19,800: one process' files).")
@_modes_option
@click.option("--nchan/--no-nchan", default=None,
              help="Also measure nginx + nchan (default: when nginx and libnginx-mod-nchan "
                   "are installed; --nchan fails if they are not).")
@click.option("--ramp-rate", default=0.0, show_default=True, type=float,
              help="floodtest connections per second (0: as fast as the server takes them).")
@click.option("--settle", default=2.0, show_default=True, type=float,
              help="Seconds to wait after the server reports N connections before measuring.")
@click.option("--interval", default=0.25, show_default=True, type=float,
              help="Seconds between samples.")
@click.option("--measure", default=2.0, show_default=True, type=float,
              help="Seconds of samples whose median is the 'before' and the 'at N' figure "
                   "(the kernel counters are system-wide and move with other work).")
@click.option("--quiet-wait", default=20.0, show_default=True, type=float,
              help="Before each server, wait at most this long for TIME_WAIT sockets of "
                   "earlier runs to expire (they hold kernel memory that would skew the "
                   "kernel figures).")
@_out_option
def idle_command(n: int, modes: str, nchan: bool | None, ramp_rate: float, settle: float,
                 interval: float, measure: float, quiet_wait: float, out: str | None) -> None:
    """Idle connection cost: ramp a fresh server per mode (and nginx + nchan) to N streams.

    For each server: RSS per connection ((RSS at N - RSS before the ramp) / N),
    kernel memory per connection (Slab and sockstat TCP buffer deltas / N, both
    ends of the loopback connections), and the ramp rate (first to last
    connection, and the 10-90% slope). Graphs memory against
    connections (one line per server) and connections over time. Baselines and
    targets are printed next to the results.
    """
    mode_list = _modes(modes)
    if n > 19_500:
        raise click.BadParameter("a single server process holds at most ~19,800 connections "
                                 "(20,000 open files)", param_hint="--n")
    raise_nofile()
    outdir = _resolve_out(out, "idle")
    logdir = outdir / "logs"
    notes: list[str] = []
    nginx = nchan_available()
    if nchan and not nginx:
        raise click.ClickException("--nchan: nginx with libnginx-mod-nchan is not installed "
                                   "(apt-get install -y nginx-light libnginx-mod-nchan)")
    if nchan is None and not nginx:
        notes.append("nginx + nchan skipped: not installed (apt-get install -y nginx-light "
                     "libnginx-mod-nchan).")
    if nchan is False:
        notes.append("nginx + nchan skipped (--no-nchan).")
    use_nchan = bool(nginx) and nchan is not False
    opts = {"n": n, "ramp_rate": ramp_rate, "settle": settle, "interval": interval,
            "measure": measure}
    info = machine_info(nginx if use_nchan else None)
    log(f"idle: {n} connections, servers: {', '.join(mode_list)}"
        f"{', nchan' if use_nchan else ''}; results in {outdir}")
    results = []
    work = Path(tempfile.mkdtemp(prefix="cometd-bench-"))
    try:
        plan: list[str] = [*mode_list, *(["nchan"] if use_nchan else [])]
        for name in plan:
            wait_quiet(quiet_wait)
            server: Server | None = None
            try:
                if name == "nchan":
                    server = NchanServer(nginx, work / "nchan", logdir, n)
                else:
                    server = CometdServer(name, str(work / f"db-{name}"), logdir)
                log(f"{server.label}: started, pid {server.proc.pid}, port {server.port}")
                results.append(idle_one(server, n, ramp_rate, settle, interval, logdir,
                                        measure))
            except Exception as exc:  # report the others all the same
                log(f"{name}: FAILED: {exc}")
                notes.append(f"{name}: the run failed ({exc}); see logs/.")
            finally:
                if server is not None:
                    server.stop()
    finally:
        stop_all()
        shutil.rmtree(work, ignore_errors=True)
    for r in results:
        if r["held"] < 0.99 * n:
            notes.append(f"{r['label']} held only {r['held']:,} of {n:,} connections; "
                         "per-connection figures are over the connections held.")
        if abs(r["tcp_inuse_delta"] - 2 * r["held"]) > 0.05 * max(r["held"], 100):
            notes.append(f"{r['label']}: TCP sockets in use grew by {r['tcp_inuse_delta']:,.0f}"
                         f" for {r['held']:,} connections (2 per connection expected); other "
                         "activity on the machine may have skewed the kernel figures.")
    finish_info(info, notes)
    graphs = idle_graphs(results, outdir)
    write_samples_csv(outdir / "samples.csv", {r["server"]: r["samples"] for r in results})
    (outdir / "summary.json").write_text(json.dumps(
        {"scenario": "idle", "command": command_line(), "machine": info, "options": opts,
         "results": _strip(results), "notes": notes}, indent=2) + "\n")
    idle_report(results, notes, outdir, opts, info, graphs)
    log(f"idle: report {outdir / 'report.md'}")
    click.echo(str(outdir / "report.md"))


# --------------------------------------------------------------------------------------
# fanout
# --------------------------------------------------------------------------------------


def ensure_db(data_dir: Path, users: int, m: int, seed: int, logdir: Path) -> tuple[Path, dict]:
    """The loaded subscription db for (users, m, seed), generated once and cached."""
    key = f"U{users}-m{m}-s{seed}"
    db = data_dir / f"db-{key}"
    marker = db / "BENCH-LOADED.json"
    if marker.exists():
        log(f"dataset {key}: cached at {db}")
        return db, read_json(marker)
    data_dir.mkdir(parents=True, exist_ok=True)
    if db.exists():
        shutil.rmtree(db)
    friends = data_dir / f"friends-{key}.txt"
    t = time.monotonic()
    log(f"dataset {key}: generating {friends}")
    p = spawn([*tool("genfriends"), "--n", str(users), "--m", str(m), "--seed", str(seed),
               "-o", str(friends)], logdir / "genfriends.log")
    if wait_proc(p, 1800) != 0:
        raise click.ClickException(f"genfriends failed; see {logdir / 'genfriends.log'}")
    stop(p)
    log(f"dataset {key}: loading into {db}")
    p = spawn([*tool("cometd"), "load", str(friends), "--db", str(db)], logdir / "load.log")
    if wait_proc(p, 3600) != 0:
        raise click.ClickException(f"cometd load failed; see {logdir / 'load.log'}")
    stop(p)
    with open(friends, "rb") as f:
        edges = sum(1 for _ in f)
    meta = {"users": users, "m": m, "seed": seed, "friendships": edges,
            "build_s": round(time.monotonic() - t, 1)}
    marker.write_text(json.dumps(meta) + "\n")
    friends.unlink()
    log(f"dataset {key}: {edges:,} friendships loaded in {meta['build_s']}s")
    return db, meta


def _window(sampler: Sampler, t0: float, t1: float) -> list[dict]:
    return [s for s in sampler.samples if t0 <= s["t"] <= t1]


def _cpu_pct(samples: list[dict], role: str | None = None) -> float | None:
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


def fanout_one(mode: str, db: Path, opts: dict, logdir: Path) -> dict[str, Any]:
    users, conns = opts["users"], opts["connections"]
    server = CometdServer(mode, str(db), logdir)
    log(f"{server.label}: started, pid {server.proc.pid}, port {server.port}")
    sampler = Sampler(server, opts["interval"])
    sampler.start()
    result: dict[str, Any] = {"server": mode, "label": server.label, "steps": []}
    try:
        rate = opts["rate"]
        if not rate:
            # -- step-up: find the saturating rate -----------------------------------
            sampler.phase = "connect"
            flood, fjson = floodtest(server.host, server.port, conns, logdir, f"{mode}-stepup")
            sampler.watch("floodtest", flood)
            wait_conns(server, conns, flood, conns / 500 + 120)
            best = 0.0
            r = opts["step_start"]
            while r <= opts["step_max"]:
                sampler.phase = f"step {r:g}"
                t0 = sampler.now()
                mg, mjson = msggen(server.url, r, opts["step_duration"], users,
                                   opts["step_concurrency"], logdir, f"{mode}-step{r:g}")
                sampler.watch("msggen", mg)
                wait_proc(mg, opts["step_duration"] + 40)
                t1 = sampler.now()
                sampler.watch("msggen", None)
                stop(mg)
                s = read_json(mjson)
                win = _window(sampler, t0 + 0.5, t1)
                achieved = float(s.get("achieved_rate") or 0)
                step = {"target": r, "achieved": achieved, "errors": s.get("errors"),
                        "server_cpu_pct": _cpu_pct(win),
                        "msggen_cpu_pct": _cpu_pct(win, "msggen"),
                        "floodtest_cpu_pct": _cpu_pct(win, "floodtest"),
                        "machine_cpu_pct": _cpu_pct(win, "machine"),
                        "post_p99_ms": (s.get("latency_ms") or {}).get("p99")}
                result["steps"].append(step)
                best = max(best, achieved)
                log(f"{server.label}: step {r:g} msg/s -> {achieved:g} msg/s, server CPU "
                    f"{_fmt(step['server_cpu_pct'], 0)}%, msggen CPU "
                    f"{_fmt(step['msggen_cpu_pct'], 0)}%")
                if achieved < 0.9 * r:
                    break
                r *= 2
            sampler.phase = "disconnect"
            result["stepup_floodtest"] = end_floodtest(flood, fjson)
            sampler.watch("floodtest", None)
            result["saturating_rate"] = best
            rate = opts["load_fraction"] * best
            log(f"{server.label}: saturating rate {best:g} msg/s; measuring at {rate:g} msg/s")
            time.sleep(0.5)
        result["rate"] = rate
        # -- the measured run ---------------------------------------------------------
        sampler.phase = "connect"
        flood, fjson = floodtest(server.host, server.port, conns, logdir, f"{mode}-run")
        sampler.watch("floodtest", flood)
        held = wait_conns(server, conns, flood, conns / 500 + 120)
        time.sleep(0.5)
        sampler.phase = "run"
        mg, mjson = msggen(server.url, rate, opts["duration"], users, opts["concurrency"],
                           logdir, f"{mode}-run")
        sampler.watch("msggen", mg)
        # The window opens with the first message the server counts (msggen's
        # interpreter start-up is not part of it) and closes when msggen is done
        # and the last messages have been delivered.
        base = server.counters()
        split0 = server.cpu_split()
        c0 = base
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and mg.poll() is None:
            c = server.counters()
            if (c.get("messages") or 0) > (base.get("messages") or 0):
                break
            c0 = c
            split0 = server.cpu_split()
            time.sleep(0.01)
        w0 = time.monotonic()
        t0 = w0 - sampler.t0
        log(f"{server.label}: publishing {rate:g} msg/s for {opts['duration']:g}s to "
            f"{held:,} connections")
        wait_proc(mg, opts["duration"] + 40)
        w_sent = time.monotonic()
        time.sleep(0.5)  # messages still in flight reach floodtest
        split1 = server.cpu_split()
        c1 = server.counters()
        t1 = sampler.now()
        sampler.watch("msggen", None)
        stop(mg)
        sampler.phase = "disconnect"
        fl = end_floodtest(flood, fjson)
        sampler.watch("floodtest", None)
        time.sleep(max(0.5, 2 * opts["interval"]))
    finally:
        sampler.stop()
        server.stop()
    mg_s = read_json(mjson)
    deliveries = (c1["deliveries"] or 0) - (c0["deliveries"] or 0)
    messages = (c1["messages"] or 0) - (c0["messages"] or 0)
    cpu_user = split1[0] - split0[0]
    cpu_sys = split1[1] - split0[1]
    cpu = cpu_user + cpu_sys
    wall = w_sent - w0  # the publishing window (the drain adds no messages)
    win = _window(sampler, t0 + 0.5, t1)
    for s in sampler.samples:
        s["t"] -= t0
    result.update({
        "connections": held,
        "messages": messages,
        "msgs_per_s": messages / wall if wall > 0 else None,
        "achieved_rate": mg_s.get("achieved_rate"),
        "msggen_errors": mg_s.get("errors"),
        "msggen_missed": mg_s.get("missed"),
        "deliveries": deliveries,
        "deliveries_per_msg": deliveries / messages if messages else None,
        "deliveries_per_s": deliveries / wall if wall > 0 else None,
        "server_cpu_s": cpu,
        "server_cpu_user_s": cpu_user,
        "server_cpu_system_s": cpu_sys,
        "server_cpu_pct": 100 * cpu / wall if wall > 0 else None,
        "msggen_cpu_pct": _cpu_pct(win, "msggen"),
        "floodtest_cpu_pct": _cpu_pct(win, "floodtest"),
        "machine_cpu_pct": _cpu_pct(win, "machine"),
        "cpu_s_per_100k": cpu / deliveries * 1e5 if deliveries else None,
        "deliveries_per_cpu_s": deliveries / cpu if cpu > 0 else None,
        "msgs_per_cpu_s": messages / cpu if cpu > 0 else None,
        "latency_ms": fl.get("latency_ms") or {},
        "timed_messages": fl.get("messages"),
        "floodtest_closed": fl.get("closed"),
        "floodtest_connect_errors": fl.get("connect_errors"),
        "slow_consumers_dropped": (c1["slow"] or 0) - (c0["slow"] or 0),
        "post_latency_ms": mg_s.get("latency_ms") or {},
        "samples": sampler.samples,
    })
    lat = result["latency_ms"]
    log(f"{server.label}: {_fmt(result['deliveries_per_s'], 0)} deliveries/s, "
        f"{_fmt(result['deliveries_per_cpu_s'], 0)} deliveries per CPU-s, latency ms p50 "
        f"{lat.get('p50')} p99 {lat.get('p99')} max {lat.get('max')}")
    return result


def fanout_graphs(results: list[dict], out: Path) -> list[str]:
    plt = _plt()
    files = []

    def series(r: dict, fn) -> tuple[list[float], list[float]]:
        pts = [s for s in r["samples"] if s["phase"] == "run" or (
            s["phase"] in ("connect", "disconnect") and -1.5 <= s["t"] <= r_dur(r) + 3)]
        xs, ys = [], []
        for a, b in zip(pts, pts[1:], strict=False):
            dt = b["t"] - a["t"]
            v = fn(a, b, dt) if dt > 0 else None
            if v is not None:
                xs.append(b["t"])
                ys.append(v)
        return xs, ys

    def r_dur(r: dict) -> float:
        return r.get("_duration", 0)

    def cpu(a, b, dt):
        return 100 * (b["cpu"] - a["cpu"]) / dt

    def deliv(a, b, dt):
        if a.get("deliveries") is None or b.get("deliveries") is None:
            return None
        return (b["deliveries"] - a["deliveries"]) / dt

    for fn, fname, ylabel, title in (
        (cpu, "fanout-cpu.png", "server CPU % (of one core)", "Server CPU during the fan-out run"),
        (deliv, "fanout-deliveries.png", "deliveries / s",
         "Deliveries per second during the fan-out run"),
    ):
        fig, ax = plt.subplots(figsize=(10, 6.25))
        for r in results:
            xs, ys = series(r, fn)
            ax.plot(xs, ys, color=COLORS.get(r["server"]),
                    label=f"{r['label']} at {r['rate']:g} msg/s")
        ax.set_xlabel("seconds since the server counted the first message")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
        _save(fig, out / fname)
        files.append(fname)

    if any(r["steps"] for r in results):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 6.25))
        for r in results:
            if not r["steps"]:
                continue
            tg = [s["target"] for s in r["steps"]]
            ax1.plot(tg, [s["achieved"] for s in r["steps"]], marker="o",
                     color=COLORS.get(r["server"]), label=r["label"])
            ax2.plot(tg, [s["server_cpu_pct"] or 0 for s in r["steps"]], marker="o",
                     color=COLORS.get(r["server"]), label=f"{r['label']} server")
            ax2.plot(tg, [s["msggen_cpu_pct"] or 0 for s in r["steps"]], marker="x", ls=":",
                     color=COLORS.get(r["server"]), label=f"msggen (vs {r['server']})")
        top = max(s["target"] for r in results for s in r["steps"])
        ax1.plot([0, top], [0, top], "--", color="grey", lw=1, label="achieved = target")
        from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

        ticks = sorted({s["target"] for r in results for s in r["steps"]})
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.set_xlabel("target msg/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        ax1.set_yscale("log", base=2)
        ax1.yaxis.set_major_locator(FixedLocator(ticks))
        ax1.yaxis.set_minor_locator(NullLocator())
        ax1.yaxis.set_major_formatter(ScalarFormatter())
        ax1.set_ylabel("achieved msg/s")
        ax1.set_title("Step-up: achieved rate")
        ax2.set_ylabel("CPU % (of one core)")
        ax2.set_title("Step-up: CPU")
        _save(fig, out / "fanout-saturation.png")
        files.append("fanout-saturation.png")
    return files


def fanout_report(results: list[dict], meta: dict, opts: dict, info: dict, notes: list[str],
                  out: Path, graphs: list[str]) -> str:
    L = [f"# cometd-bench fanout: {opts['users']:,} users, {opts['connections']:,} connected",
         "", "```", command_line(), "```", ""]
    L += machine_lines(info)
    L += [
        f"- Dataset: `genfriends --n {opts['users']} --m {opts['m']} --seed {opts['seed']}` "
        f"({meta.get('friendships', '?'):,} friendships, ~{2 * opts['m']} friends per user on "
        "average), loaded both ways; cached under the data folder.",
        f"- floodtest holds users 1..{opts['connections']:,} (`GET /test/<id>`; in a "
        "Barabási–Albert graph the low ids are the oldest, best-connected users); msggen "
        f"publishes from subjects drawn uniformly from 1..{opts['users']:,}.",
        "- Saturating rate: msggen steps up "
        f"({opts['step_duration']:g}s per step, doubling from {opts['step_start']:g} msg/s, "
        f"concurrency {opts['step_concurrency']}) until it achieves < 90% of the target; the "
        "best achieved rate is the saturating rate. The measured run publishes at "
        f"{opts['load_fraction']:.0%} of it (or --rate) for {opts['duration']:g}s with "
        f"concurrency {opts['concurrency']}, against fresh connections.",
        "- Server CPU = user+system CPU time of the server process alone (psutil); msggen and "
        "floodtest share the 2 cores with it. Deliveries are the server's own counter. On "
        "loopback the kernel usually runs the receiving socket's TCP processing inside the "
        "sender's send() call, so the server's system time includes part of the clients' "
        "receive path.",
        "",
        "## Results",
        "",
        "| | " + " | ".join(r["label"] for r in results) + " |",
        "|---|" + "---:|" * len(results),
    ]

    def row(name: str, fn) -> None:
        L.append(f"| {name} | " + " | ".join(fn(r) for r in results) + " |")

    row("saturating rate (msg/s)", lambda r: _fmt(r.get("saturating_rate"), 0))
    row("measured at (msg/s)", lambda r: f"{r['rate']:,.0f}")
    row("achieved (msg/s)", lambda r: _fmt(r.get("msgs_per_s"), 0))
    row("connections held", lambda r: f"{r['connections']:,}")
    row("deliveries per message", lambda r: _fmt(r.get("deliveries_per_msg"), 1))
    row("**deliveries/s**", lambda r: f"**{_fmt(r.get('deliveries_per_s'), 0)}**")
    row("server CPU % (one core = 100)", lambda r: _fmt(r.get("server_cpu_pct"), 0))
    row("server CPU-s in the window (user + system)", lambda r: (
        f"{r['server_cpu_s']:.1f} ({r.get('server_cpu_user_s', 0):.1f} + "
        f"{r.get('server_cpu_system_s', 0):.1f})"))
    row("server CPU-s per 100K deliveries", lambda r: _fmt(r.get("cpu_s_per_100k"), 2))
    row("**deliveries per server CPU-s**",
        lambda r: f"**{_fmt(r.get('deliveries_per_cpu_s'), 0)}**")
    row("target deliveries per CPU-s", lambda r: (
        f">= {FANOUT_TARGETS[r['server']]:,} " + (
            "met" if (r.get("deliveries_per_cpu_s") or 0) >= FANOUT_TARGETS[r["server"]]
            else "**missed**")) if r["server"] in FANOUT_TARGETS else "")
    row("messages per server CPU-s", lambda r: _fmt(r.get("msgs_per_cpu_s"), 0))
    row("latency p50 (ms)", lambda r: _fmt(r["latency_ms"].get("p50"), 1))
    row("**latency p99 (ms)**", lambda r: f"**{_fmt(r['latency_ms'].get('p99'), 1)}**")
    row("latency max (ms)", lambda r: _fmt(r["latency_ms"].get("max"), 1))
    row("target p99 < 100 ms", lambda r: "met" if (r["latency_ms"].get("p99") or 1e9)
        < P99_TARGET_MS else "**missed**")
    row("messages timed by floodtest", lambda r: f"{r.get('timed_messages') or 0:,}")
    row("slow consumers dropped", lambda r: str(r.get("slow_consumers_dropped")))
    row("msggen errors / missed slots",
        lambda r: f"{r.get('msggen_errors')} / {r.get('msggen_missed')}")
    row("POST latency p50 / p99 (ms)", lambda r: (
        f"{_fmt(r['post_latency_ms'].get('p50'), 1)} / "
        f"{_fmt(r['post_latency_ms'].get('p99'), 1)}"))
    row("msggen / floodtest CPU %", lambda r: (
        f"{_fmt(r.get('msggen_cpu_pct'), 0)} / {_fmt(r.get('floodtest_cpu_pct'), 0)}"))
    row(f"whole machine CPU % ({os.cpu_count()} cores = {100 * (os.cpu_count() or 1)})",
        lambda r: _fmt(r.get("machine_cpu_pct"), 0))
    L += ["", "Targets: >= 100,000 deliveries per server CPU-second (greenlet), >= 300,000 "
          "(pool); p99 < 100 ms at 50% of the saturating rate.", ""]
    if any(r["steps"] for r in results):
        L += ["## Step-up", "", "| server | target msg/s | achieved msg/s | server CPU % | "
              "msggen CPU % | floodtest CPU % | machine CPU % | POST p99 (ms) | errors |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results:
            for s in r["steps"]:
                L.append(f"| {r['label']} | {s['target']:,.0f} | {s['achieved']:,.0f} | "
                         f"{_fmt(s['server_cpu_pct'], 0)} | {_fmt(s['msggen_cpu_pct'], 0)} | "
                         f"{_fmt(s['floodtest_cpu_pct'], 0)} | "
                         f"{_fmt(s.get('machine_cpu_pct'), 0)} | {_fmt(s['post_p99_ms'], 1)} | "
                         f"{s['errors']} |")
        L += ["", "CPU % is of one core; the machine has "
              f"{os.cpu_count()}. A server at ~100% is saturated (one process, one core); "
              "a msggen near 100% means the load generator, not the server, set the limit.", ""]
    return _write_report(out, L, graphs, notes)


@cli.command("fanout")
@click.option("--users", default=100_000, show_default=True, type=click.IntRange(min=20),
              help="Users in the generated friends graph (genfriends --n).")
@click.option("--m", "m", default=15, show_default=True, type=click.IntRange(min=1),
              help="Friends each new user makes (genfriends --m; ~2m friends on average).")
@click.option("--seed", default=1, show_default=True, type=int, help="genfriends --seed.")
@click.option("--connections", default=10_000, show_default=True, type=click.IntRange(min=1),
              help="Users 1..C to connect with floodtest (< 19,800).")
@click.option("--rate", default=0.0, show_default=True, type=float,
              help="Messages/s for the measured run (0: step up to the saturating rate and "
                   "run at --load-fraction of it).")
@click.option("--load-fraction", default=0.5, show_default=True, type=float,
              help="Fraction of the saturating rate the measured run publishes at.")
@click.option("--duration", default=30.0, show_default=True, type=float,
              help="Seconds of the measured run.")
@click.option("--step-duration", default=3.0, show_default=True, type=float,
              help="Seconds per step of the step-up.")
@click.option("--step-start", default=500.0, show_default=True, type=float,
              help="First step's rate (msg/s); each next step doubles it.")
@click.option("--step-max", default=64_000.0, show_default=True, type=float,
              help="Highest step rate tried.")
@click.option("--step-concurrency", default=16, show_default=True, type=int,
              help="msggen --concurrency during the step-up.")
@click.option("--concurrency", default=8, show_default=True, type=int,
              help="msggen --concurrency during the measured run.")
@_modes_option
@click.option("--interval", default=0.5, show_default=True, type=float,
              help="Seconds between samples.")
@click.option("--data-dir", default=str(ROOT / "data" / "bench"), show_default=True,
              help="Where generated friends databases are cached (keyed by users, m, seed).")
@_out_option
def fanout_command(users: int, m: int, seed: int, connections: int, rate: float,
                   load_fraction: float, duration: float, step_duration: float,
                   step_start: float, step_max: float, step_concurrency: int, concurrency: int,
                   modes: str, interval: float, data_dir: str, out: str | None) -> None:
    """Fan-out throughput and latency: friends graph, C connected users, msggen at a rate.

    Per mode (a fresh server each, one after the other): deliveries/s, server
    CPU-seconds per 100K deliveries and deliveries per server CPU-second,
    delivery latency p50/p99/max (floodtest), slow consumers dropped. Without
    --rate, a short step-up finds the saturating rate first and the measured
    run publishes at --load-fraction of it. Graphs CPU% and deliveries/s over
    time, and the step-up.
    """
    mode_list = _modes(modes)
    if connections > 19_500:
        raise click.BadParameter("one server process holds at most ~19,800 connections",
                                 param_hint="--connections")
    if connections > users:
        raise click.BadParameter("cannot connect more users than exist", param_hint="--connections")
    if m >= users:
        raise click.BadParameter("--m must be below --users", param_hint="--m")
    raise_nofile()
    outdir = _resolve_out(out, "fanout")
    logdir = outdir / "logs"
    opts = {"users": users, "m": m, "seed": seed, "connections": connections, "rate": rate,
            "load_fraction": load_fraction, "duration": duration,
            "step_duration": step_duration, "step_start": step_start, "step_max": step_max,
            "step_concurrency": step_concurrency, "concurrency": concurrency,
            "interval": interval}
    info = machine_info()
    notes: list[str] = []
    results = []
    try:
        db, meta = ensure_db(Path(data_dir), users, m, seed, logdir)
        for mode in mode_list:
            r = fanout_one(mode, db, opts, logdir)
            r["_duration"] = duration
            results.append(r)
    finally:
        stop_all()
    for r in results:
        if r["connections"] < 0.99 * connections:
            notes.append(f"{r['label']}: only {r['connections']:,} of {connections:,} "
                         "connections were held.")
        if r.get("msggen_missed"):
            notes.append(f"{r['label']}: msggen missed {r['msggen_missed']} slots in the "
                         "measured run (the server, or msggen itself, was slower than the rate).")
        if r.get("steps") and r["steps"][-1]["achieved"] >= 0.9 * r["steps"][-1]["target"]:
            notes.append(f"{r['label']}: the step-up reached --step-max without saturating.")
    finish_info(info, notes)
    graphs = fanout_graphs(results, outdir)
    write_samples_csv(outdir / "samples.csv", {r["server"]: r["samples"] for r in results})
    (outdir / "summary.json").write_text(json.dumps(
        {"scenario": "fanout", "command": command_line(), "machine": info, "options": opts,
         "dataset": meta, "results": _strip(results), "notes": notes}, indent=2) + "\n")
    fanout_report(results, meta, opts, info, notes, outdir, graphs)
    log(f"fanout: report {outdir / 'report.md'}")
    click.echo(str(outdir / "report.md"))


def main() -> None:
    def _term(_sig, _frame):
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, _term)
    try:
        cli(prog_name="cometd-bench")
    finally:
        stop_all()


if __name__ == "__main__":
    main()
