"""Provider profiles: what the proxy knows about each kind of upstream, as data.

A profile is a TOML file (``profiles/anthropic.toml`` and friends) saying how
to recognise a provider (by upstream host, or by the shape of a request when
nothing is configured), how it reports rate limits, which failures are worth a
retry, where usage appears, how its errors look, and the scheduler's default
bounds.  Users add or replace a profile by dropping a TOML file into
``server.profiles_dir``; no code changes.  A file may start from another
profile with ``extends = "<name>"`` (tables merge key by key, other values
replace); ``name`` defaults to the file's stem.

Where the built-in files live: the canonical copies are the repository's
top-level ``profiles/`` directory.  pyproject.toml ships them as setuptools
``data-files`` into ``<prefix>/share/hivemind-trio/profiles`` (setuptools
cannot map a directory outside the package into it while packages are found
by ``packages.find``).  :func:`builtin_profiles_dir` therefore looks in the
source checkout first, then next to the installed package (``pip install
--target``), then where the installed distribution's RECORD says the files
went, then the usual prefixes.

Detection by request shape (zero-config, SPEC §2.5): profiles are tried in
``detect.order`` (lowest first).  A profile matches when the request carries
any of its ``detect.headers``, or its path starts with one of its
``detect.paths``, or it carries ``Authorization: Bearer`` and its path starts
with one of its ``detect.bearer_paths``.  Anthropic comes first and matches by
header on any path, so ``GET /v1/models`` with ``anthropic-version`` is
Anthropic's while the same path with only a Bearer key is OpenAI's.
"""

from __future__ import annotations

import importlib.metadata
import re
import site
import sys
import tomllib
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from .config import ConfigError, FieldError, _at_least, _between, _one_of, _show, _url_problem, structure_strict
from .core.errors import FORMATS

__all__ = [
    "RESET_FORMATS",
    "USAGE_FORMATS",
    "DetectSpec",
    "LimitsSpec",
    "Profile",
    "RateLimitSpec",
    "RetrySpec",
    "UsageSpec",
    "builtin_profiles_dir",
    "detect_by_shape",
    "load_profiles",
    "profile_for_host",
]

# How a rate-limit reset header is written:
#   rfc3339  - a timestamp, 2026-01-01T00:00:30Z (Anthropic)
#   duration - Go-style time until reset, 6m0s / 1s / 12ms (OpenAI)
#   seconds  - a number of seconds until reset
#   epoch    - a Unix timestamp in seconds
RESET_FORMATS = ("rfc3339", "duration", "seconds", "epoch")
# Where usage appears in a response (SPEC §6).
USAGE_FORMATS = ("anthropic", "openai", "ollama", "vllm")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


def _lower_all(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(v.lower() for v in values)


def _paths(inst: object, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    for i, p in enumerate(value):
        if not p.startswith("/"):
            raise FieldError(f"{attribute.name}[{i}]", f'must start with "/", got {_show(p)}')


def _statuses(inst: object, attribute: attrs.Attribute, value: tuple[int, ...]) -> None:
    for i, s in enumerate(value):
        if not 100 <= s <= 599:
            raise FieldError(f"{attribute.name}[{i}]", f"must be an HTTP status (100-599), got {_show(s)}")


def _hosts(inst: object, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    for i, h in enumerate(value):
        if not h or "/" in h or " " in h:
            raise FieldError(f"{attribute.name}[{i}]", f'must be a host name, ".suffix", "host:port" or ":port", got {_show(h)}')


@attrs.frozen
class DetectSpec:
    """Request-shape rules for zero-config routing (see the module docstring)."""

    # Lower is tried first.
    order: int = 100
    # Any of these request headers present -> this provider (names, any case).
    headers: tuple[str, ...] = attrs.field(default=(), converter=_lower_all)
    # Path prefixes that mean this provider whatever the credentials.
    paths: tuple[str, ...] = attrs.field(default=(), validator=_paths)
    # Path prefixes that mean this provider only with Authorization: Bearer.
    bearer_paths: tuple[str, ...] = attrs.field(default=(), validator=_paths)


@attrs.frozen
class RateLimitSpec:
    """Which response headers carry the provider's rate-limit state.

    ``limit`` / ``remaining`` / ``reset`` are header name templates with
    ``{resource}`` replaced by each of ``resources``; ``reset_format`` is one
    of :data:`RESET_FORMATS`.  ``retry_after`` lists the retry-delay headers
    in the order to trust them; a name ending in ``-ms`` holds milliseconds,
    any other seconds (or an HTTP date).
    """

    limit: str = ""
    remaining: str = ""
    reset: str = ""
    resources: tuple[str, ...] = attrs.field(default=())
    reset_format: str = attrs.field(default="seconds", validator=_one_of(*RESET_FORMATS))
    retry_after: tuple[str, ...] = attrs.field(default=("retry-after-ms", "retry-after"), converter=_lower_all)

    @resources.validator
    def _templates(self, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
        if not value:
            return
        for kind in ("limit", "remaining", "reset"):
            template = getattr(self, kind)
            if "{resource}" not in template:
                raise FieldError(kind, f"must contain {{resource}} when resources are listed, got {_show(template)}")

    def header(self, kind: str, resource: str) -> str:
        """The header name for ``kind`` ("limit", "remaining", "reset") of ``resource``."""
        return getattr(self, kind).replace("{resource}", resource).lower()


@attrs.frozen
class RetrySpec:
    """Which upstream answers are worth a transparent retry (SPEC §5.7)."""

    statuses: tuple[int, ...] = attrs.field(default=(408, 429, 500, 502, 503, 504), validator=_statuses)
    # Substrings that, found in a 429 body, mean "quota / too large": never retry.
    quota_markers: tuple[str, ...] = ()
    # Statuses that signal overload, for backpressure (AIMD decrease).
    overload_statuses: tuple[int, ...] = attrs.field(default=(429, 502, 503), validator=_statuses)

    def is_quota(self, body: bytes | str) -> bool:
        """True when a 429 body says the quota is spent (case-insensitive substring)."""
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        text = text.lower()
        return any(m.lower() in text for m in self.quota_markers)


@attrs.frozen
class UsageSpec:
    format: str = attrs.field(default="openai", validator=_one_of(*USAGE_FORMATS))


@attrs.frozen
class LimitsSpec:
    """Scheduler defaults for lanes on this provider."""

    window_min: int = attrs.field(default=1, validator=_at_least(1))
    window_initial: int = attrs.field(default=4, validator=_at_least(1))
    window_max: int = attrs.field(default=32, validator=_at_least(1))
    # Requests / tokens per minute; 0 = learn from the rate-limit headers.
    rpm: int = attrs.field(default=0, validator=_at_least(0))
    tpm: int = attrs.field(default=0, validator=_at_least(0))

    @window_max.validator
    def _ordered(self, attribute: attrs.Attribute, value: int) -> None:
        if not self.window_min <= self.window_initial <= value:
            raise FieldError(
                "window_initial",
                "must lie between window_min and window_max, got "
                f"window_min={self.window_min}, window_initial={self.window_initial}, window_max={value}",
            )


def _profile_name(inst: object, attribute: attrs.Attribute, value: str) -> None:
    if not _NAME_RE.match(value):
        raise FieldError(attribute.name, f"must be letters, digits, '_', '-' or '.', got {_show(value)}")


def _default_upstream(inst: object, attribute: attrs.Attribute, value: str) -> None:
    problem = value and _url_problem(value)
    if problem:
        raise FieldError(attribute.name, problem)


@attrs.frozen
class Profile:
    name: str = attrs.field(validator=_profile_name)
    description: str = ""
    # Upstream hosts of this provider: "api.openai.com" (exact name),
    # ".openai.azure.com" (any subdomain), "localhost:11434" (name and port),
    # ":11434" (any host on that port).
    hosts: tuple[str, ...] = attrs.field(default=(), converter=_lower_all, validator=_hosts)
    # Zero-config target for requests detected by shape; "" = none.
    default_upstream: str = attrs.field(default="", validator=_default_upstream)
    # One of hivemind_trio.core.errors.FORMATS.
    error_format: str = attrs.field(default="plain", validator=_one_of(*FORMATS))
    detect: DetectSpec = attrs.field(factory=DetectSpec)
    ratelimit: RateLimitSpec = attrs.field(factory=RateLimitSpec)
    retry: RetrySpec = attrs.field(factory=RetrySpec)
    usage: UsageSpec = attrs.field(factory=UsageSpec)
    limits: LimitsSpec = attrs.field(factory=LimitsSpec)


GENERIC = "generic"


# ---------------------------------------------------------------------------
# Loading


def _candidate_dirs() -> Iterator[Path]:
    here = Path(__file__).resolve().parent
    root = here.parent
    # A source checkout (editable install, tests): the canonical files.
    if (root / "pyproject.toml").is_file():
        yield root / "profiles"
    share = Path("share", "hivemind-trio", "profiles")
    # pip install --target DIR puts data files under DIR/share.
    yield root / share
    try:
        dist = importlib.metadata.distribution("hivemind-trio")
        for f in dist.files or ():
            if f.name == "generic.toml" and f.parent.as_posix().endswith(share.as_posix()):
                yield Path(str(dist.locate_file(f))).resolve().parent
    except importlib.metadata.PackageNotFoundError:
        pass
    for prefix in (sys.prefix, sys.base_prefix, site.getuserbase()):
        yield Path(prefix) / share


def builtin_profiles_dir() -> Path:
    """The directory holding the built-in profiles (see the module docstring)."""
    tried = []
    for d in _candidate_dirs():
        if (d / f"{GENERIC}.toml").is_file():
            return d
        tried.append(str(d))
    raise ConfigError(f"built-in provider profiles not found; looked in: {', '.join(tried)}")


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_dir(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    if not directory.is_dir():
        raise ConfigError(f"profiles directory {directory}: not a directory")
    out = []
    for path in sorted(directory.glob("*.toml")):
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"profile {path}: invalid TOML ({exc})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"profile {path}: cannot read ({exc})") from None
        out.append((path, raw))
    return out


def _build(
    files: list[tuple[Path, dict[str, Any]]],
    raws: dict[str, dict[str, Any]],
    profiles: dict[str, Profile],
) -> None:
    """Structure ``files`` into ``profiles``; ``raws`` keeps the raw tables for ``extends``."""
    seen: dict[str, Path] = {}
    for path, raw in files:
        raw = dict(raw)
        base_name = raw.pop("extends", None)
        if base_name is not None:
            if not isinstance(base_name, str) or base_name not in raws:
                known = ", ".join(sorted(raws))
                raise ConfigError(f"extends: unknown profile {_show(base_name)}; known: {known} (in {path})")
            raw = _merge({k: v for k, v in raws[base_name].items() if k != "name"}, raw)
        raw.setdefault("name", path.stem)
        profile = structure_strict(raw, Profile, origin=f"in {path}")
        if profile.name in seen:
            raise ConfigError(f"name: profile {_show(profile.name)} defined twice, in {seen[profile.name]} and {path}")
        seen[profile.name] = path
        raws[profile.name] = raw
        profiles[profile.name] = profile


def load_profiles(extra_dir: str | None = None) -> dict[str, Profile]:
    """The built-in profiles, then those in ``extra_dir`` adding to or replacing them by name.

    Raises :class:`ConfigError` naming the file, key and value of any problem.
    """
    raws: dict[str, dict[str, Any]] = {}
    profiles: dict[str, Profile] = {}
    _build(_read_dir(builtin_profiles_dir()), raws, profiles)
    if extra_dir:
        _build(_read_dir(Path(extra_dir).expanduser()), raws, profiles)
    if GENERIC not in profiles:
        profiles[GENERIC] = Profile(name=GENERIC)
    return profiles


# ---------------------------------------------------------------------------
# Detection


def _split_host(host: str) -> tuple[str, int | None]:
    """(lower-case host name, port or None) from "h", "h:p", "[v6]:p" or a URL."""
    text = host.strip()
    if "://" not in text:
        text = "//" + text
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError:
        return host.strip().lower(), None
    name = parts.hostname or ""
    return name.lower().rstrip("."), port


def _host_score(entry: str, name: str, port: int | None) -> int:
    """How specifically ``entry`` matches; 0 = not at all."""
    if entry.startswith(":"):
        return 1 if port is not None and entry[1:] == str(port) else 0
    if entry.startswith("."):
        return 2 + len(entry) if name.endswith(entry) or name == entry[1:] else 0
    entry_name, entry_port = _split_host(entry)
    if entry_name != name:
        return 0
    if entry_port is None:
        return 1000
    return 2000 if entry_port == port else 0


def profile_for_host(host: str, profiles: Mapping[str, Profile]) -> Profile:
    """The profile for an upstream host ("api.openai.com", "localhost:11434" or a URL).

    Exact host:port beats exact host beats the longest ".suffix" beats ":port".
    Unknown hosts get the generic profile.  Pass the port when there is one:
    it is what tells a local Ollama (11434) from any other local server.
    """
    name, port = _split_host(host)
    best: Profile | None = None
    best_score = 0
    for profile in profiles.values():
        for entry in profile.hosts:
            score = _host_score(entry, name, port)
            if score > best_score:
                best, best_score = profile, score
    if best is not None:
        return best
    return profiles.get(GENERIC) or Profile(name=GENERIC)


def _path_under(path: str, prefix: str) -> bool:
    # Whole segments: "/v1/messages" covers "/v1/messages/count_tokens", not "/v1/messagesx".
    stem = prefix.rstrip("/")
    return path == stem or path.startswith(stem + "/")


def detect_by_shape(
    method: str,
    path: str,
    headers: Mapping[str, str] | Iterable[tuple[bytes, bytes]],
    profiles: Mapping[str, Profile],
) -> Profile | None:
    """The profile whose request shape this is, for zero-config routing; None if none.

    ``headers`` is a mapping or ASGI-style (name, value) byte pairs.  The method
    does not decide anything today (``HEAD /`` is Anthropic's by its headers);
    it is part of the signature so that a profile rule may use it later.
    """
    names: set[str] = set()
    bearer = False
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for key, value in pairs:
        k = (key.decode("latin-1") if isinstance(key, bytes) else key).lower()
        names.add(k)
        if k == "authorization":
            v = value.decode("latin-1") if isinstance(value, bytes) else value
            bearer = bearer or v.strip().lower().startswith("bearer ")
    path = path.split("?", 1)[0] or "/"
    for profile in sorted(profiles.values(), key=lambda p: (p.detect.order, p.name)):
        rules = profile.detect
        if any(h in names for h in rules.headers):
            return profile
        if any(_path_under(path, p) for p in rules.paths):
            return profile
        if bearer and any(_path_under(path, p) for p in rules.bearer_paths):
            return profile
    return None
