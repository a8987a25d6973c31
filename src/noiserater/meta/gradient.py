"""Meta-gradients d L_val(theta_S) / d eta through S inner optimiser steps (paper eq. 6, Algorithm 1).

Notation: theta_0 are the (frozen) diffusion weights, eta the rater's. Inner step s = 1..S uses the train
batch s, the rater weights w_s(eta) [B,K] and the gradient g_s = grad_theta L_in(theta_{s-1}; w_s); the
inner optimiser maps (theta_{s-1}, state_{s-1}, g_s) -> (theta_s, state_s) (see ``inner_optim``). The
outer loss is L_val(theta_S).

Methods (``method=``):

``unrolled``  Plain autograd: every inner gradient is built with ``create_graph=True`` and one backward of
              L_val(theta_S) runs through all S steps. Memory grows with S (S second-order graphs). The
              reference the others are tested against (and itself tested against finite differences).
``reverse``   Reverse accumulation. A forward pass runs the S steps without any graph and keeps only the
              parameter snapshots theta_{s-1} (Adam: also m_{s-1}, v_{s-1} and g_s). Then, with the adjoint
              a_S = (grad L_val(theta_S), 0, 0), for s = S..1 one inner step's graph is rebuilt:
                u   = (d state_s / d g_s)^T a_s                       (elementwise; SGD: u = -lr a_theta)
                one double backward of <grad_theta L_in(theta_{s-1}; w), u> with respect to theta and w gives
                H u (Hessian-vector product) and dL/dw_bk = <grad l_bk, u> / B (the mixed product, pushed
                through the rater with one rater backward);
                a_theta <- a_theta + H u;  Adam moments' adjoints from the same elementwise VJP.
              Memory: one inner step's graph + S snapshots, whatever S. The cost is that rebuild: each step's
              gradient is computed twice (forward sweep, then with a graph). ``memory_budget=W`` keeps the
              graphs of the last W steps from the forward sweep (W graphs of memory) and skips their rebuild:
              W = 0 is memory-flat, W = S costs what ``unrolled`` costs in both.
``reverse_fwd`` Same recursion, with H u and <grad l_bk, u> from one forward-over-reverse product
              (``torch.func.jvp`` of ``torch.func.grad``), as MixFlow-MG (arXiv 2505.00793) does: the
              tangent pass stores no second backward graph.
``implicit_cg`` / ``implicit_neumann``
              Theorem 4.1 (paper eq. 8, proof in appendix A.1): the implicit-function-theorem meta-gradient
                meta-grad = -(grad_eta grad_theta L_in(theta; eta))^T (H + damping I)^{-1} grad_theta L_val(theta)
              evaluated at the inner iterate theta = theta_S as if it were the inner optimum theta*(eta),
              with H = grad^2_theta L_in. L_in(theta; eta) = (1/S) sum_s L_in(theta; w_s(eta)) is the mean
              rater-weighted loss of the S inner batches. The S inner steps run without a graph (any inner
              optimiser; only theta_S is used). v = (H + damping I)^{-1} grad L_val(theta_S) is solved with
              ``implicit_iterations`` Hessian-vector products (double backward), by conjugate gradients
              (``implicit_cg``; stops early on convergence or on a direction of non-positive curvature) or
              the truncated Neumann series v = alpha sum_{j=0..J} (I - alpha (H + damping I))^j grad L_val
              (``implicit_neumann``, J = iterations, step ``implicit_alpha``). H is estimated on the LAST
              inner batch (a mini-batch Hessian, as in Lorraine et al. 2020), so the solve costs the same
              whatever S; then meta-grad = -(1/S) sum_s d/d eta <grad_theta L_in(theta_S; w_s(eta)), v> (one
              forward-mode product and one rater backward per inner batch, like one inner step each).
              Memory: one Hessian-vector product's graph plus a few parameter-sized vectors, whatever S.
              Defaults: damping 1/(S * inner_lr) (with SGD the curvature an S-step horizon resolves: the
              unrolled derivative of a direction of curvature h is (1 - (1 - lr h)^S) / h, which is lr S
              for flat directions and 1/h for steep ones, roughly 1/(h + 1/(lr S))); alpha = inner_lr
              (stable wherever the inner SGD steps are: lr < 2 / lambda_max(H)). With alpha = inner_lr,
              damping 0 and J = S - 1 the Neumann series is the unrolled SGD derivative at a fixed point.
              Biased wherever theta_S is not an optimum (Hessian indefinite, gradient non-zero): see
              docs/meta-learning.md for the measured bias against ``unrolled``.
``alignment`` Theorem 4.2's first-order estimate. Every inner gradient is taken at theta_0 (the inner
              trajectory expanded to first order in the learning rate), so
                meta-grad ~ d/d eta < grad L_val(theta_0), Delta(eta) >,  Delta = total inner update;
              for SGD: -lr * sum_s sum_bk (d w_sbk / d eta) <grad L_val(theta_0), grad l_sbk(theta_0)> / B.
              It drops every term of order lr^2 and higher: the curvature of L_val along the update (the
              L/2 ||theta_+ - theta||^2 of the theorem's proof; exact meta-gradient at S=1 uses
              grad L_val(theta_1) = grad L_val(theta_0) - lr H_val grad L_in + O(lr^2)) and, for S > 1,
              the inner Hessians coupling the steps. One forward-mode product per inner step, no
              trajectory, no Hessian.

All methods evaluate both modules in eval mode (no random label dropout inside the DiT; drop labels in the
batch) with the MATH attention kernel, never modify ``model`` or ``rater`` (no in-place updates, no
``.grad`` writes) and restore their train/eval flags.

Multi-process: pass ``reducer=Reducer()`` under ``torch.distributed``; each rank holds its slice of every
batch. Inner gradients, the validation gradient and the Hessian-vector products are averaged so every rank
follows the trajectory of the global batch, and the returned meta-gradient is the global one (identical on
all ranks). ``unrolled`` averages with a differentiable all-reduce inside the graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.func import grad, jvp

from ..config import ConfigError, require
from ..models.rater import group_weights
from ..objectives import Objective
from .inner_optim import InnerOptimizer
from .losses import (
    Batch,
    candidate_losses,
    check_train_batch,
    check_val_batch,
    eval_mode,
    math_attention,
    rater_scores_of,
    val_loss,
    weighted_loss,
)

IMPLICIT_METHODS = ("implicit_cg", "implicit_neumann")
METHODS = ("unrolled", "reverse", "reverse_fwd", "alignment", *IMPLICIT_METHODS)
IMPLICIT_ITERATIONS = 20  # default Hessian-vector products per implicit solve

Tensors = list[torch.Tensor]


class Reducer:
    """Averages tensors over the ranks of the default process group (identity without one)."""

    def __init__(self, group=None):
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1

    @property
    def active(self) -> bool:
        return self.world > 1

    def mean(self, tensors: Sequence[torch.Tensor]) -> Tensors:
        """Non-differentiable average (one flat all-reduce)."""
        if not self.active:
            return list(tensors)
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        flat /= self.world
        return _split_like(flat, tensors)

    def mean_differentiable(self, tensors: Sequence[torch.Tensor]) -> Tensors:
        """Average that autograd can differentiate through (its backward averages the gradients)."""
        if not self.active:
            return list(tensors)
        flat = _AllReduceMean.apply(torch.cat([t.reshape(-1) for t in tensors]), self.group, self.world)
        return _split_like(flat, tensors)


class _AllReduceMean(torch.autograd.Function):
    """y = mean over ranks of x (the same on every rank). With L = sum_r L_r over ranks, dL/dx_r =
    mean_r' dL_r'/dy, so the backward is the same mean of the incoming gradients (itself differentiable)."""

    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        y = x.detach().clone()
        dist.all_reduce(y, group=group)
        return y / world

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceMean.apply(grad.contiguous(), ctx.group, ctx.world), None, None


def _split_like(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> Tensors:
    out, i = [], 0
    for t in like:
        out.append(flat[i: i + t.numel()].view_as(t))
        i += t.numel()
    return out


@dataclass
class MetaResult:
    """What one meta-gradient computation returns (``meta_gradient`` keeps only ``grads``).

    grads:      one tensor per ``rater.parameters()`` (zeros for frozen ones), the global meta-gradient.
    val_loss:   L_val(theta_S) (for ``alignment``: L_val(theta_0)); global mean under a Reducer.
    params:     theta_S as a name -> tensor dict (detached), or None for ``alignment``.
    scores, weights: rater scores and weights [B,K] of each inner batch (detached, local slice).
    """

    grads: Tensors
    val_loss: float
    params: dict[str, torch.Tensor] | None
    scores: Tensors = field(default_factory=list)
    weights: Tensors = field(default_factory=list)


def _grads_or_zeros(outputs, inputs: Sequence[torch.Tensor], **kw) -> Tensors:
    gs = torch.autograd.grad(outputs, list(inputs), allow_unused=True, **kw)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs)]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _leaves(tensors: Sequence[torch.Tensor]) -> Tensors:
    return [t.detach().requires_grad_() for t in tensors]


class _Problem:
    """The fixed pieces of one meta-gradient computation."""

    def __init__(self, model, rater, train_batches, val_batch, opt, temperature, objective, reducer):
        self.model, self.rater = model, rater
        self.batches, self.val_batch = list(train_batches), val_batch
        self.opt, self.temperature = opt, temperature
        self.objective = objective
        self.reducer = reducer if reducer is not None else Reducer()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the diffusion model has no trainable parameters (requires_grad is False everywhere)")
        self.names = [n for n, _ in named]
        self.theta0 = [p.detach() for _, p in named]
        self.rater_params = list(rater.parameters())
        self.eta = [p for p in self.rater_params if p.requires_grad]
        if not self.eta:
            raise ValueError("the rater has no trainable parameters; call rater.requires_grad_(True)")

    def params(self, theta: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, theta))

    def scores(self, batch: Batch) -> torch.Tensor:
        return rater_scores_of(self.rater, batch, self.objective)

    def weights(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scores(batch)
        return s, group_weights(s, self.temperature)

    def losses(self, batch: Batch, theta: Sequence[torch.Tensor]) -> torch.Tensor:
        return candidate_losses(self.model, batch, params=self.params(theta), objective=self.objective)

    def val(self, theta: Sequence[torch.Tensor]) -> torch.Tensor:
        return val_loss(self.model, self.val_batch, params=self.params(theta), objective=self.objective)

    def val_grad(self, theta: Sequence[torch.Tensor]) -> tuple[float, Tensors]:
        th = _leaves(theta)
        lv = self.val(th)
        v = self.reducer.mean(_grads_or_zeros(lv, th))
        return float(self.reducer.mean([lv.detach()])[0]), v

    def eta_backward(self, batch: Batch, grad_w: torch.Tensor) -> Tensors:
        """d/d eta of sum_bk w_bk(eta) * grad_w_bk (one rater forward + backward)."""
        _, w = self.weights(batch)
        return _grads_or_zeros(w, self.eta, grad_outputs=grad_w)

    def full_grads(self, eta_grads: Sequence[torch.Tensor]) -> Tensors:
        it = iter(self.reducer.mean(eta_grads))
        return [next(it) if p.requires_grad else torch.zeros_like(p) for p in self.rater_params]


def _unrolled(P: _Problem) -> MetaResult:
    theta = _leaves(P.theta0)
    state = P.opt.init_state(theta)
    scores, weights = [], []
    for s, batch in enumerate(P.batches, 1):
        sc, w = P.weights(batch)
        scores.append(sc.detach())
        weights.append(w.detach())
        g = _grads_or_zeros(weighted_loss(P.losses(batch, theta), w), theta, create_graph=True)
        g = P.reducer.mean_differentiable(g)
        theta, state = P.opt.step(theta, g, state, s)
    lv = P.val(theta)
    eta_grads = _grads_or_zeros(lv, P.eta)
    val = float(P.reducer.mean([lv.detach()])[0])
    params = P.params([t.detach() for t in theta])
    return MetaResult(P.full_grads(eta_grads), val, params, scores, weights)


def _inner_gradient(P: _Problem, theta: Tensors, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, Tensors]:
    """One inner step's rater scores and weights [B,K] (no graph) and the gradient g_s of the weighted inner
    loss at ``theta`` (averaged over processes), without a graph: the forward sweep of the reverse and
    implicit methods."""
    with torch.no_grad():
        sc, w = P.weights(batch)
    th = _leaves(theta)
    return sc, w, P.reducer.mean(_grads_or_zeros(weighted_loss(P.losses(batch, th), w), th))


def _inner_gradient_with_graph(P: _Problem, theta: Tensors, batch: Batch) -> tuple:
    """Like :func:`_inner_gradient`, also returning (theta leaves, weight leaf, the local gradient with its graph)
    for the backward sweep: the gradient it steps with is the same numbers, detached and averaged."""
    with torch.no_grad():
        sc, w = P.weights(batch)
    th = _leaves(theta)
    w_leaf = w.detach().requires_grad_()
    g = _grads_or_zeros(weighted_loss(P.losses(batch, th), w_leaf), th, create_graph=True)
    return sc, w, P.reducer.mean([x.detach() for x in g]), (th, w_leaf, g)


def _reverse(P: _Problem, forward_mode: bool, keep_graphs: int = 0) -> MetaResult:
    opt = P.opt
    theta, state = list(P.theta0), opt.init_state(P.theta0)
    snaps: list[tuple[Tensors, list[Tensors], Tensors | None]] = []
    kept: dict[int, tuple] = {}  # step -> (theta leaves, weight leaf, gradient with its graph): the budget's window
    scores, weights = [], []
    S = len(P.batches)
    # Forward: S inner steps without a graph, keeping theta_{s-1} (and Adam's m, v, g_s); the last
    # ``keep_graphs`` steps keep their gradient's graph, so the backward sweep need not rebuild it.
    for s, batch in enumerate(P.batches, 1):
        if s > S - keep_graphs:
            sc, w, g, kept[s] = _inner_gradient_with_graph(P, theta, batch)
        else:
            sc, w, g = _inner_gradient(P, theta, batch)
        scores.append(sc)
        weights.append(w)
        snaps.append((theta, state, g if opt.state_size else None))
        with torch.no_grad():
            theta, state = opt.step(theta, g, state, s)
    val, a_theta = P.val_grad(theta)
    params = P.params(theta)
    del theta
    a_state = [[torch.zeros_like(t) for t in P.theta0] for _ in range(opt.state_size)]
    eta_grads = [torch.zeros_like(p) for p in P.eta]
    # Backward: s = S..1, one inner step's graph at a time.
    for s in range(len(P.batches), 0, -1):
        batch, w = P.batches[s - 1], weights[s - 1]
        theta_prev, state_prev, g_saved = snaps.pop()
        # u = (d theta_s / d g_s)^T a_theta + (d state_s / d g_s)^T a_state, and the state adjoints.
        if opt.state_size == 0:
            u = [-opt.lr * a for a in a_theta]
        else:
            u, a_state = _optimizer_vjp(opt, s, theta_prev, state_prev, g_saved, a_theta, a_state)
        # Helpers return only tensors without graphs: no step's graph outlives its iteration.
        if s in kept:  # the window: one backward through the graph the forward sweep kept
            th, w_leaf, g_graph = kept.pop(s)
            *hu, grad_w = _grads_or_zeros(_dot(g_graph, u), th + [w_leaf])
            del th, w_leaf, g_graph
        elif forward_mode:
            hu, dl = _hvp_forward_over_reverse(P, batch, theta_prev, w, u)
            grad_w = dl / batch[0].shape[0]
        else:
            hu, grad_w = _hvp_double_backward(P, batch, theta_prev, w, u)
        del u
        hu = P.reducer.mean(hu)
        a_theta = [a + h for a, h in zip(a_theta, hu)]
        del hu
        for acc, ge in zip(eta_grads, P.eta_backward(batch, grad_w)):
            acc.add_(ge)
    return MetaResult(P.full_grads(eta_grads), val, params, scores, weights)


def _optimizer_vjp(opt: InnerOptimizer, s: int, theta_prev, state_prev, g_saved, a_theta, a_state):
    """(u, adjoints of the optimiser state before step s) from the elementwise VJP of one optimiser step."""
    gl = _leaves(g_saved)
    st = [_leaves(x) for x in state_prev]
    new_theta, new_state = opt.step(theta_prev, gl, st, s)
    outs = new_theta + [x for xs in new_state for x in xs]
    adj = list(a_theta) + [x for xs in a_state for x in xs]
    res = _grads_or_zeros(outs, gl + [x for xs in st for x in xs], grad_outputs=adj)
    n = len(gl)
    return res[:n], [res[n + i * n: n + (i + 1) * n] for i in range(opt.state_size)]


def _hvp_double_backward(P: _Problem, batch: Batch, theta: Tensors, w: torch.Tensor, u: Tensors):
    """(H u, [<grad l_bk, u> / B]_bk) from one double backward of <grad_theta L_in(theta; w), u>."""
    th = _leaves(theta)
    w_leaf = w.detach().requires_grad_()
    g = _grads_or_zeros(weighted_loss(P.losses(batch, th), w_leaf), th, create_graph=True)
    *hu, grad_w = _grads_or_zeros(_dot(g, u), th + [w_leaf])
    return hu, grad_w


def _hvp_forward_over_reverse(P: _Problem, batch: Batch, theta: Tensors, w: torch.Tensor, u: Tensors):
    """(H u, [<grad l_bk, u>]_bk) from one jvp of the gradient function (no second backward graph)."""
    w = w.detach()

    def loss_and_losses(th):
        losses = P.losses(batch, th)
        return weighted_loss(losses, w), losses

    def grad_fn(th):
        return grad(loss_and_losses, has_aux=True)(th)

    _, (hu, dl) = jvp(grad_fn, (list(theta),), (list(u),))
    return list(hu), dl


def _alignment(P: _Problem) -> MetaResult:
    opt = P.opt
    val, gval = P.val_grad(P.theta0)
    scores, weights = [], []
    with torch.no_grad():
        for batch in P.batches:
            sc, w = P.weights(batch)
            scores.append(sc)
            weights.append(w)
    # u_s = d < grad L_val(theta_0), Delta > / d g_s with Delta the total update made from gradients at theta_0.
    if opt.state_size == 0:
        us = [[-opt.lr * g for g in gval]] * len(P.batches)
    else:
        gs = []
        for batch, w in zip(P.batches, weights):
            th = _leaves(P.theta0)
            gs.append(_leaves(P.reducer.mean(_grads_or_zeros(weighted_loss(P.losses(batch, th), w), th))))
        delta = [torch.zeros_like(t) for t in P.theta0]
        state = opt.init_state(delta)
        for s, g in enumerate(gs, 1):
            delta, state = opt.step(delta, g, state, s)
        flat = [x for g in gs for x in g]
        res = _grads_or_zeros(_dot(gval, delta), flat)
        n = len(P.theta0)
        us = [res[i * n:(i + 1) * n] for i in range(len(gs))]
    eta_grads = [torch.zeros_like(p) for p in P.eta]
    for batch, u in zip(P.batches, us):
        # <grad l_bk(theta_0), u> for every candidate from one forward-mode product.
        _, dl = jvp(lambda *th: P.losses(batch, th), tuple(P.theta0), tuple(u))
        for acc, ge in zip(eta_grads, P.eta_backward(batch, dl / batch[0].shape[0])):
            acc.add_(ge)
    return MetaResult(P.full_grads(eta_grads), val, None, scores, weights)


# ---- implicit differentiation (Theorem 4.1) ------------------------------------------------------------


def check_implicit_options(damping: float | None, iterations: int, alpha: float | None,
                           names: tuple[str, str, str] = ("damping", "iterations", "alpha")) -> None:
    """ConfigError naming the option unless damping is None or finite >= 0, iterations an int >= 1 and alpha
    None or finite > 0 (``names``: how the caller spells the three options)."""
    def finite(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    require(damping is None or (finite(damping) and damping >= 0), names[0],
            f"must be a finite number >= 0 (the Tikhonov term added to the Hessian), got {damping!r}")
    require(isinstance(iterations, int) and not isinstance(iterations, bool) and iterations >= 1, names[1],
            f"must be an integer >= 1 (Hessian-vector products per solve), got {iterations!r}")
    require(alpha is None or (finite(alpha) and alpha > 0), names[2],
            f"must be a finite number > 0 (the Neumann step size, < 2 / largest Hessian eigenvalue), got {alpha!r}")


def implicit_solve(hvp, b: Sequence[torch.Tensor], *, solver: str, damping: float, iterations: int,
                   alpha: float | None = None) -> Tensors:
    """v ~ (H + damping I)^{-1} b from ``iterations`` calls of ``hvp(u) -> H u`` (lists of tensors shaped like b).

    ``solver="cg"``: conjugate gradients from v = 0; stops early when the residual vanishes or on a search
    direction p with p^T (H + damping I) p <= 0 (H is indefinite away from an optimum: the iterate so far is
    kept, as truncated CG does). ``solver="neumann"``: v = alpha sum_{j=0..iterations} (I - alpha (H + damping I))^j b,
    which converges to the inverse when 0 < alpha * eigenvalue < 2 for every eigenvalue of H + damping I."""
    def op(u):
        return [h + damping * x for h, x in zip(hvp(u), u)] if damping else list(hvp(u))

    b = [x.detach() for x in b]
    if solver == "neumann":
        if alpha is None:
            raise ConfigError("invalid alpha: the Neumann solver needs a step size alpha > 0")
        term, v = list(b), [x.clone() for x in b]
        for _ in range(iterations):
            term = [t - alpha * a for t, a in zip(term, op(term))]
            v = [x + t for x, t in zip(v, term)]
        return [alpha * x for x in v]
    if solver != "cg":
        raise ValueError(f"unknown implicit solver {solver!r}; choose cg or neumann")
    x = [torch.zeros_like(t) for t in b]
    r, p = list(b), list(b)
    rs = float(_dot(r, r))
    stop = rs * 1e-24  # relative residual 1e-12: float64 round-off; continuing would divide 0 by 0
    for _ in range(iterations):
        if rs <= stop or rs == 0.0:
            break
        ap = op(p)
        pap = float(_dot(p, ap))
        if not pap > 0:  # non-positive curvature (or NaN): no descent step of the quadratic model along p
            break
        a = rs / pap
        x = [xi + a * pi for xi, pi in zip(x, p)]
        r = [ri - a * api for ri, api in zip(r, ap)]
        rs_new = float(_dot(r, r))
        p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
        rs = rs_new
    return x


def implicit_hypergradient(inner_loss, outer_loss, theta: Sequence[torch.Tensor], eta: Sequence[torch.Tensor], *,
                           solver: str = "cg", damping: float = 0.0, iterations: int = IMPLICIT_ITERATIONS,
                           alpha: float | None = None) -> Tensors:
    """Theorem 4.1 (paper eq. 8) for any differentiable bilevel problem:
    d outer(theta*(eta)) / d eta = -(grad_eta grad_theta inner)^T (H + damping I)^{-1} grad_theta outer,
    evaluated at the given ``theta`` taken as the inner optimum theta*(eta).

    ``inner_loss(theta, eta) -> scalar`` and ``outer_loss(theta) -> scalar`` take lists of tensors; ``theta``
    and ``eta`` are lists of tensors (not modified). Returns one tensor per ``eta`` entry. The same solver
    (:func:`implicit_solve`) and the same final mixed product serve ``meta_gradient(method="implicit_*")``."""
    check_implicit_options(damping, iterations, alpha)
    th = _leaves(theta)
    et = _leaves(eta)
    b = _grads_or_zeros(outer_loss(th), th)
    eta_now = [e.detach() for e in et]  # the Hessian-vector products need no graph to eta

    def hvp(u):
        g = _grads_or_zeros(inner_loss(th, eta_now), th, create_graph=True)
        return [h.detach() for h in _grads_or_zeros(_dot(g, u), th)]

    v = implicit_solve(hvp, b, solver=solver, damping=damping, iterations=iterations, alpha=alpha)
    g = _grads_or_zeros(inner_loss(th, et), th, create_graph=True)
    return [-x for x in _grads_or_zeros(_dot(g, v), et)]


def _implicit(P: _Problem, solver: str, damping: float | None, iterations: int, alpha: float | None) -> MetaResult:
    opt = P.opt
    S = len(P.batches)
    damping = 1.0 / (S * opt.lr) if damping is None else damping
    alpha = opt.lr if alpha is None else alpha
    theta, state = list(P.theta0), opt.init_state(P.theta0)
    scores, weights = [], []
    # S inner steps without a graph and without snapshots: only theta_S is needed.
    for s, batch in enumerate(P.batches, 1):
        sc, w, g = _inner_gradient(P, theta, batch)
        scores.append(sc)
        weights.append(w)
        with torch.no_grad():
            theta, state = opt.step(theta, g, state, s)
    del state
    val, gval = P.val_grad(theta)

    def hvp(u):  # the Hessian of the last inner batch's weighted loss (global under a Reducer)
        return P.reducer.mean(_hvp_double_backward(P, P.batches[-1], theta, weights[-1], u)[0])

    v = implicit_solve(hvp, gval, solver=solver, damping=damping, iterations=iterations, alpha=alpha)
    eta_grads = [torch.zeros_like(p) for p in P.eta]
    for batch in P.batches:
        # d/dw_bk <grad_theta L_in(theta_S; w), v> = <grad l_bk(theta_S), v> / B: one forward-mode product.
        _, dl = jvp(lambda *th: P.losses(batch, th), tuple(theta), tuple(v))
        for acc, ge in zip(eta_grads, P.eta_backward(batch, -dl / (batch[0].shape[0] * S))):
            acc.add_(ge)
    return MetaResult(P.full_grads(eta_grads), val, P.params(theta), scores, weights)


def inner_steps(
    model: nn.Module, train_batches: Sequence[Batch], weights: Sequence[torch.Tensor], *, inner_lr: float,
    inner_optimizer: str | InnerOptimizer = "sgd", objective: Objective | None = None,
    reducer: Reducer | None = None,
) -> dict[str, torch.Tensor]:
    """theta_S (name -> tensor, no graph) after the inner steps with the given fixed weights [B,K] per batch
    (e.g. :func:`uniform_weights` for the baseline), starting from the model's current parameters."""
    opt = inner_optimizer if isinstance(inner_optimizer, InnerOptimizer) else InnerOptimizer(inner_optimizer, inner_lr)
    reducer = reducer if reducer is not None else Reducer()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta = [p.detach() for n, p in model.named_parameters() if p.requires_grad]
    state = opt.init_state(theta)
    with eval_mode(model), math_attention():
        for s, (batch, w) in enumerate(zip(train_batches, weights), 1):
            th = _leaves(theta)
            loss = weighted_loss(candidate_losses(model, batch, params=dict(zip(names, th)), objective=objective), w.detach())
            g = reducer.mean(_grads_or_zeros(loss, th))
            with torch.no_grad():
                theta, state = opt.step(theta, g, state, s)
    return dict(zip(names, theta))


def meta_gradient_info(
    model: nn.Module, rater: nn.Module, train_batches: Sequence[Batch], val_batch: Batch, *, inner_lr: float,
    method: str, inner_optimizer: str | InnerOptimizer = "sgd", temperature: float = 1.0,
    objective: Objective | None = None, reducer: Reducer | None = None,
    implicit_damping: float | None = None, implicit_iterations: int = IMPLICIT_ITERATIONS,
    implicit_alpha: float | None = None, memory_budget: int = 0,
) -> MetaResult:
    """Like :func:`meta_gradient`, returning a :class:`MetaResult` (also L_val, theta_S, scores, weights)."""
    if not (isinstance(memory_budget, int) and memory_budget >= 0):
        raise ConfigError(f"memory_budget must be a whole number of inner steps >= 0, got {memory_budget!r}")
    if method not in METHODS:
        raise ConfigError(f"unknown meta-gradient method {method!r}; choose one of {', '.join(METHODS)}")
    check_implicit_options(implicit_damping, implicit_iterations, implicit_alpha,
                           ("implicit_damping", "implicit_iterations", "implicit_alpha"))
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(inner_optimizer, InnerOptimizer):
        opt = inner_optimizer if inner_optimizer.lr == inner_lr else InnerOptimizer(
            inner_optimizer.name, inner_lr, inner_optimizer.betas, inner_optimizer.eps)
    else:
        opt = InnerOptimizer(inner_optimizer, inner_lr)
    batches = list(train_batches)
    if not batches:
        raise ValueError("train_batches is empty: pass S >= 1 inner batches (x0, y, t, eps)")
    for i, b in enumerate(batches):
        check_train_batch(b, f"train batch {i}")
    check_val_batch(val_batch)
    dtype = next(p for p in model.parameters()).dtype
    for b in batches + [val_batch]:
        if b[0].dtype != dtype or b[3].dtype != dtype:
            raise ValueError(f"batch tensors are {b[0].dtype}/{b[3].dtype} but the model is {dtype}; cast x0 and eps to {dtype}")
    P = _Problem(model, rater, batches, val_batch, opt, float(temperature), objective, reducer)
    with eval_mode(model, rater), math_attention():
        if method == "unrolled":
            return _unrolled(P)
        if method == "reverse":
            return _reverse(P, forward_mode=False, keep_graphs=memory_budget)
        if method == "reverse_fwd":
            return _reverse(P, forward_mode=True, keep_graphs=memory_budget)
        if method in IMPLICIT_METHODS:
            return _implicit(P, method.removeprefix("implicit_"), implicit_damping, implicit_iterations, implicit_alpha)
        return _alignment(P)


def meta_gradient(
    model: nn.Module, rater: nn.Module, train_batches: Sequence[Batch], val_batch: Batch, *, inner_lr: float,
    method: str, inner_optimizer: str = "sgd", temperature: float = 1.0, **kwargs,
) -> list[torch.Tensor]:
    """d L_val(theta_S) / d eta through S = len(train_batches) inner steps; one tensor per
    ``rater.parameters()`` (zeros for parameters with ``requires_grad=False``).

    ``train_batches``: S tuples ``(x0 [B,C,H,W], y [B], t [B], eps [B,K,C,H,W])``; ``val_batch``:
    ``(x0, y, t, eps [B,C,H,W])``. ``method``: 'unrolled', 'reverse', 'reverse_fwd', 'alignment',
    'implicit_cg' or 'implicit_neumann' (see the module docstring). ``inner_optimizer``: 'sgd' or 'adam' (betas 0.9/0.999, eps 1e-8, bias correction,
    fresh state). ``model`` and ``rater`` are left unchanged. Extra keywords: ``objective`` (DDPM by default),
    ``reducer`` (multi-process averaging), ``memory_budget`` (``reverse`` / ``reverse_fwd``: the number of
    last inner steps whose gradient graph the forward sweep keeps, so the backward sweep does not rebuild
    them; 0 = memory-flat, S = the memory of ``unrolled``), and for the implicit methods ``implicit_damping`` (default
    1/(S * inner_lr)), ``implicit_iterations`` (Hessian-vector products, default 20) and ``implicit_alpha``
    (Neumann step, default inner_lr).
    """
    return meta_gradient_info(model, rater, train_batches, val_batch, inner_lr=inner_lr, method=method,
                              inner_optimizer=inner_optimizer, temperature=temperature, **kwargs).grads
