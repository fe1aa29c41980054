"""``cometd --workers N``: one router and N edges on this machine, supervised.

The edges share the HTTP port with SO_REUSEPORT, so the kernel spreads new
connections over them; each edge holds up to ~19,800 connections (this
machine allows 20,000 open files per process). The supervisor restarts a
process that dies and stops them all on SIGINT or SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

__all__ = ["supervise"]

COMETD = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                       "bin", "cometd")]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _start(args: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(COMETD + args, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # the child's banner: it is serving
    sys.stdout.write(line)
    sys.stdout.flush()
    return proc


def supervise(workers: int, redis_url: str, db: str, host: str, port: int, mode: str,
              admin_host: str, admin_port: int | None, admin_password: str | None,
              extra: list[str]) -> None:
    """Run the router and *workers* edges until a signal; restart any that die."""
    if port == 0:
        port = _free_port(host)
    if admin_port == 0:
        admin_port = _free_port(admin_host)
    router_args = ["router", "--redis", redis_url, "--db", db, "--admin-host", admin_host,
                   "--admin-port", str(-1 if admin_port is None else admin_port)]
    if admin_password:
        router_args += ["--admin-password", admin_password]
    edge_args = ["edge", "--redis", redis_url, "--host", host, "--port", str(port),
                 "--mode", mode, "--reuse-port", *extra]
    specs = [router_args] + [edge_args] * workers
    stopping = []
    # Before the first child: a signal during startup must stop the children
    # started so far, not kill the supervisor and leave them running.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.append(True))
    procs: list[subprocess.Popen] = []
    try:
        for args in specs:
            if stopping:
                break
            procs.append(_start(args))
        banner = f"cometd: listening on http://{host}:{port}/"
        if admin_port is not None:
            banner += f" admin {admin_host}:{admin_port}"
        if not stopping:
            print(f"{banner} mode={mode} db={db} workers={workers} redis {redis_url}",
                  flush=True)
        while not stopping:
            time.sleep(0.2)
            for i, proc in enumerate(procs):
                if proc.poll() is not None and not stopping:
                    time.sleep(1)  # no tight loop if it cannot start at all
                    print(f"cometd: {specs[i][0]} exited with {proc.returncode}; restarting",
                          file=sys.stderr, flush=True)
                    procs[i] = _start(specs[i])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
