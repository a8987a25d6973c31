"""Latent cache: images encoded once by a VAE (diffusers ``AutoencoderKL``), read as a dataset.

A cache is a folder with three files:

- ``data.npy``: ONE memory-mapped numpy array of records ``(label int64, latent float32|float16 [C,h,w])``,
  one record per encoded image. With ``flip`` records ``2i`` and ``2i+1`` are image ``i`` and its
  horizontal mirror. Latents are already multiplied by the VAE's scaling factor:
  ``z = (latent_sample - shift_factor) * scaling_factor`` (0.18215 and no shift for sd-vae-ft-mse).
- ``header.json``: small JSON (shape, dtype, scaling factor, VAE path and sha256, resolution, class names,
  progress). It is rewritten atomically (temp file + rename) only AFTER the array is flushed, so a crash
  at any point leaves a header whose ``done_images`` are all on disk; rerunning continues from there.
- ``files.txt``: the source images in encoding order (relative paths), for provenance.

Since cache version 2 the header carries two content hashes: ``header_sha256`` (sha256 of the header's
canonical JSON without that key) and, once the cache is complete, ``data_sha256`` (the sha256 of every
16 MiB block of ``data.npy`` and its size). :func:`read_header` and :func:`load_latent_cache` verify both,
so a flipped bit anywhere in the header or the array is refused with a one-line
:class:`LatentCacheError` naming the file instead of training on changed latents or labels. Version-1
caches (no hashes) still load, with a one-line warning.

Reading (:func:`load_latent_cache`) never loads a large cache eagerly: ``ImageData.images`` is then a
:class:`MemmapRows`, which reads only the rows a batch indexes (into pinned memory when CUDA is present).
Sampling decodes with the same VAE (:class:`LatentDecoder`), which refuses a VAE with another scale.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from ..checkpoint import UnverifiedFileWarning, atomic_write_text
from .types import IMAGE_EXTENSIONS, DatasetError, ImageData

CACHE_FORMAT = "noiserater-latent-cache"
CACHE_VERSION = 2  # 2: header and data content hashes; 1: without (still read, with a warning)
READABLE_CACHE_VERSIONS = (1, 2)
HEADER_HASH_KEY, DATA_HASH_KEY = "header_sha256", "data_sha256"
DATA_HASH_BLOCK = 16 << 20  # bytes of data.npy per sha256 block (hashed in parallel threads)
HEADER_NAME, DATA_NAME, FILES_NAME = "header.json", "data.npy", "files.txt"
# Caches up to this size (MiB; env NOISERATER_CACHE_IN_MEMORY_MB) are read into memory as a plain tensor;
# larger ones stay memory-mapped and are read per batch.
DEFAULT_IN_MEMORY_MB = 2048.0
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")


class LatentCacheError(DatasetError):
    """A latent cache or VAE cannot be used as asked; the message says how to fix it."""


# ---- the VAE -----------------------------------------------------------------------------------------


def resolve_vae_dir(path: str | os.PathLike) -> Path:
    """The folder holding the VAE's ``config.json`` and weights: PATH itself or PATH/vae (a pipeline)."""
    p = Path(path).expanduser()
    if p.is_file():
        raise LatentCacheError(
            f"--vae {p} is a file; pass the folder written by diffusers' save_pretrained "
            "(config.json + diffusion_pytorch_model.safetensors), e.g. a local copy of stabilityai/sd-vae-ft-mse"
        )
    if not p.is_dir():
        raise LatentCacheError(f"VAE folder {p} does not exist; pass --vae PATH to a local AutoencoderKL folder "
                               "(nothing is downloaded)")
    for cand in (p, p / "vae"):
        if (cand / "config.json").is_file():
            if not any((cand / w).is_file() for w in WEIGHT_FILES):
                raise LatentCacheError(
                    f"VAE folder {cand} has config.json but no weights ({' or '.join(WEIGHT_FILES[:2])}); "
                    "copy the weights file next to config.json"
                )
            return cand
    raise LatentCacheError(
        f"VAE folder {p} has no config.json (nor {p}/vae/config.json); pass the folder written by "
        "AutoencoderKL.save_pretrained, e.g. a local copy of stabilityai/sd-vae-ft-mse"
    )


def vae_sha256(vae_dir: str | os.PathLike) -> str:
    """sha256 over the VAE's config.json and weight files (names and bytes): identifies the exact VAE."""
    vae_dir = Path(vae_dir)
    h = hashlib.sha256()
    for name in ("config.json", *WEIGHT_FILES):
        f = vae_dir / name
        if not f.is_file():
            continue
        h.update(name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(AutoencoderKL in eval mode, info dict) from a local folder; never downloads."""
    vae_dir = resolve_vae_dir(path)
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise LatentCacheError("the VAE needs diffusers: pip install 'noiserater[vae]'") from None
    try:
        vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True, torch_dtype=dtype,
                                            low_cpu_mem_usage=False)
    except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError for bad folders
        raise LatentCacheError(f"could not load an AutoencoderKL from {vae_dir}: {str(e).splitlines()[0]}") from None
    vae.requires_grad_(False).eval().to(device)
    cfg = vae.config
    if not cfg.get("scaling_factor"):
        raise LatentCacheError(f"VAE config {vae_dir}/config.json has no scaling_factor; add the factor its latents "
                               "were trained with (0.18215 for sd-vae-ft-mse)")
    info = {
        "path": str(vae_dir.resolve()),
        "sha256": vae_sha256(vae_dir),
        "scaling_factor": float(cfg.scaling_factor),
        "shift_factor": float(cfg.get("shift_factor") or 0.0),
        "latent_channels": int(cfg.latent_channels),
        "downsample": 2 ** (len(cfg.block_out_channels) - 1),
        "in_channels": int(cfg.in_channels),
    }
    return vae, info


def check_vae_matches(recorded: dict, vae_info: dict, what: str = "the latents") -> None:
    """Refuse a VAE whose scaling/shift factor or latent channels differ from those ``recorded``."""
    for key, label in (("scaling_factor", "scaling factor"), ("shift_factor", "shift factor"),
                       ("latent_channels", "latent channels")):
        a, b = recorded.get(key), vae_info.get(key)
        if a is not None and b is not None and not np.isclose(float(a), float(b), rtol=1e-6, atol=1e-9):
            raise LatentCacheError(
                f"{what} were made with VAE {recorded.get('path')} ({label} {a}); the VAE {vae_info.get('path')} "
                f"has {label} {b}: decoding would be wrong. Pass --vae with the VAE used by cache-latents"
            )
    if recorded.get("sha256") and vae_info.get("sha256") and recorded["sha256"] != vae_info["sha256"]:
        warnings.warn(
            f"{what} were made with VAE {recorded.get('path')} (sha256 {recorded['sha256'][:12]}), decoding with "
            f"{vae_info.get('path')} (sha256 {vae_info['sha256'][:12]}): same scale, different weights",
            stacklevel=2,
        )


class LatentDecoder:
    """Decode cached-scale latents back to images in [-1, 1] with the VAE they were made with."""

    def __init__(self, vae, info: dict, recorded: dict | None = None):
        if recorded is not None:
            check_vae_matches(recorded, info)
        self.vae, self.info = vae, info

    @classmethod
    def from_recorded(cls, recorded: dict, vae_path: str | os.PathLike | None = None,
                      device: str | torch.device = "cpu") -> "LatentDecoder":
        """The decoder for latents described by ``recorded`` (a cache header's ``vae`` entry): the VAE at
        ``vae_path``, or at the recorded path when none is given."""
        path = vae_path or recorded.get("path")
        if not path:
            raise LatentCacheError("these latents record no VAE path; pass --vae PATH (the VAE used by cache-latents)")
        if vae_path is None and not Path(path).exists():
            raise LatentCacheError(f"the VAE these latents were made with ({path}) is not on this machine; "
                                   "pass --vae PATH to a copy of it")
        vae, info = load_vae(path, device)
        return cls(vae, info, recorded)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Latents [N,C,h,w] (times the scaling factor) -> images [N,3,H,W] in [-1, 1] (float32, on CPU)."""
        dev = next(self.vae.parameters()).device
        dt = next(self.vae.parameters()).dtype
        s, b = self.info["scaling_factor"], self.info["shift_factor"]
        out = []
        for i in range(0, z.shape[0], batch_size):
            zz = z[i:i + batch_size].to(dev, dt) / s + b
            out.append(self.vae.decode(zz).sample.float().clamp(-1, 1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.info["in_channels"], 0, 0)


# ---- source images -----------------------------------------------------------------------------------


def list_images(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """(relative paths, labels, class names) of an image folder: ``root/<class>/<image>`` with classes
    sorted by name, or a flat folder of images (one class, for unconditional data such as FFHQ)."""
    root = Path(root)
    if not root.is_dir():
        raise LatentCacheError(f"image folder {root} does not exist or is not a directory; pass --data PATH")

    def images_under(d: Path, recursive: bool) -> list[Path]:
        it = d.rglob("*") if recursive else d.iterdir()
        return sorted(f for f in it if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels = [], []
    for ci, cname in enumerate(classes):
        found = images_under(root / cname, True)
        files += [str(f.relative_to(root)) for f in found]
        labels += [ci] * len(found)
    if not classes:
        found = images_under(root, False)
        files, labels, classes = [f.name for f in found], [0] * len(found), [root.resolve().name]
    if not files:
        raise LatentCacheError(f"image folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)}); put them in "
                               f"{root}/<class_name>/ (or directly in {root} for one class)")
    return files, labels, classes


def load_image(path: str | os.PathLike, resolution: int) -> np.ndarray:
    """An RGB image center-cropped to a square and resized to ``resolution`` (bicubic, antialiased): uint8 HWC."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im = ImageOps.fit(im, (resolution, resolution), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
            return np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as e:
        raise LatentCacheError(f"{path} is not a readable image ({e}); remove or fix it, then rerun to continue") from None


class ImageFolderFiles(torch.utils.data.Dataset):
    """The images ``files`` (paths relative to ``root``) as [3,R,R] uint8 tensors, resized and
    centre-cropped to ``resolution`` (for a DataLoader over an image folder)."""

    def __init__(self, root: Path, files: list[str], resolution: int):
        self.root, self.files, self.resolution = root, files, resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(load_image(self.root / self.files[i], self.resolution)).permute(2, 0, 1)


# ---- writing a cache -----------------------------------------------------------------------------------


def record_dtype(latent_shape: tuple[int, ...], dtype: str = "float32") -> np.dtype:
    if dtype not in ("float32", "float16"):
        raise LatentCacheError(f"cache dtype must be float32 or float16, got {dtype!r}")
    return np.dtype([("label", "<i8"), ("latent", "<f4" if dtype == "float32" else "<f2", latent_shape)])


def _files_sha256(files: list[str], labels: list[int]) -> str:
    h = hashlib.sha256()
    for f, y in zip(files, labels):
        h.update(f"{f}\t{y}\n".encode())
    return h.hexdigest()


def header_sha256(header: dict) -> str:
    """sha256 of a header's canonical JSON (sorted keys, no whitespace), ``header_sha256`` itself excluded."""
    body = {k: v for k, v in header.items() if k != HEADER_HASH_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def data_sha256(path: str | os.PathLike, block_bytes: int = DATA_HASH_BLOCK) -> dict:
    """{"size", "block_bytes", "blocks"}: the sha256 of each ``block_bytes`` block of the file (threads:
    hashlib releases the GIL, so a multi-GB cache is hashed at several GB/s)."""
    path = Path(path)
    size = path.stat().st_size
    starts = list(range(0, size, block_bytes)) or [0]

    def one(start: int) -> str:
        with open(path, "rb") as f:
            f.seek(start)
            return hashlib.sha256(f.read(block_bytes)).hexdigest()

    if len(starts) == 1:
        blocks = [one(0)]
    else:
        with ThreadPoolExecutor(max_workers=min(len(starts), os.cpu_count() or 1, 16)) as pool:
            blocks = list(pool.map(one, starts))
    return {"size": size, "block_bytes": block_bytes, "blocks": blocks}


def _verify_data(data_path: Path, recorded: Any) -> None:
    """Refuse a data.npy whose size or any block's sha256 differs from what the header recorded."""
    try:
        size, block_bytes, blocks = int(recorded["size"]), int(recorded["block_bytes"]), list(recorded["blocks"])
        if block_bytes <= 0:
            raise ValueError(block_bytes)
    except (KeyError, TypeError, ValueError):
        raise LatentCacheError(f"{data_path.parent / HEADER_NAME} has a damaged {DATA_HASH_KEY} entry; "
                               "rerun cache-latents into a new folder") from None
    if not data_path.is_file():
        raise LatentCacheError(f"latent cache {data_path.parent} has no {DATA_NAME}; rerun cache-latents")
    actual = data_path.stat().st_size
    if actual != size:
        raise LatentCacheError(f"{data_path} is corrupt: {actual} bytes, the header recorded {size} (truncated or "
                               "extended); rerun cache-latents into a new folder")
    got = data_sha256(data_path, block_bytes)["blocks"]
    bad = next((i for i, (a, b) in enumerate(zip(got, blocks)) if a != b), None)
    if bad is not None or len(got) != len(blocks):
        i = bad if bad is not None else min(len(got), len(blocks))
        raise LatentCacheError(f"{data_path} is corrupt: bytes {i * block_bytes}..{min(size, (i + 1) * block_bytes)} "
                               f"do not match the sha256 recorded in {HEADER_NAME}; rerun cache-latents into a new folder")


def read_header(cache: str | os.PathLike) -> dict:
    """The header of a cache, its content hash verified (and removed from the returned dict)."""
    path = Path(cache) / HEADER_NAME
    try:
        header = json.loads(path.read_text())
    except FileNotFoundError:
        raise LatentCacheError(f"{cache} is not a latent cache (no {HEADER_NAME}); make one with "
                               "'noiserater cache-latents'") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LatentCacheError(f"{path} is not valid JSON ({e}); delete the cache and rerun cache-latents") from None
    if not isinstance(header, dict) or header.get("format") != CACHE_FORMAT:
        raise LatentCacheError(f"{path} is not a noiserater latent cache header (format {header.get('format')!r})")
    version = header.get("version")
    if type(version) is not int or version not in READABLE_CACHE_VERSIONS:
        raise LatentCacheError(f"{path} has cache version {version!r}, this noiserater reads versions "
                               f"{READABLE_CACHE_VERSIONS[0]}-{READABLE_CACHE_VERSIONS[-1]}; rerun cache-latents "
                               "into a new folder")
    stored = header.pop(HEADER_HASH_KEY, None)
    if stored is None:
        if version >= 2:
            raise LatentCacheError(f"{path} is damaged: it has no {HEADER_HASH_KEY}, which every version-{version} "
                                   "header carries; rerun cache-latents into a new folder")
        warnings.warn(f"latent cache {cache} has no content hashes (written by an older noiserater): damage to it "
                      "cannot be detected; rerun cache-latents into a new folder to add them", UnverifiedFileWarning,
                      stacklevel=2)
    elif stored != header_sha256(header):
        raise LatentCacheError(f"{path} is corrupt: its content does not match the {HEADER_HASH_KEY} recorded in it; "
                               "rerun cache-latents into a new folder")
    return header


def _write_header(cache: Path, header: dict) -> None:
    header.pop(HEADER_HASH_KEY, None)
    header["version"] = CACHE_VERSION
    header["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if header.get("complete"):  # the data is final (flushed before this call): vouch for its bytes
        header[DATA_HASH_KEY] = data_sha256(cache / DATA_NAME)
    header = json.loads(json.dumps(header))  # exactly what a reader will parse
    atomic_write_text(cache / HEADER_NAME, json.dumps({**header, HEADER_HASH_KEY: header_sha256(header)}, indent=2) + "\n")


# A prime larger than any cache's row count: (seed, row) -> one generator seed, distinct for every pair.
ROW_SEED_MIX = 1_000_000_007


def _row_noise(seed: int, row: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The posterior-sampling noise of one record: a function of (seed, row) only, so batching, resuming
    and the device never change a cached latent."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * ROW_SEED_MIX + row))


@dataclass
class CacheResult:
    out: str
    done_images: int
    num_images: int
    num_rows: int
    encoded_now: int
    seconds: float
    complete: bool
    images_per_s: float = float("nan")
    header: dict = field(default_factory=dict)


def cache_latents(
    data: str | os.PathLike,
    vae: str | os.PathLike,
    out: str | os.PathLike,
    *,
    resolution: int = 256,
    flip: bool = False,
    batch_size: int = 32,
    workers: int = 0,
    device: str | torch.device | None = None,
    latent: str = "sample",
    seed: int = 0,
    dtype: str = "float32",
    max_images: int | None = None,
    header_every_s: float = 5.0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> CacheResult:
    """Encode every image of ``data`` into the cache folder ``out`` (continuing a partial cache).

    ``latent='sample'`` stores one posterior sample per record (as DiT/fast-DiT train on), drawn with
    noise that depends only on (seed, record); ``'mean'`` stores the posterior mean. ``max_images`` caps
    how many images this call encodes (the cache stays resumable), e.g. for a job with a time limit.
    """
    if resolution < 8:
        raise LatentCacheError(f"--resolution {resolution} is too small; use e.g. 256")
    if batch_size < 1:
        raise LatentCacheError("--batch-size must be >= 1")
    if latent not in ("sample", "mean"):
        raise LatentCacheError(f"--latent must be 'sample' or 'mean', got {latent!r}")
    log = log or (lambda s: None)
    out, root = Path(out), Path(data)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    files, labels, classes = list_images(root)
    vae_model, vinfo = load_vae(vae, device)
    down = vinfo["downsample"]
    if resolution % down:
        raise LatentCacheError(f"--resolution {resolution} is not divisible by the VAE's downsampling factor {down}")
    latent_shape = (vinfo["latent_channels"], resolution // down, resolution // down)
    copies = 2 if flip else 1
    settings = {
        "source": str(root.resolve()), "files_sha256": _files_sha256(files, labels), "num_images": len(files),
        "resolution": resolution, "flip": flip, "latent": latent, "seed": seed, "dtype": dtype,
        "vae_sha256": vinfo["sha256"],
    }
    rdt = record_dtype(latent_shape, dtype)
    header_path, data_path = out / HEADER_NAME, out / DATA_NAME
    if header_path.exists():
        header = read_header(out)
        for key, value in settings.items():
            old = header["settings"].get(key)
            if old != value:
                raise LatentCacheError(
                    f"cache {out} was written with {key}={old!r}, this run has {key}={value!r}; rerun with the "
                    "same arguments to continue it, or use another --out"
                )
        if not data_path.exists():
            raise LatentCacheError(f"cache {out} has a header but no {DATA_NAME}; delete the folder and rerun")
        mm = np.lib.format.open_memmap(data_path, mode="r+")
        if mm.dtype != rdt or mm.shape != (len(files) * copies,):
            raise LatentCacheError(f"{data_path} has shape {mm.shape} / dtype {mm.dtype}, the header says otherwise; "
                                   "delete the cache and rerun")
        log(f"continuing {out}: {header['done_images']}/{len(files)} images done")
    else:
        if out.exists() and any(out.iterdir()):
            raise LatentCacheError(f"--out {out} exists and is not a latent cache; choose an empty or new folder")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / FILES_NAME, "".join(f + "\n" for f in files))
        mm = np.lib.format.open_memmap(data_path, mode="w+", dtype=rdt, shape=(len(files) * copies,))
        mm.flush()
        header = {
            "format": CACHE_FORMAT, "version": CACHE_VERSION, "complete": False,
            "num_images": len(files), "num_rows": len(files) * copies, "done_images": 0,
            "latent_shape": list(latent_shape), "dtype": dtype, "record_dtype": str(rdt.descr),
            "layout": "records 2i, 2i+1 = image i and its horizontal flip" if flip else "record i = image i",
            "scaling_factor": vinfo["scaling_factor"], "shift_factor": vinfo["shift_factor"],
            "vae": vinfo, "resolution": resolution, "flip": flip, "latent": latent, "seed": seed,
            "num_classes": len(classes), "class_names": classes, "settings": settings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _write_header(out, header)
    start = int(header["done_images"])
    stop = len(files) if max_images is None else min(len(files), start + max(0, int(max_images)))
    t0 = time.perf_counter()
    result = CacheResult(str(out), start, len(files), len(files) * copies, 0, 0.0, bool(header["complete"]),
                         header=header)
    if start >= stop:
        if start >= len(files) and not header["complete"]:
            header["complete"] = True
            _write_header(out, header)
            result.complete = True
        return result
    loader = torch.utils.data.DataLoader(ImageFolderFiles(root, files[start:stop], resolution), batch_size=batch_size,
                                         shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=False)
    bar = None
    if progress:
        bar = tqdm(total=len(files), initial=start, unit="img", desc="cache-latents", dynamic_ncols=True)
    done, last_header = start, time.perf_counter()
    labels_np = np.asarray(labels, dtype=np.int64)
    try:
        with torch.no_grad():
            for pixels in loader:
                n = pixels.shape[0]
                x = pixels.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
                if flip:  # image i, mirror of i, image i+1, ...
                    x = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)
                dist = vae_model.encode(x).latent_dist
                z = dist.mean
                rows = np.arange(done * copies, (done + n) * copies)
                if latent == "sample":
                    noise = torch.stack([_row_noise(seed, int(r), latent_shape) for r in rows]).to(device)
                    z = z + dist.std * noise
                z = (z - vinfo["shift_factor"]) * vinfo["scaling_factor"]
                if tuple(z.shape[1:]) != latent_shape:
                    raise LatentCacheError(f"the VAE produced latents of shape {tuple(z.shape[1:])}, expected "
                                           f"{latent_shape}; is {vae} a standard AutoencoderKL?")
                block = np.empty(len(rows), dtype=rdt)
                block["latent"] = z.float().cpu().numpy()
                block["label"] = np.repeat(labels_np[done:done + n], copies)
                mm[rows[0]:rows[-1] + 1] = block
                done += n
                if bar is not None:
                    bar.update(n)
                    bar.set_postfix(enc_per_s=f"{(done - start) * copies / (time.perf_counter() - t0):.1f}")
                if time.perf_counter() - last_header >= header_every_s or done == stop:
                    mm.flush()  # data first, then the header that vouches for it
                    header["done_images"] = done
                    header["complete"] = done == len(files)
                    _write_header(out, header)
                    last_header = time.perf_counter()
    finally:
        if bar is not None:
            bar.close()
        if done > int(header["done_images"]):  # interrupted between header writes: vouch for what is on disk
            mm.flush()
            header["done_images"] = done
            header["complete"] = done == len(files)
            _write_header(out, header)
        del mm
    secs = time.perf_counter() - t0
    result.done_images, result.encoded_now, result.seconds = done, done - start, secs
    result.complete = bool(header["complete"])
    result.images_per_s = (done - start) / secs if secs > 0 else float("nan")
    return result


def write_synthetic_cache(out: str | os.PathLike, num: int, latent_shape: tuple[int, int, int] = (4, 32, 32),
                          num_classes: int = 1000, seed: int = 0, dtype: str = "float32") -> Path:
    """A complete cache of N(0, 1) latents and uniform labels, no VAE (benchmarks and GPU checks)."""
    out = Path(out)
    if (out / HEADER_NAME).exists():
        raise LatentCacheError(f"{out} already holds a cache; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    rdt = record_dtype(tuple(latent_shape), dtype)
    mm = np.lib.format.open_memmap(out / DATA_NAME, mode="w+", dtype=rdt, shape=(num,))
    rng = np.random.default_rng(seed)
    for lo in range(0, num, 4096):
        hi = min(num, lo + 4096)
        mm["latent"][lo:hi] = rng.standard_normal((hi - lo, *latent_shape), dtype=np.float32)
        mm["label"][lo:hi] = rng.integers(0, num_classes, hi - lo)
    mm.flush()
    del mm
    header = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "complete": True, "num_images": num, "num_rows": num,
        "done_images": num, "latent_shape": list(latent_shape), "dtype": dtype, "record_dtype": str(rdt.descr),
        "layout": "record i = image i (synthetic N(0,1) latents)", "scaling_factor": 1.0, "shift_factor": 0.0,
        "vae": {"path": None, "synthetic": True}, "resolution": None, "flip": False, "latent": "synthetic",
        "seed": seed, "num_classes": num_classes, "class_names": [str(i) for i in range(num_classes)],
        "settings": {"synthetic": True}, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _write_header(out, header)
    return out


# ---- reading a cache ---------------------------------------------------------------------------------


class MemmapRows:
    """A read-only, tensor-like view of rows of a memory-mapped latent array.

    ``rows[index]`` (an int, slice, list, numpy array or LongTensor) reads just those rows (in file order,
    then put back in the asked order) into a float32 tensor, pinned when CUDA is available so that
    ``.to('cuda', non_blocking=True)`` overlaps. ``take(index)`` makes a sub-view without reading anything.
    Other tensor operations read the whole view first (fine for small caches; avoid on big ones).
    """

    def __init__(self, records: np.ndarray, index: np.ndarray | None = None, pin: bool | None = None):
        self._records = records
        self._index = None if index is None else np.asarray(index, dtype=np.int64)
        self._pin = torch.cuda.is_available() if pin is None else pin
        n = len(records) if self._index is None else len(self._index)
        self.shape = torch.Size((n, *records.dtype["latent"].shape))
        self.dtype = torch.float32
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, d: int | None = None):
        return self.shape if d is None else self.shape[d]

    def _positions(self, key) -> tuple[np.ndarray, bool]:
        n = len(self)
        if isinstance(key, (int, np.integer)) or (torch.is_tensor(key) and key.ndim == 0 and not key.is_floating_point()):
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of range for {n} rows")
            return np.array([i % n]), True
        if isinstance(key, slice):
            return np.arange(n)[key], False
        arr = key.cpu().numpy() if torch.is_tensor(key) else np.asarray(key)
        if arr.dtype == bool:
            if arr.shape != (n,):
                raise IndexError(f"boolean index of shape {arr.shape} does not match {n} rows")
            return np.nonzero(arr)[0], False
        arr = arr.astype(np.int64).reshape(-1)
        if arr.size and (arr.min() < -n or arr.max() >= n):
            raise IndexError(f"index out of range for {n} rows")
        return arr % n if n else arr, False

    def _source(self, pos: np.ndarray) -> np.ndarray:
        return pos if self._index is None else self._index[pos]

    def __getitem__(self, key) -> torch.Tensor:
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        pos, scalar = self._positions(key)
        src = self._source(pos)
        order = np.argsort(src, kind="stable")
        out = torch.empty((len(src), *self.shape[1:]), dtype=torch.float32,
                          pin_memory=self._pin and torch.cuda.is_available())
        if len(src):
            out.numpy()[order] = self._records["latent"][src[order]]
        if scalar:
            out = out[0]
        return out[(slice(None),) * (0 if scalar else 1) + rest] if rest else out

    def take(self, index) -> "MemmapRows":
        pos, _ = self._positions(index)
        return MemmapRows(self._records, self._source(pos), self._pin)

    def materialize(self) -> torch.Tensor:
        return self[:]

    def __array__(self, dtype=None, copy=None):
        a = self.materialize().numpy()
        return a if dtype is None else a.astype(dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def conv(a):
            if isinstance(a, MemmapRows):
                return a.materialize()
            if isinstance(a, (list, tuple)):
                return type(a)(conv(v) for v in a)
            return a

        return func(*conv(args), **{k: conv(v) for k, v in (kwargs or {}).items()})

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    def __repr__(self) -> str:
        return f"MemmapRows(shape={tuple(self.shape)}, file={getattr(self._records, 'filename', None)})"


@dataclass
class LatentData(ImageData):
    """An :class:`ImageData` of cached latents; ``latent_info`` (VAE, scale, resolution) travels with every
    subset and into the checkpoints that train on it."""

    latent_info: dict = field(default_factory=dict)

    def subset(self, index: torch.Tensor, suffix: str) -> "LatentData":
        images = self.images.take(index) if isinstance(self.images, MemmapRows) else self.images[index]
        return LatentData(images, self.labels[index], self.num_classes, f"{self.name}:{suffix}", self.class_names,
                          self.latent_info)

    def decoder(self, vae_path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> LatentDecoder:
        return LatentDecoder.from_recorded(self.latent_info["vae"], vae_path, device)


def latent_info(header: dict, cache: str | os.PathLike) -> dict:
    """What a checkpoint trained on the cache must remember to decode its samples."""
    return {
        "cache": str(Path(cache).resolve()), "resolution": header["resolution"], "flip": header["flip"],
        "latent": header["latent"], "scaling_factor": header["scaling_factor"],
        "shift_factor": header["shift_factor"], "vae": header["vae"],
    }


def load_latent_cache(path: str | os.PathLike, in_memory: bool | None = None) -> LatentData:
    """A complete latent cache as a dataset. ``in_memory`` None: read into RAM when the array is at most
    ``NOISERATER_CACHE_IN_MEMORY_MB`` (default 2048), else rows are read per batch (:class:`MemmapRows`)."""
    try:
        return _load_latent_cache(Path(path), in_memory)
    except LatentCacheError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, EOFError, OSError) as e:
        # a header with missing or mistyped fields, or a damaged data.npy
        raise LatentCacheError(f"latent cache {path} is damaged ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}); "
                               "rerun cache-latents into a new folder") from None


def _load_latent_cache(path: Path, in_memory: bool | None) -> LatentData:
    header = read_header(path)
    if not header.get("complete"):
        raise LatentCacheError(
            f"latent cache {path} is incomplete ({header.get('done_images')}/{header.get('num_images')} images); "
            "rerun the same 'noiserater cache-latents' command to finish it"
        )
    data_path = path / DATA_NAME
    if DATA_HASH_KEY in header or header["version"] >= 2:
        if DATA_HASH_KEY not in header:
            raise LatentCacheError(f"{path / HEADER_NAME} is damaged: a complete version-{header['version']} cache "
                                   f"records {DATA_HASH_KEY}; rerun cache-latents into a new folder")
        _verify_data(data_path, header[DATA_HASH_KEY])
    try:
        records = np.load(data_path, mmap_mode="r")
    except FileNotFoundError:
        raise LatentCacheError(f"latent cache {path} has no {DATA_NAME}; rerun cache-latents") from None
    except Exception as e:  # numpy's header parser raises ValueError, SyntaxError, tokenize.TokenError, ...
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise LatentCacheError(f"{data_path} is not a readable .npy array ({reason}); rerun cache-latents") from None
    expect = record_dtype(tuple(header["latent_shape"]), header["dtype"])
    if records.dtype != expect or records.shape != (header["num_rows"],):
        raise LatentCacheError(f"{data_path} holds {records.shape} records of {records.dtype}, the header expects "
                               f"{header['num_rows']} of {expect}; the cache is damaged: rerun cache-latents")
    labels = torch.from_numpy(np.array(records["label"], dtype=np.int64))
    if in_memory is None:
        limit_mb = float(os.environ.get("NOISERATER_CACHE_IN_MEMORY_MB", DEFAULT_IN_MEMORY_MB))
        in_memory = data_path.stat().st_size <= limit_mb * 2**20
    if in_memory:
        images = torch.from_numpy(np.ascontiguousarray(records["latent"], dtype=np.float32))
    else:
        images = MemmapRows(records)
    return LatentData(images, labels, int(header["num_classes"]), f"latents:{path.resolve()}",
                      list(header["class_names"]), latent_info(header, path))
