// The cometd demo page: one user's live feed, publishing as that user, who they
// follow and who follows them, all through this server's own API.
//
// Everything shown is set with textContent: no message body, id or error text
// is ever parsed as HTML. A pasted token or key lives only in its input and in
// the requests; it is never shown, stored or put in this page's URL.
//
// Theory of operation: EventSource reconnects by itself when a stream ends
// (after the `retry:` the server's welcome gave) and sends the last `id:` it
// saw as Last-Event-ID, so the server replays what was missed. A page cannot
// read the response's Cometd-Recovered header, but a resume that could not
// replay everything starts with an `event: gap` (see cometd/streamhttp.py):
// so a reopen with no gap event is a complete resume, one with it is not.
"use strict";
(() => {
  const FEED_MAX = 500, IDS_MAX = 200, LOG_MAX = 50;
  const $ = id => document.getElementById(id);
  let user = "", token = "", key = "";
  let stream = null;     // the EventSource or WebSocket of the current connection
  let generation = 0;    // bumped per connection: late answers for an old one are dropped
  let opens = 0, reconnects = 0, received = 0;
  let lastId = "";       // the last message id shown

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function trim(list, max) {
    while (list.children.length > max) list.lastElementChild.remove();
  }

  function setState(state, text) {
    $("state").dataset.state = state;
    $("state").textContent = text;
  }

  function setResume(state, text) {
    $("resume").dataset.state = state;
    $("resume").textContent = text;
  }

  function log(text) {
    const item = el("li");
    item.append(el("time", "", new Date().toLocaleTimeString()), " ", text);
    $("log").prepend(item);
    trim($("log"), LOG_MAX);
  }

  function showMessage(id, from, body) {
    const item = el("li");
    item.dataset.id = id;
    if (from === user) item.classList.add("own");
    item.append(el("code", "id", id || "-"), el("span", "from", from), el("span", "body", body));
    $("feed").prepend(item);
    trim($("feed"), FEED_MAX);
    received += 1;
    $("feed-count").textContent = received === 1 ? "1 message" : `${received} messages`;
    if (id) {
      lastId = id;
      $("last-id").textContent = id;
    }
  }

  function apiHeaders() {
    // An API key may do anything; a user's token covers that user's own requests.
    if (key) return {"X-API-Key": key};
    if (token) return {"Authorization": "Bearer " + token};
    return {};
  }

  function streamQuery() {
    return token ? "?token=" + encodeURIComponent(token) : "";
  }

  function openEvents(mine) {
    const source = new EventSource(`/events/${encodeURIComponent(user)}${streamQuery()}`);
    source.onopen = () => {
      if (mine !== generation) return;
      opens += 1;
      if (opens === 1) {
        setState("open", "connected");
        log(`stream open for ${user}`);
        return;
      }
      reconnects += 1;
      $("reconnects").textContent = String(reconnects);
      setState("open", "reconnected");
      setResume("recovered", `after ${lastId || "the welcome"}: complete`);
      log(`reconnected, resuming after ${lastId || "the welcome's id"}`);
    };
    source.onmessage = event => {
      if (mine !== generation) return;
      let data;
      try {
        data = JSON.parse(event.data);
      } catch {
        data = {from: "?", body: event.data};
      }
      showMessage(event.lastEventId, String(data.from ?? "?"), String(data.body ?? ""));
    };
    source.addEventListener("gap", event => {
      if (mine !== generation) return;
      let gap = {};
      try {
        gap = JSON.parse(event.data);
      } catch {
        // an unreadable gap is still a gap
      }
      setResume("gap", `gap after ${gap.last_event_id || "?"}: ${gap.reason || "unknown"}`);
      log(`gap: ${gap.reason || "unknown"}; some messages are missing (reload for the rest)`);
    });
    source.addEventListener("expired", () => {
      if (mine !== generation) return;
      source.close();
      setState("closed", "token expired");
      log("the token expired: paste a new one and connect again");
      connected(false);
    });
    source.onerror = () => {
      if (mine !== generation) return;
      if (source.readyState === EventSource.CLOSED) {
        // The server answered with something other than a stream (401, 403, 404, 429...).
        setState("failed", opens ? "closed by the server" : "refused");
        log(opens ? "the server refused the reconnection"
          : "the server refused the stream: check the user id (and, with auth on, the token)");
        connected(false);
      } else if ($("state").dataset.state !== "reconnecting") {
        setState("reconnecting", "reconnecting...");
        log(opens ? `stream ended; the browser reconnects with Last-Event-ID ${lastId || "(the welcome's)"}`
          : "the server does not answer; the browser keeps trying");
      }
    };
    return source;
  }

  // /ws/<id> (cometd/websocket.py): text frames of JSON, a welcome first
  // ({"welcome", "id"}; a resume's adds "recovered" and, when false, "reason"),
  // then one {"id", "from", "body"} per message. A WebSocket does not come
  // back by itself, so after a close that is not final the page reopens it
  // with ?since=<the last id> as EventSource would with Last-Event-ID.
  const WS_FINAL = new Set([1000, 1008]);  // closed by the page / token expired
  const WS_RETRIES = 5;

  function openSocket(mine, since = "", failures = 0) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = new URLSearchParams();
    if (token) query.set("token", token);
    if (since) query.set("since", since);
    const search = query.toString();
    const socket = new WebSocket(`${scheme}//${location.host}/ws/${encodeURIComponent(user)}` +
      (search ? "?" + search : ""));
    let open = false, welcomeId = "";
    socket.onopen = () => {
      if (mine !== generation) return;
      open = true;
      opens += 1;
      if (opens === 1) {
        setState("open", "connected (WebSocket)");
        log(`WebSocket open for ${user}`);
        return;
      }
      reconnects += 1;
      $("reconnects").textContent = String(reconnects);
      setState("open", "reconnected (WebSocket)");
      log(`reconnected, resuming after ${since}`);
    };
    socket.onmessage = event => {
      if (mine !== generation) return;
      let data = null;
      try {
        data = JSON.parse(event.data);
      } catch {
        // not JSON: logged below
      }
      if (data && typeof data === "object" && "body" in data) {
        showMessage(String(data.id ?? ""), String(data.from ?? "?"), String(data.body));
      } else if (data && typeof data === "object" && "welcome" in data) {
        welcomeId = String(data.id ?? "");
        if (data.recovered === true) {
          setResume("recovered", `after ${since}: complete`);
        } else if (data.recovered === false) {
          setResume("gap", `gap after ${data.last_event_id || since}: ${data.reason || "unknown"}`);
          log(`gap: ${data.reason || "unknown"}; some messages are missing (reload for the rest)`);
        }
      } else {
        log(`server: ${String(event.data).slice(0, 200)}`);
      }
    };
    socket.onclose = event => {
      if (mine !== generation) return;
      const why = `${event.code}${event.reason ? ": " + event.reason : ""}`;
      const tries = open ? 0 : failures + 1;
      if (!opens || WS_FINAL.has(event.code) || tries >= WS_RETRIES) {
        setState(opens ? "closed" : "failed", opens ? "closed" : "refused");
        log(`WebSocket closed (${why})` +
          (opens ? "" : "; refused before it opened (token, origin or limits)"));
        connected(false);
        return;
      }
      const after = lastId || welcomeId || since;
      setState("reconnecting", "reconnecting...");
      log(`WebSocket closed (${why}); reopening with since=${after || "(none)"}`);
      // 1 to 2 s, as a welcome's retry: clients cut off together come back spread out.
      setTimeout(() => {
        if (mine === generation) stream = openSocket(mine, after, tries);
      }, 1000 + Math.random() * 1000);
    };
    return socket;
  }

  async function loadIds(kind, mine) {
    const list = $(kind === "subscriptions" ? "follows" : "followers");
    const note = $(`${list.id}-note`), count = $(`${list.id}-count`);
    list.replaceChildren();
    count.textContent = "";
    note.textContent = "loading...";
    let response, data = {};
    try {
      response = await fetch(`/${kind}/${encodeURIComponent(user)}`, {headers: apiHeaders()});
      data = await response.json().catch(() => ({}));
    } catch {
      if (mine === generation) note.textContent = "the server did not answer";
      return;
    }
    if (mine !== generation) return;
    if (!response.ok) {
      note.textContent = response.status === 403 && kind === "subscribers"
        ? "with auth on, who follows a user takes an API key"
        : `${response.status}: ${data.error || response.statusText}`;
      return;
    }
    const ids = Array.isArray(data[kind]) ? data[kind] : [];
    count.textContent = `(${ids.length})`;
    for (const id of ids.slice(0, IDS_MAX)) {
      const button = el("button", "", String(id));
      button.type = "button";
      button.title = `open ${id}'s feed`;
      button.addEventListener("click", () => {
        $("user").value = String(id);
        connect();
      });
      const item = el("li");
      item.append(button);
      list.append(item);
    }
    note.textContent = ids.length > IDS_MAX ? `and ${ids.length - IDS_MAX} more`
      : ids.length ? "" : "nobody";
  }

  function connected(yes) {
    $("close").disabled = !yes;
    if (!yes) stream = null;
  }

  function disconnect() {
    generation += 1;
    if (stream) stream.close();
    connected(false);
    setState("closed", "not connected");
  }

  function connect() {
    const input = $("user");
    if (!input.reportValidity()) return;
    disconnect();
    const mine = generation;
    user = input.value.trim();
    token = $("token").value.trim();
    key = $("apikey").value.trim();
    opens = reconnects = received = 0;
    lastId = "";
    $("feed").replaceChildren();
    $("feed-count").textContent = "0 messages";
    $("last-id").textContent = "-";
    $("reconnects").textContent = "0";
    setResume("none", "-");
    for (const node of document.querySelectorAll(".me")) node.textContent = user;
    setState("connecting", "connecting...");
    stream = $("transport").value === "ws" ? openSocket(mine) : openEvents(mine);
    connected(true);
    loadIds("subscriptions", mine);
    loadIds("subscribers", mine);
  }

  async function publish() {
    const result = $("publish-result"), body = $("message").value;
    if (!user) {
      result.textContent = "connect as a user first";
      return;
    }
    if (!body) return;
    let response, data = {};
    try {
      response = await fetch(`/send/${encodeURIComponent(user)}`, {
        method: "POST", body, headers: {...apiHeaders(), "Content-Type": "text/plain; charset=utf-8"}});
      data = await response.json().catch(() => ({}));
    } catch {
      result.textContent = "the server did not answer";
      return;
    }
    if (response.ok) {
      result.textContent = `sent as ${user}: id ${data.id}, delivered to ${data.delivered} stream(s)`;
      $("message").value = "";
    } else {
      result.textContent = `${response.status}: ${data.error || response.statusText}` +
        (response.status === 401 ? " (publishing needs this user's token or an API key)" : "");
    }
  }

  $("connect").addEventListener("submit", event => {
    event.preventDefault();
    connect();
  });
  $("close").addEventListener("click", () => {
    disconnect();
    log("disconnected");
  });
  $("publish").addEventListener("submit", event => {
    event.preventDefault();
    publish();
  });
  $("message").addEventListener("keydown", event => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      publish();
    }
  });
  // /#user=42 opens 42's feed on load (a token never goes in the URL).
  const asked = new URLSearchParams(location.hash.slice(1)).get("user");
  if (asked) {
    $("user").value = asked;
    connect();
  }
})();
