"""SubscriptionStore on a real LevelDB in a temporary directory."""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from conftest import COMETD, http_json, start_server

from cometd.ids import InvalidId, int_value
from cometd.store import (
    SelfSubscription,
    StoreError,
    StoreLockedError,
    SubscriptionStore,
    encode_set,
)


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


def test_self_subscription_raises_and_changes_nothing(store):
    store.add_subscriptions([("a", "b")])
    for pair in (("c", "c"), (5, "5")):
        with pytest.raises(SelfSubscription, match="cannot subscribe to itself"):
            store.add_subscriptions([("c", "d"), pair])
    assert store.get_subscriptions("c") == [] and store.get_subscribers("c") == []
    assert store.get_subscribers("5") == []
    assert store.count() == (1, 1)
    # Removing one is fine (and cleans up a self-loop stored before the rule).
    assert store.remove_subscriptions([("a", "a")]) == 0


def test_changes_to_a_large_set_match_set_arithmetic(store):
    rng = random.Random(3)

    def ints(k: int) -> set[str]:
        return {str(n) for n in rng.sample(range(2**32), k)} | {"0", str(2**32 - 1)}

    model = ints(20_000) | {f"u:{n}" for n in range(300)}
    store.add_subscriptions([(u, "star") for u in model])
    for _ in range(30):
        known = rng.sample(sorted(model), 40) if model else []
        fresh = rng.sample(sorted(ints(30) | {f"u:{rng.randrange(600)}" for _ in range(5)}), 20)
        batch = set(known[:20] + fresh)
        if rng.random() < 0.5:
            assert store.add_subscriptions([(u, "star") for u in batch]) == len(batch - model)
            model |= batch
        else:
            assert store.remove_subscriptions([(u, "star") for u in batch]) == len(
                batch & model)
            model -= batch
    listed = store.get_subscribers("star")
    assert listed == sorted(model, key=lambda u: (int_value(u) is None, int_value(u) or 0, u))
    for user in rng.sample(sorted(model), 50):
        assert store.get_subscriptions(user) == ["star"]
    # Everyone leaves: the key goes, as for a small set.
    assert store.remove_subscriptions([(u, "star") for u in model]) == len(model)
    assert store.get_subscribers("star") == [] and store.count() == (0, 0)


#: a set over the threshold of a kept set, which these tests lower to 8 KB: a set of the
#: real 256 KB (70,000 ids) costs seconds of writes and exercises the same code
BIG = [str(n) for n in range(1, 3_001)]  # 12 KB


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr("cometd.store.CACHE_MIN_BYTES", 8 * 1024)
    assert 4 + 4 * len(BIG) > 8 * 1024


def test_large_sets_are_kept_and_every_write_shows(store, small_threshold):
    store.add_subscriptions([(u, "star") for u in BIG])
    first = store.subscriber_view("star")
    assert store.subscriber_view("star").ints.obj is first.ints.obj  # kept, not re-read
    assert store.add_subscriptions([("3001", "star"), ("n", "star")]) == 2
    view = store.subscriber_view("star")
    assert len(view) == 3_002 and "3001" in view and "n" in view
    assert store.remove_subscriptions([("1", "star")]) == 1
    view = store.subscriber_view("star")
    assert len(view) == 3_001 and "1" not in view
    extra = (1).to_bytes(4, "little") + (99_999).to_bytes(4, "little")
    store.bulk_merge("subscribers", [(b"\x02star", extra)])
    assert "99999" in store.subscriber_view("star")
    assert store.remove_subscriptions([(u, "star") for u in store.get_subscribers("star")])
    assert len(store.subscriber_view("star")) == 0


@pytest.mark.parametrize("members", [BIG, ["1", "2"]], ids=["large", "small"])
def test_a_value_read_before_a_write_is_not_kept(store, small_threshold, members):
    store.add_subscriptions([(u, "star") for u in members])
    real = store._subscribers

    class WriteDuringGet:  # another thread's write lands between the get and the keep
        done = False

        def get(self, key):
            value = real.get(key)
            if not self.done:  # once: the write itself reads through here too
                self.done = True
                writer = threading.Thread(
                    target=store.add_subscriptions, args=([("late", "star")],))
                writer.start()
                writer.join(10)
            return value

    store._subscribers = WriteDuringGet()
    assert "late" not in store.subscriber_view("star")  # what was read, before the write
    store._subscribers = real
    assert "late" in store.subscriber_view("star")  # and not kept: the write shows


def test_kept_sets_are_bounded(store, small_threshold, monkeypatch):
    monkeypatch.setattr("cometd.store.CACHE_BYTES", 30 * 1024)  # two of the three
    for subject in ("a", "b", "c"):
        store.add_subscriptions([(u, subject) for u in BIG])
    for subject in ("a", "b", "a", "c"):
        store.subscriber_view(subject)
    assert store._cache_bytes == sum(map(len, store._cache.values())) <= 30 * 1024
    assert list(store._cache) == [b"\x02a", b"\x02c"]  # the least recently used went


def test_subscriber_view_answers_membership_like_the_list(store):
    pairs = [(str(n), "star") for n in range(0, 3000, 3)]
    pairs += [(f"user:{n}", "star") for n in range(0, 900, 3)]
    pairs += [("007", "star"), (str(2**32 - 1), "star"), (str(2**32), "star")]
    store.add_subscriptions(pairs)
    listed = store.get_subscribers("star")
    subscribers = store.subscriber_view("star")
    assert len(subscribers) == len(listed) == len(pairs)
    ints = [int_value(u) for u in listed if int_value(u) is not None]
    names = [u for u in listed if int_value(u) is None]
    assert subscribers.nbytes == len(encode_set(ints, names))
    probes = [str(n) for n in range(-1, 3001)] + [f"user:{n}" for n in range(901)]
    probes += ["007", "7", str(2**32 - 1), str(2**32), "user:", "user:3000", "a", "zzz"]
    assert [p for p in probes if p in subscribers] == [p for p in probes if p in listed]
    empty = store.subscriber_view("nobody")
    assert len(empty) == 0 and "1" not in empty and "a" not in empty


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


def test_small_sets_are_kept_and_every_write_shows(store):
    store.add_subscriptions([("1", "friend"), ("2", "friend")])
    first = store.subscriber_view("friend")
    assert store.subscriber_view("friend").ints.obj is first.ints.obj  # kept, not re-read
    assert len(store.subscriber_view("lonely")) == 0  # nobody: kept as empty
    store.add_subscriptions([("3", "friend"), ("lonely", "x"), ("9", "lonely")])
    assert sorted(map(int, store.subscriber_view("friend").ints)) == [1, 2, 3]
    assert "9" in store.subscriber_view("lonely")
    store.remove_subscriptions([("1", "friend")])
    assert "1" not in store.subscriber_view("friend")
    extra = (1).to_bytes(4, "little") + (77).to_bytes(4, "little")
    store.bulk_merge("subscribers", [(b"\x02friend", extra)])
    assert "77" in store.subscriber_view("friend")


def test_kept_small_sets_are_bounded(store, monkeypatch):
    monkeypatch.setattr("cometd.store.SMALL_CACHE_BYTES", 1000)
    store.add_subscriptions([(str(n), f"s{k}") for k in range(40) for n in range(1, 11)])
    for k in range(40):
        assert len(store.subscriber_view(f"s{k}")) == 10
        assert store._small_bytes == sum(len(v) + 120 for v in store._small.values())
        assert store._small_bytes <= 1000 + 44 + 120
    assert 0 < len(store._small) < 40
