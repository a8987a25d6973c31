"""Packaging: license, citation, changelog, typed marker, dependencies/extras, version provenance, and a
training run without the optional tensorboard."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

import noiserater
from noiserater.run.provenance import git_commit, version_info, version_line

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_mit_spdx_and_shipped():
    proj = pyproject()["project"]
    assert proj["license"] == "MIT"  # an SPDX expression, not the deprecated {text = ...} table
    assert proj["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the noiserater authors" in text
    assert "License :: OSI Approved :: MIT License" not in proj["classifiers"]  # PEP 639: no license classifier


def test_py_typed_ships_as_package_data():
    assert (ROOT / "src" / "noiserater" / "py.typed").is_file()
    assert "py.typed" in pyproject()["tool"]["setuptools"]["package-data"]["noiserater"]
    assert "Typing :: Typed" in pyproject()["project"]["classifiers"]


def test_dependencies_and_extras():
    proj = pyproject()["project"]
    names = lambda reqs: {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in reqs}  # noqa: E731
    core = names(proj["dependencies"])
    assert "safetensors" not in core and "tensorboard" not in core
    extras = proj["optional-dependencies"]
    assert names(extras["tb"]) == {"tensorboard"}
    # everything the tests import beyond the core dependencies
    assert {"pytest", "hypothesis", "diffusers", "torchmetrics", "tensorboard"} <= names(extras["test"])
    src = "\n".join(p.read_text() for p in (ROOT / "src").rglob("*.py"))
    assert "import safetensors" not in src and "from safetensors" not in src


def test_version_single_source_and_installed_metadata():
    assert pyproject()["project"]["dynamic"] == ["version"]
    assert pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "noiserater.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", noiserater.__version__)
    import importlib.metadata

    try:
        installed = importlib.metadata.version("noiserater")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("noiserater not installed (PYTHONPATH=src)")
    assert installed == noiserater.__version__


def test_citation_cites_paper_and_software():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["version"] == noiserater.__version__ and cff["license"] == "MIT"
    paper = cff["preferred-citation"]
    assert paper["title"] == "NoiseRater: Meta-Learned Noise Valuation for Diffusion Model Training"
    assert "2605.08144" in paper["url"]
    authors = [(a["given-names"], a["family-names"]) for a in paper["authors"]]
    assert len(authors) == 20 and authors[0] == ("Fang", "Wu") and authors[-1] == ("Yejin", "Choi")


def test_changelog_has_current_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text
    assert f"## [{noiserater.__version__}]" in text


def test_version_info_fields():
    info = version_info()
    assert set(info) == {"noiserater", "git_commit", "torch"}
    assert info["noiserater"] == noiserater.__version__
    import torch

    assert info["torch"] == torch.__version__
    json.dumps(info)  # goes into JSON run records
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert info["git_commit"].split("+")[0] == head
    assert version_line(info).startswith(f"noiserater {noiserater.__version__}")


def test_git_commit_none_outside_a_repository(tmp_path):
    assert git_commit(tmp_path) is None
    assert version_line({"noiserater": "9.9.9", "git_commit": None, "torch": None}) == "noiserater 9.9.9, torch unknown"
    line = version_line({"noiserater": "1.0.0", "git_commit": "a" * 40 + "+dirty", "torch": "2.13.0"})
    assert line == "noiserater 1.0.0 (git aaaaaaaaaaaa+dirty), torch 2.13.0"


def test_train_without_tensorboard_warns_once_and_logs_metrics(tmp_path, monkeypatch, capsys):
    from noiserater.train import TrainConfig, train

    for mod in [m for m in sys.modules if m == "tensorboard" or m.startswith(("tensorboard.", "torch.utils.tensorboard"))]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    run = tmp_path / "run"
    train(TrainConfig(run_dir=str(run), data="digits", model="DiT-N/2", batch_size=8, steps=2, log_every=1,
                      sample_every=1000, ckpt_every=1000, sample_steps=2, tensorboard=True, progress=False))
    err = capsys.readouterr().err
    assert err.count("tensorboard is not installed") == 1
    assert [json.loads(s)["step"] for s in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (run / "tb").exists()


def test_top_level_namespace_exports_the_scripting_api():
    import noiserater
    from noiserater.selection import NoiseSelector
    from noiserater.study.evidence import evidence
    from noiserater.train import train

    for name in ("TrainConfig", "MetaTrainConfig", "meta_gradient", "NoiseSelector", "build_dit", "build_rater",
                 "load_diffusion", "load_rater", "evaluate_checkpoint", "reproduce", "evidence"):
        assert callable(getattr(noiserater, name)), name
    assert noiserater.NoiseSelector is NoiseSelector and getattr(noiserater, "evidence") is evidence
    import noiserater.train as train_module

    assert train_module.train is train and not callable(train_module)  # a plain module, no shim
    import pytest

    with pytest.raises(AttributeError):
        noiserater.no_such_thing
