"""The benchmarks behind ``noiserater bench ...`` (the click commands in :mod:`noiserater.commands` only parse
options, call these and print).

- :mod:`.common`: what every benchmark shares: the training step as :func:`noiserater.train.train` takes it
  (:class:`~.common.TrainingStep`), timing, peak memory (the live-heap probe, peak RSS, CUDA), machine
  info, fresh-process measurements, JSON output.
- :mod:`.train`: our training step against a plain-PyTorch formulation of the same function.
- :mod:`.selection`: the cost of each noise-selection policy per training step, relative to vanilla.
- :mod:`.metagrad`: time and peak memory of one meta-gradient vs the number of inner steps.
- :mod:`.loader`: the latent-cache loader against the training step.

Nothing is imported here, so ``python -c "from noiserater.bench.metagrad import ..."`` in a fresh
measuring process loads only what it measures.
"""
