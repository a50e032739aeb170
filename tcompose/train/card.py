"""OUT/README.md: the model card of a train-unet run, in the Hub's format (huggingface_hub's ModelCard).

YAML front matter: ``base_model``, ``license`` (the base model's, read from its own card where it can be found
offline or online; ``other`` otherwise), ``library_name: diffusers``, ``pipeline_tag: text-to-image`` and tags.
The body: how to load it, the command that trained it, the recipe, the data, the grounding score before and
after training, and the last validation grid. A push of OUT to the Hub shows it as any diffusers model's card.
"""

from __future__ import annotations

from pathlib import Path

from ..io.hub import CARD, training_section, write_card
from ..models.loading import model_license
from .config import TrainUnetConfig

__all__ = ["CARD", "card_text", "write_model_card"]


def _n(count, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "es" if noun.endswith("s") else "s")


def _score(g: dict | None) -> str:
    return "not measured (no held-out images)" if not g or g.get("score") is None else f"{g['score']:.4f}"


def card_text(cfg: TrainUnetConfig, summary: dict, license: str | None) -> str:
    """The card: YAML front matter and Markdown body."""
    from huggingface_hub import ModelCardData

    from ..models.families import family_named

    family = family_named(summary.get("family") or "sd")
    lora = summary.get("lora")
    tags = ["tcompose", "tokencompose", *family.card_tags, "text-to-image",
            "diffusers", "diffusers-training"] + (["lora"] if lora else [])
    data = ModelCardData(base_model=str(cfg.model), license=license or "other", library_name="diffusers",
                         pipeline_tag="text-to-image", tags=tags)
    if not license:
        data.license_name = "the base model's licence"
    pipeline = family.pipeline_class_name
    if lora:
        load = (f"pipe = {pipeline}.from_pretrained(\"{cfg.model}\")\npipe.load_lora_weights(\"OUT\")  # this folder")
    else:
        load = f"pipe = {pipeline}.from_pretrained(\"OUT\")  # this folder"
    before, after = summary.get("grounding_before"), summary.get("grounding_after")
    chance = (after or before or {}).get("chance")
    supervised = summary.get("supervised_groups") or {}
    groups = ", ".join(f"{g} ({n} map{'s' if n != 1 else ''})" for g, n in supervised.items())
    d = summary.get("data", {})
    recipe = [
        ("base model", f"`{cfg.model}`" + (f" @ `{cfg.revision}`" if cfg.revision else "")),
        ("trained", f"LoRA rank {lora['rank']}, alpha {lora['alpha']}, on {', '.join(lora['targets'])}" if lora
         else f"the whole {family.denoiser_label}"),
        ("lambda (token loss) / gamma (pixel loss)", f"{cfg.lambda_token:g} / {cfg.gamma_pixel:g}"),
        ("supervised cross-attention", f"{groups} ({summary.get('map_reduction', 'sum')} over a group's maps)"),
        ("resolution", f"{summary.get('resolution')} px"),
        ("steps", f"{summary.get('steps')} (batch {cfg.batch_size} x "
                  f"{_n(summary.get('num_processes', 1), 'process')} x {cfg.grad_accum} accumulation)"),
        ("optimizer", f"{'8-bit AdamW (bitsandbytes)' if cfg.optimizer == 'adamw8bit' else 'AdamW'}, lr {cfg.lr:g} ({cfg.lr_scheduler}), weight decay {cfg.adam_weight_decay:g}"),
        ("precision", {"no": "fp32"}.get(*[summary.get("mixed_precision", cfg.mixed_precision)] * 2)
         + (", gradient checkpointing" if cfg.gradient_checkpointing else "")),
    ]
    flow = summary.get("objective")
    if flow:  # a flow-matching transformer (SD3 / FLUX)
        density = {"logit_normal": f"logit-normal ({flow['logit_mean']:g}, {flow['logit_std']:g})",
                   "mode": f"mode (scale {flow['mode_scale']:g})"}.get(flow["weighting_scheme"], flow["weighting_scheme"])
        guidance = f", guidance {flow['guidance']:g}" if flow.get("guidance") is not None else ""
        recipe.append(("flow matching", f"timesteps {density}{guidance}; attention normalised over "
                                        f"{'the text keys' if flow['attention_norm'] == 'text' else 'all joint keys'}"))
    if summary.get("quantize_base"):
        recipe.append(("frozen base", f"{summary['quantize_base']} (bitsandbytes)"))
    if cfg.snr_gamma:
        recipe.append(("Min-SNR gamma", f"{cfg.snr_gamma:g}"))
    if cfg.noise_offset:
        recipe.append(("noise offset", f"{cfg.noise_offset:g}"))
    if cfg.prediction_type:
        recipe.append(("prediction type", f"{cfg.prediction_type} (--prediction-type)"))
    if cfg.max_train_samples is not None:
        rows = summary.get("data", {}).get("train_rows", cfg.max_train_samples)
        recipe.append(("training rows", f"the first {rows} (--max-train-samples {cfg.max_train_samples})"))
    lines = [
        f"# {Path(cfg.output).name}",
        "",
        f"[TokenCompose](https://arxiv.org/abs/2312.03626) finetuning of `{cfg.model}` with tcompose: the "
        "denoising loss plus token and pixel losses that move each noun's cross-attention into its object's mask.",
        "",
        "## Use",
        "",
        "```python",
        f"from diffusers import {pipeline}",
        "",
        load,
        "image = pipe(\"a cat and a wine glass\").images[0]",
        "```",
        "",
        *training_section(cfg.command, recipe),
        "",
        "## Data",
        "",
        f"`{cfg.data}`: {d.get('train_rows', '?')} training rows, {d.get('heldout_rows', '?')} held out; "
        f"{d.get('words_supervised', '?')} of {d.get('phrases', '?')} phrases supervised.",
        "",
        "## Grounding score",
        "",
        "The share of each noun token's cross-attention inside its object's mask on held-out images (1 is perfect; "
        "attention spread evenly scores the masks' mean area, the chance level).",
        "",
        "| before | after | chance |",
        "|---|---|---|",
        f"| {_score(before)} | {_score(after)} | {'-' if chance is None else f'{chance:.4f}'} |",
    ]
    if summary.get("validation"):
        lines += ["", "## Validation", "", f"![validation grid]({summary['validation']})"]
    body = "\n".join(lines) + "\n"
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def write_model_card(out: Path, cfg: TrainUnetConfig, summary: dict) -> Path:
    """Write OUT/README.md (see the module docstring)."""
    return write_card(out, card_text(cfg, summary, model_license(cfg.model, cfg.revision)))
