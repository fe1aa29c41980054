"""The configuration: sources and their priority, errors, ``cometd config``, and the
start-up failures a user meets first, against real ``python -m cometd`` processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, StreamClient, free_port, start_cometd, start_server
from test_backplane import EDGE_READY
from test_workers import kill_leftovers, strays

from cometd import config as cfg
from cometd.config import CHILD_ENV, OPTIONS, Config, ConfigError, load, to_json, to_toml

# -- in-process: the pure configuration logic ---------------------------------------


def test_defaults_are_the_dataclass_defaults():
    config = load("single", {}, {})
    assert config == Config()
    assert config.http.port == 8000 and config.admin.port == 8001
    assert config.http.max_pending == 256 * 1024 and config.http.request_timeout == 10.0


def test_max_pending_holds_at_least_the_largest_message():
    from cometd.webapp import MAX_MESSAGE_BYTES

    assert OPTIONS["max_pending"].low == cfg.MAX_MESSAGE_BYTES == MAX_MESSAGE_BYTES


def test_the_mode_choices_are_the_connection_tables():
    from cometd.connections import MODES

    assert OPTIONS["mode"].choices == cfg.MODES == MODES


def test_cli_imports_nothing_that_must_be_patched_first():
    # The router and edge monkey-patch after parsing: nothing may import
    # ssl (and redis) earlier, or gevent cannot patch them cleanly.
    code = "import sys, cometd.cli; print(sorted({'ssl', 'redis'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_flags_beat_environment_beat_file(tmp_path):
    toml = tmp_path / "cometd.toml"
    toml.write_text('[http]\nport = 7001\nmode = "pool"\nkeepalive = 2\n[store]\ndb = "x"\n')
    env = {"COMETD_PORT": "7002", "COMETD_KEEPALIVE": "3.5"}
    config = load("single", {"port": "7003"}, env, str(toml))
    assert config.http.port == 7003  # flag over variable over file
    assert config.http.keepalive == 3.5  # variable over file
    assert config.http.mode == "pool" and config.store.db == "x"  # file over default
    assert config.http.request_timeout == 10.0  # default
    assert load("single", {}, {"COMETD_CONFIG": str(toml)}).http.port == 7001


@pytest.mark.parametrize("key,bad,problem", [
    ("keepalive", "0", "0 is not in the range 0.1..3600"),
    ("keepalive", "-5", "-5 is not in the range 0.1..3600"),
    ("request_timeout", "-1", "-1 is not in the range 0.1..3600"),
    ("max_pending", "0", "0 is not in the range 65536..1073741824"),
    ("port", "http", "'http' is not an integer"),
    ("admin_port", "-2", "-2 is not in the range -1..65535"),
    ("mode", "threads", "'threads' is not one of greenlet, pool"),
    ("keepalive", "nan", "nan is not a finite number"),
    ("workers", "0", "0 is not in the range 1..1024"),
    ("reuse_port", "maybe", "'maybe' is not true or false"),
    ("redis", "http://x", "'http://x' is not a redis://, rediss:// or unix:// URL"),
    ("history_size", "-1", "-1 is not in the range 0..1000000"),
    ("replay_max", "0", "0 is not in the range 1..1000000"),
    ("drain_seconds", "-1", "-1 is not in the range 0..3600"),
])
def test_a_bad_value_names_option_and_source(tmp_path, key, bad, problem):
    flag = OPTIONS[key].flag
    with pytest.raises(ConfigError) as err:
        load(None, {key: bad}, {})
    assert str(err.value) == f"{flag}: {problem} (from the command line)"
    with pytest.raises(ConfigError) as err:
        load(None, {}, {OPTIONS[key].env: bad})
    assert str(err.value) == f"{flag}: {problem} (from {OPTIONS[key].env})"
    opt = OPTIONS[key]
    toml = tmp_path / "c.toml"
    toml.write_text(f"[{opt.section}]\n{opt.name} = {json.dumps(bad)}\n")
    if opt.kind is not str:  # a quoted number in TOML is a string, not a number
        with pytest.raises(ConfigError, match=rf"^{flag}: .* \(from {toml}: "
                                              rf"\[{opt.section}\] {opt.name}\)$"):
            load(None, {}, {}, str(toml))


def test_the_sse_retry_range_must_not_be_upside_down():
    with pytest.raises(ConfigError) as err:
        load("single", {"sse_retry_min": "6"}, {})
    assert str(err.value) == (
        "--sse-retry-min: 6 is more than --sse-retry-max 5 (from the command line)")
    http = load("single", {"sse_retry_min": "2", "sse_retry_max": "2"}, {}).http
    assert (http.sse_retry_min, http.sse_retry_max) == (2.0, 2.0)


def test_toml_types_are_checked_and_unknown_keys_are_errors(tmp_path):
    toml = tmp_path / "c.toml"
    for text, message in [
        ("[http]\nport = 8000.5\n", "--port: 8000.5 is not an integer"),
        ("[http]\nport = true\n", "--port: True is not an integer"),
        ("[http]\nkeepalive = 0\n", "--keepalive: 0 is not in the range 0.1..3600"),
        ("[http]\nkeepalve = 1\n", f"{toml}: unknown key [http] keepalve"),
        ("[htp]\nport = 1\n", f"{toml}: unknown section [htp]"),
        ("port = 1\n", f"{toml}: unknown section [port]"),
        ("[http\n", f"config file {toml} is not valid TOML"),
    ]:
        toml.write_text(text)
        with pytest.raises(ConfigError) as err:
            load(None, {}, {}, str(toml))
        assert str(err.value).startswith(message), (text, str(err.value))
    with pytest.raises(ConfigError, match="cannot read config file .*: No such file"):
        load(None, {}, {}, str(tmp_path / "missing.toml"))


def test_printed_config_reads_back_as_the_same_config(tmp_path):
    config = load(None, {"port": "9000", "mode": "pool", "keepalive": "0.5", "reuse_port": True,
                         "redis": "redis://127.0.0.1:6379/1", "workers": "3",
                         "admin_port": "-1", "db": 'we"ird dir'}, {})
    text = to_toml(config)
    (tmp_path / "c.toml").write_text(text)
    assert load(None, {}, {}, str(tmp_path / "c.toml")) == config
    assert load(None, {}, {}, _written(tmp_path, to_toml(Config()))) == Config()


def test_printed_config_never_shows_the_password(tmp_path):
    config = load(None, {"admin_password": "s3cret", "redis": "redis://:pw9@h/0"}, {})
    assert "s3cret" not in to_toml(config) and "s3cret" not in repr(config)
    assert "pw9" not in to_toml(config)
    back = load(None, {}, {}, _written(tmp_path, to_toml(config)))
    assert (back.admin.password, back.backplane.redis) == (None, None)


def test_children_take_the_json_config_whole():
    config = load(None, {"port": "9100", "admin_password": "pw", "redis": "redis://h/0",
                         "workers": "2"}, {})
    env = {CHILD_ENV: to_json(config), "COMETD_PORT": "1", "COMETD_CONFIG": "/nonexistent"}
    assert load("edge", {"port": "2"}, env) == config  # nothing else is read
    assert load(None, {"port": "2"}, {CHILD_ENV: env[CHILD_ENV]}).http.port == 2  # children only
    with pytest.raises(ConfigError, match=f"{CHILD_ENV} does not hold a whole configuration"):
        load("edge", {}, {CHILD_ENV: '{"http": {}}'})


def test_role_checks_name_the_source():
    with pytest.raises(ConfigError, match=r"^--redis: needs --workers N, or the router or edge "
                                          r"subcommand \(from COMETD_REDIS\)$"):
        load("single", {}, {"COMETD_REDIS": "redis://127.0.0.1:6379/0"})
    with pytest.raises(ConfigError, match=r"^--workers: needs --redis URL \(from COMETD_WORKERS\)"):
        load("supervisor", {}, {"COMETD_WORKERS": "2"})
    with pytest.raises(ConfigError, match="^edge needs --redis URL$"):
        load("edge", {}, {})
    with pytest.raises(ConfigError, match="non-loopback address 0.0.0.0 needs --admin-password"):
        load("router", {"admin_host": "0.0.0.0", "redis": "redis://h/0"}, {})
    assert load("router", {"admin_host": "0.0.0.0", "admin_port": "-1", "redis": "redis://h/0"},
                {}).admin_port is None
    # The same values are fine where they mean something.
    assert load("edge", {}, {"COMETD_REDIS": "redis://h/0"}).backplane.redis == "redis://h/0"


def test_every_option_is_described_once_and_reaches_the_command_line():
    out = _run(["--help"]).stdout + _run(["edge", "--help"]).stdout
    for opt in OPTIONS.values():
        assert opt.help and opt.env == "COMETD_" + opt.key.upper()
        assert opt.flag in out and opt.env in out, opt.key
        if opt.default is not None:
            assert f"default: {opt.default}" in " ".join(out.split()), opt.key


def test_redacted_hides_only_the_password():
    assert cfg.redacted("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert cfg.redacted("redis://u:pw@h/0") == "redis://u:***@h/0"
    assert cfg.redacted("redis://h:6379/0") == "redis://h:6379/0"
    assert cfg.redacted("redis//:pw@h/0") == "redis//:***@h/0"  # mistyped: no scheme


def test_booleans_read_the_same_from_every_source(tmp_path):
    for word, value in (("yes", True), (" On ", True), ("1", True), ("off", False),
                        ("FALSE", False), ("0", False)):
        assert load(None, {}, {"COMETD_REUSE_PORT": word}).http.reuse_port is value, word
    assert load(None, {"reuse_port": True}, {"COMETD_REUSE_PORT": "no"}).http.reuse_port
    toml = _written(tmp_path, "[http]\nreuse_port = true\n")
    assert load(None, {}, {}, toml).http.reuse_port is True
    with pytest.raises(ConfigError, match=r"^--reuse-port: 1 is not true or false \(from "):
        load(None, {}, {}, _written(tmp_path, "[http]\nreuse_port = 1\n"))


def test_an_empty_value_is_an_error_unless_the_option_may_be_unset():
    with pytest.raises(ConfigError, match=r"^--host: the value is empty \(from COMETD_HOST\)$"):
        load(None, {}, {"COMETD_HOST": ""})
    with pytest.raises(ConfigError, match=r"^--db: the value is empty \(from the command line\)$"):
        load(None, {"db": ""}, {})
    # An empty variable of an option that may be unset leaves it unset.
    assert load(None, {}, {"COMETD_REDIS": "", "COMETD_WORKERS": ""}) == Config()


def test_a_bad_redis_url_is_named_without_its_password():
    for url in ("http://:hunter2@h/0", "h:6379", "redis//:hunter2@h"):
        with pytest.raises(ConfigError) as err:
            load(None, {"redis": url}, {})
        assert "hunter2" not in str(err.value) and "is not a redis://" in str(err.value), url
    for url in ("redis://:pw@h:6379/0", "rediss://h/1", "unix:///run/redis.sock"):
        assert load(None, {"redis": url}, {}).backplane.redis == url


def test_only_a_loopback_admin_console_goes_without_a_password():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert load("single", {"admin_host": host}, {}).admin.host == host
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        with pytest.raises(ConfigError, match=f"non-loopback address {host} needs"):
            load("single", {"admin_host": host}, {})
        assert load("single", {"admin_host": host, "admin_password": "pw"}, {}).admin.password
    # The default source is named when the default is what is wrong.
    with pytest.raises(ConfigError, match=r"^--workers: needs --redis URL \(from default\)$"):
        load("supervisor", {}, {})


def test_the_cometd_role_is_single_or_supervisor_as_workers_says():
    with pytest.raises(ConfigError, match="^--workers: needs --redis URL"):
        load("cometd", {"workers": "2"}, {})
    with pytest.raises(ConfigError, match="^--redis: needs --workers N"):
        load("cometd", {"redis": "redis://h/0"}, {})
    assert load("cometd", {"workers": "2", "redis": "redis://h/0"}, {}).backplane.workers == 2


def test_a_config_flag_wins_over_the_config_variable(tmp_path):
    mine = _written(tmp_path, "[http]\nport = 7100\n")
    other = tmp_path / "other.toml"
    other.write_text("[http]\nport = 7200\n")
    assert load(None, {}, {"COMETD_CONFIG": str(other)}, mine).http.port == 7100
    with pytest.raises(ConfigError, match="cannot read config file /nonexistent.toml"):
        load(None, {}, {"COMETD_CONFIG": "/nonexistent.toml"})


def test_the_childrens_json_is_checked_like_any_source():
    data = json.loads(to_json(Config()))
    data["http"]["port"] = "x"
    with pytest.raises(ConfigError, match=rf"^--port: 'x' is not an integer \(from {CHILD_ENV}\)$"):
        load("edge", {}, {CHILD_ENV: json.dumps(data)})
    data["http"]["port"] = 8000
    data["http"]["mode"] = "threads"
    with pytest.raises(ConfigError, match=r"^--mode: 'threads' is not one of greenlet, pool"):
        load("router", {}, {CHILD_ENV: json.dumps(data)})
    with pytest.raises(ConfigError, match=f"{CHILD_ENV} does not hold a whole configuration"):
        load("edge", {}, {CHILD_ENV: "not json"})


# -- processes: python -m cometd -------------------------------------------------------


def _written(tmp_path, text: str) -> str:
    path = tmp_path / "written.toml"
    path.write_text(text)
    return str(path)


def _run(args, env=None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cometd", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def _one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc
    assert "listening on" not in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_python_m_cometd_help():
    proc = _run(["--help"])
    assert proc.returncode == 0, proc.stderr
    assert "Usage: cometd" in proc.stdout and "--workers" in proc.stdout


@pytest.mark.parametrize("source", ["flag", "env", "toml"])
def test_bad_value_from_each_source_stops_the_server(tmp_path, source):
    db = tmp_path / "db"
    args, env = ["--port", "0", "--admin-port", "-1", "--db", str(db)], {}
    if source == "flag":
        args += ["--keepalive", "0"]
        where = "the command line"
    elif source == "env":
        env["COMETD_KEEPALIVE"] = "0"
        where = "COMETD_KEEPALIVE"
    else:
        args += ["--config", _written(tmp_path, "[http]\nkeepalive = 0\n")]
        where = f"{tmp_path / 'written.toml'}: [http] keepalive"
    proc = _run(args, env)
    assert proc.returncode == 2
    assert proc.stderr == (f"cometd: error: --keepalive: 0 is not in the range 0.1..3600 "
                           f"(from {where})\n")
    assert not db.exists()  # changed nothing


def test_config_command_prints_what_the_server_would_use(tmp_path):
    proc = _run(["--port", "9001", "config"], {"COMETD_MODE": "pool"})
    assert proc.returncode == 0, proc.stderr
    config = load(None, {}, {}, _written(tmp_path, proc.stdout))
    assert (config.http.port, config.http.mode) == (9001, "pool")


def test_redis_without_a_role_is_an_error(tmp_path):
    line = _one_error(_run(["--port", "0", "--redis", "redis://127.0.0.1:6379/0",
                            "--db", str(tmp_path / "db")]))
    assert line == ("cometd: error: --redis: needs --workers N, or the router or edge "
                    "subcommand (from the command line)")


def test_db_on_a_regular_file_is_not_a_directory(tmp_path):
    plain = tmp_path / "f"
    plain.write_text("x")
    line = _one_error(_run(["--port", "0", "--admin-port", "-1", "--db", str(plain)]))
    assert line == f"cometd: error: subscription database {plain} is not a directory"


def _holder(host: str = "127.0.0.1") -> socket.socket:
    """A listening socket (no SO_REUSEPORT) on a port, which nobody can share."""
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen(1)
    return sock


def test_admin_port_in_use_is_one_line(tmp_path):
    with _holder() as held:
        port = held.getsockname()[1]
        line = _one_error(_run(["--port", "0", "--admin-port", str(port),
                                "--db", str(tmp_path / "db")]))
    assert line == f"cometd: error: cannot listen on 127.0.0.1:{port}: Address already in use"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_banner_has_brackets_and_serves(tmp_path):
    srv = start_server(str(tmp_path / "db"), "--host", "::1", "--admin-host", "::1")
    try:
        banner = next(line for line in srv.output if "listening on" in line)
        assert f"http://[::1]:{srv.port}/ admin [::1]:{srv.admin_port} " in banner, banner
        with socket.create_connection(("::1", srv.port), timeout=5) as sock:
            sock.sendall(b"GET /test/v6 HTTP/1.1\r\nHost: x\r\n\r\n")
            client = StreamClient(sock)
            assert client.status == 200 and client.chunk().startswith(b"Welcome")
    finally:
        srv.stop()


def test_edge_says_when_redis_does_not_answer(tmp_path):
    url = f"redis://127.0.0.1:{free_port()}/0"
    edge = start_cometd(["edge", "--redis", url, "--port", "0"], EDGE_READY)
    try:
        warning = [line for line in edge.output if "warning" in line]
        assert warning == [f"cometd edge: warning: Redis at {url} does not answer "
                           f"(Connection refused); retrying until it does\n"], edge.output
    finally:
        edge.stop()


def test_edge_says_when_no_router_listens(redis_server):
    edge = start_cometd(["edge", "--redis", redis_server.url, "--port", "0"], EDGE_READY)
    try:
        assert [line for line in edge.output if "warning" in line] == [
            f"cometd edge: warning: no router is listening on Redis at {redis_server.url}; "
            "sends and subscription calls get 503 until one does\n"], edge.output
    finally:
        edge.stop()
    router = start_cometd(["router", "--redis", redis_server.url, "--db", str(redis_server.workdir)
                           + "/db", "--admin-port", "-1"], r"cometd router: ")
    try:
        edge = start_cometd(["edge", "--redis", redis_server.url, "--port", "0"], EDGE_READY)
        edge.stop()
        assert not [line for line in edge.output if "warning" in line], edge.output
    finally:
        router.stop()


def test_workers_with_redis_down_fail_at_once(tmp_path):
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    start = time.monotonic()
    proc = _run(["--workers", "2", "--redis", url, "--port", "0", "--admin-port", "-1",
                 "--db", str(tmp_path / "db")])
    assert time.monotonic() - start < 20
    assert proc.returncode == 1
    assert proc.stderr == (f"cometd: error: Redis at {url.replace('hunter2', '***')} does not "
                           f"answer (Connection refused); not starting\n")


def test_workers_with_the_port_taken_fail_fast(redis_server, tmp_path):
    with _holder() as held:
        port = held.getsockname()[1]
        try:
            proc = _run(["--workers", "2", "--redis", redis_server.url, "--port", str(port),
                         "--admin-port", "-1", "--db", str(tmp_path / "db")], timeout=60)
        finally:
            kill_leftovers(strays(redis_server.url))
    line = _one_error(proc)
    assert line == f"cometd: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert proc.returncode == 1
    assert "cometd: listening on" not in proc.stdout
    assert not strays(redis_server.url)


def test_workers_children_get_the_whole_configuration(redis_server, tmp_path, monkeypatch):
    # Options from all three sources must reach the edges, not only the supervisor.
    toml = _written(tmp_path, '[http]\nmode = "pool"\n')
    monkeypatch.setenv("COMETD_KEEPALIVE", "0.3")
    sup = start_cometd(["--config", toml, "--workers", "1", "--redis", redis_server.url,
                        "--port", "0", "--admin-port", "-1", "--db", str(tmp_path / "db")],
                       r"^cometd: listening on http://([\d.]+):(\d+)/ .*workers=1", timeout=60)
    try:
        edge_line = next(line for line in sup.output if line.startswith("cometd edge "))
        assert " mode=pool " in edge_line, sup.output

        class Addr:
            host, port = sup.match.group(1), int(sup.match.group(2))

        with StreamClient.open(Addr, "/events/kid") as client:
            start = time.monotonic()
            while client.chunk(timeout=5) != b": keepalive\n\n":
                pass
            assert time.monotonic() - start < 3  # 0.3 s, not the default 25 s
    finally:
        sup.stop()
        kill_leftovers(strays(redis_server.url))


# -- secure by default: open only on loopback ------------------------------------------


def _refusal(host: str, source: str = "the command line") -> str:
    return (f"--host: {host} is not a loopback address and no authentication is configured: "
            f"set --jwt-secret, --jwt-key or --api-key, or give --insecure to serve it openly "
            f"(from {source})")


def _interface_address() -> str | None:
    """A non-loopback IPv4 address of this machine's own interfaces, if it has one."""
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True,
                             timeout=10).stdout
    except OSError:
        return None
    for line in out.splitlines():
        address = line.split()[3].split("/")[0]
        if not address.startswith("127."):
            return address
    return None


PUBLIC_HOSTS = [h for h in ("0.0.0.0", "::", _interface_address()) if h]


def test_open_serving_is_refused_off_loopback():
    redis = {"redis": "redis://h/0"}
    for host in PUBLIC_HOSTS:
        for role, extra in (("single", {}), ("supervisor", {"workers": "2", **redis}),
                            ("edge", redis)):
            with pytest.raises(ConfigError) as refused:
                load(role, {"host": host, **extra}, {})
            assert str(refused.value) == _refusal(host), (host, role)
            assert load(role, {"host": host, "insecure": True, **extra}, {}).http.insecure
    with pytest.raises(ConfigError) as refused:
        load("single", {}, {"COMETD_HOST": "0.0.0.0"})
    assert str(refused.value) == _refusal("0.0.0.0", "COMETD_HOST")
    assert load("single", {}, {"COMETD_HOST": "::", "COMETD_INSECURE": "yes"}).http.insecure
    for host in ("127.0.0.1", "127.8.9.10", "::1", "localhost"):
        assert not load("single", {"host": host}, {}).open_to_network
    # The router has no HTTP listener; `cometd config` only checks values.
    assert load("router", {"host": "0.0.0.0", **redis}, {}).open_to_network
    assert load(None, {"host": "0.0.0.0"}, {}).http.host == "0.0.0.0"
    # A supervisor's children inherit the --insecure that let it start.
    child = load("edge", {}, {CHILD_ENV: to_json(load("supervisor", {
        "host": "0.0.0.0", "insecure": True, "workers": "2", **redis}, {}))})
    assert child.http.insecure and child.open_to_network


@pytest.mark.parametrize("host", PUBLIC_HOSTS)
def test_a_public_address_without_auth_does_not_start(tmp_path, host):
    db = tmp_path / "db"
    proc = _run(["--host", host, "--port", "0", "--admin-port", "-1", "--db", str(db)])
    assert proc.returncode == 2
    assert proc.stderr == f"cometd: error: {_refusal(host)}\n"
    assert not db.exists()  # changed nothing


def test_workers_on_a_public_address_without_auth_do_not_start(redis_server, tmp_path):
    try:
        proc = _run(["--workers", "2", "--redis", redis_server.url, "--host", "0.0.0.0",
                     "--port", "0", "--admin-port", "-1", "--db", str(tmp_path / "db")])
    finally:
        leftovers = strays(redis_server.url)
        kill_leftovers(leftovers)
    assert proc.returncode == 2
    assert proc.stderr == f"cometd: error: {_refusal('0.0.0.0')}\n"
    assert not leftovers and not (tmp_path / "db").exists()


def test_insecure_serves_openly_and_says_so(tmp_path):
    # 0.0.0.0 inside a network namespace of its own: a wildcard listener that
    # nothing outside this test can reach.
    if os.geteuid() != 0:
        pytest.skip("a network namespace needs root")
    in_netns = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
    srv = start_cometd(["--host", "0.0.0.0", "--insecure", "--port", "0", "--admin-port", "-1",
                        "--db", str(tmp_path / "db")], r"listening on http://0\.0\.0\.0:(\d+)/",
                       prefix=in_netns)
    try:
        port = srv.match.group(1)
        assert [line for line in srv.output if "warning" in line] == [
            f"cometd: warning: --insecure: http://0.0.0.0:{port}/ serves with no "
            "authentication; anyone who can reach it reads every stream and publishes as "
            "anyone\n"], srv.output
        client = (f"import socket; s = socket.create_connection(('127.0.0.1', {port}), "
                  "timeout=5); s.sendall(b'GET /test/open HTTP/1.0\\r\\n\\r\\n'); "
                  "print(s.recv(4096))")
        got = subprocess.run(["nsenter", "-t", str(srv.pid), "-n", sys.executable, "-c", client],
                             capture_output=True, text=True, timeout=30)
        assert "Welcome, Url: '/test/open' Id: open" in got.stdout, got
    finally:
        srv.stop()


def test_workers_with_insecure_serve_an_interface_address_and_each_edge_says_so(tmp_path):
    # A namespace of its own with a veth pair: a real non-loopback interface
    # address that nothing outside this test can reach, and its own Redis.
    if os.geteuid() != 0:
        pytest.skip("a network namespace needs root")
    ns, address = f"cometd-insecure-{os.getpid() % 100000}", "10.232.0.1"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, timeout=10)
    in_ns = ["ip", "netns", "exec", ns]
    redis = sup = None
    try:
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
                    ["ip", "addr", "add", f"{address}/24", "dev", "v0"],
                    ["ip", "link", "set", "v1", "up"], ["ip", "link", "set", "v0", "up"]):
            subprocess.run([*in_ns, *cmd], check=True, capture_output=True, timeout=10)
        port = free_port()
        redis = subprocess.Popen([*in_ns, "redis-server", "--port", str(port), "--bind",
                                  "127.0.0.1", "--save", "", "--appendonly", "no", "--dir",
                                  str(tmp_path)], stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        ping = [*in_ns, "redis-cli", "-p", str(port), "ping"]
        deadline = time.monotonic() + 10
        while subprocess.run(ping, capture_output=True, text=True).stdout.strip() != "PONG":
            assert time.monotonic() < deadline, "redis did not start"
            time.sleep(0.05)
        sup = start_cometd(["--workers", "2", "--redis", url, "--host", address, "--insecure",
                            "--port", "0", "--admin-port", "-1", "--db", str(tmp_path / "db")],
                           rf"^cometd: listening on http://{address}:(\d+)/ .*workers=2",
                           timeout=60, prefix=in_ns)
        http_port = sup.match.group(1)
        assert [line for line in sup.output if "warning" in line] == [
            f"cometd edge: warning: --insecure: http://{address}:{http_port}/ serves with no "
            "authentication; anyone who can reach it reads every stream and publishes as "
            "anyone\n"] * 2, sup.output
        client = (f"import socket; s = socket.create_connection(('{address}', {http_port}), "
                  "timeout=5); s.sendall(b'GET /test/open HTTP/1.0\\r\\n\\r\\n'); "
                  "print(s.recv(4096))")
        got = subprocess.run([*in_ns, sys.executable, "-c", client], capture_output=True,
                             text=True, timeout=30)
        assert "Welcome, Url: '/test/open' Id: open" in got.stdout, got
    finally:
        if sup is not None:
            sup.stop()
        if redis is not None:
            redis.kill()
            redis.wait(10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.mark.parametrize("auth", [["--jwt-secret", "s" * 32], ["--api-key", "publisher-key"]])
def test_with_auth_a_public_address_serves_without_insecure_or_warning(tmp_path, auth):
    if os.geteuid() != 0:
        pytest.skip("a network namespace needs root")
    in_netns = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
    srv = start_cometd(["--host", "0.0.0.0", *auth, "--port", "0", "--admin-port", "-1",
                        "--db", str(tmp_path / "db")], r"listening on http://0\.0\.0\.0:(\d+)/",
                       prefix=in_netns)
    try:
        assert not [line for line in srv.output if "warning" in line], srv.output
    finally:
        srv.stop()
