"""noiserater: meta-learned noise valuation (NoiseRater, arXiv 2605.08144) for DiT training."""

__version__ = "0.1.0"
