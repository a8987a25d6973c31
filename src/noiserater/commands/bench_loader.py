"""`noiserater bench loader`: is the latent-cache loader ever the bottleneck? Loader images/s against the
training step's images/s, measured side by side in one process.

The benchmark is :mod:`noiserater.bench.loader` (what is timed is described there); this module parses the
options, runs it, writes the JSON and prints one line.
"""

from __future__ import annotations

import click

from ..bench.common import write_result
from ..bench.loader import run_loader_benchmark
from ._options import deprecated_alias


@click.command("loader")
@deprecated_alias("--cache", "--data")
@deprecated_alias("--num", "--num-records")
@deprecated_alias("--out", "--json")
@click.option("--data", "cache", default=None, type=click.Path(file_okay=False),
              help="Latent cache to read (a cache-latents folder, as train's --data; default: a synthetic cache of random 4x32x32 latents in a temp folder).")
@click.option("--num-records", "num", default=4096, show_default=True, type=click.IntRange(min=64),
              help="Records of the synthetic cache.")
@click.option("--latent-size", default=32, show_default=True, type=click.IntRange(min=2),
              help="Latent side of the synthetic cache (32 = 256px images through sd-vae).")
@click.option("--model", default="DiT-S/2", show_default=True, help="DiT config of the training step.")
@click.option("--batch-size", default=None, type=click.IntRange(min=1),
              help="Per-process batch (default: 8 on CPU, 64 on CUDA = the paper's 256 over 4 GPUs).")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Times each measurement is repeated (interleaved rounds).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--amp/--no-amp", default=False, show_default=True, help="bf16 autocast in the training step.")
@click.option("--tf32/--no-tf32", default=True, show_default=True, help="TF32 on CUDA.")
@click.option("--compile/--no-compile", "compile_", default=False, show_default=True, help="torch.compile the DiT.")
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=False, show_default=True,
              help="Recompute DiT blocks in backward.")
@click.option("--json", "out", default=None, type=click.Path(dir_okay=False),
              help="Write the record as JSON (a list with one record) to this file. Without it nothing is written.")
def command(cache, num, latent_size, model, batch_size, repeats, device, amp, tf32, compile_, grad_checkpointing, out):
    """Latent-cache loader images/s against the training step's images/s (one process, interleaved)."""
    rec = run_loader_benchmark(cache, model=model, batch_size=batch_size, repeats=repeats, device=device, amp=amp,
                               tf32=tf32, compile_=compile_, grad_checkpointing=grad_checkpointing, num=num,
                               latent_size=latent_size, log=click.echo)
    if out:
        write_result(out, [rec])
    click.echo(f"loader (memmap) {rec['loader_memmap_images_per_s']:.0f} img/s, (memory) "
               f"{rec['loader_memory_images_per_s']:.0f} img/s; train step {rec['train_images_per_s']:.1f} img/s "
               f"({model}, batch {rec['batch_size']}); loader/train = {rec['loader_over_train']:.0f}x"
               + (f" -> {out}" if out else ""))
