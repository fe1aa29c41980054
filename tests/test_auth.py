"""Authentication: JWT stream tokens and API keys, in-process and against real servers.

The verification logic (each rejection and its reason, the algorithms a key
allows, the fast HS256 check against PyJWT, API keys, the expiry wheel) is
tested in-process; the promises to clients against real ``bin/cometd``
processes in both connection modes, through the accept callback and through
pywsgi, and once through ``--workers 2`` with Redis. Keys are generated here;
no private key is stored anywhere.
"""

from __future__ import annotations

import base64
import hmac
import json
import random
import socket
import subprocess
import sys
import time

import jwt
import pytest
from conftest import (
    COMETD,
    ROOT,
    VARIANTS,
    StreamClient,
    http_request,
    start_server,
    unique_id,
    variant_args,
    wait_for,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from cometd.auth import (
    LEEWAY,
    PUBLISHER,
    Authenticator,
    AuthError,
    Identity,
    Minter,
    _FastHS256,
    bearer,
    cookie_token,
    query_token,
)
from cometd.config import AuthConfig, ConfigError, load
from cometd.connections import MODES
from cometd.expiry import ExpiryWheel
from cometd.history import parse_id
from cometd.ids import InvalidId
from cometd.streamhttp import parse_stream_request, stream_credentials

SECRET = "test-secret-that-is-at-least-32-bytes-long"
KEY = "publisher-key-0123456789"


def token(sub="alice", ttl=600, secret=SECRET, algorithm="HS256", **claims) -> str:
    now = int(time.time())
    payload = {"sub": sub, "exp": now + ttl, "iat": now, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret,
                      algorithm=algorithm)


def refusal(auth: Authenticator, tok: str) -> str:
    with pytest.raises(AuthError) as err:
        auth.verify_token(tok)
    assert err.value.status == 401
    return err.value.description


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pem_public(private) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


# -- in-process: verification -------------------------------------------------------


def test_each_bad_token_is_refused_with_its_reason():
    auth = Authenticator(AuthConfig(jwt_secret=SECRET))
    assert auth.verify_token(token()).user == "alice"
    cases = {
        token(ttl=-LEEWAY - 5): "token expired",
        token(nbf=int(time.time()) + LEEWAY + 60): "token not yet valid",
        token(iat=int(time.time()) + LEEWAY + 60): "token not yet valid",
        token(secret="another-secret-that-is-32-bytes-long!!"): "bad signature",
        token(sub=None): "the token has no sub claim",
        token(exp=None): "the token has no exp claim",
        token(sub="not an id"): "the token's sub is not a valid user id",
        token(sub=7): "the token's sub is not a valid user id",
        token(aud="someone"): "wrong audience",
        "not-a-token": "malformed token",
        "a.b.c": "malformed token",
        "x" * 10000: "malformed token",
        jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none"):
            "algorithm not allowed",
        token(secret=SECRET * 2, algorithm="HS512"): "algorithm not allowed",
    }
    for tok, reason in cases.items():
        assert refusal(auth, tok) == reason, tok
    # Within the leeway an expired token is still good, and expires with it.
    identity = auth.verify_token(token(ttl=-LEEWAY + 20))
    assert time.time() + 15 < identity.expires < time.time() + 25


def test_alg_none_without_a_signature_is_refused():
    auth = Authenticator(AuthConfig(jwt_secret=SECRET))
    claims = b64(json.dumps({"sub": "alice", "exp": int(time.time()) + 60}).encode())
    for header in ({"alg": "none"}, {"alg": "None", "typ": "JWT"}, {"alg": ""}):
        tok = f"{b64(json.dumps(header).encode())}.{claims}."
        assert refusal(auth, tok) in ("algorithm not allowed", "malformed token")


def test_audience_and_issuer_are_checked_when_configured():
    auth = Authenticator(AuthConfig(jwt_secret=SECRET, jwt_audience="app", jwt_issuer="me"))
    assert auth.verify_token(token(aud="app", iss="me")).user == "alice"
    assert auth.verify_token(token(aud=["other", "app"], iss="me")).user == "alice"
    assert refusal(auth, token(aud="other", iss="me")) == "wrong audience"
    assert refusal(auth, token(aud="app", iss="you")) == "wrong issuer"
    assert refusal(auth, token(iss="me")) == "the token has no aud claim"
    assert refusal(auth, token(aud="app")) == "the token has no iss claim"


@pytest.mark.parametrize("kind", ["rsa", "ec", "ed25519"])
def test_a_public_key_verifies_its_algorithm_only(tmp_path, kind):
    private, algorithm = {
        "rsa": (lambda: rsa.generate_private_key(65537, 2048), "RS256"),
        "ec": (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"),
        "ed25519": (ed25519.Ed25519PrivateKey.generate, "EdDSA"),
    }[kind]
    private = private()
    path = tmp_path / "key.pem"
    path.write_bytes(pem_public(private))
    auth = Authenticator(AuthConfig(jwt_key=str(path)))
    assert auth.verify_token(token(secret=private, algorithm=algorithm)).user == "alice"
    other = ec.generate_private_key(ec.SECP384R1())
    assert refusal(auth, token(secret=other, algorithm="ES384")) == "algorithm not allowed"
    # Algorithm confusion: the public key's PEM text as an HMAC secret.
    forged = jwt.api_jws.PyJWS()
    forged._algorithms["HS256"].prepare_key = lambda key: key  # PyJWT refuses to sign so
    payload = json.dumps({"sub": "alice", "exp": int(time.time()) + 60}).encode()
    tok = forged.encode(payload, pem_public(private), algorithm="HS256")
    assert refusal(auth, tok) == "algorithm not allowed"
    assert refusal(auth, token(secret=SECRET)) == "algorithm not allowed"


def test_a_key_file_it_cannot_use_is_a_config_error(tmp_path):
    private = tmp_path / "private.pem"
    private.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    for path, message in ((private, "holds a private key"), (junk, "is not a PEM public key"),
                          (tmp_path / "none.pem", "cannot read")):
        with pytest.raises(ConfigError, match=f"^--jwt-key: .*{message}"):
            Authenticator(AuthConfig(jwt_key=str(path)))
    private.unlink()  # no private key stays on disk


def test_fast_check_never_accepts_what_pyjwt_refuses():
    # The fast HS256 check may only ever agree with PyJWT or pass a token on.
    auth = Authenticator(AuthConfig(jwt_secret=SECRET, jwt_audience="app"))
    fast = auth._fast
    rng = random.Random(7)
    now = int(time.time())
    values = [None, 0, 1, now, now - 10, now + 10, now - 100, now + 100, now + 10 ** 6, 1.5,
              "x", True, [], {}, "alice", ["app"], "app", "", float("nan")]
    accepted = 0
    for _ in range(4000):
        claims = {"sub": "alice", "exp": now + 60, "aud": "app"}
        for name in rng.sample(("sub", "exp", "nbf", "iat", "aud", "iss", "jti"), rng.randrange(3)):
            claims[name] = rng.choice(values)  # set or spoil a claim or two
        header = rng.choice([{"alg": "HS256", "typ": "JWT"}, {"alg": "HS256"},
                             {"alg": "HS256", "kid": "k"}, {"alg": "HS256", "typ": "x"}])
        tok = jwt.api_jws.PyJWS().encode(json.dumps(claims).encode(), SECRET,
                                         algorithm="HS256", headers=header).encode()
        if rng.random() < 0.5:  # and mangle it somewhere
            i = rng.randrange(len(tok))
            tok = tok[:i] + bytes([rng.choice(b"A_-=.+/ a9")]) + tok[i + 1:]
        got = fast(tok, time.time())
        if got is None:
            continue
        accepted += 1
        expected = jwt.decode(tok, SECRET, algorithms=["HS256"], audience="app", leeway=LEEWAY,
                              options={"require": ["exp", "sub"]})
        assert got == expected
    assert accepted > 50  # the check does take the plain case


def test_fast_check_refuses_a_signed_payload_pyjwt_finds_badly_encoded():
    # Re-signed, so that only the encoding is wrong: every last character of
    # payloads of each length mod 4, stray bits and padding included.
    auth = Authenticator(AuthConfig(jwt_secret=SECRET))
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    checked = set()
    for pad in range(3):
        claims = json.dumps({"sub": "a" * (pad + 1), "exp": int(time.time()) + 60})
        good = base64.urlsafe_b64encode(claims.encode()).rstrip(b"=")
        for last in [*b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"]:
            for payload in (good[:-1] + bytes([last]), good + b"=", good + b"A"):
                signed = header + b"." + payload
                sig = base64.urlsafe_b64encode(hmac.new(SECRET.encode(), signed,
                                                        "sha256").digest()).rstrip(b"=")
                tok = signed + b"." + sig
                try:
                    expected = jwt.decode(tok, SECRET, algorithms=["HS256"])
                except jwt.InvalidTokenError:
                    expected = None
                got = auth._fast(tok, time.time())
                assert got is None or got == expected, tok
                checked.add((len(payload) % 4, got is None, expected is None))
    assert {(1, True, True), (2, True, True), (3, True, True), (2, False, False),
            (3, False, False)} <= checked


def test_the_fast_checks_hmac_is_hmac_sha256_for_any_secret_length():
    rng = random.Random(3)
    for length in (32, 63, 64, 65, 200):
        secret = bytes(rng.randrange(256) for _ in range(length))
        fast = _FastHS256(secret, None, None)
        for size in (0, 1, 55, 56, 64, 119, 1000):
            signed = bytes(rng.randrange(256) for _ in range(size))
            assert fast.mac(signed) == hmac.new(secret, signed, "sha256").digest()


def test_minted_tokens_are_what_pyjwt_reads_and_the_fast_check_takes():
    for audience, issuer in ((None, None), ("push", None), ("push", "backend")):
        minted = Minter(SECRET, audience, issuer)("alice", 90)
        assert jwt.get_unverified_header(minted) == {"alg": "HS256", "typ": "JWT"}
        claims = jwt.decode(minted, SECRET, algorithms=["HS256"], audience=audience,
                            issuer=issuer)
        assert claims["sub"] == "alice" and claims["exp"] - claims["iat"] == 90
        assert claims.get("aud") == audience and claims.get("iss") == issuer
        auth = Authenticator(AuthConfig(jwt_secret=SECRET, jwt_audience=audience,
                                        jwt_issuer=issuer))
        assert auth._fast(minted.encode(), time.time()) is not None
        assert auth.verify_token(minted).user == "alice"
    with pytest.raises(InvalidId):
        Minter(SECRET)('al"ice', 90)


def test_api_keys_from_flags_and_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# publishers\nfile-key-1\n\n  file-key-2  \n")
    auth = Authenticator(AuthConfig(api_keys=("flag-key",), api_keys_file=str(path)))
    assert all(auth.is_api_key(k) for k in ("flag-key", "file-key-1", "file-key-2"))
    assert not any(auth.is_api_key(k) for k in ("flag-ke", "flag-key2", "", "# publishers"))
    assert auth.caller(None, "file-key-2") is PUBLISHER
    assert auth.caller("Bearer flag-key", None) is PUBLISHER
    for authorization, api_key, reason in ((None, None, "missing API key or token"),
                                           ("Bearer nope", None, "unknown API key"),
                                           (None, "nope", "unknown API key"),
                                           ("Basic Zm9vOmJhcg==", None, "is not 'Bearer")):
        with pytest.raises(AuthError, match=reason) as err:
            auth.caller(authorization, api_key)
        assert err.value.status == 401
    path.write_text("good-key\nbad key\n")
    with pytest.raises(ConfigError, match=r"line 2: a key is printable") as err:
        Authenticator(AuthConfig(api_keys_file=str(path)))
    assert "bad key" not in str(err.value)
    path.write_text("# none\n")
    with pytest.raises(ConfigError, match="holds no key"):
        Authenticator(AuthConfig(api_keys_file=str(path)))


def test_permit_lets_a_token_act_for_its_own_user_only():
    alice = Identity("alice", time.time() + 60)
    Authenticator.permit(alice, "alice")
    Authenticator.permit(PUBLISHER, "bob")
    Authenticator.permit(PUBLISHER, None)
    Authenticator.permit(None, None)  # auth off
    for user, reason in (("bob", "another user"), (None, "needs an API key")):
        with pytest.raises(AuthError, match=reason) as err:
            Authenticator.permit(alice, user)
        assert err.value.status == 403 and err.value.error == "insufficient_scope"


def test_where_tokens_are_found():
    assert bearer(None) is None and bearer("Bearer abc") == "abc"
    assert bearer("bearer   abc ") == "abc"
    assert query_token("") is None and query_token("a=1&token=x%2Ey&b=2") == "x.y"
    with pytest.raises(AuthError, match="more than one token"):
        query_token("token=a&token=b")
    assert cookie_token("a=1; cometd_token=tok; b=2", "cometd_token") == "tok"
    assert cookie_token("xcometd_token=tok", "cometd_token") is None
    assert cookie_token(None, "cometd_token") is None


def test_the_accept_callback_finds_the_token_where_the_app_does():
    # What CometServer.do_read does with a request it takes whole.
    auth = Authenticator(AuthConfig(jwt_secret=SECRET))
    tok = token("bob")
    for target, fields in ((f"/test/bob?a=1&token={tok}", ""),
                           ("/events/bob", f"Authorization: Bearer {tok}\r\n"),
                           ("/test/bob", f"Cookie: a=b; cometd_token={tok}\r\n"),
                           ("/test/bob?token=bad", f"authorization:  bearer {tok} \r\n")):
        request = f"GET {target} HTTP/1.1\r\nHost: h\r\n{fields}\r\n".encode()
        user, _, _, _ = parse_stream_request(request)
        assert auth.stream(user, *stream_credentials(request)).user == "bob", request
    doubled = "GET /test/bob HTTP/1.1\r\nHost: h\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n"
    assert stream_credentials(doubled.encode()) is None  # pywsgi decides
    bare = b"GET /test/bob HTTP/1.1\r\nHost: h\r\n\r\n"
    with pytest.raises(AuthError, match="missing token"):
        auth.stream("bob", *stream_credentials(bare))


def test_config_refuses_contradictions_and_short_secrets():
    with pytest.raises(ConfigError, match="^--jwt-key: give --jwt-secret or --jwt-key, not both"):
        load("single", {"jwt_secret": SECRET, "jwt_key": "k.pem"}, {})
    with pytest.raises(ConfigError, match="^--jwt-audience: needs --jwt-secret or --jwt-key"):
        load("single", {"jwt_audience": "app", "api_key": ("k",)}, {})
    with pytest.raises(ConfigError, match="shorter than 32 bytes") as err:
        load("single", {}, {"COMETD_JWT_SECRET": "short-secret"})
    assert "short-secret" not in str(err.value)
    assert not load("single", {}, {}).auth_enabled
    assert load("single", {}, {"COMETD_API_KEY": "a,b"}).auth.api_keys == ("a", "b")
    assert load("single", {}, {"COMETD_API_KEY": "a"}).auth_enabled


def test_expiry_wheel_hands_out_each_item_when_due_and_forgets_discarded_ones():
    wheel = ExpiryWheel(now=1000)
    slots = {name: wheel.add(name, when) for name, when in
             (("a", 1000.5), ("b", 1002), ("c", 1002.1), ("past", 10), ("gone", 1001))}
    assert slots["past"] == 1001  # already due: the next sweep
    wheel.discard("gone", slots["gone"])
    assert wheel.due(1000.9) == []
    assert sorted(wheel.due(1001)) == ["a", "past"]
    assert wheel.due(1002) == ["b"]
    assert wheel.due(1002.99) == []
    assert wheel.due(5000) == ["c"] and len(wheel) == 0


# -- real servers -------------------------------------------------------------------


def auth_args(*extra: str) -> list[str]:
    return ["--jwt-secret", SECRET, "--api-key", KEY, *extra]


@pytest.fixture(scope="module", params=VARIANTS)
def srv(request, tmp_path_factory):
    s = start_server(str(tmp_path_factory.mktemp("auth") / "db"), *variant_args(request.param),
                     "--admin-port", "-1", "--keepalive", "0.3", *auth_args())
    yield s
    s.stop()
    assert KEY not in "".join(s.output) and SECRET not in "".join(s.output)
    assert "Traceback" not in "".join(s.output)


def open_stream(srv, path: str, headers: dict[str, str] | None = None, split: bool = False,
                timeout: float = 10.0) -> StreamClient:
    """GET *path*; *split*: the request in two parts, so pywsgi and not the accept callback
    takes it."""
    lines = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    request = f"GET {path} HTTP/1.1\r\nHost: {srv.host}\r\n{lines}\r\n".encode()
    sock = socket.create_connection((srv.host, srv.port), timeout=timeout)
    if split:
        sock.sendall(request[:10])
        time.sleep(0.05)
        sock.sendall(request[10:])
    else:
        sock.sendall(request)
    return StreamClient(sock, timeout)


def stream_answer(srv, path, headers=None, split=False) -> tuple[int, object]:
    """(200, welcome chunk) for an opened stream, else (status, reason)."""
    with open_stream(srv, path, headers, split) as c:
        if c.status == 200:
            return 200, c.chunk()
        data = json.loads(c.read_raw(int(c.headers["content-length"])))
        reason = data["error"]
        code = "invalid_token" if c.status == 401 else "insufficient_scope"
        www = f'Bearer error="{code}", error_description="{reason}"'
        assert c.headers["www-authenticate"] == www, c.headers
        assert c.headers["content-type"] == "application/json"
        return c.status, data["error"]


def api(srv, method: str, path: str, body=None, **headers) -> tuple[int, object]:
    status, got, data = http_request(srv, method, path, body, headers={
        k.replace("_", "-"): v for k, v in headers.items()})
    payload = json.loads(data)
    if status in (401, 403):
        assert got["www-authenticate"].endswith(f'error_description="{payload["error"]}"')
    if status == 200 and path.startswith("/send/"):
        assert parse_id(payload.pop("id")) is not None, payload  # ids: see test_history
    return status, payload


def key_get(srv, path: str):
    status, payload = api(srv, "GET", path, X_API_Key=KEY)
    assert status == 200, payload
    return payload


@pytest.mark.parametrize("split", [False, True], ids=["accept-callback", "pywsgi"])
def test_a_stream_takes_its_token_from_header_query_or_cookie(srv, split):
    user = unique_id("u")
    tok = token(user)
    welcome = f"Welcome, Url: '/test/{user}' Id: {user}\n".encode()
    assert stream_answer(srv, f"/test/{user}", {"Authorization": f"Bearer {tok}"},
                         split) == (200, welcome)
    assert stream_answer(srv, f"/test/{user}?token={tok}", None, split) == (200, welcome)
    assert stream_answer(srv, f"/test/{user}", {"Cookie": f"x=1; cometd_token={tok}"},
                         split) == (200, welcome)
    status, welcome = stream_answer(srv, f"/events/{user}?token={tok}", None, split)
    assert status == 200 and welcome.startswith(b": Welcome")
    # Resumes, checked the same way.
    status, welcome = stream_answer(srv, f"/events/{user}?token={tok}", {"Last-Event-ID": "1-1"},
                                    split)
    assert status == 200 and welcome.startswith(b": Welcome")
    assert stream_answer(srv, f"/test/{user}?since=1-1", {"Authorization": f"Bearer {tok}"},
                         split) == (200, f"Welcome, Url: '/test/{user}' Id: {user}\n".encode())


@pytest.mark.parametrize("split", [False, True], ids=["accept-callback", "pywsgi"])
def test_a_stream_without_a_good_token_is_refused_with_the_reason(srv, split):
    user = unique_id("u")
    now = int(time.time())
    none = jwt.encode({"sub": user, "exp": now + 60}, None, algorithm="none")
    for path, headers, expected in (
            (f"/test/{user}", None, (401, "missing token")),
            (f"/test/{user}?token=garbage", None, (401, "malformed token")),
            (f"/test/{user}?token={token(user, ttl=-LEEWAY - 1)}", None, (401, "token expired")),
            (f"/test/{user}?token={token(user, nbf=now + 600)}", None,
             (401, "token not yet valid")),
            (f"/test/{user}?token={token(user, secret='x' * 32)}", None, (401, "bad signature")),
            (f"/test/{user}?token={none}", None, (401, "algorithm not allowed")),
            (f"/events/{user}?token={token('someone-else')}", None,
             (403, "the token is for another user")),
            # resumes, refused alike
            (f"/events/{user}?token={token('someone-else')}", {"Last-Event-ID": "1-1"},
             (403, "the token is for another user")),
            (f"/test/{user}?since=1-1&token={token(user, ttl=-LEEWAY - 1)}", None,
             (401, "token expired")),
            (f"/events/{user}?last_event_id=1-1", None, (401, "missing token")),
            (f"/test/{user}", {"Authorization": f"Bearer {KEY}"}, (401, "malformed token")),
            (f"/test/{user}", {"Authorization": "Basic Zm9v"},
             (401, "the Authorization header is not 'Bearer <token>'"))):
        assert stream_answer(srv, path, headers, split) == expected, path


def test_garbage_tokens_are_each_refused_and_cost_no_memory(srv):
    rng = random.Random(11)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~%"
    user = unique_id("g")
    rss = []
    for i in range(500):
        if i == 100:
            rss.append(key_get(srv, "/stats")["rss_bytes"])
        garbage = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 600)))
        if rng.random() < 0.3:  # three segments, like a token
            garbage = ".".join(garbage[j::3] for j in range(3))
        status, _ = stream_answer(srv, f"/test/{user}?token={garbage}")
        assert status == 401, garbage
    rss.append(key_get(srv, "/stats")["rss_bytes"])
    assert rss[1] - rss[0] < 4 << 20, rss
    assert key_get(srv, "/stats")["connections"] == 0


def test_a_stream_ends_when_its_token_expires(srv):
    user = unique_id("x")
    # Accepted within the leeway, so it expires about two seconds from now.
    tok = token(user, ttl=-LEEWAY + 2)
    with open_stream(srv, f"/test/{user}?token={tok}") as plain, \
            open_stream(srv, f"/events/{user}?token={tok}", split=True) as sse:
        plain.chunk(), sse.chunk()
        assert api(srv, "POST", f"/send/{user}", b"before", X_API_Key=KEY) == (
            200, {"delivered": 2})
        assert plain.chunk() == b"before"
        plain.wait_closed(timeout=6)
        sse.wait_closed(timeout=6)
        assert plain.parser.ended and sse.parser.ended  # the last chunk: ended on purpose
        assert sse.parser.chunks[-1] == b"event: expired\ndata: token expired\n\n"
    wait_for(lambda: key_get(srv, "/stats")["connections"] == 0, 5, what="streams closed")


def test_publishing_needs_a_key_or_the_users_own_token(srv):
    user = unique_id("p")
    with open_stream(srv, f"/test/{user}?token={token(user)}") as c:
        c.chunk()
        for headers, expected in (
                ({}, (401, {"error": "missing API key or token"})),
                ({"X_API_Key": "wrong"}, (401, {"error": "unknown API key"})),
                ({"Authorization": "Bearer wrong"}, (401, {"error": "unknown API key"})),
                ({"Authorization": f"Bearer {token('other')}"},
                 (403, {"error": "the token is for another user"})),
                ({"Authorization": f"Bearer {token(user, ttl=-99)}"},
                 (401, {"error": "token expired"})),
                ({"Cookie": f"cometd_token={token(user)}"},  # no cookies here: CSRF
                 (401, {"error": "missing API key or token"}))):
            assert api(srv, "POST", f"/send/{user}", b"refused", **headers) == expected
        for headers in ({"X_API_Key": KEY}, {"Authorization": f"Bearer {KEY}"},
                        {"Authorization": f"Bearer {token(user)}"}):
            assert api(srv, "POST", f"/send/{user}", b"ok", **headers) == (200, {"delivered": 1})
        assert c.chunks(3) == [b"ok"] * 3  # and nothing refused arrived before them


def test_subscriptions_and_stats_need_a_key_or_concern_the_token_user(srv):
    alice, bob = unique_id("a"), unique_id("b")
    mine = {"Authorization": f"Bearer {token(alice)}"}
    assert api(srv, "POST", "/subscriptions", json.dumps([[bob, alice]]), **mine) == (
        403, {"error": "the token is for another user"})
    assert api(srv, "POST", "/subscriptions", json.dumps([[alice, bob], [bob, alice]]),
               **mine) == (403, {"error": "the token is for another user"})
    assert api(srv, "POST", "/subscriptions", json.dumps([[alice, bob]])) == (
        401, {"error": "missing API key or token"})
    assert key_get(srv, f"/subscriptions/{alice}") == {"subscriptions": []}  # nothing applied
    assert key_get(srv, f"/subscriptions/{bob}") == {"subscriptions": []}
    assert api(srv, "POST", "/subscriptions", json.dumps([[alice, bob]]), **mine) == (
        200, {"added": 1})
    assert api(srv, "GET", f"/subscriptions/{alice}", **mine) == (200, {"subscriptions": [bob]})
    assert api(srv, "GET", f"/subscriptions/{bob}", **mine)[0] == 403
    assert api(srv, "GET", f"/subscribers/{bob}", **mine) == (
        403, {"error": "this needs an API key"})
    assert key_get(srv, f"/subscribers/{bob}") == {"subscribers": [alice]}
    assert api(srv, "DELETE", "/subscriptions", json.dumps([[alice, bob]]), **mine) == (
        200, {"removed": 1})
    assert api(srv, "GET", "/stats", **mine) == (403, {"error": "this needs an API key"})
    assert api(srv, "GET", "/stats")[0] == 401
    assert "connections" in key_get(srv, "/stats")


def test_token_command_mints_what_the_server_takes(srv):
    user = unique_id("t")
    out = subprocess.run([sys.executable, COMETD, "--jwt-secret", SECRET, "token", user,
                          "--ttl", "60"], capture_output=True, text=True, cwd=ROOT, check=True)
    tok = out.stdout.strip()
    assert jwt.decode(tok, SECRET, algorithms=["HS256"])["exp"] <= time.time() + 61
    assert stream_answer(srv, f"/test/{user}?token={tok}")[0] == 200
    refused_ = subprocess.run([sys.executable, COMETD, "token", user], capture_output=True,
                              text=True, cwd=ROOT)
    assert refused_.returncode == 2 and "needs --jwt-secret" in refused_.stderr


def test_a_public_key_server_refuses_algorithm_confusion(tmp_path):
    private = rsa.generate_private_key(65537, 2048)
    path = tmp_path / "public.pem"
    path.write_bytes(pem_public(private))
    s = start_server(str(tmp_path / "db"), "--admin-port", "-1", "--jwt-key", str(path))
    try:
        user = unique_id("r")
        good = token(user, secret=private, algorithm="RS256")
        assert stream_answer(s, f"/test/{user}?token={good}")[0] == 200
        forged = jwt.api_jws.PyJWS()
        forged._algorithms["HS256"].prepare_key = lambda key: key
        payload = json.dumps({"sub": user, "exp": int(time.time()) + 60}).encode()
        bad = forged.encode(payload, pem_public(private), algorithm="HS256")
        assert stream_answer(s, f"/test/{user}?token={bad}") == (401, "algorithm not allowed")
        # Only API keys can publish; with none configured no one can.
        assert api(s, "POST", f"/send/{user}", b"x")[0] == 401
    finally:
        s.stop()


def test_workers_verify_like_one_process(tmp_path, redis_server):
    s = start_server(str(tmp_path / "db"), "--workers", "2", "--redis", redis_server.url,
                     *auth_args(), timeout=40)
    try:
        users = [unique_id("w") for _ in range(6)]
        streams = [open_stream(s, f"/test/{u}?token={token(u)}") for u in users]
        try:
            for c in streams:
                assert c.status == 200
                c.chunk()
            # Edges report logins to the router in batches: wait until it has heard them all.
            wait_for(lambda: key_get(s, "/stats")["users_online"] >= len(users), 5,
                     what="the router hearing every login")
            assert stream_answer(s, f"/test/{users[0]}") == (401, "missing token")
            assert stream_answer(s, f"/test/{users[0]}?token={token('x')}")[0] == 403
            assert api(s, "POST", f"/send/{users[0]}", b"no") == (
                401, {"error": "missing API key or token"})
            assert api(s, "GET", "/stats")[0] == 401
            for u in users:
                assert api(s, "POST", f"/send/{u}", b"hi", X_API_Key=KEY) == (
                    200, {"delivered": 1})
            assert api(s, "POST", f"/send/{users[1]}", b"me",
                       Authorization=f"Bearer {token(users[1])}") == (200, {"delivered": 1})
            assert [c.chunk() for c in streams] == [b"hi"] * 6
            assert streams[1].chunk() == b"me"
            mine = {"Authorization": f"Bearer {token(users[2])}"}
            assert api(s, "POST", "/subscriptions", json.dumps([[users[3], users[2]]]),
                       **mine) == (403, {"error": "the token is for another user"})
            assert api(s, "POST", "/subscriptions", json.dumps([[users[2], users[3]]]),
                       **mine) == (200, {"added": 1})
            assert api(s, "GET", f"/subscriptions/{users[2]}", **mine) == (
                200, {"subscriptions": [users[3]]})
            # An edge closes a stream at its token's expiry, like one process.
            with open_stream(s, f"/events/{users[4]}?token={token(users[4], ttl=-LEEWAY + 2)}") \
                    as short:
                short.chunk()
                short.wait_closed(timeout=6)
                assert short.parser.ended
                assert short.parser.chunks[-1] == b"event: expired\ndata: token expired\n\n"
        finally:
            for c in streams:
                c.close()
    finally:
        s.stop()
    assert KEY not in "".join(s.output) and "Traceback" not in "".join(s.output)


def test_a_failing_handler_greenlet_would_not_print_the_request():
    # gevent prints a failed greenlet with its arguments; the handler's are the request bytes.
    import gevent

    from cometd.server import _Unshown

    tok = token("alice")
    first = _Unshown(f"GET /test/alice?token={tok} HTTP/1.1\r\n".encode())
    shown = repr(gevent.Greenlet(print, "sock", ("127.0.0.1", 1), first))
    assert tok[:8] not in shown and "request bytes" in shown
    assert first[:4] == b"GET " and tok.encode() in first  # the bytes themselves are intact


def test_secrets_are_never_shown_and_unusable_key_files_stop_the_start(tmp_path):
    def cometd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, COMETD, *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=60, env=env)

    shown = cometd("--jwt-secret", SECRET, "--api-key", KEY, "config")
    assert shown.returncode == 0 and "jwt_secret = (set, not shown)" in shown.stdout
    assert SECRET not in shown.stdout and KEY not in shown.stdout
    toml = tmp_path / "c.toml"
    toml.write_text("[auth]\njwt_secret = 123456789\n")
    wrong = cometd("--config", str(toml), "config")
    assert wrong.returncode == 2 and "123456789" not in wrong.stderr
    for args in (["--api-keys-file", str(tmp_path / "none")],
                 ["--api-keys-file", str(tmp_path / "none"), "--workers", "1", "--redis",
                  "redis://127.0.0.1:1/0"]):
        failed = cometd("--port", "0", "--admin-port", "-1", "--db", str(tmp_path / "db"), *args)
        assert failed.returncode == 2, failed
        assert failed.stderr == (f"cometd: error: --api-keys-file: cannot read "
                                 f"{tmp_path / 'none'}: No such file or directory\n")


def test_a_shutdown_just_after_expiry_ends_the_stream_once(tmp_path):
    s = start_server(str(tmp_path / "db"), "--admin-port", "-1", *auth_args())
    try:
        user = unique_id("e")
        with open_stream(s, f"/test/{user}?token={token(user, ttl=-LEEWAY + 1)}") as c:
            c.chunk()
            wait_for(lambda: c._recv(time.monotonic() + 5) and c.parser.ended, 5,
                     what="the expired stream's last chunk")
            s.stop()  # within the second before the server closes it
            c.wait_closed(timeout=5)
            assert c.parser.ended and bytes(c.parser.buf) == b""  # nothing after the end
    finally:
        s.stop()


@pytest.mark.parametrize("mode", MODES)
def test_a_server_with_audience_and_issuer_checks_them(tmp_path, mode):
    s = start_server(str(tmp_path / "db"), "--admin-port", "-1", "--mode", mode,
                     *auth_args("--jwt-audience", "app", "--jwt-issuer", "backend"))
    try:
        user = unique_id("i")
        for split in (False, True):
            for claims, expected in (({"aud": "app", "iss": "backend"}, 200),
                                     ({"aud": "web", "iss": "backend"}, (401, "wrong audience")),
                                     ({"aud": "app", "iss": "else"}, (401, "wrong issuer")),
                                     ({"iss": "backend"}, (401, "the token has no aud claim")),
                                     ({"aud": "app"}, (401, "the token has no iss claim"))):
                got = stream_answer(s, f"/events/{user}?token={token(user, **claims)}", None,
                                    split)
                assert (got[0] if expected == 200 else got) == expected, (claims, split)
    finally:
        s.stop()
