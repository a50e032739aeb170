"""Time one full TokenCompose training step with the grounding losses off ("plain") and on ("tc").

One step is what the training loop does per batch: ``tokencompose_losses(..., backward=...)`` (UNet forward,
the denoising loss and, for "tc", the token and pixel losses on the captured cross-attention maps; then
backward), ``optimizer.step()`` (AdamW) and ``optimizer.zero_grad(set_to_none=True)``. Both configurations
use the same model, optimizer, batch and precision in this one process; they alternate round by round (the
order flips every round), so drift on the machine affects both. The figure of merit is

    overhead_ratio = median step time (tc) / median step time (plain)

Prints one JSON object to stdout (and to ``--json PATH``) and a short table to stderr::

    .venv/bin/python benchmarks/train_step.py --sizes tiny,medium --device cpu
    python benchmarks/train_step.py --sizes sd14 --device cuda --dtype bf16 --batch-size 8 --gradient-checkpointing both

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset before every timed segment); on CPU the
process's peak RSS (``resource.getrusage``), made resettable per segment where Linux allows it
(``malloc_trim`` then ``/proc/self/clear_refs``), so the CPU figure includes the model, the optimizer state,
the Python runtime and whatever the allocator keeps.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from tcompose.losses import pad_words
from tcompose.objective import tokencompose_losses
from tcompose.tiny_models import UNET_SIZES, build_tiny_unet, count_parameters

PLAIN = dict(lambda_token=0.0, gamma_pixel=0.0)
TC = dict(lambda_token=1e-3, gamma_pixel=5e-5)
LAYERS = ("mid", "up")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_LEN = 77
SEED = 0


# ----------------------------------------------------------------------------------------------------- batch


def make_batch(batch_size: int, latent_size: int, cross_dim: int, device: torch.device, seed: int = SEED) -> tuple:
    """Random latents, text embeddings, noise, timesteps, words and rectangle masks at pixel size 8 * latent."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    b, s = batch_size, latent_size
    r = 8 * s  # masks arrive at pixel resolution; the objective resizes them to each attention map's side
    latents = torch.randn(b, 4, s, s, generator=g)
    emb = torch.randn(b, TEXT_LEN, cross_dim, generator=g)
    noise = torch.randn(b, 4, s, s, generator=g)
    timesteps = torch.randint(0, 1000, (b,), generator=g)
    words = []
    for _ in range(b):
        pos, ws = 1, []  # position 0 is <|startoftext|>
        for _ in range(rng.randint(2, 4)):
            pos += rng.randint(0, 1)
            n_tok = rng.choice((1, 1, 2, 3))  # some words span several tokens
            ws.append(list(range(pos, pos + n_tok)))
            pos += n_tok
        assert ws[-1][-1] < 20
        words.append(ws)
    index, valid = pad_words(words)
    masks = torch.zeros(b, index.shape[1], r, r)
    for i, ws in enumerate(words):
        for j in range(len(ws)):
            h, w = rng.randint(r // 8, r // 2), rng.randint(r // 8, r // 2)
            y, x = rng.randint(0, r - h), rng.randint(0, r - w)
            masks[i, j, y : y + h, x : x + w] = 1.0
    batch = {"noise": noise, "timesteps": timesteps, "masks": masks, "word_index": index, "word_valid": valid}
    batch = {k: v.to(device) for k, v in batch.items()}
    return latents.to(device), emb.to(device), batch


def make_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False)


# ------------------------------------------------------------------------------------------------- precision


class Autocast(torch.nn.Module):
    """The UNet's forward under autocast, as accelerate's ``prepare`` wraps it: fp32 master weights, the
    losses outside autocast. ``.module`` is the UNet (what the objective unwraps to capture attention)."""

    def __init__(self, module: torch.nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ memory


class PeakMemory:
    """Peak memory of a region: CUDA allocated bytes, or the process's peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.resettable = False
        self._trim = None
        if not self.cuda:
            try:
                self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                self._trim = None
            self.resettable = self._reset_rss()

    @property
    def note(self) -> str:
        if self.cuda:
            return "peak_mem_mb: torch.cuda.max_memory_allocated, reset before every timed segment"
        how = ("reset before every timed segment via malloc_trim + /proc/self/clear_refs" if self.resettable
               else "not resettable here: monotone over the whole process, so later configs include earlier ones")
        return ("peak_mem_mb on CPU is the process's peak RSS (resource.getrusage ru_maxrss), " + how +
                "; it includes the model, optimizer state, the Python runtime and memory the allocator keeps")

    def _reset_rss(self) -> bool:
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self._reset_rss()

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
        return kb / 1024 if sys.platform != "darwin" else kb / 2**20


# ------------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_size(size: str, args, device: torch.device, mem: PeakMemory) -> list[dict]:
    cfg = UNET_SIZES[size]
    latent = args.latent_size or cfg["sample_size"]
    unet = build_tiny_unet(SEED, size=size).to(device)
    unet.train()
    params_m = count_parameters(unet) / 1e6
    amp = DTYPES[args.dtype]
    model = unet if amp is None else Autocast(unet, device.type, amp)
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-6, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type) if amp is torch.float16 else None
    if scaler is None:
        backward = lambda loss: loss.backward()  # noqa: E731
    else:
        backward = lambda loss: scaler.scale(loss).backward()  # noqa: E731
    latents, emb, batch = make_batch(args.batch_size, latent, cfg["cross_attention_dim"], device)
    sched = make_scheduler()

    def step(weights: dict) -> None:
        losses = tokencompose_losses(model, latents, emb, batch, sched, LAYERS, backward=backward, **weights)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
        if not math.isfinite(float(losses["total"].detach())):
            raise FloatingPointError(f"{size}: non-finite loss {losses}")

    def segment(weights: dict, n: int) -> list[float]:
        times = []
        for _ in range(n):
            _sync(device)
            t0 = time.perf_counter()
            step(weights)
            _sync(device)
            times.append(time.perf_counter() - t0)
        return times

    modes = {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]
    results = []
    for ckpt in modes:
        if ckpt:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        configs = {"plain": PLAIN, "tc": TC}
        for weights in configs.values():
            segment(weights, args.warmup)
        times = {name: [] for name in configs}
        peaks = {name: 0.0 for name in configs}
        rounds = []
        for r in range(args.rounds):
            order = ("plain", "tc") if r % 2 == 0 else ("tc", "plain")
            this = {}
            for name in order:
                mem.reset()
                this[name] = segment(configs[name], args.steps)
                peaks[name] = max(peaks[name], mem.peak_mb())
                times[name] += this[name]
            rounds.append(statistics.median(this["tc"]) / statistics.median(this["plain"]))
        plain, tc = statistics.median(times["plain"]), statistics.median(times["tc"])
        results.append({
            "size": size,
            "params_m": round(params_m, 3),
            "batch_size": args.batch_size,
            "latent_size": latent,
            "dtype": args.dtype,
            "gradient_checkpointing": ckpt,
            "step_s_plain": round(plain, 5),
            "step_s_tc": round(tc, 5),
            "overhead_ratio": round(tc / plain, 4),
            "images_per_s": round(args.batch_size / tc, 3),
            "images_per_s_plain": round(args.batch_size / plain, 3),
            "peak_mem_mb": round(peaks["tc"], 1),
            "peak_mem_mb_plain": round(peaks["plain"], 1),
            "timed_steps": len(times["tc"]),
            "step_s_plain_min": round(min(times["plain"]), 5),
            "step_s_tc_min": round(min(times["tc"]), 5),
            "overhead_ratio_min": round(min(times["tc"]) / min(times["plain"]), 4),
            "round_ratios": [round(x, 4) for x in rounds],
        })
    unet.disable_gradient_checkpointing()
    del model, unet, opt, latents, emb, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,medium", help=f"comma-separated UNet sizes from {sorted(UNET_SIZES)}")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="autocast dtype (fp32: no autocast)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--latent-size", type=int, default=None, help="latent side (default: the config's sample_size)")
    p.add_argument("--gradient-checkpointing", choices=("off", "on", "both"), default="off")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration per round")
    p.add_argument("--rounds", type=int, default=8, help="rounds; plain and tc alternate, order flipped every round")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in UNET_SIZES]
    if unknown or not args.sizes:
        p.error(f"unknown size(s) {unknown}; choose from {sorted(UNET_SIZES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--steps, --rounds and --batch-size must be >= 1, --warmup >= 0")
    return args


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_table(report: dict, file=sys.stderr) -> None:
    head = f"{'size':<7} {'ckpt':<4} {'dtype':<5} {'B':>3} {'lat':>4} {'plain s':>9} {'tc s':>9} {'ratio':>6} " \
           f"{'img/s tc':>9} {'mem tc MB':>10} {'mem pl MB':>10}"
    print(f"# {report['device']} ({report['device_name']}), torch {report['torch']}, {report['threads']} threads",
          file=file)
    print(head, file=file)
    for r in report["results"]:
        print(f"{r['size']:<7} {('on' if r['gradient_checkpointing'] else 'off'):<4} {r['dtype']:<5} "
              f"{r['batch_size']:>3} {r['latent_size']:>4} {r['step_s_plain']:>9.4f} {r['step_s_tc']:>9.4f} "
              f"{r['overhead_ratio']:>6.3f} {r['images_per_s']:>9.2f} {r['peak_mem_mb']:>10.1f} "
              f"{r['peak_mem_mb_plain']:>10.1f}", file=file)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = False  # as in training (accelerate's default)
    mem = PeakMemory(device)
    t0 = time.perf_counter()
    results = []
    for size in args.sizes:
        results += bench_size(size, args, device, mem)
    first = results[0]
    report = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "overhead_ratio": first["overhead_ratio"],
        "step_s_plain": first["step_s_plain"],
        "step_s_tc": first["step_s_tc"],
        "images_per_s": first["images_per_s"],
        "peak_mem_mb": first["peak_mem_mb"],
        "results": results,
        "lambda_token": TC["lambda_token"],
        "gamma_pixel": TC["gamma_pixel"],
        "layers": list(LAYERS),
        "warmup": args.warmup,
        "steps": args.steps,
        "rounds": args.rounds,
        "memory_note": mem.note,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if device.type == "cpu":
        report["cpu_model"] = _cpu_model()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print_table(report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
