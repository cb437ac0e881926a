"""The C scoring kernel (service/index/_scoring.c): exact to a NumPy reference, independent of the batch."""

from __future__ import annotations

import faiss
import numpy as np
import numpy.typing as npt
import pytest

from service.index._scoring import inner_products, inner_products_panels, select_best
from service.index.base import Coarse
from service.index.search import _nearest_lists
from service.index.storage import to_panels


def reference(queries: npt.NDArray[np.float32], rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Each score summed over j in order, every product and partial sum rounded to float32."""
    out = np.zeros((len(queries), len(rows)), np.float32)
    for j in range(queries.shape[1]):
        out += (queries[:, j : j + 1] * rows[None, :, j]).astype(np.float32)
    return out


@pytest.mark.parametrize(("n", "b", "d"), [(1, 1, 1), (15, 3, 65), (16, 4, 65), (1001, 15, 65), (300, 16, 129)])
def test_scores_equal_the_sequential_reference_bit_for_bit(n: int, b: int, d: int) -> None:
    rng = np.random.default_rng(n + b + d)
    rows = rng.standard_normal((n, d)).astype(np.float32)
    queries = rng.standard_normal((b, d)).astype(np.float32)
    out = np.full((b, n), np.nan, np.float32)
    inner_products(queries, rows, out)
    assert np.array_equal(out, reference(queries, rows))


def test_a_query_scores_the_same_alone_and_at_every_place_in_a_batch() -> None:
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((333, 65)).astype(np.float32)
    batch = rng.standard_normal((16, 65)).astype(np.float32)
    together = np.empty((16, 333), np.float32)
    inner_products(batch, rows, together)
    for b in range(16):
        alone = np.empty((1, 333), np.float32)
        inner_products(batch[b : b + 1], rows, alone)
        assert np.array_equal(alone[0], together[b])
    # and a row scores the same whatever block it sits in
    tail = np.empty((16, 33), np.float32)
    inner_products(batch, rows[300:], tail)
    assert np.array_equal(tail, together[:, 300:])


def test_writes_into_a_column_slice_and_nothing_else() -> None:
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((40, 8)).astype(np.float32)
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    out = np.full((5, 50), -1.0, np.float32)
    inner_products(queries, rows, out[:, 7:47])
    assert np.array_equal(out[:, 7:47], reference(queries, rows))
    assert (out[:, :7] == -1.0).all() and (out[:, 47:] == -1.0).all()


def test_rejects_wrong_types_and_shapes() -> None:
    rows = np.zeros((4, 3), np.float32)
    queries = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="float32"):
        inner_products(queries.astype(np.float64), rows, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="shapes do not match"):
        inner_products(queries, np.zeros((4, 5), np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="shapes do not match"):
        inner_products(queries, rows, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="contiguous rows"):
        inner_products(queries, rows, np.zeros((4, 2), np.float32).T)
    read_only = np.zeros((2, 4), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        inner_products(queries, rows, read_only)
    inner_products(np.zeros((0, 3), np.float32), rows, np.zeros((0, 4), np.float32))  # nothing to do


def test_nearest_lists_are_the_flat_quantizers() -> None:
    rng = np.random.default_rng(3)
    centroids = rng.standard_normal((200, 10)).astype(np.float32)  # lifted: one more than the queries
    quantizer = faiss.IndexFlatL2(10)
    quantizer.add(centroids)
    coarse = Coarse(quantizer, 1.0, 200)
    queries = rng.standard_normal((15, 9)).astype(np.float32)
    lists = _nearest_lists(coarse, queries, 7)
    _, want = quantizer.search(np.concatenate([queries, np.zeros((15, 1), np.float32)], axis=1), 7)  # q' = [q; 0]
    assert np.array_equal(lists, want)


@pytest.mark.parametrize("n", [1, 16, 17, 250])
def test_panels_score_what_the_rows_score(n: int) -> None:
    rng = np.random.default_rng(n)
    rows = rng.standard_normal((n, 65)).astype(np.float32)
    queries = rng.standard_normal((7, 65)).astype(np.float32)
    panels = to_panels(rows)
    assert panels.shape == (-(-n // 16), 65, 16)
    from_rows, from_panels = np.empty((7, n), np.float32), np.full((7, n + 3), -1.0, np.float32)
    inner_products(queries, rows, from_rows)
    inner_products_panels(queries, panels, n, from_panels[:, :n])
    assert np.array_equal(from_panels[:, :n], from_rows)
    assert (from_panels[:, n:] == -1.0).all()  # only n columns written
    if n > 16:  # a prefix of whole panels scores its rows alone
        head = np.empty((7, 16), np.float32)
        inner_products_panels(queries, panels[:1], 16, head)
        assert np.array_equal(head, from_rows[:, :16])


def test_panels_reject_a_wrong_layout_or_count() -> None:
    panels = to_panels(np.zeros((20, 8), np.float32))
    queries, out = np.zeros((2, 8), np.float32), np.zeros((2, 40), np.float32)
    with pytest.raises(ValueError, match="panels must be"):
        inner_products_panels(queries, np.zeros((2, 8, 8), np.float32), 10, out)
    with pytest.raises(ValueError, match="shapes do not match"):
        inner_products_panels(queries, panels, 33, out)  # two panels hold at most 32 rows
    with pytest.raises(ValueError, match="shapes do not match"):
        inner_products_panels(np.zeros((2, 9), np.float32), panels, 20, out)


def _select(scores: npt.NDArray[np.float32], iids: npt.NDArray[np.int64], k: int, room: int = 64) -> tuple[
        npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    n = len(scores)
    out_s, out_i = np.empty((n, k + room), np.float32), np.empty((n, k + room), np.int64)
    count, bound = np.empty(n, np.int64), np.empty(n, np.float32)
    select_best(scores, iids, k, out_s, out_i, count, bound)
    return out_s, out_i, count, bound


@pytest.mark.parametrize("k", [1, 3, 20, 300])
def test_select_best_takes_the_k_best_and_every_tie_with_the_kth(k: int) -> None:
    rng = np.random.default_rng(k)
    scores = rng.integers(-20, 20, size=(9, 257)).astype(np.float32)  # small integers: ties everywhere
    scores[2, ::3] = -np.inf  # dropped rows are never selected
    scores[4, 5] = np.nan
    iids = rng.permutation(10_000)[:257].astype(np.int64)
    out_s, out_i, count, bound = _select(scores, iids, k)
    for b in range(9):
        valid = [(float(s), int(i)) for s, i in zip(scores[b], iids, strict=True) if np.isfinite(s)]
        ranked = [c for _, c in sorted((-s, col) for col, (s, _) in enumerate(valid))]
        cut = valid[ranked[k - 1]][0] if len(valid) >= k else -np.inf
        want = [valid[c] for c in ranked if valid[c][0] >= cut]  # best first, ties by column
        if len(want) > k + 64:
            assert count[b] == -1
            continue
        assert list(zip(out_s[b, : count[b]].tolist(), out_i[b, : count[b]].tolist(), strict=True)) == want
        assert (out_i[b, count[b] :] == -1).all() and (out_s[b, count[b] :] == -np.inf).all()
        assert bound[b] == (cut if len(valid) >= k and len(want) < 257 else -np.inf)


def test_select_best_reports_too_many_ties() -> None:
    scores = np.zeros((2, 100), np.float32)
    scores[1, :10] = 1.0  # row 1: 10 ones, then 90 zeros tied at the 20th
    _, out_i, count, _ = _select(scores, np.arange(100, dtype=np.int64), 20, room=5)
    assert count.tolist() == [-1, -1]  # 100 and 100 candidates tie into room for 25
    _, out_i, count, _ = _select(scores, np.arange(100, dtype=np.int64), 5, room=5)
    assert count[1] == 10 and out_i[1, :10].tolist() == list(range(10))  # the ones, tied at the 5th


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
def test_select_best_finds_the_best_wherever_they_lie_in_the_row(order: str) -> None:
    rng = np.random.default_rng(11)
    scores = rng.standard_normal((4, 2041)).astype(np.float32)  # 2041: a partial last block
    if order != "shuffled":
        scores.sort(axis=1)
        if order == "descending":
            scores = np.ascontiguousarray(scores[:, ::-1])
    iids = np.arange(2041, dtype=np.int64)
    out_s, out_i, count, _ = _select(scores, iids, 20)
    want = np.argsort(-scores, axis=1, kind="stable")[:, :20]
    assert (count == 20).all() and np.array_equal(out_i[:, :20], want)
    assert np.array_equal(out_s[:, :20], np.take_along_axis(scores, want, axis=1))
