"""The servers under test: cometd in one mode, and nginx + nchan as a peer.

Each :class:`Server` knows its processes (for RSS and CPU), its loopback
address and how to read its own counters (connections, deliveries).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import resource
import shutil
import subprocess
import threading
import time
from pathlib import Path

import click
import psutil

from cometd.lifecycle import BANNER, free_port
from cometd.loadtest.procs import spawn, stop, tool

__all__ = [
    "NCHAN_TEMPLATE", "NCHAN_MODULE", "Server", "CometdServer", "nchan_available",
    "NchanServer", "parse_modes", "modes_option",
]


NCHAN_TEMPLATE = Path(__file__).with_name("nchan.conf")


NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")


class Server:
    """A server under test: its processes, its address and its own counters."""

    name = "server"
    label = "server"
    host = "127.0.0.1"
    port = 0
    proc: subprocess.Popen | None = None

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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


class CometdServer(Server):
    """``cometd`` in one process, one mode, on a free loopback port."""

    def __init__(self, mode: str, db: str, logdir: Path, timeout: float = 60.0,
                 cpus: set[int] | None = None) -> None:
        super().__init__()
        self.name = self.label = mode
        self.label = f"cometd {mode}"
        argv = [*tool("cometd"), "--port", "0", "--admin-port", "-1", "--db", db,
                "--mode", mode]
        log_path = logdir / f"server-{mode}.log"
        self.proc = spawn(argv, log_path, cpus=cpus, stdout=subprocess.PIPE)
        found: list[re.Match] = []
        logf = self.proc._bench_log  # type: ignore[attr-defined]

        def reader() -> None:
            for line in self.proc.stdout:
                logf.write(line)
                logf.flush()
                m = BANNER.search(line.decode(errors="replace"))
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
                 timeout: float = 30.0, cpus: set[int] | None = None) -> None:
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
            self.proc = spawn(argv, logdir / "server-nchan.log", cpus=cpus)
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
        body = self._get("/stats") or b""
        found = {}
        for key, line in (("conns", rb"subscribers"), ("messages", rb"total published messages")):
            m = re.search(rb"^" + line + rb": (\d+)", body, re.M)
            found[key] = int(m.group(1)) if m else None
        return {**found, "deliveries": None, "slow": None}


def parse_modes(value: str) -> list[str]:
    modes = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("greenlet", "pool")]
    if bad or not modes:
        raise click.BadParameter(f"modes are greenlet and/or pool, comma-separated: {value!r}")
    return modes


modes_option = click.option(
    "--modes", default="greenlet,pool", show_default=True,
    help="cometd connection modes to run one after the other, each on a fresh server.")
