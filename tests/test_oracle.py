"""The alignment oracle and distillation loss against independent references (float64, tiny model)."""

import pytest
import torch

from noiserater.diffusion import GaussianDiffusion
from noiserater.meta.oracle import (
    candidate_alignments,
    candidate_grad_norms,
    distillation_loss,
    distillation_targets,
    oracle_scores,
    validation_gradient,
)
from noiserater.models import build_dit

DT = torch.float64
SIZE, CLASSES, B, K = 4, 3, 2, 3
DIFF = GaussianDiffusion()


def _model(seed=0):
    torch.manual_seed(seed)
    m = build_dit("DiT-N/2", input_size=SIZE, in_channels=1, num_classes=CLASSES, learn_sigma=False,
                  class_dropout_prob=0.0).to(DT)
    with torch.no_grad():  # move off the adaLN-Zero init so every weight matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def _batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    common = lambda b: (torch.randn(b, 1, SIZE, SIZE, generator=g, dtype=DT),
                        torch.randint(0, CLASSES + 1, (b,), generator=g), torch.randint(0, 1000, (b,), generator=g))
    train = (*common(B), torch.randn(B, K, 1, SIZE, SIZE, generator=g, dtype=DT))
    val = (*common(5), torch.randn(5, 1, SIZE, SIZE, generator=g, dtype=DT))
    return train, val


def _loss_of(model, x0, y, t, eps):
    return ((model(DIFF.q_sample(x0, t, eps), t, y) - eps) ** 2).mean()


def _per_candidate_grads(model, batch):
    """Reference: one autograd backward per candidate, flattened [B,K,P]."""
    x0, y, t, eps = batch
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for b in range(eps.shape[0]):
        row = []
        for k in range(eps.shape[1]):
            loss = _loss_of(model, x0[b:b + 1], y[b:b + 1], t[b:b + 1], eps[b:b + 1, k])
            row.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def test_validation_gradient_matches_finite_differences():
    model, (_, val) = _model(), _batches()
    lv, g = validation_gradient(model, val)
    assert lv == pytest.approx(float(_loss_of(model, *val).detach()), rel=1e-12)
    name = "blocks.0.mlp.fc1.weight"
    h = 1e-6
    p = dict(model.named_parameters())[name]
    for idx in [(0, 0), (3, 5), (7, 2)]:
        with torch.no_grad():
            p[idx] += h
            up = float(_loss_of(model, *val))
            p[idx] -= 2 * h
            down = float(_loss_of(model, *val))
            p[idx] += h
        assert float(g[name][idx]) == pytest.approx((up - down) / (2 * h), rel=1e-6, abs=1e-10)


def test_alignments_equal_dot_products_of_per_candidate_gradients():
    model, (train, val) = _model(), _batches()
    _, g = validation_gradient(model, val)
    gflat = torch.cat([g[n].flatten() for n, p in model.named_parameters() if p.requires_grad])
    ref = _per_candidate_grads(model, train) @ gflat
    a = candidate_alignments(model, train, g)
    torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-14)
    # and a finite difference of the candidate losses along g (a third route)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    h = 1e-6
    def losses(sign):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(params[n] + sign * h * g[n] if n in g else params[n])
            x0, y, t, eps = train
            out = torch.stack([((model(DIFF.q_sample(x0, t, eps[:, k]), t, y) - eps[:, k]) ** 2).mean(dim=(1, 2, 3))
                               for k in range(K)], dim=1)
        return out
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    fd = (losses(1) - losses(-1)) / (2 * h)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    torch.testing.assert_close(a, fd, rtol=1e-5, atol=1e-9)


def test_grad_norms_and_cosine_mode():
    model, (train, val) = _model(), _batches()
    ref = _per_candidate_grads(model, train)
    norms = candidate_grad_norms(model, train, chunk=4)  # chunk smaller than B*K: exercises the loop
    torch.testing.assert_close(norms, ref.norm(dim=-1), rtol=1e-10, atol=1e-14)
    _, g = validation_gradient(model, val)
    cos = oracle_scores(model, train, g, "cosine")
    gflat = torch.cat([g[n].flatten() for n, p in model.named_parameters() if p.requires_grad])
    # cosine mode = a / ||grad l|| = cos(grad l, g) * ||g||
    torch.testing.assert_close(cos, torch.nn.functional.cosine_similarity(ref, gflat[None, None], dim=-1) * gflat.norm(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(oracle_scores(model, train, g, "anti"), -oracle_scores(model, train, g, "align"))
    with pytest.raises(ValueError, match="oracle mode"):
        oracle_scores(model, train, g, "best")


def test_oracle_leaves_model_unchanged_and_in_train_mode():
    model, (train, val) = _model(), _batches()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, g = validation_gradient(model, val)
    candidate_alignments(model, train, g)
    candidate_grad_norms(model, train)
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None


def test_distillation_loss_is_cross_entropy_to_standardised_softmax():
    a = torch.tensor([[1.0, 2.0, 3.0], [10.0, 10.0, 10.0], [-5.0, 0.0, 100.0]], dtype=DT)
    s = torch.tensor([[0.3, -0.1, 0.2], [1.0, 0.0, -1.0], [0.0, 0.0, 0.0]], dtype=DT, requires_grad=True)
    p = distillation_targets(a, 0.5)
    # closed form for row 0: z = (-1, 0, 1)/sqrt(2/3), p = softmax(z / 0.5)
    z = torch.tensor([-1.0, 0.0, 1.0], dtype=DT) / (2 / 3) ** 0.5
    torch.testing.assert_close(p[0], torch.softmax(z / 0.5, dim=0))
    torch.testing.assert_close(p[1], torch.full((3,), 1 / 3, dtype=DT))  # no spread: uniform target
    loss = distillation_loss(s, a, 0.5)
    ref = -(p * torch.log_softmax(s, dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(loss, ref)
    # scale invariance per group: multiplying a group's alignments by 1000 leaves its target unchanged
    torch.testing.assert_close(distillation_targets(a * 1000, 0.5), p)
    loss.backward()
    # gradient of CE wrt scores = (softmax(s) - p) / B
    torch.testing.assert_close(s.grad, (torch.softmax(s.detach(), 1) - p) / 3)
