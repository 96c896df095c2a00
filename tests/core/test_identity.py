from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hivemind_trio.core.identity import Priority, credential_of, identify

SALT = b"s" * 32


def test_agent_header_wins():
    hdrs = [(b"X-Claude-Code-Session-Id", b"abc"), (b"x-api-key", b"sk-1")]
    ident = identify(hdrs, {b"x-hivemind-agent": b"reviewer-3"}, ("127.0.0.1", 5), SALT)
    assert ident.agent == "reviewer-3" and ident.source == "header"


def test_claude_session_then_codex_session():
    assert identify([(b"X-Claude-Code-Session-Id", b"u1")], {}, None, SALT).agent == "claude-u1"
    assert identify([(b"session-id", b"t1")], {}, None, SALT).agent == "codex-t1"


def test_credential_hash_separates_user_agents_and_hides_the_key():
    a = identify([(b"x-api-key", b"sk-secret"), (b"user-agent", b"A")], {}, None, SALT)
    b = identify([(b"x-api-key", b"sk-secret"), (b"user-agent", b"B")], {}, None, SALT)
    assert a.agent != b.agent and a.source == "credential"
    assert a.credential == b.credential  # same key, same lane
    assert "secret" not in a.agent and "secret" not in a.credential


def test_address_fallback():
    assert identify([], {}, ("10.0.0.7", 1234), SALT).agent == "addr-10.0.0.7"


def test_bearer_and_api_key_credentials():
    assert credential_of([(b"Authorization", b"Bearer sk-x")]) == b"sk-x"
    assert credential_of([(b"x-api-key", b"k")]) == b"k"
    assert credential_of([]) == b""


@given(st.text(max_size=20))
def test_priority_parse_never_raises(value):
    p = Priority.parse(value)
    assert p is None or isinstance(p, Priority)


def test_priority_names_and_numbers():
    assert Priority.parse("critical") is Priority.CRITICAL
    assert Priority.parse(b"0") is Priority.LOW
    assert Priority.parse(" High ") is Priority.HIGH
    assert Priority.parse("7") is None
