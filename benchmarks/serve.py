"""Serving benchmark: ingest, /recommend latency and throughput, recall, memory, time to first
recommendation and insert stalls at 10k, 100k and 1M items; one uvicorn worker.

    .venv/bin/python -m benchmarks.serve --artifact /tmp/m2rec-bench/artifacts [--quick]

Make the artifact first: `.venv/bin/python -m benchmarks.make_artifact --out /tmp/m2rec-bench/artifacts`.

Placement: the server is pinned to core 0 from its first instruction and this process (the load
generator, benchmarks/load.py) to core 1 while a server runs, so client and server never share a
core. Catalogues grow in one SQLite file (10k -> 100k -> 1M); each size gets a fresh server that
builds its index from the store at start-up. The HTTP floor (benchmarks/floor_app.py) runs beside it
on the same core, and /recommend load alternates between the two (`paired_load`): throughput / floor
is the median of the pairs' ratios. See benchmarks/results/serve.md for the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import httpx
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from benchmarks.catalogue import (
    SyntheticBatch,
    benchmark_users,
    embed_batch,
    fill_store,
    synthetic_batch,
    write_histories,
)
from benchmarks.in_process import K, recommend_alone, recommend_batched, search_alone, user_queries
from benchmarks.load import Connection, request_once, run_load
from benchmarks.paired import CONCURRENCY, PAIRS, paired_load
from benchmarks.processes import CLIENT_CORE, Server, all_cores, pin
from benchmarks.recall import base_recall
from benchmarks.report import write_report
from service.core.recommender import Recommender
from service.index import IndexConfig, VectorIndex
from service.model.artifact import load_artifact
from service.store import SqliteStore
from training.dataset import Dataset, load_dataset

INGEST_START = 5_000_000  # ids of items posted over HTTP: syn:5000000 and up, never in the catalogue
NPROBES = (4, 8, 16, 32, 64, 128)


@dataclass
class Bench:
    args: argparse.Namespace
    dataset: Dataset
    recommender: Recommender  # in-process, same artifact and store as the server
    store: SqliteStore
    bench_users: dict[str, list[str]]
    calib_users: dict[str, list[str]]
    rows: np.ndarray  # (N, D+1) every catalogue row the server indexes, in `ids` order
    ids: list[str]
    posted: list[str] = field(default_factory=list)  # ids registered over HTTP (also indexed)
    posted_at_start: int = 0  # len(posted) when the current server started (its delta was empty)
    next_post: int = INGEST_START

    def take_items(self, n: int) -> SyntheticBatch:
        batch = synthetic_batch(self.dataset, self.next_post, n, self.args.seed + 1)
        self.next_post += n
        return batch


def new_bench(args: argparse.Namespace, dataset: Dataset, recommender: Recommender, store: SqliteStore,
              smallest: int) -> tuple[Bench, dict[str, list[str]]]:
    """A bench over the trained rows alone, and its 600 users' histories (real ones plus 3 of the
    first `smallest` catalogue items each): the first 300 are measured, the other 300 calibrate nprobe."""
    users = benchmark_users(dataset, recommender, 600, smallest - len(recommender.warm_ids), 3, args.seed)
    names = list(users)
    bench = Bench(args, dataset, recommender, store, {u: users[u] for u in names[:300]},
                  {u: users[u] for u in names[300:]}, recommender.warm_rows.copy(), list(recommender.warm_ids))
    return bench, users


def item_json(batch: SyntheticBatch, b: int) -> dict[str, Any]:
    return {"id": batch.ids[b], "attributes": batch.attributes[b], "content": batch.content[b].tolist()}


def queries(bench: Bench, users: dict[str, list[str]]) -> np.ndarray:
    return user_queries(bench.recommender, users)  # (U, D+1)


def exact_top(bench: Bench, users: dict[str, list[str]], q: np.ndarray) -> list[list[str]]:
    """Exact top-K over every indexed row, each user's history excluded: the recall oracle."""
    position = {item_id: j for j, item_id in enumerate(bench.ids)}
    out: list[list[str]] = []
    for s in range(0, len(q), 64):
        scores = q[s : s + 64] @ bench.rows.T  # (B, N)
        for b, history in enumerate(list(users.values())[s : s + 64]):
            seen = [position[i] for i in history if i in position]
            scores[b, seen] = -np.inf
            top = np.argpartition(-scores[b], K)[:K]
            out.append([bench.ids[j] for j in top])
    return out


def index_config(kind: str, nprobe: int) -> IndexConfig:
    return IndexConfig(kind="ivf" if kind == "ivf" else "exact", nprobe=nprobe)


def calibrate(bench: Bench, kind: str) -> tuple[VectorIndex, int, list[dict[str, float]]]:
    """In-process index like the server's; smallest nprobe with recall@K >= 0.95 on the calibration users
    (a different set of users from the ones whose served recall is reported)."""
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # building only; the server and timings use 1
    cold = [not bench.recommender.is_trained(i) for i in bench.ids]
    index = VectorIndex.build(bench.rows.shape[1], bench.ids, bench.rows, cold, index_config(kind, 32),
                              pin_warm=True)  # as Recommender.build_index does
    faiss.omp_set_num_threads(1)
    if kind != "ivf":
        return index, 0, []
    q = queries(bench, bench.calib_users)
    truth = exact_top(bench, bench.calib_users, q)
    sweep: list[dict[str, float]] = []
    chosen = NPROBES[-1]
    for nprobe in NPROBES:
        index.nprobe = nprobe
        t0 = time.perf_counter()
        found = index.search(q, K, exclude=[set(h) for h in bench.calib_users.values()])
        per_query = (time.perf_counter() - t0) / len(q)
        recall = float(np.mean([len(set(t) & {h.item_id for h in f}) / K for t, f in zip(truth, found, strict=True)]))
        sweep.append({"nprobe": nprobe, "recall": round(recall, 4), "search_ms": round(1e3 * per_query, 3)})
        if recall >= 0.95:
            chosen = nprobe
            break
    index.nprobe = chosen
    return index, chosen, sweep


def served_recall(bench: Bench, port: int) -> tuple[float, dict[str, float]]:
    """Recall@K of what the server returns against the exact oracle, and its unloaded latency."""
    users = bench.bench_users
    truth = exact_top(bench, users, queries(bench, users))
    names = list(users)
    res = run_load(port, lambda j: ("GET", f"/recommend?user={names[j]}&k={K}", None), concurrency=1,
                   total=len(names), warmup=0, keep_bodies=True)
    recalls = []
    for t, body in zip(truth, res.bodies, strict=True):
        got = {item["id"] for item in json.loads(body)["items"]}
        recalls.append(len(set(t) & got) / K)
    return float(np.mean(recalls)), res.summary()


def batch_counts(port: int) -> tuple[float, float]:
    """(requests, batches) answered by /recommend so far, from the server's own metric."""
    values = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("m2rec_recommend_batch_size_sum", "m2rec_recommend_batch_size_count"):
            values[name] = float(value)
    return values.get("m2rec_recommend_batch_size_sum", 0.0), values.get("m2rec_recommend_batch_size_count", 0.0)


def ingest(bench: Bench, port: int, quick: bool) -> dict[str, Any]:
    """Single POST /items (alone, and 16 at once) and POST /items/batch of 500, all over HTTP."""
    out: dict[str, Any] = {}
    n_single = 300 if quick else 1000
    batch = bench.take_items(n_single)
    bodies = [json.dumps(item_json(batch, b)).encode() for b in range(n_single)]
    res = run_load(port, lambda j: ("POST", "/items", bodies[j]), concurrency=1, total=n_single - 20, warmup=20)
    out["single_c1"] = res.summary()
    bench.posted += batch.ids
    n_conc = 1000 if quick else 4000
    batch = bench.take_items(n_conc)
    bodies = [json.dumps(item_json(batch, b)).encode() for b in range(n_conc)]
    res = run_load(port, lambda j: ("POST", "/items", bodies[j]), concurrency=CONCURRENCY,
                   total=n_conc - 50, warmup=50)
    out["single_c16"] = res.summary()
    bench.posted += batch.ids
    per, n_batches = 500, (6 if quick else 30)
    batch = bench.take_items(per * n_batches)
    payloads = [json.dumps({"items": [item_json(batch, b) for b in range(s, s + per)]}).encode()
                for s in range(0, per * n_batches, per)]
    res = run_load(port, lambda j: ("POST", "/items/batch", payloads[j]), concurrency=2,
                   total=n_batches - 2, warmup=2)
    out["batch500_c2"] = {**res.summary(), "items_per_s": round(res.throughput * per, 1)}
    bench.posted += batch.ids
    return out


async def _first_recommendation(port: int, user: str, body: bytes, item_id: str) -> tuple[float, int, float]:
    conn = await Connection.open("127.0.0.1", port)
    t0 = time.perf_counter()
    status, _ = await conn.send("POST", "/items", body)
    posted = time.perf_counter()
    assert status in (200, 201), status
    for polls in range(1, 1000):
        _, payload = await conn.send("GET", f"/recommend?user={user}&k={K}", None)
        if any(item["id"] == item_id for item in json.loads(payload)["items"]):
            conn.close()
            return time.perf_counter() - posted, polls, posted - t0
    conn.close()
    raise RuntimeError(f"{item_id} never reached {user}'s top-{K}")


def time_to_first_recommendation(bench: Bench, port: int, trials: int) -> dict[str, Any]:
    """A near-copy of the user's best registered item (its stored inputs, content perturbed) scores
    above their current K-th item, checked in-process before posting; then POST and poll."""
    r = bench.recommender
    rng = np.random.default_rng(bench.args.seed)
    names = list(bench.bench_users)
    times: list[float] = []
    polls: list[int] = []
    post_ms: list[float] = []
    tried = 0
    while len(times) < trials and tried < 20 * trials:
        user = names[int(rng.integers(len(names)))]
        tried += 1
        _, served, _ = request_once(port, "GET", f"/recommend?user={user}&k={K}")
        hits = served["items"]  # type: ignore[index]
        best = next((h for h in hits if h["is_cold"]), None)
        record = r.store.get_item(best["id"]) if best is not None else None
        if record is None or record.content is None:
            continue
        content = np.asarray(record.content, np.float32)
        content += rng.standard_normal(content.shape).astype(np.float32) * 0.01 * float(np.abs(content).mean())
        new = SyntheticBatch([f"syn:{bench.next_post}"], [record.attributes], content[None])
        bench.next_post += 1
        q = r.user_query(r.history_rows(bench.bench_users[user]))  # (1, D+1)
        if float((q @ embed_batch(r, new).T)[0, 0]) <= hits[-1]["score"]:
            continue  # would not make this user's top-K: not a fair trial
        body = json.dumps(item_json(new, 0)).encode()
        elapsed, n, post = asyncio.run(_first_recommendation(port, user, body, new.ids[0]))
        bench.posted.append(new.ids[0])
        times.append(elapsed)
        polls.append(n)
        post_ms.append(post)
    a = np.asarray(times) * 1e3
    return {"trials": len(times), "attempts": tried, "p50_ms": round(float(np.percentile(a, 50)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3), "max_ms": round(float(a.max()), 3),
            "max_polls": int(max(polls)), "post_p50_ms": round(1e3 * float(np.median(post_ms)), 3)}


def insert_stall(bench: Bench, port: int, merge_rows: int, seconds: float) -> dict[str, Any]:
    """Sequential single inserts for `seconds`, the first few hundred of which push the index's
    delta past its merge threshold, so a background merge of the whole base runs inside the window."""
    since_start = len(bench.posted) - bench.posted_at_start
    top_up = merge_rows - since_start % merge_rows - 300
    if top_up > 0:
        per = 500
        batch = bench.take_items(top_up)
        payloads = [json.dumps({"items": [item_json(batch, b) for b in range(s, min(s + per, top_up))]}).encode()
                    for s in range(0, top_up, per)]
        run_load(port, lambda j: ("POST", "/items/batch", payloads[j]), concurrency=1, total=len(payloads),
                 warmup=0)
        bench.posted += batch.ids
    n = int(seconds * 400)
    batch = bench.take_items(n)
    bodies = [json.dumps(item_json(batch, b)).encode() for b in range(n)]
    res = run_load(port, lambda j: ("POST", "/items", bodies[j]), concurrency=1, total=n, seconds=seconds,
                   warmup=0)
    bench.posted += batch.ids[: res.count]
    return {"topped_up": max(top_up, 0), **res.summary()}


def extend_with_posted(bench: Bench) -> None:
    """Items posted over HTTP at a smaller size are in the store, so the next server indexes them too."""
    known = set(bench.ids)
    new = [i for i in bench.posted if i not in known]
    if new:
        records = bench.store.get_items(new)
        bench.ids += [i for i in new if i in records]
        bench.rows = np.concatenate([bench.rows, np.stack([records[i].embedding for i in new if i in records])])


def run_size(bench: Bench, size: int, work: Path) -> dict[str, Any]:
    args, r = bench.args, bench.recommender
    pin(os.getpid(), all_cores())
    n_syn = size - len(r.warm_ids)
    have = sum(1 for i in bench.ids if i.startswith("syn:") and int(i[4:]) < INGEST_START)
    if n_syn > have:
        rows = fill_store(r, bench.store, bench.dataset, have, n_syn, args.seed)
        bench.ids += [f"syn:{j}" for j in range(have, n_syn)]
        bench.rows = np.concatenate([bench.rows, rows])
    extend_with_posted(bench)
    kind = "ivf" if size >= 50_000 else "exact"
    t0 = time.perf_counter()
    index, nprobe, sweep = calibrate(bench, kind)
    result: dict[str, Any] = {"size": size, "indexed": len(bench.ids), "index": kind, "nprobe": nprobe,
                              "nprobe_sweep": sweep, "calibration_s": round(time.perf_counter() - t0, 1)}
    if kind == "ivf":
        # the IVF alone (registered items; the pinned trained rows are always exact), for the measured users
        q = queries(bench, bench.bench_users)
        result["ivf_recall"] = {n: round(base_recall(index._base, q, K, n), 4) for n in sorted({1, nprobe})}
    torch.set_num_threads(1)
    with threadpool_limits(1, user_api="blas"):  # as the server runs (service/api/app.py)
        r.maintainer.index = index
        users = list(bench.bench_users)
        result["compute"] = recommend_alone(r, users, 300 if args.quick else 1000)
        result["compute_batched"] = recommend_batched(r, users, 10, 30 if args.quick else 100)
        result["compute_search_only"] = search_alone(r, index, bench.bench_users)
    bench.recommender.maintainer.index = VectorIndex(r.dim)  # free the in-process copy before the server starts
    del index
    env = {"M2REC_ARTIFACT_PATH": str(args.artifact), "M2REC_STORE_URL": str(work / "store.sqlite3"),
           "M2REC_INDEX_KIND": kind, "M2REC_INDEX_NPROBE": str(max(nprobe, 1))}
    floor = Server("benchmarks.floor_app:create_floor_app", args.port + 1, {}, work / f"floor-{size}.log")
    server = Server("service.api.app:create_app", args.port, env, work / f"server-{size}.log")
    try:
        floor.wait_ready(60)
        result["startup_s"] = round(server.wait_ready(1800), 1)
        pin(os.getpid(), {CLIENT_CORE})
        bench.posted_at_start = len(bench.posted)
        result["served_recall"], result["unloaded"] = served_recall(bench, args.port)
        before = batch_counts(args.port)
        ours, floor_result, ratios = paired_load(args.port, args.port + 1, list(bench.bench_users), args.seconds)
        result["recommend"], result["floor"] = ours.summary(), floor_result.summary()
        result["throughput_vs_floor_pairs"] = [round(r, 3) for r in ratios]
        result["throughput_vs_floor"] = round(float(np.median(ratios)), 3)
        after = batch_counts(args.port)
        result["batch_mean"] = round((after[0] - before[0]) / max(after[1] - before[1], 1), 2)
        result["rss_mb"], result["rss_peak_mb"] = server.rss_mb()
        result["ingest"] = ingest(bench, args.port, args.quick)
        result["first_recommendation"] = time_to_first_recommendation(bench, args.port, 20 if args.quick else 100)
        if not args.quick:
            result["insert_stall"] = insert_stall(bench, args.port, IndexConfig().merge_delta_rows, 15.0)
        result["rss_end_mb"], result["rss_end_peak_mb"] = server.rss_mb()
    finally:
        try:
            server.stop()
        finally:
            floor.stop()
    result["loadavg_after"] = os.getloadavg()
    print(json.dumps(result, indent=1), flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, default=Path("data/ml-100k"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/m2rec-bench/serve"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--seconds", type=float, default=4.0,
                        help=f"length of each closed-loop /recommend window ({PAIRS} of them, each followed by one "
                             f"of the floor)")
    parser.add_argument("--port", type=int, default=18711)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="10k items, short windows: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.seconds = [10_000], 1.0
    started = time.time()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    dataset = load_dataset(args.dataset)
    store = SqliteStore(args.work / "store.sqlite3")
    recommender = Recommender(load_artifact(args.artifact), store)
    bench, users = new_bench(args, dataset, recommender, store, min(args.sizes))
    results = []
    for size in args.sizes:
        if size == args.sizes[0]:
            n_syn = size - len(recommender.warm_ids)
            rows = fill_store(recommender, store, dataset, 0, n_syn, args.seed)
            bench.ids += [f"syn:{j}" for j in range(n_syn)]
            bench.rows = np.concatenate([bench.rows, rows])
            write_histories(store, users)
        results.append(run_size(bench, size, args.work))
    store.close()
    meta = {
        "command": "cd /work/main && .venv/bin/python -m benchmarks.serve " + " ".join(argv or _argv()),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"Linux {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
                   f"faiss {faiss.__version__}",
        "model_version": recommender.version, "model": recommender.model.config.to_dict(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "minutes": round((time.time() - started) / 60, 1), "k": K, "concurrency": CONCURRENCY,
        "seconds_per_window": args.seconds, "pairs": PAIRS, "quick": args.quick,
    }
    write_report(meta, results, (args.work / "serve-quick") if args.quick else (args.out / "serve"))


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
