"""noiserater: meta-learned noise valuation (NoiseRater, arXiv 2605.08144) for DiT training."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy top-level exports (importing noiserater stays cheap): ``from noiserater import NoiseSelector``."""
    if name == "NoiseSelector":
        from .selection import NoiseSelector

        return NoiseSelector
    raise AttributeError(f"module 'noiserater' has no attribute {name!r}")
