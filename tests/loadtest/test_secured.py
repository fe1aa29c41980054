"""floodtest and msggen against a secured `bin/cometd`: tokens for streams, a key for publishes.

One server (``--jwt-secret`` and ``--api-key``) serves the whole module; both
tools run in process through their command lines (click), so each run costs
its connects and not a Python start. The server is the judge: a stream it
refuses never gets its welcome, a publish it refuses is a 401.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import start_server

from cometd.auth import mint
from cometd.loadtest import floodtest, msggen
from cometd.loadtest.common import read_secret

SECRET = "load-tools-test-secret-of-32-bytes-or-more"
KEY = "load-tools-test-api-key"
N = 4


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    db = tmp_path_factory.mktemp("secured") / "db"
    srv = start_server(str(db), "--jwt-secret", SECRET, "--api-key", KEY, "--admin-port", "-1")
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _no_inherited_secrets(monkeypatch):
    for name in (floodtest.SECRET_ENV, msggen.API_KEY_ENV):
        monkeypatch.delenv(name, raising=False)


def _run(command, *args: str, tmp_path, env: dict[str, str] | None = None) -> tuple[dict, str]:
    """Run a tool's command line in process; its JSON summary and its output."""
    out = tmp_path / "summary.json"
    result = CliRunner().invoke(command, [*args, "--json", str(out)], env=env,
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.output


def _flood(srv, *args: str, tmp_path, env=None) -> tuple[dict, str]:
    return _run(floodtest.main, "--port", str(srv.port), "--n", str(N), "--rate", "0",
                "--duration", "0.2", "--processes", "1", *args, tmp_path=tmp_path, env=env)


def _publish(srv, *args: str, tmp_path, env=None) -> tuple[dict, str]:
    return _run(msggen.main, "--url", srv.url, "--rate", "0", "--count", "5", "--users", "3",
                "--concurrency", "1", *args, tmp_path=tmp_path, env=env)


def test_floodtest_streams_need_a_token_and_get_one_minted_from_the_secret_file(
        secured, tmp_path):
    s, _ = _flood(secured, tmp_path=tmp_path)
    assert (s["opened"], s["welcomed"], s["http_errors"]) == (N, 0, N), s

    secret_file = tmp_path / "jwt-secret"
    secret_file.write_text(f"# the server's --jwt-secret\n{SECRET}\n")
    s, output = _flood(secured, "--jwt-secret-file", str(secret_file), tmp_path=tmp_path)
    assert (s["welcomed"], s["http_errors"], s["closed"]) == (N, 0, 0), s
    assert SECRET not in output


def test_floodtest_takes_cometds_secret_variable_or_tokens_minted_elsewhere(secured, tmp_path):
    s, output = _flood(secured, tmp_path=tmp_path, env={floodtest.SECRET_ENV: SECRET})
    assert (s["welcomed"], s["http_errors"]) == (N, 0), s
    assert SECRET not in output

    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{u} {mint(SECRET, str(u), 600)}\n" for u in range(1, N + 1)))
    s, _ = _flood(secured, "--tokens-file", str(tokens), tmp_path=tmp_path)
    assert (s["welcomed"], s["http_errors"]) == (N, 0), s

    # A token for someone else is refused like none: the server checks sub.
    tokens.write_text("".join(f"{u} {mint(SECRET, str(u + 1), 600)}\n"
                              for u in range(1, N + 1)))
    s, _ = _flood(secured, "--tokens-file", str(tokens), tmp_path=tmp_path)
    assert (s["welcomed"], s["http_errors"]) == (0, N), s


def test_floodtest_refuses_a_tokens_file_short_of_a_user_without_showing_a_token(tmp_path):
    token = mint(SECRET, "1", 600)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"1 {token}\n")
    result = CliRunner().invoke(floodtest.main, ["--n", "2", "--tokens-file", str(tokens)])
    assert result.exit_code == 2
    assert f"{tokens} has no token for user 2" in result.output
    tokens.write_text(f"1 {token} extra\n")
    result = CliRunner().invoke(floodtest.main, ["--n", "1", "--tokens-file", str(tokens)])
    assert result.exit_code == 2 and "line 1 is not '<user> <token>'" in result.output
    assert token not in result.output


def test_msggen_publishes_need_the_api_key_and_take_it_from_a_file_or_the_variable(
        secured, tmp_path):
    s, _ = _publish(secured, tmp_path=tmp_path)
    assert (s["sent"], s["errors_by_kind"]) == (0, {"http-401": 5}), s

    keys = tmp_path / "keys"  # the server's --api-keys-file format
    keys.write_text(f"# publishers\n\n{KEY}\nanother-key\n")
    s, output = _publish(secured, "--api-key-file", str(keys), tmp_path=tmp_path)
    assert (s["sent"], s["errors"]) == (5, 0), s
    assert KEY not in output

    s, _ = _publish(secured, tmp_path=tmp_path, env={msggen.API_KEY_ENV: f"{KEY},another-key"})
    assert (s["sent"], s["errors"]) == (5, 0), s
    s, _ = _publish(secured, tmp_path=tmp_path, env={msggen.API_KEY_ENV: "not-the-key"})
    assert (s["sent"], s["errors_by_kind"]) == (0, {"http-401": 5}), s


def test_a_secret_comes_from_the_file_before_the_variable_and_is_never_in_an_error(tmp_path):
    env = {"V": " first , second"}
    assert read_secret(None, "V", "--f", ",", environ=env) == "first"
    assert read_secret(None, "V", "--f", environ=env) == " first , second"  # a JWT secret as is
    assert read_secret(None, "V", "--f", environ={}) is None
    path = tmp_path / "s"
    path.write_text("\n# comment\n  the-secret  \nnext\n")
    assert read_secret(str(path), "V", "--f", environ=env) == "the-secret"
    path.write_text("# only a comment\n")
    with pytest.raises(ValueError, match=rf"^--f: {path} holds no secret$"):
        read_secret(str(path), "V", "--f", environ=env)
    with pytest.raises(ValueError, match=r"^--f: cannot read .*/missing: No such file"):
        read_secret(str(tmp_path / "missing"), "V", "--f", environ=env)
    path.write_bytes(b"\xff\xfe secret")
    with pytest.raises(ValueError, match="not UTF-8 text") as info:
        read_secret(str(path), "V", "--f", environ=env)
    assert "secret" not in str(info.value).replace(str(path), "")
