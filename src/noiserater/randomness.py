"""Randomness as a pure function of (seed, step): resumable, and the same for any number of processes.

Every step draws for the GLOBAL batch from generators seeded by (seed, step, stream); each DDP rank takes
its slice. The batch order is a sequence of seeded per-epoch permutations.
"""

from __future__ import annotations

import torch

# Odd primes that mix (seed, step) and (seed, epoch) into one generator seed, so that neighbouring seeds
# and steps do not share a stream (seed s at step n+1 is not seed s+1 at step n).
STEP_MIX = 1_000_003
EPOCH_MIX = 7919


def step_generator(seed: int, step: int, stream: int = 0, streams: int = 8) -> torch.Generator:
    """A generator that depends only on (seed, step, stream): resumable and rank-independent.
    ``stream`` in [0, streams) tells apart independent draws of one step."""
    return torch.Generator().manual_seed(((seed * STEP_MIX + step) * streams + stream) % (2**63 - 1))


def batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Global batch indices [batch] of ``step``: consecutive slices of seeded per-epoch permutations of n."""
    start = step * batch
    out: list[int] = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * EPOCH_MIX + epoch))
        out.extend(perm[offset: offset + batch - len(out)].tolist())
    return torch.tensor(out, dtype=torch.long)


def drop_labels(y: torch.Tensor, null_class: int, prob: float, generator: torch.Generator | None,
                draw_at_zero: bool = False) -> torch.Tensor:
    """Labels [B] with each replaced by ``null_class`` with probability ``prob`` (classifier-free guidance
    training). At ``prob <= 0`` the mask is not drawn (the generator is not advanced) unless
    ``draw_at_zero``: meta-training always draws it, and its recorded batches depend on that. Without a
    ``generator`` the mask is drawn from the global RNG on y's device (the DiT's own label dropout)."""
    if prob <= 0 and not draw_at_zero:
        return y
    device = generator.device if generator is not None else y.device
    drop = torch.rand(y.shape[0], generator=generator, device=device) < prob
    return torch.where(drop, torch.full_like(y, null_class), y)


def condition_labels(y: torch.Tensor, null_class: int, prob: float, unconditional: bool,
                     generator: torch.Generator, draw_at_zero: bool = False) -> torch.Tensor:
    """The labels [B] a training step conditions on: all ``null_class`` for an unconditional model (nothing
    drawn), else :func:`drop_labels`."""
    if unconditional:
        return torch.full_like(y, null_class)
    return drop_labels(y, null_class, prob, generator, draw_at_zero)


def draw_step_randomness(cfg, step: int, y: torch.Tensor, num_classes: int, shape: tuple, objective):
    """(t [B] in the objective's units, y after dropout [B], candidates [B,k,C,H,W]) for the global batch of
    ``step``; ``cfg`` is a run config (seed, label_dropout, unconditional, candidates), ``objective`` draws t.

    Candidates are drawn candidate-major ([k,B,...], then viewed [B,k,...]): candidate j of every image is
    the same whatever k is, so vanilla (k=1) trains on exactly candidate 0 of every k>1 arm of the same
    seed, and arms of a study share their noises, not only their data order and timesteps."""
    g = step_generator(cfg.seed, step)
    B = y.shape[0]
    t = objective.sample_t(B, g)
    y = condition_labels(y, num_classes, cfg.label_dropout, cfg.unconditional, g)
    candidates = torch.randn((cfg.candidates, B, *shape), generator=g).transpose(0, 1)
    return t, y, candidates


def draw_input_perturbation(cfg, step: int, shape: tuple, batch: int) -> torch.Tensor | None:
    """gamma * xi [B,C,H,W] of DDPM-IP for the global batch of ``step`` (its own stream, so the candidates
    stay paired with the other arms), or None when ``input_perturbation`` is 0."""
    if cfg.input_perturbation <= 0:
        return None
    g = step_generator(cfg.seed, step, stream=2)
    return cfg.input_perturbation * torch.randn((batch, *shape), generator=g)
