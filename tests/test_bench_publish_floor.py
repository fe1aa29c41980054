"""bench/publish_floor.py: its floors answer every request they hold whole, and only those.

The figures are in BENCHMARKS.md ("Publishing: the fast path"); this keeps the
floors honest: a floor that answered early, or twice, would measure less
than a publish.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "publish_floor.py")

_spec = importlib.util.spec_from_file_location("publish_floor", SCRIPT)
floor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(floor)

SEND = b"POST /send/%d HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"


def test_whole_requests_are_answered_and_a_partial_one_waits():
    buf = bytearray(SEND % 1 + SEND % 2 + (SEND % 3)[:-2])
    assert floor.answers(buf) == floor.ANSWER * 2
    assert buf == (SEND % 3)[:-2]  # its body is not all in: kept, unanswered
    buf += b"lo" + b"POST /send/4 HTTP/1.1\r\nHost"
    assert floor.answers(buf) == floor.ANSWER
    assert buf == b"POST /send/4 HTTP/1.1\r\nHost"
    assert floor.answers(bytearray()) == b""


def test_the_epoll_floor_answers_each_request_of_a_keep_alive_connection():
    proc = subprocess.Popen([sys.executable, SCRIPT, "epoll"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().split("127.0.0.1:")[1].split("/")[0])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            got = b""
            for i in range(3):
                sock.sendall(SEND % i)
                while len(got) < (i + 1) * len(floor.ANSWER):
                    got += sock.recv(4096)
            assert got == floor.ANSWER * 3
            sock.sendall((SEND % 9)[:-1])  # a body short by a byte gets no answer
            sock.settimeout(0.2)
            try:
                extra = sock.recv(4096)
            except TimeoutError:
                extra = b""
            assert extra == b""
    finally:
        proc.kill()
        proc.wait(5)
