"""Message ids, the persistent history and resuming streams.

In-process (a real LevelDB in a temp dir, a fake clock): id order, epochs,
trimming by size, age and bytes, the replay merge and the rules for
"recovered". Against real servers, in both connection modes: an exact replay,
``?since=`` on chunked streams, a resume across a kill -9 and restart, each
not-recovered case with its header and ``event: gap``, and the seam between
replay and live under concurrent publishing.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import struct
import threading
import time

import plyvel
import pytest
from conftest import StreamClient, http_json, start_server, unique_id

from cometd.history import STAMPS, History, format_id, id_bytes, parse_id
from cometd.ids import encode_key

# -- in-process ----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path):
    database = plyvel.DB(str(tmp_path / "db"), create_if_missing=True)
    yield database
    database.close()


def ids(replay) -> list[str]:
    return [format_id(key) for key, _, _ in replay.messages]


def test_ids_order_by_epoch_then_sequence_and_round_trip():
    keys = [parse_id(text) for text in ("1-1", "1-2", "1-10", "2-0", "2-1", "10-3")]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert [format_id(k) for k in keys] == ["1-1", "1-2", "1-10", "2-0", "2-1", "10-3"]
    for bad in ("", "1", "1-", "-1", "a-1", "1-1-1", " 1-1", "1-1\n", "1.0-1",
                "99999999999-1", "1-" + "9" * 21, "4294967296-1"):
        assert parse_id(bad) is None, bad


def test_each_opening_is_a_new_epoch_and_ids_increase(tmp_path):
    path = str(tmp_path / "db")
    seen = []
    for _ in range(3):
        database = plyvel.DB(path, create_if_missing=True)
        history = History(database)
        seen += [history.record("a", b"x"), history.record("b", b"y")]
        database.close()
    assert seen == sorted(set(seen))
    assert [format_id(k) for k in seen] == ["1-1", "1-2", "2-1", "2-2", "3-1", "3-2"]


def test_replay_merges_the_subjects_in_id_order_after_the_id(db):
    history = History(db)
    sent = [(s, history.record(s, f"{s}{i}".encode())) for i in range(3) for s in "abcx"]
    since = format_id(sent[1][1])  # b0
    replay = history.replay(["a", "b", "c", "a"], since)
    assert replay.recovered and replay.reason == ""
    assert [body for _, _, body in replay.messages] == [
        b"c0", b"a1", b"b1", b"c1", b"a2", b"b2", b"c2"]
    assert [s for _, s, _ in replay.messages] == list("cabcabc")
    assert replay.head == sent[-1][1]
    assert history.replay(["a"], format_id(replay.head)) == (
        [], True, "", replay.head)  # nothing missed


def test_a_subject_trimmed_past_the_id_is_not_recovered(db):
    history = History(db, size=3)
    first = history.record("a", b"a0")
    keys = [history.record("a", b"a%d" % i) for i in range(1, 12)]
    history.record("b", b"b0")
    # A subject is trimmed to size once it holds a few more.
    kept = history.replay(["a"], "1-0")
    assert not kept.recovered and kept.reason.startswith("the history of a ")
    assert 3 <= len(kept.messages) <= 7 and kept.messages[-1][2] == b"a11"
    # From an id the history still reaches, it is complete.
    oldest = kept.messages[0][0]
    assert history.replay(["a", "b"], format_id(oldest)).recovered
    assert not history.replay(["a", "b"], format_id(first)).recovered
    assert history.replay(["b"], format_id(first)).recovered  # b lost nothing
    assert keys == sorted(keys)


def test_age_and_total_size_drop_the_oldest_and_raise_the_floor(db):
    clock = Clock()
    history = History(db, ttl=60, max_bytes=1000, clock=clock)
    old = history.record("a", b"old")
    clock.now += 30
    mid = history.record("b", b"mid")
    clock.now += 40  # "old" is 70 s old
    replay = history.replay(["a", "b"], format_id(old - 1))
    assert (ids(replay), replay.recovered, replay.reason) == (
        [format_id(mid)], False, "the id predates the history")
    assert history.replay(["a", "b"], format_id(old)).recovered
    # Bytes: 1000 in all, so ten 200-byte bodies keep the newest five or fewer.
    keys = [history.record("c", b"x" * 200) for _ in range(10)]
    replay = history.replay(["c"], format_id(mid))
    assert not replay.recovered and ids(replay) == [format_id(k) for k in keys[-len(ids(replay)):]]
    assert 1 <= len(replay.messages) <= 5
    assert history.replay(["c"], format_id(replay.messages[0][0] - 1)).recovered


def test_replay_max_sends_the_newest(db):
    history = History(db)
    keys = [history.record("a" if i % 2 else "b", b"%d" % i) for i in range(10)]
    replay = history.replay(["a", "b"], "1-0", limit=4)
    assert ids(replay) == [format_id(k) for k in keys[-4:]]
    assert (replay.recovered, replay.reason) == (False, "more than 4 messages to replay")
    assert history.replay(["a", "b"], "1-0", limit=10).recovered


def test_malformed_and_unknown_ids_are_not_recovered(db):
    history = History(db)
    history.record("a", b"x")
    assert history.replay(["a"], "yesterday")[1:3] == (False, "malformed id")
    assert history.replay(["a"], "1-2")[1:3] == (False, "unknown id")  # not handed out yet
    assert history.replay(["a"], "2-0")[1:3] == (False, "unknown id")  # a later epoch
    assert history.replay(["a"], "1-1")[1:3] == (True, "")


def test_history_survives_reopening_but_not_an_epoch_without_history(tmp_path):
    path = str(tmp_path / "db")
    database = plyvel.DB(path, create_if_missing=True)
    history = History(database)
    before = [history.record("a", b"one"), history.record("a", b"two")]
    database.close()
    database = plyvel.DB(path)
    history = History(database)
    after = history.record("a", b"three")
    replay = history.replay(["a"], format_id(before[0]))
    assert replay.recovered and [b for _, _, b in replay.messages] == [b"two", b"three"]
    database.close()
    # An epoch with --history-size 0 keeps nothing: its ids cannot be replayed later.
    database = plyvel.DB(path)
    off = History(database, size=0)
    unkept = off.record("a", b"lost")
    assert off.replay(["a"], format_id(after))[1:3] == (False, "no history is kept")
    database.close()
    database = plyvel.DB(path)
    history = History(database)
    for since in (after, unkept):
        replay = history.replay(["a"], format_id(since))
        assert (replay.recovered, replay.reason) == (False, "the id predates the history")
    database.close()


def _keys(db, prefix: bytes) -> list[bytes]:
    return list(db.iterator(prefix=prefix, include_value=False))


def test_a_message_is_one_put_and_its_time_a_stamp_a_second(db):
    clock = Clock()
    history = History(db, clock=clock)
    for second in range(5):
        for _ in range(3):
            history.record_batch([("a", b"x"), ("b", b"y")])
            clock.now += 0.3
        clock.now = 1_000_000.0 + second + 1
    assert len(_keys(db, b"h")) == 30
    # One stamp a second, at the first message kept in it; nothing else a message.
    stamps = list(db.iterator(prefix=STAMPS))
    assert [int.from_bytes(k[1:], "big") - (history.epoch << 64) for k, _ in stamps] == [
        1, 7, 13, 19, 25]
    assert len(list(db.iterator())) == 30 + 5 + 3  # and m:epoch, m:history-epoch, m:history-floor


def test_the_oldest_go_first_across_subjects_by_age_and_total_size(tmp_path):
    """Random sends from six subjects against a fake clock, each step checked against a model.

    Whatever the age and size bounds take is the oldest messages of all
    subjects: the history is every message after the floor, within
    max_bytes, none older than ttl + 1 s, and each message below the floor
    was either due or had to go for the total size.
    """
    rng = random.Random(7)
    db = plyvel.DB(str(tmp_path / "db"), create_if_missing=True)
    clock = Clock()
    ttl, most = 8, 3000
    history = History(db, size=1000, ttl=ttl, max_bytes=most, clock=clock)
    sent: list[tuple[int, str, bytes, float]] = []
    by_age = by_size = 0
    for step in range(300):
        clock.now += rng.choice([0.0, 0.2, 0.7, 0.9, 1.5, 4.0])
        longest = 400 if step % 100 < 50 else 40  # phases where the size, then the age binds
        batch = [(rng.choice("abcdef"), bytes([97 + rng.randrange(26)]) * rng.randrange(1, longest))
                 for _ in range(rng.choice([1, 1, 2, 5]))]
        floor = history.floor
        keys = history.record_batch(batch)
        sent += [(k, s, b, clock.now) for k, (s, b) in zip(keys, batch, strict=True)]
        replay = history.replay("abcdef", "1-0", limit=10_000)  # trims what is due first
        kept = [(k, s, b) for k, s, b, _ in sent if k > history.floor]
        assert replay.messages == kept
        assert all(clock.now - when <= ttl + 1 for k, _, _, when in sent if k > history.floor)
        total = sum(len(b) for _, _, b in kept)
        assert total <= most and history.stats == {"history_messages": len(kept),
                                                   "history_bytes": total}
        if history.floor > history.epoch << 64:
            # The newest message dropped was due, or the size bound needed it gone (and then
            # so did every older one).
            k, _, body, when = next(m for m in sent if m[0] == history.floor)
            due, over = clock.now - when > ttl, total + len(body) > most
            assert due or over
            if history.floor > floor:
                by_age, by_size = by_age + due, by_size + (over and not due)
            assert history.replay("abcdef", format_id(history.floor)).recovered
            assert not history.replay("abcdef", format_id(history.floor - 1)).recovered
            # No stamp is kept that covers only dropped messages.
            assert sum(int.from_bytes(key[1:], "big") <= history.floor + 1
                       for key in _keys(db, STAMPS)) <= 1
    assert by_age > 10 and by_size > 10, (by_age, by_size)  # both bounds took their share
    reopened = History(db, size=1000, ttl=ttl, max_bytes=most, clock=clock)
    assert reopened.stats == history.stats
    db.close()


def test_a_history_of_the_layout_before_stamps_reads_and_is_rewritten_on_open(tmp_path):
    """A database written with a ``t`` record a message (the layout before stamps) opens as it was.

    Its messages replay, count and age as before; the ``t`` records are
    rewritten as stamps on open.
    """
    path = str(tmp_path / "db")
    db = plyvel.DB(path, create_if_missing=True)
    # As the layout before wrote it: epoch 1 kept history; h and t a message.
    db.put(b"m:epoch", b"1")
    db.put(b"m:history-epoch", b"1")
    db.put(b"m:history-floor", id_bytes(0))
    old = [("a", b"a1", 1000.0), ("b", b"b1", 1000.2), ("a", b"a2", 1010.0), ("c", b"c1", 1030.0)]
    for seq, (subject, body, when) in enumerate(old, 1):
        skey, idb = encode_key(subject), id_bytes(1 << 64 | seq)
        db.put(b"h" + bytes((len(skey),)) + skey + idb, body)
        db.put(b"t" + idb, struct.pack(">dI", when, len(body)) + skey)
    clock = Clock()
    clock.now = 1031.0
    history = History(db, ttl=35, clock=clock)
    assert _keys(db, b"t") == [] and len(_keys(db, STAMPS)) == 3
    assert history.stats == {"history_messages": 4, "history_bytes": 8}
    replay = history.replay("abc", "1-0")
    assert replay.recovered and [b for _, _, b in replay.messages] == [b"a1", b"b1", b"a2", b"c1"]
    # Their times came along: the first second's messages are due once 36 s old, not the rest.
    clock.now = 1000.0 + 36.5
    replay = history.replay("abc", "1-0")
    assert [b for _, _, b in replay.messages] == [b"a2", b"c1"], replay
    assert replay.reason == "the id predates the history" and history.floor == 1 << 64 | 2
    db.close()


# -- servers -------------------------------------------------------------------


def open_stream(srv, path: str, headers: dict[str, str] | None = None) -> StreamClient:
    sock = socket.create_connection((srv.host, srv.port), timeout=10)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {srv.host}\r\n{extra}\r\n".encode())
    return StreamClient(sock)


def events(client: StreamClient, n: int, timeout: float = 10.0) -> list[dict]:
    """The next *n* SSE events (comments skipped), each as {"id", "event", "data"}."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        chunk = client.chunk(max(deadline - time.monotonic(), 0.001)).decode()
        fields = {}
        for line in chunk.strip("\n").split("\n"):
            name, _, value = line.partition(": ")
            if name:
                fields[name] = value
        if fields:
            out.append(fields)
    return out


def post(srv, subject: str, body: str) -> str:
    status, answer = http_json(srv, "POST", f"/send/{subject}", body.encode())
    assert status == 200, answer
    return answer["id"]


def subscribe(srv, pairs) -> None:
    assert http_json(srv, "POST", "/subscriptions", [list(p) for p in pairs])[0] == 200


def test_an_exact_replay_then_live(server):
    me, friends, stranger = unique_id("me"), [unique_id("f") for _ in range(3)], unique_id("x")
    subscribe(server, [(me, f) for f in friends])
    with open_stream(server, f"/events/{me}") as c:
        assert "cometd-recovered" not in c.headers  # a fresh stream
        c.chunk()
        post(server, friends[0], "seen")
        (seen,) = events(c, 1)
    missed = []
    for i in range(3):
        for subject in [*friends, me, stranger]:
            message_id = post(server, subject, f"{subject} {i}")
            if subject != stranger:
                missed.append((message_id, subject, f"{subject} {i}"))
    with open_stream(server, f"/events/{me}", {"Last-Event-ID": seen["id"]}) as c:
        assert c.headers["cometd-recovered"] == "true"
        c.chunk()  # welcome
        got = events(c, len(missed))
        assert [(e["id"], *json.loads(e["data"]).values()) for e in got] == missed
        live = post(server, friends[2], "live")
        (event,) = events(c, 1)
        assert (event["id"], json.loads(event["data"])["body"]) == (live, "live")
    # A page that stored the id itself says so in the query.
    with open_stream(server, f"/events/{me}?last_event_id={missed[-2][0]}") as c:
        assert c.headers["cometd-recovered"] == "true"
        c.chunk()
        assert [e["id"] for e in events(c, 2)] == [missed[-1][0], live]


def test_since_on_a_chunked_stream(server):
    me, friend = unique_id("me"), unique_id("f")
    subscribe(server, [(me, friend)])
    first = post(server, friend, "one")
    post(server, friend, "two")
    post(server, me, "three")
    with open_stream(server, f"/test/{me}?since={first}") as c:
        assert c.headers["cometd-recovered"] == "true" and c.chunked
        assert c.chunk().startswith(b"Welcome")
        assert c.chunks(2) == [b"two", b"three"]
        post(server, friend, "four")
        assert c.chunk() == b"four"
    # HTTP/1.0: raw, the same replay
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(f"GET /test/{me}?since={first} HTTP/1.0\r\n\r\n".encode())
    with StreamClient(sock) as c:
        assert c.headers["cometd-recovered"] == "true"
        c.read_until(b"\n")
        assert c.read_raw(len(b"twothreefour")) == b"twothreefour"


def test_resume_after_kill_9_and_restart(tmp_path):
    db = str(tmp_path / "db")
    srv = start_server(db)
    try:
        subscribe(srv, [("me", "f")])
        seen = post(srv, "f", "seen")
        missed = [post(srv, "f", "lost in the crash?"), post(srv, "me", "note to self")]
    finally:
        srv.stop(signal.SIGKILL)
    srv = start_server(db)
    try:
        after = post(srv, "f", "after the restart")
        assert parse_id(after) > parse_id(missed[-1])  # a new epoch
        assert after.split("-")[0] == str(int(missed[0].split("-")[0]) + 1)
        with open_stream(srv, "/events/me", {"Last-Event-ID": seen}) as c:
            assert c.headers["cometd-recovered"] == "true"
            c.chunk()
            got = events(c, 3)
        assert [e["id"] for e in got] == [*missed, after]
        assert [json.loads(e["data"])["body"] for e in got] == [
            "lost in the crash?", "note to self", "after the restart"]
    finally:
        srv.stop()


@pytest.fixture
def small(tmp_path, mode):
    """A server with a tiny history: 3 messages per subject, 4 per replay."""
    srv = start_server(str(tmp_path / "db"), "--mode", mode, "--history-size", "3",
                       "--replay-max", "4")
    yield srv
    srv.stop()


def gap_case(srv, path: str, asked: str, reason: str, replayed: list[str]) -> None:
    with open_stream(srv, path, {"Last-Event-ID": asked}) as c:
        assert c.headers["cometd-recovered"] == "false"
        c.chunk()
        gap, *rest = events(c, 1 + len(replayed))
        assert gap["event"] == "gap" and "id" not in gap
        assert json.loads(gap["data"]) == {"last_event_id": asked, "reason": reason}
        assert [e["id"] for e in rest] == replayed


def test_each_unrecoverable_resume_says_so(small):
    me, friend = unique_id("me"), unique_id("f")
    subscribe(small, [(me, friend)])
    first = post(small, me, "m0")
    sent = [post(small, friend, f"f{i}") for i in range(10)]  # trims friend's history
    path = f"/events/{me}"
    gap_case(small, path, "not-an-id", "malformed id", [])
    epoch, seq = sent[-1].split("-")
    gap_case(small, path, f"{epoch}-{int(seq) + 5}", "unknown id", [])
    gap_case(small, path, f"{int(epoch) + 1}-1", "unknown id", [])
    lonely = f"/events/{unique_id('l')}"  # nothing to replay
    gap_case(small, lonely, "0-7", "the id predates the history", [])  # before any history
    # friend keeps only its newest few (3 to 3 + slack): its history is the reason.
    with open_stream(small, path, {"Last-Event-ID": first}) as c:
        assert c.headers["cometd-recovered"] == "false"
        c.chunk()
        (gap,) = events(c, 1)
        assert json.loads(gap["data"]) == {
            "last_event_id": first,
            "reason": f"the history of {friend} no longer reaches back to the id"}
    # Recoverable, but more than replay-max: the newest 4.
    other = unique_id("o")
    subscribe(small, [(other, s) for s in (friend, me)])
    start = post(small, other, "o0")
    newest = [post(small, s, "x") for s in (friend, me, other, friend, me)]
    gap_case(small, f"/events/{other}", start, "more than 4 messages to replay", newest[-4:])
    # A chunked stream has no gap event, only the header.
    with open_stream(small, f"/test/{other}?since={start}") as c:
        assert c.headers["cometd-recovered"] == "false"
        c.chunk()
        assert c.chunks(4) == [b"x"] * 4
    with open_stream(small, f"/test/{other}?since=") as c:
        assert c.headers["cometd-recovered"] == "false"


def check_seam(servers: list, subjects: list[str], clients: list[str], seconds: float) -> None:
    """Clients reconnect in a loop, resuming, while *subjects* publish for *seconds*.

    Each connection goes to the next of *servers* (anything with host and
    port), and so does each send. Every client is subscribed to every
    subject; in the end each must have every subject's messages once, in
    order, and every resume must have said it was complete.
    """
    subscribe(servers[0], [(c, s) for c in clients for s in subjects])
    start = post(servers[0], subjects[0], "start")
    stop, finished = threading.Event(), threading.Event()
    published: dict[str, int] = {}
    received = {c: {s: [] for s in subjects} for c in clients}
    unrecovered: list[str] = []
    errors: list[BaseException] = []

    def publish(k: int, subject: str) -> None:
        n = 0
        try:
            while not stop.is_set():
                n += 1
                post(servers[(k + n) % len(servers)], subject, f"{subject}:{n}")
                time.sleep(0.02)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        published[subject] = n

    def follow(client: str) -> None:
        # Short stays until the publishers are done, then one last stay
        # until the last message of every subject is in.
        rng = random.Random(client)
        seen = start
        visits = 0
        try:
            while True:
                final = finished.is_set()
                visits += 1
                at = servers[visits % len(servers)]
                with open_stream(at, f"/events/{client}", {"Last-Event-ID": seen}) as c:
                    if c.headers.get("cometd-recovered") != "true":
                        unrecovered.append(client)
                    c.chunk()
                    leave = time.monotonic() + rng.uniform(0.02, 0.3)
                    while final or time.monotonic() < leave:
                        if final and all(received[client][s][-1:] == [published[s]]
                                         for s in subjects):
                            return
                        wait = 10.0 if final else max(leave - time.monotonic(), 0.001)
                        try:
                            (event,) = events(c, 1, timeout=wait)
                        except TimeoutError:
                            if final:
                                return  # the check below says what is missing
                            continue
                        subject, n = json.loads(event["data"])["body"].split(":")
                        received[client][subject].append(int(n))
                        seen = event["id"]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    publishers = [threading.Thread(target=publish, args=(k, s)) for k, s in enumerate(subjects)]
    followers = [threading.Thread(target=follow, args=(c,)) for c in clients]
    for t in publishers + followers:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in publishers:
        t.join(10)
    finished.set()
    for t in followers:
        t.join(60)
    assert not errors, errors[:3]
    assert not unrecovered, unrecovered[:5]
    assert all(n > 20 for n in published.values()), published
    for client in clients:
        for subject in subjects:
            got = received[client][subject]
            assert got == list(range(1, published[subject] + 1)), (
                client, subject, published[subject], len(got),
                sorted(set(range(1, published[subject] + 1)) - set(got))[:10],
                [n for n in got if got.count(n) > 1][:10])


def test_the_seam_between_replay_and_live_has_no_gap_and_no_duplicate(tmp_path, mode):
    """100 clients reconnect in a loop, resuming, while four subjects publish for 4 s."""
    srv = start_server(str(tmp_path / "db"), "--mode", mode, "--history-size", "10000")
    try:
        check_seam([srv], [f"p{i}" for i in range(4)], [f"c{i}" for i in range(100)], 4)
    finally:
        srv.stop()


def welcome_id(client: StreamClient) -> str:
    (line,) = [x for x in client.chunk().decode().split("\n") if x.startswith("id: ")]
    return line[4:]


def test_the_welcome_gives_every_sse_stream_an_id_to_resume_from(server):
    me, friend = unique_id("me"), unique_id("f")
    subscribe(server, [(me, friend)])
    with open_stream(server, f"/events/{me}") as c:
        first = welcome_id(c)  # before any message for it
    sent = [post(server, friend, "one"), post(server, me, "two")]
    with open_stream(server, f"/events/{me}", {"Last-Event-ID": first}) as c:
        assert c.headers["cometd-recovered"] == "true"
        again = welcome_id(c)
        assert [e["id"] for e in events(c, 2)] == sent
    # A resume from an id that cannot be placed still gets a good one in its welcome.
    with open_stream(server, f"/events/{me}", {"Last-Event-ID": "bogus"}) as c:
        assert c.headers["cometd-recovered"] == "false"
        fresh = welcome_id(c)
    assert parse_id(fresh) >= parse_id(again) >= parse_id(sent[-1])
    post(server, friend, "three")
    with open_stream(server, f"/events/{me}", {"Last-Event-ID": fresh}) as c:
        assert c.headers["cometd-recovered"] == "true"
        c.chunk()
        assert json.loads(events(c, 1)[0]["data"])["body"] == "three"


def test_a_stream_gets_its_messages_in_id_order_while_a_fan_out_yields(server):
    """So that its last id is a complete resume point: no earlier id can still come.

    A's fan-out (150 followers online, me last) yields half way; B's message,
    sent just after A's, must still reach me after A's.
    """
    me = "zz-" + unique_id("me")
    followers = [f"f{i:03d}-{unique_id('x')}" for i in range(150)]
    a, b = unique_id("a"), unique_id("b")
    subscribe(server, [(f, a) for f in followers] + [(me, a), (me, b)])
    streams = StreamClient.open_many(server, [f"/test/{f}" for f in followers])
    try:
        with open_stream(server, f"/events/{me}") as mine:
            mine.chunk()
            for trial in range(20):
                socks = [socket.create_connection((server.host, server.port)) for _ in "ab"]
                for sock, subject in zip(socks, (a, b), strict=True):
                    body = f"{subject} {trial}".encode()
                    sock.sendall(f"POST /send/{subject} HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                 f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
                replies = [json.loads(s.makefile("rb").read().split(b"\r\n\r\n", 1)[1])
                           for s in socks]
                for sock in socks:
                    sock.close()
                got = events(mine, 2)
                by_id = sorted(got, key=lambda e: parse_id(e["id"]))
                assert got == by_id, (trial, [r["id"] for r in replies], got)
    finally:
        for s in streams:
            s.close()


# -- batches (in-process) --------------------------------------------------------------


def test_a_batch_gets_consecutive_ids_in_its_order_with_its_marks(db):
    history = History(db, size=100)
    before = history.record("a", b"before")
    keys = history.record_batch([("a", b"a0"), ("b", b"b0"), ("a", b"a1")], [None, b"ix1", b"ix2"])
    assert keys == [before + 1, before + 2, before + 3] and history.last == keys[-1]
    got = history.replay(["a", "b"], format_id(before))
    assert got.recovered and [(k, b) for k, _, b in got.messages] == list(
        zip(keys, [b"a0", b"b0", b"a1"], strict=True))
    assert db.get(b"ix1") == id_bytes(keys[1]) and db.get(b"ix2") == id_bytes(keys[2])
    assert history.stats["history_messages"] == 4


def test_a_batch_over_a_subjects_bound_leaves_it_at_the_bound(db):
    history = History(db, size=3)
    first = history.record("a", b"first")
    history.record_batch([("a", b"a%d" % i) for i in range(10)])
    assert history.stats["history_messages"] == 3
    kept = history.replay(["a"], format_id(first))
    assert not kept.recovered and [b for _, _, b in kept.messages] == [b"a7", b"a8", b"a9"]
    reopened = History(db, size=3)  # the trim was written, not only counted
    assert reopened.stats["history_messages"] == 3


def test_the_kept_subject_keys_are_bounded_and_change_nothing(db, monkeypatch):
    monkeypatch.setattr("cometd.history.SUBJECT_KEYS", 3)
    history = History(db, size=100)
    before = history.last
    subjects = ["7", "alice", "0", "007", "4294967296", "user:9"] * 2
    history.record_batch([(s, s.encode()) for s in subjects])
    assert len(history._subject_keys) <= 3
    for subject in dict.fromkeys(subjects):
        got = history.replay([subject], format_id(before))
        assert got.recovered and [b for _, _, b in got.messages] == [subject.encode()] * 2
    # ...and the same after a reopening, read from the database alone.
    again = History(db, size=100)
    assert again.stats == history.stats
    assert [b for _, _, b in again.replay(subjects, format_id(before)).messages] == [
        s.encode() for s in subjects]
