"""``tcompose latency``: seconds per image of each model at the paper's setting, the latency column of Table 1.

    tcompose latency --model SD14=CompVis/stable-diffusion-v1-4 --model TC=runs/tc --output latency/

The TokenCompose paper's setting: 50 denoising steps, batch 1, classifier-free guidance 7.5, the model's own
resolution and scheduler, in the precision the model runs in (``--dtype auto``: fp16 on CUDA). For each model
the pipeline is loaded, ``--warmup`` images are drawn untimed (kernel selection, caches), then ``--images``
images one by one, each timed from the prompt to the decoded image with the device synchronised before and
after; the seconds per image are their mean (and standard deviation). The device is named in the result:
latency is a property of the hardware as much as of the model (TokenCompose's UNet is SD1.4's with other
weights, so the two should match within noise on one machine).

``OUT/latency.json``: ``{"models": {NAME: {"s_per_image", "std_s", "images", "warmup", "steps", "guidance",
"batch_size": 1, "height", "width", "dtype", "device", "device_name", "torch", "model": ...}}}``; a rerun adds
or replaces the models it names and keeps the others.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..io.errors import UserError
from .settings import GenerationSettings

PROMPT = "a photo of a cat, a dog, a wine glass, a bench and a kite"  # a MultiGen-style 5-object prompt
LATENCY_JSON = "latency.json"


@dataclass
class LatencyConfig:
    """Settings of ``tcompose latency``."""

    models: list[str]
    output: Path
    images: int = 5
    warmup: int = 1
    settings: GenerationSettings = field(default_factory=lambda: GenerationSettings.for_stage("latency"))
    """Steps, guidance, scheduler, size, dtype, seed, device; ``batch_size`` must stay 1 (images are timed one by
    one) and ``safety_checker`` is not used (the pipeline is timed without it)."""
    prompt: str = PROMPT

    def __post_init__(self):
        self.output = Path(self.output)
        self.models = list(self.models)


def device_name(device) -> str:
    """The accelerator's name (``NVIDIA H200``), or the CPU's."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def excited_in(pipe, prompt: str, excite) -> list[int]:
    """The token positions Attend-and-Excite excites in a free prompt: ``--excite-words``, else its noun phrases."""
    from ..data.text import noun_phrases
    from ..models.families import components_of_pipeline
    from ..models.sampling import excite_positions

    return excite_positions(components_of_pipeline(pipe), prompt, excite.words or noun_phrases(prompt),
                            required=bool(excite.words))


def time_images(pipe, cfg: LatencyConfig, device) -> list[float]:
    """Seconds of each timed image (after the warm-up ones), batch 1."""
    from ..models.sampling import generate_batch, image_seed

    from .sampling import settings_for

    s = settings_for(pipe, cfg.settings)
    excite = [excited_in(pipe, cfg.prompt, s.excite)] if s.excite is not None else None
    times = []
    for i in range(cfg.warmup + cfg.images):
        _sync(device)
        t0 = time.perf_counter()
        generate_batch(pipe, [cfg.prompt], [image_seed(s.seed, 0, i)], s.steps, s.guidance, s.height, s.width,
                       excite=s.excite, excite_indices=excite)
        _sync(device)
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    return times


def _earlier_results(path: Path) -> dict:
    """The models an earlier run measured into ``path`` (a rerun keeps them); refused when it is not a latency.json."""
    if path.is_dir():
        raise UserError(f"--output {path.parent}: {path} is a folder; move it away or pass another --output")
    if not path.exists():
        return {}
    try:
        models = json.loads(path.read_text())["models"]
        if not isinstance(models, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"--output {path.parent}: {path} is not a latency.json of tcompose latency ({err}); move it "
                        "away or pass another --output") from None
    return models


def run(cfg: LatencyConfig, progress: bool = True) -> dict:
    """Measure every model of ``cfg`` and merge the results into ``OUT/latency.json``."""
    from ..io.datasets import write_json_atomic
    from ..io.files import check_output_folder
    from ..io.runs import output_guard
    from ..models.spec import parse_model_specs
    from .sampling import dtype_name, load_pipeline, resolve_device, resolve_dtype

    if not cfg.models:
        raise UserError("no --model given: pass one or more NAME=ID_OR_PATH")
    s = cfg.settings
    if cfg.images < 1 or cfg.warmup < 0:
        raise UserError("--images must be >= 1 and --warmup >= 0")
    s.validate()
    if s.batch_size != 1:
        raise UserError(f"latency times one image at a time: batch_size must be 1, got {s.batch_size}")
    check_output_folder(cfg.output, "--output")  # before any model loads or any image is timed
    path = cfg.output / LATENCY_JSON
    results = _earlier_results(path)
    specs = parse_model_specs(cfg.models)
    if s.excite is not None:  # the family and --excite-res, before any weight loads
        from .generate import check_excite
        from .sampling import model_facts

        for spec in specs:
            check_excite(s, model_facts(spec.model, spec.unet, spec.revision, s.scheduler))
    device = resolve_device(s.device)
    with output_guard(cfg.output):
        for spec in specs:
            import torch

            from ..models.families import family_of_pipeline
            from .sampling import settings_for

            pipe = load_pipeline(spec.model, unet=spec.unet, text_encoder=spec.text_encoder, revision=spec.revision,
                                 lora=spec.lora, lora_scale=spec.lora_scale, dtype=s.dtype, scheduler=s.scheduler,
                                 device=device)
            times = time_images(pipe, cfg, device)
            drawn = settings_for(pipe, s)
            size = family_of_pipeline(pipe).default_image_size(pipe)
            results[spec.name] = {
                "s_per_image": statistics.fmean(times), "std_s": statistics.pstdev(times), "images": len(times),
                "warmup": cfg.warmup, "steps": drawn.steps, "guidance": drawn.guidance, "batch_size": s.batch_size,
                "height": s.height or size, "width": s.width or size,
                "dtype": dtype_name(resolve_dtype(s.dtype, device)), "scheduler": type(pipe.scheduler).__name__,
                "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
                "model": spec.model, "unet": spec.unet, "text_encoder": spec.text_encoder, "lora": spec.lora,
                **({"attend_excite": s.excite.record()} if s.excite is not None else {}),
            }
            del pipe
            if progress:
                from rich.console import Console

                r = results[spec.name]
                Console(stderr=True).print(f"latency {spec.name}: {r['s_per_image']:.3f} s/img (± {r['std_s']:.3f}, "
                                           f"{r['images']} images, {r['steps']} steps, {r['dtype']}, "
                                           f"{r['device_name']})", highlight=False)
            cfg.output.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {"stage": "latency", "models": results})
    return {"models": results}
