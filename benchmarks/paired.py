"""/recommend load on the service alternated with the same load on the HTTP floor (benchmarks/serve.py).

This VM's speed drifts by tens of percent within a minute, so a ratio of two windows a minute apart
says as much about the drift as about the service: each ratio here compares neighbouring windows.
"""

from __future__ import annotations

from benchmarks.in_process import K
from benchmarks.load import LoadResult, run_load

CONCURRENCY = 16
PAIRS = 5  # alternated load windows of the service and the floor


def recommend_load(port: int, users: list[str], seconds: float) -> LoadResult:
    return run_load(port, lambda j: ("GET", f"/recommend?user={users[j % len(users)]}&k={K}", None),
                    concurrency=CONCURRENCY, seconds=seconds, warmup=100)


def floor_load(port: int, seconds: float) -> LoadResult:
    return run_load(port, lambda j: ("GET", f"/recommend?user=u{j % 500}&k={K}", None),
                    concurrency=CONCURRENCY, seconds=seconds, warmup=100)


def paired_load(
    port: int, floor_port: int, users: list[str], seconds: float
) -> tuple[LoadResult, LoadResult, list[float]]:
    """Windows of the service and of the HTTP floor, alternated PAIRS times (both servers stay up,
    pinned to the same core, one idle while the other is loaded). Returns the pooled service and
    floor results and each pair's throughput ratio."""
    ours, floor, ratios = LoadResult(), LoadResult(), []
    for _ in range(PAIRS):
        a, b = recommend_load(port, users, seconds), floor_load(floor_port, seconds)
        ratios.append(a.throughput / b.throughput)
        for pooled, window in ((ours, a), (floor, b)):
            pooled.latencies += window.latencies
            pooled.errors += window.errors
            pooled.seconds += window.seconds
            pooled.client_cpu += window.client_cpu
    return ours, floor, ratios
