"""`tcompose bench`: training and inference speed on whatever machine it runs, with random real-size models.

Runbook::

    tcompose bench --quick --json -                    # CPU-size models, < 1 min on 2 cores: a smoke run
    tcompose bench --json bench.json                   # one GPU: SD1.4 UNet, 512 px, bf16, batch 8, ckpt off+on, compiled
    tcompose bench --sections train,baseline --train-batch-size 8,16,32 --gradient-checkpointing both --no-compile
    tcompose bench --sections generate --batch-sizes 1,8,16 --dtype fp16

Models are random-initialised from configs (nothing is downloaded): SD1.4's UNet / VAE / text encoder shapes,
OWLv2-L/14, GroundingDINO-T and SAM-HQ ViT-H; ``--quick`` swaps in the tiny test models. Sections:

- ``train``: the train-unet step (:mod:`tcompose.bench.train`): UNet forward under autocast, the grounding
  losses on (and, for the losses' overhead, the same step with lambda = gamma = 0), backward, AdamW; per
  ``--train-batch-size`` and checkpointing mode: images/s, peak memory, model FLOP utilisation
  (MFU = FLOPs of one step, counted once with FlopCounterMode / seconds per step / the machine's matmul rate,
  measured here: a large bf16 matmul on CUDA, fp32 on CPU); per memory format (``channels_last``: both on
  CUDA real-size runs); and the VAE encode of the batch, which the step (starting from latents) leaves out, as
  train-unet with ``--cache-latents`` does: ``vae_encode_share`` is what that option saves; each for full
  finetuning and for LoRA (rank 64 on the attention projections, the base frozen in the training dtype);
- ``sdxl``: the same step on SDXL's UNet (~2.6B parameters) at 1024 px, batch 1 and 4, full and LoRA;
- ``sd3`` / ``flux``: the same step on a random SD3.5-medium (2.2B) / FLUX.1-dev (11.9B) transformer
  (:mod:`tcompose.bench.dit`) at 1024 px, batch 1, with the family's flow-matching objective and default blocks:
  LoRA rank 16 with 8-bit AdamW (FLUX: on an nf4 base and on a bf16 one) and full finetuning; a row whose bytes
  before activations exceed the device's free memory is skipped with the count (FLUX full needs 190 GB); and the
  byte counts of the real models' configurations against the memory goals (``memory_bytes``,
  :mod:`tcompose.bench.memory`), printed whether or not the steps run;
- ``baseline``: the same step as the original implementation ran it (:mod:`tcompose.bench.baseline`: fp32,
  batch 1, explicit attention in every layer, every map kept), in this process; the headline is
  ``speedup = best train images/s / baseline images/s``;
- ``generate``: images/s and UNet steps/s per ``--batch-sizes``; ``detect``: OWLv2-L images/s; ``masks``:
  GroundingDINO-T + SAM-HQ ViT-H images/s (:mod:`tcompose.bench.infer`).

Output: a table (section, setting, figure, unit) and the targets on stderr; the whole report as JSON with
``--json -`` (stdout) or ``--json PATH``. Targets are judged on CUDA only ("n/a (CPU)" elsewhere).
A section that fails (e.g. out of memory) is recorded as ``{"error": ...}`` and the rest still runs.
"""

from __future__ import annotations

import gc
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..io.errors import UserError
from ..models.precision import TF32_DEFAULT, set_tf32

SECTIONS = ("train", "sdxl", "sd3", "flux", "baseline", "generate", "detect", "masks")
CHECKPOINTING = {"off": (False,), "on": (True,), "both": (False, True)}
FULL = dict(unet="sd14", owlv2="large", masks="real", resolution=512, train_batch_sizes=(8,), batch_sizes=(1, 8, 16),
            warmup=2, steps=2, rounds=5, gen_steps=25, infer_batch_size=8, image_wh=(640, 480), boxes=4,
            sdxl="sdxl", sdxl_resolution=1024, sdxl_batch_sizes=(1, 4), lora_ranks=(None, 64),
            sd3="sd35-medium", flux="flux-dev", dit_resolution=1024, dit_lora_rank=16, sd3_text_len=77 + 256,
            flux_text_len=512)
QUICK = dict(unet="tiny", owlv2="tiny", masks="tiny", resolution=128, train_batch_sizes=(2,), batch_sizes=(1, 2),
             warmup=1, steps=1, rounds=2, gen_steps=2, infer_batch_size=2, image_wh=(96, 64), boxes=2,
             sdxl="tiny-sdxl", sdxl_resolution=128, sdxl_batch_sizes=(1,), lora_ranks=(None, 4),
             sd3="tiny-sd35", flux="tiny-flux", dit_resolution=128, dit_lora_rank=4, sd3_text_len=77 + 16,
             flux_text_len=32)


@dataclass
class BenchConfig:
    """What to measure. ``None`` means the mode's default (:data:`FULL`, or :data:`QUICK` with ``quick``)."""

    sections: tuple[str, ...] = SECTIONS
    quick: bool = False  # tiny test models, small sizes, 1 round: the smoke run the tests use
    device: str | None = None  # default: cuda if available, else cpu
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32: training autocast and inference
    batch_sizes: tuple[int, ...] | None = None  # generation batch sizes (FULL: 1, 8, 16)
    train_batch_sizes: tuple[int, ...] | None = None  # train-unet step batch sizes (FULL: 8)
    gradient_checkpointing: str = "both"  # off | on | both
    resolution: int | None = None  # pixels (FULL: 512; latents are resolution / 8)
    compile: bool | None = None  # torch.compile the UNet's ResNet and feed-forward blocks (train section);
    #   None: on for CUDA real-size runs, off on CPU and with quick (minutes of compiling, slower tiny steps)
    channels_last: str | None = None  # off | on | both: UNet and latents in torch.channels_last (train section);
    #   None: both on CUDA real-size runs (to measure whether train-unet's --channels-last pays), off otherwise
    tf32: bool = TF32_DEFAULT  # --tf32/--no-tf32 (tcompose.models.precision): TF32 matmuls and cuDNN convolutions
    #   on CUDA in every section but the baseline; the same setting and default as train-unet and train-clip
    rounds: int | None = None  # timed rounds (FULL: 5; variants alternate, order flips every round)
    steps: int | None = None  # timed training steps per variant per round (FULL: 2)
    warmup: int | None = None  # untimed calls per variant (FULL: 2)
    gen_steps: int | None = None  # denoising steps per generated image (FULL: 25)
    infer_batch_size: int | None = None  # detection and masks batch (FULL: 8)
    threads: int | None = None  # torch.set_num_threads
    settings: dict[str, Any] = field(default_factory=dict, repr=False)  # filled by resolve()

    def resolve(self) -> "BenchConfig":
        """Check the options and fill :attr:`settings` with every effective value."""
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown or not self.sections:
            raise UserError(f"--sections: unknown {unknown or 'empty'}; choose from {', '.join(SECTIONS)}")
        if self.gradient_checkpointing not in CHECKPOINTING:
            raise UserError(f"--gradient-checkpointing must be off, on or both, got {self.gradient_checkpointing!r}")
        if self.channels_last not in (None, *CHECKPOINTING):
            raise UserError(f"channels_last must be off, on or both, got {self.channels_last!r}")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise UserError(f"--dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}")
        base = dict(QUICK if self.quick else FULL)
        for key in ("batch_sizes", "train_batch_sizes", "resolution", "rounds", "steps", "warmup", "gen_steps",
                    "infer_batch_size"):
            if getattr(self, key) is not None:
                base[key] = getattr(self, key)
        ints = [*base["batch_sizes"], *base["train_batch_sizes"], base["resolution"], base["rounds"], base["steps"],
                base["gen_steps"], base["infer_batch_size"]]
        if not base["batch_sizes"] or not base["train_batch_sizes"] or min(ints) < 1 or base["warmup"] < 0:
            raise UserError("--batch-sizes, --train-batch-size, --resolution, --rounds and the step counts must be "
                            ">= 1 (--warmup >= 0)")
        if base["resolution"] % 64:
            raise UserError(f"--resolution must be a multiple of 64 (the UNet downsamples latents 3x), "
                            f"got {base['resolution']}")
        self.settings = base
        return self


# --------------------------------------------------------------------------------------------------- machine


def machine_info(device) -> dict[str, Any]:
    import torch

    from .measure import cpu_model, device_name

    info = {"device": device.type, "device_name": device_name(device), "cpu_model": cpu_model(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_memory_gb=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                    capability=f"{props.major}.{props.minor}")
    for lib in ("diffusers", "transformers"):
        info[lib] = __import__(lib).__version__
    return info


def matmul_rate(device, quick: bool) -> dict[str, Any]:
    """The device's dense matmul rate, measured: bf16 n=8192 on CUDA, fp32 (n=512 quick, 2048 full) on CPU."""
    import torch

    from .measure import sync

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    n = 8192 if cuda else (512 if quick else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    budget = time.perf_counter() + (0.3 if quick else 2.0)
    while len(times) < 5 or (time.perf_counter() < budget and len(times) < 200):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"dtype": "bf16" if cuda else "fp32", "n": n, "calls": len(times),
            "tflops": round(2 * n**3 / best / 1e12, 4),
            "tflops_median": round(2 * n**3 / statistics.median(times) / 1e12, 4),
            "note": ("peak of a bf16 [n, n] @ [n, n] matmul on this GPU (fastest of the calls)" if cuda else
                     "fp32 [n, n] @ [n, n] matmul on this CPU's threads (fastest of the calls); CPUs have no "
                     "comparable bf16 peak, so CPU MFU is relative to fp32")}


def estimate_step_tflop(size: str, batch_size: int, latent: int) -> float:
    """FLOPs of a plain training step counted on the meta device (no memory, no compute), for estimates."""
    import torch
    from diffusers import UNet2DConditionModel

    from ..grounding.objective import tokencompose_losses
    from ..testing.tiny_sd import tiny_unet_config
    from .measure import count_flops
    from .train import LAYERS, PLAIN, make_batch, make_scheduler

    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel(**tiny_unet_config(size))
    lat, emb, batch = make_batch(batch_size, latent, unet.config.cross_attention_dim, meta)
    sched = make_scheduler()
    return count_flops(lambda: tokencompose_losses(unet, lat, emb, batch, sched, LAYERS,
                                                   backward=lambda loss: loss.backward(), **PLAIN)) / 1e12


# ------------------------------------------------------------------------------------------------------ run


def _section(report: dict, name: str, fn, say) -> Any:
    """Run one section; an exception is recorded (``{"error": ...}``) and the bench goes on."""
    import torch

    t0 = time.perf_counter()
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 (OOM on one batch size must not lose the other sections)
        msg = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
        report["errors"].append({"section": name, "error": msg})
        say(f"[bold red]{name} failed:[/] {msg}")
        return {"error": msg}
    finally:
        report["section_s"][name] = round(time.perf_counter() - t0, 1)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    """Measure ``cfg.sections`` and return the report (see :func:`tcompose.bench.report.summarise`)."""
    import torch

    from ..models.loading import torch_dtype
    from .baseline import bench_baseline
    from .infer import bench_detect, bench_generate, bench_masks, build_sd_pipeline, clip_tokenizer
    from .report import summarise
    from .measure import PeakMemory
    from .train import bench_unet, bench_vae_encode

    cfg.resolve()
    s = cfg.settings
    from rich.console import Console

    console = Console(stderr=True)
    say = console.print if progress else (lambda *a, **k: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but CUDA is not available here; pass --device cpu")
    set_tf32(cfg.tf32, device)  # the baseline always runs with torch's defaults (see bench_baseline)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    compile_unet = cfg.compile if cfg.compile is not None else (device.type == "cuda" and not cfg.quick)
    channels_last = cfg.channels_last or ("both" if device.type == "cuda" and not cfg.quick else "off")
    infer_dtype, dtype_note = torch_dtype(dtype, device)
    latent = s["resolution"] // 8
    t_start = time.perf_counter()
    report: dict[str, Any] = {"tcompose_bench": 1, "quick": cfg.quick, "errors": [], "section_s": {}, "notes": []}
    report["machine"] = machine_info(device)
    report["settings"] = {**{k: v for k, v in asdict(cfg).items() if k != "settings"}, **s, "dtype": dtype,
                          "device": str(device), "latent_size": latent, "sections": list(cfg.sections),
                          "compile": compile_unet, "channels_last": channels_last}
    if dtype_note:
        report["notes"].append(dtype_note)
    if device.type == "cuda":
        report["notes"].append(
            f"TF32 (--tf32/--no-tf32) {'on' if cfg.tf32 else 'off'} for matmuls and cuDNN convolutions in every "
            "section but the baseline, which runs with torch's defaults (TF32 matmuls off, cuDNN convolutions on), "
            "as the original did")
    mem = PeakMemory(device)
    report["memory_note"] = mem.note
    say(f"[bold]tcompose bench[/] on {report['machine']['device_name']} ({device}), {dtype}, "
        f"{'quick (tiny models)' if cfg.quick else 'real-size models'}")
    report["matmul"] = matmul_rate(device, cfg.quick)
    if device.type == "cpu" and not cfg.quick:
        per_image = estimate_step_tflop(s["unet"], 1, latent)
        rate = report["matmul"]["tflops"]
        images = 0
        if "train" in cfg.sections:
            per_mode = (s["warmup"] + s["steps"] * s["rounds"]) * 2
            images += sum(b * (per_mode * len(CHECKPOINTING[cfg.gradient_checkpointing]) + 2)
                          for b in s["train_batch_sizes"])
        if "baseline" in cfg.sections:
            images += s["warmup"] + s["steps"] * s["rounds"] + 1
        warn = (f"full-size models on CPU: an SD1.4 training step costs {per_image:.1f} TFLOP per image, about "
                f"{per_image / rate:.0f} s at this CPU's {rate:.3f} TFLOP/s"
                + (f"; the selected training sections alone need ~{images * per_image / rate / 60:.0f} min" if images
                   else "") + " (generation, detection and masks add more). Use --quick for a smoke run.")
        report["notes"].append(warn)
        console.print(f"[bold yellow]warning:[/] {warn}")

    if "train" in cfg.sections:
        rows = []
        for b, rank in ((b, r) for b in s["train_batch_sizes"] for r in s["lora_ranks"]):
            say(f"train: {s['unet']} UNet, batch {b}, {s['resolution']} px, {dtype}, checkpointing "
                f"{cfg.gradient_checkpointing}{', compiled' if compile_unet else ''}, channels_last {channels_last}, "
                f"{'LoRA rank ' + str(rank) if rank else 'full finetuning'}")

            def train(b=b, rank=rank):
                rows = bench_unet(s["unet"], b, latent, dtype, CHECKPOINTING[cfg.gradient_checkpointing], s["warmup"],
                                  s["steps"], s["rounds"], device, mem, flops=True, compile=compile_unet,
                                  channels_last=CHECKPOINTING[channels_last], lora_rank=rank)
                # The step above starts from latents, as with --cache-latents; without it each step also encodes.
                enc = bench_vae_encode(s["unet"], b, latent, dtype, min(s["warmup"], 1), max(s["rounds"], 3), device)
                for row in rows:
                    row.update(enc, images_per_s_with_vae_encode=round(b / (row["step_s_tc"] + enc["vae_encode_s"]), 3),
                               vae_encode_share=round(enc["vae_encode_s"] / (row["step_s_tc"] + enc["vae_encode_s"]), 4))
                return rows

            got = _section(report, f"train_b{b}" + (f"_lora{rank}" if rank else ""), train, say)
            rows += got if isinstance(got, list) else [{"batch_size": b, "lora_rank": rank, **got}]
        report["train"] = rows
    if "sdxl" in cfg.sections:
        rows, xl_latent = [], s["sdxl_resolution"] // 8
        for b, rank in ((b, r) for b in s["sdxl_batch_sizes"] for r in s["lora_ranks"]):
            say(f"sdxl: {s['sdxl']} UNet, batch {b}, {s['sdxl_resolution']} px, {dtype}, checkpointing "
                f"{cfg.gradient_checkpointing}, {'LoRA rank ' + str(rank) if rank else 'full finetuning'}")
            got = _section(report, f"sdxl_b{b}" + (f"_lora{rank}" if rank else ""), lambda b=b, rank=rank: bench_unet(
                s["sdxl"], b, xl_latent, dtype, CHECKPOINTING[cfg.gradient_checkpointing], s["warmup"], s["steps"],
                s["rounds"], device, mem, flops=True, lora_rank=rank), say)
            rows += got if isinstance(got, list) else [{"batch_size": b, "lora_rank": rank, **got}]
        report["sdxl"] = rows
    for name in ("sd3", "flux"):
        if name in cfg.sections:
            from .dit import describe, section_rows
            from .memory import DIT_CONFIGS, dit_memory_table

            say(describe(name, s, dtype, cfg.gradient_checkpointing))
            report[name] = section_rows(name, s, dtype, CHECKPOINTING[cfg.gradient_checkpointing], device, mem,
                                        lambda row, fn: _section(report, row, fn, say))
            sizes = {"sd3": "sd35-medium", "flux": "flux-dev"}[name]  # the real models' bytes, whatever the mode
            report.setdefault("memory_bytes", []).extend(
                dit_memory_table([c for c in DIT_CONFIGS if c[0] == sizes], "bf16"))
    if "baseline" in cfg.sections:
        say(f"baseline: {s['unet']} UNet, fp32, batch 1, explicit attention everywhere, every map kept")
        report["baseline"] = _section(report, "baseline", lambda: bench_baseline(
            s["unet"], latent, s["warmup"], s["steps"], max(s["rounds"], 1), device, mem, flops=True), say)

    with tempfile.TemporaryDirectory(prefix="tcompose-bench-") as tmp:
        root = Path(tmp)
        tok = None
        if "generate" in cfg.sections or "detect" in cfg.sections:
            tok = clip_tokenizer(root / "tokenizer", real_vocab=not cfg.quick)
        if "generate" in cfg.sections:
            say(f"generate: {s['unet']} pipeline, batch sizes {list(s['batch_sizes'])}, {s['gen_steps']} steps")

            def generate():
                pipe = build_sd_pipeline(s["unet"], device, infer_dtype, tok)
                res = None if cfg.quick else s["resolution"]
                try:
                    return bench_generate(pipe, s["batch_sizes"], s["gen_steps"], res, min(s["warmup"], 1),
                                          s["rounds"], device, mem)
                finally:
                    del pipe

            report["generate"] = _section(report, "generate", generate, say)
        if "detect" in cfg.sections:
            side = s["resolution"] if not cfg.quick else 64
            say(f"detect: OWLv2-{s['owlv2']}, batch {s['infer_batch_size']}, {side} px images")
            report["detect"] = _section(report, "detect", lambda: bench_detect(
                s["owlv2"], tok, s["infer_batch_size"], side, min(s["warmup"], 1), s["rounds"], device, infer_dtype,
                mem), say)
        if "masks" in cfg.sections:
            say(f"masks: GroundingDINO + SAM-HQ ({s['masks']}), batch {s['infer_batch_size']}")
            report["masks"] = _section(report, "masks", lambda: bench_masks(
                s["masks"], root / "masks-models", s["infer_batch_size"], tuple(s["image_wh"]), s["boxes"],
                min(s["warmup"], 1), s["rounds"], device, infer_dtype, mem), say)
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    return summarise(report)


def write_json(report: dict, dest: str | Path) -> None:
    """``-``: stdout; else a file, written atomically."""
    import json
    import os

    text = json.dumps(report, indent=2, allow_nan=False)
    if str(dest) == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    path = Path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
