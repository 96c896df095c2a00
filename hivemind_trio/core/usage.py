"""Incremental token-usage metering of responses (SPEC §6), sans-io.

Theory of operation
-------------------
The forwarder relays raw upstream bytes to the client and tees each chunk into
a :class:`UsageMeter`.  The meter never delays or alters the relay and never
raises: anything it does not understand is skipped.

1. :class:`Decoder` undoes ``Content-Encoding`` (gzip, deflate, br, zstd, or a
   list of them) incrementally on the side copy.  If decoding fails the
   decoder goes quiet and the usage falls back to an estimate.
2. :class:`UsageParser` splits the decoded bytes into *lines* at ``\\n``
   (``\\r\\n`` accepted).  Splitting is done on bytes, and a UTF-8 multi-byte
   sequence never contains ``\\n``, so the lines (hence the result) do not
   depend on where the chunks were cut.  Lines longer than ``max_line`` are
   dropped whole, again independently of the chunking.

   * ``text/event-stream``: SSE fields are gathered into events
     (``event:``/``data:``, blank line dispatches).
   * ``application/x-ndjson`` (Ollama): one JSON document per line.
   * ``application/json`` (non-streaming bodies): the body is kept (up to
     ``max_body``) and parsed once at :meth:`UsageParser.finish`; if it is
     not one document it is read as JSON lines.
   * anything else: the first non-blank byte decides (``{``/``[`` JSON,
     otherwise SSE).

   Only documents that can carry usage are JSON-decoded (a cheap substring
   test first), so thousands of text deltas cost almost nothing.
3. Every JSON object is interpreted by shape:

   * Anthropic ``message_start`` (``message.usage``) then ``message_delta``
     (``usage``): cumulative; non-null fields of later events *overwrite*
     earlier ones, they are never added.
   * OpenAI chat chunks / bodies and vLLM continuous usage: ``usage`` is a
     complete cumulative object: the last one wins.
   * Responses API: the ``response.usage`` of ``response.completed`` /
     ``failed`` / ``incomplete`` (or of a non-streaming ``response`` body).
   * Ollama: the ``done: true`` line's ``prompt_eval_count`` / ``eval_count``.

   Fields are reported disjoint, Anthropic style: ``input_tokens`` excludes
   cached tokens (OpenAI's ``prompt_tokens`` includes them, so the cached part
   is moved to ``cache_read_input_tokens``), and :attr:`Usage.total_tokens`
   is the plain sum.
4. Without usage the result is an estimate flagged ``estimated=True``: input
   = request bytes / 4; output = events/lines seen (streams) or body bytes / 4.
   A stream that showed ``message_start`` but broke before ``message_delta``
   keeps its real input and estimates the output.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import attrs

__all__ = ["Usage", "Decoder", "UsageParser", "UsageMeter"]

MAX_LINE = 4 * 1024 * 1024
MAX_EVENT = 8 * 1024 * 1024
MAX_BODY = 32 * 1024 * 1024
MAX_DECODED = 256 * 1024 * 1024

_TERMINAL_RESPONSES = frozenset({"response.completed", "response.failed", "response.incomplete"})
# A document without one of these cannot carry usage: skip the JSON decode.
_USAGE_HINTS = (b'"usage"', b'"eval_count"', b'"prompt_eval_count"')


@attrs.frozen
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    estimated: bool = False
    # Which shape it came from: anthropic, openai_chat, openai_responses, ollama, estimate.
    source: str = ""

    @property
    def total_tokens(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
        )

    @property
    def all_input_tokens(self) -> int:
        """Input including cache reads and writes (what a budget counts as input)."""
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens


# ---------------------------------------------------------------- decoding


class _Zlib:
    """gzip (possibly multi-member) or deflate (zlib-wrapped or raw)."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._obj: Any = None
        self._pending = b""
        self._done = False
        if kind == "gzip":
            self._obj = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def _start_deflate(self, data: bytes) -> None:
        b0, b1 = data[0], data[1]
        # RFC 1950 header: method 8 and a checksum making the pair divisible by 31.
        wrapped = (b0 & 0x0F) == 8 and ((b0 << 8) | b1) % 31 == 0
        self._obj = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)

    def decode(self, data: bytes) -> bytes:
        if self._done:
            return b""
        if self._obj is None:
            data = self._pending + data
            if len(data) < 2:
                self._pending = data
                return b""
            self._pending = b""
            self._start_deflate(data)
        out = [self._obj.decompress(data)]
        while self._kind == "gzip" and self._obj.eof and self._obj.unused_data:
            rest = self._obj.unused_data
            self._obj = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                out.append(self._obj.decompress(rest))
            except zlib.error:
                # Trailing junk after a complete member: keep what we have.
                self._done = True
                break
        return b"".join(out)

    def flush(self) -> bytes:
        if self._obj is None or self._done:
            return b""
        return self._obj.flush()


class _Brotli:
    def __init__(self) -> None:
        import brotli

        self._obj = brotli.Decompressor()

    def decode(self, data: bytes) -> bytes:
        return self._obj.process(data) if data else b""

    def flush(self) -> bytes:
        return b""


class _Zstd:
    def __init__(self) -> None:
        import zstandard

        self._obj = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)

    def decode(self, data: bytes) -> bytes:
        return self._obj.decompress(data) if data else b""

    def flush(self) -> bytes:
        return b""


def _stage(coding: str) -> Any:
    if coding in ("gzip", "x-gzip"):
        return _Zlib("gzip")
    if coding == "deflate":
        return _Zlib("deflate")
    if coding == "br":
        return _Brotli()
    if coding == "zstd":
        return _Zstd()
    raise ValueError(coding)


class Decoder:
    """Incremental Content-Encoding decoder for the metering side copy.  Never raises."""

    def __init__(self, content_encoding: str | bytes | None, *, max_output: int = MAX_DECODED) -> None:
        if isinstance(content_encoding, (bytes, bytearray)):
            content_encoding = content_encoding.decode("latin-1")
        codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
        codings = [c for c in codings if c and c != "identity"]
        self.failed = False
        self.max_output = max_output
        self._out = 0
        self._stages: list[Any] = []
        try:
            # Applied in the order listed, so undone in reverse.
            self._stages = [_stage(c) for c in reversed(codings)]
        except Exception:
            self.failed = True

    @property
    def identity(self) -> bool:
        return not self._stages and not self.failed

    def _run(self, data: bytes, flush: bool) -> bytes:
        if self.failed:
            return b""
        try:
            for st in self._stages:
                data = st.decode(data)
                if flush:
                    data += st.flush()
        except Exception:
            self.failed = True
            return b""
        self._out += len(data)
        if self._out > self.max_output:
            # A decompression bomb or a huge body: metering is not worth the memory.
            self.failed = True
            return b""
        return data

    def decode(self, chunk: bytes) -> bytes:
        return self._run(bytes(chunk), False)

    def flush(self) -> bytes:
        return self._run(b"", True)


# ---------------------------------------------------------------- parsing


def _count(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and 0 <= value < 2**63:
        return int(value)
    return None


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _mode_for(content_type: str | bytes | None) -> str | None:
    if isinstance(content_type, (bytes, bytearray)):
        content_type = content_type.decode("latin-1")
    ct = (content_type or "").split(";", 1)[0].strip().lower()
    if ct == "text/event-stream":
        return "sse"
    if "ndjson" in ct or "jsonl" in ct or "json-seq" in ct:
        return "ndjson"
    if ct == "application/json" or ct.endswith("+json"):
        return "json"
    return None


class UsageParser:
    """Feed decoded response bytes in any chunking; read :class:`Usage` at the end.  Never raises."""

    def __init__(
        self,
        content_type: str | bytes | None = None,
        *,
        request_bytes: int = 0,
        max_line: int = MAX_LINE,
        max_body: int = MAX_BODY,
    ) -> None:
        self.request_bytes = max(0, int(request_bytes))
        self.max_line = max_line
        self.max_body = max_body
        self._mode = _mode_for(content_type)
        self._sniff = b""
        self._buf = bytearray()
        self._skipping = False
        self._first_line = True
        self._body = bytearray()
        self._body_bytes = 0
        self._body_overflow = False
        # SSE event being assembled.
        self._event: bytes = b""
        self._data: list[bytes] = []
        self._data_len = 0
        self._chunks = 0
        # What we know so far.
        self._fields: dict[str, int] = {}
        self._source = ""
        self._seen = False
        self._final = False
        self._finished: Usage | None = None

    # -- input -----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self._finished is not None or not data:
            return
        try:
            self._feed(bytes(data))
        except Exception:  # pragma: no cover - defensive: metering must never break a relay
            self._mode = "dead"

    def _feed(self, data: bytes) -> None:
        if self._mode is None:
            self._sniff += data
            stripped = self._sniff.lstrip()
            if stripped.startswith(b"\xef\xbb\xbf"):
                stripped = stripped[3:].lstrip()
            if not stripped or b"\xef\xbb\xbf".startswith(stripped):
                # Nothing yet, or only part of a byte order mark: wait for more.
                return
            self._mode = "json" if stripped[:1] in (b"{", b"[") else "sse"
            data, self._sniff = self._sniff, b""
        if self._mode == "json":
            self._body_bytes += len(data)
            if not self._body_overflow:
                if len(self._body) + len(data) > self.max_body:
                    self._body_overflow = True
                    self._body = bytearray()
                else:
                    self._body += data
            return
        if self._mode in ("sse", "ndjson"):
            self._split_lines(data)

    def _split_lines(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = bytes(buf[start:nl])
            start = nl + 1
            if self._skipping:
                self._skipping = False
                continue
            self._line(line)
        del buf[:start]
        if len(buf) > self.max_line:
            # This line is too long whatever follows: drop it now, and the
            # rest of it up to the next newline.
            buf.clear()
            self._skipping = True

    def _line(self, line: bytes) -> None:
        if len(line) > self.max_line:
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._first_line:
            self._first_line = False
            if line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
        if self._mode == "ndjson":
            if line.strip():
                self._chunks += 1
                self._document(line, b"")
            return
        # SSE.
        if not line:
            self._dispatch()
            return
        if line.startswith(b":"):
            return
        name, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._data_len += len(value) + 1
        elif name == b"event":
            self._event = value

    def _dispatch(self) -> None:
        data, event = self._data, self._event
        size = self._data_len
        self._data, self._event, self._data_len = [], b"", 0
        if not data or size > MAX_EVENT:
            return
        payload = b"\n".join(data)
        if payload.strip() == b"[DONE]":
            return
        self._chunks += 1
        self._document(payload, event)

    def _document(self, payload: bytes, event: bytes) -> None:
        if not any(h in payload for h in _USAGE_HINTS):
            return
        try:
            obj = json.loads(payload)
        except Exception:
            return
        if isinstance(obj, dict):
            self._interpret(obj, event.decode("latin-1").strip())

    # -- interpretation --------------------------------------------------------------

    def _take(self, fields: dict[str, int], source: str, *, final: bool, replace: bool) -> None:
        if not fields:
            return
        if replace:
            self._fields = dict(fields)
        else:
            self._fields.update(fields)
        self._source = self._source or source
        self._seen = True
        self._final = self._final or final

    @staticmethod
    def _anthropic(u: Any) -> dict[str, int]:
        out = {}
        for key, name in (
            ("input_tokens", "input"),
            ("output_tokens", "output"),
            ("cache_creation_input_tokens", "cache_creation"),
            ("cache_read_input_tokens", "cache_read"),
        ):
            v = _count(_get(u, key))
            if v is not None:
                out[name] = v
        return out

    @staticmethod
    def _openai(u: Any) -> dict[str, int]:
        """A complete OpenAI-style usage object (chat, responses, vLLM), made disjoint."""
        inp = _count(_get(u, "prompt_tokens"))
        if inp is None:
            inp = _count(_get(u, "input_tokens"))
        out = _count(_get(u, "completion_tokens"))
        if out is None:
            out = _count(_get(u, "output_tokens"))
        if inp is None and out is None:
            return {}
        cached = _count(_get(u, "prompt_tokens_details", "cached_tokens"))
        if cached is None:
            cached = _count(_get(u, "input_tokens_details", "cached_tokens"))
        cached = min(cached or 0, inp or 0)
        return {
            "input": (inp or 0) - cached,
            "output": out or 0,
            "cache_creation": 0,
            "cache_read": cached,
        }

    def _interpret(self, obj: dict[str, Any], event: str) -> None:
        kind = obj.get("type")
        if not isinstance(kind, str):
            kind = event
        if kind == "message_start":
            self._take(self._anthropic(_get(obj, "message", "usage")), "anthropic", final=False, replace=False)
            return
        if kind == "message_delta":
            self._take(self._anthropic(obj.get("usage")), "anthropic", final=True, replace=False)
            return
        if kind == "message" and isinstance(obj.get("usage"), dict):
            # Anthropic non-streaming body.
            self._take(self._anthropic(obj["usage"]), "anthropic", final=True, replace=False)
            return
        if kind.startswith("response."):
            if kind in _TERMINAL_RESPONSES:
                u = _get(obj, "response", "usage")
                self._take(self._openai(u), "openai_responses", final=True, replace=True)
            return
        if obj.get("object") == "response":
            self._take(self._openai(obj.get("usage")), "openai_responses", final=True, replace=True)
            return
        if "done" in obj and ("eval_count" in obj or "prompt_eval_count" in obj):
            if obj.get("done") is True:
                fields = {}
                p = _count(obj.get("prompt_eval_count"))
                e = _count(obj.get("eval_count"))
                if p is not None:
                    fields["input"] = p
                if e is not None:
                    fields["output"] = e
                if fields:
                    fields.setdefault("input", 0)
                    fields.setdefault("output", 0)
                    fields.update(cache_creation=0, cache_read=0)
                self._take(fields, "ollama", final=True, replace=True)
            return
        if isinstance(obj.get("type"), str):
            # A typed event we do not know (Anthropic/Responses): skip it, even
            # if it has a "usage"; chat chunks and bodies carry no "type".
            return
        u = obj.get("usage")
        if isinstance(u, dict):
            self._take(self._openai(u), "openai_chat", final=True, replace=True)

    # -- output -----------------------------------------------------------------

    @property
    def chunks(self) -> int:
        return self._chunks

    def _estimate_output(self) -> int:
        if self._mode == "json" or self._body_bytes:
            # A body (even one that fell back to JSON lines at finish).
            return self._body_bytes // 4
        return self._chunks

    def result(self) -> Usage:
        """The best answer so far (final after :meth:`finish`)."""
        if self._finished is not None:
            return self._finished
        f = self._fields
        if not self._seen:
            return Usage(
                input_tokens=self.request_bytes // 4,
                output_tokens=self._estimate_output(),
                estimated=True,
                source="estimate",
            )
        output = f.get("output", 0)
        estimated = not self._final
        if estimated:
            output = max(output, self._chunks)
        return Usage(
            input_tokens=f.get("input", 0),
            output_tokens=output,
            cache_creation_input_tokens=f.get("cache_creation", 0),
            cache_read_input_tokens=f.get("cache_read", 0),
            estimated=estimated,
            source=self._source,
        )

    def finish(self) -> Usage:
        """End of body: process what is left and freeze the result.  Idempotent."""
        if self._finished is not None:
            return self._finished
        try:
            self._finish()
        except Exception:  # pragma: no cover - defensive
            pass
        self._finished = self.result()
        return self._finished

    def _finish(self) -> None:
        if self._mode is None:
            return
        if self._mode == "json":
            body = bytes(self._body)
            self._body = bytearray()
            if self._body_overflow or not body.strip():
                return
            try:
                obj = json.loads(body)
            except Exception:
                # Not one document: JSON lines sent as application/json.
                self._mode = "ndjson"
                self._split_lines(body)
                self._finish_lines()
                return
            if isinstance(obj, dict):
                self._interpret(obj, "")
            return
        self._finish_lines()

    def _finish_lines(self) -> None:
        rest = bytes(self._buf)
        self._buf = bytearray()
        if rest and not self._skipping:
            self._line(rest)
        if self._mode == "sse":
            # A stream cut without its final blank line still counts.
            self._dispatch()


class UsageMeter:
    """Decoder + parser: tee raw (possibly compressed) response chunks into it."""

    def __init__(
        self,
        content_type: str | bytes | None = None,
        content_encoding: str | bytes | None = None,
        *,
        request_bytes: int = 0,
    ) -> None:
        self.decoder = Decoder(content_encoding)
        self.parser = UsageParser(content_type, request_bytes=request_bytes)
        self.raw_bytes = 0

    def feed(self, raw: bytes) -> None:
        self.raw_bytes += len(raw)
        if not self.decoder.failed:
            self.parser.feed(self.decoder.decode(raw))

    def finish(self) -> Usage:
        if not self.decoder.failed:
            self.parser.feed(self.decoder.flush())
        usage = self.parser.finish()
        if self.decoder.failed and not usage.estimated and usage.source == "":
            return attrs.evolve(usage, estimated=True)
        return usage

    def result(self) -> Usage:
        return self.parser.result()
