from hivemind_trio.runtime import headers as h


def test_hop_by_hop_and_connection_named_headers_dropped():
    given = [
        (b"Connection", b"keep-alive, X-Secret-Hop"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"TE", b"trailers"),
        (b"Trailer", b"x"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"X-Secret-Hop", b"1"),
        (b"anthropic-beta", b"a,b"),
        (b"X-Unknown", b"kept"),
    ]
    assert h.end_to_end(given) == [(b"anthropic-beta", b"a,b"), (b"X-Unknown", b"kept")]


def test_own_headers_split_out():
    rest, own = h.split_own([(b"X-Hivemind-Agent", b"a1"), (b"x-api-key", b"k")])
    assert rest == [(b"x-api-key", b"k")]
    assert own == {b"x-hivemind-agent": b"a1"}
