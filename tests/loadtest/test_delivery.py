"""The delivery check, in-process, and end to end: msggen and floodtest against a real
server whose streams are kicked while messages flow; the streams reconnect and resume.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time

from conftest import COMETD, ROOT, get_stats, start_server, wait_for

from cometd.loadtest.delivery import check, subscriptions

BIN = os.path.join(ROOT, "bin")


def test_check_finds_missing_duplicate_and_unexpected_deliveries():
    subs = subscriptions([("a", "b"), ("c", "a")], {"a", "b"}, directed=True)
    assert subs == {"a": {"a", "b"}, "b": {"b"}}
    published = [("a", "1-1"), ("b", "1-2"), ("c", "1-3")]
    good = check(subs, published, [("a", "1-1"), ("a", "1-2"), ("b", "1-2")])
    assert good.ok and (good.expected, good.received) == (3, 3), good
    bad = check(subs, published, [("a", "1-1"), ("a", "1-1"), ("b", "1-2"), ("b", "1-3")])
    assert (bad.missing, bad.duplicates, bad.unexpected) == (1, 1, 1)
    assert bad.examples == {"missing": [("a", "1-2")], "duplicates": [("a", "1-1")],
                            "unexpected": [("b", "1-3")]}
    undirected = subscriptions([("a", "b"), ("c", "a")], {"a", "b"})
    assert undirected == {"a": {"a", "b", "c"}, "b": {"a", "b"}}


def _kick(port: int, users: list[str]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        reader = sock.makefile("rb")
        while not reader.peek(8).startswith(b"cometd> ") and reader.read(1):
            pass
        for user in users:
            sock.sendall(f"kick {user}\n".encode())
            line = b""
            while not line.startswith(b"OK kicked"):
                line = reader.readline().lstrip(b"cometd> ")


def test_nothing_lost_nothing_twice_while_streams_are_kicked(tmp_path):
    users = 40
    rng = random.Random(3)
    friends = tmp_path / "friends.txt"
    friends.write_text("".join(f"{a} {b}\n" for a in range(1, users + 1)
                               for b in rng.sample(range(1, users + 1), 4) if a != b))
    db = str(tmp_path / "db")
    subprocess.run([sys.executable, COMETD, "load", "--db", db, str(friends)], check=True,
                   cwd=ROOT, capture_output=True, timeout=60)
    srv = start_server(db, "--history-size", "1000")
    received, published = tmp_path / "received.txt", tmp_path / "published.txt"
    flood = subprocess.Popen(
        [sys.executable, os.path.join(BIN, "floodtest"), "--port", str(srv.port),
         "--n", str(users), "--events", "--reconnect", "--record", str(received),
         "--duration", "6", "--interval", "60", "--json", str(tmp_path / "flood.json")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: get_stats(srv)["connections"] == users, 10, what="all streams open")
        gen = subprocess.Popen(
            [sys.executable, os.path.join(BIN, "msggen"), "--url", srv.url, "--users",
             str(users), "--rate", "200", "--duration", "3", "--interval", "60",
             "--record", str(published)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        kicked = 0
        while gen.poll() is None:  # kick a few users again and again while it sends
            _kick(srv.admin_port, [str(rng.randint(1, users)) for _ in range(5)])
            kicked += 5
            time.sleep(0.1)
        assert gen.wait(10) == 0, gen.stdout.read()
        out, _ = flood.communicate(timeout=30)
        assert flood.returncode == 0, out
        assert kicked >= 50
        done = subprocess.run(
            [sys.executable, os.path.join(BIN, "cometd-bench"), "check", str(friends),
             str(published), str(received), "--users", f"1-{users}"],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert " 0 missing, 0 duplicates, 0 unexpected" in done.stdout, done.stdout
        summary = json.loads((tmp_path / "flood.json").read_text())
        assert summary["reconnects"] >= 20 and summary["welcomed"] > users, summary
        sent = len(published.read_text().splitlines())
        assert sent > 400, sent
    finally:
        flood.kill()
        srv.stop()
