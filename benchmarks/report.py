"""The serving benchmark's table (markdown), raw figures (JSON) and plot (PNG)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

NOTES = "## Notes"


def _target(value: float | None, limit: float, below: bool = True) -> str:
    if value is None:
        return "n/a"
    ok = value <= limit if below else value >= limit
    return f"{value:g} ({'met' if ok else 'MISSED'})"


def _chosen(r: dict[str, Any]) -> dict[str, Any]:
    sweep = r["in_process"]["sweep"]
    return next((p for p in sweep if p["nprobe"] == r["nprobe"]), sweep[-1])


def table(results: list[dict[str, Any]]) -> str:
    def row(label: str, cells: list[str]) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = [row("", [f"{r['size']:,} items" for r in results]), "|---|" + "---|" * len(results)]
    load = "load"
    get: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("FAISS kinds (trained, new); nprobe", lambda r: f"{' + '.join(r['in_process']['kinds'])}; {r['nprobe']}"),
        ("catalogue: embed + bulk store write, s", lambda r: f"{r.get('catalogue_s', '-')}"),
        ("index build in process, s", lambda r: f"{r['in_process']['build_s']}"),
        ("server start-up, index built from the store, s", lambda r: f"{r['startup_build_s']}" if "startup_build_s" in r
         else f"not measured: started from the in-process index ({r['startup_from_in_process_snapshot_s']} s)"),
        ("server start-up from its snapshot, s", lambda r: f"{r['startup_snapshot_s']}"),
        ("recall@20 served vs exact, real users", lambda r: _target(r["served_recall"], 0.95, below=False)),
        ("recall@20 of the new items' list, real users / random directions (in process, at nprobe)",
         lambda r: f"{_chosen(r)['recall_new_real']} / {_chosen(r)['recall_new_random']}"),
        ("/recommend p50 / p99 ms, 16 clients", lambda r: f"{r[load]['service']['p50_ms']} / "
         + _target(r[load]["service"]["p99_ms"], 15.0)),
        ("/recommend p50 / p99 ms, 1 client", lambda r: f"{r['unloaded']['p50_ms']} / {r['unloaded']['p99_ms']}"),
        ("/recommend req/s, 16 clients", lambda r: f"{r[load]['service']['throughput_rps']}"),
        ("bare FastAPI floor req/s", lambda r: f"{r[load]['floor']['throughput_rps']}"),
        ("throughput / floor (median of 5 rounds)", lambda r: _target(r[load]["service_vs_floor"], 0.5, below=False)),
        ("floor with the route's dependency / with hand-joined JSON (no model, no dependency), req/s", lambda r: (
            f"{r[load]['floor_deps']['throughput_rps']} / {r[load]['floor_strings']['throughput_rps']}")),
        ("the same service, each request alone (M2REC_RECOMMEND_BATCH_MAX=1): req/s, service / it", lambda r: (
            f"{r[load]['service_unbatched']['throughput_rps']}, {r[load]['service_vs_service_unbatched']}")
         if "service_unbatched" in r[load] else "-"),
        ("reference tree req/s (recall), service / reference", lambda r: (
            f"{r[load]['reference']['throughput_rps']} ({r['reference_recall']}), {r[load]['service_vs_reference']}")
         if "reference" in r[load] else "-"),
        ("server RSS MB after load / after ingest (peak) / after restart", lambda r: (
            f"{r['rss_mb']:.0f} / {r['rss_after_ingest_mb']:.0f} ({r['rss_after_ingest_peak_mb']:.0f}) / "
            f"{r['rss_restart_mb']:.0f}")),
        ("POST /items p50 / p99 ms, 1 client", lambda r: (
            f"{r['ingest']['single_c1']['p50_ms']} / {r['ingest']['single_c1']['p99_ms']}")),
        ("POST /items items/s, 16 clients (p99 ms)", lambda r: (
            f"{r['ingest']['single_c16']['throughput_rps']} ({r['ingest']['single_c16']['p99_ms']})")),
        ("POST /items/batch (500) items/s", lambda r: f"{r['ingest']['batch500_c2']['items_per_s']}"),
        ("max single insert ms, a merge in the window", lambda r: _target(r["ingest"]["insert_stall"]["max_ms"], 50.0)),
        ("exclusions: over-fetch / a selector per query, ms per 16 queries", lambda r: (
            f"{r['in_process']['exclusions'].get('overfetch_ms_per_16', '-')} / "
            f"{r['in_process']['exclusions'].get('selector_per_query_ms_per_16', '-')}")),
        ("load average before / after", lambda r: (
            f"{' '.join(f'{v:.1f}' for v in r['load_before'])} / {' '.join(f'{v:.1f}' for v in r['load_after'])}")),
    ]
    for label, fn in get:
        lines.append(row(label, [fn(r) for r in results]))
    return "\n".join(lines)


def sweep_table(r: dict[str, Any]) -> str:
    lines = [f"Recall@20 against exact over nprobe, {r['size']:,} items (in process, batches of 16 queries):", "",
             "| nprobe | served list, real users | new items' list, real users | new items' list, random directions "
             "| search ms per 16 queries |", "|---|---|---|---|---|"]
    for p in r["in_process"]["sweep"]:
        lines.append(f"| {p['nprobe']} | {p['recall_served_real']} | {p['recall_new_real']} | "
                     f"{p['recall_new_random']} | {p['search_ms_per_16']} |")
    h = r.get("hnsw_vs_ivf")
    if h:
        lines += ["", f"HNSW (M 32, efConstruction 64) against IVF-PQ4 on a sample of {h['rows']:,} new rows, "
                  f"recall@20 for real users / random directions (build {h['hnsw_build_s']} s against "
                  f"{h['ivf_build_s']} s, 2 threads):", "",
                  "| HNSW efSearch | recall | ms/query | IVF nprobe | recall | ms/query |", "|---|---|---|---|---|---|"]
        for a, b in zip(h["hnsw"], h["ivf"], strict=True):
            lines.append(f"| {a['setting']} | {a['recall']} / {a['recall_random']} | {a['ms_per_query']} | "
                         f"{b['setting']} | {b['recall']} / {b['recall_random']} | {b['ms_per_query']} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for r in results:
        sweep = r["in_process"]["sweep"]
        n = [p["nprobe"] for p in sweep]
        ax.plot(n, [p["recall_new_real"] for p in sweep], "o-", label=f"{r['size']:,}: real users")
        ax.plot(n, [p["recall_new_random"] for p in sweep], "s--", label=f"{r['size']:,}: random directions")
    ax.set(xscale="log", xlabel="nprobe", ylabel="recall@20 vs exact", title="New items' list: recall")
    ax.legend(fontsize=8)
    ax = axes[1]
    names = ["service", "service_unbatched", "floor", "floor_deps", "floor_strings", "reference"]
    for r in results:
        present = [n for n in names if n in r["load"]]
        ax.bar([f"{n}\n{r['size']:,}" for n in present], [r["load"][n]["throughput_rps"] for n in present])
    ax.set(ylabel="requests/s (16 clients)", title="/recommend against the HTTP floors")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(meta: dict[str, Any], results: list[dict[str, Any]], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, stem.with_suffix(".png"))
    text = "\n".join([
        "# Serving benchmark", "",
        f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
        f"Model: {meta['model_version']} (D={meta['model']['item_dim']}), run {meta['started']}, "
        f"{meta['minutes']} min; store {meta['store']}  ",
        f"Load: closed loop, {meta['concurrency']} keep-alive connections, k={meta['k']}; {meta['rounds']} rounds of "
        f"{meta['seconds_per_window']} s windows, one per server/route in turn (servers on core 0, client on core 1).",
        "", table(results), "", *[sweep_table(r) + "\n" for r in results],
    ])
    md = stem.with_suffix(".md")
    notes = md.read_text().partition(NOTES)[2] if md.is_file() else ""
    md.write_text(text + (f"\n{NOTES}{notes}" if notes else ""))  # hand-written notes survive a re-render
    print(text)


def main() -> None:
    """Re-render serve.md and serve.png from serve.json (e.g. after editing the notes)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("json", type=Path, nargs="?", default=Path("benchmarks/results/serve.json"))
    args = parser.parse_args()
    data = json.loads(args.json.read_text())
    write_report(data["meta"], data["results"], args.json.with_suffix(""))


if __name__ == "__main__":
    main()
