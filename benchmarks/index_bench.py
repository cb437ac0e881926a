"""The index alone, in process: build time, memory, recall@20 against exact, search latency per
nprobe, and the longest single add while merges (and one full IVF rebuild) run in the background.

    .venv/bin/python -m benchmarks.index_data --artifact /tmp/m2rec-idx/artifacts --rows 1000000
    .venv/bin/python -m benchmarks.index_bench --cache /tmp/m2rec-idx/rows --sizes 100000 1000000

Rows are the trained model's: the artifact's warm rows (pinned, as the service does) plus generated
rows of `benchmarks.catalogue` items (benchmarks/index_data.py); queries are real ml-100k users
folded in from their histories, which are excluded from their results as the service does. Each
size runs in a fresh process that never imports torch, so RSS is the index's plus NumPy/FAISS.
Recall is reported twice: `recall` of `VectorIndex.search` against the exact top-20 over every
row (what /recommend serves), and `ivf recall` of the approximate base alone against the exact
top-20 of the generated rows (the part IVF is responsible for), for the real users and for random
query directions of the same norms (a harder, more diverse workload).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from service.index import IndexConfig, VectorIndex
from service.index.search import search_base

K = 20
Rows = npt.NDArray[np.float32]


def proc_status(field: str) -> float:
    """MB of a /proc/self/status field (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def read_cold(path: Path, start: int, stop: int) -> Rows:
    """Rows [start, stop) of a .npy file with plain reads (no mmap: page cache stays out of RSS)."""
    with path.open("rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(f)
        f.seek(f.tell() + start * shape[1] * 4)
        return np.fromfile(f, np.float32, (stop - start) * shape[1]).reshape(-1, shape[1])


def exact_truth(warm: Rows, cold_path: Path, n_cold: int, q: Rows, histories: list[list[int]]) -> tuple[
        list[set[str]], list[set[str]]]:
    """Per query: exact top-K ids over warm+cold (history excluded), and over cold rows only."""
    warm_scores = q @ warm.T  # (U, J)
    for u, h in enumerate(histories):
        warm_scores[u, h] = -np.inf
    best_s = np.full((len(q), K), -np.inf, np.float32)
    best_i = np.full((len(q), K), -1, np.int64)
    for start in range(0, n_cold, 100_000):
        rows = read_cold(cold_path, start, min(start + 100_000, n_cold))
        flat = faiss.IndexFlatIP(rows.shape[1])
        flat.add(rows)
        s, i = flat.search(q, K)
        s_all, i_all = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + start], 1)
        top = np.argsort(-s_all, axis=1)[:, :K]
        best_s, best_i = np.take_along_axis(s_all, top, 1), np.take_along_axis(i_all, top, 1)
    cold_truth = [{f"c{i}" for i in row} for row in best_i]
    all_truth = []
    for u in range(len(q)):
        cand = [(float(s), f"w{j}") for j, s in enumerate(warm_scores[u])] + \
               [(float(s), f"c{i}") for s, i in zip(best_s[u], best_i[u], strict=True)]
        all_truth.append({name for _, name in sorted(cand, reverse=True)[:K]})
    return all_truth, cold_truth


def run_one(cache: Path, size: int, nlist: int | None, nprobes: list[int], stall_adds: int,
            artifact: Path | None, lift_quantile: float) -> dict[str, Any]:
    faiss.omp_set_num_threads(1)  # as the server runs
    if artifact is not None:  # the model loaded as the server holds it: RSS figures become the server's
        import tempfile

        from service.core.recommender import Recommender
        from service.model.artifact import load_artifact
        from service.store import SqliteStore

        model = Recommender(load_artifact(artifact), SqliteStore(Path(tempfile.mkdtemp()) / "s.sqlite3"))
    warm = np.load(cache / "warm.npy")
    q = np.load(cache / "queries.npy")
    histories = json.loads((cache / "histories.json").read_text())
    cold_path = Path((cache / "cold.path").read_text())
    n_cold = size - len(warm)
    all_truth, cold_truth = exact_truth(warm, cold_path, n_cold, q, histories)
    # a harder workload: random user directions (same |h|), so the truth is not the same few long,
    # popular rows for everyone (real users' exact top-20s share ~40 items at 1M)
    rng = np.random.default_rng(0)
    q_flat = q.copy()
    g = rng.standard_normal(q[:, :-1].shape).astype(np.float32)
    q_flat[:, :-1] = g / np.linalg.norm(g, axis=1, keepdims=True) * np.linalg.norm(q[:, :-1], axis=1, keepdims=True)
    _, flat_truth = exact_truth(warm, cold_path, n_cold, q_flat, histories)
    out: dict[str, Any] = {"size": size, "dim": warm.shape[1], "rss_before_mb": round(proc_status("VmRSS")),
                           "with_model": artifact is not None}
    config = IndexConfig(kind="ivf", nlist=nlist, lift_quantile=lift_quantile)
    dim = warm.shape[1]

    def batches() -> Any:
        yield [f"w{j}" for j in range(len(warm))], warm, [False] * len(warm)
        for start in range(0, n_cold, 20_000):
            stop = min(start + 20_000, n_cold)
            yield [f"c{i}" for i in range(start, stop)], read_cold(cold_path, start, stop), [True] * (stop - start)

    reset_peak()
    t0 = time.perf_counter()
    index = VectorIndex.build_from(batches(), dim, config, pin_warm=True)
    out["build_s"] = round(time.perf_counter() - t0, 1)
    out["rss_built_mb"], out["rss_build_peak_mb"] = round(proc_status("VmRSS")), round(proc_status("VmHWM"))
    base = index._base
    out["nlist"] = base.coarse.nlist if base.coarse else None
    out["lift_quantile"] = lift_quantile
    out["overflow_rows"] = base.overflow.size if base.overflow else 0
    out["truth_distinct"] = {"served": len(set().union(*all_truth)), "random": len(set().union(*flat_truth))}
    out["shards"] = [s.size for s in base.shards]
    exclude = [{f"w{j}" for j in h} for h in histories]
    sweep = []
    for nprobe in nprobes:
        index.nprobe = nprobe
        times, overlap = [], []
        for u in range(len(q)):
            t = time.perf_counter()
            hits = index.search(q[u : u + 1], K, exclude=[exclude[u]])[0]
            times.append(time.perf_counter() - t)
            overlap.append(len(all_truth[u] & {h.item_id for h in hits}) / K)
        _, iids = search_base(base, q, K, nprobe)
        ivf = [len(cold_truth[u] & {f"c{i - len(warm)}" for i in iids[u]}) / K for u in range(len(q))]
        _, iids = search_base(base, q_flat, K, nprobe)
        flat = [len(flat_truth[u] & {f"c{i - len(warm)}" for i in iids[u]}) / K for u in range(len(q))]
        a = np.asarray(times) * 1e3
        sweep.append({"nprobe": nprobe, "recall": round(float(np.mean(overlap)), 4),
                      "ivf_recall": round(float(np.mean(ivf)), 4),
                      "ivf_recall_random": round(float(np.mean(flat)), 4),
                      "p50_ms": round(float(np.percentile(a, 50)), 3),
                      "p99_ms": round(float(np.percentile(a, 99)), 3)})
        print(json.dumps(sweep[-1]), file=sys.stderr, flush=True)
    out["sweep"] = sweep
    index.nprobe = config.nprobe
    if stall_adds == 0:
        return out
    out["stall_incremental"] = add_stalls(index, cold_path, stall_adds, q, exclude, full_rebuild=False)
    reset_peak()
    out["stall_full_rebuild"] = add_stalls(index, cold_path, 0, q, exclude, full_rebuild=True)
    out["rss_rebuild_peak_mb"] = round(proc_status("VmHWM"))
    out["rss_end_mb"] = round(proc_status("VmRSS"))
    if artifact is not None:
        del model
    return out


def add_stalls(index: VectorIndex, cold_path: Path, n_adds: int, q: Rows, exclude: list[set[str]],
               full_rebuild: bool) -> dict[str, Any]:
    """Single-row adds, each timed, while a thread searches nonstop (as requests would) and the
    delta fills past its merge threshold `n_adds // merge_delta_rows` times; with `full_rebuild`,
    adds run until one forced IVF retrain (a full rebuild) has finished in the background."""
    rows = read_cold(cold_path, 0, max(n_adds, 50_000))
    stop = threading.Event()
    searches = [0]

    def searcher() -> None:
        u = 0
        while not stop.is_set():
            index.search(q[u % len(q) : u % len(q) + 1], K, exclude=[exclude[u % len(q)]])
            searches[0] += 1
            u += 1

    thread = threading.Thread(target=searcher)
    thread.start()
    times: list[float] = []
    merges = 0
    base = index._base
    t_start = time.perf_counter()
    config = index.config
    if full_rebuild:
        index.config = dataclasses.replace(config, retrain_growth=0.0)
        index.add(["rebuild-trigger"], rows[:1], [True])
        index._start_background_merge()
    j = 0
    while (j < n_adds) or (full_rebuild and (index.merging or j < 10)):
        t = time.perf_counter()
        index.add([f"n{len(times)}-{full_rebuild}"], rows[j % len(rows) : j % len(rows) + 1], [True])
        times.append(time.perf_counter() - t)
        merges += index._base is not base
        base = index._base
        j += 1
        if full_rebuild:
            time.sleep(0.001)  # ~1,000 adds/s, not a tight loop, while the rebuild runs
    elapsed = time.perf_counter() - t_start
    index.wait_for_merge()
    merges += index._base is not base
    index.config = config
    stop.set()
    thread.join()
    a = np.asarray(times) * 1e3
    return {"adds": len(times), "merges_seen": merges, "seconds": round(elapsed, 1),
            "searches": searches[0], "add_p50_ms": round(float(np.percentile(a, 50)), 3),
            "add_p99_ms": round(float(np.percentile(a, 99)), 3), "add_max_ms": round(float(a.max()), 1)}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| rows | D+1 | nlist | M quantile (exact rows) | build s | RSS before / built / build peak MB | "
             "nprobe | recall@20 | IVF recall@20 (random queries) | search p50 / p99 ms | "
             "max add ms (merges / full rebuild) | rebuild peak MB |", "|---" * 12 + "|"]
    for r in results:
        stalls = (f"{r['stall_incremental']['add_max_ms']} / {r['stall_full_rebuild']['add_max_ms']} | "
                  f"{r['rss_rebuild_peak_mb']}") if "stall_incremental" in r else "- | -"
        for s in r["sweep"]:
            lines.append(
                f"| {r['size']:,} | {r['dim']} | {r['nlist']} | {r['lift_quantile']} ({r['overflow_rows']}) | "
                f"{r['build_s']} | {r['rss_before_mb']} / {r['rss_built_mb']} / {r['rss_build_peak_mb']} | "
                f"{s['nprobe']} | {s['recall']} | {s['ivf_recall']} ({s['ivf_recall_random']}) | "
                f"{s['p50_ms']} / {s['p99_ms']} | {stalls} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/m2rec-idx/rows"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--nlist", type=int, nargs="+", default=[0], help="0: the index's default")
    parser.add_argument("--nprobes", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--stall-adds", type=int, default=3 * IndexConfig().merge_delta_rows,
                        help="0: skip the add-stall and full-rebuild measurements")
    parser.add_argument("--lift-quantile", type=float, nargs="+", default=[IndexConfig().lift_quantile])
    parser.add_argument("--with-model", type=Path, default=None, metavar="ARTIFACT",
                        help="load this artifact's model first (torch included), as the server does")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.cache, args.sizes[0], args.nlist[0] or None, args.nprobes, args.stall_adds,
                                 args.with_model, args.lift_quantile[0])))
        return
    results = []
    for size, nlist, quantile in itertools.product(args.sizes, args.nlist, args.lift_quantile):
        cmd = [sys.executable, "-m", "benchmarks.index_bench", "--one", "--cache", str(args.cache),
               "--sizes", str(size), "--nlist", str(nlist), "--stall-adds", str(args.stall_adds),
               "--lift-quantile", str(quantile), "--nprobes", *map(str, args.nprobes),
               *(["--with-model", str(args.with_model)] if args.with_model else [])]
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
