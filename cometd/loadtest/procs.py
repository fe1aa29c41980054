"""The harness's child processes: start them, bound them, end them.

Every tool runs with this interpreter as ``python -m <module>`` (:func:`tool`),
from a checkout or an installed package alike; :func:`spawn` logs its output
to a file, and every child is ended when the bench ends (:func:`stop_all`).

Theory of operation
-------------------
*Bounds.* Every child is bounded in time (its own ``--timeout`` and a deadline
here), targets only 127.0.0.0/8, and is terminated (SIGTERM, then SIGKILL)
when the bench ends or is interrupted; children also get SIGTERM if the bench
process dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cometd

__all__ = [
    "ROOT", "SOURCE_IPS", "log", "spawn", "stop", "stop_all", "tool", "raise_nofile",
    "read_json", "floodtest", "end_floodtest", "msggen", "wait_proc",
]


_PACKAGE_PARENT = str(Path(cometd.__file__).resolve().parents[1])
_CHECKOUT = Path(__file__).resolve().parents[2]
#: Where the harness works (``data/bench``, ``git rev-parse``): the checkout it
#: runs from, or, from an installed package, the current directory.
ROOT = _CHECKOUT if (_CHECKOUT / "setup.cfg").exists() else Path.cwd()


SOURCE_IPS = "127.0.1.1-127.0.1.20"


_T0 = time.monotonic()


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _child_setup(cpus: set[int] | None = None) -> None:  # in the child, before exec
    if cpus:
        os.sched_setaffinity(0, cpus)  # inherited by every thread the child starts
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


_CHILDREN: list[subprocess.Popen] = []


def spawn(argv: list[str], logfile: Path, cpus: set[int] | None = None,
          **kw: Any) -> subprocess.Popen:
    """Start *argv* with stdout+stderr to *logfile*; it is ended when the bench ends.

    *cpus*: the cores it (and every thread and child of it) may run on.
    """
    f = open(logfile, "ab")  # noqa: SIM115 - closed with the process in stop()
    f.write(f"$ {shlex.join(argv)}\n".encode())
    f.flush()
    # The children import this very package, installed or not.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(argv, stdout=kw.pop("stdout", f), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=str(ROOT),
                            preexec_fn=lambda: _child_setup(cpus),
                            env=env, **kw)
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


_TOOLS = {"cometd": "cometd", "genfriends": "cometd.graphgen",
          "floodtest": "cometd.loadtest.floodtest", "msggen": "cometd.loadtest.msggen",
          "streamreader": "cometd.loadtest.streamreader"}


def tool(name: str) -> list[str]:
    """argv prefix that runs one of the project's commands (``cometd``, ``floodtest``...)."""
    return [sys.executable, "-m", _TOOLS[name]]


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


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
           logdir: Path, tag: str, seed: int = 1, size: int = 0, count: int = 0,
           cpus: set[int] | None = None, batch: int = 1) -> tuple[subprocess.Popen, Path]:
    json_path = logdir / f"msggen-{tag}.json"
    argv = [*tool("msggen"), "--url", url, "--rate", f"{rate:g}", "--duration", f"{duration:g}",
            "--size", str(size), "--count", str(count), "--batch", str(batch),
            "--users", str(users), "--concurrency", str(concurrency), "--interval",
            f"{max(1.0, duration / 4):g}", "--json", str(json_path), "--seed", str(seed),
            "--timeout", f"{duration + 20:g}"]
    return spawn(argv, logdir / f"msggen-{tag}.log", cpus=cpus), json_path


def wait_proc(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log(f"pid {proc.pid} overran {timeout:g}s; terminating it")
        return stop(proc)
