"""Logging: one line per request, human-readable or JSON lines (SPEC §7.3).

* :class:`JsonFormatter` writes each record as one JSON object per line: the
  time, level, logger and message, plus every field the call passed with
  ``extra=`` as a top-level key (the per-request line carries ``agent``,
  ``lane``, ``priority``, ``queue_ms``, ``attempts``, ``status``, tokens...).
* :func:`log_request` is the request-record sink (``Runtime.sinks``): the one
  log line per finished request, with its fields both in the message and as
  structured ``extra`` fields.
* :func:`configure_logging` is the CLI's set-up (``hivemind-trio serve``,
  ``--log-json`` / ``server.log_json``): one handler on the root logger, so the
  proxy's, Hypercorn's and httpx's records all come out in the same format.
* :func:`adopt_server_logging` is the set-up under a bare ASGI server
  (``hypercorn -k trio hivemind_trio:app``), called at lifespan start-up: it
  installs a handler only when nobody configured one (``hypercorn
  --log-config`` wins), since without one the per-request INFO lines would be
  dropped by logging's last-resort handler (WARNING and up only).

No credential reaches a log: records carry agent names and lane keys, whose
credential part is a salted fingerprint (core.identity), never a key.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config
    from .runtime.app import RequestRecord

__all__ = [
    "HUMAN_FORMAT",
    "JsonFormatter",
    "adopt_server_logging",
    "configure_logging",
    "log_request",
    "make_formatter",
    "request_fields",
]

#: The human format of ``hivemind-trio serve``.
HUMAN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: The logger of the per-request lines (a child of "hivemind_trio", so its
#: level and handlers apply; set it to WARNING to silence request lines alone).
REQUEST_LOGGER = "hivemind_trio.requests"

request_log = logging.getLogger(REQUEST_LOGGER)

# Attributes every LogRecord has; anything else on a record came from extra=.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

# Hypercorn's own handlers (bare `hypercorn`, no --log-config) use this format.
_HYPERCORN_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601, milliseconds), ``level``,
    ``logger``, ``msg``, the call's ``extra`` fields, and ``exc`` / ``stack``
    (the formatted traceback) when there is one.  Values JSON cannot hold are
    written as their ``str``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False, separators=(",", ":"))


def make_formatter(json_lines: bool) -> logging.Formatter:
    return JsonFormatter() if json_lines else logging.Formatter(HUMAN_FORMAT)


def configure_logging(level: str = "info", *, json_lines: bool = False, stream: IO[str] | None = None) -> logging.Handler:
    """Logging for a process the proxy owns (``hivemind-trio serve``): one
    stream handler (stderr by default) on the root logger, replacing any other."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(make_formatter(json_lines))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    return handler


def adopt_server_logging(config: Config, *, stream: IO[str] | None = None) -> logging.Handler | None:
    """Under a bare ASGI server: give the ``hivemind_trio`` loggers a handler
    (``server.log_level``, ``server.log_json``) if neither they nor the root
    logger have one, so the per-request lines are not lost.

    With ``log_json`` Hypercorn's own default handlers get the JSON formatter
    too, so every line of the process is JSON.  Handlers that someone
    configured (``hypercorn --log-config``, an embedding program) are left
    alone.  Returns the handler added, or None when logging was already set up.
    """
    logger = logging.getLogger("hivemind_trio")
    if logger.hasHandlers():
        return None
    s = config.server
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(make_formatter(s.log_json))
    logger.addHandler(handler)
    logger.setLevel(s.log_level.upper())
    if s.log_json:
        for name in ("hypercorn.error", "hypercorn.access"):
            hc_logger = logging.getLogger(name)
            if not any(isinstance(f, _JsonForHypercorn) for f in hc_logger.filters):
                hc_logger.addFilter(_JsonForHypercorn(hc_logger))
    return handler


class _JsonForHypercorn(logging.Filter):
    """Gives Hypercorn's own default handlers the JSON formatter.  A filter on
    the logger, not a one-off swap: Hypercorn creates (and replaces) those
    handlers when it first logs, which is after the lifespan start-up."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self._logger = logger
        self._json = JsonFormatter()

    def filter(self, record: logging.LogRecord) -> bool:
        for h in self._logger.handlers:
            if getattr(h.formatter, "_fmt", None) == _HYPERCORN_FORMAT:
                h.setFormatter(self._json)
        return True


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def request_fields(rec: RequestRecord) -> dict[str, Any]:
    """The structured fields of one request's log line (the JSON keys)."""
    return {
        "event": "request",
        "method": rec.method,
        "path": rec.path,
        "route": rec.route,
        "lane": rec.lane,
        "agent": rec.agent,
        "priority": rec.priority,
        "status": rec.status or None,
        "attempts": rec.attempts,
        "queue_ms": _ms(rec.queue_s),
        "ttfb_ms": _ms(rec.ttfb_s),
        "total_ms": _ms(rec.total_s),
        "input_tokens": rec.input_tokens,
        "output_tokens": rec.output_tokens,
        "tokens_estimated": rec.estimated,
        "bytes": rec.bytes_sent,
        "client_gone": rec.client_gone,
    }


def log_request(rec: RequestRecord) -> None:
    """The request-record sink: one INFO line per finished request.  Never
    raises (sinks run in the request's ``finally``)."""
    try:
        if not request_log.isEnabledFor(logging.INFO):
            return
        if rec.input_tokens is None and rec.output_tokens is None:
            tokens = "-"
        else:
            tokens = f"{rec.input_tokens or 0}/{rec.output_tokens or 0}{'~' if rec.estimated else ''}"
        request_log.info(
            "%s %s agent=%s lane=%s priority=%s queue_ms=%.1f attempts=%d status=%s tokens=%s bytes=%d ms=%.1f%s",
            rec.method,
            rec.path,
            rec.agent,
            rec.lane,
            rec.priority,
            rec.queue_s * 1000,
            rec.attempts,
            rec.status or "-",
            tokens,
            rec.bytes_sent,
            rec.total_s * 1000,
            " (client gone)" if rec.client_gone else "",
            extra=request_fields(rec),
        )
    except Exception:  # pragma: no cover - a broken record must not break the request
        logging.getLogger("hivemind_trio").exception("cannot log a request record")
