"""The InceptionV3 feature network of FID (pool3, the TensorFlow FID graph's 2015-12-05 weights).

This module owns the network (:class:`InceptionV3` and its blocks) and :func:`load_inception`, which loads
it from a LOCAL weights file (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` or torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth``; nothing is downloaded) and refuses every other file with a
one-line CheckpointError.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import CheckpointError, sha256_file
from ..config import ConfigError

# sha256 prefix of the standard FID Inception weights (pytorch-fid and torch-fidelity name their files by it)
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_FILE_NAMES = ("pt_inception-2015-12-05-6726825d.pth (pytorch-fid)",
                        "weights-inception-2015-12-05-6726825d.pth (torch-fidelity)")


# Module names follow torchvision / pytorch-fid / torch-fidelity so their weight files load as they are.


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):  # TensorFlow's average pool ignores the zero padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _Mixed(nn.Module):
    """An Inception block: named branches (lists of conv names applied in turn; a tuple fans out and
    concatenates) plus an optional pooled branch."""

    branches: list

    def _run(self, x, chain):
        for item in chain:
            if isinstance(item, tuple):
                return torch.cat([getattr(self, n)(x) for n in item], 1)
            x = getattr(self, item)(x)
        return x

    def forward(self, x):
        outs = [self._run(x, chain) for chain in self.branches]
        if self.pool is not None:
            pooled = self.pool(x)
            outs.append(self.branch_pool(pooled) if hasattr(self, "branch_pool") else pooled)
        return torch.cat(outs, 1)


def _convs(module: nn.Module, specs: dict[str, tuple]) -> None:
    for name, (cin, cout, kernel, kw) in specs.items():
        setattr(module, name, BasicConv2d(cin, cout, kernel_size=kernel, **kw))


class InceptionA(_Mixed):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        _convs(self, {"branch1x1": (cin, 64, 1, {}), "branch5x5_1": (cin, 48, 1, {}),
                      "branch5x5_2": (48, 64, 5, {"padding": 2}), "branch3x3dbl_1": (cin, 64, 1, {}),
                      "branch3x3dbl_2": (64, 96, 3, {"padding": 1}), "branch3x3dbl_3": (96, 96, 3, {"padding": 1}),
                      "branch_pool": (cin, pool_features, 1, {})})
        self.branches = [["branch1x1"], ["branch5x5_1", "branch5x5_2"],
                         ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]]
        self.pool = _tf_avg_pool


class InceptionB(_Mixed):
    def __init__(self, cin: int):
        super().__init__()
        _convs(self, {"branch3x3": (cin, 384, 3, {"stride": 2}), "branch3x3dbl_1": (cin, 64, 1, {}),
                      "branch3x3dbl_2": (64, 96, 3, {"padding": 1}), "branch3x3dbl_3": (96, 96, 3, {"stride": 2})})
        self.branches = [["branch3x3"], ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]]
        self.pool = lambda x: F.max_pool2d(x, 3, stride=2)


class InceptionC(_Mixed):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        h, v = {"padding": (0, 3)}, {"padding": (3, 0)}
        _convs(self, {"branch1x1": (cin, 192, 1, {}), "branch7x7_1": (cin, c7, 1, {}),
                      "branch7x7_2": (c7, c7, (1, 7), h), "branch7x7_3": (c7, 192, (7, 1), v),
                      "branch7x7dbl_1": (cin, c7, 1, {}), "branch7x7dbl_2": (c7, c7, (7, 1), v),
                      "branch7x7dbl_3": (c7, c7, (1, 7), h), "branch7x7dbl_4": (c7, c7, (7, 1), v),
                      "branch7x7dbl_5": (c7, 192, (1, 7), h), "branch_pool": (cin, 192, 1, {})})
        self.branches = [["branch1x1"], ["branch7x7_1", "branch7x7_2", "branch7x7_3"],
                         [f"branch7x7dbl_{i}" for i in range(1, 6)]]
        self.pool = _tf_avg_pool


class InceptionD(_Mixed):
    def __init__(self, cin: int):
        super().__init__()
        _convs(self, {"branch3x3_1": (cin, 192, 1, {}), "branch3x3_2": (192, 320, 3, {"stride": 2}),
                      "branch7x7x3_1": (cin, 192, 1, {}), "branch7x7x3_2": (192, 192, (1, 7), {"padding": (0, 3)}),
                      "branch7x7x3_3": (192, 192, (7, 1), {"padding": (3, 0)}),
                      "branch7x7x3_4": (192, 192, 3, {"stride": 2})})
        self.branches = [["branch3x3_1", "branch3x3_2"], [f"branch7x7x3_{i}" for i in range(1, 5)]]
        self.pool = lambda x: F.max_pool2d(x, 3, stride=2)


class InceptionE(_Mixed):
    """``max_pool``: the last block of the TensorFlow FID graph max-pools its pool branch."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        _convs(self, {"branch1x1": (cin, 320, 1, {}), "branch3x3_1": (cin, 384, 1, {}),
                      "branch3x3_2a": (384, 384, (1, 3), {"padding": (0, 1)}),
                      "branch3x3_2b": (384, 384, (3, 1), {"padding": (1, 0)}),
                      "branch3x3dbl_1": (cin, 448, 1, {}), "branch3x3dbl_2": (448, 384, 3, {"padding": 1}),
                      "branch3x3dbl_3a": (384, 384, (1, 3), {"padding": (0, 1)}),
                      "branch3x3dbl_3b": (384, 384, (3, 1), {"padding": (1, 0)}), "branch_pool": (cin, 192, 1, {})})
        self.branches = [["branch1x1"], ["branch3x3_1", ("branch3x3_2a", "branch3x3_2b")],
                         ["branch3x3dbl_1", "branch3x3dbl_2", ("branch3x3dbl_3a", "branch3x3dbl_3b")]]
        self.pool = (lambda x: F.max_pool2d(x, 3, stride=1, padding=1)) if max_pool else _tf_avg_pool


class InceptionV3(nn.Module):
    """InceptionV3 as in the TensorFlow FID graph (2015-12-05): images [N,C,H,W] in [-1,1] (C = 1 or 3)
    -> pool3 features [N,2048]. Inputs are resized to 299x299 (bilinear, as pytorch-fid does)."""

    num_features = 2048

    def __init__(self):
        super().__init__()
        _convs(self, {"Conv2d_1a_3x3": (3, 32, 3, {"stride": 2}), "Conv2d_2a_3x3": (32, 32, 3, {}),
                      "Conv2d_2b_3x3": (32, 64, 3, {"padding": 1}), "Conv2d_3b_1x1": (64, 80, 1, {}),
                      "Conv2d_4a_3x3": (80, 192, 3, {})})
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # unused for features; part of the weight file

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ConfigError(f"InceptionV3 needs 1- or 3-channel images, got {x.shape[1]} channels "
                             "(decode latents to pixels before computing Inception FID)")
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


def load_inception(path: str | os.PathLike | None) -> tuple[InceptionV3, str]:
    """(InceptionV3 in eval mode, sha256 of the file) from a local weights file. Every way the file can be
    wrong (missing, unreadable, not a state dict, another network) is a one-line CheckpointError."""
    hint = ("pass --inception-weights PATH (or set NOISERATER_INCEPTION_WEIGHTS) to the standard FID weights: "
            + " or ".join(INCEPTION_FILE_NAMES) + "; noiserater downloads nothing")
    if not path:
        raise CheckpointError(f"Inception FID needs a local weights file: {hint}")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Inception weights not found at {path}: {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{path} is not a readable PyTorch weights file ({msg}): {hint}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors: {hint}")
    model = InceptionV3()
    own = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("AuxLogits.") for k in state) or ("fc.weight" in state and state["fc.weight"].shape[0] == 1000):
        raise CheckpointError(f"{path} is torchvision's ImageNet InceptionV3 (1000 classes, aux logits), not the FID "
                              f"network; its FIDs are not comparable to published ones: {hint}")
    for k, v in own.items():  # files written before BatchNorm counted its batches lack these buffers
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        detail = (f"{shapes[0]} is {tuple(state[shapes[0]].shape)} in the file, {tuple(own[shapes[0]].shape)} expected"
                  if shapes else f"{len(missing)} missing keys (first {missing[:2]}), {len(unexpected)} unexpected "
                  f"(first {unexpected[:2]})")
        raise CheckpointError(f"{path} is not an InceptionV3 FID weights file ({detail}): {hint}")
    model.load_state_dict(state)
    digest = sha256_file(path)
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
        warnings.warn(f"{path} has sha256 {digest[:12]}..., not the standard FID Inception weights "
                      f"({INCEPTION_SHA256_PREFIX}...); its FIDs are not comparable to published ones", stacklevel=2)
    return model.eval().requires_grad_(False), digest
