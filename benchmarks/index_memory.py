"""Resident memory of the index per item, by FAISS kind, in a fresh process each (no server, no model).

    .venv/bin/python -m benchmarks.index_memory --rows 1000000 --dim 65

Rows are Gaussian (memory does not depend on their values); ids are "syn:<n>" like the serving
benchmark's. Reports the process's RSS growth from before the build to after it (and after a
snapshot round trip), so a 10M-item replica can be estimated as baseline + 10M x bytes per item;
the peak over the build, and the peak during the snapshot's save over the RSS before it (the peak is
reset through /proc/self/clear_refs), with the longest single-item add made while the save runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.processes import rss_mb
from service.index.config import Built, RowCodes


def measure(kind: Built, rows: int, dim: int, row_codes: RowCodes) -> dict[str, Any]:
    import os

    import faiss

    from service.index import IndexConfig, VectorIndex

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    # "auto" builds IVF-PQ4 for any non-empty population once `ivf_min_rows` is 1
    config = IndexConfig(kind="exact" if kind == "exact" else "auto", ivf_min_rows=1, row_codes=row_codes,
                         auto_merge=False)
    rng = np.random.default_rng(0)

    def batches() -> Iterator[tuple[list[str], np.ndarray]]:
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            yield [f"syn:{j}" for j in range(start, start + n)], rng.standard_normal((n, dim), dtype=np.float32)

    before = rss_mb(os.getpid())[0]
    t0 = time.perf_counter()
    index = VectorIndex.build(dim, [], np.zeros((0, dim), np.float32), batches(), config)
    built = time.perf_counter() - t0
    gc.collect()
    after = rss_mb(os.getpid())
    with tempfile.TemporaryDirectory() as tmp:
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS (VmHWM) restarts from the RSS now
        before_save, stalls, saving = rss_mb(os.getpid())[0], [0.0], threading.Event()

        def add_while_saving(index: VectorIndex) -> None:  # an item at a time, as POST /items would
            j, vector = 0, np.ones((1, dim), np.float32)
            while saving.is_set():
                t = time.perf_counter()
                index.add([f"during-save:{j}"], vector)
                stalls.append(time.perf_counter() - t)
                j += 1

        saving.set()
        adder = threading.Thread(target=add_while_saving, args=(index,))
        adder.start()
        t0 = time.perf_counter()
        index.save(Path(tmp) / "snap", None)
        save_s = time.perf_counter() - t0
        saving.clear()
        adder.join()
        save_peak = rss_mb(os.getpid())[1] - before_save
        del index
        gc.collect()
        t0 = time.perf_counter()
        loaded, _ = VectorIndex.load(Path(tmp) / "snap", config)
        load_s = time.perf_counter() - t0
        gc.collect()
        reloaded = rss_mb(os.getpid())[0]
    return {"kind": kind + (f"+{row_codes} rows" if kind == "ivf_pq4" else ""), "rows": rows,
            "kinds": list(loaded.kinds),
            "build_s": round(built, 1), "load_s": round(load_s, 1), "rss_growth_mb": round(after[0] - before, 1),
            "bytes_per_item": round((after[0] - before) * 2**20 / rows, 1), "peak_mb": round(after[1], 1),
            "save_s": round(save_s, 1), "save_peak_over_rss_mb": round(save_peak, 1),
            "max_add_ms_during_save": round(1e3 * max(stalls), 1), "adds_during_save": len(stalls) - 1,
            "rss_after_snapshot_round_trip_mb": round(reloaded, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=65, help="D+1")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # kind, row codes: run in this process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], args.rows, args.dim, args.one[1])))
        return
    for kind, row_codes in (("exact", "float32"), ("ivf_pq4", "float32"), ("ivf_pq4", "float16"), ("ivf_pq4", "sq8")):
        done = subprocess.run([sys.executable, "-m", "benchmarks.index_memory", "--rows", str(args.rows),
                               "--dim", str(args.dim), "--one", kind, row_codes], capture_output=True, text=True)
        print(done.stdout.strip() or done.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
