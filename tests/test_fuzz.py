"""Fuzzing what users type and point at: every failure must be one of our clear error types with a
message (ConfigError / DatasetError / CheckpointError / a click usage error), never a traceback from deep
inside torch, numpy, PIL or PyYAML.

- every numeric option of every command is range-checked (negative, NaN, inf values);
- config dicts and YAML files (random keys, types, values, text and bytes) -> ConfigError naming a key;
- image folders of random junk, random sizes and modes, corrupt PNG bytes -> DatasetError or good data;
- IDX (Fashion-MNIST) files of random bytes -> DatasetError or a correct array;
- latent-cache headers with random fields -> DatasetError;
- checkpoints with random byte damage -> CheckpointError or a load.

The number of examples per property is NOISERATER_FUZZ_EXAMPLES (default 40); with
NOISERATER_RELIABILITY_JSON set, the counts run are appended to that file (scripts/reliability_report.py).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import struct
import tempfile
from pathlib import Path

import click
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noiserater.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from noiserater.cli import main
from noiserater.config import ConfigError, dump_yaml, from_dict, load_yaml, to_dict
from noiserater.data.datasets import _read_idx, load_fashion_mnist, load_image_folder, load_source
from noiserater.data.types import DatasetError
from noiserater.models.loading import load_rater, save_rater

EXAMPLES = int(os.environ.get("NOISERATER_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def record(name: str, **values) -> None:
    path = os.environ.get("NOISERATER_RELIABILITY_JSON")
    if not path:
        return
    p = Path(path)
    data = json.loads(p.read_text()) if p.exists() else {}
    data.setdefault(name, []).append(values)
    p.write_text(json.dumps(data, indent=2))


def all_commands(group: click.Group = main, prefix: tuple = ()):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, prefix + (name,))
        elif cmd is not None:
            yield prefix + (name,), cmd


def config_classes() -> list[type]:
    """The config dataclass behind every config-backed command (``config_options``)."""
    out = []
    for _, cmd in all_commands():
        cls = getattr(cmd.callback, "config_class", None)
        if cls is not None and cls not in out:
            out.append(cls)
    return out


CONFIG_CLASSES = config_classes()


# ---- every numeric option is range-checked ----------------------------------------------------------------

# Numeric options whose negative values are meaningful. Empty: none so far.
NEGATIVE_OK: set[tuple[str, str]] = set()
NUMERIC = (click.types.IntParamType, click.types.FloatParamType)


def _rejected(cmd: click.Command, path: tuple, opt: click.Option, value: str) -> str | None:
    """The error that rejects ``--opt value`` (None if the value is accepted). Parsing and click's range
    checks run first; for a config-backed command the value then goes through from_dict/validate,
    exactly as the command's wrapper does, without starting any work."""
    flag = opt.opts[0]
    args = [flag, value]
    for other in cmd.params:  # required options get a harmless value
        if other.required and other is not opt:
            args += [other.opts[0], "x.json" if "json" in other.name else "x"]
    try:
        ctx = cmd.make_context(" ".join(path), args)
    except click.UsageError as e:
        return e.format_message()
    except click.exceptions.Exit:
        return None
    cls = getattr(cmd.callback, "config_class", None)
    if cls is None:
        return None
    try:
        from_dict(cls, {**minimal_config(cls), opt.name: ctx.params[opt.name]})
    except ConfigError as e:
        return str(e)
    return None


def minimal_config(cls) -> dict:
    """The fewest keys that make ``cls`` valid: fill required path-like keys (empty or None by default) that
    validate() asks for, one at a time."""
    import dataclasses

    base: dict = {}
    empty = {f.name for f in dataclasses.fields(cls) if f.default == "" or f.default is None}
    for _ in range(len(empty) + 1):
        try:
            from_dict(cls, base)
            return base
        except ConfigError as e:
            key = next((k for k in empty if str(e).startswith(f"invalid {k}:")), None)
            if key is None or key in base:
                raise
            base[key] = "x"
    return base


def _numeric_options():
    for path, cmd in all_commands():
        for opt in cmd.params:
            if isinstance(opt, click.Option) and isinstance(opt.type, NUMERIC) and not opt.is_flag:
                yield path, cmd, opt


def test_every_numeric_option_rejects_negative_nan_and_inf_values():
    accepted, checked = [], 0
    for path, cmd, opt in _numeric_options():
        bad = [] if (path[-1], opt.name) in NEGATIVE_OK else ["-1000000"]
        if isinstance(opt.type, click.types.FloatParamType):
            bad += ["nan", "inf", "-inf"]
        if opt.name == "seed" or opt.name.endswith("_seed"):
            bad += [str(2**70)]  # would overflow deep inside torch.manual_seed
        for value in bad:
            checked += 1
            msg = _rejected(cmd, path, opt, value)
            if msg is None:
                accepted.append(f"noiserater {' '.join(path)} {opt.opts[0]} {value}")
            else:  # the message names the option (or its config key)
                assert opt.name in msg or opt.opts[0] in msg or opt.name.replace("_", "-") in msg, msg
    assert checked > 50
    assert not accepted, "accepted bad values:\n" + "\n".join(accepted)
    record("cli_option_range_checks", values_checked=checked)


def test_train_rejects_bad_values_end_to_end(tmp_path):
    """Through the real command: exit code 2, one message naming the option, no run folder created."""
    from click.testing import CliRunner

    cases = {"--batch-size": "0", "--steps": "-1", "--lr": "0", "--candidates": "0", "--ema-decay": "1",
             "--label-dropout": "1", "--val-fraction": "0", "--temperature": "0", "--log-every": "0",
             "--ckpt-every": "0", "--sample-every": "0", "--sample-steps": "0", "--max-bad-steps": "0",
             "--cfg-scale": "-1", "--grad-clip": "-1", "--seed": "-1", "--weight-decay": "-1"}
    for flag, value in cases.items():
        run = tmp_path / flag.strip("-")
        res = CliRunner().invoke(main, ["train", "--run-dir", str(run), flag, value])
        assert res.exit_code == 2, (flag, res.output)
        assert flag.strip("-").replace("-", "_") in res.output, (flag, res.output)
        assert "Traceback" not in res.output
        assert not run.exists()


def test_image_size_not_divisible_by_the_patch_size(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((7, 7), 40 * i, np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    res = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "imgs"), "--model", "DiT-N/2", "--steps", "1",
                                    "--run-dir", str(tmp_path / "run"), "--no-tensorboard", "--no-progress"])
    assert res.exit_code == 2, res.output
    assert "not divisible by the patch size" in res.stderr and "\n" not in res.stderr.strip()


# ---- config dicts and YAML files --------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(["auto", "", "1e-3", "nan"]),
)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                      max_leaves=5)


def _plausible(cls) -> st.SearchStrategy:
    """Mostly known keys with values near their valid ranges, plus junk keys and junk values."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(cls)]
    near = st.one_of(st.integers(min_value=-3, max_value=10), st.floats(min_value=-2, max_value=2),
                     st.sampled_from([0, 1, 1.0, 0.5, 1e-4, 1e9, -0.0, True, False]))
    key = st.one_of(st.sampled_from(names), st.sampled_from(names), st.text(max_size=8), st.integers(),
                    st.sampled_from([n.replace("_", "-") for n in names]))
    return st.dictionaries(key, st.one_of(near, values), max_size=6)


def _check_config_result(cls, data: dict, fn, file: Path | None = None) -> str:
    """``fn()`` builds a config: it must give a valid ``cls`` or a ConfigError naming the key (or, for a file
    that is not a YAML mapping at all, the file)."""
    import dataclasses

    try:
        obj = fn()
    except ConfigError as e:
        msg = str(e)
        names = [f.name for f in dataclasses.fields(cls)] + [str(k) for k in data] + [repr(k) for k in data]
        assert msg and "\n" not in msg, msg
        assert any(n and n in msg for n in names) or (file is not None and f"config file {file} " in msg), msg
        return "error"
    assert isinstance(obj, cls)
    again = from_dict(cls, yaml.safe_load(dump_yaml(obj)))  # a valid config survives config.yaml
    assert to_dict(again) == to_dict(obj)
    return "ok"


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_config_dicts_fuzz(cls):
    assert CONFIG_CLASSES, "no config-backed commands found"
    seen = {"ok": 0, "error": 0}

    @FUZZ
    @given(data=_plausible(cls))
    def prop(data):
        seen[_check_config_result(cls, data, lambda: from_dict(cls, dict(data)))] += 1

    prop()
    assert seen["ok"] + seen["error"] >= min(EXAMPLES, 10)
    record("fuzz_config_dicts", config=cls.__name__, examples=seen["ok"] + seen["error"], **seen)


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_config_yaml_files_fuzz(cls):
    seen = {"ok": 0, "error": 0}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"

        @FUZZ
        @given(content=st.one_of(
            st.text(max_size=200),
            st.binary(max_size=200),
            _plausible(cls).map(lambda x: yaml.safe_dump(x, allow_unicode=True)),
            st.sampled_from(["[" * 3000, "a: " + "[" * 3000, "!!python/object/apply:os.system ['true']",
                             "a: &x [*x]", "\ufeffsteps: 1", "- 1\n- 2", "steps: !!binary aGVsbG8=", "lr: .nan",
                             "lr: .inf", "lr: 1e400", "steps: 0x10", "seed: 1_000", "\x00"]),
        ))
        def prop(content):
            path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
            seen[_check_config_result(cls, {}, lambda: load_yaml(cls, path), file=path)] += 1

        prop()
    record("fuzz_config_yaml", config=cls.__name__, examples=seen["ok"] + seen["error"], **seen)


# ---- image folders ------------------------------------------------------------------------------------------

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "F", "CMYK"]
FORMATS = {".png": "PNG", ".bmp": "BMP", ".gif": "GIF", ".tiff": "TIFF", ".jpg": "JPEG", ".webp": "WEBP"}


@st.composite
def image_file(draw):
    """(relative name, bytes) of one file in a class folder: a real image, a damaged one, or junk."""
    kind = draw(st.sampled_from(["image", "image", "image", "truncated", "flipped", "junk", "empty", "other"]))
    ext = draw(st.sampled_from(list(FORMATS) + [".PNG", ".jpeg"]))
    name = draw(st.text("abcxyz019_", min_size=1, max_size=6)) + ext
    if draw(st.booleans()):
        name = draw(st.sampled_from(["sub/", ".hidden/", "a/b/"])) + name
    if kind == "junk":
        return name, draw(st.binary(max_size=300))
    if kind == "empty":
        return name, b""
    if kind == "other":
        return name.rsplit(".", 1)[0] + ".txt", draw(st.binary(max_size=50))
    w = draw(st.integers(1, 12))
    h = w if draw(st.integers(0, 4)) else draw(st.integers(1, 12))
    mode = draw(st.sampled_from(MODES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    from PIL import Image

    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    fmt = FORMATS.get(ext.lower().replace(".jpeg", ".jpg"), "PNG")
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):
        img.convert("RGB").save(buf, format=fmt)
    data = buf.getvalue()
    if kind == "truncated":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif kind == "flipped":
        arr = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            arr[draw(st.integers(0, len(arr) - 1))] = draw(st.integers(0, 255))
        data = bytes(arr)
    return name, data


@st.composite
def image_tree(draw):
    classes = draw(st.lists(st.text("abcdefgh", min_size=1, max_size=4), min_size=0, max_size=3, unique=True))
    tree = {c: draw(st.lists(image_file(), max_size=5)) for c in classes}
    loose = draw(st.lists(image_file(), max_size=2))  # files next to the class folders
    return tree, loose


def _check_image_data(data) -> None:
    x = data.images
    assert x.dtype == torch.float32 and x.dim() == 4 and x.shape[1] in (1, 3) and x.shape[2] == x.shape[3]
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    assert data.labels.shape == (x.shape[0],) and int(data.labels.max()) < data.num_classes


def test_image_folder_fuzz():
    seen = {"ok": 0, "error": 0}

    @FUZZ
    @given(tree=image_tree())
    def prop(tree):
        classes, loose = tree
        with tempfile.TemporaryDirectory() as d:
            root = Path(d) / "data"
            root.mkdir()
            for c, files in classes.items():
                (root / c).mkdir(exist_ok=True)
                for name, data in files:
                    (root / c / name).parent.mkdir(parents=True, exist_ok=True)
                    (root / c / name).write_bytes(data)
            for name, data in loose:
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(data)
            for load in (load_image_folder, load_source):
                try:
                    _check_image_data(load(str(root)))
                    seen["ok"] += 1
                except DatasetError as e:
                    assert str(e) and "\n" not in str(e)
                    seen["error"] += 1

    prop()
    record("fuzz_image_folder", examples=(seen["ok"] + seen["error"]) // 2, **seen)


# ---- IDX files (Fashion-MNIST) ------------------------------------------------------------------------------


@st.composite
def idx_bytes(draw):
    kind = draw(st.sampled_from(["raw", "gz_random", "gz_header", "gz_valid"]))
    if kind == "raw":
        return draw(st.binary(max_size=64)), None
    if kind == "gz_random":
        return gzip.compress(draw(st.binary(max_size=64))), None
    ndim = draw(st.integers(0, 4)) if kind == "gz_valid" else draw(st.integers(0, 255))
    dims = [draw(st.integers(0, 6)) for _ in range(min(ndim, 6))]
    if kind == "gz_header":
        dims = [draw(st.integers(0, 2**32 - 1)) for _ in range(min(ndim, 6))]
    dtype = 0x08 if kind == "gz_valid" else draw(st.integers(0, 0xFF))
    head = struct.pack(">HBB", draw(st.sampled_from([0, 0, 1])) if kind != "gz_valid" else 0, dtype, ndim)
    head += b"".join(struct.pack(">I", d) for d in dims)
    n = int(np.prod(dims)) if dims and kind == "gz_valid" else draw(st.integers(0, 64))
    body = draw(st.binary(min_size=min(n, 400), max_size=min(n, 400))) if n <= 400 else b""
    extra = draw(st.binary(max_size=3)) if draw(st.booleans()) else b""
    return gzip.compress(head + body + extra), (dims if kind == "gz_valid" and n <= 400 and not extra else None)


def test_idx_reader_fuzz():
    seen = {"ok": 0, "error": 0}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x-idx3-ubyte.gz"

        @FUZZ
        @given(case=idx_bytes())
        def prop(case):
            data, expect = case
            path.write_bytes(data)
            try:
                arr = _read_idx(path)
            except DatasetError as e:
                assert str(e) and "\n" not in str(e)
                seen["error"] += 1
                return
            assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8
            if expect is not None:
                assert list(arr.shape) == expect
            seen["ok"] += 1

        prop()
    record("fuzz_idx", examples=seen["ok"] + seen["error"], **seen)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    head = struct.pack(">HBB", 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    path.write_bytes(gzip.compress(head + arr.astype(np.uint8).tobytes()))


def test_fashion_mnist_files_that_do_not_fit_together(tmp_path):
    """Readable IDX files of the wrong shape or with labels that do not match are DatasetErrors."""
    cases = {
        "labels_count": (np.zeros((4, 28, 28)), np.zeros(3)),
        "label_range": (np.zeros((4, 28, 28)), np.array([0, 1, 2, 200])),
        "image_ndim": (np.zeros((4, 28)), np.zeros(4)),
        "label_ndim": (np.zeros((4, 28, 28)), np.zeros((4, 2))),
        "empty": (np.zeros((0, 28, 28)), np.zeros(0)),
    }
    for name, (x, y) in cases.items():
        root = tmp_path / name
        root.mkdir()
        _write_idx(root / "train-images-idx3-ubyte.gz", x)
        _write_idx(root / "train-labels-idx1-ubyte.gz", y)
        with pytest.raises(DatasetError):
            load_fashion_mnist("train", root=str(root))
    root = tmp_path / "ok"
    root.mkdir()
    _write_idx(root / "train-images-idx3-ubyte.gz", np.full((3, 28, 28), 255))
    _write_idx(root / "train-labels-idx1-ubyte.gz", np.array([0, 9, 3]))
    data = load_fashion_mnist("train", root=str(root))
    assert data.images.shape == (3, 1, 32, 32) and data.labels.tolist() == [0, 9, 3]


# ---- latent cache headers ---------------------------------------------------------------------------------------


def test_latent_cache_header_fuzz():
    from noiserater.data import latents as L

    seen = {"ok": 0, "error": 0}
    base = {"format": L.CACHE_FORMAT, "version": L.CACHE_VERSION, "complete": True, "num_rows": 2, "num_images": 2,
            "done_images": 2, "latent_shape": [4, 2, 2], "dtype": "float32", "num_classes": 2,
            "class_names": ["a", "b"]}
    with tempfile.TemporaryDirectory() as d:
        cache = Path(d) / "cache"
        cache.mkdir()

        @FUZZ
        @given(patch=st.dictionaries(st.sampled_from(sorted(base)), values, max_size=4),
               drop=st.lists(st.sampled_from(sorted(base)), max_size=3),
               raw=st.one_of(st.none(), st.binary(max_size=40), st.sampled_from(["[]", "1", "null", '"x"'])),
               npy=st.one_of(st.none(), st.binary(max_size=80)))
        def prop(patch, drop, raw, npy):
            header = {k: v for k, v in {**base, **patch}.items() if k not in drop}
            text = json.dumps(header, allow_nan=True) if raw is None else raw
            (cache / "header.json").write_bytes(text.encode() if isinstance(text, str) else text)
            if npy is None:
                (cache / "data.npy").unlink(missing_ok=True)
            else:
                (cache / "data.npy").write_bytes(npy)
            try:
                load_source(str(cache))
                seen["ok"] += 1
            except DatasetError as e:
                assert str(e)
                seen["error"] += 1

        prop()
    record("fuzz_latent_header", examples=seen["ok"] + seen["error"], **seen)


# ---- damaged checkpoints, rater files and latent caches ----------------------------------------------------------
#
# Every damaged file must load IDENTICAL to the original (the damage hit bytes nobody reads) or be refused with
# a one-line error naming the file. "Loads, with changed values" is a failure: the content hashes are what
# rule it out, and each test's control shows that without them the same damage does load changed values.

FLIPS = int(os.environ.get("NOISERATER_FLIPS", "300"))  # single-bit flips per file in the sweeps


def same(a, b) -> bool:
    """Deep equality that a flipped bit cannot slip through: types, dict keys and order, tensor class, dtype,
    shape, requires_grad and raw bytes (so NaN payloads and -0.0 count), floats by their bits."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape and a.requires_grad == b.requires_grad
                and torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8)))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a.hex() == b.hex() if a == a else b != b
    return a == b


def damage(data: bytes, op: str, n: int, rng: random.Random) -> bytes:
    data = bytearray(data)
    if op == "flip":
        for _ in range(n):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        data = data[: rng.randrange(len(data))]
    elif op == "insert":
        i = rng.randrange(len(data))
        data[i:i] = bytes(rng.randrange(256) for _ in range(n))
    else:  # zero a run
        i = rng.randrange(len(data))
        data[i:i + 64 * n] = bytes(min(64 * n, len(data) - i))
    return bytes(data)


def outcome(load, expected, name: str | None, errors: type | tuple) -> str:
    """'identical', 'refused' (one line naming ``name``) or 'changed' (the failure this guards against)."""
    try:
        got = load()
    except errors as e:
        msg = str(e)
        assert name is None or (msg and "\n" not in msg and name in msg), msg
        return "refused"
    return "identical" if same(got, expected) else "changed"


def _checkpoint_files(tmp_path: Path) -> dict[str, Path]:
    from noiserater.models import build_rater

    torch.manual_seed(0)
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"step": 1, "model": {"w": torch.randn(16, 16), "b": torch.zeros(16)}, "name": "x",
                           "lr": 1e-4, "rng": ["MT19937", [1, 2, 3], None, True]}, kind="diffusion")
    rater_file = tmp_path / "rater.pt"
    save_rater(rater_file, build_rater("Rater-N/2", input_size=8, in_channels=1, num_classes=10), {"step": 7})
    return {"diffusion": good, "rater": rater_file}


def _load_rater_state(path):
    r = load_rater(path)
    return {"spec": r.spec.to_dict(), "state": dict(r.state_dict())}


def _checkpoint_loaders(files: dict[str, Path], path: Path) -> dict[str, tuple]:
    """kind -> (load the damaged copy at ``path``, what an intact load gives)."""
    return {
        "diffusion": (lambda: load_checkpoint(path, kind="diffusion"), load_checkpoint(files["diffusion"], "diffusion")),
        "rater": (lambda: load_checkpoint(path, kind="rater"), load_checkpoint(files["rater"], "rater")),
        "rater_module": (lambda: _load_rater_state(path), _load_rater_state(files["rater"])),
    }


def _flip_sweep(files, loaders, path, flips: int, seed: int = 0, strict: bool = True) -> dict[str, dict[str, int]]:
    """``flips`` seeded single-bit flips of each file through each of its loaders (``strict``: a refusal
    must be one line naming the file)."""
    counts = {}
    for kind, (load, expected) in loaders.items():
        original = files["rater" if kind.startswith("rater") else kind].read_bytes()
        rng = random.Random(seed)
        c = counts[kind] = {"identical": 0, "refused": 0, "changed": 0}
        for _ in range(flips):
            path.write_bytes(damage(original, "flip", 1, rng))
            c[outcome(load, expected, str(path) if strict else None, CheckpointError if strict else Exception)] += 1
    return counts


def test_every_bit_flip_of_a_checkpoint_or_rater_is_harmless_or_refused(tmp_path, monkeypatch):
    import noiserater.checkpoint as ck

    files = _checkpoint_files(tmp_path)
    path = tmp_path / "damaged.pt"
    loaders = _checkpoint_loaders(files, path)
    counts = _flip_sweep(files, loaders, path, FLIPS)
    for kind, c in counts.items():
        assert c["changed"] == 0, (kind, c)
        assert c["refused"] > FLIPS // 2, (kind, c)  # most bytes are tensor data: damage there is refused
    record("flips_checkpoint", examples=sum(sum(c.values()) for c in counts.values()), flips_per_file=FLIPS,
           **{f"{k}_{o}": n for k, c in counts.items() for o, n in c.items()})
    # Control: with the hash check removed, the same flips load changed weights, so the sweep above can fail.
    monkeypatch.setattr(ck, "verify_content_hash", lambda state, *a, **k: state.pop(ck.HASH_KEY, None))
    control = _flip_sweep(files, loaders, path, min(FLIPS, 100), strict=False)
    assert all(c["changed"] > 0 for c in control.values()), control


def test_damaged_checkpoint_bytes_fuzz(tmp_path):
    files = _checkpoint_files(tmp_path)
    path = tmp_path / "damaged.pt"
    loaders = _checkpoint_loaders(files, path)
    seen = {"identical": 0, "refused": 0, "changed": 0}

    @FUZZ
    @given(which=st.sampled_from(sorted(loaders)), seed=st.integers(0, 2**32 - 1),
           op=st.sampled_from(["flip", "truncate", "insert", "zero_run"]), n=st.integers(1, 16))
    def prop(which, seed, op, n):
        original = files["rater" if which.startswith("rater") else which].read_bytes()
        path.write_bytes(damage(original, op, n, random.Random(seed)))
        load, expected = loaders[which]
        result = outcome(load, expected, str(path), CheckpointError)
        seen[result] += 1
        assert result != "changed", (which, seed, op, n)

    prop()
    record("fuzz_checkpoint_bytes", examples=sum(seen.values()), ok=seen["identical"], error=seen["refused"])


def test_old_checkpoints_without_a_hash_load_with_one_warning(tmp_path):
    import warnings

    from noiserater.checkpoint import HASH_KEY, UnverifiedFileWarning

    files = _checkpoint_files(tmp_path)
    for kind, f in files.items():
        state = torch.load(f, weights_only=True)
        del state[HASH_KEY]
        old = tmp_path / f"old_{kind}.pt"
        torch.save({**state, "format_version": 1}, old)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            got = load_checkpoint(old, kind=kind)
        msgs = [str(x.message) for x in w if issubclass(x.category, UnverifiedFileWarning)]
        assert len(msgs) == 1 and str(old) in msgs[0] and "\n" not in msgs[0], msgs
        assert same({**got, "format_version": 2}, load_checkpoint(f, kind=kind))
        # a current-version file whose hash was removed is refused, not taken for an old one
        torch.save(state, tmp_path / "nohash.pt")
        with pytest.raises(CheckpointError, match="no content hash"):
            load_checkpoint(tmp_path / "nohash.pt")


def _cache(tmp_path: Path):
    from noiserater.data import latents as L

    cache = L.write_synthetic_cache(tmp_path / "cache", 6, (2, 4, 4), num_classes=3, seed=1)
    return cache, {n: (cache / n).read_bytes() for n in (L.HEADER_NAME, L.DATA_NAME)}


def _load_cache_view(cache: Path, in_memory: bool):
    from noiserater.data.latents import load_latent_cache

    d = load_latent_cache(cache, in_memory=in_memory)
    return {"images": torch.as_tensor(np.asarray(d.images)), "labels": d.labels, "num_classes": d.num_classes,
            "class_names": d.class_names, "info": d.latent_info, "name": d.name}


def _cache_sweep(cache, originals, flips: int, seed: int = 0, strict: bool = True) -> dict[str, dict[str, int]]:
    counts = {}
    expected = {m: _load_cache_view(cache, m) for m in (True, False)}
    for name, original in originals.items():
        rng = random.Random(seed)
        c = counts[name] = {"identical": 0, "refused": 0, "changed": 0}
        for i in range(flips):
            (cache / name).write_bytes(damage(original, "flip", 1, rng))
            mode = bool(i % 2)  # alternately read into memory and memory-mapped
            c[outcome(lambda: _load_cache_view(cache, mode), expected[mode], str(cache) if strict else None,
                      DatasetError if strict else Exception)] += 1
        (cache / name).write_bytes(original)
    return counts


def test_every_bit_flip_of_a_latent_cache_is_harmless_or_refused(tmp_path, monkeypatch):
    from noiserater.data import latents as L

    cache, originals = _cache(tmp_path)
    counts = _cache_sweep(cache, originals, FLIPS)
    for name, c in counts.items():
        assert c["changed"] == 0, (name, c)
    assert counts[L.DATA_NAME]["refused"] == FLIPS  # every byte of data.npy is read
    record("flips_latent_cache", examples=sum(sum(c.values()) for c in counts.values()), flips_per_file=FLIPS,
           **{f"{k.split('.')[0]}_{o}": n for k, c in counts.items() for o, n in c.items()})
    # Control: without the hash checks the same flips load changed latents, labels or header fields.
    monkeypatch.setattr(L, "_verify_data", lambda *a: None)
    monkeypatch.setattr(L, "header_sha256", lambda header: "skip")
    cache2, originals2 = _cache(tmp_path / "control")
    header = {**json.loads(originals2[L.HEADER_NAME]), L.HEADER_HASH_KEY: "skip"}
    (cache2 / L.HEADER_NAME).write_text(json.dumps(header, indent=2))
    originals2 = {n: (cache2 / n).read_bytes() for n in originals2}
    control = _cache_sweep(cache2, originals2, min(FLIPS, 100), strict=False)
    assert all(c["changed"] > 0 for c in control.values()), control


def test_latent_cache_damage_fuzz(tmp_path):

    cache, originals = _cache(tmp_path)
    expected = {m: _load_cache_view(cache, m) for m in (True, False)}
    seen = {"identical": 0, "refused": 0, "changed": 0}

    @FUZZ
    @given(which=st.sampled_from(sorted(originals)), seed=st.integers(0, 2**32 - 1), in_memory=st.booleans(),
           op=st.sampled_from(["flip", "truncate", "insert", "zero_run"]), n=st.integers(1, 16))
    def prop(which, seed, in_memory, op, n):
        for name, data in originals.items():
            (cache / name).write_bytes(damage(data, op, n, random.Random(seed)) if name == which else data)
        result = outcome(lambda: _load_cache_view(cache, in_memory), expected[in_memory], str(cache), DatasetError)
        seen[result] += 1
        assert result != "changed", (which, seed, op, n, in_memory)

    prop()
    record("fuzz_latent_cache_bytes", examples=sum(seen.values()), ok=seen["identical"], error=seen["refused"])


def test_old_latent_caches_without_hashes_load_with_one_warning(tmp_path):
    import warnings

    from noiserater.checkpoint import UnverifiedFileWarning
    from noiserater.data import latents as L

    cache, originals = _cache(tmp_path)
    expected = _load_cache_view(cache, True)
    header = json.loads(originals[L.HEADER_NAME])
    for key in (L.HEADER_HASH_KEY, L.DATA_HASH_KEY):
        del header[key]
    (cache / L.HEADER_NAME).write_text(json.dumps({**header, "version": 1}))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = _load_cache_view(cache, True)
    msgs = [str(x.message) for x in w if issubclass(x.category, UnverifiedFileWarning)]
    assert len(msgs) == 1 and str(cache) in msgs[0] and "\n" not in msgs[0], msgs
    assert same(got, expected)
    # the same header at the current version is refused: its hash key is missing, not "old"
    (cache / L.HEADER_NAME).write_text(json.dumps(header))
    with pytest.raises(DatasetError, match="no header_sha256"):
        _load_cache_view(cache, True)
