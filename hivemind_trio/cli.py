"""``hivemind-trio`` command line: serve, status, bench, perf, mock."""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

from .config import ConfigError, load_config
from .logs import configure_logging


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
    configure_logging(config.server.log_level, json_lines=config.server.log_json)
    mock_port = args.mock_port if args.mock else None
    try:
        trio.run(partial(serve, config, mock_port=mock_port))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the port is taken, the address cannot be bound
        print(f"hivemind-trio: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # Raised inside the server's nursery, a bind failure comes wrapped.
        bind, rest = group.split(OSError)
        if bind is None or rest is not None:
            raise
        print(f"hivemind-trio: {_leaves(bind)[0]}", file=sys.stderr)
        return 1
    return 0


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


def _status(args: argparse.Namespace) -> int:
    from .admin.status_cli import run_status

    if args.watch is not None and not args.watch > 0:
        print("hivemind-trio status: --watch needs a positive number of seconds", file=sys.stderr)
        return 2
    return run_status(args.url, token=args.token or None, watch=args.watch, events=args.events, as_json=args.json)


def _bench(args: argparse.Namespace) -> int:
    from .sim.bench import run_bench_from_args

    return run_bench_from_args(args)


def _perf(args: argparse.Namespace) -> int:
    from .sim.perf import run_perf_from_args

    return run_perf_from_args(args)


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

    st = sub.add_parser("status", help="print the live status of a running proxy (lanes, agents, events)")
    st.add_argument(
        "--url",
        default=os.environ.get("HIVEMIND_URL", "http://127.0.0.1:8765"),
        help="the proxy's base URL (default: $HIVEMIND_URL or http://127.0.0.1:8765)",
    )
    st.add_argument(
        "--token",
        default=os.environ.get("HIVEMIND_ADMIN_TOKEN"),
        help="admin token, sent as Authorization: Bearer (default: $HIVEMIND_ADMIN_TOKEN)",
    )
    st.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="refresh in place every SECONDS (default 2) until Ctrl-C",
    )
    st.add_argument("--events", type=int, default=10, metavar="N", help="recent scheduler events to show (default 10)")
    st.add_argument("--json", action="store_true", help="print the raw status JSON instead of tables")
    st.set_defaults(func=_status)

    from .sim.bench import add_bench_arguments

    b = sub.add_parser("bench", help="reproduce the paper's evaluation: scenarios direct vs through the proxy, against the mock")
    add_bench_arguments(b)
    b.set_defaults(func=_bench)

    from .sim.perf import add_perf_arguments

    pf = sub.add_parser(
        "perf",
        help="measure SPEC §9's overhead, throughput and scale: mock and proxy as real processes on loopback",
    )
    add_perf_arguments(pf)
    pf.set_defaults(func=_perf)

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
