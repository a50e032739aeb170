"""Per-token cross-attention heat maps from captured maps: pure tensor functions, no I/O, no drawing.

    acc = MapAccumulator(guidance=True)
    # after each UNet evaluation i (inside capture_cross_attention), if step i is selected:
    acc.add(store.maps)
    tokens = acc.token_maps()             # [B, T, S, S]: per pixel a distribution over the T tokens
    words = word_maps(tokens[0], {"cat": [2], "wine glass": [5, 6]})   # {word: [S, S]}

Aggregation: for each group (``up_16``, ...) and each selected denoising step, the conditional half of the
batch (with classifier-free guidance the UNet batch is ``[uncond, cond]``), averaged over heads; these are
summed over steps and layers per group, then divided by the group's count (steps x layers). Each group's
average ``[B, T, h, w]`` is upsampled (bilinear, align_corners=False) to the largest group side S and the
groups are averaged, weighted by their number of layers (so every layer counts the same). Every step is a
convex combination of softmax rows, so each pixel's token distribution still sums to 1. A word's map is the
sum of its tokens' maps. :func:`accumulate_attention` does the capturing and adding around a generation.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from typing import Callable, Collection, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..io.errors import UserError
from .attention import capture_cross_attention
from .joint_attention import KINDS as JOINT_KINDS

__all__ = ["group_hw", "conditional_half", "MapAccumulator", "accumulate_attention", "combine_groups", "word_maps",
           "normalize", "parse_steps"]


def group_hw(group: str, hw: int) -> tuple[int, int]:
    """Spatial shape of a group's maps from its name (``up_16`` -> 16x16, ``up_16x24`` -> 16x24); a diffusion
    transformer's block (``joint_7``, ``double_11``, ``single_3``: the number is the block's index) has the square
    patch grid of its ``hw`` positions."""
    if group.split("_")[0] in JOINT_KINDS:
        side = math.isqrt(hw)
        if side * side != hw:
            raise ValueError(f"group {group}: {hw} positions is not a square patch grid")
        return side, side
    m = re.search(r"_(\d+)(?:x(\d+))?$", group)
    if m is None:
        raise ValueError(f"group name {group!r} has no spatial size suffix (like up_16 or up_16x24)")
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) else h
    if h * w != hw:
        raise ValueError(f"group {group}: {hw} positions is not {h}x{w}")
    return h, w


def conditional_half(maps: torch.Tensor, guidance: bool) -> torch.Tensor:
    """``[B, heads, HW, T]`` -> the conditional images' maps: the second half of the batch under guidance."""
    if not guidance:
        return maps
    if maps.shape[0] % 2:
        raise ValueError(f"classifier-free guidance batch has odd size {maps.shape[0]}")
    return maps[maps.shape[0] // 2 :]


class MapAccumulator:
    """Running per-group sums of head-averaged conditional maps, over layers and steps."""

    def __init__(self, guidance: bool):
        self.guidance = guidance
        self.sums: dict[str, torch.Tensor] = {}  # group -> [B, HW, T] float32
        self.counts: dict[str, int] = {}  # group -> layers x steps added
        self.layers: dict[str, int] = {}  # group -> layers per step
        self.steps = 0

    def add(self, maps: Mapping[str, Sequence[torch.Tensor]]) -> None:
        """One UNet evaluation's maps: group -> list (one per layer) of ``[B, heads, HW, T]``."""
        for group, layer_maps in maps.items():
            total = None
            for m in layer_maps:
                m = conditional_half(m.detach(), self.guidance).float().mean(dim=1)
                total = m if total is None else total + m
            if total is None:
                continue
            self.sums[group] = self.sums[group] + total if group in self.sums else total
            self.counts[group] = self.counts.get(group, 0) + len(layer_maps)
            self.layers[group] = len(layer_maps)
        self.steps += 1

    def group_means(self) -> dict[str, torch.Tensor]:
        """Group -> ``[B, T, h, w]``: the average over the added steps, layers and heads."""
        out = {}
        for group, total in self.sums.items():
            h, w = group_hw(group, total.shape[1])
            mean = total / self.counts[group]
            out[group] = mean.permute(0, 2, 1).reshape(mean.shape[0], mean.shape[2], h, w)
        return out

    def token_maps(self) -> torch.Tensor:
        """``[B, T, S, S']``: :func:`combine_groups` of :meth:`group_means`, layer-weighted."""
        if not self.sums:
            raise UserError("no attention maps were recorded: check --layers and --timesteps")
        return combine_groups(self.group_means(), self.layers)


@contextmanager
def accumulate_attention(unet, layers: Sequence[str], guidance: bool, selected: Collection[int] | None = None,
                         on_call: Callable[[int], None] | None = None,
                         capture: Callable = capture_cross_attention) -> Iterator[MapAccumulator]:
    """Inside the block, every denoiser evaluation ``i`` (0 = the first) whose index is in ``selected`` (None: all)
    adds its captured ``layers`` maps to the yielded :class:`MapAccumulator`; ``on_call(i + 1)`` follows each
    evaluation (a progress bar). ``capture(denoiser, layers)``: the model family's capture (its objective's;
    the UNets' by default). Evaluations with gradients enabled (Attend-and-Excite's latent updates inside the
    sampling loop) are not sampling steps: they are neither counted nor added. The denoiser's own processors are
    back on exit."""
    acc = MapAccumulator(guidance=guidance)
    calls = [0]
    with capture(unet, layers) as store:

        def after_unet(_module, _args, _output):  # runs after the capture's own hook: store.maps is this call's
            if torch.is_grad_enabled():  # a pass that takes gradients (Attend-and-Excite's), not a sampling step
                return
            if selected is None or calls[0] in selected:
                acc.add(store.maps)
            calls[0] += 1
            if on_call is not None:
                on_call(calls[0])

        handle = unet.register_forward_hook(after_unet)
        try:
            yield acc
        finally:
            handle.remove()


def combine_groups(means: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None,
                   size: tuple[int, int] | None = None) -> torch.Tensor:
    """Weighted average of groups' ``[B, T, h, w]`` maps after bilinear upsampling to ``size`` (default: the
    largest group's h, w)."""
    if not means:
        raise ValueError("no groups to combine")
    if size is None:
        size = max((m.shape[-2], m.shape[-1]) for m in means.values())
    total, weight_sum = None, 0.0
    for group, m in means.items():
        if tuple(m.shape[-2:]) != tuple(size):
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False, antialias=False)
        w = float(weights[group]) if weights is not None else 1.0
        total = m * w if total is None else total + m * w
        weight_sum += w
    return total / weight_sum


def word_maps(tokens: torch.Tensor, positions: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """``tokens`` ``[T, H, W]`` -> {word: sum of its token positions' maps ``[H, W]``}."""
    out = {}
    for word, pos in positions.items():
        if not pos:
            raise ValueError(f"word {word!r} has no token positions")
        if max(pos) >= tokens.shape[0] or min(pos) < 0:
            raise ValueError(f"word {word!r}: token positions {list(pos)} outside 0..{tokens.shape[0] - 1}")
        out[word] = tokens[list(pos)].sum(dim=0)
    return out


def normalize(m: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] for display (a constant map becomes zeros)."""
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)


def parse_steps(text: str | None, n_steps: int) -> list[int]:
    """``--timesteps``: ``None``/``all`` or comma-separated step indices and ranges ``A-B`` (inclusive,
    0 = the first, noisiest UNet evaluation; ``A-`` = to the end) -> sorted indices below ``n_steps``."""
    if text is None or text.strip().lower() in ("", "all"):
        return list(range(n_steps))
    chosen: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)(?:(-)(\d*))?", part)
        if m is None:
            raise UserError(f"--timesteps {text!r}: {part!r} is not an index or a range like 0-9 or 25-")
        a = int(m.group(1))
        b = (int(m.group(3)) if m.group(3) else n_steps - 1) if m.group(2) else a
        if b < a:
            raise UserError(f"--timesteps {text!r}: empty range {part!r}")
        chosen.update(range(a, min(b, n_steps - 1) + 1))
    if not chosen:
        raise UserError(f"--timesteps {text!r} selects none of the {n_steps} denoising steps (0..{n_steps - 1})")
    return sorted(chosen)
