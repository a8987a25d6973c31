"""Bias of the implicit meta-gradients (Theorem 4.1) on the diffusion problem (``noiserater bench implicit``).

The implicit methods evaluate eq. 8 at theta_S as if it were the inner optimum; a pretrained DiT after S
inner steps is far from one (the inner gradient is not zero, the Hessian is indefinite). This measures how
far they land from the exact meta-gradient of the S steps (``unrolled``): for each S and each of
``draws`` outer batches (drawn exactly as ``noiserater metatrain`` draws them from the checkpoint's own
train/validation split), the cosine between the implicit and the unrolled meta-gradient, the norm ratio
|implicit| / |unrolled| and the relative error |implicit - unrolled| / |unrolled|, over all rater
parameters; ``alignment`` (Theorem 4.2, first order in the inner lr) is measured the same way beside them.
The rater is freshly initialised (seeded): its weights are those every meta-training starts from. Time is
the process CPU time of one call with one torch thread.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

from ..meta.batches import MetaBatches, checkpoint_splits
from ..meta.gradient import IMPLICIT_ITERATIONS, meta_gradient
from ..models.loading import load_diffusion
from ..models.rater import NoiseRater, RaterSpec
from ..objectives import objective_from_config
from .common import machine_info

DEFAULT_VARIANTS = "implicit_cg,implicit_neumann,implicit_cg:1,implicit_cg:0,alignment"


def parse_variants(text: str) -> list[tuple[str, float | None]]:
    """'implicit_cg,implicit_cg:0.5,alignment' -> [(method, damping or None for the default 1/(S * inner_lr))].
    ``alignment`` (Theorem 4.2's first-order estimate, no damping) is the cheap baseline beside them."""
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        method, _, damping = item.partition(":")
        if method not in ("implicit_cg", "implicit_neumann", "alignment") or (method == "alignment" and damping):
            raise ValueError(f"{item!r}: the method must be implicit_cg or implicit_neumann (optionally :DAMPING) "
                             "or alignment")
        try:
            out.append((method, float(damping) if damping else None))
        except ValueError:
            raise ValueError(f"{item!r}: the damping after ':' must be a number") from None
    return out


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts]).double()


def _timed(fn: Callable):
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


def run_implicit_bias(checkpoint: str, steps: list[int], *, variants: list[tuple[str, float | None]],
                      draws: int = 3, inner_lr: float = 1e-3, rater: str = "Rater-N/2", candidates: int = 8,
                      batch: int = 8, val_batch: int = 64, iterations: int = IMPLICIT_ITERATIONS,
                      alpha: float | None = None, seed: int = 0, threads: int = 1,
                      log: Callable[[str], object] = print) -> dict:
    """{"setup", "records"}: one record per (variant, S, draw) with cosine, norm_ratio, rel_error and CPU times,
    and one summary per (variant, S) (mean and range over the draws)."""
    torch.set_num_threads(threads)
    model, spec, state = load_diffusion(checkpoint, use_ema=False)
    dcfg = state.get("config", {})
    source = dcfg.get("data", "digits")
    train_data, val_data, split_info = checkpoint_splits(dcfg, source)
    torch.manual_seed(seed)
    rater_net = NoiseRater(RaterSpec(rater, spec.input_size, spec.in_channels, spec.num_classes, "full"))
    label_dropout = float(dcfg.get("label_dropout", 0.1))
    objective = objective_from_config(dcfg)  # the checkpoint's own training objective
    records = []
    for S in steps:
        sampler = MetaBatches(train_data, val_data, spec.num_classes, seed, S, candidates, batch, val_batch,
                              label_dropout, bool(dcfg.get("unconditional", False)), objective=objective)
        for n in range(draws):
            batches, val = sampler.outer(n, 0, 1, "cpu")
            ref, t_ref = _timed(lambda: meta_gradient(model, rater_net, batches, val, inner_lr=inner_lr,
                                                      method="unrolled", objective=objective))
            r = _flat(ref)
            for method, damping in variants:
                got, t = _timed(lambda: meta_gradient(
                    model, rater_net, batches, val, inner_lr=inner_lr, method=method, implicit_damping=damping,
                    implicit_iterations=iterations, implicit_alpha=alpha, objective=objective))
                g = _flat(got)
                default = None if method == "alignment" else 1.0 / (S * inner_lr)
                rec = {"method": method, "damping": default if damping is None else damping,
                       "damping_default": damping is None, "inner_steps": S, "draw": n,
                       "cosine": float(g @ r / (g.norm() * r.norm())), "norm_ratio": float(g.norm() / r.norm()),
                       "rel_error": float((g - r).norm() / r.norm()), "unrolled_norm": float(r.norm()),
                       "time_s": t, "unrolled_time_s": t_ref}
                records.append(rec)
                log(f"{method:16s} damping {rec['damping'] or 0:<8.4g} S={S:2d} draw {n}: cosine {rec['cosine']:+.3f}  "
                    f"|impl|/|unrolled| {rec['norm_ratio']:.3g}  time {t:.2f} s (unrolled {t_ref:.2f} s)")
    summary = []
    for method, damping in variants:
        for S in steps:
            rs = [x for x in records if x["method"] == method and x["inner_steps"] == S
                  and x["damping_default"] == (damping is None)
                  and (damping is None or x["damping"] == damping)]
            cos = [x["cosine"] for x in rs]
            ratio = [x["norm_ratio"] for x in rs]
            summary.append({"method": method, "damping": rs[0]["damping"], "damping_default": damping is None,
                            "inner_steps": S, "draws": len(rs),
                            "cosine_mean": statistics.fmean(cos), "cosine_min": min(cos), "cosine_max": max(cos),
                            "norm_ratio_geomean": math.exp(statistics.fmean(math.log(x) for x in ratio)),
                            "norm_ratio_min": min(ratio), "norm_ratio_max": max(ratio),
                            "time_s_mean": statistics.fmean(x["time_s"] for x in rs),
                            "unrolled_time_s_mean": statistics.fmean(x["unrolled_time_s"] for x in rs)})
    setup = {"checkpoint": str(checkpoint), "checkpoint_step": int(state.get("step", 0)), "model": spec.name,
             "data": split_info, "rater": rater, "rater_init_seed": seed, "inner_optimizer": "sgd",
             "inner_lr": inner_lr, "candidates": candidates, "batch_size": batch, "val_batch_size": val_batch,
             "implicit_iterations": iterations, "implicit_alpha": inner_lr if alpha is None else alpha,
             "damping_default": "1 / (S * inner_lr)", "reference": "unrolled", "draws": draws,
             "clock": f"process CPU time, {threads} thread(s)", "machine": machine_info("cpu")}
    return {"setup": setup, "summary": summary, "records": records}


def markdown_table(result: dict) -> str:
    """The summary as a Markdown table (one row per variant and S)."""
    lines = ["| method | damping | S | cosine (mean, min..max) | norm ratio (geomean, min..max) | time / unrolled |",
             "|---|---|---|---|---|---|"]
    for x in result["summary"]:
        damping = "-" if x["damping"] is None else f"{x['damping']:.4g}" + (" (default)" if x["damping_default"] else "")
        lines.append(f"| {x['method']} | {damping} | {x['inner_steps']} | {x['cosine_mean']:+.3f} "
                     f"({x['cosine_min']:+.3f}..{x['cosine_max']:+.3f}) | {x['norm_ratio_geomean']:.3g} "
                     f"({x['norm_ratio_min']:.3g}..{x['norm_ratio_max']:.3g}) | "
                     f"{x['time_s_mean'] / x['unrolled_time_s_mean']:.2f} |")
    return "\n".join(lines)
