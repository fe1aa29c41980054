#!/usr/bin/env python3
"""A screenshot of the demo page (``GET /``) with a few messages, for the README.

    .venv/bin/python bench/screenshot.py [--out bench/results/demo-page.png]

Starts a ``bin/cometd`` on an empty database in a temporary directory (loopback,
ephemeral ports), follows a few users, opens the page in Debian's headless
Chromium (tests/browser.py starts it), publishes some messages through the API,
kicks the user through the admin console so that the page shows a resume,
publishes from the page itself, and saves the window as a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the one way the suite starts Chromium

from browser import chrome  # noqa: E402

from cometd.lifecycle import BANNER  # noqa: E402

USER = "alice"
FOLLOWS = ["bob", "carol", "dave"]
MESSAGES = [("bob", "Anyone up for lunch at noon?"),
            ("carol", "The deploy is out: streams resume after a restart now."),
            ("alice", "Reading the benchmarks, brb"),
            ("dave", "<b>markup</b> stays text: the page never parses a message as HTML")]
AWAY = ("bob", "Published while alice was away: replayed on reconnect")


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"screenshot: {what} not reached within {timeout} s")


def post(url: str, body: bytes) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, body, method="POST"),
                                timeout=10) as answer:
        return json.loads(answer.read())


def admin(port: int, line: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(line.encode() + b"\nquit\n")
        return sock.makefile().read()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "demo-page.png"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "bin", "cometd"), "--port", "0",
             "--admin-port", "0", "--db", os.path.join(tmp, "db"),
             "--sse-retry-min", "1", "--sse-retry-max", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        driver = None
        try:
            match = BANNER.search(proc.stdout.readline())
            if match is None:
                raise SystemExit("screenshot: cometd did not start")
            url, admin_port = f"http://127.0.0.1:{match.group(2)}", int(match.group(4))
            pairs = [[USER, other] for other in FOLLOWS] + [["erin", USER], ["bob", USER]]
            post(url + "/subscriptions", json.dumps(pairs).encode())
            driver = chrome(os.path.join(tmp, "chrome"), width=1280, height=1000)
            driver.get(f"{url}/#user={USER}")
            state = "return document.getElementById('state').dataset.state"
            count = "return document.querySelectorAll('#feed li').length"
            wait(lambda: driver.execute_script(state) == "open", 15, "the stream")
            for subject, body in MESSAGES:
                post(f"{url}/send/{subject}", body.encode())
            wait(lambda: driver.execute_script(count) == len(MESSAGES), 15, "the messages")
            admin(admin_port, f"kick {USER}")
            wait(lambda: driver.execute_script(state) == "reconnecting", 15, "the kick")
            post(f"{url}/send/{AWAY[0]}", AWAY[1].encode())
            wait(lambda: driver.execute_script(state) == "open", 15, "the resume")
            driver.execute_script("document.getElementById('message').value = arguments[0];"
                                  "document.getElementById('send').click();",
                                  "Sent from the demo page")
            wait(lambda: driver.execute_script(count) == len(MESSAGES) + 2, 15, "the last one")
            time.sleep(1)  # the arrival highlight fades
            driver.save_screenshot(args.out)
        finally:
            if driver is not None:
                driver.quit()
            proc.terminate()
            proc.wait(10)
    print(f"screenshot: wrote {args.out}")


if __name__ == "__main__":
    main()
