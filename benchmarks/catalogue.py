"""Large synthetic catalogues built from the real item distribution, and benchmark users.

Two constructions; an item's index row is always the trained generator's output for its inputs
(user-neutral gate, the same call the service makes), so the index holds what the model would
produce for a catalogue of this kind, not random vectors.

- `synthetic_batch` ("recombined"): one real item's attribute set (30% with one token swapped for
  another item's) and a mix of two real content vectors plus a little noise. A million of them are
  perturbations of 1,682 real items: ~1.7k tight clusters, which makes IVF look easy.
- `diverse_batch` ("diverse"): every item is its own draw: as many attribute tokens as a random real
  item has, drawn from the whole vocabulary by frequency, and a random convex mix of three real
  content vectors plus noise. No two items share inputs, so the catalogue has as many input clusters
  as items; benchmarks/results/serve.md measures how hard that makes IVF (recall against nprobe).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from service.core.recommender import Recommender
from service.model import item_inputs
from service.store import Interaction, ItemRecord, Store
from training.dataset import Dataset

Rows = npt.NDArray[np.float32]  # (N, D+1)
SYNTHETIC_PREFIX = "syn:"


@dataclass
class SyntheticBatch:
    ids: list[str]
    attributes: list[list[str]]
    content: npt.NDArray[np.float32]  # (B, F)


def synthetic_batch(dataset: Dataset, start: int, n: int, seed: int) -> SyntheticBatch:
    """Items syn:{start}..syn:{start+n-1}; the same (start, n, seed) always gives the same items."""
    rng = np.random.default_rng([seed, start])
    assert dataset.features is not None
    features = dataset.features  # (I, F)
    n_items = len(dataset.item_ids)
    base = rng.integers(0, n_items, n)
    donor = rng.integers(0, n_items, n)
    mix = rng.uniform(0.0, 0.4, n).astype(np.float32)[:, None]
    scale = float(np.linalg.norm(features, axis=1).mean())
    noise = rng.standard_normal((n, features.shape[1]), dtype=np.float32)
    noise *= 0.1 * scale / np.sqrt(features.shape[1])
    content = (1 - mix) * features[base] + mix * features[donor] + noise  # (B, F)
    attributes: list[list[str]] = []
    swap = rng.uniform(size=n) < 0.3
    for b in range(n):
        tokens = list(dataset.item_attributes[base[b]])
        donor_tokens = dataset.item_attributes[donor[b]]
        if swap[b] and tokens and donor_tokens:
            tokens[int(rng.integers(len(tokens)))] = donor_tokens[int(rng.integers(len(donor_tokens)))]
        attributes.append(list(dict.fromkeys(tokens)))
    return SyntheticBatch([f"{SYNTHETIC_PREFIX}{start + b}" for b in range(n)], attributes,
                          content.astype(np.float32))


def diverse_batch(dataset: Dataset, start: int, n: int, seed: int) -> SyntheticBatch:
    """Items syn:{start}..syn:{start+n-1} drawn independently; the same (start, n, seed) gives the same items."""
    rng = np.random.default_rng([seed, start, 18])
    assert dataset.features is not None
    features = dataset.features  # (I, F)
    vocabulary = sorted({t for tokens in dataset.item_attributes for t in tokens})
    position = {t: j for j, t in enumerate(vocabulary)}
    counts = np.zeros(len(vocabulary))
    for tokens in dataset.item_attributes:
        counts[[position[t] for t in tokens]] += 1
    sizes = np.array([len(a) for a in dataset.item_attributes])[rng.integers(0, len(dataset.item_ids), n)]
    # tokens by frequency; drawn with replacement, twice as many as needed, the first `size` distinct kept
    draws = rng.choice(len(vocabulary), size=(n, 2 * int(sizes.max(initial=1))), p=counts / counts.sum())
    attributes = [[vocabulary[j] for j in list(dict.fromkeys(draws[b, : 2 * sizes[b]].tolist()))[: sizes[b]]]
                  for b in range(n)]
    weights = rng.dirichlet(np.ones(3), n).astype(np.float32)  # (B, 3)
    donors = rng.integers(0, len(features), (n, 3))
    content = np.einsum("bk,bkf->bf", weights, features[donors])  # (B, F)
    scale = float(np.linalg.norm(features, axis=1).mean())
    content += rng.standard_normal(content.shape, dtype=np.float32) * (0.2 * scale / np.sqrt(features.shape[1]))
    return SyntheticBatch([f"{SYNTHETIC_PREFIX}{start + b}" for b in range(n)], attributes,
                          content.astype(np.float32))


def embed_batch(recommender: Recommender, batch: SyntheticBatch, chunk: int = 1024) -> Rows:
    """Rows (B, D+1[+f]) under the neutral gate: what POST /items would store for these inputs.

    Chunks of items with similar attribute counts: the generator pads attributes to the longest
    item of a chunk, and padding is most of the work when one item has 100 tokens and most 20.
    Rows are independent of their chunk-mates, so the order changes nothing but the time.
    """
    order = np.argsort([len(a) for a in batch.attributes], kind="stable")
    out = np.empty((len(order), recommender.dim), np.float32)
    for s in range(0, len(order), chunk):
        part = order[s : s + chunk]
        attributes, _ = recommender.embedder.vocabulary.encode([batch.attributes[b] for b in part])  # (B, A)
        content = torch.from_numpy(batch.content[part])  # (B, F)
        out[part] = recommender.embedder.rows_of(item_inputs(attributes, content, recommender.content_dim))
    return out


def fill_store(
    recommender: Recommender, store: Store, dataset: Dataset, start: int, stop: int, seed: int,
    batch_size: int = 10_000, make: Callable[[Dataset, int, int, int], SyntheticBatch] = synthetic_batch,
) -> Rows:
    """Write synthetic items [start, stop) to the store (rows already computed, as the service would
    have stored them) and return their rows (stop-start, D+1) for exact-search oracles."""
    out: list[Rows] = []
    now = time.time()
    with tqdm(total=stop - start, desc=f"catalogue {start:,}->{stop:,}", unit="item") as bar:
        for s in range(start, stop, batch_size):
            n = min(batch_size, stop - s)
            batch = make(dataset, s, n, seed)
            rows = embed_batch(recommender, batch)
            records = [
                ItemRecord(item_id, attrs, content, row, recommender.version, now)
                for item_id, attrs, content, row in zip(
                    batch.ids, batch.attributes, _rows_as_lists(batch.content), rows, strict=True)
            ]
            store.put_items(records)
            out.append(rows)
            bar.update(n)
    return np.concatenate(out) if out else np.zeros((0, recommender.dim), np.float32)


def catalogue_rows(recommender: Recommender, dataset: Dataset, start: int, stop: int, seed: int,
                   batch_size: int = 10_000, make: Callable[[Dataset, int, int, int], SyntheticBatch] = synthetic_batch,
                   ) -> Rows:
    """The rows `fill_store` wrote for items [start, stop), computed again instead of read back (a 10M
    catalogue in SQLite is ~47 GB, read back in key order at random-I/O speed)."""
    out: list[Rows] = []
    with tqdm(total=stop - start, desc=f"catalogue rows {start:,}->{stop:,}", unit="item") as bar:
        for s in range(start, stop, batch_size):
            n = min(batch_size, stop - s)
            out.append(embed_batch(recommender, make(dataset, s, n, seed)))
            bar.update(n)
    return np.concatenate(out) if out else np.zeros((0, recommender.dim), np.float32)


def _rows_as_lists(content: npt.NDArray[np.float32]) -> Iterator[list[float]]:
    for row in content:
        values: list[float] = row.tolist()
        yield values


def benchmark_users(
    dataset: Dataset, recommender: Recommender, n_users: int, n_synthetic: int, cold_per_user: int, seed: int,
) -> dict[str, list[str]]:
    """Real ml-100k histories (their trained items) plus a few registered items each, so every
    request also folds in rows read from the store, as the service does for new items."""
    rng = np.random.default_rng(seed)
    by_user: dict[int, list[int]] = {}
    for u, i in dataset.interactions.tolist():
        by_user.setdefault(u, []).append(i)
    users = sorted(by_user)
    chosen = rng.choice(len(users), size=min(n_users, len(users)), replace=False)
    histories: dict[str, list[str]] = {}
    for c in chosen.tolist():
        u = users[c]
        warm = [dataset.item_ids[i] for i in by_user[u] if recommender.is_trained(dataset.item_ids[i])]
        cold = [f"{SYNTHETIC_PREFIX}{j}" for j in rng.integers(0, n_synthetic, cold_per_user).tolist()]
        histories[f"bench:{dataset.user_ids[u]}"] = warm + cold
    return histories


def write_histories(store: Store, histories: dict[str, list[str]]) -> None:
    t = time.time() - 1e6
    batch = [Interaction(user, item, t + k) for user, items in histories.items() for k, item in enumerate(items)]
    for s in range(0, len(batch), 50_000):
        store.add_interactions(batch[s : s + 50_000])
