"""The full-scale preset builds valid configs for every stage and carries the paper's settings."""

from __future__ import annotations

import pytest

from noiserater.config import from_dict
from noiserater.models import DIT_CONFIGS
from noiserater.models.rater import RATER_CONFIGS
from noiserater.study.presets import PRESETS
from noiserater.train import TrainConfig


def test_imagenet_dit_s2_preset_is_the_papers_setting_and_builds_configs():
    p = PRESETS["imagenet-dit-s2"]
    p.validate()
    assert (p.model, p.batch_size, p.rater, p.meta_inner_steps, p.continue_steps) == ("DiT-S/2", 256, "Rater-S/2", 5, 80_000)
    assert p.model in DIT_CONFIGS and p.transfer_model in DIT_CONFIGS and p.rater in RATER_CONFIGS
    cfg = from_dict(TrainConfig, {**p.train, "data": "digits"})  # every key is a TrainConfig field
    assert (cfg.lr, cfg.ema_decay, cfg.label_dropout, cfg.amp) == (1e-4, 0.9999, 0.1, True)
    assert p.eval["num_samples"] == p.eval_samples == 50_000 and p.eval["sampler"] == "ddim"
    assert p.cfg_scale == p.eval["cfg_scale"] == p.train["cfg_scale"] == 1.25
    assert p.cache["scaling_factor"] == 0.18215 and p.cache["resolution"] == 256
    assert p.hardware["paper_selection_overhead"] == {"k2": 1.3, "k4": 1.63, "k8": 2.09}
    try:
        from noiserater.metatrain import MetaTrainConfig
    except ImportError:
        pytest.skip("meta-training not in this checkout")
    MetaTrainConfig(checkpoint="x.pt", **p.metatrain).validate()


def test_preset_reachable_through_get_preset_with_overrides():
    from noiserater.study.presets import get_preset

    p = get_preset("imagenet-dit-s2", data="/data/cache")
    assert p.data == "/data/cache" and p.train["batch_size"] == 256


def test_full_scale_stage_settings_reach_the_stage_configs(tmp_path):
    """The imagenet preset's `train` / `metatrain` dicts are applied (they were silently dropped before)."""
    from noiserater.study.presets import get_preset
    from noiserater.study.reproduce import metatrain_config, pretrain_config

    p = get_preset("imagenet-dit-s2")
    cfg = pretrain_config(p, tmp_path, p.model, 100_000)
    assert cfg.ema_decay == 0.9999 and cfg.amp is True and cfg.grad_clip == 0.0 and cfg.learn_sigma is False
    assert cfg.batch_size == p.batch_size and cfg.lr == p.pretrain_lr and cfg.steps == 100_000  # the plan wins
    m = metatrain_config(p, tmp_path, "ckpt.pt")
    assert m.use_ema is True and m.method == "reverse" and m.outer_steps == p.meta_outer_steps
    # the CPU presets have no stage settings: their configs are the TrainConfig defaults
    d = get_preset("digits")
    assert pretrain_config(d, tmp_path, d.model, 10).ema_decay == 0.999
