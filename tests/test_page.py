"""The demo page (cometd.page): its files as served, and the page itself in headless Chromium
against a real server: the feed, publishing, the graph, a kick's resume and a gap, auth."""

from __future__ import annotations

import re
import time
from importlib import resources

import pytest
from browser import needs_chromium
from conftest import StreamClient, http_json, http_request, start_server, unique_id, wait_for
from test_admin import Console, wait_online

from cometd.page import CONTENT_SECURITY_POLICY, PAGES

SECRET = "page-test-secret-that-is-at-least-32-bytes"
KEY = "page-publisher-key-0123456789"
#: the SSE retry the servers give, seconds: a kicked page comes back after it
RETRY = ("--sse-retry-min", "1", "--sse-retry-max", "1")


def hs256(sub: str, ttl: int = 600) -> str:
    import jwt

    now = int(time.time())
    return jwt.encode({"sub": sub, "exp": now + ttl, "iat": now}, SECRET, algorithm="HS256")


# -- the files ----------------------------------------------------------------------------


def test_the_files_are_served_with_their_type_a_strict_policy_and_an_etag(tmp_path):
    # With auth on: the page itself needs no credential, the API still does.
    srv = start_server(str(tmp_path / "db"), "--jwt-secret", SECRET, "--api-key", KEY)
    try:
        assert http_request(srv, "GET", "/stats")[0] == 401
        for path, (name, content_type) in PAGES.items():
            status, headers, body = http_request(srv, "GET", path)
            assert status == 200, (path, body)
            assert body == resources.files("cometd.page").joinpath(name).read_bytes(), path
            assert headers["content-type"] == content_type, path
            assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
            assert headers["x-content-type-options"] == "nosniff", path
            assert headers["cache-control"] == "no-cache", path
            etag = headers["etag"]
            status, again, body = http_request(srv, "GET", path, headers={
                "If-None-Match": f'"other", {etag}'})
            assert (status, body, again["etag"]) == (304, b"", etag), path
            status, _, body = http_request(srv, "GET", path, headers={"If-None-Match": '"x"'})
            assert status == 200 and body, path
        assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
        assert "default-src 'none'" in CONTENT_SECURITY_POLICY
        html = resources.files("cometd.page").joinpath("index.html").read_text()
        # No inline script or style (the policy would block them) and nothing from elsewhere.
        assert re.findall(r"<script[^>]*>", html) == ['<script src="/page.js" defer>']
        assert "style=" not in html and "<style" not in html and "//" not in html
    finally:
        srv.stop()
    assert "Traceback" not in "".join(srv.output)


# -- in a real browser --------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = start_server(str(tmp_path_factory.mktemp("page") / "db"), *RETRY)
    yield server
    server.stop()
    assert "Traceback" not in "".join(server.output)


def open_page(driver, srv, user: str, token: str = "", key: str = "",
              transport: str = "sse", state: str = "open") -> None:
    """Load the page from *srv*, fill the form in and connect; wait for *state*."""
    driver.get(srv.url + "/")
    driver.execute_script(
        "const [user, token, key, transport] = arguments;"
        "document.getElementById('user').value = user;"
        "document.getElementById('token').value = token;"
        "document.getElementById('apikey').value = key;"
        "document.getElementById('transport').value = transport;"
        "document.getElementById('open').click();", user, token, key, transport)
    wait_for(lambda: page(driver)["state"] == state, 15, what=f"the page {state}")


def page(driver) -> dict:
    """What the page shows: the feed oldest first as (id, from, body), and the rest."""
    return driver.execute_script("""
        const text = id => document.getElementById(id).textContent;
        const ids = id => [...document.querySelectorAll(`#${id} button`)].map(b => b.textContent);
        return {
          feed: [...document.querySelectorAll("#feed li")].reverse().map(li => [
            li.dataset.id, li.querySelector(".from").textContent,
            li.querySelector(".body").textContent]),
          state: document.getElementById("state").dataset.state,
          resume: document.getElementById("resume").dataset.state, resumeText: text("resume"),
          reconnects: text("reconnects"), lastId: text("last-id"),
          follows: ids("follows"), followers: ids("followers"),
          followsNote: text("follows-note"), followersNote: text("followers-note"),
          published: text("publish-result"), log: text("log"), all: document.body.innerText,
        };""")


def feed_of(driver, n: int) -> list[list[str]]:
    return wait_for(lambda: len(page(driver)["feed"]) >= n and page(driver)["feed"], 15,
                    what=f"{n} messages on the page")


def published(srv, subject: str, body: str, **kwargs) -> str:
    status, answer = http_json(srv, "POST", f"/send/{subject}", body.encode(), **kwargs)
    assert status == 200, answer
    return answer["id"]


@needs_chromium
def test_the_page_shows_the_feed_the_graph_and_publishes(driver, srv):
    me, friend, fan = unique_id("me"), unique_id("friend"), unique_id("fan")
    status, answer = http_json(srv, "POST", "/subscriptions", [[me, friend], [fan, me]])
    assert (status, answer) == (200, {"added": 2})
    open_page(driver, srv, me)
    wait_for(lambda: page(driver)["follows"] == [friend] and page(driver)["followers"] == [fan],
             10, what="the graph on the page")

    # Through the API: a friend's message and one of the user's own, shown as text.
    hostile = "<img src=x onerror=\"window.pwned=1\"><b>bold</b> & \u00e9t\u00e9"
    first = published(srv, friend, hostile)
    second = published(srv, me, "my own note")
    assert feed_of(driver, 2) == [[first, friend, hostile], [second, me, "my own note"]]
    assert page(driver)["lastId"] == second
    assert driver.execute_script(
        "return [window.pwned, document.querySelectorAll('#feed img, #feed b').length]") == [
            None, 0]

    # From the page: the user's own streams get it, the page among them.
    with StreamClient.open(srv, f"/test/{me}") as reader:
        reader.chunk()  # the welcome
        driver.execute_script("document.getElementById('message').value = arguments[0];"
                              "document.getElementById('send').click();", "typed on the page")
        assert reader.chunk() == b"typed on the page"
        shown = wait_for(lambda: re.fullmatch(r"sent as .*: id (\S+), delivered to 2 stream\(s\)",
                                              page(driver)["published"]), 10, what="the answer")
    assert feed_of(driver, 3)[2] == [shown.group(1), me, "typed on the page"]
    assert page(driver)["state"] == "open" and page(driver)["reconnects"] == "0"


@needs_chromium
def test_after_a_kick_the_page_resumes_with_exactly_the_missed_messages(driver, srv):
    me = unique_id("kicked")
    open_page(driver, srv, me)
    ids = [published(srv, me, "before")]
    feed_of(driver, 1)
    console = Console(srv.admin_port)
    try:
        console.start()
        assert console.cmd(f"kick {me}") == ["OK kicked 1"]
        wait_online(console, me, 0)
        # Away for the retry (1 s): these are for the resume to replay.
        ids += [published(srv, me, f"while away {i}") for i in range(3)]
        wait_for(lambda: page(driver)["resume"] == "recovered", 15, what="the resume")
        wait_online(console, me, 1)
    finally:
        console.close()
    expected = [[ids[0], me, "before"]] + [[ids[i + 1], me, f"while away {i}"] for i in range(3)]
    assert feed_of(driver, 4) == expected
    time.sleep(0.3)  # nothing more comes: no message twice
    shown = page(driver)
    assert shown["feed"] == expected and shown["reconnects"] == "1", shown
    assert shown["resumeText"] == f"after {ids[0]}: complete" and shown["state"] == "open"
    _, _, metrics = http_request(srv, "GET", "/metrics")
    assert re.search(rb'^cometd_replays_total\{result="recovered"\} [1-9]', metrics, re.M)


@needs_chromium
def test_a_resume_past_the_history_shows_the_gap(driver, tmp_path):
    srv = start_server(str(tmp_path / "db"), "--history-size", "2", *RETRY)
    try:
        me = unique_id("gap")
        open_page(driver, srv, me)
        ids = [published(srv, me, "m0")]
        feed_of(driver, 1)
        console = Console(srv.admin_port)
        console.start()
        assert console.cmd(f"kick {me}") == ["OK kicked 1"]
        wait_online(console, me, 0)
        console.close()
        # More than the history keeps of one subject (2, and a few before it trims).
        ids += [published(srv, me, f"m{i}") for i in range(1, 9)]
        wait_for(lambda: page(driver)["resume"] == "gap", 15, what="the gap")
        wait_for(lambda: page(driver)["feed"][-1][2] == "m8", 15, what="the replay")
        shown = page(driver)
        # m0 live, then the newest few replayed, in order: the rest is lost, and the page says so.
        sent = [[ids[i], me, f"m{i}"] for i in range(9)]
        replayed = shown["feed"][1:]
        assert shown["feed"][0] == sent[0] and 2 <= len(replayed) < 8, shown
        assert replayed == sent[-len(replayed):], shown
        assert shown["resumeText"].startswith(f"gap after {ids[0]}: "), shown
        assert "no longer reaches back" in shown["resumeText"] and "gap:" in shown["log"]
    finally:
        srv.stop()


@needs_chromium
def test_with_auth_the_page_takes_a_token_and_never_shows_it(driver, tmp_path):
    srv = start_server(str(tmp_path / "db"), "--jwt-secret", SECRET, "--api-key", KEY)
    try:
        me, friend = unique_id("authed"), unique_id("pal")
        status, _ = http_json(srv, "POST", "/subscriptions", [[friend, me]],
                              headers={"X-API-Key": KEY})
        assert status == 200
        open_page(driver, srv, me, state="failed")  # no token: the stream is refused (401)
        open_page(driver, srv, me, token=hs256(unique_id("other")), state="failed")  # 403
        token = hs256(me)
        open_page(driver, srv, me, token=token)
        # The token covers the user's own requests; who follows it takes a key.
        wait_for(lambda: "takes an API key" in page(driver)["followersNote"], 10,
                 what="the followers note")
        first = published(srv, me, "by key", headers={"X-API-Key": KEY})
        driver.execute_script("document.getElementById('message').value = 'by token';"
                              "document.getElementById('send').click();")
        shown = feed_of(driver, 2)
        assert [row[2] for row in shown] == ["by key", "by token"] and shown[0][0] == first
        shown = page(driver)
        assert token not in shown["all"] and token not in driver.current_url
        assert token not in "".join(srv.output)
        open_page(driver, srv, me, token=token, key=KEY)
        wait_for(lambda: page(driver)["followers"] == [friend], 10, what="the followers by key")
    finally:
        srv.stop()


@needs_chromium
def test_over_a_websocket_the_page_gets_messages_and_resumes_after_a_kick(driver, srv):
    me = unique_id("wsme")
    open_page(driver, srv, me, transport="ws")
    ids = [published(srv, me, "over ws")]
    assert feed_of(driver, 1) == [[ids[0], me, "over ws"]]
    console = Console(srv.admin_port)
    try:
        console.start()
        assert console.cmd(f"kick {me}") == ["OK kicked 1"]
        wait_online(console, me, 0)
        ids += [published(srv, me, f"while away {i}") for i in range(2)]
        wait_for(lambda: page(driver)["resume"] == "recovered", 15, what="the resume")
    finally:
        console.close()
    expected = [[ids[0], me, "over ws"]] + [[ids[i + 1], me, f"while away {i}"] for i in range(2)]
    assert feed_of(driver, 3) == expected
    time.sleep(0.3)  # nothing more comes: no message twice
    assert page(driver)["feed"] == expected and page(driver)["state"] == "open"
