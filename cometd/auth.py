"""Who may do what: stream tokens (JWT) for users, API keys for publishers and operators.

An :class:`Authenticator` is built from the ``[auth]`` configuration
(:class:`cometd.config.AuthConfig`). Both ways into a stream (the accept
callback in :mod:`cometd.server` and the bottle app in :mod:`cometd.webapp`)
and every API route ask it; it answers with a verdict -- an :class:`Identity`
(a user's verified token) or :data:`PUBLISHER` (an API key) -- or raises an
:class:`AuthError` that carries the HTTP status and the reason. With nothing
configured it is disabled and every request is allowed, as before.

The rules
---------
- A stream ``/test/<id>`` or ``/events/<id>`` needs a token whose ``sub`` is
  ``<id>``; the token comes from the ``Authorization: Bearer`` header, else
  the ``token`` query parameter (EventSource cannot set headers), else the
  cookie (``cometd_token``). An API key opens no stream.
- ``POST /send/<subject>``, ``/subscribers``, the subscription API and
  ``/stats`` need an API key (``Authorization: Bearer`` or ``X-API-Key``). A
  user's token may stand in where the request concerns that user alone:
  publishing as itself, reading its own subscriptions, adding or removing
  pairs whose subscriber is itself. These routes read credentials from the
  headers only: a cookie, sent by the browser with any cross-site form, would
  let another site publish as the user (CSRF).
- No or a bad credential: 401 with ``WWW-Authenticate: Bearer
  error="invalid_token"``; a good one that does not cover the request: 403.

Tokens
------
PyJWT verifies them with the algorithm the key allows and no other: HS256
for ``--jwt-secret``; RS256, ES256/384/512 or EdDSA for a ``--jwt-key``, by
the key's type. So ``alg: none`` and an HS256 token "signed" with the public
key are refused. ``sub`` and ``exp`` are required, ``nbf`` and ``iat``
honoured, ``aud`` and ``iss`` checked when configured, all with
:data:`LEEWAY` for clock skew. A verified stream is closed when its token
stops being accepted, ``exp`` plus the leeway (:class:`cometd.expiry.ExpiryWheel`).

Theory of operation: the fast HS256 check
------------------------------------------
PyJWT takes ~23 us per token here, while the accept callback opens a whole
stream in ~12 us, so PyJWT alone would nearly triple the cost of a connection
ramp. :meth:`Authenticator.verify_token` therefore first tries
:func:`_fast_hs256`, a check that can only *accept*: it takes the plain case
(a header that is exactly ``{"alg":"HS256","typ":"JWT"}`` or
``{"alg":"HS256"}``, canonical base64url, a good HMAC, integer ``exp``,
``nbf`` and ``iat``, string claims) and returns None for anything else, which
then goes to PyJWT, the one authority on rejections and their reasons.
tests/test_auth.py checks on thousands of mutated tokens, and on re-signed
ones encoded every wrong way, that it never accepts a token PyJWT refuses.
It costs ~2.7 us a token in process, mostly the HMAC (two keyed hashlib
states copied, 0.6 us), the JSON (``raw_decode``, 0.4 us) and base64.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import unquote

from cometd.config import API_KEY, AuthConfig, ConfigError, setting_lines
from cometd.ids import InvalidId, check_id

__all__ = [
    "LEEWAY", "MAX_TOKEN_BYTES", "AuthError", "Identity", "Publisher", "PUBLISHER",
    "Authenticator", "bearer", "query_token", "cookie_token", "Minter", "mint",
]

#: seconds of clock skew allowed on exp, nbf and iat
LEEWAY = 30
#: a longer token is refused before it is parsed
MAX_TOKEN_BYTES = 8192


class AuthError(Exception):
    """A request refused: 401 (no or bad credential) or 403 (not this one's to do)."""

    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description

    @property
    def error(self) -> str:
        """The RFC 6750 error code."""
        return "invalid_token" if self.status == 401 else "insufficient_scope"

    @property
    def www_authenticate(self) -> str:
        return f'Bearer error="{self.error}", error_description="{self.description}"'


def _unauthorized(description: str) -> AuthError:
    return AuthError(401, description)


@dataclass(frozen=True, slots=True)
class Identity:
    """A user's verified token."""

    user: str
    #: when the token stops being accepted (exp plus the leeway), Unix time
    expires: float


@dataclass(frozen=True, slots=True)
class Publisher:
    """The holder of an API key: may do anything."""


PUBLISHER = Publisher()


# -- where credentials are --------------------------------------------------------

def bearer(authorization: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer`` header (None when there is none)."""
    if authorization is None:
        return None
    scheme, _, credential = authorization.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise _unauthorized("the Authorization header is not 'Bearer <token>'")
    return credential


def query_token(query: str) -> str | None:
    """The ``token`` parameter of a query string (None when there is none)."""
    if "token=" not in query:
        return None
    if query.startswith("token=") and "&" not in query:  # the common case, and cheaper
        return unquote(query[6:])
    found = [part[6:] for part in query.split("&") if part.startswith("token=")]
    if len(found) > 1:
        raise _unauthorized("more than one token parameter")
    return unquote(found[0]) if found else None


def cookie_token(header: str | None, name: str) -> str | None:
    """The value of cookie *name* in a ``Cookie`` header (None when there is none)."""
    if not header or name not in header:
        return None
    for part in header.split(";"):
        key, eq, value = part.strip().partition("=")
        if eq and key == name:
            return value.strip().strip('"')
    return None


# -- the fast HS256 check (see the module docstring) ---------------------------------

_HS256_HEADERS = ({"alg": "HS256", "typ": "JWT"}, {"alg": "HS256"})
_JSON_OBJECT = json.JSONDecoder().raw_decode


_URLSAFE = bytes.maketrans(b"-_+/", b"+/-_")  # base64url <-> base64 (an involution)
#: the HMAC pads (RFC 2104), as byte translations of the key
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))
#: the padding of an unpadded segment, by its length mod 4 (1 is never valid)
_PADDING = (b"", b"", b"==", b"=")
#: the last characters a canonical segment may end with, by its length mod 4: any, none,
#: one carrying 2 bits and 4 zero ones, one carrying 4 bits and 2 zero ones
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_CANONICAL_LAST = tuple(frozenset(_ALPHABET[i:i + 1] for i in range(0, len(_ALPHABET), step))
                        if step else frozenset() for step in (1, 0, 16, 4))


def _b64decode(segment: bytes) -> bytes | None:
    """A canonical unpadded base64url segment's bytes, else None."""
    if len(segment) % 4 == 1 or b"=" in segment:
        return None
    try:  # strict: any character outside the alphabet is an error
        data = binascii.a2b_base64(segment.translate(_URLSAFE) + _PADDING[len(segment) % 4],
                                   strict_mode=True)
    except binascii.Error:
        return None
    if _b64encode(data) != segment:
        return None  # stray bits in the last character: not canonical
    return data


def _b64encode(data: bytes) -> bytes:
    return binascii.b2a_base64(data, newline=False).rstrip(b"=").translate(_URLSAFE)


class _FastHS256:
    """The accept-only HS256 check; None means "ask PyJWT"."""

    def __init__(self, secret: bytes, audience: str | None, issuer: str | None) -> None:
        # HMAC-SHA256 (RFC 2104) as two keyed hashlib states, copied per token: 0.56 us
        # a token against 0.95 for a copy of hmac's own state (tests compare the two).
        if len(secret) > 64:
            secret = hashlib.sha256(secret).digest()
        secret = secret.ljust(64, b"\0")
        self.inner = hashlib.sha256(secret.translate(_IPAD))
        self.outer = hashlib.sha256(secret.translate(_OPAD))
        self.audience = audience
        self.issuer = issuer
        #: header segments known to be exactly one of _HS256_HEADERS (bounded)
        self.headers: set[bytes] = set()

    def mac(self, signed: bytes) -> bytes:
        """The HMAC-SHA256 of *signed* under the secret."""
        inner = self.inner.copy()
        inner.update(signed)
        outer = self.outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def _header_ok(self, segment: bytes) -> bool:
        if segment in self.headers:
            return True
        data = _b64decode(segment)
        try:
            ok = data is not None and json.loads(data) in _HS256_HEADERS
        except ValueError:
            return False
        if ok and len(self.headers) < 64:
            self.headers.add(segment)
        return ok

    def __call__(self, token: bytes, now: float) -> dict[str, Any] | None:
        parts = token.split(b".")
        if len(parts) != 3:
            return None
        header, payload, signature = parts
        if header not in self.headers and not self._header_ok(header):
            return None
        # Comparing the encoded signature also demands its canonical form.
        if not hmac.compare_digest(_b64encode(self.mac(token[:len(header) + len(payload) + 1])),
                                   signature):
            return None
        # Canonical, as PyJWT demands: no "=", and no stray bits in the last character
        # (a lookup, cheaper than _b64decode's encoding it back).
        if b"=" in payload or payload[-1:] not in _CANONICAL_LAST[len(payload) % 4]:
            return None
        try:  # UTF-8 only (PyJWT also takes UTF-16 and -32 JSON: it judges those)
            text = binascii.a2b_base64(payload.translate(_URLSAFE) + _PADDING[len(payload) % 4],
                                       strict_mode=True).decode()
            # raw_decode skips json.loads' Python layers (0.4 us against 0.9); any
            # whitespace around the object is left to PyJWT.
            claims, end = _JSON_OBJECT(text)
        except (binascii.Error, ValueError):
            return None
        if type(claims) is not dict or end != len(text):
            return None
        get = claims.get
        exp, nbf, iat = get("exp"), get("nbf", 0), get("iat", 0)
        # type() is int: neither a bool nor a float (PyJWT judges those)
        if not (type(exp) is int and exp > now - LEEWAY and type(get("sub")) is str
                and type(nbf) is int and nbf <= now + LEEWAY
                and type(iat) is int and iat <= now + LEEWAY):
            return None
        if "jti" in claims and type(claims["jti"]) is not str:
            return None
        if get("aud") != self.audience or ("iss" in claims or self.issuer is not None) and (
                get("iss") != self.issuer):
            return None  # includes a list aud: PyJWT judges those
        return claims


# -- the authenticator ---------------------------------------------------------------

def _public_key(path: str) -> tuple[Any, str]:
    """The PEM public key in *path* and the one algorithm it verifies."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"--jwt-key: cannot read {path}: {exc.strerror}") from None
    if b"PRIVATE KEY" in data:
        raise ConfigError(f"--jwt-key: {path} holds a private key; give the server the public "
                          "key only")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ConfigError(f"--jwt-key: {path} is not a PEM public key") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = {"secp256r1": "ES256", "secp384r1": "ES384",
                     "secp521r1": "ES512"}.get(key.curve.name)
        if algorithm is None:
            raise ConfigError(f"--jwt-key: {path}: curve {key.curve.name} has no JWT algorithm")
        return key, algorithm
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return key, "EdDSA"
    raise ConfigError(f"--jwt-key: {path}: unsupported key type {type(key).__name__}")


def _key_file(path: str) -> list[str]:
    keys = []
    for number, line in setting_lines(path, "--api-keys-file"):
        if not API_KEY.fullmatch(line):  # never the key itself in the message
            raise ConfigError(f"--api-keys-file: {path} line {number}: a key is printable "
                              "ASCII with no space or comma")
        keys.append(line)
    if not keys:
        raise ConfigError(f"--api-keys-file: {path} holds no key")
    return keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@cache
def _jwt_errors() -> list[tuple[type[Exception], str]]:
    """PyJWT's refusals and the reasons given for them, most specific first."""
    import jwt

    return [
        (jwt.InvalidSignatureError, "bad signature"),
        (jwt.InvalidAlgorithmError, "algorithm not allowed"),
        (jwt.ExpiredSignatureError, "token expired"),
        (jwt.ImmatureSignatureError, "token not yet valid"),
        (jwt.InvalidAudienceError, "wrong audience"),
        (jwt.InvalidIssuerError, "wrong issuer"),
        (jwt.exceptions.InvalidSubjectError, "the token's sub is not a valid user id"),
        (jwt.DecodeError, "malformed token"),
    ]


class Authenticator:
    """Verifies tokens and API keys as configured; see the module docstring."""

    def __init__(self, config: AuthConfig) -> None:
        """Build from *config*; a key file that cannot be used is a :class:`ConfigError`."""
        self.cookie = config.token_cookie
        self.audience = config.jwt_audience
        self.issuer = config.jwt_issuer
        self._key: Any = None
        self._algorithms: list[str] = []
        self._fast: _FastHS256 | None = None
        if config.jwt_secret:
            self._key, self._algorithms = config.jwt_secret, ["HS256"]
            self._fast = _FastHS256(config.jwt_secret.encode(), self.audience, self.issuer)
        elif config.jwt_key:
            self._key, algorithm = _public_key(config.jwt_key)
            self._algorithms = [algorithm]
        keys = list(config.api_keys or ())
        if config.api_keys_file:
            keys += _key_file(config.api_keys_file)
        # Only digests are kept: equal lengths for compare_digest, and no key in memory.
        self._key_digests = [_digest(k) for k in keys]
        #: whether anything is configured; when not, everything is allowed
        self.enabled = bool(self._key is not None or self._key_digests)
        self._jwt: Any = None
        if self._key is not None:
            # Imported here: PyJWT and cryptography cost a server start ~30 ms.
            import jwt

            self._jwt = jwt.PyJWT(options={"require": ["exp", "sub"]})

    @property
    def tokens(self) -> bool:
        """Whether stream tokens can be verified (a JWT secret or key is configured)."""
        return self._key is not None

    def verify_token(self, token: str | bytes) -> Identity:
        """The identity in a valid token; :class:`AuthError` (401) saying why not."""
        if self._key is None:
            raise _unauthorized("this server takes no tokens (no --jwt-secret or --jwt-key)")
        raw = token.encode("utf-8", "replace") if isinstance(token, str) else token
        if len(raw) > MAX_TOKEN_BYTES:
            raise _unauthorized("malformed token")
        now = time.time()
        claims = self._fast(raw, now) if self._fast is not None else None
        if claims is None:
            claims = self._decode(raw)
        try:
            user = check_id(claims["sub"])
        except InvalidId:
            raise _unauthorized("the token's sub is not a valid user id") from None
        return Identity(user, int(claims["exp"]) + LEEWAY)

    def _decode(self, raw: bytes) -> dict[str, Any]:
        import jwt  # imported by __init__ already

        try:
            return self._jwt.decode(raw, self._key, algorithms=self._algorithms,
                                    audience=self.audience, issuer=self.issuer, leeway=LEEWAY)
        except jwt.MissingRequiredClaimError as exc:
            raise _unauthorized(f"the token has no {exc.claim} claim") from None
        except jwt.InvalidTokenError as exc:
            for kind, description in _jwt_errors():
                if isinstance(exc, kind):
                    raise _unauthorized(description) from None
            raise _unauthorized("invalid token") from None
        except (ValueError, TypeError, binascii.Error):
            raise _unauthorized("malformed token") from None

    def is_api_key(self, candidate: str) -> bool:
        """Whether *candidate* is one of the keys, in time independent of which or how close."""
        digest = _digest(candidate)
        found = False
        for known in self._key_digests:
            found |= hmac.compare_digest(digest, known)
        return found

    # -- the questions the routes ask ------------------------------------------------

    def stream(self, user: str, authorization: str | None, query: str,
               cookie: str | None) -> Identity | None:
        """May this request open *user*'s stream? None when auth is off."""
        if not self.enabled:
            return None
        token = bearer(authorization)
        if token is None:
            token = query_token(query)
        if token is None:
            token = cookie_token(cookie, self.cookie)
        if token is None:
            raise _unauthorized("missing token")
        identity = self.verify_token(token)
        if identity.user != user:
            raise AuthError(403, "the token is for another user")
        return identity

    def caller(self, authorization: str | None, api_key: str | None) -> Identity | Publisher | None:
        """Who calls the API: an API key's holder or a token's user; None when auth is off."""
        if not self.enabled:
            return None
        if api_key is not None:
            if self.is_api_key(api_key.strip()):
                return PUBLISHER
            raise _unauthorized("unknown API key")
        credential = bearer(authorization)
        if credential is None:
            raise _unauthorized("missing API key or token")
        if self.is_api_key(credential):
            return PUBLISHER
        if self._key is None or credential.count(".") != 2:
            raise _unauthorized("unknown API key")
        return self.verify_token(credential)

    @staticmethod
    def permit(verdict: Identity | Publisher | None, user: str | None) -> None:
        """403 unless *verdict* covers a request about *user* (None: needs an API key)."""
        if verdict is None or verdict is PUBLISHER:
            return
        if user is None:
            raise AuthError(403, "this needs an API key")
        if verdict.user != user:
            raise AuthError(403, "the token is for another user")


class Minter:
    """HS256 tokens for users, many a second (``cometd token``, floodtest's streams).

    The header and the claims other than ``sub`` and the times are encoded
    once; a token then costs one small JSON text, two base64url encodings and
    one HMAC on a copied keyed state (~3 us, against ~16 us through PyJWT,
    which verifies them in the tests).
    """

    def __init__(self, secret: str, audience: str | None = None,
                 issuer: str | None = None) -> None:
        self._mac = hmac.new(secret.encode(), digestmod="sha256")
        header = json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":"))
        self._head = _b64encode(header.encode()) + b"."
        extra = {k: v for k, v in (("aud", audience), ("iss", issuer)) if v}
        #: the claims after sub, iat and exp, as JSON text: "" or ',"aud":...}'
        self._tail = ("," + json.dumps(extra, separators=(",", ":"))[1:] if extra
                      else "}").encode()

    def __call__(self, user: str, ttl: int) -> str:
        """A token for *user* (validated) valid *ttl* seconds from now."""
        now = int(time.time())
        claims = b'{"sub":"%s","iat":%d,"exp":%d%s' % (
            check_id(user).encode(), now, now + ttl, self._tail)  # an id needs no escaping
        signed = self._head + _b64encode(claims)
        mac = self._mac.copy()
        mac.update(signed)
        return (signed + b"." + _b64encode(mac.digest())).decode()


def mint(secret: str, user: str, ttl: int, audience: str | None = None,
         issuer: str | None = None) -> str:
    """An HS256 token for *user* valid *ttl* seconds from now (``cometd token``)."""
    return Minter(secret, audience, issuer)(user, ttl)
