"""SubscriptionStore on a real LevelDB in a temporary directory."""

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import COMETD, http_json, start_server

from cometd.ids import InvalidId
from cometd.store import StoreError, StoreLockedError, SubscriptionStore


@pytest.fixture
def store(tmp_path):
    s = SubscriptionStore(tmp_path / "db")
    yield s
    s.close()


def test_both_keyspaces_change_together(store):
    assert store.add_subscriptions([("alice", "rj"), ("bob", "rj"), ("alice", "bob")]) == 3
    assert store.get_subscribers("rj") == ["alice", "bob"]
    assert store.get_subscriptions("alice") == ["bob", "rj"]
    assert store.get_subscriptions("bob") == ["rj"]
    assert store.remove_subscriptions([("bob", "rj")]) == 1
    assert store.get_subscribers("rj") == ["alice"]
    assert store.get_subscriptions("bob") == []


def test_set_semantics(store):
    assert store.add_subscriptions([("a", "b"), ("a", "b")]) == 1
    assert store.add_subscriptions([("a", "b")]) == 0
    assert store.remove_subscriptions([("x", "y")]) == 0
    assert store.remove_subscriptions([("a", "b")]) == 1
    assert store.remove_subscriptions([("a", "b")]) == 0
    assert store.get_subscribers("b") == []
    assert store.count() == (0, 0)


def test_id_kinds_round_trip_as_strings(store):
    pairs = [(123, "user:1"), ("007", "user:1"), ("photo:789", "user:1"), ("7", "user:1"),
             (2**32 - 1, "user:1"), (str(2**32), "user:1"), ("0", "user:1")]
    store.add_subscriptions(pairs)
    # integers numerically first, then names in byte order; "007" stays a name
    assert store.get_subscribers("user:1") == [
        "0", "7", "123", str(2**32 - 1), "007", str(2**32), "photo:789"]
    assert store.get_subscriptions(123) == ["user:1"]
    assert store.get_subscriptions("123") == ["user:1"]


@pytest.mark.parametrize("bad", ["", "a b", "x" * 65, "é", "a/b", -1, None, True, 1.5])
def test_bad_id_raises_and_changes_nothing(store, bad):
    store.add_subscriptions([("a", "b")])
    with pytest.raises(InvalidId):
        store.add_subscriptions([("c", "d"), ("e", bad)])
    with pytest.raises(InvalidId):
        store.remove_subscriptions([("a", "b"), (bad, "b")])
    assert store.get_subscriptions("c") == []
    assert store.get_subscribers("b") == ["a"]
    if isinstance(bad, str):
        with pytest.raises(InvalidId):
            store.get_subscribers(bad)


def test_second_opener_gets_clear_error(tmp_path, store):
    with pytest.raises(StoreLockedError, match="already open in this process"):
        SubscriptionStore(tmp_path / "db")
    db = str(tmp_path / "db")
    code = f"from cometd.store import SubscriptionStore; SubscriptionStore({db!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "already open" in proc.stderr


def test_persists_across_reopen(tmp_path):
    with SubscriptionStore(tmp_path / "db") as s:
        s.add_subscriptions([("1", "2"), ("3", "2")])
    with SubscriptionStore(tmp_path / "db") as s:
        assert s.get_subscribers("2") == ["1", "3"]


def test_acknowledged_write_survives_sigkill(tmp_path):
    """A child acknowledges each write on stdout; we SIGKILL it right after.

    This shows nothing is held back in the process (the page cache survives a
    SIGKILL); that it is on disk is the strace test's below.
    """
    db = tmp_path / "db"
    child = textwrap.dedent(f"""
        import sys, time
        from cometd.store import SubscriptionStore
        s = SubscriptionStore({str(db)!r})
        for i in range(1, 1_000_000):
            s.add_subscriptions([(i, "star")])
            print(i, flush=True)
            if i == 50:
                s.remove_subscriptions([(7, "star")])
                print("removed", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    acked = 0
    for line in proc.stdout:
        if line.strip() == "removed":
            continue
        acked = int(line)
        if acked >= 80:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with SubscriptionStore(db) as s:
        subscribers = [int(x) for x in s.get_subscribers("star")]
    assert set(range(1, acked + 1)) - {7} <= set(subscribers)
    assert 7 not in subscribers


_SYNC = re.compile(r"^\d+ +(?:f(?:data)?sync|sync_file_range)\((\d+)<([^>]*)>")
_LOG_WRITE = re.compile(r"^\d+ +write\((\d+)<([^>]*\.log)>, \"(.*)\", \d+\) = \d+")
_RESPONSE = re.compile(r"^\d+ +sendto\(\d+<TCP:\[[^]]*\]>, \"HTTP/1\.1 (\d+)")


@pytest.mark.skipif(shutil.which("strace") is None,
                    reason="needs strace (bin/dev test installs it)")
def test_subscription_change_is_synced_before_it_is_acknowledged(tmp_path):
    """The server's own system calls: the LevelDB log write that carries a
    change is fdatasync'ed before the HTTP answer to it is sent, for an add
    and for a remove."""
    trace = tmp_path / "trace.txt"
    srv = start_server(str(tmp_path / "db"), "--admin-port", "-1", prefix=[
        "strace", "-f", "-yy", "-s", "256", "-o", str(trace),
        "-e", "trace=write,writev,pwrite64,sendto,sendmsg,fsync,fdatasync,sync_file_range"])
    try:
        assert http_json(srv, "POST", "/subscriptions", [["dur-add", "dur-subject"]]) == (
            200, {"added": 1})
        assert http_json(srv, "DELETE", "/subscriptions", [["dur-add", "dur-subject"]]) == (
            200, {"removed": 1})
    finally:
        # strace detaches on SIGTERM and would leave the server running: stop the
        # server itself, and strace ends with it.
        with open(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        srv.proc.wait(20)
    lines = trace.read_text().splitlines()
    answers = [i for i, line in enumerate(lines) if _RESPONSE.match(line)]
    assert len(answers) == 2, [line for line in lines if "sendto" in line]
    start = 0
    for answer in answers:
        # the change's record in the log, then a sync of that log, then the answer
        written = [i for i in range(start, answer) if (m := _LOG_WRITE.match(lines[i]))
                   and "dur-add" in m.group(3) and "dur-subject" in m.group(3)]
        assert written, lines[start:answer]
        log = _LOG_WRITE.match(lines[written[-1]]).group(2)
        synced = [i for i in range(written[-1], answer) if (m := _SYNC.match(lines[i]))
                  and m.group(2) == log]
        assert synced, lines[written[-1]:answer + 1]
        start = answer + 1


def test_a_second_server_on_a_database_in_use_says_what_to_do(tmp_path):
    db = str(tmp_path / "db")
    first = start_server(db)
    try:
        second = subprocess.run([sys.executable, COMETD, "--db", db, "--port", "0",
                                 "--admin-port", "-1"], capture_output=True, text=True, timeout=30)
    finally:
        first.stop()
    assert second.returncode == 1, second
    assert second.stderr == (
        f"cometd: error: subscription database {db} is already open in another process (is"
        " another cometd running on this database? stop it, or pass --db another/path)\n"
    ), second.stderr


@pytest.mark.parametrize("under", ["", "sub/db"])
def test_db_on_a_regular_file_says_not_a_directory(tmp_path, under):
    plain = tmp_path / "f"
    plain.write_text("not a database\n")
    path = plain / under if under else plain
    with pytest.raises(StoreError) as info:
        SubscriptionStore(path)
    assert not isinstance(info.value, StoreLockedError)
    assert "not a directory" in str(info.value)
    assert "already open" not in str(info.value)
    assert plain.read_text() == "not a database\n"  # and nothing was created or changed
