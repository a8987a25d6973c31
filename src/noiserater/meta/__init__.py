"""Meta-learning the noise rater: the bilevel losses, differentiable inner optimisers, meta-gradients
(unrolled, reverse accumulation, forward-over-reverse, Theorem 4.2 alignment) and the meta-training loop."""

from .gradient import METHODS, MetaResult, Reducer, inner_steps, meta_gradient, meta_gradient_info
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
    "INNER_OPTIMIZERS",
    "METHODS",
    "InnerOptimizer",
    "MetaResult",
    "Reducer",
    "candidate_losses",
    "candidate_weights",
    "eval_mode",
    "inner_loss",
    "inner_steps",
    "math_attention",
    "meta_gradient",
    "meta_gradient_info",
    "uniform_weights",
    "val_loss",
    "weighted_loss",
]
