"""A small closed-loop HTTP/1.1 load generator on raw asyncio streams (keep-alive, loopback only).

Why not httpx: its per-request Python overhead (~0.3 ms) would make one client core the
bottleneck before a one-core server is. Here a request costs a few microseconds of parsing, so
the client core stays mostly idle and the server is what gets measured.

Every connection sends its next request as soon as the previous response is complete (16
connections = 16 concurrent clients); latency is measured per request, from write to last byte.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Request = tuple[str, str, bytes | None]  # (method, path with query, JSON body or None)
NextRequest = Callable[[int], Request]  # request number -> request


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, one per completed request
    errors: int = 0  # non-2xx responses
    seconds: float = 0.0  # wall time of the measured window
    client_cpu: float = 0.0  # CPU seconds this process spent, to show the client was not saturated
    bodies: list[bytes] = field(default_factory=list)  # kept only when asked

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def throughput(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def summary(self) -> dict[str, float]:
        return {
            "requests": self.count, "errors": self.errors, "seconds": round(self.seconds, 3),
            "throughput_rps": round(self.throughput, 1),
            "p50_ms": round(1e3 * self.percentile(50), 3), "p90_ms": round(1e3 * self.percentile(90), 3),
            "p99_ms": round(1e3 * self.percentile(99), 3),
            "max_ms": round(1e3 * max(self.latencies, default=float("nan")), 3),
            "client_cpu_share": round(self.client_cpu / self.seconds, 3) if self.seconds else 0.0,
        }


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, host)

    async def send(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        header = await self.reader.readuntil(b"\r\n\r\n")
        status = int(header[9:12])
        length = 0
        for line in header.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
                break
        payload = await self.reader.readexactly(length) if length else b""
        return status, payload

    def close(self) -> None:
        self.writer.close()


async def _run(
    host: str, port: int, next_request: NextRequest, concurrency: int, total: int | None, seconds: float | None,
    warmup: int, keep_bodies: bool,
) -> LoadResult:
    result = LoadResult()
    connections = [await Connection.open(host, port) for _ in range(concurrency)]
    issued = 0

    def take() -> int | None:
        nonlocal issued
        if total is not None and issued >= total + warmup:
            return None
        if seconds is not None and started is not None and time.perf_counter() - started > seconds:
            return None
        issued += 1
        return issued - 1

    started: float | None = None
    for number in range(warmup):  # not measured: first-request costs, thread pool spin-up
        await connections[number % concurrency].send(*next_request(number))
    issued = warmup
    cpu0 = time.process_time()
    started = time.perf_counter()

    async def worker(conn: Connection) -> None:
        while (number := take()) is not None:
            method, path, body = next_request(number)
            t0 = time.perf_counter()
            status, payload = await conn.send(method, path, body)
            result.latencies.append(time.perf_counter() - t0)
            if status >= 300:
                result.errors += 1
            if keep_bodies:
                result.bodies.append(payload)

    await asyncio.gather(*(worker(c) for c in connections))
    result.seconds = time.perf_counter() - started
    result.client_cpu = time.process_time() - cpu0
    for conn in connections:
        conn.close()
    return result


def run_load(
    port: int, next_request: NextRequest, *, concurrency: int = 16, total: int | None = None,
    seconds: float | None = None, warmup: int = 50, keep_bodies: bool = False, host: str = "127.0.0.1",
) -> LoadResult:
    """Closed loop: stop after `total` measured requests or `seconds`, whichever comes first."""
    if total is None and seconds is None:
        raise ValueError("bound the run by total requests or seconds")
    return asyncio.run(_run(host, port, next_request, concurrency, total, seconds, warmup, keep_bodies))


def request_once(port: int, method: str, path: str, body: object | None = None,
                 host: str = "127.0.0.1") -> tuple[int, object, float]:
    """One request on a fresh connection: (status, decoded JSON, seconds)."""

    async def go() -> tuple[int, object, float]:
        conn = await Connection.open(host, port)
        t0 = time.perf_counter()
        status, payload = await conn.send(method, path, None if body is None else json.dumps(body).encode())
        elapsed = time.perf_counter() - t0
        conn.close()
        return status, json.loads(payload) if payload else None, elapsed

    return asyncio.run(go())
