"""noiserater: meta-learned noise valuation (NoiseRater, arXiv 2605.08144) for DiT training.

The objects a user scripts with are exported here, loaded lazily (``import noiserater`` stays cheap)::

    from noiserater import TrainConfig, train, NoiseSelector, build_dit, load_diffusion
    train(TrainConfig(steps=100))
"""

import importlib

__version__ = "0.1.0"

# name -> module that defines it (imported on first use)
_EXPORTS = {
    "TrainConfig": "train", "train": "train", "train_model": "train",
    "MetaTrainConfig": "meta.train", "metatrain": "meta.train",
    "meta_gradient": "meta.gradient",
    "NoiseSelector": "selection",
    "build_dit": "models.dit", "build_rater": "models.rater",
    "load_diffusion": "models.loading", "load_rater": "models.loading",
    "evaluate_checkpoint": "evaluate",
    "reproduce": "experiments", "run_evidence": "evidence",
    "sample_from_checkpoint": "sampling",
}

# ``evidence`` is also a submodule: an attribute of that name would be replaced by the module as soon as it
# is imported, so the function is exported as ``run_evidence``. ``train`` is the module itself, which is
# callable (``train(cfg)`` runs :func:`noiserater.train.train`); ``train_model`` is the plain function.
_ALIASES = {"train_model": "train", "run_evidence": "evidence"}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    """Lazy top-level exports: ``from noiserater import NoiseSelector``."""
    if name in _EXPORTS:
        module = importlib.import_module(f"noiserater.{_EXPORTS[name]}")
        return module if name == "train" else getattr(module, _ALIASES.get(name, name))
    raise AttributeError(f"module 'noiserater' has no attribute {name!r}")
