"""The import cycles that were removed stay removed: the shared piece lives in the lower module."""

from __future__ import annotations

import ast
from pathlib import Path

import noiserater

SRC = Path(noiserater.__file__).parent


def _imports(module: str) -> set[str]:
    """Relative module names a source file imports anywhere (top level or inside functions)."""
    path = SRC / (module.replace(".", "/") + ".py")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            out.add(node.module or "")
            out.update(f"{node.module}.{a.name}" if node.module else a.name for a in node.names)
    return out


def test_lower_modules_do_not_import_the_modules_above_them():
    assert not {"experiments", "experiments.ReproducePreset"} & _imports("presets")  # experiments <- presets
    assert not {n for n in _imports("data.latents") if n.startswith("datasets")}  # datasets <- latents
    assert not {n for n in _imports("data.types") if n.startswith(("datasets", "latents"))}
    assert not {n for n in _imports("evidence_report") if n.split(".")[0] == "evidence"}  # evidence <- report
    assert not _imports("evidence_arms")  # below both


def test_moved_names_still_import_from_their_old_modules():
    from noiserater.data.datasets import IMAGE_EXTENSIONS, DatasetError, ImageData
    from noiserater.data.types import ImageData as TypesImageData
    from noiserater.evidence import ARMS, BANDS
    from noiserater.experiments import PRESETS, ReproducePreset, get_preset
    from noiserater.presets import FULL_SCALE_PRESETS

    assert ImageData is TypesImageData and issubclass(DatasetError, ValueError) and ".png" in IMAGE_EXTENSIONS
    assert "vanilla" in ARMS and BANDS[0] == (0, 100)
    assert {"digits-quick", "digits", "fashion-mnist"} | set(FULL_SCALE_PRESETS) == set(PRESETS)
    assert isinstance(get_preset("digits"), ReproducePreset)
