"""VectorIndex against a NumPy brute-force oracle, with real FAISS: both populations, exclusions,
tombstones, the buffer and its background merge, snapshots."""

from __future__ import annotations

import threading
from collections.abc import Sequence, Set
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from service.index import Hit, IndexConfig, Tops, VectorIndex

D = 16  # latent size; index rows are D+1 wide
Array = npt.NDArray[np.float32]


def rows_of(n: int, seed: int, scale: float = 1.0) -> Array:
    """Rows [v; b] (n, D+1) with biases large enough to reorder rankings."""
    rng = np.random.default_rng(seed)
    out = rng.normal(size=(n, D + 1)).astype(np.float32) * scale
    out[:, -1] *= 2.0
    return out


def queries(n: int, seed: int) -> Array:
    h = np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)
    return np.hstack([h, np.ones((n, 1), np.float32)])  # (B, D+1): [h; 1]


def oracle(q: Array, live: dict[str, Array], k: int, exclude: Sequence[Set[str]] | None = None) -> list[list[Hit]]:
    """Top-k by h·v + b in float64 over `live`, without each query's excluded ids."""
    ids = sorted(live)
    scores = q.astype(np.float64) @ np.stack([live[i] for i in ids]).T.astype(np.float64)  # (B, N)
    out = []
    for b, row in enumerate(scores):
        banned = exclude[b] if exclude else set()
        top = [j for j in np.argsort(-row, kind="stable") if ids[j] not in banned][:k]
        out.append([Hit(ids[j], float(row[j]), True) for j in top])
    return out


def assert_top(found: list[list[Hit]], expected: list[list[Hit]]) -> None:
    """Same scores (float tolerance) and the same items, ties at the k-th score allowed to differ."""
    for got, want in zip(found, expected, strict=True):
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=1e-4, atol=1e-4)
        cut = want[-1].score if want else 0.0
        assert {h.item_id for h in got if h.score > cut + 1e-4} == {h.item_id for h in want if h.score > cut + 1e-4}


def new_only(index: VectorIndex, q: Array, k: int, exclude: Sequence[Set[str]] | None = None) -> list[list[Hit]]:
    return [tops.new for tops in index.search(q, k, exclude)]


def manual(**overrides: object) -> IndexConfig:
    return IndexConfig(**{"kind": "exact", "auto_merge": False, **overrides})  # type: ignore[arg-type]


def test_each_population_is_its_own_exact_top_k_and_merged_is_the_global_top_k() -> None:
    trained = {f"t{j}": r for j, r in enumerate(rows_of(400, 1, scale=2.0))}
    new = {f"n{j}": r for j, r in enumerate(rows_of(3000, 2))}
    index = VectorIndex.build(D + 1, list(trained), np.stack(list(trained.values())),
                              [(list(new)[:2000], np.stack(list(new.values())[:2000]))], manual())
    index.add(list(new)[2000:], np.stack(list(new.values())[2000:]))  # these stay in the buffer
    q = queries(8, 3)

    found = index.search(q, 12)

    assert_top([t.trained for t in found], [[h._replace(is_cold=False) for h in e] for e in oracle(q, trained, 12)])
    assert_top([t.new for t in found], oracle(q, new, 12))
    assert all(not h.is_cold for t in found for h in t.trained) and all(h.is_cold for t in found for h in t.new)
    everything = oracle(q, {**trained, **new}, 12)
    assert_top([t.merged(12) for t in found], everything)
    assert index.count() == (400, 3000) and index.contains("t3") and index.contains("n2999")


def test_new_items_can_be_searched_with_queries_of_their_own() -> None:
    """The collaborative part's new items are scored with their own mix: each population is its own
    exact top-k for its own queries, exclusions included, in the buffer and in the base alike."""
    trained = {f"t{j}": r for j, r in enumerate(rows_of(300, 11))}
    new = {f"n{j}": r for j, r in enumerate(rows_of(2000, 12))}
    index = VectorIndex.build(D + 1, list(trained), np.stack(list(trained.values())),
                              [(list(new)[:1500], np.stack(list(new.values())[:1500]))], manual())
    index.add(list(new)[1500:], np.stack(list(new.values())[1500:]))
    q, q_new = queries(5, 13), queries(5, 14)
    exclude = [{h.item_id for h in t.new[::3]} | {h.item_id for h in t.trained[::4]}
               for t in index.search(q, 20, new_queries=q_new)]

    found = index.search(q, 10, exclude, new_queries=q_new)

    assert_top([t.trained for t in found],
               [[h._replace(is_cold=False) for h in e] for e in oracle(q, trained, 10, exclude)])
    assert_top([t.new for t in found], oracle(q_new, new, 10, exclude))
    alike = index.search(q, 10, exclude)  # the new items by the trained items' queries: another list
    assert [[h.item_id for h in t.new] for t in found] != [[h.item_id for h in t.new] for t in alike]
    with pytest.raises(ValueError, match="queries must be"):
        index.search(q, 10, new_queries=q_new[:2])


def test_merged_ranks_ties_by_item_id() -> None:
    tops = Tops([Hit("b", 1.0, False), Hit("z", 0.5, False)], [Hit("a", 1.0, True), Hit("c", 2.0, True)])
    assert [h.item_id for h in tops.merged(3)] == ["c", "a", "b"]


def test_excluded_items_are_never_returned_in_either_population() -> None:
    trained = {f"t{j}": r for j, r in enumerate(rows_of(300, 4))}
    new = {f"n{j}": r for j, r in enumerate(rows_of(2000, 5))}
    index = VectorIndex.build(D + 1, list(trained), np.stack(list(trained.values())),
                              [(list(new), np.stack(list(new.values())))], manual())
    q = queries(6, 6)
    best = [t.merged(30) for t in index.search(q, 30)]
    exclude = [{h.item_id for h in hits[b::2]} for b, hits in enumerate(best)]  # every other of each top-30

    found = index.search(q, 10, exclude)

    assert_top([t.new for t in found], oracle(q, new, 10, exclude))
    assert_top([t.merged(10) for t in found], oracle(q, {**trained, **new}, 10, exclude))


@pytest.mark.parametrize("merge", [False, True])
def test_removed_and_replaced_items_are_never_returned(merge: bool) -> None:
    rows = rows_of(3000, 7)
    live = {f"n{j}": rows[j] for j in range(2500)}
    index = VectorIndex.build(D + 1, [], np.zeros((0, D + 1)), [(list(live), np.stack(list(live.values())))],
                              manual())
    q = queries(5, 8)
    top = {h.item_id for hits in new_only(index, q, 20) for h in hits}
    gone = sorted(top)[::2]
    assert index.remove([*gone, "never-there"]) == len(gone)
    upserted = sorted(top)[1::2]
    index.add(upserted, rows[2500 : 2500 + len(upserted)] * 0.01)  # same ids, rows that no longer win
    for item_id in gone:
        del live[item_id]
    live.update(zip(upserted, rows[2500 : 2500 + len(upserted)] * 0.01, strict=True))
    if merge:
        index.merge()

    assert_top(new_only(index, q, 20), oracle(q, live, 20))
    assert index.count() == (0, len(live)) and not index.contains(gone[0])


def test_an_item_is_searchable_as_soon_as_add_returns() -> None:
    index = VectorIndex.build(D + 1, [], np.zeros((0, D + 1)), [([f"n{j}" for j in range(500)], rows_of(500, 9))])
    q = queries(1, 10)

    index.add(["fresh"], q * 50)  # aligned with the query, large

    assert new_only(index, q, 1)[0][0].item_id == "fresh"


def test_a_background_merge_starts_when_the_buffer_fills_up_and_keeps_every_row() -> None:
    index = VectorIndex(D + 1, IndexConfig(kind="exact", merge_rows=1000))
    rows = rows_of(3000, 11)
    for start in range(0, 3000, 500):
        index.add([f"n{j}" for j in range(start, start + 500)], rows[start : start + 500])
    assert index.wait_for_merge(timeout=30)

    assert index._base is not None and index._base.ntotal >= 1000  # a merge moved rows into the base
    q = queries(4, 12)
    assert_top(new_only(index, q, 10), oracle(q, {f"n{j}": rows[j] for j in range(3000)}, 10))


@pytest.mark.parametrize("kind", ["exact", "auto"])
def test_adds_during_a_background_merge_are_never_lost(kind: str) -> None:
    """A merge moves the frozen buffer into the base while adds keep arriving in a new buffer."""
    rows = rows_of(60_000, 13)
    # every list probed and every row of them re-scored (rerank): the IVF-PQ4 base answers exactly. Rows far
    # outside what the 4-bit codes were trained on (those added below) can fall out of a shortlist by the codes
    config = IndexConfig(kind=kind, ivf_min_rows=10_000, nprobe=10_000, rerank=100_000, auto_merge=False,  # type: ignore[arg-type]
                         merge_slice_rows=256)
    index = VectorIndex.build(D + 1, [], np.zeros((0, D + 1)), [([f"b{j}" for j in range(20_000)], rows[:20_000])],
                              config)
    index.add([f"f{j}" for j in range(20_000)], rows[20_000:40_000])  # the buffer the merge will move
    probe = np.zeros((1, D + 1), np.float32)
    probe[0, 0], probe[0, D] = 1e4, 1.0  # the added rows below score ~1e5, every other row far less
    added: list[str] = []
    merge = threading.Thread(target=index.merge)
    merge.start()
    while merge.is_alive() or not added:
        added.append(f"new-{len(added)}")
        index.add([added[-1]], np.eye(1, D + 1, 0, np.float32) * 10)
    merge.join()

    assert index._frozen == () and index._base is not None and index._base.ntotal == 40_000
    assert index.count() == (0, 40_000 + len(added))
    assert {h.item_id for h in new_only(index, probe, len(added))[0]} == set(added)
    index.merge()
    assert {h.item_id for h in new_only(index, probe, len(added))[0]} == set(added)
    ids, _, _ = index.live_vectors()
    assert len(ids) == len(set(ids)) == 40_000 + len(added)


def test_concurrent_adds_and_merges_lose_no_row() -> None:
    index = VectorIndex(D + 1, IndexConfig(kind="exact", merge_rows=64))
    added: list[str] = []
    lock = threading.Lock()

    def writer(w: int) -> None:
        local = np.random.default_rng(w)
        for n in range(300):
            ids = [f"w{w}-{n}-{j}" for j in range(4)]
            index.add(ids, local.normal(size=(4, D + 1)).astype(np.float32))
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
    assert len(live_ids) == len(set(live_ids)) == len(added) == len(vectors) == 4 * 300 * 4


@pytest.mark.parametrize("kind", ["exact", "auto"])
def test_save_then_load_gives_the_same_answers(kind: str, tmp_path: Path) -> None:
    config = IndexConfig(kind=kind, ivf_min_rows=1000, nlist=32, nprobe=4, auto_merge=False)  # type: ignore[arg-type]
    rows = rows_of(3000, 14)
    ids = [f"n{j}" for j in range(3000)]
    index = VectorIndex.build(D + 1, ["t0", "t1"], rows_of(2, 15), [(ids[:2500], rows[:2500])], config)
    index.add(ids[2500:], rows[2500:])  # stays in the buffer
    index.remove(ids[::7])
    q = queries(6, 16)
    exclude = [{ids[1], ids[2], "t0"}] * len(q)
    before = index.search(q, 25, exclude)

    index.save(tmp_path / "snapshot", event_id="1700000000000-5")
    loaded, event_id = VectorIndex.load(tmp_path / "snapshot", config)

    assert event_id == "1700000000000-5"
    assert loaded.kinds == index.kinds == ("exact", config.kind_for(2500))
    assert loaded.search(q, 25, exclude) == before
    assert loaded.count() == index.count()
    loaded.add(["after-load"], rows[:1])  # internal ids continue, no collision
    assert loaded.count() == (2, index.count()[1] + 1)


def test_saving_again_swaps_the_snapshot_and_drops_the_old_one(tmp_path: Path) -> None:
    index = VectorIndex.build(D + 1, [], np.zeros((0, D + 1)), [([f"n{j}" for j in range(50)], rows_of(50, 17))])
    index.save(tmp_path / "snapshot", event_id="1")
    first = (tmp_path / "snapshot").resolve()
    index.remove([f"n{j}" for j in range(10)])

    index.save(tmp_path / "snapshot", event_id="2")

    assert not first.exists()
    loaded, event_id = VectorIndex.load(tmp_path / "snapshot")
    assert (event_id, len(loaded)) == ("2", 40)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("snapshot.")) == ["snapshot"]


def test_a_snapshot_keeps_every_live_id_over_several_id_chunks_and_any_characters(tmp_path: Path) -> None:
    """The new items' ids are written a chunk of the id table at a time (65,536 internal ids each), with
    nulls where ids died: ids in several chunks, removed, replaced, or needing JSON escapes come back."""
    odd = ['quote"d', "back\\slash", "new\nline", "ünï", "\u2028", "null", "[1,2]", ""]
    names = [f"n{j}" for j in range(70_000)] + odd
    rows = rows_of(len(names), 23)
    index = VectorIndex.build(D + 1, ["t0"], rows_of(1, 24), [(names[:40_000], rows[:40_000])], manual())
    index.add(names[40_000:], rows[40_000:])
    index.remove([f"n{j}" for j in range(0, 70_000, 3)] + ["null"])
    index.add(["n1", "n65537", "back\\slash"], rows_of(3, 25))  # replaced: their first internal ids die
    index.save(tmp_path / "snapshot", event_id="7")

    loaded, event_id = VectorIndex.load(tmp_path / "snapshot", manual())

    live, vectors, cold = index.live_vectors()
    got, got_vectors, got_cold = loaded.live_vectors()
    assert event_id == "7" and loaded.count() == index.count() == (1, len(names) - 23_334 - 1)
    assert dict(zip(got, got_vectors.tolist(), strict=True)) == dict(zip(live, vectors.tolist(), strict=True))
    assert sorted(got_cold) == sorted(cold) and loaded.contains("") and not loaded.contains("null")
    index.add(["after"], rows_of(1, 26))  # the loaded index hands out internal ids after the saved ones
    loaded.add(["after"], rows_of(1, 26))
    assert loaded.live_vectors()[0] == index.live_vectors()[0]


def test_a_snapshot_taken_while_items_are_added_and_removed_loads_whole(tmp_path: Path) -> None:
    """The id table is copied a chunk at a time, and the buffer read, while writes go on: every item untouched
    during the save comes back once, and nothing comes back twice."""
    names, rows = [f"n{j}" for j in range(150_000)], rows_of(150_000, 27)
    index = VectorIndex.build(D + 1, [], np.zeros((0, D + 1)), [(names[:100_000], rows[:100_000])], manual())
    index.add(names[100_000:], rows[100_000:])  # a large buffer: long to read, while the adds below go into it
    stop = threading.Event()

    def churn() -> None:
        j = 0
        while not stop.is_set():
            index.add([f"late{j}", f"n{149_999 - j}"], rows_of(2, j))  # a new item; an upsert of a saved one
            index.remove([f"late{j - 1}"])
            j += 1

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        index.save(tmp_path / "snapshot", event_id=None)
    finally:
        stop.set()
        writer.join()
    loaded, _ = VectorIndex.load(tmp_path / "snapshot", manual())
    ids = loaded.live_vectors()[0]
    assert len(ids) == len(set(ids)) == loaded.count()[1] and {f"n{j}" for j in range(100_000)} <= set(ids)


def test_a_snapshot_in_another_format_is_refused_by_name(tmp_path: Path) -> None:
    index = VectorIndex.build(D + 1, [], np.zeros((0, D + 1)), [(["a"], rows_of(1, 18))])
    index.save(tmp_path / "snapshot", event_id=None)
    meta = (tmp_path / "snapshot").resolve() / "meta.json"
    meta.write_text(meta.read_text().replace("m2rec-index/9", "m2rec-index/8"))
    with pytest.raises(ValueError, match="snapshot format 'm2rec-index/8' is not 'm2rec-index/9'"):
        VectorIndex.load(tmp_path / "snapshot")


def test_search_rejects_queries_of_the_wrong_width() -> None:
    index = VectorIndex(D + 1)
    with pytest.raises(ValueError, match="queries must be"):
        index.search(np.zeros((2, D), np.float32), 5)
    assert index.search(np.zeros((2, D + 1), np.float32), 5) == [Tops([], []), Tops([], [])]


def test_the_id_table_agrees_with_a_dict_through_sets_replacements_pops_and_joins() -> None:
    """The compact side table (sorted hash arrays plus a small dict per shard) against a plain dict, with
    enough inserts that every shard joins its dict into its arrays many times."""
    from service.index import ids as ids_module

    rng = np.random.default_rng(0)
    table, oracle_map = ids_module.IdTable(recent=8), dict[str, int]()  # joins every 8 inserts a shard
    loaded = [f"snap:{j}" for j in range(3000)]
    table.set_many([(loaded[:1000], np.arange(1000, dtype=np.int64)),  # as a snapshot's chunks
                    (loaded[1000:], np.arange(1000, 3000, dtype=np.int64))])
    oracle_map.update({item_id: j for j, item_id in enumerate(loaded)})
    next_iid = 3000
    for step in range(20_000):
        item_id = f"i{rng.integers(0, 5000)}" if rng.random() < 0.9 else f"snap:{rng.integers(0, 3000)}"
        if rng.random() < 0.3:
            assert table.pop(item_id) == oracle_map.pop(item_id, None)
        else:
            assert table.set(item_id, next_iid) == oracle_map.get(item_id)
            oracle_map[item_id] = next_iid
            next_iid += 1
        if step % 2000 == 0:
            probe = [f"i{j}" for j in range(0, 5000, 7)] + ["absent", *loaded[::97]]
            assert table.lookup(probe) == [oracle_map[i] for i in probe if i in oracle_map]
    assert len(table) == len(oracle_map)
    named = [name for c in range(-(-next_iid // ids_module.CHUNK)) for name in table.named(c)]
    assert {name: iid for iid, name in enumerate(named) if name is not None} == oracle_map
    assert table.items_of([oracle_map.get("snap:5", -1), next_iid + 5]) == \
        (["snap:5"] if "snap:5" in oracle_map else [None]) + [None]


def test_ids_that_share_a_hash_are_told_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.index import ids as ids_module

    # Python's string hashes practically never collide: the module's `hash` is swapped for one that does
    monkeypatch.setattr(ids_module, "hash", lambda item_id: len(item_id), raising=False)
    table = ids_module.IdTable(recent=2)
    names = ["ab", "cd", "ef", "gh", "abc", "xyz"]
    for iid, name in enumerate(names):
        assert table.set(name, iid) is None
    assert table.lookup(names) == list(range(6))
    assert table.pop("cd") == 1 and table.lookup(["cd", "ef"]) == [2]
    assert table.set("ef", 10) == 2 and table.lookup(["ab", "ef", "gh"]) == [0, 10, 3]
