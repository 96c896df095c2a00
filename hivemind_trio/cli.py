"""``hivemind-trio`` command line: serve, mock."""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial

from .config import ConfigError, load_config


def _serve(args: argparse.Namespace) -> int:
    import trio

    from .runtime.serve import serve

    overrides: dict[str, object] = {}
    if args.upstream is not None and args.mock:
        print("hivemind-trio: --mock and --upstream exclude each other", file=sys.stderr)
        return 2
    if args.upstream is not None:
        overrides["upstream"] = args.upstream
    if args.host is not None:
        overrides["server.host"] = args.host
    if args.port is not None:
        overrides["server.port"] = args.port
    if args.log_json:
        overrides["server.log_json"] = True
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"hivemind-trio: invalid configuration: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    mock_port = args.mock_port if args.mock else None
    try:
        trio.run(partial(serve, config, mock_port=mock_port))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the port is taken, the address cannot be bound
        print(f"hivemind-trio: {exc}", file=sys.stderr)
        return 1
    return 0


def _mock(args: argparse.Namespace) -> int:
    from .sim.mock import run_mock_from_args

    return run_mock_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hivemind-trio",
        description="A transparent scheduling proxy for fleets of LLM agents.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the proxy (Hypercorn, trio worker)")
    p.add_argument("--config", metavar="FILE", help="TOML config file (default: $HIVEMIND_CONFIG)")
    p.add_argument("--upstream", metavar="URL", help="send every request to this upstream")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8765)")
    p.add_argument("--log-json", action="store_true", help="log JSON lines")
    p.add_argument(
        "--mock",
        action="store_true",
        help="also start the built-in mock provider (no limits, no faults) and send every request to it",
    )
    p.add_argument("--mock-port", type=int, default=8766, metavar="P", help="port of the --mock provider (default 8766)")
    p.set_defaults(func=_serve)

    from .sim.mock import add_mock_arguments

    m = sub.add_parser("mock", help="run the mock LLM provider (Anthropic/OpenAI/Ollama formats)")
    add_mock_arguments(m)
    m.set_defaults(func=_mock)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
