"""The real service as a subprocess (`python -m service`, uvicorn) on a free loopback port.

Tests that need a real process boundary (HTTP over a socket, kill -9, restart on the same store)
start one with `LiveServer(env).start()`; `stop()` ends it gracefully, `kill()` sends SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 90.0  # seconds; start-up loads torch, the artifact and rebuilds the index


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class ServerDiedError(RuntimeError):
    """The subprocess exited before it was ready; the message carries its output."""


class LiveServer:
    def __init__(self, env: dict[str, str], port: int | None = None) -> None:
        """`env`: M2REC_* settings; host and port are chosen here (loopback, a free port)."""
        self.port = port if port is not None else free_port()
        # inherited M2REC_* settings (an API key, a store URL) would change what the test runs against
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("M2REC_")}
        self.env = {**inherited, **env, "M2REC_HOST": "127.0.0.1", "M2REC_PORT": str(self.port)}
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        """Start and wait for /readyz 200; ServerDiedError (with the log) if the process exits first."""
        if self.process is not None:
            raise RuntimeError("already started")
        # a file, not a pipe: a pipe nobody reads fills up and blocks the server; closed by _close()
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=self.env,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerDiedError(f"service exited with {self.process.returncode} before it was ready:\n"
                                 f"{self.output()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise ServerDiedError(f"service not ready after {READY_TIMEOUT} s:\n{self.output()}")

    def output(self) -> str:
        """Everything the server printed so far (uvicorn's log, tracebacks)."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL, no shutdown hooks: what a crash or the OOM killer does."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self._close()

    def stop(self) -> None:
        """SIGTERM (uvicorn's graceful shutdown runs the lifespan's end); SIGKILL if it hangs."""
        if self.process is not None:
            stop_process(self.process)
        self._close()

    def _close(self) -> None:
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (uvicorn's graceful shutdown runs the lifespan's end); SIGKILL if it hangs."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def wait_for(predicate: Callable[[], bool], seconds: float, every: float = 0.02) -> bool:
    """Poll `predicate` until it holds or `seconds` pass; whether it held."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


def wait_until_ready(process: subprocess.Popen[bytes], ready_url: str, seconds: float, why: Callable[[], str]) -> None:
    """Poll `ready_url` until it answers 200; fail with `why()` if the process exits first."""
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, why()
        try:
            if httpx.get(ready_url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{ready_url} was not ready within {seconds} s"
        time.sleep(0.2)
