"""Shared test setup. Tests use tiny models: one intra-op thread is faster than two on a shared 2-core
machine (OpenMP threads spin-wait on each other when the other core is busy)."""

import torch

torch.set_num_threads(1)
