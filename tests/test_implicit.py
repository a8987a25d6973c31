"""Implicit meta-gradients (issue 25, item 1; paper Theorem 4.1, eq. 8) against independent references.

- Weighted ridge regression: the inner minimiser theta*(eta) = (X^T W X + lam I)^{-1} X^T W y is known in
  closed form, so d L_val(theta*(eta)) / d eta is autograd through ``torch.linalg.solve`` (float64).
- Plain unrolled gradient descent on the same problem (written here) converges to it as S grows.
- The DiT + rater problem: eq. 8 with dense Hessian and Jacobian matrices built by
  ``torch.autograd.functional`` over a small parameter subset, from the reference losses of test_meta.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from test_meta import DT, flat, make_batches, make_models, ref_candidate_losses, ref_val_loss, ref_weights, rel
from test_metatrain import read_metrics, tiny_checkpoint  # noqa: F401  (the module-scoped checkpoint fixture)

from noiserater.cli import main
from noiserater.config import ConfigError
from noiserater.meta import (
    METHODS,
    implicit_hypergradient,
    implicit_solve,
    math_attention,
    meta_gradient,
    meta_gradient_info,
)
from noiserater.metatrain import MetaTrainConfig
from noiserater.models.rater import group_weights


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- weighted ridge regression ------------------------------------------------------------------------

GROUPS, CANDS, DIM, LAM, TEMP = 6, 3, 5, 0.3, 0.7


def ridge_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(GROUPS, CANDS, DIM, generator=g, dtype=DT)
    y = torch.randn(GROUPS, CANDS, generator=g, dtype=DT)
    Xv = torch.randn(20, DIM, generator=g, dtype=DT)
    yv = torch.randn(20, generator=g, dtype=DT)
    eta = [torch.randn(DIM, generator=g, dtype=DT), torch.randn(1, generator=g, dtype=DT)]  # a linear scorer
    return X, y, Xv, yv, eta


def ridge_weights(X, eta):
    a, c = eta
    return group_weights(X @ a + c, TEMP)  # [GROUPS, CANDS], the rater's group softmax


def ridge_inner(X, y):
    def inner(theta, eta):
        w = ridge_weights(X, eta)
        return 0.5 * (w * (X @ theta[0] - y) ** 2).sum() + 0.5 * LAM * theta[0].pow(2).sum()
    return inner


def ridge_outer(Xv, yv):
    return lambda theta: 0.5 * (Xv @ theta[0] - yv).pow(2).mean()


def closed_form(X, y, Xv, yv, eta):
    """theta*(eta) = (X^T W X + lam I)^{-1} X^T W y and d L_val(theta*(eta)) / d eta through the solve."""
    eta = [e.detach().requires_grad_() for e in eta]
    w = ridge_weights(X, eta).reshape(-1)
    A, b = X.reshape(-1, DIM), y.reshape(-1)
    theta = torch.linalg.solve(A.T @ (w[:, None] * A) + LAM * torch.eye(DIM, dtype=DT), A.T @ (w * b))
    return theta.detach(), list(torch.autograd.grad(ridge_outer(Xv, yv)([theta]), eta))


def test_ridge_cg_equals_closed_form():
    X, y, Xv, yv, eta = ridge_problem()
    theta, ref = closed_form(X, y, Xv, yv, eta)
    got = implicit_hypergradient(ridge_inner(X, y), ridge_outer(Xv, yv), [theta], eta, solver="cg",
                                 damping=0.0, iterations=DIM)
    assert flat(ref).norm() > 1e-3
    assert rel(got, ref) < 1e-10


def test_ridge_neumann_converges_to_closed_form_and_cg():
    X, y, Xv, yv, eta = ridge_problem(1)
    theta, ref = closed_form(X, y, Xv, yv, eta)
    inner, outer = ridge_inner(X, y), ridge_outer(Xv, yv)
    H = torch.autograd.functional.hessian(lambda t: inner([t], eta), theta)
    alpha = 1.0 / torch.linalg.eigvalsh(H)[-1].item()  # inside the convergence range (0, 2 / lambda_max)
    cg = implicit_hypergradient(inner, outer, [theta], eta, solver="cg", iterations=DIM)
    errs = [rel(implicit_hypergradient(inner, outer, [theta], eta, solver="neumann", iterations=j, alpha=alpha), ref)
            for j in (5, 20, 80, 400)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[0] > 1e-2 and errs[-1] < 1e-8, errs
    neu = implicit_hypergradient(inner, outer, [theta], eta, solver="neumann", iterations=400, alpha=alpha)
    assert rel(neu, cg) < 1e-8


def test_ridge_damping_matches_dense_formula():
    X, y, Xv, yv, eta = ridge_problem(2)
    theta, _ = closed_form(X, y, Xv, yv, eta)
    inner, outer = ridge_inner(X, y), ridge_outer(Xv, yv)
    mu = 0.7
    H = torch.autograd.functional.hessian(lambda t: inner([t], eta), theta)
    gval = torch.autograd.grad(outer([theta.requires_grad_()]), theta)[0]
    theta = theta.detach()
    # Jacobian of grad_theta inner with respect to eta (both eta parts flattened): [DIM, DIM + 1]
    def grad_theta(a, c):
        t = theta.clone().requires_grad_()
        return torch.autograd.grad(inner([t], [a, c]), t, create_graph=True)[0]
    Ja, Jc = torch.autograd.functional.jacobian(grad_theta, tuple(eta))
    ref = -torch.cat([Ja, Jc], dim=1).T @ torch.linalg.solve(H + mu * torch.eye(DIM, dtype=DT), gval)
    for solver, kw in (("cg", {}), ("neumann", {"alpha": 1.0 / (torch.linalg.eigvalsh(H)[-1].item() + mu)})):
        got = implicit_hypergradient(inner, outer, [theta], eta, solver=solver, damping=mu,
                                     iterations=DIM if solver == "cg" else 600, **kw)
        assert (flat(got) - ref).norm() / ref.norm() < 1e-9, solver


def test_unrolled_gradient_descent_converges_to_implicit():
    """The hypergradient of S plain GD steps (autograd through them, written here) tends to eq. 8 as S grows."""
    X, y, Xv, yv, eta = ridge_problem(3)
    inner, outer = ridge_inner(X, y), ridge_outer(Xv, yv)
    theta_star, ref = closed_form(X, y, Xv, yv, eta)
    H = torch.autograd.functional.hessian(lambda t: inner([t], eta), theta_star)
    lr = 1.0 / torch.linalg.eigvalsh(H)[-1].item()
    implicit = implicit_hypergradient(inner, outer, [theta_star], eta, iterations=DIM)
    errs = []
    for S in (5, 50, 500):
        e = [x.detach().requires_grad_() for x in eta]
        theta = torch.zeros(DIM, dtype=DT, requires_grad=True)
        th = theta
        for _ in range(S):
            (g,) = torch.autograd.grad(inner([th], e), th, create_graph=True)
            th = th - lr * g
        errs.append(rel(torch.autograd.grad(outer([th]), e), implicit))
    assert errs[0] > 1e-2 and errs[1] < errs[0] and errs[2] < 1e-8, errs
    assert rel(implicit, ref) < 1e-10


def test_cg_stops_on_negative_curvature():
    """An indefinite operator: CG keeps its iterate instead of dividing by a non-positive curvature."""
    D = torch.tensor([2.0, -1.0], dtype=DT)
    b = [torch.tensor([1.0, 1.0], dtype=DT)]
    v = implicit_solve(lambda u: [D * u[0]], b, solver="cg", damping=0.0, iterations=10)
    assert torch.isfinite(v[0]).all()
    # with enough damping the system is positive definite and CG solves it exactly
    v = implicit_solve(lambda u: [D * u[0]], b, solver="cg", damping=2.0, iterations=10)
    assert torch.allclose(v[0], b[0] / (D + 2.0), rtol=1e-12)


# ---- the DiT + rater problem ----------------------------------------------------------------------------


def only(model, prefix):
    """Train only the parameters whose name starts with ``prefix`` (a small subset for dense references)."""
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(prefix))
    return [n for n, p in model.named_parameters() if p.requires_grad]


def dense_eq8(model, rater, train, val, theta_s, damping):
    """Eq. 8 at theta_S with dense matrices and the reference losses: H (Hessian of the last batch's rater-weighted
    loss), v = (H + damping I)^{-1} grad L_val, meta = -d/d eta (1/S) sum_s <grad_theta L_s(theta_S; w_s(eta)), v>."""
    m = copy.deepcopy(model).eval()
    r = copy.deepcopy(rater).eval()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    params = dict(m.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_(theta_s[n])
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    x0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def set_flat(vec):
        for n, part, s in zip(names, vec.split(sizes), shapes):
            setattr_path(m, n, part.view(s))

    def weighted(vec, batch, w):
        set_flat(vec)
        return (w * ref_candidate_losses(m, batch)).sum(1).mean()

    with torch.no_grad():
        w_last = ref_weights(r, train[-1])
    with math_attention():
        H = torch.autograd.functional.hessian(lambda v: weighted(v, train[-1], w_last), x0)
        xv = x0.clone().requires_grad_()
        set_flat(xv)
        gval = torch.autograd.grad(ref_val_loss(m, val), xv)[0]
        v = torch.linalg.solve(H + damping * torch.eye(len(x0), dtype=DT), gval)
        eta = [p for p in r.parameters() if p.requires_grad]
        total = 0
        for batch in train:
            xt = x0.clone().requires_grad_()
            (g,) = torch.autograd.grad(weighted(xt, batch, ref_weights(r, batch)), xt, create_graph=True)
            total = total + (g * v).sum() / len(train)
        grads = iter(torch.autograd.grad(-total, eta, allow_unused=True))
    out = [next(grads) if p.requires_grad else None for p in r.parameters()]
    return [torch.zeros_like(p) if g is None else g for g, p in zip(out, r.parameters())]


def setattr_path(module, name, value):
    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    delattr(module, leaf)  # replace the Parameter by a plain tensor so the Hessian sees the vector
    setattr(module, leaf, value)


@pytest.mark.parametrize("method,opt_name,lr", [("implicit_cg", "sgd", 0.05), ("implicit_neumann", "sgd", 0.05),
                                                ("implicit_cg", "adam", 0.01)])
def test_dit_implicit_matches_dense_eq8(method, opt_name, lr):
    model, rater = make_models()
    only(model, "final_layer.linear")  # 260 parameters: the dense Hessian is cheap
    train, val = make_batches(3, b=4)
    damping = 0.5
    kw = {"implicit_damping": damping, "implicit_iterations": 300 if method == "implicit_cg" else 400,
          "implicit_alpha": 0.1}  # < 2 / lambda_max(H) ~ 2 / 17.5
    res = meta_gradient_info(model, rater, train, val, inner_lr=lr, method=method, inner_optimizer=opt_name, **kw)
    ref = dense_eq8(model, rater, train, val, res.params, damping)
    assert flat(ref).norm() > 1e-8
    assert rel(res.grads, ref) < (1e-8 if method == "implicit_cg" else 1e-6)


def test_dit_implicit_approaches_unrolled_as_inner_iterate_converges():
    """Only the output bias trains (the loss is a well-conditioned quadratic in it) and every inner step uses the
    same batch: theta_S converges to the inner optimum and unrolled (tested against finite differences in
    test_meta) converges to the implicit meta-gradient."""
    model, rater = make_models()
    only(model, "final_layer.linear.bias")
    train, val = make_batches(1, b=4)
    cos, errs = [], []
    for S in (1, 4, 16, 48):
        ref = meta_gradient(model, rater, train * S, val, inner_lr=0.5, method="unrolled")
        got = meta_gradient(model, rater, train * S, val, inner_lr=0.5, method="implicit_cg", implicit_damping=0.0)
        cos.append(float(flat(ref) @ flat(got) / (flat(ref).norm() * flat(got).norm())))
        errs.append(rel(got, ref))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[0] > 0.1 and errs[-1] < 1e-5, errs
    assert cos[-1] > 1 - 1e-9, cos


@pytest.mark.parametrize("method", ["implicit_cg", "implicit_neumann"])
def test_dit_implicit_leaves_models_unchanged_and_memory_free_of_S(method):
    model, rater = make_models()
    model.train()
    train, val = make_batches(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = meta_gradient_info(model, rater, train, val, inner_lr=0.05, method=method, inner_optimizer="adam")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and model.training
    assert all(p.grad is None for p in rater.parameters())
    assert torch.isfinite(flat(res.grads)).all() and flat(res.grads).norm() > 0
    assert res.params is not None and len(res.weights) == 2


def test_bad_implicit_options_name_the_option():
    model, rater = make_models()
    train, val = make_batches(1)
    for kw, name in (({"implicit_damping": -1.0}, "implicit_damping"), ({"implicit_iterations": 0}, "implicit_iterations"),
                     ({"implicit_alpha": 0.0}, "implicit_alpha"), ({"implicit_damping": float("nan")}, "implicit_damping")):
        with pytest.raises(ConfigError, match=f"invalid {name}"):
            meta_gradient(model, rater, train, val, inner_lr=0.1, method="implicit_cg", **kw)
    X, y, Xv, yv, eta = ridge_problem()
    with pytest.raises(ConfigError, match="invalid iterations"):
        implicit_hypergradient(ridge_inner(X, y), ridge_outer(Xv, yv), [torch.zeros(DIM, dtype=DT)], eta, iterations=0)
    with pytest.raises(ConfigError, match="invalid alpha"):
        implicit_hypergradient(ridge_inner(X, y), ridge_outer(Xv, yv), [torch.zeros(DIM, dtype=DT)], eta, solver="neumann")
    for kw, name in (({"implicit_damping": -0.1}, "implicit_damping"), ({"implicit_iterations": 0}, "implicit_iterations")):
        with pytest.raises(ConfigError, match=f"invalid {name}"):
            MetaTrainConfig(checkpoint="x", method="implicit_cg", **kw).validate()
    assert {"implicit_cg", "implicit_neumann"} <= set(METHODS)


def test_metatrain_cli_implicit_cg(tiny_checkpoint, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["metatrain", "--checkpoint", tiny_checkpoint, "--run-dir", str(run),
                                    "--method", "implicit_cg", "--implicit-iterations", "5", "--outer-steps", "2",
                                    "--inner-steps", "2", "--candidates", "3", "--batch-size", "4",
                                    "--val-batch-size", "8", "--inner-lr", "0.05", "--eval-every", "0",
                                    "--no-progress", "--rater-arch", "Rater-N/2"])
    assert res.exit_code == 0, res.output
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["meta_grad_norm"] > 0 for r in recs)
    res = CliRunner().invoke(main, ["metatrain", "--checkpoint", tiny_checkpoint, "--run-dir", str(tmp_path / "r2"),
                                    "--method", "implicit_cg", "--implicit-damping", "-1"])
    assert res.exit_code != 0 and "--implicit-damping" in res.output


def test_bench_implicit_cli(tiny_checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "bias.json"
    res = CliRunner().invoke(main, ["bench", "implicit", "--checkpoint", tiny_checkpoint, "--json", str(out),
                                    "--methods", "implicit_cg,implicit_neumann:0.5", "--inner-steps-list", "1,2",
                                    "--outer-batches", "1", "--batch-size", "2", "--candidates", "3", "--val-batch-size", "4",
                                    "--implicit-iterations", "3", "--inner-lr", "0.01"])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert [(x["method"], x["inner_steps"], x["damping"]) for x in result["summary"]] == [
        ("implicit_cg", 1, 100.0), ("implicit_cg", 2, 50.0), ("implicit_neumann", 1, 0.5), ("implicit_neumann", 2, 0.5)]
    for r in result["records"]:  # law of cosines: the three reported figures describe one pair of vectors
        assert r["rel_error"] ** 2 == pytest.approx(1 + r["norm_ratio"] ** 2 - 2 * r["norm_ratio"] * r["cosine"],
                                                    rel=1e-6, abs=1e-9)
        assert -1 <= r["cosine"] <= 1 and r["norm_ratio"] > 0
    res = CliRunner().invoke(main, ["bench", "implicit", "--checkpoint", tiny_checkpoint, "--methods", "reverse"])
    assert res.exit_code != 0 and "--methods" in res.output
