"""VectorIndex against a NumPy brute-force oracle, with real FAISS."""

from __future__ import annotations

import threading
from collections.abc import Sequence, Set
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from service.index import Hit, IndexConfig, VectorIndex

D = 16  # latent size; index rows are D+1 wide
Array = npt.NDArray[np.float32]


def catalogue(n: int, seed: int = 0) -> tuple[list[str], Array, Array]:
    """ids, item vectors v (n, D) and biases b (n,)."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, D)).astype(np.float32)
    b = rng.normal(scale=2.0, size=n).astype(np.float32)  # large enough to reorder rankings
    return [f"item-{j}" for j in range(n)], v, b


def rows(v: Array, b: Array) -> Array:
    return np.hstack([v, b[:, None]]).astype(np.float32)  # (I, D+1): [v; b]


def user_queries(h: Array) -> Array:
    return np.hstack([h, np.ones((len(h), 1))]).astype(np.float32)  # (B, D+1): [h; 1]


def oracle(
    h: Array, ids: Sequence[str], v: Array, b: Array, k: int, exclude: Sequence[Set[str]] | None = None
) -> list[list[tuple[str, float]]]:
    """Top-k by h·v + b over the given items, computed without the folded row."""
    scores = h.astype(np.float64) @ v.T.astype(np.float64) + b  # (B, I)
    out = []
    for q, row in enumerate(scores):
        banned = exclude[q] if exclude else set()
        order = [j for j in np.argsort(-row, kind="stable") if ids[j] not in banned][:k]
        out.append([(ids[j], float(row[j])) for j in order])
    return out


def assert_matches(found: list[list[Hit]], expected: list[list[tuple[str, float]]]) -> None:
    assert [[h.item_id for h in hits] for hits in found] == [[i for i, _ in e] for e in expected]
    for hits, e in zip(found, expected, strict=True):
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in e], rtol=1e-4, atol=1e-4)


def recall_at_k(index: VectorIndex, queries: Array, k: int) -> float:
    """Mean share of the exact top-k (brute force over the live rows) that `index.search` returns."""
    ids, vectors, _ = index.live_vectors()
    truth = np.argsort(-(queries.astype(np.float64) @ vectors.T.astype(np.float64)), axis=1)[:, :k]
    found = index.search(queries, k)
    overlap = [len({ids[r] for r in t} & {hit.item_id for hit in got}) for t, got in zip(truth, found, strict=True)]
    return float(np.mean(overlap)) / min(k, len(ids))


def exact_index(ids: list[str], vectors: Array, cold: Sequence[bool] | None = None) -> VectorIndex:
    index = VectorIndex(D + 1, IndexConfig(auto_merge=False))
    index.add(ids, vectors, cold if cold is not None else [False] * len(ids))
    return index


@pytest.fixture
def data() -> tuple[list[str], Array, Array, Array]:
    ids, v, b = catalogue(3000)
    h = np.random.default_rng(1).normal(size=(8, D)).astype(np.float32)
    return ids, v, b, h


def test_exact_top_k_equals_brute_force_with_the_bias_folded_in(data: tuple[list[str], Array, Array, Array]) -> None:
    ids, v, b, h = data
    index = exact_index(ids[:2000], rows(v[:2000], b[:2000]))
    index.merge()  # the first 2000 now sit in the FAISS base, the rest in the delta
    index.add(ids[2000:], rows(v[2000:], b[2000:]), [True] * 1000)

    found = index.search(user_queries(h), 20)

    assert_matches(found, oracle(h, ids, v, b, 20))
    assert all(hit.is_cold == (int(hit.item_id.split("-")[1]) >= 2000) for hits in found for hit in hits)
    assert index.count() == (2000, 1000)


def test_excluded_items_are_never_returned(data: tuple[list[str], Array, Array, Array]) -> None:
    ids, v, b, h = data
    index = exact_index(ids, rows(v, b))
    index.merge()
    top = oracle(h, ids, v, b, 30)
    exclude = [{i for i, _ in t[::2]} | {"not-in-index"} for t in top]  # every other of the top 30

    found = index.search(user_queries(h), 10, exclude=exclude)

    assert_matches(found, oracle(h, ids, v, b, 10, exclude))


def test_removed_items_are_never_returned_before_or_after_a_merge(
    data: tuple[list[str], Array, Array, Array],
) -> None:
    ids, v, b, h = data
    index = exact_index(ids[:2000], rows(v[:2000], b[:2000]))
    index.merge()
    index.add(ids[2000:], rows(v[2000:], b[2000:]), [False] * 1000)
    # the current winners, from both the base and the delta: many tombstones ahead of live rows
    gone = sorted({i for t in oracle(h, ids, v, b, 120) for i, _ in t})
    assert index.remove([*gone, "never-added"]) == len(gone)
    keep = [j for j, i in enumerate(ids) if i not in set(gone)]
    expected = oracle(h, [ids[j] for j in keep], v[keep], b[keep], 10)

    assert_matches(index.search(user_queries(h), 10), expected)
    index.merge()
    assert_matches(index.search(user_queries(h), 10), expected)
    assert not any(index.contains(i) for i in gone)
    assert index.count() == (3000 - len(gone), 0)


def test_upsert_replaces_the_row_and_cold_flag_without_duplicating(
    data: tuple[list[str], Array, Array, Array],
) -> None:
    ids, v, b, h = data
    index = exact_index(ids, rows(v, b))
    index.merge()
    winner = oracle(h[:1], ids, v, b, 1)[0][0][0]
    j = ids.index(winner)
    b_new = b.copy()
    b_new[j] = -100.0  # sinks it
    index.add([winner], rows(v[j : j + 1], b_new[j : j + 1]), [True])

    found = index.search(user_queries(h), 10)

    assert_matches(found, oracle(h, ids, v, b_new, 10))
    assert index.count() == (2999, 1)
    assert len(index.live_vectors()[0]) == 3000


def test_an_item_is_searchable_as_soon_as_add_returns(data: tuple[list[str], Array, Array, Array]) -> None:
    ids, v, b, h = data
    index = exact_index(ids, rows(v, b))
    index.merge()

    index.add(["fresh"], user_queries(h[:1]) * 50, [True])  # aligned with the query, large

    assert index.search(user_queries(h[:1]), 1)[0][0][::2] == ("fresh", True)


def test_approximate_index_recall_at_10_is_at_least_0_9_on_clustered_data() -> None:
    N = 12_000
    rng = np.random.default_rng(7)
    centers = rng.normal(scale=3.0, size=(64, D)).astype(np.float32)
    members = rng.integers(0, 64, size=N)
    v = (centers[members] + rng.normal(scale=0.5, size=(N, D))).astype(np.float32)
    b = rng.normal(scale=0.5, size=N).astype(np.float32)
    h = (centers[rng.integers(0, 64, size=200)] + rng.normal(size=(200, D))).astype(np.float32)
    config = IndexConfig(kind="ivf", ivf_min_rows=5_000, nlist=128, nprobe=4, auto_merge=False)

    index = VectorIndex.build(D + 1, [f"i{j}" for j in range(N)], rows(v, b), [False] * N, config)

    assert index.is_approximate
    assert recall_at_k(index, user_queries(h), 10) >= 0.9


def test_adds_during_a_background_merge_are_kept_and_searches_stay_exact() -> None:
    ids, v, b = catalogue(200_000, seed=3)
    h = np.random.default_rng(4).normal(size=(4, D)).astype(np.float32)
    index = exact_index(ids, rows(v, b))
    expected = oracle(h, ids, v, b, 10)
    # new rows point along axis 0 with a bias that keeps them out of these queries' top 10
    new_row = np.zeros((1, D + 1), np.float32)
    new_row[0, 0], new_row[0, D] = 10.0, -1000.0
    added: list[str] = []
    overlapped = 0
    merge = threading.Thread(target=index.merge)
    merge.start()
    while merge.is_alive() or not added:
        added.append(f"new-{len(added)}")
        index.add([added[-1]], new_row, [True])
        overlapped += index.merging
        assert_matches(index.search(user_queries(h), 10), expected)
    merge.join()

    assert overlapped > 0, "no add overlapped the merge: the test proved nothing"
    assert index.count() == (200_000, len(added))
    probe = np.zeros((1, D + 1), np.float32)
    probe[0, 0], probe[0, D] = 1e4, 1.0  # new rows score 1e5 - 1000, old ones at most ~6e4
    assert {hit.item_id for hit in index.search(probe, len(added))[0]} == set(added)
    index.merge()
    assert {hit.item_id for hit in index.search(probe, len(added))[0]} == set(added)


def test_a_background_merge_starts_when_the_delta_fills_up(data: tuple[list[str], Array, Array, Array]) -> None:
    ids, v, b, h = data
    index = VectorIndex(D + 1, IndexConfig(merge_delta_rows=1000))

    for start in range(0, 3000, 500):
        index.add(ids[start : start + 500], rows(v[start : start + 500], b[start : start + 500]), [False] * 500)
    assert index.wait_for_merge(timeout=30)

    assert index._base.ntotal >= 1000  # at least one merge moved rows into the base
    assert_matches(index.search(user_queries(h), 10), oracle(h, ids, v, b, 10))


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_save_then_load_gives_identical_results(
    kind: str, tmp_path: Path, data: tuple[list[str], Array, Array, Array]
) -> None:
    ids, v, b, h = data
    config = IndexConfig(
        kind="ivf" if kind == "ivf" else "exact", ivf_min_rows=1000, nlist=32, nprobe=4, auto_merge=False
    )
    cold = [j % 2 == 0 for j in range(2500)]
    index = VectorIndex.build(D + 1, ids[:2500], rows(v[:2500], b[:2500]), cold, config)
    index.add(ids[2500:], rows(v[2500:], b[2500:]), [True] * 500)  # stays in the delta
    index.remove(ids[::7])
    exclude = [{ids[1], ids[2]}] * len(h)
    before = index.search(user_queries(h), 25, exclude)

    index.save(tmp_path / "snapshot", event_id="1700000000000-5")
    loaded, event_id = VectorIndex.load(tmp_path / "snapshot", config)

    assert event_id == "1700000000000-5"
    assert loaded.is_approximate == (kind == "ivf")
    assert loaded.search(user_queries(h), 25, exclude) == before
    assert loaded.count() == index.count()
    loaded.add(["after-load"], rows(v[:1], b[:1]), [True])  # internal ids continue, no collision
    assert loaded.count() == (index.count()[0], index.count()[1] + 1)


def test_saving_again_swaps_the_snapshot_and_drops_the_old_one(tmp_path: Path) -> None:
    ids, v, b = catalogue(50)
    index = exact_index(ids, rows(v, b))
    index.save(tmp_path / "snapshot", event_id="1")
    first = (tmp_path / "snapshot").resolve()
    index.remove(ids[:10])

    index.save(tmp_path / "snapshot", event_id="2")

    assert not first.exists()
    loaded, event_id = VectorIndex.load(tmp_path / "snapshot")
    assert (event_id, len(loaded)) == ("2", 40)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("snapshot.")) == ["snapshot"]


def test_search_rejects_queries_of_the_wrong_width() -> None:
    index = VectorIndex(D + 1)
    with pytest.raises(ValueError, match="queries must be"):
        index.search(np.zeros((2, D), np.float32), 5)
    assert index.search(np.zeros((2, D + 1), np.float32), 5) == [[], []]


# -- pinned trained rows: build(pin_warm=True) keeps warm rows in an exact segment ----------------


def _warm_heavy_catalogue(n_warm: int, n_cold: int) -> tuple[list[str], Array, list[bool]]:
    """Warm rows of about 4x the norm of cold ones, as trained vs generated rows of a real model."""
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(n_warm + n_cold, D + 1)).astype(np.float32)
    vectors[:n_warm] *= 4.0
    return [f"item-{j}" for j in range(n_warm + n_cold)], vectors, [j >= n_warm for j in range(n_warm + n_cold)]


def test_pinned_warm_rows_are_found_exactly_whatever_lists_ivf_probes() -> None:
    ids, vectors, cold = _warm_heavy_catalogue(200, 3000)
    config = IndexConfig(kind="ivf", ivf_min_rows=1000, nlist=64, nprobe=1, auto_merge=False)
    index = VectorIndex.build(D + 1, ids, vectors, cold, config, pin_warm=True)
    assert index.is_approximate and index._base.ntotal == 3000  # only the cold rows went to IVF
    assert index.count() == (200, 3000)
    h = np.random.default_rng(4).normal(size=(30, D)).astype(np.float32)
    q = user_queries(h)
    warm_only = [[(ids[j], float(s)) for j, s in hits] for hits in _brute(q, vectors[:200], 10)]
    found = index.search(q, 10)
    # these queries' exact top-10 are all warm rows, and pinned rows need no probing
    assert [[i for i, _ in e] for e in warm_only] == [[h.item_id for h in f] for f in found]
    assert recall_at_k(index, q, 10) == 1.0
    index.remove([ids[0]])
    assert all(hit.item_id != ids[0] for hits in index.search(q, 10) for hit in hits)


def test_pinned_rows_survive_a_snapshot_round_trip(tmp_path: Path) -> None:
    ids, vectors, cold = _warm_heavy_catalogue(50, 1500)
    config = IndexConfig(kind="ivf", ivf_min_rows=1000, nlist=16, nprobe=2, auto_merge=False)
    index = VectorIndex.build(D + 1, ids, vectors, cold, config, pin_warm=True)
    q = user_queries(np.random.default_rng(5).normal(size=(10, D)).astype(np.float32))
    before = index.search(q, 15)
    index.save(tmp_path / "snapshot", event_id="7")
    loaded, _ = VectorIndex.load(tmp_path / "snapshot", config)
    assert loaded.search(q, 15) == before
    assert loaded._pinned.size == 50 and loaded.count() == index.count()


def _brute(q: Array, vectors: Array, k: int) -> list[list[tuple[int, float]]]:
    scores = q @ vectors.T
    return [[(int(j), float(row[j])) for j in np.argsort(-row, kind="stable")[:k]] for row in scores]


def test_no_row_is_lost_when_merges_swap_the_delta_under_concurrent_adds() -> None:
    # A merge swaps in a new delta; an add that had already picked up the old one must not append
    # to it after the merge froze it (those rows were in neither the merge nor the new delta).
    index = VectorIndex(D + 1, IndexConfig(merge_delta_rows=64, delta_chunk_rows=32))
    added: list[str] = []
    lock = threading.Lock()

    def writer(w: int) -> None:
        local = np.random.default_rng(w)
        for n in range(300):
            ids = [f"w{w}-{n}-{j}" for j in range(4)]
            index.add(ids, local.normal(size=(4, D + 1)).astype(np.float32), [True] * 4)
            with lock:
                added.extend(ids)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for _ in range(200):  # merges in the calling thread too, racing the writers
        index.merge()
    for t in threads:
        t.join()
    assert index.wait_for_merge(timeout=30)
    live_ids, vectors, _ = index.live_vectors()
    assert len(live_ids) == len(set(live_ids)) == len(added) == 4 * 300 * 4
    assert set(live_ids) == set(added)
    assert len(vectors) == len(added)
