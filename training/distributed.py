"""Data-parallel training over processes (torch.distributed, gloo on CPU): who this process is, and
the few collective steps the trainer needs besides DDP's gradient all-reduce.

    torchrun --nproc_per_node 2 -m training.train --dataset data/ml-100k --out artifacts
    torchrun --nnodes 2 --node_rank 0|1 --nproc_per_node 2 --rdzv_backend c10d \
        --rdzv_endpoint host0:29500 -m training.train ...      # on each machine

torchrun sets RANK / WORLD_SIZE / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT; without WORLD_SIZE
(a plain `python -m training.train`) nothing here is initialised and every helper answers as the
single process it is, so the single-process path runs exactly the code it ran before.

Every rank holds the whole model and the whole dataset (the item table is needed whole by every
user's softmax); what is split is the work: users in the b-step, items in the t-step (a
DistributedSampler each), and the full-table passes (every user's fold-in, every warm item's
generated row), which each rank computes for its slice and all-gathers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset
from torch.utils.data.distributed import DistributedSampler

T = TypeVar("T")

# Rank 0 validates (a policy search over the whole validation task) while the others wait in a
# collective: far longer than one step, so the wait limit is generous.
TIMEOUT = timedelta(hours=2)
DEFAULT_THREADS = 2  # without a setting: what the trainer has always used (2-core machines)


def launched() -> bool:
    """Started by torchrun (or anything that sets WORLD_SIZE the same way)."""
    return "WORLD_SIZE" in os.environ


def init_from_env() -> None:
    """Join the process group torchrun describes; a no-op for a plain single process."""
    if launched() and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """More than one process trains together (a world of one runs the single-process path)."""
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """The rank that validates, logs and exports."""
    return rank() == 0


def threads_per_process() -> int:
    """Torch threads of this process: M2REC_TRAIN_THREADS, else OMP_NUM_THREADS (torchrun sets it to
    1 per process when it starts several on a node and it is unset), else DEFAULT_THREADS."""
    for name in ("M2REC_TRAIN_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            return max(1, int(value))
    return DEFAULT_THREADS


def broadcast_object(value: T, src: int = 0) -> T:
    """`value` as rank `src` has it, on every rank (small picklable objects: decisions, metrics)."""
    if not active():
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=src)
    result: T = box[0]
    return result


def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor in place with rank `src`'s (same shapes and dtypes on every rank)."""
    if not active():
        return
    for t in tensors:
        contiguous = t.contiguous()
        dist.broadcast(contiguous, src=src)
        if contiguous.data_ptr() != t.data_ptr():
            t.copy_(contiguous)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean of each logged figure over the ranks (each rank saw its own shard); keys must match."""
    if not active() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, (t / world_size()).tolist(), strict=True))


def shard(n: int) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous slice of n rows (the first n % world ranks get one more)."""
    size, extra = divmod(n, world_size())
    r = rank()
    start = r * size + min(r, extra)
    return start, start + size + (1 if r < extra else 0)


def gather_rows(compute: Callable[[np.ndarray], torch.Tensor], n: int) -> torch.Tensor:
    """compute(np.arange(n)) (n, ...), each rank computing its `shard` and all-gathering the rest:
    a full-table pass (every user's vector, every item's generated row) split over the ranks."""
    if not active():
        return compute(np.arange(n))
    start, stop = shard(n)
    mine = compute(np.arange(start, stop))
    # all_gather needs equal shapes: pad every slice to the largest one, then cut the padding off
    width = -(-n // world_size())
    padded = torch.zeros((width, *mine.shape[1:]), dtype=mine.dtype)
    padded[: mine.shape[0]] = mine
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    sizes = [shard_size(n, r) for r in range(world_size())]
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


def shard_size(n: int, of_rank: int) -> int:
    size, extra = divmod(n, world_size())
    return size + (1 if of_rank < extra else 0)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names and bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def check_same_state(state: dict[str, torch.Tensor]) -> str:
    """Raise unless every rank holds the same bytes: DDP keeps replicas equal only while every
    rank applies the same all-reduced gradients to the same weights, and a silent divergence
    would export rank 0's model while the others trained something else. Returns the digest."""
    digest = state_digest(state)
    if not active():
        return digest
    digests: list[Any] = [None] * world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"model replicas diverged across ranks: {digests}")
    return digest


class ShardedOrder:
    """This rank's share of a pool (users, warm rows), in a fresh order every pass: torch's
    DistributedSampler over the pool's positions (one permutation per pass, seeded alike on every
    rank, dealt round-robin; the last ranks' shares padded from the start so all have one size and
    take the same number of steps, which DDP's collective backward needs)."""

    def __init__(self, pool: np.ndarray, seed: int) -> None:
        self.pool = pool
        positions = TensorDataset(torch.arange(pool.size))  # the sampler reads only its length
        self.sampler: DistributedSampler[int] = DistributedSampler(
            positions, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)

    def __len__(self) -> int:
        return self.sampler.num_samples

    def __call__(self, pass_index: int) -> np.ndarray:
        self.sampler.set_epoch(pass_index)
        return self.pool[np.fromiter(iter(self.sampler), dtype=np.int64, count=len(self))]


def rank_rng(seed: int) -> np.random.Generator:
    """NumPy generator of this rank's data noise (input dropout, negatives): the ranks draw apart."""
    return np.random.default_rng([seed, rank()]) if active() else np.random.default_rng(seed)

