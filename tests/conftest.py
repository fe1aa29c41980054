"""Shared fixtures: real cometd server processes on ephemeral ports."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMETD = os.path.join(ROOT, "bin", "cometd")
_READY = re.compile(r"listening on http://([\d.]+):(\d+)/(?: admin ([\d.]+):(\d+))?")


@dataclass
class ServerProcess:
    """A running `bin/cometd` and where to reach it."""

    proc: subprocess.Popen
    host: str
    port: int
    admin_port: int | None
    db: str
    output: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_server(db: str, *args: str, timeout: float = 20) -> ServerProcess:
    """Start `bin/cometd --port 0 --admin-port 0 --db DB ARGS` and wait until it listens."""
    cmd = [sys.executable, COMETD, "--port", "0", "--admin-port", "0", "--db", db, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    lines: list[str] = []
    found: list[re.Match] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            match = _READY.search(line)
            if match and not found:
                found.append(match)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = timeout
    while not found and proc.poll() is None and deadline > 0:
        threading.Event().wait(0.05)
        deadline -= 0.05
    if not found:
        proc.kill()
        raise RuntimeError("cometd did not start:\n" + "".join(lines))
    m = found[0]
    return ServerProcess(proc, m.group(1), int(m.group(2)),
                         int(m.group(4)) if m.group(4) else None, db, lines)


@pytest.fixture(params=["greenlet", "pool"])
def mode(request) -> str:
    """Both connection modes: the server suite runs against each."""
    return request.param


@pytest.fixture
def server(tmp_path, mode):
    """A fresh single-process server on an empty database, in each mode."""
    srv = start_server(str(tmp_path / "db"), "--mode", mode)
    yield srv
    srv.stop()
