"""Bulk loading friends files, through the library and through `bin/cometd load`."""

import os
import subprocess
import sys

import pytest

from cometd.loader import LoadError, load_friends
from cometd.store import SubscriptionStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMETD = os.path.join(ROOT, "bin", "cometd")


@pytest.fixture
def store(tmp_path):
    s = SubscriptionStore(tmp_path / "db")
    yield s
    s.close()


def write(tmp_path, text, name="friends.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_friendship_stores_both_directions(tmp_path, store):
    path = write(tmp_path, "1 2\n2 3\n1 3\n")
    result = load_friends(store, path)
    assert (result.lines, result.stored) == (3, 6)
    assert store.get_subscribers("1") == ["2", "3"]
    assert store.get_subscriptions("2") == ["1", "3"]
    assert store.count() == (3, 6)


def test_directed_stores_one_direction(tmp_path, store):
    result = load_friends(store, write(tmp_path, "1 2\n2 3\n"), directed=True)
    assert result.stored == 2
    assert store.get_subscribers("2") == ["1"]
    assert store.get_subscriptions("2") == ["3"]
    assert store.get_subscribers("1") == []


def test_names_and_integers_mixed(tmp_path, store):
    path = write(tmp_path, "alice 1\n1 2\n007 user:9\n\n  2\t3  \n")
    result = load_friends(store, path)
    assert result.stored == 8
    assert store.get_subscribers("1") == ["2", "alice"]
    assert store.get_subscriptions("user:9") == ["007"]
    assert store.get_subscribers("3") == ["2"]


def test_loading_twice_changes_nothing(tmp_path, store):
    path = write(tmp_path, "".join(f"{i} {i + 1}\n" for i in range(1, 500)) + "a b\n")
    first = load_friends(store, path)
    snapshot = {u: store.get_subscribers(u) for u in ["1", "250", "500", "a", "b"]}
    second = load_friends(store, path)
    assert first.stored == 2 * 500 and second.stored == 0
    assert {u: store.get_subscribers(u) for u in snapshot} == snapshot


def test_merges_with_existing_subscriptions(tmp_path, store):
    store.add_subscriptions([("9", "1"), ("x", "1")])
    load_friends(store, write(tmp_path, "1 2\n"))
    assert store.get_subscribers("1") == ["2", "9", "x"]


def test_file_without_final_newline(tmp_path, store):
    assert load_friends(store, write(tmp_path, "1 2\n3 4")).stored == 4


@pytest.mark.parametrize(
    "text, lineno",
    [("1 2\n2 3 4\n", 2), ("1 2\n3\n", 2), ("1 2\n1 2\nbad/id 3\n", 3), ("1 +2\n", 1),
     ("1 " + "x" * 65 + "\n", 1), ("1 2\n\xe9 3\n", 2),
     ("1 2\n3 3\n", 2), ("1 2\nbob bob\n", 2), ("a b\n2 1\n4  4\n", 3)],
)
def test_malformed_line_stores_nothing(tmp_path, store, text, lineno):
    store.add_subscriptions([("keep", "me")])
    with pytest.raises(LoadError) as info:
        load_friends(store, write(tmp_path, text))
    assert f":{lineno}:" in str(info.value)
    assert "Nothing was stored" in str(info.value)
    assert store.count() == (1, 1)


def test_malformed_line_deep_in_a_large_file(tmp_path, store, monkeypatch):
    # Several chunks of fast-path integers, then one bad line in a later chunk.
    monkeypatch.setattr("cometd.loader.CHUNK_BYTES", 4096)
    lines = [f"{i} {i + 7}\n" for i in range(1, 5000)]
    lines[4321] = "12 x y\n"
    with pytest.raises(LoadError, match=":4322: expected two ids, found 3: '12 x y'"):
        load_friends(store, write(tmp_path, "".join(lines)))
    assert store.count() == (0, 0)


def test_self_friendship_deep_in_a_large_integer_file(tmp_path, store, monkeypatch):
    # The fast path (numpy, no line numbers) must notice it and name the line.
    monkeypatch.setattr("cometd.loader.CHUNK_BYTES", 4096)
    lines = [f"{i} {i + 7}\n" for i in range(1, 5000)]
    lines[3210] = "77 77\n"
    with pytest.raises(LoadError, match=":3211: '77' cannot subscribe to itself"):
        load_friends(store, write(tmp_path, "".join(lines)), directed=True)
    assert store.count() == (0, 0)


def test_chunked_parse_matches_whole_parse(tmp_path, monkeypatch):
    pairs = (((i * 7919) % 3001 + 1, (i * 104729) % 2999 + 1) for i in range(20000))
    lines = "".join(f"{a} {b}\n" for a, b in pairs if a != b)
    path = write(tmp_path, lines)
    with SubscriptionStore(tmp_path / "a") as whole:
        load_friends(whole, path)
        expected = {u: whole.get_subscribers(u) for u in map(str, range(1, 3002))}
    monkeypatch.setattr("cometd.loader.CHUNK_BYTES", 1000)
    with SubscriptionStore(tmp_path / "b") as chunked:
        load_friends(chunked, path)
        assert {u: chunked.get_subscribers(u) for u in expected} == expected
    pairs = {tuple(line.split()) for line in lines.splitlines()}
    for a, b in list(pairs)[:200]:
        assert a in expected[b] and b in expected[a]


def test_cli_load_summary_and_error(tmp_path):
    good = write(tmp_path, "1 2\n2 3\n")
    db = tmp_path / "db"
    out = subprocess.run([sys.executable, COMETD, "load", str(good), "--db", str(db)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "read 2 lines, stored 4 new subscriptions" in out.stdout
    bad = write(tmp_path, "1 2\noops\n", "bad.txt")
    out = subprocess.run([sys.executable, COMETD, "load", str(bad), "--db", str(db)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "bad.txt:2: expected two ids, found 1: 'oops'" in out.stderr
    assert "Traceback" not in out.stderr
    with SubscriptionStore(db) as s:
        assert s.count() == (3, 4)
