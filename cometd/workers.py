"""``cometd --workers N``: one router and N edges on this machine, supervised.

The edges share the HTTP port with SO_REUSEPORT, so the kernel spreads new
connections over them; each edge holds up to ~19,800 connections (this
machine allows 20,000 open files per process). The supervisor restarts a
process that dies and stops them all on SIGINT or SIGTERM.

Each child is ``python -m cometd router`` or ``python -m cometd edge`` and
gets the supervisor's configuration whole, as JSON in ``COMETD_CONFIG_JSON``
(see :mod:`cometd.config`), with the ports the supervisor chose. A child is
ready when it prints its banner; the supervisor says "listening" only once
every child has. If Redis does not answer, or a child exits before it is
ready (the port is taken), the supervisor stops the others and exits
non-zero, leaving one line on stderr that says why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time

import cometd
from cometd import log
from cometd.config import CHILD_ENV, Config, redacted, to_json, url_host
from cometd.lifecycle import free_port, redis_problem

__all__ = ["supervise"]


def _child_env(config: Config) -> dict[str, str]:
    env = dict(os.environ, **{CHILD_ENV: to_json(config)})
    # The children import this very package, installed or not.
    root = os.path.dirname(os.path.dirname(os.path.abspath(cometd.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class _NotReady(Exception):
    def __init__(self, role: str, code: int) -> None:
        super().__init__(role, code)
        self.role, self.code = role, code


def _start(role: str, env: dict[str, str]) -> subprocess.Popen:
    """Start one child and wait for its banner; _NotReady if it exits first."""
    proc = subprocess.Popen([sys.executable, "-m", "cometd", role], stdout=subprocess.PIPE,
                            text=True, env=env)
    line = proc.stdout.readline()
    if not line:  # it exited; its own error line went to our stderr
        raise _NotReady(role, proc.wait())
    sys.stdout.write(line)
    sys.stdout.flush()
    return proc


def supervise(config: Config) -> int:
    """Run the router and the edges until a signal; restart any that die. The exit status."""
    http, admin, backplane = config.http, config.admin, config.backplane
    problem = redis_problem(backplane.redis)
    if problem:
        log.event("redis_unreachable", f"Redis at {redacted(backplane.redis)} does not "
                  f"answer ({problem}); not starting", logging.ERROR)
        return 1
    port = http.port or free_port(http.host)
    admin_port = admin.port or free_port(admin.host)
    config = dataclasses.replace(
        config, http=dataclasses.replace(http, port=port, reuse_port=True),
        admin=dataclasses.replace(admin, port=admin_port))
    env = _child_env(config)
    roles = ["router"] + ["edge"] * backplane.workers
    stopping = []
    # Before the first child: a signal during startup must stop the children
    # started so far, not kill the supervisor and leave them running.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.append(True))
    procs: list[subprocess.Popen | None] = []  # None: its restart failed, try again
    try:
        for role in roles:
            if stopping:
                break
            procs.append(_start(role, env))
        banner = f"cometd: listening on http://{url_host(http.host)}:{port}/"
        if config.admin_port is not None:
            banner += f" admin {url_host(admin.host)}:{admin_port}"
        if not stopping:
            print(f"{banner} mode={http.mode} db={config.store.db} workers={backplane.workers} "
                  f"redis {redacted(backplane.redis)}", flush=True)
        while not stopping:
            time.sleep(0.2)
            for i, proc in enumerate(procs):
                if (proc is None or proc.poll() is not None) and not stopping:
                    time.sleep(1)  # no tight loop if it cannot start at all
                    what = "did not start" if proc is None else f"exited with {proc.returncode}"
                    log.event("worker_restart", f"{roles[i]} {what}; restarting",
                              logging.WARNING, worker=roles[i])
                    procs[i] = None
                    with contextlib.suppress(_NotReady):
                        procs[i] = _start(roles[i], env)
    except _NotReady as exc:
        if exc.code != 1:  # 1: the child printed its own one-line error
            log.event("worker_failed", f"the {exc.role} exited with {exc.code} before it was "
                      "ready", logging.ERROR, worker=exc.role)
        return 1
    finally:
        live = [proc for proc in procs if proc is not None]
        for proc in live:
            if proc.poll() is None:
                proc.terminate()
        for proc in live:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0

