"""Configuration: an attrs model, loaded strictly with cattrs.

Sources, lowest precedence first: built-in defaults, the TOML file named by
``HIVEMIND_CONFIG`` (or ``--config``), ``HIVEMIND_*`` environment variables,
command-line flags.  Every source is validated the same strict way: unknown
keys, wrong types ("false" for a bool, 2.7 for an int) and out-of-range values
raise :class:`ConfigError` naming the key and the value.

How loading works: every source is first turned into plain data (the TOML
file as parsed; environment variables and flags parsed per field type into
the same nested dict), the layers are merged key by key, and the merged dict
is structured once by a cattrs converter whose scalar hooks refuse every
coercion (cattrs would otherwise turn "false" into True and 2.7 into 2).
Range checks are attrs validators on the model, so a ``Config`` built in code
is checked exactly like one read from a file.  Failures come back from cattrs
as a tree of exception groups; :func:`_problems` walks that tree into one
``<dotted.key>: <problem>, got <value>`` line per problem, and each line says
which source (file, variable, flag) the bad value came from.

TOML layout (every key optional)::

    upstream = "https://api.anthropic.com"   # one upstream for every path
    state = ""                               # "" (in-process) or "redis://host:6379/0"

    [server]          # ServerConfig's fields: host, port, max_body_bytes, ...
    port = 8765

    [scheduler]       # SchedulerConfig's fields: queue_timeout, max_attempts, switches
    queue_timeout = 600.0

    [budget]          # BudgetConfig: token budgets (0 = unlimited)
    agent_tokens = 2_000_000
    period = "day"

    [[routes]]        # named upstreams by path prefix, longest prefix wins
    name = "claude"
    url = "https://api.anthropic.com"
    prefix = "/claude"
    strip_prefix = true
    profile = "anthropic"

    [[agents]]        # priority rules, first match wins
    match = "batch-*"
    priority = "low"

Environment: ``HIVEMIND_<FIELD>`` for every ``[server]`` field and every
top-level scalar (``HIVEMIND_PORT``, ``HIVEMIND_UPSTREAM``), and
``HIVEMIND_<SECTION>_<FIELD>`` for the other sections
(``HIVEMIND_SCHEDULER_QUEUE_TIMEOUT``).  ``HIVEMIND_CONFIG`` names the file.
Any other ``HIVEMIND_*`` variable is refused as a probable typo, except the
``HIVEMIND_TEST_*`` / ``HIVEMIND_BENCH_*`` namespaces used by the test and
benchmark tooling.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
import os
import re
import tomllib
import typing
import urllib.parse
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)

__all__ = [
    "AgentRule",
    "PriceConfig",
    "BudgetConfig",
    "Config",
    "ConfigError",
    "FieldError",
    "Route",
    "SchedulerConfig",
    "ServerConfig",
    "config_to_dict",
    "load_config",
    "structure_strict",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and the offending value.

    A message holds one line per problem.  ``problems`` has the same lines as a
    tuple, for callers (and tests) that want them one by one.
    """

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems or (message,)


class FieldError(ConfigError):
    """One field's value is out of range: raised by the model's validators.

    ``path`` is relative to the object being validated ("port",
    "routes[1].name"); the loader prefixes it with where that object sits.
    """

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class _WrongType(ValueError):
    """A value of the wrong type; the message is the problem without the key."""


# ---------------------------------------------------------------------------
# Validators (messages name the field and the value)


def _show(value: object) -> str:
    """A value as the user wrote it (TOML-ish), cut short if long."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value)
    elif isinstance(value, Mapping):
        text = "a table"
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_show(v) for v in value) + "]"
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _at_least(low: float) -> Any:
    def check(inst: object, attribute: attrs.Attribute, value: float) -> None:
        # Written as "not >=" so NaN (TOML allows nan) is refused too.
        if not value >= low:
            raise FieldError(attribute.name, f"must be at least {low:g}, got {_show(value)}")

    return check


def _between(low: float, high: float) -> Any:
    def check(inst: object, attribute: attrs.Attribute, value: float) -> None:
        if not low <= value <= high:
            raise FieldError(attribute.name, f"must be between {low:g} and {high:g}, got {_show(value)}")

    return check


def _one_of(*choices: str) -> Any:
    def check(inst: object, attribute: attrs.Attribute, value: str) -> None:
        if value not in choices:
            raise FieldError(attribute.name, f"must be one of {', '.join(choices)}; got {_show(value)}")

    return check


def _url_problem(value: str) -> str | None:
    """Why ``value`` is not a usable upstream URL, or None when it is."""
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"not a valid URL ({exc}), got {_show(value)}"
    if parts.scheme not in ("http", "https"):
        return f"URL scheme must be http or https, got {_show(value)}"
    if not parts.hostname:
        return f"URL must name a host, got {_show(value)}"
    if parts.query or parts.fragment:
        return f"URL must not have a query or fragment, got {_show(value)}"
    return None


def _url(*, allow_empty: bool) -> Any:
    def check(inst: object, attribute: attrs.Attribute, value: str) -> None:
        if value == "" and allow_empty:
            return
        problem = _url_problem(value)
        if problem:
            raise FieldError(attribute.name, problem)

    return check


def _path_prefix(inst: object, attribute: attrs.Attribute, value: str) -> None:
    if not value.startswith("/"):
        raise FieldError(attribute.name, f'must start with "/", got {_show(value)}')


def _non_empty(inst: object, attribute: attrs.Attribute, value: str) -> None:
    if not value.strip():
        raise FieldError(attribute.name, f"must not be empty, got {_show(value)}")


# The names the logging module knows (the CLI passes it log_level.upper()).
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
PRIORITIES = ("critical", "high", "normal", "low")
BUDGET_PERIODS = ("run", "hour", "day")


# ---------------------------------------------------------------------------
# The model


@attrs.frozen
class Route:
    """One named upstream, chosen by path prefix.

    A request whose path starts with ``prefix`` goes to ``url``.  With
    ``strip_prefix`` the prefix is removed before forwarding, so an agent can use
    ``http://proxy/<prefix>`` as its base URL.
    """

    name: str = attrs.field(validator=_non_empty)
    url: str = attrs.field(validator=_url(allow_empty=False))
    prefix: str = attrs.field(default="/", validator=_path_prefix)
    strip_prefix: bool = True
    # Provider profile name; empty = detect from the upstream host.
    profile: str = ""
    # Configured limits for this upstream (SPEC §5.2); 0 = the profile's
    # default, else learnt from the rate-limit headers.
    rpm: int = attrs.field(default=0, validator=_at_least(0))
    tpm: int = attrs.field(default=0, validator=_at_least(0))


@attrs.frozen
class ServerConfig:
    host: str = attrs.field(default="127.0.0.1", validator=_non_empty)
    port: int = attrs.field(default=8765, validator=_between(0, 65535))
    # Largest request body accepted (bytes); larger gets a provider-format 413.
    max_body_bytes: int = attrs.field(default=32 * 1024 * 1024, validator=_at_least(1))
    # Largest request head (bytes); larger gets 431 from Hypercorn/h11.
    max_header_bytes: int = attrs.field(default=64 * 1024, validator=_at_least(1))
    # Seconds a client may stop reading a stream before the upstream is released.
    stall_timeout: float = attrs.field(default=60.0, validator=_at_least(0))
    # Seconds to open a connection to the upstream.
    connect_timeout: float = attrs.field(default=10.0, validator=_at_least(0))
    # Seconds of upstream silence tolerated; 0 disables.  Never shorter than
    # the agents' own 600 s by default.
    upstream_read_timeout: float = attrs.field(default=900.0, validator=_at_least(0))
    # Upstream connection pool size (per proxy process).
    max_connections: int = attrs.field(default=512, validator=_at_least(1))
    # Add x-hivemind-agent / -queue-ms / -attempts to responses.
    info_headers: bool = True
    # Token required for /hivemind/* when bound to a non-loopback address.
    admin_token: str = attrs.field(default="", repr=False)
    # Seconds in-flight streams get to finish on shutdown.
    shutdown_grace: float = attrs.field(default=30.0, validator=_at_least(0))
    # Extra directory of provider profiles (*.toml), on top of the built-in ones.
    profiles_dir: str = ""
    log_level: str = attrs.field(default="info", validator=_one_of(*LOG_LEVELS))
    log_json: bool = False
    # Distinct agent names in /hivemind/metrics labels; later agents count as "other".
    metrics_max_agents: int = attrs.field(default=100, validator=_at_least(1))


@attrs.frozen
class SchedulerConfig:
    """Scheduler settings shared by every lane (SPEC §5).

    The switches turn each primitive off on its own, for the ablation in
    SCENARIOS.md; everything is on by default.
    """

    # Longest a request waits for admission (seconds) before a provider-format
    # 503/529; the client's own deadline (x-stainless-timeout) can shorten it.
    queue_timeout: float = attrs.field(default=600.0, validator=_at_least(0))
    # Upstream attempts per request, the first included.
    max_attempts: int = attrs.field(default=8, validator=_at_least(1))
    # Retries are at most this fraction of a lane's recent requests.
    retry_budget: float = attrs.field(default=0.5, validator=_between(0, 1))
    # Seconds of waiting that promote a queued request by one priority class
    # (so low never starves).
    aging_interval: float = attrs.field(default=10.0, validator=_at_least(0.001))
    admission: bool = True
    ratelimit: bool = True
    aimd: bool = True
    breaker: bool = True
    budgets: bool = True
    priority: bool = True
    retry: bool = True


@attrs.frozen
class PriceConfig:
    """USD per million tokens of one model (for USD budgets)."""

    input_per_mtok: float = attrs.field(validator=_at_least(0))
    output_per_mtok: float = attrs.field(validator=_at_least(0))


@attrs.frozen
class BudgetConfig:
    """Token (and optionally USD) budgets (SPEC §5.5); 0 means unlimited."""

    agent_tokens: int = attrs.field(default=0, validator=_at_least(0))
    global_tokens: int = attrs.field(default=0, validator=_at_least(0))
    # USD budgets need a price for the models used ([budget.prices."model"]);
    # a model without a price is invisible to them (token budgets still apply).
    agent_usd: float = attrs.field(default=0.0, validator=_at_least(0))
    global_usd: float = attrs.field(default=0.0, validator=_at_least(0))
    # Model name -> price; a key also prices every model whose name starts with
    # it ("claude-sonnet-4-5" prices "claude-sonnet-4-5-20250929").
    prices: dict[str, PriceConfig] = attrs.field(factory=dict)
    period: str = attrs.field(default="day", validator=_one_of(*BUDGET_PERIODS))
    # SQLite ledger that keeps day/hour counters across restarts (used when a
    # budget is set): a path, "" for $XDG_STATE_HOME/hivemind-trio/budget.sqlite3,
    # or "off".
    ledger: str = ""


@attrs.frozen
class AgentRule:
    """A priority rule (SPEC §4.3): the first rule whose patterns all match wins.

    ``match`` is a glob on the agent identity, ``user_agent`` a glob on the
    User-Agent header; an empty pattern matches anything.
    """

    priority: str = attrs.field(validator=_one_of(*PRIORITIES))
    match: str = ""
    user_agent: str = ""

    def matches(self, agent: str, user_agent: str) -> bool:
        return (not self.match or fnmatch.fnmatchcase(agent, self.match)) and (
            not self.user_agent or fnmatch.fnmatchcase(user_agent, self.user_agent)
        )


def _unique_route_names(inst: object, attribute: attrs.Attribute, routes: tuple[Route, ...]) -> None:
    seen: set[str] = set()
    for i, route in enumerate(routes):
        if route.name in seen:
            raise FieldError(f"{attribute.name}[{i}].name", f"duplicate route name {_show(route.name)}")
        seen.add(route.name)


def _state_url(inst: object, attribute: attrs.Attribute, value: str) -> None:
    if not value:
        return
    from .state.redis import parse_redis_url

    try:
        parse_redis_url(value)
    except ValueError as exc:
        # The URL may hold a password: show it masked.
        raise FieldError(attribute.name, f"{exc}, got {_show(_mask_url(value))}") from None


@attrs.frozen
class Config:
    server: ServerConfig = attrs.field(factory=ServerConfig)
    # One upstream URL for every path (shortcut for a single route at "/").
    upstream: str = attrs.field(default="", validator=_url(allow_empty=True))
    # Named routes by path prefix; longest prefix wins.
    routes: tuple[Route, ...] = attrs.field(default=(), validator=_unique_route_names)
    # Shared state backend (SPEC §7.5): "" = this process only.
    state: str = attrs.field(default="", validator=_state_url)
    scheduler: SchedulerConfig = attrs.field(factory=SchedulerConfig)
    budget: BudgetConfig = attrs.field(factory=BudgetConfig)
    agents: tuple[AgentRule, ...] = ()


# ---------------------------------------------------------------------------
# The strict converter


def _structure_int(value: object, _: type) -> int:
    if type(value) is int:  # bool is an int subclass: refuse it
        return value
    raise _WrongType(f"expected an integer, got {_show(value)}")


def _structure_float(value: object, _: type) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise _WrongType(f"expected a number, got {_show(value)}")


def _structure_bool(value: object, _: type) -> bool:
    if type(value) is bool:
        return value
    raise _WrongType(f"expected true or false, got {_show(value)}")


def _structure_str(value: object, _: type) -> str:
    if type(value) is str:
        return value
    raise _WrongType(f"expected a string, got {_show(value)}")


def _is_homogeneous_tuple(t: Any) -> bool:
    args = typing.get_args(t)
    return typing.get_origin(t) is tuple and len(args) == 2 and args[1] is Ellipsis


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_structure_hook(str, _structure_str)

    def tuple_factory(t: Any) -> Any:
        inner = cattrs.cols.homogenous_tuple_structure_factory(t, conv)

        def structure(value: object, _: type) -> tuple:
            # cattrs would iterate a string into characters.
            if not isinstance(value, (list, tuple)):
                raise _WrongType(f"expected an array, got {_show(value)}")
            return inner(value, t)

        return structure

    conv.register_structure_hook_factory(_is_homogeneous_tuple, tuple_factory)

    def attrs_factory(cl: type) -> Any:
        # Our own instead of cattrs.gen's: that one reports the type errors of a
        # table but skips its range checks when there are any, and attrs stops at
        # the first failing validator.  This one reports every problem in one go.
        fields = attrs.fields(cl)
        hints = typing.get_type_hints(cl)
        names = {f.name for f in fields}

        def noted(exc: Exception, field: attrs.Attribute) -> Exception:
            note = AttributeValidationNote(f"Structuring class {cl.__qualname__} @ attribute {field.name}", field.name, hints[field.name])
            exc.__notes__ = [*getattr(exc, "__notes__", []), note]
            return exc

        def structure(value: object, _: type) -> Any:
            if not isinstance(value, Mapping):
                raise _WrongType(f"expected a table, got {_show(value)}")
            errors: list[Exception] = []
            extra = set(value) - names
            if extra:
                errors.append(ForbiddenExtraKeysError("", cl, extra))
            kwargs: dict[str, Any] = {}
            bad: set[str] = set()
            for field in fields:
                if field.name not in value:
                    if field.default is attrs.NOTHING:
                        errors.append(noted(KeyError(field.name), field))
                        bad.add(field.name)
                    continue
                try:
                    kwargs[field.name] = conv.structure(value[field.name], hints[field.name])
                except Exception as exc:  # noqa: BLE001 - every failure becomes a reported problem
                    errors.append(noted(exc, field))
                    bad.add(field.name)
            if not errors:
                try:
                    return cl(**kwargs)
                except FieldError:
                    pass  # gather every validator's complaint below
            if not any(f.default is attrs.NOTHING and f.name in bad for f in fields):
                with attrs.validators.disabled():
                    unchecked = cl(**kwargs)
                for field in fields:
                    if field.validator is None or field.name in bad:
                        continue
                    try:
                        field.validator(unchecked, field, getattr(unchecked, field.name))
                    except FieldError as exc:
                        # A cross-field check may name a field that failed above.
                        if re.split(r"[.\[]", exc.path)[0] not in bad:
                            errors.append(exc)
            raise ClassValidationError(f"While structuring {cl.__qualname__}", errors, cl)

        return structure

    conv.register_structure_hook_factory(attrs.has, attrs_factory)
    return conv


_converter = _make_converter()


def _join(path: str, name: str) -> str:
    if not path:
        return name
    return f"{path}{name}" if name.startswith("[") else f"{path}.{name}"


def _problems(exc: BaseException, path: str = "") -> list[tuple[str, str]]:
    """Walk a cattrs error tree into (dotted key, problem) pairs."""
    out: list[tuple[str, str]] = []
    if isinstance(exc, IterableValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            out += _problems(sub, f"{path}[{note.index}]")
        for sub in without:
            out += _problems(sub, path)
    elif isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            out += _problems(sub, _join(path, note.name))
        for sub in without:
            out += _problems(sub, path)
    elif isinstance(exc, ForbiddenExtraKeysError):
        known = [f.name for f in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        for key in sorted(exc.extra_fields):
            hint = difflib.get_close_matches(key, known, n=1)
            problem = f"unknown key (did you mean {hint[0]!r}?)" if hint else "unknown key"
            if known and not hint:
                problem += f"; known keys: {', '.join(known)}"
            out.append((_join(path, key), problem))
    elif isinstance(exc, FieldError):
        out.append((_join(path, exc.path), exc.problem))
    elif isinstance(exc, _WrongType):
        out.append((path, str(exc)))
    elif isinstance(exc, KeyError):
        out.append((path, "required key missing"))
    else:
        out.append((path, f"invalid value ({type(exc).__name__}: {exc})"))
    return out


def _source_of(key: str, sources: Mapping[str, str]) -> str | None:
    # The longest recorded prefix of the key: "routes[0].url" came from wherever "routes" did.
    while key:
        if key in sources:
            return sources[key]
        key = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", key) if re.search(r"[.\[]", key) else ""
    return None


def _format(problems: list[tuple[str, str]], sources: Mapping[str, str], default_source: str | None) -> list[str]:
    lines = []
    for key, problem in problems:
        line = f"{key or '(top level)'}: {problem}"
        src = _source_of(key, sources) or default_source
        if src:
            line += f" ({src})"
        lines.append(line)
    return lines


def _raise(lines: list[str]) -> typing.NoReturn:
    # No "invalid configuration" header: callers (the CLI) add their own.
    raise ConfigError("\n".join(lines), tuple(lines))


def structure_strict(
    raw: object,
    cl: type[T],
    *,
    sources: Mapping[str, str] | None = None,
    origin: str | None = None,
) -> T:
    """Structure plain data into attrs class ``cl`` with no coercion at all.

    Raises :class:`ConfigError` with one line per problem, each naming the
    dotted key and the value; ``sources`` maps dotted keys to where their value
    came from, ``origin`` is said for every other key (e.g. the file name).
    """
    try:
        return _converter.structure(raw, cl)
    except (ClassValidationError, IterableValidationError, _WrongType, FieldError) as exc:
        _raise(_format(_problems(exc), sources or {}, origin))


# ---------------------------------------------------------------------------
# Sources


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_text(text: str, t: Any) -> object:
    """Parse an environment variable / flag string per the field's type."""
    if t is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise _WrongType(f"expected true/false/1/0/yes/no, got {_show(text)}")
    if t is int:
        try:
            return int(text)  # decimal only; "2.5", "0x10", "1e3" are refused
        except ValueError:
            pass
        raise _WrongType(f"expected an integer, got {_show(text)}")
    if t is float:
        try:
            value = float(text.strip())
        except ValueError:
            raise _WrongType(f"expected a number, got {_show(text)}") from None
        if not math.isfinite(value):
            raise _WrongType(f"expected a finite number, got {_show(text)}")
        return value
    if t is str:
        return text
    raise _WrongType(f"cannot be set from a string, got {_show(text)}")


def _scalar_fields(cl: type) -> dict[str, Any]:
    """Field name -> type for the fields of ``cl`` settable from one string."""
    hints = typing.get_type_hints(cl)
    return {f.name: hints[f.name] for f in attrs.fields(cl) if hints[f.name] in (bool, int, float, str)}


def _settable_keys() -> dict[str, Any]:
    """Every dotted key a variable or a flag can set, with its type."""
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(Config)
    for f in attrs.fields(Config):
        t = hints[f.name]
        if t in (bool, int, float, str):
            keys[f.name] = t
        elif attrs.has(t):
            for name, sub in _scalar_fields(t).items():
                keys[f"{f.name}.{name}"] = sub
    return keys


def _env_names() -> dict[str, str]:
    """Environment variable -> dotted key."""
    names = {}
    for key in _settable_keys():
        section, _, name = key.rpartition(".")
        if section == "server" or not section:
            names["HIVEMIND_" + name.upper()] = key
        else:
            names[f"HIVEMIND_{section.upper()}_{name.upper()}"] = key
    return names


ENV_CONFIG = "HIVEMIND_CONFIG"
_ENV_IGNORED_PREFIXES = ("HIVEMIND_TEST_", "HIVEMIND_BENCH_")


def _set(tree: dict[str, Any], key: str, value: object) -> None:
    *sections, name = key.split(".")
    for section in sections:
        if section not in tree:
            tree[section] = {}
        node = tree[section]
        if not isinstance(node, dict):
            # A wrong-typed section in the file ("server = 5"): leave it for
            # structuring to report rather than hide it under this value.
            return
        tree = node
    tree[name] = value


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 ({exc})") from None


def load_config(
    path: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Load the configuration: defaults < TOML file < ``HIVEMIND_*`` < ``overrides``.

    ``path`` is the TOML file; without it ``env["HIVEMIND_CONFIG"]`` when set,
    else no file.  ``env=None`` reads ``os.environ``.  ``overrides`` are the
    command-line flags keyed by dotted path (``"server.port"``, ``"upstream"``);
    a ``None`` value means "flag not given" and is skipped, a string for a
    non-string field is parsed like an environment variable, anything else
    must already have the right type.

    Raises :class:`ConfigError` naming every bad key, its value and its source.
    """
    if env is None:
        env = os.environ
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    origin = None
    lines: list[str] = []

    if path is None:
        path = env.get(ENV_CONFIG) or None
    if path is not None:
        raw = _read_toml(path)
        origin = f"in {path}"

    keys = _settable_keys()
    env_names = _env_names()
    for var in sorted(env):
        if not var.startswith("HIVEMIND_") or var == ENV_CONFIG or var.startswith(_ENV_IGNORED_PREFIXES):
            continue
        key = env_names.get(var)
        if key is None:
            hint = difflib.get_close_matches(var, list(env_names) + [ENV_CONFIG], n=1)
            lines.append(
                f"{var}: unknown HIVEMIND_* environment variable"
                + (f" (did you mean {hint[0]}?)" if hint else "")
            )
            continue
        try:
            value = _parse_text(env[var], keys[key])
        except _WrongType as exc:
            lines.append(f"{key}: {exc} (from {var})")
            continue
        _set(raw, key, value)
        sources[key] = f"from {var}"

    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in keys:
            hint = difflib.get_close_matches(key, list(keys), n=1)
            lines.append(f"{key}: unknown setting" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
            continue
        if isinstance(value, str) and keys[key] is not str:
            try:
                value = _parse_text(value, keys[key])
            except _WrongType as exc:
                lines.append(f"{key}: {exc} (from the command line)")
                continue
        _set(raw, key, value)
        sources[key] = "from the command line"

    try:
        cfg = structure_strict(raw, Config, sources=sources, origin=origin)
    except ConfigError as exc:
        lines.extend(exc.problems)
    if lines:
        _raise(lines)
    return cfg


# ---------------------------------------------------------------------------
# Output


_MASK = "***"


def _mask_url(url: str) -> str:
    """Hide a password in a URL's userinfo (redis://:secret@host)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{_MASK}@{netloc}"))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain data for status output; secrets masked (never the admin token in clear)."""
    data = cattrs.unstructure(cfg)
    data["routes"] = [dict(r, url=_mask_url(r["url"])) for r in data["routes"]]
    data["agents"] = list(data["agents"])
    data["upstream"] = _mask_url(data["upstream"])
    data["state"] = _mask_url(data["state"])
    if data["server"]["admin_token"]:
        data["server"]["admin_token"] = _MASK
    return data
