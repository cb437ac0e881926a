"""Redis memory per stored thing, and the store's write/read times, on one Redis and on a 3-master
Redis Cluster, both started here on free loopback ports (redis-server 7, AOF fsync every second as
docker-compose runs it). Writes benchmarks/results/store-cluster.md.

    .venv/bin/python -m benchmarks.store_cluster --out benchmarks/results/store-cluster.md

Memory is `MEMORY USAGE <key> SAMPLES 0` (exact, every element) of the keys the stores write: an
item record, the bucket id sets, histories and seen overflows of given lengths, the users index. Times are
the stores' own methods (RedisStore, RedisClusterStore) called from one Python thread on loopback.
The whole-catalogue comparison times count_items and a full iter_items over the bucket id sets
against a SCAN of every master for item keys, with users' keys beside the items as in production.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import redis
from redis.cluster import RedisCluster

from service.store import Interaction, ItemRecord
from service.store.redis import RedisStore
from service.store.redis_cluster import RedisClusterStore
from tests.redis_cluster import RedisClusterProcesses, free_cluster_ports

CONTENT_DIM = 384  # ml-100k's content vectors (MiniLM title embeddings)
EMBEDDING_DIM = 129  # the full model's row [v; b], D = 128
ATTRIBUTES = ["genre:Action", "genre:Adventure", "genre:Sci-Fi", "year:1990s"]
HISTORY_LENGTHS = [1, 10, 50, 128, 129, 500]
OVERFLOW_LENGTHS = [500, 1_000, 5_000, 9_500]  # seen items beyond a full 500-item history; 9,500: the cap


def item(item_id: str, rng: np.random.Generator, content: bool = True) -> ItemRecord:
    vector = rng.normal(size=CONTENT_DIM).astype(np.float32).tolist() if content else None
    return ItemRecord(item_id, ATTRIBUTES, vector, rng.normal(size=EMBEDDING_DIM).astype(np.float32),
                      "20261201T000000-abcd1234", time.time())


def movie_id(n: int) -> str:
    return f"movie:{n:07d}"  # 13 bytes: a typical registered id


@contextmanager
def single_redis(directory: Path) -> Iterator[str]:
    (port,) = free_cluster_ports(1)
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--appendonly", "yes",
         "--appendfsync", "everysec", "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """(p50, p95) milliseconds."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def used_memory(client: Any) -> int:
    """INFO used_memory, summed over the masters of a cluster."""
    if isinstance(client, redis.Redis):
        return int(client.info("memory")["used_memory"])
    per_master = client.info("memory", target_nodes=RedisCluster.PRIMARIES)
    return sum(int(node["used_memory"]) for node in per_master.values())


def usage(client: Any, key: str) -> int:
    """0 for a key that does not exist (a user without seen overflow)."""
    return int(client.memory_usage(key, samples=0) or 0)


def memory(store: RedisStore, client: Any, label: str, rng: np.random.Generator) -> list[str]:
    rows = [f"### Memory, {label} (measured: MEMORY USAGE SAMPLES 0)", "",
            "| what | bytes |", "|---|---|"]
    ids = [movie_id(n) for n in range(2_000)]
    for start in range(0, len(ids), 500):
        store.put_items([item(i, rng) for i in ids[start : start + 500]])
    per_item = statistics.mean(usage(client, store.keys.item(i)) for i in ids[:500])
    store.put_items([item("no-content", rng, content=False)])
    sets = store.keys.item_sets
    set_bytes = sum(usage(client, k) for k in sets if client.exists(k))
    rows += [f"| item record (hash): {len(ATTRIBUTES)} attributes, content {CONTENT_DIM} + embedding {EMBEDDING_DIM} "
             f"float32 | {per_item:,.0f} |",
             f"| item record without content | {usage(client, store.keys.item('no-content')):,} |",
             f"| item id sets, per item ({len(ids) + 1:,} items in {sum(1 for k in sets if client.exists(k))} "
             f"set(s)) | {set_bytes / (len(ids) + 1):,.1f} |"]
    for n, length in enumerate(HISTORY_LENGTHS):
        user = f"hist-user-{n}"
        store.add_interactions([Interaction(user, movie_id(t), float(t)) for t in range(length)])
        rows.append(f"| history of {length} entries (zset{', listpack' if length <= 128 else ', skiplist'}) | "
                    f"{usage(client, store.keys.hist(user)):,} |")
    for n, length in enumerate(OVERFLOW_LENGTHS):
        user = f"seen-user-{n}"
        total = 500 + length
        for start in range(0, total, 1000):
            store.add_interactions([Interaction(user, movie_id(t), float(t))
                                    for t in range(start, min(total, start + 1000))])
        rows.append(f"| seen overflow of {length:,} entries (a user with {total:,} distinct items: history 500 + "
                    f"overflow) | {usage(client, store.keys.seen(user)):,} |")
    users = [f"user-{n:07d}" for n in range(5_000)]
    before = used_memory(client)
    store.add_interactions([Interaction(u, movie_id(1), 1.0) for u in users])
    per_user_total = (used_memory(client) - before) / len(users)
    user_sets = {store.keys.user_set(u) for u in users}
    index_bytes = sum(usage(client, k) for k in user_sets)
    total_users = sum(int(client.zcard(k)) for k in user_sets)
    rows.append(f"| users index, per user ({total_users:,} users) | {index_bytes / total_users:,.1f} |")
    one = usage(client, store.keys.hist(users[0])) + usage(client, store.keys.seen(users[0]))
    rows.append(f"| a user with 1 interaction: history (no seen overflow key) | {one:,} |")
    rows.append(f"| the same, whole-server `used_memory` growth per user (keyspace and expiry entries, users "
                f"index; {len(users):,} users) | {per_user_total:,.0f} |")
    events = int(client.xlen(store.keys.events))
    rows.append(f"| event stream, per entry ({events:,} entries) | {usage(client, store.keys.events) / events:,.1f} |")
    return [*rows, ""]


def open_store(url: str, ns: str, cluster: bool) -> RedisStore:
    return (RedisClusterStore if cluster else RedisStore).from_url(url, namespace=ns)


def latency(store: RedisStore, label: str, rng: np.random.Generator) -> list[str]:
    rows = [f"### Times, {label} (measured, ms)", "", "| call | p50 | p95 |", "|---|---|---|"]
    counter = iter(range(10**9))

    def row(what: str, fn: Callable[[], Any], repeat: int) -> None:
        p50, p95 = timed(fn, repeat)
        rows.append(f"| {what} | {p50:.2f} | {p95:.2f} |")

    singles = iter([item(f"lat:{next(counter)}", rng) for _ in range(300)])
    row("put_items, 1 item", lambda: store.put_items([next(singles)]), 300)
    batches = iter([[item(f"lat:{next(counter)}", rng) for _ in range(100)] for _ in range(20)])
    row("put_items, 100 items", lambda: store.put_items(next(batches)), 20)
    row("add_interactions, 1 interaction",
        lambda: store.add_interactions([Interaction(f"lu-{next(counter)}", "x", 1.0)]), 300)
    row("add_interactions, 1,000 interactions of 1,000 users",
        lambda: store.add_interactions([Interaction(f"lu-{next(counter)}", "x", 1.0) for _ in range(1000)]), 20)
    users = [f"lu-{n}" for n in range(32)]
    row("get_histories, 32 users", lambda: store.get_histories(users), 200)
    for t in range(0, 10_000, 1000):
        store.add_interactions([Interaction("heavy", movie_id(n), float(n)) for n in range(t, t + 1000)])
    row("get_seen, 1 user with 10,000 seen (history 500 + overflow 9,500)", lambda: store.get_seen(["heavy"]), 50)
    ids = [f"lat:{n}" for n in range(32)]
    row("get_items, 32 items", lambda: store.get_items(ids), 200)
    return [*rows, ""]


def listpack_tuning(store: RedisStore, client: Any) -> list[str]:
    """Redis keeps a sorted set of at most zset-max-listpack-entries (default 128) members as one
    compact listpack and converts it to a skiplist + dict beyond. What raising it to 512 (all of a
    500-item history) saves, and what it costs a write (a listpack insert is O(N))."""
    rows = ["### One Redis, `zset-max-listpack-entries` (measured)", "",
            "| setting | 500-entry history, bytes | add 1 interaction to it, ms p50 / p95 |", "|---|---|---|"]
    for entries in (128, 512):
        client.config_set("zset-max-listpack-entries", entries)
        user = f"listpack-{entries}"
        store.add_interactions([Interaction(user, movie_id(t), float(t)) for t in range(500)])
        size = usage(client, store.keys.hist(user))
        fresh = iter(range(1000, 10**9))

        def add_one(user: str = user, fresh: Iterator[int] = fresh) -> None:
            n = next(fresh)
            store.add_interactions([Interaction(user, movie_id(n), float(n))])

        p50, p95 = timed(add_one, 200)
        rows.append(f"| {entries} | {size:,} | {p50:.2f} / {p95:.2f} |")
    client.config_set("zset-max-listpack-entries", 128)
    return [*rows, ""]


def transactions_vs_scripts(store: RedisClusterStore, client: Any) -> list[str]:
    """The same history writes for 1,000 users: one MULTI/EXEC per user (what a cluster allows:
    a transaction per slot, each its own round trip) against the store's pipelined scripts."""
    keys = store.cluster_keys

    def transactions() -> None:
        for n in range(1000):
            user = f"tx-{n}"
            pipe = client.pipeline(transaction=True)  # what MULTI can do (no move of pushed-out items)
            pipe.zadd(keys.hist(user), {"x": 1.0}, gt=True)
            pipe.zremrangebyrank(keys.hist(user), 0, -501)
            pipe.zadd(keys.user_set(user), {user: 1.0})
            pipe.execute()

    def scripts() -> None:
        store.add_interactions([Interaction(f"sc-{n}", "x", 1.0) for n in range(1000)])

    rows = ["### One write of 1,000 users' histories on the cluster (measured, ms)", "",
            "| how | p50 | p95 |", "|---|---|---|"]
    for what, fn in (("a MULTI/EXEC per user, one after another", transactions),
                     ("pipelined Lua scripts (RedisClusterStore.add_interactions, with its event)", scripts)):
        p50, p95 = timed(fn, 10)
        rows.append(f"| {what} | {p50:.1f} | {p95:.1f} |")
    return [*rows, ""]


def catalogue(store: RedisClusterStore, client: Any, n_items: int, n_users: int) -> list[str]:
    rng = np.random.default_rng(1)
    emb = rng.normal(size=EMBEDDING_DIM).astype(np.float32)
    for start in range(0, n_items, 1000):
        store.put_items([ItemRecord(f"cat:{n:08d}", ["a"], None, emb, "v", 1.0) for n in range(start, start + 1000)])
    for start in range(0, n_users, 1000):
        store.add_interactions([Interaction(f"cu-{n}", "cat:00000000", 1.0) for n in range(start, start + 1000)])
    keys_total = sum(int(n.redis_connection.dbsize()) for n in client.get_primaries())
    rows = ["### Whole catalogue on the cluster (measured, seconds)", "",
            f"{n_items:,} items (no content) and {n_users:,} users of this namespace; {keys_total:,} keys on the 3 "
            "masters in all (the other sections' namespaces too): a SCAN reads every key, the bucket sets only "
            "the items.", "",
            "| what | seconds |", "|---|---|"]
    pattern = f"m2rec:{{{store.cluster_keys.namespace}/i/*}}:item:*"
    t = time.perf_counter()
    count = store.count_items()
    rows.append(f"| count_items: ZCARD of the 1024 bucket id sets, pipelined | {time.perf_counter() - t:.3f} |")
    t = time.perf_counter()
    scanned = sum(1 for _ in client.scan_iter(match=pattern, count=1000))
    rows.append(f"| the same count by a SCAN of every master for item keys | {time.perf_counter() - t:.3f} |")
    assert count == scanned == n_items
    t = time.perf_counter()
    ids = sum(len(b) for b in store.iter_items(1000))
    rows.append(f"| iter_items: every record in id order (merged bucket pages, HGETALL a batch at a time) | "
                f"{time.perf_counter() - t:.2f} |")
    t = time.perf_counter()
    batch: list[str] = []
    fetched = 0
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key.decode().rpartition("}:item:")[2])
        if len(batch) == 1000:
            fetched += len(store.get_items(batch))
            batch = []
    fetched += len(store.get_items(batch))
    rows.append(f"| every record by a SCAN of every master (unordered), HGETALL a batch at a time | "
                f"{time.perf_counter() - t:.2f} |")
    assert ids == fetched == n_items
    return [*rows, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/store-cluster.md"))
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=200_000)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = ["# Store on Redis and on Redis Cluster: memory and times", "",
             f"{datetime.date.today()}, commit {commit} (+ the working tree it ran in), redis-server "
             f"{redis_version()}, 2 shared cores, loopback. Command:", "",
             f"    .venv/bin/python -m benchmarks.store_cluster --out {args.out} --items {args.items} "
             f"--users {args.users}", ""]
    with tempfile.TemporaryDirectory(prefix="m2rec-store-bench-") as tmp:
        root = Path(tmp)
        (root / "single").mkdir()
        cluster = RedisClusterProcesses(root / "cluster", appendfsync="everysec").start()
        try:
            with single_redis(root / "single") as url:
                for label, target, is_cluster in (("one Redis", url, False), ("3-master cluster", cluster.url, True)):
                    rng = np.random.default_rng(0)
                    client: Any = cluster.client() if is_cluster else redis.Redis.from_url(url)
                    lines += memory(open_store(target, "mem", is_cluster), client, label, rng)
                    lines += latency(open_store(target, "lat", is_cluster), label, rng)
                    if not is_cluster:
                        lines += listpack_tuning(open_store(target, "lp", False), client)
            cstore = open_store(cluster.url, "cat", True)
            assert isinstance(cstore, RedisClusterStore)
            lines += transactions_vs_scripts(cstore, cluster.client())
            lines += catalogue(cstore, cluster.client(), args.items, args.users)
        finally:
            cluster.stop()
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return out.split("v=")[1].split()[0] if "v=" in out else out.strip()


if __name__ == "__main__":
    main()
