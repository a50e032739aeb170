"""Tools around the stages: `demo` (offline CPU demo), `download` (fill the caches for offline runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import _friendly, _ints, _split, app, tf32_option


@app.command()
@_friendly
def demo(
    output: Path = typer.Option(Path("demo-output"), "--output", "-o", help="Where the demo writes its data and runs."),
    steps: int = typer.Option(150, help="Optimizer steps of each training run."),
    images: int = typer.Option(96, help="Synthetic scenes to generate."),
    seed: int = typer.Option(0, help="Seed of the scenes and of both runs."),
    family: str = typer.Option("sd1", help="The tiny random model's family: sd1, sdxl, sd3 (SD3.5's layout) or flux (FLUX.1-dev's)."),
) -> None:
    """Offline CPU demo: synthetic scenes -> masks -> train a tiny model with the losses off and on -> scores."""
    from ..demo import DemoConfig, run

    run(DemoConfig(output=output, steps=steps, images=images, seed=seed, family=family))


@app.command()
@_friendly
def download(
    commands: Optional[list[str]] = typer.Argument(None, help="Commands whose models to fetch (masks, train-unet, train-clip, generate, multigen, visor, geneval, fid, latency, attnviz); default all."),
    model: Optional[list[str]] = typer.Option(None, help="Base model(s) as --model takes them (NAME=ID[,unet=..,text_encoder=..] or ID); repeatable."),
    detector: Optional[str] = typer.Option(None, help="GroundingDINO for masks (default: the masks stage's)."),
    segmenter: Optional[str] = typer.Option(None, help="SAM / SAM-HQ for masks (default: the masks stage's)."),
    clip_model: Optional[str] = typer.Option(None, help="CLIP for train-clip (default: train-clip's)."),
    owlv2: Optional[str] = typer.Option(None, help="OWLv2 detector for multigen (default: multigen's)."),
    owlvit: Optional[str] = typer.Option(None, help="OWL-ViT detector for visor (default: visor's)."),
    mask2former: Optional[str] = typer.Option(None, help="Mask2Former detector for geneval (default: geneval's)."),
    revision: Optional[list[str]] = typer.Option(None, help="Pin a repo: REPO_ID=REVISION (branch, tag or commit); repeatable."),
    dry_run: bool = typer.Option(False, help="Only list what would be fetched."),
) -> None:
    """Fetch the models, prompt sets and FID weights of COMMANDS into the caches, for HF_HUB_OFFLINE=1 runs later."""
    from ..download import DownloadConfig, parse_revisions, run

    cfg = DownloadConfig(commands=tuple(commands or ()), models=tuple(model or ()), detector=detector,
                         segmenter=segmenter, clip_model=clip_model, owlv2=owlv2, owlvit=owlvit, mask2former=mask2former,
                         revisions=parse_revisions(revision or ()), dry_run=dry_run)
    run(cfg)


@app.command()
@_friendly
def bench(
    quick: bool = typer.Option(False, "--quick", help="Tiny CPU-size models, small sizes, 2 rounds: a smoke run (< 1 min on 2 cores)."),
    sections: str = typer.Option("train,sdxl,sd3,flux,baseline,generate,detect,masks", help="Comma-separated sections to run: train (SD1.4 UNet step), sdxl, sd3 (SD3.5-medium transformer step, LoRA r16 and full), flux (FLUX.1-dev: LoRA r16 on nf4 and bf16 bases, full; a row that cannot fit the device's free memory by byte count is skipped), baseline, generate, detect, masks."),
    dtype: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32: training autocast and inference."),
    batch_sizes: Optional[str] = typer.Option(None, help="Generation batch sizes, comma-separated (default 1,8,16; quick 1,2)."),
    train_batch_size: Optional[str] = typer.Option(None, help="Batch size(s) of the train section's step, comma-separated (default 8; quick 2); sdxl runs 1 and 4 (quick 1), sd3 and flux 1."),
    gradient_checkpointing: str = typer.Option("both", help="Training steps (train, sdxl, sd3, flux) with gradient checkpointing: off, on or both."),
    resolution: Optional[int] = typer.Option(None, help="Image side in pixels of the train section; latents are 1/8 of it (default 512; quick 128). sdxl, sd3 and flux run at 1024 (quick 128)."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the UNet's ResNet and feed-forward blocks in the train section (default: on for CUDA, off on CPU and with --quick; eager, with a note, where compiling is unavailable)."),
    tf32: bool = tf32_option(),  # every section but the baseline, which runs with torch's defaults as the original did
    channels_last: Optional[str] = typer.Option(None, help="off, on or both: UNet and latents in torch.channels_last in the train section (default: both on CUDA at real size, off on CPU and with --quick)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the JSON report to PATH, or to stdout with '-'."),
    rounds: Optional[int] = typer.Option(None, help="Timed rounds per measurement (default 5; quick 2)."),
    steps: Optional[int] = typer.Option(None, help="Timed training steps per variant per round (default 2; quick 1)."),
    warmup: Optional[int] = typer.Option(None, help="Untimed training steps per variant (default 2; quick 1)."),
    gen_steps: Optional[int] = typer.Option(None, help="Denoising steps per generated image (default 25; quick 2)."),
    infer_batch_size: Optional[int] = typer.Option(None, help="Detection and masks batch size (default 8; quick 2)."),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:N or cpu (default cuda if available)."),
    threads: Optional[int] = typer.Option(None, help="torch.set_num_threads (CPU)."),
) -> None:
    """Measure training and inference speed here with random real-size models: images/s, MFU, memory, speed-up vs the original."""
    from ..bench.report import print_report
    from ..bench.run import BenchConfig, run, write_json

    def ints(value: Optional[str], name: str) -> Optional[tuple[int, ...]]:
        return None if value is None else _ints(value, name)

    cfg = BenchConfig(sections=_split(sections), quick=quick, device=device, dtype=dtype,
                      batch_sizes=ints(batch_sizes, "--batch-sizes"),
                      train_batch_sizes=ints(train_batch_size, "--train-batch-size"),
                      gradient_checkpointing=gradient_checkpointing, resolution=resolution, compile=compile, tf32=tf32, channels_last=channels_last,
                      rounds=rounds, steps=steps, warmup=warmup, gen_steps=gen_steps,
                      infer_batch_size=infer_batch_size, threads=threads)
    report = run(cfg)
    print_report(report)
    if json_out is not None:
        write_json(report, json_out)
    if report["errors"]:
        raise typer.Exit(code=1)
