"""How a generating stage samples its images: :class:`GenerationSettings`, one value shared by every stage that
generates (generate, multigen, visor, geneval, fid, latency, attnviz).

    settings = GenerationSettings(steps=25, scheduler="ddim", dtype="bf16")
    cfg = GenerateConfig(model=..., output=..., prompts=..., settings=settings)
    GenerationSettings.for_stage("latency")          # a stage's own defaults (latency: batch 1)

Each stage's config holds one in its ``settings`` field; ``tcompose.cli.option_groups.generation_options``
turns the same fields into the command-line options of every generating command (``--steps``, ``--guidance``,
...), so the names, defaults and checks are declared here once; :data:`STAGE_DEFAULTS` and :data:`STAGE_UNUSED`
say where a stage departs from them. :meth:`GenerationSettings.validate` checks the values alone
(a model's own limits are checked when it loads). The module imports no torch: the CLI's ``--help`` reads it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..io.errors import UserError

__all__ = ["ExciteSettings", "GenerationSettings", "DTYPES", "EXCITE_STAGES", "STAGE_DEFAULTS", "STAGE_UNUSED"]

DTYPES = ("auto", "fp16", "bf16", "fp32")
"""The ``--dtype`` values (:func:`tcompose.evaluate.sampling.resolve_dtype` maps them to torch dtypes)."""

STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "latency": {"batch_size": 1},  # the paper's latency: one image per pipeline call
}
"""Where a stage's defaults differ from the class's (a stage not named here takes the class's)."""

EXCITE_STAGES = ("generate", "multigen", "visor", "geneval", "latency", "attnviz")
"""The stages that sample with Attend-and-Excite on ``--attend-excite``."""

STAGE_UNUSED: dict[str, tuple[str, ...]] = {
    "latency": ("batch_size", "safety_checker"),  # timed one image at a time (batch_size stays 1), no checker
    "attnviz": ("batch_size", "safety_checker"),  # one image per model, no checker
}
"""The fields a stage does not read: its command has no option for them."""


EXCITE_THRESHOLDS = ((0, 0.05), (10, 0.5), (20, 0.8))
"""Attend-and-Excite's refinement thresholds (step index, attention peak each subject must reach)."""


@dataclass(frozen=True)
class ExciteSettings:
    """Attend-and-Excite (Chefer et al. 2023) at sampling time, with the paper's and diffusers' defaults
    (:mod:`tcompose.grounding.attend_excite` says what each does)."""

    steps: int = 25
    """``--excite-steps``: the denoising steps whose latent is updated (max_iter_to_alter)."""
    thresholds: tuple[tuple[int, float], ...] = EXCITE_THRESHOLDS
    """``--excite-thresholds``: at these steps the latent is refined until every subject's peak reaches the value."""
    refinements: int = 20
    """``--excite-refinements``: at most this many gradient steps per refinement."""
    scale: float = 20.0
    """``--excite-scale``: the gradient step, shrinking as ``scale * sqrt(linspace(1, 0.5, steps))``."""
    resolution: int = 16
    """``--excite-res``: the side of the cross-attention maps read (16 at 512 px)."""
    words: tuple[str, ...] | None = None
    """``--excite-words``: the words to excite; None: the benchmark's object names, or a free prompt's noun phrases."""

    @staticmethod
    def parse_thresholds(text: str) -> tuple[tuple[int, float], ...]:
        """``"0:0.05,10:0.5,20:0.8"`` -> ((0, 0.05), (10, 0.5), (20, 0.8)); ``""``: no refinement."""
        out = []
        for part in (p.strip() for p in text.split(",") if p.strip()):
            step, _, value = part.partition(":")
            try:
                out.append((int(step), float(value)))
            except ValueError:
                raise UserError(f"--excite-thresholds {text!r}: write STEP:PEAK pairs, e.g. 0:0.05,10:0.5,20:0.8") from None
        return tuple(sorted(out))

    def validate(self) -> None:
        if self.steps < 0 or self.refinements < 0:
            raise UserError("--excite-steps and --excite-refinements must be >= 0")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise UserError(f"--excite-scale must be a positive number, got {self.scale}")
        if self.resolution < 1:
            raise UserError(f"--excite-res must be >= 1, got {self.resolution}")
        for step, value in self.thresholds:
            if step < 0 or not 0.0 < value <= 1.0:
                raise UserError(f"--excite-thresholds {step}:{value}: a step >= 0 and a peak in (0, 1]")
        if self.words is not None and not all(w.strip() for w in self.words):
            raise UserError("--excite-words: every word needs text")

    def record(self) -> dict[str, Any]:
        """What decides the images, for run.json and the settings fingerprint."""
        return {"steps": self.steps, "thresholds": [list(t) for t in self.thresholds], "refinements": self.refinements,
                "scale": self.scale, "resolution": self.resolution, "words": list(self.words) if self.words else None}


@dataclass(frozen=True)
class GenerationSettings:
    """What decides how a stage samples its images (and how fast), besides the model and the prompts.

    The fields are in the order the generate stage records them (run.json's ``config``)."""

    batch_size: int = 4
    """Images per pipeline call (speed only: image ``k`` of prompt ``p`` is the same at any batch size)."""
    dtype: str = "auto"
    """auto = fp16 on CUDA, fp32 on CPU; or fp16, bf16, fp32."""
    steps: int | None = None
    """Denoising steps; None: the model's (its family's model card: 50 for SD1.x / SD2.x / SDXL, 28 / 40 / 28 for
    SD3-medium / SD3.5-medium / SD3.5-large, 50 for FLUX.1-dev, 4 for FLUX.1-schnell)."""
    guidance: float | None = None
    """Classifier-free guidance scale (1: none; FLUX.1-dev: its embedded guidance); None: the model's (7.5 for
    SD1.x / SD2.x / SDXL, 7 / 4.5 / 3.5 for SD3-medium / SD3.5-medium / SD3.5-large, 3.5 for FLUX.1-dev, 0 for
    FLUX.1-schnell)."""
    scheduler: str | None = None
    """None = the model's own; or a key of :data:`tcompose.models.sampling.SCHEDULERS` (pndm, ddim, euler, dpm++)."""
    height: int | None = None
    """Image height in pixels, a multiple of 8; None: the UNet's sample_size x 8 (512 for SD1.x)."""
    width: int | None = None
    """Image width in pixels, a multiple of 8; None: the model's, as for height."""
    safety_checker: bool = False
    """Off by default: a blacked-out image reads as "no object drawn" to MultiGen's and VISOR's detectors, so the
    checker would turn its NSFW false positives into composition misses; the state is recorded either way."""
    seed: int = 0
    """Base seed: image ``k`` of prompt ``p`` starts from the noise of
    :func:`tcompose.models.sampling.image_seed` ``(seed, p, k)``, the same for every model."""
    device: str | None = None
    """None: accelerate's device for this process."""
    excite: ExciteSettings | None = None
    """``--attend-excite``: sample with Attend-and-Excite (SD1.x / SD2.x); None: plain sampling."""

    @classmethod
    def for_stage(cls, stage: str, **changes: Any) -> GenerationSettings:
        """``stage``'s defaults (:data:`STAGE_DEFAULTS`) with ``changes``."""
        return cls(**{**STAGE_DEFAULTS.get(stage, {}), **changes})

    @classmethod
    def taken_by(cls, stage: str) -> tuple[str, ...]:
        """The fields ``stage`` reads (all but its :data:`STAGE_UNUSED`), in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in STAGE_UNUSED.get(stage, ()))

    def resolved(self, model_defaults: tuple[int, float]) -> GenerationSettings:
        """These settings with the model's ``(steps, guidance)`` (``ModelFamily.sampling_defaults``) where they
        are None: what a stage samples and records for that model."""
        steps, guidance = model_defaults
        return self.replace(steps=self.steps if self.steps is not None else steps,
                            guidance=self.guidance if self.guidance is not None else guidance)

    def replace(self, **changes: Any) -> GenerationSettings:
        """A copy with ``changes`` (the settings are immutable)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The fields by name, in declaration order; ``excite`` only when Attend-and-Excite is on (its record)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "excite"}
        return out | ({"attend_excite": self.excite.record()} if self.excite is not None else {})

    def validate(self) -> None:
        """Refuse values that no model could take: :class:`tcompose.io.errors.UserError` (a ValueError) naming the
        option."""
        for key in ("batch_size", "steps"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
        if self.guidance is not None and not math.isfinite(self.guidance):
            raise UserError(f"--guidance {self.guidance}: not a finite number")
        for key in ("height", "width"):
            value = getattr(self, key)
            if value is not None and (value < 8 or value % 8):
                raise UserError(f"--{key} must be a positive multiple of 8, got {value}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype!r}: use {', '.join(DTYPES[:-1])} or {DTYPES[-1]}")
        if self.excite is not None:
            self.excite.validate()
        if self.scheduler is not None:
            from ..models.sampling import SCHEDULERS  # imports torch: only when a scheduler is named

            if self.scheduler not in SCHEDULERS:
                raise UserError(f"--scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)} (or leave it "
                                 "out for the model's own)")
