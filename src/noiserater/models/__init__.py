"""Model registry: the DiT backbone and the noise rater, and loading/saving them (:mod:`.loading`)."""

from .dit import DIT_CONFIGS, DiT, DiTSpec, build_dit, build_dit_from_spec, load_reference_dit
from .loading import load_diffusion, load_rater, save_rater
from .rater import ABLATIONS, RATER_CONFIGS, NoiseRater, RaterSpec, build_rater, group_weights

__all__ = [
    "ABLATIONS",
    "DIT_CONFIGS",
    "RATER_CONFIGS",
    "DiT",
    "DiTSpec",
    "NoiseRater",
    "RaterSpec",
    "build_dit",
    "build_dit_from_spec",
    "build_rater",
    "group_weights",
    "load_diffusion",
    "load_rater",
    "load_reference_dit",
    "save_rater",
]
