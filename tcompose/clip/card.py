"""OUT/README.md: the model card of a train-clip run, in the Hub's format (huggingface_hub's ModelCard).

YAML front matter: ``base_model``, ``license`` (the base model's, read from its own card where it can be found:
:func:`tcompose.models.loading.model_license`; ``other`` otherwise), ``library_name: transformers``,
``pipeline_tag: zero-shot-image-classification`` and tags. The body: how to load it (the ``CLIPModel``, and its
text tower as SD1.x's text encoder), the command that trained it, the recipe, the data, and the held-out evaluation
before and after training (``eval.json``) with its chart (``eval.png``). A push of OUT to the Hub shows it as any
transformers CLIP model's card.
"""

from __future__ import annotations

from pathlib import Path

from ..io.hub import training_section, write_card
from ..models.loading import model_license
from .config import TrainClipConfig
from .eval import LABELS, METRICS, verdict_line

TAGS = ["tcompose", "tokencompose", "clip", "contrastive-learning", "zero-shot-image-classification"]


def _trained(cfg: TrainClipConfig, parameters: dict) -> str:
    if cfg.lock_vision and cfg.lock_text:
        towers = (f"the last {cfg.unlocked_text_layers} text layers, the final norm and the text projection"
                  if cfg.unlocked_text_layers else "the temperature only (both towers locked)")
    elif cfg.lock_text:
        towers = "the vision tower" + (f" and the last {cfg.unlocked_text_layers} text layers"
                                       if cfg.unlocked_text_layers else "")
    elif cfg.lock_vision:
        towers = "the text tower (vision locked)"
    else:
        towers = "both towers"
    counts = f"{parameters['trainable']:,} of {parameters['trainable'] + parameters['frozen']:,} parameters" \
        if parameters else ""
    return towers + (f"; {counts}" if counts else "")


def _evaluation(report: dict | None) -> list[str]:
    if not report or report.get("delta") is None:
        return ["Not evaluated: no held-out crops (`--eval-fraction 0`)."]
    before, after = report["before"], report["after"]
    return [
        f"On {after['images']} held-out crops (of {report.get('heldout_images', '?')} images kept out of training), "
        f"{after['queries']} captions and {after['categories']} categories: zero-shot top-k (each crop "
        "classified among all categories by its caption) and text-to-image recall@k (each caption retrieving the "
        "crops of its category).",
        "",
        "| metric | before | after | delta |",
        "|---|---|---|---|",
        *(f"| {LABELS[m]} | {before[m]:.4f} | {after[m]:.4f} | {after[m] - before[m]:+.4f} |" for m in METRICS),
        "",
        f"Chance: top-1 {after['chance_top1']:.4f}, top-5 {after['chance_top5']:.4f}. Verdict: {verdict_line(report)}.",
    ]


def card_text(cfg: TrainClipConfig, summary: dict, license: str | None, chart: str | None = None) -> str:
    """The card: YAML front matter and Markdown body. ``chart``: the eval chart's path inside OUT, if drawn."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=str(cfg.model), license=license or "other", library_name="transformers",
                         pipeline_tag="zero-shot-image-classification", tags=list(TAGS))
    if not license:
        data.license_name = "the base model's licence"
    d = summary.get("data", {})
    world = summary.get("num_processes", 1)
    precision = summary.get("mixed_precision", cfg.mixed_precision)
    recipe = [
        ("base model", f"`{cfg.model}`" + (f" @ `{cfg.revision}`" if cfg.revision else "")),
        ("trained", _trained(cfg, summary.get("parameters") or {})),
        ("loss", "InfoNCE, " + ("crops of one category positives of each other (--dedupe-labels)"
                                if cfg.dedupe_labels else "CLIP's plain loss (--no-dedupe-labels)")),
        ("temperature", "learnt (logit scale clamped at 100)" if cfg.learn_temperature else "fixed at the model's"),
        ("steps", f"{summary.get('steps')} (batch {cfg.batch_size} x {world} process{'es' if world != 1 else ''} "
                  f"x {cfg.grad_accum} accumulation; contrastive batch {cfg.batch_size * world})"),
        ("optimizer", f"AdamW, lr {cfg.lr:g} ({cfg.lr_scheduler}, {cfg.warmup_steps} warmup steps), betas "
                      f"({cfg.adam_beta1:g}, {cfg.adam_beta2:g}), eps {cfg.adam_epsilon:g}, weight decay "
                      f"{cfg.weight_decay:g}, gradient clipping {cfg.max_grad_norm:g}"),
        ("precision", {"no": "fp32"}.get(precision, precision)
         + (", gradient checkpointing" if cfg.gradient_checkpointing else "")),
        ("seed", str(cfg.seed)),
    ]
    lines = [
        f"# {Path(cfg.output).name}",
        "",
        f"`{cfg.model}` finetuned contrastively (InfoNCE) with [tcompose](https://arxiv.org/abs/2312.03626) on object "
        "crops, which are often off-centre, occluded or small, so that its text tower has seen such objects; the "
        "text tower can serve as Stable Diffusion 1.x's text encoder.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import CLIPModel, CLIPProcessor",
        "",
        "model = CLIPModel.from_pretrained(\"OUT\")  # this folder",
        "processor = CLIPProcessor.from_pretrained(\"OUT\")",
        "```",
        "",
        "`text_encoder/` and `tokenizer/` hold the text tower in Stable Diffusion's layout, for SD1.x:",
        "",
        "```bash",
        "tcompose train-unet --data data/gsam --text-encoder OUT --output runs/tc-clip",
        "tcompose generate --model CompVis/stable-diffusion-v1-4 --text-encoder OUT --prompt \"a cat and a wine glass\""
        " --output gen/clip",
        "```",
        "",
        *training_section(cfg.command, recipe),
        "",
        "## Data",
        "",
        f"`{cfg.data}`: {d.get('train_crops', '?')} training crops, {d.get('heldout_crops', '?')} held out, "
        f"{d.get('categories', '?')} categories.",
        "",
        "## Held-out evaluation",
        "",
        *_evaluation(summary.get("eval")),
    ]
    if chart:
        lines += ["", f"![zero-shot top-1 per category before and after]({chart})"]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def write_model_card(out: Path, cfg: TrainClipConfig, summary: dict) -> Path:
    """Write OUT/README.md (see the module docstring)."""
    chart = "eval.png" if (Path(out) / "eval.png").is_file() else None
    return write_card(out, card_text(cfg, summary, model_license(cfg.model, cfg.revision), chart))
