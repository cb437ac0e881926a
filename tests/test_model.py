"""The model definition: attention, missing modalities, fold-in with surrogate rows, bias folding."""

from __future__ import annotations

import pytest
import torch

from service.model import AttributeVocabulary, M2Rec, ModelConfig, item_inputs
from service.model.generator import AttributePooling, M2VAEGenerator
from service.model.inputs import ItemInputs

D, F_DIM, A = 16, 6, 12


def tiny_model(**overrides: object) -> M2Rec:
    torch.manual_seed(0)
    cfg = ModelConfig(n_warm=20, n_attributes=A, content_dim=F_DIM, item_dim=D, user_latent=8,
                      gen_hidden=24, gen_latent=8, **overrides)  # type: ignore[arg-type]
    return M2Rec(cfg).eval()


def items(attrs: list[list[int]], content: bool = True) -> ItemInputs:
    width = max(1, *(len(a) for a in attrs))
    idx = torch.zeros(len(attrs), width, dtype=torch.long)
    for b, a in enumerate(attrs):
        idx[b, : len(a)] = torch.tensor(a, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    return item_inputs(idx, torch.randn(len(attrs), F_DIM, generator=g) if content else None, F_DIM)


def test_attention_is_a_softmax_over_the_items_own_attributes() -> None:
    torch.manual_seed(0)
    pool = AttributePooling(A, 8)
    idx = torch.tensor([[3, 5, 0, 0], [1, 2, 7, 9], [0, 0, 0, 0]])
    pooled, weights = pool(idx)
    assert torch.all(weights[idx == 0] == 0)  # padding gets no weight
    assert torch.allclose(weights[:2].sum(dim=1), torch.ones(2))
    assert torch.all(weights[2] == 0) and torch.all(pooled[2] == 0)  # no attributes: nothing pooled
    alone, _ = pool(idx[:1, :2])  # same item alone, no padding, no other batch members
    assert torch.allclose(alone[0], pooled[0], atol=1e-6)


def test_item_with_attributes_only_ignores_its_content_and_vice_versa() -> None:
    model = tiny_model()
    x = items([[1, 2, 3], [4]])
    x.has_content = torch.tensor([False, True])
    x.has_attributes = torch.tensor([True, False])
    rows, gates = model.embed_items(x)
    x2 = ItemInputs(x.attributes.clone(), x.content.clone(), x.has_attributes, x.has_content)
    x2.content[0] += 5.0  # item 0 has no content: its content vector must not matter
    x2.attributes[1, 0] = 7  # item 1 has no attributes: their indices must not matter
    rows2, _ = model.embed_items(x2)
    assert torch.isfinite(rows).all()
    assert torch.allclose(rows, rows2, atol=1e-6)
    assert gates["content"][0] == 0 and gates["attributes"][1] == 0
    assert torch.allclose(gates["attributes"][0] + gates["content"][0], torch.tensor(1.0))


def test_item_without_any_modality_still_gets_a_finite_row() -> None:
    model = tiny_model()
    rows, _ = model.embed_items(items([[]], content=False))
    assert rows.shape == (1, D + 1) and torch.isfinite(rows).all()


@pytest.mark.parametrize("overrides", [{"common_view": False}, {"moe": False},
                                       {"generator": "content-vae", "linear_path": False},
                                       {"decoder_features": False}, {"gate_norm": False}])
def test_ablated_generators_embed_items(overrides: dict[str, object]) -> None:
    model = tiny_model(**overrides)
    rows, _ = model.embed_items(items([[1, 2], [3], []]))
    assert rows.shape == (3, D + 1) and torch.isfinite(rows).all()


def test_normalised_gate_moves_with_the_user_whatever_the_latents_scale() -> None:
    """The raw triple product of small latents leaves the modality gate at ~0.5 for everyone; on
    RMS-normalised factors the same weights give users gates that differ by a visible margin."""
    x = items([[1, 2], [3, 4]])
    users = torch.randn(32, D)
    spread = {}
    for norm in (False, True):
        model = tiny_model(gate_norm=norm)
        with torch.no_grad():
            generator = model.generator
            assert isinstance(generator, M2VAEGenerator)
            for view in (generator.enc_a, generator.enc_c):  # latents ~0.01, as trained ones shrink
                for weight in view.parameters():
                    weight.mul_(0.01)
            gates = torch.stack([model.embed_items(x, u.expand(2, -1))[1]["attributes"] for u in users])
        spread[norm] = gates.std(dim=0).mean().item()
    assert spread[False] < 1e-3 < 0.02 < spread[True]


def test_neutral_gate_is_the_population_mean_user() -> None:
    model = tiny_model()
    mean_user = torch.randn(D)
    model.set_neutral_user(mean_user)
    x = items([[1, 2], [5, 6, 7]])
    neutral, _ = model.embed_items(x)
    explicit, _ = model.embed_items(x, mean_user.expand(2, -1))
    other, _ = model.embed_items(x, torch.randn(2, D) * 3)
    assert torch.allclose(neutral, explicit)
    assert not torch.allclose(neutral, other)  # the gate does depend on the user


def test_empty_history_folds_in_to_a_finite_user() -> None:
    model = tiny_model()
    h = model.fold_in(torch.zeros(2, 3, D + 1), torch.zeros(2, 3, dtype=torch.bool))
    assert h.shape == (2, D) and torch.isfinite(h).all()


def test_padded_fold_in_matches_the_sparse_training_encoder() -> None:
    model = tiny_model()
    hist = torch.tensor([3, 7, 11, 2])  # user 0: rows 3, 7, 11; user 1: row 2
    mu_sparse, _ = model.user.encode_sparse(hist, torch.tensor([0, 3]), torch.tensor([3, 1]), None)
    rows = model.item_rows()[torch.tensor([[3, 7, 11], [2, 0, 0]])]  # (2, 3, D+1)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    h = model.fold_in(rows, mask)
    assert torch.allclose(h, model.user.decode(mu_sparse), atol=1e-5)


def test_generated_row_folds_in_exactly_like_a_warm_row_holding_it() -> None:
    model = tiny_model()
    new_row, _ = model.embed_items(items([[1, 4]]))  # (1, D+1) surrogate of a new item
    warm = model.item_rows()
    rows = torch.stack([warm[0], warm[5], new_row[0]])[None]  # history: 2 warm + 1 new item
    h_surrogate = model.fold_in(rows, torch.ones(1, 3, dtype=torch.bool))
    with torch.no_grad():
        model.user.V[9] = new_row[0, :D]  # the same item, had it been warm row 9
    h_warm = model.fold_in(model.item_rows()[torch.tensor([[0, 5, 9]])], torch.ones(1, 3, dtype=torch.bool))
    assert torch.allclose(h_surrogate, h_warm, atol=1e-6)


def test_index_query_keeps_the_trained_bias() -> None:
    model = tiny_model()
    with torch.no_grad():
        model.user.b.copy_(torch.randn(20))
    h = torch.randn(3, D)
    via_index = M2Rec.query(h) @ model.item_rows().T  # (3, J)
    assert torch.allclose(via_index, model.user.logits(h), atol=1e-5)


def test_vocabulary_reports_unknown_tokens_and_pads() -> None:
    vocab = AttributeVocabulary(["genre:Drama", "tag:x"])
    idx, unknown = vocab.encode([["tag:x", "brand:new"], []])
    assert idx.tolist() == [[2], [0]]
    assert unknown == [["brand:new"], []]


def test_config_rejects_unknown_generator() -> None:
    with pytest.raises(ValueError, match="generator"):
        ModelConfig(n_warm=3, n_attributes=2, content_dim=0, generator="gan")


def test_vocabulary_scores_are_kept_without_autograd_and_follow_parameter_changes() -> None:
    torch.manual_seed(0)
    pool = AttributePooling(A, 8)
    idx = torch.tensor([[3, 5, 0], [1, 2, 7]])
    with torch.no_grad():
        first, _ = pool(idx)
        assert pool.vocabulary_scores() is pool.vocabulary_scores()  # kept, not recomputed
        fresh = pool.query(torch.tanh(pool.key(pool.embedding.weight))).squeeze(-1)
        assert torch.equal(pool.vocabulary_scores(), fresh)  # the same numbers as computing them anew
        pool.key.weight.add_(0.5)  # an optimiser step, in place
        moved, _ = pool(idx)
    assert not torch.allclose(first, moved)
    pool.load_state_dict(AttributePooling(A, 8).state_dict())  # copy_ into the same tensors
    with torch.no_grad():
        loaded = pool.query(torch.tanh(pool.key(pool.embedding.weight))).squeeze(-1)
        assert torch.equal(pool.vocabulary_scores(), loaded)
    pooled, _ = pool(idx)  # with autograd: recomputed, so gradients reach the scoring layers
    pooled.sum().backward()
    assert pool.key.weight.grad is not None and pool.query.weight.grad is not None


def test_decoder_from_z_alone_reads_the_item_only_through_its_latent() -> None:
    gen = tiny_model(decoder_features=False).generator
    assert isinstance(gen, M2VAEGenerator)
    z = torch.randn(2, 8)
    a, c = torch.randn(2, 24), torch.randn(2, 24)
    assert torch.equal(gen.decode(z, a, c), gen.decode(z, torch.zeros_like(a), torch.zeros_like(c)))
    assert not torch.equal(gen.decode(z, a, c), gen.decode(z + 1.0, a, c))
    default = tiny_model().generator  # the paper's F([z; a; c]) reads the features as well
    assert isinstance(default, M2VAEGenerator)
    assert not torch.equal(default.decode(z, a, c), default.decode(z, torch.zeros_like(a), c))
