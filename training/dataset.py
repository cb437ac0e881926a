"""The one dataset format: a folder that speaks the same language as a `POST /items` payload.

    interactions.csv   user,item[,timestamp]      string ids, one positive event a row
    items.csv          item,attributes            `|`-joined tokens such as `genre:Drama`
    features.npy       float32 (I, F), optional   row i = items.csv row i (dense content vector)
    cold_items.txt     one item id a line, optional: when present it fixes the cold set

Every item that appears in interactions.csv must appear in items.csv; items.csv may list
items nobody interacted with.
"""

from __future__ import annotations

import csv
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ATTRIBUTE_SEPARATOR = "|"
DATA_FILES = ("interactions.csv", "items.csv", "features.npy", "cold_items.txt")


class DatasetError(ValueError):
    """A dataset folder that does not follow the format; the message says what to fix."""


@dataclass
class Dataset:
    name: str
    item_ids: list[str]  # row order of items.csv and features.npy
    item_attributes: list[list[str]]  # tokens of each item, same order
    user_ids: list[str]
    interactions: np.ndarray  # (N, 2) int64 [user_idx, item_idx], deduplicated
    timestamps: np.ndarray | None = None  # (N,) int64, aligned with interactions
    features: np.ndarray | None = None  # (I, F) float32
    cold_items: list[str] | None = None  # fixed cold set, when the folder has one
    _item_index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._item_index = {item: i for i, item in enumerate(self.item_ids)}
        if len(self._item_index) != len(self.item_ids):
            raise DatasetError(f"{self.name}: duplicate item ids in items.csv")
        if len(self.item_attributes) != len(self.item_ids):
            raise DatasetError(f"{self.name}: {len(self.item_attributes)} attribute rows for "
                               f"{len(self.item_ids)} items")
        if self.features is not None and self.features.shape[0] != len(self.item_ids):
            raise DatasetError(f"{self.name}: features.npy has {self.features.shape[0]} rows but "
                               f"items.csv has {len(self.item_ids)}; row i must be item i")

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def item_index(self, item_id: str) -> int:
        return self._item_index[item_id]

    def interaction_matrix(self) -> sp.csr_matrix:
        """Binary (U, I) matrix of every interaction."""
        n = len(self.interactions)
        return sp.csr_matrix(
            (np.ones(n, dtype=np.float32), (self.interactions[:, 0], self.interactions[:, 1])),
            shape=(self.n_users, self.n_items),
        )

    def attribute_vocabulary(self) -> list[str]:
        """Sorted distinct attribute tokens."""
        return sorted({tok for toks in self.item_attributes for tok in toks})

    def attribute_matrix(self, vocabulary: list[str] | None = None) -> sp.csr_matrix:
        """Binary (I, A) multi-hot of attributes over `vocabulary` (tokens outside it are dropped)."""
        vocab = vocabulary if vocabulary is not None else self.attribute_vocabulary()
        col = {tok: j for j, tok in enumerate(vocab)}
        rows: list[int] = []
        cols: list[int] = []
        for i, toks in enumerate(self.item_attributes):
            for tok in toks:
                j = col.get(tok)
                if j is not None:
                    rows.append(i)
                    cols.append(j)
        data = np.ones(len(rows), dtype=np.float32)
        return sp.csr_matrix((data, (rows, cols)), shape=(self.n_items, len(vocab)))

    def statistics(self) -> dict[str, float | int]:
        with_inter = np.unique(self.interactions[:, 1]).size
        n_attr = sum(len(a) for a in self.item_attributes)
        return {
            "users": self.n_users,
            "items": self.n_items,
            "items_with_interactions": with_inter,
            "interactions": len(self.interactions),
            "density": float(len(self.interactions) / max(1, self.n_users * self.n_items)),
            "attribute_tokens": len(self.attribute_vocabulary()),
            "mean_attributes_per_item": float(n_attr / max(1, self.n_items)),
            "feature_dim": 0 if self.features is None else int(self.features.shape[1]),
        }


def load_dataset(path: str | os.PathLike[str], name: str | None = None) -> Dataset:
    """Read a dataset folder, checking it against the format."""
    root = Path(path)
    items_csv, inter_csv = root / "items.csv", root / "interactions.csv"
    for required in (items_csv, inter_csv):
        if not required.is_file():
            raise DatasetError(f"{root}: missing {required.name} (see the dataset format in docs/DATA.md)")

    item_ids: list[str] = []
    item_attributes: list[list[str]] = []
    with items_csv.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or reader.fieldnames[:2] != ["item", "attributes"]:
            raise DatasetError(f"{items_csv}: header must be 'item,attributes', got {reader.fieldnames}")
        for row in reader:
            item_ids.append(row["item"])
            attrs = row["attributes"]
            item_attributes.append([t for t in attrs.split(ATTRIBUTE_SEPARATOR) if t] if attrs else [])
    item_index = {item: i for i, item in enumerate(item_ids)}

    users: dict[str, int] = {}
    pairs: list[tuple[int, int]] = []
    stamps: list[int] = []
    with inter_csv.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if fields[:2] != ["user", "item"]:
            raise DatasetError(f"{inter_csv}: header must start 'user,item', got {fields}")
        has_time = "timestamp" in fields
        for line, row in enumerate(reader, start=2):
            j = item_index.get(row["item"])
            if j is None:
                raise DatasetError(f"{inter_csv}:{line}: item {row['item']!r} is not in items.csv")
            u = users.setdefault(row["user"], len(users))
            pairs.append((u, j))
            if has_time:
                stamps.append(int(row["timestamp"]))

    inter = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    times = np.asarray(stamps, dtype=np.int64) if stamps else None
    # Duplicated (user, item) events count once: the models see implicit, binary feedback.
    _, first = np.unique(inter[:, 0] * len(item_ids) + inter[:, 1], return_index=True)
    first.sort()
    inter = inter[first]
    times = times[first] if times is not None else None

    features = None
    if (root / "features.npy").is_file():
        features = np.load(root / "features.npy")
        if features.dtype != np.float32 or features.ndim != 2:
            raise DatasetError(f"{root}/features.npy: need a 2-D float32 array, got {features.dtype} "
                               f"{features.shape}")
        if not np.isfinite(features).all():
            raise DatasetError(f"{root}/features.npy: contains NaN or infinite values")

    cold = None
    if (root / "cold_items.txt").is_file():
        cold = [ln.strip() for ln in (root / "cold_items.txt").read_text().splitlines() if ln.strip()]
        unknown = [c for c in cold if c not in item_index]
        if unknown:
            raise DatasetError(f"{root}/cold_items.txt: {len(unknown)} ids not in items.csv, e.g. {unknown[:3]}")

    return Dataset(
        name=name or root.name,
        item_ids=item_ids,
        item_attributes=item_attributes,
        user_ids=list(users),
        interactions=inter,
        timestamps=times,
        features=features,
        cold_items=cold,
    )


def save_dataset(dataset: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write `dataset` in the folder format, atomically (temporary folder, then rename)."""
    root = Path(path)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    for ids in (dataset.item_ids, dataset.user_ids):
        bad = [x for x in ids if not x or any(c in x for c in ",\n\r\"")]
        if bad:
            raise DatasetError(f"ids must be non-empty and free of commas, quotes and newlines: {bad[:3]}")
    with (tmp / "items.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["item", "attributes"])
        for item, attrs in zip(dataset.item_ids, dataset.item_attributes, strict=True):
            if any(ATTRIBUTE_SEPARATOR in a for a in attrs):
                raise DatasetError(f"item {item}: attribute tokens may not contain '|': {attrs}")
            w.writerow([item, ATTRIBUTE_SEPARATOR.join(attrs)])
    with (tmp / "interactions.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        has_time = dataset.timestamps is not None
        w.writerow(["user", "item", "timestamp"] if has_time else ["user", "item"])
        for k, (u, j) in enumerate(dataset.interactions.tolist()):
            row = [dataset.user_ids[u], dataset.item_ids[j]]
            if dataset.timestamps is not None:
                row.append(str(int(dataset.timestamps[k])))
            w.writerow(row)
    if dataset.features is not None:
        np.save(tmp / "features.npy", dataset.features.astype(np.float32, copy=False))
    if dataset.cold_items is not None:
        (tmp / "cold_items.txt").write_text("".join(f"{c}\n" for c in dataset.cold_items))
    if root.exists():
        old = root.with_name(f".{root.name}.old")
        os.replace(root, old)
        os.replace(tmp, root)
        for p in old.iterdir():
            p.unlink()
        old.rmdir()
    else:
        os.replace(tmp, root)
    return root


def fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 over the data files of a dataset folder: which exact data a result came from."""
    h = hashlib.sha256()
    root = Path(path)
    for name in DATA_FILES:
        p = root / name
        if p.is_file():
            h.update(name.encode())
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()
