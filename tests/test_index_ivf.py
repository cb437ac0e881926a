"""The approximate kind (IVF-PQ4 over the inner-product lift, re-ranked from the rows): recall on a real
model's rows, and exact bookkeeping (buffer, merges, rebuilds, tombstones, long rows) checked with
every list probed, against a NumPy brute-force oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from service.core.recommender import Recommender
from service.core.types import NewItem
from service.index import Hit, IndexConfig, VectorIndex
from service.index.config import RowCodes
from service.index.segment import CHUNK_BITS, RowStore, build_segment, empty_exact
from service.index.snapshot import Snapshot, read_snapshot, write_snapshot
from service.model.artifact import load_artifact
from service.store import SqliteStore
from tests.conftest import TrainedArtifact, train_and_export
from tests.test_index import assert_top, new_only, oracle

D = 16
Array = npt.NDArray[np.float32]


def spread_rows(n: int, seed: int) -> Array:
    """Rows (n, D+1) whose norms spread over ~10x, as generated rows of a real model do."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(n, D + 1)).astype(np.float32)
    rows *= np.exp(rng.normal(scale=0.6, size=(n, 1))).astype(np.float32) / np.sqrt(D + 1)
    return rows


def all_lists(**overrides: object) -> IndexConfig:
    """IVF-PQ4 that probes every list and re-ranks a long shortlist: answers (almost) equal brute force."""
    settings: dict[str, object] = {"ivf_min_rows": 500, "nlist": 16, "nprobe": 16, "rerank": 20,
                                   "auto_merge": False}
    return IndexConfig(**{**settings, **overrides})  # type: ignore[arg-type]


def test_ivf_with_every_list_probed_equals_brute_force_through_adds_removes_upserts_and_rebuilds() -> None:
    rng = np.random.default_rng(0)
    rows = spread_rows(6000, seed=1)
    live = {f"i{j}": rows[j] for j in range(3000)}
    index = VectorIndex.build(D + 1, [], np.zeros((0, D + 1)), [(list(live), np.stack(list(live.values())))],
                              all_lists(retrain_growth=1.5, rerank=500))  # every row of the lists re-scored
    q = spread_rows(12, seed=2) * 8
    assert index.kinds == ("exact", "ivf_pq4")
    assert_top(new_only(index, q, 15), oracle(q, live, 15))
    trained_on = index._base.trained_rows if index._base is not None else 0
    for step in range(6):
        new = {f"n{step}-{j}": rows[3000 + 500 * step + j] for j in range(500)}
        index.add(list(new), np.stack(list(new.values())))
        live.update(new)
        gone = rng.choice(sorted(live), 150, replace=False).tolist()
        assert index.remove(gone) == 150
        for item_id in gone:
            del live[item_id]
        upserted = rng.choice(sorted(live), 40, replace=False).tolist()
        # odd steps: rows longer than M, which the lists and codes were not trained on (kept exact until a rebuild)
        fresh = spread_rows(40, seed=10 + step) * (4.0 if step % 2 else 1.0)
        index.add(upserted, fresh)
        live.update(zip(upserted, fresh, strict=True))
        assert_top(new_only(index, q, 15), oracle(q, live, 15))  # tombstones and buffer before the merge
        index.merge()
        assert_top(new_only(index, q, 15), oracle(q, live, 15))
        assert index._frozen == () and index._buffer.ntotal == 0
    assert index._base is not None and index._base.trained_rows > trained_on  # grown 1.5x: lists retrained
    assert index.count() == (0, len(live))
    ids, vectors, cold = index.live_vectors()
    assert sorted(ids) == sorted(live) and all(cold)
    for item_id, row in zip(ids, vectors, strict=True):
        np.testing.assert_array_equal(row, live[item_id])


def test_a_population_gets_the_kind_its_size_calls_for() -> None:
    config = IndexConfig(ivf_min_rows=1000, nlist=8, auto_merge=False)
    assert [config.kind_for(n) for n in (999, 1000, 10**8)] == ["exact", "ivf_pq4", "ivf_pq4"]
    assert IndexConfig(kind="exact").kind_for(10**8) == "exact"
    index = VectorIndex.build(D + 1, [f"t{j}" for j in range(1200)], spread_rows(1200, 3),
                              [([f"n{j}" for j in range(800)], spread_rows(800, 4))], config)
    assert index.kinds == ("ivf_pq4", "exact")
    index.add([f"m{j}" for j in range(2500)], spread_rows(2500, 5))
    index.merge()  # 3,300 new items: the exact base is rebuilt as IVF-PQ4
    assert index.kinds == ("ivf_pq4", "ivf_pq4")


def test_many_excluded_items_in_an_ivf_population_are_over_fetched_not_missed() -> None:
    rows = spread_rows(4000, seed=6)
    live = {f"i{j}": rows[j] for j in range(4000)}
    index = VectorIndex.build(D + 1, [], np.zeros((0, D + 1)), [(list(live), rows)], all_lists(rerank=500))
    q = spread_rows(4, seed=7) * 8
    exclude = [{h.item_id for h in hits} for hits in new_only(index, q, 300)]  # each query's own top 300
    assert_top(new_only(index, q, 10, exclude), oracle(q, live, 10, exclude))


# -- recall on a real model's rows ------------------------------------------------------------


@pytest.fixture(scope="module")
def served_model(tmp_path_factory: pytest.TempPathFactory) -> TrainedArtifact:
    """A model as the trainer's defaults make it, 10 epochs (~10 s): the index is tested on the
    rows a served model generates. The suite's one-epoch tiny model is no stand-in here: its ridge
    rows onto a barely trained V are an isotropic cloud around one mean row, which no list
    structure can split (random directions need 32 of its ~360 lists for recall 0.95)."""
    from training.train import TrainConfig

    return train_and_export(tmp_path_factory.mktemp("served"), TrainConfig(seed=0, epochs=10, progress=False))


@pytest.fixture(scope="module")
def generated(served_model: TrainedArtifact, tmp_path_factory: pytest.TempPathFactory) -> tuple[
        Recommender, Array, Array]:
    """A served model, 30k generated rows of perturbed real items, and 300 real users' queries."""
    store = SqliteStore(tmp_path_factory.mktemp("ivf") / "s.sqlite3")
    rec = Recommender(load_artifact(served_model.root), store)
    ds = served_model.dataset
    assert ds.features is not None
    rng = np.random.default_rng(0)
    n = 30_000
    base, donor = rng.integers(0, ds.n_items, n), rng.integers(0, ds.n_items, n)
    mix = rng.uniform(0, 0.4, (n, 1))
    content = (1 - mix) * ds.features[base] + mix * ds.features[donor]
    content += rng.normal(scale=0.1 * float(np.abs(ds.features).mean()), size=content.shape)
    items = [NewItem(f"g{j}", list(ds.item_attributes[base[j]]), content[j].tolist()) for j in range(n)]
    rows = rec.embedder.embed(items)  # (n, D+1) what POST /items would index
    position = {item_id: j for j, item_id in enumerate(rec.warm_ids)}
    users: dict[int, list[int]] = {}
    for u, i in ds.interactions.tolist():
        if ds.item_ids[i] in position:
            users.setdefault(u, []).append(position[ds.item_ids[i]])
    chosen = rng.choice(sorted(users), 300, replace=False)
    queries = np.concatenate([rec.user_query(rec.warm_rows[users[u]]) for u in chosen.tolist()])
    store.close()
    return rec, rows, queries


def test_ivf_recall_at_20_is_at_least_0_95_on_a_real_models_generated_rows(
    generated: tuple[Recommender, Array, Array],
) -> None:
    rec, rows, q = generated
    n = len(rows)
    new = {f"g{j}": rows[j] for j in range(n)}
    for row_codes in ("float32", "sq8"):
        config = IndexConfig(ivf_min_rows=10_000, row_codes=row_codes, auto_merge=False)  # default nlist and nprobe
        batches = [(list(new)[s : s + 3000], rows[s : s + 3000]) for s in range(0, n, 3000)]  # as from a store:
        index = VectorIndex.build(rec.dim, list(rec.warm_ids), rec.warm_rows, batches, config)  # SQ8 from 12k rows
        assert index._base is not None and index._base.index.nlist > 4 * config.nprobe  # a real subset is probed
        truth = oracle(q, new, 20)
        found = new_only(index, q, 20)
        assert np.mean([len({h.item_id for h in t} & {h.item_id for h in f}) / 20
                        for t, f in zip(truth, found, strict=True)]) >= 0.95, row_codes
        # Random directions of the same norms: the stress test of the lists themselves (a wrong lift
        # leaves recall low however many lists are probed); their top-20s spread over far more rows.
        g = np.random.default_rng(1).standard_normal(q[:, :-1].shape).astype(np.float32)
        spread = q.copy()
        spread[:, :-1] = g / np.linalg.norm(g, axis=1, keepdims=True) * np.linalg.norm(q[:, :-1], axis=1, keepdims=True)
        truth = oracle(spread, new, 20)
        assert len({h.item_id for t in truth for h in t}) > 200
        index.nprobe = 128
        found = new_only(index, spread, 20)
        assert np.mean([len({h.item_id for h in t} & {h.item_id for h in f}) / 20
                        for t, f in zip(truth, found, strict=True)]) >= 0.95, row_codes


@pytest.mark.parametrize("row_codes", ["float16", "sq8"])
def test_ivf_pq4_with_compressed_rows_keeps_its_answers_close_to_exact_through_a_rebuild_and_a_snapshot(
        row_codes: RowCodes, tmp_path: Path) -> None:
    """Rows kept as float16 or SQ8 codes (half or a quarter of float32: the memory of a 10M catalogue):
    the re-ranked scores stay within the codes' step of exact, after a rebuild (the old rows from their
    codes) and after a snapshot, which restores the codes themselves."""
    rows = spread_rows(5000, seed=11)
    live = {f"i{j}": rows[j] for j in range(3000)}
    config = all_lists(row_codes=row_codes, retrain_growth=1.5)
    index = VectorIndex.build(D + 1, [], np.zeros((0, D + 1)), [(list(live), rows[:3000])], config)
    q = spread_rows(8, seed=12) * 8

    def close_to_exact(found: list[list[Hit]]) -> None:
        expected = oracle(q, live, 15)
        scale = max(abs(h.score) for t in expected for h in t)
        for b, got in enumerate(found):  # each answer's score is its exact score up to the codes' step
            exact = q[b].astype(np.float64) @ np.stack([live[h.item_id] for h in got]).T.astype(np.float64)
            step = 0.02 if row_codes == "sq8" else 0.002
            np.testing.assert_allclose([h.score for h in got], exact, atol=step * scale)
        assert np.mean([len({h.item_id for h in f} & {h.item_id for h in e}) / 15
                        for f, e in zip(found, expected, strict=True)]) >= 0.9

    assert index._base is not None and index._base.rows is not None and index._base.rows.codes == row_codes
    assert index._base.rows.get(np.arange(3, dtype=np.int64), raw=True).nbytes == 3 * (D + 1) * (
        2 if row_codes == "float16" else 1)
    close_to_exact(new_only(index, q, 15))
    trained_on = index._base.trained_rows
    more = {f"n{j}": rows[3000 + j] for j in range(2000)}
    index.add(list(more), rows[3000:])
    live.update(more)
    index.merge()  # 5000 > 1.5 x 3000: rebuilt and retrained, the old rows from their codes
    assert index._base is not None and index._base.trained_rows > trained_on
    close_to_exact(new_only(index, q, 15))
    index.save(tmp_path / "snapshot", event_id=None)
    loaded, _ = VectorIndex.load(tmp_path / "snapshot", config)
    assert loaded._base is not None and loaded._base.rows is not None and loaded._base.rows.codes == row_codes
    assert new_only(loaded, q, 15) == new_only(index, q, 15)


def test_a_streamed_build_codes_rows_as_sq8_from_the_batch_that_makes_the_base_ivf_and_keeps_far_rows_exact() -> None:
    """A build from batches (a store read at start-up) codes the rows as SQ8 once the catalogue is large
    enough for IVF-PQ4, with ranges from the rows so far, so it never stages the catalogue as float32:
    rows of later batches beyond those ranges go to the segment's exact long rows, an upsert in a later
    batch replaces, and every answer is the exact one up to the codes' step (exact for the far rows)."""
    rows = spread_rows(3000, seed=31)
    rows[2500:2510] *= 30 / np.abs(rows[2500:2510]).max(1, keepdims=True)  # far beyond the first 800 rows' ranges
    batches = [([f"i{j}" for j in range(s, s + 400)], rows[s : s + 400]) for s in range(0, 2800, 400)]
    batches.append((["i5", "late"], rows[2998:3000]))  # i5 replaced by a later batch
    live = {f"i{j}": rows[j] for j in range(2800)} | {"i5": rows[2998], "late": rows[2999]}
    index = VectorIndex.build(D + 1, [], np.zeros((0, D + 1)), batches, all_lists(row_codes="sq8", rerank=200))
    base = index._base
    assert base is not None and base.rows is not None and base.rows.codes == "sq8" and base.long is not None
    far = set(base.long.ids().tolist())
    assert set(range(2500, 2510)) <= far and len(far) < 100  # iid j is row j: the batches' order
    assert base.rows.get(np.arange(3, dtype=np.int64), raw=True).dtype == np.uint8
    q = np.concatenate([rows[2500:2503], spread_rows(5, seed=32)]) * 8
    found, expected = new_only(index, q, 15), oracle(q, live, 15)
    scale = max(abs(h.score) for t in expected for h in t)
    far_ids = {f"i{j}" for j in range(2500, 2510)}
    for b, got in enumerate(found):
        exact = q[b].astype(np.float64) @ np.stack([live[h.item_id] for h in got]).T.astype(np.float64)
        np.testing.assert_allclose([h.score for h in got], exact, atol=0.02 * scale)
        kept_exact = [j for j, h in enumerate(got) if h.item_id in far_ids]
        np.testing.assert_allclose([got[j].score for j in kept_exact], exact[kept_exact], rtol=1e-5)
        assert {h.item_id for h in got} & far_ids == {h.item_id for h in expected[b]} & far_ids
    assert all({h.item_id for h in found[b][:3]} <= far_ids for b in range(3))  # they lead their own lists
    assert {h.item_id for t in found for h in t} <= set(live) and index.count() == (0, 2801)


@pytest.mark.parametrize("row_codes", ["float32", "sq8"])
def test_rows_spread_over_several_chunks_read_back_and_survive_a_snapshot(row_codes: RowCodes, tmp_path: Path) -> None:
    """Ids in three RowStore chunks, far apart (a chunk is 2^20 rows, zeroed lazily): a gather across them,
    the slices a rebuild reads, SQ8 coding in place, and a snapshot (the written part of each chunk) all
    give back each id's own row; a search of the segment loaded from the snapshot equals the original's."""
    rows = spread_rows(3000, seed=21)
    ids = np.concatenate([np.arange(5, 1005), (1 << CHUNK_BITS) + np.arange(1000),
                          (5 << CHUNK_BITS) + 7 + np.arange(1000)]).astype(np.int64)
    store = RowStore(D + 1)
    store.put(ids, rows)
    assert [chunk is not None for chunk in store.chunks] == [True, True, False, False, False, True]
    picked = np.array([[3, 1500], [2999, 0]])
    np.testing.assert_array_equal(store.get(ids[picked]), rows[picked])
    segment = build_segment("ivf_pq4", D + 1, ids, store, all_lists(row_codes=row_codes))
    assert segment.rows is store and store.codes == row_codes
    step = 0.02 * np.abs(rows).max() if row_codes == "sq8" else 0.0
    np.testing.assert_allclose(np.concatenate([r for _, r in store.get_chunked(ids)]), rows, atol=step)
    snap = Snapshot(D + 1, empty_exact(D + 1), [], segment, np.zeros(0, np.int64), np.zeros((0, D + 1), np.float32),
                    [], int(ids.max()) + 1, None)
    write_snapshot(tmp_path / "snapshot", snap)
    loaded = read_snapshot(tmp_path / "snapshot").base
    assert loaded is not None and loaded.rows is not None and loaded.rows.used == store.used
    np.testing.assert_array_equal(loaded.rows.get(ids, raw=True), store.get(ids, raw=True))
    q = spread_rows(4, seed=22) * 8
    for a, b in zip(segment.search(q, 10, None, 16, 200), loaded.search(q, 10, None, 16, 200), strict=True):
        np.testing.assert_array_equal(a, b)
    rows_file = (tmp_path / "snapshot").resolve() / "base_rows_5.npy"
    rows_file.write_bytes(rows_file.read_bytes()[:-10])  # a torn file is refused, not read as zeros
    with pytest.raises(ValueError, match=r"base_rows_5\.npy: not the"):
        read_snapshot(tmp_path / "snapshot")
