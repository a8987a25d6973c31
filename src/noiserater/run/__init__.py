"""Run infrastructure shared by every long-running command (``train``, ``metatrain``).

- :mod:`.distributed`: the device and the torchrun process group;
- :mod:`.folder`: the run folder's metrics.jsonl (append, truncate on resume, read back);
- :mod:`.loop`: the scaffold both training loops run inside: lock, resume check, signal handling, the
  bad-step guard, the agreement of DDP ranks, the save cadence and the clean-up on failure.

Randomness as a pure function of (seed, step) is :mod:`noiserater.randomness` (the selection policies
use it too). Checkpoint files themselves (atomic writes, content hashes, loaders) are :mod:`noiserater.checkpoint`.
"""
