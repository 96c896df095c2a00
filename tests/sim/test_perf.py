"""``hivemind-trio perf``, end to end on small sizes, plus its pure helpers.

The end-to-end test starts the real processes (mock, proxy) on loopback and
asserts only what cannot be noise: every request succeeded, no errors, every
field of the report is there, events were never batched (the mock spaces
them 50 ms apart at concurrency 1), every queued request was queued and then
served.  No latency, rate or memory figure is asserted: those are
measurements of the machine that runs them.

perf calls ``trio.run`` per measurement, so these tests are synchronous.
"""

from __future__ import annotations

import json
import sys

import pytest

from hivemind_trio.cli import main as cli_main
from hivemind_trio.sim.perf import (
    MODES,
    PerfError,
    Reply,
    _count_events,
    main,
    options_from_args,
    paired_event_delays,
    percentile,
    stream_lateness,
)

SMALL = ["--quick", "--requests", "100", "--streaming-requests", "5", "--event-spacing", "0.05",
         "--duration", "1", "--streams", "50", "--stream-events", "10", "--queued", "300"]

SUMMARY = {"n", "p50", "p99", "mean", "max"}


def _no_errors(errors: dict[str, int]) -> bool:
    return sum(errors.values()) == 0


def test_quick_perf_end_to_end(tmp_path, capsys):
    rc = main([*SMALL, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0
    assert out.startswith("command: hivemind-trio perf overhead throughput streams queue --quick --requests 100")
    report = json.loads((tmp_path / "perf.json").read_text())
    assert set(MODES) <= set(report) and report["command"] in out

    o = report["overhead"]
    assert set(o["targets"]) == {"direct", "hivemind_trio"}
    for name, t in o["targets"].items():
        assert t["ok"] == 100 and _no_errors(t["errors"]), (name, t["errors"])
        assert t["streams_complete"] == 5, name
        assert t["batched_reads"] == 0 and t["event_reads"] == t["events"] > 0, name
        assert set(t["latency_ms"]) == SUMMARY and t["latency_ms"]["n"] == 100, name
        assert t["first_event_ms"]["n"] == 5 and t["cpu_ms_per_request"] >= 0, name
    ours = o["targets"]["hivemind_trio"]
    assert ours["added_ms"]["n"] == 100 and ours["first_event_added_ms"]["n"] == 5

    for name, t in report["throughput"]["targets"].items():
        assert t["ok"] > 0 and _no_errors(t["errors"]), (name, t["errors"])
        assert {"requests_per_s", "latency_ms", "cpu_cores", "lane_windows_at_end"} <= set(t)

    s = report["streams"]["targets"]["hivemind_trio"]
    assert s["streams"] == 50 and s["complete"] == 50, s
    assert _no_errors(s["errors"]) and _no_errors(s["probe_errors"]), s
    assert s["events_per_stream"] > 10 and s["lateness_ms"]["n"] == 50 * (s["events_per_stream"] - 1)
    assert s["added_delay_ms"]["p99"] is not None and s["rss_peak_mb"] > 0 and s["peak_open"] > 0

    q = report["queue"]
    assert q["ok"] == 300 and _no_errors(q["errors"]), q
    assert q["all_queued_after_s"] is not None and q["peak_queued"] == 300, q

    for row in ("added latency p50 / p99", "CPU per request", "first event added", "reads carrying > 1 event",
                "requests/s", "added per-event delay", "peak RSS", "requests queued at once"):
        assert f"| {row}" in out, row


def test_perf_is_a_cli_subcommand_and_refuses_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["perf", "--requests", "0"])
    assert exc.value.code == 2
    assert "--requests: must be > 0, got '0'" in capsys.readouterr().err
    assert cli_main(["perf", "latency", "--out", str(tmp_path)]) == 2
    assert "unknown mode 'latency'; choose from overhead, throughput, streams, queue" in capsys.readouterr().err


def test_compare_needs_an_interpreter_with_hivemind_scheduler(tmp_path, capsys):
    # This environment has no hivemind-scheduler: refused before anything starts.
    assert main(["overhead", "--compare-hivemind-scheduler", sys.executable, "--out", str(tmp_path)]) == 2
    assert "cannot import hivemind-scheduler" in capsys.readouterr().err
    assert main(["overhead", "--compare-hivemind-scheduler", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "cannot run" in capsys.readouterr().err


def test_options_quick_sizes_yield_to_explicit_flags():
    import argparse

    from hivemind_trio.sim.perf import add_perf_arguments

    parser = argparse.ArgumentParser()
    add_perf_arguments(parser)
    opts = options_from_args(parser.parse_args(["streams", "--quick", "--streams", "70"]))
    assert opts.modes == ("streams",) and opts.streams == 70 and opts.stream_events == 20
    assert "perf streams --quick" in opts.command() and "--streams 70" in opts.command()
    with pytest.raises(PerfError):
        options_from_args(parser.parse_args(["bogus"]))


def test_batched_events_are_counted_per_read():
    reply = Reply()
    _count_events(reply, b"event: a\ndata: {}\n\n", 1.0)
    # The second event's blank line straddles two reads: counted once, when it completes.
    _count_events(reply, b"\n" + b"event: b\ndata: {}\n", 2.0)
    _count_events(reply, b"\n" + b"\nevent: c\ndata: {}\n\nevent: d\ndata: {}\n\n", 3.0)
    assert reply.event_times == [1.0, 3.0, 3.0, 3.0]
    assert reply.event_reads == 2 and reply.batched_reads == 1


def test_percentile_and_lateness():
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([0.0, 10.0], 0.99) == pytest.approx(9.9)
    reply = Reply(event_times=[10.0, 10.21, 10.4, 10.75])
    assert stream_lateness(reply, 0.2) == pytest.approx([0.01, 0.0, 0.15])


def test_event_delays_pair_each_stream_with_the_nearest_probe():
    stop = b"event: message_stop\ndata: {}\n\n"
    # Probes: one drifting 10 ms per event (the mock's own lateness), one on time.
    early = Reply(sent=0.0, status=200, body=stop, event_times=[1.0, 1.51, 2.02])
    late = Reply(sent=10.0, status=200, body=stop, event_times=[11.0, 11.5, 12.0])
    # A proxied stream started next to the drifting probe, each event 3 ms later than it.
    proxied = Reply(sent=1.0, status=200, body=stop, event_times=[2.0, 2.513, 3.023])
    assert paired_event_delays([proxied], [late, early], 0.5) == pytest.approx([0.003, 0.003])
    assert paired_event_delays([proxied], [], 0.5) == []
