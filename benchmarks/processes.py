"""Start, pin, watch and stop the server processes a benchmark measures (loopback only)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

SERVER_CORE = 0
CLIENT_CORE = 1


def pin(pid: int, cores: set[int]) -> None:
    """Every thread of `pid` onto `cores` (sched_setaffinity on a pid moves only its main thread)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(task.name), cores)


def all_cores() -> set[int]:
    return set(range(os.cpu_count() or 1))


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


class Server:
    """One uvicorn worker, pinned to SERVER_CORE from its first instruction."""

    def __init__(self, factory: str, port: int, env: dict[str, str], log: Path, cwd: Path | None = None,
                 python: Path | None = None) -> None:
        """`cwd`: the source tree to serve (its `service` package), by default this one; `python`: the
        interpreter (and so the installed dependencies), by default this one's."""
        self.port = port
        self.log = log
        cmd = [str(python or sys.executable), "-m", "uvicorn", factory, "--factory", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1", "--no-access-log", "--log-level", "warning"]
        self.command = " ".join(cmd[1:])
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, stdout=self._log_file, stderr=subprocess.STDOUT, cwd=cwd,
            preexec_fn=lambda: os.sched_setaffinity(0, {SERVER_CORE}),
        )

    def wait_ready(self, timeout: float) -> float:
        """Seconds until /readyz answers 200."""
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1.0).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s; see {self.log}")

    def rss_mb(self) -> tuple[float, float]:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
