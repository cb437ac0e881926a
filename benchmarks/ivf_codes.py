"""Which FAISS codes should the large new-item index scan? IVF-Flat and IVF-SQ8 against IVF-PQ with 4-bit
fast-scan codes (the service's IVF-PQ4), each re-ranked exactly from the rows, in process.

    python -m benchmarks.ivf_codes --artifact A --dataset data/ml-100k --rows 1000000 --rows-cache /tmp/rows.npy

The catalogue is benchmarks/catalogue.py's diverse items (every item its own draw) embedded by the
artifact's generator; the queries are real ml-100k users folded in from their trained items. Every
index is over the same inner-product lift as service/index/segment.py, with the same number of lists
(2·√N) unless `--lists` says otherwise, searched 16 queries at a time on one thread; the best rerank·k
of its codes' scores are re-scored from the exact rows, or with `--row-codes` from the rows as the
service may store them (SQ8, SQ6: decoded from FAISS's scalar quantizer, ranges as
service/index/segment.py's). Prints, per index, row codes, nprobe and rerank: ms per 16 queries and
recall@20 against the exact top-20.
`--lists` (multiples of the service's 2·√N lists) and `--quantizer hnsw` (a graph quantizer, as FAISS's
"IVFn_HNSW32" factory strings) try finer lists than the service's. `--long-rows`: how far 4-bit codes
score rows added after training, as long as the trained ones and longer.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from itertools import product
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from benchmarks.catalogue import catalogue_rows, diverse_batch
from benchmarks.exact import exact_tops, recall
from benchmarks.in_process import K, user_queries
from service.core.recommender import Recommender
from service.index.segment import bounds, lift
from service.model.artifact import load_artifact
from service.store.sqlite import SqliteStore
from training.dataset import load_dataset

BATCH = 16
SCALAR = {"sq8": faiss.ScalarQuantizer.QT_8bit, "sq6": faiss.ScalarQuantizer.QT_6bit}


def kinds(d: int, nlist: int) -> dict[str, Callable[[Any], Any]]:
    ip = faiss.METRIC_INNER_PRODUCT

    def sq8(quantizer: Any) -> Any:
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, ip)
        index.sq.rangestat_arg = 0.25  # as service/index/segment.py
        return index

    def pq4(m: int, residual: bool) -> Callable[[Any], Any]:
        def make(quantizer: Any) -> Any:
            index = faiss.IndexIVFPQFastScan(quantizer, d, nlist, m, 4, ip)
            index.by_residual = residual
            return index
        return make

    return {"ivf-flat": lambda quantizer: faiss.IndexIVFFlat(quantizer, d, nlist, ip), "ivf-sq8": sq8,
            f"ivf-pq{d // 2}x4fs": pq4(d // 2, False),
            f"ivf-pq{d // 2}x4fs-residual": pq4(d // 2, True), f"ivf-pq{d}x4fs-residual": pq4(d, True)}


def long_row_errors() -> None:
    """|code score - exact score| of rows added after training, as long as the trained ones and 1.15x
    longer (synthetic rows whose norms spread as generated rows do; no artifact needed)."""
    print("| dimension (D+1) | residual | as long as trained: mean / max error | 1.15x longer: mean / max | "
          "score std |")
    print("|---|---|---|---|---|")
    for dim, residual in ((17, True), (17, False), (129, True)):
        rng = np.random.default_rng(0)
        rows = (rng.normal(size=(10_200, dim)) * np.exp(rng.normal(scale=0.6, size=(10_200, 1)))
                / np.sqrt(dim)).astype(np.float32)
        max_sq = float(np.einsum("nd,nd->n", rows[:10_000], rows[:10_000]).max())
        trained = lift(rows[:10_000], max_sq)
        index = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(dim + 1), dim + 1, 16, dim + 1, 4,
                                         faiss.METRIC_INNER_PRODUCT)
        index.by_residual = residual
        index.train(trained)
        index.add_with_ids(trained, np.arange(10_000))
        q = (2 * rng.normal(size=(8, dim))).astype(np.float32)
        lifted_q = np.zeros((8, dim + 1), np.float32)
        lifted_q[:, :-1] = q
        params = faiss.SearchParametersIVF()
        params.nprobe = 16
        cells = []
        for scale in (1.0, 1.15):
            new = rows[10_000:] * scale
            index.add_with_ids(lift(new, max_sq), np.arange(50_000, 50_200))
            scores, ids = index.search(lifted_q, index.ntotal, params=params)
            code = np.array([[dict(zip(i.tolist(), s.tolist(), strict=True))[50_000 + j] for j in range(200)]
                             for i, s in zip(ids, scores, strict=True)])
            error = np.abs(code - q @ new.T)
            cells.append(f"{error.mean():.2f} / {error.max():.1f}")
            index.remove_ids(faiss.IDSelectorRange(50_000, 50_200))
        print(f"| {dim} | {'yes' if residual else 'no'} | {cells[0]} | {cells[1]} | {float(np.std(q @ rows.T)):.1f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path)
    parser.add_argument("--dataset", type=Path)
    parser.add_argument("--long-rows", action="store_true",
                        help="only: how far 4-bit codes score rows longer than the trained ones")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rows-cache", type=Path, help="keep the catalogue's rows here (.npy) for the next run")
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--nprobe", default="8,16,32")
    parser.add_argument("--rerank", default="4,10,25")
    parser.add_argument("--kinds", help="only these indexes, comma-separated (e.g. ivf-flat,ivf-pq130x4fs-residual)")
    parser.add_argument("--row-codes", default="float32", help="re-score from rows so coded: float32,sq8,sq6")
    parser.add_argument("--lists", default="1", help="IVF lists as multiples of the service's 2·sqrt(N), e.g. 1,4")
    parser.add_argument("--quantizer", default="flat", help="quantizers, comma-separated: flat (the service's), hnsw")
    args = parser.parse_args(argv)
    if args.long_rows:
        return long_row_errors()
    if args.artifact is None or args.dataset is None:
        parser.error("--artifact and --dataset are required (or --long-rows)")
    dataset = load_dataset(args.dataset)
    rec = Recommender(load_artifact(args.artifact), SqliteStore(Path(tempfile.mkdtemp()) / "ivf_codes.sqlite3"))
    if args.rows_cache is not None and args.rows_cache.exists():
        rows = np.ascontiguousarray(np.load(args.rows_cache, mmap_mode="r")[: args.rows])
    else:
        rows = catalogue_rows(rec, dataset, 0, args.rows, 0, make=diverse_batch)
        if args.rows_cache is not None:
            np.save(args.rows_cache, rows)
    by_user: dict[int, list[str]] = {}
    for u, i in dataset.interactions.tolist():
        by_user.setdefault(u, []).append(dataset.item_ids[i])
    users = {str(u): [i for i in h if rec.is_trained(i)] for u, h in list(by_user.items())[: args.users]}
    q = user_queries(rec, users)[1].astype(np.float32)  # (U, D'): the new items' queries
    names = [str(j) for j in range(len(rows))]  # FAISS ids are row positions
    truth = exact_tops(q, rows, names, [set()] * len(q))
    lifted = lift(rows, float(np.einsum("nd,nd->n", rows, rows).max()))
    d, service_nlist = lifted.shape[1], round(2 * np.sqrt(len(rows)))
    queries = np.zeros((len(q), d), np.float32)
    queries[:, :-1] = q
    print(f"{len(rows):,} rows, {len(q)} users, dimension {d} (lifted); recall@{K} against exact\n")
    stored = {codes: rows if codes == "float32" else decoded(rows, codes) for codes in args.row_codes.split(",")}
    print("| index | lists | quantizer | code bytes | build s | row codes | nprobe | rerank | ms per 16 queries | "
          "recall@20 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for factor, quantizer_kind, name in product(map(float, args.lists.split(",")), args.quantizer.split(","),
                                                kinds(d, service_nlist)):
        if args.kinds and name not in args.kinds.split(","):
            continue
        nlist = round(factor * service_nlist)
        sample = lifted[np.sort(np.random.default_rng(1234).choice(len(rows), min(len(rows), 40 * nlist),
                                                                   replace=False))]
        make = kinds(d, nlist)[name]
        # an HNSW quantizer finds a query's nprobe lists without scoring every centroid; k-means itself
        # assigns with a flat index (FAISS's `clustering_index`), as its index factory does for "IVFn_HNSW"
        quantizer: Any = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT) if quantizer_kind == "hnsw" else \
            faiss.IndexFlatIP(d)
        index = make(quantizer)
        if quantizer_kind == "hnsw":
            index.clustering_index = faiss.IndexFlatIP(d)
        index.cp.niter, index.cp.seed = 10, 1234
        faiss.omp_set_num_threads(2)
        start = time.perf_counter()
        index.train(sample)
        for s in range(0, len(rows), 1 << 16):
            index.add(lifted[s : s + (1 << 16)])
        build = time.perf_counter() - start
        faiss.omp_set_num_threads(1)
        for (codes, rescored), nprobe, rerank in product(stored.items(), map(int, args.nprobe.split(",")),
                                                         map(int, args.rerank.split(","))):
            params = faiss.SearchParametersIVF()
            params.nprobe = nprobe
            if quantizer_kind == "hnsw":
                quantizer.hnsw.efSearch = 2 * nprobe  # the graph search keeps at least the nprobe lists it returns
            found: list[list[str]] = []
            start = time.perf_counter()
            for s in range(0, len(q), BATCH):
                _, short = index.search(queries[s : s + BATCH], K * rerank, params=params)
                exact = np.einsum("bsd,bd->bs", rescored[np.maximum(short, 0)], q[s : s + BATCH])
                exact[short < 0] = -np.inf
                best = np.take_along_axis(short, np.argsort(-exact, axis=1)[:, :K], axis=1)
                found += [[str(j) for j in row] for row in best.tolist()]
            ms = 1e3 * (time.perf_counter() - start) / (len(q) / BATCH)
            print(f"| {name} | {nlist} | {quantizer_kind} | {index.code_size} | {build:.0f} | {codes} | {nprobe} | "
                  f"{rerank} | {ms:.2f} | {recall(truth, found):.4f} |", flush=True)
        del index


def decoded(rows: np.ndarray, codes: str) -> np.ndarray:
    """`rows` as the service's RowStore gives them back when it stores them as `codes` (sq8, sq6)."""
    sq = faiss.ScalarQuantizer(rows.shape[1], SCALAR[codes])
    sq.rangestat_arg = 0.25  # as service/index/segment.py
    sq.train(bounds([rows]))
    return np.concatenate([sq.decode(sq.compute_codes(rows[s : s + (1 << 16)])) for s in range(0, len(rows), 1 << 16)])


if __name__ == "__main__":
    main()
