"""`signal check`: is there a per-candidate signal at this checkpoint worth learning, before
anyone spends hours meta-training a rater on it?

On a diffusion checkpoint, for ``groups`` training groups of ``k`` candidate noises each (train split,
timesteps and label dropout as meta-training draws them):

1. **Stability of the alignment oracle** ``a_bk = <grad L_val, grad l_bk>`` (Theorem 4.2): the alignments
   computed with two INDEPENDENT meta-validation draws of ``val_images`` (image, noise, timestep) triples
   each; their within-group Spearman correlation (averaged over groups) and how often their argmax agrees
   (chance 1/k). A signal that changes with the validation draw is not a signal a rater can learn.
2. **What it is not**: the within-group Spearman of the alignments (first draw) with the noise norm
   ``||eps_bk||`` and with the candidate loss ``l_bk``.
3. **A few-step held-out gain**: from the checkpoint, ``steps`` optimiser steps choosing each image's noise
   by the oracle (argmax of k, validation gradient recomputed at the current weights every step) against
   the same steps, batches and optimiser with a plain noise (candidate 0: an ordinary N(0, I) draw); the
   held-out loss of both on fixed (image, noise, timestep) draws from the TEST split when the checkpoint has
   one, else from the half of the validation split the oracle never uses. Repeated over ``seeds`` batch
   streams; mean and standard error of the relative difference over seeds.

Standard errors: over groups for 1-2 (groups are independent draws), over seeds for 3.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..config import require
from ..data import load_dataset
from ..meta.batches import MetaBatches, checkpoint_splits, split_heldout
from ..meta.gradient import Reducer
from ..meta.losses import candidate_losses, eval_mode, val_loss
from ..meta.oracle import oracle_at, rank_agreement, within_group_spearman
from ..models.loading import load_diffusion
from ..objectives import Objective, objective_from_config
from ..randomness import condition_labels
from ..stats import mean_se

OPTIMIZERS = ("adamw", "sgd")
HELDOUT_DRAW_SEED_OFFSET = 4242  # the fixed held-out (t, noise) draws: a stream no training step uses


@dataclass
class SignalCheckConfig:
    checkpoint: str = ""
    k: int = 4
    groups: int = 256
    val_images: int = 360
    steps: int = 20
    seeds: int = 3
    batch_size: int = 0
    lr: float = 0.0
    optimizer: str = "adamw"
    eval_draws: int = 4
    chunk: int = 64
    use_ema: bool = False
    data: str | None = None
    seed: int = 0

    def validate(self) -> None:
        require(bool(self.checkpoint), "checkpoint", "pass --checkpoint PATH to a diffusion checkpoint (noiserater train)")
        require(self.k >= 2, "k", "needs at least 2 candidates per group")
        for key in ("groups", "val_images", "eval_draws", "chunk"):
            require(getattr(self, key) >= 1, key, "must be >= 1")
        require(self.groups >= 2, "groups", "needs at least 2 groups for a standard error")
        for key in ("steps", "batch_size"):
            require(getattr(self, key) >= 0, key, "must be >= 0 (batch_size 0: the checkpoint's training batch size)")
        require(self.seeds >= 1, "seeds", "must be >= 1")
        require(math.isfinite(self.lr) and self.lr >= 0, "lr", "must be a finite number >= 0 (0: the checkpoint's lr)")
        require(self.optimizer in OPTIMIZERS, "optimizer", f"choose one of {', '.join(OPTIMIZERS)}")
        require(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)")


def _mean_se(x: torch.Tensor) -> dict:
    """{"mean", "se", "n"} of all values of ``x``."""
    m, se = mean_se(x.double().flatten().tolist())
    return {"mean": m, "se": se, "n": int(x.numel())}


def _alignments(model, batch, val, chunk: int, objective: Objective) -> torch.Tensor:
    """Oracle alignments of all groups, ``chunk`` groups per jvp (one validation gradient)."""
    out = []
    for i in range(0, batch[0].shape[0], chunk):
        part = tuple(x[i:i + chunk] for x in batch)
        out.append(oracle_at(model, part, val, Reducer(), objective=objective)[1])
    return torch.cat(out)


def _optimizer(name: str, params, lr: float, weight_decay: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _heldout_loss(model, draws, objective: Objective) -> float:
    with torch.no_grad(), eval_mode(model):
        total = sum(float(val_loss(model, d, objective=objective)) * d[0].shape[0] for d in draws)
    return total / sum(d[0].shape[0] for d in draws)


def signal_check(cfg: SignalCheckConfig, device: str | torch.device = "cpu", progress: bool = False) -> dict:
    """Run the three checks of the module docstring; returns a JSON-ready dict (see :func:`format_summary`)."""

    cfg.validate()
    t_start = time.perf_counter()
    model, spec, state = load_diffusion(cfg.checkpoint, use_ema=cfg.use_ema, device=device)
    model.eval()
    dcfg = state.get("config", {}) or {}
    objective = objective_from_config(dcfg)  # the checkpoint's own: every loss and t below
    source = cfg.data or dcfg.get("data", "digits")
    train, val, split = checkpoint_splits(dcfg, source)
    if split["test_fraction"] > 0:
        oracle_val = val
        eval_data = load_dataset(source, "test", seed=split["split_seed"], val_fraction=split["val_fraction"],
                                 test_fraction=split["test_fraction"])
        eval_split = "test"
    else:
        oracle_val, eval_data = split_heldout(val, 0.5, split["split_seed"])
        eval_split = "val (the half the oracle does not use)"
    label_dropout = float(dcfg.get("label_dropout", 0.1))
    unconditional = bool(dcfg.get("unconditional", False))
    sampler = MetaBatches(train, oracle_val, spec.num_classes, cfg.seed, 1, cfg.k, cfg.groups, cfg.val_images,
                          label_dropout, unconditional, objective=objective)

    # 1-2: stability across two independent validation draws, and what the signal is not
    groups = sampler.train_batch(0, 0, 0, 1, device)
    a1 = _alignments(model, groups, sampler.val_batch(0, cfg.val_images, 0, 1, device, seed_offset=0), cfg.chunk,
                     objective)
    a2 = _alignments(model, groups, sampler.val_batch(0, cfg.val_images, 0, 1, device, seed_offset=1), cfg.chunk,
                     objective)
    stability = rank_agreement(a1, a2)
    eps = groups[3]
    norms = eps.flatten(2).norm(dim=2)
    with torch.no_grad(), eval_mode(model):
        losses = torch.cat([candidate_losses(model, tuple(x[i:i + cfg.chunk] for x in groups), objective=objective)
                            for i in range(0, cfg.groups, cfg.chunk)])
    vs_norm = _mean_se(within_group_spearman(a1, norms))
    vs_loss = _mean_se(within_group_spearman(a1, losses))

    # 3: a few steps choosing noise by the oracle vs plain noise, held-out loss on data nobody selects with
    B = cfg.batch_size or int(dcfg.get("batch_size", 64) or 64)
    lr = cfg.lr or float(dcfg.get("lr", 1e-4) or 1e-4)
    wd = float(dcfg.get("weight_decay", 0.0) or 0.0)
    g = torch.Generator().manual_seed(cfg.seed + HELDOUT_DRAW_SEED_OFFSET)
    draws = []
    for _ in range(cfg.eval_draws):
        n = len(eval_data)
        t = objective.sample_t(n, g)
        y = condition_labels(eval_data.labels, spec.num_classes, 0.0, unconditional, g)  # held out: no dropout
        draws.append(tuple(x.to(device) for x in (eval_data.images, y, t,
                                                   torch.randn(eval_data.images.shape, generator=g))))
    base_loss = _heldout_loss(model, draws, objective)
    params0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt_state = state.get("optimizer") if cfg.optimizer == "adamw" else None
    per_seed, used_state = [], None
    bar = tqdm(total=cfg.seeds * 2 * cfg.steps, desc="signal check", dynamic_ncols=True) if progress else None
    for r in range(cfg.seeds):
        stream = MetaBatches(train, oracle_val, spec.num_classes, cfg.seed + 1 + r, 1, cfg.k, B, cfg.val_images,
                             label_dropout, unconditional, objective=objective)
        result = {}
        for arm in ("vanilla", "oracle"):
            m = copy.deepcopy(model)
            with torch.no_grad():
                for n, p in m.named_parameters():
                    p.copy_(params0[n])
            trainable = [p for p in m.parameters() if p.requires_grad]
            opt = _optimizer(cfg.optimizer, trainable, lr, wd)
            if opt_state:
                try:  # continue the checkpoint's own Adam moments where they fit
                    opt.load_state_dict(opt_state)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    used_state = True if used_state is None else used_state
                except (ValueError, KeyError, RuntimeError):
                    opt = _optimizer(cfg.optimizer, trainable, lr, wd)
                    used_state = False
            for i in range(cfg.steps):
                batch = stream.train_batch(i, 0, 0, 1, device)
                if arm == "oracle":
                    a = oracle_at(m, batch, stream.val_batch(i, cfg.val_images, 0, 1, device, seed_offset=7), Reducer(),
                                  objective=objective)[1]
                    pick = a.argmax(dim=1)
                else:
                    pick = torch.zeros(batch[0].shape[0], dtype=torch.long, device=batch[0].device)
                with eval_mode(m):
                    loss = candidate_losses(m, batch, objective=objective).gather(1, pick[:, None]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if bar is not None:
                    bar.update(1)
            result[arm] = _heldout_loss(m, draws, objective)
        per_seed.append({"seed": r, "loss_vanilla": result["vanilla"], "loss_oracle": result["oracle"],
                         "delta": result["oracle"] - result["vanilla"],
                         "delta_pct": 100.0 * (result["oracle"] - result["vanilla"]) / result["vanilla"]})
    if bar is not None:
        bar.close()
    rel = _mean_se(torch.tensor([s["delta_pct"] for s in per_seed]))
    dif = _mean_se(torch.tensor([s["delta"] for s in per_seed]))
    return {
        "checkpoint": str(cfg.checkpoint), "step": int(state.get("step", 0)), "model": spec.name, "data": split,
        "k": cfg.k, "groups": cfg.groups, "val_images": cfg.val_images, "chance": 1.0 / cfg.k,
        "oracle_val_images": len(oracle_val),
        "stability": stability,
        "vs_noise_norm": {"spearman": vs_norm["mean"], "spearman_se": vs_norm["se"]},
        "vs_loss": {"spearman": vs_loss["mean"], "spearman_se": vs_loss["se"]},
        "few_step": {
            "steps": cfg.steps, "seeds": cfg.seeds, "batch_size": B, "optimizer": cfg.optimizer, "lr": lr,
            "optimizer_state": "checkpoint" if used_state else "fresh", "eval_split": eval_split,
            "eval_triples": sum(d[0].shape[0] for d in draws), "loss_checkpoint": base_loss,
            "loss_vanilla": sum(s["loss_vanilla"] for s in per_seed) / len(per_seed),
            "loss_oracle": sum(s["loss_oracle"] for s in per_seed) / len(per_seed),
            "delta": dif["mean"], "delta_se": dif["se"], "delta_pct": rel["mean"], "delta_pct_se": rel["se"],
            "per_seed": per_seed,
        },
        "time_s": time.perf_counter() - t_start,
    }


def format_summary(res: dict) -> str:
    """A short human summary of :func:`signal_check`'s result (± = one standard error)."""
    s, f = res["stability"], res["few_step"]
    lines = [
        f"signal check: {res['checkpoint']} (step {res['step']}, {res['model']} on {res['data']['source']}), "
        f"k={res['k']}, {res['groups']} groups, 2 independent {res['val_images']}-triple validation draws "
        f"(from {res['oracle_val_images']} images)",
        f"  oracle stability   within-group Spearman {s['spearman']:+.3f} ± {s['spearman_se']:.3f}; argmax agreement "
        f"{100 * s['argmax_agreement']:.1f}% ± {100 * s['argmax_agreement_se']:.1f} (chance {100 * res['chance']:.0f}%)",
        f"  vs noise norm      Spearman {res['vs_noise_norm']['spearman']:+.3f} ± {res['vs_noise_norm']['spearman_se']:.3f}",
        f"  vs candidate loss  Spearman {res['vs_loss']['spearman']:+.3f} ± {res['vs_loss']['spearman_se']:.3f}",
        f"  few-step gain      {f['steps']} {f['optimizer']} steps (lr {f['lr']:g}, batch {f['batch_size']}, "
        f"{f['optimizer_state']} optimiser state), held-out loss oracle vs vanilla {f['delta_pct']:+.2f}% ± "
        f"{f['delta_pct_se']:.2f} over {f['seeds']} seed(s) (negative: the oracle helps); {f['eval_triples']} triples "
        f"of the {f['eval_split']}",
        f"  ({res['time_s']:.0f} s; ± = one standard error: over groups above, over seeds for the gain)",
    ]
    return "\n".join(lines)
