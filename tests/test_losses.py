"""Losses: finite, differentiable into the right modules, batch-size independent, proper InfoNCE."""

from __future__ import annotations

import math

import numpy as np
import torch

from service.model import M2Rec, ModelConfig
from service.model.generator import Gaussian, M2VAEGenerator
from service.model.inputs import ItemInputs
from training import losses

D, F_DIM, A, B = 16, 6, 10, 8


def model_and_batch(**overrides: object) -> tuple[M2Rec, ItemInputs, torch.Tensor]:
    torch.manual_seed(0)
    cfg = ModelConfig(n_warm=30, n_attributes=A, content_dim=F_DIM, item_dim=D, user_latent=8,
                      gen_hidden=24, gen_latent=8, **overrides)  # type: ignore[arg-type]
    model = M2Rec(cfg)
    attrs = torch.randint(1, A + 1, (B, 3))
    attrs[0, 1:] = 0
    x = ItemInputs(attrs, torch.randn(B, F_DIM), torch.ones(B, dtype=torch.bool),
                   torch.ones(B, dtype=torch.bool))
    x.has_content[1] = False  # one item with attributes only
    return model, x, model.item_rows()[:B].detach()


def backprop(value: torch.Tensor) -> None:
    value.backward(retain_graph=True)  # type: ignore[no-untyped-call]


def grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_generator_losses_are_finite_and_reach_their_modules() -> None:
    model, x, target = model_and_batch()
    gen = model.generator
    assert isinstance(gen, M2VAEGenerator)
    h = torch.randn(B, D)
    out = gen.forward_train(x, target, h, torch.tensor([True, False] * (B // 2)))
    parts = losses.m2vae_elbo(out, target, kl_weight=1.0)
    parts["dis"] = losses.disentangle_loss(out, tau=0.2)
    parts["co"] = losses.cooccurrence_loss(out.rows, torch.randn(B, 3, D + 1), torch.randn(B, 5, D + 1), 0.2)
    parts["bpr"] = losses.bpr_loss(out.rows, h, torch.randn(B, D))
    for name, value in parts.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    for name in ("recon", "kl", "dis", "co", "bpr"):
        gen.zero_grad()
        backprop(parts[name])
        assert grad_norm(gen) > 0, name
    gen.zero_grad()
    backprop(parts["kl"])
    assert grad_norm(gen.enc_id) > 0  # KL(q||p) trains the ID (recognition) view
    gen.zero_grad()
    backprop(parts["dis"])
    assert grad_norm(gen.enc_a) > 0 and grad_norm(gen.raw_proj_c) > 0
    gen.zero_grad()
    backprop(parts["bpr"])
    assert grad_norm(gen.self_gate_a) > 0  # the user-aware gate is trained by the ranking loss


def test_gate_balance_is_zero_for_an_even_batch_and_trains_the_gate() -> None:
    model, x, target = model_and_batch(gate_norm=True)
    gen = model.generator
    assert isinstance(gen, M2VAEGenerator)
    even = torch.tensor([0.2, 0.8, 0.5, 0.5])
    x4 = ItemInputs(x.attributes[:4], x.content[:4], torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    assert abs(float(losses.gate_balance(even, x4))) < 1e-7
    assert float(losses.gate_balance(torch.full((4,), 0.9), x4)) > 0.3
    x4.has_content[:] = False  # no item with both views: nothing to balance
    assert float(losses.gate_balance(torch.full((4,), 0.9), x4)) == 0.0
    out = gen.forward_train(x, target, torch.randn(B, D), torch.ones(B, dtype=torch.bool))
    value = losses.gate_balance(out.gates["attributes"], x)
    assert value.dim() == 0 and torch.isfinite(value)
    backprop(value)
    assert grad_norm(gen.self_gate_a) > 0 and gen.w_a.grad is not None and float(gen.w_a.grad.abs().sum()) > 0


def test_user_losses_reach_the_item_table_and_encoder() -> None:
    model, _, _ = model_and_batch()
    items, offsets, lengths = torch.tensor([1, 4, 9, 2, 2]), torch.tensor([0, 3]), torch.tensor([3, 2])
    mu, logvar = model.user.encode_sparse(items, offsets, lengths, None)
    logits = model.user.logits(model.user.decode(mu))
    nll = losses.multinomial_nll(logits, torch.repeat_interleave(torch.arange(2), lengths), items)
    kl = losses.kl_standard_normal(Gaussian(mu, logvar))
    pull = losses.pull_to_generated(model.item_rows(), torch.ones(30, D + 1), weight=2.0)
    for value in (nll, kl, pull):
        model.zero_grad()
        backprop(value)
        assert torch.isfinite(value)
        assert model.user.V.grad is not None and float(model.user.V.grad.abs().sum()) > 0
    assert model.user.b.grad is not None and float(model.user.b.grad.abs().sum()) > 0  # pull moves b


def test_generated_row_likelihood_trains_the_user_side_not_the_generated_rows() -> None:
    model, _, _ = model_and_batch()
    items, offsets, lengths = torch.tensor([1, 4, 9, 2, 2]), torch.tensor([0, 3]), torch.tensor([3, 2])
    mu, _ = model.user.encode_sparse(items, offsets, lengths, None)
    generated = torch.randn(30, D + 1, requires_grad=True)  # stands in for Ê, the generator's rows
    rows = torch.repeat_interleave(torch.arange(2), lengths)
    value = losses.generated_row_nll(model.user.decode(mu), generated, rows, items)
    model.zero_grad()
    backprop(value)
    assert torch.isfinite(value) and float(value.detach()) > 0
    assert grad_norm(model.user.decoder) > 0 and grad_norm(model.user.encoder) > 0
    assert model.user.V.grad is not None and float(model.user.V.grad.abs().sum()) > 0  # the tied first layer
    assert generated.grad is None  # Ê is a fixed target here: the t-step trains the generator
    # it is the served score's likelihood: the user's items scored by [h; 1]·[ê; b̂]
    h = model.user.decode(mu).detach()
    logp = torch.log_softmax(h @ generated.detach()[:, :-1].T + generated.detach()[:, -1], dim=1)
    expected = -(logp[0, [1, 4, 9]].sum() + logp[1, [2, 2]].sum()) / 2
    assert torch.allclose(losses.generated_row_nll(h, generated, torch.tensor([0, 0, 0, 1, 1]), items), expected)


def test_content_vae_losses_are_finite_and_differentiable() -> None:
    model, x, target = model_and_batch(generator="content-vae", linear_path=False)
    out = model.generator.forward_train(x, target, None, torch.zeros(B, dtype=torch.bool))
    parts = losses.content_vae_elbo(out, x.content, x.attributes, target, pull_weight=1.0, kl_weight=1.0)
    assert set(parts) == {"content", "attributes", "kl", "pull"}
    total = sum(parts.values())
    assert isinstance(total, torch.Tensor) and torch.isfinite(total)
    backprop(total)
    assert grad_norm(model.generator) > 0


def test_info_nce_is_nonnegative_and_about_log_b_plus_one_for_random_inputs() -> None:
    torch.manual_seed(0)
    n = 63
    value = losses.info_nce(torch.randn(256, 512), torch.randn(256, 512), torch.randn(n, 512), tau=1.0)
    assert torch.all(value >= 0)
    assert abs(float(value.mean()) - math.log(n + 1)) < 0.05


def test_info_nce_keeps_the_positive_in_the_denominator() -> None:
    anchor = torch.tensor([[1.0, 0.0]])
    positive = torch.tensor([[1.0, 0.0]])  # cosine 1
    negatives = torch.tensor([[0.0, 1.0], [0.0, -1.0]])  # cosine 0
    tau = 0.5
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 2.0))
    assert math.isclose(float(losses.info_nce(anchor, positive, negatives, tau)[0]), expected, rel_tol=1e-5)
    co = losses.cooccurrence_loss(anchor, positive[:, None], negatives[None], tau)
    assert math.isclose(float(co), expected, rel_tol=1e-5)


def test_losses_do_not_depend_on_batch_size() -> None:
    torch.manual_seed(0)
    rows, h1, h2 = torch.randn(4, D + 1), torch.randn(4, D), torch.randn(4, D)
    pos, neg = torch.randn(4, 3, D + 1), torch.randn(4, 5, D + 1)
    g = Gaussian(torch.randn(4, 8), torch.randn(4, 8))

    def twice(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t])

    pairs = [
        (losses.bpr_loss(rows, h1, h2), losses.bpr_loss(twice(rows), twice(h1), twice(h2))),
        (losses.cooccurrence_loss(rows, pos, neg, 0.2),
         losses.cooccurrence_loss(twice(rows), twice(pos), twice(neg), 0.2)),
        (losses.reconstruction_mse(rows, rows * 2), losses.reconstruction_mse(twice(rows), twice(rows) * 2)),
        (losses.kl_standard_normal(g), losses.kl_standard_normal(Gaussian(twice(g.mu), twice(g.logvar)))),
    ]
    logits = torch.randn(2, 7)
    r, i = torch.tensor([0, 0, 1]), torch.tensor([1, 3, 6])
    pairs.append((losses.multinomial_nll(logits, r, i),
                  losses.multinomial_nll(twice(logits), torch.cat([r, r + 2]), twice(i))))
    for one, two in pairs:
        assert torch.allclose(one, two, atol=1e-6)


def test_kl_oracles() -> None:
    zero = Gaussian(torch.zeros(3, 4), torch.zeros(3, 4))
    assert float(losses.kl_standard_normal(zero)) == 0.0
    q = Gaussian(torch.tensor([[1.0]]), torch.tensor([[0.0]]))
    p = Gaussian(torch.tensor([[0.0]]), torch.tensor([[math.log(4.0)]]))
    # KL(N(1,1) || N(0,4)) = log 2 + (1 + 1)/(2·4) - 1/2
    expected = math.log(2.0) + 2.0 / 8.0 - 0.5
    assert math.isclose(float(losses.kl_gaussians(q, p)), expected, rel_tol=1e-5)


def test_in_batch_ranking_loss_prefers_the_users_items_and_reaches_the_rows() -> None:
    from training.losses import in_batch_ranking_loss

    torch.manual_seed(0)
    h = torch.randn(4, 8)  # (U, D)
    truth = torch.zeros(4, 6)
    truth[torch.arange(4), torch.tensor([0, 1, 2, 3])] = 1.0  # (U, B)
    aligned = torch.zeros(6, 9)
    aligned[:4, :8] = 3.0 * h  # each user's own item points along the user
    rows = aligned.clone().requires_grad_(True)
    loss = in_batch_ranking_loss(rows, h, truth)
    assert torch.isfinite(loss)
    loss.backward()  # type: ignore[no-untyped-call]
    assert rows.grad is not None and rows.grad.abs().sum() > 0
    shuffled = aligned[[1, 2, 3, 0, 4, 5]]
    assert in_batch_ranking_loss(aligned, h, truth) < in_batch_ranking_loss(shuffled, h, truth)


def test_surrogate_ranking_loss_ranks_generated_rows_among_trained_ones() -> None:
    from training.losses import surrogate_ranking_loss

    torch.manual_seed(0)
    h = torch.randn(3, 8)  # (U, D)
    table = torch.randn(10, 9) * 0.1  # (J, D+1) trained rows, detached
    batch = torch.tensor([2, 5, 7])  # table rows the generator replaces
    truth = torch.eye(3)  # user u took batch item u
    aligned = torch.zeros(3, 9)
    aligned[:, :8] = 3.0 * h
    rows = aligned.clone().requires_grad_(True)
    loss = surrogate_ranking_loss(rows, batch, table, h, truth)
    assert torch.isfinite(loss)
    loss.backward()  # type: ignore[no-untyped-call]
    assert rows.grad is not None and rows.grad.abs().sum() > 0
    # the generated rows replace their trained rows: a trained row's value must not matter
    changed = table.clone()
    changed[batch] = 100.0
    assert torch.isclose(surrogate_ranking_loss(aligned, batch, changed, h, truth),
                         surrogate_ranking_loss(aligned, batch, table, h, truth))
    shuffled = aligned[[1, 2, 0]]
    assert surrogate_ranking_loss(aligned, batch, table, h, truth) < surrogate_ranking_loss(
        shuffled, batch, table, h, truth)
    # the same value and gradient as the whole swapped table scored in one autograd graph
    plain_rows = aligned.clone().requires_grad_(True)
    surrogate = table.index_copy(0, batch, plain_rows)  # (J, D+1)
    logp = torch.log_softmax(h @ surrogate[:, :-1].T + surrogate[:, -1], dim=1)[:, batch]  # (U, B)
    plain = (-(logp * truth).sum(dim=1) / truth.sum(dim=1)).mean()
    plain.backward()  # type: ignore[no-untyped-call]
    assert torch.allclose(loss, plain) and rows.grad is not None and plain_rows.grad is not None
    assert torch.allclose(rows.grad, plain_rows.grad)


def test_sampled_softmax_is_the_full_one_when_every_item_is_drawn() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50)  # (B, J)
    rows = torch.tensor([0, 0, 1, 2, 3, 3, 3])
    items = torch.tensor([3, 7, 7, 49, 0, 1, 2])
    full = losses.multinomial_nll(logits, rows, items)
    candidates, places, log_weight = losses.sampled_softmax_weights(items.numpy(), np.arange(50), 50)
    assert candidates.tolist() == list(range(50)) and not log_weight.any()
    sampled = losses.multinomial_nll(logits[:, candidates] + torch.from_numpy(log_weight), rows,
                                     torch.from_numpy(places))
    assert torch.allclose(sampled, full)


def test_sampled_softmax_weights_the_drawn_items_up_to_the_rest_of_the_catalogue() -> None:
    items = np.array([5, 9, 5])
    candidates, places, log_weight = losses.sampled_softmax_weights(items, np.array([1, 9, 30, 30]), 100)
    assert candidates.tolist() == [1, 5, 9, 30]
    assert candidates[places].tolist() == items.tolist()
    # 98 items are not the batch's; 2 distinct of them were drawn: each stands for 49
    np.testing.assert_allclose(log_weight, [math.log(49), 0, 0, math.log(49)], rtol=1e-6)
    # its expected denominator is the full one's: uniform draws of the rest, scaled
    rng = np.random.default_rng(0)
    logits = rng.normal(size=100)
    full = np.exp(logits).sum()
    estimates = []
    for _ in range(2000):
        c, _, w = losses.sampled_softmax_weights(items, rng.choice(100, 20, replace=False), 100)
        estimates.append((np.exp(logits[c] + w)).sum())
    assert abs(np.mean(estimates) / full - 1) < 0.02
