"""The batch search's parts on their own: ties at the cut, exact scoring in groups, exclusions
mapped to internal ids, and the id tables the collection reads. Real FAISS and NumPy throughout."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from service.index import IndexConfig, VectorIndex
from service.index.search import exact_found
from service.index.storage import Banned, DeltaSegment, IdMap, ItemTable
from service.index.vector_index import HEAD_SLACK

D = 8
Array = npt.NDArray[np.float32]


def _queries(n: int, seed: int) -> Array:
    h = np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)
    return np.hstack([h, np.ones((n, 1), np.float32)])  # (B, D+1): [h; 1]


@pytest.mark.parametrize("group", [3, HEAD_SLACK + 5])
def test_ties_at_the_cut_are_ranked_by_item_id_across_segments(group: int) -> None:
    """`group` identical rows straddle the k-th place, spread over the pinned segment, the base and
    the delta; the answer is the oracle's: score descending, then item id. A tie group longer than
    the converted head (k + HEAD_SLACK) takes the general collection path."""
    rng = np.random.default_rng(0)
    n, k = 300, 10
    vectors = rng.normal(size=(n, D + 1)).astype(np.float32)
    vectors[:, -1] = 0.0
    q = _queries(1, 1)
    scores = (vectors @ q[0]).astype(np.float64)
    order = np.argsort(-scores)
    tied_row = vectors[order[k - 2]]  # two rows above the tie, the tie from place k-1 on
    tied = order[k - 2 : k - 2 + group]
    vectors[tied] = tied_row
    ids = [f"i{j:04d}" for j in range(n)]
    pinned, later = set(tied[::3].tolist()), tied[1::3].tolist()  # the rest of the tie: the base
    built = [j for j in range(n) if j not in set(later)]
    index = VectorIndex.build(D + 1, [ids[j] for j in built], vectors[built], [j not in pinned for j in built],
                              IndexConfig(auto_merge=False), pin_warm=True)
    index.add([ids[j] for j in later], vectors[later], [True] * len(later))  # into the delta
    exact = vectors.astype(np.float64) @ q[0].astype(np.float64)
    expected = sorted(range(n), key=lambda j: (-float(np.float32(exact[j])), ids[j]))[:k]
    found = index.search(q, k)[0]
    assert [h.item_id for h in found] == [ids[j] for j in expected]
    assert len({h.score for h in found[-2:]}) == 1  # the cut really falls inside the tie


def test_exact_scoring_in_small_groups_finds_what_one_group_finds() -> None:
    rng = np.random.default_rng(2)
    segment = DeltaSegment(D + 1, chunk_rows=64)  # several chunks, each scored per group
    segment.append(np.arange(500, dtype=np.int64), rng.normal(size=(500, D + 1)).astype(np.float32))
    other = DeltaSegment(D + 1, chunk_rows=1000)
    other.append(np.arange(1000, 1300, dtype=np.int64), rng.normal(size=(300, D + 1)).astype(np.float32))
    q = _queries(5, 3)
    banned = Banned(np.array([0, 0, 3], np.int64), np.array([7, 1100, 42], np.int64), 5)
    views = [segment.view(), other.view()]

    def top(group_rows: int | None) -> list[list[int]]:
        found = exact_found(views, q, 20, banned, group_rows)
        scores = np.concatenate([f.scores for f in found], axis=1)
        iids = np.concatenate([f.iids for f in found], axis=1)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :20]
        return [iids[b, best[b]].tolist() for b in range(len(q))]

    one_group, small_groups = top(None), top(37)
    assert one_group == small_groups
    brute = np.concatenate([v.arrays()[1] for v in views]) @ q.T  # (N, B)
    all_iids = np.concatenate([v.arrays()[0] for v in views])
    for b in range(len(q)):
        allowed = [j for j in np.argsort(-brute[:, b], kind="stable")
                   if not (b == 0 and all_iids[j] in (7, 1100)) and not (b == 3 and all_iids[j] == 42)]
        assert one_group[b] == all_iids[allowed[:20]].tolist()


def test_banned_keeps_each_querys_ids_sorted_and_subsets_renumber_them() -> None:
    banned = Banned(np.array([2, 0, 2, 0], np.int64), np.array([9, 5, 1, 3], np.int64), 3)
    assert [b.tolist() for b in banned.per_query] == [[3, 5], [], [1, 9]]
    sub = banned.subset([2])
    assert sub.queries == 1 and [b.tolist() for b in sub.per_query] == [[1, 9]]


def test_id_map_lookup_finds_hot_frozen_and_later_ids_and_moves_an_upserted_hot_id() -> None:
    ids = IdMap()
    for j in range(10):
        ids.set(f"a{j}", j)
    ids.freeze(hot=["a1", "a2"])
    ids.set("late", 50)
    assert ids.lookup(["a1", "a5", "late", "missing"]).tolist() == [1, 5, 50, -1]
    ids.set("a1", 60)  # an upsert of a hot id: it leaves the hot dict
    assert ids.lookup(["a1"]).tolist() == [60] and ids.get("a1") == 60 and len(ids) == 11
    assert ids.pop("a2") == 2 and "a2" not in ids and ids.lookup(["a2"]).tolist() == [-1]
    assert len(ids) == 10


def test_item_table_reads_many_ids_at_once_and_keeps_removed_slots_empty() -> None:
    table = ItemTable()
    table.set(0, ("x", False))
    table.set(5, ("y", True))  # a gap: slots 1-4 stay empty
    assert table.items_at([5, 0, 3]) == (("y", "x", None), (True, False, False))
    assert table.items_at([5]) == (("y",), (True,))
    assert table.get_many([-1, 0, 2]) == [None, ("x", False), None]
    assert table.pop(5) == ("y", True) and table.get(5) is None
    with pytest.raises(KeyError):
        table.pop(5)


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_segments_are_laid_out_for_the_kernel_when_built_and_merged_not_in_a_search(kind: str) -> None:
    rng = np.random.default_rng(5)
    n = 3000
    vectors = rng.normal(size=(n, D + 1)).astype(np.float32)
    ids = [f"i{j}" for j in range(n)]
    config = IndexConfig(kind=kind, ivf_min_rows=1000, nlist=16, nprobe=16, auto_merge=False)  # type: ignore[arg-type]
    index = VectorIndex.build(D + 1, ids, vectors, [j >= 100 for j in range(n)], config, pin_warm=True)

    def laid_out() -> bool:
        base = index._base
        views = [index._pinned, *base.exact_views()]
        return all("panels" in v.__dict__ for v in views) and (
            base.coarse is None or "scoring_panels" in base.coarse.__dict__)

    assert laid_out()
    index.add([f"new{j}" for j in range(50)], rng.normal(size=(50, D + 1)).astype(np.float32), [True] * 50)
    index.merge()
    assert laid_out()
    live_ids, live_rows, _ = index.live_vectors()
    q = _queries(3, 9)
    want = [live_ids[j] for j in np.argsort(-(live_rows @ q[0]), kind="stable")[:5]]
    assert [h.item_id for h in index.search(q, 5)[0]] == want  # nprobe 16 of 16 lists: exact either way


def test_more_ties_at_the_cut_than_the_scans_room_in_an_ivf_base() -> None:
    """200 identical best rows in the IVF base, more than TIE_ROOM past k: the scan is asked again
    with room for them all, and the answer is the tie's first k item ids."""
    rng = np.random.default_rng(4)
    n, k = 400, 10
    vectors = rng.normal(size=(n, D + 1)).astype(np.float32)
    q = _queries(1, 2)
    tied = rng.choice(n, 200, replace=False)
    vectors[tied] = vectors[np.argmax(vectors @ q[0])] * 2  # every tied row beats every other
    ids = [f"i{j:04d}" for j in rng.permutation(n).tolist()]
    config = IndexConfig(kind="ivf", ivf_min_rows=100, nlist=4, nprobe=4, lift_quantile=1.0, auto_merge=False)
    index = VectorIndex.build(D + 1, ids, vectors, [True] * n, config)
    assert index.is_approximate and not index._base.exact_views()  # every row in the IVF lists
    found = index.search(q, k)[0]
    assert [h.item_id for h in found] == sorted(ids[j] for j in tied)[:k]
