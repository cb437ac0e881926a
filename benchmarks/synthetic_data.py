"""A synthetic dataset in the one folder format (training/dataset.py), for training at sizes no real
dataset here has: power-law item popularity, users who mostly stay in a topic, attributes and a
dense content vector generated from each item's topic.

    python -m benchmarks.synthetic_data --users 1000000 --items 100000 --out data/synthetic-1m

Items: topic t ~ uniform over `topics`; popularity weight (rank)^-alpha, ranks shuffled; tokens
`topic:t`, two or three `tag:` tokens drawn from the topic's own 20 tags, and `decade:` at random;
content = the topic's centre + noise (unit scale, `content_dim` wide). Users: a topic each; history
length 1 + Poisson-lognormal around `mean_history` (capped at 500); each interaction is an item of
the user's topic with probability `in_topic` (by popularity within the topic), else any item (by
popularity). Duplicate (user, item) pairs are dropped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from training.dataset import Dataset, save_dataset


def synthetic(users: int, items: int, seed: int = 0, topics: int = 50, content_dim: int = 64, alpha: float = 1.0,
              mean_history: float = 20.0, in_topic: float = 0.7) -> Dataset:
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, topics, items)  # (I,)
    popularity = rng.permutation(np.arange(1, items + 1, dtype=np.float64) ** -alpha)  # (I,) power law
    tags = rng.integers(0, 20, (items, 3))  # (I, 3) the topic's own tags
    n_tags = rng.integers(2, 4, items)
    decade = rng.integers(195, 203, items)
    attributes = [[f"topic:{topic[i]}", *{f"tag:{topic[i]}-{t}" for t in tags[i, : n_tags[i]]},
                   f"decade:{decade[i]}0s"] for i in range(items)]
    centres = rng.normal(size=(topics, content_dim))
    content = (centres[topic] + 0.7 * rng.normal(size=(items, content_dim))).astype(np.float32)  # (I, F)

    user_topic = rng.integers(0, topics, users)  # (U,)
    lengths = np.minimum(1 + rng.poisson(rng.lognormal(np.log(mean_history), 0.8, users)), 500)  # (U,)
    owner = np.repeat(np.arange(users), lengths)  # (N,)
    chosen = np.empty(owner.size, dtype=np.int64)
    stay = rng.random(owner.size) < in_topic
    chosen[~stay] = _by_popularity(np.arange(items), popularity, int((~stay).sum()), rng)
    for t in range(topics):
        here = np.flatnonzero(stay & (user_topic[owner] == t))
        members = np.flatnonzero(topic == t)
        chosen[here] = _by_popularity(members, popularity[members], here.size, rng)
    pairs = np.unique(np.stack([owner, chosen], axis=1), axis=0)  # (N', 2) deduplicated
    return Dataset(
        name=f"synthetic-{users}x{items}",
        item_ids=[f"i{i}" for i in range(items)],
        item_attributes=attributes,
        user_ids=[f"u{u}" for u in range(users)],
        interactions=pairs.astype(np.int64),
        features=content,
    )


def _by_popularity(pool: np.ndarray, weight: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws from `pool` with probability proportional to `weight` (inverse CDF)."""
    cdf = np.cumsum(weight)
    drawn: np.ndarray = pool[np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1]), pool.size - 1)]
    return drawn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--content-dim", type=int, default=64)
    parser.add_argument("--mean-history", type=float, default=20.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    data = synthetic(args.users, args.items, args.seed, content_dim=args.content_dim, mean_history=args.mean_history)
    print(save_dataset(data, args.out), f"{data.n_users} users, {data.n_items} items, "
          f"{len(data.interactions)} interactions")


if __name__ == "__main__":
    main()
