"""Header handling shared by the HTTP and WebSocket paths.

Headers travel as lists of (name, value) byte pairs, in the order and case the
peer sent them, so nothing a client or upstream sends is reordered or renamed.
"""

from __future__ import annotations

from collections.abc import Iterable

# RFC 9110 §7.6.1 hop-by-hop headers, plus Proxy-* (checked by prefix).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"trailers",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

# WebSocket handshake headers belong to each hop's own handshake.
WS_HANDSHAKE = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-accept",
        b"sec-websocket-protocol",
    }
)

OWN_PREFIX = b"x-hivemind-"

Headers = list[tuple[bytes, bytes]]


def get(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """First value of header ``name`` (lower-case bytes), or None."""
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for k, v in headers:
        if k.lower() == b"connection":
            tokens.update(t.strip().lower() for t in v.split(b",") if t.strip())
    return tokens


def end_to_end(headers: Iterable[tuple[bytes, bytes]], *, drop: frozenset[bytes] = frozenset()) -> Headers:
    """Headers minus hop-by-hop ones (and those named by Connection) and ``drop``."""
    headers = list(headers)
    named = _connection_tokens(headers)
    out: Headers = []
    for k, v in headers:
        low = k.lower()
        if low in HOP_BY_HOP or low in named or low in drop or low.startswith(b"proxy-"):
            continue
        out.append((k, v))
    return out


def split_own(headers: Iterable[tuple[bytes, bytes]]) -> tuple[Headers, dict[bytes, bytes]]:
    """Separate ``x-hivemind-*`` headers (the proxy's own) from the rest."""
    rest: Headers = []
    own: dict[bytes, bytes] = {}
    for k, v in headers:
        low = k.lower()
        if low.startswith(OWN_PREFIX):
            own.setdefault(low, v)
        else:
            rest.append((k, v))
    return rest, own
