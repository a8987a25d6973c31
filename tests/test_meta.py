"""Meta-gradients: every method against an independent reference, in float64 on a tiny problem.

References are written here from scratch: the inner loop uses a deep copy of the DiT stepped by
``torch.optim.SGD`` / ``torch.optim.Adam`` on a loss computed directly from ``q_sample`` and the model,
and finite differences perturb a copy of the rater.
"""

from __future__ import annotations

import copy

import pytest
import torch

from noiserater.config import ConfigError
from noiserater.diffusion import GaussianDiffusion
from noiserater.meta import InnerOptimizer, meta_gradient, meta_gradient_info
from noiserater.models import build_dit, build_rater

DT = torch.float64
SIZE, CLASSES, B, K = 4, 3, 2, 3
DIFF = GaussianDiffusion()


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny float64 graphs: one thread avoids OpenMP spin contention on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_models(seed: int = 0):
    torch.manual_seed(seed)
    model = build_dit("DiT-N/2", input_size=SIZE, in_channels=1, num_classes=CLASSES, learn_sigma=False).to(DT)
    with torch.no_grad():  # leave the adaLN-Zero init: a "trained" model has non-zero gates and output layer
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    rater = build_rater("Rater-N/2", input_size=SIZE, in_channels=1, num_classes=CLASSES).to(DT)
    return model, rater


def make_batches(S: int, seed: int = 1, b: int = B):
    g = torch.Generator().manual_seed(seed)

    def common():
        return (torch.randn(b, 1, SIZE, SIZE, generator=g, dtype=DT), torch.randint(0, CLASSES + 1, (b,), generator=g),
                torch.randint(0, 1000, (b,), generator=g))

    train = [(*common(), torch.randn(b, K, 1, SIZE, SIZE, generator=g, dtype=DT)) for _ in range(S)]
    val = (*common(), torch.randn(b, 1, SIZE, SIZE, generator=g, dtype=DT))
    return train, val


# ---- an independent reference implementation of L_val(theta_S(eta)) -----------------------------------


def ref_candidate_losses(model, batch):
    x0, y, t, eps = batch
    rows = []
    for k in range(eps.shape[1]):
        x_t = DIFF.q_sample(x0, t, eps[:, k])
        rows.append(((model(x_t, t, y) - eps[:, k]) ** 2).mean(dim=(1, 2, 3)))
    return torch.stack(rows, dim=1)  # [B,K]


def ref_weights(rater, batch, temperature=1.0):
    x0, y, t, eps = batch
    scores = torch.stack([rater(eps[:, k], t, x0, y) for k in range(eps.shape[1])], dim=1)
    return torch.softmax(scores / temperature, dim=1)


def ref_val_loss(model, batch):
    x0, y, t, eps = batch
    return ((model(DIFF.q_sample(x0, t, eps), t, y) - eps) ** 2).mean()


def ref_outer_loss(model, rater, train, val, lr, opt_name, adam_eps=1e-8):
    """L_val after S steps of torch.optim.SGD/Adam on the rater-weighted loss (weights held as data)."""
    m = copy.deepcopy(model).eval()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr) if opt_name == "sgd" else torch.optim.Adam(params, lr=lr, eps=adam_eps, foreach=False)
    for batch in train:
        with torch.no_grad():
            w = ref_weights(rater.eval(), batch)
        opt.zero_grad()
        ((w * ref_candidate_losses(m, batch)).sum(1).mean()).backward()
        opt.step()
    with torch.no_grad():
        return ref_val_loss(m, val).item()


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def rel(a, b):
    return (flat(a) - flat(b)).norm().item() / flat(b).norm().item()


# ---- tests ----------------------------------------------------------------------------------------------


# Adam's step g / (|g| + eps) is very steep where |g| << eps, and this model has such coordinates: with the
# default eps = 1e-8 central differences converge only for h ~ 1e-9, where round-off allows checking the
# steepest direction alone. With eps = 1e-4 the map is smooth and random directions are checked at h = 1e-5.
@pytest.mark.parametrize("opt_name,lr,S,adam_eps,h,n_random", [
    ("sgd", 0.05, 3, None, 1e-5, 2),
    ("adam", 0.01, 2, 1e-4, 1e-5, 2),
    ("adam", 0.01, 2, 1e-8, 1e-9, 0),
])
def test_unrolled_matches_finite_differences(opt_name, lr, S, adam_eps, h, n_random):
    model, rater = make_models()
    train, val = make_batches(S)
    opt = InnerOptimizer(opt_name, lr, eps=adam_eps) if adam_eps else opt_name
    grads = meta_gradient(model, rater, train, val, inner_lr=lr, method="unrolled", inner_optimizer=opt)
    params = list(rater.parameters())
    assert len(grads) == len(params) and all(g.shape == p.shape for g, p in zip(grads, params))
    assert flat(grads).norm().item() > 1e-6  # a non-trivial gradient is checked
    gen = torch.Generator().manual_seed(5)
    directions = [[g / flat(grads).norm() for g in grads]]  # steepest direction: largest derivative
    for _ in range(n_random):
        d = [torch.randn(p.shape, generator=gen, dtype=DT) * p.requires_grad for p in params]
        directions.append([x / flat(d).norm() for x in d])
    for d in directions:
        vals = []
        for sign in (1, -1):
            r2 = copy.deepcopy(rater)
            with torch.no_grad():
                for p, di in zip(r2.parameters(), d):
                    p.add_(sign * h * di)
            vals.append(ref_outer_loss(model, r2, train, val, lr, opt_name, adam_eps or 1e-8))
        fd = (vals[0] - vals[1]) / (2 * h)
        analytic = float(sum((g * di).sum() for g, di in zip(grads, d)))
        assert abs(fd - analytic) <= 1e-4 * abs(analytic), (fd, analytic)


def test_val_loss_after_inner_steps_matches_reference():
    model, rater = make_models()
    train, val = make_batches(3)
    for opt_name, lr in (("sgd", 0.05), ("adam", 0.01)):
        for method in ("unrolled", "reverse"):
            res = meta_gradient_info(model, rater, train, val, inner_lr=lr, method=method, inner_optimizer=opt_name)
            assert res.val_loss == pytest.approx(ref_outer_loss(model, rater, train, val, lr, opt_name), rel=1e-10)


@pytest.mark.parametrize("opt_name,lr", [("sgd", 0.05), ("adam", 0.01)])
@pytest.mark.parametrize("S", [1, 3, 5])
@pytest.mark.parametrize("method", ["reverse", "reverse_fwd"])
def test_reverse_matches_unrolled(method, S, opt_name, lr):
    model, rater = make_models(seed=S)
    train, val = make_batches(S, seed=10 + S)
    ref = meta_gradient(model, rater, train, val, inner_lr=lr, method="unrolled", inner_optimizer=opt_name)
    got = meta_gradient(model, rater, train, val, inner_lr=lr, method=method, inner_optimizer=opt_name)
    assert flat(ref).norm() > 1e-8
    assert rel(got, ref) < 1e-6


@pytest.mark.parametrize("opt_name,lr", [("sgd", 0.05), ("adam", 0.01)])
@pytest.mark.parametrize("budget", [1, 2, 4, 9])
@pytest.mark.parametrize("method", ["reverse", "reverse_fwd"])
def test_memory_budget_keeps_graphs_and_the_gradient(method, budget, opt_name, lr):
    """memory_budget=W keeps the last W steps' graphs from the forward sweep (W >= S: all of them); the
    meta-gradient, the validation loss and theta_S stay those of unrolled autograd."""
    S = 4
    model, rater = make_models(seed=7)
    train, val = make_batches(S, seed=17)
    ref = meta_gradient_info(model, rater, train, val, inner_lr=lr, method="unrolled", inner_optimizer=opt_name)
    got = meta_gradient_info(model, rater, train, val, inner_lr=lr, method=method, inner_optimizer=opt_name,
                             memory_budget=budget)
    assert flat(ref.grads).norm() > 1e-8 and rel(got.grads, ref.grads) < 1e-6
    assert got.val_loss == pytest.approx(ref.val_loss, rel=1e-12)
    with pytest.raises(ConfigError, match="memory_budget"):
        meta_gradient(model, rater, train, val, inner_lr=lr, method=method, memory_budget=-1)


def independent_first_order_term(model, rater, batch, val, lr):
    """-lr/B sum_bk <grad L_val(theta_0), grad l_bk(theta_0)> d w_bk / d eta, gradients one candidate at a time."""
    m = copy.deepcopy(model).eval()
    params = [p for p in m.parameters() if p.requires_grad]
    gval = torch.autograd.grad(ref_val_loss(m, val), params)
    x0, y, t, eps = batch
    align = torch.zeros(B, K, dtype=DT)
    for b in range(B):
        for k in range(K):
            one = (x0[b:b + 1], y[b:b + 1], t[b:b + 1], eps[b:b + 1, k:k + 1])
            gk = torch.autograd.grad(ref_candidate_losses(m, one).sum(), params)
            align[b, k] = sum((a * c).sum() for a, c in zip(gval, gk))
    r = copy.deepcopy(rater).eval()
    w = ref_weights(r, batch)
    trainable = [p for p in r.parameters() if p.requires_grad]
    grads = iter(torch.autograd.grad(w, trainable, grad_outputs=-lr * align / B, allow_unused=True))
    return [next(grads) if p.requires_grad else None for p in r.parameters()]


def test_alignment_is_theorem_4_2_first_order_term():
    model, rater = make_models()
    train, val = make_batches(1)
    lr = 0.005
    got = meta_gradient(model, rater, train, val, inner_lr=lr, method="alignment")
    ref = independent_first_order_term(model, rater, train[0], val, lr)
    ref = [torch.zeros_like(g) if r is None else r for g, r in zip(got, ref)]
    assert rel(got, ref) < 1e-10
    # Exact (unrolled) minus alignment is the dropped curvature term: O(lr^2), so halving lr quarters it.
    diffs = []
    for a in (lr, lr / 2, lr / 4):
        exact = meta_gradient(model, rater, train, val, inner_lr=a, method="unrolled")
        approx = meta_gradient(model, rater, train, val, inner_lr=a, method="alignment")
        diffs.append((flat(exact) - flat(approx)).norm().item())
        assert diffs[-1] < 0.5 * flat(exact).norm().item()  # the first-order term dominates
    assert diffs[0] > 0
    for big, small in zip(diffs, diffs[1:]):
        assert 3.5 < big / small < 4.5, diffs


def test_alignment_adam_is_first_order():
    """For Adam the alignment estimate is the first-order (in lr) meta-gradient: its error is O(lr^2)."""
    model, rater = make_models()
    train, val = make_batches(2)
    diffs = []
    for a in (1e-3, 5e-4, 2.5e-4):
        exact = meta_gradient(model, rater, train, val, inner_lr=a, method="unrolled", inner_optimizer="adam")
        approx = meta_gradient(model, rater, train, val, inner_lr=a, method="alignment", inner_optimizer="adam")
        diffs.append((flat(exact) - flat(approx)).norm().item())
    for big, small in zip(diffs, diffs[1:]):  # Adam's steep g/(|g|+eps) delays the asymptotic ratio 4
        assert 3.5 < big / small < 5.0, diffs


@pytest.mark.parametrize("method", ["unrolled", "reverse", "reverse_fwd", "alignment"])
def test_model_and_rater_unchanged(method):
    model, rater = make_models()
    model.train()
    rater.train()
    frozen = rater.pos_embed
    train, val = make_batches(2)
    before_m = {k: v.clone() for k, v in model.state_dict().items()}
    before_r = {k: v.clone() for k, v in rater.state_dict().items()}
    grads = meta_gradient(model, rater, train, val, inner_lr=0.05, method=method, inner_optimizer="adam")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_m.items())
    assert all(torch.equal(v, rater.state_dict()[k]) for k, v in before_r.items())
    assert all(p.grad is None for p in model.parameters()) and all(p.grad is None for p in rater.parameters())
    assert model.training and rater.training
    idx = [i for i, p in enumerate(rater.parameters()) if p is frozen][0]
    assert torch.count_nonzero(grads[idx]) == 0  # frozen position embedding: zero, still aligned


def test_inner_adam_matches_torch_optim():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(7, dtype=DT, generator=gen)
    ref = p.clone().requires_grad_()
    topt = torch.optim.Adam([ref], lr=0.1, foreach=False)
    opt = InnerOptimizer("adam", 0.1)
    params, state = [p], opt.init_state([p])
    for s in range(1, 6):
        g = torch.randn(7, dtype=DT, generator=gen)
        ref.grad = g.clone()
        topt.step()
        params, state = opt.step(params, [g], state, s)
    assert torch.allclose(params[0], ref.detach(), rtol=1e-12, atol=1e-14)
    # a coordinate with zero gradients throughout gives finite (zero-NaN-free) derivatives
    g0 = torch.zeros(3, dtype=DT, requires_grad=True)
    new, _ = opt.step([torch.zeros(3, dtype=DT)], [g0], opt.init_state([g0]), 1)
    (d,) = torch.autograd.grad(new[0].sum(), g0)
    assert torch.isfinite(d).all() and torch.allclose(d, torch.full_like(d, -0.1 / 1e-8))


def test_bad_inputs_are_clear_errors():
    model, rater = make_models()
    train, val = make_batches(1)
    with pytest.raises(ValueError, match="unknown meta-gradient method"):
        meta_gradient(model, rater, train, val, inner_lr=0.1, method="implicit")
    with pytest.raises(ValueError, match="unknown inner optimizer"):
        meta_gradient(model, rater, train, val, inner_lr=0.1, method="reverse", inner_optimizer="lbfgs")
    with pytest.raises(ValueError, match="inner learning rate"):
        meta_gradient(model, rater, train, val, inner_lr=0.0, method="reverse")
    with pytest.raises(ValueError, match="empty"):
        meta_gradient(model, rater, [], val, inner_lr=0.1, method="reverse")
    with pytest.raises(ValueError, match=r"eps \[B,K,C,H,W\]"):
        meta_gradient(model, rater, [val], val, inner_lr=0.1, method="reverse")
    with pytest.raises(ValueError, match="cast x0 and eps"):
        meta_gradient(model, rater, [tuple(x.float() if x.is_floating_point() else x for x in train[0])], val,
                      inner_lr=0.1, method="reverse")
