"""RESP2 (sans-io) and the `state` URL: encoder, incremental parser, URL parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hivemind_trio.state.redis import parse_redis_url
from hivemind_trio.state.resp import NEED_DATA, Parser, ProtocolError, RedisError, encode_command


def _encode_reply(value) -> bytes:
    """A server's encoding of a reply (the inverse of the parser)."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, RedisError):
        return b"-" + str(value).encode() + b"\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, list):
        return b"*%d\r\n" % len(value) + b"".join(_encode_reply(v) for v in value)
    raise AssertionError(value)


_scalars = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.binary(max_size=64),
    st.from_regex(r"[A-Z]{2,8} [a-z ]{0,20}", fullmatch=True).map(RedisError),
)
_replies = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=5), max_leaves=20)


def _same(a, b) -> bool:
    if isinstance(a, RedisError):
        return isinstance(b, RedisError) and str(a) == str(b)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@given(replies=st.lists(_replies, min_size=1, max_size=6), cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_replies_parse_the_same_however_the_bytes_are_split(replies, cuts) -> None:
    wire = b"".join(_encode_reply(r) for r in replies)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    parser = Parser()
    got = []
    for a, b in zip(points, points[1:]):
        parser.feed(wire[a:b])
        while (reply := parser.next_reply()) is not NEED_DATA:
            got.append(reply)
    assert len(got) == len(replies)
    assert all(_same(x, y) for x, y in zip(replies, got))
    assert parser.next_reply() is NEED_DATA


@given(args=st.lists(st.binary(max_size=40), min_size=1, max_size=6))
def test_a_command_is_an_array_of_bulk_strings(args) -> None:
    # The server parses a command the way the client parses an array reply.
    parser = Parser()
    parser.feed(encode_command(*args))
    assert parser.next_reply() == args


def test_simple_strings_ints_and_floats() -> None:
    assert encode_command("SET", "k", 3, 1.5) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n3\r\n$3\r\n1.5\r\n"
    parser = Parser()
    parser.feed(b"+OK\r\n*-1\r\n")
    assert parser.next_reply() == b"OK"
    assert parser.next_reply() is None
    with pytest.raises(TypeError):
        encode_command("SET", True)


@pytest.mark.parametrize("wire", [b"?x\r\n", b"$abc\r\n", b"*-2\r\n", b"$3\r\nabcd\r\n"])
def test_garbage_is_a_protocol_error(wire: bytes) -> None:
    parser = Parser()
    parser.feed(wire)
    with pytest.raises(ProtocolError):
        parser.next_reply()


def test_state_urls() -> None:
    u = parse_redis_url("redis://:s3cret@redis.internal:6380/2?lease_ttl=10&timeout=0.5&prefix=fleet")
    assert (u.host, u.port, u.db, u.password, u.lease_ttl, u.timeout, u.prefix) == ("redis.internal", 6380, 2, "s3cret", 10.0, 0.5, "fleet")
    assert "s3cret" not in repr(u) and "s3cret" not in u.describe()
    u = parse_redis_url("rediss://user:pw@h")
    assert (u.tls, u.username, u.password, u.port, u.db) == (True, "user", "pw", 6379, 0)
    u = parse_redis_url("unix:///run/redis.sock?db=3")
    assert (u.unix_path, u.db) == ("/run/redis.sock", 3)
    for bad in ("http://h", "redis://", "redis://h/x", "redis://h/0?x=1", "redis://h/0?poll=0", "redis://h/0?prefix=a%20b"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)
