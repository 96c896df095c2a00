"""Configuration: an attrs model, loaded strictly with cattrs.

Sources, lowest precedence first: built-in defaults, the TOML file named by
``HIVEMIND_CONFIG`` (or ``--config``), ``HIVEMIND_*`` environment variables,
command-line flags.  Every source is validated the same strict way: unknown
keys, wrong types ("false" for a bool, 2.7 for an int) and out-of-range values
raise :class:`ConfigError` naming the key and the value.

(The loader below is filled in by the config work; this module fixes the model
that the rest of the code relies on.)
"""

from __future__ import annotations

import attrs


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and the offending value."""


@attrs.frozen
class Route:
    """One named upstream, chosen by path prefix.

    A request whose path starts with ``prefix`` goes to ``url``.  With
    ``strip_prefix`` the prefix is removed before forwarding, so an agent can use
    ``http://proxy/<prefix>`` as its base URL.
    """

    name: str
    url: str
    prefix: str = "/"
    strip_prefix: bool = True
    # Provider profile name; empty = detect from the upstream host.
    profile: str = ""


@attrs.frozen
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    # Largest request body accepted (bytes); larger gets a provider-format 413.
    max_body_bytes: int = 32 * 1024 * 1024
    # Largest request head (bytes); larger gets 431 from Hypercorn/h11.
    max_header_bytes: int = 64 * 1024
    # Seconds a client may stop reading a stream before the upstream is released.
    stall_timeout: float = 60.0
    # Seconds to open a connection to the upstream.
    connect_timeout: float = 10.0
    # Seconds of upstream silence tolerated; 0 disables.  Never shorter than
    # the agents' own 600 s by default.
    upstream_read_timeout: float = 900.0
    # Upstream connection pool size (per proxy process).
    max_connections: int = 512
    # Add x-hivemind-agent / -queue-ms / -attempts to responses.
    info_headers: bool = True
    # Token required for /hivemind/* when bound to a non-loopback address.
    admin_token: str = ""
    # Seconds in-flight streams get to finish on shutdown.
    shutdown_grace: float = 30.0
    # Extra directory of provider profiles (*.toml), on top of the built-in ones.
    profiles_dir: str = ""
    log_level: str = "info"
    log_json: bool = False


@attrs.frozen
class Config:
    server: ServerConfig = attrs.field(factory=ServerConfig)
    # One upstream URL for every path (shortcut for a single route at "/").
    upstream: str = ""
    # Named routes by path prefix; longest prefix wins.
    routes: tuple[Route, ...] = ()
