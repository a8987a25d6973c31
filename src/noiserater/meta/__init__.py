"""Meta-learning the noise rater: the bilevel losses, differentiable inner optimisers, meta-gradients
(unrolled, reverse accumulation, forward-over-reverse, Theorem 4.2 alignment, Theorem 4.1 implicit) and the meta-training loop."""

from .gradient import (
    IMPLICIT_METHODS,
    METHODS,
    MetaResult,
    Reducer,
    implicit_hypergradient,
    implicit_solve,
    inner_steps,
    meta_gradient,
    meta_gradient_info,
)
from .inner_optim import INNER_OPTIMIZERS, InnerOptimizer
from .losses import (
    candidate_losses,
    candidate_weights,
    eval_mode,
    inner_loss,
    math_attention,
    uniform_weights,
    val_loss,
    weighted_loss,
)

__all__ = [
    "IMPLICIT_METHODS",
    "INNER_OPTIMIZERS",
    "METHODS",
    "InnerOptimizer",
    "MetaResult",
    "Reducer",
    "candidate_losses",
    "candidate_weights",
    "eval_mode",
    "implicit_hypergradient",
    "implicit_solve",
    "inner_loss",
    "inner_steps",
    "math_attention",
    "meta_gradient",
    "meta_gradient_info",
    "uniform_weights",
    "val_loss",
    "weighted_loss",
]
