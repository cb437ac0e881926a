"""Serving benchmark at scale: a diverse catalogue of N items (1M, 10M) behind one uvicorn worker.

    .venv/bin/python -m benchmarks.serve --artifact /tmp/m2rec-bench/artifacts/current --sizes 1000000 \\
        --store redis://127.0.0.1:6379/0 [--reference-tree /tmp/main-tree] [--quick]

Make the artifact first: `.venv/bin/python -m benchmarks.make_artifact --out /tmp/m2rec-bench/artifacts`.

Per size, in one run, so every ratio compares neighbouring windows on the same machine:
1. Catalogue: `benchmarks.catalogue.diverse_batch` items embedded by the generator in batches of
   10k and written with the store's own API; 600 real ml-100k users (their trained items) with 3
   registered items each: 300 calibrate nprobe, 300 are measured.
2. In process, the index the server will build (same settings): build time, recall@20 of the new
   items' top list against exact for nprobe 1..128, for the calibration users and for random
   directions of the same norms; nprobe = the smallest reaching `--recall` on the calibration users.
   Also: exclusions by a per-query IDSelector against over-fetching, and HNSW against IVF on a sample.
3. The server builds its index from the store (start-up time), then: served recall@20 of the
   measured users against exact; /recommend at 1 client; at 16 clients in windows alternated with
   the HTTP floor's three routes (benchmarks/floor_app.py) and, with `--reference-tree`, the same
   service from another source tree over the same store; RSS.
4. Ingest: POST /items at 1 and 16 clients, /items/batch of 500; the longest single insert while a
   background merge runs. 5. A restart from the snapshot the first server wrote at shutdown.

Placement: servers pinned to core 0, this process (the load generator) to core 1 while they run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from benchmarks.catalogue import benchmark_users, diverse_batch, fill_store, write_histories
from benchmarks.exact import exact_served, exact_tops, random_directions, recall
from benchmarks.in_process import K, user_queries
from benchmarks.load import LoadResult, run_load
from benchmarks.processes import CLIENT_CORE, Server, all_cores, pin
from benchmarks.report import write_report
from benchmarks.serve_store import INGEST_START, open_store, store_env, stored_rows
from service.core.merge import merge_many
from service.core.recommender import Recommender
from service.index import IndexConfig, VectorIndex
from service.model.artifact import load_artifact
from service.store import Store
from training import machine
from training.dataset import Dataset, load_dataset

CONCURRENCY, ROUNDS = 16, 5
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128)
FLOORS = {"floor": "/recommend", "floor_deps": "/recommend-deps", "floor_strings": "/recommend-strings"}


def in_process(rec: Recommender, ids: list[str], rows: np.ndarray, calib: dict[str, list[str]],
               config: IndexConfig, target: float, snapshot: tuple[Path, str | None] | None = None,
               ) -> tuple[dict[str, Any], int]:
    """Build the server's index here; the recall curve over nprobe; the chosen nprobe. `snapshot`: save
    the index there, reflecting the store up to that event, for the server to start from."""
    faiss.omp_set_num_threads(1)  # as the server builds (M2REC_FAISS_THREADS=1)
    t0 = time.perf_counter()
    index = VectorIndex.build(rec.dim, list(rec.warm_ids), rec.warm_rows, [(ids, rows)], config)
    out: dict[str, Any] = {"build_s": round(time.perf_counter() - t0, 1), "kinds": index.kinds}
    q, q_new = user_queries(rec, calib)
    seen = [set(h) for h in calib.values()]
    new_truth = exact_tops(q_new, rows, ids, seen)
    all_truth = exact_served(rec, q, q_new, rows, ids, seen)  # the list /recommend answers, by the policy
    spread = random_directions(q_new, 1)
    spread_truth = exact_tops(spread, rows, ids, [set()] * len(q))
    sweep, chosen = [], NPROBES[-1]
    for nprobe in NPROBES if index.kinds[1] != "exact" else (0,):
        index.nprobe = nprobe
        t0 = time.perf_counter()
        found = [index.search(q[s : s + 16], K, seen[s : s + 16], q_new[s : s + 16]) for s in range(0, len(q), 16)]
        per_batch = (time.perf_counter() - t0) / len(found)
        tops = [t for batch in found for t in batch]
        served = merge_many(tops, [rec.policy] * len(tops), [K] * len(tops))
        spread_found = [t.new for s in range(0, len(q), 16) for t in index.search(spread[s : s + 16], K)]
        point = {"nprobe": nprobe, "search_ms_per_16": round(1e3 * per_batch, 3),
                 "recall_new_real": recall(new_truth, [[h.item_id for h in t.new] for t in tops]),
                 "recall_served_real": recall(all_truth, [[h.item_id for h in hits] for hits in served]),
                 "recall_new_random": recall(spread_truth, [[h.item_id for h in f] for f in spread_found])}
        sweep.append(point)
        if point["recall_served_real"] >= target and point["recall_new_real"] >= target and chosen == NPROBES[-1]:
            chosen = nprobe
    out["sweep"] = sweep
    index.nprobe = chosen
    out["exclusions"] = exclusion_strategies(index, q, q_new, seen)
    if snapshot is not None:
        t0 = time.perf_counter()
        index.save(*snapshot)
        out["snapshot_save_s"] = round(time.perf_counter() - t0, 1)
    return out, chosen


def exclusion_strategies(index: VectorIndex, q: np.ndarray, q_new: np.ndarray, seen: list[set[str]]
                         ) -> dict[str, float]:
    """ms per batch of 16: the index's over-fetch against one FAISS call per query with its own
    IDSelector (live ids and not the user's), on the new items' base."""
    base, pos = index._base, index._trained_pos
    if base is None:
        return {}
    t0 = time.perf_counter()
    for s in range(0, len(q), 16):
        index.search(q[s : s + 16], K, seen[s : s + 16], q_new[s : s + 16])
    over = (time.perf_counter() - t0) / (len(q) / 16)
    t0 = time.perf_counter()
    for b in range(len(q)):
        banned = np.asarray(index._ids.lookup(seen[b]), dtype=np.int64)
        trained_banned = np.asarray([pos[i] for i in seen[b] if i in pos], dtype=np.int64)
        for segment, ban, live, query in ((index._trained, trained_banned, None, q[b : b + 1]),
                                          (base, banned, index._live.selector, q_new[b : b + 1])):
            batch = faiss.IDSelectorBatch(len(ban), faiss.swig_ptr(ban))
            nope = faiss.IDSelectorNot(batch)
            sel = faiss.IDSelectorAnd(live, nope) if live is not None else nope
            segment.search(query, K, sel, index.nprobe, K * index.config.rerank)
    per_query = (time.perf_counter() - t0) / (len(q) / 16)
    return {"overfetch_ms_per_16": round(1e3 * over, 3), "selector_per_query_ms_per_16": round(1e3 * per_query, 3)}


def hnsw_against_ivf(rows: np.ndarray, q: np.ndarray, sample: int) -> dict[str, Any]:
    """HNSW (FAISS IndexHNSWFlat, inner product) and the service's IVF-PQ4 over the same sample of new rows, for
    real users' queries and random directions of the same norms."""
    rows = rows[np.sort(np.random.default_rng(2).choice(len(rows), min(sample, len(rows)), replace=False))]
    ids = [str(j) for j in range(len(rows))]
    spread = random_directions(q, 3)
    truth = exact_tops(q, rows, ids, [set()] * len(q)), exact_tops(spread, rows, ids, [set()] * len(q))
    out: dict[str, Any] = {"rows": len(rows)}
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(rows.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 64
    hnsw.add(rows)
    out["hnsw_build_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    ivf = VectorIndex.build(rows.shape[1], [], np.zeros((0, rows.shape[1])), [(ids, rows)],
                            IndexConfig(ivf_min_rows=1, auto_merge=False))
    out["ivf_build_s"] = round(time.perf_counter() - t0, 1)
    faiss.omp_set_num_threads(1)
    out["hnsw"], out["ivf"] = [], []

    def by_hnsw(x: np.ndarray) -> list[list[Any]]:
        found: list[list[Any]] = hnsw.search(x, K)[1].tolist()
        return found

    def by_ivf(x: np.ndarray) -> list[list[Any]]:
        return [[h.item_id for h in t.new] for t in ivf.search(x, K)]

    for ef, nprobe in ((32, 8), (64, 16), (128, 32), (256, 64)):
        hnsw.hnsw.efSearch = ef
        ivf.nprobe = nprobe
        for name, setting, search in (("hnsw", ef, by_hnsw), ("ivf", nprobe, by_ivf)):
            t0 = time.perf_counter()
            found = search(q)
            ms = 1e3 * (time.perf_counter() - t0) / len(q)
            out[name].append({"setting": setting, "ms_per_query": round(ms, 3),
                              "recall": recall(truth[0], [[str(j) for j in f] for f in found]),
                              "recall_random": recall(truth[1], [[str(j) for j in f] for f in search(spread)])})
    return out


def served_recall(port: int, users: dict[str, list[str]], truth: list[set[str]]) -> tuple[float, dict[str, float]]:
    names = list(users)
    res = run_load(port, lambda j: ("GET", f"/recommend?user={names[j]}&k={K}", None), concurrency=1,
                   total=len(names), warmup=0, keep_bodies=True)
    got = [[item["id"] for item in json.loads(body)["items"]] for body in res.bodies]
    return recall(truth, got), res.summary()


def windows(ports: dict[str, tuple[int, str]], users: list[str], seconds: float) -> dict[str, Any]:
    """ROUNDS rounds of one window per server/route, in turn: each ratio compares one round's windows."""
    pooled = {name: LoadResult() for name in ports}
    rounds: list[dict[str, float]] = []
    for _ in range(ROUNDS):
        row = {}
        for name, (port, path) in ports.items():
            def request(j: int, p: str = path) -> tuple[str, str, None]:
                return "GET", f"{p}?user={users[j % len(users)]}&k={K}", None

            res = run_load(port, request, concurrency=CONCURRENCY, seconds=seconds, warmup=100)
            row[name] = res.throughput
            pool = pooled[name]
            pool.latencies += res.latencies
            pool.errors += res.errors
            pool.seconds += res.seconds
            pool.client_cpu += res.client_cpu
        rounds.append(row)
    out: dict[str, Any] = {name: pool.summary() for name, pool in pooled.items()}
    for name in ports:
        if name != "service":
            out[f"service_vs_{name}"] = round(float(np.median([r["service"] / r[name] for r in rounds])), 3)
    out["rounds"] = [{k: round(v, 1) for k, v in r.items()} for r in rounds]
    return out


def post_items(port: int, make: Any, n: int, concurrency: int, per: int = 1, seconds: float | None = None,
               warmup: int = 0) -> LoadResult:
    batch = make(n * per)
    if per == 1:
        bodies = [json.dumps(_item(batch, b)).encode() for b in range(n)]
        return run_load(port, lambda j: ("POST", "/items", bodies[j]), concurrency=concurrency,
                        total=n - warmup, warmup=warmup, seconds=seconds)
    bodies = [json.dumps({"items": [_item(batch, b) for b in range(s * per, (s + 1) * per)]}).encode()
              for s in range(n)]
    return run_load(port, lambda j: ("POST", "/items/batch", bodies[j]), concurrency=concurrency,
                    total=n - warmup, warmup=warmup)


def _item(batch: Any, b: int) -> dict[str, Any]:
    return {"id": batch.ids[b], "attributes": batch.attributes[b], "content": batch.content[b].tolist()}


def ingest(port: int, dataset: Dataset, seed: int, quick: bool) -> dict[str, Any]:
    """POST /items alone and 16 at once, /items/batch of 500; then sequential single inserts while
    the buffer passes its merge threshold, so a background merge runs inside the window."""
    next_id = [INGEST_START]

    def make(n: int) -> Any:
        batch = diverse_batch(dataset, next_id[0], n, seed + 1)
        next_id[0] += n
        return batch

    out = {"single_c1": post_items(port, make, 300 if quick else 1000, 1, warmup=20).summary(),
           "single_c16": post_items(port, make, 1000 if quick else 4000, CONCURRENCY, warmup=50).summary()}
    res = post_items(port, make, 6 if quick else 20, 2, per=500, warmup=2)
    out["batch500_c2"] = {**res.summary(), "items_per_s": round(res.throughput * 500, 1)}
    posted = next_id[0] - INGEST_START
    merge_rows = IndexConfig().merge_rows
    top_up = merge_rows - posted % merge_rows - 300
    if top_up > 0:
        post_items(port, make, top_up // 100, 1, per=100)
    out["insert_stall"] = post_items(port, make, 6000, 1, seconds=10.0).summary()
    return out


def run_size(args: argparse.Namespace, rec: Recommender, store: Store, dataset: Dataset, size: int,
             users: dict[str, list[str]], ids: list[str], rows: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """One size's measurements; `ids` grows in place, the grown rows are returned with the result."""
    pin(os.getpid(), all_cores())
    n_new, have = size - len(rec.warm_ids), len(ids)
    result: dict[str, Any] = {"size": size, "load_before": os.getloadavg()}
    if n_new > have:
        t0 = time.perf_counter()
        more = stored_rows(store, have, n_new, rec, dataset, args.seed, args.rows_from_generator) if args.reuse_store \
            else None
        if more is None:
            more = fill_store(rec, store, dataset, have, n_new, args.seed, make=diverse_batch)
            result["catalogue_s"] = round(time.perf_counter() - t0, 1)
        ids += [f"syn:{j}" for j in range(have, n_new)]
        rows = np.concatenate([rows, more])
    names = list(users)
    calib, measured = {u: users[u] for u in names[300:]}, {u: users[u] for u in names[:300]}
    config = IndexConfig(nprobe=32, rerank=args.rerank, row_codes=args.row_codes)  # as the server's
    work = args.work
    shutil.rmtree(work / "snapshots", ignore_errors=True)
    snapshot = (work / "snapshots" / f"index-{rec.version}", store.last_event_id()) if args.start_from_snapshot \
        else None
    with threadpool_limits(1, user_api="blas"):
        result["in_process"], nprobe = in_process(rec, ids, rows, calib, config, args.recall, snapshot)
        if args.hnsw_sample:
            result["hnsw_vs_ivf"] = hnsw_against_ivf(rows, user_queries(rec, calib)[1], args.hnsw_sample)
        q, q_new = user_queries(rec, measured)
    result["nprobe"] = nprobe
    truth = exact_served(rec, q, q_new, rows, ids, [set(h) for h in measured.values()])
    env = {"M2REC_ARTIFACT_PATH": str(args.artifact), "M2REC_INDEX_NPROBE": str(max(nprobe, 1)),
           "M2REC_INDEX_RERANK": str(args.rerank), "M2REC_INDEX_ROW_CODES": args.row_codes,
           "M2REC_INDEX_SNAPSHOT_DIR": str(work / "snapshots"), **store_env(args.store, work)}
    floor = Server("benchmarks.floor_app:create_floor_app", args.port + 1, {}, work / f"floor-{size}.log")
    server = Server("service.api.app:create_app", args.port, env, work / f"server-{size}.log")
    servers = [floor, server]
    ports = {"service": (args.port, "/recommend"), **{k: (args.port + 1, p) for k, p in FLOORS.items()}}
    try:
        floor.wait_ready(60)
        startup = "startup_from_in_process_snapshot_s" if args.start_from_snapshot else "startup_build_s"
        result[startup] = round(server.wait_ready(7200), 1)
        if args.unbatched:  # the same service answering each request alone: what batching buys
            alone_env = {k: v for k, v in env.items() if k != "M2REC_INDEX_SNAPSHOT_DIR"}
            alone = Server("service.api.app:create_app", args.port + 3, {**alone_env, "M2REC_RECOMMEND_BATCH_MAX": "1"},
                           work / f"unbatched-{size}.log")
            servers.append(alone)
            alone.wait_ready(7200)
            ports["service_unbatched"] = (args.port + 3, "/recommend")
        if args.reference_tree:
            ref_env = {k: v for k, v in env.items() if k != "M2REC_INDEX_SNAPSHOT_DIR"}  # the same settings
            reference = Server("service.api.app:create_app", args.port + 2, ref_env, work / f"reference-{size}.log",
                               cwd=args.reference_tree, python=args.reference_python)
            servers.append(reference)
            try:
                result["reference_startup_s"] = round(reference.wait_ready(7200), 1)
                ports["reference"] = (args.port + 2, "/recommend")
            except RuntimeError as exc:  # the comparison is optional: the rest of the run still counts
                result["reference_error"] = str(exc)
        pin(os.getpid(), {CLIENT_CORE})
        result["served_recall"], result["unloaded"] = served_recall(args.port, measured, truth)
        if "reference" in ports:
            result["reference_recall"], result["reference_unloaded"] = served_recall(args.port + 2, measured, truth)
        result["load"] = windows(ports, names[:300], args.seconds)
        result["rss_mb"], result["rss_peak_mb"] = server.rss_mb()
        while len(servers) > 2:  # only the service takes the ingest
            servers.pop().stop()
        result["ingest"] = ingest(args.port, dataset, args.seed, args.quick)
        result["rss_after_ingest_mb"], result["rss_after_ingest_peak_mb"] = server.rss_mb()
    finally:
        for s in reversed(servers):
            s.stop()
    restarted = Server("service.api.app:create_app", args.port, env, work / f"server-{size}-restart.log")
    try:
        result["startup_snapshot_s"] = round(restarted.wait_ready(3600), 1)
        result["restart_recall"], _ = served_recall(args.port, measured, truth)
        result["rss_restart_mb"] = restarted.rss_mb()[0]
    finally:
        restarted.stop()
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=1), flush=True)
    return result, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, default=Path("data/ml-100k"))
    parser.add_argument("--store", default="redis://127.0.0.1:6379/0", help="a redis:// URL or 'sqlite'")
    parser.add_argument("--work", type=Path, default=Path("/tmp/m2rec-bench/serve"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each load window")
    parser.add_argument("--recall", type=float, default=0.97, help="recall@20 the calibration users must reach")
    parser.add_argument("--hnsw-sample", type=int, default=0, help="compare HNSW with IVF on this many rows")
    parser.add_argument("--reference-tree", type=Path, help="also serve this source tree (e.g. main) and compare")
    parser.add_argument("--reference-python", type=Path,
                        help="the reference tree's interpreter (a venv with that tree's own dependencies)")
    parser.add_argument("--reuse-store", action="store_true", help="keep the catalogue an earlier run stored")
    parser.add_argument("--unbatched", action="store_true", help="also serve with M2REC_RECOMMEND_BATCH_MAX=1")
    parser.add_argument("--rerank", type=int, default=10, help="IVF-PQ4 re-ranking (M2REC_INDEX_RERANK)")
    parser.add_argument("--row-codes", default="float32", choices=["float32", "float16", "sq8"],
                        help="IVF-PQ4's rows (M2REC_INDEX_ROW_CODES)")
    parser.add_argument("--rows-from-generator", action="store_true",
                        help="--reuse-store: compute the catalogue's rows again instead of reading them back")
    parser.add_argument("--start-from-snapshot", action="store_true",
                        help="the server starts from the index built in process (saved as its snapshot), not from "
                             "a scan of the store")
    parser.add_argument("--port", type=int, default=18811)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="60k items, short windows: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.seconds = [60_000], 1.0
    started = time.time()
    if not args.reuse_store:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(args.dataset)
    store = open_store(args.store, args.work, args.reuse_store)
    rec = Recommender(load_artifact(args.artifact), store)
    users = benchmark_users(dataset, rec, 600, min(args.sizes) - len(rec.warm_ids), 3, args.seed)
    ids: list[str] = []
    rows = np.zeros((0, rec.dim), np.float32)
    results = []
    catalogue_s: float | None = None
    for n, size in enumerate(sorted(args.sizes)):
        if n == 0:  # each user's 3 registered items are among the smallest catalogue's
            fill_first = size - len(rec.warm_ids)
            cache = args.work / f"rows-{fill_first}-seed{args.seed}.npy"  # what the run that stored them computed
            ready = None if not args.reuse_store else np.load(cache) if cache.exists() else \
                stored_rows(store, 0, fill_first, rec, dataset, args.seed, args.rows_from_generator)
            if ready is None:
                t0 = time.perf_counter()
                ready = fill_store(rec, store, dataset, 0, fill_first, args.seed, make=diverse_batch)
                catalogue_s = round(time.perf_counter() - t0, 1)
                np.save(cache, ready)
            ids += [f"syn:{j}" for j in range(fill_first)]
            rows = ready
            write_histories(store, users)
        result, rows = run_size(args, rec, store, dataset, size, users, ids, rows)
        if n == 0 and catalogue_s is not None:
            result["catalogue_s"] = catalogue_s
        results.append(result)
    store.close()
    meta = {
        "command": "python -m benchmarks.serve " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.node()}, {machine.describe()}, Linux {platform.release()}, torch {torch.__version__}, "
                   f"faiss {faiss.__version__}",
        "model_version": rec.version, "model": rec.model.config.to_dict(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "minutes": round((time.time() - started) / 60, 1), "k": K, "concurrency": CONCURRENCY,
        "seconds_per_window": args.seconds, "rounds": ROUNDS, "store": args.store,
    }
    write_report(meta, results, args.out)


if __name__ == "__main__":
    main()
