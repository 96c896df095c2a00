"""A real redis-server for the shared-state tests: own port, own temp dir.

Never the system's Redis: each test starts its own server on a free
loopback port (no persistence, so a restart comes back empty, like a Redis
that lost its data), waits for its "Ready to accept connections" log line
(no polling, no sleeps) and kills it at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest


def redis_binary() -> str:
    """The redis-server binary, or skip (fail under CI, where .ci/run installs it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        why = "redis-server is not installed (apt-get install redis-server); the shared-state tests need a real one"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why + " — and CI=true, where .ci/run installs it")
        pytest.skip(why)
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = _free_port()
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--logfile", "", "--daemonize", "no", "--protected-mode", "no"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)
            if "Ready to accept connections" in line:
                break
        else:
            raise RuntimeError("redis-server did not start:\n" + "".join(self.log))
        # Keep draining its log so it can never block on a full pipe.
        self._drainer = threading.Thread(target=self._drain, args=(self.proc,), daemon=True)
        self._drainer.start()

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.log.append(line)

    def stop(self) -> None:
        """Kill it (SIGKILL: a crash, not a shutdown)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self._drainer.join()  # it reads to EOF, which the kill brings
            assert self.proc.stdout is not None
            self.proc.stdout.close()
            self.proc = None
