"""`noiserater evaluate`: FID, precision/recall and class accuracy of a checkpoint's samples."""

from __future__ import annotations

import json

import click

from ..evaluate import EvalConfig, evaluate_checkpoint, summary_table
from ._options import config_options, deprecated_alias

EVAL_HELP = {
    "checkpoint": "Diffusion checkpoint to evaluate (a run's checkpoints/latest.pt). Required.",
    "num_samples": "Number of generated samples (FIDs are only comparable at equal numbers).",
    "steps": "Sampling steps: DDIM steps (eta=0) for a DDPM checkpoint, ODE steps for a flow checkpoint.",
    "sampler": "Sampler: ddim (DDPM checkpoints), euler or heun (flow checkpoints; heun costs 2 model evaluations "
               "per step); default: the checkpoint objective's (ddim / euler).",
    "cfg_scale": "Classifier-free guidance scale on all channels; default 1 = no guidance, as in the paper's FID "
                 "tables, so FIDs compare across runs (sample and train's grids default to 1.25, for looking at; "
                 "reproduce/demo studies evaluate at their preset's cfg_scale).",
    "ema": "Sample with the EMA weights.",
    "seed": "Seed of the initial noise and labels: the same seed gives the same samples and numbers.",
    "labels": "Class labels of the samples: 'cycle' (balanced 0,1,2,...), 'random', 'null' (unconditional) "
              "or comma-separated class ids.",
    "extractors": "Comma-separated feature extractors: 'classifier' (the dataset's cached classifier, trained "
                  "once) and/or 'inception' (InceptionV3 pool3 from --inception-weights). Latent-cache "
                  "checkpoints (decoded with their VAE): inception only.",
    "inception_weights": "Local InceptionV3 FID weights (pytorch-fid pt_inception-2015-12-05-6726825d.pth or "
                         "torch-fidelity weights-inception-2015-12-05-6726825d.pth); default "
                         "$NOISERATER_INCEPTION_WEIGHTS. Nothing is downloaded.",
    "reference": "Reference images (a dataset source); default: Fashion-MNIST's test file for fashion-mnist, "
                 "otherwise the checkpoint's training data. Latent-cache checkpoints: an image folder, read "
                 "like cache-latents reads it at the cache's resolution (default: the folder the cache was "
                 "made from, as its header records).",
    "reference_split": "Split of the reference: all, or train / val / test: the checkpoint's own split of its "
                       "data (its --split-seed and fractions); test = images the model never trained on "
                       "(default: all; image-folder references of latent checkpoints always use all images).",
    "reference_max_images": "Image-folder references of latent checkpoints: use at most this many images "
                            "(a seeded subset of a larger folder, e.g. ImageNet's 1.28M), streamed in batches.",
    "reference_workers": "Image-folder references: DataLoader worker processes decoding the images "
                         "(0 = in this process).",
    "vae": "Latent-cache checkpoints: the VAE folder to decode samples with (default: the one recorded by "
           "cache-latents; a VAE with another scaling factor is refused).",
    "pr_k": "k of the k-NN manifolds of precision/recall (Kynkaanniemi et al. use 3).",
    "cache_dir": "Cache folder for classifiers and reference statistics (default $NOISERATER_CACHE or "
                 "~/.cache/noiserater).",
    "run_dir": "Folder whose eval.jsonl receives the records (default: the checkpoint's run folder).",
    "record": "Append the records to RUN_DIR/eval.jsonl.",
    "batch_size": "Images per forward pass when sampling and extracting features.",
    "progress": "Show progress bars.",
    "device": "Device: auto (CUDA when available), cpu, cuda or cuda:N.",
}


@click.command("evaluate")
@deprecated_alias("--steps", "--sample-steps")
@deprecated_alias("--json", "--as-json")
@config_options(EvalConfig, EVAL_HELP, flags={"steps": "sample-steps"})
@click.option("--as-json", "as_json", is_flag=True, help="Print the records as JSON on stdout instead of a table.")
def command(cfg: EvalConfig, as_json: bool) -> None:
    """Sample from a checkpoint (its objective's sampler, fixed seed) and measure FID, precision/recall and class accuracy.

    Each extractor gives one record (number of samples, sampler, steps, CFG scale, EMA, extractor and
    reference included) appended to RUN_DIR/eval.jsonl.
    """
    records = evaluate_checkpoint(cfg)
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    click.echo(summary_table(records))
    acc = records[0]["extractor_info"].get("test_accuracy") if records[0]["extractor"] == "classifier" else None
    if acc is not None:
        click.echo(f"classifier test accuracy: {acc:.4f}")
    if cfg.record:
        click.echo(f"appended {len(records)} record(s) to {cfg.record_dir() / 'eval.jsonl'}")
