"""The IVF scan kernel (service/index/_ivf_scan.c) and the list layout it reads (service/index/ivf_lists.py),
against a brute-force reference over the same lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from service.index._scoring import inner_products, ivf_search
from service.index.ivf_lists import ListPanels
from service.index.storage import Banned

Ids = npt.NDArray[np.int64]
Rows = npt.NDArray[np.float32]
Floats = npt.NDArray[np.float32]


def make_shard(
    rng: np.random.Generator, nlist: int, n: int, d: int, first_iid: int
) -> tuple[ListPanels, Ids, Rows, Ids]:
    """A shard of n random rows spread over nlist lists (some empty), ids first_iid.. shuffled."""
    lists = np.sort(rng.integers(0, nlist - 1, n))  # the last list stays empty
    iids = rng.permutation(np.arange(first_iid, first_iid + n)).astype(np.int64)
    rows = rng.standard_normal((n, d)).astype(np.float32)
    return ListPanels.build(iids, rows, lists, nlist), iids, rows, lists


def reference(queries: Rows, probes: Ids, shards: list[tuple[Ids, Rows, Ids]], banned: Banned,
              k: int) -> list[list[tuple[float, int]]]:
    """Each query's rows of its probed lists, banned ids dropped, scored by inner_products, ranked
    by score then id: the best k and every row tied with the k-th."""
    out = []
    ban = banned.per_query
    for b, q in enumerate(queries):
        cands: list[tuple[float, int]] = []
        for iids, rows, lists in shards:
            take = np.isin(lists, probes[b]) & ~np.isin(iids, ban[b])
            scores = np.empty((1, int(take.sum())), np.float32)
            inner_products(q[None], rows[take], scores)
            cands += zip(scores[0].tolist(), iids[take].tolist(), strict=True)
        cands.sort(key=lambda c: (-c[0], c[1]))
        if len(cands) > k:
            cands = [c for c in cands if c[0] >= cands[k - 1][0]]
        out.append(cands)
    return out


def run(queries: Rows, probes: Ids, shards: list[ListPanels], banned: Banned, k: int, room: int,
        floors: Floats | None = None) -> tuple[list[list[tuple[float, int]]], Ids, Floats]:
    n = len(queries)
    scores, iids = np.empty((n, room), np.float32), np.empty((n, room), np.int64)
    count, bound = np.empty(n, np.int64), np.empty(n, np.float32)
    floors = np.full(n, -np.inf, np.float32) if floors is None else floors
    ivf_search(queries, probes, [s.kernel_args for s in shards], banned.keys, k, floors, scores, iids, count, bound)
    got = [list(zip(scores[b, : min(c, room)].tolist(), iids[b, : min(c, room)].tolist(), strict=True))
           for b, c in enumerate(count.tolist())]
    return got, count, bound


@pytest.mark.parametrize(("k", "d"), [(1, 65), (20, 65), (20, 9), (5, 129)])
def test_each_query_gets_the_best_k_of_its_lists_in_every_shard_without_its_banned_ids(k: int, d: int) -> None:
    rng = np.random.default_rng(k + d)
    nlist = 12
    built = [make_shard(rng, nlist, n, d, first) for n, first in [(700, 0), (37, 5000), (1, 9000)]]
    queries = rng.standard_normal((9, d)).astype(np.float32)
    probes = np.stack([rng.choice(nlist, 3, replace=False) for _ in range(9)]).astype(np.int64)
    probes[4, 2] = -1  # a query with fewer lists
    every = np.concatenate([b[1] for b in built])
    owner = np.repeat(np.arange(9), 40)
    banned = Banned(owner, rng.choice(every, 9 * 40).astype(np.int64), 9)
    want = reference(queries, probes, [b[1:] for b in built], banned, k)
    got, count, bound = run(queries, probes, [b[0] for b in built], banned, k, k + 64)
    assert got == want  # same scores bit for bit, same ids, same order
    assert count.tolist() == [len(w) for w in want]
    scanned = [sum(int(np.isin(b[3], probes[q]).sum()) for b in built) for q in range(9)]
    for q in range(9):  # the k-th score as a bound exactly when rows were left out
        left_out = len(want[q]) >= k and scanned[q] > len(want[q])
        assert bound[q] == (want[q][k - 1][0] if left_out else -np.inf)


def test_rows_below_a_floor_are_left_out_and_the_floor_bounds_what_was_left() -> None:
    rng = np.random.default_rng(9)
    d, nlist, k = 33, 6, 10
    built = [make_shard(rng, nlist, 400, d, 0), make_shard(rng, nlist, 300, d, 1000)]
    queries = rng.standard_normal((6, d)).astype(np.float32)
    probes = np.stack([rng.choice(nlist - 1, 2, replace=False) for _ in range(6)]).astype(np.int64)
    banned = Banned(np.repeat(np.arange(6), 5), rng.choice(np.concatenate([b[1] for b in built]), 30), 6)
    unfloored = reference(queries, probes, [b[1:] for b in built], banned, k)
    # floors: below everything, at the 4th best (fewer than k reach it), at the k-th, above everything
    floors = np.array([-50.0, unfloored[1][3][0], unfloored[2][k - 1][0], 1e9, -np.inf, unfloored[5][0][0]], np.float32)
    got, count, bound = run(queries, probes, [b[0] for b in built], banned, k, k + 64, floors)
    for q in range(6):
        want = [c for c in unfloored[q] if c[0] >= floors[q]]
        assert got[q] == want and count[q] == len(want)
        if len(want) >= k:
            assert bound[q] == want[k - 1][0]
        else:  # fewer than k reached the floor: the floor bounds every row left out
            assert bound[q] == floors[q]


def test_every_row_tied_with_the_kth_comes_back_and_too_many_for_the_room_are_counted() -> None:
    rng = np.random.default_rng(5)
    d, nlist = 8, 3
    rows = np.zeros((100, d), np.float32)
    rows[:, 0] = 1.0  # all tie for a query along axis 0
    rows[:3, 0] = 2.0
    lists = np.repeat(np.arange(nlist), [50, 50, 0])
    iids = rng.permutation(100).astype(np.int64)
    shard = ListPanels.build(iids, rows, lists, nlist)
    query = np.zeros((1, d), np.float32)
    query[0, 0] = 1.0
    probes = np.array([[0, 1]], np.int64)
    got, count, _ = run(query, probes, [shard], Banned.none(1), 5, 120)
    assert count[0] == 100 and [s for s, _ in got[0]] == [2.0] * 3 + [1.0] * 97
    assert [i for _, i in got[0][3:]] == sorted(iids[3:].tolist())  # ties ranked by id
    _, count, _ = run(query, probes, [shard], Banned.none(1), 5, 10)
    assert count[0] == 100  # more than the room: the caller asks again with room for all


def test_nan_queries_and_empty_lists_return_nothing() -> None:
    rng = np.random.default_rng(6)
    shard, *_ = make_shard(rng, 4, 50, 7, 0)
    queries = rng.standard_normal((2, 7)).astype(np.float32)
    queries[0, 3] = np.nan
    probes = np.array([[0, 1], [3, -1]], np.int64)  # list 3 is empty
    got, count, bound = run(queries, probes, [shard], Banned.none(2), 5, 10)
    assert got == [[], []] and count.tolist() == [0, 0] and (bound == -np.inf).all()


def test_rejects_lists_that_do_not_fit_their_panels_and_wrong_shapes() -> None:
    rng = np.random.default_rng(7)
    shard, *_ = make_shard(rng, 4, 50, 7, 0)
    queries = rng.standard_normal((1, 7)).astype(np.float32)
    out = (np.zeros(1, np.float32), np.empty((1, 10), np.float32), np.empty((1, 10), np.int64), np.empty(1, np.int64),
           np.empty(1, np.float32))
    bad_rows = shard.rows.copy()
    bad_rows[0] += 100
    with pytest.raises(ValueError, match="shard 0's list 0 does not fit"):
        ivf_search(queries, np.zeros((1, 1), np.int64), [(shard.panels, shard.starts, bad_rows, shard.slot_iids)],
                   np.empty(0, np.int64), 5, *out)
    with pytest.raises(ValueError, match="panels"):
        ivf_search(np.zeros((1, 8), np.float32), np.zeros((1, 1), np.int64), [shard.kernel_args],
                   np.empty(0, np.int64), 5, *out)
    with pytest.raises(ValueError, match="lists"):
        ivf_search(queries, np.zeros((2, 1), np.int64), [shard.kernel_args], np.empty(0, np.int64), 5, *out)


def test_list_panels_give_back_their_rows_by_list_and_survive_a_save(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    shard, iids, rows, lists = make_shard(rng, 5, 90, 11, 100)
    got_iids, got_rows, got_lists = shard.contents()
    assert np.array_equal(got_iids, iids) and np.array_equal(got_rows, rows) and np.array_equal(got_lists, lists)
    in_steps = ListPanels.build(iids, rows, lists, 5, chunk=2)  # laid out 2 panels at a time
    for name in ("panels", "starts", "rows", "slot_iids"):
        assert np.array_equal(getattr(in_steps, name), getattr(shard, name))
    assert shard.rows.tolist() == np.bincount(lists, minlength=5).tolist()
    shard.save(tmp_path / "shard-0")
    loaded = ListPanels.load(tmp_path / "shard-0")
    for name in ("panels", "starts", "rows", "slot_iids"):
        assert np.array_equal(getattr(loaded, name), getattr(shard, name))
    np.save(tmp_path / "shard-0-starts.npy", shard.starts[:-1])
    with pytest.raises(ValueError, match="do not fit"):
        ListPanels.load(tmp_path / "shard-0")
