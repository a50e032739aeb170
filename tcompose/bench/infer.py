"""Inference sections of ``tcompose bench``: generation, OWLv2 detection, the masks stage's models.

Random-initialised models built from configs (nothing is downloaded), run through the package's own code
paths, timed after a warm-up (CUDA synchronised), median over ``rounds``:

- generation: :func:`tcompose.models.sampling.generate_batch` on a ``StableDiffusionPipeline`` (``sd14``: SD1.4's
  UNet, VAE and CLIP ViT-L/14 text encoder shapes; ``tiny``: tcompose.testing.tiny_sd), guidance 7.5, images/s
  per batch size; and the UNet alone, one denoising step at 2 x batch (classifier-free guidance), steps/s;
- detection: :meth:`tcompose.evaluate.detect.Owlv2Detector.detect` (``large``: OWLv2-L/14 at 1008 px; ``tiny``) on
  generated-size images, 5 category queries each;
- masks: GroundingDINO (``real``: GroundingDINO-T; ``tiny``) :meth:`~tcompose.masks.grounding_dino.Detector.detect`
  on 3 phrases per image, then SAM-HQ (``real``: ViT-H at 1024 px) :meth:`~tcompose.masks.segment.Segmenter.segment`
  with a fixed number of boxes per image (random detectors find arbitrary numbers of boxes). Inputs come from
  :meth:`tcompose.masks.grounded_sam.GroundedSamPrep.preprocess`, timed apart: in the masks stage it runs in the
  loader's worker processes, beside the models. ``images_per_s`` is the models' rate (detector + segmenter).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch

from .measure import PeakMemory, alternate, timed

PROMPTS = [
    "a cat and a wine glass", "a red ball on a wooden table", "two dogs next to a blue car",
    "a bicycle leaning on a tree", "an apple, a banana and a knife", "a clock above a sofa",
    "a horse and a sheep in a field", "a laptop beside a cup of coffee",
]
PHRASES = ["a red ball", "a cup", "a dog"]
# SD1.4's VAE (vae/config.json) and text encoder (CLIP ViT-L/14's text tower) shapes.


def clip_tokenizer(folder: Path, real_vocab: bool):
    """A CLIPTokenizer written to ``folder``: CLIP's real 49,408-token vocabulary when this machine has the BPE
    file and ``real_vocab``, else a small one trained on the bench's prompts (offline, tens of ms)."""
    from transformers import CLIPTokenizer

    from ..data.categories import COCO_80
    from ..evaluate.detect import query_text
    from ..data.clip_bpe import find_clip_bpe, write_clip_tokenizer

    bpe = find_clip_bpe() if real_vocab else None
    corpus = PROMPTS + [query_text(n) for n in COCO_80]
    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder, bpe_path=bpe, corpus=None if bpe else corpus))


def build_sd_pipeline(size: str, device: torch.device, dtype: torch.dtype, tokenizer):
    """A random StableDiffusionPipeline: ``sd14`` (SD1.4 shapes, 512 px) or ``tiny`` (64 px), PNDM, no checker."""
    from diffusers import PNDMScheduler

    from ..models.families import Components, family_of
    from ..testing.tiny_sd import SD_SCHEDULER, SD_TEXT, SD_VAE, build_tiny_text_encoder, build_tiny_unet, build_tiny_vae

    unet = build_tiny_unet(0, size=size)
    vae = build_tiny_vae(1, **(SD_VAE if size == "sd14" else {}))
    text = build_tiny_text_encoder(
        len(tokenizer), 2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        **(SD_TEXT if size == "sd14" else {"hidden_size": unet.config.cross_attention_dim}))
    comps = Components(family_of(unet), unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                       noise_scheduler=None)
    pipe = comps.pipeline(PNDMScheduler.from_config(SD_SCHEDULER))  # the family's pipeline, no safety checker
    pipe.to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_generate(pipe, batch_sizes, steps: int, resolution: int | None, warmup: int, rounds: int,
                   device: torch.device, mem: PeakMemory) -> list[dict]:
    """Per batch size: images/s of :func:`generate_batch` (``steps`` PNDM steps, guidance 7.5) and UNet
    denoising steps/s at 2 x batch (the guided batch)."""
    from ..models.sampling import generate_batch

    side = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    lat = side // pipe.vae_scale_factor
    cross = pipe.unet.config.cross_attention_dim
    out = []
    for b in batch_sizes:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
        seeds = list(range(b))
        x = torch.randn(2 * b, pipe.unet.config.in_channels, lat, lat, device=device, dtype=pipe.unet.dtype)
        emb = torch.randn(2 * b, 77, cross, device=device, dtype=pipe.unet.dtype)
        t = torch.tensor(500, device=device)

        def unet_step() -> None:
            with torch.inference_mode():
                pipe.unet(x, t, encoder_hidden_states=emb)

        fns = {"generate": lambda: generate_batch(pipe, prompts, seeds, steps=steps, guidance=7.5, height=side,
                                                  width=side),
               "unet": lambda: timed(unet_step, steps, device)}
        res = alternate(fns, warmup, 1, rounds, device, mem)
        gen = statistics.median(res["generate"]["times"])
        unet_s = statistics.median(res["unet"]["times"]) / steps
        out.append({"batch_size": b, "resolution": side, "steps": steps, "s_per_batch": round(gen, 5),
                    "images_per_s": round(b / gen, 4), "unet_steps_per_s": round(1 / unet_s, 3),
                    "unet_batch": 2 * b, "peak_mem_mb": round(max(r["peak_mb"] for r in res.values()), 1)})
    return out


def bench_detect(size: str, tokenizer, batch_size: int, image_side: int, warmup: int, rounds: int,
                 device: torch.device, dtype: torch.dtype, mem: PeakMemory) -> dict:
    """Images/s of OWLv2 (``large`` or ``tiny``) on ``batch_size`` random images with 5 queries each."""
    from ..data.categories import COCO_80
    from ..evaluate.detect import Owlv2Detector
    from ..testing.tiny_detectors import build_owlv2

    vocab = tokenizer.get_vocab()
    model = build_owlv2(size, 0, vocab_size=len(vocab), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    det = Owlv2Detector(model, tokenizer, device, dtype)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8) for _ in range(batch_size)]
    names = [[COCO_80[(5 * i + k) % len(COCO_80)] for k in range(5)] for i in range(batch_size)]
    res = alternate({"detect": lambda: det.detect(images, names)}, warmup, 1, rounds, device, mem)["detect"]
    med = statistics.median(res["times"])
    out = {"model": f"owlv2-{size}", "model_image_size": det.image_size, "input_side": image_side,
           "batch_size": batch_size, "queries_per_image": 5, "s_per_batch": round(med, 5),
           "images_per_s": round(batch_size / med, 4), "peak_mem_mb": round(res["peak_mb"], 1)}
    del det, model
    return out


def _masks_models(size: str, folder: Path, device: torch.device, dtype: torch.dtype, batch_size: int):
    from ..masks.grounding_dino import Detector
    from ..masks.segment import Segmenter
    from ..testing import tiny_vision as tv
    from ..models.loading import quiet_transformers

    if size == "tiny":
        with quiet_transformers():
            gd = tv.write_tiny_grounding_dino(folder / "gd", words=[w for p in PHRASES for w in p.split()])
            sam = tv.write_tiny_sam(folder / "sam", hq=True)
        return (Detector.load(str(gd), device=device, dtype=dtype, batch_size=batch_size),
                Segmenter.load(str(sam), device=device, dtype=dtype, batch_size=batch_size))
    from transformers.models.grounding_dino import GroundingDinoImageProcessorPil
    from transformers.models.sam import SamImageProcessorPil

    tok = tv.bert_tokenizer([w for p in PHRASES for w in p.split()])
    det = Detector(tv.build_grounding_dino("real", seed=0).to(device, dtype), tok, GroundingDinoImageProcessorPil(),
                   batch_size=batch_size)
    seg = Segmenter(tv.build_sam("real", hq=True, seed=0).to(device, dtype), SamImageProcessorPil(), batch_size)
    return det, seg


def bench_masks(size: str, folder: Path, batch_size: int, image_wh: tuple[int, int], boxes_per_image: int,
                warmup: int, rounds: int, device: torch.device, dtype: torch.dtype, mem: PeakMemory) -> dict:
    """Images/s of GroundingDINO + SAM-HQ (``real`` or ``tiny``) on ``batch_size`` random images."""
    from PIL import Image

    from ..masks.grounded_sam import GroundedSamPrep

    det, seg = _masks_models(size, folder, device, dtype, batch_size)
    w, h = image_wh
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(batch_size)]
    prep = GroundedSamPrep("vocab", det.image_processor, seg.image_processor)
    inputs = prep.preprocess(images)
    prompts = det.prompts(PHRASES).prompts
    jobs = [(j, p) for j in range(batch_size) for p in prompts]
    sizes = [(h, w)] * batch_size
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(batch_size, boxes_per_image, 2, generator=g) * torch.tensor([w / 2, h / 2])
    wh = (0.2 + 0.3 * torch.rand(batch_size, boxes_per_image, 2, generator=g)) * torch.tensor([w, h])
    boxes = list(torch.cat([xy, xy + wh], -1).unbind(0))
    fns = {"preprocess": lambda: prep.preprocess(images), "detector": lambda: det.detect(inputs["detector"], jobs, sizes),
           "segmenter": lambda: seg.segment(inputs["segmenter"], boxes)}
    res = alternate(fns, warmup, 1, rounds, device, mem)
    med = {k: statistics.median(v["times"]) for k, v in res.items()}
    out = {"detector": "grounding-dino-" + ("tiny (GroundingDINO-T)" if size == "real" else "test-size"),
           "segmenter": "sam-hq-" + ("vit-h" if size == "real" else "test-size"), "batch_size": batch_size,
           "image_size": [w, h], "phrases_per_image": len(PHRASES), "boxes_per_image": boxes_per_image,
           "detector_s_per_batch": round(med["detector"], 5), "segmenter_s_per_batch": round(med["segmenter"], 5),
           "preprocess_s_per_batch": round(med["preprocess"], 5),
           "images_per_s": round(batch_size / (med["detector"] + med["segmenter"]), 4),
           "images_per_s_incl_preprocess": round(batch_size / sum(med.values()), 4),
           "peak_mem_mb": round(max(r["peak_mb"] for r in res.values()), 1)}
    del det, seg
    return out

