"""The training objective as a unit: what x_t and the regression target are, how t is drawn, what the
DiT's timestep embedder receives, the per-sample loss and the samplers that invert it.

Two objectives, one registry (:data:`OBJECTIVES`, :func:`get_objective`):

``ddpm``  DDPM with epsilon prediction (:mod:`noiserater.diffusion`): t is an integer step in [0, 1000),
          x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, target eps; sampler ``ddim`` (eta=0).
``flow``  Rectified flow (linear interpolant, velocity prediction; SD3 / SiT): t is a real in [0, 1] with
          t=0 data and t=1 noise, x_t = (1 - t) x0 + t eps, target v = eps - x0; t drawn ``uniform`` or
          ``logit-normal`` (SD3: t = sigmoid(mean + std * n), n ~ N(0, 1)); the DiT's timestep embedder
          receives 1000 t (the range it has for DDPM); samplers ``euler`` and ``heun`` integrate
          dx/dt = v from t=1 to t=0.

Every consumer (training, the meta losses, the alignment oracle, held-out losses, sampling) goes through
this interface, so a checkpoint's objective (``config["objective"]``) decides all of them. The rater sees
``model_time(t)`` too, so its timestep input has the same range for both objectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .config import ConfigError, require
from .diffusion import GaussianDiffusion, ddim_sample, epsilon_prediction, per_sample_loss

TIME_SAMPLINGS = ("uniform", "logit-normal")
# the flow objective's t in [0, 1] is scaled to the DDPM step range before the sinusoidal embedding
FLOW_TIME_SCALE = 1000.0


class Objective:
    """Interface of a training objective. Shapes: x0, eps [B,C,H,W]; t, y [B]; model(x, model_time(t), y)
    returns [B,C',H,W] whose first C channels are the prediction."""

    name: str = ""
    samplers: tuple[str, ...] = ()
    time_meaning: str = ""

    @property
    def default_sampler(self) -> str:
        return self.samplers[0]

    def x_t(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample_t(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def error(self, model: Callable, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
              eps: torch.Tensor, input_noise: torch.Tensor | None = None) -> torch.Tensor:
        """prediction - target [B,C,H,W] (the first C output channels; a learned sigma half is ignored).
        ``input_noise`` (input perturbation: eps + gamma * xi) builds x_t instead of ``eps``; the target keeps eps."""
        out = model(self.x_t(x0, eps if input_noise is None else input_noise, t), self.model_time(t), y)
        return epsilon_prediction(out, x0.shape[1]) - self.target(x0, eps, t)

    def loss(self, model: Callable, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
             eps: torch.Tensor, input_noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample loss [B]: mean over C,H,W of (prediction - target)^2; float32 under bf16 autocast.
        ``input_noise``: see :meth:`error`."""
        err = self.error(model, x0, y, t, eps, input_noise)
        if err.dtype not in (torch.float32, torch.float64):  # bf16/fp16 under autocast: reduce in float32
            err = err.float()
        return err.pow(2).flatten(1).mean(dim=1)

    def check_sampler(self, sampler: str, flag: str = "--sampler") -> None:
        """One-line ConfigError when ``sampler`` does not integrate this objective."""
        if sampler not in self.samplers:
            raise ConfigError(
                f"sampler {sampler!r} (flag {flag}) does not fit a {self.name} checkpoint: its samplers are "
                f"{', '.join(self.samplers)}; pass {flag} {self.default_sampler}")

    def check_steps(self, steps: int, flag: str = "--sample-steps") -> None:
        if steps < 1:
            raise ConfigError(f"invalid {flag}: sampling needs at least 1 step, got {steps}")

    def sample(self, model: nn.Module, noise: torch.Tensor, y: torch.Tensor, *, sampler: str | None = None,
               steps: int = 50, cfg_scale: float = 1.0, null_class: int | None = None, clip: bool = False,
               progress: bool = False) -> torch.Tensor:
        """x0 [B,C,H,W] from ``noise`` [B,C,H,W] and labels ``y`` [B], classifier-free guidance on all channels."""
        raise NotImplementedError

    def options(self) -> dict:
        """The options that define this objective (recorded with checkpoints and raters)."""
        return {"objective": self.name}


class DDPMObjective(Objective):
    """DDPM epsilon prediction on :class:`GaussianDiffusion`'s schedule; exactly the pre-objective code path."""

    name = "ddpm"
    samplers = ("ddim",)
    time_meaning = "integer diffusion step in [0, 1000), 0 = data"

    def __init__(self, diffusion: GaussianDiffusion | None = None):
        self.diffusion = diffusion or GaussianDiffusion()

    @property
    def num_timesteps(self) -> int:
        return self.diffusion.num_timesteps

    def x_t(self, x0, eps, t):
        return self.diffusion.q_sample(x0, t, eps)

    def target(self, x0, eps, t):
        return eps

    def sample_t(self, batch, generator=None):
        """Integer steps [batch] uniform in [0, T) (int64)."""
        return torch.randint(0, self.diffusion.num_timesteps, (batch,), generator=generator)

    def model_time(self, t):
        return t

    def loss(self, model, x0, y, t, eps, input_noise=None):
        return per_sample_loss(model, self.diffusion, x0, t, y, eps, input_noise)  # the one DDPM loss, bit for bit

    def check_steps(self, steps, flag="--sample-steps"):
        if not 1 <= steps <= self.diffusion.num_timesteps:
            raise ConfigError(f"invalid {flag}: DDIM steps must be in [1, {self.diffusion.num_timesteps}], got {steps}")

    def sample(self, model, noise, y, *, sampler=None, steps=50, cfg_scale=1.0, null_class=None, clip=False,
               progress=False):
        self.check_sampler(sampler or "ddim")
        self.check_steps(steps)
        return ddim_sample(model, self.diffusion, noise, y, steps=steps, cfg_scale=cfg_scale, null_class=null_class,
                           clip=clip, progress=progress)


class FlowObjective(Objective):
    """Rectified flow: x_t = (1 - t) x0 + t eps, target v = eps - x0, t in [0, 1] (0 = data, 1 = noise)."""

    name = "flow"
    samplers = ("euler", "heun")
    time_meaning = "real t in [0, 1], 0 = data, 1 = noise; the DiT sees 1000 t"

    def __init__(self, time_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0):
        if time_sampling not in TIME_SAMPLINGS:
            raise ConfigError(f"invalid time_sampling {time_sampling!r}: choose one of {', '.join(TIME_SAMPLINGS)}")
        if not (math.isfinite(logit_mean) and math.isfinite(logit_std) and logit_std > 0):
            raise ConfigError(f"invalid logit_std/logit_mean ({logit_mean}, {logit_std}): finite, std > 0")
        self.time_sampling, self.logit_mean, self.logit_std = time_sampling, float(logit_mean), float(logit_std)

    @staticmethod
    def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def x_t(self, x0, eps, t):
        if eps.shape != x0.shape:
            raise ValueError(f"noise shape {list(eps.shape)} differs from x0 shape {list(x0.shape)}")
        tt = self._bcast(t, x0)
        return (1 - tt) * x0 + tt * eps

    def target(self, x0, eps, t):
        return eps - x0

    def sample_t(self, batch, generator=None):
        """Float32 t [batch] in [0, 1]: uniform, or sigmoid(mean + std * N(0, 1)) (logit-normal)."""
        if self.time_sampling == "uniform":
            return torch.rand((batch,), generator=generator)
        n = torch.randn((batch,), generator=generator)
        return torch.sigmoid(self.logit_mean + self.logit_std * n)

    def model_time(self, t):
        return t * FLOW_TIME_SCALE

    def velocity(self, model: nn.Module, x: torch.Tensor, t: float, y: torch.Tensor, cfg_scale: float,
                 null: int | None) -> torch.Tensor:
        """v(x, t) [B,C,H,W]; with guidance v_u + s (v_c - v_u) on ALL channels."""
        C = x.shape[1]
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        if cfg_scale != 1.0:
            out = model(torch.cat([x, x]), self.model_time(torch.cat([tt, tt])), torch.cat([y, torch.full_like(y, null)]))
            v_c, v_u = epsilon_prediction(out, C).chunk(2)
            return (v_u + cfg_scale * (v_c - v_u)).to(x.dtype)
        return epsilon_prediction(model(x, self.model_time(tt), y), C).to(x.dtype)

    def step(self, model: nn.Module, x: torch.Tensor, t: float, t_next: float, y: torch.Tensor, *,
             sampler: str = "euler", cfg_scale: float = 1.0, null: int | None = None) -> torch.Tensor:
        """One ODE step of dx/dt = v from t to t_next (< t): Euler x + h v(x, t), or Heun (explicit
        trapezoid: the mean of v at t and at the Euler prediction at t_next), h = t_next - t."""
        h = t_next - t
        v = self.velocity(model, x, t, y, cfg_scale, null)
        if sampler == "euler":
            return x + h * v
        v_next = self.velocity(model, x + h * v, t_next, y, cfg_scale, null)
        return x + h * 0.5 * (v + v_next)

    @torch.no_grad()
    def sample(self, model, noise, y, *, sampler=None, steps=50, cfg_scale=1.0, null_class=None, clip=False,
               progress=False, times: list[float] | None = None):
        """Integrate dx/dt = v(x, t) from t=1 (x = noise) to t=0 on the uniform grid t_i = 1 - i/steps (or
        on ``times``, decreasing, e.g. a scheduler's sigmas).

        ``euler``: one model evaluation per step; ``heun``: two. ``clip`` clamps the final sample to [-1, 1]."""
        sampler = sampler or self.default_sampler
        self.check_sampler(sampler)
        self.check_steps(steps)
        null = getattr(model, "num_classes", None) if null_class is None else null_class
        if cfg_scale != 1.0 and null is None:
            raise ConfigError("classifier-free guidance needs null_class (the model has no num_classes)")
        ts = list(times) if times is not None else torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
        was_training = getattr(model, "training", False)
        if isinstance(model, nn.Module):
            model.eval()
        x = noise
        it = range(len(ts) - 1)
        if progress:
            it = tqdm(it, desc=sampler, leave=False)
        try:
            for i in it:
                x = self.step(model, x, ts[i], ts[i + 1], y, sampler=sampler, cfg_scale=cfg_scale, null=null)
        finally:
            if isinstance(model, nn.Module):
                model.train(was_training)
        return x.clamp(-1, 1) if clip else x

    def options(self) -> dict:
        return {"objective": self.name, "time_sampling": self.time_sampling, "logit_mean": self.logit_mean,
                "logit_std": self.logit_std}


OBJECTIVES: dict[str, type[Objective]] = {"ddpm": DDPMObjective, "flow": FlowObjective}


def get_objective(name: str = "ddpm", **options) -> Objective:
    """The objective ``name`` ("ddpm" or "flow"); flow options: time_sampling, logit_mean, logit_std; ddpm:
    diffusion (a :class:`GaussianDiffusion`, default the project's schedule)."""
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](**options)


def objective_from_config(config: Mapping | None) -> Objective:
    """The objective a diffusion run was trained with, from its saved config (no key: ddpm, as every run
    written before objectives existed)."""
    config = config or {}
    name = config.get("objective", "ddpm")
    if name == "flow":
        return FlowObjective(config.get("time_sampling", "uniform"), float(config.get("logit_mean", 0.0)),
                             float(config.get("logit_std", 1.0)))
    return get_objective(name)


@dataclass
class ObjectiveOptions:
    """A run's training objective and its settings (a run's config inherits them: see
    :class:`noiserater.train.TrainConfig`); :meth:`training_objective` builds the :class:`Objective`."""

    objective: str = "ddpm"  # ddpm (epsilon prediction) or flow (rectified flow)
    time_sampling: str = "uniform"  # flow: t ~ uniform or logit-normal (SD3)
    logit_mean: float = 0.0  # flow, logit-normal: t = sigmoid(mean + std * n)
    logit_std: float = 1.0

    # settings added after runs were first written, with the value that reproduces those runs (resume checks)
    LEGACY_VALUES: ClassVar[dict[str, Any]] = {"objective": "ddpm", "time_sampling": "uniform", "logit_mean": 0.0,
                                               "logit_std": 1.0}

    def training_objective(self) -> Objective:
        return objective_from_config({"objective": self.objective, "time_sampling": self.time_sampling,
                                      "logit_mean": self.logit_mean, "logit_std": self.logit_std})

    def check_matches(self, state: dict, what: str) -> None:
        """A checkpoint (``state``, with its ``config``) continues with the objective it was trained with: a
        mismatch is a one-line error naming ``what`` and the flag."""
        theirs = objective_from_config(state.get("config")).name
        if theirs != self.objective:
            raise ConfigError(f"{what} was trained with the {theirs} objective, but this run asks for --objective "
                              f"{self.objective}: pass --objective {theirs} (a model continues with the objective it "
                              "was trained with)")

    def validate_objective_options(self) -> None:
        require(self.objective in OBJECTIVES, "objective", f"choose one of {', '.join(OBJECTIVES)}")
        require(self.time_sampling in TIME_SAMPLINGS, "time_sampling", f"choose one of {', '.join(TIME_SAMPLINGS)}")
        require(math.isfinite(self.logit_mean), "logit_mean", "must be a finite number")
        require(math.isfinite(self.logit_std) and self.logit_std > 0, "logit_std", "must be a finite number > 0")
        for key, ddpm_value in (("time_sampling", "uniform"), ("logit_mean", 0.0), ("logit_std", 1.0)):
            require(self.objective == "flow" or getattr(self, key) == ddpm_value, key,
                    "only the flow objective draws real-valued t: drop it or pass --objective flow")


_DEFAULT: DDPMObjective | None = None


def default_objective() -> DDPMObjective:
    """The DDPM objective on the project's schedule, built once."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = DDPMObjective()
    return _DEFAULT
