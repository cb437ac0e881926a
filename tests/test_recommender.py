"""The service core against a tiny real model and a real SQLite store: oracles are NumPy brute force."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.core.recommender import Recommender
from service.core.types import InvalidItemError, NewItem, TrainedItemConflictError
from service.model import M2Rec
from service.model.artifact import load_artifact
from service.model.mixing import Calibrated, Policy, Quota
from service.store import Interaction, ItemRecord, SqliteStore
from tests.conftest import TrainedArtifact


def _cold_item(trained: TrainedArtifact, n: int, *, new_id: str | None = None) -> NewItem:
    """The n-th test-cold item of the split with its real attributes and content."""
    j = int(trained.split.cold_items[n])
    ds = trained.dataset
    assert ds.features is not None
    return NewItem(new_id or f"new:{ds.item_ids[j]}", list(ds.item_attributes[j]), ds.features[j].tolist())


@pytest.fixture
def recommender(trained_artifact: TrainedArtifact, tmp_path: Path) -> Recommender:
    rec = Recommender(load_artifact(trained_artifact.root), SqliteStore(tmp_path / "s.sqlite3"))
    rec.maintainer.build_index()
    return rec


def _brute_force(rec: Recommender, history: list[str], k: int, policy: Policy | None = None
                 ) -> list[tuple[str, float]]:
    """Every live item scored with the torch fold-in, then ranked by the policy, in plain Python:
    calibrated, new items' scores mapped and one list by score; quota, slot p holds a new item when
    floor((p+1)·share) > floor(p·share), a population that runs out handing its slots to the other."""
    policy = policy or rec.policy
    ids, vectors, cold = rec.index.live_vectors()
    rows = rec.history_rows(history)
    with torch.inference_mode():
        h = rec.model.fold_in(torch.from_numpy(rows)[None], torch.ones(1, len(rows), dtype=torch.bool))
    scores = vectors[:, :-1].astype(np.float64) @ h[0].numpy().astype(np.float64) + vectors[:, -1]
    ranked = [(s, i, c) for i, s, c in zip(ids, scores.tolist(), cold, strict=True) if i not in set(history)]
    if isinstance(policy, Calibrated):
        ranked = [(policy.scale * s + policy.offset if c else s, i, c) for s, i, c in ranked]
        ranked.sort(key=lambda p: -p[0])
        return [(i, s) for s, i, _ in ranked[:k]]
    trained = sorted((p for p in ranked if not p[2]), key=lambda p: -p[0])
    new = sorted((p for p in ranked if p[2]), key=lambda p: -p[0])
    out: list[tuple[str, float]] = []
    for p in range(k):
        first, second = (new, trained) if int((p + 1) * policy.share + 1e-9) > int(p * policy.share + 1e-9) \
            else (trained, new)
        source = first or second
        if not source:
            break
        s, i, _ = source.pop(0)
        out.append((i, s))
    return out


def test_recommend_equals_brute_force_over_warm_and_registered_rows(
    recommender: Recommender, trained_artifact: TrainedArtifact
) -> None:
    recommender.register([_cold_item(trained_artifact, n) for n in range(20)])
    history = [recommender.warm_ids[3], recommender.warm_ids[40], "new:" + trained_artifact.dataset.item_ids[
        int(trained_artifact.split.cold_items[0])]]
    recommender.store.add_interactions([Interaction("u1", i, float(t)) for t, i in enumerate(history)])
    got = recommender.recommend("u1", 25)
    assert not got.fallback
    expected = _brute_force(recommender, history, 25)
    assert [h.item_id for h in got.hits] == [i for i, _ in expected]
    np.testing.assert_allclose([h.score for h in got.hits], [s for _, s in expected], rtol=1e-4, atol=1e-4)
    assert not set(history) & {h.item_id for h in got.hits}


def test_history_uses_learned_rows_for_trained_items_and_generated_rows_for_registered_ones(
    recommender: Recommender, trained_artifact: TrainedArtifact
) -> None:
    item = _cold_item(trained_artifact, 1)
    recommender.register([item])
    rows = recommender.history_rows([recommender.warm_ids[7], item.item_id])
    np.testing.assert_array_equal(rows[0], recommender.model.item_rows().detach().numpy()[7])
    np.testing.assert_allclose(rows[1], recommender.embedder.embed([item])[0], rtol=1e-6)


def test_items_with_only_attributes_or_only_content_get_finite_distinct_rows(
    recommender: Recommender, trained_artifact: TrainedArtifact
) -> None:
    item = _cold_item(trained_artifact, 2)
    both, attrs_only, content_only = recommender.embedder.embed([
        item, NewItem("a", item.attributes, None), NewItem("c", [], item.content)])
    assert np.isfinite(np.stack([both, attrs_only, content_only])).all()
    assert not np.allclose(attrs_only, content_only)


def test_wrong_content_dimension_is_rejected_naming_expected_and_got(
    recommender: Recommender, trained_artifact: TrainedArtifact
) -> None:
    with pytest.raises(InvalidItemError, match=r"content has 3 values .* expects content_dim=384"):
        recommender.register([NewItem("x", ["genre:Drama"], [0.1, 0.2, 0.3])])
    assert recommender.store.count_items() == 0
    assert recommender.index.count() == (len(recommender.warm_ids), 0)


def test_item_with_only_unknown_attributes_and_no_content_is_rejected(recommender: Recommender) -> None:
    with pytest.raises(InvalidItemError, match="nothing to embed"):
        recommender.register([NewItem("x", ["never-seen-token"], None)])


def test_trained_item_ids_cannot_be_registered_or_deleted(recommender: Recommender) -> None:
    with pytest.raises(TrainedItemConflictError):
        recommender.register([NewItem(recommender.warm_ids[0], ["genre:Drama"], None)])
    with pytest.raises(TrainedItemConflictError):
        recommender.delete(recommender.warm_ids[0])


@pytest.mark.parametrize("policy", [None, Quota(0.25), Quota(0.0), Quota(1.0), Calibrated(2.0, -0.5)])
def test_recommend_mixes_new_and_trained_items_by_the_policy_asked_for(
    recommender: Recommender, trained_artifact: TrainedArtifact, policy: Policy | None
) -> None:
    recommender.register([_cold_item(trained_artifact, n) for n in range(30)])
    history = [recommender.warm_ids[5], recommender.warm_ids[17]]
    recommender.store.add_interactions([Interaction("u2", i, float(t)) for t, i in enumerate(history)])
    got = recommender.recommend("u2", 20, policy=policy)
    expected = _brute_force(recommender, history, 20, policy)
    assert [h.item_id for h in got.hits] == [i for i, _ in expected]
    np.testing.assert_allclose([h.score for h in got.hits], [s for _, s in expected], rtol=1e-4, atol=1e-4)
    assert got.policy == (policy or recommender.policy)
    if isinstance(policy, Quota):
        assert got.cold_share == pytest.approx(int(20 * policy.share + 1e-9) / 20)


def test_an_unknown_user_gets_the_list_of_a_user_folded_in_from_nothing_under_the_same_policy(
    recommender: Recommender, trained_artifact: TrainedArtifact
) -> None:
    recommender.register([_cold_item(trained_artifact, n) for n in range(30)])
    for policy in (None, Quota(0.5)):
        got = recommender.recommend("nobody", 10, policy=policy)
        assert got.fallback and got.policy == (policy or recommender.policy)
        assert [h.item_id for h in got.hits] == [i for i, _ in _brute_force(recommender, [], 10, policy)]
    assert recommender.recommend("nobody", 10, policy=Quota(0.5)).cold_share == 0.5


def test_a_user_whose_history_is_gone_gets_the_fallback_without_their_items(
    recommender: Recommender, trained_artifact: TrainedArtifact
) -> None:
    gone, kept = _cold_item(trained_artifact, 0), _cold_item(trained_artifact, 1)
    recommender.register([gone, kept])
    recommender.store.add_interactions([Interaction("u3", gone.item_id, 0.0)])
    recommender.delete(gone.item_id)
    got = recommender.recommend("u3", 10, policy=Quota(0.5))
    assert got.fallback  # nothing usable left to fold in
    nobody = recommender.recommend("nobody", 10, policy=Quota(0.5))
    assert [h.item_id for h in got.hits] == [h.item_id for h in nobody.hits]


def test_stored_row_from_another_model_version_is_re_embedded(
    recommender: Recommender, trained_artifact: TrainedArtifact
) -> None:
    item = _cold_item(trained_artifact, 3)
    garbage = np.full(recommender.dim, 7.0, np.float32)
    recommender.store.put_items([ItemRecord(item.item_id, item.attributes, item.content, garbage, "old", 1.0)])
    recommender.maintainer.build_index()
    ids, vectors, _ = recommender.index.live_vectors()
    row = vectors[ids.index(item.item_id)]
    np.testing.assert_allclose(row, recommender.embedder.embed([item])[0], rtol=1e-5, atol=1e-6)


def _two_replicas(trained_artifact: TrainedArtifact, tmp_path: Path) -> tuple[Recommender, Recommender, str | None]:
    """Two replicas on one store, both indexed; the cursor is where b's follower starts."""
    artifact = load_artifact(trained_artifact.root)
    a = Recommender(artifact, SqliteStore(tmp_path / "s.sqlite3"))
    b = Recommender(artifact, SqliteStore(tmp_path / "s.sqlite3"))
    cursor = b.maintainer.build_index()
    a.maintainer.build_index()
    return a, b, cursor


def test_follower_applies_another_replicas_upserts_and_deletes(
    trained_artifact: TrainedArtifact, tmp_path: Path
) -> None:
    a, b, cursor = _two_replicas(trained_artifact, tmp_path)
    item = _cold_item(trained_artifact, 4)
    a.register([item])
    assert not b.index.contains(item.item_id)
    followed = b.maintainer.follow(cursor)
    assert b.index.contains(item.item_id) and len(followed.lags) == 1 and not followed.rebuilt
    a.delete(item.item_id)
    b.maintainer.follow(followed.cursor)
    assert not b.index.contains(item.item_id)


def test_follower_rebuilds_when_the_events_it_missed_were_trimmed(
    trained_artifact: TrainedArtifact, tmp_path: Path
) -> None:
    artifact = load_artifact(trained_artifact.root)
    a = Recommender(artifact, SqliteStore(tmp_path / "s.sqlite3", event_cap=2))
    b = Recommender(artifact, SqliteStore(tmp_path / "s.sqlite3", event_cap=2))
    a.register([_cold_item(trained_artifact, 0)])
    cursor = b.maintainer.build_index()
    a.register([_cold_item(trained_artifact, n) for n in range(1, 6)])
    assert b.maintainer.follow(cursor).rebuilt
    assert b.index.count() == (len(b.warm_ids), 6)


def test_query_keeps_the_trained_bias(recommender: Recommender) -> None:
    rows = recommender.history_rows(recommender.warm_ids[:3])
    q = recommender.user_query(rows)
    assert q.shape == (1, recommender.dim) and q[0, -1] == 1.0
    with torch.inference_mode():
        h = recommender.model.fold_in(torch.from_numpy(rows)[None], torch.ones(1, 3, dtype=torch.bool))
    np.testing.assert_allclose(q, M2Rec.query(h).numpy(), rtol=1e-5, atol=1e-6)  # NumPy vs torch float32 sums


def test_service_ranking_matches_the_offline_evaluation_table(
    recommender: Recommender, trained_artifact: TrainedArtifact
) -> None:
    """Offline/online parity: registering every non-trained item and posting a user's training
    history gives the ranking training.item_rows.ItemTable scores offline, merged by the artifact's
    policy (the hybrid protocol's ranking)."""
    from service.model.mixing import merge_order
    from training.item_rows import ItemTable
    from training.train_data import prepare

    ds, split = trained_artifact.dataset, trained_artifact.split
    assert ds.features is not None
    table = ItemTable(recommender.model, prepare(ds, split))
    warm = set(split.warm_items.tolist())
    others = [j for j in range(ds.n_items) if j not in warm]
    recommender.register([NewItem(ds.item_ids[j], list(ds.item_attributes[j]), ds.features[j].tolist())
                          for j in others])
    k = 50
    for u in split.test_users[:3].tolist():
        history = split.train[u].indices.tolist()
        recommender.store.add_interactions([Interaction(str(u), ds.item_ids[j], 0.0) for j in history])
        got = recommender.recommend(str(u), k)
        candidates = np.array([j for j in range(ds.n_items) if j not in set(history)])
        scores = table.score(np.array([u]), candidates, split.train)[0]
        lists = [candidates[(~np.isin(candidates, split.warm_items)) == new] for new in (False, True)]
        ranked = [c[np.argsort(-scores[np.isin(candidates, c)], kind="stable")[:k]] for c in lists]
        by_item = dict(zip(candidates.tolist(), scores.tolist(), strict=True))
        heads = np.array([[[by_item[j] for j in r] for r in ranked]])  # (1, 2, k)
        order, _ = merge_order(recommender.policy, heads)
        expected = [ds.item_ids[ranked[p // k][p % k]] for p in order[0].tolist()]
        got_ids = [h.item_id for h in got.hits]
        assert len(set(got_ids) & set(expected)) >= k - 1  # at most a near-tie at the cut differs
        assert got_ids[:10] == expected[:10]


def test_embedding_a_batch_equals_embedding_its_items_one_by_one_in_the_callers_order(
    recommender: Recommender, trained_artifact: TrainedArtifact
) -> None:
    items = [_cold_item(trained_artifact, n) for n in range(6)]
    items[1] = NewItem("few", items[1].attributes[:1], items[1].content)
    items[4] = NewItem("none", [], items[4].content)
    batch = recommender.embedder.embed(items)
    single = np.concatenate([recommender.embedder.embed([i]) for i in items])
    np.testing.assert_allclose(batch, single, rtol=1e-5, atol=1e-6)


def test_history_rows_follow_updates_and_deletes_made_through_another_replica(
    trained_artifact: TrainedArtifact, tmp_path: Path
) -> None:
    a, b, cursor = _two_replicas(trained_artifact, tmp_path)
    first, second = _cold_item(trained_artifact, 1), _cold_item(trained_artifact, 2)
    a.register([first])
    cursor = b.maintainer.follow(cursor).cursor
    history = [b.warm_ids[0], first.item_id]
    np.testing.assert_allclose(b.history_rows(history)[1], a.embedder.embed([first])[0], rtol=1e-6)  # read, then kept
    a.register([NewItem(first.item_id, second.attributes, second.content)])  # same id, new inputs
    cursor = b.maintainer.follow(cursor).cursor
    np.testing.assert_allclose(b.history_rows(history)[1], a.embedder.embed([second])[0], rtol=1e-6)
    a.delete(first.item_id)
    b.maintainer.follow(cursor)
    assert len(b.history_rows(history)) == 1  # the deleted item no longer enters the fold-in


def test_many_users_at_once_get_exactly_what_each_gets_alone(
    recommender: Recommender, trained_artifact: TrainedArtifact
) -> None:
    """The request batcher's path: same ids and bit-identical scores, whatever else is in the batch."""
    cold = [_cold_item(trained_artifact, n) for n in range(30)]
    recommender.register(cold)
    warm = recommender.warm_ids
    histories = {f"u{u}": [warm[(u * 13 + t) % len(warm)] for t in range(3 + 7 * u)] + [cold[u].item_id]
                 for u in range(12)}
    histories["only-registered"] = [cold[29].item_id]
    recommender.store.add_interactions(
        [Interaction(u, i, float(t)) for u, items in histories.items() for t, i in enumerate(items)])
    requests = [(u, 5 + 3 * n) for n, u in enumerate(histories)] + [("nobody", 7), ("u3", 40)]

    together = recommender.recommend_many(requests)

    alone = [recommender.recommend(u, k) for u, k in requests]
    assert together == alone
    assert [len(r.hits) for r in together] == [k for _, k in requests]
    assert [r.fallback for r in together] == [False] * (len(requests) - 2) + [True, False]
    assert all(not set(histories.get(u, [])) & {h.item_id for h in r.hits}
               for (u, _), r in zip(requests, together, strict=True))


def test_rows_of_many_histories_keep_each_users_usable_items_in_order(
    recommender: Recommender, trained_artifact: TrainedArtifact
) -> None:
    items = [_cold_item(trained_artifact, n) for n in range(3)]
    recommender.register(items)
    recommender.delete(items[1].item_id)  # deleted: left out of every fold-in it appears in
    warm = recommender.warm_ids
    histories = [[warm[0], items[0].item_id, warm[5]], [], [items[1].item_id], [items[1].item_id, warm[2]], [warm[9]]]

    rows, lengths = recommender.histories_rows(histories)

    assert lengths == [3, 0, 0, 1, 1]
    expected = np.concatenate([recommender.history_rows(h) for h in histories])
    np.testing.assert_array_equal(rows, expected)
    generated = recommender.embedder.embed([items[0]])[0]
    np.testing.assert_allclose(rows[1], generated, rtol=1e-5, atol=1e-6)  # its generated row
    np.testing.assert_array_equal(rows[3], recommender.warm_rows[2])
