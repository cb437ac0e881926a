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


def table(results: list[dict[str, Any]]) -> str:
    def row(label: str, cells: list[str]) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    sizes = [f"{r['indexed']:,} items" for r in results]
    lines = [row("", sizes), "|---|" + "---|" * len(results)]
    get: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("index (nprobe)", lambda r: f"{r['index']}" + (f" ({r['nprobe']})" if r["index"] == "ivf" else "")),
        ("server start-up, s", lambda r: f"{r['startup_s']}"),
        ("recall@20 served vs exact", lambda r: _target(round(r["served_recall"], 4), 0.95, below=False)),
        ("recall@20 of the IVF alone, registered items (at nprobe)", lambda r: " / ".join(
            f"{v} ({n})" for n, v in r["ivf_recall"].items()) if r.get("ivf_recall") else "-"),
        ("/recommend p50 ms, 16 clients", lambda r: f"{r['recommend']['p50_ms']}"),
        ("/recommend p99 ms, 16 clients", lambda r: _target(
            r["recommend"]["p99_ms"], 25.0 if r["indexed"] > 500_000 else 15.0)),
        ("/recommend throughput req/s", lambda r: f"{r['recommend']['throughput_rps']}"),
        ("requests per batch (mean, under load)", lambda r: f"{r.get('batch_mean', '-')}"),
        ("HTTP floor throughput req/s", lambda r: f"{r['floor']['throughput_rps']}"),
        ("HTTP floor p50 / p99 ms", lambda r: f"{r['floor']['p50_ms']} / {r['floor']['p99_ms']}"),
        ("throughput / floor (median of the paired windows)", lambda r: _target(r["throughput_vs_floor"], 0.5,
                                                                               below=False)),
        ("throughput / floor, each pair", lambda r: " ".join(f"{v:g}" for v in r.get("throughput_vs_floor_pairs", []))
         or "-"),
        ("/recommend p50 / p99 ms, 1 client", lambda r: f"{r['unloaded']['p50_ms']} / {r['unloaded']['p99_ms']}"),
        ("in-process recommend() p50 / p99 ms", lambda r: f"{r['compute']['p50_ms']} / {r['compute']['p99_ms']}"),
        ("in-process recommend_many(10 users) p50 ms per user",
         lambda r: f"{r['compute_batched']['p50_ms_per_user']}" if "compute_batched" in r else "-"),
        ("in-process index.search p50 / p99 ms",
         lambda r: f"{r['compute_search_only']['p50_ms']} / {r['compute_search_only']['p99_ms']}"),
        ("server RSS MB (peak)", lambda r: f"{r['rss_end_mb']:.0f} ({r['rss_end_peak_mb']:.0f})"),
        ("POST /items p50 / p99 ms, 1 client", lambda r: (
            f"{r['ingest']['single_c1']['p50_ms']} / " + _target(r["ingest"]["single_c1"]["p99_ms"], 15.0))),
        ("POST /items items/s, 16 clients (p99 ms)", lambda r: (
            f"{r['ingest']['single_c16']['throughput_rps']} ({r['ingest']['single_c16']['p99_ms']})")),
        ("POST /items/batch (500) items/s", lambda r: _target(r["ingest"]["batch500_c2"]["items_per_s"],
                                                            2000.0, below=False)),
        ("first recommendation p50 / p99 ms", lambda r: (
            f"{r['first_recommendation']['p50_ms']} / " + _target(r["first_recommendation"]["p99_ms"], 50.0))),
        ("max single insert ms (merge in window)", lambda r: _target(
            r["insert_stall"]["max_ms"], 100.0) if "insert_stall" in r else "not run"),
    ]
    for label, fn in get:
        lines.append(row(label, [fn(r) for r in results]))
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    sizes = [r["indexed"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(sizes, [r["recommend"]["p50_ms"] for r in results], "o-", label="/recommend p50 (16 clients)")
    ax.plot(sizes, [r["recommend"]["p99_ms"] for r in results], "o-", label="/recommend p99 (16 clients)")
    ax.plot(sizes, [r["floor"]["p99_ms"] for r in results], "s--", label="HTTP floor p99")
    ax.plot(sizes, [r["compute"]["p50_ms"] for r in results], "^:", label="in-process recommend() p50")
    ax.set(xscale="log", xlabel="items indexed", ylabel="ms", title="Latency")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(sizes, [r["recommend"]["throughput_rps"] for r in results], "o-", label="/recommend")
    ax.plot(sizes, [r["floor"]["throughput_rps"] for r in results], "s--", label="HTTP floor")
    ax.set(xscale="log", xlabel="items indexed", ylabel="requests/s", title="Throughput (1 worker, 16 clients)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(sizes, [r["rss_end_mb"] for r in results], "o-", label="server RSS MB")
    ax.plot(sizes, [r["ingest"]["batch500_c2"]["items_per_s"] for r in results], "s-", label="batch ingest items/s")
    ax.plot(sizes, [r["ingest"]["single_c16"]["throughput_rps"] for r in results], "^-", label="single ingest items/s")
    ax.set(xscale="log", xlabel="items indexed", title="Memory and ingest")
    ax.legend(fontsize=8)
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
        f"{meta['minutes']} min  ",
        f"Load: closed loop, {meta['concurrency']} keep-alive connections, k={meta['k']}; "
        + (f"{meta['pairs']} windows of {meta['seconds_per_window']} s on the service, each followed by one on the "
           f"HTTP floor (both up, pinned to core 0; client on core 1)." if "pairs" in meta else
           f"{meta['seconds_per_window']} s windows; server pinned to core 0, client to core 1."), "",
        table(results), "",
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
