"""The offline demo: synthetic scenes -> masks -> train a tiny model with the losses off and on -> scores.

    make demo            # or: tcompose demo --output demo-output

Runs on a CPU in a few minutes with nothing downloaded. It writes a COCO-format folder of generated scenes
("a red ball and a blue cup on a table"), turns it into a masks dataset with ``masks --source coco-gt``
exactly as for COCO, writes a tiny random Stable Diffusion (its CLIP-format tokenizer learnt from the
captions), then trains that model twice with the same seed: once with the grounding losses off
(lambda = gamma = 0) and once on, at demo-scale weights (a random tiny model is far from grounded, so the
weights are larger than the paper's 1e-3 / 5e-5, which are tuned for SD1.4's loss scales). It prints the
grounding score of both runs on held-out scenes: the share of each noun's attention inside its object, and
ends with a picture of it, ``attention.png``: for a few held-out scenes, the image, then each noun's attention
with the losses off (one row) and on (the next), all maps on one colour scale, each object's mask outlined,
each panel titled with the share the score counts.

``--family sdxl|sd3|flux`` trains a tiny random model of SDXL's, SD3.5's or FLUX.1-dev's layout instead (its own
``base-model-FAMILY`` folder; the transformers with a 32-token T5 sequence, the captions being short).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .io.errors import UserError


@dataclass
class DemoConfig:
    output: Path = Path("demo-output")
    images: int = 96  # synthetic scenes (each with 1-5 captions: one training row per caption)
    steps: int = 150  # optimizer steps of each run
    seed: int = 0
    lambda_token: float = 1.0  # demo-scale weights (see the module docstring)
    gamma_pixel: float = 0.1
    lr: float = 1e-3
    batch_size: int = 8
    scene_size: int = 64  # pixels of the generated JPEGs
    figure_scenes: int = 3  # held-out scenes drawn in attention.png
    resolution: int = 32  # training resolution: 16x16 latents, attention maps of 16x16 and 8x8
    eval_fraction: float = 0.15
    family: str = "sd1"  # the tiny random model's family: sd1, sdxl, sd3 (SD3.5 layout) or flux (FLUX.1-dev layout)
    progress: bool = True


#: ``--family`` -> what the demo trains: a tiny random model of that family's layout (:mod:`tcompose.testing`).
FAMILIES = {"sd1": "SD1.x", "sdxl": "SDXL", "sd3": "SD3.5 (MMDiT, dual attention, RMS qk-norm)",
            "flux": "FLUX.1-dev (double and single stream blocks, guidance embedding)"}


def base_folder(family: str) -> str:
    """The base model's folder in the demo's output (one per family, so switching --family never mixes them)."""
    return "base-model" if family == "sd1" else f"base-model-{family}"


def write_base_model(family: str, base: Path, captions: list[str], seed: int) -> None:
    """The tiny random model of ``family``, its tokenizer(s) learnt from the scenes' captions."""
    if family in ("sd1", "sdxl"):
        from .testing.tiny_sd import write_tiny_pipeline

        write_tiny_pipeline(base, corpus=captions, seed=seed, overwrite=True,
                            size="tiny-sdxl" if family == "sdxl" else "tiny")
    else:
        from .testing.tiny_dit import write_tiny_flux_pipeline, write_tiny_sd3_pipeline

        writer = write_tiny_sd3_pipeline if family == "sd3" else write_tiny_flux_pipeline
        writer(base, seed=seed, corpus=captions, overwrite=True)


def min_images(cfg: DemoConfig) -> int:
    """The fewest scenes that fill two training batches after ``eval_fraction`` of them is held out (a scene
    has at least one caption, so at least one training row)."""
    import math

    n = 2
    while n - math.ceil(cfg.eval_fraction * n) < 2 * cfg.batch_size:
        n += 1
    return n


def check(cfg: DemoConfig) -> None:
    """Refuse, naming the demo's own options, what would fail later, before anything is written."""
    from .io.files import check_output_folder

    if cfg.steps < 1:
        raise UserError(f"--steps {cfg.steps}: each training run needs at least one optimizer step; pass --steps 1 "
                        "or more (the default is 150)")
    need = min_images(cfg)
    if cfg.images < need:
        raise UserError(f"--images {cfg.images}: the demo needs at least {need} scenes (to fill its training "
                        f"batches of {cfg.batch_size} and hold some out for the score); pass --images {need} or "
                        "more (the default is 96)")
    if cfg.family not in FAMILIES:
        raise UserError(f"--family {cfg.family!r}: choose one of {', '.join(FAMILIES)}")
    check_output_folder(cfg.output, "--output", inside=("scenes", "masks", "losses-off", "losses-on",
                                                        *(base_folder(f) for f in FAMILIES)))


SCENES_RECORD = "demo_scenes.json"  # in OUT/scenes/: the settings the scenes were made with


def _scenes(cfg: DemoConfig, say) -> Path:
    """OUT/scenes/, made for ``cfg``'s --images, scene size and --seed. Scenes made with other settings (an earlier
    run into the same --output) are made again, and the masks and base models learnt from them go with them: a rerun
    never trains on the scenes of another."""
    from .data.synthetic import make_scenes
    from .io.datasets import write_json_atomic

    out, scenes = Path(cfg.output), Path(cfg.output) / "scenes"
    want = {"images": cfg.images, "scene_size": cfg.scene_size, "seed": cfg.seed}
    record = scenes / SCENES_RECORD
    have = json.loads(record.read_text()) if record.is_file() else None
    if have == want and (scenes / "annotations" / "captions_train2017.json").is_file():
        return scenes
    # what was learnt from other scenes goes first, the scenes (and their record) last: a kill in between leaves
    # no record, so the next run clears again
    stale = [out / name for name in ("masks", *(base_folder(f) for f in FAMILIES), "scenes") if (out / name).exists()]
    if stale:
        made = ", ".join(f"{k} {v}" for k, v in have.items()) if isinstance(have, dict) else "unrecorded settings"
        say(f"scenes: {out} holds scenes made with {made}; making new ones for images {cfg.images}, "
            f"scene_size {cfg.scene_size}, seed {cfg.seed} (with new masks and base models)")
        for path in stale:
            shutil.rmtree(path)
    make_scenes(scenes, n_images=cfg.images, size=cfg.scene_size, seed=cfg.seed)
    write_json_atomic(record, want)  # last: scenes killed half made are made again
    return scenes


def run(cfg: DemoConfig) -> dict:
    from rich.console import Console
    from rich.table import Table

    from .io.datasets import write_json_atomic
    from .masks.config import MasksConfig
    from .masks.stage import run as make_masks
    from .train.config import TrainUnetConfig
    from .train.loop import run as train

    check(cfg)
    console = Console(stderr=True)
    out = Path(cfg.output)
    t0 = time.perf_counter()
    scenes = _scenes(cfg, console.print)
    console.print(f"[bold]1/3[/] scenes: {scenes}")
    masks = make_masks(MasksConfig(coco_dir=scenes, output=out / "masks", split="train2017", captions="all"), progress=cfg.progress)
    console.print(f"[bold]2/3[/] masks: {out / 'masks'} ({masks['num_rows']} rows)")

    base = out / base_folder(cfg.family)
    if not (base / "model_index.json").exists():
        captions = [a["caption"] for a in json.loads((scenes / "annotations" / "captions_train2017.json").read_text())["annotations"]]
        write_base_model(cfg.family, base, captions, cfg.seed)

    runs = {}
    for name, lam, gam in (("losses-off", 0.0, 0.0), ("losses-on", cfg.lambda_token, cfg.gamma_pixel)):
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own output: always a fresh run
        console.print(f"[bold]3/3[/] train-unet {name} (lambda={lam:g}, gamma={gam:g}) -> {run_dir}")
        runs[name] = train(TrainUnetConfig(
            data=out / "masks", output=run_dir, model=str(base), lambda_token=lam, gamma_pixel=gam,
            resolution=cfg.resolution, batch_size=cfg.batch_size, grad_accum=1, max_steps=cfg.steps, lr=cfg.lr,
            seed=cfg.seed, checkpoint_every=0, eval_fraction=cfg.eval_fraction, num_workers=0,
            log_every=max(1, cfg.steps // 10), progress=cfg.progress,
            # the scenes' captions are short: a T5 sequence of 512 tokens (FLUX's default) would only cost time
            **({"max_sequence_length": 32} if cfg.family in ("sd3", "flux") else {}),
        ))

    table = Table(title="Grounding score on held-out scenes (share of a noun's attention inside its object)")
    for col in ("run", "lambda", "gamma", "before", "after", "chance", "L_LDM", "seconds"):
        table.add_column(col, justify="right" if col != "run" else "left")
    report = {"output": str(out), "runs": {}}
    for name, s in runs.items():
        b, a = s["grounding_before"], s["grounding_after"]
        c = s["config"]
        table.add_row(name, f"{c['lambda_token']:g}", f"{c['gamma_pixel']:g}", f"{b['score']:.3f}", f"{a['score']:.3f}",
                      f"{a['chance']:.3f}", f"{s['final_losses'].get('ldm', float('nan')):.4f}", f"{s['train_seconds']:.0f}")
        report["runs"][name] = {"before": b["score"], "after": a["score"], "chance": a["chance"], "summary": str(out / name / "training_summary.json")}
    off, on = report["runs"]["losses-off"]["after"], report["runs"]["losses-on"]["after"]
    report["gain"] = on - off
    figure = attention_figure(out / "attention.png", {"losses off": out / "losses-off", "losses on": out / "losses-on"},
                              out / "masks", cfg)
    report["figure"] = str(figure)
    report["seconds"] = time.perf_counter() - t0
    write_json_atomic(out / "demo_report.json", report)
    Console().print(table)
    Console().print(
        f"With the losses on, {on:.1%} of each noun's attention falls inside its object, against {off:.1%} without "
        f"(chance {report['runs']['losses-on']['chance']:.1%}).\nOutputs: scenes {scenes}, masks {out / 'masks'}, "
        f"models {out / 'losses-off'} and {out / 'losses-on'} (diffusers pipelines), report {out / 'demo_report.json'}, "
        f"picture {figure}."
    )
    return report


def _uint8(pixels):
    """The VAE's input ``[3, R, R]`` in [-1, 1] as an image ``[R, R, 3]`` uint8."""
    import numpy as np

    return np.asarray(((pixels.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())


def attention_figure(path: Path, runs: dict[str, Path], masks_dir: Path, cfg: DemoConfig) -> Path:
    """``attention.png``: held-out scenes, each noun's attention in every run of ``runs`` (label -> trained
    pipeline folder), on one shared scale, with the mask outlined and the share inside it in the title."""
    from .grounding.score import word_attention
    from .io.datasets import RowReader
    from .io.figures import PanelRow, draw_attention_figure
    from .models.families import load_components
    from .train.examples import TrainingExamples, collate, prepare_rows, split_heldout

    loaded = {label: load_components(str(folder)) for label, folder in runs.items()}
    first = next(iter(loaded.values()))
    prep = prepare_rows(masks_dir, first)
    _, heldout = split_heldout(prep, cfg.eval_fraction, cfg.seed)
    rows, seen = [], set()
    for r in heldout:  # one caption per scene
        if prep.image_ids[r] not in seen:
            seen.add(prep.image_ids[r])
            rows.append(r)
        if len(rows) == cfg.figure_scenes:
            break
    if not rows:
        raise UserError(f"{masks_dir} has no held-out scene with a supervised noun to draw")
    latent = cfg.resolution // 2 ** (len(first.vae.config.block_out_channels) - 1)
    examples = TrainingExamples(prep, cfg.resolution, (first.unet.config.in_channels, latent, latent),
                                first.noise_scheduler.config.num_train_timesteps, cfg.seed)
    batch = collate([examples[(r, 0)] for r in rows])
    summaries = {label: json.loads((folder / "training_summary.json").read_text()) for label, folder in runs.items()}
    maps = {}
    for label, c in loaded.items():
        layers = tuple(summaries[label]["supervised_groups"])
        timesteps = tuple(summaries[label]["config"]["eval_timesteps"])
        maps[label] = word_attention(c, batch, layers, timesteps, seed=cfg.seed)
    text = RowReader(masks_dir, ["caption", "phrases"])
    panels = []
    for i, r in enumerate(rows):
        record = text[r]
        words = [record["phrases"][slot] for slot in prep.mask_slots[r]]
        for label, m in maps.items():
            panels.append(PanelRow(
                label, _uint8(batch["pixel_values"][i]),
                [(f"{w}: {float(m['share'][i, j]):.0%} inside", m["maps"][i, j]) for j, w in enumerate(words)],
                image_title=record["caption"], outlines=[batch["masks"][i, j] > 0.5 for j in range(len(words))]))
    draw_attention_figure(panels, path, panel=160, scale="shared")
    return path
