"""Config loading: precedence, strictness, messages that name key, value and source."""

from __future__ import annotations

import math
from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hivemind_trio.config import (
    AgentRule,
    Config,
    ConfigError,
    Route,
    SchedulerConfig,
    ServerConfig,
    config_to_dict,
    load_config,
    structure_strict,
)


def write(tmp_path: Path, text: str, name: str = "hivemind.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(*args: object, **kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)  # type: ignore[arg-type]
    return info.value


# --- defaults and precedence ------------------------------------------------


def test_defaults_without_any_source() -> None:
    assert load_config(env={}) == Config()
    assert load_config(env={}).server.port == 8765
    assert load_config(env={}).server.host == "127.0.0.1"


def test_file_env_overrides_precedence(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        upstream = "https://file.example"
        [server]
        port = 1000
        host = "0.0.0.0"
        stall_timeout = 5
        log_level = "debug"
        """,
    )
    cfg = load_config(path, env={})
    assert (cfg.server.port, cfg.server.host, cfg.upstream) == (1000, "0.0.0.0", "https://file.example")
    # Integers are fine where a float is expected, and become floats.
    assert cfg.server.stall_timeout == 5.0 and type(cfg.server.stall_timeout) is float

    env = {"HIVEMIND_PORT": "2000", "HIVEMIND_UPSTREAM": "https://env.example"}
    cfg = load_config(path, env=env)
    assert (cfg.server.port, cfg.server.host, cfg.upstream) == (2000, "0.0.0.0", "https://env.example")
    assert cfg.server.log_level == "debug"

    cfg = load_config(path, env=env, overrides={"server.port": 3000, "server.host": None})
    assert (cfg.server.port, cfg.server.host, cfg.upstream) == (3000, "0.0.0.0", "https://env.example")
    cfg = load_config(path, env=env, overrides={"upstream": "http://flag.example:9"})
    assert cfg.upstream == "http://flag.example:9"


def test_config_file_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 4321\n")
    assert load_config(env={"HIVEMIND_CONFIG": path}).server.port == 4321
    # An explicit path wins over HIVEMIND_CONFIG.
    other = write(tmp_path, "[server]\nport = 1234\n", "other.toml")
    assert load_config(other, env={"HIVEMIND_CONFIG": path}).server.port == 1234


def test_env_none_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("HIVEMIND_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HIVEMIND_PORT", "5555")
    assert load_config().server.port == 5555


def test_routes_and_sections(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        state = "redis://localhost:6379/0"
        [scheduler]
        queue_timeout = 30
        aimd = false
        [budget]
        agent_tokens = 1_000_000
        period = "hour"
        [[routes]]
        name = "claude"
        url = "https://api.anthropic.com"
        prefix = "/claude"
        profile = "anthropic"
        [[routes]]
        name = "local"
        url = "http://127.0.0.1:11434"
        prefix = "/ollama"
        strip_prefix = false
        rpm = 60
        [[agents]]
        match = "batch-*"
        priority = "low"
        """,
    )
    cfg = load_config(path, env={})
    assert cfg.routes == (
        Route(name="claude", url="https://api.anthropic.com", prefix="/claude", profile="anthropic"),
        Route(name="local", url="http://127.0.0.1:11434", prefix="/ollama", strip_prefix=False, rpm=60),
    )
    assert cfg.scheduler == SchedulerConfig(queue_timeout=30.0, aimd=False)
    assert cfg.budget.agent_tokens == 1_000_000 and cfg.budget.period == "hour"
    assert cfg.agents == (AgentRule(priority="low", match="batch-*"),)
    assert cfg.agents[0].matches("batch-7", "curl/8")
    assert not cfg.agents[0].matches("reviewer", "curl/8")
    assert cfg.state == "redis://localhost:6379/0"


# --- strict types in the file -----------------------------------------------


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[server]\nport = 2.7", "server.port: expected an integer, got 2.7"),
        ('[server]\nport = "8765"', 'server.port: expected an integer, got "8765"'),
        ("[server]\nport = true", "server.port: expected an integer, got true"),
        ('[server]\ninfo_headers = "false"', 'server.info_headers: expected true or false, got "false"'),
        ("[server]\ninfo_headers = 0", "server.info_headers: expected true or false, got 0"),
        ('[server]\nstall_timeout = "60"', 'server.stall_timeout: expected a number, got "60"'),
        ("[server]\nstall_timeout = false", "server.stall_timeout: expected a number, got false"),
        ("[server]\nhost = 127", "server.host: expected a string, got 127"),
        ("upstream = 5", "upstream: expected a string, got 5"),
        ("server = 5", "server: expected a table, got 5"),
        ('routes = "x"', 'routes: expected an array, got "x"'),
        ('[[routes]]\nname = "a"', "routes[0].url: required key missing"),
        ('[[routes]]\nname = "a"\nurl = "http://a"\nstrip_prefix = "yes"', 'routes[0].strip_prefix: expected true or false, got "yes"'),
    ],
)
def test_wrong_types_in_file(tmp_path: Path, toml: str, expected: str) -> None:
    path = write(tmp_path, toml)
    err = error_of(path, env={})
    assert err.problems == (f"{expected} (in {path})",)
    assert expected in str(err)


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[server]\nport = 70000", "server.port: must be between 0 and 65535, got 70000"),
        ("[server]\nport = -1", "server.port: must be between 0 and 65535, got -1"),
        ("[server]\nstall_timeout = -0.5", "server.stall_timeout: must be at least 0, got -0.5"),
        ("[server]\nconnect_timeout = nan", "server.connect_timeout: must be at least 0, got nan"),
        ("[server]\nupstream_read_timeout = -1", "server.upstream_read_timeout: must be at least 0, got -1.0"),
        ("[server]\nmax_body_bytes = 0", "server.max_body_bytes: must be at least 1, got 0"),
        ('[server]\nlog_level = "loud"', 'server.log_level: must be one of critical, error, warning, info, debug; got "loud"'),
        ('upstream = "ftp://example.com"', 'upstream: URL scheme must be http or https, got "ftp://example.com"'),
        ('upstream = "example.com"', 'upstream: URL scheme must be http or https, got "example.com"'),
        ('upstream = "http://"', 'upstream: URL must name a host, got "http://"'),
        ('upstream = "http://h:99999"', "upstream: not a valid URL"),
        ('[[routes]]\nname = "a"\nurl = "ws://x"', 'routes[0].url: URL scheme must be http or https, got "ws://x"'),
        ('[[routes]]\nname = "a"\nurl = "http://x"\nprefix = "v1"', 'routes[0].prefix: must start with "/", got "v1"'),
        ('[[routes]]\nname = ""\nurl = "http://x"', 'routes[0].name: must not be empty, got ""'),
        (
            '[[routes]]\nname = "a"\nurl = "http://x"\n[[routes]]\nname = "a"\nurl = "http://y"\nprefix = "/y"',
            'routes[1].name: duplicate route name "a"',
        ),
        ('[scheduler]\nretry_budget = 1.5', "scheduler.retry_budget: must be between 0 and 1, got 1.5"),
        ('[[agents]]\npriority = "urgent"', 'agents[0].priority: must be one of critical, high, normal, low; got "urgent"'),
        # SPEC §7.5: the shared state URL is checked as strictly as the rest.
        ('state = "postgres://x"', 'state: must be "" or a redis://, rediss:// or unix:// URL, got "postgres://x"'),
        ('state = "redis://"', 'state: URL must name a host, got "redis://"'),
        ('state = "redis://h:99999/0"', "state: not a valid URL"),
        ('state = "redis://h/zero"', "state: database must be a number 0-65535, got 'zero'"),
        ('state = "redis://h/0?lease=3"', "state: unknown query parameter 'lease'"),
        ('state = "redis://h/0?lease_ttl=0"', "state: lease_ttl must be between 1 and 3600, got '0'"),
        ('state = "redis://h/0?timeout=soon"', "state: timeout must be a number, got 'soon'"),
        ('state = "unix://"', "state: a unix:// URL must name a socket path"),
        # A password in a bad URL is never echoed.
        ('state = "redis://:hunter2@h/x"', 'state: database must be a number 0-65535, got \'x\', got "redis://:***@h/x"'),
    ],
)
def test_out_of_range_values(tmp_path: Path, toml: str, expected: str) -> None:
    path = write(tmp_path, toml)
    err = error_of(path, env={})
    assert len(err.problems) == 1
    assert err.problems[0].startswith(expected)
    assert err.problems[0].endswith(f"(in {path})")


def test_unknown_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "color = 1\n[server]\nprot = 1\n[[routes]]\nname='a'\nurl='http://a'\nweight=2\n")
    problems = error_of(path, env={}).problems
    assert problems == (
        f"server.prot: unknown key (did you mean 'port'?) (in {path})",
        f"routes[0].weight: unknown key; known keys: name, url, prefix, strip_prefix, profile, rpm, tpm (in {path})",
        f"color: unknown key; known keys: server, upstream, routes, state, scheduler, budget, agents (in {path})",
    )


def test_every_problem_is_reported_once_per_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        upstream = "ftp://x"
        [server]
        port = 2.7
        info_headers = "false"
        log_level = "loud"
        max_body_bytes = 0
        """,
    )
    err = error_of(path, env={})
    keys = sorted(p.split(":")[0] for p in err.problems)
    assert keys == ["server.info_headers", "server.log_level", "server.max_body_bytes", "server.port", "upstream"]
    assert str(err).count("\n") == len(err.problems) - 1


def test_missing_and_malformed_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    err = error_of(missing, env={})
    assert missing in str(err) and "not found" in str(err)
    bad = write(tmp_path, "[server\nport = 1\n")
    err = error_of(bad, env={})
    assert bad in str(err) and "invalid TOML" in str(err) and "line 1" in str(err)
    err = error_of(env={"HIVEMIND_CONFIG": missing})
    assert missing in str(err)


# --- environment --------------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "text", "key", "value"),
    [
        ("HIVEMIND_UPSTREAM", "https://api.openai.com", "upstream", "https://api.openai.com"),
        ("HIVEMIND_HOST", "0.0.0.0", "server.host", "0.0.0.0"),
        ("HIVEMIND_PORT", "9000", "server.port", 9000),
        ("HIVEMIND_PORT", " 9000 ", "server.port", 9000),
        ("HIVEMIND_MAX_BODY_BYTES", "1_000", "server.max_body_bytes", 1000),
        ("HIVEMIND_STALL_TIMEOUT", "2.5", "server.stall_timeout", 2.5),
        ("HIVEMIND_CONNECT_TIMEOUT", "3", "server.connect_timeout", 3.0),
        ("HIVEMIND_UPSTREAM_READ_TIMEOUT", "0", "server.upstream_read_timeout", 0.0),
        ("HIVEMIND_INFO_HEADERS", "no", "server.info_headers", False),
        ("HIVEMIND_INFO_HEADERS", "FALSE", "server.info_headers", False),
        ("HIVEMIND_INFO_HEADERS", "0", "server.info_headers", False),
        ("HIVEMIND_LOG_JSON", "Yes", "server.log_json", True),
        ("HIVEMIND_LOG_JSON", "1", "server.log_json", True),
        ("HIVEMIND_LOG_JSON", "true", "server.log_json", True),
        ("HIVEMIND_ADMIN_TOKEN", "s3cret", "server.admin_token", "s3cret"),
        ("HIVEMIND_LOG_LEVEL", "debug", "server.log_level", "debug"),
        ("HIVEMIND_PROFILES_DIR", "/etc/hm", "server.profiles_dir", "/etc/hm"),
        ("HIVEMIND_SHUTDOWN_GRACE", "1", "server.shutdown_grace", 1.0),
        ("HIVEMIND_STATE", "redis://r:6379", "state", "redis://r:6379"),
        ("HIVEMIND_SCHEDULER_QUEUE_TIMEOUT", "12", "scheduler.queue_timeout", 12.0),
        ("HIVEMIND_SCHEDULER_RETRY", "off", "scheduler.retry", False),
        ("HIVEMIND_BUDGET_AGENT_TOKENS", "500", "budget.agent_tokens", 500),
    ],
)
def test_env_vars(var: str, text: str, key: str, value: object) -> None:
    cfg = load_config(env={var: text})
    obj: object = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    assert obj == value and type(obj) is type(value)


def test_every_server_field_has_an_env_var() -> None:
    samples = {int: "7", float: "7.5", bool: "true", str: "debug"}
    for field in attrs.fields(ServerConfig):
        var = "HIVEMIND_" + field.name.upper()
        text = samples[field.type if isinstance(field.type, type) else eval(field.type)]  # noqa: S307
        load_config(env={var: text})  # must not be refused as unknown


@pytest.mark.parametrize(
    ("var", "text", "expected"),
    [
        ("HIVEMIND_PORT", "abc", 'server.port: expected an integer, got "abc" (from HIVEMIND_PORT)'),
        ("HIVEMIND_PORT", "80.5", 'server.port: expected an integer, got "80.5" (from HIVEMIND_PORT)'),
        ("HIVEMIND_PORT", "", 'server.port: expected an integer, got "" (from HIVEMIND_PORT)'),
        ("HIVEMIND_PORT", "70000", "server.port: must be between 0 and 65535, got 70000 (from HIVEMIND_PORT)"),
        ("HIVEMIND_INFO_HEADERS", "maybe", 'server.info_headers: expected true/false/1/0/yes/no, got "maybe" (from HIVEMIND_INFO_HEADERS)'),
        ("HIVEMIND_STALL_TIMEOUT", "soon", 'server.stall_timeout: expected a number, got "soon" (from HIVEMIND_STALL_TIMEOUT)'),
        ("HIVEMIND_STALL_TIMEOUT", "inf", 'server.stall_timeout: expected a finite number, got "inf" (from HIVEMIND_STALL_TIMEOUT)'),
        ("HIVEMIND_STALL_TIMEOUT", "-1", "server.stall_timeout: must be at least 0, got -1.0 (from HIVEMIND_STALL_TIMEOUT)"),
        ("HIVEMIND_LOG_LEVEL", "LOUD", 'server.log_level: must be one of critical, error, warning, info, debug; got "LOUD" (from HIVEMIND_LOG_LEVEL)'),
        ("HIVEMIND_UPSTREAM", "api.openai.com", 'upstream: URL scheme must be http or https, got "api.openai.com" (from HIVEMIND_UPSTREAM)'),
    ],
)
def test_bad_env_values(var: str, text: str, expected: str) -> None:
    assert error_of(env={var: text}).problems == (expected,)


def test_unknown_env_var_is_refused_with_a_hint() -> None:
    err = error_of(env={"HIVEMIND_PROT": "1"})
    assert err.problems == ("HIVEMIND_PROT: unknown HIVEMIND_* environment variable (did you mean HIVEMIND_PORT?)",)
    err = error_of(env={"HIVEMIND_ZZZZZZ": "1"})
    assert "HIVEMIND_ZZZZZZ" in str(err)


def test_test_and_bench_env_vars_are_ignored() -> None:
    env = {"HIVEMIND_TEST_UPSTREAM": "x", "HIVEMIND_BENCH_SCALE": "y", "OTHER": "z", "HIVEMIND_CONFIG": ""}
    assert load_config(env=env) == Config()


def test_env_and_file_problems_are_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 2.7\n")
    err = error_of(path, env={"HIVEMIND_PROT": "1", "HIVEMIND_STALL_TIMEOUT": "x"})
    assert len(err.problems) == 3


def test_env_value_over_a_wrong_typed_section_still_reports_it(tmp_path: Path) -> None:
    path = write(tmp_path, "server = 5\n")
    assert error_of(path, env={"HIVEMIND_PORT": "1"}).problems == (f"server: expected a table, got 5 (in {path})",)


# --- overrides (command-line flags) -----------------------------------------------


def test_overrides_strings_are_parsed_and_checked() -> None:
    assert load_config(env={}, overrides={"server.port": "9001"}).server.port == 9001
    assert load_config(env={}, overrides={"server.log_json": True}).server.log_json is True
    err = error_of(env={}, overrides={"server.port": "x"})
    assert err.problems == ('server.port: expected an integer, got "x" (from the command line)',)
    err = error_of(env={}, overrides={"server.port": 2.5})
    assert err.problems == ("server.port: expected an integer, got 2.5 (from the command line)",)
    err = error_of(env={}, overrides={"server.prot": 1})
    assert err.problems == ("server.prot: unknown setting (did you mean 'server.port'?)",)
    err = error_of(env={}, overrides={"routes": []})
    assert "routes: unknown setting" in str(err)


# --- the model on its own ------------------------------------------------------------


def test_model_validators_apply_to_code_built_configs() -> None:
    with pytest.raises(ConfigError, match=r"port: must be between 0 and 65535, got 65536"):
        ServerConfig(port=65536)
    with pytest.raises(ConfigError, match=r"url: URL scheme must be http or https"):
        Route(name="x", url="file:///etc/passwd")
    Route(name="x", url="http://[::1]:8080")


def test_structure_strict_is_reusable() -> None:
    assert structure_strict({"name": "a", "url": "http://a"}, Route) == Route(name="a", url="http://a")
    with pytest.raises(ConfigError) as info:
        structure_strict({"name": "a", "url": 1}, Route, origin="in x.toml")
    assert info.value.problems == ("url: expected a string, got 1 (in x.toml)",)


# --- output --------------------------------------------------------------------------


def test_config_to_dict_masks_secrets() -> None:
    cfg = load_config(
        env={
            "HIVEMIND_ADMIN_TOKEN": "top-secret-token",
            "HIVEMIND_STATE": "redis://user:hunter2@redis:6379/0",
            "HIVEMIND_UPSTREAM": "https://u:pw@api.example.com",
        }
    )
    data = config_to_dict(cfg)
    text = repr(data)
    assert "top-secret-token" not in text and "hunter2" not in text and ":pw@" not in text
    assert data["server"]["admin_token"] == "***"
    assert data["state"] == "redis://user:***@redis:6379/0"
    assert data["server"]["port"] == 8765
    assert "top-secret-token" not in repr(cfg)
    # Without a token there is nothing to mask.
    assert config_to_dict(Config())["server"]["admin_token"] == ""
    # Round-trips: the unmasked parts structure back into the same config.
    assert structure_strict(config_to_dict(Config()), Config) == Config()


# --- property: no coercion, ever -------------------------------------------------------

_INT_KEYS = [f.name for f in attrs.fields(ServerConfig) if f.type in (int, "int")]
_FLOAT_KEYS = [f.name for f in attrs.fields(ServerConfig) if f.type in (float, "float")]
_BOOL_KEYS = [f.name for f in attrs.fields(ServerConfig) if f.type in (bool, "bool")]
_STR_KEYS = [f.name for f in attrs.fields(ServerConfig) if f.type in (str, "str")]

_non_int = st.one_of(
    st.booleans(),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@given(key=st.sampled_from(_INT_KEYS), value=_non_int)
def test_int_fields_reject_every_non_int(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        structure_strict({"server": {key: value}}, Config)
    assert info.value.problems[0].startswith(f"server.{key}: expected an integer, got ")


@given(key=st.sampled_from(_FLOAT_KEYS), value=st.one_of(st.booleans(), st.text(max_size=5), st.none()))
def test_float_fields_reject_non_numbers(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^server\.{key}: expected a number, got "):
        structure_strict({"server": {key: value}}, Config)


@given(key=st.sampled_from(_BOOL_KEYS), value=st.one_of(st.integers(), st.text(max_size=5), st.floats()))
def test_bool_fields_reject_non_bools(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^server\.{key}: expected true or false, got "):
        structure_strict({"server": {key: value}}, Config)


@given(key=st.sampled_from(_STR_KEYS), value=st.one_of(st.integers(), st.booleans(), st.floats()))
def test_str_fields_reject_non_strings(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^server\.{key}: expected a string, got "):
        structure_strict({"server": {key: value}}, Config)


@given(port=st.integers())
def test_port_range(port: int) -> None:
    if 0 <= port <= 65535:
        assert structure_strict({"server": {"port": port}}, Config).server.port == port
    else:
        with pytest.raises(ConfigError, match=rf"server\.port: must be between 0 and 65535, got {port}"):
            structure_strict({"server": {"port": port}}, Config)


@given(text=st.text(max_size=8))
def test_env_int_parsing_matches_python_int(text: str) -> None:
    try:
        cfg = load_config(env={"HIVEMIND_MAX_CONNECTIONS": text})
    except ConfigError as exc:
        assert "server.max_connections" in str(exc)
    else:
        assert cfg.server.max_connections == int(text)
        assert not math.isnan(cfg.server.max_connections)
