"""noiserater: meta-learned noise valuation (NoiseRater, arXiv 2605.08144) for DiT training.

The objects a user scripts with are exported here, loaded lazily (``import noiserater`` stays cheap)::

    from noiserater import TrainConfig, NoiseSelector, build_dit, load_diffusion
    from noiserater.train import train
    train(TrainConfig(steps=100))

The paper's three stages are modules of their own: :mod:`noiserater.train` (stages i and iii) and
:mod:`noiserater.metatrain` (stage ii); their functions ``train`` / ``metatrain`` are imported from there
(a package attribute cannot have the name of one of its submodules).
"""

import importlib

__version__ = "0.1.0"

# name -> module that defines it (imported on first use)
_EXPORTS = {
    "TrainConfig": "train", "MetaTrainConfig": "metatrain",
    "meta_gradient": "meta.gradient",
    "NoiseSelector": "selection",
    "get_objective": "objectives",
    "build_dit": "models.dit", "build_rater": "models.rater",
    "load_diffusion": "models.loading", "load_rater": "models.loading",
    "evaluate_checkpoint": "evaluate",
    "reproduce": "study.reproduce", "evidence": "study.evidence",
    "sample_from_checkpoint": "sampling",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    """Lazy top-level exports: ``from noiserater import NoiseSelector``."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"noiserater.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'noiserater' has no attribute {name!r}")
