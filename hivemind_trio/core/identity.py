"""Who is asking: agent identity, credential fingerprint and priority (SPEC §4).

Pure functions over request headers.  Raw credentials never leave this module:
only a salted, truncated hash (the fingerprint) does, and it is what lanes,
status and logs see.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable

import attrs


class Priority(enum.IntEnum):
    LOW = 0
    NORMAL = 1
    HIGH = 2
    CRITICAL = 3

    @classmethod
    def parse(cls, value: str | bytes | None) -> Priority | None:
        """``critical|high|normal|low`` or ``3..0``; None for absent or unknown."""
        if value is None:
            return None
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        v = value.strip().lower()
        # Only ASCII digits: str.isdigit() also accepts "²", which int() refuses.
        if v in ("0", "1", "2", "3"):
            return cls(int(v))
        try:
            return cls[v.upper()]
        except KeyError:
            return None


@attrs.frozen
class Identity:
    agent: str
    # How the agent was told apart: header, claude-session, codex-session, credential, address.
    source: str
    credential: str  # fingerprint ("" when the request carries no credential)


def _get(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def credential_of(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    headers = list(headers)
    key = _get(headers, b"x-api-key")
    if key:
        return key.strip()
    auth = _get(headers, b"authorization")
    if auth:
        scheme, _, token = auth.partition(b" ")
        return (token or scheme).strip()
    return b""


def fingerprint(secret: bytes, salt: bytes) -> str:
    if not secret:
        return ""
    return hashlib.blake2b(secret, key=salt[:64], digest_size=8).hexdigest()


def identify(
    headers: Iterable[tuple[bytes, bytes]],
    own: dict[bytes, bytes],
    client: tuple[str, int] | None,
    salt: bytes,
) -> Identity:
    """First match wins: x-hivemind-agent, Claude Code session, Codex session,
    hash of (credential, User-Agent), client address."""
    headers = list(headers)
    cred = credential_of(headers)
    cred_fp = fingerprint(cred, salt)
    named = own.get(b"x-hivemind-agent")
    if named and named.strip():
        return Identity(named.strip().decode("utf-8", "replace")[:128], "header", cred_fp)
    session = _get(headers, b"x-claude-code-session-id")
    if session:
        return Identity("claude-" + session.decode("latin-1")[:64], "claude-session", cred_fp)
    session = _get(headers, b"session-id") or _get(headers, b"thread-id")
    if session:
        return Identity("codex-" + session.decode("latin-1")[:64], "codex-session", cred_fp)
    ua = _get(headers, b"user-agent") or b""
    if cred:
        return Identity("key-" + fingerprint(cred + b"\0" + ua, salt)[:12], "credential", cred_fp)
    if client:
        return Identity(f"addr-{client[0]}", "address", cred_fp)
    return Identity("anonymous", "none", cred_fp)
