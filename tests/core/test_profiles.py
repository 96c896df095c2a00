"""Provider profiles: the built-in files, user profiles, strict loading, detection."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hivemind_trio.config import ConfigError
from hivemind_trio.core.errors import FORMATS
from hivemind_trio.profiles import (
    LimitsSpec,
    Profile,
    RateLimitSpec,
    RetrySpec,
    builtin_profiles_dir,
    detect_by_shape,
    load_profiles,
    profile_for_host,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def profiles() -> dict[str, Profile]:
    return load_profiles()


# --- the built-in profiles -------------------------------------------------------------


def test_builtins_come_from_the_top_level_directory(profiles: dict[str, Profile]) -> None:
    assert builtin_profiles_dir() == REPO / "profiles"
    assert set(profiles) == {"anthropic", "openai", "ollama", "vllm", "generic"}
    for name, profile in profiles.items():
        assert profile.name == name
        assert profile.error_format in FORMATS


def test_anthropic_profile(profiles: dict[str, Profile]) -> None:
    p = profiles["anthropic"]
    assert p.default_upstream == "https://api.anthropic.com"
    assert p.error_format == "anthropic"
    assert p.usage.format == "anthropic"
    rl = p.ratelimit
    assert rl.limit == "anthropic-ratelimit-{resource}-limit"
    assert rl.remaining == "anthropic-ratelimit-{resource}-remaining"
    assert rl.reset == "anthropic-ratelimit-{resource}-reset"
    assert rl.resources == ("requests", "tokens", "input-tokens", "output-tokens")
    assert rl.reset_format == "rfc3339"
    assert rl.retry_after == ("retry-after-ms", "retry-after")
    assert rl.header("remaining", "input-tokens") == "anthropic-ratelimit-input-tokens-remaining"
    assert 529 in p.retry.statuses and 529 in p.retry.overload_statuses
    assert (p.limits.window_min, p.limits.window_initial, p.limits.window_max) == (1, 8, 64)


def test_openai_profile(profiles: dict[str, Profile]) -> None:
    p = profiles["openai"]
    assert p.default_upstream == "https://api.openai.com"
    assert p.error_format == "openai"
    assert p.ratelimit.header("reset", "tokens") == "x-ratelimit-reset-tokens"
    assert p.ratelimit.header("limit", "requests") == "x-ratelimit-limit-requests"
    assert p.ratelimit.reset_format == "duration"
    assert p.ratelimit.resources == ("requests", "tokens")
    assert p.retry.statuses == (408, 429, 500, 502, 503, 504)


def test_local_profiles(profiles: dict[str, Profile]) -> None:
    ollama, vllm, generic = profiles["ollama"], profiles["vllm"], profiles["generic"]
    assert ollama.default_upstream == "http://127.0.0.1:11434"
    assert (ollama.error_format, ollama.usage.format) == ("ollama", "ollama")
    assert (ollama.limits.window_min, ollama.limits.window_initial, ollama.limits.window_max) == (1, 4, 32)
    assert ollama.ratelimit.resources == () and vllm.ratelimit.resources == ()
    assert (vllm.error_format, vllm.usage.format, vllm.default_upstream) == ("openai", "vllm", "")
    assert generic.default_upstream == ""


@pytest.mark.parametrize(
    ("body", "quota"),
    [
        (b'{"error":{"type":"insufficient_quota","code":"insufficient_quota"}}', True),
        (b'{"error":{"code":"credit_balance_exhausted"}}', True),
        (b'{"error":{"message":"Request too large for gpt-4o in organization org-x on tokens per min"}}', True),
        (b'{"error":{"code":"rate_limit_exceeded","message":"Rate limit reached"}}', False),
        (b"", False),
        (b"\xff\xfe not utf-8", False),
    ],
)
def test_quota_markers(profiles: dict[str, Profile], body: bytes, quota: bool) -> None:
    assert profiles["openai"].retry.is_quota(body) is quota
    assert profiles["openai"].retry.is_quota(body.decode("latin-1")) is quota


# --- detection by upstream host --------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("api.anthropic.com", "anthropic"),
        ("API.Anthropic.COM", "anthropic"),
        ("api.anthropic.com:443", "anthropic"),
        ("https://api.anthropic.com/v1", "anthropic"),
        ("api.openai.com", "openai"),
        ("myres.openai.azure.com", "openai"),
        ("openai.azure.com", "openai"),
        ("evilopenai.azure.com", "generic"),
        ("localhost:11434", "ollama"),
        ("127.0.0.1:11434", "ollama"),
        ("[::1]:11434", "ollama"),
        ("http://gpu-box:11434", "ollama"),
        ("ollama.com", "ollama"),
        ("127.0.0.1", "generic"),
        ("localhost:8000", "generic"),
        ("example.com", "generic"),
        ("", "generic"),
    ],
)
def test_profile_for_host(profiles: dict[str, Profile], host: str, name: str) -> None:
    assert profile_for_host(host, profiles).name == name


def test_profile_for_host_without_a_generic_profile() -> None:
    assert profile_for_host("example.com", {}).name == "generic"


# --- detection by request shape (SPEC §2.5) ---------------------------------------------


BEARER = {"authorization": "Bearer sk-test"}


@pytest.mark.parametrize(
    ("method", "path", "headers", "name"),
    [
        ("POST", "/v1/messages", {"x-api-key": "k", "anthropic-version": "2023-06-01"}, "anthropic"),
        ("POST", "/v1/messages?beta=true", {}, "anthropic"),
        ("POST", "/v1/messages/count_tokens", {}, "anthropic"),
        # anthropic-python 2.x: Bearer key plus anthropic-version.
        ("POST", "/v1/messages", {"Authorization": "Bearer k", "Anthropic-Version": "2025-01-01"}, "anthropic"),
        ("GET", "/v1/models", {"anthropic-version": "2023-06-01", **BEARER}, "anthropic"),
        ("GET", "/v1/models", {"x-api-key": "k"}, "anthropic"),
        ("HEAD", "/", {"x-api-key": "k"}, "anthropic"),
        ("GET", "/", {"anthropic-version": "2023-06-01"}, "anthropic"),
        ("POST", "/v1/chat/completions", BEARER, "openai"),
        ("POST", "/v1/chat/completions", {}, "openai"),
        ("POST", "/v1/responses", BEARER, "openai"),
        ("GET", "/v1/responses", {**BEARER, "upgrade": "websocket"}, "openai"),
        ("POST", "/v1/embeddings", BEARER, "openai"),
        ("GET", "/v1/models", BEARER, "openai"),
        ("GET", "/v1/models", {"authorization": "bearer sk"}, "openai"),
        ("GET", "/v1/models/gpt-4o", BEARER, "openai"),
        ("POST", "/api/chat", {}, "ollama"),
        ("POST", "/api/generate", {}, "ollama"),
        ("GET", "/api/tags", {}, "ollama"),
        ("GET", "/api", {}, "ollama"),
    ],
)
def test_detect_by_shape(profiles: dict[str, Profile], method: str, path: str, headers: dict[str, str], name: str) -> None:
    found = detect_by_shape(method, path, headers, profiles)
    assert found is not None and found.name == name
    # ASGI-style byte pairs work the same.
    pairs = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    found = detect_by_shape(method, path, pairs, profiles)
    assert found is not None and found.name == name


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/", {}),
        ("HEAD", "/", {}),
        ("GET", "/v1/models", {}),
        ("GET", "/v1/models", {"authorization": "Basic abc"}),
        ("POST", "/v1/messagesx", {}),
        ("POST", "/apix/chat", {}),
        ("GET", "/favicon.ico", BEARER),
        ("POST", "/v2/whatever", {"user-agent": "curl/8"}),
    ],
)
def test_detect_by_shape_unknown(profiles: dict[str, Profile], method: str, path: str, headers: dict[str, str]) -> None:
    assert detect_by_shape(method, path, headers, profiles) is None


@given(path=st.text(alphabet="/abcdefghijklmnopqrstuvwxyz0123456789.-_?=", max_size=30))
def test_anthropic_headers_win_on_any_path(path: str) -> None:
    profiles = load_profiles()
    found = detect_by_shape("GET", "/" + path, {"anthropic-version": "2023-06-01", **BEARER}, profiles)
    assert found is not None and found.name == "anthropic"


# --- user profiles ---------------------------------------------------------------------


def test_user_dir_adds_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "corp.toml").write_text(
        """
        name = "corp-gateway"
        hosts = ["llm.corp.example", ".gw.corp.example"]
        default_upstream = "https://llm.corp.example"
        error_format = "openai"
        [detect]
        order = 5
        paths = ["/corp/"]
        [limits]
        window_max = 8
        """
    )
    # Replaces the built-in ollama profile (name from the file stem).
    (tmp_path / "ollama.toml").write_text('hosts = ["ollama.internal"]\nerror_format = "ollama"\n')
    (tmp_path / "README.md").write_text("not a profile")
    profiles = load_profiles(str(tmp_path))
    corp = profiles["corp-gateway"]
    assert corp.limits == LimitsSpec(window_max=8)
    assert corp.ratelimit == RateLimitSpec()
    assert profile_for_host("a.gw.corp.example", profiles) is corp
    assert detect_by_shape("POST", "/corp/x", {}, profiles) is corp
    assert profiles["ollama"].hosts == ("ollama.internal",)
    assert profile_for_host("localhost:11434", profiles).name == "generic"
    assert profiles["anthropic"] == load_profiles()["anthropic"]


def test_user_profile_extends_a_builtin(tmp_path: Path) -> None:
    (tmp_path / "azure.toml").write_text(
        """
        extends = "openai"
        hosts = ["my.azure.example"]
        [limits]
        rpm = 600
        [retry]
        quota_markers = ["budget exceeded"]
        """
    )
    profiles = load_profiles(str(tmp_path))
    azure, openai = profiles["azure"], profiles["openai"]
    assert azure.ratelimit == openai.ratelimit
    assert azure.limits.rpm == 600 and azure.limits.window_max == openai.limits.window_max
    assert azure.retry.quota_markers == ("budget exceeded",)
    assert azure.retry.statuses == openai.retry.statuses
    assert profile_for_host("my.azure.example", profiles) is azure


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[limits\n", "invalid TOML"),
        ('error_format = "xml"', 'error_format: must be one of anthropic, openai, ollama, plain; got "xml"'),
        ("[limits]\nwindow_min = 0", "limits.window_min: must be at least 1, got 0"),
        ("[limits]\nwindow_max = 2.5", "limits.window_max: expected an integer, got 2.5"),
        ("[limits]\nwindow_initial = 100", "limits.window_initial: must lie between window_min and window_max"),
        ('[ratelimit]\nreset_format = "unix"', 'ratelimit.reset_format: must be one of rfc3339, duration, seconds, epoch; got "unix"'),
        ('[ratelimit]\nresources = ["requests"]\nlimit = "x-limit"', 'ratelimit.limit: must contain {resource} when resources are listed, got "x-limit"'),
        ("[retry]\nstatuses = [429, 999]", "retry.statuses[1]: must be an HTTP status (100-599), got 999"),
        ('[retry]\nstatuses = ["429"]', 'retry.statuses[0]: expected an integer, got "429"'),
        ('[retry]\nquota_markers = "insufficient_quota"', 'retry.quota_markers: expected an array, got "insufficient_quota"'),
        ('[detect]\npaths = ["api/"]', 'detect.paths[0]: must start with "/", got "api/"'),
        ('[detect]\nbearer = true', "detect.bearer: unknown key"),
        ('[usage]\nformat = "gemini"', 'usage.format: must be one of anthropic, openai, ollama, vllm; got "gemini"'),
        ('default_upstream = "localhost:11434"', 'default_upstream: URL scheme must be http or https, got "localhost:11434"'),
        ('hosts = ["http://x/"]', "hosts[0]: must be a host name"),
        ("colour = 1", "colour: unknown key"),
        ('name = "bad name"', 'name: must be letters, digits'),
        ('extends = "nope"', 'extends: unknown profile "nope"'),
    ],
)
def test_malformed_user_profile_names_file_key_and_value(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_profiles(str(tmp_path))
    message = str(info.value)
    assert expected in message
    assert str(path) in message


def test_duplicate_profile_names_in_one_dir(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('name = "same"')
    (tmp_path / "b.toml").write_text('name = "same"')
    with pytest.raises(ConfigError, match=r'profile "same" defined twice.*a\.toml.*b\.toml'):
        load_profiles(str(tmp_path))


def test_missing_profiles_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        load_profiles(str(tmp_path / "nope"))


def test_specs_are_frozen_values() -> None:
    spec = RetrySpec()
    with pytest.raises(AttributeError):
        spec.statuses = ()  # type: ignore[misc]
    assert Profile(name="x") == Profile(name="x")
