"""Tests for cometd.loadtest.streamreader: a real reader process against a real socket server.

The stand-in server here answers each stream with a head and then messages
written in pieces that split the ``ts=`` marker, so the counts are checked
against what actually went over the wire.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

from conftest import wait_for

from cometd.loadtest.streamreader import MARKER, count_markers

MESSAGES = 7  # per stream


def test_count_markers_finds_a_marker_split_across_reads():
    assert count_markers(b"", b"ts=1;ts=2;") == (2, b"2;")
    n1, tail = count_markers(b"", b"head t")
    n2, tail = count_markers(tail, b"s=1; x")
    assert (n1, n2) == (0, 1)
    n3, tail = count_markers(tail, b"t")
    n4, _ = count_markers(tail, b"s=")
    assert (n3, n4) == (0, 1)
    assert len(MARKER) == 3


class Writer:
    """Accepts streams; answers each GET with a head, then MESSAGES messages in pieces."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.paths: list[bytes] = []
        self.done = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._stream, args=(conn,), daemon=True).start()

    def _stream(self, conn: socket.socket) -> None:
        req = b""
        while b"\r\n\r\n" not in req:
            req += conn.recv(4096)
        self.paths.append(req.split(b" ")[1])
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\nWelcome, Id: x\n")
        self.done.wait(10)
        for i in range(MESSAGES):
            for piece in (b"t", b"s=%d;from=1;" % i, b"xx\n"):
                conn.sendall(piece)
                time.sleep(0.002)

    def close(self) -> None:
        self.sock.close()
        for c in self._conns:
            c.close()


def test_reader_counts_every_message_of_every_stream(tmp_path):
    w = Writer()
    paths = ["/test/1", "/sub/1,2,3", "/test/2"]
    pfile = tmp_path / "paths.txt"
    pfile.write_text("\n".join(paths) + "\n")
    status = tmp_path / "status.json"
    proc = subprocess.Popen([sys.executable, "-m", "cometd.loadtest.streamreader",
                             "--server", f"127.0.0.1:{w.port}", "--paths", str(pfile),
                             "--status", str(status), "--interval", "0.05", "--timeout", "30"])
    try:
        def read() -> dict:
            try:
                return json.loads(status.read_text())
            except (OSError, ValueError):
                return {}
        wait_for(lambda: read().get("answered") == len(paths), timeout=10)
        assert read()["deliveries"] == 0  # the heads and welcomes carry no marker
        w.done.set()
        wait_for(lambda: read().get("deliveries") == MESSAGES * len(paths), timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        final = read()
        assert final["deliveries"] == MESSAGES * len(paths)
        assert (final["connected"], final["errors"], final["timed_out"]) == (3, 0, False)
        assert sorted(w.paths) == sorted(p.encode() for p in paths)
    finally:
        proc.kill()
        w.close()


def test_reader_refuses_an_address_off_loopback(tmp_path):
    pfile = tmp_path / "paths.txt"
    pfile.write_text("/test/1\n")
    proc = subprocess.run([sys.executable, "-m", "cometd.loadtest.streamreader", "--server",
                           "10.1.2.3:80", "--paths", str(pfile), "--status",
                           str(tmp_path / "s.json")], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode != 0
    assert "loopback" in proc.stderr.lower() or "127.0.0.0/8" in proc.stderr
    assert "Traceback" not in proc.stderr
