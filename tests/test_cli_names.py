"""One meaning per option name across every command (docs/cli.md), and the deprecated spellings of renamed
options: each still works for one release, counts as the new flag and warns on one stderr line."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from noiserater.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"

# name -> (kinds the option may take, what it means). Kinds: flag, int, float, text, choice, file (a file path),
# dir (a folder path), path (either). Options generated from a config dataclass are `text` where a path is meant.
# A new option must be added here, with a meaning no other name already has.
MEANINGS: dict[str, tuple[set[str], str]] = {
    "--ablation": ({"text"}, "rater input ablation"),
    "--amp": ({"flag"}, "bf16 autocast"),
    "--as-json": ({"flag"}, "print the result as JSON on stdout"),
    "--assignment-batch-sizes": ({"text"}, "comma-separated images per process at which to time the exact assignment"),
    "--batch-size": ({"int"}, "images (or samples) per batch / forward"),
    "--cache-dir": ({"text", "dir"}, "cache folder for classifiers and reference statistics"),
    "--candidates": ({"int"}, "k: candidate noises per image"),
    "--candidates-list": ({"text"}, "comma-separated candidate counts k"),
    "--carry-inner": ({"flag"}, "carry the inner weights across outer steps"),
    "--cfg-scale": ({"float"}, "classifier-free guidance scale"),
    "--channels": ({"int"}, "image/latent channels"),
    "--checkpoint": ({"file", "text"}, "a diffusion checkpoint"),
    "--checkpoints": ({"text"}, "comma-separated diffusion checkpoints"),
    "--chunk": ({"int"}, "memory knob: groups per forward-mode product"),
    "--ckpt-every": ({"int"}, "checkpoint interval in steps"),
    "--classes": ({"int"}, "number of classes"),
    "--clock": ({"choice"}, "benchmark clock"),
    "--compile": ({"flag"}, "torch.compile"),
    "--config": ({"file"}, "a YAML file of options"),
    "--continue-steps": ({"int"}, "continuation length in optimiser steps"),
    "--data": ({"text", "dir"}, "a dataset source (name, image folder or latent cache)"),
    "--device": ({"text"}, "torch device: auto, cpu, cuda or cuda:N"),
    "--distill-oracle": ({"text"}, "distillation oracle"),
    "--distill-temperature": ({"float"}, "temperature of the distillation target"),
    "--distill-val-batch-size": ({"int"}, "validation draws per distillation step"),
    "--dtype": ({"choice"}, "storage dtype of latents"),
    "--ema": ({"flag"}, "use the checkpoint's EMA weights"),
    "--ema-decay": ({"float"}, "EMA decay"),
    "--ema-warmup": ({"flag"}, "EMA warmup"),
    "--eval-batches": ({"int"}, "held-out batches per evaluation"),
    "--eval-draws": ({"int"}, "draws per held-out image"),
    "--eval-every": ({"int"}, "held-out evaluation interval"),
    "--extractors": ({"text"}, "comma-separated feature extractors"),
    "--figure": ({"file"}, "a PNG file to write"),
    "--flip": ({"flag"}, "also store mirrored images"),
    "--grad-checkpointing": ({"flag"}, "activation checkpointing"),
    "--grad-clip": ({"float"}, "gradient-norm clip"),
    "--groups": ({"int"}, "training groups compared"),
    "--heldout-fraction": ({"float"}, "share of validation kept for held-out evaluation"),
    "--image-size": ({"int"}, "image/latent side"),
    "--implicit-alpha": ({"float"}, "Neumann step size of the implicit meta-gradient"),
    "--memory-budget": ({"int"}, "inner steps whose graph the reverse meta-gradient keeps"),
    "--implicit-damping": ({"float"}, "damping added to the Hessian of the implicit meta-gradient"),
    "--implicit-iterations": ({"int"}, "Hessian-vector products per implicit solve"),
    "--inception-weights": ({"text", "file"}, "InceptionV3 weights file"),
    "--init-checkpoint": ({"text", "file"}, "diffusion checkpoint to continue from"),
    "--inner-lr": ({"float", "text"}, "inner learning rate"),
    "--inner-optimizer": ({"text", "choice"}, "inner optimiser"),
    "--inner-steps": ({"int"}, "S: inner steps per outer step"),
    "--inner-steps-list": ({"text"}, "comma-separated inner step counts S"),
    "--json": ({"file"}, "a JSON file to write"),
    "--key": ({"text"}, "metric key of log lines"),
    "--label-dropout": ({"float"}, "label dropout probability"),
    "--labels": ({"text"}, "class labels of generated samples"),
    "--latent": ({"choice"}, "posterior sample or mean"),
    "--latent-size": ({"int"}, "latent side of a synthetic cache"),
    "--learn-sigma": ({"flag"}, "2C output channels"),
    "--log-every": ({"int"}, "log interval"),
    "--logit-mean": ({"float"}, "flow: mean of the logit-normal time distribution"),
    "--logit-std": ({"float"}, "flow: std of the logit-normal time distribution"),
    "--loop-steps": ({"int"}, "steps of the timed train() loop"),
    "--lr": ({"float"}, "learning rate"),
    "--max-bad-steps": ({"int"}, "non-finite steps tolerated in a row"),
    "--max-images": ({"int"}, "images encoded per call"),
    "--memory": ({"flag"}, "measure peak memory"),
    "--meta-config": ({"text", "file"}, "a MetaTrainConfig YAML file"),
    "--meta-outer-steps": ({"int"}, "outer steps of each short meta-training"),
    "--method": ({"text"}, "meta-gradient method"),
    "--methods": ({"text"}, "comma-separated meta-gradient methods"),
    "--model": ({"text"}, "DiT architecture"),
    "--num-images": ({"int"}, "N: dataset images drawn for an analysis"),
    "--num-noises": ({"int"}, "M: noises scored per image in an analysis"),
    "--num-records": ({"int"}, "records of a synthetic cache"),
    "--num-samples": ({"int"}, "number of generated samples"),
    "--objective": ({"text"}, "diffusion training objective (ddpm or flow)"),
    "--meta-objective": ({"text"}, "meta-training objective (bilevel or distill)"),
    "--online-batch-size": ({"int"}, "rater_online: images per distillation step"),
    "--online-every": ({"int"}, "rater_online: refresh interval"),
    "--online-lr": ({"float"}, "rater_online: distillation learning rate"),
    "--online-rater-arch": ({"text"}, "rater_online: rater architecture"),
    "--online-steps": ({"int"}, "rater_online: distillation steps per refresh"),
    "--optimizer": ({"text", "choice"}, "optimiser"),
    "--oracle-every": ({"int"}, "oracle refresh interval"),
    "--oracle-val-batch-size": ({"int"}, "oracle: validation triples per gradient"),
    "--out": ({"dir", "text"}, "the output folder of the command"),
    "--outer-batches": ({"int"}, "outer batches measured per setting"),
    "--outer-steps": ({"int"}, "rater updates"),
    "--patience": ({"int"}, "early-stopping patience"),
    "--planted-scale": ({"float"}, "planted-candidate scale"),
    "--policy": ({"text"}, "noise-selection policy"),
    "--pr-k": ({"int"}, "k of the precision/recall k-NN"),
    "--preset": ({"text"}, "study preset"),
    "--pretrain-steps": ({"int"}, "pretraining length in optimiser steps"),
    "--progress": ({"flag"}, "progress bars"),
    "--rater": ({"text", "file"}, "a rater checkpoint file"),
    "--rater-arch": ({"text"}, "a rater architecture name"),
    "--rater-archs": ({"text"}, "comma-separated rater architecture names"),
    "--record": ({"flag"}, "append records to eval.jsonl"),
    "--reference": ({"text"}, "reference images for FID"),
    "--reference-max-images": ({"int"}, "cap on reference images"),
    "--reference-split": ({"text"}, "split of the reference"),
    "--reference-workers": ({"int"}, "reference decoding workers"),
    "--repeats": ({"int"}, "times each benchmark measurement is repeated"),
    "--report-only": ({"flag"}, "only rewrite the report"),
    "--resolution": ({"int"}, "pixel resolution of encoded images"),
    "--resume": ({"flag"}, "continue the run in --run-dir"),
    "--run-dir": ({"text", "dir"}, "the folder of one training run"),
    "--sample-every": ({"int"}, "sample-grid interval"),
    "--sample-steps": ({"int"}, "sampling steps (DDIM, or Euler/Heun for flow)"),
    "--sampler": ({"text", "choice"}, "sampler of generated samples (ddim, euler, heun)"),
    "--seed": ({"int"}, "random seed"),
    "--seeds": ({"int"}, "number of seeds (0..N-1)"),
    "--set": ({"text"}, "preset field override"),
    "--setups": ({"text"}, "comma-separated benchmark setups"),
    "--smooth-window": ({"int"}, "rolling-mean window"),
    "--soft-candidates-list": ({"text"}, "comma-separated candidate counts k for rater_soft"),
    "--soft-rater-archs": ({"text"}, "comma-separated rater architectures for rater_soft"),
    "--source-log": ({"file"}, "metrics.jsonl of the source run"),
    "--source-step": ({"int"}, "source training step"),
    "--split": ({"text"}, "dataset split"),
    "--split-seed": ({"int"}, "seed of the data split"),
    "--stability-window": ({"int"}, "stability window"),
    "--steps": ({"int"}, "optimiser (training) steps"),
    "--sweep-lrs": ({"text"}, "comma-separated inner lrs of the sweep"),
    "--sweep-steps": ({"int"}, "outer batches per lr of the sweep"),
    "--target-log": ({"file"}, "metrics.jsonl of the target run"),
    "--temperature": ({"float"}, "softmax temperature of rater scores"),
    "--noise-scale": ({"float"}, "multiply every chosen noise by C"),
    "--input-perturbation": ({"float"}, "DDPM-IP gamma: x_t from eps + gamma * xi"),
    "--publish": ({"dir"}, "copy a study's small artefacts to this folder"),
    "--jobs": ({"int"}, "runs in parallel worker processes"),
    "--tensorboard": ({"flag"}, "TensorBoard logs"),
    "--test-fraction": ({"float"}, "test split fraction"),
    "--tf32": ({"flag"}, "TF32 matmuls"),
    "--threads": ({"int"}, "torch CPU threads"),
    "--timeout": ({"int"}, "seconds per configuration"),
    "--time-sampling": ({"text"}, "flow: time distribution (uniform or logit-normal)"),
    "--timesteps": ({"int"}, "number of normalised timesteps"),
    "--unconditional": ({"flag"}, "train without labels"),
    "--vae": ({"text", "path"}, "a VAE folder"),
    "--val-batch-size": ({"int"}, "validation images per batch"),
    "--val-fraction": ({"float"}, "validation split fraction"),
    "--val-images": ({"int"}, "validation draw size"),
    "--warmup": ({"int"}, "untimed warm-up steps"),
    "--weight-decay": ({"float"}, "weight decay"),
    "--workers": ({"int"}, "image-decoding worker processes"),
}

# What the help of an ambiguous name must (and must not) say, so the meaning stays the one in docs/cli.md.
HELP_MUST = {
    "--rater": r"[Cc]heckpoint",
    "--rater-arch": r"[Aa]rchitecture|Rater-\{",
    "--sample-steps": r"DDIM",
    "--candidates": r"\b[kK]\b",
    "--out": r"[Ff]older",
    "--json": r"JSON",
    "--as-json": r"JSON",
    "--cfg-scale": r"1\.25|default 1\b",  # the default and why it is that
}
HELP_MUST_NOT = {"--steps": r"DDIM", "--out": r"\bfile\b", "--rater": r"[Aa]rchitecture|\bconfig\b"}


def _kind(p: click.Option) -> str:
    t = p.type
    if p.is_flag:
        return "flag"
    if isinstance(t, click.Path):
        return "file" if not t.dir_okay else "dir" if not t.file_okay else "path"
    if isinstance(t, click.IntRange) or t is click.INT:
        return "int"
    if isinstance(t, click.FloatRange) or t is click.FLOAT:
        return "float"
    if isinstance(t, click.Choice):
        return "choice"
    return "text"


def _commands(cmd=main, path=()):
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(click.Context(cmd)):
            yield from _commands(cmd.get_command(click.Context(cmd), name), (*path, name))
    else:
        yield " ".join(path), cmd


def _cmd(*path):
    cmd = main
    for p in path:
        cmd = cmd.get_command(click.Context(cmd), p)
    return cmd


ALL = list(_commands())


def test_every_command_is_walked():
    names = {n for n, _ in ALL}
    for n in ("demo", "train", "sample", "metatrain", "signal check", "evaluate", "analyze rater", "analyze stages",
              "analyze match-stage", "reproduce", "evidence", "report", "cache-latents", "bench loader",
              "bench metagrad", "bench selection", "bench train", "bench implicit"):
        assert n in names, n


@pytest.mark.parametrize("name,cmd", ALL, ids=[n for n, _ in ALL])
def test_each_option_name_has_one_meaning(name, cmd):
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.hidden:
            continue
        flag = p.opts[0]
        assert flag in MEANINGS, f"{name}: {flag} is not in the naming table (tests/test_cli_names.py, docs/cli.md)"
        kinds, meaning = MEANINGS[flag]
        assert _kind(p) in kinds, f"{name} {flag}: a {_kind(p)}, but {flag} means {meaning} ({kinds})"
        if flag in HELP_MUST:
            assert re.search(HELP_MUST[flag], p.help or ""), f"{name} {flag}: help does not say {meaning}: {p.help}"
        if flag in HELP_MUST_NOT:
            assert not re.search(HELP_MUST_NOT[flag], p.help or ""), f"{name} {flag}: {p.help}"
        for other in p.secondary_opts:
            assert other == "--no-" + flag[2:], f"{name}: {flag}/{other}"


def _aliases():
    for name, cmd in ALL:
        for p in cmd.params:
            if isinstance(p, click.Option) and p.hidden and getattr(p, "deprecated_for", None):
                yield name, "/".join(p.opts + p.secondary_opts), p.deprecated_for


def test_hidden_options_are_deprecated_aliases_listed_in_the_docs():
    for name, cmd in ALL:
        for p in cmd.params:
            if isinstance(p, click.Option) and p.hidden and p.name != "child":  # --child: bench metagrad's worker
                assert getattr(p, "deprecated_for", None), f"{name}: hidden option {p.opts} is not a deprecated alias"
    docs = DOCS.read_text()
    for name, old, new in _aliases():
        first = old.split("/")[0]
        assert re.search(rf"`{re.escape(first)}[`/ ].*`{re.escape(new)}", docs), f"docs/cli.md: {name} {old} -> {new}"


# (command, old argv, new argv, where the value lands, the value). `cfg.x`: a config field, else a parameter.
ALIASES = [
    ("train", ["--online-rater", "Rater-T/2"], ["--online-rater-arch", "Rater-T/2"], "cfg.online_rater", "Rater-T/2"),
    ("train", ["--online-batch", "7"], ["--online-batch-size", "7"], "cfg.online_batch", 7),
    ("train", ["--oracle-val-batch", "9"], ["--oracle-val-batch-size", "9"], "cfg.oracle_val_batch", 9),
    ("metatrain", ["--rater", "Rater-T/2"], ["--rater-arch", "Rater-T/2"], "cfg.rater", "Rater-T/2"),
    ("metatrain", ["--use-ema"], ["--ema"], "cfg.use_ema", True),
    ("metatrain", ["--objective", "distill"], ["--meta-objective", "distill"], "cfg.objective", "distill"),
    ("signal check", ["--k", "3"], ["--candidates", "3"], "cfg.k", 3),
    ("signal check", ["--use-ema"], ["--ema"], "cfg.use_ema", True),
    ("evaluate", ["--steps", "7"], ["--sample-steps", "7"], "cfg.steps", 7),
    ("evaluate", ["--json"], ["--as-json"], "as_json", True),
    ("analyze stages", ["--rater", "Rater-N/4"], ["--rater-arch", "Rater-N/4"], "cfg.rater", "Rater-N/4"),
    ("sample", ["--num", "5"], ["--num-samples", "5"], "num", 5),
    ("sample", ["--steps", "7"], ["--sample-steps", "7"], "steps", 7),
    ("report", ["--k", "4"], ["--candidates", "4"], "k", 4),
    ("bench loader", ["--cache", "c"], ["--data", "c"], "cache", "c"),
    ("bench loader", ["--num", "128"], ["--num-records", "128"], "num", 128),
    ("bench loader", ["--out", "b.json"], ["--json", "b.json"], "out", "b.json"),
    ("bench train", ["--configs", "digits-tiny"], ["--setups", "digits-tiny"], "configs", "digits-tiny"),
    ("bench train", ["--rounds", "2"], ["--repeats", "2"], "rounds", 2),
    ("bench train", ["--out", "b.json"], ["--json", "b.json"], "out", "b.json"),
    ("bench selection", ["--input-size", "8"], ["--image-size", "8"], "input_size", 8),
    ("bench selection", ["--batch", "3"], ["--batch-size", "3"], "batch", 3),
    ("bench selection", ["--raters", "Rater-N/2"], ["--rater-archs", "Rater-N/2"], "raters", "Rater-N/2"),
    ("bench selection", ["--k", "1,2"], ["--candidates-list", "1,2"], "ks", "1,2"),
    ("bench selection", ["--soft-raters", "Rater-N/2"], ["--soft-rater-archs", "Rater-N/2"], "soft_raters", "Rater-N/2"),
    ("bench selection", ["--soft-k", "2"], ["--soft-candidates-list", "2"], "soft_ks", "2"),
    ("bench metagrad", ["--steps", "1,2"], ["--inner-steps-list", "1,2"], "steps", "1,2"),
    ("bench metagrad", ["--rater", "Rater-T/2"], ["--rater-arch", "Rater-T/2"], "rater", "Rater-T/2"),
    ("bench metagrad", ["--batch", "3"], ["--batch-size", "3"], "batch", 3),
    ("bench metagrad", ["--plot", "m.png"], ["--figure", "m.png"], "figure_path", "m.png"),
]
REQUIRED = {"sample": ["--checkpoint", "x.pt"], "metatrain": ["--checkpoint", "x.pt"], "evaluate": ["--checkpoint", "x.pt"],
            "signal check": ["--checkpoint", "x.pt"], "analyze stages": ["--checkpoints", "a.pt,b.pt"],
            "bench selection": ["--json", "s.json"]}


def _stub(monkeypatch, cmd) -> dict:
    """Replace the command's body (below the option wrappers) with one that records its arguments."""
    f = cmd.callback
    while hasattr(getattr(f, "__wrapped__", None), "__wrapped__"):
        f = f.__wrapped__
    assert hasattr(f, "__wrapped__"), "the command has no option wrapper"
    seen: dict = {}
    monkeypatch.setattr(f, "__wrapped__", lambda *a, **kw: seen.update(kw))
    return seen


def _run(monkeypatch, tmp_path, name, argv):
    seen = _stub(monkeypatch, _cmd(*name.split()))
    pos = [str(tmp_path)] if name == "report" else []
    r = CliRunner().invoke(main, [*name.split(), *pos, *REQUIRED.get(name, []), *argv])
    return r, seen


def _value(seen, where):
    return getattr(seen["cfg"], where[4:]) if where.startswith("cfg.") else seen[where]


def test_the_alias_table_covers_every_alias():
    assert {(n, o.split("/")[0]) for n, o, _ in _aliases()} == {(n, old[0]) for n, old, *_ in ALIASES}


@pytest.mark.parametrize("name,old,new,where,value", ALIASES, ids=[f"{a[0]} {a[1][0]}" for a in ALIASES])
def test_deprecated_alias_works_and_warns(monkeypatch, tmp_path, name, old, new, where, value):
    r, seen = _run(monkeypatch, tmp_path, name, new)
    assert r.exit_code == 0, r.output
    assert _value(seen, where) == value and "deprecated" not in r.output
    r, seen = _run(monkeypatch, tmp_path, name, old)
    assert r.exit_code == 0, r.output
    assert _value(seen, where) == value
    warnings = [ln for ln in r.stderr.splitlines() if "deprecated" in ln]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {old[0]}") and f"use {new[0]}" in warnings[0], r.stderr
    assert "deprecated" not in r.stdout
    r, _ = _run(monkeypatch, tmp_path, name, [*old, *new])
    assert r.exit_code == 2 and "not both" in r.output


def test_deprecated_boolean_alias_off_spelling(monkeypatch, tmp_path):
    r, seen = _run(monkeypatch, tmp_path, "signal check", ["--no-use-ema"])
    assert r.exit_code == 0 and seen["cfg"].use_ema is False
    assert "--use-ema/--no-use-ema is deprecated, use --ema/--no-ema" in r.stderr


def test_renamed_config_fields_keep_their_yaml_keys(monkeypatch, tmp_path):
    """A config.yaml of an earlier release (keys = field names) still loads; the error names the new flag."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("checkpoint: x.pt\nrater: Rater-T/2\nuse_ema: true\n")
    r, seen = _run(monkeypatch, tmp_path, "metatrain", ["--config", str(cfg)])
    assert r.exit_code == 0 and seen["cfg"].rater == "Rater-T/2" and seen["cfg"].use_ema is True
    r = CliRunner().invoke(main, ["signal", "check", "--checkpoint", "x.pt", "--candidates", "1"])
    assert r.exit_code == 2 and "--candidates" in r.output and "--k" not in r.output
